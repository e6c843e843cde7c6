"""Loading a trained run (config, tokenizer, weights) for sampling, evaluation and inspection."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fungpt import checkpoint as ckpt
from fungpt.config import RunConfig, load_run_config
from fungpt.errors import FunGPTError, check_number, read_json, run_folder
from fungpt.hardware import detect_precision
from fungpt.linear import cpu_matmul
from fungpt.model import GPT
from fungpt.rundir import lock_holder
from fungpt.tokenizer import Tokenizer, load_tokenizer


@dataclass
class LoadedRun:
    model: GPT
    tokenizer: Tokenizer
    config: RunConfig
    step: int
    device: str
    run_dir: Path
    # the checkpoint loaded: its folder, and when its manifest was written (a run started over with --overwrite
    # reuses folder names); None where the manifest went before it could be read (the run saved again meanwhile)
    checkpoint_id: tuple[Path, int] | None = None


# How long load_run keeps reading a run still training that replaces its checkpoint while it is read (a tiny model
# saving every few steps: 75 times a second, where reading one took longer, and two tries failed 8 times in 12)
RELOAD_S = 10.0


def load_run(run_dir: str | Path, checkpoint: str = "last", device: str = "auto",
             retry_s: float = RELOAD_S) -> LoadedRun:
    """Rebuild the model of a run folder from its config and verified safetensors weights.

    retry_s: how long to keep reading a run that replaces its checkpoint while it is read (see RELOAD_S)."""
    run_dir = run_folder(run_dir)
    if checkpoint not in ("last", "best"):
        raise FunGPTError(f"--checkpoint {checkpoint!r} is not valid: choose last or best")
    kind = "latest" if checkpoint == "last" else "best"
    dev = detect_precision(device, "float32").device  # (first: an error of the device's is not the checkpoint's)
    if dev == "cpu":
        cpu_matmul()  # resolved now: a bad FUNGPT_CPU_MATMUL is refused at load, not at the first product
    pointer = run_dir / f"{kind}.json"
    deadline = time.monotonic() + retry_s
    while True:
        before, folder = _file_id(pointer), None
        try:
            folder = ckpt.find_checkpoint(run_dir, kind)
            return _load(run_dir, folder, checkpoint, dev)
        except (FunGPTError, FileNotFoundError) as e:  # (a file deleted under verify_checkpoint: the latter)
            # A run still training replaces its checkpoint (a new folder, its pointer, then the old folder deleted):
            # a read while that happens finds files gone. Then read the one the pointer names now.
            replaced = _file_id(pointer) != before and (folder is None or not folder.exists() or
                                                        _named(run_dir, kind) != folder)  # (deleted, or going)
            if not replaced:  # the checkpoint read is still there: the error is its own (or the run's), as it says
                if isinstance(e, _Damaged) and checkpoint == "last" and _whole_best(run_dir, folder):
                    raise FunGPTError(f"{e} (or use the run's best checkpoint: --checkpoint best)") from None
                raise
            if time.monotonic() > deadline:
                raise FunGPTError(f"{run_dir} is training and replaced its {kind} checkpoint while it was read, "
                                  f"again and again for {retry_s:g} s (the last try: {e}); try again (a run that "
                                  f"saves every few steps: raise its train.checkpoint_interval)") from None


def _named(run_dir: Path, kind: str) -> Path | None:
    """The checkpoint folder the run's pointer names now (None if none can be found)."""
    try:
        return ckpt.find_checkpoint(run_dir, kind)
    except FunGPTError:
        return None


class _Damaged(FunGPTError):
    """A checkpoint whose files failed verify_checkpoint (load_run then points to the run's best one, if whole)."""


def _whole_best(run_dir: Path, damaged: Path | None) -> bool:
    """Whether the run has a best checkpoint other than `damaged` whose weights verify (a hint to use it must not
    lead to the same error)."""
    best = _named(run_dir, "best")
    if best is None or not best.is_dir() or damaged is None or best.resolve() == damaged.resolve():
        return False
    try:
        ckpt.verify_checkpoint(best, weights_only=True)
    except FunGPTError:
        return False
    return True


