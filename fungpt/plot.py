"""Loss curves from one or several runs' metrics.jsonl, on one labelled figure."""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import sys
import textwrap
import warnings
from pathlib import Path

from fungpt.errors import FunGPTError, check_run_given, folder_name, parse_json, utf8_text

FIGSIZE = (8, 5)  # inches; the PNG is FIGSIZE * DPI pixels (800 x 500)
DPI = 100
LEGEND_WIDTH = 48  # characters per line of a run's name in the legend: about half the figure's width

X_AXES = {  # --x choice: (metrics.jsonl key, axis label)
    "step": ("step", "optimizer step"),
    "tokens": ("tokens", "tokens seen"),
    "time": ("run_s", "wall time (s)"),
}


# The fields of a metrics.jsonl row that figures read: a row where one is not a number is skipped, as damage
NUMBER_KEYS = ("step", "tokens", "elapsed_s", "run_s", "train_loss", "val_loss")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # (NaN and inf are: a diverged run's)


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """Split a run's metrics.jsonl into (train rows, eval rows). Unreadable lines are skipped.

    Every row gets run_s, the seconds since the run began over all its commands (a resumed run's
    elapsed_s starts again from 0 with each command). Training logs it; for files from versions that
    did not, it is rebuilt from elapsed_s, taking each drop in elapsed_s for a resume.
    """
    check_run_given(run_dir)
    run_dir = Path(run_dir).expanduser()  # (~ quoted on a command line reaches us as it is)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        what = "does not exist" if not Path(run_dir).exists() else "has no metrics.jsonl"
        raise FunGPTError(f"{run_dir} {what}: pass the out_dir of a training run")
    train, evals = [], []
    earlier = last = 0.0  # seconds of the run's earlier commands; elapsed_s of the previous row
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = parse_json(line)
        except ValueError:  # (a JSONDecodeError is one)
            continue  # a half-written last line from a killed run
        if not isinstance(row, dict) or any(not _is_number(row[k]) for k in NUMBER_KEYS if k in row):
            continue  # valid JSON, but not a row of ours (a stray number, a step "x", a loss [1])
        if "run_s" not in row and isinstance(row.get("elapsed_s"), (int, float)):
            if row["elapsed_s"] < last:  # a resumed command: its clock started again
                earlier += last
            last = row["elapsed_s"]
            row["run_s"] = round(earlier + last, 3)
        (evals if "val_loss" in row else train).append(row)
    return train, evals


def plot_runs(runs: list[str | Path], out: str | Path, x: str = "step") -> Path:
    """Draw train loss (thin) and val loss (thick, with markers) of every run against `x`.

    Runs without eval rows (val_loss) just show their train curve. Returns the image path.
    """
    if x not in X_AXES:
        raise FunGPTError(f"--x {x!r} is not valid: choose one of {', '.join(X_AXES)}")
    out = Path(out).expanduser()  # (~ quoted on a command line reaches us as it is)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise FunGPTError(f"--out {out} must end in .png, .svg or .pdf")
    if not runs:
        raise FunGPTError("give at least one run folder to plot")
    key, label = X_AXES[x]
    unique: dict[Path, str | Path] = {}
    for run in runs:  # each run once (b and ./b are one run), in the order given
        unique.setdefault(Path(run).expanduser().resolve(), run)
    runs = list(unique.values())
    # each by the name given (a link by its own name), `.` and `..` as the folder they are
    names = [folder_name(run) for run in runs]
    if len(set(names)) < len(names):  # same folder name in different places: label with the full path
        names = [str(run) for run in runs]
    # a name's bytes that are not UTF-8 (Python holds them as lone surrogates) as U+FFFD: matplotlib refuses those
    names = [utf8_text(name) for name in names]
    # a long name (a sweep's run folders, full paths) on lines of LEGEND_WIDTH: on one line it ran off the figure,
    # and cut short it could lose the part that tells two runs apart
    names = ["\n".join(textwrap.wrap(name, LEGEND_WIDTH)) or name for name in names]
    curves = []  # per run: its name, then its train and val curves as (xs, losses)
    for run, name in zip(runs, names):
        train, evals = read_metrics(run)
        tr = [r for r in train if key in r and "train_loss" in r]
        ev = [r for r in evals if key in r]
        curves.append((name, ([r[key] for r in tr], [r["train_loss"] for r in tr]),
                       ([r[key] for r in ev], [r["val_loss"] for r in ev])))
    if not any(tr_x or ev_x for _, (tr_x, _), (ev_x, _) in curves):
        raise FunGPTError(f"no loss rows with {key!r} in the metrics.jsonl of {', '.join(map(str, runs))}: "
                          f"train for a few steps first" + (", or try --x step" if x != "step" else ""))
    for run, (_, (tr_x, _), (ev_x, _)) in zip(runs, curves):
        if not (tr_x or ev_x):  # (drawn without it, the figure would not say that a run is missing)
            print(f"fungpt: note: {run} has no loss rows with {key!r} in its metrics.jsonl: it is left out of the "
                  f"figure" + (" (try --x step)" if x != "step" else ""), file=sys.stderr)
    drawable = [any(math.isfinite(y) for y in tr_y + ev_y) for _, (_, tr_y), (_, ev_y) in curves]
    if not any(drawable):  # (an empty figure, its axes made up, was written)
        raise FunGPTError(f"every loss in the metrics.jsonl of {', '.join(map(str, runs))} is NaN or infinite: "
                          f"there is nothing to draw (the training diverged: lower train.lr and train again)")
    for run, (_, (tr_x, tr_y), (ev_x, ev_y)), shown in zip(runs, curves, drawable):
        bad = sorted(x for x, y in zip(tr_x + ev_x, tr_y + ev_y) if not math.isfinite(y))
        if bad and not shown:
            print(f"fungpt: note: every loss of {run} in its metrics.jsonl is NaN or infinite: it is left out of the "
                  f"figure", file=sys.stderr)
        elif bad:  # (matplotlib leaves them out without a word: a diverged run's curve just stopped)
            at = f"{bad[0]:.1f} s" if x == "time" else f"{x} {bad[0]:,}"
            print(f"fungpt: note: {run} has {len(bad)} NaN or infinite loss(es) in its metrics.jsonl, first at "
                  f"{at}: they cannot be drawn, so its curves break there", file=sys.stderr)
    if note := _tokens_note(runs):
        print(note, file=sys.stderr)
    return save_figure(_loss_figure(curves, label), out)


