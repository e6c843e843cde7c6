"""What the bench scripts share: describing the machine, printing a result block and appending it to BENCHMARKS.md."""

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux: from /proc/cpuinfo), else what platform knows."""
    from fungpt.hardware import cpu_info

    return cpu_info("model name") or platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    """One line for a result block: CPU, cores, torch threads, the kernels torch runs, torch version."""
    return (f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{torch.backends.cpu.get_cpu_capability()} kernels, torch {torch.__version__}")


def publish(text: str, append: Path | None) -> None:
    """Print a Markdown result block; with --append FILE, also add it to the end of that file."""
    print(text)
    if append:
        with Path(append).open("a", encoding="utf-8") as f:
            f.write("\n" + text)
