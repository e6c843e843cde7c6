"""Starting from pretrained GPT-2 weights: resolving `init_from`, its tokenizer, and its architecture.

Fine-tuning means: take a model someone trained on a huge corpus, and keep training it on
your (small) text with a small learning rate. It learns your text's style in minutes, where
training from scratch would need days. Two things must come from the pretrained model:

  * its architecture (layers, heads, width, vocabulary): the weights only fit that shape;
  * its tokenizer: the model learned what each id means, so your text must be encoded with
    exactly the same token ids. Data prepared with another tokenizer is refused.

`[model] init_from` names the weights:

  "scratch"                       random initialisation (the default)
  a local folder                  a Hugging Face GPT-2 folder: config.json, model.safetensors (or
                                  pytorch_model.bin) and tokenizer.json (or vocab.json + merges.txt)
  gpt2, gpt2-medium,              a Hugging Face hub name (124M, 350M, 774M, 1.5B parameters),
  gpt2-large, gpt2-xl             found in the huggingface_hub cache, downloaded when online

Two settings may differ from the checkpoint: `block_size` may be smaller (the learned position
table is cropped to its first rows, so the model simply never sees the later positions) and
`dropout` (not part of the weights). Any other [model] field that is set to something other than
both its default and the checkpoint's value is an error, so a config can never silently train a
different model than it says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fungpt.checkpoint import file_in_the_way, fsync_dir, remove_stale_temps_named, sync_folder, temp_stem
from fungpt.errors import FunGPTError, why_download_failed
from fungpt.hf import check_gpt2_compatible
from fungpt.model import GPT, GPTConfig
from fungpt.tokenizer import HFTokenizer, Tokenizer

SCRATCH = "scratch"
# The published GPT-2 sizes (n_layer, n_head, n_embd); all have a 1024-token context and 50,257 tokens.
HUB_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}
HUB_NAMES = tuple(HUB_SHAPES)
# What we need from a hub repository: the config, the weights and the tokenizer (not the
# TensorFlow, Flax, ONNX... copies of the weights that the gpt2 repositories also hold).
HUB_FILES = ["config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"]
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")  # what export writes
# [model] fields that a fine-tuning config may set differently from the checkpoint.
OVERRIDABLE = ("block_size", "dropout")
# Text used to check that two tokenizers agree: letters, digits, punctuation, whitespace runs,
# accents and an emoji, so different merges or vocabularies show up as different ids.
PROBE_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n  ROMEO. O, 1597 — "
              "naïve café, 'tis well!  \t\"Quoth\" <|endoftext|> 😀 end. ﬁne ½ Ｍ①")  # (the last four: NFKC)


@dataclass
class Pretrained:
    """A resolved `init_from`: where its files are, its architecture and its tokenizer."""

    name: str  # as written in the config ("gpt2", "models/my-gpt2")
    path: Path | None  # the local folder holding config.json, the weights and the tokenizer files (None: a
    # resumed fine-tune whose pretrained model is gone, see rundata.resolve_model_and_data)
    config: GPTConfig  # the architecture, exactly as in the checkpoint
    tokenizer: Tokenizer
    model: GPT | None = None  # its weights, once read (training reads them before encoding the data, so that a
    # damaged weights file is refused at once, not after minutes of tokenizing)


def is_pretrained(init_from: str) -> bool:
    return init_from != SCRATCH


def _cached_hub_folder(name: str) -> Path | None:
    """The snapshot folder of hub model `name` in the local Hugging Face cache, or None (not cached)."""
    from huggingface_hub import snapshot_download

    try:  # never touches the network
        return Path(snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (the library raises several kinds of errors)
        return None


def _hub_folder(name: str) -> Path:
    """The local snapshot folder of hub model `name`: from the cache, or downloaded when online."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FunGPTError(f"init_from = {name!r} needs the huggingface_hub package: pip install \"fungpt[hf]\" "
                          "(or pass a local Hugging Face GPT-2 folder)") from None
    cached = _cached_hub_folder(name)  # the cache first: works offline
    if cached is not None:
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise FunGPTError(_how_to_get(name, "HF_HUB_OFFLINE is set and it is not in the cache"))
    try:
        print(f"fungpt: downloading {name} from the Hugging Face hub (once; it is cached afterwards)")
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - no network, proxy, disk full...
        raise FunGPTError(_how_to_get(name, f"it is not cached and the download failed ({why_download_failed(e)})")) \
            from None


