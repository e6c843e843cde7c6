"""The trainer, the CLI and the run folder, end to end on tiny models (CPU, seconds each)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fungpt import checkpoint as ckpt
from fungpt import rundata
from fungpt.cli import main
from fungpt.config import DataConfig, RunConfig, TrainConfig, load_config, load_run_config
from fungpt.errors import FunGPTError
from fungpt.model import GPT, GPTConfig
from fungpt.runs import data_dir_of
from fungpt.runs import load_run as load_run_folder
from fungpt.sample import evaluate_run, sample
from fungpt.tokenizer import load_tokenizer
from fungpt.train import get_lr, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(corpus: Path, out_dir: Path, **train_overrides) -> RunConfig:
    train_kw = dict(batch_size=4, max_iters=12, lr=3e-3, min_lr=3e-4, warmup_iters=2, eval_interval=6,
                    eval_iters=2, checkpoint_interval=6, log_interval=1, device="cpu")
    train_kw.update(train_overrides)
    return RunConfig(out_dir=str(out_dir), data=DataConfig(path=str(corpus), tokenizer="char"),
                     model=GPTConfig(vocab_size=1, block_size=16, n_layer=2, n_head=2, n_embd=32),
                     train=TrainConfig(**train_kw))


def read_rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def ctrl_c_during_step(monkeypatch, n: int) -> None:
    """Send this process a Ctrl-C (SIGINT) during the training loop's n-th step: get_lr is called once before
    each step."""
    import importlib
    import signal

    train_module = importlib.import_module("fungpt.train")  # (fungpt.train, the attribute, is the function)
    real_get_lr, calls = train_module.get_lr, []

    def get_lr(it, tc):
        calls.append(it)
        if len(calls) == n:
            signal.raise_signal(signal.SIGINT)
        return real_get_lr(it, tc)

    monkeypatch.setattr(train_module, "get_lr", get_lr)


def test_an_interrupted_run_called_from_python_says_how_to_resume_it_from_python(corpus, tmp_path, monkeypatch,
                                                                                   capsys):
    """The example scripts, stopped by Ctrl-C, said to resume "with the same command plus --resume", a flag they do
    not have (and run again, they start over): a Python caller is told the call's own argument."""
    ctrl_c_during_step(monkeypatch, 3)
    result = train(tiny_config(corpus, tmp_path / "run", max_iters=10, eval_interval=100), progress=False)
    assert result["interrupted"] and result["step"] == 3
    said = capsys.readouterr().err
    assert ("interrupted at step 3; checkpoint saved. Resume with the same command (from Python: train(config, "
            "resume=True))") in said, said
    assert "--resume" not in said


def test_a_closed_pipe_is_told_apart_on_windows_too(monkeypatch, capsys):
    """On Windows a write to a pipe whose reader left fails with EINVAL, not EPIPE (python/cpython#79935): `fungpt
    sample RUN | more` ended "error: Invalid argument", and a run lost its last steps instead of saving them."""
    import errno
    import signal

    import fungpt.cli as cli
    from fungpt import stopping

    assert stopping.pipe_closed(BrokenPipeError()) and not stopping.pipe_closed(OSError(errno.EINVAL, "x"))
    monkeypatch.setattr(stopping, "WINDOWS", True)
    assert stopping.pipe_closed(OSError(errno.EINVAL, "Invalid argument"))
    assert not stopping.pipe_closed(OSError(errno.EINVAL, "Invalid argument", "loss?.png"))  # (a name Windows refuses)
    flag = stopping.StopFlag()

    def write(*args):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(stopping, "silence_terminal", lambda pipes=False: None)
    flag.output(write, "a row")  # (the run stops as for a closed pipe, saving its step: no error)
    assert flag.stop and flag.signum == getattr(signal, "SIGPIPE", signal.SIGTERM)

    import functools

    @functools.wraps(cli.COMMANDS["inspect"])  # (its options, as tyro reads them)
    def inspect_into_a_closed_pipe(*args, **kwargs):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(cli, "_silence_stdout", lambda: None)
    monkeypatch.setitem(cli.COMMANDS, "inspect", inspect_into_a_closed_pipe)
    assert main(["inspect", "x"]) == 0 and "Invalid argument" not in capsys.readouterr().err


def test_ctrl_c_during_the_step_0_eval_says_that_nothing_was_trained(corpus, tmp_path):
    """Ctrl-C in the step-0 eval (before the loop's own handlers) said only "fungpt: interrupted": now what it left,
    and how to start the run (--resume, which starts a run that never saved from step 0, on every platform), and that
    --overwrite had already deleted the run it replaces."""
    train_module = sys.modules["fungpt.train"]  # (fungpt.train, the attribute, is the function)
    real = train_module.evaluate

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    cfg = tiny_config(corpus, tmp_path / "run")
    said = []
    for overwrite in (False, True):  # a new run; then --overwrite of a run that had trained
        train_module.evaluate = ctrl_c
        try:
            with pytest.raises(KeyboardInterrupt) as caught:
                train(cfg, overwrite=overwrite, start_time=time.time())  # (as the fungpt command does)
        finally:
            train_module.evaluate = real
        said.append(str(caught.value))
        assert ckpt.find_checkpoint(tmp_path / "run") is None and ckpt.find_checkpoint(tmp_path / "run", "best") is None
        assert train(cfg, resume=True)["step"] == cfg.train.max_iters  # as said
    assert said == ["during the step-0 eval, before the first step: nothing was trained; start it with the same "
                    "command plus --resume",
                    f"during the step-0 eval, before the first step: nothing was trained (--overwrite had already "
                    f"deleted the run that was in {tmp_path / 'run'}); start it with the same command with --resume in "
                    f"place of --overwrite"]


@pytest.mark.parametrize("where", ["configure_optimizer", "measure_peak_flops", "time_forward"])
def test_ctrl_c_while_a_run_is_set_up_says_what_it_left(corpus, tmp_path, monkeypatch, where):
    """Ctrl-C between the run folder and the training loop (building the model, measuring the matmul ceiling,
    planning a time budget) said only "fungpt: interrupted": now that nothing was trained, or on a resume that the
    checkpoints are as they were, and the command that goes on (--resume once the folder holds a run: before its
    config.json is written, --resume would be refused there)."""
    train_module = sys.modules["fungpt.train"]  # (fungpt.train, the attribute, is the function)
    real = getattr(train_module, where)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    budget = {"max_minutes": 0.5} if where == "time_forward" else {}
    doing = "while the time budget was being planned" if budget else "while the run was being set up"
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=4, **budget)
    monkeypatch.setattr(train_module, where, ctrl_c)
    with pytest.raises(KeyboardInterrupt) as caught:
        train(cfg, start_time=time.time())  # (as the fungpt command calls it: its messages name its flags)
    early = where == "configure_optimizer"  # (before config.json)
    assert str(caught.value) == (f"{doing}, before the first step: nothing was trained; start it with the same "
                                 f"command{'' if early else ' plus --resume'}")
    monkeypatch.setattr(train_module, where, real)
    assert train(cfg, resume=not early)["step"] == 4  # as said
    longer = tiny_config(corpus, tmp_path / "run", max_iters=6, **budget)
    monkeypatch.setattr(train_module, where, ctrl_c)
    if budget:  # (a budget is planned again on a resume only for a compiled run's first step: the ceiling instead)
        monkeypatch.setattr(train_module, "measure_peak_flops", ctrl_c)
        doing = "while the run was being set up"
    with pytest.raises(KeyboardInterrupt) as caught:
        train(longer, resume=True)
    assert str(caught.value) == (f"{doing}, before training went on: its checkpoints are as they were; resume it "
                                 f"with the same command")
    monkeypatch.undo()
    assert train(longer, resume=True)["step"] == 6
    # A finished run, and the end of a run after its loop, are not "being set up": a Ctrl-C there says nothing of it
    (tmp_path / "run" / "loss.png").unlink()
    monkeypatch.setattr(train_module, "_plot_quietly", ctrl_c)
    for again in (longer, tiny_config(corpus, tmp_path / "run", max_iters=7, **budget)):
        with pytest.raises(KeyboardInterrupt) as caught:
            train(again, resume=True)
        assert not caught.value.args


def test_ctrl_c_while_training_prepares_its_data_says_that_nothing_was_kept(corpus, tmp_path, monkeypatch):
    """Ctrl-C while `fungpt train` prepares its data said only "fungpt: interrupted"; now what it left (no dataset in
    the cache, no run folder) and that the same command starts over. Once the new dataset is in place, prepare says
    that instead: it is complete, and the next run finds it."""
    data_mod = sys.modules["fungpt.data"]

    def ctrl_c(folder):  # the dataset complete in its temporary folder, about to take its place
        raise KeyboardInterrupt

    monkeypatch.setattr(data_mod, "sync_folder", ctrl_c)
    cfg = tiny_config(corpus, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt) as caught:
        train(cfg)
    assert str(caught.value) == ("while the data was being prepared, before training: no partial dataset was kept; "
                                 "the same command prepares it again")
    kept = [p.name for p in (tmp_path / "cache" / "datasets").iterdir() if not p.name.startswith(".")]  # (.lock)
    assert not (tmp_path / "run").exists() and kept == []
    monkeypatch.undo()
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))  # (the corpus fixture's, undone above)
    monkeypatch.setattr(data_mod, "fsync_dir", lambda folder: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt, match=r"datasets/corpus-char-\w+ holds the dataset just prepared, complete"):
        train(cfg)
    monkeypatch.undo()
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    assert train(cfg, progress=False)["step"] == cfg.train.max_iters  # (on the dataset that was kept)


def test_the_last_step_is_logged_and_a_wsd_warmup_into_the_decay_is_noted(corpus, tmp_path, capsys, monkeypatch):
    """With a log_interval that does not divide max_iters, the last steps' loss and lr were never logged (the curve
    stopped short; the bar ended showing an older lr). A WSD warmup that ran into the decay window dropped the lr
    from its peak in one step, without a word (cosine's like case has its note)."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=10, log_interval=4, warmup_iters=9, lr_schedule="wsd"), progress=False)
    assert [r["step"] for r in read_rows(out) if "lr" in r] == [1, 4, 8, 10]
    printed = capsys.readouterr().out
    assert re.search(r"note: train.warmup_iters = 9 runs into the WSD decay, which starts at step 8 \(the last "
                     r"wsd_decay_frac = 0.2 of the schedule, warmup included\): after the warmup the lr drops from "
                     r"0.0027 to 0.00165", printed)
    # (a new run says its size, as a fine-tune does)
    params = load_run_folder(out, device="cpu").model.num_params()
    assert f"fungpt: a new model of {params:,} parameters (2 layers, 2 heads, n_embd 32, block_size 16, " in printed
    # a decay that starts early but slowly: the lr still rises after the warmup, nothing to note
    train(tiny_config(corpus, tmp_path / "slow", max_iters=20, warmup_iters=2, lr_schedule="wsd", wsd_decay_frac=1.0),
          progress=False)
    assert "runs into the WSD decay" not in capsys.readouterr().out
    # a run that ends elsewhere (a signal, a time budget) logs its last step too
    ctrl_c_during_step(monkeypatch, 6)
    stopped = tmp_path / "stopped"
    assert train(tiny_config(corpus, stopped, max_iters=10, log_interval=4), progress=False)["step"] == 6
    assert [r["step"] for r in read_rows(stopped) if "lr" in r] == [1, 4, 6]


def test_end_to_end_train_sample_eval(corpus, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(corpus, out, max_iters=30, eval_interval=10), progress=False)
    assert result["step"] == 30
    for name in ("config.json", "run.json", "metrics.jsonl", "latest.json", "best.json", "loss.png"):
        assert (out / name).is_file(), name
    rows = read_rows(out)
    evals = [r for r in rows if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # it learned something
    vocab = json.loads((out / "config.json").read_text())["model"]["vocab_size"]
    assert abs(evals[0]["val_loss"] - math.log(vocab)) < 0.3  # random init: about ln(V)

    buf = io.StringIO()
    texts = sample(out, prompt="the ", max_new_tokens=20, seed=7, out=buf)
    assert len(texts[0]) > 0 and buf.getvalue() == "the " + texts[0] + "\n"  # streamed: all of it, once
    again = sample(out, prompt="the ", max_new_tokens=20, seed=7)
    assert again == texts  # same seed, same text

    res = evaluate_run(out)
    assert math.isclose(res["perplexity"], math.exp(res["loss"]))
    # every val token is scored, where training averaged eval_iters random batches: the note says why they differ
    assert res["note"] == (f"fungpt: note: training logged val loss {evals[-1]['val_loss']:.4f} at step 30, the mean "
                           f"of train.eval_iters = 2 random batches of the val split; this is every val token's "
                           f"(train.eval_full_val = true makes training's the same)")
    assert res["source"] == f"the val split of {corpus} ({data_dir_of(out)})"
    assert res["bits_per_token"] == pytest.approx(res["loss"] / math.log(2))
    # the note quotes the last row of the checkpoint's step (a resume may log a step twice), not a later step's
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 30, "train_loss": 1.0, "val_loss": 4.5}) + "\n")
        f.write(json.dumps({"step": 31, "train_loss": 1.0, "val_loss": 7.25}) + "\n")
    assert evaluate_run(out)["note"].startswith("fungpt: note: training logged val loss 4.5000 at step 30, ")
    assert res["bits_per_byte"] == pytest.approx(res["bits_per_char"])  # ASCII: one byte per character
    assert res["loss"] < evals[0]["val_loss"]
    res_file = evaluate_run(out, input=corpus)
    assert res_file["tokens"] == len(corpus.read_text()) - 1
    assert res_file["note"] is None  # (another text than the val split: training's val loss is not its own)
    # a run whose evals scored every val token too: its logged val loss is eval's, so no note (even one that
    # differs a little: another device, autocast)
    full = tmp_path / "full"
    cfg = tiny_config(corpus, full, max_iters=2)
    cfg.train.eval_full_val = True
    train(cfg, progress=False)
    rows = (full / "metrics.jsonl").read_text().splitlines()
    last = json.loads(rows[-1])
    (full / "metrics.jsonl").write_text("\n".join([*rows[:-1], json.dumps({**last, "val_loss": last["val_loss"]
                                                                             + 1e-3})]) + "\n")
    assert evaluate_run(full)["note"] is None


def test_metrics_schema(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=6, eval_interval=3), progress=False)
    rows = read_rows(out)
    train_rows = [r for r in rows if "lr" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    for r in train_rows:
        assert set(r) >= {"step", "train_loss", "lr", "dt_ms", "tokens_per_sec", "mfu", "elapsed_s"}
        assert r["dt_ms"] > 0 and r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
    for r in eval_rows:
        assert set(r) >= {"step", "train_loss", "val_loss", "elapsed_s"}
    assert [r["step"] for r in eval_rows] == [0, 3, 6]


def test_a_warmup_as_long_as_the_run_is_pointed_out(corpus, tmp_path, capsys):
    """A preset cut short (--train.max-iters 50 with its warmup_iters = 100) never reaches its learning rate."""
    train(tiny_config(corpus, tmp_path / "a", max_iters=3, warmup_iters=3), progress=False)
    assert "train.warmup_iters = 3 is not below the run's 3 steps, so the learning rate never reaches train.lr = " \
           "0.003" in capsys.readouterr().out
    train(tiny_config(corpus, tmp_path / "b", max_iters=3, warmup_iters=2), progress=False)
    assert "warmup_iters" not in capsys.readouterr().out
    from fungpt.train import schedule_notes  # (max_iters 0, no step: "... is not below the run's 0 steps" was noise)
    assert schedule_notes(TrainConfig(max_iters=0, warmup_iters=0), new_run=True) == []
    # under a time budget, lr_decay_iters (or max_iters) steps stand for the whole run: a warmup as long never ended
    # (the lr of the last step was half of train.lr), without a word
    said = schedule_notes(TrainConfig(max_iters=20, warmup_iters=40, max_minutes=1.0), new_run=True)
    assert said == ["fungpt: note: train.warmup_iters = 40 is not below lr_decay_iters (or max_iters) = 20, the steps "
                    "that stand for the whole time budget, so the learning rate never reaches train.lr = 0.001, nor "
                    "decays; lower warmup_iters to reach it"]
    assert schedule_notes(TrainConfig(max_iters=20, warmup_iters=10, max_minutes=1.0), new_run=True) == []
    # (and no note of a decay "over before the warmup ends, the lr dropping to min_lr", which a budget never does)
    said = schedule_notes(TrainConfig(max_iters=1000, lr_decay_iters=100, warmup_iters=200, max_minutes=1.0,
                                      lr_schedule="constant"), new_run=True)
    assert len(said) == 1 and "reaches train.lr = 0.001; lower warmup_iters" in said[0]  # (constant: never decays)
    # a schedule that decays early still reaches lr first: only max_iters counts
    train(tiny_config(corpus, tmp_path / "c", max_iters=4, warmup_iters=2, lr_decay_iters=1,
                      lr_schedule="constant"), progress=False)
    assert "warmup_iters" not in capsys.readouterr().out
    # on a time budget the schedule runs on the share of the run done, decay_iters steps standing for all of it: a
    # warmup as long never ends there either (the lrs of this run: 0.00075, 0.0015, 0.00225)
    # (max_iters ends it after 3 steps: a budget of a minute costs no time, and a busy machine's start-up fits it)
    train(tiny_config(corpus, tmp_path / "d", max_iters=3, warmup_iters=3, max_minutes=1.0), progress=False)
    assert "train.warmup_iters = 3 is not below lr_decay_iters (or max_iters) = 3, the steps that stand for the " \
           "whole time budget" in capsys.readouterr().out
    train(tiny_config(corpus, tmp_path / "d2", max_iters=3, warmup_iters=2, max_minutes=1.0), progress=False)
    assert "warmup_iters" not in capsys.readouterr().out
    # a decay that ends within the warmup: the lr falls from its peak to min_lr in one step
    train(tiny_config(corpus, tmp_path / "e", max_iters=4, warmup_iters=2, lr_decay_iters=2), progress=False)
    assert ("fungpt: note: train.lr_decay_iters = 2 is not above train.warmup_iters = 2, so the decay is over before "
            "the warmup ends: the lr drops to min_lr = 0.0003 the step after it") in capsys.readouterr().out


def test_mfu_never_reads_above_100_percent(corpus, tmp_path, monkeypatch):
    """The ceiling is timed once, at the start: timed while another program had the cores, it came out low, and a
    loaded machine's rows read "mfu": 1.31. A step faster than the ceiling raises it."""
    monkeypatch.setattr(sys.modules["fungpt.train"], "measure_peak_flops", lambda device, dtype: 1e6)  # far too low
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=4, eval_interval=100), progress=False)
    rows = [r for r in read_rows(out) if "lr" in r]
    mfus = [r["mfu"] for r in rows]
    assert len(mfus) == 4 and all(0 < m <= 1 for m in mfus) and mfus[0] == 1
    # the ceiling is raised to the fastest step so far, not each row clamped at 100%
    fastest = max(1000 / rows[0]["dt_ms"], 1000 / rows[1]["dt_ms"])  # steps per second
    assert mfus[1] == pytest.approx((1000 / rows[1]["dt_ms"]) / fastest, abs=2e-3)


def test_the_logged_speed_and_mfu_are_the_steps_tokens_and_flops_over_its_time(corpus, tmp_path, monkeypatch):
    """tokens_per_sec and the FLOPs side of MFU were checked only to be positive (and MFU below 1): a speed 1000x
    wrong, or MFU counting 3x the FLOPs, passed. Here the ceiling is fixed: a step of 0.1 ms would be 100%."""
    from fungpt.runs import load_run as load_run_folder

    out = tmp_path / "run"
    config = tiny_config(corpus, out, max_iters=4, eval_interval=100)
    tokens_per_step = config.train.batch_size * config.model.block_size  # 4 x 16
    # FLOPs of a step of a model of the run's shape (its vocabulary is the corpus's 22 characters: checked below)
    flops = GPT(GPTConfig(vocab_size=22, block_size=16, n_layer=2, n_head=2, n_embd=32)).flops_per_token() * \
        tokens_per_step
    monkeypatch.setattr(sys.modules["fungpt.train"], "measure_peak_flops", lambda device, dtype: flops / 1e-4)
    train(config, progress=False)
    assert load_run_folder(out, device="cpu").model.flops_per_token() * tokens_per_step == flops
    rows = [r for r in read_rows(out) if "lr" in r]
    assert len(rows) == 4
    for r in rows:
        seconds = r["dt_ms"] / 1000
        assert r["tokens"] == r["step"] * tokens_per_step
        assert r["tokens_per_sec"] == pytest.approx(tokens_per_step / seconds, rel=5e-3)
        assert r["mfu"] == pytest.approx(1e-4 / seconds, rel=5e-3, abs=1e-4)  # (flops / seconds / ceiling)


def test_the_flops_ceiling_waits_for_the_gpu_named_with_its_index(monkeypatch):
    """Training times the ceiling on "cuda:0": compared with "cuda" alone, the timing never waited for the GPU,
    so on an H200 the ceiling read 13x too high and every MFU 13x too low."""
    from fungpt.hardware import sync

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: waited.append(True))
    sync("cuda:0")
    sync("cuda")
    sync("cpu")
    assert waited == [True, True]


@pytest.mark.parametrize(("optimizer", "dropout", "log_interval"), [("adamw", 0.1, 1), ("muon", 0.0, 1),
                                                                    ("adamw", 0.0, 4)])
def test_resume_is_bit_exact(corpus, tmp_path, optimizer, dropout, log_interval):
    # lr_decay_iters pins the schedule, so the short first leg follows the same lr curve. With log_interval 4 the
    # first leg also logs its last step, 6, which the uninterrupted run does not: the resume drops that row.
    kw = dict(lr_decay_iters=12, optimizer=optimizer, log_interval=log_interval)

    def config(out, max_iters):  # with dropout, the random stream must also continue where it stopped
        cfg = tiny_config(corpus, out, max_iters=max_iters, **kw)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=dropout))

    full = tmp_path / "full"
    train(config(full, 12), progress=False)
    part = tmp_path / "part"
    train(config(part, 6), progress=False)
    result = train(config(part, 12), resume=True, progress=False)
    assert result["step"] == 12

    def losses(out):
        return [(r["step"], r["train_loss"]) for r in read_rows(out) if "lr" in r]

    assert losses(part) == losses(full)  # bit for bit, not approximately
    assert [(r["step"], "val_loss" in r) for r in read_rows(part)] == [(r["step"], "val_loss" in r)
                                                                        for r in read_rows(full)]
    a = ckpt.find_checkpoint(full)
    b = ckpt.find_checkpoint(part)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_a_resume_with_another_log_interval_keeps_the_rows_logged_before(corpus, tmp_path):
    """Whether the checkpoint's step was logged only because the command ended there is a question of the
    log_interval it was trained with: the resume's own (10) took step 25, logged every 5, for a stray row."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=25, log_interval=5, eval_interval=100), progress=False)
    train(tiny_config(corpus, out, max_iters=30, log_interval=10, eval_interval=100), resume=True, progress=False)
    assert [r["step"] for r in read_rows(out) if "val_loss" not in r] == [1, 5, 10, 15, 20, 25, 30]


def test_train_gives_the_callers_random_stream_back(corpus, tmp_path):
    """A program that seeds torch, then trains, then draws: it draws what it would have drawn without train()."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    train(tiny_config(corpus, tmp_path / "run", max_iters=2), progress=False)
    assert torch.equal(torch.rand(4), expected)
    # and the run itself is still seeded by its config, whatever the caller's stream
    torch.manual_seed(999)
    train(tiny_config(corpus, tmp_path / "again", max_iters=2), progress=False)
    def losses(out):
        return [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_rows(out)]

    assert losses(tmp_path / "again") == losses(tmp_path / "run")


