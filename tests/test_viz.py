"""See inside: loss plots, inspect, attention maps, position pictures and --show-probs (CPU, seconds)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fungpt import checkpoint as ckpt
from fungpt.cli import main
from fungpt.config import DataConfig, RunConfig, TrainConfig, load_run_config
from fungpt.errors import FunGPTError
from fungpt.inspection import estimate_memory, inspect_target
from fungpt.linear import bfloat16_products
from fungpt.model import GPT, GPTConfig, sample_next_token
from fungpt.plot import plot_runs, read_metrics
from fungpt.runs import load_run
from fungpt.sample import sample, sampling_distribution, top_candidates
from fungpt.sampling import draw
from fungpt.tokenizer import CharTokenizer
from fungpt.train import train
from fungpt.viz import (
    DPI,
    POSITION_FIGSIZE,
    attention_figsize,
    attention_maps,
    cosine_similarity_matrix,
    plot_attention,
    rope_relative_scores,
    show_token,
    token_labels,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny char-level run trained for a few steps (with eval rows and checkpoints)."""
    tmp = tmp_path_factory.mktemp("viz")
    corpus = tmp / "corpus.txt"
    corpus.write_text("ROMEO: is it so?\nJULIET: ay, my lord, it is so.\n" * 60, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUNGPT_CACHE_DIR", str(tmp / "cache"))
        cfg = RunConfig(out_dir=str(tmp / "run"), data=DataConfig(path=str(corpus), tokenizer="char"),
                        model=GPTConfig(vocab_size=1, block_size=32, n_layer=2, n_head=2, n_embd=32),
                        train=TrainConfig(batch_size=4, max_iters=10, warmup_iters=2, eval_interval=5, eval_iters=2,
                                          checkpoint_interval=5, log_interval=1, device="cpu"))
        train(cfg, progress=False)
    return tmp / "run"


def check_png(path: Path, size_inches: tuple[float, float]) -> None:
    """A readable PNG of exactly size_inches * DPI pixels that is not one flat colour."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (round(size_inches[0] * DPI), round(size_inches[1] * DPI))
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, "image is (nearly) blank"


# ----------------------------------------------------------------------------------- attention


def test_attention_maps_are_the_models_own_weights(run_dir):
    loaded = load_run(run_dir, device="cpu")
    ids = loaded.tokenizer.encode("ROMEO: is it so?")
    w = attention_maps(loaded.model, ids)
    T = len(ids)
    assert w.shape == (2, 2, T, T)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, T))  # softmax rows
    assert torch.all(w.triu(diagonal=1) == 0)  # causal: nothing above the diagonal
    _, _, attn = loaded.model(torch.tensor([ids]), return_attn=True)
    torch.testing.assert_close(w, torch.stack([a[0] for a in attn]))
    # the weights really do depend on the trained parameters: a fresh model gives others
    fresh = GPT(loaded.config.model).eval()
    assert not torch.allclose(attention_maps(fresh, ids), w)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_attention_maps_of_the_last_queries_are_the_full_maps_last_rows(pos_encoding):
    """last=Q runs the earlier tokens through a KV cache: the same rows as the full T x T maps, a fraction of the
    memory (the web explorer's full-context map of GPT-2 small held 1.2 GB for one head's 256 x 256 rows)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=3, n_head=2, n_embd=16, pos_encoding=pos_encoding))
    ids = torch.randint(0, 11, (13,)).tolist()
    full = attention_maps(model, ids)  # (3, 2, 13, 13)
    for Q in (1, 4, 13, 99):
        rows = attention_maps(model, ids, last=Q)
        assert rows.shape == (3, 2, min(Q, 13), 13)
        torch.testing.assert_close(rows, full[:, :, -min(Q, 13):])
    torch.testing.assert_close(attention_maps(model, ids, last=4, layer=1), full[1, :, -4:])


def test_attention_maps_refuses_prompt_longer_than_context(run_dir):
    loaded = load_run(run_dir, device="cpu")
    with pytest.raises(FunGPTError, match="context is 32"):
        attention_maps(loaded.model, [0] * 33)


def test_attention_maps_take_a_batch_of_one_and_leave_a_training_model_training():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.5))
    model.train()
    ids = [1, 5, 2, 7]
    w = attention_maps(model, ids)  # (eval mode inside: no dropout)
    assert model.training
    assert torch.equal(attention_maps(model, torch.tensor([ids])), w)  # (1, T), as the docstring allows
    assert torch.equal(attention_maps(model, torch.tensor(ids)), w) and model.training


def test_plot_attention_greys_only_the_future_and_scales_colours_to_what_it_draws(tmp_path, monkeypatch):
    """A cell's own weight (the diagonal) is drawn, not greyed out as the future; the colour scale ends at the
    largest weight of the layers and heads drawn, not of others; and a negative --layer is refused, not read from
    the end."""
    from matplotlib.axes import Axes

    shown, real_imshow = [], Axes.imshow

    def imshow(self, w, *args, **kwargs):
        shown.append((np.ma.getmaskarray(w).copy(), kwargs.get("vmax")))
        return real_imshow(self, w, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", imshow)
    T = 4
    w = torch.softmax(torch.randn(2, 1, T, T).masked_fill(torch.ones(T, T).triu(1).bool(), -torch.inf), -1)
    w[0, 0, 0, 0] = 1.0
    w[1] *= 0.5  # layer 1's weights all lie below layer 0's largest (1.0)
    plot_attention(w, list("abcd"), tmp_path / "a.png", layers=[1])
    [(mask, vmax)] = shown
    assert mask.tolist() == np.triu(np.ones((T, T), dtype=bool), k=1).tolist()
    assert vmax == pytest.approx(float(w[1].max())) and vmax < 1.0
    with pytest.raises(FunGPTError, match="--layer -1 does not exist: this model has 2 layers"):
        plot_attention(w, list("abcd"), tmp_path / "b.png", layers=[-1])
    with pytest.raises(FunGPTError, match="--head -1 does not exist"):
        plot_attention(w, list("abcd"), tmp_path / "b.png", heads=[-1])
    assert not (tmp_path / "b.png").exists()


def test_token_labels_make_whitespace_visible():
    tok = CharTokenizer.train("ab \n\t\r")
    assert token_labels(tok, tok.encode("a b\t\r\n")) == ["a", "␣", "b", "\\t", "\\r", "\\n"]
    # other control characters as escapes: an ESC token printed raw started a terminal's escape code
    assert show_token("\x1b[31m\x08\x7f\x85é") == "\\x1b[31m\\x08\\x7f\\x85é"


@pytest.mark.parametrize("flags,grid", [([], (2, 2)), (["--layer", "1"], (1, 2)), (["--layer", "0", "--head", "1"],
                                                                                    (1, 1))])
def test_cli_attention_writes_image(run_dir, tmp_path, flags, grid):
    out = tmp_path / "att.png"
    prompt = "ROMEO: is it so?"
    assert main(["attention", str(run_dir), "--prompt", prompt, "--out", str(out), *flags]) == 0
    check_png(out, attention_figsize(*grid, len(prompt)))


def test_long_token_labels_leave_the_axis_names_inside_the_image(tmp_path):
    """One layer's heads in a row left too little room under them: "key (attended to)" was half out of the image,
    and further with BPE words as labels (upright under the bottom row). Its edges must be blank."""
    from matplotlib.image import imread

    for labels in (["R", "OME", "O", ":", "␣Is", "␣it", "␣so", "?"],  # (as `fungpt attention` draws one layer)
                   ["␣gentlemen", "␣therefore", "NORTHUMBERLAND", "␣it", "␣so", "?", "␣what", "␣say"]):
        plot_attention(torch.softmax(torch.randn(1, 4, 8, 8), dim=-1), labels, tmp_path / "a.png",
                       title="run at step 400: attention weights\n(row = query, column = key; grey = future, masked)")
        pixels = imread(tmp_path / "a.png")[..., :3]  # (height, width, RGB) in 0..1
        edges = [pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:]]
        assert all(float(edge.min()) > 0.9 for edge in edges), labels  # nothing drawn up to the edges


