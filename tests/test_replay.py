"""Replay: token-id prompts follow the trace's prefix identity; results files; the inprocess no-GPU path."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import replay as replay_mod
from engine import replay_targets
from engine.replay import Replayer, ReplaySettings, program_record, write_outputs
from engine.replay_targets import CallResult, Clock
from engine.tokens import fallback_output_ids, prompt_ids
from sim.metrics import read_calls_csv, read_programs_csv
from test_serve_helpers import run, start_app, start_engine
from traces.format import Call, Program, SharedPrefix
from traces.io import save

ROOT = Path(__file__).resolve().parent.parent


def _chain() -> Program:
    return Program("p", 0.0, "sharegpt", (
        Call("a", (), 50, 7, shared_prefix=SharedPrefix("sys", 20)),
        Call("b", ("a",), 80, 4, context_of="a"),
    ))


def test_prompt_ids_follow_the_trace_identity():
    p = _chain()
    a, b = p.calls
    ids_a = prompt_ids(p, a, {})
    assert len(ids_a) == 50
    other = Program("q", 0.0, "sharegpt", (Call("z", (), 30, 1, shared_prefix=SharedPrefix("sys", 20)),))
    ids_z = prompt_ids(other, other.calls[0], {})
    assert ids_a[:20] == ids_z[:20]  # the shared system prompt is the same tokens
    assert ids_a[20:30] != ids_z[20:30]  # the rest is each call's own
    received = [9001, 9002, 9003, 9004, 9005, 9006, 9007]
    ids_b = prompt_ids(p, b, {"a": ids_a + received})
    assert len(ids_b) == 80
    assert ids_b[:57] == ids_a + received  # the ancestor's prompt then the output it actually got
    assert prompt_ids(p, a, {}) == ids_a  # deterministic
    assert len(fallback_output_ids(p, a)) == 7

    hashed = Program("m", 0.0, "mooncake", (
        Call("h1", (), 40, 1, block_hashes=(5, 6, 7), hash_block_tokens=16),
        Call("h2", (), 20, 1, block_hashes=(5, 8), hash_block_tokens=16),
    ))
    h1 = prompt_ids(hashed, hashed.calls[0], {})
    h2 = prompt_ids(hashed, hashed.calls[1], {})
    assert len(h1) == 40 and len(h2) == 20
    assert h1[:16] == h2[:16] and h1[16:20] != h2[16:20]


class FakeTarget:
    """A target that answers at once with scripted timing; records what was sent."""

    model = "fake"

    def __init__(self):
        self.sent = []
        self.kv_ttl = {}

    async def send(self, prompt, max_tokens, program_id, thread_id, clock, kv_ttl=0.0):
        self.sent.append((program_id, thread_id, list(prompt), max_tokens))
        self.kv_ttl[(program_id, thread_id)] = kv_ttl
        await asyncio.sleep(0.01)
        first = clock.now()
        await asyncio.sleep(0.01)
        return CallResult(first, clock.now(), [7] * max_tokens, max_tokens, engine=1, stats=None, cached_tokens=3)


def test_replayer_without_engine_stats_uses_the_client_decode_span(tmp_path):
    p = _chain()
    target = FakeTarget()

    async def go():
        r = Replayer([p], target, "fcfs")
        wall = await r.run()
        return r, wall

    r, wall = run(go())
    assert [s[1] for s in target.sent] == ["a", "b"]
    assert target.sent[1][2][50:57] == [7] * 7  # b re-sends a's received output ids
    rows = {c.call_id: c for c in r.records}
    for c in rows.values():
        assert c.service == pytest.approx(c.finish - c.first_token)
        assert c.waiting == pytest.approx((c.finish - c.arrival) - c.service)
        assert c.first_scheduled == -1.0 and c.engine == 1 and c.prefix_hit_tokens == 3
    assert rows["b"].arrival >= rows["a"].finish
    assert r.service_source == {"engine": 0, "client_decode_span": 2}

    trace = tmp_path / "t.jsonl"
    save([p], trace)
    out = tmp_path / "out"
    summary = write_outputs(r, ReplaySettings(trace=str(trace), target="fake", policy="fcfs", out=str(out)), wall)
    assert len(read_calls_csv(out / "calls.csv")) == 2
    progs = read_programs_csv(out / "programs.csv")
    assert progs == [program_record("fcfs", p, [rows["a"], rows["b"]])]
    meta = json.loads((out / "replay.json").read_text())
    assert meta["trace"] == str(trace.resolve()) and meta["policy"] == "fcfs" and meta["target"] == "fake"
    assert meta["service_source"] == {"engine": 0, "client_decode_span": 2}
    assert (meta["token_mismatches"], meta["calls_without_output_ids"], meta["cache_salt"]) == (0, 0, None)
    assert summary["policies"]["fcfs"]["programs"] == 1


def test_calls_answered_without_ids_are_counted_for_validate(tmp_path):
    """Their children re-send stand-in ids (`fallback_output_ids`): the engine's cache misses where the
    simulation hits, which replay.json now says."""
    class NoIds(FakeTarget):
        async def send(self, *args, **kwargs):
            res = await super().send(*args, **kwargs)
            return dataclasses.replace(res, output_ids=None, output_tokens=res.output_tokens - 1)

    p = _chain()
    trace = tmp_path / "t.jsonl"
    save([p], trace)

    async def go():
        r = Replayer([p], NoIds(), "fcfs")
        return r, await r.run()

    r, wall = run(go())
    write_outputs(r, ReplaySettings(trace=str(trace), target="fake", policy="fcfs", out=str(tmp_path / "o")), wall)
    meta = json.loads((tmp_path / "o" / "replay.json").read_text())
    assert (meta["calls_without_output_ids"], meta["token_mismatches"]) == (2, 2)


def test_a_failed_call_skips_its_descendants_and_the_cli_exits_1(tmp_path):
    trace = tmp_path / "t.jsonl"
    # 10_000 + 10 tokens cannot fit the 100-block (1600-token) KV cache: the engine refuses with 400.
    save([Program("big", 0.0, "x", (Call("a", (), 10_000, 10), Call("b", ("a",), 10_020, 2, context_of="a"))),
          Program("ok", 0.0, "x", (Call("a", (), 10, 3),))], trace)

    async def go():
        server, engine = await start_engine(step=0.002, blocks=100)
        try:
            from engine.replay import replay
            from engine.replay_targets import HTTPTarget

            settings = ReplaySettings(trace=str(trace), target=server.url, policy="plas", out=str(tmp_path / "o"))
            from traces.io import load_all

            async with HTTPTarget(server.url) as target:
                return await replay(load_all(trace), target, settings), len(engine.received)
        finally:
            await server.stop()

    summary, received = run(go())
    pol = summary["policies"]["plas"]
    assert pol["programs"] == 1 and pol["calls"] == 1
    assert pol["stats"]["failed_calls"] == 1.0 and pol["stats"]["unfinished_programs"] == 1.0
    assert pol["stats"]["skipped_calls"] == 1.0
    assert received == 1  # b never sent
    meta = json.loads((tmp_path / "o" / "replay.json").read_text())
    assert "HTTP 400" in meta["errors"][0]
    # Both programs were ended once their calls were done, the failed one too; a bare engine has no
    # program route (the gateway has), which is counted, not an error.
    assert meta["program_ends"] == {"no_table": 2} and meta["program_end_errors"] == []


def test_inprocess_without_a_gpu_exits_1_with_one_line(tmp_path):
    trace = tmp_path / "t.jsonl"
    save([Program("p", 0.0, "x", (Call("a", (), 10, 3),))], trace)
    # Make torch unimportable so the no-GPU path runs on any machine, GPU or not.
    code = ("import sys; sys.modules['torch'] = None; from engine.cli import main; "
            f"sys.exit(main(['replay', {str(trace)!r}, '--target', 'inprocess', '--policy', 'plas', "
            f"'--out', {str(tmp_path / 'o')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "inprocess" in lines[0] and "torch" in lines[0]
    assert not (tmp_path / "o").exists()


def test_inprocess_problem_is_the_profilers_gpu_check(monkeypatch):
    import engine.profile

    monkeypatch.setattr(engine.profile, "gpu_problem", lambda: "no CUDA GPU is visible")
    assert replay_targets.inprocess_problem() == "no CUDA GPU is visible"


def test_cli_reports_a_bad_trace_and_an_unreachable_target(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    proc = subprocess.run([sys.executable, "-m", "engine", "replay", str(bad), "--target", "http://127.0.0.1:9",
                           "--policy", "plas", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "bad.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    good = tmp_path / "good.jsonl"
    save([Program("p", 0.0, "x", (Call("a", (), 10, 3),))], good)
    proc = subprocess.run([sys.executable, "-m", "engine", "replay", str(good), "--target", "http://127.0.0.1:9",
                           "--policy", "plas", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "/v1/models" in proc.stderr and "Traceback" not in proc.stderr
    for ttl in ("-1", "1e10"):  # past 1e9 s every engine refuses the tag, so every call would fail
        proc = subprocess.run([sys.executable, "-m", "engine", "replay", str(good), "--target", "http://127.0.0.1:9",
                               "--policy", "plas", "--kv-ttl", ttl], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip() == (
            f"python -m engine replay: error: --kv-ttl: expected seconds from 0 to 1e+09, got {float(ttl)}")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--policy", "lifo"], "--policy lifo: unknown policy; valid choices: fcfs, mlfq, plas, atlas, srpt, program_fcfs"),
        (["--policy", "plas", "--request-timeout", "-1"], "--request-timeout: expected seconds > 0, got -1.0"),
        (["--policy", "plas", "--request-timeout", "nan"], "--request-timeout: expected seconds > 0, got nan"),
        (["--policy", "plas", "--out", ""], "--out '': expected a directory path"),
        # a typo in the kind was recorded, and validate passed over a kind it did not know
        (["--policy", "plas", "--latency", "constnat:0.01"],
         "--latency constnat:0.01: unknown kind 'constnat'; expected KIND or KIND:DETAIL, KIND one of constant, "
         "roofline, fitted, real (e.g. constant:0.005, fitted:a100-llama-3.1-8b, real:a100)"),
        (["--policy", "plas", "--latency", "vllm on an H100"],
         "--latency vllm on an H100: unknown kind 'vllm on an H100'; expected KIND or KIND:DETAIL, KIND one of "
         "constant, roofline, fitted, real (e.g. constant:0.005, fitted:a100-llama-3.1-8b, real:a100)"),
        (["--policy", "plas", "--latency", "fitted:"],
         "--latency fitted:: empty DETAIL after 'fitted:'; expected KIND or KIND:DETAIL, KIND one of constant, "
         "roofline, fitted, real (e.g. constant:0.005, fitted:a100-llama-3.1-8b, real:a100)"),
        (["--policy", "plas", "--out", "afile"], "--out afile: exists and is not a directory"),
        # was a NotADirectoryError traceback once the replay had run
        (["--policy", "plas", "--out", "afile/sub"], "--out afile/sub: cannot write there: Not a directory"),
    ],
)
def test_cli_refuses_bad_options_before_replaying(tmp_path, options, message):
    """Found up front: an --out that is a file used to fail only after the whole replay."""
    (tmp_path / "afile").write_text("")
    good = tmp_path / "good.jsonl"
    save([Program("p", 0.0, "x", (Call("a", (), 10, 3),))], good)
    proc = subprocess.run([sys.executable, "-m", "engine", "replay", str(good), "--target", "http://127.0.0.1:9",
                           *options], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == f"python -m engine replay: error: {message}\n"


@pytest.mark.parametrize("program_id, call_id, field", [
    ("chat 1", "a", "program 'chat 1': field 'id': 'chat 1' has characters outside [A-Za-z0-9._:-]"),
    ("p", "a/b", "program 'p' call 'a/b': field 'id': 'a/b' has characters outside [A-Za-z0-9._:-]"),
])
def test_cli_refuses_ids_an_http_target_cannot_send_before_replaying(tmp_path, program_id, call_id, field):
    """A space had every call refused by the gateway; a newline stopped the replay with a traceback."""
    trace = tmp_path / "t.jsonl"
    save([Program("ok", 0.0, "x", (Call("a", (), 10, 3),)), Program(program_id, 0.0, "x", (Call(call_id, (), 10, 3),))],
         trace)
    proc = subprocess.run([sys.executable, "-m", "engine", "replay", str(trace), "--target", "http://127.0.0.1:9",
                           "--policy", "plas", "--model", "sim", "--out", str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    assert proc.stderr == (f"python -m engine replay: error: {trace}:2: {field}; an HTTP target sends ids as headers "
                           "(X-Program-Id, X-Thread-Id), which take [A-Za-z0-9._:-] only, at most 128 characters\n")
    assert not (tmp_path / "o").exists()


def test_a_call_that_raises_unexpectedly_fails_alone_and_the_outputs_are_written(tmp_path):
    class Surprising(FakeTarget):
        async def send(self, prompt, max_tokens, program_id, thread_id, clock, kv_ttl=0.0):
            if program_id == "bad":
                raise ValueError("Forbidden control character detected in headers")
            return await super().send(prompt, max_tokens, program_id, thread_id, clock, kv_ttl)

    programs = [Program("bad", 0.0, "x", (Call("a", (), 10, 3), Call("b", ("a",), 20, 2))),
                Program("ok", 0.0, "x", (Call("a", (), 10, 3),))]
    settings = ReplaySettings(trace="t.jsonl", target="fake", policy="plas", out=str(tmp_path / "o"))
    summary = run(replay_mod.replay(programs, Surprising(), settings))
    stats = summary["policies"]["plas"]["stats"]
    assert summary["policies"]["plas"]["programs"] == 1
    assert (stats["failed_calls"], stats["skipped_calls"]) == (1.0, 1.0)
    meta = json.loads((tmp_path / "o" / "replay.json").read_text())
    assert meta["errors"] == ["program bad call a: ValueError: Forbidden control character detected in headers"]


@pytest.mark.parametrize("target", ["notaurl", "127.0.0.1:8000", "ftp://host:21", "http://", "http://[::1",
                                    "http://host:port"])
def test_cli_refuses_a_target_that_is_not_a_base_url(tmp_path, target):
    good = tmp_path / "good.jsonl"
    save([Program("p", 0.0, "x", (Call("a", (), 10, 3),))], good)
    proc = subprocess.run([sys.executable, "-m", "engine", "replay", str(good), "--target", target, "--policy", "plas",
                           "--model", "sim", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr == (f"python -m engine replay: error: --target {target}: expected a base URL such as "
                           "http://HOST:PORT, or 'inprocess'\n")


def test_cli_failed_replay_leaves_no_unclosed_session_warning(tmp_path):
    good = tmp_path / "good.jsonl"
    save([Program("p", 0.0, "x", (Call("a", (), 10, 3),))], good)
    proc = subprocess.run([sys.executable, "-m", "engine", "replay", str(good), "--target", "http://127.0.0.1:9",
                           "--policy", "plas", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "/v1/models" in proc.stderr
    assert "Unclosed" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_clock_is_relative_to_its_zero():
    async def go():
        loop = asyncio.get_running_loop()
        clock = Clock(loop.time() - 5.0)  # its zero 5 s ago
        before = clock.now()
        await clock.until(before + 0.02)  # 20 ms from now
        await clock.until(1.0)  # in the past: returns at once
        return before, clock.now()

    before, after = run(go())
    # Relative to its zero, not the loop's (bounds loose enough for a loaded machine).
    assert 5.0 <= before < 5.5 and before + 0.02 <= after < before + 0.5


def test_vllm_stats_take_vllms_inference_time():
    from types import SimpleNamespace

    from engine.replay_targets import vllm_stats

    m = SimpleNamespace(queued_ts=100.0, scheduled_ts=100.5, first_token_ts=100.7, last_token_ts=102.0)
    assert vllm_stats(m) == {"service": 1.5, "first_scheduled_after": 0.5, "source": "vllm_inference_time"}
    assert vllm_stats(None) is None
    assert vllm_stats(SimpleNamespace(queued_ts=0.0, scheduled_ts=0.0, last_token_ts=0.0)) is None  # no stats kept


def _tree() -> Program:
    """a -> (b, c), b -> d: a and b have children."""
    return Program("t", 0.0, "lats", (
        Call("a", (), 40, 8), Call("b", ("a",), 60, 8, context_of="a"), Call("c", ("a",), 60, 8, context_of="a"),
        Call("d", ("b",), 90, 4, context_of="b"),
    ))


@pytest.mark.parametrize("kv_ttl, tagged", [(0.0, {}), (3.0, {"a": 3.0, "b": 3.0})])
def test_kv_ttl_is_sent_with_the_calls_that_have_children(kv_ttl, tagged):
    target = FakeTarget()
    run(Replayer([_tree()], target, "fcfs", kv_ttl).run())
    assert {tid: t for (_, tid), t in target.kv_ttl.items() if t} == tagged
    assert set(target.kv_ttl) == {("t", c) for c in "abcd"}
    assert replay_targets.xargs("t", "a", 0.0) == {"program_id": "t", "thread_id": "a"}  # plain replays send what they did
    assert replay_targets.xargs("t", "a", 3.0)["kv_ttl"] == 3.0


def test_replay_with_kv_ttl_pins_on_sim_serve_and_the_next_calls_take_the_pins_up(tmp_path):
    trace = tmp_path / "t.jsonl"
    # Two chains with 0.05 s of tool time between calls.
    def chain(pid: str) -> Program:
        return Program(pid, 0.0, "bfcl", (
            Call("a", (), 64, 16), Call("b", ("a",), 120, 16, context_of="a", delay=0.05),
            Call("c", ("b",), 160, 8, context_of="b", delay=0.05),
        ))

    save([chain("p"), chain("q")], trace)

    async def go(kv_ttl):
        server, engine = await start_engine(step=0.002, blocks=200)
        try:
            from engine.replay import replay
            from engine.replay_targets import HTTPTarget
            from traces.io import load_all

            settings = ReplaySettings(trace=str(trace), target=server.url, policy="fcfs",
                                      out=str(tmp_path / f"o{kv_ttl}"), kv_ttl=kv_ttl)
            async with HTTPTarget(server.url) as target:
                await replay(load_all(trace), target, settings)
            return engine.snapshot()
        finally:
            await server.stop()

    snap = run(go(60.0))
    # Each chain pins a and b; each pin is taken up by the next call, none expires (60 s) or is dropped.
    assert (snap["kv_pins"], snap["kv_pins_held"], snap["kv_pins_dropped"]) == (4, 0, 0)
    calls = {(c.program_id, c.call_id): c for c in read_calls_csv(tmp_path / "o60.0" / "calls.csv")}
    # b re-sends a's 64 + 16 tokens, of which the KV of 79 was computed (the
    # last sampled token's never is): 4 full blocks. c re-sends b's 136: 8.
    assert [calls[(p, "b")].prefix_hit_tokens for p in "pq"] == [64, 64]
    assert [calls[(p, "c")].prefix_hit_tokens for p in "pq"] == [128, 128]
    assert json.loads((tmp_path / "o60.0" / "replay.json").read_text())["kv_ttl"] == 60.0
    assert run(go(0.0))["kv_pins"] == 0


def test_program_arrivals_and_delays_are_honoured():
    programs = [Program("early", 0.0, "x", (Call("a", (), 5, 1), Call("b", ("a",), 5, 1, delay=0.1))),
                Program("late", 0.15, "x", (Call("a", (), 5, 1),))]

    async def go():
        r = Replayer(programs, FakeTarget(), "fcfs")
        await r.run()
        return {(c.program_id, c.call_id): c for c in r.records}

    rows = run(go())
    assert 0.15 <= rows[("late", "a")].arrival < 0.15 + 0.1
    assert rows[("early", "b")].arrival >= rows[("early", "a")].finish + 0.1
    assert rows[("early", "a")].arrival < 0.05


def test_inprocess_engine_gets_the_sequence_and_token_limits_vllm_serve_gets(tmp_path, monkeypatch):
    # AsyncLLM's default usage context falls back to 128 sequences; `vllm
    # serve` (and the simulator's engine defaults) have 256 on an A100.
    import asyncio

    from vllm.config import SchedulerConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from sim.config import EngineConfig

    seen = {}

    def fake_from_engine_args(args, usage_context=None, **_):
        seen["args"], seen["context"] = args, usage_context
        return None

    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(fake_from_engine_args))
    asyncio.run(replay_targets.InprocessTarget("plas", str(tmp_path)).__aenter__())
    assert seen["args"].max_num_seqs is None and seen["args"].max_num_batched_tokens is None  # left to vLLM
    # vLLM's own rule (`_set_default_max_num_seqs_and_batched_tokens_args`)
    # depends on the GPU it finds, so each GPU is stood in for here: the
    # usage context must give `vllm serve`'s values on both.
    from vllm.engine import arg_utils

    platform = arg_utils.current_platform
    monkeypatch.setattr(platform, "is_cpu", lambda: False)
    monkeypatch.setattr(platform, "is_tpu", lambda: False)
    context = seen["context"]
    for name, gib, expected in (("NVIDIA A100-SXM4-80GB", 80, (256, 2048)), ("NVIDIA H100 80GB HBM3", 80, (1024, 8192))):
        monkeypatch.setattr(platform, "get_device_name", lambda device_id=0, name=name: name)
        monkeypatch.setattr(platform, "get_device_total_memory", lambda device_id=0, gib=gib: gib << 30)
        batched, seqs = AsyncEngineArgs.get_batch_defaults(1)
        got = (seqs.get(context, SchedulerConfig.DEFAULT_MAX_NUM_SEQS),
               batched.get(context, SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS))
        assert got == expected, name
    # The simulator's engine defaults are the A100's (`experiments.yaml`).
    assert (EngineConfig().max_num_seqs, EngineConfig().max_num_batched_tokens) == (256, 2048)


def test_an_interrupted_replay_keeps_the_programs_that_finished(tmp_path):
    """Ctrl-C cancels the replay: the finished programs are written, marked interrupted, not lost."""
    early, late = _chain(), Program("q", 3600.0, "sharegpt", (Call("z", (), 30, 2),))
    trace = tmp_path / "t.jsonl"
    save([early, late], trace)
    out = tmp_path / "out"
    settings = ReplaySettings(trace=str(trace), target="fake", policy="fcfs", out=str(out))

    target = FakeTarget()

    async def go():
        task = asyncio.ensure_future(replay_mod.replay([early, late], target, settings))
        for _ in range(1000):  # until p's second call is sent (however slow the machine); q arrives in an hour
            if len(target.sent) == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # its answer takes 0.02 s
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())
    assert [p.program_id for p in read_programs_csv(out / "programs.csv")] == ["p"]
    assert len(read_calls_csv(out / "calls.csv")) == 2
    meta = json.loads((out / "replay.json").read_text())
    assert meta["interrupted"] is True
    assert (meta["programs"], meta["finished_programs"]) == (2, 1)  # engine validate checks programs.csv by it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policies"]["fcfs"]["stats"]["unfinished_programs"] == 1.0


def test_a_request_timeout_says_which_limit_was_hit():
    from aiohttp import web

    from engine.replay_targets import HTTPTarget, ReplayError

    async def stall(request):
        await asyncio.sleep(1)  # past the 0.2 s limit; cleanup waits for it
        return web.Response()

    async def go():
        server = await start_app({("POST", "/v1/completions"): stall})
        try:
            async with HTTPTarget(server.url, model="m", request_timeout=0.2) as target:
                with pytest.raises(ReplayError) as info:
                    await target.send([1], 1, "p", "c0", Clock(asyncio.get_running_loop().time()))
                return str(info.value)
        finally:
            await server.stop()

    assert run(go()) == "program p call c0: no whole answer within --request-timeout 0.2 s"


def test_cli_names_a_missing_trace_as_the_other_commands_do(tmp_path):
    """It printed Python's "[Errno 2] No such file or directory: 'nope.jsonl'"."""
    proc = subprocess.run([sys.executable, "-m", "engine", "replay", "nope.jsonl", "--target", "http://127.0.0.1:9",
                           "--policy", "plas"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and proc.stderr == "python -m engine replay: error: nope.jsonl: no such file\n"


def test_end_program_outcomes_by_what_the_server_answers():
    """DELETE /v1/programs/ID: the gateway's 200 ends it, its 404 ``program_not_found`` means the
    table had already expired it, any other 404/405 is a server without program routes (a bare
    engine); anything else is a failure with the server's words."""
    from aiohttp import web

    from engine.replay_targets import NOT_HELD, ENDED, NO_TABLE, HTTPTarget, ReplayError

    seen = []

    async def delete(request):
        pid = request.match_info["pid"]
        seen.append(pid)
        if pid == "gone":
            return web.json_response({"error": {"message": "unknown program 'gone'", "code": "program_not_found"}},
                                     status=404)
        if pid == "busy":
            return web.json_response({"error": {"message": "still has live calls", "code": "program_busy"}},
                                     status=409)
        return web.json_response({"id": pid, "deleted": True})

    async def go():
        gw = await start_app({("DELETE", "/v1/programs/{pid}"): delete})
        bare = await start_app({("GET", "/v1/programs/{pid}"): delete})  # DELETE there: 405
        empty = await start_app({})  # 404
        try:
            out = {}
            async with HTTPTarget(gw.url, model="m") as t:
                out["ok"], out["gone"] = await t.end_program("p.1"), await t.end_program("gone")
                with pytest.raises(ReplayError, match=r"program busy: DELETE /v1/programs: HTTP 409: .*live calls"):
                    await t.end_program("busy")
            for name, srv in (("405", bare), ("404", empty)):
                async with HTTPTarget(srv.url, model="m") as t:
                    out[name] = await t.end_program("p")
            await empty.stop()
            async with HTTPTarget(empty.url, model="m") as t:  # nothing listens there now
                with pytest.raises(ReplayError, match=r"program p: DELETE /v1/programs: ClientConnectorError"):
                    await t.end_program("p")
            return out
        finally:
            await gw.stop()
            await bare.stop()

    out = run(go())
    assert out == {"ok": ENDED, "gone": NOT_HELD, "405": NO_TABLE, "404": NO_TABLE}
    assert seen == ["p.1", "gone", "busy"]


def test_replayer_ends_each_program_once_after_all_its_calls(tmp_path):
    """Every program, finished or not, is ended once, after its last call; a failed end is
    counted with its reason and leaves the results alone."""
    from engine.replay_targets import ReplayError

    class Ending(FakeTarget):
        def __init__(self):
            super().__init__()
            self.ended = []

        async def end_program(self, program_id):
            # Every call of the program has been answered by now.
            assert {t for p, t, *_ in self.sent if p == program_id} == {"a", "b"}
            self.ended.append(program_id)
            if program_id == "q":
                raise ReplayError("program q: DELETE /v1/programs: HTTP 500: boom")
            return "ended"

    target = Ending()

    async def go(end):
        r = Replayer([_chain(), dataclasses.replace(_chain(), id="q")], target, "fcfs", end_programs=end)
        return r, await r.run()

    r, wall = run(go(True))
    assert sorted(target.ended) == ["p", "q"]
    assert r.program_ends == {"ended": 1, "failed": 1}
    assert r.program_end_errors == ["program q: DELETE /v1/programs: HTTP 500: boom"]
    assert len(r.records) == 4 and len(r.program_records) == 2 and r.errors == []
    trace = tmp_path / "t.jsonl"
    save(list(r.programs), trace)
    write_outputs(r, ReplaySettings(trace=str(trace), target="fake", policy="fcfs", out=str(tmp_path / "o")), wall)
    meta = json.loads((tmp_path / "o" / "replay.json").read_text())
    assert meta["program_ends"] == {"ended": 1, "failed": 1} and meta["program_end_errors"][0].endswith("boom")

    target.ended.clear()
    r, _ = run(go(False))
    assert target.ended == [] and r.program_ends == {}


def test_end_program_reads_the_real_gateways_answers():
    """The gateway's own 404 for a program it no longer holds reads as expired, not as a bare engine."""
    from engine.replay_targets import ENDED, NOT_HELD, HTTPTarget, Clock
    from test_serve_helpers import start_gw

    async def go():
        server, _ = await start_engine(step=0.001)
        gw, gateway = await start_gw([server.url])
        try:
            async with HTTPTarget(gw.url) as t:
                await t.send([1, 2, 3], 2, "p", "a", Clock(asyncio.get_running_loop().time()))
                held = [p["id"] for p in gateway.snapshot()["programs"]]
                return held, await t.end_program("p"), await t.end_program("p"), gateway.snapshot()["programs"]
        finally:
            await gw.stop()
            await server.stop()

    held, first, second, after = run(go())
    assert (held, first, second, after) == (["p"], ENDED, NOT_HELD, [])


@pytest.mark.parametrize("blank", ["", " "])
def test_cli_refuses_a_blank_model_name(tmp_path, blank):
    """--model '' sent every call the model "" instead of learning the server's name."""
    good = tmp_path / "good.jsonl"
    save([Program("p", 0.0, "x", (Call("a", (), 10, 3),))], good)
    proc = subprocess.run([sys.executable, "-m", "engine", "replay", str(good), "--target", "http://127.0.0.1:9",
                           "--policy", "plas", "--model", blank, "--out", str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"python -m engine replay: error: argument --model: expected a non-empty name, got {blank!r}")
    assert not (tmp_path / "o").exists()


def test_latency_labels_name_every_kind_validate_compares():
    """A label of each simulated kind (and a real engine's) is taken; validate compares sim.latency.KINDS."""
    from sim.latency import KINDS

    assert set(KINDS) <= set(replay_mod.LATENCY_KINDS)
    for label in ("constant", "constant:0.005", "roofline", "fitted:a100-llama-3.1-8b", "real:a100"):
        assert replay_mod.latency_label_problem(label) is None, label


def test_model_name_discovery_says_why_it_failed():
    """It said "cannot learn the model name ('data')" for a 404 (a KeyError shown as the reason), and
    "cannot learn the model name ()" for a timeout."""
    from aiohttp import web

    from engine.replay_targets import HTTPTarget, ReplayError

    async def slow(request):
        await asyncio.sleep(1)
        return web.json_response({"data": [{"id": "m"}]})

    answers = {
        "/missing": lambda r: web.json_response({"detail": "Not Found"}, status=404),
        "/empty": lambda r: web.json_response({"object": "list", "data": []}),
        "/other": lambda r: web.json_response({"models": ["m"]}),
        "/text": lambda r: web.Response(text="hello"),
        "/good": lambda r: web.json_response({"data": [{"id": "m"}]}),
    }

    async def handler(request):
        return answers[request.path.removesuffix("/v1/models")](request)

    async def learn(url, timeout=None):
        try:
            async with HTTPTarget(url, request_timeout=timeout) as target:
                return target.model
        except ReplayError as exc:
            return str(exc)

    async def go():
        server = await start_app({**{("GET", f"{p}/v1/models"): handler for p in answers},
                                  ("GET", "/slow/v1/models"): slow})
        try:
            return {p: await learn(server.url + p) for p in answers} | {
                "/slow": await learn(server.url + "/slow", 0.2)}, server.url
        finally:
            await server.stop()

    got, url = run(go())
    why = {p: got[p].removeprefix(f"{url}{p}/v1/models: cannot learn the model name (").removesuffix("); pass --model")
           for p in got if p != "/good"}
    assert got["/good"] == "m"
    # aiohttp's certificate and URL errors are ValueErrors too: named as themselves, not "not JSON".
    assert run(learn("http://127.0.0.1:99999")) == ("http://127.0.0.1:99999/v1/models: cannot learn the model name "
                                                    "(InvalidUrlClientError: http://127.0.0.1:99999/v1/models); pass --model")
    assert why == {"/missing": 'HTTP 404: {"detail": "Not Found"}',
                   "/empty": "the server lists no model",
                   "/other": "the answer has no 'data' list (expected OpenAI's model list)",
                   "/text": "the answer is not JSON (expected OpenAI's model list)",
                   "/slow": "no whole answer within --request-timeout 0.2 s"}


@pytest.mark.parametrize("target, base", [("http://127.0.0.1:18100/v1", "http://127.0.0.1:18100"),
                                          ("http://h:1/v1/", "http://h:1"),
                                          ("http://h:1/sim/v1/completions", "http://h:1/sim"),
                                          ("http://h:1/v1/programs/p0", "http://h:1")])
def test_cli_refuses_a_target_with_the_api_path(tmp_path, target, base):
    """/v1 was appended again: /v1/v1/models, a 404 reported as "cannot learn the model name ('data')"."""
    good = tmp_path / "good.jsonl"
    save([Program("p", 0.0, "x", (Call("a", (), 10, 3),))], good)
    proc = subprocess.run([sys.executable, "-m", "engine", "replay", str(good), "--target", target, "--policy", "plas",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr == (f"python -m engine replay: error: --target {target}: the replay appends /v1/... to it "
                           f"itself; expected the server's base URL, without /v1 (here {base})\n")


def test_a_target_behind_a_path_prefix_is_a_base_url():
    import urllib.parse

    assert replay_mod.target_path_problem(urllib.parse.urlsplit("http://h:1/sim")) is None
    # A proxy's own v1 segment is no API path: only /v1 last, or /v1/ and a route the replay appends.
    assert replay_mod.target_path_problem(urllib.parse.urlsplit("http://h:1/v1/proxy/engine0")) is None
    assert "(here http://h:1/v1/proxy)" in replay_mod.target_path_problem(
        urllib.parse.urlsplit("http://h:1/v1/proxy/v1/models"))
    assert replay_mod.target_path_problem(urllib.parse.urlsplit("http://h:1/")) is None
    assert replay_mod.target_path_problem(urllib.parse.urlsplit("http://h:1/?x=1")) == (
        "a base URL takes no ?query or #fragment, as the replay appends /v1/... to it")
