"""What a run trains on: its data folder (prepared by `fungpt prepare`, or prepared on the fly from data.path into a
cache, once, however many processes ask) and its model's settings (vocab_size from the data's tokenizer; a
fine-tune's from the pretrained weights), checked against what a resumed run trained on (its tokenizer's settings
and split are checked earlier, before any preparation: rundir.check_out_dir)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import os
import sys
from collections.abc import Collection
from pathlib import Path

import torch.distributed as dist

try:
    import fcntl  # the data cache's lock (_preparing_alone); POSIX only
except ImportError:  # Windows: no lock (one process prepares)
    fcntl = None

from fungpt import checkpoint as ckpt
from fungpt import pretrained
from fungpt.config import TOKENIZERS, DataConfig, RunConfig, default_model, load_run_config
from fungpt.data import (
    OWN_IDS,
    cache_dir,
    check_split_fits,
    check_token_ids,
    is_prepared,
    left_in_a_temporary,
    load_meta,
    max_token_id,
    mend,
    prepare,
    prepared_summary,
    remove_stale_temps,
    resolve_source,
)
from fungpt.errors import FunGPTError, read_json, said_on_ctrl_c
from fungpt.hf import load_gpt2
from fungpt.model import GPT, GPTConfig
from fungpt.rundir import the_data_it_read
from fungpt.tokenizer import DEFAULT_BPE_VOCAB, Tokenizer, load_tokenizer

# How long the other torchrun processes wait for rank 0 to prepare the data (resolve_data): a day, for corpora of
# many GB; a rank 0 that fails ends the wait at once.
PREPARE_WAIT = datetime.timedelta(hours=24)


def _loads(prepared: Path) -> bool:
    """Whether a cached dataset folder is there and loads: load_meta checks its format and its files' sizes, and its
    tokenizer must load too (a folder that lost its tokenizer files was taken, and the run then refused)."""
    if not (prepared / "meta.json").is_file():
        return False
    try:
        load_meta(prepared)
        load_tokenizer(prepared)
        return True
    except FunGPTError:
        return False


def _token_code_fingerprint() -> str:
    """The sha256 of data.py and tokenizer.py, the code that turns text into the cached tokens. An edit there (lower
    case, blank lines dropped) was silently ignored: training read the tokens the old code had cached. Read at each
    call, not once per process: a notebook's %autoreload runs the edited code in the same process. Any edit counts,
    a comment's too (hashing their syntax trees instead took ~90 ms of every training command, a time budget's too).
    """
    from fungpt import data as data_module
    from fungpt import tokenizer as tokenizer_module

    h = hashlib.sha256()
    for module in (data_module, tokenizer_module):
        try:
            h.update(Path(module.__file__).read_bytes())
        except (OSError, TypeError):  # (no source file: a frozen install, which is not edited)
            h.update(module.__name__.encode())
    return "code=" + h.hexdigest()


@contextlib.contextmanager
def _preparing_alone(out: Path):
    """Hold the lock of the cached dataset `out` (datasets/.NAME.lock) while this process looks for it and prepares
    it: runs started together on the same data prepared it each, and swapped their folders in under each other
    (a run could find none between two renames). The others now wait, then find it prepared. Unlocked where locks
    do not work (Windows, some network file systems, a read-only cache)."""
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            out.parent.mkdir(parents=True, exist_ok=True)
            lock = out.parent / f".{out.name}.lock"  # (left there, empty: removing it would race)
            try:  # (for writing: NFS emulates flock with fcntl locks, whose exclusive lock needs it)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:  # another user's lock file in a shared cache: locked read-only, where that works
                fd = os.open(lock, os.O_RDONLY)
    try:
        if fd is not None:
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print(f"fungpt: waiting for another process that prepares the same data ({out.name}) ...",
                          file=sys.stderr)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # (a file system without locks: ENOLCK on some NFS)
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)  # (and the lock with it)


def resolve_data(data: DataConfig, is_main: bool = True, progress: bool = True,
                 tokenizer: Tokenizer | None = None, say_cached: bool = False) -> Path:
    """Return a prepared dataset folder for `data.path`, preparing it into the cache if needed.

    The cache key covers everything that changes the tokens: the source files (path, size, modification
    time, and inode and its change time, which no copying tool sets back: `cp -p` or `touch -r` can give
    new text the old size and modification time), the tokenizer, the vocab size, the val fraction, how
    undecodable bytes are treated, and the code that makes the tokens (data.py and tokenizer.py, as they are
    now: a learner's edit there, or another FunGPT version, prepares the data again). A cached folder that no
    longer loads (damaged, or of an older format) is prepared again. `tokenizer`: a ready tokenizer to encode
    with instead of data.tokenizer (a pretrained model's own, see pretrained.py). `say_cached`: print a line when
    the cache holds the dataset already (a new run's: a preparation prints its own summary).
    """
    path = Path(data.path).expanduser()
    if is_prepared(path):
        return path  # already prepared by `fungpt prepare`
    builtin = data.path == "shakespeare" and not path.exists()  # (a file or folder of that name is the user's own)
    if not builtin and not path.exists():
        raise FunGPTError(f"data.path {data.path!r} does not exist: set data.path (--data.path, or path in the "
                          f"config's [data]) to a text file, a folder of text, a prepared folder or 'shakespeare'"
                          + left_in_a_temporary(path))
    kind = data.tokenizer if tokenizer is None else tokenizer.name
    # (a BPE's size written out as the default's is the default: one folder for both, under the default's key)
    vocab_size = None if data.tokenizer == "bpe" and data.vocab_size == DEFAULT_BPE_VOCAB else data.vocab_size
    key_parts: list[str] = [data.tokenizer, str(vocab_size), repr(data.val_fraction)]
    if tokenizer is not None:
        from fungpt.pretrained import tokenizer_fingerprint

        key_parts = [kind, tokenizer_fingerprint(tokenizer), repr(data.val_fraction)]
    if data.errors != "strict":
        key_parts.append(f"errors={data.errors}")  # only then: the folders prepared before this setting keep their keys
    key_parts.append(_token_code_fingerprint())
    if builtin:
        name = "shakespeare"
    else:
        name = path.stem or "corpus"
        for p in resolve_source(data.path):
            st = p.stat()
            key_parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}")
    # (surrogateescape: a file name that is not UTF-8 arrives from the OS with its bytes escaped)
    key = hashlib.sha256("\n".join(key_parts).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    # (the name cut to 100 bytes: with the key, a 251-byte file name made one over the 255 bytes a name can have)
    out = cache_dir() / "datasets" / f"{ckpt.temp_stem(name)}-{kind}-{key}"
    # Under torchrun the other ranks wait while rank 0 prepares, which can outlast the process group's timeout
    # (30 minutes for gloo, 10 for NCCL: a BPE encodes a few MB/s). They wait in a CPU group of their own, made
    # before rank 0 starts (making it is collective too), with a timeout of a day; a rank 0 that fails still ends
    # the wait at once (its peers see the connection close).
    waiting = dist.new_group(backend="gloo", timeout=PREPARE_WAIT) if dist.is_initialized() else None
    with _preparing_alone(out) if is_main else contextlib.nullcontext():
        if is_main and not _loads(out):
            vocab = data.vocab_size if data.vocab_size is not None else (DEFAULT_BPE_VOCAB if data.tokenizer == "bpe"
                                                                         else None)
            with said_on_ctrl_c("while the data was being prepared, before training: no partial dataset was "
                                "kept; the same command prepares it again"):
                prepare(data.path, out, tokenizer=tokenizer or data.tokenizer, vocab_size=None if tokenizer else vocab,
                        val_fraction=data.val_fraction, overwrite=True, errors=data.errors, progress=progress)
            for line in prepared_summary(out, path):  # (as `fungpt prepare` says it: the same data, made here)
                print(f"fungpt: {line}")
        elif is_main:
            # A prepare killed (kill -9) before it cleaned up left its temporary folder beside `out`, which a later
            # run prepared in full: found cached from then on, prepare never ran again to remove it (gigabytes)
            remove_stale_temps(out)
            if say_cached:  # (as a preparation is said: which data a new run reads, and that it was not made again)
                print(f"fungpt: data: {out}, prepared earlier from the same text and settings")
    if waiting is not None:
        dist.barrier(group=waiting)  # the other ranks wait until rank 0 has prepared the data
        # and read it where rank 0 put it: this rank's own key may differ (another machine's copy of the text has
        # its own path or modification time)
        where = [str(out)]
        dist.broadcast_object_list(where, src=0, group=waiting)
        dist.destroy_process_group(waiting)
        out = Path(where[0])
        if not (out / "meta.json").is_file():  # another machine, without rank 0's filesystem
            raise FunGPTError(f"the data that rank 0 prepared ({out}) is not on this machine: on several machines, "
                              f"set FUNGPT_CACHE_DIR to the same folder on a filesystem they share, or prepare the "
                              f"data once with `fungpt prepare` into such a folder and pass it as data.path")
    return out


def note_unused_data_settings(data: DataConfig, meta: dict, data_dir: Path, fine_tune: bool = False) -> None:
    """Say which [data] settings a prepared folder leaves unused: its tokens were fixed by `fungpt prepare`.

    Only settings that differ from both the defaults and the folder's own count (a config file written
    for the raw text may name the same tokenizer the folder used; that needs no note). A fine-tune
    tokenizes with its pretrained model's tokenizer whatever data.tokenizer says: those two are left out."""
    default = DataConfig()
    # A BPE stops short of its vocab_size on a small corpus: the size asked is what the setting compares with
    # (folders prepared before it was recorded: only a size below the folder's cannot be the one asked)
    asked = meta.get("vocab_size_asked")
    if data.vocab_size is None or meta.get("tokenizer") != "bpe":
        vocab_differs = data.vocab_size is not None  # (a size only applies to a BPE)
    else:
        vocab_differs = data.vocab_size != asked if asked is not None else data.vocab_size < meta.get("vocab_size", 0)
    checks = [("val_fraction", data.val_fraction, meta.get("val_fraction"), True),
              ("errors", data.errors, meta.get("errors", "strict"), True)]
    if not fine_tune:
        checks[:0] = [("tokenizer", data.tokenizer, meta.get("tokenizer"), True),
                      ("vocab_size", data.vocab_size, asked or meta.get("vocab_size"), vocab_differs)]
    unused = [f"{name} = {mine!r}" + (f" (the folder's: {theirs!r})" if theirs is not None else "")
              for name, mine, theirs, differs in checks
              if mine != getattr(default, name) and mine != theirs and differs]
    if unused:
        settings = f"data.{'; data.'.join(unused)} {'is' if len(unused) == 1 else 'are'} not used"
        if "source_sha256" not in meta:  # token ids made elsewhere (README, "Data of your own token ids")
            print(f"fungpt: note: {data_dir} holds token ids made without `fungpt prepare`, so {settings} (such "
                  f"settings apply only where FunGPT tokenizes a text)")
        else:
            print(f"fungpt: note: {data_dir} is a prepared dataset, tokenized once by `fungpt prepare`, so "
                  f"{settings}. To change {'it' if len(unused) == 1 else 'them'}, set data.path to the text itself, "
                  f"or prepare it again")


def _tokenizer_as_trained(resume_dir: Path) -> bool:
    """Whether the run being resumed has a checkpoint and, where it recorded them, the tokenizer files it was trained
    with (not replaced or damaged since; a checkpoint from before they were recorded: taken as they are)."""
    folder = ckpt.find_checkpoint(resume_dir)
    if folder is None:
        return False
    try:
        trained = read_json(folder / ckpt.MANIFEST_FILE).get("tokenizer_sha256")
        return trained is None or trained == ckpt.tokenizer_fingerprint(resume_dir)
    except (FunGPTError, OSError, ValueError, AttributeError):
        return False


def encoded_as_the_run(data: DataConfig, data_dir: Path, resume_dir: Path, is_main: bool, progress: bool) -> Path:
    """The data of a BPE run resumed from scratch, encoded with the run's own tokenizer where the BPE trained on the
    text now learns other merges (another FunGPT version: its code prepares the data again; a corpus holding
    <|endoftext|>, since BPE training leaves it out). The resume was refused ("ids mean other text"), though the
    text was the same. Else `data_dir` as it is (and a user's prepared folder, whose tokenizer is its own, always)."""
    folder = ckpt.find_checkpoint(resume_dir)
    if data.tokenizer != "bpe" or is_prepared(Path(data.path).expanduser()) or folder is None:
        return data_dir
    try:
        own, was = load_tokenizer(resume_dir), load_run_config(resume_dir).data
        manifest = read_json(folder / ckpt.MANIFEST_FILE)
        if manifest.get("tokenizer_sha256") not in (None, ckpt.tokenizer_fingerprint(resume_dir)):
            return data_dir  # the run's tokenizer files were replaced or damaged since: never encode with them
            # (check_resume_tokenizer refuses, naming them)
        trained_on = str(manifest.get("data_fingerprint") or "").partition(":")[0]
        if not trained_on:  # (checkpoints from before the fingerprint was saved: the text's hash in the prepared
            # folder the run read, which run.json names, while it is there)
            trained_on = load_meta(Path(read_json(resume_dir / "run.json")["data_dir"])).get("source_sha256")
    except (FunGPTError, OSError, ValueError, AttributeError, KeyError, TypeError):
        return data_dir  # (the resume checks say what is wrong)
    if own.name != "bpe" or own.first_difference(load_tokenizer(data_dir)) is None:
        return data_dir
    # Only for the same text, tokenizer settings and split: other text or settings are the resume checks' to refuse
    def settings(d: DataConfig) -> tuple:
        return d.tokenizer, DEFAULT_BPE_VOCAB if d.vocab_size is None else d.vocab_size, d.val_fraction

    if settings(was) != settings(data) or trained_on != load_meta(data_dir).get("source_sha256"):
        return data_dir
    if is_main:
        print(f"fungpt: note: the BPE trained on {data.path} now differs from the one {resume_dir} was trained with "
              f"(another FunGPT version?): encoding the text with the run's own tokenizer")
    return resolve_data(data, is_main, progress, tokenizer=own)


def resolve_model_and_data(cfg: RunConfig, is_main: bool = True, progress: bool = True,
                           model_named: Collection[str] = (), resume_dir: Path | None = None,
                           read_weights: bool = False, check_weights: bool = False,
                           data_named: Collection[str] = ()):
    """Settle the model config and the data together; returns (cfg, data_dir, pretrained or None).

    A pretrained start (init_from) brings its own architecture and tokenizer (pretrained.py), and the
    data is encoded with that tokenizer. From scratch, the vocabulary size comes from the data.
    `model_named`: the [model] fields the user wrote down (see pretrained.merge_model_config); `data_named`: the
    [data] ones (a fine-tune notes a tokenizer asked for that it does not use, even the default).
    `resume_dir`: the run being resumed. A resumed fine-tune keeps the architecture its folder records (the
    fields not set take those values, not the pretrained model's); and as it no longer needs its pretrained
    model's weights, if init_from is gone (a moved folder, a cleared hub cache) the run's own copy of its
    tokenizer stands in.
    `read_weights`: read the pretrained weights into pre.model (train passes it when they will be needed: no
    checkpoint to resume from) before the data, which can take minutes to encode: damaged weights are refused first.
    `check_weights`: only check them as reading them would (their files' headers: the dry run, which must not need
    the weights' memory).
    """
    pre = None
    if pretrained.is_pretrained(cfg.model.init_from):
        try:
            pre = pretrained.resolve(cfg.model.init_from)
        except FunGPTError:
            if resume_dir is None or ckpt.find_checkpoint(resume_dir) is None:
                raise
            if not _tokenizer_as_trained(resume_dir):
                raise FunGPTError(f"cannot resume {resume_dir}: its tokenizer files are not the ones its checkpoint "
                                  f"was trained with (their fingerprint differs), and {cfg.model.init_from}, whose "
                                  f"tokenizer it was, is not available here: restore the run's original tokenizer "
                                  f"files") from None
            pre = pretrained.Pretrained(cfg.model.init_from, None, load_run_config(resume_dir).model,
                                        load_tokenizer(resume_dir))
            if is_main:
                print(f"fungpt: {cfg.model.init_from} is not available here; resuming with the architecture and "
                      f"tokenizer recorded in {resume_dir}")
        else:
            if read_weights:
                pre.model = GPT.from_hf(pre.path)
            elif check_weights:
                load_gpt2(pre.path, meta=True)
            if resume_dir is not None and _tokenizer_as_trained(resume_dir):
                # A resume encodes its text as the run did: the run's own copy of the tokenizer, should the model
                # folder hold another one since (its data was then refused, and the advice sent the user round).
                # (Run files replaced since: check_resume_tokenizer refuses, naming them)
                own = load_tokenizer(resume_dir)
                if not pretrained.same_encoding(own, pre.tokenizer):
                    if is_main:
                        print(f"fungpt: note: {cfg.model.init_from} holds another tokenizer than when {resume_dir} "
                              f"began: resuming with the run's own ({own.describe()})")
                    pre.tokenizer = own
    if pre is not None and resume_dir is not None:
        # A resumed fine-tune continues its own architecture, as its folder records it (block_size cropped,
        # vocabulary trimmed): the fields the user set replace those, and the resume check refuses a change
        asked = pretrained.fields_set(cfg.model, default_model(), model_named)
        model = dataclasses.replace(load_run_config(resume_dir).model, **{k: getattr(cfg.model, k) for k in asked})
        cfg = dataclasses.replace(cfg, model=model)
    elif pre is not None:
        model = pretrained.merge_model_config(cfg.model, pre.config, default_model(), model_named,
                                              tokens=pre.tokenizer.vocab_size)
        if pre.tokenizer.vocab_size < model.vocab_size and is_main:  # a padded table (pretrained.trim_vocab)
            print(f"fungpt: {cfg.model.init_from} has {model.vocab_size:,} token embeddings for "
                  f"{pre.tokenizer.vocab_size:,} tokens: fine-tuning the {pre.tokenizer.vocab_size:,} in use")
        model = pretrained.trim_vocab(model, pre.tokenizer.vocab_size)
        cfg = dataclasses.replace(cfg, model=model)
        if is_main and (note := dropout_left_out(cfg.model, pre, model_named)):
            print(note)
    try:
        data_dir = resolve_data(cfg.data, is_main, progress, tokenizer=pre and pre.tokenizer,
                                say_cached=is_main and resume_dir is None)
    except FunGPTError as e:
        gone = Path(cfg.data.path).expanduser()
        if resume_dir is None or gone.is_absolute() or gone.exists() or cfg.data.path == "shakespeare":
            raise
        raise FunGPTError(f"{e} (resuming, data.path is the run's config.json's unless --config or --data.path "
                          f"gives another; a relative one is found from the folder you run in: run where you trained, "
                          f"or pass --data.path with its full path)") from None
    if pre is None and resume_dir is not None:
        data_dir = encoded_as_the_run(cfg.data, data_dir, resume_dir, is_main, progress)
    meta = load_meta(data_dir)
    note = check_token_ids(data_dir, meta)
    if note and is_main:
        print(note)
    if is_main and data_dir == Path(cfg.data.path).expanduser():
        note_unused_data_settings(cfg.data, meta, data_dir, fine_tune=pre is not None)
    if pre is not None and is_main and resume_dir is None:  # (a fine-tune's text takes its model's tokenizer)
        default = DataConfig()
        gpt2 = pre.name in pretrained.HUB_NAMES  # (its tokenizer is GPT-2's: data.tokenizer "gpt2" says the same)
        unused = [f"data.{name} = {mine!r}" for name, mine in (("tokenizer", cfg.data.tokenizer),
                                                                ("vocab_size", cfg.data.vocab_size))
                  if (mine != getattr(default, name) or name in data_named)
                  and not (name == "tokenizer" and mine == "gpt2" and gpt2)]
        if unused:
            print(f"fungpt: note: {' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used: a fine-tune "
                  f"encodes the text with its pretrained model's own tokenizer, the {pre.tokenizer.describe()}")
    if pre is not None:
        pretrained.check_data_tokenizer(load_tokenizer(data_dir), data_dir, pre)
    else:
        tokens = load_tokenizer(data_dir).vocab_size  # (a model of another size could never be loaded with it)
        if tokens != meta["vocab_size"]:
            fix = mend(meta)  # (prepare's own folder: prepare again. nanoGPT pads GPT-2's 50257 to 50304)
            if "source_sha256" not in meta:  # (a folder of one's own ids: what to correct depends on the ids)
                top = max_token_id(data_dir, meta)
                fix = (f"set vocab_size to {tokens} there: the model's vocabulary is its tokenizer's ({OWN_IDS})"
                       if top < tokens else
                       f"its ids reach {top}, past the tokenizer's last ({tokens - 1}): give the tokenizer a token for "
                       f"every id in use, or write the ids it has ({OWN_IDS})")
            raise FunGPTError(f"{data_dir / 'meta.json'} says vocab_size {meta['vocab_size']} but the tokenizer "
                              f"beside it has {tokens} tokens: the folder was edited or mixed up; {fix}")
        if "vocab_size" in model_named and cfg.model.vocab_size != meta["vocab_size"] and is_main:
            other = ("" if "source_sha256" not in meta  # (a folder of one's own ids: its vocabulary is theirs)
                     else " (for a BPE of another size, prepare the text again with `fungpt prepare --vocab-size`)"
                     if is_prepared(cfg.data.path) else " (for a BPE of another size, set data.vocab_size)")
            print(f"fungpt: note: model.vocab_size = {cfg.model.vocab_size} is replaced by the {meta['vocab_size']} "
                  f"tokens of the data's tokenizer{other}")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=int(meta["vocab_size"])))
    check_split_fits(meta, cfg.model.block_size, prepared_by_user=is_prepared(cfg.data.path),
                     resuming=resume_dir is not None and ckpt.find_checkpoint(resume_dir) is not None)
    if (pre is None and data_dir == Path(cfg.data.path).expanduser() and "source_sha256" in meta
            and meta.get("tokenizer") in TOKENIZERS):
        # A folder `fungpt prepare` made: the settings its tokens were made with, not those it left unused (saved
        # in config.json, the file that trains another run like this one from its text)
        bpe = meta.get("tokenizer") == "bpe"
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, tokenizer=meta["tokenizer"], val_fraction=meta.get(
                "val_fraction", cfg.data.val_fraction), errors=meta.get("errors", "strict"),
            vocab_size=(meta.get("vocab_size_asked") or meta.get("vocab_size")) if bpe else None))
    return cfg, data_dir, pre


