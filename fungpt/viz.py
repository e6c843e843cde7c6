"""Pictures of what a model computes: attention-weight heatmaps and position encodings.

Two kinds of functions live here, kept apart on purpose:

  * data functions return plain tensors, so tests (and the web explorer) can check and reuse
    the very numbers that get drawn:
        attention_maps(model, ids)        -> (n_layer, nh, T, T) attention weights (or the last rows)
        token_labels(tokenizer, ids)      -> one readable label per token
        position_table(kind, ...)         -> the vectors an absolute encoding adds
        cosine_similarity_matrix(table)   -> how alike the vectors of two positions are
        rope_relative_scores(...)         -> RoPE's q.k score for every (query, key) position
  * plot functions draw those numbers with matplotlib into a .png/.svg/.pdf file:
        plot_attention(weights, labels, out, layers, heads)
        plot_positions(kind, out, run=None)

Every figure has a fixed size in inches (`figsize`) and is saved at DPI dots per inch
without cropping, so a PNG is exactly figsize * DPI pixels: what the tests check.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from fungpt.errors import FunGPTError, folder_name
from fungpt.model import KVCache

DPI = 100  # dots per inch of every figure written here (PNG pixels = inches * DPI)
SUFFIXES = (".png", ".svg", ".pdf")


# ---------------------------------------------------------------------------------------- tokens


# Control characters but newline, tab and the CR of a CRLF line (which do no harm where text is printed)
_CONTROL = re.compile("\r(?!\n)|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def for_terminal(text: str) -> str:
    """Text as a terminal should show it: control characters but newline, tab and the CR of a CRLF as escapes
    ('\\x1b', '\\r'). A barely trained byte-level model draws them (its vocabulary holds every byte): an ESC
    followed by '[' is a terminal's colour or cursor code, a lone carriage return overwrites the line."""
    return _CONTROL.sub(lambda m: "\\r" if m.group() == "\r" else f"\\x{ord(m.group()):02x}", text)


