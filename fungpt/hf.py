"""Hugging Face GPT-2 interop: load its checkpoints into a FunGPT `GPT`, and write ours in its layout.

FunGPT's parameter names follow GPT-2's, with three differences this file translates:
  * HF prefixes everything with `transformer.` and calls the blocks `h.{i}` (ours: `blocks.{i}`);
  * the position table is `wpe` (ours: `pos.wpe`, inside the swappable position module);
  * HF's GPT-2 uses `Conv1D` layers whose weight is (in, out), the transpose of `nn.Linear`'s
    (out, in), for c_attn, c_proj and c_fc: those four are transposed on the way in and out.
Only plain GPT-2 can be written (learned positions, LayerNorm, GELU, no QK-norm; a tied or untied head; without
biases, GPT-2's are written as zeros, which compute the same model).
`GPT.from_hf`, `GPT.hf_config` and `GPT.save_hf` call these functions.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

from fungpt.checkpoint import MANIFEST_FILE, check_tensors_fit_their_storage, check_torch_file, fsync, open_new_temp
from fungpt.errors import FunGPTError, is_out_of_memory, read_json, shell_quote, utf8_path
from fungpt.model import GPT, GPTConfig

# HF GPT-2 stores these four as Conv1D, whose weight is (in, out): the transpose of nn.Linear's (out, in).
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(path: str | os.PathLike) -> GPTConfig:
    """The architecture of a local Hugging Face GPT-2 folder, read from its config.json (no weights)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        # a FunGPT checkpoint folder (checkpoints/best-0000020, or checkpoints/) holds a model.safetensors too: the
        # advice to add a config.json would lead nowhere
        run = path.parent.parent if path.parent.name == "checkpoints" and (path / MANIFEST_FILE).is_file() else \
            path.parent if path.name == "checkpoints" else None
        if run is not None and _is_run_config(run / "config.json"):
            raise FunGPTError(f"'{path}' is a checkpoint of the FunGPT run '{run}', not a Hugging Face GPT-2 folder: "
                              f"{_fungpt_run_advice(run)}")
        raise FunGPTError(
            f"no Hugging Face model at '{path}' (config.json missing): pass a local folder with "
            "config.json and model.safetensors or pytorch_model.bin"
        )
    try:
        hf = read_json(path / "config.json")
    except (OSError, ValueError) as e:  # (not JSON, not UTF-8, nested too deeply)
        raise FunGPTError(f"cannot read {path / 'config.json'}: {e}; copy the model's folder again from where it "
                          f"came from") from None
    if _is_run_config(path / "config.json"):
        raise FunGPTError(f"'{path}' is a FunGPT run, not a Hugging Face GPT-2 folder: {_fungpt_run_advice(path)}")
    if isinstance(hf, dict) and hf.get("model_type", "gpt2") != "gpt2":  # (before its keys: a Llama has none of them)
        raise FunGPTError(f"'{path}' holds a {hf['model_type']!r} model: only GPT-2 checkpoints can be loaded")
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if not isinstance(hf, dict) or k not in hf]
    if missing:
        raise FunGPTError(f"{path / 'config.json'} is not a Hugging Face GPT-2 config (no {', '.join(missing)}): "
                          f"pass a folder made by save_pretrained or `fungpt export`")
    act_name = hf.get("activation_function", "gelu_new")
    # (gelu_fast computes gelu_new's tanh formula, gelu_python the exact GELU: the same functions)
    act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu",
           "gelu_python": "gelu"}.get(
        act_name if isinstance(act_name, str) else None  # (a list or object there is unhashable)
    )
    n_embd = hf["n_embd"]
    # (reorder_and_upcast_attn only computes attention in higher precision: the same model, accepted)
    unlike = {  # each option FunGPT's model lacks, if set: what this config has
        "activation_function": act is None,
        # (n_embd of another type is refused by GPTConfig below, in the file's words; null here made 4 * None fail)
        "n_inner": isinstance(n_embd, int) and hf.get("n_inner") not in (None, 4 * n_embd),
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5) != 1e-5,
        "scale_attn_weights": not hf.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": hf.get("add_cross_attention", False),  # (a decoder of an encoder-decoder model)
    }
    if any(unlike.values()):
        found = ", ".join(f"{k} = {hf.get(k)!r}" for k, bad in unlike.items() if bad)
        raise FunGPTError(f"'{path}' uses GPT-2 options FunGPT lacks ({found}; GPT-2 has activation_function "
                          f"gelu_new (FunGPT also reads gelu, gelu_pytorch_tanh, gelu_fast and gelu_python), n_inner "
                          f"4 * n_embd, layer_norm_epsilon 1e-5, plain attention scaling and no cross-attention): use "
                          f"a standard GPT-2 checkpoint")
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd, bias=True, pos_encoding="learned",
            activation=act, tie_embeddings=hf.get("tie_word_embeddings", True), norm="layernorm",
        )
    except FunGPTError as e:  # (its checks name FunGPT's fields, said here by the file's names: n_positions, ...)
        said = str(e).removesuffix(": fix its value")
        for ours, theirs in (("block_size", "n_positions"), ("tie_embeddings", "tie_word_embeddings")):
            said = said.replace(f"config {ours}=", f"config {theirs}=")
        raise FunGPTError(f"{path / 'config.json'} describes no GPT-2 that FunGPT can build ({said}): correct that "
                          f"file") from None


