"""Engines that stop answering without refusing connections: the gateway's /health checks find them.

A stopped engine process or a hung host still accepts TCP connections (the
kernel completes them), so its calls hung until each client gave up. The
gateway polls every engine's ``GET /health``; after ``health_failures``
failed checks in a row the engine is lost: left out of the balance, and its
calls fail over (nothing relayed yet) or fail with ``engine_lost``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from engine.gateway import GatewayConfig
from engine.sse import DONE, SSEParser, event_token_count
from sim.realtime import RealtimeEngine
from sim.serve import SimServer, serve
from test_serve_helpers import Running, _url, engine_config, run, start_app, start_gw, wait_for

TOKEN = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
         "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None, "token_ids": [7]}],
         "engine_stats": {"service": 0.5}}  # a gateway that took the call as complete would charge it
ANSWER = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
          "choices": [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": "length"}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
FAST = {"health_interval": 0.05, "health_timeout": 0.05, "health_failures": 2}  # lost within about 0.15 s


class FakeEngine:
    """An engine that answers, or freezes: its handlers then wait until the test thaws it.

    ``freeze_after``: ``None`` answers whole; ``"headers"`` freezes once a call's answer has begun (a
    non-streamed body cut short, or a stream's headers sent, as vLLM sends them on accepting a call);
    ``"token"`` streams one token, then freezes; ``"die"`` sends a stream's headers, then cuts the
    connection; ``"end"`` sends them, then ends the stream cleanly without a byte.
    """

    def __init__(self, health_status: int = 200, freeze_after: str | None = None):
        self.frozen = False
        self.health_status = health_status
        self.freeze_after = freeze_after
        self.calls = 0
        self.thaw = asyncio.Event()  # set at teardown, so no handler outlives the test
        self.running: Running | None = None

    async def _hang(self) -> None:
        await self.thaw.wait()

    async def health(self, request: web.Request) -> web.Response:
        if self.frozen:
            await self._hang()
        return web.Response(status=self.health_status)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls += 1
        if self.frozen:
            await self._hang()
        if self.freeze_after is None:
            return web.json_response(ANSWER)
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            if self.freeze_after == "die":
                await asyncio.sleep(0.05)
                request.transport.abort()
                return resp
            if self.freeze_after == "end":
                await resp.write_eof()
                return resp
            if self.freeze_after == "token":
                await resp.write(b"data: " + json.dumps(TOKEN).encode() + b"\n\n")
        else:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(b'{"id": "c", ')
        self.frozen = True
        await self._hang()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        if self.frozen:
            await self._hang()
        return web.json_response({"object": "list", "data": [{"id": "fake"}]})

    async def start(self, with_health: bool = True) -> str:
        routes = {("POST", "/v1/completions"): self.completions, ("GET", "/v1/models"): self.models}
        if with_health:
            routes[("GET", "/health")] = self.health
        self.running = await start_app(routes)
        return self.running.url

    async def stop(self) -> None:
        self.thaw.set()
        if self.running is not None:
            await self.running.stop()


async def _post(session: aiohttp.ClientSession, url: str, program: str, stream: bool = False):
    body = {"prompt": [1, 2, 3], "max_tokens": 2, "stream": stream}  # no model: any engine's own
    async with session.post(url + "/v1/completions", json=body, headers={"X-Program-Id": program}) as r:
        if stream:
            parser = SSEParser()
            events: list = []
            async for chunk in r.content.iter_any():
                events += parser.feed(chunk)
            return r.status, r.headers.get("X-Gateway-Engine"), events
        return r.status, r.headers.get("X-Gateway-Engine"), await r.json()


def test_a_call_held_by_a_frozen_engine_goes_to_another_and_the_engine_is_left_out():
    async def go():
        frozen, live = FakeEngine(), FakeEngine()
        frozen.frozen = True
        urls = [await frozen.start(), await live.start()]
        gw, gateway = await start_gw(urls, balancer="round_robin", **FAST)
        try:
            async with aiohttp.ClientSession() as s:
                first = await _post(s, gw.url, "p0")  # round robin sends it to engine 0 first
                rest = [await _post(s, gw.url, f"p{i}") for i in range(1, 5)]
            return first, rest, gateway.snapshot(), list(gateway.routed), frozen.calls, gateway.acct.live_calls()
        finally:
            await gw.stop()
            await frozen.stop()
            await live.stop()

    first, rest, snapshot, routed, frozen_calls, live_calls = run(go())
    assert first[:2] == (200, "1") and first[2]["choices"][0]["text"] == "ab"
    assert [r[:2] for r in rest] == [(200, "1")] * 4  # left out while lost
    assert routed == [1, 5] and frozen_calls == 1
    engine0 = snapshot["engines"][0]
    assert engine0["lost"] is True and engine0["health_failures"] >= 2 and engine0["in_flight"] == 0
    assert snapshot["engines"][1]["lost"] is False and live_calls == 0
    # The program is charged once, for the answer it got.
    assert [p["total_service"] > 0 for p in snapshot["programs"] if p["id"] == "p0"] == [True]


def test_a_stream_whose_engine_freezes_ends_with_an_engine_lost_event_and_is_not_charged():
    async def go():
        eng = FakeEngine(freeze_after="token")
        gw, gateway = await start_gw([await eng.start()], **FAST)
        try:
            async with aiohttp.ClientSession() as s:
                status, engine, events = await _post(s, gw.url, "p1", stream=True)
            settled = await wait_for(lambda: gateway.acct.live_calls() == 0)
            return status, events, settled, gateway.acct.table.get("p1"), gateway.snapshot()
        finally:
            await gw.stop()
            await eng.stop()

    status, events, settled, program, snapshot = run(go())
    assert status == 200 and events[0]["choices"][0]["token_ids"] == [7]
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and events[-1] == DONE, events
    error = errors[0]["error"]
    assert error["code"] == "engine_lost"
    assert error["message"].startswith("engine 0 (http://127.0.0.1:") and "lost: /health did not answer within " \
        "0.05 s, 2 checks in a row" in error["message"]
    assert settled and (program is None or program.total_service == 0.0)
    assert snapshot["engines"][0]["lost"] is True and snapshot["engines"][0]["in_flight"] == 0


def test_a_stream_accepted_by_a_frozen_engine_goes_to_another_before_its_first_token():
    """vLLM sends a stream's 200 headers as it accepts the call; the client's wait for them until the
    first bytes, so a call queued on an engine that then freezes has shown its client nothing."""

    async def go():
        eng, spare = FakeEngine(freeze_after="headers"), FakeEngine()
        cfg = engine_config(step=0.001)
        engine = RealtimeEngine(cfg, "plas", 1)
        runner = await serve(SimServer(engine, "sim"), "127.0.0.1", 0)
        live = Running(runner, _url(runner))
        gw, gateway = await start_gw([await eng.start(), live.url], balancer="round_robin", **FAST)
        try:
            async with aiohttp.ClientSession() as s:
                status, served_by, events = await _post(s, gw.url, "p1", stream=True)
            return status, served_by, events, eng.calls, gateway.snapshot(), gateway.acct.table.get("p1")
        finally:
            await gw.stop()
            await eng.stop()
            await live.stop()
            await spare.stop()

    status, served_by, events, frozen_calls, snapshot, program = run(go())
    assert status == 200 and served_by == "1" and frozen_calls == 1
    assert events[-1] == DONE and not [e for e in events if isinstance(e, dict) and "error" in e]
    assert sum(event_token_count(e) for e in events if isinstance(e, dict)) == 2
    assert snapshot["engines"][0]["lost"] is True and program.total_service > 0


@pytest.mark.parametrize("mode,words", [("die", "failed before its stream began: "),
                                        ("end", "ended its stream before sending anything")])
def test_a_stream_cut_before_its_first_bytes_is_a_502_not_an_empty_stream(mode, words):
    async def go():
        eng = FakeEngine(freeze_after=mode)
        gw, gateway = await start_gw([await eng.start()], **FAST)
        try:
            async with aiohttp.ClientSession() as s:
                body = {"prompt": [1, 2], "max_tokens": 2, "stream": True}
                async with s.post(gw.url + "/v1/completions", json=body, headers={"X-Program-Id": "p1"}) as r:
                    answer = r.status, r.headers.get("Content-Type"), await r.json()
            return answer, gateway.acct.live_calls(), list(gateway.loads)
        finally:
            await gw.stop()
            await eng.stop()

    (status, ctype, body), live_calls, loads = run(go())
    assert status == 502 and ctype.startswith("application/json")
    assert body["error"]["code"] == "engine_failed"
    assert words in body["error"]["message"]
    assert live_calls == 0 and loads == [0]


def test_a_whole_answer_cut_short_by_a_frozen_engine_is_a_502_engine_lost():
    async def go():
        eng, spare = FakeEngine(freeze_after="headers"), FakeEngine()
        urls = [await eng.start(), await spare.start()]
        gw, gateway = await start_gw(urls, balancer="round_robin", **FAST)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(gw.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2},
                                  headers={"X-Program-Id": "p1"}) as r:
                    answer = r.status, r.headers.get("X-Gateway-Engine"), await r.json()
            return answer, spare.calls, gateway.acct.table.get("p1"), gateway.acct.live_calls()
        finally:
            await gw.stop()
            await eng.stop()
            await spare.stop()

    (status, engine, body), spare_calls, program, live_calls = run(go())
    # Its answer had begun, so it is not sent again: the engine may have done the work.
    assert status == 502 and engine == "0" and spare_calls == 0
    assert body["error"]["code"] == "engine_lost" and "lost: /health did not answer" in body["error"]["message"]
    assert live_calls == 0 and (program is None or program.total_service == 0.0)


def test_calls_queued_in_a_healthy_engine_longer_than_the_checks_are_not_lost():
    """The reason there is no per-call silence timeout: PLAS holds calls back by design."""

    async def go():
        cfg = engine_config(step=0.02, max_num_seqs=1)  # one call at a time: the others queue
        engine = RealtimeEngine(cfg, "plas", 0)
        runner = await serve(SimServer(engine, "sim"), "127.0.0.1", 0)
        eng = Running(runner, _url(runner))
        gw, gateway = await start_gw([eng.url], **FAST)
        try:
            async with aiohttp.ClientSession() as s:
                async def one(i: int):
                    body = {"prompt": [1, 2, 3], "max_tokens": 12, "stream": i % 2 == 1}
                    async with s.post(gw.url + "/v1/completions", json=body,
                                      headers={"X-Program-Id": f"p{i}"}) as r:
                        await r.read()
                        return r.status

                started = asyncio.get_running_loop().time()
                statuses = await asyncio.gather(*(one(i) for i in range(4)))
                took = asyncio.get_running_loop().time() - started
            return statuses, took, gateway.snapshot()
        finally:
            await gw.stop()
            await eng.stop()

    statuses, took, snapshot = run(go())
    assert statuses == [200] * 4
    assert took > 0.6  # the last call queued for several health intervals (four calls of 13 steps, one at a time)
    assert snapshot["engines"][0]["lost"] is False and snapshot["engines"][0]["health_failures"] == 0


def test_a_lost_engine_is_back_in_the_balance_once_its_health_check_passes():
    async def go():
        eng, other = FakeEngine(), FakeEngine()
        eng.frozen = True
        urls = [await eng.start(), await other.start()]
        gw, gateway = await start_gw(urls, balancer="round_robin", **FAST)
        try:
            lost = await wait_for(lambda: gateway.lost[0])
            eng.frozen = False
            eng.thaw.set()  # the pending check answers at once
            back = await wait_for(lambda: not gateway.lost[0])
            async with aiohttp.ClientSession() as s:
                engines = [(await _post(s, gw.url, f"p{i}"))[1] for i in range(4)]
            return lost, back, engines, gateway.failed_checks[0]
        finally:
            await gw.stop()
            await eng.stop()
            await other.stop()

    lost, back, engines, failures = run(go())
    assert lost and back and failures == 0
    assert sorted(engines) == ["0", "0", "1", "1"]


@pytest.mark.parametrize("status,lost", [(503, True), (500, True), (404, False), (200, False)])
def test_a_5xx_health_answer_is_a_failed_check_and_a_404_an_answer(status, lost):
    """vLLM answers 503 once its engine core is dead; a server without /health is up."""

    async def go():
        eng = FakeEngine(health_status=status)
        gw, gateway = await start_gw([await eng.start(with_health=status != 404)], **FAST)
        try:
            await asyncio.sleep(0.3)  # six checks
            return gateway.lost[0], gateway.snapshot()["engines"][0]["health_failures"]
        finally:
            await gw.stop()
            await eng.stop()

    found, failures = run(go())
    assert found is lost
    assert (failures >= 2) if lost else failures == 0


def test_every_engine_lost_is_one_502_naming_each_instead_of_a_hang():
    async def go():
        a, b = FakeEngine(), FakeEngine()
        a.frozen = b.frozen = True
        urls = [await a.start(), await b.start()]
        gw, gateway = await start_gw(urls, **FAST)
        try:
            await wait_for(lambda: all(gateway.lost))
            async with aiohttp.ClientSession() as s:
                status, _, body = await _post(s, gw.url, "p1")  # tried anyway, failed by the next checks
            return urls, status, body, gateway.acct.live_calls(), list(gateway.loads)
        finally:
            await gw.stop()
            await a.stop()
            await b.stop()

    urls, status, body, live_calls, loads = run(go())
    assert status == 502 and body["error"]["code"] == "engine_unreachable"
    message = body["error"]["message"]
    assert message.startswith("no engine could be reached: ")
    assert all(f"({u}) lost: /health did not answer" in message for u in urls)
    assert live_calls == 0 and loads == [0, 0]


def test_models_are_asked_of_an_engine_that_is_not_lost():
    async def go():
        frozen, live = FakeEngine(), FakeEngine()
        frozen.frozen = True
        gw, gateway = await start_gw([await frozen.start(), await live.start()], **FAST)
        try:
            await wait_for(lambda: gateway.lost[0])
            async with aiohttp.ClientSession() as s:
                async with s.get(gw.url + "/v1/models") as r:
                    models = r.status, await r.json()
                async with s.get(gw.url + "/health") as r:
                    health = await r.json()
            return models, health
        finally:
            await gw.stop()
            await frozen.stop()
            await live.stop()

    (status, models), health = run(go())
    assert status == 200 and models["data"][0]["id"] == "fake"
    assert health == {"status": "ok", "engines": 2, "lost": [0]}


def test_no_checks_with_a_zero_interval():
    async def go():
        eng = FakeEngine()
        eng.frozen = True
        gw, gateway = await start_gw([await eng.start()], health_interval=0, health_timeout=0.05, health_failures=1)
        try:
            await asyncio.sleep(0.2)
            return gateway.lost[0], gateway.failed_checks[0]
        finally:
            await gw.stop()
            await eng.stop()

    assert run(go()) == (False, 0)


@pytest.mark.parametrize("field,value,message", [
    ("health_interval", -1.0, "--health-interval must be >= 0 seconds (0: no checks), got -1.0"),
    ("health_interval", float("inf"), "--health-interval must be >= 0 seconds (0: no checks), got inf"),
    ("health_timeout", 0.0, "--health-timeout must be > 0 seconds, got 0.0"),
    ("health_timeout", float("nan"), "--health-timeout must be > 0 seconds, got nan"),
    ("health_failures", 0, "--health-failures must be >= 1, got 0"),
])
def test_bad_health_settings_are_refused(field, value, message):
    with pytest.raises(ValueError) as info:
        GatewayConfig(engines=["http://127.0.0.1:1"], **{field: value})
    assert str(info.value) == message


def test_the_gateway_cli_refuses_bad_health_settings():
    for args, message in ((["--health-failures", "0"], "--health-failures must be >= 1, got 0"),
                          (["--health-timeout", "0"], "--health-timeout must be > 0 seconds, got 0.0")):
        proc = subprocess.run([sys.executable, "-m", "engine", "gateway", "--engine", "http://x", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and proc.stderr == f"python -m engine gateway: error: {message}\n"
