"""`fungpt serve`: a web page for exploring a trained run in the browser.

    fungpt serve out/shakespeare-char-cpu            # then open http://127.0.0.1:8000/

The page (fungpt/static/: plain HTML, CSS and JavaScript, no build step, no network access)
streams a sample token by token; clicking a generated token shows the model's top-10
next-token probabilities at that step and the attention pattern of any layer and head; a
side panel shows the run's loss curve and config.

The HTTP API behind it (FastAPI on uvicorn):
    GET  /api/info        the run: name, step, sizes, config.json, this server's limits
    GET  /api/metrics     the loss curve: train rows [step, loss] and eval rows [step, train, val], and "nonfinite":
                          how many NaN or infinite losses were left out; none, and a "note", once the folder was
                          trained over with another model
    POST /api/generate    {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_at_eot", "stop"}
                          -> server-sent events (text/event-stream), one JSON object per event:
                          {"type": "start", "step", "model", "prompt_tokens": [...]}, then one
                          {"type": "token", "index", "id", "text", "piece", "prob", "top": [{"id", "text", "prob"}]}
                          per new token, then {"type": "done", "text", "tail", "n_tokens", "stopped_at_eot",
                          "stopped_at_stop"};
                          a token's "text" is the token alone (Tokenizer.token_text), "piece" the text it completes
                          (TextStream), and "tail" what the last tokens leave when they end inside a character
                          ("\ufffd"): the pieces and the tail join into the done event's "text". As `fungpt
                          sample`, a sample ends before <|endoftext|> unless stop_at_eot is false, and just after
                          the first "stop" text (`--stop`) if one is given (its last token's piece cut there)
    POST /api/attention   {"ids", "layer", "head"} -> the (T, T) attention weights of that head
Every mistake in a request gets a 4xx answer {"error": "<one clear line>"}. Numbers must be JSON numbers
(true or "5" is refused), and requests must name this machine in their Host header (see _host_allowed).

A run that is still training: when it writes a newer checkpoint, the next request loads it ("step" in
/api/info, in a generation's "start" event and in an attention answer says which one answered; "model" there
names the weights that answer, also across a restart of the server, for the page to notice a change).

Concurrency: there is one model and a lock around every use of it. Generation takes the lock
for one token at a time, so two clients streaming at once take turns step by step (both see
progress) and never see each other's state: each request has its own KV cache and its own
torch.Generator seeded from its seed, so the same seed gives the same text with or without
other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fungpt import checkpoint as ckpt
from fungpt._startup import Stopped, raise_stopped
from fungpt.errors import FunGPTError, read_json, utf8_text
from fungpt.runs import LoadedRun, load_run, seeded_generator
from fungpt.sample import default_prompt_ids, stop_end, top_candidates
from fungpt.stopping import pipe_closed, silence_terminal
from fungpt.tokenizer import TextStream
from fungpt.viz import attention_maps

STATIC_DIR = Path(__file__).parent / "static"

# Default limits: they keep one request from holding the model for minutes, and keep the
# JSON answers small. (The page reads them from /api/info.)
MAX_PROMPT_CHARS = 4000
MAX_PROMPT_TOKENS = 2048
MAX_NEW_TOKENS = 1000
DEFAULT_NEW_TOKENS = 200
MAX_ATTENTION_TOKENS = 256  # a 256 x 256 heatmap is 65k numbers, about 0.5 MB of JSON
TOP_K_SHOWN = 10  # candidates sent with every token
MAX_TRAIN_POINTS = 1000  # the loss curve is thinned to at most this many train points, and as many eval points
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer
# A request body larger than any good one (a 4,000-character prompt or 3,048 ids are tens of KB of JSON) is
# refused before it is read: parsed, JSON costs about 13x its size in memory (an 80 MB body: +1 GB for seconds)
MAX_BODY_BYTES = 1 << 20
# Generations open at once: each holds a KV cache for the whole context (2 x n_layer x block_size x n_embd floats:
# 75 MB for GPT-2 small), so a loop of requests left unread could fill the memory. As many as STREAMS_MEMORY
# holds, at least MIN_STREAMS and at most MAX_STREAMS (they take turns on one model: more only slows each one).
STREAMS_MEMORY = 1 << 30
MIN_STREAMS, MAX_STREAMS = 4, 64
MAX_STOP_CHARS = 1000  # a generation's stop text (each token searches only its last characters: see stop_end)


# ---------------------------------------------------------------------------- requests


class GenerateRequest(BaseModel):
    """What the page sends to start a sample. Unknown fields are refused, so typos are caught; strict: a
    number must be a JSON number (true would be taken as 1, "0.5" as 0.5)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = ""
    max_new_tokens: int | None = Field(None, ge=1)  # None: 200, or the server's limit if lower
    temperature: float = Field(0.8, ge=0, allow_inf_nan=False)
    top_k: int | None = Field(200, ge=1)  # as `fungpt sample`; null: off
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int = Field(1337, ge=0, le=MAX_SEED)
    stop_at_eot: bool = True  # as `fungpt sample`: end at <|endoftext|>, the token between documents (BPE, GPT-2)
    # as `fungpt sample --stop`: end where the text first holds this ("\n\n": at the first blank line); "": none
    stop: str = Field("", max_length=MAX_STOP_CHARS)


