"""Cached decoding of one sequence on a CPU, one token per step: the hot loop of `GPT.generate`, made lean.

With a KV cache, every step of generation runs the model on a single new token. Its arithmetic
is tiny (2 FLOPs per weight); the time goes to two things:

  1. Reading every weight matrix once. A 6 x 384 model streams 42.6 MB of float32 weights per
     token with Tiny Shakespeare's 65 characters (the head is V x C: with GPT-2's vocabulary, about
     120 MB), more than most CPUs' caches hold. `Linear.decoder` reads them at close to memory speed
     (row sums with cpu_matmul "onednn", linear.py; one addmv with torch's BLAS): 0.8-2.8 ms per token on
     the 2-core machines of BENCHMARKS.md, following the host's memory bandwidth at the time.
  2. The fixed cost of every tensor operation: a few us in eager PyTorch (Python, the dispatcher,
     allocating the result), whatever the tensor's size, and several times that when the caches
     are cold, which they are here: the weights streaming through push out the code and data
     that each operation needs. GPT.forward, written for any batch, length and variant, issues
     195 operations per token for that model (operations that reach torch's dispatcher; with
     cpu_matmul "onednn", as below: 220 with torch's BLAS, the choice on Intel CPUs).

`Decoder.step` computes what `model(token[None], kv_cache=cache)` computes, for batch size 1, with
142 operations per token for that model (98 with torch's BLAS: 22 per block, 15 with BLAS, plus 10
outside them, 8 with BLAS; `bench/bench_generate.py` counts both and BENCHMARKS.md, "Fifth session",
has the times). How:

  * vectors (C,) instead of (B, T, C) tensors: no reshapes between the pieces;
  * each Linear layer's product adds the bias, or the residual stream, in its last operation,
    and c_attn writes q, k, v into a buffer that fixed views read, so they need no reshaping;
  * direct torch calls for LayerNorm, RMSNorm and GELU instead of module calls; the model's own
    modules for the rest (ReLU^2, positions);
  * inference mode: like no_grad, and the operations also skip updating version counters.

GPT.forward with a KVCache stays the reference: the tests check that both give the same logits for
every position encoding, norm, activation and QK-norm. `GPT.generate_stream` takes this path for
one float32 sequence on a CPU, unless module hooks are registered or a forward is overridden (the step
would skip them), or the forwards this file repeats were edited (MIRRORED, below): after an edit to
model.py, generation runs through GPT.forward until this file is changed to match.

Shapes: C n_embd, nh n_head, hs = C // nh, V vocab_size, p the new token's position, T = p + 1.
"""

import functools
import hashlib
import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fungpt.errors import FunGPTError
from fungpt.linear import Linear, bfloat16_products_active
from fungpt.positions import NoPositions


def direct(module: nn.Module | Callable) -> Callable:
    """The function a small module computes, as one direct torch call where we know it.

    F.layer_norm and friends are Python wrappers that check for tensor subclasses and read
    settings before they call the op: a few us each in the decoding loop, where the caches are cold
    after streaming the weights. Anything not listed keeps its own forward; a plain function (an edit such as
    `self.act = F.relu`) is itself.
    """
    if not isinstance(module, nn.Module):
        return module
    if isinstance(module, nn.LayerNorm):
        shape, w, b, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return lambda x: torch.layer_norm(x, shape, w, b, eps)
    if isinstance(module, nn.RMSNorm):
        shape, w, eps = module.normalized_shape, module.weight, module.eps
        return lambda x: torch.rms_norm(x, shape, w, eps)
    if isinstance(module, nn.GELU):
        approximate = module.approximate
        return lambda x: F.gelu(x, approximate=approximate)  # F.gelu is the op itself
    return module.forward


# The sha256 of the source of the forwards that Decoder.step computes its own way (mirrored_source): GPT.forward,
# Block.forward, CausalSelfAttention.forward, MLP.forward, KVCache.update and Linear.forward, as this file repeats
# them. A learner who edits one of them (another attention, an MLP without its activation) gets GPT.forward's
# generation, slower and right, instead of this file's copy of the old code. After changing them on purpose,
# change Decoder.step to match and set this to mirrored_source()'s new value (tests/test_decode.py checks it).
MIRRORED = "73867c18d80c5e1f692a3cc9592a5129795da0003d2224f3d13474a61603d5cf"


