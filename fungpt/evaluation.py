"""Scoring a model on its data: training's evals (`evaluate`: the mean loss over eval_iters batches of each split),
the mean loss over every window of a split (each target scored once: eval_full_val, `fungpt eval`), and the timing
of a forward batch from which a time budget reserves an eval's time."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fungpt.config import RunConfig, TrainConfig
from fungpt.data import BatchLoader, bar_interval, iter_eval_windows, load_meta
from fungpt.hardware import sync


class EvalStopped(Exception):
    """An eval abandoned part-way, as its `stop` asked (Ctrl-C or SIGTERM during a run's eval)."""


def unless_stopped(batches, stop: Callable[[], bool] | None):
    """The batches, until `stop()` turns true: then EvalStopped (checked before each batch is taken)."""
    for batch in batches:
        if stop is not None and stop():
            raise EvalStopped
        yield batch


def score_windows(model: torch.nn.Module, windows, autocast=contextlib.nullcontext) -> tuple[float, int]:
    """Summed cross-entropy (nats) and number of scored targets over (x, y) batches from data.eval_windows."""
    total, count = 0.0, 0
    for x, y in windows:
        with autocast():
            logits = model(x)  # (B, T, V)
        # (the last window repeats a few already-scored targets, marked -1: left out by ignore_index, not by
        # indexing, whose copy of the logits was the eval's largest tensor with a large vocabulary)
        # (B, T, V) -> (B*T, V) logits against (B*T,) targets
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1,
                                                 reduction="sum")
        total, count = total + loss.item(), count + int((y != -1).sum())
    return total, count


