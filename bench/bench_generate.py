"""Generation speed: FunGPT (KV cache, with and without prompt-lookup speculation, and uncached)
against Hugging Face `generate` (plain, and with its own prompt lookup), on the same weights, side by
side in one process.

    python bench/bench_generate.py                       # 6 x 384 GPT-2, batch 1, 500 greedy tokens
    python bench/bench_generate.py --append BENCHMARKS.md
    python bench/bench_generate.py --config configs/speedrun-cpu.toml   # the model of a run config

The weights: a randomly initialised Hugging Face GPT-2 (by default n_layer 6, n_embd 384, n_head 6,
vocab 65 like Tiny Shakespeare char, n_positions 1024 so that prompt + 500 tokens fit the context),
saved with save_pretrained and loaded into FunGPT with GPT.from_hf. With --config, the model is that
TOML run config's [model], its block_size raised where needed so that the prompt and all new tokens
fit one window; a model without biases or with an untied head is FunGPT's as configured, and Hugging
Face's its export (zero biases: the same model); a model Hugging Face's GPT-2 cannot express (RoPE,
RMSNorm, ...) is measured on FunGPT's side only, with the reason printed. --init-std scales the
random weights: with GPT-2's 0.02 a random model's greedy output repeats one token, the easiest case
for speculation; a larger std gives varied text (a harder case), reported as the "tokens per forward
pass" column.

Every round runs each contender once, in turn (interleaved), so load from other processes hits
all of them alike; the table reports each one's median tokens/s over the rounds and checks that
all of them produced exactly the same tokens. transformers is a benchmark dependency only.

--interleave K adds, to every round, one run of HF generate and FunGPT cached taking turns every K
tokens in the same thread (`alternating`): on a host whose speed swings within seconds, both then
meet the same swings, and the ratio of their summed times says how they compare in the state the
host was in, not which of them ran in its faster moments.
"""

import argparse
import dataclasses
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import check_append, command, cpu_times, machine, machine_state, memory_read_gbs, publish


def config_model(path: Path):
    """The GPTConfig a training run of this TOML config would build, without its data or weights: the vocabulary
    size follows [data] tokenizer (char: [model] vocab_size, 65 for Tiny Shakespeare; bpe: [data] vocab_size;
    gpt2: 50257), and init_from a GPT-2 (hub name or local folder) gives that model's shape."""
    from fungpt.config import load_config
    from fungpt.errors import FunGPTError
    from fungpt.model import GPT
    from fungpt.pretrained import HUB_SHAPES  # the published GPT-2 sizes: a fine-tuning config is measured at
    from fungpt.tokenizer import DEFAULT_BPE_VOCAB  # its shape without downloading the weights

    try:
        run = load_config(path)
        cfg, init = run.model, run.model.init_from
        if init != "scratch" and Path(init).expanduser().is_dir():  # a local folder first, as training looks
            return GPT.hf_config(Path(init).expanduser())
    except FunGPTError as e:
        raise SystemExit(f"bench_generate: {e}") from None
    if init in HUB_SHAPES:
        n_layer, n_head, n_embd = HUB_SHAPES[init]
        cfg = dataclasses.replace(cfg, n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257,
                                  block_size=1024)
    elif init != "scratch":
        raise SystemExit(f"{path}: init_from = {init!r} is neither a local folder nor one of "
                         f"{', '.join(HUB_SHAPES)}: cannot tell the model's shape")
    elif run.data.tokenizer == "bpe":
        cfg = dataclasses.replace(cfg, vocab_size=run.data.vocab_size or DEFAULT_BPE_VOCAB)
    elif run.data.tokenizer == "gpt2":
        cfg = dataclasses.replace(cfg, vocab_size=50257)
    return cfg


