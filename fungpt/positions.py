"""Position encodings: how a transformer learns *where* each token is.

Self-attention without a mask is permutation-equivariant: shuffle the input tokens and
the outputs are shuffled the same way. A causal mask leaks some order, which is often enough
(see `NoPositions`), but explicit positions are the norm: word order matters in language, so
GPTs usually inject position information somewhere. This file holds four swappable ways
to do it; the model picks one with `make_positions(config)` and never branches on
the variant again.

Every module answers two questions:

    add_to_embeddings(tok_emb, pos) -> x
        Called once, at the bottom of the network. Absolute encodings
        (learned, sinusoidal) add a vector per position to the token embeddings.
    rotate(q, k, pos) -> (q, k)
        Called in every attention layer on the queries and keys. Only rotary
        encoding (RoPE) does something here.

`pos` is a 1-D LongTensor with the absolute position of every token in the
current chunk: usually 0..T-1, but t0..t0+T-1 when decoding with a KV cache,
where new tokens continue after the t0 tokens already in the cache.

Shapes: T time, C n_embd, nh heads, hs head size, B batch.
    tok_emb, x: (B, T, C)    q, k: (B, nh, T, hs)    pos: (T,)
(decode.py's one-token step passes tok_emb as (1, C), one position's embedding: an encoding that adds its (T, C)
table by broadcasting, as these do, serves both; one that unpacks B, T, C = tok_emb.shape does not)
"""

import torch
from torch import nn