def test_train_computes_as_in_a_fresh_process_whatever_the_callers_grad_mode_and_default_dtype(corpus, tmp_path):
    """Inside a notebook's torch.no_grad() (or inference_mode) train() failed at backward with a raw error, leaving a
    run half made; under torch.set_default_dtype(torch.float64) it trained a float64 model while saying and recording
    float32, and load_run then loaded float64 weights. The caller's settings come back after."""
    from safetensors.torch import load_file

    reference = train(tiny_config(corpus, tmp_path / "plain", max_iters=2), progress=False)["val_loss"]
    with torch.no_grad():
        assert train(tiny_config(corpus, tmp_path / "no_grad", max_iters=2), progress=False)["val_loss"] == reference
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        assert train(tiny_config(corpus, tmp_path / "inference", max_iters=2), progress=False)["val_loss"] == reference
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert train(tiny_config(corpus, tmp_path / "f64", max_iters=2), progress=False)["val_loss"] == reference
        assert torch.get_default_dtype() == torch.float64
        saved = load_file(str(ckpt.find_checkpoint(tmp_path / "f64") / ckpt.MODEL_FILE))
        assert {t.dtype for t in saved.values()} == {torch.float32}
        assert {p.dtype for p in load_run_folder(tmp_path / "f64").model.parameters()} == {torch.float32}
    finally:
        torch.set_default_dtype(before)


def test_a_new_run_in_a_folder_of_other_files_says_so(corpus, tmp_path, capsys):
    """`--out-dir /tmp` trained without a word, its files scattered among others: allowed (a run in a project's
    folder), and now said."""
    out = tmp_path / "project"
    out.mkdir()
    for name in ("notes.txt", "a.py", "b.py", "data"):
        (out / name).write_text("mine")
    train(tiny_config(corpus, out, max_iters=1), progress=False)
    assert (f"fungpt: note: out_dir {out} already holds files of its own (a.py, b.py, data and 1 more): the run's "
            f"files go among them (--overwrite would later delete only the run's)") in capsys.readouterr().out
    for name in ("empty", "wandb-only", "git"):  # (FunGPT's own logger's folder, and the system's files, are not
        (tmp_path / name).mkdir()                  # the user's; a project's .git is)
    (tmp_path / "wandb-only" / "wandb").mkdir()
    (tmp_path / "wandb-only" / ".DS_Store").write_text("")
    (tmp_path / "wandb-only" / ".config.json.tmp-123-abcd1234").write_text("")  # (a killed run's temporary)
    (tmp_path / "git" / ".git").mkdir()
    for name in ("empty", "wandb-only", "git"):
        train(tiny_config(corpus, tmp_path / name, max_iters=1), progress=False)
        assert ("already holds files of its own (.git)" in capsys.readouterr().out) == (name == "git")


def test_files_named_as_a_runs_but_not_a_runs_are_never_replaced(corpus, tmp_path):
    """A run config copied into a project (`fungpt train --config config.json --out-dir .`) made the folder read as
    a run that never saved: its own tokenizer.json and metrics.jsonl were deleted with it; without a run config,
    the user's run.json and loss.png were overwritten (and named nowhere: the note left run files' names out)."""
    project = tmp_path / "project"
    train(tiny_config(corpus, tmp_path / "model", max_iters=1), progress=False)
    project.mkdir()
    shutil.copy(tmp_path / "model" / "config.json", project / "config.json")
    mine = {"tokenizer.json": '{"model": {"type": "BPE"}}', "metrics.jsonl": '{"epoch": 1}\n', "notes.txt": "mine"}
    for name, text in mine.items():
        (project / name).write_text(text)
    for overwrite in (False, True):
        with pytest.raises(FunGPTError, match=r"holds metrics.jsonl, tokenizer.json, named as a run's files but not "
                                              r"written by FunGPT: training would replace them"):
            train(tiny_config(corpus, project, max_iters=1), progress=False, overwrite=overwrite)
        assert {p.name: p.read_text() for p in project.iterdir() if p.name in mine} == mine
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text('{"mine": true}')
    (other / "loss.png").write_text("my plot")
    with pytest.raises(FunGPTError, match=r"holds run.json, loss.png, named as a run's files"):
        train(tiny_config(corpus, other, max_iters=1), progress=False)
    assert (other / "loss.png").read_text() == "my plot"
    (project / "metrics.jsonl").unlink()
    (project / "tokenizer.json").unlink()
    (project / "loss.png").write_text("my own figure")  # (beside the copied run config: no run saved here)
    with pytest.raises(FunGPTError, match=r"holds loss.png, named as a run's files"):
        train(tiny_config(corpus, project, max_iters=1), progress=False)
    # a run's own files are its own: one that trained no step (max_iters 0, its starting val loss) drew its loss.png,
    # and runs again, as before; a metrics.jsonl whose first row a full disk cut short is a run's too
    zero = tmp_path / "zero"
    train(tiny_config(corpus, zero, max_iters=0), progress=False)
    assert (zero / "loss.png").is_file()
    for overwrite in (False, True):
        assert train(tiny_config(corpus, zero, max_iters=0), progress=False, overwrite=overwrite)["step"] == 0
    (zero / "metrics.jsonl").write_text('{"step": 0, "train_lo')
    assert train(tiny_config(corpus, zero, max_iters=0), progress=False)["step"] == 0


def test_overwrite_deletes_the_runs_files_and_nothing_else(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=6), progress=False)
    (out / "notes.txt").write_text("my notes")
    (out / "src").mkdir()
    (out / "src" / "main.py").write_text("print(1)")
    (out / "checkpoints" / "README").write_text("mine")
    train(tiny_config(corpus, out, max_iters=3, eval_interval=3), overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "my notes" and (out / "src" / "main.py").is_file()
    assert (out / "checkpoints" / "README").read_text() == "mine"
    assert max(r["step"] for r in read_rows(out)) == 3  # the old run's rows are gone
    assert [p.name for p in (out / "checkpoints").glob("latest-*")] == ["latest-0000003"]
    # A run in the current folder, replaced in place
    monkeypatch.chdir(out)
    train(tiny_config(corpus, Path("."), max_iters=2, eval_interval=2), overwrite=True, progress=False)
    assert (out / "notes.txt").is_file() and max(r["step"] for r in read_rows(out)) == 2


def test_overwrite_with_a_symlinked_checkpoints_folder_cleans_inside_it(corpus, tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "big-disk"
    elsewhere.mkdir()
    (elsewhere / "other.txt").write_text("keep")
    out.mkdir()
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    train(tiny_config(corpus, out, max_iters=6), progress=False)
    train(tiny_config(corpus, out, max_iters=3, eval_interval=3), overwrite=True, progress=False)
    assert (out / "checkpoints").is_symlink() and (elsewhere / "other.txt").read_text() == "keep"
    assert sorted(p.name for p in elsewhere.glob("latest-*")) == ["latest-0000003"]


def test_a_run_that_lost_its_config_is_not_trained_over(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=6), progress=False)
    (out / "config.json").unlink()
    with pytest.raises(FunGPTError, match="already holds a training run"):
        train(tiny_config(corpus, out, max_iters=3), progress=False)
    assert ckpt.find_checkpoint(out).name == "latest-0000006"


def test_a_run_saved_with_vocab_size_and_the_char_tokenizer_still_loads(corpus, tmp_path):
    """Earlier versions accepted (and ignored) data.vocab_size for char and gpt2; their run folders still load."""
    from fungpt.config import load_run_config

    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2, eval_interval=2), progress=False)
    saved = json.loads((out / "config.json").read_text())
    saved["data"]["vocab_size"] = 512
    (out / "config.json").write_text(json.dumps(saved))
    assert load_run_config(out).data.vocab_size is None
    assert sample(out, prompt="the ", max_new_tokens=3, seed=0)


@pytest.mark.parametrize("pointer", ["deleted", "corrupt", "dir not a string"])
def test_resume_without_a_readable_pointer_takes_the_newest_checkpoint(corpus, tmp_path, capsys, pointer):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=12), progress=False)
    if pointer == "deleted":
        (out / "latest.json").unlink()
    elif pointer == "corrupt":
        (out / "latest.json").write_text("{not json")
    else:
        (out / "latest.json").write_text('{"step": 12, "dir": 5}')  # was a TypeError traceback
    result = train(tiny_config(corpus, out, max_iters=18), resume=True, progress=False)
    assert "resuming" in capsys.readouterr().out and result["step"] == 18
    steps = [r["step"] for r in read_rows(out) if "lr" in r]
    assert steps == list(range(1, 19))  # continued from step 12, not started over


def test_the_last_step_is_saved_once_and_a_finished_run_is_left_alone(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=12, checkpoint_interval=6), progress=False)
    assert [p.name for p in (out / "checkpoints").glob("latest-*")] == ["latest-0000012"]  # no latest-0000012.1
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    result = train(tiny_config(corpus, out, max_iters=12), resume=True, progress=False)
    assert result["step"] == 12 and "nothing to train" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before
    # a run stopped (SIGTERM) while it drew loss.png, after its last save: the resume that finds nothing to train
    # draws it (it was left without one)
    (out / "loss.png").unlink()
    train(tiny_config(corpus, out, max_iters=12), resume=True, progress=False)
    drawn = (out / "loss.png").stat().st_mtime_ns
    train(tiny_config(corpus, out, max_iters=12), resume=True, progress=False)
    assert (out / "loss.png").stat().st_mtime_ns == drawn  # (drawn again only when missing)


def test_tokens_and_time_add_up_across_a_resume_with_another_batch_size(corpus, tmp_path):
    from fungpt.plot import read_metrics

    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=6), progress=False)  # batch 4 x block 16
    train(tiny_config(corpus, out, max_iters=8, batch_size=2), resume=True, progress=False)
    tokens = {r["step"]: r["tokens"] for r in read_rows(out) if "lr" in r}
    assert tokens[6] == 6 * 4 * 16 and tokens[7] == tokens[6] + 2 * 16 and tokens[8] == tokens[7] + 2 * 16
    run_s = [r["run_s"] for r in read_rows(out) if "lr" in r]  # logged: the time over the run's commands
    assert run_s == sorted(run_s)
    # elapsed_s counts from each command's start; read_metrics adds run_s, the time over the run's commands
    # (files written before training logged run_s)
    rows = [{"step": 5, "train_loss": 2.0, "elapsed_s": 9.0}, {"step": 6, "train_loss": 2.0, "val_loss": 2.1,
            "elapsed_s": 10.0}, {"step": 7, "train_loss": 1.9, "elapsed_s": 3.0}, {"step": 8, "train_loss": 1.8,
            "elapsed_s": 4.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_rows, eval_rows = read_metrics(out)
    assert [r["run_s"] for r in train_rows] == [9.0, 13.0, 14.0] and eval_rows[0]["run_s"] == 10.0


def test_resume_refuses_data_with_another_tokenizer_of_the_same_size(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=6), progress=False)
    text = corpus.read_text()
    # Swap two letters for two that the corpus lacks: as many symbols, but different ones.
    other = tmp_path / "other.txt"
    other.write_text(text.replace("c", "X").replace("d", "Z"), encoding="utf-8")
    assert len(set(other.read_text())) == len(set(text))
    with pytest.raises(FunGPTError, match="ids mean other text"):
        train(tiny_config(other, out, max_iters=12), resume=True, progress=False)
    # The same tokens written differently (another JSON layout, as a newer library might write) still resume.
    meta = out / "tokenizer_meta.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()), indent=4), encoding="utf-8")
    assert train(tiny_config(corpus, out, max_iters=12), resume=True, progress=False)["step"] == 12


def test_resume_on_too_little_data_does_not_suggest_another_block_size(corpus, tmp_path):
    """A resume keeps its checkpoint's block_size: "use a smaller model.block_size" led to "a different model"."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    small = tmp_path / "small.txt"
    small.write_text(corpus.read_text()[:12], encoding="utf-8")
    with pytest.raises(FunGPTError, match=r"block size 16 is too large for this dataset: the train split has only "
                                          r"\d+ tokens .*; use the data the run trained on \(a resumed run keeps its "
                                          r"block_size\), or train a new run \(another out_dir\)$"):
        train(tiny_config(small, out, max_iters=4), resume=True, progress=False)


def test_rope_base_is_no_part_of_a_model_without_rotary_positions(corpus, tmp_path):
    """rope_base only acts with pos_encoding = 'rope' (its docstring): on a learned-position run an edited one was
    refused as "a different model" by resume, sample and eval, and a fine-tune of a GPT-2 folder as a contradiction."""
    from fungpt import pretrained

    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    other = tiny_config(corpus, out, max_iters=4)
    other.model = dataclasses.replace(other.model, rope_base=500.0)
    assert train(other, resume=True, progress=False)["step"] == 4
    saved = json.loads((out / "config.json").read_text())
    saved["model"]["rope_base"] = 123.0
    (out / "config.json").write_text(json.dumps(saved))
    assert load_run_folder(out).step == 4  # (the manifest's 500 or 10000 against config.json's 123: no matter)
    checkpoint = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)  # (learned positions)
    defaults = tiny_config(corpus, out).model
    merged = pretrained.merge_model_config(dataclasses.replace(defaults, init_from="x", rope_base=500.0), checkpoint,
                                           defaults, named=["rope_base"])
    assert merged.n_layer == 2
    # with rotary positions it is part of the model
    rope = tiny_config(corpus, tmp_path / "rope", max_iters=2)
    rope.model = dataclasses.replace(rope.model, pos_encoding="rope")
    train(rope, progress=False)
    rope.model = dataclasses.replace(rope.model, rope_base=500.0)
    with pytest.raises(FunGPTError, match=r"different model \(rope_base 10000.0 -> 500.0\)"):
        train(rope, resume=True, progress=False)


def test_resume_may_change_dropout_with_a_note_and_the_run_still_loads(corpus, tmp_path, capsys):
    """dropout is no part of the weights: a resume may lower it (as nanoGPT's may), saying so; the checkpoints saved
    before, with the old value in their manifests, still load (sample, eval, the best weights)."""
    out = tmp_path / "run"
    cfg = tiny_config(corpus, out, max_iters=2, eval_interval=2, checkpoint_interval=2)
    cfg.model = dataclasses.replace(cfg.model, dropout=0.1)
    train(cfg, progress=False)
    capsys.readouterr()
    cfg.model = dataclasses.replace(cfg.model, dropout=0.0)
    cfg.train = dataclasses.replace(cfg.train, max_iters=4)
    assert train(cfg, resume=True, progress=False)["step"] == 4
    assert "fungpt: note: dropout 0.1 -> 0 from this step on (the checkpoint was trained with 0.1)" in \
        capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model"]["dropout"] == 0.0
    assert load_run_folder(out, device="cpu").model.config.dropout == 0.0
    for folder in (out / "checkpoints").iterdir():  # the step-2 best weights were saved with dropout 0.1
        if folder.is_dir() and not folder.name.startswith("."):
            ckpt.check_model_config(json.loads((folder / ckpt.MANIFEST_FILE).read_text()), folder,
                                    load_run_config(out).model.to_dict(), out / "config.json")
    # config.json is rewritten by every start, one that stops before it saves too: the note follows the checkpoint
    saved = json.loads((out / "config.json").read_text())
    saved["model"]["dropout"] = 0.3
    (out / "config.json").write_text(json.dumps(saved))
    cfg.model = dataclasses.replace(cfg.model, dropout=0.3)
    cfg.train = dataclasses.replace(cfg.train, max_iters=6)
    train(cfg, resume=True, progress=False)
    assert "fungpt: note: dropout 0 -> 0.3 from this step on (the checkpoint was trained with 0)" in \
        capsys.readouterr().out
    saved["model"]["dropout"] = 0.05  # (a start that stopped before it saved: config.json differs from the manifest)
    (out / "config.json").write_text(json.dumps(saved))
    assert main(["inspect", str(out)]) == 0  # not "damaged: trained with another model (dropout)"
    assert "damaged" not in capsys.readouterr().out
    cfg.model = dataclasses.replace(cfg.model, n_layer=cfg.model.n_layer + 1, dropout=0.0)  # architecture: checked
    with pytest.raises(FunGPTError, match="trained with a different model"):
        train(cfg, resume=True, progress=False)
    assert "note: dropout" not in capsys.readouterr().out  # (no note before a refusal)


def test_a_run_saved_with_values_beyond_todays_bounds_still_loads(corpus, tmp_path):
    """eval_iters and max_minutes got upper bounds (a huge value crashed with a traceback): checked when a run is
    about to train, so that a run an older FunGPT saved with a larger value still loads for sample and eval."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2, eval_interval=2, checkpoint_interval=2), progress=False)
    saved = json.loads((out / "config.json").read_text())
    saved["train"].update(eval_iters=2**25, max_minutes=1e6)
    (out / "config.json").write_text(json.dumps(saved))
    assert load_run_folder(out, device="cpu").step == 2
    cfg = load_run_config(out)
    with pytest.raises(FunGPTError, match=r"train.eval_iters = 33554432 is far too large"):
        train(cfg, resume=True, progress=False)


def test_resume_refusal_for_another_vocabulary_size_names_the_sizes(tmp_path):
    """A resumed fine-tune keeps its saved shape, so this check, not the model's, meets a model folder that now holds
    a tokenizer of another size: it said "id 0 is '<|endoftext|>' instead of '<|endoftext|>'"."""
    from fungpt.rundata import check_resume_tokenizer
    from fungpt.tokenizer import CharTokenizer

    CharTokenizer(list("abc")).save(tmp_path / "run")
    CharTokenizer(list("abcd")).save(tmp_path / "data")
    with pytest.raises(FunGPTError) as e:
        check_resume_tokenizer(tmp_path / "data", tmp_path / "run")
    assert "(char tokenizer (4 tokens) vs char tokenizer (3 tokens))" in str(e.value) and " id " not in str(e.value)
    CharTokenizer(list("abd")).save(tmp_path / "data")  # as many tokens: the first that differs is named
    with pytest.raises(FunGPTError, match=r"tokens\); id 2 is 'd' instead of 'c'\)"):
        check_resume_tokenizer(tmp_path / "data", tmp_path / "run")


def test_resume_keeps_this_versions_adamw_implementation():
    from fungpt.train import configure_optimizer, load_optimizer_state

    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = configure_optimizer(model, TrainConfig(device="cpu"), "cpu")
    assert all(g["fused"] for g in opt.param_groups)
    # The same groups with foreach: what earlier versions used, and saved, on CPU.
    old = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in opt.param_groups],
                            foreach=True)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    old.step()
    load_optimizer_state(opt, old.state_dict())
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    assert opt.state[next(model.parameters())]["step"] == 1  # the state itself did load


def test_resume_trains_with_the_optimizer_settings_now_in_the_config():
    """load_state_dict brought back the checkpoint's betas, weight decay and Muon momentum: a resume asked for
    beta2 0.95 (and config.json said so) but trained on with 0.99."""
    from fungpt.train import configure_optimizer, load_optimizer_state

    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    before = TrainConfig(device="cpu", optimizer="muon")
    opt = configure_optimizer(model, before, "cpu")
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    opt.step()
    moments = {id(p): s["exp_avg_sq"].clone() for p, s in opt.parts[0].state.items()}
    now = dataclasses.replace(before, beta2=0.95, weight_decay=0.0, muon_momentum=0.9, muon_lr=0.02)
    resumed = configure_optimizer(model, now, "cpu")
    load_optimizer_state(resumed, opt.state_dict())
    adamw, muon = resumed.parts
    assert [g["betas"] for g in adamw.param_groups] == [(0.9, 0.95)] * 2
    assert [g["weight_decay"] for g in resumed.param_groups] == [0.0, 0.0, 0.0]
    assert muon.param_groups[0]["momentum"] == 0.9 and muon.param_groups[0]["lr_scale"] == 0.02 / now.lr
    assert resumed.param_groups == [*adamw.param_groups, *muon.param_groups]  # what the loop sets lrs on
    for p, s in adamw.state.items():  # and the moments did load
        assert torch.equal(s["exp_avg_sq"], moments[id(p)])


def test_grad_accumulation_trains_like_the_big_batch(corpus, tmp_path, monkeypatch):
    """The trainer with batch 4 x 2 micro-steps against batch 8 x 1, on the same 8 sequences: the same logged loss
    (the micro-losses are averaged, not summed) and the same weights after the step (both micro-batches count)."""
    from fungpt.data import BatchLoader

    real_next_batch, pools = BatchLoader.next_batch, {}

    def fixed_batches(self):  # the training loader hands out the same 8 windows, B at a time
        if self.split != "train" or self.seed != 1337:  # (evaluate's loaders use another seed)
            return real_next_batch(self)
        if "xy" not in pools:
            big = BatchLoader(self.path.parent, "train", 8, self.block_size, seed=99)
            pools["xy"] = real_next_batch(big)
        n = pools.setdefault(id(self), 0)
        pools[id(self)] = n + 1
        x, y = pools["xy"]
        i = (n * self.batch_size) % 8
        return x[i:i + self.batch_size], y[i:i + self.batch_size]

    monkeypatch.setattr(BatchLoader, "next_batch", fixed_batches)
    results = {}
    for batch, accum in ((8, 1), (4, 2)):
        out = tmp_path / f"b{batch}"
        cfg = tiny_config(corpus, out, max_iters=1, batch_size=batch, grad_accum_steps=accum, warmup_iters=0,
                          lr_schedule="constant", eval_interval=100)
        train(cfg, progress=False)
        loss = [r["train_loss"] for r in read_rows(out) if "lr" in r]
        results[batch] = loss, load_run_folder(out, device="cpu").model.state_dict()
    (loss8, w8), (loss4, w4) = results[8], results[4]
    assert loss4 == pytest.approx(loss8, rel=1e-5)
    for name in w8:
        torch.testing.assert_close(w4[name], w8[name], rtol=1e-4, atol=1e-6, msg=name)
    # The gradients themselves: AdamW's step (and clipping) hardly depends on their scale, so the weights above
    # would not see micro-losses summed instead of averaged (a gradient A times too large)
    import contextlib

    from fungpt.hardware import detect_precision

    train_module = sys.modules["fungpt.train"]
    model = load_run_folder(tmp_path / "b8", device="cpu").model.train()
    grads = {}
    for batch, accum in ((8, 1), (4, 2)):
        cfg = tiny_config(corpus, tmp_path / "b8", batch_size=batch, grad_accum_steps=accum)
        loader = BatchLoader(data_dir_of(tmp_path / "b8"), "train", batch, cfg.model.block_size, seed=1337)
        model.zero_grad(set_to_none=True)
        train_module.forward_backward(model, loader, cfg, detect_precision("cpu", "float32"), train_module.Dist(),
                                      torch.amp.GradScaler("cpu", enabled=False), contextlib.nullcontext, "cpu")
        grads[batch] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads[8].items():
        torch.testing.assert_close(grads[4][name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_gradient_clipping_and_weight_decay_reach_the_weights(corpus, tmp_path):
    """Both change the run: AdamW is blind to a constant gradient scale, but not to a clip whose factor varies from
    step to step; weight decay goes to the matrices only, never to biases or norm gains."""
    from fungpt.train import configure_optimizer

    weights = {}
    for clip in (0.0, 1e9, 1e-3):
        out = tmp_path / f"clip{clip}"
        train(tiny_config(corpus, out, max_iters=5, grad_clip=clip, eval_interval=100), progress=False)
        weights[clip] = load_run_folder(out, device="cpu").model.state_dict()
    assert not torch.allclose(weights[0.0]["wte.weight"], weights[1e-3]["wte.weight"])
    # 0 turns clipping off: the same weights as a clip that never bites (not a default threshold such as 1)
    assert all(torch.equal(weights[0.0][k], weights[1e9][k]) for k in weights[0.0])

    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=True))
    decay, no_decay = configure_optimizer(model, TrainConfig(weight_decay=0.1), "cpu").param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if p.dim() == 2}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.dim() == 1}
    assert any(n.endswith("ln_1.weight") for n in (names[id(p)] for p in no_decay["params"]))


