"""Engines that fail mid-stream: the gateway and the replayer report a failure and charge nothing.

vLLM's OpenAI server reports a failure inside a stream as an error event
followed by ``[DONE]`` (``completion/serving.py``: ``data: {"error": ...}``),
so a client that only watched for ``[DONE]`` took the call as complete. An
engine that dies mid-stream cuts the connection instead.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from engine.gateway import GatewayConfig, same_server_by_address
from engine.replay_targets import HTTPTarget, ReplayError
from engine.sse import DONE, SSEParser
from test_serve_helpers import Running, run, start_app, start_gw, wait_for

TOKEN = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
         "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None, "token_ids": [7]}],
         # service the engine reports: a gateway that took the call as complete would charge it
         "engine_stats": {"service": 0.5}}
ERROR = {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}}


async def start_failing_engine(mode: str) -> Running:
    """An engine that streams one token, then fails: ``error_event`` as vLLM does, ``die`` (connection cut),
    ``die_mid_event`` (cut after the first bytes of the next event), or ``die_after_done`` (cut after its
    ``[DONE]``, before the stream's end)."""

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: " + json.dumps(TOKEN).encode() + b"\n\n")
        if mode == "error_event":
            await resp.write(b"data: " + json.dumps(ERROR).encode() + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
        elif mode == "die_after_done":
            await resp.write(b"data: [DONE]\n\n")
            await asyncio.sleep(0.05)
            request.transport.abort()
        else:
            if mode == "die_mid_event":
                await resp.write((b"data: " + json.dumps(TOKEN).encode())[:20])
            await asyncio.sleep(0.05)
            request.transport.abort()
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    return await start_app({("POST", "/v1/completions"): completions, ("GET", "/v1/models"): models})


async def _stream_events(session: aiohttp.ClientSession, url: str) -> list:
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "stream": True}
    parser = SSEParser()
    events: list = []
    async with session.post(url + "/v1/completions", json=body,
                            headers={"X-Program-Id": "p1", "X-Thread-Id": "t1"}) as r:
        assert r.status == 200
        async for chunk in r.content.iter_any():
            events += parser.feed(chunk)
    return events


# die_mid_event: the half event went through, the error event joined it, and the client,
# dropping that one broken event, read [DONE] alone: a failed call that looked complete.
@pytest.mark.parametrize("mode", ["error_event", "die", "die_mid_event"])
def test_a_call_that_fails_mid_stream_is_not_charged_and_the_client_is_told(mode):
    async def go():
        eng = await start_failing_engine(mode)
        gw, gateway = await start_gw([eng.url])
        try:
            async with aiohttp.ClientSession() as s:
                events = await _stream_events(s, gw.url)
            settled = await wait_for(lambda: gateway.acct.live_calls() == 0)
            program = gateway.acct.table.get("p1")
            return events, settled, program, [e.load for e in gateway.engines]
        finally:
            await gw.stop()
            await eng.stop()

    events, settled, program, loads = run(go())
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and events[-1] == DONE, events
    assert events[0]["choices"][0]["token_ids"] == [7]
    if mode != "error_event":
        assert errors[0]["error"]["code"] == "engine_failed"
        assert "failed mid-stream" in errors[0]["error"]["message"]
    assert settled and loads == [0]
    assert program is None or program.total_service == 0.0  # aborted, never charged


def test_a_stream_cut_after_its_done_is_complete_and_the_client_gets_no_error_after_done():
    """The call was complete at its [DONE]; an error event after it told the client the opposite."""

    async def go():
        eng = await start_failing_engine("die_after_done")
        gw, gateway = await start_gw([eng.url])
        try:
            async with aiohttp.ClientSession() as s:
                events = await _stream_events(s, gw.url)
            settled = await wait_for(lambda: gateway.acct.live_calls() == 0)
            return events, settled, gateway.acct.table.get("p1")
        finally:
            await gw.stop()
            await eng.stop()

    events, settled, program = run(go())
    assert events == [TOKEN, DONE]
    assert settled and program.total_service == 0.5  # charged once, the engine's figure


@pytest.mark.parametrize("mode,words", [("error_event", "the engine failed mid-stream: Internal server error "
                                                         "(InternalServerError)"),
                                        ("die", "ClientPayloadError")])
def test_the_replayer_counts_a_mid_stream_failure_as_a_failed_call(mode, words):
    message = run(_replay_error(mode, through_gateway=False))
    assert message.startswith("program p1 call c0: ") and words in message, message


def test_a_replay_through_the_gateway_counts_an_engine_dying_mid_event_as_failed():
    message = run(_replay_error("die_mid_event", through_gateway=True))
    assert "engine 0" in message and "failed mid-stream" in message, message


async def _replay_error(mode: str, through_gateway: bool) -> str:
    """The replayer's error for one call to a failing engine (``mode``), sent directly or through a gateway."""
    from engine.replay_targets import Clock

    eng = await start_failing_engine(mode)
    gw = (await start_gw([eng.url]))[0] if through_gateway else None
    try:
        async with HTTPTarget((gw or eng).url) as target:
            clock = Clock(asyncio.get_running_loop().time())
            with pytest.raises(ReplayError) as info:
                await target.send([1, 2, 3], 4, "p1", "c0", clock)
            return str(info.value)
    finally:
        if gw is not None:
            await gw.stop()
        await eng.stop()


@pytest.mark.parametrize(
    "url,message",
    [
        ("http://127.0.0.1:99999", "--engine http://127.0.0.1:99999: Port out of range 0-65535"),
        ("http://127.0.0.1:abc", "--engine http://127.0.0.1:abc: Port could not be cast to integer value as 'abc'"),
        ("http://[::1", "--engine http://[::1: Invalid IPv6 URL"),
        ("http://:80", "--engine http://:80: expected an http:// or https:// URL"),
        # /v1/completions was appended after them: "http://h:1?x=1/v1/completions" asked for the root
        ("http://127.0.0.1:8001?x=1", "--engine http://127.0.0.1:8001?x=1: a base URL takes no ?query or #fragment"),
        ("http://127.0.0.1:8001/#top", "--engine http://127.0.0.1:8001/#top: a base URL takes no ?query or #fragment"),
        ("http://127.0.0.1:8001?", "--engine http://127.0.0.1:8001?: a base URL takes no ?query or #fragment"),
        # /health (not under /v1) passed and every call was a 404 for /v1/v1/completions
        ("http://127.0.0.1:8001/v1", "--engine http://127.0.0.1:8001/v1: the gateway appends /v1/... to it itself; "
                                     "expected the engine's base URL, without /v1 (here http://127.0.0.1:8001)"),
        ("http://h:1/proxy/v1/chat/completions/", "--engine http://h:1/proxy/v1/chat/completions: the gateway "
                                                  "appends /v1/... to it itself; expected the engine's base URL, "
                                                  "without /v1 (here http://h:1/proxy)"),
        # a program's own URL (the gateway's DELETE /v1/programs/ID), copied from a log
        ("http://h:1/v1/programs/p7", "--engine http://h:1/v1/programs/p7: the gateway appends /v1/... to it "
                                      "itself; expected the engine's base URL, without /v1 (here http://h:1)"),
    ],
)
def test_bad_engine_urls_are_refused_at_start(url, message):
    with pytest.raises(ValueError) as info:
        GatewayConfig(engines=[url])
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "urls, message",
    [
        (["http://127.0.0.1:43001", "http://127.0.0.1:43001"],
         "--engine http://127.0.0.1:43001: the same engine as --engine http://127.0.0.1:43001 (engine 0)"),
        (["http://127.0.0.1:43002", "http://Engine-A:80/", "http://engine-a"],
         "--engine http://engine-a: the same engine as --engine http://Engine-A:80 (engine 1)"),
        (["HTTPS://h/", "https://h:443"], "--engine https://h:443: the same engine as --engine HTTPS://h (engine 0)"),
        (["http://[::1]:43003", "http://[0:0::1]:43003/"],
         "--engine http://[0:0::1]:43003: the same engine as --engine http://[::1]:43003 (engine 0)"),
    ],
    ids=["same", "host-case-and-default-port", "scheme-case-and-https-port", "ipv6-forms"],
)
def test_an_engine_given_twice_is_refused_at_start(urls, message):
    """Both started, so one server took two engines' share of calls and its KV cache was counted twice."""
    with pytest.raises(ValueError) as info:
        GatewayConfig(engines=urls)
    assert str(info.value) == f"{message}; give each engine once"


