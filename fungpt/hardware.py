"""Choosing the device and the numeric precision, as plain functions of what the machine can do.

The choice logic takes the machine's capabilities as arguments (rather than asking torch
itself), so every row of the decision table can be tested on any machine.

Precision, in short:
  * float32 everywhere works, and is the default on CPUs (nanoGPT's arithmetic there). bfloat16 autocast
    did worse on every CPU measured: slower than float32, or (on a Zen 4: 1.09x float32's speed) slower than
    bfloat16 products in the Linear layers alone (1.25x; BENCHMARKS.md, "Thirty-first session"). Without bf16
    instructions the products are emulated (17x slower on a 2-core x86 CPU, in the measurements the performance
    issue, #11, was filed with; not
    re-measured in BENCHMARKS.md, whose machines have bf16 instructions); even on a Zen 5, whose
    AVX512-BF16 products run ~1.8x float32's speed, a step took 43.3 against 29.8 ms, lost to the casts
    and to elementwise work in bfloat16 (BENCHMARKS.md, eighth session). So dtype "bfloat16" on a CPU
    is no autocast: only the Linear layers' products run in bfloat16 (linear.bfloat16_products), about
    1.3x float32's step on a Zen 4 (BENCHMARKS.md, thirty-first session).
  * bfloat16 autocast on GPUs that support it (NVIDIA Ampere and newer): same exponent range
    as fp32, so no loss scaling is needed, and about twice the matmul speed.
  * float16 autocast on older NVIDIA GPUs (T4, V100): fast, but its small range makes small
    gradients underflow to zero, so the loss is multiplied by a large factor before backward
    and the gradients divided again before the step (`torch.amp.GradScaler`); steps whose
    gradients overflowed to inf are skipped and the factor lowered. (torch.cuda.is_bf16_supported()
    says yes on these GPUs too, where bfloat16 is only emulated, slowly: see cuda_has_bf16.) With
    Muon, which cannot work with loss scaling, such GPUs train in float32.
  * MPS (Apple GPUs) stays float32 by default: reduced-precision autocast there is less mature.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fungpt.errors import FunGPTError


@dataclass(frozen=True)
class Precision:
    device: str  # "cpu", "cuda", "mps"
    dtype: str  # "float32", "bfloat16", "float16"
    reason: str  # one line for the user: what was chosen and why

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def cpu_bf16_products(self) -> bool:
        """bfloat16 on a CPU: the Linear layers' products in bfloat16, the rest float32 (linear.bfloat16_products)."""
        return self.device == "cpu" and self.dtype == "bfloat16"

    @property
    def autocast(self) -> bool:
        """Whether torch's autocast runs the forward pass (reduced precision on a GPU, float16 on a CPU)."""
        return self.dtype != "float32" and not self.cpu_bf16_products

    def context(self) -> contextlib.AbstractContextManager:
        """What a forward pass runs inside, in this precision: autocast, bfloat16 products, or nothing."""
        if self.cpu_bf16_products:
            from fungpt.linear import bfloat16_products  # (linear.py imports this module)

            return bfloat16_products()
        if self.autocast:
            return torch.autocast(device_type=self.device, dtype=self.torch_dtype)
        return contextlib.nullcontext()

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == "float16"


# The torch that first runs each half precision on an Apple GPU: autocast to bfloat16 there came with 2.6 (2.5's
# autocast knew float16 only, and turned bfloat16 off with a warning); float16 also needs GradScaler, whose MPS
# kernels came with 2.8 (before, its unscaling cast to float64, which MPS lacks)
MPS_MIN_TORCH = {"bfloat16": (2, 6), "float16": (2, 8)}


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch: a pre-release such as NVIDIA's 2.8.0a0+... counts as 2.8."""
    major, minor = (int(n) for n in re.findall(r"\d+", torch.__version__)[:2])
    return major, minor


