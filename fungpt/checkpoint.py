"""Crash-safe checkpoints that never execute code when loaded.

Layout inside a run folder:

    out_dir/
      latest.json                  pointer: {"step": 500, "dir": "checkpoints/latest-000500"}
      best.json                    pointer to the weights with the best val loss so far
      checkpoints/latest-000500/
        model.safetensors          weights of the plain (uncompiled, unwrapped) model
        state.pt                   optimizer, step, RNG and loader state; tensors and plain types only
        manifest.json              step plus the size and sha256 of every file above

Why this shape: a checkpoint is several files, and a kill -9 (or a full disk) can strike
between any two writes. So every checkpoint is written into a fresh temporary folder,
each file is fsynced, the folder is renamed into place, and only then is the small
pointer file replaced (write a temp file, fsync, `os.replace`, which is atomic on POSIX
and Windows). At every instant the pointer names a complete, verified checkpoint: the old
one until the very last rename, the new one after it. Older folders are deleted last.

Why safetensors and `weights_only=True`: a pickle file can run arbitrary code when it is
loaded, so a checkpoint downloaded from a stranger could take over the machine. Weights
live in safetensors (a plain tensor format), and the training state is loaded with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from fungpt.errors import FunGPTError

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that readers see either the old or the new content, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FunGPTError(f"could not write {path}: {e.strerror or e}; check free disk space and permissions") from None
    _fsync_dir(path.parent)


def save_checkpoint(out_dir: str | Path, kind: str, step: int, model: torch.nn.Module,
                    state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Atomically save the model's weights (and optionally the training state) as checkpoint `kind`.

    kind is "latest" (resumable, with state) or "best" (weights only). `model` must be the plain
    module, not a torch.compile or DDP wrapper, so the saved names are the model's own.
    Returns the checkpoint folder. On any OS error (disk full, read-only folder) the previous
    checkpoint is left untouched and a FunGPTError explains what happened.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    final = out_dir / "checkpoints" / f"{kind}-{step:07d}"
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # Tied weights (wte and lm_head) share storage; safetensors refuses shared tensors,
        # so store each name once and let the model re-tie them when it loads.
        tensors, seen = {}, set()
        for name, t in model.state_dict().items():
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            tensors[name] = t.detach().contiguous().cpu()
        save_file(tensors, str(tmp / MODEL_FILE))
        files = [MODEL_FILE]
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
            files.append(STATE_FILE)
        manifest = {"step": step, "kind": kind, **(extra or {}),
                    "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        for f in [*files, MANIFEST_FILE]:
            with (tmp / f).open("rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)  # a leftover from a run killed after this point
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        rel = final.relative_to(out_dir).as_posix()
        atomic_write_text(out_dir / f"{kind}.json", json.dumps({"step": step, "dir": rel}))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FunGPTError(f"could not save the {kind} checkpoint at step {step} in {out_dir}: {e.strerror or e}; "
                          f"the previous checkpoint is intact (free some disk space or fix permissions, "
                          f"then resume with --resume)") from None
    # Only now that the pointer names the new folder is it safe to delete the old ones.
    for old in final.parent.glob(f"{kind}-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out_dir: str | Path, kind: str = "latest") -> Path | None:
    """The folder the `kind` pointer names, or None if the run has no such checkpoint yet."""
    pointer = Path(out_dir) / f"{kind}.json"
    if not pointer.is_file():
        return None
    try:
        rel = json.loads(pointer.read_text(encoding="utf-8"))["dir"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise FunGPTError(f"{pointer} is corrupt; delete it to fall back to starting over, "
                          f"or restore it from a backup") from None
    return Path(out_dir) / rel


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Check every file against the manifest's size and sha256; return the manifest."""
    manifest_path = ckpt_dir / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        raise FunGPTError(f"checkpoint {ckpt_dir} has no {MANIFEST_FILE}: it is incomplete or not a FunGPT "
                          f"checkpoint") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise FunGPTError(f"{manifest_path} is corrupt; the checkpoint cannot be trusted") from None
    for name, info in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise FunGPTError(f"checkpoint file {path} is missing")
        if path.stat().st_size != info["bytes"] or _sha256(path) != info["sha256"]:
            raise FunGPTError(f"checkpoint file {path} is corrupt or truncated (its size or sha256 does not match "
                              f"{MANIFEST_FILE}); restore it or train again")
    return manifest


def load_weights(ckpt_dir: Path, model: torch.nn.Module) -> None:
    """Load verified safetensors weights into `model` (which re-ties shared weights itself)."""
    from safetensors.torch import load_file

    path = ckpt_dir / MODEL_FILE
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise FunGPTError(f"could not read weights from {path}: {e}") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # lm_head.weight is stored once under the embedding's name when the two are tied.
    missing = [m for m in missing if m not in _tied_names(model)]
    if missing or unexpected:
        raise FunGPTError(f"weights in {path} do not match the model built from the config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was the config changed?")


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (and so were not saved)."""
    seen, tied = set(), set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            tied.add(name)
        seen.add(t.data_ptr())
    return tied


def load_state(ckpt_dir: Path) -> dict[str, Any]:
    """Load the training state with weights_only=True: tensors and plain containers, never code."""
    path = ckpt_dir / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FunGPTError(f"{path} is missing: this checkpoint holds weights only and cannot be resumed") from None
    except Exception as e:  # torch raises UnpicklingError (and others) for anything unsafe or corrupt
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FunGPTError(f"refusing to load {path}: it is not a plain tensor checkpoint ({first[:160]})") from None
