"""Device and precision choice, float16 loss scaling on the CPU, compile refusal, the dry-run plan,
out-of-memory advice and the wall-clock budget (`max_minutes`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

from fungpt import checkpoint as ckpt
from fungpt import plan
from fungpt.cli import main
from fungpt.config import DataConfig, RunConfig, TrainConfig
from fungpt.errors import FunGPTError
from fungpt.hardware import Precision, check_compile, choose_precision
from fungpt.inspection import estimate_memory
from fungpt.model import GPT, GPTConfig
from fungpt.rundir import LOCK_FILE
from fungpt.runs import load_run
from fungpt.train import train

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the choice table

@pytest.mark.parametrize(("device", "dtype", "cuda", "mps", "bf16", "want"), [
    ("auto", "auto", True, False, True, ("cuda", "bfloat16")),
    ("auto", "auto", True, False, False, ("cuda", "float16")),  # e.g. T4, V100: float16 + GradScaler
    ("auto", "auto", True, True, True, ("cuda", "bfloat16")),  # CUDA before MPS
    ("auto", "auto", False, True, False, ("mps", "float32")),
    ("auto", "auto", False, False, False, ("cpu", "float32")),
    ("cpu", "auto", True, False, True, ("cpu", "float32")),
    ("cpu", "float16", False, False, False, ("cpu", "float16")),  # allowed: it is how the CPU tests run it
    ("cuda", "float32", True, False, True, ("cuda", "float32")),
    ("mps", "auto", False, True, False, ("mps", "float32")),
    ("cuda", "bfloat16", True, False, False, ("cuda", "bfloat16")),  # asked for on a T4: emulated, with a note
    ("cpu", "bfloat16", False, False, False, ("cpu", "bfloat16")),  # no GPU to speak of
])
def test_choice_table(device, dtype, cuda, mps, bf16, want):
    p = choose_precision(device, dtype, cuda=cuda, mps=mps, cuda_bf16=bf16)
    assert (p.device, p.dtype) == want
    assert ("emulates" in p.reason) == (want == ("cuda", "bfloat16") and not bf16), p.reason
    assert p.needs_grad_scaler == (p.dtype == "float16")
    assert p.reason.startswith(f"device {p.device}")  # the one line printed and saved in run.json


def test_bfloat16_on_a_cpu_is_bfloat16_products_and_says_so_where_the_cpu_lacks_the_instructions():
    """On a CPU bfloat16 is no autocast: the Linear layers' products run in bfloat16 (linear.bfloat16_products)."""
    for cpu_bf16, slow in ((True, False), (None, False), (False, True)):
        p = choose_precision("cpu", "bfloat16", cuda=False, mps=False, cuda_bf16=False, cpu_bf16=cpu_bf16)
        assert p.cpu_bf16_products and not p.autocast
        assert "bfloat16 products in the Linear layers, the rest float32" in p.reason
        assert ("no bfloat16 instructions: slower than float32 here" in p.reason) == slow, p.reason
    from fungpt import linear

    with choose_precision("cpu", "bfloat16", cuda=False, mps=False, cuda_bf16=False).context():
        assert linear.bfloat16_products_active() and not torch.is_autocast_enabled("cpu")
        with linear.bfloat16_products():  # nested (a dry run inside a program's own block)
            assert linear.bfloat16_products_active()
        assert linear.bfloat16_products_active()  # the outer block's, given back
    assert not linear.bfloat16_products_active()  # left on the way out
    f16 = choose_precision("cpu", "float16", cuda=False, mps=False, cuda_bf16=False)
    assert f16.autocast and not f16.cpu_bf16_products
    # (said: it was "float16 (as configured)", the slowest choice on a CPU without a word)
    assert "float16 autocast with loss scaling (as configured; on a CPU it is slower than float32" in f16.reason
    with f16.context():
        assert torch.is_autocast_enabled("cpu") and not linear.bfloat16_products_active()
    gpu = choose_precision("cuda", "bfloat16", cuda=True, mps=False, cuda_bf16=True)
    assert gpu.autocast and not gpu.cpu_bf16_products


def test_auto_on_a_cpu_is_float32_and_names_bfloat16_products_where_the_cpu_has_the_instructions():
    reasons = {has: choose_precision("cpu", "auto", cuda=False, mps=False, cuda_bf16=False, cpu_bf16=has).reason
               for has in (True, False, None)}
    assert "train.dtype = 'bfloat16' runs the Linear layers' products faster" in reasons[True]
    assert "slow on CPUs without bfloat16 instructions" in reasons[False]
    assert reasons[None].endswith("float32 (the default on CPUs)")  # unknown (off Linux): no claim either way


def test_a_cpu_has_bfloat16_instructions_by_its_flags(monkeypatch):
    from fungpt import hardware

    for flags, want in (("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True), ("fpu avx2", False),
                        ("", None)):
        monkeypatch.setattr(hardware, "cpu_info", lambda field, flags=flags: flags if field == "flags" else "")
        assert hardware.cpu_has_bf16() is want


@pytest.mark.parametrize(("device", "dtype", "cuda", "mps", "bf16", "message"), [
    ("cuda", "auto", False, False, False, "no CUDA GPU"),
    ("mps", "auto", False, False, False, "MPS backend is not available"),
])
def test_asking_for_what_the_machine_lacks_is_an_error(device, dtype, cuda, mps, bf16, message):
    with pytest.raises(FunGPTError, match=message):
        choose_precision(device, dtype, cuda=cuda, mps=mps, cuda_bf16=bf16)


def test_half_precision_on_an_apple_gpu_needs_the_torch_that_runs_it(monkeypatch):
    """torch 2.4 raised a raw "unsupported autocast device_type 'mps'"; 2.5 turned bfloat16 off with a warning (the
    run still said bfloat16); float16's GradScaler failed on MPS before 2.8."""
    from torch.torch_version import TorchVersion

    from fungpt.hardware import detect_precision

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # (an Apple GPU, as far as FunGPT asks)
    for version, dtype, ok in (("2.4.1", "float16", False), ("2.7.1", "float16", False), ("2.8.0", "float16", True),
                               ("2.5.1", "bfloat16", False), ("2.6.0", "bfloat16", True), ("2.4.1", "float32", True)):
        monkeypatch.setattr(torch, "__version__", TorchVersion(version))
        if ok:
            assert detect_precision("mps", dtype).dtype == dtype
        else:
            with pytest.raises(FunGPTError, match=rf"train.dtype = '{dtype}' on an Apple GPU needs torch 2.[68] or "
                                                  rf"newer, this is {version}: pip install -U torch, or use"):
                detect_precision("mps", dtype)
        # (the CPU is not concerned; nor is a Mac's config estimated elsewhere: choose_precision, what inspect uses)
        assert detect_precision("cpu", dtype).dtype == dtype
        assert choose_precision("mps", dtype, cuda=False, mps=True, cuda_bf16=False).dtype == dtype


def test_muon_on_a_gpu_without_native_bfloat16_trains_in_float32():
    """Muon cannot work with float16 loss scaling: "auto" chose float16 on a T4 and the run was refused, whose
    advice (bfloat16) was refused in turn. Now "auto" takes float32 there, and bfloat16 asked for is allowed."""
    p = choose_precision("auto", "auto", cuda=True, mps=False, cuda_bf16=False, optimizer="muon")
    assert (p.dtype, p.needs_grad_scaler) == ("float32", False) and "Muon" in p.reason
    assert choose_precision("auto", "auto", cuda=True, mps=False, cuda_bf16=True, optimizer="muon").dtype == "bfloat16"
    asked = choose_precision("cuda", "bfloat16", cuda=True, mps=False, cuda_bf16=False, optimizer="muon")
    assert asked.dtype == "bfloat16" and "emulates" in asked.reason
    assert "float32 is faster" in asked.reason and "float16 is native" not in asked.reason  # (which Muon refuses)
    for device in ("cuda", "cpu"):  # float16 asked for: refused here, for training, --dry-run and inspect alike
        with pytest.raises(FunGPTError, match="'muon' does not support float16 loss scaling"):
            choose_precision(device, "float16", cuda=True, mps=False, cuda_bf16=False, optimizer="muon")


def test_a_gpu_that_only_emulates_bfloat16_trains_in_float16(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on a T4 or V100 too (bfloat16 emulated, slowly): "auto" took
    bfloat16 there, never the float16 with loss scaling that those GPUs run natively."""
    from fungpt.hardware import detect_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    p = detect_precision("auto", "auto")
    assert (p.device, p.dtype) == ("cuda", "float16") and p.needs_grad_scaler


def test_tf32_products_are_turned_on_inside_and_given_back():
    """train() and a dry run's timed steps run CUDA float32 products in TF32 and give the program its own
    setting back, whichever of torch's two settings (allow_tf32, or 2.9's fp32_precision) the program used:
    torch refuses to read the old one once the new one is set."""
    from fungpt.hardware import tf32_products

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch before 2.9: allow_tf32 alone")
    try:
        for program_set in ("ieee", "none"):  # a program that used the new setting; one that set none
            matmul.fp32_precision = program_set
            with tf32_products():
                assert matmul.fp32_precision == "tf32"
            assert matmul.fp32_precision == program_set
        matmul.allow_tf32 = False  # one that used the old setting (it reads back through the new one)
        with tf32_products():
            assert matmul.fp32_precision == "tf32"
        assert matmul.allow_tf32 is False
    finally:
        matmul.fp32_precision = "none"


def test_compile_is_refused_where_it_cannot_work():
    with pytest.raises(FunGPTError, match="Windows"):
        check_compile("cpu", platform="win32", cxx="cl")
    with pytest.raises(FunGPTError, match="needs the triton package"):
        check_compile("cuda", platform="linux", has_triton=False)
    with pytest.raises(FunGPTError, match="MPS"):
        check_compile("mps", platform="darwin")
    with pytest.raises(FunGPTError, match="C\\+\\+ compiler"):
        check_compile("cpu", platform="linux", cxx=None)
    with pytest.raises(FunGPTError, match=r"needs compute capability 7.0 or newer \(Triton's floor\), and this GPU's "
                                          r"is 6.0; set train.compile = false"):
        check_compile("cuda", platform="linux", has_triton=True, capability=(6, 0))  # (a P100: inductor raised)
    with pytest.raises(FunGPTError, match=r"needs compute capability 7.0 .* this GPU's is 6.1"):  # (not "pip install
        check_compile("cuda", platform="linux", has_triton=False, capability=(6, 1))              # triton": no help)
    check_compile("cuda", platform="linux", has_triton=True, capability=(8, 0))
    check_compile("cuda", platform="linux", has_triton=True)  # these work: no error
    check_compile("cpu", platform="linux", cxx="g++")


def test_compile_asks_torch_which_compiler_and_its_failure_is_one_line(corpus, tmp_path, monkeypatch):
    """torch.compile uses $CXX when it is set: a stale CXX passed the check (g++ was on PATH) and the run failed at
    its first step with a 100-line traceback; a compiler failing there (no Python headers) did the same."""
    # (a folder: torch's search let its PermissionError through; an empty $CXX, which torch runs as it is, was taken
    # for an unset one: "install g++", where g++ was there)
    for cxx in (tmp_path / "no-such-g++", tmp_path, ""):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CXX": str(cxx)}
        proc = subprocess.run([sys.executable, "-c", "from fungpt.hardware import check_compile; check_compile('cpu')"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "$CXX = " + env["CXX"] + ", which does not run: point CXX at a working " \
            "compiler (or unset it), or set train.compile = false" in proc.stderr.splitlines()[-1], proc.stderr

    class CppCompileError(RuntimeError):  # as torch's own: raised from its inductor
        __module__ = "torch._inductor.exc"

    class TorchRuntimeError(RuntimeError):  # dynamo's report of an error in the model's own code: left as it is
        __module__ = "torch._dynamo.exc"

    from fungpt.hardware import compile_failure

    assert compile_failure(TorchRuntimeError("shape '[3, -1]' is invalid for input of size 16")) is None
    # BackendCompilerFailed's first line is "backend='inductor' raised:": the cause is the error it wraps
    import torch._dynamo.exc as dynamo_exc

    wrapped = dynamo_exc.BackendCompilerFailed(lambda: None, RuntimeError("Found Tesla P100 which is too old"), None)
    assert compile_failure(wrapped).startswith("torch.compile failed (RuntimeError: Found Tesla P100 which is too "
                                               "old); set train.compile = false"), compile_failure(wrapped)

    class GPUTooOldForTriton(RuntimeError):  # as torch's own (a GPU below capability 7.0 at the first step)
        __module__ = "torch._inductor.exc"

    assert compile_failure(GPUTooOldForTriton("Found Tesla P100 which is too old")) == (
        "torch.compile failed (Found Tesla P100 which is too old); set train.compile = false (training works the "
        "same, uncompiled)")
    assert compile_failure(RuntimeError("C++ compile error")) is None  # (not torch's)

    class Failing(torch.nn.Module):
        def forward(self, *args):
            raise CppCompileError("C++ compile error\n\nfatal error: Python.h: No such file or directory")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Failing())
    monkeypatch.setattr(sys.modules["fungpt.train"], "check_compile", lambda device: None)
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=2)
    cfg.train = dataclasses.replace(cfg.train, compile=True)
    with pytest.raises(FunGPTError, match=r"^torch\.compile failed \(C\+\+ compile error\); set train\.compile = "
                                          r"false \(training works the same, uncompiled\), or mend the compiler$"):
        train(cfg, progress=False)


def test_a_cpu_matmul_chosen_for_a_16_bit_run_is_said_to_be_unused(corpus, tmp_path, capsys):
    """Under autocast (float16 on a CPU) the products are torch's own: train.cpu_matmul = "onednn" was dropped
    without a word (the config kept it, run.json said null). bfloat16 on a CPU uses it (bfloat16 products)."""
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=1)
    cfg.train = dataclasses.replace(cfg.train, dtype="float16", cpu_matmul="onednn")
    train(cfg, progress=False)
    assert ("fungpt: note: train.cpu_matmul = 'onednn' is not used under float16 autocast: its products are "
            "torch's own") in capsys.readouterr().out
    cfg.train = dataclasses.replace(cfg.train, dtype="bfloat16")
    train(cfg, overwrite=True, progress=False)
    assert "is not used" not in capsys.readouterr().out
    cfg.train = dataclasses.replace(cfg.train, dtype="float32")
    train(cfg, overwrite=True, progress=False)
    assert "is not used" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- float16 + GradScaler on CPU

def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32))


def test_grad_scaler_skips_an_overflowing_step_and_lowers_the_scale():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # A scale so large that float16 gradients overflow; backing off 256x per skipped step.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-8)
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.float16):
            _, loss = model(x, x)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # skipped: weights unchanged
    assert scaler.get_scale() < 2.0**40  # and the scale backed off
    for _ in range(6):  # the scale keeps backing off until the gradients fit, then steps happen
        step()
        if any(not torch.equal(a, p) for a, p in zip(before, model.parameters())):
            break
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def tiny_config(corpus: Path, out_dir: Path, **train_kw) -> RunConfig:
    kw = dict(batch_size=4, max_iters=8, lr=3e-3, min_lr=3e-4, warmup_iters=0, eval_interval=1000, eval_iters=2,
              checkpoint_interval=1000, log_interval=1, device="cpu")
    kw.update(train_kw)
    return RunConfig(out_dir=str(out_dir), data=DataConfig(path=str(corpus)),
                     model=GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=32),
                     train=TrainConfig(**kw))


def test_a_dry_run_times_a_step_of_many_micro_batches_on_a_few_of_them(corpus, tmp_path, monkeypatch, capsys):
    """grad_accum_steps = 2**24 (allowed) made "a few timed steps" take days: the first TIMED_MICRO_BATCHES of a
    step are timed, and the step's time scaled up from them."""
    from fungpt.data import BatchLoader

    drawn = []
    real = BatchLoader.next_batch
    clock = [0.0]  # the timing's clock: each micro-batch takes 1 ms of it, the rest of a step none (no timed test)

    def next_batch(self):
        drawn.append(1)
        clock[0] += 1e-3
        return real(self)

    monkeypatch.setattr(BatchLoader, "next_batch", next_batch)
    monkeypatch.setattr(plan, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], time=time.time))
    monkeypatch.setattr(plan, "TIMED_MICRO_BATCHES", 2)
    figures = plan.dry_run(tiny_config(corpus, tmp_path / "run", grad_accum_steps=1000), timed_steps=1)
    assert 0 < len(drawn) <= 2 * 21  # at most 21 steps (a second's worth, 20, and the warm-up) of 2 micro-batches
    assert figures["step_s"] == pytest.approx(1.0)  # a step of 1,000 micro-batches, scaled up from 2 of them
    assert plan.dry_run(tiny_config(corpus, tmp_path / "run", grad_accum_steps=1), timed_steps=1)["step_s"] == (
        pytest.approx(1e-3))


