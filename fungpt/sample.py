"""`fungpt sample` and `fungpt eval`: use a trained run."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from fungpt.data import data_fingerprint, encode_file, eval_windows, load_meta, refuse_utf16_or_32
from fungpt.errors import FunGPTError, check_number, read_json
from fungpt.evaluation import EVAL_LOGITS_MAX, counted, eval_bar, score_windows
from fungpt.pretrained import is_pretrained
from fungpt.rundata import resolve_data
from fungpt.runs import LoadedRun, check_seed, data_dir_of, load_run, seeded_generator
from fungpt.sampling import sampling_probs
from fungpt.tokenizer import TextStream, Tokenizer, decode_after, load_tokenizer
from fungpt.viz import for_terminal, show_token  # (for_terminal: also imported from here)


def default_prompt_ids(run: LoadedRun) -> list[int]:
    """With no prompt, start from end-of-text (BPE, GPT-2) or a newline (char), as a fresh document."""
    tok = run.tokenizer
    if getattr(tok, "eot_id", None) is not None:
        return [tok.eot_id]
    try:
        return tok.encode("\n") or [0]  # (a tokenizer that drops whitespace, BERT's, encodes it as nothing)
    except FunGPTError:
        return [0]


def encode_typed(tok: Tokenizer, prompt: str) -> list[int]:
    """The ids of a prompt typed on the command line (--prompt). A shell passes `\\n` there as a backslash and an
    n, not a newline, and a char model of text without backslashes refuses it: said so, with how to type one
    (the walkthrough's prompt, ROMEO: and a newline, is typed so)."""
    escape = re.search(r"\\[nt]", prompt)
    if escape is not None:
        try:
            tok.encode("\\")
        except FunGPTError:
            n = escape.group() == "\\n"
            raise FunGPTError(f"--prompt holds {escape.group()}, which a command line passes as a backslash and "
                              f"{'an n' if n else 'a t'}, not as {'a newline' if n else 'a tab'}, and this model has "
                              f"no backslash: in bash quote the prompt as $'...' (a $ before the quotes: "
                              f"$'ROMEO:\\nIs it'), or put it in a file (--prompt-file)") from None
    return tok.encode(prompt)


def sampling_distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                          top_p: float | None = None) -> torch.Tensor:
    """The probabilities the next token is actually drawn from: logits (..., V) -> probs (..., V).

    That is fungpt.sampling.sampling_probs (temperature, then top_k, then top_p; filtered-out tokens
    get 0). With temperature 0 (greedy) the most likely token is always chosen, so the model's own
    distribution (softmax of the raw logits) is returned to show how sure it was.
    """
    if temperature == 0:
        return torch.softmax(logits.float(), dim=-1)
    return sampling_probs(logits, temperature, top_k, top_p)


