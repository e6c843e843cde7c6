"""`fungpt inspect`: what a model is made of and what training it costs.

For a run folder or a TOML config this reports
  * parameters per module (one transformer block in detail; all blocks are identical),
  * FLOPs per token (forward, and forward + backward for training),
  * memory for the weights, the gradients, AdamW's state and the activations at the
    configured batch (an estimate, see `estimate_memory`), and the KV cache for generation,
  * for a run: the step, the tokens seen so far and the training FLOPs they cost.

`inspect_target(...)` returns all of it as a dict (tests and other tools use the numbers);
`format_report(...)` turns the dict into an aligned plain-text table.

The model is built on PyTorch's "meta" device: tensors with shapes but no storage, so even a
GPT-2 XL config is inspected in a second or two (the first meta build imports torch's reference kernels)
without allocating its 6 GB.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from fungpt.errors import FunGPTError, parse_json, read_json
from fungpt.model import GPT, GPTConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4  # bytes: FunGPT keeps weights, gradients and AdamW state in float32 (autocast only computes in 16 bits)


def _reads_as_toml(path: Path) -> bool:
    """Whether `path` is a file of TOML text (a config saved as .txt or without a suffix, which `train --config`
    reads as well). A file over 1 MB is no config (a corpus given by mistake): not read."""
    import tomllib

    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return False
        tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # (unreadable, not UTF-8, not TOML)
        return False
    return True


def meta_model(config: GPTConfig) -> GPT:
    """The model with shapes only (no memory, no random init work), for counting."""
    with torch.device("meta"):
        return GPT(config)


def parameter_rows(model: GPT) -> list[tuple[str, str, int]]:
    """(module, shapes, parameters) rows: top-level modules, and the modules of ONE block as blocks.*.

    A tied lm_head is listed with 0 parameters: it is the same matrix as wte, counted once.
    """
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():  # a shared (tied) tensor is yielded once, under its first name
        module = name.rsplit(".", 1)[0]
        if module.startswith("blocks.") and not module.startswith("blocks.0."):
            continue  # all blocks have the same shapes: show block 0 as blocks.*
        module = re.sub(r"^blocks\.0\.", "blocks.*.", module)
        groups.setdefault(module, []).append(p)
    rows = []
    for module, params in groups.items():
        shapes = " + ".join("x".join(str(d) for d in p.shape) for p in params)
        rows.append((module, shapes, sum(p.numel() for p in params)))
    if model.config.tie_embeddings:
        rows.append(("lm_head", "tied to wte", 0))
    return rows


def muon_numel(model: GPT) -> int:
    """How many weights Muon steps with optimizer = "muon": the blocks' matrices (train.configure_optimizer)."""
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2)


