"""End to end over loopback HTTP: replay -> gateway -> two `sim serve` engines.

Checks locality pinning, that ids arrive at the engines, the results files
(every call once, DAG order), and that a client disconnect aborts the call
on its engine.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import aiohttp
import pytest

from engine.replay import ReplaySettings, replay
from engine.replay_targets import HTTPTarget
from engine.validate import load_replay
from sim.metrics import read_calls_csv, read_programs_csv
from sim.lazy_decode import quantize
from test_serve_helpers import run, start_app, start_engine, start_gw, wait_for
from traces.format import Call, Program, SharedPrefix
from traces.io import load_all, save

THRESHOLD = 64


def small_trace() -> list[Program]:
    """Three programs: a chat chain, a tree with a join, and a single short call."""
    chat = Program("chat", 0.0, "sharegpt", (
        Call("c0", (), 100, 10, shared_prefix=SharedPrefix("sys", 32)),
        Call("c1", ("c0",), 150, 8, delay=0.02, context_of="c0"),
        Call("c2", ("c1",), 190, 5, delay=0.01, context_of="c1"),
    ))
    tree = Program("tree", 0.01, "lats", (
        Call("r", (), 90, 5),
        Call("a", ("r",), 110, 6, context_of="r"),
        Call("b", ("r",), 120, 6, context_of="r"),
        Call("j", ("a", "b"), 140, 4, delay=0.01, context_of="a"),
    ))
    short = Program("short", 0.02, "bfcl", (Call("x", (), 40, 5),))
    return [chat, tree, short]


def test_replay_through_gateway_onto_two_sim_engines(tmp_path):
    trace = tmp_path / "trace.jsonl"
    save(small_trace(), trace)
    out = tmp_path / "out"

    async def go():
        (e0, eng0), (e1, eng1) = await start_engine(0, step=0.005), await start_engine(1, step=0.005)
        gw, gateway = await start_gw([e0.url, e1.url], threshold=THRESHOLD)
        try:
            # Programs kept (not ended) so that the table can be read after the replay.
            settings = ReplaySettings(trace=str(trace), target=gw.url, policy="plas", out=str(out),
                                      latency="constant:0.005", end_programs=False)
            async with HTTPTarget(gw.url) as target:
                summary = await replay(load_all(trace), target, settings)
            async with aiohttp.ClientSession() as s:
                async with s.get(gw.url + "/programs") as r:
                    view = await r.json()
            received = {0: list(eng0.received), 1: list(eng1.received)}
        finally:
            await gw.stop()
            await e0.stop()
            await e1.stop()
        return summary, view, received

    summary, view, received = run(go())
    programs = {p.id: p for p in small_trace()}

    # Every call ran once, on the engine the gateway reports, with its ids.
    calls = read_calls_csv(out / "calls.csv")
    assert sorted((c.program_id, c.call_id) for c in calls) == sorted(
        (p.id, c.id) for p in programs.values() for c in p.calls)
    seen = [(r["program_id"], r["thread_id"], e) for e, rs in received.items() for r in rs]
    assert sorted(seen) == sorted((c.program_id, c.call_id, c.engine) for c in calls)
    for e, rs in received.items():
        for r in rs:
            assert isinstance(r["program_service"], float)  # the gateway sent the program's service
    # Later calls of a chain carry the service their program attained before them (PLAS: a sum).
    chat_services = [r["program_service"] for rs in received.values() for r in rs if r["program_id"] == "chat"]
    assert sorted(chat_services)[0] == 0.0 and sorted(chat_services)[-1] > 0.0

    # Locality: every long call of a program landed on one engine, the program's pinned engine.
    by_program = defaultdict(set)
    for c in calls:
        if c.prompt_tokens > THRESHOLD:
            by_program[c.program_id].add(c.engine)
    assert set(by_program) == {"chat", "tree"}
    pinned = {p["id"]: p["engine"] for p in view["programs"]}
    for pid, engines in by_program.items():
        assert engines == {pinned[pid]}
    # Both engines were used (the two long programs arrived together and spread).
    assert {c.engine for c in calls} == {0, 1}

    # DAG order: a call is sent only after all its parents finished, plus its delay.
    rows = {(c.program_id, c.call_id): c for c in calls}
    for p in programs.values():
        for call in p.calls:
            row = rows[(p.id, call.id)]
            assert row.arrival >= p.arrival
            for parent in call.parents:
                assert row.arrival >= rows[(p.id, parent)].finish + call.delay - 1e-3
            assert row.arrival <= row.first_token <= row.finish

    # Engine-side fields came from the engine: 5 ms steps, no preemption, exact service.
    for c in calls:
        assert c.service >= quantize(0.005) * c.output_tokens - 1e-9  # steps on a 2**-30 s grid
        assert c.waiting >= -1e-9
        assert c.first_scheduled >= c.arrival
    # Continued calls hit the prefix cache on their pinned engine (the context re-sent with real output ids).
    assert rows[("chat", "c1")].prefix_hit_tokens >= 96
    assert rows[("chat", "c2")].prefix_hit_tokens >= 144

    prog_rows = read_programs_csv(out / "programs.csv")
    assert [p.program_id for p in prog_rows] == ["chat", "tree", "short"]
    for pr in prog_rows:
        mine = [c for c in calls if c.program_id == pr.program_id]
        assert pr.calls == len(mine)
        assert pr.finish == max(c.finish for c in mine)
        assert pr.latency == pytest.approx(pr.finish - programs[pr.program_id].arrival)
    pol = summary["policies"]["plas"]
    assert pol["programs"] == 3 and pol["calls"] == 8 and pol["stats"]["failed_calls"] == 0.0

    # The gateway's table is consistent after the run: no live calls; service matches the engine's.
    assert view["live_calls"] == 0
    assert all(e["in_flight"] == 0 for e in view["engines"])
    table = {p["id"]: p for p in view["programs"]}
    assert table["short"]["total_service"] == pytest.approx(rows[("short", "x")].service)
    chat_total = sum(c.service for c in calls if c.program_id == "chat")
    assert table["chat"]["service"] == pytest.approx(chat_total)  # PLAS = sum over a chain

    rep = load_replay(out)
    assert rep.policy == "plas" and rep.trace == str(trace.resolve()) and rep.latency == "constant:0.005"


def test_client_disconnect_aborts_the_call_on_its_engine():
    async def go():
        e0, eng0 = await start_engine(0, step=0.01)
        gw, gateway = await start_gw([e0.url])
        try:
            async with aiohttp.ClientSession() as s:
                r = await s.post(gw.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 1000,
                                                                   "stream": True},
                                 headers={"X-Program-Id": "p1", "X-Thread-Id": "t1"})
                assert r.status == 200
                await r.content.readline()
                running = (eng0.in_flight, gateway.engines[0].load, gateway.acct.live_calls())
                r.close()
                aborted = await wait_for(lambda: eng0.aborted == 1 and eng0.in_flight == 0, timeout=3)
                gw_clean = await wait_for(lambda: gateway.engines[0].load == 0 and gateway.acct.live_calls() == 0,
                                          timeout=3)
                drained = await wait_for(lambda: eng0.replica.load == 0, timeout=3)
                entry = gateway.acct.table.get("p1")
                return running, aborted, gw_clean, drained, eng0.completed, entry.total_service
        finally:
            await gw.stop()
            await e0.stop()

    running, aborted, gw_clean, drained, completed, service = run(go())
    assert running == (1, 1, 1)
    assert aborted and gw_clean and drained
    assert completed == 0
    assert service == 0.0  # an aborted call is not charged


def test_same_thread_twice_is_a_conflict_and_parallel_threads_are_fine():
    async def go():
        e0, eng0 = await start_engine(0, step=0.01)
        gw, gateway = await start_gw([e0.url])
        try:
            async with aiohttp.ClientSession() as s:
                body = {"prompt": [1, 2, 3], "max_tokens": 200}
                hdr = {"X-Program-Id": "p", "X-Thread-Id": "t"}
                first = asyncio.create_task(s.post(gw.url + "/v1/completions", json=body, headers=hdr))
                await wait_for(lambda: gateway.acct.live_calls() == 1, timeout=3)
                async with s.post(gw.url + "/v1/completions", json=body, headers=hdr) as r:
                    dup = (r.status, await r.json())
                async with s.post(gw.url + "/v1/completions", json=body,
                                  headers={"X-Program-Id": "p", "X-Thread-Id": "u"}) as r:
                    other = r.status
                resp = await first
                ok = resp.status
                resp.release()
                return dup, other, ok, gateway.acct.live_calls()
        finally:
            await gw.stop()
            await e0.stop()

    dup, other, ok, live = run(go())
    assert dup[0] == 409 and dup[1]["error"]["code"] == "thread_busy"
    assert other == 200 and ok == 200 and live == 0


def test_a_thread_id_in_the_body_counts_under_a_program_header():
    """X-Program-Id with vllm_xargs.thread_id: the body's thread was ignored, so the same thread ran twice at once."""
    async def go():
        e0, _ = await start_engine(0, step=0.01)
        gw, gateway = await start_gw([e0.url])
        try:
            async with aiohttp.ClientSession() as s:
                body = {"prompt": [1, 2, 3], "max_tokens": 200, "vllm_xargs": {"thread_id": "t"}}
                hdr = {"X-Program-Id": "p"}
                first = asyncio.create_task(s.post(gw.url + "/v1/completions", json=body, headers=hdr))
                await wait_for(lambda: gateway.acct.live_calls() == 1, timeout=3)
                async with s.post(gw.url + "/v1/completions", json=body, headers=hdr) as r:
                    dup = (r.status, await r.json())
                resp = await first
                resp.release()
                return dup, [(c["program_id"], c["thread_id"]) for c in gateway.recent]
        finally:
            await gw.stop()
            await e0.stop()

    dup, recent = run(go())
    assert dup[0] == 409 and dup[1]["error"]["code"] == "thread_busy", dup
    assert recent == [("p", "t")]


