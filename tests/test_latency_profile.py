"""Profile CSV format: round trip and clear errors on damaged files."""

from __future__ import annotations

import pytest

from sim.latency.base import StepShape
from sim.latency.profile import (COLUMNS, Profile, ProfileError, ProfileRow, parse_profile, read_profile,
                                 write_profile)

HEADER = ",".join(COLUMNS)
GOOD = [
    "1,2048,0,0,2048,2098176,2048,0.15",
    "64,64,64,64064,0,0,0,0.021",
    "65,576,64,64064,512,131328,512,0.05",
]


def text(*rows: str, header: str = HEADER, extra: str = "") -> str:
    return "# autellix-latency-profile v2\n# gpu: test-gpu\n" + extra + header + "\n" + "\n".join(rows) + "\n"


def test_round_trip(tmp_path):
    rows = [ProfileRow(StepShape.from_batch([(1, 999)] * 64), 0.021),
            ProfileRow(StepShape.from_batch([(2048, 0)]), 0.15),
            ProfileRow(StepShape.from_batch([(1, 10), (512, 100)]), 1 / 3)]
    prof = Profile(rows, {"gpu": "A100", "model": "llama-3.1-8b", "date": "2026-01-01"})
    path = tmp_path / "p.csv"
    write_profile(path, prof)
    back = read_profile(path)
    assert back.rows == rows
    assert back.provenance == prof.provenance


def test_columns_in_any_order():
    cols = list(reversed(COLUMNS))
    row = ",".join(reversed(GOOD[0].split(",")))
    prof = parse_profile(text(row, header=",".join(cols)))
    assert prof.rows[0].shape.prefill_attn_pairs == 2098176
    assert prof.rows[0].seconds == 0.15


