"""Speed-related features: Muon, full-split evaluation, prompt-lookup speculative generation."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

from fungpt.config import DataConfig, RunConfig, TrainConfig
from fungpt.data import load_meta, prepare
from fungpt.errors import FunGPTError
from fungpt.evaluation import full_split_loss
from fungpt.model import GPT, GPTConfig
from fungpt.speculative import lookup_draft
from fungpt.train import CombinedOptimizer, configure_optimizer, train


def small_model(**kw) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    return GPT(GPTConfig(**base))


# ---------------------------------------------------------------- Muon


def test_muon_takes_block_matrices_and_adamw_the_rest():
    model = small_model(tie_embeddings=False)
    opt = configure_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), "cpu")
    assert isinstance(opt, CombinedOptimizer)
    adamw, muon = opt.parts
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in in_muon}
    expected = {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert names == expected and expected
    assert not any(n.startswith(("wte", "lm_head", "pos")) for n in names)
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert in_adamw | in_muon == {id(p) for p in model.parameters()} and not in_adamw & in_muon
    # The training loop sets group["lr"] = lr * lr_scale: Muon's groups peak at muon_lr.
    assert [g["lr_scale"] for g in muon.param_groups] == [pytest.approx(20.0)]


def test_the_muon_optimizers_keep_torch_optimizers_contract():
    """Used as torch optimizers (a closure, step hooks, an lr scheduler, a new group): the closure was never
    called and None returned, hooks raised AttributeError, and a group added to the combination trained by no
    part, silently."""
    model = small_model()
    opt = configure_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3), "cpu")
    x = torch.randint(0, 50, (2, 16))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        _, loss = model(x, x)
        loss.backward()
        return loss

    hooked = []
    opt.register_step_pre_hook(lambda o, args, kwargs: hooked.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: hooked.append("post"))
    w = model.blocks[0].mlp.c_fc.weight
    before = w.detach().clone()
    loss = opt.step(closure)
    assert calls == [1] and loss is not None and math.isfinite(loss.item()) and hooked == ["pre", "post"]
    assert not torch.equal(w.detach(), before)  # (the closure's gradients reached Muon's part)
    muon = opt.parts[1]
    assert muon.step(closure) is not None and calls == [1, 1]
    # A scheduler sets the lr through the combination's groups, which are the parts' own
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in muon.param_groups] == [pytest.approx(0.5 * g["initial_lr"]) for g in muon.param_groups]
    del scheduler
    with pytest.raises(ValueError, match="add it to one of .parts"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "lr": 0.1})


def test_muon_step_orthogonalises_and_state_round_trips():
    model = small_model()
    opt = configure_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.0), "cpu")
    w = model.blocks[0].mlp.c_fc.weight
    before = w.detach().clone()
    x = torch.randint(0, 50, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    update = before - w.detach()
    # Muon's update is (close to) orthogonal: its singular values are about equal, unlike the gradient's
    # (a rank-deficient gradient keeps a few small ones, hence the top 90% only).
    s = torch.linalg.svdvals(update)[: int(0.9 * update.size(1))]
    g = torch.linalg.svdvals(w.grad)[: int(0.9 * update.size(1))]
    assert s.max() / s.min() < 2 < g.max() / g.min()
    state = opt.state_dict()
    opt2 = configure_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    opt2.load_state_dict(state)
    assert torch.equal(opt2.parts[1].state[w]["momentum_buffer"], opt.parts[1].state[w]["momentum_buffer"])
    with pytest.raises(FunGPTError, match="optimizer"):
        opt2.load_state_dict({"parts": [state["parts"][0]]})


def test_unknown_optimizer_is_rejected():
    with pytest.raises(FunGPTError, match="optimizer"):
        TrainConfig(optimizer="sgd")


# ---------------------------------------------------------------- full-split evaluation


@pytest.fixture()
def prepared(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat; the dog sat on the log.\n" * 60, encoding="utf-8")
    return prepare(corpus, tmp_path / "data", tokenizer="char", progress=False)


def test_full_split_loss_scores_every_val_token_once(prepared):
    import json

    import numpy as np

    meta = json.loads((prepared / "meta.json").read_text())
    model = small_model(vocab_size=meta["vocab_size"], block_size=16).eval()
    cfg = RunConfig(model=model.config, train=TrainConfig(batch_size=3))
    got = full_split_loss(model, prepared, "val", cfg, "cpu", lambda: torch.autocast("cpu", enabled=False))
    # Reference: every target 1..n-1 scored with as much context as its window gives, one at a time.
    data = torch.from_numpy(np.fromfile(prepared / "val.bin", dtype=np.dtype(meta["dtype"])).astype(np.int64))
    n, T = len(data), 16
    total = 0.0
    with torch.no_grad():
        for t in range(1, n):
            start = ((t - 1) // T) * T if (t - 1) // T < (n - 1) // T else n - 1 - T
            logits = model(data[start:t][None])[0, -1]
            total -= torch.log_softmax(logits, -1)[data[t]].item()
    assert got == pytest.approx(total / (n - 1), rel=1e-5)


def test_a_full_split_eval_batches_a_large_vocabulary_as_training_does():
    """At 4 x batch_size, a BPE 8192 model's (B, T, vocab) logits and their log-softmax took 8x the memory estimated
    for training (3.9 GB, the dry run said 0.45 GB fits); small logits keep the faster 4 x batch_size."""
    from fungpt.evaluation import full_split_batch

    def cfg(vocab: int) -> RunConfig:
        return RunConfig(model=GPTConfig(vocab_size=vocab, block_size=256, n_layer=1, n_head=2, n_embd=32),
                         train=TrainConfig(batch_size=16))

    assert full_split_batch(cfg(65)) == 64 and full_split_batch(cfg(8192)) == 16


def test_eval_full_val_run_logs_thefull_split_loss(prepared, tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path / "run"), data=DataConfig(path=str(prepared)),
                    model=GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=16),
                    train=TrainConfig(batch_size=4, max_iters=3, eval_interval=100, eval_iters=1, warmup_iters=0,
                                      checkpoint_interval=100, device="cpu", eval_full_val=True,
                                      optimizer="muon"))
    result = train(cfg, progress=False)
    from fungpt.runs import load_run

    run = load_run(tmp_path / "run")
    expected = full_split_loss(run.model, prepared, "val", cfg, "cpu", lambda: torch.autocast("cpu", enabled=False))
    assert math.isclose(result["val_loss"], expected, rel_tol=1e-5)


def test_eval_full_val_shows_its_progress_in_batches(prepared, tmp_path, monkeypatch, capsys):
    """A large corpus's val split can take minutes to score: the bar (shown after a second) counts its batches."""
    import tqdm.auto

    class Eager(tqdm.auto.tqdm):  # no one-second delay, so that this tiny eval shows its bar
        def __init__(self, *args, **kw):
            super().__init__(*args, **{**kw, "delay": 0})

    monkeypatch.setattr(tqdm.auto, "tqdm", Eager)
    cfg = RunConfig(out_dir=str(tmp_path / "run"), data=DataConfig(path=str(prepared)),
                    model=GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=16),
                    train=TrainConfig(batch_size=1, max_iters=1, eval_interval=100, eval_iters=1, warmup_iters=0,
                                      checkpoint_interval=100, device="cpu", eval_full_val=True))
    train(cfg, progress=True)
    targets = load_meta(prepared)["val_tokens"] - 1
    batches = math.ceil(math.ceil(targets / 16) / 4)  # windows of 16 targets, 4 x batch_size windows a batch
    err = capsys.readouterr().err
    assert err.count(f"eval (val, every token):   0%|          | 0/{batches} [") == 2  # the first and last evals
    train(dataclasses.replace(cfg, out_dir=str(tmp_path / "quiet")), progress=False)
    assert "every token" not in capsys.readouterr().err


