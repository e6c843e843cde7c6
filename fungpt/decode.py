"""Cached decoding of one sequence on a CPU, one token per step: the hot loop of `GPT.generate`, made lean.

With a KV cache, every step of generation runs the model on a single new token. Its arithmetic
is tiny (2 FLOPs per weight); the time goes to two things:

  1. Reading every weight matrix once. A 6 x 384 model streams 42.6 MB of float32 weights per
     token (more than the CPU's caches hold), 0.6-1.2 ms on the 2-core machine of BENCHMARKS.md.
     `Linear.decoder` reads them at close to memory speed (row sums, linear.py).
  2. The fixed cost of every tensor operation: 3-5 us in eager PyTorch (Python, the dispatcher,
     allocating the result), whatever the tensor's size, and 10-30 us when the caches are cold,
     which they are here: the weights streaming through evict the code and data that each
     operation needs. GPT.forward issues ~800 of them per token for that model (module calls,
     reshapes, checks for every variant and batch size): as much time as the reading.

`Decoder.step` computes what `model(token, kv_cache=cache)` computes, for batch size 1, in about
25 operations per block. Measured on the 6 x 384 model (BENCHMARKS.md): 1.2-1.9 ms per token,
against 2.0-2.5 ms for GPT.forward with the cache and 4-5.5 ms for Hugging Face's generate.

  * vectors (C,) instead of (B, T, C) tensors: no reshapes between the pieces;
  * each Linear layer's product adds the bias, or the residual stream, in its last operation;
  * the new key and value go into the cache with one `torch.stack` (the cache keeps each
    position's key and value side by side);
  * direct torch calls for the norms and GELU, the model's own modules for the rest (QK-norm,
    ReLU^2, positions), called through `.forward`: no module hooks fire here.

GPT.forward with a KVCache stays the reference: the tests check that both give the same logits for
every position encoding, norm, activation and QK-norm, and `GPT.generate_stream` uses this path for
one float32 sequence on a CPU.

Shapes: C n_embd, nh n_head, hs = C // nh, V vocab_size, p the new token's position, T = p + 1.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fungpt.errors import FunGPTError
from fungpt.positions import NoPositions


def direct(module: nn.Module):
    """The function a small module computes, as one direct torch call where we know it.

    F.layer_norm and friends are Python wrappers that check for tensor subclasses and read
    settings before they call the op: a few us each in the decoding loop, where the caches are cold
    after streaming the weights. Anything not listed keeps its own forward.
    """
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


class _Layer(NamedTuple):
    """What a decoding step uses of one block: functions (products, norms, activation) and tensors (views)."""

    ln_1: Callable
    c_attn: Callable  # x -> q, k, v written into the buffer that q, k and kv_new view
    q: torch.Tensor  # (1, nh, 1, hs)
    k: torch.Tensor  # (1, nh, 1, hs)
    q_norm: Callable
    k_norm: Callable
    kv_new: torch.Tensor  # (1, 2C): the new token's k and v side by side
    kv_rows: torch.Tensor  # (max_len, 2C): this layer's cache, a row per position
    k_all: torch.Tensor  # (1, nh, max_len, hs), a view of the cache
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
    does little but call tensor operations. It uses the weights as they were when it was made.
    """

    def __init__(self, model, cache):
        c = model.config
        self.C = C = c.n_embd
        nh, hs = c.n_head, C // c.n_head
        self.cache, self.wte, self.positions = cache, model.wte.weight, model.pos
        # RoPE rotates q and k in every layer; other encodings do nothing there (skip the call)
        self.rotate = None if type(model.pos).rotate is NoPositions.rotate else model.pos.rotate
        self.layers = []
        for i, b in enumerate(model.blocks):
            qkv = torch.empty(1, 3 * C)  # c_attn writes each new token's q, k, v here
            q, k, _ = qkv.view(3, 1, nh, 1, hs).unbind(0)  # (B, nh, T, hs) views into qkv
            self.layers.append(_Layer(
                direct(b.ln_1), b.attn.c_attn.decoder(out=qkv), q, k, direct(b.attn.q_norm), direct(b.attn.k_norm),
                qkv[:, C:], cache.kv[i, 0].view(-1, 2 * C), cache.k[i, :1], cache.v[i, :1],
                b.attn.c_proj.decoder(), direct(b.ln_2), b.mlp.c_fc.decoder(), direct(b.mlp.act),
                b.mlp.c_proj.decoder(),
            ))
        self.ln_f, self.lm_head = direct(model.ln_f), model.lm_head.decoder()

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (1, 1, V) for the token id (1,) at position cache.pos; stores its keys/values, advances the cache.

        Same result as model(token[None], kv_cache=cache) up to float32 rounding (the additions run in
        another order). The model must be in eval mode (no dropout).

        Runs in inference mode: like no_grad, and the operations also skip updating version counters
        and recording views (measured: 10% less time per token, BENCHMARKS.md). The logits it returns
        are "inference tensors": read them, or compute from them, but do not modify them in place or
        save them for a backward pass (clone them first).
        """
        C, rotate, cache = self.C, self.rotate, self.cache
        p = cache.pos
        T = p + 1
        if T > cache.max_len:
            raise FunGPTError(f"KV cache is full ({p} + 1 > max_len {cache.max_len}): reset() it or crop the context")
        pos = torch.arange(p, T)  # (1,) absolute position of this token
        x = self.positions.add_to_embeddings(self.wte[token], pos)[0]  # (1, C) -> (C,)
        for ln_1, c_attn, q0, k0, q_norm, k_norm, kv_new, kv_rows, k_all, v_all, c_proj, ln_2, c_fc, act, mlp_proj \
                in self.layers:
            c_attn(ln_1(x))  # fills q0, k0 and kv_new
            q, k = q_norm(q0), k_norm(k0)  # QK-norm; identity otherwise
            if rotate is not None:
                q, k = rotate(q, k, pos)
            if k is not k0:
                k0.copy_(k)  # the normalised or rotated key is the one to cache
            kv_rows.index_copy_(0, pos, kv_new)  # this position's key and value, one copy
            y = F.scaled_dot_product_attention(q, k_all.narrow(2, 0, T), v_all.narrow(2, 0, T))
            # y (1, nh, 1, hs): one query may see every cached position, so no mask
            x = c_proj(y.view(C), x)  # x + attention(...)
            x = mlp_proj(act(c_fc(ln_2(x))), x)  # x + mlp(...)
        cache.pos = T
        return self.lm_head(self.ln_f(x)).view(1, 1, -1)  # (1, 1, V)
