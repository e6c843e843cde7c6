"""The data layer: from raw text to batches of token ids.

Two halves:

1. `prepare(...)` (run once, `fungpt prepare`) reads a text corpus, tokenizes it,
   splits it into train and validation parts and writes a *prepared dataset*:

       DIR/train.bin             token ids, raw little-endian uint16 (uint32 if vocab > 65536)
       DIR/val.bin
       DIR/meta.json             counts, dtype, tokenizer kind, checksum of the source, ...
       DIR/tokenizer_meta.json   the tokenizer (see fungpt.tokenizer), plus tokenizer.json for bpe

   Raw .bin files are the simplest format there is: token i sits at byte
   i * itemsize, so training can memory-map them and read any window instantly,
   even when the dataset is far larger than RAM.

2. `BatchLoader` (used by training) draws random windows of `block_size + 1`
   tokens from a .bin file and returns them as (x, y) tensors, y being x shifted
   left by one token: the model learns to predict y[t] from x[0..t].

What counts as input (`resolve_source`):
  * a text file;
  * a folder: every regular file below it, in sorted path order, skipping hidden
    files and folders (names starting with ".") and empty files. We do not filter
    by extension; instead a file containing NUL bytes is refused as binary, so a
    stray image in the folder gives a clear error rather than garbage tokens.
    Documents are separated by <|endoftext|> (bpe, gpt2) or a newline (char);
  * the name `shakespeare`: Tiny Shakespeare (1.1 MB), found via $FUNGPT_DATA_DIR
    or the cache, or downloaded once (see `shakespeare_path`).

How the split works: the corpus text (documents and separators) is split by
*characters*: the first int(n * (1 - val_fraction)) characters are train, the rest
val, exactly as nanoGPT does for Tiny Shakespeare (1,003,854 / 111,540 chars).
Knowing n needs a first pass over the corpus; that pass is cheap (it decodes
UTF-8, counts characters, hashes the bytes and checks the input) and lets us find
every input problem *before* anything is written.

Big corpora are streamed in chunks of about 1 MB, so memory stays flat whatever
the corpus size. Chunks (and the smaller groups sent to BPE's parallel encoder)
are cut just before a newline that follows a non-space character. At such a point
GPT-2's pre-tokenizer always starts a new piece anyway, so the token ids are
exactly those of encoding each split's text in one go. (Text with no such point, nor a
space, for 128K characters, a DNA sequence say, is cut where it must be: there a token
can differ from one-go encoding; the text decodes back the same.)
"""

from __future__ import annotations

import array
import bisect
import codecs
import collections
import contextlib
import errno
import glob
import hashlib
import http.client
import itertools
import json
import os
import re
import shutil
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fungpt.checkpoint import STALE_TEMP_S, fsync_dir, open_new_temp, sync_folder, temp_stem
from fungpt.errors import FunGPTError, check_number, read_json
from fungpt.tokenizer import (
    BPE_FILE,
    DEFAULT_BPE_VOCAB,
    EOT_TEXT,
    META_FILE,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    check_bpe_vocab_size,
    check_kind,
    train_tokenizer,
)

FORMAT_VERSION = 1
SPLITS = ("train", "val")
SPLIT_FILES = tuple(f"{split}.bin" for split in SPLITS)  # the token ids of each split
PREPARED_FILES = (*SPLIT_FILES, "meta.json", META_FILE, BPE_FILE)  # all that prepare writes into its folder

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "tinyshakespeare.txt"
DOWNLOAD_TIMEOUT_S = 30.0

# Read the corpus 1 MB at a time: prepare's bars move on per chunk (at 8 MB, a BPE's sat still for seconds; both
# sizes prepared at the same speed)
CHUNK_BYTES = 1 << 20
BPE_GROUP_CHARS = 32 << 10  # BPE encodes ~32K-character groups in parallel batches

# A safe place to cut text, where GPT-2's pre-tokenizer starts a new piece whatever comes before or after,
# so that cutting never changes the tokens:
#   * just before a newline ("\n" or "\r\n") that follows a non-space character;
#   * just before a "\n" followed by a non-space character, whatever whitespace comes before it (lines
#     ending in spaces): its rule `\s+(?!\S)` ends a whitespace run one short of the non-space, so the
#     whitespace before the "\n" is a piece of its own, and the "\n" is one too. Not before a literal
#     <|endoftext|>: the library splits that off first, so the whitespace before it ends its text, where the
#     rule keeps the whole run one piece ("\n\n"; cut, it was two tokens).
# Without the second, a file whose every line ends in a space had no cut at all: 32M-character pieces, 8 GB.
_SAFE_CUT = re.compile(rf"(?<=\S)(?=\r?\n)|(?=\n(?!{re.escape(EOT_TEXT)})\S)")
# Where text has no newline to cut at for a long stretch (one long line: text out of a PDF, a JSON dump, old Mac
# files ending lines in "\r"), just before a single space between two non-space characters: the space starts the
# next word's piece (" word"), and the piece before ends at the non-space. Without it such text was encoded as
# pieces of up to 32M characters: 7.4 GB for a 40 MB file.
_SPACE_CUT = re.compile(rf"(?<=\S)(?= (?!{re.escape(EOT_TEXT)})\S)")


# ---------------------------------------------------------------------------
# Finding the input
# ---------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where downloads are kept: $FUNGPT_CACHE_DIR, else $XDG_CACHE_HOME/fungpt, else ~/.cache/fungpt.

    A "~" in the variables is expanded (a quoted FUNGPT_CACHE_DIR='~/c' reaches us as it is): prepare expanded it
    and wrote there, and train then looked for the data in a folder named "~" and never found it."""
    for variable in ("FUNGPT_CACHE_DIR", "XDG_CACHE_HOME"):
        if os.environ.get(variable):
            folder = env_folder(variable)
            return folder if variable == "FUNGPT_CACHE_DIR" else folder / "fungpt"
    try:
        return Path.home() / ".cache" / "fungpt"
    except RuntimeError:  # no $HOME, and no home folder for this user either (a container's uid)
        raise FunGPTError("found no home folder for the data cache ($HOME is not set, and this user has none): set "
                          "FUNGPT_CACHE_DIR to a writable folder") from None


def env_folder(variable: str) -> Path:
    """The folder environment variable `variable` names, a "~" in it expanded."""
    value = os.environ[variable]
    try:
        return Path(value).expanduser()
    except RuntimeError:  # ~name of no such user, or ~ with no home folder ($HOME unset, no passwd entry)
        raise FunGPTError(f"{variable}={value}: its '~' names no home folder (no such user, or $HOME is not set): "
                          f"give the folder's full path") from None


def fetch_url(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """Download `url` and return its bytes (also works with file:// URLs)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shakespeare_path() -> Path:
    """Return the path of Tiny Shakespeare, downloading it once if needed.

    Looks in order at $FUNGPT_DATA_DIR/tinyshakespeare.txt, then the cache folder
    (`cache_dir()`), then downloads SHAKESPEARE_URL into the cache. The file's
    SHA-256 is checked every time, so a damaged or different file is never used.
    """
    data_dir = os.environ.get("FUNGPT_DATA_DIR")
    if data_dir:
        local = env_folder("FUNGPT_DATA_DIR") / SHAKESPEARE_FILE
        if local.is_file():
            if _sha256_file(local) != SHAKESPEARE_SHA256:
                raise FunGPTError(
                    f"{local} is not Tiny Shakespeare (wrong SHA-256 checksum); replace it with a fresh "
                    f"download of {SHAKESPEARE_URL} or unset FUNGPT_DATA_DIR"
                )
            return local

    cached = cache_dir() / SHAKESPEARE_FILE
    if cached.is_file():
        if _sha256_file(cached) == SHAKESPEARE_SHA256:
            return cached
        cached.unlink()  # damaged cache: fetch it again below

    try:
        data = fetch_url(SHAKESPEARE_URL)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:  # (IncompleteRead: cut short)
        reason = getattr(e, "reason", e)
        if data_dir:  # the user pointed at a folder, and the file is not there: that is the mistake to fix
            raise FunGPTError(
                f"FUNGPT_DATA_DIR={data_dir} has no {SHAKESPEARE_FILE}, and the download from {SHAKESPEARE_URL} "
                f"failed too ({reason}); put {SHAKESPEARE_FILE} in that folder or point FUNGPT_DATA_DIR at the "
                f"folder that has it"
            ) from None
        raise FunGPTError(
            f"could not download Tiny Shakespeare from {SHAKESPEARE_URL} ({reason}); download that file "
            f"by hand as {SHAKESPEARE_FILE} into a folder and set FUNGPT_DATA_DIR to that folder"
        ) from None
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        raise FunGPTError(
            f"the file downloaded from {SHAKESPEARE_URL} has the wrong SHA-256 checksum, so it was not "
            "saved; try again later, or download it by hand and set FUNGPT_DATA_DIR"
        )
    # Write to a temporary name and rename: a crash mid-write never leaves a
    # truncated file under the real name.
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp, f = open_new_temp(cached, "wb")
    try:
        with f:
            f.write(data)
        os.replace(tmp, cached)
    except OSError as e:
        if e.filename is None:  # (a write that failed names no file: a full disk, a size limit)
            e.filename = str(cached)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return cached


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _hidden_by_flag(st: os.stat_result) -> bool:
    """A file its system hides by a flag, not by a leading dot: Windows' hidden or system files (desktop.ini and
    Thumbs.db in folders Explorer customised, which it does not show even with hidden files shown) and macOS's
    hidden flag. Neither is the user's text."""
    attributes = getattr(st, "st_file_attributes", 0)  # (Windows only)
    flags = getattr(st, "st_flags", 0)  # (macOS and the BSDs)
    return bool(attributes & (stat.FILE_ATTRIBUTE_HIDDEN | stat.FILE_ATTRIBUTE_SYSTEM) or flags & stat.UF_HIDDEN)


def _walk_files(folder: Path) -> list[Path]:
    """Every file below `folder` but hidden ones, through links to folders too (Path.rglob skips those: a linked
    folder's text was left out). A folder's or file's text is read once, under its own path where it is inside
    `folder` (not under a link's), and a link back up cannot loop."""
    def visible(dirs: list[str]) -> None:  # hidden folders are skipped, links to others too
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))

    seen = set()
    for root, dirs, _ in os.walk(folder):  # the folders that are really here, without following links
        visible(dirs)
        seen.add(os.path.realpath(root))
    files, top = [], os.path.realpath(folder)
    for root, dirs, names in os.walk(folder, followlinks=True):
        visible(dirs)
        real = os.path.realpath(root)
        if real != os.path.normpath(os.path.join(top, os.path.relpath(root, folder))):  # reached through a link
            if real in seen:
                dirs[:] = []  # (its files come in under their own path, or came in through another link)
                continue
            seen.add(real)
        for n in names:  # (a link to a file inside `folder` too is read there, under its own path)
            p = Path(root) / n
            linked_inside = p.is_symlink() and os.path.realpath(p).startswith(top + os.sep)
            if not n.startswith(".") and p.is_file() and not linked_inside:
                files.append(p)
    return files


