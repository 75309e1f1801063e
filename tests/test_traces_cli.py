"""``python -m traces``: exit codes, messages, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from traces.cli import main

REPO = Path(__file__).resolve().parents[1]
AZURE = REPO.parent / "shared" / "data" / "azure-llm-2023"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "traces", *args], cwd=REPO, capture_output=True, text=True)


def test_gen_then_validate_then_stats_via_subprocess(tmp_path):
    out = tmp_path / "lats.jsonl"
    r = run("gen", "lats", "--programs", "20", "--rate", "0.5", "--seed", "3", "--param", "width=3", "-o", str(out))
    assert r.returncode == 0, r.stderr
    r = run("validate", str(out))
    assert r.returncode == 0 and r.stdout.startswith(f"{out}: OK, 20 programs, ")
    r = run("stats", str(out), "--json")
    s = json.loads(r.stdout)
    for key in ("programs", "calls", "calls_per_program_mean", "calls_per_program_max", "prompt_tokens_mean",
                "output_tokens_mean", "max_parallel_calls_mean", "duration_s"):
        assert key in s
    assert s["programs"] == 20 and s["max_parallel_calls_mean"] == 3


def test_gen_is_byte_identical_for_the_same_seed(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for f in (a, b):
        assert main(["gen", "mixed", "--programs", "30", "--rate", "2", "--seed", "9", "--arrival", "gamma",
                     "--cv", "2", "-o", str(f)]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_validate_prints_every_error_and_a_count(tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    good = '{"id":"p%d","arrival":0,"workload":"w","calls":[{"id":"c","parents":[],"prompt_tokens":1,"output_tokens":1,"delay":0}]}'
    f.write_text("\n".join([good % 0, "oops"] + [good.replace('"prompt_tokens":1', '"prompt_tokens":0') % i for i in range(1, 5)]) + "\n")
    assert main(["validate", str(f), "--limit", "3"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{f}:2: malformed JSON")
    assert err[1] == f"{f}:3: program 'p1' call 'c': field 'prompt_tokens': expected an integer > 0, got 0"
    assert err[3] == "... and 2 more"
    assert err[4] == f"{f}: 5 bad line(s)"


@pytest.mark.parametrize(
    "args,code,words",
    [
        (["gen", "chat", "--programs", "1", "--rate", "1", "--seed", "0", "-o", "x"], 2, "invalid choice"),
        (["gen", "bfcl", "--programs", "1", "--rate", "0", "--seed", "0", "-o", "x"], 2, "finite number > 0"),
        (["gen", "bfcl", "--programs", "1", "--rate", "1", "--seed", "0", "--param", "nope=1", "-o", "x"], 2,
         "unknown parameter 'nope'"),
        (["gen", "bfcl", "--programs", "1", "--rate", "1", "--seed", "0", "--cv", "2", "-o", "x"], 2, "--cv applies"),
        (["gen", "bfcl", "--programs", "1", "--rate", "1", "--seed", "0", "--param", "width", "-o", "x"], 2,
         "expected key=value"),
        (["gen", "bfcl", "--programs", "1", "--rate", "1", "--seed", "0", "--param", "output_tokens_sigma=100", "-o", "x"],
         2, "bfcl parameter 'output_tokens_sigma' must be at most 4"),
        (["gen", "bfcl", "--programs", "1", "--rate", "1e-320", "--seed", "0", "-o", "x"], 2, "rate must be at least 1e-09"),
        (["validate", "/nonexistent/file.jsonl"], 1, "error: /nonexistent/file.jsonl: no such file\n"),
        (["stats", "/nonexistent/file.jsonl"], 1, "error: /nonexistent/file.jsonl: no such file\n"),
        (["convert", "azure", "/nonexistent.csv", "-o", "x"], 1, "error: /nonexistent.csv: no such file\n"),
        (["validate", "/"], 1, "error: /: is a directory, expected a trace file\n"),
        (["stats", "/"], 1, "error: /: is a directory, expected a trace file\n"),
        (["convert", "mooncake", "/", "-o", "x"], 1, "error: /: is a directory, expected a trace file\n"),
        (["gen", "bfcl", "--programs", "1", "--rate", "1", "--seed", "0", "-o", "/"], 2,
         "error: -o: is a directory, expected a trace file\n"),
        (["gen", "bfcl", "--programs", "1", "--rate", "1", "--seed", "0", "-o", "/nonexistent/x.jsonl"], 2,
         "error: -o: no such directory '/nonexistent'\n"),
        # was exit 1, "error: : is a directory", as if the data were bad
        (["gen", "bfcl", "--programs", "1", "--rate", "1", "--seed", "0", "-o", ""], 2,
         "error: -o: empty path, expected a trace file\n"),
        # drew inf tokens: "cannot convert float infinity to integer", no parameter named
        (["gen", "sharegpt", "--programs", "5", "--rate", "1", "--seed", "0", "--param", "user_tokens_mean=1e308",
          "-o", "x"], 2, "sharegpt parameter 'user_tokens_mean' must be at most 1,000,000,000 tokens (the trace "
                         "format's limit), got 1e+308\n"),
        # the history was printed with all its 300 digits
        (["gen", "bfcl", "--programs", "5", "--rate", "1", "--seed", "0", "--param", "observation_tokens_mean=1e8",
          "-o", "x"], 2, "plus 6.946e+08 tokens of average history"),
        (["gen", "bfcl", "--programs", "5", "--rate", "1", "--seed", "0", "--arrival", "gamma", "--cv", "1e-300",
          "-o", "x"], 2, "cv must be a finite number > 0 from 0.01 to 10 (outside it gamma arrivals are degenerate), "
                         "got 1e-300\n"),
        (["convert", "azure", str(AZURE / "code.csv"), "--group-by-prefix", "2", "-o", "x"], 2,
         "--group-by-prefix does not apply to azure"),
        ([], 2, "required"),
    ],
)
def test_errors_exit_with_the_right_code_and_no_traceback(args, code, words):
    r = run(*args)
    assert r.returncode == code, r.stderr
    assert words in r.stderr
    assert "Traceback" not in r.stderr


def test_convert_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,10,3\n")
    before = src.read_bytes()
    for out in (src, tmp_path / "." / "t.csv"):
        r = run("convert", "azure", str(src), "-o", str(out))
        assert r.returncode == 2 and r.stderr.endswith("error: -o: is the input file\n"), r.stderr
    assert src.read_bytes() == before


@pytest.mark.parametrize(
    "fmt,text,message",
    [
        ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n1990-01-01 00:00:00.0,10,10\n2023-11-16 18:17:03.97,10,10\n",
         "{src}:3: field 'TIMESTAMP': expected at most 1e+09 s after the first row"),
        ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,1000000000000,10\n",
         "{src}:2: field 'ContextTokens': expected at most 1,000,000,000 tokens, got 1000000000000"),
        ("mooncake", '{"timestamp": 1e13, "input_length": 1, "output_length": 1, "hash_ids": [1]}\n'
                     '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]}\n',
         "{src}:1: field 'timestamp': expected at most 1e+09 s (1e+12 ms) after the earliest timestamp 0"),
    ],
)
def test_import_range_errors_name_the_input_row_not_the_output(tmp_path, fmt, text, message):
    src = tmp_path / "in.txt"
    src.write_text(text)
    out = tmp_path / "out.jsonl"
    r = run("convert", fmt, str(src), "-o", str(out))
    assert r.returncode == 1 and r.stderr.startswith("error: " + message.format(src=src)), r.stderr
    assert "out.jsonl" not in r.stderr and not out.exists()


def test_stats_on_a_bad_file_reports_the_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"id":"p0"}\n')
    r = run("stats", str(f))
    assert r.returncode == 1 and f"{f}:1: program 'p0': field 'arrival': missing" in r.stderr
    assert "Traceback" not in r.stderr


def test_out_of_range_numbers_and_deep_json_are_one_line_errors(tmp_path):
    """Values that used to overflow float() (or recurse) deep in stats and convert."""
    f = tmp_path / "t.jsonl"
    f.write_text('{"id":"p0","arrival":0,"workload":"w","calls":[{"id":"c0","parents":[],"prompt_tokens":1'
                 + "0" * 400 + ',"output_tokens":1,"delay":0}]}\n')
    for cmd in ("stats", "validate"):
        r = run(cmd, str(f))
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"{f}:1: program 'p0' call 'c0': field 'prompt_tokens': expected at most 1,000,000,000 tokens" in r.stderr
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    r = run("convert", "sharegpt", str(deep), "-o", str(tmp_path / "x.jsonl"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr == f"error: {deep}: malformed JSON: nested too deeply\n"


def test_convert_azure_real_file(tmp_path):
    out = tmp_path / "code.jsonl"
    assert main(["convert", "azure", str(AZURE / "code.csv"), "-o", str(out)]) == 0
    assert main(["validate", str(out)]) == 0


@pytest.mark.parametrize("cmd", ["gen", "convert", "validate", "stats"])
def test_every_command_has_help_with_examples(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "python -m traces" in r.stdout


@pytest.mark.parametrize(
    "params,message",
    [
        (["seed=3"], "--param seed=...: seed is an option of its own (--seed), not a workload parameter"),
        (["calls_max=50", "calls_max=60"], "--param calls_max is given twice (50 and 60)"),
        (["tool_delay_mean=1e300"], "bfcl parameters draw delay=6.4e+299 for program 'p0' call 'c1', past the "
         "trace format's limit of 1e+09 seconds; lower the means that set it"),
    ],
)
def test_gen_parameter_mistakes_are_usage_errors_not_bad_data(tmp_path, params, message):
    """Exit 2 naming the parameter, not exit 1 blaming line 1 of the output file."""
    out = tmp_path / "o.jsonl"
    args = ["gen", "bfcl", "--programs", "3", "--rate", "1", "--seed", "0", "-o", str(out)]
    for p in params:
        args += ["--param", p]
    r = run(*args)
    assert r.returncode == 2 and r.stderr.endswith(f"error: {message}\n"), r.stderr
    # The usage shown is the command's own, as for argparse's errors (it was the top-level one).
    assert r.stderr.startswith("usage: python -m traces gen [-h] --programs PROGRAMS"), r.stderr
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "2000000000"])
def test_convert_min_tokens_outside_a_calls_range_is_a_usage_error(tmp_path, value):
    """2e9 was accepted and then blamed on line 1 of the output file, which was never written."""
    out = tmp_path / "o.jsonl"
    r = run("convert", "azure", str(AZURE / "code.csv"), "--min-tokens", value, "-o", str(out))
    assert r.returncode == 2 and r.stderr.endswith(
        f"error: argument --min-tokens: expected an integer from 1 to 1,000,000,000, got {value}\n"), r.stderr
    assert not out.exists()


def test_validate_ok_line_for_a_file_name_that_is_not_utf8(tmp_path):
    """Under a strict UTF-8 stdout the OK line raised on the name's surrogate escape: exit 1 for a valid file."""
    name = os.fsdecode(b"bad\xffname.jsonl")
    out = tmp_path / name
    assert main(["gen", "bfcl", "--programs", "2", "--rate", "1", "--seed", "0", "-o", str(out)]) == 0
    proc = subprocess.run([sys.executable, "-m", "traces", "validate", name], cwd=tmp_path, capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout == b"bad\\xffname.jsonl: OK, 2 programs, 18 calls\n", proc.stderr


@pytest.mark.parametrize("param", ["turns_sigma=1e-300", "output_tokens_sigma=5e-324", "user_tokens_sigma=1e-160"])
def test_gen_with_a_tiny_sigma_works_without_numpy_warnings(tmp_path, param):
    out = tmp_path / "g.jsonl"
    r = subprocess.run([sys.executable, "-W", "error", "-m", "traces", "gen", "sharegpt", "--programs", "3",
                        "--rate", "1", "--seed", "0", "--param", param, "-o", str(out)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("wrote 3 programs (") and r.stderr.count("\n") == 1, r.stderr


STRICT_INT = "in ASCII digits as JSON writes it (no underscores, spaces, '+' or leading zeros)"


@pytest.mark.parametrize(
    "option,value,expected",
    [
        ("--programs", "5_0", "an integer " + STRICT_INT),  # wrote 50 programs
        ("--programs", "\u0665", "an integer " + STRICT_INT),  # an Arabic-Indic 5: wrote 5
        ("--programs", " 5", "an integer " + STRICT_INT),
        ("--programs", "5 ", "an integer " + STRICT_INT),
        ("--programs", "+5", "an integer " + STRICT_INT),
        ("--programs", "05", "an integer " + STRICT_INT),
        ("--programs", "5.0", "an integer"),
        ("--seed", "0_0", "an integer " + STRICT_INT),
        ("--seed", "\uff10", "an integer " + STRICT_INT),  # a fullwidth 0
        ("--rate", "\u0661", f"a number {STRICT_INT}, e.g. 0.5"),  # an Arabic-Indic 1: rate 1
        ("--rate", "1_0", f"a number {STRICT_INT}, e.g. 0.5"),
        ("--rate", " 1", f"a number {STRICT_INT}, e.g. 0.5"),
        ("--rate", ".5", f"a number {STRICT_INT}, e.g. 0.5"),
        ("--rate", "nan", "a finite number > 0"),
        ("--rate", "x", "a number"),
    ],
)
def test_gen_numeric_options_are_read_strictly_as_param_values_are(tmp_path, option, value, expected):
    out = tmp_path / "g.jsonl"
    args = {"--programs": "3", "--rate": "1", "--seed": "0"}
    args[option] = value
    r = run("gen", "bfcl", *[x for kv in args.items() for x in kv], "-o", str(out))
    assert r.returncode == 2 and r.stderr.endswith(f"error: argument {option}: expected {expected}, got {value!r}\n"), r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["gen", "bfcl", "--programs", "3", "--rate", "1", "--seed", "0", "--arrival", "gamma", "--cv", "1_0"],
         f"argument --cv: expected a number {STRICT_INT}, e.g. 0.5, got '1_0'"),
        (["convert", "azure", "in.csv", "--min-tokens", "\u0663"], f"argument --min-tokens: expected an integer {STRICT_INT}, got '\u0663'"),
        (["convert", "mooncake", "in.jsonl", "--group-by-prefix", "2_0"],
         f"argument --group-by-prefix: expected an integer {STRICT_INT}, got '2_0'"),
        (["convert", "mooncake", "in.jsonl", "--group-by-prefix", "0"],
         "argument --group-by-prefix: expected an integer >= 1, got 0"),
        (["validate", "x.jsonl", "--limit", "1_0"], f"argument --limit: expected an integer {STRICT_INT}, got '1_0'"),
        # --param: JSON skipped the spaces (calls_max= 70 was 70), and "[[[[..." was a RecursionError traceback
        (["gen", "bfcl", "--programs", "3", "--rate", "1", "--seed", "0", "--param", "calls_max= 70"],
         "argument --param: calls_max: expected a value with no spaces around it, got ' 70'"),
        (["gen", "bfcl", "--programs", "3", "--rate", "1", "--seed", "0", "--param", "calls_max=" + "[" * 100_000],
         "argument --param: calls_max: the value is nested too deeply"),
    ],
)
def test_other_numeric_options_and_param_values_are_read_strictly(tmp_path, args, message):
    output = [] if args[0] == "validate" else ["-o", str(tmp_path / "o.jsonl")]
    r = subprocess.run([sys.executable, "-m", "traces", *args, *output], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.endswith(f"error: {message}\n"), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.jsonl").exists()


def test_validate_refuses_a_second_byte_order_mark(tmp_path):
    f = tmp_path / "two-boms.jsonl"
    assert main(["gen", "bfcl", "--programs", "2", "--rate", "1", "--seed", "0", "-o", str(f)]) == 0
    f.write_bytes(b"\xef\xbb\xbf\xef\xbb\xbf" + f.read_bytes())
    r = run("validate", str(f))
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert r.stderr == (f"{f}:1: a second byte order mark (bytes EF BB BF) follows the first; only one may start "
                        f"the file\n{f}: 1 bad line(s)\n")


def test_an_empty_trace_is_an_error_of_every_command(tmp_path, capsys):
    """gen --programs 0 and a header-only CSV wrote an empty trace (exit 0), validate said "OK, 0 programs"
    and stats gave zeros: all for a trace that sim run refuses ("no programs to simulate")."""
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exit_:
        main(["gen", "bfcl", "--programs", "0", "--rate", "1", "--seed", "0", "-o", str(out)])
    assert exit_.value.code == 2 and not out.exists()
    assert "error: argument --programs: expected an integer >= 1, got 0\n" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for cmd in ("validate", "stats"):
        assert main([cmd, str(empty)]) == 1
        assert capsys.readouterr().err == f"error: {empty}: no programs (an empty trace); a trace needs at least one\n"
    for fmt, text in (("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n"), ("sharegpt", "[]"), ("mooncake", "")):
        src = tmp_path / f"{fmt}.in"
        src.write_text(text)
        assert main(["convert", fmt, str(src), "-o", str(out)]) == 1
        assert capsys.readouterr().err.endswith(f"error: {src}: no programs to convert; a trace needs at least one\n")
        assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs /proc/self/mem (Linux)")
@pytest.mark.parametrize("cmd", [["validate"], ["stats"], ["convert", "azure"], ["convert", "mooncake"],
                                 ["convert", "sharegpt"]])
def test_a_read_error_past_open_names_the_file(tmp_path, capsys, cmd):
    """Reading /proc/self/mem fails with EIO after open() succeeds: the OSError carried no file
    name, and the message was "error: input/output error"."""
    assert main([*cmd, "/proc/self/mem", *(["-o", str(tmp_path / "x.jsonl")] if cmd[0] == "convert" else [])]) == 1
    assert capsys.readouterr().err == "error: /proc/self/mem: input/output error\n"


@pytest.mark.parametrize("argv, shown", [
    (["sim", "run", "quickstart", "--seeds", "2", "--seeds=3"], "argument --seeds: given twice (--seeds 2, then --seeds 3)"),
    (["sim", "run", "quickstart", "-o", "a", "--out", "b"], "argument -o/--out: given twice (-o a, then --out b)"),
    (["traces", "gen", "bfcl", "--programs", "3", "--programs", "4", "--rate", "1", "--seed", "0", "-o", "x.jsonl"],
     "argument --programs: given twice (--programs 3, then --programs 4)"),
    (["engine", "gateway", "--engine", "http://a", "--port", "1", "--port", "2"],
     "argument --port: given twice (--port 1, then --port 2)"),
    (["sim", "serve", "quickstart", "--port", "1", "--port", "2"], "argument --port: given twice (--port 1, then --port 2)"),
])
def test_an_option_given_twice_is_a_usage_error_naming_both(tmp_path, argv, shown):
    """argparse kept the last value: `--out a ... --out b` wrote to b and `--seeds 2 --seeds 3`
    ran three, without a word. Lists (`--set`, `--engine`) and flags still repeat."""
    res = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[-1].endswith(f"error: {shown}; give it once")
    assert not list(tmp_path.iterdir())  # nothing run, nothing written


def test_a_repeatable_option_and_a_flag_still_repeat(tmp_path):
    from traces.argtypes import StrictParser

    p = StrictParser(prog="t")
    p.add_argument("--set", action="append")
    p.add_argument("-q", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(["--set", "a=1", "--set", "b=2", "-q", "-q", "--out", "x"])
    assert (args.set, args.q, args.out) == (["a=1", "b=2"], True, "x")
    assert p.parse_args(["--out", "y"]).out == "y"  # a second parse starts afresh
    assert "_strict_parser_given" not in vars(p.parse_args(["--out", "z"]))  # the record is not left in the result
    # Parsers sharing a parent's options: the record was kept on the declaring parser, so the
    # second child's first parse read as a repeat (a reviewer's case).
    parent = StrictParser(add_help=False)
    parent.add_argument("--k")
    one, two = StrictParser(parents=[parent]), StrictParser(parents=[parent])
    assert (one.parse_args(["--k", "1"]).k, two.parse_args(["--k", "2"]).k) == ("1", "2")
