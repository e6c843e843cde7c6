"""Fixtures shared by several test files."""

import signal
from pathlib import Path

import pytest


def pytest_configure(config) -> None:
    """Give the tests' child processes a working Ctrl-C, whatever the shell that started pytest did.

    A shell without job control (a script's `pytest ... &`, some CI runners) starts its background commands
    with SIGINT ignored, and an ignored signal stays ignored across exec: the commands that the tests
    interrupt with SIGINT would never see it (Python keeps SIG_IGN at startup, as nohup expects). A Python
    handler in this process is reset to the default in every child it starts, so the children get Ctrl-C.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture()
def corpus(tmp_path, monkeypatch) -> Path:
    """A small text file with some structure to learn; datasets are cached inside tmp_path."""
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    lines = [f"the {a} {b} sat on the {c}.\n" for a in ("cat", "dog", "fox") for b in ("quietly", "slowly")
             for c in ("mat", "log", "hill", "wall")]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines) * 40, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real run folder: a 2-layer, 2-head char model trained for 20 steps on a small made-up corpus.

    Trained once per test session (a few seconds) and shared by the server and browser tests.
    """
    from fungpt.config import DataConfig, RunConfig, TrainConfig
    from fungpt.model import GPTConfig
    from fungpt.train import train

    root = tmp_path_factory.mktemp("tiny-run")
    lines = [f"{a} {b} sat on the {c}, said {d}!\n" for a in ("The cat", "A dog", "My fox")
             for b in ("quietly", "slowly") for c in ("mat", "log", "hill") for d in ("Ann", "Bob")]
    corpus = root / "corpus.txt"
    corpus.write_text("".join(lines) * 20, encoding="utf-8")
    out = root / "run"
    cfg = RunConfig(out_dir=str(out), data=DataConfig(path=str(corpus), tokenizer="char"),
                    model=GPTConfig(vocab_size=1, block_size=32, n_layer=2, n_head=2, n_embd=32),
                    train=TrainConfig(batch_size=4, max_iters=20, lr=3e-3, min_lr=3e-4, warmup_iters=2,
                                      eval_interval=10, eval_iters=2, checkpoint_interval=10, log_interval=1,
                                      device="cpu"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUNGPT_CACHE_DIR", str(root / "cache"))
        train(cfg, progress=False)
    return out