def test_a_dry_run_of_slow_micro_batches_times_two_a_step_after_a_warm_up_of_one(corpus, tmp_path, monkeypatch):
    """The fine-tune preset's dry run on a CPU (20 s a micro-batch) timed a warm-up and 3 steps of 16 micro-batches
    each: 11 minutes to predict a run of 20 steps. One micro-batch warms up; slow ones are timed 2 a step."""
    from fungpt.data import BatchLoader

    drawn = []
    real = BatchLoader.next_batch
    monkeypatch.setattr(BatchLoader, "next_batch", lambda self: drawn.append(1) or real(self))
    monkeypatch.setattr(plan, "SLOW_MICRO_BATCH_S", 0.0)  # (every micro-batch counts as slow)
    plan.dry_run(tiny_config(corpus, tmp_path / "run", grad_accum_steps=8), timed_steps=3)
    steps = len(drawn) - 1  # after the warm-up's one
    assert steps >= 6 and steps % 2 == 0, len(drawn)  # 2 micro-batches a timed step, not 8
    drawn.clear()
    monkeypatch.setattr(plan, "SLOW_MICRO_BATCH_S", 1e9)  # (fast ones: the step's 8, as before)
    plan.dry_run(tiny_config(corpus, tmp_path / "run", grad_accum_steps=8), timed_steps=3)
    assert len(drawn) >= 1 + 3 * 8 and (len(drawn) - 1) % 8 == 0, len(drawn)


def test_divergence_advice_names_the_settings_that_make_the_steps(corpus, tmp_path):
    """It said "Lower train.lr" to a Muon run whose muon_lr was 1e30, and to a weight decay of 1e6."""
    from fungpt.train import lower_lr

    assert lower_lr(TrainConfig()) == "Lower train.lr"
    assert lower_lr(TrainConfig(optimizer="muon")) == "Lower train.muon_lr (the matrices' lr) or train.lr"
    assert lower_lr(TrainConfig(weight_decay=1e6)) == ("Lower train.lr, or train.weight_decay = 1e+06 (lr x "
                                                       "weight_decay = 1e+03: a step takes that share off every "
                                                       "weight)")
    assert lower_lr(TrainConfig(lr=2.0)) == "Lower train.lr"  # (the usual decay: a huge lr is the cause alone)


def test_a_float16_run_whose_loss_overflows_is_stopped_as_diverged(corpus, tmp_path):
    """Loss scaling handles overflowing gradients, not a forward pass that overflows: with lr 300 every step
    after the first was skipped and the run "finished" with a loss of nan, where float32 stopped with an error."""
    with pytest.raises(FunGPTError, match=r"training diverged at step \d+: the loss or gradient is NaN/inf"
                                          r".*; no checkpoint to resume from was written"):  # (no latest: a best)
        train(tiny_config(corpus, tmp_path / "fp16", dtype="float16", lr=300.0, max_iters=12), progress=False)
    # and with skip_nonfinite the steps are skipped, the scaler kept in step (it failed: unscale_ called twice)
    result = train(tiny_config(corpus, tmp_path / "skip", dtype="float16", lr=300.0, max_iters=12,
                               skip_nonfinite=True), progress=False)
    assert result["step"] == 12


def test_training_in_float16_on_cpu_survives_overflow_without_the_nan_guard(corpus, tmp_path, monkeypatch):
    class HugeScale(torch.amp.GradScaler):
        def __init__(self, device, enabled=True):
            super().__init__(device, init_scale=2.0**40, enabled=enabled)

    monkeypatch.setattr(torch.amp, "GradScaler", HugeScale)
    out = tmp_path / "fp16"
    result = train(tiny_config(corpus, out, dtype="float16", max_iters=30), progress=False)
    assert result["step"] == 30  # the NaN guard did not stop it: the scaler skipped the inf steps
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert (info["device"], info["dtype"]) == ("cpu", "float16") and "float16" in info["precision_reason"]
    state = ckpt.load_state(ckpt.find_checkpoint(out))
    assert state["scaler"]["scale"] < 2.0**40  # it backed off
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [r["train_loss"] for r in rows if "lr" in r]
    assert losses[-1] < losses[0]  # and trained once the scale fitted


# ----------------------------------------------------------------------------- dry run and memory

def test_the_dry_run_of_a_resume_counts_its_checkpoint_saves(corpus, tmp_path, capsys):
    """Saves come at multiples of checkpoint_interval, not every interval from the resumed step: from step 6 to 13
    with interval 4 they are at 8, 12 and 13, where it counted ceil(7 / 4) = 2."""
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=6, checkpoint_interval=4)
    train(cfg, progress=False)
    capsys.readouterr()
    plan.dry_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=13)), resume=True,
                 timed_steps=1)
    assert "not timed here: 3 checkpoint save(s)" in capsys.readouterr().out


def test_dry_run_counts_what_a_real_run_builds_and_writes_nothing(corpus, tmp_path, capsys):
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=2)
    figures = plan.dry_run(cfg, timed_steps=1)
    printed = capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # no run folder
    assert "parameters" in printed and "FLOPs" in printed and "ms per step" in printed
    train(cfg, progress=False)
    real = load_run(tmp_path / "run", device="cpu").model
    assert figures["num_params"] == real.num_params()
    # a tiny model's sizes in KiB (not "0.0 MiB"): its float32 weights, 4 bytes a parameter
    assert f"best weights ({4 * real.num_params() / 1024:.1f} KiB)" in printed
    assert figures["tokens_per_step"] == 4 * 16
    assert figures["flops_per_step"] == real.flops_per_token() * 4 * 16
    assert figures["step_s"] > 0  # timed and figures["projected_s"] > 0
    # the command's start-up and its checkpoint saves (not timed: a run that saves every few steps takes far longer)
    assert re.search(r"\n  whole command  ~ [\d.]+ s with its start-up \(\d+ s here\); not timed here: 1 checkpoint "
                     r"save\(s\) of [\d.]+ KiB each, and up to 2 save\(s\) of the best weights \(([\d.]+) KiB\), one "
                     r"after each eval that improves on the val loss\n", printed), printed
    # evals at steps 0 and 2 (max_iters 2 ends on no eval_interval multiple: the final one is its own)
    assert figures["eval_s"] == pytest.approx(2 * 2 * 2 * figures["step_s"] / 3)  # 2 evals x 2 splits x 2 batches
    # the whole val split scored at each eval (eval_full_val) is counted, not eval_iters batches of it
    full = plan.dry_run(dataclasses.replace(cfg, out_dir=str(tmp_path / "new"),  # (run: refused without --resume)
                                            train=dataclasses.replace(cfg.train, eval_full_val=True)), timed_steps=1)
    from fungpt.data import load_meta
    from fungpt.rundata import resolve_data

    val_windows = math.ceil((load_meta(resolve_data(cfg.data, is_main=False, progress=False))["val_tokens"] - 1) / 16)
    assert full["eval_s"] == pytest.approx(2 * (2 + val_windows / 4) * full["step_s"] / 3)


def test_dry_run_shows_its_slow_timed_steps_and_the_data_it_prepares(corpus, tmp_path, monkeypatch, capsys):
    """The dry run of a GPT-2 fine-tune on a CPU timed its steps for 5 minutes, and prepared a 44 MB corpus for 38 s,
    with nothing on the screen. Bars now show both (on stderr: the plan is stdout's); quick steps show none."""
    from fungpt.data import BatchLoader

    cfg = tiny_config(corpus, tmp_path / "run", max_iters=2)
    plan.dry_run(cfg, timed_steps=1)
    out, err = capsys.readouterr()
    assert "checking" in err and "encoding" in err and "timing" not in err and "checking" not in out
    real_next = BatchLoader.next_batch

    def slow_next(self):
        time.sleep(0.8)  # (the warm-up and two steps: 2.4 s, past the bar's 2 s delay)
        return real_next(self)

    monkeypatch.setattr(BatchLoader, "next_batch", slow_next)
    monkeypatch.setattr(sys.modules["fungpt.data"], "bar_interval", lambda: 0.0)  # (each batch drawn)
    plan.dry_run(cfg, timed_steps=2)
    out, err = capsys.readouterr()
    # (the warm-up and two steps of about 0.8 s: past a second, so no third is timed; the total may say 3 or 4)
    assert re.search(r"timing steps \(\+1 warm-up\): .*\d/[34] ", err), err
    assert "checking" not in err and "ms per step" in out  # (the data was prepared by the first dry run)


