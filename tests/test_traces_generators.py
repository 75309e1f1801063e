"""Generators: the paper's table within 5% at 5,000 programs, determinism, arrivals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces.generators import (
    OFFSET_TOLERANCE,
    WORKLOADS,
    _tokens,
    ceil_lognormal_mean,
    count_pmf,
    generate,
    iter_generate,
    token_length,
    truncated_geometric_pmf,
)
from traces.io import save
from traces.stats import trace_stats

# DESIGN.md section 2: (calls mean, calls max, prompt mean, output mean)
TABLE = {
    "sharegpt": (6.66, 80, 255.65, 276.81),
    "bfcl": (10.75, 70, 735.06, 34.14),
    "lats": (159.71, None, 467.24, 72.64),
}


def close(got: float, want: float, tol: float = 0.05) -> bool:
    return abs(got - want) <= tol * want


@pytest.mark.parametrize("workload", ["sharegpt", "bfcl", "lats"])
def test_statistics_match_the_papers_table(workload):
    calls_mean, calls_max, prompt_mean, output_mean = TABLE[workload]
    s = trace_stats(generate(workload, 5000, rate=1.0, seed=7))
    assert s["programs"] == 5000
    assert close(s["calls_per_program_mean"], calls_mean), s
    assert close(s["output_tokens_mean"], output_mean), s
    if workload == "sharegpt":
        # The table's prompt mean is matched on new tokens per turn; with the
        # history re-sent the mean is necessarily far larger (traces/README.md).
        assert close(s["new_prompt_tokens_mean"], prompt_mean), s
        assert s["prompt_tokens_mean"] > 5 * prompt_mean
    else:
        assert close(s["prompt_tokens_mean"], prompt_mean), s
    if calls_max is not None:
        assert calls_max * 0.75 <= s["calls_per_program_max"] <= calls_max, s
    if workload == "lats":
        assert s["max_parallel_calls_mean"] == 5  # width of each expansion
    else:
        assert s["max_parallel_calls_mean"] == 1  # chains


def test_sharegpt_without_history_reproduces_the_prompt_mean_literally():
    s = trace_stats(generate("sharegpt", 5000, 1.0, 3, history=False))
    assert close(s["prompt_tokens_mean"], 255.65), s


def test_mixed_is_an_equal_mix_keeping_sub_workload_labels():
    progs = generate("mixed", 3001, 2.0, 1)
    s = trace_stats(progs)
    assert s["workloads"] == {"bfcl": 1000, "lats": 1000, "sharegpt": 1001}
    assert [p.id for p in progs] == [f"p{i}" for i in range(3001)]
    assert len({p.workload for p in progs[:20]}) == 3  # interleaved, not blocks


@pytest.mark.parametrize("workload", WORKLOADS)
def test_same_seed_gives_byte_identical_files(tmp_path, workload):
    a, b, c = (tmp_path / f"{x}.jsonl" for x in "abc")
    save(generate(workload, 60, 1.5, 42), a)
    save(generate(workload, 60, 1.5, 42), b)
    save(generate(workload, 60, 1.5, 43), c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_rate_changes_only_arrivals():
    slow, fast = generate("bfcl", 50, 1.0, 5), generate("bfcl", 50, 4.0, 5)
    assert [p.calls for p in slow] == [p.calls for p in fast]
    assert np.allclose([p.arrival / 4 for p in slow], [p.arrival for p in fast])


def test_poisson_and_gamma_arrivals_have_the_requested_rate_and_burstiness():
    for arrival, cv in (("poisson", 1.0), ("gamma", 3.0), ("gamma", 0.5)):
        progs = generate("sharegpt", 20000, 5.0, 11, arrival=arrival, cv=cv)
        times = np.array([p.arrival for p in progs])
        gaps = np.diff(np.concatenate(([0.0], times)))
        assert (gaps >= 0).all()
        assert close(gaps.mean(), 1 / 5.0, 0.05)
        assert close(gaps.std() / gaps.mean(), cv, 0.08)


CV_RANGE = "cv must be a finite number > 0 from 0.01 to 10 (outside it gamma arrivals are degenerate), got"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(workload="chat"), "unknown workload 'chat'; valid choices: sharegpt, bfcl, lats, mixed"),
        (dict(colour=1), "unknown parameter 'colour' for workload 'bfcl'; valid parameters: calls_mean, calls_max, "
         "calls_sigma, prompt_tokens_mean, output_tokens_mean, output_tokens_sigma, docs_tokens, tool_sets, "
         "observation_tokens_mean, observation_tokens_sigma, query_tokens_sigma, tool_delay_mean, tool_delay_sigma"),
        (dict(rate=0), "rate must be a finite number > 0 (programs per second), got 0"),
        (dict(arrival="uniform"), "unknown arrival process 'uniform'; valid choices: poisson, gamma"),
        (dict(cv=2.0), "cv applies to arrival='gamma' only (a Poisson process has cv = 1), got cv=2.0"),
        (dict(calls_max=3), "bfcl parameters: calls_mean=10.75 must lie strictly between 1 and calls_max=3"),
        (dict(workload="sharegpt", calls_mean=1.0),
         "sharegpt parameters: calls_mean=1.0 must lie strictly between 1 and calls_max=80"),
        (dict(docs_tokens=900), "bfcl: prompt_tokens_mean 735.06 is too small for docs_tokens 900 plus 410.8 tokens "
         "of average history; lower docs_tokens, output_tokens_mean or observation_tokens_mean"),
        (dict(tool_sets=0), "bfcl parameter 'tool_sets' must be an integer > 0, got 0"),
        (dict(tool_sets=10_000_001), "bfcl parameter 'tool_sets' must be at most 10,000,000 (the most programs a "
         "trace may have), got 10000001"),
        (dict(calls_mean=69.9999, calls_max=70, calls_sigma=4.0),
         "bfcl parameters calls_mean=69.9999, calls_max=70, calls_sigma=4.0: a mean of 69.9999 calls is too close "
         "to the maximum of 70 for a spread of 4.0 (reachable: below 69.9"),
        (dict(workload="lats", max_steps=1), "lats parameter 'max_steps' must be at least 2 (one step makes every "
         "program 1+(width+2) = 8 calls, leaving calls_mean no room), got 1"),
        (dict(output_tokens_sigma=-0.5), "bfcl parameter 'output_tokens_sigma' must be a finite number >= 0, got -0.5"),
        (dict(output_tokens_sigma=100),
         "bfcl parameter 'output_tokens_sigma' must be at most 4 (a wider lognormal degenerates), got 100"),
        (dict(programs=100_000_000_000), "programs must be an integer from 0 to 10,000,000, got 100000000000"),
        (dict(rate=1e-320), "rate must be at least 1e-09 programs per second (a mean gap of at most 1e+09 s, "
         "the trace format's limit on times), got 1e-320"),
        (dict(rate=1e-8, programs=600), "rate 1e-08 is too low for 600 programs: the last would arrive at "
         "5.79e+10 s, past the trace format's limit of 1e+09 s"),
        (dict(arrival="gamma", cv=1e-300), f"{CV_RANGE} 1e-300"),
        (dict(arrival="gamma", cv=1e-160), f"{CV_RANGE} 1e-160"),
        (dict(arrival="gamma", cv=1e10), f"{CV_RANGE} 10000000000.0"),
        (dict(arrival="gamma", cv=0.0099), f"{CV_RANGE} 0.0099"),
        (dict(arrival="gamma", cv=10.01), f"{CV_RANGE} 10.01"),
        (dict(workload="sharegpt", think_time_mean=float("inf")),
         "sharegpt parameter 'think_time_mean' must be a finite number >= 0, got inf"),
        (dict(workload="sharegpt", think_time_mean=True),
         "sharegpt parameter 'think_time_mean' must be a finite number >= 0, got True"),
        (dict(workload="lats", greedy=True), "lats parameter 'greedy' must be a probability in [0, 1], got True"),
        (dict(calls_max=100_000_000), "bfcl parameter 'calls_max' must be at most 10,000 calls per program, "
         "got 100000000"),
        (dict(workload="lats", max_steps=100_000), "lats parameters: width=5 and max_steps=100000 allow "
         "1+max_steps*(width+2) = 700,001 calls per program; at most 10,000"),
        # finite, positive means whose draws the trace format cannot hold
        (dict(tool_delay_mean=1e300), "bfcl parameters draw delay=6.4e+299 for program 'p0' call 'c1', past the "
         "trace format's limit of 1e+09 seconds; lower the means that set it"),
        # integers past what a float holds: math.isfinite raised OverflowError, a traceback in `sim run`
        (dict(rate=10**400), "rate must be a finite number > 0 (programs per second), got " + str(10**400)),
        (dict(calls_mean=10**400), "bfcl parameter 'calls_mean' must be a finite number > 0, got a 401-digit integer"),
        (dict(docs_tokens=10**400), "bfcl parameter 'docs_tokens' must be at most 1,000,000,000 tokens (the trace "
         "format's limit), got a 401-digit integer"),
        (dict(workload="lats", prefix_tokens=10**400), "lats parameter 'prefix_tokens' must be at most "
         "1,000,000,000 tokens (the trace format's limit), got a 401-digit integer"),
        (dict(output_tokens_mean=0.9), "bfcl parameter 'output_tokens_mean' must be at least 1 (a mean count of "
         "whole tokens, each count >= 1), got 0.9"),
        (dict(workload="lats", expansion_output_mean=0.5), "lats parameter 'expansion_output_mean' must be at "
         "least 1 (a mean count of whole tokens, each count >= 1), got 0.5"),
        (dict(workload="sharegpt", output_tokens_mean=1e12), "sharegpt parameter 'output_tokens_mean' must be at "
         "most 1,000,000,000 tokens (the trace format's limit), got 1000000000000.0"),
        # a mean under the limit whose spread draws past it
        (dict(workload="sharegpt", programs=20, output_tokens_mean=3e8, output_tokens_sigma=2), "sharegpt parameters "
         "draw output_tokens=1.310e+09 for program 'p5' call 'c0', past the trace format's limit of 1e+09 tokens; "
         "lower the means that set it"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_choices(kwargs, message):
    args = dict(workload="bfcl", programs=3, rate=1.0, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        generate(**args)
    assert str(info.value) == message or (message.endswith("below 69.9") and str(info.value).startswith(message))


@pytest.mark.parametrize("cv", [0.01, 10])
def test_gamma_cv_bounds_are_accepted_and_give_finite_increasing_arrivals(cv):
    times = [p.arrival for p in generate("bfcl", 200, 1.0, 0, arrival="gamma", cv=cv)]
    assert all(np.isfinite(times)) and all(a <= b for a, b in zip(times, times[1:])) and times[-1] > 0


def test_count_distributions_have_the_requested_means():
    k = np.arange(1, 81)
    assert abs(count_pmf(6.66, 80, 1.0) @ k - 6.66) < 1e-9
    # Near the maximum every CDF difference rounded to 0: the pmf was 0/0 and every program had 73 calls.
    for mean in (74.0, 77.0, 79.5, 79.99):
        p = count_pmf(mean, 80, 1.0)
        assert np.isfinite(p).all() and abs(p @ k - mean) < 1e-9, mean
    g = truncated_geometric_pmf(22.67, 50)
    assert abs(g @ np.arange(1, 51) - 22.67) < 1e-9 and (np.diff(g) < 0).all()
    g = truncated_geometric_pmf(40.0, 50)  # above the midpoint: an increasing pmf
    assert abs(g @ np.arange(1, 51) - 40.0) < 1e-9 and (np.diff(g) > 0).all()


@settings(max_examples=200, deadline=None)
@given(kmax=st.integers(2, 300), sigma=st.floats(0.05, 4.0), where=st.floats(1e-9, 1 - 1e-9))
def test_count_pmf_meets_any_reachable_mean_or_says_why(kmax, sigma, where):
    mean = 1 + where * (kmax - 1)
    k = np.arange(1, kmax + 1)
    try:
        p = count_pmf(mean, kmax, sigma)
    except ValueError as exc:  # only a mean the spread cannot reach, said so
        assert "too close to" in str(exc)
        return
    assert np.isfinite(p).all() and (p >= 0).all() and abs(p.sum() - 1) < 1e-9
    assert abs(p @ k - mean) < 1e-6 * kmax


def test_a_mean_just_above_one_with_a_wide_spread_is_met():
    """The bracket's lower end was fixed: its mean was already above 1.0000001 at a spread of 4."""
    p = count_pmf(1.0000001, 80, 4.0)
    assert abs(p @ np.arange(1, 81) - 1.0000001) < 1e-9