def choose_precision(device: str, dtype: str, *, cuda: bool, mps: bool, cuda_bf16: bool,
                     optimizer: str = "adamw", cpu_bf16: bool | None = None) -> Precision:
    """Resolve "auto" device and dtype given the machine's capabilities.

    cuda / mps: whether those backends are available; cuda_bf16: whether the GPU computes in bfloat16 natively;
    cpu_bf16: whether the CPU has bfloat16 instructions (None: unknown, off Linux);
    optimizer: the run's (Muon cannot work with float16 loss scaling). Asking for something the machine lacks
    is a FunGPTError.
    """
    why = []
    if device not in ("auto", "cpu", "cuda", "mps"):  # e.g. "cuda:0", "tpu": torch would fail later, less clearly
        raise FunGPTError(f"device {device!r} is not one FunGPT runs on: choose auto, cpu, cuda or mps "
                          f"(for one GPU of several, set CUDA_VISIBLE_DEVICES)")
    if device == "auto":
        device = "cuda" if cuda else "mps" if mps else "cpu"
        found = "a CUDA GPU is available" if cuda else "Apple MPS is available" if mps else "no GPU found"
        why.append(f"device {device} (auto: {found})")
    else:
        if device == "cuda" and not cuda:
            raise FunGPTError("device 'cuda' was asked for, but no CUDA GPU is available here (is the CUDA build of "
                              "torch installed?); use the device 'auto' or 'cpu' (train.device for training, --device "
                              "for the other commands)")
        if device == "mps" and not mps:
            raise FunGPTError("device 'mps' was asked for, but Apple's MPS backend is not available here; "
                              "use 'auto' or 'cpu'")
        why.append(f"device {device} (as configured)")

    if dtype == "auto":
        if device == "cuda" and cuda_bf16:
            dtype = "bfloat16"
            why.append("bfloat16 autocast (the GPU supports it)")
        elif device == "cuda" and optimizer != "muon":
            dtype = "float16"
            why.append("float16 autocast with loss scaling (this GPU has no native bfloat16)")
        elif device == "cuda":
            dtype = "float32"
            why.append("float32 (this GPU has no native bfloat16, and Muon does not work with float16 loss scaling)")
        else:
            dtype = "float32"
            why.append("float32 (the safe default on MPS)" if device != "cpu" else
                       "float32 (nanoGPT's arithmetic; this CPU has bfloat16 instructions: train.dtype = 'bfloat16' "
                       "runs the Linear layers' products faster)" if cpu_bf16 else
                       "float32 (reduced precision is slow on CPUs without bfloat16 instructions)" if cpu_bf16 is False
                       else "float32 (the default on CPUs)")
    else:
        if dtype == "float16" and optimizer == "muon":  # (here, so training, --dry-run and inspect all refuse it)
            raise FunGPTError("train.optimizer = 'muon' does not support float16 loss scaling: use train.dtype = "
                              "'bfloat16' or 'float32'")
        emulated = dtype == "bfloat16" and device == "cuda" and not cuda_bf16
        if dtype == "bfloat16" and device == "cpu":
            why.append("bfloat16 products in the Linear layers, the rest float32 (as configured" + (
                "; this CPU has no bfloat16 instructions: slower than float32 here)" if cpu_bf16 is False else ")"))
        elif dtype == "float16" and device == "cpu":  # (1.5x slower than float32 on the AMX Xeon of BENCHMARKS.md)
            why.append("float16 autocast with loss scaling (as configured; on a CPU it is slower than float32, and "
                       "bfloat16 is the half precision with fast products there)")
        else:
            native = "float16 is native here" if optimizer != "muon" else "float32 is faster, and Muon refuses float16"
            why.append(f"{dtype} (as configured" + (f"; this GPU only emulates it, slowly: {native})" if emulated
                                                    else ")"))
    return Precision(device=device, dtype=dtype, reason=", ".join(why))


def detect_precision(device: str, dtype: str, optimizer: str = "adamw") -> Precision:
    """`choose_precision` with the capabilities of this machine."""
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    prec = choose_precision(device, dtype, cuda=cuda, mps=mps, cuda_bf16=cuda and cuda_has_bf16(),
                            optimizer=optimizer, cpu_bf16=cpu_has_bf16())
    # (this torch's, not the machine's: `fungpt inspect` of a Mac's config elsewhere estimates with choose_precision)
    if prec.device == "mps" and prec.dtype in MPS_MIN_TORCH and torch_version() < MPS_MIN_TORCH[prec.dtype]:
        need = ".".join(map(str, MPS_MIN_TORCH[prec.dtype]))
        raise FunGPTError(f"train.dtype = {prec.dtype!r} on an Apple GPU needs torch {need} or newer, this is "
                          f"{torch.__version__}: pip install -U torch, or use train.dtype = 'float32'")
    return prec


