"""Training: a linear loop built from small functions, readable in one sitting.

    train(cfg)
      ├─ check_out_dir            refuse a run folder that holds another run, before any long work (rundir.py)
      ├─ resume_point             a resume's saved config and checkpoint, checked
      ├─ resolve_model_and_data   prepared folder, or prepare the text on the fly into a cache (rundata.py); a
      │                           fine-tune's weights read, before --overwrite deletes anything
      ├─ lock_out_dir, prepare_out_dir   the run folder and its lock (rundir.py)
      ├─ build model, configure_optimizer (AdamW, decay on matrices only; or Muon for the blocks' matrices)
      ├─ resume: load_training_state of the latest checkpoint (optional)
      └─ loop:  agree_on_next_step (out of time? Ctrl-C? the lr position: budget.py; stopping.py) → get_lr
                → forward_backward (gradients of A micro-batches) → clip → is_diverged → step
                → log (metrics.py) → evaluate (evaluation.py) → save_checkpoint (checkpoint.py)

Notation: B = batch_size, T = block_size, A = grad_accum_steps, W = number of processes.
One optimizer step sees B * T * A * W tokens.

Multi-GPU / multi-node: launch with `torchrun --nproc_per_node=N -m fungpt train ...`.
torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; each process trains a replica on different
batches (DistributedDataParallel averages gradients during backward), and rank 0 alone
logs and saves. On CPUs the gloo backend is used, on GPUs nccl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fungpt import checkpoint as ckpt
from fungpt import pretrained
from fungpt.budget import TimeBudget, budget_spent, format_duration, periodic_due
from fungpt.config import (
    RunConfig,
    TrainConfig,
    load_run_config,
)
from fungpt.data import (
    BatchLoader,
    bar_interval,
    load_meta,
    same_dataset,
)
from fungpt.data import (
    data_fingerprint as fingerprint_of,
)
from fungpt.errors import FunGPTError, read_json, said_on_ctrl_c, shell_quote
from fungpt.evaluation import (
    EVAL_MARGIN,
    EvalStopped,
    estimate_eval_time,
    eval_bar,
    evals_changed,
    evaluate,
    time_forward,
)
from fungpt.hardware import (
    Precision,
    check_compile,
    compile_failure,
    detect_precision,
    float32_default,
    keep_freed_memory,
    sync,
    tf32_products,
    torch_version,
)
from fungpt.linear import onednn_bf16_works, onednn_linear, onednn_works, using_cpu_matmul
from fungpt.metrics import MetricsLog, check_loggers, eval_left_in_log
from fungpt.model import GPT
from fungpt.rundata import check_resume_tokenizer, resolve_model_and_data
from fungpt.rundir import check_out_dir, holds_run, lock_out_dir, prepare_out_dir
from fungpt.stopping import StopFlag, close_on_error
from fungpt.tokenizer import load_tokenizer

# The oldest torch whose multi-process runs (torchrun) pass FunGPT's DDP tests (tests/test_train.py): with 2.4.1 and
# 2.6.0 a resume with another number of processes, or a time-budget run, hung in the collective calls at start-up;
# 2.8.0 passed them all. One process works from torch 2.4 (pyproject.toml).
DDP_MIN_TORCH = (2, 8)


# ----------------------------------------------------------------------------------------------
# The pieces of a run: processes, optimizer, resume, lr schedule, steps (the loop itself is below, in _train)


@dataclass
class Dist:
    """Where this process sits in a (possibly one-process) distributed run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> Dist:
    """Join the process group when launched by torchrun (which sets RANK and WORLD_SIZE)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    if torch_version() < DDP_MIN_TORCH:
        raise FunGPTError(f"training with several processes (torchrun) needs torch 2.8 or newer, this is "
                          f"{torch.__version__} (with 2.4 and 2.6 the processes could wait on each other for ever): "
                          f"pip install -U torch, or train in one process")
    if device == "mps":  # (gloo, the backend off CUDA, carries CPU and CUDA tensors only)
        raise FunGPTError("training with several processes (torchrun) on an Apple GPU is not supported: torch's "
                          "gloo backend cannot carry its tensors; train in one process on the GPU, or under "
                          "torchrun on the CPU (--train.device cpu)")
    d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return d


def warn_if_memory_short(cfg: RunConfig, prec, num_params: int | None = None) -> None:
    """Say so before training when the memory estimate exceeds the machine's memory: on a CPU (or Apple GPU)
    running out does not raise an error that could be explained, the system kills the process."""
    from fungpt.inspection import estimate_memory
    from fungpt.plan import GIB, SAFETY, batch_advice, device_memory, processes_sharing

    have = device_memory(prec.device)
    local = processes_sharing(prec.device)  # under torchrun, the processes on this machine share its memory
    need = local * estimate_memory(cfg.model, cfg.train.batch_size, prec.dtype, device=prec.device,
                                   num_params=num_params, optimizer=cfg.train.optimizer)["total"]
    who = "this run needs" if local == 1 else f"the {local} processes of this run on this machine need"
    if have is not None and need > SAFETY * have:  # (the margin --dry-run's "does NOT fit" leaves)
        advice = batch_advice(cfg, prec.dtype, have // local, prec.device)
        than = "more than" if need > have else f"over {SAFETY:.0%} of"
        print(f"fungpt: warning: {who} about {need / GIB:.1f} GiB of memory by estimate, {than} the "
              f"{have / GIB:.1f} GiB of this {prec.device}: the system may kill it. {advice[0].upper()}{advice[1:]} "
              f"(--dry-run shows the estimate)")


def weights_might_not_fit(cfg: RunConfig, device: str) -> bool:
    """Whether training's weights, gradients and AdamW state alone (16 bytes a parameter) might exceed the
    memory, by a lower bound of the parameter count: per block 4 C^2 for attention and 8 C^2 for the MLP,
    plus V C for the token embedding (GPT-2 small: 85M + 39M of its 124M)."""
    from fungpt.plan import device_memory, processes_sharing

    m = cfg.model
    have = device_memory(device)
    return have is not None and 16 * (12 * m.n_layer * m.n_embd**2 + m.vocab_size * m.n_embd) \
        * processes_sharing(device) > have


def dropout_note(manifest: dict[str, Any], dropout: float) -> str | None:
    """The note for a resume that changes dropout, after its checks passed. The dropout the checkpoint trained with
    is its manifest's (config.json is rewritten by every start, also by one that stopped before it saved)."""
    trained = manifest.get("model")
    was = trained.get("dropout") if isinstance(trained, dict) else None
    if not isinstance(was, int | float) or was == dropout:
        return None
    return f"fungpt: note: dropout {was:g} -> {dropout:g} from this step on (the checkpoint was trained with {was:g})"


def adamw_impl(device: str) -> dict[str, Any]:
    """fused (one kernel for all parameters) on GPUs and CPUs; foreach (batched tensor ops) elsewhere (e.g. mps).

    On a CPU fused took 2.5-3 ms per step where foreach took 5-6 ms, on the 4 x 128 baby shape (BENCHMARKS.md).
    """
    return {"fused": True, "foreach": None} if device in ("cuda", "cpu") else {"fused": None, "foreach": True}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Load a saved optimizer's state (its moments and step counts), keeping this run's settings.

    load_state_dict also restores every group setting saved with it: betas, weight decay, Muon's momentum
    and lr scale, and the implementation flags (fused or foreach). Those belong to this run's config (and
    config.json records them), so each group gets back the settings configure_optimizer gave it: a resume with
    --train.beta2 0.95 trains with 0.95, not silently with the checkpoint's 0.99. (An unchanged config gives
    the same values as the checkpoint's, so an exact resume stays exact. A state saved by a version that used
    foreach on CPU would otherwise bring foreach back, and a float16 run's GradScaler would then fail.)
    """
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    # Each moment the shape of its parameter, in one piece (and a step count one number): a state file whose
    # tensors do not (damaged, or forged with a matching manifest) made the fused AdamW write past their ends
    for part in getattr(optimizer, "parts", (optimizer,)):
        for param, saved in part.state.items():
            for name, value in saved.items():
                if not isinstance(value, torch.Tensor):
                    continue
                fits = value.dim() == 0 if name == "step" else value.shape == param.shape and value.is_contiguous()
                if not fits:
                    raise ValueError(f"its {name} of a {tuple(param.shape)} parameter is {tuple(value.shape)}"
                                     + ("" if value.shape != param.shape or name == "step" else ", not in one piece"))
    for group, settings in zip(optimizer.param_groups, fresh):  # (load_state_dict checks the groups match)
        group.update(settings)


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one (e.g. Muon for the block matrices, AdamW for the rest).

    param_groups lists every group of every part, so the training loop sets learning rates
    the same way for all; each group's "lr_scale" says its peak lr relative to train.lr.
    """

    def __init__(self, *parts: torch.optim.Optimizer):
        self.parts = parts
        # Optimizer.__init__ sets up what torch's step hooks and lr schedulers expect of an optimizer; then
        # param_groups becomes the parts' own group dicts, so that an lr set here is the lr a part steps with.
        super().__init__([p for part in parts for g in part.param_groups for p in g["params"]], {})
        self.param_groups = [g for part in parts for g in part.param_groups]  # (the state stays in the parts)

    def add_param_group(self, param_group: dict[str, Any]) -> None:  # noqa: D102 - see torch.optim.Optimizer
        if hasattr(self, "parts") and self.param_groups:  # (Optimizer.__init__ adds one group, replaced above)
            # (a group added here would be listed but stepped by no part: its parameters would never train)
            raise ValueError("CombinedOptimizer cannot tell which optimizer should step a new group: add it to "
                             "one of .parts (parts[i].add_param_group), then build a new CombinedOptimizer")
        super().add_param_group(param_group)

    def step(self, closure=None):  # noqa: D102 - see torch.optim.Optimizer
        loss = None
        if closure is not None:  # (once for all parts: it recomputes the loss and every gradient)
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict.get("parts", [])) != len(self.parts):
            raise FunGPTError("the checkpoint's optimizer state does not match train.optimizer: resume with the "
                              "optimizer the run was started with")
        for part, sd in zip(self.parts, state_dict["parts"]):
            part.load_state_dict(sd)
        # load_state_dict gives each part new group dicts: list those, or setting "lr" here would miss them.
        self.param_groups = [g for part in self.parts for g in part.param_groups]


