"""Sweep format: expansion of lists and ranges into points and jobs, and located errors."""

from __future__ import annotations

import textwrap
from dataclasses import replace

import pytest

from sim.config_layers import parse_override
from sim.config import ConfigError
from sim.sweep import SECTIONS, check_key, jobs, load_sweep, override_text

BASE = """\
experiments:
  tiny:
    workload:
      {generator: bfcl, params: {programs: 10, rate: 2.0}}
    latency: {kind: constant, seconds: 0.01}
    engine: {gpus_per_replica: 1}  # so 70B is a point that does not fit
    policies: [fcfs, plas]
sweeps:
"""


def write(tmp_path, sweeps: str):
    path = tmp_path / "exp.yaml"
    path.write_text(BASE + textwrap.indent(textwrap.dedent(sweeps), "  "))
    return path


def params(sweep):
    return [dict(p.params) for p in sweep.points]


def test_linear_range_includes_stop_and_keeps_ints(tmp_path):
    f = write(tmp_path, """\
        s:
          experiment: tiny
          grid:
            workload.params.rate: {start: 0.4, stop: 2.4, num: 6}
            engine.replicas: {start: 1, stop: 4, num: 4}
        """)
    s = load_sweep("s", f)
    rates = sorted({p["workload.params.rate"] for p in params(s)})
    assert rates == [0.4, 0.8, 1.2, 1.6, 2.0, 2.4]  # no 1.2000000000000002
    assert sorted({p["engine.replicas"] for p in params(s)}) == [1, 2, 3, 4]
    assert all(type(p["engine.replicas"]) is int for p in params(s))
    # first key slowest
    assert [p["workload.params.rate"] for p in params(s)[:5]] == [0.4, 0.4, 0.4, 0.4, 0.8]


def test_ranges_of_tiny_and_huge_values_keep_their_values(tmp_path):
    f = write(tmp_path, """\
        s:
          experiment: tiny
          grid:
            latency.seconds: {start: 1.0e-13, stop: 3.0e-13, num: 3}
            policy_params.quantum: {start: 0.1, stop: 0.3, step: 0.1}
            workload.params.programs: {start: 1000000000000, stop: 3000000000000, num: 3}
        """)
    ps = params(load_sweep("s", f))
    assert sorted({p["latency.seconds"] for p in ps}) == [1e-13, 2e-13, 3e-13]  # were all 0.0
    assert sorted({p["policy_params.quantum"] for p in ps}) == [0.1, 0.2, 0.3]  # not 0.30000000000000004
    assert sorted({p["workload.params.programs"] for p in ps}) == [10**12, 2 * 10**12, 3 * 10**12]


def test_float_ranges_keep_every_digit_typed(tmp_path):
    """Float noise was cut by rounding to 15 significant digits, which cut typed digits too:
    1.0000000000000002 ran (and was written) as 1.0. Values are now exact decimals made floats."""
    f = write(tmp_path, """\
        s:
          experiment: tiny
          grid:
            workload.params.rate: {start: 1.0000000000000002, stop: 1.0000000000000002, num: 1}
            policy_params.quantum: {start: 0.12345678901234567, stop: 2.12345678901234567, step: 1}
            latency.seconds: {start: 0.1, stop: 0.7, num: 4}
        """)
    ps = params(load_sweep("s", f))
    assert {p["workload.params.rate"] for p in ps} == {1.0000000000000002}
    # the floats nearest the exact decimals 0.12345678901234567 + i
    assert sorted({p["policy_params.quantum"] for p in ps}) == [0.12345678901234567, 1.12345678901234567,
                                                                  2.12345678901234567]
    assert sorted({p["latency.seconds"] for p in ps}) == [0.1, 0.3, 0.5, 0.7]


@pytest.mark.parametrize("spec, values", [
    ("{start: 1234567890123456, stop: 1234567890123459, step: 1}",
     [1234567890123456, 1234567890123457, 1234567890123458, 1234567890123459]),
    ("{start: 1234567890123456789, stop: 1234567890123656789, num: 3}",
     [1234567890123456789, 1234567890123556789, 1234567890123656789]),
    ("{start: 1, stop: 2, num: 3}", [1, 1.5, 2]),
])
def test_integer_ranges_are_exact(tmp_path, spec, values):
    """Rounded to 15 digits, 16-digit seeds became other seeds (and a duplicate-point error)."""
    f = write(tmp_path, f"""\
        s:
          experiment: tiny
          grid: {{seed: {spec}}}
        """)
    got = [p["seed"] for p in params(load_sweep("s", f))]
    assert got == values and [type(v) for v in got] == [type(v) for v in values]