class NoPositions(nn.Module):
    """No position encoding at all ("NoPE").

    It still works for a *causal* (decoder-only) model, because the causal mask
    itself leaks order: the token at position p attends to exactly p + 1 tokens.
    E.g. if the first token's value vector is distinctive, how strongly it is
    diluted by the average tells a token how far into the sequence it is; from
    such counts later layers can reconstruct positions (Haviv et al. 2022,
    "Transformer Language Models without Positional Encodings Still Learn
    Positional Information"). This is also the base class: identity everywhere.
    """

    def add_to_embeddings(self, tok_emb: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return tok_emb

    def rotate(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


class LearnedPositions(NoPositions):
    """A learned table with one vector per absolute position (GPT-2).

    `wpe` ("word position embedding", the name GPT-2 uses) is an ordinary
    nn.Embedding of shape (block_size, C), trained like any other weight. Its
    row for position p is added to the token embedding at position p. Simple and
    effective, but the model cannot handle positions it has no row for: the
    context length is fixed at block_size.
    """

    def __init__(self, block_size: int, n_embd: int):
        super().__init__()
        self.wpe = nn.Embedding(block_size, n_embd)  # (block_size, C)

    def add_to_embeddings(self, tok_emb: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return tok_emb + self.wpe.weight[pos]  # (B, T, C) + (T, C) broadcasts over B; = self.wpe(pos)


class SinusoidalPositions(NoPositions):
    """A fixed (not learned) table of sines and cosines (Vaswani et al. 2017).

        PE[p, 2i]   = sin(p / 10000^(2i/C))
        PE[p, 2i+1] = cos(p / 10000^(2i/C))

    Each pair of channels (2i, 2i+1) is a point on a circle that turns with
    position p at its own speed: the first pairs turn fast (wavelength 2*pi),
    the last ones slowly (wavelength ~ 2*pi*10000). Like the hands of a clock,
    the set of angles identifies the position, and PE[p + s] is a fixed linear
    function (a rotation) of PE[p], which makes relative offsets easy to learn.
    The table has no parameters, so it is a non-persistent buffer: recomputed
    at construction, never saved in checkpoints.
    """

    def __init__(self, block_size: int, n_embd: int):
        super().__init__()
        p = torch.arange(block_size, dtype=torch.float32)[:, None]  # (block_size, 1)
        two_i = torch.arange(0, n_embd, 2, dtype=torch.float32)  # (ceil(C/2),) = 0, 2, 4, ...
        angle = p / (10000.0 ** (two_i / n_embd))  # (block_size, ceil(C/2))
        pe = torch.zeros(block_size, n_embd)  # (block_size, C)
        pe[:, 0::2] = torch.sin(angle)
        pe[:, 1::2] = torch.cos(angle[:, : n_embd // 2])  # odd C: one fewer cosine column
        self.register_buffer("pe", pe, persistent=False)

    def add_to_embeddings(self, tok_emb: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return tok_emb + self.pe[pos].to(tok_emb.dtype)  # (B, T, C) + (T, C)


class RotaryPositions(NoPositions):
    """Rotary position embedding, RoPE (Su et al. 2021, "RoFormer").

    Instead of adding anything to x, RoPE rotates each query and key vector by
    an angle proportional to its position, inside every attention layer. Split
    a head's hs dimensions into hs/2 pairs; pair i of the vector at position m
    is rotated by the angle m * theta_i, with theta_i = base^(-2i/hs) (fast
    rotation for the first pairs, slow for the last, as in the sinusoids).

    Why this encodes *relative* position: a rotation R(a) satisfies
    R(a)^T R(b) = R(b - a). So for a query at position m and a key at n,

        (R(m theta) q) . (R(n theta) k) = q . R((n - m) theta) k,

    a score that depends only on the offset n - m, not on m and n themselves.

    Pairing convention: we use the "half-split" convention of GPT-NeoX and
    Hugging Face Llama, pairing x_i with x_{i + hs/2}. The paper pairs
    neighbours (x_{2i}, x_{2i+1}) instead. The two are the same up to a fixed
    permutation of the head dimensions, which the learned q/k projections absorb,
    so they are equally good; half-split is cheaper and easier to read because
    each half is one contiguous slice. (Beware when porting weights between the
    two conventions: the permutation must then be applied to the weights.)

    cos and sin of every angle are precomputed for block_size positions in
    non-persistent buffers (derived from the config, so not saved). They are
    stored at full width hs, with the rotation's minus sign folded into `sin`,
    so that rotating is three tensor operations instead of seven (measured
    1.4x as fast forward + backward on a CPU, where each operation is one pass
    over memory; BENCHMARKS.md, second session: 2,374 -> 1,676 us):

        x1' = x1 cos - x2 sin                         cos_full = [cos,  cos]
        x2' = x2 cos + x1 sin    i.e.  x' = x * cos_full + [x2, x1] * sin_full,
                                                      sin_full = [-sin, sin]
    """

    def __init__(self, block_size: int, head_size: int, base: float = 10000.0):
        super().__init__()
        half = head_size // 2
        theta = base ** (-torch.arange(half, dtype=torch.float32) / half)  # (hs/2,) = base^(-2i/hs)
        angle = torch.arange(block_size, dtype=torch.float32)[:, None] * theta  # (block_size, hs/2)
        cos, sin = angle.cos(), angle.sin()
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)  # (block_size, hs)
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)  # (block_size, hs)

    @staticmethod
    def _rotate_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.size(-1) // 2
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # (B, nh, T, hs): [x2, x1]
        return torch.addcmul(x * cos, swapped, sin)  # x * cos_full + [x2, x1] * sin_full, (B, nh, T, hs)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[pos].to(q.dtype)  # (T, hs), broadcasts over (B, nh)
        sin = self.sin[pos].to(q.dtype)
        return self._rotate_one(q, cos, sin), self._rotate_one(k, cos, sin)


# Each encoding by its config name, built from a GPTConfig: a new one is added here (POS_ENCODINGS, the names
# GPTConfig accepts, follow; `fungpt positions` draws only the encodings viz.py knows how to picture)
_MAKERS = {
    "learned": lambda c: LearnedPositions(c.block_size, c.n_embd),
    "sinusoidal": lambda c: SinusoidalPositions(c.block_size, c.n_embd),
    "rope": lambda c: RotaryPositions(c.block_size, c.n_embd // c.n_head, c.rope_base),
    "none": lambda c: NoPositions(),
}

POS_ENCODINGS = tuple(_MAKERS)
"""The valid values of GPTConfig.pos_encoding."""


def make_positions(config) -> NoPositions:
    """Build the position module named by `config.pos_encoding`."""
    return _MAKERS[config.pos_encoding](config)  # GPTConfig has validated the name