def test_ceil_lognormal_mean_matches_the_sum_of_tail_probabilities():
    """The integrated tail past 2,000 tokens agrees with summing P(X > k) a term at a time.

    The terms are summed to ten million; the rest, E[(X - n)+], is left out
    only where it is below 1e-12.
    """
    from scipy.stats import lognorm

    n = 10_000_000
    for mu, sigma in ((8.0, 0.5), (5.0, 1.0), (3.0, 1.2), (0.3, 1.5), (-2.0, 2.0)):
        x = lognorm(sigma, scale=np.exp(mu))
        assert x.expect(lambda v: v - n, lb=n) < 1e-12
        brute = 1 + x.sf(np.arange(1, n, dtype=float)).sum()
        assert abs(ceil_lognormal_mean(mu, sigma) / brute - 1) < 1e-12, (mu, sigma)


@pytest.mark.parametrize("mean", [1.0000001, 1.2, 1.5, 2.0, 3.0, 7.5, 40.0])
@pytest.mark.parametrize("sigma", [0.05, 0.5, 1.0, 2.0, 4.0])
def test_token_counts_have_the_requested_mean_exactly(mean, sigma):
    """The offset ``mean - 0.5`` gave 3.19 for a mean of 3 at sigma 2, and 1.33 for a mean of 1."""
    length = token_length(mean, sigma)
    assert abs(ceil_lognormal_mean(length.mu, sigma) / mean - 1) <= OFFSET_TOLERANCE