def estimate_memory(config: GPTConfig, batch_size: int, dtype: str = "float32", attn_impl: str = "sdpa",
                    block_size: int | None = None, device: str = "cpu", num_params: int | None = None,
                    optimizer: str = "adamw") -> dict:
    """Estimated training memory in bytes, for one micro-batch of batch_size x block_size tokens.

    weights      N x 4 bytes     FunGPT keeps float32 weights even with a 16-bit dtype (autocast
                                 computes in 16 bits from these float32 "master" weights)
    grads        N x 4 bytes     one float32 gradient per weight
    optimizer    2 N x 4 bytes   AdamW's two running averages (m and v) per weight; with optimizer =
                                 "muon", one (its momentum) for the M weights of the blocks' matrices:
                                 (2 N - M) x 4 bytes
    activations  an ESTIMATE of the tensors the forward pass keeps for the backward pass, with
                 s = bytes per element of `dtype`, B = batch_size, T = block_size, C = n_embd (bfloat16
                 on a CPU, bfloat16 products: 2 bytes for the Linear inputs and the activation's input,
                 11 of the 16, and 4 for the rest):
                   per block   s * 16 B T C        inputs of both norms and of the four Linear layers
                                                   (1+1+1+1 + 4 for the MLP's wide layer), q, k, v (3),
                                                   the attention output (1), the activation's input (4)
                             + s * 2 B T C         with RoPE, and again with QK-norm: the new q and k
                             + s * 2 B T C         with RMSNorm (composed of element-wise operations, it also
                                                   keeps each norm's normalised input), and again with QK-norm
                             + 4 nh B T^2          only with attn_impl='plain': the softmax weights, in
                                                   float32 whatever the dtype (autocast computes softmax in
                                                   float32). Fused kernels (sdpa, flash attention) recompute
                                                   them in the backward pass and keep only B nh T statistics.
                             x 3                   with dropout: the weights, the dropout mask and the
                                                   dropped weights. Outside CUDA `device`s this holds for
                                                   sdpa too: torch's fused CPU kernel has no dropout, so
                                                   attention dropout sends SDPA to its plain math path
                                                   (2 layers, 2 heads, T = 4096, batch 4 on a CPU: peak
                                                   memory 4.0 GiB with dropout 0.1, 0.42 GiB without; on
                                                   Apple GPUs not measured)
                   top         s * 2 B T C         final norm and lm_head inputs (s * 3 B T C with RMSNorm)
                             + 4 B T V             cross-entropy's float32 log-softmax of the logits
                 The other dropout masks (one byte per element), PyTorch's workspace and allocator slack
                 are not counted: expect the real peak to be somewhat higher. tests/test_viz.py checks the
                 formula against the tensors autograd actually saves (within 15% on small models).
    weight_copies  N x 2          only with a 16-bit dtype: the cast copies of the weights that
                                 live through forward and backward
    temporaries  2 x per-block activations (with at most two (T, T) tensors) + N x 4 bytes + 2 x 4 B T V: the
                 gradients the block backward is working on, AdamW's batched-update scratch, and the
                 cross-entropy's two (B, T, V) gradients (checked against the measured peak of small CPU runs in
                 tests/test_hardware.py: within 2x)
    kv_cache     2 x n_layer x B x T x C x 4      what generation with a KV cache of B sequences
                                                   of T tokens stores (not used in training; float32,
                                                   the weights' dtype, whatever the training dtype)
    Returns a dict of those byte counts plus 'total' (training: everything but kv_cache),
    'params' and the inputs. batch_size = 0 gives the part that does not grow with the batch.
    num_params: N, where the caller has the model (counting it on the meta device takes ~1 s the first time:
    torch imports its reference kernels to initialise meta weights).
    """
    if dtype not in DTYPE_BYTES:
        raise FunGPTError(f"dtype {dtype!r} is not valid: choose one of {', '.join(DTYPE_BYTES)}")
    if attn_impl not in ("sdpa", "plain"):
        raise FunGPTError(f"attn_impl {attn_impl!r} is not valid: choose sdpa or plain")
    if batch_size < 0:
        raise FunGPTError(f"batch_size {batch_size} must not be negative")
    s = DTYPE_BYTES[dtype]
    B, T = batch_size, block_size or config.block_size
    C, L, nh, V = config.n_embd, config.n_layer, config.n_head, config.vocab_size
    n = meta_model(config).num_params() if num_params is None else num_params
    extra = 2 * (config.pos_encoding == "rope") + 2 * config.qk_norm  # new copies of q and k
    # nn.RMSNorm is composed of element-wise operations: autograd keeps its input and also the normalised input
    # (x / rms, for the weight's gradient), where LayerNorm's fused kernel keeps the input and two (B, T) statistics
    rms = config.norm == "rmsnorm"
    extra += rms * (2 + 2 * config.qk_norm)  # ln_1 and ln_2; with QK-norm, q_norm and k_norm
    # bytes per B T C of one block's saved tensors, and of the top's. bfloat16 on a CPU (bfloat16 products): the
    # Linear layers keep bfloat16 copies of their inputs (7 of the 16) and the activation its bfloat16 input (4);
    # the rest stays float32, RoPE's and QK-norm's new q and k too; the final norm's input float32, lm_head's bfloat16
    cpu_bf16 = dtype == "bfloat16" and device == "cpu"
    block_bytes = 2 * 11 + FP32 * (5 + extra) if cpu_bf16 else s * (16 + extra)
    top_bytes = FP32 * (1 + rms) + 2 if cpu_bf16 else s * (2 + rms)
    dropout = config.dropout > 0
    unfused = attn_impl == "plain" or (dropout and not device.startswith("cuda"))  # keeps (T, T) matrices
    square = FP32 * nh * B * T * T if unfused else 0  # bytes of one (B, nh, T, T) float32 tensor
    per_block = block_bytes * B * T * C + (3 if dropout else 1) * square
    activations = L * per_block + top_bytes * B * T * C + FP32 * B * T * V  # (bytes)
    # a block's backward works on gradients like its saved tensors, but on two (T, T) ones at most, with dropout too
    # and at the top of the backward pass, the gradients of the log-softmax and of the logits: two more (B, T, V)
    # float32 tensors (with a large vocabulary they are most of the peak: V = 16384, B = 32, T = 256, a 2 x 64 model,
    # held about 2.5 GiB in a real run, against 0.65 GiB estimated without them, before the training loop dropped
    # the logits)
    # (the backward's gradients are float32 under bfloat16 products but for the MLP's hidden ones)
    grad_bytes = FP32 * (16 + extra) if cpu_bf16 else block_bytes
    temporaries = 2 * (grad_bytes * B * T * C + square) + n * FP32 + 2 * FP32 * B * T * V
    muon = muon_numel(meta_model(config)) if optimizer == "muon" else 0  # (Muon keeps one buffer, AdamW two)
    mem = {"weights": n * FP32, "grads": n * FP32, "optimizer": (2 * n - muon) * FP32, "activations": activations,
           "weight_copies": n * s if s < FP32 else 0, "temporaries": temporaries}
    mem["total"] = sum(mem.values())
    mem["kv_cache"] = 2 * L * B * T * C * FP32  # (generation runs the float32 weights: model.make_kv_cache)
    mem.update(params=n, optimizer_name="AdamW + Muon" if muon else "AdamW", batch_size=B, block_size=T, dtype=dtype,
               attn_impl=attn_impl, device=device)
    return mem