def load_gpt2(path: str | os.PathLike, meta: bool = False) -> GPT:
    """Load a local Hugging Face GPT-2 folder (any size gpt2 .. gpt2-xl), e.g. from save_pretrained.

    `meta`: check the folder as loading it would; from safetensors files only the weights' names, shapes and
    types are read (their headers, not their data), and the model returned is on the meta device (`fungpt
    train --dry-run`). A pytorch_model.bin is read whole either way.
    """
    path = Path(path)
    config = hf_config(path)
    hf_sd = _load_hf_weights(path, meta)
    sd, taken = {}, set()  # (taken: the storage of the tensors in sd so far)
    for key, t in hf_sd.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old checkpoints store the causal mask as a buffer; we build it on the fly
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            # e.g. int8 or float8 from a quantizer, which scales them: .float() alone would give the wrong numbers
            raise FunGPTError(f"'{path}' stores {key} as {str(t.dtype).removeprefix('torch.')} (a quantized "
                              f"checkpoint?): FunGPT loads float32, float16 or bfloat16 weights; save the model "
                              f"unquantized")
        # (a fine-tune from such weights diverged at its first step, and was told to lower its learning rate)
        if t.device.type != "meta" and not torch.isfinite(t).all():
            raise FunGPTError(f"'{path}' stores NaN or inf in {key}: its weights are damaged; download or save the "
                              f"model again")
        if key == "lm_head.weight" and config.tie_embeddings:
            # the same matrix as wte, if the file says so: a head of its own under a config that ties the two
            # (transformers then keeps the head apart) would be dropped, and the model compute something else
            if _head_differs(path, hf_sd):
                raise FunGPTError(f"'{path}' stores an lm_head.weight that differs from its wte.weight, but its "
                                  f"config.json ties the two (tie_word_embeddings true, or unset: GPT-2's default): "
                                  f"set \"tie_word_embeddings\": false there to load the head it stores")
            continue
        if key.startswith("h."):  # h.{i}.* -> blocks.{i}.*
            key = "blocks." + key.removeprefix("h.")
        elif key.startswith("wpe."):  # wpe.weight -> pos.wpe.weight
            key = "pos." + key
        if key.endswith(HF_CONV1D):
            t = t.t()
        t = t.float().contiguous()  # (the same tensor, when it already is)
        if t.data_ptr() in taken and t.device.type != "meta":  # one tensor saved under two names (an untied head
            t = t.clone()                                        # and wte, in a .bin): two parameters of their own
        taken.add(t.data_ptr())
        sd[key] = t

    # Build on the meta device (no memory, no random init) and then adopt the loaded tensors.
    with torch.device("meta"):
        model = GPT(config)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing == ["lm_head.weight"] and not unexpected:  # (transformers would give it a random head)
        raise FunGPTError(f"{path / 'config.json'} unties the head from the embedding (tie_word_embeddings false), "
                          f"but '{path}' stores no lm_head.weight: set \"tie_word_embeddings\": true there to use "
                          f"wte as the head, as GPT-2 does")
    if missing or unexpected:
        raise FunGPTError(
            f"weights in '{path}' do not match a GPT-2 model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}: is this a GPT-2 checkpoint?"
        )
    shapes = model.state_dict()
    wrong = [f"{k} is {tuple(sd[k].shape)}, config.json says {tuple(shapes[k].shape)}" for k in sorted(expected)
             if tuple(sd[k].shape) != tuple(shapes[k].shape)]
    if wrong:
        raise FunGPTError(f"the weights in '{path}' do not fit its config.json: {wrong[0]}"
                          f"{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}")
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # assign=True replaced wte's parameter: re-tie
    return model