def configure_optimizer(model: GPT, tc: TrainConfig, device: str) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; with optimizer = "muon", Muon for the block matrices.

    Decay pulls weights towards zero, which regularises the matrices that mix features
    (embeddings, attention and MLP weights). Biases and norm gains are 1-D: decaying them
    only fights the model (a LayerNorm gain decayed to 0 would switch its output off).

    Muon (Keller Jordan 2024) replaces each matrix's momentum-smoothed gradient by the nearest
    orthogonal matrix (a few Newton-Schulz iterations), so every direction of the update moves
    equally far. It is meant for the hidden 2-D matrices only: the embedding table (a look-up,
    not a linear map of activations), the output head, norms and biases stay on AdamW.

    (Another optimizer here also changes the memory `inspect` and the dry run report: they count AdamW's two
    state tensors per weight and Muon's one, see inspection.estimate_memory.)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    muon: list[torch.nn.Parameter] = []
    if tc.optimizer == "muon":
        # named_parameters() yields a tied matrix once, under its first name (wte), so lm_head never lands here
        muon = [p for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2]
    in_muon = {id(p) for p in muon}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in in_muon]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    adamw = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), **adamw_impl(device))
    if not muon:
        return adamw
    from fungpt.muon import Muon  # float32 and batched: torch.optim.Muon's bfloat16 is slow on CPUs

    matrices = Muon([{"params": muon, "lr_scale": tc.muon_lr / tc.lr}], lr=tc.muon_lr,
                    momentum=tc.muon_momentum, weight_decay=tc.weight_decay)
    return CombinedOptimizer(adamw, matrices)


# The [train] fields configure_optimizer reads, besides the lr schedule's (a resume applies them as now set)
OPTIMIZER_SETTINGS = ("beta1", "beta2", "weight_decay", "muon_lr", "muon_momentum")


def resume_point(cfg: RunConfig) -> tuple[RunConfig, Path | None, dict[str, Any] | None, TrainConfig]:
    """What a resume of cfg.out_dir starts from, checked before the data (after check_out_dir): the run's saved
    config, its latest checkpoint folder and manifest (every file's size and sha256 verified; None for a run
    that never saved) and the [train] settings it was trained with. Refuses another optimizer (its saved state
    is another's)."""
    saved_cfg = load_run_config(Path(cfg.out_dir))  # (check_out_dir found it loadable)
    folder = ckpt.find_checkpoint(cfg.out_dir)
    manifest = ckpt.verify_checkpoint(folder) if folder is not None else None
    saved_train = trained_with(manifest, saved_cfg)
    if manifest is not None:  # config.json edited since the checkpoint was saved is said to be that (the check
        # after the data blamed the data), as `fungpt sample` says it
        ckpt.check_model_config(manifest, folder, saved_cfg.model.to_dict(), Path(cfg.out_dir) / "config.json")
    if folder is not None and saved_train.optimizer != cfg.train.optimizer:
        raise FunGPTError(f"cannot resume {cfg.out_dir}: it was trained with train.optimizer = "
                          f"{saved_train.optimizer!r}, not {cfg.train.optimizer!r}; resume with --train.optimizer "
                          f"{saved_train.optimizer}, or train into a new out_dir")
    return saved_cfg, folder, manifest, saved_train


def trained_with(manifest: dict[str, Any] | None, saved_cfg: RunConfig | None) -> TrainConfig | None:
    """The [train] settings a checkpoint was trained with: its manifest's own record, else (checkpoints from
    before it was kept there) config.json's. config.json is rewritten by every start, also by one that failed
    before its first save, so it may hold settings that never trained."""
    if manifest is None or saved_cfg is None:
        return saved_cfg.train if saved_cfg is not None else None
    try:
        return RunConfig.from_dict({"train": manifest["train"]}, saved=True).train
    except (KeyError, FunGPTError):  # (older checkpoints, or a field this version no longer has)
        return saved_cfg.train


def resume_notes(saved: TrainConfig, new: TrainConfig, step: int) -> list[str]:
    """One line each on changed settings that make a resumed run differ from one that was never stopped.

    Such changes are allowed (raising max_iters is how a run is trained longer), but they change what the
    run does from here: the lr schedule (by default it ends at max_iters, so a longer run stretches it and
    the lr goes back up), or the eval batches (drawn from the seed: val losses before and after the resume
    would then not compare).
    """
    notes = []
    schedule = ["lr", "min_lr", "warmup_iters", "lr_schedule", "wsd_decay_frac", "lr_decay_iters", "max_iters"]
    changed = ", ".join(f"{n} {getattr(saved, n)} -> {getattr(new, n)}" for n in [*schedule, "max_minutes"]
                        if getattr(saved, n) != getattr(new, n))
    if step == 0:
        pass  # no step has trained on the old schedule: the run goes as if it had started with the new one
    elif not (saved.max_minutes or new.max_minutes):
        was, now = get_lr(step, saved), get_lr(step, new)
        if not math.isclose(was, now, rel_tol=1e-6):
            end = (" (the decay ends at max_iters unless train.lr_decay_iters is set)"
                   if new.lr_decay_iters is None and saved.max_iters != new.max_iters else "")
            digits = next(d for d in range(3, 18) if f"{now:.{d}g}" != f"{was:.{d}g}")  # enough to tell them apart
            notes.append(f"fungpt: note: the lr schedule changed ({changed}){end}: at step {step} the lr is now "
                         f"{now:.{digits}g}, not {was:.{digits}g}")
    elif new.max_minutes is None:  # a budget run resumed without its budget: the lr may go back up to its peak
        notes.append(f"fungpt: note: the lr schedule changed ({changed}): it now follows the steps, not the budget's "
                     f"clock: at step {step} the lr is {get_lr(step, new):.4g} (the decay ends at step "
                     f"{new.decay_iters:,}), whatever the budget had brought it to")
    elif changed:  # (a budget's schedule follows the clock: where it stands at the resume is not known here)
        follows = "now follows the budget's clock, not the steps" if saved.max_minutes is None else "follows the clock"
        notes.append(f"fungpt: note: the lr schedule changed ({changed}): it {follows} (the share of the budget "
                     f"used; warmup_iters and lr_decay_iters count in shares of the run), so the lr may jump at "
                     f"step {step}")
    changed = [f"{n} {getattr(saved, n)} -> {getattr(new, n)}" for n in OPTIMIZER_SETTINGS
               if getattr(saved, n) != getattr(new, n) and (new.optimizer == "muon" or not n.startswith("muon_"))]
    if changed:
        notes.append(f"fungpt: note: the optimizer settings changed ({', '.join(changed)}): they apply from step "
                     f"{step} on, to the optimizer state saved with the old ones")
    if saved.seed != new.seed:
        notes.append(f"fungpt: note: train.seed changed ({saved.seed} -> {new.seed}): the eval batches differ from "
                     f"those before step {step}, so val losses before and after it do not compare exactly")
    # The rest, e.g. a batch size given on the command line at the start and forgotten at the resume (the run
    # length, max_iters or max_minutes, is what a resume usually changes, and the schedule note covers it)
    covered = {*schedule, *OPTIMIZER_SETTINGS, "seed", "max_minutes",
               # how it runs, not what it computes (numerics_notes reports another device, dtype or matmul library)
               "device", "dtype", "cpu_matmul", "log_interval", "plot", "tensorboard", "wandb", "wandb_project"}
    other = [f"{f.name} {getattr(saved, f.name)!r} -> {getattr(new, f.name)!r}" for f in dataclasses.fields(new)
             if f.name not in covered and getattr(saved, f.name) != getattr(new, f.name)]
    if other:
        notes.append(f"fungpt: note: [train] settings differ from the run's before step {step} ({', '.join(other)}): "
                     f"it goes on with these")
    return notes


# What run.json records of how the arithmetic ran: the same model and data give other float32 roundings with
# another matmul library or thread count (sums are added in another order), or another device, dtype or torch
NUMERICS = ("device", "dtype", "cpu_matmul", "threads", "torch")


def numerics_notes(saved: dict[str, Any], now: dict[str, Any], step: int) -> list[str]:
    """One line when a resume computes differently from the steps before it (run.json `saved` against `now`):
    its losses then leave an uninterrupted run's in the last digits, which exact resume otherwise promises."""
    def shown(value: Any) -> Any:
        return "none" if value is None else value  # (cpu_matmul on a GPU, or under autocast)

    keys = [k for k in NUMERICS if k in saved and saved[k] != now[k]]
    changed = [f"{k} {shown(saved[k])} -> {shown(now[k])}" for k in keys]
    # (another order of float32 additions moves the 7th digit; another device or dtype rounds otherwise: bfloat16
    # moved a tiny run's losses by up to 4e-4, in the 4th digit)
    how = "in the last digits" if not {"device", "dtype"} & set(keys) else "by its rounding (from about the 4th digit)"
    if changed:
        return [f"fungpt: note: the arithmetic changed since step {step} ({', '.join(changed)}): from here the losses "
                f"differ from an uninterrupted run's {how}"]
    unknown = [k for k in NUMERICS if k not in saved]  # (run.json of an older FunGPT: nothing to compare with)
    return [f"fungpt: note: run.json does not say which {', '.join(unknown)} the steps before {step} ran with (an "
            f"older FunGPT wrote it): if the arithmetic changed since, the losses from here differ from an "
            f"uninterrupted run's"] if unknown else []


def get_lr(it: float, tc: TrainConfig) -> float:
    """Learning rate at step `it` (a float: with a time budget, the larger of the budget's fraction used and
    step / max_iters, times decay_iters: budget.TimeBudget.schedule_position).

    warmup: linear from ~0 to lr over warmup_iters (large early updates from random weights are
    unstable, and AdamW's second-moment estimates need a few steps to become meaningful); then
      cosine:   lr → min_lr along half a cosine by decay_iters (GPT-3, nanoGPT; the GPT-2 paper names none)
      wsd:      flat at lr, then linear to min_lr over the last wsd_decay_frac of decay_iters (warmup
                included; warmup-stable-decay,
                Hu et al. 2024 "MiniCPM", whose decay is exponential: linear here); a run can be extended
                without re-warming
      constant: lr
    With cosine and wsd, the rate stays at min_lr after decay_iters.
    """
    if it < tc.warmup_iters:  # (it + 1): step 0 already moves the weights, at lr / (warmup_iters + 1)
        return tc.lr * (it + 1) / (tc.warmup_iters + 1)
    if tc.lr_schedule == "constant":
        return tc.lr
    total = tc.decay_iters
    if it >= total:
        return tc.min_lr
    if tc.lr_schedule == "cosine":
        frac = (it - tc.warmup_iters) / max(1, total - tc.warmup_iters)  # 0 → 1 over the decay (max: a guard)
        return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (tc.lr - tc.min_lr)
    decay_start = total * (1.0 - tc.wsd_decay_frac)  # wsd
    if it < decay_start:
        return tc.lr
    frac = (it - decay_start) / max(1e-9, total - decay_start)  # 0 → 1 over the decay (max: a guard)
    return tc.lr + frac * (tc.min_lr - tc.lr)