def top_candidates(logits: torch.Tensor, tokenizer, k: int = 5, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> list[tuple[int, str, float]]:
    """The k most likely next tokens of one position: [(id, visible text, probability), ...], best first.

    logits: (V,) or (1, V) raw model output. Probabilities are those of `sampling_distribution`
    with the given settings (temperature=1 and no filters: the model's own softmax). Tokens that
    the filters removed (probability 0) are left out, so fewer than k may come back.
    """
    probs = sampling_distribution(logits.reshape(-1), temperature, top_k, top_p)  # (V,)
    values, ids = torch.topk(probs, min(k, probs.numel()))
    # as Python numbers at once: element by element, a GPU tensor is read back to the CPU once per comparison
    return [(i, show_token(tokenizer.token_text(i)), p) for p, i in zip(values.tolist(), ids.tolist()) if p > 0]


def _write_probs_line(out: TextIO, step: int, token: int, p: float, cands: list[tuple[int, str, float]],
                      tokenizer) -> None:
    listing = "  ".join(f"{text:>6} {_probability(q)}" for _, text, q in cands)
    out.write(f"{step:>5}  {show_token(tokenizer.token_text(token)):>6} {_probability(p)}   | {listing}\n")


def _probability(p: float) -> str:
    """A probability in 5 characters: 0.034, or 3e-04 below 0.0005 (a token drawn was shown as 0.000)."""
    return f"{p:.3f}" if p >= 0.0005 or p == 0 else f"{p:.0e}"


# The most of a prompt file read: far more than any model here sees (the last block_size tokens), and a bound on
# what a wrong path costs (/dev/zero, or a 2 GB corpus, was read whole: gigabytes of memory and no message)
PROMPT_FILE_MAX_BYTES = 16 << 20


def check_options(*, num_samples: int = 1, max_new_tokens: int = 0, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, show_top: int = 1, prompt: str | None = None,
                  prompt_file: str | None = None, stop: str | None = None, seed: int = 0) -> None:
    """Refuse sample()'s settings that cannot work, before anything is loaded (the sample command checks them
    before its note on the run, too)."""
    check_seed(seed)
    # (numbers from Python: the command line's parser has checked its own)
    for named, value, whole in (("--show-top", show_top, True), ("--num-samples", num_samples, True),
                                ("--max-new-tokens", max_new_tokens, True), ("--temperature", temperature, False),
                                ("--top-k", 1 if top_k is None else top_k, True),  # (None: off)
                                ("--top-p", 1.0 if top_p is None else top_p, False)):
        check_number(value, named, whole)
    if show_top <= 0:
        raise FunGPTError(f"--show-top {show_top} must be positive")
    if num_samples <= 0:
        raise FunGPTError(f"--num-samples {num_samples} must be positive")
    if max_new_tokens < 0:
        raise FunGPTError(f"--max-new-tokens {max_new_tokens} must not be negative")
    if not 0 <= temperature < math.inf:  # (NaN fails this test too)
        raise FunGPTError(f"--temperature {temperature} must be a finite number >= 0 (0 means greedy)")
    if top_k is not None and top_k <= 0:
        raise FunGPTError(f"--top-k {top_k} must be positive")
    if top_p is not None and not 0 < top_p <= 1:
        raise FunGPTError(f"--top-p {top_p} must be in (0, 1]")
    if prompt is not None and prompt_file is not None:
        raise FunGPTError("give either --prompt or --prompt-file, not both")
    if stop is not None and (not isinstance(stop, str) or not stop):  # ("" would end every sample at once)
        raise FunGPTError(f"--stop {stop!r} must be some text, e.g. --stop '\\n\\n' to end at a blank line")


class _TerminalStream:
    """for_terminal over a stream of pieces: a CR ending one piece waits for the next, whose LF may follow it."""

    def __init__(self) -> None:
        self.cr = ""

    def __call__(self, piece: str, last: bool = False) -> str:
        text, self.cr = self.cr + piece, ""
        if text.endswith("\r") and not last:
            text, self.cr = text[:-1], "\r"
        return for_terminal(text)


def _is_terminal(out) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError, OSError):  # (a stream without one, or closed)
        return False


