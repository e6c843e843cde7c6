"""Tests for fungpt/model.py and fungpt/positions.py (tiny models, CPU, no network)."""

import dataclasses
import json
import math
import re
import typing
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

from fungpt.errors import FunGPTError
from fungpt.hf import load_gpt2
from fungpt.model import GPT, GPTConfig, KVCache, make_activation, make_norm, sample_next_token
from fungpt.positions import POS_ENCODINGS, RotaryPositions
from fungpt.sampling import sampling_probs

pytestmark = pytest.mark.usefixtures("two_threads")  # (the cached == uncached checks on decoding's row sums)


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


def make_model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw)).eval()


def tokens(B, T, vocab=50, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- forward


def test_output_shapes_and_loss():
    model = make_model()
    idx = tokens(3, 10)
    logits = model(idx)
    assert logits.shape == (3, 10, 50)
    logits2, loss = model(idx, idx)
    assert torch.equal(logits, logits2) and loss.shape == ()
    logits3, loss3, attn = model(idx, return_attn=True)
    assert loss3 is None and len(attn) == 2 and attn[0].shape == (3, 2, 10, 10)
    assert torch.allclose(attn[0].sum(-1), torch.ones(3, 2, 10))
    assert torch.allclose(logits3, logits, atol=1e-5)


def test_too_long_sequence_is_a_clear_error():
    model = make_model()
    with pytest.raises(FunGPTError, match="exceeds block_size 16"):
        model(tokens(1, 17))


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
@pytest.mark.parametrize("variant", [{}, {"norm": "rmsnorm", "qk_norm": True, "activation": "relu2", "bias": False}])
def test_causality(pos_encoding, variant):
    model = make_model(pos_encoding=pos_encoding, **variant)
    idx = tokens(2, 16)
    t = 6
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 50
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])
    # two tokens, the shortest sequence a mask matters for: the first must not see the second
    assert torch.allclose(model(idx[:, :2])[:, 0], model(changed[:, :1].repeat(1, 2))[:, 0], atol=1e-6)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_plain_attention_matches_sdpa(pos_encoding):
    model = make_model(pos_encoding=pos_encoding, qk_norm=pos_encoding == "rope")
    idx = tokens(2, 16)
    assert torch.allclose(model(idx, attn_impl="plain"), model(idx, attn_impl="sdpa"), atol=1e-5)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_only_positions_tell_a_one_layer_model_the_order_of_its_context(pos_encoding):
    """One layer of causal attention without positions sees the tokens before the last as a bag: swapping two of
    them leaves the last position's logits unchanged ("none"); every position encoding makes them differ."""
    model = make_model(pos_encoding=pos_encoding, n_layer=1)
    idx = tokens(1, 8)
    swapped = idx.clone()
    swapped[0, [1, 4]] = idx[0, [4, 1]]
    assert idx[0, 1] != idx[0, 4]
    with torch.no_grad():
        change = (model(idx)[0, -1] - model(swapped)[0, -1]).abs().max().item()
    # none: float rounding only (~5e-8); the encodings: 6e-6 (sinusoidal, whose table outweighs the 0.02-std
    # token embeddings) to 8e-4 (learned)
    assert (change > 1e-6) == (pos_encoding != "none"), change


def test_the_sinusoidal_table_is_vaswani_et_als():
    """PE(p, 2i) = sin(p / 10000^(2i/C)), PE(p, 2i+1) = cos(p / 10000^(2i/C)) (Attention Is All You Need, 3.5)."""
    C = 32
    model = make_model(pos_encoding="sinusoidal", n_embd=C)
    pe = model.pos.pe  # (block_size, C)
    for p_, i in [(0, 0), (1, 0), (5, 3), (15, 15), (7, 8)]:
        angle = p_ / 10000 ** (2 * i / C)
        assert pe[p_, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert pe[p_, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_targets_minus_one_are_ignored():
    model = make_model()
    idx = tokens(2, 10)
    targets = tokens(2, 10, seed=5)
    masked = targets.clone()
    masked[:, ::2] = -1
    logits, loss = model(idx, masked)
    keep = masked != -1
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_initial_loss_is_log_vocab():
    model = make_model(seed=3)
    idx = tokens(32, 16, seed=2)
    _, loss = model(idx, tokens(32, 16, seed=4))
    assert abs(loss.item() - math.log(50)) < 0.1


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny()).train()
    idx = tokens(4, 16, seed=7)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("impl", ["sdpa", "plain"])
def test_attention_dropout_acts_in_training_only(impl):
    """Only the attention weights' dropout left on (embedding, residual and MLP dropout off): two training
    forwards differ, two eval forwards agree, and the loss still backpropagates."""
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.3))
    model.eval()
    for block in model.blocks:
        block.attn.train()
        block.attn.resid_dropout.eval()
    idx = tokens(2, 16)
    a, b = model(idx, attn_impl=impl), model(idx, attn_impl=impl)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx, attn_impl=impl), model(idx, attn_impl=impl))
    model.train()
    _, loss = model(idx, tokens(2, 16, seed=3), attn_impl=impl)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- KV cache and generation


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_cached_equals_uncached_greedy_past_block_size(pos_encoding):
    model = make_model(pos_encoding=pos_encoding)
    model.train()  # generation must switch to eval and back
    prompt = tokens(2, 5)
    fast = model.generate(prompt, 40, temperature=0, use_cache=True)
    slow = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert fast.shape == (2, 45)
    assert torch.equal(fast, slow)
    assert torch.equal(fast[:, :5], prompt)
    assert model.training


def test_generate_with_long_prompt_is_cropped():
    model = make_model(pos_encoding="rope")
    prompt = tokens(1, 30)
    out = model.generate(prompt, 5, temperature=0)
    assert torch.equal(out, model.generate(prompt, 5, temperature=0, use_cache=False))
    assert torch.equal(model.generate(prompt[:, -16:], 1, temperature=0)[:, -1], out[:, 30])


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)  # (every one: logits, where greedy tokens can hide a bug)
def test_cache_chunked_prefill_matches_full_forward(pos_encoding):
    # Prefill 6 tokens, then a chunk of 5 (T > 1 with t0 > 0: needs the shifted mask), then 1.
    model = make_model(pos_encoding=pos_encoding)
    idx = tokens(2, 12)
    full = model(idx)
    for impl in ("sdpa", "plain"):
        cache = model.make_kv_cache(2)
        parts = [model(idx[:, a:b], kv_cache=cache, attn_impl=impl) for a, b in [(0, 6), (6, 11), (11, 12)]]
        assert cache.pos == 12
        assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_kv_cache_shapes_and_errors():
    cache = KVCache(n_layer=2, batch_size=3, n_head=2, max_len=16, head_size=16)
    assert cache.k.shape == (2, 3, 2, 16, 16) and cache.pos == 0
    model = make_model()
    model(tokens(3, 10), kv_cache=cache)
    assert cache.pos == 10
    with pytest.raises(FunGPTError, match="exceeds block_size"):
        model(tokens(3, 7), kv_cache=cache)
    cache.reset()
    assert cache.pos == 0
    with pytest.raises(FunGPTError, match="batch size"):
        model(tokens(2, 4), kv_cache=cache)


def test_generate_stream_yields_each_token():
    model = make_model()
    prompt = tokens(2, 3)
    steps = list(model.generate_stream(prompt, 4, temperature=0))
    assert len(steps) == 4 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), model.generate(prompt, 4, temperature=0)[:, 3:])


def test_seeded_sampling_is_reproducible():
    model = make_model()
    prompt = tokens(2, 3)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.95, generator=g)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


# ---------------------------------------------------------------- sample_next_token


