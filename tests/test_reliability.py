"""Reliability: crash-safe checkpoints, loading that never runs code, the NaN guard, and one clear
error line for every bad input (issue 5). See docs/reliability.md for the table of failures.

Subprocess tests run `python -m fungpt train` for real and kill it (SIGKILL) or interrupt it
(SIGINT); in-process tests simulate what cannot be produced on demand (a full disk, a crash in
the middle of a save) by patching the one function that writes checkpoint files.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fungpt import checkpoint as ckpt
from fungpt.cli import main
from fungpt.config import DataConfig, RunConfig, TrainConfig, load_run_config
from fungpt.data import load_meta, prepare
from fungpt.errors import FunGPTError
from fungpt.model import GPT, GPTConfig
from fungpt.rundir import LOCK_FILE, check_out_dir
from fungpt.runs import load_run
from fungpt.train import train

train_module = importlib.import_module("fungpt.train")  # (`from fungpt import train` is the function)
stopping = importlib.import_module("fungpt.stopping")

ROOT = Path(__file__).resolve().parents[1]

# A tiny model, so that a step takes milliseconds and a checkpoint is a few hundred kB.
TINY_MODEL = ["--model.n-layer", "2", "--model.n-head", "2", "--model.n-embd", "32", "--model.block-size", "16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, its prepared folder and one finished run that tests copy before changing."""
    base = tmp_path_factory.mktemp("reliability")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUNGPT_CACHE_DIR", str(base / "cache"))
        lines = [f"the {a} {b} sat on the {c}.\n" for a in ("cat", "dog", "fox") for b in ("quietly", "slowly")
                 for c in ("mat", "log", "hill", "wall")]
        corpus = base / "corpus.txt"
        corpus.write_text("".join(lines) * 40, encoding="utf-8")
        data = prepare(str(corpus), base / "data", tokenizer="char", progress=False)
        run = base / "run"
        train(tiny_config(data, run, max_iters=6, checkpoint_interval=3), progress=False)
    return {"base": base, "corpus": corpus, "data": data, "run": run}


@pytest.fixture(autouse=True)
def _cache(world, monkeypatch):
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(world["base"] / "cache"))


def tiny_config(data: Path, out_dir: Path, **train_overrides) -> RunConfig:
    train_kw = dict(batch_size=4, max_iters=12, lr=3e-3, min_lr=3e-4, warmup_iters=2, eval_interval=6,
                    eval_iters=2, checkpoint_interval=3, log_interval=1, device="cpu")
    train_kw.update(train_overrides)
    return RunConfig(out_dir=str(out_dir), data=DataConfig(path=str(data)),
                     model=GPTConfig(vocab_size=1, block_size=16, n_layer=2, n_head=2, n_embd=32),
                     train=TrainConfig(**train_kw))


