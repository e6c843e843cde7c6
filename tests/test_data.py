"""Tests for fungpt.data: prepare, Tiny Shakespeare lookup/download, loaders.

Hermetic: the download is exercised with file:// URLs and a temporary cache.
Tests needing the real Tiny Shakespeare read it from $FUNGPT_DATA_DIR and are
skipped when that is not set.
"""

import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import fungpt.data as data_mod
import fungpt.tokenizer as tokenizer_mod
from fungpt.data import (
    BatchLoader,
    check_split_fits,
    encode_file,
    iter_eval_windows,
    load_meta,
    prepare,
    resolve_source,
    shakespeare_path,
    token_dtype,
)
from fungpt.errors import FunGPTError
from fungpt.tokenizer import EOT_TEXT, load_tokenizer

TEXT = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n"
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n  Deny thy father.\n"
) * 40


def shakespeare_file() -> Path | None:
    data_dir = os.environ.get("FUNGPT_DATA_DIR")
    path = Path(data_dir) / "tinyshakespeare.txt" if data_dir else None
    return path if path and path.is_file() else None


needs_shakespeare = pytest.mark.skipif(
    shakespeare_file() is None, reason="FUNGPT_DATA_DIR with tinyshakespeare.txt not set"
)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture
def char_data(tmp_path, corpus) -> Path:
    return prepare(corpus, tmp_path / "char", progress=False)


def read_bin(directory: Path, split: str) -> np.ndarray:
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    return np.fromfile(directory / f"{split}.bin", dtype=meta["dtype"])


def leftovers(parent: Path) -> list[str]:
    """Names of temporary folders prepare may have left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- prepare: contents ---------------------------------------------------------


@pytest.mark.parametrize("kind,vocab", [("char", None), ("bpe", 400)])
def test_prepare_writes_consistent_dataset(tmp_path, corpus, kind, vocab):
    out = prepare(corpus, tmp_path / "out", tokenizer=kind, vocab_size=vocab, progress=False)
    meta = load_meta(out)
    for key in (
        "tokenizer",
        "vocab_size",
        "dtype",
        "train_tokens",
        "val_tokens",
        "train_bytes",
        "val_bytes",
        "train_chars",
        "val_chars",
        "source",
        "source_sha256",
        "val_fraction",
        "format_version",
    ):
        assert key in meta
    assert meta["tokenizer"] == kind and meta["dtype"] == "uint16"
    assert meta["source_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    n_train = int(len(TEXT) * 0.9)
    assert (meta["train_chars"], meta["val_chars"]) == (n_train, len(TEXT) - n_train)
    assert meta["train_bytes"] == len(TEXT[:n_train].encode("utf-8"))
    tok = load_tokenizer(out)
    assert tok.vocab_size == meta["vocab_size"]
    for split, text in (("train", TEXT[:n_train]), ("val", TEXT[n_train:])):
        ids = read_bin(out, split)
        assert (out / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"] * 2
        assert len(ids) == meta[f"{split}_tokens"]
        assert ids.tolist() == tok.encode(text)  # same as encoding the split in one go
        assert tok.decode(ids.tolist()) == text
    assert leftovers(tmp_path) == []


def test_prepare_counts_utf8_bytes_not_characters(tmp_path):
    """train_bytes + val_bytes are the text's UTF-8 bytes (bits per byte divide by them): counting characters
    instead agrees only on ASCII text."""
    text = "café 日本\n" * 50  # 8 characters, 13 bytes a line
    path = tmp_path / "utf8.txt"
    path.write_text(text, encoding="utf-8")
    meta = load_meta(prepare(path, tmp_path / "out", progress=False))
    assert meta["train_chars"] + meta["val_chars"] == 8 * 50
    assert meta["train_bytes"] + meta["val_bytes"] == len(text.encode("utf-8")) == 13 * 50
    n_train = int(len(text) * 0.9)
    assert meta["train_bytes"] == len(text[:n_train].encode("utf-8")) != n_train


def test_small_chunks_give_identical_bpe_tokens(tmp_path, corpus, monkeypatch):
    """Chunked reading and grouped batch encoding must not change any token."""
    big = prepare(corpus, tmp_path / "big", tokenizer="bpe", vocab_size=300, progress=False)
    monkeypatch.setattr(data_mod, "CHUNK_BYTES", 64)
    monkeypatch.setattr(data_mod, "BPE_GROUP_CHARS", 10)
    small = prepare(corpus, tmp_path / "small", tokenizer="bpe", vocab_size=300, progress=False)
    for split in ("train", "val"):
        assert read_bin(big, split).tolist() == read_bin(small, split).tolist()


def test_each_split_has_the_ids_of_its_whole_text_wherever_a_chunk_ends(tmp_path, monkeypatch):
    """A chunk ends before a "\n" after a space where a non-space follows that "\n"; when the train/val boundary
    fell just past it, the train text's last " \n" became two tokens, where encoding the train text in one go
    gives one."""
    monkeypatch.setattr(data_mod, "CHUNK_BYTES", 64)
    for lines in (150, 151):  # (a 10% val split of ~110 characters, past the 80 Ys that hold no safe cut)
        train = "ab \n\n" * lines + "x \n"  # the boundary just past this "\n"; a chunk ends before it
        n = math.ceil(len(train) / 0.9)
        while int(n * 0.9) != len(train):
            n += 1
        boundary = len(train)
        text = train + ("Y" * 80 + "cd \n" * n)[: n - boundary]
        path = tmp_path / f"t{lines}.txt"
        path.write_text(text, encoding="utf-8", newline="")
        out = prepare(path, tmp_path / f"o{lines}", tokenizer="bpe", vocab_size=300, progress=False)
        tok = load_tokenizer(out)
        assert read_bin(out, "train").tolist() == tok.encode(text[:boundary])
        assert read_bin(out, "val").tolist() == tok.encode(text[boundary:])


def test_encode_file_reads_in_chunks_with_the_ids_of_the_whole_text(tmp_path, corpus, monkeypatch):
    """`fungpt eval --input` encodes its file piece by piece (a whole 50 MB text took ~8 GB as one BPE call)."""
    tok = load_tokenizer(prepare(corpus, tmp_path / "bpe", tokenizer="bpe", vocab_size=300, progress=False))
    text = "\ufeff" + TEXT.replace("\n", "\r\n", 3) + "caf\u00e9  \n"  # a BOM, some \r\n, non-ASCII, trailing spaces
    path = tmp_path / "eval.txt"
    path.write_bytes(text.encode("utf-8"))
    whole = np.array(tok.encode(text[1:]))
    monkeypatch.setattr(data_mod, "CHUNK_BYTES", 64)
    monkeypatch.setattr(data_mod, "BPE_GROUP_CHARS", 10)
    ids, n_bytes, n_chars = encode_file(path, tok)
    assert ids.dtype == np.uint16 and ids.tolist() == whole.tolist()
    assert (n_bytes, n_chars) == (len(text[1:].encode("utf-8")), len(text) - 1)  # the BOM is not text
    # the ids go into one array sized by the file; a tokenizer of more tokens than bytes (SentencePiece's "▁"s)
    # grows it
    encode = data_mod._encode
    monkeypatch.setattr(data_mod, "_encode", lambda tok, text: np.repeat(encode(tok, text), 5))
    ids, _, _ = encode_file(path, tok)
    assert ids.tolist() == np.repeat(whole, 5).tolist() and len(ids) > path.stat().st_size
    monkeypatch.setattr(data_mod, "_encode", encode)

    # a char vocabulary names an unknown character where it is in the file, not where it is in its piece
    char_tok = load_tokenizer(prepare(corpus, tmp_path / "char", tokenizer="char", progress=False))
    path.write_text(TEXT + "\u00e9", encoding="utf-8")
    with pytest.raises(FunGPTError, match=rf"'\u00e9' \(U\+00E9 LATIN SMALL LETTER E WITH ACUTE\) at position "
                                          rf"{len(TEXT):,} "):
        encode_file(path, char_tok)
    path.write_bytes(TEXT.encode() + b"\xff")
    with pytest.raises(FunGPTError, match=rf"not valid UTF-8 \(bad byte at offset {len(TEXT)}\); convert it to UTF-8"):
        encode_file(path, char_tok)


def test_gpt2_prepare_with_fake_encoding(tmp_path, corpus, monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([i]): i for i in range(256)}
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    fake = tiktoken.Encoding(name="fake-gpt2", pat_str=pat, mergeable_ranks=ranks, special_tokens={EOT_TEXT: 257})
    monkeypatch.setattr(tokenizer_mod, "_load_gpt2_encoding", lambda: fake)
    out = prepare(corpus, tmp_path / "g", tokenizer="gpt2", progress=False)
    meta = load_meta(out)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 258 and meta["eot_id"] == 257
    assert load_tokenizer(out).decode(read_bin(out, "train").tolist()) == TEXT[: meta["train_chars"]]


def test_the_bpe_bar_says_when_the_text_is_read_and_merging_goes_on(tmp_path, corpus, capsys):
    """The bar counts the bytes read; the merges come after, for as long again on a large corpus, and the bar sat at
    100% meanwhile, looking stuck."""
    prepare(corpus, tmp_path / "b", tokenizer="bpe", vocab_size=300, progress=True)
    assert "training bpe (text read; merging, no progress shown)" in capsys.readouterr().err


def test_gpt2_unavailable_is_clean_error(tmp_path, corpus, monkeypatch):
    def offline():
        raise FunGPTError("could not load GPT-2's encoding through tiktoken (offline)")

    monkeypatch.setattr(tokenizer_mod, "_load_gpt2_encoding", offline)
    with pytest.raises(FunGPTError, match="tiktoken"):
        prepare(corpus, tmp_path / "g", tokenizer="gpt2", progress=False)
    assert not (tmp_path / "g").exists() and leftovers(tmp_path) == []


def test_a_dataset_left_complete_in_its_temporary_folder_is_named_where_it_is_missing(tmp_path, corpus):
    """`prepare --overwrite` killed between moving the old dataset aside and renaming the new one into place (one
    system call apart) left OUT missing and the complete new dataset in OUT.tmp-HOST-PID: the errors said only
    "does not exist"."""
    from fungpt.config import DataConfig
    from fungpt.rundata import resolve_data

    out = tmp_path / "prep"
    prepare(corpus, out, "char")
    (tmp_path / "prep.tmp-box-7").mkdir()  # an incomplete one (no meta.json) is not offered
    out.rename(tmp_path / "prep.tmp-box-9")
    hint = (f"(a `fungpt prepare` stopped while putting it in place left the complete dataset in "
            f"{tmp_path / 'prep.tmp-box-9'}: rename that folder to prep)")
    for call in (lambda: load_meta(out), lambda: resolve_data(DataConfig(path=str(out)), progress=False),
                 lambda: data_mod.resolve_source(out)):
        with pytest.raises(FunGPTError) as err:
            call()
        assert str(err.value).endswith(hint), str(err.value)
    shutil.rmtree(tmp_path / "prep.tmp-box-9")
    with pytest.raises(FunGPTError) as err:
        load_meta(out)
    assert str(err.value).endswith("create it with `fungpt prepare --out " + str(out) + "`")


def test_prepare_refuses_an_empty_path_from_python_too(tmp_path, corpus, monkeypatch):
    """prepare("", ...) prepared the current folder (Path("") is "."), without a word."""
    monkeypatch.chdir(corpus.parent)
    for args, said in ((("", tmp_path / "x"), "prepare: input is empty"), ((corpus, " "), "prepare: out is empty")):
        with pytest.raises(FunGPTError, match=said):
            prepare(*args)
    assert not (tmp_path / "x").exists()


def test_folder_input_sorted_with_separators(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second doc " * 30, encoding="utf-8")
    (folder / "a.md").write_text("first doc " * 30, encoding="utf-8")
    (folder / "sub" / "c").write_text("third doc " * 30, encoding="utf-8")
    (folder / "empty.txt").write_bytes(b"")
    (folder / ".hidden").write_bytes(b"\x00\x01 secret")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: main", encoding="utf-8")
    files = resolve_source(folder)
    assert [p.relative_to(folder).as_posix() for p in files] == ["a.md", "b.txt", "sub/c"]

    expected = "first doc " * 30 + "{sep}" + "second doc " * 30 + "{sep}" + "third doc " * 30
    char = prepare(folder, tmp_path / "char", val_fraction=0.2, progress=False)
    text = expected.format(sep="\n")
    ids = np.concatenate([read_bin(char, "train"), read_bin(char, "val")]).tolist()
    assert load_tokenizer(char).decode(ids) == text
    assert load_meta(char)["source_files"] == 3

    bpe = prepare(folder, tmp_path / "bpe", tokenizer="bpe", vocab_size=300, val_fraction=0.2, progress=False)
    tok = load_tokenizer(bpe)
    ids = np.concatenate([read_bin(bpe, "train"), read_bin(bpe, "val")]).tolist()
    assert ids.count(tok.eot_id) == 2
    assert tok.decode(ids) == expected.format(sep=EOT_TEXT)
    # bits per byte divide by the text: the <|endoftext|> between files is one token, not 13 characters of it
    # (else many small files would lower them); a char vocabulary's newline between files is a character
    for data, separators in ((char, 2), (bpe, 0)):
        meta = load_meta(data)
        assert meta["train_bytes"] + meta["val_bytes"] == meta["train_chars"] + meta["val_chars"] == \
            300 + 330 + 300 + separators


def test_split_never_cuts_through_the_separator(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("x" * 86, encoding="utf-8")
    (folder / "b.txt").write_text("y" * 1, encoding="utf-8")
    # 86 + 13 + 1 = 100 chars; the 0.1 split point (90) falls inside <|endoftext|>.
    out = prepare(folder, tmp_path / "out", tokenizer="bpe", vocab_size=260, progress=False)
    meta = load_meta(out)
    assert (meta["train_chars"], meta["val_chars"]) == (86, 1)  # (the separator is one token, not the text's)
    assert read_bin(out, "val").tolist() == load_tokenizer(out).encode("y")


def test_errors_replace_substitutes(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello \xff world\n" * 20)
    out = prepare(path, tmp_path / "out", errors="replace", progress=False)
    assert "\ufffd" in load_tokenizer(out).chars


def test_byte_order_marks_are_not_text(tmp_path):
    """Notepad-style files start with a byte-order mark: in each file of a folder, it must not become a token."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"\xef\xbb\xbf" + b"first doc\n" * 20)
    (folder / "b.txt").write_bytes(b"\xef\xbb\xbf" + b"second doc, \xef\xbb\xbf inside stays\n" * 20)
    out = prepare(folder, tmp_path / "char", val_fraction=0.2, progress=False)
    ids = np.concatenate([read_bin(out, "train"), read_bin(out, "val")]).tolist()
    assert load_tokenizer(out).decode(ids) == "first doc\n" * 20 + "\n" + "second doc, \ufeff inside stays\n" * 20
    # also where a read happens to start at it: only the file's first bytes can be a byte-order mark
    inside = _write(tmp_path, "inside.txt", b"ab\xef\xbb\xbfcd")
    assert "".join(data_mod._iter_file_text(inside, "strict", 2, None)) == "ab\ufeffcd"