def allowed_tokens(logits, n=400, **kw):
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits.expand(n, -1), generator=g, **kw)
    return set(draws.flatten().tolist())


def test_speculation_refuses_nan_logits_as_plain_greedy_decoding_does(monkeypatch):
    """verify_draft took argmax of the logits directly: a NaN row became token 0, an inf one won, where the plain
    path stops with its clear error (a model that diverged)."""
    model, idx = make_model(), torch.zeros(1, 6, dtype=torch.long)  # a repeating prompt: drafts are made
    real = GPT.forward

    def poisoned(self, x, *args, **kwargs):  # NaN logits from position 8 on, as a model gone bad might give
        cache = kwargs.get("kv_cache")
        t0 = cache.pos if cache is not None else 0
        logits = real(self, x, *args, **kwargs)
        at = torch.arange(t0, t0 + x.size(1))[None, :, None] >= 8  # (1, T, 1)
        return logits.masked_fill(at, float("nan"))

    monkeypatch.setattr(GPT, "forward", poisoned)
    for lookahead in (0, 4):
        with pytest.raises(FunGPTError, match="the logits are NaN or infinite"):
            model.generate(idx, 6, temperature=0.0, lookahead=lookahead, use_cache=True)


def test_top_k_and_top_p_choose_from_the_tempered_distribution():
    """Temperature first, then top-k and top-p: the nucleus of [0.5, 0.25, 0.25] at temperature 2 is all three
    tokens (tempered: 0.41, 0.29, 0.29), at temperature 0.5 the first alone (0.67, 0.17, 0.17)."""
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert allowed_tokens(logits, temperature=2.0, top_p=0.5) == {0, 1, 2}
    assert allowed_tokens(logits, temperature=0.5, top_p=0.6) == {0}
    assert allowed_tokens(logits, top_p=0.6) == {0, 1, 2}  # (untempered, 0.5 alone is short of 0.6)


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1, keepdim=True))
    assert sample_next_token(logits).shape == (5, 1)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("row", [[float("-inf")] * 3, [1.0, float("nan"), 0.0], [float("inf"), 1.0, 2.0]])
def test_broken_logits_are_refused_greedy_or_not(row, temperature):
    """A diverged model's logits: sampling refused them, greedy picked token 0 (all -inf) or the NaN."""
    with pytest.raises(FunGPTError, match="NaN"):
        sample_next_token(torch.tensor([row]), temperature=temperature)
    with pytest.raises(FunGPTError, match="NaN"):  # in any row of a batch
        sample_next_token(torch.tensor([[0.0, 1.0, 2.0], row]), temperature=temperature)
    if math.inf in row and temperature:
        with pytest.raises(FunGPTError, match=r"\+inf"):  # the message names what it was
            sample_next_token(torch.tensor([row]), temperature=temperature)


def test_generate_refuses_ids_it_cannot_embed_in_one_line():
    """Such prompts reached the embedding and failed there with a raw RuntimeError or IndexError."""
    model = make_model()  # vocab 50
    for dtype in (torch.uint8, torch.int16, torch.bool, torch.float32):
        with pytest.raises(FunGPTError, match=f"got {dtype} of shape"):
            model.generate(torch.ones(1, 3, dtype=dtype), 2)
    with pytest.raises(FunGPTError, match=r"got a list: e.g. torch.tensor\(\[ids\]\) for one sequence"):
        model.generate([[1, 2, 3]], 2)  # (was: 'list' object has no attribute 'dim')
    for bad in (-1, 50):
        with pytest.raises(FunGPTError, match=rf"token id {bad}, outside this model's vocabulary \(0..49\)"):
            model.generate(torch.tensor([[1, bad, 2]]), 2)
    assert model.generate(torch.tensor([[1, 2]], dtype=torch.int), 2).shape == (1, 4)
    assert model.generate(torch.empty(0, 3, dtype=torch.long), 2).shape == (0, 5)  # an empty batch, as before


def test_a_stream_longer_than_its_first_buffer_gives_the_same_tokens_and_allocates_nothing_up_front():
    """The token buffer starts at 1,024 new tokens and doubles: a stream asked for 10**12 tokens (left running
    until stopped) starts at once, where it tried to allocate them all (or raised TypeError past 2**63)."""
    model = make_model(block_size=8)
    idx = torch.tensor([[1, 2, 3]])
    for lookahead in (0, 4):
        g = torch.Generator().manual_seed(0)
        long = model.generate(idx, 1100, temperature=0.0, lookahead=lookahead)  # past the first buffer
        assert long.shape == (1, 1103)
        ref = model.generate(idx, 1100, temperature=0.0, use_cache=False)
        assert torch.equal(long, ref)
        stream = model.generate_stream(idx, 10**20, generator=g, lookahead=lookahead)
        next(stream)  # (it used to allocate 10**20 tokens first: out of memory, or TypeError past 2**63)
    # drafts accepted across the buffer's end: a model of zeros repeats itself, so lookahead drafts all the way
    echo = make_model(block_size=2048)
    with torch.no_grad():
        for p in echo.parameters():
            p.zero_()
    drafted = echo.generate(idx, 1100, temperature=0.0, lookahead=4)
    assert torch.equal(drafted, echo.generate(idx, 1100, temperature=0.0, use_cache=False))


def test_a_stream_yields_ids_of_one_type_for_an_int32_prompt():
    """Drafted tokens were views of the prompt-typed buffer (int32), sampled ones int64, in the same stream."""
    model = make_model(block_size=32)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # greedy repeats token 0, so lookahead's drafts are accepted
    idx = torch.tensor([[1, 0, 0, 0, 0]], dtype=torch.int)
    for lookahead in (0, 4):
        kinds = {t.dtype for t in model.generate_stream(idx, 9, temperature=0.0, lookahead=lookahead)}
        assert kinds == {torch.int64}, (lookahead, kinds)
        assert model.generate(idx, 9, temperature=0.0, lookahead=lookahead).dtype == torch.int32


def test_a_tiny_temperature_samples_the_largest_logits_not_nan():
    from fungpt.sampling import sampling_probs

    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0], [40.0, -1e4, 39.99, 0.0]])
    for t in (1e-8, 1e-300):  # dividing unshifted logits by these overflows float32 to +-inf: NaN after softmax
        probs = sampling_probs(logits, temperature=t)
        assert torch.equal(probs, torch.tensor([[0.0, 0.5, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0]]))
    assert allowed_tokens(logits[1:], temperature=1e-300) == {0}
    # a huge one, beyond float32 (inf there), over a masked -inf logit: flat over the others, not NaN
    masked = torch.tensor([[1.0, float("-inf"), 3.0, 2.0]])
    assert torch.allclose(sampling_probs(masked, temperature=1e39), torch.tensor([[1 / 3, 0.0, 1 / 3, 1 / 3]]))
    # float64 logits past float32's range (a float64 model): inf - inf was NaN, refused as broken logits
    huge = torch.tensor([[0.0, 1e39]], dtype=torch.float64)
    assert torch.equal(sampling_probs(huge, temperature=1.0), torch.tensor([[0.0, 1.0]]))