def _file_id(path: Path) -> tuple[int, int] | None:
    """(inode, modification time) of a file, None if it is not there: a file replaced by a rename has another."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _no_checkpoint(run_dir: Path, checkpoint: str) -> str:
    """Why a run that is not training has no `checkpoint` (last or best): never trained, or trained and saved none
    ("train it first" was said to a run whose weights diverged, so that their save was refused, or whose every eval
    was NaN, so that no best was kept)."""
    from fungpt.plot import read_metrics

    try:
        steps, evals = read_metrics(run_dir)
    except (FunGPTError, OSError):
        steps, evals = [], []
    if not steps:
        return f"{run_dir} has no {checkpoint} checkpoint yet (train it first)"
    if checkpoint == "best" and evals and not any(math.isfinite(r["val_loss"]) for r in evals if "val_loss" in r):
        return (f"{run_dir} has no best checkpoint: no eval of it gave a finite val loss (its training diverged); "
                f"train it again with a lower train.lr")
    if checkpoint == "best" and ckpt.saved_step(run_dir, "latest") is not None:  # (a time budget skips step 0's eval)
        return (f"{run_dir} has no best checkpoint yet: no eval of it has finished (a run on a time budget skips the "
                f"one at step 0); use its last one (--checkpoint last), or resume it to its next eval")
    # (skipped steps log no row: the last step is the largest logged, an eval's too; a best of step 0 holds the
    # starting weights: not pointed at)
    last = max(int(r["step"]) for r in steps + evals if "step" in r)
    return (f"{run_dir} has no {checkpoint} checkpoint, though it trained to step {last:,}: its weights diverged (a "
            f"save of non-finite weights is refused), or it stopped before its first save; train it again (with a "
            f"lower train.lr if it diverged)")


def _load(run_dir: Path, folder: Path | None, checkpoint: str, dev: str) -> LoadedRun:
    cfg = load_run_config(run_dir)
    if folder is None:
        holder = lock_holder(run_dir)
        best_step = ckpt.saved_step(run_dir, "best") if checkpoint == "last" else None
        # (a best of step 0 holds the initial weights: nothing to point at, but in a run training now)
        best = best_step is not None and (holder is not None or best_step > 0)
        if holder is not None:  # (started, not saved yet: "train it first" would start a second run)
            raise FunGPTError(f"{run_dir} has no {checkpoint} checkpoint yet: it is training now ({holder}) and has "
                              f"not saved one; try again once it has"
                              + (" (or now with --checkpoint best: its best so far)" if best else ""))
        if best:  # (its latest lost, a full disk: its best weights are there)
            raise FunGPTError(f"{run_dir} has no last checkpoint, but a best one: pass --checkpoint best")
        raise FunGPTError(_no_checkpoint(run_dir, checkpoint))
    best = _named(run_dir, "best") if checkpoint == "last" and not folder.is_dir() else None
    if best is not None and best.is_dir():
        raise FunGPTError(f"{run_dir}'s last checkpoint folder {folder.name} is missing (its pointer latest.json "
                          f"names it), but a best one is there: pass --checkpoint best")
    try:
        manifest = ckpt.verify_checkpoint(folder, weights_only=True)  # (the weights are all a loaded run uses)
    except FunGPTError as e:
        raise _Damaged(str(e)) from None
    written = _file_id(folder / ckpt.MANIFEST_FILE)  # (read first: the run may replace the folder while we load it)
    ckpt.check_model_config(manifest, folder, cfg.model.to_dict(), run_dir / "config.json")
    tokenizer = load_tokenizer(run_dir)
    tok_file = run_dir / "tokenizer_meta.json"
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise FunGPTError(f"the tokenizer {tok_file} has {tokenizer.vocab_size} tokens but the model in "
                          f"{run_dir / 'config.json'} expects {cfg.model.vocab_size}: they do not belong together")
    # Same size is not enough (two character sets can both have 65 symbols): the checkpoint
    # records a fingerprint of the tokenizer files it was trained with.
    saved_fp = manifest.get("tokenizer_sha256")
    if saved_fp and saved_fp != ckpt.tokenizer_fingerprint(run_dir):
        raise FunGPTError(f"the tokenizer {tok_file} is not the one checkpoint {folder} was trained with "
                          f"(its fingerprint differs): restore the run's original tokenizer files")
    # (the random initial weights, drawn only to be overwritten, come from a stream of their own: a program's torch
    # stream is left as it was, as train() leaves it)
    ckpt.check_weights_before_building(folder, cfg.model, run_dir / "config.json")
    with torch.random.fork_rng(devices=[]):
        # float32 whatever the caller's default dtype (a float64 one made a float64 model of float32 weights): cast,
        # not by setting the default, which other threads share (the position tables are float32 in any case)
        model = GPT(cfg.model).float()
    ckpt.load_weights(folder, model)
    model.to(dev).eval()
    return LoadedRun(model, tokenizer, cfg, int(manifest["step"]), dev, run_dir,
                     (folder, written[1]) if written is not None else None)


OVERFIT_MARGIN = 0.01
"""How much lower (in nats) the best checkpoint's val loss must be than the last's for `overfit_note` to speak:
less is within what an estimate from eval_iters random batches varies (BENCHMARKS.md, the GPU session)."""


def last_val_loss(run_dir: str | Path) -> tuple[int, float] | None:
    """(step, val loss logged there) of the run's last checkpoint; None when it has none, no eval was logged at its
    step, or the files needed to tell are missing (the command itself then says what is wrong)."""
    from fungpt.plot import read_metrics

    if not str(run_dir).strip():
        return None  # (the command itself says the run folder is empty)
    run_dir = Path(run_dir).expanduser()  # (~ quoted on a command line reaches us as it is)
    try:
        latest = ckpt.find_checkpoint(run_dir, "latest")
        if latest is None:
            return None
        last_step = read_json(latest / ckpt.MANIFEST_FILE)["step"]
        last_vals = [row["val_loss"] for row in read_metrics(run_dir)[1] if row.get("step") == last_step]
        # (the last row: a resumed run may log a step twice)
        return (int(last_step), float(last_vals[-1])) if last_vals else None
    except (FunGPTError, OSError, ValueError, KeyError, TypeError):
        return None


def overfit_note(run_dir: str | Path) -> str | None:
    """A note for using the last checkpoint of a run whose val loss has risen since its best one (overfitting, as
    nanoGPT's GPU recipe does after ~1,750 steps on a fast GPU, or a too-high lr); None when the last is (about)
    the best, or when the files needed to tell are missing (the command itself then says what is wrong)."""
    last = last_val_loss(run_dir)
    if last is None:
        return None
    last_step, last_val = last
    try:
        best = ckpt.find_checkpoint(Path(run_dir).expanduser(), "best")
        if best is None:
            return None
        best_info = read_json(best / ckpt.MANIFEST_FILE)
        best_step, best_val = best_info["step"], float(best_info["val_loss"])
    except (FunGPTError, OSError, ValueError, KeyError, TypeError):
        return None
    if not best_step < last_step or not math.isfinite(best_val):
        return None
    if not math.isfinite(last_val) and best_step == 0:  # (the starting weights: nothing to point at)
        return None
    if not math.isfinite(last_val):  # (nan > best is False: a diverged run's last checkpoint was not named)
        return (f"fungpt: note: the last checkpoint (step {last_step:,}) has val loss {last_val}: its training "
                f"diverged; the run's best (step {best_step:,}, val loss {best_val:.4f}) does not: pass --checkpoint "
                f"best to use that one")
    if not last_val > best_val + OVERFIT_MARGIN:
        return None
    return (f"fungpt: note: the last checkpoint (step {last_step:,}, val loss {last_val:.4f}) has a higher val loss "
            f"than the run's best (step {best_step:,}, val loss {best_val:.4f}); pass --checkpoint best to use that "
            f"one")


def data_dir_of(run_dir: str | Path) -> Path:
    """The prepared dataset folder a run was trained on (recorded in run.json)."""
    info = Path(run_dir) / "run.json"
    try:
        data_dir = read_json(info)["data_dir"]
        if not isinstance(data_dir, str):
            raise TypeError
        return Path(data_dir)
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # (a JSONDecodeError is a ValueError)
        raise FunGPTError(f"{info} is missing or corrupt: cannot tell which data {run_dir} was trained on; "
                          f"pass --input TEXT_FILE") from None


def check_seed(seed: int) -> None:
    """Refuse a seed outside 0 .. 2**63 - 1. torch's generators also take negative seeds, as the same 64 bits as a
    large one (-1 is 2**64 - 1): one range, the training seed's and the explorer's, keeps one seed one text
    everywhere."""
    check_number(seed, "--seed", whole=True)
    if not 0 <= seed < 2**63:
        raise FunGPTError(f"--seed {seed} is out of range: use a whole number from 0 to 2**63 - 1")


def seeded_generator(seed: int, device: str) -> torch.Generator:
    check_seed(seed)
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))  # (a numpy integer: as a Python int, which manual_seed takes)
    return g