def build_models(cfg, init_std: float, workdir: Path):
    """(HF model or None, FunGPT model, why HF is left out) with the same random weights, for GPTConfig cfg.

    GPT-2's layout (biases, a tied head): a Hugging Face GPT-2 of its own random init (std init_std), saved, and
    FunGPT's model loaded from that folder through GPT.from_hf. A config without biases or with an untied head:
    FunGPT's model as configured, every matrix drawn from normal(0, init_std), and Hugging Face's its export
    (GPT.save_hf: zero biases, which compute the same model). Either way both give the same tokens.
    """
    from fungpt.hf import gpt2_incompatibilities
    from fungpt.model import GPT

    torch.manual_seed(0)
    problems = gpt2_incompatibilities(cfg)
    if problems or not (cfg.bias and cfg.tie_embeddings):  # FunGPT's model as configured
        model = GPT(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, init_std)
        if problems:  # FunGPT only
            return None, model.eval(), ", ".join(problems)
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise SystemExit("bench_generate: Hugging Face's side needs transformers: pip install transformers "
                         "(the test extras include it)") from None

    if not (cfg.bias and cfg.tie_embeddings):
        model.save_hf(workdir)
        return GPT2LMHeadModel.from_pretrained(workdir).eval(), model.eval(), ""
    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, initializer_range=init_std,
                        activation_function="gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(workdir)
    hf = GPT2LMHeadModel.from_pretrained(workdir).eval()
    return hf, GPT.from_hf(workdir).eval(), ""


def weight_read_floor(model, rounds: int = 20) -> dict[str, float]:
    """What bounds batch-1 decoding: one token multiplies a (1, in) vector by every weight matrix.

    Times, per token, the model's Linear layers as matrix-vector products (a) through torch's BLAS
    (F.linear; HF's Conv1D addmm goes there too), (b) through oneDNN and (c) as fungpt.linear's
    row sums (F.embedding_bag over W^T, what FunGPT's decoding runs where cpu_matmul is "onednn"),
    and (d) a plain sum over the same matrices: reading the same bytes with no arithmetic to speak
    of, the speed a product purely limited by memory would approach. Matrices are visited in the
    model's order, so caches see the same traffic as in decoding.
    """
    import torch.nn.functional as F

    from fungpt.linear import onednn_linear, onednn_works, row_bags, row_product

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, m.in_features) for m in linears]
    transposed = [m.weight.detach().t().contiguous() for m in linears]
    products = [row_product(wt, m.bias, row_bags(m.in_features)) for wt, m in zip(transposed, linears)]
    n_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)

    def per_token(fn) -> float:
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(rounds):
            fn()
        return (time.perf_counter() - t0) / rounds

    kernels = {
        "blas": lambda: [F.linear(x, m.weight, m.bias) for x, m in zip(inputs, linears)],
        "rows": lambda: [product(x[0]) for x, product in zip(inputs, products)],
        "read": lambda: [m.weight.sum() for m in linears],
    }
    if onednn_works():
        kernels["onednn"] = lambda: [onednn_linear(x, m.weight, m.bias) for x, m in zip(inputs, linears)]
    with torch.no_grad():
        times = {name: per_token(fn) for name, fn in kernels.items()}
    out = {"mbytes": n_bytes / 1e6}
    for name, t in times.items():
        out[f"{name}_ms"], out[f"{name}_gbs"] = t * 1e3, n_bytes / t / 1e9
    return out


