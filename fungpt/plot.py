"""Loss curves from one or several runs' metrics.jsonl, on one labelled figure."""

from __future__ import annotations

import json
from pathlib import Path

from fungpt.errors import FunGPTError

X_AXES = {  # --x choice: (metrics.jsonl key, axis label)
    "step": ("step", "optimizer step"),
    "tokens": ("tokens", "tokens seen"),
    "time": ("elapsed_s", "wall time (s)"),
}


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """Split a run's metrics.jsonl into (train rows, eval rows). Unreadable lines are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FunGPTError(f"{run_dir} has no metrics.jsonl: pass the out_dir of a training run")
    train, evals = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line from a killed run
        (evals if "val_loss" in row else train).append(row)
    return train, evals


def plot_runs(runs: list[str | Path], out: str | Path, x: str = "step") -> Path:
    """Draw train loss (thin) and val loss (thick, with markers) of every run against `x`."""
    if x not in X_AXES:
        raise FunGPTError(f"--x {x!r} is not valid: choose one of {', '.join(X_AXES)}")
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise FunGPTError(f"--out {out} must end in .png, .svg or .pdf")
    import matplotlib

    matplotlib.use("Agg")  # draw to files; no display needed
    import matplotlib.pyplot as plt

    key, label = X_AXES[x]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for i, run in enumerate(runs):
        train, evals = read_metrics(run)
        color = f"C{i % 10}"
        name = Path(run).name
        tr = [r for r in train if key in r and "train_loss" in r]
        if tr:
            ax.plot([r[key] for r in tr], [r["train_loss"] for r in tr], color=color, alpha=0.35, lw=1,
                    label=f"{name} train")
        ev = [r for r in evals if key in r]
        if ev:
            ax.plot([r[key] for r in ev], [r["val_loss"] for r in ev], color=color, lw=2, marker="o", ms=3,
                    label=f"{name} val")
    ax.set_xlabel(label)
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title("FunGPT loss curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