def test_top_k_keeps_exactly_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 0.0, 2.0]])
    assert allowed_tokens(logits, top_k=1) == {1}
    assert allowed_tokens(logits, top_k=3) == {1, 2, 3}
    # ties at the k-th value are all kept: here the 2nd largest value 3.0 appears three times
    tied = torch.tensor([[3.0, 5.0, 3.0, 1.0, 3.0, 0.0]])
    assert allowed_tokens(tied, top_k=2) == {0, 1, 2, 4}
    assert allowed_tokens(tied, top_k=100) == {0, 1, 2, 3, 4, 5}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.25, 0.15, 0.05]])
    logits = probs.log()
    assert allowed_tokens(logits, top_p=0.4) == {1}  # 0.5 >= 0.4 already
    assert allowed_tokens(logits, top_p=0.7) == {1, 2}  # 0.75
    assert allowed_tokens(logits, top_p=0.85) == {1, 2, 3}  # 0.9
    assert allowed_tokens(logits, top_p=0.01) == {1}  # always at least the top token
    assert allowed_tokens(logits, top_p=1e-46) == {1}  # also below float32's smallest number (it rounds to 0)
    # the least probable kept token (0.05) is tied with another: both are kept
    assert allowed_tokens(logits, top_p=0.95) == {0, 1, 2, 3, 4}
    tied = torch.tensor([[0.3, 0.3, 0.3, 0.1]]).log()
    assert allowed_tokens(tied, top_p=0.5) == {0, 1, 2}
    # top-k then top-p on the renormalised top-k distribution: {1: 2/3, 2: 1/3}
    assert allowed_tokens(logits, top_k=2, top_p=0.6) == {1}
    # top_p = 1 keeps every token, also where a float32 running sum reaches 1.0 before the tail (it zeroed 633 of
    # these 1000)
    wide = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0)) * 5
    assert bool((sampling_probs(wide, 1.0, None, 1.0) > 0).all())
    for bad in (float("nan"), float("inf")):  # refused by name, not blamed on the model at the draw
        with pytest.raises(FunGPTError, match="temperature"):
            sample_next_token(wide, temperature=bad)


def test_draw_follows_the_probabilities():
    from fungpt.sampling import draw

    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])  # zero-probability tokens first, between and last
    n = 20000
    ids = draw(probs.expand(n, -1), torch.Generator().manual_seed(0))  # (n, 1): each row drawn on its own
    assert ids.shape == (n, 1)
    freq = torch.bincount(ids.flatten(), minlength=6) / n
    assert freq[[0, 2, 5]].sum() == 0  # never a token with probability 0
    assert (freq - probs).abs().max() < 0.011  # ~3 standard errors of a share near 1/2: sqrt(0.25 / 20000) = 0.0035


def test_draw_gives_a_token_of_tiny_probability_a_stretch_of_its_own(monkeypatch):
    """In float32 a running sum of 0.5 plus 2^-30 is 0.5, and a uniform number is a multiple of 2^-24: such a token
    could never be drawn (with GPT-2's 50257 tokens and no top_k, thousands of tokens with p > 0)."""
    from fungpt.sampling import draw

    tiny = 2.0 ** -30
    probs = torch.tensor([[0.5, tiny, 0.5 - tiny]])
    inside = 0.5 + tiny / 4  # a uniform number that, times the total (1 + 2^-30 here), falls in token 1's stretch
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None, dtype=None: torch.full(shape, inside, dtype=dtype))
    assert draw(probs).item() == 1


def test_draw_refuses_nan_or_all_zero_probabilities():
    from fungpt.sampling import draw

    for bad in (torch.tensor([[0.5, float("nan")]]), torch.zeros(1, 3)):
        with pytest.raises(FunGPTError, match="NaN or all zero"):
            draw(bad)


def test_draw_never_runs_past_the_last_token(monkeypatch):
    from fungpt import sampling

    # A uniform number that, times the total, lands on the total itself (rounding): still a real token.
    monkeypatch.setattr(sampling.torch, "rand", lambda shape, **kw: torch.ones(shape, dtype=kw.get("dtype")))
    assert sampling.draw(torch.tensor([[0.5, 0.5, 0.0]])).item() == 1


def test_draw_at_zero_skips_leading_zero_probability_tokens(monkeypatch):
    from fungpt import sampling

    # u = 0 lies at the very start of the first stretch that is not empty: token 2, never 0 or 1 (probability 0)
    monkeypatch.setattr(sampling.torch, "rand", lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype")))
    assert sampling.draw(torch.tensor([[0.0, 0.0, 0.7, 0.3]])).item() == 2


def test_top_p_stops_where_the_mass_reaches_it():
    """A nucleus that reaches top_p exactly is complete: {0.5} for top_p 0.5, not {0.5, 0.25, 0.25}."""
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert allowed_tokens(logits, top_p=0.5) == {0}
    assert allowed_tokens(logits, top_p=0.75) == {0, 1, 2}  # 0.75 needs a second token; its tie comes along


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9, 0.999])
def test_top_p_looks_past_its_head_only_when_needed(top_p, monkeypatch):
    # top_p first sorts only the NUCLEUS_HEAD most probable tokens: the result must not depend on that size.
    from fungpt import sampling

    # a flat row (its nucleus holds 10-50 tokens), a middling one, a peaked one (1-2 tokens up to top_p 0.9)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(5)) * torch.tensor([[0.3], [2.0], [6.0]])
    whole = [sampling.sampling_probs(row, top_p=top_p) for row in logits]  # head 256 > 50 tokens: a full sort
    monkeypatch.setattr(sampling, "NUCLEUS_HEAD", 4)
    for row, want in zip(logits, whole):  # each row alone: the peaked one stays in the head, the flat one cannot
        torch.testing.assert_close(sampling.sampling_probs(row, top_p=top_p), want, rtol=0, atol=0)
    torch.testing.assert_close(sampling.sampling_probs(logits, top_p=top_p), torch.stack(whole), rtol=0, atol=0)
    assert int((whole[0] > 0).sum()) > 4  # the flat row's nucleus does reach past the head


def test_sampling_rejects_bad_arguments():
    logits = torch.zeros(1, 5)
    for kw in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(FunGPTError):
            sample_next_token(logits, **kw)


# ---------------------------------------------------------------- positions


def test_rope_scores_depend_only_on_relative_offset():
    hs = 16
    rope = RotaryPositions(block_size=64, head_size=hs)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, hs, generator=g), torch.randn(1, 1, 1, hs, generator=g)

    def score(m, n):
        qm, _ = rope.rotate(q, q, torch.tensor([m]))
        _, kn = rope.rotate(k, k, torch.tensor([n]))
        return (qm * kn).sum().item()

    for m, n in [(5, 2), (3, 9), (0, 0)]:
        for s in (1, 7, 30):
            assert score(m, n) == pytest.approx(score(m + s, n + s), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-4)
    # rotation preserves length
    qr, _ = rope.rotate(q, k, torch.tensor([11]))
    assert torch.allclose(qr.norm(), q.norm())


def test_position_buffers_are_not_saved():
    for pe, n_extra in [("learned", 1), ("sinusoidal", 0), ("rope", 0), ("none", 0)]:
        sd = make_model(pos_encoding=pe).state_dict()
        assert sum(k.startswith("pos.") for k in sd) == n_extra


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad",
    [
        {"n_embd": 30, "n_head": 4},
        {"vocab_size": 0},
        {"block_size": -1},
        {"n_layer": 0},
        {"n_head": 0},
        {"n_embd": 0},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"pos_encoding": "alibi"},
        {"activation": "swish"},
        {"norm": "batchnorm"},
        {"rope_base": 0.0},
        {"rope_base": 1e-300},  # (positive, but its angles overflow: the loss was NaN at step 1)
        {"pos_encoding": "rope", "n_embd": 30, "n_head": 10},
        {"n_layer": "2"},
        {"bias": 1},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(FunGPTError):
        tiny(**bad)


def test_an_infinite_rope_base_is_said_to_be_infinite():
    """inf was told it "must be a positive number (at least 1e-30)", which it is."""
    with pytest.raises(FunGPTError, match=r"rope_base=inf must be a finite positive number"):
        tiny(rope_base=float("inf"))


