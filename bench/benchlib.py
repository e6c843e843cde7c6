"""What the bench scripts share: describing the machine, printing a result block and appending it to BENCHMARKS.md."""

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
"""The checkout these scripts belong to: its fungpt is the one they measure."""
# (run as `python bench/x.py`, Python puts bench/ first on the path, and `import fungpt` took whichever fungpt is
# installed: in a second clone sharing a virtual environment, the other clone's code was measured)
sys.path.insert(1, str(ROOT))


def run_env() -> dict[str, str]:
    """The environment of the commands a bench script runs: this checkout first on PYTHONPATH (as for the script
    itself, above), and ../shared/data as FUNGPT_DATA_DIR unless one is set."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.setdefault("FUNGPT_DATA_DIR", str(ANCHORS.parent / "data"))
    return env


def commit() -> str:
    """The checkout's commit, with "+ changes" when tracked files differ from it ("unknown" outside git); not for
    BENCHMARKS.md alone, which a session edits while it measures."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":!BENCHMARKS.md"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + changes" if changed else "")


def cpu_model() -> str:
    """The CPU's model name (Linux: from /proc/cpuinfo), else what platform knows; with its family and model
    numbers where known. A cloud host often names only "AMD EPYC", and two generations of it (family 25: Zen 3
    or Zen 4; family 26: Zen 5) gave ratios that differ by 1.4x (BENCHMARKS.md, "Fifteenth session")."""
    from fungpt.hardware import cpu_info

    name = cpu_info("model name") or platform.processor() or platform.machine() or "unknown CPU"
    family, model = cpu_info("cpu family"), cpu_info("model")
    return f"{name} (family {family}, model {model})" if family and model else name


def machine() -> str:
    """One line for a result block: CPU, cores, torch threads, the kernels torch runs, torch version, and the
    commit of FunGPT that ran."""
    return (f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{torch.backends.cpu.get_cpu_capability()} kernels, torch {torch.__version__}, FunGPT at {commit()}")


def memory_read_gbs(mbytes: int = 64) -> float:
    """How fast this machine reads memory right now: GB/s of a plain sum over a buffer twice the size of
    a typical L3 cache (best of 5). A probe of the machine's state: on a shared host other tenants' memory
    traffic halves it at times (BENCHMARKS.md, "Sixth session"), and memory-bound work slows with it."""
    x = torch.ones(mbytes * 2**20 // 4)
    x.sum()  # fault the pages in
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def cpu_times() -> list[int] | None:
    """The machine's cumulative CPU times from /proc/stat (Linux), for cpu_steal; None elsewhere."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None


def cpu_steal(before: list[int] | None, after: list[int] | None) -> str:
    """The share of CPU time the hypervisor gave to other guests between two cpu_times() ("steal")."""
    if not before or not after or len(before) < 8:
        return "unknown"
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta[:8])  # user nice system idle iowait irq softirq steal
    return f"{delta[7] / total:.1%}" if total else "unknown"


def machine_state(read_gbs: list[float], when: str, steal_from: list[int] | None) -> str:
    """The phrase a result block gives for the machine's state: memory_read_gbs probes taken `when` (e.g.
    "at each round's start") and the CPU time stolen by the host since cpu_times() returned steal_from."""
    return (f"memory read (`benchlib.memory_read_gbs`) {when}: {', '.join(f'{g:.0f}' for g in read_gbs)} GB/s; "
            f"CPU time stolen by the host meanwhile: {cpu_steal(steal_from, cpu_times())}")


ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "anchors"
"""nanoGPT's files and its CPU runner, in the shared folder beside the checkout (as CI has it)."""


def command(script: str, argv: list[str] | None) -> str:
    """The command line that ran a bench script, quoted so that it can be pasted and run again."""
    return shlex.join(["python", f"bench/{script}", *(sys.argv[1:] if argv is None else argv)])


def check_append(ap, append: Path | None) -> None:
    """Refuse an --append file that cannot be written before measuring, not after (ap: the ArgumentParser)."""
    if append is None:
        return
    try:
        with Path(append).open("a", encoding="utf-8"):
            pass
    except OSError as e:
        ap.error(f"--append {append}: {e.strerror or e}")


def publish(text: str, append: Path | None) -> None:
    """Print a Markdown result block; with --append FILE, also add it to the end of that file (BENCHMARKS.md
    is newest first: move the block under the session's heading)."""
    print(text)
    if append:
        append_text(Path(append), "\n" + text)


def append_text(path: Path, text: str) -> None:
    """Add `text` to the end of `path`, whole or not at all: a write that fails partway (a full disk) is cut off
    again, and said in one line (the results were printed above), instead of leaving half a block in the file."""
    data = text.encode("utf-8")
    try:
        # unbuffered bytes: a failed write is seen where it happens, and nothing is left in a buffer to be flushed
        # (and to fail again) before the file can be cut back
        with path.open("ab", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            try:
                written = 0
                while written < len(data):
                    written += f.write(data[written:])
            except OSError:
                os.ftruncate(f.fileno(), size)
                raise
    except OSError as e:
        raise SystemExit(f"could not append to {path}: {e.strerror or e}; the results above were not saved") from None
