"""Fixtures shared by several test files."""

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

_SANDBOX: str | None = None  # the session's stand-in for the caches in the user's home folder


def pytest_configure(config) -> None:
    """Keep the tests out of the user's home folder and off any proxy, and give their child processes a working
    Ctrl-C.

    Home: matplotlib's font cache and the Hugging Face hub cache go to a folder of this test session (set
    before any test module imports those libraries, which read these variables once, at import), so no test
    writes there or reads a model that happens to be cached on this machine.

    Ctrl-C: a shell without job control (a script's `pytest ... &`, some CI runners) starts its background
    commands with SIGINT ignored, and an ignored signal stays ignored across exec: the commands that the tests
    interrupt with SIGINT would never see it (Python keeps SIG_IGN at startup, as nohup expects). A Python
    handler in this process is reset to the default in every child it starts, so the children get Ctrl-C.
    """
    global _SANDBOX
    _SANDBOX = tempfile.mkdtemp(prefix="fungpt-tests-home-")
    os.environ["MPLCONFIGDIR"] = os.path.join(_SANDBOX, "matplotlib")
    os.environ["HF_HOME"] = os.path.join(_SANDBOX, "huggingface")
    os.environ.pop("HF_HUB_CACHE", None)  # else it would win over HF_HOME
    # The server tests talk to 127.0.0.1 through httpx, which sends requests through $http_proxy when it is set
    # (a CI runner behind a proxy): never for this machine's own addresses
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1,localhost,::1"]))
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config) -> None:
    if _SANDBOX is not None:
        shutil.rmtree(_SANDBOX, ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_dataset_cache(tmp_path_factory, monkeypatch) -> None:
    """Every test's prepared datasets go to a folder of its own, never to the user's ~/.cache/fungpt.

    Tests that look at the cache set FUNGPT_CACHE_DIR themselves (e.g. the `corpus` fixture), which wins.
    """
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path_factory.mktemp("fungpt-cache")))


@pytest.fixture(scope="module")
def two_threads():
    """Torch on two threads for a module's tests, as on this machine, whatever OMP_NUM_THREADS says: decoding
    splits its products' rows over the threads (one bag per thread), and cached == uncached must hold there
    too. (Set at a module's import, it held for every test of the session.)"""
    import torch

    kept = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(kept)


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
