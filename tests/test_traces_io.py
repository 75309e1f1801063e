"""Round trips of the trace format: any valid program survives save/load exactly."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traces.format import Call, Program, SharedPrefix
from traces.io import load, load_all, program_to_json, save
from traces.validate import parse_program

ids = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=6)
finite = st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False)


@st.composite
def valid_programs(draw, pid=None):
    """Random valid programs: random DAGs with every kind of prefix information."""
    n = draw(st.integers(1, 12))
    call_ids = draw(st.lists(ids, min_size=n, max_size=n, unique=True))
    calls: list[Call] = []
    ancestors: list[set[int]] = []
    for i, cid in enumerate(call_ids):
        parents = sorted(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else []
        anc = set(parents)
        for p in parents:
            anc |= ancestors[p]
        ancestors.append(anc)
        output = draw(st.integers(1, 300))
        delay = draw(finite)
        kind = draw(st.sampled_from(["none", "context", "shared", "hashes"]))
        if kind == "context" and anc:
            x = calls[draw(st.sampled_from(sorted(anc)))]
            prompt = x.prompt_tokens + x.output_tokens + draw(st.integers(0, 100))
            call = Call(cid, tuple(call_ids[p] for p in parents), prompt, output, delay, context_of=x.id)
        elif kind == "shared":
            prompt = draw(st.integers(1, 400))
            sp = SharedPrefix(draw(st.sampled_from(["sys", "tools", "é"])), draw(st.integers(1, prompt)))
            call = Call(cid, tuple(call_ids[p] for p in parents), prompt, output, delay, shared_prefix=sp)
        elif kind == "hashes":
            prompt = draw(st.integers(1, 400))
            h = draw(st.sampled_from([16, 32, 100, 512]))
            ids_ = st.one_of(st.integers(0, 3), st.integers(-(2**70), 2**70))  # small ids collide: shared blocks
            hashes = tuple(draw(st.lists(ids_, min_size=-(-prompt // h), max_size=-(-prompt // h))))
            call = Call(cid, tuple(call_ids[p] for p in parents), prompt, output, delay, block_hashes=hashes, hash_block_tokens=h)
        else:
            call = Call(cid, tuple(call_ids[p] for p in parents), draw(st.integers(1, 400)), output, delay)
        calls.append(call)
    order = draw(st.permutations(range(n)))  # the format allows any call order
    return Program(
        pid if pid is not None else draw(ids),
        draw(finite),
        draw(st.sampled_from(["sharegpt", "bfcl", "lats", "x y"])),
        tuple(calls[i] for i in order),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_programs())
def test_any_valid_program_round_trips_through_json(program):
    import json

    assert parse_program(json.loads(program_to_json(program))) == program


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(valid_programs(), min_size=1, max_size=5))
def test_files_round_trip_exactly_and_deterministically(tmp_path, programs):
    programs = [Program(f"p{i}", p.arrival, p.workload, p.calls) for i, p in enumerate(programs)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert save(programs, a) == len(programs)
    assert load_all(a) == programs
    save(load(a), b)
    assert a.read_bytes() == b.read_bytes()


def test_saved_line_format_is_compact_and_omits_none(tmp_path):
    p = Program(
        "p0",
        0.1,
        "chat",
        (
            Call("c0", (), 20, 5, 0.0, shared_prefix=SharedPrefix("sys", 8)),
            Call("c1", ("c0",), 30, 7, 1.5, context_of="c0"),
        ),
    )
    path = tmp_path / "t.jsonl"
    save([p], path)
    assert path.read_text() == (
        '{"id":"p0","arrival":0.1,"workload":"chat","calls":['
        '{"id":"c0","parents":[],"prompt_tokens":20,"output_tokens":5,"delay":0.0,'
        '"shared_prefix":{"key":"sys","tokens":8}},'
        '{"id":"c1","parents":["c0"],"prompt_tokens":30,"output_tokens":7,"delay":1.5,"context_of":"c0"}]}\n'
    )


def test_floats_round_trip_bit_exactly(tmp_path):
    values = [0.1 + 0.2, 1e-300, 123456789.123456789, math.nextafter(1.0, 2.0), 5e-324]
    progs = [Program(f"p{i}", v, "w", (Call("c", (), 1, 1, v),)) for i, v in enumerate(values)]
    path = tmp_path / "f.jsonl"
    save(progs, path)
    back = load_all(path)
    assert [p.arrival for p in back] == values
    assert [p.calls[0].delay for p in back] == values


def test_load_is_lazy(tmp_path):
    path = tmp_path / "t.jsonl"
    good = '{"id":"p0","arrival":0,"workload":"w","calls":[{"id":"c","parents":[],"prompt_tokens":1,"output_tokens":1,"delay":0}]}'
    path.write_text(good + "\nnot json\n")
    it = load(path)
    assert next(it).id == "p0"  # the bad second line is not read yet


def test_save_errors_name_the_target_not_the_temporary_file(tmp_path):
    program = Program("p0", 0.0, "w", (Call("c0", (), 1, 1),))
    try:
        save([program], tmp_path)  # a directory
    except OSError as exc:
        assert exc.filename == str(tmp_path) and ".tmp" not in str(exc)
    else:
        raise AssertionError("saving onto a directory must fail")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_save_leaves_an_inputs_own_error_naming_the_input(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        save(load(tmp_path / "missing.jsonl"), tmp_path / "out.jsonl")  # load is lazy: it fails inside save
    assert info.value.filename == str(tmp_path / "missing.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_a_byte_order_mark_may_start_the_file_but_no_later_line(tmp_path):
    """A mark on any line was dropped: files joined with ``cat`` loaded as one without a word."""
    from traces.importers import import_mooncake
    from traces.validate import TraceError, validate_file

    lines = [program_to_json(Program(f"p{i}", float(i), "x", (Call("c0", (), 5, 2),))).encode() for i in range(2)]
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\n" + lines[1] + b"\n")
    assert [p.id for p in load(good)] == ["p0", "p1"] and validate_file(good) == []
    joined = tmp_path / "joined.jsonl"
    joined.write_bytes(lines[0] + b"\n\xef\xbb\xbf" + lines[1] + b"\n")
    message = ("a byte order mark starts this line; only a file's first line may start with one "
               "(were two files joined?)")
    with pytest.raises(TraceError) as info:
        list(load(joined))
    assert (info.value.line, info.value.reason) == (2, message)
    (err,) = validate_file(joined)
    assert (err.line, err.reason) == (2, message)
    rows = b'{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [0]}\n'
    mooncake = tmp_path / "mooncake.jsonl"
    mooncake.write_bytes(b"\xef\xbb\xbf" + rows + b"\xef\xbb\xbf" + rows)
    with pytest.raises(TraceError) as info:
        import_mooncake(mooncake)
    assert (info.value.line, info.value.reason) == (2, message)


def _one_program() -> list[Program]:
    return [Program("p0", 0.0, "x", (Call("c0", (), 5, 2),))]


def test_save_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    """The link itself was replaced by a regular file, and the file it named kept its old text."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "t.jsonl").write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real / "t.jsonl")
    save(_one_program(), link)
    assert link.is_symlink() and [p.id for p in load(real / "t.jsonl")] == ["p0"]
    assert sorted(os.listdir(tmp_path)) == ["link.jsonl", "real"] and os.listdir(real) == ["t.jsonl"]