def test_whole_and_chat_responses_through_the_gateway_charge_the_engines_service():
    async def go():
        e0, eng0 = await start_engine(0, step=0.005)
        gw, gateway = await start_gw([e0.url], policy="plas")
        try:
            async with aiohttp.ClientSession() as s:
                hdr = {"X-Program-Id": "p", "X-Thread-Id": "t", "Authorization": "Bearer k"}
                async with s.post(gw.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 6},
                                  headers=hdr) as r:
                    whole = (r.status, r.headers.get("X-Gateway-Engine"), await r.json())
                async with s.post(gw.url + "/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                                        "stream": True}, headers=hdr) as r:
                    chat = (r.status, (await r.read()).decode())
                entry = gateway.acct.table.get("p")
                received = list(eng0.received)
        finally:
            await gw.stop()
            await e0.stop()
        return whole, chat, entry.service, received

    whole, chat, service, received = run(go())
    assert whole[0] == 200 and whole[1] == "0"
    assert whole[2]["choices"][0]["text"] == " tok" * 6
    assert chat[0] == 200 and chat[1].count('"content":" tok"') == 4 and chat[1].endswith("data: [DONE]\n\n")
    # PLAS at the gateway: the engine-reported service of both calls, 6 + 4 steps of 5 ms.
    assert service == pytest.approx(10 * 0.005)
    assert [r["program_service"] for r in received] == [0.0, pytest.approx(6 * 0.005)]


def test_against_an_engine_without_engine_stats_the_gateway_measures_service_itself():
    """A vLLM-like engine (no engine_stats): service = first-to-last token of a stream, or send-to-answer."""
    from aiohttp import web

    seen = []

    async def completions(request):
        body = await request.json()
        seen.append((dict(request.headers), body))
        if not body.get("stream"):
            await asyncio.sleep(0.05)
            return web.json_response({"choices": [{"index": 0, "text": "x"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            if i:
                await asyncio.sleep(0.03)
            await resp.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def go():
        fake = await start_app({("POST", "/v1/completions"): completions})
        gw, gateway = await start_gw([fake.url], policy="plas")
        try:
            async with aiohttp.ClientSession() as s:
                hdr = {"X-Program-Id": "p", "X-Thread-Id": "t", "Authorization": "Bearer secret"}
                async with s.post(gw.url + "/v1/completions", json={"prompt": [1]}, headers=hdr) as r:
                    assert r.status == 200
                whole = gateway.acct.table.get("p").service
                async with s.post(gw.url + "/v1/completions", json={"prompt": [1], "stream": True},
                                  headers=hdr) as r:
                    text = await r.text()
                streamed = gateway.acct.table.get("p").service - whole
        finally:
            await gw.stop()
            await fake.stop()
        return whole, streamed, text

    whole, streamed, text = run(go())
    assert 0.05 <= whole < 1.0  # send to answer
    assert 0.06 <= streamed < 1.0  # first to last of three tokens 30 ms apart
    assert text.count("data:") == 4  # passed through unchanged
    headers, body = seen[0]
    assert headers["Authorization"] == "Bearer secret"
    assert headers["X-Program-Id"] == "p" and headers["X-Thread-Id"] == "t"
    assert body["vllm_xargs"] == {"program_id": "p", "thread_id": "t", "program_service": 0.0,
                                  "program_total_service": 0.0}
    assert seen[1][1]["vllm_xargs"]["program_service"] == pytest.approx(whole)


def test_an_x_kv_ttl_header_pins_the_calls_kv_on_its_engine_until_the_next_call_takes_it_up():
    async def go():
        e0, eng0 = await start_engine(0, step=0.002)
        gw, gateway = await start_gw([e0.url])
        try:
            async with aiohttp.ClientSession() as s:
                hdr = {"X-Program-Id": "p", "X-Thread-Id": "t1", "X-KV-TTL": "30"}
                prompt = list(range(100, 164))
                async with s.post(gw.url + "/v1/completions",
                                  json={"prompt": prompt, "max_tokens": 16, "return_token_ids": True},
                                  headers=hdr) as r:
                    first = await r.json()
                held_after_first = len(eng0.replica.kv_pins)
                again = prompt + first["choices"][0]["token_ids"] + list(range(500, 510))
                async with s.post(gw.url + "/v1/completions", json={"prompt": again, "max_tokens": 2},
                                  headers={"X-Program-Id": "p", "X-Thread-Id": "t2"}) as r:
                    second = await r.json()
            return held_after_first, eng0.snapshot(), second
        finally:
            await gw.stop()
            await e0.stop()

    held_after_first, snap, second = run(go())
    assert held_after_first == 1
    assert (snap["kv_pins"], snap["kv_pins_held"]) == (1, 0)  # the second call took the pin up
    # 64 + 16 tokens re-sent, the KV of 79 computed: 4 full blocks hit.
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 64


def test_under_atlas_the_engines_get_the_critical_path_and_the_total_apart():
    """Two parallel calls of 50 ms each: ATLAS's priority is the critical path (about 50 ms),
    T_program of the starvation ratio the sum (about 100 ms). The gateway sent only the first,
    and the engines took it for both."""
    from aiohttp import web

    seen = []

    async def completions(request):
        seen.append((await request.json())["vllm_xargs"])
        await asyncio.sleep(0.05)
        return web.json_response({"choices": [{"index": 0, "text": "x"}]})

    async def go():
        fake = await start_app({("POST", "/v1/completions"): completions})
        gw, _ = await start_gw([fake.url], policy="atlas")
        try:
            async with aiohttp.ClientSession() as s:
                async def call(thread):
                    hdr = {"X-Program-Id": "p", "X-Thread-Id": thread}
                    async with s.post(gw.url + "/v1/completions", json={"prompt": [1]}, headers=hdr) as r:
                        assert r.status == 200

                await asyncio.gather(call("a"), call("b"))
                await call("j")
        finally:
            await gw.stop()
            await fake.stop()

    run(go())
    assert sorted((x["thread_id"], x["program_service"], x["program_total_service"]) for x in seen[:2]) == \
        [("a", 0.0, 0.0), ("b", 0.0, 0.0)]
    join = seen[2]
    assert join["thread_id"] == "j"
    assert 0.05 <= join["program_service"] < 0.5
    assert join["program_total_service"] >= 2 * 0.05 and join["program_total_service"] > 1.5 * join["program_service"]
