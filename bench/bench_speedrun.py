"""CPU speedrun, side by side: nanoGPT's CPU recipe gives W, then FunGPT's preset runs on budgets of W.

    python bench/bench_speedrun.py                                   # budgets W/4 and W (the targets)
    python bench/bench_speedrun.py --fractions 0.125 0.25 0.5 1 --plot bench/speedrun.png --append BENCHMARKS.md

One script, one machine, one after the other, so both sides see the same machine speed:
1. nanoGPT's CPU recipe, run exactly as ../shared/anchors/nanogpt-cpu.sh runs it (same files, same
   flags; $NANOGPT_DIR points elsewhere), but keeping its log for the curve: the wall time of its
   train.py is W, its final val loss is always 1.8857;
2. `fungpt train --config configs/speedrun-cpu.toml --train.max-minutes W*f/60` for every fraction f.
   The budget covers the whole command (imports, data, training, final eval); the final val loss is
   over the entire val split. Reported: steps, final val loss, the command's own wall time.
The plot shows the final val loss of each budget against its wall time (each point a complete run),
and nanoGPT's evals (every 250 steps) placed by their step's share of its whole wall time W (start-up
included: nanoGPT logs no clock time).
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import ANCHORS, check_append, command, cpu_times, machine, machine_state, memory_read_gbs, publish

ROOT = Path(__file__).resolve().parents[1]
NANOGPT_DIR = Path(os.environ.get("NANOGPT_DIR", ANCHORS / "nanoGPT"))
# nanogpt-cpu.sh's flags for nanoGPT's README CPU recipe (keep in step with that script)
NANOGPT_FLAGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                 "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                 "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_FINAL_VAL = 1.8857  # the recipe's final val loss (deterministic)
TARGETS = {1.0: 1.60, 0.25: NANOGPT_FINAL_VAL}  # the targets: <= 1.60 at W, <= 1.8857 at W/4


def run(cmd: list[str], env: dict) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/speedrun-cpu.toml"))
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 1.0], help="budgets as fractions of W")
    ap.add_argument("--wall", type=float, default=None, help="use this W instead of running nanoGPT (not side by side)")
    ap.add_argument("--plot", type=Path, default=None, help="write the val-vs-wall-time plot here")
    ap.add_argument("--append", type=Path, default=None)
    ap.add_argument("extra", nargs="*", help="extra `fungpt train` flags (after --)")
    args = ap.parse_args(argv)
    if args.wall is None and not (NANOGPT_DIR / "train.py").is_file():
        ap.error(f"nanoGPT is not at {NANOGPT_DIR}: set NANOGPT_DIR, or give its wall time with --wall")
    if any(f <= 0 for f in args.fractions) or (args.wall is not None and args.wall <= 0):
        ap.error("--fractions and --wall must be positive")
    check_append(ap, args.append)
    with tempfile.TemporaryDirectory(prefix="fungpt-speedrun-") as tmp:  # the runs: removed at the end
        return measure(args, argv, Path(tmp))


def measure(args: argparse.Namespace, argv: list[str] | None, tmp: Path) -> int:
    """The runs of main, in tmp; prints (and appends) the result block."""
    env = benchlib.run_env()  # (this checkout's fungpt; ../shared/data unless FUNGPT_DATA_DIR is set)
    loads, read_gbs, steal_from = [os.getloadavg()[0]], [memory_read_gbs()], cpu_times()
    curve: list[tuple[float, float]] = []
    if args.wall is None:
        w, ref_val, ref_ms, curve = run_nanogpt(tmp, env)
        ref_row = (f"| nanoGPT CPU recipe (as `nanogpt-cpu.sh`) | - | 2000 | {ref_val:.4f} (its estimate: 20 random "
                   f"batches) | W = {w:.1f} s ({ref_ms:.1f} ms/iter) |")
    else:
        w, ref_row = args.wall, (f"| nanoGPT CPU recipe | - | - | {NANOGPT_FINAL_VAL} (its estimate: 20 random "
                                 f"batches) | W = {args.wall:.1f} s (given) |")

    rows, points, full = [], [], []
    for f in sorted(args.fractions):
        loads.append(os.getloadavg()[0])
        read_gbs.append(memory_read_gbs())
        out_dir = tmp / f"sr-{f:g}"
        cmd = [sys.executable, "-m", "fungpt", "train", "--config", args.config, "--out-dir", str(out_dir),
               "--overwrite", "--train.max-minutes", f"{w * f / 60:.5f}", *args.extra]
        _, wall = run(cmd, env)
        metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        final = [r for r in metrics if "val_loss" in r][-1]
        target = TARGETS.get(f)
        met = target is not None and final["val_loss"] <= target
        verdict = "" if target is None else f" (target <= {target}: {'met' if met else 'NOT met'})"
        rows.append(f"| `{Path(args.config).name}`, max_minutes = {f:g} W | {w * f:.1f} s | {final['step']} | "
                    f"**{final['val_loss']:.4f}**{verdict} | {wall:.1f} s |")
        points.append((wall, final["val_loss"], f))
        matmul = json.loads((out_dir / "run.json").read_text()).get("cpu_matmul")
        # (the preset scores the final val loss over the entire split; a config or flag may not)
        full.append(json.loads((out_dir / "config.json").read_text())["train"].get("eval_full_val", False))
        print(rows[-1], flush=True)

    side = "side by side" if args.wall is None else "against a given W"
    text = (f"## CPU speedrun, {side}, {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n"
            f"- machine: {machine()}; FunGPT's cpu_matmul: {matmul}; "
            f"1-min load average before each run: {', '.join(f'{x:.1f}' for x in loads)}; "
            f"{machine_state(read_gbs, 'before each run', steal_from)}\n"
            f"- command: `{command('bench_speedrun.py', argv)}`\n"
            f"- FunGPT's final val loss is {scored(full)} (nanoGPT's over its own 20 random batches); each "
            f"FunGPT budget covers its whole command\n\n"
            "| run | budget | steps | final val | command wall |\n|---|---:|---:|---:|---:|\n"
            + ref_row + "\n" + "\n".join(rows) + "\n")
    publish(text, args.append)
    if args.plot:
        plot(points, curve, w, args.plot, all(full))
    return 0


def scored(full: list[bool]) -> str:
    """What the FunGPT runs' final val losses were computed over: train.eval_full_val of each run's config.json."""
    if all(full):
        return "over the entire val split"
    if not any(full):
        return "an estimate over eval_iters random val batches (train.eval_full_val = false)"
    return "over the entire val split in some runs and random batches in others (train.eval_full_val differs)"


def run_nanogpt(tmp: Path, env: dict) -> tuple[float, float, float, list[tuple[float, float]]]:
    """nanoGPT's CPU recipe in a scratch copy; returns W, final val, median ms/iter, [(seconds, val loss)]."""
    import importlib.util
    import shutil
    import statistics

    if importlib.util.find_spec("requests") is None:  # nanoGPT's prepare.py imports it (as nanogpt-cpu.sh does)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "requests"], check=True)
    work = tmp / "nanoGPT"
    shutil.copytree(NANOGPT_DIR, work)
    data = Path(env["FUNGPT_DATA_DIR"]) / "tinyshakespeare.txt"
    shutil.copy(data, work / "data/shakespeare_char/input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=work / "data/shakespeare_char", check=True,
                   capture_output=True, env=env)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *NANOGPT_FLAGS, f"--out_dir={work / 'out'}"], cwd=work,
                          capture_output=True, text=True, env=env)
    w = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"nanoGPT failed ({proc.returncode}):\n{log[-3000:]}")
    evals = [(int(s), float(v)) for s, v in re.findall(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", log, re.M)]
    ms = [float(t) for i, t in re.findall(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", log, re.M) if int(i) >= 20]
    # nanoGPT logs no clock time: place each eval at its share of the run's wall time by step
    curve = [(w * step / 2000, val) for step, val in evals]
    return w, evals[-1][1], statistics.median(ms), curve


def plot(points: list[tuple[float, float, float]], curve: list[tuple[float, float]], w: float, out: Path,
         full: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
            label=f"FunGPT speedrun preset: final val ({'entire split' if full else 'random val batches'}) of a "
                  f"run given that budget")
    for wall, val, f in points:
        ax.annotate(f"{f:g} W", (wall, val), textcoords="offset points", xytext=(5, 5), fontsize=8)
    curve = [c for c in curve if c[1] < 2.6]  # leave out the random-init point (~4.2) so the axis stays readable
    if curve:
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker=".", color="gray",
                label="nanoGPT CPU recipe: its evals (20 val batches), placed by step on its wall time")
    ax.scatter([w], [NANOGPT_FINAL_VAL], marker="*", s=200, color="black", zorder=5,
               label=f"nanoGPT CPU recipe, final (W = {w:.0f} s)")
    for x in (w, w / 4):
        ax.axvline(x, color="gray", linestyle="--", linewidth=0.8)
    ax.axhline(1.60, color="red", linestyle=":", linewidth=0.8, label="target at W: 1.60")
    ax.axhline(NANOGPT_FINAL_VAL, color="black", linestyle=":", linewidth=0.8, label="target at W/4: 1.8857")
    ax.set(xlabel="wall time of the whole command (s)", ylabel="val loss",
           title="Tiny Shakespeare char, 2-core CPU, side by side")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