@pytest.mark.parametrize("spelled", [["--run", "RUN"], ["--run=RUN"]])
def test_the_run_may_be_named_with_run_as_sample_takes_it(run_dir, tmp_path, spelled):
    """attention and serve take the run folder without a flag; `--run RUN`, copied from sample, said only that
    the argument 'run' was missing."""
    out = tmp_path / "att.png"
    args = [a.replace("RUN", str(run_dir)) for a in spelled]
    assert main(["attention", "--prompt", "ROMEO", "--layer", "0", "--head", "0", *args, "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_a_run_folder_whose_name_starts_with_a_dash(run_dir, tmp_path, monkeypatch):
    """`--run=-name` was read as an option ("Missing value for argument 'run'"), where sample takes it."""
    (tmp_path / "-run").symlink_to(run_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--"]):
        out = tmp_path / f"att{len(extra)}.png"
        assert main(["attention", "--run=-run", "--prompt", "RO", "--layer", "0", "--head", "0", "--out", str(out),
                     *extra]) == 0
        assert out.stat().st_size > 0


@pytest.mark.parametrize("args, said", [
    (["RUN", "--prompt", "hi", "--run"], "--run needs a run folder: fungpt attention RUN ... (or --run RUN)"),
    (["--run", "--prompt", "hi"], "--run needs a run folder: fungpt attention RUN ... (or --run RUN)"),
    (["RUN", "--run", "OTHER", "--prompt", "hi"],
     "the run is named 2 times (RUN, OTHER): name it once, as fungpt attention RUN or --run RUN"),
    (["--run", "RUN", "--prompt", "hi", "--run=OTHER"],
     "the run is named 2 times (RUN, OTHER): name it once, as fungpt attention RUN or --run RUN"),
    (["--prompt", "hi", "--layer", "-1", "RUN", "--run", "OTHER"],  # (the positional after options' values)
     "the run is named 2 times (RUN, OTHER): name it once, as fungpt attention RUN or --run RUN"),
    (["--prompt=hi", "--run", "OTHER", "--", "RUN"],
     "the run is named 2 times (RUN, OTHER): name it once, as fungpt attention RUN or --run RUN"),
    (["--run=", "--prompt", "hi"], "--run needs a run folder: fungpt attention RUN ... (or --run RUN)"),
])
def test_a_run_named_twice_or_not_at_all_is_one_line(args, said, capsys):
    assert main(["attention", *args]) == 2
    assert capsys.readouterr().err == f"error: {said}\n"


def test_cli_attention_says_when_it_draws_many_heatmaps(run_dir, tmp_path, monkeypatch, capsys):
    """GPT-2's 144 heads took 7 s to draw with nothing said; a few heads are drawn without a word."""
    import fungpt.viz

    drawn = []
    monkeypatch.setattr(fungpt.viz, "plot_attention", lambda weights, labels, out, **kw: drawn.append(out) or out)
    assert main(["attention", str(run_dir), "--prompt", "ROMEO", "--out", str(tmp_path / "a.png")]) == 0
    assert "drawing" not in capsys.readouterr().err  # (2 layers x 2 heads)
    real_maps = fungpt.viz.attention_maps
    monkeypatch.setattr(fungpt.viz, "attention_maps", lambda model, ids, **kw: real_maps(model, ids).repeat(3, 3, 1, 1))
    assert main(["attention", str(run_dir), "--prompt", "ROMEO", "--out", str(tmp_path / "b.png")]) == 0
    assert "fungpt: drawing 36 heatmaps of 5 x 5 tokens ..." in capsys.readouterr().err and len(drawn) == 2


def test_cli_attention_bad_layer_is_one_line(run_dir, tmp_path, capsys):
    out = tmp_path / "att.png"
    assert main(["attention", str(run_dir), "--prompt", "ROMEO", "--layer", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --layer 5 does not exist") and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("T", [1, 5])
def test_attention_title_fits_a_narrow_figure(tmp_path, monkeypatch, T):
    """One head of a short prompt makes the narrowest figure: its title must wrap, not be cut at both ends."""
    import fungpt.viz as viz

    shown = {}

    def keep(fig, out):
        fig.canvas.draw()
        shown["title"] = fig._suptitle.get_window_extent()
        shown["figure"] = fig.bbox
        return out

    monkeypatch.setattr(viz, "_save", keep)
    w = torch.softmax(torch.randn(1, 1, T, T).masked_fill(torch.ones(T, T).triu(1).bool(), -torch.inf), -1)
    title = "a-run-with-a-long-name at step 5000: attention weights\n(row = query, column = key; grey = future, masked)"
    plot_attention(w, list("abcde")[:T], tmp_path / "a.png", title=title)
    assert shown["figure"].x0 <= shown["title"].x0 and shown["title"].x1 <= shown["figure"].x1
    assert shown["figure"].y0 <= shown["title"].y0 and shown["title"].y1 <= shown["figure"].y1


def test_plot_attention_svg_is_valid_xml(tmp_path):
    w = torch.softmax(torch.randn(1, 2, 5, 5).masked_fill(torch.ones(5, 5).triu(1).bool(), -torch.inf), -1)
    out = plot_attention(w, list("abcde"), tmp_path / "a.svg")
    assert ET.parse(out).getroot().tag.endswith("svg")


def test_drawing_leaves_a_notebooks_plotting_as_it_was(run_dir, tmp_path, monkeypatch):
    """The loss plot (drawn by every train()), attention and positions switched pyplot's backend to Agg: in a
    notebook, plt.show() and inline plots then showed nothing for the rest of the kernel's life."""
    import matplotlib

    matplotlib.use("pdf")  # (any backend but Agg: a notebook's inline one, here one that needs no display)
    try:
        monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("switched the backend"))
        import matplotlib.pyplot as plt

        before = plt.get_fignums()
        plot_runs([run_dir], out=tmp_path / "loss.png")
        assert main(["attention", str(run_dir), "--prompt", "RO", "--out", str(tmp_path / "a.png")]) == 0
        assert main(["positions", "--pos-encoding", "rope", "--out", str(tmp_path / "p.png")]) == 0
        assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == before  # none of ours left in pyplot
        assert all((tmp_path / name).stat().st_size > 0 for name in ("loss.png", "a.png", "p.png"))
    finally:  # (the tests after this one draw with Agg, whatever happened here)
        monkeypatch.undo()
        matplotlib.use("Agg")


def test_tokens_the_font_lacks_do_not_print_matplotlibs_warning(tmp_path):
    """`fungpt attention --prompt "こんにちは"` printed matplotlib's UserWarning with a raw source line."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fungpt.plot import plot_runs, save_figure

    fig, ax = plt.subplots()
    ax.set_title("\u3053\u3093\u306b\u3061\u306f")  # hiragana: not in matplotlib's own DejaVu fonts
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        save_figure(fig, tmp_path / "cjk.png")
    plt.close(fig)
    assert (tmp_path / "cjk.png").stat().st_size > 0
    run = tmp_path / "\u5b9f\u9a13"  # a run folder named in kanji: its name is the curve's label
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": 1.5}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_runs([run], tmp_path / "loss.png")


# ----------------------------------------------------------------------------------- positions


@pytest.mark.parametrize("kind", ["sinusoidal", "rope", "learned"])
def test_cli_positions_writes_image(run_dir, tmp_path, kind):
    out = tmp_path / f"{kind}.png"
    args = ["positions", "--pos-encoding", kind, "--out", str(out)]
    if kind == "learned":
        args += ["--run", str(run_dir)]
    assert main(args) == 0
    check_png(out, POSITION_FIGSIZE[kind])


def test_plot_takes_runs_with_run_and_positions_without(run_dir, tmp_path, monkeypatch):
    """Every other command names a run both ways: `plot --run RUN` and `positions RUN` were unknown options."""
    import sys

    import fungpt.viz as viz

    plotted = []
    monkeypatch.setattr(sys.modules["fungpt.plot"], "plot_runs", lambda runs, out, x: plotted.append(runs) or out)
    assert main(["plot", "--run", str(run_dir), "--run=b", "c", "--out", str(tmp_path / "l.png")]) == 0
    assert plotted == [[str(run_dir), "b", "c"]]
    drawn = []
    monkeypatch.setattr(viz, "plot_positions", lambda kind, out, **k: drawn.append(k) or out)
    assert main(["positions", str(run_dir), "--pos-encoding", "rope", "--out", str(tmp_path / "p.png")]) == 0
    assert drawn and drawn[0]["name"] == run_dir.name
    assert main(["positions", "--out", str(tmp_path / "p.png"), "--pos-encoding", "rope", str(run_dir)]) == 0
    assert len(drawn) == 2  # (after the options too, as sample takes its run)
    assert main(["positions", str(run_dir), "--run", "other", "--out", str(tmp_path / "p.png")]) == 2
    assert main(["plot", "--out", str(tmp_path / "l.png"), "--run"]) == 2  # (was "Unrecognized options: --run")
    # a folder named with a leading dash, with --run or after --, and runs named both ways at once
    assert main(["plot", "c", "--run", "-r", "--out", str(tmp_path / "l.png"), "--x", "time"]) == 0
    assert plotted[-1] == ["c", "-r"]
    assert main(["positions", "--pos-encoding", "rope", "--out", str(tmp_path / "p.png"), "--", str(run_dir)]) == 0
    assert len(drawn) == 3
    assert main(["positions", str(run_dir), "--run"]) == 2  # (the flag without its folder: not "named 2 times")


def test_titles_name_the_run_given_as_a_dot(run_dir, tmp_path, monkeypatch):
    """`fungpt attention .` was titled " at step N" and `positions --run .` ".: rope ...": the name of Path(".")."""
    import fungpt.viz as viz

    titles = []
    monkeypatch.setattr(viz, "plot_attention", lambda *a, title, **k: titles.append(title) or tmp_path / "a.png")
    real = viz.plot_positions
    monkeypatch.setattr(viz, "plot_positions", lambda *a, **k: titles.append(k.get("name") or k["run"].run_dir) or
                        real(*a, **k))
    monkeypatch.chdir(run_dir)
    assert main(["attention", ".", "--prompt", "RO", "--layer", "0", "--head", "0", "--out",
                 str(tmp_path / "a.png")]) == 0
    assert titles[-1].startswith(f"{run_dir.name} at step ")
    assert main(["positions", "--run", ".", "--pos-encoding", "rope", "--out", str(tmp_path / "p.png")]) == 0
    assert titles[-1] == run_dir.name
    from fungpt.errors import folder_name

    assert [folder_name(p) for p in (".", "", run_dir / "..", "~")] == [run_dir.name, run_dir.name,
                                                                        run_dir.parent.name, Path.home().name]


def test_positions_learned_needs_a_run(tmp_path, capsys):
    assert main(["positions", "--pos-encoding", "learned", "--out", str(tmp_path / "p.png")]) == 2
    assert "--run" in capsys.readouterr().err
    assert main(["positions", "--out", str(tmp_path / "p.png")]) == 2  # auto, without a run to take it from
    assert "say which encoding to draw" in capsys.readouterr().err
    # "none", the fourth encoding the docs name, was refused by the parser as an unknown choice
    assert main(["positions", "--pos-encoding", "none", "--out", str(tmp_path / "p.png")]) == 2
    assert "a 'none' model has no position encoding to draw" in capsys.readouterr().err


def test_positions_of_a_run_without_positions_says_so(run_dir, tmp_path, monkeypatch, capsys):
    """It said "--pos-encoding 'none' has no picture", naming a flag the user had not passed."""
    cfg = load_run_config(run_dir)
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "nopos"), model=dataclasses.replace(
        cfg.model, pos_encoding="none"), train=dataclasses.replace(cfg.train, max_iters=2))
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    train(cfg, progress=False)
    assert main(["positions", "--run", str(tmp_path / "nopos"), "--out", str(tmp_path / "p.png")]) == 2
    assert "has pos_encoding = 'none': there is no position encoding to draw; pass --pos-encoding sinusoidal or " \
           "rope" in capsys.readouterr().err


def test_positions_of_a_run_with_only_a_best_checkpoint_or_damaged_weights(run_dir, tmp_path, monkeypatch, capsys):
    """A run with only its best checkpoint was told to pass --checkpoint best, which positions did not have; and a
    formula's picture (RoPE, sinusoidal) loaded the weights it does not need, refusing a run whose weights were
    damaged. A quoted ~ in --out made a folder named ~."""
    run = tmp_path / "bestonly"
    shutil.copytree(run_dir, run)
    best = tmp_path / "best-only"  # a run with `best` and no `latest`
    shutil.copytree(run_dir, best)
    if ckpt.find_checkpoint(best, "best") is None:
        pytest.skip("the fixture run saved no best checkpoint")
    shutil.rmtree(ckpt.find_checkpoint(best, "latest"))
    (best / "latest.json").unlink(missing_ok=True)
    out = tmp_path / "p.png"
    assert main(["positions", "--run", str(best), "--out", str(out)]) == 2
    assert "pass --checkpoint best" in capsys.readouterr().err
    assert main(["positions", "--run", str(best), "--checkpoint", "best", "--out", str(out)]) == 0
    check_png(out, POSITION_FIGSIZE["learned"])
    # RoPE at a run's shape, its weights damaged: drawn from its config.json
    for weights in run.glob("checkpoints/*/model.safetensors"):
        weights.write_bytes(b"damaged")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["positions", "--run", "~/bestonly", "--pos-encoding", "rope", "--out", "~/rope.png"]) == 0
    check_png(tmp_path / "rope.png", POSITION_FIGSIZE["rope"])
    assert f"fungpt: wrote {tmp_path / 'rope.png'}" in capsys.readouterr().out


def test_sinusoidal_positions_draw_only_sine_channels_under_the_sine_title(tmp_path, monkeypatch):
    # n_embd 50: channel n_embd // 2 = 25 is odd, a cosine (1 at p = 0); every curve drawn under "channels 2i: sin"
    # must be a sine, 0 at p = 0
    import matplotlib.axes

    from fungpt.viz import plot_positions, position_table

    curves = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, y, *a, **k: curves.append((k.get("label"), y))
                        or real(ax, y, *a, **k))
    plot_positions("sinusoidal", tmp_path / "sin.png", block_size=16, n_embd=50, n_head=2)
    table = position_table("sinusoidal", 16, 50)
    drawn = {label: y for label, y in curves if label and label.startswith("channel ")}
    assert sorted(int(label.split()[1]) for label in drawn) == [0, 6, 16, 24, 32]
    for label, y in drawn.items():
        assert y[0] == 0.0, label  # sin(0)
        torch.testing.assert_close(torch.as_tensor(y), table[:, int(label.split()[1])])


def test_rope_positions_of_an_odd_head_size_are_refused_in_one_line(tmp_path):
    from fungpt.viz import plot_positions

    with pytest.raises(FunGPTError, match="RoPE needs an even head size, got n_embd/n_head = 15: it rotates pairs of "
                                          "a head's channels; draw --pos-encoding sinusoidal instead"):
        plot_positions("rope", tmp_path / "rope.png", block_size=16, n_embd=30, n_head=2)
    assert not (tmp_path / "rope.png").exists()


def test_rope_scores_depend_only_on_the_offset():
    s = rope_relative_scores(block_size=24, head_size=16)  # (T, T)
    torch.testing.assert_close(s[1:, 1:], s[:-1, :-1], atol=1e-4, rtol=1e-4)  # constant along diagonals
    assert s.diagonal().mean() > s[0, 20]  # q resembles k, so the zero offset scores highest


def test_cosine_similarity_matrix():
    table = torch.randn(10, 8)
    sim = cosine_similarity_matrix(table)
    torch.testing.assert_close(sim.diagonal(), torch.ones(10))
    torch.testing.assert_close(sim, sim.T)
    # every entry is the cosine of its two rows' angle (a matrix of ones passed the two checks above)
    torch.testing.assert_close(sim, torch.nn.functional.cosine_similarity(table[:, None], table[None], dim=-1))
    assert sim.min() < 0  # (random rows: some point apart)
    # a diverged run's table (entries past 1e19): its rows' lengths overflowed float32, and every entry was 0
    torch.testing.assert_close(cosine_similarity_matrix(table * 1e30), sim)


def test_attention_maps_of_a_diverged_model_are_refused_not_drawn_blank():
    """NaN weights drew as the colormap's "bad" grey, the colour of the masked future: a blank picture, exit 0 (and
    nulls from the explorer's API)."""
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        model.blocks[0].attn.c_attn.weight.fill_(float("nan"))
    with pytest.raises(FunGPTError, match=r"^the attention weights are not finite numbers \(NaN\): .* training "
                                          r"diverged; draw a checkpoint saved before that \(--checkpoint best, "):
        attention_maps(model, [1, 2, 3])


# ---------------------------------------------------------------------------------------- plot


def write_metrics(run: Path, rows: list[dict]) -> Path:
    run.mkdir(parents=True)
    # after the rows: JSON that is no row, a damaged byte, and a half-written last line, which readers skip
    text = "".join(json.dumps(r) + "\n" for r in rows) + '5\n'
    (run / "metrics.jsonl").write_bytes(text.encode() + b'\xff\xfe\n{"step": 9, "trai')
    return run


def test_plot_runs_with_and_without_val_rows(tmp_path, monkeypatch):
    with_val = write_metrics(tmp_path / "a", [{"step": s, "train_loss": 4 - s / 10, "tokens": 64 * s,
                                               "elapsed_s": s / 2} for s in range(1, 20)]
                             + [{"step": 0, "train_loss": 4.2, "val_loss": 4.2, "tokens": 0, "elapsed_s": 0.0},
                                {"step": 19, "train_loss": 2.1, "val_loss": 2.3, "tokens": 1216, "elapsed_s": 9.5}])
    no_val = write_metrics(tmp_path / "b", [{"step": s, "train_loss": 4 - s / 8, "tokens": 64 * s,
                                             "elapsed_s": s / 3} for s in range(1, 20)])
    for x in ("step", "tokens", "time"):
        out = plot_runs([with_val, no_val], tmp_path / f"loss-{x}.png", x=x)
        check_png(out, (8, 5))
    svg = plot_runs([no_val], tmp_path / "loss.svg")
    assert ET.parse(svg).getroot().tag.endswith("svg")
    # A run named twice (b and ./b) is drawn once, with one legend entry, in the order first given
    svg = plot_runs([no_val, with_val, tmp_path / "." / "b"], tmp_path / "twice.svg").read_text(encoding="utf-8")
    assert svg.count("<!-- b train -->") == 1 and svg.index("<!-- b train -->") < svg.index("<!-- a train -->")
    # a run given as `.` is named as its folder, not "" (the legend said " train")
    monkeypatch.chdir(with_val)
    assert "<!-- a train -->" in plot_runs([Path(".")], tmp_path / "dot.svg").read_text(encoding="utf-8")
    # a link to a run is named as given (it was named as the folder it leads to)
    try:
        (tmp_path / "mine").symlink_to(with_val, target_is_directory=True)
    except OSError:
        pass
    else:
        assert "<!-- mine train -->" in plot_runs([tmp_path / "mine"], tmp_path / "link.svg").read_text(
            encoding="utf-8")
    # a run of one logged step: its one point is drawn (a line through one point draws nothing)
    one = write_metrics(tmp_path / "one", [{"step": 1, "train_loss": 4.0, "tokens": 64, "elapsed_s": 0.5}])
    svg = plot_runs([one], tmp_path / "one.svg").read_text(encoding="utf-8")
    lines = re.split(r'<g id="line2d_\d+">', svg)[1:]  # (grid lines and ticks too; the legend's sample has no clip)
    train_line = next(g for g in lines if "stroke-opacity: 0.35" in g and "clip-path" in g.split("</g>")[0])
    assert "<use" in train_line.split("</g>")[0]  # a marker at the point


def test_plot_runs_says_when_the_runs_tokens_differ(tmp_path, capsys):
    """A char run's loss per token reads far below a BPE run's that predicts the same text better: plotted on one
    axis without a word, the figure misled (bits per byte compare). Tokenizers are told apart by what their ids
    stand for: one model folder's tokenizer, saved from its tokenizer.json or its vocab.json + merges.txt, or from
    a copy elsewhere, is the same tokens."""
    from fungpt.tokenizer import BPETokenizer

    text = "the cat sat on the mat. the dog sat on the log.\n" * 50
    runs = {}

    def run(name: str, tok, vocab: int) -> Path:
        runs[name] = write_metrics(tmp_path / name, [{"step": 1, "train_loss": 3.0}])
        tok.save(runs[name])
        (runs[name] / "config.json").write_text(json.dumps({"model": {"vocab_size": vocab}}), encoding="utf-8")
        return runs[name]

    chars = CharTokenizer.train(text)
    run("c", chars, chars.vocab_size), run("c2", CharTokenizer.train(text), chars.vocab_size)
    bpe = BPETokenizer.train(text, 270)
    run("b", bpe, bpe.vocab_size), run("b2", BPETokenizer.train(text, 260), 260)
    plot_runs([runs["c"], runs["c2"]], tmp_path / "same.png")
    assert "note" not in capsys.readouterr().err
    plot_runs([runs["c"], runs["b"], runs["c2"], runs["b2"]], tmp_path / "mixed.png")
    assert capsys.readouterr().err == (
        f"fungpt: note: these runs' tokens differ (char {chars.vocab_size}: {runs['c']}, {runs['c2']}; bpe "
        f"{bpe.vocab_size}: {runs['b']}; bpe 260: {runs['b2']}), so their losses per token do not compare; `fungpt "
        f"eval RUN` gives each one's bits per byte, which do\n")
    # the same BPE learned again (the same tokens), and one of that size from other text (other tokens)
    run("b3", BPETokenizer.train(text, 270), bpe.vocab_size)
    other = BPETokenizer.train(text.upper() + text[::-1], 270)
    assert other.vocab_size == bpe.vocab_size == 270
    run("b4", other, bpe.vocab_size)
    plot_runs([runs["b"], runs["b3"]], tmp_path / "again.png")
    assert "note" not in capsys.readouterr().err
    plot_runs([runs["b"], runs["b4"]], tmp_path / "merges.png")
    assert capsys.readouterr().err.startswith("fungpt: note: these runs' tokens differ (bpe 270 each, with other "
                                              "tokens), so their losses per token do not compare")
    # a damaged file says nothing (the plot is what was asked for)
    (runs["b"] / "tokenizer_meta.json").write_text('{"kind": "b', encoding="utf-8")
    plot_runs([runs["c"], runs["b"]], tmp_path / "damaged.png")
    assert capsys.readouterr().err == "" and (tmp_path / "damaged.png").is_file()


def test_plot_runs_says_when_the_runs_val_splits_are_other_text(corpus, tmp_path, capsys):
    """Two runs of one corpus, text added to it between them (tokens alike, or other merges of one size): drawn
    without a word, or with "`fungpt eval RUN` gives bits per byte, which do" compare, which they do not: each
    run's val split is other text."""
    def run(name: str):
        cfg = RunConfig(out_dir=str(tmp_path / name), data=DataConfig(path=str(corpus)),
                        model=GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=16),
                        train=TrainConfig(batch_size=2, max_iters=2, eval_iters=1, device="cpu", plot=False))
        train(cfg, progress=False)
        return tmp_path / name

    a, same = run("a"), run("same")
    capsys.readouterr()
    plot_runs([a, same], tmp_path / "same.png")
    assert "note" not in capsys.readouterr().err
    with corpus.open("a", encoding="utf-8") as f:
        f.write("the cat sat on the wall.\n" * 200)  # (the same characters: the tokens alike)
    b = run("b")
    capsys.readouterr()
    plot_runs([a, b], tmp_path / "other.png")
    assert capsys.readouterr().err == (
        "fungpt: note: these runs' val splits are other text (their corpus, or its split, differs), so their val "
        "losses do not compare; `fungpt eval RUN --input FILE` scores each on one same file\n")


def record_plots(monkeypatch) -> list[tuple[str, list, list]]:
    """(label, x, y) of every line plot_runs draws, in order."""
    from matplotlib.axes import Axes

    drawn, real_plot = [], Axes.plot

    def plot(self, xs, ys, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(xs), list(ys)))
        return real_plot(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    return drawn


def test_plot_runs_draws_val_loss_on_the_val_curve(tmp_path, monkeypatch):
    """Eval rows also log the train loss of their step: the val curve must show val_loss, not that."""
    run = write_metrics(tmp_path / "a", [{"step": 1, "train_loss": 4.0}, {"step": 2, "train_loss": 3.5},
                                         {"step": 0, "train_loss": 4.4, "val_loss": 4.5},
                                         {"step": 2, "train_loss": 3.4, "val_loss": 3.9}])
    drawn = record_plots(monkeypatch)
    plot_runs([run], tmp_path / "loss.svg")
    assert drawn == [("a train", [1, 2], [4.0, 3.5]), ("a val", [0, 2], [4.5, 3.9])]


def test_plot_runs_skips_rows_without_a_loss(tmp_path, monkeypatch):
    """A row with a step but no train_loss (damage, or a row another tool appended) is skipped, not a KeyError."""
    run = write_metrics(tmp_path / "a", [{"step": 1, "train_loss": 4.0}, {"step": 2, "lr": 0.1},
                                         {"step": 3, "train_loss": 3.5}])
    drawn = record_plots(monkeypatch)
    plot_runs([run], tmp_path / "loss.svg")
    assert drawn == [("a train", [1, 3], [4.0, 3.5])]
    # against tokens, an eval row that does not say how many (written by an older version) is left out of the val
    # curve, as train rows without them are left out of theirs
    run = write_metrics(tmp_path / "b", [{"step": 1, "train_loss": 4.0, "tokens": 64},
                                         {"step": 0, "train_loss": 4.4, "val_loss": 4.5},
                                         {"step": 1, "train_loss": 4.0, "val_loss": 4.1, "tokens": 64}])
    drawn.clear()
    plot_runs([run], tmp_path / "tokens.svg", x="tokens")
    assert drawn == [("b train", [64], [4.0]), ("b val", [64], [4.1])]


def test_plot_runs_says_what_it_cannot_draw_and_marks_a_point_left_alone(tmp_path, monkeypatch, capsys):
    """NaN and inf losses vanished without a word, and a finite train point between them with them (no line)."""
    from matplotlib.axes import Axes

    nan, inf = float("nan"), float("inf")
    run = write_metrics(tmp_path / "a", [{"step": 10, "train_loss": 4.0}, {"step": 20, "train_loss": 3.5},
                                         {"step": 30, "train_loss": nan}, {"step": 40, "train_loss": 3.0},
                                         {"step": 50, "train_loss": inf}, {"step": 20, "train_loss": 3.5,
                                                                           "val_loss": inf}])
    marked, real_plot = {}, Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, xs, ys, *a, **k: marked.setdefault(k.get("label"), k.get(
        "markevery")) and 0 or real_plot(self, xs, ys, *a, **k))
    plot_runs([run], tmp_path / "loss.png")
    assert marked["a train"] == [3]  # step 40, between the NaN and the inf
    assert capsys.readouterr().err == (f"fungpt: note: {run} has 3 NaN or infinite loss(es) in its metrics.jsonl, "
                                       f"first at step 20: they cannot be drawn, so its curves break there\n")


def test_a_diverged_runs_evals_are_marked_and_its_axis_reaches_its_end():
    """Skipped steps log no train row and NaN evals draw nothing: a 10-step run that diverged after step 1 was drawn
    as a 1-step run, its divergence nowhere in the figure."""
    from fungpt.plot import _loss_figure

    nan = float("nan")
    fig = _loss_figure([("a", ([0, 1], [4.0, 3.9]), ([0, 5, 10], [4.1, nan, nan]))], "step")
    ax = fig.axes[0]
    assert ax.get_xlim()[1] >= 10
    marks = [line for line in ax.get_lines() if line.get_label() == "a val not finite (at the top)"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [5, 10] and marks[0].get_marker() == "x"
    healthy = _loss_figure([("b", ([0, 1], [4.0, 3.9]), ([0, 1], [4.1, 4.0]))], "step")
    assert len(healthy.axes[0].get_lines()) == 2  # (nothing added to a run without such evals)


def test_plot_runs_whose_losses_are_all_nan_draws_nothing_and_says_so(tmp_path, capsys):
    """A run of NaN and inf losses only was drawn as an empty figure (its axes made up) with the note that "its
    curves break there"; beside a drawable run it is left out with a note of its own."""
    nan, inf = float("nan"), float("inf")
    bad = write_metrics(tmp_path / "bad", [{"step": 1, "train_loss": nan}, {"step": 2, "train_loss": inf,
                                                                           "val_loss": nan}])
    with pytest.raises(FunGPTError, match=r"every loss in the metrics.jsonl of .*bad is NaN or infinite: there is "
                                          r"nothing to draw"):
        plot_runs([bad], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    good = write_metrics(tmp_path / "good", [{"step": 1, "train_loss": 4.0}])
    plot_runs([bad, good], tmp_path / "both.png")
    assert capsys.readouterr().err == (f"fungpt: note: every loss of {bad} in its metrics.jsonl is NaN or infinite: "
                                       f"it is left out of the figure\n")
    assert (tmp_path / "both.png").exists()


def test_a_figure_that_fails_to_save_leaves_no_file_behind(tmp_path, monkeypatch):
    """A write that fails half way (a full disk) is one FunGPTError naming --out, and its temporary file is gone."""
    from matplotlib.figure import Figure

    def half_written(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    run = write_metrics(tmp_path / "a", [{"step": 1, "train_loss": 4.0}, {"step": 2, "train_loss": 3.5}])
    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(FunGPTError, match=r"could not write .*loss\.png: No space left on device"):
        plot_runs([run], tmp_path / "out" / "loss.png")
    assert list((tmp_path / "out").iterdir()) == []


def test_plot_runs_labels_runs_of_one_folder_name_by_their_paths(tmp_path, monkeypatch):
    """Two runs named `run` in different folders got the same legend entries ("run train" twice): which is which?"""
    first = write_metrics(tmp_path / "x" / "run", [{"step": 1, "train_loss": 4.0}])
    second = write_metrics(tmp_path / "y" / "run", [{"step": 1, "train_loss": 3.0}])
    drawn = record_plots(monkeypatch)
    plot_runs([first, second], tmp_path / "loss.svg")
    assert [(label.replace("\n", ""), ys) for label, _, ys in drawn] == [(f"{first} train", [4.0]),
                                                                           (f"{second} train", [3.0])]


def test_plot_runs_draws_a_run_named_relative_and_absolute_once(tmp_path, monkeypatch):
    """`b` and /abs/path/b are one run: drawn once, under its first name (pathlib does not see them as equal)."""
    run = write_metrics(tmp_path / "b", [{"step": 1, "train_loss": 4.0}, {"step": 2, "train_loss": 3.0}])
    monkeypatch.chdir(tmp_path)
    drawn = record_plots(monkeypatch)
    plot_runs([run, "b"], tmp_path / "loss.svg")
    assert drawn == [("b train", [1, 2], [4.0, 3.0])]


def test_plot_runs_labels_a_folder_name_that_is_not_utf8(tmp_path, monkeypatch):
    """A run folder named with a byte that is not UTF-8 (Python holds it as a lone surrogate): matplotlib refused
    the label with a traceback, and training's loss.png was never drawn."""
    import os

    run = write_metrics(Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")),
                        [{"step": 1, "train_loss": 4.0}, {"step": 2, "train_loss": 3.0}])
    drawn = record_plots(monkeypatch)
    plot_runs([run], tmp_path / "loss.png")
    assert drawn == [("caf\ufffd train", [1, 2], [4.0, 3.0])] and (tmp_path / "loss.png").stat().st_size > 0


def test_every_run_of_a_sweep_has_its_own_look():
    """matplotlib has 10 colours: the 1st and the 11th run of a sweep were drawn alike, in the plot and its legend."""
    from fungpt.plot import _loss_figure

    curves = [(f"lr{i}", ([1, 2], [4.0, 3.0]), ([2], [3.5])) for i in range(12)]
    lines = _loss_figure(curves, "step").axes[0].get_lines()  # a train and a val line per run
    looks = [(line.get_color(), line.get_linestyle(), line.get_linewidth()) for line in lines]
    assert len(set(looks)) == len(looks) == 24


def test_dollar_signs_in_run_names_and_tokens_are_text_not_maths(tmp_path):
    """matplotlib reads text between two $ as maths: a run folder named a$$b, or GPT-2's "$$" token on an axis of
    `fungpt attention`, ended the command with a traceback, and lr$1e-3$ was drawn in the legend as italic lr1e-3."""
    from fungpt.plot import _loss_figure

    for name in ("a$$b", "lr$1e-3$"):
        run = write_metrics(tmp_path / name, [{"step": 1, "train_loss": 4.0}, {"step": 2, "train_loss": 3.0}])
        assert main(["plot", str(run), "--out", str(tmp_path / "loss.png")]) == 0
    legend = _loss_figure([("lr$1e-3$", ([1], [4.0]), ([], []))], "step").axes[0].get_legend()
    assert [(t.get_text(), t.get_parse_math()) for t in legend.get_texts()] == [("lr$1e-3$ train", False)]
    weights = torch.softmax(torch.randn(1, 1, 4, 4), dim=-1)
    plot_attention(weights, ["$$", "x", "$$", "\\alpha$"], tmp_path / "a.png", title="a$$b at step 3")
    check_png(tmp_path / "a.png", attention_figsize(1, 1, 4, 1, label_chars=len("\\alpha$")))


def test_plot_skips_rows_whose_numbers_are_not_numbers_and_names_runs_it_leaves_out(tmp_path, capsys):
    """A metrics.jsonl row with a step "x" or a loss [1] (valid JSON, not a row of ours) ended `fungpt plot` with a
    traceback; a run without the rows that --x needs vanished from the figure without a word."""
    odd = write_metrics(tmp_path / "odd", [{"step": 1, "train_loss": 4.0}, {"step": "x", "train_loss": 3.5},
                                           {"step": 3, "train_loss": [1]}, {"step": True, "train_loss": 3.0},
                                           {"step": 4, "train_loss": float("nan")}, {"step": 5, "train_loss": 2.5}])
    train_rows, _ = read_metrics(odd)
    assert [r["step"] for r in train_rows] == [1, 4, 5]
    assert main(["plot", str(odd), "--out", str(tmp_path / "a.png")]) == 0
    with_tokens = write_metrics(tmp_path / "new", [{"step": 1, "tokens": 64, "train_loss": 4.0}])
    assert main(["plot", str(odd), str(with_tokens), "--x", "tokens", "--out", str(tmp_path / "b.png")]) == 0
    assert (f"fungpt: note: {odd} has no loss rows with 'tokens' in its metrics.jsonl: it is left out of the figure "
            f"(try --x step)") in capsys.readouterr().err


def test_plot_cli_on_trained_run_and_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "loss.png"
    assert main(["plot", str(run_dir), "--x", "tokens", "--out", str(out)]) == 0
    check_png(out, (8, 5))
    empty = write_metrics(tmp_path / "empty", [])
    assert main(["plot", str(empty), "--out", str(tmp_path / "e.png")]) == 2
    assert "no loss rows" in capsys.readouterr().err
    assert not (tmp_path / "e.png").exists()


def test_figures_are_written_under_a_name_of_their_own(run_dir, tmp_path, capsys):
    """The image goes to a temporary file first; that name was OUT.tmp.png, a user's file of that name was
    overwritten, and errors named the temporary file instead of --out."""
    out = tmp_path / "loss.png"
    (tmp_path / "loss.tmp.png").write_text("mine")
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0
    assert (tmp_path / "loss.tmp.png").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "loss.png", "loss.tmp.png"]
    (tmp_path / "x.png").mkdir()
    for command in (["plot", str(run_dir)], ["attention", str(run_dir), "--prompt", "ROMEO:"]):
        assert main([*command, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {tmp_path / 'x.png'} is a folder; give a file name" in err
    (tmp_path / "a_file").write_text("")
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "a_file" / "loss.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not write {tmp_path / 'a_file' / 'loss.png'}: ") and ".tmp" not in err


# ------------------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("damage, said", [
    ("metrics_number", None), ("metrics_bytes", None), ("metrics_tokens", None),
    ("manifest", "manifest.json is corrupt"),
])
def test_inspect_a_damaged_run_is_one_line_or_skips_the_damage(run_dir, tmp_path, capsys, damage, said):
    import shutil

    from fungpt import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    if damage == "metrics_number":
        with open(run / "metrics.jsonl", "a") as f:
            f.write("5\n")
    elif damage == "metrics_bytes":
        with open(run / "metrics.jsonl", "ab") as f:
            f.write(b"\xff\n")
    elif damage == "metrics_tokens":  # a row whose tokens are no whole number
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 11, "tokens": "many"}\n')
    else:
        (ckpt.find_checkpoint(run) / "manifest.json").write_text("{bad")
    code = main(["inspect", str(run)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if said is None:
        assert code == 0 and "tokens seen" in captured.out  # the last good row still counts
        assert re.search(r"last logged step +10\n", captured.out), captured.out
    else:
        assert code == 2 and said in captured.err and captured.err.count("\n") == 1


def test_inspect_names_a_checkpoint_that_other_commands_refuse(run_dir, tmp_path, capsys):
    """Its weights deleted, or config.json's model edited since: inspect showed the checkpoint's step and size as
    if all were well, and the edited model's parameter count beside it."""
    import json
    import shutil

    from fungpt import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["inspect", str(run)]) == 0
    assert re.search(r"latest checkpoint +step \d+, [\d.]+ KiB\n", capsys.readouterr().out)
    config = json.loads((run / "config.json").read_text())
    config["model"]["n_layer"] += 1
    (run / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(run)]) == 0
    assert ("(damaged: it was trained with another model than config.json describes (n_layer): the numbers above "
            "are config.json's)") in capsys.readouterr().out
    (ckpt.find_checkpoint(run) / ckpt.MODEL_FILE).unlink()
    assert main(["inspect", str(run)]) == 0
    assert "(damaged: model.safetensors is missing)" in capsys.readouterr().out


def test_inspect_counts_every_process_tokens_per_step(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    one = inspect_target(run)["tokens_per_step"]
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "world_size": 2}))  # as a torchrun job of 2 writes it
    assert inspect_target(run)["tokens_per_step"] == 2 * one == 2 * 4 * 32


