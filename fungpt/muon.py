"""Muon, an optimizer for the 2-D weight matrices of a network, in float32 and batched for CPUs.

Muon (Keller Jordan 2024, "Muon: An optimizer for hidden layers in neural networks",
https://kellerjordan.github.io/posts/muon/; the name stands for MomentUm Orthogonalized by Newton-Schulz;
the optimizer of the modded-nanogpt speedrun records) takes the usual momentum-smoothed gradient M of a matrix and
replaces it by the nearest orthogonal matrix, roughly U V^T where M = U S V^T. Every direction of
the update then moves the same distance: directions that the gradient barely touches (small
singular values) are not starved by a few dominant ones.

Computing U V^T with an SVD is slow, so Muon runs a few Newton-Schulz iterations, cheap matrix
products that push all singular values of X towards 1:

    X <- a X + (b A + c A^2) X,   A = X X^T,   (a, b, c) = (3.4445, -4.7750, 2.0315)

These coefficients trade exactness for speed: after the 5 iterations the singular values lie
roughly between 0.7 and 1.2, not at 1, which trains as well. That is for those that start above about
0.2% of X's Frobenius norm (the starting scale); smaller ones end below the band, too few iterations to grow
them: about 0.5 from 0.1%, 0.1 from 0.02%.

torch.optim.Muon does the same in bfloat16, one matrix at a time: fast on GPUs, but on CPUs without
bfloat16 instructions many times slower than float32 (a speedrun step took ~860 ms instead of ~130 ms
on a Zen 3 CPU; BENCHMARKS.md). This version stays in float32 and stacks all matrices of one shape into
a single batch, so each iteration is three batched matmuls per shape instead of three per matrix. On a
CPU with bfloat16 instructions (a Zen 4) the two are close: for the speedrun preset's 16 matrices a step
took 7.6 ms against 11.0 ms for torch.optim.Muon (2 threads; `bench/bench_muon.py`, BENCHMARKS.md).
"""

from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic coefficients: the fastest rise of small singular values towards 1."""


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize a batch of matrices g (n, rows, cols) with rows <= cols.

    eps keeps the first division finite for an all-zero gradient (a matrix that got none): it then stays zero."""
    a, b, c = NS_COEFFICIENTS
    x = g / (g.norm(dim=(1, 2), keepdim=True) + eps)  # Frobenius norm >= spectral norm: all singular values <= 1
    for _ in range(steps):
        gram = x @ x.transpose(1, 2)  # (n, rows, rows): the small side, since rows <= cols
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return x


class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum and decoupled weight decay, for 2-D parameters only.

    The update of a (rows, cols) matrix is scaled by sqrt(max(1, rows / cols)) (Keller Jordan's
    rule), so tall and wide matrices move their outputs by similar amounts.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon is for 2-D matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # (torch.optim's contract: the closure recomputes the loss and the gradients)
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for (rows, cols), params in by_shape.items():
                grads = torch.stack([p.grad for p in params])  # (n, rows, cols)
                for p in params:  # (each on its own: a matrix may get its first gradient later than others)
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, list(grads.unbind(0)))  # buf = mu * buf + g
                update = grads.add_(torch.stack(bufs), alpha=mu)  # Nesterov: g + mu * buf
                if rows > cols:  # (n, rows, cols) -> (n, cols, rows), wide as orthogonalize wants, and back
                    update = orthogonalize(update.transpose(1, 2), group["ns_steps"]).transpose(1, 2)
                else:
                    update = orthogonalize(update, group["ns_steps"])
                if wd:
                    torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_add_(params, list(update.unbind(0)), alpha=-lr * max(1.0, rows / cols) ** 0.5)
        return loss