def test_save_to_a_pipe_writes_through_it(tmp_path):
    """A FIFO (and so /dev/stdout or a device) was replaced by a regular file; a reader got nothing."""
    import threading

    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    save(_one_program(), fifo)
    reader.join(timeout=10)
    assert got == [program_to_json(_one_program()[0]).encode() + b"\n"]
    assert fifo.is_fifo()


def test_save_to_a_long_but_legal_name(tmp_path):
    """The temporary name appended '.tmpPID' to it and passed the 255-byte limit: 'file name too long'."""
    target = tmp_path / ("a" * 245 + ".jsonl")
    save(_one_program(), target)
    assert [p.id for p in load(target)] == ["p0"] and os.listdir(tmp_path) == [target.name]


def test_a_failed_write_names_the_target(tmp_path, monkeypatch):
    import builtins
    import errno
    import io

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: Full() if str(f).endswith(".tmp%d" % os.getpid())
                        else real_open(f, *a, **k))
    target = tmp_path / "t.jsonl"
    with pytest.raises(OSError) as info:
        save(_one_program(), target)
    assert (info.value.filename, info.value.strerror) == (str(target), "No space left on device")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_device_is_named(capsys):
    """Closing flushed again, and its error, naming no file, replaced the named one."""
    from traces.cli import main

    with pytest.raises(OSError) as info:
        save(_one_program(), "/dev/full")
    assert (info.value.filename, info.value.strerror) == ("/dev/full", "No space left on device")
    assert main(["gen", "bfcl", "--programs", "3", "--rate", "1", "--seed", "0", "-o", "/dev/full"]) == 1
    assert capsys.readouterr().err == "error: /dev/full: no space left on device\n"