@pytest.mark.parametrize(
    "content, where",
    [
        (text(GOOD[0], header=HEADER.replace(",seconds", "")), ":3: missing column(s) seconds"),
        (text(GOOD[0], "64,64,64,640"), ":5: expected 8 fields, got 4"),
        (text(GOOD[0], "64,sixty,64,64064,0,0,0,0.02"), ":5: column num_tokens: expected an integer, got 'sixty'"),
        (text(GOOD[0], "64,64,64,64064,0,0,0,abc"), ":5: column seconds: expected a number"),
        (text(GOOD[0], "64,64,64,64064,0,0,0,0"), ":5: column seconds: must be a positive finite time"),
        (text(GOOD[0], "64,64,64,64064,0,0,0,-0.1"), ":5: column seconds: must be a positive finite time"),
        (text(GOOD[0], "64,64,64,64064,0,0,0,nan"), ":5: column seconds: must be a positive finite time"),
        (text(GOOD[0], "64,64,64,-5,0,0,0,0.1"), ":5: column decode_kv_tokens: must be >= 0"),
        # times near a float's limits overflowed the fit (a traceback); a microsecond-to-hour step is a real one
        (text(GOOD[0], "64,64,64,64064,0,0,0,1e300"), ":5: column seconds: expected a step time from 1e-06 to 3600 s, "
                                                   "got 1e300 (times are in seconds)"),
        (text(GOOD[0], "64,64,64,64064,0,0,0,1e-300"), ":5: column seconds: expected a step time from 1e-06 to 3600 s"),
        (text(GOOD[0], "64,64,64,64064,0,0,0,3601"), ":5: column seconds: expected a step time from 1e-06 to 3600 s"),
        (text(GOOD[0], f"64,64,64,{10**200},0,0,0,0.1"), ":5: column decode_kv_tokens: must be at most 2**53, "
                                                      "got '10000000000000000000'... (201 characters)"),
        (text(GOOD[0], f"64,64,64,{2**53 + 1},0,0,0,0.1"), ":5: column decode_kv_tokens: must be at most 2**53, "
                                                       "got '9007199254740993'"),
        (text(GOOD[0], f"64,64,64,{'9' * 5000},0,0,0,0.1"), ":5: column decode_kv_tokens: must be at most 2**53"),
        (text(GOOD[0], f"64,64,64,-{'9' * 5000},0,0,0,0.1"), ":5: column decode_kv_tokens: must be >= 0, "
                                                          "got '-9999999999999999999'... (5001 characters)"),
        (text(GOOD[0], f"64,64,64,64064,0,0,0,1{'0' * 400}"), ":5: column seconds: must be a positive finite time, "
                                                           "got '10000000000000000000'... (401 characters)"),
        (text(GOOD[0], "64,65,64,64064,0,0,0,0.1"), ":5: column num_tokens: must equal num_decode + prefill_tokens"),
        (text(GOOD[0], "0,0,0,0,0,0,0,0.1"), ":5: column num_seqs"),
        # the KV a chunk reads: at least its own tokens, none without a chunk, and enough for its attention pairs
        (text(GOOD[0], "1,2048,0,0,2048,2098176,2047,0.15"),
         ":5: column prefill_kv_tokens: smaller than prefill_tokens (each chunk reads its context and its own KV)"),
        (text(GOOD[0], "64,64,64,64064,0,0,5,0.1"),
         ":5: column prefill_kv_tokens: non-zero but every sequence is a decode"),
        (text(GOOD[0], "1,16,0,0,16,16520,16,0.1"),
         ":5: column prefill_attn_pairs: larger than prefill_tokens x prefill_kv_tokens (a chunk's new tokens each "
         "attend to at most its context and itself)"),
        (text(GOOD[0], "1,16,0,0,16,136,100000,0.01"),  # pairs of a chunk at context 0, KV of one at 99,984
         ":5: column prefill_kv_tokens: more context than prefill_attn_pairs allows (each chunk's two or more new "
         "tokens attend to all of its context)"),
        # a v1 profile: the KV its chunks read cannot be told from its other columns
        (text(GOOD[0].rsplit(",", 2)[0] + ",0.15", header=HEADER.replace(",prefill_kv_tokens", "")),
         ":3: missing column prefill_kv_tokens (the KV cache prefill chunks read, their context and themselves), "
         "which a v1 profile lacks and its other columns cannot give back; profile the engine again "
         "(python -m engine profile)"),
        (text(GOOD[0], "# note", GOOD[1]), ":5: comment line inside the data"),
        (text(), ": no data rows"),
        ("# only comments\n", ": empty profile"),
        (text(GOOD[0], header=HEADER + ",extra"), ":3: unexpected or repeated column(s) extra"),
        (text(*GOOD, extra="# host_per_step: 2 ms\n"), ":3: host_per_step: expected a number of seconds >= 0, "
                                                        "got '2 ms'"),
        (text(*GOOD, extra="# host_per_seq: -1e-5\n"), ":3: host_per_seq: expected a number of seconds >= 0"),
        (text(*GOOD, extra="# host_per_seq: inf\n"), ":3: host_per_seq: expected a number of seconds >= 0"),
        # 0.01 + 64 x 0.0002 = 0.0228 s of host time in the step of line 7, measured at 0.021 s
        (text(*GOOD, extra="# host_per_step: 0.01\n# host_per_seq: 0.0002\n"),
         ":7: column seconds: the step's host time, host_per_step 0.01 s (line 3) + host_per_seq 0.0002 s x 64 "
         "sequences (line 4) = 0.0228 s, exceeds its measured 0.021 s"),
        (text(*GOOD, extra="# host_per_step: 0.2\n"),
         ":5: column seconds: the step's host time, host_per_step 0.2 s (line 3) = 0.2 s, exceeds its measured 0.15 s"),
        (text(*GOOD, extra="# host_per_seq: 1e-05\n# host_per_seq: 2e-05\n"),
         ":4: host_per_seq: repeated (first on line 3); give each key once"),
        (text(*GOOD, extra="# host-per-step: 0.002\n"),
         ":3: host-per-step: misspelt host key; expected host_per_step or host_per_seq"),
        (text(*GOOD, extra="# Host Per Seq: 1e-05\n"), ":3: Host Per Seq: misspelt host key"),
        # ignored before: the host time became 0, and of two gpu lines the last was kept
        (text(*GOOD, extra="# host_per_stp: 0.002\n"), ":3: host_per_stp: misspelt host key"),
        (text(*GOOD, extra="# gpu: h100\n"), ":3: gpu: repeated (first on line 2); give each key once"),
        # any other key fitted (exit 0) and was dropped from the fitted model's provenance
        (text(*GOOD, extra="# colour: blue\n"), ":3: colour: unknown key; valid keys: gpu, model, gpu_spec, "
                                                 "model_spec, engine, source, source_sha256, date, derived, "
                                                 "tensor_parallel, host_per_step, host_per_seq (a comment "
                                                 "line has no colon)"),
        (text(*GOOD, extra="# tensor_parallel: 0\n"),
         ":3: tensor_parallel: expected the GPUs per replica, an integer >= 1, got '0'"),
        (text(*GOOD, extra="# tensor_parallel: four\n"), ":3: tensor_parallel: expected the GPUs per replica"),
        # int() and float() took these; a field past the csv limit was a _csv.Error traceback
        (text(GOOD[0], "64,64,64,64_064,0,0,0,0.1"), ":5: column decode_kv_tokens: expected an integer, got '64_064'"),
        (text(GOOD[0], "64,64,64,\u0666\u0664064,0,0,0,0.1"), ":5: column decode_kv_tokens: expected an integer"),
        (text(GOOD[0], "64,64,64,64064,0,0,0,0.0_2"), ":5: column seconds: expected a number, got '0.0_2'"),
        (text(GOOD[0], "64,64,64,64064,0,0,0,0.1," + "x" * 200_000), ":5: not a CSV line (field larger than field limit"),
    ],
)
def test_errors_name_file_line_and_column(tmp_path, content, where):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ProfileError) as err:
        read_profile(path)
    assert str(err.value).startswith(str(path))
    assert where in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="no such profile file"):
        read_profile(tmp_path / "nope.csv")


