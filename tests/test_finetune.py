"""Fine-tuning a pretrained Hugging Face GPT-2 (`init_from`) and exporting a run back (`fungpt export`).

Everything is hermetic: the "pretrained" model is a tiny random GPT-2 saved by transformers, with a
byte-level BPE tokenizer trained here on the test corpus. No network, no hub downloads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from fungpt import pretrained
from fungpt.cli import main
from fungpt.config import DataConfig, RunConfig, TrainConfig, default_model
from fungpt.data import BatchLoader, prepare
from fungpt.errors import FunGPTError
from fungpt.model import GPTConfig
from fungpt.runs import data_dir_of, load_run
from fungpt.tokenizer import HFTokenizer, load_tokenizer
from fungpt.train import train

transformers = pytest.importorskip("transformers")

N_POSITIONS = 64  # the pretrained model's context; the tests fine-tune with a cropped 32


def _corpus_text() -> str:
    lines = [f"the {a} {b} sat on the {c}.\n" for a in ("cat", "dog", "fox") for b in ("quietly", "slowly")
             for c in ("mat", "log", "hill", "wall")]
    return "".join(lines) * 30


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random GPT-2 in Hugging Face format, with tokenizer.json + vocab.json/merges.txt trained on the spot."""
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("hf-gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_corpus_text()], vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save(str(d / "tokenizer.json"))
    bpe.save_model(str(d))  # vocab.json + merges.txt, GPT-2's original format
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=N_POSITIONS, n_embd=32,
                                     n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)  # <|endoftext|> is id 0 here
    transformers.GPT2LMHeadModel(config).save_pretrained(d)
    return d


@pytest.fixture()
def corpus(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(_corpus_text(), encoding="utf-8")
    return path


def finetune_config(init_from: Path | str, data_path: Path, out_dir: Path, **model_overrides) -> RunConfig:
    model = dataclasses.replace(default_model(), init_from=str(init_from), **model_overrides)
    return RunConfig(out_dir=str(out_dir), data=DataConfig(path=str(data_path)), model=model,
                     train=TrainConfig(batch_size=4, max_iters=10, lr=3e-3, min_lr=3e-3, warmup_iters=0,
                                       lr_schedule="constant", eval_interval=100, eval_iters=2,
                                       checkpoint_interval=100, log_interval=1, device="cpu"))


def test_a_finetune_of_gpt2_given_data_tokenizer_gpt2_is_not_told_it_is_unused(hf_dir, corpus, tmp_path, capsys,
                                                                                monkeypatch):
    """GPT-2's own tokenizer is what data.tokenizer "gpt2" names: no note for it (a hub name's model; the local
    GPT-2 of these tests stands in for one), where another value is said to be unused."""
    import fungpt.pretrained as pretrained

    monkeypatch.setattr(pretrained, "HUB_NAMES", (*pretrained.HUB_NAMES, str(hf_dir)))
    for tokenizer, noted in (("gpt2", False), ("bpe", True)):
        cfg = finetune_config(hf_dir, corpus, tmp_path / tokenizer, block_size=32)
        cfg.data = DataConfig(path=str(corpus), tokenizer=tokenizer)
        cfg.train.max_iters = 1
        train(cfg, progress=False)
        assert (f"data.tokenizer = {tokenizer!r} is not used" in capsys.readouterr().out) is noted


def test_a_finetune_given_the_default_char_tokenizer_by_name_is_told_it_is_unused(hf_dir, corpus, tmp_path, capsys):
    """data.tokenizer = "char" is the default: only a setting the user wrote down (a shakespeare-char config given
    an init_from) is noted as unused; left out, nothing is said."""
    for named, noted in (((), False), (("tokenizer",), True)):
        cfg = finetune_config(hf_dir, corpus, tmp_path / f"run{len(named)}", block_size=32)
        cfg.train.max_iters = 1
        train(cfg, progress=False, data_named=named)
        assert ("data.tokenizer = 'char' is not used: a fine-tune encodes the text with its pretrained model's own "
                "tokenizer" in capsys.readouterr().out) is noted
    config = tmp_path / "char.toml"  # the CLI finds what the file names
    config.write_text(f'[data]\npath = "{corpus.as_posix()}"\ntokenizer = "char"\n[model]\ninit_from = '
                      f'"{hf_dir.as_posix()}"\nblock_size = 32\n[train]\nmax_iters = 1\nbatch_size = 2\n'
                      f'eval_iters = 1\ndevice = "cpu"\n', encoding="utf-8")
    assert main(["train", "--config", str(config), "--out-dir", str(tmp_path / "cli")]) == 0
    assert "data.tokenizer = 'char' is not used" in capsys.readouterr().out
    # a run's config.json records every [data] setting, the unused default too: training another like it is no note
    assert main(["train", "--config", str(tmp_path / "cli" / "config.json"), "--out-dir", str(tmp_path / "again")]) == 0
    assert "is not used" not in capsys.readouterr().out


def hf_model(path: Path) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def test_finetune_matches_transformers_then_learns_then_exports(hf_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = finetune_config(hf_dir, corpus, out, block_size=32)
    cfg.data = DataConfig(path=str(corpus), tokenizer="bpe", vocab_size=300)  # (not used: said so)
    result = train(cfg, progress=False)
    assert result["step"] == 10
    assert ("fungpt: note: data.tokenizer = 'bpe' and data.vocab_size = 300 are not used: a fine-tune encodes the "
            "text with its pretrained model's own tokenizer, the hf tokenizer from ") in capsys.readouterr().out

    # The architecture came from the checkpoint, with the position table cropped to 32.
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))["model"]
    assert (saved["n_layer"], saved["n_embd"], saved["block_size"]) == (2, 32, 32)
    assert load_tokenizer(out).name == "hf"

    # The first step's loss is the pretrained model's loss on the first batch, as transformers computes it.
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train_rows = [r for r in rows if "lr" in r]
    x, y = BatchLoader(data_dir_of(out), "train", 4, 32, device="cpu", seed=cfg.train.seed).next_batch()
    with torch.no_grad():  # y is x shifted by one token: the next-token loss on all 32 positions
        hf_logits = hf_model(hf_dir)(x).logits
        expected = torch.nn.functional.cross_entropy(hf_logits.flatten(0, 1), y.flatten()).item()
    assert train_rows[0]["step"] == 1
    assert abs(train_rows[0]["train_loss"] - expected) < 1e-4
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"] - 0.5  # it learns the corpus

    # Export: transformers loads the fine-tuned weights with the same logits, and the tokenizer too.
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "hf-out")]) == 0
    assert (f"fungpt: note: the export has 32 positions, not the {N_POSITIONS} of {hf_dir}: the fine-tune cropped "
            f"them") in capsys.readouterr().out  # (kept for good: said)
    run = load_run(out, device="cpu")
    idx = torch.randint(0, run.model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf_model(tmp_path / "hf-out")(idx).logits - run.model(idx)).abs().max().item()
    assert diff < 1e-4
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf-out")
    text = "the fox sat on the hill.<|endoftext|>the cat"
    assert auto(text)["input_ids"] == run.tokenizer.encode(text)
    assert auto.eos_token == "<|endoftext|>"
    # generate stops at the tokenizer's end-of-text id (0 here), not at GPT-2's 50256
    assert hf_model(tmp_path / "hf-out").generation_config.eos_token_id == run.tokenizer.eot_id == 0
    # Exporting again into the same (now full) folder is refused instead of mixing two exports.
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "hf-out")]) == 2


