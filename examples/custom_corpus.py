"""Train on your own text: a file or a folder of text files, with a BPE tokenizer trained on it.

    python examples/custom_corpus.py PATH [--chars] [--out DATA_DIR] [--run-dir RUN] [--iters N] [--block-size N]

PATH is a .txt file or a folder (every text file below it is used, in sorted order).
--chars models characters instead of BPE tokens (better for very small corpora).
The script prepares the data (into data/NAME-bpe or data/NAME-char, or --out), trains into out/NAME (or
--run-dir), reports bits per byte on the held-out 10%, and samples. Running it again replaces what it made
there, never a run or a dataset made otherwise. The model reads 128 tokens at a time (--block-size): each
split of the text needs more tokens than that, so a very small corpus needs a smaller --block-size.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fungpt import DataConfig, GPTConfig, RunConfig, TrainConfig, evaluate_run, prepare, sample, train
from fungpt.config import load_run_config
from fungpt.data import is_prepared, load_meta
from fungpt.errors import FunGPTError
from fungpt.rundir import holds_run


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two spellings name the same file or folder (texts/, ./texts and /home/me/texts)."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def made_here(run_dir: Path, cfg: RunConfig, data_dirs: list[Path]) -> bool:
    """Whether run_dir holds a run this script trained, which it may replace: the script's model and training
    settings (but for those its flags set) on one of the datasets it makes."""
    try:
        saved = load_run_config(run_dir)
    except FunGPTError:
        return False
    model = dataclasses.replace(saved.model, vocab_size=cfg.model.vocab_size, block_size=cfg.model.block_size)
    train = dataclasses.replace(saved.train, max_iters=cfg.train.max_iters)
    return model == cfg.model and train == cfg.train and any(same_path(saved.data.path, d) for d in data_dirs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="a text file or a folder of text files")
    ap.add_argument("--chars", action="store_true", help="character-level instead of BPE")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--block-size", type=int, default=128, help="tokens the model reads at a time")
    ap.add_argument("--out", help="folder for the prepared data (default: data/NAME-bpe or data/NAME-char); a "
                                  "prepared dataset there is replaced")
    ap.add_argument("--run-dir", help="folder for the training run (default: out/NAME)")
    args = ap.parse_args()
    given = Path(args.path).expanduser()
    name = given.stem if given.name not in ("", "..") else "corpus"  # (`..` named out/.., the folder above out/)
    kind = "char" if args.chars else "bpe"
    vocab_size = None if args.chars else 2048
    # (NAME-kind, not NAME: the corpus itself may be data/NAME)
    out = Path(args.out or f"data/{name}-{kind}")
    run_dir = Path(args.run_dir or f"out/{name}")
    try:
        if not args.out and is_prepared(out):  # replaced only if it is what this script makes
            meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
            ours = {"tokenizer": kind, "val_fraction": 0.1, "vocab_size_asked": vocab_size}
            if not same_path(meta.get("source", ""), args.path) or any(
                    meta.get(k) != v for k, v in ours.items() if v is not None):
                sys.exit(f"error: {out} holds a dataset prepared otherwise (by `fungpt prepare`?), which this "
                         f"script would replace: pass --out to prepare into another folder")
        cfg = RunConfig(
            out_dir=str(run_dir),
            data=DataConfig(path=str(out)),  # a prepared folder (prepared below)
            model=GPTConfig(vocab_size=1, block_size=args.block_size, n_layer=4, n_head=4, n_embd=192,
                            dropout=0.1, pos_encoding="rope"),
            train=TrainConfig(batch_size=16, max_iters=args.iters, lr=1e-3, min_lr=1e-4, warmup_iters=100),
        )
        replace_run = made_here(run_dir, cfg, [out, Path(f"data/{name}-bpe"), Path(f"data/{name}-char")])
        if holds_run(run_dir) and not replace_run:  # (checked before the data is prepared: that can take minutes)
            sys.exit(f"error: {run_dir} holds another training run, which this script would replace: pass --run-dir "
                     f"to train into another folder")
        prepare(args.path, out, tokenizer=kind, vocab_size=vocab_size, overwrite=True)
        meta = load_meta(out)
        split, tokens = min((("train", meta["train_tokens"]), ("val", meta["val_tokens"])), key=lambda s: s[1])
        if tokens <= args.block_size:  # a window is block_size tokens and the one after each (its targets)
            smaller = f"pass --block-size {tokens - 1} or less, or " if tokens > 1 else "pass "
            sys.exit(f"error: the {split} split of {args.path} has {tokens} tokens, too few for --block-size "
                     f"{args.block_size}: {smaller}more text")
        result = train(cfg, overwrite=replace_run)
        if result["interrupted"]:  # stopped by Ctrl-C or a stop signal: no final model to report on
            sys.exit(128 + (result["signal"] or 2))  # as a shell reports a command ended by that signal
        metrics = evaluate_run(result["out_dir"])
        print(f"val: {metrics['loss']:.3f} nats/token, {metrics['bits_per_byte']:.3f} bits/byte\n")
        sample(result["out_dir"], max_new_tokens=200, seed=0, out=sys.stdout)
    except FunGPTError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
