"""Run one command and record its peak resident memory: python bench/peak_rss.py OUT_FILE CMD [ARGS...]

Why a launcher: on Linux, a process's peak resident memory as getrusage and wait4 report it (ru_maxrss)
keeps, across exec, the size of the process it was forked from. A command started straight from a bench
script, which has torch loaded and a few hundred MB resident, would report at least the script's size
(measured: 429 MB for a 10 MB command started from a 419 MB script). Started from this small process
instead, the figure is the command's own, and its children's: a shell's includes the largest command it
waited for.

Writes the peak in KiB to OUT_FILE when the command ends and exits with the command's exit status (128 + N
if signal N ended it). The launcher stays in the command's process group, so pausing or killing the
group (bench_train.py --turns) reaches both. Needs nothing but Python's standard library: start it with
`python -S` to keep it small.
"""

import os
import signal
import sys


def main() -> int:
    if len(sys.argv) < 3:
        print("usage: peak_rss.py OUT_FILE CMD [ARGS...]", file=sys.stderr)
        return 2
    out_file, cmd = sys.argv[1], sys.argv[2:]
    pid = os.fork()
    if pid == 0:  # the command: a fresh process forked from this small one
        try:
            os.execvp(cmd[0], cmd)
        except OSError as e:
            print(f"peak_rss.py: cannot run {cmd[0]}: {e}", file=sys.stderr)
        os._exit(127)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the command; wait for it to end
    _, status, usage = os.wait4(pid, 0)
    with open(out_file, "w") as f:
        f.write(f"{usage.ru_maxrss}\n")  # KiB on Linux
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code  # killed by signal N: -N


if __name__ == "__main__":
    sys.exit(main())