def test_token_dtype():
    assert token_dtype(65) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(100_277) == np.uint32


# --- prepare: Tiny Shakespeare -------------------------------------------------------


@needs_shakespeare
def test_shakespeare_char_matches_nanogpt(tmp_path, monkeypatch):
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))  # must not be needed
    assert shakespeare_path() == shakespeare_file()
    out = prepare("shakespeare", tmp_path / "sh", progress=False)
    meta = load_meta(out)
    assert meta["vocab_size"] == 65
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)
    assert (meta["train_chars"], meta["val_chars"]) == (1_003_854, 111_540)
    assert meta["source_sha256"] == data_mod.SHAKESPEARE_SHA256
    assert not (tmp_path / "cache").exists()


# --- Tiny Shakespeare lookup and download ------------------------------------------------


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    """Point the download at a small local file (file:// URL) with its checksum; empty cache."""
    source = tmp_path / "remote" / "input.txt"
    source.parent.mkdir()
    source.write_text(TEXT, encoding="utf-8")
    monkeypatch.delenv("FUNGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "SHAKESPEARE_URL", source.as_uri())
    monkeypatch.setattr(data_mod, "SHAKESPEARE_SHA256", hashlib.sha256(source.read_bytes()).hexdigest())
    return source


def test_download_into_cache_then_reuse(tmp_path, fake_download, monkeypatch):
    path = shakespeare_path()
    assert path == tmp_path / "cache" / "tinyshakespeare.txt"
    assert path.read_bytes() == fake_download.read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == ["tinyshakespeare.txt"]

    def no_network(url, timeout=0):
        raise AssertionError("should use the cache")

    monkeypatch.setattr(data_mod, "fetch_url", no_network)
    assert shakespeare_path() == path
    assert resolve_source("shakespeare") == [path]


def test_download_wrong_checksum_caches_nothing(tmp_path, fake_download, monkeypatch):
    monkeypatch.setattr(data_mod, "SHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(FunGPTError, match="wrong SHA-256"):
        shakespeare_path()
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_damaged_cache_is_refetched(tmp_path, fake_download):
    cached = tmp_path / "cache" / "tinyshakespeare.txt"
    cached.parent.mkdir()
    cached.write_text("truncated", encoding="utf-8")
    assert shakespeare_path().read_bytes() == fake_download.read_bytes()


def test_no_network_says_how_to_fix(tmp_path, fake_download, monkeypatch):
    def offline(url, timeout=0):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data_mod, "fetch_url", offline)
    with pytest.raises(FunGPTError, match="FUNGPT_DATA_DIR") as err:
        prepare("shakespeare", tmp_path / "out", progress=False)
    assert "Name or service not known" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_data_dir_without_the_file_is_named_when_offline(tmp_path, fake_download, monkeypatch):
    """FUNGPT_DATA_DIR set to the wrong folder (a typo, the file not copied yet): say so, not only "offline"."""
    def offline(url, timeout=0):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data_mod, "fetch_url", offline)
    monkeypatch.setenv("FUNGPT_DATA_DIR", str(tmp_path / "shraed" / "data"))
    with pytest.raises(FunGPTError, match=r"FUNGPT_DATA_DIR=.*shraed/data has no tinyshakespeare.txt, and the "
                                          r"download .* failed too \(Name or service not known\)"):
        shakespeare_path()


def test_wrong_file_in_data_dir_refused(tmp_path, monkeypatch):
    (tmp_path / "tinyshakespeare.txt").write_text("not it", encoding="utf-8")
    monkeypatch.setenv("FUNGPT_DATA_DIR", str(tmp_path))
    with pytest.raises(FunGPTError, match="not Tiny Shakespeare"):
        shakespeare_path()


def test_cache_dir_respects_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("FUNGPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data_mod.cache_dir() == tmp_path / "fungpt"
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "x"))
    assert data_mod.cache_dir() == tmp_path / "x"


def test_a_tilde_in_the_folder_variables_is_the_home_folder(tmp_path, monkeypatch, fake_download):
    """FUNGPT_CACHE_DIR='~/c' (quoted, so the shell leaves the ~): prepare expanded it and wrote the data there,
    train looked for it in a folder named '~' and asked to prepare it again, every time."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FUNGPT_CACHE_DIR", "~/c")
    assert data_mod.cache_dir() == tmp_path / "home" / "c"
    monkeypatch.delenv("FUNGPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert data_mod.cache_dir() == tmp_path / "home" / "xdg" / "fungpt"
    (tmp_path / "home" / "d").mkdir(parents=True)
    shutil.copy(fake_download, tmp_path / "home" / "d" / "tinyshakespeare.txt")
    monkeypatch.setenv("FUNGPT_DATA_DIR", "~/d")
    assert shakespeare_path() == tmp_path / "home" / "d" / "tinyshakespeare.txt"
    # No $HOME, and no home folder for this user (a container's uid without a passwd entry): one line
    monkeypatch.delenv("HOME")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    with pytest.raises(FunGPTError, match=r"\$HOME is not set, and this user has none\): set FUNGPT_CACHE_DIR to a "
                                          r"writable folder"):
        data_mod.cache_dir()
    # A "~" that names no home folder, in any of the variables: one line naming the variable
    monkeypatch.setattr(Path, "expanduser", lambda self: (_ for _ in ()).throw(RuntimeError("no home")))
    for variable in ("FUNGPT_CACHE_DIR", "XDG_CACHE_HOME", "FUNGPT_DATA_DIR"):
        monkeypatch.setenv(variable, "~nobody-here/x")
        with pytest.raises(FunGPTError, match=rf"^{variable}=~nobody-here/x: its '~' names no home folder"):
            shakespeare_path() if variable == "FUNGPT_DATA_DIR" else data_mod.cache_dir()
        monkeypatch.delenv(variable)


# --- prepare: bad input --------------------------------------------------------------


def _write(tmp_path, name, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


BAD_INPUTS = {
    "missing": (lambda t: t / "nope.txt", {}, "does not exist"),
    "empty file": (lambda t: _write(t, "e.txt", b""), {}, "is empty"),
    "empty folder": (lambda t: (t / "d").mkdir() or t / "d", {}, "holds no text"),
    "binary": (lambda t: _write(t, "b.bin", b"\x89PNG\r\n\x1a\n\x00\x00\x00"), {}, "looks like a binary file"),
    "utf-16": (lambda t: _write(t, "w.txt", "hello, world\n".encode("utf-16")), {},  # (was: "a binary file")
               r"w.txt is UTF-16 text .*convert it to UTF-8 .*iconv -f UTF-16 -t UTF-8"),
    "utf-32": (lambda t: _write(t, "w.txt", "hello, world\n".encode("utf-32")), {},  # (its BOM starts like UTF-16's)
               r"w.txt is UTF-32 text .*iconv -f UTF-32 -t UTF-8"),
    "utf-32-be": (lambda t: _write(t, "w.txt", b"\x00\x00\xfe\xff" + "hi\n".encode("utf-32-be")), {},
                  "w.txt is UTF-32 text"),
    "bad utf-8": (
        lambda t: _write(t, "u.txt", b"abc\n" * 10 + b"\xc3\x28 x"),
        {},
        r"not valid UTF-8 \(bad byte at offset 40\).*--errors replace",
    ),
    "bpe vocab too small": (
        lambda t: _write(t, "c.txt", TEXT.encode()),
        {"tokenizer": "bpe", "vocab_size": 200},
        "too small",
    ),
    "vocab size with char": (lambda t: _write(t, "c.txt", TEXT.encode()), {"vocab_size": 500}, "only applies"),
    "unknown tokenizer": (lambda t: _write(t, "c.txt", TEXT.encode()), {"tokenizer": "words"}, "unknown tokenizer"),
    "val fraction 0": (lambda t: _write(t, "c.txt", TEXT.encode()), {"val_fraction": 0}, "between 0 and 1"),
    "val fraction 1": (lambda t: _write(t, "c.txt", TEXT.encode()), {"val_fraction": 1.0}, "between 0 and 1"),
    "val fraction negative": (lambda t: _write(t, "c.txt", TEXT.encode()), {"val_fraction": -0.1}, "between 0 and 1"),
    "too little text": (lambda t: _write(t, "c.txt", b"a"), {}, "split has 0 tokens"),
    "val split empty": (lambda t: _write(t, "c.txt", b"abcdefghi"), {"val_fraction": 1e-17}, "val split has 0 tokens"),
    "bad errors mode": (lambda t: _write(t, "c.txt", TEXT.encode()), {"errors": "ignore"}, "strict"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_leaves_nothing(tmp_path, case):
    make, kwargs, pattern = BAD_INPUTS[case]
    source = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(FunGPTError, match=pattern) as err:
        prepare(source, out, progress=False, **kwargs)
    assert "\n" not in str(err.value)
    assert not out.exists() and leftovers(tmp_path) == []


def test_binary_file_inside_folder_is_named(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT, encoding="utf-8")
    (folder / "z.png").write_bytes(b"\x89PNG\x00\x00")
    with pytest.raises(FunGPTError, match=r"z\.png looks like a binary file"):
        prepare(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_folder_of_many_bad_files_says_how_many_not_one_per_run(tmp_path, monkeypatch):
    """A scraped folder of 300 cp1252 files named one per run, "fix the file": 300 runs to mend. The first is named
    as before, then how many of the files after it are not UTF-8 text either, with the first few names."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT, encoding="utf-8")
    for i in range(5):
        (folder / f"b{i}.txt").write_bytes("café\n".encode("latin-1"))
    (folder / "c.png").write_bytes(b"\x89PNG\x00\x00")
    (folder / "d.txt").write_text(TEXT, encoding="utf-8")
    with pytest.raises(FunGPTError) as err:
        prepare(folder, tmp_path / "out", progress=False)
    said = str(err.value)
    assert re.fullmatch(r".*b0\.txt is not valid UTF-8 \(bad byte at offset 3\); .* \[5 more files after it are not "
                        r"UTF-8 text either: .*b1\.txt, .*b2\.txt, .*b3\.txt, \.\.\.\]", said), said
    assert "\n" not in said and not (tmp_path / "out").exists()
    for i in range(1, 5):
        (folder / f"b{i}.txt").unlink()
    (folder / "c.png").unlink()
    with pytest.raises(FunGPTError, match=r"b0\.txt is not valid UTF-8 \(bad byte at offset 3\); [^\[]*$"):
        prepare(folder, tmp_path / "out", progress=False)  # (the only one: nothing added)
    # a corpus too large to read at once is read only so far
    for i in range(1, 4):
        (folder / f"b{i}.txt").write_bytes("café\n".encode("latin-1"))
    monkeypatch.setattr(data_mod, "BAD_FILE_SCAN_BYTES", 1)
    with pytest.raises(FunGPTError, match=r"\[1 more file after it is not UTF-8 text either \(of the next 1 file; 3 "
                                          r"not checked\): .*b1\.txt\]"):
        prepare(folder, tmp_path / "out", progress=False)