def dropout_left_out(model: GPTConfig, pre: pretrained.Pretrained, named: Collection[str]) -> str | None:
    """A note for a fine-tune that trains without the dropout its model folder's config.json sets (resid_pdrop,
    GPT-2's 0.1; transformers' Trainer keeps it), model.dropout not being set: the default, 0.0, is used."""
    if pre.path is None or "dropout" in pretrained.fields_set(model, default_model(), named):
        return None
    try:
        theirs = read_json(pre.path / "config.json").get("resid_pdrop")
    except (FunGPTError, OSError, ValueError, AttributeError):
        return None
    if not isinstance(theirs, (int, float)) or isinstance(theirs, bool) or theirs == model.dropout:
        return None
    return (f"fungpt: note: {model.init_from}'s config.json sets dropout {theirs} (resid_pdrop); this fine-tune trains "
            f"with model.dropout = {model.dropout}: set --model.dropout {theirs} (or dropout in the config's [model]) "
            f"for the model's own")


def check_resume_tokenizer(data_dir: Path, out_dir: Path, trained_sha256: str | None = None) -> None:
    """Refuse to resume on data whose token ids mean something else than in the checkpoint's run.

    The model check cannot see this when both tokenizers have the same size (two character sets
    of 65 symbols): token 7 would silently mean another character. The run folder still holds
    the tokenizer the checkpoint was trained with (it is rewritten only after this check), unless its files were
    replaced by hand: trained_sha256, the checkpoint's record of them (tokenizer_fingerprint), then says so.
    """
    old, new = load_tokenizer(out_dir), load_tokenizer(data_dir)
    bad = old.first_difference(new)
    if bad is None:
        return
    if trained_sha256 is not None and ckpt.tokenizer_fingerprint(out_dir) != trained_sha256:
        raise FunGPTError(f"cannot resume {out_dir}: its tokenizer files are not the ones its checkpoint was trained "
                          f"with (their fingerprint differs, and {old.describe()} is not the data's "
                          f"{new.describe()}): restore the run's original tokenizer files")
    # Of another size, no id needs naming. (The model check reports most size changes first, but not a fine-tune's:
    # a resume keeps the run's saved shape, and the model folder it started from may since hold another tokenizer.)
    which = ("" if old.vocab_size != new.vocab_size
             else f"; id {bad} is {new.token_text(bad)!r} instead of {old.token_text(bad)!r}")
    advice = "resume with the original data and tokenizer, or train into a new out_dir"
    try:  # the prepared folder the run read (run.json): it holds the run's own ids, while it is there as it was
        was = the_data_it_read(out_dir)
        if was is not None and was.resolve() != data_dir.resolve():
            # The same text, where another FunGPT version learned other merges from it (encoded_as_the_run
            # re-encodes such text with the run's tokenizer where the checkpoint says which text it was)
            text = load_meta(was).get("source_sha256")
            same = old.name == new.name == "bpe" and text is not None and text == load_meta(data_dir).get(
                "source_sha256")
            advice = (("a BPE learned again (by another FunGPT version?) holds other merges from the same text: "
                       if same else "") + f"resume with the data the run read, --data.path {was}, or train into a new "
                      f"out_dir")
    except (OSError, ValueError, KeyError, TypeError, FunGPTError):
        pass
    raise FunGPTError(f"cannot resume {out_dir}: the data is encoded with a tokenizer whose ids mean other text than "
                      f"in the checkpoint's ({new.describe()} vs {old.describe()}{which}); {advice}")