def test_dry_run_times_steps_on_the_matmul_library_the_run_asks_for(corpus, tmp_path, monkeypatch, capsys):
    """The timed steps ran on whatever library the process had chosen, whatever train.cpu_matmul said."""
    from fungpt import linear
    from fungpt.train import configure_optimizer

    used = []

    def recording(model, tc, device):
        used.append(linear.cpu_matmul())
        return configure_optimizer(model, tc, device)

    monkeypatch.setattr(sys.modules["fungpt.train"], "configure_optimizer", recording)
    before = linear.cpu_matmul()
    for library in ("torch", "onednn"):
        if library == "onednn" and not linear.onednn_works():
            continue
        plan.dry_run(tiny_config(corpus, tmp_path / "run", cpu_matmul=library), timed_steps=1)
        assert used[-1] == library
        assert linear.cpu_matmul() == before  # (the process's own choice is given back)
    assert "timed without train.compile" not in capsys.readouterr().out
    plan.dry_run(tiny_config(corpus, tmp_path / "run", compile=True), timed_steps=1)
    assert "; timed without train.compile, which first compiles" in capsys.readouterr().out


def test_a_bfloat16_cpu_dry_run_times_bfloat16_products_and_labels_their_activations(corpus, tmp_path, capsys,
                                                                                     monkeypatch):
    from fungpt import linear

    inside = []
    real_forward = linear.Linear.forward
    monkeypatch.setattr(linear.Linear, "forward", lambda self, x: inside.append(
        linear.bfloat16_products_active()) or real_forward(self, x))
    plan.dry_run(tiny_config(corpus, tmp_path / "run", dtype="bfloat16"), timed_steps=1)
    out = capsys.readouterr().out
    assert "bfloat16 products in the Linear layers, the rest float32" in out
    acts = r"activations [\d.]+ [KM]iB \(bfloat16 Linear inputs, the rest float32\)"
    assert re.search(r"16-bit weight copies [\d.]+ [KM]iB, " + acts, out), out
    assert inside and all(inside)  # the timed steps ran them


def test_dry_run_from_the_cli(corpus, tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text(f'out_dir = "{(tmp_path / "r").as_posix()}"\n[data]\npath = "{corpus.as_posix()}"\n'
                    '[model]\nn_layer = 1\nn_embd = 32\nn_head = 2\nblock_size = 16\n'
                    '[train]\ndevice = "cpu"\nmax_iters = 50\nbatch_size = 2\n', encoding="utf-8")
    assert main(["train", "--config", str(toml), "--dry-run"]) == 0
    said = capsys.readouterr()
    assert "projected" not in said.err
    assert not (tmp_path / "r").exists()
    # the lr schedule's notes, as training says them (a warmup of 100 steps in a run of 50: lr never reached)
    assert "fungpt: note: train.warmup_iters = 100 is not below the run's 50 steps" in said.out


def test_dry_run_and_training_refuse_alike_and_before_writing_anything(corpus, tmp_path, capsys, monkeypatch):
    """--dry-run said "dry run done" for Muon with float16 and for compile without a C++ compiler, which training
    then refused; and training's compile refusal came after run.json was rewritten (so the next resume compared
    with settings that never trained)."""
    base = ["train", "--data.path", str(corpus), "--out-dir", str(tmp_path / "r"), "--train.device", "cpu",
            "--model.n-layer", "1", "--model.n-embd", "32", "--model.n-head", "2", "--model.block-size", "16",
            "--train.batch-size", "2", "--train.max-iters", "4"]
    for flags, message in ((["--train.optimizer", "muon", "--train.dtype", "float16"], "does not support float16"),
                           (["--train.compile"], "needs a C\\+\\+ compiler")):
        # a machine without a C++ compiler (as torch finds one: it caches its answer, so shutil.which is not asked)
        monkeypatch.setattr(sys.modules["fungpt.hardware"], "_torch_cpp_compiler", lambda fix: None)
        for dry in (["--dry-run"], []):
            assert main(base + flags + dry) != 0
            err = capsys.readouterr().err
            assert re.search(message, err.strip().splitlines()[-1]), err
        monkeypatch.undo()
        assert not (tmp_path / "r").exists()


def test_dry_run_of_a_resume_plans_the_steps_left_and_refuses_what_the_resume_would(corpus, tmp_path, capsys):
    """--dry-run --resume planned a new run from step 0: it counted every step, accepted another model (which the
    resume refuses) and "planned" the resume of a folder holding no run."""
    base = ["train", "--data.path", str(corpus), "--train.device", "cpu", "--model.n-layer", "1", "--model.n-embd",
            "32", "--model.n-head", "2", "--model.block-size", "16", "--train.batch-size", "2",
            "--train.eval-interval", "4", "--train.eval-iters", "1"]
    run = ["--out-dir", str(tmp_path / "r")]
    assert main(base + run + ["--train.max-iters", "8"]) == 0
    capsys.readouterr()
    assert main(base + run + ["--train.max-iters", "10", "--resume", "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert f"from resuming {tmp_path / 'r'} at step 8)" in said
    assert re.search(r": 2 steps \(from step 8 to max_iters = 10\) \+ evals", said), said
    other = tmp_path / "other.txt"  # as many characters, other ids: "tokens mean other text"
    assert "z" not in corpus.read_text()
    other.write_text(corpus.read_text().replace("a", "z"))
    refusals = [(run + ["--dry-run"], "already holds a training run: .* \\(with --dry-run, --overwrite deletes "
                                      "nothing\\)"),  # neither --resume nor --overwrite
                (run + ["--resume", "--dry-run", "--data.path", str(other)], "cannot resume .*: the data is "
                                                                               "encoded with a tokenizer whose ids"),
                (run + ["--resume", "--dry-run", "--model.n-layer", "2"], "trained with a different model "
                                                                           "\\(n_layer 1 -> 2\\); use the original "
                                                                           "settings \\(--model.n-layer 1\\)"),
                (run + ["--resume", "--dry-run", "--train.optimizer", "muon"], "trained with train.optimizer = "
                                                                                 "'adamw', not 'muon'"),
                (["--out-dir", str(tmp_path / "none"), "--resume", "--dry-run"], "nothing to resume in")]
    from fungpt.data import prepare

    prepare(corpus, tmp_path / "prepared", progress=False)  # a refusal of another kind: the note is not added
    refusals.append((["--out-dir", str(tmp_path / "prepared"), "--dry-run"], "is a prepared dataset .*: choose "
                                                                             "another out_dir, e.g. out/prepared$"))
    for flags, message in refusals:
        assert main(base + flags) != 0
        err = capsys.readouterr().err
        assert re.search(message, err.strip().splitlines()[-1]), err
    assert main(base + run + ["--overwrite", "--dry-run"]) == 0  # planned as a new run, and nothing deleted
    assert ": 2,000 steps + evals" in capsys.readouterr().out and (tmp_path / "r" / "latest.json").is_file()


def test_a_bfloat16_cpu_run_trains_with_bfloat16_products_on_its_matmul_library(corpus, tmp_path, capsys,
                                                                                 monkeypatch):
    """dtype bfloat16 on a CPU: the Linear products in bfloat16 (no autocast) on the run's cpu_matmul, losses within
    bfloat16 rounding of float32's, the MFU quoted against the bfloat16 ceiling."""
    from fungpt import linear

    train_module = sys.modules["fungpt.train"]
    ceilings = []
    real_peak = train_module.measure_peak_flops
    monkeypatch.setattr(train_module, "measure_peak_flops", lambda d, t: ceilings.append(t) or real_peak(d, t))
    inside = []
    real_forward = linear.Linear.forward
    monkeypatch.setattr(linear.Linear, "forward", lambda self, x: inside.append(
        (bool(linear.bfloat16_products_active()), torch.is_autocast_enabled("cpu"))) or real_forward(self, x))
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        train(tiny_config(corpus, out, dtype=dtype, max_iters=4, cpu_matmul="torch"), progress=False)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[dtype] = [r["train_loss"] for r in rows if "lr" in r]
        info = json.loads((out / "run.json").read_text())
        assert (info["dtype"], info["cpu_matmul"]) == (dtype, "torch")
    assert ceilings == [torch.float32, torch.bfloat16]
    assert inside and {(True, False), (False, False)} == set(inside)
    assert "bfloat16 products in the Linear layers" in capsys.readouterr().out
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2) and losses["bfloat16"] != losses["float32"]


def test_a_bfloat16_cpu_run_names_torch_where_onednn_runs_no_bfloat16_products(corpus, tmp_path, monkeypatch):
    """cpu_matmul "onednn" on a CPU where oneDNN refuses bfloat16 (no AVX-512): torch's kernels ran the products,
    but run.json and the first line said onednn."""
    from fungpt import linear

    monkeypatch.setattr(linear, "onednn_bf16_works", lambda: False)
    monkeypatch.setattr(sys.modules["fungpt.train"], "onednn_bf16_works", lambda: False)
    out = tmp_path / "r"
    train(tiny_config(corpus, out, dtype="bfloat16", max_iters=1, cpu_matmul="onednn"), progress=False)
    assert json.loads((out / "run.json").read_text())["cpu_matmul"] == "torch"


def test_an_autocast_run_records_no_matmul_library(corpus, tmp_path, capsys):
    """Under autocast (float16 on a CPU) the products are torch's own, not oneDNN's: "matmuls on onednn" was printed
    and recorded, and a resume with another cpu_matmul then noted a change that changed nothing."""
    from fungpt.train import numerics_notes

    out = tmp_path / "f16"
    train(tiny_config(corpus, out, dtype="float16", max_iters=2), progress=False)
    assert json.loads((out / "run.json").read_text())["cpu_matmul"] is None
    assert "matmuls on" not in capsys.readouterr().out
    assert numerics_notes({"cpu_matmul": "onednn"}, {"cpu_matmul": None}, 5) == [
        "fungpt: note: the arithmetic changed since step 5 (cpu_matmul onednn -> none): from here the losses differ "
        "from an uninterrupted run's in the last digits"]
    # run.json of an older FunGPT recorded no matmul library nor thread count: said, not passed over as the same
    now = {"device": "cpu", "dtype": "float32", "cpu_matmul": "onednn", "threads": 2, "torch": "2.13.0+cpu"}
    old = {"device": "cpu", "dtype": "float32", "torch": "2.13.0+cpu"}
    assert numerics_notes(old, now, 5) == [
        "fungpt: note: run.json does not say which cpu_matmul, threads the steps before 5 ran with (an older FunGPT "
        "wrote it): if the arithmetic changed since, the losses from here differ from an uninterrupted run's"]
    assert numerics_notes(now, dict(now), 5) == []
    # another dtype (or device) rounds otherwise: bfloat16 moved a tiny run's losses in the 4th digit
    assert numerics_notes({"dtype": "float32"}, {"dtype": "bfloat16"}, 5)[0].endswith(
        "(dtype float32 -> bfloat16): from here the losses differ from an uninterrupted run's by its rounding (from "
        "about the 4th digit)")


def test_a_bad_matmul_setting_is_refused_when_a_run_is_loaded(tiny_run):
    """fungpt serve started and said it was serving; then every request failed on FUNGPT_CPU_MATMUL."""
    env = {**os.environ, "FUNGPT_CPU_MATMUL": "bogus", "OMP_NUM_THREADS": "1"}
    code = "from fungpt.runs import load_run; load_run(__import__('sys').argv[1], device='cpu')"
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_run)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "FUNGPT_CPU_MATMUL='bogus' is unknown" in proc.stderr