def test_a_run_json_of_the_wrong_shape_is_one_line(run_dir, tmp_path):
    import shutil

    from fungpt.runs import data_dir_of

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for bad in ('"str"', '{"data_dir": 5}', "[1]"):
        (run / "run.json").write_text(bad)
        with pytest.raises(FunGPTError, match="run.json is missing or corrupt"):
            data_dir_of(run)


def test_inspect_run(run_dir, capsys):
    info = inspect_target(run_dir)
    model = GPT(load_run(run_dir, device="cpu").config.model)
    assert info["params"] == model.num_params()
    rows = info["param_rows"]
    block = sum(c for m, _, c in rows if m.startswith("blocks.*"))
    top = sum(c for m, _, c in rows if not m.startswith("blocks.*"))
    assert top + 2 * block == info["params"]  # two identical blocks
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert info["tokens_seen"] == last["tokens"] == 10 * 4 * 32
    assert info["flops_per_token_train"] == model.flops_per_token()
    assert 3 * info["flops_per_token_forward"] == info["flops_per_token_train"]  # training = forward + 2x backward
    assert ("lm_head", "tied to wte", 0) in rows  # (its matrix is wte's, counted once)
    mem = info["memory"]
    assert mem["weights"] == 4 * info["params"] and mem["optimizer"] == 2 * mem["weights"]
    assert main(["inspect", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "blocks.*.attn.c_attn" in text and f"{info['params']:,}" in text and "1,280" in text
    # as every command on a run, with --run too (it said only "Missing value for argument 'target'")
    assert main(["inspect", "--run", str(run_dir)]) == 0 and capsys.readouterr().out == text
    assert main(["inspect", "--target", str(run_dir)]) == 2  # (its parameter's name is no option)
    assert capsys.readouterr().err == ("error: Unrecognized options: --target (`fungpt inspect --help` lists the "
                                       "options)\n")
    # its config.json, as `train --config` takes it: the same model, planned as a config
    as_config = inspect_target(run_dir / "config.json")
    assert as_config["kind"] == "config"
    assert [r for r in as_config["param_rows"] if r[0].startswith("blocks.*")] == \
        [r for r in rows if r[0].startswith("blocks.*")]  # (the vocabulary comes from its data, as for a .toml)


def test_inspect_config_without_prepared_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))  # nothing prepared here
    root = Path(__file__).resolve().parents[1]
    assert main(["inspect", str(root / "configs/shakespeare-char-cpu.toml")]) == 0
    out = capsys.readouterr().out
    assert "assuming" in out and "804,096" in out  # the README's 0.8M-parameter model (no biases: nanoGPT's)
    assert "planned: 2,000 steps = 1,536,000 tokens" in out
    assert "QK-norm no, bias no, dropout 0, lm_head tied to wte\n" in out
    # --batch-size is for the memory at another batch: the run's tokens per step stay its own
    assert main(["inspect", str(root / "configs/shakespeare-char-cpu.toml"), "--batch-size", "1"]) == 0
    assert "planned: 2,000 steps = 1,536,000 tokens" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nothing.txt")]) == 2
    # a config saved under another name reads as TOML, as `train --config` reads it (it was "neither a run folder
    # nor a .toml config")
    shutil.copy(root / "configs/shakespeare-char-cpu.toml", tmp_path / "mine.txt")
    assert main(["inspect", str(tmp_path / "mine.txt")]) == 0 and "804,096" in capsys.readouterr().out
    # a time budget ends the speedrun, not its max_iters (1,000,000 steps were "planned")
    assert main(["inspect", str(root / "configs/speedrun-cpu.toml")]) == 0
    out = capsys.readouterr().out
    assert "planned: a time budget of 1.63 min (train.max_minutes), or max_iters = " in out and "tokens" not in \
        out.split("planned:")[1]
    # the model's options that change what it computes, not only its sizes (QK-norm and the untied head were not said)
    assert "QK-norm yes, bias no, dropout 0, lm_head untied (its own weights), RoPE base 10000" in out