def alternating(hf_generate, fungpt_stream, n: int, k: int) -> tuple[float, float, bool]:
    """Run HF generate and a FunGPT token stream taking turns every k tokens; (HF s, FunGPT s, same tokens).

    One HF generate call, as in the table; its streamer (called with every new token) runs the next k
    tokens of fungpt_stream whenever HF has made k more. Same thread, so the same torch thread pool and
    no thread hand-offs; HF's time is the call's wall time less the time spent in FunGPT's turns.
    """
    from transformers.generation.streamers import BaseStreamer

    class Turns(BaseStreamer):
        def __init__(self):
            self.prompt_seen, self.made, self.fungpt_s, self.tokens = False, 0, 0.0, []

        def fungpt_turn(self, count: int) -> None:
            t0 = time.perf_counter()
            with torch.no_grad():
                self.tokens += [next(fungpt_stream) for _ in range(count)]
            self.fungpt_s += time.perf_counter() - t0

        def put(self, value):  # the first call carries the prompt, then the new tokens (one a call, batch 1)
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.made += value.numel()
            if self.made % k == 0 and self.made < n:
                self.fungpt_turn(k)

        def end(self):
            self.fungpt_turn(n - len(self.tokens))

    turns = Turns()
    t0 = time.perf_counter()
    hf_tokens = hf_generate(turns)
    total = time.perf_counter() - t0
    return total - turns.fungpt_s, turns.fungpt_s, torch.equal(hf_tokens, torch.cat(turns.tokens))