def test_vocab_and_merges_format_encodes_like_tokenizer_json(hf_dir, tmp_path):
    old_style = tmp_path / "old"
    old_style.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (old_style / name).write_bytes((hf_dir / name).read_bytes())
    a, b = HFTokenizer.from_dir(hf_dir), HFTokenizer.from_dir(old_style)
    text = "the dog sat quietly on the wall.<|endoftext|>and the fox"
    assert a.encode(text) == b.encode(text)
    assert b.decode(b.encode(text)) == text
    assert b.encode("<|endoftext|>") == [b.eot_id]
    with pytest.raises(FunGPTError, match="tokenizer.json, or vocab.json and merges.txt"):
        HFTokenizer.from_dir(tmp_path)


def test_data_prepared_with_another_tokenizer_is_refused(hf_dir, corpus, tmp_path):
    prepared = prepare(corpus, tmp_path / "char-data", tokenizer="char", progress=False)
    with pytest.raises(FunGPTError, match=r"char tokenizer .* needs its own hf tokenizer") as e:
        train(finetune_config(hf_dir, prepared, tmp_path / "run"), progress=False)
    # the way out that works for a local model folder; `fungpt prepare` cannot use that folder's tokenizer
    assert str(e.value).endswith("set data.path to the text itself (it is then encoded with the model's tokenizer)")
    assert not (tmp_path / "run" / "checkpoints").exists()
    # Prepared with the model's own tokenizer: accepted.
    own = prepare(corpus, tmp_path / "own-data", tokenizer=HFTokenizer.from_dir(hf_dir), progress=False)
    assert train(finetune_config(hf_dir, own, tmp_path / "run2", block_size=16), progress=False)["step"] == 10


def test_tokenizers_that_agree_on_the_probe_but_not_on_the_text_do_not_share_data(hf_dir, tmp_path):
    """Two ids of tokens the probe text does not hold, swapped: the probe's ids were all that was compared, so a
    fine-tune of the other model reused the first one's cached dataset, and a prepared folder passed the check."""
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    in_probe = set(HFTokenizer.from_dir(hf_dir).encode(pretrained.PROBE_TEXT))
    a, b = [name for name, i in sorted(vocab.items(), key=lambda kv: -kv[1]) if i not in in_probe][:2]  # (merges)
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tokenizer))
    ours, theirs = HFTokenizer.from_dir(hf_dir), HFTokenizer.from_dir(swapped)
    assert ours.encode(pretrained.PROBE_TEXT) == theirs.encode(pretrained.PROBE_TEXT)  # the probe cannot tell them
    assert ours.encode(_corpus_text()) != theirs.encode(_corpus_text())
    assert not pretrained.same_encoding(ours, theirs)
    assert pretrained.tokenizer_fingerprint(ours) != pretrained.tokenizer_fingerprint(theirs)
    assert pretrained.same_encoding(ours, HFTokenizer.from_dir(hf_dir))


def test_a_model_folders_post_processor_adds_no_tokens_to_the_text(hf_dir, tmp_path):
    """A tokenizer.json whose post-processor adds a BOS (transformers' GPT2Tokenizer(add_bos_token=True) saves one):
    every piece of text encoded got an <|endoftext|> the text does not hold, mid-corpus at each chunk of prepare."""
    from tokenizers import Tokenizer, processors

    bos = tmp_path / "bos"
    bos.mkdir()
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(bos / "tokenizer.json"))
    assert tok.encode("the cat").ids[0] == 0  # (what the library's default does)
    plain, with_bos = HFTokenizer.from_dir(hf_dir), HFTokenizer.from_dir(bos)
    text = "the cat sat on the mat.\nthe dog<|endoftext|>the fox"
    assert with_bos.encode(text) == plain.encode(text) and with_bos.encode_batch([text, "a"]) == plain.encode_batch(
        [text, "a"])
    assert with_bos.decode(with_bos.encode(text)) == text