def _how_to_get(name: str, why: str) -> str:
    return (f"cannot load {name!r}: {why}. On a machine with internet run `hf download {name}` (older "
            f"huggingface_hub releases: `huggingface-cli download {name}`), then copy ~/.cache/huggingface here "
            f"or set HF_HOME to it; or set init_from to a local folder holding the model's config.json, "
            f"model.safetensors and tokenizer files")


def resolve_path(init_from: str) -> Path:
    """The local folder that `init_from` names (hub names go through the huggingface_hub cache)."""
    path = Path(init_from).expanduser()
    if path.is_dir():
        return path
    if init_from in HUB_NAMES:
        return _hub_folder(init_from)
    raise FunGPTError(f"model.init_from = {init_from!r} is neither 'scratch', a local Hugging Face GPT-2 folder, "
                      f"nor a hub name ({', '.join(HUB_NAMES)}); check the path")


def architecture(init_from: str) -> tuple[GPTConfig, str | None]:
    """The architecture `init_from` names, without downloading anything, and a note when it was assumed: a local
    folder's config.json, a hub model's from the local cache, else the published shape of that GPT-2 size
    (what `fungpt inspect` shows for a fine-tuning config)."""
    path = Path(init_from).expanduser()
    if path.is_dir():
        return GPT.hf_config(path), None
    if init_from in HUB_SHAPES:
        try:
            cached = _cached_hub_folder(init_from)
        except ImportError:  # no huggingface_hub: nothing can be cached
            cached = None
        if cached is not None:
            return GPT.hf_config(cached), None
        n_layer, n_head, n_embd = HUB_SHAPES[init_from]
        # GPTConfig() is GPT-2 small's architecture, with the vocabulary padded; GPT-2's is 50,257 tokens
        shape = GPTConfig(vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        return shape, f"{init_from} is not in the local Hugging Face cache: its published shape is shown"
    return GPT.hf_config(resolve_path(init_from)), None  # neither a folder nor a hub name: resolve_path raises


def tokenizer_size(init_from: str) -> int | None:
    """How many tokens the tokenizer of `init_from` has, without downloading anything (None: not at hand)."""
    path = Path(init_from).expanduser()
    if not path.is_dir() and init_from in HUB_NAMES:
        try:
            path = _cached_hub_folder(init_from)
        except ImportError:
            path = None
    try:
        return HFTokenizer.from_dir(path).vocab_size if path is not None and path.is_dir() else None
    except FunGPTError:
        return None


def trim_vocab(model: GPTConfig, tokens: int) -> GPTConfig:
    """The architecture to fine-tune when the checkpoint has more token embeddings than its tokenizer has tokens
    (a table padded to a round size, say 50,304 rows for GPT-2's 50,257): the tokenizer's rows only. The extra
    rows are ids the tokenizer never makes; dropped (load_weights crops them), the run's model and tokenizer
    agree in size and it never samples an id without text."""
    return dataclasses.replace(model, vocab_size=tokens) if tokens < model.vocab_size else model


def resolve(init_from: str) -> Pretrained:
    """Find the checkpoint and read its architecture and tokenizer (the weights are loaded later)."""
    path = resolve_path(init_from)
    config = GPT.hf_config(path)
    tokenizer = HFTokenizer.from_dir(path)
    tokenizer.source = init_from  # messages then say "hf tokenizer from gpt2", not a cache path
    if tokenizer.vocab_size > config.vocab_size:
        raise FunGPTError(f"the tokenizer in {path} has {tokenizer.vocab_size:,} tokens but the model only "
                          f"{config.vocab_size:,} embeddings: they do not belong together")
    return Pretrained(init_from, path, config, tokenizer)


def fields_set(asked: GPTConfig, defaults: GPTConfig, named: Collection[str] = ()) -> set[str]:
    """The [model] fields the user set: those that differ from `defaults` (the config's defaults), and those in
    `named` (written in the config file or on the command line, whatever their value).

    From Python, `GPTConfig(init_from=...)` holds GPTConfig's own defaults (GPT-2 small's sizes), which were refused
    as contradicting the checkpoint, though nobody had set them: where every field but those a fine-tune may change
    is at GPTConfig's default, the fields set are those that differ from GPTConfig's defaults (so block_size=64 there
    counts, though it is also the run's default). (A config built from `defaults` with a value of GPTConfig's,
    block_size=1024 say, keeps it: that one was asked for.)"""
    plain = GPTConfig()
    untouched = all(getattr(asked, f.name) == getattr(plain, f.name) for f in dataclasses.fields(GPTConfig)
                    if f.name not in ("init_from", *OVERRIDABLE))
    baseline = plain if untouched else defaults
    return {f.name for f in dataclasses.fields(GPTConfig)
            if f.name in named or getattr(asked, f.name) != getattr(baseline, f.name)}


def model_flag(name: str, value: Any) -> str:
    """The command-line flag that sets a [model] field to `value` (tyro's: --model.no-bias for bias = False)."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--model.{flag}" if value else f"--model.no-{flag}"
    return f"--model.{flag} {value}"


def merge_model_config(asked: GPTConfig, checkpoint: GPTConfig, defaults: GPTConfig,
                       named: Collection[str] = (), tokens: int | None = None) -> GPTConfig:
    """The architecture to fine-tune: the checkpoint's, with the allowed overrides from `asked`.

    A field counts as set by the user as `fields_set` says. block_size may only shrink; dropout may be
    anything; any other field that is set (vocab_size too) must equal the checkpoint's value, but vocab_size may
    also be `tokens`, its tokenizer's size, where that is smaller: a padded table is trimmed to it (trim_vocab).
    """
    ignored = {"init_from", *OVERRIDABLE}
    if checkpoint.pos_encoding != "rope":  # (plays no part there; a GPT-2 folder has none to compare with)
        ignored.add("rope_base")
    is_set = fields_set(asked, defaults, named)
    conflicts, flags = [], []
    for f in dataclasses.fields(GPTConfig):
        if f.name in ignored:
            continue
        mine, theirs = getattr(asked, f.name), getattr(checkpoint, f.name)
        if f.name == "vocab_size" and tokens is not None and mine == tokens < theirs:
            continue  # (the size the run trains at: asked for, it was refused for the checkpoint's padded one)
        if f.name in is_set and mine != theirs:
            conflicts.append(f"{f.name} = {mine!r} (the checkpoint has {theirs!r})")
            flags.append(model_flag(f.name, theirs))
    if conflicts:
        raise FunGPTError(f"[model] contradicts the pretrained model {asked.init_from!r}: {'; '.join(conflicts)}. "
                          f"The architecture comes from the checkpoint: remove these settings (only block_size "
                          f"and dropout may be changed), or give the checkpoint's on the command line (over a "
                          f"preset's, say): {' '.join(flags)}")
    block_size = checkpoint.block_size
    if "block_size" in is_set:
        if asked.block_size > checkpoint.block_size:
            raise FunGPTError(f"model.block_size = {asked.block_size} is larger than the pretrained model's "
                              f"{checkpoint.block_size} positions: use at most {checkpoint.block_size}")
        block_size = asked.block_size
    return dataclasses.replace(checkpoint, block_size=block_size, dropout=asked.dropout, init_from=asked.init_from)


def load_weights(model: GPT, source: GPT | str | Path) -> None:
    """Copy the pretrained weights of `source` (a model loaded by GPT.from_hf, or its folder) into `model`
    (which may have a shorter block_size, or fewer token rows: see rundata.resolve_model_and_data)."""
    source = source if isinstance(source, GPT) else GPT.from_hf(source)
    state = source.state_dict()
    if "pos.wpe.weight" in state:  # crop the position table: keep the first block_size positions
        state["pos.wpe.weight"] = state["pos.wpe.weight"][: model.config.block_size]
    for name in ("wte.weight", "lm_head.weight"):  # keep the first vocab_size tokens (the tokenizer's)
        state[name] = state[name][: model.config.vocab_size]
    with torch.no_grad():
        model.load_state_dict(state)


def encoding_signature(tok: Tokenizer) -> tuple:
    """What identifies how `tok` turns text into ids: its size, what every id stands for (its bytes), and its ids
    for a varied probe text (the same vocabulary with merges of another order encodes otherwise; None for a
    tokenizer that cannot encode all of the probe, a character vocabulary). The probe alone let two tokenizers
    that agree on it, but not on the rest of a text (two ids swapped), share a cached dataset."""
    every = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    try:
        return tok.vocab_size, every, tok.encode(PROBE_TEXT)
    except FunGPTError:
        return tok.vocab_size, every, None


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """A short hash of `encoding_signature` and of the tokenizer's whole definition where it has one (for cache folder
    names: a cached dataset keeps the tokenizer files it was prepared with, which its runs copy and `fungpt export`
    ships; two model folders whose tokenizers differed only in a rule the probe text missed shared one)."""
    return hashlib.sha256(repr((encoding_signature(tok), tok.definition())).encode()).hexdigest()[:12]


def same_encoding(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers turn text into the same ids (`encoding_signature`).

    Comparing behaviour rather than names lets e.g. data prepared with tiktoken's `gpt2` encoding
    be used for fine-tuning the hub's gpt2 model, whose tokenizer.json encodes identically.
    """
    return a.vocab_size == b.vocab_size and encoding_signature(a) == encoding_signature(b)


