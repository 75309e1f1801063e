"""Seeded synthetic workloads that reproduce the paper's trace statistics.

``generate(workload, programs, rate, seed)`` returns programs whose means
match DESIGN.md section 2: calls per program, output tokens per call, and
prompt tokens per call, which for BFCL and LATS count the re-sent history
and for ShareGPT count only each turn's new tokens (the table's 255.65
cannot include a chat's history; traces/README.md, "ShareGPT prompt
lengths"). Each workload's parameters are a
dataclass below; their defaults are the paper's numbers, and the internal
distributions are *derived* from those targets (closed-form or by bisection
on exact expectations), so a changed target moves the distribution instead of
silently drifting. traces/README.md explains each distribution and why it
was chosen.

Randomness: one ``numpy.random.SeedSequence(seed)`` is split into an
arrival stream and a program stream, each a ``Generator(PCG64(...))``. So
the same seed gives byte-identical traces, and changing ``rate`` (or the
arrival process) changes only the arrival times, never the programs: a rate
sweep compares the same work at different loads.

Token counts are integers >= 1 drawn as ``ceil(lognormal)``: lengths of text
are well described by lognormals (right-skewed, multiplicative), and the
ceiling keeps every count positive without clipping; the lognormal's mean is
set to ``target - 0.5`` to offset the ceiling's average rounding up. That
offset is exact only for wide enough counts; where it would miss the target
by more than 0.1% (a few tokens with a wide spread: a mean of 3 at sigma 2
would give 3.19), the location is solved so the rounded counts' mean is the
target (`token_length`). A target of exactly 1 makes every count 1. A
spread below ``MIN_SIGMA`` (1e-9) is the lognormal's limit as sigma -> 0:
the whole numbers either side of the mean, in the proportions that hold it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr, ndtri

from traces.arrivals import arrival_times, check_arrival
from traces.format import MAX_SECONDS, MAX_TOKENS, Call, Program, SharedPrefix, is_finite_number, make_call

WORKLOADS = ("sharegpt", "bfcl", "lats", "mixed")
# The most programs one call generates: ten million is about 10**8 calls, far
# past what a simulation holds in memory (a million calls take ~0.5 GiB), so
# a larger count is a typo that would only end in a MemoryError.
MAX_PROGRAMS = 10_000_000
# The most calls one program may have (``calls_max``; for LATS, the calls of
# ``max_steps`` steps). The tables have at most 351; the count distribution
# is evaluated at every count up to the cap (0.05 s at 10,000, but minutes
# for a mistyped 10**8), and a chain that long re-sends a history far past
# any context window.
MAX_CALLS_PER_PROGRAM = 10_000


# ---------------------------------------------------------------- parameters


# The largest log-space spread of a lognormal parameter (``*_sigma``). The
# location is log(mean) - sigma**2 / 2 so that the mean holds; at sigma = 4 the
# median is already mean / 3000, and past it nearly every draw rounds to the
# minimum (or underflows to 0 tokens) while a rare one is astronomically large.
MAX_SIGMA = 4.0
# The smallest log-space spread computed as a lognormal. Below it a count is
# the lognormal's limit as sigma -> 0 with its mean held: the whole number
# either side of the mean, in the proportions that make the mean (`count_pmf`,
# `token_length`). The spread itself is then below float resolution of the
# location (sigma = 1e-300 made 0/0 in the bin probabilities, and the solved
# location missed the mean), and the limit is what any sigma that small draws:
# at 1e-9 a count of a million moves by a thousandth of a token.
MIN_SIGMA = 1e-9


def _workload_of(params: Any) -> str:
    """``sharegpt`` for ShareGPTParams, ``bfcl`` for BFCLParams: the name errors use."""
    return type(params).__name__.removesuffix("Params").lower()


def _check_mean_below_max(obj: Any) -> None:
    """A chain's mean length must lie strictly between 1 call and ``calls_max`` (`count_pmf`)."""
    if obj.calls_max > MAX_CALLS_PER_PROGRAM:
        raise ValueError(f"{_workload_of(obj)} parameter 'calls_max' must be at most "
                         f"{MAX_CALLS_PER_PROGRAM:,} calls per program, got {_shown(obj.calls_max)}")
    if not 1 < obj.calls_mean < obj.calls_max:
        # Both keys are named unquoted, so a located error points at the parameters, not at one of them.
        raise ValueError(f"{_workload_of(obj)} parameters: calls_mean={_shown(obj.calls_mean)} must lie "
                         f"strictly between 1 and calls_max={_shown(obj.calls_max)}")


def _shown(value: Any) -> str:
    """``repr``, but a very long integer by its length: a 400-digit value would fill the screen."""
    text = repr(value)
    if isinstance(value, int) and len(text) > 40:
        return f"a {len(text.lstrip('-'))}-digit integer"
    return text