def test_evaluate_switches_dropout_off_and_back(corpus, tmp_path):
    from fungpt.evaluation import evaluate
    from fungpt.rundata import resolve_data

    cfg = tiny_config(corpus, tmp_path / "run")
    data_dir = resolve_data(cfg.data, progress=False)
    model = GPT(dataclasses.replace(cfg.model, vocab_size=load_tokenizer(data_dir).vocab_size, dropout=0.5))
    model.train()
    first = evaluate(model, data_dir, cfg, "cpu", contextlib.nullcontext)
    assert evaluate(model, data_dir, cfg, "cpu", contextlib.nullcontext) == first  # no dropout: the same batches,
    assert model.training  # the same losses; and the model is back in training mode


def test_evaluate_scores_other_windows_than_the_first_training_batches(corpus, tmp_path, monkeypatch):
    """The eval's train loss is over windows drawn apart from training's: seeded as the training loader is, it
    scored exactly the batches of the first eval_iters steps (an estimate biased low once the model learns them)."""
    from fungpt.data import BatchLoader
    from fungpt.evaluation import evaluate
    from fungpt.rundata import resolve_data

    cfg = tiny_config(corpus, tmp_path / "run")
    data_dir = resolve_data(cfg.data, progress=False)
    model = GPT(dataclasses.replace(cfg.model, vocab_size=load_tokenizer(data_dir).vocab_size))
    scored, real = [], BatchLoader.next_batch
    monkeypatch.setattr(BatchLoader, "next_batch", lambda self: scored.append(real(self)[0]) or scored[-1:] * 2)
    evaluate(model, data_dir, cfg, "cpu", contextlib.nullcontext)
    monkeypatch.undo()
    training = BatchLoader(data_dir, "train", cfg.train.batch_size, cfg.model.block_size, seed=cfg.train.seed)
    first = [training.next_batch()[0] for _ in range(cfg.train.eval_iters)]
    assert len(scored) == 2 * cfg.train.eval_iters  # train, then val
    assert not any(torch.equal(a, b) for a in scored[:cfg.train.eval_iters] for b in first)


def test_a_slow_eval_shows_a_bar_and_a_quick_one_none(corpus, tmp_path, monkeypatch, capsys):
    """The step-0 and periodic evals of a GPT-2 fine-tune on a CPU took a minute with nothing on the screen (the train
    bar frozen meanwhile); a bar now shows once an eval has taken a second, and the usual quick evals show none."""

    from fungpt.evaluation import evaluate
    from fungpt.rundata import resolve_data

    cfg = tiny_config(corpus, tmp_path / "run")
    cfg.train.eval_iters = 3
    data_dir = resolve_data(cfg.data, progress=False)
    model = GPT(dataclasses.replace(cfg.model, vocab_size=load_tokenizer(data_dir).vocab_size))
    evaluate(model, data_dir, cfg, "cpu", contextlib.nullcontext, progress=True)
    assert "eval" not in capsys.readouterr().err
    real_forward = GPT.forward

    def slow_forward(self, *args, **kwargs):
        import time

        time.sleep(0.2)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", slow_forward)
    monkeypatch.setattr(sys.modules["fungpt.evaluation"], "bar_interval", lambda: 0.0)  # (each batch drawn)
    evaluate(model, data_dir, cfg, "cpu", contextlib.nullcontext, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"eval: .*\d/6 ", err), err  # 3 batches of each split, shown after the first second
    # The whole val split (eval_full_val), in batches of 4 x batch_size windows: its own bar (a redraw once made
    # the batches True, a TypeError that ended the run)
    cfg.train.eval_full_val, cfg.train.eval_iters = True, 1
    windows = math.ceil((json.loads((data_dir / "meta.json").read_text())["val_tokens"] - 1) / cfg.model.block_size)
    assert math.ceil(windows / (4 * cfg.train.batch_size)) >= 4  # (so that it takes over a second)
    full = evaluate(model, data_dir, cfg, "cpu", contextlib.nullcontext, progress=True)
    assert re.search(r"eval \(val, every token\): .*\d/\d+ ", capsys.readouterr().err)
    assert full == evaluate(model, data_dir, cfg, "cpu", contextlib.nullcontext)


def record_train_bars(monkeypatch) -> list:
    """The training bars train() makes from now on, in a list, as they are made."""
    train_module = sys.modules["fungpt.train"]  # (fungpt.train, the attribute, is the function)
    real_bar, bars = train_module._train_bar, []

    def recorded(tqdm_class):
        cls = real_bar(tqdm_class)
        return lambda *a, **k: bars.append(cls(*a, **k)) or bars[-1]

    monkeypatch.setattr(train_module, "_train_bar", recorded)
    return bars


def test_the_train_bars_time_left_counts_the_evals_and_not_the_first_step(monkeypatch, corpus, tmp_path):
    """tqdm's rate, a moving average of the last steps, left the evals out of the time left all run long; its
    average over the whole command counts the first step too, which also compiles (ten times the time left). The
    train bar's rate is the steps since the first one over the time since, the evals run so far included."""
    from tqdm.std import tqdm

    train_module = sys.modules["fungpt.train"]  # (fungpt.train, the attribute, is the function)
    now = [1000.0]
    monkeypatch.setattr(train_module.time, "time", lambda: now[0])
    bar = train_module._train_bar(tqdm)(total=1100, file=io.StringIO())
    bar.origin = (1020.0, 1)  # set as the first step (a 20 s compile, say) ends, before the bar counts it:
    now[0] += 20.0
    bar.update(1)
    assert "?it/s" in str(bar) and "<?" in str(bar)  # (not 20 s a step, kept in a log file until the next line)
    now[0] += 1.0 + 0.5  # 100 steps of 10 ms, and an eval of 0.5 s
    bar.update(100)
    assert bar.format_dict["rate"] == pytest.approx(100 / 1.5)  # steps per second, evals included
    assert "<00:14" in bar.format_meter(**bar.format_dict)  # (1100 - 101) steps at 15 ms: 14.985 s left
    bar.close()
    monkeypatch.undo()  # (the clock back)
    # train() sets the origin as the command's first step ends, a resumed one's too
    bars = record_train_bars(monkeypatch)
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=3)
    train(cfg, progress=True)
    cfg.train.max_iters = 5
    train(cfg, resume=True, progress=True)
    assert [bar.origin[1] for bar in bars] == [1, 4] and all(0 < time.time() - bar.origin[0] < 600 for bar in bars)


def test_the_train_bars_time_left_counts_the_evals_to_come_before_the_first(monkeypatch, corpus, tmp_path):
    """Before the command's first periodic eval the bar's rate is the steps' alone: its time left now adds the evals
    and checkpoints still due (TimeBudget.periodic_time_left), until that eval's time is in the rate itself."""
    from tqdm.std import tqdm

    train_module = sys.modules["fungpt.train"]  # (fungpt.train, the attribute, is the function)
    now = [1000.0]
    monkeypatch.setattr(train_module.time, "time", lambda: now[0])
    bar = train_module._train_bar(tqdm)(total=1100, file=io.StringIO())
    bar.origin = (1000.0, 1)
    bar.periodic_left = lambda n: 4 * 2.5 if n == 100 else 0.0  # after step 100 (the bar shows 101): four evals
    now[0] += 1.0
    bar.update(101)  # 100 steps of 10 ms since the first
    assert bar.format_dict["rate"] == pytest.approx(999 / (999 * 0.01 + 10.0))  # the rate that ends with them
    assert "<00:19" in bar.format_meter(**bar.format_dict)  # 9.99 s of steps + 10 s of evals (not <00:09)
    bar.periodic_left = None  # (after the first eval: the rate holds its time)
    assert bar.format_dict["rate"] == pytest.approx(100.0)
    bar.close()
    monkeypatch.undo()  # (the clock back)
    bars = record_train_bars(monkeypatch)
    train(tiny_config(corpus, tmp_path / "a", max_iters=5, eval_interval=10), progress=True)  # no periodic eval
    train(tiny_config(corpus, tmp_path / "b", max_iters=5, eval_interval=2), progress=True)  # evals at 2 and 4
    train(tiny_config(corpus, tmp_path / "c", max_iters=5, max_minutes=1.0), progress=True)  # a budget's end
    assert bars[0].periodic_left.__self__.tc.max_iters == 5 and bars[1].periodic_left is None
    assert bars[2].periodic_left is None  # (its total, the forecast end, counts the evals already)


def test_a_slow_budget_plan_shows_a_bar(corpus, tmp_path, monkeypatch, capsys):
    """A time-budget run times forward batches, a checkpoint save and the plot before its first step: 19 s with
    nothing on the screen for a 124M model on a CPU. A bar now shows once that has taken a second."""
    monkeypatch.setattr(sys.modules["fungpt.evaluation"], "bar_interval", lambda: 0.0)  # (each part drawn)
    real_forward = GPT.forward

    def slow_forward(self, idx, targets=None, **kwargs):
        import time

        if targets is None:  # (the timed forward batches; the training steps stay quick)
            time.sleep(0.6)
        return real_forward(self, idx, targets, **kwargs)

    monkeypatch.setattr(GPT, "forward", slow_forward)
    train(tiny_config(corpus, tmp_path / "run", max_iters=2, max_minutes=1.0), progress=True)
    err = capsys.readouterr().err
    # three timed batches, the step-0 checkpoint and the plot; shown from the second batch (after 1.2 s)
    assert re.search(r"planning the time budget: .*[2-5]/5 ", err), err


def test_bars_redraw_every_30_s_into_a_log_file(tmp_path, monkeypatch):
    """Into a file or a pipe each redraw is kept: the eval bars (fungpt eval, the full-split eval) and prepare's
    redrew ten times a second there, 384 lines in 38 s of a log."""
    from fungpt.data import _progress_bar, bar_interval

    with open(tmp_path / "log", "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        assert bar_interval() == 30.0
        with _progress_bar(10, "encoding", True) as bar:
            assert bar.mininterval == 30.0
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # (a notebook's stream, a terminal: as usual)
    assert bar_interval() == 0.1


def test_lr_schedules():
    cos = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert get_lr(0, cos) == pytest.approx(1 / 11)  # the first step already moves: (it + 1) / (warmup + 1)
    assert get_lr(0, cos) < get_lr(5, cos) < get_lr(10, cos)
    assert get_lr(10, cos) == pytest.approx(1.0)
    assert get_lr(60, cos) == pytest.approx(0.55)  # half-way down the cosine
    assert get_lr(110, cos) == pytest.approx(0.1) and get_lr(500, cos) == pytest.approx(0.1)
    fixed = dataclasses.replace(cos, lr_decay_iters=60)
    assert get_lr(60, fixed) == pytest.approx(0.1)
    assert get_lr(30, dataclasses.replace(fixed, max_iters=1000)) == get_lr(30, fixed)  # independent of max_iters
    wsd = dataclasses.replace(cos, lr_schedule="wsd", wsd_decay_frac=0.5)
    assert get_lr(50, wsd) == 1.0 and get_lr(110, wsd) == pytest.approx(0.1)
    assert get_lr(82.5, wsd) == pytest.approx(0.55)
    const = dataclasses.replace(cos, lr_schedule="constant")
    assert get_lr(100, const) == 1.0


@pytest.mark.parametrize("schedule,expected", [
    # it:       0 and 9 in the warmup, (it + 1) / 11; 10 its end; 40, 55, 90, 99 decaying; 100 and on: min_lr
    ("cosine", {0: 1 / 11, 9: 10 / 11, 10: 1.0, 40: 0.1 + 0.9 * 0.75, 55: 0.55,  # frac (it - 10) / 90: 1/3, 1/2
                99: 0.1 + 0.45 * (1 - math.cos(math.pi / 90)), 100: 0.1, 103: 0.1, 1000: 0.1}),
    # wsd: flat until 100 * (1 - 0.2) = 80, then linear from 1.0 to 0.1 over steps 80..100
    ("wsd", {0: 1 / 11, 9: 10 / 11, 10: 1.0, 50: 1.0, 79: 1.0, 80: 1.0, 90: 0.55, 99: 1.0 - 0.9 * 19 / 20,
             100: 0.1, 103: 0.1, 1000: 0.1}),
    ("constant", {0: 1 / 11, 9: 10 / 11, 10: 1.0, 50: 1.0, 99: 1.0, 100: 1.0, 1000: 1.0}),
])
def test_lr_schedule_values_through_warmup_decay_and_past_its_end(schedule, expected):
    """Every phase of each schedule at the default wsd_decay_frac (0.2): a warmup that starts at 0 (no update on the
    first step), a cosine counted from step 0 instead of the warmup's end, a wsd decay that starts at 20% of the run
    instead of 80%, or a rate that keeps moving (cosine back up, wsd below min_lr) a few steps past decay_iters
    would each change one of these."""
    tc = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=100, lr_schedule=schedule)
    assert tc.wsd_decay_frac == 0.2 and tc.decay_iters == 100
    for it, lr in expected.items():
        assert get_lr(it, tc) == pytest.approx(lr, abs=1e-12), it


def test_main_called_by_a_program_counts_time_from_the_call(tmp_path, monkeypatch, corpus):
    """From a notebook open for an hour, main(["train", ..., "--train.max-minutes", "30"]) was refused: "3600 s
    went before the first step" (the kernel's start, not the command's). The fungpt command still counts its
    imports."""
    import time

    import fungpt.cli

    seen = {}
    monkeypatch.setattr(sys.modules["fungpt.train"], "train", lambda run, **kw: seen.update(kw) or
                        {"out_dir": run.out_dir, "interrupted": False})
    monkeypatch.setattr(fungpt.cli, "process_start_time", lambda: time.time() - 3600)  # an hour-old process
    args = ["train", "--data.path", str(corpus), "--out-dir", str(tmp_path / "o"), "--train.device", "cpu"]
    before = time.time()
    assert main(args) == 0
    assert before <= seen["start_time"] <= time.time()  # from the call
    # The fungpt command itself (entry(), whatever the command line: -X dev, torchrun's `python -u SCRIPT`)
    monkeypatch.setattr(sys, "argv", ["fungpt", *args])
    monkeypatch.setattr(fungpt.cli.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    for name in ("stdout", "stderr"):  # (entry() reconfigures the streams: its own, not the session's)
        monkeypatch.setattr(sys, name, io.StringIO())
    with pytest.raises(SystemExit) as ended:
        fungpt.cli.entry()
    assert ended.value.code == 0 and seen["start_time"] < before - 3000  # from the process's start


def test_two_runs_at_once_in_one_process_are_refused(corpus, tmp_path, monkeypatch):
    """Two train() calls in two threads drew from the same global random streams (dropout, batches): each gave
    other losses than alone, and neither could be repeated."""
    import importlib
    import threading

    train_module = importlib.import_module("fungpt.train")  # (fungpt.train, the attribute, is the function)
    started, finish = threading.Event(), threading.Event()

    def running(*args):  # a run that goes on until told to finish
        started.set()
        finish.wait(60)
        return {"step": 0}

    monkeypatch.setattr(train_module, "_train", running)
    first = threading.Thread(target=train, args=(tiny_config(corpus, tmp_path / "a"),), kwargs={"progress": False})
    first.start()
    try:
        assert started.wait(60)
        with pytest.raises(FunGPTError, match=r"^another train\(\) is running in this process: .* one at a time"):
            train(tiny_config(corpus, tmp_path / "b"), progress=False)
    finally:  # (never left holding the lock for the tests after this one)
        finish.set()
        first.join(60)
    assert train(tiny_config(corpus, tmp_path / "b"), progress=False) == {"step": 0}  # one after the other: fine


def test_configs_built_in_python_are_type_checked_and_checked_again_by_train(corpus, tmp_path):
    """From a notebook: max_iters=1e1 trained and saved 10.0, which no later command could load; batch_size=2.5 and
    lr="1e-3" failed deep in torch or a comparison; a Path for out_dir was an AttributeError; a dict for a section,
    or a setting changed after the config was built (cfg.train.lr = -1), failed (or not) only once training began."""
    import numpy as np

    for make, said in ((lambda: TrainConfig(max_iters=1e1), "train.max_iters = 10.0 should be of type int (a whole "
                                                             "number: write 10): fix its value"),
                       (lambda: TrainConfig(batch_size=2.5), "train.batch_size = 2.5 should be of type int"),
                       (lambda: TrainConfig(lr="1e-3"), "train.lr = '1e-3' should be of type float"),
                       (lambda: TrainConfig(compile="no"), "train.compile = 'no' should be of type bool"),
                       (lambda: DataConfig(val_fraction="0.1"), "data.val_fraction = '0.1' should be of type float"),
                       (lambda: RunConfig(model=3), "RunConfig model = 3 should be a GPTConfig (or a dict of its "
                                                    "settings)"),
                       (lambda: RunConfig(train={"max_iter": 3}), "RunConfig train: unknown setting(s) ['max_iter'] "
                                                                  "(did you mean max_iters for max_iter?)")):
        with pytest.raises(FunGPTError) as e:
            make()
        assert str(e.value).startswith(said), str(e.value)
    # what means the same is taken as it is meant
    tc = TrainConfig(max_iters=np.int64(5), lr=np.float32(0.5), min_lr=np.float64(0.25))
    assert (type(tc.max_iters), tc.max_iters, type(tc.lr), tc.lr, type(tc.min_lr)) == (int, 5, float, 0.5, float)

    def subclass_of_yours():  # one annotation that cannot be resolved: the base class's fields are checked still
        class Local:
            pass

        @dataclasses.dataclass
        class MyTrain(TrainConfig):
            extra: Local | None = None  # (a string, as this file's annotations are: Local is not found)

        return MyTrain

    with pytest.raises(FunGPTError, match=r"^train.batch_size = '4' should be of type int"):
        subclass_of_yours()(batch_size="4")

    @dataclasses.dataclass
    class LongerRuns(RunConfig):  # a dict section starts from this class's defaults, not RunConfig's
        train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(max_iters=100))

    assert LongerRuns(train={"lr": 0.01}).train == TrainConfig(max_iters=100, lr=0.01)
    cfg = RunConfig(out_dir=tmp_path / "run", data=DataConfig(path=Path(corpus)), train={"max_iters": 3})
    assert cfg.out_dir == str(tmp_path / "run") and cfg.data.path == str(corpus) and cfg.train == TrainConfig(
        max_iters=3)
    # train() checks again: what was changed since, and what is not a config at all; nothing is written
    cfg = tiny_config(corpus, tmp_path / "later")
    cfg.train.lr = -1
    with pytest.raises(FunGPTError, match=r"^train.lr = -1.0 must be positive"):
        train(cfg, progress=False)
    cfg.train.lr, cfg.train.max_iters = 1e-3, 2.0
    with pytest.raises(FunGPTError, match=r"^train.max_iters = 2.0 should be of type int"):
        train(cfg, progress=False)
    with pytest.raises(FunGPTError, match=r"^train\(\) takes a RunConfig, not str: e.g. train\(load_config\("):
        train("shakespeare-char-cpu", progress=False)
    assert not (tmp_path / "later").exists()


def test_a_whole_number_written_as_a_float_in_a_runs_config_is_read(tmp_path):
    """An older FunGPT's Python API took max_iters=1e1 and saved 10.0 into config.json: every command then refused
    the run. A config file of the user's is told how to write it."""
    from fungpt.config import _check_type
    from fungpt.train import trained_with

    assert _check_type(TrainConfig, "max_iters", 20.0, "runs/old/config.json [train]", saved=True) == 20
    for mine in ("mine.toml [train]", "mine.json [train]"):  # (a file of the user's, whatever its suffix)
        with pytest.raises(FunGPTError, match=r"max_iters = 20.0 should be a whole number \(write 20\)$"):
            _check_type(TrainConfig, "max_iters", 20.0, mine)
    with pytest.raises(FunGPTError, match="should be a whole number"):
        _check_type(TrainConfig, "max_iters", 20.5, "runs/old/config.json [train]", saved=True)
    # a checkpoint's own record of its [train] settings too (it was passed over for config.json's)
    recorded = {"train": {**dataclasses.asdict(TrainConfig(eval_interval=200)), "max_iters": 1000.0}}
    assert trained_with(recorded, RunConfig(train=TrainConfig(eval_interval=50))).eval_interval == 200


def test_numbers_passed_from_python_are_checked_in_one_line(tmp_path):
    """sample(seed="1"), top_k=2.5 or temperature="0.8" failed deep in torch or a comparison; prepare() said
    vocab_size="300" or np.int64(4096) was "too small", and printed np.float32(0.1) as 0.10000000149011612 "not
    between 0 and 1". numpy's numbers are numbers."""
    import numpy as np

    from fungpt.data import prepare
    from fungpt.runs import seeded_generator

    for kwargs, said in ((dict(top_k=2.5), "--top-k 2.5 should be a whole number"),
                         (dict(temperature="0.8"), "--temperature '0.8' should be a number"),
                         (dict(max_new_tokens=5.0), "--max-new-tokens 5.0 should be a whole number")):
        with pytest.raises(FunGPTError) as e:
            sample(tmp_path / "no-run-needed", **kwargs)  # (checked before the run is read)
        assert str(e.value) == said
    with pytest.raises(FunGPTError, match=r"^--seed '1' should be a whole number$"):
        seeded_generator("1", "cpu")
    assert seeded_generator(np.int64(3), "cpu").initial_seed() == 3
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 50)
    with pytest.raises(FunGPTError, match=r"^vocab size '300' should be a whole number$"):
        prepare(text, tmp_path / "p", tokenizer="bpe", vocab_size="300", progress=False)
    with pytest.raises(FunGPTError, match=r"^val_fraction '0.1' should be a number$"):
        prepare(text, tmp_path / "p", val_fraction="0.1", progress=False)
    assert not (tmp_path / "p").exists()
    out = prepare(text, tmp_path / "p", tokenizer="bpe", vocab_size=np.int64(300), val_fraction=np.float32(0.25),
                  progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] <= 300 and type(meta["val_fraction"]) is float


def test_toml_then_cli_precedence(tmp_path, monkeypatch, corpus, capsys):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f'out_dir = "{tmp_path / "o"}"\n[data]\npath = "{corpus}"\n'
                        '[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 8\n'
                        '[train]\nmax_iters = 3\nlr = 0.002\nbatch_size = 2\neval_iters = 1\ndevice = "cpu"\n')
    cfg = load_config(cfg_file)
    assert cfg.train.lr == 0.002 and cfg.train.beta1 == 0.9  # file, then defaults
    seen = {}
    # (fungpt.train the attribute is the function; patch the module object itself)
    monkeypatch.setattr(sys.modules["fungpt.train"], "train", lambda run, **kw: seen.update(run=run, **kw) or
                        {"out_dir": run.out_dir, "interrupted": False})
    assert main(["train", "--config", str(cfg_file), "--train.lr", "0.01", "--model.n-layer", "3"]) == 0
    run = seen["run"]
    assert run.train.lr == 0.01 and run.model.n_layer == 3  # CLI wins
    assert run.train.max_iters == 3 and run.model.n_embd == 16  # file beats defaults
    assert run.train.weight_decay == TrainConfig().weight_decay
    # the command it suggests can be pasted into a shell, also for a folder name with a space
    assert main(["train", "--config", str(cfg_file), "--out-dir", "my run"]) == 0
    assert "Sample with: fungpt sample --run 'my run'" in capsys.readouterr().out


def test_a_misplaced_flag_names_only_flags_that_exist():
    from fungpt.config import misplaced_flag

    assert misplaced_flag("--train.block-size=3") == "--model.block-size"
    assert misplaced_flag("--train.vocab-size") == "--data.vocab-size or --model.vocab-size"
    assert misplaced_flag("--train.no-bias") == "--model.no-bias"
    # --no- exists for booleans only (vocab_size, lr_schedule are not): left to tyro's own message
    assert misplaced_flag("--model.no-vocab-size") is None and misplaced_flag("--train.no-decay-lr") is None
    assert misplaced_flag("--model.no-bias") is None and misplaced_flag("--train.batchsize") is None  # (valid; typo)


