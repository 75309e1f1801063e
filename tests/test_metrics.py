"""Summary math checked by hand on tiny record sets, and the CSV round trip."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from sim.metrics import (
    RecordFormatError,
    percentile,
    read_calls_csv,
    read_programs_csv,
    summarize_policy,
    summarize_run,
    write_calls_csv,
    write_programs_csv,
)
from sim.records import CallRecord, ProgramRecord


def call(policy="fcfs", pid="p0", cid="c0", prompt=100, out=10, arrival=0.0, first_token=1.0, finish=2.0,
         preemptions=0, hit=0, engine=0) -> CallRecord:
    return CallRecord(
        policy=policy, program_id=pid, call_id=cid, engine=engine, prompt_tokens=prompt, output_tokens=out,
        arrival=arrival, first_scheduled=arrival, first_token=first_token, finish=finish,
        waiting=0.5, service=finish - arrival - 0.5, preemptions=preemptions, prefix_hit_tokens=hit,
    )


def program(policy="fcfs", pid="p0", arrival=0.0, latency=10.0, out=10, waiting=3.0, service=1.0) -> ProgramRecord:
    return ProgramRecord(
        policy=policy, program_id=pid, workload="bfcl", arrival=arrival, finish=arrival + latency, calls=2,
        output_tokens=out, latency=latency, normalized_latency=latency / out, waiting=waiting, service=service,
        waiting_share=waiting / (waiting + service),
    )


def test_percentile_is_numpy_linear_by_hand():
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4; rank h = 3q/100
    assert percentile(xs, 50) == pytest.approx(2.5)  # h = 1.5
    assert percentile(xs, 95) == pytest.approx(3.85)  # h = 2.85: 3 + 0.85 * 1
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_summarize_policy_by_hand():
    progs = [
        program(pid="a", latency=10.0, out=10, waiting=3.0, service=1.0),  # norm 1.0, share 0.75
        program(pid="b", latency=20.0, out=5, waiting=1.0, service=1.0),  # norm 4.0, share 0.5
        program(pid="c", latency=30.0, out=30, waiting=0.0, service=2.0),  # norm 1.0, share 0.0
    ]
    calls = [
        call(cid="1", prompt=100, arrival=0.0, first_token=1.0, finish=3.0, preemptions=1, hit=50),
        call(cid="2", prompt=300, arrival=2.0, first_token=2.5, finish=4.0, preemptions=2, hit=0),
    ]
    s = summarize_policy(calls, progs)
    assert s["programs"] == 3 and s["calls"] == 2
    assert s["program_latency_mean"] == pytest.approx(20.0)
    assert s["program_latency_p50"] == pytest.approx(20.0)
    assert s["program_latency_p95"] == pytest.approx(29.0)  # h = 1.9: 20 + 0.9 * 10
    assert s["program_latency_p99"] == pytest.approx(29.8)
    assert s["normalized_latency_mean"] == pytest.approx(2.0)
    assert s["normalized_latency_p50"] == pytest.approx(1.0)
    assert s["normalized_latency_p95"] == pytest.approx(1.0 + 0.9 * 3.0)  # sorted 1 1 4, h = 1.9
    assert s["waiting_share_mean"] == pytest.approx(1.25 / 3)
    assert s["call_latency_mean"] == pytest.approx((3.0 + 2.0) / 2)
    assert s["ttft_mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["preemptions"] == 3
    assert s["prefix_hit_rate"] == pytest.approx(50 / 400)


def test_empty_policy_gives_nulls_not_nan():
    s = summarize_policy([], [])
    assert s["programs"] == 0 and s["normalized_latency_mean"] is None and s["prefix_hit_rate"] is None
    json.dumps(s, allow_nan=False)


def test_ratios_vs_fcfs():
    runs = [
        ("fcfs", [call()], [program(pid="a", latency=10.0, out=10), program(pid="b", latency=30.0, out=10)], {}),
        ("plas", [call(policy="plas")], [program(policy="plas", latency=5.0, out=10)], {"steps": 7}),
    ]
    doc = summarize_run("exp", runs)
    assert doc["experiment"] == "exp" and list(doc["policies"]) == ["fcfs", "plas"]
    fcfs, plas = doc["policies"]["fcfs"], doc["policies"]["plas"]
    assert fcfs["normalized_latency_mean_vs_fcfs"] == pytest.approx(1.0)
    assert plas["normalized_latency_mean_vs_fcfs"] == pytest.approx(0.5 / 2.0)
    assert plas["program_latency_mean_vs_fcfs"] == pytest.approx(5.0 / 20.0)
    assert plas["stats"] == {"steps": 7.0}


def test_no_ratios_without_fcfs():
    doc = summarize_run("exp", [("plas", [call()], [program()], {})])
    assert not any(k.endswith("_vs_fcfs") for k in doc["policies"]["plas"])


def test_csv_round_trip_is_exact_and_stable(tmp_path):
    calls = [call(cid="c,1", arrival=0.1 + 0.2, finish=1 / 3 + 1), call(policy="plas", engine=3, hit=16)]
    calls[0].first_token = np.float64(0.7)  # numpy floats must not leak 'np.float64(...)' into the file
    progs = [program(latency=1e-7), program(policy="plas", pid="x\"y")]
    write_calls_csv(tmp_path / "c.csv", calls)
    write_programs_csv(tmp_path / "p.csv", progs)
    text = (tmp_path / "c.csv").read_text()
    assert text.splitlines()[0].startswith("policy,program_id,call_id,engine,prompt_tokens")
    assert "np.float64" not in text and "\r" not in text
    back = read_calls_csv(tmp_path / "c.csv")
    assert back[0].arrival == 0.1 + 0.2 and back[0].finish == 1 / 3 + 1 and back[0].call_id == "c,1"
    assert back[0].first_token == 0.7 and back[1] == calls[1]
    assert read_programs_csv(tmp_path / "p.csv") == progs
    write_calls_csv(tmp_path / "c2.csv", back)
    assert (tmp_path / "c2.csv").read_bytes() == (tmp_path / "c.csv").read_bytes()


def test_read_rejects_wrong_header_and_values(tmp_path):
    write_programs_csv(tmp_path / "p.csv", [program()])
    with pytest.raises(RecordFormatError, match=r"p.csv:1: expected the CallRecord columns"):
        read_calls_csv(tmp_path / "p.csv")
    lines = (tmp_path / "p.csv").read_text().splitlines()
    lines[1] = lines[1].replace(",2,10,", ",two,10,", 1)
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordFormatError, match=r"bad.csv:2: column calls: expected an integer, got 'two'"):
        read_programs_csv(tmp_path / "bad.csv")


def test_read_names_the_line_of_a_bad_record_and_refuses_what_the_writers_never_write(tmp_path):
    write_programs_csv(tmp_path / "p.csv", [program(pid="two\nlines"), program(pid="q")])
    header, first_a, first_b, second = (tmp_path / "p.csv").read_text().split("\n")[:4]
    columns = header.split(",")
    bad = tmp_path / "bad.csv"
    # The second record starts on line 4 (the first spans lines 2 and 3); it was reported as line 3.
    bad.write_text("\n".join([header, first_a, first_b, second.replace(",2,10,", ",two,10,", 1)]) + "\n")
    with pytest.raises(RecordFormatError, match=r"bad.csv:4: column calls: expected an integer, got 'two'"):
        read_programs_csv(bad)
    bad.write_text("\n".join([header, first_a, first_b, second.replace(",0.75", ",nan", 1)]) + "\n")
    with pytest.raises(RecordFormatError, match=r"bad.csv:4: column waiting_share: expected a finite number, got 'nan'"):
        read_programs_csv(bad)
    # Not UTF-8, and a field past the csv module's limit: a traceback from the decoder or _csv before.
    bad.write_bytes(header.encode() + b"\n\xff\n")
    with pytest.raises(RecordFormatError, match=rf"bad.csv:2: not UTF-8 text \(invalid start byte at byte {len(header) + 1}\)"):
        read_programs_csv(bad)
    # Far into a long file: the decoder's chunk offset (5525) was reported for byte 21,909.
    write_programs_csv(bad, [program(pid=f"p{i:03d}") for i in range(500)])
    raw = bytearray(bad.read_bytes())
    at = raw.index(b"p498")
    raw[at] = 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(RecordFormatError, match=rf"bad.csv:500: not UTF-8 text \(invalid start byte at byte {at}\)"):
        read_programs_csv(bad)
    # What int() and float() take but no writer writes: "1_0" was read as 10, " 5 " as 5, Arabic-Indic digits.
    for col, cell, problem in (("calls", "1_0", "an integer, got '1_0'"), ("calls", " 2", "an integer, got ' 2'"),
                               ("calls", "\u0662", "an integer, got '\u0662'"),
                               ("latency", "1_0.5", "a number, got '1_0.5'"),
                               ("calls", "9" * 30, "an integer below 2**63, got one of 30 digits"),
                               ("latency", "-5.0", "a number >= 0, got '-5.0'"),
                               ("calls", "-2", "a number >= 0, got '-2'")):
        row = second.split(",")
        row[columns.index(col)] = cell
        bad.write_text("\n".join([header, ",".join(row)]) + "\n")
        with pytest.raises(RecordFormatError, match=rf"bad.csv:2: column {col}: expected {re.escape(problem)}$"):
            read_programs_csv(bad)
    bad.write_text(header + "\n" + second.replace("fcfs,q,", "fcfs," + "q" * 200_000 + ",", 1) + "\n")
    with pytest.raises(RecordFormatError, match=r"bad.csv:2: not a CSV record as this module writes them "
                                                r"\(field larger than field limit"):
        read_programs_csv(bad)


def test_summarize_records_groups_by_policy_in_first_seen_order(tmp_path):
    progs = [program(policy="plas", latency=5.0), program(policy="fcfs", latency=10.0), program(policy="plas", pid="q", latency=15.0)]
    calls = [call(policy="fcfs"), call(policy="plas", prompt=10, hit=5)]
    write_programs_csv(tmp_path / "p.csv", progs)
    write_calls_csv(tmp_path / "c.csv", calls)
    from sim.metrics import summarize_records

    doc = summarize_records("replay", read_calls_csv(tmp_path / "c.csv"), read_programs_csv(tmp_path / "p.csv"))
    assert list(doc["policies"]) == ["plas", "fcfs"]
    plas = doc["policies"]["plas"]
    assert plas["programs"] == 2 and plas["calls"] == 1 and plas["program_latency_mean"] == 10.0
    assert plas["prefix_hit_rate"] == 0.5 and plas["stats"] == {}
    assert plas["program_latency_mean_vs_fcfs"] == 1.0


def test_first_scheduled_may_be_unknown_but_no_other_negative(tmp_path):
    """A replay writes -1 where the engine did not say when a call was first scheduled."""
    rec = call()
    rec.first_scheduled = -1.0
    write_calls_csv(tmp_path / "c.csv", [rec])
    assert read_calls_csv(tmp_path / "c.csv")[0].first_scheduled == -1.0
    text = (tmp_path / "c.csv").read_text()
    (tmp_path / "c.csv").write_text(text.replace(",-1.0,", ",-2.0,"))
    with pytest.raises(RecordFormatError, match=r"c.csv:2: column first_scheduled: expected a number >= 0, "
                                                r"or -1 \(not known\), got '-2.0'$"):
        read_calls_csv(tmp_path / "c.csv")