def _is_run_config(file: Path) -> bool:
    """Whether `file` is a FunGPT run's config.json (its data, model and train sections)."""
    try:
        saved = read_json(file)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"data", "model", "train"} <= set(saved)


def _fungpt_run_advice(run: Path) -> str:
    """What to do with a FunGPT run given as init_from: resume it on its own data, or fine-tune its GPT-2 export
    (a model without GPT-2's form, RoPE say, has none: the first alone then)."""
    quoted = shell_quote(str(run))
    resume = f"`fungpt train --resume --out-dir={quoted}` continues it on its own data"
    try:
        problems = gpt2_incompatibilities(GPTConfig.from_dict(read_json(run / "config.json")["model"]))
    except (OSError, ValueError, KeyError, TypeError, FunGPTError):
        problems = []  # (a damaged config: the export says so itself)
    if problems:
        return (f"{resume}; init_from takes Hugging Face GPT-2 folders, and this run's model has no such form "
                f"({', '.join(problems)}), so it cannot start a fine-tune on other text")
    return (f"{resume}; to fine-tune it on other text, make a Hugging Face folder of it with `fungpt export --run "
            f"{quoted} --out DIR` and pass DIR as init_from")


def gpt2_incompatibilities(c: GPTConfig) -> list[str]:
    """What keeps a model of this config from being a Hugging Face GPT-2 (empty list: nothing)."""
    return [
        msg for bad, msg in [
            (c.pos_encoding != "learned", f"pos_encoding={c.pos_encoding!r} (needs 'learned')"),
            (c.norm != "layernorm", f"norm={c.norm!r} (needs 'layernorm')"),
            (c.activation not in ("gelu", "gelu_tanh"), f"activation={c.activation!r} (needs gelu/gelu_tanh)"),
            (c.qk_norm, "qk_norm=True (needs False)"),
        ] if bad
    ]


def check_gpt2_compatible(c: GPTConfig, model: GPT | None = None) -> None:
    """Refuse, in one line, a model that Hugging Face's GPT-2 layout cannot hold: by its config, and with `model`
    by what the model itself is (gpt2_layout_problems)."""
    problems = gpt2_incompatibilities(c)
    if problems:
        raise FunGPTError(f"cannot save as Hugging Face GPT-2: model has {', '.join(problems)}; only a model with "
                          "GPT-2's architecture (the defaults of those settings) fits that layout: this run stays "
                          "usable with fungpt sample, eval and serve")
    problems = gpt2_layout_problems(model) if model is not None else []
    if problems:
        raise FunGPTError(f"cannot save as Hugging Face GPT-2: the model has {'; '.join(problems)}, so "
                          "transformers' GPT2LMHeadModel would not compute it: this run stays usable with fungpt "
                          "sample, eval and serve")