def test_inspect_says_a_data_path_that_does_not_exist(tmp_path, monkeypatch, capsys):
    """A config naming text that is not there was said to be "not prepared yet": the typo came out only at train."""
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "typo.toml").write_text('[data]\npath = "nonexist.txt"\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "typo.toml"]) == 0
    assert ("data.path 'nonexist.txt' does not exist (training would stop there): assuming the config's vocab_size = "
            in capsys.readouterr().out)
    (tmp_path / "colon.toml").write_text('[data]\npath = "nope: a.txt"\n', encoding="utf-8")  # (said whole)
    assert main(["inspect", "colon.toml"]) == 0
    assert "data.path 'nope: a.txt' does not exist (training would stop there)" in capsys.readouterr().out
    (tmp_path / "nonexist.txt").write_text("the cat sat\n" * 50, encoding="utf-8")  # there, not prepared: as before
    assert main(["inspect", "typo.toml"]) == 0
    assert "data not prepared yet: assuming the config's vocab_size = " in capsys.readouterr().out


def test_inspect_and_the_dry_run_count_one_layer_head_and_sequence_in_the_singular(tmp_path, monkeypatch, capsys):
    """A learner's smallest model read "1 layers x 1 heads", "all 1 blocks" and "1 sequences"."""
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "one.toml").write_text('[model]\nn_layer = 1\nn_head = 1\nn_embd = 8\nblock_size = 16\n',
                                       encoding="utf-8")
    assert main(["inspect", str(tmp_path / "one.toml"), "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "model: 1 layer x 1 head x 8 channels" in out and "  1 block " in out and "1 sequence of 16" in out
    assert " 1 layers" not in out and "1 heads" not in out and "1 blocks" not in out and "1 sequences" not in out
    (tmp_path / "t.txt").write_text("hello there\n" * 40, encoding="utf-8")
    assert main(["train", "--config", str(tmp_path / "one.toml"), "--data.path", str(tmp_path / "t.txt"),
                 "--out-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    assert "parameters (1 layer, 1 head, n_embd 8" in capsys.readouterr().out


def test_inspect_estimates_memory_at_the_batch_asked_for_and_the_bpe_vocabulary_configured(tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))  # nothing prepared here
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat\n" * 10, encoding="utf-8")
    config = tmp_path / "bpe.toml"
    config.write_text(f'[data]\npath = "{(tmp_path / "corpus.txt").as_posix()}"\ntokenizer = "bpe"\n'
                      f'vocab_size = 1000\n[train]\nbatch_size = 8\n', encoding="utf-8")
    info = inspect_target(config)
    assert info["config"].model.vocab_size == 1000 and "BPE vocabulary size 1,000" in info["vocab_note"]
    at_one = inspect_target(config, batch_size=1)
    assert (info["memory"]["batch_size"], at_one["memory"]["batch_size"]) == (8, 1)
    assert at_one["memory"]["activations"] * 8 == info["memory"]["activations"]
    assert at_one["tokens_per_step"] == info["tokens_per_step"]  # (the run's own batch still trains it)


def test_inspect_refuses_the_precision_training_refuses(tmp_path, monkeypatch, capsys):
    """An explicit dtype was taken as given: inspect sized Muon with float16, which training refuses."""
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "m16.toml"
    config.write_text('[model]\nn_layer = 1\nn_embd = 32\nn_head = 2\nblock_size = 16\n'
                      '[train]\noptimizer = "muon"\ndtype = "float16"\n', encoding="utf-8")
    assert main(["inspect", str(config)]) == 2
    assert "'muon' does not support float16 loss scaling" in capsys.readouterr().err


def test_inspect_a_gpu_config_where_there_is_no_gpu(tmp_path, monkeypatch, capsys):
    """configs/speedrun-gpu.toml asks for device "cuda": inspecting it on a laptop (to size a GPU before renting
    one) was refused as if it were trained here. It shows the memory in the dtype a recent GPU would use."""
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root = Path(__file__).resolve().parents[1]
    assert main(["inspect", str(root / "configs/speedrun-gpu.toml")]) == 0
    out = capsys.readouterr().out
    assert "note: no cuda device here: memory estimated as on one that computes in bfloat16" in out
    assert "tokens, bfloat16 (estimate" in out


def test_inspect_an_exported_hugging_face_folder(run_dir, tmp_path, capsys):
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    run = load_run(run_dir, device="cpu")
    assert "(Hugging Face model)" in out and f"{run.model.num_params():,}" in out
    assert "2 layers x 2 heads x 32 channels, context 32" in out and "planned" not in out
    # its config.json given: the folder (was an error advising to fine-tune from it)
    assert main(["inspect", str(tmp_path / "hf" / "config.json")]) == 0
    assert capsys.readouterr().out == out


DROPOUT = GPTConfig(vocab_size=65, block_size=128, n_layer=2, n_head=2, n_embd=32, dropout=0.1)  # CPU SDPA: unfused


@pytest.mark.parametrize("cfg,impl,dtype", [
    (GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64), "sdpa", "float32"),
    (GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32, pos_encoding="rope"), "plain",
     "float32"),
    (DROPOUT, "sdpa", "float32"),
    (DROPOUT, "sdpa", "bfloat16"),  # its (T, T) tensors stay float32 (bfloat16 products on a CPU)
    (GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False), "sdpa", "bfloat16"),
    (GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32, pos_encoding="rope", qk_norm=True),
     "sdpa", "bfloat16"),
    # RMSNorm keeps each norm's normalised input too (was 22% under before the formula counted it)
    (GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, norm="rmsnorm", qk_norm=True),
     "sdpa", "float32"),
    (GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64, norm="rmsnorm", qk_norm=True,
               pos_encoding="rope", activation="relu2"), "sdpa", "bfloat16"),
])
def test_activation_estimate_matches_saved_tensors(cfg, impl, dtype):
    """The formula in estimate_memory against the bytes autograd really keeps for the backward pass."""
    torch.manual_seed(0)
    model = GPT(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:  # weights are counted separately
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          bfloat16_products() if dtype == "bfloat16" else contextlib.nullcontext()):  # (bfloat16 on a CPU)
        model(idx, idx, attn_impl=impl)
    mem = estimate_memory(cfg, batch_size=3, dtype=dtype, attn_impl=impl)
    # (bfloat16 products keep the weights' bfloat16 copies for the backward pass too: estimated apart)
    estimate = mem["activations"] + mem["weight_copies"]
    assert 0.85 < estimate / sum(saved.values()) < 1.15  # (measured 0.93-1.06)


