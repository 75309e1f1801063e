"""sim serve: an OpenAI-compatible engine timed in real time by the simulated replica."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import pytest

from engine.sse import DONE, SSEParser
from sim.realtime import block_keys, filler_ids
from sim.serve import parse_request, RequestError, text_token_ids
from test_serve_helpers import run, start_engine, wait_for


async def _stream(session, url, body):
    events = []
    t0 = time.monotonic()
    first = None
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        parser = SSEParser()
        async for chunk in r.content.iter_any():
            for e in parser.feed(chunk):
                if first is None and e != DONE and e.get("choices"):
                    first = time.monotonic() - t0
                events.append(e)
        headers = dict(r.headers)
    return events, first, time.monotonic() - t0, headers


def test_streaming_token_count_usage_and_timing():
    async def go():
        server, engine = await start_engine(index=3, step=0.01)
        try:
            async with aiohttp.ClientSession() as s:
                body = {"model": "sim", "prompt": list(range(1, 41)), "max_tokens": 20, "ignore_eos": True,
                        "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
                events, first, total, headers = await _stream(s, server.url, body)
        finally:
            await server.stop()
        return events, first, total, headers

    events, first, total, headers = run(go())
    assert events[-1] == DONE
    token_chunks = [e for e in events[:-1] if e["choices"]]
    assert len(token_chunks) == 20
    ids = [i for e in token_chunks for i in e["choices"][0]["token_ids"]]
    assert len(ids) == 20 and ids == filler_ids(3, 1, 20)
    assert [e["choices"][0]["finish_reason"] for e in token_chunks] == [None] * 19 + ["length"]
    final = events[-2]
    assert final["choices"] == []
    assert final["usage"] == {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    stats = final["engine_stats"]
    assert stats["engine"] == 3 and stats["preemptions"] == 0
    # One prefill step yields the first token, 19 decode steps the rest: 20 steps of 10 ms.
    assert stats["service"] == pytest.approx(0.2)
    assert stats["waiting"] == pytest.approx(0.0, abs=1e-9)
    assert headers["X-Engine-Index"] == "3"
    assert total >= 0.2
    assert first >= 0.01
    assert total < 2.0  # real time, not stalled


def test_whole_response_text_prompt_chat_and_prefix_hits():
    async def go():
        server, engine = await start_engine(step=0.002)
        try:
            async with aiohttp.ClientSession() as s:
                prompt = list(range(100, 164))  # 4 full blocks of 16
                async with s.post(server.url + "/v1/completions",
                                  json={"prompt": prompt, "max_tokens": 8, "return_token_ids": True}) as r:
                    first = await r.json()
                out = first["choices"][0]["token_ids"]
                # Re-send prompt + output + new tokens: the prompt's full blocks and the output's hit.
                again = prompt + out + list(range(500, 520))
                async with s.post(server.url + "/v1/completions", json={"prompt": again, "max_tokens": 3}) as r:
                    second = await r.json()
                async with s.post(server.url + "/v1/completions",
                                  json={"prompt": "hello world, hi!", "max_tokens": 2}) as r:
                    text = await r.json()
                async with s.post(server.url + "/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}) as r:
                    chat = await r.json()
                async with s.get(server.url + "/v1/models") as r:
                    models = await r.json()
        finally:
            await server.stop()
        return first, second, text, chat, models

    first, second, text, chat, models = run(go())
    assert first["object"] == "text_completion"
    assert first["choices"][0]["text"] == " tok" * 8
    assert first["usage"]["completion_tokens"] == 8 and first["usage"]["prompt_tokens"] == 64
    # 64 + 8 = 72 tokens: 4 full blocks cached after the first call; the resend hits all 4.
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
    assert second["engine_stats"]["prefix_hit_tokens"] == 64
    assert text["usage"]["prompt_tokens"] == 4  # 16 bytes at 4 bytes per token
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == " tok" * 4
    assert models["data"][0]["id"] == "sim"


def test_vllm_xargs_reach_the_engine_and_set_program_service():
    async def go():
        server, engine = await start_engine()
        try:
            async with aiohttp.ClientSession() as s:
                body = {"prompt": [1, 2, 3], "max_tokens": 2,
                        "vllm_xargs": {"program_id": "prog-7", "thread_id": "t2", "program_service": 3.5}}
                async with s.post(server.url + "/v1/completions", json=body) as r:
                    assert r.status == 200
                async with s.get(server.url + "/stats") as r:
                    stats = await r.json()
                entry = engine.table.get("prog-7")
                service = None if entry is None else entry.service
        finally:
            await server.stop()
        return stats, service

    stats, service = run(go())
    assert stats["received"] == [{"program_id": "prog-7", "thread_id": "t2", "program_service": 3.5,
                                  "prompt_tokens": 3, "max_tokens": 2}]
    # PLAS: the gateway's 3.5 s plus the call's own 2 steps of 5 ms.
    assert service == pytest.approx(3.5 + 0.01)


def test_bad_requests_get_openai_errors():
    async def go():
        server, engine = await start_engine()
        out = []
        try:
            async with aiohttp.ClientSession() as s:
                for body in (b"{not json", b"[1]", json.dumps({"prompt": 5}).encode(),
                             json.dumps({"prompt": [1], "max_tokens": 0}).encode(),
                             json.dumps({"prompt": [1], "max_tokens": 10 ** 9}).encode(),
                             json.dumps({"prompt": [1], "vllm_xargs": {"program_service": -1}}).encode()):
                    async with s.post(server.url + "/v1/completions", data=body,
                                      headers={"Content-Type": "application/json"}) as r:
                        out.append((r.status, await r.json()))
            in_flight = engine.in_flight
        finally:
            await server.stop()
        return out, in_flight

    out, in_flight = run(go())
    assert [status for status, _ in out] == [400] * 6
    for _, body in out:
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert out[4][1]["error"]["param"] == "max_tokens"
    assert in_flight == 0


def test_disconnect_aborts_the_call_in_the_model():
    async def go():
        server, engine = await start_engine(step=0.01)
        try:
            async with aiohttp.ClientSession() as s:
                body = {"prompt": [1, 2, 3], "max_tokens": 500, "stream": True}
                r = await s.post(server.url + "/v1/completions", json=body)
                await r.content.readline()  # first token arrived: the call is running
                assert engine.in_flight == 1
                r.close()  # drop the connection
                dropped = await wait_for(lambda: engine.aborted == 1 and engine.in_flight == 0, timeout=3)
                drained = await wait_for(lambda: engine.replica.load == 0, timeout=3)
                return dropped, drained, engine.completed
        finally:
            await server.stop()

    dropped, drained, completed = run(go())
    assert dropped and drained
    assert completed == 0


def test_aborting_a_waiting_call_removes_it_from_the_model():
    async def go():
        from sim.realtime import RealtimeEngine
        from test_serve_helpers import engine_config

        engine = RealtimeEngine(engine_config(step=0.01, max_num_seqs=1), "fcfs")
        await engine.start()
        try:
            a = engine.submit([1, 2, 3], 50, "p1", "0", None)
            b = engine.submit([4, 5, 6], 50, "p2", "0", None)
            await asyncio.sleep(0.05)
            assert b.call in engine.replica.waiting
            engine.abort(b)
            waiting_after = list(engine.replica.waiting)
            live_p2 = dict(engine.table.get("p2").live)
            engine.abort(a)
            ok = await wait_for(lambda: engine.replica.load == 0, timeout=3)
        finally:
            await engine.stop()
        return waiting_after, live_p2, ok, engine.aborted, engine.completed

    waiting_after, live_p2, ok, aborted, completed = run(go())
    assert waiting_after == [] and live_p2 == {}
    assert ok and aborted == 2 and completed == 0


def test_parse_request_rules():
    req = parse_request({"prompt": [[5, 6, 7]], "max_tokens": 4, "stream": True,
                         "stream_options": {"include_usage": True}}, chat=False, served_model="m")
    assert req.prompt_ids == [5, 6, 7] and req.max_tokens == 4 and req.stream and req.include_usage
    assert req.program_id is None and req.model == "m"
    with pytest.raises(RequestError):
        parse_request({"prompt": [1], "n": 2}, chat=False, served_model="m")
    with pytest.raises(RequestError):
        parse_request({"messages": []}, chat=True, served_model="m")
    assert len(text_token_ids("abcdefghi")) == 3  # ceil(9 / 4)
    assert block_keys(list(range(40)), 16)[:2] == block_keys(list(range(32)) + [99] * 8, 16)
    assert block_keys(list(range(40)), 16)[0] != block_keys([7] + list(range(1, 40)), 16)[0]


def test_cli_rejects_an_oracle_policy():
    proc = subprocess.run([sys.executable, "-m", "sim", "serve", "--policy", "srpt", "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "srpt" in proc.stderr and "Traceback" not in proc.stderr


def test_config_from_an_experiment_with_overrides_and_flags():
    import argparse

    from sim.serve import add_arguments, build_config

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = build_config(p.parse_args(["--experiment", "quickstart", "--set", "engine.max_num_seqs=7",
                                     "--latency", "constant", "--step-seconds", "0.02", "--num-gpu-blocks", "50"]))
    assert cfg.engine.max_num_seqs == 7 and cfg.engine.num_gpu_blocks == 50
    assert cfg.latency.kind == "constant" and cfg.latency.seconds == 0.02
    plain = build_config(p.parse_args([]))
    assert plain.latency.kind == "roofline" and plain.engine.model == "llama-3.1-8b"