def prepared_summary(out: Path, input: str | Path) -> list[str]:
    """What `prepare` made of `input` into `out`, in a line or two: its token counts and vocabulary (a BPE's smaller
    than asked, said why), and for a folder which of its files went in and which were left out."""
    from fungpt.tokenizer import BPE_MAX_WORD_CHARS

    meta = load_meta(out)
    asked = meta.get("vocab_size_asked")
    short = (f", not the {asked:,} asked: the BPE ran out of pairs to merge, every word of this corpus being one "
             f"token by then, or {BPE_MAX_WORD_CHARS}-character pieces of longer ones"
             if isinstance(asked, int) and asked > meta["vocab_size"] else "")
    lines = [f"prepared {out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, vocabulary "
             f"{meta['vocab_size']:,} ({meta['tokenizer']}{short})"]
    folder = Path(input).expanduser()
    if folder.is_dir():  # which files of a folder went in, and which were left out
        hidden, empty, broken = skipped_files(folder)
        left_out = [f"{len(names)} {kind} ({', '.join(names[:5])}{', ...' * (len(names) > 5)})"
                    for kind, names in (("empty", empty), ("hidden", hidden),
                                        ("broken link" + "s" * (len(broken) != 1), broken)) if names]
        files = meta["source_files"]
        lines.append(f"read {files:,} file{'s' * (files != 1)} of {folder}"
                     + (f"; left out {' and '.join(left_out)}" if left_out else ""))
    if folder.exists():  # (not the built-in shakespeare: its file is the canonical one)
        lines += _sources_notes(folder, meta["val_fraction"])
    if n := meta.get("replaced"):
        where, in_files = meta.get("replaced_in", []), meta.get("replaced_files", 0)
        files = f"{in_files:,} files: " if in_files > 1 else ""
        lines.append(f"note: {n:,} undecodable byte sequence{'s' * (n != 1)} became U+FFFD (errors \"replace\"), in "
                     f"{files}{', '.join(where)}{', ...' * (in_files > len(where))}")
    if literal := meta.get("literal_eot_texts"):
        lines.append(f"note: the text itself holds {EOT_TEXT} {literal:,} time{'s' * (literal != 1)}: each became the "
                     f"end-of-text token that separates documents (where `fungpt sample` stops); if they are not "
                     f"document breaks, change them in the text and prepare it again")
    # a file name may hold a newline: shown as \n, so that each note stays one line (as errors do, cli.main)
    return [line.replace("\n", "\\n") for line in lines]


def _sources_notes(folder: Path, val_fraction: float) -> list[str]:
    """Notes on a folder's files: which of them the val split comes from (the text's end, in the files' sorted
    order: a last file unlike the rest gave a val loss unlike the train loss, rising as the model learned), and
    which have Windows line endings, kept (a model learns the \\r too). Byte counts, so "about"."""
    try:
        sources = resolve_source(folder)
        sizes = [p.stat().st_size for p in sources]
    except (FunGPTError, OSError):  # (changed since it was read: no note)
        return []

    def name(p: Path) -> str:
        return p.relative_to(folder).as_posix() if folder.is_dir() else p.name

    notes, start, at, val = [], sum(sizes) * (1 - val_fraction), 0, []
    for p, n in zip(sources, sizes):
        if at + n > start and val_fraction > 0:
            val.append(name(p))
        at += n
    if len(sources) > 1 and val:
        rest = f" and all of {', '.join(val[1:4])}{', ...' * (len(val) > 4)}" if len(val) > 1 else ""
        notes.append(f"note: the val split, the last {val_fraction * 100:.3g}% of the text, is about the end of "
                     f"{val[0]}{rest} (files are read in sorted order): if that text is unlike the rest, so will be "
                     f"the val loss")
    crlf = []
    for p in sources:  # (the first 64 KiB of each: a file's line endings are the same throughout, as a rule)
        try:
            with open(p, "rb") as f:
                if b"\r\n" in f.read(1 << 16):
                    crlf.append(name(p))
        except OSError:
            continue
    if crlf:
        one = len(crlf) == 1
        notes.append(f"note: {len(crlf):,} file{'' if one else 's'} ({', '.join(crlf[:3])}{', ...' * (len(crlf) > 3)})"
                     f" end{'s its' if one else ' their'} lines with \\r\\n (Windows), kept as they are: the model "
                     f"learns the \\r too (convert them with dos2unix first for \\n alone)")
    return notes