def test_small_wide_token_counts_are_met_by_sampling_too():
    rng = np.random.default_rng(0)
    for mean, sigma in ((3.0, 2.0), (1.2, 2.0), (2.0, 1.5)):
        x = np.array(_tokens(rng, token_length(mean, sigma), 1_000_000))
        assert x.min() >= 1 and abs(x.mean() - mean) < 5 * x.std() / 1000, (mean, sigma, x.mean())


def test_default_token_means_keep_the_offset_rule_so_traces_do_not_change():
    import math

    for mean, sigma in ((34.14, 0.6), (255.65, 1.0), (20.0, 0.6), (25.0, 1.0)):
        assert token_length(mean, sigma).mu == math.log(mean - 0.5) - sigma * sigma / 2


def test_a_mean_of_one_token_makes_every_count_one():
    (p,) = generate("lats", 1, 1.0, 0, expansion_output_mean=1, evaluation_output_mean=1,
                    output_tokens_mean=1, max_steps=3, calls_mean=12.0)
    assert all(c.output_tokens == 1 for c in p.calls)
    assert _tokens(np.random.default_rng(0), token_length(1, 2.0), 5) == [1] * 5


@pytest.mark.parametrize("workload", WORKLOADS)
def test_iter_generate_gives_generates_programs_one_at_a_time(workload):
    assert list(iter_generate(workload, 40, 2.0, 5)) == generate(workload, 40, 2.0, 5)