def test_step_range_and_times_and_cases(tmp_path):
    f = write(tmp_path, """\
        s:
          experiment: tiny
          grid:
            - workload.generator: [sharegpt]
              workload.params.rate: {start: 0.5, stop: 1.6, step: 0.5}
            - engine.replicas: [1, 2]
              workload.params.rate: {start: 1, stop: 2, step: 1, times: engine.replicas}
        """)
    s = load_sweep("s", f)
    assert params(s) == [
        {"workload.generator": "sharegpt", "workload.params.rate": 0.5},
        {"workload.generator": "sharegpt", "workload.params.rate": 1.0},
        {"workload.generator": "sharegpt", "workload.params.rate": 1.5},
        {"engine.replicas": 1, "workload.params.rate": 1},
        {"engine.replicas": 1, "workload.params.rate": 2},
        {"engine.replicas": 2, "workload.params.rate": 2},
        {"engine.replicas": 2, "workload.params.rate": 4},
    ]
    assert s.keys == ("workload.generator", "workload.params.rate", "engine.replicas")


def test_jobs_cover_points_variants_policies_in_order(tmp_path):
    f = write(tmp_path, """\
        s:
          experiment: tiny
          grid: {workload.params.rate: [1, 2]}
          policies: [fcfs, mlfq]
          variants:
            default: {}
            unopt: {policies: [fcfs], set: {engine.enable_prefix_caching: false}}
        """)
    s = load_sweep("s", f)
    js = jobs(s, f)
    assert [(j.point.index, j.label) for j in js] == [
        (0, "fcfs"), (0, "mlfq"), (0, "fcfs-unopt"), (1, "fcfs"), (1, "mlfq"), (1, "fcfs-unopt"),
    ]
    assert [j.index for j in js] == list(range(6))
    assert js[2].cfg.engine.enable_prefix_caching is False
    assert js[0].cfg.engine.enable_prefix_caching is True
    assert js[3].cfg.workload.params["rate"] == 2
    assert js[0].cfg.policies == ("fcfs", "mlfq")


def test_command_line_set_applies_below_the_grid(tmp_path):
    f = write(tmp_path, """\
        s:
          experiment: tiny
          set: {workload.params.programs: 7}
          grid: {workload.params.rate: [1, 3]}
        """)
    s = load_sweep("s", f, ["workload.params.programs=9", "seed=3"])  # --set over the sweep's set:, a rate is refused
    js = jobs(s, f, ["workload.params.programs=9", "seed=3"])
    assert [j.cfg.workload.params["rate"] for j in js] == [1, 1, 3, 3]
    assert {j.cfg.seed for j in js} == {3}
    assert {j.cfg.workload.params["programs"] for j in js} == {9}



def test_a_grid_trace_drops_the_generator_params_of_the_layers_below(tmp_path):
    """The grid lies above --set: a trace point drops what --set gave the generator, as a --set trace drops the file's."""
    (tmp_path / "t.jsonl").write_text("")
    f = write(tmp_path, f"""\
        s:
          experiment: tiny
          set: {{workload.params.rate: 1.5}}
          grid:
            - workload.generator: [bfcl]
            - workload.trace: [{tmp_path / "t.jsonl"}]
        """)
    js = jobs(load_sweep("s", f, ["workload.params.programs=5"]), f, ["workload.params.programs=5"])
    assert [j.error for j in js] == [None] * 4
    assert [(j.cfg.workload.generator, j.cfg.workload.params) for j in js[::2]] == [
        ("bfcl", {"programs": 5, "rate": 1.5}),
        (None, {}),
    ]
    assert js[2].cfg.workload.trace == str(tmp_path / "t.jsonl")


ENGINE_KEYS = ", ".join(SECTIONS["engine"])
TOO_MANY = "at most 10,000 (a sweep of that many points is surely a mistake)"
RATE = "grid.workload.params.rate"