def schedule_notes(tc: TrainConfig, new_run: bool) -> list[str]:
    """Notes on an lr schedule that does not do what its settings suggest (a warmup that never ends, or runs into
    the decay; a decay over before the warmup is)."""
    notes, w = [], tc.warmup_iters
    # e.g. a preset shortened with --train.max-iters (max_iters = 0, no step at all, needs no note of the lr)
    if w >= tc.max_iters > 0 and not tc.max_minutes:
        notes.append(f"fungpt: note: train.warmup_iters = {w} is not below the run's {tc.max_iters} steps, so the "
                     f"learning rate never reaches train.lr = {tc.lr:g}; lower warmup_iters to reach it")
    elif w >= tc.decay_iters > 0 and tc.max_minutes:  # (under a budget, decay_iters steps stand for the whole run)
        decays = ", nor decays" if tc.lr_schedule != "constant" else ""
        notes.append(f"fungpt: note: train.warmup_iters = {w} is not below lr_decay_iters (or max_iters) = "
                     f"{tc.decay_iters}, the steps that stand for the whole time budget, so the learning rate never "
                     f"reaches train.lr = {tc.lr:g}{decays}; lower warmup_iters to reach it")
        return notes  # (the notes below, of a decay that ends in the warmup, do not hold under a budget)
    # WSD's decay window counts the warmup in (get_lr): a warmup that runs into it ends on a drop of the lr
    if (tc.lr_schedule == "wsd" and new_run and 0 < w < tc.decay_iters and (w < tc.max_iters or tc.max_minutes)
            and get_lr(w, tc) < 0.9 * get_lr(w - 1, tc)):
        start = (f"{1 - tc.wsd_decay_frac:.0%} into the budget" if tc.max_minutes else
                 f"at step {tc.decay_iters * (1 - tc.wsd_decay_frac):g}")
        notes.append(f"fungpt: note: train.warmup_iters = {w} runs into the WSD decay, which starts {start} (the "
                     f"last wsd_decay_frac = {tc.wsd_decay_frac:g} of the schedule, warmup included): after the "
                     f"warmup the lr drops from {get_lr(w - 1, tc):.3g} to {get_lr(w, tc):.3g}; lower warmup_iters "
                     f"or wsd_decay_frac for a stable phase at train.lr")
    if tc.lr_decay_iters is not None and tc.lr_decay_iters <= w and tc.lr_schedule != "constant":
        notes.append(f"fungpt: note: train.lr_decay_iters = {tc.lr_decay_iters} is not above train.warmup_iters = "
                     f"{w}, so the decay is over before the warmup ends: the lr drops to min_lr = {tc.min_lr:g} "
                     f"the step after it; raise lr_decay_iters for a decay")
    return notes


def measure_peak_flops(device: str, dtype: torch.dtype) -> float:
    """Measure this device's dense matmul throughput (FLOP/s): the ceiling that MFU is quoted against.

    On a CPU it is the faster of torch's BLAS and oneDNN (fungpt/linear.py; bfloat16: oneDNN, where it runs them),
    even when the run uses the slower one: MFU says how much of the machine's best matmul speed a run gets.
    """
    n = 1024 if device == "cpu" else 4096
    # Its own generator: drawing from the global one would move the stream that dropout uses, and a resumed
    # run (which measures this after restoring that stream) would no longer repeat the uninterrupted one
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    kernels = [lambda: a @ b]
    onednn = onednn_bf16_works() if dtype == torch.bfloat16 else dtype == torch.float32 and onednn_works()
    if device == "cpu" and onednn:
        kernels.append(lambda: onednn_linear(a, b, None))  # a @ b^T: the same 2n³ FLOPs
    # The best of three short timings, not one long one: a moment when another program had the cores would
    # lower the ceiling, and the run's MFU would read above 100%.
    reps = 2 if device == "cpu" else 20
    best = float("inf")
    for kernel in kernels:
        for _ in range(2):  # warm up
            kernel()
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                kernel()
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best  # a matmul of two n×n matrices costs 2n³ FLOPs


def _train_bar(tqdm):
    """The training bar's class: tqdm's, whose rate (and so its time left) is the steps since the command's first
    step over the time since, the periodic evals and checkpoints included once one has run (before the first, the
    time they will take, by the step-0 eval's and the checkpoint's timings, is added: `periodic_left`). tqdm's own
    rate is a moving average of the last steps, which left the evals out all run long (with an eval every 100
    steps it said 6 s left at step 20 of 400, and about as little after each eval, for 18.6 s taken); its average
    over the whole command counts the first step too, which also compiles (a 20 s first step of a compiled
    speedrun said ten times the time left)."""

    class TrainBar(tqdm):
        origin: tuple[float, float] | None = None  # (time, steps) when the command's first step ended
        # Seconds of the periodic evals and checkpoints due after step n (TimeBudget.periodic_time_left), counted in
        # the time left until the command's first periodic eval (then None: the rate holds their time). Left out,
        # configs/shakespeare-char.toml (400 forward batches every 250 steps: with a forward about a third of a step,
        # evals are a third of the run) was said to end a third too soon until its first periodic eval.
        periodic_left: Callable[[int], float] | None = None

        @property
        def format_dict(self):
            d = super().format_dict
            if self.origin is not None:
                # (0 until a second step is done: shown as "?", not the first step's rate, which a log file kept)
                t0, n0 = self.origin
                d["rate"] = (d["n"] - n0) / max(time.time() - t0, 1e-9) if d["n"] > n0 else 0
            left = (d["total"] or 0) - d["n"]  # steps to go
            if self.periodic_left is not None and d["rate"] and left > 0:  # the rate that ends when they all will
                # (n - 1: the bar shows step n before its own eval and checkpoint run, which count too)
                d["rate"] = left / (left / d["rate"] + self.periodic_left(d["n"] - 1))
            return d

    return TrainBar


# ----------------------------------------------------------------------------------------------
# The training loop


def _same_data(data_dir: Path, meta: dict[str, Any]) -> bool:
    """Whether `data_dir` still holds the data whose meta.json the run read when it started: a folder prepared again
    from other text or with other settings has another (the text's sha256, token counts). Prepared again alike, it
    holds the same tokens (see data.same_dataset)."""
    try:
        return same_dataset(load_meta(data_dir), meta)
    except FunGPTError:  # (gone, for a moment or for good)
        return False


def dropout_seed(seed: int, rank: int) -> int:
    """The seed of a rank's torch random stream (dropout). Rank 0's is the single process's; the others' are mixed
    from (seed, rank), as BatchLoader mixes its streams', so that seed s on rank 1 is not seed s + 1 on rank 0 (a
    sweep over seeds under DDP reused dropout masks)."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


@dataclass
class Resumed:
    """Where a run goes on from: what its checkpoint saved (a new run: these defaults)."""

    step: int = 0
    best_val: float = float("inf")
    elapsed_s: float = 0.0  # the run's wall seconds before this command
    after_step_s: float = 0.0  # of them, those after the checkpoint's step: its save, the plot (not schedule time)
    evaluated: bool = False  # an eval set best_val (at step 0: the step-0 eval, in metrics.jsonl already)
    # a signal left the eval of the checkpoint's step: the resume does it first (None: a checkpoint from before this
    # was saved, whose metrics.jsonl tells)
    eval_left: bool | None = False
    # The lr schedule's origins on the run's clock (budget.TimeBudget.start_schedule): the seconds that are not
    # schedule time (setup before step 1, each resume's start-up, compiles; None: saved at step 0), and the origin
    # the lr follows (budget.continuous_origin; None: checkpoints from before it was saved)
    schedule_origin: float | None = None
    lr_origin: float | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # so a budget knows what to reserve at once
    tokens: int | None = None  # tokens trained on (the batch size may have changed since; None: not saved)
    tokens_per_step: int | None = None  # with every process (None: checkpoints from before it was saved)
    processes: int = 1  # the processes that trained it
    # The batch streams and random states of processes that a resume with fewer processes left out: saved on with
    # every checkpoint, so that a later resume with more processes takes them up where they stopped (a fresh stream
    # seeded from the rank would replay the batches that rank trained on before)
    parked_loaders: list = dataclasses.field(default_factory=list)
    parked_rngs: list = dataclasses.field(default_factory=list)
    streams: int = 1  # batch streams saved (processes, plus those parked)


def load_training_state(folder: Path, manifest: dict[str, Any], optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, loader: BatchLoader, ddp: Dist, device: str) -> Resumed:
    """Restore a checkpoint's optimizer, loss scaler, this rank's batch stream and random state into the run's own
    objects, and return the rest of what it saved. One clear error for a state that does not fit."""
    state = ckpt.load_state(folder)
    try:
        load_optimizer_state(optimizer, state["optimizer"])
        if state.get("scaler"):  # (float16 runs only)
            scaler.load_state_dict(state["scaler"])
        loaders = state["loader"]
        processes = state.get("processes", len(loaders))  # (checkpoints from before it was saved: one each)
        if not (isinstance(processes, int) and 1 <= processes <= len(loaders) == len(state["rng"])):
            raise TypeError(f"processes is {processes!r:.60} for {len(loaders)} batch streams")
        if ddp.rank < len(loaders):
            loader.load_state_dict(loaders[ddp.rank])
        # else: resumed with more processes than saved; this rank keeps the fresh batch stream seeded from
        # its own rank (a copy of rank 0's would train two replicas on the same batches)
        step, best_val = int(state["step"]), float(state["best_val"])
        schedule_origin, lr_origin = (None if state.get(k) is None else float(state[k])
                                      for k in ("schedule_origin_s", "lr_origin_s"))
        if schedule_origin is None and step > 0:  # (checkpoints from before it was saved: their origin was 0)
            schedule_origin = 0.0
        timings = state.get("timings") or {}
        tokens = state.get("tokens")
        if not (isinstance(timings, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in timings.values())):
            raise TypeError(f"timings is {timings!r:.60}, not seconds")
        if not (tokens is None or (isinstance(tokens, int) and tokens >= 0)):
            raise TypeError(f"tokens is {tokens!r:.60}, not a count")
        if ddp.rank < len(state["rng"]):  # a new rank keeps its own dropout stream (dropout_seed)
            rng = state["rng"][ddp.rank]
            torch.set_rng_state(rng["cpu"])
            if device == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"])
            if device == "mps" and "mps" in rng:  # (checkpoints from before it was saved: the seeded stream)
                torch.mps.set_rng_state(rng["mps"])
        per_step = state.get("tokens_per_step")
        eval_left = state.get("eval_left")  # (checkpoints from before it was saved: None)
        if not isinstance(eval_left, bool | None):
            raise TypeError(f"eval_left is {eval_left!r:.60}, not true or false")
        after = float(state.get("after_step_s", 0.0))  # (checkpoints from before it was saved: 0)
        was = Resumed(step=step, best_val=best_val, elapsed_s=float(state["elapsed_s"]), after_step_s=after,
                      evaluated=math.isfinite(best_val), eval_left=eval_left, schedule_origin=schedule_origin,
                      lr_origin=lr_origin,
                      timings=timings, tokens=tokens, tokens_per_step=per_step if isinstance(per_step, int) else None,
                      processes=processes, parked_loaders=loaders[ddp.world_size:],
                      parked_rngs=state["rng"][ddp.world_size:], streams=len(loaders))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, OverflowError,  # (int(inf))
            AttributeError) as e:  # (a field of another type: 'str' object has no attribute 'items')
        raise FunGPTError(f"the training state in {folder / ckpt.STATE_FILE} does not fit this run "
                          f"({type(e).__name__}: {str(e)[:120]}); resume with the original settings") from None
    if was.step != int(manifest["step"]):
        raise FunGPTError(f"{folder / ckpt.STATE_FILE} is at step {was.step} but {folder / ckpt.MANIFEST_FILE} "
                          f"says step {manifest['step']}: the checkpoint is inconsistent")
    return was


def processes_note(was: Resumed, cfg: RunConfig, saved_block_size: int, saved_train: TrainConfig,
                   processes: int) -> str:
    """What changes when a run resumes with another number of processes than wrote its checkpoint.

    Every process trains on its own batch: the tokens per step change with their number. The checkpoint's own
    count is the one to compare with (config.json may be from a start that failed before saving); checkpoints from
    before it was saved fall back to config.json's settings."""
    tc = cfg.train
    now = tc.batch_size * cfg.model.block_size * tc.grad_accum_steps * processes
    before = was.tokens_per_step
    if before is None:
        before = saved_train.batch_size * saved_block_size * saved_train.grad_accum_steps * was.processes
    tokens = f"tokens per step {before:,} -> {now:,}" if before != now else f"the same {now:,} tokens per step"
    return (f"fungpt: resuming with {processes} process(es) where the checkpoint was written by "
            f"{was.processes}: {tokens}, and the batches differ from an uninterrupted run's"
            + (f"; {_ranks(was.streams, processes - 1, 'start')} fresh batch streams"
               if processes > was.streams else "")
            + (f"; {_ranks(was.processes, min(was.streams, processes) - 1, 'take')} up the batch streams "
               f"that earlier processes of those ranks left" if processes > was.processes < was.streams else ""))