def sample(run: str | Path, prompt: str | None = None, prompt_file: str | Path | None = None, num_samples: int = 1,
           max_new_tokens: int = 500, temperature: float = 0.8, top_k: int | None = 200, top_p: float | None = None,
           seed: int = 1337, checkpoint: str = "last", device: str = "auto",
           out: TextIO | None = None, show_probs: bool = False, show_top: int = 5,
           stop_at_eot: bool = True, stop: str | None = None) -> list[str]:
    """Generate `num_samples` continuations of the prompt, streaming text to `out` as it is made.

    The same seed gives the same text. Returns the generated texts (without the prompt).
    stop_at_eot: end a sample at <|endoftext|>, the token between documents in BPE and GPT-2 data (not
    written; the char tokenizer has none), so that a sample is one document, as Hugging Face's generate
    stops at its eos token. False: max_new_tokens tokens, across documents.
    stop: end a sample where its text first holds this string, which ends it (e.g. "\n\n": one paragraph; a
    token that runs past it is cut there). None: no such end.
    show_probs: instead of streaming the text, write one line per generated token: the token
    chosen, its probability and the `show_top` most likely candidates (probabilities after
    temperature, top-k and top-p, i.e. those the token was drawn from); then the whole text.
    """
    check_options(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, show_top=show_top, prompt=prompt, prompt_file=prompt_file, stop=stop, seed=seed)
    temperature, top_p = float(temperature), None if top_p is None else float(top_p)  # (a Fraction: torch takes none)
    if prompt_file is not None:
        if not str(prompt_file).strip():  # (Path("") is the current folder)
            raise FunGPTError("no prompt file was named (--prompt-file is empty): pass a text file's path, or "
                              "--prompt TEXT")
        prompt_file = Path(prompt_file).expanduser()  # (~ after `--prompt-file=` reaches us as it is)
        try:
            # as prepare reads: "\r\n" stays "\r\n" and a byte-order mark is dropped
            with open(prompt_file, "rb") as f:
                data = f.read(PROMPT_FILE_MAX_BYTES + 1)
            refuse_utf16_or_32(prompt_file, data)
            if b"\x00" in data:
                raise FunGPTError(f"prompt file {prompt_file} looks like a binary file (it holds NUL bytes); pass a "
                                  f"text file")
            if len(data) > PROMPT_FILE_MAX_BYTES:
                raise FunGPTError(f"prompt file {prompt_file} is over {PROMPT_FILE_MAX_BYTES >> 20} MiB, and the "
                                  f"model sees only its last block_size tokens: pass the end of it (e.g. `tail -c "
                                  f"100000 {prompt_file} > prompt.txt`)")
            prompt = data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            raise FunGPTError(f"prompt file {prompt_file} is not UTF-8 text (byte {e.start} is not): save it as "
                              f"UTF-8") from None
        except OSError as e:
            raise FunGPTError(f"cannot read prompt file {prompt_file}: {e.strerror or e}; pass a readable text "
                              f"file") from None
    loaded = load_run(run, checkpoint, device)
    if prompt_file is not None and not prompt:  # (a file saved before its text was written, say: said, not guessed)
        print(f"fungpt: note: prompt file {prompt_file} is empty: sampling from the model's default start, as with no "
              f"prompt", file=sys.stderr)
    if not prompt:
        ids = default_prompt_ids(loaded)
    elif prompt_file is not None:  # (text from a file: a backslash there is the file's own)
        ids = loaded.tokenizer.encode(prompt)
    else:
        ids = encode_typed(loaded.tokenizer, prompt)
    if out is not None:  # (which weights speak: a run still training, or its best saved early, is not its last word)
        print(f"fungpt: sampling {run} at step {loaded.step:,} (its {'latest' if checkpoint == 'last' else 'best'} "
              f"checkpoint)", file=sys.stderr)
    if not ids:
        ids = default_prompt_ids(loaded)
    never = out is not None and stop and _never_written(loaded.tokenizer, stop)  # (said on the console only)
    if never:  # (e.g. '\r\n\r\n' for a char model of text with '\n' line endings)
        print(f"fungpt: note: --stop {stop!r} holds {never!r}, a character this model's tokenizer cannot write: "
              f"no sample will stop there", file=sys.stderr)
    gen = seeded_generator(seed, loaded.device)
    eot = loaded.tokenizer.eot_id if stop_at_eot else None
    terminal = out is not None and _is_terminal(out)  # (into a file or pipe: the text as generated)
    texts = []
    for i in range(num_samples):
        if out is not None:
            if num_samples > 1:
                out.write(f"--- sample {i + 1} ---\n")
            if not show_probs:
                out.write(prompt or "")
        idx = torch.tensor([ids], dtype=torch.long, device=loaded.device)
        if show_probs:
            texts.append(_sample_showing_probs(loaded, idx, max_new_tokens, temperature, top_k, top_p, gen,
                                               show_top, out, prompt or "", eot, stop))
            continue
        new: list[int] = []
        made, end = "", None  # the sample's text so far, as written (searched for `stop`); where `stop` ended it
        # With byte-level BPE a character can span several tokens: the stream prints each character once
        # its last token has come (tokenizer.TextStream)
        stream = TextStream(loaded.tokenizer, context=ids if prompt else ())  # (after the prompt written above)
        shown = _TerminalStream() if terminal else (lambda piece, last=False: piece)
        for tok in loaded.model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                                top_p=top_p, generator=gen):
            token = int(torch.as_tensor(tok).reshape(-1)[0])
            if token == eot:
                if not new:  # (an empty sample, with no word why, looked like a failure)
                    print("fungpt: note: the sample ended at once: the model's first token was <|endoftext|>, the "
                          "end of a document (--no-stop-at-eot goes on past it)", file=sys.stderr)
                break
            new.append(token)
            piece = stream.add(token)
            end = stop_end(made, piece, stop)
            if end is not None:
                piece = piece[: end - len(made)]  # (a token may run past the stop string: cut at its end)
            made += piece
            if out is not None and piece:
                out.write(shown(piece))
                out.flush()
            if end is not None:
                break
        rest = "" if end is not None else stream.flush()  # (a character whose last bytes never came)
        if out is not None:
            out.write(shown(rest, last=True) + "\n")
            out.flush()
        texts.append(made + rest)  # (as written: a decoder that looks back reads the first token after the prompt)
    return texts


