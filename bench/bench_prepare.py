"""Benchmark `fungpt prepare`: how many MB of text per second it tokenizes.

Builds a corpus of at least --mb megabytes by repeating Tiny Shakespeare in a
temporary folder, then times `prepare` with the char tokenizer and with a BPE
tokenizer (vocabulary --bpe-vocab, trained on the corpus; training is included
in the time). Prints MB/s for each and, with --append FILE, adds a result block
with the machine's details to a Markdown file such as BENCHMARKS.md.

    python bench/bench_prepare.py
    python bench/bench_prepare.py --mb 50 --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchlib import ANCHORS, append_text, check_append, cpu_model  # noqa: E402

from fungpt.data import load_meta, prepare, shakespeare_path  # noqa: E402
from fungpt.errors import FunGPTError  # noqa: E402


def build_corpus(path: Path, megabytes: float) -> int:
    """Write Tiny Shakespeare repeated until the file holds at least `megabytes` MB."""
    text = shakespeare_path().read_bytes()
    repeats = -(-int(megabytes * 1e6) // len(text))  # ceiling division
    with open(path, "wb") as f:
        for _ in range(repeats):
            f.write(text)
    return path.stat().st_size


def time_prepare(corpus: Path, out: Path, **kwargs) -> tuple[float, dict]:
    start = time.perf_counter()
    prepare(corpus, out, progress=False, **kwargs)
    return time.perf_counter() - start, load_meta(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50, help="corpus size in MB (default 50)")
    parser.add_argument("--bpe-vocab", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    parser.add_argument("--append", metavar="FILE", help="append a result block to this Markdown file")
    args = parser.parse_args()
    if args.mb <= 0:
        parser.error("--mb must be positive")
    if args.append:
        check_append(parser, Path(args.append))
    os.environ.setdefault("FUNGPT_DATA_DIR", str(ANCHORS.parent / "data"))  # (../shared/data, as the other benches)

    results = []
    with tempfile.TemporaryDirectory(prefix="fungpt-bench-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        try:
            size = build_corpus(corpus, args.mb)
        except FunGPTError as e:  # (Tiny Shakespeare neither here nor downloadable)
            raise SystemExit(f"error: {e}") from None
        print(f"corpus: {size / 1e6:.1f} MB (Tiny Shakespeare repeated)")
        for label, kwargs in (
            ("char", {"tokenizer": "char"}),
            (f"bpe (vocab {args.bpe_vocab}, incl. training)", {"tokenizer": "bpe", "vocab_size": args.bpe_vocab}),
        ):
            try:
                seconds, meta = time_prepare(corpus, Path(tmp) / kwargs["tokenizer"], **kwargs)
            except FunGPTError as e:
                raise SystemExit(f"error: {e}") from None
            tokens = meta["train_tokens"] + meta["val_tokens"]
            rate = size / 1e6 / seconds
            results.append((label, seconds, rate, tokens))
            print(f"{label:32s} {seconds:7.2f} s  {rate:7.1f} MB/s  {tokens:,} tokens")

    if args.append:
        path = Path(args.append)
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        lines = [
            "",
            f"## prepare throughput, {datetime.date.today().isoformat()}",
            "",
            f"- machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            f"- command: `{command}`",
            f"- corpus: {size / 1e6:.1f} MB (Tiny Shakespeare repeated)",
            "",
            "| tokenizer | seconds | MB/s | tokens |",
            "|---|---:|---:|---:|",
            *(f"| {label} | {seconds:.2f} | {rate:.1f} | {tokens:,} |" for label, seconds, rate, tokens in results),
            "",
        ]
        new_file = not path.exists() or path.stat().st_size == 0  # check_append may have created it empty
        append_text(path, "# Benchmarks\n" * new_file + "\n".join(lines))
        print(f"appended results to {path}")


if __name__ == "__main__":
    main()
