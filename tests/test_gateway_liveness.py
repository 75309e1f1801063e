"""Engines that stop answering without refusing connections: the gateway's /health checks find them.

A stopped engine process or a hung host still accepts TCP connections (the
kernel completes them), so its calls hung until each client gave up. The
gateway polls every engine's ``GET /health``; after ``health_failures``
failed checks in a row the engine is lost: left out of the balance, and its
calls fail over (nothing relayed yet) or fail with ``engine_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from engine.gateway import GatewayConfig
from engine.liveness import progress_samples
from engine.protocol import GATEWAY_ENGINE_HEADER
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
        self.calls = 0  # calls the gateway forwarded (with vllm_xargs)
        self.probes: list[dict] = []  # the bodies of the gateway's own probe completions (without)
        self.thaw = asyncio.Event()  # set at teardown, so no handler outlives the test
        self.running: Running | None = None

    async def _hang(self) -> None:
        await self.thaw.wait()

    async def health(self, request: web.Request) -> web.Response:
        if self.frozen:
            await self._hang()
        return web.Response(status=self.health_status)

    def _count(self, body: dict) -> None:
        if "vllm_xargs" in body:
            self.calls += 1
        else:
            self.probes.append(body)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self._count(body)
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


async def _post(session: aiohttp.ClientSession, url: str, program: str, stream: bool = False,
                model: str | None = None):
    body = {"prompt": [1, 2, 3], "max_tokens": 2, "stream": stream}  # no model: any engine's own
    if model is not None:
        body["model"] = model
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
            return (first, rest, gateway.snapshot(), [e.routed for e in gateway.engines], frozen.calls,
                    gateway.acct.live_calls())
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
            return answer, gateway.acct.live_calls(), [e.load for e in gateway.engines]
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
            lost = await wait_for(lambda: gateway.engines[0].lost)
            eng.frozen = False
            eng.thaw.set()  # the pending check answers at once
            back = await wait_for(lambda: not gateway.engines[0].lost)
            async with aiohttp.ClientSession() as s:
                engines = [(await _post(s, gw.url, f"p{i}"))[1] for i in range(4)]
            return lost, back, engines, gateway.engines[0].failed_checks
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
            return gateway.engines[0].lost, gateway.snapshot()["engines"][0]["health_failures"]
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
            await wait_for(lambda: all(e.lost for e in gateway.engines))
            async with aiohttp.ClientSession() as s:
                status, _, body = await _post(s, gw.url, "p1")  # tried anyway, failed by the next checks
            return urls, status, body, gateway.acct.live_calls(), [e.load for e in gateway.engines]
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
            await wait_for(lambda: gateway.engines[0].lost)
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
    assert health == {"status": "ok", "engines": 2, "lost": [0], "stalled": []}


def test_no_checks_with_a_zero_interval():
    async def go():
        eng = FakeEngine()
        eng.frozen = True
        gw, gateway = await start_gw([await eng.start()], health_interval=0, health_timeout=0.05, health_failures=1)
        try:
            await asyncio.sleep(0.2)
            return gateway.engines[0].lost, gateway.engines[0].failed_checks
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


# -- hung engine cores: the stall check on /metrics ------------------------------------------------------

# vLLM 0.26.0's /metrics, cut down: what prometheus_client writes for `PrometheusStatLogger`'s metrics
# (vllm/v1/metrics/loggers.py), two engine cores of one server. STEPS is engine 0's step count.
METRICS = """\
# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{engine="0",le="1.0",model_name="m"} STEPS
vllm:iteration_tokens_total_bucket{engine="0",le="+Inf",model_name="m"} STEPS
vllm:iteration_tokens_total_count{engine="0",model_name="m"} STEPS
vllm:iteration_tokens_total_sum{engine="0",model_name="m"} 40.0
vllm:iteration_tokens_total_count{engine="1",model_name="m"} 4.0
# HELP vllm:iteration_tokens_total_created Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total_created gauge
vllm:iteration_tokens_total_created{engine="0",model_name="m"} 1.7e+09
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 30.0
vllm:generation_tokens_total{engine="0",model_name="m"} 12.0
vllm:num_requests_running{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
"""
STALL = {**FAST, "stall_timeout": 0.3}  # a stall found 0.3 s into a window, lost one check later
# For tests that expect no failed check: a loaded machine may take over 50 ms to answer /health.
STALL_SLACK = {**STALL, "health_timeout": 0.5}
# A stall's problem, as the lost engine's calls report it: its numbers, then how many calls were in flight.
STALL_PROBLEM = r"no engine step in \d+\.\d s \(\d+\.\d s of it waiting on the engine\) with (\d+|no) calls? in " \
                r"flight \(/metrics progress frozen\)"


class SteppingEngine(FakeEngine):
    """A FakeEngine with vLLM's ``/metrics``: each scrape sees one more step while ``stepping``; frozen otherwise
    (a hung engine core behind a live API server: /health answers 200 even while its calls freeze).

    ``metrics``: ``"ok"``; ``"404"`` (no route); ``"absent"`` (no vLLM samples, as ``--disable-log-stats``);
    ``"malformed"``; ``"500"``; ``"hang"``. With ``hold``, calls send nothing until ``release`` is set. With
    ``step_on_call``, each answered call is one more step, as in vLLM, whose idle core steps for nothing.
    """

    def __init__(self, metrics: str = "ok", stepping: bool = False, hold: bool = False, step_on_call: bool = False,
                 **kw):
        super().__init__(**kw)
        self.metrics_mode = metrics
        self.stepping = stepping
        self.hold = hold
        self.step_on_call = step_on_call
        self.steps = 7
        self.release = asyncio.Event()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status)  # the API server answers, whatever the engine core does

    async def metrics(self, request: web.Request) -> web.Response:
        if self.metrics_mode == "hang":
            await self._hang()
        if self.metrics_mode == "500":
            return web.Response(status=500)
        if self.stepping:
            self.steps += 1
        text = {"absent": "# TYPE http_requests_total counter\nhttp_requests_total 3.0\n",
                "malformed": 'vllm:generation_tokens_total{engine="0" 5.0\n'}.get(
            self.metrics_mode, METRICS.replace("STEPS", f"{self.steps:.1f}"))
        return web.Response(text=text, content_type="text/plain")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if not self.hold:
            resp = await super().completions(request)
        else:
            self._count(await request.json())
            await self.release.wait()
            resp = web.json_response(ANSWER)
        if self.step_on_call:
            self.steps += 1
        return resp

    async def start(self, with_health: bool = True) -> str:
        routes = {("POST", "/v1/completions"): self.completions, ("GET", "/v1/models"): self.models,
                  ("GET", "/health"): self.health}
        if self.metrics_mode != "404":
            routes[("GET", "/metrics")] = self.metrics
        self.running = await start_app(routes)
        return self.running.url

    async def stop(self) -> None:
        self.release.set()
        await super().stop()


async def _hold_calls(eng, url: str, gateway, seconds: float, n: int = 1):
    """Post ``n`` calls the engine holds, read engine 0's snapshot after ``seconds``, then release them.

    Returns each answer's (status, engine) and the snapshot taken while they were held.
    """
    async with aiohttp.ClientSession() as s:
        calls = [asyncio.ensure_future(_post(s, url, f"p{i}")) for i in range(n)]
        await asyncio.sleep(seconds)
        during = gateway.snapshot()["engines"][0]
        eng.release.set()
        answers = await asyncio.gather(*calls)
    return [a[:2] for a in answers], during


def _record_checks(gateway, problems: list[str] | None = None) -> list[tuple[int, bool]]:
    """(checks failed in a row, lost) after each failed check of engine 0; its problems go to ``problems``."""
    seen: list[tuple[int, bool]] = []
    failed = gateway.monitor.failed_check

    def record(engine: int, problem: str) -> None:
        failed(engine, problem)
        if engine == 0:
            seen.append((gateway.engines[0].failed_checks, gateway.engines[0].lost))
            if problems is not None:
                problems.append(problem)

    gateway.monitor.failed_check = record
    return seen


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_on_an_engine_whose_steps_stop_goes_to_another_though_its_health_answers(stream, caplog):
    """The gap /health leaves: vLLM's API server answers it while the engine core is hung."""

    async def go():
        # A whole answer: nothing at all; a stream: its headers, as vLLM sends them on accepting a call.
        hung, spare = SteppingEngine(freeze_after="headers" if stream else None, hold=not stream), FakeEngine()
        gw, gateway = await start_gw([await hung.start(), await spare.start()], balancer="round_robin", **STALL)
        checks = _record_checks(gateway)
        try:
            async with aiohttp.ClientSession() as s:
                started = asyncio.get_running_loop().time()
                status, served_by, body = await _post(s, gw.url, "p0", stream=stream)
                took = asyncio.get_running_loop().time() - started
                async with s.get(gw.url + "/health") as r:
                    health = await r.json()
            return status, served_by, body, took, checks, health, gateway.snapshot(), hung.calls
        finally:
            await gw.stop()
            await hung.stop()
            await spare.stop()

    with caplog.at_level("WARNING", logger="engine.gateway"):
        status, served_by, body, took, checks, health, snapshot, hung_calls = run(go())
    assert status == 200 and served_by == "1" and hung_calls == 1
    assert took >= 0.3  # not before the stall timeout
    assert checks[:2] == [(1, False), (2, True)]  # the stall is a failed check; lost at --health-failures
    assert health == {"status": "ok", "engines": 2, "lost": [0], "stalled": [0]}
    engine0 = snapshot["engines"][0]
    assert engine0["lost"] is True and engine0["stalled"] is True and engine0["since_progress"] >= 0.3
    assert engine0["in_flight"] == 0 and snapshot["engines"][1]["stalled"] is False
    lost = [r.getMessage() for r in caplog.records if "left out of the balance" in r.getMessage()]
    assert len(lost) == 1 and lost[0].startswith("engine 0 (http://127.0.0.1:")
    assert re.search(f"lost: {STALL_PROBLEM}, 2 checks in a row; left out", lost[0]).group(1) == "1", lost[0]


def test_a_stream_whose_engine_stops_stepping_ends_with_engine_lost_though_other_calls_finish():
    """Calls that finish on the engine meanwhile do not restart the window of the one still held."""

    async def go():
        eng = SteppingEngine(freeze_after="token")
        gw, gateway = await start_gw([await eng.start()], **STALL)
        checks = _record_checks(gateway)
        try:
            async with aiohttp.ClientSession() as s:
                held = asyncio.ensure_future(_post(s, gw.url, "p-held", stream=True))
                await wait_for(lambda: eng.frozen)
                eng.freeze_after, eng.frozen = None, False  # later calls are answered whole at once
                quick = []
                loop = asyncio.get_running_loop()
                until = loop.time() + 0.15  # half the timeout: no quick call is in flight when the stall is judged
                while loop.time() < until:
                    quick.append((await _post(s, gw.url, f"q{len(quick)}"))[0])
                    await asyncio.sleep(0.03)
                status, _, events = await held
            return status, events, quick, checks, gateway.acct.table.get("p-held")
        finally:
            await gw.stop()
            await eng.stop()

    status, events, quick, checks, program = run(go())
    assert status == 200 and events[0]["choices"][0]["token_ids"] == [7]
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["code"] == "engine_lost" and events[-1] == DONE
    found = re.search(f"lost: {STALL_PROBLEM}, 2 checks in a row", errors[0]["message"])
    assert found and found.group(1) != "no", errors[0]["message"]  # the held stream, and any quick call late
    assert len(quick) >= 2 and set(quick) == {200}  # finished calls in the window
    assert checks[:2] == [(1, False), (2, True)]
    assert program is None or program.total_service == 0.0


def test_calls_held_without_a_byte_by_an_engine_that_steps_are_not_lost():
    """PLAS and ATLAS hold calls queued, silently, while the engine serves others: its counters move."""

    async def go():
        eng = SteppingEngine(stepping=True, hold=True)
        gw, gateway = await start_gw([await eng.start()], **STALL_SLACK)
        checks = _record_checks(gateway)
        try:
            answers, during = await _hold_calls(eng, gw.url, gateway, 1.0, n=3)  # three stall timeouts
            return answers, checks, during
        finally:
            await gw.stop()
            await eng.stop()

    answers, checks, during = run(go())
    assert answers == [(200, "0")] * 3 and checks == []
    assert during["in_flight"] == 3 and during["stalled"] is False and during["since_progress"] < 0.3


def test_an_idle_engine_with_still_counters_is_not_failed_nor_a_call_shorter_than_the_timeout():
    """The window starts when calls are in flight, not when the counters last moved."""

    async def go():
        eng = SteppingEngine(hold=True)
        gw, gateway = await start_gw([await eng.start()], **STALL_SLACK)
        checks = _record_checks(gateway)
        try:
            await asyncio.sleep(0.6)  # idle, counters still: two stall timeouts
            idle = gateway.snapshot()["engines"][0]
            async with aiohttp.ClientSession() as s:
                call = asyncio.ensure_future(_post(s, gw.url, "p1"))
                await asyncio.sleep(0.15)  # held half the timeout, no step
                eng.release.set()
                answer = await call
            await asyncio.sleep(0.2)
            return idle, answer[:2], checks, gateway.snapshot()["engines"][0]
        finally:
            await gw.stop()
            await eng.stop()

    idle, answer, checks, after = run(go())
    assert idle["since_progress"] >= 0.45 and idle["stalled"] is False
    assert answer == (200, "0") and checks == []
    assert after["lost"] is False and after["stalled"] is False


@pytest.mark.parametrize("mode,warning", [
    ("404", "GET /metrics answered 404"),
    ("absent", "/metrics has none of vllm:iteration_tokens_total_count, vllm:prompt_tokens_total, "
               "vllm:generation_tokens_total (vLLM started with --disable-log-stats, or not a vLLM server)"),
    ("malformed", "/metrics has a malformed sample line 'vllm:generation_tokens_total{engine=\"0\" 5.0': "
                  "its label set is not closed"),
    ("500", None),  # a reading that fails is no stall, nor a reason to give up on the check
    ("hang", None),
])
def test_an_engine_without_usable_metrics_is_never_failed_for_it(mode, warning, caplog):
    async def go():
        eng = SteppingEngine(metrics=mode, hold=True)
        # "hang": a /metrics that times out several times in the 0.8 s
        gw, gateway = await start_gw([await eng.start()], **{**STALL, "health_timeout": 0.2 if mode == "hang" else 0.5})
        checks = _record_checks(gateway)
        try:
            (answer,), during = await _hold_calls(eng, gw.url, gateway, 0.8)
            return answer, checks, during
        finally:
            await gw.stop()
            await eng.stop()

    with caplog.at_level("WARNING", logger="engine.gateway"):
        answer, checks, during = run(go())
    assert answer == (200, "0") and checks == []
    assert during["stalled"] is False and during["since_progress"] is None and during["in_flight"] == 1
    warned = [r.getMessage() for r in caplog.records if "no stall check" in r.getMessage()]
    if warning is None:
        assert warned == []
    else:  # once, though every check met it
        assert len(warned) == 1 and warned[0].startswith("engine 0 (http://127.0.0.1:")
        assert f": {warning}: no stall check for it" in warned[0]


def test_a_stalled_engine_is_back_once_it_steps_again():
    async def go():
        eng = SteppingEngine(hold=True)
        gw, gateway = await start_gw([await eng.start()], **STALL)
        try:
            async with aiohttp.ClientSession() as s:
                call = asyncio.ensure_future(_post(s, gw.url, "p1"))
                lost = await wait_for(lambda: gateway.engines[0].lost)
                status = (await call)[0]  # failed over, with nowhere else to go
                still = await wait_for(lambda: not gateway.engines[0].lost, timeout=0.4)  # idle: it stays out
                eng.stepping, eng.hold = True, False
                back = await wait_for(lambda: not gateway.engines[0].lost)
                again = await _post(s, gw.url, "p2")
            return lost, status, still, back, again[:2], gateway.snapshot()["engines"][0]
        finally:
            await gw.stop()
            await eng.stop()

    lost, status, still, back, again, engine0 = run(go())
    assert lost and status == 502 and not still and back
    assert again == (200, "0") and engine0["stalled"] is False and engine0["health_failures"] == 0


@pytest.mark.parametrize("mode", ["malformed", "absent"])
def test_a_stalled_engine_stays_out_while_its_metrics_turn_unusable(mode):
    """An unusable /metrics (a proxy's error page, a garbled exposition) is no step: the verdict stands until
    the engine is seen to step. It was forgotten, so one such answer put the hung engine back."""

    async def go():
        eng = SteppingEngine(hold=True)
        gw, gateway = await start_gw([await eng.start()], **STALL)
        problems: list[str] = []
        _record_checks(gateway, problems)
        try:
            async with aiohttp.ClientSession() as s:
                call = asyncio.ensure_future(_post(s, gw.url, "p1"))
                lost = await wait_for(lambda: gateway.engines[0].lost)
                eng.metrics_mode = mode
                status = (await call)[0]
                seen = len(problems)
                back_early = await wait_for(lambda: not gateway.engines[0].lost, timeout=0.5)
                held = (gateway.engines[0].stalled, problems[seen:])
                eng.hold = False  # the probe's completion is answered: a step
                back = await wait_for(lambda: not gateway.engines[0].lost)
            return lost, status, back_early, held, back, gateway.engines[0].stalled
        finally:
            await gw.stop()
            await eng.stop()

    lost, status, back_early, (stalled, later), back, stalled_after = run(go())
    assert lost and status == 502 and not back_early and stalled
    unusable = STALL_PROBLEM.replace(r"\(/metrics progress frozen\)", r"\(/metrics now unusable: /metrics has ")
    assert later and all(re.match(unusable, p) for p in later), later
    assert back and not stalled_after


class ProbeAnsweringEngine(SteppingEngine):
    """Holds its clients' calls but, once ``answer_probes``, answers the gateway's probe (prompt [0]) at once:
    a live core with a long queue, as PLAS keeps one."""

    answer_probes = False

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if self.answer_probes and (await request.json()).get("prompt") == [0]:
            return web.json_response(ANSWER)
        return await super().completions(request)


def test_a_stalled_engine_whose_metrics_turn_unusable_is_probed_even_while_calls_wait():
    """With /metrics unusable only a probe can show a step. Probing only an engine with no call waiting left
    one that kept getting calls (the only engine, or every engine lost) out for good, its calls failed at
    every check."""

    async def go():
        eng = ProbeAnsweringEngine(hold=True)
        gw, gateway = await start_gw([await eng.start()], **STALL)
        try:
            async with aiohttp.ClientSession() as s:
                first = asyncio.ensure_future(_post(s, gw.url, "p1"))
                await wait_for(lambda: gateway.engines[0].lost)
                eng.metrics_mode = "malformed"
                first_status = (await first)[0]
                second = asyncio.ensure_future(_post(s, gw.url, "p2"))  # every engine lost: tried anyway, held
                waiting = await wait_for(lambda: gateway.engines[0].awaiting > 0)
                eng.answer_probes = True
                back = await wait_for(lambda: not gateway.engines[0].lost, timeout=1.0)
                held = gateway.engines[0].awaiting
                eng.release.set()
                second_status = (await second)[0]
            return first_status, waiting, back, held, second_status
        finally:
            await gw.stop()
            await eng.stop()

    first_status, waiting, back, held, second_status = run(go())
    assert first_status == 502 and waiting
    assert back and held == 1 and second_status == 200


def test_a_hung_engine_is_found_though_its_clients_give_up_and_retry_before_the_timeout():
    """The waiting is summed since the samples last moved: a client that gives up after 0.2 s (under the 0.3 s
    timeout) and sends its call again kept a window that had to be waited through whole from ever reaching it."""

    async def go():
        hung = SteppingEngine(hold=True)  # /health answers, /metrics frozen, calls never answered
        gw, gateway = await start_gw([await hung.start()], **STALL)
        checks = _record_checks(gateway)
        try:
            async with aiohttp.ClientSession() as s:
                loop = asyncio.get_running_loop()
                until, tries = loop.time() + 3.0, 0  # ten timeouts
                while not gateway.engines[0].stalled and loop.time() < until:
                    tries += 1
                    with contextlib.suppress(asyncio.TimeoutError):
                        async with s.post(gw.url + "/v1/completions", json={"prompt": [1], "max_tokens": 2},
                                          headers={"X-Program-Id": "p"},
                                          timeout=aiohttp.ClientTimeout(total=0.2)) as r:
                            await r.read()
                    await asyncio.sleep(0.02)  # the client's pause: no call in flight meanwhile
            return tries, hung.calls, checks, gateway.snapshot()["engines"][0]
        finally:
            await gw.stop()
            await hung.stop()

    tries, calls, checks, engine0 = run(go())
    assert engine0["stalled"] is True and checks[:1] == [(1, False)]
    assert tries >= 2 and calls >= 2  # no one call was waited on for the timeout
    assert engine0["waited"] >= 0.3 and engine0["since_progress"] >= engine0["waited"]


def test_overlapping_calls_count_their_waiting_once():
    """The window is the time with some call waited on, not a sum over calls: four calls held together for
    0.4 s (1.0 s summed over them) by an engine whose samples stay still are under a 0.6 s timeout."""

    async def go():
        eng = SteppingEngine(hold=True)
        gw, gateway = await start_gw([await eng.start()], **{**STALL_SLACK, "stall_timeout": 0.6})
        checks = _record_checks(gateway)
        try:
            await wait_for(lambda: gateway.snapshot()["engines"][0]["since_progress"] is not None)
            async with aiohttp.ClientSession() as s:
                calls = []
                for i in range(4):
                    calls.append(asyncio.ensure_future(_post(s, gw.url, f"p{i}")))
                    await asyncio.sleep(0.1)
                eng.release.set()  # answered at once (and, in this engine, with no step)
                answers = await asyncio.gather(*calls)
            await asyncio.sleep(0.3)
            return [a[:2] for a in answers], checks, gateway.snapshot()["engines"][0]
        finally:
            await gw.stop()
            await eng.stop()

    answers, checks, engine0 = run(go())
    assert answers == [(200, "0")] * 4 and checks == []
    assert engine0["stalled"] is False and 0.35 <= engine0["waited"] < 0.6


@pytest.mark.parametrize("models", [True, False])
def test_a_stalled_engine_with_no_call_gets_a_probe_and_is_back_once_it_answers(models):
    """vLLM's idle core steps for nothing, and a lost engine gets no calls while others are usable, so a
    stalled engine's samples never moved and it stayed out for good. The gateway sends a stalled engine that
    it waits on for no call a one-token completion of its own (of no program); an answer puts it back."""

    async def no_models(request: web.Request) -> web.Response:
        return web.Response(status=404)

    async def go():
        eng, other = SteppingEngine(hold=True, step_on_call=True), FakeEngine()
        if not models:
            eng.models = no_models  # the probe names the last model a call to it named
        gw, gateway = await start_gw([await eng.start(), await other.start()], balancer="round_robin",
                                     **{**STALL, "health_timeout": 0.25})
        try:
            async with aiohttp.ClientSession() as s:
                first = await _post(s, gw.url, "p0", model="m-named")  # held (work before the core?): engine 1
                await wait_for(lambda: len(eng.probes) >= 2)  # held too while it hangs: it stays out
                hung = gateway.snapshot()["engines"][0]
                eng.hold = False  # answers from now on, each answer a step
                eng.release.set()
                back = await wait_for(lambda: not gateway.engines[0].lost)
                engines = [(await _post(s, gw.url, f"q{i}"))[1] for i in range(4)]
            return (first[:2], hung, back, engines, eng.probes, eng.calls, gateway.snapshot(),
                    [e.routed for e in gateway.engines], list(gateway.recent))
        finally:
            await gw.stop()
            await eng.stop()
            await other.stop()

    first, hung, back, engines, probes, calls, snapshot, routed, recent = run(go())
    assert first == (200, "1")
    assert hung["lost"] is True and hung["stalled"] is True and hung["in_flight"] == 0
    assert hung["waited"] >= 0.3 + 0.25  # the stall, then a probe's wait: counted like a call's
    assert back and sorted(engines) == ["0", "0", "1", "1"]
    assert probes and all(p == {"model": "fake" if models else "m-named", "prompt": [0], "max_tokens": 1}
                          for p in probes)
    # The gateway's own calls: not routed, not in the table, not counted as calls the engine got.
    assert calls == 1 + 2 and routed == [3, 3]
    assert [(r["program_id"], r["engine"]) for r in recent] == [("p0", 0), ("p0", 1)] + [
        (f"q{i}", int(e)) for i, e in enumerate(engines)]
    assert sorted(p["id"] for p in snapshot["programs"]) == ["p0", "q0", "q1", "q2", "q3"]
    assert snapshot["live_calls"] == 0 and [e["in_flight"] for e in snapshot["engines"]] == [0, 0]
    assert snapshot["engines"][0]["stalled"] is False and snapshot["engines"][0]["health_failures"] == 0


class KeyedEngine(SteppingEngine):
    """A vLLM server started with ``--api-key KEY``: /v1 answers 401 ``{"error": "Unauthorized"}`` without
    ``Bearer KEY``; /health and /metrics stay open."""

    key = "k"

    def _refused(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") != f"Bearer {self.key}"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if self._refused(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await super().completions(request)

    async def models(self, request: web.Request) -> web.Response:
        if self._refused(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await super().models(request)


@pytest.mark.parametrize("keys, refused", [
    ({"engine_api_key": "k"}, None),
    ({"api_key": "k"}, None),  # one key for all: the gateway's own is the engines'
    ({}, "the engine takes an API key: give the gateway --engine-api-key"),  # the client's key passed on
    ({"engine_api_key": "x"}, "the gateway's --engine-api-key is not one of the engine's keys"),  # restarted: k
    ({"api_key": "x"}, "the gateway's --api-key is not one of the engine's keys"),
])
def test_a_stalled_engine_with_an_api_key_is_probed_with_the_gateways_engine_key(keys, refused):
    """vLLM's --api-key guards /v1, and the probe carried no key: it got a 401, so a stalled engine that would
    have answered stayed out until its samples moved (never, while it got no calls)."""
    key = keys.get("engine_api_key", keys.get("api_key"))

    async def go():
        eng, other = KeyedEngine(hold=True, step_on_call=True), FakeEngine()
        eng.key = key or "k"
        gw, gateway = await start_gw([await eng.start(), await other.start()], balancer="round_robin",
                                     **keys, **{**STALL, "health_timeout": 0.25})
        problems: list[str] = []
        _record_checks(gateway, problems)
        try:
            async with aiohttp.ClientSession() as s:
                body = {"prompt": [1, 2, 3], "max_tokens": 2}
                async with s.post(gw.url + "/v1/completions", json=body,  # the client has the key
                                  headers={"X-Program-Id": "p0", "Authorization": f"Bearer {key or 'k'}"}) as r:
                    await r.read()
                    first = r.status, r.headers.get("X-Gateway-Engine")  # held, lost, sent to engine 1
                eng.key = "k"
                eng.hold = False  # answers new calls from now on, each a step; the first stays held
                back = await wait_for(lambda: not gateway.engines[0].lost, timeout=1.0)
            return first, back, eng.probes, problems
        finally:
            await gw.stop()
            await eng.stop()
            await other.stop()

    first, back, probes, problems = run(go())
    assert first == (200, "1")
    if refused is None:
        assert back and probes[-1] == {"model": "fake", "prompt": [0], "max_tokens": 1}
    else:
        assert not back
        assert problems and re.match(STALL_PROBLEM + re.escape(f"; a probe completion answered 401 ({refused})") + "$",
                                     problems[-1]), problems[-1]


def test_one_failed_health_check_does_not_put_a_still_hung_engine_back():
    """A failed /health cleared the samples and the verdict, so the next check read "new" samples and passed."""

    async def go():
        hung, spare = SteppingEngine(hold=True), FakeEngine()  # its samples never move: the core stays hung
        gw, gateway = await start_gw([await hung.start(), await spare.start()], balancer="round_robin",
                                     **{**STALL, "health_timeout": 0.25})
        problems: list[str] = []
        _record_checks(gateway, problems)
        try:
            async with aiohttp.ClientSession() as s:
                first = await _post(s, gw.url, "p0")  # held, lost, sent to engine 1
                hung.health_status = 503  # a blip of its API server
                await wait_for(lambda: "/health answered 503" in problems)
                hung.health_status = 200
                back = await wait_for(lambda: not gateway.engines[0].lost, timeout=0.5)
                second = await _post(s, gw.url, "p1")  # round robin's turn of engine 0, which is left out
            return first[:2], back, second[:2], gateway.snapshot()["engines"][0], problems, hung.calls
        finally:
            await gw.stop()
            await hung.stop()
            await spare.stop()

    first, back, second, engine0, problems, calls = run(go())
    assert first == (200, "1") and not back and second == (200, "1") and calls == 1
    assert engine0["lost"] is True and engine0["stalled"] is True
    after = problems[problems.index("/health answered 503") + 1:]
    assert after and all(re.match(STALL_PROBLEM + "; a probe completion got no answer within 0.25 s$", p)
                         for p in after), after


class PacedEngine(SteppingEngine):
    """Streams ``tokens`` token events, one each ``gap`` s, then [DONE], with still samples (``stepping`` off)."""

    def __init__(self, tokens: int = 30, gap: float = 0.02, **kw):
        super().__init__(**kw)
        self.tokens, self.gap = tokens, gap

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self._count(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(self.tokens):
            await resp.write(b"data: " + json.dumps(TOKEN).encode() + b"\n\n")
            await asyncio.sleep(self.gap)
        await resp.write(b"data: [DONE]\n\n")
        return resp


def test_a_slow_client_is_no_stall(monkeypatch):
    """Time spent writing to the client is not waiting on the engine. The gateway's writes to this client take
    0.1 s each (as when it reads slowly and the socket's buffers are full), 0.7 s or so in all, while the
    engine sends each event within 20 ms and its samples stay still: counting the writes made it a stall."""
    writes: list[int] = []
    write = web.StreamResponse.write

    async def slow_write(self: web.StreamResponse, data: bytes) -> None:
        if GATEWAY_ENGINE_HEADER in self.headers:  # the gateway's answer to its client, not the engine's
            writes.append(len(data))
            await asyncio.sleep(0.1)
        await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", slow_write)

    async def go():
        eng = PacedEngine()
        gw, gateway = await start_gw([await eng.start()], **STALL_SLACK)
        checks = _record_checks(gateway)
        try:
            async with aiohttp.ClientSession() as s:
                status, _, events = await _post(s, gw.url, "p1", stream=True)
            return status, events, checks, gateway.snapshot()["engines"][0]
        finally:
            await gw.stop()
            await eng.stop()

    status, events, checks, engine0 = run(go())
    assert status == 200 and events[-1] == DONE and not [e for e in events if isinstance(e, dict) and "error" in e]
    assert sum(event_token_count(e) for e in events if isinstance(e, dict)) == 30
    assert len(writes) >= 4  # over 0.3 s (the timeout) spent writing to the client
    assert checks == [] and engine0["stalled"] is False and engine0["waited"] < 0.3


def test_no_stall_check_with_a_zero_stall_timeout():
    async def go():
        eng = SteppingEngine(hold=True)
        gw, gateway = await start_gw([await eng.start()], **{**STALL_SLACK, "stall_timeout": 0})
        try:
            (answer,), during = await _hold_calls(eng, gw.url, gateway, 0.6)
            return answer, during
        finally:
            await gw.stop()
            await eng.stop()

    answer, during = run(go())
    assert answer == (200, "0") and during["lost"] is False and during["health_failures"] == 0
    assert during["since_progress"] is None


def test_progress_samples_are_summed_over_series_and_read_strictly():
    text = METRICS.replace("STEPS", "3.0") + (
        # a label value with a quote, a brace and a space; a timestamp; a sample that is not one of them
        'vllm:generation_tokens_total{engine="2",model_name="a \\"}b\\" c"} 1.5 1700000000000\n'
        'vllm:generation_tokens_totally{engine="0"} 99\n')
    assert progress_samples(text) == (7.0, 30.0, 13.5, 1.0, 2.0, 0.25)
    assert progress_samples("vllm:num_requests_running 1\n# vllm:generation_tokens_total 3\n") is None
    assert progress_samples("vllm:prompt_tokens_total 2\n") == (None, 2.0, None, None, None, None)
    # NaN is no reading: summed in, two reads of a still engine would differ (NaN equals nothing)
    nan = 'vllm:prompt_tokens_total{engine="0"} NaN\nvllm:prompt_tokens_total{engine="1"} 2\nvllm:num_requests_running NaN\n'
    assert progress_samples(nan) == (None, 2.0, None, None, None, None) == progress_samples(nan)
    # Counters there with no finite value are no reading, not absent (the --disable-log-stats wording)
    with pytest.raises(ValueError, match=r"^sample of vllm:prompt_tokens_total, vllm:generation_tokens_total with "
                                         r"no finite value \(each series NaN or infinite\)$"):
        progress_samples("vllm:prompt_tokens_total NaN\nvllm:generation_tokens_total{engine=\"0\"} +Inf\n"
                         "vllm:num_requests_running 3\n")
    for bad in ('vllm:prompt_tokens_total{engine="0"}5\n', "vllm:prompt_tokens_total five\n",
                "vllm:prompt_tokens_total\n", "vllm:prompt_tokens_total 1 2 3\n"):
        with pytest.raises(ValueError, match="malformed sample line"):
            progress_samples(bad)


def test_the_sample_names_are_those_prometheus_client_writes_for_vllms_metrics():
    """vLLM 0.26.0 declares Histogram("vllm:iteration_tokens_total"), Counter("vllm:prompt_tokens"),
    Counter("vllm:generation_tokens") and its Gauges (vllm/v1/metrics/loggers.py)."""
    prom = pytest.importorskip("prometheus_client")
    registry = prom.CollectorRegistry()
    labels = ["model_name", "engine"]
    hist = prom.Histogram("vllm:iteration_tokens_total", "d", labels, buckets=[1, 8], registry=registry)
    prompt = prom.Counter("vllm:prompt_tokens", "d", labels, registry=registry)
    generation = prom.Counter("vllm:generation_tokens", "d", labels, registry=registry)
    gauges = [prom.Gauge(n, "d", labels, registry=registry) for n in
              ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")]
    for engine in ("0", "1"):
        hist.labels("m", engine).observe(5)
        prompt.labels("m", engine).inc(10)
        generation.labels("m", engine).inc(3)
        for i, gauge in enumerate(gauges):
            gauge.labels("m", engine).set(i + 0.5)
    assert progress_samples(prom.generate_latest(registry).decode()) == (2.0, 20.0, 6.0, 1.0, 3.0, 5.0)


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_a_bad_stall_timeout_is_refused(value):
    with pytest.raises(ValueError) as info:
        GatewayConfig(engines=["http://127.0.0.1:1"], stall_timeout=value)
    assert str(info.value) == f"--stall-timeout must be >= 0 seconds (0: no stall check), got {value}"


def test_the_gateway_cli_refuses_a_bad_stall_timeout():
    proc = subprocess.run([sys.executable, "-m", "engine", "gateway", "--engine", "http://x", "--stall-timeout",
                           "-5"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == "python -m engine gateway: error: --stall-timeout must be >= 0 seconds " \
                          "(0: no stall check), got -5.0\n"


def test_no_engine_check_outlives_the_gateway():
    """The watchers are cancelled and awaited before the gateway's session closes, here while one is in the
    middle of a /metrics request that never answers."""

    async def go():
        eng = SteppingEngine(metrics="hang")
        gw, gateway = await start_gw([await eng.start()], **{**STALL, "health_timeout": 5.0})
        watchers = list(gateway.monitor._watchers)
        session = gateway._session
        close = session.close
        done_at_close: list[bool] = []

        async def recording_close():
            done_at_close.extend(t.done() for t in watchers)
            await close()

        session.close = recording_close
        try:
            await asyncio.sleep(0.2)  # a check is waiting on /metrics
            running = [not t.done() for t in watchers]
        finally:
            await gw.stop()
            await eng.stop()
        return running, done_at_close

    running, done_at_close = run(go())
    assert running == [True] and done_at_close == [True]