def gpt2_layout_problems(model: GPT) -> list[str]:
    """What in the model itself, beyond its config, is not GPT-2's (empty list: nothing). The config can say GPT-2
    while model.py was edited (a learner's MLP 8x wide, a ReLU, a post-LN block) or a module was changed on the
    model: exported, such a model failed to load in transformers, or loaded and computed another model, after
    `fungpt export` had said it was done."""
    from torch import nn

    from fungpt.decode import MIRRORED, mirrored_source, runs_as_written  # (see decode.py)

    model = getattr(model, "_orig_mod", model)  # (a torch.compile wrapper: the model it compiles)
    problems = []
    if mirrored_source() not in (MIRRORED, None):  # (None: no source to read; nothing known)
        problems.append("forwards edited in fungpt/model.py (another computation than GPT-2's)")
    if not runs_as_written(model):  # (a parametrized weight too: computed from tensors GPT-2's layout lacks)
        problems.append("a forward replaced or hooked, or a parametrized weight, on one of its modules (another "
                        "computation than GPT-2's)")
    c = model.config
    C, V = c.n_embd, c.vocab_size
    want = {"wte.weight": (V, C), "pos.wpe.weight": (c.block_size, C), "ln_f.weight": (C,), "ln_f.bias": (C,),
            "lm_head.weight": (V, C)}
    block = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
             "mlp.c_fc.weight": (4 * C, C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (C, 4 * C),
             "mlp.c_proj.bias": (C,)}  # (out, in): GPT-2's Conv1D holds them transposed, see save_gpt2
    want.update({f"blocks.{i}.{k}": shape for i in range(c.n_layer) for k, shape in block.items()})
    if not c.bias:  # (written as zeros by save_gpt2)
        want = {k: shape for k, shape in want.items() if not k.endswith(".bias")}
    have = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    if set(have) != set(want):  # (another layout: the modules checked below may not even be there)
        return [*problems, f"tensors GPT-2 has not {sorted(set(have) - set(want))[:3]} or lacks "
                           f"{sorted(set(want) - set(have))[:3]}"]
    problems += [f"{k} of shape {list(have[k])} (GPT-2's is {list(want[k])})" for k in want if have[k] != want[k]][:2]
    gelu = "tanh" if c.activation == "gelu_tanh" else "none"
    for i, b in enumerate(model.blocks):
        act = getattr(b.mlp, "act", None)
        if not isinstance(act, nn.GELU) or act.approximate != gelu:
            problems.append(f"blocks.{i}.mlp.act = {act!r} (GPT-2's is GELU(approximate={gelu!r}))")
            break
    if c.tie_embeddings and model.lm_head.weight is not model.wte.weight:
        problems.append("an lm_head not tied to wte, though the config ties them")
    return problems