# ---------------------------------------------------------------------------------- show-probs


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.6),
                                                     (0.9, 10, 0.8)])
def test_sampling_distribution_is_what_sampling_draws_from(temperature, top_k, top_p):
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 3
    probs = sampling_distribution(logits, temperature, top_k, top_p)
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    # computed here from the definitions: softmax(logits / T), the top_k largest, then the smallest set of
    # the most probable reaching top_p, renormalised
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    order = expected.argsort(descending=True)
    keep = order[:top_k] if top_k else order
    if top_p is not None:
        renorm = expected[keep] / expected[keep].sum()
        keep = keep[:int((renorm.cumsum(0) - renorm < top_p).sum())]
    expected = torch.zeros_like(expected).index_fill(0, keep, 1.0) * expected
    torch.testing.assert_close(probs[0], expected / expected.sum(), rtol=1e-5, atol=1e-6)
    for seed in range(20):  # same generator state -> the same draw from the same distribution
        ours = draw(probs, torch.Generator().manual_seed(seed))
        theirs = sample_next_token(logits, torch.Generator().manual_seed(seed), temperature, top_k, top_p)
        assert ours.item() == theirs.item()
    if top_k is not None:
        assert int((probs > 0).sum()) <= top_k


def test_top_candidates():
    tok = CharTokenizer.train("abc\n")
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0])  # '\n' < 'a' < 'b' < 'c' in sorted vocab
    cands = top_candidates(logits, tok, k=3)
    assert [c[1] for c in cands] == ["a", "b", "\\n"]
    assert cands[0][2] == pytest.approx(torch.softmax(logits, 0)[1].item())
    assert [c[0] for c in top_candidates(logits, tok, k=3, top_k=1)] == [1]  # filtered tokens are left out


