"""Checks that need a CUDA GPU: skipped where there is none (CI runs on CPUs).

Where a GPU is at hand (BENCHMARKS.md's GPU sessions run them first):

    python -m pytest tests/test_gpu.py -p no:cacheprovider

They train tiny models on the GPU through the same code paths a real GPU run takes: bfloat16 autocast,
float16 with loss scaling, Muon, torch.compile (also under a time budget), exact resume with the GPU's
random stream, cached decoding, and a GPU-trained run used on a CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fungpt import checkpoint as ckpt
from fungpt.config import DataConfig, RunConfig, TrainConfig
from fungpt.model import GPT, GPTConfig
from fungpt.runs import load_run
from fungpt.sample import evaluate_run
from fungpt.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_config(corpus: Path, out_dir: Path, model_kw: dict | None = None, **train_kw) -> RunConfig:
    kw = dict(batch_size=8, max_iters=30, lr=3e-3, min_lr=3e-4, warmup_iters=0, eval_interval=1000, eval_iters=2,
              checkpoint_interval=1000, log_interval=1, device="cuda")
    kw.update(train_kw)
    return RunConfig(out_dir=str(out_dir), data=DataConfig(path=str(corpus)),
                     model=GPTConfig(vocab_size=1, block_size=32, n_layer=2, n_head=2, n_embd=64, **(model_kw or {})),
                     train=TrainConfig(**kw))


def rows(out: Path) -> list[dict]:
    return [json.loads(r) for r in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def step_losses(out: Path) -> list[float]:
    return [r["train_loss"] for r in rows(out) if "lr" in r]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_cuda_run_trains_in_bfloat16_and_its_model_runs_on_a_cpu(corpus, tmp_path, optimizer):
    from fungpt.hardware import cuda_has_bf16

    if not cuda_has_bf16():
        pytest.skip("this GPU has no bfloat16")
    out = tmp_path / "run"
    result = train(cuda_config(corpus, out, optimizer=optimizer), progress=False)
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert (info["device"], info["dtype"]) == ("cuda", "bfloat16")
    losses = step_losses(out)
    assert result["step"] == 30 and losses[-1] < 0.7 * losses[0]  # it learned
    assert not torch.backends.cuda.matmul.allow_tf32  # the run's TF32 setting was the run's alone (given back)
    gpu, cpu = load_run(out, device="cuda"), load_run(out, device="cpu")
    assert gpu.device == "cuda" and cpu.device == "cpu"
    idx = torch.randint(0, cpu.config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_gpu, _ = gpu.model(idx.cuda())
        on_cpu, _ = cpu.model(idx)
    assert torch.allclose(on_gpu.float().cpu(), on_cpu, atol=1e-3, rtol=1e-3)  # the same weights, float32 on both


def test_float16_trains_with_loss_scaling(corpus, tmp_path):
    out = tmp_path / "fp16"
    train(cuda_config(corpus, out, dtype="float16"), progress=False)
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["dtype"] == "float16"
    state = ckpt.load_state(ckpt.find_checkpoint(out))
    assert state["scaler"]["scale"] > 0  # the GradScaler's state is saved for a resume
    losses = step_losses(out)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize(("optimizer", "dropout"), [("adamw", 0.1), ("muon", 0.1)])
def test_resume_on_cuda_continues_the_same_run(corpus, tmp_path, optimizer, dropout):
    """Stopped at step 6 and resumed, a run matches one that never stopped: the GPU's random stream (dropout)
    is restored too. Allowed to differ by float rounding, in case a GPU kernel adds in another order."""
    def config(out, max_iters):
        return cuda_config(corpus, out, {"dropout": dropout}, max_iters=max_iters, lr_decay_iters=12,
                           optimizer=optimizer)

    full, part = tmp_path / "full", tmp_path / "part"
    train(config(full, 12), progress=False)
    train(config(part, 6), progress=False)
    assert train(config(part, 12), resume=True, progress=False)["step"] == 12
    assert step_losses(part) == pytest.approx(step_losses(full), rel=1e-4)
    a = load_run(full, device="cpu").model.state_dict()
    b = load_run(part, device="cpu").model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_compile_on_cuda_trains_and_saves_the_plain_model(corpus, tmp_path):
    out = tmp_path / "compiled"
    result = train(cuda_config(corpus, out, max_iters=10, compile=True), progress=False)
    assert result["step"] == 10 and all(math.isfinite(v) for v in step_losses(out))
    from safetensors import safe_open

    with safe_open(ckpt.find_checkpoint(out) / "model.safetensors", "pt") as f:
        assert not any("_orig_mod" in k for k in f.keys())  # the uncompiled module's names
    load_run(out, device="cuda")  # and it loads into a plain GPT


def test_a_compiled_time_budget_run_trains_on_after_its_compile(corpus, tmp_path):
    """On an H200 a compiled 60 s run stopped after its first (compiling) step; it now trains until the budget."""
    out = tmp_path / "budget"
    budget_s = 45.0  # (compiling took 17-27 s on an H200)
    result = train(cuda_config(corpus, out, max_iters=10**6, compile=True, max_minutes=budget_s / 60,
                               log_interval=10, checkpoint_interval=10**6, eval_interval=10**6), progress=False)
    assert result["step"] > 100 and result["elapsed_s"] <= budget_s + 3.0
    lrs = [r["lr"] for r in rows(out) if "lr" in r]
    assert max(lrs) > 0.9 * 3e-3 and lrs[-1] < 0.2 * 3e-3  # the schedule ran its course after the compile


def test_the_measured_bfloat16_ceiling_is_a_gpus_not_its_launch_speed():
    from fungpt.hardware import cuda_has_bf16
    from fungpt.train import measure_peak_flops

    if not cuda_has_bf16():
        pytest.skip("this GPU has no native bfloat16")

    peak = measure_peak_flops("cuda:0", torch.bfloat16)  # as training calls it
    assert 1e12 < peak < 3e15  # dense bfloat16: about 0.8 PFLOP/s on an H100 or H200


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_cached_equals_uncached_greedy_on_cuda(pos_encoding):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32,
                          pos_encoding=pos_encoding)).cuda().eval()
    prompt = torch.randint(0, 50, (2, 5), device="cuda")
    fast = model.generate(prompt, 40, temperature=0, use_cache=True)
    slow = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert fast.device.type == "cuda" and torch.equal(fast, slow)


def test_sampling_refuses_nan_probabilities_on_cuda_too():
    from fungpt.errors import FunGPTError
    from fungpt.sampling import draw

    with pytest.raises(FunGPTError, match="NaN or all zero"):  # (torch.multinomial's own error: a RuntimeError)
        draw(torch.tensor([[0.5, float("nan")]], device="cuda"))
    assert draw(torch.tensor([[0.0, 1.0]], device="cuda")).item() == 1


def test_eval_on_cuda_matches_eval_on_a_cpu(corpus, tmp_path):
    out = tmp_path / "run"
    train(cuda_config(corpus, out), progress=False)
    on_gpu, on_cpu = evaluate_run(out, device="cuda"), evaluate_run(out, device="cpu")
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-3)


def test_a_cuda_checkpoint_resumes_on_a_cpu(corpus, tmp_path):
    """A run started on a GPU and continued on a CPU (its GPU random stream is not needed there)."""
    out = tmp_path / "moved"
    train(cuda_config(corpus, out, max_iters=6), progress=False)
    assert train(cuda_config(corpus, out, max_iters=10, device="cpu"), resume=True, progress=False)["step"] == 10
