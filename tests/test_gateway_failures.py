"""Engines that fail mid-stream: the gateway and the replayer report a failure and charge nothing.

vLLM's OpenAI server reports a failure inside a stream as an error event
followed by ``[DONE]`` (``completion/serving.py``: ``data: {"error": ...}``),
so a client that only watched for ``[DONE]`` took the call as complete. An
engine that dies mid-stream cuts the connection instead.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from engine.gateway import GatewayConfig
from engine.replay import HTTPTarget, ReplayError
from engine.sse import DONE, SSEParser
from test_serve_helpers import Running, run, start_app, start_gw, wait_for

TOKEN = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
         "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None, "token_ids": [7]}],
         # service the engine reports: a gateway that took the call as complete would charge it
         "engine_stats": {"service": 0.5}}
ERROR = {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}}


async def start_failing_engine(mode: str) -> Running:
    """An engine that streams one token, then fails: ``error_event`` as vLLM does, or ``die`` (connection cut)."""

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: " + json.dumps(TOKEN).encode() + b"\n\n")
        if mode == "error_event":
            await resp.write(b"data: " + json.dumps(ERROR).encode() + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
        else:
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


@pytest.mark.parametrize("mode", ["error_event", "die"])
def test_a_call_that_fails_mid_stream_is_not_charged_and_the_client_is_told(mode):
    async def go():
        eng = await start_failing_engine(mode)
        gw, gateway = await start_gw([eng.url])
        try:
            async with aiohttp.ClientSession() as s:
                events = await _stream_events(s, gw.url)
            settled = await wait_for(lambda: gateway.acct.live_calls() == 0)
            program = gateway.acct.table.get("p1")
            return events, settled, program, list(gateway.loads)
        finally:
            await gw.stop()
            await eng.stop()

    events, settled, program, loads = run(go())
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and events[-1] == DONE, events
    if mode == "die":
        assert errors[0]["error"]["code"] == "engine_failed"
        assert "failed mid-stream" in errors[0]["error"]["message"]
    assert settled and loads == [0]
    assert program is None or program.total_service == 0.0  # aborted, never charged


@pytest.mark.parametrize("mode,words", [("error_event", "the engine failed mid-stream: Internal server error "
                                                         "(InternalServerError)"),
                                        ("die", "ClientPayloadError")])
def test_the_replayer_counts_a_mid_stream_failure_as_a_failed_call(mode, words):
    async def go():
        eng = await start_failing_engine(mode)
        try:
            async with HTTPTarget(eng.url) as target:
                from engine.replay import Clock

                clock = Clock(asyncio.get_running_loop().time())
                with pytest.raises(ReplayError) as info:
                    await target.send([1, 2, 3], 4, "p1", "c0", clock)
                return str(info.value)
        finally:
            await eng.stop()

    message = run(go())
    assert message.startswith("program p1 call c0: ") and words in message, message


@pytest.mark.parametrize(
    "url,message",
    [
        ("http://127.0.0.1:99999", "--engine http://127.0.0.1:99999: Port out of range 0-65535"),
        ("http://127.0.0.1:abc", "--engine http://127.0.0.1:abc: Port could not be cast to integer value as 'abc'"),
        ("http://[::1", "--engine http://[::1: Invalid IPv6 URL"),
        ("http://:80", "--engine http://:80: expected an http:// or https:// URL"),
    ],
)
def test_bad_engine_urls_are_refused_at_start(url, message):
    with pytest.raises(ValueError) as info:
        GatewayConfig(engines=[url])
    assert str(info.value).startswith(message)
