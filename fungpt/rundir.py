"""A run's folder (out_dir): which files are a run's, the lock that keeps two commands from training into it at once,
and the checks before a run starts there: never mix two runs in one folder, nor resume with another model, or onto
data tokenized or split otherwise (check_out_dir: before the data is prepared, which can take minutes)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

try:
    import fcntl  # the out_dir lock (lock_out_dir); POSIX only
except ImportError:  # Windows: runs go unlocked
    fcntl = None

from fungpt import checkpoint as ckpt
from fungpt import pretrained
from fungpt.config import DataConfig, RunConfig, is_hf_config, load_run_config
from fungpt.data import is_prepared, system_file
from fungpt.errors import FunGPTError, read_json
from fungpt.tokenizer import BPE_FILE as TOKENIZER_BPE_FILE
from fungpt.tokenizer import DEFAULT_BPE_VOCAB, TOKENIZER_TEMP, load_tokenizer
from fungpt.tokenizer import META_FILE as TOKENIZER_META_FILE

# What a training run writes into its out_dir, and so all that --overwrite deletes there: the folder may
# hold the user's own files too (a run in the current folder, notes next to the checkpoints). config.json
# comes last: until it is gone the folder still counts as a run, so a failed --overwrite can be repeated.
RUN_FILES = ("run.json", "metrics.jsonl", "latest.json", "best.json", "loss.png", TOKENIZER_META_FILE,
             TOKENIZER_BPE_FILE, "config.json")


def foreign_run_files(out: Path) -> list[str]:
    """The files in out named as a run's (RUN_FILES, but config.json, which holds_run reads) that no FunGPT run
    wrote, by their contents: a project's own tokenizer.json or metrics.jsonl beside a run config copied in
    (`fungpt train --config config.json --out-dir .`) was deleted as a run's that never saved, or overwritten.
    loss.png, written at a run's end, cannot be told apart: where a run trained (it saved a checkpoint, or wrote its
    run.json; one that trained no step draws a plot too) it is the run's, and elsewhere it is foreign (a run config
    copied in wrote neither)."""
    meta_keys = {"run.json": "device", "latest.json": "dir", "best.json": "dir", TOKENIZER_META_FILE: "kind"}

    def ran_here() -> bool:  # (a checkpoint, or a run.json that a run wrote)
        return bool(_run_checkpoints(out)) or ((out / "run.json").is_file() and ours(out / "run.json"))

    def ours(path: Path) -> bool:
        try:
            if path.name == "metrics.jsonl":
                with open(path, encoding="utf-8") as f:
                    first = f.readline()
                if first.startswith('{"step": '):  # (a run's row, even cut short by a full disk)
                    return True
                row = json.loads(first) if first.strip() else {"step": None}  # (empty: nothing to lose)
                return isinstance(row, dict) and "step" in row
            if path.name == "loss.png":
                return ran_here() or path.stat().st_size == 0
            if path.name in meta_keys:
                data = read_json(path)
                return isinstance(data, dict) and meta_keys[path.name] in data
            if path.name == TOKENIZER_BPE_FILE:  # (the file a bpe or hf tokenizer's meta names)
                meta = read_json(out / TOKENIZER_META_FILE)
                named = meta.get("file", path.name) if isinstance(meta, dict) else None
                return isinstance(meta, dict) and meta.get("kind") in ("bpe", "hf") and named == path.name
            return path.stat().st_size == 0
        except (OSError, ValueError, TypeError, FunGPTError):
            return False

    return [name for name in RUN_FILES if name != "config.json" and (out / name).is_file() and not ours(out / name)]


def _run_checkpoints(out: Path) -> list[Path]:
    """The checkpoint folders a run wrote under out/checkpoints, and their half-written temporaries."""
    return [p for kind in ckpt.KINDS for p in ckpt.checkpoint_folders(out, kind, temporaries=True)]


def holds_run(out: Path) -> bool:
    """Whether out holds a FunGPT training run: a config.json that loads as a run config, or, if that file is
    missing or damaged, a checkpoint of FunGPT's (a manifest in checkpoints/latest-* or best-*) or its
    tokenizer file. A config.json of anything else (a project, a Hugging Face model) is not a run."""
    if (out / "config.json").is_file():
        try:
            load_run_config(out)
            return True
        except FunGPTError:
            if is_hf_config(out / "config.json"):
                return False
    return (out / TOKENIZER_META_FILE).is_file() or any((p / ckpt.MANIFEST_FILE).is_file()
                                                        for p in _run_checkpoints(out))


def remove_run(out: Path) -> None:
    """Delete what the run in out wrote (its checkpoint folders, RUN_FILES, TensorBoard event files, and
    half-written temporaries); leave everything else in the folder alone."""
    try:
        for path in _run_checkpoints(out):
            if path.is_symlink() or not path.is_dir():
                path.unlink()
            else:
                shutil.rmtree(path)
        with contextlib.suppress(OSError):
            (out / "checkpoints").rmdir()  # only if nothing else is left in it
        for path in (out / "tensorboard").glob("events.out.tfevents.*"):
            path.unlink()
        for path in out.glob(".tokenizer.tmp-*"):  # (a tokenizer's save that was killed: the run is locked, none live)
            if re.fullmatch(TOKENIZER_TEMP, path.name) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
        for name in RUN_FILES:  # (a plot's temporary keeps its suffix: .loss.tmp-PID-RANDOM.png, plot.save_figure)
            stem, suffix = Path(name).stem, Path(name).suffix
            for path in [*out.glob(f".{name}.tmp-*"), *out.glob(f".{stem}.tmp-*{suffix}"), out / name]:
                path.unlink(missing_ok=True)
    except OSError as e:
        raise FunGPTError(f"could not remove the previous run's {e.filename or out}: {e.strerror or e}; "
                          f"fix that and pass --overwrite again, or choose another out_dir") from None


def saved_anything(out: Path) -> bool:
    """Whether the run in out saved trained weights: a checkpoint (whole or not) after step 0. Every run saves
    one at its end and on Ctrl-C, so a run without any stopped early (an error, out of memory, killed): nothing
    in it is worth keeping. (At step 0 the weights are the initial ones: the step-0 eval's best checkpoint, and
    the latest one a time-budget run writes to time its saves.)"""
    for folder in _run_checkpoints(out):
        name = folder.name.lstrip(".")  # "latest-0000030", "best-0000000.1", or a temporary ".best-0000000.tmp-42"
        step = name.partition("-")[2][:7]
        if not (step.isdigit() and int(step) == 0):
            return True
    return False


# While a run trains, its process holds an exclusive lock on this file in out_dir (flock: the system lets
# it go when the process ends, however it ends), so a second `fungpt train` into the same folder, with
# --resume or --overwrite or none, is refused instead of mixing or deleting a live run's files. The file
# stays; only the lock on it matters. It records who holds it, for the refusal's message.
LOCK_FILE = ".fungpt-train.lock"


def _in_use(out: Path, holder: str) -> FunGPTError:
    return FunGPTError(f"{out} is in use by a training run that is still going ({holder}): wait for it to end, "
                       f"stop it, or choose another out_dir")


class HoldsARun(FunGPTError):
    """out_dir already holds a run, and neither --resume nor --overwrite was given (a dry run adds a word to it)."""


def _holds_a_run(out: Path) -> HoldsARun:
    return HoldsARun(f"{out} already holds a training run: pass --resume to continue it, --overwrite to replace it, "
                     f"or choose another out_dir")


def lock_holder(out: Path) -> str | None:
    """Who holds out's run lock ("pid 123 on host, since 21:55:02"), or None if nobody does."""
    path = out / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a reader's lock: granted unless a run holds it
                return None  # (released as the file closes)
            except BlockingIOError:
                holder = f.read().strip()
                if holder.startswith(f"pid {os.getpid()} on {socket.gethostname()},"):
                    return None  # this process: a run checking the folder it has locked
                return holder or "another process"
    except OSError:
        return None  # unreadable, or a file system without locks: nothing to tell


