"""The model's Linear layer: `nn.Linear`, with its CPU matrix products made faster where measured.

Nearly all of a small GPT's arithmetic is the matrix products of its Linear layers: y = x W^T + b
in the forward pass, and two more in the backward pass (the gradients for x and for W). With x
(M, K) the input rows (M = B*T tokens) and W (N, K):

    forward        y  = x  W^T      (M, N)
    input grad     gx = gy W        (M, K)
    weight grad    gW = gy^T x      (N, K)   a sum over the M tokens

On a CPU, torch sends float32 products to its BLAS library (Intel MKL in the x86 wheels). MKL
picks its fastest kernels only on Intel processors: on AMD processors with AVX-512 (Zen 4, Zen 5)
it runs its 256-bit AVX2 kernels, about half of what the chip can do. oneDNN, the other maths
library inside torch, chooses its kernels from the CPU's features whatever the vendor, so it runs
512-bit kernels there. Measured on a 2-core AMD EPYC (Zen 5) at the 4 x 128 model's shapes
(BENCHMARKS.md, "Fourth session"): forward and input-grad products 2.0x faster, weight gradients
1.3-1.6x, a whole training step 1.4x.

Batch-1 decoding is different: one token multiplies a single row x by every weight matrix, so the
time goes into reading the weights from memory, not into arithmetic. There `matvec_by_rows`
computes W x as a weighted sum of the rows of W^T with `F.embedding_bag`, whose kernel streams
memory about twice as fast as either library's matrix-vector product.

`Linear` is an `nn.Linear` (same parameters, same checkpoints, same Hugging Face conversion)
whose forward takes these paths when `cpu_matmul()` is "onednn" and the input is a float32 CPU
tensor outside autocast and torch.compile; everything else (GPUs, bfloat16, compiled graphs, and
cpu_matmul "torch") goes to `F.linear` as usual. Results agree with MKL's to float32 rounding
(the additions happen in another order). `cpu_matmul` is chosen once per process ("auto":
oneDNN on non-Intel CPUs with AVX-512); `set_cpu_matmul` overrides it (train.cpu_matmul in the
config, or the FUNGPT_CPU_MATMUL environment variable for any command).
"""

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from fungpt.errors import FunGPTError

CPU_MATMULS = ("auto", "onednn", "torch")
_chosen: list[str] = []  # the choice of set_cpu_matmul, if any (a one-element list: no `global` statement)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias through oneDNN's inner-product kernel; strided views are fine.

    `torch.ops.mkldnn._linear_pointwise` is the op torch.compile's CPU backend emits for Linear
    layers ("none": no fused activation after it).
    """
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with all three matrix products on oneDNN (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1))  # (..., K) -> (M, K)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x2, weight, bias).view(*x.shape[:-1], weight.size(0))  # (..., N)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x2, weight = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.size(-1))  # (M, N)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = onednn_linear(gy2, weight.t(), None).view(*gy.shape[:-1], weight.size(1))  # gy W: (..., K)
        if ctx.needs_input_grad[1]:
            # gW = gy^T x sums over the M tokens. oneDNN is fastest with the smaller of N and K as
            # the rows of its result (measured: 248 vs 324 us for N, K = 384, 128), so for N > K it
            # computes gW^T = x^T gy and transposes that (a 20-30 us copy; a transposed view would be
            # copied anyway, by autograd, to match the weight's layout).
            N, K = weight.shape
            if N > K:
                gw = onednn_linear(x2.t(), gy2.t(), None).t().contiguous()  # (K, M) @ (N, M)^T = (K, N) -> (N, K)
            else:
                gw = onednn_linear(gy2.t(), x2.t(), None)  # (N, M) @ (K, M)^T = (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)  # (N,)
        return gx, gw, gb


@functools.cache
def onednn_works() -> bool:
    """Whether this torch has oneDNN's linear op and it computes what F.linear does (checked once)."""
    try:
        x, w = torch.randn(8, 16), torch.randn(4, 16)
        return torch.allclose(onednn_linear(x, w, None), F.linear(x, w), atol=1e-5)
    except (RuntimeError, AttributeError):
        return False