def _ranks(first: int, last: int, verb: str) -> str:
    """'process 1 starts' or 'processes 1..3 start': the ranks first..last of a job, and what they do."""
    return f"process {first} {verb}s" if first == last else f"processes {first}..{last} {verb}"


def forward_backward(fwd_model: torch.nn.Module, loader: BatchLoader, cfg: RunConfig, prec: Precision, ddp: Dist,
                     scaler: torch.amp.GradScaler, autocast, device: str,
                     micro_done: Callable[[], None] | None = None) -> torch.Tensor:
    """One optimizer step's gradients, by gradient accumulation: A = grad_accum_steps micro-batches, each loss
    divided by A, so the summed gradients equal those of one batch A times larger. Returns the step's loss (the mean
    of the A micro-batch losses, still on the device: reading it waits for the device). `micro_done` is called after
    each micro-batch (a progress bar within a long step)."""
    tc = cfg.train
    loss_sum = torch.zeros((), device=device)
    for micro in range(tc.grad_accum_steps):
        x, y = loader.next_batch()  # x (B, T) token ids; y (B, T) the next token at each position (x shifted by one)
        last_micro = micro == tc.grad_accum_steps - 1
        # DDP all-reduces gradients in backward; skip that on all but the last micro-step.
        sync = contextlib.nullcontext() if (last_micro or not ddp.enabled) else fwd_model.no_sync()
        with sync:
            try:
                with autocast():
                    # ([1]: the loss; the logits are dropped, though its backward keeps cross_entropy's
                    # log-softmax, also B x T x V floats)
                    # (another loss here should go into plan._timed_steps too, which times the dry run's steps)
                    loss = fwd_model(x, y)[1] / tc.grad_accum_steps
                scaler.scale(loss).backward()
            except torch.cuda.OutOfMemoryError:
                from fungpt.plan import out_of_memory_advice

                raise FunGPTError(out_of_memory_advice(cfg, prec)) from None
            except Exception as e:
                if tc.compile and (failure := compile_failure(e)):  # (at the first step, which compiles)
                    raise FunGPTError(failure) from None
                raise
        loss_sum += loss.detach()
        if micro_done is not None:
            micro_done()
    return loss_sum


def is_diverged(loss: float, grad_norm: torch.Tensor, loss_scaling: bool, agree) -> tuple[bool, bool]:
    """(whether the step diverged, whether only another process's loss did so).

    Divergence: a non-finite loss, or gradient. With float16 loss scaling an overflowed gradient is the scaler's
    to handle (it skips the step and lowers the scale), but a non-finite loss is not: the forward pass itself
    overflowed, and left alone every later step was skipped, the run "finishing" with a loss of nan.

    Under DDP each rank's loss is its own: one rank's can be inf while the averaged gradients are finite. That
    rank alone skipped the step (skip_nonfinite) and its replica silently drifted from the others'. The ranks
    must take the same path: `agree` takes each flag's maximum over the ranks (one all-reduce; as given without
    DDP).
    """
    diverged = not math.isfinite(loss) or (not math.isfinite(grad_norm.item()) and not loss_scaling)
    flags = agree([float(diverged), float(not math.isfinite(loss))])
    return bool(flags[0]), bool(flags[1]) and math.isfinite(loss)


def divergence_error(step: int, loss: float, loss_elsewhere: bool, out_dir: Path, tc: TrainConfig) -> FunGPTError:
    """What stops a run whose step `step` diverged (train.skip_nonfinite = false)."""
    kept = ckpt.find_checkpoint(out_dir)
    where = (f"the last checkpoint ({kept.name}) is untouched" if kept else
             "no checkpoint to resume from was written")  # (a `best` one may exist: weights only)
    said = f"loss {loss}" + (" here, NaN/inf in another process" if loss_elsewhere else "")
    return FunGPTError(f"training diverged at step {step}: the loss or gradient is NaN/inf ({said}); {where}. "
                       f"{lower_lr(tc)}, or set train.skip_nonfinite = true to skip such steps")


def lower_lr(tc: TrainConfig) -> str:
    """The advice for a run that diverged: the learning rates it trains with, and an unusual weight decay (1 or
    more) so strong that each step takes lr x weight_decay (a tenth or more) off every weight."""
    lrs = "train.muon_lr (the matrices' lr) or train.lr" if tc.optimizer == "muon" else "train.lr"
    shrink = max(tc.lr, tc.muon_lr if tc.optimizer == "muon" else 0.0) * tc.weight_decay
    # (named where the decay itself is unusual, 1 or more: with the usual 0.1 a huge lr is the cause alone)
    decay = (f", or train.weight_decay = {tc.weight_decay:g} (lr x weight_decay = {shrink:.3g}: a step takes that "
             f"share off every weight)") if shrink >= 0.1 and tc.weight_decay >= 1 else ""
    return f"Lower {lrs}{decay}"


def write_run_files(cfg: RunConfig, out_dir: Path, data_dir: Path, run_info: dict[str, Any],
                    resumed_at: int | None) -> list[str]:
    """Write the run folder's description: config.json (the resolved config), run.json (where and how it runs:
    `run_info`) and, for a new run, the tokenizer. Returns the notes on a resumed run (`resumed_at`: its step) whose
    numerics changed since (numerics_notes)."""
    ckpt.atomic_write_text(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    notes = []
    if resumed_at is not None:
        try:
            saved_info = read_json(out_dir / "run.json")
        except (OSError, ValueError):  # missing or damaged: nothing to compare with, and nothing to say of it
            saved_info = None
        if isinstance(saved_info, dict):
            notes = numerics_notes(saved_info, run_info, resumed_at)
    ckpt.atomic_write_text(out_dir / "run.json", json.dumps(run_info, indent=2))
    if resumed_at is None:  # a resumed run's tokenizer files are already there, checked to match the data's
        load_tokenizer(data_dir).save(out_dir)
    return notes


def already_done(step: int, tc: TrainConfig, elapsed_before: float, timings: dict[str, float],
                 periodic: bool = True) -> str | None:
    """Why a resumed run has nothing left to train (its max_iters reached, or its time budget used), or None.
    `periodic`: count the eval and checkpoint due after the next step by `timings` (not where the resume changes its
    evals: their time is then estimated again, and the checkpoint's would count a longer eval twice)."""
    if step >= tc.max_iters:
        return (f"already reached step {step} (train.max_iters = {tc.max_iters}): nothing to train; raise "
                f"train.max_iters to continue it")
    # (the periodic eval and checkpoint due after the next step count, as the training loop counts them: out_of_time)
    due = periodic_due(tc, step, timings.get("eval", 0.0), timings.get("save", 0.0)) if periodic else 0.0
    if tc.max_minutes and budget_spent(elapsed_before + due, timings, tc.max_minutes * 60):
        return (f"already used its time budget ({elapsed_before / 60:.2f} min used, this start-up included, of "
                f"train.max_minutes = {tc.max_minutes:g}, leaving too little for a step, an eval and a checkpoint): "
                f"nothing to train; raise "
                f"train.max_minutes to continue it")
    return None


MANY_PASSES = 50
"""Passes over the train split past which a new run is told it will memorise its text: nanoGPT's GPU recipe for
Tiny Shakespeare (82 passes) had its best val loss at about 29, then rose (configs/shakespeare-char.toml)."""


def passes_note(tc: TrainConfig, tokens_per_step: int, train_tokens: int) -> str | None:
    """A note for a run whose max_iters go over its train split more than MANY_PASSES times (a small corpus with a
    preset's steps), None otherwise or under a time budget (which decides the steps)."""
    passes = tc.max_iters * tokens_per_step / max(train_tokens, 1)
    if tc.max_minutes is not None or passes <= MANY_PASSES:
        return None
    return (f"fungpt: note: {tc.max_iters:,} steps of {tokens_per_step:,} tokens go over the {train_tokens:,} train "
            f"tokens about {passes:,.0f} times: the model will likely learn them by heart, and its val loss rise again "
            f"after its best (checkpoints/best keeps that step); fewer steps (train.max_iters) or more text avoid it")


def nothing_to_train(out_dir: Path, step: int, plot: bool, start_time: float) -> dict[str, Any]:
    """End a command that found nothing to train: draw loss.png if the run has none (a run stopped while drawing
    it), and return train()'s summary, without losses."""
    if plot and step > 0 and not (out_dir / "loss.png").is_file():  # (at step 0 there is no curve to draw)
        _plot_quietly(out_dir)
    return summary(out_dir, step, start_time)


def summary(out_dir: Path, step: int, start_time: float, train_loss: float = math.nan, val_loss: float = math.nan,
            interrupted: bool = False, stop_signal: int | None = None, trained: bool = False) -> dict[str, Any]:
    """What train() returns (see its docstring)."""
    return {"out_dir": str(out_dir), "step": step, "train_loss": train_loss, "val_loss": val_loss,
            "interrupted": interrupted, "signal": stop_signal, "elapsed_s": time.time() - start_time,
            "trained": trained}


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, progress: bool = True,
          start_time: float | None = None, model_named: Collection[str] = (),
          data_named: Collection[str] = ()) -> dict[str, Any]:
    """Train the model described by `cfg`; return a summary: out_dir, step (the last), train_loss and val_loss at
    that step, interrupted (and the signal), elapsed_s, trained (whether this call trained a step). Interrupted at
    a step with no eval, train_loss is that step's batch loss and val_loss NaN.

    `model_named` lists the [model] fields the user wrote down even where they equal the defaults (the
    CLI passes them): when fine-tuning, the fields not set take the checkpoint's values. `data_named`: the same for
    [data] (a fine-tune notes a tokenizer asked for that it does not use, the default "char" included).

    One run at a time in a process: a run seeds and draws from torch's global random streams (weights, dropout,
    batches), so two runs in two threads drew from each other's, and neither could be repeated."""
    cfg = checked_again(cfg)
    if not _ONE_RUN.acquire(blocking=False):
        raise FunGPTError("another train() is running in this process: a run draws from torch's global random "
                          "streams, which two runs at once would share; train one at a time, or in separate "
                          "processes")
    try:
        with contextlib.ExitStack() as held:  # what the run holds (its out_dir's lock) is let go however it ends
            # a run computes as in a fresh process, whatever the caller's settings (they come back after): gradients
            # on (inside a notebook's torch.no_grad() or inference_mode, backward failed) and float32 by default
            held.enter_context(torch.inference_mode(False))
            held.enter_context(torch.enable_grad())
            held.enter_context(float32_default())
            return _train(cfg, resume, overwrite, progress, start_time, model_named, held, data_named)
    finally:
        _ONE_RUN.release()