def test_relu2_refuses_a_second_derivative_by_name():
    """Its hand-written backward keeps relu(x), which has no graph back to x: with create_graph=True its gradient
    was cut off from x (a second derivative failed with "element 0 of tensors does not require grad", or through a
    model came out wrong without a word); first derivatives are exact."""
    from fungpt.model import ReLU2

    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ReLU2(), (x,))
    with pytest.raises(FunGPTError, match="activation 'relu2' has a hand-written backward that cannot be "
                                          "differentiated again"):
        torch.autograd.grad(ReLU2()(x).sum(), x, create_graph=True)  # (a result cut off from x: silently wrong)


def test_config_dict_round_trip():
    cfg = tiny(pos_encoding="rope", dropout=0.1)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(FunGPTError, match="n_layers"):
        GPTConfig.from_dict({"n_layers": 3})


# ---------------------------------------------------------------- size and FLOPs


def test_gpt2_small_parameter_count_on_meta():
    cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 1024 * 768
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token() == 6 * n + 12 * 12 * 768 * 1024
    for pe in ("sinusoidal", "rope", "none"):  # the other position modules build on meta too
        with torch.device("meta"):
            GPT(GPTConfig(pos_encoding=pe, n_layer=1))


def test_untied_embeddings_count_separately():
    tied, untied = make_model(), make_model(tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == 50 * 32
    assert untied.lm_head.weight is not untied.wte.weight
    assert tied.lm_head.weight is tied.wte.weight


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_embd=256, n_head=4, vocab_size=100, block_size=32))
    for block in model.blocks[:2]:  # both projections into the residual stream: attention's and the MLP's
        assert block.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.blocks[0].attn.c_attn.bias == 0)


# ---------------------------------------------------------------- Hugging Face interop


def random_hf_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=100, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random (not init-default) LayerNorm params, so they are really tested
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin with old buffers"])
def test_from_hf_matches_transformers(tmp_path, layout):
    hf = random_hf_model()
    if layout == "safetensors":
        hf.save_pretrained(tmp_path)
    elif layout == "sharded":  # large models come in pieces, listed in model.safetensors.index.json
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 2 and not (tmp_path / "model.safetensors").exists()
    else:  # pytorch_model.bin as older transformers wrote it, with the attention-mask buffers among the weights
        hf.config.save_pretrained(tmp_path)
        sd = {k: v for k, v in hf.state_dict().items()}
        for i in range(hf.config.n_layer):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = GPT.from_hf(tmp_path).eval()
    assert ours.config.block_size == 32 and ours.config.activation == "gelu_tanh"
    assert ours.lm_head.weight is ours.wte.weight
    idx = tokens(2, 20, vocab=100)
    with torch.no_grad():
        expected = hf(idx).logits
        assert (ours(idx) - expected).abs().max().item() < 1e-4
        assert (ours(idx, attn_impl="plain") - expected).abs().max().item() < 1e-4
    if layout == "sharded":  # a shard not copied: named (it was "the file is damaged ...; download the model again")
        lost = sorted(tmp_path.glob("model-*.safetensors"))[1]
        lost.unlink()
        for meta in (False, True):
            with pytest.raises(FunGPTError, match=re.escape(f"{lost}, listed in model.safetensors.index.json, is "
                                                            f"missing: copy the shard files into {tmp_path}")):
                load_gpt2(tmp_path, meta=meta)


def test_save_hf_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = make_model(vocab_size=100, block_size=32, activation="gelu")
    with torch.no_grad():
        for name, p in ours.named_parameters():  # non-default values everywhere
            if name.endswith("bias") or "ln_" in name:
                p.normal_(0.0, 0.1)
    ours.save_hf(tmp_path / "out")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = tokens(2, 20, vocab=100)
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() < 1e-4
    # and back again
    again = GPT.from_hf(tmp_path / "out")
    assert again.config.activation == "gelu"
    assert (again(idx) - ours(idx)).abs().max().item() < 1e-5
    assert hf.config.eos_token_id is None  # a vocabulary of 100 has no GPT-2 <|endoftext|> (id 50256)
    for vocab, eot in ((50256, None), (50257, 50256)):  # ids 0..50255 hold no 50256; GPT-2's own 50257 do
        make_model(vocab_size=vocab).save_hf(tmp_path / f"v{vocab}")
        saved = json.loads((tmp_path / f"v{vocab}" / "config.json").read_text())
        assert saved["eos_token_id"] == saved["bos_token_id"] == eot, vocab


@pytest.mark.parametrize("tie", [True, False])
def test_a_model_without_biases_saves_as_gpt2_with_zero_biases(tmp_path, tie):
    """bias=False (nanoGPT's choice, and the CPU config's) was refused by save_hf, though GPT-2 with every bias zero
    computes the same model: now written so, with the same logits in transformers (no bias for the head)."""
    transformers = pytest.importorskip("transformers")
    ours = make_model(vocab_size=100, block_size=32, activation="gelu", bias=False, tie_embeddings=tie)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "ln_" in name:
                p.normal_(1.0, 0.1)  # (not the ones they start as)
    ours.save_hf(tmp_path / "out")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()  # (a missing tensor: random, or a raise)
    assert all(not p.any() for n, p in hf.named_parameters() if n.endswith(".bias"))
    idx = tokens(2, 20, vocab=100)
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() < 1e-4
        assert (GPT.from_hf(tmp_path / "out")(idx) - ours(idx)).abs().max().item() < 1e-5


def test_save_hf_never_writes_through_a_link_at_a_fixed_temporary_name(tmp_path):
    """save_hf wrote model.safetensors.tmp and config.json.tmp, fixed names, through whatever links were there."""
    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    victim.write_text("keep")
    out.mkdir()
    for name in ("model.safetensors.tmp", "config.json.tmp"):
        (out / name).symlink_to(victim)
    model = make_model(vocab_size=50)
    model.save_hf(out)
    assert victim.read_text() == "keep"
    assert torch.equal(GPT.from_hf(out).wte.weight, model.wte.weight)


def test_save_hf_rejects_non_gpt2_models(tmp_path):
    with pytest.raises(FunGPTError, match="pos_encoding='rope'.*usable with fungpt sample"):
        make_model(pos_encoding="rope").save_hf(tmp_path)