@pytest.mark.parametrize(("override", "message"), [
    ({"n_layer": 6}, r"n_layer = 6 \(the checkpoint has 2\)"),
    ({"n_embd": 64, "n_head": 8}, r"n_head = 8 .*n_embd = 64"),
    ({"pos_encoding": "rope"}, "pos_encoding = 'rope'"),
    ({"block_size": 128}, "larger than the pretrained model's 64 positions"),
    ({"block_size": 65}, r"block_size = 65 is larger than the pretrained model's 64 positions: use at most 64"),
    # n_head alone, against the run default n_embd (128): not a divisibility puzzle about a width nobody set
    ({"n_head": 3}, "not divisible by n_head=3: .*a fine-tune takes both from its checkpoint: set neither"),
])
def test_contradicting_model_fields_are_refused(hf_dir, corpus, tmp_path, override, message):
    with pytest.raises(FunGPTError, match=message):
        train(finetune_config(hf_dir, corpus, tmp_path / "run", **override), progress=False)


def test_a_plain_gptconfig_with_init_from_takes_the_checkpoints_architecture(hf_dir):
    """From Python, GPTConfig(init_from=...) holds GPTConfig's own defaults (GPT-2 small's sizes): they were refused
    as contradicting the checkpoint ("remove these settings"), though nobody had set them."""
    merged = pretrained.merge_model_config(GPTConfig(init_from=str(hf_dir)), pretrained.resolve(str(hf_dir)).config,
                                           default_model())
    assert (merged.n_layer, merged.n_embd, merged.block_size) == (2, 32, 64)
    # a context asked for that is also the run's default counts (it was dropped: with a real GPT-2, the fine-tune ran
    # at 1024 positions, 16x the memory asked for); the run's default here 16, as 64 is for a real run
    ctx16 = dataclasses.replace(default_model(), block_size=16)
    merged = pretrained.merge_model_config(GPTConfig(init_from=str(hf_dir), block_size=16),
                                           pretrained.resolve(str(hf_dir)).config, ctx16)
    assert merged.block_size == 16
    with pytest.raises(FunGPTError, match=r"n_layer = 6 \(the checkpoint has 2\)"):  # a size set still counts
        pretrained.merge_model_config(GPTConfig(init_from=str(hf_dir), n_layer=6),
                                      pretrained.resolve(str(hf_dir)).config, default_model())
    # a config made from the run's defaults keeps a value that happens to be GPTConfig's (it was dropped: the
    # fine-tune ran at the checkpoint's context, not the one asked for)
    asked = dataclasses.replace(default_model(), init_from=str(hf_dir), block_size=GPTConfig().block_size)
    with pytest.raises(FunGPTError, match="block_size = 1024 is larger than the pretrained model's 64 positions"):
        pretrained.merge_model_config(asked, pretrained.resolve(str(hf_dir)).config, default_model())


def test_allowed_overrides_and_toml(hf_dir, tmp_path):
    toml = tmp_path / "ft.toml"
    toml.write_text(f'[model]\ninit_from = "{hf_dir.as_posix()}"\ndropout = 0.1\nblock_size = 16\nn_layer = 2\n',
                    encoding="utf-8")
    from fungpt.config import load_config

    cfg = load_config(toml)
    merged = pretrained.merge_model_config(cfg.model, pretrained.resolve(cfg.model.init_from).config,
                                           default_model())
    assert (merged.block_size, merged.dropout, merged.n_layer, merged.n_embd) == (16, 0.1, 2, 32)
    assert merged.vocab_size == pretrained.resolve(str(hf_dir)).tokenizer.vocab_size


def test_help_of_a_finetuning_config_says_the_model_defaults_shown_are_not_used(hf_dir, tmp_path, capsys):
    """--help showed --model.block-size (default: 64) for a GPT-2 fine-tune, which takes 1024 unless it is set."""
    toml = tmp_path / "ft.toml"
    toml.write_text(f'[model]\ninit_from = "{hf_dir.as_posix()}"\n', encoding="utf-8")
    main(["train", "--config", str(toml), "--help"])
    assert capsys.readouterr().out.startswith(f"note: {toml} fine-tunes {hf_dir.as_posix()}: the --model.* settings "
                                              f"it does not set take that model's values, not the defaults shown")


def test_hub_name_offline_and_not_cached_says_how_to_get_it(tmp_path, monkeypatch):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # an empty cache: the library read HF_HOME when it was imported, so its constant is what counts
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    with pytest.raises(FunGPTError, match=r"hf download gpt2-medium.*local folder"):
        pretrained.resolve("gpt2-medium")
    with pytest.raises(FunGPTError, match="neither 'scratch', a local Hugging Face GPT-2 folder, nor a hub name"):
        pretrained.resolve(str(tmp_path / "no-such-model"))


def _exported_char_run(text: Path, tmp_path: Path) -> Path:
    """A char run trained on `text` for two steps, in tmp_path/char-run, and exported to tmp_path/exp."""
    from fungpt.model import GPTConfig

    out = tmp_path / "char-run"
    cfg = RunConfig(out_dir=str(out), data=DataConfig(path=str(text)),
                    model=GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=16),
                    train=TrainConfig(batch_size=2, max_iters=2, eval_iters=1, log_interval=1, device="cpu"))
    train(cfg, progress=False)
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "exp")]) == 0
    return out