def test_dry_run_under_torchrun_prints_once_and_counts_every_process(corpus, tmp_path, capsys, monkeypatch):
    args = ["train", "--data.path", str(corpus), "--out-dir", str(tmp_path / "r"), "--train.device", "cpu",
            "--model.n-layer", "1", "--model.n-embd", "32", "--model.n-head", "2", "--model.block-size", "16",
            "--train.batch-size", "2", "--dry-run"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0
    assert capsys.readouterr().out == ""  # rank 1: rank 0 prints the plan
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "64 tokens (batch 2 x block 16 x grad_accum 1 x 2 processes)" in printed
    assert "timed in one process alone" in printed


def test_dry_run_under_torchrun_gives_each_process_its_share_of_the_cpus_memory(corpus, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setattr(plan, "device_memory", lambda device: 2 * 1024**3)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    figures = plan.dry_run(tiny_config(corpus, tmp_path / "run", max_iters=2), timed_steps=1)
    assert figures["device_memory"] == 1024**3
    assert "cpu has 1.00 GiB for each of the 2 processes on this machine: fits" in capsys.readouterr().out


def test_dry_run_counts_the_evals_of_a_resume_and_of_accumulated_steps(corpus, tmp_path, capsys):
    """An evaluation costs eval_iters forward passes per split, a third of a micro-step each: one optimizer step of
    grad_accum_steps micro-steps is not one forward pass. A resume evaluates at no step 0 of its own."""
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=2, grad_accum_steps=2)
    figures = plan.dry_run(cfg, timed_steps=1)
    assert figures["eval_s"] == pytest.approx(2 * 2 * 2 * figures["step_s"] / 2 / 3)  # at steps 0 and 2
    train(tiny_config(corpus, tmp_path / "run", max_iters=4, eval_interval=2), progress=False)
    resumed = tiny_config(corpus, tmp_path / "run", max_iters=8, eval_interval=2)
    figures = plan.dry_run(resumed, timed_steps=1, resume=True)
    assert figures["eval_s"] == pytest.approx(2 * 2 * 2 * figures["step_s"] / 3)  # at steps 6 and 8, not 4 again
    # a time budget counts what the run has used of it already
    used = ckpt.load_state(ckpt.find_checkpoint(tmp_path / "run"))["elapsed_s"]
    budget = dataclasses.replace(resumed, train=dataclasses.replace(resumed.train, max_iters=10**9,
                                                                    max_minutes=(used + 30) / 60))
    capsys.readouterr()
    figures = plan.dry_run(budget, timed_steps=1, resume=True)
    assert figures["projected_s"] == pytest.approx(30)
    assert f", {used / 60:.1f} of them used, stops it after about " in capsys.readouterr().out


def test_dry_run_of_a_budget_counts_the_evals_of_the_steps_that_fit(corpus, tmp_path, capsys, monkeypatch):
    """A time budget stops the run long before max_iters: the evals up to max_iters never happen. Counting all of
    them, the dry run said the budget "stops it after about 0 steps" of a run that then trained 3,124."""
    from fungpt.budget import EXIT_RESERVE_S

    monkeypatch.setattr(plan, "_time_steps", lambda *a, **k: (0.01, 3))  # 10 ms per step, whatever this machine does
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=100_000, eval_interval=20, eval_iters=2, max_minutes=0.25)
    started = time.time() - 4  # the command started 4 s before this call: the start-up before its steps
    figures = plan.dry_run(cfg, timed_steps=1, start_time=started)
    one_eval = (2 + 2) * 0.01 / 3  # eval_iters batches of each split, a forward pass a third of a step
    assert figures["eval_s"] == pytest.approx(100_000 // 20 * one_eval)  # no step-0 eval: a budget run skips it
    # the start-up, the final eval and the exit; then steps, each with its share of an eval every 20 steps
    def fit(startup: float) -> int:
        return int((15 - startup - one_eval - EXIT_RESERVE_S) / (0.01 + one_eval / 20))

    printed = capsys.readouterr().out
    said = re.search(r"max_minutes = 0.25 stops it after about ([\d,]+) steps", printed)
    assert said and fit(4 + 5) <= int(said[1].replace(",", "")) <= fit(4)  # (the call's own work: under 5 s)
    # the budget is said first, what max_iters would take after it (a million steps of a budget preset: days);
    # no "whole command" line: the budget covers it
    assert re.search(r"ms per step \(median of 3\): max_minutes = 0\.25 stops it after about [\d,]+ steps "
                     r"\(100,000 steps \+ evals would take [\d.]+ min\)\n", printed) and "whole command" not in printed
    # steps and evals that fit in the budget alone, but not with the start-up and the end: the budget still binds
    # (the dry run said nothing of it, and the run then stopped at a fraction of max_iters)
    fits = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=1000))
    plan.dry_run(fits, timed_steps=1, start_time=time.time() - 4)
    assert re.search(r"max_minutes = 0.25 stops it after about [\d,]+ steps \(1,000 steps \+ evals would take "
                     r"1\d s\)", capsys.readouterr().out)
    plan.dry_run(cfg, timed_steps=1, start_time=time.time() - 16)  # a start-up longer than the budget
    assert "max_minutes = 0.25 leaves no time for a step after the start-up and the final eval: training would " \
           "refuse it" in capsys.readouterr().out
    train(tiny_config(corpus, tmp_path / "run", max_iters=2), progress=False)  # a resume ends without a step instead
    plan.dry_run(cfg, timed_steps=1, start_time=time.time() - 16, resume=True)
    assert "leaves no time for a step after the start-up and the final eval: nothing would be trained: raise " \
           "train.max_minutes to continue it" in capsys.readouterr().out


MEASURE = textwrap.dedent("""
    import json, sys
    import torch

    def status_kib(field):
        for line in open("/proc/self/status", encoding="utf-8"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    from fungpt.model import GPT, GPTConfig
    from fungpt.train import configure_optimizer
    from fungpt.config import TrainConfig
    torch.set_num_threads(1)
    cfg = GPTConfig(**json.loads(sys.argv[1]))
    B = int(sys.argv[2])
    x = torch.randint(0, cfg.vocab_size, (B, cfg.block_size))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one (Linux >= 4.0)
    base = status_kib("VmRSS")
    model = GPT(cfg)
    opt = configure_optimizer(model, TrainConfig(), "cpu")
    for _ in range(2):
        loss = model(x, x)[1]  # (as the trainer: the logits are not kept)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print((status_kib("VmHWM") - base) * 1024)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak resident size from Linux's /proc")
@pytest.mark.parametrize("vocab_size, n_layer, n_embd, batch", [(512, 4, 256, 8),
                                                                 (16384, 2, 64, 16)])  # logits-bound: was 3-4x low
def test_memory_estimate_is_within_2x_of_the_measured_peak(vocab_size, n_layer, n_embd, batch):
    """Measured: in a fresh process, the peak resident memory (VmHWM, reset through /proc/self/clear_refs
    just before the model is built) minus the resident memory then, over two training steps. The CPU
    allocator returns freed memory, so the peak is what training really held at once."""
    model_cfg = GPTConfig(vocab_size=vocab_size, block_size=128, n_layer=n_layer, n_head=4, n_embd=n_embd)
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(model_cfg.to_dict()), str(batch)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    measured = int(out.stdout.split()[-1])
    estimate = estimate_memory(model_cfg, batch, "float32")["total"]
    assert measured / 2 <= estimate <= measured * 2, (estimate, measured)


def test_kv_cache_estimate_is_what_make_kv_cache_allocates():
    """kv_cache counts keys and values: without the 2, a server's memory for B cached sequences was half the real.
    Generation runs the saved float32 weights whatever the training dtype: a bfloat16 run's was shown at half."""
    cfg = GPTConfig(vocab_size=50, block_size=24, n_layer=3, n_head=2, n_embd=16)
    cache = GPT(cfg).make_kv_cache(5)
    allocated = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    for dtype in ("float32", "bfloat16", "float16"):
        assert estimate_memory(cfg, 5, dtype)["kv_cache"] == allocated == 2 * 3 * 5 * 24 * 16 * 4


def test_weight_copies_and_qk_norm_in_the_memory_estimate():
    """16-bit autocast keeps a 16-bit copy of every weight (2 bytes each; none in float32), and QK-norm keeps new q
    and k tensors: 2 x s x B x T x C bytes more activations per layer."""
    cfg = GPTConfig(vocab_size=50, block_size=24, n_layer=3, n_head=2, n_embd=16)
    n = GPT(cfg).num_params()
    assert estimate_memory(cfg, 4, "bfloat16")["weight_copies"] == 2 * n
    assert estimate_memory(cfg, 4, "float16")["weight_copies"] == 2 * n
    assert estimate_memory(cfg, 4, "float32")["weight_copies"] == 0
    qk = dataclasses.replace(cfg, qk_norm=True)
    # (bfloat16 on a CPU is bfloat16 products: float32 activations, and the weights' bfloat16 copies)
    for dtype, s, device in (("float32", 4, "cpu"), ("bfloat16", 2, "cuda"), ("bfloat16", 4, "cpu")):
        extra = (estimate_memory(qk, 4, dtype, device=device)["activations"]
                 - estimate_memory(cfg, 4, dtype, device=device)["activations"])
        assert extra == 3 * 2 * s * 4 * 24 * 16  # layers x (q, k) x bytes x B x T x C


def test_rope_plain_attention_and_adamw_scratch_in_the_memory_estimate():
    """As estimate_memory's docstring counts them: RoPE's new q and k (2 x s x B x T x C per layer), plain attention's
    float32 softmax weights (4 x nh x B x T^2 per layer, once without dropout) kept and once more in the backward's
    temporaries, and AdamW's batched-update scratch (N x 4 bytes)."""
    cfg = GPTConfig(vocab_size=50, block_size=24, n_layer=3, n_head=2, n_embd=16)
    base = estimate_memory(cfg, 4)
    rope = estimate_memory(dataclasses.replace(cfg, pos_encoding="rope"), 4)
    assert rope["activations"] - base["activations"] == 3 * 2 * 4 * 4 * 24 * 16
    plain = estimate_memory(cfg, 4, attn_impl="plain")
    square = 4 * 2 * 4 * 24 * 24  # one (B, nh, T, T) float32 tensor
    assert plain["activations"] - base["activations"] == 3 * square
    assert plain["temporaries"] - base["temporaries"] == 2 * square
    empty = estimate_memory(cfg, 0)  # what does not grow with the batch: weights, gradients, AdamW and its scratch
    assert empty["temporaries"] == empty["weights"] == base["weights"] and empty["total"] == 5 * empty["weights"]


def test_optimizer_memory_matches_the_state_muon_and_adamw_keep():
    """With optimizer = "muon", the estimate counts the state the optimizer really holds after a step: Muon's one
    momentum buffer per block matrix and AdamW's two per other weight (it counted two for every weight)."""
    from fungpt.model import GPT
    from fungpt.train import configure_optimizer

    cfg = GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16)
    for name in ("adamw", "muon"):
        model = GPT(cfg)
        optimizer = configure_optimizer(model, TrainConfig(optimizer=name), "cpu")
        model(torch.randint(50, (2, 8)), torch.randint(50, (2, 8)))[1].backward()
        optimizer.step()
        parts = getattr(optimizer, "parts", [optimizer])  # (the combination keeps its state in its parts)
        held = sum(t.numel() * t.element_size() for part in parts for state in part.state.values()
                   for t in state.values() if t.dim() > 0)  # (AdamW's step counters are scalars: left out)
        mem = estimate_memory(cfg, 2, optimizer=name)
        assert mem["optimizer"] == held, name
        assert mem["optimizer_name"] == {"adamw": "AdamW", "muon": "AdamW + Muon"}[name]


def test_largest_batch_keeps_the_safety_margin():
    """The batch must fit in SAFETY (90%) of the memory, not all of it: the estimate leaves out allocator slack."""
    model = GPTConfig(vocab_size=96, block_size=64, n_layer=2, n_head=2, n_embd=32)
    fixed = estimate_memory(model, 0, "float32")["total"]
    per_seq = estimate_memory(model, 1, "float32")["total"] - fixed
    assert estimate_memory(model, 7, "float32")["total"] == fixed + 7 * per_seq  # linear in the batch
    memory = int((fixed + 10.5 * per_seq) / 0.9)  # 90% of it holds 10.5 sequences; all of it about 11.7 + fixed/9
    assert plan.SAFETY == 0.9 and (memory - fixed) // per_seq > 10
    assert plan.largest_batch(model, "float32", memory) == 10
    assert plan.largest_batch(model, "float32", int(fixed / 0.9)) == 0  # the weights and AdamW state fill it


