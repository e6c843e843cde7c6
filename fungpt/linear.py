"""The model's Linear layer: `nn.Linear`, with its CPU matrix products made faster where measured.

Nearly all of a small GPT's arithmetic is the matrix products of its Linear layers: y = x W^T + b
in the forward pass, and two more in the backward pass (the gradients for x and for W). With x
(M, K) the input rows (M = B*T tokens) and W (N, K):

    forward        y  = x  W^T      (M, N)
    input grad     gx = gy W        (M, K)
    weight grad    gW = gy^T x      (N, K)   a sum over the M tokens

On a CPU, torch sends float32 products to its BLAS library (Intel MKL in the x86 wheels). MKL
picks its fastest kernels only on Intel processors: on AMD processors with AVX-512 (Zen 4, Zen 5)
it runs its 256-bit AVX2 kernels, about half of what a Zen 5 can do (a Zen 4 runs each 512-bit
instruction as two 256-bit halves, so there the two widths run about equally fast). oneDNN, the other
maths library inside torch, chooses its kernels from the CPU's features whatever the vendor, so it
runs 512-bit kernels there. Measured on a 2-core AMD EPYC (Zen 5) at the 4 x 128 model's shapes
(BENCHMARKS.md, "Fourth session"): forward and input-grad products 1.8-2.2x faster, weight
gradients 1.1-2.0x, a whole training step 1.4-1.5x.

Batch-1 decoding is different: one token multiplies a single row x by every weight matrix, so the
time goes into reading the weights from memory, not into arithmetic. There `row_sums`
computes W x as a weighted sum of the rows of W^T with an embedding bag, whose kernel streams
memory 1.1-2.3x as fast as oneDNN's matrix-vector product over the recorded generation runs in
BENCHMARKS.md, and up to 4.3x as fast as MKL's on the AMD hosts there. On the Intel Xeon there, MKL's
matrix-vector product was the faster (0.96-1.38 against 1.13-1.64 ms per token over its sessions), as
MKL tends to be on Intel CPUs: there "auto" keeps torch's BLAS (choose_cpu_matmul).

`Linear` is an `nn.Linear` (same parameters, same checkpoints, same Hugging Face conversion) whose
forward takes these paths when `cpu_matmul()` is "onednn" and the input is a float32 CPU tensor outside
autocast and torch.compile; everything else (GPUs, bfloat16 tensors, compiled graphs, and cpu_matmul
"torch") goes to `F.linear` as usual (inside `bfloat16_products()`, F.linear on bfloat16 copies).
Results agree with MKL's to float32 rounding (the additions happen in another order). `cpu_matmul` is
chosen once per process, by the FUNGPT_CPU_MATMUL environment variable (any command), else by machine:
oneDNN on non-Intel CPUs with AVX-512. A training run's train.cpu_matmul holds for that run (using_cpu_matmul).

Training with dtype "bfloat16" on a CPU runs inside `bfloat16_products()`: the same products, on the same
library, with their operands rounded to bfloat16. CPUs with bfloat16 instructions run them about twice
as fast; the rest of the step stays float32 (see bfloat16_products for why not autocast).
"""

import contextlib
import functools
import os
import threading
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from fungpt.errors import FunGPTError
from fungpt.hardware import cpu_info