def choose_cpu_matmul(setting: str, *, onednn: bool, avx512: bool, vendor: str) -> str:
    """Resolve "auto" given the machine: "onednn" on non-Intel x86 CPUs with AVX-512, else "torch".

    onednn: whether oneDNN's linear op works in this torch; avx512: whether torch runs AVX-512 kernels
    here; vendor: the CPU vendor string ("AuthenticAMD", "GenuineIntel", ... or "" if unknown). On Intel
    CPUs MKL already runs its AVX-512 kernels; without AVX-512 neither library has wider kernels to use.
    """
    if setting not in CPU_MATMULS:
        raise FunGPTError(f"cpu_matmul = {setting!r} is unknown: use one of {', '.join(CPU_MATMULS)}")
    if setting == "onednn" and not onednn:
        raise FunGPTError("cpu_matmul = 'onednn' but this torch build has no working oneDNN linear op; "
                          "use 'auto' or 'torch'")
    if setting != "auto":
        return setting
    return "onednn" if onednn and avx512 and vendor not in ("GenuineIntel", "") else "torch"


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def _detected(setting: str) -> str:
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    needs_probe = setting != "torch"
    return choose_cpu_matmul(setting, onednn=needs_probe and onednn_works(), avx512=avx512, vendor=_cpu_vendor())


def set_cpu_matmul(setting: str) -> str:
    """Choose the CPU matmul library for this process ("auto", "onednn" or "torch"); returns the resolved one."""
    resolved = _detected(setting)
    _chosen[:] = [resolved]
    return resolved


def cpu_matmul() -> str:
    """The CPU matmul library in use: set_cpu_matmul's choice, else $FUNGPT_CPU_MATMUL, else "auto" resolved."""
    if not _chosen:
        set_cpu_matmul(os.environ.get("FUNGPT_CPU_MATMUL", "auto"))
    return _chosen[0]


def matvec_by_rows(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                   bags: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """y = W x + b for one input vector x (K,), given weight_t = W^T (K, N) contiguous; returns (N,).

    W x is a weighted sum of the rows of W^T: y = sum_k x_k W^T[k, :]. That is exactly what
    `F.embedding_bag(mode="sum", per_sample_weights=x)` computes over a "bag" of all K rows, and
    its CPU kernel streams each row once at close to memory speed: batch-1 decoding reads every
    weight once per token, so that speed is what counts (measured on a 6 x 384 model: 60 GB/s
    against 31 for oneDNN and 15 for MKL's matrix-vector product, BENCHMARKS.md).
    bags = (rows, starts) from `row_bags`: the K rows split into a few bags that the threads sum
    in parallel; the bags' partial sums are then added up.
    """
    rows, starts = bags
    partial = F.embedding_bag(rows, weight_t, starts, mode="sum", per_sample_weights=x)  # (n_bags, N)
    return partial.sum(0) if bias is None else torch.add(bias, partial.sum(0))


def row_bags(K: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, starts) for matvec_by_rows: all K rows, in 2 bags per thread (measured fastest)."""
    n_bags = min(K, 2 * torch.get_num_threads())
    rows = torch.arange(K, device=device)  # bag contents: every row of W^T, in order
    starts = torch.arange(0, K, -(-K // n_bags), device=device)  # where each bag begins
    return rows, starts


ROW_SUM_MAX_ELEMENTS = 1 << 22
"""Largest weight (4M elements, 16 MB) decoded by matvec_by_rows, whose W^T copy costs that much memory
again: covers the block matrices up to GPT-2 small (768 x 3072), not its 50257 x 768 token table."""


class Linear(nn.Linear):
    """nn.Linear whose float32 CPU products may run on oneDNN (module docstring); same parameters.

    With cpu_matmul() == "onednn": products that need a backward go through OneDNNLinear; one input
    row without grad (batch-1 decoding) through matvec_by_rows; other rows through oneDNN directly.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._rows_cache: tuple | None = None  # (weight, (version, threads), W^T, bags) for matvec_by_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if not (x.is_cpu and x.dtype == torch.float32 and w.dtype == torch.float32 and cpu_matmul() == "onednn"
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return F.linear(x, w, b)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return OneDNNLinear.apply(x, w, b)
        if x.numel() == x.size(-1) and w.numel() <= ROW_SUM_MAX_ELEMENTS:
            return self._matvec(x)  # (..., K) with one row -> (..., N)
        # No backward needed (evaluation, prefill): skip autograd.Function's ~14 us per call.
        return onednn_linear(x.reshape(-1, x.size(-1)), w, b).view(*x.shape[:-1], -1)

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        """matvec_by_rows with W^T: a copy of the weight, remade whenever it changes (in place, its version
        counter moves; replaced, it is another tensor) or the number of threads does."""
        w, cache = self.weight, self._rows_cache
        if cache is None or cache[0] is not w or cache[1] != (w._version, torch.get_num_threads()):
            cache = (w, (w._version, torch.get_num_threads()), w.detach().t().contiguous(),
                     row_bags(self.in_features, x.device))
            self._rows_cache = cache
        return matvec_by_rows(x.reshape(-1), cache[2], self.bias, cache[3]).view(*x.shape[:-1], -1)