def test_save_hf_rejects_a_model_whose_code_is_not_gpt2s(tmp_path, monkeypatch):
    """Learners' edits of model.py the config cannot show: exported, the folder failed to load in transformers (an
    MLP 8x wide) or computed another model (a ReLU), after `fungpt export` had said it was done."""
    from torch import nn

    from fungpt.decode import Decoder
    from fungpt.linear import Linear
    from fungpt.model import MLP

    assert make_model().save_hf(tmp_path / "plain") is None  # GPT-2 as it is: saved
    relu = make_model()
    relu.blocks[1].mlp.act = nn.ReLU()
    with pytest.raises(FunGPTError, match=r"the model has blocks.1.mlp.act = ReLU\(\) \(GPT-2's is GELU\(approximate="
                                          r"'tanh'\)\), so transformers' GPT2LMHeadModel would not compute it"):
        relu.save_hf(tmp_path / "relu")
    wide = make_model()
    C = wide.config.n_embd
    wide.blocks[0].mlp.c_fc, wide.blocks[0].mlp.c_proj = Linear(C, 8 * C), Linear(8 * C, C)
    with pytest.raises(FunGPTError, match=r"blocks.0.mlp.c_fc.weight of shape \[256, 32\] \(GPT-2's is \[128, 32\]\)"):
        wide.save_hf(tmp_path / "wide")
    untied = make_model()
    untied.lm_head.weight = nn.Parameter(untied.wte.weight.detach().clone())
    with pytest.raises(FunGPTError, match="an lm_head not tied to wte, though the config ties them"):
        untied.save_hf(tmp_path / "untied")
    overridden, hooked, pre_hooked = make_model(), make_model(), make_model()  # changed on the model, not in model.py
    overridden.blocks[0].mlp.forward = lambda x: x * 0
    hooked.blocks[1].register_forward_hook(lambda module, args, out: out * 0)
    pre_hooked.blocks[0].mlp.register_forward_pre_hook(lambda module, args: (args[0] * 0,))
    for i, model in enumerate((overridden, hooked, pre_hooked)):
        assert not Decoder.supports(model, torch.tensor([[1, 2]]))  # (generation runs GPT.forward, which runs them)
        with pytest.raises(FunGPTError, match=r"a forward replaced or hooked, or a parametrized weight, on one of"):
            model.save_hf(tmp_path / f"changed{i}")
    parametrized = make_model()  # (named among the causes: "replaced or hooked" alone was untrue for it)
    torch.nn.utils.parametrize.register_parametrization(parametrized.blocks[0].mlp.c_fc, "weight", nn.Identity())
    with pytest.raises(FunGPTError, match=r"or a parametrized weight, on one of its modules"):
        parametrized.save_hf(tmp_path / "parametrized")

    monkeypatch.setattr(MLP, "forward", lambda self, x: self.c_proj(self.c_fc(x)))  # no activation: model.py edited
    with pytest.raises(FunGPTError, match=r"forwards edited in fungpt/model.py"):
        make_model().save_hf(tmp_path / "edited")

    def swiglu_init(self, config):  # another layout: the check must not read mlp.act, which is gone
        nn.Module.__init__(self)
        self.w1, self.w3 = Linear(config.n_embd, 4 * config.n_embd), Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    monkeypatch.setattr(MLP, "__init__", swiglu_init)
    monkeypatch.setattr(MLP, "forward", lambda self, x: self.c_proj(torch.nn.functional.silu(self.w1(x)) * self.w3(x)))
    with pytest.raises(FunGPTError, match=r"tensors GPT-2 has not \['blocks.0.mlp.w1.bias'"):
        make_model().save_hf(tmp_path / "swiglu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # (refused before any folder was made)
    monkeypatch.undo()
    monkeypatch.setattr("fungpt.decode.mirrored_source", lambda: None)  # an install without source: nothing known
    make_model().save_hf(tmp_path / "no-source")


def test_gpt2_incompatibilities_names_every_difference():
    from fungpt.hf import gpt2_incompatibilities

    assert gpt2_incompatibilities(GPTConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=32)) == []
    modern = GPTConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=32, pos_encoding="rope", bias=False, norm="rmsnorm",
                       activation="relu2", tie_embeddings=False, qk_norm=True)
    found = " ".join(gpt2_incompatibilities(modern))
    for problem in ("pos_encoding='rope'", "norm='rmsnorm'", "activation='relu2'", "qk_norm=True"):
        assert problem in found
    assert "tie_embeddings" not in found  # GPT2LMHeadModel holds an untied lm_head too (tie_word_embeddings false)
    assert "bias" not in found  # (its biases written as zeros)


def test_from_hf_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FunGPTError, match="config.json"):
        GPT.from_hf(tmp_path / "nope")
    (tmp_path / "config.json").write_text(
        '{"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32, "vocab_size": 100}'
    )
    with pytest.raises(FunGPTError, match="model.safetensors"):
        GPT.from_hf(tmp_path)
    cases = {  # config.json -> the one-line error (each was a KeyError or JSONDecodeError traceback, or wrong logits)
        '{"model_type": "gpt2", ': "cannot read",
        '{"name": "x"}': "not a Hugging Face GPT-2 config",
        '{"out_dir": "o", "data": {}, "model": {"n_embd": 32}, "train": {}}': "is a FunGPT run",
        '{"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "scale_attn_weights": false}':
            r"lacks \(scale_attn_weights = False; GPT-2 has",
        '{"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "scale_attn_by_inverse_layer_idx": true}':
            r"lacks \(scale_attn_by_inverse_layer_idx = True; GPT-2",
        # (a decoder of an encoder-decoder: was "unexpected [...crossattention...]: is this a GPT-2 checkpoint?")
        '{"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "add_cross_attention": true}':
            r"lacks \(add_cross_attention = True; GPT-2 has .* no cross-attention\)",
        # each option named by itself, not a list of everything it could be
        '{"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "activation_function": "relu", "n_inner": 64}':
            r"lacks \(activation_function = 'relu', n_inner = 64; GPT-2 has",
        '{"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "layer_norm_epsilon": 1e-6}':
            r"lacks \(layer_norm_epsilon = 1e-06; GPT-2 has",
        '{"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "activation_function": ["gelu"]}':
            r"lacks \(activation_function = \['gelu'\]; GPT-2 has",  # (was TypeError: unhashable type: 'list')
        '{"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "tie_word_embeddings": "yes"}':
            r"tie_word_embeddings='yes' should be of type bool\): correct that file",
        '{"n_embd": null, "n_layer": 2, "n_head": 2, "vocab_size": 100}':  # (was TypeError: int * NoneType)
            r"n_embd=None should be of type int\): correct that file",
        # (n_inner is GPT-2's 4 * n_embd: the float is the fault, not an n_inner FunGPT lacks)
        '{"n_embd": 32.0, "n_inner": 128, "n_layer": 2, "n_head": 2, "vocab_size": 100}':
            r"n_embd=32.0 should be of type int",
    }
    for text, message in cases.items():
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(FunGPTError, match=message):
            GPT.from_hf(tmp_path)
    # GPT-2's own n_inner written out (4 * n_embd) is no option FunGPT lacks: only the weights are missing
    (tmp_path / "config.json").write_text('{"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, '
                                          '"n_inner": 128}')
    with pytest.raises(FunGPTError, match="no weights in"):
        GPT.from_hf(tmp_path)