CPU_MATMULS = ("auto", "onednn", "torch")
_chosen: list[str] = []  # the choice of set_cpu_matmul, if any (a one-element list: no `global` statement)
_local = threading.local()  # per thread, as torch's autocast: .bf16_products is True inside bfloat16_products()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias through oneDNN's inner-product kernel.

    `torch.ops.mkldnn._linear_pointwise` is the op torch.compile's CPU backend emits for Linear
    layers ("none": no fused activation after it). Both arguments may be strided views: a strided
    weight is read as it lies, a strided x is first copied to contiguous rows by the op (~70 us for a
    transposed 768 x 128 in a training step's profile), which is what the weight gradient pays.
    """
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _plain(t: torch.Tensor) -> bool:
    """Whether t is an ordinary tensor: not a forward-mode dual number nor a torch.func wrapper (jvp, vmap, grad)."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(t) and fwAD.unpack_dual(t).tangent is None


class OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with all three matrix products on oneDNN (see the module docstring).

    `dtype` is the products' precision: float32, or bfloat16 (`bfloat16_products`): x, W and the output gradient
    rounded to bfloat16 as they enter a product, its sums kept in float32 by oneDNN, its result rounded to
    bfloat16 and handed back in `out_dtype` (the input's gradient in x's dtype, the weight's in its own).
    Second derivatives (create_graph=True: a gradient penalty) take torch's differentiable products in backward;
    forward-mode AD and torch.func transforms never come here (Linear sends them to F.linear).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1)).to(dtype)  # (..., K) -> (M, K), rounded (a no-op in float32)
        w = weight.to(dtype)
        # bfloat16: the rounded copies (half the memory); float32: the inputs themselves (x2 is x's rows, w the
        # weight), so that a second derivative (create_graph) reaches them, which copies made here would not
        ctx.rounded = dtype != torch.float32
        ctx.save_for_backward(*((x2, w) if ctx.rounded else (x, weight)))
        ctx.has_bias, ctx.x_dtype, ctx.w_dtype = bias is not None, x.dtype, weight.dtype
        y = onednn_linear(x2, w, None if bias is None else bias.to(dtype))
        return y.to(out_dtype).view(*x.shape[:-1], weight.size(0))  # (..., N)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x2, w = ctx.saved_tensors
        if not ctx.rounded:
            x2 = x2.reshape(-1, x2.size(-1))  # x's rows (M, K), as forward took them
        gy2 = gy.reshape(-1, gy.size(-1))  # (M, N)
        gyp = gy2.to(w.dtype)  # rounded as it enters the products (a no-op in float32)
        gx = gw = gb = None
        if torch.is_grad_enabled():  # create_graph=True: the same products, as ops autograd can differentiate again
            # (oneDNN's op has no derivative: through it a second derivative came out zero, silently)
            if ctx.rounded:  # (the rounded copies lead back to no input)
                raise RuntimeError("second derivatives through bfloat16 products (train.dtype = 'bfloat16' on a "
                                   "CPU) are not supported: take them in float32")
            if ctx.needs_input_grad[0]:
                gx = (gyp @ w).to(ctx.x_dtype).view(*gy.shape[:-1], w.size(1))  # gy W: (..., K)
            if ctx.needs_input_grad[1]:
                gw = (gyp.t() @ x2).to(ctx.w_dtype)  # gy^T x: (N, K)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = gy2.sum(0, dtype=torch.float32).to(ctx.w_dtype)
            return gx, gw, gb, None, None
        if ctx.needs_input_grad[0]:
            gx = onednn_linear(gyp, w.t(), None).to(ctx.x_dtype).view(*gy.shape[:-1], w.size(1))  # gy W: (..., K)
        if ctx.needs_input_grad[1]:
            # gW = gy^T x sums over the M tokens. oneDNN is fastest with the smaller of N and K as
            # the rows of its result (measured: 248 vs 324 us for N, K = 384, 128), so for N > K it
            # computes gW^T = x^T gy and transposes that (a 20-30 us copy, the same one that returns a bfloat16
            # result to float32; a transposed view would be copied anyway, by autograd, to match the weight's layout).
            N, K = w.shape
            if N > K:
                gw = onednn_linear(x2.t(), gyp.t(), None).t()  # (K, M) @ (N, M)^T = (K, N) -> (N, K), a view
                gw = gw.to(ctx.w_dtype, memory_format=torch.contiguous_format)
            else:
                gw = onednn_linear(gyp.t(), x2.t(), None).to(ctx.w_dtype)  # (N, M) @ (K, M)^T = (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0, dtype=torch.float32).to(ctx.w_dtype)  # (N,), summed in float32
        return gx, gw, gb, None, None