def test_a_flag_can_fix_what_the_config_file_set(tmp_path, monkeypatch, capsys):
    """The file's values were checked before the flags were applied: the flag that would fix one (even the one
    the error message advised) could not."""
    seen = {}
    monkeypatch.setattr(sys.modules["fungpt.train"], "train", lambda run, **kw: seen.update(run=run) or
                        {"out_dir": run.out_dir, "interrupted": False})
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('out_dir = ""\n[data]\nvocab_size = 300\n[model]\nn_embd = 100\nn_head = 3\n'
                        '[train]\nlr = 1e-5\n')
    assert main(["train", "--config", str(cfg_file), "--data.vocab-size", "None", "--model.n-embd", "96",
                 "--train.min-lr", "1e-6", "--out-dir", str(tmp_path / "run")]) == 0
    run = seen["run"]
    assert (run.data.vocab_size, run.model.n_embd, run.train.min_lr) == (None, 96, 1e-6)
    seen.clear()
    assert main(["train", "--config", str(cfg_file), "--data.tokenizer", "bpe", "--model.n-embd", "96",
                 "--train.min-lr", "1e-6", "--out-dir", "run"]) == 0
    assert seen["run"].data.vocab_size == 300
    # what the flags leave wrong is still refused, naming the file
    assert main(["train", "--config", str(cfg_file), "--data.tokenizer", "bpe", "--train.min-lr", "1e-6",
                 "--out-dir", "run"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {cfg_file} with the flags given: model config n_embd=100 is "
                                               f"not divisible by n_head=3: choose n_embd as a multiple of n_head")


def test_toml_saved_with_a_byte_order_mark_loads(tmp_path):
    """Windows editors may start a UTF-8 file with a BOM, which TOML itself does not allow."""
    cfg_file = tmp_path / "bom.toml"
    cfg_file.write_bytes(b"\xef\xbb\xbf[train]\nlr = 0.002\n")
    assert load_config(cfg_file).train.lr == 0.002


def test_an_example_config_is_known_by_its_name_from_any_folder(tmp_path, monkeypatch, capsys):
    """`--config shakespeare-char-cpu`, or the docs' `--config configs/shakespeare-char-cpu.toml` typed outside a
    checkout, is the example config that comes with FunGPT (in a wheel: fungpt/configs, see pyproject.toml)."""
    from fungpt.config import config_path, presets

    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    assert presets() == sorted(p.stem for p in repo_configs.glob("*.toml")) and "speedrun-cpu" in presets()
    monkeypatch.chdir(tmp_path)  # a folder without configs/
    expected = load_config(repo_configs / "speedrun-cpu.toml")
    assert load_config("speedrun-cpu") == expected == load_config("configs/speedrun-cpu.toml")
    assert config_path("speedrun-cpu.toml") == repo_configs / "speedrun-cpu.toml"
    from fungpt.config import fields_named

    named = fields_named("finetune-gpt2-shakespeare", [])  # what the fine-tune example relies on
    assert named == fields_named(repo_configs / "finetune-gpt2-shakespeare.toml", []) and named
    # a file of the user's own is never shadowed by an example config of the same name
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "speedrun-cpu.toml").write_text("[train]\nlr = 0.002\n")
    assert load_config("configs/speedrun-cpu.toml").train.lr == 0.002
    (tmp_path / "speedrun-cpu.toml").write_text("[train]\nlr = 0.004\n")  # a copy, edited: it comes first
    assert load_config("speedrun-cpu").train.lr == 0.004
    (tmp_path / "speedrun-cpu").write_text("[train]\nlr = 0.003\n")
    assert load_config("speedrun-cpu").train.lr == 0.003
    # only names and configs/NAME.toml are looked up: another folder's missing file stays missing
    assert config_path("elsewhere/shakespeare-char.toml") == Path("elsewhere/shakespeare-char.toml")
    assert main(["train", "--config", "shakespeare-chars", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config file shakespeare-chars does not exist") and "shakespeare-char-cpu" in err
    assert main(["inspect", "shakespeare-char-cpu"]) == 0
    assert "shakespeare-char-cpu.toml (config)" in capsys.readouterr().out
    # A folder of that name (a run's out_dir, named after its preset) is no config: the name still finds it
    (tmp_path / "shakespeare-char-cpu").mkdir()
    assert load_config("shakespeare-char-cpu") == load_config(repo_configs / "shakespeare-char-cpu.toml")
    assert main(["inspect", "shakespeare-char-cpu"]) == 2  # while inspect looks in the folder
    assert "is not a FunGPT run folder" in capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--model.n-embd", "30", "--model.n-head", "4"], "n_embd"),
    (["--train.batch-size", "0"], "batch_size"),
    (["--train.lr", "-1"], "lr"),
    (["--model.pos-encoding", "spiral"], "pos_encoding"),
    (["--data.tokenizer", "words"], "tokenizer"),
    (["--train.device", "tpu"], "device"),
    (["--data.path", "/no/such/file.txt"], "does not exist"),
    (["--model.block-size", "100000"], "block_size"),
])
def test_config_errors_are_one_line(args, expected, corpus, tmp_path, capsys):
    base = ["train", "--data.path", str(corpus), "--out-dir", str(tmp_path / "o"), "--train.device", "cpu"]
    assert main(base + args) == 2
    err_all = capsys.readouterr().err
    assert "Traceback" not in err_all
    err = err_all.strip().splitlines()[-1]  # progress bars of data preparation may come before it
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert expected in err


def test_train_settings_are_checked_at_the_ends_of_their_ranges():
    """Each limit is where the settings stop making sense: the ends themselves are allowed, one step past refused."""
    TrainConfig(lr=1e-3, min_lr=1e-3, lr_schedule="wsd", wsd_decay_frac=1.0, lr_decay_iters=1, seed=2**63 - 1,
                batch_size=2**24, grad_accum_steps=2**24)  # a constant lr, a decay over the whole run, the largest
    for bad, message in [({"lr_decay_iters": 0}, "must be positive"), ({"wsd_decay_frac": 1.01}, r"in \(0, 1\]"),
                         ({"min_lr": 1.01e-3}, "between 0 and train.lr"), ({"seed": 2**63}, "between 0 and 2"),
                         ({"batch_size": 2**24 + 1}, "far too large"), ({"grad_accum_steps": 2**24 + 1}, "far too")]:
        with pytest.raises(FunGPTError, match=message):
            TrainConfig(**{"lr": 1e-3, **bad})


def test_out_dir_with_other_run_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    with pytest.raises(FunGPTError, match="already holds a training run"):
        train(tiny_config(corpus, out, max_iters=2), progress=False)
    other = dataclasses.replace(tiny_config(corpus, out, max_iters=4),
                                model=GPTConfig(vocab_size=1, block_size=16, n_layer=3, n_head=2, n_embd=32))
    with pytest.raises(FunGPTError, match="different model"):
        train(other, resume=True, progress=False)
    train(tiny_config(corpus, out, max_iters=2), overwrite=True, progress=False)


def test_cli_resume_without_a_config_file_takes_the_runs_saved_settings(corpus, tmp_path, capsys):
    """`fungpt train --out-dir RUN --resume` resumed with the defaults: a run of any other model was refused
    ("different model"), and one of other [train] settings went on with the defaults'."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2, lr=2e-3, beta2=0.95), progress=False)
    # a resume killed before its first save left its own settings in config.json: the checkpoint's [train] counts
    saved = json.loads((out / "config.json").read_text())
    saved["train"].update(lr=0.5, batch_size=2)
    (out / "config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["train", "--out-dir", str(out), "--resume", "--train.max-iters", "4"]) == 0
    said = capsys.readouterr().out
    assert f"fungpt: resuming with the settings saved in {out} (flags given here override them)" \
        in said and "settings differ" not in said and "optimizer settings changed" not in said
    # (said: a hand edit of config.json, read as the run's settings, was dropped without a word)
    assert (f"fungpt: note: {out / 'config.json'} holds [train] values its latest checkpoint did not train with "
            f"(batch_size 2, lr 0.5): resuming with the checkpoint's; give them as flags to change them (e.g. "
            f"--train.batch-size 2 --train.lr 0.5)") in said
    saved = load_run_config(out)
    assert (saved.model.n_layer, saved.train.lr, saved.train.beta2, saved.train.max_iters) == (2, 2e-3, 0.95, 4)
    assert ckpt.load_state(ckpt.find_checkpoint(out))["step"] == 4
    from fungpt.cli import _as_checkpointed  # (a switch's flag is named as one: --train.X, --train.no-X)

    edited = load_run_config(out)
    edited = dataclasses.replace(edited, train=dataclasses.replace(edited.train, plot=not edited.train.plot))
    assert f"(e.g. --train.{'' if edited.train.plot else 'no-'}plot)" in _as_checkpointed(edited, out)[1]
    for given, steps in (([f"--out-dir={out}"], 5), (["--out_dir", str(out)], 6)):  # the other spellings tyro takes
        assert main(["train", *given, "--resume", "--train.max-iters", str(steps)]) == 0
        said = capsys.readouterr().out
        assert f"resuming with the settings saved in {out}" in said and "did not train with" not in said
    assert ckpt.load_state(ckpt.find_checkpoint(out))["step"] == 6


def test_cli_resume_reads_the_run_it_names_and_the_switches_as_tyro_does(corpus, tmp_path, capsys, monkeypatch):
    """--out-dir='~/run' --resume took the defaults (the saved config.json was looked for under a folder named ~);
    a run copied into the default out_dir, resumed without --out-dir, trained into the folder its config.json named;
    --resume --no-resume, and --no-overwrite, were read as given at all; --config None, as --help offers, was taken
    for a file named None; a flag could not fix a config file's value once the file's bpe vocab_size was dropped."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2, lr=2e-3), progress=False)
    runs = []
    monkeypatch.setattr(sys.modules["fungpt.train"], "train", lambda cfg, **kw: runs.append((cfg, kw)) or {
        "interrupted": False, "step": 1, "out_dir": cfg.out_dir})
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["train", "--out-dir=~/run", "--resume"]) == 0
    assert runs[-1][0].train.lr == 2e-3 and runs[-1][0].out_dir == str(out)
    shutil.copytree(out, tmp_path / "here" / "out" / "shakespeare-char-cpu")
    monkeypatch.chdir(tmp_path / "here")
    assert main(["train", "--resume"]) == 0
    assert Path(runs[-1][0].out_dir).resolve() == (tmp_path / "here" / "out" / "shakespeare-char-cpu").resolve()
    assert main(["train", "--out-dir", str(out), "--resume", "--no-resume", "--overwrite"]) == 0
    assert runs[-1][1]["resume"] is False and runs[-1][1]["overwrite"] is True
    assert main(["train", "--out-dir", str(out), "--overwrite", "--no-overwrite", "--resume"]) == 0
    assert runs[-1][1]["resume"] is True
    assert main(["train", "--config", "None", "--out-dir", str(tmp_path / "new")]) == 0
    assert runs[-1][0].train == TrainConfig()
    (tmp_path / "g.toml").write_text('[data]\ntokenizer = "bpe"\nvocab_size = 300\nval_fraction = 0.0\n')
    assert main(["train", "--config", str(tmp_path / "g.toml"), "--data.val-fraction", "0.1", "--data.tokenizer",
                 "char", "--out-dir", str(tmp_path / "g")]) == 0
    assert (runs[-1][0].data.val_fraction, runs[-1][0].data.vocab_size) == (0.1, None)


def test_json_configs_are_read_as_strictly_as_toml_and_as_kindly_as_a_run_saved_them(corpus, tmp_path, capsys):
    """A run's config.json with a whole number written 12.0 (as an older FunGPT saved some) was refused by --config
    and --resume, which sample and eval read; a JSON table written twice kept only its last (a setting lost without a
    word); {} trained the defaults; and a typo in a flag was blamed on the config file."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    saved = json.loads((out / "config.json").read_text())
    saved["train"]["max_iters"] = 2.0
    (out / "config.json").write_text(json.dumps(saved))
    assert main(["train", "--out-dir", str(out), "--resume", "--train.max-iters", "3"]) == 0
    saved["train"]["max_iters"] = 3.0
    (out / "config.json").write_text(json.dumps(saved))
    assert main(["train", "--config", str(out / "config.json"), "--out-dir", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text())["train"]["max_iters"] == 3
    capsys.readouterr()
    (out / "config.json").write_text("{}")  # a run's own, damaged: no --config to leave out
    assert main(["train", "--out-dir", str(out), "--resume"]) == 2
    assert (f"{out / 'config.json'} holds no settings: the run's config.json is damaged; restore it"
            in capsys.readouterr().err)
    (tmp_path / "dup.json").write_text('{"out_dir": "x", "train": {"max_iters": 5}, "train": {"lr": 0.5}}')
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "tiny.toml").write_text(f'[data]\npath = "{corpus.as_posix()}"\n')
    for argv, said in (
            (["--config", str(tmp_path / "dup.json")], "the key 'train' appears twice in one object"),
            (["--config", str(tmp_path / "empty.json")], f"config file {tmp_path / 'empty.json'} holds no settings"),
            (["--config", str(tmp_path / "tiny.toml"), "--bogus"], "error: Unrecognized options: --bogus ("),
            (["--config", str(tmp_path / "tiny.toml"), "--train.max-iters", "--dry-run"],
             "error: Missing value for argument '--train.max-iters'. Expected 1 values. (`")):
        assert main(["train", *argv, "--dry-run"]) == 2
        assert said in capsys.readouterr().err


def test_cli_sample_unknown_character_is_clear(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    assert main(["sample", "--run", str(out), "--prompt", "Zebra", "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "'Z'" in err


def test_cli_errors_under_torchrun_say_which_process_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it in the second process
    assert main(["sample", "--run", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error (rank 1): ")
    monkeypatch.setenv("RANK", "0")
    assert main(["sample", "--run", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")

    class Unbuffered(io.StringIO):  # stderr under torchrun (python -u): each write reaches the terminal alone
        writes: list[str] = []

        def write(self, text):
            self.writes.append(text)
            return super().write(text)

    # one write a line: print() wrote the newline apart, and two processes' lines ran together into one
    monkeypatch.setattr(sys, "stderr", Unbuffered())
    assert main(["sample", "--run", str(tmp_path / "nothing")]) == 2
    assert len(Unbuffered.writes) == 1 and Unbuffered.writes[0].startswith("error: ")
    assert Unbuffered.writes[0].endswith("\n") and Unbuffered.writes[0].count("\n") == 1


def test_several_processes_need_a_torch_whose_ddp_runs_pass_the_tests(monkeypatch):
    """With torch 2.4.1 and 2.6.0 (pyproject.toml allows 2.4) a resume with another number of processes hung at
    start-up for ever; one process works there."""
    from torch.torch_version import TorchVersion

    from fungpt.train import setup_distributed

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.6.0+cu124"))
    assert setup_distributed("cpu").world_size == 1  # one process: not asked
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FunGPTError, match=r"several processes \(torchrun\) needs torch 2.8 or newer, this is "
                                          r"2.6.0\+cu124 .*: pip install -U torch, or train in one process"):
        setup_distributed("cpu")
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.8.0a0+5228986c39"))  # (NVIDIA's pre-release: 2.8)
    # an Apple GPU: gloo cannot carry its tensors (a raw "invalid tensor type" from the first all-reduce)
    with pytest.raises(FunGPTError, match=r"torchrun\) on an Apple GPU is not supported: .* under torchrun on the "
                                          r"CPU \(--train.device cpu\)$"):
        setup_distributed("mps")


def test_an_apple_gpu_run_saves_its_gpu_random_stream_for_the_resume(monkeypatch):
    """Dropout masks on MPS come from its own generator: a resume reseeded it (the masks of step 1 again)."""
    train_module = sys.modules["fungpt.train"]
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    assert torch.equal(train_module._rng_state("mps")["mps"], torch.tensor([7], dtype=torch.uint8))
    assert set(train_module._rng_state("cpu")) == {"cpu"}


def test_ddp_two_gloo_processes(corpus, tmp_path):
    out = tmp_path / "ddp"
    cmd = _torchrun_train(corpus, out, tmp_path, "--train.grad-accum-steps", "2", "--train.max-iters", "4",
                          "--train.eval-interval", "2")
    env = _torchrun_env(tmp_path)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out)
    assert [r["step"] for r in rows if "lr" in r] == [1, 2, 3, 4]  # logged once (rank 0), not twice
    state = ckpt.load_state(ckpt.find_checkpoint(out))
    assert len(state["loader"]) == 2 and state["step"] == 4
    ranks = [s["rank"] for s in state["loader"]]
    assert ranks == [0, 1]  # each rank's batch stream is saved, for exact resume
    assert not torch.equal(state["loader"][0]["generator_state"], state["loader"][1]["generator_state"])
    assert json.loads((out / "run.json").read_text())["world_size"] == 2


@pytest.mark.skipif(os.name == "nt", reason="the run lock is POSIX-only")
def test_ddp_processes_agree_on_a_refused_out_dir_before_they_wait_on_each_other(corpus, tmp_path):
    """Only rank 0 asks whether a run holds out_dir's lock. It refused and stopped while rank 1 went on into making
    a process group, a wait that torchrun's SIGTERM cannot end: rank 1 was killed 30 s later. Now every process
    hears the refusal first, and says it, as they say errors they all hit: rank 0's (a folder holding a run, training
    still, had rank 1 say "already holds a training run: pass --resume ...", advice the lock then refused)."""
    out = tmp_path / "busy"
    train(tiny_config(corpus, out, max_iters=1), progress=False)  # (a run there, as one still training has)
    hold = ("import sys\nfrom pathlib import Path\nfrom fungpt.rundir import lock_out_dir\n"
            "with lock_out_dir(Path(sys.argv[1])):\n    print('locked', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run(_torchrun_train(corpus, out, tmp_path), env=_torchrun_env(tmp_path),
                              capture_output=True, text=True, timeout=240)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert any(line.startswith("error: ") and "in use by a training run" in line for line in lines), proc.stderr
    assert any(line.startswith("error (rank 1): ") and "in use by a training run" in line for line in lines), (
        proc.stderr)
    assert "already holds" not in proc.stderr


def _torchrun_train(corpus, out, tmp_path, *extra) -> list[str]:
    """The command of a tiny 2-process CPU (gloo) training run, as test_ddp_two_gloo_processes runs it."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fungpt",
            "train", "--data.path", str(corpus), "--out-dir", str(out), "--train.device", "cpu",
            "--model.n-layer", "1", "--model.n-head", "2", "--model.n-embd", "16", "--model.block-size", "8",
            "--train.batch-size", "2", "--train.eval-iters", "1", "--train.log-interval", "1", *extra]


def _torchrun_env(tmp_path) -> dict:
    scratch = tmp_path / "tmp"  # torchrun leaves a torchelastic_* folder in TMPDIR: keep it out of /tmp
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}


_RECORD_LRS = """
import importlib, json, os, sys
import fungpt.cli
train_module = importlib.import_module("fungpt.train")  # (fungpt.train, the attribute, is the function)
real_get_lr, lrs = train_module.get_lr, []
train_module.get_lr = lambda it, tc: lrs.append(real_get_lr(it, tc)) or lrs[-1]
code = fungpt.cli.main(sys.argv[2:])
with open(f"{sys.argv[1]}.{os.environ['RANK']}", "w") as f:
    json.dump(lrs, f)
sys.exit(code)
"""


def _where_time_went(out: Path) -> str:
    """For a failed time-budget assertion of a run that logs every step: its end, its slowest steps and the longest
    gaps between steps (saves and evals), each with its run_s (a stall of the machine near the end leaves the lr
    short of min_lr), and the checkpoint's timings."""
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
             if "dt_ms" in r]
    slowest = sorted(steps, key=lambda r: -r["dt_ms"])[:3]
    gaps = sorted(((b["run_s"] - a["run_s"] - b["dt_ms"] / 1000, a["step"], a["run_s"])
                   for a, b in zip(steps, steps[1:])), reverse=True)[:3]
    timings = ckpt.load_state(ckpt.find_checkpoint(out))["timings"]
    return (f"last step at run_s {steps[-1]['run_s']}; slowest steps (step, ms, run_s) "
            f"{[(r['step'], r['dt_ms'], r['run_s']) for r in slowest]}; longest gaps after a step (s, step, run_s) "
            f"{[(round(g, 3), n, t) for g, n, t in gaps]}; timings {timings}")


def test_ddp_with_a_time_budget_steps_every_replica_with_the_same_lr(corpus, tmp_path):
    """With max_minutes the schedule follows each process's clock; unless the ranks agree on it, the replicas
    take steps of different sizes and drift apart (rank 0's copy is the one saved)."""
    script = tmp_path / "record_lrs.py"
    script.write_text(_RECORD_LRS)
    cmd = _torchrun_train(corpus, tmp_path / "out", tmp_path, "--train.max-iters", "100000",
                          "--train.max-minutes", "0.4", "--train.warmup-iters", "10")  # (start-up: 4-13 s)
    at = cmd.index("-m", cmd.index("--nproc_per_node=2"))
    cmd[at:at + 2] = [str(script), str(tmp_path / "lrs")]  # `-m fungpt` -> the recording script
    proc = subprocess.run(cmd, env=_torchrun_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"lrs.{r}").read_text()) for r in (0, 1))
    assert len(rank0) > 20, len(rank0)
    assert rank0 == rank1
    assert rank0[-1] == pytest.approx(TrainConfig().min_lr, rel=0.05), _where_time_went(tmp_path / "out")  # on time


_RECORD_GRADS = """
import importlib, os, sys
import torch
import fungpt.cli
train_module = importlib.import_module("fungpt.train")  # (fungpt.train, the attribute, is the function)
real_forward_backward = train_module.forward_backward


def recording(fwd_model, loader, *args, **kwargs):
    model = fwd_model.module  # (the DDP wrapper's model)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batches, real_next = [], loader.next_batch
    loader.next_batch = lambda: batches.append(real_next()) or batches[-1]
    loss = real_forward_backward(fwd_model, loader, *args, **kwargs)
    loader.next_batch = real_next
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    torch.save({"start": start, "batches": batches, "grads": grads}, f"{sys.argv[1]}.{os.environ['RANK']}")
    return loss


train_module.forward_backward = recording
sys.exit(fungpt.cli.main(sys.argv[2:]))
"""