def test_batch_advice_never_asks_for_a_larger_batch_nor_blames_the_sequence_for_the_weights():
    """After a CUDA out-of-memory error the estimate may say a larger batch fits than the one that just failed: the
    advice keeps the run's own batch then, never a larger one. Weights, gradients and AdamW state that fill more than
    SAFETY of the memory are named as the cause, not the sequence's block_size."""
    cfg = RunConfig(model=GPTConfig(vocab_size=96, block_size=64, n_layer=2, n_head=2, n_embd=32),
                    train=TrainConfig(batch_size=4, grad_accum_steps=3))
    assert plan.largest_batch(cfg.model, "float32", 1024**3) > 4
    advice = plan.batch_advice(cfg, "float32", 1024**3)
    assert advice.startswith("the estimate says batch_size = 4 fits; set train.batch_size = 4 and "
                             "train.grad_accum_steps = 3 to keep about the same 12 sequences"), advice
    fixed = estimate_memory(cfg.model, 0, "float32")["total"]
    advice = plan.batch_advice(cfg, "float32", int(fixed / 0.95))  # above 90% of it, below all of it
    assert advice.startswith(f"even one sequence does not fit: the weights, their gradients, AdamW state and its "
                             f"update's scratch alone need about {fixed / 1024**3:.1f} GiB"), advice
    # what "alone" counts is the sum of those parts (the weights, gradients and AdamW state named alone came to
    # less than the total printed: 768 against 960 GiB)
    parts = estimate_memory(cfg.model, 0, "float32")
    assert parts["weights"] + parts["grads"] + parts["optimizer"] + parts["temporaries"] == fixed
    # After a CUDA out-of-memory error the estimate may say the batch that failed fits (a GPU's memory is its total,
    # not what is free): the advice was to set the very batch that failed; it is half of it now
    prec = Precision("cuda", "float32", "")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(plan, "device_memory", lambda device: 1024**3)
        said = plan.out_of_memory_advice(cfg, prec)
    assert said == ("out of GPU memory with batch_size = 4, block_size = 64 (float32): the estimate says batch_size = "
                    "2 fits; set train.batch_size = 2 and train.grad_accum_steps = 6 to keep about the same 12 "
                    "sequences per optimizer step"), said
    one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=1))  # (no smaller batch to give)
    said = plan.batch_advice(one, "float32", 1024**3, "cuda", failed=True)
    assert said.startswith("batch_size = 1 ran out of memory, though the estimate says it fits") and \
        "use a smaller block_size (now 64) or model" in said, said


def test_attention_dropout_off_cuda_counts_its_block_size_squared_matrices():
    """With dropout on a CPU, SDPA falls back to a path that keeps (T, T) matrices: a dry run said 1.4 GiB "fits"
    at block_size 20,000 and the process was then killed for memory. The advice must name the real cause."""
    from fungpt.config import RunConfig

    model = GPTConfig(vocab_size=96, block_size=4096, n_layer=2, n_head=2, n_embd=64, dropout=0.1)
    on_cpu, on_cuda = (estimate_memory(model, 4, device=d)["activations"] for d in ("cpu", "cuda"))
    squares = 2 * 3 * 4 * 2 * 4096**2 * 4  # layers x 3 float32 (B, nh, T, T) tensors each
    assert on_cpu - on_cuda == squares
    no_dropout = dataclasses.replace(model, dropout=0.0)
    assert estimate_memory(no_dropout, 4, device="cpu")["activations"] == on_cuda
    cfg = RunConfig(model=model)
    assert plan.largest_batch(model, "float32", 1024**3, "cuda") > 1
    advice = plan.batch_advice(cfg, "float32", 1024**3, "cpu")
    assert advice.startswith("even one sequence does not fit: batch 1 x block_size 4096 needs about ")
    assert "model.dropout = 0 avoids them); use a smaller block_size" in advice


def test_a_cpu_run_that_the_estimate_says_is_too_big_is_warned_about(corpus, tmp_path, monkeypatch, capsys):
    """On a CPU, running out of memory is not an error to explain: the system kills the process (exit 137, no
    message). The run starts anyway (the estimate errs high), after a warning with the batch that fits."""
    cfg = tiny_config(corpus, tmp_path / "run", batch_size=64, max_iters=1)
    fixed = estimate_memory(GPTConfig(**{**cfg.model.to_dict(), "vocab_size": 100}), 0, "float32")["total"]
    monkeypatch.setattr(plan, "device_memory", lambda device: 2 * fixed)
    train(cfg, progress=False)
    out = capsys.readouterr().out
    assert "fungpt: warning: this run needs about " in out and " of this cpu: the system may kill it. The " \
        "estimate says batch_size = " in out
    monkeypatch.setattr(plan, "device_memory", lambda device: 1024**4)
    train(dataclasses.replace(cfg, out_dir=str(tmp_path / "again")), progress=False)
    assert "warning" not in capsys.readouterr().out


def test_a_model_whose_weights_alone_might_not_fit_is_warned_about_before_it_is_built(corpus, tmp_path,
                                                                                      monkeypatch, capsys):
    """Building such a model can itself be what the system kills the process for: the warning comes first."""
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=1)
    m = GPTConfig(**{**cfg.model.to_dict(), "vocab_size": 100})  # (the corpus's char vocabulary is below 100)
    monkeypatch.setattr(plan, "device_memory", lambda device: 16 * 12 * m.n_layer * m.n_embd**2)
    train_mod = sys.modules["fungpt.train"]

    def killed(config):
        raise FunGPTError("killed while building the model")

    monkeypatch.setattr(train_mod, "GPT", killed)
    with pytest.raises(FunGPTError, match="killed while building"):
        train(cfg, progress=False)
    assert "fungpt: warning: this run needs about " in capsys.readouterr().out


def test_processes_of_a_torchrun_job_share_the_machines_memory(corpus, tmp_path, monkeypatch, capsys):
    """On a CPU the memory check compared one process's estimate with the whole machine's memory: two processes
    needing 60% each were said to fit."""
    from fungpt.hardware import detect_precision
    from fungpt.train import warn_if_memory_short

    cfg = tiny_config(corpus, tmp_path / "run")
    need = estimate_memory(cfg.model, 4, "float32")["total"]  # (what warn_if_memory_short estimates)
    monkeypatch.setattr(plan, "device_memory", lambda device: int(need / 0.6))
    prec = detect_precision("cpu", "float32")
    warn_if_memory_short(cfg, prec)
    assert capsys.readouterr().out == ""  # one process: 60%
    from fungpt.inspection import meta_model

    warn_if_memory_short(cfg, prec, num_params=meta_model(cfg.model).num_params())  # (as train() calls it)
    assert capsys.readouterr().out == ""
    # between 90% and all of the memory: --dry-run says "does NOT fit", and so does the run (it said nothing)
    monkeypatch.setattr(plan, "device_memory", lambda device: int(need / 0.95))
    warn_if_memory_short(cfg, prec)
    assert "GiB of memory by estimate, over 90% of the " in capsys.readouterr().out
    monkeypatch.setattr(plan, "device_memory", lambda device: int(need / 0.6))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert plan.processes_sharing("cpu") == 1  # a variable left over, not a torchrun job
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert plan.processes_sharing("cpu") == 2 and plan.processes_sharing("cuda") == 1  # (a GPU each)
    warn_if_memory_short(cfg, prec, num_params=meta_model(cfg.model).num_params())
    assert "fungpt: warning: the 2 processes of this run on this machine need about " in capsys.readouterr().out


def test_cpu_memory_is_the_containers_limit_where_that_is_lower(tmp_path, monkeypatch):
    """In a container the machine's memory is not what the process may use: the kill comes at the limit."""
    proc = tmp_path / "cgroup"
    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    proc.write_text("0::/job/step\n")  # cgroup v2: the process in /job/step
    (v2 / "job" / "step" / "memory.max").write_text("max\n")
    assert plan.cgroup_memory_limit(v2, proc) is None
    (v2 / "job" / "memory.max").write_text("1073741824\n")  # a limit on the group above it (Slurm's job)
    assert plan.cgroup_memory_limit(v2, proc) == 1024**3
    (v2 / "job" / "step" / "memory.max").write_text("536870912\n")  # and a lower one on its own
    assert plan.cgroup_memory_limit(v2, proc) == 512 * 1024**2
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    proc.write_text("5:devices:/\n4:memory:/docker/abc\n0::/\n")  # cgroup v1 (and v2's line of a hybrid)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the root: no limit
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("268435456\n")
    assert plan.cgroup_memory_limit(v1, proc) == 256 * 1024**2
    assert plan.cgroup_memory_limit(tmp_path / "none", tmp_path / "no-proc-file") is None
    monkeypatch.setattr(plan, "cgroup_memory_limit", lambda: 1024**3)
    assert plan.device_memory("cpu") == 1024**3
    monkeypatch.setattr(plan, "cgroup_memory_limit", lambda: 2**63)  # v1's "no limit"
    assert 0 < plan.device_memory("cpu") < 2**63


def test_out_of_memory_gives_the_batch_that_fits(corpus, tmp_path, monkeypatch):
    forward = GPT.forward

    def oom(self, *args, **kwargs):  # training steps run out of memory; evaluation (no gradients) fits
        if torch.is_grad_enabled():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", oom)
    monkeypatch.setattr(plan, "device_memory", lambda device: 1024**2)  # pretend a 1 MiB GPU
    cfg = tiny_config(corpus, tmp_path / "run", batch_size=64, grad_accum_steps=2)
    fixed = estimate_memory(GPTConfig(**{**cfg.model.to_dict(), "vocab_size": 100}), 0, "float32")["total"]
    assert fixed < 1024**2 * plan.SAFETY  # the model itself fits in the pretend GPU
    with pytest.raises(FunGPTError, match=r"out of GPU memory") as err:
        train(cfg, progress=False)
    msg = str(err.value)
    fit = int(msg.split("train.batch_size = ")[1].split()[0])
    accum = int(msg.split("train.grad_accum_steps = ")[1].split()[0])
    assert 1 <= fit < 64 and fit * accum >= 64 * 2 and fit * (accum - 1) < 64 * 2


# ----------------------------------------------------------------------------- time budget

def test_max_iters_before_the_budget_ends_the_schedule_too(corpus, tmp_path):
    """max_minutes and max_iters: the run ends at whichever comes first, and its lr has decayed by then."""
    cfg = tiny_config(corpus, tmp_path / "both", max_iters=30, warmup_iters=3, max_minutes=10.0)
    assert train(cfg, progress=False)["step"] == 30  # long before the 10 minutes
    rows = map(json.loads, (tmp_path / "both" / "metrics.jsonl").read_text().splitlines())
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert len(lrs) == 30 and max(lrs) > 0.9 * cfg.train.lr
    assert (lrs[-1] - cfg.train.min_lr) / (cfg.train.lr - cfg.train.min_lr) < 0.05  # at min_lr, as on steps


@pytest.fixture()
def quick_steady_budget():
    """For the 6 s budget tests: setup and steps that a busy machine does not make erratic.

    Imported first, as earlier tests in a full run would have: run alone on a busy machine, torch._dynamo (which
    the optimizer imports) and matplotlib (the step-0 plot timing) took 3-6 s of the budget, leaving no steps.
    One torch thread: on a 2-core machine kept busy by another program, two threads that wait for each other
    made single steps 60x slower than the rest (0.5 s against 8 ms), faster than any forecast of a 6 s budget can
    follow.
    """
    import matplotlib.pyplot  # noqa: F401
    import torch._dynamo  # noqa: F401

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_budget_run_saved_at_its_last_step_saves_it_again_after_the_final_eval(corpus, tmp_path,
                                                                                quick_steady_budget):
    """The final eval may lower best_val after the periodic checkpoint of the same step: that checkpoint's best_val
    (inf here) let a resume replace the `best` weights with worse ones."""
    out = tmp_path / "saved-each-step"
    cfg = tiny_config(corpus, out, max_iters=1_000_000, eval_interval=1_000_000, eval_iters=2, checkpoint_interval=1,
                      max_minutes=0.1)
    result = train(cfg, progress=False)
    assert ckpt.load_state(ckpt.find_checkpoint(out))["best_val"] == pytest.approx(result["val_loss"])


def test_a_budget_ending_at_a_step_just_evaluated_and_saved_does_not_do_either_again(corpus, tmp_path,
                                                                                   quick_steady_budget):
    """The final eval and checkpoint ran again at the step the periodic ones had just done: twice the time of one
    (a 15 s budget took 17 s), two val rows for one step in metrics.jsonl, and a second checkpoint folder."""
    out = tmp_path / "every-step"
    cfg = tiny_config(corpus, out, max_iters=1_000_000, eval_interval=1, eval_iters=2, checkpoint_interval=1,
                      max_minutes=0.1)
    result = train(cfg, progress=False)
    assert result["step"] > 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evaluated = [r["step"] for r in rows if "val_loss" in r]
    assert len(evaluated) == len(set(evaluated)) and evaluated[-1] == result["step"]
    assert [d.name for d in (out / "checkpoints").iterdir() if d.name.startswith("latest")] == \
        [f"latest-{result['step']:07d}"]


