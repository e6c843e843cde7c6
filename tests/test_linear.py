"""fungpt/linear.py: the Linear layer whose float32 CPU matrix products may run on oneDNN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fungpt import linear
from fungpt.errors import FunGPTError
from fungpt.linear import Linear, OneDNNLinear, choose_cpu_matmul
from fungpt.model import GPT, GPTConfig

needs_onednn = pytest.mark.skipif(not linear.onednn_works(), reason="this torch has no working oneDNN linear op")


@pytest.fixture()
def matmul_setting():
    """Restore the process's CPU matmul choice after a test that changes it."""
    before = list(linear._chosen)
    yield linear.set_cpu_matmul
    linear._chosen[:] = before


def _grads(fn, x, w, b, gy):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    y = fn(x, w, b)
    y.backward(gy)
    return y.detach(), x.grad.clone(), w.grad.clone(), None if b is None else b.grad.clone()


@needs_onednn
@pytest.mark.parametrize("x_shape, n_out, bias", [
    ((12, 64, 128), 384, True),   # wider output (N > K): the weight gradient goes through the transposed product
    ((768, 512), 128, False),     # narrower output (N < K)
    ((2, 5, 96), 96, True),       # square
    ((1, 1, 384), 1152, True),    # one token, as in decoding
])
def test_onednn_linear_matches_f_linear_forward_and_backward(x_shape, n_out, bias):
    torch.manual_seed(0)
    x = torch.randn(*x_shape, requires_grad=True)
    w = torch.randn(n_out, x_shape[-1], requires_grad=True)
    b = torch.randn(n_out, requires_grad=True) if bias else None
    gy = torch.randn(*x_shape[:-1], n_out)
    ours = _grads(OneDNNLinear.apply, x, w, b, gy)
    ref = _grads(F.linear, x, w, b, gy)
    for got, want in zip(ours, ref):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape and got.is_contiguous()
        # same products, other order of additions: float32 rounding of sums of up to 768 terms
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@needs_onednn
def test_model_trains_the_same_on_onednn_and_on_torchs_blas(matmul_setting):
    """Three AdamW steps of a small GPT (tied head, biases) land on the same weights with either library."""
    def run(setting):
        matmul_setting(setting)
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = torch.randint(0, 50, (4, 32))
        losses = []
        for _ in range(3):
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, model.lm_head.weight.detach()

    (l_dnn, w_dnn), (l_blas, w_blas) = run("onednn"), run("torch")
    assert l_dnn == pytest.approx(l_blas, rel=1e-5)
    torch.testing.assert_close(w_dnn, w_blas, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_linear_uses_onednn_only_for_float32_cpu_tensors_outside_autocast(matmul_setting, monkeypatch):
    calls = []
    real = OneDNNLinear.apply
    monkeypatch.setattr(OneDNNLinear, "apply", lambda *a: calls.append(1) or real(*a))
    layer = Linear(8, 4)
    x = torch.randn(3, 8)
    matmul_setting("onednn")
    layer(x)
    assert len(calls) == 1
    layer.double()(x.double())  # float64: torch's BLAS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.float()(x).dtype == torch.bfloat16  # autocast decides the precision: F.linear
    matmul_setting("torch")
    layer(x)
    assert len(calls) == 1


def test_choose_cpu_matmul_decision_table():
    def choose(setting="auto", onednn=True, avx512=True, vendor="AuthenticAMD"):
        return choose_cpu_matmul(setting, onednn=onednn, avx512=avx512, vendor=vendor)

    assert choose() == "onednn"  # AMD with AVX-512: MKL would run its AVX2 kernels
    assert choose(vendor="GenuineIntel") == "torch"  # MKL runs AVX-512 on Intel
    assert choose(avx512=False) == "torch"  # no wider kernels for oneDNN to use
    assert choose(onednn=False) == "torch"
    assert choose(vendor="") == "torch"  # unknown CPU: keep torch's default
    assert choose("torch") == "torch" and choose("onednn", vendor="GenuineIntel") == "onednn"
    with pytest.raises(FunGPTError, match="no working oneDNN"):
        choose("onednn", onednn=False)
    with pytest.raises(FunGPTError, match="use one of auto, onednn, torch"):
        choose("mkl")


@pytest.mark.parametrize("K, N, bias", [(384, 1152, True), (7, 5, False), (3, 4, True), (1536, 384, True)])
def test_row_product_equals_f_linear(K, N, bias):
    torch.manual_seed(0)
    x, w, r = torch.randn(K), torch.randn(N, K), torch.randn(N)
    b = torch.randn(N) if bias else None
    product = linear.row_product(w.t().contiguous(), b, linear.row_bags(K))
    torch.testing.assert_close(product(x), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(product(x, r), r + F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    out = torch.empty(1, N)
    linear.row_product_into(w.t().contiguous(), b, linear.row_bags(K), out)(x)
    torch.testing.assert_close(out[0], F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 6])
def test_row_bags_fit_row_product_for_any_thread_count(threads):
    """One bag per thread, but a ceil(K / n_bags) stride can make fewer bags than threads (K = 5 on 4 threads:
    starts 0, 2, 4): the vector of ones must have one entry per bag that exists."""
    kept = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for K in (1, 3, 5, 7, 10):
            torch.manual_seed(K)
            x, w, b = torch.randn(K), torch.randn(4, K), torch.randn(4)
            rows, starts, ones = linear.row_bags(K)
            assert torch.equal(rows, torch.arange(K)) and starts[0] == 0 and ones.shape == starts.shape
            product = linear.row_product(w.t().contiguous(), b, (rows, starts, ones))
            torch.testing.assert_close(product(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(kept)


@needs_onednn
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_products_do_not_reach_onednn(matmul_setting):
    """oneDNN refuses products over an empty inner dimension: a backward over an empty batch (the weight
    gradient sums over zero tokens) or a layer with no inputs. They go to F.linear: zeros and the bias."""
    matmul_setting("onednn")
    layer = Linear(16, 8)
    x = torch.empty(0, 16, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(8, 16)) and torch.equal(layer.bias.grad, torch.zeros(8))
    empty = Linear(0, 8)
    assert torch.equal(empty(torch.empty(3, 0)), empty.bias.detach().expand(3, 8))


@needs_onednn
def test_one_row_decoding_follows_weight_updates_and_saves_nothing(matmul_setting, monkeypatch):
    matmul_setting("onednn")
    calls = []
    real = linear.row_product
    monkeypatch.setattr(linear, "row_product", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer.decoder()(x.view(-1)), F.linear(x, layer.weight, layer.bias).view(-1))
        layer.weight.mul_(-2.0)  # an in-place update (an optimizer step, load_state_dict) bumps its version
        torch.testing.assert_close(layer.decoder()(x.view(-1)), F.linear(x, layer.weight, layer.bias).view(-1))
    assert len(calls) == 2
    assert set(layer.state_dict()) == {"weight", "bias"}  # the W^T copy is not a parameter or buffer
    with torch.no_grad():  # forward never uses the copy: it follows even a write through .data, which no
        layer.weight.data.mul_(3.0)  # version counter sees (a learner's manual SGD step: p.data -= lr * p.grad)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    layer(x)  # with grad enabled the row goes through OneDNNLinear (it may need a backward)
    assert len(calls) == 2


@needs_onednn
def test_gradients_reach_a_trainable_bias_of_a_frozen_layer_and_strided_inputs(matmul_setting):
    matmul_setting("onednn")
    torch.manual_seed(0)
    layer = Linear(16, 8)
    layer.weight.requires_grad_(False)  # only the bias trains, and the input needs no grad
    x = torch.randn(6, 16)
    layer(x).square().sum().backward()
    want = torch.autograd.grad(F.linear(x, layer.weight, layer.bias).square().sum(), layer.bias)[0]
    torch.testing.assert_close(layer.bias.grad, want)

    layer.weight.requires_grad_(True)
    xt = torch.randn(16, 6, requires_grad=True)  # x = xt.t() is a transposed (strided) view
    (g_x, g_w) = torch.autograd.grad(layer(xt.t()).square().sum(), (xt, layer.weight))
    (r_x, r_w) = torch.autograd.grad(F.linear(xt.t(), layer.weight, layer.bias).square().sum(), (xt, layer.weight))
    torch.testing.assert_close(g_x, r_x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w, r_w, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_second_derivatives_are_nn_linears(matmul_setting):
    """A gradient penalty through oneDNN's products: refused with a raw error where the first gradient's own gradient
    required grad, and silently zero (or "does not require grad") where it did not."""
    matmul_setting("onednn")
    torch.manual_seed(0)
    layer, ref = Linear(8, 4), torch.nn.Linear(8, 4)
    ref.load_state_dict(layer.state_dict())
    for lin in (layer, ref):
        x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)  # (B, T, C)
        lin.second = []
        for of in (x, lin.weight):  # a penalty on the input's gradient, then on the weight's
            (g,) = torch.autograd.grad(lin(x).square().sum(), of, create_graph=True)
            lin.second += torch.autograd.grad(g.square().sum(), (x, lin.weight, lin.bias))
        (g,) = torch.autograd.grad(lin(x).sum(), x, create_graph=True)  # a constant incoming gradient
        g.square().sum().backward()
    for got, want in zip((*layer.second, layer.weight.grad), (*ref.second, ref.weight.grad)):
        assert want.abs().sum() > 0  # (the sums of ~17 here differ in their float32 rounding: 8e-6 relative on Zen 5)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    x = torch.randn(2, 8, requires_grad=True)
    if linear.onednn_bf16_works():  # (the rounded copies it keeps lead back to no input: refused, not zero)
        with linear.bfloat16_products(), pytest.raises(RuntimeError, match="second derivatives through bfloat16"):
            torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


@needs_onednn
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # (torch.func's own import)
def test_forward_mode_derivatives_and_wrong_widths_are_nn_linears(matmul_setting):
    """jvp, jacfwd and forward_ad through a layer needing no backward went to oneDNN's op, which dropped the tangents
    (zeros or None, silently); an input of another width got oneDNN's "could not create a primitive descriptor"."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import jacfwd, jvp

    matmul_setting("onednn")
    torch.manual_seed(0)
    layer, ref = Linear(4, 3).requires_grad_(False), torch.nn.Linear(4, 3)
    ref.load_state_dict(layer.state_dict())
    x, t = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(jvp(layer, (x,), (t,))[1], jvp(ref, (x,), (t,))[1])
    torch.testing.assert_close(jacfwd(layer)(x), jacfwd(ref)(x))
    with fwAD.dual_level():
        torch.testing.assert_close(fwAD.unpack_dual(layer(fwAD.make_dual(x, t))).tangent, t @ layer.weight.t())
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(2x5 and 4x3\)"):
        layer(torch.ones(2, 5))
    # a tangent on the bias alone (torch.func.functional_call over it)
    tb = torch.randn(3)
    got = jvp(lambda b: torch.func.functional_call(layer, {"bias": b}, (x,)), (layer.bias,), (tb,))[1]
    torch.testing.assert_close(got, tb.expand(2, 3))


@needs_onednn
def test_decoding_cache_sees_new_weights_after_copies_loads_and_replacements(matmul_setting):
    import copy

    matmul_setting("onednn")
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(1, 16)

    def check(m):
        with torch.no_grad():
            torch.testing.assert_close(m.decoder()(x.view(-1)), F.linear(x, m.weight, m.bias).view(-1))

    with torch.no_grad():
        layer.decoder()  # fills the W^T cache
        layer.weight.add_(1.0)  # version 1
        check(layer)
        twin = copy.deepcopy(layer)  # the copy's weight starts a new version count
        twin.weight.mul_(3.0)
        check(twin)
    layer.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.randn(8)})
    check(layer)
    layer.weight.data = torch.randn(8, 16)  # another storage behind the same Parameter
    check(layer)
    assert layer(torch.empty(0, 16)).shape == (0, 8)


def test_env_var_sets_auto_and_bad_values_get_one_clear_line(matmul_setting, monkeypatch):
    monkeypatch.setenv("FUNGPT_CPU_MATMUL", "torch")
    assert matmul_setting("auto") == "torch"
    if linear.onednn_works():
        assert matmul_setting("onednn") == "onednn"  # an explicit setting beats the variable
    monkeypatch.setenv("FUNGPT_CPU_MATMUL", "mkl")
    with pytest.raises(FunGPTError, match="FUNGPT_CPU_MATMUL='mkl' is unknown"):
        matmul_setting("auto")
    monkeypatch.setenv("FUNGPT_CPU_MATMUL", "")  # set empty (FUNGPT_CPU_MATMUL= in a script): as unset
    assert matmul_setting("auto") == linear._detected("auto")
    # oneDNN asked for by the variable where this torch has none: said of the variable ('auto' is what read it)
    monkeypatch.setenv("FUNGPT_CPU_MATMUL", "onednn")
    monkeypatch.setattr(linear, "onednn_works", lambda: False)
    with pytest.raises(FunGPTError, match=r"^FUNGPT_CPU_MATMUL=onednn, but this torch build has no working oneDNN "
                                          r"linear op: unset it, or set it to torch$"):
        matmul_setting("auto")


def test_the_onednn_check_leaves_the_random_stream_alone():
    linear.onednn_works.cache_clear()
    torch.manual_seed(0)
    linear.onednn_works()
    after = torch.rand(3)
    torch.manual_seed(0)
    torch.testing.assert_close(after, torch.rand(3))


def test_the_onednn_check_says_the_same_when_first_asked_inside_autocast():
    """Asked first inside CPU autocast, F.linear gave bfloat16 and the cached answer was "no oneDNN" for good."""
    linear.onednn_works.cache_clear()
    plain = linear.onednn_works()
    linear.onednn_works.cache_clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear.onednn_works() == plain
    linear.onednn_works.cache_clear()


def test_cpu_info_reads_a_field_and_is_empty_when_unknown(monkeypatch):
    import builtins
    import io

    from fungpt.hardware import cpu_info

    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: io.StringIO(text) if f == "/proc/cpuinfo"
                        else real_open(f, *a, **k))
    assert cpu_info("vendor_id") == "AuthenticAMD" and cpu_info("model name") == "AMD EPYC"
    assert cpu_info("flags") == ""

    def no_file(f, *a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(builtins, "open", no_file)
    assert cpu_info("vendor_id") == ""


# ------------------------------------------------------------------ bfloat16 products (dtype bfloat16 on a CPU)

def _bf(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bfloat16, back in float32."""
    return t.to(torch.bfloat16).float()


@pytest.mark.parametrize("setting", ["onednn", "torch"])
def test_bfloat16_products_round_the_operands_and_return_float32(matmul_setting, setting):
    """Each product takes its operands rounded to bfloat16, sums in float32 and rounds its result to bfloat16;
    what goes in and out (activations, gradients, the bias gradient) stays float32."""
    if setting == "onednn" and not linear.onednn_bf16_works():
        pytest.skip("this CPU or torch has no oneDNN bfloat16 products")
    matmul_setting(setting)
    torch.manual_seed(0)
    layer = Linear(96, 384)  # N > K: the weight gradient's transposed product
    x = torch.randn(4, 8, 96, requires_grad=True)
    gy = torch.randn(4, 8, 384)
    with linear.bfloat16_products():
        y = layer(x)
    y.backward(gy)
    w, b = layer.weight.detach(), layer.bias.detach()
    want_y = _bf(F.linear(_bf(x.detach()), _bf(w), _bf(b)))
    want_gx = _bf(_bf(gy) @ _bf(w))
    want_gw = _bf(_bf(gy).reshape(-1, 384).t() @ _bf(x.detach()).reshape(-1, 96))
    for got, want in ((y.detach(), want_y), (x.grad, want_gx), (layer.weight.grad, want_gw)):
        assert got.dtype == torch.float32 and got.is_contiguous()
        # one bfloat16 rounding apart at most (other order of float32 sums): 2^-8 relative
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(layer.bias.grad, gy.sum((0, 1)))  # from the unrounded gradient
    exact = F.linear(x.detach(), w, b)
    assert (y.detach() - exact).abs().max() > 1e-3  # not float32 products: rounding shows
    # outside the block, float32 again
    torch.testing.assert_close(layer(x.detach()), exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setting", ["onednn", "torch"])
def test_bfloat16_products_keep_the_mlps_hidden_layer_in_bfloat16_with_the_same_loss(matmul_setting, setting):
    """The MLP's first layer hands its bfloat16 result to the activation as it is (c_proj would round the
    activation's output anyway): the losses and gradients are those of float32 outputs rounded before c_proj."""
    if setting == "onednn" and not linear.onednn_bf16_works():
        pytest.skip("this CPU or torch has no oneDNN bfloat16 products")
    matmul_setting(setting)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 50, (4, 32))
    seen = []
    model.blocks[0].mlp.act.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    model.blocks[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    def loss_and_grads():
        model.zero_grad()
        _, loss = model(x, x)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    with linear.bfloat16_products():
        loss, grads = loss_and_grads()
    assert seen == [(torch.bfloat16, torch.bfloat16), torch.float32]
    model.blocks[0].mlp.c_fc.keeps_bfloat16 = model.blocks[1].mlp.c_fc.keeps_bfloat16 = False
    with linear.bfloat16_products():
        loss_f32_hidden, grads_f32_hidden = loss_and_grads()
    assert seen[-2:] == [(torch.float32, torch.float32), torch.float32]
    assert loss == pytest.approx(loss_f32_hidden, rel=1e-4)
    for g, h in zip(grads, grads_f32_hidden):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, h, rtol=2 ** -6, atol=1e-3 * h.abs().max().item())
    model.blocks[0].mlp.c_fc.keeps_bfloat16 = model.blocks[1].mlp.c_fc.keeps_bfloat16 = True
    exact, _ = loss_and_grads()  # float32 products
    assert loss == pytest.approx(exact, rel=1e-2) and loss != exact


def test_bfloat16_products_hold_in_a_compiled_graph_too(matmul_setting, monkeypatch):
    """torch.compile traces F.linear, not oneDNN's op: under bfloat16 products it traced float32 products, so a
    compiled bfloat16 CPU run trained in float32 while its (uncompiled) evals ran bfloat16 products."""
    matmul_setting("onednn" if linear.onednn_works() else "torch")
    torch.manual_seed(0)
    layer = Linear(64, 32)
    x = torch.randn(8, 64)
    want = _bf(F.linear(_bf(x), _bf(layer.weight.detach()))) + layer.bias.detach()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as Linear.forward sees it while traced
    with linear.bfloat16_products(), torch.no_grad():
        got = layer(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=1e-2)
    assert (got - F.linear(x, layer.weight, layer.bias)).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))  # float32 outside


def test_bfloat16_products_hold_for_the_calling_thread_only_and_take_empty_inputs(matmul_setting):
    """Like autocast, per thread: a run inside the context in one thread left another thread's products in
    bfloat16 too. And an empty bfloat16 input (skipping oneDNN, which refuses empty ones) failed on F.linear."""
    import threading

    matmul_setting("onednn" if linear.onednn_works() else "torch")
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    exact = F.linear(x, layer.weight, layer.bias).detach()
    seen = []
    started, done = threading.Event(), threading.Event()

    def other():
        started.wait()
        with torch.no_grad():
            seen.append(layer(x))
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with linear.bfloat16_products():
        started.set()
        done.wait()
        assert linear.bfloat16_products_active()
        with torch.no_grad():
            assert (layer(x) - exact).abs().max() > 1e-4  # this thread: bfloat16 products
        layer.keeps_bfloat16 = True
        assert layer(torch.zeros(0, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
        layer.keeps_bfloat16 = False
        assert layer(torch.zeros(0, 16)).shape == (0, 8)
    t.join()
    torch.testing.assert_close(seen[0], exact)  # the other thread: float32, as it asked
