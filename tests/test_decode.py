"""fungpt/decode.py: the lean one-token decoding step must compute what GPT.forward with a KVCache computes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fungpt import linear
from fungpt.decode import Decoder
from fungpt.errors import FunGPTError
from fungpt.linear import Linear, bfloat16_products
from fungpt.model import GPT, GPTConfig
from fungpt.positions import POS_ENCODINGS

pytestmark = pytest.mark.usefixtures("two_threads")  # (decoding's row sums: one bag per thread)

VARIANTS = [
    {},  # GPT-2: LayerNorm, tanh GELU, biases, tied head
    {"norm": "rmsnorm", "qk_norm": True, "activation": "relu2", "bias": False, "tie_embeddings": False},
    {"qk_norm": True, "activation": "gelu"},  # QK-norm as LayerNorm, exact GELU
]
MATMULS = ["torch"] + (["onednn"] if linear.onednn_works() else [])


@pytest.fixture(params=MATMULS)
def cpu_matmul(request):
    """Run the test with each CPU matmul library (row sums only come with 'onednn'); restore the choice after."""
    before = list(linear._chosen)
    linear.set_cpu_matmul(request.param)
    yield request.param
    linear._chosen[:] = before


def make_model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=50, block_size=24, n_layer=2, n_head=2, n_embd=32, **kw)
    model = GPT(config).eval()
    with torch.no_grad():  # non-zero biases and norm gains, so that a bias or gain left out shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def prefilled(model, prompt):
    """A reference cache and a Decoder on its own cache, both after the prompt; and the prompt's last token."""
    ref_cache, lean_cache = model.make_kv_cache(1), model.make_kv_cache(1)
    model(prompt, kv_cache=ref_cache)
    model(prompt, kv_cache=lean_cache)
    return ref_cache, Decoder(model, lean_cache), prompt[0, -1:]


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_step_matches_the_forward_pass_with_a_cache(pos_encoding, variant, cpu_matmul):
    model = make_model(pos_encoding=pos_encoding, **variant)
    prompt = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(1))
    ref_cache, decoder, token = prefilled(model, prompt)
    lean_cache = decoder.cache
    seq = prompt
    for _ in range(10):
        want = model(token[None], kv_cache=ref_cache)  # (1, 1, V)
        got = decoder.step(token)
        assert got.shape == want.shape == (1, 1, 50)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # and what the uncached model computes for the whole sequence (a position handled wrongly in both cached
        # paths, e.g. a new encoding's query positions taken from 0 in the cache, agrees with itself only)
        seq = torch.cat((seq, token[None]), dim=1)  # (1, T): the tokens the cache holds now
        torch.testing.assert_close(got[0, -1], model(seq)[0, -1], rtol=1e-4, atol=1e-5)
        assert lean_cache.pos == ref_cache.pos
        token = want[0, -1].argmax().view(1)
    n = ref_cache.pos  # the same keys and values stored
    torch.testing.assert_close(lean_cache.k[:, :, :, :n], ref_cache.k[:, :, :, :n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lean_cache.v[:, :, :, :n], ref_cache.v[:, :, :, :n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_greedy_generation_of_one_sequence_equals_the_uncached_reference(pos_encoding, cpu_matmul):
    # 40 new tokens from a 5-token prompt with block_size 24: the window slides past the block.
    model = make_model(pos_encoding=pos_encoding)
    prompt = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(2))
    fast = model.generate(prompt, 40, temperature=0, use_cache=True)
    assert torch.equal(fast, model.generate(prompt, 40, temperature=0, use_cache=False))


def test_generation_of_one_sequence_on_a_cpu_takes_the_lean_step(monkeypatch):
    steps = []
    real = Decoder.step
    monkeypatch.setattr(Decoder, "step", lambda self, token: steps.append(int(token)) or real(self, token))
    model = make_model()
    prompt = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, 6, temperature=0)
    assert steps == out[0, 4:-1].tolist()  # every new token but the first (the prefill gives that one)
    model.generate(torch.cat((prompt, prompt)), 6, temperature=0)  # two sequences: GPT.forward, not the step
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.generate(prompt, 3, temperature=0)  # autocast: GPT.forward
    with bfloat16_products():
        model.generate(prompt, 3, temperature=0)  # bfloat16 products (train.dtype bfloat16 on a CPU): GPT.forward
    model.to(torch.bfloat16).generate(prompt, 3, temperature=0)  # not float32: GPT.forward
    assert len(steps) == 5


def test_module_hooks_still_run_and_foreign_linears_still_work():
    model = make_model()
    prompt = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(5))
    want = model.generate(prompt, 6, temperature=0, use_cache=False)
    calls = []
    handle = model.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(model.generate(prompt, 6, temperature=0), want)
    assert len(calls) == 6  # the prefill and five one-token steps: the hook saw every forward pass
    handle.remove()
    calls.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, *a: calls.append(1) if m is model.lm_head else None)  # a global hook, on every module
    assert torch.equal(model.generate(prompt, 6, temperature=0), want)
    handle.remove()
    assert len(calls) == 6
    plain = torch.nn.Linear(32, 128)  # e.g. an adapter library's replacement layer
    plain.load_state_dict(model.blocks[0].mlp.c_fc.state_dict())
    model.blocks[0].mlp.c_fc = plain
    assert torch.equal(model.generate(prompt, 6, temperature=0), want)


