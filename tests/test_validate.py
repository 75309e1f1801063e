"""validate: the simulated-vs-measured error table, on hand-made replay directories.

With a constant 10 ms step and programs far apart, a one-call program of N
output tokens takes exactly N steps in the simulator (the prefill step yields
the first token, N-1 decodes the rest): 0.1, 0.2 and 0.3 s for 10, 20, 30
tokens. The hand-made "measured" latencies are 25% higher, so every error is
-20%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import validate as validate_mod
from engine.validate import ValidationError, compare, error_table, load_replay, validate
from sim.experiments import resolve
from sim.metrics import write_programs_csv
from sim.records import ProgramRecord
from traces.format import Call, Program
from traces.io import save

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = """
experiments:
  tiny:
    description: constant-latency engine for validate tests
    workload: {trace: TRACE}
    engine: {num_gpu_blocks: 1000}
    latency: {kind: constant, seconds: 0.01}
    policies: [fcfs, plas]
"""


def _trace(tmp_path):
    programs = [Program(f"p{i}", 10.0 * i, "x", (Call("a", (), 16, n),)) for i, n in enumerate((10, 20, 30))]
    path = tmp_path / "trace.jsonl"
    save(programs, path)
    return path, programs


def _replay_dir(tmp_path, name, trace, policy, latencies):
    d = tmp_path / name
    d.mkdir()
    rows = [ProgramRecord(policy, pid, "x", 0.0, lat, 1, 1, lat, lat, 0.0, lat, 0.0) for pid, lat in latencies.items()]
    write_programs_csv(d / "programs.csv", rows)
    (d / "replay.json").write_text(json.dumps({"trace": str(trace), "policy": policy, "target": "hand",
                                               "latency": "constant:0.01"}))
    return d


def test_error_table_on_hand_made_replays(tmp_path):
    trace, _ = _trace(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENTS.replace("TRACE", json.dumps(str(trace))))
    measured = {"p0": 0.125, "p1": 0.25, "p2": 0.375}
    d_fcfs = _replay_dir(tmp_path, "fcfs", trace, "fcfs", measured)
    d_plas = _replay_dir(tmp_path, "plas", trace, "plas", {"p0": 0.1, "p1": 0.2})  # p2 was lost in the replay
    rows = validate([d_fcfs, d_plas], resolve("tiny", exp))
    fcfs, plas = rows
    assert fcfs.policy == "fcfs" and fcfs.programs == 3
    assert fcfs.simulated == pytest.approx({"mean": 0.2, "p50": 0.2, "p95": 0.29})
    assert fcfs.measured == pytest.approx({"mean": 0.25, "p50": 0.25, "p95": 0.3625})
    for metric in ("mean", "p50", "p95"):
        assert fcfs.error_pct(metric) == pytest.approx(-20.0)
    # Simulated step times lie on a 2**-30 s grid (sim.lazy_decode.quantize): 0.05 s
    # becomes 0.05 - 1.1e-9 s, a 2e-6 % error.
    assert plas.programs == 2 and plas.error_pct("mean") == pytest.approx(0.0, abs=1e-5)
    table = error_table(rows)
    assert "-20.0%" in table and "+0.0%" in table
    assert table.splitlines()[0].split() == ["replay", "policy", "programs", "metric", "measured", "(s)", "simulated",
                                             "(s)", "error"]
    assert table.splitlines()[1].startswith(str(d_fcfs))

    proc = subprocess.run([sys.executable, "-m", "engine", "validate", str(d_fcfs), str(d_plas), "--experiment",
                           "tiny", "--experiments", str(exp), "--json", str(tmp_path / "v.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "latency mean" in proc.stdout and "-20.0%" in proc.stdout
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc[str(d_fcfs)]["policy"] == "fcfs" and doc[str(d_fcfs)]["error_pct"]["p95"] == pytest.approx(-20.0)
    # "-" is stdout, for a pipe: the JSON alone there (it wrote a file named "-"), the table on stderr.
    proc = subprocess.run([sys.executable, "-m", "engine", "validate", str(d_fcfs), str(d_plas), "--experiment",
                           "tiny", "--experiments", str(exp), "--json", "-"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == doc and "-20.0%" in proc.stderr and not (tmp_path / "-").exists()

    (tmp_path / "afile").write_text("")
    proc = subprocess.run([sys.executable, "-m", "engine", "validate", str(d_fcfs), "--experiment", "tiny",
                           "--experiments", str(exp), "--json", str(tmp_path / "afile" / "v.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # found before simulating, naming --json
    assert proc.stderr == (f"python -m engine validate: error: --json {tmp_path / 'afile' / 'v.json'}: "
                           f"{tmp_path / 'afile'} is not a directory\n")


def test_override_changes_the_simulation(tmp_path):
    trace, _ = _trace(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENTS.replace("TRACE", json.dumps(str(trace))))
    d = _replay_dir(tmp_path, "r", trace, "fcfs", {"p0": 0.1, "p1": 0.2, "p2": 0.3})
    (row,) = validate([d], resolve("tiny", exp, ["latency.seconds=0.02"]))
    assert row.simulated["mean"] == pytest.approx(0.4) and row.error_pct("mean") == pytest.approx(100.0)


def test_bad_replay_directories(tmp_path):
    trace, _ = _trace(tmp_path)
    with pytest.raises(ValidationError) as err:
        load_replay(tmp_path)
    assert str(err.value) == f"{tmp_path / 'replay.json'}: not found; is {tmp_path} a replay directory?"
    d = _replay_dir(tmp_path, "mixed", trace, "fcfs", {"p0": 0.1})
    meta = d / "replay.json"
    meta.write_text(json.dumps({"trace": str(trace), "policy": "plas"}))
    with pytest.raises(ValidationError) as err:
        load_replay(d)
    assert str(err.value) == f"{d / 'programs.csv'}: rows of policies ['fcfs'], but replay.json says 'plas'"
    meta.write_text("[1]")
    with pytest.raises(ValidationError) as err:
        load_replay(d)
    assert str(err.value) == f"{meta}: expected a JSON object (as python -m engine replay writes), got list"
    bad_json = f"{meta}: invalid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    meta.write_text("{")
    with pytest.raises(ValidationError) as err:
        load_replay(d)
    assert str(err.value) == bad_json
    meta.write_text(f'{{"trace": {json.dumps(str(trace))}, "policy": "fcfs", "kv_ttl": ' + "9" * 5000 + "}")
    with pytest.raises(ValidationError) as err:
        load_replay(d)
    assert str(err.value) == f"{meta}:1: field 'kv_ttl' must be a finite number of seconds >= 0, got a 5000-digit integer"
    meta.write_bytes(b'{"trace": "\xff"}')
    with pytest.raises(ValidationError) as err:
        load_replay(d)
    assert str(err.value) == f"{meta}: not UTF-8 text (invalid start byte at byte 11)"
    meta.write_text("{")
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENTS.replace("TRACE", json.dumps(str(trace))))
    proc = subprocess.run([sys.executable, "-m", "engine", "validate", str(d), "--experiment", "tiny",
                           "--experiments", str(exp)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == f"python -m engine validate: error: {bad_json}\n"


def test_compare_uses_only_common_programs_and_handles_zero():
    c = compare("x", {"a": 1.0, "b": 3.0, "gone": 100.0}, {"a": 2.0, "b": 2.0})
    assert c.programs == 2 and c.measured["mean"] == 2.0 and c.simulated["mean"] == 2.0
    z = compare("x", {"a": 0.0}, {"a": 1.0})
    assert z.error_pct("mean") is None
    empty = compare("x", {}, {"a": 1.0})
    assert empty.programs == 0 and empty.error_pct("p95") is None


@pytest.mark.parametrize(
    "replayed, experiment, caching, simulated, label",
    [
        (2.0, 0.0, True, 2.0, "fcfs (kv_ttl 2 s)"),
        (None, 5.0, True, 0.0, "fcfs"),
        (2.0, 0.0, False, 0.0, "fcfs (kv_ttl 2 s)"),  # vLLM pins only hashed blocks
    ],
)
def test_a_replays_kv_ttl_decides_the_simulated_one(
    tmp_path, monkeypatch, replayed, experiment, caching, simulated, label
):
    trace, _ = _trace(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENTS.replace("TRACE", json.dumps(str(trace))))
    d = _replay_dir(tmp_path, "r", trace, "fcfs", {"p0": 0.1, "p1": 0.2, "p2": 0.3})
    if replayed is not None:
        meta = json.loads((d / "replay.json").read_text())
        (d / "replay.json").write_text(json.dumps({**meta, "kv_ttl": replayed}))
    seen = []
    real = validate_mod.simulated_latencies
    monkeypatch.setattr(validate_mod, "simulated_latencies",
                        lambda t, cfg, policy, sha: seen.append(cfg.engine.kv_ttl) or real(t, cfg, policy, sha))
    sets = [f"engine.kv_ttl={experiment}", f"engine.enable_prefix_caching={str(caching).lower()}"]
    (row,) = validate([d], resolve("tiny", exp, sets))
    assert seen == [simulated] and row.policy == label
    assert row.error_pct("mean") == pytest.approx(0.0, abs=1e-4)  # one-call programs: nothing to pin


def test_a_malformed_kv_ttl_in_replay_json_is_named(tmp_path):
    trace, _ = _trace(tmp_path)
    d = _replay_dir(tmp_path, "r", trace, "fcfs", {"p0": 0.1})
    (d / "replay.json").write_text(json.dumps({"trace": str(trace), "policy": "fcfs", "kv_ttl": "2"}))
    with pytest.raises(ValidationError) as err:
        load_replay(d)
    assert str(err.value) == f"{d / 'replay.json'}:1: field 'kv_ttl' must be a finite number of seconds >= 0, got \"2\""


def test_an_unknown_policy_in_replay_json_is_named_not_a_traceback(tmp_path):
    """The simulation's make_policy raised ValueError, which validate's CLI did not catch."""
    trace, _ = _trace(tmp_path)
    d = _replay_dir(tmp_path, "r", trace, "nosuch", {"p0": 0.1})
    with pytest.raises(ValidationError) as err:
        load_replay(d)
    assert str(err.value) == (f"{d / 'replay.json'}:1: field 'policy': unknown policy 'nosuch'; valid choices: "
                              "fcfs, mlfq, plas, atlas, srpt, program_fcfs")


def test_replays_of_other_programs_or_none_or_twice_are_refused(tmp_path):
    """Each compared silently: ids the trace lacks were left out (q0-q2: 'programs 0', rc 0), a replay with no
    program read as a comparison, and a second row of a program replaced the first."""
    trace, _ = _trace(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENTS.replace("TRACE", json.dumps(str(trace))))
    cfg = resolve("tiny", exp)
    other = _replay_dir(tmp_path, "other", trace, "fcfs", {"p0": 0.1, "q1": 99.0, "q2": 50.0})
    with pytest.raises(ValidationError) as err:
        validate([other], cfg)
    assert str(err.value) == (f"{other / 'programs.csv'}: program(s) 'q1', 'q2' are not in the trace {trace}: it "
                              "changed since the replay, or is not the one replayed")
    empty = _replay_dir(tmp_path, "empty", trace, "fcfs", {})
    with pytest.raises(ValidationError) as err:
        validate([empty], cfg)
    assert str(err.value) == f"{empty / 'programs.csv'}: no program finished in this replay; nothing to compare"
    twice = _replay_dir(tmp_path, "twice", trace, "fcfs", {"p0": 0.1})
    rows = [ProgramRecord("fcfs", "p0", "x", 0.0, lat, 1, 1, lat, lat, 0.0, lat, 0.0) for lat in (0.1, 5.0)]
    write_programs_csv(twice / "programs.csv", rows)
    with pytest.raises(ValidationError) as err:
        validate([twice], cfg)
    assert str(err.value) == f"{twice / 'programs.csv'}:3: program 'p0' has a second row (the first is on line 2)"


def test_a_trace_whose_programs_changed_since_the_replay_is_refused(tmp_path):
    """A regenerated trace keeps the ids p0..pN, so the id check passed it and the table compared other programs."""
    from traces.io import digest

    trace, programs = _trace(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENTS.replace("TRACE", json.dumps(str(trace))))
    cfg = resolve("tiny", exp)
    d = _replay_dir(tmp_path, "r", trace, "fcfs", {"p0": 0.125, "p1": 0.25, "p2": 0.375})
    meta = json.loads((d / "replay.json").read_text())
    (d / "replay.json").write_text(json.dumps({**meta, "trace_sha256": digest(programs)}))
    # The same programs, their lines reordered: the same digest, compared as before.
    save(list(reversed(programs)), trace)
    assert validate([d], cfg)[0].programs == 3
    # Another draw with the same ids: refused.
    save([Program(p.id, p.arrival, "x", (Call("a", (), 16, 5),)) for p in programs], trace)
    with pytest.raises(ValidationError) as err:
        validate([d], cfg)
    assert str(err.value) == (f"{trace}: its programs are not the ones replayed (their digest differs from the "
                              "replay's trace_sha256): the trace changed since the replay, or is another one")
    (d / "replay.json").write_text(json.dumps({**meta, "trace_sha256": 7}))
    with pytest.raises(ValidationError, match=r"replay.json:1: field 'trace_sha256' must be 64 lowercase hex digits "
                                              r"\(a SHA-256, as python -m engine replay writes\) or null, got 7$"):
        load_replay(d)


def test_two_replays_of_one_policy_keep_both_rows_in_the_json(tmp_path):
    from engine.validate import to_json

    trace, _ = _trace(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENTS.replace("TRACE", json.dumps(str(trace))))
    sync = _replay_dir(tmp_path, "sync", trace, "fcfs", {"p0": 0.1, "p1": 0.2, "p2": 0.3})
    asyn = _replay_dir(tmp_path, "async", trace, "fcfs", {"p0": 0.1})
    doc = to_json(validate([sync, asyn], resolve("tiny", exp)))
    assert {k: v["programs"] for k, v in doc.items()} == {str(sync): 3, str(asyn): 1}  # was {"fcfs": 1}


def test_a_replay_labelled_with_another_latency_kind_gets_a_note(tmp_path):
    """The label was read and never used: a fitted engine validated against a constant model said nothing."""
    from engine.validate import latency_label_note

    trace, _ = _trace(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENTS.replace("TRACE", json.dumps(str(trace))))
    cfg = resolve("tiny", exp)
    d = _replay_dir(tmp_path, "r", trace, "fcfs", {"p0": 0.1})
    assert latency_label_note(load_replay(d), cfg) is None  # labelled constant:0.01, simulated constant
    meta = json.loads((d / "replay.json").read_text())
    (d / "replay.json").write_text(json.dumps({**meta, "latency": "fitted:a100-llama-3.1-8b"}))
    assert latency_label_note(load_replay(d), cfg) == (
        f"note: {d} was replayed on an engine labelled 'fitted:a100-llama-3.1-8b', but the simulation uses a "
        "constant model (--set latency.kind=fitted to match)")
    (d / "replay.json").write_text(json.dumps({**meta, "latency": "vllm 0.26.0 on an H100"}))
    assert latency_label_note(load_replay(d), cfg) is None  # free text: nothing to compare


def test_a_replay_whose_calls_did_not_resend_what_the_simulation_assumes_gets_a_note(tmp_path):
    """Children of a call answered without ids re-send stand-ins and miss the cache the simulation hits;
    nothing said so."""
    from engine.validate import fidelity_note

    trace, _ = _trace(tmp_path)
    d = _replay_dir(tmp_path, "r", trace, "fcfs", {"p0": 0.1})
    assert fidelity_note(load_replay(d)) is None  # an older replay.json without the counts
    meta = json.loads((d / "replay.json").read_text())
    (d / "replay.json").write_text(json.dumps({**meta, "calls_without_output_ids": 3, "token_mismatches": 1}))
    assert fidelity_note(load_replay(d)) == (
        f"note: {d}: 3 calls were answered without token ids, so their children re-sent stand-in ids and missed "
        "the prefix cache where the simulation hits it; 1 calls gave another number of output tokens than the "
        "trace's")
    (d / "replay.json").write_text(json.dumps({**meta, "calls_without_output_ids": -1}))
    with pytest.raises(ValidationError, match=r"field 'calls_without_output_ids' must be an integer >= 0, got -1"):
        load_replay(d)


def _bad_meta(tmp_path, text):
    trace, _ = _trace(tmp_path)
    d = _replay_dir(tmp_path, "r", trace, "fcfs", {"p0": 0.1})
    (d / "replay.json").write_text(text.replace("TRACE", json.dumps(str(trace))))
    with pytest.raises(ValidationError) as err:
        load_replay(d)
    return str(err.value).replace(str(d / "replay.json"), "replay.json")


@pytest.mark.parametrize(
    "fields, message",
    [
        ('"latency": 5', "replay.json:1: field 'latency' must be a string (the replay's --latency label) or null, got 5"),
        ('"latency": ["constant"]', "replay.json:1: field 'latency' must be a string (the replay's --latency label) "
                                    'or null, got ["constant"]'),
        ('"token_mismatches": 1.5', "replay.json:1: field 'token_mismatches' must be an integer >= 0, got 1.5"),
        ('"calls_without_output_ids": ' + "9" * 5000,
         "replay.json:1: field 'calls_without_output_ids' must be an integer >= 0, got a 5000-digit integer"),
        ('"trace_sha256": "abc"', "replay.json:1: field 'trace_sha256' must be 64 lowercase hex digits (a SHA-256, "
                                  'as python -m engine replay writes) or null, got "abc"'),
        ('"finished_programs": "1"', "replay.json:1: field 'finished_programs' must be an integer >= 0 (programs.csv's "
                                     'rows), got "1"'),
    ],
    ids=["latency-int", "latency-list", "count-float", "count-too-long", "sha-short", "finished-string"],
)
def test_each_replay_json_field_validate_reads_is_type_checked(tmp_path, fields, message):
    """A numeric latency label crashed latency_label_note with AttributeError ('int' has no split)."""
    assert _bad_meta(tmp_path, '{"trace": TRACE, "policy": "fcfs", ' + fields + "}") == message


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"trace": "", "policy": "fcfs"}', "replay.json:1: field 'trace' must be a non-empty string, got \"\""),
        ('{"trace": 3, "policy": "fcfs"}', "replay.json:1: field 'trace' must be a non-empty string, got 3"),
        ('{"trace": TRACE, "policy": null}', "replay.json:1: field 'policy' must be a non-empty string, got null"),
        ('{"policy": "fcfs"}', "replay.json: missing string field 'trace'"),
    ],
)
def test_a_replay_json_trace_or_policy_of_the_wrong_type_is_named(tmp_path, text, message):
    assert _bad_meta(tmp_path, text) == message


def test_a_duplicate_key_in_replay_json_is_refused_not_the_last_kept(tmp_path):
    """json.loads kept the last of two "policy" keys, so a replay of plas validated as fcfs.
    The line is the duplicate's, the second (the first's was given)."""
    text = '{"trace": TRACE,\n "policy": "plas",\n "policy": "fcfs"}'
    assert _bad_meta(tmp_path, text) == "replay.json:3: field 'policy': duplicate key"


def test_a_replay_json_nested_too_deeply_is_one_line_not_a_recursion_error(tmp_path):
    trace, _ = _trace(tmp_path)
    assert _bad_meta(tmp_path, "[" * 100000 + "]" * 100000) == "replay.json: invalid JSON: nested too deeply"
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENTS.replace("TRACE", json.dumps(str(trace))))
    proc = subprocess.run([sys.executable, "-m", "engine", "validate", str(tmp_path / "r"), "--experiment", "tiny",
                           "--experiments", str(exp)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == f"python -m engine validate: error: {tmp_path / 'r' / 'replay.json'}: invalid JSON: nested too deeply\n"


@pytest.mark.parametrize("kv_ttl", ["1e300", "1000000001"])
def test_a_replay_json_kv_ttl_past_the_experiments_bound_is_refused(tmp_path, kv_ttl):
    """An experiment refuses engine.kv_ttl above MAX_SECONDS; the replay's kv_ttl replaces it, so it has the same bound."""
    text = '{"trace": TRACE, "policy": "fcfs", "kv_ttl": ' + kv_ttl + "}"
    assert _bad_meta(tmp_path, text) == (f"replay.json:1: field 'kv_ttl' must be at most 1e+09 seconds, as "
                                         f"engine.kv_ttl, got {kv_ttl.replace('1e300', '1e+300')}")