@contextlib.contextmanager
def bfloat16_products():
    """Inside: the float32 CPU Linear layers compute their three products in bfloat16 (train.dtype = "bfloat16"
    on a CPU); everything else stays float32: norms, attention, the residual stream, the loss, the weights and
    AdamW. (The activation function runs on the MLP's first product's bfloat16 result: see `Linear`.)
    For the calling thread only, as torch's autocast.

    Each product's operands are rounded to bfloat16 (float32's range, 8 significant bits: 7 stored and the
    leading 1 implied, against float32's 24) as they enter it, the
    sums run in float32 inside oneDNN (or torch's own bfloat16 kernel with cpu_matmul "torch"), and the result
    is rounded to bfloat16 and handed back as float32 (kept in bfloat16 by the MLP's first layer: `Linear`). On CPUs
    with bfloat16 instructions (AVX512-BF16 on AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids and later,
    whose AMX also multiplies bfloat16 tiles) oneDNN runs such products about twice as fast as float32 ones
    (measured on a Zen 4 at the 4 x 128 model's shapes: 306-386 against 133-202 GFLOP/s; BENCHMARKS.md,
    "Thirty-first session"). torch's autocast does more in bfloat16 (attention, GELU), which this CPU runs slower
    than in float32, and rounds the activations between them too. Without such instructions bfloat16 is emulated,
    slowly."""
    before = bfloat16_products_active()
    _local.bf16_products = True
    try:
        yield
    finally:
        _local.bf16_products = before


def bfloat16_products_active() -> bool:
    """Whether the calling thread is inside bfloat16_products()."""
    return getattr(_local, "bf16_products", False)


@functools.cache
def onednn_bf16_works() -> bool:
    """Whether oneDNN's linear op runs bfloat16 products here (it refuses CPUs without AVX-512), checked once."""
    try:
        x = torch.arange(128, dtype=torch.float32).view(8, 16).sin().to(torch.bfloat16)
        w = torch.arange(64, dtype=torch.float32).view(4, 16).cos().to(torch.bfloat16)
        with torch.autocast("cpu", enabled=False), torch.no_grad():
            # bfloat16 results carry 8 bits of mantissa: ~0.4% of these sums of 16 terms of size <= 1
            return torch.allclose(onednn_linear(x, w, None).float(), F.linear(x.float(), w.float()), atol=0.05)
    except (RuntimeError, AttributeError):
        return False


@functools.cache
def onednn_works() -> bool:
    """Whether this torch has oneDNN's linear op and it computes what F.linear does (checked once)."""
    try:  # fixed inputs, not torch.randn: the check must not move the random stream a run's seed set
        x = torch.arange(128, dtype=torch.float32).view(8, 16).sin()
        w = torch.arange(64, dtype=torch.float32).view(4, 16).cos()
        # in float32 whatever the caller's context (asked first inside autocast, F.linear gave bfloat16: "no")
        with torch.autocast("cpu", enabled=False), torch.no_grad():
            # (the products are sums of 16 terms of size <= 1: float32 rounding of another summation order is ~1e-6)
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


@functools.cache
def _detected(setting: str) -> str:
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    needs_probe = setting != "torch"
    vendor = cpu_info("vendor_id")  # "" off Linux: "auto" then keeps torch's default
    return choose_cpu_matmul(setting, onednn=needs_probe and onednn_works(), avx512=avx512, vendor=vendor)


def set_cpu_matmul(setting: str) -> str:
    """Choose the CPU matmul library for this process; returns the one resolved ("onednn" or "torch").

    "onednn" and "torch" are taken as they are. "auto" takes $FUNGPT_CPU_MATMUL when it is set, and
    otherwise asks choose_cpu_matmul about this machine.
    """
    variable = os.environ.get("FUNGPT_CPU_MATMUL", "").strip() or "auto"  # (set empty: as unset)
    if setting == "auto" and variable != "auto":
        setting = variable
        if setting not in CPU_MATMULS:
            raise FunGPTError(f"FUNGPT_CPU_MATMUL={setting!r} is unknown: set it to one of {', '.join(CPU_MATMULS)}, "
                              "or unset it")
        if setting == "onednn" and not onednn_works():  # (choose_cpu_matmul's advice, 'auto', is what read it)
            raise FunGPTError("FUNGPT_CPU_MATMUL=onednn, but this torch build has no working oneDNN linear op: "
                              "unset it, or set it to torch")
    resolved = _detected(setting)
    _chosen[:] = [resolved]
    return resolved


