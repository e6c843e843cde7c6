"""Where a training step's time goes: torch.profiler over FunGPT's step, grouped by operation.

The step is the trainer's (forward, backward, gradient clipping, the optimizer), on random tokens, with the
same Linear products (`cpu_matmul`) and optimizer as `fungpt train`; no data loading, evals or logging. It
prints the median step time unprofiled, then the operations that take the most time of their own, per step.
The benchmark's MFU says how close the whole step is to the machine's matmul ceiling; this says what the
rest is (BENCHMARKS.md, "Fifteenth session", compares a Zen 4 host with a Zen 5 one this way).

    python bench/profile_step.py                          # nanoGPT's CPU baby shape (bench_train's default)
    python bench/profile_step.py --shape 6,6,384,256 --steps 5
"""

import argparse
import statistics
import time

import torch
from benchlib import machine

from fungpt.config import TrainConfig
from fungpt.hardware import keep_freed_memory
from fungpt.linear import set_cpu_matmul
from fungpt.model import GPT, GPTConfig
from fungpt.train import configure_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4,4,128,64", help="n_layer, n_head, n_embd, block_size")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--vocab-size", type=int, default=65, help="(Tiny Shakespeare's characters)")
    ap.add_argument("--steps", type=int, default=20, help="steps profiled (after as many timed)")
    ap.add_argument("--rows", type=int, default=15, help="operations listed")
    ap.add_argument("--cpu-matmul", default="auto", choices=["auto", "onednn", "torch"])
    args = ap.parse_args()
    n_layer, n_head, n_embd, block_size = (int(v) for v in args.shape.split(","))

    keep_freed_memory()  # as the trainer does on a CPU
    matmul = set_cpu_matmul(args.cpu_matmul)
    torch.manual_seed(0)
    # bench_train's architecture for nanoGPT's recipe: no biases, exact GELU, learned positions
    model = GPT(GPTConfig(vocab_size=args.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd, bias=False, activation="gelu"))
    optimizer = configure_optimizer(model, TrainConfig(device="cpu"), "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randint(0, args.vocab_size, (args.batch_size, block_size))  # (B, T)
    y = torch.randint(0, args.vocab_size, (args.batch_size, block_size))  # (B, T)

    def step() -> None:
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        loss.item()  # the trainer reads the loss every step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # oneDNN builds its kernels, the allocator grows
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"{machine()}; cpu_matmul {matmul}")
    print(f"shape {n_layer} x {n_embd} ({n_head} heads), block {block_size}, batch {args.batch_size}: median step "
          f"{1000 * statistics.median(times):.1f} ms over {args.steps} steps, unprofiled")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:args.rows]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"\nprofiled: {total / 1000 / args.steps:.1f} ms per step (the profiler adds its own)")
    print(f"{'operation':<60} {'ms/step':>8} {'calls/step':>10} {'share':>6}")
    for e in rows:
        print(f"{e.key[:60]:<60} {e.self_cpu_time_total / 1000 / args.steps:8.2f} {e.count / args.steps:10.1f} "
              f"{e.self_cpu_time_total / total:6.1%}")


if __name__ == "__main__":
    main()