_ONE_RUN = threading.Lock()  # held by the train() running in this process


def checked_again(cfg: RunConfig) -> RunConfig:
    """cfg, its checks run again: a setting changed after the config was built (`cfg.train.lr = -1` in a notebook,
    a section replaced by a dict) skipped the checks of the dataclasses' __post_init__."""
    if not isinstance(cfg, RunConfig):
        raise FunGPTError(f"train() takes a RunConfig, not {type(cfg).__name__}: e.g. train(load_config("
                          f"'shakespeare-char-cpu')), or train(RunConfig(out_dir=..., model=GPTConfig(...)))")
    cfg.__post_init__()  # (first: each section as its dataclass)
    for section in (cfg.data, cfg.model, cfg.train):
        section.__post_init__()  # (a subclass's own checks included)
    cfg.train.check_limits()  # (what a run about to train must keep: a saved one may load without)
    return cfg


def _train(cfg: RunConfig, resume: bool, overwrite: bool, progress: bool, start_time: float | None,
           model_named: Collection[str], held: contextlib.ExitStack,
           data_named: Collection[str] = ()) -> dict[str, Any]:
    from_python = start_time is None  # (the fungpt command passes its start: its messages name its flags)
    start_time = time.time() if start_time is None else start_time
    tc = cfg.train
    prec: Precision = detect_precision(tc.device, tc.dtype, tc.optimizer)
    if tc.compile:
        check_compile(prec.device)  # a clear refusal where torch.compile cannot work, before anything is written
    cpu_matmul = None
    if prec.device == "cpu":
        keep_freed_memory()  # reuse activation memory between steps (see hardware.keep_freed_memory)
        # oneDNN or torch's BLAS for the Linear layers (linear.py), for this run: the process's choice comes back after
        cpu_matmul = held.enter_context(using_cpu_matmul(tc.cpu_matmul))
        # Under autocast the products are torch's own (Linear.forward): none to choose. (A compiled run's steps are
        # inductor's, but its evals run the plain model: there the library still counts.)
        if prec.autocast:
            cpu_matmul = None
        elif prec.cpu_bf16_products and cpu_matmul == "onednn" and not onednn_bf16_works():
            cpu_matmul = "torch"  # oneDNN runs no bfloat16 products on this CPU: torch's kernels do (Linear.forward)
    ddp = setup_distributed(prec.device)
    device = f"cuda:{ddp.local_rank}" if prec.device == "cuda" else prec.device
    if prec.device == "cuda":
        torch.cuda.set_device(device)
        held.enter_context(tf32_products())  # (a program that calls train() gets its own settings back)
    say = print if ddp.is_main else (lambda *a, **k: None)
    if prec.device == "cpu" and prec.autocast and tc.cpu_matmul != "auto":
        say(f"fungpt: note: train.cpu_matmul = {tc.cpu_matmul!r} is not used under {prec.dtype} autocast: its "
            f"products are torch's own (fungpt/linear.py)")
    # The run seeds torch's global random streams (weights, dropout, batches); a program that calls train()
    # gets its CPU stream back as it was, and on a CUDA run that GPU's (forking every GPU's would start CUDA
    # on GPUs the run does not use).
    held.enter_context(torch.random.fork_rng(devices=[ddp.local_rank] if prec.device == "cuda" else []))
    refused = None
    try:
        check_out_dir(cfg, resume, overwrite, check_lock=ddp.is_main)  # before preparing data (can take minutes)
        if not resume:
            cfg.model.check_new()
    except FunGPTError as e:
        refused = e
    if ddp.enabled:  # the processes agree first: one that stopped alone (rank 0 at a locked out_dir) left the others
        # waiting in the next collective call, where torchrun's SIGTERM cannot reach them (killed 30 s later)
        first = next((said for said in _gather(refused and str(refused), ddp) if said), None)
        # (each process says the first rank's, as for errors they all hit: rank 0 alone asks the lock, and another
        # rank's own "already holds a run" gave advice the lock then refused)
        refused = first and FunGPTError(first)
    if refused:
        raise refused
    check_loggers(tc)  # likewise, and before the run folder is written (a retry would need --overwrite)
    saved_cfg, folder, manifest, saved_train = resume_point(cfg) if resume else (None, None, None, None)

    # (a fine-tune's weights are read first, before the data and before the run folder is touched: a damaged or
    # refused weights file must not cost a long encode, leave an empty run behind, nor, with --overwrite, have
    # deleted the run that was there)
    t_data = time.time()
    cfg, data_dir, pre = resolve_model_and_data(cfg, ddp.is_main, progress and ddp.is_main, model_named,
                                                resume_dir=Path(cfg.out_dir) if resume else None,
                                                read_weights=folder is None, data_named=data_named)
    data_s = time.time() - t_data  # (preparing the data: once; a resume finds it ready)
    # The text the data was prepared from and how it was split (no sha256: token ids prepared elsewhere): a resume
    # onto edited text, or a folder prepared again with another split, says so
    data_fingerprint = fingerprint_of(load_meta(data_dir))
    out_dir = Path(cfg.out_dir)
    replaced = False  # whether --overwrite deleted a run that was in out_dir (a Ctrl-C before step 1 says so)
    if ddp.is_main:  # rank 0 alone writes the folder, so it alone locks it
        locked = held.enter_context(lock_out_dir(out_dir))
        replaced = overwrite and holds_run(out_dir)
        prepare_out_dir(cfg, resume, overwrite, locked)
    # The flags that continue this run after an interruption: the same command's, with --resume (called from Python,
    # a script of the user's: the call's own argument)
    resume_flags = (" (from Python: train(config, resume=True))" if from_python else
                    " with --resume in place of --overwrite" if overwrite else "" if resume else " plus --resume")
    # From here until the training loop takes over the signals, a Ctrl-C (building the model, loading the checkpoint,
    # the step-0 eval, planning a time budget) says what it left: nothing trained, and the command that goes on
    doing: str | None = "while the run was being set up"  # (None once the loop's handlers answer Ctrl-C)

    def left_by_ctrl_c() -> str | None:
        if doing is None:
            return None
        if folder is not None:
            return (f"{doing}, before training went on: its checkpoints are as they were; resume it with the same "
                    f"command")
        gone = f" (--overwrite had already deleted the run that was in {out_dir})" if replaced else ""
        try:  # (until config.json is written the folder holds no run, and --resume would be refused: the plain command)
            flags = resume_flags if holds_run(out_dir) else ""
        except OSError:
            flags = resume_flags
        return f"{doing}, before the first step: nothing was trained{gone}; start it with the same command{flags}"

    held.enter_context(said_on_ctrl_c(left_by_ctrl_c))
    say(f"fungpt: {prec.reason}" + (f", matmuls on {cpu_matmul}" if cpu_matmul else "")
        + (f", {ddp.world_size} processes (DDP)" if ddp.enabled else ""))
    for note in schedule_notes(tc, new_run=folder is None):
        say(note)

    # Model and optimizer. Every rank builds the same initial weights from the same seed.
    torch.manual_seed(tc.seed)
    # The memory check (CPU, Apple GPU; on CUDA an out-of-memory error is caught and explained by forward_backward)
    # needs the parameter count. It is taken from the built model, unless the weights alone might not fit: then building
    # the model could be what gets the process killed, so it is counted on the meta device first (~1 s)
    check_memory = ddp.is_main and prec.device != "cuda"
    if folder is not None:  # (resuming: a config far larger than the saved weights is refused before it is built)
        ckpt.check_weights_before_building(folder, cfg.model, Path(cfg.out_dir) / "config.json")
    if check_memory and weights_might_not_fit(cfg, prec.device):
        warn_if_memory_short(cfg, prec)
        check_memory = False
    model = GPT(cfg.model).to(device)
    # This command's start-up until its model was built, but the data's preparation (a resume finds it ready); a
    # resume's, until its checkpoint is loaded: about the start-up a resume spends before it checks whether its budget
    # has time left (see the interrupted run's last word)
    startup_s = time.time() - start_time - data_s
    if check_memory:
        warn_if_memory_short(cfg, prec, model.num_params())
    optimizer = configure_optimizer(model, tc, prec.device)
    scaler = torch.amp.GradScaler(prec.device, enabled=prec.needs_grad_scaler)  # (Muon: refused by choose_precision)
    loader = BatchLoader(data_dir, "train", tc.batch_size, cfg.model.block_size, device=device,
                         seed=tc.seed, rank=ddp.rank, world_size=ddp.world_size)
    torch.manual_seed(dropout_seed(tc.seed, ddp.rank))  # dropout masks differ per rank

    if resume and ckpt.find_checkpoint(cfg.out_dir) != folder:  # a run saved meanwhile, before the lock was taken
        folder = ckpt.find_checkpoint(cfg.out_dir)
        manifest = ckpt.verify_checkpoint(folder) if folder is not None else None
        saved_train = trained_with(manifest, saved_cfg)
    resumed = Resumed()  # (a new run starts from its defaults)
    if folder is not None:
        ckpt.check_model_config(manifest, folder, cfg.model.to_dict(), Path(cfg.out_dir) / "config.json")
        check_resume_tokenizer(data_dir, out_dir, manifest.get("tokenizer_sha256"))
        if note := dropout_note(manifest, cfg.model.dropout):
            say(note)
        ckpt.load_weights(folder, model)
        resumed = load_training_state(folder, manifest, optimizer, scaler, loader, ddp, prec.device)
        if resumed.eval_left is None:  # (an older checkpoint: a step of a periodic eval that metrics.jsonl lacks)
            every = (saved_train or tc).eval_interval
            left = 0 < resumed.step and resumed.step % every == 0 and eval_left_in_log(out_dir, resumed.step) \
                if ddp.is_main else None
            resumed.eval_left = bool(_gather(left, ddp)[0])  # (rank 0 reads the file: every rank does the eval)
        if resumed.processes != ddp.world_size:
            say(processes_note(resumed, cfg, saved_cfg.model.block_size, saved_train, ddp.world_size))
    step, best_val, elapsed_before, timings = resumed.step, resumed.best_val, resumed.elapsed_s, resumed.timings
    if folder is not None:
        # With a budget, this command's start-up so far counts (the slowest rank's: every rank decides alike); left
        # out, a resume with a little time left started, overran the budget, then found no time for a step
        started_s = max(_gather(time.time() - start_time, ddp)) if tc.max_minutes else 0.0
        startup_s = time.time() - start_time - data_s  # (with the checkpoint's load: see above)
        done = already_done(step, tc, elapsed_before + started_s, timings, periodic=not evals_changed(saved_train, tc))
        if done:  # (before the notes on the steps to come, and before any file is written: nothing changes)
            unscored = ddp.is_main and eval_left_in_log(out_dir, step)  # (stopped by a signal before its final eval)
            say(f"fungpt: {out_dir} {done}" + (f"; its final eval was not done: `fungpt eval --run "
                                               f"{shell_quote(str(out_dir))}` scores it" if unscored else ""))
            doing = None  # (a finished run: nothing for a Ctrl-C to say of it)
            return nothing_to_train(out_dir, step, ddp.is_main and tc.plot, start_time)
        for note in resume_notes(saved_train, tc, step):
            say(note)
        was = manifest.get("data_fingerprint")  # (checkpoints from before it was recorded: None)
        if was is not None and data_fingerprint is not None and was != data_fingerprint:
            say(f"fungpt: note: the data changed since step {step} (its text's sha256, or how it is split, "
                f"differs from what the checkpoint recorded): the val split may now hold text the run trained "
                f"on, and val losses before and after this step do not compare")
        say(f"fungpt: resuming {out_dir} from step {step}")
        # A `best` saved after this checkpoint (a kill -9 between checkpoints) holds weights of steps that are
        # trained again, maybe otherwise (other settings). Kept, it stayed the run's best, from weights in no step
        # of its history. The next eval replaces it, whatever its (finite) loss (the earlier best it replaced is gone);
        # until then it stays, in case this resume fails.
        best_step = ckpt.saved_step(out_dir, "best") if ddp.is_main else None  # (rank 0 saves `best`)
        if best_step is not None and best_step > step:
            best_val = float("inf")
            say(f"fungpt: note: the best checkpoint was saved at step {best_step}, after this one: the next eval "
                f"replaces it, as those steps are trained again")
    elif resume:
        # a best checkpoint of trained weights without a latest one (killed, or a full disk, between the two)
        best_step = (ckpt.saved_step(out_dir, "best") or 0) if ddp.is_main else 0
        say(f"fungpt: {out_dir} has no latest checkpoint, only its best (step {best_step}, weights without the "
            f"optimizer's state): starting from step 0, and the next eval replaces that best checkpoint (copy its "
            f"folder to keep it)" if best_step > 0 else
            f"fungpt: {out_dir} has no checkpoint yet (stopped before its first save): starting from step 0")
    if pre is not None and folder is None:
        pretrained.load_weights(model, pre.model if pre.model is not None else pre.path)
        say(f"fungpt: starting from the pretrained weights of {pre.name} ({model.num_params():,} parameters)")
    elif folder is None:  # (a new run from scratch: its size, as a fine-tune's line above says its own)
        mc = cfg.model
        say(f"fungpt: a new model of {model.num_params():,} parameters ({mc.n_layer} layer{'s' * (mc.n_layer != 1)}, "
            f"{mc.n_head} head{'s' * (mc.n_head != 1)}, n_embd {mc.n_embd}, block_size {mc.block_size}, vocab "
            f"{mc.vocab_size:,})")
    if pre is not None:
        pre.model = None  # (also when a checkpoint saved meanwhile was found instead: not kept through training)

    if ddp.is_main:
        run_info = {"data_dir": str(data_dir.resolve()), "device": prec.device, "dtype": prec.dtype,
                    "precision_reason": prec.reason, "cpu_matmul": cpu_matmul, "world_size": ddp.world_size,
                    "threads": torch.get_num_threads(), "torch": torch.__version__}
        for note in write_run_files(cfg, out_dir, data_dir, run_info, resumed_at=step if folder is not None else None):
            say(note)
    # Each checkpoint records what it belongs to, so loading can refuse a mismatched config or tokenizer.
    ckpt_extra = {"model": cfg.model.to_dict(), "train": dataclasses.asdict(tc),
                  "tokenizer_sha256": ckpt.tokenizer_fingerprint(out_dir) if ddp.is_main else None,
                  "data_fingerprint": data_fingerprint}

    # Compile and wrap *after* loading; saving always uses `model`, the plain module.
    if tc.compile:
        say("fungpt: compiling the model: the first steps take a while (tens of seconds on a CPU)")
    fwd_model: torch.nn.Module = torch.compile(model) if tc.compile else model
    if ddp.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd_model = DDP(fwd_model, device_ids=[ddp.local_rank] if prec.device == "cuda" else None)

    def autocast():  # the forward passes' precision: torch's autocast, bfloat16 products on a CPU, or float32
        return prec.context()

    tokens_per_step = tc.batch_size * cfg.model.block_size * tc.grad_accum_steps * ddp.world_size
    tokens_seen = resumed.tokens if resumed.tokens is not None else step * tokens_per_step
    if folder is None and (note := passes_note(tc, tokens_per_step, load_meta(data_dir)["train_tokens"])):
        say(note)
    # MFU's ceiling: every process's device (the tokens per step above count all the processes' tokens)
    # (on a CPU: float32's, unless the run's products are in bfloat16)
    peak_flops = ddp.world_size * measure_peak_flops(device, prec.torch_dtype if prec.device != "cpu"
                                                     or prec.cpu_bf16_products else torch.float32)
    # Once per run, not per step: each walks the module tree (~55 us for the 4 x 128 model)
    params = list(model.parameters())  # for gradient clipping
    flops_per_step = model.flops_per_token() * tokens_per_step  # for the logged MFU
    log = MetricsLog(out_dir, cfg, keep_until_step=step if folder is not None else None,
                     redo_eval=resumed.eval_left,
                     logged_every=saved_train.log_interval if saved_train is not None else None) if ddp.is_main \
        else None
    if log is not None:  # closed also when the run fails (TensorBoard's writer thread outlived each failed train())
        held.push(lambda kind, error, tb: log.close(failed=kind is not None))  # (returns None: the error goes on)
    # The run's clock: elapsed time, the measured durations, and with a time budget when to stop and where the lr
    # schedule stands (budget.py). The budget covers the whole command (setup included) plus the time spent before
    # a resume.
    clock = TimeBudget(tc, start_time - elapsed_before, timings, resumed.schedule_origin, resumed.lr_origin)

    def do_eval(interrupt: StopFlag | None = None) -> dict[str, float] | None:
        """Evaluate (see `evaluate`), log the losses, and save "best" when val improved. Under `interrupt`'s handlers,
        Ctrl-C or SIGTERM abandons the eval: None, nothing logged (the caller saves the step, as for a signal during a
        step: a long eval, the speedrun's over the whole val split, is not waited for)."""
        nonlocal best_val
        # evaluate opens the data files anew (the training loader keeps its own open): if the folder was prepared
        # again meanwhile, save and stop rather than score other data. All ranks agree first: do_save is collective
        nonlocal eval_left_at
        if agree([float(not _same_data(data_dir, loader.meta))])[0]:
            eval_left_at = step  # (not done: a resume onto the data now there does it first)
            if saved_at != step:
                do_save()  # (the weights trained on the text the run began with: the steps since the last save kept)
            raise FunGPTError(f"the data folder {data_dir} was prepared again while this run trained on it (`fungpt "
                              f"prepare --overwrite`?): stopped before evaluating on other data than it trained on, "
                              f"with a checkpoint at step {step}. To go on with the data there now, resume with "
                              f"--resume")
        try:
            losses = evaluate(model, data_dir, cfg, device, autocast, progress=progress and ddp.is_main,
                              stop=None if interrupt is None else (lambda: interrupt.stop))
        except EvalStopped:
            return None
        if ddp.is_main:
            log.write({"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                       "elapsed_s": round(time.time() - start_time, 3), "run_s": round(clock.elapsed(), 3),
                       "tokens": tokens_seen})
            if losses["val"] < best_val:
                best_val = losses["val"]
                ckpt.save_checkpoint(out_dir, "best", step, model, extra={"val_loss": best_val, **ckpt_extra})
        return losses

    def do_save(periodic: bool = False) -> None:
        """Save the `latest` checkpoint (`periodic`: one of checkpoint_interval's, which the run makes anyway)."""
        t_save = time.time()
        # Every rank contributes its loader and RNG state (a collective call); rank 0 writes.
        loaders, rngs = _gather(loader.state_dict(), ddp), _gather(_rng_state(prec.device), ddp)
        # Never replace a good checkpoint with broken weights (e.g. a huge update that overflowed).
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise FunGPTError(f"training diverged by step {step}: the weights contain NaN/inf, so no checkpoint "
                              f"was written and the last good one is untouched. {lower_lr(tc)}")
        if ddp.is_main:
            # The run's time counts this save's own (its typical time) and the plot that ends the command (for the
            # command's last checkpoint, which a resume starts from: a periodic one may be that last one, at a budget's
            # end or a signal); left out, each resume of a time-budget run began that much short, and a chain of them
            # overran the budget. Of that time, what is not the lr schedule's (a resume's lr goes on from there, as the
            # run uninterrupted would): the plot, a save the run makes only because it stops here (not a periodic
            # one: those take schedule time in any run), and before this command's first step its start-up since the
            # step (a resume's save to time one)
            timings = clock.timings()
            after = timings["save"] + (clock.plot_s if tc.plot else 0.0)
            unscheduled = (after - (timings["save"] if periodic else 0.0)
                           + (0.0 if scheduled else clock.elapsed() - (elapsed_before - resumed.after_step_s)))
            nonlocal last_saved
            last_saved = (clock.elapsed() + after, timings)  # (what a resume will plan with)
            state = {"step": step, "tokens": tokens_seen, "tokens_per_step": tokens_per_step,
                     "best_val": best_val, "elapsed_s": last_saved[0], "after_step_s": unscheduled,
                     "schedule_origin_s": clock.schedule_origin, "lr_origin_s": clock.lr_origin,
                     "timings": last_saved[1], "eval_left": eval_left_at == step,
                     "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "processes": ddp.world_size,
                     "loader": loaders + resumed.parked_loaders, "rng": rngs + resumed.parked_rngs}
            ckpt.save_checkpoint(out_dir, "latest", step, model, state=state, extra=ckpt_extra)
        clock.save_times.append(time.time() - t_save)

    def agree_on_next_step(interrupt: StopFlag, position: float) -> tuple[bool, float]:
        """Whether to end the loop before another step (out of budget, or Ctrl-C), and the lr schedule's position
        for that step (it never moves back from `position`, the last step's).

        Under DDP every rank must stop at the same step: a rank that stopped alone would go on to save
        while the others wait for it in the next step's gradient all-reduce, for ever. So the ranks agree
        by one all-reduce of both flags; a Ctrl-C seen by any rank (the signal reaches them at slightly
        different moments) stops them all, and all of them take the interrupted path.
        """
        # The same all-reduce settles the lr schedule's position: with a time budget each rank's clock
        # gives a slightly different one, and replicas stepped with different lrs would drift apart.
        late, stop, agreed = agree([clock.out_of_time(step), interrupt.stop, clock.schedule_position(step)])
        if stop:  # (never cleared: a Ctrl-C that arrives during the all-reduce counts at the next step)
            interrupt.stop = True
        # Never back: the time-budget position is a forecast (from the step time and the reserved end), and
        # a forecast revised down would raise the lr again after it had decayed.
        return bool(late or stop), max(position, agreed)

    def agree(values: list[float]) -> list[float]:
        """Each value's maximum over the ranks (one all-reduce under DDP; as given otherwise). For flags: True
        if True on any rank."""
        if not ddp.enabled:
            return values
        agreed = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return agreed.tolist()

    def log_step(step: int, loss: float, lr: float, step_time: float, tokens: int, elapsed_s: float,
                 run_s: float) -> None:
        """Write a step's row of metrics.jsonl, and show its loss, lr, speed and MFU on the progress bar."""
        nonlocal peak_flops
        tok_s = tokens_per_step / step_time
        # A step faster than the ceiling shows the ceiling was timed in a busy moment (another program
        # on the cores): it is raised to what the run reached, so MFU never reads above 100%
        peak_flops = max(peak_flops, flops_per_step / step_time)
        mfu = flops_per_step / step_time / peak_flops  # achieved FLOP/s over the measured ceiling
        log.write({"step": step, "train_loss": loss, "lr": lr, "dt_ms": round(step_time * 1000, 2),
                   "tokens_per_sec": round(tok_s, 1), "mfu": round(mfu, 4), "elapsed_s": round(elapsed_s, 4),
                   "run_s": round(run_s, 4), "tokens": tokens})  # (0.1 ms: bench_train times steps by them)
        if bar is not None:  # refresh=False: shown at the bar's next (rate-limited) redraw, not on every row
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.0%}",
                            refresh=False)

    unlogged = None  # the last step's row, when log_interval skipped it
    scheduled = False  # whether this command's lr schedule has started (see do_save)
    last_saved: tuple[float, dict[str, float]] | None = None  # the last checkpoint's elapsed_s and timings (rank 0)
    losses: dict[str, float] = {}
    last_loss = float("nan")
    evaluated_at = saved_at = -1  # the steps of the last periodic eval and checkpoint (the final ones reuse them)
    # the step whose eval was left, by a signal or a data change (its checkpoint says so: a resume that trains on
    # does it first); a resume's own, until it is done (a save before it, timing one for a budget, keeps the word)
    eval_left_at = step if resumed.eval_left else -1
    # (a resume from a step-0 checkpoint whose best_val was set: that eval is in metrics.jsonl already)
    if step == 0 and clock.budget_s is None and not resumed.evaluated:
        evaluated_at = 0
        t0 = time.time()
        doing = "during the step-0 eval"  # (outside the training loop's signal handlers: see left_by_ctrl_c)
        losses = do_eval()  # the starting point of the curve: about ln(vocab_size) for random weights
        clock.eval_times.append(time.time() - t0)
        ln_v = math.log(cfg.model.vocab_size)
        chance = f" (random weights: about ln(vocab_size) = {ln_v:.4f})" if pre is None else ""
        say(f"step 0: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{chance}")
    elif clock.budget_s is not None and (step == 0 or tc.compile or folder is not None):
        # Planning a budget times three forward batches, then (from step 0) a checkpoint save and the plot: seconds
        # of silence for a large model on a CPU, so a bar once it takes a second
        # (a resume from a checkpoint that timed no save, or no plot, times them too: a run without a budget, or
        # saved once, resumed with one; left out, the budget's end reserved nothing for them and ran over)
        time_save = step == 0 or (folder is not None and not clock.save_times)
        time_plot = ddp.is_main and tc.plot and (step == 0 or (folder is not None and not clock.plot_s))
        parts = 3 + time_save + time_plot
        doing = "while the time budget was being planned"
        with eval_bar(parts, "planning the time budget", progress and ddp.is_main, unit="part") as planning:
            per_window = time_forward(model, cfg, device, autocast, planning)
            if step == 0:
                # With a time budget, the end of the run must be reserved before it happens. The step-0 eval
                # is skipped (it would spend seconds of a short budget on a known number, about ln(vocab));
                # its cost is estimated from one batch instead, and a step-0 checkpoint and plot measure how
                # long saving and plotting take on this machine.
                clock.eval_times.append(estimate_eval_time(model, data_dir, cfg, device, autocast, per_window))
            elif folder is not None:  # a resume: its checkpoint timed its own evals, maybe other ones, elsewhere
                clock.eval_estimated(estimate_eval_time(model, data_dir, cfg, device, autocast, per_window),
                                     other_evals=evals_changed(saved_train, tc), margin=EVAL_MARGIN)
            if time_save:  # (a resume's: the same step saved again, which changes nothing)
                do_save()
                saved_at = step  # (a signal before the next step needs no second save of it)
                planning.update(1)
            if time_plot:  # (at step 0 a drawing of made-up curves: metrics.jsonl has no rows yet)
                t0 = time.time()
                _plot_quietly(out_dir, timing_only=step == 0)
                clock.plot_s = time.time() - t0
                planning.update(1)
            if folder is not None:
                # The command before saved its last checkpoint (and drew its plot) untimed, so its time left them
                # out: counted now, as what they take here (the run's time, not its lr schedule's)
                missing = (clock.save_times[-1] if time_save else 0.0) + (clock.plot_s if time_plot else 0.0)
                clock.train_start -= missing
                elapsed_before, resumed.after_step_s = elapsed_before + missing, resumed.after_step_s + missing
        clock.plan_first_step(per_window)  # (a step's time until one is timed; with torch.compile, a cap on it)
    if resumed.eval_left and step < tc.max_iters:
        # A signal left this step's eval: done now, before the steps after it, so that the curve and the best
        # checkpoint are the uninterrupted run's (the eval changes no training state: its own batches, no dropout)
        t0 = time.time()
        doing = f"during the eval of step {step}, which the interruption had left"
        losses, evaluated_at, eval_left_at = do_eval(), step, -1
        clock.eval_times.append(time.time() - t0)
        say(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} (the eval the "
            f"interruption left)")
    clock.start_schedule(elapsed_before - resumed.after_step_s)  # (the lr goes on from the checkpoint's step)
    scheduled = True  # (the lr schedule's clock runs from here: see do_save)
    fwd_model.train()
    start_step = step
    bar = None
    if progress and ddp.is_main and step < tc.max_iters:  # (max_iters = 0: no steps, no bar)
        from tqdm.auto import tqdm

        every = bar_interval()  # (30 s into a log file or a pipe, where each redraw is kept)
        # (a budget's end is forecast from the first steps: no total until then, rather than max_iters)
        bar = _train_bar(tqdm)(total=None if clock.budget_s is not None else tc.max_iters, initial=step, desc="train",
                               unit="step", dynamic_ncols=True, mininterval=every, maxinterval=max(every, 10.0))
        if clock.budget_s is None:  # (a budget's forecast end, the bar's total, already counts them)
            bar.periodic_left = clock.periodic_time_left
    @contextlib.contextmanager
    def micro_bar(step: int):
        """A bar within a step of many micro-batches that takes long (a GPT-2 fine-tune on a CPU: 32 micro-batches, a
        minute or more, with the step bar standing still). It shows once the step has taken MICRO_BAR_DELAY_S, and
        clears itself at the step's end. Yields what forward_backward calls after each micro-batch (None: no bar).
        (Asked only where such a bar can be: see `micro_bars` below.)"""
        if clock.step_times and clock.step_estimate() < MICRO_BAR_DELAY_S:
            yield None  # (a step shorter than the delay would never show it: not made, as it costs ~0.1 ms)
            return
        micro = tqdm(total=tc.grad_accum_steps, desc=f"step {step + 1}, micro-batches", unit="batch", leave=False,
                     delay=MICRO_BAR_DELAY_S, dynamic_ncols=True, mininterval=every)
        try:
            yield lambda: interrupt.output(micro.update, 1)
        finally:
            interrupt.output(micro.close)

    micro_bars = bar is not None and tc.grad_accum_steps > 1  # (else a step is one bar update: none within it)
    doing = None  # (the loop's handlers, from here on, say what an interruption left)
    with StopFlag(announce=ddp.is_main, processes=ddp.world_size) as interrupt, close_on_error(bar):
        position = 0.0  # where the lr schedule stands (in steps), agreed before each step
        while step < tc.max_iters:
            stop, position = agree_on_next_step(interrupt, position)
            if stop:
                break
            t_step, t_clock = time.time(), time.perf_counter()  # (wall time for the budget; a fine clock for the step)
            lr = get_lr(position, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon groups peak at muon_lr

            with micro_bar(step) if micro_bars else contextlib.nullcontext() as micro_done:
                loss_sum = forward_backward(fwd_model, loader, cfg, prec, ddp, scaler, autocast, device, micro_done)
            scaler.unscale_(optimizer)  # back to true gradient values (no-op without float16)
            max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")  # (0: no clipping; the norm is still
            # computed, for is_diverged)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            last_loss = loss_sum.item()
            diverged, loss_elsewhere = is_diverged(last_loss, grad_norm, scaler.is_enabled(), agree)
            if diverged and not tc.skip_nonfinite:
                raise divergence_error(step + 1, last_loss, loss_elsewhere, out_dir, tc)
            if diverged:  # skipped: no update; the step still counts, and its eval and checkpoint still come
                skipped = f"fungpt: skipped step {step + 1}: non-finite loss or gradient"
                if bar is not None:
                    interrupt.output(bar.write, skipped)  # (on a line of its own, not glued to the bar)
                else:
                    say(skipped)
            else:
                scaler.step(optimizer)
            scaler.update()  # (float16: adjusts the scale, lowered after a skip; without float16 a no-op)
            optimizer.zero_grad(set_to_none=True)
            step, tokens_seen = step + 1, tokens_seen + tokens_per_step
            # (perf_counter: before Python 3.13, Windows' time.time() moves in 15.6 ms ticks, and a step timed 0 s
            # divided by zero below)
            step_time = max(time.perf_counter() - t_clock, 1e-9)
            clock.step_done(step_time, started=t_step)

            # A row every log_interval steps (and at the first). The step between is kept as `unlogged`, written
            # after the loop if the run ends on it (at max_iters, a budget's end, a signal): the curve reaches the
            # run's last step. A skipped step (non-finite loss or gradient, here or on another rank) has no row.
            row = (step, last_loss, lr, step_time, tokens_seen, time.time() - start_time, clock.elapsed())
            unlogged = None
            if ddp.is_main and not diverged:
                if step % tc.log_interval == 0 or step == 1:
                    if bar is not None and clock.budget_s is not None:
                        # the bar's end: the step where the budget should end the run (maybe before max_iters)
                        bar.total = clock.last_step_forecast(step)
                    log_step(*row)
                else:
                    unlogged = row
            if bar is not None:
                if step == start_step + 1:
                    bar.origin = (time.time(), bar.n + 1)  # (the rate from here, once another step is done: _train_bar)
                interrupt.output(bar.update, 1)
            if step % tc.eval_interval == 0 and step < tc.max_iters:
                t0 = time.time()
                with interrupt.evaluating():
                    scored = do_eval(interrupt)
                if scored is None:  # a signal left the eval; the loop stops before the next step
                    eval_left_at = step
                else:
                    losses, evaluated_at = scored, step
                    clock.eval_times.append(time.time() - t0)
                    said = f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                    if bar is not None:
                        bar.periodic_left = None  # (the rate since the first step holds an eval's time from now on)
                        interrupt.output(bar.write, said)
                    else:  # (progress=False turns off the bar, not the eval lines)
                        say(said)
            if step % tc.checkpoint_interval == 0 and step < tc.max_iters:  # the last step is saved below
                do_save(periodic=True)
                saved_at = step
        if unlogged is not None:  # (the run ended on a step log_interval skipped: at max_iters, a budget, a signal)
            log_step(*unlogged)
        # The loop also ends at max_iters without asking agree_on_next_step: a Ctrl-C that reached some ranks
        # during the last step must not send them down another path than the rest (Ctrl-C no longer changes the
        # flag after the `with`: it then aborts at once).
        stopped, signum = agree([interrupt.stop, interrupt.signum or 0])  # (under DDP: any rank's)
        interrupted = bool(stopped)
        stop_signal = (int(signum) or signal.SIGINT) if interrupted else None
        # Not one step fitted in the budget: an eval now would only overrun it (a 6 x 384 model on a 2-core CPU,
        # given 1 minute, took 97 s, most of it evaluating). A resumed run's checkpoint already holds this step.
        no_step = not interrupted and clock.budget_s is not None and step == start_step and step < tc.max_iters
        # (a time budget can end the run at a step just evaluated and saved: not again, which overran the budget; a
        # step saved but not evaluated is saved again after its eval, whose best_val the checkpoint must hold)
        final_eval = not interrupted and not no_step and evaluated_at != step
        if final_eval:  # still under the handlers: a signal leaves it, and the step is saved as for one during a step
            with interrupt.evaluating():
                scored = do_eval(interrupt)
            left, signum = agree([float(scored is None), interrupt.signum or 0])
            if left:  # (a resume that trains further does it first)
                eval_left_at = step
            if scored is not None:  # (under DDP another rank may have left it: this one's eval is logged all the same)
                losses, evaluated_at = scored, step
            if left:
                interrupted, stop_signal, final_eval = True, int(signum) or signal.SIGINT, False
        if interrupted and saved_at != step:
            do_save()  # still under the handlers: a second signal meanwhile stops at once, saying so
        if bar is not None:
            if clock.budget_s is not None and not interrupted and step > start_step:
                bar.total = step  # where the budget ended it: 100%
            bar.close()
        if not interrupted and not no_step:
            if step > start_step or final_eval:  # (no step and no final eval: the eval line above said these)
                say(f"fungpt: step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                    f"({format_duration(time.time() - start_time)})")
            if (clock.budget_s is not None and step >= tc.max_iters and step > start_step
                    and clock.elapsed() < 0.9 * clock.budget_s):  # (a budget used to its end needs no word)
                # (max_iters, 2,000 by default, still applies: a budget meant to decide the steps was cut short)
                say(f"fungpt: note: train.max_iters = {tc.max_iters:,} ended this run after "
                    f"{format_duration(clock.elapsed())} of its {format_duration(clock.budget_s)} budget "
                    f"(train.max_minutes); raise max_iters for a budget to end the run")
            # (finite weights whose outputs overflow: no guard above sees them; non-finite weights are refused by
            # the save below, in its own words)
            if not math.isfinite(losses["val"]) and all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                best_at = ckpt.saved_step(out_dir, "best") if ddp.is_main else None
                say("fungpt: warning: the final val loss is not a finite number: the model's outputs overflow (its "
                    "training diverged; train.skip_nonfinite only skips such steps) and sampling it will fail; "
                    + (f"its best checkpoint (step {best_at:,}, val loss {best_val:.4f}) still works: pass "
                       "--checkpoint best to sample or evaluate it; or " if best_at else "")  # (step 0: a new model)
                    + f"train again: {lower_lr(tc)[0].lower()}{lower_lr(tc)[1:]}")
            if final_eval or saved_at != step:
                do_save()  # (a signal meanwhile: the run ends as it would have, this save done)

    if interrupted and interrupt.output_failed:  # (its step saved; an error, as the run did not end as asked)
        raise FunGPTError(f"training stopped at step {step}: its output could not be written "
                          f"({interrupt.output_failed}); checkpoint saved. Free some space, or send the output "
                          f"elsewhere, then resume with the same command{resume_flags}")
    if interrupted:
        # Whether a resume would find nothing to train: asked of what the checkpoint holds (its time, the plot to come
        # included, and its timings), as the resume asks it, with a resume's start-up added (a new run's loaded no
        # checkpoint: a save's time stands for the load)
        load_s = last_saved[1]["save"] if last_saved is not None and folder is None else 0.0
        if last_saved is not None and already_done(step, tc, last_saved[0] + startup_s + load_s, last_saved[1]):
            how = "" if evaluated_at == step else (f"; its final eval was not done: `fungpt eval "
                                                   f"--run {shell_quote(str(out_dir))}` scores it")
        else:
            how = f". Resume with the same command{resume_flags}"
        by = "" if stop_signal == signal.SIGINT else f" by {signal.Signals(stop_signal).name}"
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone; the checkpoint is saved
            if stop_signal == getattr(signal, "SIGPIPE", None):  # (stdout had no reader: said where it can be seen)
                if ddp.is_main:
                    print(f"fungpt: training stopped: its output pipe was closed (e.g. by `| head`); checkpoint "
                          f"saved at step {step}{how}", file=sys.stderr)
            else:
                # (on stderr, as the notice the signal got and a stop during setup: seen with stdout sent to a log)
                say(f"fungpt: interrupted{by} at step {step}; checkpoint saved{how}", file=sys.stderr)
    elif no_step:
        if ddp.is_main:
            log.close()
        if folder is not None:
            unscored = ddp.is_main and eval_left_in_log(out_dir, step)  # (stopped by a signal before its final eval)
            say(f"fungpt: {out_dir} used its time budget ({clock.elapsed() / 60:.2f} of train.max_minutes = "
                f"{tc.max_minutes:g} min, too little left for a step, an eval and a checkpoint): nothing to "
                f"train; raise train.max_minutes to continue it" + (f"; its final eval was not done: `fungpt eval "
                                                                    f"--run {shell_quote(str(out_dir))}` scores it"
                                                                    if unscored else ""))
            return nothing_to_train(out_dir, step, ddp.is_main and tc.plot, start_time)
        used, end, step_s = clock.elapsed(), clock.end_time(), clock.step_estimate()
        # (out_of_time keeps two steps' time in hand: see budget_spent)
        raise FunGPTError(f"train.max_minutes = {tc.max_minutes:g} leaves no time to train here: {used:.0f} s went "
                          f"before the first step, a step takes about {step_s:.2g} s and the final eval and checkpoint "
                          f"need about {end:.0f} s more; run again with max_minutes well above "
                          f"{(used + end + 3 * step_s) / 60:.2g}, or a smaller model, batch_size, grad_accum_steps "
                          # (with eval_full_val the final eval scores the whole val split: eval_iters changes nothing)
                          + ("or train.eval_full_val = false (the final eval then scores eval_iters batches, not the "
                             "whole val split)" if tc.eval_full_val else "or eval_iters"))
    if ddp.is_main:
        log.close()
        if tc.plot:
            _plot_quietly(out_dir)
    if ddp.enabled:
        dist.barrier()
    if interrupted and evaluated_at != step:  # (the last eval's losses are older: step 0's, said as the run's own)
        losses = {"train": last_loss}  # the last step's batch loss; no val loss at this step
    return summary(out_dir, step, start_time, losses.get("train", last_loss), losses.get("val", float("nan")),
                   interrupted, stop_signal, trained=step > start_step)


MICRO_BAR_DELAY_S = 2.0  # a step's own bar of micro-batches shows once the step has taken this long (see micro_bar)


def _rng_state(device: str) -> dict[str, torch.Tensor]:
    """The random streams a resume sets back: the CPU's, and the GPU's that draws the dropout masks there."""
    state = {"cpu": torch.get_rng_state()}
    if device == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    elif device == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _gather(obj: Any, ddp: Dist) -> list[Any]:
    """Collect one object per rank on every rank (a list of length 1 without DDP)."""
    if not ddp.enabled:
        return [obj]
    out: list[Any] = [None] * ddp.world_size
    dist.all_gather_object(out, obj)
    return out


def _plot_quietly(out_dir: Path, timing_only: bool = False) -> None:
    """Write loss.png at the end of training; a plotting problem must never fail a finished run.

    timing_only: the step-0 call of a time-budget run, which times the plot before metrics.jsonl has any rows:
    it draws made-up curves into memory (plotting nothing took 5-20 ms, the real plot 125-200 ms).
    """
    try:
        from fungpt.plot import plot_runs, rehearse_plot

        rehearse_plot() if timing_only else plot_runs([out_dir], out=out_dir / "loss.png")
    except Exception as e:  # noqa: BLE001 - the run itself succeeded
        what = "a trial drawing of the loss plot, to time it, failed" if timing_only else "could not draw loss.png"
        print(f"fungpt: {what} ({' '.join(str(e).split())})", file=sys.stderr)  # (one line)