@pytest.mark.parametrize(
    "grid, message",
    [
        ("{workload.params.rate: {start: 2, stop: 1, step: 0.5}}", f"{RATE}: stop (1) is below start (2); a range counts up"),
        ("{workload.params.rate: {start: 1, stop: 2, step: 0}}", f"{RATE}.step: expected a number > 0, got 0"),
        ("{workload.params.rate: {start: 1, stop: 2}}",
         f"{RATE}: a range needs exactly one of num (how many values) or step, got neither"),
        ("{workload.params.rate: {start: 1, stop: 2, num: 2, step: 1}}",
         f"{RATE}: a range needs exactly one of num (how many values) or step, got both"),
        ("{workload.params.rate: {start: 1, stop: 2, num: 0}}", f"{RATE}.num: expected an integer >= 1, got 0"),
        ("{workload.params.rate: {start: 1, stop: 2, num: 1}}", f"{RATE}.num: 1 value needs start == stop, got start 1 and stop 2"),
        ("{workload.params.rate: {start: 1, stop: 2, num: 100000000}}", f"{RATE}.num: 100000000 values; {TOO_MANY}"),
        ("{workload.params.rate: {start: 1, stop: 2, step: 0.00001}}", f"{RATE}.step: 100001 values; {TOO_MANY}"),
        # each was an OverflowError traceback
        ("{workload.params.rate: {start: 0, stop: 1.0e300, step: 1.0e-300}}",
         f"{RATE}.step: too many values; {TOO_MANY}"),
        ("{seed: {start: 0, stop: " + str(10**400) + ", step: 1}}", f"grid.seed.step: too many values; {TOO_MANY}"),
        ("{workload.params.rate: {start: 0.5, stop: " + str(10**400) + ", step: 1}}",
         f"{RATE}.step: too many values; {TOO_MANY}"),
        ("{workload.params.rate: {start: 0.5, stop: " + str(10**400) + ", num: 2}}",
         f"{RATE}: the range's values or its count are past what a float holds; use integers for start, stop and "
         "step, or a coarser step"),
        ("{seed: {start: 0, stop: 999, step: 1}, workload.params.rate: {start: 1, stop: 999, step: 1}}",
         f"grid: 999,000 points; {TOO_MANY}"),
        ("[{seed: {start: 0, stop: 9999, step: 1}}, {seed: [1, 2]}]", f"grid: 10,002 points; {TOO_MANY}"),
        ("[]", "grid: expected at least one case (a mapping of keys to vary)"),
        ("{workload.params.rate: {stop: 2, num: 3}}",
         f"{RATE}: a range needs start and stop (and num or step); missing start"),
        ("{workload.params.rate: {start: a, stop: 2, num: 3}}", f"{RATE}.start: expected a number, got 'a'"),
        ("{workload.params.rate: {start: 1, stop: 2, num: 3, by: 2}}",
         f"{RATE}.by: unknown key; valid keys: start, stop, num, step, times"),
        ("{workload.params.rate: 3}", f"{RATE}: expected a list of values or a range {{start, stop, num|step}}, got 3"),
        ("{workload.params.rate: []}", f"{RATE}: expected at least one value"),
        # a YAML date has no --set text: refused, located, not a TypeError when the point is built
        ("{engine.model: [2001-12-14]}", "grid.engine.model[0]: expected a number, string, boolean, list or mapping, "
         "got a YAML date (datetime.date(2001, 12, 14)); quote it to pass it as a string"),
        ("{engine.replica: [1, 2]}", f"grid.engine.replica: unknown key 'replica' in engine; valid keys: {ENGINE_KEYS}"),
        ("{engin.replicas: [1]}", "grid.engin.replicas: unknown key; valid keys: workload, engine, latency, policy_params, seed"),
        ("{policies: [[fcfs]]}",
         "grid.policies: not a sweep parameter (set the sweep's policies, or a variant's, instead)"),
        ("{workload.params.rate: {start: 1, stop: 2, num: 2, times: engine.replicas}}",
         f"{RATE}.times: 'engine.replicas' is not another key of this grid; this grid varies no other key; "
         "add engine.replicas to it or drop times"),
        # A chain: which product a point got depended on the keys' order in the file.
        ("{engine.replicas: [1, 2], workload.params.rate: {start: 1, stop: 2, num: 2, times: engine.replicas}, "
         "workload.params.programs: {start: 10, stop: 10, num: 1, times: workload.params.rate}}",
         "grid.workload.params.programs.times: 'workload.params.rate' is itself multiplied (times: engine.replicas); "
         "multiply by a key with plain values"),
    ],
)
def test_bad_grids_are_located_errors(tmp_path, grid, message):
    f = write(tmp_path, f"""\
        s:
          experiment: tiny
          grid: {grid}
        """)
    with pytest.raises(ConfigError) as info:
        load_sweep("s", f)
    assert str(info.value) == f"{f}:11: sweep 's': {message}"  # 11: the grid's line (9 lines of BASE + 2)


@pytest.mark.parametrize(
    "body, message",
    [
        ("experiment: nope\ngrid: {seed: [1]}", "10: sweep 's': experiment: unknown experiment 'nope'; experiments: tiny"),
        ("experiment: tiny\ngrid: {seed: [1]}\npolicies: [fcfs, lifo]",
         "12: sweep 's': policies[1]: unknown value 'lifo'; valid choices: fcfs, mlfq, plas, atlas, srpt, program_fcfs"),
        ("experiment: tiny", "9: sweep 's': missing grid: the keys to vary and their values"),
        ("experiment: tiny\ngrid: {seed: [1]}\ndescription: [a]", "12: sweep 's': description: expected a string, got ['a']"),
        ("experiment: tiny\ngrid: {seed: [1]}\ngird: 1",
         "12: sweep 's': gird: unknown key; valid keys: description, experiment, set, grid, policies, variants"),
        ("experiment: tiny\ngrid: {seed: [1]}\nvariants: {u: {set: {engine.prefix: true}}}",
         f"12: sweep 's': variants.u.set.engine.prefix: unknown key 'prefix' in engine; valid keys: {ENGINE_KEYS}"),
        ("experiment: tiny\ngrid: {seed: [1]}\nset: {engine.model: !!binary aGVsbG8=}",
         "12: sweep 's': set.engine.model: expected a number, string, boolean, list or mapping, got a YAML bytes "
         "(b'hello'); quote it to pass it as a string"),
        ("experiment: tiny\ngrid: {seed: [1]}\nset: {engine.model: gpt}",
         "12: sweep 's': set.engine.model: experiment 'tiny': engine.model: unknown value 'gpt'; "
         "valid choices: llama-3.1-70b, llama-3.1-8b"),
    ],
)
def test_bad_sweeps_are_located_errors(tmp_path, body, message):
    f = write(tmp_path, "s:\n" + textwrap.indent(body, "  ") + "\n")
    with pytest.raises(ConfigError) as info:
        load_sweep("s", f)
    assert str(info.value) == f"{f}:{message}"