def check_data_tokenizer(data_tok: Tokenizer, data_dir: Path, pre: Pretrained) -> None:
    """Refuse a prepared dataset whose tokens do not mean what the pretrained model expects."""
    if not same_encoding(data_tok, pre.tokenizer):
        # `fungpt prepare` knows GPT-2's encoding (the hub models'), not the tokenizer of a local model folder
        again = " or prepare it again with `fungpt prepare --tokenizer gpt2`" if pre.name in HUB_NAMES else ""
        raise FunGPTError(
            f"the prepared data in {data_dir} was made with the {data_tok.describe()}, but the pretrained model "
            f"{pre.name!r} needs its own {pre.tokenizer.describe()}: set data.path to the text itself (it is then "
            f"encoded with the model's tokenizer){again}"
        )


# ----------------------------------------------------------------------------------------------
# Export: a run folder -> a Hugging Face GPT-2 folder (`fungpt export`)


def export_hf(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "last") -> Path:
    """Write a run's weights and tokenizer as a Hugging Face GPT-2 folder.

    The result loads with `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` and
    `transformers.AutoTokenizer.from_pretrained(out_dir)`. Everything is written into a temporary
    folder renamed into place at the end, so a failure never leaves a half-exported folder.
    """
    import shutil

    from fungpt.runs import load_run

    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FunGPTError(f"--out {out} already exists and is not an empty folder; choose a new folder")
    run = load_run(run_dir, checkpoint=checkpoint, device="cpu")
    check_gpt2_compatible(run.model.config, run.model)  # before any folder is made for it
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # here, so that a bad path is named as the user wrote it
    except OSError as e:
        above = file_in_the_way(out)
        if above is not None:
            raise FunGPTError(f"cannot create the folder for --out {out}: {above} is a file, not a folder; choose "
                              f"another --out") from None
        raise FunGPTError(f"cannot create the folder for --out {out}: {e.filename}: {e.strerror}") from None
    # (an export killed before it could clean up left a folder the size of the weights beside --out)
    remove_stale_temps_named(out.parent, rf"{re.escape(temp_stem(out.name))}\.tmp-\d+-[a-z0-9_]{{8}}",
                             holding=EXPORT_FILES)
    try:
        # A new folder of its own (mkdtemp: a random name that did not exist), never one planted there in advance
        tmp = Path(tempfile.mkdtemp(prefix=f"{temp_stem(out.name)}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise FunGPTError(f"cannot create a folder in {out.parent} for --out: {e.strerror}") from None
    placed = emptied = False  # whether the export has taken its name; whether OUT, an empty folder, was removed
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); an export is made to be shared
        run.model.save_hf(tmp)
        # The end-of-text id, so that transformers' generate stops there (without it, it assumes GPT-2's
        # 50256, outside a small vocabulary); None for a tokenizer without one (char)
        hf_config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        hf_config["bos_token_id"] = hf_config["eos_token_id"] = run.tokenizer.eot_id
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8", newline="\n")
        save_hf_tokenizer(run.tokenizer, tmp, run.model.config.block_size)
        sync_folder(tmp)  # (on disk before the folder takes its name: a power loss never leaves a config.json empty)
        if out.exists():
            out.rmdir()  # the empty folder checked above
            emptied = True
        os.replace(tmp, out)
        placed = True
        fsync_dir(out.parent)
    except BaseException as e:
        placed = placed or (not tmp.exists() and out.is_dir())  # (os.replace done, interrupted as it returned)
        if placed and type(e) is KeyboardInterrupt:  # (Ctrl-C in the last moment: the export is there, whole)
            raise KeyboardInterrupt(f"{out} holds the export, complete") from None
        shutil.rmtree(tmp, ignore_errors=True)
        if emptied and not placed:
            with contextlib.suppress(OSError):
                out.mkdir()  # the user's empty folder back, as it was
        if isinstance(e, OSError):  # disk full, a size limit, a folder made read-only: said of --out
            raise FunGPTError(f"could not write the export to {out}: {e.strerror or e}; nothing was left there "
                              f"(free some disk space or fix permissions, then export again)") from None
        raise
    return out


def save_hf_tokenizer(tok: Tokenizer, directory: Path, model_max_length: int) -> None:
    """Write tokenizer.json + tokenizer_config.json, which transformers' AutoTokenizer reads.

    bpe and hf tokenizers already are `tokenizers` objects. A char tokenizer becomes a word-level
    model whose "words" are single characters (every character is split off, and decoding joins
    them without spaces). GPT-2's tiktoken encoding is rebuilt as a byte-level BPE (see below).
    """
    import json

    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFLibTokenizer

    from fungpt.tokenizer import EOT_TEXT, BPETokenizer, CharTokenizer, GPT2Tokenizer, write_hf_json

    if isinstance(tok, BPETokenizer):  # also HFTokenizer
        hf = tok._tok
    elif isinstance(tok, CharTokenizer):
        hf = HFLibTokenizer(models.WordLevel({c: i for i, c in enumerate(tok.chars)}, unk_token=None))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
        hf.decoder = decoders.Fuse()  # join tokens back without separators
    elif isinstance(tok, GPT2Tokenizer):
        hf = _tiktoken_to_hf(tok._enc)
    else:
        raise FunGPTError(f"cannot export a {tok.describe()} in Hugging Face format")
    write_hf_json(hf, directory / "tokenizer.json")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                              "clean_up_tokenization_spaces": False}
    if tok.eot_id is not None:
        config.update(bos_token=EOT_TEXT, eos_token=EOT_TEXT, unk_token=EOT_TEXT)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8",
                                                     newline="\n")


