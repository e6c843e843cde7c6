"""The `fungpt` command and its signals: Ctrl-C while it is still starting, and SIGTERM or SIGHUP while it works.

Ctrl-C while the `fungpt` command is still starting: one line, not a traceback from inside torch.

Importing torch takes a second or two, all of it before `cli.main()` can catch KeyboardInterrupt. So when
this process is the `fungpt` command itself (the console script, or `python -m fungpt` as torchrun starts
it), `fungpt/__init__.py` first installs a SIGINT handler that ends the process at once with the usual
"fungpt: interrupted" and status 130 (SIGTERM and SIGHUP likewise: "fungpt: stopped by SIGTERM", 143); nothing
has been written yet. `cli.main()` puts Python's own handler
back as soon as it runs. Imported as a library (`from fungpt import GPT`, pytest), nothing changes.

A package missing from a broken install (numpy, tqdm, tyro, torch: imported with fungpt itself) likewise ends
the command during its imports with one line naming what to pip install (`missing_module`), not a traceback;
cli.main() says the same of the packages a command imports later (matplotlib, tokenizers).

SIGTERM (`kill`, `timeout`, a job scheduler) and SIGHUP (a closed terminal) end a process at once by default,
without running the clean-ups that Ctrl-C's KeyboardInterrupt runs: a half-prepared dataset or half-written
export folder was left behind. While a command runs, `stop_signals_raise` turns them into `Stopped`, a
KeyboardInterrupt, so the same clean-ups run; cli.main() then says which signal stopped it. Training's own
handler (stopping.StopFlag: save the step, then stop) replaces this one while it trains.
"""

import os
import signal
import sys
import threading
from collections.abc import Callable


def is_the_fungpt_command(argv: list[str]) -> bool:
    """Whether argv, the interpreter's original command line (sys.orig_argv), runs the fungpt command:
    `.../fungpt ...` (the console script), `python [options] .../fungpt ...` (torchrun's workers) or
    `python [options] -m fungpt ...`. (Importing fungpt installs the quick Ctrl-C handler only then.)"""
    if not argv:
        return False
    scripts = ("fungpt", "fungpt.exe", "fungpt-script.py")
    if os.path.basename(argv[0]).lower() in scripts:
        return True
    # python [options] -m fungpt ..., or python [options] .../bin/fungpt ... (torchrun runs its workers as
    # `python -u SCRIPT`; Windows: pip's launcher runs python ...\Scripts\fungpt.exe ...)
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            script = argv[i + 1] if arg == "--" and i + 1 < len(argv) else arg
            return os.path.basename(script).lower() in scripts
        if arg in ("-X", "-W", "--check-hash-based-pycs"):  # an option whose value is the next argument
            i += 2
            continue
        if arg.startswith("--"):
            i += 1
            continue
        flags = arg[1:]  # one or more one-letter flags (-u, -uB), the last of which may take a value: -m, -c, -X, -W
        step = 1
        for j, flag in enumerate(flags):
            if flag in "mc":
                value = flags[j + 1:] or (argv[i + 1] if i + 1 < len(argv) else "")
                return flag == "m" and value == "fungpt"
            if flag in "XW":  # its value attached (-Xdev, -uWerror), or the next argument (-uX dev)
                step = 1 if flags[j + 1:] else 2
                break
        i += step
    return False


# Import names whose package is installed by another name (a missing package's advice names what to pip install)
PIP_NAMES = {"PIL": "pillow", "dateutil": "python-dateutil", "yaml": "pyyaml", "google": "protobuf"}