def test_unknown_sweep_and_bad_command_line_set(tmp_path):
    f = write(tmp_path, "s: {experiment: tiny, grid: {seed: [1, 2]}}\n")
    with pytest.raises(ConfigError) as info:
        load_sweep("x", f)
    assert str(info.value) == f"{f}: unknown sweep 'x'; sweeps: s"
    with pytest.raises(ConfigError) as info:
        load_sweep("s", f, ["engine.replica=2"])
    assert str(info.value) == (f"--set engine.replica=2: experiment 'tiny': engine.replica: unknown key; "
                               f"valid keys: {ENGINE_KEYS}")


@pytest.mark.parametrize("override, message", [
    ("policies=[atlas]", "a sweep runs the policies that its policies: (and its variants') name, so this would be "
     "ignored; edit sweep 's', or run its experiment"),
    ("workload.params.rate=7.0", "sweep 's' sets workload.params.rate at every point of its grid, which replaces "
     "this value; drop it from --set, or change the grid"),
    ("workload.params={rate: 7.0, programs: 3}", "sweep 's' sets workload.params.rate at every point of its grid, "
     "which replaces this value; drop it from --set, or change the grid"),
])
def test_a_set_the_sweep_would_replace_at_every_point_is_refused(tmp_path, override, message):
    """Each ran, and every point used the sweep's own value instead, without a word."""
    f = write(tmp_path, "s: {experiment: tiny, grid: {workload.params.rate: [1.0, 2.0]}}\n")
    with pytest.raises(ConfigError) as info:
        load_sweep("s", f, [override])
    assert str(info.value) == f"--set {override}: {message}"
    load_sweep("s", f, ["workload.params.programs=3"])  # a key the grid leaves alone is taken


def test_bad_values_in_a_sweeps_set_are_blamed_on_its_line_in_the_file(tmp_path):
    f = write(tmp_path, """\
        s:
          experiment: tiny
          set:
            workload.params.rate: -1
          grid: {seed: [1]}
        v:
          experiment: tiny
          grid: {seed: [1]}
          variants:
            ok: {}
            slow:
              set: {workload.params.rate: -2}
        """)
    # The sweep's own set: fails when the sweep loads, at its line (12 = 9 lines of BASE + 3).
    rate = "experiment 'tiny': workload.params.rate: expected a number > 0 (programs per second), got"
    with pytest.raises(ConfigError) as info:
        load_sweep("s", f)
    assert str(info.value) == f"{f}:12: sweep 's': set.workload.params.rate: {rate} -1"
    # The same text on the command line is the command line's.
    with pytest.raises(ConfigError) as info:
        load_sweep("s", f, ["workload.params.rate=-1"])
    assert str(info.value) == f"--set workload.params.rate=-1: {rate} -1"
    # A variant's set that fails at every point: refused before anything runs, at its line.
    with pytest.raises(ConfigError) as info:
        jobs(load_sweep("v", f), f)
    assert str(info.value) == (f"sweep 'v': variant 'slow' is invalid at every point of the grid, so all its rows "
                               f"would be 'invalid'; point 0 (seed=1), the first: {f}:20: sweep 'v': "
                               f"variants.slow.set.workload.params.rate: {rate} -2")


def test_a_sweep_whose_every_point_is_invalid_is_refused_before_anything_runs(tmp_path, capsys):
    """The base is valid but no point is: the sweep made its output directory, started the pool
    and wrote a table of invalid rows (exit 1), though every mistake is to be reported first."""
    from sim.cli import main

    f = write(tmp_path, "s: {experiment: tiny, grid: {engine.model: [llama-3.1-70b, llama-3.1-405b]}}\n")
    sweep = load_sweep("s", f)
    with pytest.raises(ConfigError) as info:
        jobs(sweep, f)
    assert str(info.value).startswith(
        f"sweep 's': no point of the grid is valid, so nothing would run; point 0 (engine.model=llama-3.1-70b), "
        f"the first: {f}:9: sweep 's': grid.engine.model: experiment 'tiny': engine.model: llama-3.1-70b does not "
        f"fit on engine.gpus_per_replica=1 x a100-80gb"), str(info.value)
    out = tmp_path / "out"
    assert main(["sweep", "s", "-e", str(f), "-w", "1", "-q", "--out", str(out)]) == 1
    assert capsys.readouterr().err.startswith("error: sweep 's': no point of the grid is valid")
    assert not out.exists()