def test_the_gateway_cli_refuses_an_engine_given_twice():
    proc = subprocess.run([sys.executable, "-m", "engine", "gateway", "--port", "43205", "--engine",
                           "http://127.0.0.1:43001", "--engine", "http://127.0.0.1:43001/"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert proc.stderr == ("python -m engine gateway: error: --engine http://127.0.0.1:43001: the same engine as "
                           "--engine http://127.0.0.1:43001 (engine 0); give each engine once\n")
    assert GatewayConfig(engines=["http://h:1", "https://h:1", "http://h:2", "http://h:1/v2"]).engines[3] == "http://h:1/v2"
    assert GatewayConfig(engines=["http://h:1/v1/engine0"]).engines == ["http://h:1/v1/engine0"]  # a proxy's prefix


def _free_port_urls(n: int) -> list[str]:
    """``n`` distinct ports nobody listens on: bind-and-close leaves each free. All are bound before any is
    closed, as two binds one after the other may draw the same port, and the gateway refuses an engine twice."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _free_port_url() -> str:
    return _free_port_urls(1)[0]


@pytest.mark.parametrize("balancer", ["locality", "least_used", "round_robin"])
def test_an_unreachable_engine_is_left_out_and_its_calls_go_to_another(balancer):
    """Its in-flight count stayed 0, so least-used sent it every short call, each a 502."""
    from test_serve_helpers import start_engine

    async def go():
        live, _ = await start_engine(0, step=0.001)
        gw, gateway = await start_gw([_free_port_url(), live.url], balancer=balancer)
        out = []
        try:
            async with aiohttp.ClientSession() as s:
                for i in range(6):
                    prompt = list(range(1, 4)) if i != 3 else list(range(1, 3000))  # one long call
                    async with s.post(gw.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2},
                                      headers={"X-Program-Id": f"p{i % 3}"}) as r:
                        out.append((r.status, r.headers.get("X-Gateway-Engine")))
            snapshot = gateway.snapshot()
            return out, [e.routed for e in gateway.engines], snapshot, gateway.acct.live_calls()
        finally:
            await gw.stop()
            await live.stop()

    out, routed, snapshot, live_calls = run(go())
    assert out == [(200, "1")] * 6
    assert routed[0] <= 1 and routed[1] == 6  # tried at most once, then left out for its backoff
    assert snapshot["engines"][0]["down_for"] > 0 and snapshot["engines"][1]["down_for"] == 0
    assert live_calls == 0 and all(p["engine"] in (None, 1) for p in snapshot["programs"])


def test_every_engine_unreachable_is_one_502_naming_each():
    async def go():
        urls = _free_port_urls(2)
        gw, gateway = await start_gw(urls)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(gw.url + "/v1/completions", json={"prompt": [1], "max_tokens": 2},
                                  headers={"X-Program-Id": "p1"}) as r:
                    return urls, r.status, await r.json(), gateway.acct.live_calls(), [e.load for e in gateway.engines]
        finally:
            await gw.stop()

    urls, status, body, live_calls, loads = run(go())
    assert status == 502 and body["error"]["code"] == "engine_unreachable"
    message = body["error"]["message"]
    assert message.startswith("no engine could be reached: ") and all(u in message for u in urls)
    assert live_calls == 0 and loads == [0, 0]


async def start_slow_eof_engine() -> Running:
    """An engine whose stream ends (EOF) 0.3 s after its [DONE]: real servers may leave such a gap."""

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: " + json.dumps(TOKEN).encode() + b"\n\ndata: [DONE]\n\n")
        await asyncio.sleep(0.3)
        try:
            await resp.write_eof()
        except ConnectionResetError:
            pass
        return resp

    return await start_app({("POST", "/v1/completions"): completions})


@pytest.mark.parametrize("after_done", ["close", "next_call"])
def test_a_streamed_call_is_complete_at_its_done(after_done):
    """At EOF it was too late: a client that closed at [DONE] had its call aborted and uncharged, and
    one that sent the thread's next call at once got 409 thread_busy."""

    async def go():
        eng = await start_slow_eof_engine()
        gw, gateway = await start_gw([eng.url])
        body = {"prompt": [1, 2, 3], "max_tokens": 1, "stream": True}
        headers = {"X-Program-Id": "p1", "X-Thread-Id": "t1"}
        try:
            async with aiohttp.ClientSession() as s, aiohttp.ClientSession() as s2:
                r = await s.post(gw.url + "/v1/completions", json=body, headers=headers)
                parser = SSEParser()
                async for chunk in r.content.iter_any():
                    if DONE in list(parser.feed(chunk)):
                        break
                status = None
                if after_done == "close":
                    r.close()
                else:
                    async with s2.post(gw.url + "/v1/completions", json=body, headers=headers) as r2:
                        status = r2.status
                        await r2.read()
                    r.close()
                await wait_for(lambda: gateway.acct.live_calls() == 0)
                return status, gateway.acct.table.get("p1").total_service
        finally:
            await gw.stop()
            await eng.stop()

    status, total_service = run(go())
    if after_done == "close":
        assert total_service == pytest.approx(0.5)
    else:
        assert status == 200 and total_service == pytest.approx(1.0)


def test_a_program_pinned_to_an_engine_that_goes_down_is_re_pinned():
    from test_serve_helpers import start_engine

    async def go():
        first, _ = await start_engine(0, step=0.001)
        second, _ = await start_engine(1, step=0.001)
        gw, gateway = await start_gw([first.url, second.url])
        long_prompt = {"prompt": list(range(1, 3000)), "max_tokens": 2}
        engines = []
        try:
            async with aiohttp.ClientSession() as s:
                for stop_first in (False, True):
                    if stop_first:
                        await first.stop()
                    async with s.post(gw.url + "/v1/completions", json=long_prompt,
                                      headers={"X-Program-Id": "p1"}) as r:
                        engines.append((r.status, r.headers.get("X-Gateway-Engine"),
                                        gateway.acct.table.get("p1").engine))
            return engines
        finally:
            await gw.stop()
            await second.stop()

    assert run(go()) == [(200, "0", 0), (200, "1", 1)]


def test_concurrent_calls_failing_on_one_outage_set_the_first_backoff_once():
    """Each failed connect doubled it: twelve calls in flight when the engine was found down made it 30 s."""
    from test_serve_helpers import start_engine

    async def go():
        live, _ = await start_engine(0, step=0.001)
        gw, gateway = await start_gw([_free_port_url(), live.url], balancer="round_robin")
        try:
            async with aiohttp.ClientSession() as s:
                async def one(i):
                    async with s.post(gw.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2},
                                      headers={"X-Program-Id": f"p{i}"}) as r:
                        return r.status
                statuses = await asyncio.gather(*(one(i) for i in range(12)))
            return statuses, gateway.snapshot()["engines"][0]["down_for"]
        finally:
            await gw.stop()
            await live.stop()

    statuses, down_for = run(go())
    assert statuses == [200] * 12 and 0 < down_for <= 1.0


def test_one_server_under_two_host_names_is_refused_at_start():
    """`http://localhost:P` and `http://127.0.0.1:P` passed the spelling check and both started, so one
    server took two engines' share of calls. Names that share no address, or do not resolve, are let be."""
    import socket

    assert "127.0.0.1" in {info[4][0] for info in socket.getaddrinfo("localhost", 43004, type=socket.SOCK_STREAM)}
    proc = subprocess.run([sys.executable, "-m", "engine", "gateway", "--port", "0", "--engine",
                           "http://localhost:43004", "--engine", "http://127.0.0.1:43004/"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert proc.stderr == ("python -m engine gateway: error: --engine http://127.0.0.1:43004: the same server as "
                           "--engine http://localhost:43004 (engine 0), as both reach 127.0.0.1 port 43004; give "
                           "each engine once\n")
    for distinct in (["http://localhost:43004", "http://127.0.0.1:43005"],  # another port
                     ["http://localhost:43004", "https://127.0.0.1:43004"],  # another scheme
                     ["http://localhost:43004", "http://127.0.0.1:43004/v2"],  # another path
                     ["http://127.0.0.2:43004", "http://127.0.0.1:43004"],  # another loopback address
                     ["http://no-such-engine.invalid:43004", "http://127.0.0.1:43004"]):  # resolves to nothing
        assert same_server_by_address(distinct) is None, distinct