@functools.cache
def _source_sha256(*functions: Callable) -> str | None:
    try:
        text = "".join(inspect.getsource(f) for f in functions)
    except (OSError, TypeError):  # no source to read (a frozen or compiled install): cannot tell, so not trusted
        return None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def mirrored_source() -> str | None:
    """The sha256 of the source of the forwards Decoder.step repeats, as they are now (see MIRRORED)."""
    from fungpt.model import GPT, MLP, Block, CausalSelfAttention, KVCache  # (model.py imports this module)

    return _source_sha256(GPT.forward, Block.forward, CausalSelfAttention.forward, MLP.forward, KVCache.update,
                          Linear.forward)


def runs_as_written(model: nn.Module) -> bool:
    """Whether every module of `model` runs the forward its class defines: none overridden on one module or by a
    subclass of the classes Decoder.step computes its own way, no parametrized weights, and no forward hooks (the
    module's own, or the global ones of torch.nn.modules.module.register_module_forward_hook & co.). model.py's
    source is checked apart, by mirrored_source."""
    from fungpt.model import GPT, MLP, Block, CausalSelfAttention  # (model.py imports this module)

    replaced = (GPT, Block, CausalSelfAttention, MLP, Linear, nn.LayerNorm, nn.RMSNorm, nn.GELU, nn.Embedding,
                nn.Dropout)  # the classes whose forward the step does in its own way, instead of calling it
    if any("forward" in vars(m) or any(isinstance(m, c) and type(m).forward is not c.forward for c in replaced)
           for m in model.modules()):
        return False
    hooks = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()) or bool(
        nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    # A parametrized weight (torch.nn.utils.parametrize: weight norm, a learner's mask) is computed from other
    # tensors at every access: the step's copies and version checks would not see those tensors change
    parametrized = any(parametrize.is_parametrized(m) for m in model.modules())
    return not hooks and not parametrized


class _Layer(NamedTuple):
    """What a decoding step uses of one block: functions (products, norms, activation) and tensors (views)."""

    ln_1: Callable
    c_attn: Callable  # x -> writes the new token's q, k, v into the buffer that q, k, v below view
    q: torch.Tensor  # (1, nh, 1, hs): (B, nh, T, hs) as attention takes it
    k: torch.Tensor  # (1, nh, 1, hs)
    v: torch.Tensor  # (1, nh, 1, hs)
    q_norm: Callable
    k_norm: Callable
    k_all: torch.Tensor  # (1, nh, max_len, hs): this layer's keys in the cache
    v_all: torch.Tensor  # (1, nh, max_len, hs)
    c_proj: Callable  # (y, residual) -> residual + c_proj(y)
    ln_2: Callable
    c_fc: Callable
    act: Callable
    mlp_proj: Callable  # (h, residual) -> residual + mlp.c_proj(h)


class Decoder:
    """Cached decoding of one float32 sequence on a CPU: `step` runs one token, like GPT.forward with a KVCache.

    Made once per generation: it gathers, layer by layer, the functions and tensors a step uses
    (the Linear layers' decoders, direct norm calls, the cache's views), so that the step itself
    does little but call tensor operations. If a Linear layer's weight changes in place between steps
    (a new version, or new storage through `weight.data = ...`), the next step notices and gathers them
    again. A parameter swapped for another tensor (a new nn.Parameter, load_state_dict(assign=True)) is
    not seen by a Decoder made before: a generation paused meanwhile keeps the old weights; start a new one.
    """

    @staticmethod
    def supports(model: nn.Module, idx: torch.Tensor) -> bool:
        """Whether generating from idx (B, T) may use the Decoder: one float32 sequence on a CPU, no autocast or
        bfloat16 products, the model's own Linear layers, every forward the step re-implements as written (not
        overridden by a subclass or on one module, nor edited in model.py: an ablation's edit would be skipped),
        and no forward hooks anywhere (the step calls no modules, so hooks would silently not run)."""
        if mirrored_source() != MIRRORED:  # (first: an edit may also have renamed the modules read below)
            return False
        try:
            w = model.wte.weight
            linears = [model.lm_head] + [m for b in model.blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc,
                                                                            b.mlp.c_proj)]
        except AttributeError:  # not the layout the step reads (an edited or another model): GPT.forward then
            return False
        one_cpu_float32 = idx.size(0) == 1 and idx.is_cpu and w.is_cpu and w.dtype == torch.float32
        own_linears = all(isinstance(m, Linear) for m in linears)
        return (one_cpu_float32 and own_linears and runs_as_written(model) and not torch.is_autocast_enabled("cpu")
                and not bfloat16_products_active())

    def __init__(self, model, cache):
        c = model.config
        if cache.k.size(1) != 1 or cache.max_len > c.block_size:
            raise FunGPTError(f"Decoder needs a cache for one sequence of at most block_size {c.block_size} positions "
                              f"(got batch {cache.k.size(1)}, max_len {cache.max_len}): use model.make_kv_cache(1)")
        if any(m.training for m in model.modules()) or not cache.k.is_cpu or cache.k.dtype != torch.float32:
            raise FunGPTError("Decoder runs float32 models on a CPU in eval mode: call model.eval() (and keep the "
                              "model in float32 on the CPU), or generate with GPT.forward")
        self.model, self.cache = model, cache
        self._gather()

    def _gather(self) -> None:
        model, cache = self.model, self.cache
        C, nh = model.config.n_embd, model.config.n_head
        hs = C // nh
        self.C = C
        self.wte, self.positions = model.wte.weight, model.pos
        # RoPE rotates q and k in every layer; other encodings do nothing there (skip the call)
        self.rotate = None if type(model.pos).rotate is NoPositions.rotate else model.pos.rotate
        self.layers = []
        for i, b in enumerate(model.blocks):
            qkv = torch.empty(1, 3 * C, dtype=cache.k.dtype)  # c_attn writes each new token's q, k, v here
            q, k, v = qkv.view(3, 1, nh, 1, hs).unbind(0)  # 3 x (1, nh, 1, hs), views into qkv
            self.layers.append(_Layer(
                ln_1=direct(b.ln_1), c_attn=b.attn.c_attn.decoder_into(qkv), q=q, k=k, v=v,
                q_norm=direct(b.attn.q_norm), k_norm=direct(b.attn.k_norm),
                k_all=cache.k[i, :1], v_all=cache.v[i, :1],
                c_proj=b.attn.c_proj.decoder(), ln_2=direct(b.ln_2), c_fc=b.mlp.c_fc.decoder(),
                act=direct(b.mlp.act), mlp_proj=b.mlp.c_proj.decoder(),
            ))
        self.ln_f, self.lm_head = direct(model.ln_f), model.lm_head.decoder()
        # The Linear decoders may hold copies of the weights (W^T for row sums): remember which versions.
        self.weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
        self.versions = self._versions()

    def _versions(self) -> list[tuple[int, int]]:
        return [(w._version, w.data_ptr()) for w in self.weights]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (1, 1, V) for the token id (1,) at position cache.pos; stores its keys/values, advances the cache.

        Same result as model(token[None], kv_cache=cache) up to float32 rounding (the additions run in
        another order).
        """
        cache = self.cache
        p = cache.pos
        T = p + 1
        if T > cache.max_len:
            raise FunGPTError(f"KV cache is full ({p} + 1 > max_len {cache.max_len}): reset() it or crop the context")
        if self._versions() != self.versions:
            self._gather()  # a weight changed since the last step (e.g. while a generate_stream was paused)
        with torch.inference_mode():
            x = self._blocks(token, p, T)  # (C,)
        # Outside inference mode, so that the logits are an ordinary tensor (the caller may edit them in place);
        # without gradients: decoding never needs them, and an inference tensor cannot be saved for backward
        with torch.no_grad():
            return self.lm_head(self.ln_f(x)).view(1, 1, -1)  # (1, 1, V)

    def _blocks(self, token: torch.Tensor, p: int, T: int) -> torch.Tensor:
        """The residual stream x (C,) after every block, for the token at position p; fills the cache at p."""
        C, rotate = self.C, self.rotate
        pos = torch.arange(p, T)  # (1,) absolute position of this token
        x = self.positions.add_to_embeddings(self.wte[token], pos)[0]  # (1, C) -> (C,)
        for L in self.layers:
            L.c_attn(L.ln_1(x))  # fills L.q, L.k, L.v
            q, k = L.q_norm(L.q), L.k_norm(L.k)  # QK-norm; identity otherwise
            if rotate is not None:
                q, k = rotate(q, k, pos)
            L.k_all.index_copy_(2, pos, k)  # cache this position's key and value
            L.v_all.index_copy_(2, pos, L.v)
            y = F.scaled_dot_product_attention(q, L.k_all.narrow(2, 0, T), L.v_all.narrow(2, 0, T))
            # y (1, nh, 1, hs): one query may see every cached position, so no mask
            x = L.c_proj(y.view(C), x)  # x + attention(...); y (1, nh, 1, hs) -> (C,), the heads side by side
            x = L.mlp_proj(L.act(L.c_fc(L.ln_2(x))), x)  # x + mlp(...)
        self.cache.pos = T
        return x