@pytest.mark.parametrize("body, message", [
    # A slip in one case of a grid list: the other case ran for minutes, then a block of invalid rows.
    ("s: {experiment: tiny, grid: [{workload.params.rate: [1, 2]}, {workload.params.rat: [3]}]}\n",
     "sweep 's': grid case 1 (grid[1]) is invalid at each of its points, so all its rows would be 'invalid'; "
     "point 2 (workload.params.rat=3), the first: {f}:9: sweep 's': grid[1].workload.params.rat: experiment 'tiny': "
     "workload.params.rat: unknown parameter 'rat' for workload 'bfcl'; valid parameters: "),
    ("s:\n  experiment: tiny\n  grid: {workload.params.rate: [1, 2]}\n  variants:\n    default: {}\n"
     "    big: {set: {engine.max_num_seqs: x}}\n",
     "sweep 's': variant 'big' is invalid at every point of the grid, so all its rows would be 'invalid'; point 0 "
     "(workload.params.rate=1), the first: {f}:14: sweep 's': variants.big.set.engine.max_num_seqs: experiment "
     "'tiny': engine.max_num_seqs: expected an integer, got 'x'"),
])
def test_a_grid_case_or_variant_invalid_at_every_point_is_refused_before_anything_runs(tmp_path, capsys, body,
                                                                                       message):
    from sim.cli import main

    f = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        jobs(load_sweep("s", f), f)
    assert str(info.value).startswith(message.format(f=f)), str(info.value)
    out = tmp_path / "out"
    assert main(["sweep", "s", "-e", str(f), "-w", "1", "-q", "--out", str(out)]) == 1
    assert capsys.readouterr().err.startswith("error: " + message.format(f=f)[:60])
    assert not out.exists()


def test_a_grid_case_or_variant_valid_at_some_point_still_runs_its_invalid_points_as_rows(tmp_path):
    f = write(tmp_path, """\
        s:
          experiment: tiny
          grid: [{workload.params.rate: [1]}, {engine.model: [llama-3.1-8b, llama-3.1-70b]}]
          variants:
            default: {}
            tp1: {set: {engine.gpus_per_replica: 1}}
        """)
    js = jobs(load_sweep("s", f), f)
    assert [(j.point.case, j.variant, j.error is None) for j in js if j.policy == js[0].policy] == [
        (0, "default", True), (0, "tp1", True), (1, "default", True), (1, "tp1", True),
        (1, "default", False), (1, "tp1", False)]


def test_invalid_point_is_a_job_error_not_a_sweep_error(tmp_path):
    f = write(tmp_path, "s: {experiment: tiny, grid: {engine.model: [llama-3.1-8b, llama-3.1-70b]}}\n")
    js = jobs(load_sweep("s", f), f)
    assert [j.cfg is None for j in js] == [False, False, True, True]
    # Blamed on the grid entry that gave the value (not on a --set never given).
    assert js[2].error.startswith(
        f"{f}:9: sweep 's': grid.engine.model: experiment 'tiny': engine.model: llama-3.1-70b does not fit on "
        "engine.gpus_per_replica=1 x a100-80gb"
    ), js[2].error
    # A value the grid and a variant both give is refused (test_a_variant_that_sets_a_swept_key_is_refused).
    f = write(tmp_path, """\
        s:
          experiment: tiny
          grid: {engine.model: [llama-3.1-8b, llama-3.1-70b]}
          variants:
            big: {set: {engine.model: llama-3.1-70b}}
        """)
    with pytest.raises(ConfigError, match=r":13: sweep 's': variants.big.set.engine.model: replaces the grid's "
                                          r"engine.model"):
        load_sweep("s", f)
    # In a grid of cases, the case's entry.
    f = write(tmp_path, """\
        s:
          experiment: tiny
          grid:
            - {seed: [1]}
            - {engine.model: [llama-3.1-70b, llama-3.1-8b]}
        """)
    first, second = ([j.error for j in jobs(load_sweep("s", f), f) if j.point.index == i] for i in (0, 1))
    assert set(first) == {None}
    assert second[0].startswith(f"{f}:13: sweep 's': grid[1].engine.model: experiment 'tiny': engine.model: "), second


@pytest.mark.parametrize("value", [
    0.4, 1e-05, 1e20, 3, "bfcl", True, None, [1, 2], "1.0",
    # JSON's surrogate pair for a character past U+FFFF read back as two lone surrogates (the sweep
    # then died writing its row); a backslash before a "u" is not an escape.
    "\U0001f600.jsonl", ["x\U0001f600", {"k": "\u00e9\U0001f600\\"}], "a\\ud83d\\ude00", "\\\\ud83d",
])
def test_override_text_round_trips(value):
    key, parsed = parse_override(override_text("a.b", value))
    assert key == ("a", "b") and parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_override_text_round_trips_non_finite_floats(value):
    """repr gave "nan", which YAML reads as a string: a grid's .nan was refused as "expected a number, got 'nan'"."""
    _, parsed = parse_override(override_text("a.b", value))
    assert type(parsed) is float and (parsed == value or (parsed != parsed and value != value))


def test_check_key():
    assert check_key("workload.params.anything") is None
    assert check_key("policy_params.beta") is None
    assert check_key("seed") is None
    assert "has no sub-keys" in check_key("engine.replicas.x")
    assert "give a key inside engine" in check_key("engine")


