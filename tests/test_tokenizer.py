"""Tests for fungpt.tokenizer: round trips, errors, save/load of every kind.

All hermetic: the gpt2 tests inject a tiny fake tiktoken encoding or a failing
loader instead of touching the network (set FUNGPT_TEST_GPT2=1 to also try the
real GPT-2 encoding, which needs tiktoken's cached files or the network).
"""

import copy
import json
import os
import re
import sys
import time

import pytest

import fungpt.tokenizer as tokenizer_mod
from fungpt.errors import FunGPTError
from fungpt.tokenizer import (
    EOT_TEXT,
    MIN_BPE_VOCAB,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    TextStream,
    load_tokenizer,
    train_tokenizer,
)

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 20

UNUSUAL = ["", "a", "日本語 🎉", "hello\n\n\nworld  ", "\r\n\t\x01", f"one{EOT_TEXT}two", "  leading spaces", "é" * 5]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(CORPUS, vocab_size=300)


def fake_gpt2_encoding():
    """A tiny tiktoken Encoding shaped like GPT-2's: 256 bytes, one merge, <|endoftext|>."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"th"] = 256
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name="fake-gpt2", pat_str=pat, mergeable_ranks=ranks, special_tokens={EOT_TEXT: 257})


# --- char ----------------------------------------------------------------------


def test_char_round_trip_and_vocab():
    tok = CharTokenizer.train(CORPUS)
    assert tok.name == "char" and tok.eot_id is None
    assert tok.chars == sorted(set(CORPUS))
    assert tok.vocab_size == len(set(CORPUS))
    ids = tok.encode(CORPUS)
    assert len(ids) == len(CORPUS) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == CORPUS
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_char_train_from_chunks_equals_from_text():
    chunks = [CORPUS[i : i + 7] for i in range(0, len(CORPUS), 7)]
    assert CharTokenizer.train(iter(chunks)).chars == CharTokenizer.from_text(CORPUS).chars


def test_char_unknown_character_names_char_and_position():
    tok = CharTokenizer.train("abc ")
    with pytest.raises(FunGPTError) as err:
        tok.encode("abc abcé")
    msg = str(err.value)
    assert "'é'" in msg and "position 7" in msg and "4 characters" in msg and "bpe" in msg
    with pytest.raises(FunGPTError, match="position 0"):
        tok.encode("\U0001f389")  # emoji, code point far beyond the vocabulary
    with pytest.raises(FunGPTError, match="position 1"):
        tok.encode("a\ud800")  # lone surrogate
    # Each is named by its code point (a combining mark printed bare landed on the quote before it); the same letter
    # in another Unicode form (e + U+0308, as macOS may type the corpus's precomposed ë) is said to need NFC
    with pytest.raises(FunGPTError) as err:
        CharTokenizer.train("Zo\u00eb, ").encode("Zoe\u0308,")
    assert str(err.value) == ("character 'e' (U+0065 LATIN SMALL LETTER E) at position 2 (counting from 0) is not in "
                              "this char-level vocabulary (5 characters seen in training); the text's letters are in "
                              "another Unicode form than the training text's: normalise it to NFC "
                              "(unicodedata.normalize('NFC', text))")
    with pytest.raises(FunGPTError, match=r"^character '\u0308' \(U\+0308 COMBINING DIAERESIS\) at position 1 "
                                          r"\(counting from 0\) .*; remove it from the text"):
        CharTokenizer.train("Zoe, ").encode("e\u0308")  # (a mark NFC cannot join: no such hint)


def test_decode_bad_ids(bpe):
    for tok in (CharTokenizer.train("ab"), bpe):  # -1 wrapped to the last character, or overflowed in Rust
        for ids in ([0, tok.vocab_size], [0, -1]):  # and the BPE library dropped ids past its vocabulary
            with pytest.raises(FunGPTError, match="range"):
                tok.decode(ids)
    assert bpe.decode([]) == "" and CharTokenizer.train("ab").decode([]) == ""


def test_decode_takes_one_sequence_as_a_list_tensor_or_array(bpe):
    """generate returns (1, T): decoding it whole raised "Boolean value of Tensor ... is ambiguous"."""
    import numpy as np
    import torch

    for tok in (CharTokenizer.train("abc"), bpe):
        ids = tok.encode("abcab")
        for same in (torch.tensor(ids), np.array(ids), [np.int64(i) for i in ids], [torch.tensor(i) for i in ids]):
            assert tok.decode(same) == "abcab"
        with pytest.raises(FunGPTError, match=r"ids of shape \(1, 5\): decode takes one sequence.*ids\[0\]"):
            tok.decode(torch.tensor([ids]))
        with pytest.raises(FunGPTError, match=r"ids of shape \(\): .*for one id pass \[id\]"):
            tok.decode(torch.tensor(ids[0]))
        with pytest.raises(FunGPTError, match="range"):
            tok.decode([0.0, 1.0])  # not integers


# --- bpe -----------------------------------------------------------------------


@pytest.mark.parametrize("text", UNUSUAL + [CORPUS])
def test_bpe_round_trip_any_string(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_basics(bpe):
    assert bpe.name == "bpe"
    assert bpe.vocab_size <= 300
    assert bpe.eot_id is not None
    assert bpe.encode(EOT_TEXT) == [bpe.eot_id]
    assert len(bpe.encode(CORPUS)) < len(CORPUS) / 2  # merges actually compress
    assert bpe.encode_batch(UNUSUAL) == [bpe.encode(t) for t in UNUSUAL]


def test_bpe_train_from_files_and_chunks(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(CORPUS, encoding="utf-8")
    from_file = BPETokenizer.train([path], vocab_size=280)
    from_chunks = BPETokenizer.train(iter(CORPUS.splitlines(keepends=True)), vocab_size=280)
    assert from_file.decode(from_file.encode("日本語 " + CORPUS[:50])) == "日本語 " + CORPUS[:50]
    assert from_chunks.vocab_size <= 280


def test_bpe_train_from_files_cuts_as_from_text(tmp_path):
    """Files given as Paths are learned from as text is: without merges across <|endoftext|> (which encoding splits
    off) and with long words cut (the library reading the files itself did neither)."""
    path = tmp_path / "c.txt"
    path.write_text(("hello world.<|endoftext|>the end " * 200 + "\n") * 3 + "ab" * 3000 + "\n", encoding="utf-8")
    tok = BPETokenizer.train([path], vocab_size=400)
    pieces = [tok.decode([i]) for i in range(tok.vocab_size)]
    assert [p for p in pieces if "endof" in p or "<|" in p or "|>" in p] == [EOT_TEXT]
    assert max(len(p) for p in pieces) <= tokenizer_mod.BPE_MAX_WORD_CHARS
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe not utf-8\n")
    with pytest.raises(FunGPTError, match=r"could not read .*bad.txt to train the tokenizer: .*byte 0xff"):
        BPETokenizer.train([bad], vocab_size=300)


def test_bpe_training_cuts_runs_without_spaces():
    """A run of non-space characters longer than BPE_MAX_WORD_CHARS is learned from in pieces (the trainer's
    time grows with the square of a word's length: DNA or a long hash without spaces took minutes)."""
    text = "intro " + "ab" * 2000 + " outro"
    pieces = list(tokenizer_mod._cut_long_runs(["x y", text]))
    assert "".join(pieces) == "x y" + text
    assert max(len(w) for p in pieces for w in p.split()) == tokenizer_mod.BPE_MAX_WORD_CHARS
    # "abab..." merges into tokens twice as long each time: uncut, into one of 2048 characters
    tok = BPETokenizer.train(text, vocab_size=300)
    longest = max(len(tok.decode([i])) for i in range(tok.vocab_size))
    assert 64 < longest <= tokenizer_mod.BPE_MAX_WORD_CHARS
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("size", [0, 100, 256])
def test_bpe_vocab_too_small(size):
    with pytest.raises(FunGPTError, match=f"vocab size {size} is too small.*at least 257"):
        BPETokenizer.train(CORPUS, vocab_size=size)


def test_bpe_vocab_too_large_is_refused_before_the_library_aborts():
    with pytest.raises(FunGPTError, match="vocab size 1,000,000,000 is too large"):
        BPETokenizer.train(CORPUS, vocab_size=10**9)  # the library tried to allocate 70 GB and aborted the process


def test_bpe_vocab_size_limit_is_exact():
    """MAX_BPE_VOCAB (2**20) itself is allowed, one more is refused (checked without training either)."""
    assert tokenizer_mod.MAX_BPE_VOCAB == 2**20
    tokenizer_mod.check_bpe_vocab_size(2**20)
    with pytest.raises(FunGPTError, match="vocab size 1,048,577 is too large: use at most 1,048,576"):
        tokenizer_mod.check_bpe_vocab_size(2**20 + 1)


def test_first_difference_of_vocabularies_of_other_sizes_is_id_0():
    """Other sizes never read each other's token files: None ("every id means the same") would let a run's
    tokenizer pass for its data's."""
    two, three = CharTokenizer(["a", "b"]), CharTokenizer(["a", "b", "c"])
    assert two.first_difference(three) == 0 and three.first_difference(two) == 0
    assert two.first_difference(CharTokenizer(["a", "b"])) is None
    assert two.first_difference(CharTokenizer(["a", "c"])) == 1


# --- gpt2 ----------------------------------------------------------------------


def test_gpt2_with_fake_encoding_round_trip():
    tok = GPT2Tokenizer(encoding=fake_gpt2_encoding())
    assert tok.name == "gpt2" and tok.vocab_size == 258 and tok.eot_id == 257
    for text in UNUSUAL:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(f"a{EOT_TEXT}") == [ord("a"), 257]
    assert tok.encode_batch(["the", "x"]) == [tok.encode("the"), tok.encode("x")]


def test_gpt2_refuses_what_the_other_tokenizers_refuse(tmp_path, monkeypatch, bpe):
    """A lone surrogate (a prompt typed in a Latin-1 terminal) was encoded silently as U+FFFD by tiktoken; a
    hand-written tokenizer_meta.json with GPT-2's size but another eot_id (the token where samples stop), or sizes
    that are not the encoding's, loaded without a word; an id out of range was a raw KeyError in token_text."""
    fake = fake_gpt2_encoding()
    tok = GPT2Tokenizer(encoding=fake)
    for call, said in ((lambda: tok.encode("a\udcffb"), "byte 0xff, which is not UTF-8"),
                       (lambda: tok.encode_batch(["x", "y\ud800"]), "U+D800, a lone surrogate")):
        with pytest.raises(FunGPTError, match=f"cannot encode the text: .*{re.escape(said)}"):
            call()
    for t in (tok, bpe, CharTokenizer.train("abc")):
        with pytest.raises(FunGPTError, match=r"ids must be integers in range"):
            t.token_text(t.vocab_size)
        with pytest.raises(FunGPTError, match=r"ids must be integers in range"):
            t.token_text(-1)
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps({"kind": "gpt2", "vocab_size": 50257, "eot_id": 0}))
    with pytest.raises(FunGPTError, match="gives GPT-2's encoding eot_id 0, but its <|endoftext|> is 50256"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps({"kind": "gpt2", "vocab_size": 300, "eot_id": 2}))
    loaded = load_tokenizer(tmp_path)  # (training on ids needs only the sizes: the encoding is loaded when used)
    monkeypatch.setattr(tokenizer_mod, "_load_gpt2_encoding", lambda: fake)
    with pytest.raises(FunGPTError, match="records vocab_size 300 and eot_id 2, but GPT-2's encoding has 258 and 257"):
        loaded.encode("hello")


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_token_bytes_join_to_the_text_and_partial_characters_show_as_escapes(kind, bpe):
    text = "café, naïve — 日本 " + EOT_TEXT + " end"
    tok = {"char": lambda: CharTokenizer.train(text), "bpe": lambda: bpe,
           "gpt2": lambda: GPT2Tokenizer(encoding=fake_gpt2_encoding())}[kind]()
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    texts = [tok.token_text(i) for i in ids]
    assert all("\ufffd" not in t for t in texts)  # never the replacement character
    if kind == "char":
        assert texts == list(text)
    else:
        # "é" is C3 A9: an untrained byte-level BPE keeps multi-byte characters as separate byte tokens.
        partial = [t for i, t in zip(ids, texts) if tok.token_bytes(i) in (b"\xc3", b"\xa9")]
        assert partial and set(partial) <= {"\\xc3", "\\xa9"}
        assert tok.token_text(tok.encode("abc")[0]) == tok.decode(tok.encode("abc")[:1])  # whole characters: as decode
    for bad in (-1, tok.vocab_size):  # (the BPE's -1 was a raw OverflowError from the library)
        with pytest.raises(FunGPTError, match=rf"cannot decode: ids must be integers in range\({tok.vocab_size}\)"):
            tok.token_bytes(bad)


