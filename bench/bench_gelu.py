"""GELU on a CPU: the exact one (erf) against GPT-2's tanh approximation, forward and backward, in torch's kernels.

    python bench/bench_gelu.py

At the MLP's hidden activations of two shapes (batch 12: the 4 x 128 model at context 64, the 6 x 384 one at
256), microseconds per call (median of 200 after 20 untimed), and torch.tanh alone on the same tensor: what the
tanh approximation's kernel would cost if its tanh ran as fast as torch.tanh does. On the Intel Xeon of the
thirty-third session the tanh GELU took 3.6-4.6x the exact one's time forward, 2-2.3x backward: why
configs/shakespeare-char-cpu.toml, nanoGPT's recipe, uses the exact GELU (BENCHMARKS.md, "Thirty-third session").
"""

import statistics
import time

import torch
from benchlib import machine


def per_call_us(f, calls: int = 200) -> float:
    for _ in range(20):
        f()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    print(f"- machine: {machine()}")
    print("- command: `python bench/bench_gelu.py`\n")
    print("| (B, T, 4C) | exact forward | tanh forward | exact backward | tanh backward | torch.tanh alone |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in ((12, 64, 512), (12, 256, 1536)):
        print(f"| {shape} | " + " | ".join(f"{u:,.0f} us" for u in times_at(shape)) + " |")
    print("\n(the forwards write into one buffer, `out=`: no allocation timed)")


def times_at(shape: tuple[int, ...]) -> list[float]:
    """Microseconds per call at `shape`: exact and tanh GELU forward, their backwards, torch.tanh."""
    x, g = torch.randn(shape), torch.randn(shape)
    out = torch.empty_like(x)
    return [per_call_us(lambda: torch._C._nn.gelu(x, out=out)),
            per_call_us(lambda: torch._C._nn.gelu(x, approximate="tanh", out=out)),
            per_call_us(lambda: torch.ops.aten.gelu_backward(g, x)),
            per_call_us(lambda: torch.ops.aten.gelu_backward(g, x, approximate="tanh")),
            per_call_us(lambda: torch.tanh(x, out=out))]


if __name__ == "__main__":
    main()