def _never_written(tokenizer, text: str) -> str | None:
    """The first character of `text` that `tokenizer` cannot encode (one a char model never saw), else None."""
    for ch in dict.fromkeys(text):  # (each distinct character once, in order)
        try:
            tokenizer.encode(ch)
        except FunGPTError:
            return ch
    return None


def stop_end(made: str, piece: str, stop: str | None) -> int | None:
    """Where the text made + piece ends if `stop` first appears in it with this piece (the index just past it in
    made + piece), else None. Only the last len(stop) - 1 characters of `made` can begin a new match."""
    if not stop:
        return None
    keep = made[max(0, len(made) - len(stop) + 1):]  # (searching only there: a long stream costs no more a step)
    at = (keep + piece).find(stop)
    return None if at < 0 else len(made) - len(keep) + at + len(stop)


def _sample_showing_probs(loaded: LoadedRun, idx: torch.Tensor, max_new_tokens: int, temperature: float,
                          top_k: int | None, top_p: float | None, gen: torch.Generator, show_top: int,
                          out: TextIO | None, prompt: str, eot: int | None = None, stop: str | None = None) -> str:
    """One sample, writing a line per step with the top candidates; returns the generated text (which ends
    before the token `eot`, if drawn, or just past `stop` where the text first holds it; that token's line is
    written)."""
    tok = loaded.tokenizer
    if out is not None:
        given = repr(prompt) if prompt else \
            f"none: the model starts from {tok.decode(idx[0].tolist())!r}, as a fresh document"
        out.write(f"prompt: {given}\n")
        shown = "of the model's own softmax (greedy picks the top one)" if temperature == 0 else \
            (f"after temperature {temperature}, top-k {top_k or 'off'}, top-p {top_p or 'off'}: the distribution "
             f"sampled from")
        # as many as there are: the vocabulary, top-k's; top-p keeps a share that changes from step to step
        most = min(show_top, loaded.config.model.vocab_size, top_k if top_k and temperature != 0 else show_top)
        # (up to: top-p's share changes from step to step, and a probability that rounds to 0 in float32 is not shown)
        top = f"up to {most} top" if (top_k or top_p) and temperature != 0 and most > 1 else f"top {most}"
        out.write(f"{'step':>5}  {'token':>6} {'p':>5}   | {top} candidate{'s' * (most != 1)}, probabilities {shown}\n")
    new: list[int] = []
    # (the text after the prompt's last ids, as `sample` streams it: see tokenizer.decode_after)
    context = idx[0].tolist()[-TextStream.CONTEXT:] if prompt else []
    stream = loaded.model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                          generator=gen, yield_logits=True)
    for step, (ids, logits) in enumerate(stream, start=1):
        token = int(ids[0])
        new.append(token)
        if out is not None:
            cands = top_candidates(logits[0], tok, show_top, temperature, top_k, top_p)
            p = float(sampling_distribution(logits[0], temperature, top_k, top_p)[token])
            _write_probs_line(out, step, token, p, cands, tok)
            out.flush()
        if token == eot:
            new.pop()
            break
        if stop and stop in decode_after(tok, context, new):
            break
    text = decode_after(tok, context, new)
    if stop and stop in text:
        text = text[: text.index(stop) + len(stop)]  # (the last token may run past it)
    if out is not None:
        whole = for_terminal(text) if _is_terminal(out) else text  # (as the streamed text: see sample)
        out.write(f"--- text ---\n{prompt}{whole}\n")
        out.flush()
    return text


