"""Importers: real rows from ../shared/data and small hand-written files."""

from __future__ import annotations

import json
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
    assert info.value.line == 3 and info.value.field == "ContextTokens" and "--min-tokens" in str(info.value)
    report = import_azure(p, min_tokens=1)
    assert report.programs[1].calls[0].prompt_tokens == 1
    assert report.notes == ["1 token count(s) below 1 raised to 1"]


@pytest.mark.parametrize(
    "row,field,words",
    [
        ("2023-11-16 18:17:04.0,x,3", "ContextTokens", "expected an integer"),
        ("2023-11-16 18:17:04.0,5,-3", "GeneratedTokens", "> 0, got -3"),
        ("16/11/2023,5,3", "TIMESTAMP", "expected a time"),
        ("2023-11-16 18:17:02.0,5,3", "TIMESTAMP", "time order"),
        ("2023-11-16 18:17:04.0,5", None, "3 columns"),
        # int() would take these three; a trace writer never writes them.
        ("2023-11-16 18:17:04.0,1_000,3", "ContextTokens", "expected an integer (ASCII digits 0-9 only), got '1_000'"),
        ("2023-11-16 18:17:04.0, 12 ,3", "ContextTokens", "expected an integer (ASCII digits 0-9 only), got ' 12 '"),
        ("2023-11-16 18:17:04.0,5,\u0661\u0662", "GeneratedTokens", "(ASCII digits 0-9 only), got '\u0661\u0662'"),
        ("2023-11-16 18:17:04.\u0669,5,3", "TIMESTAMP", "expected a time"),
        ("2023-11-16 18:17:04.0,1000000001,3", "ContextTokens", "expected at most 1,000,000,000 tokens, got 1000000001"),
        ("2023-11-16 18:17:04.0,5," + "9" * 5000, "GeneratedTokens", "at most 1,000,000,000 tokens, got a 5000-digit"),
        ("2055-11-16 18:17:04.0,5,3", "TIMESTAMP", "expected at most 1e+09 s after the first row"),
    ],
)
def test_azure_bad_rows_name_line_and_field(tmp_path, row, field, words):
    p = write_csv(tmp_path, "2023-11-16 18:17:03.9799600,10,3", row)
    with pytest.raises(TraceError) as info:
        import_azure(p)
    assert (info.value.line, info.value.field) == (3, field)
    assert words in str(info.value) and str(info.value).startswith(f"{p}:3:")


def test_azure_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,10,3\n2023-11-16 18:17:04.0,1\xff,3\n")
    with pytest.raises(TraceError) as info:
        import_azure(p)
    assert info.value.line == 3 and str(info.value).startswith(f"{p}:3: not UTF-8 text")


def test_sharegpt_nested_too_deeply_is_a_trace_error(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TraceError, match="malformed JSON: nested too deeply") as info:
        import_sharegpt(p)
    assert info.value.file == str(p)


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
    with pytest.raises(TraceError, match="expected the header"):
        import_azure(p)


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
    assert info.value.field == "conversations[0].from" and "conversation [1]" in str(info.value)
    src.write_text("{not json")
    with pytest.raises(TraceError, match="malformed JSON"):
        import_sharegpt(src)


def sharegpt_file(tmp_path, messages, prefix=b""):
    src = tmp_path / "sg.json"
    src.write_bytes(prefix + json.dumps([{"id": "a", "conversations": messages}]).encode())
    return src


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


def test_token_approximation_and_missing_tokenizer():
    assert approx_tokens("") == 1 and approx_tokens("abcd") == 1 and approx_tokens("abcde") == 2
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the 'transformers' package"):
            load_tokenizer("gpt2")


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
    "row,field",
    [
        ({"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": [1]}, "hash_ids"),
        ({"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []}, "input_length"),
        ({"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": [1]}, "timestamp"),
        ({"timestamp": 0, "input_length": 5, "hash_ids": [1]}, "output_length"),
    ],
)
def test_mooncake_bad_rows(tmp_path, row, field):
    p = mooncake_file(tmp_path, [MC_ROWS[0], row])
    with pytest.raises(TraceError) as info:
        import_mooncake(p)
    assert (info.value.line, info.value.field) == (2, field)


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
        ('{"timestamp":1' + "0" * 400 + ',"input_length":1,"output_length":1,"hash_ids":[1]}',
         "2: field 'timestamp': expected at most 1e+09 s (1e+12 ms) after the earliest timestamp 0"),
        ('{"timestamp":1000000000001,"input_length":1,"output_length":1,"hash_ids":[1]}',
         "2: field 'timestamp': expected at most 1e+09 s (1e+12 ms) after the earliest timestamp 0"),
    ],
)
def test_mooncake_follows_the_trace_jsonl_rules_and_limits(tmp_path, line, message):
    p = tmp_path / "mc.jsonl"
    p.write_text('{"timestamp":0,"input_length":1,"output_length":1,"hash_ids":[1]}\n' + line + "\n")
    with pytest.raises(TraceError) as info:
        import_mooncake(p)
    assert str(info.value).startswith(f"{p}:{message}")


def test_mooncake_span_limit_is_inclusive(tmp_path):
    p = mooncake_file(tmp_path, [dict(MC_ROWS[0], timestamp=5), dict(MC_ROWS[1], timestamp=5 + 10**12)])
    assert [x.arrival for x in import_mooncake(p).programs] == [0.0, 1e9]
