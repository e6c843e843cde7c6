"""How a training run stops cleanly: Ctrl-C, SIGTERM or a closed terminal set a flag that the loop reads between
steps (the step is finished and saved, then the run ends); a console output that fails (a terminal hung up, a pipe
whose reader left, a full disk) stops it the same way."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import sys
from collections.abc import Callable
from typing import Any

from fungpt._startup import raise_stopped

# The signals that stop a run cleanly: Ctrl-C, `kill` (and what schedulers, systemd and `docker stop` send),
# and a closed terminal. Each one's default would end the process at once, losing the steps since the last save.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopFlag:
    """Ctrl-C (or SIGTERM, SIGHUP) sets a flag; the loop saves a checkpoint at the end of the step and exits
    cleanly. A second one interrupts at once (the last saved checkpoint is still intact).

    A signal that is ignored (a background job's SIGINT, `nohup`'s SIGHUP) stays ignored, and a SIGTERM or
    SIGHUP handler of the program that calls train() is left alone; `announce` is False on all but one
    process of a torchrun job, so that the notice is printed once. In a job of several processes the save needs
    them all: torchrun also sends SIGTERM when one of them has died, and then the step cannot be finished.
    """

    def __init__(self, announce: bool = True, processes: int = 1) -> None:
        self.stop = False
        self.signum: int | None = None  # the first signal received
        self.doing = "finishing this step"  # what a first signal's notice says happens now (see `evaluating`)
        self.announce = announce
        self.processes = processes
        self.hung_up = False  # stopped by a write that failed as the terminal hung up (its SIGHUP may follow)
        self.output_failed: str | None = None  # why the console's output could not be written (a full disk)
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading_is_main():
            for signum in STOP_SIGNALS:
                old = signal.getsignal(signum)
                # (_startup.raise_stopped: the fungpt command's own, which would stop the run without its save)
                if old is signal.SIG_IGN or (signum != signal.SIGINT and old not in (signal.SIG_DFL, raise_stopped)):
                    continue
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            silence_terminal()  # its terminal is gone: writing there would fail (EIO) before the save
        if self.stop:
            if self.hung_up and signum == getattr(signal, "SIGHUP", None):
                self.hung_up = False  # the SIGHUP of the hang-up that already stopped the run: not a second one
                return
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # (cli: "fungpt: interrupted", status 130)
            # Under torchrun a second Ctrl-C reaches the processes as torchrun's SIGTERM: name what the user did.
            # One line from the job (the process that announced the first), not one per process.
            # (a job of one process too: torchrun sets TORCHELASTIC_RUN_ID)
            under_torchrun = self.processes > 1 or bool(os.environ.get("TORCHELASTIC_RUN_ID"))
            torchrun_passed = under_torchrun and self.signum == signal.SIGINT and signum == signal.SIGTERM
            what = "Ctrl-C" if torchrun_passed else signal.Signals(signum).name
            if self.announce:
                with contextlib.suppress(OSError):
                    print(f"\nfungpt: {what} again: stopped at once; the last checkpoint is intact", file=sys.stderr)
            os._exit(128 + signum)
        self.stop, self.signum = True, signum
        self._announce(signum)

    def _announce(self, signum: int) -> None:
        if self.announce:
            what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                unless = ", unless a process of this job has died (the last checkpoint stays intact)" \
                    if self.processes > 1 else ""
                print(f"\n{what}: {self.doing} and saving a checkpoint{unless} ({what} again aborts)", file=sys.stderr)

    def output(self, write: Callable[..., Any], *args: Any) -> None:
        """Write to the console (the progress bar's update or write). A terminal that hung up fails writes with
        EIO, possibly before its SIGHUP reaches Python: the run then stops as for SIGHUP, saving its step. A pipe
        whose reader went away (`| tee log` when the session drops, `| head`) fails them with EPIPE: the run
        stops the same way, as for SIGPIPE (which Python ignores, raising the error instead). A log file whose disk
        is full stops it too, saving its step (`output_failed`: training then ends with an error saying so)."""
        try:
            write(*args)
        except OSError as e:
            if e.errno in FULL:
                silence_files()  # (the rest of the run's output, the error included, could not be written there)
                if not self.stop:
                    self.stop, self.signum, self.output_failed = True, signal.SIGTERM, e.strerror or str(e)
                return
            if e.errno != errno.EIO and not pipe_closed(e):
                raise
            silence_terminal(pipes=e.errno != errno.EIO)
            if not self.stop:
                self.stop, self.hung_up = True, e.errno == errno.EIO
                self.signum = getattr(signal, "SIGHUP" if e.errno == errno.EIO else "SIGPIPE", signal.SIGTERM)
                if self.hung_up:  # said as for the SIGHUP itself (into stderr's file, say: its terminal is gone)
                    self._announce(self.signum)

    @contextlib.contextmanager
    def evaluating(self):
        """During an eval, which a first signal abandons (see `do_eval` in train.py), its notice says so."""
        self.doing = "leaving the eval"
        try:
            yield
        finally:
            self.doing = "finishing this step"

    def __exit__(self, *exc) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)


FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}  # a file that cannot grow


WINDOWS = os.name == "nt"


def pipe_closed(e: OSError) -> bool:
    """Whether a write failed because the pipe's reader went away (`| head`): EPIPE, or on Windows EINVAL, which
    its C runtime makes of "the pipe is being closed" (python/cpython#79935), on a write that names no file (EINVAL
    naming one is a name Windows refuses: "loss?.png")."""
    return (isinstance(e, BrokenPipeError) or e.errno == errno.EPIPE
            or (WINDOWS and e.errno == errno.EINVAL and e.filename is None))


def silence_files() -> None:
    """Point stdout or stderr at /dev/null where it is a file on a full disk (or /dev/full), where every later write
    would fail as the first did; a stream elsewhere (stderr into a log on another disk) keeps its output."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = stream.fileno()
            mode = os.fstat(fd).st_mode
            full = (stat.S_ISREG(mode) and os.fstatvfs(fd).f_bavail == 0) or (stat.S_ISCHR(mode) and not
                                                                               os.isatty(fd))
            if full:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)


def silence_terminal(pipes: bool = False) -> None:
    """Point stdout and stderr at /dev/null where they are a terminal (one that hung up: SIGHUP), or with `pipes`
    a pipe whose reader is gone, so that the run's remaining output cannot fail; other output is kept."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if os.isatty(stream.fileno()) or (pipes and reader_gone(stream.fileno())):
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def reader_gone(fd: int) -> bool:
    """Whether `fd` is a pipe whose reading end was closed: poll reports an error condition on its writing end."""
    import select

    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return False
    if not hasattr(select, "poll"):  # (Windows: no way to ask; a pipe's write failed as closed, so taken as gone)
        return WINDOWS
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


@contextlib.contextmanager
def close_on_error(bar):
    """Close the progress bar when the loop fails, so the error starts on a line of its own."""
    try:
        yield
    except BaseException:
        if bar is not None:
            bar.close()
        raise


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
