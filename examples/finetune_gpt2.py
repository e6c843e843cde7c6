"""Fine-tune pretrained GPT-2 on Tiny Shakespeare (or your own text), then sample from it.

    python examples/finetune_gpt2.py [--init-from gpt2 | PATH_TO_HF_GPT2_FOLDER] [--data PATH] [--iters N]

--init-from: a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; downloaded once and cached) or a
local Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer.json or vocab.json +
merges.txt). --data: 'shakespeare' (default), a text file or a folder of text files.

The recipe is configs/finetune-gpt2-shakespeare.toml's. On a GPU it takes minutes; on a CPU, use
--block-size 256 --iters 5 to see it work (each step still takes a while).
"""

import argparse
import sys
from pathlib import Path

from fungpt import DataConfig, RunConfig, TrainConfig, load_config, sample, train
from fungpt.config import fields_named, load_run_config
from fungpt.errors import FunGPTError
from fungpt.rundir import holds_run


def made_here(run_dir: str, cfg: RunConfig) -> bool:
    """Whether run_dir holds a fine-tune this script made, which it may replace: the recipe's optimizer settings on
    a pretrained start (its evals, logging and length may differ: the preset's changed over versions). Another
    run there is refused, not replaced."""
    try:
        saved = load_run_config(run_dir)
    except FunGPTError:
        return False
    recipe = ("batch_size", "grad_accum_steps", "lr", "min_lr", "lr_schedule", "weight_decay", "beta2")
    return saved.model.init_from != "scratch" and all(getattr(saved.train, k) == getattr(cfg.train, k)
                                                      for k in recipe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-from", default="gpt2", help="hub name or local Hugging Face GPT-2 folder")
    ap.add_argument("--data", default="shakespeare", help="'shakespeare', a text file or a folder")
    ap.add_argument("--iters", type=int, default=None, help="optimizer steps (default: the preset's 20)")
    ap.add_argument("--block-size", type=int, default=None, help="crop the context (default: the checkpoint's)")
    ap.add_argument("--out", default="out/finetune-gpt2", help="run folder (a fine-tune this script made there is "
                                                               "replaced, another run refused)")
    args = ap.parse_args()
    try:
        preset = load_config("finetune-gpt2-shakespeare")  # configs/finetune-gpt2-shakespeare.toml
        model = preset.model
        model.init_from = args.init_from
        if args.block_size:
            model.block_size = args.block_size
        tc = preset.train
        cfg = RunConfig(
            out_dir=args.out,
            data=DataConfig(path=args.data),  # encoded with the pretrained model's own tokenizer
            model=model,  # the architecture itself comes from the checkpoint
            train=TrainConfig(**{**tc.__dict__, "max_iters": args.iters or tc.max_iters}),
        )
        # model_named: the [model] fields asked for, even where they equal the run defaults (block_size 64, say);
        # the others take the checkpoint's values
        named = fields_named("finetune-gpt2-shakespeare", []) | ({"block_size"} if args.block_size else set())
        replace_run = made_here(args.out, cfg)
        if holds_run(Path(args.out)) and not replace_run:
            sys.exit(f"error: {args.out} holds another training run, which this script would replace: pass --out "
                     f"to fine-tune into another folder")
        result = train(cfg, overwrite=replace_run, model_named=named)
        if result["interrupted"]:  # stopped by Ctrl-C or a stop signal: no final model to report on
            sys.exit(128 + (result["signal"] or 2))  # as a shell reports a command ended by that signal
        print(f"\nval loss {result['val_loss']:.3f} after {result['step']} steps. A sample:\n")
        sample(result["out_dir"], prompt="ROMEO:", max_new_tokens=200, seed=0, out=sys.stdout)
        print(f"\n\nShare it as a Hugging Face folder: fungpt export --run {result['out_dir']} --out hf/finetuned")
    except FunGPTError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
