"""A training run's record: metrics.jsonl (a JSON object per line: each logged step's loss, lr, speed, and each eval's
losses), plus TensorBoard and wandb when asked. Resuming keeps the rows up to the checkpoint's step."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from fungpt import checkpoint as ckpt
from fungpt.config import RunConfig, TrainConfig
from fungpt.errors import FunGPTError, parse_json


def check_loggers(tc: TrainConfig) -> None:
    """Refuse train.tensorboard / train.wandb without their package, before any work."""
    import importlib.util

    for wanted, module, package in [(tc.tensorboard, "tensorboard", "tensorboard"), (tc.wandb, "wandb", "wandb")]:
        if wanted and importlib.util.find_spec(module) is None:  # (a resume's may come from the run's config.json)
            raise FunGPTError(f"train.{module} needs the {package} package: pip install {package}, or pass "
                              f"--train.no-{module} to train without it")


class MetricsLog:
    """metrics.jsonl (one JSON object per line, always), plus TensorBoard and wandb when asked."""

    def __init__(self, out_dir: Path, cfg: RunConfig, keep_until_step: int | None, redo_eval: bool = False,
                 logged_every: int | None = None):
        """keep_until_step: resuming, the checkpoint's step (its rows and events are kept, the later ones dropped).
        redo_eval: the resume evaluates that step again (a signal had left its eval): an eval row logged for it by
        an earlier resume is dropped too. A train row at that step that log_interval does not log (written because
        the command ended there: a signal, max_iters) is dropped as well: the resumed run's rows are then those of
        the same run uninterrupted. `logged_every`: the log_interval the rows were written with (the checkpoint's
        [train]; None: this run's)."""
        self.path = out_dir / "metrics.jsonl"
        every = logged_every or cfg.train.log_interval
        stray = keep_until_step is not None and keep_until_step % every != 0 and keep_until_step > 1
        if self.path.is_symlink():  # (a link: resuming read its target, wherever it is; appending created a dangling
            self.path.unlink()      # one's target outside the run folder)
        if keep_until_step is not None and self.path.exists():
            # Resuming: drop rows logged after the checkpoint, which the resumed run will redo.
            # (errors="replace": a damaged byte makes its row unreadable, dropped below, not the resume fail)
            rows = [r for r in self.path.read_text(encoding="utf-8", errors="replace").splitlines() if r.strip()]
            kept = [r for r in rows if _row_step(r) < keep_until_step or _row_step(r) == keep_until_step
                    and not (redo_eval if '"val_loss"' in r else stray)]
            ckpt.atomic_write_text(self.path, "".join(r + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self.file = self.path.open("a", encoding="utf-8", newline="\n")  # (LF on Windows too, as a resume's rewrite)
        # The TensorBoard events likewise, whether or not this command logs there (a resume with tensorboard off,
        # then on, showed the killed steps between)
        trim_tensorboard(out_dir / "tensorboard", keep_until_step, redo_eval, stray)
        self.tb = self.wandb = None
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise FunGPTError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
            try:
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except OSError as e:
                raise self._unwritable(out_dir / "tensorboard", e) from None
            _quiet_writer_threads()
        if cfg.train.wandb:
            try:
                import wandb
            except ImportError:
                raise FunGPTError("train.wandb needs the wandb package: pip install wandb") from None
            try:
                self.wandb = wandb.init(project=cfg.train.wandb_project, config=cfg.to_dict(), dir=str(out_dir))
            except Exception as e:  # (wandb's own errors: no API key, no network after its retries, ...)
                self.close()
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise FunGPTError(f"train.wandb could not start wandb ({first}): run `wandb login`, or set "
                                  f"WANDB_MODE=offline to log into out_dir/wandb without a network") from None

    def write(self, row: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:  # e.g. the disk filled up between two checkpoints
            raise self._unwritable(self.path, e) from None
        # An eval row's losses are estimates over eval_iters batches (and its times repeat the step's): under eval/,
        # so each TensorBoard and wandb curve holds one kind of number, one point per step (wandb merges two logs at
        # one step: the eval's train_loss replaced the step's own)
        group = "eval/" if "val_loss" in row else ""
        try:  # (TensorBoard's writer thread fails on a full disk; its next call raises that OSError, with no name)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and self.tb is not None:
                    self.tb.add_scalar(group + k, v, row["step"])
        except OSError as e:
            raise self._unwritable(self.path.parent / "tensorboard", e) from None
        if self.wandb is not None:
            self.wandb.log({group + k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def _unwritable(self, where: Path, e: OSError) -> FunGPTError:
        """The one-line error for a record that could not be written (a full disk, most likely), saying what is kept."""
        try:
            kept = ckpt.find_checkpoint(self.path.parent) is not None
        except FunGPTError:
            kept = False
        what = ("the last checkpoint is intact (free some disk space, then resume with --resume)" if kept else
                "no checkpoint was saved yet (free some disk space, then run again with --resume: it starts over)")
        return FunGPTError(f"could not write {where}: {e.strerror or e}; {what}")

    def close(self, failed: bool = False) -> None:
        """Close the file and stop TensorBoard's writer thread and wandb (once: closing again does nothing).
        failed: the run ends with an error, which wandb then records (its default is a run that finished)."""
        try:
            self.file.close()  # (flushes a row that a full disk held back: write failed on it, said why, and it is
        except OSError:        # tried again here, where its error would replace that message)
            if not failed:
                raise
        tb, wandb, self.tb, self.wandb = self.tb, self.wandb, None, None
        if tb is not None:
            unwritten = None
            try:
                tb.flush()  # (writes what is queued, which can meet a full disk too: flush says so, close would not)
            except OSError as e:
                unwritten = e
            with contextlib.suppress(OSError):
                tb.close()  # (always: it stops the writer's thread, which a failed flush left running)
            if unwritten is not None and not failed:
                raise self._unwritable(self.path.parent / "tensorboard", unwritten) from None
        if wandb is not None:
            wandb.finish(exit_code=1) if failed else wandb.finish()


def _quiet_writer_threads() -> None:
    """Keep the traceback of TensorBoard's writer thread off the screen: a write that fails there (a full disk) is
    raised again by the writer's next call in the main thread, and said in one line (MetricsLog.write). Other
    threads' errors print as before. (Installed once per process; the thread class is TensorBoard's own.)"""
    import threading

    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:
        return
    previous = threading.excepthook
    if getattr(previous, "fungpt_quiet", False):
        return

    def hook(args) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.fungpt_quiet = True
    threading.excepthook = hook


def trim_tensorboard(folder: Path, keep_until_step: int | None, redo_eval: bool = False, stray: bool = False) -> None:
    """Drop a run's TensorBoard events logged after the checkpoint it resumes from (`keep_until_step`; None: a run
    that starts from step 0, all of them), as metrics.jsonl drops its rows: the steps will be trained again. With
    redo_eval, the eval/ events of that step go too: its eval is done again; with stray, its train events (a step
    log_interval does not log, logged as the command's last).

    The events are rewritten, not hidden by a purge marker (SummaryWriter's purge_step): TensorBoard's default data
    server ignores those markers, and showed the killed run's points among the resumed run's. Markers written by
    earlier FunGPTs are applied here as TensorBoard's Python loader does. The rewrite goes into a hidden folder and
    then into place (a marker at its start replaces the files before it), so a command killed midway loses nothing.
    It is written here, not by TensorBoard's writer, whose thread drops what it could not write (a full disk) without
    telling its caller: the old files were then deleted for a rewrite that missed the last events.
    """
    files = sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []
    unfinished = folder / ".fungpt-trim"  # (a rewrite killed before it was in place)
    if unfinished.is_dir():
        shutil.rmtree(unfinished)
    if keep_until_step is None:
        for path in files:
            path.unlink()
        return
    if not files:  # (most resumes: a run without TensorBoard, whose library is not imported for nothing)
        return
    try:
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:  # (tensorboard is not installed now: nothing here can show the events either)
        return
    kept, changed = [], False
    for path in files:
        for event in LegacyEventFileLoader(str(path)).Load():
            if event.HasField("file_version"):  # (each file's header: the writer below writes its own)
                continue
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                # a purge marker: the steps from there are redone (one that drops nothing, such as the marker a
                # rewrite below begins with, changes nothing)
                before, kept = len(kept), [e for e in kept if e.step < event.step]
                changed |= len(kept) < before
            elif event.step < keep_until_step or event.step == keep_until_step and not (
                    redo_eval if any(v.tag.startswith("eval/") for v in event.summary.value) else stray):
                kept.append(event)
            else:
                changed = True
    if not changed:
        return
    written = unfinished / "events.out.tfevents.fungpt"
    try:
        unfinished.mkdir()
        with open(written, "wb") as f:
            records = RecordWriter(f)  # each event as a length- and CRC-framed record, as TensorBoard's files hold
            now = time.time()
            for event in [Event(wall_time=now, file_version="brain.Event:2"),  # (the header of every events file)
                          Event(step=0, wall_time=now, session_log=SessionLog(status=SessionLog.START)), *kept]:
                records.write(event.SerializeToString())
            f.flush()
            ckpt.fsync(f.fileno())
    except OSError as e:
        shutil.rmtree(unfinished, ignore_errors=True)
        raise FunGPTError(f"could not rewrite the TensorBoard events in {folder} (kept as they were): "
                          f"{e.strerror or e}; free some disk space, then resume again") from None
    # TensorBoard reads a folder's files in the order of their names: this one's (the time now) sorts after the files
    # it replaces, and ("!" before any digit) before the file the resumed run's writer opens next, in the same second
    target = folder / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.!fungpt"
    os.replace(written, target)
    for path in files:
        if path != target:
            path.unlink()
    unfinished.rmdir()


def eval_left_in_log(out_dir: Path, step: int) -> bool:
    """Whether the run's metrics.jsonl shows `step` trained but not evaluated: a row of its training, none of its
    eval (a missing file, or one without that step, tells nothing: no eval is taken for left)."""
    try:
        lines = (out_dir / "metrics.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return False
    start = f'{{"step": {step},'  # (how training writes a row: a quick look before parsing it)
    rows = [line for line in lines if line.startswith(start) and _row_step(line) == step]
    return any('"val_loss"' not in r for r in rows) and not any('"val_loss"' in r for r in rows)


def _row_step(line: str) -> int:
    try:
        return int(parse_json(line)["step"])
    except (KeyError, TypeError, ValueError, OverflowError):  # (Infinity)
        return 1 << 62  # an unreadable (half-written) row is dropped