@pytest.mark.parametrize("show_probs", [False, True])
def test_a_sample_ends_at_endoftext_unless_asked_to_go_on(run_dir, monkeypatch, capsys, show_probs):
    """In BPE and GPT-2 data <|endoftext|> separates documents: a sample is one document (as Hugging Face's
    generate stops at its eos token); --no-stop-at-eot goes on across documents."""
    import dataclasses
    import importlib

    from fungpt.tokenizer import BPETokenizer

    sample_mod = importlib.import_module("fungpt.sample")  # (`import fungpt.sample` names the function)

    bpe = BPETokenizer.train("The cat sat on the mat. " * 20, vocab_size=270)
    hello, more = bpe.encode("The cat"), bpe.encode(" sat")
    drawn = [*hello, bpe.eot_id, *more]
    real = load_run(run_dir, device="cpu")

    class Scripted(torch.nn.Module):  # draws `drawn`, whatever the model would
        def generate_stream(self, idx, max_new_tokens, yield_logits=False, **kw):
            for t in drawn[:max_new_tokens]:
                ids = torch.tensor([t])
                yield (ids, torch.zeros(1, bpe.vocab_size)) if yield_logits else ids

    scripted = dataclasses.replace(real, model=Scripted(), tokenizer=bpe)
    monkeypatch.setattr(sample_mod, "load_run", lambda *a, **k: scripted)
    out = io.StringIO()
    assert sample(run_dir, max_new_tokens=10, out=out, show_probs=show_probs) == ["The cat"]
    assert "<|endoftext|>" not in out.getvalue().split("--- text ---")[-1]
    assert sample(run_dir, max_new_tokens=10, show_probs=show_probs, stop_at_eot=False) == [
        "The cat<|endoftext|> sat"]
    if not show_probs:  # (there the drawn <|endoftext|> has its line)
        # a sample that ends at its first token: an empty line alone looked like a failure
        drawn[:] = [bpe.eot_id, *more]
        assert sample(run_dir, max_new_tokens=10, out=io.StringIO()) == [""]
        assert "the sample ended at once: the model's first token was <|endoftext|>" in capsys.readouterr().err