@pytest.mark.parametrize("section", ["grid", "set"])
def test_a_key_with_space_around_a_part_is_refused_at_its_line(tmp_path, section):
    """parse_override strips the parts, so 'workload.params.rate ' set rate; the sweep swept
    'rate ' besides, and labelled its rows with a rate column that did not run."""
    value = "[1.0, 2.0]" if section == "grid" else "1.0"
    f = write(tmp_path, f"""\
        s:
          experiment: tiny
          {section}:
            "workload.params.rate ": {value}
        """)
    with pytest.raises(ConfigError) as info:
        load_sweep("s", f)
    assert str(info.value) == (f"{f}:12: sweep 's': {section}.workload.params.rate : 'workload.params.rate ': a key "
                               "part has space around it; write workload.params.rate"), str(info.value)
    assert "space around it" in check_key(" engine.replicas")


def test_repository_paper_sweeps_expand():
    counts = {}
    names = ("paper-single", "paper-single-unopt", "paper-single-seeds", "paper-multi", "paper-scaling", "policy-params",
             "locality-threshold", "bfcl-long-rates", "sharegpt-ttl-rates", "bfcl-unopt-caps", "paper-single-async",
             "paper-single-70b")
    for name in names:
        s = load_sweep(name)
        js = jobs(s)
        assert all(j.cfg is not None for j in js)
        counts[name] = (len(s.points), len(js), sorted({j.label for j in js}))
    # 4 workloads x 8 rates x 5 policies, and x fcfs-unopt; 3 balancers x 8 rates x 3 policies;
    # 8 rates at 1 replica + 3 counts x 3 balancers x 8 rates; 2 workloads x 4 bounds x 4 betas;
    # (8 rates at 1 replica + 3 counts x 8 rates) x 3 thresholds; paper-single's points x 5 seeds x 3 policies;
    # bfcl-long at 7 rates x 5 seeds x 4 policies; sharegpt-long at 5 rates x 5 seeds x (4 + 3 pinned);
    # bfcl-90 unoptimised at 5 rates x 5 seeds x (3 policies x 3 batch caps + PLAS preempting on 64).
    assert counts == {
        "paper-single": (32, 160, ["atlas", "fcfs", "mlfq", "plas", "srpt"]),
        "paper-single-unopt": (32, 32, ["fcfs-unopt"]),
        "paper-single-seeds": (160, 480, ["atlas", "fcfs", "srpt"]),
        "paper-multi": (24, 72, ["atlas", "fcfs", "plas"]),
        "paper-scaling": (80, 80, ["atlas"]),
        "policy-params": (32, 32, ["atlas"]),
        "locality-threshold": (32, 96, ["atlas-t0", "atlas-t2048", "atlas-t512"]),
        "bfcl-long-rates": (35, 140, ["fcfs", "plas", "program_fcfs", "srpt"]),
        "sharegpt-ttl-rates": (25, 175, ["fcfs", "fcfs-ttl", "plas", "plas-ttl", "program_fcfs", "program_fcfs-ttl", "srpt"]),
        "bfcl-unopt-caps": (25, 250, ["fcfs", "fcfs-cap128", "fcfs-cap64", "plas", "plas-cap128", "plas-cap64",
                                      "plas-cap64pre", "srpt", "srpt-cap128", "srpt-cap64"]),
        "paper-single-async": (160, 480, ["atlas-async", "fcfs-async", "srpt-async"]),
        "paper-single-70b": (160, 480, ["atlas", "fcfs", "srpt"]),
    }
    assert all(j.cfg.engine.async_scheduling for j in jobs(load_sweep("paper-single-async")))
    # the paper's 70B setup at every point: four A100s, tensor parallel, roofline steps
    assert {(j.cfg.engine.model, j.cfg.engine.gpu, j.cfg.engine.gpus_per_replica, j.cfg.latency.kind,
             j.cfg.workload.params["programs"]) for j in jobs(load_sweep("paper-single-70b"))} == {
        ("llama-3.1-70b", "a100-80gb", 4, "roofline", 1000)}
    # bfcl-unopt-caps: the unoptimised engine everywhere; each variant's batch cap and whether PLAS may preempt
    caps = {(j.label, j.cfg.engine.max_num_seqs, j.cfg.policy_params.preemption) for j in jobs(load_sweep("bfcl-unopt-caps"))}
    assert {(label, n, pre) for label, n, pre in caps if label.startswith("plas")} == {
        ("plas", 256, True), ("plas-cap128", 128, False), ("plas-cap64", 64, False), ("plas-cap64pre", 64, True)}
    assert all(not j.cfg.engine.enable_prefix_caching and not j.cfg.engine.enable_chunked_prefill
               and j.cfg.engine.max_num_batched_tokens == 8192 and j.cfg.workload.params["programs"] == 9302
               for j in jobs(load_sweep("bfcl-unopt-caps")))
    ttl = {(j.label, j.cfg.engine.kv_ttl) for j in jobs(load_sweep("sharegpt-ttl-rates"))}
    assert ttl == {("fcfs", 0.0), ("plas", 0.0), ("program_fcfs", 0.0), ("srpt", 0.0),
                   ("fcfs-ttl", 2.0), ("plas-ttl", 2.0), ("program_fcfs-ttl", 2.0)}
    long_runs = {(j.cfg.workload.params["rate"], j.cfg.seed, j.cfg.workload.params["programs"])
                 for j in jobs(load_sweep("bfcl-long-rates"))}
    assert long_runs == {(10 + 0.5 * i, s, 12000) for i in range(7) for s in range(5)}
    params = {(j.cfg.workload.generator, j.cfg.policy_params.queue_base, j.cfg.policy_params.beta)
              for j in jobs(load_sweep("policy-params"))}
    assert len(params) == 32 and ("lats", 16.0, 1e9) in params
    thresholds = {(j.label, j.cfg.policy_params.locality_threshold) for j in jobs(load_sweep("locality-threshold"))}
    assert thresholds == {("atlas-t2048", 2048), ("atlas-t512", 512), ("atlas-t0", 0)}
    # each of paper-single's (workload, rate) points under seeds 0-4, the rest of the config equal
    single = {(j.cfg.workload.generator, j.cfg.workload.params["rate"], j.policy) for j in jobs(load_sweep("paper-single"))}
    seeded = [j.cfg for j in jobs(load_sweep("paper-single-seeds"))]
    by_point: dict = {}
    for cfg in seeded:
        by_point.setdefault((cfg.workload.generator, cfg.workload.params["rate"]), set()).add(cfg.seed)
    assert {(g, r) for g, r, _ in single} == set(by_point) and all(v == {0, 1, 2, 3, 4} for v in by_point.values())
    base = [j.cfg for j in jobs(load_sweep("paper-single")) if j.cfg.workload.params["rate"] == 6 and j.policy == "atlas"]
    at_6 = [c for c in seeded if c.workload.generator == "bfcl" and c.workload.params["rate"] == 6]
    assert len(at_6) == 15 and all(replace(c, seed=0, policies=base[0].policies) == base[0] for c in at_6)