def test_max_minutes_stops_on_time_with_the_schedule_decayed(corpus, tmp_path, capsys, quick_steady_budget):

    out = tmp_path / "budget"
    budget_min = 0.1  # 6 seconds
    cfg = tiny_config(corpus, out, max_iters=1_000_000, warmup_iters=10, lr_decay_iters=100,
                      checkpoint_interval=200, max_minutes=budget_min)
    result = train(cfg, progress=True)
    assert 0 < result["step"] < 1_000_000
    # the progress bar counted to where the budget ended the run, not to max_iters (it read 0% for the whole run)
    err = capsys.readouterr().err
    bar = err.split("\r")[-1]
    assert f" {result['step']}/{result['step']} " in bar and "100%" in bar, bar
    assert "1000000" not in err  # not even before the first forecast (into a log, that line stays 30 s)
    # "On time": the whole command, final eval and checkpoint included, within the budget
    # (a little slack for the machine being shared).
    assert result["elapsed_s"] <= budget_min * 60 + 2.0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert max(lrs) > 0.9 * cfg.train.lr  # warmed up, then decayed ...
    assert (lrs[-1] - cfg.train.min_lr) / (cfg.train.lr - cfg.train.min_lr) < 0.02  # ... to min_lr at the end
    assert rows[-1]["step"] == result["step"] and "val_loss" in rows[-1]  # final eval

    # Resume counts the time already spent: the budget is gone, so there is nothing to do, and nothing is
    # written (before, it evaluated and saved the same step again); only the run lock names its new holder
    def written() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != LOCK_FILE}

    files = written()
    again = train(cfg, resume=True, progress=False)
    assert again["step"] == result["step"]
    assert written() == files
    assert "already used its time budget" in capsys.readouterr().out


def test_a_budget_run_plans_its_second_step_with_the_first_ones_time(corpus, tmp_path, monkeypatch,
                                                                      quick_steady_budget):
    """The first step is left out of the step-time median (it includes one-time work), but until a second step
    is timed it is all there is: planned as free, a second 2 s step overran a 6 s budget by 3 s."""
    import time

    from fungpt.data import BatchLoader

    next_batch = BatchLoader.next_batch

    def slow(self):
        time.sleep(2.0)
        return next_batch(self)

    monkeypatch.setattr(BatchLoader, "next_batch", slow)
    cfg = tiny_config(corpus, tmp_path / "slow", max_iters=100, checkpoint_interval=10**6, eval_interval=10**6,
                      eval_iters=1, max_minutes=0.1)
    result = train(cfg, progress=False)
    # One step: two more 2 s steps never fit after it (planned as free, a second one was taken: 8.6 s). Its final
    # eval, one 2 s batch per split, ends the run at about 6.5 s; the bound leaves a busy machine's start-up 1.5 s
    assert result["step"] == 1 and result["elapsed_s"] <= 6.0 + 2.0


@pytest.fixture()
def slow_first_compiled_step(monkeypatch):
    """torch.compile replaced by the plain model (no compiler needed), and each command's first batch slowed by
    2.5 s: the compile that a compiled run's first step does."""
    import time

    from fungpt.data import BatchLoader

    train_mod = sys.modules["fungpt.train"]
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    monkeypatch.setattr(train_mod, "check_compile", lambda device: None)
    calls = []
    next_batch, train_fn = BatchLoader.next_batch, train_mod.train

    def compiling_first(self):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(2.5)
        return next_batch(self)

    def each_command_compiles(*args, **kwargs):
        calls.clear()
        return train_fn(*args, **kwargs)

    monkeypatch.setattr(BatchLoader, "next_batch", compiling_first)
    return each_command_compiles


def _lrs(out: Path) -> list[float]:
    return [json.loads(r)["lr"] for r in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if "lr" in json.loads(r)]


def test_a_compiled_budget_run_does_not_take_its_compiling_step_as_the_step_time(corpus, tmp_path,
                                                                                 slow_first_compiled_step,
                                                                                 quick_steady_budget, capsys):
    """With torch.compile the first step is mostly compiling (17.4 s against 24 ms steps on an H200): planned
    with that step's time, a 60 s budget ended after one step; counted as schedule time, the compile had used
    up over half of the lr schedule."""
    cfg = tiny_config(corpus, tmp_path / "compiled", max_iters=10**6, checkpoint_interval=10**6,
                      eval_interval=10**6, eval_iters=1, max_minutes=0.1, compile=True)
    result = slow_first_compiled_step(cfg, progress=False)
    assert "fungpt: compiling the model: the first steps take a while" in capsys.readouterr().out  # (said first)
    assert result["step"] > 20 and result["elapsed_s"] <= 6.0 + 2.0  # it trained on after the slow step, on time
    # ... and the compile was not schedule time: the lr was still at its peak after it (not half-way decayed)
    lrs = _lrs(tmp_path / "compiled")
    assert lrs[1] > 0.95 * cfg.train.lr and lrs[-1] < 0.5 * cfg.train.lr


def test_a_resumed_budget_runs_lr_goes_on_from_where_it_was(corpus, tmp_path, quick_steady_budget, monkeypatch):
    """A resumed command's start-up is budget time, not schedule time (as the first command's is not): counted in,
    the lr jumped on at the first step resumed, from 76% of its peak to 36% in a WSD decay. A second resume jumped
    too (the checkpoint kept the origin a resume plans from, not the one the lr followed)."""
    import signal

    from fungpt.data import BatchLoader

    next_batch, load_state, batches, stops = BatchLoader.next_batch, ckpt.load_state, [], [20, 15]

    def slow_and_stopped(self):  # (0.2 s steps; Ctrl-C at step 20, and 15 steps into the next command)
        # (the training loop's batches only: a Ctrl-C sent from an eval's batch, after the loop, is not caught there
        # and stopped the whole pytest session)
        batches.append(sys._getframe(1).f_code.co_name == "forward_backward")
        if stops and sum(batches) == stops[0] and batches[-1]:
            stops.pop(0)
            batches.clear()
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        return next_batch(self)

    monkeypatch.setattr(BatchLoader, "next_batch", slow_and_stopped)
    monkeypatch.setattr(ckpt, "load_state", lambda *a: time.sleep(2.0) or load_state(*a))  # a slow start-up
    out = tmp_path / "resumed"
    cfg = tiny_config(corpus, out, max_iters=10**6, checkpoint_interval=10**6, eval_interval=10**6, eval_iters=1,
                      max_minutes=0.3)
    assert train(cfg, progress=False)["step"] == 20
    assert train(cfg, resume=True, progress=False)["step"] == 35
    assert train(cfg, resume=True, progress=False)["step"] > 35  # (a step after the second resume: a busy machine
    # spends most of what is left of the budget on the start-up)
    lrs = _lrs(out)
    assert 0.15 * cfg.train.lr < lrs[34] < 0.97 * cfg.train.lr, lrs[17:38]  # (stopped in the decay, not at its end)
    for last in (19, 34):  # each resume: one step's change (0.2 s of schedule, more on a busy machine), not also
        # the start-up's 2 s (10 steps' worth)
        step_change = max(abs(a - b) for a, b in zip(lrs[last - 5:last], lrs[last - 4:last + 1]))
        assert abs(lrs[last + 1] - lrs[last]) < 3 * step_change, (last, lrs[last - 5:last + 3])


def test_a_budget_runs_last_checkpoint_counts_its_own_save_and_the_plot(corpus, tmp_path, quick_steady_budget,
                                                                        monkeypatch):
    """The time a command spends after its last checkpoint began (the save itself, the plot) was in no checkpoint:
    each resume of a budget run began that much short, and a chain of interrupted commands overran the budget."""
    save, plot = ckpt.save_checkpoint, sys.modules["fungpt.train"]._plot_quietly
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a, **k: time.sleep(0.5) or save(*a, **k))  # (a big model)
    monkeypatch.setattr(sys.modules["fungpt.train"], "_plot_quietly", lambda *a, **k: time.sleep(0.5) or plot(*a, **k))
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=5, max_minutes=1.0, eval_iters=1, plot=True)
    t0 = time.time()
    train(cfg, progress=False)
    took = time.time() - t0
    used = ckpt.load_state(ckpt.find_checkpoint(tmp_path / "run"))["elapsed_s"]
    assert took - 0.3 < used < took + 0.3, (used, took)  # (left out, the two made it 1 s short)


def test_a_budget_resume_times_the_save_and_plot_its_checkpoint_did_not(corpus, tmp_path, quick_steady_budget):
    """A run trained without a budget (or saved once) timed no save and no plot: resumed with a budget, its end
    reserved nothing for them, and ran past the budget by their time."""
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=4, eval_iters=1, plot=True)
    train(cfg, progress=False)
    timings = ckpt.load_state(ckpt.find_checkpoint(tmp_path / "run"))["timings"]
    assert timings["save"] == timings["plot"] == 0.0, timings  # (its one save timed none before it)
    budget = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=8, max_minutes=1.0))
    assert train(budget, resume=True, progress=False)["step"] == 8
    timings = ckpt.load_state(ckpt.find_checkpoint(tmp_path / "run"))["timings"]
    assert timings["save"] > 0 and timings["plot"] > 0, timings


def test_a_run_without_a_budget_resumed_with_one_counts_its_untimed_save_and_plot(corpus, tmp_path,
                                                                                quick_steady_budget, monkeypatch):
    """A run's first save records no save time (none was timed before it), and a run without a budget times no
    plot: resumed with a budget, the first command's last save and plot were in no one's time, and the two commands
    overran the budget by them."""
    save, plot = ckpt.save_checkpoint, sys.modules["fungpt.train"]._plot_quietly
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a, **k: time.sleep(1.0) or save(*a, **k))  # (a big model)
    monkeypatch.setattr(sys.modules["fungpt.train"], "_plot_quietly", lambda *a, **k: time.sleep(1.0) or plot(*a, **k))
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=4, eval_iters=1, plot=True)
    t0 = time.time()
    train(cfg, progress=False)
    budget = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=6, max_minutes=1.0))
    train(budget, resume=True, progress=False)
    took = time.time() - t0
    used = ckpt.load_state(ckpt.find_checkpoint(tmp_path / "run"))["elapsed_s"]
    assert took - 0.5 < used < took + 0.5, (used, took)  # (2 s short without them)


def test_a_budget_runs_lr_goes_on_from_a_periodic_checkpoint_as_uninterrupted(corpus, tmp_path, quick_steady_budget,
                                                                            monkeypatch):
    """A periodic save takes schedule time in any run; a resume from one (after a crash) took it out of the
    schedule and the lr rose at the first step resumed."""
    from fungpt.data import BatchLoader

    next_batch, save, saves = BatchLoader.next_batch, ckpt.save_checkpoint, []
    monkeypatch.setattr(BatchLoader, "next_batch", lambda self: time.sleep(0.1) or next_batch(self))

    def crash_after_the_step_10_save(*a, **k):
        time.sleep(1.0)  # (a big model's save: 10 steps' worth of the schedule)
        folder = save(*a, **k)
        saves.append(a[2])
        if a[1] == "latest" and a[2] == 10 and len(saves) < 4:
            raise RuntimeError("crashed right after the save")
        return folder

    monkeypatch.setattr(ckpt, "save_checkpoint", crash_after_the_step_10_save)
    out = tmp_path / "run"
    cfg = tiny_config(corpus, out, max_iters=10**6, eval_interval=10**6, checkpoint_interval=10, eval_iters=1,
                      max_minutes=0.25)
    with pytest.raises(RuntimeError, match="crashed"):
        train(cfg, progress=False)
    train(cfg, resume=True, progress=False)
    lrs = _lrs(out)
    # (rows from step 1: lrs[9] is step 10's, the checkpoint's; lrs[10] the first step resumed)
    assert 0 <= lrs[9] - lrs[10] < 3 * (lrs[10] - lrs[11]), lrs[6:14]  # one step's fall: no rise, no jump


def ctrl_c_in_step(n: int, monkeypatch) -> None:
    """Ctrl-C during the training loop's step n (from its first micro-batch; an eval's batches are not counted)."""
    import signal

    from fungpt.data import BatchLoader

    next_batch, steps = BatchLoader.next_batch, []

    def counting(self):
        if sys._getframe(1).f_code.co_name == "forward_backward":
            steps.append(1)
            if len(steps) == n:
                os.kill(os.getpid(), signal.SIGINT)
        return next_batch(self)

    monkeypatch.setattr(BatchLoader, "next_batch", counting)


