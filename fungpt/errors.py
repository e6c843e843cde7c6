"""One exception type for every mistake a user can fix.

Anything raised as `FunGPTError` is shown by the command line as a single line,
`error: <message>`, with a non-zero exit and no traceback. The message should say
what is wrong and how to fix it, e.g.
    FunGPTError("data path 'foo.txt' does not exist: pass a text file, a folder of text files or 'shakespeare'")

Also here: parse_json and read_json, JSON reading whose every failure is a ValueError, so that each reader of
a run's JSON files can turn a damaged file into such a line ("X is corrupt"); why_download_failed, the short
reason for such a line when a download fails; is_out_of_memory; utf8_path and utf8_text; said_on_ctrl_c, what a
Ctrl-C left, said in the command's last line; check_field_types, the type check of every config dataclass, and
check_number, a function argument's.
"""

import contextlib
import dataclasses
import numbers
import os
import re
import shlex
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path


class FunGPTError(Exception):
    """A user-facing error: bad input, bad config, missing file. Printed as one line."""


@contextlib.contextmanager
def said_on_ctrl_c(what_it_left: str | Callable[[], str | None]) -> Iterator[None]:
    """A Ctrl-C in the block is raised again as KeyboardInterrupt(what_it_left), which the command line prints after
    "fungpt: interrupted: ", so the user knows what the interruption left (a half-written dataset? a run to
    resume?). An interruption that already says so passes as it is, and so do SIGTERM's and SIGHUP's (a subclass,
    with its own line, which says what_it_left after it: their `left`). `what_it_left` may be a function, asked
    when the Ctrl-C comes (for a block whose work moves on: training's setup); when it gives None, the interruption
    passes as it is."""
    try:
        yield
    except KeyboardInterrupt as e:
        said = what_it_left() if callable(what_it_left) else what_it_left
        if type(e) is not KeyboardInterrupt and said is not None and getattr(e, "left", None) is None:
            e.left = said  # (SIGTERM, SIGHUP: said after their own line, as Ctrl-C's is; the innermost block's)
        if type(e) is not KeyboardInterrupt or e.args or said is None:
            raise
        raise KeyboardInterrupt(said) from None


def check_field_types(config, named: Callable[[str], str]) -> None:
    """Check each field of the dataclass instance `config` against its annotation, converting in place where the
    value means the same: any whole number (numpy's too) for an int, any real number for a float, a path for a str.
    A wrong type is one FunGPTError, `named(field)` followed by the value: without this, `max_iters=1e1` trained
    and then saved 10.0, which no later command could load, and `batch_size="4"` failed deep in a comparison.
    Fields whose annotation is not a plain type (a Literal, Any) are left to the dataclass's own checks."""
    hints: dict = {}
    for klass in reversed(type(config).__mro__):  # (class by class: one annotation that cannot be resolved, in a
        try:                                      # subclass of yours, leaves its base classes' fields checked)
            hints.update(typing.get_type_hints(klass))  # (resolves annotations written as strings)
        except Exception:
            pass
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints.get(f.name, f.type)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        # (a field of yours may be optional, float | None, or a list[int]: checked as a list)
        options = tuple(typing.get_origin(t) or t for t in (typing.get_args(hint) if union else (hint,)))
        if typing.Any in options or not all(isinstance(t, type) for t in options):
            continue
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if (value is None and type(None) in options) or (bool in options and isinstance(value, bool)):
            converted = value
        elif int in options and isinstance(value, numbers.Integral) and real:
            converted = int(value)  # (numpy's integers: stored as Python ints, which JSON and TOML take)
        elif float in options and real:
            try:
                converted = float(value)  # (numpy's floats too, float64 included)
            except OverflowError:  # an integer beyond any float
                raise FunGPTError(f"{named(f.name)}an integer of {len(str(abs(value)))} digits is too large for a "
                                  f"number: fix its value") from None
        elif str in options and isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
            converted = os.fspath(value)  # a pathlib.Path as a folder's name
        elif isinstance(value, options) and not isinstance(value, bool):  # (a str, a list, ...)
            converted = value
        else:
            named_types = " or ".join("None" if t is type(None) else t.__name__ for t in options)
            whole = (f" (a whole number: write {int(value)})" if int in options and isinstance(value, float)
                     and value.is_integer() else "")
            raise FunGPTError(f"{named(f.name)}{value!r} should be of type {named_types}{whole}: fix its value")
        if converted is not value and type(converted) is not type(value):
            setattr(config, f.name, converted)


def check_number(value, named: str, whole: bool = False) -> None:
    """Refuse a value that is not a number (a whole number with whole=True), in one line naming it: a library
    caller's seed="1" or top_k=2.5 failed deep in a comparison or in torch. numpy's numbers are numbers."""
    kind = numbers.Integral if whole else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FunGPTError(f"{named} {value!r} should be {'a whole number' if whole else 'a number'}")


def check_run_given(run_dir) -> None:
    """Refuse an empty run folder argument (a string: Path("") is already the current folder, "."), which would
    read the current folder: `fungpt sample "$RUN"` with RUN unset."""
    if not str(run_dir).strip():
        raise FunGPTError("the run folder is empty: pass the out_dir of a training run")