def test_ddp_gradients_are_the_mean_over_every_process_and_micro_batch(corpus, tmp_path):
    """What DDP promises: each process's step uses the gradient of all the processes' batches together, the mean
    over the 2 ranks' gradients (each itself accumulated over its 2 micro-batches without syncing), as one process
    computing on the 4 micro-batches would get. A rank stepping on its own gradient, or on the sum, fails here."""
    script = tmp_path / "record_grads.py"
    script.write_text(_RECORD_GRADS)
    out = tmp_path / "out"
    cmd = _torchrun_train(corpus, out, tmp_path, "--train.grad-accum-steps", "2", "--train.max-iters", "1")
    at = cmd.index("-m", cmd.index("--nproc_per_node=2"))
    cmd[at:at + 2] = [str(script), str(tmp_path / "grads")]  # `-m fungpt` -> the recording script
    proc = subprocess.run(cmd, env=_torchrun_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"grads.{r}", weights_only=True) for r in (0, 1)]
    model = GPT(load_run_config(out).model)
    model.load_state_dict(ranks[0]["start"])
    assert all(torch.equal(ranks[1]["start"][k], v) for k, v in ranks[0]["start"].items())  # same replica
    assert not torch.equal(ranks[0]["batches"][0][0], ranks[1]["batches"][0][0])  # each rank its own data
    batches = ranks[0]["batches"] + ranks[1]["batches"]
    assert len(batches) == 4
    for x, y in batches:
        (model(x, y)[1] / len(batches)).backward()  # the mean loss over all 4 micro-batches
    for r in ranks:
        for name, p in model.named_parameters():
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ddp_ctrl_c_in_one_ranks_final_eval_stops_both_and_keeps_the_others_eval(corpus, tmp_path):
    """A signal that reaches one process during the final eval: that one leaves it, every process saves the step
    and stops. Rank 0, which scored it, logged its row: it said "its final eval was not done" all the same."""
    script = tmp_path / "ctrl_c_rank1.py"
    script.write_text(_CTRL_C_IN_RANK_1S_FINAL_EVAL)
    out = tmp_path / "out"
    cmd = _torchrun_train(corpus, out, tmp_path, "--train.max-iters", "4", "--train.eval-interval", "1000",
                          "--train.eval-iters", "20", "--train.checkpoint-interval", "1000")
    at = cmd.index("-m", cmd.index("--nproc_per_node=2"))
    cmd[at:at + 2] = [str(script)]  # `-m fungpt` -> the script
    proc = subprocess.run(cmd, env=_torchrun_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    assert "fungpt: interrupted at step 4; checkpoint saved\n" in proc.stderr, proc.stderr[-3000:]
    assert [r["step"] for r in read_rows(out) if "val_loss" in r] == [0, 4]  # rank 0's final eval, logged
    assert ckpt.load_state(ckpt.find_checkpoint(out))["step"] == 4


_CTRL_C_IN_RANK_1S_FINAL_EVAL = """
import importlib, os, signal, sys
import fungpt.cli
train_module = importlib.import_module("fungpt.train")  # (fungpt.train, the attribute, is the function)
evaluation = importlib.import_module("fungpt.evaluation")  # (evaluate's batches: its unless_stopped)
evaluate, batches_of, evals = train_module.evaluate, evaluation.unless_stopped, []
def counted_evaluate(*args, **kwargs):
    evals.append(1)
    return evaluate(*args, **kwargs)
def ctrl_c_in_rank_1s_final_eval(items, stop):  # (step 0's eval is the first)
    for item in batches_of(items, stop):
        if len(evals) == 2 and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGINT)
        yield item
train_module.evaluate, evaluation.unless_stopped = counted_evaluate, ctrl_c_in_rank_1s_final_eval
sys.exit(fungpt.cli.main(sys.argv[1:]))  # (argv[1] is "train")
"""


def test_a_process_left_alone_by_a_failed_one_says_so_in_one_line(tmp_path):
    """Under torchrun rank 0 prepares the data while the others wait; if it fails, they lose their peer."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello world, a small corpus.\n" * 500 + b"\xff\xfe")
    cmd = _torchrun_train(bad, tmp_path / "out", tmp_path)
    proc = subprocess.run(cmd, env={**_torchrun_env(tmp_path), "FUNGPT_CACHE_DIR": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert ours[0].startswith(f"error: {bad} is not valid UTF-8")
    # Rank 1 says so in one line, unless torchrun's agent, seeing rank 0 gone, stopped it first (SIGTERM, a race:
    # about one run in ten here): either way no traceback of its own (torchrun's agent prints one of its own)
    assert ours[1:] in ([], ["error (rank 1): another process of this torchrun job stopped (its error is above, or, "
                             "if it was killed, torchrun's summary below says by what), so this one stops too"]), ours
    assert "[rank1]" not in proc.stderr and "GLHF" not in proc.stderr  # gloo's traceback
    # torchrun's summary names rank 0, the one that failed, as the root cause (not rank 1, which it left behind)
    root = proc.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)", root.split("=====")[0]), root


def test_a_rank_on_another_machine_without_the_prepared_data_says_how_to_share_it(corpus, tmp_path, monkeypatch):
    """Multi-node: rank 0 prepares the data into its own machine's cache; a rank on another machine then read its
    own cache and failed with "data folder .../datasets/corpus-char-1a2b3c does not exist; create it with ..."."""
    import torch.distributed as dist

    from fungpt.rundata import resolve_data

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "this-machine"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:  # is_main=False: as a rank that is not rank 0, whose preparing happened elsewhere
        with pytest.raises(FunGPTError, match=r"the data that rank 0 prepared \(.*\) is not on this machine: .*"
                                              "set FUNGPT_CACHE_DIR to the same folder on a filesystem they share"):
            resolve_data(DataConfig(path=str(corpus)), is_main=False)
        assert (resolve_data(DataConfig(path=str(corpus)), is_main=True) / "meta.json").is_file()  # rank 0's own
    finally:
        dist.destroy_process_group()


def test_a_changed_val_fraction_prepares_the_data_again(corpus, tmp_path, monkeypatch):
    """The val fraction is part of the cache key: without it, data.val_fraction = 0.2 silently reused the folder
    prepared with 0.1 (and its 90/10 split)."""
    from fungpt.data import load_meta
    from fungpt.rundata import resolve_data

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    first = resolve_data(DataConfig(path=str(corpus), val_fraction=0.1), progress=False)
    second = resolve_data(DataConfig(path=str(corpus), val_fraction=0.2), progress=False)
    assert first != second and first.parent == second.parent == tmp_path / "cache" / "datasets"
    assert load_meta(first)["val_fraction"] == 0.1 and load_meta(second)["val_fraction"] == 0.2
    n = len(corpus.read_text(encoding="utf-8"))
    assert load_meta(second)["val_chars"] == n - int(n * 0.8)
    assert resolve_data(DataConfig(path=str(corpus), val_fraction=0.1), progress=False) == first  # still cached


def test_the_default_bpe_size_written_out_is_the_default(corpus, tmp_path, monkeypatch, capsys):
    """data.vocab_size = 4096 is what None means for a BPE: it had a cache folder of its own (a second BPE trained on
    the same text), and a resume that wrote it out was refused as "vocab_size None, not 4096"."""
    from fungpt.rundata import resolve_data
    from fungpt.tokenizer import DEFAULT_BPE_VOCAB

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    default = resolve_data(DataConfig(path=str(corpus), tokenizer="bpe"), progress=False)
    assert resolve_data(DataConfig(path=str(corpus), tokenizer="bpe", vocab_size=DEFAULT_BPE_VOCAB),
                        progress=False) == default
    assert resolve_data(DataConfig(path=str(corpus), tokenizer="bpe", vocab_size=300), progress=False) != default
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=2)
    cfg.data = DataConfig(path=str(corpus), tokenizer="bpe")
    train(cfg, progress=False)
    cfg.data = DataConfig(path=str(corpus), tokenizer="bpe", vocab_size=DEFAULT_BPE_VOCAB)
    cfg.train.max_iters = 3
    assert train(cfg, resume=True, progress=False)["step"] == 3
    cfg.data = DataConfig(path=str(corpus), tokenizer="bpe", vocab_size=300)  # another size is still refused
    with pytest.raises(FunGPTError, match=r"with data.tokenizer = 'bpe' \(vocab_size 4096\), not 'bpe' "
                                          r"\(vocab_size 300\); resume with the original data settings"):
        train(cfg, resume=True, progress=False)
    cfg.data = DataConfig(path=str(corpus), tokenizer="char")  # a char tokenizer has no size to name
    with pytest.raises(FunGPTError, match=r"'bpe' \(vocab_size 4096\), not 'char'; resume with"):
        train(cfg, resume=True, progress=False)


def test_the_resume_checks_read_one_file_by_any_of_its_names(corpus, tmp_path, monkeypatch):
    """./corpus.txt is corpus.txt: resumed with another split under another spelling of its path, a run trained on,
    its val split now holding text it had trained on (only a note said so); and an out_dir inside a data.path written
    with ~ was not refused (the run's checkpoints became corpus text)."""
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(corpus.parent)
    train(tiny_config(Path(corpus.name), tmp_path / "run", max_iters=2), progress=False)
    again = tiny_config(Path(".") / corpus.name, tmp_path / "run", max_iters=3)
    again.data.path = f"./{corpus.name}"
    again.data.val_fraction = 0.3
    with pytest.raises(FunGPTError, match=r"split with data.val_fraction = 0.1, not 0.3; another split would put"):
        train(again, resume=True, progress=False)
    home = tmp_path / "home"
    (home / "texts").mkdir(parents=True)
    (home / "texts" / "a.txt").write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))
    inside = tiny_config(Path("~/texts"), Path("~/texts/run"), max_iters=1)
    inside.data.path = "~/texts"
    with pytest.raises(FunGPTError, match=r"is inside data.path ~/texts: the run's files would become part of the "):
        train(inside, progress=False)
    assert not (home / "texts" / "run").exists()


def test_a_cached_dataset_that_lost_its_tokenizer_is_prepared_again(corpus, tmp_path, monkeypatch):
    """A cache folder without its tokenizer_meta.json was taken as prepared, and the run then refused it ("no
    tokenizer found"), with no word of the cache."""
    from fungpt.rundata import resolve_data

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    folder = resolve_data(DataConfig(path=str(corpus)), progress=False)
    (folder / "tokenizer_meta.json").unlink()
    assert resolve_data(DataConfig(path=str(corpus)), progress=False) == folder
    assert load_tokenizer(folder).vocab_size > 0


def test_a_run_asks_no_lock_of_the_folder_it_has_locked(corpus, tmp_path, monkeypatch):
    """prepare_out_dir ran check_out_dir's lock question on the folder this process had locked: on NFS, where flock
    is emulated with per-process fcntl locks, that turned the run's lock into a shared one and released it."""
    from fungpt import rundir

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    asked = []
    real = rundir.lock_holder
    monkeypatch.setattr(rundir, "lock_holder", lambda out: asked.append(out) or real(out))
    train(tiny_config(corpus, tmp_path / "run", max_iters=1), progress=False)
    assert asked == [tmp_path / "run"]  # once, before the lock was taken (check_out_dir at the start)


def test_a_data_folder_prepared_again_while_a_run_trains_on_it(corpus, tmp_path, monkeypatch):
    """`fungpt prepare --overwrite` into the folder a live run trained on: the run's next batches were the new
    text's, silently (or an IndexError when it was shorter), and its evals measured the new text. Now its batches
    stay the old text's, and it stops at its next eval, in one line."""
    from fungpt.data import BatchLoader, prepare

    data = prepare(corpus, tmp_path / "data", progress=False)
    shorter = tmp_path / "shorter.txt"
    shorter.write_text(corpus.read_text(encoding="utf-8")[:400], encoding="utf-8")
    real_next, drawn = BatchLoader.next_batch, []

    def next_batch(self):
        if self.seed == 1337:  # the training batches (evals draw theirs with seed + 12345)
            drawn.append(1)
            if len(drawn) == 3:
                prepare(shorter, data, overwrite=True, progress=False)
        return real_next(self)

    monkeypatch.setattr(BatchLoader, "next_batch", next_batch)
    cfg = tiny_config(data, tmp_path / "run", max_iters=12, eval_interval=6, checkpoint_interval=12)
    with pytest.raises(FunGPTError, match=r"^the data folder .* was prepared again while this run trained on it "
                                          r".*with a checkpoint at step 6\."):
        train(cfg, progress=False)
    assert len(drawn) == 6  # (steps 1-6 trained on the text the run began with; the eval at step 6 refused)
    assert ckpt.folder_step(ckpt.find_checkpoint(cfg.out_dir)) == 6  # those steps saved, not lost


def test_runs_that_start_together_prepare_their_data_once(corpus, tmp_path, monkeypatch, capsys):
    """Runs started at once on the same data each prepared it, and swapped their folders in under each other: a run
    found none between two renames ("data folder ... does not exist"), or failed as "prepared by another command".
    A run now waits for the one preparing it, then finds it prepared."""
    fcntl = pytest.importorskip("fcntl")
    import threading
    import time

    from fungpt.data import prepare
    from fungpt.rundata import resolve_data

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "elsewhere"))
    name = resolve_data(DataConfig(path=str(corpus)), progress=False).name  # (the key names no cache folder)
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "cache" / "datasets" / name
    out.parent.mkdir(parents=True)
    prepared, found = [], []
    monkeypatch.setattr(rundata, "prepare", lambda *a, **k: prepared.append(1) or prepare(*a, **k))
    with open(out.parent / f".{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run, preparing it
        waiting = threading.Thread(target=lambda: found.append(resolve_data(DataConfig(path=str(corpus)),
                                                                             progress=False)))
        waiting.start()
        time.sleep(0.5)
        prepare(corpus, out, progress=False)  # ... which it finishes
    waiting.join(timeout=60)
    assert found == [out] and prepared == []  # it waited, then took the other's
    assert f"fungpt: waiting for another process that prepares the same data ({name}) ..." in capsys.readouterr().err


def test_a_cached_dataset_removes_what_a_killed_prepare_of_it_left(corpus, tmp_path, monkeypatch):
    """A prepare killed (kill -9) left its temporary folder in the cache; the next run prepared the data in full,
    and every later run found it cached, so nothing ran that removes stale temporaries: they stayed for ever."""
    import time

    from fungpt import data as data_mod
    from fungpt.rundata import resolve_data

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    out = resolve_data(DataConfig(path=str(corpus)), progress=False)
    killed, live = (out.parent / f"{out.name}.tmp-host-{pid}" for pid in (7, 8))
    hour_ago = time.time() - data_mod.STALE_TEMP_S - 60
    for folder in (killed, live):
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"\0" * 1000)
    for path in (killed / "train.bin", killed):
        os.utime(path, (hour_ago, hour_ago))
    assert resolve_data(DataConfig(path=str(corpus)), progress=False) == out  # cached: not prepared again
    assert not killed.exists() and live.exists()  # (a live prepare's folder, written to lately, stays)


def test_an_edit_of_the_code_that_makes_the_tokens_prepares_the_data_again(corpus, tmp_path, monkeypatch):
    """A learner's edit of tokenizer.py or data.py (lower case, blank lines dropped) was silently ignored: training
    read the tokens the old code had cached."""
    import fungpt.tokenizer
    from fungpt.rundata import resolve_data

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    first = resolve_data(DataConfig(path=str(corpus)), progress=False)
    edited = tmp_path / "tokenizer.py"  # the module's source with one more line, as an editor leaves it
    edited.write_text(Path(fungpt.tokenizer.__file__).read_text(encoding="utf-8") + "# lower-cased\n")
    monkeypatch.setattr(fungpt.tokenizer, "__file__", str(edited))  # (in the same process: %autoreload)
    second = resolve_data(DataConfig(path=str(corpus)), progress=False)
    assert second != first and second.parent == first.parent and (second / "meta.json").is_file()


_FAIL_ON_RANK_1 = """
import os, sys
import fungpt.cli
from fungpt.data import BatchLoader
real_next, calls = BatchLoader.next_batch, []
def next_batch(self):  # rank 1 hits a bug at its third batch, mid-training
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        raise ValueError("a bug on rank 1")
    return real_next(self)
BatchLoader.next_batch = next_batch
sys.argv[1:] = sys.argv[2:]
fungpt.cli.entry()
"""


_SLOW_PREPARE = """
import datetime, importlib, sys, time
import torch.distributed as dist
import fungpt.cli
real_init = dist.init_process_group  # the process group's timeout, 30 minutes for gloo, made 5 s
dist.init_process_group = lambda *a, **k: real_init(*a, **{**k, "timeout": datetime.timedelta(seconds=5)})
rundata = importlib.import_module("fungpt.rundata")
real_prepare = rundata.prepare
def prepare(*a, **k):  # a corpus that takes longer to prepare than that
    time.sleep(10)
    return real_prepare(*a, **k)
rundata.prepare = prepare
sys.argv[1:] = sys.argv[2:]
fungpt.cli.entry()
"""


def test_the_other_ranks_wait_for_a_preparation_longer_than_the_process_groups_timeout(corpus, tmp_path):
    """Rank 1 waited for rank 0's preparation in a plain barrier: past the group's timeout (30 minutes for gloo, 10
    for NCCL: a corpus of a few GB) it crashed with gloo's traceback, and torchrun stopped rank 0 too."""
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_PREPARE)
    cmd = _torchrun_train(corpus, tmp_path / "out", tmp_path, "--train.max-iters", "2")
    at = cmd.index("-m", cmd.index("--nproc_per_node=2"))
    cmd[at:at + 2] = [str(script), "-"]
    proc = subprocess.run(cmd, env={**_torchrun_env(tmp_path), "FUNGPT_CACHE_DIR": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fungpt: done" in proc.stdout


def test_torchrun_names_the_rank_with_a_bug_as_the_root_cause(corpus, tmp_path):
    """A bug on rank 1 mid-training: rank 0 noticed its peer gone at once and exited as fast, and torchrun, which
    times failures in whole seconds and breaks ties by the lowest rank, named the innocent rank 0 as the root cause
    (4 runs in 5). Rank 0 now waits a moment after its one line."""
    script = tmp_path / "fail.py"
    script.write_text(_FAIL_ON_RANK_1)
    cmd = _torchrun_train(corpus, tmp_path / "out", tmp_path, "--train.max-iters", "20")
    at = cmd.index("-m", cmd.index("--nproc_per_node=2"))
    cmd[at:at + 2] = [str(script), "-"]
    proc = subprocess.run(cmd, env=_torchrun_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "[rank1]: ValueError: a bug on rank 1" in proc.stderr  # its traceback, prefixed by torch's excepthook
    root = proc.stderr.split("Root Cause (first observed failure):", 1)[1].split("=====")[0]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root), root


_INF_LOSS_ON_RANK_1 = """
import os, sys
import fungpt.cli
from fungpt.model import GPT
real_forward, calls = GPT.forward, []
def forward(self, idx, targets=None, **kwargs):  # rank 1's loss alone is inf at its 3rd step (gradients finite)
    out = real_forward(self, idx, targets, **kwargs)
    if self.training and targets is not None:
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 3:
            return out[0], out[1] + float("inf")
    return out
GPT.forward = forward
sys.argv[1:] = sys.argv[2:]
fungpt.cli.entry()
"""


@pytest.mark.parametrize("skip", [True, False])
def test_ranks_agree_on_a_divergence_only_one_of_them_sees(corpus, tmp_path, skip):
    """One rank's loss was inf while the averaged gradients stayed finite: with skip_nonfinite that rank alone
    skipped the step and the others took it, so their replicas differed from then on, silently (rank 0, which
    prints and saves, saw nothing). Without it, rank 0 said the finite loss of its own as the divergence's."""
    script = tmp_path / "inf.py"
    script.write_text(_INF_LOSS_ON_RANK_1)
    extra = ["--train.skip-nonfinite"] if skip else []
    cmd = _torchrun_train(corpus, tmp_path / "out", tmp_path, "--train.max-iters", "4", *extra)
    at = cmd.index("-m", cmd.index("--nproc_per_node=2"))
    cmd[at:at + 2] = [str(script), "-"]
    proc = subprocess.run(cmd, env=_torchrun_env(tmp_path), capture_output=True, text=True, timeout=240)
    if skip:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "fungpt: skipped step 3: non-finite loss or gradient" in proc.stdout + proc.stderr
    else:
        assert proc.returncode != 0
        said = re.search(r"^error: training diverged at step 3: the loss or gradient is NaN/inf \(loss (\S+) here, "
                         r"NaN/inf in another process\)", proc.stderr, re.M)
        assert said and math.isfinite(float(said[1])), proc.stderr[-3000:]


def test_each_rank_has_dropout_masks_of_its_own_across_seeds():
    """The ranks' torch seeds were seed + rank: seed 1 on rank 1 was seed 2 on rank 0, so a sweep over seeds under
    DDP trained with the same dropout masks twice. Rank 0 keeps the single process's seed (its runs unchanged)."""
    from fungpt.train import dropout_seed

    seeds = {(s, r): dropout_seed(s, r) for s in range(8) for r in range(4)}
    assert all(dropout_seed(s, 0) == s for s in range(8))
    assert len(set(seeds.values())) == len(seeds)  # no two (seed, rank) pairs share a stream


def test_a_bpe_run_whose_tokenizer_file_was_damaged_is_not_resumed_with_it(corpus, tmp_path, monkeypatch):
    """The run's tokenizer.json with two ids swapped by hand: the resume encoded the text with it (taking it for
    another FunGPT version's BPE), trained, and saved its fingerprint as the checkpoint's. Refused, naming the files."""
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=2, eval_interval=2, checkpoint_interval=2)
    cfg.data = dataclasses.replace(cfg.data, tokenizer="bpe", vocab_size=300)
    train(cfg, progress=False)
    path = Path(cfg.out_dir) / "tokenizer.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    vocab = saved["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(saved), encoding="utf-8")
    cfg.train = dataclasses.replace(cfg.train, max_iters=4)
    with pytest.raises(FunGPTError, match="its tokenizer files are not the ones its checkpoint was trained with"):
        train(cfg, resume=True, progress=False)
    assert ckpt.load_state(ckpt.find_checkpoint(cfg.out_dir))["step"] == 2  # nothing trained with them


@pytest.mark.parametrize("fingerprint_saved", [True, False])
def test_a_bpe_run_resumes_where_another_version_learns_other_merges(corpus, tmp_path, monkeypatch, capsys,
                                                                     fingerprint_saved):
    """Another FunGPT version prepares the data again (its code is part of the cache key); where its BPE learns
    other merges from the same text (a corpus holding <|endoftext|>, since BPE training leaves it out), the resume
    was refused:
    "the data is encoded with a tokenizer whose ids mean other text". The text is encoded with the run's own."""
    import numpy as np

    import fungpt.tokenizer as tokenizer_mod

    def read_bin(folder: Path, split: str):
        return np.fromfile(folder / f"{split}.bin", dtype=np.dtype(json.loads((folder / "meta.json").read_text())
                                                                  ["dtype"]))

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=4, eval_interval=2, checkpoint_interval=2)
    cfg.data = dataclasses.replace(cfg.data, tokenizer="bpe", vocab_size=300)
    first = train(cfg, progress=False)
    if not fingerprint_saved:  # checkpoints from before it was saved: the text's hash is read where run.json says
        manifest = ckpt.find_checkpoint(cfg.out_dir) / ckpt.MANIFEST_FILE
        saved = json.loads(manifest.read_text())
        del saved["data_fingerprint"]
        manifest.write_text(json.dumps(saved))
    ids = read_bin(rundata.resolve_data(cfg.data, progress=False), "train")
    real_cut = tokenizer_mod._cut_long_runs
    monkeypatch.setattr(tokenizer_mod, "_cut_long_runs", lambda chunks: (c[::-1] for c in real_cut(chunks)))
    monkeypatch.setattr(rundata, "_token_code_fingerprint", lambda: "code=another-version")
    cfg.train = dataclasses.replace(cfg.train, max_iters=6)
    assert train(cfg, resume=True, progress=False)["step"] == 6 and first["step"] == 4
    assert "encoding the text with the run's own tokenizer" in capsys.readouterr().out
    data_dir = rundata.resolve_data(cfg.data, progress=False, tokenizer=load_tokenizer(cfg.out_dir))
    assert (read_bin(data_dir, "train") == ids).all()  # the same ids as the run trained on
    # Only for the same text and settings: a copy of it asked for another vocab_size, or the text edited, is
    # refused as before (the run's own tokenizer would have hidden the change)
    copy = tmp_path / "copy.txt"
    copy.write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    edited = tmp_path / "edited.txt"
    edited.write_text(corpus.read_text(encoding="utf-8").replace("the", "a"), encoding="utf-8")
    for path, vocab in ((copy, 280), (edited, 300)):
        cfg.data = dataclasses.replace(cfg.data, path=str(path), vocab_size=vocab)
        cfg.train = dataclasses.replace(cfg.train, max_iters=8)
        with pytest.raises(FunGPTError, match="cannot resume"):
            train(cfg, resume=True, progress=False)
    # Where the text cannot be told the same, ids of a BPE of the same size that differ are refused, and the advice
    # names the prepared folder the run read (it holds the run's ids)
    cfg.data = dataclasses.replace(cfg.data, path=str(corpus), vocab_size=300)
    other = rundata.resolve_data(cfg.data, progress=False)  # (the other version's merges)
    with pytest.raises(FunGPTError) as refused:
        rundata.check_resume_tokenizer(other, Path(cfg.out_dir))
    read = json.loads((Path(cfg.out_dir) / "run.json").read_text())["data_dir"]
    assert str(refused.value).endswith(f"; a BPE learned again (by another FunGPT version?) holds other merges from "
                                       f"the same text: resume with the data the run read, --data.path {read}, or "
                                       f"train into a new out_dir")
    # The folder the run read, prepared again since (here: the folder given itself): not named, the usual advice
    run_json = Path(cfg.out_dir) / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "data_dir": str(other)}))
    with pytest.raises(FunGPTError) as refused:
        rundata.check_resume_tokenizer(other, Path(cfg.out_dir))
    assert str(refused.value).endswith("; resume with the original data and tokenizer, or train into a new out_dir")
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "data_dir": read}))
    cfg.data = dataclasses.replace(cfg.data, path=read)
    assert train(cfg, resume=True, progress=False)["step"] == 8