# ---------------------------------------------------------------- prompt-lookup speculation


def test_lookup_draft_copies_what_followed_the_latest_match():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]
    assert lookup_draft([5, 1, 2, 7, 1, 2], 3) == [7, 1, 2]  # 2-gram [1, 2] matched at index 1
    assert lookup_draft([4, 4, 4], 5) == [4, 4, 4, 4, 4]  # overlapping copy continues the pattern
    assert lookup_draft([1, 2, 3], 4) == []  # nothing repeats
    assert lookup_draft([1, 1], 0) == []


@pytest.mark.parametrize("prompt", [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [7, 8, 9, 10, 11]])
def test_lookahead_gives_the_same_greedy_tokens_and_logits(prompt):
    model = small_model(block_size=48)
    with torch.no_grad():  # make the random model's greedy text repetitive, so guesses are accepted
        model.wte.weight.mul_(20)
    idx = torch.tensor([prompt])
    plain = list(model.generate_stream(idx, 60, temperature=0.0, yield_logits=True))  # slides past block_size
    fast = list(model.generate_stream(idx, 60, temperature=0.0, yield_logits=True, lookahead=5))
    assert torch.equal(torch.stack([t for t, _ in plain]), torch.stack([t for t, _ in fast]))
    for (_, a), (_, b) in zip(plain, fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert b.untyped_storage().nbytes() == b.numel() * 4  # its own row: not the checked draft's k + 1 kept alive


def test_lookahead_saves_forward_passes_on_repetitive_text():
    model = small_model()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    out = model.generate(torch.tensor([[3, 3, 3, 3]]), 40, temperature=0.0, lookahead=8)
    n_fast = len(calls)  # forward passes (each reads the weights once) for 40 new tokens
    assert torch.equal(out, model.generate(torch.tensor([[3, 3, 3, 3]]), 40, temperature=0.0))
    if len(set(out[0, 4:].tolist())) == 1:  # the greedy continuation repeats: guesses are right
        assert n_fast < 40 / 3


@pytest.mark.parametrize("lookahead", [8, 16, 10**6])
def test_a_lookahead_as_long_as_the_block_still_speculates_up_to_its_edge(lookahead):
    """The check asked whether the whole lookahead fit after the cached tokens, not the draft actually made: a
    lookahead of block_size or more turned speculation off without a word."""
    model = small_model(block_size=16)
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    prompt = torch.tensor([[3, 3, 3, 3]])
    out = model.generate(prompt, 10, temperature=0.0, lookahead=lookahead)  # 14 tokens: inside the block
    passes = len(calls)
    assert torch.equal(out, model.generate(prompt, 10, temperature=0.0))
    assert out[0].tolist() == [3] * 14  # (this seed's model repeats the token: every guess is right)
    assert passes == 2  # the prompt, then one pass checking a draft of the 9 tokens after the first


def test_a_huge_lookahead_while_sampling_asks_for_no_memory():
    """Without speculation (sampling) lookahead plays no part; it sized the token buffer: 8 TB was asked of the
    allocator, a raw RuntimeError."""
    stream = small_model().generate_stream(torch.tensor([[1, 2]]), 10**12, temperature=1.0, lookahead=10**12)
    assert [next(stream).shape for _ in range(3)] == [torch.Size([1])] * 3
    stream.close()


def test_lookahead_must_not_be_negative():
    with pytest.raises(FunGPTError, match="lookahead"):
        next(small_model().generate_stream(torch.tensor([[1]]), 3, temperature=0.0, lookahead=-1))


def test_muon_gives_a_matrix_its_state_when_its_first_gradient_comes_later():
    """Momentum state was made for all matrices of a shape when the first of them had none; one that got no
    gradient then (frozen for a while, or unused) had none later: a KeyError."""
    from fungpt.muon import Muon

    a, b = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    opt = Muon([a, b], lr=0.01)
    a.grad = torch.randn(4, 6)
    opt.step()
    before = b.detach().clone()
    a.grad, b.grad = torch.randn(4, 6), torch.randn(4, 6)
    opt.step()
    assert not torch.equal(b, before) and torch.equal(opt.state[b]["momentum_buffer"], b.grad)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon to compare with")
def test_float32_muon_matches_torch_muon():
    from fungpt.muon import Muon

    torch.manual_seed(0)
    tall, wide = torch.randn(96, 32), torch.randn(24, 80)
    ours = [torch.nn.Parameter(t.clone()) for t in (tall, wide)]
    ref = [torch.nn.Parameter(t.clone()) for t in (tall, wide)]
    opt_ours = Muon(ours, lr=0.05, momentum=0.9, weight_decay=0.1)
    opt_ref = torch.optim.Muon(ref, lr=0.05, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn_like(t) for t in (tall, wide)]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_ref.step()
    for p, q, start in zip(ours, ref, (tall, wide)):
        moved = (q - start).abs().max()
        assert moved > 0.01
        # torch's Newton-Schulz runs in bfloat16 (about 3 significant digits); ours in float32
        assert (p - q).abs().max() < 0.05 * moved
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


# ---------------------------------------------------------------- fast pieces and time budgets


def test_relu2_hand_written_backward_matches_autograd():
    from fungpt.model import ReLU2

    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    x.data[0, 0, :3] = torch.tensor([0.0, -0.0, 1e-12], dtype=torch.float64)  # the kink and its neighbourhood
    assert torch.autograd.gradcheck(ReLU2(), (x,))
    g = torch.randn(3, 5, 7, dtype=torch.float64)
    (got,) = torch.autograd.grad(ReLU2()(x), x, g)
    (want,) = torch.autograd.grad(torch.relu(x).square(), x, g)
    assert torch.equal(ReLU2()(x), torch.relu(x).square()) and torch.allclose(got, want)


def test_rope_rotation_equals_the_pairwise_rotation_formula():
    from fungpt.positions import RotaryPositions

    hs, T = 8, 5
    rope = RotaryPositions(block_size=T, head_size=hs)
    q, k = torch.randn(2, 3, T, hs), torch.randn(2, 3, T, hs)
    pos = torch.arange(T)
    qr, kr = rope.rotate(q, k, pos)
    theta = 10000.0 ** (-torch.arange(hs // 2) / (hs // 2))
    angle = pos[:, None].float() * theta  # (T, hs/2)
    for x, xr in ((q, qr), (k, kr)):
        x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
        want = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()), dim=-1)
        assert torch.allclose(xr, want, atol=1e-6)


def test_the_models_rope_base_sets_its_angles():
    """No test failed when make_positions dropped model.rope_base: --model.rope-base would have done nothing."""
    hs = 16
    model = small_model(pos_encoding="rope", rope_base=100.0, n_embd=32, n_head=2)
    theta = 100.0 ** (-torch.arange(hs // 2) / (hs // 2))
    assert torch.allclose(model.pos.cos[1, : hs // 2], theta.cos(), atol=1e-6)  # position 1: the angles themselves


def test_qk_norm_uses_the_models_norm_kind():
    ln = small_model(qk_norm=True).blocks[0].attn
    rms = small_model(qk_norm=True, norm="rmsnorm").blocks[0].attn
    assert isinstance(ln.q_norm, torch.nn.LayerNorm) and ln.q_norm.bias is None
    assert isinstance(rms.k_norm, torch.nn.RMSNorm)
    assert set(ln.state_dict()) == set(rms.state_dict())  # same parameter names either way


def test_keep_freed_memory_stops_page_faults_between_steps():
    import platform

    from fungpt.hardware import keep_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert keep_freed_memory() is False
        return
    # run in a child: mallopt changes the whole process, and the test should not change pytest's
    import subprocess
    import sys

    code = (
        "import resource, sys, torch\n"
        "from fungpt.hardware import keep_freed_memory\n"
        "if sys.argv[1] == 'keep': assert keep_freed_memory()\n"
        "def step():\n"
        "    torch.ones(1 << 24)  # 64 MiB, freed again (above glibc's largest automatic mmap threshold)\n"
        "step(); step()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20): step()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("keep", "default")}
    block = 1 << 14  # pages in a 64 MiB block (4 KiB pages)
    # Without it, each of the 20 steps faults its block in again. With it, steps reuse the block; the
    # kernel may still reclaim the idle pages now and then (a CI run once saw one re-fault in 20 steps).
    assert faults["default"] >= 18 * block and faults["keep"] <= 2 * block, faults


def test_budget_run_times_its_plot_at_step_0_without_a_warning(prepared, tmp_path, capsys):
    cfg = RunConfig(out_dir=str(tmp_path / "run"), data=DataConfig(path=str(prepared)),
                    model=GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=16),
                    train=TrainConfig(batch_size=4, max_iters=3, eval_interval=100, eval_iters=1, warmup_iters=0,
                                      checkpoint_interval=100, device="cpu", max_minutes=5.0))
    train(cfg, progress=False)
    err = capsys.readouterr().err  # (the step-0 timing finds no rows yet: expected, and not a failure)
    assert "trial drawing" not in err and "could not draw" not in err, err
    assert (tmp_path / "run/loss.png").is_file()


def test_budget_run_skips_the_step0_eval_and_can_skip_the_plot(prepared, tmp_path):
    import json

    cfg = RunConfig(out_dir=str(tmp_path / "run"), data=DataConfig(path=str(prepared)),
                    model=GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=16),
                    train=TrainConfig(batch_size=4, max_iters=5, eval_interval=100, eval_iters=1, warmup_iters=0,
                                      checkpoint_interval=100, device="cpu", eval_full_val=True,
                                      max_minutes=5.0, plot=False))
    train(cfg, progress=False)
    rows = [json.loads(r) for r in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if "val_loss" in r]
    assert evals == [5]  # only the final eval: no step-0 eval under a time budget
    assert not (tmp_path / "run/loss.png").exists()


def test_a_budget_resume_with_other_evals_estimates_its_final_eval_again(prepared, tmp_path, monkeypatch):
    """A budget run resumed with 100 times its eval_iters planned with the eval time its checkpoint had measured,
    and ran 6 s past a 30 s budget: a resume estimates its eval again, as step 0 does."""
    train_mod = sys.modules["fungpt.train"]  # (fungpt.train the name is the function)
    real, estimated = train_mod.estimate_eval_time, []

    def estimate(*args, **kwargs):
        estimated.append(args[2].train.eval_iters)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "estimate_eval_time", estimate)

    def run(max_iters: int, eval_iters: int) -> None:
        cfg = RunConfig(out_dir=str(tmp_path / "run"), data=DataConfig(path=str(prepared)),
                        model=GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=16),
                        train=TrainConfig(batch_size=4, max_iters=max_iters, eval_interval=100, eval_iters=eval_iters,
                                          warmup_iters=0, checkpoint_interval=100, device="cpu", max_minutes=5.0,
                                          plot=False))
        train(cfg, resume=max_iters > 2, progress=False)

    run(2, eval_iters=1)  # step 0 estimates it
    run(4, eval_iters=1)  # each resume estimates it again (budget.TimeBudget.eval_estimated chooses)
    run(6, eval_iters=100)
    assert estimated == [1, 1, 100]
    # which evals are other ones than the checkpoint timed (its estimate then replaces the checkpoint's time)
    same, changed = TrainConfig(), TrainConfig(eval_iters=TrainConfig().eval_iters + 1)
    assert not train_mod.evals_changed(same, TrainConfig()) and not train_mod.evals_changed(None, changed)
    for other in (changed, TrainConfig(eval_full_val=True), TrainConfig(batch_size=3)):
        assert train_mod.evals_changed(same, other)


def test_eval_estimate_uses_the_fastest_of_its_timings(prepared, monkeypatch):
    import contextlib
    import types

    import fungpt.evaluation as evaluation

    clock = [0.0]
    costs = iter([5.0, 1.0, 3.0])  # seconds per forward pass: a cold first pass, then interference

    class FakeModel(torch.nn.Module):
        def forward(self, x):
            clock[0] += next(costs)  # time passes only inside the forward
            return x

    monkeypatch.setattr(evaluation, "time",  # (time_forward's clock)
                        types.SimpleNamespace(time=lambda: clock[0], perf_counter=lambda: clock[0]))
    cfg = RunConfig(out_dir="unused", data=DataConfig(path=str(prepared)),
                    model=GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=16),
                    train=TrainConfig(batch_size=4, eval_iters=1, device="cpu", eval_full_val=False))
    est = evaluation.estimate_eval_time(FakeModel(), prepared, cfg, "cpu", contextlib.nullcontext)
    windows = 4  # one timed batch holds batch_size windows, as each of evaluate's batches does
    n_windows = 2 * 1 * 4  # evaluate's train and val batches: 2 x eval_iters x batch_size
    assert est == pytest.approx(1.3 * (1.0 / windows) * n_windows)  # the fastest timing, with the 30% margin

    # With the full val split, evaluate draws train batches only, then scores every val window once.
    costs = iter([1.0, 1.0, 1.0])
    cfg.train.eval_full_val = True
    est = evaluation.estimate_eval_time(FakeModel(), prepared, cfg, "cpu", contextlib.nullcontext)
    val_windows = math.ceil((load_meta(prepared)["val_tokens"] - 1) / 16)
    assert est == pytest.approx(1.3 * (1.0 / windows) * (1 * 4 + val_windows))


def test_full_val_eval_draws_no_val_batches(prepared, monkeypatch):
    """The val batches' mean would be replaced by the full-split loss: drawing them is wasted time."""
    import fungpt.evaluation as evaluation

    splits = []
    real = evaluation.BatchLoader

    def recording(data_dir, split, *a, **k):
        splits.append(split)
        return real(data_dir, split, *a, **k)

    monkeypatch.setattr(evaluation, "BatchLoader", recording)
    cfg = RunConfig(out_dir="unused", data=DataConfig(path=str(prepared)),
                    model=GPTConfig(vocab_size=load_meta(prepared)["vocab_size"], block_size=16, n_layer=1, n_head=2,
                                    n_embd=16),
                    train=TrainConfig(batch_size=4, eval_iters=2, device="cpu", eval_full_val=True))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    out = evaluation.evaluate(model, prepared, cfg, "cpu", contextlib.nullcontext)
    assert splits == ["train"]
    assert out["val"] == pytest.approx(full_split_loss(model, prepared, "val", cfg, "cpu", contextlib.nullcontext))
    cfg.train.eval_full_val = False
    splits.clear()
    evaluation.evaluate(model, prepared, cfg, "cpu", contextlib.nullcontext)
    assert splits == ["train", "val"]


@pytest.mark.parametrize("preset", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.toml")))
def test_every_preset_loads_and_builds_its_model(preset):
    from fungpt.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / preset)
    if cfg.model.init_from == "scratch":
        with torch.device("meta"):  # no memory: only the shapes are checked
            GPT(GPTConfig(**{**cfg.model.to_dict(), "vocab_size": 65}))
    if preset == "speedrun-cpu.toml":
        assert cfg.train.max_minutes and cfg.train.eval_full_val and not cfg.train.plot


def test_lookup_draft_prefers_the_latest_and_longest_match_and_runs_on_into_itself():
    assert lookup_draft([1, 5, 1, 6, 1], 1) == [6]  # the latest match of [1], not the first
    assert lookup_draft([7, 2, 5, 3, 2, 6, 7, 2], 1) == [5]  # the 2-gram [7, 2] before the later 1-gram [2]
    assert lookup_draft([1, 2, 3, 1, 2], 4) == [3, 1, 2, 3]  # the copy continues into the guess itself


@pytest.mark.parametrize("draft, taken", [([0, 0, 0], 4), ([0, 5, 0], 2)])
def test_verify_draft_keeps_the_right_guesses_and_rolls_the_cache_back_over_the_rest(draft, taken):
    """A draft the model agrees with entirely is taken whole, plus the model's own next token (the bonus). One wrong
    from its second guess keeps the first guess and the model's correction; the keys and values of the rejected
    guesses must leave the cache, never to be attended to by the next step."""
    from fungpt.speculative import verify_draft

    model = GPT(GPTConfig(vocab_size=10, block_size=16, n_layer=1, n_head=1, n_embd=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # all logits equal: the greedy token is 0 everywhere
        seq = torch.zeros(1, 16, dtype=torch.long)
        cache = model.make_kv_cache(1)
        model(seq[:, :3], kv_cache=cache)  # the prompt's first 3 tokens cached, its 4th the newest
        history = [0, 0, 0, 0]
        out = list(verify_draft(model, seq, 4, draft, cache, history, False))
    assert [int(t) for t in out] == [0] * taken and history == [0] * (4 + taken)
    assert cache.pos == 3 + 1 + (taken - 1)  # the newest token and the right guesses (the last token is not cached)


def test_verify_draft_picks_by_sampling_rules_not_a_raw_argmax(monkeypatch):
    """A learner bans a token in sample_next_token (a lipogram): the plain path held the ban, and speculation,
    checking its guesses with a raw argmax, accepted the banned token wherever the text had it before."""
    import fungpt.sampling
    import fungpt.speculative
    from fungpt.speculative import verify_draft

    real = fungpt.sampling.sample_next_token

    def lipogram(logits, *args, **kw):  # token 0 banned
        logits = logits.clone()
        logits[..., 0] = float("-inf")
        return real(logits, *args, **kw)

    monkeypatch.setattr(fungpt.speculative, "sample_next_token", lipogram)  # (as an edit of sampling.py would)
    model = GPT(GPTConfig(vocab_size=10, block_size=16, n_layer=1, n_head=1, n_embd=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # all logits equal: the raw argmax is 0 everywhere, the lipogram's pick 1
        seq = torch.zeros(1, 16, dtype=torch.long)
        cache = model.make_kv_cache(1)
        model(seq[:, :3], kv_cache=cache)
        history = [0, 0, 0, 0]
        out = list(verify_draft(model, seq, 4, [0, 0, 0], cache, history, False))
    assert [int(t) for t in out] == [1] and history == [0, 0, 0, 0, 1]  # the guess refused, the rule's token
    assert cache.pos == 3 + 1


def test_muon_decays_by_lr_times_weight_decay_and_scales_a_tall_matrix_by_the_root_of_its_aspect():
    """Checked by hand, where torch.optim.Muon (the other test's reference) is missing: torch before 2.9."""
    from fungpt.muon import Muon, orthogonalize

    g = torch.Generator().manual_seed(0)
    for rows, cols, scale in ((16, 8, 2**0.5), (8, 16, 1.0)):  # tall: sqrt(16 / 8); wide: 1
        p = torch.nn.Parameter(torch.randn(rows, cols, generator=g))
        grad = torch.randn(rows, cols, generator=g)
        before = p.detach().clone()
        p.grad = grad.clone()
        Muon([p], lr=0.1, momentum=0.5, weight_decay=0.2).step()
        nesterov = grad + 0.5 * grad  # buf = g at the first step; the update orthogonalises g + mu * buf
        ortho = orthogonalize(nesterov.T[None])[0].T if rows > cols else orthogonalize(nesterov[None])[0]
        expected = before * (1 - 0.1 * 0.2) - 0.1 * scale * ortho  # decoupled decay scaled by lr
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-4)


def test_muon_second_step_uses_nesterov_momentum_of_the_decayed_buffer():
    """buf = mu * buf + g; the update orthogonalises g + mu * buf (Nesterov): the buffer's decay by mu matters."""
    from fungpt.muon import Muon, orthogonalize

    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 16, generator=g))
    g1, g2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    opt = Muon([p], lr=0.1, momentum=0.5)
    p.grad = g1.clone()
    opt.step()
    before = p.detach().clone()
    p.grad = g2.clone()
    opt.step()
    buf = 0.5 * g1 + g2
    torch.testing.assert_close(p.detach() - before, -0.1 * orthogonalize((g2 + 0.5 * buf)[None])[0],
                               atol=1e-5, rtol=1e-4)