def test_a_set_is_refused_only_where_every_point_or_variant_replaces_it(tmp_path):
    (tmp_path / "t.jsonl").write_text("")
    f = write(tmp_path, f"""\
        some:
          experiment: tiny
          grid:
            - {{seed: [1, 2]}}
            - {{workload.params.rate: [3.0]}}
        traces:
          experiment: tiny
          grid: {{workload.trace: [{tmp_path / "t.jsonl"}]}}
        variants:
          experiment: tiny
          grid: {{seed: [1]}}
          variants:
            a: {{set: {{engine.replicas: 2}}}}
            b: {{set: {{engine.replicas: 3}}}}
        """)
    # seed is varied in one case only: the other case's points take the --set (it was refused)
    assert [j.cfg.seed for j in jobs(load_sweep("some", f, ["seed=7"]), f, ["seed=7"])][-1] == 7
    # a trace point drops the generator's params: they were accepted and dropped at every point
    with pytest.raises(ConfigError) as info:
        load_sweep("traces", f, ["workload.params.programs=100"])
    assert str(info.value) == ("--set workload.params.programs=100: sweep 'traces' sets workload.trace at every "
                               "point of its grid, which replaces this value; drop it from --set, or change the grid")
    with pytest.raises(ConfigError) as info:
        load_sweep("variants", f, ["engine.replicas=4"])
    assert str(info.value) == ("--set engine.replicas=4: every variant of sweep 'variants' sets it "
                               "(engine.replicas=2), which replaces this value; drop it from --set, or change the "
                               "variants")


def test_a_variant_that_sets_a_swept_key_is_refused(tmp_path):
    """The variant's value ran at every point while sweep.csv showed the grid's rates."""
    f = write(tmp_path, """\
        s:
          experiment: tiny
          grid: {workload.params.rate: [2.0, 8.0]}
          variants:
            default: {}
            slow:
              set: {workload.params.rate: 0.5}
        ok:
          experiment: tiny
          grid: {workload.params.rate: [2.0, 8.0]}
          variants:
            small: {set: {workload.params.programs: 3}}
        """)
    with pytest.raises(ConfigError) as info:
        load_sweep("s", f)
    assert str(info.value) == (f"{f}:15: sweep 's': variants.slow.set.workload.params.rate: replaces the grid's "
                               f"workload.params.rate (the rows would show the grid's value, not the one that ran); "
                               f"vary it in the grid, or drop it from this variant")
    assert len(load_sweep("ok", f).points) == 2  # a key the grid leaves alone


def test_a_sweep_set_that_the_grid_replaces_at_every_point_is_refused(tmp_path):
    f = write(tmp_path, """\
        s:
          experiment: tiny
          set: {seed: 3}
          grid: {seed: [0, 1]}
        """)
    with pytest.raises(ConfigError) as info:
        load_sweep("s", f)
    assert str(info.value) == (f"{f}:11: sweep 's': set.seed: the grid sets seed at every point, which replaces "
                               f"this value; drop it from set:, or change the grid")