def test_iter_generate_holds_one_program_not_the_trace():
    """`traces gen lats --programs 20000` peaked at 1 GB (3.2 million calls held at once); now 87 MB."""
    import tracemalloc

    tracemalloc.start()
    try:
        calls = sum(len(p.calls) for p in iter_generate("lats", 1000, 1.0, 0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert calls > 100_000 and peak < 8 * 2**20, peak  # held at once, these calls take ~50 MiB


def test_iter_generate_checks_its_arguments_before_the_first_program():
    with pytest.raises(ValueError, match="too small for docs_tokens 900"):
        iter_generate("bfcl", 3, 1.0, 0, docs_tokens=900)
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        iter_generate("lats", 3, 1.0, 0, nope=1)


def test_a_huge_tool_sets_draws_lazily():
    """It listed every set up front: 10**12 exhausted memory, and the largest allowed took over a gigabyte."""
    import tracemalloc

    tracemalloc.start()
    try:
        (p,) = generate("bfcl", 1, 1.0, 0, tool_sets=10_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert p.calls[0].shared_prefix.key.startswith("bfcl-tools-") and peak < 20 * 2**20


def test_lats_shape_parallel_expansions_then_evaluation_then_reflection():
    (p,) = generate("lats", 1, 1.0, 0, width=3, depth=2, calls_mean=30.0)
    calls = {c.id: c for c in p.calls}
    root = p.calls[0]
    assert root.shared_prefix is not None and root.parents == ()
    exp = p.calls[1:4]
    assert all(c.parents == ("c0",) and c.context_of == "c0" for c in exp)
    ev, refl = p.calls[4], p.calls[5]
    assert ev.parents == ("c1", "c2", "c3") and ev.delay > 0
    assert refl.parents == ("c4",)
    if len(p.calls) > 6:  # the next step waits for the reflection
        assert "c5" in p.calls[6].parents
    assert set(calls) == {c.id for c in p.calls}


# A spread far below the location's float resolution (sigma = 1e-300 made 0/0 in the bin probabilities
# and a numpy RuntimeWarning; 5e-324 overflowed a division) is the lognormal's limit as sigma -> 0.
TINY_SIGMAS = (9.99e-10, 1e-20, 1e-160, 1e-300, 5e-324, 0.0)  # 0: no spread, as the README says


@pytest.mark.parametrize("sigma", TINY_SIGMAS)
def test_count_pmf_with_a_tiny_spread_is_its_limit_without_warnings(sigma):
    import warnings

    k = np.arange(1, 81)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mean, support in ((6.66, {6: 0.34, 7: 0.66}), (7.0, {7: 1.0}), (79.99, {79: 0.01, 80: 0.99}),
                              (1.0000001, {1: 0.9999999, 2: 1e-7})):
            p = count_pmf(mean, 80, sigma)
            assert {int(i) + 1 for i in np.flatnonzero(p)} == set(support), (mean, p)
            assert all(abs(p[i - 1] - w) < 1e-12 for i, w in support.items())
            assert abs(p @ k - mean) < 1e-12
    # just above MIN_SIGMA the lognormal gives the same distribution
    assert np.allclose(count_pmf(6.66, 80, 1e-8), count_pmf(6.66, 80, 1e-300), atol=1e-7)


@pytest.mark.parametrize("sigma", TINY_SIGMAS)
def test_token_counts_with_a_tiny_spread_are_the_limit_drawn_alike(sigma):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mean in (2.7, 3.5, 4.0, 7.25, 276.81, 1e6 + 0.3):
            tiny = _tokens(np.random.default_rng(1), token_length(mean, sigma), 20_000)
            # sample for sample what a spread just above MIN_SIGMA draws (the counts either side of the mean,
            # or the offset rule's ceiling of mean - 0.5 where that is within OFFSET_TOLERANCE)
            near = _tokens(np.random.default_rng(1), token_length(mean, 2e-9), 20_000)
            assert tiny == near, mean
            assert max(tiny) - min(tiny) <= 1 and abs(np.mean(tiny) / mean - 1) <= OFFSET_TOLERANCE + 0.01


@pytest.mark.parametrize("workload", ["sharegpt", "bfcl", "lats"])
def test_every_sigma_parameter_takes_a_tiny_spread_without_warnings(workload):
    import warnings
    from dataclasses import fields

    from traces.generators import _BUILDERS

    names = [f.name for f in fields(_BUILDERS[workload][0]) if f.name.endswith("_sigma")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sigma in TINY_SIGMAS:
            progs = generate(workload, 20, 1.0, 0, **dict.fromkeys(names, sigma))
            assert len(progs) == 20


def test_an_unreachable_call_count_names_its_parameters_for_the_caller():
    """It named none ("a mean of 6.66 calls is too close ..."), so `sim run` blamed the experiment's
    params line though the value came from a --set."""
    from traces.generators import DrawError

    with pytest.raises(DrawError) as info:
        generate("sharegpt", 3, 1.0, 0, calls_mean=79.9999, turns_sigma=4.0)
    assert str(info.value).startswith("sharegpt parameters calls_mean=79.9999, calls_max=80, turns_sigma=4.0: ")
    assert info.value.params == ("calls_mean", "calls_max", "turns_sigma")
