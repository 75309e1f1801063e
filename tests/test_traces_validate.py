"""Each class of invalid input gets its own, precisely located error."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces.io import load_all
from traces.validate import DUPLICATE_KEY, TraceError, decode_line, validate_file


def call(cid="c0", parents=(), prompt=10, output=5, delay=0.0, **extra):
    d = {"id": cid, "parents": list(parents), "prompt_tokens": prompt, "output_tokens": output, "delay": delay}
    d.update(extra)
    return d


def prog(pid="p0", calls=None, arrival=0.0, workload="w", **extra):
    d = {"id": pid, "arrival": arrival, "workload": workload, "calls": calls if calls is not None else [call()]}
    d.update(extra)
    return d


def write(tmp_path, *lines):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def first_error(tmp_path, bad) -> TraceError:
    """Put ``bad`` on line 2 after a good program and return the load error."""
    path = write(tmp_path, prog("ok"), bad)
    with pytest.raises(TraceError) as info:
        load_all(path)
    err = info.value
    assert err.line == 2 and err.file == str(path)
    assert str(err).startswith(f"{path}:2: ")
    return err


CASES = [
    # (description, bad line, expected field, call id, the message after 'PATH:2: ')
    ("malformed json", '{"id": "p1", ', None, None,
     "malformed JSON: Expecting property name enclosed in double quotes at the end of the line (is it cut short?)"),
    ("not an object", "[1, 2]", None, None, "expected a JSON object (one program per line), got [1, 2]"),
    ("deeply nested", "[" * 100000 + "]" * 100000, None, None, "malformed JSON: nested too deeply"),
    ("missing field", {"id": "p1", "arrival": 0, "workload": "w"}, "calls", None,
     "program 'p1': field 'calls': missing (required in a program)"),
    ("unknown program key", prog("p1", extra=1), "extra", None,
     "program 'p1': field 'extra': unknown key in a program (allowed: arrival, calls, id, workload)"),
    ("unknown call key", prog("p1", [call(colour="red")]), "colour", "c0",
     "program 'p1' call 'c0': field 'colour': unknown key in a call (allowed: block_hashes, context_of, delay, "
     "hash_block_tokens, id, output_tokens, parents, prompt_tokens, shared_prefix)"),
    ("bool is not an int", prog("p1", [call(prompt=True)]), "prompt_tokens", "c0",
     "program 'p1' call 'c0': field 'prompt_tokens': expected an integer > 0, got true"),
    ("negative tokens", prog("p1", [call(prompt=-5)]), "prompt_tokens", "c0",
     "program 'p1' call 'c0': field 'prompt_tokens': expected an integer > 0, got -5"),
    ("zero output", prog("p1", [call(output=0)]), "output_tokens", "c0",
     "program 'p1' call 'c0': field 'output_tokens': expected an integer > 0, got 0"),
    ("float tokens", prog("p1", [call(prompt=3.0)]), "prompt_tokens", "c0",
     "program 'p1' call 'c0': field 'prompt_tokens': expected an integer > 0, got 3.0"),
    ("string id", prog(7), "id", None, "field 'id': expected a non-empty string, got 7"),
    ("empty calls", prog("p1", []), "calls", None,
     "program 'p1': field 'calls': expected a non-empty list of calls, got []"),
    ("negative delay", prog("p1", [call(delay=-0.5)]), "delay", "c0",
     "program 'p1' call 'c0': field 'delay': expected a number >= 0, got -0.5"),
    ("negative arrival", prog("p1", arrival=-1), "arrival", None,
     "program 'p1': field 'arrival': expected a number >= 0, got -1"),
    ("nan arrival", '{"id":"p1","arrival":NaN,"workload":"w","calls":[]}', "arrival", None,
     "program 'p1': field 'arrival': expected a finite number >= 0, got NaN"),
    ("infinite delay", '{"id":"p1","arrival":0,"workload":"w","calls":[{"id":"c0","parents":[],"prompt_tokens":1,"output_tokens":1,"delay":Infinity}]}', "delay", "c0",
     "program 'p1' call 'c0': field 'delay': expected a finite number >= 0, got Infinity"),
    ("huge integer arrival", prog("p1", arrival=10**400), "arrival", None,
     "program 'p1': field 'arrival': expected at most 1e+09 seconds, got 1" + "0" * 56 + "..."),
    ("huge arrival", prog("p1", arrival=1e308), "arrival", None,
     "program 'p1': field 'arrival': expected at most 1e+09 seconds, got 1e+308"),
    ("huge delay", prog("p1", [call(delay=2e9)]), "delay", "c0",
     "program 'p1' call 'c0': field 'delay': expected at most 1e+09 seconds, got 2000000000.0"),
    ("huge integer delay", prog("p1", [call(delay=10**400)]), "delay", "c0",
     "program 'p1' call 'c0': field 'delay': expected at most 1e+09 seconds, got 1" + "0" * 56 + "..."),
    ("huge prompt", prog("p1", [call(prompt=10**400)]), "prompt_tokens", "c0",
     "program 'p1' call 'c0': field 'prompt_tokens': expected at most 1,000,000,000 tokens, got 1" + "0" * 56 + "..."),
    ("huge output", prog("p1", [call(output=10**9 + 1)]), "output_tokens", "c0",
     "program 'p1' call 'c0': field 'output_tokens': expected at most 1,000,000,000 tokens, got 1000000001"),
    ("huge prefix", prog("p1", [call(shared_prefix={"key": "s", "tokens": 10**10})]), "shared_prefix.tokens", "c0",
     "program 'p1' call 'c0': field 'shared_prefix.tokens': expected at most 1,000,000,000 tokens, got 10000000000"),
    # A key given twice is refused while the decoder reads the object, before
    # its program and call are known; a second decode on that error names them.
    ("duplicate program key", '{"id":"p1","arrival":0,"arrival":5,"workload":"w","calls":[]}', "arrival", None,
     "program 'p1': field 'arrival': duplicate key in one JSON object"),
    ("duplicate call key", '{"id":"p1","arrival":0,"workload":"w","calls":[{"id":"c0","parents":[],"prompt_tokens":1,'
     '"prompt_tokens":9,"output_tokens":1,"delay":0}]}', "prompt_tokens", "c0",
     "program 'p1' call 'c0': field 'prompt_tokens': duplicate key in one JSON object"),
    ("duplicate prefix key", '{"id":"p1","arrival":0,"workload":"w","calls":[{"id":"c0","parents":[],"prompt_tokens":1,'
     '"output_tokens":1,"delay":0},{"id":"c1","parents":[],"prompt_tokens":4,"output_tokens":1,"delay":0,'
     '"shared_prefix":{"key":"s","tokens":1,"tokens":2}}]}', "shared_prefix.tokens", "c1",
     "program 'p1' call 'c1': field 'shared_prefix.tokens': duplicate key in one JSON object"),
    # the inner object is finished, so refused, first: the call's key is blamed
    # and the program named by neither of its two ids
    ("duplicate keys at two levels", '{"id":"p1","id":"p2","arrival":0,"workload":"w","calls":[{"id":"c0","parents":[],'
     '"delay":0,"delay":1,"prompt_tokens":1,"output_tokens":1}]}', "delay", "c0",
     "call 'c0': field 'delay': duplicate key in one JSON object"),
    ("duplicate call id key", '{"id":"p1","arrival":0,"workload":"w","calls":[{"id":"a","parents":[],"prompt_tokens":1,'
     '"output_tokens":1,"delay":0},{"id":"b","id":"c","parents":[],"prompt_tokens":1,"output_tokens":1,"delay":0}]}',
     "calls[1].id", None, "program 'p1': field 'calls[1].id': duplicate key in one JSON object"),
    # malformed after the repeat: the line is not JSON, which comes first
    ("duplicate key then malformed", '{"id":"p1","arrival":0,"workload":"w","calls":[{"id":"c0","delay":0,"delay":1}], x',
     None, None, "malformed JSON: Expecting property name enclosed in double quotes at column 82"),
    ("duplicate key beside a long integer", '{"id":"p1","arrival":1' + "0" * 5000 + ',"workload":"w","calls":'
     '[{"id":"c0","parents":[],"prompt_tokens":1,"output_tokens":1,"output_tokens":2,"delay":0}]}', "output_tokens",
     "c0", "program 'p1' call 'c0': field 'output_tokens': duplicate key in one JSON object"),
    # null would read as absent and `save` would drop the key: no round trip
    ("null context_of", prog("p1", [call("a"), call("b", ["a"], context_of=None)]), "context_of", "b",
     "program 'p1' call 'b': field 'context_of': expected a value, got null (omit the key when the call has none)"),
    ("null shared_prefix", prog("p1", [call(shared_prefix=None)]), "shared_prefix", "c0",
     "program 'p1' call 'c0': field 'shared_prefix': expected a value, got null (omit the key when the call has none)"),
    ("null hash keys", prog("p1", [call(block_hashes=None, hash_block_tokens=None)]), "block_hashes", "c0",
     "program 'p1' call 'c0': field 'block_hashes': expected a value, got null (omit the key when the call has none)"),
    ("missing parent", prog("p1", [call("a"), call("b", ["zz"])]), "parents", "b",
     "program 'p1' call 'b': field 'parents': names call 'zz', which is not in this program"),
    ("duplicate parent", prog("p1", [call("a"), call("b", ["a", "a"])]), "parents", "b",
     "program 'p1' call 'b': field 'parents': lists a parent twice: " '["a", "a"]'),
    ("duplicate call id", prog("p1", [call("a"), call("a")]), "id", "a",
     "program 'p1' call 'a': field 'id': duplicate call id (also call #0 of this program)"),
    ("cycle", prog("p1", [call("a", ["c"]), call("b", ["a"]), call("c", ["b"])]), "parents", "a",
     "program 'p1' call 'a': field 'parents': cycle: 'b' -> 'c' -> 'a' -> 'b'"),
    ("self loop", prog("p1", [call("a", ["a"])]), "parents", "a",
     "program 'p1' call 'a': field 'parents': cycle: 'a' -> 'a'"),
    ("context not ancestor", prog("p1", [call("a"), call("b", prompt=100, context_of="a")]), "context_of", "b",
     "program 'p1' call 'b': field 'context_of': names call 'a', which is not an ancestor of this call"),
    ("context unknown", prog("p1", [call("a"), call("b", ["a"], prompt=100, context_of="q")]), "context_of", "b",
     "program 'p1' call 'b': field 'context_of': names call 'q', which is not in this program"),
    ("context too long", prog("p1", [call("a", prompt=10, output=5), call("b", ["a"], prompt=14, context_of="a")]), "context_of", "b",
     "program 'p1' call 'b': field 'context_of': context of 'a' is 15 tokens (prompt 10 + output 5), longer than "
     "this call's prompt_tokens 14"),
    ("prefix too long", prog("p1", [call(prompt=10, shared_prefix={"key": "s", "tokens": 11})]), "shared_prefix.tokens", "c0",
     "program 'p1' call 'c0': field 'shared_prefix.tokens': shared prefix of 11 tokens is longer than "
     "prompt_tokens 10"),
    ("prefix with context", prog("p1", [call("a"), call("b", ["a"], prompt=50, context_of="a", shared_prefix={"key": "s", "tokens": 1})]), "shared_prefix", "b",
     "program 'p1' call 'b': field 'shared_prefix': not allowed together with context_of (the call inherits its "
     "ancestor's prefix)"),
    ("prefix bad key", prog("p1", [call(shared_prefix={"key": "s", "tokens": 1, "x": 1})]), "x", "c0",
     "program 'p1' call 'c0': field 'x': unknown key in shared_prefix (allowed: key, tokens)"),
    ("hash count", prog("p1", [call(prompt=513, block_hashes=[1], hash_block_tokens=512)]), "block_hashes", "c0",
     "program 'p1' call 'c0': field 'block_hashes': expected ceil(prompt_tokens / hash_block_tokens) "
     "= ceil(513 / 512) = 2 hashes, got 1"),
    ("hash without size", prog("p1", [call(prompt=5, block_hashes=[1])]), "hash_block_tokens", "c0",
     "program 'p1' call 'c0': field 'hash_block_tokens': missing (required with block_hashes)"),
    ("hash not int", prog("p1", [call(prompt=5, block_hashes=["1"], hash_block_tokens=16)]), "block_hashes", "c0",
     "program 'p1' call 'c0': field 'block_hashes': expected integers, got " '"1"'),
    ("hash with prefix", prog("p1", [call(prompt=5, block_hashes=[1], hash_block_tokens=16, shared_prefix={"key": "s", "tokens": 1})]), "block_hashes", "c0",
     "program 'p1' call 'c0': field 'block_hashes': not allowed together with context_of or shared_prefix (one kind "
     "of prefix information per call)"),
    ("hash with context", prog("p1", [call("a"), call("b", ["a"], prompt=16, context_of="a", block_hashes=[1], hash_block_tokens=16)]), "block_hashes", "b",
     "program 'p1' call 'b': field 'block_hashes': not allowed together with context_of or shared_prefix (one kind "
     "of prefix information per call)"),
    ("duplicate program", prog("ok"), "id", None, "program 'ok': field 'id': duplicate program id (first on line 1)"),
    # A lone surrogate decodes to a str that no UTF-8 encoder takes: it used to
    # pass validation and crash the simulator when the id was hashed.
    ("surrogate program id", prog("p\ud800"), "id", None, "field 'id': not valid Unicode (lone surrogate)"),
    ("surrogate workload", prog("p1", workload="w\udfff"), "workload", None,
     "program 'p1': field 'workload': not valid Unicode (lone surrogate)"),
    # named by position: it read as the program's own id
    ("surrogate call id", prog("p1", [call("c\ud800")]), "calls[0].id", None,
     "program 'p1': field 'calls[0].id': not valid Unicode (lone surrogate)"),
    ("call not an object", {**prog("p1", [call("a")]), "calls": [call("a"), 7]}, "calls[1]", None,
     "program 'p1': field 'calls[1]': expected each call to be an object, got 7"),
    ("empty call id", prog("p1", [call("a"), call("b"), call("")]), "calls[2].id", None,
     "program 'p1': field 'calls[2].id': expected a non-empty string, got \"\""),
    ("surrogate parent", prog("p1", [call("a"), call("b", ["a\ud800"])]), "parents", "b",
     "program 'p1' call 'b': field 'parents': not valid Unicode (lone surrogate)"),
    ("surrogate context_of", prog("p1", [call("a"), call("b", ["a"], prompt=100, context_of="\ud800")]), "context_of",
     "b", "program 'p1' call 'b': field 'context_of': not valid Unicode (lone surrogate)"),
    ("surrogate prefix key", prog("p1", [call(shared_prefix={"key": "\ud800", "tokens": 1})]), "shared_prefix.key",
     "c0", "program 'p1' call 'c0': field 'shared_prefix.key': not valid Unicode (lone surrogate)"),
    # A carriage return in an id left calls.csv and programs.csv unreadable: a CSV
    # writer ending lines with "\n" does not quote a "\r".
    ("carriage return in program id", prog("p\r1"), "id", None,
     "program 'p\\r1': field 'id': control character '\\r' in \"p\\r1\"; expected a name without them"),
    ("newline in call id", prog("p1", [call("c\n0")]), "id", "c\n0",
     "program 'p1' call 'c\\n0': field 'id': control character '\\n' in \"c\\n0\"; expected a name without them"),
    ("C1 control in workload", prog("p1", workload="w\x85"), "workload", None,
     "program 'p1': field 'workload': control character '\\x85' in \"w\\u0085\"; expected a name without them"),
    ("NUL in prefix key", prog("p1", [call(shared_prefix={"key": "k\x00", "tokens": 1})]), "shared_prefix.key", "c0",
     "program 'p1' call 'c0': field 'shared_prefix.key': control character '\\x00' in \"k\\u0000\"; "
     "expected a name without them"),
    # Integers longer than int() reads (4300 digits) used to give Python's advice
    # to call sys.set_int_max_str_digits().
    ("5000-digit prompt", '{"id":"p1","arrival":0,"workload":"w","calls":[{"id":"c0","parents":[],"prompt_tokens":' + "9" * 5000
     + ',"output_tokens":1,"delay":0}]}', "prompt_tokens", "c0",
     "program 'p1' call 'c0': field 'prompt_tokens': expected at most 1,000,000,000 tokens, got a 5000-digit integer"),
    ("5000-digit arrival", '{"id":"p1","arrival":' + "9" * 5000 + ',"workload":"w","calls":[]}', "arrival", None,
     "program 'p1': field 'arrival': expected at most 1e+09 seconds, got a 5000-digit integer"),
    ("negative 5000-digit delay", '{"id":"p1","arrival":0,"workload":"w","calls":[{"id":"c0","parents":[],'
     '"prompt_tokens":1,"output_tokens":1,"delay":-' + "9" * 5000 + '}]}', "delay", "c0",
     "program 'p1' call 'c0': field 'delay': expected a number >= 0, got a 5000-digit negative integer"),
    ("5000-digit block hash", '{"id":"p1","arrival":0,"workload":"w","calls":[{"id":"c0","parents":[],'
     '"prompt_tokens":1,"output_tokens":1,"delay":0,"block_hashes":[' + "9" * 5000 + '],"hash_block_tokens":1}]}',
     "block_hashes", "c0",
     "program 'p1' call 'c0': field 'block_hashes': expected integers of at most 4300 digits, "
     "got a 5000-digit integer"),
    # A nonzero number a float cannot hold was read as 0.0 (or infinity), without a word.
    ("underflowing arrival", '{"id":"p1","arrival":1e-400,"workload":"w","calls":[]}', "arrival", None,
     "program 'p1': field 'arrival': expected a number a float holds (nothing is rounded to 0 or infinity), "
     "got 1e-400 (a float reads it as 0.0)"),
    ("underflowing delay without an exponent", '{"id":"p1","arrival":0,"workload":"w","calls":[{"id":"c0",'
     '"parents":[],"prompt_tokens":1,"output_tokens":1,"delay":0.' + "0" * 400 + '1}]}', "delay", "c0",
     "program 'p1' call 'c0': field 'delay': expected a number a float holds (nothing is rounded to 0 or "
     "infinity), got 0.00000000000000000000000000000000000000... (a float reads it as 0.0)"),
    ("overflowing delay", '{"id":"p1","arrival":0,"workload":"w","calls":[{"id":"c0","parents":[],'
     '"prompt_tokens":1,"output_tokens":1,"delay":1E400}]}', "delay", "c0",
     "program 'p1' call 'c0': field 'delay': expected a number a float holds (nothing is rounded to 0 or "
     "infinity), got 1E400 (a float reads it as inf)"),
]


@pytest.mark.parametrize("what,bad,field,call_id,message", CASES, ids=[c[0] for c in CASES])
def test_each_invalid_input_gets_its_specific_error(tmp_path, what, bad, field, call_id, message):
    err = first_error(tmp_path, bad)
    assert err.field == field, str(err)
    assert err.call_id == call_id, str(err)
    assert str(err) == f"{err.file}:2: {message}"
    assert isinstance(err, ValueError)


def test_message_format_matches_the_documented_example(tmp_path):
    lines = [prog(f"p{i}") for i in range(11)] + [prog("p7x", [call("c3", prompt=-5)])]
    path = write(tmp_path, *lines)
    with pytest.raises(TraceError) as info:
        load_all(path)
    assert str(info.value) == f"{path}:12: program 'p7x' call 'c3': field 'prompt_tokens': expected an integer > 0, got -5"
    assert info.value.program_id == "p7x"


def test_cycle_error_names_the_cycle(tmp_path):
    err = first_error(tmp_path, prog("p1", [call("r"), call("a", ["r", "c"]), call("b", ["a"]), call("c", ["b"])]))
    assert str(err) == f"{err.file}:2: program 'p1' call 'a': field 'parents': cycle: 'b' -> 'c' -> 'a' -> 'b'"


def test_a_long_cycle_is_named_by_its_length_and_first_calls(tmp_path):
    """A 50,000-call cycle was one 589 KB error line listing every call."""
    n = 50_000
    calls = [call(f"c{i}", [f"c{(i - 1) % n}"]) for i in range(n)]
    err = first_error(tmp_path, prog("p1", calls))
    first = err.reason.split(": ", 1)[1].split(" -> ")[0]
    assert err.reason.startswith("cycle of 50,000 calls: ") and len(str(err)) < 300, str(err)
    assert err.reason.endswith(f" -> ... 49,992 more -> {first}")
    assert err.reason.count(" -> ") == 9  # eight calls, the rest, back to the first
    nine = [call(f"c{i}", [f"c{(i - 1) % 9}"]) for i in range(9)]
    assert first_error(tmp_path, prog("p1", nine)).reason.startswith("cycle of 9 calls: ")
    eight = [call(f"c{i}", [f"c{(i - 1) % 8}"]) for i in range(8)]
    assert first_error(tmp_path, prog("p1", eight)).reason.count(" -> ") == 8  # all shown, back to the first


def test_calls_may_be_listed_in_any_order_and_context_of_any_ancestor(tmp_path):
    calls = [
        call("d", ["b"], prompt=200, context_of="a"),
        call("b", ["a"], prompt=50, context_of="a"),
        call("a", prompt=20, output=10),
    ]
    (p,) = load_all(write(tmp_path, prog("p1", calls)))
    assert [c.id for c in p.calls] == ["d", "b", "a"]


def test_validate_file_collects_every_bad_line_and_keeps_programs(tmp_path):
    path = write(
        tmp_path,
        prog("p0"),
        "garbage",
        prog("p2", [call(prompt=0)]),
        prog("p3"),
        "",
        prog("p0"),
    )
    errors = validate_file(path)
    assert [e.line for e in errors] == [2, 3, 5, 6]
    assert [e.field for e in errors] == [None, "prompt_tokens", None, "id"]
    assert [str(e) for e in errors] == [
        f"{path}:2: malformed JSON: Expecting value at column 1",
        f"{path}:3: program 'p2' call 'c0': field 'prompt_tokens': expected an integer > 0, got 0",
        f"{path}:5: empty line (one program per line, no blank lines)",
        f"{path}:6: program 'p0': field 'id': duplicate program id (first on line 1)",
    ]
    assert [e.line for e in validate_file(path, limit=2)] == [2, 3]


def test_valid_file_has_no_errors(tmp_path):
    assert validate_file(write(tmp_path, prog("a"), prog("b"))) == []


def test_trace_error_pickles_with_attributes():
    import pickle

    e = TraceError("bad", file="f", line=3, program_id="p", call_id="c", field="x")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.file, e2.line, e2.program_id, e2.call_id, e2.field, str(e2)) == ("f", 3, "p", "c", "x", str(e))


def test_fast_call_constructor_builds_equal_calls():
    from traces.format import Call, SharedPrefix
    from traces.format import make_call

    args = ("c1", ("c0",), 100, 20, 0.5, None, SharedPrefix("k", 3), None, None)
    made = make_call(*args)
    assert made == Call(*args) and hash(made) == hash(Call(*args)) and repr(made) == repr(Call(*args))


def test_surrogate_message_is_exactly_located(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"id":"p\\ud800","arrival":0,"workload":"w","calls":[{"id":"c","parents":[],'
                    '"prompt_tokens":1,"output_tokens":1,"delay":0}]}\n')
    (err,) = validate_file(path)
    assert str(err) == f"{path}:1: field 'id': not valid Unicode (lone surrogate)"


def test_non_ascii_ids_are_still_valid(tmp_path):
    """The surrogate check sends non-ASCII ids off the fast path; they must still load."""
    p = prog("p\u00e9", [call("a\u4e2d"), call("b", ["a\u4e2d"], prompt=100, context_of="a\u4e2d")], workload="w\u00e9")
    (loaded,) = load_all(write(tmp_path, p))
    assert loaded.id == "p\u00e9" and loaded.calls[1].parents == ("a\u4e2d",) and loaded.calls[1].context_of == "a\u4e2d"


def test_invalid_utf8_is_malformed_json_not_a_crash(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"id":"p\xff"}\n')
    (err,) = validate_file(path)
    assert err.line == 1
    assert str(err) == f"{path}:1: malformed JSON: 'utf-8' codec can't decode byte 0xff in position 8: invalid start byte"


# --- decode_line on arbitrary JSON-like text (hypothesis) ---------------------

_KEYS = st.sampled_from(["id", "a", "calls", "delay"])  # few names, so repeats are common
_SCALARS = st.one_of(st.integers(-5, 5), st.sampled_from(["p", "c", "id"]), st.none())


def _json_text(leaves: st.SearchStrategy) -> st.SearchStrategy:
    """JSON text whose objects may give a key twice (json.dumps never does)."""
    def extend(inner):
        obj = st.lists(st.tuples(_KEYS, inner), max_size=4).map(
            lambda pairs: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}")
        arr = st.lists(inner, max_size=3).map(lambda items: "[" + ",".join(items) + "]")
        return obj | arr
    return st.recursive(leaves.map(json.dumps), extend, max_leaves=12)


def _repeats(value_text: str) -> bool:
    found = []

    def hook(pairs):
        if len({k for k, _ in pairs}) != len(pairs):
            found.append(True)
        return dict(pairs)
    json.loads(value_text, object_pairs_hook=hook)
    return bool(found)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_json_text(_SCALARS), st.sampled_from(["", " x", "]", "}", ","]), st.integers(0, 3))
def test_decode_line_gives_a_value_or_a_trace_error_never_a_traceback(text, tail, cut):
    """Whatever the line, the loader gets a value or a TraceError; a repeated
    key in valid JSON is always reported as one, naming the repeated key."""
    line = (text + tail)[: len(text + tail) - cut] if cut else text + tail
    try:
        json.loads(line)
        valid = True
    except ValueError:
        valid = False
    try:
        value = decode_line(line)
    except TraceError as exc:
        if valid and _repeats(line):
            assert exc.reason == DUPLICATE_KEY, str(exc)
            assert exc.field is not None and exc.field.rsplit(".", 1)[-1] in {"id", "a", "calls", "delay"}
        else:
            assert not valid and exc.reason.startswith("malformed JSON: "), str(exc)
    else:
        assert valid and not _repeats(line) and value == json.loads(line)


@st.composite
def _dags(draw):
    """Random DAGs (parents drawn among earlier calls), listed in order or shuffled."""
    n = draw(st.integers(1, 12))
    parents = [sorted(set(draw(st.lists(st.integers(0, i - 1), max_size=3)))) if i else [] for i in range(n)]
    order = draw(st.permutations(range(n)))
    return parents, order


@settings(max_examples=200, deadline=None)
@given(dag=_dags(), limit=st.sampled_from([0, 1, 256]))
def test_the_ancestor_check_agrees_with_brute_force_whichever_way_it_searches(dag, limit):
    """The bounded walk up and the kept descendant sets (taken past WALK_LIMIT) give the same answers."""
    from traces.format import Call
    from traces.validate import _Ancestry

    parents, order = dag
    calls = [Call(f"c{i}", tuple(f"c{p}" for p in parents[i]), 10, 5) for i in order]
    index = {c.id: i for i, c in enumerate(calls)}
    ancestors: dict[int, set[int]] = {}
    for i, ps in enumerate(parents):
        ancestors[i] = set(ps).union(*(ancestors[p] for p in ps))
    ancestry = _Ancestry(calls, index, in_order=list(order) == sorted(order))
    ancestry.WALK_LIMIT = limit
    for i in range(len(parents)):
        for j in range(len(parents)):
            assert ancestry.is_ancestor(f"c{j}", calls[index[f"c{i}"]]) == (j in ancestors[i]), (i, j)


def test_a_long_chain_continuing_its_root_takes_the_root_s_descendants_once(tmp_path, monkeypatch):
    """Each call walked back to the root: n^2 / 2 steps, 14 s to validate 10,000 calls."""
    from traces.validate import _Ancestry

    taken = []
    real = _Ancestry._descendants_of
    monkeypatch.setattr(_Ancestry, "_descendants_of", lambda self, t: taken.append(t) or real(self, t))
    n = 2000
    calls = [call("c0", prompt=10, output=5)]
    calls += [call(f"c{i}", [f"c{i - 1}"], prompt=15 + i, output=1, context_of="c0") for i in range(1, n)]
    (p,) = load_all(write(tmp_path, prog("chain", calls)))
    assert len(p.calls) == n and taken == ["c0"]


def test_numpy_numbers_in_a_program_built_in_python_are_named_by_type():
    """np.float64 is a float that json renders "1.0": the error read "expected a number >= 0, got 1.0"."""
    import numpy as np

    from traces.format import Call, Program
    from traces.validate import check_program

    with pytest.raises(TraceError) as info:
        check_program(Program("p0", np.float64(1.0), "w", (Call("c0", (), 5, 3),)))
    assert str(info.value) == ("program 'p0': field 'arrival': expected a number >= 0, got np.float64(1.0) "
                               "(a numpy.float64; convert with int() or float())")
    with pytest.raises(TraceError) as info:
        check_program(Program("p0", 1.0, "w", (Call("c0", (), np.int64(5), 3),)))
    assert str(info.value).endswith("field 'prompt_tokens': expected an integer > 0, got np.int64(5) "
                                    "(a numpy.int64; convert with int() or float())")


@pytest.mark.parametrize("literal", ["0.0", "0e-400", "0.000E+5", "1e-320", "5.0"])
def test_zero_and_numbers_a_float_holds_are_read_as_written(tmp_path, literal):
    """Only a nonzero literal that becomes 0.0 or infinity is refused: a zero written with an
    exponent is zero, and a subnormal is a float (rounded as any decimal is)."""
    path = write(tmp_path, prog("p0"), '{"id":"p1","arrival":0,"workload":"w","calls":[{"id":"c0","parents":[],'
                 '"prompt_tokens":1,"output_tokens":1,"delay":' + literal + '}]}')
    assert load_all(path)[1].calls[0].delay == float(literal)