def test_from_hf_refuses_integer_weights(tmp_path):
    """A quantized checkpoint (int8 matrices) was cast to float: a model of wrong numbers, without a word."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    random_hf_model().save_pretrained(tmp_path)
    original = load_file(tmp_path / "model.safetensors")
    key = "transformer.h.0.mlp.c_fc.weight"
    from fungpt.hf import load_gpt2

    for dtype in (torch.int8, torch.float8_e4m3fn, torch.uint16):
        weights = {**original, key: (original[key] * 1000).to(dtype)}
        save_file(weights, tmp_path / "model.safetensors")
        name = str(dtype).removeprefix("torch.")
        for meta in (False, True):  # (the dry run, from the header alone, named a uint16 "uint8")
            with pytest.raises(FunGPTError, match=f"stores {key.removeprefix('transformer.')} as {name} \\(a quantiz"):
                load_gpt2(tmp_path, meta=meta)


def test_from_hf_refuses_damaged_weights_and_an_untied_config_without_its_head(tmp_path):
    """NaN weights were loaded, and the fine-tune from them diverged, told to lower its learning rate; an untied
    config whose file has no head was asked "is this a GPT-2 checkpoint?\""""
    import json

    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    random_hf_model().save_pretrained(tmp_path)
    original = load_file(tmp_path / "model.safetensors")
    key = "transformer.h.0.mlp.c_fc.weight"
    damaged = original[key].clone()
    damaged[0, 1] = math.nan
    save_file({**original, key: damaged}, tmp_path / "model.safetensors")
    with pytest.raises(FunGPTError, match=r"stores NaN or inf in h.0.mlp.c_fc.weight: its weights are damaged"):
        GPT.from_hf(tmp_path)
    save_file({k: v for k, v in original.items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(FunGPTError, match=r"unties the head .* stores no lm_head.weight: set \"tie_word_embeddings\": "
                                          r"true there"):
        GPT.from_hf(tmp_path)


def test_from_hf_without_prefix_and_untied(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = random_hf_model()
    hf.transformer.save_pretrained(tmp_path / "base")  # GPT2Model: keys have no "transformer." prefix
    ours = GPT.from_hf(tmp_path / "base").eval()
    idx = tokens(1, 12, vocab=100)
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-4

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=100,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    untied = transformers.GPT2LMHeadModel(cfg).eval()
    untied.save_pretrained(tmp_path / "untied")
    ours = GPT.from_hf(tmp_path / "untied").eval()
    assert not ours.config.tie_embeddings and ours.lm_head.weight is not ours.wte.weight
    with torch.no_grad():
        assert (ours(idx) - untied(idx).logits).abs().max().item() < 1e-4
    # and back: an untied model exports with its own head, which transformers loads untied
    ours.save_hf(tmp_path / "again")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "again").eval()
    assert not back.config.tie_word_embeddings
    assert back.lm_head.weight.data_ptr() != back.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(back.lm_head.weight, ours.lm_head.weight)
        assert (ours(idx) - back(idx).logits).abs().max().item() < 1e-4


def test_from_hf_refuses_a_head_of_its_own_under_a_tied_config_and_names_its_config_mistakes(tmp_path):
    """A folder whose config.json ties the head to the embeddings but whose weights hold a head apart: the head
    was dropped and the model computed something else (transformers keeps it); and a config.json value FunGPT
    cannot build was told as one of FunGPT's own fields (block_size), not naming the file."""
    import json

    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=100,
                                  tie_word_embeddings=False)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "m")
    assert "lm_head.weight" in load_file(str(tmp_path / "m" / "model.safetensors"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    from fungpt.hf import load_gpt2

    for meta in (False, True):  # (a dry run reads the headers alone: there it reads the two matrices too)
        with pytest.raises(FunGPTError, match=r"stores an lm_head.weight that differs from its wte.weight, but its "
                                              r"config.json ties the two .*set \"tie_word_embeddings\": false there"):
            load_gpt2(tmp_path / "m", meta=meta)
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "n_positions": None}))
    with pytest.raises(FunGPTError, match=r"m/config.json describes no GPT-2 that FunGPT can build \(model config "
                                          r"n_positions=None should be of type int\): correct that file$"):
        GPT.from_hf(tmp_path / "m")
    for name in ("gelu_fast", "gelu_python"):  # gelu_new's formula and the exact GELU, under other names
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "activation_function": name}))
        assert GPT.from_hf(tmp_path / "m").config.activation == ("gelu_tanh" if name == "gelu_fast" else "gelu")