def skipped_files(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """What prepare leaves out of a folder (resolve_source), for a note: the hidden files and folders (a leading dot,
    or the system's hidden flag), the empty files and the links to nothing (a file moved or on a drive not mounted:
    a chapter missing unseen otherwise), as paths relative to it, sorted (folders end in "/")."""
    hidden, empty, broken, seen = [], [], [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):  # (through links to folders, as _walk_files reads)
        if os.path.realpath(root) in seen:  # (a link back up, or a second link to one folder: its files once)
            dirs[:] = []
            continue
        seen.add(os.path.realpath(root))
        here = Path(root).relative_to(folder)
        hidden += [f"{(here / d).as_posix()}/" for d in dirs if d.startswith(".")]  # (not walked into)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            p = Path(root) / n
            try:
                st = p.stat()
            except OSError:  # a broken link (or one that leads back to itself): no text to read
                if not n.startswith("."):
                    broken.append((here / n).as_posix())
                continue
            if n.startswith(".") or _hidden_by_flag(st):
                hidden.append((here / n).as_posix())
            elif st.st_size == 0 and p.is_file():
                empty.append((here / n).as_posix())
    return sorted(hidden), sorted(empty), sorted(broken)


def _refuse_token_files(path: Path) -> None:
    """Token ids where text is read (a prepared folder, nanoGPT's train.bin and val.bin, one .bin of them) are
    named as such, rather than refused as "a binary file", which left the user to guess what FunGPT wants; so are
    a training run's folder and a model's (Hugging Face layout), whose weights were that binary file."""
    from fungpt.config import is_hf_config

    if path.is_dir() and (path / "config.json").is_file():
        if (path / "checkpoints").is_dir() or (path / "latest.json").is_file():
            raise FunGPTError(f"{path} is a training run, not text: pass the text it was trained on (data.path in its "
                              f"config.json), or go on training it with --out-dir {path} --resume")
        if is_hf_config(path / "config.json"):
            raise FunGPTError(f"{path} is a model folder (config.json and weights), not text: pass text files; to "
                              f"start from this model, give it as --model.init-from {path}")
    folder = path if path.is_dir() else path.parent
    arrays = [f"{split}.npy" for split in SPLITS if (folder / f"{split}.npy").is_file()]
    if arrays and (path.is_dir() or path.name in arrays):  # ids saved by np.save: a header, then the ids
        what = f"holds NumPy files ({', '.join(arrays)})" if path.is_dir() else "is a NumPy file (np.save)"
        raise FunGPTError(f"{path} {what}, which FunGPT does not read: to train on token ids, write them raw "
                          f"beside a meta.json, "
                          f"np.load('train.npy').astype(np.uint16).tofile('train.bin') ({OWN_IDS}); or pass text")
    ids = [n for n in SPLIT_FILES if (folder / n).is_file()]
    if not ids or (path.is_file() and path.name not in SPLIT_FILES):
        return
    if is_prepared(folder):
        raise FunGPTError(f"{folder} is a prepared dataset (token ids, not text): train on it with --data.path "
                          f"{folder}, or prepare the text it was made from")
    raise FunGPTError(f"{folder} holds token ids ({', '.join(ids)}) but no meta.json: add one and a "
                      f"tokenizer_meta.json beside them to train on them ({OWN_IDS}), or pass the text they were "
                      f"made from (nanoGPT's input.txt)")


def resolve_source(source: str | Path) -> list[Path]:
    """Turn the --input argument into the list of files to read (see the module docstring)."""
    path = Path(source).expanduser()
    if not path.exists():
        if str(source) == "shakespeare":
            return [shakespeare_path()]
        raise FunGPTError(
            f"data path '{source}' does not exist: pass a text file, a folder of text files or 'shakespeare'"
            + left_in_a_temporary(path)
        )
    _refuse_token_files(path)
    if path.is_file():
        if path.stat().st_size == 0:
            raise FunGPTError(f"input file {path} is empty; pass a file with some text in it")
        return [path]
    if path.is_dir():
        files = sorted(
            (p for p in _walk_files(path) if not _is_hidden(p.relative_to(path))),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        kept, seen = [], set()
        for p in files:  # each file once: two links to one file (or hard links) read it twice, maybe into both splits
            st = p.stat()
            # (a file system without inode numbers, some network or Windows ones, gives 0: its real path then)
            key = (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(p)
            if st.st_size > 0 and not _hidden_by_flag(st) and key not in seen:
                seen.add(key)
                kept.append(p)
        files = kept
        if not files:
            raise FunGPTError(
                f"folder {path} holds no text (hidden and empty files are skipped); put some text files in it"
            )
        return files
    raise FunGPTError(f"data path '{source}' is neither a file nor a folder; pass a text file or a folder")


# ---------------------------------------------------------------------------
# Reading text in chunks
# ---------------------------------------------------------------------------


def _cut_between(pattern: re.Pattern, text: str, lo: int, hi: int) -> int | None:
    """The first cut `pattern` allows in text[lo:hi + 1], or None. (The search reads a little past `hi`: its
    look-aheads must see a whole <|endoftext|> there, not the start of one, which the text seemed to end in.)"""
    m = pattern.search(text, lo, hi + len(EOT_TEXT) + 1)
    return m.start() if m and m.start() <= hi else None


def _outside_eot(text: str, cut: int, start: int = 0) -> int:
    """`cut`, or, where it would fall inside a literal <|endoftext|> (its halves would be text), the start of that
    one; or its end, when it starts the piece that begins at `start` (a cut there would leave the piece empty)."""
    eot = text.find(EOT_TEXT, max(start, cut - len(EOT_TEXT) + 1), cut + len(EOT_TEXT) - 1)
    if eot == -1 or eot >= cut:
        return cut
    return eot if eot > start else eot + len(EOT_TEXT)


def _last_safe_cut(text: str) -> int | None:
    """Last safe cut position in `text` (same rule as _SAFE_CUT), or None."""
    end = len(text)
    while (newline := text.rfind("\n", 0, end)) > 0:
        after = text[newline + 1 : newline + 1 + len(EOT_TEXT)]
        # before a "\n" that a non-space follows: not an <|endoftext|>, nor the start of one the text may go on to
        if after and not after[0].isspace() and not EOT_TEXT.startswith(after):
            return newline
        cut = newline - 1 if text[newline - 1] == "\r" else newline  # cut before "\r\n"
        if cut > 0 and not text[cut - 1].isspace():
            return cut
        end = cut
    return None


def _last_space_cut(text: str) -> int | None:
    """Last cut before a space in `text` (_SPACE_CUT), or None: for text without a newline to cut at. (Searched in
    the last 64K characters, then further back: text of long words has fewer spaces.)"""
    for back in (1 << 16, len(text)):
        last = collections.deque(_SPACE_CUT.finditer(text, max(0, len(text) - back)), maxlen=1)  # (the last match)
        if last:
            return last[0].start()
    return None


def _split_groups(text: str, size: int) -> list[str]:
    """Cut `text` at safe points into pieces of roughly `size` characters: before a newline where there is one,
    else before a space (_SPACE_CUT). Text with neither for 4 x `size` characters (Chinese without newlines, a
    hash of millions of characters) is cut there anyway, which may change the token or two at the cut: one piece
    of millions of characters took 110 bytes of memory a character to encode."""
    groups, start = [], 0
    while len(text) - start > size:
        lo, near, far = start + size, start + 2 * size, start + 4 * size  # (searches end there: linear time)
        cut = (_cut_between(_SAFE_CUT, text, lo, near) or _cut_between(_SPACE_CUT, text, lo, far)
               or _cut_between(_SAFE_CUT, text, near, far))
        if cut is None:
            if len(text) <= far:
                break
            cut = _outside_eot(text, far, start)
        groups.append(text[start:cut])
        start = cut
    groups.append(text[start:])
    return groups


class BadText(FunGPTError):
    """A file of the corpus that is not UTF-8 text (binary, UTF-16, bytes that do not decode)."""


def refuse_utf16_or_32(path, head: bytes) -> None:
    """Refuse a file whose first bytes `head` are the byte-order mark of UTF-32 (checked first: its little-endian
    one starts like UTF-16's) or UTF-16, as Windows PowerShell's `>` writes text, naming it and the fix."""
    for mark, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                       (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if head.startswith(mark):
            raise BadText(f"{path} is {name} text (it starts with {name}'s byte-order mark), not UTF-8: convert "
                              f"it to UTF-8 (e.g. save it again as UTF-8, or `iconv -f {name} -t UTF-8`)")


_COUNTED_REPLACE = "fungpt.replace"  # errors="replace", counted: the handler below, registered by prepare
_replacements = threading.local()  # .count: the substitutions _counted_replace made in this thread


def _counted_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    """What codecs' "replace" does when decoding (one U+FFFD for the undecodable sequence), counted."""
    _replacements.count = getattr(_replacements, "count", 0) + 1
    return "\ufffd", error.end


def _shown_name(path: Path, source) -> str:
    """A file of the corpus as the user knows it: relative to the folder given, else its own name."""
    folder = Path(source).expanduser()
    return path.relative_to(folder).as_posix() if folder.is_dir() and path.is_relative_to(folder) else path.name


def _iter_file_text(
    path: Path, errors: str, chunk_bytes: int, on_bytes: Callable[[bytes], None] | None,
    utf8_fix: str = ("fix the file, or substitute U+FFFD for undecodable bytes: `fungpt prepare --errors replace`, "
                     "or data.errors = \"replace\" (--data.errors replace) for `fungpt train`"),
) -> Iterator[str]:
    """Yield the text of one file in chunks of about `chunk_bytes`, cut at safe points.

    Raises FunGPTError for NUL bytes (binary file) and, with errors="strict", for
    invalid UTF-8, naming the byte offset of the problem and `utf8_fix`.
    """
    # An incremental decoder keeps a multi-byte character that straddles two reads
    # until the rest of it arrives.
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset = 0  # bytes of this file read so far
    carry = ""  # decoded text after the last cut, waiting for more
    # The chunks read since text was last handed out, reported (on_bytes) once it has been handled (the caller asks
    # for more), so that a progress bar counts work done: counted when read, prepare's bars ran a chunk ahead of
    # the work. (Only the text after a chunk's last safe cut is counted before it is handled.)
    unreported: list[bytes] = []

    def report() -> None:
        if on_bytes is not None:
            for data in unreported:
                on_bytes(data)
        unreported.clear()
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FunGPTError(f"could not read {path}: {e.strerror}") from None
    with f:
        while True:
            try:
                data = f.read(chunk_bytes)
            except OSError as e:
                raise FunGPTError(f"could not read {path}: {e.strerror}") from None
            final = not data
            if offset == 0:  # (its NUL bytes would say "a binary file")
                refuse_utf16_or_32(path, data)
            nul = data.find(b"\x00")
            if nul >= 0:
                weights = " (a model's weights, in a run or model folder: move that folder out)" * (
                    path.suffix in (".safetensors", ".pt", ".pth", ".ckpt") or path.name == "pytorch_model.bin")
                raise BadText(f"{path} looks like a binary file{weights} (NUL byte at byte offset {offset + nul}); "
                                  f"pass text files only")
            pending = len(decoder.getstate()[0])  # undecoded bytes held from the last read
            try:
                text = decoder.decode(data, final=final)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                raise BadText(f"{path} is not valid UTF-8 (bad byte at offset {bad}); {utf8_fix}") from None
            if offset == 0:  # a byte-order mark (some Windows editors write one) is not text: drop it
                text = text.removeprefix("\ufeff")
            offset += len(data)
            if data:
                unreported.append(data)
            buffer = carry + text
            if final:
                if buffer:
                    yield buffer
                report()
                return
            # Yield up to the last safe cut; keep the rest for the next round. (One long line: up to its last space.)
            cut = _last_safe_cut(buffer)
            if cut is None and len(buffer) >= chunk_bytes:
                cut = _last_space_cut(buffer)
            if cut is None and len(buffer) < 4 * chunk_bytes:
                carry = buffer  # no safe cut yet: read more first
            else:
                # (one enormous line: cut anyway, which may change a token or two; not inside an <|endoftext|>)
                cut = _outside_eot(buffer, max(1, len(buffer) - len(EOT_TEXT))) if cut is None else cut
                yield buffer[:cut]
                carry = buffer[cut:]
                report()


def _iter_corpus(
    files: list[Path],
    separator: str,
    errors: str,
    chunk_bytes: int | None = None,
    on_bytes: Callable[[bytes], None] | None = None,
) -> Iterator[tuple[str, bool]]:
    """Yield (text, is_separator) for the whole corpus: documents with separators between them."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES  # read at call time so tests can shrink it
    for i, path in enumerate(files):
        if i > 0:
            yield separator, True
        try:
            for text in _iter_file_text(path, errors, chunk_bytes, on_bytes):
                yield text, False
        except BadText as e:  # (one file at a time, a folder of 300 such files took 300 runs to mend)
            raise FunGPTError(f"{e}{_more_bad_files(files[i + 1:], errors, chunk_bytes)}") from None


BAD_FILE_SCAN_BYTES = 1 << 29
"""How much of the files after a bad one `_more_bad_files` reads (512 MB: a few seconds) to say how many are bad too."""


def _more_bad_files(rest: list[Path], errors: str, chunk_bytes: int) -> str:
    """The end of a bad file's message: how many of the files after it are not UTF-8 text either, and the first few
    names ("" when none), from reading up to BAD_FILE_SCAN_BYTES of them."""
    bad, read, checked = [], 0, 0
    for path in rest:
        if read >= BAD_FILE_SCAN_BYTES:
            break
        try:
            read += path.stat().st_size
            for _ in _iter_file_text(path, errors, chunk_bytes, None):
                pass
        except BadText:
            bad.append(path)
        except (FunGPTError, OSError):  # (unreadable: said when it is reached)
            pass
        checked += 1
    if not bad:
        return ""
    names = ", ".join(str(p) for p in bad[:3]) + (", ..." if len(bad) > 3 else "")
    where = "" if checked == len(rest) else \
        f" (of the next {checked:,} file{'s' * (checked != 1)}; {len(rest) - checked:,} not checked)"
    more = f"{len(bad):,} more files after it are" if len(bad) != 1 else "1 more file after it is"
    return f" [{more} not UTF-8 text either{where}: {names}]"


def into_file(stream) -> bool:
    """Whether stream writes into a regular file or a pipe (a log), not a terminal or a notebook's output."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, ValueError, OSError):  # (no file behind it: a notebook's stream, a StringIO)
        return False
    return stat.S_ISREG(mode) or stat.S_ISFIFO(mode)


def bar_interval() -> float:
    """Seconds between a progress bar's redraws on stderr: into a log file or a pipe each redraw is kept, so one
    every 30 s there, not ten a second (a terminal, or a notebook's stream, redraws as usual)."""
    return 30.0 if into_file(sys.stderr) else 0.1


def _then(items: Iterable, done: Callable[[], None]) -> Iterator:
    """The items, then a call of done() once they are all taken (BPE training reads its text, then merges for as long
    again with no progress to show: the bar, at 100%, says so rather than looking stuck)."""
    yield from items
    done()


def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not enabled,
                mininterval=bar_interval())


# ---------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned type that holds every id: uint16 up to 65,536 tokens, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` as a numpy array, using the fastest path each tokenizer has."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode_array(text)
    groups = _split_groups(text, BPE_GROUP_CHARS)
    ids = tokenizer.encode_batch(groups)  # parallel on all cores
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(map(len, ids)))


def encode_file(
    path: Path, tokenizer: Tokenizer, errors: str = "strict", progress: bool = False,
    utf8_fix: str = "convert it to UTF-8",
) -> tuple[np.ndarray, int, int]:
    """Token ids of one text file, read and encoded in chunks cut at safe points as prepare does: the ids
    prepare would write, in a fraction of the memory that encoding the whole text at once takes (a BPE's
    Python list of ids is ~70 bytes a token). Returns (ids, UTF-8 bytes, characters) of the text read
    ("\r\n" kept, a byte-order mark dropped, undecodable bytes refused (the error ends with utf8_fix) or, with
    errors="replace", U+FFFD)."""
    n_bytes, n_chars, used = 0, 0, 0
    dtype = token_dtype(tokenizer.vocab_size)
    size = path.stat().st_size
    # The ids go into one array, in place: pieces joined at the end held them twice (a 1.2 GB text's 2.3 GB of ids
    # took 4.6 GB). Every tokenizer here gives at most one token a byte but a model folder's may give more (a
    # SentencePiece one adds "▁" tokens): the array grows then. Its pages never written take no memory.
    out = np.empty(size + 1, dtype)
    with _progress_bar(size, f"encoding ({tokenizer.name})", progress) as bar:
        for text in _iter_file_text(path, errors, CHUNK_BYTES, lambda b: bar.update(len(b)), utf8_fix=utf8_fix):
            if isinstance(tokenizer, CharTokenizer):  # (the position an unknown character is named at)
                ids = tokenizer.encode_array(text, offset=n_chars)
            else:
                ids = _encode(tokenizer, text)
            if used + len(ids) > len(out):
                out = np.concatenate([out[:used], np.empty(max(len(ids), len(out) // 4), dtype)])
            out[used:used + len(ids)] = ids
            used += len(ids)
            n_bytes += len(text.encode("utf-8"))
            n_chars += len(text)
    return out[:used], n_bytes, n_chars


_HOST = socket.gethostname().replace("-", "_") or "host"  # in temporary folder names: OUT.tmp-HOST-PID


NOT_THE_TOKENS = ("source", "train_bytes", "train_chars", "val_bytes", "val_chars", "bytes_exclude_eot")
"""meta.json keys that describe the text, not the tokens: `source`, the path as it was typed (./corpus.txt or
corpus.txt, one text), and the sizes for bits per byte and per character, which the README has users add by hand
to a folder of their own ids (while a run trains on it, too)."""


def same_dataset(meta: dict, other: dict) -> bool:
    """Whether two prepared folders' meta.json describe the same tokens: all keys but NOT_THE_TOKENS."""
    return ({k: v for k, v in meta.items() if k not in NOT_THE_TOKENS}
            == {k: v for k, v in other.items() if k not in NOT_THE_TOKENS})


def _put_back(old: Path, out: Path) -> None:
    """A dataset that prepare moved aside (to `old`) goes back to `out` when its own could not take its place
    (else it stayed beside it for ever, and `out` was gone)."""
    if old.exists() and not out.exists():
        with contextlib.suppress(OSError):
            os.replace(old, out)


def remove_stale_temps(out: Path) -> None:
    """Delete the temporary folders (OUT.tmp-*, OUT.old-*) that a prepare killed before it could clean up
    (kill -9, out of memory, power loss) left, by age: none of their files written for an hour. (prepare calls
    this; so does training that finds OUT prepared already, which a killed prepare's later run did.) A live
    prepare appends to its .bin files every few megabytes. (Not by process id: another machine, or another
    container on this one, can share the folder and the host name but not the process ids.)"""
    now = time.time()
    # Only what prepare names and writes: OUT.tmp-HOST-PID (OUT.tmp-PID before), holding nothing but a dataset's
    # files. A folder of the user's beside OUT (corpus.old-v1, a backup) is never taken for one.
    stem = temp_stem(out.name)  # (a long name's temporaries begin with at most 100 bytes: its start and a hash)
    name = re.compile(rf"{re.escape(stem)}\.(tmp|old)-([^-/]+-)?\d+")
    ours = set(PREPARED_FILES)
    for folder in out.parent.glob(f"{glob.escape(stem)}.*-*"):
        with contextlib.suppress(OSError):
            files = list(folder.iterdir())
            if not (name.fullmatch(folder.name) and folder.is_dir() and not folder.is_symlink()
                    and all(p.name in ours or p.name.startswith(".tokenizer.tmp-") for p in files)):
                continue
            newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in files)])
            if now - newest > STALE_TEMP_S:
                shutil.rmtree(folder, ignore_errors=True)


def left_in_a_temporary(out: Path) -> str:
    """For a prepared folder that is missing: a `fungpt prepare --overwrite` killed between moving the old dataset
    aside and renaming the new one into place (one system call apart) left the complete new one as OUT.tmp-*."""
    stem = temp_stem(out.name)
    with contextlib.suppress(OSError):
        for folder in sorted(out.parent.glob(f"{glob.escape(stem)}.tmp-*")):
            if (folder / "meta.json").is_file():  # (written last: the dataset in it is complete)
                return (f" (a `fungpt prepare` stopped while putting it in place left the complete dataset in "
                        f"{folder}: rename that folder to {out.name})")
    return ""


def system_file(name: str) -> bool:
    """A file the system puts into any folder it shows: macOS Finder's .DS_Store and ._* twins, Windows'
    Thumbs.db and desktop.ini (deleting one with the folder loses nothing of the user's)."""
    return name in (".DS_Store", "Thumbs.db", "desktop.ini") or name.startswith("._")


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FunGPTError(f"output {out} exists and is not a folder; choose another --out")
    # (fungpt train's cache is FunGPT's own: one of its dataset folders that is damaged, its meta.json lost too, is
    # prepared again, whatever it holds; only those, not the cache itself or another folder in it)
    cache = cache_dir().expanduser().resolve()
    if overwrite and out.resolve().parent == cache / "datasets":
        return
    if is_prepared(out):
        if not overwrite:
            raise FunGPTError(f"{out} already holds a prepared dataset; pass --overwrite to replace it")
        # --overwrite replaces the whole folder: only one that prepare made, holding nothing else. A folder of the
        # user's own token ids (no source text to prepare them from again) and files put beside a dataset are kept.
        if out.resolve().is_relative_to(cache):
            return
        try:
            meta = read_json(out / "meta.json")
            made_here = "source_sha256" in meta
        except (OSError, ValueError, TypeError) as e:
            raise FunGPTError(f"{out / 'meta.json'} cannot be read ({type(e).__name__}), so whether fungpt prepare "
                              f"made {out} (and --overwrite may delete it) is not known; delete the folder yourself "
                              f"if it is, or choose another --out") from None
        if not made_here:
            raise FunGPTError(f"{out} holds token ids that fungpt prepare did not make (its meta.json names no "
                              f"source text), which --overwrite would delete; choose another --out")
        others = sorted(p.name for p in out.iterdir() if p.name not in PREPARED_FILES and not system_file(p.name))
        if others:
            raise FunGPTError(f"{out} holds {others[0]!r}" + (f" and {len(others) - 1} more file(s)" if len(others) > 1
                              else "") + " beside the prepared dataset, which --overwrite would delete with it; "
                              "move them out, or choose another --out")
    elif any(out.iterdir()):
        # Never delete a folder we did not make, even with --overwrite.
        raise FunGPTError(f"output folder {out} is not empty and is not a prepared dataset; choose another --out")


def prepare(
    input: str | Path,
    out: str | Path,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    overwrite: bool = False,
    errors: str = "strict",
    progress: bool = True,
) -> Path:
    """Tokenize a corpus into DIR/train.bin, DIR/val.bin, DIR/meta.json and the tokenizer.

    `input` is a text file, a folder or "shakespeare"; `tokenizer` is "char", "bpe"
    (trained here, `vocab_size` defaults to 4096), "gpt2", or a ready `Tokenizer` object
    (a pretrained model's own tokenizer, used as is). The first
    (1 - val_fraction) of the characters are train, the rest val. Everything is
    written into a temporary folder that is renamed to `out` only once complete.
    Returns the output folder.
    """
    # --- check the arguments before touching anything -------------------------
    for name, path in (("input", input), ("out", out)):  # (Path("") is the current folder, prepared or written)
        if not str(path).strip():
            raise FunGPTError(f"prepare: {name} is empty: give " + ("a text file or a folder of them" if name == "input"
                                                                    else "the folder to write the dataset into"))
    # A ready Tokenizer object (e.g. a pretrained model's own, see pretrained.py) is used as is.
    given = tokenizer if isinstance(tokenizer, Tokenizer) else None
    tokenizer = given.name if given is not None else tokenizer
    if given is None:
        check_kind(tokenizer)
    if vocab_size is not None and given is not None:  # (it was dropped without a word for a ready BPE)
        raise FunGPTError(f"vocab_size {vocab_size} does not apply to a ready tokenizer, which has its own "
                          f"vocabulary ({given.vocab_size:,} tokens); leave it out")
    if vocab_size is not None and tokenizer != "bpe":
        raise FunGPTError(f"--vocab-size only applies to --tokenizer bpe, not {tokenizer}; leave it out")
    if tokenizer == "bpe" and vocab_size is not None:
        check_bpe_vocab_size(vocab_size)
        vocab_size = int(vocab_size)  # (a numpy integer: as a Python int, which the tokenizers library and JSON take)
    check_number(val_fraction, "val_fraction", whole=False)
    val_fraction = float(val_fraction)
    if not 0 < val_fraction < 1:
        raise FunGPTError(
            f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}; e.g. --val-fraction 0.1"
        )
    if errors not in ("strict", "replace"):
        raise FunGPTError(f"errors must be 'strict' or 'replace', got {errors!r}")
    out = Path(out).expanduser().resolve()  # absolute, so out.name is never empty
    _check_out_dir(out, overwrite)
    files = resolve_source(input)
    source = Path(input).expanduser()
    if source.is_dir() and out.is_relative_to(source.resolve()) and not _is_hidden(out.relative_to(source.resolve())):
        # (train's datasets go to the data cache: there the folder to move is the cache, by its variable)
        where = ("training prepares its datasets in the data cache: set FUNGPT_CACHE_DIR to a folder outside the input "
                 "folder (or to a hidden folder, whose files are skipped)" if out.is_relative_to(cache_dir().resolve())
                 else "put it outside (or in a hidden folder, whose files are skipped)")
        raise FunGPTError(f"the dataset folder {out} is inside the input folder {source}: the next prepare of that "
                          f"folder would read the dataset's own files as text; {where}")
    total_bytes = sum(p.stat().st_size for p in files)
    gpt2 = GPT2Tokenizer() if tokenizer == "gpt2" and given is None else None  # fail early if unavailable
    has_eot = given.eot_id is not None if given is not None else tokenizer != "char"
    separator = EOT_TEXT if has_eot else "\n"

    # --- pass 1: check, count and hash the corpus ---------------------------------
    hasher = hashlib.sha256()
    n_chars = 0
    separator_spans = []  # (start, end) character offsets of each separator
    chars_seen: set[str] = set()
    # "<|endoftext|>" written in the text itself encodes as the separator too: where each starts (character offsets),
    # so that the train/val cut falls outside them, and their number, for prepared_summary to say (the pieces of text
    # never cut through one: see _iter_file_text)
    literal_starts = array.array("q")
    # With errors="replace", the undecodable byte sequences each file had (each became one U+FFFD), by the same
    # substitution, counted (the counter is per thread); for prepared_summary to name
    replaced, decoding, _replacements.count = [0] * len(files), errors, 0
    if errors == "replace":
        codecs.register_error(_COUNTED_REPLACE, _counted_replace)
        decoding = _COUNTED_REPLACE
    n_file = 0
    # A given char tokenizer is asked about each character here, in pass 1: where one is missing, its error names the
    # file and the position in it (encoding in pass 2 knows neither: a position in a piece of the split, no file)
    known = set(given.chars) if isinstance(given, CharTokenizer) else None
    file_start = 0  # where the current file's text starts (characters of the corpus before it)
    with _progress_bar(total_bytes, "checking", progress) as bar:

        def on_bytes(data: bytes) -> None:
            hasher.update(data)
            bar.update(len(data))

        for text, is_separator in _iter_corpus(files, separator, decoding, on_bytes=on_bytes):
            if is_separator:  # (the last file's text all decoded: its count is complete)
                replaced[n_file] = _replacements.count
                _replacements.count, n_file = 0, n_file + 1
                separator_spans.append((n_chars, n_chars + len(text)))
                file_start = n_chars + len(text)
                if known is not None and not known.issuperset(text):  # (refused in pass 2 as text to remove)
                    raise FunGPTError(f"the given char tokenizer has no {text!r}, which prepare puts between the files "
                                      f"of a folder ({input}): use a tokenizer that has it, or join the files into one")
            elif known is not None and not known.issuperset(text):
                try:
                    given.encode_array(text, offset=n_chars - file_start)
                except FunGPTError as e:
                    raise FunGPTError(f"{files[n_file]}: {e}") from None
            elif has_eot:
                at = text.find(EOT_TEXT)
                while at >= 0:
                    literal_starts.append(n_chars + at)
                    at = text.find(EOT_TEXT, at + len(EOT_TEXT))
            if tokenizer == "char":
                chars_seen.update(text)
            n_chars += len(text)
    replaced[n_file] = _replacements.count
    if n_chars == 0:
        raise FunGPTError(f"input '{input}' holds no text; pass a file with some text in it")

    # Where train ends. Never cut through a multi-character separator.
    boundary = int(n_chars * (1 - val_fraction))
    for start, end in separator_spans:
        if start < boundary < end:
            boundary = end
    last = bisect.bisect_left(literal_starts, boundary) - 1  # (the last one to start before the cut: around it?)
    if last >= 0 and boundary < literal_starts[last] + len(EOT_TEXT):
        boundary = literal_starts[last] + len(EOT_TEXT)
    if boundary == 0 or boundary == n_chars:
        which = "train" if boundary == 0 else "val"
        fix = ("use more text" if n_chars < 2 else "use more text, or another val fraction (--val-fraction for "
               "fungpt prepare, --data.val-fraction for fungpt train)")  # (one character cannot be split in two)
        raise FunGPTError(f"the {which} split has 0 tokens ({n_chars} character{'s' * (n_chars != 1)} of text, val "
                          f"fraction {val_fraction}); {fix}")
    # A split of <|endoftext|> separators alone (files holding only a byte-order mark, say) would have tokens but
    # no text (a char vocabulary's separator, a newline, is text)
    separators_in_train = sum(min(end, boundary) - start for start, end in separator_spans if start < boundary)
    separators_in_val = sum(end - max(start, boundary) for start, end in separator_spans if end > boundary)
    for which, text_chars in (("train", boundary - separators_in_train),
                              ("val", n_chars - boundary - separators_in_val)):
        if text_chars == 0 and has_eot:
            raise FunGPTError(f"the {which} split holds no text, only the separators between files (val fraction "
                              f"{val_fraction}); use more text, or another val fraction (--val-fraction for fungpt "
                              f"prepare, --data.val-fraction for fungpt train)")

    # --- the tokenizer ---------------------------------------------------------------
    if given is not None:
        tok: Tokenizer = given
    elif tokenizer == "char":
        # (its vocabulary rule, in one place: tokenizer.py; it gets each character of the corpus once, in no order)
        tok = CharTokenizer.train("".join(chars_seen))
    elif tokenizer == "bpe":
        with _progress_bar(total_bytes, "training bpe", progress) as bar:
            chunks = (
                group
                for text, is_separator in _iter_corpus(files, separator, errors, on_bytes=lambda b: bar.update(len(b)))
                if not is_separator
                for group in _split_groups(text, BPE_GROUP_CHARS)
            )
            tok = train_tokenizer("bpe", _then(chunks, lambda: bar.set_description("training bpe (text read; "
                                                                                  "merging, no progress shown)")),
                                  vocab_size)
            bar.set_description("training bpe", refresh=False)  # (its last line: done)
    else:
        tok = gpt2
    dtype = token_dtype(tok.vocab_size)

    # --- pass 2: encode into a temporary folder, then rename it --------------------
    remove_stale_temps(out)
    tmp = out.with_name(f"{temp_stem(out.name)}.tmp-{_HOST}-{os.getpid()}")
    old = out.with_name(f"{temp_stem(out.name)}.old-{_HOST}-{os.getpid()}")  # (--overwrite: the dataset there)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # (one left by an earlier call of this process, cut short: see below)
    counts = {f"{s}_{k}": 0 for s in SPLITS for k in ("tokens", "bytes", "chars")}
    swapped = False  # whether the new dataset has taken out's place
    try:
        tmp.mkdir(parents=True)
        check = hashlib.sha256()
        position = 0  # characters of the corpus handled so far
        max_id = -1  # the largest token id written (meta.json: lets check_token_ids skip reading the files)
        with (
            open(tmp / "train.bin", "wb") as train_f,
            open(tmp / "val.bin", "wb") as val_f,
            _progress_bar(total_bytes, f"encoding ({tok.name})", progress) as bar,
        ):

            def on_bytes(data: bytes) -> None:
                check.update(data)
                bar.update(len(data))

            def write(split: str, f, text: str, is_separator: bool) -> None:
                nonlocal max_id
                try:
                    ids = _encode(tok, text)
                except FunGPTError:
                    if given is None and tokenizer == "char":  # its vocabulary is every character pass 1 saw
                        raise FunGPTError(f"input '{input}' changed while it was being prepared; run prepare "
                                          f"again") from None
                    raise
                f.write(ids.astype(dtype).tobytes())
                if len(ids):
                    max_id = max(max_id, int(ids.max()))
                counts[f"{split}_tokens"] += len(ids)
                if not (is_separator and has_eot):  # bits per byte (and per character) are per byte of the text:
                    # the <|endoftext|> between files is one token, not 13 characters of it (a char vocabulary's
                    # separator, a newline, is a character the model predicts like any other)
                    counts[f"{split}_chars"] += len(text)
                    counts[f"{split}_bytes"] += len(text.encode("utf-8"))

            # A chunk of a document that goes to train whole waits for the next piece: where that piece holds the
            # train/val boundary, the two are encoded as one. A chunk ends at a cut that is safe for what follows it
            # (see _last_safe_cut: before a "\n" after a space, safe when a non-space follows the "\n"), but the
            # train text ends at the boundary: just past that "\n", one-go encoding joins the space and the "\n".
            held = ""
            for text, is_separator in _iter_corpus(files, separator, errors, on_bytes=on_bytes):
                # Cut the piece that straddles the train/val boundary in two (never a separator: see above).
                cut = min(max(boundary - position, 0), len(text))
                position += len(text)
                if held:
                    if not is_separator and 0 < cut < len(text):  # the boundary is in this chunk of the document
                        text, cut = held + text, cut + len(held)
                    else:
                        write("train", train_f, held, False)
                    held = ""
                if cut == len(text) and not is_separator:
                    held = text  # (all train: written with the next piece, or at the end)
                    continue
                if cut > 0:
                    write("train", train_f, text[:cut], is_separator)
                if cut < len(text):
                    write("val", val_f, text[cut:], is_separator)
            if held:
                write("train", train_f, held, False)

        if check.hexdigest() != hasher.hexdigest():
            raise FunGPTError(f"input '{input}' changed while it was being prepared; run prepare again")
        tok.save(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            # what was asked of a BPE trained here: on a small corpus it stops short of it (vocab_size above)
            **({"vocab_size_asked": vocab_size or DEFAULT_BPE_VOCAB} if tokenizer == "bpe" and given is None else {}),
            "eot_id": tok.eot_id,
            "dtype": dtype.name,
            "max_id": max_id,
            **counts,
            "bytes_exclude_eot": True,  # (folders prepared before counted each <|endoftext|> as 13 bytes of text)
            "val_fraction": val_fraction,
            "source": str(input),
            "source_files": len(files),
            "source_bytes": total_bytes,
            "source_sha256": hasher.hexdigest(),
            "errors": errors,
            # (each one an end-of-text token in the data, as the separators; none where the tokenizer reads the text
            # as text: a tokenizer.json without it among its added tokens)
            "literal_eot_texts": len(literal_starts) if literal_starts and tok.encode(EOT_TEXT) == [tok.eot_id] else 0,
            # (errors "replace": the number of U+FFFD substituted, in how many files, and those with the most, up to 5)
            "replaced": sum(replaced),
            "replaced_files": sum(n > 0 for n in replaced),
            "replaced_in": [_shown_name(files[i], input) for i in sorted(range(len(files)), key=lambda i: -replaced[i])
                            if replaced[i]][:5],
        }
        # meta.json is written last: a folder with meta.json is a complete dataset.
        with open(tmp / "meta.json", "w", encoding="utf-8", newline="\n") as f:  # (LF on Windows too)
            json.dump(meta, f, indent=2)
            f.write("\n")

        sync_folder(tmp)  # (on disk before the folder takes its name: meta.json says the dataset is complete)
        # Swap the finished folder into place. When overwriting, the old dataset is
        # moved aside first and deleted only after the new one is in place. Without --overwrite a dataset
        # that another command finished meanwhile is kept (a rename onto a folder that is not empty fails).
        if out.exists() and overwrite:
            os.replace(out, old)
        # (Windows refuses a rename onto a folder that is not empty with EACCES)
        taken = (errno.ENOTEMPTY, errno.EEXIST, errno.EACCES) if os.name == "nt" else (errno.ENOTEMPTY, errno.EEXIST)
        try:
            if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
                with contextlib.suppress(FileNotFoundError):  # (another prepare may have removed it first)
                    out.rmdir()  # an empty --out folder: Windows renames onto no folder at all, even an empty one
            os.replace(tmp, out)
            swapped = True
        except OSError as e:
            if e.errno not in taken or not (out / "meta.json").exists():
                _put_back(old, out)
                raise
            # Another command put a complete dataset there meanwhile (two runs preparing the same data at once)
            shutil.rmtree(old, ignore_errors=True)  # (what this one had moved aside stayed there for ever)
            if not overwrite:
                raise FunGPTError(f"{out} was prepared by another command while this one ran; pass --overwrite to "
                                  f"replace it") from None
            try:
                same = same_dataset(read_json(out / "meta.json"), meta)
            except ValueError:
                same = False
            if not same:  # from other text or other settings: this command's dataset replaces it
                os.replace(out, old)
                try:
                    os.replace(tmp, out)
                    swapped = True
                except OSError:  # (a third one meanwhile)
                    _put_back(old, out)
                    raise
            # else both made the same dataset: the other's stands
        fsync_dir(out.parent)  # (the rename itself, durable)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = (" (fungpt train prepares its data there: set FUNGPT_CACHE_DIR to a folder with room, or prepare "
                 "it with `fungpt prepare --out DIR` and train with data.path = DIR)"
                 if out.is_relative_to(cache_dir().expanduser().resolve()) else "; choose another --out")
        raise FunGPTError(f"could not write the dataset to {out}: {e.strerror or e}{where}") from None
    except BaseException as e:  # (Ctrl-C, SIGTERM: between the two renames, the dataset moved aside goes back)
        if swapped:  # the new dataset is in place, complete: only the cleaning up after it was cut short
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
            if type(e) is KeyboardInterrupt and not e.args:  # (Ctrl-C: said as it is; a SIGTERM's line is its own)
                raise KeyboardInterrupt(f"{out} holds the dataset just prepared, complete") from None
            raise
        _put_back(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------
# Reading a prepared dataset
# ---------------------------------------------------------------------------

_REQUIRED_KEYS = ("format_version", "tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens")


OWN_IDS = "README, \"Data of your own token ids\""  # where a folder of token ids made without prepare is described


def mend(meta: dict | None) -> str:
    """How to mend a damaged dataset folder, for the end of a message. `fungpt prepare` made the folder when its
    meta.json names the text's sha256: prepare it again. A folder of the user's own token ids has no text to
    prepare from (and `prepare --overwrite` would replace its files): correct it by hand. meta None: unread."""
    if meta is None:
        return f"run `fungpt prepare --overwrite` again, or, for a folder of your own token ids, correct it ({OWN_IDS})"
    if "source_sha256" in meta:
        return "run `fungpt prepare --overwrite` again"
    return f"correct meta.json or the files ({OWN_IDS})"


def max_token_id(data_dir: Path, meta: dict, chunk: int = 1 << 26) -> int:
    """The largest token id in a folder's splits (-1 for none): meta.json's max_id where prepare recorded it, else
    read from the files, `chunk` tokens at a time."""
    if isinstance(meta.get("max_id"), int) and not isinstance(meta["max_id"], bool):
        return meta["max_id"]
    top = -1
    for split in SPLITS:
        if meta[f"{split}_tokens"]:
            ids = np.memmap(Path(data_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r")
            top = max([top] + [int(ids[start:start + chunk].max()) for start in range(0, len(ids), chunk)])
    return top


def check_token_ids(data_dir: Path, meta: dict, chunk: int = 1 << 26) -> str | None:
    """Refuse token ids >= meta's vocab_size, as a hand-made or edited dataset may hold: the embedding lookup
    would otherwise fail mid-run with a raw IndexError (on a GPU, a device-side assert). A folder written by
    `prepare` records its largest id in meta.json (max_id); any other is read once, `chunk` tokens at a time
    (numpy's max runs at several GB/s from memory: ~1 ms for Tiny Shakespeare, seconds for gigabytes).

    Returns a note for the user when the ids look like they were written with another dtype than meta.json
    names (None otherwise)."""
    vocab = meta["vocab_size"]
    if isinstance(meta.get("max_id"), int) and not isinstance(meta["max_id"], bool):  # recorded by prepare
        if meta["max_id"] >= vocab:
            raise FunGPTError(f"{Path(data_dir) / 'meta.json'} says its largest token id is {meta['max_id']} but its "
                              f"vocab_size is {vocab}: ids must be below it. Prepare the data again with `fungpt "
                              f"prepare`")
        return None
    note = None
    for split in SPLITS:  # a folder made some other way: read every id
        if not meta[f"{split}_tokens"]:
            continue
        bin_path = Path(data_dir) / f"{split}.bin"
        ids = np.memmap(bin_path, dtype=meta["dtype"], mode="r")
        # uint32 ids read as uint16 are little-endian pairs (id, 0): every second value 0, and nothing out of range.
        # Real uint16 data can look the same (one character a line: id 0, the newline, every second token), so
        # this is a note, not a refusal.
        # Likewise int64 ids (numpy's default integer, 8 bytes): (id, 0, 0, 0) as uint16, (id, 0) as uint32.
        head = ids[:4096]
        per = 4 if meta["dtype"] == "uint16" else 2  # values of one int64 id
        if len(head) >= 64 and not note and head[0::per].any() and not any(head[i::per].any() for i in range(1, per)):
            note = (f"fungpt: note: only every {'fourth' if per == 4 else 'second'} token of {bin_path} is not id 0 "
                    f"({len(head):,} read): if its ids were written as 64-bit integers (int64, numpy's default), "
                    f"write them again with ids.astype(np.{meta['dtype']}).tofile(path) and divide train_tokens and "
                    f"val_tokens by {per} ({OWN_IDS}); if id 0 really falls there, nothing is wrong")
        elif meta["dtype"] == "uint16" and len(head) >= 64 and not head[1::2].any() and head[0::2].any() and not note:
            note = (f"fungpt: note: every second token of {bin_path} is id 0 ({len(head):,} read): if its ids were "
                    f"written as uint32, set \"dtype\": \"uint32\" in meta.json and halve train_tokens and "
                    f"val_tokens ({OWN_IDS}); if id 0 really alternates with the others, nothing is wrong")
        for start in range(0, len(ids), chunk):
            top = int(ids[start:start + chunk].max())
            if top >= vocab:
                where = start + int(np.argmax(ids[start:start + chunk] >= vocab))
                bad = int(ids[where])
                if meta["dtype"] == "uint32" and bad >> 16 < vocab and bad & 0xFFFF < vocab:
                    raise FunGPTError(f"{bin_path} holds token id {bad} (at token {where}), two ids below vocab_size "
                                      f"{vocab} side by side: the file looks like uint16 ids, but meta.json says "
                                      f"dtype uint32; set \"dtype\": \"uint16\" and double train_tokens and "
                                      f"val_tokens ({OWN_IDS})")
                raise FunGPTError(f"{bin_path} holds token id {bad} (at token {where}), but meta.json's "
                                  f"vocab_size is {vocab}: ids must be below it; {mend(meta)}")
    return note


def is_prepared(path: str | Path) -> bool:
    """Whether `path` is a folder that `fungpt prepare` made: a meta.json with its token files or tokenizer
    beside it, alone, or of prepare's own format (a prepared folder that lost its files, for load_meta to name
    them).

    Any meta.json is not enough: a folder of the user's own texts may hold one of its own, to be read as text
    (and never replaced by `prepare --overwrite`)."""
    path = Path(path).expanduser()
    if not (path / "meta.json").is_file():
        return False
    if any((path / name).is_file() for name in ("train.bin", "val.bin", "tokenizer_meta.json")):
        return True
    if not any(p.name != "meta.json" for p in path.iterdir()):
        return True  # nothing else: no text to read, a prepared folder that lost the rest
    try:
        meta = read_json(path / "meta.json")
    except (OSError, ValueError):  # (not JSON, not UTF-8, nested past the parser's depth: the user's own file)
        return False
    return isinstance(meta, dict) and "format_version" in meta and "train_tokens" in meta


def load_meta(data_dir: str | Path) -> dict:
    """Read DIR/meta.json and check that the .bin files match it; return the dict."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not data_dir.is_dir():
        raise FunGPTError(f"data folder {data_dir} does not exist; create it with `fungpt prepare --out {data_dir}`"
                          + left_in_a_temporary(data_dir))
    if not meta_path.is_file():
        raise FunGPTError(
            f"{data_dir} is not a prepared dataset ({meta_path} is missing); create it with `fungpt prepare`"
        )
    try:
        meta = read_json(meta_path)
        if not isinstance(meta, dict):  # (`k in meta` below would search a string's text)
            raise TypeError
        missing = [k for k in _REQUIRED_KEYS if k not in meta]
    except (OSError, ValueError, TypeError) as e:
        raise FunGPTError(
            f"{meta_path} is corrupt ({type(e).__name__}); {mend(None)}"
        ) from None
    if missing:
        raise FunGPTError(f"{meta_path} lacks {', '.join(missing)}; {mend(meta)}")
    version = meta["format_version"]
    if version != FORMAT_VERSION or isinstance(version, bool):
        number = isinstance(version, (int, float)) and not isinstance(version, bool)
        newer = number and version > FORMAT_VERSION
        fix = "a newer FunGPT wrote it: upgrade FunGPT, or " if newer else ""
        raise FunGPTError(
            f"{meta_path} has format version {version!r}, this FunGPT reads version {FORMAT_VERSION}"
            + ("" if number else " (a number)") + f"; {fix}{mend(meta)}"
        )
    # Whole numbers (a hand-edited "8100" would multiply as a string), each at least this. val_bytes and val_chars,
    # the val text's size that eval's bits per byte/char divide by, are optional: a folder made by hand may lack them
    least = {"vocab_size": 1, "train_tokens": 0, "val_tokens": 0, "val_bytes": 1, "val_chars": 1}
    bad = [k for k, n in least.items()
           if k in meta and (not isinstance(meta[k], int) or isinstance(meta[k], bool) or meta[k] < n)]
    if bad:
        why = "; ".join(f"{k} must be a whole number{f' of at least {least[k]}' if least[k] else ''} (got {meta[k]!r})"
                        for k in bad)
        raise FunGPTError(f"{meta_path} is corrupt: {why}; {mend(meta)}")
    if meta["dtype"] not in ("uint16", "uint32"):  # what prepare writes (see token_dtype)
        raise FunGPTError(f"{meta_path} names the token dtype {meta['dtype']!r}, which FunGPT does not read: token "
                          f"ids are stored as uint16 (a vocabulary up to 65,536) or uint32; convert the .bin files, "
                          f"or {mend(meta)}")
    if meta["dtype"] == "uint16" and meta["vocab_size"] > 2**16:  # (ids from 65,536 on do not fit in 16 bits)
        raise FunGPTError(f"{meta_path} says dtype uint16 for a vocabulary of {meta['vocab_size']:,}, whose ids from "
                          f"65,536 on a uint16 cannot hold: write the ids as uint32 and say \"dtype\": \"uint32\"; "
                          f"{mend(meta)}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        bin_path = data_dir / f"{split}.bin"
        if not bin_path.is_file():
            if (data_dir / f"{split}.npy").is_file():  # (np.save's file: a header, then the ids)
                raise FunGPTError(f"{bin_path} is missing, and {split}.npy beside it is a NumPy file, which FunGPT "
                                  f"does not read: write its ids raw, np.load('{split}.npy').astype(np.{meta['dtype']})"
                                  f".tofile('{split}.bin') ({OWN_IDS})")
            raise FunGPTError(f"{bin_path} is missing; {mend(meta)}")
        if "source_sha256" not in meta:  # ids written by hand: np.save's header would be read as 64 token ids
            with open(bin_path, "rb") as f:
                if f.read(6) == b"\x93NUMPY":
                    raise FunGPTError(f"{bin_path} is a NumPy .npy file (np.save), not raw token ids: write them with "
                                      f"ids.astype(np.{meta['dtype']}).tofile(path) ({OWN_IDS})")
        expected = meta[f"{split}_tokens"] * itemsize
        actual = bin_path.stat().st_size
        if actual != expected:
            other = "uint32" if meta["dtype"] == "uint16" else "uint16"
            fits = ("source_sha256" not in meta and actual % itemsize == 0
                    and f"set {split}_tokens to {actual // itemsize} (the file's size over {itemsize} bytes), or ")
            if "source_sha256" not in meta and actual == meta[f"{split}_tokens"] * np.dtype(other).itemsize:
                fits = (f"the size fits {meta[f'{split}_tokens']} {other} tokens: if the ids are {other}, set "
                        f"\"dtype\": \"{other}\"; else ")
            elif "source_sha256" not in meta and actual == meta[f"{split}_tokens"] * 8:  # (numpy's default integer)
                fits = (f"the size fits {meta[f'{split}_tokens']} ids of 8 bytes (int64, numpy's default integer): "
                        f"write them with ids.astype(np.{meta['dtype']}).tofile(path); else ")
            raise FunGPTError(
                f"{bin_path} has {actual} bytes but meta.json promises {meta[f'{split}_tokens']} "
                f"{meta['dtype']} tokens ({expected} bytes); {fits or ''}{mend(meta)}"
            )
    return meta


def data_fingerprint(meta: dict) -> str | None:
    """The text a prepared folder was made from and how it was split: "sha256 : train tokens : val tokens" (None for
    token ids prepared elsewhere: no sha256). Each checkpoint records it, so that a resume or an eval onto a folder
    prepared again (edited text, another split) can say its val split may now hold text the run trained on."""
    if not meta.get("source_sha256"):
        return None
    return f"{meta['source_sha256']}:{meta['train_tokens']}:{meta['val_tokens']}"


def check_split_fits(meta: dict, block_size: int, prepared_by_user: bool = False, resuming: bool = False) -> None:
    """Refuse a block_size that leaves no room for a single (x, y) window in a split.

    prepared_by_user: the data is a folder the user prepared (data.val_fraction does not apply to it).
    resuming: a resumed run's block_size is its checkpoint's, so the fix is other data."""
    for split in SPLITS:
        n = meta[f"{split}_tokens"]
        if block_size + 1 > n:
            fixes = ["a smaller model.block_size (--model.block-size)"] if n >= 2 else []  # (none fits 0 or 1)
            if resuming:
                fixes = ["the data the run trained on (a resumed run keeps its block_size), or train a new run "
                         "(another out_dir)"]
            elif prepared_by_user and "source_sha256" not in meta:  # token ids of the user's own: no text to prepare
                fixes.append(f"more token ids in {split}.bin (with {split}_tokens in meta.json raised; {OWN_IDS})")
            else:
                fixes.append("more text")
                larger = "a larger" if split == "val" else "a smaller"  # (the train split gets the rest)
                # (only where both splits can hold a window: "hi" split otherwise is no fix)
                if meta["train_tokens"] + meta["val_tokens"] >= 2 * (block_size + 1):
                    fixes.append(f"prepare the folder again with {larger} --val-fraction (`fungpt prepare ... "
                                 f"--overwrite`)" if prepared_by_user
                                 else f"{larger} data.val_fraction (--data.val-fraction)")
            either = fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])}{',' * (len(fixes) > 2)} or {fixes[-1]}"
            raise FunGPTError(
                f"block size {block_size} is too large for this dataset: the {split} split has only {n} "
                f"token{'s' * (n != 1)} and one window needs block_size + 1 = {block_size + 1}; use {either}"
            )


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # Pinned (page-locked) memory lets the copy run asynchronously with compute.
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class BatchLoader:
    """Random (x, y) training windows from DIR/{split}.bin.

    Every call to `next_batch()` picks `batch_size` start positions uniformly at
    random and returns x = tokens[s : s + block_size], y = tokens[s + 1 : s + block_size + 1]
    as int64 tensors of shape (batch_size, block_size).

    The randomness comes from the loader's own torch.Generator, seeded from
    (seed, rank, split): runs are reproducible, every DDP rank sees different
    windows, and `state_dict()` captures the generator so a resumed run draws
    exactly the batches it would have drawn without stopping.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        block_size: int,
        device: str | torch.device = "cpu",
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
    ):
        if split not in SPLITS:
            raise FunGPTError(f"unknown split {split!r}: use 'train' or 'val'")
        if not 0 <= rank < world_size:
            raise FunGPTError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size < 1 or block_size < 1:
            raise FunGPTError(f"batch_size {batch_size} and block_size {block_size} must both be positive")
        self.meta = load_meta(data_dir)
        check_split_fits(self.meta, block_size)
        self.path = Path(data_dir) / f"{split}.bin"
        self.dtype = np.dtype(self.meta["dtype"])
        self.n_tokens = self.meta[f"{split}_tokens"]
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.device = torch.device(device)
        # world_size is only checked: windows are random, so ranks need no sharding,
        # just different seeds (below).
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # Mix (seed, rank, split) into one well-spread 63-bit seed.
        words = np.random.SeedSequence([seed, rank, SPLITS.index(split)]).generate_state(2, dtype=np.uint32)
        self.generator = torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))
        self.batches_drawn = 0
        self._offsets = np.arange(block_size + 1)
        # The file is opened once and held, so the loader reads the tokens it was made for to the end: the folder
        # prepared again meanwhile (`fungpt prepare --overwrite` swaps a new one in) gave a live run the new text's
        # batches, silently, or an IndexError when that was shorter. (train.py notices the swap at its next eval.)
        self._open()

    def _open(self) -> None:
        self._file = open(self.path, "rb")
        weakref.finalize(self, self._file.close)  # (closed with the loader)

    def __getstate__(self) -> dict:  # copy, deepcopy, pickle (a DataLoader's worker processes): the file reopened
        return {k: v for k, v in self.__dict__.items() if k != "_file"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # We map the file afresh for every batch, like nanoGPT: pages read
        # through a long-lived memmap stay counted in the process's memory, which
        # looks like a leak on big datasets. Mapping it costs microseconds.
        data = np.memmap(self._file, dtype=self.dtype, mode="r")
        # Largest start is n - block_size - 1 so that y's last token exists.
        starts = torch.randint(self.n_tokens - self.block_size, (self.batch_size,), generator=self.generator)
        # One fancy-index gathers all windows at once: row b holds tokens
        # starts[b] .. starts[b] + block_size (block_size + 1 of them).
        windows = torch.from_numpy(data[starts.numpy()[:, None] + self._offsets].astype(np.int64))
        _check_ids(windows, self.meta["vocab_size"], self.path, self.meta)
        self.batches_drawn += 1
        # Copies (not .contiguous(), which returns a view when batch_size is 1): x and y must not share
        # memory, or a caller that masks targets in y would change x too (eval_windows below did)
        x = windows[:, :-1].clone()  # (B, T)
        y = windows[:, 1:].clone()  # (B, T): x shifted by one
        return _to_device(x, self.device), _to_device(y, self.device)

    def state_dict(self) -> dict:
        """Plain tensors and ints only, so torch.load(weights_only=True) can read it."""
        return {
            "generator_state": self.generator.get_state(),
            "batches_drawn": self.batches_drawn,
            "seed": self.seed,
            "rank": self.rank,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])
        self.batches_drawn = int(state["batches_drawn"])


