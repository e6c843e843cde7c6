"""Run configuration: what to train on, what to train, and how.

A run is described by one `RunConfig`: a top-level `out_dir` plus three sections,

    [data]   DataConfig   which text, which tokenizer, how much of it is held out
    [model]  GPTConfig    the architecture (defined in model.py)
    [train]  TrainConfig  optimiser, schedule, batch, logging, device

The same dataclasses feed three places, so they cannot drift apart:
  * TOML files (`configs/*.toml`, also known by their names: `--config shakespeare-char-cpu`), read by
    `load_config`;
  * the command line, generated from the dataclasses by tyro (each field's docstring
    becomes its `--help` text); precedence is CLI > file > defaults;
  * the run folder, where the resolved config is saved as `config.json`.

Every dataclass checks its own values in `__post_init__`, so a bad setting fails in a
second with one clear line instead of an hour into training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fungpt.errors import FunGPTError, check_field_types, read_json, run_folder, shell_quote
from fungpt.linear import CPU_MATMULS
from fungpt.model import GPTConfig

MAX_MINUTES = 525_600  # train.max_minutes at most: a year
TOKENIZERS = ("char", "bpe", "gpt2")
LR_SCHEDULES = ("cosine", "wsd", "constant")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_choice(section: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FunGPTError(f"{section}.{name} = {value!r} is not valid: choose one of {', '.join(choices)}")


@dataclass
class DataConfig:
    """Which text to train on and how to turn it into tokens."""

    path: str = "shakespeare"
    """A prepared folder (from `fungpt prepare`), a text file, a folder of text files, or 'shakespeare'."""
    tokenizer: str = "char"
    """Tokenizer used when `path` still has to be prepared: char, bpe or gpt2."""
    vocab_size: int | None = None
    """Vocabulary size for a BPE tokenizer trained on the corpus (None: 4096)."""
    val_fraction: float = 0.1
    """Fraction of the corpus, taken from its end, held out for validation."""
    errors: str = "strict"
    """Bytes that are not valid UTF-8, when `path` still has to be prepared: strict (stop, naming the file
    and the byte) or replace (each becomes U+FFFD, the replacement character)."""

    def __post_init__(self) -> None:
        check_field_types(self, lambda name: f"data.{name} = ")
        if not self.path.strip():  # (Path("") is the current folder: --data.path "$CORPUS" with CORPUS unset)
            raise FunGPTError("data.path is empty: give a text file, a folder of text, a prepared folder or "
                              "'shakespeare'")
        _check_choice("data", "tokenizer", self.tokenizer, TOKENIZERS)
        _check_choice("data", "errors", self.errors, ("strict", "replace"))
        if not 0.0 < self.val_fraction < 1.0:
            raise FunGPTError(f"data.val_fraction = {self.val_fraction} must be between 0 and 1 (e.g. 0.1)")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise FunGPTError(f"data.vocab_size = {self.vocab_size} must be positive")
        if self.vocab_size is not None and self.tokenizer != "bpe":
            raise FunGPTError(f"data.vocab_size = {self.vocab_size} only applies to the bpe tokenizer, not "
                              f"{self.tokenizer!r}: leave it out (or pass --data.vocab-size None over a config file's)")


@dataclass
class TrainConfig:
    """How to optimise: batch, schedule, logging, checkpoints and hardware. Names follow nanoGPT's."""

    batch_size: int = 12
    """Sequences per micro-batch (per process)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (per process); tokens per step =
    batch_size * block_size * grad_accum_steps * number of processes."""
    max_iters: int = 2000
    """Optimizer steps to train for."""
    lr: float = 1e-3
    """Peak learning rate, reached after warmup."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    warmup_iters: int = 100
    """Steps of linear warmup from 0 to lr. With max_minutes, the same share of the run instead:
    warmup_iters / lr_decay_iters of it (see lr_decay_iters)."""
    lr_decay_iters: int | None = None
    """Step at which the decay reaches min_lr; defaults to max_iters. When set, the schedule does not
    depend on max_iters, so a longer run continues the same curve. With max_minutes, the schedule runs on
    the share of the run done instead: lr_decay_iters stands for the whole run, which ends at the budget, or
    at max_iters if that comes first (the decay then ends there)."""
    lr_schedule: str = "cosine"
    """cosine (GPT-3, nanoGPT), wsd (warmup-stable-decay: flat, then linear decay over the last
    wsd_decay_frac of the run) or constant (after warmup)."""
    wsd_decay_frac: float = 0.2
    """With lr_schedule = wsd: the final fraction of the schedule spent decaying to min_lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied only to matrices (2-D and larger), never to biases or norms. With optimizer
    = muon it applies to the Muon matrices too, scaled by Muon's lr (muon_lr), so the same value pulls harder there."""
    beta1: float = 0.9
    """AdamW beta1 (momentum)."""
    beta2: float = 0.99
    """AdamW beta2 (second-moment decay); 0.99 suits small batches, GPT-3 and nanoGPT use 0.95."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    eval_interval: int = 250
    """Steps between evaluations of train and val loss."""
    eval_iters: int = 20
    """Batches averaged per evaluation."""
    checkpoint_interval: int = 250
    """Steps between checkpoints (a checkpoint is also written at the end and on Ctrl-C)."""
    log_interval: int = 10
    """Steps between rows in metrics.jsonl and updates of the progress bar's loss, lr, tok_s and mfu (its count of
    steps moves every step)."""
    seed: int = 1337
    """Random seed for initialisation, batches and dropout."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda or mps."""
    dtype: str = "auto"
    """auto (bfloat16 where the GPU supports it, float16 + loss scaling on older GPUs, float32 on
    CPU and MPS), float32, bfloat16 or float16. On a CPU, bfloat16 runs only the Linear layers' products in
    bfloat16 (faster where the CPU has bfloat16 instructions, e.g. AMD Zen 4+), the rest in float32 (see
    fungpt/linear.py)."""
    compile: bool = False
    """Compile the model with torch.compile (the saved weights are always the uncompiled model's)."""
    cpu_matmul: str = "auto"
    """Library for float32 matrix products on a CPU: auto ($FUNGPT_CPU_MATMUL if set, else oneDNN on AVX-512
    CPUs not made by Intel, such as AMD's, where torch's MKL runs its AVX2 kernels: slower on a Zen 5, about as
    fast on a Zen 4; and torch's default elsewhere), onednn, or torch (see fungpt/linear.py). The library used is
    recorded in run.json."""
    max_minutes: float | None = None
    """Wall-clock budget for the whole command (a --resume counts the time the run already spent: the budget is
    the whole run's); when set, the lr schedule runs on the fraction of the
    budget used instead of on steps, and training ends with a final eval and checkpoint on time. The
    step-0 eval is skipped (its cost is estimated from one batch instead) so the budget goes to training.
    max_iters (2000 by default) still applies: the run ends at whichever limit comes first (set max_iters far
    above what the budget holds for the budget to decide, as configs/speedrun-cpu.toml does); the schedule
    follows the one further along (so warmup_iters and lr_decay_iters count in shares of the run, not in steps)."""
    optimizer: str = "adamw"
    """adamw (everything on AdamW), or muon: the 2-D matrices inside the blocks on Muon (Keller Jordan
    2024, "Muon: An optimizer for hidden layers in neural networks", the modded-nanogpt speedrun optimizer;
    fungpt/muon.py, a float32 batched form of torch.optim.Muon), embeddings, output head, norms and biases
    on AdamW at lr."""
    muon_lr: float = 0.03
    """Peak learning rate of the Muon matrices (scheduled like lr: warmup and decay scale both)."""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum."""
    eval_full_val: bool = False
    """Score every eval's val loss on the entire val split (every token once) instead of eval_iters
    random batches: exact and comparable across runs, at the cost of one pass over the split."""
    plot: bool = True
    """Write loss.png into out_dir at the end of training (`fungpt plot` makes it any time later)."""
    skip_nonfinite: bool = False
    """Skip an optimizer step whose loss or gradient is NaN/inf instead of stopping with an error."""
    tensorboard: bool = False
    """Also write TensorBoard event files to out_dir/tensorboard."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb` and `wandb login`; without a network, set
    WANDB_MODE=offline: the runs are written to out_dir/wandb, for `wandb sync` later)."""
    wandb_project: str = "fungpt"
    """Weights & Biases project name."""

    def __post_init__(self) -> None:
        check_field_types(self, lambda name: f"train.{name} = ")
        for f in dataclasses.fields(self):  # nan passes every comparison below as False, inf most of them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise FunGPTError(f"train.{f.name} = {value} must be a finite number")
        if not 0 <= self.seed < 2**63:  # torch.manual_seed takes a 64-bit signed integer
            raise FunGPTError(f"train.seed = {self.seed} must be between 0 and 2**63 - 1")
        positive = ("batch_size", "grad_accum_steps", "eval_interval", "eval_iters", "checkpoint_interval",
                    "log_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise FunGPTError(f"train.{name} = {getattr(self, name)} must be a positive integer")
        for name in ("batch_size", "grad_accum_steps"):  # (a typo such as 1e20 would fail deep inside torch)
            if getattr(self, name) > 2**24:
                raise FunGPTError(f"train.{name} = {getattr(self, name)} is far too large (at most 2**24 = "
                                  f"16,777,216): check its value")
        for name in ("max_iters", "warmup_iters", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise FunGPTError(f"train.{name} = {getattr(self, name)} must not be negative")
        if self.lr <= 0:
            raise FunGPTError(f"train.lr = {self.lr} must be positive (e.g. 1e-3)")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise FunGPTError(f"train.min_lr = {self.min_lr} must be between 0 and train.lr = {self.lr}")
        if self.lr_decay_iters is not None and self.lr_decay_iters <= 0:
            raise FunGPTError(f"train.lr_decay_iters = {self.lr_decay_iters} must be positive (or unset)")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FunGPTError(f"train.{name} = {getattr(self, name)} must be in [0, 1)")
        if not 0.0 < self.wsd_decay_frac <= 1.0:
            raise FunGPTError(f"train.wsd_decay_frac = {self.wsd_decay_frac} must be in (0, 1]")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise FunGPTError(f"train.max_minutes = {self.max_minutes} must be positive (or unset)")
        _check_choice("train", "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("train", "optimizer", self.optimizer, ("adamw", "muon"))
        if self.muon_lr <= 0:
            raise FunGPTError(f"train.muon_lr = {self.muon_lr} must be positive (e.g. 0.03)")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise FunGPTError(f"train.muon_momentum = {self.muon_momentum} must be in [0, 1) (e.g. 0.95)")
        _check_choice("train", "device", self.device, DEVICES)
        _check_choice("train", "dtype", self.dtype, DTYPES)
        _check_choice("train", "cpu_matmul", self.cpu_matmul, CPU_MATMULS)

    def check_limits(self) -> None:
        """Bounds a run about to train (or plan) must keep, checked then rather than in __post_init__: a run saved by
        an older FunGPT with a larger value still loads for sample, eval and export."""
        if self.eval_iters > 2**24:  # (10**30 failed deep inside torch: a raw traceback)
            raise FunGPTError(f"train.eval_iters = {self.eval_iters} is far too large (at most 2**24 = 16,777,216): "
                              f"check its value")
        if self.max_minutes is not None and self.max_minutes > MAX_MINUTES:  # (1e308 overflowed the step forecast)
            raise FunGPTError(f"train.max_minutes = {self.max_minutes:g} is more than a year ({MAX_MINUTES:,} "
                              f"minutes): for no time limit, leave it unset (--train.max-minutes None)")

    @property
    def decay_iters(self) -> int:
        """The step at which the schedule reaches min_lr."""
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.max_iters


def _default_model() -> GPTConfig:
    # A small model that trains on a laptop CPU in minutes; vocab_size is set from the data. GPT-2's biases and tanh
    # GELU, as GPTConfig's (a config file that leaves them out builds them, as it always has: configs/
    # shakespeare-char-cpu.toml sets nanoGPT's instead)
    return GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)


def default_model() -> GPTConfig:
    """The [model] defaults of a run config (with init_from, a field differing from these counts as set)."""
    return _default_model()


@dataclass
class RunConfig:
    """Everything that defines a training run. Saved as config.json in the run folder."""

    out_dir: str = "out/shakespeare-char-cpu"
    """Run folder: config, metrics, checkpoints, tokenizer and plots are written here."""
    data: DataConfig = field(default_factory=DataConfig)
    """Which text to train on and how to turn it into tokens."""
    model: GPTConfig = field(default_factory=_default_model)
    """The model. A run's defaults are a small 4 x 128 GPT (0.8M parameters) that trains on a laptop CPU in
    minutes; GPTConfig() by itself is GPT-2 small (124M)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimizer, schedule, batches, evals, checkpoints and hardware of the run."""

    def __post_init__(self) -> None:
        # Each section as its dataclass (a dict of its settings is read as one), then out_dir as a str (or a path)
        for name, klass in SECTIONS.items():
            section = getattr(self, name)
            if isinstance(section, dict):  # (on the defaults of this class: a subclass of RunConfig may have its own)
                default = next(f for f in dataclasses.fields(self) if f.name == name).default_factory()
                setattr(self, name, _build_section(klass, section, f"RunConfig {name}", defaults=default))
            elif not isinstance(section, klass):
                raise FunGPTError(f"RunConfig {name} = {section!r} should be a {klass.__name__} (or a dict of its "
                                  f"settings): e.g. RunConfig({name}={klass.__name__}(...))")
        check_field_types(self, lambda name: f"RunConfig {name} = ")
        if not self.out_dir.strip():  # (e.g. --out-dir "$DIR" with DIR unset: the run would fill the current folder)
            raise FunGPTError("out_dir is empty: give the run's folder, e.g. --out-dir out/my-run (. for the "
                              "current folder)")
        # ~ as the home folder, as data.path reads it: in a TOML file, or quoted on a command line, no shell expands
        # it, and the run went into a folder named "~" (which `rm -rf ~` would then take for the home folder)
        self.out_dir = os.path.expanduser(self.out_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config", checked: bool = True,
                  saved: bool = False) -> RunConfig:
        """Build a RunConfig from nested dicts (TOML or config.json); unknown keys are an error.

        checked=False leaves out the checks that relate one value to another (`__post_init__`), for a config
        file whose settings the command line may still change: `fungpt train` checks what they make together.
        saved=True: settings a run saved (its config.json, a checkpoint's record), where a whole number written as a
        float by an older FunGPT is read as the number it is."""
        sections = SECTIONS
        unknown = set(d) - {"out_dir", *sections}
        if unknown:
            moves = _belongs_elsewhere(unknown, "")
            # a misspelt table ([trian]): name the table meant (difflib: the closest by spelling)
            near = {k: difflib.get_close_matches(k, list(sections), n=1) for k in sorted(unknown)
                    if isinstance(d[k], dict)}
            hints = ", ".join(f"[{v[0]}] for [{k}]" for k, v in near.items() if v)
            said = "; ".join(p for p in (moves, f"did you mean {hints}?" if hints else "") if p)
            raise FunGPTError(f"{source}: unknown top-level key(s) {sorted(unknown)}"
                              + (f" ({said})" if said else "") + "; expected out_dir, [data], [model], [train]")
        kwargs: dict[str, Any] = {}
        if "out_dir" in d:
            if not isinstance(d["out_dir"], str):  # str() would make a folder named e.g. "['a', 'b']"
                raise FunGPTError(f"{source}: out_dir = {as_written(d['out_dir'])} should be a folder name (a string "
                                  f"in double quotes)")
            kwargs["out_dir"] = d["out_dir"]
        for name, klass in sections.items():
            kwargs[name] = _build_section(klass, d.get(name, {}), f"{source} [{name}]", defaults=getattr(cls(), name),
                                          checked=checked, saved=saved)
        try:
            return cls(**kwargs)
        except FunGPTError as e:  # (an empty out_dir)
            if checked:
                raise FunGPTError(f"{source}: {e}") from None
            return _unchecked(cls, kwargs)


SECTIONS = {"data": DataConfig, "model": GPTConfig, "train": TrainConfig}  # a run config's tables


def _tables_of(setting: str) -> list[str]:
    """The tables that have a setting of this name (vocab_size is in two: [data] and [model])."""
    return [name for name, klass in SECTIONS.items() if setting in {f.name for f in dataclasses.fields(klass)}]


def _belongs_elsewhere(names: Collection[str], section: str) -> str:
    """'block_size belongs in [model], ...' for those of `names` that are settings of another table than
    `section` ("" for the top level), by their own or nanoGPT's name; "" if none is."""
    said = []
    for n in sorted(names):
        meant = _setting_name(n)
        homes = [f"in [{t}]" for t in _tables_of(meant) if t != section]
        homes += ["at the top of the file, above the tables"] if meant == "out_dir" and section else []
        if meant == "out_dir" and not section and meant != n:
            homes = ["at the top of the file"]  # (out-dir where out_dir is: only its spelling is wrong)
        if homes:
            said.append(f"{n} belongs {' or '.join(homes)}" if meant == n else f"{n} is {meant}, {' or '.join(homes)}")
    return ", ".join(said)


def _setting_name(key: str) -> str:
    """The setting a config file's key means: itself, or nanoGPT's name for one, spelled with dashes as flags
    are (block-size, learning-rate) or not."""
    key = key.replace("-", "_")
    return NANOGPT_NAMES.get(key, key)


def misplaced_flag(flag: str) -> str | None:
    """For a flag such as --train.block-size that names a setting of another table, or one by nanoGPT's name
    (--train.learning-rate), the flag meant (--model.block-size, --train.lr); None for any other flag."""
    section, _, name = flag.removeprefix("--").partition("=")[0].partition(".")
    name = name.replace("-", "_")
    if section not in SECTIONS or not name or section in _tables_of(name):
        return None
    negated = name.startswith("no_")  # a boolean's --no- form
    name = name.removeprefix("no_")
    meant = NANOGPT_NAMES.get(name, name)
    homes = [s for s in _tables_of(meant)  # (--no- exists for booleans only)
             if not negated or typing.get_type_hints(SECTIONS[s])[meant] is bool]
    if not homes or (meant == name and section in homes):
        return None  # a typo (tyro suggests the closest flag), or --no-X of this table's X
    return " or ".join(f"--{s}.{'no-' if negated else ''}{meant.replace('_', '-')}" for s in homes)


# nanoGPT's names for the settings FunGPT names otherwise (README: "Training fields mostly use nanoGPT's names")
NANOGPT_NAMES = {"learning_rate": "lr", "gradient_accumulation_steps": "grad_accum_steps", "decay_lr": "lr_schedule"}


def _build_section(klass: type, values: Any, where: str, defaults: Any, checked: bool = True,
                   saved: bool = False) -> Any:
    if not isinstance(values, dict):
        raise FunGPTError(f"{where} must be a table of settings, not {as_written(values)}")
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = set(values) - names
    if unknown:
        # A setting of another table (block_size in [train]); else nanoGPT's name for one of this table, or a
        # typo: name the setting meant (difflib: the closest by spelling)
        section = where.rsplit("[", 1)[-1].rstrip("]")
        moved = _belongs_elsewhere(unknown, section)
        meant = {k: _setting_name(k) if _setting_name(k) in names
                 else next(iter(difflib.get_close_matches(_setting_name(k), names, n=1)), None)
                 for k in sorted(unknown) if not _belongs_elsewhere([k], section)}
        hints = ", ".join(f"{v} for {k}" for k, v in meant.items() if v)
        said = "; ".join(p for p in (moved, f"did you mean {hints}?" if hints else "") if p)
        # A run's config.json lists what its training had: settings this code lacks were its code's (a learner's
        # field, since removed; another FunGPT version)
        fix = ("; remove them from that config.json, or, if its run was saved by code (or a FunGPT version) that had "
               "them, go back to that code" if where.rsplit(" [", 1)[0].endswith(".json")
               else "; see `fungpt train --help` for the valid ones")
        raise FunGPTError(f"{where}: unknown setting(s) {sorted(unknown)}" + (f" ({said})" if said else "") + fix)
    merged = {**dataclasses.asdict(defaults), **values}
    for name in values:
        merged[name] = _check_type(klass, name, values[name], where, saved)
    try:
        return klass(**merged)
    except TypeError as e:  # e.g. a wrong type that the dataclass cannot take
        raise FunGPTError(f"{where}: {e}") from None
    except FunGPTError as e:  # a check in __post_init__ (e.g. min_lr above lr): say which file has the value
        if checked:
            raise FunGPTError(f"{where}: {e}") from None
        return _unchecked(klass, merged)


def _unchecked(klass: type, fields: dict[str, Any]) -> Any:
    """An instance of dataclass `klass` holding `fields` as they are, without its __post_init__ checks (building
    it again with the command line's flags, as tyro does, checks them)."""
    unchecked = object.__new__(klass)
    unchecked.__dict__.update(fields)
    return unchecked


def _check_type(klass: type, name: str, value: Any, where: str, saved: bool = False) -> Any:
    """Check a value from a file against the field's annotation; return it (an int is fine for a float).

    TOML and JSON values arrive untyped as far as the dataclass is concerned, so without this
    `batch_size = "four"` would fail deep inside a comparison with a confusing message.
    """
    hint = typing.get_type_hints(klass).get(name)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return value
    for t in options:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        # (saved by a run, whose older FunGPT's Python API took max_iters=1e1 as 10.0: read as the whole number it
        # is; a config file of the user's is told below to write it so)
        if t is int and saved and isinstance(value, float) and value.is_integer():
            return int(value)
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float, e.g. 1 followed by 400 zeros
                raise FunGPTError(f"{where}: {name} is too large for a number (an integer of "
                                  f"{len(str(abs(value)))} digits)") from None
        if t is str and isinstance(value, str):
            return value
        if t not in (bool, int, float, str, type(None)):
            return value  # a type this simple check does not know: let the dataclass judge
    # Said in the file's own words (TOML's and JSON's: true, "text"), not Python's (True, 'text', int)
    # (TOML has no null: an optional setting's default comes from leaving it out)
    toml = not where.split(" [", 1)[0].endswith(".json")  # (a config file of any other name is read as TOML)
    said = [t for t in options if t is not type(None) or not toml]
    wanted = " or ".join(FILE_TYPE_NAMES.get(t, getattr(t, "__name__", str(t))) for t in said)
    # (TOML has no null: "None" written there is a string; the setting's default comes from leaving it out)
    unset = ("; TOML has no null: for its default, delete the line" if type(None) in options and toml
             and isinstance(value, str) and value.strip().lower() in ("none", "null", "nil", "") else "")
    whole = (f" (write {int(value)})" if int in options and isinstance(value, float)
             and value.is_integer() else "")
    raise FunGPTError(f"{where}: {name} = {as_written(value)} should be {wanted}{unset}{whole}")


# How a config file's reader is told the type a setting takes
FILE_TYPE_NAMES = {int: "a whole number", float: "a number", str: 'a string in double quotes ("...")',
                   bool: "true or false", type(None): "null"}


def as_written(value: Any) -> str:
    """A value from a TOML or JSON file, spelled as it is written there: true, "text", [1, 2]."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf (TOML's spelling; a JSON file's NaN and Infinity are said so too)
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:  # (a TOML date or time)
        return str(value)


def presets_dir() -> Path | None:
    """The folder of the example configs that come with FunGPT: `configs/` of a checkout (or of an editable
    install), or `fungpt/configs` in an installed wheel (pyproject.toml maps the one onto the other)."""
    package = Path(__file__).resolve().parent
    if (package / "configs").is_dir():  # an installed wheel
        return package / "configs"
    checkout = package.parent  # (in a wheel, site-packages: the pyproject.toml check keeps its folders out)
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    return None


def presets() -> list[str]:
    """The names of the example configs, e.g. "shakespeare-char-cpu" (configs/shakespeare-char-cpu.toml)."""
    folder = presets_dir()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder else []


def config_path(path: str | Path, folders: bool = False) -> Path:
    """The file a --config names. A file that exists is taken as it is (with `folders`, a folder too: inspect's
    run folders). Otherwise an example config's name ("shakespeare-char-cpu"), or the path the docs give it
    ("configs/shakespeare-char-cpu.toml") typed outside a checkout's folder, is the example config of that name
    that comes with FunGPT: also where a folder has that name (a run's out_dir, named after its preset)."""
    path = Path(path)
    there = path.is_file() or (path.is_dir() if folders else False)
    if there or path.suffix not in ("", ".toml") or str(path.parent) not in (".", "configs"):
        return path
    if path.suffix == "" and path.with_name(f"{path.name}.toml").is_file():  # a copy of the user's own comes first
        return path.with_name(f"{path.name}.toml")
    folder = presets_dir()
    preset = folder / f"{path.stem}.toml" if folder else None
    return preset if preset is not None and preset.is_file() else path


def load_config(path: str | Path, checked: bool = True) -> RunConfig:
    """Read a TOML run config (a path, or an example config's name: see config_path). Missing settings keep
    their defaults. checked=False: see RunConfig.from_dict."""
    found = config_path(path)
    # (a run's config.json is read as a run saved it: 12.0 for a whole number, as an older FunGPT wrote some)
    return RunConfig.from_dict(_read_toml(found), source=str(path), checked=checked, saved=found.suffix == ".json")


def fields_named(config_file: str | Path | None, args: list[str], section: str = "model") -> frozenset[str]:
    """The settings of [section] a user wrote down, in the config file or as --section.* flags, even where the
    value equals the default. Fine-tuning needs this: there, an unset field means "the checkpoint's
    value", and a [data] tokenizer asked for, even the default "char", is not the one a fine-tune uses."""
    path = config_path(config_file) if config_file else None
    # (a run's config.json records every [data] setting, the unused defaults too: only the flags name any there)
    named = set(_read_toml(path).get(section, {})) if path and not (section == "data" and path.suffix == ".json") \
        else set()
    for a in args:
        if a.startswith(f"--{section}."):
            named.add(a.removeprefix(f"--{section}.").split("=", 1)[0].replace("-", "_"))
    return frozenset(named)


def _read_toml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        run = f", or {path / 'config.json'} for that run's own settings" if (path / "config.json").is_file() else ""
        raise FunGPTError(f"config file {path} is a folder: pass a .toml file (see configs/ for examples){run}")
    if path.exists() and not path.is_file():  # (read twice, by load_config and fields_named)
        raise FunGPTError(f"config file {path} is not a regular file (a pipe, such as <(...), can be read only "
                          f"once): save the config into a .toml file and pass that")
    if not path.is_file():
        names = presets()
        # a misspelt example's name, where config_path would have found the example (a bare name, or configs/NAME)
        bare = path.suffix in ("", ".toml") and str(path.parent) in (".", "configs")
        near = difflib.get_close_matches(path.name.removesuffix(".toml"), names, n=1) if bare else []
        raise FunGPTError(f"config file {path} does not exist; " + (f"did you mean {near[0]}? " if near else "")
                          + "give a config file's path"
                          + (f", or the name of an example config: {', '.join(names)}" if names else ""))
    if path.suffix == ".json":  # the config.json a run saved: train another run like it
        d = _read_saved_config(path)
        if not d:  # ({}: as an empty TOML file, below; a run's own, read by --resume: damaged)
            run = (path.parent / "metrics.jsonl").is_file() or (path.parent / "checkpoints").is_dir()
            raise FunGPTError(f"{path} holds no settings: the run's config.json is damaged; restore it (the settings "
                              f"it trained with), or train into a new out_dir" if run else
                              f"config file {path} holds no settings; write the settings into it, or leave --config "
                              f"out to train with the defaults")
        if isinstance(d.get("model"), dict):
            # Not a setting of its own: the size of its data's tokenizer (from scratch), or of its pretrained
            # model's trimmed to its tokenizer's (a fine-tune); the new run finds it again the same way
            d["model"].pop("vocab_size", None)
        return d
    try:
        with path.open("rb") as f:
            raw = f.read()
        # Some Windows editors start UTF-8 files with a byte-order mark, which TOML does not allow: skip it.
        d = tomllib.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except tomllib.TOMLDecodeError as e:
        # (nanoGPT's configs are Python files, which are never run here)
        python = (": FunGPT reads TOML, not nanoGPT's Python configs; write the settings as TOML, as configs/*.toml "
                  "are" if path.suffix == ".py" else "")
        if not python and ("hex value" in str(e) or "Unescaped" in str(e)):  # ("C:\Users": \U starts an escape)
            python = f": {BACKSLASH_HINT}"
        raise FunGPTError(f"config file {path} is not valid TOML: {e}{python}") from None
    except UnicodeDecodeError as e:  # TOML files must be UTF-8 (before ValueError: a kind of it)
        from fungpt.data import refuse_utf16_or_32  # (PowerShell 5's `>` writes UTF-16: named as such)

        try:
            refuse_utf16_or_32(f"config file {path}", raw)
        except FunGPTError as utf16:
            raise utf16 from None
        raise FunGPTError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except ValueError as e:  # (an integer of over 4,300 digits: Python's limit on reading one)
        digits = re.search(r"value has (\d+) digits", str(e))
        raise FunGPTError(f"config file {path} holds a whole number of " + (f"{int(digits[1]):,}" if digits else "over "
                          "4,300") + " digits, more than Python reads (4,300 at most); fix that value") from None
    except OSError as e:  # e.g. a folder or an unreadable file
        raise FunGPTError(f"cannot read config file {path}: {e.strerror or e}") from None
    if not d:  # (a script that truncated it: the defaults would train silently, a long run of another model)
        raise FunGPTError(f"config file {path} holds no settings; write the settings into it, or leave --config out "
                          f"to train with the defaults")
    # A path in double quotes whose backslashes TOML read as escapes ("D:\new\texts": a newline and a tab): no
    # file has such a name, and the error about it would print the name as the user wrote it
    # (only where a double-quoted string of the file that holds escapes reads as the value, "D:\\new": a tab written
    # as it is, in single quotes, is on purpose; any key form, dotted or in an inline table, is found by its value)
    escaped = set()
    for literal in re.findall(r'"(?:[^"\\\n]|\\.)*"', raw.decode("utf-8", "replace")):
        if "\\" in literal:
            with contextlib.suppress(tomllib.TOMLDecodeError):
                escaped.add(tomllib.loads(f"x = {literal}")["x"])
    for where, value in (("out_dir", d.get("out_dir")), ("[data] path", (d.get("data") or {}).get("path")),
                         ("[model] init_from", (d.get("model") or {}).get("init_from"))):
        if isinstance(value, str) and any(ord(c) < 0x20 for c in value) and value in escaped:
            raise FunGPTError(f"config file {path}: {where} = {value!r} holds a control character: "
                              f"{BACKSLASH_HINT}")
    return d


BACKSLASH_HINT = ("in double quotes a backslash starts an escape (\\n, \\t, \\U...): write a Windows path in single "
                  "quotes, path = 'C:\\data\\my.txt', or with forward slashes")


def load_run_config(run_dir: str | Path) -> RunConfig:
    """Read the resolved config.json that training saved in a run folder."""
    path = run_folder(run_dir) / "config.json"
    if not path.is_file():
        raise FunGPTError(f"{run_dir} is not a FunGPT run folder (no config.json); pass the out_dir of a training run")
    return RunConfig.from_dict(_read_saved_config(path), source=str(path), saved=True)


def _read_saved_config(path: Path) -> dict[str, Any]:
    """The settings in a config.json that `fungpt train` saved (as a dict, ready for RunConfig.from_dict)."""
    try:
        d = read_json(path, unique_keys=True)  # (a table written twice by hand: the first one's settings were lost)
    except ValueError as e:  # (not JSON, not UTF-8, nested too deeply, an integer too long to read)
        raise FunGPTError(f"{path} is corrupt ({e}); it should be the JSON config written by `fungpt train`") from None
    except OSError as e:
        raise FunGPTError(f"cannot read {path}: {e.strerror or e}") from None
    if _names_hf_model(d):  # e.g. the folder of `fungpt export`
        folder = shell_quote(str(path.parent))
        raise FunGPTError(f"{path.parent} holds a Hugging Face model ({d.get('model_type', 'a config.json of its')}), "
                          f"not a FunGPT training run: fine-tune it with `fungpt train --model.init-from {folder}`, "
                          f"or load it with transformers")
    if not isinstance(d, dict):
        raise FunGPTError(f"{path} is not a FunGPT run config (it holds a JSON {type(d).__name__}, not an object)")
    data = d.get("data")
    if isinstance(data, dict) and data.get("tokenizer", "char") != "bpe":
        # Versions before the check in DataConfig saved a vocab_size that only bpe uses (it was ignored)
        data.pop("vocab_size", None)
    return d


def is_hf_config(path: Path) -> bool:
    """Whether the JSON file at path is a Hugging Face model config (it names a model_type or architectures)."""
    try:
        d = read_json(path)
    except (OSError, ValueError):
        return False
    return _names_hf_model(d)


def _names_hf_model(d: Any) -> bool:
    return isinstance(d, dict) and ("model_type" in d or "architectures" in d)