def test_a_parametrized_weight_changed_while_a_stream_is_paused_is_used(cpu_matmul):
    """A weight computed by torch.nn.utils.parametrize from another tensor: the step's copy of it never changed, and
    a paused stream went on with the old weight after that tensor was edited. Such models go through GPT.forward."""

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.s = torch.nn.Parameter(torch.ones(()))

        def forward(self, w):
            return w * self.s

    model = make_model()
    torch.nn.utils.parametrize.register_parametrization(model.blocks[0].mlp.c_fc, "weight", Scale())
    reference = copy.deepcopy(model)
    reference.register_forward_hook(lambda *a: None)  # (a hook: generation through GPT.forward and its KV cache)
    prompt = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(7))
    streams = [m.generate_stream(prompt, 3, temperature=0, yield_logits=True) for m in (model, reference)]
    first = [next(s)[1] for s in streams]
    torch.testing.assert_close(first[0], first[1], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for m in (model, reference):
            m.blocks[0].mlp.c_fc.parametrizations.weight[0].s.fill_(-5.0)
    second = [next(s)[1] for s in streams]  # the second token's logits, from the models as they are now
    for s in streams:
        s.close()
    torch.testing.assert_close(second[0], second[1], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_weights_changed_between_steps_are_used(cpu_matmul):
    model = make_model()
    prompt = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(6))
    ref_cache, decoder, token = prefilled(model, prompt)
    decoder.step(token), model(token[None], kv_cache=ref_cache)
    model.blocks[0].mlp.c_fc.weight.mul_(1.5)  # in place, as an optimizer step would (a paused generate_stream)
    model.blocks[1].attn.c_proj.weight.data = torch.randn(32, 32)  # a new tensor behind the same parameter
    torch.testing.assert_close(decoder.step(token), model(token[None], kv_cache=ref_cache), rtol=1e-4, atol=1e-5)
    # a new tensor alone (its version counter may equal the old one's: only where it lives tells them apart)
    model.blocks[0].attn.c_attn.weight.data = torch.randn(96, 32)
    torch.testing.assert_close(decoder.step(token), model(token[None], kv_cache=ref_cache), rtol=1e-4, atol=1e-5)


def test_weights_written_through_data_between_generations_are_used(cpu_matmul):
    """A learner's manual SGD step (p.data -= lr * p.grad) moves no version counter; the next generation and
    forward must still use the new weights (a reviewer saw the old ones: cached and uncached disagreed)."""
    model = make_model().eval()
    prompt = torch.tensor([[1, 2, 3]])
    model.generate(prompt, 8, temperature=0)  # copies the weights for the row sums
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(-1.5)
    cached = model.generate(prompt, 8, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 8, temperature=0, use_cache=False))