def _tokens_note(runs: list[str | Path]) -> str | None:
    """A note when the runs' losses do not compare: their val splits are other text (the corpus changed between
    them, or its split), or their tokens differ (another tokenizer, size, or merges: a character-level run's loss per
    token reads far lower than a BPE run's that predicts the same text better; bits per byte compare). None when
    they agree, or a run's files do not tell."""
    from fungpt import checkpoint as ckpt
    from fungpt.errors import read_json
    from fungpt.tokenizer import META_FILE, load_tokenizer

    if len(runs) < 2:
        return None
    labels, texts, first, tokens_differ = {}, set(), None, False
    for run in runs:
        try:
            kind = read_json(Path(run) / META_FILE)["kind"]
            saved = read_json(Path(run) / "config.json")
            vocab = saved["model"]["vocab_size"]
            # by what each id stands for, not by the files (one model folder's tokenizer.json and its vocab.json +
            # merges.txt, or its copy elsewhere, are the same tokens)
            tok = load_tokenizer(run)
            if first is None:
                first = tok
            elif first.first_difference(tok) is not None:
                tokens_differ = True
        except (FunGPTError, OSError, ValueError, KeyError, TypeError, AttributeError):  # (damaged: no note)
            return None
        try:  # the text's sha256, as the checkpoint recorded it, and the split (None where a run does not tell)
            folder = ckpt.find_checkpoint(run)
            text = str(read_json(folder / ckpt.MANIFEST_FILE).get("data_fingerprint") or "").partition(":")[0]
            texts.add((text, saved["data"]["val_fraction"]) if text else None)
        except (FunGPTError, OSError, ValueError, KeyError, TypeError, AttributeError):
            texts.add(None)
        labels.setdefault(f"{kind} {vocab:,}" if isinstance(vocab, int) else str(kind), []).append(str(run))
    tokens_differ = tokens_differ or len(labels) > 1
    if None not in texts and len(texts) > 1:
        return ("fungpt: note: these runs' val splits are other text (their corpus, or its split, differs), so their "
                "val losses do not compare; `fungpt eval RUN --input FILE` scores each on one same file"
                + (" (in bits per byte: their tokens differ too)" if tokens_differ else ""))
    if not tokens_differ:
        return None
    which = ("; ".join(f"{kind}: {', '.join(names)}" for kind, names in labels.items()) if len(labels) > 1
             else f"{next(iter(labels))} each, with other tokens")
    return (f"fungpt: note: these runs' tokens differ ({which}), so their losses per token do not compare; "
            f"`fungpt eval RUN` gives each one's bits per byte, which do")


