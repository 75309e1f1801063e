"""Importers: real rows from ../shared/data and small hand-written files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from traces.importers import (
    approx_tokens,
    import_azure,
    import_mooncake,
    import_sharegpt,
    load_tokenizer,
    parse_azure_timestamp,
)
from traces.io import load_all, save
from traces.prefix import context_block_keys
from traces.validate import TraceError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
AZURE = DATA / "azure-llm-2023"


@pytest.mark.parametrize("name,rows", [("code", 8819), ("conv", 19366)])
def test_azure_real_files_import_every_row(tmp_path, name, rows):
    report = import_azure(AZURE / f"{name}.csv")
    progs = report.programs
    assert len(progs) == rows
    assert progs[0].arrival == 0.0 and progs[0].workload == f"azure-{name}"
    assert all(a.arrival <= b.arrival for a, b in zip(progs, progs[1:]))
    assert 3000 < progs[-1].arrival < 3700  # about an hour
    out = tmp_path / "a.jsonl"
    save(progs, out)
    assert load_all(out) == progs


def test_azure_first_rows_are_exact():
    progs = import_azure(AZURE / "code.csv").programs
    # 2023-11-16 18:17:03.9799600 / 18:17:04.0319600 / 18:17:04.0781490
    assert [(p.calls[0].prompt_tokens, p.calls[0].output_tokens) for p in progs[:3]] == [(4808, 10), (3180, 8), (110, 27)]
    assert progs[1].arrival == 0.052
    assert progs[2].arrival == 0.098189


def test_azure_timestamps_keep_seven_digits():
    a = parse_azure_timestamp("2023-11-16 18:17:03.9799600")
    b = parse_azure_timestamp("2023-11-16 18:17:03.9799601")
    assert b - a == 1  # 100 ns, finer than datetime's microseconds
    assert parse_azure_timestamp("2023-11-16 18:17:04") - a == 200400


def write_csv(tmp_path, *rows):
    p = tmp_path / "t.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(r + "\n" for r in rows))
    return p


def test_azure_zero_tokens_is_an_error_unless_min_tokens_given(tmp_path):
    p = write_csv(tmp_path, "2023-11-16 18:17:03.9799600,10,3", "2023-11-16 18:17:04.0000000,0,3")
    with pytest.raises(TraceError) as info:
        import_azure(p)
    assert (info.value.line, info.value.field) == (3, "ContextTokens")
    assert str(info.value) == (f"{p}:3: field 'ContextTokens': expected an integer > 0, got 0 "
                               "(--min-tokens 1 imports it as 1 and reports it)")
    report = import_azure(p, min_tokens=1)
    assert report.programs[1].calls[0].prompt_tokens == 1
    assert report.notes == ["1 token count(s) below 1 raised to 1"]


@pytest.mark.parametrize(
    "row,field,message",
    [
        ("2023-11-16 18:17:04.0,x,3", "ContextTokens",
         "field 'ContextTokens': expected an integer (ASCII digits 0-9 only), got 'x'"),
        ("2023-11-16 18:17:04.0,5,-3", "GeneratedTokens", "field 'GeneratedTokens': expected an integer > 0, got -3"),
        ("16/11/2023,5,3", "TIMESTAMP",
         "field 'TIMESTAMP': expected a time like 2023-11-16 18:17:03.9799600, got '16/11/2023' "
         "(time data '16/11/2023' does not match format '%Y-%m-%d %H:%M:%S')"),
        ("2023-11-16 18:17:02.0,5,3", "TIMESTAMP",
         "field 'TIMESTAMP': rows must be in time order: expected a time at or after the previous row's "
         "'2023-11-16 18:17:03.9799600', got '2023-11-16 18:17:02.0'"),
        ("2023-11-16 18:17:04.0,5", None, "expected 3 columns, got 2"),
        # int() would take these three; a trace writer never writes them.
        ("2023-11-16 18:17:04.0,1_000,3", "ContextTokens",
         "field 'ContextTokens': expected an integer (ASCII digits 0-9 only), got '1_000'"),
        ("2023-11-16 18:17:04.0, 12 ,3", "ContextTokens",
         "field 'ContextTokens': expected an integer (ASCII digits 0-9 only), got ' 12 '"),
        ("2023-11-16 18:17:04.0,5,\u0661\u0662", "GeneratedTokens",
         "field 'GeneratedTokens': expected an integer (ASCII digits 0-9 only), got '\u0661\u0662'"),
        ("2023-11-16 18:17:04.\u0669,5,3", "TIMESTAMP",
         "field 'TIMESTAMP': expected a time like 2023-11-16 18:17:03.9799600, got '2023-11-16 18:17:04.\u0669' "
         "(not ASCII)"),
        ("2023-11-16 18:17:04.0,1000000001,3", "ContextTokens",
         "field 'ContextTokens': expected at most 1,000,000,000 tokens, got 1000000001"),
        ("2023-11-16 18:17:04.0,5," + "9" * 5000, "GeneratedTokens",
         "field 'GeneratedTokens': expected at most 1,000,000,000 tokens, got a 5000-digit integer"),
        ("2055-11-16 18:17:04.0,5,3", "TIMESTAMP",
         "field 'TIMESTAMP': expected at most 1e+09 s after the first row (the trace format's limit on arrival "
         "times), got 1009843200.02004 s"),
        # "got 1e+09 s" of a time past 1e+09 s
        ("2055-07-25 20:03:43.9799601,5,3", "TIMESTAMP",
         "field 'TIMESTAMP': expected at most 1e+09 s after the first row (the trace format's limit on arrival "
         "times), got 1000000000.0000001 s"),
        # "expected at most 1,000,000,000 tokens" of a negative count
        ("2023-11-16 18:17:04.0,-99999999999,3", "ContextTokens",
         "field 'ContextTokens': expected an integer > 0, got -99999999999"),
        ("2023-11-16 18:17:04.0,-" + "9" * 30 + ",3", "ContextTokens",
         "field 'ContextTokens': expected an integer > 0, got a 30-digit negative integer"),
    ],
)
def test_azure_bad_rows_name_line_and_field(tmp_path, row, field, message):
    p = write_csv(tmp_path, "2023-11-16 18:17:03.9799600,10,3", row)
    with pytest.raises(TraceError) as info:
        import_azure(p)
    assert (info.value.line, info.value.field) == (3, field)
    assert str(info.value) == f"{p}:3: {message}"


def test_azure_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,10,3\n2023-11-16 18:17:04.0,1\xff,3\n")
    with pytest.raises(TraceError) as info:
        import_azure(p)
    assert info.value.line == 3
    assert str(info.value) == f"{p}:3: not UTF-8 text (byte 24 of the line: invalid start byte)"


def test_sharegpt_nested_too_deeply_is_a_trace_error(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TraceError) as info:
        import_sharegpt(p)
    assert info.value.file == str(p)
    assert str(info.value) == f"{p}: malformed JSON: nested too deeply"


def test_sharegpt_integer_too_long_for_python_names_the_field(tmp_path):
    p = tmp_path / "sg.json"
    p.write_text('[{"id": "b", "conversations": [{"from": "human", "value": ' + "9" * 5000 + "}]}]")
    with pytest.raises(TraceError) as info:
        import_sharegpt(p)
    assert str(info.value) == (f"{p}: conversation [0]: program 'b': field 'conversations[0].value': "
                               "expected a string, got a 5000-digit integer")


def test_azure_accepts_a_byte_order_mark(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes(b"\xef\xbb\xbfTIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,10,3\n")
    (prog,) = import_azure(p).programs
    assert (prog.calls[0].prompt_tokens, prog.calls[0].output_tokens) == (10, 3)


def test_azure_wrong_header(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("time,in,out\n")
    with pytest.raises(TraceError) as info:
        import_azure(p)
    assert str(info.value) == (f"{p}:1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens, "
                               'got ["time", "in", "out"]')


SHAREGPT = [
    {"id": "a", "conversations": [
        {"from": "human", "value": "x" * 40},
        {"from": "gpt", "value": "y" * 80},
        {"from": "human", "value": "z" * 8},
        {"from": "gpt", "value": "w" * 4},
        {"from": "gpt", "value": "v" * 4},
    ]},
    {"id": "b", "conversations": [{"from": "human", "value": "only a question"}]},
    {"id": "c", "conversations": [
        {"from": "system", "value": "s" * 12},
        {"from": "human", "value": "q" * 4},
        {"from": "gpt", "value": "a" * 400},
        {"from": "human", "value": "unanswered"},
    ]},
]


def test_sharegpt_conversations_become_chains(tmp_path):
    src = tmp_path / "sg.json"
    src.write_text(json.dumps(SHAREGPT))
    report = import_sharegpt(src, rate=2.0, seed=3)
    a, c = report.programs
    # named by their conversation's index: c, the third, was p1 after b (no reply) made no program
    assert [p.id for p in report.programs] == ["p0", "p2"]
    assert [(x.prompt_tokens, x.output_tokens, x.context_of) for x in a.calls] == [(10, 20, None), (10 + 20 + 2, 2, "c0")]
    assert a.calls[1].parents == ("c0",)
    assert [(x.prompt_tokens, x.output_tokens) for x in c.calls] == [(3 + 1, 100)]
    assert report.notes == [
        "1 conversation(s) without a reply: no program",
        "1 conversation(s) end with unanswered messages: not calls",
        "0 empty message(s) counted as 1 token each",
    ]
    assert 0 < a.arrival < c.arrival
    out = tmp_path / "o.jsonl"
    save(report.programs, out)
    keys = context_block_keys(a, block_size=4)
    assert keys["c1"][: 30 // 4] == keys["c0"]


def test_sharegpt_errors_name_the_conversation_and_field(tmp_path):
    src = tmp_path / "sg.json"
    src.write_text(json.dumps([SHAREGPT[0], {"id": "bad", "conversations": [{"from": "robot", "value": "hi"}]}]))
    with pytest.raises(TraceError) as info:
        import_sharegpt(src)
    assert info.value.field == "conversations[0].from"
    assert str(info.value) == (f"{src}: conversation [1]: program 'bad': field 'conversations[0].from': "
                               "expected one of 'human', 'user', 'system', 'gpt', 'chatgpt', 'assistant', 'bard', "
                               "'bing', got \"robot\"")
    src.write_text("{not json")
    with pytest.raises(TraceError) as info:
        import_sharegpt(src)
    assert str(info.value) == (f"{src}: malformed JSON: Expecting property name enclosed in double quotes: "
                               "line 1 column 2 (char 1)")


def sharegpt_file(tmp_path, messages, prefix=b""):
    src = tmp_path / "sg.json"
    src.write_bytes(prefix + json.dumps([{"id": "a", "conversations": messages}]).encode())
    return src


def test_sharegpt_empty_messages_outside_every_call_are_not_counted(tmp_path):
    """They were: a trailing unanswered "" and one in a conversation with no reply read as '2 counted as 1 token'."""
    src = tmp_path / "sg.json"
    src.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": ""}]},
        {"id": "b", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                                      {"from": "human", "value": ""}]},
        {"id": "c", "conversations": [{"from": "gpt", "value": ""}, {"from": "human", "value": "q"},
                                      {"from": "gpt", "value": "a"}]},
    ]))
    report = import_sharegpt(src)
    assert "1 empty message(s) counted as 1 token each" in report.notes  # c's greeting, part of c0's prompt


def test_sharegpt_bytes_that_are_not_utf8_are_named_by_line(tmp_path):
    src = tmp_path / "sg.json"
    src.write_bytes(b'[{"id": "a", "conversations": [\n{"from": "human", "value": "hi \xff"}]}]')
    with pytest.raises(TraceError) as info:
        import_sharegpt(src)
    assert str(info.value) == f"{src}:2: not UTF-8 text (invalid start byte)"  # was "position 55"


def test_sharegpt_empty_messages_are_counted_in_the_report(tmp_path):
    src = sharegpt_file(tmp_path, [{"from": "human", "value": ""}, {"from": "gpt", "value": ""}])
    report = import_sharegpt(src)
    (prog,) = report.programs
    assert [(c.prompt_tokens, c.output_tokens) for c in prog.calls] == [(1, 1)]
    assert "2 empty message(s) counted as 1 token each" in report.notes


def test_sharegpt_consecutive_leading_gpt_messages_are_one_greeting(tmp_path):
    greeting = [{"from": "gpt", "value": "g" * 8}, {"from": "gpt", "value": "a" * 4}]
    report = import_sharegpt(sharegpt_file(tmp_path, greeting))
    assert report.programs == [] and report.notes[0] == "1 conversation(s) without a reply: no program"
    asked = greeting + [{"from": "human", "value": "q" * 4}, {"from": "gpt", "value": "r" * 40}]
    (prog,) = import_sharegpt(sharegpt_file(tmp_path, asked)).programs
    assert [(c.prompt_tokens, c.output_tokens) for c in prog.calls] == [(2 + 1 + 1, 10)]


def test_sharegpt_role_error_lists_every_accepted_role(tmp_path):
    with pytest.raises(TraceError) as info:
        import_sharegpt(sharegpt_file(tmp_path, [{"from": "Human", "value": "hi"}]))
    assert str(info.value).endswith(
        "field 'conversations[0].from': expected one of 'human', 'user', 'system', 'gpt', 'chatgpt', "
        "'assistant', 'bard', 'bing', got \"Human\"")


def test_sharegpt_accepts_a_byte_order_mark(tmp_path):
    msgs = [{"from": "human", "value": "q" * 4}, {"from": "gpt", "value": "r" * 4}]
    (prog,) = import_sharegpt(sharegpt_file(tmp_path, msgs, prefix=b"\xef\xbb\xbf")).programs
    assert [(c.prompt_tokens, c.output_tokens) for c in prog.calls] == [(1, 1)]


def test_token_approximation_and_missing_tokenizer(monkeypatch):
    assert approx_tokens("") == 1 and approx_tokens("abcd") == 1 and approx_tokens("abcde") == 2
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: the import raises ImportError
    with pytest.raises(ValueError) as info:
        load_tokenizer("gpt2")
    assert str(info.value) == ("--tokenizer gpt2 needs the 'transformers' package (pip install transformers); "
                               "without --tokenizer, tokens are approximated as characters / 4")


def test_a_tokenizer_that_cannot_load_is_one_line(tmp_path, monkeypatch):
    """transformers' error ran over several lines of advice and named neither the option nor the file."""
    import types

    def from_pretrained(name):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    fake = types.ModuleType("transformers")
    fake.AutoTokenizer = types.SimpleNamespace(from_pretrained=from_pretrained)
    monkeypatch.setitem(sys.modules, "transformers", fake)
    with pytest.raises(ValueError) as info:
        load_tokenizer("no/such-model")
    assert str(info.value) == ("--tokenizer no/such-model: cannot load it (We couldn't connect to "
                               "'https://huggingface.co' to load the files.)")