def show_token(text: str) -> str:
    """Make a token's text visible: a space becomes '␣', a newline '\\n', a tab '\\t', another control character
    its escape ('\\x1b', as `for_terminal`)."""
    return for_terminal(text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r"))


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """One label per token id: its text, made visible with `show_token`.

    With byte-level BPE a single token can be part of a multi-byte character; its bytes are
    then shown as escapes such as '\\xc3' (Tokenizer.token_text).
    """
    return [show_token(tokenizer.token_text(int(i))) for i in ids]


# ------------------------------------------------------------------------------------- attention


@torch.no_grad()
def attention_maps(model, ids, *, last: int | None = None, layer: int | None = None) -> torch.Tensor:
    """The model's own attention weights for one sequence: a float tensor (n_layer, nh, T, T) on the CPU.

    `ids` is a list of token ids, a 1-D tensor (T,) or a (1, T) tensor. Entry [l, h, i, j] is how
    much token i (the query) attends to token j (the key) in head h of layer l: the softmax
    output of that head, so every row sums to 1 and everything above the diagonal (j > i, the
    future) is exactly 0. The model runs in eval mode (no dropout) on its own device.

    last=Q keeps only the rows of the last Q queries: (n_layer, nh, Q, T). The earlier tokens then run through
    a KV cache, without weights, so a long context costs Q x T numbers a head instead of T x T (the web
    explorer's full context of GPT-2 small: 151 MB instead of 604). layer=l returns only that layer's (nh, ., T).
    """
    idx = torch.as_tensor(ids, dtype=torch.long)
    if idx.dim() == 2 and idx.size(0) == 1:
        idx = idx[0]
    if idx.dim() != 1 or idx.numel() == 0:
        raise FunGPTError("attention_maps needs one non-empty sequence of token ids: pass a non-empty prompt")
    c = model.config
    if idx.numel() > c.block_size:
        raise FunGPTError(f"the prompt is {idx.numel()} tokens but the model's context is {c.block_size}: "
                          f"shorten the prompt")
    T = idx.numel()
    Q = T if last is None else max(1, min(last, T))  # the query rows kept
    weight = next(model.parameters())
    idx = idx[None].to(weight.device)  # (1, T)
    was_training = model.training
    model.eval()
    try:
        cache = None
        if Q < T:  # the first T - Q tokens fill the cache (no weights kept); the last Q attend to all T
            cache = KVCache(c.n_layer, 1, c.n_head, T, c.n_embd // c.n_head, weight.device, weight.dtype)
            model(idx[:, : T - Q], kv_cache=cache)
        _, _, attn = model(idx[:, T - Q :], kv_cache=cache, return_attn=True)  # n_layer x (1, nh, Q, T)
    finally:
        model.train(was_training)
    # A diverged model's NaN weights drew as the colormap's "bad" grey, the masked future's colour: a blank picture
    if not all(bool(torch.isfinite(a).all()) for a in attn):
        raise FunGPTError("the attention weights are not finite numbers (NaN): the model's activations overflow, its "
                          "training diverged; draw a checkpoint saved before that (--checkpoint best, where the run's "
                          "best is past step 0, whose weights are the random start) or train again with a lower "
                          "train.lr")
    if layer is not None:
        return attn[layer][0].float().cpu()  # (nh, Q, T)
    return torch.stack([a[0] for a in attn]).float().cpu()  # (n_layer, nh, Q, T)


def _panel_inches(T: int, n_panels: int) -> float:
    """Side of one heatmap in inches: room for T tick labels, smaller when there are many panels."""
    side = 1.2 + 0.14 * T  # ~0.14 inch per token label at font size 7
    if n_panels > 1:
        side = min(side, 3.2)
    return max(2.4, min(side, 9.0))


def attention_figsize(n_rows: int, n_cols: int, T: int, title_lines: int = 2,
                      label_chars: int = 0) -> tuple[float, float]:
    """Figure size (inches) of a grid of n_rows x n_cols attention heatmaps of T tokens, under a title of
    title_lines lines (`wrap_title`), with token labels up to label_chars characters long: the keys' labels stand
    upright under the bottom row and the queries' beside the first column, ~0.06 inch a character at font size 7
    (a BPE word's label cut the x axis's name off the image)."""
    side = _panel_inches(T, n_rows * n_cols)
    width = min(n_cols * side + 1.2 + 0.06 * max(0, label_chars - 4), 30.0)  # + the colour bar, the queries' labels
    # + the title, and under the bottom row its keys' labels and the axis name ("key (attended to)", which a grid
    # of one row had cut off); capped so images stay loadable
    below = 0.3 + 0.06 * max(label_chars, 2)
    height = min(n_rows * side + 0.8 + 0.2 * max(0, title_lines - 2) + below, 30.0)
    return round(width, 1), round(height, 1)


def wrap_title(title: str, width_inches: float) -> str:
    """Break a figure title into lines that fit width_inches: a narrow figure (one head, a short prompt)
    would cut a long line off at both ends. About 12 characters per inch at font size 10."""
    import textwrap

    chars = max(16, int(width_inches * 12))
    return "\n".join(part for line in title.splitlines() for part in (textwrap.wrap(line, chars) or [""]))


def _check_out(out: str | Path) -> Path:
    out = Path(out).expanduser()  # (~ quoted on a command line reaches us as it is)
    if out.suffix.lower() not in SUFFIXES:
        raise FunGPTError(f"--out {out} must end in .png, .svg or .pdf")
    return out


def _figure(figsize: tuple[float, float]):
    """A matplotlib Figure of its own, not pyplot's: drawn to a file (with Agg), it leaves a notebook's plotting as it
    was (pyplot's backend was switched to Agg, and the notebook's inline plots stopped showing)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")  # constrained: panels, labels and colour bars fit


def _save(fig, out: Path) -> Path:
    """Save without cropping (so pixel size = figsize * DPI), to a temporary name first: no half files."""
    from fungpt.plot import save_figure

    return save_figure(fig, out, dpi=DPI)


def _tick_labels(ax, labels: list[str], axis: str, max_labels: int) -> None:
    """Put token labels on an axis; with too many tokens, show every k-th one. (parse_math=False: text, not
    matplotlib's maths between two $, which GPT-2's "$$" token and any LaTeX in a prompt would start.)"""
    T = len(labels)
    every = max(1, math.ceil(T / max_labels))
    ticks = list(range(0, T, every))
    if axis == "x":
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7, fontfamily="monospace",
                      parse_math=False)
    else:
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7, fontfamily="monospace", parse_math=False)


def plot_attention(weights: torch.Tensor, labels: list[str], out: str | Path, layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None, title: str | None = None) -> Path:
    """Draw attention heatmaps: one row per layer in `layers`, one column per head in `heads`.

    weights: (n_layer, nh, T, T) from `attention_maps`; labels: T token labels (`token_labels`).
    Rows are queries (the token that looks), columns are keys (the token looked at). The upper
    triangle is the future, which a causal model cannot see: it is drawn grey, not as 0.
    """
    import numpy as np

    out = _check_out(out)
    n_layer, nh, T, _ = weights.shape
    if len(labels) != T:
        raise FunGPTError(f"{len(labels)} labels for {T} tokens")
    layers = list(range(n_layer)) if layers is None else list(layers)
    heads = list(range(nh)) if heads is None else list(heads)
    for name, chosen, n in (("layer", layers, n_layer), ("head", heads, nh)):
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise FunGPTError(f"--{name} {bad[0]} does not exist: this model has {n} {name}{'s' * (n != 1)}, "
                              f"numbered 0..{n - 1}")
    import matplotlib

    rows, cols = len(layers), len(heads)
    longest = max(map(len, labels), default=0)
    title = wrap_title(title or "attention weights (each row sums to 1; grey = future, masked)",
                       attention_figsize(rows, cols, T, label_chars=longest)[0])
    fig = _figure(attention_figsize(rows, cols, T, title.count("\n") + 1, label_chars=longest))
    fig.set_layout_engine("compressed")  # (square panels: the room they leave goes to the labels, not to gaps)
    axes = fig.subplots(rows, cols, squeeze=False)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # (T, T) True above the diagonal
    vmax = float(weights[layers][:, heads].max())
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # masked (future) cells in grey
    max_labels = 60 if rows * cols == 1 else 24
    image = None
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            w = np.ma.masked_array(weights[layer, head].numpy(), mask=future)
            image = ax.imshow(w, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            if c == 0:
                _tick_labels(ax, labels, "y", max_labels)
                ax.set_ylabel("query (attending)", fontsize=8)
            else:
                ax.set_yticks([])
            if r == rows - 1:
                _tick_labels(ax, labels, "x", max_labels)
                ax.set_xlabel("key (attended to)", fontsize=8)
            else:
                ax.set_xticks([])
    fig.suptitle(title, fontsize=10, parse_math=False)  # (the run's folder name and the prompt, as they are)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    return _save(fig, out)


# ------------------------------------------------------------------------------------- positions


def cosine_similarity_matrix(table: torch.Tensor) -> torch.Tensor:
    """(T, C) position vectors -> (T, T) cosine similarities: 1 on the diagonal, near 1 = alike."""
    # (in float64: a row's length squared overflows float32 past entries of about 1e19, a diverged run's, and every
    # similarity came out 0, the diagonal too)
    unit = torch.nn.functional.normalize(table.double(), dim=-1)  # (T, C), rows of length 1
    return (unit @ unit.T).float()  # (T, T)


def rope_relative_scores(block_size: int, head_size: int, base: float = 10000.0, seed: int = 0,
                         n_pairs: int = 64) -> torch.Tensor:
    """RoPE's attention score (R(m)q) . (R(n)k) for every query position m and key position n: (T, T).

    Uses FunGPT's own RotaryPositions. The score is averaged over n_pairs random (q, k) pairs
    with q = k + noise (a query that "looks for" its key), so the picture shows what the
    rotation alone does. Because R(m)^T R(n) = R(n - m), entry [m, n] depends only on n - m:
    the matrix is constant along every diagonal.
    """
    from fungpt.positions import RotaryPositions

    rope = RotaryPositions(block_size, head_size, base)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n_pairs, 1, 1, head_size, generator=g)  # (P, 1, 1, hs)
    q = k + 0.5 * torch.randn(n_pairs, 1, 1, head_size, generator=g)
    pos = torch.arange(block_size)
    q_all = q.expand(n_pairs, 1, block_size, head_size)  # the same q at every position (P, 1, T, hs)
    k_all = k.expand(n_pairs, 1, block_size, head_size)
    q_rot, k_rot = rope.rotate(q_all, k_all, pos)  # rotated by their position: (P, 1, T, hs)
    scores = q_rot @ k_rot.transpose(-2, -1) / math.sqrt(head_size)  # (P, 1, T, T)
    return scores.mean(dim=(0, 1))  # (T, T)


def position_table(kind: str, block_size: int, n_embd: int, model=None) -> torch.Tensor:
    """The (block_size, C) table an absolute encoding adds to the token embeddings.

    sinusoidal: computed by FunGPT's SinusoidalPositions. learned: the trained pos.wpe of `model`.
    """
    if kind == "sinusoidal":
        from fungpt.positions import SinusoidalPositions

        return SinusoidalPositions(block_size, n_embd).pe.clone()
    if kind == "learned":
        if model is not None and model.config.pos_encoding != "learned":
            kind_of_run = model.config.pos_encoding
            # (a 'none' run has nothing of its own to draw: "draw --pos-encoding none" was then refused)
            draw = "sinusoidal or rope at its shape" if kind_of_run == "none" else kind_of_run
            raise FunGPTError(f"this run has pos_encoding = {kind_of_run!r}, which has no learned table: draw "
                              f"--pos-encoding {draw}, or pass a run with pos_encoding = 'learned'")
        if model is None:
            raise FunGPTError("a learned position table only exists in a trained model: pass --run RUN of a run "
                              "with pos_encoding = 'learned'")
        return model.pos.wpe.weight.detach().float().cpu().clone()
    raise FunGPTError(f"{kind!r} has no position table: use sinusoidal or learned")


POSITION_FIGSIZE = {"sinusoidal": (15.0, 4.6), "rope": (15.0, 4.6), "learned": (10.0, 4.6)}  # inches


def plot_positions(kind: str, out: str | Path, run=None, block_size: int | None = None,
                   n_embd: int | None = None, n_head: int | None = None, rope_base: float | None = None,
                   name: str | None = None) -> Path:
    """Draw a position encoding (see `fungpt positions --help`).

    kind: learned, sinusoidal or rope. run: a LoadedRun (from fungpt.runs.load_run) whose shape
    (block_size, n_embd, n_head, rope_base) is used; required for learned, whose table is trained.
    Without a run, the shape comes from the arguments, defaulting to the shakespeare-char-cpu model. name: the
    figure's title names it (by default the run's folder).
      sinusoidal: the table (position x channel) and its dot products between positions
      rope:       the rotation frequency of every pair, cos(m theta_i), and the relative-position scores
      learned:    the trained table and the cosine similarity of every two positions
    """
    from fungpt.config import RunConfig

    out = _check_out(out)
    if kind not in POSITION_FIGSIZE:
        choices = ", ".join(POSITION_FIGSIZE)
        raise FunGPTError(f"--pos-encoding {kind!r} has no picture: choose one of {choices}"
                          + (" (a 'none' model has no position encoding to draw)" if kind == "none" else ""))
    cfg = run.config.model if run is not None else RunConfig().model
    block_size = block_size or cfg.block_size
    n_embd = n_embd or cfg.n_embd
    n_head = n_head or cfg.n_head
    rope_base = rope_base or cfg.rope_base
    name = f"{name}: " if name else f"{folder_name(run.run_dir)}: " if run is not None else ""
    if kind in ("sinusoidal", "learned"):
        table = position_table(kind, block_size, n_embd, run.model if run is not None else None)  # (T, C)
        n_panels = 3 if kind == "sinusoidal" else 2
        fig = _figure(POSITION_FIGSIZE[kind])
        axes = fig.subplots(1, n_panels)
        lim = float(table.abs().max())
        im = axes[0].imshow(table.numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                            interpolation="nearest")
        axes[0].set(title=f"{kind} table: row p is added at position p", xlabel="channel", ylabel="position p")
        fig.colorbar(im, ax=axes[0])
        if kind == "sinusoidal":
            dots = table @ table.T  # (T, T) PE[p] . PE[q]
            im = axes[1].imshow(dots.numpy(), cmap="viridis", interpolation="nearest")
            axes[1].set(title="PE[p] . PE[q]: depends only on p - q", xlabel="position q", ylabel="position p")
            fig.colorbar(im, ax=axes[1])
            for i in sorted({0, 6, 16, 32, 2 * (n_embd // 4)}):  # even channels: the sines (odd ones are cosines)
                if i < n_embd:
                    # (markers where there are few positions: a line through one point draws nothing)
                    axes[2].plot(table[:, i].numpy(), label=f"channel {i}", lw=1.2,
                                 marker="o" if block_size <= 16 else None, ms=3)
            axes[2].set(title="channels 2i: sin(p / 10000^(2i/C)), fast to slow", xlabel="position p",
                        ylabel="value")
            axes[2].legend(fontsize=7)
        else:
            sim = cosine_similarity_matrix(table)
            im = axes[1].imshow(sim.numpy(), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
            axes[1].set(title="cosine similarity of positions p and q", xlabel="position q", ylabel="position p")
            fig.colorbar(im, ax=axes[1])
    else:  # rope
        from fungpt.positions import RotaryPositions

        hs = n_embd // n_head
        if hs % 2:
            raise FunGPTError(f"RoPE needs an even head size, got n_embd/n_head = {hs}: it rotates pairs of a "
                              f"head's channels; draw --pos-encoding sinusoidal instead")
        rope = RotaryPositions(block_size, hs, rope_base)
        theta = rope_base ** (-torch.arange(hs // 2, dtype=torch.float32) / (hs // 2))  # (hs/2,) as in RotaryPositions
        fig = _figure(POSITION_FIGSIZE["rope"])
        axes = fig.subplots(1, 3)
        axes[0].semilogy(theta.numpy(), marker="o", ms=3)
        axes[0].set(title="speed of pair i: theta_i = base^(-2i/hs)", xlabel="pair i",
                    ylabel="radians per position (log)")
        axes[0].grid(alpha=0.3)
        im = axes[1].imshow(rope.cos[:, : hs // 2].numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1,
                            interpolation="nearest")
        axes[1].set(title="cos(m theta_i): the angle of pair i at position m", xlabel="pair i",
                    ylabel="position m")
        fig.colorbar(im, ax=axes[1], label="cos(m theta_i)")
        scores = rope_relative_scores(block_size, hs, rope_base)
        im = axes[2].imshow(scores.numpy(), cmap="viridis", interpolation="nearest")
        axes[2].set(title="(R(m)q).(R(n)k) / sqrt(hs): depends only on n - m", xlabel="key position n",
                    ylabel="query position m")
        fig.colorbar(im, ax=axes[2], label="attention score (R(m)q).(R(n)k) / sqrt(hs)")
    for ax in axes:
        ax.title.set_fontsize(10)
    fig.suptitle(f"{name}{kind} position encoding (block_size {block_size}, n_embd {n_embd}, "
                 f"head size {n_embd // n_head})", fontsize=11, parse_math=False)
    return _save(fig, out)