def cpu_has_bf16() -> bool | None:
    """Whether the CPU has bfloat16 instructions (AVX512-BF16, or Intel's AMX); None where /proc/cpuinfo is not."""
    flags = cpu_info("flags").split()
    return bool({"avx512_bf16", "amx_bf16"} & set(flags)) if flags else None


@contextlib.contextmanager
def tf32_products() -> Iterator[None]:
    """CUDA float32 matrix products in TF32 while inside: float32's range with a 10-bit mantissa (float16's
    precision, ~1e-3 relative) at tensor-core speed, fine for training. A process-wide setting: the caller's
    own comes back on leaving. (The model has no convolutions, so cuDNN's setting is left alone.)"""
    matmul = torch.backends.cuda.matmul
    # torch 2.9+ has a new setting, fp32_precision, and refuses to read the old allow_tf32 once a program has
    # used the new one; the new one reads fine whichever the program used
    name, on = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    kept = getattr(matmul, name)
    setattr(matmul, name, on)
    try:
        yield
    finally:
        setattr(matmul, name, kept)


@contextlib.contextmanager
def float32_default() -> Iterator[None]:
    """torch's default dtype float32 while inside, as in a fresh process; the caller's comes back on leaving. A
    notebook's torch.set_default_dtype(torch.float64) made train() build a float64 model (while it said, and
    run.json recorded, float32, and oneDNN's products need float32 weights). A process-wide setting, which other
    threads see: fit for train(), one run at a time in a process."""
    kept = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(kept)


def cuda_has_bf16() -> bool:
    """Whether the GPU computes in bfloat16 natively (NVIDIA Ampere, sm_80, and newer).

    torch.cuda.is_bf16_supported() alone also says yes where bfloat16 is only emulated (T4, V100, RTX 20xx),
    slowly, and where torch.compile's kernels cannot use it: float16 with loss scaling is the choice there.
    """
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch, whose answer counted no emulation
        return torch.cuda.is_bf16_supported()


def check_compile(device: str, *, platform: str | None = None, has_triton: bool | None = None,
                  cxx: str | None = "detect", capability: tuple[int, int] | None = None) -> None:
    """Refuse `compile = true` with one clear line where torch.compile cannot work.

    torch.compile's default backend (inductor) writes new kernels and compiles them: on NVIDIA GPUs
    with Triton (a separate package, Linux only in practice), on CPUs as C++ with the system's
    compiler. On Apple MPS it is still experimental. Nothing in FunGPT needs Triton otherwise.
    Triton compiles for NVIDIA GPUs of compute capability 7.0 and newer: on a Pascal GPU (GTX 10xx, P100) inductor
    raised at the first step. The capabilities are arguments so every case can be tested; by default they are
    detected (`capability`: the GPU's, (major, minor)).
    """
    import importlib.util
    import sys

    platform = sys.platform if platform is None else platform
    if capability is None and device == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
    if has_triton is None:
        has_triton = importlib.util.find_spec("triton") is not None
    fix = "set train.compile = false (training works the same, uncompiled)"
    if cxx == "detect" and device == "cpu" and platform != "win32":
        cxx = _torch_cpp_compiler(fix)
    if platform == "win32":
        raise FunGPTError(f"train.compile = true is not supported on Windows here (torch.compile needs Triton "
                          f"for GPUs and a configured C++ toolchain for CPUs); {fix}")
    if device == "mps":
        raise FunGPTError(f"train.compile = true is not supported on Apple MPS (torch.compile is experimental "
                          f"there); {fix}")
    if device == "cuda" and capability is not None and tuple(capability) < (7, 0):  # (first: triton cannot help)
        raise FunGPTError(f"train.compile = true on a CUDA GPU needs compute capability 7.0 or newer (Triton's "
                          f"floor), and this GPU's is {capability[0]}.{capability[1]}; {fix}")
    if device == "cuda" and not has_triton:
        raise FunGPTError(f"train.compile = true on a CUDA GPU needs the triton package, which is not installed: "
                          f"pip install triton, or {fix}")
    if device == "cpu" and cxx is None:
        raise FunGPTError(f"train.compile = true on the CPU needs a C++ compiler (torch.compile builds C++ "
                          f"kernels), and torch found none (it looks for g++, or the compiler $CXX names): install "
                          f"g++, or set CXX=clang++ where clang is installed, or {fix}")


