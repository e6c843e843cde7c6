"""Ablation of the CPU speedrun's modern pieces: add them one at a time to the classic GPT-2 setup.

    python bench/ablate_speedrun.py                         # 300 steps each, the preset's shape
    python bench/ablate_speedrun.py --steps 600 --append BENCHMARKS.md

Every variant trains the speedrun shape (configs/speedrun-cpu.toml: 4 x 96, block 128, batch 16)
for the same number of steps with the same lr schedule on steps (not on time, so the loss column
is independent of machine load), and reports the final val loss over the entire val split and the
median ms/step (which does depend on load: compare rows of one run only). The rows are cumulative:
each adds one piece to the row above, up to the speedrun preset; the variants after it change one thing of the
preset.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib
from benchlib import check_append, command, machine, publish

ROOT = Path(__file__).resolve().parents[1]

# The classic setup, with the earlier preset's AdamW lr and Muon's usual momentum (tuned in the last rows)
CLASSIC = ["--model.pos-encoding", "learned", "--model.norm", "layernorm", "--model.no-qk-norm",
           "--model.activation", "gelu_tanh", "--model.tie-embeddings", "--train.optimizer", "adamw",
           "--train.lr", "4e-3", "--train.muon-momentum", "0.95"]
STEPS = [  # (row name, flags that turn the piece on), cumulative
    ("classic GPT-2 (learned positions, LayerNorm, GELU, tied head), AdamW", []),
    ("+ RoPE (Su et al. 2021)", ["--model.pos-encoding", "rope"]),
    ("+ QK-norm (Dehghani et al. 2023; LayerNorm per head)", ["--model.qk-norm"]),
    ("+ ReLU^2 (So et al. 2021, Primer)", ["--model.activation", "relu2"]),
    ("+ untied output head", ["--model.no-tie-embeddings"]),
    ("+ Muon for the block matrices (Jordan et al. 2024), momentum 0.95", ["--train.optimizer", "muon"]),
    ("+ Muon momentum 0.9 and AdamW lr 8e-3 (tuned for short runs) = speedrun preset",
     ["--train.muon-momentum", "0.9", "--train.lr", "8e-3"]),
]
VARIANTS = [  # (row name, flags), each applied to the preset alone
    ("preset with RMSNorm (Zhang & Sennrich 2019) instead of LayerNorm", ["--model.norm", "rmsnorm"]),
    ("preset with cpu_matmul = torch (torch's BLAS, MKL) instead of auto", ["--train.cpu-matmul", "torch"]),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--append", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.steps < 10:
        ap.error("--steps must be at least 10: the median step time is taken over steps 10 and later")
    check_append(ap, args.append)
    with tempfile.TemporaryDirectory(prefix="fungpt-ablate-") as tmp:  # the runs: removed at the end
        return measure(args, argv, Path(tmp))


def measure(args: argparse.Namespace, argv: list[str] | None, tmp: Path) -> int:
    """The runs of main, in tmp; prints (and appends) the result block."""
    env = benchlib.run_env()  # (this checkout's fungpt; ../shared/data unless FUNGPT_DATA_DIR is set)
    flags: list[str] = list(CLASSIC)
    runs = []
    for name, extra in STEPS:
        flags = flags + extra
        runs.append((name, flags))
    runs += [(name, flags + extra) for name, extra in VARIANTS]  # flags is the preset's by now
    rows = []
    for name, run_flags in runs:
        out = tmp / "run"
        cmd = [sys.executable, "-m", "fungpt", "train", "--config", str(ROOT / "configs/speedrun-cpu.toml"),
               "--out-dir", str(out), "--overwrite", "--train.max-minutes", "None",
               "--train.max-iters", str(args.steps), "--train.lr-decay-iters", str(args.steps),
               "--train.warmup-iters", str(max(1, args.steps // 50)), "--train.log-interval", "1", *run_flags]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:  # fungpt's own message says what is wrong
            raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        val = [r["val_loss"] for r in metrics if "val_loss" in r][-1]
        ms = statistics.median(r["dt_ms"] for r in metrics if "dt_ms" in r and r["step"] >= 10)
        shape = step_shape(out)  # (the preset's, as this run resolved it: the file may have been edited)
        rows.append(f"| {name} | {val:.4f} | {ms:.0f} | {shape['tokens'] / ms * 1000:,.0f} |")
        print(rows[-1], flush=True)
    text = (f"## speedrun ablation, {datetime.date.today()}\n\n"
            f"- machine: {machine()}\n"
            f"- command: `{command('ablate_speedrun.py', argv)}`\n"
            f"- {args.steps} steps each (schedule on steps), batch {shape['batch']}, block {shape['block']}, "
            f"{shape['layers']} x {shape['width']}; val over the whole split; "
            f"1-min load average at the end: {os.getloadavg()[0]:.1f}\n\n"
            "| variant (cumulative) | val loss | median ms/step | tokens/s |\n|---|---:|---:|---:|\n"
            + "\n".join(rows) + "\n")
    publish(text, args.append)
    return 0


def step_shape(out: Path) -> dict:
    """The shape a run in `out` trained, from the config.json it saved: tokens per step and the model's size."""
    cfg = json.loads((out / "config.json").read_text())
    model, train = cfg["model"], cfg["train"]
    return {"batch": train["batch_size"], "block": model["block_size"], "layers": model["n_layer"],
            "width": model["n_embd"], "tokens": train["batch_size"] * model["block_size"] * train["grad_accum_steps"]}


if __name__ == "__main__":
    sys.exit(main())
