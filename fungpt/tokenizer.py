"""Tokenizers: turning text into integer ids and back.

A language model never sees characters, only integers ("token ids") in
`range(vocab_size)`. This module offers three ways to make them, all behind one
small interface (`Tokenizer`):

* ``char``  - one id per distinct character of the training corpus. Tiny vocabulary
  (65 for Tiny Shakespeare), long sequences, and it cannot encode a character it
  has never seen. The classic starting point.
* ``bpe``   - byte-level Byte Pair Encoding trained on *your* corpus with the Hugging
  Face ``tokenizers`` library. It starts from the 256 possible bytes and repeatedly
  merges the most frequent neighbouring pair into a new token. Because every
  string is a sequence of UTF-8 bytes, it can encode *anything* (emoji, CJK, ...)
  and decode it back exactly.
* ``gpt2``  - the exact 50,257-token encoding GPT-2 was trained with, through
  OpenAI's ``tiktoken``. Needed to load GPT-2 weights; its files are downloaded
  once and cached by tiktoken.
* ``hf``    - the tokenizer that ships with a pretrained Hugging Face model folder
  (``tokenizer.json``, or GPT-2's older ``vocab.json`` + ``merges.txt``), loaded with
  the ``tokenizers`` library. It is never trained here: fine-tuning a pretrained
  model must use the exact encoding the model learned (see pretrained.py).

Every tokenizer can `save(dir)` itself and `load_tokenizer(dir)` reads back
whichever kind was saved. The layout on disk is

    dir/tokenizer_meta.json   {"kind": "char" | "bpe" | "gpt2" | "hf", ...}
    dir/tokenizer.json        (bpe and hf: the Hugging Face tokenizer file)

For char, the vocabulary (list of characters) lives inside tokenizer_meta.json.

The text ``<|endoftext|>`` is special for bpe and gpt2: it encodes to the single
end-of-text id (`eot_id`) that separates documents, and decodes back to the same
text, so every string still round-trips exactly.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import json
import operator
import os
import re
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from fungpt.errors import FunGPTError, check_number, read_json, utf8_path, utf8_text, why_download_failed

EOT_TEXT = "<|endoftext|>"
META_FILE = "tokenizer_meta.json"
TOKENIZER_TEMP = r"\.tokenizer\.tmp-[a-z0-9_]{8}"  # the folder a save writes into first (mkdtemp's name), as a regex
BPE_FILE = "tokenizer.json"
KINDS = ("char", "bpe", "gpt2")  # kinds that `train_tokenizer` / `fungpt prepare --tokenizer` can make
HF_KIND = "hf"  # loaded from a pretrained model's files, never trained (see HFTokenizer)

# A byte-level BPE vocabulary always contains the 256 single bytes plus <|endoftext|>.
MIN_BPE_VOCAB = 257
DEFAULT_BPE_VOCAB = 4096
# BPE training cuts "words" (GPT-2's pre-tokens: runs of letters, of digits, or of other non-space characters)
# longer than this into pieces of their own (DNA, long numbers, a line of dashes): the trainer's time grows
# with the square of a word's length, and 300 KB of ACGT without a space took 21.6 s to learn 500 tokens,
# against 0.2 s cut (encoding the text: 88,678 tokens against 88,500). Text whose words are short, such as
# URLs or Chinese (cut at its punctuation), is left as it is.
BPE_MAX_WORD_CHARS = 256
# Long runs of letters and numbers (Python's \w without "_"), of other non-space characters, or of spaces (the
# library keeps a run of them one piece too: 80,000 spaces became one token). Python's \s also holds
# U+001C..U+001F, which the library's does not: they are among the other characters (as "_" is), else a run of
# them escaped the cut
_LONG_RUN = re.compile("|".join(f"(?:{cls}){{{BPE_MAX_WORD_CHARS + 1},}}"
                                for cls in (r"[^\W_]", r"[^\s\w]|[_\x1c-\x1f]", r"[^\S\x1c-\x1f]")))


def _long_words(text: str) -> Iterable[tuple[int, int]]:
    r"""(start, end) of each word of `text` longer than BPE_MAX_WORD_CHARS, split as GPT-2's pre-tokenizer splits:
    letters (str.isalpha: Unicode's L), numbers (the rest of str.isalnum: Unicode's N, "1", "½", "Ⅻ"), spaces and
    the other characters apart. (Python's \d holds only decimal digits: "1½" * 40000, one number of 80,000
    characters for the library, escaped the cut as alternating digits and letters.)"""
    for m in _LONG_RUN.finditer(text):
        start = m.start()
        for _, group in itertools.groupby(m[0], key=str.isalpha):  # (other characters: one group)
            end = start + sum(1 for _ in group)
            if end - start > BPE_MAX_WORD_CHARS:
                yield start, end
            start = end


def _cut_long_runs(chunks: Iterable[str]) -> Iterable[str]:
    """The chunks as BPE training should see them: cut at every <|endoftext|>, dropped (encoding splits it off as a
    token of its own, so merges learned across it, ".<|" or "endoftext", were never used), and with every word
    longer than BPE_MAX_WORD_CHARS yielded in pieces of that length, each a chunk of its own (no merge crosses
    chunks)."""
    for chunk in chunks:
        for text in chunk.split(EOT_TEXT):
            start = 0
            for a, b in _long_words(text):
                yield text[start:a]
                yield from (text[i:min(i + BPE_MAX_WORD_CHARS, b)] for i in range(a, b, BPE_MAX_WORD_CHARS))
                start = b
            yield text[start:]

# tiktoken downloads GPT-2's files with `requests` and no timeout, which can hang
# forever on a network that silently drops packets. We wait at most this long.
GPT2_LOAD_TIMEOUT_S = 60.0


def _lines_of(paths: Iterable[Path]) -> Iterable[str]:
    """The lines of UTF-8 text files, one file after another (one line at a time: a corpus larger than memory)."""
    for path in paths:
        try:
            with open(path, encoding="utf-8", newline="") as f:  # (line endings kept as they are in the file)
                yield from f
        except (OSError, UnicodeDecodeError) as e:
            raise FunGPTError(f"could not read {path} to train the tokenizer: {e}") from None


_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate (see not_utf8)
_FALLBACK = re.compile(r"<0x[0-9A-F]{2}>")  # a byte-fallback token's piece (BPETokenizer.fallback_byte)


def not_utf8(ch: str) -> str | None:
    """What to say of a character that stands for a byte that was not UTF-8, or None for any other.

    Python turns such bytes in command-line arguments into lone surrogates U+DC80..U+DCFF (PEP 383): a prompt
    typed in a terminal set to Latin-1, say. No tokenizer trained on text read as UTF-8 (every one that prepare
    makes) can encode them, whatever its vocabulary."""
    if "\udc80" <= ch <= "\udcff":
        return (f"the text holds byte 0x{ord(ch) - 0xDC00:02x}, which is not UTF-8 (from a terminal not set to "
                f"UTF-8?); set the terminal to UTF-8 (fungpt sample can also read the text from a UTF-8 file: "
                f"--prompt-file)")
    return None


def _check_characters(chars: Iterable[str]) -> None:
    """Refuse text that holds a lone surrogate (U+D800..U+DFFF, see not_utf8): UTF-8 cannot hold one, so a tokenizer
    that learned it could never be saved."""
    for ch in chars:
        if "\ud800" <= ch <= "\udfff":
            raise FunGPTError(f"cannot learn a tokenizer from text that holds U+{ord(ch):04X}, a lone surrogate, "
                              f"which UTF-8 cannot hold (a byte that was not UTF-8, read with errors="
                              f"'surrogateescape'?); read the text with errors='replace', or mend its bytes")


def write_hf_json(tok, path: Path) -> None:
    """Write a `tokenizers` Tokenizer's JSON file, as its own save() writes it, but through Python: a full disk is
    then an OSError with its reason, which every writer explains (save() raises a plain Exception)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:  # (as save() writes it on Windows too: no \r\n)
        f.write(tok.to_str(pretty=True))