def test_from_hf_reads_one_tensor_saved_under_two_names_as_the_config_says(tmp_path):
    """An untied config whose pytorch_model.bin stores the head and wte as one tensor: the two parameters shared
    their memory, and trained as tied. A tied config whose head is stored in another dtype: a raw RuntimeError."""
    import json

    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=100)
    hf = transformers.GPT2LMHeadModel(cfg)
    hf.save_pretrained(tmp_path / "tied")
    sd = {k: v for k, v in hf.state_dict().items()}
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    (tmp_path / "bin").mkdir()
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")  # (one tensor under both names)
    config = json.loads((tmp_path / "tied" / "config.json").read_text())
    (tmp_path / "bin" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    untied = GPT.from_hf(tmp_path / "bin")
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert torch.equal(untied.lm_head.weight, untied.wte.weight)  # (equal values, two matrices)
    weights = load_file(str(tmp_path / "tied" / "model.safetensors"))
    weights["lm_head.weight"] = weights["transformer.wte.weight"].half()
    save_file(weights, str(tmp_path / "tied" / "model.safetensors"))
    (tmp_path / "tied" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(FunGPTError, match="stores an lm_head.weight that differs"):  # (float16 rounds the values)
        GPT.from_hf(tmp_path / "tied")
    weights["lm_head.weight"] = weights["transformer.wte.weight"].half()
    weights["transformer.wte.weight"] = weights["lm_head.weight"].float()  # (equal in float32: the same head)
    save_file(weights, str(tmp_path / "tied" / "model.safetensors"))
    tied = GPT.from_hf(tmp_path / "tied")
    assert tied.lm_head.weight is tied.wte.weight


def test_generate_stream_can_yield_the_logits_it_sampled_from():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 50, (1, 5))
    pairs = list(model.generate_stream(idx, 6, temperature=0.0, yield_logits=True))
    plain = list(model.generate_stream(idx, 6, temperature=0.0))
    for (tok, logits), tok2 in zip(pairs, plain):
        assert logits.shape == (1, 50)
        assert tok.item() == logits.argmax(-1).item() == tok2.item()  # greedy picks the argmax of these logits


def test_the_public_sampling_functions_refuse_wrong_filters_in_one_line():
    """sample_next_token and sampling_probs (exported for learners' own loops) checked only the filters' ranges: a
    top_k of 2.5 failed inside torch.topk, and top_p=True passed as 1, no filter."""
    logits = torch.randn(2, 10)
    for top_k, top_p, said in [(2.5, None, r"top_k=2.5 must be a whole number >= 1"),
                               (True, None, r"top_k=True must be a whole number >= 1"),
                               (0, None, r"top_k=0 must be a whole number >= 1"),
                               (None, True, r"top_p=True must be a number in \(0, 1\]"),
                               (None, "0.9", r"top_p='0.9' must be a number in \(0, 1\]")]:
        with pytest.raises(FunGPTError, match=said):
            sampling_probs(logits, 1.0, top_k, top_p)
        with pytest.raises(FunGPTError, match=said):
            sample_next_token(logits, None, 1.0, top_k, top_p)
    assert sample_next_token(logits, torch.Generator().manual_seed(0), 1.0, np.int64(3), 0.5).shape == (2, 1)
    # the temperature likewise (True was read as 1; a string or a Fraction failed inside torch), and a Fraction top_p
    for temperature in (True, "0.5", -1.0, math.nan):
        with pytest.raises(FunGPTError, match=rf"temperature={re.escape(repr(temperature))} must be a finite number"):
            sampling_probs(logits, temperature)
        with pytest.raises(FunGPTError, match=rf"temperature={re.escape(repr(temperature))} must be a finite number"):
            sample_next_token(logits, None, temperature)
    half = Fraction(1, 2)
    assert torch.equal(sampling_probs(logits, half, None, half), sampling_probs(logits, 0.5, None, 0.5))
    for other in (Decimal("0.5"), torch.tensor(0.5)):  # (a 0-d tensor worked before the check came; a Decimal too)
        assert torch.equal(sampling_probs(logits, other), sampling_probs(logits, 0.5))
    assert torch.equal(sample_next_token(logits, None, Fraction(0)), logits.argmax(-1, keepdim=True))


def test_wrong_ids_are_clear_errors_not_torch_internals():
    model, idx = make_model(), tokens(1, 5)
    cases = [  # each was a torch error about unpacking, embeddings or expanded sizes
        (lambda: model(idx[0]), r"\(B, T\) integer tensor.*ids\[None\]"),
        (lambda: model(idx.float()), "integer tensor"),
        (lambda: model.generate(idx[0], 3), r"\(B, T\) integer tensor"),
        (lambda: model.generate(idx.float(), 3), "integer tensor"),
        (lambda: model.generate(idx[:, :0], 3), "non-empty prompt"),
        (lambda: model.generate(idx, -1), "max_new_tokens=-1"),
        (lambda: model.generate(idx, 1e2), r"max_new_tokens=100.0 must be a whole number"),  # (TypeError in empty())
        (lambda: model.generate(idx, 3, lookahead=2.5), "lookahead=2.5 must be a whole number"),
        # greedy never reads top_k and top_p: their mistakes went unseen (sampling then failed in torch, or not)
        (lambda: model.generate(idx, 3, temperature=0, top_k=-3), r"top_k=-3 must be a whole number >= 1"),
        (lambda: model.generate(idx, 3, temperature=0, top_k=0), r"top_k=0 must be a whole number >= 1"),
        (lambda: model.generate(idx, 0, top_p=5.0), r"top_p=5.0 must be a number in \(0, 1\]"),
        (lambda: model.generate(idx, 1, top_p="0.9"), r"top_p='0.9' must be a number in \(0, 1\]"),
        (lambda: model(idx + 50), r"the input holds token id \d+, outside this model's vocabulary \(0\.\.49\): use the "
                                  "tokenizer"),  # (IndexError: index out of range in self)
        # the id that is out, not the input's whole range (was "token ids 3..70", 3 being in the vocabulary)
        (lambda: model(torch.tensor([[3, 70]])), r"the input holds token id 70, outside"),
        # numpy's uint16 ids (train.bin's type) and bools passed the float check and failed in the embedding
        (lambda: model(torch.ones(1, 3, dtype=torch.uint16)), r"integer tensor \(torch.long\), got torch.uint16"),
        (lambda: model(torch.ones(1, 3, dtype=torch.bool)), "got torch.bool"),
        # targets were reshaped unchecked: a transposed (T, B) tensor gave a wrong loss, others torch's errors
        (lambda: model(idx, idx.T.contiguous()), r"targets must be an integer tensor of the input's shape \(1, 5\), "
                                                 r"got torch.int64 of shape \(5, 1\)"),
        (lambda: model(idx, idx.float()), "targets must be an integer tensor"),
        (lambda: model(idx, idx.tolist()), "targets must be an integer tensor .* got a list"),
        (lambda: model(idx, torch.full_like(idx, 50)), r"the targets hold token id 50, outside this model's vocab"),
        # (-100, PyTorch's and Hugging Face's skip marker, is not FunGPT's)
        (lambda: model(idx, torch.full_like(idx, -100)), r"token id -100, .*; -1 marks a position to skip$"),
        (lambda: model.generate(idx, 2, temperature="0.5"), r"temperature='0.5' must be a finite number >= 0"),
        (lambda: model.generate(idx, 2, temperature=True), r"temperature=True must be a finite number >= 0"),
        (lambda: model.generate(idx, True), "max_new_tokens=True must be a whole number"),  # (a bool is no count)
        (lambda: model.generate(idx, 2, top_p=True), r"top_p=True must be a number in \(0, 1\]"),
        (lambda: model.make_kv_cache(-1), "batch_size=-1 must be a whole number >= 0"),
    ]
    for call, message in cases:
        with pytest.raises(FunGPTError, match=message):
            call()
    assert model.generate(idx, 0).shape == (1, 5)
    assert model.generate(idx, np.int64(2)).shape == (1, 7)  # a numpy integer is a whole number
    assert model.generate(idx.int(), 2).dtype == torch.int32  # the prompt's type (the new ids made it int64)
    from fractions import Fraction  # (torch takes no Fraction: a raw TypeError in a comparison or a division)

    assert model.generate(idx, 2, temperature=Fraction(1, 2), top_p=Fraction(1, 2)).shape == (1, 7)
    # int32 targets give the loss of int64 ones; -1 skips a position, and none left is NaN (as the docstring says)
    assert torch.equal(model(idx, idx.int())[1], model(idx, idx)[1])
    assert model(idx, torch.full_like(idx, -1))[1].isnan() and model(idx[:, :0], idx[:, :0])[1].isnan()


def test_numpy_integers_are_integers_in_the_config():
    """np.int64(65) was refused as "should be of type int"; it is stored as a plain int (JSON writes those)."""
    config = GPTConfig(vocab_size=np.int64(65), block_size=np.int32(8), n_layer=1, n_head=1, n_embd=8,
                       rope_base=np.int64(500))
    assert type(config.vocab_size) is int and config.vocab_size == 65 and type(config.block_size) is int
    assert type(config.rope_base) is float and config.rope_base == 500.0
    json.dumps(config.to_dict())
    with pytest.raises(FunGPTError, match="should be of type int"):
        GPTConfig(n_layer=2.0)


def test_an_optional_field_added_to_the_config_is_checked_too():
    """A learner's new field `attn_scale: float | None = None` made every GPTConfig(attn_scale=...) a traceback
    ('types.UnionType' object has no attribute '__name__'), a valid 1 included."""

    @dataclasses.dataclass
    class WithScale(GPTConfig):
        attn_scale: float | None = None
        layers: list[int] = dataclasses.field(default_factory=lambda: [0, 1])  # (other generic fields of yours)
        picks: list[int] | None = None
        mode: typing.Literal["a", "b"] = "a"
        maybe: typing.Literal["a"] | None = None  # (a union with a Literal: not checked)
        anything: typing.Any = None

    assert WithScale(attn_scale=None).attn_scale is None and WithScale(picks=[2]).layers == [0, 1]
    assert WithScale(maybe="a", anything=3).anything == 3
    with pytest.raises(FunGPTError, match=r"layers=3 should be of type list: fix its value"):
        WithScale(layers=3)
    scaled = WithScale(attn_scale=1)
    assert type(scaled.attn_scale) is float and scaled.attn_scale == 1.0
    with pytest.raises(FunGPTError, match=r"attn_scale='0.5' should be of type float or None: fix its value"):
        WithScale(attn_scale="0.5")


def test_streams_taking_turns_or_left_unfinished_decode_without_dropout_and_leave_the_mode_alone():
    """Each stream put the model back into its mode when it ended: another stream still running then drew its
    tokens in training mode, with dropout."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.5)).train()
    prompt = torch.zeros(2, 1, dtype=torch.long)  # (batch 2: GPT.forward, where dropout would act)
    alone = [t.tolist() for t in model.generate_stream(prompt, max_new_tokens=12, temperature=0)]
    a = model.generate_stream(prompt, max_new_tokens=3, temperature=0)
    next(a)  # a starts first,
    b = model.generate_stream(prompt, max_new_tokens=12, temperature=0)
    first = [next(b).tolist()]  # then b,
    list(a)  # and a ends while b goes on
    assert first + [t.tolist() for t in b] == alone  # every step without dropout
    assert model.training  # the model's own mode between steps and after
    # a stream left unfinished (and still referenced) changes nothing for later generation, nor for training
    left = model.generate_stream(prompt, max_new_tokens=12, temperature=0)
    next(left)
    assert model.training and model.generate(prompt, 3, temperature=0).shape == (2, 4) and model.training
    model.eval()  # the caller's own choice, made between steps, stays when the stream ends
    left.close()
    assert not model.training
    model.train()
    model.drop.eval()  # and so does a submodule's own mode
    list(model.generate_stream(prompt, max_new_tokens=2, temperature=0))
    assert model.training and not model.drop.training


def test_a_submodule_in_training_mode_decodes_without_dropout():
    """A model in eval mode with one block in training mode: only the model's own mode was looked at, so that block's
    dropout acted during generation (greedy decoding gave another sequence each call)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.5)).eval()
    with torch.no_grad():  # large weights: a dropped unit changes which token is the most likely
        for p in model.parameters():
            p.mul_(20)
    prompt = torch.zeros(2, 1, dtype=torch.long)
    ref = model.generate(prompt, 12, temperature=0)
    model.blocks[0].train()
    for use_cache in (True, False):
        assert torch.equal(model.generate(prompt, 12, temperature=0, use_cache=use_cache), ref)
        assert model.blocks[0].training and not model.training and not model.blocks[1].training  # (as they were)


