"""Plot val loss against wall time for FunGPT runs, with nanoGPT's final point, for BENCHMARKS.md.

    python bench/plot_speedrun.py RUN_DIR [RUN_DIR ...] --nanogpt-wall 97.8 --out bench/speedrun.png

Each RUN_DIR is a `fungpt train` out_dir (its metrics.jsonl eval rows give the curve). nanoGPT's
recipe is drawn as its final point (wall time W from /work/shared/anchors/nanogpt-cpu.sh, val
loss 1.8857) with dashed guides at W and W/4 and at the 1.60 target.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NANOGPT_FINAL_VAL = 1.8857  # the recipe's final val loss (deterministic)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--labels", nargs="*", default=None)
    ap.add_argument("--nanogpt-wall", type=float, required=True, help="W: nanoGPT's whole-run wall time (s)")
    ap.add_argument("--out", type=Path, default=Path("bench/speedrun.png"))
    args = ap.parse_args(argv)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(args.runs):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evals = [r for r in rows if "val_loss" in r]
        label = args.labels[i] if args.labels and i < len(args.labels) else run.name
        ax.plot([r["elapsed_s"] for r in evals], [r["val_loss"] for r in evals], marker="o", label=label)
    w = args.nanogpt_wall
    ax.scatter([w], [NANOGPT_FINAL_VAL], marker="*", s=200, color="black", zorder=5,
               label=f"nanoGPT recipe final (W = {w:.0f} s)")
    for x in (w, w / 4):
        ax.axvline(x, color="gray", linestyle="--", linewidth=0.8)
    ax.axhline(1.60, color="red", linestyle=":", linewidth=0.8, label="target at W: 1.60")
    ax.axhline(NANOGPT_FINAL_VAL, color="black", linestyle=":", linewidth=0.8)
    ax.set_xlabel("wall time since the command started (s)")
    ax.set_ylabel("val loss")
    ax.set_ylim(1.4, 2.6)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
