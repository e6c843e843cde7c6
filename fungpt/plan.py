"""A plan before training: size, compute, memory and time, without writing a run folder.

`fungpt train --config F --dry-run` answers "will this fit, and how long will it take?":

  1. the model is built on PyTorch's "meta" device, where tensors have shapes but no storage,
     so even gpt2-xl is counted in a second or two (the first meta build imports torch's reference
     kernels) without allocating 6 GB;
  2. parameters, tokens per optimizer step and FLOPs per step follow from the shapes;
  3. memory is estimated from the parts training keeps alive (below) and compared with what
     the device has;
  4. a few real optimizer steps are timed and the whole run's duration projected from them.

Memory comes from `fungpt.inspection.estimate_memory` (the same estimate `fungpt inspect` prints):
weights, gradients and AdamW state from the parameter count, activations from a per-layer formula
checked against the tensors autograd saves, plus 16-bit weight copies and backward temporaries.

The same estimate gives the advice printed on a CUDA out-of-memory error: the largest batch
that fits and the grad_accum_steps that keep the same tokens per step.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from fungpt.config import RunConfig
from fungpt.errors import FunGPTError
from fungpt.hardware import Precision, check_compile, detect_precision, tf32_products
from fungpt.inspection import estimate_memory, human_bytes
from fungpt.model import GPT, GPTConfig

# Keep this fraction of the device free for the framework (CUDA context, allocator fragmentation).
SAFETY = 0.9
GIB = 1024**3


def device_memory(device: str) -> int | None:
    """Total memory of `device` in bytes (None where it cannot be told). For the CPU: the machine's memory, or
    the container's limit where that is lower (Linux control groups, as Docker and Kubernetes set them)."""
    try:
        if device.startswith("cuda"):
            return int(torch.cuda.mem_get_info(device)[1])
        if device == "mps":
            return int(torch.mps.recommended_max_memory())
        physical = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))  # not on Windows
    except Exception:  # noqa: BLE001 - no such device, no such API on this platform or torch build
        return None
    limit = cgroup_memory_limit()
    return physical if limit is None else min(physical, limit)