def test_a_budget_resume_refused_says_the_final_eval_was_not_done(corpus, tmp_path, quick_steady_budget, monkeypatch,
                                                                 capsys):
    """Interrupted near its budget's end, a run was told to resume; the resume was refused (no time left), and
    nothing said that its last step had no eval."""
    ctrl_c_in_step(3, monkeypatch)
    out = tmp_path / "run"
    cfg = tiny_config(corpus, out, max_iters=10**6, eval_iters=1, max_minutes=0.5)
    assert train(cfg, progress=False)["step"] == 3
    capsys.readouterr()
    used = ckpt.load_state(ckpt.find_checkpoint(out))["elapsed_s"]
    spent = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_minutes=used / 60))
    train(spent, resume=True, progress=False)
    said = capsys.readouterr().out
    assert re.search(r"already used its time budget .*; raise train.max_minutes to continue it; its final eval was "
                     r"not done: `fungpt eval --run .*run` scores it", said), said


def test_an_interrupted_budget_run_is_told_to_resume_when_a_resume_would_have_time(corpus, tmp_path,
                                                                                 quick_steady_budget, monkeypatch,
                                                                                 capsys):
    """Whether a resume would find time to train counted this command's start-up twice, its data preparation too
    (once only: a resume finds the data ready): a run with half its budget left was told it could not resume."""
    train_mod = sys.modules["fungpt.train"]
    real_resolve = train_mod.resolve_model_and_data
    monkeypatch.setattr(train_mod, "resolve_model_and_data", lambda *a, **k: time.sleep(5) or real_resolve(*a, **k))
    ctrl_c_in_step(3, monkeypatch)
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=10**6, eval_iters=1, max_minutes=8 / 60)
    assert train(cfg, progress=False, start_time=time.time())["step"] == 3  # (as the fungpt command calls it)
    said = capsys.readouterr().err
    assert "interrupted at step 3; checkpoint saved. Resume with the same command plus --resume" in said, said


def test_a_budget_run_resumed_from_its_step_0_checkpoint_warms_up(corpus, tmp_path, quick_steady_budget,
                                                                   monkeypatch):
    """A budget run saves step 0 before its first step (its schedule has no origin yet): resumed from there, the
    first command's start-up was taken for schedule time and the warmup skipped (the lr at 96% of its peak)."""
    from fungpt.data import BatchLoader

    next_batch, calls = BatchLoader.next_batch, []

    def first_command_fails(self):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(3.0)  # (a slow start)
            raise FunGPTError("failed at its first step")
        return next_batch(self)

    monkeypatch.setattr(BatchLoader, "next_batch", first_command_fails)
    out = tmp_path / "run"
    cfg = tiny_config(corpus, out, max_iters=10**6, checkpoint_interval=10**6, eval_interval=10**6, eval_iters=1,
                      max_minutes=0.15, warmup_iters=50_000)
    with pytest.raises(FunGPTError, match="failed at its first step"):
        train(cfg, progress=False)
    assert ckpt.load_state(ckpt.find_checkpoint(out))["step"] == 0
    train(cfg, resume=True, progress=False)
    assert _lrs(out)[0] < 0.2 * cfg.train.lr, _lrs(out)[:3]


def test_a_resumed_compiled_budget_run_keeps_its_compile_out_of_the_schedule_too(corpus, tmp_path,
                                                                                  slow_first_compiled_step,
                                                                                  quick_steady_budget, monkeypatch):
    """A resume compiles again: counted as schedule time, its 2.5 s first step moved the lr a quarter of the
    schedule. Moved by the compile's time, the schedule's origin also rescaled the schedule time before it: resumed
    half-way through, the lr fell 16% of its peak in one step."""
    from fungpt.data import BatchLoader

    next_batch, slow = BatchLoader.next_batch, [True]

    def first_command_slow(self):  # (0.25 s steps: the first command ends half-way through the schedule)
        time.sleep(0.25 if slow[0] else 0.0)
        return next_batch(self)

    monkeypatch.setattr(BatchLoader, "next_batch", first_command_slow)
    out = tmp_path / "resumed"
    cfg = tiny_config(corpus, out, max_iters=20, checkpoint_interval=10**6, eval_interval=10**6, eval_iters=1,
                      max_minutes=0.3, compile=True)
    slow_first_compiled_step(cfg, progress=False)  # ends at max_iters, inside its budget
    saved = ckpt.load_state(ckpt.find_checkpoint(out))
    origin, after = saved["schedule_origin_s"], saved["after_step_s"]  # (after the step: its save, the plot)
    slow[0] = False
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=10**6))
    assert slow_first_compiled_step(more, resume=True, progress=False)["step"] > 25
    lrs = _lrs(out)[20:]  # the resumed command's steps
    assert 0.2 * cfg.train.lr < lrs[0] < 0.8 * cfg.train.lr, lrs[:3]  # (resumed well into the decay)
    assert abs(lrs[1] - lrs[0]) < 0.05 * cfg.train.lr, lrs[:3]
    # the checkpoint keeps the compile's own time out of the schedule (for a resume with a longer budget, which
    # plans from it): not the larger move that made this command's lr go on from where it was
    moved = ckpt.load_state(ckpt.find_checkpoint(out))["schedule_origin_s"] - origin
    # by the compile (2.5 s), the resumed command's start-up (together at most the time until its first row: a busy
    # machine's start-up took over a second, and a fixed bound of 3.5 s failed there) and the first command's time
    # after its step (its save and plot)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    first_resumed = next(r for r in rows if r["step"] == 21)
    assert 2.5 <= moved <= first_resumed["elapsed_s"] + after, (moved, first_resumed["elapsed_s"], after)


@pytest.mark.parametrize("origin, would_be", [(0.0, 0.0), (1.0, 2.0), (1.0, 20.0), (5.0, 30.0)])
def test_a_compiled_first_step_leaves_the_schedule_where_an_uncompiled_one_would(origin, would_be):
    """After a compile of 3 s, the schedule's fraction is what it would have been without it, and the rest of the
    schedule spreads over the time left. Adding the 3 s to the origin instead also stretched the time already
    used: a compile that began at 20 s of a 40 s schedule left it at 0.54 where it had been at 0.5 (at 30 s: 0.81,
    for 0.75): an lr jump in one step."""
    from fungpt.budget import continuous_origin

    end, delay = 40.0, 3.0

    def frac(t, o):
        return (t - o) / (end - o)

    new = continuous_origin(would_be, would_be + delay, origin, end)
    assert frac(would_be + delay, new) == pytest.approx(frac(would_be, origin), abs=1e-12)
    assert frac(end, new) == pytest.approx(1.0)  # the schedule still ends with the budget
    # a second later, the fraction has moved on by 1 s of the time left (end - now)
    left = end - (would_be + delay)
    assert frac(would_be + delay + 1.0, new) - frac(would_be + delay, new) == pytest.approx(
        (1.0 - frac(would_be, origin)) / left)


def test_a_compile_that_ends_past_the_schedule_moves_the_origin_by_its_time():
    """No schedule left to place (the compile ended past the schedule's end, or the end reserve has grown past
    the time now): the origin just moves by the delay, as before, and the run ends at its next check."""
    from fungpt.budget import continuous_origin

    assert continuous_origin(45.0, 48.0, 1.0, 40.0) == 4.0
    assert continuous_origin(5.0, 8.0, 50.0, 40.0) == 53.0
    # due to end before the schedule's end, the step ended after it: solved for, the origin was 1,000 s, past now
    assert continuous_origin(39.9, 42.4, 0.0, 40.0) == 2.5


def test_a_run_says_how_long_it_took_in_minutes_and_hours_past_a_minute():
    """The final line gave an hours-long run's time as "(7384.2 s)"."""
    from fungpt.budget import format_duration

    assert [format_duration(s) for s in (3.34, 59.94, 59.96, 61.2, 3599.4, 3599.6, 7384.2, 90061)] == [
        "3.3 s", "59.9 s", "1 min 00 s", "1 min 01 s", "59 min 59 s", "1 h 00 min", "2 h 03 min", "25 h 01 min"]


def test_a_budget_run_that_max_iters_ends_first_says_so(corpus, tmp_path, capsys):
    """max_iters (2,000 by default) still applies under a budget: a run that used half its budget ended without a
    word on why."""
    train(tiny_config(corpus, tmp_path / "run", max_iters=3, max_minutes=1.0), progress=False)
    assert re.search(r"fungpt: note: train.max_iters = 3 ended this run after [\d.]+ s of its 1 min 00 s budget "
                     r"\(train.max_minutes\); raise max_iters for a budget to end the run", capsys.readouterr().out)


def test_a_budget_too_short_for_one_step_is_refused_instead_of_overrun(corpus, tmp_path, monkeypatch):
    """A budget that the start-up and the final eval use up leaves no step: evaluating anyway overran it (a 6 x 384
    model on a 2-core CPU, given 1 minute, took 97 s). Here the final eval is made to need 20 s of a 6 s budget."""
    import sys

    train_mod = sys.modules["fungpt.train"]
    monkeypatch.setattr(train_mod, "estimate_eval_time", lambda *a, **k: 20.0)
    cfg = tiny_config(corpus, tmp_path / "short", max_iters=100, max_minutes=0.1)
    with pytest.raises(FunGPTError, match=r"max_minutes = 0.1 leaves no time to train here: .* about 2\d s more; "
                                          r"run again with max_minutes well above 0\.\d.*, grad_accum_steps or "
                                          r"eval_iters$"):
        train(cfg, progress=False)
    assert not (tmp_path / "short" / "metrics.jsonl").exists() or "val_loss" not in (
        tmp_path / "short" / "metrics.jsonl").read_text(encoding="utf-8")  # no final eval was run
    # run again as said (no --overwrite: the folder holds nothing trained), with time enough, it trains
    monkeypatch.setattr(train_mod, "estimate_eval_time", lambda *a, **k: 0.1)
    assert train(tiny_config(corpus, tmp_path / "short", max_iters=3, max_minutes=1.0), progress=False)["step"] == 3
    # the speedrun presets score the whole val split at the end: eval_iters changes nothing there (it was advised)
    monkeypatch.setattr(train_mod, "estimate_eval_time", lambda *a, **k: 20.0)
    with pytest.raises(FunGPTError, match=r"or train.eval_full_val = false \(the final eval then scores eval_iters "
                                          r"batches, not the whole val split\)$"):
        train(tiny_config(corpus, tmp_path / "full", max_iters=100, max_minutes=0.1, eval_full_val=True),
              progress=False)


def test_a_resumed_run_without_time_for_a_step_ends_with_a_note_not_an_error(corpus, tmp_path, capsys):
    """A run resumed with just too little budget left for a step (its own start-up used the rest) stops with a
    note, as one resumed after its budget does, and keeps its checkpoint: no error advising --overwrite."""
    from fungpt.budget import end_reserve

    out = tmp_path / "nearly"
    cfg = tiny_config(corpus, out, max_iters=5, max_minutes=1.0)
    train(cfg, progress=False)
    state = ckpt.load_state(ckpt.find_checkpoint(out))
    # just enough for the resume's own check (taken before this command's start-up is counted)
    left = state["elapsed_s"] + 2 * state["timings"]["step"] + end_reserve(state["timings"]) + 0.02
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=10**6, max_minutes=left / 60))
    rows = (out / "metrics.jsonl").read_text(encoding="utf-8")
    config = (out / "config.json").read_bytes()
    capsys.readouterr()
    assert train(more, resume=True, progress=False)["step"] == 5
    said = capsys.readouterr().out
    # this command's start-up counted at once: the check before it found the budget used, so the notes on the
    # steps to come (the lr schedule changed with max_minutes) and a config.json rewritten with the new budget,
    # for a run that trains nothing, are gone
    assert "already used its time budget" in said and "note" not in said, said
    assert (out / "metrics.jsonl").read_text(encoding="utf-8") == rows  # no eval, nothing written
    assert (out / "config.json").read_bytes() == config