@pytest.mark.parametrize("dirs, message", [
    (["r", "r/"], "REPLAY_DIR r/: given twice (as r); give each replay directory once"),
    (["r", "./r"], "REPLAY_DIR ./r: given twice (as r); give each replay directory once"),
    (["r", "r"], "REPLAY_DIR r: given twice; give each replay directory once"),
])
def test_a_replay_directory_given_twice_is_refused(tmp_path, dirs, message, capsys):
    """It was compared twice, and the JSON (keyed by directory) silently kept one of the two."""
    trace, _ = _trace(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENTS.replace("TRACE", json.dumps(str(trace))))
    _replay_dir(tmp_path, "r", trace, "fcfs", {"p0": 0.125})
    proc = subprocess.run([sys.executable, "-m", "engine", "validate", *dirs, "--experiment", "tiny", "-e", str(exp),
                           "--json", "dup.json"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (proc.returncode, proc.stderr) == (2, f"python -m engine validate: error: {message}\n")
    assert not (tmp_path / "dup.json").exists()


@pytest.mark.parametrize("json_path, message", [
    ("/nonexistent/dir/x.json", "--json /nonexistent/dir/x.json: directory /nonexistent/dir does not exist"),
    ("afile/x.json", "--json afile/x.json: {tmp}/afile is not a directory"),
    (".", "--json .: is a directory, expected a file to write"),
])
def test_a_json_path_that_cannot_be_written_is_refused_before_simulating(tmp_path, json_path, message, monkeypatch,
                                                                        capsys):
    """It was found after every simulation had run, in an error that did not name --json."""
    trace, _ = _trace(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENTS.replace("TRACE", json.dumps(str(trace))))
    _replay_dir(tmp_path, "r", trace, "fcfs", {"p0": 0.125})
    (tmp_path / "afile").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(validate_mod, "validate", lambda *a: pytest.fail("simulated before checking --json"))
    from engine.cli import build_parser

    args = build_parser().parse_args(["validate", "r", "--experiment", "tiny", "-e", str(exp), "--json", json_path])
    assert args.run(args) == 2
    assert capsys.readouterr().err == f"python -m engine validate: error: {message.format(tmp=tmp_path)}\n"


def test_a_programs_csv_cut_after_the_replay_is_refused(tmp_path):
    """A row deleted from programs.csv was compared without a word, as if fewer programs had finished."""
    trace, _ = _trace(tmp_path)
    d = _replay_dir(tmp_path, "r", trace, "fcfs", {"p0": 0.1, "p1": 0.2})
    meta = json.loads((d / "replay.json").read_text())
    (d / "replay.json").write_text(json.dumps({**meta, "finished_programs": 3}))
    with pytest.raises(ValidationError) as err:
        load_replay(d)
    assert str(err.value) == (f"{d / 'programs.csv'}: 2 rows, but replay.json says 3 programs finished (field "
                              f"'finished_programs'); the file was cut or changed after the replay")
    (d / "replay.json").write_text(json.dumps({**meta, "finished_programs": 2}))
    assert len(load_replay(d).latencies) == 2


def test_a_replay_whose_trace_is_gone_names_replay_json_s_field(tmp_path):
    """It said "/nonexist.jsonl: No such file or directory", without saying replay.json named that path."""
    message = _bad_meta(tmp_path, '{"trace": "/nonexist.jsonl", "policy": "fcfs"}')
    assert message == ("replay.json:1: field 'trace': no such file /nonexist.jsonl: the trace this replay ran, which "
                       "validate simulates; put it back there, or give its new path in this field")