def mooncake_file(tmp_path, rows):
    p = tmp_path / "mc.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


MC_ROWS = [
    {"timestamp": 0, "input_length": 1000, "output_length": 10, "hash_ids": [1, 2]},
    {"timestamp": 50, "input_length": 600, "output_length": 5, "hash_ids": [7, 8]},
    {"timestamp": 20, "input_length": 1500, "output_length": 7, "hash_ids": [1, 2, 3]},
]


def test_mooncake_rows_and_grouping(tmp_path):
    p = mooncake_file(tmp_path, MC_ROWS)
    flat = import_mooncake(p).programs
    assert [x.arrival for x in flat] == [0.0, 0.02, 0.05]  # sorted by timestamp
    assert flat[1].calls[0].block_hashes == (1, 2, 3) and flat[1].calls[0].hash_block_tokens == 512
    k0 = context_block_keys(flat[0])["c0"]
    k1 = context_block_keys(flat[1])["c0"]
    assert k0[:62] == k1[:62] and k0[62] != k1[62]  # 1000 identical tokens -> 62 full blocks
    grouped = import_mooncake(p, group_by_prefix=2).programs
    assert len(grouped) == 2
    chain = grouped[0]
    assert [c.parents for c in chain.calls] == [(), ("c0",)] and all(c.delay == 0 for c in chain.calls)
    assert chain.arrival == 0.0 and grouped[1].arrival == 0.05


