"""One decoding step for one sequence on a CPU: the hot loop of cached generation, made lean.

With a KV cache, every step of `GPT.generate` runs the model on a single new token. Its arithmetic
is tiny (about 2 FLOPs per weight); the time goes to two things:

  1. Reading every weight matrix once. A 6 x 384 model streams 42.6 MB of float32 weights per
     token, about 0.6-1.2 ms on a 2-core machine; `Linear.decode` reads them at close to
     memory speed (row sums, linear.py).
  2. The fixed cost of each tensor operation: 1-5 us in eager PyTorch (Python, the dispatcher,
     allocating the result), whatever the tensor's size. GPT.forward issues about 800 of these
     per token for that model (reshapes, module calls, checks for every variant and batch size):
     ~1 ms, as much as the reading.

`decode_step` computes what `model(token, kv_cache=cache)` computes, for batch size 1, with as few
operations as possible, about 21 per block (measured: 1.0-1.2 ms per token against 2.0-2.5 for
GPT.forward on the 6 x 384 model, BENCHMARKS.md):

  * vectors (C,) instead of (B, T, C) tensors, so no reshapes between the pieces;
  * `Linear.decode` folds the bias or the residual addition into the product's last operation;
  * the new key and value go into the cache with one `torch.stack` (the cache keeps each
    position's key and value side by side);
  * the model's own modules for everything else (norms, activation, positions, QK-norm), called
    through `.forward` (skipping nn.Module's hook machinery: no hooks fire here).

GPT.forward with a KVCache stays the reference: the tests check that both give the same logits for
every position encoding, norm, activation and QK-norm. `GPT.generate_stream` takes this path for
one float32 sequence on a CPU.

Shapes: C n_embd, nh n_head, hs = C // nh, V vocab_size, T positions cached after this step.
"""

import torch
import torch.nn.functional as F
from torch import nn

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


class Decoder:
    """Cached decoding of one float32 sequence on a CPU: `step` runs one token, like GPT.forward with a KVCache.

    Made once per generation: it gathers, layer by layer, the functions and tensors a step uses
    (the Linear layers' decoders, direct norm calls, the cache's views), so that the step itself
    does little but call tensor operations. It uses the weights as they were when it was made.
    """

    def __init__(self, model, cache):
        c = model.config
        self.C, self.nh, self.hs = c.n_embd, c.n_head, c.n_embd // c.n_head
        self.cache, self.wte, self.positions = cache, model.wte.weight, model.pos
        # RoPE rotates q and k in every layer; other encodings do nothing there (skip the call)
        self.rotate = None if type(model.pos).rotate is NoPositions.rotate else model.pos.rotate
        self.layers = [
            (direct(b.ln_1), b.attn.c_attn.decoder(), direct(b.attn.q_norm), direct(b.attn.k_norm),
             cache.kv[i, 0].view(-1, 2, 1, self.nh, 1, self.hs),  # (max_len, 2, 1, nh, 1, hs): [p] is (2, 1, nh, 1, hs)
             cache.k[i, :1], cache.v[i, :1],  # 2 x (1, nh, max_len, hs)
             b.attn.c_proj.decoder(), direct(b.ln_2), b.mlp.c_fc.decoder(), direct(b.mlp.act), b.mlp.c_proj.decoder())
            for i, b in enumerate(model.blocks)
        ]
        self.ln_f, self.lm_head = direct(model.ln_f), model.lm_head.decoder()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (1, 1, V) for the token id (1,) at position cache.pos; stores its keys/values, advances the cache.

        Same result as model(token[None], kv_cache=cache) up to float32 rounding (the additions run in
        another order). The model must be in eval mode (no dropout).
        """
        C, nh, hs, rotate = self.C, self.nh, self.hs, self.rotate
        p = self.cache.pos
        T = p + 1
        pos = torch.arange(p, T)  # (1,) absolute position of this token
        x = self.positions.add_to_embeddings(self.wte[token], pos)[0]  # (1, C) -> (C,)
        for ln_1, c_attn, q_norm, k_norm, kv, k_all, v_all, c_proj, ln_2, c_fc, act, mlp_proj in self.layers:
            q, k, v = c_attn(ln_1(x)).view(3, 1, nh, 1, hs).unbind(0)  # 3 x (1, nh, 1, hs): (B, nh, T, hs)
            q, k = q_norm(q), k_norm(k)  # QK-norm; identity otherwise
            if rotate is not None:
                q, k = rotate(q, k, pos)
            torch.stack((k, v), out=kv[p])  # (2, 1, nh, 1, hs): this position's key and value
            y = F.scaled_dot_product_attention(q, k_all.narrow(2, 0, T), v_all.narrow(2, 0, T))
            # y (1, nh, 1, hs): one query may see every cached position, so no mask
            x = c_proj(y.view(C), x)  # x + attention(...)
            x = mlp_proj(act(c_fc(ln_2(x))), x)  # x + mlp(...)
        self.cache.pos = T
        return self.lm_head(self.ln_f(x)).view(1, 1, -1)  # (1, 1, V)