def test_a_base_that_only_the_grid_makes_valid_runs_its_points(tmp_path):
    """The base alone (70B on one GPU) was checked and refused, though every point gives it the GPUs."""
    f = write(tmp_path, """\
        s:
          experiment: tiny
          set: {engine.model: llama-3.1-70b}
          grid: {engine.gpus_per_replica: [4, 8]}
        some:
          experiment: tiny
          set: {engine.model: llama-3.1-70b}
          grid: {engine.gpus_per_replica: [1, 4]}
        none:
          experiment: tiny
          set: {engine.model: llama-3.1-70b}
          grid: {engine.gpus_per_replica: [1]}
        """)
    assert [(j.point.index, j.policy, j.error) for j in jobs(load_sweep("s", f), f)] == [
        (0, "fcfs", None), (0, "plas", None), (1, "fcfs", None), (1, "plas", None)]
    some = load_sweep("some", f)
    assert some.base.engine.gpus_per_replica == 4  # an invalid row's unswept columns come from a valid point
    errors = [j.error for j in jobs(some, f)]
    assert errors[2:] == [None, None] and "llama-3.1-70b does not fit" in errors[0]
    with pytest.raises(ConfigError, match=r"engine.model: llama-3.1-70b does not fit"):
        load_sweep("none", f)
    # A bad policy list of the experiment is still its error, not hidden by the points' policies
    # (the sweep ran the default policies instead of refusing 'plass').
    text = f.read_text().replace("    policies: [fcfs, plas]\n", "    policies: [fcfs, plass]\n", 1)
    f.write_text(text + "  own:\n    experiment: tiny\n    policies: [fcfs]\n    grid: {seed: [0, 1]}\n")
    for name in ("s", "own"):
        with pytest.raises(ConfigError, match=r"policies\[1\]: unknown value 'plass'"):
            load_sweep(name, f)


def test_a_sweep_set_that_every_variant_replaces_is_refused(tmp_path):
    """It ran at neither variant's points without a word, where the same --set is refused."""
    f = write(tmp_path, """\
        s:
          experiment: tiny
          set: {engine.max_num_seqs: 128}
          grid: {seed: [0, 1]}
          variants:
            a: {set: {engine.max_num_seqs: 64}}
            b: {set: {engine.max_num_seqs: 32}}
        ok:
          experiment: tiny
          set: {engine.max_num_seqs: 128}
          grid: {seed: [0, 1]}
          variants:
            a: {set: {engine.max_num_seqs: 64}}
            b: {}
        """)
    with pytest.raises(ConfigError) as info:
        load_sweep("s", f)
    assert str(info.value) == (f"{f}:11: sweep 's': set.engine.max_num_seqs: every variant sets it "
                               f"(engine.max_num_seqs=64), which replaces this value; drop it from set:, or change "
                               f"the variants")
    seqs = {j.variant: j.cfg.engine.max_num_seqs for j in jobs(load_sweep("ok", f), f)}
    assert seqs == {"a": 64, "b": 128}  # taken where a variant leaves it alone


def test_a_point_given_as_an_int_and_as_a_float_is_one_point(tmp_path):
    """A range's 2 and a list's 2.0 ran twice, and the sweep failed after every job on the duplicate row."""
    f = write(tmp_path, """\
        s:
          experiment: tiny
          grid:
            - workload.params.rate: {start: 1, stop: 2, step: 1}
            - workload.params.rate: [2.0, 3.0]
        """)
    with pytest.raises(ConfigError, match=r"grid\[1\]: the point workload.params.rate=2.0 is in the grid twice "
                                          r"\(grid\[0\] gives it too\)"):
        load_sweep("s", f)


@pytest.mark.parametrize("name, shown", [
    ('"../../escaped"', "'../../escaped'"),  # wrote its results outside results/sweeps/
    ('""', "''"),  # wrote into results/sweeps/ itself
    ("1", "1"),  # a sweep missing from the file then failed with a TypeError listing the names
    ('"a\\n"', "'a\\n'"),  # NAME_RE.match's "$" matches before a final newline
    ('".."', "'..'"),  # its characters all allowed: the message now says it must start with a letter or digit
])
def test_a_sweep_name_names_a_directory_so_it_is_a_plain_word(tmp_path, name, shown):
    f = write(tmp_path, f"""\
        ok:
          experiment: tiny
          grid: {{seed: [0, 1]}}
        {name}:
          experiment: tiny
          grid: {{seed: [0, 1]}}
        """)
    with pytest.raises(ConfigError) as err:
        load_sweep("ok", f)
    assert str(err.value) == (f"{f}:12: sweep name {shown}: use letters, digits, '.', '_' and '-', starting with a "
                              "letter or digit (it names the output directory)")


def test_every_shipped_sweep_plans_without_an_invalid_point():
    """A shipped sweep with a point vLLM would refuse (its unoptimised baselines ran a budget below
    max_model_len without chunking) reports `invalid` rows for it; each shipped point must be valid."""
    from pathlib import Path

    import yaml

    shipped = Path(__file__).resolve().parent.parent / "experiments.yaml"
    names = list(yaml.safe_load(shipped.read_text())["sweeps"])
    assert "bfcl-unopt-caps" in names and "paper-single-unopt" in names
    for name in names:
        planned = jobs(load_sweep(name, str(shipped)), str(shipped))
        assert planned and [j.error for j in planned if j.error] == [], name
