"""Where a training step's time goes: torch.profiler over FunGPT's step, grouped by operation.

The step is the trainer's (forward, backward, gradient clipping, the optimizer), on random tokens, with the
same Linear products (`cpu_matmul`) and optimizer as `fungpt train`; no data loading, evals or logging. It
prints the median step time unprofiled, then the operations that take the most time of their own, per step.
The benchmark's MFU says how close the whole step is to the machine's matmul ceiling; this says what the
rest is (BENCHMARKS.md, "Fifteenth session", compares a Zen 4 host with a Zen 5 one this way).

    python bench/profile_step.py                          # nanoGPT's CPU baby shape (bench_train's default)
    python bench/profile_step.py --shape 6,6,384,256 --steps 5
    python bench/profile_step.py --device cuda --shape 6,6,384,256 --batch-size 64 [--compile]

On a GPU (bfloat16 autocast where the GPU has it, TF32 products, as `fungpt train` runs them) it also times
the same steps without reading the loss back each step: the trainer does (its NaN guard and logs), which makes
the CPU wait for the GPU, so the difference is what that wait costs. Operations are listed by GPU time.
"""

import argparse
import contextlib
import statistics
import time

import torch
from benchlib import machine

from fungpt.config import TrainConfig
from fungpt.errors import FunGPTError
from fungpt.hardware import detect_precision, keep_freed_memory, tf32_products
from fungpt.linear import set_cpu_matmul
from fungpt.model import GPT, GPTConfig
from fungpt.train import configure_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4,4,128,64", help="n_layer, n_head, n_embd, block_size")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--vocab-size", type=int, default=65, help="(Tiny Shakespeare's characters)")
    ap.add_argument("--steps", type=int, default=20, help="steps profiled, after 5 rounds of as many timed")
    ap.add_argument("--rows", type=int, default=15, help="operations listed")
    ap.add_argument("--cpu-matmul", default="auto", choices=["auto", "onednn", "torch"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (as train.compile = true)")
    args = ap.parse_args()
    try:
        n_layer, n_head, n_embd, block_size = (int(v) for v in args.shape.split(","))
    except ValueError:
        ap.error(f"--shape {args.shape!r}: give four whole numbers, n_layer,n_head,n_embd,block_size")
    if min(args.steps, args.batch_size, args.vocab_size, args.rows) < 1:
        ap.error("--steps, --batch-size, --vocab-size and --rows must be at least 1")
    gpu = args.device == "cuda"
    try:
        prec = detect_precision(args.device, "auto")  # float32 on a CPU; bfloat16 (or float16) autocast on a GPU
        GPTConfig(vocab_size=args.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    except FunGPTError as e:
        raise SystemExit(f"error: {e}") from None
    if not gpu:
        keep_freed_memory()  # as the trainer does on a CPU
    matmul = set_cpu_matmul(args.cpu_matmul)
    torch.manual_seed(0)
    # bench_train's architecture for nanoGPT's recipe: no biases, exact GELU, learned positions
    model = GPT(GPTConfig(vocab_size=args.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd, bias=False, activation="gelu")).to(args.device)
    optimizer = configure_optimizer(model, TrainConfig(device=args.device), args.device)
    scaler = torch.amp.GradScaler(args.device, enabled=prec.needs_grad_scaler)
    forward = torch.compile(model) if args.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randint(0, args.vocab_size, (args.batch_size, block_size), device=args.device)  # (B, T)
    y = torch.randint(0, args.vocab_size, (args.batch_size, block_size), device=args.device)  # (B, T)

    def step(read_loss: bool = True) -> None:
        with prec.context():  # as `fungpt train` runs its forward passes
            _, loss = forward(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if read_loss:
            loss.item()  # the trainer reads the loss every step
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def wait() -> None:
        if gpu:
            torch.cuda.synchronize()

    def median_step_ms(read_loss: bool) -> float:
        """Median over 5 rounds of args.steps steps, each timed as a whole (a GPU runs ahead of the CPU)."""
        rounds = []
        for _ in range(5):
            wait()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(read_loss)
            wait()
            rounds.append((time.perf_counter() - t0) / args.steps)
        return 1000 * statistics.median(rounds)

    with tf32_products() if gpu else contextlib.nullcontext():  # as `fungpt train` runs CUDA float32 products
        for _ in range(3):  # oneDNN builds its kernels, the allocator grows, torch.compile compiles
            step()
        print(f"{machine()}; " + (f"{torch.cuda.get_device_name()}, {prec.reason}" if gpu else f"cpu_matmul {matmul}")
              + (", compiled" if args.compile else ""))
        print(f"shape {n_layer} x {n_embd} ({n_head} heads), block {block_size}, batch {args.batch_size}: median step "
              f"{median_step_ms(True):.2f} ms over {args.steps} steps, unprofiled")
        if gpu:
            print(f"the same steps without reading the loss back each step: {median_step_ms(False):.2f} ms")

        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            wait()
    # On a GPU the operations are listed by the GPU time of their kernels, on a CPU by their own CPU time
    own = "self_device_time_total" if gpu else "self_cpu_time_total"
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: getattr(e, own), reverse=True)[:args.rows]
    total = sum(getattr(e, own) for e in events)
    where = "GPU busy" if gpu else "profiled"
    print(f"\n{where}: {total / 1000 / args.steps:.2f} ms per step (the profiler adds its own)")
    print(f"{'operation':<60} {'ms/step':>8} {'calls/step':>10} {'share':>6}")
    for e in rows:
        print(f"{e.key[:60]:<60} {getattr(e, own) / 1000 / args.steps:8.2f} {e.count / args.steps:10.1f} "
              f"{getattr(e, own) / max(total, 1e-9):6.1%}")


if __name__ == "__main__":
    main()
