"""Prompt-lookup speculation: several greedy tokens per pass over the weights, same output.

Decoding one token at batch size 1 reads every weight of the model once and does little
arithmetic with it; on a CPU that read dominates. A forward pass over 1 + k tokens reads the
same weights once, so checking k guessed tokens costs about as much as decoding one. The
guesses come from the text itself (Saxena 2023, "Prompt Lookup Decoding"): find the latest
earlier occurrence of the last few tokens and copy what followed it. The check is the
verification step of speculative decoding (Leviathan et al. 2023): keep every guess that equals
the model's own greedy pick, plus the model's token at the first wrong guess. The output is therefore
exactly the plain greedy sequence; it only arrives sooner when the text repeats itself.

GPT.generate_stream(lookahead=k) calls these two functions; they need only torch, the model and sampling.py.
"""

from collections.abc import Iterator

import torch

from fungpt.sampling import sample_next_token


def lookup_draft(history: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Guess up to k next tokens by copying: find the latest earlier occurrence of the last n
    tokens (n = max_ngram down to 1) and return the k tokens that followed it ([] if none).

    The copy may run past the end of history into the guess itself (as in LZ77 compression), so a
    repeating pattern such as "abcabc" is continued for all k tokens, not cut off at the end.
    """
    if k <= 0:
        return []
    for size in range(min(max_ngram, len(history) - 1), 0, -1):
        tail = history[-size:]
        for start in range(len(history) - size - 1, -1, -1):  # latest match first, never the tail itself
            if history[start : start + size] == tail:
                source = history[start + size :]  # what followed the match, then (by overlap) the guess itself
                draft: list[int] = []
                for i in range(k):
                    draft.append(source[i] if i < len(source) else draft[i - len(source)])
                return draft
    return []


def verify_draft(model, seq: torch.Tensor, n: int, draft: list[int], cache, history: list[int],
                 yield_logits: bool) -> Iterator:
    """Check draft tokens with one cached forward pass of `model`; yield the accepted ones (greedy, B = 1).

    seq (1, L) holds the n tokens so far (and room for more); cache holds the keys/values of all
    but the newest one. Input: the newest token seq[:, n-1] followed by the k draft tokens. Output
    position i predicts the token after input i, so draft token i is right iff it equals the
    greedy pick (sample_next_token, temperature 0) at position i. We keep the right prefix plus the
    model's own token where the first wrong guess was, write them into seq and history, and roll the
    cache back over the rejected positions. Yields ids (1,), or (ids, logits (1, V)) with yield_logits,
    like generate_stream.
    """
    start = cache.pos
    chunk = torch.tensor([[int(seq[0, n - 1])] + draft], dtype=seq.dtype, device=seq.device)  # (1, 1 + k)
    logits = model(chunk, kv_cache=cache)  # (1, 1 + k, V)
    # Each position's token as the plain path picks it: sampling.py's greedy rule, which refuses NaN or infinite
    # logits (argmax alone took a NaN row's token 0) and holds any rule a learner adds there (a banned token; an
    # argmax here accepted the banned guess). The right guesses, then the model's own token (a correction, or one
    # bonus token); the positions after the first wrong guess are never looked at.
    new: list[int] = []
    for i in range(len(draft) + 1):
        new.append(int(sample_next_token(logits[0, i : i + 1], temperature=0)))  # (1, V) -> (1, 1)
        if i == len(draft) or new[i] != draft[i]:
            break
    accepted = len(new) - 1
    cache.pos = start + 1 + accepted  # keys/values of rejected guesses sit beyond pos: never read
    for i, tok in enumerate(new):
        seq[0, n + i] = tok
        history.append(tok)
        ids = seq[:, n + i]  # (1,)
        yield (ids, logits[:, i, :].clone()) if yield_logits else ids  # (a view: all k + 1 rows kept alive)