@contextlib.contextmanager
def using_cpu_matmul(setting: str):
    """set_cpu_matmul for the block (a training run, a dry run's timed steps); yields the library resolved. The
    process's own choice, or none yet, is given back after it: a notebook's later sampling is not held to the last
    run's setting."""
    before = list(_chosen)
    try:
        yield set_cpu_matmul(setting)
    finally:
        _chosen[:] = before


def cpu_matmul() -> str:
    """The CPU matmul library in use: set_cpu_matmul's choice, else set_cpu_matmul("auto")'s."""
    if not _chosen:
        set_cpu_matmul("auto")
    return _chosen[0]


def row_sums(weight_t: torch.Tensor, bags: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    """The bags' partial sums of W x for one input vector x (K,), given weight_t = W^T (K, N): (n_bags, N).

    W x is a weighted sum of the rows of W^T: y = sum_k x_k W^T[k, :]. That is exactly what an
    embedding bag in "sum" mode with per-sample weights x computes over a "bag" of all K rows, and
    its CPU kernel streams each row once at close to memory speed: batch-1 decoding reads every
    weight once per token, so that speed is what counts (BENCHMARKS.md, the generation blocks'
    "What bounds plain cached decoding": 1.1-2.3x oneDNN's matrix-vector product over the recorded runs, up to 4.3x
    MKL's on AMD hosts; on the Intel Xeon MKL's was faster, see the module docstring). bags = (rows, starts, ones)
    from `row_bags`: the K rows in one bag per thread, which the threads sum in parallel; the partial sums still
    have to be added up (row_product).
    """
    rows, starts, _ = bags
    # torch.embedding_bag is F.embedding_bag without its Python argument checks (a few us less, 25 calls a
    # token). Positional: weight, indices, offsets, scale_grad_by_freq=False, mode=0 ("sum"), sparse=False,
    # per_sample_weights=x; its first output is the bags' sums.
    return torch.embedding_bag(weight_t, rows, starts, False, 0, False, x)[0]  # (n_bags, N)


def row_product(weight_t: torch.Tensor, bias: torch.Tensor | None, bags: tuple[torch.Tensor, ...]) -> Callable:
    """The function x (K,), residual (N,) or None -> W x + b (+ residual), by row sums (see row_sums).

    The partial sums are added up as a matrix-vector product with a vector of ones: one operation
    that also adds the bias or the residual (an addmv, instead of a sum and an add).
    """
    ones = bags[2]  # (n_bags,)

    def product(x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        partial = row_sums(weight_t, bags, x).t()  # (N, n_bags)
        if residual is None:
            return torch.mv(partial, ones) if bias is None else torch.addmv(bias, partial, ones)
        y = torch.addmv(residual, partial, ones)  # residual + W x
        return y if bias is None else y.add_(bias)

    return product


def row_product_into(weight_t: torch.Tensor, bias: torch.Tensor | None, bags: tuple[torch.Tensor, ...],
                     out: torch.Tensor) -> Callable:
    """The function x (K,) -> W x + b written into out (1, N), by row sums (see row_sums).

    A row of ones times the partial sums (n_bags, N) adds them up without transposing them (an
    addmm with out=): decode.py keeps fixed q, k, v views on such a buffer.
    """
    ones_row, bias_row = bags[2].view(1, -1), None if bias is None else bias.view(1, -1)  # (1, n_bags), (1, N)

    def product(x: torch.Tensor) -> torch.Tensor:
        partial = row_sums(weight_t, bags, x)  # (n_bags, N)
        if bias_row is None:
            return torch.mm(ones_row, partial, out=out)
        return torch.addmm(bias_row, ones_row, partial, out=out)  # (1, N)

    return product


def row_bags(K: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, starts, ones) for row_product: all K rows, in one bag per thread; the ones in the weights' dtype.

    Measured in decoding on 2 threads (6 x 384 model, BENCHMARKS.md "Fifth session"): one bag per
    thread was a little faster than 2, 3 or 4 (1.35 ms per token against 1.39, 1.42 and 1.49); each bag's
    partial sum is one more row for the final addmv to add.
    """
    n_bags = min(K, torch.get_num_threads())
    rows = torch.arange(K, device=device)  # bag contents: every row of W^T, in order
    starts = torch.arange(0, K, -(-K // n_bags), device=device)  # where each bag begins
    # (the ones' dtype is given, not torch's default: a default changed to float64 made them refuse float32 sums)
    return rows, starts, torch.ones(starts.numel(), device=device, dtype=dtype)  # starts may be fewer than n_bags


ROW_SUM_MAX_ELEMENTS = 1 << 22
"""Largest weight (4M elements, 16 MB) decoded by row_product, whose W^T copy costs that much memory
again: covers the block matrices up to GPT-2 medium (1024 x 4096), not the 50257 x C token table."""


class Linear(nn.Linear):
    """nn.Linear whose float32 CPU products may run on oneDNN (module docstring); same parameters.

    With cpu_matmul() == "onednn": products that need a backward go through OneDNNLinear, the others
    through oneDNN directly. Batch-1 decoding (decode.py) does not call forward: it takes `decoder()`,
    a function that computes one row by row sums (row_product) where they are faster.

    Inside `bfloat16_products()` the products run in bfloat16 and the output comes back as float32, unless
    `keeps_bfloat16` is set: then it stays bfloat16 (the MLP's first layer, whose output only goes through
    the activation into the next product, which would round it to bfloat16 anyway). A bfloat16 input is taken
    there as it is.
    """

    keeps_bfloat16 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        dtype = torch.bfloat16 if bfloat16_products_active() else torch.float32
        compiling, empty = torch.compiler.is_compiling(), x.numel() == 0  # (oneDNN's op refuses empty inputs)
        if not (x.is_cpu and x.dtype in (torch.float32, dtype) and w.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")) or (
                dtype == torch.float32 and (compiling or empty or cpu_matmul() != "onednn")):
            return F.linear(x, w, b)
        out_dtype = dtype if self.keeps_bfloat16 else torch.float32
        # torch's kernels: for bfloat16 where oneDNN runs none; and for an input oneDNN's op would mishandle: of
        # another width (its error names no shapes), a 0-d one, or one of forward-mode AD or torch.func (jvp, vmap),
        # whose tangents the op drops (derivatives that came out zero, silently)
        if (compiling or empty or cpu_matmul() != "onednn" or not onednn_bf16_works() or x.dim() == 0
                or x.size(-1) != w.size(1) or not (_plain(x) and _plain(w) and (b is None or _plain(b)))):
            y = F.linear(x.to(dtype), w.to(dtype)).to(out_dtype)  # autograd's backward: bfloat16 products too
            # the bias added after the product's rounding, in out_dtype (oneDNN adds it inside, rounded to
            # bfloat16: the two differ by a bfloat16 rounding at most); its gradient summed by autograd
            return y if b is None else y + b.to(out_dtype)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
            return OneDNNLinear.apply(x, w, b, dtype, out_dtype)
        # No backward needed (evaluation, prefill): skip autograd.Function's ~14 us per call.
        # (..., in) -> (M, in) rows -> (M, out) -> (..., out)
        x2, b = x.reshape(-1, x.size(-1)).to(dtype), None if b is None else b.to(dtype)
        return onednn_linear(x2, w.to(dtype), b).to(out_dtype).view(*x.shape[:-1], self.out_features)

    def _onednn_apply(self) -> bool:
        """Whether this layer's products without autograd go to oneDNN (cpu_matmul "onednn", float32 CPU weight)."""
        w = self.weight
        return cpu_matmul() == "onednn" and w.is_cpu and w.dtype == torch.float32

    def _rows_apply(self) -> bool:
        """Whether decoding products take the row-sum path (oneDNN's conditions, and W^T affordable)."""
        return self._onednn_apply() and self.weight.numel() <= ROW_SUM_MAX_ELEMENTS

    def _dense(self) -> Callable:
        """x (K,) -> W x + b, one matrix-vector product: oneDNN where `_onednn_apply` (like forward), else addmv (mv).

        For weights too large for row sums, e.g. GPT-2's 50257 x 768 output layer: oneDNN reads it at 34.5 GB/s,
        MKL at 14.8 (4.5 against 10.4 ms per token; BENCHMARKS.md, "Sixth session"). Otherwise torch's BLAS through
        addmv: the same bits as F.linear on a vector, without its reshapes and transposes on the way to a
        matrix product (3.7% faster decoding on an Intel Xeon, BENCHMARKS.md, "Thirty-second session").
        """
        w, b = self.weight, self.bias
        if self._onednn_apply():
            return lambda x: onednn_linear(x.view(1, -1), w, b).view(-1)  # (K,) -> (1, K) -> (1, N) -> (N,)
        return (lambda x: torch.mv(w, x)) if b is None else (lambda x: torch.addmv(b, w, x))

    def decoder(self) -> Callable:
        """The function x (K,), residual (N,) or None -> W x + b (+ residual): batch-1 decoding's product (decode.py).

        Row sums (row_product) where `_rows_apply`, one matrix-vector product otherwise (`_dense`; with torch's
        BLAS, an addmv that adds the residual in the same call). The row sums use a copy of the weight made now:
        after changing the weight, ask for a new decoder. No autograd: call it under torch.no_grad() or
        torch.inference_mode().
        """
        if self._rows_apply():
            weight_t, bags = self._row_table()
            return row_product(weight_t, self.bias, bags)
        dense, w, b = self._dense(), self.weight, self.bias
        onednn = self._onednn_apply()

        def product(x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
            if residual is None:
                return dense(x)
            if onednn:
                return dense(x).add_(residual)  # float addition commutes: = residual + y
            y = torch.addmv(residual, w, x)  # residual + W x
            return y if b is None else y.add_(b)

        return product

    def decoder_into(self, out: torch.Tensor) -> Callable:
        """Like decoder, for the function x (K,) -> W x + b written into out, a (1, N) tensor (which it returns)."""
        if self._rows_apply():
            weight_t, bags = self._row_table()
            return row_product_into(weight_t, self.bias, bags, out)
        if self._onednn_apply():
            dense = self._dense()
            return lambda x: out.copy_(dense(x).view(1, -1))  # (out,) -> (1, out)
        w, b, flat = self.weight, self.bias, out.view(-1)  # (1, N) -> (N,), the same memory

        def product(x: torch.Tensor) -> torch.Tensor:
            torch.mv(w, x, out=flat) if b is None else torch.addmv(b, w, x, out=flat)
            return out

        return product

    def _row_table(self) -> tuple[torch.Tensor, tuple]:
        """(W^T, bags) for row_product: W^T a copy of the weight as it is now, made for each decoder.

        A decoder is made once per generation (decode.Decoder gathers them when it starts, and again if a
        weight's version or storage changes between steps), so a new generation sees the weight however it
        was changed: also through `weight.data`, which no version counter sees (a learner's manual SGD step,
        `p.data -= lr * p.grad`, or rows swapped in place). Only such a write while a generate_stream is
        paused goes unseen by that stream. Keeping the copy between generations instead would need a check that
        sees every such write: for the 24 matrices of the 6 x 384 model the copies take 10.6-12.2 ms per
        generation, position-weighted sums of the bits 5.3-6.6 ms in one run (13-28 ms in another, minutes before;
        a plain sum, 2.7-8.0 ms, misses swapped rows): ~5 ms, under 0.5% of 500 decoded tokens, is not worth a
        second copy of the weights held for the model's whole life (`python bench/bench_weight_copy.py`;
        BENCHMARKS.md, "Nineteenth session").
        """
        w = self.weight.detach()
        # (out, in) -> W^T (in, out), a row per input
        return w.t().contiguous(), row_bags(self.in_features, w.device, w.dtype)