def test_blank_lines_ignored():
    prof = parse_profile(text(GOOD[0], "", GOOD[1]))
    assert [r.seconds for r in prof.rows] == [0.15, 0.021]


def test_host_time_keys_are_read_as_seconds_and_default_to_none():
    prof = parse_profile(text(*GOOD, extra="# host_per_step: 0.002\n# host_per_seq: 1e-05\n"))
    assert prof.host() == {"host_per_step": 0.002, "host_per_seq": 1e-05}
    assert parse_profile(text(*GOOD, extra="# host_per_seq: 0.0001\n")).host() == {"host_per_seq": 0.0001}
    assert parse_profile(text(*GOOD)).host() == {}


def test_a_byte_order_mark_does_not_hide_the_first_column(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: 'num_seqs' was then reported missing from line 1."""
    plain = tmp_path / "plain.csv"
    plain.write_text("num_seqs,num_tokens,num_decode,decode_kv_tokens,prefill_tokens,prefill_attn_pairs,"
                     "prefill_kv_tokens,seconds\n1,1,1,1,0,0,0,0.01\n")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_profile(bom).rows == read_profile(plain).rows


def test_only_known_provenance_keys_pass_each_once():
    """Keys were free form and the fitter dropped all but its own from the fitted model: a note,
    a hostname or a key about the machine are refused (each given once), and a key that only
    starts like "host" is called unknown, not a misspelt host key."""
    for extra in ("# note: first run\n", "# host: gpu-node-3\n", "# hostname: gpu-7\n"):
        key = extra[2:].split(":")[0]
        with pytest.raises(ProfileError, match=rf"^<profile>:3: {key}: unknown key; valid keys: gpu, model, "):
            parse_profile(text(*GOOD, extra=extra))
    with pytest.raises(ProfileError, match=r":4: engine: repeated \(first on line 3\); give each key once$"):
        parse_profile(text(*GOOD, extra="# engine: vllm 0.26.0\n# engine: vllm 0.27.0\n"))
    with pytest.raises(ProfileError, match=r":3: host_per_call: misspelt host key; expected host_per_step or host_per_seq$"):
        parse_profile(text(*GOOD, extra="# host_per_call: 0.001\n"))
    prof = parse_profile(text(*GOOD, extra="# a comment line without a colon\n# tensor_parallel: 4\n"))
    assert prof.provenance == {"gpu": "test-gpu", "tensor_parallel": "4"}


@pytest.mark.parametrize("line, why", [
    ("# autellix-latency-profile v1", " (its chunks' KV reads, prefill_kv_tokens, are not in it)"),
    ("# autellix-latency-profile v3", ""),
])
def test_a_profile_of_another_format_is_refused_by_its_first_line(line, why):
    """A v1 file with v2's columns added by hand loaded: its format line was written and never read."""
    with pytest.raises(ProfileError) as err:
        parse_profile(line + "\n" + text(*GOOD).split("\n", 1)[1])
    assert str(err.value) == (f"<profile>:1: {line[2:]} is not this reader's format, autellix-latency-profile v2"
                              f"{why}; profile the engine again (python -m engine profile)")