@torch.no_grad()
def time_forward(model: torch.nn.Module, cfg: RunConfig, device: str, autocast, bar=None) -> float:
    """Seconds per window of one forward batch of `evaluate`'s size (batch_size windows), the fastest of three
    timings (the first one is cold, and other programs can only add time), each counted on `bar`. The full-split
    eval's batches hold up to 4 x batch_size windows (full_split_batch), which a GPU runs faster per window: timed
    at batch_size, its estimate errs high, and the timing costs a quarter of what 4 x batch_size windows would."""
    windows = cfg.train.batch_size  # evaluate's batch (see evaluate)
    x = torch.zeros(windows, cfg.model.block_size, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    seconds_per_window = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()  # (a fine clock: Windows' time.time() moved in 15.6 ms ticks before Python 3.13)
        with autocast():
            model(x)
        sync(device)  # (a GPU's queued work done: timed, not its queueing; an Apple GPU's too)
        seconds_per_window = min(seconds_per_window, (time.perf_counter() - t0) / windows)
        if bar is not None:
            bar.update(1)
    model.train(was_training)
    return seconds_per_window


EVAL_MARGIN = 1.3  # estimate_eval_time's estimates err high by this, on purpose (see there)


def evals_changed(saved: TrainConfig | None, tc: TrainConfig) -> bool:
    """Whether a resume's evals differ from those its checkpoint timed (more or fewer batches, other batches, the
    whole val split or not; `saved`: the checkpoint's [train] settings)."""
    return saved is not None and any(getattr(saved, k) != getattr(tc, k)
                                     for k in ("eval_iters", "eval_full_val", "batch_size"))


@torch.no_grad()
def estimate_eval_time(model: torch.nn.Module, data_dir: Path, cfg: RunConfig, device: str, autocast,
                       seconds_per_window: float | None = None) -> float:
    """Seconds one `evaluate` call will take, from timing a single forward batch and scaling up.

    Time-budget runs must reserve the final eval before it happens. Timing one batch costs a
    fraction of a second where a full eval costs seconds, much of a short budget. The batch is
    timed three times and the fastest timing used (the first one is cold, and other programs can
    only add time: two estimates of the same eval, minutes apart, once differed by 64% when the
    last of two timings was used); the estimate errs high, by 30% on purpose (a budget is a
    promise; with a 10% margin, a speedrun given 46.2 s took 46.3 s). `seconds_per_window`: a timing already
    taken by `time_forward`.
    """
    tc = cfg.train
    if seconds_per_window is None:
        seconds_per_window = time_forward(model, cfg, device, autocast)
    n_windows = 2 * tc.eval_iters * tc.batch_size  # evaluate's train and val batches
    if tc.eval_full_val:  # the whole val split replaces the val batches
        n_windows += math.ceil((load_meta(data_dir)["val_tokens"] - 1) / cfg.model.block_size)
        n_windows -= tc.eval_iters * tc.batch_size
    return EVAL_MARGIN * seconds_per_window * n_windows


def eval_bar(total: int, desc: str, enabled: bool, delay: float = 1.0, unit: str = "batch"):
    """A progress bar for an eval, cleared when it ends; a bar that shows nothing when not enabled. Shown only once
    the eval has taken `delay` seconds: training's usual short evals do not flicker under its train bar (`fungpt
    eval`, whose eval is the whole command, shows it at once)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, delay=delay,
                mininterval=bar_interval(), disable=not enabled)


def full_split_loss(model, data_dir: Path, split: str, cfg: RunConfig, device: str, autocast,
                     progress: bool = False, stop: Callable[[], bool] | None = None) -> float:
    """Mean loss over every token of a split (each scored once, see data.eval_windows); `stop` as for evaluate."""
    T, B = cfg.model.block_size, full_split_batch(cfg)
    windows = iter_eval_windows(data_dir, split, T, B, device=device)
    batches = math.ceil(math.ceil((load_meta(data_dir)[f"{split}_tokens"] - 1) / T) / B)  # windows of T targets
    with eval_bar(batches, f"eval ({split}, every token)", progress) as bar:
        total, count = score_windows(model, counted(unless_stopped(windows, stop), bar), autocast)
    return total / count


# The most logits an eval batch holds, in floats (64 MB; as much again for cross-entropy's log-softmax of them): past
# this a large vocabulary's eval took more memory than training (full_split_batch, and `fungpt eval`'s batch)
EVAL_LOGITS_MAX = 2**24


def full_split_batch(cfg: RunConfig) -> int:
    """Windows per batch of a full-split eval: 4 x batch_size, which a GPU runs faster per window, where their
    logits are small (at most 2^24 floats, 64 MB); else batch_size. With a large vocabulary the (B, T, vocab_size)
    logits and cross-entropy's log-softmax of them are the largest tensors of the run: at 4 x batch_size they took
    8x the memory estimated for training (BPE 8192, block 256, batch 16: 3.9 GB), at batch_size less than a
    training step's (which also holds their gradient)."""
    B, T, V = cfg.train.batch_size, cfg.model.block_size, cfg.model.vocab_size
    return 4 * B if 4 * B * T * V <= EVAL_LOGITS_MAX else B


def counted(batches, bar):
    """The batches, each counted on the bar as it is taken."""
    for batch in batches:
        bar.update(1)
        yield batch


@torch.no_grad()
def evaluate(model: torch.nn.Module, data_dir: Path, cfg: RunConfig, device: str, autocast,
             progress: bool = False, stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split.

    The eval batches come from loaders with a fixed seed, so every evaluation sees the same
    windows: the curve then shows the model changing, not the batches. Eval has its own
    loaders, so it never disturbs the training batch sequence (exact resume depends on that).
    With eval_full_val, val is the mean over the whole split instead (no val batches are drawn). `progress`
    shows a bar once an eval takes more than a second (a large corpus's val split, a big model on a CPU). `stop`,
    asked before each batch: when it turns true the eval is abandoned (EvalStopped), the model left as it was.
    """
    was_training = model.training
    model.eval()
    out = {}
    splits = ("train",) if cfg.train.eval_full_val else ("train", "val")
    try:
        # An eval of a large model can take a minute (a GPT-2 fine-tune on a CPU): a bar then, none for the usual
        # short ones
        with eval_bar(len(splits) * cfg.train.eval_iters, "eval", progress) as bar:
            for split in splits:
                # seed + 12345: any fixed offset, so that every eval scores the same windows, drawn apart from the
                # training batches
                loader = BatchLoader(data_dir, split, cfg.train.batch_size, cfg.model.block_size, device=device,
                                     seed=cfg.train.seed + 12345)
                losses = torch.zeros(cfg.train.eval_iters)
                for k in unless_stopped(range(cfg.train.eval_iters), stop):
                    x, y = loader.next_batch()
                    with autocast():
                        loss = model(x, y)[1]
                    losses[k] = loss.float().item()
                    bar.update(1)
                out[split] = losses.mean().item()
        if cfg.train.eval_full_val:
            out["val"] = full_split_loss(model, data_dir, "val", cfg, device, autocast, progress, stop)
    finally:
        model.train(was_training)
    return out