def _data_changed_note(loaded, data_dir: Path, meta: dict) -> str | None:
    """A note when the run's data folder was prepared again, from other text or with another split, since the
    checkpoint was saved (its val split may then hold text the run trained on), as a resume notes it."""
    from fungpt.checkpoint import MANIFEST_FILE

    if loaded.checkpoint_id is None:
        return None
    try:
        was = read_json(loaded.checkpoint_id[0] / MANIFEST_FILE).get("data_fingerprint")
    except (OSError, ValueError, AttributeError):  # (saved again meanwhile; checked when it was loaded)
        return None
    now = data_fingerprint(meta)
    if was is None or now is None or was == now:  # (None: checkpoints from before it was recorded, or own ids)
        return None
    return (f"fungpt: note: {data_dir} was prepared again since step {loaded.step} (its text's sha256, or how it is "
            f"split, differs from what the checkpoint recorded): its val split may hold text the run trained on, "
            f"and this loss does not compare with the run's val losses")


def _prepare_again(loaded: LoadedRun, gone: Path, progress: bool) -> Path:
    """The folder the run's text was prepared into is gone (the README lets a cache be deleted): prepare the text its
    config names again, into the cache, as `fungpt train --resume` would (encoded with the run's own tokenizer where
    a tokenizer trained again would differ). Text other than the run's (its fingerprint in the checkpoint differs:
    an edited file, or a relative path found from another folder) is refused: its val split is not the run's."""
    data = loaded.config.data
    source = Path(data.path).expanduser()
    if source.resolve() == gone.resolve():  # (a folder made by `fungpt prepare`, then deleted: nothing to read)
        raise FunGPTError(f"the data {loaded.run_dir} was trained on ({gone}) is gone: put it back (a folder of your "
                          f"own token ids has no text to make it from), prepare it again with `fungpt prepare`, or "
                          f"pass --input TEXT_FILE to evaluate on a text file")
    if not source.exists() and data.path != "shakespeare":
        hint = (" (a relative data.path is found from the folder you run in: run where you trained)"
                if not source.is_absolute() else "")
        raise FunGPTError(f"the data {loaded.run_dir} was trained on ({gone}) is gone, and so is its text "
                          f"{data.path}{hint}; pass --input TEXT_FILE to evaluate on a text file")
    where = str(source.resolve()) if source.exists() else data.path  # (the built-in corpus: by its name)
    print(f"fungpt: the data {loaded.run_dir} was trained on ({gone}) is gone (a cleared cache?): preparing {where} "
          f"again into the cache, as training does", file=sys.stderr)
    fine_tuned = is_pretrained(loaded.config.model.init_from)  # (prepared with the model's own tokenizer)
    try:
        out = resolve_data(data, progress=progress, tokenizer=loaded.tokenizer if fine_tuned else None)
        if _data_changed_note(loaded, out, load_meta(out)):
            raise FunGPTError(f"{where} is not the text {loaded.run_dir} was trained on (its sha256, or how it is "
                              f"split, differs from what the checkpoint recorded), so its val split is not the run's")
        if loaded.tokenizer.first_difference(load_tokenizer(out)) is not None:  # (a BPE trained again, otherwise)
            out = resolve_data(data, progress=progress, tokenizer=loaded.tokenizer)
    except FunGPTError as e:
        raise FunGPTError(f"cannot evaluate on the val split of {loaded.run_dir}: {e}; pass --input TEXT_FILE to "
                          f"evaluate on a text file") from None
    return out