def _byte_to_char() -> dict[int, str]:
    """GPT-2's map from the 256 bytes to printable characters (how byte-level BPE files spell tokens).

    Printable Latin-1 bytes stand for themselves; the others (controls, space...) are shifted to
    code points from 256 up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _tiktoken_to_hf(enc):
    """Rebuild a tiktoken byte-level BPE (e.g. GPT-2's) as a `tokenizers` BPE with vocab and merges.

    tiktoken stores only each token's bytes and rank (= id, = merge order). The merge that made a
    token is found by running BPE on its bytes using only lower-ranked merges: what is left are the
    two parts that the token's own merge joins.
    """
    from tokenizers import Tokenizer as HFLibTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from fungpt.tokenizer import EOT_TEXT

    ranks: dict[bytes, int] = enc._mergeable_ranks
    spell = _byte_to_char()

    def text(b: bytes) -> str:
        return "".join(spell[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([x]) for x in token]
        while len(parts) > 2:  # apply the lowest-ranked available merge, as BPE encoding does
            pairs = [(ranks.get(parts[i] + parts[i + 1], 1 << 62), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((text(parts[0]), text(parts[1])))
    for special, sid in getattr(enc, "_special_tokens", {}).items():
        vocab[special] = sid
    hf = HFLibTokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    if EOT_TEXT in vocab:
        hf.add_special_tokens([EOT_TEXT])
    return hf