def _check_positive(obj: Any, *names: str, integer: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        if integer:  # any size: the bounds below (or the parameter's own) refuse one too large
            ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
        else:  # a spread may be 0, no spread (`MIN_SIGMA`): the README says so, and 0 was refused
            ok = is_finite_number(v) and (v >= 0 if name.endswith("_sigma") else v > 0)
        what = f"{_workload_of(obj)} parameter {name!r}"
        if not ok:
            kind = "an integer" if integer else "a finite number"
            raise ValueError(f"{what} must be {kind} {'>=' if name.endswith('_sigma') else '>'} 0, got {_shown(v)}")
        if name.endswith("_sigma") and v > MAX_SIGMA:
            raise ValueError(f"{what} must be at most {MAX_SIGMA:g} (a wider lognormal degenerates), got {v!r}")
        if integer and name.endswith("_tokens") and v > MAX_TOKENS:
            raise ValueError(f"{what} must be at most {MAX_TOKENS:,} tokens (the trace format's limit), got {_shown(v)}")
        if name.endswith(("_tokens_mean", "_output_mean")) and v < 1:
            raise ValueError(f"{what} must be at least 1 (a mean count of whole tokens, each count >= 1), got {v!r}")
        if name.endswith(("_tokens_mean", "_output_mean")) and v > MAX_TOKENS:  # 1e308 drew inf: OverflowError
            raise ValueError(f"{what} must be at most {MAX_TOKENS:,} tokens (the trace format's limit), got {v!r}")


@dataclass(frozen=True)
class ShareGPTParams:
    """Multi-turn chat: a chain of turns, each re-sending the whole history.

    ``turns_sigma`` is the log-space spread of the turn count (a discretised
    lognormal truncated at ``calls_max`` whose location is solved so the mean
    is ``calls_mean``). ``user_tokens_mean`` is the mean length of each new
    user message: the table's 255.65 cannot be the mean prompt *including*
    history (see traces/README.md, "ShareGPT prompt lengths"), so it is
    matched on the new tokens per call. ``history=False`` drops the re-sent
    history (calls stay chained but carry no ``context_of``), which
    reproduces the table's prompt mean literally. ``think_time_mean`` > 0
    adds exponential human think time before each later turn.
    """

    calls_mean: float = 6.66
    calls_max: int = 80
    turns_sigma: float = 1.0
    user_tokens_mean: float = 255.65
    user_tokens_sigma: float = 1.0
    output_tokens_mean: float = 276.81
    output_tokens_sigma: float = 0.8
    think_time_mean: float = 0.0
    history: bool = True

    def __post_init__(self) -> None:
        _check_positive(self, "calls_mean", "turns_sigma", "user_tokens_mean", "user_tokens_sigma",
                        "output_tokens_mean", "output_tokens_sigma")
        _check_positive(self, "calls_max", integer=True)
        _check_mean_below_max(self)
        t = self.think_time_mean
        if not (is_finite_number(t) and t >= 0):
            raise ValueError(f"sharegpt parameter 'think_time_mean' must be a finite number >= 0, got {t!r}")
        if not isinstance(self.history, bool):
            raise ValueError(f"sharegpt parameter 'history' must be true or false, got {self.history!r}")


@dataclass(frozen=True)
class BFCLParams:
    """ReAct tool loop: a chain of short calls with tool time between them.

    The root prompt is the function documentation (``docs_tokens``, shared
    across programs through ``shared_prefix``; ``tool_sets`` distinct
    documentation sets, one chosen uniformly per program) plus the user
    query. Each later call re-sends the history plus the previous tool's
    result (``observation_tokens_mean``). The query length is solved so that
    the mean prompt per call, history included, is ``prompt_tokens_mean``.
    Tool time before each later call is lognormal with mean
    ``tool_delay_mean`` seconds.
    """

    calls_mean: float = 10.75
    calls_max: int = 70
    calls_sigma: float = 0.6
    prompt_tokens_mean: float = 735.06
    output_tokens_mean: float = 34.14
    output_tokens_sigma: float = 0.6
    docs_tokens: int = 256
    tool_sets: int = 16
    observation_tokens_mean: float = 25.0
    observation_tokens_sigma: float = 1.0
    query_tokens_sigma: float = 0.7
    tool_delay_mean: float = 1.0
    tool_delay_sigma: float = 1.0

    def __post_init__(self) -> None:
        _check_positive(self, "calls_mean", "calls_sigma", "prompt_tokens_mean", "output_tokens_mean",
                        "output_tokens_sigma", "observation_tokens_mean", "observation_tokens_sigma",
                        "query_tokens_sigma", "tool_delay_mean", "tool_delay_sigma")
        _check_positive(self, "calls_max", "docs_tokens", "tool_sets", integer=True)
        if self.tool_sets > MAX_PROGRAMS:  # a set per program is already the most that can differ
            raise ValueError(f"bfcl parameter 'tool_sets' must be at most {MAX_PROGRAMS:,} (the most programs "
                             f"a trace may have), got {_shown(self.tool_sets)}")
        _check_mean_below_max(self)


@dataclass(frozen=True)
class LATSParams:
    """Language Agent Tree Search (MCTS) on HotpotQA: a tree of parallel expansions.

    A program is a root call (shared few-shot prompt of ``prefix_tokens``
    plus the question) followed by MCTS steps. Each step expands the
    selected node into ``width`` children in parallel (calls with the node
    as parent and ``context_of``: each child re-sends the node's trajectory
    plus the observation of its action), then one evaluation call joins the
    children (their outputs and observations are its new prompt), then one
    reflection call continues the node's trajectory with the evaluation's
    verdict. The next step waits for the reflection (it is a parent of the
    next expansions) because MCTS runs its iterations in sequence.

    Selection: with probability ``greedy`` the search descends into one of
    the new children (the best-valued one) if it is shallower than
    ``depth``; otherwise it restarts from a uniformly chosen node shallower
    than ``depth`` (exploration). The number of steps is geometric (each
    step finds the answer with a fixed probability) truncated at
    ``max_steps``, its probability solved so calls per program average
    ``calls_mean`` (a narrower ``width`` needs more steps for the same
    calls; past half the budget the ratio exceeds 1, see
    :func:`truncated_geometric_pmf`).

    Outputs differ by role: expansions write a short thought and action
    (``expansion_output_mean``), evaluations a short verdict
    (``evaluation_output_mean``), the root the same as the overall mean, and
    reflections take the rest so the mean over all calls is exactly
    ``output_tokens_mean``. ``prefix_tokens`` defaults to the value that
    makes the mean prompt (history included) 467.24 tokens at the other
    defaults (calibrated with ``python -m traces stats``; see traces/README.md).
    Tool time (the Wikipedia search behind each action) delays the
    evaluation by a lognormal of mean ``tool_delay_mean`` seconds.
    """

    calls_mean: float = 159.71
    width: int = 5
    depth: int = 7
    max_steps: int = 50
    greedy: float = 0.5
    output_tokens_mean: float = 72.64
    expansion_output_mean: float = 30.0
    evaluation_output_mean: float = 60.0
    output_tokens_sigma: float = 0.6
    prefix_tokens: int = 132
    question_tokens_mean: float = 30.0
    observation_tokens_mean: float = 20.0
    instruction_tokens_mean: float = 20.0
    tokens_sigma: float = 0.6
    tool_delay_mean: float = 0.5
    tool_delay_sigma: float = 1.0

    def __post_init__(self) -> None:
        _check_positive(self, "calls_mean", "output_tokens_mean", "expansion_output_mean",
                        "evaluation_output_mean", "output_tokens_sigma", "question_tokens_mean",
                        "observation_tokens_mean", "instruction_tokens_mean", "tokens_sigma",
                        "tool_delay_mean", "tool_delay_sigma")
        _check_positive(self, "width", "depth", "max_steps", "prefix_tokens", integer=True)
        if not (isinstance(self.greedy, (int, float)) and not isinstance(self.greedy, bool) and 0 <= self.greedy <= 1):
            raise ValueError(f"lats parameter 'greedy' must be a probability in [0, 1], got {self.greedy!r}")
        lo, hi = 1 + (self.width + 2), 1 + self.max_steps * (self.width + 2)
        if hi > MAX_CALLS_PER_PROGRAM:
            raise ValueError(
                # Both keys unquoted, as in the calls_mean check below: the error is about the pair.
                f"lats parameters: width={_shown(self.width)} and max_steps={_shown(self.max_steps)} allow "
                f"1+max_steps*(width+2) = {f'{hi:,}' if hi < 10**40 else _shown(hi)} calls per program; "
                f"at most {MAX_CALLS_PER_PROGRAM:,}"
            )
        if hi <= lo:  # one step: every program has the same 1 + (width + 2) calls, no mean to choose
            raise ValueError(
                f"lats parameter 'max_steps' must be at least 2 (one step makes every program "
                f"1+(width+2) = {lo} calls, leaving calls_mean no room), got {_shown(self.max_steps)}"
            )
        if not lo < self.calls_mean < hi:
            raise ValueError(
                f"lats parameter 'calls_mean' must lie strictly between {lo} and {hi} for "
                f"width={self.width}, max_steps={self.max_steps}; got {_shown(self.calls_mean)}"
            )
        if self.reflection_output_mean < 1:
            raise ValueError(
                "lats: expansion_output_mean and evaluation_output_mean leave less than one token per "
                f"reflection to reach output_tokens_mean {self.output_tokens_mean}"
            )

    @property
    def reflection_output_mean(self) -> float:
        """Reflection output that makes the per-step mean equal ``output_tokens_mean``."""
        per_step = self.width + 2
        return per_step * self.output_tokens_mean - self.width * self.expansion_output_mean - self.evaluation_output_mean


# ---------------------------------------------------------- distributions


def _bisect(f: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """x in [lo, hi] with f(x) = target for an increasing f (60 halvings).

    A target outside [f(lo), f(hi)] is an error: halving would return an
    end of the interval, a parameter silently not met.
    """
    if not f(lo) <= target <= f(hi):
        raise ValueError(f"no solution in [{lo:g}, {hi:g}] for the target {target!r}")
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def count_pmf(mean: float, kmax: int, sigma: float) -> np.ndarray:
    """P(K = k) for k = 1..kmax: a lognormal discretised by ceiling, truncated, mean ``mean``.

    ``P(K = k)`` is proportional to ``P(k-1 < X <= k)``, ``X`` lognormal
    with log-spread ``sigma``; the location is solved by bisection on the
    exact mean of the truncated distribution. A spread below ``MIN_SIGMA``
    is its limit: ``floor(mean)`` and the count above it, which make the mean.
    """
    if not 1 < mean < kmax:
        raise ValueError(f"a mean of {mean} calls is impossible with at most {kmax} calls")
    if sigma < MIN_SIGMA:  # the limit: floor(mean) and the count above it
        low = math.floor(mean)
        p = np.zeros(kmax)
        p[low - 1], p[low] = low + 1 - mean, mean - low
        return p
    k = np.arange(1, kmax + 1, dtype=float)
    upper = np.log(k)  # the bins' edges in log space: (log(k-1), log k]
    lower = np.concatenate(([-np.inf], upper[:-1]))

    def pmf(mu: float) -> np.ndarray:
        # Each bin's log-probability from the tail it lies in: a difference of
        # CDFs near 1 (a mean near kmax puts every bin far below the location)
        # rounds to 0 for every bin, and the bisection then met 0/0.
        z_lo, z_hi = (lower - mu) / sigma, (upper - mu) / sigma
        in_upper_tail = z_lo > 0
        log_big = np.where(in_upper_tail, log_ndtr(-z_lo), log_ndtr(z_hi))
        log_small = np.where(in_upper_tail, log_ndtr(-z_hi), log_ndtr(z_lo))
        with np.errstate(divide="ignore"):  # an empty bin (the edge of a far tail) has log-probability -inf
            logp = log_big + np.log1p(-np.exp(log_small - log_big))
        p = np.exp(logp - logp.max())
        return p / p.sum()

    def mean_at(mu: float) -> float:
        return float(pmf(mu) @ k)

    # A mean near kmax (near 1, with a wide spread) needs a location far above
    # (below) the usual bracket: widen that end by steps. The usual means keep
    # the first bracket, and so their exact draws.
    lo, hi = -20.0, math.log(kmax) + 20 * sigma
    for _ in range(100):
        if mean_at(hi) >= mean:
            break
        hi += 20 * sigma
    else:
        raise ValueError(f"a mean of {mean} calls is too close to the maximum of {kmax} for a spread of "
                         f"{sigma} (reachable: below {mean_at(hi):.6g}); lower the mean or the spread")
    for _ in range(100):
        if mean_at(lo) <= mean:
            break
        lo -= 20 * sigma
    else:
        raise ValueError(f"a mean of {mean} calls is too close to 1 for a spread of {sigma} (reachable: "
                         f"above {mean_at(lo):.6g}); raise the mean or lower the spread")
    return pmf(_bisect(mean_at, mean, lo, hi))


def truncated_geometric_pmf(mean: float, kmax: int) -> np.ndarray:
    """P(K = k) ∝ q^(k-1) for k = 1..kmax, with the ratio q solved for the mean.

    ``q = 1 - p`` < 1 is a geometric number of trials to the first success
    (each step succeeds with probability ``p``), truncated at the budget
    ``kmax``; means above ``(kmax + 1) / 2`` need ``q > 1``: most programs
    use most of their budget. Any mean in (1, kmax) is reachable.
    """
    k = np.arange(1, kmax + 1, dtype=float)
    if not 1 < mean < kmax:
        raise ValueError(f"a mean of {mean} steps is impossible with at most {kmax} steps")

    def pmf(log_q: float) -> np.ndarray:
        e = log_q * (k - 1)
        w = np.exp(e - e.max())
        return w / w.sum()

    log_q = _bisect(lambda x: float(pmf(x) @ k), mean, -50.0, 50.0)
    return pmf(log_q)


# How far the offset location ``log(mean - 0.5) - sigma**2 / 2`` may miss the
# mean of the rounded counts before `token_length` solves for it instead. Every
# default parameter is within 0.01% of its target, so the rule (and every trace
# generated by it) stands where it is good, and small wide counts are exact.
OFFSET_TOLERANCE = 1e-3
# `ceil_lognormal_mean` sums P(X > k) term by term below this count and
# integrates the smooth tail above it (the midpoint rule with its first
# Euler-Maclaurin correction, -pdf / 24).
_CEIL_TERMS = 2000


def ceil_lognormal_mean(mu: float, sigma: float) -> float:
    """E[ceil(X)] for X lognormal(mu, sigma): 1 + sum over k >= 1 of P(X > k).

    The tail from ``a = _CEIL_TERMS - 1/2`` on is E[(X - a)+], in closed
    form (the lognormal's stop-loss transform), less pdf(a) / 24.
    """
    k = np.arange(1, _CEIL_TERMS, dtype=float)
    head = 1.0 + float(ndtr((mu - np.log(k)) / sigma).sum())
    a = _CEIL_TERMS - 0.5
    d = (mu - math.log(a)) / sigma
    tail = math.exp(mu + sigma * sigma / 2) * float(ndtr(d + sigma)) - a * float(ndtr(d))
    pdf = math.exp(-d * d / 2) / (a * sigma * math.sqrt(2 * math.pi))
    return head + max(tail - pdf / 24, 0.0)


@dataclass(frozen=True)
class TokenLength:
    """A token-count distribution: ``ceil(lognormal(mu, sigma))``; when ``mu`` is None, ``low``,
    or ``low + 1`` with probability ``p_high`` (a mean of 1: all ones; a spread below ``MIN_SIGMA``)."""

    mu: float | None
    sigma: float
    low: int = 1
    p_high: float = 0.0


def token_length(mean: float, sigma: float) -> TokenLength:
    """The ``ceil(lognormal)`` whose counts have mean ``mean`` (>= 1) and log-spread ``sigma``."""
    if not mean >= 1:
        raise ValueError(f"a mean token count must be at least 1 (every count is a whole token), got {mean!r}")
    if mean == 1:
        return TokenLength(None, sigma)
    if sigma < MIN_SIGMA:
        return _narrow_length(mean, sigma)
    offset = math.log(mean - 0.5) - sigma * sigma / 2
    if abs(ceil_lognormal_mean(offset, sigma) / mean - 1) <= OFFSET_TOLERANCE:
        return TokenLength(offset, sigma)
    # E[X] = mean - 1 gives E[ceil X] < mean; E[X] = mean gives more than mean.
    lo, hi = math.log(mean - 1) - sigma * sigma / 2, math.log(mean) - sigma * sigma / 2
    mu = brentq(lambda x: ceil_lognormal_mean(x, sigma) - mean, lo, hi, xtol=1e-13, rtol=1e-15)
    return TokenLength(float(mu), sigma)


def _narrow_length(mean: float, sigma: float) -> TokenLength:
    """`token_length` in its limit sigma -> 0 (``sigma`` below ``MIN_SIGMA``).

    The offset rule puts every draw at ``mean - 0.5``, so every count is its
    ceiling where that is within ``OFFSET_TOLERANCE`` of the mean (as it is
    for a spread just above ``MIN_SIGMA``); else the solved location sits on
    the edge below the mean, and the counts are ``floor(mean)`` and the one
    above it, in the proportions that make the mean.
    """
    x = mean - 0.5
    if x != math.ceil(x) and abs(math.ceil(x) / mean - 1) <= OFFSET_TOLERANCE:
        return TokenLength(None, sigma, math.ceil(x), 0.0)
    low = math.floor(mean)
    return TokenLength(None, sigma, low, mean - low)


def _tokens(rng: np.random.Generator, length: TokenLength, size: int) -> list[int]:
    """``size`` integer token counts >= 1 drawn from ``length``."""
    if length.mu is None:
        # The normals a lognormal draws, so the later draws of the stream do not shift: the count
        # is the higher one where the normal is above the lognormal's edge at that location.
        z = rng.standard_normal(size)
        if length.p_high == 0:
            return [length.low] * size
        edge = -float(ndtri(length.p_high))
        return [length.low + int(high) for high in z > edge]
    draws = rng.lognormal(length.mu, length.sigma, size)
    return [int(x) for x in np.ceil(draws)]


def _seconds(rng: np.random.Generator, mean: float, sigma: float, size: int) -> list[float]:
    mu = math.log(mean) - sigma * sigma / 2
    return [float(x) for x in rng.lognormal(mu, sigma, size)]


def _draw(rng: np.random.Generator, pmf: np.ndarray, n: int) -> Iterator[int]:
    """``n`` counts from ``pmf`` (of 1, 2, ...), drawn at once but kept as one array, not n objects."""
    return (int(x) + 1 for x in rng.choice(len(pmf), size=n, p=pmf))


def _chain_pmf(p: ShareGPTParams | BFCLParams, sigma_name: str) -> np.ndarray:
    """`count_pmf` of a chain's length; a mean that the spread and the cap cannot make together
    names the three parameters (each passed its own check), so a caller can point at them."""
    sigma = getattr(p, sigma_name)
    try:
        return count_pmf(p.calls_mean, p.calls_max, sigma)
    except ValueError as exc:
        raise DrawError(f"{_workload_of(p)} parameters calls_mean={_shown(p.calls_mean)}, calls_max="
                        f"{_shown(p.calls_max)}, {sigma_name}={sigma!r}: {exc}",
                        ("calls_mean", "calls_max", sigma_name)) from None


def calls_weighted_position(pmf: np.ndarray) -> float:
    """E[t - 1] for a call drawn uniformly from all calls of chains with length pmf.

    In a chain that re-sends its history, call ``t`` carries ``t - 1`` earlier
    rounds, so this is the factor between per-round tokens and history.
    """
    k = np.arange(1, len(pmf) + 1, dtype=float)
    return float(((k * (k - 1) / 2) @ pmf) / (k @ pmf))


# ---------------------------------------------------------------- workloads


def _sharegpt(rng: np.random.Generator, n: int, p: ShareGPTParams) -> Iterator[tuple[Call, ...]]:
    pmf = _chain_pmf(p, "turns_sigma")
    user_length = token_length(p.user_tokens_mean, p.user_tokens_sigma)
    reply_length = token_length(p.output_tokens_mean, p.output_tokens_sigma)
    for turns in _draw(rng, pmf, n):
        user = _tokens(rng, user_length, turns)
        reply = _tokens(rng, reply_length, turns)
        think = (
            [float(x) for x in rng.exponential(p.think_time_mean, turns)] if p.think_time_mean > 0 else [0.0] * turns
        )
        calls = [Call("c0", (), user[0], reply[0])]
        for t in range(1, turns):
            prev = calls[-1]
            if p.history:
                prompt = prev.prompt_tokens + prev.output_tokens + user[t]
                calls.append(make_call(f"c{t}", (prev.id,), prompt, reply[t], think[t], prev.id, None, None, None))
            else:
                calls.append(make_call(f"c{t}", (prev.id,), user[t], reply[t], think[t], None, None, None, None))
        yield tuple(calls)


def _bfcl(rng: np.random.Generator, n: int, p: BFCLParams) -> Iterator[tuple[Call, ...]]:
    pmf = _chain_pmf(p, "calls_sigma")
    # Mean prompt per call = docs + query + E[t-1] * (output + observation).
    history = calls_weighted_position(pmf) * (p.output_tokens_mean + p.observation_tokens_mean)
    query_mean = p.prompt_tokens_mean - p.docs_tokens - history
    if query_mean < 1:  # the history re-sends outputs too: output_tokens_mean=1e9 went unnamed
        raise DrawError(
            f"bfcl: prompt_tokens_mean {p.prompt_tokens_mean} is too small for docs_tokens "
            f"{p.docs_tokens} plus {history:.4g} tokens of average history; lower docs_tokens, "
            f"output_tokens_mean or observation_tokens_mean",
            ("prompt_tokens_mean", "docs_tokens", "output_tokens_mean", "observation_tokens_mean",
             "calls_mean", "calls_max", "calls_sigma"),
        )
    query_length = token_length(query_mean, p.query_tokens_sigma)
    output_length = token_length(p.output_tokens_mean, p.output_tokens_sigma)
    observation_length = token_length(p.observation_tokens_mean, p.observation_tokens_sigma)
    for length in _draw(rng, pmf, n):
        # Made per program, not listed up front: tool_sets may be as large as the program count.
        prefix = SharedPrefix(f"bfcl-tools-{int(rng.integers(p.tool_sets))}", p.docs_tokens)
        query = _tokens(rng, query_length, 1)[0]
        outs = _tokens(rng, output_length, length)
        obs = _tokens(rng, observation_length, length)
        delays = _seconds(rng, p.tool_delay_mean, p.tool_delay_sigma, length)
        calls = [Call("c0", (), p.docs_tokens + query, outs[0], shared_prefix=prefix)]
        for t in range(1, length):
            prev = calls[-1]
            prompt = prev.prompt_tokens + prev.output_tokens + obs[t]
            calls.append(make_call(f"c{t}", (prev.id,), prompt, outs[t], delays[t], prev.id, None, None, None))
        yield tuple(calls)


def _lats(rng: np.random.Generator, n: int, p: LATSParams) -> Iterator[tuple[Call, ...]]:
    w = p.width
    per_step = w + 2
    pmf = truncated_geometric_pmf((p.calls_mean - 1) / per_step, p.max_steps)
    prefix = SharedPrefix("lats-hotpotqa", p.prefix_tokens)
    root_length = token_length(p.output_tokens_mean, p.output_tokens_sigma)
    expansion_length = token_length(p.expansion_output_mean, p.output_tokens_sigma)
    evaluation_length = token_length(p.evaluation_output_mean, p.output_tokens_sigma)
    reflection_length = token_length(p.reflection_output_mean, p.output_tokens_sigma)
    observation_length = token_length(p.observation_tokens_mean, p.tokens_sigma)
    instruction_length = token_length(p.instruction_tokens_mean, p.tokens_sigma)
    question_length = token_length(p.question_tokens_mean, p.tokens_sigma)
    for steps in _draw(rng, pmf, n):
        root_out = _tokens(rng, root_length, 1)[0]
        exp_out = _tokens(rng, expansion_length, steps * w)
        eval_out = _tokens(rng, evaluation_length, steps)
        refl_out = _tokens(rng, reflection_length, steps)
        obs = _tokens(rng, observation_length, steps * w)
        instr = _tokens(rng, instruction_length, 2 * steps)
        delays = _seconds(rng, p.tool_delay_mean, p.tool_delay_sigma, steps)
        question = _tokens(rng, question_length, 1)[0]
        picks = rng.random((steps, 3)).tolist()  # selection draws, up front

        root = Call("c0", (), p.prefix_tokens + question, root_out, shared_prefix=prefix)
        calls = [root]
        ctx = [root.prompt_tokens + root_out]  # context tokens, by call index
        depth = [0]
        open_nodes = [0]  # indices of nodes shallower than p.depth
        sel, last = 0, 0
        for s in range(steps):
            sel_id = calls[sel].id
            parents = (sel_id,) if last == sel else (sel_id, calls[last].id)
            base = ctx[sel]
            first = len(calls)
            new = 0
            for j in range(w):
                k = s * w + j
                i = first + j
                calls.append(make_call(f"c{i}", parents, base + obs[k], exp_out[k], 0.0, sel_id, None, None, None))
                ctx.append(base + obs[k] + exp_out[k])
                depth.append(depth[sel] + 1)
                if depth[sel] + 1 < p.depth:
                    open_nodes.append(i)
                new += obs[k] + exp_out[k]
            i = first + w
            children = tuple(f"c{first + j}" for j in range(w))
            calls.append(make_call(f"c{i}", children, base + new + instr[2 * s], eval_out[s], delays[s], sel_id, None, None, None))
            ctx.append(base + new + instr[2 * s] + eval_out[s])
            depth.append(-1)  # not a tree node
            calls.append(make_call(f"c{i + 1}", (f"c{i}",), base + eval_out[s] + instr[2 * s + 1], refl_out[s], 0.0,
                                    sel_id, None, None, None))
            ctx.append(0)
            depth.append(-1)
            last = i + 1
            u_best, u_greedy, u_open = picks[s]
            best = first + int(u_best * w)
            if u_greedy < p.greedy and depth[best] < p.depth:
                sel = best
            else:
                sel = open_nodes[int(u_open * len(open_nodes))]
        yield tuple(calls)


_BUILDERS = {
    "sharegpt": (ShareGPTParams, _sharegpt),
    "bfcl": (BFCLParams, _bfcl),
    "lats": (LATSParams, _lats),
}


class DrawError(ValueError):
    """A draw the trace format cannot hold (or a call count the parameters cannot
    make together), with the parameters that shape it.

    Only the draw shows such an error (every parameter passes its own check),
    so a caller that knows where each parameter was set can point at the ones
    named in ``params`` rather than at whichever was set last.
    """

    def __init__(self, message: str, params: tuple[str, ...]):
        super().__init__(message)
        self.params = params


# What sets each kind of drawn value: arrivals come from the arrival process; a
# delay from the tool or think time; a token count from everything else (a
# prompt re-sends its history, so call counts and outputs shape it too).
ARRIVAL_PARAMS = ("programs", "rate", "arrival", "cv")
DELAY_PARAMS = ("tool_delay_mean", "tool_delay_sigma", "think_time_mean")


def _token_params(workload: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(_BUILDERS[workload][0]) if f.name not in DELAY_PARAMS)


def _params(workload: str, params: dict[str, Any]):
    cls = _BUILDERS[workload][0]
    valid = [f.name for f in fields(cls)]
    for key in params:
        if key not in valid:
            raise ValueError(f"unknown parameter {key!r} for workload {workload!r}; valid parameters: {', '.join(valid)}")
    return cls(**params)


def generate(
    workload: str,
    programs: int,
    rate: float,
    seed: int,
    arrival: str = "poisson",
    cv: float = 1.0,
    **params: Any,
) -> list[Program]:
    """``programs`` programs of ``workload`` arriving at ``rate`` programs/s.

    Program ids are ``p0, p1, ...`` in arrival order, call ids ``c0, c1, ...``
    (parents always listed first). ``params`` override the workload's
    parameter dataclass (:class:`ShareGPTParams`, :class:`BFCLParams`,
    :class:`LATSParams`); ``mixed`` takes no parameters and interleaves an
    equal number of each of the three (differing by at most one) in a random
    order, each program keeping its own workload label. Raises ValueError
    for an unknown workload, parameter or value.
    """
    return list(iter_generate(workload, programs, rate, seed, arrival, cv, **params))


def iter_generate(
    workload: str,
    programs: int,
    rate: float,
    seed: int,
    arrival: str = "poisson",
    cv: float = 1.0,
    **params: Any,
) -> Iterator[Program]:
    """`generate`'s programs one at a time, so writing a trace holds one program, not all of them.

    The arguments are checked here, before the first program; a parameter
    whose draws the trace format cannot hold raises ValueError when the
    program that draws it is reached.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; valid choices: {', '.join(WORKLOADS)}")
    if isinstance(programs, bool) or not isinstance(programs, int) or not 0 <= programs <= MAX_PROGRAMS:
        raise ValueError(f"programs must be an integer from 0 to {MAX_PROGRAMS:,}, got {programs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    check_arrival(rate, arrival, cv)
    arrival_seq, program_seq = np.random.SeedSequence(seed).spawn(2)
    try:
        times = arrival_times(programs, rate, np.random.Generator(np.random.PCG64(arrival_seq)), arrival, cv)
    except ValueError as exc:  # the arguments passed check_arrival: only the draw is past the limit
        raise DrawError(str(exc), ARRIVAL_PARAMS) from None

    if workload == "mixed":
        if params:
            raise ValueError(
                f"workload 'mixed' takes no parameters (got {', '.join(map(repr, params))}); generate the three "
                f"workloads separately to change theirs"
            )
        subs = ("sharegpt", "bfcl", "lats")
        order_seq, *sub_seqs = program_seq.spawn(4)
        labels = [subs[i % 3] for i in range(programs)]
        np.random.Generator(np.random.PCG64(order_seq)).shuffle(labels)
        made = {}
        for name, ss in zip(subs, sub_seqs):
            cls, build = _BUILDERS[name]
            made[name] = build(np.random.Generator(np.random.PCG64(ss)), labels.count(name), cls())
        bodies = ((name, next(made[name])) for name in labels)
    else:
        cls, build = _BUILDERS[workload]
        p = _params(workload, params)
        calls_of = build(np.random.Generator(np.random.PCG64(program_seq)), programs, p)
        # The builder's own checks (bfcl's query length) run now, not at the first program.
        calls_of = _started(calls_of)
        bodies = ((workload, calls) for calls in calls_of)
    return _checked_programs(times, bodies)


def _started(calls_of: Iterator[tuple[Call, ...]]) -> Iterator[tuple[Call, ...]]:
    """Run a builder up to its first program (its setup and checks), keeping that program."""
    try:
        first = next(calls_of)
    except StopIteration:
        return iter(())
    return itertools.chain((first,), calls_of)


def _checked_programs(times: Any, bodies: Iterator[tuple[str, tuple[Call, ...]]]) -> Iterator[Program]:
    for i, (t, (name, calls)) in enumerate(zip(times, bodies)):
        program = Program(f"p{i}", t, name, calls)
        _check_format_limits(program)
        yield program


def _check_format_limits(program: Program) -> None:
    """Refuse parameters whose draws the trace format cannot hold.

    A huge mean (``tool_delay_mean=1e300``) is finite and positive, so the
    parameter checks pass it, but its draws are not a workload: saved, the
    file would be refused on its first line as if the data were bad; simulated,
    times of 1e300 s lose every step to rounding and give negative waiting.
    """
    for call in program.calls:
        for field, value, limit, unit in (
            ("prompt_tokens", call.prompt_tokens, MAX_TOKENS, "tokens"),
            ("output_tokens", call.output_tokens, MAX_TOKENS, "tokens"),
            ("delay", call.delay, MAX_SECONDS, "seconds"),
        ):
            if not value <= limit:
                shown = f"{value:.3g}" if isinstance(value, float) else f"{value:.3e}"
                raise DrawError(
                    f"{program.workload} parameters draw {field}={shown} for program {program.id!r} "
                    f"call {call.id!r}, past the trace format's limit of {limit:.0e} {unit}; "
                    f"lower the means that set it",
                    DELAY_PARAMS if field == "delay" else _token_params(program.workload),
                )