def test_rows_swapped_through_data_between_generations_are_used(cpu_matmul):
    """Swapping two token embeddings in place (rows of the tied head too) keeps every element, so the sum of the
    weight's bits that keyed the row sums' copy of W did not change: decoding kept the old rows."""
    model = make_model().eval()
    prompt = torch.tensor([[1, 2, 3]])
    model.generate(prompt, 8, temperature=0)
    with torch.no_grad():
        w = model.wte.weight.data
        w[[4, 7]] = w[[7, 4]]
        c_fc = model.blocks[0].mlp.c_fc.weight.data  # and two hidden units of an MLP
        c_fc[[0, 5]] = c_fc[[5, 0]]
    cached = model.generate(prompt, 8, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 8, temperature=0, use_cache=False))
    logits = [lg for _, lg in model.generate_stream(prompt, 4, temperature=0, yield_logits=True)]
    reference = [lg for _, lg in model.generate_stream(prompt, 4, temperature=0, yield_logits=True, use_cache=False)]
    torch.testing.assert_close(torch.stack(logits), torch.stack(reference), rtol=1e-4, atol=1e-5)


def test_ablations_and_edits_of_the_model_reach_cached_generation(monkeypatch, cpu_matmul):
    """The lean step does the blocks' work its own way: an MLP subclass (an ablation), a forward overridden on one
    module, or an edit of MLP.forward in model.py ran in the prompt's pass and not in the generated tokens'
    (neither model's text); cached and uncached generation disagreed."""
    from fungpt.model import MLP

    class NoActivation(MLP):
        def forward(self, x):
            return self.c_proj(self.c_fc(x))

    prompt = torch.tensor([[1, 2, 3]])

    def logits_of(model, use_cache):
        return torch.stack([lg for _, lg in model.generate_stream(prompt, 6, temperature=0, yield_logits=True,
                                                                 use_cache=use_cache)])

    plain = make_model()
    before = logits_of(plain, True)
    ablated = make_model()
    ablated.blocks[0].mlp = NoActivation(ablated.config)
    ablated.blocks[0].mlp.load_state_dict(plain.blocks[0].mlp.state_dict())
    overridden = make_model()
    overridden.blocks[1].mlp.forward = lambda x: torch.zeros_like(x)  # the second MLP taken out
    for model in (ablated, overridden):
        assert not Decoder.supports(model, prompt)
    monkeypatch.setattr(MLP, "forward", lambda self, x: self.c_proj(self.c_fc(x)))  # model.py edited
    edited = make_model()
    assert not Decoder.supports(edited, prompt)  # (its source is not the one decode.py repeats)
    for model in (ablated, overridden, edited):
        cached = logits_of(model, True)
        torch.testing.assert_close(cached, logits_of(model, False), rtol=1e-4, atol=1e-5)
        assert (cached - before).abs().max() > 1e-2  # the change matters


def test_renamed_layers_and_a_plain_function_activation_reach_cached_generation(monkeypatch, cpu_matmul):
    """Two learner edits that generation met with a traceback: a SwiGLU MLP whose layers are named w1 and w3 (the
    check read mlp.c_fc before it saw that the forward had changed), and `self.act = F.relu` (a function, not a
    module: the step took its .forward)."""
    import torch.nn.functional as F

    from fungpt.linear import Linear
    from fungpt.model import MLP

    prompt = torch.tensor([[1, 2, 3]])
    relu = make_model()
    for block in relu.blocks:  # (as MLP.__init__ with `self.act = F.relu` makes it)
        del block.mlp.act
        block.mlp.act = F.relu
    assert Decoder.supports(relu, prompt)  # (the lean step runs it)
    cached = relu.generate(prompt, 8, temperature=0)
    assert torch.equal(cached, relu.generate(prompt, 8, temperature=0, use_cache=False))

    def swiglu_init(self, config):
        torch.nn.Module.__init__(self)
        self.w1 = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.w3 = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    monkeypatch.setattr(MLP, "__init__", swiglu_init)
    monkeypatch.setattr(MLP, "forward", lambda self, x: self.c_proj(F.silu(self.w1(x)) * self.w3(x)))
    swiglu = make_model()
    assert not Decoder.supports(swiglu, prompt)
    cached = swiglu.generate(prompt, 8, temperature=0)
    assert torch.equal(cached, swiglu.generate(prompt, 8, temperature=0, use_cache=False))