def _torch_cpp_compiler(fix: str) -> str | None:
    """The C++ compiler torch.compile will use on the CPU ($CXX when set, else g++), as torch itself finds it; None
    when there is none. A $CXX that does not work (a stale one) is refused here: looking
    for g++ on PATH instead passed it, and the run failed at its first step with a 100-line traceback."""
    import os
    import shutil

    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # (torch's own choice; a private module)
    except ImportError:  # (another torch version): the compilers torch looks for, on PATH
        return next((c for c in ("c++", "g++", "clang++", "cl") if shutil.which(c)), None)
    try:
        return get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - (torch._inductor.exc, imported only here)
        # (none found, or $CXX does not run; or cannot be run at all: a folder, a file not executable)
        if type(e).__name__ != "InvalidCxxCompiler" and not isinstance(e, OSError):
            raise
        if "CXX" in os.environ:  # (set, if empty: torch runs it as it is, and "" cannot run)
            raise FunGPTError(f"train.compile = true on the CPU compiles C++ with $CXX = {os.environ['CXX']}, which "
                              f"does not run: point CXX at a working compiler (or unset it), or {fix}") from None
        return None


def compile_failure(e: BaseException) -> str | None:
    """The one line to say for an error raised by torch.compile itself (its C++ or Triton toolchain failed at the
    first compiled step: a compiler without Python's headers, a full disk in its cache), or None for any other."""
    # (the toolchain's errors only: an error in the model's own code, which dynamo reports as TorchRuntimeError while
    # it traces, is the same uncompiled, and is left as it is)
    toolchain = ("BackendCompilerFailed", "InductorError", "CppCompileError", "InvalidCxxCompiler", "CUDACompileError",
                 "GPUTooOldForTriton", "TritonMissing")
    if not ((type(e).__module__ or "").startswith("torch._") and type(e).__name__ in toolchain):
        return None
    # (BackendCompilerFailed's own first line is "backend='inductor' raised:": the cause is the error it wraps)
    inner = getattr(e, "inner_exception", None)
    said = f"{type(inner).__name__}: {inner}" if isinstance(inner, BaseException) else str(e)
    first = next((line.strip() for line in said.splitlines() if line.strip()), type(e).__name__)
    cause = type(inner if isinstance(inner, BaseException) else e).__name__
    mend = {"GPUTooOldForTriton": "", "TritonMissing": ", or reinstall triton"}.get(cause, ", or mend the compiler")
    return (f"torch.compile failed ({first[:200]}); set train.compile = false (training works the same, "
            f"uncompiled){mend}")


def cpu_info(field: str) -> str:
    """A field of Linux's /proc/cpuinfo for the first CPU, e.g. "vendor_id" or "model name"; "" if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


# glibc mallopt() parameter numbers (from <malloc.h>)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    A CPU training step allocates and frees the same few-MB activation tensors every step. By
    default glibc serves large blocks with fresh mmap()s and unmaps them on free, and trims freed
    memory at the top of its heap back to the OS (both thresholds start at 128 KiB and adapt only
    part of the way), so each step page-faults its activations back in from zeroed pages. Raising
    the thresholds lets freed blocks be reused (measured on the speedrun shape: 2,178 -> 0.3 page
    faults per step, 149 -> 128 ms per step; BENCHMARKS.md). The cost: the process keeps its peak
    memory until it exits. Returns False (and changes nothing) off glibc, e.g. on macOS.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    one_gib = 1 << 30
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_THRESHOLD, one_gib), (_M_TRIM_THRESHOLD, one_gib), (_M_TOP_PAD, 64 << 20)))


def sync(device: str) -> None:
    """Wait for the device's queued work. `device` may name an index ("cuda:0", as training passes it): compared
    with "cuda" alone, no GPU run ever waited, so its ceiling was the launch speed (13x an H200's real one)."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()