@pytest.mark.parametrize("temperature,top_k", [(0.5, 2), (0.0, None)])
def test_show_probs_shows_the_drawn_tokens_probability_under_the_sampling_settings(run_dir, monkeypatch, temperature,
                                                                                    top_k):
    """Each line's p is the drawn token's probability, and its candidates those of the distribution sampled from
    (temperature, top-k); greedy (temperature 0) shows the model's own softmax."""
    import dataclasses
    import importlib

    sample_mod = importlib.import_module("fungpt.sample")  # (`import fungpt.sample` names the function)
    tok = CharTokenizer.train("abcd")
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])  # a > b > c > d
    real = load_run(run_dir, device="cpu")

    class Scripted(torch.nn.Module):  # draws b, then a, whatever sampling would
        def generate_stream(self, idx, max_new_tokens, yield_logits=False, **kw):
            for t in (1, 0)[:max_new_tokens]:
                yield torch.tensor([t]), logits

    monkeypatch.setattr(sample_mod, "load_run", lambda *a, **k: dataclasses.replace(real, model=Scripted(),
                                                                                    tokenizer=tok))
    out = io.StringIO()
    sample(run_dir, prompt="a", max_new_tokens=2, out=out, show_probs=True, show_top=3, temperature=temperature,
           top_k=top_k)
    rows = [ln for ln in out.getvalue().splitlines() if ln.strip()[:1].isdigit()]
    probs = torch.softmax(logits[0] / (temperature or 1.0), 0)
    if top_k:
        probs = torch.cat([probs[:top_k] / probs[:top_k].sum(), torch.zeros(4 - top_k)])
    shown = [(ln.split("|")[0].split()[1:], ln.split("|")[1].split()) for ln in rows]
    assert shown[0][0] == ["b", f"{probs[1]:.3f}"] and shown[1][0] == ["a", f"{probs[0]:.3f}"]
    listing = [(text, f"{q:.3f}") for text, q in zip("abc", probs.tolist()) if q > 0]
    assert shown[0][1] == [x for pair in listing for x in pair]  # (top-k 2: two candidates)
    # the header says as many as a line can show (it said "top 3" over lines of top-k's 2)
    said = ("up to 2 top candidates, probabilities after temperature 0.5" if top_k else
            "top 3 candidates, probabilities of the model's own softmax")  # (the greedy header lacked its "of")
    assert f"| {said}" in out.getvalue()


def test_show_probs_header_counts_the_candidates_a_line_can_show(run_dir):
    """--show-top 1000 on a 65-character model said "top 1000 candidates"; under top-p, as many as its share holds."""
    vocab = load_run_config(run_dir).model.vocab_size
    for flags, said in ((dict(show_top=1000), f"up to {vocab} top candidates"),
                        (dict(top_p=0.5, top_k=None), "up to 5 top "),
                        (dict(show_top=12, top_k=3, temperature=0.0), "top 12 candidates")):  # (greedy: unfiltered)
        out = io.StringIO()
        sample(run_dir, prompt="a", max_new_tokens=1, out=out, show_probs=True, device="cpu", **flags)
        assert said in out.getvalue().splitlines()[1], (flags, out.getvalue())


