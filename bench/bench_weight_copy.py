"""Decoding's copies of the weights (W^T, for the row sums of fungpt/linear.py) against checks that would let them
be kept between generations: what `Linear._row_table` costs once per generation, and why it copies.

    python bench/bench_weight_copy.py

Per generation, for the 24 block matrices of the 6 x 384 model: the W^T copies each generation makes, against the
sum of the weights' bits that once keyed a kept copy (blind to rows or columns swapped in place through .data),
and a check that would see swaps too (row sums and column sums of the bits, each weighted by its position).
Milliseconds per generation, 3 passes of 5 repetitions.
"""

import time

import torch


def weighted(w: torch.Tensor) -> tuple[int, int]:
    b = w.view(torch.int32)
    r, c = b.sum(1, dtype=torch.int64), b.sum(0, dtype=torch.int64)
    return int((r * torch.arange(1, r.numel() + 1)).sum()), int((c * torch.arange(1, c.numel() + 1)).sum())


def main() -> None:
    ws = [torch.randn(n, k) for _ in range(6) for n, k in ((1152, 384), (384, 384), (1536, 384), (384, 1536))]
    tasks = {"copy W^T": lambda w: w.t().contiguous(),
             "sum of bits": lambda w: int(w.view(torch.int32).sum(dtype=torch.int64)),
             "weighted row and column sums": weighted}
    for _ in range(3):
        times = []
        for name, f in tasks.items():
            t = time.perf_counter()
            for _ in range(5):
                for w in ws:
                    f(w)
            times.append(f"{name}: {(time.perf_counter() - t) / 5 * 1e3:.1f} ms")
        print("; ".join(times))


if __name__ == "__main__":
    main()