def make_out_dir(out: Path) -> None:
    """Create the folder out (and its parents) unless it exists; an error says why in one line."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # a link to a folder that does not exist, out_dir's or one above it (mkdir says only "File exists")
        link = next((p for p in (out, *out.parents) if p.is_symlink() and not p.exists()), None)
        if link is not None:
            to = link.parent / os.readlink(link)  # (a relative link's target, from the link's folder)
            raise FunGPTError(f"cannot create out_dir {out}: {link} is a link to {to}, which does not exist; create "
                              f"that folder, or choose another --out-dir") from None
        raise FunGPTError(f"cannot create out_dir {out}: {e.strerror or e}") from None


@contextlib.contextmanager
def lock_out_dir(out: Path):
    """Create out if needed and hold its run lock until the block ends; refuse if another run holds it.

    Yields whether the lock is held (False on Windows and on file systems without locks)."""
    make_out_dir(out)
    if fcntl is None:
        yield False
        return
    try:  # never through a symbolic link (a copied or shared folder may hold one): it would overwrite its target
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        f = os.fdopen(fd, "r+", encoding="utf-8")
    except OSError as e:
        if e.errno == errno.ELOOP or (out / LOCK_FILE).is_symlink():
            raise FunGPTError(f"{out / LOCK_FILE} is a symbolic link, which training would write through; delete "
                              f"it (a run makes its own)") from None
        raise FunGPTError(f"cannot write {out / LOCK_FILE}: {e.strerror or e}; choose another out_dir") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise _in_use(out, holder) from None
        except OSError:  # a file system without locks (some network mounts): train unlocked, as before
            yield False
            return
        line = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}\n".encode()
        try:  # written past Python's buffer (whose flush at close could fail after the checks)
            os.ftruncate(fd, 0)
            done = 0
            while done < len(line):  # (a full disk can take part of it, then refuse the rest)
                done += os.pwrite(fd, line[done:], done)
        except OSError as e:  # the first thing a run writes: a full disk shows here
            raise FunGPTError(f"cannot write {out / LOCK_FILE}: {e.strerror or e}; free some disk space or choose "
                              f"another out_dir") from None
        yield True  # the lock goes when f closes


def check_out_dir(cfg: RunConfig, resume: bool, overwrite: bool, check_lock: bool = True) -> None:
    """Refuse a bad out_dir before any work (data preparation can take minutes); changes nothing.

    check_lock: also refuse a folder where a run is training (under torchrun only rank 0 asks: the lock
    may already be its own)."""
    out = Path(cfg.out_dir)
    if resume and overwrite:
        raise FunGPTError("--resume and --overwrite contradict each other: pick one")
    if out.exists() and not out.is_dir():
        raise FunGPTError(f"out_dir {out} is a file, not a folder: choose another out_dir")
    if (out / "meta.json").is_file() and (out / "train.bin").is_file():  # its tokenizer files look like a run's
        raise FunGPTError(f"out_dir {out} is a prepared dataset (meta.json, train.bin), which a run would damage: "
                          f"choose another out_dir, e.g. out/{out.name}")
    source = Path(cfg.data.path).expanduser()  # (as resolve_data reads it: "~/corpus" in a config file)
    if source.is_dir() and not is_prepared(source) and out.resolve().is_relative_to(source.resolve()):
        raise FunGPTError(f"out_dir {out} is inside data.path {cfg.data.path}: the run's files would become part of "
                          f"the corpus; choose an out_dir outside it")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)  # out, or the folder it will go in
    if existing is not None and existing.is_dir() and not os.access(existing, os.W_OK):
        raise FunGPTError(f"out_dir {out} is not writable; choose another out_dir or fix its permissions")
    holder = lock_holder(out) if check_lock else None
    if holder is not None:
        raise _in_use(out, holder)
    has_run = holds_run(out)
    if (out / "config.json").is_file() and not has_run:  # not one of ours: never overwrite or delete it
        raise FunGPTError(f"{out} holds a config.json that is not a FunGPT run's, which training would overwrite: "
                          f"choose another out_dir")
    if resume and not has_run:
        raise FunGPTError(f"nothing to resume in {out}: it holds no training run (drop --resume to start a new run)")
    # (without a lock, a run that has not saved yet may be live: then it is refused too)
    if has_run and not resume and not overwrite and (saved_anything(out) or fcntl is None):
        raise _holds_a_run(out)
    # A new run here writes its files over any of the same names (and a run that never saved is deleted first):
    # files of those names that no run wrote are the user's (--overwrite replaces a run that trained, not them)
    if not resume and not (has_run and saved_anything(out)) and (foreign := foreign_run_files(out)):
        raise FunGPTError(f"out_dir {out} holds {', '.join(foreign)}, named as a run's files but not written by "
                          f"FunGPT: training would replace them; move them elsewhere, or choose another out_dir")
    if resume:
        saved = load_run_config(out)  # a corrupt config.json is reported now, not after preparing the data
        ckpt.find_checkpoint(out)  # likewise a corrupt latest.json
        old, new = saved.data, cfg.data
        prepared = is_prepared(new.path)  # its own tokenizer; the fields go unused
        fine_tune = pretrained.is_pretrained(saved.model.init_from)  # encoded with the model's own tokenizer
        same_text = same_data_path(old.path, new.path)  # (./corpus.txt is corpus.txt)
        if same_text and not prepared and not fine_tune and tokenizer_setting(old) != tokenizer_setting(new):
            # (caught later too, by the tokenizer check, but only after a possibly long tokenizer training)
            raise FunGPTError(f"cannot resume {out}: it was trained on {old.path} with data.tokenizer = "
                              f"{tokenizer_setting(old)}, not {tokenizer_setting(new)}; resume with the original "
                              f"data settings or train into a new out_dir")
        if same_text and not prepared and old.val_fraction != new.val_fraction:
            raise FunGPTError(f"cannot resume {out}: it was trained on {old.path} split with data.val_fraction = "
                              f"{old.val_fraction}, not {new.val_fraction}; another split would put text it trained "
                              f"on into its val split. Resume with data.val_fraction = {old.val_fraction}, or train "
                              f"into a new out_dir")


def same_data_path(a: str, b: str) -> bool:
    """Whether two data.path values name the same text: as written, or as files (./corpus.txt, ~/corpus.txt and its
    full path are one file). "shakespeare" is the built-in corpus unless a file of that name is there."""
    if a == b:
        return True
    if "shakespeare" in (a, b):
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):  # (a link loop)
        return False


def tokenizer_setting(data: DataConfig) -> str:
    """data.tokenizer as the tokens depend on it: a BPE with its size (None is the default, DEFAULT_BPE_VOCAB)."""
    if data.tokenizer != "bpe":
        return repr(data.tokenizer)
    return f"'bpe' (vocab_size {DEFAULT_BPE_VOCAB if data.vocab_size is None else data.vocab_size})"


def the_data_it_read(out: Path) -> Path | None:
    """The prepared folder a run read (run.json's data_dir), while it is there with the run's own tokenizer (not
    prepared again since): the data to resume with when the text it came from has changed; else None."""
    try:
        was = Path(read_json(out / "run.json")["data_dir"])
        if is_prepared(was) and load_tokenizer(out).first_difference(load_tokenizer(was)) is None:
            return was
    except (OSError, ValueError, KeyError, TypeError, FunGPTError):
        pass
    return None


def check_resume_model(cfg: RunConfig) -> None:
    """Refuse to resume the run in cfg.out_dir with another model than its checkpoints hold (cfg resolved:
    vocab_size is the data's). dropout may change (it is no part of the weights, as nanoGPT's resume allows):
    dropout_note says so."""
    out = Path(cfg.out_dir)
    saved = load_run_config(out)
    saved.model = dataclasses.replace(saved.model, dropout=cfg.model.dropout)  # (see train.dropout_note)
    if saved.model.pos_encoding != "rope":  # (rope_base plays no part without rotary positions: no other model)
        saved.model = dataclasses.replace(saved.model, rope_base=cfg.model.rope_base)
    if saved.model != cfg.model:
        old, new = saved.model.to_dict(), cfg.model.to_dict()
        diffs = [f"{k} {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k]]
        if [k for k in old if old[k] != new[k]] == ["vocab_size"] and saved.model.init_from == "scratch":
            # from scratch vocab_size is not a setting: it is the size of the data's tokenizer
            same = same_data_path(saved.data.path, cfg.data.path)
            why = (f"{cfg.data.path} (or its tokenizer settings) changed since. Resume with the original data"
                   if same else  # (another path given: both named, as written; the run's may be from another folder)
                   f"the run was started with data.path {saved.data.path!r}, and this resume gives "
                   f"{cfg.data.path!r}. Resume with the data it trained on")
            read = the_data_it_read(out)  # (a corpus added to since: its cached tokens are the way back)
            if read is not None:
                why += f" (the tokens it read are still in {read}: --data.path {read})"
            raise FunGPTError(f"cannot resume {out}: its data now has {new['vocab_size']:,} distinct tokens where "
                              f"the checkpoint was trained on {old['vocab_size']:,}; {why}, or train into a new "
                              f"out_dir")
        from fungpt.pretrained import model_flag  # (the flag that sets a [model] field to a value)

        back = " ".join(model_flag(k, old[k]) for k in old if old[k] != new[k] and k != "vocab_size")
        raise FunGPTError(f"cannot resume {out}: its checkpoint was trained with a different model "
                          f"({'; '.join(diffs)}); use the original settings" + (f" ({back})" if back else "")
                          + " or a new out_dir")


def prepare_out_dir(cfg: RunConfig, resume: bool, overwrite: bool, locked: bool = True) -> Path:
    """Check the run folder: refuse to mix two runs in one folder, or to resume with another model.

    Call it holding the folder's lock (lock_out_dir; `locked` False where the file system has none): it may
    delete a previous run."""
    out = Path(cfg.out_dir)
    # (not the lock: this process holds it. Asked again, on NFS, where flock is emulated by per-process fcntl locks,
    # the question turned this process's lock into a shared one, and closing it released the lock)
    check_out_dir(cfg, resume, overwrite, check_lock=False)
    has_run = holds_run(out)
    if has_run and not (resume or overwrite or locked):  # a run that has not saved yet may be live
        raise _holds_a_run(out)
    if resume:
        # A run killed before its first checkpoint has a config.json but nothing to load; it
        # resumes by starting from step 0 (after the same model check as any other resume).
        check_resume_model(cfg)
    elif has_run:  # with --overwrite, or a run that never saved (check_out_dir refused anything else)
        if not overwrite:
            print(f"fungpt: {out} held a run that stopped before its first checkpoint: starting it over")
        remove_run(out)
    elif out.is_dir():  # a folder of the user's (a project's, notes): allowed, but said, as `--out-dir /tmp` is a slip
        # (not the run's own, a killed run's temporaries such as .config.json.tmp-PID-... included, nor the
        # system's, such as macOS's .DS_Store)
        others = sorted(p.name for p in out.iterdir()
                        if p.name not in (*RUN_FILES, LOCK_FILE, "checkpoints", "tensorboard", "wandb")
                        and not system_file(p.name) and not (p.name[0] == "." and ".tmp-" in p.name))
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3:,} more" if len(others) > 3 else "")
            print(f"fungpt: note: out_dir {out} already holds files of its own ({shown}): the run's files go among "
                  f"them (--overwrite would later delete only the run's)")
    make_out_dir(out)
    if not os.access(out, os.W_OK):
        raise FunGPTError(f"out_dir {out} is not writable; choose another out_dir or fix its permissions")
    return out