def copy_run(world, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(world["run"], out)
    return out


def sha256_tree(folder: Path) -> dict[str, str]:
    """Every file's hash, but the run lock's (it names the last process that locked the folder)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run `fungpt ARGV` in-process; return (exit status, stderr)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code != 0
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-2000:]
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def test_weights_trained_untied_are_refused_by_a_tied_model(tmp_path):
    """Both halves would load into the one shared matrix, the head's over the embedding's: a checkpoint trained
    untied (a learner's edit of model.py) gave garbage through the tied model, with no error."""
    from safetensors.torch import save_file

    config = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)
    untied = GPT(dataclasses.replace(config, tie_embeddings=False))
    save_file({k: v.contiguous() for k, v in untied.state_dict().items()}, str(tmp_path / ckpt.MODEL_FILE))
    with pytest.raises(FunGPTError, match=r"hold lm_head.weight apart from wte.weight, but the model built from the "
                                          r"config ties the two; was the config, or the model code"):
        ckpt.load_weights(tmp_path, GPT(config))
    # The same matrix under both names (one tensor, saved twice) still loads
    tied = GPT(config)
    save_file({**tied.state_dict(), "lm_head.weight": tied.wte.weight.detach().clone()},
              str(tmp_path / ckpt.MODEL_FILE))
    model = GPT(config)
    ckpt.load_weights(tmp_path, model)
    assert torch.equal(model.lm_head.weight, tied.wte.weight) and model.lm_head.weight is model.wte.weight


def check_loadable(out: Path) -> int | None:
    """Everything `--resume` and `fungpt sample` need must load; return the checkpoint's step (None if none yet)."""
    folder = ckpt.find_checkpoint(out)
    if folder is None:
        assert not (out / "latest.json").exists()
        return None
    manifest = ckpt.verify_checkpoint(folder)
    model = GPT(load_run_config(out).model)
    ckpt.load_weights(folder, model)
    state = ckpt.load_state(folder)
    assert state["step"] == manifest["step"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    best = ckpt.find_checkpoint(out, "best")
    if best is not None:
        ckpt.verify_checkpoint(best)
        ckpt.load_weights(best, GPT(load_run_config(out).model))
    assert load_run(out, device="cpu").step == manifest["step"]  # what `fungpt sample` does
    return int(manifest["step"])


# ----------------------------------------------------------------------------------------------
# Atomic saves: a crash or a full disk in the middle of a save leaves the previous checkpoint


class _Crash(BaseException):
    """Stands in for the process dying: not an Exception, so no handler in fungpt catches it."""


def _patch_writer(monkeypatch, fail_when, exc):
    real = ckpt._write_file

    def writer(path: Path, data: bytes) -> None:
        if fail_when(path):
            if isinstance(exc, _Crash):
                real(path, data[: len(data) // 2])  # half a file on disk, like a kill mid-write
            raise exc
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_file", writer)


@pytest.mark.parametrize("victim", [ckpt.MODEL_FILE, ckpt.STATE_FILE, ckpt.MANIFEST_FILE])
def test_crash_mid_save_leaves_previous_checkpoint(world, tmp_path, monkeypatch, victim):
    out = copy_run(world, tmp_path)
    before = ckpt.find_checkpoint(out)
    hashes = sha256_tree(before)
    model = GPT(load_run_config(out).model)
    ckpt.load_weights(before, model)
    state = ckpt.load_state(before)
    _patch_writer(monkeypatch, lambda p: p.name == victim, _Crash())
    with pytest.raises(_Crash):
        ckpt.save_checkpoint(out, "latest", 7, model, state={**state, "step": 7})
    assert ckpt.find_checkpoint(out) == before and sha256_tree(before) == hashes
    assert check_loadable(out) == 6
    assert list((out / "checkpoints").glob(".latest-*.tmp-*"))  # the half-written folder is left behind...
    monkeypatch.undo()
    ckpt.save_checkpoint(out, "latest", 7, model, state={**state, "step": 7})
    assert check_loadable(out) == 7
    assert not list((out / "checkpoints").glob(".latest-*.tmp-*"))  # ...and swept away by the next save
    assert not before.exists()


def test_a_damaged_manifest_says_what_to_do(world, tmp_path, capsys):
    """A manifest overwritten with random bytes said only "is corrupt; the checkpoint cannot be trusted": no fix, though
    the run's best checkpoint was whole."""
    out = copy_run(world, tmp_path)
    latest = ckpt.find_checkpoint(out)
    assert ckpt.find_checkpoint(out, "best") not in (None, latest)
    (latest / ckpt.MANIFEST_FILE).write_bytes(bytes(range(200, 250)))
    code = main(["sample", "--run", str(out), "--max-new-tokens", "2"])
    assert_one_line_error(code, capsys.readouterr().err, "manifest.json is corrupt; the checkpoint cannot be trusted: "
                          "restore it or train again (or use the run's best checkpoint: --checkpoint best)")
    assert load_run(out, "best").step > 0
    best = ckpt.find_checkpoint(out, "best")  # damaged too: no hint that leads to the same error
    manifest = (best / ckpt.MANIFEST_FILE).read_bytes()
    (best / ckpt.MANIFEST_FILE).write_bytes(b"{}")
    with pytest.raises(FunGPTError, match=r"manifest.json is corrupt; the checkpoint cannot be trusted: restore it or "
                                          r"train again$"):
        load_run(out)
    (best / ckpt.MANIFEST_FILE).write_bytes(manifest)
    (latest / ckpt.MANIFEST_FILE).unlink()
    with pytest.raises(FunGPTError, match=r"has no manifest.json: it is incomplete or not a FunGPT checkpoint; restore "
                                          r"it or train again \(or use the run's best checkpoint: --checkpoint best\)"):
        load_run(out)


def test_without_a_pointer_the_newest_whole_checkpoint_is_found(world, tmp_path):
    """The fallback when latest.json is gone: the folder with the highest step that has a manifest."""
    out = copy_run(world, tmp_path)
    newest = ckpt.find_checkpoint(out)
    assert newest.name == "latest-0000006"
    shutil.copytree(newest, out / "checkpoints" / "latest-0000003")  # an older one, e.g. left by a killed rotation
    shutil.copytree(newest, out / "checkpoints" / "latest-0000009")  # a newer one that never got its manifest
    (out / "checkpoints" / "latest-0000009" / ckpt.MANIFEST_FILE).unlink()
    (out / "latest.json").unlink()
    assert ckpt.find_checkpoint(out) == newest


def test_without_a_pointer_the_step_decides_before_the_suffix(world, tmp_path):
    """latest-0000003.1 (a second save at step 3) is older than latest-0000006: ordered by the suffix first, the
    fallback resumed from step 3 and threw three steps of training away."""
    out = copy_run(world, tmp_path)
    newest = ckpt.find_checkpoint(out)
    assert newest.name == "latest-0000006"
    shutil.copytree(newest, out / "checkpoints" / "latest-0000003.1")
    (out / "latest.json").unlink()
    assert ckpt.find_checkpoint(out) == newest
    shutil.copytree(newest, out / "checkpoints" / "latest-0000006.1")  # at one step, the later save (higher suffix)
    assert ckpt.find_checkpoint(out) == out / "checkpoints" / "latest-0000006.1"
    for n in range(2, 11):  # suffixes are numbers: .10 came after .9
        shutil.copytree(newest, out / "checkpoints" / f"latest-0000006.{n}")
    assert ckpt.find_checkpoint(out) == out / "checkpoints" / "latest-0000006.10"


def test_a_state_pt_without_every_field_is_refused_in_one_line(tmp_path):
    torch.save({"step": 3, "optimizer": {}}, tmp_path / ckpt.STATE_FILE)  # tensors and plain types, but not ours
    with pytest.raises(FunGPTError, match="is not a FunGPT training state \\(expected the keys step, best_val, "):
        ckpt.load_state(tmp_path)


def test_the_tokenizer_fingerprint_covers_the_file_the_tokenizer_names(tmp_path):
    """A BPE tokenizer is tokenizer_meta.json plus the file it names: replacing that file (another merge table, the
    same vocabulary size) must change the fingerprint that a checkpoint's manifest records."""
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps({"kind": "bpe", "file": "tokenizer.json"}))
    (tmp_path / "tokenizer.json").write_text('{"merges": ["a b"]}')
    before = ckpt.tokenizer_fingerprint(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"merges": ["b a"]}')
    assert ckpt.tokenizer_fingerprint(tmp_path) not in (before, None)


def test_weights_missing_a_tensor_are_refused(world, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt.find_checkpoint(world["run"]), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    dropped = sorted(tensors)[-1]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(folder / "model.safetensors"))
    model = load_run(world["run"], device="cpu").model
    with pytest.raises(FunGPTError, match=rf"do not match the model .*missing \['{dropped}'\]"):
        ckpt.load_weights(folder, model)


def test_saving_twice_at_one_step_never_deletes_the_current_checkpoint(world, tmp_path, monkeypatch):
    out = copy_run(world, tmp_path)
    first = ckpt.find_checkpoint(out)
    model = GPT(load_run_config(out).model)
    ckpt.load_weights(first, model)
    state = ckpt.load_state(first)
    # A crash during the second save at the same step must leave the first one loadable.
    _patch_writer(monkeypatch, lambda p: p.name == ckpt.STATE_FILE, _Crash())
    with pytest.raises(_Crash):
        ckpt.save_checkpoint(out, "latest", 6, model, state=state)
    assert ckpt.find_checkpoint(out) == first and check_loadable(out) == 6
    monkeypatch.undo()
    second = ckpt.save_checkpoint(out, "latest", 6, model, state=state)
    assert second != first and ckpt.find_checkpoint(out) == second and check_loadable(out) == 6
    # a folder of the first name left beside the second (a run killed before it deleted the old one): a third name
    shutil.copytree(second, first)
    third = ckpt.save_checkpoint(out, "latest", 6, model, state=state)
    assert third.name == "latest-0000006.2" and ckpt.find_checkpoint(out) == third and check_loadable(out) == 6


def test_disk_full_during_training(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _patch_writer(monkeypatch, lambda p: "latest-0000006" in p.parent.name,
                  OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    argv = ["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL,
            "--train.max-iters", "9", "--train.checkpoint-interval", "3", "--train.eval-interval", "100",
            "--train.eval-iters", "1", "--train.batch-size", "4"]
    code, stderr = run_cli(argv, capsys)
    assert_one_line_error(code, stderr, "could not save the latest checkpoint at step 6", "No space left on device",
                          "intact")
    assert check_loadable(out) == 3  # the previous checkpoint survives and loads
    assert not list((out / "checkpoints").glob(".latest-*"))  # no half-written folder left behind
    monkeypatch.undo()
    code, stderr = run_cli([*argv, "--resume"], capsys)
    assert code == 0, stderr
    assert check_loadable(out) == 9
    # the first save failing: there is no previous checkpoint to promise
    _patch_writer(monkeypatch, lambda p: "best-0000000" in p.parent.name,
                  OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    code, stderr = run_cli([*argv, "--out-dir", tmp_path / "first", "--train.eval-interval", "3"], capsys)
    last = assert_one_line_error(code, stderr, "could not save the best checkpoint at step 0",
                                 "there is no best checkpoint yet", "then run again with --resume: it starts over")
    assert "intact" not in last


def test_a_run_with_a_best_checkpoint_but_no_latest_says_so_when_resumed(world, tmp_path, capsys):
    """A kill between the best and the latest save of a step (both at eval_interval = checkpoint_interval), or a
    full disk, leaves a best checkpoint without a latest one: --resume said "no checkpoint yet" and started over,
    replacing the best weights at its first eval without a word; sample said "train it first"."""
    out = copy_run(world, tmp_path)
    best = ckpt.folder_step(ckpt.find_checkpoint(out, "best"))
    assert best > 0
    for folder in (out / "checkpoints").glob("latest-*"):
        shutil.rmtree(folder)
    pointer = (out / "latest.json").read_bytes()
    # the pointer names a folder that is gone: the same hint (it said only "restore it from a backup")
    assert_one_line_error(*run_cli(["sample", out, "--max-new-tokens", "3"], capsys),
                          f"{out}'s last checkpoint folder {json.loads(pointer)['dir'].split('/')[-1]} is missing "
                          f"(its pointer latest.json names it), but a best one is there: pass --checkpoint best")
    (out / "latest.json").unlink()
    assert_one_line_error(*run_cli(["sample", out, "--max-new-tokens", "3"], capsys),
                          f"{out} has no last checkpoint, but a best one: pass --checkpoint best")
    assert main(["train", "--out-dir", str(out), "--resume", "--train.max-iters", "2"]) == 0
    assert (f"fungpt: {out} has no latest checkpoint, only its best (step {best}, weights without the optimizer's "
            f"state): starting from step 0, and the next eval replaces that best checkpoint (copy its folder to keep "
            f"it)") in capsys.readouterr().out
    # a best of step 0 holds the initial weights: said as a run that never saved, and not pointed at
    for folder in (out / "checkpoints").glob("*-*"):
        shutil.rmtree(folder)
    for pointer in ("best.json", "latest.json"):
        (out / pointer).unlink()
    ckpt.save_checkpoint(out, "best", 0, GPT(load_run_config(out).model))
    assert_one_line_error(*run_cli(["sample", out, "--max-new-tokens", "3"], capsys),
                          f"{out} has no last checkpoint, though it trained to step 2: its weights diverged (a save of "
                          f"non-finite weights is refused), or it stopped before its first save; train it again (with "
                          f"a lower train.lr if it diverged)")
    assert main(["train", "--out-dir", str(out), "--resume", "--train.max-iters", "2"]) == 0
    assert "has no checkpoint yet (stopped before its first save): starting from step 0" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux): a device always full")
def test_disk_full_while_logging_metrics_is_said_as_such(world, tmp_path, monkeypatch, capsys):
    """A full disk between two checkpoints: metrics.jsonl's row could not be written, and the message said so, but
    closing the file tried that row again and its bare "No space left on device" replaced the message."""
    train_module = sys.modules["fungpt.train"]
    real_write, rows = train_module.MetricsLog.write, []

    def write(self, row):
        rows.append(row)
        if len(rows) == 3:  # the disk fills: every write from here finds no space
            self.file = open("/dev/full", "a", encoding="utf-8")  # noqa: SIM115 - closed by MetricsLog.close
        real_write(self, row)

    monkeypatch.setattr(train_module.MetricsLog, "write", write)
    out = tmp_path / "run"
    code, stderr = run_cli(["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu",
                            *TINY_MODEL, "--train.max-iters", "9", "--train.checkpoint-interval", "1",
                            "--train.eval-interval", "100", "--train.eval-iters", "1", "--train.batch-size", "4",
                            "--train.log-interval", "1"], capsys)
    assert_one_line_error(code, stderr, f"could not write {out / 'metrics.jsonl'}: No space left on device; the last "
                                        f"checkpoint is intact")


@pytest.mark.parametrize("err, words", [(errno.EACCES, "Permission denied.*intact .fix the folder's permissions"),
                                        (errno.EROFS, "Read-only file system.*intact .train where the disk is writ"),
                                        (errno.EDQUOT, "quota.*intact .free some disk space"),
                                        (errno.ENOTDIR, "Not a directory.*intact .fix what it names")])
@pytest.mark.parametrize("victim", [ckpt.MODEL_FILE, ckpt.STATE_FILE, ckpt.MANIFEST_FILE])
def test_write_errors_while_saving_keep_the_previous_checkpoint(world, tmp_path, monkeypatch, err, words, victim):
    out = copy_run(world, tmp_path)
    before = ckpt.find_checkpoint(out)
    hashes = sha256_tree(out)
    model = GPT(load_run_config(out).model)
    ckpt.load_weights(before, model)
    state = ckpt.load_state(before)
    _patch_writer(monkeypatch, lambda p: p.name == victim, OSError(err, os.strerror(err)))
    with pytest.raises(FunGPTError, match=f"could not save the latest checkpoint at step 7 in .*{words}"):
        ckpt.save_checkpoint(out, "latest", 7, model, state={**state, "step": 7})
    assert sha256_tree(out) == hashes  # nothing changed, nothing left behind
    assert check_loadable(out) == 6


def test_a_save_that_fails_otherwise_leaves_no_half_written_folder(world, tmp_path, monkeypatch):
    """Memory running out (or Ctrl-C) while the optimizer state was serialised left its temporary folder, maybe
    gigabytes, until a later save; and a pointer damaged by hand hid a full disk behind its own error."""
    out = copy_run(world, tmp_path)
    hashes = sha256_tree(out)
    model = GPT(load_run_config(out).model)
    ckpt.load_weights(ckpt.find_checkpoint(out), model)
    state = ckpt.load_state(ckpt.find_checkpoint(out))
    _patch_writer(monkeypatch, lambda p: p.name == ckpt.STATE_FILE, MemoryError())
    with pytest.raises(MemoryError):
        ckpt.save_checkpoint(out, "latest", 7, model, state={**state, "step": 7})
    assert sha256_tree(out) == hashes and check_loadable(out) == 6  # nothing left behind
    for best in (out / "checkpoints").glob("best-*"):
        shutil.rmtree(best)
    (out / "best.json").write_text("{garbage")  # (and no best folder: "best.json is corrupt ..." was all it said)
    _patch_writer(monkeypatch, lambda p: True, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(FunGPTError, match=r"could not save the best checkpoint at step 7 in .*: No space left on "
                                          r"device; there is no best checkpoint yet"):
        ckpt.save_checkpoint(out, "best", 7, model)


def test_a_save_that_fails_names_what_is_in_the_way(world, tmp_path):
    """A file named checkpoints in the run folder: the error said "Not a directory ... (fix what it names ...)" and
    named nothing; a save also names the path an error comes with."""
    out = copy_run(world, tmp_path)
    model = GPT(load_run_config(out).model)
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").write_text("not a folder")
    with pytest.raises(FunGPTError, match=re.escape(f"could not save the best checkpoint at step 7 in {out}: "
                                                    f"{out / 'checkpoints'} is a file where a folder is needed; ")):
        ckpt.save_checkpoint(out, "best", 7, model)
    (out / "checkpoints").unlink()
    (out / "best.json").unlink()
    (out / "best.json").mkdir()  # the pointer's rename fails: named by its target, not the temporary file renamed
    with pytest.raises(FunGPTError, match=re.escape(f": Is a directory ({out / 'best.json'}); ")):
        ckpt.save_checkpoint(out, "best", 7, model)


def test_a_killed_save_of_the_other_kind_is_cleared_by_the_next_save(world, tmp_path):
    """A `best` save killed half way left a hidden folder as large as the weights, removed only by a later best save:
    in a run whose val loss never improved again, for good."""
    out = copy_run(world, tmp_path)
    model = GPT(load_run_config(out).model)
    ckpt.load_weights(ckpt.find_checkpoint(out), model)
    state = ckpt.load_state(ckpt.find_checkpoint(out))
    killed = out / "checkpoints" / ".best-0000009.tmp-424242"
    killed.mkdir()
    (killed / ckpt.MODEL_FILE).write_bytes(b"half the weights")
    ckpt.save_checkpoint(out, "latest", 7, model, state={**state, "step": 7})
    assert not killed.exists() and check_loadable(out) == 7


def test_pointer_write_failure_keeps_the_previous_checkpoint(world, tmp_path, monkeypatch):
    """The last step of a save (replacing latest.json) failing must not leave the new folder half-adopted."""
    out = copy_run(world, tmp_path)
    before = ckpt.find_checkpoint(out)
    hashes = sha256_tree(out)
    model = GPT(load_run_config(out).model)
    ckpt.load_weights(before, model)
    state = ckpt.load_state(before)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "latest.json":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(FunGPTError) as err:
        ckpt.save_checkpoint(out, "latest", 7, model, state={**state, "step": 7})
    # one message, with the fix for its errno (the pointer's own "could not write ...; check free disk space and
    # permissions" was nested inside, and the fix lost)
    assert str(err.value) == (f"could not save the latest checkpoint at step 7 in {out}: Permission denied; the "
                              f"previous checkpoint is intact (fix the folder's permissions, then resume with "
                              f"--resume)")
    monkeypatch.undo()
    assert sha256_tree(out) == hashes
    assert check_loadable(out) == 6


def test_a_failed_save_without_a_pointer_names_the_checkpoint_a_resume_finds(world, tmp_path, monkeypatch):
    """A run killed between renaming its folder into place and writing latest.json: a resume continues from that
    folder, so a failed save there said wrongly "there is no latest checkpoint yet ... it starts over"."""
    out = copy_run(world, tmp_path)
    (out / "latest.json").unlink()
    assert check_loadable(out) == 6  # found without its pointer
    model = GPT(load_run_config(out).model)
    state = ckpt.load_state(ckpt.find_checkpoint(out))
    _patch_writer(monkeypatch, lambda p: p.name == ckpt.STATE_FILE, OSError(errno.EFBIG, os.strerror(errno.EFBIG)))
    with pytest.raises(FunGPTError, match=r": File too large; the previous checkpoint is intact \(fix what it names, "
                                          r"then resume with --resume\)$"):
        ckpt.save_checkpoint(out, "latest", 7, model, state={**state, "step": 7})


def test_unwritable_out_dir_is_refused_up_front(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "locked"
    out.mkdir()
    argv = ["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL]
    if os.geteuid() == 0:  # root writes through chmod 500, so simulate what a normal user would see
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == out else real_access(p, mode))
    else:
        out.chmod(0o500)
    try:
        assert_one_line_error(*run_cli(argv, capsys), "not writable", str(out))
    finally:
        out.chmod(0o700)
    assert not any(out.iterdir())


_HOLD_LOCK = """
import sys
from pathlib import Path
from fungpt.rundir import lock_out_dir
with lock_out_dir(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the run lock is POSIX flock")
@pytest.mark.skipif(os.name == "nt", reason="the run lock is POSIX-only")
def test_a_symlinked_lock_file_is_refused_and_its_target_left_alone(world, tmp_path):
    """A run folder copied or shared with a symbolic link as its .fungpt-train.lock: training wrote its
    "pid ... on HOST" line through it, over whatever file it named."""
    victim = tmp_path / "notes.txt"
    victim.write_text("important\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".fungpt-train.lock").symlink_to(victim)
    with pytest.raises(FunGPTError, match=r"\.fungpt-train\.lock is a symbolic link, which training would write "
                                          r"through; delete it \(a run makes its own\)$"):
        train(tiny_config(world["corpus"], out, max_iters=2), progress=False)
    assert victim.read_text() == "important\n"


def test_a_blind_layernorm_is_refused_for_new_runs_but_a_saved_one_still_loads(world, tmp_path, monkeypatch, capsys):
    """QK-norm's LayerNorm at head size 1 makes attention uniform: refused for a new run. Checked in GPTConfig
    itself, it also refused to load, sample or resume a run trained before the check (its MLP works)."""
    cfg = tiny_config(world["data"], tmp_path / "blind", max_iters=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_head=32, qk_norm=True))  # head size 1
    with pytest.raises(FunGPTError, match=r"head size n_embd/n_head=1 and norm='layernorm'"):
        train(cfg, progress=False)
    assert not (tmp_path / "blind" / "config.json").exists()
    monkeypatch.setattr(GPTConfig, "check_new", lambda self: None)  # (a run from before the check)
    train(cfg, progress=False)
    monkeypatch.undo()
    assert load_run(tmp_path / "blind").step == 2
    assert main(["sample", str(tmp_path / "blind"), "--max-new-tokens", "3"]) == 0
    assert train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=3)), resume=True,
                 progress=False)["step"] == 3


def test_a_diverged_run_without_a_best_checkpoint_is_not_told_to_train_first(world, tmp_path):
    """A time-budget run skips the step-0 eval; if every later eval is NaN, no best is kept: --checkpoint best said
    "has no best checkpoint yet (train it first)" of a run that had trained."""
    out = copy_run(world, tmp_path)
    for pointer in ("best.json",):
        (out / pointer).unlink()
    for folder in (out / "checkpoints").glob("best-*"):
        shutil.rmtree(folder)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "val_loss" in row:
            row["val_loss"] = float("nan")
    (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(FunGPTError, match=r"has no best checkpoint: no eval of it gave a finite val loss \(its "
                                          r"training diverged\); train it again with a lower train.lr$"):
        load_run(out, checkpoint="best")
    # a healthy time-budget run stopped before its first eval (it skips step 0's) has its last checkpoint: it was
    # told its weights may have diverged
    (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows if "val_loss" not in row))
    with pytest.raises(FunGPTError, match=r"has no best checkpoint yet: no eval of it has finished \(a run on a time "
                                          r"budget skips the one at step 0\); use its last one \(--checkpoint last\)"):
        load_run(out, checkpoint="best")
    assert load_run(out).step > 0
    fresh = tmp_path / "fresh"  # (never trained: as before)
    fresh.mkdir()
    shutil.copy(out / "config.json", fresh / "config.json")
    with pytest.raises(FunGPTError, match=r"has no best checkpoint yet \(train it first\)$"):
        load_run(fresh, checkpoint="best")


@pytest.mark.skipif(os.name == "nt", reason="the run lock is POSIX-only")
def test_a_run_training_before_its_first_checkpoint_is_not_told_to_train_first(world, tmp_path):
    """`fungpt serve` (or sample) on a run that had started but not saved yet said "train it first", which would
    start a second run: now that it is training, and when it saves."""
    import subprocess

    out = tmp_path / "run"
    train(tiny_config(world["corpus"], out, max_iters=2, checkpoint_interval=500), progress=False)
    kept = tmp_path / "kept"
    shutil.move(out / "checkpoints", kept)
    shutil.move(out / "best.json", kept / "best.json")
    (out / "latest.json").unlink()
    with pytest.raises(FunGPTError, match=r"has no last checkpoint, though it trained to step 2: .* or it stopped "
                                          r"before its first save; train it again"):
        load_run(out)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, sys, time
f = open({str(out / LOCK_FILE)!r}, "w")
fcntl.flock(f, fcntl.LOCK_EX)
f.write("pid 1 on elsewhere, since 12:00:00"); f.flush()
print("locked", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        for which in ("last", "best"):
            with pytest.raises(FunGPTError, match=rf"has no {which} checkpoint yet: it is training now \(pid 1 on "
                                                  rf"elsewhere, since 12:00:00\) and has not saved one; try again "
                                                  rf"once it has$"):
                load_run(out, checkpoint=which)
        (out / "checkpoints").mkdir()  # its best so far back (step 0's eval saves one)
        best = json.loads((kept / "best.json").read_text())["dir"]
        shutil.move(kept / Path(best).name, out / best)
        shutil.move(kept / "best.json", out / "best.json")
        with pytest.raises(FunGPTError, match=r"try again once it has \(or now with --checkpoint best: its best so "
                                              r"far\)$"):
            load_run(out)
        assert load_run(out, checkpoint="best").step in (0, 2)
    finally:
        holder.kill()
        holder.wait()


def test_a_config_far_larger_than_its_weights_is_refused_before_the_model_is_built(world, tmp_path, monkeypatch,
                                                                                  capsys):
    """A run folder whose config.json and manifest.json describe 64 x 8192 beside a tiny model's weights: sample,
    serve, eval and --resume built that model (51 billion random parameters) before finding that the weights did
    not fit. Weights of another dtype than floats were cast without a word."""
    out = tmp_path / "run"
    train(tiny_config(world["corpus"], out, max_iters=2), progress=False)
    folder = ckpt.find_checkpoint(out)
    monkeypatch.setattr(ckpt, "BUILD_WITHOUT_CHECK_BYTES", -2**62)  # compare shapes even for this small model
    assert load_run(out).step == 2  # (the real config's shapes are the file's: tied head, buffers left out)
    monkeypatch.undo()
    for path in (out / "config.json", folder / ckpt.MANIFEST_FILE):
        saved = json.loads(path.read_text())
        saved["model"].update(n_layer=64, n_embd=8192, n_head=64)
        path.write_text(json.dumps(saved))
    built = []  # (the model that load_run and train build: the check builds its own on the meta device)
    for module in ("fungpt.runs", "fungpt.train"):
        monkeypatch.setattr(importlib.import_module(module), "GPT", lambda *a, **k: built.append(a) or 1 / 0)
    tiny = r"weights in .*model\.safetensors \([\d,]+ numbers\) do not fit the model that .*config\.json describes "
    with pytest.raises(FunGPTError, match=tiny + r"\(51,\d{3},\d{3},\d{3} parameters\): the run folder is damaged"):
        load_run(out)
    assert main(["train", "--out-dir", str(out), "--resume", "--train.max-iters", "4"]) == 2  # (its saved config)
    assert re.match("error: " + tiny, capsys.readouterr().err.splitlines()[-1])
    assert not built


def test_weights_that_are_not_floats_are_refused(world, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    train(tiny_config(world["corpus"], out, max_iters=2), progress=False)
    weights = ckpt.find_checkpoint(out) / ckpt.MODEL_FILE
    tensors = load_file(str(weights))
    tensors["wte.weight"] = tensors["wte.weight"].to(torch.int8)
    save_file(tensors, str(weights))
    with pytest.raises(FunGPTError, match=r"weights in .* hold wte\.weight as int8, not as floating-point numbers"):
        ckpt.load_weights(weights.parent, GPT(load_run_config(out).model))
    # a model edited to keep a bool buffer saves it, and loads it back
    model = GPT(load_run_config(out).model)
    model.register_buffer("mask", torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    saved = ckpt.save_checkpoint(tmp_path / "edited", "best", 1, model)
    again = GPT(load_run_config(out).model)
    again.register_buffer("mask", torch.zeros(4, 4, dtype=torch.bool))
    ckpt.load_weights(saved, again)
    assert torch.equal(again.mask, model.mask)


def test_a_checkpoint_or_tokenizer_never_has_files_outside_its_folder_read(world, tmp_path):
    """A crafted run folder: a manifest.json naming ../../x or /etc/hostname had that file checked (and its size told
    in the error); a tokenizer_meta.json naming a file elsewhere had it read whole into memory at every load."""
    out = tmp_path / "run"
    train(tiny_config(world["corpus"], out, max_iters=2), progress=False)
    folder = ckpt.find_checkpoint(out)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 100)
    manifest = json.loads((folder / ckpt.MANIFEST_FILE).read_text())
    for name in (str(outside), "../../outside.bin"):
        crafted = {**manifest, "files": {**manifest["files"], name: {"bytes": 1, "sha256": "00"}}}
        (folder / ckpt.MANIFEST_FILE).write_text(json.dumps(crafted))
        with pytest.raises(FunGPTError, match=r"manifest\.json names a file outside its folder; the checkpoint cannot "
                                              r"be trusted: restore it or train again$"):
            ckpt.verify_checkpoint(folder)
    meta = out / "tokenizer_meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "file": str(outside)}))
    assert ckpt.tokenizer_fingerprint(out) == hashlib.sha256(meta.read_bytes()).hexdigest()  # (outside: not read)


def test_messages_give_advice_that_works_where_they_are_seen(world, tmp_path, capsys):
    """From a sweep of every error message: advice that named prepare's flag to train, a refusal of a Llama folder
    that called it no save_pretrained folder, "continue it with --resume" for a run that is not the out_dir, and a
    typo of a command answered with the whole usage."""
    assert main(["trian"]) == 2
    assert capsys.readouterr().err == ("error: unknown command 'trian'; did you mean train? (`fungpt --help` lists the "
                                       "commands)\n")
    one = tmp_path / "one.txt"
    one.write_text("a")
    assert main(["train", "--data.path", str(one), "--out-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.endswith("the train split has 0 tokens (1 character of text, val fraction 0.1); "
                                            "use more text\n")
    two = tmp_path / "two.txt"
    two.write_text("ab")
    assert main(["prepare", "--input", str(two), "--out", str(tmp_path / "d"), "--val-fraction", "0.9"]) == 2
    assert capsys.readouterr().err.endswith("or another val fraction (--val-fraction for fungpt prepare, "
                                            "--data.val-fraction for fungpt train)\n")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000, "hidden_size": 64}))
    with pytest.raises(FunGPTError, match=r"holds a 'llama' model: only GPT-2 checkpoints can be loaded$"):
        GPT.from_hf(llama)
    with pytest.raises(FunGPTError, match=r"is a FunGPT run, not a Hugging Face GPT-2 folder: `fungpt train --resume "
                                          r"--out-dir=.*run` continues it on its own data; to fine-tune it on other "
                                          r"text, make a Hugging Face folder of it with `fungpt export --run .*run"):
        GPT.from_hf(world["run"])
    # one of its checkpoints was "no Hugging Face model (config.json missing)": adding one led to advice to --resume
    # the checkpoint folder
    for folder in (ckpt.find_checkpoint(world["run"], "best"), Path(world["run"]) / "checkpoints"):
        with pytest.raises(FunGPTError, match=r"is a checkpoint of the FunGPT run '.*run', not a Hugging Face GPT-2 "
                                              r"folder: `fungpt train --resume"):
            GPT.from_hf(folder)
    # a model without GPT-2's form was sent to an export that refuses it
    rope = tmp_path / "rope"
    rope.mkdir()
    saved = json.loads((Path(world["run"]) / "config.json").read_text())
    saved["model"]["pos_encoding"] = "rope"
    (rope / "config.json").write_text(json.dumps(saved))
    with pytest.raises(FunGPTError, match=r"continues it on its own data; init_from takes Hugging Face GPT-2 folders, "
                                          r"and this run's model has no such form \(pos_encoding='rope'"):
        GPT.from_hf(rope)


def test_resuming_from_another_folder_says_where_a_relative_data_path_is_found(world, tmp_path, monkeypatch,
                                                                              capsys):
    """The run's config.json held data.path 'corpus.txt', relative to where it was trained: resumed from another
    folder, the error named the path and no reason why it was not found."""
    import shutil

    shutil.copy(world["corpus"], tmp_path / "corpus.txt")
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(Path("corpus.txt"), tmp_path / "run", max_iters=2)
    train(cfg, progress=False)
    monkeypatch.chdir(tmp_path / "run")
    assert main(["train", "--out-dir", str(tmp_path / "run"), "--resume", "--train.max-iters", "4"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "(resuming, data.path is the run's config.json's unless --config or --data.path gives another; a relative "
        "one is found from the folder you run in: run where you trained, or pass --data.path with its full path)")


def test_running_out_of_memory_while_reading_weights_is_not_called_damage(world, monkeypatch):
    """A broad catch that reads a file as damaged took torch's "can't allocate memory" (a RuntimeError) for a
    broken safetensors file: the command said to restore it, not that memory ran out."""
    import errno

    import safetensors.torch

    from fungpt.errors import is_out_of_memory

    assert is_out_of_memory(MemoryError()) and is_out_of_memory(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    # (Windows' words for the same: a raw traceback there, and weights read out of memory called damaged)
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                                         "memory: you tried to allocate 8589934592 bytes."))
    assert not is_out_of_memory(RuntimeError("invalid header")) and not is_out_of_memory(OSError(errno.EIO, "io"))
    folder = ckpt.find_checkpoint(world["run"])

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes")

    monkeypatch.setattr(safetensors.torch, "load_file", no_memory)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        ckpt.load_weights(folder, GPT(load_run_config(world["run"]).model))


@pytest.mark.parametrize("resume", [False, True])
def test_metrics_never_follow_a_link_to_nowhere_out_of_the_run_folder(world, tmp_path, resume):
    """A metrics.jsonl that is a symbolic link to a file that does not exist (a run folder unpacked or shared from
    elsewhere): training appended its rows through it, creating that file outside the run folder."""
    out, victim = tmp_path / "run", tmp_path / "elsewhere" / "created.txt"
    victim.parent.mkdir()
    if resume:
        train(tiny_config(world["corpus"], out, max_iters=2), progress=False)
        (out / "metrics.jsonl").unlink()
    else:
        out.mkdir()
    (out / "metrics.jsonl").symlink_to(victim)
    train(tiny_config(world["corpus"], out, max_iters=4), resume=resume, progress=False)
    assert not victim.exists() and not (out / "metrics.jsonl").is_symlink()
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()][-1] == 4
    if resume:  # a link to a file that is there: resuming read that file, wherever it is, into the run's metrics
        (out / "metrics.jsonl").unlink()
        victim.write_text('{"step": 1, "elsewhere": true}\n')
        (out / "metrics.jsonl").symlink_to(victim)
        train(tiny_config(world["corpus"], out, max_iters=6), resume=True, progress=False)
        assert "elsewhere" not in (out / "metrics.jsonl").read_text() and victim.read_text().count("\n") == 1


@pytest.mark.skipif(os.name == "nt", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_at_the_runs_first_write_is_one_line_naming_the_file(world, tmp_path):
    """The run lock's pid line is the first thing a run writes: a full disk there said only "error: No space left
    on device" (the OSError had no file name), and train() raised a bare OSError to library callers."""
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (8, 8))\n"
              "import fungpt.cli\n"
              "sys.exit(fungpt.cli.main(sys.argv[1:]))\n")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, "train", "--data.path", str(world["data"]), "--out-dir",
                           str(out), "--model.n-layer", "1", "--model.n-embd", "16", "--model.n-head", "2",
                           "--train.device", "cpu"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {out / '.fungpt-train.lock'}: File too large; free some disk space or choose another "
        f"out_dir"), proc.stderr


def test_a_live_runs_folder_is_refused(world, tmp_path, capsys):
    """While a run trains in a folder, no second train may resume, overwrite or restart it there."""
    out = copy_run(world, tmp_path)
    shutil.rmtree(out / "checkpoints")  # like a live run before its first save, which a new run may replace
    (out / "latest.json").unlink(missing_ok=True)
    (out / "best.json").unlink(missing_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sha256_tree(out)
        base = ["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL]
        for flags in ([], ["--resume"], ["--overwrite"]):
            last = assert_one_line_error(*run_cli([*base, *flags], capsys), "in use by a training run",
                                         f"pid {holder.pid}")
            assert "Traceback" not in last
        assert sha256_tree(out) == before
        # under torchrun, ranks other than 0 do not ask (rank 0 may hold the lock already: a slow rank 1
        # would refuse its own job's folder)
        check_out_dir(tiny_config(world["data"], out), resume=True, overwrite=False, check_lock=False)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the lock goes with its process: the same folder trains again
    assert train(tiny_config(world["data"], out, max_iters=2), progress=False)["step"] == 2


@pytest.mark.parametrize("budget", [None, 5.0])
def test_a_run_that_never_saved_is_started_over(world, tmp_path, capsys, monkeypatch, budget):
    """A run stopped before its first checkpoint (out of memory, killed) left its config, logs and a step-0
    checkpoint (the initial weights: the step-0 eval's best one, or the one a time-budget run writes to time its
    saves) behind: the same command starts it over, no --overwrite needed."""
    out = tmp_path / "run"
    real_clip, steps = torch.nn.utils.clip_grad_norm_, []

    def crash_in_step_2(*args, **kwargs):  # (called once per training step)
        steps.append(1)
        if len(steps) == 2:
            raise RuntimeError("simulated crash")
        return real_clip(*args, **kwargs)

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = tiny_config(world["data"], out, max_iters=12, checkpoint_interval=100, max_minutes=budget)
    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", crash_in_step_2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg, progress=False)
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == ["latest-0000000" if budget else "best-0000000"], left
    if budget is None:  # where no lock can be taken, a run that has not saved yet may be live: refused
        monkeypatch.setattr(sys.modules["fungpt.rundir"], "fcntl", None)
        with pytest.raises(FunGPTError, match="already holds a training run"):
            train(cfg, progress=False)
        monkeypatch.undo()
    summary = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=3, max_minutes=None)),
                    progress=False)
    assert summary["step"] == 3
    assert "stopped before its first checkpoint: starting it over" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 3  # the old run's log rows (steps 0 and 1) are gone
    # trained weights are kept: a run whose only checkpoint is a best one after step 0 is not started over
    kept = copy_run(world, tmp_path / "kept")
    for folder in (kept / "checkpoints").glob("latest-*"):
        shutil.rmtree(folder)
    (kept / "latest.json").unlink()
    assert any(p.name != "best-0000000" for p in (kept / "checkpoints").glob("best-*"))
    with pytest.raises(FunGPTError, match="already holds a training run"):
        train(tiny_config(world["data"], kept, max_iters=3), progress=False)
    # a run that did save is still protected
    with pytest.raises(FunGPTError, match="already holds a training run"):
        train(tiny_config(world["data"], out, max_iters=3), progress=False)


def test_resume_on_a_prepared_folder_ignores_the_tokenizer_fields(world, tmp_path):
    """On a prepared folder data.tokenizer and vocab_size are unused (the folder has its tokenizer): resuming with
    the folder's true settings, or with the config's unused ones, must not be refused. config.json records the
    folder's (it recorded the config's: trained again from the text, its vocabulary was another)."""
    bpe = prepare(str(world["corpus"]), tmp_path / "bpe", tokenizer="bpe", vocab_size=300, progress=False)
    out = tmp_path / "run"
    train(tiny_config(bpe, out, max_iters=3), progress=False)  # (the config says char)
    saved = load_run_config(out).data
    assert (saved.tokenizer, saved.vocab_size) == ("bpe", 300)
    cfg = tiny_config(bpe, out, max_iters=5)
    cfg.data = DataConfig(path=str(bpe), tokenizer="bpe", vocab_size=300)
    assert train(cfg, resume=True, progress=False)["step"] == 5
    assert train(tiny_config(bpe, out, max_iters=7), resume=True, progress=False)["step"] == 7


def test_resume_on_a_grown_corpus_says_the_data_changed(world, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(Path(world["corpus"]).read_text())
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    with corpus.open("a") as f:
        f.write("Zebras QUIETLY jumped!\n")  # characters the first vocabulary did not have
    with pytest.raises(FunGPTError, match=r"its data now has \d+ distinct tokens where the checkpoint was trained "
                                          r"on \d+; .*corpus.txt .* changed since") as caught:
        train(tiny_config(corpus, out, max_iters=4), resume=True, progress=False)
    # the text it came from added to, the tokens it read are the way back: named (the same-size case named them)
    read = json.loads((out / "run.json").read_text())["data_dir"]
    assert f"(the tokens it read are still in {read}: --data.path {read})" in str(caught.value)
    # Another corpus given to the resume: named as such (it did not change), with the run's own
    other = tmp_path / "other.txt"
    other.write_text("abc abc abc\n" * 200)
    with pytest.raises(FunGPTError) as caught:
        train(tiny_config(other, out, max_iters=4), resume=True, progress=False)
    assert str(caught.value).endswith(f"; the run was started with data.path {str(corpus)!r}, and this resume gives "
                                      f"{str(other)!r}. Resume with the data it trained on (the tokens it read are "
                                      f"still in {read}: --data.path {read}), or train into a new out_dir")
    # the same file by another path is the same data: it changed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FunGPTError, match=r"; corpus.txt \(or its tokenizer settings\) changed since"):
        train(tiny_config("corpus.txt", out, max_iters=4), resume=True, progress=False)
    assert train(tiny_config(Path(read), out, max_iters=4), resume=True, progress=False)["step"] == 4  # (so it is)


def test_resume_on_edited_text_of_the_same_characters_says_so(world, tmp_path, capsys):
    """The halves of the corpus swapped (same characters, so the same vocabulary): resume went on without a word,
    with text it had trained on now in the val split."""
    corpus = tmp_path / "corpus.txt"
    text = Path(world["corpus"]).read_text()
    corpus.write_text(text)
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2), progress=False)
    train(tiny_config(corpus, out, max_iters=3), resume=True, progress=False)  # the same text: no note
    assert "the data changed" not in capsys.readouterr().out
    corpus.write_text("".join(reversed(text.splitlines(keepends=True))))  # the same lines, in another order
    train(tiny_config(corpus, out, max_iters=4), resume=True, progress=False)
    said = capsys.readouterr().out
    assert ("note: the data changed since step 3 (its text's sha256, or how it is split, differs from what the "
            "checkpoint recorded): the val split may now hold text the run trained on") in said
    # a prepared folder, prepared again with another split: said too
    data = prepare(str(corpus), tmp_path / "data", tokenizer="char", progress=False)
    run2 = tmp_path / "run2"
    train(tiny_config(data, run2, max_iters=2), progress=False)
    prepare(str(corpus), data, tokenizer="char", val_fraction=0.5, overwrite=True, progress=False)
    capsys.readouterr()
    train(tiny_config(data, run2, max_iters=3), resume=True, progress=False)
    assert "note: the data changed since step 2" in capsys.readouterr().out


def test_a_second_sigterm_during_the_interrupts_save_stops_at_once_saying_so(world, tmp_path):
    """The save after a SIGTERM ran once the run's handlers were gone: a second SIGTERM meanwhile ended the
    process silently, not with the line the first one promised ("SIGTERM again aborts")."""
    script = tmp_path / "twice.py"
    script.write_text(_TWO_SIGTERMS)
    out = tmp_path / "run"
    argv = ["--data.path", world["data"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL,
            "--train.batch-size", "4", "--train.max-iters", "1000", "--train.eval-interval", "1000",
            "--train.eval-iters", "1", "--train.checkpoint-interval", "1000"]
    proc = subprocess.run([sys.executable, str(script), "train", *map(str, argv)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1",
                                            "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "SIGTERM again: stopped at once; the last checkpoint is intact" in proc.stderr


_TWO_SIGTERMS = """
import os, signal, sys
import fungpt.cli
from fungpt import checkpoint as ckpt
from fungpt.data import BatchLoader
real_next, real_save, sent = BatchLoader.next_batch, ckpt.save_checkpoint, []
def next_batch(self):
    if self.split == "train" and not sent and getattr(self, "_n", 0) == 3:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first: finish the step, save, stop
    self._n = getattr(self, "_n", 0) + 1
    return real_next(self)
def save_checkpoint(out_dir, kind, *args, **kwargs):
    if sent and kind == "latest":
        os.kill(os.getpid(), signal.SIGTERM)  # the second, while that save runs
    return real_save(out_dir, kind, *args, **kwargs)
BatchLoader.next_batch = next_batch
ckpt.save_checkpoint = save_checkpoint
sys.exit(fungpt.cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command, as_the_command, rank", [("prepare", True, ""), ("export", True, ""),
                                                           ("train", True, ""), ("prepare", False, ""),
                                                           ("train", True, "1")])
def test_sigterm_midway_cleans_up_as_ctrl_c_does(command, as_the_command, rank, world, tiny_run, tmp_path):
    """`kill` (or `timeout`, a scheduler) during prepare, export or train's own data preparation ended the process
    at once: its temporary folder (a half-written dataset, a 15 MB half-written weights file) stayed behind. Now
    the command cleans up as for Ctrl-C, and says what stopped it, with the status a shell gives that signal. A
    program that calls cli.main() itself (a script, pytest) is still ended by the signal, after the clean-up.
    Under torchrun (rank 1), whose SIGTERM may come because another process failed, the line says so, and which
    process it is: the bare line read as if something outside had stopped the job."""
    out = tmp_path / "out"
    argv = {"prepare": ["prepare", "--input", world["corpus"], "--out", out],
            "export": ["export", "--run", tiny_run, "--out", out],
            "train": ["train", "--data.path", world["corpus"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL,
                      "--train.max-iters", "2"]}[command]
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_MIDWAY, str(as_the_command), *map(str, argv)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "FUNGPT_CACHE_DIR": str(cache),
                               "PYTHONPATH": str(ROOT), "RANK": rank, "TORCHELASTIC_RUN_ID": "x" if rank else ""})
    assert proc.returncode == (143 if as_the_command else -signal.SIGTERM), proc.stderr[-2000:]
    assert "SIGTERM sent" in proc.stdout  # (midway: its temporary folder was there)
    said = ("fungpt (rank 1): stopped by SIGTERM (from torchrun: if another process failed, its error is above)"
            if rank else "fungpt: stopped by SIGTERM")
    # and what the stop left, as Ctrl-C's line says it (it said nothing of it, nor of what to do next)
    left = {"prepare": "no partial dataset was left in", "export": "nothing was written to",
            "train": "while the data was being prepared, before training: no partial dataset was kept; the same "
                     "command prepares it again"}[command]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{said}: {left}") and "Traceback" not in proc.stderr
    left = [p.name for p in tmp_path.iterdir()] + [p.name for p in cache.rglob("*")]
    assert not [name for name in left if ".tmp-" in name], left
    assert not out.exists() or command == "train"  # (a run folder is made before its data is prepared)


_SIGTERM_MIDWAY = """
import json, os, signal, sys
import fungpt.cli, fungpt.pretrained
def then_sigterm(real, when=lambda *args: True):
    def hooked(*args, **kwargs):
        if when(*args):
            print("SIGTERM sent", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    return hooked
# prepare (also train's): as it writes meta.json into its temporary folder; export: before the tokenizer's files
json.dump = then_sigterm(json.dump, lambda obj, *rest: isinstance(obj, dict) and "source_sha256" in obj)
fungpt.pretrained.save_hf_tokenizer = then_sigterm(fungpt.pretrained.save_hf_tokenizer)
# as the fungpt command runs it (entry(), python -m fungpt ...: its start given), or as a program calling main()
command_start = fungpt.cli.process_start_time() if sys.argv[1] == "True" else None
sys.exit(fungpt.cli.main(sys.argv[2:], command_start=command_start))
"""


@pytest.mark.parametrize("as_the_command", [True, False])
def test_sigterm_during_training_ends_a_program_that_called_main_too(world, tmp_path, as_the_command):
    """During setup a SIGTERM ended a program that called main(["train", ...]) once main() had cleaned up, as
    main() promises; during the training loop main() saved the step and returned 143, and the program went on."""
    out = tmp_path / "out"
    argv = ["train", "--data.path", world["corpus"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL,
            "--train.max-iters", "1000", "--train.eval-interval", "1000", "--train.eval-iters", "1"]
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_IN_THE_LOOP, str(as_the_command), *map(str, argv)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "FUNGPT_CACHE_DIR": str(tmp_path / "cache"),
                               "PYTHONPATH": str(ROOT)})
    assert proc.returncode == (143 if as_the_command else -signal.SIGTERM), proc.stderr[-2000:]
    assert "main() returned" not in proc.stdout
    assert "SIGTERM: finishing this step and saving a checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "at step" in ln and "interrupted" in ln)
    assert check_loadable(out) == int(line.split(" at step ")[1].split(";")[0])  # (the step it stopped at, saved)


_SIGTERM_IN_THE_LOOP = """
import os, signal, sys
import fungpt.cli, fungpt.data
real, calls = fungpt.data.BatchLoader.next_batch, []
def third_batch_sigterm(self):  # (in the training loop: the step-0 eval draws the first two)
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self)
fungpt.data.BatchLoader.next_batch = third_batch_sigterm
command_start = fungpt.cli.process_start_time() if sys.argv[1] == "True" else None
status = fungpt.cli.main(sys.argv[2:], command_start=command_start)
if command_start is None:
    print("main() returned", status)
sys.exit(status)
"""


@pytest.mark.parametrize("which", ["final", "periodic"])
def test_ctrl_c_during_an_eval_leaves_it_and_saves_the_step(world, tmp_path, which):
    """Ctrl-C during the final eval (after the training loop's handlers) ended the command at once: the steps since the
    last checkpoint were lost (a speedrun, which saves only at its end, lost all of them). Now a signal during any
    of the run's evals leaves it and saves the step, as during a step; at the run's last step it says how to score
    it, since a resume would find nothing to train."""
    out = tmp_path / "out"
    # periodic: the eval at step 4 of 8 (eval_interval 4); final: the one after step 6 (step 0's is the first)
    every, steps = ("4", "8") if which == "periodic" else ("1000", "6")
    argv = ["train", "--data.path", world["corpus"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL,
            "--train.max-iters", steps, "--train.eval-interval", every, "--train.eval-iters", "50",
            "--train.checkpoint-interval", "1000"]
    proc = subprocess.run([sys.executable, "-c", _CTRL_C_IN_THE_SECOND_EVAL, *map(str, argv)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "FUNGPT_CACHE_DIR": str(tmp_path / "cache"),
                               "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Ctrl-C: leaving the eval and saving a checkpoint (Ctrl-C again aborts)" in proc.stderr
    assert "batches scored: 1\n" in proc.stdout  # left at its next batch, not scored to its end
    stopped_at = int(steps) // 2 if which == "periodic" else int(steps)
    assert check_loadable(out) == stopped_at
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [0]  # the left eval has no row
    said = next(ln for ln in proc.stderr.splitlines() if "interrupted" in ln)
    if which == "final":
        assert said == (f"fungpt: interrupted at step {steps}; checkpoint saved; its final eval was not done: "
                        f"`fungpt eval --run {out}` scores it")
        # a resume that trains further does that eval first: the curve has no hole at step 6
        assert main([*map(str, argv), "--resume", "--train.max-iters", "8"]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "val_loss" in r] == [0, 6, 8]
    else:
        assert said == f"fungpt: interrupted at step {stopped_at}; checkpoint saved. Resume with the same command " \
                       f"plus --resume"
        # The resume does the eval the signal left, first: its row and the best checkpoint are the uninterrupted
        # run's (it was never done: a better val loss at that step could not become the best)
        straight, older = tmp_path / "straight", tmp_path / "older"
        shutil.copytree(out, older)
        assert main([str(a) if a != out else str(straight) for a in argv]) == 0
        assert main([*map(str, argv), "--resume"]) == 0

        def evals(run):
            return [(r["step"], r["val_loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text()
                                                            .splitlines()) if "val_loss" in r]

        assert evals(out) == evals(straight) and [step for step, _ in evals(out)] == [0, 4, 8]
        assert ckpt.saved_step(out, "best") == ckpt.saved_step(straight, "best")
        # a checkpoint of an older FunGPT, which did not record the eval left: its metrics.jsonl, without that
        # step's eval row, tells
        real_load_state = ckpt.load_state
        with pytest.MonkeyPatch.context() as m:
            m.setattr(ckpt, "load_state", lambda folder: {k: v for k, v in real_load_state(folder).items()
                                                          if k != "eval_left"})
            assert main([str(a) if a != out else str(older) for a in argv] + ["--resume"]) == 0
        assert evals(older) == evals(straight)


def test_an_older_checkpoint_is_evaluated_again_only_where_its_log_shows_the_eval_left(world, tmp_path, capsys,
                                                                                        monkeypatch):
    """A checkpoint of an older FunGPT does not say whether a signal left its step's eval: metrics.jsonl tells, by a
    row of the step's training without one of its eval. Without the file (or the step's rows) nothing was left."""
    real_load_state = ckpt.load_state
    monkeypatch.setattr(ckpt, "load_state", lambda folder: {k: v for k, v in real_load_state(folder).items()
                                                            if k != "eval_left"})
    out = tmp_path / "run"
    train(tiny_config(world["data"], out, max_iters=8, eval_interval=4, checkpoint_interval=4), progress=False)
    (out / "metrics.jsonl").unlink()
    capsys.readouterr()
    train(tiny_config(world["data"], out, max_iters=12, eval_interval=4, checkpoint_interval=4), resume=True,
          progress=False)
    assert "the eval the interruption left" not in capsys.readouterr().out


def test_a_resume_that_evaluates_its_step_again_keeps_one_eval_row_for_it(tmp_path):
    """A resume that does the eval a signal left, then ends before its next checkpoint without saving (killed, or
    an error), left that eval's row for the next resume, which logged it again."""
    from fungpt.metrics import MetricsLog

    rows = [{"step": 0, "train_loss": 4.0, "val_loss": 4.1}, {"step": 4, "train_loss": 3.0},
            {"step": 4, "train_loss": 3.1, "val_loss": 3.2}, {"step": 5, "train_loss": 2.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig(out_dir=str(tmp_path), train=TrainConfig(log_interval=4))  # (step 4 a logged step: no stray row)
    MetricsLog(tmp_path, cfg, keep_until_step=4, redo_eval=True).close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:2]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    MetricsLog(tmp_path, cfg, keep_until_step=4).close()  # (a resume that does not: the row stays)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:3]


_CTRL_C_IN_THE_SECOND_EVAL = """
import importlib, os, signal, sys
import fungpt.cli
train_module = importlib.import_module("fungpt.train")  # (fungpt.train is the function)
evaluation = importlib.import_module("fungpt.evaluation")  # (evaluate's batches: its unless_stopped)
evaluate, batches_of, evals, batches = train_module.evaluate, evaluation.unless_stopped, [], []
def counted_evaluate(*args, **kwargs):
    evals.append(1)
    return evaluate(*args, **kwargs)
def ctrl_c_in_the_second_eval(items, stop):  # (evaluate's loop over batches: step 0's eval is the first)
    for item in batches_of(items, stop):
        if len(evals) == 2:
            batches.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        yield item
train_module.evaluate, evaluation.unless_stopped = counted_evaluate, ctrl_c_in_the_second_eval
status = fungpt.cli.main(sys.argv[1:])
print("batches scored:", len(batches))
sys.exit(status)
"""


def test_a_data_folder_with_a_file_name_that_is_not_utf8_trains(world, tmp_path):
    """Linux file names are bytes; one that is not UTF-8 arrives with its bytes escaped, and the data cache key
    hashed it as text: a raw UnicodeEncodeError."""
    folder = tmp_path / "texts"
    folder.mkdir()
    try:
        (folder / os.fsdecode(b"caf\xe9.txt")).write_bytes(Path(world["corpus"]).read_bytes())
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system takes UTF-8 names only")
    assert train(tiny_config(folder, tmp_path / "run", max_iters=2), progress=False)["step"] == 2


def test_resume_refuses_another_val_split_of_the_same_text(world, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(world["corpus"], out, max_iters=2), progress=False)
    cfg = tiny_config(world["corpus"], out, max_iters=4)
    cfg.data = DataConfig(path=str(world["corpus"]), val_fraction=0.2)
    with pytest.raises(FunGPTError, match=r"split with data.val_fraction = 0.1, not 0.2; .* put text it trained on"):
        train(cfg, resume=True, progress=False)
    assert train(tiny_config(world["corpus"], out, max_iters=4), resume=True, progress=False)["step"] == 4
    # a prepared folder keeps its own split, whatever data.val_fraction says: nothing to refuse
    prepared = tmp_path / "prepared-run"
    train(tiny_config(world["data"], prepared, max_iters=2), progress=False)
    cfg = tiny_config(world["data"], prepared, max_iters=4)
    cfg.data = DataConfig(path=str(world["data"]), val_fraction=0.2)
    assert train(cfg, resume=True, progress=False)["step"] == 4


def test_resume_says_when_its_lr_schedule_or_eval_batches_change(world, tmp_path, capsys):
    """Raising max_iters is how a run is trained longer, but by default the lr decay ends at max_iters: the
    schedule stretches and the lr goes back up from min_lr. Allowed, and said, with the numbers."""
    out = tmp_path / "run"
    train(tiny_config(world["corpus"], out, max_iters=6, checkpoint_interval=100), progress=False)
    capsys.readouterr()
    train(tiny_config(world["corpus"], out, max_iters=10, checkpoint_interval=100), resume=True, progress=False)
    said = capsys.readouterr().out
    said_lr = re.search(r"fungpt: note: the lr schedule changed \(max_iters 6 -> 10\) \(the decay ends at "
                        r"max_iters unless train.lr_decay_iters is set\): at step 6 the lr is now ([0-9.e-]+), "
                        r"not 0.0003\n", said)
    assert said_lr, said
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in r]
    step7 = next(r["lr"] for r in rows if r["step"] == 7)  # the step after 6 ran at the lr the note gave
    assert step7 > 0.001 and f"{step7:.3g}" == said_lr[1]

    from fungpt.train import resume_notes

    # a finished run extended by 2 steps: lr 1.001e-4 instead of min_lr 1e-4, shown with digits that differ
    saved = TrainConfig(max_iters=300, warmup_iters=5, lr=1e-3, min_lr=1e-4)
    (note,) = resume_notes(saved, dataclasses.replace(saved, max_iters=302), 300)
    assert note.endswith("at step 300 the lr is now 0.0001001, not 0.0001"), note
    # a budget run resumed without its budget, or a step run with one: the schedule changes what it follows
    budget = dataclasses.replace(saved, max_iters=10**6, max_minutes=2.0)
    (note,) = resume_notes(budget, dataclasses.replace(budget, max_minutes=None, lr=2e-3), 300)
    assert note == ("fungpt: note: the lr schedule changed (lr 0.001 -> 0.002, max_minutes 2.0 -> None): it now "
                    "follows the steps, not the budget's clock: at step 300 the lr is 0.002 (the decay ends at step "
                    "1,000,000), whatever the budget had brought it to"), note
    (note,) = resume_notes(saved, dataclasses.replace(saved, max_minutes=2.0), 300)
    assert note.startswith("fungpt: note: the lr schedule changed (max_minutes None -> 2.0): it now follows the "
                           "budget's clock, not the steps"), note
    # a longer budget, or another lr, on a budget: the share of the budget used, and the lr with it, move
    for change in ({"max_minutes": 3.0}, {"lr": 1e-2}):
        (note,) = resume_notes(budget, dataclasses.replace(budget, **change), 300)
        assert note.endswith("it follows the clock (the share of the budget used; warmup_iters and lr_decay_iters "
                             "count in shares of the run), so the lr may jump at step 300"), note
    assert resume_notes(budget, budget, 300) == []  # the same budget: its clock goes on
    # at step 0 (a budget used up before the first step) no step ran on the old schedule: nothing to note
    assert resume_notes(budget, dataclasses.replace(budget, max_minutes=3.0), 0) == []
    assert resume_notes(saved, dataclasses.replace(saved, max_iters=302), 0) == []
    # Muon's settings are no optimizer setting of an AdamW run: changing them changes nothing, and is not noted
    assert resume_notes(saved, dataclasses.replace(saved, muon_lr=0.05, muon_momentum=0.9), 300) == []
    muon = dataclasses.replace(saved, optimizer="muon")
    (note,) = resume_notes(muon, dataclasses.replace(muon, muon_lr=0.05), 300)
    assert note.startswith("fungpt: note: the optimizer settings changed (muon_lr 0.03 -> 0.05)"), note

    pinned = tmp_path / "pinned"  # decay end pinned, other seed: the schedule is the same, the eval batches not
    train(tiny_config(world["corpus"], pinned, max_iters=6, lr_decay_iters=10, checkpoint_interval=100),
          progress=False)
    capsys.readouterr()
    train(tiny_config(world["corpus"], pinned, max_iters=10, lr_decay_iters=10, checkpoint_interval=100, seed=7,
                      beta2=0.95, batch_size=6), resume=True, progress=False)
    said = capsys.readouterr().out
    assert "lr schedule" not in said
    assert "fungpt: note: train.seed changed (1337 -> 7): the eval batches differ from those before step 6" in said
    assert ("fungpt: note: the optimizer settings changed (beta2 0.99 -> 0.95): they apply from step 6 on, to the "
            "optimizer state saved with the old ones") in said
    assert load_run_config(pinned).train.beta2 == 0.95
    assert ("fungpt: note: [train] settings differ from the run's before step 6 (batch_size 4 -> 6): it goes on "
            "with these") in said
    train(tiny_config(world["corpus"], pinned, max_iters=12, lr_decay_iters=10, checkpoint_interval=100, seed=7,
                      beta2=0.95, batch_size=6, device="auto", log_interval=3, plot=False), resume=True,
          progress=False)
    assert "note" not in capsys.readouterr().out  # how it runs, not what it computes (device auto is the CPU here)


def test_the_stop_notice_of_a_torchrun_job_does_not_promise_a_save_it_may_not_make(capsys):
    """torchrun also sends SIGTERM when one of its processes died: the survivors cannot finish the step then."""
    flag = stopping.StopFlag(processes=2)
    flag._handle(signal.SIGTERM, None)
    assert flag.stop and ("SIGTERM: finishing this step and saving a checkpoint, unless a process of this job has "
                          "died (the last checkpoint stays intact) (SIGTERM again aborts)") in capsys.readouterr().err
    stopping.StopFlag()._handle(signal.SIGTERM, None)
    assert "SIGTERM: finishing this step and saving a checkpoint (SIGTERM again" in capsys.readouterr().err


def test_a_copy_of_a_checkpoint_kept_beside_it_is_left_alone(world, tmp_path):
    """The divergence advice resumes "from an earlier copy if you keep one": a copy kept in checkpoints/ under
    another name was deleted by the next save (every latest-* folder was taken for an old checkpoint)."""
    out = tmp_path / "run"
    train(tiny_config(world["corpus"], out, max_iters=3, checkpoint_interval=3), progress=False)
    kept = out / "checkpoints" / "latest-0000003-keep"
    shutil.copytree(ckpt.find_checkpoint(out), kept)
    train(tiny_config(world["corpus"], out, max_iters=6, checkpoint_interval=3), resume=True, progress=False)
    assert ckpt.find_checkpoint(out).name == "latest-0000006" and (kept / ckpt.MANIFEST_FILE).is_file()
    train(tiny_config(world["corpus"], out, max_iters=2), overwrite=True, progress=False)
    assert kept.is_dir()  # (--overwrite deletes what training wrote, not the user's copies)


def test_resume_compares_with_the_settings_the_checkpoint_trained_with(world, tmp_path, capsys, monkeypatch):
    """A start that fails before its first save has already rewritten config.json with its own settings. The
    next resume compares with what the checkpoint was trained with, which its manifest records."""
    out = tmp_path / "run"
    train(tiny_config(world["corpus"], out, max_iters=6, checkpoint_interval=100), progress=False)
    train_mod = sys.modules["fungpt.train"]

    def refused(*args, **kwargs):
        raise FunGPTError("the metrics cannot be written")

    real_log = train_mod.MetricsLog
    monkeypatch.setattr(train_mod, "MetricsLog", refused)
    with pytest.raises(FunGPTError, match="the metrics cannot be written"):  # fails after writing config.json
        train(tiny_config(world["corpus"], out, max_iters=10, checkpoint_interval=100, lr=1e-2,
                          batch_size=6, beta2=0.95), resume=True, progress=False)
    assert load_run_config(out).train.lr == 1e-2  # (what the failed start left behind)
    monkeypatch.setattr(train_mod, "MetricsLog", real_log)
    capsys.readouterr()
    train(tiny_config(world["corpus"], out, max_iters=10, checkpoint_interval=100, lr_decay_iters=6),
          resume=True, progress=False)
    said = capsys.readouterr().out
    assert "note" not in said, said  # the same settings as the checkpoint's, but for the run's length
    manifest = json.loads((ckpt.find_checkpoint(out) / ckpt.MANIFEST_FILE).read_text())
    assert manifest["train"]["max_iters"] == 10 and manifest["train"]["lr_decay_iters"] == 6


# ----------------------------------------------------------------------------------------------
# Resume after kill -9, at random moments (several here; >= 20 in the slow variant)

# Runs the real CLI, with each checkpoint file write slowed down so that kills often land in
# the middle of a save (between two files, or between the folder rename and the pointer).
_SLOW_SAVES = """
import os, sys, time
import fungpt.checkpoint as c
_write = c._write_file
def _slow(path, data):
    _write(path, data)
    time.sleep(float(os.environ["FUNGPT_TEST_SAVE_SLEEP"]))
c._write_file = _slow
from fungpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _train_cmd(data: Path, out: Path, max_iters: int, resume: bool) -> list[str]:
    return [sys.executable, "-c", _SLOW_SAVES, "train", "--data.path", str(data), "--out-dir", str(out),
            "--train.device", "cpu", *TINY_MODEL, "--train.batch-size", "4", "--train.max-iters", str(max_iters),
            "--train.checkpoint-interval", "1", "--train.eval-interval", "7", "--train.eval-iters", "1",
            "--train.log-interval", "1", "--train.warmup-iters", "2", *(["--resume"] if resume else [])]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FUNGPT_TEST_SAVE_SLEEP": "0.01"}


def _pointer_step(out: Path) -> int:
    try:
        return int(json.loads((out / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def kill_resume_cycle(data: Path, out: Path, kills: int, max_iters: int, seed: int) -> dict[str, int]:
    """SIGKILL a real training process `kills` times at random moments, checking the run each time."""
    rng = random.Random(seed)
    stats = {"kills": 0, "mid_save": 0, "loadable": 0, "no_checkpoint_yet": 0}
    for _ in range(kills):
        resume = (out / "config.json").is_file()
        start = _pointer_step(out)
        proc = subprocess.Popen(_train_cmd(data, out, max_iters, resume), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.0, 3.0))  # often during start-up, before the first save
        else:
            deadline = time.time() + 60
            while _pointer_step(out) == start and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)  # wait until it is training (a new save landed) ...
            time.sleep(rng.uniform(0.0, 0.4))  # ... then strike at a random moment
        if proc.poll() is not None:  # it finished (or failed) before the kill
            err = proc.stderr.read().decode()
            assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
            break
        proc.kill()
        proc.wait()
        proc.stderr.close()
        stats["kills"] += 1
        # a temp folder of this very process: it was killed in the middle of a save
        stats["mid_save"] += bool(list((out / "checkpoints").glob(f".*.tmp-{proc.pid}")))
        step = check_loadable(out)  # raises if anything is unloadable
        stats["loadable" if step is not None else "no_checkpoint_yet"] += 1
    final = subprocess.run(_train_cmd(data, out, max_iters, (out / "config.json").is_file()), env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert check_loadable(out) == max_iters
    train_steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert train_steps == list(range(1, max_iters + 1))  # every step logged once: no gap, no repeat
    return stats


def _reference_losses(data: Path, out: Path, max_iters: int) -> list[float]:
    proc = subprocess.run(_train_cmd(data, out, max_iters, False), env={**_env(), "FUNGPT_TEST_SAVE_SLEEP": "0"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(out)


def _losses(out: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]


def test_kill9_at_random_moments_then_resume(world, tmp_path):
    stats = kill_resume_cycle(world["data"], tmp_path / "run", kills=3, max_iters=30, seed=5)
    assert stats["kills"] >= 2, stats
    # Killed and resumed, the run is bit-for-bit the run that was never interrupted.
    assert _losses(tmp_path / "run") == _reference_losses(world["data"], tmp_path / "ref", 30)


@pytest.mark.slow
def test_kill9_many_random_moments(world, tmp_path):
    """>= 20 kill points (FUNGPT_KILL_POINTS to change); prints the tally for the report."""
    kills = int(os.environ.get("FUNGPT_KILL_POINTS", "24"))
    stats = kill_resume_cycle(world["data"], tmp_path / "run", kills=kills, max_iters=400, seed=2024)
    print(f"\nkill -9 tally: {stats}")
    assert stats["kills"] >= min(20, kills), stats
    assert _losses(tmp_path / "run") == _reference_losses(world["data"], tmp_path / "ref", 400)


# ----------------------------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.parametrize("signum, status, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_ctrl_c_saves_and_resume_continues(world, tmp_path, capsys, signum, status, name):
    """Ctrl-C, or `kill` (SIGTERM: also what schedulers and `docker stop` send), saves the step it ends at."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fungpt", "train", "--data.path", str(world["data"]), "--out-dir", str(out),
           "--train.device", "cpu", *TINY_MODEL, "--train.batch-size", "4", "--train.max-iters", "100000",
           "--train.lr-decay-iters", "100000", "--train.checkpoint-interval", "1000",
           "--train.eval-interval", "1000", "--train.eval-iters", "1", "--train.log-interval", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and sum("lr" in line for line in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert f"{name}: finishing this step and saving a checkpoint" in stderr
    line = next(ln for ln in stderr.splitlines() if "at step" in ln and "interrupted" in ln)
    assert ("by SIGTERM" in line) == (signum == signal.SIGTERM)
    stopped = int(line.split(" at step ")[1].split(";")[0])
    assert stopped >= 3
    assert check_loadable(out) == stopped  # saved at exactly the step it stopped
    assert _train_steps(out)[-1] == stopped
    code, err = run_cli(["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu",
                         *TINY_MODEL, "--train.batch-size", "4", "--train.max-iters", stopped + 4,
                         "--train.lr-decay-iters", "100000", "--train.eval-iters", "1", "--train.log-interval", "1",
                         "--resume"], capsys)
    assert code == 0, err
    assert _train_steps(out) == list(range(1, stopped + 5))  # continued from there, nothing redone or lost
    assert check_loadable(out) == stopped + 4


@pytest.mark.skipif(not hasattr(os, "fork") or not Path("/dev/ptmx").exists(), reason="needs a pseudo-terminal")
def test_a_terminal_that_hangs_up_saves_the_step(world, tmp_path):
    """SIGHUP: its terminal is gone. The run saves the step it stops at and ends with status 129."""
    import pty

    out, errlog = tmp_path / "run", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "fungpt", "train", "--data.path", str(world["data"]), "--out-dir", str(out),
           "--train.device", "cpu", *TINY_MODEL, "--train.batch-size", "4", "--train.max-iters", "100000",
           "--train.lr-decay-iters", "100000", "--train.checkpoint-interval", "100000", "--train.eval-interval", "1",
           "--train.eval-iters", "20"]  # (evals long enough that the hang-up often lands in one)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(errlog, "w") as err:
        pid, fd = pty.fork()
        if pid == 0:  # the child: stdout (where the eval lines go) is the terminal; stderr a file, to read
            os.dup2(err.fileno(), 2)
            os.execve(sys.executable, cmd, env)
    seen, deadline = b"", time.time() + 120
    while time.time() < deadline and seen.count(b"val loss") < 5:
        try:
            seen += os.read(fd, 4096)
        except OSError:
            break
    os.close(fd)  # hang up: the kernel sends SIGHUP to the terminal's processes
    _, status = os.waitpid(pid, 0)
    said = errlog.read_text()
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGHUP, said[-2000:]
    # (the hang-up lands in an eval, which it leaves, or after one, when the eval's line to the terminal fails first)
    assert re.search(r"SIGHUP: (finishing this step|leaving the eval) and saving a checkpoint", said), said[-2000:]
    assert "Traceback" not in said
    stopped = check_loadable(out)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert stopped >= 3 and max(r["step"] for r in rows) == stopped  # saved at the step it stopped at


def test_console_output_to_a_terminal_that_hung_up_stops_the_run_as_sighup(monkeypatch, capsys):
    """After a hang-up, writes to the terminal fail with EIO, often before the SIGHUP reaches Python: a progress
    line after an eval then ended the run with "error: Input/output error" and no checkpoint of its last steps."""
    import errno

    silenced = []
    monkeypatch.setattr(stopping, "silence_terminal", lambda pipes=False: silenced.append(pipes))
    flag = stopping.StopFlag()

    def hung_up(*args):
        raise OSError(errno.EIO, "Input/output error")

    flag.output(hung_up, "step 5: ...")
    assert flag.stop and flag.signum == signal.SIGHUP and silenced
    # said as for the SIGHUP itself: a log of stderr told nothing of why the run stopped (the rest went to the
    # terminal, now gone), and test_a_terminal_that_hangs_up_saves_the_step failed when the write came first
    assert "SIGHUP: finishing this step and saving a checkpoint" in capsys.readouterr().err
    exits = []
    monkeypatch.setattr(stopping.os, "_exit", lambda code: exits.append(code))
    flag._handle(signal.SIGHUP, None)  # the hang-up's own SIGHUP, arriving after the failed write ...
    assert not exits
    flag._handle(signal.SIGHUP, None)  # ... is not a second one; another SIGHUP is
    assert exits == [129]
    # a pipe without its reader (`| tee log` when the session drops) stops the run the same way, as SIGPIPE
    piped = stopping.StopFlag()
    piped.output(lambda *a: (_ for _ in ()).throw(BrokenPipeError(errno.EPIPE, "Broken pipe")), "x")
    assert piped.stop and piped.signum == signal.SIGPIPE and not piped.hung_up and silenced[-1] is True
    with pytest.raises(OSError):  # other errors are not these
        flag.output(lambda *a: (_ for _ in ()).throw(OSError(errno.EBADF, "Bad file descriptor")), "x")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_only_output_that_cannot_be_written_is_silenced(tmp_path):
    """stdout into a full file (/dev/full), stderr into a log on a disk with room: stderr was silenced too, and the
    error saying why training stopped was lost with it."""
    script = ("import importlib, sys\nt = importlib.import_module('fungpt.stopping')\nt.silence_files()\n"
              "print('to stdout', flush=True)\nprint('to stderr', file=sys.stderr, flush=True)\n")
    with open("/dev/full", "w") as full, open(tmp_path / "err.log", "w") as err:
        proc = subprocess.run([sys.executable, "-c", script], stdout=full, stderr=err, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0  # (stdout silenced: its write no longer fails)
    assert (tmp_path / "err.log").read_text() == "to stderr\n"


def test_console_output_to_a_full_disk_stops_the_run_with_its_step_saved(world, tmp_path, monkeypatch):
    """A log file (`> train.log`) whose disk filled up: the run died on the next progress line with "error: No space
    left on device" and lost the steps since its last checkpoint, though that disk had room."""
    import errno

    silenced = []
    monkeypatch.setattr(stopping, "silence_files", lambda: silenced.append(1))  # (not this test's own output)
    real_output, writes = stopping.StopFlag.output, []

    def full_after_a_while(self, write, *args):
        writes.append(1)
        if len(writes) > 6:  # (the bar's updates, one a step, and the eval lines)
            write = lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))  # noqa: E731
        real_output(self, write, *args)

    monkeypatch.setattr(stopping.StopFlag, "output", full_after_a_while)
    out = tmp_path / "run"
    with pytest.raises(FunGPTError) as e:
        train(tiny_config(world["data"], out, max_iters=50, checkpoint_interval=1000), progress=True,
              start_time=time.time())  # (as the fungpt command calls it: its messages name its flags)
    stopped = check_loadable(out)
    assert 1 < stopped < 50 and silenced
    assert str(e.value) == (f"training stopped at step {stopped}: its output could not be written (No space left on "
                            f"device); checkpoint saved. Free some space, or send the output elsewhere, then resume "
                            f"with the same command plus --resume")


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]


# ----------------------------------------------------------------------------------------------
# Divergence


def _nan_at_step(monkeypatch, bad_step: int) -> None:
    real = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        out = real(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] == bad_step:  # one micro-batch per step, so call n is step n
                return out[0], out[1] * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", forward)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_at_step(monkeypatch, 8)
    cfg = tiny_config(world["data"], out, max_iters=12, checkpoint_interval=3, eval_interval=100)
    seen = {}
    real_save = ckpt.save_checkpoint

    def spy(out_dir, kind, step, *a, **kw):
        folder = real_save(out_dir, kind, step, *a, **kw)
        seen[kind] = sha256_tree(folder)
        return folder

    monkeypatch.setattr(ckpt, "save_checkpoint", spy)
    with pytest.raises(FunGPTError, match=r"diverged at step 8: .*last checkpoint \(latest-0000006\) is untouched"):
        train(cfg, progress=False)
    folder = ckpt.find_checkpoint(out)
    assert check_loadable(out) == 6 and sha256_tree(folder) == seen["latest"]


def test_nonfinite_weights_are_never_saved(world, tmp_path, monkeypatch):
    """An update that overflows the weights (loss still finite) must not replace the good checkpoint."""
    train_module = sys.modules["fungpt.train"]
    real_configure = train_module.configure_optimizer

    def configure(*a, **kw):
        opt = real_configure(*a, **kw)
        real_step, calls = opt.step, {"n": 0}

        def step(*sa, **skw):
            real_step(*sa, **skw)
            calls["n"] += 1
            if calls["n"] == 6:
                with torch.no_grad():
                    next(iter(opt.param_groups[0]["params"])).fill_(float("inf"))

        opt.step = step
        return opt

    monkeypatch.setattr(train_module, "configure_optimizer", configure)
    out = tmp_path / "run"
    with pytest.raises(FunGPTError, match="diverged by step 6: the weights contain NaN/inf, so no checkpoint"):
        train(tiny_config(world["data"], out, max_iters=12, checkpoint_interval=3, eval_interval=100),
              progress=False)
    assert check_loadable(out) == 3


def test_skip_nonfinite_skips_the_step(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _nan_at_step(monkeypatch, 5)
    result = train(tiny_config(world["data"], out, max_iters=9, skip_nonfinite=True), progress=False)
    assert result["step"] == 9 and math_isfinite(result["val_loss"])
    said = capsys.readouterr().out
    assert "skipped step 5" in said and "warning" not in said
    assert 5 not in _train_steps(out) and 6 in _train_steps(out)
    assert check_loadable(out) == 9


def test_a_run_whose_final_val_loss_is_not_finite_says_so(world, tmp_path, capsys):
    """With skip_nonfinite and a huge lr, finite weights (about 1e30) whose outputs overflow: every step after the
    first skipped, a NaN val loss, then "done. Sample with ...", and sampling failed."""
    out = tmp_path / "run"
    result = train(tiny_config(world["data"], out, max_iters=4, skip_nonfinite=True, lr=1e30, min_lr=0.0,
                               warmup_iters=0), progress=False)
    assert not math_isfinite(result["val_loss"]) and result["trained"]
    said = capsys.readouterr().out
    assert "fungpt: warning: the final val loss is not a finite number: the model's outputs overflow" in said
    assert "--checkpoint best" not in said  # (its best is step 0's: the starting weights)
    # eval refuses a NaN loss in one line (it printed "loss nan", exit 0, and blamed random batches for the
    # difference from the logged NaN)
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the loss is nan: the model's outputs are not finite numbers" in err and "random batch" not in err
    assert "--checkpoint best" not in err
    # nor does export send it to its best, the starting weights
    assert main(["export", str(out), "--out", str(tmp_path / "exp0")]) == 2
    assert "diverged, and transformers would compute NaN from its export; train again with a lower train.lr" in \
        capsys.readouterr().err
    # a run that diverged after a good eval: train's warning and the note of sample and eval name its best (NaN
    # compared as not worse than the best, so that note was not given)
    good = tmp_path / "good"
    train(tiny_config(world["data"], good, max_iters=4, eval_interval=2), progress=False)
    capsys.readouterr()
    train(tiny_config(world["data"], good, max_iters=8, eval_interval=2, skip_nonfinite=True, lr=1e30, min_lr=0.0,
                      warmup_iters=0), resume=True, progress=False)
    best = ckpt.folder_step(ckpt.find_checkpoint(good, "best"))
    assert best in (2, 4)
    assert f"its best checkpoint (step {best}, val loss " in capsys.readouterr().out
    assert main(["eval", str(good)]) == 2
    assert f"has val loss nan: its training diverged; the run's best (step {best}, val loss " in capsys.readouterr().err
    assert main(["eval", str(good), "--checkpoint", "best"]) == 0
    # an export of the diverged weights (NaN in transformers) is refused; of the best, made
    capsys.readouterr()
    assert main(["export", str(good), "--out", str(tmp_path / "exp")]) == 2
    assert capsys.readouterr().err == (f"error: the last checkpoint of {good} (step 8) has val loss nan: its training "
                                       f"diverged, and transformers would compute NaN from its export; export the "
                                       f"run's best (step {best}) with --checkpoint best, or train again with a lower "
                                       f"train.lr\n")
    assert not (tmp_path / "exp").exists()
    assert main(["export", str(good), "--out", str(tmp_path / "exp"), "--checkpoint", "best"]) == 0
    # the command does not go on to invite a sample that would fail
    assert main(["train", "--data.path", str(world["data"]), "--out-dir", str(tmp_path / "cli"), "--model.n-layer",
                 "1", "--model.n-embd", "16", "--model.n-head", "2", "--model.block-size", "16", "--train.batch-size",
                 "2", "--train.max-iters", "3", "--train.eval-iters", "1", "--train.skip-nonfinite", "--train.lr",
                 "1e30", "--train.min-lr", "0", "--train.warmup-iters", "0"]) == 0
    said = capsys.readouterr().out
    assert "done, with a model whose outputs are not finite numbers" in said and "Sample with" not in said


def test_a_skipped_step_still_gets_its_eval_and_checkpoint(world, tmp_path, monkeypatch, capsys):
    """A skipped step went on to the next (`continue`) past its eval and checkpoint: the next save came a whole
    interval later, and the progress bar ended one step short for each skip."""
    out = tmp_path / "run"
    _nan_at_step(monkeypatch, 6)
    saved = []
    real_save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda o, kind, step, *a, **k: (saved.append((kind, step)),
                                                                                  real_save(o, kind, step, *a, **k))[1])
    train(tiny_config(world["data"], out, max_iters=9, skip_nonfinite=True, checkpoint_interval=3, eval_interval=6),
          progress=False)
    assert "skipped step 6" in capsys.readouterr().out
    evals = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert evals == [0, 6, 9] and ("latest", 6) in saved and 6 not in _train_steps(out)


def test_a_clock_that_moves_in_ticks_does_not_stop_training(world, tmp_path, monkeypatch):
    """Before Python 3.13, Windows' time.time() moves in 15.6 ms ticks: a faster step was timed 0 s, and the
    tokens per second divided by zero (a raw ZeroDivisionError that lost the steps since the last checkpoint)."""
    import time as time_module

    real = time_module.time
    monkeypatch.setattr(time_module, "time", lambda: real() // 100.0 * 100.0)  # (a 100 s tick: every step 0 s)
    result = train(tiny_config(world["data"], tmp_path / "run", max_iters=4), progress=False)
    assert result["step"] == 4
    rows = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert all(0 < r["dt_ms"] and r["mfu"] < 1 for r in rows)  # (timed on a fine clock: not 0 ms, MFU 100%)


def math_isfinite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def test_an_unexpected_error_exits_at_once_with_its_traceback(tmp_path):
    """A bug's exception went through Python's slow teardown (~1 s): under torchrun the peer it left stuck exited
    first, and torchrun named that innocent process as the root cause."""
    script = ("import fungpt.cli as cli\n"
              "def main(argv=None, **kw):\n    raise ValueError('a bug')\n"
              "cli.main = main\n"
              "import atexit\natexit.register(lambda: print('teardown ran'))\n"  # skipped by the fast exit
              "cli.entry()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.rstrip().endswith("ValueError: a bug") and "Traceback" in proc.stderr
    assert "teardown ran" not in proc.stdout
    # reported through sys.excepthook, which torch's elastic processes replace to prefix each line with the rank
    hooked = script.replace("cli.entry()", "sys.excepthook = lambda *e: print('hooked', e[1], file=sys.stderr)\n"
                                           "cli.entry()").replace("import fungpt.cli", "import sys\nimport fungpt.cli")
    proc = subprocess.run([sys.executable, "-c", hooked], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == "hooked a bug"


def test_outputs_with_names_near_the_length_limit_are_written(world, tmp_path):
    """A valid 249-character --out failed with "File name too long": the temporary name added ~25 characters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fungpt.plot import save_figure

    stem = "a" * 245
    fig = plt.figure()
    assert save_figure(fig, tmp_path / f"{stem}.png").stat().st_size > 0
    plt.close(fig)
    tmp, f = ckpt.open_new_temp(tmp_path / f"{stem}.json")
    with f:
        f.write("{}")
    assert tmp.parent == tmp_path
    assert main(["export", "--run", str(world["run"]), "--out", str(tmp_path / stem)]) == 0
    assert (tmp_path / stem / "config.json").is_file() and len(list(tmp_path.iterdir())) == 3  # (no temporaries)


def test_a_run_saved_with_a_setting_this_code_lacks_says_where_it_came_from(world, tmp_path, capsys):
    """A learner adds a [train] field, trains, then takes it out: sample said to see `fungpt train --help`, which
    cannot help with a run folder."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    from fungpt.config import RunConfig

    with pytest.raises(FunGPTError, match="if its run was saved by code"):  # (a folder named with " [" too)
        RunConfig.from_dict({"train": {"label_smoothing": 0.1}}, source="runs/my [v2]/config.json")
    saved = json.loads((run / "config.json").read_text())
    saved["train"]["label_smoothing"] = 0.1
    (run / "config.json").write_text(json.dumps(saved))
    assert main(["sample", "--run", str(run), "--max-new-tokens", "2"]) == 2
    assert_one_line_error(2, capsys.readouterr().err, "config.json [train]: unknown setting(s) ['label_smoothing']; "
                          "remove them from that config.json, or, if its run was saved by code (or a FunGPT "
                          "version) that had them, go back to that code")


def test_loading_a_run_leaves_torch_random_stream_as_it_was(world):
    """load_run drew the model's random initial weights (overwritten at once) from the caller's torch stream: in a
    notebook, sample or eval between two seeded cells changed what the second one drew."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_run(world["run"], device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_a_closed_stdout_or_stderr_is_no_error(tmp_path):
    """`fungpt train ... >&-`: Python makes a closed stream None, and a finished run ended in an AttributeError
    traceback and status 1 (with stderr closed, every command stopped at its first message)."""
    script = ("import sys\nimport fungpt.cli as cli\n"
              "def main(argv=None, **kw):\n    print('done')\n    print('a note', file=sys.stderr)\n    return 3\n"
              "cli.main = main\ncli.entry()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for closed in (">&-", "2>&-", ">&- 2>&-"):
        proc = subprocess.run(["sh", "-c", f'exec "$0" -c "$1" {closed}', sys.executable, script], cwd=tmp_path,
                              env=env, capture_output=closed == "2>&-", timeout=120)
        assert proc.returncode == 3, (closed, proc)  # main()'s own status
        if closed == "2>&-":
            assert proc.stdout == b"done\n"


def test_real_divergence_through_the_cli(world, tmp_path, capsys):
    """An absurd learning rate really diverges: exit 2, the step named, the good checkpoint untouched."""
    out = tmp_path / "run"
    base = ["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL,
            "--train.batch-size", "4", "--train.eval-iters", "1", "--train.checkpoint-interval", "1",
            "--train.warmup-iters", "0", "--train.lr-schedule", "constant"]
    code, err = run_cli([*base, "--train.max-iters", "3"], capsys)
    assert code == 0, err
    code, err = run_cli([*base, "--train.max-iters", "50", "--train.lr", "1e30", "--train.min-lr", "0",
                         "--train.grad-clip", "0", "--resume"], capsys)
    last = assert_one_line_error(code, err, "training diverged at step ")
    bad_step = int(last.split("diverged at step ")[1].split(":")[0])
    assert 3 < bad_step < 50
    # checkpoints are written every step, so the one kept is from the step before, and it loads
    assert check_loadable(out) == bad_step - 1
    assert f"latest-{bad_step - 1:07d}" in last


# ----------------------------------------------------------------------------------------------
# Loading never runs code


class _Payload:
    """Unpickling this runs `touch MARKER` (the classic malicious checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(folder: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and fix the manifest, so that only weights_only / safetensors stand in the way."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / ckpt.MANIFEST_FILE).read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


def _evil_bytes(marker: Path, tmp_path: Path) -> bytes:
    path = tmp_path / "evil.pt"
    torch.save({"step": 6, "best_val": 1.0, "elapsed_s": 1.0, "optimizer": _Payload(marker), "loader": [],
                "rng": []}, path)
    data = path.read_bytes()
    path.unlink()
    return data


def test_the_payload_is_live(tmp_path):
    """Control: loaded unsafely, the payload really runs (so the refusals below mean something)."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_malicious_state_pt_is_refused_by_resume_and_never_run(world, tmp_path, capsys):
    out = copy_run(world, tmp_path)
    marker = tmp_path / "PWNED"
    _plant(ckpt.find_checkpoint(out), ckpt.STATE_FILE, _evil_bytes(marker, tmp_path))
    ckpt.verify_checkpoint(ckpt.find_checkpoint(out))  # the checksums match: weights_only is the defence
    argv = ["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL,
            "--train.max-iters", "9", "--train.checkpoint-interval", "3", "--train.eval-iters", "2",
            "--train.eval-interval", "6", "--train.batch-size", "4", "--train.lr", "3e-3", "--train.min-lr", "3e-4",
            "--train.warmup-iters", "2", "--resume"]
    last = assert_one_line_error(*run_cli(argv, capsys), "refusing to load", "state.pt", "posix.system")
    assert "nothing in it was run" in last
    # sample reads only the safetensors weights: the planted pickle is never opened
    assert main(["sample", "--run", str(out), "--prompt", "the ", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert not marker.exists()


def test_output_to_a_full_disk_is_one_line_that_says_so(world, tmp_path, monkeypatch, capsys):
    """`fungpt inspect RUN > /dev/full` said only "error: No space left on device"."""
    import io

    import fungpt.cli as cli

    out = copy_run(world, tmp_path)

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cli, "_silence_stdout", lambda: None)  # (the test's stdout is not a file descriptor)
    monkeypatch.setattr(sys, "stdout", Full())
    assert main(["inspect", str(out)]) == 2
    assert capsys.readouterr().err == ("error: could not write: No space left on device (no file named: most likely "
                                       "this command's output, where it is redirected to a file): free some space, "
                                       "or send the output elsewhere\n")


def test_a_truncated_state_pt_is_called_damaged_not_unsafe(world, tmp_path):
    """A state.pt cut short (its manifest fixed to match) was "not a plain tensor checkpoint, nothing in it was run
    (PytorchStreamReader ... there is a high)": called unsafe, torch's text cut mid-sentence."""
    out = copy_run(world, tmp_path)
    folder = ckpt.find_checkpoint(out)
    data = (folder / ckpt.STATE_FILE).read_bytes()
    _plant(folder, ckpt.STATE_FILE, data[: len(data) // 2])
    with pytest.raises(FunGPTError) as err:
        ckpt.load_state(folder)
    assert str(err.value) == (f"cannot load {folder / ckpt.STATE_FILE}: the file is damaged (truncated or corrupt: "
                              f"PytorchStreamReader failed reading zip archive: failed finding central directory); "
                              f"resume from a good copy of the run, or train it again")
    _plant(folder, ckpt.STATE_FILE, b"")  # empty
    with pytest.raises(FunGPTError, match=r"the file is damaged \(truncated or corrupt: EOFError\)"):
        ckpt.load_state(folder)


def test_a_training_state_whose_moments_do_not_fit_the_model_is_refused_not_run_past_their_ends(world, tmp_path,
                                                                                                 capsys):
    """weights_only lets any plain tensor through: AdamW moments of one number each (a forged state.pt, its manifest
    fixed to match) made the fused AdamW write past their ends, and the resume died of a segmentation fault."""
    out = copy_run(world, tmp_path)
    folder = ckpt.find_checkpoint(out)
    state = ckpt.load_state(folder)
    for moments in state["optimizer"]["state"].values():
        moments["exp_avg"] = torch.zeros(1)
    forged = tmp_path / "forged.pt"
    torch.save(state, forged)
    _plant(folder, ckpt.STATE_FILE, forged.read_bytes())
    argv = ["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL,
            "--train.batch-size", "4", "--train.max-iters", "9", "--resume"]
    assert_one_line_error(*run_cli(argv, capsys), "the training state in", "does not fit this run", "exp_avg of a")


def test_torch_files_that_would_unpack_to_any_size_are_refused_before_reading(tmp_path):
    """A stride-0 view of one number is a tensor of any size (1.7 KB of pytorch_model.bin asked for 4 TB), and a
    compressed record unpacks to any size: torch.save writes neither."""
    import zipfile

    from fungpt.hf import _read_hf_weights

    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save({"transformer.wte.weight": torch.zeros(1).as_strided((10**9,), (0,))}, folder / "pytorch_model.bin")
    assert (folder / "pytorch_model.bin").stat().st_size < 4000
    with pytest.raises(FunGPTError, match=r"pytorch_model.bin is damaged: a tensor of shape \(1000000000,\) claims "
                                          r"more numbers than the file holds"):
        _read_hf_weights(folder)
    packed = tmp_path / "packed.pt"
    torch.save({"w": torch.zeros(1000)}, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item))
    assert torch.load(packed, weights_only=True)["w"].numel() == 1000  # (torch reads it: the check must refuse)
    with pytest.raises(FunGPTError, match="is compressed, which torch.save never writes"):
        ckpt.check_torch_file(packed)
    ckpt.check_torch_file(tmp_path / "plain.pt")  # (torch.save's own: fine)


def test_a_long_context_or_an_unreadable_weights_header_is_refused_before_the_model_is_built(world, tmp_path,
                                                                                              monkeypatch):
    """Learned positions were left out of the size the weights are checked against (block_size 2**24 x 256: 17 GB
    built), and a weights file whose header could not be read let the config's model be built first."""
    import fungpt.runs as runs_mod

    def copy_with(name: str, **model) -> Path:
        out = Path(copy_run(world, tmp_path / name))
        config = json.loads((out / "config.json").read_text())
        config["model"].update(model)
        (out / "config.json").write_text(json.dumps(config))
        for manifest in out.glob("checkpoints/*/manifest.json"):
            data = json.loads(manifest.read_text())
            data["model"].update(model)
            manifest.write_text(json.dumps(data))
        return out

    built = []
    monkeypatch.setattr(runs_mod, "GPT", lambda config: built.append(config) or pytest.fail("built"))
    with pytest.raises(FunGPTError, match="do not fit the model that"):
        load_run(copy_with("long", block_size=2**24, n_embd=256, n_head=4), device="cpu")
    out = copy_with("wide", n_layer=64, n_embd=8192, n_head=8)
    _plant(ckpt.find_checkpoint(out), ckpt.MODEL_FILE, b"not safetensors")
    with pytest.raises(FunGPTError, match=r"cannot read .*model.safetensors .*: the checkpoint is damaged"):
        load_run(out, device="cpu")
    assert built == []


def test_pickle_disguised_as_safetensors_is_refused_by_sample_and_resume(world, tmp_path, capsys):
    out = copy_run(world, tmp_path)
    marker = tmp_path / "PWNED"
    _plant(ckpt.find_checkpoint(out), ckpt.MODEL_FILE, pickle.dumps(_Payload(marker)))
    assert_one_line_error(*run_cli(["sample", "--run", out, "--max-new-tokens", "3", "--device", "cpu"], capsys),
                          "model.safetensors", "not a valid safetensors file")
    assert_one_line_error(*run_cli(["eval", "--run", out, "--device", "cpu"], capsys), "model.safetensors")
    argv = ["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL,
            "--train.batch-size", "4", "--train.max-iters", "9", "--resume"]
    assert_one_line_error(*run_cli(argv, capsys), "model.safetensors")
    assert not marker.exists()


def test_no_unsafe_torch_load_anywhere():
    """Every torch.load in the package passes weights_only=True (a grep, so new code is covered too)."""
    for path in (ROOT / "fungpt").glob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and not line.lstrip().startswith(("#", '"')) and "`" not in line:
                assert "weights_only=True" in line, f"{path.name}:{n}: {line.strip()}"
            assert "pickle.load" not in line, f"{path.name}:{n}"


# ----------------------------------------------------------------------------------------------
# Corrupt, truncated and mismatched checkpoints: one line naming the file


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _edit_config(out: Path, **model) -> None:
    d = json.loads((out / "config.json").read_text())
    d["model"].update(model)
    (out / "config.json").write_text(json.dumps(d))


def _other_tokenizer(out: Path, chars: str) -> None:
    (out / "tokenizer_meta.json").write_text(json.dumps({"kind": "char", "chars": list(chars)}))


def _same_size_tokenizer(out: Path) -> None:
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    chars = meta["chars"]
    chars[-1], chars[-2] = chars[-2], chars[-1]  # same size, different mapping
    (out / "tokenizer_meta.json").write_text(json.dumps(meta))


CORRUPTIONS = {
    "truncated weights": (lambda o: _truncate(ckpt.find_checkpoint(o) / "model.safetensors"),
                          ["model.safetensors", "truncated"]),
    "flipped byte in weights": (lambda o: _flip(ckpt.find_checkpoint(o) / "model.safetensors"),
                                ["model.safetensors", "sha256"]),
    "truncated state": (lambda o: _truncate(ckpt.find_checkpoint(o) / "state.pt"), ["state.pt", "truncated"]),
    "missing weights": (lambda o: (ckpt.find_checkpoint(o) / "model.safetensors").unlink(),
                        ["model.safetensors", "missing"]),
    "corrupt manifest": (lambda o: (ckpt.find_checkpoint(o) / "manifest.json").write_text("{not json"),
                         ["manifest.json", "corrupt"]),
    "missing manifest": (lambda o: (ckpt.find_checkpoint(o) / "manifest.json").unlink(), ["manifest.json"]),
    # (a corrupt pointer alone is recovered from: the newest complete folder is used, test_train.py)
    "corrupt pointer, no folder left": (lambda o: (shutil.rmtree(ckpt.find_checkpoint(o)),
                                                   (o / "latest.json").write_text("{\"dir\": ")),
                                        ["latest.json", "corrupt", "no complete checkpoint"]),
    "pointer to nowhere": (lambda o: shutil.rmtree(ckpt.find_checkpoint(o)), ["latest-", "missing"]),
    "corrupt config.json": (lambda o: (o / "config.json").write_text("[1, 2"), ["config.json", "corrupt"]),
    "config asks for another model": (lambda o: _edit_config(o, n_embd=64), ["config.json", "n_embd 32 -> 64"]),
    # fewer heads of the same width: every weight keeps its shape, so only the recorded config tells them apart
    "config asks for other heads": (lambda o: _edit_config(o, n_head=1), ["config.json", "n_head 2 -> 1"]),
    "tokenizer of another size": (lambda o: _other_tokenizer(o, "abc"), ["tokenizer_meta.json", "3 tokens"]),
    "tokenizer of the same size": (_same_size_tokenizer, ["tokenizer_meta.json", "not the one"]),
    "corrupt tokenizer": (lambda o: (o / "tokenizer_meta.json").write_text("nope"), ["tokenizer_meta.json"]),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_checkpoint_gives_one_line_naming_the_file(world, tmp_path, capsys, name):
    out = copy_run(world, tmp_path)
    damage, needles = CORRUPTIONS[name]
    damage(out)
    argv = ["sample", "--run", out, "--max-new-tokens", "3", "--device", "cpu"]
    if "state" in name:  # sample does not read the training state; resume does
        argv = ["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL,
                "--train.batch-size", "4", "--train.max-iters", "9", "--resume"]
    assert_one_line_error(*run_cli(argv, capsys), *needles)


def test_resume_refuses_a_corrupt_checkpoint_too(world, tmp_path, capsys, monkeypatch):
    out = copy_run(world, tmp_path)
    _flip(ckpt.find_checkpoint(out) / "model.safetensors")

    def prepare_data(*args, **kwargs):
        raise AssertionError("the data was prepared (which can take minutes) before the checkpoint was checked")

    monkeypatch.setattr(train_module, "resolve_model_and_data", prepare_data)
    argv = ["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL,
            "--train.batch-size", "4", "--train.max-iters", "9", "--resume"]
    assert_one_line_error(*run_cli(argv, capsys), "model.safetensors", "sha256")


# ----------------------------------------------------------------------------------------------
# Every bad input: non-zero exit, one `error:` line, no traceback


def _files(world, tmp_path) -> dict[str, str]:
    """Placeholders the cases below use; creates the files they need."""
    t = tmp_path
    (t / "bad_syntax.toml").write_text("[model\nn_layer = 2\n")
    (t / "unknown_key.toml").write_text("[train]\nlearning_rate = 0.1\n")
    (t / "misspelt.toml").write_text("[model]\nn_layers = 2\n")
    (t / "wrong_section.toml").write_text("[model]\nlearning_rate = 0.1\n")  # nanoGPT's name, but of [train]
    # block_size is close in spelling to [train]'s batch_size: renaming it so would have trained another batch
    (t / "block_size_in_train.toml").write_text("[train]\nblock_size = 64\nbatchsize = 3\n")
    # keys spelled as the flags are: block-size was taken for a misspelt batch_size
    (t / "dashed.toml").write_text('[train]\nblock-size = 64\nlearning-rate = 1.0\nmax-iters = 3\n')
    (t / "dashed_top.toml").write_text('out-dir = "x"\n')
    (t / "none.toml").write_text('[train]\nlr_decay_iters = "None"\n')  # (TOML has no null)
    (t / "train_shakespeare_char.py").write_text("out_dir = 'out'\nalways_save_checkpoint = False\n")  # nanoGPT's
    (t / "flat.toml").write_text("batch_size = 12\nvocab_size = 300\n")  # nanoGPT's flat config style
    (t / "min_lr.toml").write_text("[train]\nmin_lr = 1.0\n")
    (t / "wrong_type.toml").write_text('[model]\nn_layer = "four"\n')
    (t / "wrong_type_train.toml").write_text('[train]\nbatch_size = "four"\n')
    (t / "huge_lr.toml").write_text('[train]\nlr = 1' + "0" * 400 + '\n')
    (t / "out_dir_list.toml").write_text('out_dir = ["a", "b"]\n')
    (t / "unknown_section.toml").write_text("[optim]\nlr = 0.1\n")
    (t / "misspelt_section.toml").write_text("[trian]\nlr = 0.1\n")
    (t / "windows_escapes.toml").write_text('[data]\npath = "D:\\new\\texts"\n')  # (a newline and a tab)
    (t / "windows_hex.toml").write_text('[data]\npath = "C:\\Users\\me\\corpus.txt"\n')  # (\U: an escape)
    (t / "windows_dotted.toml").write_text('data.path = "D:\\new\\texts"\n')  # (a dotted key: the same)
    # (\n alone, which every file of several lines also holds as it is; \t in a file indented with tabs)
    (t / "windows_newline.toml").write_text('out_dir = "C:\\new_run"\n[train]\nmax_iters = 1\n')
    (t / "windows_tabbed.toml").write_text('[data]\n\tpath = "D:\\texts.txt"\n')
    (t / "huge_eval_iters.toml").write_text("[train]\neval_iters = 100000000\n")
    (t / "windows_half_doubled.toml").write_text('out_dir = "D:\\\\runs\\tiny"\n')  # (\\ once, \t not)
    (t / "windows_u_escape.toml").write_text('[data]\npath = "D:\\u0009x.txt"\n')
    (t / "not_utf8.toml").write_bytes(b"[train]\nlr = \xff\n")
    (t / "a_file").write_text("x")
    (t / "dangling").symlink_to("nowhere-yet")
    (t / "empty.txt").write_text("")
    (t / "utf16.txt").write_bytes("ROMEO:".encode("utf-16"))  # as Windows PowerShell's `>` writes it
    (t / "latin1.txt").write_bytes("ROMÉO:".encode("latin-1"))
    (t / "binary.bin").write_bytes(b"ROMEO\x00\x00\x01")
    os.mkfifo(t / "pipe.toml")  # (what `--config <(...)` passes, a pipe, named)
    (t / "empty.toml").write_text("# truncated by a script\n")
    other = t / "other"
    shutil.copytree(world["run"], other)
    (t / "prepared").mkdir()
    (t / "prepared" / "meta.json").write_text("{}")
    meta = json.loads((Path(world["data"]) / "meta.json").read_text())  # prepared folders edited by hand:
    handmade = {k: v for k, v in meta.items() if k != "max_id"}  # as a folder made without `fungpt prepare`
    (t / "handmade").mkdir()
    for f in ("train.bin", "val.bin"):
        shutil.copy(Path(world["data"]) / f, t / "handmade" / f)
    (t / "handmade" / "meta.json").write_text(json.dumps({**handmade, "vocab_size": 3}))
    for name, change in {"smallvocab": {"vocab_size": 3}, "strcount": {"train_tokens": str(meta["train_tokens"])},
                         "floatcount": {"train_tokens": float(meta["train_tokens"])},
                         "nullvocab": {"vocab_size": None}, "zerobytes": {"val_bytes": 0},
                         "bigvocab": {"vocab_size": meta["vocab_size"] + 10}}.items():
        shutil.copytree(world["data"], t / name)
        (t / name / "meta.json").write_text(json.dumps({**meta, **change}))
    shutil.copytree(world["data"], t / "strmeta")  # a JSON string holding every key's name
    (t / "strmeta" / "meta.json").write_text(json.dumps(" ".join(meta)))
    shutil.copytree(world["data"], t / "nobytes")  # made by hand, without the val text's size
    (t / "nobytes" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "val_bytes"}))
    nobytesrun = t / "nobytesrun"
    shutil.copytree(world["run"], nobytesrun)
    info = json.loads((nobytesrun / "run.json").read_text())
    (nobytesrun / "run.json").write_text(json.dumps({**info, "data_dir": str(t / "nobytes")}))
    shutil.copytree(world["data"], t / "damaged")  # .bin bytes changed after prepare recorded max_id
    for f in ("train.bin", "val.bin"):
        size = (t / "damaged" / f).stat().st_size
        (t / "damaged" / f).write_bytes(b"\xff" * size)
    shutil.copytree(world["data"], t / "lastid")  # one id, the last of val.bin, just past the vocabulary
    val = np.fromfile(t / "lastid" / "val.bin", dtype=meta["dtype"])
    val[-1] = meta["vocab_size"]
    val.tofile(t / "lastid" / "val.bin")
    damagedrun = t / "damagedrun"  # a run whose data folder was damaged since
    shutil.copytree(world["run"], damagedrun)
    info = json.loads((damagedrun / "run.json").read_text())
    (damagedrun / "run.json").write_text(json.dumps({**info, "data_dir": str(t / "damaged")}))
    (t / "project").mkdir()  # a folder of the user's own, with a config.json that is not a run's
    (t / "project" / "config.json").write_text('{"name": "my-app"}')
    (t / "hf").mkdir()  # like the folder `fungpt export` writes
    mlproj = t / "mlproj"  # another tool's model folder: its config.json, checkpoints/ and metrics.jsonl
    (mlproj / "checkpoints" / "epoch3").mkdir(parents=True)
    (mlproj / "checkpoints" / "epoch3" / "model.bin").write_bytes(b"weights")
    (mlproj / "config.json").write_text('{"model_type": "llama"}')
    (mlproj / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    (t / "nulljson").mkdir()
    (t / "nulljson" / "config.json").write_text("null")
    (t / "hf" / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    textrun = t / "textrun"  # a run trained on the text file itself (its data.tokenizer is used, and recorded)
    shutil.copytree(world["run"], textrun)
    saved = json.loads((textrun / "config.json").read_text())
    saved["data"]["path"] = str(world["corpus"])
    (textrun / "config.json").write_text(json.dumps(saved))
    return {"corpus": str(world["corpus"]), "data": str(world["data"]), "run": str(world["run"]),
            "other": str(other), "textrun": str(textrun), "tmp": str(t)}


TRAIN = ["train", "--data.path", "{data}", "--out-dir", "{tmp}/new", "--train.device", "cpu"]

BAD_INPUTS = {
    # model
    "n_embd not divisible by n_head": ([*TRAIN, "--model.n-embd", "30", "--model.n-head", "4"], "n_embd"),
    "n_layer zero": ([*TRAIN, "--model.n-layer", "0"], "n_layer"),
    "n_layer of 10**20": ([*TRAIN, "--model.n-layer", str(10**20)], "larger than any GPT ever trained"),
    "block_size of 10**12": ([*TRAIN, "--model.block-size", str(10**12)], "FunGPT accepts at most 16,777,216"),
    "batch_size of 10**20": ([*TRAIN, "--train.batch-size", str(10**20)], "batch_size = 100000000000000000000 is "
                                                                           "far too large"),
    "unknown pos_encoding": ([*TRAIN, "--model.pos-encoding", "spiral"], "pos_encoding"),
    "unknown activation": ([*TRAIN, "--model.activation", "tanh"], "activation"),
    "dropout 1.5": ([*TRAIN, "--model.dropout", "1.5"], "dropout"),
    "rope with odd head size": ([*TRAIN, "--model.pos-encoding", "rope", "--model.n-embd", "6",
                                 "--model.n-head", "2"], "even"),
    # LayerNorm of one number is its bias: the model was blind to its input, and trained without a word
    "n_embd 1 with LayerNorm": ([*TRAIN, "--model.n-embd", "1", "--model.n-head", "1"], "or norm='rmsnorm'"),
    "QK-norm at head size 1 with LayerNorm": ([*TRAIN, "--model.n-embd", "8", "--model.n-head", "8",
                                               "--model.qk-norm"], "use fewer heads (n_head < 8), or norm='rmsnorm'"),
    "block_size larger than the val split": ([*TRAIN, "--model.block-size", "100000"], "block_size"),
    "a data file damaged after prepare": (["train", "--data.path", "{tmp}/damaged", "--out-dir", "{tmp}/new",
                                           "--train.device", "cpu"], "train.bin holds token id 65535"),
    "an id just past the vocabulary, read by the full val pass": (
        ["train", "--data.path", "{tmp}/lastid", "--out-dir", "{tmp}/new", "--train.device", "cpu",
         *TINY_MODEL, "--train.batch-size", "4", "--train.max-iters", "1", "--train.eval-full-val"],
        "val.bin holds token id 22, but the vocabulary has 22"),
    "eval on a data file damaged since": (["eval", "--run", "{tmp}/damagedrun", "--device", "cpu"],
                                          "val.bin holds token id 65535"),
    # train
    "batch_size zero": ([*TRAIN, "--train.batch-size", "0"], "batch_size"),
    "batch_size negative": ([*TRAIN, "--train.batch-size", "-3"], "batch_size"),
    "negative lr": ([*TRAIN, "--train.lr", "-1"], "train.lr"),
    "min_lr above lr": ([*TRAIN, "--train.min-lr", "1"], "min_lr"),
    "beta1 of 1": ([*TRAIN, "--train.beta1", "1.0"], "beta1"),
    "unknown lr_schedule": ([*TRAIN, "--train.lr-schedule", "linear"], "lr_schedule"),
    "unknown device": ([*TRAIN, "--train.device", "tpu"], "device"),
    "cuda without a GPU": ([*TRAIN, "--train.device", "cuda"], "CUDA"),
    "mps without Apple silicon": ([*TRAIN, "--train.device", "mps"], "mps"),
    "unknown dtype": ([*TRAIN, "--train.dtype", "float8"], "dtype"),
    "negative grad_clip": ([*TRAIN, "--train.grad-clip", "-1"], "grad_clip"),
    "eval_iters zero": ([*TRAIN, "--train.eval-iters", "0"], "eval_iters"),
    "negative max_minutes": ([*TRAIN, "--train.max-minutes", "-1"], "max_minutes"),
    "negative seed": ([*TRAIN, "--train.seed", "-1"], "train.seed"),
    "seed of 2**64": ([*TRAIN, "--train.seed", str(2**64)], "train.seed"),
    "lr nan": ([*TRAIN, "--train.lr", "nan"], "finite"),
    "lr inf": ([*TRAIN, "--train.lr", "inf"], "finite"),
    # data
    "unknown tokenizer": ([*TRAIN, "--data.tokenizer", "words"], "tokenizer"),
    "missing data path": ([*TRAIN, "--data.path", "/no/such/file.txt"], "does not exist"),
    "config is a folder": ([*TRAIN, "--config", "{tmp}"], "is a folder"),
    "two config files": ([*TRAIN, "--config", "{tmp}/a.toml", "--config={tmp}/b.toml"], "given 2 times"),
    "val_fraction 1.5": ([*TRAIN, "--data.val-fraction", "1.5"], "val_fraction"),
    "negative vocab_size": ([*TRAIN, "--data.vocab-size", "-5"], "vocab_size"),
    "vocab_size for the char tokenizer": ([*TRAIN, "--data.vocab-size", "300"], "--data.vocab-size None"),
    "empty corpus": ([*TRAIN, "--data.path", "{tmp}/empty.txt"], "empty.txt"),
    "corrupt prepared folder": ([*TRAIN, "--data.path", "{tmp}/prepared"], "meta.json"),
    "prepared data with ids past its vocab_size": ([*TRAIN, "--data.path", "{tmp}/smallvocab"],
                                                   "but its vocab_size is 3: ids must be below it"),
    "hand-made data with ids past its vocab_size": ([*TRAIN, "--data.path", "{tmp}/handmade"],
                                                    "but meta.json's vocab_size is 3: ids must be below it"),
    "meta.json with a count as a string": ([*TRAIN, "--data.path", "{tmp}/strcount"],
                                           "train_tokens must be a whole number"),
    "meta.json with a count as a float": ([*TRAIN, "--data.path", "{tmp}/floatcount"],
                                          "train_tokens must be a whole number"),
    "meta.json without a vocab_size": ([*TRAIN, "--data.path", "{tmp}/nullvocab"], "vocab_size must be a whole number"),
    "meta.json with a vocab_size its tokenizer lacks": ([*TRAIN, "--data.path", "{tmp}/bigvocab"],
                                                         "says vocab_size 32 but the tokenizer beside it has 22"),
    "meta.json with val_bytes 0": ([*TRAIN, "--data.path", "{tmp}/zerobytes"],
                                   "val_bytes must be a whole number of at least 1 (got 0)"),
    "meta.json that is a string": ([*TRAIN, "--data.path", "{tmp}/strmeta"], "meta.json is corrupt (TypeError)"),
    # out_dir
    "out_dir holds another run": ([*TRAIN, "--out-dir", "{other}"], "already holds a training run"),
    "resume and overwrite": ([*TRAIN, "--out-dir", "{other}", "--resume", "--overwrite"], "contradict"),
    "resume an empty folder": ([*TRAIN, "--resume"], "nothing to resume"),
    "resume with another tokenizer": ([*TRAIN, "--data.path", "{corpus}", "--out-dir", "{textrun}", "--resume",
                                       "--data.tokenizer", "bpe"], "data.tokenizer = 'char'"),
    "resume with another optimizer": ([*TRAIN, "--out-dir", "{other}", "--resume", *TINY_MODEL, "--train.optimizer",
                                       "muon"], "it was trained with train.optimizer = 'adamw', not 'muon'"),
    "resume with another model": ([*TRAIN, "--out-dir", "{other}", "--resume", *TINY_MODEL[:-2],
                                   "--model.block-size", "8"], "different model"),
    "out_dir is a file": ([*TRAIN, "--out-dir", "{tmp}/a_file"], "is a file"),
    # (mkdir said only "File exists")
    "run path with a newline": (["sample", "--run", "{tmp}/my\nrun"], "my\\nrun does not exist"),  # (one line)
    "out_dir is a link to nowhere": ([*TRAIN, "--out-dir", "{tmp}/dangling"], "/dangling is a link to "),
    "out_dir under a link to nowhere": ([*TRAIN, "--out-dir", "{tmp}/dangling/run"],
                                        "/nowhere-yet, which does not exist; create that folder, or choose another"),
    "out_dir empty (a shell variable unset)": ([*TRAIN, "--out-dir", ""], "out_dir is empty: give the run's folder"),
    "--config empty": ([*TRAIN, "--config="], "--config is empty: give a config file's path"),
    # tyro suggested the flag closest in spelling: --train.batch-size, another setting that then trains silently
    "flag of another table": ([*TRAIN, "--train.block-size", "32"],
                              "--train.block-size is not a flag of fungpt train: use --model.block-size"),
    "flag by nanoGPT's name": ([*TRAIN, "--train.learning-rate=0.1"],
                               "--train.learning-rate is not a flag of fungpt train: use --train.lr"),
    "negated flag of another table": ([*TRAIN, "--train.no-bias"], "use --model.no-bias"),
    "out_dir has a config.json of something else": ([*TRAIN, "--out-dir", "{tmp}/project"], "not a FunGPT run"),
    "... also with --overwrite": ([*TRAIN, "--out-dir", "{tmp}/project", "--overwrite"], "not a FunGPT run"),
    "out_dir of another tool's model, with --overwrite": ([*TRAIN, "--out-dir", "{tmp}/mlproj", "--overwrite"],
                                                          "not a FunGPT run"),
    "out_dir with a config.json of null": ([*TRAIN, "--out-dir", "{tmp}/nulljson"], "not a FunGPT run"),
    "sample: a config.json of null": (["sample", "--run", "{tmp}/nulljson"], "not a FunGPT run config"),
    # config files
    "missing config file": ([*TRAIN, "--config", "{tmp}/nope.toml"], "nope.toml"),
    "TOML syntax error": ([*TRAIN, "--config", "{tmp}/bad_syntax.toml"], "not valid TOML"),
    "nanoGPT's Python config": ([*TRAIN, "--config", "{tmp}/train_shakespeare_char.py"],
                                "is not valid TOML: Invalid value (at line 2, column 26): FunGPT reads TOML, not "
                                "nanoGPT's Python configs"),
    "a run folder as the config": ([*TRAIN, "--config", "{run}"], "is a folder: pass a .toml file (see configs/ for "
                                   "examples), or "),
    "TOML unknown key": ([*TRAIN, "--config", "{tmp}/unknown_key.toml"],
                         "unknown setting(s) ['learning_rate'] (did you mean lr for learning_rate?); see"),
    "TOML misspelt key": ([*TRAIN, "--config", "{tmp}/misspelt.toml"], "(did you mean n_layer for n_layers?)"),
    "TOML train key in [model]": ([*TRAIN, "--config", "{tmp}/wrong_section.toml"],
                                  "[model]: unknown setting(s) ['learning_rate'] (learning_rate is lr, in [train]); "
                                  "see"),
    "TOML model key in [train]": ([*TRAIN, "--config", "{tmp}/block_size_in_train.toml"],
                                  "[train]: unknown setting(s) ['batchsize', 'block_size'] (block_size belongs in "
                                  "[model]; did you mean batch_size for batchsize?)"),
    "an empty init_from": ([*TRAIN, "--model.init-from", ""], "model config init_from is empty: use 'scratch', a "
                           "Hugging Face GPT-2 folder or a hub name such as gpt2"),
    "TOML None": ([*TRAIN, "--config", "{tmp}/none.toml"], "none.toml [train]: lr_decay_iters = \"None\" should be a "
                  "whole number; TOML has no null: for its default, delete the line"),
    "TOML keys with dashes": ([*TRAIN, "--config", "{tmp}/dashed.toml"],
                              "[train]: unknown setting(s) ['block-size', 'learning-rate', 'max-iters'] (block-size is "
                              "block_size, in [model]; did you mean lr for learning-rate, max_iters for max-iters?)"),
    "TOML out-dir": ([*TRAIN, "--config", "{tmp}/dashed_top.toml"],
                     "unknown top-level key(s) ['out-dir'] (out-dir is out_dir, at the top of the file); expected"),
    "TOML without tables": ([*TRAIN, "--config", "{tmp}/flat.toml"],
                            "unknown top-level key(s) ['batch_size', 'vocab_size'] (batch_size belongs in [train], "
                            "vocab_size belongs in [data] or in [model]); expected out_dir"),
    "TOML value a check refuses": ([*TRAIN, "--config", "{tmp}/min_lr.toml"],
                                   "min_lr.toml with the flags given: train.min_lr = 1.0 must be between 0 and "
                                   "train.lr"),
    "TOML wrong type (model)": ([*TRAIN, "--config", "{tmp}/wrong_type.toml"], "n_layer"),
    "TOML wrong type (train)": ([*TRAIN, "--config", "{tmp}/wrong_type_train.toml"], "batch_size"),
    "TOML integer beyond any float": ([*TRAIN, "--config", "{tmp}/huge_lr.toml"], "lr is too large for a number"),
    "TOML out_dir not a string": ([*TRAIN, "--config", "{tmp}/out_dir_list.toml"], '["a", "b"] should be a folder'),
    "TOML unknown section": ([*TRAIN, "--config", "{tmp}/unknown_section.toml"], "optim"),
    "eval_iters beyond any use": ([*TRAIN, "--train.eval-iters", str(10**30)], "train.eval_iters = "
                                  "1000000000000000000000000000000 is far too large (at most 2**24"),
    "max_minutes beyond a year": ([*TRAIN, "--train.max-minutes", "1e308"], "train.max_minutes = 1e+308 is more "
                                  "than a year (525,600 minutes): for no time limit, leave it unset"),
    "muon_momentum out of range": ([*TRAIN, "--train.muon-momentum", "-1"], "train.muon_momentum = -1.0 must be in "
                                   "[0, 1) (e.g. 0.95)"),
    "TOML misspelt section": ([*TRAIN, "--config", "{tmp}/misspelt_section.toml"],
                              "unknown top-level key(s) ['trian'] (did you mean [train] for [trian]?); expected"),
    "TOML Windows path read as escapes": ([*TRAIN, "--config", "{tmp}/windows_escapes.toml"],
                                          "windows_escapes.toml: [data] path = 'D:\\new\\texts' holds a control "
                                          "character: in double quotes a backslash starts an escape"),
    "TOML Windows path as a dotted key": ([*TRAIN, "--config", "{tmp}/windows_dotted.toml"],
                                          "windows_dotted.toml: [data] path = 'D:\\new\\texts' holds a control "
                                          "character"),
    "TOML Windows path with a newline escape": ([*TRAIN, "--config", "{tmp}/windows_newline.toml"],
                                                "windows_newline.toml: out_dir = 'C:\\new_run' holds a control "
                                                "character"),
    "TOML Windows path with a tab escape in a tabbed file": ([*TRAIN, "--config", "{tmp}/windows_tabbed.toml"],
                                                             "windows_tabbed.toml: [data] path = 'D:\\texts.txt' "
                                                             "holds a control character"),
    "TOML Windows path half doubled": ([*TRAIN, "--config", "{tmp}/windows_half_doubled.toml"],
                                       "windows_half_doubled.toml: out_dir = 'D:\\\\runs\\tiny' holds a control "
                                       "character"),
    "TOML control character as a \\u escape": ([*TRAIN, "--config", "{tmp}/windows_u_escape.toml"],
                                               "windows_u_escape.toml: [data] path = 'D:\\tx.txt' holds a control "
                                               "character"),
    "TOML eval_iters beyond any use": ([*TRAIN, "--config", "{tmp}/huge_eval_iters.toml"],
                                       "huge_eval_iters.toml with the flags given: train.eval_iters = 100000000 is "
                                       "far too large"),
    "inspect: a config training refuses": (["inspect", "{tmp}/huge_eval_iters.toml"],
                                           "huge_eval_iters.toml: train.eval_iters = 100000000 is far too large"),
    "TOML Windows path not TOML": ([*TRAIN, "--config", "{tmp}/windows_hex.toml"],
                                   "is not valid TOML: Invalid hex value (at line 2, column 13): in double quotes a "
                                   "backslash starts an escape (\\n, \\t, \\U...): write a Windows path in single "
                                   "quotes, path = 'C:\\data\\my.txt', or with forward slashes"),
    "misspelt example config": ([*TRAIN, "--config", "shakespeare-chr"], "config file shakespeare-chr does not exist; "
                                "did you mean shakespeare-char? give a config file's path, or the name of an example"),
    "missing config in a folder": ([*TRAIN, "--config", "{tmp}/shakespeare-chr.toml"], "shakespeare-chr.toml does not "
                                   "exist; give a config file's path"),  # (an example would not be found there)
    "TOML not UTF-8": ([*TRAIN, "--config", "{tmp}/not_utf8.toml"], "not_utf8.toml"),
    "TOML empty": ([*TRAIN, "--config", "{tmp}/empty.toml"], "empty.toml holds no settings; write the settings "
                                                             "into it, or leave --config out"),
    "TOML in a pipe": ([*TRAIN, "--config", "{tmp}/pipe.toml"], "pipe.toml is not a regular file (a pipe, such as "
                                                                "<(...), can be read only once)"),
    # sample / eval / prepare / plot
    "export: out a folder that is not empty": (["export", "--run", "{run}", "--out", "{tmp}/project"],
                                               "already exists and is not an empty folder"),
    "sample: missing run": (["sample", "--run", "{tmp}/nope"], "does not exist"),
    # an empty path (an unset shell variable) is no path: Path("") is the current folder
    "prepare: empty input": (["prepare", "--input", "", "--out", "{tmp}/x"], "--input is empty: give a text file"),
    "eval: empty input": (["eval", "{run}", "--input", ""], "--input is empty: give a text file"),
    "plot: empty out": (["plot", "{run}", "--out", ""], "--out is empty: give the path to write to"),
    "export: empty out": (["export", "{run}", "--out", ""], "--out is empty: give the path to write to"),
    "serve: empty run": (["serve", ""], "the run folder is empty: pass the out_dir of a training run"),
    "train: empty data.path": ([*TRAIN, "--data.path", ""], "data.path is empty: give a text file"),
    "sample: not a run folder": (["sample", "--run", "{tmp}"], "config.json"),
    "sample: a file as the run": (["sample", "--run", "{corpus}"], "corpus.txt is a file, not a run folder"),
    "sample: top_p 1.5": (["sample", "--run", "{run}", "--top-p", "1.5"], "top-p"),
    "sample: negative temperature": (["sample", "--run", "{run}", "--temperature", "-1"], "temperature"),
    "sample: top_k 0": (["sample", "--run", "{run}", "--top-k", "0"], "top-k"),
    "sample: missing prompt file": (["sample", "--run", "{run}", "--prompt-file", "{tmp}/nope.txt"], "nope.txt"),
    "sample: a UTF-16 prompt file": (["sample", "--run", "{run}", "--prompt-file", "{tmp}/utf16.txt"],
                                     "utf16.txt is UTF-16 text (it starts with UTF-16's byte-order mark), not UTF-8"),
    "sample: a prompt file that is not UTF-8": (["sample", "--run", "{run}", "--prompt-file", "{tmp}/latin1.txt"],
                                                "latin1.txt is not UTF-8 text (byte 3 is not): save it as UTF-8"),
    "sample: cuda without a GPU": (["sample", "--run", "{run}", "--device", "cuda"], "CUDA"),
    "sample: unknown device": (["sample", "--run", "{run}", "--device", "tpu"], "choose auto, cpu, cuda or mps"),
    "eval: a numbered device": (["eval", "--run", "{run}", "--device", "cuda:0"], "CUDA_VISIBLE_DEVICES"),
    "sample: temperature nan": (["sample", "--run", "{run}", "--temperature", "nan"], "temperature"),
    "sample: seed of 2**64": (["sample", "--run", "{run}", "--seed", str(2**64)], "--seed"),
    "sample: seed of 2**63": (["sample", "--run", "{run}", "--seed", str(2**63)], "from 0 to 2**63 - 1"),
    "sample: negative seed": (["sample", "--run", "{run}", "--seed", "-1"], "from 0 to 2**63 - 1"),
    "sample: a Hugging Face folder": (["sample", "--run", "{tmp}/hf"], "Hugging Face model"),
    "eval: input is a folder": (["eval", "--run", "{run}", "--input", "{tmp}"], "is a folder"),
    "plot: out under a file": (["plot", "{run}", "--out", "{tmp}/a_file/loss.png"], "a_file is a file, not a folder"),
    "export: out under a file": (["export", "--run", "{run}", "--out", "{tmp}/a_file/hf"],
                                 "a_file is a file, not a folder; choose another --out"),
    "eval: missing input": (["eval", "--run", "{run}", "--input", "{tmp}/nope.txt"], "nope.txt"),
    "eval: batch_size 0": (["eval", "--run", "{run}", "--batch-size", "0"], "batch-size"),
    "prepare: missing input": (["prepare", "--input", "{tmp}/nope.txt", "--out", "{tmp}/p"], "nope.txt"),
    "prepare: out exists": (["prepare", "--input", "{corpus}", "--out", "{data}"], "overwrite"),
    "plot: missing run": (["plot", "{tmp}/nope"], "nope does not exist: pass the out_dir of a training run"),
    "plot: not a run": (["plot", "{tmp}"], "has no metrics.jsonl: pass the out_dir of a training run"),
    "inspect: missing run": (["inspect", "{tmp}/nope"], "nope does not exist: pass the out_dir of a training run"),
    # (was "is not a FunGPT run folder (no config.json)", where the other commands say it does not exist)
    "positions: missing run": (["positions", "--run", "{tmp}/nope"], "nope does not exist; pass the out_dir of a "
                                                                       "training run"),
    # (Path("") is the current folder: a RUN="$UNSET" read whatever run the shell stood in)
    "sample: an empty run": (["sample", ""], "the run folder is empty: pass the out_dir of a training run"),
    "eval: an empty run": (["eval", "--run", " "], "the run folder is empty: pass the out_dir of a training run"),
    "plot: an empty run": (["plot", ""], "the run folder is empty: pass the out_dir of a training run"),
    "inspect: an empty target": (["inspect", ""], "the folder or config to inspect is empty"),
    "sample: no samples": (["sample", "--run", "{run}", "--num-samples", "0"], "--num-samples 0 must be positive"),
    "sample: negative new tokens": (["sample", "--run", "{run}", "--max-new-tokens", "-2"],
                                    "--max-new-tokens -2 must not be negative"),
    "inspect: not a run": (["inspect", "{corpus}"], "corpus.txt is neither a run folder nor a .toml config: pass"),
    "serve: port out of range": (["serve", "{run}", "--port", "70000"], "--port 70000"),
    "serve: negative port": (["serve", "{run}", "--port", "-1"], "--port -1"),
    "serve: a host name with an empty part": (["serve", "{run}", "--port", "0", "--host", "a..b"],
                                              "--host 'a..b' is not a valid address (it cannot be written as a "
                                              "host name: label empty or too long)"),
    "sample: a folder as the prompt file": (["sample", "--run", "{run}", "--prompt-file", "{tmp}"],
                                            ": Is a directory; pass a readable text file"),
    "sample: a binary prompt file": (["sample", "--run", "{run}", "--prompt-file", "{tmp}/binary.bin"],
                                     "binary.bin looks like a binary file (it holds NUL bytes); pass a text file"),
    # (was "the prompt file is empty", of a file never named)
    "sample: an empty --prompt-file": (["sample", "--run", "{run}", "--prompt-file", ""],
                                       "no prompt file was named (--prompt-file is empty): pass a text file's path"),
}

# tyro's own parse errors: it prints a framed message of several lines, which FunGPT turns into its one line
TYRO_ERRORS = {
    "unknown flag": ([*TRAIN, "--train.nope", "3"], "Unrecognized options: --train.nope, 3"),
    # (in plain words, as a config file's error says them: it was Python's "invalid literal for int() with base 10")
    "not a number": ([*TRAIN, "--train.max-iters", "many"], "Error parsing --train.max-iters: 'many' is not a whole "
                                                            "number"),
    "a float for a whole number": ([*TRAIN, "--train.max-iters", "1e3"],
                                   "Error parsing --train.max-iters: '1e3' is not a whole number: write 1000"),
    "not a float": ([*TRAIN, "--train.lr", "hot"], "Error parsing --train.lr: 'hot' is not a number"),
    "a float for an optional whole number": (["sample", "--run", "x", "--top-k", "1e3"],
                                             "Error parsing --top-k: '1e3' is not a whole number (nor None): write "
                                             "1000"),
    "bad choice": (["sample", "--run", "x", "--checkpoint", "worst"], "--checkpoint"),
    # (the options named without their descriptions, whether tyro draws its box with lines or plain)
    "missing required flag": (["prepare", "--input", "x"],
                              "error: Missing from fungpt prepare: --out STR (`fungpt prepare --help` lists"),
    "an empty argument": (["sample", "--run", "x", ""], "error: Unrecognized options: an empty argument (`"),
    "a value with a bar": (["prepare", "--out", "y", "x|"], "Unrecognized options: x| (`"),
    "missing value": (["sample", "--run", "x", "--prompt"], "Missing value for argument '--prompt'"),
    "not a number where None is allowed too": (["sample", "--run", "x", "--top-k", "1e30"],
                                               "Error parsing --top-k: '1e30' is not a whole number (nor None) (`"),
    "... with a semicolon in it": (["sample", "--run", "x", "--top-p", "x; y"],
                                   "Error parsing --top-p: 'x; y' is not a number (nor None) (`"),
    "... with a quote in it": (["sample", "--run", "x", "--top-k", "a'b"],
                               "Error parsing --top-k: \"a'b\" is not a whole number (nor None) (`"),
    # (tyro took the run folder after an unknown option as its value, and said only that the run was missing)
    "an unknown option before the run": (["eval", "--bogus", "{run}"], "error: Unrecognized options: --bogus (`"),
    "a misspelt option before the run": (["sample", "--max_new", "5", "{run}"],
                                         "error: Unrecognized options: --max_new; Perhaps you meant: "
                                         "--max-new-tokens (`fungpt sample --help` lists the options)"),
    # a value that starts with a dash reads as another option: the refusal said only "Missing value"
    "a value starting with a dash": (["sample", "x", "--prompt", "-To be"], "Missing value for argument '--prompt'. "
                                     "Expected 1 values.; a value that starts with a dash is written "
                                     "--prompt='-To be' (`"),
    # train's --config given to inspect, which reads a config as its run
    "inspect --config": (["inspect", "--config", "x.toml"], "error: fungpt inspect takes a config as it takes a run "
                         "folder, without a flag: fungpt inspect CONFIG.toml"),
    # a switch given a value, as a config file writes it (train.eval_full_val = true): tyro said "Unrecognized
    # options: true"
    "a switch given a value": ([*TRAIN, "--train.eval-full-val", "true"],
                               "error: --train.eval-full-val is a switch and takes no value: write "
                               "--train.eval-full-val for true, --train.no-eval-full-val for false"),
    "... its no- form, with =": ([*TRAIN, "--model.no_bias=False"], "error: --model.no_bias is a switch and takes no "
                                 "value: write --model.bias for true, --model.no-bias for false"),
    "... a command's": (["sample", "x", "--show-probs", "yes"], "error: --show-probs is a switch and takes no value"),
    "... with the rest of the refusal": (["prepare", "--input", "x", "--overwrite", "true"],
                                         "error: --overwrite is a switch and takes no value: write --overwrite for "
                                         "true, --no-overwrite for false; Missing from fungpt prepare: --out STR (`"),
    "not a switch, an extra value": ([*TRAIN, "--train.max-iters", "1", "1"], "error: Unrecognized options: 1 (`"),
    # beside --run, the switch's value was read as a second run: "the run is named 2 times (true, RUN)"
    "... beside --run": (["sample", "--run", "{run}", "--show-probs", "true"],
                         "error: --show-probs is a switch and takes no value"),
    # two dashes: the hint was given for one only ("--" reads as an option too)
    "a value starting with two dashes": (["sample", "x", "--prompt", "--hello"], "Missing value for argument "
                                         "'--prompt'. Expected 1 values.; a value that starts with a dash is written "
                                         "--prompt=--hello (`"),
    "... but not a bare --": (["sample", "x", "--prompt", "--"], "Missing value for argument '--prompt'. Expected 1 "
                              "values. (`"),
}


def test_a_bad_seed_is_refused_before_the_run_is_loaded(world, capsys):
    """--seed was checked once the checkpoint was loaded: a second line ("sampling RUN at step N") came first, and a
    GPT-2-sized run paid its whole load."""
    code, err = run_cli(["sample", "--run", str(world["run"]), "--seed", "-1"], capsys)
    assert code == 2 and err == "error: --seed -1 is out of range: use a whole number from 0 to 2**63 - 1\n", err


def test_an_empty_out_dir_on_a_resume_is_refused_as_empty_not_read_as_the_default_run(world, tmp_path, monkeypatch,
                                                                                       capsys):
    """`--out-dir "$RUN"` with RUN unset: the default run's folder was resumed from, and its config.json blamed."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(world["run"], tmp_path / RunConfig().out_dir)
    code, err = run_cli(["train", "--resume", "--out-dir", ""], capsys)
    assert code == 2 and err.startswith("error: out_dir is empty: give the run's folder") and err.count("\n") == 1, err
    (tmp_path / "config.json").write_text('{"name": "my-app"}')  # (nor this folder's: Path("") is ".")
    code, err = run_cli(["train", "--resume", "--out-dir", ""], capsys)
    assert code == 2 and err.startswith("error: out_dir is empty: give the run's folder") and err.count("\n") == 1, err


def test_eval_of_token_ids_without_their_texts_size_gives_the_loss_and_says_why_no_bits(world, tmp_path, capsys):
    """A folder of token ids made by hand (README: "Data of your own token ids") was refused by eval: its loss and
    perplexity stand without the text's size in bytes."""
    files = _files(world, tmp_path)
    code = main(["eval", "--run", files["tmp"] + "/nobytesrun", "--device", "cpu"])
    out, err = capsys.readouterr()
    # (the folder keeps its val_chars: bits per character are given)
    assert code == 0 and "has no val_bytes (the size of the val text), so bits per byte cannot be given" in err
    assert re.search(r"loss +\d\.\d{4} nats/token", out) and re.search(r"bits/byte +n/a", out), out
    assert re.search(r"bits/char +\d\.\d{4}", out), out


def test_eval_gives_the_loss_when_the_tokenizer_cannot_read_a_tokens_bytes(world, monkeypatch, capsys):
    """GPT-2's ids without tiktoken's files (offline, never cached): eval failed outright, though only bits per byte
    need the text; the loss and perplexity stand."""
    from fungpt.tokenizer import CharTokenizer

    real = CharTokenizer.token_bytes

    def offline(self, token_id):  # as GPT2Tokenizer answers eval's read of the first token (its other uses need none)
        if sys._getframe(1).f_code.co_name == "evaluate_run":
            raise FunGPTError("could not load GPT-2's encoding through tiktoken, whose files are not cached here")
        return real(self, token_id)

    monkeypatch.setattr(CharTokenizer, "token_bytes", offline)
    assert main(["eval", "--run", str(world["run"]), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert ("bits per byte and per character cannot be given here: they need the text of the first token, which the "
            "tokenizer cannot read (could not load GPT-2's encoding") in err
    assert re.search(r"loss +\d\.\d{4} nats/token", out) and re.search(r"bits/byte +n/a", out), out


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(world, tmp_path, capsys, name):
    argv, needle = BAD_INPUTS[name]
    files = _files(world, tmp_path)
    before = sha256_tree(Path(files["other"]))
    code, err = run_cli([a.format(**files) for a in argv], capsys)
    assert_one_line_error(code, err, needle)
    assert sha256_tree(Path(files["other"])) == before  # a refused command leaves existing runs alone
    assert (tmp_path / "project" / "config.json").read_text() == '{"name": "my-app"}'  # and the user's files
    assert (tmp_path / "mlproj" / "checkpoints" / "epoch3" / "model.bin").is_file()
    assert (tmp_path / "mlproj" / "config.json").is_file() and (tmp_path / "mlproj" / "metrics.jsonl").is_file()
    assert not (tmp_path / "new" / "checkpoints").exists()


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="Path.resolve() raises RuntimeError on a link loop before 3.13")
@pytest.mark.parametrize("argv", [["export", "--run", "{run}", "--out", "{loop}"],
                                  ["prepare", "--input", "{corpus}", "--out", "{loop}"], ["plot", "{loop}"]])
def test_a_symbolic_link_loop_is_one_clear_line(world, tmp_path, capsys, argv):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    files = {"run": str(world["run"]), "corpus": str(world["corpus"]), "loop": str(loop)}
    code, err = run_cli([a.format(**files) for a in argv], capsys)
    assert_one_line_error(code, err, f"{loop}: a symbolic link that leads back to itself; check the path")


def test_sample_shows_control_characters_as_escapes_on_a_terminal_only(world, monkeypatch):
    """A byte-level model's raw ESC, CR or NUL reached the terminal as they were (an ESC then '[' is a colour or
    cursor code); into a file or a pipe the text stays exactly as generated."""
    import io

    from fungpt.sample import for_terminal, sample

    # (a CRLF line's CR is kept: text trained from a Windows file printed "\x0d" at every line's end)
    assert for_terminal("a\x1b[31mb\r\nc\td\x00\x85é\rf") == "a\\x1b[31mb\r\nc\td\\x00\\x85é\\rf"
    from fungpt.sample import _TerminalStream

    stream = _TerminalStream()  # a CR that ends one piece waits for the next: a LF may follow it
    assert [stream("ab\r"), stream("\ncd\r"), stream("e"), stream("\r", last=True)] == ["ab", "\r\ncd", "\\re",
                                                                                          "\\r"]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys.modules["fungpt.sample"].TextStream, "add", lambda self, token: "\x1b[2J")
    monkeypatch.setattr(sys.modules["fungpt.sample"].TextStream, "flush", lambda self: "")
    piped, terminal = io.StringIO(), Terminal()
    for out in (piped, terminal):
        sample(world["run"], prompt="the", max_new_tokens=2, device="cpu", out=out)
    assert piped.getvalue() == "the\x1b[2J\x1b[2J\n" and terminal.getvalue() == "the\\x1b[2J\\x1b[2J\n"


def test_show_top_without_show_probs_says_it_changes_nothing(world, capsys):
    assert main(["sample", str(world["run"]), "--max-new-tokens", "2", "--show-top", "3"]) == 0
    assert "fungpt: note: --show-top 3 applies to --show-probs, which is not given" in capsys.readouterr().err


def test_a_prompt_file_under_a_quoted_home_folder(world, tmp_path, capsys, monkeypatch):
    """`--prompt-file=~/p.txt` (no shell expands that ~) was "No such file", where the run and eval's --input read
    ~ as the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "p.txt").write_text("the", encoding="utf-8")
    assert main(["sample", str(world["run"]), "--prompt-file=~/p.txt", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("the")


def test_a_typed_backslash_n_is_said_to_be_no_newline(world, tmp_path, capsys):
    """`--prompt 'ROMEO:\nIs it'` (the walkthrough's prompt, typed) reaches FunGPT as a backslash and an n: the char
    model was told to remove the backslash or train a BPE, not how to type a newline. Text from a file is text: a
    backslash there is the file's own, said as any unknown character."""
    for command in (["sample", str(world["run"]), "--max-new-tokens", "2"],
                    ["attention", str(world["run"]), "--out", str(tmp_path / "a.png")]):
        assert main([*command, "--prompt", "the\\ncat"]) == 2
        assert capsys.readouterr().err == (
            "error: --prompt holds \\n, which a command line passes as a backslash and an n, not as a newline, and "
            "this model has no backslash: in bash quote the prompt as $'...' (a $ before the quotes: "
            "$'ROMEO:\\nIs it'), or put it in a file (--prompt-file)\n")
    assert main(["sample", str(world["run"]), "--max-new-tokens", "2", "--prompt", "the\\tcat"]) == 2
    assert "not as a tab" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("the\\ncat", encoding="utf-8")
    assert main(["sample", str(world["run"]), "--max-new-tokens", "2", "--prompt-file", str(tmp_path / "p.txt")]) == 2
    assert "is not in this char-level vocabulary" in capsys.readouterr().err


def test_sample_says_which_weights_speak(world, capsys):
    """`fungpt sample` never said which checkpoint or step it read: a class could not tell which moment of a run
    still training it heard, nor that --checkpoint best of a run stopped early was its step-0 weights."""
    from fungpt.checkpoint import saved_step

    run = world["run"]
    for which, name in (("last", "latest"), ("best", "best")):
        assert main(["sample", str(run), "--max-new-tokens", "2", "--checkpoint", which]) == 0
        err = capsys.readouterr().err
        assert f"fungpt: sampling {run} at step {saved_step(run, name):,} (its {name} checkpoint)\n" in err


def test_an_empty_prompt_file_says_where_the_sample_starts(world, tmp_path, capsys):
    """An empty prompt file sampled from the default start without a word, as if the file had been read."""
    (tmp_path / "empty.txt").write_bytes(b"")
    assert main(["sample", str(world["run"]), "--prompt-file", str(tmp_path / "empty.txt"), "--max-new-tokens",
                 "2"]) == 0
    assert (f"fungpt: note: prompt file {tmp_path / 'empty.txt'} is empty: sampling from the model's default start, "
            f"as with no prompt") in capsys.readouterr().err


def test_a_run_folder_that_is_a_link_to_nowhere_says_so(tmp_path, capsys):
    """A link loop, or a link to a folder since deleted, as the run was reported as "does not exist"."""
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "gone").symlink_to(tmp_path / "deleted", target_is_directory=True)
    for name in ("loop", "gone"):
        assert_one_line_error(*run_cli(["sample", str(tmp_path / name)], capsys),
                              f"{tmp_path / name} is a symbolic link that leads nowhere (or back to itself); pass "
                              f"the out_dir of a training run")


def test_tyros_box_read_in_a_terminal_with_its_colours_and_positional_arguments():
    """In a terminal tyro colours its box: every error became "the command line could not be read"."""
    from fungpt.cli import _box_text

    bold, cyan, off = "\x1b[1m", "\x1b[36m", "\x1b[0m"
    box = (f"{bold}╭─ Required options ──────────────╮{off}\n"
           f"│ Missing from fungpt attention:  │\n"
           f"│     {cyan}STR{off}                         │\n"
           f"│         The run folder. {bold}(required){off} │\n"
           f"│     {cyan}--prompt STR{off}                │\n"
           f"│         The text. (required)    │\n"
           f"│ ─────────────────────────────── │\n"
           f"│ Unrecognized options:           │\n"
           f"│     --bogus                     │\n"
           f"│     1                           │\n"
           f"│ ─────────────────────────────── │\n"
           f"│ For full helptext, run:         │\n"
           f"│     fungpt attention --help     │\n"
           f"╰─────────────────────────────────╯\n")
    assert _box_text(box) == ("Missing from fungpt attention: STR (The run folder.), --prompt STR; Unrecognized "
                              "options: --bogus, 1")


@pytest.mark.parametrize("name", list(TYRO_ERRORS))
def test_parse_errors_are_one_clear_line_too(world, tmp_path, capsys, name):
    files = _files(world, tmp_path)
    argv, needle = TYRO_ERRORS[name]
    code, err = run_cli([a.format(**files) for a in argv], capsys)
    last = assert_one_line_error(code, err, needle)
    assert err.strip() == last and "╭" not in err and "--help` lists the options)" in last


def test_refusals_come_before_any_data_preparation(world, tmp_path, capsys, monkeypatch):
    """Out_dir and config mistakes must not wait for a (possibly long) preparation of the data."""

    def boom(*a, **k):
        raise AssertionError("data was prepared before the refusal")

    monkeypatch.setattr(sys.modules["fungpt.rundata"], "resolve_data", boom)
    other = copy_run(world, tmp_path)
    for argv, needle in [(["--out-dir", other], "already holds"), (["--out-dir", tmp_path / "x", "--resume"],
                                                                    "nothing to resume"),
                         (["--out-dir", other, "--resume", "--overwrite"], "contradict"),
                         (["--out-dir", tmp_path / "y", "--train.device", "cuda"], "CUDA"),
                         (["--out-dir", world["data"], "--overwrite"], "is a prepared dataset"),
                         (["--out-dir", Path(world["corpus"]).parent / "run"], "inside data.path")]:
        source = Path(world["corpus"]).parent if needle == "inside data.path" else world["corpus"]
        code, err = run_cli(["train", "--data.path", source, "--train.device", "cpu", *argv], capsys)
        assert_one_line_error(code, err, needle)
    assert (Path(world["data"]) / "tokenizer_meta.json").is_file()  # the dataset's files are all there


def test_a_closed_output_pipe_is_no_traceback(world, tmp_path):
    """`fungpt sample ... | head`: sample ends quietly with 0; a train that cannot write its output says it
    stopped and exits 141, never 0."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the usual block-buffered pipe
    env["FUNGPT_CACHE_DIR"] = str(world["base"] / "cache")

    def piped(argv: list[str], **extra_env: str) -> tuple[int, str]:
        proc = subprocess.Popen([sys.executable, "-m", "fungpt", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**env, **extra_env}, cwd=tmp_path)
        proc.stdout.read(10)  # like `head -c 10`, then the reader goes away
        proc.stdout.close()
        err = proc.stderr.read().decode()
        return proc.wait(timeout=120), err

    code, err = piped(["sample", "--run", str(world["run"]), "--max-new-tokens", "100000"])
    assert (code, "Traceback" in err) == (0, False), err[-2000:]
    code, err = piped(["train", "--help"])  # `fungpt train --help | head`: no training stopped, nothing to say
    assert (code, err) == (0, ""), err[-2000:]
    code, err = piped(["train", "--data.path", str(world["data"]), "--out-dir", str(tmp_path / "run"),
                       "--train.device", "cpu", *TINY_MODEL, "--train.max-iters", "2000"],
                      PYTHONUNBUFFERED="1")  # each line written at once: the first one after `head` left fails
    assert code == 141 and "Traceback" not in err and "output pipe was closed" in err, err[-2000:]
    # `2>&1 | head`: stderr is that pipe too, and the line saying so failed in its turn (exit status 1)
    proc = subprocess.Popen([sys.executable, "-m", "fungpt", "train", "--data.path", str(world["data"]), "--out-dir",
                             str(tmp_path / "both"), "--train.device", "cpu", *TINY_MODEL, "--train.max-iters", "2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"},
                            cwd=tmp_path)
    proc.stdout.read(10)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    # the reader gone mid-training (a progress line after an eval fails): the step is saved, as for SIGHUP; before,
    # the steps since the last checkpoint were lost
    out = tmp_path / "mid"
    proc = subprocess.Popen([sys.executable, "-m", "fungpt", "train", "--data.path", str(world["data"]), "--out-dir",
                             str(out), "--train.device", "cpu", *TINY_MODEL, "--train.max-iters", "2000",
                             "--train.eval-interval", "30", "--train.eval-iters", "1",
                             "--train.checkpoint-interval", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**env, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path)
    for line in proc.stdout:  # until training has started: then the reader goes away
        if line.startswith(b"step 0:"):
            break
    else:  # the output ended first: the run failed to start
        pytest.fail(f"no 'step 0:' line; exit {proc.wait(timeout=120)}: {proc.stderr.read().decode()[-2000:]}")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err[-2000:]
    assert "its output pipe was closed (e.g. by `| head`); checkpoint saved at step 30" in err, err[-2000:]
    assert json.loads((out / "latest.json").read_text())["step"] == 30


def test_running_out_of_cpu_memory_is_one_line(world, tmp_path, capsys, monkeypatch):
    """torch's CPU allocator raises a RuntimeError (numpy a MemoryError): one line with what to change."""
    import fungpt.train as _  # noqa: F401  (so that the module is there to patch)

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 3686400000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(sys.modules["fungpt.train"], "configure_optimizer", no_memory)
    code, err = run_cli(["train", "--data.path", world["data"], "--out-dir", tmp_path / "run", "--train.device",
                         "cpu", *TINY_MODEL], capsys)
    assert_one_line_error(code, err, "out of memory")
    assert "train.batch_size" in err and "--dry-run" in err


def test_running_out_of_gpu_memory_outside_a_training_step_is_one_line(world, capsys, monkeypatch):
    """CUDA's out-of-memory error from anywhere but the training step (sampling, eval, the optimizer's first
    step) was a traceback: the CLI only knew the CPU allocator's words."""
    import fungpt.sample  # noqa: F401  (so that the module is there to patch)

    def no_gpu_memory(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 15.74 GiB of which 1.06 GiB is free.")

    monkeypatch.setattr(sys.modules["fungpt.sample"], "load_run", no_gpu_memory)
    code, err = run_cli(["sample", "--run", world["run"]], capsys)
    assert_one_line_error(code, err, "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "smaller batch" in err


# ----------------------------------------------------------------------------------------------
# The stop signals, one piece at a time (the end-to-end runs are above)


@pytest.fixture()
def signals_kept():
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield kept
    for s, handler in kept.items():
        signal.signal(s, handler)


def test_stop_flag_handles_the_stop_signals_and_puts_the_old_handlers_back(signals_kept):
    flag = stopping.StopFlag()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    with flag:
        assert all(signal.getsignal(s) == flag._handle for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    assert signal.getsignal(signal.SIGINT) is signals_kept[signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


def test_stop_flag_takes_over_from_the_fungpt_commands_own_handlers(signals_kept):
    """The command turns SIGTERM and SIGHUP into an exception (so that prepare and export clean up); while it
    trains, the run's own handler must replace that one, or a `kill` would stop the run without saving its step."""
    from fungpt import _startup

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    restore = _startup.stop_signals_raise()
    assert all(signal.getsignal(s) is _startup.raise_stopped for s in (signal.SIGTERM, signal.SIGHUP))
    flag = stopping.StopFlag()
    with flag:
        assert all(signal.getsignal(s) == flag._handle for s in (signal.SIGTERM, signal.SIGHUP))
    assert all(signal.getsignal(s) is _startup.raise_stopped for s in (signal.SIGTERM, signal.SIGHUP))
    restore()
    restore()  # (a second call changes nothing)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


def test_stop_flag_leaves_ignored_signals_and_a_callers_own_handlers_alone(signals_kept):
    def mine(signum, frame):
        pass

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    signal.signal(signal.SIGTERM, mine)  # a program that calls train() and handles SIGTERM itself
    flag = stopping.StopFlag()
    with flag:
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) == flag._handle  # (Ctrl-C is the run's, unless ignored:)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job of a shell without job control
    with stopping.StopFlag():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_second_signal_aborts_at_once_with_its_own_status(monkeypatch, capsys):
    exits, silenced = [], []
    monkeypatch.setattr(stopping.os, "_exit", lambda code: exits.append(code))
    monkeypatch.setattr(stopping, "silence_terminal", lambda: silenced.append(1))
    for signum, status in ((signal.SIGTERM, 143), (signal.SIGHUP, 129)):
        flag = stopping.StopFlag()
        flag._handle(signum, None)
        assert flag.stop and flag.signum == signum and not exits
        flag._handle(signum, None)
        assert exits.pop() == status
    assert len(silenced) == 2  # SIGHUP's terminal is gone: silenced at each SIGHUP, never for SIGTERM
    assert "SIGTERM again: stopped at once; the last checkpoint is intact" in capsys.readouterr().err
    flag = stopping.StopFlag()
    flag._handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C: "fungpt: interrupted", status 130 (cli)
        flag._handle(signal.SIGINT, None)
    # Under torchrun a second Ctrl-C arrives as torchrun's SIGTERM: named as the user's Ctrl-C, by one process only
    for announce in (True, False):
        flag = stopping.StopFlag(announce=announce, processes=2)
        flag._handle(signal.SIGINT, None)
        capsys.readouterr()
        flag._handle(signal.SIGTERM, None)
        assert exits.pop() == 143
        err = capsys.readouterr().err  # (os._exit is a stub here: the handler goes on past it)
        assert err.startswith("\nfungpt: Ctrl-C again: stopped at once; the last checkpoint is intact\n") == announce
        assert "again: stopped" not in err or announce
    # a torchrun job of one process (processes=1): torchrun passes the second Ctrl-C on as SIGTERM all the same
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    flag = stopping.StopFlag(processes=1)
    flag._handle(signal.SIGINT, None)
    capsys.readouterr()
    flag._handle(signal.SIGTERM, None)
    assert exits.pop() == 143 and "Ctrl-C again: stopped at once" in capsys.readouterr().err
    assert not exits and len(silenced) == 2


def test_resume_notes_of_a_time_budget_say_the_lr_may_jump_not_by_how_much():
    """A budget run that reached max_iters first, resumed with a larger one: its schedule's share of the run done
    drops, and the lr goes back up (from 0.00014 to 0.008 in a run of the audit), as without a budget. Where it goes
    depends on the clock, so the note says that it may jump, not to what."""
    from fungpt.train import resume_notes

    saved = TrainConfig(max_iters=6, warmup_iters=0, max_minutes=1.0)
    (note,) = resume_notes(saved, dataclasses.replace(saved, max_iters=60), 6)
    assert note.startswith("fungpt: note: the lr schedule changed (max_iters 6 -> 60): it follows the clock") and \
        note.endswith("so the lr may jump at step 6"), note
    steps = dataclasses.replace(saved, max_minutes=None)
    (note,) = resume_notes(steps, dataclasses.replace(steps, max_iters=60), 6)  # without a budget: the numbers
    assert note.endswith("at step 6 the lr is now 0.000978, not 0.0001"), note


def test_loading_a_run_while_its_training_replaces_the_checkpoint_reads_the_new_one(world, tmp_path, monkeypatch):
    """`fungpt sample` beside a training run: between reading latest.json and reading the folder it names, the
    run may save anew and delete that folder. The load failed ("not a valid safetensors file"); it now
    follows the pointer to the new checkpoint."""
    out = copy_run(world, tmp_path)
    old = ckpt.find_checkpoint(out)
    real_verify, calls = ckpt.verify_checkpoint, []

    def verify_while_training_saves(folder, **kw):
        calls.append(folder)
        if folder == old and old.exists():  # the run saves step 9 and deletes the folder this load was to read
            new = old.with_name("latest-0000009")
            shutil.copytree(old, new)
            (out / "latest.json").write_text(json.dumps({"dir": f"checkpoints/{new.name}"}))
            shutil.rmtree(old)
        return real_verify(folder, **kw)

    monkeypatch.setattr(ckpt, "verify_checkpoint", verify_while_training_saves)
    run = load_run(out, device="cpu")
    assert calls == [old, old.with_name("latest-0000009")] and run.step == 6
    # a checkpoint that is damaged for good is still reported, after one look at the pointer
    calls.clear()
    _flip(ckpt.find_checkpoint(out) / "model.safetensors")
    with pytest.raises(FunGPTError, match=r"sha256.* \(or use the run's best checkpoint: --checkpoint best\)"):
        load_run(out, device="cpu")
    assert [c.name.split("-")[0] for c in calls] == ["latest", "best"]  # (the best one verified for the hint)


def test_resume_drops_metrics_rows_with_a_step_that_is_not_a_whole_number(world, tmp_path, capsys):
    """`{"step": Infinity}` (valid to Python's json) made every resume end in a raw OverflowError."""
    out = copy_run(world, tmp_path)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": Infinity, "train_loss": 1.0}\n{"step": 1e999}\n{"step": NaN}\n')
    code, err = run_cli(["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu",
                         *TINY_MODEL, "--train.batch-size", "4", "--train.max-iters", "9", "--resume"], capsys)
    assert code == 0, err
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert not [r for r in rows if "Infinity" in r or "1e999" in r or "NaN" in r]
    assert json.loads(rows[-1])["step"] == 9


def test_a_resume_that_computes_differently_says_so(world, tmp_path, capsys):
    """Exact resume holds for the same arithmetic: another matmul library (FUNGPT_CPU_MATMUL) or thread count
    adds the sums in another order, and the losses then leave the uninterrupted run's in the last digits. The
    resume said nothing, and run.json was rewritten as if the whole run had computed the new way."""
    argv = ["train", "--data.path", world["data"], "--train.device", "cpu", *TINY_MODEL, "--train.batch-size", "4",
            "--train.max-iters", "9", "--resume"]
    same = copy_run(world, tmp_path / "same")
    assert main([str(a) for a in [*argv, "--out-dir", same]]) == 0
    assert "arithmetic changed" not in capsys.readouterr().out
    other = copy_run(world, tmp_path / "other")
    info = json.loads((other / "run.json").read_text())
    threads = info.get("threads", torch.get_num_threads())
    (other / "run.json").write_text(json.dumps({**info, "threads": threads + 5, "cpu_matmul": "elsewhere"}))
    assert main([str(a) for a in [*argv, "--out-dir", other]]) == 0
    out = capsys.readouterr().out
    assert (f"note: the arithmetic changed since step 6 (cpu_matmul elsewhere -> {info['cpu_matmul']}, threads "
            f"{threads + 5} -> {threads})") in out
    assert json.loads((other / "run.json").read_text())["threads"] == threads


def test_small_file_writes_never_follow_a_link_planted_at_their_temporary_name(tmp_path, monkeypatch):
    """latest.json, config.json and the like were written through .NAME.tmp-PID, a name anyone could guess: a
    symlink made there in advance (in a shared run folder) sent the write to a file outside the folder."""
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / f".latest.json.tmp-{os.getpid()}").symlink_to(outside)  # the old, predictable name
    ckpt.atomic_write_text(run / "latest.json", '{"step": 1}')
    assert outside.read_text() == "keep me"
    assert json.loads((run / "latest.json").read_text()) == {"step": 1}

    # Even a link at the very name chosen (here forced) is refused, not followed, and not deleted.
    monkeypatch.setattr(ckpt.secrets, "token_hex", lambda n: "abcd")
    planted = run / f".config.json.tmp-{os.getpid()}-abcd"
    planted.symlink_to(outside)
    with pytest.raises(FunGPTError, match=r"^could not write .*config\.json: File exists"):
        ckpt.atomic_write_text(run / "config.json", "{}")
    assert outside.read_text() == "keep me" and planted.is_symlink() and not (run / "config.json").exists()


DEEP = "[" * 100_000 + "]" * 100_000  # json.loads runs out of recursion (RecursionError, not a ValueError)
LONG_INT = '{"step": ' + "9" * 5000 + ', "dir": 1, "kind": ' + "9" * 5000 + "}"  # int() refuses 4,300+ digits


def _with_infinite_step(manifest: Path) -> None:
    manifest.write_text(manifest.read_text().replace('"step": 6', '"step": Infinity'))


JSON_DAMAGE = {  # a run's JSON file damaged beyond what JSONDecodeError covers: (damage, command, needle)
    "config.json nested too deeply": (lambda o: (o / "config.json").write_text(DEEP), "sample", "config.json"),
    "config.json with a 5000-digit number": (lambda o: (o / "config.json").write_text(LONG_INT), "sample",
                                             "config.json"),
    "manifest nested too deeply": (lambda o: (ckpt.find_checkpoint(o) / "manifest.json").write_text(DEEP), "sample",
                                   "manifest.json is corrupt"),
    "manifest with a 5000-digit step": (lambda o: (ckpt.find_checkpoint(o) / "manifest.json").write_text(LONG_INT),
                                        "sample", "manifest.json is corrupt"),
    "manifest with an infinite step": (lambda o: _with_infinite_step(ckpt.find_checkpoint(o) / "manifest.json"),
                                       "sample", "manifest.json is corrupt"),
    "tokenizer_meta.json nested too deeply": (lambda o: (o / "tokenizer_meta.json").write_text(DEEP), "sample",
                                              "tokenizer_meta.json is corrupt"),
    "run.json nested too deeply": (lambda o: (o / "run.json").write_text(DEEP), "eval",
                                   "run.json is missing or corrupt"),
    "run.json with a 5000-digit number": (lambda o: (o / "run.json").write_text(LONG_INT), "eval", "run.json"),
}


@pytest.mark.parametrize("name", list(JSON_DAMAGE))
def test_json_files_damaged_past_a_decode_error_are_one_line(world, tmp_path, capsys, name):
    """Deep nesting raised RecursionError and a 5,000-digit number a bare ValueError: both were tracebacks."""
    out = copy_run(world, tmp_path)
    damage, command, needle = JSON_DAMAGE[name]
    damage(out)
    argv = {"sample": ["sample", "--run", out, "--max-new-tokens", "3", "--device", "cpu"],
            "eval": ["eval", "--run", out, "--device", "cpu", "--batch-size", "2"]}[command]
    assert_one_line_error(*run_cli(argv, capsys), needle)


def test_other_json_damaged_past_a_decode_error(world, tmp_path, capsys):
    """The pointer, meta.json, a Hugging Face config and a metrics row, each nested too deeply."""
    out = copy_run(world, tmp_path)
    folder = ckpt.find_checkpoint(out)
    (out / "latest.json").write_text(DEEP)  # a damaged pointer falls back to the newest whole folder
    assert ckpt.find_checkpoint(out) == folder

    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    (data / "meta.json").write_text(DEEP)
    with pytest.raises(FunGPTError, match=r"meta\.json is corrupt"):
        load_meta(data)

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(DEEP)
    from fungpt.hf import hf_config
    with pytest.raises(FunGPTError, match=r"cannot read .*config\.json"):
        hf_config(hf)

    with (out / "metrics.jsonl").open("a") as f:  # a damaged row is skipped, as a half-written one is
        f.write(DEEP + "\n" + LONG_INT + "\n")
    assert main(["plot", str(out), "--out", str(tmp_path / "loss.png")]) == 0


@pytest.mark.parametrize("field, value", [("step", float("inf")), ("timings", "abc"), ("timings", {"step": "slow"}),
                                          ("tokens", "many"), ("optimizer", "x"),  # (AttributeError: 'str' ...)
                                          ("optimizer", {"state": "x", "param_groups": []})])
def test_a_state_pt_with_a_field_of_the_wrong_type_is_one_line(world, tmp_path, capsys, field, value):
    """Safe to load (plain types), but not what FunGPT saved: int(inf) raised OverflowError, and timings or tokens
    of another type a TypeError a few lines later, after config.json had been rewritten."""
    out = copy_run(world, tmp_path)
    folder = ckpt.find_checkpoint(out)
    state = torch.load(folder / ckpt.STATE_FILE, weights_only=True)
    state[field] = value
    path = tmp_path / "state.pt"
    torch.save(state, path)
    _plant(folder, ckpt.STATE_FILE, path.read_bytes())
    config_before = (out / "config.json").read_bytes()
    argv = ["train", "--data.path", world["data"], "--out-dir", out, "--train.device", "cpu", *TINY_MODEL,
            "--train.batch-size", "4", "--train.max-iters", "9", "--train.eval-iters", "3", "--resume"]
    assert_one_line_error(*run_cli(argv, capsys), "the training state in", "state.pt does not fit this run")
    assert (out / "config.json").read_bytes() == config_before


def test_a_runs_config_json_is_a_config_file_too(world, tmp_path, capsys):
    """`--config RUN/config.json` (train another run like that one) said "not valid TOML"."""
    from fungpt.config import load_config

    saved = world["run"] / "config.json"
    as_config, run_cfg = load_config(saved), load_run_config(world["run"])
    # every setting, but vocab_size: the data's tokenizer decides it again (or a fine-tune's, trimmed)
    default_vocab = RunConfig().model.vocab_size
    assert as_config == dataclasses.replace(run_cfg, model=dataclasses.replace(run_cfg.model, vocab_size=default_vocab))
    out = tmp_path / "again"
    assert main(["train", "--config", str(saved), "--out-dir", str(out), "--train.max-iters", "2"]) == 0
    again = load_run_config(out)
    assert again.model == load_run_config(world["run"]).model and again.train.max_iters == 2
    (tmp_path / "list.json").write_text("[1, 2]")
    assert_one_line_error(*run_cli(["train", "--config", tmp_path / "list.json"], capsys),
                          "list.json is not a FunGPT run config (it holds a JSON list")


def test_a_model_vocab_size_given_from_scratch_is_said_to_be_replaced(world, tmp_path, capsys):
    """--model.vocab-size looks settable (its help said so), but from scratch the data's tokenizer decides."""
    argv = ["train", "--data.path", str(world["data"]), "--out-dir", str(tmp_path / "new"), *TINY_MODEL,
            "--train.device", "cpu", "--dry-run"]
    assert main([*argv, "--model.vocab-size", "500"]) == 0
    # (world["data"] is a prepared folder: its tokenizer is fixed, data.vocab_size would do nothing there)
    assert ("fungpt: note: model.vocab_size = 500 is replaced by the 22 tokens of the data's tokenizer (for a BPE "
            "of another size, prepare the text again with `fungpt prepare --vocab-size`)") in capsys.readouterr().out
    assert main(argv) == 0
    assert "model.vocab_size" not in capsys.readouterr().out
    text = [a if a != str(world["data"]) else str(world["corpus"]) for a in argv]  # the text itself
    assert main([*text, "--model.vocab-size", "500"]) == 0
    assert "(for a BPE of another size, set data.vocab_size)" in capsys.readouterr().out
    own = tmp_path / "own"  # a folder of one's own token ids (no source_sha256): no text to prepare again
    shutil.copytree(world["data"], own)
    meta = json.loads((own / "meta.json").read_text())
    del meta["source_sha256"]
    (own / "meta.json").write_text(json.dumps(meta))
    ids = [a if a != str(world["data"]) else str(own) for a in argv]
    assert main([*ids, "--model.vocab-size", "500"]) == 0
    assert ("fungpt: note: model.vocab_size = 500 is replaced by the 22 tokens of the data's tokenizer\n"
            in capsys.readouterr().out)


def test_data_settings_a_folder_of_own_token_ids_leaves_unused_are_named_as_such(tmp_path, capsys):
    """A hand-made folder was called tokenized "by `fungpt prepare`", with "(the folder's: None)" for what its
    meta.json does not record, and told to be prepared again (it has no text)."""
    from fungpt.rundata import note_unused_data_settings

    meta = {"format_version": 1, "tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16"}
    note_unused_data_settings(DataConfig(tokenizer="bpe", val_fraction=0.5), meta, tmp_path)
    assert capsys.readouterr().out == (f"fungpt: note: {tmp_path} holds token ids made without `fungpt prepare`, so "
                                       "data.tokenizer = 'bpe' (the folder's: 'gpt2'); data.val_fraction = 0.5 are "
                                       "not used (such settings apply only where FunGPT tokenizes a text)\n")


def test_a_folder_of_own_ids_whose_tokenizer_lacks_tokens_is_told_so(tmp_path):
    """Its meta.json's vocab_size covered its ids but its char tokenizer had fewer characters: the advice was to set
    vocab_size to the tokenizer's size, which the ids past it then refused."""
    from fungpt.rundata import resolve_model_and_data
    from fungpt.tokenizer import CharTokenizer

    def own(name, top):
        d = tmp_path / name
        d.mkdir()
        ids = (np.arange(200) % (top + 1)).astype(np.uint16)
        for split in ("train", "val"):
            ids.tofile(d / f"{split}.bin")
        (d / "meta.json").write_text(json.dumps({"format_version": 1, "tokenizer": "char", "vocab_size": 40,
                                                 "dtype": "uint16", "train_tokens": 200, "val_tokens": 200}))
        CharTokenizer.train("abcdefghijklmnopqrst").save(d)  # 20 characters
        return RunConfig(out_dir=str(tmp_path / "out"), data=DataConfig(path=str(d)),
                         model=GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))

    with pytest.raises(FunGPTError, match=r"says vocab_size 40 but the tokenizer beside it has 20 tokens: .*; its ids "
                                          r"reach 29, past the tokenizer's last \(19\): give the tokenizer a token for "
                                          r"every id in use, or write the ids it has"):
        resolve_model_and_data(own("lacking", 29), progress=False)
    with pytest.raises(FunGPTError, match=r"beside it has 20 tokens: .*; set vocab_size to 20 there"):
        resolve_model_and_data(own("padded", 19), progress=False)  # (the ids fit the tokenizer: the count is wrong)


def test_data_settings_a_prepared_folder_leaves_unused_are_named(world, tmp_path, capsys):
    """--data.tokenizer bpe with data.path a prepared char folder trained on chars without a word."""
    argv = ["train", "--data.path", str(world["data"]), "--out-dir", str(tmp_path / "new"), *TINY_MODEL,
            "--train.device", "cpu", "--dry-run"]
    assert main([*argv, "--data.tokenizer", "bpe", "--data.vocab-size", "300"]) == 0
    out = capsys.readouterr().out
    assert (f"fungpt: note: {world['data']} is a prepared dataset, tokenized once by `fungpt prepare`, so "
            "data.tokenizer = 'bpe' (the folder's: 'char'); data.vocab_size = 300 (the folder's: 22) are not "
            "used") in out
    assert "dry run done (no run folder was written; drop --dry-run to train)" in out  # (no cache: the folder's read)
    assert main([*argv, "--data.tokenizer", "char", "--data.val-fraction", "0.1"]) == 0  # the folder's own
    assert "is a prepared dataset" not in capsys.readouterr().out
    # A BPE stops short of the size asked on a small corpus: the setting it was prepared with is not "unused"
    bpe = prepare(str(world["corpus"]), tmp_path / "bpe", tokenizer="bpe", vocab_size=4096, progress=False)
    assert load_meta(bpe)["vocab_size"] < 4096  # (its corpus is small)
    bpe_argv = [*argv[:2], str(bpe), *argv[3:], "--data.tokenizer", "bpe"]
    assert main([*bpe_argv, "--data.vocab-size", "4096", "--data.val-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "data.val_fraction = 0.25 (the folder's: 0.1) is not used" in out and "vocab_size" not in out
    assert main([*bpe_argv, "--data.vocab-size", "2048"]) == 0
    assert "data.vocab_size = 2048 (the folder's: 4096) is not used" in capsys.readouterr().out


def test_a_run_that_saves_while_it_is_read_is_read_again_until_it_holds_still(world, tmp_path, monkeypatch):
    """sample, eval and export of a run that saved every few steps (75 times a second) failed 8 times in 12: two
    tries, with messages that called the checkpoint missing or damaged. A read that fails while the run saves is
    tried again for up to runs.RELOAD_S; one that fails with the run holding still is the checkpoint's fault."""
    import fungpt.runs as runs_mod

    out = copy_run(world, tmp_path)
    pointer = out / "latest.json"
    real_load, tries = runs_mod._load, []

    saved = itertools.count(1)

    def save_again(folder: Path, keep: bool = False) -> None:
        """The run's next save: a new folder (here: the same files), its pointer, the old folder deleted (or still
        being deleted: keep)."""
        moved = folder.with_name(f"{folder.name.split('.')[0]}.{next(saved)}")
        shutil.copytree(folder, moved) if keep else os.rename(folder, moved)
        new = pointer.with_name("latest.json.tmp")
        new.write_text(json.dumps({**json.loads(pointer.read_text()), "dir": f"checkpoints/{moved.name}"}))
        os.replace(new, pointer)

    def load_during_saves(run_dir, folder, checkpoint, device):
        tries.append(folder)
        if len(tries) <= saves:  # the run saves again while this one is read (the 2nd time: its old folder
            save_again(folder, keep=len(tries) == 2)  # is still being deleted)
            raise FunGPTError(f"checkpoint file {folder}/model.safetensors is missing")
        return real_load(run_dir, folder, checkpoint, device)

    monkeypatch.setattr(runs_mod, "_load", load_during_saves)
    saves = 5
    loaded = load_run(out, device="cpu")
    assert loaded.step == json.loads(pointer.read_text())["step"] and len(tries) == 6
    folder = ckpt.find_checkpoint(out, "latest")  # which one it read (serve names the weights that answer by it)
    assert loaded.checkpoint_id == (folder, (folder / ckpt.MANIFEST_FILE).stat().st_mtime_ns)
    tries.clear()
    with pytest.raises(FunGPTError, match=r"is training and replaced its latest checkpoint while it was read, "
                                          r"again and again for 0 s \(the last try: checkpoint file .* is missing\); "
                                          r"try again"):
        load_run(out, device="cpu", retry_s=0)  # a run that never holds still
    for pointer_rewritten in (False, True):  # the pointer still names the checkpoint read: its error, at once
        tries.clear()

        def fails(run_dir, folder, checkpoint, device, pointer_rewritten=pointer_rewritten):
            tries.append(1)
            if pointer_rewritten:  # (a new pointer file naming the same folder)
                new = pointer.with_name("latest.json.tmp")
                new.write_bytes(pointer.read_bytes())
                os.replace(new, pointer)
            raise FunGPTError("checkpoint file x is damaged")

        monkeypatch.setattr(runs_mod, "_load", fails)
        with pytest.raises(FunGPTError, match="is damaged"):
            load_run(out, device="cpu")
        assert tries == [1]


def test_sampling_an_overfit_runs_last_checkpoint_points_to_the_best(world, tmp_path, capsys, monkeypatch):
    """On a fast GPU nanoGPT's recipe overfits after ~1,750 of its 5,000 steps; `fungpt sample` took the last
    (overfit) checkpoint without a word, though the run had kept a better one."""
    train_module = sys.modules["fungpt.train"]
    real_evaluate = train_module.evaluate
    scripted = iter([3.0, 2.0, 2.5])  # val loss at steps 0, 3 and 6: best at 3, worse again at 6

    def evaluate(*args, **kwargs):
        return {**real_evaluate(*args, **kwargs), "val": next(scripted)}

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    run = tmp_path / "overfit"
    train(tiny_config(world["data"], run, max_iters=6, eval_interval=3), progress=False)
    argv = ["--run", str(run), "--max-new-tokens", "5"]
    note = ("fungpt: note: the last checkpoint (step 6, val loss 2.5000) has a higher val loss than the run's best "
            "(step 3, val loss 2.0000); pass --checkpoint best to use that one")
    for command in ("sample", "eval"):
        assert main([command, *argv[:2], *(argv[2:] if command == "sample" else [])]) == 0
        assert note in capsys.readouterr().err
    assert main(["sample", *argv, "--checkpoint", "best"]) == 0
    assert "note" not in capsys.readouterr().err
    assert main(["sample", "--run", str(world["run"]), "--max-new-tokens", "5"]) == 0  # its last is its best
    assert "note" not in capsys.readouterr().err
    # through a quoted ~ (read as the home folder by the command, and now by the note too)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["sample", "--run", "~/overfit", "--max-new-tokens", "5"]) == 0
    assert note in capsys.readouterr().err
    monkeypatch.chdir(run)
    assert main(["sample", "--run", " ", "--max-new-tokens", "5"]) == 2  # (a note on "." came before the error)
    assert capsys.readouterr().err == "error: the run folder is empty: pass the out_dir of a training run\n"
    # a setting that cannot work is refused first, alone (the note came before the error)
    assert main(["sample", *argv, "--top-p", "1.5"]) == 2
    assert capsys.readouterr().err == "error: --top-p 1.5 must be in (0, 1]\n"


@pytest.mark.parametrize("show_probs", [False, True])
def test_sample_draws_with_the_temperature_and_filters_it_is_given(world, show_probs):
    """Nothing checked that sample() passes them on: each could be dropped (the defaults, 0.8 and top-k 200, which
    65 characters never reach) with every test passing. top_k = 1, or a top_p that keeps the top token only, draws
    the greedy text; temperature 0 is greedy."""
    from fractions import Fraction

    from fungpt.runs import load_run
    from fungpt.sample import sample

    loaded = load_run(world["run"], device="cpu")
    ids = loaded.tokenizer.encode("the ")
    greedy = loaded.tokenizer.decode(loaded.model.generate(torch.tensor([ids]), 40, temperature=0)[0, len(ids):]
                                     .tolist())
    def drawn(**kwargs) -> str:
        return sample(world["run"], prompt="the ", max_new_tokens=40, device="cpu", show_probs=show_probs,
                      **kwargs)[0]

    assert drawn(temperature=0) == greedy
    assert drawn(temperature=1.0, top_k=1) == greedy
    # a Fraction is a number, made a float before torch sees it (it was a raw TypeError in a division)
    assert drawn(temperature=Fraction(1, 2), top_k=1, top_p=Fraction(1, 2)) == greedy
    assert drawn(temperature=1.0, top_k=None, top_p=1e-9) == greedy
    assert drawn(temperature=1.0, top_k=None) != greedy  # (the test's check: sampling at all is not greedy here)


def _trained_with_val_losses(world, run: Path, monkeypatch, val_losses: list[float]) -> Path:
    """A 6-step run evaluated at steps 0, 3 and 6, whose evals report these val losses."""
    train_module = sys.modules["fungpt.train"]
    real_evaluate = train_module.evaluate
    scripted = iter(val_losses)

    def evaluate(*args, **kwargs):
        return {**real_evaluate(*args, **kwargs), "val": next(scripted)}

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    train(tiny_config(world["data"], run, max_iters=6, eval_interval=3), progress=False)
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    return run


def test_the_overfit_note_needs_a_rise_beyond_the_margin(world, tmp_path, monkeypatch):
    """A last val loss a hair above the best one (eval noise, within OVERFIT_MARGIN = 0.01) gives no note; a rise
    beyond the margin does."""
    from fungpt.runs import OVERFIT_MARGIN, overfit_note

    run = _trained_with_val_losses(world, tmp_path / "run", monkeypatch, [3.0, 2.0, 2.5])  # best at step 3
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]

    def last_val(value: float) -> None:
        metrics.write_text("".join(json.dumps({**r, "val_loss": value} if r.get("step") == 6 and "val_loss" in r
                                              else r) + "\n" for r in rows))

    assert OVERFIT_MARGIN == 0.01
    last_val(2.005)
    assert overfit_note(run) is None
    last_val(2.02)
    assert overfit_note(run) == ("fungpt: note: the last checkpoint (step 6, val loss 2.0200) has a higher val "
                                 "loss than the run's best (step 3, val loss 2.0000); pass --checkpoint best to use "
                                 "that one")


def test_the_overfit_note_reads_the_last_eval_row_of_a_step_logged_twice(world, tmp_path, monkeypatch):
    """A resumed run can log the eval of one step twice; the later row is the one of the checkpoint's weights."""
    from fungpt.runs import overfit_note

    run = _trained_with_val_losses(world, tmp_path / "run", monkeypatch, [3.0, 2.0, 2.5])  # best at step 3
    assert overfit_note(run) is not None
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:  # step 6 evaluated again, lower this time
        f.write(json.dumps({"step": 6, "train_loss": 2.0, "val_loss": 2.001}) + "\n")
    assert overfit_note(run) is None


def test_files_named_inside_a_run_stay_inside_it(world, tmp_path, capsys):
    """A pointer, a tokenizer's "file" or a shard index naming a path elsewhere ("../..", "/etc/...") was followed."""
    out = copy_run(world, tmp_path)
    folder = ckpt.find_checkpoint(out)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(folder, elsewhere / "latest-0000099")
    for rel in ["../elsewhere/latest-0000099", str(elsewhere / "latest-0000099"), "checkpoints/..", "checkpoints"]:
        (out / "latest.json").write_text(json.dumps({"step": 99, "dir": rel}))
        assert ckpt.find_checkpoint(out) == folder, rel  # treated as a damaged pointer: the newest folder here

    meta = json.loads((out / "tokenizer_meta.json").read_text())
    (out / "tokenizer_meta.json").write_text(json.dumps({**meta, "kind": "bpe", "file": "../bpe.json"}))
    assert_one_line_error(*run_cli(["sample", "--run", out, "--max-new-tokens", "2"], capsys),
                          "its 'file' '../bpe.json' is not a file name beside it")

    from fungpt.hf import _load_hf_weights
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte": "../model.safetensors"}}))
    with pytest.raises(FunGPTError, match=r"model\.safetensors\.index\.json is corrupt"):
        _load_hf_weights(hf)


def test_overwrite_removes_a_plot_left_half_written(world, tmp_path):
    """A plot's temporary keeps its suffix (.loss.tmp-PID-RANDOM.png), which --overwrite's .loss.png.tmp-* missed."""
    out = copy_run(world, tmp_path)
    (out / ".loss.tmp-42-abcd.png").write_bytes(b"half an image")
    (out / "notes.png").write_bytes(b"the user's own")
    train(tiny_config(world["data"], out, max_iters=2), overwrite=True, progress=False)
    assert not (out / ".loss.tmp-42-abcd.png").exists() and (out / "notes.png").exists()


def test_temporaries_of_killed_commands_do_not_pile_up(world, tmp_path):
    """A kill -9 before the rename left each time one more: an export's folder the size of the weights beside --out,
    a plot's hidden image beside its --out, a tokenizer's folder in the run (which --overwrite kept too). Those an
    hour old are removed by the next such command; younger ones may be a live command's, and names of the user's
    that only look alike stay."""
    from fungpt.plot import plot_runs
    from fungpt.pretrained import export_hf
    from fungpt.tokenizer import load_tokenizer

    out = copy_run(world, tmp_path)
    hour_ago = time.time() - ckpt.STALE_TEMP_S - 60

    def left(parent: Path, name: str, old: bool = True, holding: str = "model.safetensors") -> Path:
        path = parent / name
        if name.endswith(".png"):
            path.write_bytes(b"half an image")
        else:
            path.mkdir()
            (path / holding).write_bytes(b"half a file")
            os.utime(path / holding, (hour_ago, hour_ago) if old else None)
        os.utime(path, (hour_ago, hour_ago) if old else None)
        return path

    stale = [left(tmp_path, "exp.tmp-123-abcd_e9z"), left(tmp_path, ".loss.tmp-123-0123abcd.png"),
             left(out, ".tokenizer.tmp-k2j4l5m6", holding="tokenizer.json")]
    kept = [left(tmp_path, "exp.tmp-124-abcdefgh", old=False), left(tmp_path, ".loss.tmp-124-0123abce.png", old=False),
            left(tmp_path, "exp.tmp-notes"), left(tmp_path, ".loss.tmp-old.png"), left(tmp_path, "exp2.tmp-1-abcdefgh")]
    kept.append(left(tmp_path, "exp.tmp-2-snapshot", holding="notes.txt"))  # named like one, but the user's
    kept.append(tmp_path / "exp.tmp-3-backup01")  # a file named like an export's temporary (a folder)
    kept[-1].write_text("my notes")
    os.utime(kept[-1], (hour_ago, hour_ago))
    export_hf(out, tmp_path / "exp")
    plot_runs([out], tmp_path / "loss.png")
    load_tokenizer(out).save(out)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    young = left(out, ".tokenizer.tmp-a1b2c3d4", old=False)  # (a run is locked: --overwrite removes any)
    train(tiny_config(world["data"], out, max_iters=2), overwrite=True, progress=False)
    assert not young.exists()


def test_a_checkpoint_on_macos_is_written_through_the_drives_cache(tmp_path, monkeypatch):
    """On macOS fsync hands the data to the drive, whose cache may still lose it in a power cut: F_FULLFSYNC writes
    it through (where a file system does not support it: fsync)."""
    import fcntl

    calls = []
    monkeypatch.setattr(ckpt.sys, "platform", "darwin")
    monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)  # (its value on macOS)
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, op: calls.append(op))
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    ckpt._write_file(tmp_path / "a.bin", b"x")
    assert calls == [51]
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOTSUP, "not supported")))
    ckpt._write_file(tmp_path / "b.bin", b"x")
    assert calls == [51, "fsync"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fsync's file through /proc (Linux)")
def test_a_dataset_an_export_and_a_checkpoint_are_on_disk_before_they_take_their_names(world, tmp_path, corpus,
                                                                                         monkeypatch):
    """Their files were renamed into place unsynced: after a power loss, a folder whose meta.json says the dataset
    is complete (or an export whose config.json is empty) could hold files still only in memory."""
    from fungpt.pretrained import export_hf

    synced, real_fsync, real_replace, events = set(), os.fsync, os.replace, []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.add(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append((str(a), set(synced))) or real_replace(a, b))
    prepare(corpus, tmp_path / "data", tokenizer="bpe", vocab_size=300, progress=False)
    export_hf(copy_run(world, tmp_path), tmp_path / "exp")
    # and a checkpoint (a resume trusts its manifest): the module's docstring promises it, no test checked it
    ckpt.save_checkpoint(tmp_path / "run", "latest", 7, GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1,
                                                                        n_head=1, n_embd=4)), state={"step": 7})
    for folder, names in (("data", {"train.bin", "val.bin", "meta.json", "tokenizer.json"}),
                          ("exp", {"model.safetensors", "config.json", "tokenizer.json"}),
                          (".latest-0000007", {"model.safetensors", "state.pt", "manifest.json"})):
        src, before = next((a, seen) for a, seen in events if Path(a).name.startswith(f"{folder}.tmp-"))
        assert {f"{src}/{name}" for name in names} <= before, (src, sorted(before))  # each file, before the rename
        assert src in before  # the folder too


_WITHOUT = """
import sys
blocked = sys.argv.pop(1)
class Missing:  # as if that module were not installed
    def find_spec(self, name, path=None, target=None):
        if name == blocked or name.startswith(blocked + ".") and "." not in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
import fungpt.cli
sys.exit(fungpt.cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("blocked, command, said", [
    ("matplotlib", ["plot", "{run}"], "the Python package matplotlib is not installed, and fungpt plot needs it: "
                                      "pip install matplotlib"),
    ("matplotlib", ["attention", "{run}", "--prompt", "e"], "the Python package matplotlib is not installed, and "
                                                            "fungpt attention needs it: pip install matplotlib"),
    ("PIL", ["plot", "{run}"], "the Python package pillow is not installed, and fungpt plot needs it: "
                               "pip install pillow"),  # (its import name is not its name on PyPI)
    ("matplotlib.figure", ["plot", "{run}"], "the Python package matplotlib is installed, but its module "
                                             "matplotlib.figure is missing: reinstall it (pip install "
                                             "--force-reinstall --no-deps matplotlib=={version})"),
])
def test_a_missing_package_is_one_line_that_says_what_to_install(tiny_run, tmp_path, blocked, command, said):
    """matplotlib missing from a broken install: plot and attention ended in a raw ModuleNotFoundError traceback
    (train said it in one line: no loss.png)."""
    argv = [a.format(run=tiny_run) for a in command] + ["--out", str(tmp_path / "x.png")]
    proc = subprocess.run([sys.executable, "-c", _WITHOUT, blocked, *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    version = importlib.metadata.version("matplotlib")
    assert proc.returncode == 2 and proc.stderr == f"error: {said.format(version=version)}\n"


_COMMAND_WITHOUT = """
import os, sys
blocked = os.environ["BLOCKED"]
class Missing:  # as if that module were not installed
    def find_spec(self, name, path=None, target=None):
        if name == blocked or name.startswith(blocked + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
from fungpt.cli import entry
entry()
"""


@pytest.mark.parametrize("blocked, rank, said", [
    ("tqdm", "", "error: the Python package tqdm is not installed, and fungpt needs it: pip install tqdm\n"),
    ("tyro", "1", "error (rank 1): the Python package tyro is not installed, and fungpt needs it: pip install tyro\n"),
    ("fungpt.sampling", "", None),  # one of FunGPT's own: a bug, reported in full
])
def test_a_package_missing_while_fungpt_imports_is_one_line(tmp_path, blocked, rank, said):
    """numpy, tqdm, tyro or torch missing from a broken install ended the fungpt command in a traceback: they are
    imported with fungpt itself, before cli.main() can catch anything."""
    script = tmp_path / "fungpt"  # (the console script's name: sys.orig_argv makes this process the fungpt command)
    script.write_text(_COMMAND_WITHOUT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "BLOCKED": blocked, "RANK": rank}
    proc = subprocess.run([sys.executable, str(script), "train", "--help"], capture_output=True, text=True,
                          timeout=120, env=env)
    if said is None:
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "fungpt.sampling" in proc.stderr
    else:
        assert proc.returncode == 2 and proc.stderr == said


def test_a_deleted_current_folder_is_one_line(tmp_path):
    """Run from a folder deleted under the shell, every command (even --version) died in torch's import with
    "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"."""
    gone = tmp_path / "gone"
    gone.mkdir()
    proc = subprocess.run(["sh", "-c", 'cd "$1" && rmdir "$1" && exec "$2" -m fungpt --version', "sh", str(gone),
                           sys.executable], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr == ("error: the current folder no longer exists (deleted or moved): cd into a folder that "
                           "exists and run the command again\n")


@pytest.mark.parametrize("stem", ["a" * 251, "語" * 80])  # (80 CJK characters: 240 bytes)
def test_a_corpus_file_with_a_long_name_trains(world, tmp_path, stem):
    """The data cache's folder is named after the file: a 251-byte name made it over the 255 bytes a name can
    have ("File name too long"), though the file itself was fine."""
    corpus = tmp_path / (stem + ".txt")
    shutil.copy(world["corpus"], corpus)
    assert train(_one_layer(corpus, tmp_path / "run", max_iters=1), progress=False)["step"] == 1


def _one_layer(corpus: Path, out: Path, max_iters: int) -> RunConfig:
    return RunConfig(out_dir=str(out), data=DataConfig(path=str(corpus)),
                     model=GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=32),
                     train=TrainConfig(batch_size=4, max_iters=max_iters, eval_iters=1, device="cpu"))


@pytest.mark.parametrize("saved", [False, True])
def test_a_full_disk_while_logging_names_the_checkpoint_only_if_there_is_one(world, tmp_path, monkeypatch, saved):
    """metrics.jsonl could not be written: "the last checkpoint is intact, resume" was said also before the first
    checkpoint, where --resume starts over."""
    train_module = sys.modules["fungpt.train"]  # (fungpt.train, the attribute, is the function)
    out = tmp_path / "run"
    if saved:  # a run with a checkpoint, resumed
        train(_one_layer(world["corpus"], out, max_iters=1), progress=False)

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    opened = train_module.MetricsLog.__init__

    def full_disk(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        self.file.close()
        self.file = Full()

    monkeypatch.setattr(train_module.MetricsLog, "__init__", full_disk)
    cfg = _one_layer(world["corpus"], out, max_iters=3)
    with pytest.raises(FunGPTError, match="No space left on device; " + (
            r"the last checkpoint is intact \(free some disk space, then resume with --resume\)" if saved else
            r"no checkpoint was saved yet \(free some disk space, then run again with --resume: it starts over\)")):
        train(cfg, resume=saved, progress=False)


def test_resume_and_overwrite_together_are_refused_before_anything_is_said(world, tmp_path, capsys):
    """The refusal came after "resuming with the settings saved in ...", a line that promised a resume."""
    out = copy_run(world, tmp_path)
    before = sha256_tree(out)
    assert main(["train", "--out-dir", str(out), "--resume", "--overwrite"]) == 2
    said = capsys.readouterr()
    assert said.out == "" and said.err == "error: --resume and --overwrite contradict each other: pick one\n"
    assert sha256_tree(out) == before


def test_a_resume_says_the_run_folder_was_edited_not_that_the_data_changed(world, tmp_path, capsys):
    """config.json's vocab_size edited, or the run's tokenizer swapped for another: the refusal said the data had
    changed ("its data now has 22 distinct tokens where the checkpoint was trained on 23"), though the data was as
    it was; `fungpt sample` said what was wrong."""
    out = copy_run(world, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["model"]["vocab_size"] += 1
    (out / "config.json").write_text(json.dumps(config))
    argv = ["train", "--out-dir", out, "--resume", "--train.max-iters", "8"]
    assert_one_line_error(*run_cli(argv, capsys), "was trained with a different model than", "config.json asks for "
                          f"(vocab_size {config['model']['vocab_size'] - 1} -> {config['model']['vocab_size']})")
    out = copy_run(world, tmp_path / "b")
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    meta["chars"] = meta["chars"][::-1]  # another character set of the same size: ids mean other characters
    (out / "tokenizer_meta.json").write_text(json.dumps(meta))
    argv = ["train", "--out-dir", out, "--resume", "--train.max-iters", "8"]
    assert_one_line_error(*run_cli(argv, capsys), f"cannot resume {out}: its tokenizer files are not the ones its "
                          "checkpoint was trained with", "restore the run's original tokenizer files")


def test_a_damaged_state_file_leaves_the_weights_usable_and_nan_weights_are_refused(world, tmp_path, capsys):
    """sample, eval and export use only the weights: a missing or truncated state.pt (the optimizer's) refused
    them too, with no way out. Weights of NaN (another program's edit, matched in the manifest) were scored as
    "loss nan" and exported without a word."""
    from safetensors.torch import load_file, save_file

    out = copy_run(world, tmp_path)
    folder = ckpt.find_checkpoint(out)
    (folder / ckpt.STATE_FILE).unlink()
    assert main(["eval", "--run", str(out), "--device", "cpu"]) == 0
    assert re.search(r"loss +\d\.\d{4} nats/token", capsys.readouterr().out)
    assert_one_line_error(*run_cli(["train", "--out-dir", out, "--resume", "--train.max-iters", "8"], capsys),
                          f"checkpoint file {folder / ckpt.STATE_FILE} is missing; restore it or train again")
    out = copy_run(world, tmp_path / "nan")
    folder = ckpt.find_checkpoint(out)
    tensors = load_file(str(folder / ckpt.MODEL_FILE))
    tensors["wte.weight"][3, 1] = float("nan")
    save_file(tensors, str(folder / ckpt.MODEL_FILE))
    manifest = json.loads((folder / ckpt.MANIFEST_FILE).read_text())
    data = (folder / ckpt.MODEL_FILE).read_bytes()
    manifest["files"][ckpt.MODEL_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    for argv in (["eval", "--run", out, "--device", "cpu"], ["export", "--run", out, "--out", tmp_path / "hf"],
                 ["train", "--out-dir", out, "--resume", "--train.max-iters", "8"]):
        assert_one_line_error(*run_cli(argv, capsys), "hold values that are not finite numbers (NaN or inf) in "
                              "wte.weight, which FunGPT never saves")
    assert not (tmp_path / "hf").exists()
    # a buffer of an edited model may hold -inf (a causal mask): saved, it loads again (only weights are checked)
    model = GPT(load_run_config(out).model)
    model.register_buffer("mask", torch.full((4, 4), -math.inf).triu(1))
    ckpt.save_checkpoint(tmp_path / "edited", "latest", 1, model)
    again = GPT(load_run_config(out).model)
    again.register_buffer("mask", torch.zeros(4, 4))
    ckpt.load_weights(ckpt.find_checkpoint(tmp_path / "edited"), again)
    assert torch.equal(again.mask, model.mask)


def test_only_a_none_written_in_toml_is_told_that_toml_has_no_null(tmp_path):
    from fungpt.config import load_config

    for value, hint in (('"None"', True), ('"null"', True), ("1.5", False), ('"ten"', False)):
        (tmp_path / "c.toml").write_text(f"[train]\nlr_decay_iters = {value}\n")
        with pytest.raises(FunGPTError, match="lr_decay_iters = .* should be a whole number(;|$)") as e:
            load_config(tmp_path / "c.toml")
        assert ("TOML has no null: for its default, delete the line" in str(e.value)) == hint, str(e.value)


def test_commands_to_paste_are_quoted_for_the_users_shell(monkeypatch):
    """On Windows, shlex's single quotes reach a cmd.exe command as part of the path ('out\\run' not found)."""
    from fungpt import errors

    assert errors.shell_quote("out/my run") == "'out/my run'"
    monkeypatch.setattr(errors.os, "name", "nt")
    quoted = [errors.shell_quote(p) for p in ("out\\shakespeare-char", "C:\\my runs\\a", "a&b", "")]
    monkeypatch.undo()
    assert quoted == ["out\\shakespeare-char", '"C:\\my runs\\a"', '"a&b"', '""']


def test_prepare_into_an_existing_empty_folder_renames_no_folder_onto_it(tmp_path, corpus, monkeypatch):
    """Windows refuses to rename a folder onto any existing folder, an empty one too: prepare --out EMPTY failed
    there ("Access is denied") where it works on Linux."""
    real_replace = os.replace

    def windows_replace(src, dst):
        if Path(dst).is_dir():
            raise PermissionError(errno.EACCES, "Access is denied", str(dst))
        real_replace(src, dst)

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(os, "replace", windows_replace)
    prepare(corpus, tmp_path / "empty", "char")
    assert load_meta(tmp_path / "empty")["vocab_size"] > 0


def test_a_control_character_a_toml_file_writes_on_purpose_is_kept(tmp_path):
    """The check for Windows paths whose backslashes TOML read as escapes refused a tab written in single quotes,
    where it is one on purpose (the form its own message recommends)."""
    from fungpt.config import load_config

    config = tmp_path / "tab.toml"
    config.write_text("[data]\npath = 'a\tb'\n", encoding="utf-8")
    assert load_config(config, checked=False).data.path == "a\tb"


def test_a_permission_error_inside_a_folder_that_cannot_be_opened_names_the_folder(tmp_path, monkeypatch):
    """`prepare --input LOCKED` (chmod 000) said "LOCKED/train.npy: Permission denied": a file the user never named,
    looked for by a check, hid which folder to fix."""
    from fungpt import cli

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    e = PermissionError(errno.EACCES, "Permission denied", str(locked / "train.npy"))
    assert cli._blocked_folder(e) == f"{locked} (a folder it cannot open)"
    monkeypatch.setattr(cli.os, "access", real_access)
    assert cli._blocked_folder(e) == str(locked / "train.npy")  # (an open folder: the file is the one to fix)


def test_a_config_files_wrong_type_is_said_in_the_files_own_words(tmp_path):
    """A TOML value of the wrong type was quoted in Python's spelling with Python's type names (`max_iters = True
    should be of type int`), which a TOML file's author does not write."""
    from fungpt.config import load_config

    for line, said in (("[train]\nmax_iters = true", "max_iters = true should be a whole number"),
                       ('[train]\nlr = "fast"', 'lr = "fast" should be a number'),
                       ("[model]\nbias = 1", "bias = 1 should be true or false"),
                       ("[train]\ndevice = 3", 'device = 3 should be a string in double quotes ("...")'),
                       ("[train]\nmax_iters = 1e3", "max_iters = 1000.0 should be a whole number (write 1000)"),
                       ("[train]\nlr_decay_iters = nan", "lr_decay_iters = nan should be a whole number")):
        (tmp_path / "c.toml").write_text(line + "\n")
        with pytest.raises(FunGPTError) as e:
            load_config(tmp_path / "c.toml")
        assert str(e.value).endswith(said), str(e.value)
    (tmp_path / "c.json").write_text('{"train": {"lr_decay_iters": "x"}}')  # (JSON has a null: named)
    with pytest.raises(FunGPTError, match=r'lr_decay_iters = "x" should be a whole number or null$'):
        load_config(tmp_path / "c.json")
    (tmp_path / "c.cfg").write_text('[train]\nlr_decay_iters = "None"\n')  # (TOML, whatever the file's suffix)
    with pytest.raises(FunGPTError, match=r'= "None" should be a whole number; TOML has no null: for its default'):
        load_config(tmp_path / "c.cfg")
    for text, said in (("out_dir = true\n", "out_dir = true should be a folder name (a string in double quotes)"),
                       ("train = true\n", "[train] must be a table of settings, not true"),
                       ("[train]\nmax_iters = 1" + "0" * 5000 + "\n", "holds a whole number of 5,001 digits, more "
                                                                     "than Python reads (4,300 at most); fix that "
                                                                     "value")):
        (tmp_path / "c.toml").write_text(text)
        with pytest.raises(FunGPTError) as e:
            load_config(tmp_path / "c.toml")
        assert str(e.value).endswith(said), str(e.value)


def test_the_reliability_table_is_one_table_whose_tests_exist():
    """docs/reliability.md's rows name the tests that show them: a test renamed since was still named (one was), and
    rows added after the "Not covered" list stood outside the table, where Markdown shows them as loose text."""
    doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    table = doc.split("\n## The table\n")[1].split("\n## ")[0]
    rows = [line for line in doc.splitlines() if line.startswith("| ")]
    assert rows and all(row in table.splitlines() for row in rows)  # every row inside the table's section
    lines = table.strip().splitlines()
    assert all(line.startswith("|") for line in lines[lines.index(next(r for r in lines if r.startswith("|"))):])
    tests = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", doc))
    assert len(named) > 50 and not [name for name in sorted(named) if f"def {name}(" not in tests]
    # ... in tests/test_reliability.py "unless noted": a test of another file has it named in the same cell or
    # paragraph, after it (eight were not, and a reader looked for them here in vain)
    files = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py")}
    unnoted = []
    for m in re.finditer(r"`(test_[a-z0-9_]+)`", doc):
        home = next(name for name, text in files.items() if f"def {m.group(1)}(" in text)
        cell = re.split(r"\||\n\n", doc[m.end():])[0]
        if home != "test_reliability.py" and home not in cell:
            unnoted.append((m.group(1), home))
    assert not unnoted
