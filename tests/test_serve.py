"""`fungpt serve`: the explorer's HTTP API against a real server on a loopback port.

A tiny run is trained once for the module (a few seconds); every test talks to a real uvicorn
server on 127.0.0.1 through httpx, as the page does.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from fungpt.cli import main  # noqa: E402
from fungpt.errors import FunGPTError  # noqa: E402
from fungpt.plot import read_metrics  # noqa: E402
from fungpt.runs import load_run  # noqa: E402
from fungpt.sample import sample  # noqa: E402
from fungpt.serve import create_app, running_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 50  # the test server's limits, small so the limit tests are cheap
MAX_CHARS = 100


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    return tiny_run  # conftest.py: trained once per test session


@pytest.fixture(scope="module")
def url(run_dir) -> str:
    app = create_app(run_dir, device="cpu", max_prompt_chars=MAX_CHARS, max_new_tokens=MAX_NEW)
    with running_server(app) as base:
        yield base


def stream_events(url: str, **body) -> list[dict]:
    """POST /api/generate and read its server-sent events as they arrive."""
    events = []
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


def generated_ids(events: list[dict]) -> list[int]:
    return [e["id"] for e in events if e["type"] == "token"]


def test_page_info_and_metrics(url, run_dir):
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/static/app.js">' in page.text
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{url}/static/{name}").status_code == 200, name
    info = httpx.get(f"{url}/api/info").json()
    assert info["step"] == 20 and info["n_layer"] == 2 and info["n_head"] == 2 and info["block_size"] == 32
    assert info["config"] == json.loads((run_dir / "config.json").read_text())
    assert info["limits"]["max_new_tokens"] == MAX_NEW
    assert info["has_eot"] is False  # a char tokenizer: the page offers no stop at <|endoftext|>
    metrics = httpx.get(f"{url}/api/metrics").json()
    train_rows, eval_rows = read_metrics(run_dir)
    assert metrics["train"] == [[r["step"], r["train_loss"]] for r in train_rows]
    assert [row[0] for row in metrics["eval"]] == [r["step"] for r in eval_rows] == [0, 10, 20]
    assert metrics["nonfinite"] == 0
    assert httpx.get(f"{url}/openapi.json").status_code == 404  # no schema page (it also warned on the terminal)


def test_nan_losses_are_left_out_of_the_curve_and_counted(run_dir, tmp_path):
    """A run that diverged (train.skip_nonfinite) logs NaN losses: they were sent as null, and the page's curve
    dropped to 0 and then failed. They are left out, and counted for the page to say so."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with open(run / "metrics.jsonl", "a") as f:  # written as training writes them (json.dumps: NaN, Infinity)
        f.write(json.dumps({"step": 21, "train_loss": float("nan"), "lr": 1.0}) + "\n")
        f.write(json.dumps({"step": 21, "train_loss": float("inf"), "val_loss": float("nan")}) + "\n")
        f.write(json.dumps({"step": 22, "train_loss": float("nan"), "val_loss": 4.5}) + "\n")
    with running_server(create_app(run, device="cpu")) as base:
        r = httpx.get(f"{base}/api/metrics")

    def refuse(name):
        raise AssertionError(f"{name} in the JSON")

    metrics = json.loads(r.text, parse_constant=refuse)  # strict JSON: no NaN, no Infinity
    assert [p[0] for p in metrics["train"]] == [r["step"] for r in read_metrics(run_dir)[0]]  # not step 21
    assert None not in [p[1] for p in metrics["train"]]
    assert metrics["eval"][-1] == [22, None, 4.5]  # its val loss is drawn; the NaN train loss beside it is not
    assert [row[0] for row in metrics["eval"]] == [0, 10, 20, 22]
    assert metrics["nonfinite"] == 2  # the NaN train row and the NaN val row (eval rows' train losses are not drawn)


def test_the_curve_is_read_again_only_when_the_metrics_change(run_dir, tmp_path, monkeypatch):
    """Every /api/metrics parsed the whole metrics.jsonl: 200,000 rows took 3.4 s and 260 MB a request (four at
    once 1.3 GB), while generation stalled."""
    import shutil

    import fungpt.plot

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    real, reads = fungpt.plot.read_metrics, []
    monkeypatch.setattr(fungpt.plot, "read_metrics", lambda d: reads.append(d) or real(d))
    with running_server(create_app(run, device="cpu")) as base:
        first = [httpx.get(f"{base}/api/metrics").json() for _ in range(3)]
        assert len(reads) == 1 and first[0] == first[1] == first[2]
        with open(run / "metrics.jsonl", "a") as f:  # the run trains on
            f.write(json.dumps({"step": 21, "train_loss": 1.5, "lr": 1.0}) + "\n")
        after = httpx.get(f"{base}/api/metrics").json()
    assert len(reads) == 2 and after["train"][-1] == [21, 1.5]