def test_an_exported_char_tokenizer_gives_each_token_its_own_bytes(tmp_path, monkeypatch):
    """A char run's export is character-level, not byte-level: read as GPT-2's byte alphabet, 'é' (U+00E9, one of
    its stand-in characters) was the byte E9, shown as '\\xe9' and counted as 1 byte in eval's bits per byte."""
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "cafe.txt"
    text.write_text("le café été naïf, ça ĀĂ 日本 😀\n" * 30, encoding="utf-8")
    out = _exported_char_run(text, tmp_path)
    char = load_run(out, device="cpu").tokenizer
    exported = HFTokenizer.from_dir(tmp_path / "exp")
    ids = range(char.vocab_size)
    assert [exported.token_bytes(i) for i in ids] == [char.token_bytes(i) for i in ids]
    assert "é" in [exported.token_text(i) for i in ids]


def test_export_char_run_tokenizer_loads_in_transformers(corpus, tmp_path):
    out = _exported_char_run(corpus, tmp_path)
    run = load_run(out, device="cpu")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "exp")
    text = "the dog sat\non the mat."
    assert auto(text)["input_ids"] == run.tokenizer.encode(text)
    assert auto.decode(run.tokenizer.encode(text)) == text
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["eos_token_id"] is None  # char: no end-of-text
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "exp").iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as the other files (were 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "exp").stat().st_mode & 0o777 == 0o777 & ~umask  # not private like its temporary folder

    # The exported folder fine-tunes like any Hugging Face GPT-2, though its character vocabulary cannot encode
    # every character (the tokenizer's fingerprint must not need to).
    tuned = train(finetune_config(tmp_path / "exp", corpus, tmp_path / "tuned", block_size=16), progress=False)
    assert tuned["step"] == 10
    # (named: a fine-tune's tokenizer is its pretrained model's, not one the user chose)
    with pytest.raises(FunGPTError, match=r"^the hf tokenizer from .*exp \(\d+ tokens\) cannot encode the text: "
                                          r"character 'é' is not in its vocabulary; remove it from the text \(this "
                                          r"tokenizer belongs to its model's weights\)"):
        load_tokenizer(tmp_path / "tuned").encode("café")


def test_export_of_a_non_gpt2_run_is_refused_before_any_folder_is_made(corpus, tmp_path, capsys):
    from fungpt.model import GPTConfig

    out = tmp_path / "rope-run"
    cfg = RunConfig(out_dir=str(out), data=DataConfig(path=str(corpus)),
                    model=GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=16, pos_encoding="rope"),
                    train=TrainConfig(batch_size=2, max_iters=1, eval_iters=1, log_interval=1, device="cpu"))
    train(cfg, progress=False)
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "new" / "exp")]) == 2
    assert "pos_encoding='rope'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def _one_step_run(corpus, tmp_path) -> Path:
    """A GPT-2-shaped run of one step in tmp_path/run, to export."""
    from fungpt.model import GPTConfig

    out = tmp_path / "run"
    cfg = RunConfig(out_dir=str(out), data=DataConfig(path=str(corpus)),
                    model=GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=16),
                    train=TrainConfig(batch_size=2, max_iters=1, eval_iters=1, log_interval=1, device="cpu"))
    train(cfg, progress=False)
    return out


def test_export_that_cannot_be_written_names_its_folder_and_leaves_nothing(corpus, tmp_path, capsys, monkeypatch):
    """A full disk (or a size limit) said only "error: File too large", or named the hidden temporary folder."""
    import errno
    import os

    out = _one_step_run(corpus, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr("fungpt.model.GPT.save_hf", full)
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: could not write the export to {tmp_path / 'exp'}: File too large; nothing was left there "
                   f"(free some disk space or fix permissions, then export again)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus.txt", "run"]


@pytest.mark.parametrize("where", ["fungpt.model.GPT.save_hf", "before os.replace", "as os.replace returns",
                                   "fungpt.pretrained.fsync_dir"])
def test_ctrl_c_during_an_export_says_what_it_left(corpus, tmp_path, capsys, monkeypatch, where):
    """Ctrl-C during `fungpt export` said only "fungpt: interrupted": now that nothing was written (the temporary
    folder removed, an empty --out folder given back), or, once the export has taken its name (also as that rename
    returns), that it is there, complete."""
    out = _one_step_run(corpus, tmp_path)
    exp = tmp_path / "exp"
    exp.mkdir()  # an empty folder made for it: export replaces it
    real = os.replace

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    def rename(src, dst):  # the export's rename (the empty folder already removed), interrupted before or as it returns
        if Path(dst) == exp and where.startswith("before"):
            raise KeyboardInterrupt
        real(src, dst)
        if Path(dst) == exp:
            raise KeyboardInterrupt

    monkeypatch.setattr(*(("os.replace", rename) if "os.replace" in where else (where, ctrl_c)))
    assert main(["export", "--run", str(out), "--out", str(exp)]) == 130
    err = capsys.readouterr().err
    if where.endswith("save_hf") or where.startswith("before"):
        assert err.endswith(f"\nfungpt: interrupted: nothing was written to {exp}; run the command again to export\n")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus.txt", "exp", "run"]
        assert not any(exp.iterdir())
    else:
        assert err.endswith(f"\nfungpt: interrupted: {exp} holds the export, complete\n")
        assert sorted(p.name for p in exp.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                         "tokenizer_config.json"]