def processes_sharing(device: str) -> int:
    """How many processes share `device`'s memory: under torchrun (RANK and WORLD_SIZE set, as train's
    setup_distributed asks) on a CPU, all those on this machine (LOCAL_WORLD_SIZE); on CUDA each process has a GPU
    of its own (an Apple GPU is refused under torchrun)."""
    local, world = os.environ.get("LOCAL_WORLD_SIZE", ""), os.environ.get("WORLD_SIZE", "1")
    launched = "RANK" in os.environ and world.isdigit() and int(world) > 1
    return int(local) if launched and local.isdigit() and int(local) > 1 and not device.startswith("cuda") else 1


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> int | None:
    """This process's memory limit from its control groups in bytes, or None if it has none (or off Linux).

    The smallest limit from the process's own group (/proc/self/cgroup) up to the root: Docker and Kubernetes
    set it on the container's, Slurm (--mem) and systemd (MemoryMax) on groups inside. cgroup v2 writes it in
    memory.max ("max": no limit), v1 in memory/.../memory.limit_in_bytes (a huge number for no limit, which min()
    with the machine's memory then ignores)."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        lines = []
    groups = []  # (the hierarchy's folder, this process's group in it, the limit's file name)
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            groups.append((root, path, "memory.max"))
        elif "memory" in controllers.split(","):
            groups.append((root / "memory", path, "memory.limit_in_bytes"))
    limits = []
    for base, path, name in groups or [(root, "/", "memory.max"), (root / "memory", "/", "memory.limit_in_bytes")]:
        folder = base / path.lstrip("/")
        while True:
            try:
                text = (folder / name).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                limits.append(int(text))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(limits) if limits else None


def largest_batch(model_cfg: GPTConfig, dtype: str, memory: int, device: str = "cpu", optimizer: str = "adamw") -> int:
    """The largest micro-batch whose estimate fits in SAFETY * memory bytes (0 if not even one sequence)."""
    fixed = estimate_memory(model_cfg, 0, dtype, device=device, optimizer=optimizer)["total"]
    per_seq = estimate_memory(model_cfg, 1, dtype, device=device, optimizer=optimizer)["total"] - fixed
    return max(0, int((SAFETY * memory - fixed) // per_seq))


def batch_advice(cfg: RunConfig, dtype: str, memory: int, device: str = "cpu", failed: bool = False) -> str:
    """What to set when the batch does not fit: a smaller batch_size with more grad_accum_steps. failed: the run's
    batch ran out of memory (the estimate may say it fits: the GPU's memory is its total, not what is free), so the
    advice is at most half of it."""
    tc = cfg.train
    fit = largest_batch(cfg.model, dtype, memory, device, tc.optimizer)
    if fit < 1:
        fixed = estimate_memory(cfg.model, 0, dtype, device=device, optimizer=tc.optimizer)
        if fixed["total"] > SAFETY * memory:
            # (at batch 0: the weights, their gradients, the optimizer's state and its update's scratch, and under
            # 16-bit autocast the weights' copies)
            return (f"even one sequence does not fit: the weights, their gradients, {fixed['optimizer_name']} state "
                    f"and its update's scratch alone need about {fixed['total'] / GIB:.1f} GiB of "
                    f"{memory / GIB:.1f} GiB; use a smaller model, or a "
                    f"{'larger GPU' if device.startswith('cuda') else 'machine with more memory'}")
        one = estimate_memory(cfg.model, 1, dtype, device=device, optimizer=tc.optimizer)
        why = (" (with dropout outside CUDA, attention keeps block_size x block_size matrices: model.dropout = 0 "
               "avoids them)" if one["attn_impl"] == "sdpa" and cfg.model.dropout > 0 and not device.startswith("cuda")
               else "")
        return (f"even one sequence does not fit: batch 1 x block_size {cfg.model.block_size} needs about "
                f"{one['total'] / GIB:.1f} GiB of {memory / GIB:.1f} GiB{why}; use a smaller block_size")
    if failed and tc.batch_size == 1:  # (no smaller batch: the sequence itself is too long for what is free)
        return (f"batch_size = 1 ran out of memory, though the estimate says it fits (other programs may hold the "
                f"GPU's memory): use a smaller block_size (now {cfg.model.block_size}) or model, or free the GPU")
    fit = min(fit, max(1, tc.batch_size // 2) if failed else tc.batch_size)
    accum = math.ceil(tc.batch_size * tc.grad_accum_steps / fit)
    return (f"the estimate says batch_size = {fit} fits; set train.batch_size = {fit} and "
            f"train.grad_accum_steps = {accum} to keep about the same {tc.batch_size * tc.grad_accum_steps} "
            f"sequences per optimizer step")


def out_of_memory_advice(cfg: RunConfig, prec: Precision) -> str:
    """The one-line message for a CUDA out-of-memory error during training."""
    memory = device_memory("cuda")
    head = (f"out of GPU memory with batch_size = {cfg.train.batch_size}, block_size = {cfg.model.block_size} "
            f"({prec.dtype})")
    if memory is None:
        return f"{head}: lower train.batch_size and raise train.grad_accum_steps to keep the same tokens per step"
    return f"{head}: {batch_advice(cfg, prec.dtype, memory, 'cuda', failed=True)}"


def _fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else human_bytes(n)  # (a tiny model's weights in KiB, not 0.0 MiB)


def _fmt_duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def dry_run(cfg: RunConfig, timed_steps: int = 3, out: Callable[[str], Any] = print,
            model_named: Collection[str] = (), resume: bool = False, overwrite: bool = False,
            start_time: float | None = None, progress: bool = True, data_named: Collection[str] = ()) -> dict[str, Any]:
    """Print the plan for `cfg` and return its figures; trains a few steps to time them, saves nothing.
    `model_named`, `data_named`, `resume`, `overwrite`: as for train.train (what training would refuse is refused; a
    resume plans the steps from its checkpoint's on). `start_time`: when the command started (time.time()), for the
    start-up a time budget also covers; by default when this call did. `progress`: bars on stderr for the data
    it prepares and for timed steps that take over a second."""
    start_time = time.time() if start_time is None else start_time
    from fungpt import checkpoint as ckpt
    from fungpt.data import BatchLoader, is_prepared, load_meta
    from fungpt.rundata import check_resume_tokenizer, resolve_model_and_data
    from fungpt.rundir import HoldsARun, check_out_dir, check_resume_model
    from fungpt.train import (
        configure_optimizer,
        dropout_note,
        passes_note,
        resume_point,
        schedule_notes,
    )

    tc = cfg.train
    tc.check_limits()  # refused as training would refuse them
    prec = detect_precision(tc.device, tc.dtype, tc.optimizer)
    if tc.compile:
        check_compile(prec.device)  # refused as training would refuse it
    from fungpt.metrics import check_loggers

    check_loggers(tc)  # (likewise: a logger's missing package)
    out_dir = Path(cfg.out_dir)
    try:  # likewise (a folder that holds another run, nothing to resume, ...); a run training there is no bar
        check_out_dir(cfg, resume, overwrite, check_lock=False)
    except HoldsARun as e:
        raise FunGPTError(f"{e} (with --dry-run, --overwrite deletes nothing)") from None
    if not resume:
        cfg.model.check_new()
    folder, manifest = resume_point(cfg)[1:3] if resume else (None, None)
    # (the pretrained weights a new fine-tune starts from are checked, before the data, as training reads them)
    cfg, data_dir, pre = resolve_model_and_data(cfg, progress=progress, model_named=model_named,
                                                resume_dir=out_dir if resume else None, check_weights=folder is None,
                                                data_named=data_named)
    if resume:  # the checks of a resume, which do not change the folder
        check_resume_model(cfg)
        if folder is not None:
            ckpt.check_model_config(manifest, folder, cfg.model.to_dict(), out_dir / "config.json")
            check_resume_tokenizer(data_dir, out_dir, manifest.get("tokenizer_sha256"))
            if note := dropout_note(manifest, cfg.model.dropout):
                out(note)
    # where a resume starts: its checkpoint's step, and the part of a time budget it has used
    start = int(manifest["step"]) if manifest is not None else 0
    used_s = float(ckpt.load_state(folder)["elapsed_s"]) if folder is not None and tc.max_minutes else 0.0
    mc = cfg.model

    # 1-2. Size and compute, on the meta device: shapes only, no memory.
    with torch.device("meta"):
        meta_model = GPT(mc)
    n_params = meta_model.num_params()
    world = os.environ.get("WORLD_SIZE", "")  # under torchrun: the processes, each with its own batches
    world = int(world) if world.isdigit() and int(world) > 1 else 1
    tokens_per_step = tc.batch_size * mc.block_size * tc.grad_accum_steps * world
    flops_per_step = meta_model.flops_per_token() * tokens_per_step
    del meta_model

    # 3. Memory.
    mem = estimate_memory(mc, tc.batch_size, prec.dtype, device=prec.device, optimizer=tc.optimizer)
    have = device_memory(prec.device)
    sharing = processes_sharing(prec.device)  # (the memory check below is per process: its share)
    have = have // sharing if have is not None else None
    fits = have is None or mem["total"] <= SAFETY * have
    out(f"fungpt: dry run: {prec.reason}")
    origin = (f"resuming {cfg.out_dir} at step {start:,}" if resume
              else f"pretrained {pre.name}" if pre else "scratch")
    out(f"  model          {n_params:,} parameters ({mc.n_layer} layer{'s' * (mc.n_layer != 1)}, "
        f"{mc.n_head} head{'s' * (mc.n_head != 1)}, n_embd {mc.n_embd}, "
        f"block_size {mc.block_size}, vocab {mc.vocab_size:,}; from {origin})")
    out(f"  per step       {tokens_per_step:,} tokens (batch {tc.batch_size} x block {mc.block_size} x "
        f"grad_accum {tc.grad_accum_steps}" + (f" x {world} processes" if world > 1 else "")
        + f"), {flops_per_step:.3g} FLOPs")
    if not resume and (note := passes_note(tc, tokens_per_step, load_meta(data_dir)["train_tokens"])):
        out(f"  {note.removeprefix('fungpt: ')}")  # (as training will say it)
    acts = "bfloat16 Linear inputs, the rest float32" if prec.cpu_bf16_products else prec.dtype
    # (the tensors alone: a CPU process's peak ran 1.4-1.5x the estimate, with torch's libraries and the allocator's
    # slack, in a GPT-2 fine-tune and a 6 x 384 run)
    out(f"  memory         {_fmt_bytes(mem['total'])} estimated (the tensors; the process's peak runs higher): "
        f"weights {_fmt_bytes(mem['weights'])}, "
        f"gradients {_fmt_bytes(mem['grads'])}, {mem['optimizer_name']} {_fmt_bytes(mem['optimizer'])}, "
        + (f"16-bit weight copies {_fmt_bytes(mem['weight_copies'])}, " if mem["weight_copies"] else "")
        + f"activations {_fmt_bytes(mem['activations'])} ({acts}), "
        f"backward temporaries "
        f"{_fmt_bytes(mem['temporaries'])}")
    if have is None:
        out(f"  device         {prec.device}: its memory size is unknown here")
    else:
        verdict = "fits" if fits else f"does NOT fit: {batch_advice(cfg, prec.dtype, have, prec.device)}"
        share = f" for each of the {sharing} processes on this machine" if sharing > 1 else ""
        out(f"  device         {prec.device} has {_fmt_bytes(have)}{share}: {verdict}")

    # 4. Time a few real steps (random weights: the speed does not depend on their values).
    timed_at = time.time()  # (the start-up until here: about a real run's, which the budget covers)
    step_s, timed = (_time_steps(cfg, prec, data_dir, timed_steps, configure_optimizer, BatchLoader, progress) if fits
                     else (None, 0))
    result: dict[str, Any] = {"num_params": n_params, "tokens_per_step": tokens_per_step,
                              "flops_per_step": flops_per_step, "memory": mem, "device_memory": have,
                              "fits": fits, "device": prec.device, "dtype": prec.dtype, "step_s": step_s}
    if step_s is not None:
        # Each evaluation runs eval_iters forward passes on each of 2 splits (with eval_full_val, the val split's
        # every window instead); a forward pass is about a third of a micro-step (backward costs twice as much).
        steps = max(0, tc.max_iters - start)
        # at step 0 (a new run without a time budget, which skips it), every eval_interval steps after `start`,
        # and at the last step
        evals = ((start == 0 and tc.max_minutes is None) + tc.max_iters // tc.eval_interval
                 - start // tc.eval_interval + (tc.max_iters % tc.eval_interval != 0)) if steps else 0
        val_batches = (math.ceil((load_meta(data_dir)["val_tokens"] - 1) / mc.block_size) / tc.batch_size
                       if tc.eval_full_val else tc.eval_iters)
        one_eval_s = (tc.eval_iters + val_batches) * step_s / tc.grad_accum_steps / 3
        eval_s = evals * one_eval_s
        total_s = steps * step_s + eval_s
        left = f" (from step {start:,} to max_iters = {tc.max_iters:,})" if resume else ""
        per_step = f"  time           {step_s * 1000:.0f} ms per step (median of {timed}): "
        line = f"{per_step}{steps:,} steps{left} + evals ~ {_fmt_duration(total_s)}"
        budget_s = tc.max_minutes * 60 - used_s if tc.max_minutes is not None else None
        # The command also starts up (imports, data, model: about what this one took until the steps were timed)
        # and saves checkpoints, which are not timed here: a run that saves every few steps takes far longer
        # (at every multiple of checkpoint_interval after `start` and below max_iters, and at max_iters)
        saves = ((tc.max_iters - 1) // tc.checkpoint_interval - start // tc.checkpoint_interval + 1) if steps else 0
        whole = (f"  whole command  ~ {_fmt_duration(total_s + timed_at - start_time)} with its start-up "
                 f"({timed_at - start_time:.0f} s here); not timed here: {saves:,} checkpoint save(s) of "
                 f"{_fmt_bytes(mem['weights'] + mem['optimizer'])} each, and up to {evals:,} save(s) of the best "
                 f"weights ({_fmt_bytes(mem['weights'])}), one after each eval that improves on the val loss"
                 ) if steps else ""  # (nothing to train: no command to speak of)
        # The budget also covers the start-up (imports, data, model: about what this command took until the
        # steps were timed), the final eval and the exit; and each step its share of the evals every
        # eval_interval steps (those of the steps that fit, not every eval up to max_iters)
        from fungpt.budget import EXIT_RESERVE_S, TORCHRUN_EXIT_S

        ends_s = one_eval_s + EXIT_RESERVE_S + (TORCHRUN_EXIT_S if world > 1 else 0.0)
        if budget_s is not None and total_s + (timed_at - start_time) + ends_s > budget_s:
            left_s = budget_s - (timed_at - start_time) - ends_s
            steps_in_budget = int(max(0.0, left_s) / (step_s + one_eval_s / tc.eval_interval))
            spent = f", {used_s / 60:.1f} of them used," if used_s else ""
            refused = ("nothing would be trained: raise train.max_minutes to continue it" if folder is not None
                       else "training would refuse it")  # (a resume that used its budget up ends without a step)
            # (the budget first: max_iters, a million steps in a budget preset, would take days)
            line = (f"{per_step}max_minutes = {tc.max_minutes}{spent} stops it after about {steps_in_budget:,} steps"
                    if steps_in_budget else f"{per_step}max_minutes = {tc.max_minutes}{spent} leaves no time for a "
                    f"step after the start-up and the final eval: {refused}") + f" ({steps:,} steps{left} + evals " \
                f"would take {_fmt_duration(total_s)})"
            total_s, whole = max(0.0, budget_s), ""  # (the budget covers the whole command)
        if world > 1:
            line += " (timed in one process alone; the processes also all-reduce their gradients each step)"
        if tc.compile:  # (compiling here would take as long as it does at the run's start)
            took = ("about 30 s for a tiny model on a 2-core CPU" if prec.device == "cpu" else
                    "17-27 s for the GPU speedrun on an H200, README")
            line += f"; timed without train.compile, which first compiles ({took}; not in the total) and then may " \
                    f"run steps faster"
        out(line)
        if whole:
            out(whole)
        result["projected_s"], result["eval_s"] = total_s, eval_s
    for note in schedule_notes(tc, new_run=folder is None):  # (as training says them: a plan is where they help)
        out(note)
    cached = "" if is_prepared(cfg.data.path) else ", only the prepared data's cache"  # (a folder given: read)
    out(f"fungpt: dry run done (no run folder was written{cached}; drop --dry-run to train)")
    return result


def _time_steps(cfg: RunConfig, prec: Precision, data_dir, n: int, configure_optimizer, batch_loader,
                progress: bool = False) -> tuple[float, int]:
    """(median seconds per optimizer step, steps timed): `n` steps or more (see _timed_steps), after one warm-up
    step, set up as training sets up."""
    from fungpt.hardware import keep_freed_memory
    from fungpt.linear import using_cpu_matmul

    device = prec.device
    if device == "cpu":  # training's CPU settings: its malloc tuning, and its matmul library (given back after)
        keep_freed_memory()
    # Its own random numbers (the weights' init, the batches' dropout): a caller's seeded torch RNG goes on as if
    # no plan was made (`fungpt.plan.dry_run` in a notebook, then its own training or sampling). (The CPU's and the
    # current GPU's; an MPS run's dropout draws on its device's own.)
    gpu = [torch.cuda.current_device()] if device == "cuda" else []
    # (fork_rng keeps the CPU's stream and the CUDA devices listed; torch.manual_seed below also seeds an Apple GPU's,
    # kept here by hand)
    mps_state = torch.mps.get_rng_state() if torch.backends.mps.is_available() else None
    try:
        with (using_cpu_matmul(cfg.train.cpu_matmul) if device == "cpu" else contextlib.nullcontext(),
              torch.random.fork_rng(devices=gpu)):
            return _timed_steps(cfg, prec, data_dir, n, configure_optimizer, batch_loader, progress)
    finally:
        if mps_state is not None:
            torch.mps.set_rng_state(mps_state)


TIMED_MICRO_BATCHES = 16  # the most micro-batches of a step a dry run times (the rest: as many times theirs)
SLOW_MICRO_BATCH_S = 2.0  # a warm-up micro-batch slower than this: 2 micro-batches a timed step, not 16


def _timed_steps(cfg: RunConfig, prec: Precision, data_dir, n: int, configure_optimizer, batch_loader,
                 progress: bool = False) -> tuple[float, int]:
    from tqdm import tqdm

    from fungpt.data import bar_interval
    from fungpt.hardware import sync  # (waits for a GPU's queued work: CUDA's or an Apple GPU's)

    tc = cfg.train
    device = prec.device
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(device)
    model.train()
    optimizer = configure_optimizer(model, tc, device)
    scaler = torch.amp.GradScaler(device, enabled=prec.needs_grad_scaler)
    loader = batch_loader(data_dir, "train", tc.batch_size, cfg.model.block_size, device=device, seed=tc.seed)

    def autocast():
        return prec.context()

    times = []
    # A step of many micro-batches is timed on the first TIMED_MICRO_BATCHES of them, scaled up to all: they all
    # cost the same, and timing "a few steps" of grad_accum_steps = 2**24 took days
    micro = min(tc.grad_accum_steps, TIMED_MICRO_BATCHES)
    # A big model's steps take minutes on a CPU (a GPT-2 fine-tune): a bar then, over the micro-batches, on stderr
    # (the plan goes to stdout); none for short steps, which are timed for a second (below) and their warm-up: a
    # delay of 1 s showed a bar in the last moment of that second on a busy machine
    bar = tqdm(total=1 + n * micro, desc="timing steps (+1 warm-up)", unit="batch",
               leave=False, dynamic_ncols=True, delay=2.0, mininterval=bar_interval(), file=sys.stderr,
               disable=not progress)
    try:
        with bar, tf32_products() if device == "cuda" else contextlib.nullcontext():  # as training runs them
            i = 0
            # n steps at least; short ones go on for a second (at most 20): a median of 3 steps of 0.1 s followed
            # the machine's moment (62-175 ms for one shape, whose real steps took 86-144)
            while i <= n or (len(times) < 20 and sum(times) < 1.0):
                t0 = time.perf_counter()
                for _ in range(1 if i == 0 else micro):  # (the warm-up: one micro-batch pays the one-off costs)
                    x, y = loader.next_batch()
                    with autocast():
                        loss = model(x, y)[1]  # (as the trainer: the logits are not kept)
                    scaler.scale(loss / tc.grad_accum_steps).backward()
                    bar.update(1)
                sync(device)  # (the queued work done: the time scaled up is the micro-batches', not their queueing)
                t_micro = time.perf_counter() - t0
                t0 = time.perf_counter()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                sync(device)
                if i > 0:  # the first step pays one-off costs (allocations, kernel selection)
                    times.append(t_micro * tc.grad_accum_steps / micro + time.perf_counter() - t0)
                elif t_micro > SLOW_MICRO_BATCH_S:  # (a GPT-2 fine-tune on a CPU: 20 s a micro-batch; 16 of them a
                    # step made the dry run take 11 minutes to time 3 steps: 2 a step tell the time as well)
                    micro = min(micro, 2)
                    bar.total = 1 + n * micro
                i += 1
                if i > n:  # (a step more: the bar counts it in)
                    bar.total = 1 + i * micro
    except torch.cuda.OutOfMemoryError:
        raise FunGPTError(out_of_memory_advice(cfg, prec)) from None
    times.sort()
    return times[len(times) // 2], len(times)