def test_gpt2_load_failure_is_a_clear_error(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'\nsecond line")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(FunGPTError) as err:
        GPT2Tokenizer()
    msg = str(err.value)
    assert "tiktoken" in msg and "TIKTOKEN_CACHE_DIR" in msg and "\n" not in msg
    assert "copy the whole folder" in msg  # (a folder's worth of hashed names: not one file the user could name)
    # the flag for each command (`fungpt train` has no --tokenizer), and "no network" instead of 650 characters of
    # chained urllib3 text cut mid-word
    assert "`fungpt prepare --tokenizer bpe`, `fungpt train --data.tokenizer bpe`" in msg
    assert "(could not reach the server: no network, or a proxy or mirror that does not answer)" in msg
    assert "openaipublic" not in msg
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(OSError("disk " * 100)))
    with pytest.raises(FunGPTError, match=r"\(OSError: disk disk .* \.\.\.\): connect to the internet once"):
        GPT2Tokenizer()


def test_gpt2_load_hang_times_out(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: time.sleep(5))
    start = time.monotonic()
    with pytest.raises(FunGPTError, match="timed out"):
        tokenizer_mod._load_gpt2_encoding(timeout=0.2)
    assert time.monotonic() - start < 2


def test_gpt2_without_tiktoken(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` fail
    with pytest.raises(FunGPTError, match="pip install tiktoken"):
        GPT2Tokenizer()


@pytest.mark.skipif(os.environ.get("FUNGPT_TEST_GPT2") != "1", reason="set FUNGPT_TEST_GPT2=1 (needs cached files)")
def test_gpt2_real_encoding():
    tok = GPT2Tokenizer()
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]


# --- factory, save and load ------------------------------------------------------


def test_save_and_load_every_kind(tmp_path, monkeypatch, bpe):
    monkeypatch.setattr(tokenizer_mod, "_load_gpt2_encoding", fake_gpt2_encoding)
    tokenizers = {
        "char": CharTokenizer.train(CORPUS + "é"),
        "bpe": bpe,
        "gpt2": GPT2Tokenizer(),
    }
    for kind, tok in tokenizers.items():
        tok.save(tmp_path / kind)
        meta = json.loads((tmp_path / kind / "tokenizer_meta.json").read_text(encoding="utf-8"))
        assert meta["kind"] == kind
        loaded = load_tokenizer(tmp_path / kind)
        assert type(loaded) is type(tok) and loaded.name == kind
        assert loaded.vocab_size == tok.vocab_size and loaded.eot_id == tok.eot_id
        text = CORPUS[:200] + "é"
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


def test_a_failed_save_keeps_the_tokenizer_that_was_there(tmp_path, bpe, monkeypatch):
    import errno

    bpe.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(tok, path):  # part of the file is written, then the disk is full
        path.write_text('{"truncated', encoding="utf-8")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokenizer_mod, "write_hf_json", full_disk)
    with pytest.raises(OSError, match="No space left on device"):  # (which every writer explains in one line)
        bpe.save(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # intact, no temporary left
    assert load_tokenizer(tmp_path).encode("hello") == bpe.encode("hello")


def test_load_missing_or_corrupt(tmp_path, bpe):
    with pytest.raises(FunGPTError, match="tokenizer_meta.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(FunGPTError, match="tokenizer_meta.json is corrupt"):
        load_tokenizer(tmp_path)
    # a damaged char list is said to be one (the messages were about training text: "the training text is empty")
    for chars, why in (([], "its 'chars' list is empty"), (["a", "\ud800"], "its 'chars' list holds a lone surrogate"),
                       (["a", "a"], "a char vocabulary must be a list of distinct single characters")):
        (tmp_path / "tokenizer_meta.json").write_text(json.dumps({"kind": "char", "chars": chars}), encoding="utf-8")
        with pytest.raises(FunGPTError, match=rf"tokenizer_meta.json is corrupt \({re.escape(why)}"):
            load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text('{"kind": "wordpiece"}', encoding="utf-8")
    with pytest.raises(FunGPTError, match="unknown kind 'wordpiece'; expected one of char, bpe, gpt2, hf$"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text('{"kind": "char", "chars": ["a", "ab"]}', encoding="utf-8")
    with pytest.raises(FunGPTError, match="corrupt"):
        load_tokenizer(tmp_path)
    bpe.save(tmp_path / "b")
    (tmp_path / "b" / "tokenizer.json").write_text("garbage", encoding="utf-8")
    with pytest.raises(FunGPTError, match=r"could not read the BPE tokenizer file .*tokenizer.json: .*; restore the "
                                          r"folder's tokenizer files"):  # (what to do, as for a missing one)
        load_tokenizer(tmp_path / "b")
    (tmp_path / "b" / "tokenizer.json").unlink()
    with pytest.raises(FunGPTError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path / "b")


def test_train_tokenizer_factory():
    assert train_tokenizer("char", CORPUS).name == "char"
    assert train_tokenizer("bpe", CORPUS, vocab_size=270).vocab_size <= 270
    with pytest.raises(FunGPTError, match="unknown tokenizer 'words'"):
        train_tokenizer("words", CORPUS)
    with pytest.raises(FunGPTError, match="only applies to --tokenizer bpe"):
        train_tokenizer("char", CORPUS, vocab_size=100)


def test_ctrl_c_is_acted_on_while_the_tokenizer_library_works(capsys):
    """BPE training runs in Rust without Python's lock; a Ctrl-C must still stop the command at once."""
    import signal
    import threading

    # The work runs off the main thread, whose wait Python can interrupt (Rust code holding the main thread
    # would not return to Python, where signal handlers run, before it ends)
    ran_in = []
    tokenizer_mod.interruptible(lambda: ran_in.append(threading.current_thread()))
    assert ran_in and ran_in[0] is not threading.main_thread()
    release = threading.Event()
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        tokenizer_mod.interruptible(lambda: release.wait(30))  # stands in for a long call into Rust
    assert time.monotonic() - t0 < 5  # not after the work ended (30 s)
    # a process that goes on (a notebook) waits for that work to end before it starts the next: two at once held
    # twice the memory
    threading.Timer(0.5, release.set).start()
    first_ended = []
    tokenizer_mod.interruptible(lambda: first_ended.append(release.is_set()))
    assert first_ended == [True]
    assert "waiting for the tokenizer training that a Ctrl-C interrupted to end" in capsys.readouterr().err
    with pytest.raises(FunGPTError, match="bad corpus"):  # the work's own errors reach the caller
        tokenizer_mod.interruptible(lambda: (_ for _ in ()).throw(FunGPTError("bad corpus")))


def test_bpe_training_cuts_only_long_words():
    """The cut is per word, as GPT-2's pre-tokenizer splits: letters, digits and the rest apart."""
    def cut(text):
        return list(tokenizer_mod._cut_long_runs([text]))

    url = "https://example.com/" + "section/" * 50
    chinese = "我们今天去公园散步，" * 40
    for text in (url, chinese, "a1" * 200, "a" * 256, "-" * 256):
        assert cut(text) == [text]  # words of at most 256 characters: as they were
    assert [len(p) for p in cut("a" * 300) if p] == [256, 44]
    assert [len(p) for p in cut("7" * 600) if p] == [256, 256, 88]
    # one word for the library, though Python's classes split them: "½" is a number (Python: not \d), U+001F
    # is no space (Python: \s); each such run of 80,000 characters took seconds and became one token
    assert [len(p) for p in cut("1½" * 150) if p] == [256, 44]
    assert [len(p) for p in cut("\x1f" * 300) if p] == [256, 44]
    assert [len(p) for p in cut("a" + " " * 300 + "b") if p] == [1, 256, 44, 1]  # (80,000 spaces: one token)
    assert [len(p) for p in cut("x" * 10 + "7" * 300) if p] == [10, 256, 44]  # (a number after a short word)


def test_bpe_training_learns_nothing_across_an_end_of_text_in_the_corpus():
    """Encoding splits a literal <|endoftext|> off as its own token, but training saw it as text: its vocabulary
    spent merges (".<|", "endoftext", "|>") that encoding never used."""
    assert list(tokenizer_mod._cut_long_runs(["a.<|endoftext|>b", "c"])) == ["a.", "b", "c"]
    corpus = "".join(f"Document number {i} says hello.<|endoftext|>" for i in range(300))
    tok = BPETokenizer.train(corpus, vocab_size=320)
    learned = [tok.token_text(i) for i in range(MIN_BPE_VOCAB, tok.vocab_size)]
    assert not [t for t in learned if "<" in t or "|" in t or "ext" in t], learned


def test_a_tokenizer_whose_ids_have_gaps_is_refused_when_read(tmp_path):
    """vocab_size counts the tokens; with ids {0, 1000} it said 2, and id 1000 reached a 2-row embedding."""
    from tokenizers import Tokenizer as LibTokenizer
    from tokenizers import models

    from fungpt.tokenizer import BPETokenizer, HFTokenizer

    LibTokenizer(models.BPE(vocab={"a": 0, "z": 1000}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(FunGPTError, match=r"^could not read the tokenizer files in .*: its 2 token ids are not "
                                          r"numbered 0 to 1 \(they run from 0 to 1,000\)"):
        HFTokenizer.from_dir(tmp_path)
    with pytest.raises(FunGPTError, match="not numbered 0 to 1"):
        BPETokenizer.load(tmp_path / "tokenizer.json")
    LibTokenizer(models.BPE(vocab={"a": 0, "z": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    assert HFTokenizer.from_dir(tmp_path).vocab_size == 2  # (the control)


def test_why_a_download_failed_in_a_few_words():
    from fungpt.errors import why_download_failed

    class ProxyError(ConnectionError):
        pass

    assert why_download_failed(ProxyError("Unable to connect to proxy (Connection refused)")).startswith(
        "could not reach the proxy")
    try:  # the reason in the exception it was raised from (older huggingface_hub: "check your connection" only)
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as cause:
            raise RuntimeError("An error happened while trying to locate the files on the Hub") from cause
    except RuntimeError as e:
        assert why_download_failed(e).startswith("could not reach the server")
    assert why_download_failed(ValueError("bad " * 100)).endswith(" ...") and len(why_download_failed(
        ValueError("bad " * 100))) <= 160
    long_word = why_download_failed(OSError("x" * 300))  # one long word: cut, not dropped
    assert long_word.startswith("OSError: xxx") and long_word.endswith(" ...") and len(long_word) <= 160


def test_why_a_download_failed_reads_implicit_chains_proxy_messages_and_stays_on_one_line():
    from fungpt.errors import why_download_failed

    try:  # raised while handling the network error, without `from`: the reason is in __context__
        try:
            raise OSError("[Errno 111] Connection refused")
        except OSError:
            raise RuntimeError("download failed")  # noqa: B904
    except RuntimeError as e:
        assert why_download_failed(e).startswith("could not reach the server")
    # the proxy named by the message alone (not by an exception type called ProxyError)
    assert why_download_failed(OSError("Unable to connect to proxy")).startswith("could not reach the proxy")
    multi = why_download_failed(OSError("\n" + "y" * 300))  # a line break before one long word: still one line
    assert "\n" not in multi and multi.startswith("OSError: yyy") and len(multi) <= 160


def test_a_saved_gpt2_tokenizer_loads_its_size_without_tiktoken(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # offline, or not installed
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps({"kind": "gpt2"}))  # as the README has it written
    tok = load_tokenizer(tmp_path)
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.first_difference(load_tokenizer(tmp_path)) is None  # the same fixed encoding: nothing loaded
    with pytest.raises(FunGPTError, match="pip install tiktoken"):
        tok.decode([1])  # what needs the encoding asks for it when used
    for bad in ({"vocab_size": "50257"}, {"eot_id": 50257}, {"vocab_size": True}):
        (tmp_path / "tokenizer_meta.json").write_text(json.dumps({"kind": "gpt2", **bad}))
        with pytest.raises(FunGPTError, match="is corrupt \\(bad vocab_size or eot_id\\)"):
            load_tokenizer(tmp_path)
    # padded as nanoGPT pads its model (50304): trained, then sampling drew an id the encoding cannot decode
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps({"kind": "gpt2", "vocab_size": 50304}))
    with pytest.raises(FunGPTError, match="vocab_size 50304, but it has 50,257 tokens: set 50257 there and in "
                                          "meta.json \\(a padded vocabulary is not supported\\)"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("surrogate", ["\udc80", "\ud800"])
def test_a_tokenizer_is_not_learned_from_a_lone_surrogate(surrogate, tmp_path):
    """Text read with errors="surrogateescape" holds lone surrogates, which UTF-8 cannot hold: the char tokenizer
    learned one and then could not be saved, and BPE training raised the library's UnicodeEncodeError."""
    text = f"ab{surrogate}c hello world " * 20
    for learn in (CharTokenizer.train, lambda t: BPETokenizer.train(t, vocab_size=270)):
        with pytest.raises(FunGPTError, match=f"holds U\\+{ord(surrogate):04X}, a lone surrogate, which UTF-8 "
                                              f"cannot hold"):
            learn(text)


def test_a_lone_surrogate_is_refused_whatever_the_library_does_with_it(bpe):
    """tokenizers 0.20 (the declared floor) encoded a byte that was not UTF-8 ('caf\udce9', from a Latin-1 terminal)
    silently as three U+FFFD tokens; later versions raise. FunGPT checks the text itself."""

    class Lenient:  # as tokenizers 0.20 answers: ids for anything
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):  # (the rest as the library's: its vocabulary, for the message)
            return getattr(self.real, name)

        def encode(self, text, add_special_tokens=False):
            return self.real.encode(text.encode("utf-8", "replace").decode("utf-8"), add_special_tokens=False)

        def encode_batch_fast(self, texts, add_special_tokens=False):
            return [self.encode(t) for t in texts]

    lenient = copy.copy(bpe)
    lenient._tok = Lenient(bpe._tok)
    assert lenient.encode("cafe") == bpe.encode("cafe")
    for call in (lenient.encode, lambda t: lenient.encode_batch(["fine", t])):
        with pytest.raises(FunGPTError, match=r"byte 0xe9, which is not UTF-8"):
            call("caf\udce9")
        with pytest.raises(FunGPTError, match=r"it holds U\+D800, a lone surrogate, which UTF-8 cannot hold$"):
            call("a\ud800")  # (not "use a tokenizer that covers it": none can)


def test_a_model_folders_tokenizer_that_would_drop_a_character_refuses_it(tmp_path, bpe):
    """The library drops a character its vocabulary lacks, without a word, where the model has no unknown token
    and no byte fallback: a fine-tune's data lost its 'z's and newlines and a prompt was not the text typed."""
    import json

    from fungpt.tokenizer import HFTokenizer

    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "c": 2, "\u0120": 3, "<|endoftext|>": 4}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = HFTokenizer.from_dir(tmp_path)
    assert tok.encode("abc ab") == [0, 1, 2, 3, 0, 1] and tok.encode_batch(["ab", " c"]) == [[0, 1], [3, 2]]
    for text, bad in (("abz", "z"), ("ab\nc", "\n"), ("cab\u00e9a", "\u00e9")):
        for call in (tok.encode, lambda t: tok.encode_batch(["ab", t])):
            with pytest.raises(FunGPTError, match=f"character {re.escape(repr(bad))} is not in its vocabulary"):
                call(text)
    assert not bpe._may_drop  # (all 256 bytes: nothing to check, nothing spent)
    # SentencePiece's Metaspace gives its word-start token "▁" for a character it drops: not empty, still dropped
    from tokenizers import Tokenizer as HFLib
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    lib = HFLib(models.BPE())
    lib.pre_tokenizer, lib.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    lib.normalizer = normalizers.NFKC()
    lib.train_from_iterator(["le orro le orro la fi"], trainers.BpeTrainer(vocab_size=40))
    spm = HFTokenizer(lib)
    assert spm._may_drop and spm.decode(spm.encode("le orro \ufb01")) == "le orro fi"  # (NFKC: "ﬁ" is "fi")
    with pytest.raises(FunGPTError, match="character 'Z' is not in its vocabulary"):
        spm.encode("le Zorro")
    # a decoder that joins its pieces with spaces (the library's default) decodes "⑴" (NFKC: "(1)") as "( 1 )":
    # kept, not refused
    plain = HFLib(models.BPE())
    plain.pre_tokenizer, plain.normalizer = pre_tokenizers.Whitespace(), normalizers.NFKC()
    plain.train_from_iterator(["( 1 ) a"], trainers.BpeTrainer(vocab_size=30))
    joined = HFTokenizer(plain)
    assert joined._may_drop and joined.encode("\u2474") == joined.encode("(1)") and len(joined.encode("(1)")) == 3
    with pytest.raises(FunGPTError, match="character 'z' is not in its vocabulary"):
        joined.encode("(z)")


def test_a_byte_that_was_not_utf8_is_named_as_such(bpe):
    """`--prompt $'caf\xe9'` from a Latin-1 terminal reaches Python as 'caf\udce9' (PEP 383): not a character a
    vocabulary lacks, but a byte that is not UTF-8."""
    for tok in (CharTokenizer.train("cafe"), bpe):
        with pytest.raises(FunGPTError, match=r"byte 0xe9, which is not UTF-8 .*; set the terminal to UTF-8 \(fungpt "
                                          r"sample can also read the text from a UTF-8 file: --prompt-file\)$"):
            tok.encode("caf\udce9")
    for byte in (0x80, 0xFF):  # the ends of the escaped range, U+DC80..U+DCFF
        with pytest.raises(FunGPTError, match=f"byte 0x{byte:02x}, which is not UTF-8"):
            CharTokenizer.train("cafe").encode((b"caf" + bytes([byte])).decode("utf-8", "surrogateescape"))


def byte_fallback_tokenizer(swap: tuple[str, str] | None = None):
    """A tiny Llama-style tokenizer (not byte-level): Metaspace-like spaces and <0xNN> byte-fallback tokens."""
    from tokenizers import Tokenizer as HFLibTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for piece in ["▁", "h", "i", "a", "b", "▁h", "▁hi", "▁a", "▁b"]:
        vocab.setdefault(piece, len(vocab))
    if swap:
        vocab[swap[0]], vocab[swap[1]] = vocab[swap[1]], vocab[swap[0]]
    tok = HFLibTokenizer(models.BPE(vocab, [("▁", "h"), ("▁h", "i"), ("▁", "a"), ("▁", "b")], byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tokenizer_mod.HFTokenizer(tok)


def test_a_byte_fallback_tokenizer_streams_whole_characters_and_is_told_apart():
    """A character split into byte-fallback tokens (<0xC3><0xA9>) streamed as U+FFFD, its start let out early; and two
    such tokenizers whose ids differed ("▁a" and "a" swapped: both read "a" alone) were taken for the same one, so a
    resume or an eval read ids as other text."""
    tok = byte_fallback_tokenizer()
    assert not tok.joins_decodings
    for text in ("hi é a", "a 😀 b", "a\ufffdb"):
        ids = tok.encode(text)
        stream = TextStream(tok)
        assert "".join(stream.add(i) for i in ids) + stream.flush() == tok.decode(ids) == text
    assert tok.token_text(0xC3) == "\\xc3"  # (its byte, as byte-level tokens show theirs)
    assert tok.first_difference(byte_fallback_tokenizer()) is None
    swapped = byte_fallback_tokenizer(swap=("▁a", "a"))
    assert tok.first_difference(swapped) == min(tok._tok.token_to_id("a"), tok._tok.token_to_id("▁a"))


def test_a_tokenizer_save_that_fails_names_its_folder(tmp_path, monkeypatch):
    """A full disk or a size limit fails a write or fsync with an OSError that names no file: the command said only
    "error: File too large", or blamed its own output."""
    import errno

    tok = CharTokenizer.train("hello")

    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(type(tok), "_save_files", full)
    with pytest.raises(OSError) as err:
        tok.save(tmp_path / "run")
    assert err.value.filename == str(tmp_path / "run") and err.value.errno == errno.EFBIG
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # nothing half-written