def test_a_stalled_step_does_not_end_a_budget_run_early(corpus, tmp_path, monkeypatch, quick_steady_budget):
    """One step stalled by the machine (here 1.5 s) is not taken as the speed of every step to come.

    Planned with the last step's time, the run stopped right after the stall, 2 s before its budget ran out (two
    more steps of 1.5 s, it thought, would not fit), and the step after the stall ran at min_lr between two at
    the peak: the lr schedule's position also went back.
    """
    import time

    from fungpt.data import BatchLoader

    first_call, stalls = [], []
    next_batch = BatchLoader.next_batch

    def stalling(self):
        first_call.append(first_call[0] if first_call else time.time())
        if not stalls and time.time() - first_call[0] > 2.0:  # 2 s into training
            stalls.append(time.time())
            time.sleep(1.5)
        return next_batch(self)

    monkeypatch.setattr(BatchLoader, "next_batch", stalling)
    out = tmp_path / "stall"
    budget_s = 6.0
    cfg = tiny_config(corpus, out, max_iters=1_000_000, warmup_iters=10, lr_decay_iters=100,
                      checkpoint_interval=10**6, eval_interval=10**6, max_minutes=budget_s / 60)
    result = train(cfg, progress=False)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    stalled = next(r["step"] for r in rows if r.get("dt_ms", 0) > 1000)
    assert stalls and rows[-1]["step"] > stalled + 10  # it trained on after the stall ...
    assert result["elapsed_s"] > budget_s - 1.0  # ... until its budget was (nearly) used
    assert result["elapsed_s"] <= budget_s + 2.0
    lrs = [r["lr"] for r in rows if "lr" in r]
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # warmup, then ...
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # ... decay, never back up
    assert (lrs[-1] - cfg.train.min_lr) / (cfg.train.lr - cfg.train.min_lr) < 0.02  # to min_lr at the end


@pytest.mark.parametrize("stalled", ["save", "eval"])
def test_a_stalled_checkpoint_or_eval_does_not_end_a_budget_run_early(corpus, tmp_path, monkeypatch,
                                                                      quick_steady_budget, stalled):
    """A periodic checkpoint or eval stalled by the machine (an fsync waiting for the disk, here 1.5 s), after two
    that were not, is not taken as the time of the final ones: reserved twice for the two final checkpoints, one
    1.5 s save ended a run 3 s early, its lr a fifth of its schedule short of min_lr (a 24 s DDP budget in CI)."""
    train_module = sys.modules["fungpt.train"]  # (fungpt.train, the attribute, is the function)
    first_call, stalls = [], []
    real = {"save": ckpt.save_checkpoint, "eval": train_module.evaluate}[stalled]

    def stalling(*args, **kwargs):
        first_call.append(first_call[0] if first_call else time.time())
        if not stalls and time.time() - first_call[0] > 2.0:  # 2 s into training
            stalls.append(time.time())
            time.sleep(1.5)
        return real(*args, **kwargs)

    if stalled == "save":
        monkeypatch.setattr(ckpt, "save_checkpoint", stalling)
    else:
        monkeypatch.setattr(train_module, "evaluate", stalling)
    out = tmp_path / "stall"
    budget_s = 6.0
    cfg = tiny_config(corpus, out, max_iters=1_000_000, warmup_iters=10, lr_decay_iters=100, eval_iters=1,
                      checkpoint_interval=20 if stalled == "save" else 10**6,
                      eval_interval=20 if stalled == "eval" else 10**6, max_minutes=budget_s / 60)
    result = train(cfg, progress=False)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert stalls and result["elapsed_s"] > budget_s - 1.0  # it trained on until its budget was (nearly) used
    assert result["elapsed_s"] <= budget_s + 2.0
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert (lrs[-1] - cfg.train.min_lr) / (cfg.train.lr - cfg.train.min_lr) < 0.02  # to min_lr at the end


def test_a_budget_run_reserves_its_final_eval_from_the_step_0_estimate(corpus, tmp_path, monkeypatch,
                                                                        quick_steady_budget):
    """A budget run without periodic evals knows the final eval's time only from the estimate made at step 0 (one
    batch timed, scaled up): that estimate is what it reserves, or the final eval overruns the budget by its time.
    Here each eval takes 2.5 s more than its batches, and the estimate says so."""
    train_module = sys.modules["fungpt.train"]  # (fungpt.train, the attribute, is the function)
    real_evaluate, real_estimate = train_module.evaluate, train_module.estimate_eval_time

    def slow_evaluate(*args, **kwargs):
        time.sleep(2.5)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", slow_evaluate)
    monkeypatch.setattr(train_module, "estimate_eval_time", lambda *a, **k: 2.5 + real_estimate(*a, **k))
    budget_s = 7.0
    cfg = tiny_config(corpus, tmp_path / "run", max_iters=1_000_000, eval_iters=1, eval_interval=10**6,
                      checkpoint_interval=10**6, max_minutes=budget_s / 60)
    result = train(cfg, progress=False)
    assert budget_s - 2.0 < result["elapsed_s"] <= budget_s + 1.0  # (reserving nothing, it took 9.5 s)


def test_a_budget_run_has_decayed_its_lr_when_a_periodic_eval_ends_it(corpus, tmp_path, monkeypatch,
                                                                       quick_steady_budget):
    """The lr finishes its decay when the run is a few steps from its end; that forecast left out the eval (and
    its `best` checkpoint) the next step does. With each eval taking 0.6 s, the last step was one with an eval,
    taken short of min_lr (2.5-4% of the lr range above it in 6 runs of 6)."""
    train_module = sys.modules["fungpt.train"]
    real = train_module.evaluate

    def slow_eval(*args, **kwargs):
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", slow_eval)
    out = tmp_path / "slow-evals"
    cfg = tiny_config(corpus, out, max_iters=1_000_000, warmup_iters=10, lr_decay_iters=100, eval_iters=1,
                      eval_interval=20, checkpoint_interval=10**6, max_minutes=0.1)
    result = train(cfg, progress=False)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert result["step"] > 20 and result["elapsed_s"] <= 6.0 + 2.0
    assert (lrs[-1] - cfg.train.min_lr) / (cfg.train.lr - cfg.train.min_lr) < 0.02  # to min_lr at the end


def test_a_resumed_run_does_not_count_an_unmeasured_save_time_as_one(corpus, tmp_path, monkeypatch):
    """A command's first checkpoint records its save time as 0.0 (none measured yet). Resumed, that 0.0 counted as
    a third save beside two real ones, and the median reserved the shorter of them."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=2, checkpoint_interval=10**6), progress=False)  # one save: at the end
    assert ckpt.load_state(ckpt.find_checkpoint(out))["timings"]["save"] == 0.0
    real, delays = ckpt.save_checkpoint, [0.3, 0.6]  # the resumed command's first two saves; then none

    def slow_save(*args, **kwargs):
        time.sleep(delays.pop(0) if delays and args[1] == "latest" else 0.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", slow_save)
    more = tiny_config(corpus, out, max_iters=5, checkpoint_interval=1)
    train(more, resume=True, progress=False)  # saves at steps 3 and 4, then the final one at 5
    # the step-5 checkpoint holds the typical time of the two before it: the longer of 0.3 and 0.6 s, not 0.3 s
    assert ckpt.load_state(ckpt.find_checkpoint(out))["timings"]["save"] >= 0.6


def test_a_budget_run_times_its_plot_by_drawing_one(corpus, tmp_path, monkeypatch):
    """At step 0 there are no loss rows: the plot's timing ended at "nothing to plot yet", 5-20 ms, where the
    loss.png at the end took 125-200 ms (matplotlib's layout and PNG encoding), unreserved. Drawing made-up curves
    takes what drawing takes; here a PNG encoding slowed to 0.4 s."""
    from matplotlib.figure import Figure

    savefig, drawn = Figure.savefig, []

    def slow_savefig(self, *args, **kwargs):
        drawn.append(kwargs.get("format") or Path(args[0]).suffix)
        time.sleep(0.4)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", slow_savefig)
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=3, max_minutes=0.5), progress=False)
    state = ckpt.load_state(ckpt.find_checkpoint(out))
    assert state["timings"]["plot"] >= 0.4
    assert drawn == ["png", ".png"]  # the rehearsal in memory (no loss.png at step 0), then the real one
    assert (out / "loss.png").is_file()


def test_a_dry_run_leaves_the_callers_random_numbers_as_they_were(corpus, tmp_path):
    """The dry run builds and trains a model to time its steps; from a notebook, it also moved the seeded torch RNG
    that the user's next draws come from."""
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    plan.dry_run(tiny_config(corpus, tmp_path / "run"), timed_steps=1)
    assert torch.equal(torch.rand(3), expected)


def test_a_failed_trial_plot_is_named_as_such_and_the_run_goes_on(corpus, tmp_path, monkeypatch, capsys):
    """The step-0 timing draws no file: its failure said "could not draw loss.png", which the end then drew."""
    import fungpt.plot

    def broken():
        raise RuntimeError("no fonts\nhere")

    monkeypatch.setattr(fungpt.plot, "rehearse_plot", broken)
    out = tmp_path / "run"
    assert train(tiny_config(corpus, out, max_iters=3, max_minutes=0.5), progress=False)["step"] == 3
    assert capsys.readouterr().err == "fungpt: a trial drawing of the loss plot, to time it, failed (no fonts here)\n"
    assert (out / "loss.png").is_file()


def test_a_run_gives_the_process_its_own_matmul_choice_back(corpus, tmp_path, monkeypatch):
    """A run sets the CPU matmul library it was configured with; it stayed set, so a notebook's sampling after a
    run with cpu_matmul = "torch" used torch's products where a fresh process uses oneDNN."""
    from fungpt import linear

    used = []
    monkeypatch.setattr(sys.modules["fungpt.train"], "configure_optimizer",
                        lambda *a, real=sys.modules["fungpt.train"].configure_optimizer: used.append(
                            linear.cpu_matmul()) or real(*a))
    monkeypatch.setattr(linear, "_chosen", ["onednn"])  # the process's own choice
    train(tiny_config(corpus, tmp_path / "a", max_iters=1, cpu_matmul="torch"), progress=False)
    assert used == ["torch"] and linear.cpu_matmul() == "onednn"
    monkeypatch.setattr(linear, "_chosen", [])  # none made yet: the run's is not kept as the process's
    train(tiny_config(corpus, tmp_path / "b", max_iters=1, cpu_matmul="torch"), progress=False)
    assert linear._chosen == []


def test_a_best_checkpoint_saved_after_the_resumed_one_is_replaced_by_the_next_eval(corpus, tmp_path, capsys):
    """Killed (kill -9) between checkpoints, a run resumed from its step-10 checkpoint kept a `best` of step 15,
    from steps trained again: with another lr the new step 15 scored 4.44, and `--checkpoint best` still gave the
    old one (3.31), weights in no step of the run's history."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=4, eval_interval=2, checkpoint_interval=2), progress=False)
    best = ckpt.find_checkpoint(out, "best")
    state = ckpt.load_state(ckpt.find_checkpoint(out))
    # as a kill after a `best` of step 4 and before its `latest`: the step-2 checkpoint is the one resumed from
    ckpt.save_checkpoint(out, "latest", 2, _weights_of(ckpt.find_checkpoint(out)), state={**state, "step": 2})
    assert ckpt.folder_step(best) == 4 and ckpt.folder_step(ckpt.find_checkpoint(out)) == 2
    best_val = json.loads((best / ckpt.MANIFEST_FILE).read_text())["val_loss"]
    # lr 30: the resumed steps train far worse, and their eval still replaces the step-4 best
    more = tiny_config(corpus, out, max_iters=3, eval_interval=10**6, checkpoint_interval=10**6, lr=30.0)
    assert train(more, resume=True, progress=False)["val_loss"] > best_val
    assert ("the best checkpoint was saved at step 4, after this one: the next eval replaces it"
            in capsys.readouterr().out)
    assert ckpt.folder_step(ckpt.find_checkpoint(out, "best")) == 3
    assert [p.name for p in (out / "checkpoints").iterdir() if "best" in p.name] == ["best-0000003"]


def _weights_of(folder):
    from fungpt.config import load_run_config
    from fungpt.model import GPT

    model = GPT(load_run_config(folder.parent.parent).model)
    ckpt.load_weights(folder, model)
    return model


@pytest.mark.parametrize("stopped", [0, 2])
def test_the_step_0_eval_is_in_the_metrics_once(corpus, tmp_path, stopped):
    """max_iters = 0 evaluated step 0, then again as the final eval, and a resume from that step-0 checkpoint a
    third time: three rows for one eval."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=stopped, eval_interval=2), progress=False)
    train(tiny_config(corpus, out, max_iters=4, eval_interval=2), resume=True, progress=False)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4]


def test_a_newer_best_does_not_bring_back_the_step_0_eval(corpus, tmp_path):
    """Resumed from a step-0 checkpoint with a `best` of a later step (killed after it), the reset best_val was
    taken as "step 0 not evaluated yet": the step-0 eval ran, and was written, again."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, max_iters=0, eval_interval=2), progress=False)
    ckpt.save_checkpoint(out, "best", 2, _weights_of(ckpt.find_checkpoint(out)), extra={"val_loss": 1.0})
    train(tiny_config(corpus, out, max_iters=2, eval_interval=2), resume=True, progress=False)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2]
