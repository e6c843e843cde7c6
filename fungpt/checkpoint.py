"""Crash-safe checkpoints that never execute code when loaded.

Layout inside a run folder:

    out_dir/
      latest.json                  pointer: {"step": 500, "dir": "checkpoints/latest-0000500"}
      best.json                    pointer to the weights with the best val loss so far
      checkpoints/latest-0000500/
        model.safetensors          weights of the plain (uncompiled, unwrapped) model
        state.pt                   optimizer, step, RNG and loader state, best val loss, tokens seen, and the
                                   run's clock (elapsed time, measured durations, schedule origins: budget.py);
                                   tensors and plain types only
        manifest.json              step, model and train config, tokenizer and data fingerprints, and the size
                                   and sha256 of every file above

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

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from fungpt.errors import FunGPTError, is_out_of_memory, parse_json, read_json, utf8_path

KINDS = ("latest", "best")  # checkpoints/{kind}-{step:07d}[.n] folders, see save_checkpoint
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"


def fsync(fd: int) -> None:
    """os.fsync, made durable on macOS too: there fsync hands the data to the drive, whose own cache may still lose
    it in a power cut; F_FULLFSYNC asks the drive to write it through (where it is not supported: fsync)."""
    if sys.platform == "darwin":
        import fcntl

        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except (OSError, AttributeError):
            pass
    os.fsync(fd)


def sync_folder(folder: Path) -> None:
    """fsync each file in `folder`, and the folder, before it (or its files) is renamed into place: after a power
    loss, a name that stands for a complete dataset or export never holds files that were still only in memory."""
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            with open(path, "r+b") as f:  # (opened for writing: Windows commits only such a file)
                fsync(f.fileno())
    fsync_dir(folder)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path, h=None) -> str:
    """The sha256 of a file, read 1 MB at a time; with `h`, the file's bytes go on into that hash."""
    h = hashlib.sha256() if h is None else h
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def temp_stem(name: str) -> str:
    """The start of a temporary name made from `name`: at most 100 bytes of it in UTF-8 (whole characters), so that
    with what is added the temporary stays within the file systems' 255-byte limit on a name (a valid 249-character
    --out failed with "File name too long"; 80 CJK characters are 240 bytes). A name of up to 100 bytes is kept
    whole, its bytes that are not UTF-8 (Python's surrogate escapes) included; a longer one is cut at a character
    and ends in a hash of the whole name, so that two long names that begin alike keep temporaries of their own."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= 100:
        return name
    kept, size = 0, 0
    for ch in name:
        size += len(ch.encode("utf-8", "surrogateescape"))
        if size > 91:  # (91 bytes + "~" + 8 hex digits = 100)
            break
        kept += 1
    return f"{name[:kept]}~{hashlib.sha256(raw).hexdigest()[:8]}"


STALE_TEMP_S = 3600  # a temporary untouched this long was left by a command that was killed (no live one is so slow)


def remove_stale_temps_named(folder: Path, pattern: str, holding: Collection[str] | None = None) -> None:
    """Delete the temporaries in `folder` whose whole name matches the regex `pattern`, by age: nothing in them
    written for STALE_TEMP_S. A command killed before it could clean up (kill -9, out of memory, power loss) leaves
    them; a live command's are younger. (Not by process id: another machine or container can share the folder.)
    holding: the temporaries are folders (a command's mkdtemp), removed only when they hold nothing but these files
    and hidden temporaries (.NAME.tmp-...): a file or folder of the user's whose name happens to match is never
    taken for one. None: the temporaries are files."""
    name, now = re.compile(pattern), time.time()
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            with contextlib.suppress(OSError):
                if not name.fullmatch(path.name) or path.is_symlink():
                    continue
                if path.is_dir() != (holding is not None):
                    continue
                times = [path.stat().st_mtime]
                if holding is not None:
                    inside = list(path.iterdir())
                    ours = (p.is_file() and not p.is_symlink()
                            and (p.name in holding or p.name.startswith(".") and ".tmp-" in p.name) for p in inside)
                    if not all(ours):
                        continue
                    times += [p.lstat().st_mtime for p in inside]
                if now - max(times) > STALE_TEMP_S:
                    shutil.rmtree(path, ignore_errors=True) if holding is not None else path.unlink()


def file_in_the_way(path: Path) -> Path | None:
    """The file that stands where a folder of `path` should be (the nearest part of the path that exists, when it is
    not a folder), or None: mkdir says only "File exists" there, which names neither the file nor the fix."""
    above = next((p for p in path.parents if p.exists()), None)
    return above if above is not None and not above.is_dir() else None


def open_new_temp(path: Path, mode: str = "w"):
    """Create and open a temporary file next to `path`, named .NAME.tmp-PID-RANDOM, that did not exist before.

    O_CREAT | O_EXCL makes the open fail rather than reuse whatever already has that name, so a symlink
    planted there in advance (by another user of a shared folder) cannot redirect the write to a file
    elsewhere; the random part makes the name unguessable. Returns (temporary path, open file).
    """
    path = Path(path)
    tmp = path.with_name(f".{temp_stem(path.name)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    # (O_BINARY: on Windows os.open would otherwise open in text mode; newline="\n", that Python's text layer
    # writes "\n" as it is there too, not as "\r\n")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)  # (the umask applies to the mode)
    return tmp, os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that readers see either the old or the new content, never half."""
    try:
        _atomic_write_text(Path(path), text)
    except OSError as e:
        raise FunGPTError(f"could not write {path}: {e.strerror or e}; check free disk space and permissions") from None


def _atomic_write_text(path: Path, text: str) -> None:
    """atomic_write_text, its failure the OSError itself (save_checkpoint explains it by its errno)."""
    tmp = None
    try:
        tmp, f = open_new_temp(path)
        with f:
            f.write(text)
            f.flush()
            fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _write_file(path: Path, data: bytes) -> None:
    """Write bytes and fsync them: after this returns, the data is on disk, not just in a cache.

    Writing through our own file handle (rather than letting a library open the file) means a
    full disk or a read-only folder always surfaces as an OSError that save_checkpoint can explain.
    """
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        fsync(f.fileno())


def _fresh_folder(parent: Path, kind: str, step: int) -> Path:
    """A folder name for a new checkpoint that no existing folder (above all, the current one) has.

    Saving twice at the same step happens (a resume that is interrupted at once, or a final eval at a
    step that was saved but not evaluated). Deleting the old folder to reuse its name would open a window in
    which the pointer names a folder that does not exist, so the second one gets a suffix.
    """
    final = parent / f"{kind}-{step:07d}"
    n = 1
    while final.exists():
        final = parent / f"{kind}-{step:07d}.{n}"
        n += 1
    return final


def tokenizer_fingerprint(directory: str | Path) -> str | None:
    """sha256 over the tokenizer files in `directory` (tokenizer_meta.json and the file it names).

    Stored in each checkpoint's manifest, so that loading can tell when the tokenizer next to the
    weights was replaced by a different one. None when the folder has no tokenizer.
    """
    meta = Path(directory) / "tokenizer_meta.json"
    if not meta.is_file():
        return None
    h = hashlib.sha256(meta.read_bytes())
    try:
        extra = read_json(meta).get("file")
    except (ValueError, AttributeError):
        extra = None
    # (only a file of this folder, by its bare name, as load_tokenizer reads it: never one that the file names
    # elsewhere, /etc/passwd or ../../big.iso, read whole)
    if isinstance(extra, str) and Path(extra).name == extra and (Path(directory) / extra).is_file():
        _sha256(Path(directory) / extra, h)
    return h.hexdigest()


def save_checkpoint(out_dir: str | Path, kind: str, step: int, model: torch.nn.Module,
                    state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Atomically save the model's weights (and optionally the training state) as checkpoint `kind`.

    kind is "latest" (resumable, with state) or "best" (weights only). `model` must be the plain
    module, not a torch.compile or DDP wrapper, so the saved names are the model's own.
    Returns the checkpoint folder. On any write error (disk full, read-only folder) the previous
    checkpoint is left untouched and a FunGPTError explains what happened.
    """
    import io

    from safetensors.torch import save as safetensors_bytes

    out_dir = Path(out_dir)
    parent = out_dir / "checkpoints"
    tmp = parent / f".{kind}-{step:07d}.tmp-{os.getpid()}"
    final = tmp  # replaced below; named here so the error path can always refer to it
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
        _write_file(tmp / MODEL_FILE, safetensors_bytes(tensors))
        files = [MODEL_FILE]
        if state is not None:
            buf = io.BytesIO()
            torch.save(state, buf)
            _write_file(tmp / STATE_FILE, buf.getvalue())
            files.append(STATE_FILE)
        manifest = {"step": step, "kind": kind, **(extra or {}),
                    "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}}
        _write_file(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode("utf-8"))
        fsync_dir(tmp)  # the files' names in it are durable too, before the folder is renamed into place
        final = _fresh_folder(parent, kind, step)
        os.replace(tmp, final)  # the complete folder appears under its final name in one step
        fsync_dir(parent)
        rel = final.relative_to(out_dir).as_posix()
        _atomic_write_text(out_dir / f"{kind}.json", json.dumps({"step": step, "dir": rel}))
    except (OSError, FunGPTError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if final != tmp and not _pointer_names(out_dir, kind, final):
            shutil.rmtree(final, ignore_errors=True)  # renamed, but the pointer could not be switched
        why = str(e)
        if isinstance(e, OSError) and e.strerror:  # named: "Not a directory" alone named neither the file nor the fix
            named = e.filename2 or e.filename  # (a rename's: the target that is in the way, not the source)
            blocker = file_in_the_way(Path(named)) if named else None
            why = (f"{blocker} is a file where a folder is needed" if blocker is not None
                   else f"{e.strerror} ({named})" if named else e.strerror)
        try:  # (a pointer damaged by hand must not hide this error behind its own)
            before = find_checkpoint(out_dir, kind)  # (a pointer missing: the newest complete folder, as resume finds)
        except FunGPTError:
            before = None
        kept = "the previous checkpoint is intact" if before is not None else f"there is no {kind} checkpoint yet"
        fix = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space",
               errno.EACCES: "fix the folder's permissions", errno.EPERM: "fix the folder's permissions",
               errno.EROFS: "train where the disk is writable"}.get(getattr(e, "errno", None), "fix what it names")
        # (without a latest checkpoint a resume has nothing to continue: the run is trained again)
        try:
            latest = before if kind == "latest" else find_checkpoint(out_dir, "latest")
        except FunGPTError:  # (a damaged pointer with no folder: nothing to resume either)
            latest = None
        then = "resume with --resume" if latest is not None else "run again with --resume: it starts over"
        raise FunGPTError(f"could not save the {kind} checkpoint at step {step} in {out_dir}: {why}; "
                          f"{kept} ({fix}, then {then})") from None
    except (Exception, KeyboardInterrupt):  # (memory running out, Ctrl-C: no half-written folder left, maybe GBs)
        shutil.rmtree(tmp, ignore_errors=True)
        if final != tmp and not _pointer_names(out_dir, kind, final):
            shutil.rmtree(final, ignore_errors=True)
        raise
    # Only now that the pointer names the new folder is it safe to delete the old ones (and any
    # temporary folder left behind by a run that was killed in the middle of a save).
    for old in checkpoint_folders(out_dir, kind, temporaries=True):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    # And a killed save's temporary of the other kind (a `best` killed half way, in a run that then never improved on
    # it: as large as the weights, and kept for good). Saves run one after the other, so none is being written.
    for stale in parent.glob(f".{'best' if kind == 'latest' else 'latest'}-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def folder_step(folder: Path) -> int:
    """The step a checkpoint folder was saved at, by its name (KIND-STEP or KIND-STEP.N)."""
    return int(folder.name.split("-", 1)[1].partition(".")[0])


def saved_step(out_dir: str | Path, kind: str) -> int | None:
    """The step of the run's `kind` checkpoint, None if it has none (or its pointer or folder name is damaged: a
    note that asks does without it)."""
    try:
        folder = find_checkpoint(out_dir, kind)
        return folder_step(folder) if folder is not None else None
    except (FunGPTError, ValueError, IndexError):
        return None


def checkpoint_folders(out_dir: Path, kind: str, temporaries: bool = False) -> list[Path]:
    """The `kind` checkpoint folders in out_dir/checkpoints, by the names saving gives them (KIND-STEP or
    KIND-STEP.N: a copy a user keeps there under another name, e.g. latest-0000040-keep, is not one); with
    temporaries, also half-written ones left by a save that was killed (.KIND-STEP.tmp-PID)."""
    parent = Path(out_dir) / "checkpoints"
    ours = re.compile(rf"{re.escape(kind)}-\d{{7,}}(\.\d+)?")
    return [*(p for p in parent.glob(f"{kind}-*") if ours.fullmatch(p.name)),
            *(parent.glob(f".{kind}-*.tmp-*") if temporaries else [])]


def _pointer_names(out_dir: Path, kind: str, folder: Path) -> bool:
    try:
        return find_checkpoint(out_dir, kind) == folder
    except FunGPTError:
        return False


def find_checkpoint(out_dir: str | Path, kind: str = "latest") -> Path | None:
    """The folder the `kind` pointer names, or None if the run has no such checkpoint yet.

    Without a readable pointer (deleted, or damaged) the newest complete `kind` folder is taken: a
    folder gets its final name only once all its files are written (save_checkpoint), so it is
    whole. Starting over instead would delete it at the first save.
    """
    pointer = Path(out_dir) / f"{kind}.json"
    if not pointer.is_file():
        return _newest_folder(Path(out_dir), kind)
    try:
        rel = read_json(pointer)["dir"]
        if not isinstance(rel, str):
            raise TypeError(f"dir is a {type(rel).__name__}")  # e.g. {"dir": 5}: corrupt like the cases below
        if Path(rel).parent != Path("checkpoints") or Path(rel).name in ("", ".", ".."):  # checkpoints/NAME only
            raise ValueError(f"dir {rel!r} is not a folder of {Path(out_dir) / 'checkpoints'}")
    except (ValueError, KeyError, TypeError):  # (a JSONDecodeError or UnicodeDecodeError is a ValueError)
        newest = _newest_folder(Path(out_dir), kind)
        if newest is None:
            raise FunGPTError(f"{pointer} is corrupt and {Path(out_dir) / 'checkpoints'} holds no complete checkpoint; "
                              f"delete {pointer.name} to start over, or restore the run from a backup") from None
        return newest
    return Path(out_dir) / rel


def _newest_folder(out_dir: Path, kind: str) -> Path | None:
    """The `kind` checkpoint folder with the highest step (then suffix, see _fresh_folder) that has a manifest."""

    def order(folder: Path) -> tuple[int, int]:
        step, _, n = folder.name[len(kind) + 1:].partition(".")  # "latest-0000030.1" -> ("0000030", "1")
        return int(step), int(n or 0)

    folders = []
    for folder in checkpoint_folders(out_dir, kind):
        with contextlib.suppress(ValueError):
            folders.append((order(folder), folder))
    complete = [f for _, f in sorted(folders, reverse=True) if (f / MANIFEST_FILE).is_file()]
    return complete[0] if complete else None


def verify_checkpoint(ckpt_dir: Path, weights_only: bool = False) -> dict[str, Any]:
    """Check every file against the manifest's size and sha256; return the manifest.

    weights_only: check only the weights (for sample, eval, export: a damaged state.pt, the optimizer's, does not
    keep them from using the weights; a resume needs it whole)."""
    manifest_path = ckpt_dir / MANIFEST_FILE
    if not ckpt_dir.is_dir():
        raise FunGPTError(f"checkpoint folder {ckpt_dir} is missing (the pointer file names it); "
                          f"restore it from a backup or train again")
    try:
        manifest = read_json(manifest_path)
        files = manifest["files"]
        expected = {name: (int(info["bytes"]), str(info["sha256"])) for name, info in files.items()}
        int(manifest["step"])
    except FileNotFoundError:
        raise FunGPTError(f"checkpoint {ckpt_dir} has no {MANIFEST_FILE}: it is incomplete or not a FunGPT "
                          f"checkpoint; restore it or train again") from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):  # (OverflowError: int(Infinity))
        raise FunGPTError(f"{manifest_path} is corrupt; the checkpoint cannot be trusted: restore it or train "
                          f"again") from None
    if MODEL_FILE not in expected:
        raise FunGPTError(f"{manifest_path} lists no {MODEL_FILE}; the checkpoint cannot be trusted: restore it or "
                          f"train again")
    if any(Path(name).name != name or name in (".", "..") for name in expected):  # (files of this folder only)
        raise FunGPTError(f"{manifest_path} names a file outside its folder; the checkpoint cannot be trusted: "
                          f"restore it or train again")
    for name, (size, sha) in expected.items():
        path = ckpt_dir / name
        if weights_only and name != MODEL_FILE:
            continue
        if not path.is_file():
            raise FunGPTError(f"checkpoint file {path} is missing; restore it or train again")
        if path.stat().st_size != size:
            raise FunGPTError(f"checkpoint file {path} is truncated or corrupt ({path.stat().st_size} bytes, "
                              f"{MANIFEST_FILE} says {size}); restore it or train again")
        if _sha256(path) != sha:
            raise FunGPTError(f"checkpoint file {path} is corrupt (its sha256 does not match {MANIFEST_FILE}); "
                              f"restore it or train again")
    return manifest


# [model] settings that weights do not depend on: where training started, and dropout (a resume may change it)
NOT_ARCHITECTURE = frozenset({"init_from", "dropout"})


def not_architecture(model: dict[str, Any]) -> frozenset[str]:
    """The fields of a model config (as a dict) that do not change what its weights mean: NOT_ARCHITECTURE, and
    rope_base where the positions are not rotary (it plays no part there: a learned-position run was refused as
    "a different model" for an edited rope_base)."""
    return NOT_ARCHITECTURE | ({"rope_base"} if model.get("pos_encoding") != "rope" else frozenset())


def check_model_config(manifest: dict[str, Any], ckpt_dir: Path, model_config: dict[str, Any],
                       config_path: Path) -> None:
    """Refuse weights that were trained with a different architecture than `model_config` asks for.

    The manifest records the model config the weights were saved with (checkpoints written
    before that was recorded are checked by tensor names and shapes in load_weights instead).
    """
    saved = manifest.get("model")
    if not isinstance(saved, dict):
        return
    diffs = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in model_config.items()
             if k in saved and k not in not_architecture(model_config) and saved[k] != v]
    if diffs:
        raise FunGPTError(f"checkpoint {ckpt_dir} was trained with a different model than {config_path} asks for "
                          f"({'; '.join(diffs)}); use the original settings or retrain")


# The dtypes the file may hold for a floating-point tensor of the model (FunGPT saves float32; a cast by hand may
# give the others). An int8 or complex one was cast without a word (sampling garbage, or a raw warning). (A buffer
# of a model edited to hold one, a bool mask, an int counter, is saved and loaded as it is.)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# A model this much larger than its weights file is built without comparing shapes first: it takes no time
BUILD_WITHOUT_CHECK_BYTES = 64 << 20


def check_weights_before_building(ckpt_dir: Path, config, config_path: Path) -> None:
    """Refuse a config whose model is far larger than the weights saved for it, before building that model.

    A run folder from elsewhere can hold a config.json (and manifest.json) of n_layer 64 x n_embd 8192 beside the
    weights of a small model: building it first filled tens of GB with random weights, only to find they do not
    fit. Reading the file's header is cheap; when the config asks for more than twice the bytes the file holds
    (by an estimate of GPT's parameters and tables: 12 C^2 a block, V C, and block_size C for the positions, which
    RoPE and 'none' have not: then an extra shape check on the meta device, never a wrong refusal), the
    model is built on the meta device (no memory, ~1 s) and its shapes compared with the file's; a header that
    cannot be read is refused then, before the build. An ordinary run never gets that far.
    """
    from safetensors import safe_open

    path = ckpt_dir / MODEL_FILE
    c = config
    at_least = 4 * (12 * c.n_layer * c.n_embd**2 + (c.vocab_size + c.block_size) * c.n_embd)  # float32 bytes
    try:
        if at_least <= 2 * path.stat().st_size + BUILD_WITHOUT_CHECK_BYTES:
            return
    except OSError:  # (missing: load_weights says so)
        return
    try:
        if utf8_path(path) is None:  # (the library opens UTF-8 paths only)
            saved = {name: shape for name, (_, shape) in safetensors_header(path).items()}
        else:
            with safe_open(str(path), "pt") as f:
                saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - (not safetensors: the model it would have been built for is not built)
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise FunGPTError(f"cannot read {path} ({why}): the checkpoint is damaged; resume from a good copy of the "
                          f"run, or train it again") from None
    from fungpt.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    wanted, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():  # (a tied weight is one tensor: saved once, first)
        if id(t) not in seen:
            seen.add(id(t))
            wanted[name] = tuple(t.shape)
    if saved != wanted:
        numbers = sum(math.prod(s) for s in saved.values())
        raise FunGPTError(f"weights in {path} ({numbers:,} numbers) do not fit the model that {config_path} "
                          f"describes ({model.num_params():,} parameters): the run folder is damaged, or its "
                          f"config was edited")


# The bytes of one number of each safetensors dtype (its format's names)
SAFETENSORS_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                          "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's (dtype, shape) in a .safetensors file, from its header alone (8 bytes of the header's length,
    then its JSON): for a path the library cannot open (not UTF-8), without reading the numbers. What the library
    refuses raises ValueError here too: a header that is not safetensors' (its text, a dtype, a shape or offsets of
    another kind), or numbers that do not fill the rest of the file exactly, each tensor's bytes its shape's."""
    def whole(x) -> bool:
        return type(x) is int and x >= 0  # (not a bool, a float, a negative size)

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= 100_000_000:  # (the library's own bound on a header)
            raise ValueError(f"a header of {n} bytes")
        raw = f.read(n)
    if len(raw) != n:
        raise ValueError(f"a header of {n} bytes in a file of {path.stat().st_size}")
    try:
        header = parse_json(raw.decode("utf-8"))  # (strictly UTF-8, no byte-order mark, as the library reads it)
    except UnicodeDecodeError:
        raise ValueError("a header that is not UTF-8") from None
    if not isinstance(header, dict):
        raise ValueError("a header that is no JSON object")
    tensors, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise ValueError("__metadata__ is not a map of strings")
            continue
        ok = isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}
        dtype, shape, offsets = (info.get("dtype"), info.get("shape"), info.get("data_offsets")) if ok else (0, 0, 0)
        if not (ok and dtype in SAFETENSORS_ITEM_BYTES and isinstance(shape, list) and all(map(whole, shape))
                and isinstance(offsets, list) and len(offsets) == 2 and all(map(whole, offsets))
                and offsets[1] - offsets[0] == math.prod(shape) * SAFETENSORS_ITEM_BYTES[dtype]):
            raise ValueError(f"{name}'s entry in the header is not safetensors'")
        tensors[name] = (dtype, tuple(shape))
        spans.append(tuple(offsets))
    at = 0
    for start, end in sorted(spans):  # the numbers fill the rest of the file, tensor after tensor
        if start != at:
            raise ValueError("the tensors' numbers overlap or leave a gap")
        at = end
    if at != path.stat().st_size - 8 - n:
        raise ValueError("the numbers do not fill the file: it is cut short or has bytes past them")
    return tensors


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file. (The library opens UTF-8 paths only: a folder name that is not UTF-8 is
    read through the file's bytes.)"""
    from safetensors.torch import load, load_file

    name = utf8_path(path)
    return load_file(name) if name is not None else load(path.read_bytes())


def load_weights(ckpt_dir: Path, model: torch.nn.Module) -> None:
    """Load verified safetensors weights into `model` (which re-ties shared weights itself).

    safetensors is a plain format (a JSON header, then raw numbers): reading it never runs code.
    A file that is not safetensors (e.g. a pickle renamed to model.safetensors) is refused.
    """
    path = ckpt_dir / MODEL_FILE
    try:
        tensors = read_safetensors(path)
    except FileNotFoundError:  # (deleted since it was verified: a training run replaced this checkpoint)
        raise FunGPTError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header
        if is_out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FunGPTError(f"could not read weights from {path}: it is not a valid safetensors file "
                          f"({first[:120]})") from None
    own = model.state_dict()
    odd = next(((name, t.dtype) for name, t in tensors.items()
                if name in own and own[name].is_floating_point() and t.dtype not in WEIGHT_DTYPES), None)
    if odd is not None:
        raise FunGPTError(f"weights in {path} hold {odd[0]} as {str(odd[1]).removeprefix('torch.')}, not as "
                          f"floating-point numbers: not weights that FunGPT saved; restore the checkpoint or train "
                          f"again")
    # (a run that diverges stops before it saves: NaN or inf here came from elsewhere, and eval printed "loss nan",
    # export wrote them on, a resume blamed the lr)
    params = dict(model.named_parameters(remove_duplicate=False))  # (a buffer of an edited model may hold -inf)
    bad = next((name for name, t in tensors.items()
                if name in params and t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise FunGPTError(f"weights in {path} hold values that are not finite numbers (NaN or inf) in {bad}, which "
                          f"FunGPT never saves (a run that diverges stops first); restore the checkpoint or train "
                          f"again")
    changed = "was the config, or the model code (fungpt/model.py), changed since it was trained?"
    tied = _tied_names(model)
    for name, first in tied.items():
        # Both loaded into one shared tensor, the second would silently overwrite the first: a model trained
        # untied (an edit of model.py), loaded into the tied one, gave garbage and no error.
        if name in tensors and first in tensors and not torch.equal(tensors[name], tensors[first]):
            raise FunGPTError(f"weights in {path} hold {name} apart from {first}, but the model built from the "
                              f"config ties the two; {changed}")
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape: the model config differs from the weights'
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise FunGPTError(f"weights in {path} do not fit the model built from the config "
                          f"({(lines or [str(e)])[0][:200]}); {changed}") from None
    # lm_head.weight is stored once under the embedding's name when the two are tied.
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise FunGPTError(f"weights in {path} do not match the model built from the config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]}); {changed}")


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter that shares storage with an earlier one (and so was not saved), with that earlier one's name."""
    first_of: dict[int, str] = {}
    tied = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in first_of:
            tied[name] = first_of[t.data_ptr()]
        first_of.setdefault(t.data_ptr(), name)
    return tied


# the keys every version of state.pt holds; later ones (tokens, timings, schedule origins) are read with .get
STATE_KEYS = ("step", "best_val", "elapsed_s", "optimizer", "loader", "rng")


def check_torch_file(path: Path) -> None:
    """Refuse a torch.save file whose records are compressed before it is read: torch.save stores them as they are,
    so what loading reads is at most the file's size, while a compressed record can unpack to any size (a 98 KB
    file was read as 100 MB). Not a zip (an older format, a damaged file): torch.load says what it is."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            packed = next((i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED), None)
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    if packed is not None:
        raise FunGPTError(f"refusing to load {path}: its record {packed} is compressed, which torch.save never "
                          f"writes (it could unpack to any size); save it again with torch.save")


def check_tensors_fit_their_storage(obj: Any, path: Path) -> None:
    """Refuse tensors (in nested dicts, lists and tuples) that claim more numbers than their storage holds: a view of
    one number with stride 0 reads as a tensor of any size (a 1.7 KB file as 4 TB once copied), which torch.save
    never writes for a model's or an optimizer's tensors."""
    if isinstance(obj, torch.Tensor):
        if obj.numel() * obj.element_size() > obj.untyped_storage().nbytes():
            raise FunGPTError(f"{path} is damaged: a tensor of shape {tuple(obj.shape)} claims more numbers than the "
                              f"file holds for it; download or save it again")
    elif isinstance(obj, dict):
        for value in obj.values():
            check_tensors_fit_their_storage(value, path)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            check_tensors_fit_their_storage(value, path)


def load_state(ckpt_dir: Path) -> dict[str, Any]:
    """Load the training state with weights_only=True: tensors and plain containers, never code.

    A pickle can name any Python function to call while it is read (that is how the classic
    "malicious checkpoint" works). weights_only=True swaps in an unpickler that only accepts
    tensors, numbers, strings and containers, and refuses everything else before calling it.
    """
    path = ckpt_dir / STATE_FILE
    check_torch_file(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the error below says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FunGPTError(f"{path} is missing: this checkpoint holds weights only and cannot be resumed") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError for anything unsafe, others for corrupt bytes
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        detail = (detail.split(". ")[0] or type(e).__name__)[:160]  # (its first sentence: torch's go on for lines)
        if "PytorchStreamReader" in detail or isinstance(e, EOFError):  # a file cut short or damaged: nothing was read
            raise FunGPTError(f"cannot load {path}: the file is damaged (truncated or corrupt: {detail}); "
                              f"resume from a good copy of the run, or train it again") from None
        raise FunGPTError(f"refusing to load {path}: it is not a plain tensor checkpoint, nothing in it was run "
                          f"({detail})") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise FunGPTError(f"{path} is not a FunGPT training state (expected the keys {', '.join(STATE_KEYS)})")
    check_tensors_fit_their_storage(state, path)
    return state