def test_show_probs_same_text_and_one_line_per_token(run_dir):
    plain, shown = io.StringIO(), io.StringIO()
    a = sample(run_dir, prompt="ROMEO:", max_new_tokens=8, device="cpu", out=plain)
    b = sample(run_dir, prompt="ROMEO:", max_new_tokens=8, device="cpu", out=shown, show_probs=True, show_top=3)
    assert a == b  # showing probabilities does not change what is sampled
    lines = [ln for ln in shown.getvalue().splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 8
    for line in lines:
        probs = [float(p) for p in line.split("|")[1].split()[1::2]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.001
    assert shown.getvalue().rstrip().endswith("ROMEO:" + a[0].rstrip())
    assert shown.getvalue().startswith("prompt: 'ROMEO:'\n")
    assert "top-k 200, top-p off:" in shown.getvalue()  # (an unset top-p: not Python's None)
    # no prompt: the header says what the model was given, not prompt: ''
    shown = io.StringIO()
    sample(run_dir, max_new_tokens=2, device="cpu", out=shown, show_probs=True)
    assert shown.getvalue().startswith("prompt: none: the model starts from '\\n', as a fresh document\n")


def test_walkthroughs_show_probs_excerpt_is_the_figures_own_rows():
    """docs/walkthrough.md quotes the first rows of docs/figures/show-probs.txt: regenerating the figure must
    not leave the walkthrough describing draws the file no longer shows."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    figure = (docs / "figures" / "show-probs.txt").read_text(encoding="utf-8").splitlines()
    walkthrough = (docs / "walkthrough.md").read_text(encoding="utf-8")
    excerpt = walkthrough.split("From\n[figures/show-probs.txt](figures/show-probs.txt):")[1].split("```text\n")[1]
    rows = [line for line in excerpt.split("```")[0].splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) >= 3
    assert rows == [line for line in figure if line.strip()[:1].isdigit()][:len(rows)]


@pytest.mark.parametrize("show_probs", [False, True])
def test_a_sample_ends_where_its_text_first_holds_the_stop_text(run_dir, show_probs):
    """--stop TEXT: the sample is the one without it, up to and including the first TEXT in it (same seed)."""
    whole = sample(run_dir, max_new_tokens=80, seed=5, stop_at_eot=False)[0]
    stop = whole[20:22]
    first = whole.find(stop)
    out = io.StringIO()
    assert sample(run_dir, max_new_tokens=80, seed=5, stop=stop, out=out, show_probs=show_probs) == [
        whole[: first + len(stop)]]
    if not show_probs:  # the written text ends there too (then the line's end)
        assert out.getvalue() == whole[: first + len(stop)] + "\n"
    missing = "\x00never"  # a stop the sample never holds changes nothing
    assert sample(run_dir, max_new_tokens=80, seed=5, stop=missing, show_probs=show_probs) == [whole]
    # only the generated text counts: the prompt holding the stop text ends nothing
    prompted = sample(run_dir, prompt=stop, max_new_tokens=80, seed=5, stop=stop, show_probs=show_probs)[0]
    assert prompted and prompted.find(stop) in (-1, len(prompted) - len(stop))


@pytest.mark.parametrize("show_probs", [False, True])
def test_a_token_that_runs_past_the_stop_text_is_cut_at_its_end(run_dir, monkeypatch, show_probs):
    import dataclasses
    import importlib

    from fungpt.tokenizer import BPETokenizer

    sample_mod = importlib.import_module("fungpt.sample")  # (`import fungpt.sample` names the function)
    bpe = BPETokenizer.train("The cat sat on the mat. " * 20, vocab_size=300)
    drawn = bpe.encode("The cat sat on the mat. The cat")
    assert "ca" not in [bpe.decode([t]) for t in drawn]  # (so "ca" ends inside a token: " cat" or a longer one)

    class Scripted(torch.nn.Module):  # draws `drawn`, whatever the model would
        def generate_stream(self, idx, max_new_tokens, yield_logits=False, **kw):
            for t in drawn[:max_new_tokens]:
                ids = torch.tensor([t])
                yield (ids, torch.zeros(1, bpe.vocab_size)) if yield_logits else ids

    real = load_run(run_dir, device="cpu")
    monkeypatch.setattr(sample_mod, "load_run", lambda *a, **k: dataclasses.replace(real, model=Scripted(),
                                                                                    tokenizer=bpe))
    out = io.StringIO()
    # "at" ends inside the token " cat" (or one holding more): the sample ends just past it, whatever the token
    assert sample(run_dir, max_new_tokens=20, stop="ca", out=out, show_probs=show_probs) == ["The ca"]
    if not show_probs:
        assert out.getvalue() == "The ca\n"


def test_a_stop_text_the_model_cannot_write_is_said(run_dir, capsys):
    r"""A char model never writes a character it was not trained on: a --stop holding one ('\r\n\r\n' for text
    with '\n' line endings) could never end a sample, and said nothing."""
    sample(run_dir, max_new_tokens=5, stop="\r\n\r\n", out=io.StringIO())
    assert "--stop '\\r\\n\\r\\n' holds '\\r', a character this model's tokenizer cannot write" in (
        capsys.readouterr().err)
    sample(run_dir, max_new_tokens=5, stop="\n\n", out=io.StringIO())
    assert "cannot write" not in capsys.readouterr().err


def test_the_stop_text_may_span_pieces_and_is_found_once():
    from fungpt.sample import stop_end

    assert stop_end("", "abc", None) is None
    assert stop_end("xa", "bcd", "abc") == 4  # "xabcd": "abc" ends at 4, spanning the two pieces
    assert stop_end("abc", "abc", "abc") == 6  # (a match inside `made` was found at its own step)
    assert stop_end("ab", "x", "abc") is None


def test_the_sample_command_reads_escapes_in_its_stop_text(run_dir, monkeypatch, capsys):
    import importlib

    sample_mod = importlib.import_module("fungpt.sample")  # (`import fungpt.sample` names the function)
    seen = []
    monkeypatch.setattr(sample_mod, "sample", lambda *a, **kw: seen.append(kw["stop"]))
    for given in ("\\n\\n", "\\r\\n\\r\\n", "a\\tb", "\\\\n", "plain", "None", ""):
        assert main(["sample", str(run_dir), "--stop", given]) == 0
    assert main(["sample", str(run_dir)]) == 0
    # (None is that text, not "no stop": the option is a plain string, "" its default, none)
    assert seen == ["\n\n", "\r\n\r\n", "a\tb", "\\n", "plain", "None", None, None]
    with pytest.raises(FunGPTError, match="--stop '' must be some text"):  # (from Python: "" is not "none" there)
        sample_mod.check_options(stop="")


def test_the_sample_command_passes_its_stop_at_eot_flag_on(run_dir, monkeypatch):
    import importlib

    sample_mod = importlib.import_module("fungpt.sample")  # (`import fungpt.sample` names the function)
    seen = []
    monkeypatch.setattr(sample_mod, "sample", lambda *a, **kw: seen.append(kw["stop_at_eot"]))
    assert main(["sample", "--run", str(run_dir), "--no-stop-at-eot"]) == 0
    assert main(["sample", "--run", str(run_dir)]) == 0
    assert seen == [False, True]


def test_a_learned_table_asked_of_another_runs_model_names_its_encoding():
    """Passing --run of a RoPE run said "a learned position table only exists in a trained model" to a user who
    had passed a trained model."""
    from fungpt.errors import FunGPTError
    from fungpt.model import GPT, GPTConfig
    from fungpt.viz import position_table

    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8, pos_encoding="rope"))
    with pytest.raises(FunGPTError, match="this run has pos_encoding = 'rope', which has no learned table: draw "
                                          "--pos-encoding rope"):
        position_table("learned", 8, 8, model)
    # a run without positions has none of its own to draw: "draw --pos-encoding none" was refused in turn
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8, pos_encoding="none"))
    with pytest.raises(FunGPTError, match="this run has pos_encoding = 'none', which has no learned table: draw "
                                          "--pos-encoding sinusoidal or rope at its shape, or pass a run"):
        position_table("learned", 8, 8, model)


@pytest.mark.parametrize("command", ["sample", "eval", "export"])
@pytest.mark.parametrize("named", ["RUN", "--run RUN", "--run=RUN"])
def test_every_command_on_a_run_takes_it_with_or_without_run(run_dir, tmp_path, command, named, capsys):
    """`fungpt serve RUN` and `fungpt attention RUN`, but `fungpt sample --run RUN`: sample, eval and export
    refused the run named as the other two name it ("Missing from fungpt sample: --run STR")."""
    # (--show-probs takes no value: taken to, --max-new-tokens was its value and 5 a second run)
    options = {"sample": ["--show-probs", "--max-new-tokens", "5"],
               "eval": ["--device", "cpu"], "export": ["--out", str(tmp_path / "hf")]}[command]
    run = [a.replace("RUN", str(run_dir)) for a in named.split()]
    assert main([command, *options, *run]) == 0
    out = capsys.readouterr().out
    assert {"sample": "--- text ---", "eval": "perplexity", "export": "fungpt: exported"}[command] in out


def test_the_run_scan_leaves_tyros_own_options_help_and_dashed_folders_alone(run_dir, tmp_path, monkeypatch, capsys):
    """The scan that finds the run refused what tyro took before it: its completion script, --help after a typo,
    and `--run -5` (a folder whose name starts with a dash)."""
    assert main(["sample", "--tyro-print-completion", "bash"]) == 0
    assert "completion" in capsys.readouterr().out.lower()
    assert main(["sample", "--run", str(run_dir), "--bogus", "--help"]) == 0
    assert "--max-new-tokens" in capsys.readouterr().out
    (tmp_path / "-5").symlink_to(run_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--run", "-5", "--max-new-tokens", "3"]) == 0
    assert main(["sample", "--run", "--max-new-tokens", "3"]) == 2  # (an option is no folder)
    assert "--run needs a run folder" in capsys.readouterr().err


def test_show_probs_shows_a_small_probability_as_such():
    """A token drawn at a probability under 0.0005 was listed as 0.000: drawn where it could not be, it read."""
    from fungpt.sample import _probability

    assert [_probability(p) for p in (0.0341, 0.0005, 0.00031, 2.5e-9, 0.0, 1.0)] == [
        "0.034", "0.001", "3e-04", "3e-09", "0.000", "1.000"]


def test_plot_runs_wraps_a_long_run_name_in_the_legend(tmp_path, monkeypatch):
    """A sweep's long run folder names ran off the figure on one line (and tight_layout warned); cut short they could
    lose the part that tells two runs apart: they are wrapped, whole."""
    import warnings

    from fungpt.plot import LEGEND_WIDTH

    name = "sweep-" + "-".join(f"lr{i}e-4" for i in range(20))  # 141 characters
    run = write_metrics(tmp_path / name, [{"step": 1, "train_loss": 4.0}, {"step": 2, "train_loss": 3.5}])
    drawn = record_plots(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (matplotlib's "Tight layout not applied" when the legend did not fit)
        plot_runs([run], tmp_path / "loss.png")
    (label, _, _), = drawn
    lines = label.removesuffix(" train").split("\n")
    assert "".join(lines) == name and len(lines) > 1 and max(map(len, lines)) <= LEGEND_WIDTH