def test_decode_py_repeats_the_forwards_as_they_are_written():
    """decode.MIRRORED is the sha256 of the forwards Decoder.step repeats. If this fails, model.py's forwards (or
    KVCache.update, Linear.forward) changed: change Decoder.step to compute the same, then set MIRRORED to the
    value below. Until then every generation runs through GPT.forward (right, and slower)."""
    from fungpt.decode import MIRRORED, mirrored_source

    assert mirrored_source() == MIRRORED, f"set decode.MIRRORED = {mirrored_source()!r} once Decoder.step matches"


def test_an_edit_that_shows_only_at_later_positions_reaches_cached_generation(monkeypatch, cpu_matmul):
    """A sliding attention window (a learner's exercise) changes nothing while the sequence is shorter than the
    window: a check of the first decoding step passed, and later tokens came from decode.py's unedited copy."""
    from fungpt import model as model_module

    real = model_module.F.scaled_dot_product_attention

    def windowed(q, k, v, attn_mask=None, is_causal=False, **kw):  # each query sees its last 4 keys at most
        T, S = q.size(-2), k.size(-2)
        i = torch.arange(S - T, S)[:, None]
        j = torch.arange(S)[None, :]
        return real(q, k, v, attn_mask=(j <= i) & (j > i - 4), **kw)

    monkeypatch.setattr(model_module.CausalSelfAttention, "forward", _windowed_forward(windowed))
    model = make_model()
    prompt = torch.tensor([[1, 2, 3]])
    assert not Decoder.supports(model, prompt)
    cached = model.generate(prompt, 12, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 12, temperature=0, use_cache=False))


def _windowed_forward(attention):
    """CausalSelfAttention.forward with another attention function: an edit of model.py, as a learner makes it."""
    from fungpt import model as model_module

    source_forward = model_module.CausalSelfAttention.forward

    def forward(self, x, positions, pos, kv_cache=None, attn_impl="sdpa"):
        original = model_module.F.scaled_dot_product_attention
        model_module.F.scaled_dot_product_attention = attention
        try:
            return source_forward(self, x, positions, pos, kv_cache, "sdpa")
        finally:
            model_module.F.scaled_dot_product_attention = original

    return forward