def save_gpt2(model: GPT, path: str | os.PathLike) -> None:
    """Save as a Hugging Face GPT-2 folder (config.json + model.safetensors) for GPT2LMHeadModel."""
    from safetensors.torch import save as safetensors_bytes

    model = getattr(model, "_orig_mod", model)  # (a torch.compile wrapper: the model it compiles)
    c = model.config
    check_gpt2_compatible(c, model)

    tensors = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            if c.tie_embeddings:
                continue  # tied to wte; HF re-ties it on load
            tensors[key] = t.detach().to("cpu", torch.float32).contiguous().clone()  # an untied head: its own
            continue
        if key.endswith(HF_CONV1D):
            t = t.t()
        if key.startswith("blocks."):  # blocks.{i}.* -> h.{i}.*
            key = "h." + key.removeprefix("blocks.")
        key = key.removeprefix("pos.")  # pos.wpe.weight -> wpe.weight
        # clone: safetensors refuses tensors that share memory
        tensors["transformer." + key] = t.detach().to("cpu", torch.float32).contiguous().clone()
    if not c.bias:  # GPT-2's layout has a bias in every Linear and LayerNorm: zeros compute the same model
        for key in [k for k in tensors if k.endswith(".weight") and k.rsplit(".", 2)[-2] not in ("wte", "wpe",
                                                                                                "lm_head")]:
            weight = tensors[key]  # (a Conv1D holds (in, out), its bias (out,); a LayerNorm's weight (C,))
            tensors[key.removesuffix("weight") + "bias"] = torch.zeros(weight.shape[-1])
    hf_config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": "gelu_new" if c.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": c.tie_embeddings, "use_cache": True,
        "torch_dtype": "float32",
    }
    # GPT-2's <|endoftext|> token; a smaller vocabulary has no such id (transformers would default to 50256)
    eot = 50256 if c.vocab_size > 50256 else None
    hf_config.update(bos_token_id=eot, eos_token_id=eot)

    # Each file is written under a temporary name of its own, then renamed: a crash never leaves half a file, and a
    # link planted at a temporary name is never written through (open_new_temp). Written by Python, not
    # safetensors.torch.save_file: that creates its file readable by its owner only (0600), and an exported
    # folder is made to be shared.
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_new(path / "model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))
    _write_new(path / "config.json", (json.dumps(hf_config, indent=2) + "\n").encode())


def _write_new(path: Path, data: bytes) -> None:
    """Write `path` through a temporary file of an unguessable name, renamed into place (an OSError, such as a full
    disk, is the caller's to explain: `fungpt export` names its --out)."""
    tmp, f = open_new_temp(path, "wb")
    try:
        with f:
            f.write(data)
            f.flush()
            fsync(f.fileno())  # (on disk before it takes the name: a crash leaves the old file or the new one)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _head_differs(path: Path, hf_sd: dict[str, torch.Tensor]) -> bool:
    """Whether a folder's stored lm_head.weight is another matrix than its wte.weight (read whole where `hf_sd` holds
    only their shapes: a dry run's headers, in the rare folder that stores both)."""
    names = [next((k for k in hf_sd if k.removeprefix("transformer.") == n), None) for n in ("lm_head.weight",
                                                                                               "wte.weight")]
    if None in names:
        return False
    head, wte = (hf_sd[n] for n in names)
    if head.device.type == "meta":
        whole = _load_hf_weights(path)
        head, wte = (whole[n] for n in names)
    if head.shape != wte.shape:
        return True
    same = head.data_ptr() == wte.data_ptr() and head.stride() == wte.stride()  # (one tensor saved under two names)
    # (equal, NaN as NaN; in float32, where one was stored in another dtype)
    return not (same or torch.allclose(head.float(), wte.float(), rtol=0, atol=0, equal_nan=True))


def _load_hf_weights(path: Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """Read a HF checkpoint: model.safetensors (possibly sharded) or pytorch_model.bin (tensors only: a
    pickle that would run code, or build anything but tensors, is refused by weights_only)."""
    import pickle

    from safetensors import SafetensorError

    try:
        with warnings.catch_warnings():  # (torch warns of pickle protocols it was not written with; refused below)
            warnings.simplefilter("ignore", UserWarning)
            tensors = _read_hf_weights(path, meta)
    except OSError as e:
        if is_out_of_memory(e):  # (an mmap of a large file: not damage)
            raise
        if e.filename:  # the file could not be opened (permissions)
            raise FunGPTError(f"cannot read {e.filename}: {e.strerror}") from None
        raise FunGPTError(f"cannot read the weights in '{path}': the file is damaged or incomplete (a download that "
                          f"stopped?); download the model again") from None  # (torch's reader of a cut .bin: EINVAL)
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError,
            TypeError, AttributeError) as e:
        if is_out_of_memory(e):  # (torch's CPU allocator raises a RuntimeError)
            raise
        unsafe = re.search(r"GLOBAL (\S+)", str(e))  # the function or class weights_only refused to call
        if unsafe:
            raise FunGPTError(f"refusing to load the weights in '{path}': pytorch_model.bin holds more than "
                              f"tensors (its pickle calls {unsafe.group(1)}), and nothing in it was run; use a "
                              f"model.safetensors copy, or save the model again with save_pretrained") from None
        if "Weights only load failed" in str(e) and _is_pickle(path / "pytorch_model.bin"):  # (not torch.save's)
            why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise FunGPTError(f"refusing to load the weights in '{path}': torch's safe loader cannot read "
                              f"pytorch_model.bin ({why[1].strip()[:80] if why else 'not a plain pickle of tensors'})"
                              f", and nothing in it was run; use a model.safetensors copy, or save the model again "
                              f"with save_pretrained") from None
        why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))  # (torch's own cause, after its advice)
        first = why[1].strip() if why else (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = first[:first.find(". ") + 1 or None][:160]  # (its first sentence: torch adds advice on miniz)
        raise FunGPTError(f"cannot read the weights in '{path}' ({first}): the file is damaged or not a "
                          f"safetensors/PyTorch weights file; download the model again") from None
    if not (isinstance(tensors, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in tensors.items())):
        keys = list(tensors)[:5] if isinstance(tensors, dict) else type(tensors).__name__
        raise FunGPTError(f"the weights file in '{path}' is not a plain table of named tensors (it holds {keys}): "
                          f"a training checkpoint, perhaps; save the model's state_dict() alone, or use "
                          f"save_pretrained")
    return tensors


def _is_pickle(file: Path) -> bool:
    """Whether `file` starts as a pickle of protocol 2 or later does (the PROTO opcode, 0x80): the weights_only
    loader refused its contents, rather than failing on bytes that are no pickle at all."""
    try:
        with open(file, "rb") as f:
            return f.read(1) == b"\x80"
    except OSError:
        return False


# safetensors' names of its element types -> torch's (those it may hold; see load_gpt2's check of the float ones)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _meta_tensor(file: Path, name: str, dtype: str, shape: list[int]) -> torch.Tensor:
    """An empty tensor on the meta device as the header of `file` describes tensor `name`; a type torch cannot hold
    is refused here (loading it would be refused too), by the header's own name for it."""
    if dtype not in SAFETENSORS_DTYPES:
        raise FunGPTError(f"'{file.parent}' stores {name} as {dtype} (a quantized checkpoint?): FunGPT loads "
                          f"float32, float16 or bfloat16 weights; save the model unquantized")
    return torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype], device="meta")