def test_a_curve_of_many_evals_is_thinned_too(tmp_path):
    """Eval rows were sent whole (a run evaluated at every step: 200,000 rows, 7 MB) while train rows were thinned."""
    from fungpt.serve import MAX_TRAIN_POINTS, _loss_curve

    rows = [{"step": s, "train_loss": 3.0, "val_loss": 3.0 + s / 1e6 - (s == 1234)} for s in range(1, 5002)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = _loss_curve(tmp_path)
    steps = [s for s, _, _ in curve["eval"]]
    assert len(steps) <= MAX_TRAIN_POINTS + 2 and steps[0] == 1 and steps[-1] == 5001 and steps == sorted(steps)
    assert 1234 in steps  # the lowest val loss is kept, wherever the stride falls


def test_generate_streams_the_same_text_as_fungpt_sample(url, run_dir):
    settings = dict(max_new_tokens=30, temperature=0.9, top_k=20, seed=5)
    events = stream_events(url, prompt="The cat", **settings)
    kinds = [e["type"] for e in events]
    assert kinds == ["start"] + ["token"] * 30 + ["done"]
    assert "".join(t["text"] for t in events[0]["prompt_tokens"]) == "The cat"
    tokens = events[1:-1]
    assert [t["index"] for t in tokens] == list(range(30))
    for t in tokens:
        probs = [c["prob"] for c in t["top"]]
        assert len(probs) == 10 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        by_id = {c["id"]: c["prob"] for c in t["top"]}
        if t["id"] in by_id:  # the token's own probability agrees with its entry in the top 10
            assert t["prob"] == pytest.approx(by_id[t["id"]], abs=1e-5)
        else:
            assert t["prob"] <= probs[-1]
    text = "".join(t["piece"] for t in tokens)
    assert text == "".join(t["text"] for t in tokens)  # char-level: each token is one whole character
    assert events[-1] == {"type": "done", "text": text, "tail": "", "n_tokens": 30, "stopped_at_eot": False,
                          "stopped_at_stop": False}
    # Same seed and settings as the command line: the very same text.
    assert sample(run_dir, prompt="The cat", device="cpu", **settings) == [text]


def test_a_sample_ends_at_its_stop_text_as_fungpt_samples_does(url, run_dir):
    """`fungpt sample --stop` ends a sample where its text first holds the stop text (one speech: "\n\n"); the
    explorer had no such setting. Its last token's piece is cut there, as the command line cuts it."""
    settings = dict(max_new_tokens=MAX_NEW, temperature=1.0, top_k=None, seed=7)
    whole = stream_events(url, prompt="The cat", **settings)[-1]["text"]
    stop = whole[20:22]  # (two characters the sample holds: it ends just after their first appearance)
    events = stream_events(url, prompt="The cat", stop=stop, **settings)
    done = events[-1]
    cut = whole[: whole.index(stop) + len(stop)]
    assert done["text"] == cut and done["stopped_at_stop"] is True and done["n_tokens"] == len(cut), done
    assert "".join(e["piece"] for e in events if e["type"] == "token") == cut
    assert sample(run_dir, prompt="The cat", device="cpu", stop=stop, **settings) == [cut]  # the command line's
    assert stream_events(url, prompt="The cat", stop="", **settings)[-1]["text"] == whole  # "": no stop


def test_top_candidates_match_the_model(url, run_dir):
    """The probabilities streamed for the first step are the model's softmax after the prompt."""
    events = stream_events(url, prompt="A dog", max_new_tokens=1, temperature=0)
    token = events[1]
    run = load_run(run_dir, device="cpu")
    ids = torch.tensor([run.tokenizer.encode("A dog")])
    with torch.no_grad():
        probs = torch.softmax(run.model(ids)[0, -1], dim=-1)
    top = torch.topk(probs, 10)
    assert [c["id"] for c in token["top"]] == top.indices.tolist()
    assert [c["prob"] for c in token["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert token["id"] == top.indices[0].item()  # temperature 0: greedy


def test_a_tokenizer_that_cannot_load_is_refused_before_serving(run_dir, monkeypatch):
    """GPT-2's ids without tiktoken's files: the server started, then an empty prompt got an empty answer and two
    tracebacks in its log (the tokenizer failed inside the stream, after the answer had started)."""
    from fungpt.tokenizer import CharTokenizer

    def offline(self, token_id):  # as GPT2Tokenizer answers without tiktoken's files
        raise FunGPTError("could not load GPT-2's encoding through tiktoken, whose files are not cached here")

    monkeypatch.setattr(CharTokenizer, "token_bytes", offline)
    with pytest.raises(FunGPTError, match="could not load GPT-2's encoding"):
        create_app(run_dir, device="cpu")


def test_empty_prompt_starts_a_new_document(url):
    events = stream_events(url, prompt="", max_new_tokens=3, seed=1)
    assert [t["text"] for t in events[0]["prompt_tokens"]] == ["\n"]
    assert len(generated_ids(events)) == 3
    # no max given (the page's emptied box sends null): the server's default, here its limit
    assert len(generated_ids(stream_events(url, prompt="", max_new_tokens=None, stop_at_eot=False))) == MAX_NEW


def test_two_concurrent_clients_get_what_they_get_alone(url):
    body = dict(prompt="My fox", max_new_tokens=MAX_NEW, temperature=1.0)
    alone = {seed: generated_ids(stream_events(url, seed=seed, **body)) for seed in (1, 2)}
    assert alone[1] != alone[2]
    together: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        try:
            together[seed] = generated_ids(stream_events(url, seed=seed, **body))
        except BaseException as e:  # surfaced below: a failing thread must fail the test
            errors.append(e)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in (1, 2, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert together == alone


def test_client_that_leaves_mid_stream_does_not_block_others(url):
    with httpx.stream("POST", f"{url}/api/generate", json={"prompt": "The", "max_new_tokens": MAX_NEW},
                      timeout=60) as r:
        for line in r.iter_lines():
            if '"type": "token"' in line:
                break  # read one token, then hang up
    assert len(generated_ids(stream_events(url, prompt="The", max_new_tokens=5))) == 5


@pytest.mark.parametrize("body, status, message", [
    ({"max_new_tokens": MAX_NEW + 1}, 400, f"over this server's limit of {MAX_NEW}"),
    ({"prompt": "a" * (MAX_CHARS + 1)}, 400, f"at most {MAX_CHARS}"),
    ({"prompt": "The cat€"}, 400, "'€' (U+20AC EURO SIGN) at position 7 (counting from 0) is not in this char-level "
                                  "vocabulary"),
    ({"top_k": 0}, 422, "top_k: Input should be greater than or equal to 1"),
    ({"top_p": 1.5}, 422, "top_p: Input should be less than or equal to 1"),
    ({"top_p": 0}, 422, "top_p: Input should be greater than 0"),
    ({"temperature": -1}, 422, "temperature: Input should be greater than or equal to 0"),
    ({"max_new_tokens": 0}, 422, "max_new_tokens: Input should be greater than or equal to 1"),
    ({"seed": "abc"}, 422, "seed: Input should be a valid integer"),
    ({"promt": "typo"}, 422, "promt: is not a known field"),
    # numbers must be JSON numbers: true is not 1, "0.5" is not 0.5
    ({"seed": True}, 422, "seed: Input should be a valid integer (got true)"),  # (JSON's spelling)
    ({"max_new_tokens": True}, 422, "max_new_tokens: Input should be a valid integer"),
    ({"temperature": "0.5"}, 422, "temperature: Input should be a valid number (got \"0.5\")"),
    ({"top_k": "5"}, 422, "top_k: Input should be a valid integer"),
    ({"stop": 5}, 422, "stop: Input should be a valid string"),
    ({"prompt": None}, 422, "prompt: Input should be a valid string (got null)"),
    ({"stop": "x" * 1001}, 422, "stop: String should have at most 1000 characters"),
])
def test_bad_generate_requests_get_a_clear_json_error(url, body, status, message):
    r = httpx.post(f"{url}/api/generate", json=body)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]


def test_nan_top_p_and_half_a_surrogate_pair_are_named(url):
    """top_p NaN was "should be less than or equal to 1 (got nan)"; a prompt holding a lone surrogate (a JSON
    "\\udcff") was told to set its terminal to UTF-8, which a browser has no setting for."""
    for body, message in ((b'{"top_p": NaN}', "top_p: Input should be a finite number"),
                          (b'{"prompt": "a\\udcffb"}', "the prompt holds U+DCFF, half of a UTF-16 surrogate pair, "
                                                      "which is no character: send the prompt's text as UTF-8")):
        r = httpx.post(f"{url}/api/generate", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422) and message in r.json()["error"], r.json()


def test_a_request_of_many_mistakes_is_answered_with_the_first_few(url):
    """100,000 bad ids were answered with an error naming every one: 5 MB in one "line", which the page showed
    whole. A megabyte-long value is quoted by its start."""
    r = httpx.post(f"{url}/api/attention", json={"ids": ["x"] * 100_000})
    assert r.status_code == 422 and len(r.content) < 1000, len(r.content)
    assert r.json()["error"] == ('ids.0: Input should be a valid integer (got "x"); ids.1: Input should be a valid '
                                 'integer (got "x"); ids.2: Input should be a valid integer (got "x") (and 99,997 '
                                 'more)')
    r = httpx.post(f"{url}/api/generate", json={"temperature": "9" * 500_000})
    assert r.status_code == 422 and r.json()["error"] == (
        "temperature: Input should be a valid number (got \"" + "9" * 49 + "...)"), r.json()


def test_malformed_requests(url):
    r = httpx.post(f"{url}/api/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json() == {"error": "the request body is not valid JSON"}
    r = httpx.get(f"{url}/api/nothing-here")
    assert r.status_code == 404 and r.json() == {"error": "no such page: /api/nothing-here"}
    r = httpx.get(f"{url}/api/generate")
    assert r.status_code == 405 and r.json() == {"error": "GET is not allowed on /api/generate: use POST"}
    r = httpx.post(f"{url}/api/attention")
    assert r.status_code == 422 and r.json() == {"error": "the request needs a JSON body"}
    assert httpx.head(f"{url}/").status_code == 200  # `curl -I`: the page is there
    r = httpx.post(f"{url}/api/generate", content=b'{"prompt": "hi"}')  # as `curl -d` sends it: no content type
    assert r.status_code == 422
    assert r.json() == {"error": "the request body must be sent with Content-Type: application/json"}
    for body in ('"hi"', "[1, 2]", "3", "null"):  # JSON, but not an object
        r = httpx.post(f"{url}/api/generate", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"].startswith("the request body must be a JSON object"), body
    r = httpx.post(f"{url}/api/attention", content="[1, 2]", headers={"Content-Type": "application/json"})
    assert r.json() == {"error": 'the request body must be a JSON object, e.g. {"ids": [1, 2, 3], "layer": 0}'}
    # not UTF-8; nested deeper than the parser goes; a number too long for Python to convert (was "not valid JSON"
    # without saying why: the JSON is valid)
    for body in (b'{"prompt": "\xff"}', b"[" * 100_000, b'{"prompt": "a", "max_new_tokens": ' + b"9" * 5000 + b"}"):
        r = httpx.post(f"{url}/api/generate", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"].startswith("the request body is not valid JSON"), body[:20]
        assert "whole numbers of at most 4,300 digits" in r.json()["error"]
    for route in ("/api/info", "/api/metrics"):  # `curl -I` works on the GET routes too
        assert httpx.head(f"{url}{route}").status_code == 200


def test_a_body_larger_than_any_good_request_is_refused_before_it_is_read(url):
    """An 80 MB list of ids was read, parsed (about 1 GB for seconds) and only then refused as too many tokens."""
    from fungpt.serve import MAX_BODY_BYTES

    big = b'{"ids": [' + b"1," * (MAX_BODY_BYTES // 2) + b'1]}'
    r = httpx.post(f"{url}/api/attention", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == (
        f"the request body ({len(big)} bytes) is larger than this server takes ({MAX_BODY_BYTES:,} bytes)")

    def chunked():  # no Content-Length: the size is not known before reading
        yield b'{"prompt": "The", "max_new_tokens": 1}'

    r = httpx.post(f"{url}/api/generate", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 411 and "Content-Length" in r.json()["error"]
    # Neither header: an empty body (HTTP/1.1), answered as such; it was 411 on every route, GET-only and unknown too
    host, port = url.removeprefix("http://").rsplit(":", 1)
    for path, answer in (("/api/generate", "422 "), ("/api/info", "405 "), ("/nope", "404 ")):
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                         f"Connection: close\r\n\r\n".encode())
            said = b""
            while chunk := conn.recv(65536):
                said += chunk
        assert said.startswith(f"HTTP/1.1 {answer}".encode()), (path, said[:300])
        if path == "/api/generate":
            assert b"the request needs a JSON body" in said, said[-300:]
    r = httpx.post(f"{url}/api/generate", json={"prompt": "The", "max_new_tokens": 1})  # as the page sends
    assert r.status_code == 200


def test_generations_open_at_once_are_capped(run_dir, monkeypatch):
    """Each open generation holds a KV cache of the whole context: 500 streams left unread took 2.4 GB on a small
    model (75 MB each on GPT-2 small). Past the cap, a one-line 503. A generation stops counting when its response
    ends, however: finished, or its client gone (those counted on until the garbage collector ran, and an idle
    server refused everyone), or dropped before it was sent."""
    import fungpt.serve as serve_mod

    monkeypatch.setattr(serve_mod, "MIN_STREAMS", 2)
    monkeypatch.setattr(serve_mod, "MAX_STREAMS", 2)
    app = create_app(run_dir, device="cpu", max_prompt_chars=MAX_CHARS, max_new_tokens=1000)
    body = json.dumps({"prompt": "The", "max_new_tokens": 1000}).encode()
    with contextlib.ExitStack() as stack:
        stack.callback(gc.enable)
        gc.disable()  # (the count must not wait for the garbage collector)
        base = stack.enter_context(running_server(app))
        host, port = base.removeprefix("http://").rsplit(":", 1)

        def held_open() -> socket.socket:  # a client that reads the start of its stream, then nothing more
            conn = socket.create_connection((host, int(port)), timeout=30)
            conn.sendall(f"POST /api/generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            return conn

        clients = [held_open(), held_open()]
        r = httpx.post(f"{base}/api/generate", json={"prompt": "The", "max_new_tokens": 2})
        assert (r.status_code, r.json()) == (503, {"error": "the server is running 2 generations, the most it runs "
                                                            "at once: try again when one has ended"})
        for conn in clients:  # the clients go away
            conn.close()
        deadline = time.monotonic() + 30
        while (r := httpx.post(f"{base}/api/generate", json={"prompt": "The", "max_new_tokens": 2})).status_code \
                == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.status_code == 200 and '"type": "done"' in r.text  # free again, without a garbage collection
        for _ in range(3):  # finished generations do not count either
            assert stream_events(base, prompt="The", max_new_tokens=2)[-1]["type"] == "done"
    generate = next(r.endpoint for r in app.routes if getattr(r, "path", "") == "/api/generate")
    request = serve_mod.GenerateRequest(prompt="The", max_new_tokens=2)
    for _ in range(3):  # a response made and dropped before it was sent
        generate(request)


def test_a_foreign_host_name_is_refused(url):
    """DNS rebinding: a page of attacker.example whose name now points at 127.0.0.1 must not use the model."""
    for path, method in (("/api/info", "GET"), ("/api/generate", "POST"), ("/", "GET")):
        r = httpx.request(method, f"{url}{path}", json={"max_new_tokens": 1} if method == "POST" else None,
                          headers={"Host": "attacker.example"})
        assert r.status_code == 400, path
        assert r.json()["error"].startswith("this server answers requests for 127.0.0.1 or ::1 or localhost, not")
    port = url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(f"{url}/api/info", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize("header, hosts, ok", [
    ("127.0.0.1:8000", {"127.0.0.1"}, True), ("[::1]:8000", {"::1"}, True), ("[::1]", {"::1"}, True),
    ("LOCALHOST:80", {"localhost"}, True), ("evil.example:8000", {"127.0.0.1", "localhost"}, False),
    ("127.0.0.1.evil.example", {"127.0.0.1"}, False), ("", {"127.0.0.1"}, False),
    ("192.168.1.5:8000", {"127.0.0.1"}, False), ("localhost.:80", {"localhost"}, True),  # (the root's dot)
])
def test_host_header_check(header, hosts, ok):
    from fungpt.serve import _host_allowed

    assert _host_allowed(header, hosts) is ok


@pytest.mark.parametrize("header, ok", [
    ("192.168.1.5:8000", True), ("10.0.0.7", True), ("[fe80::1]:8000", True), ("localhost:8000", True),
    ("mybox:8000", True), ("evil.example:8000", False), ("127.0.0.1.evil.example", False), ("", False),
    ("0x7f000001", False),
])
def test_host_check_on_every_interface(header, ok):
    """--host 0.0.0.0 turned the check off: a rebinding page's domain name got through. On every interface the
    server is reached at addresses it cannot list, so any IP address passes; names only its own."""
    from fungpt.serve import _host_allowed

    assert _host_allowed(header, {"127.0.0.1", "localhost", "::1", "mybox"}, any_ip=True) is ok


def test_allow_host_adds_a_name_wherever_the_server_listens(run_dir):
    """Behind a proxy or port forward the server is reached by a name that is not this machine's (and that --host
    could not bind to): --allow-host NAME lets that name in, and only it."""
    from fungpt.serve import _allow_listening_host, _host_allowed

    for host in ("127.0.0.1", "0.0.0.0"):
        app = create_app(run_dir, device="cpu")
        with socket.socket() as s:
            s.bind((host, 0))
            _allow_listening_host(app, host, s, ("Proxy.Example", "fwd.example:8443"))  # (a port is dropped)
            for bad in ("http://proxy.example/", "h\u00e9llo\x01\x1b[31m", "two words", "-1", ""):
                with pytest.raises(FunGPTError, match="is not a host name"):
                    _allow_listening_host(app, host, s, (bad,))
            _allow_listening_host(app, host, s, ("[::1]:8000", "10.0.0.7"))  # (an address is a name too)
        assert _host_allowed("proxy.example:443", app.state.hosts, app.state.any_ip)
        assert _host_allowed("fwd.example:8443", app.state.hosts, app.state.any_ip)
        assert not _host_allowed("other.example", app.state.hosts, app.state.any_ip)
        # On every interface, this machine's name over multicast DNS too (how a classroom's laptops find it)
        local = f"{socket.gethostname().split('.')[0]}.local:8000"
        assert _host_allowed(local, app.state.hosts, app.state.any_ip) is (host == "0.0.0.0")


@pytest.mark.parametrize("hostname", [None, "Box.example.com"])  # (this machine's; a name given with its domain)
def test_a_server_on_every_interface_names_the_urls_other_machines_open(run_dir, monkeypatch, hostname):
    """--host 0.0.0.0 printed only http://127.0.0.1:PORT/, which no student's laptop can open. Each URL it prints
    now passes its own Host check."""
    from fungpt.serve import _allow_listening_host, _host_allowed, _network_urls

    if hostname:
        monkeypatch.setattr(socket, "gethostname", lambda: hostname)
        monkeypatch.setattr(socket, "getfqdn", lambda *a: hostname.lower())
    name = socket.gethostname().split(".")[0]
    app = create_app(run_dir, device="cpu")
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
        urls = _network_urls(s)
        _allow_listening_host(app, "0.0.0.0", s, ())
    assert urls[-2:] == [f"http://{name}:{port}/", f"http://{name}.local:{port}/"]
    for url in urls[:-2]:  # (the address of the network this machine routes to, if it has one)
        assert not url.startswith(("http://127.", "http://0.0.0.0")) and url.endswith(f":{port}/")
    for url in urls:
        assert _host_allowed(url.split("//")[1].rstrip("/"), app.state.hosts, app.state.any_ip), url


def test_listening_on_every_interface_keeps_the_host_check(run_dir):
    app = create_app(run_dir, device="cpu")
    try:
        server = running_server(app, host="0.0.0.0")
        base = server.__enter__()
    except FunGPTError:
        pytest.skip("cannot listen on 0.0.0.0 here")
    try:
        port = base.rsplit(":", 1)[1]
        assert httpx.get(f"{base}/api/info").status_code == 200
        r = httpx.get(f"{base}/api/info", headers={"Host": f"attacker.example:{port}"})
        assert r.status_code == 400 and "its IP addresses" in r.json()["error"]
        assert "start it with --allow-host NAME" in r.json()["error"]
    finally:
        server.__exit__(None, None, None)


def test_a_tiny_top_p_keeps_the_most_probable_token(url):
    """top_p below float32's smallest number (1e-46 rounds to 0) crashed generation; it means greedy."""
    events = stream_events(url, prompt="The", max_new_tokens=5, top_p=1e-46, top_k=None)
    assert [e["type"] for e in events] == ["start"] + ["token"] * 5 + ["done"]
    assert generated_ids(events) == generated_ids(stream_events(url, prompt="The", max_new_tokens=5, temperature=0))


def test_a_newer_checkpoint_is_served_at_the_next_request(run_dir, tmp_path):
    """Serving a run that is still training: after it saves again, the server answers with the new weights."""
    import shutil

    from fungpt.config import load_run_config
    from fungpt.train import train

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    app = create_app(run, device="cpu")
    with running_server(app) as base:
        info = httpx.get(f"{base}/api/info").json()
        assert info["step"] == 20 and info["config"]["train"]["max_iters"] == 20
        before = stream_events(base, prompt="The", max_new_tokens=20, temperature=0)
        assert before[0]["model"] == info["model"]  # the page compares these: nothing changed
        cfg = load_run_config(run)
        cfg.train.max_iters, cfg.out_dir = 40, str(run)  # (config.json names the original folder)
        train(cfg, resume=True, progress=False)
        later = httpx.get(f"{base}/api/info").json()
        assert later["step"] == 40 and later["config"]["train"]["max_iters"] == 40  # the config panel follows
        assert later["model"] != info["model"]  # what tells the page to show the new checkpoint
        after = stream_events(base, prompt="The", max_new_tokens=20, temperature=0)
        assert after[0]["step"] == 40 and after[0]["model"] == later["model"]
        # the first token's probability under the step-40 weights, as the library computes it
        new = load_run(run, device="cpu")
        idx = torch.tensor([new.tokenizer.encode("The")])
        with torch.no_grad():
            probs = torch.softmax(new.model(idx)[0, -1], dim=-1)
        first = after[1]
        assert first["prob"] == pytest.approx(float(probs[first["id"]]), abs=1e-4)
        assert abs(first["prob"] - before[1]["prob"]) > 1e-3  # (the step-20 weights gave another)
        r = httpx.post(f"{base}/api/attention", json={"ids": [1, 2, 3]}).json()
        assert r["step"] == 40


def test_a_server_that_loaded_a_newer_checkpoint_lets_the_old_model_go(run_dir, tmp_path, monkeypatch):
    """Once a newer checkpoint is served (and no stream holds the old one), the model loaded at start is freed: a
    server following a training run holds one model, not one more for its whole life."""
    import gc
    import shutil
    import weakref

    import fungpt.serve as serve_module
    from fungpt import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    loaded = []

    def load_and_remember(*args, **kwargs):
        got = load_run(*args, **kwargs)
        loaded.append(weakref.ref(got.model))
        return got

    monkeypatch.setattr(serve_module, "load_run", load_and_remember)
    app = create_app(run, device="cpu")
    with running_server(app) as base:
        assert httpx.get(f"{base}/api/info").json()["step"] == 20 and len(loaded) == 1
        manifest = ckpt.find_checkpoint(run, "latest") / ckpt.MANIFEST_FILE
        later = manifest.stat().st_mtime_ns + 10**9
        os.utime(manifest, ns=(later, later))  # the same weights saved again: the server loads them anew
        httpx.get(f"{base}/api/info")
        assert len(loaded) == 2
        gc.collect()
        assert loaded[0]() is None, "the model loaded at start is still held after the newer one replaced it"
        assert loaded[1]() is not None


def test_a_server_started_again_names_its_model_as_before_and_another_run_anew(run_dir, tmp_path):
    """A page left open while the server is started again on another run at the same step must notice that another
    model answers (the step alone cannot tell), and on the same run that the same one does."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    names = []
    for run in (run_dir, other, Path(os.path.relpath(run_dir))):  # (the same run, however its path is written)
        with running_server(create_app(run, device="cpu")) as base:
            info = httpx.get(f"{base}/api/info").json()
            assert info["step"] == 20
            names.append(info["model"])
    assert names[0] == names[2] != names[1]


def test_attention_is_the_models_own(url, run_dir):
    run = load_run(run_dir, device="cpu")
    ids = run.tokenizer.encode("The cat sat")
    r = httpx.post(f"{url}/api/attention", json={"ids": ids, "layer": 1, "head": 1})
    assert r.status_code == 200
    got = r.json()
    assert got["offset"] == got["window_start"] == 0 and "".join(t["text"] for t in got["tokens"]) == "The cat sat"
    weights = torch.tensor(got["weights"])  # (T, T)
    with torch.no_grad():
        _, _, attn = run.model(torch.tensor([ids]), return_attn=True)
    torch.testing.assert_close(weights, attn[1][0, 1], atol=1e-4, rtol=0)
    assert torch.allclose(weights.sum(-1), torch.ones(len(ids)), atol=1e-3)  # each row is a distribution

    # Longer than the context: the last block_size (32) tokens, as generation sees them.
    long_ids = run.tokenizer.encode("The cat sat on the mat, said Ann!\n" * 2)
    got = httpx.post(f"{url}/api/attention", json={"ids": long_ids, "layer": 0, "head": 0}).json()
    assert got["offset"] == got["window_start"] == len(long_ids) - 32 and len(got["weights"]) == 32
    assert [t["id"] for t in got["tokens"]] == long_ids[-32:]


def test_attention_shown_in_part_is_still_the_whole_windows(url, run_dir, monkeypatch):
    """Only the last MAX_ATTENTION_TOKENS are sent, but as the model weighed them over its whole window."""
    import fungpt.serve

    monkeypatch.setattr(fungpt.serve, "MAX_ATTENTION_TOKENS", 8)  # read per request
    run = load_run(run_dir, device="cpu")
    ids = run.tokenizer.encode("The cat sat on the mat")  # shorter than block_size (32): all of it is the window
    got = httpx.post(f"{url}/api/attention", json={"ids": ids, "layer": 1, "head": 0}).json()
    assert got["offset"] == len(ids) - 8 and [t["id"] for t in got["tokens"]] == ids[-8:]
    assert got["window_start"] == 0  # the model read all of them: the map is cut for drawing only
    with torch.no_grad():
        _, _, attn = run.model(torch.tensor([ids]), return_attn=True)
    torch.testing.assert_close(torch.tensor(got["weights"]), attn[1][0, 0, -8:, -8:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("body, message", [
    ({"ids": [1, 2], "layer": 2}, "layer 2 is out of range: this model has 2 layers (0..1)"),
    ({"ids": [1, 2], "head": 5}, "head 5 is out of range: this model has 2 heads (0..1)"),
    ({"ids": [1, 999]}, "token id 999 is not in the vocabulary"),
    ({"ids": [1] * (2048 + MAX_NEW + 1)}, f"ids has {2048 + MAX_NEW + 1} tokens; this server takes at most "
                                          f"{2048 + MAX_NEW}"),  # (the default max_prompt_tokens, 2048)
    ({"ids": []}, "ids: List should have at least 1 item"),
    ({"ids": [1], "layer": -1}, "layer: Input should be greater than or equal to 0"),
    ({"ids": [True]}, "ids.0: Input should be a valid integer"),
    ({"ids": ["1"]}, "ids.0: Input should be a valid integer"),
])
def test_bad_attention_requests(url, body, message):
    r = httpx.post(f"{url}/api/attention", json=body)
    assert 400 <= r.status_code < 500
    assert message in r.json()["error"]


def test_a_run_trained_over_is_reloaded_only_if_it_is_the_same_model(run_dir, tmp_path, capsys):
    """--overwrite writes its checkpoints under the same folder names: the same model is served anew; a different
    one (other sizes, other tokenizer) is not, since the page was built for the first; the server says so once."""
    import dataclasses
    import shutil

    from fungpt.config import load_run_config
    from fungpt.train import train

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cfg = dataclasses.replace(load_run_config(run), out_dir=str(run))
    app = create_app(run, device="cpu")
    with running_server(app) as base:
        before = stream_events(base, prompt="The", max_new_tokens=3, temperature=0)
        # the same model, trained again from another seed and for as many steps (20): same folder names
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=7)), overwrite=True, progress=False)
        again = stream_events(base, prompt="The", max_new_tokens=3, temperature=0)
        assert again[0]["step"] == 20 and abs(again[1]["prob"] - before[1]["prob"]) > 1e-3  # the new weights
        # a different model in its place: 1 layer, 1 head
        small = dataclasses.replace(cfg.model, n_layer=1, n_head=1)
        train(dataclasses.replace(cfg, model=small), overwrite=True, progress=False)
        assert httpx.get(f"{base}/api/info").json()["n_layer"] == 2
        r = httpx.post(f"{base}/api/attention", json={"ids": [1, 2, 3], "layer": 1, "head": 1})
        assert r.status_code == 200 and r.json()["step"] == 20  # the model loaded at start, still whole
        httpx.get(f"{base}/api/info")
        # the folder's curve is now the other model's: not shown beside this one (it was, ending at another step)
        assert httpx.get(f"{base}/api/metrics").json() == {
            "train": [], "eval": [], "note": "the run folder now holds another model (trained over): its curve is "
                                             "not this model's; restart fungpt serve"}
        train(cfg, overwrite=True, progress=False)  # and the served architecture again: served, curve and all
        assert stream_events(base, prompt="The", max_new_tokens=1)[0]["step"] == 20
        assert set(httpx.get(f"{base}/api/metrics").json()) == {"train", "eval", "nonfinite"}
    assert capsys.readouterr().err.count("now holds a different model") == 1


def test_streams_end_when_the_server_stops(run_dir):
    """What Ctrl-C does to open streams: they end at the next token with a clear last event."""
    app = create_app(run_dir, device="cpu")
    with running_server(app) as base:
        app.state.stopping.set()  # what the server's Ctrl-C handler sets
        events = stream_events(base, prompt="The", max_new_tokens=MAX_NEW)
    assert [e["type"] for e in events] == ["start", "error"]
    assert events[-1]["error"] == "the server is shutting down"
    assert not app.state.stopping.is_set()  # cleared when the server has stopped


def test_a_request_still_sending_its_body_when_the_server_stops_is_answered(run_dir):
    """Ctrl-C while a client was still sending a request's body: the server waited 5 s for it, then cancelled it and
    printed a 60-line traceback of CancelledError; the client got no answer."""
    app = create_app(run_dir, device="cpu")
    with running_server(app) as base:
        client = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        client.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{")  # (1 byte of the 100)
        time.sleep(0.5)  # (the server waits for the rest)
    client.settimeout(10)
    with client:
        answer = client.recv(1000)
    assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b'{"error":"the server is shutting down"}'), answer


def test_create_app_on_a_missing_run_is_a_fungpt_error(tmp_path):
    with pytest.raises(FunGPTError, match="does not exist"):
        create_app(tmp_path / "nope")
    assert main(["serve", str(tmp_path / "nope")]) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_busy_port_is_a_clear_error(run_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def no_core_file() -> None:
    """(In a child process, before it runs) no core dump of it: a hung server is stopped by SIGABRT for its stacks,
    which would leave one in the project's folder where core dumps are on."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _as_from_a_terminal(then=None):
    """A child's signals as a terminal's command has them, whatever the test runner's: under `nohup pytest` SIGHUP
    was ignored, and so stayed ignored in `fungpt serve` (as it should), which then never stopped for it."""
    def preexec():
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        if then is not None:
            then()
    return preexec


def start_fungpt_serve(run_dir, port: int, close_stdout: bool = False, **popen) -> subprocess.Popen:
    """`fungpt serve RUN` in a process of its own, once it answers (its signals as from a terminal, then popen's
    preexec_fn); close_stdout: its output pipe closed at once, before its first line."""
    if os.name == "posix":
        popen["preexec_fn"] = _as_from_a_terminal(popen.get("preexec_fn"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")  # (SIGABRT: its threads' stacks on stderr)
    proc = subprocess.Popen([sys.executable, "-m", "fungpt", "serve", str(run_dir), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env, **popen)
    if close_stdout:
        proc.stdout.close()
        proc.stdout = None  # (communicate() then reads stderr alone)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"fungpt serve did not come up: {proc.communicate()}")
        time.sleep(0.2)


@pytest.mark.skipif(os.name != "posix", reason="a closed pipe's writer gets EPIPE on POSIX")
def test_fungpt_serve_goes_on_serving_when_its_output_pipe_is_closed(run_dir):
    """`fungpt serve RUN | head -1`: its next line hit the closed pipe, and the server ended, status 0, unseen."""
    port = free_port()
    proc = start_fungpt_serve(run_dir, port, close_stdout=True)
    try:
        time.sleep(0.5)
        assert proc.poll() is None and httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=10).status_code == 200
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("ignored", [False, True])
def test_a_second_ctrl_c_and_an_ignored_sigterm(run_dir, ignored):
    """A second Ctrl-C while the server stops skips its shut-down (uvicorn then logged its cancelled lifespan task:
    a 30-line traceback); a SIGTERM ignored when it started (`trap '' TERM`, as for nohup's SIGHUP) stays ignored."""
    port = free_port()
    proc = start_fungpt_serve(run_dir, port, preexec_fn=(lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
                              if ignored else None)
    try:
        if ignored:
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.5)
            assert proc.poll() is None and httpx.get(f"http://127.0.0.1:{port}/api/info").status_code == 200
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err and "ERROR" not in err, err


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="Windows has no SIGHUP")
def test_serves_signal_handlers_leave_ignored_signals_and_a_programs_own_sighup_handler_alone(run_dir):
    from fungpt.serve import _Server

    def mine(signum, frame):
        pass

    server = _Server(create_app(run_dir, device="cpu"))
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, mine)  # a program that calls serve() and handles SIGHUP itself
        with server.capture_signals():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGHUP) is mine
            assert signal.getsignal(signal.SIGINT) == server.handle_exit
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGHUP) is mine
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with server.capture_signals():
            assert signal.getsignal(signal.SIGTERM) == server.handle_exit == signal.getsignal(signal.SIGHUP)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP")
                                                                    else [])])  # (Windows has no SIGHUP)
def test_fungpt_serve_stops_cleanly_on_ctrl_c(run_dir, signum):
    """Ctrl-C, `kill` or a closed terminal (SIGHUP: it raised inside uvicorn's event loop, a 30-line traceback) stop
    the server cleanly: the open stream ends, status 0 for Ctrl-C, else the signal's (143, 129)."""
    port = free_port()
    proc = start_fungpt_serve(run_dir, port, **({"preexec_fn": no_core_file} if os.name == "posix" else {}))
    try:
        # Ctrl-C in the middle of a stream: the stream ends (at its next token, or complete if it
        # was already fully sent) and the server exits.
        with httpx.stream("POST", f"http://127.0.0.1:{port}/api/generate", json={"max_new_tokens": 1000},
                          timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if '"type": "token"' in line)
            proc.send_signal(signum)
            rest = [json.loads(x[6:]) for x in lines if x.startswith("data: ")]
        assert rest[-1]["type"] in ("done", "error")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # hung (seen once in ~50 runs, after SIGHUP; not reproduced): where, for the report
            proc.send_signal(signal.SIGABRT)  # (PYTHONFAULTHANDLER: its threads' stacks on stderr)
            try:
                _, stacks = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stacks = proc.communicate()
            print(f"fungpt serve still ran after {signal.Signals(signum).name}; its threads:\n{stacks[-8000:]}")
    assert "Traceback" not in err and "ERROR" not in err, err
    assert f"http://127.0.0.1:{port}/" in out
    if signum == signal.SIGINT:
        assert proc.returncode == 0 and "server stopped" in out, err
    else:
        assert proc.returncode == 128 + signum, err
        assert err.strip().splitlines()[-1] == f"fungpt: stopped by {signal.Signals(signum).name}"


def test_a_real_replacement_character_in_a_char_vocabulary_is_streamed():
    """A text with U+FFFD in it gives a char vocabulary holding that character: its token is a whole character,
    not the start of an unfinished one, so the stream must show it at once rather than hold it back (for good,
    in a stream that ends with it before flush)."""
    from fungpt.tokenizer import CharTokenizer, TextStream

    tok = CharTokenizer.train("ab\ufffd")
    stream = TextStream(tok)
    pieces = [stream.add(i) for i in tok.encode("a\ufffdb\ufffd")]
    assert pieces == ["a", "\ufffd", "b", "\ufffd"] and stream.flush() == ""


def test_a_real_replacement_character_split_over_bpe_tokens_is_streamed_when_it_ends():
    """A byte-level BPE that never saw U+FFFD spells it in three tokens (EF BF BD): the last one completes it, so
    the stream shows it then, not a token later (or, at the end of a stream, only at flush)."""
    from fungpt.tokenizer import BPETokenizer, TextStream

    tok = BPETokenizer.train("the cat sat on the mat\n" * 50, vocab_size=280)
    ids = tok.encode("x\ufffd")
    assert [tok.token_bytes(i) for i in ids] == [b"x", b"\xef", b"\xbf", b"\xbd"]
    stream = TextStream(tok)
    assert [stream.add(i) for i in ids] == ["x", "", "", "\ufffd"] and stream.flush() == ""


def test_text_pieces_join_into_the_text_and_hold_back_partial_characters():
    from fungpt.tokenizer import BPETokenizer, TextStream

    tok = BPETokenizer.train("the cat sat on the mat\n" * 50, vocab_size=280)  # never saw "é" or "日"
    text = "the café 日本 mat"
    ids = tok.encode(text)
    stream = TextStream(tok)
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) == text and stream.flush() == ""
    assert "\ufffd" not in "".join(pieces)
    assert "" in pieces  # the first byte of "é" completes nothing
    assert "é" in pieces and "日" in pieces  # the token with the last byte carries the whole character
    # a stream that stops inside a character: the rest comes from flush(), as decode shows it
    part = ids[: pieces.index("") + 1]  # up to the first byte of "é"
    cut = [stream.add(i) for i in part]
    assert "".join(cut) + stream.flush() == tok.decode(part) == "the caf\ufffd"
    assert stream.flush() == ""  # flushed once
    # only the ids since the last whole character are decoded: a long stream costs the same per token
    seen = []
    decode = tok.decode
    tok.decode = lambda ids_: seen.append(len(ids_)) or decode(ids_)
    stream = TextStream(tok)
    assert "".join(stream.add(i) for i in ids * 50) == text * 50
    assert max(seen) <= 4
    # a model folder's tokenizer.json that reads spaces off token positions (SentencePiece's Metaspace, WordPiece):
    # runs decoded apart would lose them, so it is decoded whole ("HelloworldHello", "hello##shello" before)
    from tokenizers import Tokenizer as HFLib
    from tokenizers import decoders, models

    from fungpt.tokenizer import HFTokenizer

    for decoder, ids_, expected in [(decoders.Metaspace(), [1, 2, 1], "Hello world Hello"),
                                    (decoders.WordPiece(), [3, 4, 3], "hellos hello")]:
        lib = HFLib(models.WordLevel({"[UNK]": 0, "\u2581Hello": 1, "\u2581world": 2, "hello": 3, "##s": 4},
                                     unk_token="[UNK]"))
        lib.decoder = decoder
        hf = HFTokenizer(lib)
        stream = TextStream(hf)
        assert not hf.joins_decodings and tok.joins_decodings
        assert "".join(stream.add(i) for i in ids_) + stream.flush() == hf.decode(ids_) == expected
        # A long stream: the same text, each token decoded with a bounded context (all ids so far were decoded
        # at every token: 0.43 ms per token after 8,000)
        long_ids = [int(i) for i in torch.randint(1, 5, (600,), generator=torch.Generator().manual_seed(0))]
        lengths, decode_hf = [], hf.decode
        hf.decode = lambda ids_, seen=lengths, real=decode_hf: seen.append(len(ids_)) or real(ids_)
        stream = TextStream(hf)
        assert "".join(stream.add(i) for i in long_ids) + stream.flush() == decode_hf(long_ids)
        assert max(lengths) <= TextStream.CONTEXT + 1


def serve_scripted(run_dir, monkeypatch, tokenizer, drawn: list[int]) -> None:
    """Make the server and `fungpt sample` load run_dir with `tokenizer` and a model that draws `drawn`."""
    import dataclasses
    import importlib

    real = load_run(run_dir, device="cpu")

    class Scripted(torch.nn.Module):  # draws `drawn`, whatever the model would
        num_params = real.model.num_params

        def generate_stream(self, idx, max_new_tokens, yield_logits=False, **kw):
            for t in drawn[:max_new_tokens]:
                ids = torch.tensor([t])
                yield (ids, torch.zeros(1, tokenizer.vocab_size)) if yield_logits else ids

    scripted = dataclasses.replace(real, model=Scripted(), tokenizer=tokenizer)
    for name in ("fungpt.serve", "fungpt.sample"):
        monkeypatch.setattr(importlib.import_module(name), "load_run", lambda *a, **k: scripted)


def test_a_stream_that_ends_inside_a_character_ends_with_its_tail(run_dir, monkeypatch):
    """A byte-level BPE sample can stop between the bytes of one character: the explorer's pieces then missed the
    final U+FFFD that its done event's text (and `fungpt sample`) have; now the done event carries it as "tail"."""
    import io

    from fungpt.tokenizer import BPETokenizer

    bpe = BPETokenizer.train("the cat sat on the mat\n" * 50, vocab_size=280)  # never saw "é": two byte tokens
    drawn = bpe.encode(" café")[:-1]  # stops after the first byte of "é"
    serve_scripted(run_dir, monkeypatch, bpe, drawn)
    with running_server(create_app(run_dir, device="cpu")) as base:
        events = stream_events(base, prompt="the", max_new_tokens=len(drawn), temperature=0)
    done = events[-1]
    assert done["text"] == bpe.decode(drawn) == " caf\ufffd" and done["tail"] == "\ufffd"
    assert "".join(e["piece"] for e in events if e["type"] == "token") + done["tail"] == done["text"]
    out = io.StringIO()  # and the command line prints it too, once
    sample(run_dir, prompt="the", max_new_tokens=len(drawn), out=out)
    assert out.getvalue() == "the caf\ufffd\n"


def test_a_sample_after_a_prompt_keeps_the_space_a_metaspace_decoder_reads_off_its_place(run_dir, monkeypatch):
    """SentencePiece's Metaspace (Llama's tokenizer.json) and WordPiece decode a text's first token without its
    space: the new tokens, decoded without the prompt before them, read "ROMEO:good night" in `fungpt sample` and the
    explorer, where decoding all ids gives "ROMEO: good night". A WordPiece vocabulary that encodes "\n" as nothing
    also made `fungpt sample` with no prompt say "pass a non-empty prompt"."""
    import dataclasses
    import io

    from tokenizers import Tokenizer as HFLib
    from tokenizers import decoders, models, pre_tokenizers

    from fungpt.sample import default_prompt_ids
    from fungpt.tokenizer import HFTokenizer

    vocab = {"[UNK]": 0, "\u2581ROMEO:": 1, "\u2581good": 2, "\u2581night": 3}
    lib = HFLib(models.WordLevel(vocab, unk_token="[UNK]"))
    lib.pre_tokenizer, lib.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    hf = HFTokenizer(lib)
    assert not hf.joins_decodings and hf.encode("ROMEO:") == [1]
    serve_scripted(run_dir, monkeypatch, hf, [2, 3])
    with running_server(create_app(run_dir, device="cpu")) as base:
        events = stream_events(base, prompt="ROMEO:", max_new_tokens=2, temperature=0)
    assert hf.decode([1, 2, 3]) == "ROMEO: good night"
    assert "".join(e["piece"] for e in events if e["type"] == "token") == events[-1]["text"] == " good night"
    out = io.StringIO()
    assert sample(run_dir, prompt="ROMEO:", max_new_tokens=2, out=out) == [" good night"]
    assert out.getvalue() == "ROMEO: good night\n"
    # --show-probs and --stop read the same text (the stop " good" was never found there)
    out = io.StringIO()
    assert sample(run_dir, prompt="ROMEO:", max_new_tokens=2, out=out, show_probs=True) == [" good night"]
    assert out.getvalue().endswith("--- text ---\nROMEO: good night\n")
    for probs in (False, True):
        assert sample(run_dir, prompt="ROMEO:", max_new_tokens=2, out=io.StringIO(), stop=" good",
                      show_probs=probs) == [" good"]
    # no prompt: the text starts as decoding starts it (no space)
    assert sample(run_dir, max_new_tokens=2, out=io.StringIO()) == ["good night"]
    # WordPiece after a whitespace-splitting pre-tokenizer (BERT's): "\n", the default start without an
    # end-of-text token, encodes to nothing, and was refused as an empty prompt nobody gave
    lib = HFLib(models.WordLevel({"[UNK]": 0, "good": 1, "night": 2}, unk_token="[UNK]"))
    lib.pre_tokenizer, lib.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    bert = HFTokenizer(lib)
    assert bert.encode("\n") == [] and bert.eot_id is None
    assert default_prompt_ids(dataclasses.replace(load_run(run_dir, device="cpu"), tokenizer=bert)) == [0]


def test_a_sample_ends_at_endoftext_as_fungpt_samples_does(run_dir, monkeypatch):
    """The explorer ran on past <|endoftext|> into a second document, with the marker in its text: the same seed
    gave other text than `fungpt sample`, which ends a sample there."""
    import io

    from fungpt.tokenizer import BPETokenizer

    bpe = BPETokenizer.train("the cat sat on the mat\n" * 50, vocab_size=280)
    drawn = [*bpe.encode("the cat"), bpe.eot_id, *bpe.encode("the mat")]
    serve_scripted(run_dir, monkeypatch, bpe, drawn)
    with running_server(create_app(run_dir, device="cpu")) as base:
        events = stream_events(base, prompt="the", max_new_tokens=len(drawn))
        whole = stream_events(base, prompt="the", max_new_tokens=len(drawn), stop_at_eot=False)
        assert httpx.get(f"{base}/api/info").json()["has_eot"] is True  # (the page offers the choice)
    out = io.StringIO()
    sample(run_dir, prompt="the", max_new_tokens=len(drawn), out=out)
    assert generated_ids(events) == bpe.encode("the cat")
    assert events[-1]["text"] == "the cat" and events[-1]["stopped_at_eot"] is True
    assert out.getvalue() == "the" + "the cat" + "\n"
    assert generated_ids(whole) == drawn and whole[-1]["stopped_at_eot"] is False  # across documents, if asked


def test_the_pages_sampling_defaults_are_fungpt_samples():
    """The same seed gives the text `fungpt sample` gives: same temperature and top_k unless changed."""
    import inspect

    from fungpt.sample import sample
    from fungpt.serve import GenerateRequest

    defaults = inspect.signature(sample).parameters
    request = GenerateRequest()
    assert (request.temperature, request.top_k, request.top_p) == (
        defaults["temperature"].default, defaults["top_k"].default, defaults["top_p"].default)
    # ... and the page's inputs, which it sends (the request's defaults apply to other clients): read from its HTML
    import re

    page = (Path(__file__).parents[1] / "fungpt" / "static" / "index.html").read_text(encoding="utf-8")
    value = {name: re.search(rf'<input id="{name}"[^>]*?value="([^"]*)"', page).group(1)
             for name in ("temperature", "top_k", "top_p")}
    assert (float(value["temperature"]), int(value["top_k"]), value["top_p"] or None) == (
        defaults["temperature"].default, defaults["top_k"].default, defaults["top_p"].default)


@pytest.mark.parametrize("host, loopback, url_host", [("127.0.0.1", True, "127.0.0.1"),
                                                      ("127.0.0.2", True, "127.0.0.2"),  # all of 127/8 is loopback
                                                      ("0.0.0.0", False, "127.0.0.1")])  # browsers refuse 0.0.0.0
def test_the_printed_address_and_the_network_warning(host, loopback, url_host):
    from fungpt.serve import _is_loopback, _url

    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError:
            pytest.skip(f"cannot bind {host} here")
        assert _is_loopback(s) is loopback
        assert _url(s) == f"http://{url_host}:{s.getsockname()[1]}"