def test_the_processes_note_names_the_ranks_it_means():
    from fungpt.config import RunConfig

    train_module = sys.modules["fungpt.train"]  # (fungpt.train, the attribute, is the function)
    cfg = RunConfig()
    cfg.train = dataclasses.replace(cfg.train, batch_size=2, grad_accum_steps=1)
    note = train_module.processes_note(train_module.Resumed(processes=1, streams=1, tokens_per_step=2048), cfg, 1024,
                                       cfg.train, 4)
    now = 2 * cfg.model.block_size * 4  # batch 2 x block x 4 processes
    assert note.endswith(f"tokens per step 2,048 -> {now:,}, and the batches differ from an uninterrupted run's; "
                         "processes 1..3 start fresh batch streams"), note
    # 4 processes saved, 2 resumed them, now 3: rank 2 takes up the stream rank 2 left; none is new
    note = train_module.processes_note(train_module.Resumed(processes=2, streams=4, tokens_per_step=4096), cfg, 1024,
                                       cfg.train, 3)
    assert note.endswith("; process 2 takes up the batch streams that earlier processes of those ranks left"), note


def test_resume_with_more_processes_gives_the_new_rank_its_own_batches(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(corpus, out, max_iters=2, eval_interval=2, checkpoint_interval=2)
    cfg.model = dataclasses.replace(cfg.model, n_layer=1, n_embd=16, block_size=8)
    cfg.train = dataclasses.replace(cfg.train, batch_size=2, eval_iters=1)
    train(cfg, progress=False)  # one process
    # a start that failed before saving rewrote config.json (here: batch_size 7); the checkpoint's own count counts
    saved = json.loads((out / "config.json").read_text())
    saved["train"]["batch_size"] = 7
    (out / "config.json").write_text(json.dumps(saved))
    proc = subprocess.run(_torchrun_train(corpus, out, tmp_path, "--train.max-iters", "4", "--train.eval-interval",
                                          "2", "--resume"), env=_torchrun_env(tmp_path), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each process trains on its own batch of 2 x 8 tokens: the step grows from 16 tokens to 32, and it says so
    assert ("resuming with 2 process(es) where the checkpoint was written by 1: tokens per step 16 -> 32, and the "
            "batches differ from an uninterrupted run's; process 1 starts fresh batch streams") in proc.stdout
    assert proc.stdout.count("fungpt: done") == 1  # said once, by rank 0, not once per process
    state = ckpt.load_state(ckpt.find_checkpoint(out))
    assert state["step"] == 4 and [s["rank"] for s in state["loader"]] == [0, 1]
    # rank 1 drew its own batches; before, it continued a copy of rank 0's stream (the same batches on both)
    assert not torch.equal(state["loader"][0]["generator_state"], state["loader"][1]["generator_state"])


def test_resume_with_fewer_processes_keeps_the_others_batch_streams_for_later(corpus, tmp_path, capsys):
    """2 processes, then 1, then 2 again: rank 1 takes up the batch stream it left at the first resume. Before, the
    1-process checkpoints saved rank 0's stream alone, so rank 1 started afresh and trained again, in order, on the
    batches it had trained on in the first part."""
    out = tmp_path / "run"
    two = _torchrun_train(corpus, out, tmp_path, "--train.eval-interval", "2")
    proc = subprocess.run([*two, "--train.max-iters", "2"], env=_torchrun_env(tmp_path), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = ckpt.load_state(ckpt.find_checkpoint(out))["loader"]
    cfg = tiny_config(corpus, out, max_iters=4, eval_interval=2, checkpoint_interval=2)
    cfg.model = dataclasses.replace(cfg.model, n_layer=1, n_head=2, n_embd=16, block_size=8)
    cfg.train = dataclasses.replace(cfg.train, batch_size=2, eval_iters=1)
    for steps in (4, 6):  # one process, twice: only the first resume changes the number of processes
        cfg.train = dataclasses.replace(cfg.train, max_iters=steps)
        train(cfg, resume=True, progress=False)
        assert ("where the checkpoint was written by 2" in capsys.readouterr().out) == (steps == 4)
        state = ckpt.load_state(ckpt.find_checkpoint(out))
        assert state["processes"] == 1 and [s["rank"] for s in state["loader"]] == [0, 1] and len(state["rng"]) == 2
        assert state["loader"][1]["batches_drawn"] == first[1]["batches_drawn"] == 2  # rank 1's, as it left it
        assert torch.equal(state["loader"][1]["generator_state"], first[1]["generator_state"])
    proc = subprocess.run([*two, "--train.max-iters", "8", "--resume"], env=_torchrun_env(tmp_path),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1 takes up the batch streams that earlier processes of those ranks left" in proc.stdout
    assert ckpt.load_state(ckpt.find_checkpoint(out))["loader"][1]["batches_drawn"] == 4  # 2, then steps 7 and 8


def _torchrun_workers(out: Path) -> dict[int, int]:
    """{rank: pid} of the torchrun workers training into `out` (found through /proc)."""
    workers = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = environ.read_bytes().split(b"\0")
            cmdline = Path(environ.parent, "cmdline").read_bytes()
        except OSError:
            continue
        if any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env) and str(out).encode() in cmdline:
            rank = next(int(e[5:]) for e in env if e.startswith(b"RANK="))
            workers[rank] = int(environ.parent.name)
    return workers


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc (Linux)")
def test_ctrl_c_seen_by_one_ddp_rank_stops_all_of_them_with_a_checkpoint(corpus, tmp_path):
    """The signal reaches the ranks at different moments (here: only rank 1 gets it). A rank that stopped alone
    would wait in a collective that the others never join: the run hung and saved nothing."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(_torchrun_train(corpus, out, tmp_path, "--train.max-iters", "100000",
                                            "--train.eval-interval", "100000", "--train.checkpoint-interval",
                                            "100000"), env=_torchrun_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    workers: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 180
        while not ((out / "metrics.jsonl").is_file() and len(read_rows(out)) >= 5):  # training, past step 1
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        workers = _torchrun_workers(out)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)  # before the fix: no end (rank 0 trained on, rank 1 waited)
    finally:
        if proc.poll() is None:  # the workers run in sessions of their own: kill them, then torchrun
            for pid in workers.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.communicate()
    state = ckpt.load_state(ckpt.find_checkpoint(out))
    assert state["step"] >= 2 and len(state["loader"]) == 2  # both ranks saved the step they stopped at
    assert f"interrupted at step {state['step']}; checkpoint saved" in stderr


def test_a_missing_logger_package_is_refused_before_the_run_folder_is_written(corpus, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    with pytest.raises(FunGPTError, match=r"train.wandb needs the wandb package: pip install wandb, or pass "
                                          r"--train.no-wandb to train without it$"):  # (a resume's may be its config's)
        train(tiny_config(corpus, out, max_iters=2, wandb=True), progress=False)
    assert not out.exists()  # so the same command without wandb needs no --overwrite
    from fungpt.plan import dry_run  # (what training refuses, the dry run refuses: it said "dry run done")

    with pytest.raises(FunGPTError, match="train.wandb needs the wandb package"):
        dry_run(tiny_config(corpus, out, max_iters=2, wandb=True), out=lambda line: None)


def test_wandb_gets_the_eval_rows_under_eval(corpus, tmp_path, monkeypatch):
    """wandb merges two logs at one step: the eval row's train_loss (an estimate over eval_iters batches) replaced
    the step's own at every eval step. Its keys go under eval/, as TensorBoard's do."""
    import sys
    import types

    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=lambda row, step: logged.append((step, row)), finish=lambda **kw: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(sys.modules["fungpt.train"], "check_loggers", lambda tc: None)
    train(tiny_config(corpus, tmp_path / "run", max_iters=4, eval_interval=2, wandb=True), progress=False)
    at_two = [row for step, row in logged if step == 2]
    assert len(at_two) == 2 and "train_loss" in at_two[0] and "val_loss" not in at_two[0]
    assert "eval/val_loss" in at_two[1] and "eval/train_loss" in at_two[1] and "train_loss" not in at_two[1]


def test_tensorboard_events_are_written(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=4, eval_interval=2, tensorboard=True), progress=False)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train_loss", "eval/val_loss", "eval/train_loss", "lr"} <= set(scalars)
    assert [e.step for e in acc.Scalars("lr")] == [1, 2, 3, 4]
    # one kind of number per curve: the eval rows' estimates were logged under train_loss too (two points a step)
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [0, 2, 4]


@pytest.mark.parametrize("fails_at", [3, 10_000])
def test_tensorboard_on_a_full_disk_is_one_line_naming_its_folder(corpus, tmp_path, capfd, monkeypatch, fails_at):
    """TensorBoard's writer thread printed its traceback, and the next call raised an OSError that named no file (said
    as "most likely this command's output"); a rewrite on resume lost its last events, then deleted the originals.
    fails_at: the write that meets the full disk (10,000: none while training, the first in the resume's rewrite)."""
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer.record_writer import RecordWriter

    out, real, calls = tmp_path / "run", RecordWriter.write, []

    def write(self, data):
        calls.append(1)
        if len(calls) >= fails_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(RecordWriter, "write", write)
    if fails_at < 10_000:  # while training: at the run's first events
        with pytest.raises(FunGPTError, match=rf"could not write {re.escape(str(out / 'tensorboard'))}: No space "
                                              r"left on device; no checkpoint was saved yet"):
            train(tiny_config(corpus, out, max_iters=4, eval_interval=2, tensorboard=True), progress=False)
        assert "Traceback" not in capfd.readouterr().err
        return
    train(tiny_config(corpus, out, max_iters=4, eval_interval=2, tensorboard=True), progress=False)
    (old,) = (out / "tensorboard").iterdir()
    before = old.read_bytes()
    calls[:] = [1] * (fails_at - 3)  # the rewrite for a resume from step 2 fails at its third event
    with pytest.raises(FunGPTError, match=r"could not rewrite the TensorBoard events in .* \(kept as they were\): No "
                                          r"space left on device; free some disk space, then resume again"):
        from fungpt.metrics import trim_tensorboard
        trim_tensorboard(out / "tensorboard", 2)
    assert [p.name for p in (out / "tensorboard").iterdir()] == [old.name] and old.read_bytes() == before


def test_a_tensorboard_flush_that_fails_at_the_end_still_stops_its_writer(corpus, tmp_path, monkeypatch):
    """The last events meeting a full disk at close: said in one line, and the writer's thread stopped all the same
    (a failed flush skipped the close, and a notebook kept a thread per run)."""
    pytest.importorskip("tensorboard")
    import threading

    from fungpt.metrics import MetricsLog

    before = threading.active_count()
    cfg = tiny_config(corpus, tmp_path / "run", tensorboard=True)
    (tmp_path / "run").mkdir()
    log = MetricsLog(tmp_path / "run", cfg, keep_until_step=None)
    log.write({"step": 1, "train_loss": 3.0})

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log.tb, "flush", full)
    with pytest.raises(FunGPTError, match=r"could not write .*tensorboard: No space left on device"):
        log.close()
    assert threading.active_count() == before


def test_a_failed_run_stops_its_tensorboard_writer(corpus, tmp_path):
    """A train() that failed (here: diverged) left TensorBoard's writer thread running and metrics.jsonl open:
    a notebook that tried lr values in a loop gained a thread per failed run."""
    pytest.importorskip("tensorboard")
    import threading

    before = threading.active_count()
    for i in range(3):
        with pytest.raises(FunGPTError, match="diverged"):
            train(tiny_config(corpus, tmp_path / f"run{i}", lr=1e30, tensorboard=True), progress=False)
    assert threading.active_count() == before


_WAIT_AFTER_STEP_25 = """
import os, sys, time
import fungpt.cli
from fungpt.data import BatchLoader
real_next, calls, go = BatchLoader.next_batch, [], sys.argv[1]
def next_batch(self):  # after step 25 the run waits (30 s at most) for the test to have read the step-20 line
    if self.split == "train" and self.batch_size == 2:
        calls.append(1)
        if len(calls) == 26:
            waited = time.time()
            while not os.path.exists(go):
                if time.time() - waited > 30:
                    open(go + ".timed-out", "w").close()
                    break
                time.sleep(0.05)
    return real_next(self)
BatchLoader.next_batch = next_batch
sys.argv[1:] = sys.argv[2:]
fungpt.cli.entry()
"""


def test_lines_reach_a_pipe_as_they_are_printed(corpus, tmp_path):
    """Into a pipe (`| tee log`) Python buffers stdout in blocks: the eval lines of a run arrived when it ended, or
    were lost when it was killed."""
    script, go = tmp_path / "wait.py", tmp_path / "go"
    script.write_text(_WAIT_AFTER_STEP_25)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(script), str(go), "train", "--data.path", str(corpus), "--out-dir",
           str(tmp_path / "run"), "--model.n-layer", "1", "--model.n-head", "2", "--model.n-embd", "16",
           "--model.block-size", "8", "--train.batch-size", "2", "--train.eval-iters", "1", "--train.eval-interval",
           "20", "--train.max-iters", "30", "--train.device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 20: train loss"):
                go.touch()
                break
        assert not Path(f"{go}.timed-out").exists(), lines  # the line came while the run waited for it
    finally:
        proc.kill()
        proc.wait()


def test_output_into_a_pipe_is_utf8_whatever_the_locale(tiny_run, tmp_path):
    """Windows writes pipes and files in its ANSI code page (cp1252, simulated here by PYTHONIOENCODING): the '␣'
    of --show-probs, or a run folder named Łukasz, raised UnicodeEncodeError and a traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "cp1252"}
    proc = subprocess.run([sys.executable, "-m", "fungpt", "sample", "--run", str(tiny_run), "--show-probs",
                           "--max-new-tokens", "3", "--prompt", "The cat"], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    assert "␣" in proc.stdout.decode("utf-8")  # (the space token, as --show-probs shows it)


def test_a_non_utf8_folder_name_is_printed_as_its_bytes(corpus, tmp_path):
    """Under a C locale or UTF-8 mode, Python writes a file name's bytes that are not UTF-8 back as they were
    (surrogateescape): the printed path must stay one that works, not caf\\udce9."""
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUTF8": "1"}
    env.pop("PYTHONIOENCODING", None)
    proc = subprocess.run([sys.executable, "-m", "fungpt", "prepare", "--input", str(corpus), "--out", out],
                          env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert b"/caf\xe9" in proc.stdout and b"udce9" not in proc.stdout, proc.stdout


def test_a_run_in_a_folder_whose_name_is_not_utf8_loads_again(corpus, tmp_path):
    """Training wrote the run, but safetensors and tokenizers open UTF-8 paths only: every later command (sample,
    eval, resume, serve) failed with "not a valid safetensors file", and the BPE tokenizer did not load."""
    pytest.importorskip("fastapi")
    from fungpt.serve import create_app

    top = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/lat\xe9"))  # (bytes of a Latin-1 folder name)
    out = top / "run"
    cfg = tiny_config(corpus, out, max_iters=2)
    train(dataclasses.replace(cfg, data=DataConfig(path=str(corpus), tokenizer="bpe", vocab_size=300)),
          progress=False)
    assert load_run_folder(out, device="cpu").tokenizer.vocab_size > 0
    assert evaluate_run(out)["loss"] > 0
    httpx = pytest.importorskip("httpx")
    from fungpt.serve import running_server

    with running_server(create_app(out, device="cpu")) as base:  # (its name and config.json: answered as UTF-8)
        info = httpx.get(f"{base}/api/info", timeout=60)
    assert info.status_code == 200 and info.json()["config"]["out_dir"].endswith("lat\ufffd/run")
    # a config far larger than its weights is still refused before the model is built (the header read by FunGPT)
    folder = ckpt.find_checkpoint(out)
    with pytest.raises(FunGPTError, match="do not fit the model"):
        ckpt.check_weights_before_building(folder, GPTConfig(vocab_size=300, n_layer=8, n_head=8, n_embd=1024),
                                           out / "config.json")
    # exported there, its shapes read alone (not the whole file), and its tokenizer saved again by a fine-tune
    from fungpt.hf import _read_safetensors
    from fungpt.pretrained import export_hf
    from fungpt.tokenizer import HFTokenizer

    export_hf(out, top / "hf")
    vocab = load_run_folder(out, device="cpu").tokenizer.vocab_size  # (a BPE of this small text: under 300)
    shapes = _read_safetensors(top / "hf" / "model.safetensors", meta=True)
    assert shapes["transformer.wte.weight"].shape == (vocab, 32) and shapes["transformer.wte.weight"].is_meta
    HFTokenizer.from_dir(top / "hf").save(tmp_path / "saved")  # (its source, a path, written as UTF-8)
    assert load_tokenizer(tmp_path / "saved").vocab_size == vocab


def test_the_safetensors_header_is_read_as_the_library_reads_it(tmp_path):
    """FunGPT reads a header itself where the library cannot open the path (not UTF-8): it took damaged files the
    library refuses (a shape its bytes do not hold, a length past the file, bytes past the numbers), and then blamed
    the config for the damage."""
    import json
    import struct

    from safetensors import safe_open
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16), "c": torch.zeros(0)}, str(good),
              metadata={"format": "pt"})
    with safe_open(str(good), "pt") as f:
        library = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert {k: shape for k, (_, shape) in ckpt.safetensors_header(good).items()} == library
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])

    def damaged(name, edit=None, body=None):
        h = json.loads(json.dumps(header))
        if edit:
            edit(h)
        text = json.dumps(h).encode()
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", len(text)) + text + (raw[8 + n:] if body is None else body))
        return path

    cases = [damaged("shape", lambda h: h["a"].update(shape=[100])),  # more numbers than its bytes
             damaged("negative", lambda h: h["a"].update(shape=[-2, -3])),
             damaged("dtype", lambda h: h["a"].update(dtype="XX")),
             damaged("offsets", lambda h: h["a"].update(data_offsets=["0", "24"])),
             damaged("metadata", lambda h: h["__metadata__"].update(format=1)),
             damaged("extra", body=raw[8 + n:] + b"\0"),  # bytes past the numbers
             damaged("cut", body=raw[8 + n:-1])]
    long_length = tmp_path / "length.safetensors"
    long_length.write_bytes(struct.pack("<Q", 10**6) + raw[8:])
    for path in [*cases, long_length]:
        with pytest.raises(Exception):  # noqa: B017 - the library's own error type
            with safe_open(str(path), "pt") as f:
                list(f.keys())
        with pytest.raises(ValueError):
            ckpt.safetensors_header(path)


def test_a_utf16_config_file_is_named_as_such(tmp_path):
    """A TOML file written by PowerShell 5's `>` (UTF-16) was told "not UTF-8 text (byte 0)", where text files,
    prompts and JSON files name UTF-16."""
    toml = tmp_path / "cfg.toml"
    toml.write_bytes("[train]\nmax_iters = 10\n".encode("utf-16"))  # (with its byte-order mark, as PowerShell)
    with pytest.raises(FunGPTError, match=r"config file .*cfg.toml is UTF-16 text \(it starts with UTF-16's "
                                          r"byte-order mark\), not UTF-8: convert it to UTF-8"):
        load_config(toml)


def test_a_terminal_that_cannot_show_a_character_gets_an_escape_and_a_path_its_bytes():
    """Under LC_ALL=C with UTF-8 mode and locale coercion off, a terminal is ASCII with surrogateescape: a sampled
    'ß' raised UnicodeEncodeError mid-sample, and stderr printed a path's byte as \\udce9."""
    import codecs

    from fungpt.cli import escape_unencodable

    codecs.register_error("fungpt-escape", escape_unencodable)
    assert "caf\udce9 \u00df \u2423".encode("ascii", "fungpt-escape") == b"caf\xe9 \\xdf \\u2423"
    assert "caf\udce9 \u00df".encode("utf-8", "fungpt-escape") == b"caf\xe9 \xc3\x9f"  # (into a file or pipe)


def test_the_progress_bar_redraws_rarely_into_a_file_or_a_pipe_only(tmp_path):
    """Into a log each redraw stays (a 26 s run left one line of 29,526 characters); a terminal or a notebook's
    stream (no file behind it) keeps redrawing as usual."""
    import io

    from fungpt.data import into_file

    with open(tmp_path / "log", "w") as f:
        assert into_file(f)
    read, write = os.pipe()
    with os.fdopen(read) as r, os.fdopen(write, "w") as w:
        assert into_file(w) and into_file(r)
    assert not into_file(io.StringIO())


def _event_steps(folder, tag):
    """The steps of a tag's events in a TensorBoard folder as written (no purge applied), file by file in name order."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    return [e.step for path in sorted(folder.glob("events.out.tfevents.*"))
            for e in LegacyEventFileLoader(str(path)).Load() for v in e.summary.value if v.tag == tag]


def test_a_resume_drops_the_train_events_of_a_last_step_that_log_interval_skips(tmp_path):
    """A command that ends on a step log_interval does not log (a signal, max_iters) logs it anyway, so that the
    curve reaches it; resumed from there, the point stayed, one the same run uninterrupted has not (nor has its
    metrics.jsonl now). Its eval stays."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from fungpt.metrics import trim_tensorboard

    with SummaryWriter(str(tmp_path)) as w:
        for step in (1, 4, 6):
            w.add_scalar("lr", 0.1, step)
        w.add_scalar("eval/val_loss", 3.0, 6)
    trim_tensorboard(tmp_path, 6, stray=True)
    assert (_event_steps(tmp_path, "lr"), _event_steps(tmp_path, "eval/val_loss")) == ([1, 4], [6])


def test_a_resumed_run_drops_the_tensorboard_events_after_its_checkpoint(corpus, tmp_path):
    """A run killed after its checkpoint had logged steps that it logs again when resumed. A purge marker hid them from
    TensorBoard's Python loader only: its default (Rust) data server showed both, and a resume with tensorboard off
    (then on) kept them. The events are now rewritten, as metrics.jsonl's rows are; `tokens` is logged too."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from fungpt.metrics import trim_tensorboard

    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=4, eval_interval=2, tensorboard=True), progress=False)
    with SummaryWriter(str(out / "tensorboard")) as killed:  # what a command killed after its step-4 checkpoint logged
        for step in (5, 6, 7):
            killed.add_scalar("lr", 0.5, step)
    assert _event_steps(out / "tensorboard", "lr") == [1, 2, 3, 4, 5, 6, 7]
    (out / "tensorboard" / ".fungpt-trim").mkdir()  # what a rewrite killed midway left: not in place, removed
    (out / "tensorboard" / ".fungpt-trim" / "events.out.tfevents.1.host.fungpt").write_bytes(b"\x00" * 7)
    train(tiny_config(corpus, out, max_iters=6, eval_interval=2), resume=True, progress=False)  # tensorboard off
    assert _event_steps(out / "tensorboard", "lr") == [1, 2, 3, 4]
    assert not (out / "tensorboard" / ".fungpt-trim").exists()
    files = sorted((p.name, p.stat().st_ino) for p in (out / "tensorboard").iterdir())
    trim_tensorboard(out / "tensorboard", 4)  # nothing after step 4 now: not rewritten again (the marker drops nothing)
    assert sorted((p.name, p.stat().st_ino) for p in (out / "tensorboard").iterdir()) == files
    train(tiny_config(corpus, out, max_iters=8, eval_interval=2, tensorboard=True), resume=True, progress=False)
    assert _event_steps(out / "tensorboard", "lr") == [1, 2, 3, 4, 7, 8]  # (5 and 6 were trained with it off)
    # the rewritten file comes first in the order TensorBoard reads (names): "!" before the next writer's counter,
    # whatever it has counted to in this process (10 sorted before 9)
    assert sorted(p.name for p in (out / "tensorboard").iterdir())[0].endswith(".!fungpt")
    assert _event_steps(out / "tensorboard", "tokens") == [1, 2, 3, 4, 7, 8]
    # an older FunGPT's purge marker (SummaryWriter's purge_step: "steps from 8 are logged again") is applied as
    # TensorBoard's Python loader applies it, then dropped
    with SummaryWriter(str(tmp_path / "older"), purge_step=8) as older:
        older.add_scalar("lr", 0.25, 8)
    # (named to sort after the last writer's file, as one written later does: in the same second, the writers'
    # counters decided, "10" before "9", and the marker came first)
    (older_file,) = (tmp_path / "older").iterdir()
    older_file.rename(out / "tensorboard" / "events.out.tfevents.9999999999.host.older")
    assert _event_steps(out / "tensorboard", "eval/val_loss") == [0, 2, 4, 8]
    train(tiny_config(corpus, out, max_iters=10, eval_interval=2), resume=True, progress=False)
    assert _event_steps(out / "tensorboard", "lr") == [1, 2, 3, 4, 7, 8]
    assert _event_steps(out / "tensorboard", "eval/val_loss") == [0, 2, 4]  # (step 8's, before the marker)
    # killed before its first checkpoint: the resume starts from step 0, and so do the events
    shutil.rmtree(out / "checkpoints")
    for name in ("latest.json", "best.json"):
        (out / name).unlink()
    train(tiny_config(corpus, out, max_iters=2, eval_interval=2, tensorboard=True), resume=True, progress=False)
    assert _event_steps(out / "tensorboard", "lr") == [1, 2]


def test_wandb_that_cannot_start_is_one_clear_line(corpus, tmp_path, monkeypatch):
    """No API key, or no network (after its retries): wandb's own traceback."""
    import types

    def init(**kwargs):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    import importlib.machinery

    fake = types.ModuleType("wandb")
    fake.__spec__, fake.init = importlib.machinery.ModuleSpec("wandb", None), init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(FunGPTError, match=r"train.wandb could not start wandb \(No API key configured\. .*\): run "
                                          r"`wandb login`, or set WANDB_MODE=offline"):
        train(tiny_config(corpus, tmp_path / "run", max_iters=2, wandb=True), progress=False)


def test_the_custom_corpus_preset_trains_chars_given_the_char_tokenizer(tmp_path, monkeypatch, corpus, capsys):
    """The preset's comment offers "char" as its second choice; given on the command line, its vocab_size (for its
    bpe tokenizer) was refused until --data.vocab-size None was given too. Given on the command line itself, a
    vocab_size still is."""
    from fungpt.cli import main

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    tiny = ["--model.n-layer", "1", "--model.n-head", "1", "--model.n-embd", "16", "--model.block-size", "8",
            "--train.max-iters", "1", "--train.eval-iters", "1", "--train.batch-size", "2"]
    argv = ["train", "--config", "custom-corpus", "--data.path", str(corpus), "--data.tokenizer", "char", *tiny]
    assert main([*argv, "--out-dir", str(tmp_path / "run")]) == 0
    assert ("fungpt: note: custom-corpus's data.vocab_size = 4096 is for its bpe tokenizer: not used with "
            "--data.tokenizer char\n") in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["tokenizer"] == "char"
    assert main([*argv, "--out-dir", str(tmp_path / "run2"), "--data.vocab-size", "100"]) == 2
    assert ("data.vocab_size = 100 only applies to the bpe tokenizer, not 'char': leave it out (or pass "
            "--data.vocab-size None over a config file's)") in capsys.readouterr().err  # (it named a config file)


def test_examples_run(tmp_path, monkeypatch, corpus):
    """The custom-corpus example runs end to end on a tiny corpus (a few steps), kept in data/poems: it prepared
    into data/poems, the corpus's own folder, and stopped with advice to use an --out it did not have."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "poems").mkdir(parents=True)
    shutil.copy(corpus, tmp_path / "data" / "poems" / "a.txt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_corpus.py"), "data/poems", "--chars",
                           "--iters", "3"], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bits/byte" in proc.stdout
    assert (tmp_path / "data" / "poems-char" / "meta.json").is_file()
    # again, the corpus spelled another way: its own dataset and run are replaced (the dataset was refused as
    # "prepared otherwise")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_corpus.py"), "./data/poems/", "--chars",
                           "--iters", "2"], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "poems" / "config.json").read_text())["train"]["max_iters"] == 2
    # a run trained otherwise in out/poems (here: another model, on the script's data) is never replaced (it
    # was, without a word: overwrite=True)
    config = json.loads((tmp_path / "out" / "poems" / "config.json").read_text())
    config["model"]["n_layer"] = 1
    (tmp_path / "out" / "poems" / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_corpus.py"), "data/poems", "--chars",
                           "--iters", "3"], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 1 and "out/poems holds another training run" in proc.stderr, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "poems" / "config.json").read_text())["model"]["n_layer"] == 1
    shutil.rmtree(tmp_path / "out" / "poems")
    # a dataset the user prepared there with other settings is not replaced without a word
    from fungpt.data import load_meta, prepare

    prepare(tmp_path / "data" / "poems", tmp_path / "data" / "poems-char", val_fraction=0.2, overwrite=True,
            progress=False)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_corpus.py"), "data/poems", "--chars",
                           "--iters", "3"], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 1 and "pass --out to prepare into another folder" in proc.stderr
    assert load_meta(tmp_path / "data" / "poems-char")["val_fraction"] == 0.2
    # a corpus too small for the block size: the advice names the script's flag (the library's named
    # --model.block-size, which the script refuses)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_corpus.py"), "data/poems", "--chars",
                           "--block-size", "100000", "--out", "data/big", "--run-dir", "out/big"], env=env,
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 1 and re.search(r"error: the val split of data/poems has \d+ tokens, too few for "
                                              r"--block-size 100000: pass --block-size \d+ or less, or more text",
                                              proc.stderr), proc.stderr[-2000:]


def test_a_run_that_goes_over_its_text_many_times_is_told_so(corpus, tmp_path, capsys):
    """A preset's 3,000 steps on a 30 KB corpus went over it ~850 times without a word: the model learns it by
    heart. Said when training starts; not under a time budget (which decides the steps), nor for a few passes."""
    from fungpt.train import MANY_PASSES, passes_note

    tc = TrainConfig(max_iters=3000, batch_size=16)
    assert passes_note(tc, 2048, 7234) == (
        "fungpt: note: 3,000 steps of 2,048 tokens go over the 7,234 train tokens about 849 times: the model will "
        "likely learn them by heart, and its val loss rise again after its best (checkpoints/best keeps that step); "
        "fewer steps (train.max_iters) or more text avoid it")
    assert passes_note(tc, 2048, 3000 * 2048 // MANY_PASSES) is None  # (just at the limit)
    assert passes_note(dataclasses.replace(tc, max_minutes=1.0), 2048, 7234) is None
    small = tmp_path / "small.txt"
    small.write_text("the cat sat on the mat. " * 9, encoding="utf-8")  # 216 characters: ~194 train tokens
    train(tiny_config(small, tmp_path / "run", max_iters=10, batch_size=64, eval_interval=10), progress=False)
    assert "fungpt: note: 10 steps of 1,024 tokens go over the " in capsys.readouterr().out


def test_help_before_a_command_is_that_commands_help(capsys):
    """`fungpt --help train` showed the list of commands, not train's options."""
    assert main(["--help", "train"]) == 0
    assert capsys.readouterr().out.startswith("usage: fungpt train")


def test_every_commands_usage_names_what_its_positional_argument_is(capsys):
    """`fungpt inspect --help` showed its argument as STR, where the other commands show RUN."""
    from fungpt.cli import COMMANDS

    for name in COMMANDS:
        assert main([name, "--help"]) == 0
        usage = capsys.readouterr().out.splitlines()[0]
        assert usage.startswith(f"usage: fungpt {name} [-h]"), usage
        assert "STR" not in usage.replace("--out STR", "").split(), usage


def test_a_relative_data_path_beside_the_config_is_named(tmp_path, monkeypatch, capsys):
    """A config copied next to its corpus (path = "poems.txt") and run from elsewhere: "does not exist", with no
    word that a relative path is read from the current folder."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "poems.txt").write_text("hello there\n" * 50, encoding="utf-8")
    (tmp_path / "proj" / "poems.toml").write_text('[data]\npath = "poems.txt"\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "proj/poems.toml", "--dry-run"]) == 2
    assert capsys.readouterr().err == (f"error: data.path 'poems.txt' does not exist in the current folder ({tmp_path})"
                                       f", from which a relative path is read; it is beside the config: set data.path "
                                       f"to 'proj/poems.txt', or run from 'proj'\n")
    # a path into a folder beside the config: run from the config's folder (it said the data's, where the path
    # does not lead either)
    (tmp_path / "proj" / "data").mkdir()
    (tmp_path / "proj" / "poems.txt").rename(tmp_path / "proj" / "data" / "poems.txt")
    (tmp_path / "proj" / "poems.toml").write_text('[data]\npath = "data/poems.txt"\n', encoding="utf-8")
    assert main(["train", "--config", "proj/poems.toml", "--dry-run"]) == 2
    assert capsys.readouterr().err.endswith("set data.path to 'proj/data/poems.txt', or run from 'proj'\n")


def test_the_examples_never_train_over_another_run_or_into_the_folder_above(tmp_path, monkeypatch, corpus, capsys):
    """finetune_gpt2.py --out replaced any run there without a word (overwrite=True); custom_corpus.py .. trained
    into out/.., the current folder, which lies in the corpus it then read again."""
    import runpy

    import fungpt

    train(tiny_config(corpus, tmp_path / "mine", max_iters=1), progress=False)
    trained = []

    def record(cfg, **kwargs):
        trained.append(cfg.out_dir)
        return {"out_dir": cfg.out_dir, "interrupted": True, "signal": 15}

    monkeypatch.setattr(fungpt, "train", record)
    monkeypatch.setattr(sys, "argv", ["finetune_gpt2.py", "--init-from", str(tmp_path / "hf"), "--out",
                                      str(tmp_path / "mine")])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "examples" / "finetune_gpt2.py"), run_name="__main__")
    assert stop.value.code == f"error: {tmp_path / 'mine'} holds another training run, which this script would " \
                              f"replace: pass --out to fine-tune into another folder" and not trained
    (tmp_path / "texts" / "work").mkdir(parents=True)
    shutil.copy(corpus, tmp_path / "texts" / "poems.txt")
    monkeypatch.chdir(tmp_path / "texts" / "work")
    monkeypatch.setattr(sys, "argv", ["custom_corpus.py", "..", "--chars", "--block-size", "16", "--out",
                                      str(tmp_path / "prepared")])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "examples" / "custom_corpus.py"), run_name="__main__")
    assert stop.value.code == 143 and trained == ["out/corpus"]


@pytest.mark.parametrize("script, argv", [
    ("examples/shakespeare_char.py", []), ("examples/custom_corpus.py", ["poems.txt"]),
    ("examples/finetune_gpt2.py", []), ("docs/make_figures.py", []),
])
def test_scripts_refuse_a_mistyped_flag_before_training(script, argv, monkeypatch, tmp_path, capsys):
    """`--quik` (or --help) must not start a run, which would replace the script's previous run folder."""
    import runpy

    import fungpt

    monkeypatch.setattr(fungpt, "train", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(sys.modules["fungpt.train"], "train", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *argv, "--quik"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert stop.value.code == 2 and "unrecognized arguments: --quik" in capsys.readouterr().err


@pytest.mark.parametrize("script, argv", [
    ("examples/shakespeare_char.py", ["--quick"]),
    ("examples/custom_corpus.py", ["{corpus}", "--chars"]),
    ("examples/finetune_gpt2.py", ["--init-from", "{tmp}/nowhere"]),
    ("docs/make_figures.py", ["--out", "{tmp}/figures"]),
])
def test_scripts_stop_when_their_training_is_interrupted(script, argv, tmp_path, monkeypatch, corpus, capsys):
    """Ctrl-C (or SIGTERM) ends train() early with result["interrupted"]: the examples went on to report a final
    loss and a sample, and make_figures drew a half-trained model under titles saying it had finished (over the
    committed figures)."""
    import runpy

    import fungpt

    def interrupted(cfg, **kwargs):
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        return {"out_dir": cfg.out_dir, "step": 3, "train_loss": 2.0, "val_loss": 2.1, "interrupted": True,
                "signal": 15, "elapsed_s": 1.0}

    monkeypatch.setattr(fungpt, "train", interrupted)  # what the examples import
    monkeypatch.setattr(sys.modules["fungpt.train"], "train", interrupted)  # what make_figures imports
    monkeypatch.setattr(fungpt, "sample", lambda *a, **k: pytest.fail("sampled an interrupted run"))
    monkeypatch.chdir(tmp_path)
    args = [a.format(corpus=corpus, tmp=tmp_path) for a in argv]
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert stop.value.code == 143 if script.startswith("examples") else "interrupted" in str(stop.value.code)
    assert "val loss" not in capsys.readouterr().out
    assert not (tmp_path / "figures").exists() or not any((tmp_path / "figures").iterdir())


def test_an_interrupted_run_returns_the_losses_of_the_step_it_stopped_at(corpus, tmp_path, monkeypatch):
    """train() interrupted at step 5 returned step 0's eval losses (about ln(vocab)) as its train and val loss,
    with nothing saying how old they were."""
    ctrl_c_during_step(monkeypatch, 5)
    out = tmp_path / "run"
    result = train(tiny_config(corpus, out, max_iters=50, eval_interval=100, checkpoint_interval=100), progress=False)
    assert result["interrupted"] and result["step"] == 5
    last = [r for r in read_rows(out) if "train_loss" in r and "val_loss" not in r][-1]
    assert last["step"] == 5 and result["train_loss"] == pytest.approx(last["train_loss"])  # the last step's
    assert math.isnan(result["val_loss"])  # (no eval at step 5)


def test_eval_refuses_a_data_folder_prepared_again_with_another_tokenizer(corpus, tmp_path):
    """Re-preparing the run's data folder from an edited corpus renumbers the characters: the val loss
    would be computed on ids that mean other text (silently wrong), or crash on ids past the vocabulary."""
    from fungpt.data import prepare
    from fungpt.runs import data_dir_of

    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    data_dir = data_dir_of(out)
    before = evaluate_run(out)["loss"]
    edited = tmp_path / "edited.txt"
    edited.write_text(corpus.read_text().replace("w", "z"), encoding="utf-8")  # same size, ids shifted
    prepare(edited, data_dir, "char", overwrite=True, progress=False)
    with pytest.raises(FunGPTError, match=r"prepared again .*id \d+ is .*pass --input"):
        evaluate_run(out)
    prepare(edited, data_dir, "bpe", vocab_size=300, overwrite=True, progress=False)
    with pytest.raises(FunGPTError, match="prepared again .*bpe tokenizer"):
        evaluate_run(out)
    prepare(corpus, data_dir, "char", overwrite=True, progress=False)  # the original data again: accepted
    assert evaluate_run(out)["loss"] == before and "prepared again" not in evaluate_run(out)["note"]
    # split again (the same tokenizer): scored without a word, though val now held text the run trained on
    prepare(corpus, data_dir, "char", val_fraction=0.5, overwrite=True, progress=False)
    assert re.fullmatch(r"fungpt: note: .* was prepared again since step 2 \(its text's sha256, or how it is split, "
                        r"differs .*\): its val split may hold text the run trained on, and this loss does not "
                        r"compare with the run's val losses", evaluate_run(out)["note"])


def test_eval_prepares_the_text_again_when_the_cache_was_cleared(corpus, tmp_path, capsys):
    """The README lets the cache's datasets be deleted to free the space: eval on the val split then refused ("the data
    ... is gone") until the data was prepared by hand, though the run's config names its text."""
    from fungpt.runs import data_dir_of

    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    before = evaluate_run(out)
    shutil.rmtree(data_dir_of(out).parent)  # the cache's datasets/ folder
    capsys.readouterr()
    again = evaluate_run(out)
    assert f"is gone (a cleared cache?): preparing {corpus} again into the cache" in capsys.readouterr().err
    assert (again["loss"], again["tokens"], again["note"]) == (before["loss"], before["tokens"], before["note"])
    assert before["note"].startswith("fungpt: note: training logged val loss")  # (see test_end_to_end_...)
    assert [p.name for p in data_dir_of(out).parent.glob("[!.]*")] == [data_dir_of(out).name]  # training's own
    corpus.write_text(corpus.read_text(encoding="utf-8")[::-1], encoding="utf-8")  # other text, same characters
    shutil.rmtree(data_dir_of(out).parent)
    with pytest.raises(FunGPTError, match=r"corpus.txt is not the text .* was trained on \(its sha256, or how it is "
                                          r"split, differs .*\), so its val split is not the run's; pass --input"):
        evaluate_run(out)  # (the checkpoint's fingerprint tells)
    corpus.unlink()
    with pytest.raises(FunGPTError, match=r"is gone, and so is its text .*corpus.txt; pass --input TEXT_FILE"):
        evaluate_run(out)
    # a run on a folder of token ids (data.path names the folder itself): nothing to prepare it from, perhaps
    from fungpt.data import prepare

    (tmp_path / "other.txt").write_text("some other text to learn from. " * 40, encoding="utf-8")
    folder = prepare(tmp_path / "other.txt", tmp_path / "ids", progress=False)
    train(tiny_config(folder, tmp_path / "on-ids", max_iters=1), progress=False)
    shutil.rmtree(folder)
    with pytest.raises(FunGPTError, match=r"ids\) is gone: put it back \(a folder of your own token ids has no "
                                          r"text to make it from\), prepare it again with `fungpt prepare`, or pass"):
        evaluate_run(tmp_path / "on-ids")


def test_a_prompt_file_is_read_up_to_a_bound(tmp_path, monkeypatch):
    """A wrong path (a corpus of gigabytes, a device) was read whole into memory, with no message."""
    import importlib

    sample_module = importlib.import_module("fungpt.sample")
    asked = []

    class Endless(io.BytesIO):  # text without end, as a wrong path can be: only a bounded read ends
        def read(self, n=-1):
            assert n >= 0, "read whole"
            asked.append(n)
            return b"to be or not to be\n" * (n // 19) + b"t" * (n % 19)

    monkeypatch.setattr(sample_module, "open", lambda path, mode="r": Endless(), raising=False)
    with pytest.raises(FunGPTError, match=r"long.txt is over 16 MiB, and the model sees only its last block_size "
                                          r"tokens: pass the end of it \(e.g. `tail -c 100000 "):
        sample(tmp_path / "no-run-needed", prompt_file=tmp_path / "long.txt")  # (refused before the run is loaded)
    assert asked == [16 * 2**20 + 1]
    monkeypatch.undo()
    monkeypatch.setattr(sample_module, "PROMPT_FILE_MAX_BYTES", 64)
    (tmp_path / "just.txt").write_bytes(b"x" * 64)  # exactly the most: taken (then the missing run is named)
    with pytest.raises(FunGPTError, match="no-run-needed does not exist"):
        sample(tmp_path / "no-run-needed", prompt_file=tmp_path / "just.txt")


def test_eval_and_prompt_files_keep_windows_line_endings(tmp_path, monkeypatch):
    """prepare keeps "\r\n" (the \r is a token); eval --input and --prompt-file must read text the same way."""
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"the cat sat on the mat.\r\nthe dog sat on the log.\r\n" * 80)
    out = tmp_path / "run"
    train(tiny_config(crlf, out, max_iters=2), progress=False)
    text = crlf.read_bytes().decode("utf-8")
    assert evaluate_run(out, input=crlf)["tokens"] == len(text) - 1  # every \r scored, none dropped
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"the cat\r\nthe")
    buf = io.StringIO()
    sample(out, prompt_file=prompt, max_new_tokens=3, seed=1, out=buf)
    assert buf.getvalue().startswith("the cat\r\nthe")
    # A byte-order mark (Notepad's) is not text, in eval and prompt files as in the corpus: no unknown character
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + crlf.read_bytes())
    assert evaluate_run(out, input=bom)["tokens"] == len(text) - 1
    prompt.write_bytes(b"\xef\xbb\xbfthe cat")
    buf = io.StringIO()
    sample(out, prompt_file=prompt, max_new_tokens=3, seed=1, out=buf)
    assert buf.getvalue().startswith("the cat")
    # the other way round: a model of \n text given a \r\n file is told to convert it (as the README says)
    lf = tmp_path / "lf.txt"
    lf.write_bytes(crlf.read_bytes().replace(b"\r\n", b"\n"))
    lf_run = tmp_path / "lf_run"
    train(tiny_config(lf, lf_run, max_iters=2), progress=False)
    with pytest.raises(FunGPTError, match=r"character '\\r' \(U\+000D\) at position 23 \(counting from 0\) is not in "
                                          r"this char-level "
                                          r"vocabulary .*; the text has line endings in \\r \(Windows: \\r\\n\): "
                                          r"convert them"):
        evaluate_run(lf_run, input=crlf)


def test_train_on_text_with_bad_utf8_names_a_fix_train_accepts(corpus, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(corpus.read_text(), encoding="utf-8")
    (folder / "b.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 20)  # \xe9 is not UTF-8
    cfg = tiny_config(folder, tmp_path / "run", max_iters=2)
    with pytest.raises(FunGPTError, match=r"b.txt is not valid UTF-8 .*data.errors"):
        train(cfg, progress=False)
    cfg.data = dataclasses.replace(cfg.data, errors="replace")
    assert train(cfg, progress=False)["step"] == 2
    assert "\ufffd" in load_tokenizer(tmp_path / "run").decode(range(load_tokenizer(tmp_path / "run").vocab_size))
    # the run reads its own corpus as it was trained: `fungpt eval --input` on b.txt (it said "convert it to UTF-8")
    res = evaluate_run(tmp_path / "run", input=folder / "b.txt")
    assert res["tokens"] == len((folder / "b.txt").read_bytes().decode("utf-8", errors="replace")) - 1
    with pytest.raises(FunGPTError, match="data.errors"):
        DataConfig(errors="ignore")


def test_eval_of_a_text_that_is_not_utf8_can_replace_its_bytes(corpus, tmp_path, capsys):
    """`fungpt eval --input latin1.txt` on a run trained on UTF-8 said "convert it to UTF-8", with no way past."""
    good = tmp_path / "good.txt"
    good.write_text(corpus.read_text() + "caf\ufffd au lait\n", encoding="utf-8")  # (U+FFFD is in its vocabulary)
    train(tiny_config(good, tmp_path / "run", max_iters=2), progress=False)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 20)
    with pytest.raises(FunGPTError, match=r"latin.txt is not valid UTF-8 .*pass --errors replace to read such bytes"):
        evaluate_run(tmp_path / "run", input=latin)
    replaced = evaluate_run(tmp_path / "run", input=latin, errors="replace")
    assert replaced["tokens"] == len("caf\ufffd au lait\n") * 20 - 1
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run"), "--input", str(latin), "--errors", "replace"]) == 0
    assert f"{latin} at step 2: {len('caf_ au lait_') * 20 - 1} tokens" in capsys.readouterr().out
    with pytest.raises(FunGPTError, match="--errors applies to an --input text file"):
        evaluate_run(tmp_path / "run", errors="replace")
    # a char vocabulary without U+FFFD: replacing cannot help, so the refusal does not send the user there
    train(tiny_config(corpus, tmp_path / "clean", max_iters=2), progress=False)
    with pytest.raises(FunGPTError, match=r"convert it to UTF-8 \(this run's characters do not include U\+FFFD"):
        evaluate_run(tmp_path / "clean", input=latin)
    # and asking to replace names the bad byte too (it said U+FFFD was missing from the vocabulary: remove it)
    with pytest.raises(FunGPTError, match=r"latin.txt is not valid UTF-8 \(bad byte at offset 3\).*cannot help"):
        evaluate_run(tmp_path / "clean", input=latin, errors="replace")


def test_eval_on_a_text_shorter_than_the_context(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    short = tmp_path / "short.txt"
    short.write_text("the cat", encoding="utf-8")  # 7 tokens < block_size 16
    res = evaluate_run(out, input=short)
    assert res["tokens"] == 6 and math.isfinite(res["loss"])
    one = tmp_path / "one.txt"
    one.write_text("t", encoding="utf-8")
    with pytest.raises(FunGPTError, match="too short"):
        evaluate_run(out, input=one)
    two = tmp_path / "two.txt"  # the shortest text that can be scored: one token predicted ("1 tokens" was said)
    two.write_text("th", encoding="utf-8")
    said = io.StringIO()
    sys.modules["fungpt.sample"].print_eval(evaluate_run(out, input=two), said)
    assert f"{two} at step 2: 1 token\n" in said.getvalue()
    with pytest.raises(FunGPTError, match="batch_size 0 must be positive"):
        evaluate_run(out, input=short, batch_size=0)
    with pytest.raises(FunGPTError, match="batch_size 2.5 should be a whole number"):  # (was a raw TypeError)
        evaluate_run(out, input=short, batch_size=2.5)
    with pytest.raises(FunGPTError, match="no --input file was named"):  # (was "--input . is a folder")
        evaluate_run(out, input="")


def test_eval_of_an_empty_val_split_says_it_is_too_short(corpus, tmp_path):
    """An empty val.bin cannot be memory-mapped: numpy's "cannot mmap an empty file" reached the user."""
    from fungpt.runs import data_dir_of

    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    data = data_dir_of(out)
    (data / "val.bin").write_bytes(b"")
    meta = json.loads((data / "meta.json").read_text())
    meta["val_tokens"] = 0
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FunGPTError, match="is too short to evaluate: it needs at least 2 tokens"):
        evaluate_run(out)


def test_eval_of_a_loss_beyond_float_range_gives_an_infinite_perplexity(corpus, tmp_path, monkeypatch):
    """A diverged model with finite weights can score 800 nats a token: math.exp raised OverflowError (a
    traceback) where perplexity is inf; the loss itself is still printed."""
    sample_module = sys.modules["fungpt.sample"]  # (fungpt.sample is the function)

    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    monkeypatch.setattr(sample_module, "score_windows", lambda model, windows: (800.0 * 10, 10))
    res = evaluate_run(out)
    assert res["loss"] == 800.0 and res["perplexity"] == math.inf
    monkeypatch.setattr(sample_module, "score_windows", lambda model, windows: (5.0, 10))
    assert evaluate_run(out)["perplexity"] == pytest.approx(math.exp(0.5))
    monkeypatch.setattr(sample_module, "score_windows", lambda model, windows: (math.nan, 10))
    assert math.isnan(evaluate_run(out)["perplexity"])


def test_eval_shows_its_progress_in_batches(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 20, encoding="utf-8")  # 480 tokens: 479 targets
    quiet = evaluate_run(out, input=text, batch_size=4)
    capsys.readouterr()
    assert evaluate_run(out, input=text, batch_size=4, progress=True) == quiet
    err = capsys.readouterr().err
    assert "eval:" in err and "/8 [" in err  # ceil(479 / 16) = 30 windows of block_size 16, 4 per batch: 8


def test_the_command_exits_fast_with_its_status_and_all_its_output():
    # `python -m fungpt` ends with os._exit (cli.entry): the status and the buffered output must survive it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # keep stdout block-buffered
    ok = subprocess.run([sys.executable, "-m", "fungpt", "--help"], capture_output=True, text=True, timeout=120,
                        env=env)
    assert ok.returncode == 0 and "Run `fungpt COMMAND --help`" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "fungpt", "train", "--train.max-minutes", "-1"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_help_into_a_closed_pipe_and_version(capsys):
    """`fungpt --help | head -0`: the usage was printed before main() handled a closed pipe (a traceback)."""
    proc = subprocess.Popen([sys.executable, "-m", "fungpt", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # the reader is gone before the command (still importing torch) writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert main(["--version"]) == 0 and capsys.readouterr().out == f"fungpt {version}\n"


@pytest.mark.parametrize("argv, expected", [
    (["/venv/bin/python", "/venv/bin/fungpt", "train"], True),  # the console script
    (["C:/v/Scripts/python.exe", "C:/v/Scripts/fungpt.exe", "train"], True),  # Windows: pip's launcher
    (["python", "-m", "fungpt", "train"], True),
    (["python", "-u", "-m", "fungpt", "train"], True),  # as torchrun starts its workers
    (["python", "-mfungpt"], True),
    (["C:/v/Scripts/fungpt.exe", "train"], True),  # the launcher itself as argv[0]
    (["python", "-mpytest", "fungpt"], False),  # -mMODULE for another module
    (["python", "-m", "pytest", "-m", "fungpt"], False),  # a library user (and a marker named fungpt)
    (["python", "script.py", "-m", "fungpt"], False),
    (["python", "-c", "import fungpt"], False),
    ([], False),
    # (an option's value, combined flags, torchrun's workers with the console script: the timing of a budget
    # missed these too, when main() took its start time from this check)
    (["python", "-X", "dev", "-m", "fungpt", "train"], True),
    (["python", "-W", "error", "-m", "fungpt"], True),
    (["python", "-um", "fungpt"], True),
    (["python", "-u", "/venv/bin/fungpt", "train"], True),  # torchrun's worker: `python -u SCRIPT`
    (["python", "-X", "dev", "script.py"], False),
    (["python", "-uc", "import fungpt"], False),
    (["python", "-uX", "dev", "-m", "fungpt"], True),  # (a value after combined flags)
    (["python", "-Xdev", "-Werror", "-bb", "-m", "fungpt"], True),
    (["python", "--check-hash-based-pycs", "always", "-m", "fungpt"], True),
    (["python", "--", "/venv/bin/fungpt"], True),
    (["python", "-"], False),  # (the program from stdin)
])
def test_the_ctrl_c_handler_is_only_for_the_fungpt_command(argv, expected):
    from fungpt._startup import is_the_fungpt_command

    assert is_the_fungpt_command(argv) is expected


def test_the_startup_handler_leaves_an_ignored_ctrl_c_ignored_and_restore_gives_back_pythons(monkeypatch):
    """install() takes over Ctrl-C only from Python's own handler: a command started with SIGINT ignored (a
    background job of a shell without job control) stays deaf to it. restore() gives back KeyboardInterrupt,
    which cli.main() turns into one line, not the OS's default (the process killed with no message)."""
    import signal

    from fungpt import _startup

    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "fungpt", "train"])
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _startup.install()
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _startup.install()  # SIGTERM too: it ended a starting command without a word
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is _startup.quit_at_once
        _startup.restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/PID/maps (Linux)")
@pytest.mark.parametrize("sent, said", [(2, "fungpt: interrupted"), (15, "fungpt: stopped by SIGTERM")])
def test_ctrl_c_while_the_command_imports_torch_is_one_line(tmp_path, sent, said):
    """SIGINT while torch is being imported, before cli.main() runs, is the same one line as later on; SIGTERM too
    (it ended the command without a word)."""
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "fungpt", "train", "--help"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:  # wait until torch's library is being loaded
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.005)
    proc.send_signal(sent)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sent, (out[-500:], err[-2000:])
    assert said in err and "Traceback" not in err


@pytest.mark.parametrize("extra", [0, 7])  # whole windows only; then a tail, scored by one last window
def test_eval_loss_is_the_mean_cross_entropy_over_every_scored_token(tiny_run, tmp_path, extra):
    """The loss `fungpt eval` prints, against the model's own cross-entropy computed here window by window: the
    other eval tests check only that perplexity and bits per byte agree with the loss, whatever it is."""
    import torch.nn.functional as F

    loaded = load_run_folder(tiny_run, device="cpu")
    T = loaded.config.model.block_size
    text = ("The cat quietly sat on the mat, said Ann!\n" * 10)[: 3 * T + 1 + extra]
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    res = evaluate_run(tiny_run, input=path, device="cpu", batch_size=2)  # 2 windows a batch: several batches
    ids = torch.tensor(load_tokenizer(tiny_run).encode(text))
    n = len(ids)
    starts = [0, T, 2 * T] + ([n - 1 - T] if extra else [])
    losses = torch.full((n,), float("nan"))  # losses[j]: predicting token j, by the first window that scores it
    with torch.no_grad():
        for s in starts:
            x, y = ids[s : s + T], ids[s + 1 : s + T + 1]
            per_token = F.cross_entropy(loaded.model(x[None])[0], y, reduction="none")
            fresh = torch.isnan(losses[s + 1 : s + T + 1])
            losses[s + 1 : s + T + 1][fresh] = per_token[fresh]
    assert not torch.isnan(losses[1:]).any()
    assert res["tokens"] == n - 1
    assert res["loss"] == pytest.approx(losses[1:].mean().item(), rel=1e-5)


def test_the_muon_groups_train_at_muon_lr(corpus, tmp_path, monkeypatch):
    """The loop sets each group's lr to lr x lr_scale: Muon's matrices at muon_lr, the rest at lr. Only the
    scale was tested, not that the loop applies it (without it the matrices trained at lr: 20x smaller here)."""
    from fungpt.train import CombinedOptimizer

    seen = []
    real_step = CombinedOptimizer.step

    def step(self, closure=None):
        seen.append([[g["lr"] for g in part.param_groups] for part in self.parts])
        return real_step(self, closure)

    monkeypatch.setattr(CombinedOptimizer, "step", step)
    train(tiny_config(corpus, tmp_path / "run", optimizer="muon", lr=1e-3, muon_lr=0.02, warmup_iters=0,
                      lr_schedule="constant", max_iters=2, eval_interval=100), progress=False)
    adamw, muon = seen[0]
    assert seen[1] == seen[0] and muon == [pytest.approx(0.02)] and adamw == [pytest.approx(1e-3)] * len(adamw)


def test_bits_per_byte_and_char_count_the_text_the_scored_tokens_stand_for(corpus, tmp_path):
    """Every token but the first is scored: the byte count was scaled by the scored fraction of the tokens, as if
    all tokens were of one length (off by 1e-3 on a few kB, and more for bits per character of a BPE run on
    text with multi-byte characters)."""
    from fungpt.tokenizer import load_tokenizer

    out = tmp_path / "run"
    cfg = tiny_config(corpus, out, max_iters=2)
    cfg.data = DataConfig(path=str(corpus), tokenizer="bpe", vocab_size=300)
    train(cfg, progress=False)
    text = "héllo wörld, ça va? 日本 " * 3
    sample_file = tmp_path / "short.txt"
    sample_file.write_text(text, encoding="utf-8")
    res = evaluate_run(out, input=sample_file, device="cpu")
    tok = load_tokenizer(out)
    first = tok.token_bytes(tok.encode(text)[0])
    assert first.decode("utf-8", errors="ignore")  # (the first token is a whole character or more here)
    bits = res["loss"] * res["tokens"] / math.log(2)
    assert res["bits_per_byte"] == pytest.approx(bits / (len(text.encode()) - len(first)), rel=1e-9)
    assert res["bits_per_char"] == pytest.approx(bits / (len(text) - len(first.decode())), rel=1e-9)
    # a first token of one multi-byte character (a BPE trained where "é" is common merges its two bytes): one
    # character, two bytes, left out of the counts
    accents = tmp_path / "accents.txt"
    accents.write_text("été, café, thé à côté de l'épée.\n" * 200, encoding="utf-8")
    cfg = tiny_config(accents, tmp_path / "run2", max_iters=2)
    cfg.data = DataConfig(path=str(accents), tokenizer="bpe", vocab_size=270)
    train(cfg, progress=False)
    sample_file.write_text("été " * 5, encoding="utf-8")
    res = evaluate_run(tmp_path / "run2", input=sample_file, device="cpu")
    tok = load_tokenizer(tmp_path / "run2")
    first = tok.token_bytes(tok.encode("été " * 5)[0])
    assert first.startswith("é".encode()) and len(first.decode()) < len(first)  # (the case this is for)
    bits = res["loss"] * res["tokens"] / math.log(2)
    assert res["bits_per_char"] == pytest.approx(bits / (len("été " * 5) - len(first.decode())), rel=1e-9)


def test_bits_per_byte_of_a_folder_leave_out_the_endoftext_between_its_files(tmp_path, monkeypatch):
    """prepare counted each <|endoftext|> between a folder's files as 13 bytes of text: 4% low on 200 small files.
    Folders prepared before are told apart (meta.json) and eval says their figures are a little low."""
    from fungpt.data import load_meta
    from fungpt.runs import data_dir_of

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = [f"document {i}: the cat sat on the mat, and the dog sat on the log.\n" * 3 for i in range(30)]
    for i, text in enumerate(texts):
        (folder / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    cfg = tiny_config(folder, out, max_iters=2)
    # (eval_full_val: training's val loss is every val token's too, so that eval has no note of its own about it)
    cfg.data, cfg.train.eval_full_val = DataConfig(path=str(folder), tokenizer="bpe", vocab_size=300), True
    train(cfg, progress=False)
    meta_file = data_dir_of(out) / "meta.json"
    meta = load_meta(meta_file.parent)
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(t.encode()) for t in texts)
    res = evaluate_run(out)
    assert res["note"] is None
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "bytes_exclude_eot"}))  # as before
    assert "was prepared by an older FunGPT, which counted each <|endoftext|>" in evaluate_run(out)["note"]
    # Two files of one size: the val split (the last 10%) holds no <|endoftext|>, and its figures were exact
    # already; the note said they were low, and to prepare again, which changed nothing
    for name in ("00.txt", "01.txt"):
        (tmp_path / "two" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "two" / name).write_text("".join(texts[:15]), encoding="utf-8")
    cfg = tiny_config(tmp_path / "two", tmp_path / "run2", max_iters=2)
    cfg.data, cfg.train.eval_full_val = DataConfig(path=str(tmp_path / "two"), tokenizer="bpe", vocab_size=300), True
    train(cfg, progress=False)
    meta_file = data_dir_of(tmp_path / "run2") / "meta.json"
    meta = load_meta(meta_file.parent)
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "bytes_exclude_eot"}))
    assert evaluate_run(tmp_path / "run2")["note"] is None