def default_eval_batch(block_size: int, vocab_size: int) -> int:
    """Windows `fungpt eval` scores at once: 16, or as many as keep their logits within EVAL_LOGITS_MAX floats (at
    least one)."""
    return max(1, min(16, EVAL_LOGITS_MAX // (block_size * vocab_size)))


@torch.no_grad()
def evaluate_run(run: str | Path, input: str | Path | None = None, checkpoint: str = "last", device: str = "auto",
                 batch_size: int | None = None, progress: bool = False, errors: str | None = None
                 ) -> dict[str, float]:
    """Loss, perplexity and bits per byte/character of a run on its val split or on any text file.

    Every token is scored once (data.eval_windows): consecutive windows of block_size tokens each
    predict their next tokens; the first tokens of a window see a shorter context.
      loss        mean cross-entropy in nats per token
      perplexity  exp(loss): the model is as unsure as a uniform choice among this many tokens
      bits/byte   total bits / UTF-8 bytes: comparable across tokenizers (char, BPE, GPT-2)
    errors: how to read bytes of `input` that are not UTF-8, "strict" (refuse) or "replace" (U+FFFD);
    None: as the run's data was read (data.errors).
    batch_size: windows scored at once; None: 16, or fewer where their (B, T, vocab_size) logits would pass 2^24
    floats (64 MB, and as much again for cross-entropy's log-softmax of them): GPT-2's 1024 x 50,257 took 6.7 GB
    at 16 windows.
    """
    if batch_size is not None:  # (from Python: the command line's parser has checked its own)
        check_number(batch_size, "batch_size", whole=True)
        if batch_size <= 0:
            raise FunGPTError(f"batch_size {batch_size} must be positive")
        batch_size = int(batch_size)  # (a numpy integer: as Python's)
    if input is not None and not str(input).strip():  # (Path("") is the current folder: "is a folder", wrongly)
        raise FunGPTError("no --input file was named (an empty name): pass a text file, or leave --input out to "
                          "evaluate on the run's val split")
    if errors not in (None, "strict", "replace"):
        raise FunGPTError(f"--errors {errors!r} is not valid: choose strict or replace")
    loaded = load_run(run, checkpoint, device)
    note = None  # a line for the reader of the numbers, if they need one
    changed = None  # with the run's val split: a note that it was prepared again since, if it was
    meta = None  # with the run's val split: its folder's meta.json
    if input is not None:
        path = Path(input).expanduser()
        if not path.exists():
            raise FunGPTError(f"--input {path} does not exist")
        if path.is_dir():
            raise FunGPTError(f"--input {path} is a folder: eval reads one text file")
        # Read as prepare reads a corpus, in chunks: "\r\n" kept, a byte-order mark dropped, bytes that are not
        # UTF-8 refused or, for a run trained with data.errors = "replace", read as U+FFFD.
        mode = errors or loaded.config.data.errors
        try:  # --errors replace helps only where U+FFFD is a token (byte-level BPE, GPT-2; rarely a char vocabulary)
            loaded.tokenizer.encode("\ufffd")
            fix = "convert it to UTF-8, or pass --errors replace to read such bytes as U+FFFD"
        except FunGPTError:
            fix = "convert it to UTF-8 (this run's characters do not include U+FFFD, so --errors replace cannot help)"
            # read strictly: a bad byte is then named as such, not as a U+FFFD "missing from the vocabulary"
            mode = "strict"
        tokens, n_bytes, n_chars = encode_file(path, loaded.tokenizer, mode, progress, utf8_fix=fix)  # (n,)
        source = str(path)
    else:
        if errors is not None:
            raise FunGPTError("--errors applies to an --input text file; the run's val split was read when it "
                              "was prepared (data.errors)")
        data_dir = data_dir_of(run)
        if not data_dir.is_dir():
            data_dir = _prepare_again(loaded, data_dir, progress)
        meta = load_meta(data_dir)
        # The folder may have been prepared again since training (an edited corpus, another tokenizer):
        # its token ids would then mean other text than the model's, and the loss would be meaningless.
        data_tok, run_tok = load_tokenizer(data_dir), loaded.tokenizer
        bad = run_tok.first_difference(data_tok)
        if bad is not None:
            differs = (f"{data_tok.describe()} against the run's {run_tok.describe()}"
                       if data_tok.vocab_size != run_tok.vocab_size else
                       f"id {bad} is {data_tok.token_text(bad)!r} there, {run_tok.token_text(bad)!r} in the run")
            raise FunGPTError(f"{data_dir} was prepared again since {run} was trained: its tokens mean other text "
                              f"({differs}); pass --input TEXT_FILE to evaluate on a text file")
        # (n,); an empty file cannot be mapped: it is too short to evaluate, as said below
        tokens = (np.memmap(data_dir / "val.bin", dtype=np.dtype(meta["dtype"]), mode="r")
                  if (data_dir / "val.bin").stat().st_size else np.zeros(0, dtype=np.dtype(meta["dtype"])))
        changed = _data_changed_note(loaded, data_dir, meta)
        # A folder of token ids made without `fungpt prepare` (README: "Data of your own token ids") may not know
        # the size of its text (val_bytes, val_chars): loss and perplexity still stand, bits per byte (per
        # character) cannot be told without it (the bytes are the characters only in ASCII text)
        n_bytes, n_chars = meta.get("val_bytes"), meta.get("val_chars")
        # (named by the text it was prepared from, where known: the folder is a cache's, with a made-up name)
        source = f"the val split of {meta['source']} ({data_dir})" if meta.get("source") else f"{data_dir} (val)"
        missing = [(key, unit) for key, unit in (("val_bytes", "byte"), ("val_chars", "character"))
                   if meta.get(key) is None]
        if missing:
            note = (f"fungpt: note: {data_dir / 'meta.json'} has no {' or '.join(k for k, _ in missing)} (the size "
                    f"of the val text), so bits per {' and per '.join(u for _, u in missing)} cannot be given; pass "
                    f"--input VAL_TEXT_FILE to score the text itself")
        elif (meta.get("eot_id") is not None and meta.get("source_files", 1) > 1 and not meta.get("bytes_exclude_eot")
              and bool(np.any(tokens == meta["eot_id"]))):  # (with none in val, its val figures are exact)
            note = (f"fungpt: note: {data_dir} was prepared by an older FunGPT, which counted each <|endoftext|> "
                    f"between its files as 13 bytes of text: its bits per byte and per character come out a little "
                    f"low; prepare it again (or pass --input) for the exact figures")
        note = "\n".join(n for n in (changed, note) if n) or None
    if len(tokens) < 2:
        raise FunGPTError(f"{source} is too short to evaluate: it needs at least 2 tokens")
    # The first token's bytes, read before the scoring (a tokenizer that cannot give them fails at once); not
    # needed without the text's size (GPT-2 ids then need no tiktoken), nor readable for an id past the vocabulary
    # (a damaged file, which eval_windows names)
    first = int(tokens[0])
    head = b""
    if not ((input is None and first == loaded.tokenizer.eot_id) or (n_bytes is None and n_chars is None)
            or first >= loaded.tokenizer.vocab_size):
        try:
            head = loaded.tokenizer.token_bytes(first)
        except FunGPTError as e:  # (GPT-2's ids without tiktoken's files: the loss needs no text, bits per byte do)
            n_bytes = n_chars = None
            why = (f"fungpt: note: bits per byte and per character cannot be given here: they need the text of the "
                   f"first token, which the tokenizer cannot read ({e})")
            note = "\n".join(n for n in (note, why) if n)
    T = loaded.config.model.block_size
    if batch_size is None:
        batch_size = default_eval_batch(T, loaded.model.config.vocab_size)
    # (ids read from a .bin are checked against the vocabulary, batch by batch: the file may be damaged)
    windows = eval_windows(tokens, T, batch_size, device=loaded.device, vocab_size=loaded.model.config.vocab_size,
                           source=getattr(tokens, "filename", None) or source, meta=meta)
    batches = math.ceil(math.ceil((len(tokens) - 1) / T) / batch_size)  # windows of T targets, B per batch
    with eval_bar(batches, "eval", progress, delay=0) as bar:  # (a long text or val split can take minutes)
        total_nll, total_tokens = score_windows(loaded.model, counted(windows, bar))
    loss = total_nll / total_tokens
    # Every token but the first is predicted: bits per byte (per character) divide by the bytes of the text
    # those tokens stand for, the whole text's less the first token's, and by the characters that start after
    # it (a byte-level token can hold part of a character: a character starts at each byte that is not a UTF-8
    # continuation byte, 10xxxxxx). An <|endoftext|> between the files of a prepared split is not counted as text.
    bits = total_nll / math.log(2)
    per_byte = per_char = math.nan  # (unknown: a folder of token ids without its text's size)
    if n_bytes is not None:
        n_bytes -= len(head)
        per_byte = bits / n_bytes if n_bytes > 0 else math.nan
    if n_chars is not None:
        n_chars -= sum((b & 0xC0) != 0x80 for b in head)
        per_char = bits / n_chars if n_chars > 0 else math.nan
    if input is None and changed is None:  # (training's val losses are of another split where it changed)
        note = "\n".join(n for n in (note, _sampled_val_note(loaded, loss)) if n) or None
    # (a loss above ln(float max), 709.8 nats: a diverged model whose weights are finite, is a perplexity of inf)
    perplexity = math.inf if loss > math.log(sys.float_info.max) else math.exp(loss)
    return {"loss": loss, "perplexity": perplexity, "bits_per_token": loss / math.log(2),
            "bits_per_byte": per_byte, "bits_per_char": per_char, "note": note,
            "tokens": total_tokens, "step": loaded.step, "source": source}


def _sampled_val_note(loaded: LoadedRun, loss: float) -> str | None:
    """Why the val loss training logged at this checkpoint's step differs from `loss`, every val token's: it was
    the mean of eval_iters random batches (None when training scored the whole split too, or logged none here)."""
    from fungpt.plot import read_metrics

    tc = loaded.config.train
    if tc.eval_full_val:
        return None
    try:
        logged = [row["val_loss"] for row in read_metrics(loaded.run_dir)[1] if row.get("step") == loaded.step]
    except (FunGPTError, OSError, ValueError, KeyError, TypeError):
        return None
    was = float(logged[-1]) if logged else math.nan  # (the last: a resumed run may log a step twice)
    # (NaN is no "difference" that random batches explain)
    if not (math.isfinite(was) and math.isfinite(loss)) or abs(was - loss) < 5e-5:
        return None
    batches = f"{tc.eval_iters} random batch{'es' * (tc.eval_iters != 1)}"
    return (f"fungpt: note: training logged val loss {was:.4f} at step {loaded.step}, the mean of "
            f"train.eval_iters = {batches} of the val split; this is every val token's "
            f"(train.eval_full_val = true makes training's the same)")


def print_eval(result: dict, file: TextIO | None = None) -> None:
    file = file or sys.stdout  # (looked up now: a default of sys.stdout would keep the one of import time)
    n = result["tokens"]
    print(f"{result['source']} at step {result['step']}: {n:,} token{'s' * (n != 1)}", file=file)
    print(f"  loss        {result['loss']:.4f} nats/token", file=file)
    print(f"  perplexity  {result['perplexity']:.3f}", file=file)
    for name, key in (("bits/byte", "bits_per_byte"), ("bits/char", "bits_per_char")):
        value = result[key]
        print(f"  {name:<11} {'n/a' if math.isnan(value) else f'{value:.4f}'}", file=file)