def test_a_failed_close_names_the_target(tmp_path, monkeypatch):
    import builtins
    import errno
    import io

    class FullOnClose(io.StringIO):
        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: FullOnClose() if str(f).endswith(".tmp%d" % os.getpid())
                        else real_open(f, *a, **k))
    target = tmp_path / "t.jsonl"
    with pytest.raises(OSError) as info:
        save(_one_program(), target)
    assert (info.value.filename, info.value.strerror) == (str(target), "No space left on device")
    assert os.listdir(tmp_path) == []


def test_save_to_dev_stdout_appends_where_the_shell_pointed_it(tmp_path):
    """Resolved to the redirected file and renamed over it, '>>' lost the file's earlier lines."""
    import subprocess
    import sys

    out = tmp_path / "out.jsonl"
    out.write_text("KEEP-ME\n")
    code = ("from traces.format import Call, Program; from traces.io import save; "
            "save([Program('p0', 0.0, 'x', (Call('c0', (), 5, 2),))], '/dev/stdout'); print('after')")
    with open(out, "a") as fh:
        proc = subprocess.run([sys.executable, "-c", code], stdout=fh, stderr=subprocess.PIPE, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "KEEP-ME\n" + program_to_json(_one_program()[0]) + "\nafter\n"


def test_save_under_dev_shm_stays_atomic():
    """Every path under /dev was written through: a bad program left a cut trace under the final name."""
    import tempfile

    from traces.validate import TraceError

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        target = Path(d) / "t.jsonl"
        target.write_text("old\n")
        bad = [*_one_program(), Program("p1", 0.0, "x", (Call("c0", ("nope",), 5, 2),))]
        with pytest.raises(TraceError):
            save(bad, target)
        assert target.read_text() == "old\n" and os.listdir(d) == ["t.jsonl"]


def test_save_to_a_long_multibyte_name(tmp_path):
    """Cut at 64 characters, the temporary name of 62 emoji was 256 bytes: 'file name too long'."""
    target = tmp_path / ("\U0001F600" * 62 + ".jsonl")
    save(_one_program(), target)
    assert [p.id for p in load(target)] == ["p0"]


def test_only_one_byte_order_mark_may_start_the_file(tmp_path):
    """The first mark was cut and decoding with utf-8-sig dropped a second: validate said OK."""
    from traces.importers import import_azure, import_mooncake, import_sharegpt
    from traces.validate import SECOND_BOM, TraceError, validate_file

    bom = b"\xef\xbb\xbf"
    line = program_to_json(Program("p0", 0.0, "x", (Call("c0", (), 5, 2),))).encode() + b"\n"
    twice = tmp_path / "twice.jsonl"
    twice.write_bytes(bom + bom + line)
    assert SECOND_BOM == "a second byte order mark (bytes EF BB BF) follows the first; only one may start the file"
    with pytest.raises(TraceError) as info:
        list(load(twice))
    assert str(info.value) == f"{twice}:1: {SECOND_BOM}"
    (err,) = validate_file(twice)
    assert str(err) == f"{twice}:1: {SECOND_BOM}"
    # the importers alike (azure named the header "\ufeffTIMESTAMP", sharegpt quoted json's "Unexpected UTF-8 BOM")
    files = {
        import_mooncake: b'{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [0]}\n',
        import_azure: b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,10,3\n",
        import_sharegpt: b'[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]',
    }
    for importer, body in files.items():
        f = tmp_path / f"{importer.__name__}.in"
        f.write_bytes(bom + bom + body)
        with pytest.raises(TraceError) as info:
            importer(f)
        assert str(info.value) == f"{f}:1: {SECOND_BOM}", importer
        f.write_bytes(bom + body)  # one is fine
        assert len(importer(f).programs) == 1, importer
