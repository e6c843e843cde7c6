"""The GPT model: a decoder-only transformer language model, GPT-2 style.

Architecture (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners", GPT-2), built on the transformer of Vaswani et al. 2017 ("Attention
Is All You Need"):

    token ids -> token embedding (+ position encoding) -> dropout
              -> n_layer x Block:  x = x + attn(norm(x));  x = x + mlp(norm(x))
              -> final norm -> linear "lm_head" -> logits over the vocabulary

Each block is "pre-norm" (the normalisation sits inside the residual branch, as
in GPT-2), which keeps a clean residual path from input to output and makes deep
stacks train stably. Optional modern variants are one config field away: rotary
position embedding (Su et al. 2021, "RoFormer"), RMSNorm, ReLU^2, QK-norm.

Shape notation used in every comment below:
    B  batch size              T   time (sequence length of this chunk)
    C  n_embd (channels)       nh  n_head (number of attention heads)
    hs head size = C // nh     V   vocab_size
    t0 tokens already in the KV cache before this chunk (0 without a cache, as in training)
    T_total = t0 + T: the keys a query of this chunk can attend to

Reading order: GPTConfig, the norm and activation choices (make_norm, ReLU2, make_activation),
CausalSelfAttention, MLP, Block, KVCache, GPT. Generation
draws each new token with sampling.py's sample_next_token.
"""

import dataclasses
import math
import numbers
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fungpt.decode import Decoder
from fungpt.errors import FunGPTError, check_field_types
from fungpt.linear import Linear  # nn.Linear, with faster CPU kernels where measured (linear.py)
from fungpt.positions import POS_ENCODINGS, NoPositions, make_positions
from fungpt.sampling import check_generate_args, sample_next_token  # logits -> next token; also imported from here
from fungpt.speculative import lookup_draft, verify_draft

NORMS = ("layernorm", "rmsnorm")
# Upper bounds, far above any GPT trained so far (GPT-3: 96 layers, 12288 wide; Llama 3 405B: 126 layers,
# 16384 wide, a 128k vocabulary and context). A typo such as n_layer = 1e9 is refused at once, instead of hanging
# while a model that could never fit in memory is built.
MAX_SIZES = {"vocab_size": 2**32, "block_size": 2**24, "n_layer": 2**12, "n_head": 2**16, "n_embd": 2**18}