def test_gpt2_tiktoken_encoding_converts_to_the_same_bpe():
    tiktoken = pytest.importorskip("tiktoken")
    # A small tiktoken encoding (GPT-2's regex, merges learned by the tokenizers library) stands in
    # for GPT-2's, which would need a download.
    from tokenizers import ByteLevelBPETokenizer

    from fungpt.tokenizer import GPT2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_corpus_text()], vocab_size=290, show_progress=False)
    inv = {v: k for k, v in pretrained._byte_to_char().items()}
    ranks = {bytes(inv[ch] for ch in tok): i for tok, i in bpe.get_vocab().items()}
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding("tiny", pat_str=pat, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})
    ours = GPT2Tokenizer(encoding=enc)
    hf = pretrained._tiktoken_to_hf(enc)
    text = "the quietly slow fox sat on 12 walls, 'tis said.<|endoftext|>  end\n"
    assert hf.encode(text).ids == ours.encode(text)
    assert hf.decode(ours.encode(text), skip_special_tokens=False) == text


def test_inspect_shows_the_pretrained_architecture_of_a_finetuning_config(hf_dir, tmp_path, monkeypatch):
    from fungpt.inspection import inspect_target

    toml = tmp_path / "ft.toml"
    toml.write_text(f'[model]\ninit_from = "{hf_dir.as_posix()}"\nblock_size = 32\n', encoding="utf-8")
    info = inspect_target(toml)
    m = info["config"].model
    # The checkpoint's shape (2 x 32, its vocabulary), with the allowed override, as training builds it
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (2, 2, 32, 32,
                                                                           hf_model(hf_dir).config.vocab_size)
    assert info["vocab_note"] is None
    # A hub name that is not in the local cache: its published shape, said so, and nothing downloaded
    monkeypatch.setattr(pretrained, "_cached_hub_folder", lambda name: None)
    monkeypatch.setattr(pretrained, "_hub_folder", lambda name: pytest.fail("inspect must not download"))
    toml.write_text('[model]\ninit_from = "gpt2-medium"\n', encoding="utf-8")
    info = inspect_target(toml)
    m = info["config"].model
    assert (m.n_layer, m.n_head, m.n_embd, m.vocab_size) == (24, 16, 1024, 50257)
    assert "not in the local Hugging Face cache" in info["vocab_note"]


def test_model_fields_written_down_count_as_set_even_at_their_default_value(hf_dir, tmp_path):
    from fungpt.config import fields_named
    from fungpt.inspection import inspect_target

    defaults = default_model()  # block_size 64, n_layer 4
    checkpoint = dataclasses.replace(defaults, block_size=1024, n_layer=12)
    # Not written down: the checkpoint's block_size. Written down as 64 (the default value): 64.
    assert pretrained.merge_model_config(defaults, checkpoint, defaults).block_size == 1024
    assert pretrained.merge_model_config(defaults, checkpoint, defaults, {"block_size"}).block_size == 64
    toml = tmp_path / "ft.toml"
    toml.write_text(f'[model]\ninit_from = "{hf_dir.as_posix()}"\nn_layer = 4\n', encoding="utf-8")
    assert fields_named(toml, ["--model.block-size", "64", "--model.dropout=0.1", "--train.lr", "1"]) == {
        "init_from", "n_layer", "block_size", "dropout"}
    # n_layer = 4 is the default, but it was asked for and the checkpoint has 2: refused, not ignored
    with pytest.raises(FunGPTError, match=r"n_layer = 4 \(the checkpoint has 2\)"):
        inspect_target(toml)
    # a preset's settings cannot be removed: the message gives the flags that override them with the checkpoint's
    rope = dataclasses.replace(defaults, pos_encoding="rope", bias=False)
    with pytest.raises(FunGPTError, match=r"on the command line \(over a preset's, say\): --model.bias "
                                          r"--model.pos-encoding learned$"):
        pretrained.merge_model_config(rope, checkpoint, defaults)
    # likewise vocab_size: padding a checkpoint's vocabulary is not something fine-tuning does
    padded = dataclasses.replace(checkpoint, vocab_size=checkpoint.vocab_size + 47)
    with pytest.raises(FunGPTError, match=rf"vocab_size = {padded.vocab_size} \(the checkpoint has "):
        pretrained.merge_model_config(padded, checkpoint, defaults, {"vocab_size"})
    assert pretrained.merge_model_config(checkpoint, checkpoint, defaults, {"vocab_size"}) == checkpoint
    # a padded checkpoint's table is trimmed to its tokenizer's size: that size, asked for, is the run's (it was
    # refused, and the checkpoint's padded size, which the run does not use, was asked for instead)
    trimmed = dataclasses.replace(checkpoint, vocab_size=checkpoint.vocab_size - 20)
    assert pretrained.merge_model_config(trimmed, checkpoint, defaults, {"vocab_size"},
                                         tokens=trimmed.vocab_size).vocab_size == checkpoint.vocab_size
    with pytest.raises(FunGPTError, match=r"vocab_size = .* \(the checkpoint has "):  # (not another size)
        pretrained.merge_model_config(trimmed, checkpoint, defaults, {"vocab_size"}, tokens=trimmed.vocab_size + 1)