def test_a_run_or_model_folder_given_as_text_is_named_as_such(tmp_path):
    """`--data.path RUN` (a run's folder) or a model folder said only that its model.safetensors "looks like a binary
    file", and a run left among the texts the same, without saying what the file is."""
    run = tmp_path / "run"
    (run / "checkpoints" / "latest-0000020").mkdir(parents=True)
    (run / "config.json").write_text("{}", encoding="utf-8")
    (run / "checkpoints" / "latest-0000020" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00{}")
    with pytest.raises(FunGPTError, match=rf"^{re.escape(str(run))} is a training run, not text: pass the text it was "
                                          rf"trained on \(data.path in its config.json\), or go on training it with "
                                          rf"--out-dir {re.escape(str(run))} --resume$"):
        prepare(run, tmp_path / "out", progress=False)
    model = tmp_path / "gpt2-small"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2"}', encoding="utf-8")
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00{}")
    with pytest.raises(FunGPTError, match=r"gpt2-small is a model folder \(config.json and weights\), not text: pass "
                                          r"text files; to start from this model, give it as --model.init-from "):
        prepare(model, tmp_path / "out", progress=False)
    texts = tmp_path / "texts"  # a run left inside a folder of texts: its weights are named as weights
    texts.mkdir()
    (texts / "a.txt").write_text(TEXT, encoding="utf-8")
    run.rename(texts / "run")
    with pytest.raises(FunGPTError, match=r"model.safetensors looks like a binary file \(a model's weights, in a run "
                                          r"or model folder: move that folder out\) \(NUL byte at byte offset 1\)"):
        prepare(texts, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_prepare_builds_the_char_vocabulary_with_char_tokenizer_train(tmp_path, monkeypatch):
    """prepare made the vocabulary itself, so a learner's edit of CharTokenizer.train (a lower-cased vocabulary)
    did nothing, even on a fresh prepare."""
    from fungpt.tokenizer import CharTokenizer

    real = CharTokenizer.train.__func__
    monkeypatch.setattr(CharTokenizer, "train", classmethod(lambda cls, corpus: real(cls, "".join(corpus).lower())))
    monkeypatch.setattr(CharTokenizer, "encode_array",
                        lambda self, text, offset=0, real=CharTokenizer.encode_array: real(self, text.lower(), offset))
    path = _write(tmp_path, "t.txt", b"To Be, OR not\n" * 50)
    out = prepare(str(path), tmp_path / "out", tokenizer="char", progress=False)
    assert load_tokenizer(out).chars == sorted(set("to be, or not\n"))


def test_bytes_are_reported_once_their_text_is_handled(tmp_path):
    """prepare's bars count the bytes on_bytes reports: counted when read, they ran a chunk (8 MB, seconds of
    encoding) ahead of the work, and sat at 100% at the end."""
    for raw, pieces in ((("to be, or not\n" * 20).encode("utf-8"), 4),
                        # (a line of 3 chunks, no safe cut in them)
                        (b"x" * 200 + ("\nto be, or not" * 20).encode("utf-8"), 3),
                        (b"ab\n" + b"x" * 100, 2)):  # (the last chunk has no safe cut: reported at the end)
        path = _write(tmp_path, "t.txt", raw)
        reported, handed_out = [0], []  # bytes reported; the bytes of text handed out, when each piece was taken

        def on_bytes(data, reported=reported):
            reported[0] += len(data)

        for text in data_mod._iter_file_text(path, "strict", 64, on_bytes):
            # nothing counted for the piece being handled now: only a chunk's tail after its last safe cut, handed
            # out with the next chunk, may be counted before it is handled (less than a chunk)
            assert 0 <= reported[0] - sum(handed_out) < 64  # (and all of what was handed out: the bar moves)
            handed_out.append(len(text.encode("utf-8")))
        assert reported[0] == sum(handed_out) == len(raw) and len(handed_out) >= pieces


def test_invalid_utf8_offset_across_chunks(tmp_path):
    # Tiny reads, so a multi-byte character straddles reads and the bad byte is deep in.
    raw = ("é日🎉\n" * 10).encode("utf-8")
    path = _write(tmp_path, "u.txt", raw + b"ab\xfe")
    with pytest.raises(FunGPTError, match=f"offset {len(raw) + 2}"):
        list(data_mod._iter_file_text(path, "strict", 3, None))
    # a character cut short, whose first byte came in the read before: named at that first byte
    path = _write(tmp_path, "cut.txt", b"ab\xe6\x97(")
    with pytest.raises(FunGPTError, match=r"bad byte at offset 2\)"):
        list(data_mod._iter_file_text(path, "strict", 3, None))
    good = _write(tmp_path, "g.txt", raw)
    assert "".join(data_mod._iter_file_text(good, "strict", 3, None)) == raw.decode("utf-8")
    # old Mac line endings, the last one at the very end of the file: read as they are, none lost
    mac = _write(tmp_path, "mac.txt", b"a\rb\rc\r")
    assert "".join(data_mod._iter_file_text(mac, "strict", 3, None)) == "a\rb\rc\r"
    # a NUL past the first read is named at its offset in the file, not in its read
    nul = _write(tmp_path, "nul.bin", b"x" * 100 + b"\x00")
    with pytest.raises(FunGPTError, match=r"NUL byte at byte offset 100\)"):
        list(data_mod._iter_file_text(nul, "strict", 16, None))


def test_existing_dataset_refused_then_overwritten(tmp_path, corpus, char_data):
    with pytest.raises(FunGPTError, match="already holds a prepared dataset; pass --overwrite"):
        prepare(corpus, char_data, progress=False)
    assert load_meta(char_data)["tokenizer"] == "char"
    prepare(corpus, char_data, tokenizer="bpe", vocab_size=300, overwrite=True, progress=False)
    assert load_meta(char_data)["tokenizer"] == "bpe"
    assert leftovers(tmp_path) == []


def test_an_overwrite_refused_by_its_checks_keeps_the_old_dataset(tmp_path, char_data):
    """Refused in the first pass (NUL bytes), before anything is written. An overwrite that fails once writing,
    between its renames, is test_an_overwrite_stopped_between_its_renames_puts_the_old_dataset_back."""
    bad = _write(tmp_path, "bad.bin", b"\x00\x00")
    with pytest.raises(FunGPTError):
        prepare(bad, char_data, overwrite=True, progress=False)
    assert load_meta(char_data)["tokenizer"] == "char"


def test_overwrite_replaces_only_a_folder_prepare_made_holding_nothing_else(tmp_path, char_data, corpus):
    """`prepare --overwrite` deleted a folder of the user's own token ids (no text to make them again from), and
    files put beside a dataset, with the old folder; a message of train's advised that very command."""
    from fungpt.data import check_split_fits

    own = tmp_path / "own"
    own.mkdir()
    (np.arange(300) % 50).astype(np.uint16).tofile(own / "train.bin")
    (np.arange(20) % 50).astype(np.uint16).tofile(own / "val.bin")
    (own / "meta.json").write_text(json.dumps({"format_version": 1, "tokenizer": "char", "vocab_size": 50,
                                               "dtype": "uint16", "train_tokens": 300, "val_tokens": 20}))
    with pytest.raises(FunGPTError, match=r"holds token ids that fungpt prepare did not make .* which --overwrite "
                                          r"would delete; choose another --out"):
        prepare(corpus, own, overwrite=True, progress=False)
    assert (own / "val.bin").stat().st_size == 40  # untouched
    with pytest.raises(FunGPTError, match=r"the val split has only 20 tokens .*; use a smaller model.block_size "
                                          r"\(--model.block-size\) or more token ids in val.bin \(with val_tokens in "
                                          r"meta.json raised; README"):
        check_split_fits(load_meta(own), 32, prepared_by_user=True)  # (not "prepare ... --overwrite")
    with pytest.raises(FunGPTError, match=r"prepare the folder again with a larger --val-fraction"):
        check_split_fits(load_meta(char_data), load_meta(char_data)["val_tokens"], prepared_by_user=True)  # it can
    (char_data / "notes.txt").write_text("mine")
    with pytest.raises(FunGPTError, match=r"holds 'notes.txt' beside the prepared dataset, which --overwrite would "
                                          r"delete with it; move them out"):
        prepare(corpus, char_data, overwrite=True, progress=False)
    assert (char_data / "notes.txt").read_text() == "mine"
    (char_data / "notes.txt").unlink()
    (char_data / ".DS_Store").write_bytes(b"\0")  # (what macOS Finder adds to a folder it shows: not the user's)
    prepare(corpus, char_data, tokenizer="bpe", vocab_size=300, overwrite=True, progress=False)  # prepare's alone
    assert load_meta(char_data)["tokenizer"] == "bpe"
    (char_data / "meta.json").write_text("{")  # unreadable: whether prepare made the folder is not known
    with pytest.raises(FunGPTError, match=r"meta.json cannot be read \(JSONDecodeError\), so whether fungpt prepare "
                                          r"made .* is not known"):
        prepare(corpus, char_data, overwrite=True, progress=False)


def test_a_damaged_folder_in_the_cache_is_prepared_again_whatever_it_holds(tmp_path, corpus, monkeypatch):
    """fungpt train prepares a cached folder again when it no longer loads: a review found that refused after
    --overwrite learned to keep a user's files (an unreadable meta.json, a file Finder put there)."""
    from fungpt.data import cache_dir

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    cached = cache_dir() / "datasets" / "corpus-char"
    prepare(corpus, cached, progress=False)
    (cached / "meta.json").write_text("{")
    (cached / "Icon\r").write_bytes(b"")
    prepare(corpus, cached, overwrite=True, progress=False)
    assert load_meta(cached)["tokenizer"] == "char"


def test_token_ids_given_where_text_is_read_and_ids_written_wrongly_are_named(tmp_path, char_data):
    """A copy of nanoGPT's data folder (train.bin, val.bin, meta.pkl) or a prepared folder given as text was refused
    as "a binary file"; ids of a vocabulary past 65,536 declared uint16, and np.save's header read as ids, trained
    silently; a format_version written "1" was told "has format version 1, this FunGPT reads version 1"."""
    nano = tmp_path / "nano"
    nano.mkdir()
    (nano / "input.txt").write_text("some text")
    for name in ("train.bin", "val.bin", "meta.pkl"):
        (nano / name).write_bytes(b"\x01\x00\x02\x00")
    with pytest.raises(FunGPTError, match=r"nano holds token ids \(train.bin, val.bin\) but no meta.json: add one "
                                          r"and a tokenizer_meta.json .*or pass the text they were made from"):
        resolve_source(nano)
    with pytest.raises(FunGPTError, match="nano holds token ids"):
        resolve_source(nano / "val.bin")
    assert resolve_source(nano / "input.txt") == [nano / "input.txt"]  # its text is text
    with pytest.raises(FunGPTError, match=f"{char_data.name} is a prepared dataset \\(token ids, not text\\): "
                                          f"train on it with --data.path"):
        prepare(char_data, tmp_path / "again", progress=False)

    def own(name, ids, **meta):
        d = tmp_path / name
        d.mkdir()
        for split in ("train", "val"):
            ids.tofile(d / f"{split}.bin")
        (d / "meta.json").write_text(json.dumps({"format_version": 1, "tokenizer": "char", "vocab_size": 50,
                                                 "dtype": "uint16", "train_tokens": len(ids),
                                                 "val_tokens": len(ids), **meta}))
        return d

    ids = (np.arange(100) % 50).astype(np.uint16)
    with pytest.raises(FunGPTError, match=r"dtype uint16 for a vocabulary of 70,000, whose ids from 65,536 on a "
                                          r"uint16 cannot hold: write the ids as uint32"):
        load_meta(own("wide", ids, vocab_size=70_000))
    with pytest.raises(FunGPTError, match=r"has format version '1', this FunGPT reads version 1 \(a number\); "):
        load_meta(own("text", ids, format_version="1"))
    with pytest.raises(FunGPTError, match=r"has format version 2, this FunGPT reads version 1; a newer FunGPT wrote "
                                          r"it: upgrade FunGPT, or "):
        load_meta(own("newer", ids, format_version=2))
    npy = own("npy", ids)
    for split in ("train", "val"):
        np.save(npy / f"{split}.bin", ids)
        (npy / f"{split}.bin.npy").rename(npy / f"{split}.bin")
    size = (npy / "train.bin").stat().st_size // 2
    (npy / "meta.json").write_text(json.dumps({**json.loads((npy / "meta.json").read_text()), "train_tokens": size,
                                               "val_tokens": size}))  # (as the size message would have them set)
    with pytest.raises(FunGPTError, match=r"train.bin is a NumPy .npy file \(np.save\), not raw token ids: write "
                                          r"them with ids.astype\(np.uint16\).tofile\(path\)"):
        load_meta(npy)
    # train.npy and val.npy as np.save names them: no train.bin beside meta.json, or no meta.json at all (read as
    # text, they were "a binary file")
    for split in ("train", "val"):
        (npy / f"{split}.bin").rename(npy / f"{split}.npy")
    with pytest.raises(FunGPTError, match=r"train.bin is missing, and train.npy beside it is a NumPy file, which "
                                          r"FunGPT does not read: write its ids raw, np.load\('train.npy'\)"
                                          r".astype\(np.uint16\).tofile\('train.bin'\) \(README"):
        load_meta(npy)
    (npy / "meta.json").unlink()
    with pytest.raises(FunGPTError, match=r"npy holds NumPy files \(train.npy, val.npy\), which FunGPT does not "
                                          r"read: to train on token ids, write them raw beside a meta.json"):
        resolve_source(npy)
    with pytest.raises(FunGPTError, match=r"val.npy is a NumPy file \(np.save\), which FunGPT does not read"):
        resolve_source(npy / "val.npy")
    assert load_meta(own("fine", ids))["vocab_size"] == 50


def test_an_overwrite_stopped_between_its_renames_puts_the_old_dataset_back(tmp_path, char_data, corpus, monkeypatch):
    """Ctrl-C (or SIGTERM) after the old dataset was moved aside, before the new one took its place: the new one was
    deleted and the old one left hidden under OUT.old-HOST-PID, with nothing at OUT."""
    before = load_meta(char_data)
    real_replace = os.replace

    def stopped(src, dst):
        if Path(dst) == char_data and ".tmp-" in Path(src).name:  # (the new dataset's rename into place)
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(data_mod.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, char_data, tokenizer="bpe", vocab_size=300, overwrite=True, progress=False)
    assert load_meta(char_data) == before  # the old dataset, back in its place
    assert leftovers(tmp_path) == []


def test_unrelated_folder_never_replaced(tmp_path, corpus):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(FunGPTError, match="not empty and is not a prepared dataset"):
        prepare(corpus, out, overwrite=True, progress=False)
    assert (out / "notes.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_meta(prepare(corpus, empty, progress=False))["train_tokens"] > 0


def test_a_corpus_edited_during_prepare_says_so(tmp_path, monkeypatch):
    """A character added between the counting pass and the encoding pass is not in the char vocabulary; the
    error said so ("use a bpe tokenizer"), naming a position inside the val piece, not the real cause."""
    path = _write(tmp_path, "c.txt", TEXT.encode())
    iter_corpus, calls = data_mod._iter_corpus, []

    def edited_after_the_first_pass(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\u03a9 new\n")
        return iter_corpus(*args, **kwargs)

    monkeypatch.setattr(data_mod, "_iter_corpus", edited_after_the_first_pass)
    with pytest.raises(FunGPTError, match=r"c.txt' changed while it was being prepared; run prepare again"):
        prepare(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_out_inside_the_input_folder_is_refused(tmp_path, monkeypatch):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(TEXT, encoding="utf-8")
    with pytest.raises(FunGPTError, match=r"is inside the input folder .*texts: the next prepare of that folder"):
        prepare(texts, texts / "prepared", progress=False)
    assert not (texts / "prepared").exists() and not leftovers(texts)
    # the data cache inside it (where training prepares its datasets): the variable that places it is named
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(texts / "cache"))
    with pytest.raises(FunGPTError, match=r"set FUNGPT_CACHE_DIR to a folder outside the input folder"):
        prepare(texts, texts / "cache" / "datasets" / "texts-char", progress=False)


def test_a_dataset_finished_meanwhile_by_another_prepare_is_kept(tmp_path, corpus, monkeypatch):
    """Two prepares into one --out: without --overwrite the second one to finish must not replace the first's
    dataset (a run may be reading it), nor say that it prepared it."""
    out = tmp_path / "out"
    other = prepare(corpus, tmp_path / "other", progress=False)
    encode = data_mod._encode

    def meanwhile(tok, text):  # the other command finishes while this one encodes
        if not out.exists():
            shutil.copytree(other, out)
        return encode(tok, text)

    monkeypatch.setattr(data_mod, "_encode", meanwhile)
    before = other / "meta.json"
    with pytest.raises(FunGPTError, match="was prepared by another command while this one ran; pass --overwrite"):
        prepare(_write(tmp_path, "mine.txt", TEXT.upper().encode()), out, progress=False)
    assert (out / "meta.json").read_text() == before.read_text() and not leftovers(tmp_path)


def test_temporary_folders_of_a_killed_prepare_are_removed(tmp_path, corpus):
    """kill -9 (or running out of memory) leaves OUT.tmp-HOST-PID behind; the next prepare into OUT removes the
    ones untouched for an hour (a live prepare writes its files every few megabytes), and keeps the others."""
    out = tmp_path / "out"
    stale = [tmp_path / "out.tmp-host-123", tmp_path / "out.old-host-123", tmp_path / "out.tmp-456"]
    live = tmp_path / "out.tmp-otherhost-789"
    hour_ago = time.time() - data_mod.STALE_TEMP_S - 60
    for folder in [*stale, live]:
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"\0" * 1000)
        if folder in stale:
            os.utime(folder / "train.bin", (hour_ago, hour_ago))
            os.utime(folder, (hour_ago, hour_ago))
    # the user's own folders beside it, as old: a backup by a name like ours, one of ours holding a file of theirs
    backup, kept = tmp_path / "out.old-v1", tmp_path / "out.old-host-124"
    for folder in (backup, kept):
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
        os.utime(folder / "notes.txt", (hour_ago, hour_ago))
        os.utime(folder, (hour_ago, hour_ago))
    prepare(corpus, out, progress=False)
    assert leftovers(tmp_path) == sorted([live.name, backup.name, kept.name])


def test_prepare_into_a_name_near_the_length_limit(tmp_path, corpus, monkeypatch):
    """Its temporaries added ".tmp-HOST-PID" (a host name of up to 64 characters) to the whole name: a valid
    250-byte --out failed. They take at most 100 bytes of it, and the stale ones are found by them (not by those of
    another long name that begins alike)."""
    from fungpt.checkpoint import temp_stem

    assert temp_stem(os.fsdecode(b"caf\xe9")) == os.fsdecode(b"caf\xe9")  # short: whole, its non-UTF-8 byte too
    assert temp_stem("a" * 99 + "\u00e9") != temp_stem("a" * 99 + "\u00e8")  # (101 bytes: cut, told apart)
    assert temp_stem("a" * 98 + "\u00e9") == "a" * 98 + "\u00e9"  # (100 bytes: whole)
    for long in ("a" * 99 + "\u00e9", "\u8a9e" * 80, "b" * 250):
        stem = temp_stem(long)
        assert len(stem.encode("utf-8")) <= 100 and long.startswith(stem[:-9]) and stem[-9] == "~"
    monkeypatch.setattr(data_mod, "_HOST", "h" * 64)
    name = "b" * 250
    hour_ago = time.time() - data_mod.STALE_TEMP_S - 60
    stale = tmp_path / f"{temp_stem(name)}.tmp-otherhost-123"  # a killed prepare's, into the same long name
    other = tmp_path / f"{temp_stem('b' * 249 + 'c')}.tmp-otherhost-124"  # another long name's: not ours to take
    for folder in (stale, other):
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"\0" * 10)
        for path in (folder / "train.bin", folder):
            os.utime(path, (hour_ago, hour_ago))
    out = prepare(corpus, tmp_path / name, progress=False)
    assert out.name == name and load_meta(out)["train_tokens"] > 0
    assert load_meta(prepare(corpus, tmp_path / name, overwrite=True, progress=False))["train_tokens"] > 0
    assert leftovers(tmp_path) == [other.name]


def test_a_dataset_in_a_hidden_folder_inside_the_input_folder_is_allowed(tmp_path):
    """Hidden files are not read as text, so e.g. FUNGPT_CACHE_DIR=texts/.cache with data.path texts is fine."""
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(TEXT, encoding="utf-8")
    assert load_meta(prepare(texts, texts / ".cache" / "ds", progress=False))["train_tokens"] > 0
    assert load_meta(prepare(texts, tmp_path / "again", progress=False))["train_chars"] == len(TEXT) * 9 // 10


def test_a_full_cache_says_where_else_to_prepare(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data_mod.os, "replace", full)
    with pytest.raises(FunGPTError, match=r"No space left on device \(fungpt train prepares its data there: set "
                                          r"FUNGPT_CACHE_DIR .* or prepare it with `fungpt prepare --out DIR`"):
        prepare(corpus, tmp_path / "cache" / "datasets" / "x", progress=False)
    with pytest.raises(FunGPTError, match="No space left on device; choose another --out"):
        prepare(corpus, tmp_path / "mine", progress=False)


# --- load_meta and check_split_fits ----------------------------------------------------


def test_load_meta_errors(tmp_path, char_data):
    with pytest.raises(FunGPTError, match="does not exist"):
        load_meta(tmp_path / "nowhere")
    with pytest.raises(FunGPTError, match="not a prepared dataset"):
        load_meta(tmp_path)
    with open(char_data / "val.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(FunGPTError, match="val.bin has"):
        load_meta(char_data)
    (char_data / "val.bin").unlink()
    with pytest.raises(FunGPTError, match="val.bin is missing"):
        load_meta(char_data)
    meta = json.loads((char_data / "meta.json").read_text(encoding="utf-8"))
    (char_data / "meta.json").write_text(json.dumps({**meta, "dtype": "uint17"}), encoding="utf-8")
    with pytest.raises(FunGPTError, match="the token dtype 'uint17', which FunGPT does not read: token ids are "
                                          "stored as uint16"):  # was numpy's TypeError
        load_meta(char_data)
    (char_data / "meta.json").write_text("{", encoding="utf-8")
    with pytest.raises(FunGPTError, match="meta.json is corrupt"):
        load_meta(char_data)


def test_check_split_fits(char_data):
    meta = load_meta(char_data)
    check_split_fits(meta, meta["val_tokens"] - 1)
    with pytest.raises(FunGPTError, match=f"block size {meta['val_tokens']} is too large.*val split.*val_fraction"):
        check_split_fits(meta, meta["val_tokens"])
    # a short train split: a larger val_fraction would make it shorter still; a smaller one is suggested
    with pytest.raises(FunGPTError, match="train split") as e:
        check_split_fits({**meta, "train_tokens": 5, "val_tokens": 100}, 10)
    assert "larger" not in str(e.value) and "a smaller data.val_fraction (--data.val-fraction)" in str(e.value)
    # a folder the user prepared: data.val_fraction does nothing there, preparing it again does
    with pytest.raises(FunGPTError, match=r"larger --val-fraction \(`fungpt prepare ... --overwrite`\)") as e:
        check_split_fits(meta, meta["val_tokens"], prepared_by_user=True)
    assert "--data.val-fraction" not in str(e.value)
    # two tokens in all ("hi" and a newline): no split holds a window of 2, so none is offered
    with pytest.raises(FunGPTError, match=r"the train split has only 1 token and one window needs block_size \+ 1 = "
                                          r"129; use more text$"):
        check_split_fits({**meta, "train_tokens": 1, "val_tokens": 1}, 128)


# --- BatchLoader and evaluation windows -------------------------------------------------


def test_batch_loader_shapes_and_shift(char_data):
    train = read_bin(char_data, "train").astype(np.int64)
    loader = BatchLoader(char_data, "train", batch_size=4, block_size=16)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = {tuple(train[s : s + 17]) for s in range(len(train) - 16)}
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert tuple(row_x + row_y[-1:]) in windows


def test_batch_loader_draws_every_window_including_the_first_and_last(char_data):
    """Every start 0 .. n - block_size - 1 is drawn (the last one ends on the split's last token), none beyond."""
    val = read_bin(char_data, "val").astype(np.int64)  # (the shorter split: block_size must fit both)
    n, block = len(val), len(val) - 4  # four possible windows
    loader = BatchLoader(char_data, "val", batch_size=64, block_size=block)
    ends = set()
    for _ in range(4):
        x, y = loader.next_batch()
        ends |= {tuple(row) for row in y[:, -3:].tolist()}  # each window's last three targets identify it
    windows = {tuple(val[s + block - 2:s + block + 1]) for s in range(n - block)}
    assert len(windows) == 4 and ends == windows


def test_batch_loader_seeds_and_ranks(char_data):
    def batches(**kw):
        loader = BatchLoader(char_data, "train", batch_size=4, block_size=8, **kw)
        return [loader.next_batch()[0] for _ in range(3)]

    same = zip(batches(seed=1), batches(seed=1))
    assert all(torch.equal(a, b) for a, b in same)
    assert not torch.equal(batches(seed=1)[0], batches(seed=2)[0])
    assert not torch.equal(batches(rank=0, world_size=2)[0], batches(rank=1, world_size=2)[0])


def test_batch_loader_copies_and_pickles_with_a_file_of_their_own(char_data):
    """The loader holds its .bin file open (a folder prepared again under a live run): a deepcopy or a pickle (a
    DataLoader's worker processes) failed on the file, and a copy used it after the original had closed it."""
    import copy
    import gc
    import pickle

    loader = BatchLoader(char_data, "train", batch_size=4, block_size=8)
    clones = [copy.deepcopy(loader), pickle.loads(pickle.dumps(loader)), copy.copy(loader)]
    expected = loader.next_batch()
    del loader
    gc.collect()
    for clone in clones[:2]:  # (their generators are copies: the same batches)
        assert all(torch.equal(a, b) for a, b in zip(clone.next_batch(), expected))
    assert clones[2].next_batch()[0].shape == (4, 8)  # (a shallow copy shares the generator; its file is its own)


def test_batch_loader_train_and_val_draw_different_windows(tmp_path):
    """The split is mixed into the seed: with the same seed, a val loader that drew the train loader's window starts
    would evaluate the same positions of the text the model is trained on (here both splits hold the same tokens,
    so equal starts would give equal batches)."""
    half = "".join(random.Random(0).choices("abcdefghijklmnopqrstuvwxyz", k=500))  # windows unlike each other
    path = tmp_path / "twice.txt"
    path.write_text(half + half, encoding="utf-8")
    data = prepare(path, tmp_path / "out", val_fraction=0.5, progress=False)
    assert read_bin(data, "train").tolist() == read_bin(data, "val").tolist()
    train, val = (BatchLoader(data, split, batch_size=4, block_size=8, seed=3) for split in ("train", "val"))
    for _ in range(3):
        assert not torch.equal(train.next_batch()[0], val.next_batch()[0])


def test_batch_loader_resume_exactly(tmp_path, char_data):
    loader = BatchLoader(char_data, "train", batch_size=3, block_size=8, seed=7)
    for _ in range(5):
        loader.next_batch()
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    expected = [loader.next_batch() for _ in range(4)]

    resumed = BatchLoader(char_data, "train", batch_size=3, block_size=8, seed=7)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.batches_drawn == 5
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_batch_loader_rejects_bad_arguments(char_data):
    with pytest.raises(FunGPTError, match="too large"):
        BatchLoader(char_data, "val", batch_size=2, block_size=10**6)
    with pytest.raises(FunGPTError, match="unknown split"):
        BatchLoader(char_data, "test", batch_size=2, block_size=8)
    for batch_size, block_size in [(2, 0), (2, -5), (-1, 8)]:  # were empty (2, 0) batches or torch errors
        with pytest.raises(FunGPTError, match="must both be positive"):
            BatchLoader(char_data, "train", batch_size=batch_size, block_size=block_size)


def test_a_batch_of_one_is_two_tensors_of_their_own(char_data):
    x, y = BatchLoader(char_data, "train", batch_size=1, block_size=8).next_batch()
    y[0, 0] = -1  # e.g. masking a target
    assert x.min() >= 0 and x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()


@pytest.mark.parametrize("block_size", [7, 16])
def test_eval_windows_score_every_token_once(char_data, block_size):
    val = read_bin(char_data, "val").astype(np.int64)
    scored = []
    for x, y in iter_eval_windows(char_data, "val", block_size=block_size, batch_size=5):
        assert x.shape == y.shape and x.shape[1] == block_size
        keep = y != -1
        assert torch.equal(x[:, 1:][keep[:, :-1]], y[:, :-1][keep[:, :-1]])
        scored.extend(y[keep].tolist())
    assert scored == val[1:].tolist()


@pytest.mark.parametrize("n, block_size", [(33, 8), (30, 8), (5, 8), (2, 8)])
def test_eval_windows_scores_every_target_of_an_array_once(n, block_size):
    from fungpt.data import eval_windows

    tokens = np.arange(100, 100 + n)  # distinct ids, so each target names its position
    seen = []
    for x, y in eval_windows(tokens, block_size, batch_size=3):
        assert x.shape == y.shape and x.shape[1] == min(block_size, n - 1)
        assert torch.equal(y[:, :-1][y[:, :-1] != -1], x[:, 1:][y[:, :-1] != -1])  # y is x shifted by one
        # x is the text itself, in full: the -1s that mark targets already scored are y's alone (with one
        # window in the last batch, (30, 8), they were written into x too)
        assert bool((x >= 100).all()) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones_like(x[:, 1:]))
        seen += y[y != -1].tolist()
    assert sorted(seen) == list(range(101, 100 + n))  # every token but the first, exactly once


def test_max_id_is_the_largest_id_in_both_files_and_its_boundary_is_checked(tmp_path):
    """prepare records the largest token id (so training need not read the files); an id equal to vocab_size is
    already one too many."""
    from fungpt.data import check_token_ids

    text = "zz" + "abc abc\n" * 400  # z, the largest id of the char vocabulary, only in the first piece
    out = prepare(_write(tmp_path, "c.txt", text.encode()), tmp_path / "out", progress=False)
    meta = load_meta(out)
    ids = np.concatenate([read_bin(out, "train"), read_bin(out, "val")])
    assert meta["max_id"] == int(ids.max()) == meta["vocab_size"] - 1
    check_token_ids(out, meta)
    with pytest.raises(FunGPTError, match="largest token id is 4 but its vocab_size is 4"):
        check_token_ids(out, {**meta, "vocab_size": 4, "max_id": 4})
    handmade = {k: v for k, v in meta.items() if k != "max_id"}  # read id by id, in chunks of 4 tokens
    bad = read_bin(out, "train").copy()
    bad[9] = meta["vocab_size"]
    bad.tofile(out / "train.bin")
    with pytest.raises(FunGPTError, match=rf"holds token id {meta['vocab_size']} \(at token 9\)"):
        check_token_ids(out, handmade, chunk=4)


@pytest.mark.parametrize("field, value", [("train_tokens", True), ("val_tokens", -1), ("vocab_size", 0)])
def test_meta_counts_must_be_whole_numbers(char_data, field, value):
    meta = json.loads((char_data / "meta.json").read_text())
    (char_data / "meta.json").write_text(json.dumps({**meta, field: value}))
    with pytest.raises(FunGPTError, match=f"{field} must be a whole number"):
        load_meta(char_data)


def test_two_preparations_of_the_same_data_at_once_leave_one_dataset_and_nothing_else(tmp_path, corpus, monkeypatch):
    """Two runs prepared the same cached data at once: the one that lost the race between moving the old dataset
    aside and putting its own in failed ("prepared by another command ...; pass --overwrite", though train had),
    and the dataset it had moved aside (OUT.old-HOST-PID, a full copy) stayed for ever."""
    out = prepare(corpus, tmp_path / "out", progress=False)
    same = prepare(corpus, tmp_path / "same", progress=False)
    other_text = tmp_path / "other.txt"
    other_text.write_text(corpus.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    other = prepare(other_text, tmp_path / "other", progress=False)
    real_replace = os.replace
    for theirs in (same, other):
        done: list[Path] = []

        def replace(src, dst, theirs=theirs, done=done):
            if Path(dst) == out and ".tmp-" in Path(src).name and not done:  # the other command finishes first
                shutil.copytree(theirs, out)
                done.append((out / "train.bin").stat().st_ino)
            return real_replace(src, dst)

        monkeypatch.setattr(data_mod.os, "replace", replace)
        assert prepare(corpus, out, overwrite=True, progress=False) == out
        monkeypatch.setattr(data_mod.os, "replace", real_replace)
        assert load_meta(out) == load_meta(same) and leftovers(tmp_path) == []  # (the other text's: replaced)
        assert ((out / "train.bin").stat().st_ino == done[0]) == (theirs is same)  # the same data: theirs stands


def test_stale_temporaries_go_by_their_files_age_and_names_are_matched_exactly(tmp_path, corpus):
    out = tmp_path / "out[1]"  # glob characters in the name
    hour_ago = time.time() - data_mod.STALE_TEMP_S - 60
    stale, other_name = tmp_path / "out[1].tmp-h-1", tmp_path / "out1.tmp-h-1"
    busy = tmp_path / "out[1].tmp-h-2"  # an old folder whose file is still being written
    for folder in (stale, other_name, busy):
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"\0")
        os.utime(folder, (hour_ago, hour_ago))
        if folder is not busy:
            os.utime(folder / "train.bin", (hour_ago, hour_ago))
    prepare(corpus, out, progress=False)
    assert sorted(leftovers(tmp_path)) == sorted([other_name.name, busy.name])


def test_safe_cuts_never_change_the_pretokenizer_pieces():
    """Every cut _SAFE_CUT (and _last_safe_cut) allows splits GPT-2's pre-tokenizer pieces exactly where the
    whole text's are split; lines ending in spaces or tabs get cuts too (they had none: a file of such lines
    went to the tokenizer in 32M-character pieces, 8 GB of memory)."""
    import random

    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)

    def pieces(text: str) -> list[str]:
        return [p for p, _ in pre.pre_tokenize_str(text)]

    rng = random.Random(0)
    alphabet = ["a", "b", "Z", "7", ".", " ", "  ", "\t", "\n", "\r\n", "\n\n", " \n", "é"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        cuts = [m.start() for m in data_mod._SAFE_CUT.finditer(text)]
        last = data_mod._last_safe_cut(text)
        assert last == max((c for c in cuts if c > 0), default=None), text
        spaces = [m.start() for m in data_mod._SPACE_CUT.finditer(text)]  # (where a long line has no newline)
        assert data_mod._last_space_cut(text) == max(spaces, default=None), text
        for cut in cuts + spaces:
            if 0 < cut < len(text):
                assert pieces(text[:cut]) + pieces(text[cut:]) == pieces(text), (text, cut)
    # a last space further back than the 64K characters searched first is still found (not a cut inside a word)
    long_word = "a b" + "x" * 70_000
    assert data_mod._last_space_cut(long_word) == max(m.start() for m in data_mod._SPACE_CUT.finditer(long_word))
    trailing = "to be or not \nthat is the question\t\nwhether tis nobler \n"
    assert data_mod._last_safe_cut(trailing) is not None
    assert data_mod._cut_between(data_mod._SAFE_CUT, trailing, 0, len(trailing)) == 13
    # A literal <|endoftext|> is split off before the pre-tokenizer runs: the whitespace before it ended its text
    # and stayed one piece ("\n\n"), which a cut between the newlines made two tokens
    from fungpt.tokenizer import EOT_TEXT, BPETokenizer

    tok = BPETokenizer.train("".join(rng.choice(alphabet) for _ in range(3000)), vocab_size=300)
    for _ in range(300):
        text = "".join(rng.choice([*alphabet, EOT_TEXT]) for _ in range(rng.randint(1, 40)))
        cuts = [m.start() for m in data_mod._SAFE_CUT.finditer(text)]
        assert data_mod._last_safe_cut(text) == max((c for c in cuts if c > 0), default=None), text
        for cut in cuts + [m.start() for m in data_mod._SPACE_CUT.finditer(text)]:
            assert tok.encode(text[:cut]) + tok.encode(text[cut:]) == tok.encode(text), (text, cut)


def test_text_without_newlines_is_encoded_in_pieces_of_bounded_size(tmp_path):
    """One long line (text out of a PDF, old Mac files ending lines in "\\r"): with no newline to cut at, it went to
    the tokenizer in pieces of up to 32M characters, 7.4 GB of memory for a 40 MB file. It is cut before a space
    (the same tokens), and text without spaces too every 4 x BPE_GROUP_CHARS characters (never inside a literal
    <|endoftext|>)."""
    from fungpt.tokenizer import EOT_TEXT, BPETokenizer

    size = 1000
    words = " ".join(f"w{i % 97}rd" for i in range(20000))  # 150,000 characters, one line
    groups = data_mod._split_groups(words, size)
    assert "".join(groups) == words and len(groups) > 100 and max(map(len, groups)) < size + 10
    tok = BPETokenizer.train(words[:20000], vocab_size=300)
    assert [i for g in groups[:20] for i in tok.encode(g)] == tok.encode("".join(groups[:20]))
    no_spaces = "字" * (10 * size) + EOT_TEXT + "字" * (2 * size)
    eot_at = 4 * size - 3  # so that a cut at 4 x size would fall inside it
    no_spaces = no_spaces[:eot_at] + EOT_TEXT + no_spaces[eot_at:]
    groups = data_mod._split_groups(no_spaces, size)
    assert "".join(groups) == no_spaces and max(map(len, groups)) <= 4 * size
    assert groups[0] == no_spaces[:eot_at] and sum(g.count(EOT_TEXT) for g in groups) == 2
    # a search that stops at its window's end saw "\n<|endof" there, not <|endoftext|>: it cut before that "\n"
    near_eot = "x" * 29 + " \n" + EOT_TEXT + "y" * 60
    groups = data_mod._split_groups(near_eot, 16)
    assert "".join(groups) == near_eot and not any(g.startswith("\n" + EOT_TEXT) for g in groups)
    assert [i for g in groups for i in tok.encode(g)] == tok.encode(near_eot)
    # a forced cut never leaves a piece empty: an <|endoftext|> that starts the piece is cut after (it looped)
    assert data_mod._split_groups("a" + EOT_TEXT + "x" * 40, 3) == ["a", EOT_TEXT, *["x" * 12] * 3, "x" * 4]
    path = tmp_path / "line.txt"
    path.write_text(words, encoding="utf-8")
    pieces = list(data_mod._iter_file_text(path, "strict", 4096, None))  # (read 4 KB at a time)
    assert "".join(pieces) == words and len(pieces) > 20 and all(p.endswith("rd") for p in pieces[:-1])


def test_ctrl_c_during_prepare_says_that_no_partial_dataset_was_left(corpus, tmp_path, capsys, monkeypatch):
    """Ctrl-C while prepare swaps its new dataset in: the old one stays whole, and the line says so (it said only
    "fungpt: interrupted", leaving the user to wonder whether the folder was half written)."""
    from fungpt.cli import main

    out = tmp_path / "d"
    assert main(["prepare", "--input", str(corpus), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def ctrl_c(folder):  # the new dataset complete in its temporary folder, about to take out's place (and later,
        raise KeyboardInterrupt  # after it took it)

    real_sync = data_mod.sync_folder
    monkeypatch.setattr(data_mod, "sync_folder", ctrl_c)
    assert main(["prepare", "--input", str(corpus), "--out", str(out), "--overwrite", "--tokenizer", "bpe"]) == 130
    # (said after prepare's progress bars; "no partial dataset was left" read as if the folder were now empty)
    assert capsys.readouterr().err.endswith(f"\nfungpt: interrupted: {out} still holds the dataset it held before; "
                                            f"run the command again to prepare it\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the char dataset, as it was
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("d.")] == []  # no temporary folder left
    # Ctrl-C once the new dataset has taken its place (while the rename is made durable): that one is said, whole
    monkeypatch.setattr(data_mod, "sync_folder", real_sync)
    monkeypatch.setattr(data_mod, "fsync_dir", ctrl_c)
    assert main(["prepare", "--input", str(corpus), "--out", str(out), "--overwrite", "--tokenizer", "bpe"]) == 130
    assert capsys.readouterr().err.endswith(f"\nfungpt: interrupted: {out} holds the dataset just prepared, "
                                            f"complete\n")
    assert load_meta(out)["tokenizer"] == "bpe"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("d.")] == []  # nor the old one, moved aside
    # into a new folder: nothing there before, nothing there after
    monkeypatch.setattr(data_mod, "sync_folder", ctrl_c)
    assert main(["prepare", "--input", str(corpus), "--out", str(tmp_path / "new")]) == 130
    new = tmp_path / "new"
    assert capsys.readouterr().err.endswith(f"\nfungpt: interrupted: no partial dataset was left in {new}; run the "
                                            f"command again to prepare it\n")
    assert not (tmp_path / "new").exists()


def test_prepare_says_when_a_bpe_stops_short_of_the_size_asked(corpus, tmp_path, capsys):
    """On a small corpus the BPE stops early: it printed "vocabulary 365 (bpe)" after --vocab-size 4096, no why."""
    from fungpt.cli import main

    assert main(["prepare", "--input", str(corpus), "--out", str(tmp_path / "bpe"), "--tokenizer", "bpe"]) == 0
    size = load_meta(tmp_path / "bpe")["vocab_size"]
    assert (f"vocabulary {size:,} (bpe, not the 4,096 asked: the BPE ran out of pairs to merge, every word of this "
            "corpus being one token by then, or 256-character pieces of longer ones)") in capsys.readouterr().out
    assert main(["prepare", "--input", str(corpus), "--out", str(tmp_path / "char")]) == 0
    assert "asked" not in capsys.readouterr().out
    # a BPE that reaches the size asked, exactly: nothing to explain
    assert main(["prepare", "--input", str(corpus), "--out", str(tmp_path / "reached"), "--tokenizer", "bpe",
                 "--vocab-size", str(size)]) == 0
    assert f"vocabulary {size:,} (bpe)\n" in capsys.readouterr().out


def test_prepare_counts_the_end_of_text_written_in_the_text_and_says_so(tmp_path, capsys, monkeypatch):
    """A corpus that merely mentions <|endoftext|> (a README about tokenizers) had each one turned into the document
    separator without a word: the model learned breaks that are not there, and sampling stopped at them. Counted
    also when the file is read in small pieces (none cuts through one), and never for the separators prepare puts
    between files."""
    from fungpt.cli import main

    top = tmp_path / "texts"
    top.mkdir()
    (top / "a.txt").write_text(f"the token {EOT_TEXT} ends a document.\n" * 40, encoding="utf-8")
    (top / "b.txt").write_text("no special text here at all.\n" * 40, encoding="utf-8")
    monkeypatch.setattr(data_mod, "CHUNK_BYTES", 64)  # (pieces of 64 bytes, each line 38)
    assert main(["prepare", "--input", str(top), "--out", str(tmp_path / "bpe"), "--tokenizer", "bpe",
                 "--vocab-size", "300"]) == 0
    assert load_meta(tmp_path / "bpe")["literal_eot_texts"] == 40
    ids = [*read_bin(tmp_path / "bpe", "train").tolist(), *read_bin(tmp_path / "bpe", "val").tolist()]
    assert ids.count(load_meta(tmp_path / "bpe")["eot_id"]) == 40 + 1  # (and the separator between the files)
    assert (f"fungpt: note: the text itself holds {EOT_TEXT} 40 times: each became the end-of-text token that "
            f"separates documents (where `fungpt sample` stops); if they are not document breaks, change them in the "
            f"text and prepare it again\n") in capsys.readouterr().out
    assert main(["prepare", "--input", str(top), "--out", str(tmp_path / "char")]) == 0  # (no such token: plain text)
    assert "the text itself holds" not in capsys.readouterr().out and load_meta(tmp_path / "char")[
        "literal_eot_texts"] == 0
    # The train/val cut (at 90% of the characters) fell inside one: its halves became text in each split
    for text, n in (("a" * 85 + EOT_TEXT + "bb", 1), ("x" + EOT_TEXT * 500, 500)):
        (tmp_path / "one.txt").write_text(text, encoding="utf-8")
        out = prepare(tmp_path / "one.txt", tmp_path / "one", tokenizer="bpe", vocab_size=260, progress=False,
                      overwrite=True)
        eot, ids = load_meta(out)["eot_id"], [read_bin(out, split).tolist() for split in ("train", "val")]
        assert load_meta(out)["literal_eot_texts"] == ids[0].count(eot) + ids[1].count(eot) == n
        assert load_tokenizer(out).decode(ids[0]).endswith(EOT_TEXT)


def test_prepare_with_errors_replace_says_how_many_bytes_it_replaced_and_where(tmp_path, capsys):
    """--errors replace turned undecodable bytes into U+FFFD without a word: which file had them, and how many,
    went unknown. Counted per file (the one with most first), the text as "replace" makes it."""
    from fungpt.cli import main

    top = tmp_path / "texts"
    (top / "sub").mkdir(parents=True)
    (top / "a.txt").write_bytes("caf\xe9 latin-1 text\n".encode("latin-1") * 30)  # 30 lone bytes
    (top / "b.txt").write_text("clean text, and a real \ufffd in it\n" * 30, encoding="utf-8")  # (not counted)
    (top / "sub" / "c.txt").write_bytes(b"two \xff\xfe bad bytes\n" + b"plain line\n" * 30)  # (a U+FFFD each)
    assert main(["prepare", "--input", str(top), "--out", str(tmp_path / "d"), "--errors", "replace"]) == 0
    assert ("fungpt: note: 32 undecodable byte sequences became U+FFFD (errors \"replace\"), in 2 files: a.txt, "
            "sub/c.txt\n") in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "d")
    text = "".join(tok.decode(read_bin(tmp_path / "d", split).tolist()) for split in ("train", "val"))
    assert text.count("\ufffd") == 32 + 30  # (the replaced and the real ones)
    assert main(["prepare", "--input", str(top / "b.txt"), "--out", str(tmp_path / "e"), "--errors", "replace"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert main(["prepare", "--input", str(top / "sub" / "c.txt"), "--out", str(tmp_path / "f"), "--errors",
                 "replace"]) == 0
    said = capsys.readouterr().out
    assert "note: 2 undecodable byte sequences became U+FFFD (errors \"replace\"), in c.txt\n" in said


def test_prepare_of_a_folder_names_the_files_it_left_out(tmp_path, capsys, monkeypatch):
    """Empty and hidden files are skipped (README): prepare said nothing of them, so a file that was meant to be read
    (saved empty by mistake, or named .notes) went missing without a word."""
    from fungpt.cli import main

    top = tmp_path / "texts"
    (top / "sub").mkdir(parents=True)
    (top / ".git").mkdir()
    (top / ".git" / "HEAD").write_text("ref", encoding="utf-8")
    (top / "a.txt").write_text("to be or not to be\n" * 50, encoding="utf-8")
    (top / "sub" / "b.txt").write_text("that is the question\n" * 50, encoding="utf-8")
    (top / "sub" / "empty.txt").touch()
    (top / ".notes").write_text("mine", encoding="utf-8")
    assert main(["prepare", "--input", str(top), "--out", str(tmp_path / "d")]) == 0
    said = capsys.readouterr().out
    assert f"read 2 files of {top}; left out 1 empty (sub/empty.txt) and 2 hidden (.git/, .notes)\n" in said
    # where the val split comes from (the last file in sorted order, whose text may be unlike the rest), and no
    # line-ending note for \n text
    assert "note: the val split, the last 10% of the text, is about the end of sub/b.txt (files are read in sorted " \
           "order)" in said and "\\r\\n" not in said
    for i in range(7):
        (top / f".h{i}").touch()
    (top / "sub" / "empty.txt").write_text("now it has text\n", encoding="utf-8")
    (top / "a.txt").write_bytes(b"to be or not to be\r\n" * 50)
    assert main(["prepare", "--input", str(top), "--out", str(tmp_path / "d"), "--overwrite"]) == 0
    said = capsys.readouterr().out
    assert f"read 3 files of {top}; left out 9 hidden (.git/, .h0, .h1, .h2, .h3, ...)\n" in said
    assert "note: 1 file (a.txt) ends its lines with \\r\\n (Windows), kept as they are: the model learns the \\r " \
           "too" in said  # (a model then printed \r\n, with a \r in its vocabulary)
    # through a link to another folder, as the files read are (and a link back up, once)
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "c.txt").write_text("more text\n" * 50, encoding="utf-8")
    (tmp_path / "more" / "blank.txt").touch()
    (top / "linked").symlink_to(tmp_path / "more", target_is_directory=True)
    (top / "sub" / "up").symlink_to(top, target_is_directory=True)
    assert main(["prepare", "--input", str(top), "--out", str(tmp_path / "d"), "--overwrite"]) == 0
    assert f"read 4 files of {top}; left out 1 empty (linked/blank.txt) and 9 hidden" in capsys.readouterr().out
    # train, preparing the same folder into the cache itself (as the README suggests), says the same (it said none)
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["train", "--data.path", str(top), "--out-dir", str(tmp_path / "run"), "--data.tokenizer", "bpe",
                 "--data.vocab-size", "2000", "--train.max-iters", "1", "--train.eval-iters", "1", "--model.n-layer",
                 "1", "--model.n-embd", "16", "--model.n-head", "1", "--model.block-size", "8"]) == 0
    said = capsys.readouterr().out
    assert f"read 4 files of {top}; left out 1 empty (linked/blank.txt) and 9 hidden" in said
    assert re.search(r"fungpt: prepared .*: [\d,]+ train and [\d,]+ val tokens, vocabulary \d+ \(bpe, not the 2,000 "
                     r"asked: the BPE ran out of pairs to merge", said), said


def test_prepare_names_broken_links_and_keeps_odd_names_on_one_line(tmp_path, capsys):
    """A link to a file that is gone (a drive not mounted) was dropped without a word, and a name holding a newline
    split a note over two lines."""
    from fungpt.cli import main

    top = tmp_path / "texts"
    top.mkdir()
    (top / "a.txt").write_text("to be or not to be\n" * 50, encoding="utf-8")
    (top / "chapter2.txt").symlink_to(tmp_path / "usb" / "chapter2.txt")
    (top / "empty\nfile.txt").touch()
    (top / "z\nlast.txt").write_text("that is the question\n" * 50, encoding="utf-8")
    assert main(["prepare", "--input", str(top), "--out", str(tmp_path / "d")]) == 0
    said = capsys.readouterr().out
    assert f"read 2 files of {top}; left out 1 empty (empty\\nfile.txt) and 1 broken link (chapter2.txt)\n" in said
    assert "is about the end of z\\nlast.txt (files are read in sorted order)" in said


@needs_shakespeare
def test_a_folder_of_ones_own_named_shakespeare_never_shares_the_built_in_corpus_cache(tmp_path, monkeypatch):
    """train's cache took `shakespeare` for the built-in corpus whatever was there: a user's own folder of that
    name, prepared first, was later served as Tiny Shakespeare (and the other way round)."""
    from fungpt.config import DataConfig
    from fungpt.rundata import resolve_data

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    mine = tmp_path / "project"
    (mine / "shakespeare").mkdir(parents=True)
    (mine / "shakespeare" / "notes.txt").write_text("to be or not to be\n" * 50, encoding="utf-8")
    monkeypatch.chdir(mine)
    own = resolve_data(DataConfig(path="shakespeare"), progress=False)
    assert load_meta(own)["vocab_size"] == len(set("to be or not to be\n"))
    monkeypatch.chdir(tmp_path)  # elsewhere, the name is the built-in corpus
    builtin = resolve_data(DataConfig(path="shakespeare"), progress=False)
    assert builtin != own and load_meta(builtin)["vocab_size"] == 65


def test_the_cache_sees_new_text_given_the_old_size_and_modification_time(tmp_path, monkeypatch):
    """`cp -p`, `rsync -a` or `touch -r` can give changed text its old size and mtime: the stale tokens trained."""
    from fungpt.config import DataConfig
    from fungpt.rundata import resolve_data

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "small.txt"
    text.write_text("abcabcabc\n" * 40, encoding="utf-8")
    first = resolve_data(DataConfig(path=str(text)), progress=False)
    st = text.stat()
    text.write_text("xyzxyzxyz\n" * 40, encoding="utf-8")  # the same size
    os.utime(text, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old modification time
    second = resolve_data(DataConfig(path=str(text)), progress=False)
    assert second != first and load_tokenizer(second).decode(read_bin(second, "val").tolist()[:3]) == "xyz"


def test_a_text_folder_with_a_meta_json_of_its_own_is_text(tmp_path, monkeypatch):
    """A meta.json among the user's texts made the folder pass for a prepared dataset: training stopped with
    "meta.json lacks format_version ...; run `fungpt prepare --overwrite`", which does not apply."""
    from fungpt.config import DataConfig
    from fungpt.data import is_prepared
    from fungpt.rundata import resolve_data

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    texts = tmp_path / "poems"
    texts.mkdir()
    (texts / "a.txt").write_text("roses are red\n" * 40, encoding="utf-8")
    (texts / "meta.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")  # past the parser's depth
    assert not is_prepared(texts)  # (a RecursionError traceback)
    (texts / "meta.json").write_text('{"title": "my poems"}', encoding="utf-8")
    assert not is_prepared(texts)
    data_dir = resolve_data(DataConfig(path=str(texts)), progress=False)
    assert data_dir != texts and is_prepared(data_dir)
    assert "roses are red" in load_tokenizer(data_dir).decode(read_bin(data_dir, "train").tolist())
    # and `prepare --overwrite` into it refuses, as for any folder it did not make (it deleted the texts)
    with pytest.raises(FunGPTError, match="is not empty and is not a prepared dataset"):
        prepare(texts / "a.txt", texts, overwrite=True, progress=False)
    assert (texts / "a.txt").is_file()


def test_a_prepared_folder_that_lost_its_token_files_is_not_read_as_text(tmp_path, monkeypatch):
    """Its meta.json is prepare's own: training names the missing file (it trained on the JSON as text)."""
    from fungpt.config import DataConfig
    from fungpt.rundata import resolve_data

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "small.txt"
    text.write_text("abcabcabc\n" * 40, encoding="utf-8")
    data = prepare(text, tmp_path / "data", progress=False)
    for name in ("train.bin", "val.bin", "tokenizer_meta.json"):
        (data / name).unlink()
    assert resolve_data(DataConfig(path=str(data)), progress=False) == data
    with pytest.raises(FunGPTError, match=r"train\.bin is missing"):
        load_meta(data)


def test_a_damaged_cached_dataset_is_prepared_again(tmp_path, monkeypatch):
    """Its error said `fungpt prepare --overwrite`, which a user who never ran prepare cannot apply to the cache."""
    from fungpt.config import DataConfig
    from fungpt.rundata import resolve_data

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "small.txt"
    text.write_text("abcabcabc\n" * 40, encoding="utf-8")
    cached = resolve_data(DataConfig(path=str(text)), progress=False)
    whole = (cached / "val.bin").read_bytes()
    (cached / "val.bin").write_bytes(whole[:-2])  # cut short
    assert resolve_data(DataConfig(path=str(text)), progress=False) == cached
    assert (cached / "val.bin").read_bytes() == whole


def test_a_linked_folder_inside_the_input_folder_is_read_once(tmp_path):
    """Path.rglob does not follow links to folders: a linked folder's text was silently left out (and a folder
    holding only such a link was said to hold no text)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "a.txt").write_text("linked text\n", encoding="utf-8")
    top = tmp_path / "top"
    top.mkdir()
    (top / "b.txt").write_text("own text\n", encoding="utf-8")
    (top / "zz").mkdir()
    (top / "zz" / "z.txt").write_text("a folder of its own\n", encoding="utf-8")
    try:
        (top / "linked").symlink_to(shared, target_is_directory=True)
        (shared / "back").symlink_to(top, target_is_directory=True)  # a loop: read once, not forever
        (top / "aa").symlink_to(top / "zz", target_is_directory=True)  # zz is read as zz, not as aa
        (top / ".backup").symlink_to(top / "zz", target_is_directory=True)  # hidden: skipped, zz still read
        (top / "again.txt").symlink_to(top / "b.txt")  # the same text under another name: read once
    except OSError:
        pytest.skip("no symbolic links here")
    assert [p.relative_to(top).as_posix() for p in resolve_source(top)] == ["b.txt", "linked/a.txt", "zz/z.txt"]


def test_a_folder_of_own_ids_is_told_what_to_correct_not_to_prepare_again(tmp_path, corpus):
    """A hand-made folder (README, "Data of your own token ids") has no text to prepare from, and `prepare
    --overwrite` would replace its files: its messages say what to correct. prepare's own folders: prepare again."""
    from fungpt.data import check_token_ids

    def folder(name, ids, dtype="uint16", **meta):
        d = tmp_path / name
        d.mkdir()
        ids[:900].tofile(d / "train.bin")
        ids[900:].tofile(d / "val.bin")
        size = ids.itemsize / np.dtype(dtype).itemsize  # declared tokens per id written: counts that fit the files
        (d / "meta.json").write_text(json.dumps({"format_version": 1, "tokenizer": "char", "vocab_size": 50,
                                                 "dtype": dtype, "train_tokens": int(900 * size),
                                                 "val_tokens": int((len(ids) - 900) * size), **meta}))
        return d

    ids = (np.arange(1000) % 50).astype(np.uint16)
    odd = folder("odd", ids, train_tokens=901)
    with pytest.raises(FunGPTError, match=r"promises 901 uint16 tokens \(1802 bytes\); set train_tokens to 900 \(the "
                                          r"file's size over 2 bytes\), or correct meta.json or the files \(README"):
        load_meta(odd)
    wide = folder("wide", ids.astype(np.uint32), dtype="uint16")  # uint32 ids declared uint16: (id, 0) pairs
    # a note, not a refusal: uint16 text of one character a line alternates id 0 (the newline) the same way
    assert re.fullmatch(r"fungpt: note: every second token of .*train.bin is id 0 \(1,800 read\): if its ids were "
                        r"written as uint32, set \"dtype\": \"uint32\" in meta.json and halve .*",
                        check_token_ids(wide, load_meta(wide)))
    lines = folder("lines", np.array([1 + i % 9 if i % 2 == 0 else 0 for i in range(1000)], dtype=np.uint16))
    assert check_token_ids(lines, load_meta(lines)) is not None  # noted, and trains
    counted = folder("counted", ids.astype(np.uint32), dtype="uint16", train_tokens=900, val_tokens=100)
    with pytest.raises(FunGPTError, match=r"promises 900 uint16 tokens \(1800 bytes\); the size fits 900 uint32 "
                                          r"tokens: if the ids are uint32, set \"dtype\": \"uint32\"; else correct"):
        load_meta(counted)  # (not "set train_tokens to 1800", which the note above would then undo)
    # int64 ids (np.array(list).tofile): counted right, the size is 8 bytes an id; counted to fit, a note says so
    # as uint16 (id, 0, 0, 0) and as uint32 (id, 0), not "write them as uint32", which led to the second
    long = folder("long", ids.astype(np.int64), train_tokens=900, val_tokens=100)
    with pytest.raises(FunGPTError, match=r"the size fits 900 ids of 8 bytes \(int64, numpy's default integer\): "
                                          r"write them with ids.astype\(np.uint16\).tofile\(path\); else correct"):
        load_meta(long)
    for dtype, every, by in (("uint16", "fourth", 4), ("uint32", "second", 2)):
        long = folder(f"long-{dtype}", ids.astype(np.int64), dtype=dtype)
        assert re.fullmatch(rf"fungpt: note: only every {every} token of .*train.bin is not id 0 \([\d,]+ read\): "
                            rf"if its ids were written as 64-bit integers \(int64, numpy's default\), write them "
                            rf"again with ids.astype\(np.{dtype}\).tofile\(path\) and divide train_tokens and "
                            rf"val_tokens by {by} .*", check_token_ids(long, load_meta(long)))
    narrow = folder("narrow", ids, dtype="uint32")  # uint16 ids declared uint32: two ids in each value
    with pytest.raises(FunGPTError, match=r"holds token id 65536 \(at token 0\), two ids below vocab_size 50 side by "
                                          r"side: .* set \"dtype\": \"uint16\" and double"):
        check_token_ids(narrow, load_meta(narrow))
    past = folder("past", np.where(ids == 7, 50, ids).astype(np.uint32), dtype="uint32")  # one id too large
    with pytest.raises(FunGPTError, match=r"holds token id 50 \(at token 7\), but meta.json's vocab_size is 50: ids "
                                          r"must be below it"):
        check_token_ids(past, load_meta(past))  # (its upper half 0 and lower half 50: not two uint16 ids)
    fine = folder("fine", ids)
    assert check_token_ids(fine, load_meta(fine)) is None  # right as it is: nothing said
    # an id damaged after that check, found by a training batch or an eval window: not "prepare the data again"
    spoilt = np.memmap(fine / "val.bin", dtype=np.uint16, mode="r+")
    spoilt[:] = 60000
    spoilt.flush()
    del spoilt
    with pytest.raises(FunGPTError, match=r"val.bin holds token id 60000, but the vocabulary has 50 \(ids 0..49\): the "
                                          r"file is damaged; correct meta.json or the files \(README"):
        next(iter_eval_windows(fine, "val", 16, 4))
    with pytest.raises(FunGPTError, match=r"the file is damaged; correct meta.json or the files \(README"):
        BatchLoader(fine, "val", batch_size=4, block_size=16).next_batch()
    prepared = prepare(corpus, tmp_path / "p", tokenizer="char", progress=False)
    with open(prepared / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(FunGPTError, match=r"\(\d+ bytes\); run `fungpt prepare --overwrite` again$"):
        load_meta(prepared)


def test_sizes_of_the_text_added_to_meta_json_leave_the_dataset_the_same(tmp_path, corpus):
    """The README has users add val_bytes and val_chars to a folder of their own ids for bits per byte: added while
    a run trained on it, the run stopped, its data "prepared again". The tokens' own keys still count."""
    from fungpt.data import same_dataset

    meta = load_meta(prepare(corpus, tmp_path / "p", tokenizer="char", progress=False))
    sized = {k: v for k, v in meta.items() if k not in ("val_bytes", "val_chars")}
    assert same_dataset(meta, sized) and same_dataset(meta, {**meta, "source": "./" + str(meta["source"])})
    assert not same_dataset(meta, {**meta, "val_tokens": meta["val_tokens"] + 1})
    assert not same_dataset(meta, {**meta, "source_sha256": "0" * 64})


def test_a_split_of_separators_alone_is_refused_before_anything_is_written(tmp_path):
    """A folder whose last file holds only a byte-order mark: the val split would be one <|endoftext|> and no text
    (val_bytes 0), a folder that load_meta then called corrupt, and that preparing again made again."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("x" * 2000, encoding="utf-8")
    (folder / "b.txt").write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(FunGPTError, match=r"the val split holds no text, only the separators between files .*; use "
                                          r"more text, or another val fraction \(--val-fraction for fungpt prepare, "
                                          r"--data.val-fraction for fungpt train\)$"):  # (train has no --val-fraction)
        prepare(folder, tmp_path / "out", tokenizer="bpe", vocab_size=300, val_fraction=0.006, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # a char vocabulary's separator is a newline, text like any other: a val split of it alone is one character
    meta = load_meta(prepare(folder, tmp_path / "out", tokenizer="char", val_fraction=0.0004, progress=False))
    assert meta["val_tokens"] == meta["val_bytes"] == 1


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_json_files_written_by_windows_tools_load(tmp_path, corpus, encoding):
    """A hand-written meta.json or tokenizer_meta.json (README, "Data of your own token ids") saved by Notepad or
    PowerShell starts with a byte-order mark, or is UTF-16: "is corrupt (JSONDecodeError)" was all it got."""
    data = prepare(corpus, tmp_path / "d", progress=False)
    for name in ("meta.json", "tokenizer_meta.json"):
        path = data / name
        path.write_bytes(path.read_text(encoding="utf-8").encode(encoding))
    assert load_meta(data)["vocab_size"] == load_tokenizer(data).vocab_size


@pytest.mark.skipif(os.name == "nt", reason="RLIMIT_FSIZE is POSIX")
def test_a_tokenizer_file_that_cannot_be_written_is_a_disk_error_not_the_librarys(tmp_path, corpus):
    """The tokenizers library reports a failed write as a plain Exception: prepare named a temporary folder that
    was gone ("could not write the tokenizer into OUT.tmp-HOST-PID") instead of its own disk-full message."""
    import subprocess
    import sys

    probe = prepare(corpus, tmp_path / "probe", tokenizer="bpe", vocab_size=300, progress=False)
    limit = max((probe / name).stat().st_size for name in ("train.bin", "val.bin", "meta.json"))
    assert limit < (probe / "tokenizer.json").stat().st_size  # the dataset's files fit, tokenizer.json not
    shutil.rmtree(probe)
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from fungpt.data import prepare\n"
        "from fungpt.errors import FunGPTError\n"
        "try:\n"
        "    prepare(sys.argv[1], sys.argv[2], tokenizer='bpe', vocab_size=300, progress=False)\n"
        "except FunGPTError as e:\n"
        "    print(e)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-c", script, str(corpus), str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == f"could not write the dataset to {out}: File too large; choose another --out", \
        proc.stdout + proc.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_files_the_system_hides_by_a_flag_are_not_text():
    """Windows marks desktop.ini and Thumbs.db hidden and system (no leading dot, not shown in Explorer): a
    folder corpus stopped on them ("UTF-16 text: convert it", "a binary file") though the user never saw them."""
    import stat
    import types

    hidden = data_mod._hidden_by_flag
    assert hidden(types.SimpleNamespace(st_file_attributes=stat.FILE_ATTRIBUTE_HIDDEN | stat.FILE_ATTRIBUTE_SYSTEM))
    assert hidden(types.SimpleNamespace(st_file_attributes=stat.FILE_ATTRIBUTE_SYSTEM))
    assert hidden(types.SimpleNamespace(st_flags=stat.UF_HIDDEN))  # macOS
    assert not hidden(types.SimpleNamespace(st_file_attributes=stat.FILE_ATTRIBUTE_ARCHIVE, st_flags=0))
    assert not hidden(types.SimpleNamespace())  # Linux: neither field


def test_a_file_reached_twice_is_read_once(tmp_path):
    """Two links to one file, or a file and a link to its folder, read its text twice: maybe into both splits."""
    outside, folder = tmp_path / "outside", tmp_path / "corpus"
    outside.mkdir()
    folder.mkdir()
    (outside / "a.txt").write_text("outside text\n" * 20, encoding="utf-8")
    (folder / "own.txt").write_text("own text\n" * 20, encoding="utf-8")
    try:
        (folder / "ext").symlink_to(outside, target_is_directory=True)
        (folder / "a-link.txt").symlink_to(outside / "a.txt")
    except OSError:
        pytest.skip("no symbolic links here")
    os.link(folder / "own.txt", folder / "own-again.txt")  # (a hard link: one file, two names)
    # (the first name in sorted order stands for the file)
    assert [p.relative_to(folder).as_posix() for p in resolve_source(folder)] == ["a-link.txt", "own-again.txt"]
    # a file system without inode numbers (0 for every file, some network or Windows ones): every file is read
    (folder / "zz.txt").write_text("more text\n" * 20, encoding="utf-8")
    real_stat = Path.stat

    def no_inodes(self, **kwargs):
        st = real_stat(self, **kwargs)
        return os.stat_result((st.st_mode, 0, *tuple(st)[2:]))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Path, "stat", no_inodes)
        names = [p.relative_to(folder).as_posix() for p in resolve_source(folder)]
    assert names == ["a-link.txt", "own-again.txt", "own.txt", "zz.txt"]  # (the link to a.txt's folder: its path)


def test_damage_or_odd_input_met_while_preparing_is_handled(tmp_path, fake_download, monkeypatch):
    """A cached dataset that lost its meta.json blocked every later run ("not empty and not a prepared dataset");
    a download cut short was a raw IncompleteRead; a ready BPE tokenizer was recorded as 4,096 tokens "asked"; and a
    1 MB read ending inside a literal <|endoftext|> cut between two newlines, which changed the tokens."""
    import http.client

    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    damaged = tmp_path / "cache" / "datasets" / "x-char-0123"
    damaged.mkdir(parents=True)
    (damaged / "train.bin").write_bytes(b"\0\0")  # (its meta.json gone)
    data_mod._check_out_dir(damaged, overwrite=True)  # prepared again, not refused
    with pytest.raises(FunGPTError, match="not empty and is not a prepared dataset"):
        data_mod._check_out_dir(damaged, overwrite=False)
    for elsewhere in (tmp_path / "cache", tmp_path / "cache" / "datasets"):  # (only a dataset folder of the cache:
        with pytest.raises(FunGPTError, match="not empty and is not a prepared dataset"):  # --overwrite of the cache
            data_mod._check_out_dir(elsewhere, overwrite=True)                          # itself deleted all of it

    def cut_short(url, timeout=0):
        raise http.client.IncompleteRead(b"abcde", 995)

    monkeypatch.setattr(data_mod, "fetch_url", cut_short)
    with pytest.raises(FunGPTError, match=r"could not download Tiny Shakespeare .*IncompleteRead"):
        data_mod.shakespeare_path()

    corpus = tmp_path / "c.txt"
    corpus.write_text("some words of text here\n" * 200, encoding="utf-8")
    tok = load_tokenizer(prepare(corpus, tmp_path / "a", tokenizer="bpe", vocab_size=300, progress=False))
    assert "vocab_size_asked" in load_meta(tmp_path / "a")
    assert "vocab_size_asked" not in load_meta(prepare(corpus, tmp_path / "b", tokenizer=tok, progress=False))
    # a ready tokenizer has its own vocabulary: a vocab_size beside it was dropped without a word
    with pytest.raises(FunGPTError, match=r"vocab_size 1000 does not apply to a ready tokenizer, which has its own "
                                          r"vocabulary \([\d,]+ tokens\); leave it out"):
        prepare(corpus, tmp_path / "c", tokenizer=tok, vocab_size=1000, progress=False)

    text = "x " * 50 + ".\n\n" + EOT_TEXT[:5]  # (the read ends inside the <|endoftext|> that follows)
    assert data_mod._last_safe_cut(text) == text.index(".\n\n") + 1  # before both newlines, not between them


def test_a_given_char_tokenizer_names_the_file_and_its_position_of_a_missing_character(tmp_path):
    """prepare(..., tokenizer=a char tokenizer) said a missing character's position within a piece of the split (799
    for the 8,000th character) and no file."""
    from fungpt.tokenizer import CharTokenizer

    tok = CharTokenizer.train("abc \n")
    (tmp_path / "one.txt").write_text("abc abc\n" * 1000 + "Z\n", encoding="utf-8")
    with pytest.raises(FunGPTError, match=re.escape(f"{tmp_path / 'one.txt'}: character 'Z' (U+005A LATIN CAPITAL "
                                                    f"LETTER Z) at position 8,000 (counting from 0) is not in")):
        prepare(tmp_path / "one.txt", tmp_path / "o1", tokenizer=tok, progress=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("abc\n" * 10, encoding="utf-8")
    (tmp_path / "c" / "b.txt").write_text("ab\nQ", encoding="utf-8")
    with pytest.raises(FunGPTError, match=re.escape(f"{tmp_path / 'c' / 'b.txt'}: character 'Q' (U+0051 LATIN CAPITAL "
                                                    f"LETTER Q) at position 3 (counting")):
        prepare(tmp_path / "c", tmp_path / "o2", tokenizer=tok, progress=False)
    with pytest.raises(FunGPTError, match=r"the given char tokenizer has no '\\n', which prepare puts between the "
                                          r"files of a folder \(.*\): use a tokenizer that has it, or join"):
        (tmp_path / "d").mkdir()  # (files without a newline of their own: only the one put between them)
        (tmp_path / "d" / "a.txt").write_text("abc " * 100, encoding="utf-8")
        (tmp_path / "d" / "b.txt").write_text("cab " * 100, encoding="utf-8")
        prepare(tmp_path / "d", tmp_path / "o4", tokenizer=CharTokenizer.train("abc "), progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert load_meta(prepare(tmp_path / "c" / "a.txt", tmp_path / "o3", tokenizer=tok, progress=False))["train_tokens"]
