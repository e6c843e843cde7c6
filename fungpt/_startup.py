"""The `fungpt` command and its signals: Ctrl-C while it is still starting, and SIGTERM or SIGHUP while it works.

Ctrl-C while the `fungpt` command is still starting: one line, not a traceback from inside torch.

Importing torch takes a second or two, all of it before `cli.main()` can catch KeyboardInterrupt. So when
this process is the `fungpt` command itself (the console script, or `python -m fungpt` as torchrun starts
it), `fungpt/__init__.py` first installs a SIGINT handler that ends the process at once with the usual
"fungpt: interrupted" and status 130; nothing has been written yet. `cli.main()` puts Python's own handler
back as soon as it runs. Imported as a library (`from fungpt import GPT`, pytest), nothing changes.

SIGTERM (`kill`, `timeout`, a job scheduler) and SIGHUP (a closed terminal) end a process at once by default,
without running the clean-ups that Ctrl-C's KeyboardInterrupt runs: a half-prepared dataset or half-written
export folder was left behind. While a command runs, `stop_signals_raise` turns them into `Stopped`, a
KeyboardInterrupt, so the same clean-ups run; cli.main() then says which signal stopped it. Training's own
handler (train._StopFlag: save the step, then stop) replaces this one while it trains.
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


def quit_at_once(signum, frame) -> None:
    os.write(2, b"\nfungpt: interrupted\n")
    os._exit(130)


def install() -> None:
    """Called first thing by fungpt/__init__.py."""
    if not is_the_fungpt_command(getattr(sys, "orig_argv", sys.argv)):
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, quit_at_once)
    try:
        os.getcwd()
    except FileNotFoundError:  # (torch's import then died with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so")
        print("error: the current folder no longer exists (deleted or moved): cd into a folder that exists and run "
              "the command again", file=sys.stderr)
        os._exit(2)


def restore() -> None:
    """Called by cli.main(): from here on Ctrl-C is a KeyboardInterrupt again, which main() handles."""
    if signal.getsignal(signal.SIGINT) is quit_at_once:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