@pytest.mark.parametrize(
    "row,field,message",
    [
        ({"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": [1]}, "hash_ids",
         "field 'hash_ids': expected ceil(input_length / 512) = 2 hash ids, got 1"),
        ({"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []}, "input_length",
         "field 'input_length': expected an integer > 0, got 0"),
        ({"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": [1]}, "timestamp",
         "field 'timestamp': expected a number of milliseconds >= 0, got -1"),
        ({"timestamp": 0, "input_length": 5, "hash_ids": [1]}, "output_length", "field 'output_length': missing"),
    ],
)
def test_mooncake_bad_rows(tmp_path, row, field, message):
    p = mooncake_file(tmp_path, [MC_ROWS[0], row])
    with pytest.raises(TraceError) as info:
        import_mooncake(p)
    assert (info.value.line, info.value.field) == (2, field)
    assert str(info.value) == f"{p}:2: {message}"


@pytest.mark.parametrize(
    "line,message",
    [
        # The trace format's own JSONL rules (traces.validate.decode_jsonl_line).
        ('{"timestamp":0,"timestamp":5,"input_length":1,"output_length":1,"hash_ids":[1]}',
         "2: field 'timestamp': duplicate key in one JSON object"),
        ('{"timestamp":0,"input_length":1,"output_length":1,"hash_ids":[1],"foo":1}',
         "2: field 'foo': unknown key in a row (allowed: hash_ids, input_length, output_length, timestamp)"),
        ("", "2: empty line (one row per line, no blank lines)"),
        ('{"timestamp":0,"input_length":1000000001,"output_length":1,"hash_ids":[]}',
         "2: field 'input_length': expected at most 1,000,000,000 tokens, got 1000000001"),
        # A 401-digit timestamp is shown cut to its first 57 digits.
        ('{"timestamp":1' + "0" * 400 + ',"input_length":1,"output_length":1,"hash_ids":[1]}',
         "2: field 'timestamp': expected at most 1e+09 s (1e+12 ms) after the earliest timestamp 0 "
         "(the trace format's limit on arrival times), got 1" + "0" * 56 + "..."),
        ('{"timestamp":1000000000001,"input_length":1,"output_length":1,"hash_ids":[1]}',
         "2: field 'timestamp': expected at most 1e+09 s (1e+12 ms) after the earliest timestamp 0 "
         "(the trace format's limit on arrival times), got 1000000000001"),
        # Integers too long to read: each said ">= 0", "> 0" or "a list of integers" of a number that is.
        ('{"timestamp":1' + "0" * 5000 + ',"input_length":1,"output_length":1,"hash_ids":[1]}',
         "2: field 'timestamp': expected a number of milliseconds of at most 4300 digits, got a 5001-digit integer"),
        ('{"timestamp":0,"input_length":1,"output_length":1' + "0" * 5000 + ',"hash_ids":[1]}',
         "2: field 'output_length': expected at most 1,000,000,000 tokens, got a 5001-digit integer"),
        ('{"timestamp":0,"input_length":1,"output_length":1,"hash_ids":[1' + "0" * 5000 + "]}",
         "2: field 'hash_ids': expected integers of at most 4300 digits, got a 5001-digit integer"),
        ('{"timestamp":-1' + "0" * 5000 + ',"input_length":1,"output_length":1,"hash_ids":[1]}',
         "2: field 'timestamp': expected a number of milliseconds >= 0, got a 5001-digit negative integer"),
        # Read as 0.0, it was "expected ... >= 0, got 1e-400 (a float reads it as 0.0)".
        ('{"timestamp":1e-400,"input_length":1,"output_length":1,"hash_ids":[1]}',
         "2: field 'timestamp': expected a number of milliseconds a float holds (nothing is rounded to 0 or "
         "infinity), got 1e-400 (a float reads it as 0.0)"),
    ],
    ids=lambda value: value[:60],  # the long rows would make test names of thousands of characters
)
def test_mooncake_follows_the_trace_jsonl_rules_and_limits(tmp_path, line, message):
    p = tmp_path / "mc.jsonl"
    p.write_text('{"timestamp":0,"input_length":1,"output_length":1,"hash_ids":[1]}\n' + line + "\n")
    with pytest.raises(TraceError) as info:
        import_mooncake(p)
    assert str(info.value) == f"{p}:{message}"


def test_mooncake_span_limit_is_inclusive(tmp_path):
    p = mooncake_file(tmp_path, [dict(MC_ROWS[0], timestamp=5), dict(MC_ROWS[1], timestamp=5 + 10**12)])
    assert [x.arrival for x in import_mooncake(p).programs] == [0.0, 1e9]


def test_mooncake_float_timestamps_past_the_span_once_divided_name_the_input(tmp_path):
    """Within 1e12 ms of the first, but (ts - t0) / 1000 rounds past 1e9 s: it was blamed on the output file."""
    p = mooncake_file(tmp_path, [dict(MC_ROWS[0], timestamp=69836382286884.71),
                                 dict(MC_ROWS[1], timestamp=70836382286884.72)])
    with pytest.raises(TraceError) as info:
        import_mooncake(p)
    assert (info.value.file, info.value.line, info.value.field) == (str(p), 2, "timestamp")
    assert "expected at most 1e+09 s after the earliest timestamp 69836382286884.71" in str(info.value)


def test_a_float_timestamp_past_what_a_float_holds_to_the_millisecond_is_refused(tmp_path):
    """100000000000000000000.0 and ...005000.0 are 5 s apart but one float: both arrived at 0.0."""
    p = tmp_path / "mc.jsonl"
    rows = [dict(MC_ROWS[0], timestamp=0), dict(MC_ROWS[1], timestamp=0)]
    lines = [json.dumps(r) for r in rows]
    p.write_text("\n".join(lines).replace('"timestamp": 0', '"timestamp": 100000000000000000000.0', 1)
                 .replace('"timestamp": 0', '"timestamp": 100000000000000005000.0', 1) + "\n")
    with pytest.raises(TraceError) as info:
        import_mooncake(p)
    assert str(info.value) == (f"{p}:1: field 'timestamp': expected a float below 2**53 (9,007,199,254,740,992) "
                               "ms, where a float holds every millisecond, got 1e+20; write it as an integer")
    ok = mooncake_file(tmp_path, [dict(MC_ROWS[0], timestamp=2.0**53 - 3), dict(MC_ROWS[1], timestamp=2.0**53 - 1)])
    assert [x.arrival for x in import_mooncake(ok).programs] == [0.0, 0.002]  # up to the largest such float
    whole = mooncake_file(tmp_path, [dict(MC_ROWS[0], timestamp=10**20), dict(MC_ROWS[1], timestamp=10**20 + 5000)])
    assert [x.arrival for x in import_mooncake(whole).programs] == [0.0, 5.0]  # integers are exact


@pytest.mark.parametrize(
    "body, line, message",
    [
        (b"2023-11-16 18:17:03,10,5\r\n2023-11-16 18:17:04,1\r0,5\n", 3,
         "not a CSV row: a carriage return (\\r) inside a line: lines must end in \\n or \\r\\n"),
        (b"2023-11-16 18:17:03,10,5\r2023-11-16 18:17:04,10,5\r", 2,  # old Mac line ends: one line
         "not a CSV row: a carriage return (\\r) inside a line"),
        (b"2023-11-16 18:17:03,10," + b"5" * 200_000 + b"\n", 2,
         "not a CSV row: a field longer than 131,072 characters; no Azure trace cell is"),
    ],
    ids=["stray-cr", "cr-line-ends", "huge-field"],
)
def test_azure_rows_the_csv_module_refuses_are_located_errors(tmp_path, body, line, message):
    """csv.Error is not a ValueError: these were tracebacks."""
    p = tmp_path / "t.csv"
    p.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\n" + body)
    with pytest.raises(TraceError) as info:
        import_azure(p)
    assert str(info.value).startswith(f"{p}:{line}: {message}")


def test_azure_label_of_a_file_name_that_is_not_utf8(tmp_path):
    """The label carried a lone surrogate, which the output then refused."""
    import os

    p = os.path.join(os.fsencode(tmp_path), b"bad\xff.csv")
    with open(p, "wb") as fh:
        fh.write(b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,10,3\n")
    (prog,) = import_azure(os.fsdecode(p)).programs
    assert prog.workload == "azure-bad\\xff"
    save([prog], tmp_path / "out.jsonl")
    assert load_all(tmp_path / "out.jsonl")[0].workload == "azure-bad\\xff"


@pytest.mark.parametrize("text, where", [
    ('[{"id": "a", "conversations": [{"from": "human", "value": "x"}], "conversations": []}]',
     "1: field 'conversations': duplicate key in one JSON object (in conversation [0])"),
    ('[{"id": "a", "conversations": [{"from": "gpt", "from": "human", "value": "x"}]}]',
     "1: field 'from': duplicate key in one JSON object (in conversation [0])"),
    # Indented as the real dumps are: the line of the object, and which conversation.
    ('[\n {"id": "a", "conversations": [{"from": "human", "value": "x"}]},\n {"id": "b",\n  "conversations": [\n'
     '   {"from": "human", "value": "x"},\n   {"from": "gpt",\n    "value": "y", "value": "z"}]}\n]',
     "6: field 'value': duplicate key in one JSON object (in conversation [1])"),
    ('{"a": 1, "a": 2}', "1: field 'a': duplicate key in one JSON object"),
    # A null element is an index too: it said conversation [0].
    ('[null,\n {"id": "b", "conversations": [{"from": "human", "value": "q", "value": "r"}]}]',
     "2: field 'value': duplicate key in one JSON object (in conversation [1])"),
    # Deeper than json's pure-Python scanner goes: a RecursionError traceback; now the conversation, no line.
    ('[{"conversations": []}, {"conversations": [], "x": ' + "[" * 500 + '{"k": 1, "k": 2}' + "]" * 500 + "}]",
     " field 'k': duplicate key in one JSON object (in conversation [1])"),
], ids=["conversations-twice", "from-twice", "indented", "top-level-object", "null-element", "deep"])
def test_sharegpt_a_key_given_twice_is_refused_with_its_line(tmp_path, text, where):
    """json kept the last value: a conversation vanished, or a reply became a question."""
    import sys

    p = tmp_path / "sg.json"
    p.write_text(text)
    # Python's default limit, which the deep case is about: an import (torch) may have raised it, and then
    # the pure-Python scanner reaches depth 500 and names line 1.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        with pytest.raises(TraceError) as info:
            import_sharegpt(p)
    finally:
        sys.setrecursionlimit(limit)
    assert str(info.value) == f"{p}:{where}"


def test_azure_min_tokens_past_the_token_limit_is_refused():
    with pytest.raises(ValueError, match=r"min_tokens must be an integer from 1 to 1,000,000,000, got 2000000000"):
        import_azure(AZURE / "code.csv", min_tokens=2_000_000_000)


def test_azure_a_row_spanning_lines_is_named_by_its_first_line(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,10,5\n2023-11-16 18:17:04,"1\n0",5\n')
    with pytest.raises(TraceError) as info:
        import_azure(p)
    assert (info.value.line, info.value.field) == (3, "ContextTokens")  # was 4, where the row ends
