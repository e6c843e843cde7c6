"""Rebuild every figure of docs/walkthrough.md from a small run trained here.

    .venv/bin/python docs/make_figures.py              # trains ~400 steps (under a minute on a CPU)
    .venv/bin/python docs/make_figures.py --steps 2000 # the full shakespeare-char-cpu run, nicer pictures

It trains configs/shakespeare-char-cpu.toml with fewer steps into a temporary folder (Tiny
Shakespeare comes from $FUNGPT_DATA_DIR or is downloaded once), then calls the same functions
as the `fungpt plot`, `attention`, `positions`, `inspect` and `sample --show-probs` commands,
writing into docs/figures/:

    loss.png  attention-grid.png  attention-head.png  positions-sinusoidal.png
    positions-rope.png  positions-learned.png  inspect.txt  show-probs.txt
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
PROMPT = "ROMEO:\nIs it so? Then I defy you, stars!"  # 35 characters, all in Tiny Shakespeare's vocabulary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--out", type=Path, default=FIGURES, help="folder for the figures")
    args = parser.parse_args()

    from fungpt.config import load_config
    from fungpt.inspection import format_report, inspect_target
    from fungpt.plot import plot_runs
    from fungpt.runs import load_run
    from fungpt.sample import sample
    from fungpt.train import train
    from fungpt.viz import attention_maps, plot_attention, plot_positions, token_labels

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "shakespeare-char-cpu.toml")
        steps = args.steps
        cfg = dataclasses.replace(
            cfg, out_dir=str(Path(tmp) / "shakespeare-char-cpu"),
            train=dataclasses.replace(cfg.train, max_iters=steps, eval_interval=max(steps // 8, 1),
                                      checkpoint_interval=steps, warmup_iters=min(cfg.train.warmup_iters, steps // 4),
                                      device="cpu", dtype="float32"))
        print(f"training {steps} steps of configs/shakespeare-char-cpu.toml ...", flush=True)
        if train(cfg, progress=False)["interrupted"]:  # Ctrl-C: figures of a half-trained model would be mislabelled
            sys.exit("make_figures: interrupted before the training ended; no figures written")
        run_dir = Path(cfg.out_dir)

        written = [plot_runs([run_dir], args.out / "loss.png", x="step")]
        loaded = load_run(run_dir, device="cpu")
        ids = loaded.tokenizer.encode(PROMPT)
        weights = attention_maps(loaded.model, ids)  # (n_layer, nh, T, T)
        labels = token_labels(loaded.tokenizer, ids)
        short = ids[:16]  # the grid of all 16 heads is readable with a short prompt
        written.append(plot_attention(attention_maps(loaded.model, short), token_labels(loaded.tokenizer, short),
                                      args.out / "attention-grid.png",
                                      title=f"every head of every layer after {steps} steps (rows: layers)"))
        last = loaded.config.model.n_layer - 1
        written.append(plot_attention(weights, labels, args.out / "attention-head.png", layers=[last], heads=[0],
                                      title=f"layer {last}, head 0: row = query token, column = key token"))
        for kind in ("sinusoidal", "rope"):
            written.append(plot_positions(kind, args.out / f"positions-{kind}.png"))
        written.append(plot_positions("learned", args.out / "positions-learned.png", run=loaded))

        report = format_report(inspect_target(run_dir))
        report = report.replace(str(run_dir), "out/shakespeare-char-cpu")  # not the temporary folder
        (args.out / "inspect.txt").write_text(report + "\n", encoding="utf-8")
        buf = io.StringIO()
        # (its notes name the temporary run folder, gone when this script ends)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sample(run_dir, prompt="ROMEO:", max_new_tokens=20, device="cpu", out=buf, show_probs=True)
        (args.out / "show-probs.txt").write_text(buf.getvalue(), encoding="utf-8")
        written += [args.out / "inspect.txt", args.out / "show-probs.txt"]
    for path in written:
        print(f"wrote {Path(path).relative_to(ROOT) if Path(path).is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    sys.exit(main())