def _vocab_for_config(cfg) -> tuple[int, str | None]:
    """The vocabulary size a TOML config will train with, and a note when it had to be assumed."""
    from fungpt.data import is_prepared, load_meta
    from fungpt.rundata import resolve_data
    from fungpt.tokenizer import DEFAULT_BPE_VOCAB

    path = Path(cfg.data.path).expanduser()
    if is_prepared(path):
        return int(load_meta(path)["vocab_size"]), None
    why = "data not prepared yet"
    try:
        # is_main=False: only compute where `fungpt train` caches this dataset, never prepare it.
        cached = resolve_data(cfg.data, is_main=False, progress=False)
        if (cached / "meta.json").is_file():
            return int(load_meta(cached)["vocab_size"]), None
    except FunGPTError:
        if not path.exists() and cfg.data.path != "shakespeare":  # (a typo in the path: training would stop there)
            why = f"data.path {cfg.data.path!r} does not exist (training would stop there)"
    if cfg.data.tokenizer == "gpt2":
        return 50257, f"{why}: assuming GPT-2's vocabulary of 50,257 tokens"
    if cfg.data.tokenizer == "bpe":
        v = cfg.data.vocab_size or DEFAULT_BPE_VOCAB
        return v, f"{why}: assuming the BPE vocabulary size {v:,}"
    return cfg.model.vocab_size, (f"{why}: assuming the config's vocab_size = {cfg.model.vocab_size} (Tiny "
                                  f"Shakespeare has 65 characters)")


