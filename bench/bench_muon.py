"""One Muon step: FunGPT's float32, batched Muon (fungpt/muon.py) against torch.optim.Muon (bfloat16, one matrix at
a time), on the block matrices of a model shape (default: the speedrun preset's 4 layers x 96).

    python bench/bench_muon.py                      # the speedrun preset's 16 matrices
    python bench/bench_muon.py --layers 6 --width 384 --append BENCHMARKS.md

Each optimizer steps the same random matrices with fixed random gradients (no model, no forward pass): the
median of several passes, each timing --steps steps after 3 warm-up steps. On a CPU without bfloat16 instructions
torch.optim.Muon's Newton-Schulz products run many times slower than in float32; with them (AVX512-BF16) the two
are close, and which wins depends on the shapes and the thread count.
"""

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
from benchlib import check_append, command, machine, publish

from fungpt.muon import Muon


def block_matrices(layers: int, width: int) -> list[torch.nn.Parameter]:
    """c_attn, attn c_proj, c_fc and mlp c_proj of every block, each with a fixed random gradient."""
    gen = torch.Generator().manual_seed(0)
    C = width
    shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * layers
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def ms_per_step(make_optimizer, params, steps: int, passes: int) -> float:
    opt = make_optimizer(params)
    for _ in range(3):  # warm-up: the momentum buffers, the kernels' first calls
        opt.step()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--append", type=Path)
    args = ap.parse_args(argv)
    if min(args.layers, args.width, args.steps, args.passes) < 1:
        ap.error("--layers, --width, --steps and --passes must be at least 1")
    check_append(ap, args.append)
    contenders = {
        # (the same settings on both sides: torch's weight_decay defaults to 0.1, FunGPT's to 0, the presets' value)
        "FunGPT Muon (float32, batched by shape)": lambda ps: Muon(ps, lr=0.03, momentum=0.95, weight_decay=0.0),
        "torch.optim.Muon (bfloat16, per matrix)": lambda ps: torch.optim.Muon(ps, lr=0.03, momentum=0.95,
                                                                              weight_decay=0.0),
    }
    rows = [(name, ms_per_step(make, block_matrices(args.layers, args.width), args.steps, args.passes))
            for name, make in contenders.items()]
    fastest = min(ms for _, ms in rows)
    lines = [f"## Muon step, {datetime.date.today()}", "",
             f"- machine: {machine()}; bfloat16 instructions (AVX512-BF16): "
             f"{'yes' if 'avx512_bf16' in Path('/proc/cpuinfo').read_text(errors='replace') else 'no or unknown'}"
             if Path("/proc/cpuinfo").exists() else f"- machine: {machine()}",
             f"- command: `{command('bench_muon.py', argv)}`",
             f"- matrices: the blocks of {args.layers} x {args.width} ({4 * args.layers} matrices); median of "
             f"{args.passes} passes of {args.steps} steps", "",
             "| optimizer | ms per step | vs fastest |", "|---|---:|---:|"]
    lines += [f"| {name} | {ms:.2f} | {ms / fastest:.2f}x |" for name, ms in rows]
    publish("\n".join(lines) + "\n", args.append)


if __name__ == "__main__":
    main()
