"""Training throughput: FunGPT's trainer against nanoGPT's CPU recipe, side by side, interleaved.

    python bench/bench_train.py                                 # baby shape: 4 x 128, block 64, batch 12
    python bench/bench_train.py --append BENCHMARKS.md
    python bench/bench_train.py --shape 6,6,384,256 --iters 40      # both sides: layers, heads, width, block
    python bench/bench_train.py --rounds 4 --turns 1 --bf16         # and FunGPT with bfloat16 products
    python bench/bench_train.py --no-reference -- --model.n-layer 6 ...   # extra flags go to fungpt train

Each round runs `fungpt train` (the real command, logging every step) and then nanoGPT's recipe
(../shared/anchors/nanogpt-cpu.sh beside the checkout, or $NANOGPT_CPU_SH) for --iters steps, as separate
processes, one after the other, so machine load hits both alike. Reported per contender: the
median ms/iter from the 21st step on (nanoGPT's script uses the same cut) and over rounds, tokens/s,
MFU against this machine's fp32 matmul ceiling (measured by this script, in the same run), and
the peak resident memory of the command (started by peak_rss.py, so that it is the command's own
and not this script's; the largest over the rounds). The FunGPT side is given nanoGPT's architecture
(bias = false, exact GELU) unless --keep-arch, so that both do the same arithmetic. A step's time is its
loop's whole period on both sides: nanoGPT's `dt` runs from one iteration's start to the next; FunGPT's is the
time between consecutive rows of metrics.jsonl (its `dt_ms` leaves out the row's writing, the progress bar and
the loop's checks, about 2% of the baby step).

--bf16 adds a third contender: FunGPT with train.dtype = "bfloat16", whose Linear products run in bfloat16
(the rest float32; fungpt/linear.py). nanoGPT's CPU recipe has no such mode, so its line is labelled apart,
and its MFU is quoted against the bfloat16 matmul ceiling, measured in the same run.

--turns S runs each round's commands at once but never together: they take turns of S seconds
(the one waiting is paused with SIGSTOP; Linux). On a host whose speed swings within seconds, both
then meet the same swings. FunGPT is given 4x --iters steps and stopped when nanoGPT's recipe ends,
so neither runs alone; its median is over the steps it made. The medians ignore the few steps that a
pause cuts in two, so S should be many steps long (1 s for the baby shape).
"""

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import torch
from benchlib import ANCHORS, check_append, command, cpu_times, machine, machine_state, memory_read_gbs, publish

ROOT = Path(__file__).resolve().parents[1]
NANOGPT_SH = Path(os.environ.get("NANOGPT_CPU_SH", ANCHORS / "nanogpt-cpu.sh"))
NANOGPT_RECIPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "vocab_size": 65, "dropout": 0.0,
                  "batch_size": 12, "grad_accum_steps": 1}
"""nanoGPT's CPU recipe as nanogpt-cpu.sh runs it (--shape changes its first four for both sides)."""


PEAK_RSS = ROOT / "bench/peak_rss.py"


def launched(cmd: list[str], rss_file: Path) -> list[str]:
    """cmd started by peak_rss.py, which writes its peak RSS (KiB) to rss_file: a command started from this
    script directly would report at least this script's own size (see peak_rss.py)."""
    return [sys.executable, "-S", str(PEAK_RSS), str(rss_file), *cmd]


def read_peak_mib(rss_file: Path) -> float:
    return int(rss_file.read_text()) / 1024


def group_peak_mib(pgid: int) -> float:
    """The largest peak RSS (VmHWM) among the live processes of a process group, in MiB (Linux /proc), for a
    command about to be killed, which peak_rss.py cannot report on. 0.0 if none is found."""
    peak = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
            if int(fields[2]) != pgid:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))  # kB
    return peak / 1024