def ops_per_token(model, prompt) -> dict[str, int]:
    """Tensor operations that reach torch's dispatcher for one cached token (each is a fixed cost of a
    few us in eager mode): GPT.forward with a KVCache, and the lean Decoder.step of decode.py."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fungpt.decode import Decoder

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    with torch.no_grad():
        for name in ("forward", "step"):
            cache = model.make_kv_cache(1)
            model(prompt, kv_cache=cache)
            token, decoder = prompt[0, -1:], Decoder(model, cache)  # (1,)
            with Count() as mode:
                model(token[None], kv_cache=cache) if name == "forward" else decoder.step(token)
            counts[name] = mode.n
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Generation speed: FunGPT (KV cache, with and without speculation, and "
                                             "uncached) against Hugging Face generate, on the same weights.")
    ap.add_argument("--new-tokens", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lookahead", type=int, default=8, help="draft tokens per pass for the speculative row")
    ap.add_argument("--init-std", type=float, default=0.02, help="std of the random weights (GPT-2: 0.02)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--skip-uncached", action="store_true", help="leave out the slow uncached path")
    ap.add_argument("--interleave", type=int, default=0, metavar="K",
                    help="also time HF generate and FunGPT cached taking turns every K tokens (0: off)")
    ap.add_argument("--config", type=Path, default=None,
                    help="measure the [model] of this TOML run config (default: a 6 x 384 GPT-2, vocab 65)")
    ap.add_argument("--append", type=Path, default=None, help="append the results table to this markdown file")
    args = ap.parse_args(argv)
    if args.interleave < 0:
        ap.error("--interleave must be >= 0 (0: off)")
    if min(args.new_tokens, args.rounds, args.lookahead) < 1:
        ap.error("--new-tokens, --rounds and --lookahead must be at least 1")
    check_append(ap, args.append)
    from fungpt.decode import Decoder
    from fungpt.linear import cpu_matmul
    from fungpt.model import GPT, GPTConfig

    if args.threads:
        torch.set_num_threads(args.threads)

    n, prompt_len = args.new_tokens, 8
    cfg = config_model(args.config) if args.config else GPTConfig(vocab_size=65, block_size=1024, n_layer=6,
                                                                 n_head=6, n_embd=384)
    # One window holds the prompt and every new token: generation speed without the sliding window's re-prefills.
    cfg = dataclasses.replace(cfg, block_size=max(cfg.block_size, prompt_len + n), dropout=0.0, init_from="scratch")
    with tempfile.TemporaryDirectory() as tmp:
        hf, model, no_hf = build_models(cfg, args.init_std, Path(tmp))
    prompt = torch.arange(prompt_len).remainder(cfg.vocab_size)[None]  # (1, 8)
    passes = {"speculative": 0}

    # HF's plainest greedy loop: no end-of-text token (so exactly n tokens, without the min_new_tokens
    # processor that forcing them would add) and an explicit attention mask (none to infer from padding).
    hf_args = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False, use_cache=True,
                   eos_token_id=None, pad_token_id=0)

    def hf_generate(streamer=None):
        with torch.no_grad():
            out = hf.generate(prompt, **hf_args, streamer=streamer)
        return out[0, prompt.size(1):]

    def hf_prompt_lookup():  # HF's own prompt-lookup speculation (same idea as FunGPT's lookahead)
        with torch.no_grad():
            out = hf.generate(prompt, **hf_args, prompt_lookup_num_tokens=args.lookahead)
        return out[0, prompt.size(1):]

    def counted_speculative():
        # Count the passes over the weights (GPT.forward calls and lean one-token steps), to report how many
        # tokens each pass yielded. Not with a module hook: generation skips the lean step when hooks are set.
        count = [0]
        real_forward, real_step = GPT.forward, Decoder.step

        def counted(fn):
            return lambda *a, **k: count.__setitem__(0, count[0] + 1) or fn(*a, **k)

        GPT.forward, Decoder.step = counted(real_forward), counted(real_step)
        try:
            out = model.generate(prompt, n, temperature=0.0, lookahead=args.lookahead)[0, prompt.size(1):]
        finally:
            GPT.forward, Decoder.step = real_forward, real_step
        passes["speculative"] = count[0]
        return out

    contenders = {
        "Hugging Face generate (KV cache)": hf_generate,
        "FunGPT cached": lambda: model.generate(prompt, n, temperature=0.0)[0, prompt.size(1):],
        f"Hugging Face generate + prompt_lookup_num_tokens {args.lookahead}": hf_prompt_lookup,
        f"FunGPT cached + lookahead {args.lookahead}": counted_speculative,
    }
    if hf is None:  # a model HF's GPT-2 cannot express: FunGPT's own paths only
        contenders = {name: fn for name, fn in contenders.items() if name.startswith("FunGPT")}
    base = "Hugging Face generate (KV cache)" if hf is not None else "FunGPT cached"  # the "vs" column's reference
    if not args.skip_uncached:
        contenders["FunGPT uncached"] = lambda: model.generate(prompt, n, temperature=0.0,
                                                               use_cache=False)[0, prompt.size(1):]
    times: dict[str, list[float]] = {k: [] for k in contenders}
    outputs: dict[str, torch.Tensor] = {}
    read_gbs, steal_from = [], cpu_times()
    turns: list[tuple[float, float, bool]] = []  # --interleave: (HF s, FunGPT s, same tokens) per round
    interleave = args.interleave if hf is not None else 0
    # One untimed call of each first: the first carries one-time costs (lazy imports, first allocations, HF's
    # generation config), which made a 1-round ratio meaningless (0.20x where taking turns gave 1.38x). The
    # uncached path, 20x slower, is left out of it: one-time costs are a small part of its time.
    for name, fn in contenders.items():
        if name != "FunGPT uncached":
            fn()
    names = list(contenders)
    for r in range(args.rounds):
        read_gbs.append(memory_read_gbs())  # the machine's state at the round's start
        for name in names[r % len(names):] + names[:r % len(names)]:  # (each round starts with the next one)
            t0 = time.perf_counter()
            outputs[name] = contenders[name]()
            times[name].append(time.perf_counter() - t0)
        if interleave:
            stream = model.generate_stream(prompt, n, temperature=0.0)
            turns.append(alternating(hf_generate, stream, n, interleave))
            stream.close()  # frees its KV cache now

    state = machine_state(read_gbs, "at each round's start", steal_from)
    ref = outputs[base]
    base_tps = n / statistics.median(times[base])
    distinct = len(set(ref.tolist()))
    short = "HF" if hf is not None else "FunGPT cached"
    rows = []
    for name in contenders:
        tps = n / statistics.median(times[name])
        same = torch.equal(outputs[name], ref)
        per_pass = (f"{n / passes['speculative']:.2f}" if name.startswith("FunGPT cached + look")
                    else "-" if "prompt_lookup" in name else "1")  # HF's passes are not counted
        rows.append(f"| {name} | {tps:,.1f} | {tps / base_tps:.2f}x | {per_pass} | {'yes' if same else 'NO'} |")
    arch = "GPT-2" if hf is not None else f"FunGPT ({no_hf}: no Hugging Face GPT-2 to compare with)"
    if hf is not None and not (cfg.bias and cfg.tie_embeddings):  # (FunGPT's model as configured; HF's the export)
        arch += (" layout" + ("" if cfg.bias else ", no biases (Hugging Face's: zeros)")
                 + ("" if cfg.tie_embeddings else ", an untied head"))
    source = f" from {args.config}" if args.config else ""
    header = (f"## generation, {datetime.date.today()}\n\n"
              f"- machine: {machine()}, Python {platform.python_version()}; FunGPT cpu_matmul: {cpu_matmul()}\n"
              f"- command: `{command('bench_generate.py', argv)}`\n"
              f"- model{source}: {cfg.n_layer} x {cfg.n_embd} ({cfg.n_head} heads) {arch}, vocab {cfg.vocab_size}, "
              f"block_size {cfg.block_size}, random weights (std {args.init_std}), batch 1, "
              f"{n} new greedy tokens ({distinct} distinct); median of {args.rounds} interleaved rounds, after "
              f"an untimed call of each (but the uncached path), each round started by the next contender\n\n"
              f"| contender | tokens/s | vs {short} | tokens per forward pass | same tokens as {short} |\n"
              "|---|---:|---:|---:|---|\n")
    floor = weight_read_floor(model)
    ops = ops_per_token(model, prompt)
    onednn = (f", through oneDNN {floor['onednn_ms']:.2f} ms ({floor['onednn_gbs']:.1f} GB/s)"
              if "onednn_ms" in floor else "")
    footer = (f"\nWhat bounds plain cached decoding (`weight_read_floor`, same process): one token reads "
              f"{floor['mbytes']:.1f} MB of weight matrices. Their matrix-vector products take, per token, "
              f"{floor['blas_ms']:.2f} ms through torch's BLAS ({floor['blas_gbs']:.1f} GB/s){onednn}, and "
              f"{floor['rows_ms']:.2f} ms as row sums (`fungpt.linear.row_product`, {floor['rows_gbs']:.1f} GB/s); "
              f"merely reading the same bytes takes {floor['read_ms']:.2f} ms ({floor['read_gbs']:.1f} GB/s). "
              + (f"HF generate spends {1000 / base_tps:.2f} ms per token, so 3x HF means {1000 / base_tps / 3:.2f} "
                 "ms per token, everything included. " if hf is not None else "")
              + f"Tensor operations per cached token (`ops_per_token`): {ops['forward']} "
              f"through GPT.forward, {ops['step']} through FunGPT's lean step (decode.py).\n")
    per_round = [b / f for b, f in zip(times[base], times["FunGPT cached"])]
    rounds = (f"\nPer round, FunGPT cached against {short}: {', '.join(f'{r:.2f}x' for r in per_round)}. "
              f"The machine's state: {state}.\n") if hf is not None else f"\nThe machine's state: {state}.\n"
    if args.interleave and not interleave:
        rounds += "\n`--interleave` left out: there is no Hugging Face model to take turns with.\n"
    if turns:
        hf_s, fun_s = sum(t[0] for t in turns), sum(t[1] for t in turns)
        rounds += (f"\nTaking turns every {interleave} tokens (`--interleave`, one HF generate call per round, "
                   f"FunGPT's turns run from its streamer): FunGPT cached {n * len(turns) / fun_s:,.1f} tokens/s, "
                   f"HF {n * len(turns) / hf_s:,.1f}, **{hf_s / fun_s:.2f}x** over all rounds (per round: "
                   f"{', '.join(f'{h / f:.2f}x' for h, f, _ in turns)}); same tokens as HF: "
                   f"{'yes' if all(t[2] for t in turns) else 'NO'}.\n")
    text = header + "\n".join(rows) + "\n" + rounds + footer
    publish(text, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