def _check_ids(windows: torch.Tensor, vocab_size: int, source: Path | str, meta: dict | None) -> None:
    """Refuse a batch holding an id past the vocabulary (a .bin damaged after prepare checked it, which
    check_token_ids does not read again): the embedding would fail with a raw IndexError, or on a GPU a
    device-side assert. One max over the batch's ids on the CPU, microseconds. meta: the folder's meta.json, for
    the advice (a folder of one's own ids has no text to prepare again; see mend)."""
    top = int(windows.max())
    if top >= vocab_size:
        raise FunGPTError(f"{source} holds token id {top}, but the vocabulary has {vocab_size} (ids 0.."
                          f"{vocab_size - 1}): the file is damaged; {mend(meta)}")


def eval_windows(
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    device: str | torch.device = "cpu",
    ignore_index: int = -1,
    vocab_size: int | None = None,
    source: Path | str = "the data",
    meta: dict | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches, each (B, T), that score every token of `tokens` exactly once.

    `tokens` is any 1-D array of ids (a memmapped .bin file, or text just encoded).
    Windows start at 0, T, 2T, ... so each token (except the first, which has no
    context) is a target once. If the tail does not fill a window, one last window
    ends at the final token and its targets already scored are set to `ignore_index`
    (skip them in the loss, e.g. F.cross_entropy(..., ignore_index=-1)): the tail
    keeps a full context instead of being padded. Text shorter than a window gives one
    shorter window (T = n - 1). The last batch may be smaller. n - 1 targets in all.
    With vocab_size, a batch holding an id past the vocabulary is refused, naming `source`, with advice for the
    folder whose meta.json is `meta` (None: a text just encoded, or unknown).
    """
    n = len(tokens)
    if n < 2:
        raise FunGPTError(f"cannot evaluate {n} token(s): at least 2 are needed (one to read, one to predict)")
    device = torch.device(device)
    T = min(block_size, n - 1)
    n_full = (n - 1) // T
    tail = (n - 1) - n_full * T  # targets not covered by the full windows
    n_windows = n_full + (tail > 0)
    offsets = np.arange(T + 1)
    for i in range(0, n_windows, batch_size):
        # window j starts at j * T; the last, for the tail, at n - 1 - T (computed per batch: a list of every start
        # took 36 bytes a window, 3 GB for a split of 5G tokens)
        batch_starts = np.arange(i, min(i + batch_size, n_windows), dtype=np.int64) * T
        if tail and i + batch_size >= n_windows:
            batch_starts[-1] = n - 1 - T
        windows = torch.from_numpy(np.asarray(tokens[batch_starts[:, None] + offsets]).astype(np.int64))
        if vocab_size is not None:
            _check_ids(windows, vocab_size, source, meta)
        # Copies, not views: with one window in the batch, both slices are already contiguous, and y's
        # ignore_index below would also have written into x (x held -1s: an IndexError in the embedding)
        x = windows[:, :-1].clone()  # (B, T)
        y = windows[:, 1:].clone()  # (B, T): x shifted by one
        if tail and i + batch_size >= n_windows:
            y[-1, : T - tail] = ignore_index  # those targets were scored already
        yield _to_device(x, device), _to_device(y, device)


def iter_eval_windows(
    data_dir: str | Path,
    split: str,
    block_size: int,
    batch_size: int,
    device: str | torch.device = "cpu",
    ignore_index: int = -1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`eval_windows` over a prepared split (memory-mapped, so it works for any size)."""
    meta = load_meta(data_dir)
    check_split_fits(meta, block_size)
    path = Path(data_dir) / f"{split}.bin"
    data = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    yield from eval_windows(data, block_size, batch_size, device, ignore_index, meta["vocab_size"], path, meta)