def missing_module(e: ModuleNotFoundError, command: str = "") -> str | None:
    """What to say of a module that could not be imported, or None for one of FunGPT's own (a bug: its traceback).

    command: the fungpt command that needs it, "" while fungpt itself is being imported."""
    import importlib.metadata
    import importlib.util

    top = (e.name or "").partition(".")[0]
    if not top or top == "fungpt":
        return None
    who = f"fungpt {command}" if command else "fungpt"
    if top in getattr(sys, "stdlib_module_names", ()):  # (_lzma, _ctypes: left out when Python was built)
        return (f"this Python was built without its module {e.name}, which {who} needs: use a Python "
                f"that has it (a python.org or distribution build)")
    pip = PIP_NAMES.get(top, top)
    try:
        spec = importlib.util.find_spec(top)
        installed = spec is not None and spec.origin is not None  # (a namespace package, a bare folder: no origin)
        version = importlib.metadata.version(pip)
    except Exception:  # noqa: BLE001 - a broken import hook, no such distribution: taken as not installed
        installed = False
    if not installed:
        return f"the Python package {pip} is not installed, and {who} needs it: pip install {pip}"
    return (f"the Python package {pip} is installed, but its module {e.name} is missing: reinstall it "
            f"(pip install --force-reinstall --no-deps {pip}=={version})")


def rank_prefix() -> str:
    """' (rank N)' under torchrun (which sets RANK), for an error line that every process may print; else ''."""
    rank = os.environ.get("RANK", "")
    return f" (rank {rank})" if rank.isdigit() and rank != "0" else ""


_python_excepthook = None  # sys.excepthook before install() wrapped it, while fungpt's imports run


def _report_missing_module(kind, value, tb) -> None:
    """sys.excepthook while the fungpt command imports fungpt: a missing package is one line and status 2."""
    said = missing_module(value) if isinstance(value, ModuleNotFoundError) else None
    if said is None:
        return _python_excepthook(kind, value, tb)
    print(f"error{rank_prefix()}: {said}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(2)  # (as cli.main() returns for a missing package; Python would exit with 1)


def quit_at_once(signum, frame) -> None:
    """Ctrl-C, SIGTERM or SIGHUP while the command is still starting: one line, and the shell's status for it."""
    said = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    os.write(2, f"\nfungpt: {said}\n".encode())
    os._exit(128 + signum)


EARLY_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # (SIGHUP: not on Windows)
_DEFAULT = {"SIGINT": signal.default_int_handler, "SIGTERM": signal.SIG_DFL, "SIGHUP": signal.SIG_DFL}


def install() -> None:
    """Called first thing by fungpt/__init__.py."""
    if not is_the_fungpt_command(getattr(sys, "orig_argv", sys.argv)):
        return
    global _python_excepthook
    for name in EARLY_SIGNALS:  # (only from the default: a signal the caller ignores stays ignored)
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is _DEFAULT[name]:
            signal.signal(signum, quit_at_once)
    if sys.excepthook is not _report_missing_module:
        _python_excepthook, sys.excepthook = sys.excepthook, _report_missing_module
    try:
        os.getcwd()
    except FileNotFoundError:  # (torch's import then died with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so")
        print("error: the current folder no longer exists (deleted or moved): cd into a folder that exists and run "
              "the command again", file=sys.stderr)
        os._exit(2)


def restore() -> None:
    """Called by cli.main(): from here on Ctrl-C is a KeyboardInterrupt again, which main() handles (and a missing
    package too)."""
    for name in EARLY_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is quit_at_once:
            signal.signal(signum, _DEFAULT[name])
    if sys.excepthook is _report_missing_module:
        sys.excepthook = _python_excepthook


class Stopped(KeyboardInterrupt):
    """The command was stopped by SIGTERM or SIGHUP (signum): raised where it was, like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


def stop_signals_raise() -> Callable[[], None]:
    """From now on SIGTERM and SIGHUP raise Stopped, where they are not ignored (nohup) or already handled.

    Returns the function that puts the previous handlers back (calling it again does nothing).
    """
    old = {}
    if threading.current_thread() is threading.main_thread():  # (signal handlers can only be set there)
        for name in ("SIGTERM", "SIGHUP"):  # (Windows has no SIGHUP)
            signum = getattr(signal, name, None)
            if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
                old[signum] = signal.signal(signum, raise_stopped)

    def restore() -> None:
        while old:
            signum, handler = old.popitem()
            signal.signal(signum, handler)

    return restore