@dataclasses.dataclass
class GPTConfig:
    """Hyperparameters of the model. The defaults are GPT-2 small (124M)."""

    vocab_size: int = 50304
    """Vocabulary size V. `fungpt train` sets it to the size of the data's tokenizer (a value given here is
    replaced). For a model built in Python: GPT-2 has 50257 tokens, and 50304 (a multiple of 64) runs faster on
    GPUs, the padding never predicted once trained."""
    block_size: int = 1024
    """Context length: the longest sequence the model can read at once."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Number of attention heads per block."""
    n_embd: int = 768
    """Embedding width C; must be divisible by n_head."""
    dropout: float = 0.0
    """Dropout probability in [0, 1) on embeddings, attention weights and residual branches (0 for pretraining)."""
    bias: bool = True
    """Use biases in Linear layers and LayerNorms (GPT-2: True)."""
    pos_encoding: str = "learned"
    """Position encoding: 'learned' (GPT-2), 'sinusoidal', 'rope' or 'none'."""
    rope_base: float = 10000.0
    """Base of the rotary angles theta_i = rope_base^(-2i/hs) (only for pos_encoding='rope')."""
    activation: str = "gelu_tanh"
    """MLP activation: 'gelu_tanh' (GPT-2's tanh approximation), 'gelu' (exact) or 'relu2' (ReLU squared)."""
    tie_embeddings: bool = True
    """Share one matrix between the token embedding and the output layer (GPT-2: True)."""
    norm: str = "layernorm"
    """Normalisation layer: 'layernorm' (GPT-2) or 'rmsnorm'."""
    qk_norm: bool = False
    """Normalise queries and keys per head (with the model's `norm`, no bias) before attention (stabilises training)."""
    init_from: str = "scratch"
    """Where training starts: 'scratch' (random weights), a local Hugging Face GPT-2 folder, or a hub name
    (gpt2, gpt2-medium, gpt2-large, gpt2-xl). Not part of the architecture: GPT ignores it, and with a
    pretrained start the architecture comes from the checkpoint (see pretrained.py)."""

    def __post_init__(self):
        # Types first, so that e.g. a YAML "1e-4" string gives a clear message (a numpy integer is stored as an int)
        check_field_types(self, lambda name: f"model config {name}=")
        for name, most in MAX_SIZES.items():
            if getattr(self, name) <= 0:
                raise FunGPTError(f"model config {name}={getattr(self, name)} must be positive: set it to at least 1")
            if getattr(self, name) > most:
                raise FunGPTError(f"model config {name}={getattr(self, name)} is larger than any GPT ever trained "
                                  f"(FunGPT accepts at most {most:,}): check its value")
        if self.n_embd % self.n_head != 0:
            fine_tune = "; a fine-tune takes both from its checkpoint: set neither" if self.init_from != "scratch" \
                else ""
            raise FunGPTError(f"model config n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                              f"choose n_embd as a multiple of n_head{fine_tune}")
        if not self.init_from.strip():  # (read as the folder "." it was refused as no Hugging Face model there)
            raise FunGPTError("model config init_from is empty: use 'scratch', a Hugging Face GPT-2 folder or a hub "
                              "name such as gpt2")
        if not 0.0 <= self.dropout < 1.0:
            raise FunGPTError(f"model config dropout={self.dropout} must be in [0, 1): use e.g. 0.0 or 0.1")
        if self.pos_encoding not in POS_ENCODINGS:
            raise FunGPTError(
                f"model config pos_encoding={self.pos_encoding!r} is unknown: use one of {', '.join(POS_ENCODINGS)}"
            )
        if self.activation not in ACTIVATIONS:
            raise FunGPTError(
                f"model config activation={self.activation!r} is unknown: use one of {', '.join(ACTIVATIONS)}"
            )
        if self.norm not in NORMS:
            raise FunGPTError(f"model config norm={self.norm!r} is unknown: use one of {', '.join(NORMS)}")
        # (nan fails this too; below 1e-30 the angles rope_base^(-2i/hs) overflow float32, and the loss is NaN)
        if not 1e-30 <= self.rope_base < math.inf:
            raise FunGPTError(f"model config rope_base={self.rope_base} must be a finite positive number (at least "
                              f"1e-30): the usual value is 10000")
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2 != 0:
            raise FunGPTError(
                f"model config head size n_embd/n_head={self.n_embd // self.n_head} must be even for "
                "pos_encoding='rope' (dimensions are rotated in pairs): change n_embd or n_head"
            )

    def check_new(self) -> None:
        """Refuse what would make a new model blind, though it builds and trains (checked for new runs only: a run
        saved with such a config still loads, samples and resumes). LayerNorm of a single number outputs its bias
        whatever the number (x minus its mean is 0): a model whose norms see one feature cannot see its input
        (n_embd 1: constant logits; QK-norm at head size 1: q and k all 0, attention uniform). RMSNorm keeps the
        sign."""
        if self.norm == "layernorm" and self.n_embd == 1:
            raise FunGPTError("model config n_embd=1 with norm='layernorm': LayerNorm of one number is always its "
                              "bias, so the model could not see its input: use a larger n_embd, or norm='rmsnorm'")
        if self.norm == "layernorm" and self.qk_norm and self.n_embd // self.n_head == 1:
            raise FunGPTError(f"model config qk_norm with head size n_embd/n_head=1 and norm='layernorm': LayerNorm "
                              f"of one number is always its bias, so q and k would be constant and attention "
                              f"uniform: use fewer heads (n_head < {self.n_embd}), or norm='rmsnorm'")
    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Build a config from a dict (e.g. read from JSON); unknown keys are an error, not ignored."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise FunGPTError(f"unknown model config key(s) {', '.join(unknown)}: valid keys are {', '.join(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_norm(config: GPTConfig, dim: int, bias: bool | None = None) -> nn.Module:
    """LayerNorm: (x - mean) / sqrt(var + eps) * weight + bias, var the biased variance over the last dimension (C; hs
    for QK-norm).
    RMSNorm: x / sqrt(mean(x^2) + eps) * weight (no centring, no bias).

    On a CPU, LayerNorm is one fused kernel while RMSNorm is composed of several element-wise
    operations: a step with RMSNorm everywhere was 2-20% slower there in the speedrun ablations of the second and
    fourth sessions, although it does less maths, and as fast in the latest (BENCHMARKS.md, 2026-12-02: 58 against
    57 ms). Autograd also keeps more for its backward: the normalised input besides the input.
    """
    # eps 1e-5 is GPT-2's layer_norm_epsilon: another value would change the outputs of its loaded weights
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-5)
    return nn.LayerNorm(dim, eps=1e-5, bias=config.bias if bias is None else bias)


class _ReLU2Function(torch.autograd.Function):
    """relu(x)^2 with a hand-written backward: d/dx relu(x)^2 = 2 relu(x).

    Autograd on `F.relu(x).square()` saves relu(x) (for both of its backward
    functions) and runs four element-wise passes in backward; this needs two
    (measured 1.5x as fast forward + backward on a CPU, where the MLP's (B, T, 4C)
    tensors make every pass over memory count; BENCHMARKS.md, second session: 1,502 -> 985 us on (32, 64, 512)).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # create_graph=True: r has no graph back to x, so the result would be cut off
            raise FunGPTError("activation 'relu2' has a hand-written backward that cannot be differentiated again "
                              "(create_graph=True): use activation 'gelu' where second derivatives are needed")
        (r,) = ctx.saved_tensors
        return (r + r).mul_(grad)  # 2 relu(x) * grad: zero where x <= 0


class ReLU2(nn.Module):
    """ReLU squared, relu(x)^2 (So et al. 2021, "Primer"); used in the modded-nanogpt speedrun."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLU2Function.apply(x)


_ACTIVATIONS = {  # by config name; a new one is added here only (ACTIVATIONS, the names GPTConfig accepts, follow)
    # GPT-2 used the tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) of GELU
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu": lambda: nn.GELU(),  # exact: x * Phi(x), Phi the standard normal CDF
    "relu2": ReLU2,
}
ACTIVATIONS = tuple(_ACTIVATIONS)


def make_activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    Every token emits a query q, a key k and a value v (three linear maps of x).
    Token t's output is a weighted average of the values of tokens 0..t, with
    weights softmax(q_t . k_s / sqrt(hs)): the "scaled dot-product attention"
    of Vaswani et al. The 1/sqrt(hs) keeps the scores at unit variance (for q and k of zero-mean, unit-variance
    components) so the softmax does not saturate. "Causal": a token never looks at later tokens, which is what lets
    us train on all positions of a sequence at once.
    With nh heads, C is split into nh independent heads of size hs.
    """

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache belongs to this layer
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)  # mixes the heads' outputs
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm (Henry et al. 2020; Dehghani et al. 2023): bounds the scores q.k, preventing attention-logit blow-ups.
        # It uses the model's norm kind, without bias (a gain per head dimension).
        self.q_norm = make_norm(config, self.head_size, bias=False) if config.qk_norm else nn.Identity()
        self.k_norm = make_norm(config, self.head_size, bias=False) if config.qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        positions: NoPositions,
        pos: torch.Tensor,
        kv_cache: "KVCache | None" = None,
        attn_impl: str = "sdpa",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C) -> (y (B, T, C), attention weights (B, nh, T, T_total) if attn_impl='plain' else None)."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_size)  # (B, T, 3, nh, hs): C = nh * hs
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hs), views into qkv
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = positions.rotate(q, k, pos)  # RoPE rotates here; other encodings: identity

        if kv_cache is not None:
            # Store this chunk's keys/values at positions t0..t0+T-1, get back all of 0..t0+T-1.
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, T_total, hs), T_total = t0 + T
        T_total = k.size(2)
        t0 = T_total - T  # absolute position of the first query

        # Query i (absolute position t0 + i) may see keys j <= t0 + i: a lower-triangular
        # (T, T_total) mask shifted right by t0. Without a cache t0 = 0 and it is square.
        weights = None
        # The plain branch spells the maths out (`fungpt attention` draws its weights; tests check sdpa against it).
        # Training and generation run the sdpa branch: an edit of the maths belongs in both (sdpa takes scale=).
        if attn_impl == "plain":
            mask = torch.ones(T, T_total, dtype=torch.bool, device=x.device).tril(diagonal=t0)  # (T, T_total)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_size)  # (B, nh, T, T_total)
            att = att.masked_fill(~mask, float("-inf"))  # forbidden entries get zero weight after softmax
            weights = F.softmax(att, dim=-1)  # (B, nh, T, T_total), each row sums to 1
            y = self.attn_dropout(weights) @ v  # (B, nh, T, hs)
        elif attn_impl == "sdpa":
            # Same maths in one fused (often flash-attention) kernel. Careful with the mask:
            # is_causal=True aligns the triangle to the *top-left*, i.e. assumes t0 = 0, which is
            # wrong for a cache with t0 > 0 and T > 1. So: is_causal for t0 = 0; no mask for a
            # single new token (it may see everything cached); an explicit mask otherwise.
            mask = None
            if t0 > 0 and T > 1:
                mask = torch.ones(T, T_total, dtype=torch.bool, device=x.device).tril(diagonal=t0)
            # Attention dropout: CUDA's fused kernels apply it inside; torch's fused CPU kernel has none, so on
            # a CPU dropout_p > 0 takes the unfused path, which keeps (B, nh, T, T) tensors for the backward pass.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=(t0 == 0 and T > 1),
                dropout_p=self.dropout if self.training else 0.0,
            )  # (B, nh, T, hs)
        else:
            raise FunGPTError(f"attn_impl={attn_impl!r} is unknown: use 'sdpa' or 'plain'")

        # (B, nh, T, hs) -> transpose -> (B, T, nh, hs) -> (B, T, C): the heads' outputs side by side
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), weights


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> 4C -> activation -> C, applied to every token alone.
    (4C as in the original Transformer, 2048 for 512, and GPT-2, 3072 for 768: its weights load only at 4C.)"""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # Under bfloat16 products (train.dtype = "bfloat16" on a CPU) c_fc's output stays bfloat16: the activation
        # runs on bfloat16 inputs (its outputs differ from float32's by about one bfloat16 rounding; the same val
        # loss, BENCHMARKS.md, "Thirty-first session"), and four (B, T, 4C) casts a step are saved
        self.c_fc.keeps_bfloat16 = True
        self.act = make_activation(config.activation)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One transformer block: attention (tokens talk to each other), then MLP (each token thinks alone)."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, positions, pos, kv_cache=None, attn_impl="sdpa"):
        a, weights = self.attn(self.ln_1(x), positions, pos, kv_cache, attn_impl)
        x = x + a  # residual connection: each sub-layer only adds a correction to x
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class KVCache:
    """Keys and values of past tokens, so generation does not recompute them every step.

    When generating, the keys/values of tokens already seen never change (causal
    attention: earlier tokens never look at later ones). So we keep them, and
    each step only runs the network on the newest token.

    Preallocated tensors, one slot per layer:
        k, v: (n_layer, B, nh, max_len, hs)
        pos:  number of positions filled so far (the absolute position t0 of the next token)
    A forward pass with the cache writes its T new keys/values into [pos:pos+T],
    attends over [:pos+T], and then advances pos by T. reset() empties it.
    """

    def __init__(self, n_layer, batch_size, n_head, max_len, head_size, device=None, dtype=torch.float32):
        shape = (n_layer, batch_size, n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0  # no need to zero the tensors: positions >= pos are never read

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at [pos:pos+T]; return all keys/values (B, nh, pos+T, hs)."""
        t0, T = self.pos, k.size(2)
        if k.size(0) != self.k.size(1):
            raise FunGPTError(f"KV cache was made for batch size {self.k.size(1)}, got {k.size(0)}: make a new cache")
        if t0 + T > self.max_len:
            raise FunGPTError(f"KV cache is full ({t0} + {T} > max_len {self.max_len}): reset() it or crop the context")
        k_all, v_all = self.k[layer], self.v[layer]  # (B, nh, max_len, hs)
        k_all.narrow(2, t0, T).copy_(k)  # positions t0 .. t0+T-1
        v_all.narrow(2, t0, T).copy_(v)
        return k_all.narrow(2, 0, t0 + T).to(k.dtype), v_all.narrow(2, 0, t0 + T).to(v.dtype)


def check_ids(idx, what: str) -> None:
    """Refuse, in one line, token ids the embedding cannot look up: anything but a (B, T) tensor of torch.long or
    torch.int (a uint16 array from train.bin, bools, floats, a list). `what` starts the message."""
    if not isinstance(idx, torch.Tensor):  # (a list of ids: torch.tensor([ids]) makes the tensor)
        raise FunGPTError(f"{what} as a (B, T) tensor of token ids, got a {type(idx).__name__}: e.g. "
                          f"torch.tensor([ids]) for one sequence")
    if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int):
        raise FunGPTError(f"{what} as a (B, T) integer tensor (torch.long), got {idx.dtype} of shape "
                          f"{tuple(idx.shape)}: for one sequence use ids[None], for numpy ids .long()")


def out_of_vocab(ids: torch.Tensor, vocab_size: int, where: str, more: str = "") -> FunGPTError:
    """The error for ids outside 0..vocab_size-1, naming the first such id (a tokenizer that does not match)."""
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    return FunGPTError(f"{where} token id {int(bad[0]) if bad.numel() else '?'}, outside this model's "
                       f"vocabulary (0..{vocab_size - 1}): use the tokenizer the model was trained with{more}")


class GPT(nn.Module):
    """The language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding table (V, C)
        self.pos = make_positions(config)  # see positions.py
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config, config.n_embd)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)  # (C -> V)
        if config.tie_embeddings:
            # Weight tying (Press & Wolf 2017): the output layer scores token v by the dot product
            # of the final hidden state with v's input embedding. Saves V*C parameters (38M in GPT-2).
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2 init: every block adds its two c_proj outputs to the residual stream, so the variance
        # of x grows with depth. Scaling these by 1/sqrt(2 * n_layer) makes the sum of all 2 * n_layer
        # branches about as large as one unscaled branch, whatever the depth (GPT-2 paper: scale the
        # residual layers' weights by 1/sqrt(N), N the number of residual layers).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 initialisation: N(0, 0.02²) weights (std 0.02), zero biases, as Hugging Face's GPT2 does (its
        # initializer_range). OpenAI's original code drew the position table with std 0.01.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attn_impl: str = "sdpa",
        return_attn: bool = False,
        kv_cache: KVCache | None = None,
    ):
        """Run the model on token ids idx (B, T).

        Returns
            logits (B, T, V)                      if targets is None and not return_attn
            (logits, loss)                        if targets (B, T) is given; loss is the mean
                                                  cross-entropy over positions whose target != -1
                                                  (NaN if there are none)
            (logits, loss_or_None, attn)          if return_attn: attn is a list with one
                                                  (B, nh, T, T_total) tensor of attention weights
                                                  per layer (this forces attn_impl='plain')
        attn_impl: 'sdpa' (fused, fast) or 'plain' (explicit softmax, readable; same result).
        kv_cache: continue from the kv_cache.pos tokens already cached (see generate_stream).
        """
        check_ids(idx, "the model takes its input")
        if targets is not None and not (isinstance(targets, torch.Tensor) and targets.shape == idx.shape
                                        and targets.dtype in (torch.long, torch.int)):
            got = (f"{targets.dtype} of shape {tuple(targets.shape)}" if isinstance(targets, torch.Tensor)
                   else f"a {type(targets).__name__}")
            raise FunGPTError(f"targets must be an integer tensor of the input's shape {tuple(idx.shape)}, got {got}")
        B, T = idx.shape
        t0 = kv_cache.pos if kv_cache is not None else 0
        if t0 + T > self.config.block_size:
            if kv_cache is None:
                raise FunGPTError(f"sequence length {T} exceeds block_size {self.config.block_size}; crop the context")
            raise FunGPTError(
                f"sequence length {t0 + T} (cached {t0} + new {T}) exceeds block_size "
                f"{self.config.block_size}; crop the context and reset the cache"
            )
        if return_attn:
            attn_impl = "plain"  # only the plain path materialises the weights
        pos = torch.arange(t0, t0 + T, device=idx.device)  # (T,) absolute positions

        try:
            x = self.pos.add_to_embeddings(self.wte(idx), pos)  # (B, T, C)
        except IndexError:  # (a tokenizer that does not match the model, usually)
            raise out_of_vocab(idx, self.config.vocab_size, "the input holds") from None
        x = self.drop(x)
        attn = []
        for block in self.blocks:
            x, weights = block(x, self.pos, pos, kv_cache, attn_impl)
            attn.append(weights)
        if kv_cache is not None:
            kv_cache.pos += T  # every layer has stored its keys/values for these T tokens
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)

        loss = None
        if targets is not None:
            # Cross-entropy = -log p(correct next token), averaged; -1 marks positions to skip.
            # (B*T, V) logits against (B*T,) targets: cross_entropy takes (N, classes) and (N,)
            try:
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), ignore_index=-1)
            except IndexError:  # (a target id outside the vocabulary; a CPU says so, a GPU asserts)
                raise out_of_vocab(targets[targets != -1], self.config.vocab_size, "the targets hold",
                                   "; -1 marks a position to skip") from None
        if return_attn:
            return logits, loss, attn
        return logits if targets is None else (logits, loss)

    # ------------------------------------------------------------------ generation

    def make_kv_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache for this model with room for block_size positions."""
        c, p = self.config, self.wte.weight
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 0:
            raise FunGPTError(f"make_kv_cache: batch_size={batch_size!r} must be a whole number >= 0")
        return KVCache(c.n_layer, batch_size, c.n_head, c.block_size, c.n_embd // c.n_head, p.device, p.dtype)

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        yield_logits: bool = False,
        lookahead: int = 0,
    ) -> Iterator[torch.Tensor]:
        """Continue the prompt idx (B, T) one token at a time, yielding each new token's ids (B,).

        With yield_logits=True it yields (ids (B,), logits (B, V)) pairs instead: the raw logits
        the token was sampled from, for showing next-token probabilities.

        use_cache=False is the reference: every step runs the whole model on the last
        block_size tokens. use_cache=True gives the same tokens, faster: run the prompt
        once to fill the KV cache ("prefill"), then feed only the newest token. When the
        sequence outgrows block_size the window slides: positions restart at 0 for the
        last block_size tokens (exactly what the uncached path sees), so the cache is
        rebuilt from that window, at every step from then on. One float32 sequence on a CPU takes
        its single-token steps through decode.py's Decoder: the same logits, far fewer operations
        (GPT.forward instead with module hooks, parametrized layers, overridden forwards, or an edit to the
        forwards of this file that decode.py repeats: see Decoder.supports; this is decided when generation starts,
        so a hook registered while a stream is paused runs from the next generation on).

        lookahead=k > 0 (greedy decoding, temperature=0, batch size 1, with the cache) turns on
        prompt-lookup speculation (speculative.py): guess the next k tokens by copying from
        earlier text and check all guesses in one forward pass. The output is the same greedy
        sequence; it arrives sooner when the text repeats itself.
        """
        check_ids(idx, "generate takes the prompt")
        if idx.size(1) == 0:
            raise FunGPTError("generate needs a prompt with at least one token: pass a non-empty prompt")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise out_of_vocab(idx, self.config.vocab_size, "the prompt holds")
        temperature, top_p = check_generate_args(max_new_tokens, lookahead, temperature, top_k, top_p)  # (sampling.py)
        block_size = self.config.block_size
        B, T0 = idx.shape
        # All tokens so far, in a buffer: writing into it is cheaper than torch.cat every step. It doubles when
        # full (a copy per doubling), so a huge max_new_tokens (a stream left running) allocates nothing up front.
        end = T0 + max_new_tokens  # the length of the finished sequence
        # (torch.long whatever the prompt's type: every step yields ids of one type, drafted or sampled)
        seq = torch.empty(B, min(end, T0 + 1024), dtype=torch.long, device=idx.device)  # (1024 ids: 8 KiB)
        seq[:, :T0] = idx
        n = T0  # tokens filled in seq
        speculate = lookahead > 0 and use_cache and temperature == 0 and B == 1
        # (a draft fits in the block with the token before it; without speculation lookahead plays no part, and a huge
        # one sized the token buffer: 8 TB asked of the allocator)
        lookahead = min(lookahead, block_size - 1) if speculate else 0
        history = idx[0].tolist() if speculate else []  # a Python list makes the n-gram search cheap
        # No dropout while generating: a model in training mode computes each step in eval mode and has its mode back
        # at each yield, so streams taking turns, or one left unfinished, change nothing for the others.
        held: list[nn.Module] = []  # the modules this stream switched to eval mode for the step it is computing
        # (a submodule in training mode under a model in eval mode is looked for once: a walk over the modules at
        # every step would cost a decoding step a few percent)
        partly_training = any(m.training for m in self.modules())

        def hold(on: bool) -> None:
            if on and not held and (self.training or partly_training):  # (held: this step holds them already)
                held[:] = [m for m in self.modules() if m.training]
                self.eval()
            elif not on:
                for m in held:  # (each as it was: a submodule the caller put in eval mode stays so)
                    m.training = True
                held.clear()

        hold(True)
        try:
            cache = self.make_kv_cache(B) if use_cache else None
            # One float32 sequence on a CPU: single-token steps take the lean path of decode.py (see the docstring)
            decoder = Decoder(self, cache) if use_cache and Decoder.supports(self, idx) else None
            while n < end:
                hold(True)
                if min(n + 1 + lookahead, end) > seq.size(1):  # room for this step's tokens (a draft's too)
                    bigger = seq.new_empty(B, min(max(2 * seq.size(1), n + 1 + lookahead), end))
                    bigger[:, :n] = seq[:, :n]
                    seq = bigger
                if cache is None:
                    logits = self(seq[:, max(0, n - block_size) : n])  # (B, T', V)
                elif cache.pos == 0 or cache.pos >= block_size:
                    cache.reset()  # (re)fill the cache from the current window
                    logits = self(seq[:, max(0, n - block_size) : n], kv_cache=cache)
                else:
                    # the draft's length: what is left to generate, and what the block has room for after the
                    # token it follows (a lookahead as long as the block turned speculation off without a word)
                    k = min(lookahead, end - n - 1, block_size - cache.pos - 1)
                    draft = lookup_draft(history, k) if k > 0 else []
                    if draft:
                        for item in verify_draft(self, seq, n, draft, cache, history, yield_logits):
                            hold(False)
                            yield item
                            hold(True)
                        n = len(history)  # history holds the prompt and every token yielded so far
                        continue
                    if decoder is not None:
                        logits = decoder.step(seq[0, n - 1 : n])  # (1, 1, V), as GPT.forward below
                    else:
                        logits = self(seq[:, n - 1 : n], kv_cache=cache)  # (B, 1, V): just the newest token
                last = logits[:, -1, :]  # (B, V)
                next_id = sample_next_token(last, generator, temperature, top_k, top_p)  # (B, 1)
                seq[:, n] = next_id[:, 0]
                n += 1
                if speculate:
                    history.append(int(next_id))
                hold(False)
                if yield_logits and logits.size(1) > 1:
                    last = last.clone()  # (a view would keep every position's logits alive: GPT-2's 206 MB)
                yield (next_id[:, 0], last) if yield_logits else next_id[:, 0]
        finally:
            hold(False)  # (an error, or the stream closed mid-step)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        lookahead: int = 0,
    ) -> torch.Tensor:
        """Like generate_stream, but returns the prompt plus all new tokens: (B, T + max_new_tokens)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache,
                                        lookahead=lookahead))  # max_new_tokens x (B,)
        # (B, T + max_new_tokens), in the prompt's integer type
        return torch.cat((idx, torch.stack(new, dim=1).to(idx.dtype)), dim=1) if new else idx.clone()

    # ------------------------------------------------------------------ accounting

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters (a tied matrix counts once).

        non_embedding=True leaves out the position table and, if untied, the token
        embedding table (pure look-ups, no compute). A tied wte stays in: it is also
        the output layer, which does a real matmul (the nanoGPT convention).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once
        if non_embedding:
            n -= sum(p.numel() for p in self.pos.parameters())
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token at full context (PaLM paper, Chowdhery et al. 2022, appendix B).

        6N: each weight does one multiply-add (2 FLOPs) per token forward and twice that
        backward, N = non-embedding parameters. Plus attention scores and weighted sum,
        which have no weights: 12 * n_layer * n_embd * block_size (same 2 + 4 split). That counts
        the full T x T score matrix, PaLM's convention; causal attention needs about half of it.
        """
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size

    # ------------------------------------------------------------------ Hugging Face GPT-2 interop
    # The mapping between HF's GPT-2 layout and ours (names, transposed Conv1D weights) is in fungpt/hf.py.

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> "GPT":
        """Load a local Hugging Face GPT-2 folder (any size gpt2 .. gpt2-xl), e.g. from save_pretrained."""
        from fungpt.hf import load_gpt2

        return load_gpt2(path)

    @staticmethod
    def hf_config(path: str | os.PathLike) -> GPTConfig:
        """The architecture of a local Hugging Face GPT-2 folder, read from its config.json (no weights)."""
        from fungpt.hf import hf_config

        return hf_config(path)

    def save_hf(self, path: str | os.PathLike) -> None:
        """Save as a Hugging Face GPT-2 folder (config.json + model.safetensors) for GPT2LMHeadModel."""
        from fungpt.hf import save_gpt2

        save_gpt2(self, path)
