"""The benchmark scripts' ways of putting two contenders side by side (bench/), on stand-ins: no timing asserted."""

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import benchlib from their own folder


def test_alternating_takes_turns_every_k_tokens_and_compares_the_tokens(bench):
    from bench_generate import alternating

    n, k, order = 10, 4, []

    def fake_hf(streamer):  # like generate: the prompt first, then every new token, then end()
        streamer.put(torch.tensor([[7, 7]]))
        for i in range(n):
            order.append(("hf", i))
            streamer.put(torch.tensor([i]))
        streamer.end()
        return torch.arange(n)

    def stream(tokens):
        for i in tokens:
            order.append(("fungpt", i))
            yield torch.tensor([i])

    hf_s, fungpt_s, same = alternating(fake_hf, stream(range(n)), n, k)
    assert same and hf_s >= 0 and fungpt_s >= 0
    runs = list(_runs(order))
    assert [run[0][0] for run in runs] == ["hf", "fungpt"] * 3
    assert [len(run) for run in runs] == [4, 4, 4, 4, 2, 2]  # k tokens a turn, then what is left
    assert not alternating(fake_hf, stream([0] * n), n, k)[2]  # different tokens are reported


def _runs(order, side=lambda event: event[0]):
    """The runs of consecutive events by the same side."""
    group = [order[0]]
    for event in order[1:]:
        if side(event) != side(group[-1]):
            yield group
            group = []
        group.append(event)
    yield group


def _stamper(path: Path, seconds: float) -> list[str]:
    """A command that writes its clock every millisecond for `seconds` of its own running, then prints done."""
    code = textwrap.dedent(f"""
        import time
        with open({str(path)!r}, "w") as f:
            ran, last = 0.0, time.monotonic()
            while ran < {seconds}:
                now = time.monotonic()
                ran += min(now - last, 0.005)  # a pause (SIGSTOP) does not count as running
                last = now
                f.write(f"{{now}}\\n")
                f.flush()
                time.sleep(0.001)
        print("done")
    """)
    return [sys.executable, "-c", code]


def test_run_taking_turns_never_runs_the_commands_together(bench, tmp_path):
    from bench_train import run_taking_turns

    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    results = run_taking_turns([_stamper(paths[0], 0.6), _stamper(paths[1], 0.6)], dict(os.environ), 0.1)
    assert [out.strip() for out, _ in results] == ["done", "done"] and all(rss > 0 for _, rss in results)
    events = [i for _, i in sorted((float(t), i) for i, p in enumerate(paths) for t in p.read_text().split())]
    runs = [len(run) for run in _runs(events, side=lambda i: i)]  # clock stamps in a row from the same command
    assert len(runs) >= 4  # turns of 0.1 s over 0.6 s of running each
    # Taking turns, each wrote ~1 stamp per ms for a whole turn; running together, their stamps would interleave.
    assert min(runs[:-1]) >= 20


def test_run_taking_turns_reports_a_failed_command_and_leaves_nothing_running(bench, tmp_path):
    from bench_train import run_taking_turns

    pid_file = tmp_path / "pid"
    sleeper = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
               "time.sleep(30)"]
    with pytest.raises(SystemExit, match="boom"):
        run_taking_turns([sleeper, [sys.executable, "-c", "raise SystemExit('boom')"]], dict(os.environ), 0.05)
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left paused or running
        os.kill(int(pid_file.read_text()), 0)
