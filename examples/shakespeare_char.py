"""Train a small character-level model on Tiny Shakespeare with the library API, then sample from it.

    python examples/shakespeare_char.py            # about two minutes on a laptop CPU
    python examples/shakespeare_char.py --quick    # a 200-step smoke run

Tiny Shakespeare is downloaded once (sha256-checked) or read from $FUNGPT_DATA_DIR.
"""

import argparse
import sys

from fungpt import DataConfig, GPTConfig, RunConfig, TrainConfig, sample, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 200-step smoke run instead of 2,000 steps")
    quick = ap.parse_args().quick  # (--help, or a mistyped flag, stops here: the run folder is replaced below)
    cfg = RunConfig(
        out_dir="out/example-shakespeare-char",
        data=DataConfig(path="shakespeare", tokenizer="char"),
        # vocab_size is filled in from the data (65 characters for Tiny Shakespeare).
        model=GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, pos_encoding="rope"),
        train=TrainConfig(batch_size=12, max_iters=200 if quick else 2000, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                          eval_interval=100 if quick else 250, device="auto"),
    )
    result = train(cfg, overwrite=True)
    if result["interrupted"]:  # stopped by Ctrl-C or a stop signal: no final model to report on
        sys.exit(128 + (result["signal"] or 2))  # as a shell reports a command ended by that signal
    print(f"final val loss {result['val_loss']:.4f}; a sample:\n")
    sample(result["out_dir"], prompt="JULIET:", max_new_tokens=300, temperature=0.8, seed=0, out=sys.stdout)


if __name__ == "__main__":
    main()