def run_folder(run_dir) -> Path:
    """The run folder argument as a folder (~ expanded: quoted on a command line it reaches us as it is); else one
    line saying what it is instead, the same from every command."""
    check_run_given(run_dir)
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        what = ("is a file, not a run folder" if folder.exists() else
                "is a symbolic link that leads nowhere (or back to itself)" if folder.is_symlink() else
                "does not exist")
        raise FunGPTError(f"{folder} {what}; pass the out_dir of a training run")
    return folder


def folder_name(path) -> str:
    """A run folder's name for a title or legend: its own name (a link by the link's), `.` and `..` (and "") as the
    folder they are, whose `name` is empty or a dot."""
    p = Path(path).expanduser()
    return p.name if p.name not in ("", ".", "..") else p.resolve().name


def utf8_path(path) -> str | None:
    """`path` as text the Rust libraries (safetensors, tokenizers) can open, or None: a name holding bytes that are
    not UTF-8 (a folder named on a Latin-1 system; Python keeps such bytes as surrogates, which UTF-8 cannot hold).
    Their readers then take the file's bytes instead."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return name


def utf8_text(text: str) -> str:
    """`text` as valid UTF-8 (what JSON, a UTF-8 file or a plot can hold): a name's bytes that are not UTF-8, held
    by Python as surrogates, each become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` says that memory ran out: Python's MemoryError, torch's allocators' errors (the CPU's "can't
    allocate memory", CUDA's OutOfMemoryError, MPS's), an mmap's ENOMEM. The command says so in one line; a broad
    catch that reads a file as damaged lets these through (reading a large file is not damage)."""
    import errno

    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    if isinstance(e, OSError):
        return e.errno == errno.ENOMEM
    first = str(e).split("\n", 1)[0]
    # (torch's CPU allocator: "can't allocate memory" on Linux and macOS, "not enough memory" on Windows)
    return isinstance(e, RuntimeError) and any(m in first for m in ("can't allocate memory", "not enough memory",
                                                                    "CUDA out of memory", "MPS backend out of memory"))


def _unique_keys(pairs: list[tuple[str, typing.Any]]) -> dict[str, typing.Any]:
    seen: dict[str, typing.Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def parse_json(text: str | bytes, unique_keys: bool = False):
    """json.loads, where every way damaged text can fail raises ValueError (as json.JSONDecodeError does).

    Two failures of json.loads are not ValueErrors of the usual kind: text nested thousands of levels deep
    ("[[[[...") exhausts the parser's recursion (RecursionError), and a number of more than 4,300 digits is
    refused by int() (a ValueError, but not a JSONDecodeError). Both are turned into a plain ValueError here, so
    each reader of a run's JSON files catches one type and says "X is corrupt" in one line.
    unique_keys: a key twice in one object is a ValueError too (json.loads keeps the last: settings lost silently).
    """
    import json

    try:
        return json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json(path, unique_keys: bool = False):
    """parse_json of a file's text: UTF-8, with or without a byte-order mark, or UTF-16/32 (json.loads of bytes
    tells them apart: Windows PowerShell and Notepad write those, and a hand-written meta.json may be one). OSError
    if it cannot be read; ValueError if it is not JSON (a UnicodeDecodeError is a ValueError too)."""
    with open(path, "rb") as f:
        return parse_json(f.read(), unique_keys)


# What a failed download's exception (or one it was raised from) says when the machine cannot reach the server:
# no network, or a name that does not resolve, or nothing answering (requests, urllib3 and the OS word it so)
_UNREACHABLE_SIGNS = ("Failed to resolve", "Name or service not known", "Temporary failure in name resolution",
                      "nodename nor servname", "Network is unreachable", "Connection refused", "No route to host",
                      "getaddrinfo failed", "ConnectError", "ConnectionError")


def why_download_failed(e: BaseException, width: int = 160) -> str:
    """A download's exception as a short reason for a one-line message: that the server could not be reached
    (the chained messages of requests and urllib3 run to hundreds of characters), naming a proxy where one is
    involved; else its type and text, on one line and cut at a word (or mid-word, for one long word)."""
    import textwrap

    chain, seen = [], set()
    while e is not None and id(e) not in seen:  # the exception and those it was raised from
        seen.add(id(e))
        chain.append(f"{type(e).__name__}: {' '.join(str(e).split())}")
        e = e.__cause__ or e.__context__
    text = " ".join(chain)
    if "ProxyError" in text or "Unable to connect to proxy" in text:
        return "could not reach the proxy that HTTPS_PROXY or HTTP_PROXY names"
    if any(sign in text for sign in _UNREACHABLE_SIGNS):
        return "could not reach the server: no network, or a proxy or mirror that does not answer"
    short = textwrap.shorten(chain[0], width=width, placeholder=" ...")
    return short if short != "..." and not short.endswith(": ...") else chain[0][:width - 4] + " ..."


def shell_quote(text: str) -> str:
    """`text` as one argument of a command the user can paste into their shell: POSIX quoting (shlex.quote) or, on
    Windows, double quotes where it needs any (cmd.exe passes single quotes on as part of the argument; double
    quotes work there and in PowerShell for paths, though a $ or ` in one (PowerShell), or a %NAME% (cmd.exe), is
    still read by the shell)."""
    if os.name != "nt":
        return shlex.quote(text)
    return f'"{text}"' if not text or re.search(r"[\s&|<>^()%!;,'`$]", text) else text
