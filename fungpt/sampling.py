"""From logits to the next token: temperature, top-k and top-p (nucleus) filtering, and the draw.

`sample_next_token` is what generation calls once per new token; `sampling_probs` is the distribution
it draws from (also shown by `fungpt sample --show-probs`), `draw` the drawing itself. Pure functions of
their arguments: the same logits and generator state give the same token.
"""

import decimal
import math
import numbers

import torch
import torch.nn.functional as F

from fungpt.errors import FunGPTError


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (..., V), drawn with those probabilities: ids (..., 1).

    On a CPU, inverse-CDF sampling: lay the probabilities end to end (their running sum, the CDF), draw
    one uniform number u below the total, and take the token whose stretch contains u; a token with
    probability 0 has an empty stretch and is never drawn. One random number per row, where
    torch.multinomial draws one per token: 0.05-0.07 against 1.06-1.18 ms for GPT-2's 50257 tokens (BENCHMARKS.md,
    "Sixth session", in float32; in float64 since). Elsewhere torch.multinomial: a GPU's cumsum adds in an order of
    its own, so its running sums need not even increase.
    """
    if not probs.is_cpu:
        _refuse_undrawable(probs.sum(dim=-1))  # (torch.multinomial's own refusal is a RuntimeError)
        return torch.multinomial(probs, 1, generator=generator)
    # In float64: float32's running sum (24-bit mantissa) and uniform number (multiples of 2^-24) made tokens of
    # tiny probability undrawable: with GPT-2's 50257 tokens and no top_k, thousands of them.
    cdf = probs.double().cumsum(dim=-1)  # (..., V), added left to right: never decreasing; ends at the total (~1)
    total = cdf[..., -1:]  # (..., 1)
    _refuse_undrawable(total)
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64) * total  # (..., 1)
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # below the total even after rounding
    return torch.searchsorted(cdf, u, right=True)  # (..., 1): the first token whose running sum exceeds u


def _refuse_undrawable(total: torch.Tensor) -> None:
    """Refuse rows whose probabilities add up to NaN or 0: there is nothing to draw from."""
    if not bool((total > 0).all()):  # NaN fails the test too
        raise FunGPTError("cannot sample the next token: its probabilities are NaN or all zero (NaN, +inf or all -inf "
                          "logits; a model whose training diverged gives these)")


NUCLEUS_HEAD = 256
"""How many of the most probable tokens top-p first looks at (it sorts the whole vocabulary only if their
probabilities add up to less than top_p)."""


def sampling_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """The distribution the next token is drawn from: logits (..., V) -> probabilities (..., V).

    temperature (> 0): divide logits by it before softmax; < 1 sharpens, > 1 flattens.
    top_k: keep only tokens whose logit is >= the k-th largest logit. Ties at the
        k-th value are all kept, so more than k tokens can survive (the result
        never depends on an arbitrary tie-break).
    top_p: nucleus sampling (Holtzman et al. 2019). Keep the smallest set of most
        probable tokens whose total probability is >= top_p (at least the top token);
        tokens tied with the least probable kept token are kept too.
    Filters apply in this order: temperature, top_k, top_p (on the renormalised
    top-k distribution); filtered-out tokens get probability 0.
    """
    temperature = checked_temperature(temperature)
    if temperature == 0:
        raise FunGPTError("temperature=0 must be a number > 0 here (0 = greedy is handled by sample_next_token)")
    check_filters(top_k, top_p)
    top_p = None if top_p is None else float(top_p)  # (torch compares tensors with floats, not with a Fraction)
    if logits.dtype == torch.float64:  # (shifted first: a logit past float32's 3.4e38 would be inf there, then NaN)
        logits = logits - logits.amax(dim=-1, keepdim=True)
    logits = logits.float()
    # Shifted so that the largest is 0 (softmax is unchanged by a shift): a tiny temperature then sends the
    # others to -inf instead of every logit to +-inf (NaN after softmax). Below 1e-30 (which float32 still
    # holds; 1e-300 would round to 0) the distribution is already all on the largest logits; above 1e30 it is
    # already flat (beyond float32's 3.4e38 the temperature would be inf, and a masked -inf logit over it NaN).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / min(max(temperature, 1e-30), 1e30)  # (..., V)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]  # (..., 1) k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # 1.0 keeps every token (a float32 running sum can reach 1 early)
        probs = F.softmax(logits, dim=-1)  # (..., V)
        # The most probable tokens, in order: the top NUCLEUS_HEAD first (topk), every token only if those
        # hold less than top_p (sorting GPT-2's 50257 probabilities takes ~4 ms, its top 256 ~0.1 ms).
        sorted_probs = torch.topk(probs, min(NUCLEUS_HEAD, probs.size(-1)), dim=-1).values  # (..., k) descending
        mass_upto = sorted_probs.cumsum(dim=-1)  # (..., k)
        if not bool((mass_upto[..., -1] >= top_p).all()):  # the nucleus may reach past the top k: sort them all
            sorted_probs = probs.sort(dim=-1, descending=True).values  # (..., V)
            mass_upto = sorted_probs.cumsum(dim=-1)
        mass_before = mass_upto - sorted_probs  # probability of strictly better-ranked tokens
        # (..., 1); at least the most probable token, also for a top_p too small for float32 (1e-46 -> 0)
        n_keep = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp_min(1)
        cutoff = sorted_probs.gather(-1, n_keep - 1)  # (..., 1) probability of the last kept token
        logits = logits.masked_fill(probs < cutoff, float("-inf"))
    return F.softmax(logits, dim=-1)  # (..., V)


def check_filters(top_k, top_p) -> None:
    """Refuse a top_k that is not a whole number >= 1 and a top_p that is not a number in (0, 1], in one line (None:
    that filter is off). bool is no number here: top_p=True read as 1 would silently mean no filter."""
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1):
        raise FunGPTError(f"top_k={top_k!r} must be a whole number >= 1 (or None to disable)")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and not isinstance(top_p, bool) and 0 < top_p <= 1):
        raise FunGPTError(f"top_p={top_p!r} must be a number in (0, 1] (or None to disable)")


def checked_temperature(temperature) -> float:
    """temperature as a float, refused in one line unless a finite number >= 0 (0 = greedy). bool is no number here
    (True was read as 1); a Fraction, a Decimal or a 0-d tensor becomes a float, which torch takes."""
    if isinstance(temperature, torch.Tensor) and temperature.dim() == 0 and temperature.is_floating_point():
        temperature = temperature.item()
    elif isinstance(temperature, decimal.Decimal):  # (not a numbers.Real, though a number)
        temperature = float(temperature)
    if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
            and 0 <= temperature < math.inf):  # (NaN fails this test too)
        raise FunGPTError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    return float(temperature)


def check_generate_args(max_new_tokens, lookahead, temperature, top_k, top_p) -> tuple[float, float | None]:
    """Refuse generation's counts and filters in one line before the first token. top_k and top_p too when
    decoding is greedy: it never reads them, and a mistake there went unseen. bool is no number here. Returns
    temperature and top_p as floats, which torch takes (a Fraction, say, it does not)."""
    for name, value in (("max_new_tokens", max_new_tokens), ("lookahead", lookahead)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise FunGPTError(f"{name}={value!r} must be a whole number >= 0")
    temperature = checked_temperature(temperature)
    check_filters(top_k, top_p)
    return temperature, None if top_p is None else float(top_p)


def sample_next_token(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Pick the next token for each row of logits (B, V); returns ids (B, 1).

    temperature 0 means greedy (argmax, ignoring top_k/top_p); otherwise one token is
    drawn (`draw`, with generator) from `sampling_probs` (see there for the filters).
    """
    temperature = checked_temperature(temperature)
    if temperature == 0:
        # max, not argmax: the same first index of the largest, and its value to check, in one operation
        top, best = logits.max(dim=-1, keepdim=True)  # (B, 1) each; a NaN counts as the largest
        if not (math.isfinite(top.item()) if top.numel() == 1 else bool(torch.isfinite(top).all())):
            raise FunGPTError("cannot pick the next token: the logits are NaN or infinite (a model whose training "
                              "diverged gives these)")  # (NaN, every logit -inf, or one +inf)
        return best
    return draw(sampling_probs(logits, temperature, top_k, top_p), generator)  # (B, V) -> (B, 1)