class _RunsCode:
    """A pickle payload that would create a file if unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_damaged_or_foreign_weights_in_a_model_folder_are_one_line(hf_dir, tmp_path, capsys, monkeypatch):
    import shutil

    from fungpt.model import GPT

    def folder(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(hf_dir, d)
        return d

    cut = folder("cut")  # a download that stopped half way
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    junk = folder("junk")  # a .bin that is not a PyTorch file
    (junk / "model.safetensors").unlink()
    (junk / "pytorch_model.bin").write_bytes(b"not a pytorch file at all")
    evil = folder("evil")  # a .bin whose pickle would run code
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({"x": _RunsCode(marker)}, evil / "pytorch_model.bin")
    for d in (cut, junk):
        with pytest.raises(FunGPTError, match=rf"cannot read the weights in '{d}' .*damaged or not a safetensors"):
            GPT.from_hf(d)
    # named as what it is (not "damaged"), with the global it would have called
    with pytest.raises(FunGPTError, match=rf"refusing to load the weights in '{evil}': pytorch_model.bin holds more "
                                          r"than tensors \(its pickle calls getattr\), and nothing in it was run; use"):
        GPT.from_hf(evil)
    assert not marker.exists()  # refused, never run
    sharded = folder("sharded")  # save_pretrained(safe_serialization=False) of a large model
    (sharded / "model.safetensors").unlink()
    (sharded / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(FunGPTError, match="sharded pytorch_model-.*bin files, which FunGPT does not read"):
        GPT.from_hf(sharded)
    nested = folder("nested")  # a training checkpoint's layout: tensors only, but not a flat table of them
    (nested / "model.safetensors").unlink()
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, nested / "pytorch_model.bin")
    with pytest.raises(FunGPTError, match=r"not a plain table of named tensors \(it holds \['model', 'epoch'\]\)"):
        GPT.from_hf(nested)
    # a config.json that does not describe its weights (edited by hand, or from another model)
    wide = folder("wide")
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "n_embd": 64, "n_head": 4}))
    with pytest.raises(FunGPTError, match=r"do not fit its config.json: blocks.0.attn.c_attn.bias is \(96,\), "
                                          r"config.json says \(192,\) \(and \d+ more\)"):
        GPT.from_hf(wide)
    bin_cut = folder("bin_cut")  # a pytorch_model.bin that stopped half way (torch's reader: EINVAL)
    (bin_cut / "model.safetensors").unlink()
    torch.save(transformers.GPT2LMHeadModel.from_pretrained(hf_dir).state_dict(), bin_cut / "pytorch_model.bin")
    whole = (bin_cut / "pytorch_model.bin").read_bytes()
    (bin_cut / "pytorch_model.bin").write_bytes(whole[:5000])
    with pytest.raises(FunGPTError, match=rf"cannot read the weights in '{bin_cut}': the file is damaged or "
                                          r"incomplete \(a download that stopped\?\)"):
        GPT.from_hf(bin_cut)
    plain = folder("plain")  # a plain pickle (protocol 4, not torch.save's) that would run code
    (plain / "model.safetensors").unlink()
    (plain / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _RunsCode(marker)}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (torch's warning about the protocol is not shown either)
        with pytest.raises(FunGPTError, match=rf"refusing to load the weights in '{plain}': torch's safe loader "
                                              r"cannot read pytorch_model.bin \(Unsupported operand 149\), and "
                                              r"nothing in it was run"):
            GPT.from_hf(plain)
    assert not marker.exists()
    # and through the command line: one line, no traceback
    monkeypatch.setenv("FUNGPT_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["train", "--model.init-from", str(cut), "--data.path", str(hf_dir / "vocab.json"),
                 "--out-dir", str(tmp_path / "out"), "--train.device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: cannot read the weights")
    assert not (tmp_path / "out").exists()  # the weights are read before the run folder is made
    assert not list((tmp_path / "cache").glob("datasets/*"))  # and before the text is encoded (can take minutes)
    # the dry run refuses them too, as it refuses what training would, before the data too; from their files'
    # headers alone (it must not need the weights' memory), for each kind of damage above
    for bad, said in [(cut, "cannot read the weights"), (junk, "cannot read the weights"),
                      (evil, "refusing to load the weights"), (wide, "the weights in"),
                      (plain, "refusing to load the weights")]:
        assert main(["train", "--model.init-from", str(bad), "--data.path", str(hf_dir / "vocab.json"),
                     "--out-dir", str(tmp_path / "out"), "--train.device", "cpu", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"error: {said}"), err
        assert not list((tmp_path / "cache").glob("datasets/*"))
    assert not marker.exists()
    assert main(["train", "--model.init-from", str(hf_dir), "--data.path", str(hf_dir / "vocab.json"),
                 "--out-dir", str(tmp_path / "out"), "--train.device", "cpu", "--dry-run"]) == 0  # sound: passes


def test_overwriting_a_run_with_a_finetune_whose_weights_are_damaged_keeps_the_run(hf_dir, corpus, tmp_path):
    """--overwrite deleted the run, then the pretrained weights failed to load: the old run was lost."""
    import shutil

    out = tmp_path / "run"
    train(finetune_config(hf_dir, corpus, out), progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    cut = tmp_path / "cut"
    shutil.copytree(hf_dir, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FunGPTError, match="cannot read the weights"):
        train(finetune_config(cut, corpus, out), overwrite=True, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_finetune_resumes_after_its_pretrained_folder_is_gone(hf_dir, corpus, tmp_path, capsys):
    """The checkpoint holds the weights and the run folder the architecture and tokenizer: resuming does not
    need init_from any more (a moved folder, a cleared hub cache) and continues exactly."""
    import shutil

    model_dir = tmp_path / "gpt2-copy"
    shutil.copytree(hf_dir, model_dir)

    def config(out, max_iters):
        cfg = finetune_config(model_dir, corpus, out, block_size=32)
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=max_iters,
                                                                  checkpoint_interval=2))

    train(config(tmp_path / "full", 4), progress=False)
    train(config(tmp_path / "part", 2), progress=False)
    shutil.rmtree(model_dir)
    capsys.readouterr()
    assert train(config(tmp_path / "part", 4), resume=True, progress=False)["step"] == 4
    assert f"{model_dir} is not available here; resuming with the architecture and tokenizer recorded in" in \
        capsys.readouterr().out

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train_loss"]) for r in rows if "lr" in r]

    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    # a fine-tune that never saved still needs its pretrained weights: said as before
    with pytest.raises(FunGPTError, match="init_from"):
        train(config(tmp_path / "new", 2), progress=False)


def test_a_finetune_without_its_models_dropout_says_so(hf_dir, corpus, tmp_path, capsys):
    """A model folder whose config.json sets dropout 0.1 (GPT-2's), fine-tuned from the command line without
    model.dropout: it trained with 0.0, silently, and its export then said the model has none."""
    import shutil

    folder = tmp_path / "with-dropout"
    shutil.copytree(hf_dir, folder)
    spec = json.loads((folder / "config.json").read_text())
    spec.update(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    (folder / "config.json").write_text(json.dumps(spec))
    for named, dropout, noted in (((), 0.0, True), (("dropout",), 0.0, False), ((), 0.1, False)):
        cfg = finetune_config(folder, corpus, tmp_path / f"run-{len(named)}-{dropout}", block_size=32, dropout=dropout)
        cfg.train.max_iters = 1
        train(cfg, progress=False, model_named=named)
        said = capsys.readouterr().out
        assert (f"fungpt: note: {folder}'s config.json sets dropout 0.1 (resid_pdrop); this fine-tune trains with "
                f"model.dropout = 0.0: set --model.dropout 0.1" in said) is noted
    cfg = finetune_config(hf_dir, corpus, tmp_path / "plain", block_size=32)  # (its config.json: 0.0, the same)
    cfg.train.max_iters = 1
    train(cfg, progress=False)
    assert "resid_pdrop" not in capsys.readouterr().out


def nfkc_copy(hf_dir: Path, where: Path) -> Path:
    """hf_dir with an NFKC normalizer added to its tokenizer.json: the same vocabulary and merges, and the same ids for
    most text (not for ligatures, fractions or full-width letters)."""
    import shutil

    shutil.copytree(hf_dir, where)
    spec = json.loads((where / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "NFKC"}
    (where / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return where


def test_model_folders_whose_tokenizers_differ_in_a_rule_share_no_cached_data(hf_dir, corpus, tmp_path):
    """Two model folders whose tokenizer.json differed only in its normalizer shared one cached dataset: the second
    fine-tune trained on ids its tokenizer does not give, and kept the other folder's tokenizer files (which `fungpt
    export` then shipped)."""
    from fungpt.pretrained import same_encoding, tokenizer_fingerprint

    nfkc = nfkc_copy(hf_dir, tmp_path / "nfkc")
    plain, normalized = HFTokenizer.from_dir(hf_dir), HFTokenizer.from_dir(nfkc)
    assert not same_encoding(plain, normalized)  # (the probe text holds characters NFKC rewrites)
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(normalized)
    data_dirs = []
    for name, folder in (("a", nfkc), ("b", hf_dir)):
        cfg = finetune_config(folder, corpus, tmp_path / name, block_size=32)
        cfg.train.max_iters = 1
        train(cfg, progress=False)
        data_dirs.append(json.loads((tmp_path / name / "run.json").read_text())["data_dir"])
        assert json.loads((tmp_path / name / "tokenizer.json").read_text()).get("normalizer") == (
            {"type": "NFKC"} if folder == nfkc else None)
    assert data_dirs[0] != data_dirs[1]


def test_a_finetune_resumes_with_its_own_tokenizer_after_its_model_folders_changed(hf_dir, corpus, tmp_path, capsys):
    """The model folder given another tokenizer since the run began: the resume encoded the text with the new one,
    was refused, and its advice (--data.path of the run's data) was refused in turn, round and round."""
    import shutil

    model_dir = tmp_path / "gpt2-copy"
    shutil.copytree(hf_dir, model_dir)
    cfg = finetune_config(model_dir, corpus, tmp_path / "run", block_size=32)
    cfg.train.max_iters, cfg.train.checkpoint_interval = 2, 2
    train(cfg, progress=False)
    shutil.rmtree(model_dir)
    nfkc_copy(hf_dir, model_dir)
    capsys.readouterr()
    cfg.train.max_iters = 3
    assert train(cfg, resume=True, progress=False)["step"] == 3
    assert (f"fungpt: note: {model_dir} holds another tokenizer than when {tmp_path / 'run'} began: resuming with the "
            f"run's own") in capsys.readouterr().out


def test_a_finetune_whose_run_tokenizer_was_replaced_is_refused(hf_dir, corpus, tmp_path):
    """The run's own tokenizer files replaced (its model folder untouched): the resume took them as the run's, encoded
    the text with them and trained on ids of other text, saying the model folder had changed. Refused, as before,
    also with the model folder gone."""
    import shutil

    model_dir = tmp_path / "gpt2-copy"
    shutil.copytree(hf_dir, model_dir)
    cfg = finetune_config(model_dir, corpus, tmp_path / "run", block_size=32)
    cfg.train.max_iters, cfg.train.checkpoint_interval = 2, 2
    train(cfg, progress=False)
    from tokenizers import ByteLevelBPETokenizer

    other = ByteLevelBPETokenizer()  # as many tokens, other merges: its ids mean other text
    other.train_from_iterator([_corpus_text().upper() * 2], vocab_size=HFTokenizer.from_dir(hf_dir).vocab_size,
                              special_tokens=["<|endoftext|>"], show_progress=False)
    other.save(str(tmp_path / "run" / "tokenizer.json"))
    cfg.train.max_iters = 3
    with pytest.raises(FunGPTError, match="its tokenizer files are not the ones its checkpoint was trained with"):
        train(cfg, resume=True, progress=False)
    shutil.rmtree(model_dir)
    with pytest.raises(FunGPTError, match=r"its tokenizer files are not the ones its checkpoint was trained with "
                                          r"\(their fingerprint differs\), and .*gpt2-copy, whose tokenizer it was, is "
                                          r"not available here: restore the run's original tokenizer files"):
        train(cfg, resume=True, progress=False)


def test_a_finetune_resumes_with_its_own_architecture_whatever_the_flags_leave_out(hf_dir, corpus, tmp_path):
    """Resuming a fine-tune cropped to 32 positions needed --model.block-size 32 again while the pretrained
    folder was there ("different model (block_size 32 -> 64)") and not once it was gone; now neither does, and
    a different block_size is refused naming the run's own value."""
    out = tmp_path / "run"
    cfg = finetune_config(hf_dir, corpus, out, block_size=32)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=2, checkpoint_interval=2))
    train(cfg, progress=False)
    plain = finetune_config(hf_dir, corpus, out)  # block_size not set: the run default, 64
    plain = dataclasses.replace(plain, train=dataclasses.replace(cfg.train, max_iters=3))
    assert train(plain, resume=True, progress=False)["step"] == 3
    assert load_run(out, device="cpu").model.config.block_size == 32
    other = finetune_config(hf_dir, corpus, out, block_size=16)
    other = dataclasses.replace(other, train=dataclasses.replace(cfg.train, max_iters=4))
    with pytest.raises(FunGPTError, match=r"different model \(block_size 32 -> 16\)"):
        train(other, resume=True, progress=False)
    # a field named at its default value (--model.block-size 64) is asked for too
    named = dataclasses.replace(plain, train=dataclasses.replace(cfg.train, max_iters=4))
    with pytest.raises(FunGPTError, match=r"different model \(block_size 32 -> 64\)"):
        train(named, resume=True, progress=False, model_named={"block_size"})


def test_a_model_with_more_embeddings_than_tokens_fine_tunes_into_a_usable_run(hf_dir, corpus, tmp_path, capsys):
    """An embedding table padded past its tokenizer (e.g. 50,304 rows for 50,257 tokens) trained to the end, and
    then sample, eval and export refused the run (model and tokenizer of different sizes). The fine-tune now
    keeps the tokenizer's rows: the same logits for every real token, and no id without text to sample."""
    import shutil

    padded = tmp_path / "padded"
    shutil.copytree(hf_dir, padded)
    source = hf_model(hf_dir)
    n_tok = source.config.vocab_size
    config = transformers.GPT2Config(**{**source.config.to_dict(), "vocab_size": n_tok + 47})
    big = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        big.transformer.load_state_dict({k: v for k, v in source.transformer.state_dict().items() if k != "wte.weight"},
                                        strict=False)
        big.transformer.wte.weight[:n_tok] = source.transformer.wte.weight
    big.save_pretrained(padded)

    out = tmp_path / "run"
    cfg = finetune_config(padded, corpus, out, block_size=32)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=2, checkpoint_interval=2))
    train(cfg, progress=False)
    assert f"has {n_tok + 47:,} token embeddings for {n_tok:,} tokens" in capsys.readouterr().out
    from fungpt.cli import main

    assert main(["inspect", str(padded)]) == 0  # inspect says so too (it showed the trimmed model without a word)
    assert (f"the checkpoint has {n_tok + 47:,} token embeddings for its tokenizer's {n_tok:,} tokens: shown as "
            f"fine-tuning trains it") in capsys.readouterr().out
    run = load_run(out, device="cpu")
    assert run.model.config.vocab_size == run.tokenizer.vocab_size == n_tok
    # the rows kept are the tokenizer's ids, 0..n_tok-1: the pretrained embeddings, before any training
    from fungpt.model import GPT

    full = GPT.from_hf(padded)
    small = GPT(dataclasses.replace(full.config, vocab_size=n_tok))
    pretrained.load_weights(small, padded)
    assert torch.equal(small.wte.weight, full.wte.weight[:n_tok])
    # resumable, and data.tokenizer (which a fine-tune ignores) does not stand in the way
    more = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer="bpe"),
                               train=dataclasses.replace(cfg.train, max_iters=3))
    assert train(more, resume=True, progress=False)["step"] == 3
    assert main(["sample", "--run", str(out), "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert main(["eval", "--run", str(out), "--device", "cpu"]) == 0
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "hf-out")]) == 0
    assert hf_model(tmp_path / "hf-out").config.vocab_size == n_tok
    # inspect shows the table the fine-tune trains (as --dry-run does), not the padded one
    from fungpt.inspection import inspect_target

    assert inspect_target(padded)["config"].model.vocab_size == n_tok
    # the run's config.json as --config (another run like it): its vocab_size, trimmed, is not a setting of its own
    assert main(["train", "--config", str(out / "config.json"), "--out-dir", str(tmp_path / "again"),
                 "--dry-run"]) == 0