@pytest.mark.parametrize("use_cache", [True, False])
def test_yielded_logits_hold_only_their_own_row(use_cache):
    """Each (ids, logits) item of yield_logits was a view into the forward pass's (B, T, V) logits, keeping all T
    rows alive: 206 MB per kept item for GPT-2 at 1024 tokens."""
    model = GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(0))  # a full window: it slides
    items = list(model.generate_stream(prompt, 4, temperature=0, use_cache=use_cache, yield_logits=True))
    assert [logits.untyped_storage().nbytes() for _, logits in items] == [300 * 4] * 4


# ---------------------------------------------------------------- pinned by mutation testing


def test_a_chunk_after_one_cached_token_is_still_causal():
    """With t0 = 1 (a 1-token prompt, then a lookahead's draft checked in one chunk) the chunk needs its shifted
    mask like any other: without it, its queries saw later keys."""
    model, idx = make_model(), tokens(2, 8)
    full = model(idx)
    for impl in ("sdpa", "plain"):
        cache = model.make_kv_cache(2)
        parts = [model(idx[:, a:b], kv_cache=cache, attn_impl=impl) for a, b in [(0, 1), (1, 8)]]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["embedding", "attn_resid", "mlp"])
def test_each_dropout_acts_where_it_is(which):
    """The embeddings', attention's residual and the MLP's dropout: each, alone in training mode, changes the
    output (a dropout removed from its place was unseen: only attention-weight dropout was tested)."""
    model, idx = make_model(dropout=0.5), tokens(2, 8)
    with torch.no_grad():
        ref = model(idx)
        {"embedding": model.drop, "attn_resid": model.blocks[0].attn.resid_dropout,
         "mlp": model.blocks[0].mlp.dropout}[which].train()
        assert not torch.allclose(model(idx), ref)


def test_plain_attention_drops_the_softmax_weights_at_rate_p():
    """Dropout on the (B, nh, T, T) attention weights, at the model's rate: not on their product with v."""
    model = make_model(dropout=0.3)
    attn = model.blocks[0].attn
    attn.attn_dropout.train()
    seen = []
    attn.attn_dropout.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out)))
    torch.manual_seed(0)
    with torch.no_grad():
        model(tokens(8, 16), attn_impl="plain")
    weights, dropped = seen[0]
    assert weights.shape == (8, 2, 16, 16)  # (B, nh, T, T), not (B, nh, T, hs)
    torch.testing.assert_close(weights.sum(-1), torch.ones(8, 2, 16))
    live = weights > 0
    assert (dropped[live] == 0).float().mean().item() == pytest.approx(0.3, abs=0.03)


def test_rope_rotates_each_pair_by_position_times_its_frequency():
    """hs = 4, base 10000: theta_i = base^(-2i/hs) = [1, 0.01]; the pairs are (x0, x2) and (x1, x3) (the halves),
    rotated by p * theta_i from position 0: a sign, a frequency, the base or the first position wrong shows."""
    rope = RotaryPositions(block_size=8, head_size=4, base=10000.0)
    q = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)  # (B, nh, T, hs)
    for p in (0, 1, 3):
        got, _ = rope.rotate(q, q, torch.tensor([p]))
        # (x, 0) rotated by a: (x cos a, x sin a)
        want = torch.tensor([math.cos(p), math.cos(0.01 * p), math.sin(p), math.sin(0.01 * p)])
        torch.testing.assert_close(got.view(4), want, atol=1e-6, rtol=0)


def test_rope_matches_transformers_llama_rotation():
    """The same rotation as transformers' Llama (rotate_half convention) for another base and later positions."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    hs, base = 8, 500.0
    rope = RotaryPositions(block_size=16, head_size=hs, base=base)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, hs, generator=g), torch.randn(1, 2, 5, hs, generator=g)
    pos = torch.arange(3, 8)
    freqs = pos[:, None].float() / base ** (torch.arange(0, hs, 2).float() / hs)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    want_q, want_k = llama.apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])
    got_q, got_k = rope.rotate(q, k, pos)
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)


def test_lookahead_is_ignored_when_sampling():
    """Prompt-lookup speculation is for greedy decoding: with temperature > 0 the draw must be the plain one."""
    model, prompt = make_model(), tokens(1, 4)

    def run(lookahead):
        return model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(0),
                              lookahead=lookahead)

    assert torch.equal(run(0), run(4))


def test_sampling_edges_minus_inf_top_p_near_one_and_unnormalised_draws():
    """A -inf logit gets probability 0 (softmax from the largest logit, or it is NaN), top_p in [0.999, 1) still
    cuts the tail, and draw's uniform number is scaled to the probabilities' total."""
    from fungpt.sampling import draw

    e = math.e
    torch.testing.assert_close(sampling_probs(torch.tensor([[0.0, -math.inf, 1.0]])),
                               torch.tensor([[1 / (1 + e), 0.0, e / (1 + e)]]))
    torch.testing.assert_close(sampling_probs(torch.tensor([[math.log(0.9996), math.log(0.0004)]]), top_p=0.9995),
                               torch.tensor([[1.0, 0.0]]))
    counts = torch.bincount(draw(torch.ones(2000, 4), torch.Generator().manual_seed(0)).flatten(), minlength=4)
    assert (counts > 400).all(), counts  # about 500 each: all four drawn, not only the first


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_save_hf_records_the_models_dropout(tmp_path, dropout):
    """The exported config.json carries the model's dropout in all three of GPT-2's places (a fixed 0.1, GPT-2's
    own default, made a fine-tune in transformers drop what this model never dropped)."""
    make_model(dropout=dropout).save_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert [config[k] for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")] == [dropout] * 3


def test_residual_dropout_zeroes_each_branch_output_at_rate_p():
    """Dropout on the residual branches acts on what each branch adds to x (after its c_proj), as in GPT-2: moved
    before the c_proj it still changed the output (test_each_dropout_acts_where_it_is) but zeroed nothing there."""
    model = make_model(dropout=0.3)
    block = model.blocks[0]
    block.attn.resid_dropout.train()
    block.mlp.dropout.train()
    seen = {}
    block.attn.register_forward_hook(lambda m, inp, out: seen.__setitem__("attn", out[0]))
    block.mlp.register_forward_hook(lambda m, inp, out: seen.__setitem__("mlp", out))
    torch.manual_seed(0)
    with torch.no_grad():
        model(tokens(8, 16))
    for name, out in seen.items():
        assert out.shape == (8, 16, 32), name
        assert (out == 0).float().mean().item() == pytest.approx(0.3, abs=0.03), name


def test_norms_compute_their_documented_formulas_with_eps_1e_5():
    """make_norm's LayerNorm and RMSNorm, eps included (it matters for small activations; a trained model's
    outputs depend on it)."""
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 1e-3  # mean square ~1e-6: eps counts
    for norm in ("layernorm", "rmsnorm"):
        layer = make_norm(tiny(norm=norm), 32)
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, 32))
        if norm == "layernorm":
            centred = x - x.mean(-1, keepdim=True)
            want = centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + 1e-5) * layer.weight + layer.bias
        else:
            want = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-5) * layer.weight
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


def test_exact_gelu_is_not_the_tanh_approximation():
    """activation='gelu' is x * Phi(x); 'gelu_tanh' GPT-2's tanh approximation (they differ by up to ~5e-4)."""
    x = torch.linspace(-4, 4, 81)
    torch.testing.assert_close(make_activation("gelu")(x), x * 0.5 * (1 + torch.erf(x / math.sqrt(2))))
    tanh = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(make_activation("gelu_tanh")(x), tanh)
    assert (make_activation("gelu")(x) - tanh).abs().max() > 1e-4