def test_decoder_refuses_what_it_cannot_run():
    model = make_model()
    with pytest.raises(FunGPTError, match="one sequence"):
        Decoder(model, model.make_kv_cache(2))
    from fungpt.model import KVCache

    c = model.config  # room for more positions than the model has (a cache made by hand): positions it cannot encode
    with pytest.raises(FunGPTError, match=f"at most block_size {c.block_size} positions"):
        Decoder(model, KVCache(c.n_layer, 1, c.n_head, c.block_size + 1, c.n_embd // c.n_head))
    model.train()
    with pytest.raises(FunGPTError, match="eval mode"):
        Decoder(model, model.make_kv_cache(1))
    model.eval().blocks[1].train()  # (a submodule in training mode: its dropout would not be the step's)
    with pytest.raises(FunGPTError, match="eval mode"):
        Decoder(model, model.make_kv_cache(1))


def test_the_step_follows_the_models_dtype_not_torchs_default(cpu_matmul):
    """A default dtype changed after the model was built (float64 for a numerics experiment): the step's buffer
    for q, k, v was made in it, and the first cached token failed with a raw 'Expected out tensor' error."""
    model = make_model()
    prompt = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(3))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fast = model.generate(prompt, 8, temperature=0)
        assert torch.equal(fast, model.generate(prompt, 8, temperature=0, use_cache=False))
    finally:
        torch.set_default_dtype(before)


def test_a_step_with_gradients_enabled_gives_the_models_logits():
    """Decoding needs no gradients, but a caller outside no_grad got "Inference tensors cannot be saved for
    backward" from the last layers."""
    model = make_model()
    assert torch.is_grad_enabled()
    logits = Decoder(model, model.make_kv_cache(1)).step(torch.tensor([3]))
    with torch.no_grad():
        expected = model(torch.tensor([[3]]))
    assert torch.allclose(logits, expected, atol=1e-5)


@torch.no_grad()
def test_a_full_cache_is_a_clear_error():
    model = make_model()
    cache = model.make_kv_cache(1)
    model(torch.zeros(1, 24, dtype=torch.long), kv_cache=cache)  # block_size 24: full
    with pytest.raises(FunGPTError, match="KV cache is full"):
        Decoder(model, cache).step(torch.tensor([1]))


@pytest.mark.parametrize("row_sums", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_linear_decoders_add_bias_and_residual(bias, row_sums, cpu_matmul, monkeypatch):
    if not row_sums:  # a weight too large for a W^T copy (GPT-2's output layer): one matrix-vector product
        monkeypatch.setattr(linear, "ROW_SUM_MAX_ELEMENTS", 0)
    calls = []
    real = linear.onednn_linear
    monkeypatch.setattr(linear, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = Linear(48, 40, bias=bias)
    x, r, out = torch.randn(48), torch.randn(40), torch.empty(1, 40)
    want = F.linear(x, layer.weight, layer.bias)
    product = layer.decoder()
    torch.testing.assert_close(product(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(product(x, r), r + want, rtol=1e-5, atol=1e-5)
    layer.decoder_into(out)(x)
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-5)
    # Without row sums, oneDNN's product where it is the CPU matmul library (2x MKL's speed on big weights)
    assert len(calls) == (3 if cpu_matmul == "onednn" and not row_sums else 0)


@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_blas_decoders_add_bias_or_residual_in_the_product_call(bias):
    """With torch's BLAS, a decoding product is one addmv (or mv) that adds the bias, or the residual, itself:
    not F.linear's reshapes and transposes on the way to a matrix product, nor a copy into c_attn's buffer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    before = list(linear._chosen)
    linear.set_cpu_matmul("torch")
    try:
        torch.manual_seed(0)
        layer = Linear(48, 40, bias=bias)
        x, r, out = torch.randn(48), torch.randn(40), torch.empty(1, 40)
        product, into = layer.decoder(), layer.decoder_into(out)
        with Ops() as plain:
            product(x)
        with Ops() as residual:
            product(x, r)
        with Ops() as written:
            returned = into(x)
    finally:
        linear._chosen[:] = before
    assert plain.names == ["addmv" if bias else "mv"]
    assert residual.names == (["addmv", "add_"] if bias else ["addmv"])  # residual + W x, then the bias
    assert written.names == ["addmv" if bias else "mv"]  # straight into out: no copy
    assert returned is out  # (1, N), as the other libraries' decoder_into give it back
    torch.testing.assert_close(out[0], F.linear(x, layer.weight, layer.bias))


@torch.no_grad()
def test_step_matches_the_forward_pass_without_row_sums(cpu_matmul, monkeypatch):
    monkeypatch.setattr(linear, "ROW_SUM_MAX_ELEMENTS", 0)  # every layer too large for row sums
    model = make_model()
    prompt = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(1))
    ref_cache, decoder, token = prefilled(model, prompt)
    for _ in range(5):
        want = model(token[None], kv_cache=ref_cache)  # (1, 1, V)
        torch.testing.assert_close(decoder.step(token), want, rtol=1e-4, atol=1e-5)
        token = want[0, -1].argmax().view(1)


def test_what_generation_hands_back_works_with_autograd_and_in_place_edits():
    # The step runs in inference mode inside; its logits and the ids must still be ordinary tensors.
    model = make_model()
    prompt = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(4))
    w = torch.ones(50, requires_grad=True)
    for ids, logits in model.generate_stream(prompt, 5, temperature=0, yield_logits=True):
        assert not ids.is_inference() and not logits.is_inference()
        logits.mul_(2.0)  # an in-place edit is allowed
        (logits * w).sum().backward()  # and so is saving them for a backward pass
    assert w.grad is not None