def _loss_figure(curves: list, xlabel: str):
    """The figure of plot_runs: per run, its train curve (thin) and val curve (thick, with markers), one colour."""
    # A Figure of its own, not pyplot's: drawn to a file (with Agg), it leaves a notebook's plotting as it was
    # (pyplot's backend switched to Agg, and inline plots then stopped showing after a train())
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    for i, (name, (tr_x, tr_y), (ev_x, ev_y)) in enumerate(curves):
        # matplotlib's 10 colours, then again with another line style: the 1st and 11th run of a sweep looked the same
        color, style = f"C{i % 10}", ("-", "--", ":", "-.")[i // 10 % 4]
        if tr_x:
            # a point without a finite neighbour (the only one, or between NaNs) makes no line: a marker shows it
            ok = [math.isfinite(y) for y in tr_y]
            lone = [i for i, good in enumerate(ok) if good and not any(ok[max(i - 1, 0) : i] + ok[i + 1 : i + 2])]
            # (no marker otherwise: the legend's train entry stays a line)
            ax.plot(tr_x, tr_y, color=color, ls=style, alpha=0.35, lw=1, marker="o" if lone else None,
                    markevery=lone or None, ms=3, label=f"{name} train")
        if ev_x:
            ax.plot(ev_x, ev_y, color=color, ls=style, lw=2, marker="o", ms=3, label=f"{name} val")
            # NaN or infinite evals (a diverged run) draw nothing: crosses at the top edge say where they are, and
            # keep the x axis to the run's end (it stopped at the last finite point, step 1 of a 10-step run)
            lost = [x for x, y in zip(ev_x, ev_y) if not math.isfinite(y)]
            if lost:
                ax.plot(lost, [1.0] * len(lost), ls="", marker="x", ms=7, mew=2, color=color, clip_on=False,
                        transform=ax.get_xaxis_transform(), label=f"{name} val not finite (at the top)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title("FunGPT loss curves")
    ax.grid(alpha=0.3)
    for text in ax.legend().get_texts():
        text.set_parse_math(False)  # run folders' names as they are: "lr$1e-3$" is not maths, "a$$b" not an error
    with quiet_glyphs():  # (tight_layout draws the text already: a run folder named in CJK)
        fig.tight_layout()
    return fig


def rehearse_plot(points: int = 100) -> None:
    """Draw plot_runs's figure for made-up curves into memory: what the loss.png at a run's end will cost (the
    import, the fonts, the layout, the PNG's encoding), which a time-budget run measures at step 0, before it
    has any rows to plot."""
    import io

    xs = list(range(points))
    ys = [4.0 - 2.0 * i / points for i in xs]  # (any falling curve: the cost is not in the numbers)
    fig = _loss_figure([("run", (xs, ys), (xs[::10], ys[::10]))], X_AXES["step"][1])
    fig.savefig(io.BytesIO(), format="png")


@contextlib.contextmanager
def quiet_glyphs():
    """Drawing text matplotlib's font lacks (CJK, emoji: a token, a run folder's name) gives a box and a
    UserWarning with a raw source line in the terminal, which says nothing the picture does not: silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        yield


def save_figure(fig, out: Path, **savefig_kw) -> Path:
    """Write `fig` to `out` (its format from the suffix) under a temporary name of its own, then rename it into
    place: never a half-written image, nor another file's name (two commands drawing to one --out each have
    theirs). An error names `out`."""
    from fungpt.checkpoint import file_in_the_way, remove_stale_temps_named, temp_stem

    out = Path(out)
    if out.is_dir():
        raise FunGPTError(f"--out {out} is a folder; give a file name, such as {out / 'figure.png'}")
    tmp = out.with_name(f".{temp_stem(out.stem)}.tmp-{os.getpid()}-{secrets.token_hex(4)}{out.suffix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # (a drawing killed before its rename left its image under a hidden name; each one more)
        remove_stale_temps_named(out.parent, rf"\.{re.escape(temp_stem(out.stem))}\.tmp-\d+-[0-9a-f]{{8}}"
                                             rf"{re.escape(out.suffix)}")
        with quiet_glyphs():
            fig.savefig(tmp, **savefig_kw)
        os.replace(tmp, out)
    except OSError as e:
        above = file_in_the_way(out)
        if above is not None:
            raise FunGPTError(f"could not write {out}: {above} is a file, not a folder; choose another --out") \
                from None
        raise FunGPTError(f"could not write {out}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):  # (e.g. ENOTDIR when a file stands where the folder should be)
            tmp.unlink(missing_ok=True)
    return out