class AttentionRequest(BaseModel):
    """A token sequence (usually prompt + generated so far) and which head to show."""

    model_config = ConfigDict(extra="forbid", strict=True)
    ids: list[int] = Field(min_length=1)
    layer: int = Field(0, ge=0)
    head: int = Field(0, ge=0)


class _CountedStream(StreamingResponse):
    """A generation's response, counted as open (see MAX_STREAMS) until it ends however it ends: finished, or its
    client gone mid-stream or before it began. Its generator is then closed at once (its KV cache freed): left to
    the garbage collector, a client that went away still counted, and the server refused others while idle."""

    def __init__(self, stream: Iterator[str], release: Callable[[], None], **kwargs):
        super().__init__(stream, **kwargs)
        self._stream = stream
        self._release = weakref.finalize(self, release)  # (once: here, or when dropped without being sent)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
            await anyio.to_thread.run_sync(_close_when_idle, self._stream)


def _close_when_idle(stream) -> None:
    """Close a generator, waiting for the step it may be running in another thread (the client went away meanwhile:
    closing it then raises "generator already executing") to end."""
    deadline = time.monotonic() + 60
    while True:
        try:
            stream.close()
            return
        except ValueError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)


class ApiError(Exception):
    """A request the server understood but cannot serve: answered as {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------- model helpers


# ---------------------------------------------------------------------------- the app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# A body that is not a JSON object is answered with an example of a good one, per route.
EXAMPLE_BODIES = {"/api/generate": '{"prompt": "ROMEO:"}', "/api/attention": '{"ids": [1, 2, 3], "layer": 0}'}


def _describe_validation(exc: RequestValidationError, sent_as_json: bool, path: str = "/api/generate") -> str:
    """Pydantic's error list as one line a person can act on,
    e.g. "top_k: Input should be greater than or equal to 1 (got 0)".

    sent_as_json: whether the request said Content-Type: application/json (FastAPI parses the body only then).
    """
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        if err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",):
            return "the request needs a JSON body"
        if tuple(err.get("loc", ())) == ("body",) and "input" in err:
            if not sent_as_json:  # FastAPI left the body unparsed (e.g. curl -d, which sends a form type)
                return "the request body must be sent with Content-Type: application/json"
            example = EXAMPLE_BODIES.get(path, EXAMPLE_BODIES["/api/generate"])
            return f"the request body must be a JSON object, e.g. {example}"  # "hi", [1], 3, null
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        msg = err.get("msg", "is not valid")
        if err.get("type") == "extra_forbidden":
            msg = "is not a known field"
        elif "input" in err and err.get("type") != "missing" and not isinstance(err["input"], (dict, list)):
            got = json.dumps(err["input"], ensure_ascii=False, default=repr)  # as the client wrote it: null, true
            msg += f" (got {got if len(got) <= 60 else got[:50] + '...'})"  # (a value of a megabyte: its start)
        parts.append(f"{field}: {msg}")
    # The first few: a list of 100,000 bad ids was answered with every one of them, 5 MB in one "line"
    more = f" (and {len(parts) - SAID_ERRORS:,} more)" if len(parts) > SAID_ERRORS else ""
    return "; ".join(parts[:SAID_ERRORS]) + more or "the request is not valid"


SAID_ERRORS = 3  # the mistakes of a request named in its answer (the rest counted)


def _read_config(run_dir: Path) -> dict:
    try:
        return read_json(run_dir / "config.json")
    except (OSError, ValueError):
        return {}


def _as_utf8(value):
    """`value` with every string valid UTF-8, as JSON answers must be: a path whose bytes are not UTF-8 (a folder
    named on a Latin-1 system) is held by Python with surrogates, and such a run's name or config.json failed
    /api/info with a server error. Each of those bytes shows as U+FFFD."""
    if isinstance(value, str):
        return utf8_text(value)
    if isinstance(value, dict):
        return {_as_utf8(k): _as_utf8(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_utf8(v) for v in value]
    return value


def create_app(run_dir: str | Path, checkpoint: str = "last", device: str = "auto", *,
               max_prompt_chars: int = MAX_PROMPT_CHARS, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
               max_new_tokens: int = MAX_NEW_TOKENS) -> FastAPI:
    """Load the run (raising FunGPTError if it cannot be loaded) and build the web app around it."""
    run_dir = Path(run_dir).expanduser()  # (~ quoted on a command line reaches us as it is)
    loaded = _checkpoint_id(run_dir, checkpoint)  # before loading: a save landing meanwhile is seen later
    run = load_run(run_dir, checkpoint, device)
    # A token's text, asked now: a tokenizer whose files cannot be loaded (GPT-2's ids without tiktoken's cache) is
    # refused here, in one line, not mid-stream, once a page has asked for a sample (its answer started already).
    run.tokenizer.token_text(0)
    return _build_app(run, checkpoint, max_prompt_chars, max_prompt_tokens, max_new_tokens,
                      run.checkpoint_id or loaded)  # (which one loaded: load_run reads again a checkpoint replaced)


def _checkpoint_id(run_dir: Path, checkpoint: str) -> tuple | None:
    """What identifies the checkpoint a run's pointer names now: its folder and when its manifest was written (a
    run started over with --overwrite reuses the folder names)."""
    try:
        folder = ckpt.find_checkpoint(run_dir, "latest" if checkpoint == "last" else "best")
        return None if folder is None else (folder, (folder / ckpt.MANIFEST_FILE).stat().st_mtime_ns)
    except (FunGPTError, OSError):
        return None


def _model_name(run_dir: Path, checkpoint_id: tuple | None) -> str:
    """A name for the weights a server answers with, the same across its restarts: the run folder, and the checkpoint
    folder with the time its manifest was written (a page left open sees another name when the server is started
    on another run, or loads a newer checkpoint, or one saved anew at the same step)."""
    folder = checkpoint_id and (str(Path(checkpoint_id[0]).resolve()), checkpoint_id[1])  # (however it was typed)
    return hashlib.sha256(repr((str(run_dir.resolve()), folder)).encode()).hexdigest()[:16]


def _build_app(run: LoadedRun, checkpoint: str, max_prompt_chars: int, max_prompt_tokens: int,
               max_new_tokens: int, loaded: tuple | None = None) -> FastAPI:
    tok, mcfg = run.tokenizer, run.config.model  # a resumed run keeps both (training refuses to change them)
    # What the handlers need of the run. They never name `run` itself: served["run"] is the run as served, and
    # once a newer checkpoint replaces it, the model loaded here must be free to go (not held for the server's life).
    run_dir, device, start_ids = run.run_dir, run.device, default_prompt_ids(run)
    tok_fingerprint = ckpt.tokenizer_fingerprint(run_dir)
    # One model: every forward pass holds this lock. Re-entrant, because a finished stream may be
    # closed (and take the lock) by the garbage collector in a thread that already holds it.
    lock = threading.RLock()
    app = FastAPI(title="FunGPT explorer", docs_url=None, redoc_url=None, openapi_url=None)  # no schema pages
    # Set on Ctrl-C: open streams end at their next token, so the server can stop at once
    # instead of waiting for (or cancelling) a 1000-token generation.
    stopping = app.state.stopping = threading.Event()
    # The Host names requests may use (see _host_allowed); serve() adds the address it listens on.
    app.state.hosts = {"127.0.0.1", "localhost", "::1"}
    app.state.any_ip = False  # every IP address too (set when listening on every interface)

    @app.middleware("http")
    async def _check_host(request: Request, call_next):
        host = request.headers.get("host", "")
        if not _host_allowed(host, app.state.hosts, app.state.any_ip):
            names = " or ".join(sorted(app.state.hosts))
            if app.state.any_ip:
                names = f"its IP addresses or {names}"
            return _error(400, f"this server answers requests for {names}, not for the Host {host!r} (to allow "
                               f"that name, start it with --allow-host NAME)")
        if request.method == "POST":  # (uvicorn stops a body at its Content-Length: the length is what is read)
            length = request.headers.get("content-length")
            if length is None and "transfer-encoding" in request.headers:
                return _error(411, "send the request body with a Content-Length header (not chunked)")
            # (neither header: an empty body, which the handler refuses as such)
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                return _error(413, f"the request body ({length} bytes) is larger than this server takes "
                                   f"({MAX_BODY_BYTES:,} bytes)")
        return await call_next(request)

    # The run as served. Training may still be going: a newer checkpoint is loaded at the next request. A
    # different model in its place (the folder trained over with --overwrite) is not: the page, its limits and
    # the tokenizer were made for this one; that takes a restart, said once.
    # "model": which weights answer, for the page (see _model_name)
    served = {"run": run, "id": loaded, "warned": False, "other_model": False, "config": _read_config(run_dir),
              "model": _model_name(run_dir, loaded)}

    def current_and_name() -> tuple[LoadedRun, str]:
        """The served run, after loading the run's newest checkpoint if it changed since, and its "model" name."""
        with lock:  # (no forward pass runs during the swap; streams already going keep their model)
            now_id = _checkpoint_id(run_dir, checkpoint)
            if now_id is None or now_id == served["id"]:
                return served["run"], served["model"]
            try:
                new = load_run(run_dir, checkpoint, str(device), retry_s=1.0)  # (every request waits meanwhile)
                same = new.config.model == mcfg and ckpt.tokenizer_fingerprint(run_dir) == tok_fingerprint
            except (FunGPTError, OSError):
                return served["run"], served["model"]  # caught mid-save or damaged: keep it, try again next request
            # (either way: not loaded again until the run saves again.) The checkpoint loaded may be newer than
            # now_id's, saved while it was read: the "model" named the older one with the newer weights
            served["id"] = new.checkpoint_id or now_id
            served["other_model"] = not same  # the folder's files (its loss curve) are another model's
            if same:
                served["run"] = new
                served["model"] = _model_name(run_dir, served["id"])
                served["config"] = _read_config(run_dir)  # (a resume may change e.g. max_iters)
            elif not served["warned"]:
                served["warned"] = True
                print(f"fungpt: {run_dir} now holds a different model (trained over): still serving the one "
                      f"loaded at start; restart fungpt serve to explore the new one", file=sys.stderr)
            return served["run"], served["model"]

    def current() -> LoadedRun:
        return current_and_name()[0]

    # Errors: always {"error": "..."} with a 4xx status, never a stack trace or pydantic's raw list.
    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        sent_as_json = request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
        return _error(422, _describe_validation(exc, sent_as_json, request.url.path))

    @app.exception_handler(ApiError)
    async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(FunGPTError)
    async def _on_fungpt_error(request: Request, exc: FunGPTError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such page: {request.url.path}"
        elif exc.status_code == 405:
            allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "another method")
            message = f"{request.method} is not allowed on {request.url.path}: use {allowed}"
        elif exc.status_code == 400 and "parsing the body" in str(exc.detail):
            # not UTF-8, nested too deep, or an integer past Python's 4,300-digit limit on converting text
            return _error(422, "the request body is not valid JSON (UTF-8 text, nested at most a few levels, "
                               "whole numbers of at most 4,300 digits)")
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message)

    # ------------------------------------------------------------------ the page

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: `curl -I`, uptime checks
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ------------------------------------------------------------------ the run

    info = {
        "run": run_dir.resolve().name,
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "step": run.step,
        "device": str(device),
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "has_eot": tok.eot_id is not None,  # the page offers stop_at_eot only then
        "params": run.model.num_params(),
        "block_size": mcfg.block_size,
        "n_layer": mcfg.n_layer,
        "n_head": mcfg.n_head,
        "n_embd": mcfg.n_embd,
        "limits": {"max_prompt_chars": max_prompt_chars, "max_prompt_tokens": max_prompt_tokens,
                   "max_new_tokens": max_new_tokens, "max_attention_tokens": MAX_ATTENTION_TOKENS},
    }

    @app.api_route("/api/info", methods=["GET", "HEAD"])
    def get_info() -> dict:
        now, name = current_and_name()
        return _as_utf8({**info, "step": now.step, "model": name, "config": served["config"]})

    metrics_lock, metrics_cache = threading.Lock(), {}  # /api/metrics's last answer, and the file it was read from

    @app.api_route("/api/metrics", methods=["GET", "HEAD"])
    def get_metrics() -> dict:
        current()  # (notices a run trained over since)
        if served["other_model"]:  # the folder's metrics.jsonl is another model's: not the curve of the one served
            return {"train": [], "eval": [], "note": "the run folder now holds another model (trained over): its "
                                                     "curve is not this model's; restart fungpt serve"}
        # The curve is worked out again only when metrics.jsonl changed: each request parsed the whole file
        # (200,000 rows: 3.4 s and 260 MB each, four at once 1.3 GB, and generation stalled meanwhile)
        with metrics_lock:  # (requests at once wait for one reading, then share it)
            try:
                st = (run_dir / "metrics.jsonl").stat()
                key = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                key = None
            if key is None or key != metrics_cache.get("key"):
                metrics_cache.update(key=key, answer=_loss_curve(run_dir))
            return metrics_cache["answer"]

    # ------------------------------------------------------------------ generation

    def encode_prompt(prompt: str) -> list[int]:
        if len(prompt) > max_prompt_chars:
            raise ApiError(f"the prompt has {len(prompt)} characters; this server takes at most {max_prompt_chars}")
        if (odd := re.search("[\ud800-\udfff]", prompt)) is not None:  # (a JSON "\udcff": half of a UTF-16 pair)
            # (said here: the tokenizer's message is a terminal's, whose bytes that were not UTF-8 become these)
            raise ApiError(f"the prompt holds U+{ord(odd[0]):04X}, half of a UTF-16 surrogate pair, which is no "
                           f"character: send the prompt's text as UTF-8")
        if prompt:
            ids = tok.encode(prompt)  # FunGPTError (-> 400) for characters outside a char vocabulary
        else:
            ids = list(start_ids)  # no prompt: start a fresh document, as `fungpt sample` does
        if len(ids) > max_prompt_tokens:
            raise ApiError(f"the prompt is {len(ids)} tokens; this server takes at most {max_prompt_tokens}")
        return ids or [0]

    def events(req: GenerateRequest, prompt_ids: list[int]) -> Iterator[str]:
        """Run one generation, yielding server-sent events. Runs in a worker thread, one step per next()."""

        def sse(obj: dict) -> str:
            return f"data: {json.dumps(obj)}\n\n"  # one SSE event; JSON never contains a raw newline

        now, name = current_and_name()  # this stream's model, to its end
        yield sse({"type": "start", "step": now.step, "model": name,
                   "prompt_tokens": [{"id": i, "text": tok.token_text(i)} for i in prompt_ids]})
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
        gen = seeded_generator(req.seed, device)  # this request's own random stream
        stream = now.model.generate_stream(idx, req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                                       top_p=req.top_p, generator=gen, yield_logits=True)
        new: list[int] = []
        pieces = TextStream(tok, context=prompt_ids if req.prompt else ())  # (the pieces follow the prompt)
        eot = tok.eot_id if req.stop_at_eot else None  # (None for a char tokenizer: it has no such token)
        at_eot = False
        made, end = "", None  # the text so far (searched for req.stop); where req.stop ended it
        try:
            while True:
                if stopping.is_set():
                    yield sse({"type": "error", "error": "the server is shutting down"})
                    return
                with lock:  # one step at a time: the two clients of a busy server take turns
                    try:
                        ids, logits = next(stream)  # (1,), (1, V)
                    except StopIteration:
                        break
                token_id = int(ids[0])
                if token_id == eot:  # the document ended: as `fungpt sample`, the sample ends without it
                    at_eot = True
                    break
                new.append(token_id)
                prob = float(F.softmax(logits[0].float(), dim=-1)[token_id])
                # The model's own probabilities (softmax, before temperature and filters), best first.
                top = [{"id": i, "text": tok.token_text(i), "prob": round(p, 5)}
                       for i, _, p in top_candidates(logits[0], tok, k=TOP_K_SHOWN)]
                piece = pieces.add(token_id)
                end = stop_end(made, piece, req.stop)
                if end is not None:
                    piece = piece[: end - len(made)]  # (as `fungpt sample --stop`: a token that runs past it is cut)
                made += piece
                yield sse({"type": "token", "index": len(new) - 1, "id": token_id, "text": tok.token_text(token_id),
                           "piece": piece, "prob": round(prob, 5), "top": top})
                if end is not None:
                    break
            # tail: bytes that never completed a character (U+FFFD), so that the pieces join into the text (the
            # pieces', not tok.decode(new): a decoder that looks back reads the first one after the prompt)
            tail = "" if end is not None else pieces.flush()
            yield sse({"type": "done", "text": made + tail, "tail": tail, "n_tokens": len(new),
                       "stopped_at_eot": at_eot, "stopped_at_stop": end is not None})
        except Exception as e:  # the response has started: report in the stream, the page shows it
            yield sse({"type": "error", "error": str(e) if isinstance(e, FunGPTError) else f"generation failed: {e!r}"})
        finally:
            with lock:
                stream.close()  # also when the client went away mid-stream

    # The generations open now (see MAX_STREAMS), counted from their request until their response ends, however it
    # ends (see _CountedStream)
    # (float32's 4 bytes a number: a bfloat16 model's caches take half, and the cap is then on the safe side)
    cache_bytes = 2 * mcfg.n_layer * mcfg.block_size * mcfg.n_embd * 4
    most_streams = max(MIN_STREAMS, min(MAX_STREAMS, STREAMS_MEMORY // cache_bytes))
    open_streams = {"n": 0}
    count_lock = threading.Lock()

    def release_stream() -> None:
        with count_lock:
            open_streams["n"] -= 1

    @app.post("/api/generate")
    def generate(req: GenerateRequest) -> StreamingResponse:
        if req.max_new_tokens is None:
            req.max_new_tokens = min(DEFAULT_NEW_TOKENS, max_new_tokens)
        if req.max_new_tokens > max_new_tokens:
            raise ApiError(f"max_new_tokens {req.max_new_tokens} is over this server's limit of {max_new_tokens}")
        prompt_ids = encode_prompt(req.prompt)  # before streaming starts, so errors still get a 4xx
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # tell proxies not to buffer
        with count_lock:  # (checked and counted in one step)
            if open_streams["n"] >= most_streams:
                raise ApiError(f"the server is running {most_streams} generations, the most it runs at once: try "
                               f"again when one has ended", status=503)
            open_streams["n"] += 1
        return _CountedStream(events(req, prompt_ids), release_stream, media_type="text/event-stream",
                              headers=headers)

    # ------------------------------------------------------------------ attention

    @app.post("/api/attention")
    def attention(req: AttentionRequest) -> dict:
        if req.layer >= mcfg.n_layer:
            raise ApiError(f"layer {req.layer} is out of range: this model has {mcfg.n_layer} "
                           f"layer{'s' * (mcfg.n_layer != 1)} "
                           f"(0..{mcfg.n_layer - 1})")
        if req.head >= mcfg.n_head:
            raise ApiError(f"head {req.head} is out of range: this model has {mcfg.n_head} "
                           f"head{'s' * (mcfg.n_head != 1)} "
                           f"(0..{mcfg.n_head - 1})")
        if len(req.ids) > max_prompt_tokens + max_new_tokens:
            raise ApiError(f"ids has {len(req.ids)} tokens; this server takes at most "
                           f"{max_prompt_tokens + max_new_tokens}")
        bad = [i for i in req.ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise ApiError(f"token id {bad[0]} is not in the vocabulary (0..{tok.vocab_size - 1})")
        # The model sees at most block_size tokens (generation slides its window the same way): the weights
        # are those of that window. Only the last MAX_ATTENTION_TOKENS of them are sent, to keep the map
        # drawable; their rows still sum to 1 over the whole window (the keys left out take the rest).
        window = max(0, len(req.ids) - mcfg.block_size)
        ids = torch.tensor(req.ids[window:], dtype=torch.long, device=device)  # (T,)
        shown = min(len(ids), MAX_ATTENTION_TOKENS)
        with lock:  # (only the rows shown and the layer asked for: the whole window's maps of every layer and
            # head are T x T numbers each, 1.2 GB for GPT-2 small's full context, for one head's map)
            now, name = current_and_name()
            maps = attention_maps(now.model, ids, last=shown, layer=req.layer)  # (nh, shown, T)
        weights = maps[req.head, :, -shown:]  # (shown, shown): row = query, column = key
        # offset: ids before the first one sent. window_start: ids before the first one the model read
        # (all of them got no attention at all); offset > window_start when the map is cut for drawing.
        return {"step": now.step, "model": name, "layer": req.layer, "head": req.head, "offset": len(req.ids) - shown,
                "window_start": window,
                "tokens": [{"id": int(i), "text": tok.token_text(int(i))} for i in ids[-shown:].tolist()],
                "weights": [[round(w, 4) for w in row] for row in weights.tolist()]}

    return app


# ---------------------------------------------------------------------------- running it


def _loss_curve(run_dir: Path) -> dict:
    """/api/metrics's answer: the run's loss curve, thinned to MAX_TRAIN_POINTS train points and as many eval points
    (a run evaluated at every step sent them all: 200,000 took 7 MB, and the page could not draw them)."""
    from fungpt.plot import read_metrics

    try:
        train_rows, eval_rows = read_metrics(run_dir)
    except FunGPTError:
        train_rows, eval_rows = [], []  # a run copied without its metrics: no curve, not an error
    # NaN or infinite losses (an eval of a run that diverged; an older FunGPT's rows of the steps skip_nonfinite
    # skipped, which now have none): such points are left out of the curve and counted, for the page to say so
    # (JSON has no NaN; they would arrive as null, or break the parser).
    train = [[r["step"], r["train_loss"]] for r in train_rows if "step" in r and "train_loss" in r]
    evals = [[r["step"], r.get("train_loss"), r["val_loss"]] for r in eval_rows if "step" in r]
    kept_train = [p for p in train if _finite(p[1])]
    kept_evals = [[s, t if _finite(t) else None, v] for s, t, v in evals if _finite(v)]
    left_out = len(train) - len(kept_train) + len(evals) - len(kept_evals)
    evals = _thinned(kept_evals)
    best = min(kept_evals, key=lambda p: p[2], default=None)  # (the lowest val loss stays on the curve)
    if best is not None and best not in evals:
        evals = sorted([*evals, best], key=lambda p: p[0])
    return {"train": _thinned(kept_train), "eval": evals, "nonfinite": left_out}


def _thinned(points: list) -> list:
    """At most about MAX_TRAIN_POINTS of `points`, evenly strided, the last one always kept."""
    stride = max(1, -(-len(points) // MAX_TRAIN_POINTS))  # ceil division: thin long runs
    last = points[-1:] if points and (len(points) - 1) % stride else []
    return points[::stride] + last


def _finite(value) -> bool:
    """Whether a metrics value is a number that JSON can carry (not NaN, not infinite, not missing)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _host_name(header: str) -> str:
    """The host of a Host header, without its port: "Example.org:80" -> "example.org", "[::1]:8000" -> "::1"."""
    name = header.strip().lower()
    if name.startswith("["):  # an IPv6 address, with or without a port
        return name[1:name.find("]")]
    if name.count(":") == 1:  # a name or IPv4 address with a port
        name = name.split(":")[0]
    return name.removesuffix(".") if ":" not in name else name  # ("vm." is "vm": the root's dot, fully qualified)


def _host_allowed(header: str, hosts: set[str], any_ip: bool = False) -> bool:
    """Whether a request's Host header (e.g. "127.0.0.1:8000", "[::1]:8000") names this server.

    A web page on another site could point its own domain name at 127.0.0.1 (DNS rebinding) and then use
    the model, and read the run's details, through its visitor's browser; such requests carry that domain
    as their Host. A rebinding attack needs a domain name, so any_ip (the server listens on every
    interface, reached at addresses it cannot list) lets every IP address through, and names still only
    from hosts."""
    name = _host_name(header)
    if name in hosts:
        return True
    if not any_ip:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False  # a name (or no Host at all)
    return True


def _allow_listening_host(app: FastAPI, host: str, sock: socket.socket, allow_hosts: tuple[str, ...] = ()) -> None:
    """Let requests name the address the server listens on (--host), besides the loopback names, and the names
    of allow_hosts (--allow-host: a proxy or port forward that reaches the server by another name).

    On every interface (0.0.0.0, ::) other machines reach it at any of its IP addresses, or by this
    machine's own name, also as NAME.local (multicast DNS, how machines on a classroom network find each other:
    no domain of the internet ends in .local, so a rebinding page cannot use it)."""
    for name in allow_hosts:  # as a Host header names it ("proxy.example:8443" -> "proxy.example")
        # (a Host header holds letters, digits, dots, dashes, a port's colon, an IPv6 address's brackets: a name with
        # spaces or control characters could never match one)
        if not re.fullmatch(r"[A-Za-z0-9._:\[\]-]+", name) or name.startswith("-"):
            raise FunGPTError(f"--allow-host {name!r} is not a host name: give a name such as proxy.example")
        app.state.hosts = {*app.state.hosts, _host_name(name)}
    if host in ("0.0.0.0", "::", ""):
        app.state.any_ip = True
        app.state.hosts = {*app.state.hosts, *(n.lower() for n in _own_names())}
    else:
        app.state.hosts = {*app.state.hosts, host.lower().strip("[]"), sock.getsockname()[0].split("%")[0]}


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise FunGPTError(f"--port {port} is not a port number: use 1-65535 (or 0 for any free port)")


def _bind(host: str, port: int) -> socket.socket:
    """Open the listening socket ourselves, so a busy port is one clear error (and port 0 works)."""
    _check_port(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FunGPTError(f"--host {host!r} is not a valid address ({e.strerror})") from None
    except UnicodeError as e:  # a name the IDNA codec cannot encode: "a..b", a part over 63 characters, ...
        # ("encoding with 'idna' codec failed (UnicodeError: label empty or too long)": the part in brackets)
        why = str(e).rpartition("UnicodeError: ")[2].rstrip(")") or str(e)
        raise FunGPTError(f"--host {host!r} is not a valid address (it cannot be written as a host name: {why})") \
            from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":  # restart right after a stop (on Windows it would let a second server share the port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        advice = {errno.EADDRINUSE: "is another server running there? pick another --port",
                  errno.EADDRNOTAVAIL: f"this machine has no address {host}: use --host 127.0.0.1 (this machine "
                                       f"only) or 0.0.0.0 (every network interface)",
                  errno.EACCES: "ports below 1024 need administrator rights: pick a --port above 1024"}
        raise FunGPTError(f"cannot listen on {host}:{port} ({e.strerror}); "
                          f"{advice.get(e.errno, 'pick another --host or --port')}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _AnsweredWhenStopping:
    """The app, for uvicorn: a request whose body is still arriving when the server stops (Ctrl-C) is answered
    "shutting down" at once. It waited for timeout_graceful_shutdown (5 s), then uvicorn cancelled it and logged a
    60-line traceback of CancelledError."""

    POLL_S = 0.25  # how often a wait for a request's body looks at the server's stop

    def __init__(self, app: FastAPI):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        body_done = scope["type"] != "http"  # (its last part read: later receives wait for a disconnect)
        cut = False  # the body was cut short by the stop: the app's answer (to a "disconnected" client) is replaced

        async def receiving():
            nonlocal body_done, cut
            if body_done:
                return await receive()
            part = asyncio.ensure_future(receive())
            try:
                while not (await asyncio.wait({part}, timeout=self.POLL_S))[0]:
                    if self.app.state.stopping.is_set():
                        cut = True
                        return {"type": "http.disconnect"}  # (the app then stops reading, as for a client gone)
            finally:
                part.cancel()  # (a no-op once it is done)
            message = part.result()
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def sending(message) -> None:
            if not cut:
                await send(message)
            elif message["type"] == "http.response.start":
                await _error(503, "the server is shutting down")(scope, receive, send)

        await self.app(scope, receiving, sending)


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the app's open streams to end when it is asked to stop."""

    def __init__(self, app: FastAPI):
        # On Ctrl-C, open streams end at their next token (app.state.stopping); the timeout is a backstop.
        # lifespan "off": the app has no start-up or shut-down handlers, and a second Ctrl-C (which skips the
        # shut-down) left uvicorn's lifespan task to be cancelled, logged as a 30-line traceback
        super().__init__(uvicorn.Config(_AnsweredWhenStopping(app), log_level="warning", access_log=False,
                                        timeout_graceful_shutdown=5, lifespan="off"))
        self.stopping = app.state.stopping

    def handle_exit(self, sig, frame) -> None:  # called by uvicorn's SIGINT/SIGTERM handler
        self.stopping.set()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, which stops gracefully on SIGINT and SIGTERM and then raises them again, with two changes: a
        signal that was ignored (nohup, `trap '' TERM`) stays ignored, and SIGHUP (a closed terminal) stops it as
        SIGTERM does where FunGPT's handler or the default would have (it raised inside the event loop); a SIGHUP
        handler of a program that calls serve() is left alone."""
        if threading.current_thread() is not threading.main_thread():  # (signals are the main thread's)
            with super().capture_signals():
                yield
            return
        hup = getattr(signal, "SIGHUP", None)  # (Windows has none)
        take = hup is not None and signal.getsignal(hup) in (signal.SIG_DFL, raise_stopped)
        ignored = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is signal.SIG_IGN]
        old = signal.signal(hup, self.handle_exit) if take else None
        try:
            with super().capture_signals():  # (raises a SIGINT or SIGTERM it caught again as it ends)
                for s in ignored:
                    signal.signal(s, signal.SIG_IGN)  # (uvicorn took them over; it puts SIG_IGN back as it ends)
                yield
        finally:
            if take:
                signal.signal(hup, old)
        if take and hup in self._captured_signals:
            signal.raise_signal(hup)  # as uvicorn does for the others

    def stop(self) -> None:
        """Ask the server to stop, from any thread (what Ctrl-C does)."""
        self.stopping.set()
        self.should_exit = True


def _url(sock: socket.socket) -> str:
    """The address to open in a browser. A socket listening on every interface (0.0.0.0, ::) is reached
    from this machine at the loopback address: browsers refuse or mishandle http://0.0.0.0/."""
    host, port = sock.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _own_names() -> list[str]:
    """This machine's names, as other machines may reach it: its host name (and getfqdn's), the first part of it,
    and that part as NAME.local (multicast DNS); never localhost (allowed anyway, and no name for other machines)."""
    full = socket.gethostname()
    short = full.split(".")[0]
    names = [short, f"{short}.local", full, socket.getfqdn()] if short else [full, socket.getfqdn()]
    return [n for n in dict.fromkeys(names) if n and n.lower() not in ("localhost", "localhost.local")]


def _network_urls(sock: socket.socket) -> list[str]:
    """URLs other machines may reach a server on every interface at: this machine's address on each network it
    routes to (no packet is sent: a UDP socket's connect only picks the route; an IPv6 socket on every interface
    takes IPv4 too), then its names (_own_names, which the Host check lets in)."""
    port = sock.getsockname()[1]
    # (documentation addresses, RFC 5737 and 3849: never anyone's)
    probes = [(socket.AF_INET6, "2001:db8::1"), (socket.AF_INET, "192.0.2.1")] if sock.family == socket.AF_INET6 \
        else [(socket.AF_INET, "192.0.2.1")]
    urls = []
    for family, far in probes:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((far, 9))
                address = probe.getsockname()[0].split("%")[0]
            ip = ipaddress.ip_address(address)
        except (OSError, ValueError):  # (no route on that network: the names alone)
            continue
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
            urls.append(f"http://[{address}]:{port}/" if ip.version == 6 else f"http://{address}:{port}/")
    return [*urls, *(f"http://{n}:{port}/" for n in _own_names()[:2])]


def _is_loopback(sock: socket.socket) -> bool:
    """Whether only this machine can reach the socket (127.0.0.0/8, ::1)."""
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def _say(line: str) -> None:
    """Print a line of the server's own: where its reader has gone (`fungpt serve ... | head -1`, a closed pipe) the
    rest of the output goes nowhere, and the server goes on serving (the closed pipe ended it, status 0)."""
    try:
        print(line, flush=True)
    except OSError as e:
        if not pipe_closed(e):
            raise
        silence_terminal(pipes=True)


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, checkpoint: str = "last",
          device: str = "auto", allow_hosts: tuple[str, ...] = ()) -> None:
    """Serve the explorer for `run` until Ctrl-C. allow_hosts: more names requests may use (a proxy's)."""
    _check_port(port)  # before the model is loaded
    app = create_app(run, checkpoint, device)
    sock = _bind(host, port)
    _allow_listening_host(app, host, sock, allow_hosts)
    url = _url(sock)
    if not _is_loopback(sock):
        where = "every network interface" if host in ("0.0.0.0", "::", "") else host
        _say(f"fungpt: warning: listening on {where}: anyone who can reach this machine can use the model "
             f"(there is no password)")
    _say(f"fungpt: exploring {run} at {url}/   (Ctrl-C to stop)")
    if host in ("0.0.0.0", "::", ""):  # (the URL above is this machine's own: the others need one of these)
        _say(f"fungpt: from other machines: {', '.join(_network_urls(sock))}")
    server = _Server(app)
    try:
        server.run(sockets=[sock])
    except Stopped:
        raise  # SIGTERM or SIGHUP, raised again after the clean shut-down: the command says so, status 143 or 129
    except KeyboardInterrupt:
        pass  # uvicorn shut down cleanly, then re-raised the Ctrl-C it had caught
    finally:
        sock.close()
    _say("fungpt: server stopped")


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` in a background thread (for tests and notebooks); yields its base URL, stops on exit.

    port=0 lets the OS pick a free port.
    """
    sock = _bind(host, port)
    _allow_listening_host(app, host, sock)
    server = _Server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise FunGPTError("the explorer server did not start")
        time.sleep(0.02)
    try:
        yield _url(sock)
    finally:
        server.stop()
        thread.join(timeout=10)
        sock.close()
        app.state.stopping.clear()  # the app can be served again