def test_a_folder_of_gpt2_ids_trains_without_tiktoken_and_sampling_says_what_it_needs(tmp_path, monkeypatch):
    """README, "Data of your own token ids" with {"kind": "gpt2"}: training needs the vocabulary's size, not
    tiktoken's files (which need the network once); decoding a sample does need them, and says so."""
    import numpy as np

    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` fails: as offline as it gets
    folder = tmp_path / "ids"
    folder.mkdir()
    ids = (np.arange(3000) * 7919 % 50257).astype(np.uint16)  # ids all over GPT-2's vocabulary
    ids[:2700].tofile(folder / "train.bin")
    ids[2700:].tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"format_version": 1, "tokenizer": "gpt2", "vocab_size": 50257,
                                                  "eot_id": 50256, "dtype": "uint16", "train_tokens": 2700,
                                                  "val_tokens": 300}))
    (folder / "tokenizer_meta.json").write_text(json.dumps({"kind": "gpt2"}))
    out = tmp_path / "run"
    train(tiny_config(folder, out, max_iters=2), progress=False)
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 50257
    assert json.loads((out / "tokenizer_meta.json").read_text())["kind"] == "gpt2"
    train(tiny_config(folder, out, max_iters=4), progress=False, resume=True)  # the resume check loads nothing
    assert evaluate_run(out)["tokens"] == 299  # eval's loss needs no decoding either
    with pytest.raises(FunGPTError, match="pip install tiktoken"):
        sample(out, prompt="the", max_new_tokens=2, seed=1)


def test_a_folder_of_token_ids_made_as_the_readme_says_trains_samples_and_evaluates(corpus, tmp_path):
    """README, "Data of your own token ids": two .bin files, meta.json and tokenizer_meta.json written by hand."""
    import numpy as np

    text = corpus.read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    cut = int(len(ids) * 0.9)
    folder = tmp_path / "ids"
    folder.mkdir()
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"format_version": 1, "tokenizer": "char", "vocab_size": len(chars),
                                                  "dtype": "uint16", "train_tokens": cut,
                                                  "val_tokens": len(ids) - cut}))
    (folder / "tokenizer_meta.json").write_text(json.dumps({"kind": "char", "chars": chars}))
    out = tmp_path / "run"
    train(tiny_config(folder, out, max_iters=2), progress=False)
    assert sample(out, prompt="the", max_new_tokens=5, seed=1)[0]
    res = evaluate_run(out)
    assert res["tokens"] == len(ids) - cut - 1 and math.isfinite(res["loss"]) and math.isnan(res["bits_per_byte"])
    assert "has no val_bytes or val_chars (the size of the val text), so bits per byte and per character" in res["note"]
    # with val_bytes alone, bits per byte are given but not bits per character: bytes are not characters
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "val_bytes": 2 * (len(ids) - cut)}))
    res = evaluate_run(out)
    assert math.isfinite(res["bits_per_byte"]) and math.isnan(res["bits_per_char"])
    assert "has no val_chars (the size of the val text), so bits per character cannot be given" in res["note"]
    # a vocab_size padded past the tokenizer's (as nanoGPT pads GPT-2's): what to correct, not "prepare again"
    (folder / "meta.json").write_text(json.dumps({**meta, "vocab_size": len(chars) + 6}))
    with pytest.raises(FunGPTError, match=f"set vocab_size to {len(chars)} there: the model's vocabulary is its "
                                          f"tokenizer's \\(README, \"Data of your own token ids\"\\)$"):
        train(tiny_config(folder, tmp_path / "padded", max_iters=2), progress=False)


def test_a_run_of_no_steps_says_its_weights_are_untrained(corpus, tmp_path, capsys):
    """`fungpt train` at max_iters 0 (a teacher's untrained model, or a budget used up before the first step)
    ends by saying that nothing was trained, not a bare "done", and draws no empty curve."""
    out = tmp_path / "run"
    argv = ["train", "--data.path", str(corpus), "--out-dir", str(out), "--model.n-layer", "1", "--model.n-embd", "16",
            "--model.n-head", "1", "--model.block-size", "8", "--train.eval-iters", "1", "--train.device", "cpu"]
    assert main([*argv, "--train.max-iters", "0"]) == 0
    said, err = capsys.readouterr()
    assert "fungpt: done (no step trained: the weights are the ones it started from). Sample with: fungpt" in said
    # the step-0 losses once (not again as a final summary), and no empty progress bar
    assert len(re.findall(r"step 0: train loss", said)) == 1 and "train:" not in err, (said, err)
    assert main([*argv, "--train.max-iters", "2", "--resume"]) == 0
    said = capsys.readouterr()
    assert "fungpt: done. Sample with" in said.out and "no step trained" not in said.out


def test_progress_off_turns_off_the_bar_not_the_periodic_eval_lines(corpus, tmp_path, capsys):
    """README: progress=False turns off only the bars. The periodic eval lines were written through the bar, and
    a script (or notebook) training without one saw the step-0 and final evals alone."""
    train(tiny_config(corpus, tmp_path / "run", max_iters=10, eval_interval=5), progress=False)
    out = capsys.readouterr().out
    assert re.search(r"^step 5: train loss \d\.\d{4}, val loss \d\.\d{4}$", out, re.M), out


def test_eval_scores_fewer_windows_at_once_where_the_logits_are_large(corpus, tmp_path, monkeypatch):
    """16 windows of GPT-2's 1024 x 50,257 logits (and their log-softmax) took 6.7 GB for a 3 MB model: a fine-tune
    trained at batch 1 to fit a laptop then ran out of memory in `fungpt eval`."""
    sample_module = sys.modules["fungpt.sample"]
    from fungpt.sample import default_eval_batch

    assert default_eval_batch(1024, 50257) == 1 and default_eval_batch(256, 8192) == 8
    assert default_eval_batch(256, 65) == 16  # a char model: as before
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=1), progress=False)
    asked = []
    real = sample_module.eval_windows
    monkeypatch.setattr(sample_module, "eval_windows", lambda tokens, T, B, **kw: asked.append(B) or real(
        tokens, T, B, **kw))
    monkeypatch.setattr(sample_module, "default_eval_batch", lambda T, V: 3)
    evaluate_run(out)
    evaluate_run(out, batch_size=5)
    assert asked == [3, 5]


def test_a_new_run_says_when_it_reads_data_prepared_earlier(corpus, tmp_path, capsys):
    """A second run on the same text found it in the cache and said nothing of its data: whether it had been
    prepared again (a large corpus: minutes) was left to guess. A resume says nothing of it (its data is the run's)."""
    train(tiny_config(corpus, tmp_path / "a", max_iters=1), progress=False)
    assert "fungpt: prepared " in capsys.readouterr().out
    train(tiny_config(corpus, tmp_path / "b", max_iters=1), progress=False)
    assert re.search(r"^fungpt: data: .*, prepared earlier from the same text and settings$", capsys.readouterr().out,
                     re.M)
    train(tiny_config(corpus, tmp_path / "b", max_iters=2), resume=True, progress=False)
    assert "fungpt: data:" not in capsys.readouterr().out


def test_a_tilde_in_a_path_is_the_home_folder_everywhere(corpus, tmp_path, monkeypatch, capsys):
    """~ written where no shell expands it (a TOML config, or quoted): data.path read it as the home folder, but the
    run went into a folder named "~" in the current one (which `rm -rf ~` would take for the home folder), and
    sample, eval, plot and inspect said the run did not exist."""
    from fungpt.plot import read_metrics

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    shutil.copy(corpus, home / "t.txt")
    cfg = tiny_config(Path("~/t.txt"), Path("~/run"), max_iters=2)
    assert cfg.out_dir == str(home / "run")
    train(cfg, progress=False)
    assert (home / "run" / "config.json").is_file() and not (tmp_path / "~").exists()
    assert evaluate_run("~/run", input="~/t.txt")["tokens"] > 0
    assert read_metrics("~/run") and main(["inspect", "~/run"]) == 0


def test_a_long_step_of_many_micro_batches_shows_them(corpus, tmp_path, monkeypatch, capsys):
    """A GPT-2 fine-tune on a CPU (32 micro-batches a step) stood a minute or more at its step bar's last value: a
    step that takes long shows its micro-batches in a bar of its own, cleared at the step's end."""
    monkeypatch.setattr(sys.modules["fungpt.train"], "MICRO_BAR_DELAY_S", 0.0)  # (every step counts as long)
    train(tiny_config(corpus, tmp_path / "a", max_iters=3, grad_accum_steps=3), progress=True)
    err = capsys.readouterr().err
    assert re.search(r"step 3, micro-batches: .*/3 \[.*batch/s", err), err
    train(tiny_config(corpus, tmp_path / "b", max_iters=3), progress=True)  # (one micro-batch a step: no such bar)
    err = capsys.readouterr().err
    assert "micro-batches" not in err and "train:" in err, err