class Tokenizer:
    """The interface every tokenizer implements.

    Subclasses set `name` and implement `encode`, `decode`, `vocab_size` and
    `_save_files`. `encode_batch` and `encode_array` have simple default versions
    that subclasses override when they can do it faster.
    """

    name: str = "base"
    # Whether decoding ids in runs (each ending on a whole character) and joining the texts gives the decoding of
    # all of them: true of characters, and of byte-level BPE (each token's bytes, concatenated); see TextStream
    joins_decodings: bool = True

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids: every id is in range(vocab_size)."""
        raise NotImplementedError

    @property
    def eot_id(self) -> int | None:
        """Id of the end-of-text token that separates documents (None if there is none)."""
        return None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def _id_list(self, ids: Iterable[int]) -> list[int]:
        """ids (a list, or a 1-D tensor or array) as a list of ints in range(vocab_size); else one clear error."""
        shape = getattr(ids, "shape", None)
        if shape is not None and len(shape) != 1:  # e.g. generate's (1, T) output, or one id as a 0-d tensor
            fix = "for one id pass [id]" if len(shape) == 0 else "for the first row of a batch pass ids[0]"
            raise FunGPTError(f"cannot decode ids of shape {tuple(shape)}: decode takes one sequence of ids; {fix}")
        try:  # operator.index: an integer of any kind (numpy's, a 0-d tensor's), never a float
            ids = [operator.index(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        except TypeError:
            ids = None
        if ids is None or (ids and not 0 <= min(ids) <= max(ids) < self.vocab_size):
            raise FunGPTError(f"cannot decode: ids must be integers in range({self.vocab_size}) for this tokenizer")
        return ids

    def definition(self) -> str | None:
        """The whole tokenizer as text, where a library defines it in full (None: its ids and their bytes say all)."""
        return None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level BPE token can be part of a UTF-8 character)."""
        return self.decode([token_id]).encode("utf-8")

    def token_text(self, token_id: int) -> str:
        """One token as text, for showing tokens one by one.

        Usually the same as decode([token_id]). But a byte-level BPE token may hold only part of
        a multi-byte character ("é" is the two bytes C3 A9, which can be two tokens); decoded
        alone it would become the replacement character '\ufffd'. Here its bytes stay visible,
        as escapes: '\\xc3'. Joining the token_texts of a text is then not always the text.
        """
        (token_id,) = self._id_list([token_id])  # (one clear error for an id out of range, not the library's)
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many strings at once (subclasses use the library's parallel version)."""
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """Encode to a 1-D numpy integer array (what the data preparation writes to disk)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer into `directory` so that `load_tokenizer` can read it back.

        The files are written into a temporary folder first and then renamed into place, the meta file
        last: a full disk or a crash never leaves a truncated tokenizer where a good one was.
        """
        import shutil
        import tempfile

        from fungpt.checkpoint import fsync_dir, remove_stale_temps_named, sync_folder

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temps_named(directory, TOKENIZER_TEMP, holding=(META_FILE, BPE_FILE))  # (a killed save's)
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=directory))
        try:
            meta = {"kind": self.name, **self._save_files(tmp)}
            with open(tmp / META_FILE, "w", encoding="utf-8", newline="\n") as f:  # (LF on Windows too)
                json.dump(meta, f, ensure_ascii=False, indent=1)
                f.write("\n")
            sync_folder(tmp)  # (on disk before they take their names)
            for path in sorted(tmp.iterdir(), key=lambda p: p.name == META_FILE):  # the meta file last
                os.replace(path, directory / path.name)
            fsync_dir(directory)
        except OSError as e:
            if e.filename is None:  # (a write or fsync that failed names no file: a full disk, a size limit)
                e.filename = str(directory)
            raise
        except Exception as e:  # the tokenizers library reports its write errors as plain Exceptions
            raise FunGPTError(f"could not write the tokenizer into {directory}: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _save_files(self, directory: Path) -> dict:
        """Write kind-specific files; return extra fields for tokenizer_meta.json."""
        return {}

    def describe(self) -> str:
        """One phrase naming this tokenizer, for messages: e.g. "char tokenizer (65 tokens)"."""
        return f"{self.name} tokenizer ({self.vocab_size:,} tokens)"

    def first_difference(self, other: Tokenizer) -> int | None:
        """The first token id that stands for other bytes in `other` than here (0 when the sizes differ),
        or None when every id means the same in both: token files written by one can be read by the other.

        Compared by what every id stands for, not by file contents: two character sets can both have 65
        symbols, and a newer `tokenizers` release may write the same tokenizer differently.
        """
        if self.vocab_size != other.vocab_size:
            return 0
        return next((i for i in range(self.vocab_size) if self.token_bytes(i) != other.token_bytes(i)), None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------
# Character level
# ---------------------------------------------------------------------------


def decode_after(tokenizer: Tokenizer, context: Sequence[int], ids: Sequence[int]) -> str:
    """The text of `ids` as it reads after the ids `context`: tokenizer.decode(ids) where decodings join (char,
    byte-level BPE), else what decoding them after the context adds (Metaspace drops a text's first space, so that
    "ROMEO:" then "▁good" decoded apart read "ROMEO:good")."""
    if tokenizer.joins_decodings or not context:
        return tokenizer.decode(ids)
    return tokenizer.decode([*context, *ids])[len(tokenizer.decode(context)):]


class TextStream:
    """Turns generated token ids, one at a time, into text pieces that join into tokenizer.decode(all ids).

    add(id) returns the text that token completes. With a byte-level BPE a character can span several
    tokens: a token that ends inside one decodes to U+FFFD, so it completes nothing (its piece is "") and
    the token that ends the character gets the whole character. Only the ids since the last complete
    piece are decoded each time, so a long stream costs the same per token as a short one (decoding
    everything so far at every token grows with the square of the length). UTF-8 resynchronises at a
    character boundary, which is why decoding in such runs gives the same text as decoding it all.
    flush() returns what the last ids decode to (U+FFFD for bytes of a character that never ended).
    A tokenizer whose decodings do not join (Tokenizer.joins_decodings: a decoder that looks at the tokens
    before, as Metaspace's spaces or WordPiece's ## do) has the new ids decoded after the last CONTEXT ids given
    out, less what those decode to alone: a bounded cost per token too (decoding all ids so far took 0.43 ms per
    token after 8,000 tokens).
    """

    CONTEXT = 16  # ids of context for a decoder that looks back (its rules look a token or two back)

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        """context: the ids before the first one added, a prompt written out already (for a decoder that looks back:
        Metaspace starts a text without its first space, so "ROMEO:" + "▁good" read "ROMEO:good")."""
        self.tokenizer, self.pending = tokenizer, []
        # (decodings that do not join: the last ids given out, for their context)
        self.context: list[int] = [] if tokenizer.joins_decodings else list(context)[-self.CONTEXT:]

    def add(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = decode_after(self.tokenizer, self.context, self.pending)
        if text.endswith("\ufffd") and not self._ends_a_character(token_id):
            return ""  # the character is not complete yet
        self.context = (self.context + self.pending)[-self.CONTEXT:] if not self.tokenizer.joins_decodings else []
        self.pending = []
        return text

    def _ends_a_character(self, token_id: int) -> bool:
        """Whether the U+FFFD that the pending ids decode to at their end is a whole character: a real one in the
        text (bytes EF BF BD, which byte-level BPE may split over tokens too), or the stand-in for bytes that are
        not UTF-8 and will never be (a stray C3 before a space). The start of an unfinished character is not."""
        if not self.tokenizer.joins_decodings:  # (then the tokens' bytes are not the text's)
            # byte-fallback tokens (<0xC3>, Llama's and Mistral's): their bytes, at the end of the pending ids, tell;
            # any other token's U+FFFD is whole (it decoded to one alone)
            byte_of = getattr(self.tokenizer, "fallback_byte", lambda i: None)
            tail = list(itertools.takewhile(lambda b: b is not None, map(byte_of, reversed(self.pending))))
            if not tail:
                return self.tokenizer.token_text(token_id) == "\ufffd"
            pieces = [bytes(reversed(tail))]
        else:
            pieces = list(map(self.tokenizer.token_bytes, self.pending))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(b"".join(pieces))
        return not decoder.getstate()[0]  # (the bytes it holds back: the start of a character still to come)

    def flush(self) -> str:
        text = ""
        if self.pending:
            before = self.tokenizer.decode(self.context) if self.context else ""
            text = self.tokenizer.decode(self.context + self.pending)[len(before):]
        self.pending, self.context = [], []
        return text


class CharTokenizer(Tokenizer):
    """One token per character; the vocabulary is the sorted set of the characters of the text it is trained on
    (`prepare`: the whole corpus, val split included, so that every character of the data has an id)."""

    name = "char"

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if not chars:
            raise FunGPTError("a char tokenizer needs at least one character; the training text is empty")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise FunGPTError("a char vocabulary must be a list of distinct single characters")
        _check_characters(chars)
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        # Lookup table from every Unicode code point (0..0x10FFFF) to its id, -1 for
        # characters outside the vocabulary. 4.4 MB, and it lets us encode a whole
        # string with a single numpy indexing operation instead of a Python loop.
        self._table = np.full(0x110000, -1, dtype=np.int32)
        self._table[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.int32)

    @classmethod
    def train(cls, corpus: str | Iterable[str]) -> CharTokenizer:
        """Build the vocabulary from a string, or from an iterable of text chunks."""
        if isinstance(corpus, str):
            corpus = [corpus]
        seen: set[str] = set()
        for chunk in corpus:
            seen.update(chunk)
        return cls(sorted(seen))

    from_text = train  # alias: CharTokenizer.from_text("hello")

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_array(self, text: str, offset: int = 0) -> np.ndarray:
        """Ids of `text` as an array. `offset`: where `text` starts in a longer text read in pieces (for the
        position an error names)."""
        # UTF-32 stores every character as exactly one 4-byte number (its code point),
        # so np.frombuffer gives us all code points at C speed, index for index
        # the same as Python's text[i]. The table maps code points to ids.
        # ("surrogatepass" lets lone surrogates through, to be reported as unknown.)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = self._table[codes]
        if ids.size and ids.min() < 0:
            pos = int(np.argmax(ids < 0))
            ch = text[pos]
            # (a combining mark printed bare lands on the quote before it; the same letter in another Unicode form,
            # e.g. e + U+0308 typed on macOS for the corpus's precomposed ë, encodes once normalised)
            fix = ("the text has line endings in \\r (Windows: \\r\\n): convert them to \\n first (e.g. dos2unix)"
                   if ch == "\r" else not_utf8(ch)
                   or ("the text's letters are in another Unicode form than the training text's: normalise it to "
                       "NFC (unicodedata.normalize('NFC', text))" if self._encodes_once_normalised(text) else "")
                   or "remove it from the text (a char model knows only the characters it was trained on), or train "
                      "with a bpe tokenizer")
            name = unicodedata.name(ch, "")  # ("" for a character without one: a control, a lone surrogate)
            raise FunGPTError(
                f"character {ch!r} (U+{ord(ch):04X}{' ' + name if name else ''}) at position {offset + pos:,} "
                f"(counting from 0) is not in this char-level vocabulary ({self.vocab_size} characters seen in "
                f"training); {fix}"
            )
        return ids

    def _encodes_once_normalised(self, text: str) -> bool:
        """Whether `text`, which holds characters this vocabulary lacks, encodes in NFC (composed) form."""
        nfc = unicodedata.normalize("NFC", text)
        codes = np.frombuffer(nfc.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        return nfc != text and bool((self._table[codes] >= 0).all())

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        return "".join([self.chars[i] for i in self._id_list(ids)])

    def _save_files(self, directory: Path) -> dict:
        return {"chars": self.chars}


# ---------------------------------------------------------------------------
# Byte-level BPE (Hugging Face tokenizers)
# ---------------------------------------------------------------------------


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained on your corpus (GPT-2's recipe, your own merges).

    Id 0 is <|endoftext|> (GPT-2 puts it last, at 50256; the position does not matter).
    """

    name = "bpe"

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self._eot = hf_tokenizer.token_to_id(EOT_TEXT)
        # Ids must be 0 .. vocab_size - 1: the model has one embedding row per id, and a file edited by hand (or
        # another library's) could leave gaps, so that an id past vocab_size would reach the model
        ids = set(hf_tokenizer.get_vocab(with_added_tokens=True).values())
        if ids and (min(ids) != 0 or max(ids) != len(ids) - 1):
            raise FunGPTError(f"its {len(ids):,} token ids are not numbered 0 to {len(ids) - 1:,} (they run from "
                              f"{min(ids):,} to {max(ids):,}): FunGPT needs a vocabulary without gaps")
        # A model folder's tokenizer.json may decode otherwise: SentencePiece's Metaspace or WordPiece's decoder
        # read the spaces off each token's place in the text, so runs decoded apart would lose them
        self.joins_decodings = type(hf_tokenizer.decoder).__name__ == "ByteLevel"
        self._kept: set[str] = set()  # characters seen to come back from an encode and decode (see _check_kept)

    @functools.cached_property
    def _may_drop(self) -> bool:
        """Whether this tokenizer may encode a character as nothing at all: the library drops a character that its
        vocabulary lacks, without a word, unless the model has an unknown token or byte fallback (Llama's), or is
        byte-level with all 256 bytes (FunGPT's BPE, GPT-2's). A model folder's tokenizer can lack some."""
        model = json.loads(self._tok.to_str()).get("model") or {}
        if model.get("unk_token") is not None or model.get("unk_id") is not None or model.get("byte_fallback"):
            return False
        if self.joins_decodings:
            vocab = self._tok.get_vocab(with_added_tokens=False)
            return not all(ch in vocab for ch in _byte_level_alphabet())
        return True

    def _check_kept(self, text: str) -> None:
        """Refuse text holding a character this tokenizer would drop (see _may_drop): a fine-tune's data would lose
        it without a word, and a prompt would not be the text typed. Each distinct character is tried once, encoded
        alone and decoded again: dropped, it is not in what comes back (SentencePiece's Metaspace still gives its
        word-start token "▁" for it), after the tokenizer's own normalisation (lowercase, NFKC: "ﬁ" comes back "fi"),
        spaces aside (a decoder may join its pieces with them).
        A space may encode as nothing where the pre-tokenizer splits on it (BERT's), not in a byte-level one."""
        normalizer = self._tok.normalizer
        for ch in dict.fromkeys(text):  # (its distinct characters in order: the first one dropped is named)
            if ch in self._kept:
                continue
            if ch.isspace() and not self.joins_decodings:
                self._kept.add(ch)
                continue
            ids = self._tok.encode(ch, add_special_tokens=False).ids
            # (without spaces: a decoder may join its pieces with them, "ﬁ" as "f i")
            expected = "".join((normalizer.normalize_str(ch) if normalizer is not None else ch).split())
            if not ids or expected not in "".join(self._tok.decode(ids, skip_special_tokens=False).split()):
                raise self._cannot_encode(ch)
            self._kept.add(ch)

    def definition(self) -> str:
        """tokenizer.json's text as the tokenizers library writes it: the model, and the normalizer, pre-tokenizer and
        post-processor, whose rules need not show in a few encodings."""
        return self._tok.to_str()

    @staticmethod
    def _new_hf_tokenizer():
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        tok = HFTokenizer(models.BPE())
        # Split text like GPT-2 does (words, numbers, punctuation, whitespace runs) and
        # map every byte to a printable stand-in character, so merges work on bytes.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    @classmethod
    def train(
        cls,
        corpus: str | Iterable[str] | list[Path],
        vocab_size: int = DEFAULT_BPE_VOCAB,
        progress: bool = False,
    ) -> BPETokenizer:
        """Learn merges from text.

        `corpus` is a string, any iterable of text chunks, or a list of `Path`s to
        read. Merges never cross a chunk boundary, so cut chunks at whitespace.
        """
        from tokenizers import pre_tokenizers, trainers

        check_bpe_vocab_size(vocab_size)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TEXT],
            # Start with all 256 bytes, even ones absent from the corpus, so that
            # any string at all can be encoded later.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        tok = cls._new_hf_tokenizer()
        if isinstance(corpus, (str, Path)):
            corpus = [corpus]
        if isinstance(corpus, (list, tuple)) and corpus and all(isinstance(c, Path) for c in corpus):
            corpus = _lines_of(corpus)  # files: read line by line, as the library reads them, and cut the same way
        chunks = _cut_long_runs(corpus)  # strings / chunks of text
        try:
            interruptible(lambda: tok.train_from_iterator(chunks, trainer=trainer))
        except UnicodeEncodeError as e:  # (a lone surrogate, which the library cannot take as text)
            _check_characters(e.object[e.start:e.end])
            raise
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:  # (read here, not by the library: it opens UTF-8 paths only, and a folder's name may not be UTF-8)
            return cls(HFTokenizer.from_str(Path(path).read_text(encoding="utf-8")))
        except Exception as e:  # the library raises plain Exceptions for bad files
            why = e.strerror if isinstance(e, OSError) and e.strerror else e  # (an OSError names the path again)
            raise FunGPTError(f"could not read the BPE tokenizer file {path}: {why}; {_RESTORE}") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        return self._eot

    def encode(self, text: str) -> list[int]:
        self._refuse_surrogates(text)
        try:
            # (add_special_tokens=False: a model folder's post-processor may add a BOS to every piece of text it is
            # given, which mid-corpus, at every chunk prepare encodes, is an <|endoftext|> that is not in the text)
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # the library raises plain Exceptions (a WordLevel vocabulary without [UNK])
            raise self._encode_error(text, e) from None
        if self._may_drop:
            self._check_kept(text)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        for text in texts:
            self._refuse_surrogates(text)
        # Runs in parallel on all cores (Rust threads); the "fast" variant skips
        # computing character offsets, which we do not need.
        try:
            ids = [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]
        except Exception as e:
            raise self._encode_error("".join(texts), e) from None
        if self._may_drop:
            for text in texts:
                self._check_kept(text)
        return ids

    def _refuse_surrogates(self, text: str) -> None:
        """Refuse a lone surrogate (U+D800..U+DFFF: what Python makes of bytes that were not UTF-8, PEP 383), which no
        byte-level tokenizer can encode: tokenizers 0.20 encoded it silently as U+FFFD, later versions raise."""
        if not text.isascii() and (found := _SURROGATE.search(text)):
            raise self._cannot_encode(found.group())

    def _encode_error(self, text: str, error: Exception) -> FunGPTError:
        """The error for text this tokenizer cannot encode, naming the first character it cannot take alone."""

        def fails(ch: str) -> bool:
            try:
                self._tok.encode(ch, add_special_tokens=False)
                return False
            except Exception:
                return True

        bad = next((ch for ch in dict.fromkeys(text) if fails(ch)), None)  # unique characters, in order
        return self._cannot_encode(bad, error)

    def _cannot_encode(self, bad: str | None, error: Exception | None = None) -> FunGPTError:
        """The error for a character this tokenizer cannot encode (None: not found; then the library's `error`),
        naming the tokenizer (a fine-tune's is its pretrained model's, not one the user chose)."""
        if bad is not None and "\ud800" <= bad <= "\udfff":  # (no tokenizer could cover it: UTF-8 cannot hold it)
            why = not_utf8(bad) or f"it holds U+{ord(bad):04X}, a lone surrogate, which UTF-8 cannot hold"
            return FunGPTError(f"the {self.describe()} cannot encode the text: {why}")
        what = f"character {bad!r} is not in its vocabulary" if bad is not None else str(error)
        # (a model folder's tokenizer comes with its weights: a fine-tune cannot pick another, so not "use another")
        return FunGPTError(f"the {self.describe()} cannot encode the text: {what}; remove it from the text (this "
                           f"tokenizer belongs to its model's weights), or start from a model whose tokenizer "
                           f"covers it")

    def decode(self, ids: Iterable[int]) -> str:
        # skip_special_tokens=False keeps <|endoftext|> so decode(encode(s)) == s.
        ids = self._id_list(ids)  # (the library drops or overflows on ids out of range)
        return self._tok.decode(ids, skip_special_tokens=False)

    def fallback_byte(self, token_id: int) -> int | None:
        """The byte a byte-fallback token stands for (<0xC3>: 0xC3, in tokenizers that are not byte-level, such as
        Llama's), or None for any other token."""
        piece = self._tok.id_to_token(token_id) or ""
        return int(piece[3:5], 16) if _FALLBACK.fullmatch(piece) else None  # ("<0xC3>"[3:5] is "C3")

    def first_difference(self, other: Tokenizer) -> int | None:
        """As Tokenizer.first_difference; where either is not byte-level, by the tokens' pieces and the decoder:
        decoded one by one such tokens lose what tells them apart ("▁a" and "a" both read "a")."""
        if not isinstance(other, BPETokenizer) or (self.joins_decodings and other.joins_decodings):
            return super().first_difference(other)
        if self.vocab_size != other.vocab_size or json.loads(self._tok.to_str()).get("decoder") != json.loads(
                other._tok.to_str()).get("decoder"):
            return 0
        return next((i for i in range(self.vocab_size) if self._tok.id_to_token(i) != other._tok.id_to_token(i)),
                    None)

    def token_bytes(self, token_id: int) -> bytes:
        (token_id,) = self._id_list([token_id])  # (one clear error: -1 overflowed in the library)
        piece = self._tok.id_to_token(token_id)  # the token in byte-level stand-in characters
        if piece is None:
            raise FunGPTError(f"cannot decode: token id {token_id} is not in range({self.vocab_size})")
        if not self.joins_decodings:  # not byte-level (a char run's export: one character per token): 'é' is é
            if (byte := self.fallback_byte(token_id)) is not None:
                return bytes([byte])  # (shown as \xc3 by token_text, not as U+FFFD)
            return self.decode([token_id]).encode("utf-8")
        alphabet = _byte_level_alphabet()
        if all(ch in alphabet for ch in piece):
            return bytes(alphabet[ch] for ch in piece)
        return piece.encode("utf-8")  # an added token written with characters outside the byte alphabet

    def _save_files(self, directory: Path) -> dict:
        write_hf_json(self._tok, directory / BPE_FILE)
        return {"file": BPE_FILE}


class HFTokenizer(BPETokenizer):
    """The tokenizer of a pretrained Hugging Face model folder, loaded with the `tokenizers` library.

    Two on-disk formats exist: `tokenizer.json` (one file with everything, what recent
    models ship) and GPT-2's original pair `vocab.json` (token -> id) + `merges.txt` (the
    merge rules, in the order they were learned). Both describe the same byte-level BPE.
    `source` records where it came from, for messages ("hf tokenizer from models/gpt2").
    """

    name = HF_KIND

    def __init__(self, hf_tokenizer, source: str = ""):
        super().__init__(hf_tokenizer)
        self.source = source

    @classmethod
    def from_dir(cls, directory: str | Path) -> HFTokenizer:
        """Read tokenizer.json, or else vocab.json + merges.txt, from a Hugging Face model folder."""
        from tokenizers import Tokenizer as HFLibTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        directory = Path(directory)
        vocab, merges = directory / "vocab.json", directory / "merges.txt"
        if (not (directory / BPE_FILE).is_file() and vocab.is_file() and merges.is_file()
                and utf8_path(directory) is None):
            raise FunGPTError(f"the name of {directory} is not UTF-8, and the tokenizers library opens "
                              f"vocab.json and merges.txt by name: rename the folder")
        try:
            if (directory / BPE_FILE).is_file():  # (read here: the library opens UTF-8 paths only)
                return cls(HFLibTokenizer.from_str((directory / BPE_FILE).read_text(encoding="utf-8")),
                           source=str(directory))
            if vocab.is_file() and merges.is_file():
                tok = HFLibTokenizer(models.BPE.from_file(str(vocab), str(merges)))
                # GPT-2's recipe: split like GPT-2, work on bytes mapped to printable characters.
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tok.decoder = decoders.ByteLevel()
                if tok.token_to_id(EOT_TEXT) is not None:
                    tok.add_special_tokens([EOT_TEXT])  # encode "<|endoftext|>" as one id, never split it
                return cls(tok, source=str(directory))
        except Exception as e:  # the library raises plain Exceptions for bad files
            why = " ".join(str(e).split())  # one line
            raise FunGPTError(f"could not read the tokenizer files in {directory}: {why}; copy them again from where "
                              f"the model came from") from None
        raise FunGPTError(
            f"no tokenizer in {directory}: a Hugging Face model folder needs tokenizer.json, or vocab.json and "
            "merges.txt; copy them from where the model came from"
        )

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        tok = BPETokenizer.load(path)._tok
        return cls(tok, source=str(Path(path).parent))

    def describe(self) -> str:
        return f"hf tokenizer from {self.source} ({self.vocab_size:,} tokens)" if self.source else super().describe()

    def _save_files(self, directory: Path) -> dict:
        write_hf_json(self._tok, directory / BPE_FILE)
        # (the folder it came from, for describe(): a name's bytes that are not UTF-8 shown as U+FFFD, as the UTF-8
        # file can hold no others)
        return {"file": BPE_FILE, "source": utf8_text(self.source) if self.source else None}


def interruptible(work: Callable[[], object]) -> None:
    """Run `work` in a helper thread and wait for it, so that Ctrl-C still works meanwhile.

    The tokenizers library trains in Rust without Python's lock: Python runs signal handlers only in the
    main thread, between its own instructions, so a Ctrl-C pressed during a long training was acted on
    only when it ended (tens of seconds later), and the command then finished as if nothing happened.
    Waiting in short slices keeps the main thread responsive. After a Ctrl-C the helper thread runs on
    in the background (a daemon: it does not keep the process alive); `fungpt` exits at once. A process that goes
    on (a notebook's kernel) waits for it before the next such work starts: two at once shared the cores and
    held twice the memory.
    """
    for earlier in _LEFT_RUNNING:
        if not earlier.is_set():
            print("fungpt: note: waiting for the tokenizer training that a Ctrl-C interrupted to end (the tokenizers "
                  "library cannot be stopped part-way; two at once would share the cores and double the memory)",
                  file=sys.stderr, flush=True)
            while not earlier.wait(0.1):
                pass
    _LEFT_RUNNING.clear()
    failure: list[BaseException] = []
    # Set when the work ends. (Not Thread.join: before Python 3.12, a join that Ctrl-C interrupted marked the thread
    # as stopped while it ran on)
    done = threading.Event()

    def run() -> None:
        try:
            work()
        except BaseException as e:  # handed to the main thread, which raises it
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="fungpt-tokenizer", daemon=True).start()
    try:
        while not done.wait(0.1):  # a Ctrl-C interrupts this wait within 0.1 s
            pass
    except BaseException:
        _LEFT_RUNNING.append(done)
        raise
    if failure:
        raise failure[0]


_LEFT_RUNNING: list[threading.Event] = []  # the end of interruptible's work that a Ctrl-C left running, if any


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (Radford et al. 2019), read backwards: stand-in character -> byte.

    Byte-level BPE writes each byte as one printable character, so that tokens are readable
    strings: printable bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, and the other 68
    (space, control characters, ...) are given chr(256), chr(257), ... in byte order ('Ġ' is the space).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if chr(b) not in table]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


MAX_BPE_VOCAB = 1 << 20
"""The largest BPE vocabulary FunGPT asks for: 20x GPT-2's, far past what small corpora can fill. Asked for
1e9, the tokenizers library tried to allocate 70 GB and aborted the whole process."""


def check_bpe_vocab_size(vocab_size: int) -> None:
    """Refuse vocabulary sizes that byte-level BPE cannot honour."""
    check_number(vocab_size, "vocab size", whole=True)
    if vocab_size < MIN_BPE_VOCAB:
        raise FunGPTError(
            f"vocab size {vocab_size} is too small for byte-level BPE: it needs at least "
            f"{MIN_BPE_VOCAB} (256 bytes + {EOT_TEXT})"
        )
    if vocab_size > MAX_BPE_VOCAB:  # the tokenizers library allocates for the size asked and aborts the process
        raise FunGPTError(f"vocab size {vocab_size:,} is too large: use at most {MAX_BPE_VOCAB:,} (GPT-2 has 50,257)")


# ---------------------------------------------------------------------------
# GPT-2 (tiktoken)
# ---------------------------------------------------------------------------


def _load_gpt2_encoding(timeout: float = GPT2_LOAD_TIMEOUT_S):
    """Return tiktoken's "gpt2" encoding, or raise FunGPTError explaining how to get it."""
    try:
        import tiktoken
    except ImportError:
        raise FunGPTError(
            "the gpt2 tokenizer needs the tiktoken package: pip install tiktoken "
            '(or install the extra: pip install "fungpt[gpt2]")'
        ) from None

    # Load in a helper thread so a hanging download cannot freeze us forever.
    result: dict = {}

    def work():
        try:
            result["enc"] = tiktoken.get_encoding("gpt2")
        except BaseException as e:  # noqa: BLE001 - reported below
            result["err"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    if "enc" in result:
        return result["enc"]
    why = why_download_failed(result["err"]) if "err" in result else f"timed out after {timeout:.0f}s"
    raise FunGPTError(
        f"could not load GPT-2's encoding through tiktoken, which neither read it from its cache nor downloaded it "
        f"({why}): connect to the internet once (tiktoken then caches it), or set TIKTOKEN_CACHE_DIR to a copy of a "
        "tiktoken cache folder from a machine that has it (its files are named by hashes: copy the whole folder); "
        "for new data, the bpe tokenizer needs no download (`fungpt prepare --tokenizer bpe`, "
        "`fungpt train --data.tokenizer bpe`)"
    )


GPT2_VOCAB_SIZE, GPT2_EOT_ID = 50257, 50256  # GPT-2's encoding: 50,000 merges + 256 bytes + <|endoftext|>, last


class GPT2Tokenizer(Tokenizer):
    """GPT-2's own 50,257-token byte-level BPE, through tiktoken."""

    name = "gpt2"

    def __init__(self, encoding=None, *, vocab_size: int | None = None, eot_id: int | None = None):
        """encoding: a tiktoken.Encoding (tests inject one without the network); without one, tiktoken's "gpt2"
        is loaded now, or, given the vocab_size and eot_id a saved tokenizer records, on first use: training
        on ids already encoded needs only the size, not tiktoken's files (which need the network once)."""
        if encoding is None and (vocab_size is None or eot_id is None):
            encoding = _load_gpt2_encoding()
        self._encoding = encoding
        self._size = encoding.n_vocab if encoding is not None else vocab_size
        self._eot = encoding.encode_single_token(EOT_TEXT) if encoding is not None else eot_id

    @property
    def _enc(self):
        if self._encoding is None:
            encoding = _load_gpt2_encoding()
            # (the sizes a tokenizer_meta.json records, maybe written by hand, must be the encoding's)
            if (self._size, self._eot) != (encoding.n_vocab, encoding.encode_single_token(EOT_TEXT)):
                raise FunGPTError(f"the tokenizer_meta.json of this gpt2 tokenizer records vocab_size {self._size} "
                                  f"and eot_id {self._eot}, but GPT-2's encoding has {encoding.n_vocab} and "
                                  f"{encoding.encode_single_token(EOT_TEXT)}: correct them there")
            self._encoding = encoding
        return self._encoding

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def eot_id(self) -> int | None:
        return self._eot

    def encode(self, text: str) -> list[int]:
        self._refuse_surrogates(text)
        return self._enc.encode(text, allowed_special={EOT_TEXT})

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        for text in texts:
            self._refuse_surrogates(text)
        return self._enc.encode_batch(texts, allowed_special={EOT_TEXT})

    def _refuse_surrogates(self, text: str) -> None:
        """A lone surrogate (bytes that were not UTF-8, PEP 383) is refused, as the bpe and char tokenizers refuse
        it: tiktoken silently encoded it as U+FFFD, changing a prompt typed in a Latin-1 terminal."""
        if not text.isascii() and (found := _SURROGATE.search(text)):
            ch = found.group()
            why = not_utf8(ch) or f"it holds U+{ord(ch):04X}, a lone surrogate, which UTF-8 cannot hold"
            raise FunGPTError(f"the {self.describe()} cannot encode the text: {why}")

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(self._id_list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        (token_id,) = self._id_list([token_id])  # (one clear error for an id out of range, not the library's)
        return self._enc.decode_single_token_bytes(token_id)

    def first_difference(self, other: Tokenizer) -> int | None:
        if isinstance(other, GPT2Tokenizer) and other.vocab_size == self.vocab_size:
            return None  # one fixed encoding: no need to load it to compare every id
        return super().first_difference(other)

    def _save_files(self, directory: Path) -> dict:
        return {"encoding": "gpt2", "vocab_size": self.vocab_size, "eot_id": self.eot_id}


# ---------------------------------------------------------------------------
# Factory and loading
# ---------------------------------------------------------------------------


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise FunGPTError(f"unknown tokenizer {kind!r}: choose one of {', '.join(KINDS)}")


def train_tokenizer(
    kind: str,
    corpus: str | Iterable[str] | None = None,
    vocab_size: int | None = None,
    progress: bool = False,
) -> Tokenizer:
    """Make a tokenizer of `kind` ("char", "bpe", "gpt2") fitted to `corpus`.

    `corpus` is a string or an iterable of text chunks (gpt2 needs none: it is
    fixed). `vocab_size` applies to bpe only (default 4096); char takes its size
    from the corpus.
    """
    check_kind(kind)
    if vocab_size is not None and kind != "bpe":
        raise FunGPTError(f"--vocab-size only applies to --tokenizer bpe, not {kind}; leave it out")
    if corpus is None and kind != "gpt2":
        raise FunGPTError(f"a {kind} tokenizer must be trained on some text; pass a corpus")
    if kind == "char":
        return CharTokenizer.train(corpus)
    if kind == "bpe":
        return BPETokenizer.train(corpus, vocab_size or DEFAULT_BPE_VOCAB, progress=progress)
    return GPT2Tokenizer()


make_tokenizer = train_tokenizer


# A run folder's tokenizer must be the one its checkpoint was trained with, so `prepare` cannot mend it
_RESTORE = "restore the folder's tokenizer files (for a prepared dataset: run `fungpt prepare` again)"


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Read back a tokenizer written by `Tokenizer.save(directory)`."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise FunGPTError(f"no tokenizer found: {meta_path} is missing (a prepared dataset gets one from `fungpt "
                          f"prepare`, a run folder from `fungpt train`; a folder of your own token ids needs one "
                          f"written by hand: README, \"Data of your own token ids\")")
    try:
        meta = read_json(meta_path)
        kind = meta["kind"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FunGPTError(
            f"tokenizer file {meta_path} is corrupt ({type(e).__name__}); {_RESTORE}"
        ) from None
    if kind == "char":
        chars = meta.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise FunGPTError(f"tokenizer file {meta_path} is corrupt (bad 'chars' list); {_RESTORE}")
        # (said of the file: CharTokenizer's own messages are about training text)
        why = ("its 'chars' list is empty" if not chars else "its 'chars' list holds a lone surrogate, which no text "
               "can hold" if any("\ud800" <= c <= "\udfff" for c in chars) else None)
        if why:
            raise FunGPTError(f"tokenizer file {meta_path} is corrupt ({why}); {_RESTORE}")
        try:
            return CharTokenizer(chars)
        except FunGPTError as e:
            raise FunGPTError(f"tokenizer file {meta_path} is corrupt ({e}); {_RESTORE}") from None
    named = meta.get("file", BPE_FILE)
    if kind in ("bpe", HF_KIND) and not (isinstance(named, str) and named and Path(named).name == named):
        raise FunGPTError(f"tokenizer file {meta_path} is corrupt: its 'file' {named!r} is not a file name beside it "
                          f"(such as {BPE_FILE}); {_RESTORE}")
    if kind == "bpe":
        bpe_path = meta_path.parent / named
        if not bpe_path.is_file():
            raise FunGPTError(f"BPE tokenizer file {bpe_path} is missing; {_RESTORE}")
        return BPETokenizer.load(bpe_path)
    if kind == "gpt2":
        # the size as recorded (a hand-made {"kind": "gpt2"} has GPT-2's); the encoding is loaded when first used
        size, eot = meta.get("vocab_size", GPT2_VOCAB_SIZE), meta.get("eot_id", GPT2_EOT_ID)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (size, eot)) or eot >= size:
            raise FunGPTError(f"tokenizer file {meta_path} is corrupt (bad vocab_size or eot_id); {_RESTORE}")
        if size == GPT2_VOCAB_SIZE and eot != GPT2_EOT_ID:  # (the end of text is also where a sample stops)
            raise FunGPTError(f"tokenizer file {meta_path} gives GPT-2's encoding eot_id {eot}, but its <|endoftext|> "
                              f"is {GPT2_EOT_ID}: set {GPT2_EOT_ID} there")
        if size > GPT2_VOCAB_SIZE:  # (a padded 50304: sampling drew ids the encoding cannot decode)
            raise FunGPTError(f"tokenizer file {meta_path} gives GPT-2's encoding vocab_size {size}, but it has "
                              f"{GPT2_VOCAB_SIZE:,} tokens: set {GPT2_VOCAB_SIZE} there and in meta.json (a padded "
                              f"vocabulary is not supported)")
        return GPT2Tokenizer(vocab_size=size, eot_id=eot)
    if kind == HF_KIND:
        hf_path = meta_path.parent / named
        if not hf_path.is_file():
            raise FunGPTError(f"tokenizer file {hf_path} is missing; {_RESTORE}")
        tok = HFTokenizer.load(hf_path)
        tok.source = str(meta.get("source") or tok.source)
        return tok
    raise FunGPTError(f"tokenizer file {meta_path} names an unknown kind {kind!r}; expected one of "
                      f"{', '.join((*KINDS, HF_KIND))}")