def _read_safetensors(file: Path, meta: bool) -> dict[str, torch.Tensor]:
    """The tensors of one .safetensors file; with `meta`, tensors on the meta device from its header alone (which
    the library checks against the file's size: a cut file is refused as loading it would be)."""
    from safetensors import safe_open

    from fungpt.checkpoint import read_safetensors, safetensors_header

    if not meta:
        return read_safetensors(file)
    if utf8_path(file) is None:  # (the library opens UTF-8 paths only: the header read here)
        return {k: _meta_tensor(file, k, dtype, shape) for k, (dtype, shape) in safetensors_header(file).items()}
    with safe_open(str(file), framework="pt") as f:
        slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is no dict)
        return {k: _meta_tensor(file, k, s.get_dtype(), s.get_shape()) for k, s in slices.items()}


def _read_hf_weights(path: Path, meta: bool = False) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors", meta)
    if (path / "model.safetensors.index.json").is_file():
        index = path / "model.safetensors.index.json"
        try:
            shards = set(read_json(index)["weight_map"].values())
            if not all(isinstance(s, str) and s and Path(s).name == s for s in shards):  # files beside it only
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise FunGPTError(f"{index} is corrupt (it should map each weight to its shard file); download or save "
                              f"the model again") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:  # (safetensors says "No such file" without naming it: it read as a damaged file)
            more = f" and {len(missing) - 1:,} more" if len(missing) > 1 else ""
            raise FunGPTError(f"{path / missing[0]}{more}, listed in {index.name}, is missing: copy the shard files "
                              f"into {path} (or download the model again)")
        return {k: v for shard in sorted(shards) for k, v in _read_safetensors(path / shard, meta).items()}
    if (path / "pytorch_model.bin").is_file():
        # (read whole even with `meta`: torch checks the sizes of its records only as it reads their data)
        bin_file = path / "pytorch_model.bin"
        check_torch_file(bin_file)
        weights = torch.load(bin_file, map_location="cpu", weights_only=True)
        check_tensors_fit_their_storage(weights, bin_file)
        return weights
    if (path / "pytorch_model.bin.index.json").is_file():
        raise FunGPTError(f"'{path}' holds its weights as sharded pytorch_model-*.bin files, which FunGPT does not "
                          f"read: save the model again with save_pretrained(folder) (safetensors, the default)")
    raise FunGPTError(f"no weights in '{path}': expected model.safetensors or pytorch_model.bin")