def run_measured(cmd: list[str], env: dict) -> tuple[str, float, float]:
    """Run cmd; return (stdout+stderr, wall seconds, peak RSS in MiB of the command and its children)."""
    with tempfile.TemporaryDirectory(prefix="fungpt-rss-") as d:
        rss_file = Path(d) / "peak"
        t0 = time.perf_counter()
        # A process group of its own, killed whole if this script stops early (Ctrl-C): the launcher and the
        # command both, not the launcher alone
        proc = subprocess.Popen(launched(cmd, rss_file), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate()
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
        return out, wall, read_peak_mib(rss_file)


def run_taking_turns(cmds: list[list[str]], env: dict, turn_s: float, lead: int) -> list[tuple[str, float]]:
    """Start all cmds, but let only one run at a time, for turn_s seconds each in a cycle, until cmds[lead] ends;
    the others are then stopped (killed), so that none of them ran without the lead. Each runs in a process group
    of its own, paused and resumed whole (SIGSTOP, SIGCONT). Returns (stdout+stderr so far, peak RSS in MiB)
    per command; a killed command's peak is the one it had reached when it was stopped. A command that fails,
    Ctrl-C or SIGTERM kill all of them: nothing is left paused behind."""

    def interrupted(signum, frame):
        raise SystemExit(128 + signum)

    old_handlers = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    logs = [tempfile.TemporaryFile(mode="w+") for _ in cmds]  # files, not pipes: a full pipe would block a step
    rss_dir = tempfile.TemporaryDirectory(prefix="fungpt-rss-")
    rss_files = [Path(rss_dir.name) / f"peak-{i}" for i in range(len(cmds))]
    procs: list[subprocess.Popen] = []
    results: dict[int, tuple[str, float]] = {}

    def reap(i: int, status: int, peak_mib: float | None = None) -> None:
        """Record command i's output and peak RSS: peak_rss.py's, or peak_mib for a command that was killed."""
        procs[i].returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
        logs[i].seek(0)
        out = logs[i].read()
        if procs[i].returncode != 0 and peak_mib is None:
            raise SystemExit(f"command failed ({procs[i].returncode}): {' '.join(cmds[i])}\n{out[-3000:]}")
        results[i] = (out, read_peak_mib(rss_files[i]) if peak_mib is None else peak_mib)

    try:
        for cmd, log, rss_file in zip(cmds, logs, rss_files):
            procs.append(subprocess.Popen(launched(cmd, rss_file), stdout=log, stderr=subprocess.STDOUT, env=env,
                                          text=True, start_new_session=True))
            os.killpg(procs[-1].pid, signal.SIGSTOP)
        while lead not in results:
            for i, proc in enumerate(procs):
                if proc.returncode is not None:
                    continue
                os.killpg(proc.pid, signal.SIGCONT)
                alone = sum(p.returncode is None for p in procs) == 1  # only the lead is left
                end = time.monotonic() + turn_s
                while True:
                    pid, status, _ = os.wait4(proc.pid, 0 if alone else os.WNOHANG)
                    if pid:
                        reap(i, status)
                        break
                    left = end - time.monotonic()
                    if left <= 0:
                        os.killpg(proc.pid, signal.SIGSTOP)
                        break
                    time.sleep(min(left, 0.02))  # coarse: every wake-up takes a core from the contender
                if lead in results:
                    break
        for i, proc in enumerate(procs):  # the lead has ended: stop the others where they are
            if proc.returncode is None:
                peak = group_peak_mib(proc.pid)  # its peak so far: read while it is paused, before the kill
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, _ = os.wait4(proc.pid, 0)
                reap(i, status, peak)
    finally:
        for proc in procs:
            if proc.returncode is None:  # failed or interrupted: leave nothing paused or running behind
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in logs:
            log.close()
        rss_dir.cleanup()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    return [results[i] for i in range(len(procs))]


# What nanoGPT's recipe computes besides its shape: float32 (nullcontext on a CPU), uncompiled (--compile=False),
# AdamW, GPT-2's layers (learned positions, LayerNorm, a tied head, no QK-norm) and, as this bench sets them unless
# --keep-arch, no biases and exact GELU. FunGPT in bfloat16, with Muon or RoPE, ran another computation.
NANOGPT_ARITHMETIC = {"dtype": "float32", "compile": False, "optimizer": "adamw", "pos_encoding": "learned",
                      "norm": "layernorm", "tie_embeddings": True, "qk_norm": False}
NANOGPT_LAYERS = {"bias": False, "activation": "gelu"}


def check_same_shape(run_dir: Path, shape: str | None, keep_arch: bool = False, bf16: bool = False) -> None:
    """Stop when FunGPT's run (its config, flags after --) trained another model or batch than nanoGPT's recipe
    (Tiny Shakespeare's 65 characters, no dropout), or another computation (NANOGPT_ARITHMETIC: the dtype that
    ran, from run.json): the ratio would compare two different things (--shape sets the shape for both sides).
    bf16: the run that --bf16 adds, whose Linear products are in bfloat16 (its report line says so)."""
    cfg = json.loads((run_dir / "config.json").read_text())
    ran = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    settings = {**cfg["model"], **cfg["train"], "dtype": ran.get("dtype", cfg["train"].get("dtype"))}
    theirs = {**NANOGPT_RECIPE, **NANOGPT_ARITHMETIC, **({} if keep_arch else NANOGPT_LAYERS)}
    if bf16:
        theirs["dtype"] = "bfloat16"
    if shape:
        theirs.update(zip(("n_layer", "n_head", "n_embd", "block_size"), map(int, shape.split(","))))
    differ = [f"{k} {settings.get(k)} ({'--bf16' if bf16 and k == 'dtype' else 'nanoGPT'}: {theirs[k]})"
              for k in theirs if settings.get(k) != theirs[k]]
    if differ:
        raise SystemExit(f"bench_train: FunGPT trained another model, batch or computation than nanoGPT's recipe "
                         f"({', '.join(differ)}): set the shape of both with --shape L,H,C,T, keep nanoGPT's batch "
                         f"of 12, its characters, no dropout, float32, AdamW and GPT-2's layers, or pass "
                         f"--no-reference")


def peak_flops(dtype: torch.dtype) -> float:
    from fungpt.train import measure_peak_flops

    return max(measure_peak_flops("cpu", dtype) for _ in range(3))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/shakespeare-char-cpu.toml"))
    ap.add_argument("--iters", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true", help="skip nanoGPT")
    ap.add_argument("--keep-arch", action="store_true", help="keep the config's architecture (bias, activation)")
    ap.add_argument("--append", type=Path, default=None)
    ap.add_argument("--shape", default=None, help="L,H,C,T: n_layer, n_head, n_embd, block_size for both sides "
                    "(default: the config's, nanoGPT's 4,4,128,64)")
    ap.add_argument("--turns", type=float, default=0.0, metavar="S",
                    help="run FunGPT and nanoGPT at once, taking turns of S seconds (0: one after the other)")
    ap.add_argument("--bf16", action="store_true", help="also run FunGPT with train.dtype = 'bfloat16': its Linear "
                    "products in bfloat16, the rest float32 (nanoGPT's CPU recipe has no such mode)")
    ap.add_argument("extra", nargs="*", help="extra `fungpt train` flags (after --)")
    args = ap.parse_args(argv)
    if args.turns < 0:
        ap.error("--turns must be >= 0 (0: one command after the other)")
    if args.iters < 21 or args.rounds < 1:
        ap.error("--iters must be at least 21 (the medians are over steps 20 and later) and --rounds at least 1")
    if args.shape is not None and not re.fullmatch(r"\d+,\d+,\d+,\d+", args.shape):
        ap.error(f"--shape {args.shape!r}: give four whole numbers, n_layer,n_head,n_embd,block_size (e.g. 4,4,128,64)")
    if not args.no_reference and not NANOGPT_SH.is_file():
        ap.error(f"nanoGPT's runner is not at {NANOGPT_SH}: set NANOGPT_CPU_SH, or pass --no-reference")
    check_append(ap, args.append)
    with tempfile.TemporaryDirectory(prefix="fungpt-bench-") as tmp:  # runs and scratch copies: removed at the end
        return measure(args, argv, Path(tmp))


def loop_periods_ms(rows: list[dict]) -> list[float]:
    """The ms of each FunGPT step from the 21st on as a whole loop iteration, as nanoGPT's dt: from the previous
    step's row in metrics.jsonl (logged every step) to its own. A step after an eval row (or a missing row) is left
    out. (FunGPT's step s is nanoGPT's iter s - 1, which counts from 0: its cut, iter >= 20, is step >= 21.)"""
    return [1000 * (r["elapsed_s"] - q["elapsed_s"]) for q, r in zip(rows, rows[1:])
            if "dt_ms" in q and "dt_ms" in r and r["step"] == q["step"] + 1 and r["step"] >= 21]


def measure(args: argparse.Namespace, argv: list[str] | None, tmp: Path) -> int:
    """The rounds of main, with their runs in tmp; prints (and appends) the result block."""
    py = sys.executable
    env = benchlib.run_env()  # (this checkout's fungpt; ../shared/data unless FUNGPT_DATA_DIR is set)
    env["TMPDIR"] = str(tmp)  # nanogpt-cpu.sh's scratch copy goes here too, also when --turns kills it
    arch = [] if args.keep_arch else ["--model.no-bias", "--model.activation", "gelu"]
    ref_shape: list[str] = []
    if args.shape:
        n_layer, n_head, n_embd, block = (int(v) for v in args.shape.split(","))
        arch += ["--model.n-layer", str(n_layer), "--model.n-head", str(n_head), "--model.n-embd", str(n_embd),
                 "--model.block-size", str(block)]
        ref_shape = [f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}", f"--block_size={block}"]
    fungpt_runs = {"FunGPT": tmp / "run"}  # contender -> its run folder
    if args.bf16:
        fungpt_runs["FunGPT, bf16 products"] = tmp / "run-bf16"

    def fungpt_cmd(name: str, turns: bool) -> list[str]:
        cmd = [py, "-m", "fungpt", "train", "--config", args.config, "--out-dir", str(fungpt_runs[name]),
               "--overwrite", "--train.max-iters", str(args.iters), "--train.log-interval", "1",
               "--train.eval-interval", str(args.iters), "--train.checkpoint-interval", str(10 * args.iters),
               "--train.device", "cpu", *arch, *args.extra, *(["--train.dtype", "bfloat16"] if "bf16" in name else [])]
        # taking turns: steps to spare, no eval or checkpoint before it is stopped (later flags win)
        return cmd + (["--train.max-iters", str(4 * args.iters), "--train.eval-interval", str(40 * args.iters)]
                      if turns else [])

    ms: dict[str, list[float]] = {**{name: [] for name in fungpt_runs}, "nanoGPT": []}
    fungpt_steps: dict[str, list[int]] = {name: [] for name in fungpt_runs}  # steps per round (more with --turns)
    rss: dict[str, float] = dict.fromkeys(ms, 0.0)
    loads, read_gbs = [], []
    flops = peak_flops(torch.float32)
    flops_bf16 = peak_flops(torch.bfloat16) if args.bf16 else 0.0
    steal_from = cpu_times()
    for round_index in range(args.rounds):
        loads.append(os.getloadavg()[0])
        read_gbs.append(memory_read_gbs())  # the machine's state at the round's start
        nano_cmd = ["bash", str(NANOGPT_SH), py, f"--max_iters={args.iters}", *ref_shape]
        if args.turns and not args.no_reference:
            # FunGPT, the faster, gets steps to spare and is stopped when nanoGPT ends: every step of both ran
            # in the same stretch of time
            cmds = [fungpt_cmd(name, True) for name in fungpt_runs] + [nano_cmd]
            results = run_taking_turns(cmds, env, args.turns, lead=len(cmds) - 1)
            mems = [mem for _, mem in results[:-1]]
            out, nano_mem = results[-1]
        else:  # one after the other, nanoGPT first in every other round (the first run of a round may find the
            # caches and the host's clock otherwise than the second)
            nano_first = round_index % 2 == 1 and not args.no_reference
            if nano_first:
                out, _, nano_mem = run_measured(nano_cmd, env)
            mems = [run_measured(fungpt_cmd(name, False), env)[2] for name in fungpt_runs]
            if not args.no_reference and not nano_first:
                out, _, nano_mem = run_measured(nano_cmd, env)
        for (name, run_dir), mem in zip(fungpt_runs.items(), mems):
            if not args.no_reference:
                check_same_shape(run_dir, args.shape, args.keep_arch, bf16="bf16" in name)
            lines = (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]  # whole lines: a stopped run may cut one
            rows = [json.loads(line) for line in lines]
            steps = loop_periods_ms(rows)
            if not steps:  # (taking turns, nanoGPT ended before FunGPT's 21st step: nothing after the warm-up to time)
                raise SystemExit("bench_train: FunGPT made fewer than 21 steps in a round, the warm-up that is not "
                                 "timed: raise --iters")
            ms[name].append(statistics.median(steps))
            fungpt_steps[name].append(len(steps) + 20)
            if args.turns and not args.no_reference and rows[-1]["step"] >= 4 * args.iters:
                raise SystemExit(f"bench_train: {name} made all its {4 * args.iters} steps before nanoGPT's recipe "
                                 f"ended, which then ran alone: raise --iters")
            rss[name] = max(rss[name], mem)
        if not args.no_reference:
            m = re.search(r"median_ms_per_iter=([\d.]+)", out)
            if m is None:  # (its runner prints the median at its end: a nanoGPT that stopped early has none)
                raise SystemExit(f"bench_train: nanoGPT's run printed no median_ms_per_iter; its output ended:\n"
                                 f"{out[-2000:]}")
            ms["nanoGPT"].append(float(m.group(1)))
            rss["nanoGPT"] = max(rss["nanoGPT"], nano_mem)
    state = machine_state(read_gbs, "at each round's start", steal_from)
    flops = max(flops, peak_flops(torch.float32))
    if args.bf16:
        flops_bf16 = max(flops_bf16, peak_flops(torch.bfloat16))

    run_cfg = json.loads((tmp / "run/config.json").read_text())
    run_info = json.loads((tmp / "run/run.json").read_text())
    m, t = run_cfg["model"], run_cfg["train"]
    from fungpt.model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(m))
    tokens = t["batch_size"] * m["block_size"] * t["grad_accum_steps"]
    lines = []
    for name, values in ms.items():
        if not values:
            continue
        med = statistics.median(values)
        tok_s = tokens / (med / 1000)
        mfu = model.flops_per_token() * tok_s / (flops_bf16 if "bf16" in name else flops)
        lines.append(f"| {name} | {med:.1f} | {', '.join(f'{v:.1f}' for v in values)} | {tok_s:,.0f} | "
                     f"{mfu:.1%} | {rss[name]:.0f} |")
    ratio = "\n" if ms["nanoGPT"] else ""
    for name in fungpt_runs if ms["nanoGPT"] else ():
        speedup = statistics.median(ms["nanoGPT"]) / statistics.median(ms[name])
        per_round = ", ".join(f"{n / f:.2f}x" for f, n in zip(ms[name], ms["nanoGPT"]))
        ratio += f"- {name} speed-up over nanoGPT: **{speedup:.2f}x** (per round: {per_round})\n"
    text = (f"## training throughput, {datetime.date.today()}\n\n"
            f"- machine: {machine()}; FunGPT's cpu_matmul: {run_info.get('cpu_matmul')}; fp32 matmul ceiling "
            f"(the faster of torch's BLAS and oneDNN) measured in this run: {flops / 1e9:.0f} GFLOP/s; "
            + (f"bf16 matmul ceiling (the MFU of the bf16 products run): {flops_bf16 / 1e9:.0f} GFLOP/s; "
               if args.bf16 else "") +
            f"1-min load average at each round's start: {', '.join(f'{x:.1f}' for x in loads)}; {state}\n"
            f"- command: `{command('bench_train.py', argv)}`\n"
            f"- shape: {m['n_layer']} x {m['n_embd']} ({m['n_head']} heads), block {m['block_size']}, batch "
            f"{t['batch_size']}, bias {m['bias']}, {m['activation']}, {m['pos_encoding']}, {m['norm']}, "
            f"{run_info.get('dtype')}, {t['optimizer']}{', compiled' if t['compile'] else ''}; "
            f"{args.iters} steps per run, {args.rounds} interleaved rounds"
            + (f"; within each round the commands take turns of {args.turns:g} s, FunGPT stopped when nanoGPT "
               f"ends (after {'; '.join(', '.join(map(str, v)) for v in fungpt_steps.values())} steps)"
               if args.turns and not args.no_reference
               else "") + "\n\n"
            "| contender | median ms/iter | per round | tokens/s | MFU | peak RSS MiB |\n"
            "|---|---:|---|---:|---:|---:|\n" + "\n".join(lines) + "\n" + ratio)
    publish(text, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