def _read_tokens_seen(run_dir: Path) -> tuple[int | None, int | None]:
    """(step, tokens) of the last readable row of metrics.jsonl, or (None, None)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    last = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = parse_json(line)
        except ValueError:
            continue  # a half-written last line from a killed run
        if isinstance(row, dict) and isinstance(row.get("tokens"), int) and isinstance(row.get("step"), int):
            last = row  # (rows of any other shape are damage, as plot.read_metrics skips them)
    return (last["step"], last["tokens"]) if last else (None, None)


def inspect_target(target: str | Path, batch_size: int | None = None) -> dict:
    """Everything `fungpt inspect` prints, as a dict. `target` is a run folder, a .toml config or a Hugging Face
    GPT-2 folder (what `fungpt export` writes, what fine-tuning starts from)."""
    from fungpt import pretrained
    from fungpt.config import (
        RunConfig,
        config_path,
        default_model,
        fields_named,
        is_hf_config,
        load_config,
        load_run_config,
    )
    from fungpt.hardware import choose_precision, detect_precision

    if not str(target).strip():
        raise FunGPTError("the folder or config to inspect is empty: pass a run folder, a .toml config or a "
                          "Hugging Face GPT-2 folder")
    # (an example config's name is its file; a run folder is itself; ~ quoted on a command line reaches us as it is)
    target = config_path(Path(target).expanduser(), folders=True)
    if target.name == "config.json" and target.is_file() and is_hf_config(target):
        target = target.parent  # a Hugging Face folder's config: the folder (load_config advised training from it)
    info: dict = {"source": str(target), "vocab_note": None, "device_note": None, "step": None, "tokens_seen": None,
                  "checkpoint": None}
    hf_folder = target.is_dir() and is_hf_config(target / "config.json")
    if target.is_dir() and not hf_folder:
        cfg = load_run_config(target)
        info["kind"] = "run"
        try:
            run = read_json(target / "run.json")
            dtype, world_size, device = str(run["dtype"]), int(run.get("world_size", 1)), str(run.get("device", "cpu"))
        except (OSError, ValueError, KeyError, TypeError):
            dtype, world_size, device = "float32", 1, "cpu"
        info["step"], info["tokens_seen"] = _read_tokens_seen(target)
        from fungpt import checkpoint as ckpt

        folder = ckpt.find_checkpoint(target, "latest")
        if folder is not None and (folder / "manifest.json").is_file():
            try:
                manifest = read_json(folder / "manifest.json")
                info["checkpoint"] = {"dir": str(folder), "step": int(manifest["step"]),
                                      "bytes": sum(int(f["bytes"]) for f in manifest["files"].values())}
                # What other commands refuse (a resume any file, sample and eval the weights), said here too (sizes
                # only: reading each file's sha256 would make inspecting a large run slow): a file missing or cut
                # short, or a config.json edited since
                info["checkpoint"]["problem"] = next(
                    (f"{name} is missing" if not (folder / name).is_file() else f"{name} is truncated or corrupt"
                     for name, f in manifest["files"].items()
                     if not (folder / name).is_file() or (folder / name).stat().st_size != int(f["bytes"])), None)
                saved = manifest.get("model")
                described = cfg.model.to_dict()
                differ = [k for k, v in described.items() if isinstance(saved, dict) and k in saved
                          and k not in ckpt.not_architecture(described) and saved[k] != v]
                if differ and not info["checkpoint"]["problem"]:
                    info["checkpoint"]["problem"] = (f"it was trained with another model than config.json describes "
                                                     f"({', '.join(differ)}): the numbers above are config.json's")
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError):  # (int(Infinity) overflows)
                raise FunGPTError(f"{folder / 'manifest.json'} is corrupt; the checkpoint cannot be trusted: restore "
                                  f"it or train again") from None
    # (.json: a run's config.json, as `train --config` takes; another name if it reads as TOML, as training reads it)
    elif hf_folder or target.suffix in (".toml", ".json") or _reads_as_toml(target):
        if hf_folder:  # shown as a config that fine-tunes it, with this run's defaults for the rest
            cfg = RunConfig(model=dataclasses.replace(default_model(), init_from=str(target)))
            info["kind"] = "Hugging Face model"
        else:
            cfg = load_config(target)
            try:  # (a config to train: refused as training refuses it)
                cfg.train.check_limits()
            except FunGPTError as e:
                raise FunGPTError(f"{target}: {e}") from None
            info["kind"] = "config"
        if pretrained.is_pretrained(cfg.model.init_from):  # fine-tuning: the checkpoint's architecture, as training
            checkpoint, info["vocab_note"] = pretrained.architecture(cfg.model.init_from)
            named = fields_named(target, []) if not hf_folder else ()
            tokens = pretrained.tokenizer_size(cfg.model.init_from)  # a padded table is trimmed, as training does
            model = pretrained.merge_model_config(cfg.model, checkpoint, default_model(), named, tokens=tokens)
            if tokens is not None and tokens < model.vocab_size:  # said, as training says it
                trimmed = (f"the checkpoint has {model.vocab_size:,} token embeddings for its tokenizer's {tokens:,} "
                           f"tokens: shown as fine-tuning trains it, with the {tokens:,} in use")
                info["vocab_note"] = "; ".join(n for n in (info["vocab_note"], trimmed) if n)
            model = pretrained.trim_vocab(model, tokens) if tokens is not None else model
        else:
            vocab, info["vocab_note"] = _vocab_for_config(cfg)
            model = dataclasses.replace(cfg.model, vocab_size=vocab)
        cfg = dataclasses.replace(cfg, model=model)
        tc = cfg.train
        try:
            device = detect_precision(tc.device, "float32").device  # where it would train ("auto" resolved)
            dtype = detect_precision(tc.device, tc.dtype, tc.optimizer).dtype  # (refuses what training refuses)
        except FunGPTError:  # a config for a GPU, read where there is none: as it would train on a recent GPU
            prec = choose_precision(tc.device, tc.dtype, cuda=True, mps=True, cuda_bf16=True, optimizer=tc.optimizer)
            dtype, device = prec.dtype, prec.device
            info["device_note"] = f"no {tc.device} device here: memory estimated as on one that computes in {dtype}"
        world_size = 1  # (a config does not say how many processes will train it)
    else:
        what = "does not exist" if not target.exists() else "is neither a run folder nor a .toml config"
        raise FunGPTError(f"{target} {what}: pass the out_dir of a training run, a file from configs/ or a Hugging "
                          f"Face GPT-2 folder")
    model = meta_model(cfg.model)
    tc = cfg.train
    B = batch_size or tc.batch_size
    info.update(
        config=cfg, dtype=dtype, batch_size=B, block_size=cfg.model.block_size,
        params=model.num_params(), params_non_embedding=model.num_params(non_embedding=True),
        param_rows=parameter_rows(model),
        flops_per_token_train=model.flops_per_token(), flops_per_token_forward=model.flops_per_token() // 3,
        # (every process's batches; the run's own batch size: --batch-size asks only for the memory at another)
        tokens_per_step=tc.batch_size * cfg.model.block_size * tc.grad_accum_steps * world_size,
        memory=estimate_memory(cfg.model, B, dtype, device=device, optimizer=tc.optimizer),
    )
    if info["tokens_seen"] is not None:
        info["train_flops_so_far"] = info["flops_per_token_train"] * info["tokens_seen"]
    return info


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # not reached


def human_count(n: float) -> str:
    """1234567 -> '1.23M' (powers of 1000: parameters, FLOPs, tokens)."""
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:,.0f}"


def format_report(info: dict) -> str:
    """The dict of `inspect_target` as aligned plain text."""
    m = info["config"].model
    lines = [f"{info['source']} ({info['kind']})",
             f"model: {m.n_layer} layer{'s' * (m.n_layer != 1)} x {m.n_head} head{'s' * (m.n_head != 1)} x "
             f"{m.n_embd} channels, context {m.block_size}, "
             f"vocabulary {m.vocab_size:,}, positions {m.pos_encoding}, norm {m.norm}, activation {m.activation}",
             f"       QK-norm {'yes' if m.qk_norm else 'no'}, bias {'yes' if m.bias else 'no'}, dropout {m.dropout:g}, "
             f"lm_head {'tied to wte' if m.tie_embeddings else 'untied (its own weights)'}"
             + (f", RoPE base {m.rope_base:g}" if m.pos_encoding == "rope" else "")]
    lines += [f"note: {note}" for note in (info["vocab_note"], info["device_note"]) if note]
    lines += ["", "parameters", f"  {'module':<26}{'shapes':<34}{'params':>12}"]
    for module, shapes, count in info["param_rows"]:
        lines.append(f"  {module:<26}{shapes:<34}{count:>12,}")
    block = sum(c for mod, _, c in info["param_rows"] if mod.startswith("blocks.*"))
    lines += [f"  {'one block (blocks.*)':<60}{block:>12,}",
              f"  {f'all {m.n_layer} blocks' if m.n_layer != 1 else '1 block':<60}{block * m.n_layer:>12,}",
              f"  {'total':<60}{info['params']:>12,}",
              f"  {'total without look-up tables (positions; untied wte)':<60}{info['params_non_embedding']:>12,}"]
    ft, ff = info["flops_per_token_train"], info["flops_per_token_forward"]
    lines += ["", "compute (at full context)",
              f"  FLOPs per token, forward            {human_count(ff):>10}",
              f"  FLOPs per token, training (x3)      {human_count(ft):>10}   6N + 12 L C T, see GPT.flops_per_token"]
    mem = info["memory"]
    lines += ["", f"memory at batch {info['batch_size']} x {info['block_size']} tokens, {info['dtype']} "
                  f"(estimate, see fungpt.inspection.estimate_memory)",
              f"  weights (float32)                   {human_bytes(mem['weights']):>10}",
              f"  gradients (float32)                 {human_bytes(mem['grads']):>10}",
              f"  {mem['optimizer_name'] + ' state (float32)':<36}{human_bytes(mem['optimizer']):>10}",
              f"  activations (estimate)              {human_bytes(mem['activations']):>10}",
              f"  backward temporaries (estimate)     {human_bytes(mem['temporaries']):>10}",
              *([f"  16-bit weight copies                {human_bytes(mem['weight_copies']):>10}"]
                if mem["weight_copies"] else []),
              f"  training total (estimate)           {human_bytes(mem['total']):>10}",
              f"  KV cache for generation             {human_bytes(mem['kv_cache']):>10}   "
              f"{info['batch_size']} sequence{'s' * (info['batch_size'] != 1)} of {info['block_size']} tokens"]
    lines += ["", "training",
              f"  tokens per optimizer step           {info['tokens_per_step']:>10,}"]
    if info["kind"] == "run":
        if info["tokens_seen"] is not None:
            # (from metrics.jsonl, which logs every log_interval steps: it can trail the latest checkpoint)
            lines += [f"  last logged step                    {info['step']:>10,}",
                      f"  tokens seen, to that step           {info['tokens_seen']:>10,}",
                      f"  training FLOPs, to that step        {human_count(info['train_flops_so_far']):>10}"]
        else:
            lines.append("  no metrics.jsonl rows yet: the run has not logged a step")
        ck = info["checkpoint"]
        if ck:
            lines.append(f"  latest checkpoint                   step {ck['step']}, {human_bytes(ck['bytes'])}"
                         + (f" (damaged: {ck['problem']})" if ck.get("problem") else ""))
    elif info["kind"] == "config" and info["config"].train.max_minutes:  # the clock ends it, not max_iters
        tc = info["config"].train
        lines.append(f"  planned: a time budget of {tc.max_minutes:g} min (train.max_minutes), or max_iters = "
                     f"{tc.max_iters:,} steps if they come first: the steps depend on the machine, and `fungpt train "
                     f"--dry-run` times a few to project them")
    elif info["kind"] == "config":
        n_steps = info["config"].train.max_iters
        lines.append(f"  planned: {n_steps:,} steps = {n_steps * info['tokens_per_step']:,} tokens, "
                     f"{human_count(n_steps * info['tokens_per_step'] * ft)} FLOPs")
    return "\n".join(lines)
