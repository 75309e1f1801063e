"""sim serve: an OpenAI-compatible engine timed in real time by the simulated replica."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from typing import Callable

import aiohttp
import pytest

from engine.sse import DONE, SSEParser
from sim.filler_tokens import filler_ids
from sim.realtime import RealtimeEngine, block_keys
from sim.openai_api import RequestError, parse_request, text_token_ids
from sim.serve import SimServer, serve
from test_serve_helpers import engine_config, run, start_cli_server, start_engine, wait_for


async def _stream(session, url, body, path="/v1/completions"):
    events = []
    t0 = time.monotonic()
    first = None
    async with session.post(url + path, json=body) as r:
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
    final = events[-2]  # vLLM's usage chunk: no choices, only when include_usage asks for it
    assert final["choices"] == [] and "engine_stats" not in final
    assert final["usage"] == {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    assert [("engine_stats" in e) for e in token_chunks] == [False] * 19 + [True]  # on the last token's chunk
    stats = token_chunks[-1]["engine_stats"]
    assert stats["engine"] == 3 and stats["preemptions"] == 0
    # One prefill step yields the first token, 19 decode steps the rest: 20 steps of 10 ms.
    assert stats["service"] == pytest.approx(0.2)
    assert stats["waiting"] == pytest.approx(0.0, abs=1e-9)
    assert headers["X-Engine-Index"] == "3"
    assert total >= 0.2
    assert first >= 0.01
    assert total < 2.0  # real time, not stalled


def test_prompt_token_ids_sit_where_vllm_puts_them_and_a_lone_surrogate_is_a_prompt():
    """vLLM's protocol: a completion's prompt_token_ids in its choice, a chat response's at its top
    level (whole, and the first stream chunk; sim serve put both in the choice). A JSON string with
    a lone surrogate ("\\ud83d", an emoji cut in half) was a bare 500 from str.encode."""
    async def go():
        server, engine = await start_engine(step=0.002)
        got = {}
        try:
            async with aiohttp.ClientSession() as s:
                for chat in (False, True):
                    for stream in (False, True):
                        for n in (1, 3):
                            body = {"max_tokens": n, "return_token_ids": True, "stream": stream}
                            body.update({"messages": [{"role": "user", "content": "hi\ud83d"}]} if chat
                                        else {"prompt": "hi\ud83d"})
                            path = "/v1/chat/completions" if chat else "/v1/completions"
                            if stream:
                                events, _, _, _ = await _stream(s, server.url, body, path)
                            else:  # json.dumps writes the lone surrogate as the escape \ud83d
                                async with s.post(server.url + path, json=body) as r:
                                    assert r.status == 200, await r.text()
                                    events = [await r.json()]
                            got[chat, stream, n] = events
        finally:
            await server.stop()
        return got

    got = run(go())
    for (chat, stream, n), events in got.items():
        docs = [e for e in events if e != DONE and e.get("choices")]
        assert len(docs) == (n if stream else 1)
        first = docs[0]
        where = first if chat else first["choices"][0]
        other = first["choices"][0] if chat else first
        assert isinstance(where.get("prompt_token_ids"), list) and where["prompt_token_ids"], (chat, stream, n)
        assert "prompt_token_ids" not in other, (chat, stream, n)
        assert all("prompt_token_ids" not in d and "prompt_token_ids" not in d["choices"][0] for d in docs[1:])
        assert sum(len(d["choices"][0]["token_ids"]) for d in docs) == n


def test_a_cache_salt_keeps_a_requests_blocks_apart_as_vllms_does():
    """vLLM mixes cache_salt into a request's first block hash: the same prompt under another salt (or none)
    hits nothing, under the same salt it hits. The replayer salts each replay, so a second replay on the
    same engine starts cold, as the simulator does; sim serve ignored the field and gave it the first's hits."""
    prompt = list(range(100, 164))  # 4 full blocks of 16

    async def go():
        server, _ = await start_engine(step=0.002)
        hits = []
        try:
            async with aiohttp.ClientSession() as s:
                for salt in ("run-1", "run-2", "run-1", None):
                    body = {"prompt": prompt + [7], "max_tokens": 2, **({"cache_salt": salt} if salt else {})}
                    async with s.post(server.url + "/v1/completions", json=body) as r:
                        hits.append((await r.json())["engine_stats"]["prefix_hit_tokens"])
                async with s.post(server.url + "/v1/completions",
                                  json={"prompt": prompt, "max_tokens": 2, "cache_salt": ""}) as r:
                    bad = (r.status, await r.json())
        finally:
            await server.stop()
        return hits, bad

    hits, bad = run(go())
    assert hits == [0, 0, 64, 0]
    assert bad[0] == 400 and bad[1]["error"]["message"] == "Parameter 'cache_salt' must be a non-empty string if provided."


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
    assert models["data"][0]["max_model_len"] == 131072  # Llama-3.1's context, as vLLM advertises it


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
                                  "program_total_service": None, "prompt_tokens": 3, "max_tokens": 2}]
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
                             json.dumps({"prompt": [1], "vllm_xargs": {"program_service": -1}}).encode(),
                             json.dumps({"prompt": [1], "vllm_xargs": {"program_total_service": "1"}}).encode(),
                             b'{"prompt": [1], "max_tokens": ' + b"9" * 5000 + b"}",
                             b"[" * 100_000 + b"]" * 100_000,
                             json.dumps({"prompt": [1], "stream": "false"}).encode(),
                             json.dumps({"prompt": [1], "stream": True, "stream_options": {"include_usage": 1}}).encode(),
                             json.dumps({"prompt": [1], "stream": True, "stream_options": [1]}).encode()):
                    async with s.post(server.url + "/v1/completions", data=body,
                                      headers={"Content-Type": "application/json"}) as r:
                        out.append((r.status, await r.json()))
            in_flight = engine.in_flight
        finally:
            await server.stop()
        return out, in_flight

    out, in_flight = run(go())
    assert [status for status, _ in out] == [400] * 12
    for _, body in out:
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert [(body["error"]["param"], body["error"]["message"]) for _, body in out] == [
        (None, "malformed JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        (None, "the request body must be a JSON object, got an array"),
        ("prompt", "prompt must be a string or a non-empty list of token ids >= 0 (one prompt per request), got 5"),
        ("max_tokens", "max_tokens must be an integer >= 1, got 0"),
        ("max_tokens", "'max_tokens' or 'max_completion_tokens' is too large: 1000000000. This model's maximum context "
                       "length is 131072 tokens and your request has 1 input tokens (1000000000 > 131072 - 1)."),
        ("vllm_xargs.program_service", "vllm_xargs.program_service must be a finite number of seconds >= 0, got -1"),
        ("vllm_xargs.program_total_service",
         "vllm_xargs.program_total_service must be a finite number of seconds >= 0, got '1'"),
        # Python refuses to read an integer of over 4300 digits; the field is still named.
        ("max_tokens", "max_tokens must be an integer >= 1, got a 5000-digit integer"),
        (None, "malformed JSON: nested too deeply"),
        # a string is refused rather than read as true (bool("false") is True)
        ("stream", "stream must be true or false, got a string"),
        ("stream_options.include_usage", "stream_options.include_usage must be true or false, got a number"),
        ("stream_options", "stream_options must be an object, got an array"),
    ]
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


def virtual_time_engine(policy: str, blocks: int) -> tuple[RealtimeEngine, Callable[[float], None]]:
    """A RealtimeEngine on a settable clock (1 s steps), driven without an event loop."""
    engine = RealtimeEngine(engine_config(step=1.0, blocks=blocks, max_num_seqs=4), policy)
    now = [0.0]
    engine.now = lambda: now[0]

    def at(t: float) -> None:
        now[0] = t
        engine.advance()

    return engine, at


@pytest.mark.parametrize(
    "policy, kv_ttl, a2_hit, a2_first, b_first",
    [
        # 12 blocks. r (2 blocks) runs throughout; a1 (64 + 1 tokens) finishes
        # at 3 s. b (112 tokens, 7 blocks) arrives at 3.5 s, a2 (a1's history
        # plus 15 tokens) at 4.5 s. Without a pin b evicts a1's tail.
        ("program_fcfs", 0.0, 32, 6.0, 4.0),
        # With the pin b cannot fit while r runs. Program A is older, so a2
        # goes first, hits all 64 pinned tokens and takes the pin up.
        ("program_fcfs", 10.0, 64, 5.0, 7.0),
        # Call-level FCFS: b heads the queue, so both wait for the expiry (13 s).
        ("fcfs", 10.0, 32, 15.0, 13.0),
    ],
)
def test_a_kv_ttl_tag_pins_the_calls_kv_for_its_programs_next_call(policy, kv_ttl, a2_hit, a2_first, b_first):
    engine, at = virtual_time_engine(policy, blocks=12)
    engine.submit(list(range(500, 516)), 60, "R", "r", None)
    at(1.0)
    a1_prompt = list(range(100, 164))
    a1 = engine.submit(a1_prompt, 1, "A", "a1", None, kv_ttl)
    at(3.5)
    assert a1.finished and len(engine.replica.kv_pins) == (1 if kv_ttl else 0)
    b = engine.submit(list(range(300, 412)), 2, "B", "b", None)
    at(4.5)
    a2 = engine.submit(a1_prompt + list(a1.output_ids) + list(range(200, 215)), 2, "A", "a2", None)
    at(30.0)
    assert (a2.call.prefix_hit_tokens, a2.call.first_scheduled, b.call.first_scheduled) == (a2_hit, a2_first, b_first)
    snap = engine.snapshot()
    assert (snap["kv_pins"], snap["kv_pins_held"], snap["kv_pins_dropped"]) == (1 if kv_ttl else 0, 0, 0)


def test_pins_taken_up_leave_no_expiry_entries_behind():
    """Each pin pushed an expiry entry that only its expiry removed: with kv_ttl=1e9 and every
    pin taken up by its program's next call, the heap held one entry per call ever pinned."""
    engine, at = virtual_time_engine("plas", blocks=400)
    t = 0.0
    for i in range(300):
        a = engine.submit(list(range(1, 33)), 4, f"p{i}", "a", None, 1e9)
        at(t := t + 5.0)
        engine.submit(list(range(1, 33)) + list(a.output_ids) + [7], 4, f"p{i}", "b", None)  # takes the pin up
        at(t := t + 5.0)
        replica = engine.replica
        assert len(replica.kv_pins) == 0
        assert len(replica.kv_pins._expiries) <= 2 * 1 + 64  # compacted as the 67th entry is pushed
    assert replica.kv_pins.pinned == 300


def test_two_pins_on_one_thread_are_both_held_until_each_expires_as_in_the_plugin():
    # The second call does not re-send the first's history, so it takes up
    # no pin; like engine.kv_pins.KVPins, the engine then holds both.
    engine, at = virtual_time_engine("fcfs", blocks=40)
    engine.submit(list(range(100, 164)), 1, "A", "0", None, 10.0)
    at(2.0)
    engine.submit(list(range(300, 332)), 1, "A", "0", None, 100.0)  # unrelated content: no take-up
    at(4.0)
    assert (engine.replica.kv_pins.pinned, len(engine.replica.kv_pins)) == (2, 2)
    assert engine.replica.kv.in_use == 6  # the first call's 4 blocks and the second's 2
    at(20.0)  # past the first pin's expiry, but an idle engine, like vLLM's, expires pins only when it next schedules
    assert len(engine.replica.kv_pins) == 2
    engine.submit(list(range(500, 516)), 1, "B", "0", None, 0.0)
    at(21.0)
    assert len(engine.replica.kv_pins) == 1 and engine.replica.kv.in_use == 2  # the second pin
    at(110.0)  # past the second's expiry
    engine.submit(list(range(600, 616)), 1, "C", "0", None, 0.0)
    at(111.0)
    assert len(engine.replica.kv_pins) == 0 and engine.replica.kv.in_use == 0


def test_sim_serve_refuses_an_engine_kv_ttl():
    cfg = engine_config()
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, kv_ttl=2.0))
    with pytest.raises(ValueError) as err:
        RealtimeEngine(cfg, "fcfs")
    assert str(err.value) == ("engine.kv_ttl: expected 0 for sim serve, got 2.0. A live engine does not know which "
                              "calls have follow-ups; it pins the calls whose request carries vllm_xargs.kv_ttl "
                              "(python -m engine replay --kv-ttl SECONDS)")


def test_parse_request_rules():
    req = parse_request({"prompt": [[5, 6, 7]], "max_tokens": 4, "stream": True,
                         "stream_options": {"include_usage": True}}, chat=False, served_model="m")
    assert req.prompt_ids == [5, 6, 7] and req.max_tokens == 4 and req.stream and req.include_usage
    assert req.program_id is None and req.model == "m"
    with pytest.raises(RequestError, match=r"^n must be 1 \(one completion per request\), got 2$") as err:
        parse_request({"prompt": [1], "n": 2}, chat=False, served_model="m")
    assert err.value.param == "n"
    with pytest.raises(RequestError, match=r"^messages must be a non-empty list$") as err:
        parse_request({"messages": []}, chat=True, served_model="m")
    assert err.value.param == "messages"
    assert req.kv_ttl == 0.0
    assert parse_request({"prompt": [1], "vllm_xargs": {"kv_ttl": 2}}, chat=False, served_model="m").kv_ttl == 2.0
    for bad, got in ((-1, "-1"), ("2", "'2'"), (True, "True"), (float("nan"), "nan")):
        with pytest.raises(RequestError) as err:
            parse_request({"prompt": [1], "vllm_xargs": {"kv_ttl": bad}}, chat=False, served_model="m")
        assert str(err.value) == f"vllm_xargs.kv_ttl must be a finite number of seconds >= 0, got {got}"
        assert err.value.param == "vllm_xargs.kv_ttl"
    for bad, got in ((float("inf"), "inf"), (float("nan"), "nan"), ("3", "'3'")):  # refused as the plugin does
        with pytest.raises(RequestError) as err:
            parse_request({"prompt": [1], "vllm_xargs": {"program_service": bad}}, chat=False, served_model="m")
        assert str(err.value) == f"vllm_xargs.program_service must be a finite number of seconds >= 0, got {got}"
        assert err.value.param == "vllm_xargs.program_service"
    assert len(text_token_ids("abcdefghi")) == 3  # ceil(9 / 4)
    assert block_keys(list(range(40)), 16)[:2] == block_keys(list(range(32)) + [99] * 8, 16)
    assert block_keys(list(range(40)), 16)[0] != block_keys([7] + list(range(1, 40)), 16)[0]


def test_cli_rejects_an_oracle_policy():
    proc = subprocess.run([sys.executable, "-m", "sim", "serve", "--policy", "srpt", "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == ("python -m sim serve: error: policy 'srpt' needs the trace's future "
                           "and cannot serve live requests; valid choices: fcfs, mlfq, plas, atlas, program_fcfs\n")
    # A typo's list of choices offered srpt, which the next try then refused.
    proc = subprocess.run([sys.executable, "-m", "sim", "serve", "--policy", "plsa", "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == ("python -m sim serve: error: unknown policy 'plsa'; valid choices: fcfs, mlfq, plas, atlas, "
                           "program_fcfs\n")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "argument --port: expected a port from 0 to 65535, got 70000"),
        (["--max-num-seqs", "-1"], "argument --max-num-seqs: expected an integer >= 1, got -1"),
        (["--num-gpu-blocks", "0"], "argument --num-gpu-blocks: expected an integer >= 1, got 0"),
    ],
)
def test_cli_rejects_bad_numbers_as_usage_errors(args, message):
    proc = subprocess.run([sys.executable, "-m", "sim", "serve", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"python -m sim serve: error: {message}"


def test_cli_reports_a_port_in_use():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "sim", "serve", "--latency", "constant", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"python -m sim serve: error: cannot listen on 127.0.0.1:{port}: " in proc.stderr
    assert "on http://" not in proc.stderr  # it was announced as served before the bind failed


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
    # --latency changes the kind only: the experiment's roofline settings went back to their defaults
    tuned = build_config(p.parse_args(["--experiment", "quickstart", "--set", "latency.kind=roofline",
                                       "--set", "latency.flops_efficiency=0.3", "--set", "latency.step_overhead=0.01",
                                       "--latency", "roofline"]))
    assert (tuned.latency.flops_efficiency, tuned.latency.step_overhead) == (0.3, 0.01)
    # --gpu alone takes `vllm serve`'s sequence cap and token budget for that GPU; flags still win.
    h100 = build_config(p.parse_args(["--gpu", "h100"]))
    assert (h100.engine.max_num_seqs, h100.engine.max_num_batched_tokens) == (1024, 8192)
    capped = build_config(p.parse_args(["--gpu", "h100", "--max-num-seqs", "64"]))
    assert (capped.engine.max_num_seqs, capped.engine.max_num_batched_tokens) == (64, 8192)
    assert (plain.engine.max_num_seqs, plain.engine.max_num_batched_tokens) == (256, 2048)
    # --model alone spans its spec's tensor_parallel, as an experiment that leaves the count unset:
    # 70B on the default single GPU did not fit, and no flag could say otherwise.
    assert build_config(p.parse_args(["--model", "llama-3.1-70b"])).engine.gpus_per_replica == 4
    assert build_config(p.parse_args(["--model", "llama-3.1-70b", "--gpus-per-replica", "8"])).engine.gpus_per_replica == 8
    assert plain.engine.gpus_per_replica == 1


@pytest.mark.parametrize("seconds", ["inf", "1e-12", "1e5", "-0.01", "0", "nan"])
def test_sim_serve_refuses_step_times_no_gpu_takes(seconds):
    """The flags apply after the experiment's check: inf killed the engine on the first request, 1e-12 gave
    zero-length steps, 1e5 s hung every request. Each is named as the flag: -0.01 and nan said "constant
    latency must be > 0 seconds", the others "latency model 'constant' gives ...", and no flag is called that."""
    proc = subprocess.run([sys.executable, "-m", "sim", "serve", "--latency", "constant", "--step-seconds", seconds,
                           "--port", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr == (
        "python -m sim serve: error: --step-seconds: expected the seconds of one engine step, from 1e-06 to 3600, "
        f"got {float(seconds)}\n"), proc.stderr


def test_chat_messages_in_openais_other_forms_are_accepted():
    """Content parts and an assistant turn of tool calls with null content were 400s; vLLM takes them."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "t1", "type": "function",
                                                                       "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "42"}]
    req = parse_request({"messages": messages}, chat=True, served_model="m")
    plain = parse_request({"messages": [{"role": "user", "content": "hello there"}]}, chat=True, served_model="m")
    assert len(req.prompt_ids) > len(plain.prompt_ids)
    for bad, message in (([{"role": "user", "content": 5}], "messages[0].content: expected a string, a list of "
                                                            "content parts or null, got a number"),
                         ([{"role": "user", "content": [7]}], "messages[0].content[0]: expected a content part "
                                                              "object, got a number"),
                         (["hi"], "messages[0]: expected an object, got a string")):
        with pytest.raises(RequestError) as err:
            parse_request({"messages": bad}, chat=True, served_model="m")
        assert str(err.value) == message


def test_async_a_call_submitted_mid_step_waits_a_step_and_can_be_aborted_there():
    # Async scheduling, 1 s steps: A runs from 0. B is submitted at 1.5,
    # while step [1,2) runs: step [2,3) was already scheduled, so B is held
    # back for the step that vLLM schedules at 2 and the simulator decides
    # at 3, when it starts. C, submitted at 1.5 too, is aborted while held
    # back and never runs.
    config = engine_config(step=1.0, max_num_seqs=4)
    engine = RealtimeEngine(dataclasses.replace(config, engine=dataclasses.replace(config.engine, async_scheduling=True)), "fcfs")
    now = [0.0]
    engine.now = lambda: now[0]

    def at(t: float) -> None:
        now[0] = t
        engine.advance()

    engine.submit(list(range(100, 116)), 10, "A", "a", None)
    at(1.5)
    b = engine.submit(list(range(200, 216)), 3, "B", "b", None)
    c = engine.submit(list(range(300, 316)), 3, "C", "c", None)
    assert engine.replica.load == 3 and b.call not in engine.replica.waiting  # held back, still counted
    engine.abort(c)
    assert engine.replica.load == 2
    at(2.5)  # the step [2,3) runs without B
    assert b.call not in engine.replica.waiting and b.call.first_scheduled < 0
    at(3.5)
    assert b.call in engine.replica.running
    at(4.5)
    assert b.call.first_scheduled == 3.0 and c.call.first_scheduled < 0
    at(20.0)
    assert engine.replica.load == 0 and engine.replica.kv.in_use == 0
    assert engine.snapshot()["aborted"] == 1


def test_an_aborted_call_frees_its_kv_and_is_never_pinned():
    engine, at = virtual_time_engine("fcfs", blocks=40)
    handle = engine.submit(list(range(100, 164)), 50, "A", "a1", None, 30.0)
    at(3.5)  # running: prefilled, decoding
    assert handle.call in engine.replica.running
    engine.abort(handle)
    at(60.0)
    assert (engine.replica.kv_pins.pinned, len(engine.replica.kv_pins), engine.replica.kv.in_use) == (0, 0, 0)
    assert engine.snapshot()["aborted"] == 1


def test_a_second_call_on_a_busy_thread_is_refused_even_before_the_scheduler_sees_the_first():
    from sim.realtime import Conflict

    engine, at = virtual_time_engine("plas", blocks=40)
    engine.submit(list(range(100, 116)), 5, "R", "r", None)  # a step is in flight from t = 0
    at(0.5)
    engine.submit(list(range(200, 216)), 2, "A", "0", None)  # joins the scheduler when the step ends
    assert engine.replica.is_arriving("A", "0")
    with pytest.raises(Conflict, match=r"^program 'A' already has a live call on thread '0'$"):
        engine.submit(list(range(300, 316)), 2, "A", "0", None)
    at(1.0)
    assert not engine.replica.is_arriving("A", "0") and "0" in engine.table.get("A").live


def test_parse_request_refuses_another_model_and_an_empty_prompt_as_vllm_does():
    with pytest.raises(RequestError, match=r"^the model 'gpt-4' does not exist; this engine serves 'm'$") as err:
        parse_request({"model": "gpt-4", "prompt": [1]}, chat=False, served_model="m")
    assert (err.value.status, err.value.param) == (404, "model")
    assert parse_request({"model": "m", "prompt": [1]}, chat=False, served_model="m").model == "m"
    assert parse_request({"model": "", "prompt": [1]}, chat=False, served_model="m").model == "m"  # as vLLM
    with pytest.raises(RequestError, match=r"^prompt must not be empty$") as err:
        parse_request({"prompt": ""}, chat=False, served_model="m")
    assert (err.value.status, err.value.param) == (400, "prompt")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "engine.max_num_seqs=4"], "--set and --experiments apply to an experiment: name it with --experiment"),
        (["-e", "experiments.yaml"], "--set and --experiments apply to an experiment: name it with --experiment"),
        (["--experiment", "quickstart"], "experiment 'quickstart' compares fcfs, mlfq, plas, atlas, srpt: "
                                         "choose this engine's with --policy"),
    ],
)
def test_sim_serve_refuses_settings_it_would_ignore(argv, message, capsys):
    from sim.serve import main

    assert main(argv) == 1
    assert capsys.readouterr().err == f"python -m sim serve: error: {message}\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--policy", "plas", "--step-seconds", "0.5"],
         "--step-seconds: the roofline latency kind (the default) does not use it (the constant kind does); "
         "add --latency constant, or drop --step-seconds"),
        (["--experiment", "quickstart", "--policy", "plas", "--step-seconds", "0.5"],
         "--step-seconds: the fitted latency kind (experiment 'quickstart') does not use it (the constant kind "
         "does); add --latency constant, or drop --step-seconds"),
        (["--latency", "constant", "--latency-name", "a100-llama-3.1-8b"],
         "--latency-name: the constant latency kind (--latency) does not use it (the fitted kind does); "
         "add --latency fitted, or drop --latency-name"),
        (["--latency-name", "a100-llama-3.1-8b"],
         "--latency-name: the roofline latency kind (the default) does not use it (the fitted kind does); "
         "add --latency fitted, or drop --latency-name"),
    ],
    ids=["step-under-default", "step-under-experiment", "name-under-constant", "name-under-default"],
)
def test_sim_serve_refuses_a_latency_flag_its_kind_does_not_use(argv, message, capsys):
    """--step-seconds under the default roofline started the engine without a word (an experiment refuses the
    equivalent latency.seconds under another kind). build_config first, so the old code fails, not serves."""
    import argparse

    from sim.serve import add_arguments, build_config, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError) as err:
        build_config(parser.parse_args(argv))
    assert str(err.value) == message
    assert main(argv) == 1
    assert capsys.readouterr().err == f"python -m sim serve: error: {message}\n"


def test_sim_serve_takes_the_experiments_only_policy_and_refuses_a_negative_index(capsys):
    import argparse

    from sim.serve import add_arguments, build_config, serve_policy

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--experiment", "quickstart", "--set", "policies=[program_fcfs]"])
    assert serve_policy(args, build_config(args)) == "program_fcfs"
    assert serve_policy(parser.parse_args([]), build_config(parser.parse_args([]))) == "plas"
    with pytest.raises(SystemExit):
        parser.parse_args(["--index", "-5"])
    last = capsys.readouterr().err.splitlines()[-1]  # "PROG: error: ...", PROG being argparse's default
    assert last.endswith(": error: argument --index: expected an integer >= 0, got -5")


def test_sim_serve_takes_max_model_len_as_vllm_serve_does(capsys):
    import argparse

    from sim.serve import add_arguments, build_config, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = build_config(parser.parse_args(["--max-model-len", "4096"]))
    assert cfg.engine.max_model_len == 4096 and RealtimeEngine(cfg, "fcfs").max_model_len == 4096
    assert main(["--max-model-len", "131073"]) == 1
    assert capsys.readouterr().err == ("python -m sim serve: error: --max-model-len 131073: engine.max_model_len: "
                                       "expected at most "
                                       "llama-3.1-8b's context (max_position_embeddings: 131072), as vLLM requires, "
                                       "got 131073\n")


def test_without_chunked_prefill_a_prompt_past_the_token_budget_is_refused_not_left_to_stall():
    config = engine_config(step=0.01)
    eng = dataclasses.replace(config.engine, enable_chunked_prefill=False, max_num_batched_tokens=512)
    engine = RealtimeEngine(dataclasses.replace(config, engine=eng), "fcfs")
    engine.now = lambda: 0.0
    from sim.realtime import TooLarge

    with pytest.raises(TooLarge, match=r"prompt \(600 tokens\) plus max_tokens \(4\) exceeds this engine's token "
                                       r"budget of 512 \(engine.max_num_batched_tokens\)"):
        engine.submit(list(range(600)), 4, "A", "a", None)
    assert engine.in_flight == 0 and engine.replica.load == 0
    engine.submit(list(range(500)), 4, "B", "b", None)  # fits: served as usual


def test_a_request_past_max_model_len_or_the_kv_cache_is_refused_in_vllms_words():
    """The limit was the KV cache alone (450,896 tokens on an A100), where vLLM refuses a request past
    max_model_len (131,072 for Llama-3.1), and /v1/models advertised the cache as max_model_len."""
    from sim.realtime import TooLarge

    config = engine_config(step=0.01)
    engine = RealtimeEngine(dataclasses.replace(config, engine=dataclasses.replace(config.engine, max_model_len=4096)),
                            "fcfs")
    engine.now = lambda: 0.0
    assert (engine.max_model_len, engine.kv_tokens) == (4096, 64000)
    with pytest.raises(TooLarge) as info:
        engine.submit(list(range(4096)), 1, "A", "a", None)
    assert (str(info.value), info.value.param) == (
        "This model's maximum context length is 4096 tokens. However, your request has 4096 input tokens. Please "
        "reduce the length of the input messages.", "prompt")
    with pytest.raises(TooLarge) as info:
        engine.submit(list(range(4000)), 97, "A", "a", None)
    assert (str(info.value), info.value.param) == (
        "'max_tokens' or 'max_completion_tokens' is too large: 97. This model's maximum context length is 4096 "
        "tokens and your request has 4000 input tokens (97 > 4096 - 4000).", "max_tokens")
    assert engine.in_flight == 0 and engine.replica.load == 0
    engine.submit(list(range(4000)), 96, "B", "b", None)  # exactly max_model_len: served
    # engine.num_gpu_blocks may leave less KV than max_model_len (vLLM checks the memory, not the override).
    small = dataclasses.replace(config.engine, num_gpu_blocks=100)
    engine = RealtimeEngine(dataclasses.replace(config, engine=small), "fcfs")
    engine.now = lambda: 0.0
    with pytest.raises(TooLarge, match=r"^prompt \(1500 tokens\) plus max_tokens \(101\) exceeds this engine's KV "
                                       r"cache of 1600 tokens \(engine.num_gpu_blocks, sim serve's --num-gpu-blocks\)$"):
        engine.submit(list(range(1500)), 101, "A", "a", None)


def test_an_engine_model_error_fails_every_live_call_and_refuses_new_ones():
    """A model error (e.g. the livelock check) used to kill the drive task silently: clients waited forever."""
    from sim.realtime import EngineFailed

    engine = RealtimeEngine(engine_config(step=1.0, max_num_seqs=4), "fcfs")
    now = [0.0]
    engine.now = lambda: now[0]
    a = engine.submit(list(range(100, 116)), 10, "A", "a", None)
    b = engine.submit(list(range(200, 216)), 10, "B", "b", None)

    def boom(call, new_tokens, sampled):
        raise RuntimeError("boom")

    engine.replica.on_progress = boom
    now[0] = 2.5
    with pytest.raises(EngineFailed, match=r"engine 0 stopped at t=\S+ s: boom"):
        engine.advance()
    for handle in (a, b):
        assert handle.done and handle.failure == engine.failure and handle.queue.get_nowait() is None
    with pytest.raises(EngineFailed):
        engine.submit(list(range(300, 316)), 3, "C", "c", None)
    engine.abort(a)  # nothing to do, and no error
    assert engine.snapshot()["failure"] == engine.failure


def test_sim_serve_reports_an_engine_failure_in_the_stream_as_vllm_does():
    async def go():
        server, engine = await start_engine(step=0.01)
        try:
            async with aiohttp.ClientSession() as s:
                r = await s.post(server.url + "/v1/completions",
                                 json={"prompt": [1, 2, 3], "max_tokens": 50, "stream": True})
                await r.content.readline()  # the first token arrived

                def boom(call, new_tokens, sampled):
                    raise RuntimeError("boom")

                engine.replica.on_progress = boom
                parser, events = SSEParser(), []
                async for chunk in r.content.iter_any():
                    events += parser.feed(chunk)
                async with s.post(server.url + "/v1/completions", json={"prompt": [1], "max_tokens": 2}) as later:
                    return events, later.status, await later.json()
        finally:
            await server.stop()

    events, status, body = run(go())
    assert events[-1] == DONE and "boom" in events[-2]["error"]["message"]
    assert status == 503 and "engine 0 stopped" in body["error"]["message"]


def test_an_anonymous_request_never_joins_a_client_program_of_the_same_name():
    engine = RealtimeEngine(engine_config(step=1.0, max_num_seqs=4), "fcfs")
    engine.now = lambda: 0.0
    engine.submit(list(range(100, 116)), 10, "req-2", "0", None)  # a client's own program id
    anon = engine.submit(list(range(200, 216)), 10, None, None, None)  # the engine's 2nd request
    assert anon.call.program_id == "req-2.1"


def test_a_forwarded_program_service_does_not_make_the_call_starve_at_once():
    """The gateway's program_service raised only the priority; with T_program
    still 0 here, the starvation deadline was the arrival, and the call of a
    program with 50 s of service jumped to the top queue on its first step.
    The plugin seeds T_program too."""
    engine = RealtimeEngine(engine_config(step=0.01, max_num_seqs=1), "plas")
    now = [0.0]
    engine.now = lambda: now[0]
    engine.submit(list(range(100, 130)), 50, "B", "b", None)
    a = engine.submit(list(range(200, 300)), 5, "A", "a", 50.0)
    assert engine.table.get("A").total_service == 50.0
    now[0] = 0.02  # A joins the scheduler when the first step ends
    engine.advance()
    queue = a.call.core.queue
    assert queue > 0
    now[0] = 0.3  # B runs; A waits 0.3 s, far short of beta x 50 s
    engine.advance()
    assert not a.call.core.running and a.call.core.queue == queue


@pytest.mark.parametrize("total, promoted", [(None, True), (1000.0, False)])
def test_atlas_starvation_counts_the_programs_total_service_not_its_critical_path(total, promoted):
    """Under ATLAS the forwarded priority is the program's critical path (100 s here), less than
    the sum of its service (1000 s). T_program seeded with the priority made the call starve
    after beta x 100 = 800 s of waiting; with the gateway's total it takes beta x 1000 s."""
    engine = RealtimeEngine(engine_config(step=1.0, max_num_seqs=1), "atlas")
    now = [0.0]
    engine.now = lambda: now[0]
    engine.submit(list(range(100, 130)), 5000, "B", "b", None)  # 5000 s of decoding in the only seat
    a = engine.submit(list(range(200, 300)), 5, "A", "a", 100.0, total_service=total)
    entry = engine.table.get("A")
    assert (entry.service, entry.total_service) == (100.0, 100.0 if total is None else total)
    now[0] = 1.0
    engine.advance()
    last = engine.core.policy.queue_of(100.0)
    assert a.call.core.queue == last and not a.call.core.running  # B never falls below it
    now[0] = 900.0  # A has waited about 899 s: past 8 x 100 s, short of 8 x 1000 s
    engine.advance()
    # Promoted to the top queue, A displaces B and is done by now; else it still waits.
    assert a.call.core.finished is promoted
    assert promoted or (a.call.core.queue == last and not a.call.core.running)


def test_a_program_whose_call_waits_for_the_step_in_flight_is_not_expired():
    """A call submitted during a step joins the scheduler when the step ends; an
    expiry in between dropped its program as idle, with the 100 s the gateway
    forwarded, and the call entered the top queue with priority 0. The plugin
    registers a call at once, so it ranked the same request in queue 7."""
    config = engine_config(step=1.0, max_num_seqs=4)
    config = dataclasses.replace(config, policy_params=dataclasses.replace(config.policy_params, program_ttl=0.5))
    engine = RealtimeEngine(config, "plas")
    now = [0.0]
    engine.now = lambda: now[0]
    engine.submit(list(range(100, 110)), 1, "P", "a", None)
    now[0] = 1.0
    engine.advance()  # P's first call is done; P is idle
    engine.submit(list(range(200, 210)), 20, "Q", "q", None)
    now[0] = 1.5
    engine.advance()  # a step of Q is in flight
    b = engine.submit(list(range(300, 310)), 1, "P", "b", 100.0)
    assert engine.expire() == []
    now[0] = 2.0
    engine.advance()
    assert b.call.core.priority == 100.0 and b.call.core.queue == engine.core.policy.queue_of(100.0) == 7
    now[0] = 4.0
    engine.advance()
    assert engine.expire() == ["P"]  # idle again once its call is done


def test_calls_without_a_thread_id_are_each_their_own_thread():
    """As the plugin (the request id): two concurrent untagged calls of one program got 409."""
    engine = RealtimeEngine(engine_config(step=1.0, max_num_seqs=4), "fcfs")
    engine.now = lambda: 0.0
    a = engine.submit(list(range(100, 116)), 10, "P", None, None)
    b = engine.submit(list(range(200, 216)), 10, "P", None, None)
    assert a.call.call_id != b.call.call_id
    # a client may name a thread as the engine would; the engine's pick steps aside
    engine.submit(list(range(300, 316)), 10, "Q", "req-4", None)
    c = engine.submit(list(range(400, 416)), 10, "Q", None, None)  # the engine's 4th request
    assert c.call.call_id == "req-4#1"


def test_health_is_503_once_the_engine_has_failed():
    async def go():
        server, engine = await start_engine(step=0.01)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(server.url + "/health") as r:
                    before = r.status
                engine.failure = "engine 0 stopped at t=1 s: boom"
                async with s.get(server.url + "/health") as r:
                    return before, r.status
        finally:
            await server.stop()

    assert run(go()) == (200, 503)


def test_an_engine_behind_real_time_still_lets_the_server_run():
    """When the model falls behind the clock (steps shorter than computing them), the
    driver looped without yielding: no token was streamed and /health went
    unanswered until every call had finished."""
    async def go():
        engine = RealtimeEngine(engine_config(step=0.001, max_num_seqs=4), "fcfs")
        await engine.start()
        engine.now = lambda: engine.env.now + 1.0  # always a second behind
        try:
            handle = engine.submit(list(range(100, 116)), 2000, "A", "a", None)
            await asyncio.sleep(0)
            return handle.done
        finally:
            await engine.stop()

    assert run(go(), timeout=30) is False


def test_the_routers_own_errors_and_out_of_range_tags_are_openai_errors():
    """aiohttp's 404 and 405 were plain text ("404: Not Found"); a kv_ttl of 1e300 s was taken."""
    async def go():
        server, _ = await start_engine()
        out = []
        try:
            async with aiohttp.ClientSession() as s:
                for method, path, body in (("POST", "/v1/nope", {}), ("GET", "/v1/completions", None),
                                           ("POST", "/v1/completions", {"prompt": [1], "vllm_xargs": {"kv_ttl": 1e300}}),
                                           ("POST", "/v1/completions",
                                            {"prompt": [1], "vllm_xargs": {"program_service": 2e9}})):
                    async with s.request(method, server.url + path, json=body) as r:
                        out.append((r.status, await r.json(), r.headers.get("Allow")))
        finally:
            await server.stop()
        return out

    (nope, wrong, ttl, service) = run(go())
    assert nope[:2] == (404, {"error": {"message": "unknown route POST /v1/nope", "type": "not_found_error",
                                        "param": None, "code": None}})
    assert wrong[0] == 405 and wrong[1]["error"]["message"] == "method GET is not allowed on /v1/completions"
    assert wrong[2] == "POST"
    assert ttl[:2] == (400, {"error": {"message": "vllm_xargs.kv_ttl must be at most 1e+09 seconds, got 1e+300",
                                       "type": "invalid_request_error", "param": "vllm_xargs.kv_ttl", "code": None}})
    assert service[1]["error"]["message"] == "vllm_xargs.program_service must be at most 1e+09 seconds, got 2000000000.0"


def test_a_request_the_http_parser_refuses_is_logged_in_one_line():
    """aiohttp answers it 400 and logged a whole traceback per bad client request."""
    import logging

    from aiohttp.http_exceptions import BadHttpMessage

    from sim.http_site import MalformedRequestsInOneLine

    try:
        raise BadHttpMessage("Invalid header value char:\n\n  b'X: p\\x00'\n     ^")
    except BadHttpMessage:
        import sys as _sys

        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (),
                                   _sys.exc_info())
    assert MalformedRequestsInOneLine().filter(record)
    assert record.exc_info is None
    assert record.getMessage() == "refused a malformed HTTP request (400): Invalid header value char: b'X: p\\x00' ^"
    other = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (),
                              (ValueError, ValueError("boom"), None))
    assert MalformedRequestsInOneLine().filter(other) and other.exc_info is not None  # a real bug keeps its traceback


# -- fields sim serve does not act on, checked as vLLM 0.26.0 checks them ------------------------------

# (chat, extra fields, param): vLLM 0.26.0 answers 400 to each (its pydantic request models, their
# validators and SamplingParams); sim serve answered 200 to the first ones, ignoring the field.
VLLM_REFUSES = [
    # pydantic reads "1e2" as no int; vLLM refuses stream_options without stream (validate_stream_options)
    (False, {"seed": "1e2"}, "seed"), (True, {"seed": "1E2"}, "seed"), (False, {"logprobs": "5."}, "logprobs"),
    (False, {"seed": ".0"}, "seed"), (False, {"seed": "5.0_0"}, "seed"), (False, {"seed": "\x1c5.0"}, "seed"),
    (False, {"seed": "9" * 4301 + ".0"}, "seed"),  # was a 500: int() past Python's 4,300 digits
    (False, {"temperature": "\x1c0.5"}, "temperature"),  # Python's float() trims \x1c, pydantic does not
    (False, {"stream_options": {"include_usage": True}}, "stream_options"),
    (True, {"stream": False, "stream_options": {"include_usage": False}}, "stream_options"),
    (False, {"stream": 0, "stream_options": "x"}, "stream_options"),
    (False, {"temperature": "hot"}, "temperature"), (False, {"temperature": -1}, "temperature"),
    (False, {"temperature": 2.5}, "temperature"), (False, {"temperature": float("nan")}, "temperature"),
    (False, {"top_p": "x"}, "top_p"), (False, {"top_p": 5}, "top_p"), (False, {"top_p": 0}, "top_p"),
    (False, {"stop": {}}, "stop"), (False, {"stop": [""]}, "stop"), (False, {"stop": [1]}, "stop"),
    (False, {"logprobs": "x"}, "logprobs"), (False, {"logprobs": 100}, "logprobs"),
    (False, {"logprobs": -1}, "logprobs"), (False, {"logprobs": 2.5}, "logprobs"),
    (False, {"seed": "x"}, "seed"), (False, {"seed": 2 ** 63}, "seed"),
    (False, {"logit_bias": [1]}, "logit_bias"), (False, {"logit_bias": {"x": 1}}, "logit_bias"),
    (False, {"logit_bias": {"-1": 1}}, "logit_bias"), (False, {"logit_bias": {"5": None}}, "logit_bias"),
    (False, {"ignore_eos": "x"}, "ignore_eos"), (False, {"ignore_eos": 2}, "ignore_eos"),
    (False, {"ignore_eos": None}, "ignore_eos"), (False, {"echo": "x"}, "echo"),
    (False, {"user": 5}, "user"), (False, {"suffix": 5}, "suffix"), (False, {"model": 0}, "model"),
    (False, {"frequency_penalty": 3}, "frequency_penalty"), (False, {"repetition_penalty": 0}, "repetition_penalty"),
    (False, {"min_p": 2}, "min_p"), (False, {"top_k": -2}, "top_k"), (False, {"top_k": 1.5}, "top_k"),
    (False, {"min_tokens": -1}, "min_tokens"), (False, {"min_tokens": 17}, "min_tokens"),
    (False, {"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    (False, {"truncation_side": "up"}, "truncation_side"), (False, {"allowed_token_ids": []}, "allowed_token_ids"),
    (False, {"prompt_logprobs": -1}, "prompt_logprobs"), (False, {"prompt_logprobs": 21}, "prompt_logprobs"),
    (False, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    (False, {"logprob_token_ids": [1]}, "logprob_token_ids"),
    (False, {"bad_words": [""]}, "bad_words"), (False, {"priority": "x"}, "priority"),
    (False, {"request_id": 5}, "request_id"), (False, {"length_penalty": None}, "length_penalty"),
    (False, {"stop_token_ids": ["a"]}, "stop_token_ids"), (False, {"thinking_token_budget": -2}, "thinking_token_budget"),
    (False, {"thinking_token_budget": "3"}, "thinking_token_budget"), (False, {"response_format": 5}, "response_format"),
    (True, {"temperature": "hot"}, "temperature"), (True, {"user": 5}, "user"), (True, {"stop": {}}, "stop"),
    (True, {"logprobs": 3}, "logprobs"), (True, {"top_logprobs": 5}, "top_logprobs"),
    (True, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"), (True, {"echo": None}, "echo"),
    (True, {"tools": []}, "tools"), (True, {"tool_choice": "auto"}, "tool_choice"),
    (True, {"reasoning_effort": "x"}, "reasoning_effort"), (True, {"documents": [{"a": 1}]}, "documents"),
    (True, {"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    (True, {"min_tokens": 11, "max_completion_tokens": 10}, "min_tokens"),
]

# vLLM 0.26.0 takes these (pydantic's lax mode reads "0.5" as a number, 1 and "yes" as true; fields it
# does not declare are ignored, best_of among them), so sim serve must too.
VLLM_TAKES = [
    (False, {"seed": "\xa05"}), (False, {"seed": "5\u3000"}), (False, {"seed": "0" * 4400 + "5.0"}),
    (False, {"temperature": "\xa00.5"}), (False, {"seed": " 5.0 "}), (False, {"seed": "1_0.00"}), (True, {"seed": "-3.0"}), (False, {"stream_options": {}}),
    (False, {"stream_options": None}), (True, {"stream": True, "stream_options": {"include_usage": True}}),
    (False, {"temperature": "0.5"}), (False, {"temperature": True}), (False, {"temperature": None}),
    (False, {"temperature": 0}), (False, {"temperature": 2}), (False, {"top_p": "1"}), (False, {"stop": None}),
    (False, {"stop": "x"}), (False, {"seed": "5"}),
    (False, {"seed": -1}), (False, {"logit_bias": {"5": "1"}}), (False, {"logit_bias": {" 5": 1e9}}),
    (False, {"ignore_eos": "true"}), (False, {"ignore_eos": 1}), (False, {"echo": None}), (False, {"best_of": 0}),
    (False, {"no_such_field": {}}), (False, {"model": None}), (False, {"model": ""}), (False, {"min_tokens": 16}),
    (False, {"logprobs": None}), (True, {"logprobs": False}), (False, {"prompt_logprobs": None}),
    (False, {"use_beam_search": False}), (True, {"response_format": {"type": "text"}}),
    (False, {"return_tokens_as_token_ids": "no"}), (True, {"echo": False}),
    (False, {"thinking_token_budget": -1}), (False, {"top_k": "3"}), (False, {"presence_penalty": "-2.0"}),
    (True, {"suffix": 5}), (True, {"best_of": 0}),
    (True, {"top_logprobs": 0}), (True, {"tool_choice": "none"}), (True, {"min_tokens": 100}),
    (True, {"reasoning_effort": "high"}), (True, {"documents": [{"a": "b"}]}),
]

# vLLM 0.26.0 takes these and acts on them by changing what its response holds; sim serve cannot, so it
# refuses them (400 naming the field) rather than answer as if they were not there ("echo": true was a 200
# without the prompt).
SIM_SERVE_CANNOT = [
    (False, {"echo": True}, "echo"), (False, {"echo": "yes"}, "echo"), (True, {"echo": True}, "echo"),
    (False, {"logprobs": 0}, "logprobs"), (False, {"logprobs": 3.0}, "logprobs"), (False, {"logprobs": 20}, "logprobs"),
    (False, {"logprob_token_ids": [1], "logprobs": 1}, "logprobs"), (True, {"logprobs": True}, "logprobs"),
    (True, {"logprobs": True, "top_logprobs": 5}, "logprobs"),
    (False, {"prompt_logprobs": 0, "stream": True}, "prompt_logprobs"), (True, {"prompt_logprobs": 2}, "prompt_logprobs"),
    (False, {"use_beam_search": True}, "use_beam_search"),
    (True, {"return_tokens_as_token_ids": True}, "return_tokens_as_token_ids"),
    (True, {"structured_outputs": {"regex": "[0-9]+"}}, "structured_outputs"),
    (False, {"response_format": {"type": "json_object"}}, "response_format"),
]


def _body(chat: bool, extra: dict) -> dict:
    return {**({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}), **extra}


@pytest.mark.parametrize("chat,extra,param", VLLM_REFUSES)
def test_fields_vllm_refuses_are_refused_naming_the_field(chat, extra, param):
    with pytest.raises(RequestError) as err:
        parse_request(_body(chat, extra), chat=chat, served_model="sim")
    assert err.value.status == 400 and err.value.param == param
    assert err.value.message.startswith(param + " ")


def test_stream_options_without_stream_is_refused_before_the_fields_sim_serve_reads_as_vllm():
    # vLLM's validate_stream_options is a mode="before" validator: a wrong model or n is not reached.
    for chat in (False, True):
        body = {**_body(chat, {}), "model": "other", "n": 2, "stream_options": {"include_usage": True}}
        with pytest.raises(RequestError) as err:
            parse_request(body, chat=chat, served_model="sim")
        assert (err.value.status, err.value.param) == (400, "stream_options")
        assert err.value.message == "stream_options can only be given with stream true, as vLLM requires"


@pytest.mark.parametrize("chat,extra", VLLM_TAKES)
def test_fields_vllm_takes_are_taken(chat, extra):
    parse_request(_body(chat, extra), chat=chat, served_model="sim")


@pytest.mark.parametrize("chat,extra,param", SIM_SERVE_CANNOT)
def test_fields_vllm_acts_on_and_sim_serve_cannot_are_refused_not_ignored(chat, extra, param):
    with pytest.raises(RequestError) as err:
        parse_request(_body(chat, extra), chat=chat, served_model="sim")
    assert (err.value.status, err.value.param) == (400, param)
    assert err.value.message.startswith(f"{param} {json.dumps(extra[param])}: sim serve does not support it; vLLM "
                                        "would ")


def test_echo_true_is_refused_over_http_and_false_is_fine():
    """"echo": true was type-checked, then ignored: a 200 without the prompt vLLM would have echoed."""
    async def go():
        server, engine = await start_engine()
        out = []
        try:
            async with aiohttp.ClientSession() as s:
                for echo in (True, False):
                    async with s.post(server.url + "/v1/completions",
                                      json={"prompt": [1, 2], "max_tokens": 1, "echo": echo}) as r:
                        out.append((r.status, await r.json()))
        finally:
            await server.stop()
        return out

    (refused, doc), (taken, _) = run(go())
    assert (refused, taken) == (400, 200)
    assert doc["error"]["param"] == "echo"
    assert doc["error"]["message"] == ("echo true: sim serve does not support it; vLLM would echo the prompt in the "
                                       "response; leave echo out or false")


def test_field_errors_name_field_expected_and_got():
    def message(extra, chat=False):
        with pytest.raises(RequestError) as err:
            parse_request(_body(chat, extra), chat=chat, served_model="sim")
        return err.value.message

    assert message({"temperature": "hot"}) == 'temperature must be a finite number in [0, 2], got "hot"'
    assert message({"top_p": 5}) == "top_p must be a number in (0, 1], got 5"
    assert message({"logprobs": 100}) == "logprobs must be an integer in [0, 20], got 100"
    assert message({"ignore_eos": None}) == "ignore_eos must be a boolean (not null), got null"
    assert message({"logit_bias": [1]}) == ("logit_bias must be an object from token ids (strings of integers >= 0) "
                                            "to numbers, got [1]")
    assert message({"min_tokens": 17}) == "min_tokens must be at most max_tokens (16), got 17"
    assert message({"top_logprobs": 2}, chat=True) == "top_logprobs needs logprobs true, got logprobs null"


def test_a_model_that_is_not_a_string_is_a_400_not_a_404_over_http():
    async def go():
        server, engine = await start_engine()
        out = []
        try:
            async with aiohttp.ClientSession() as s:
                for path, body in (("/v1/completions", {"prompt": [1], "model": [1]}),
                                   ("/v1/completions", {"prompt": [1], "temperature": -1}),
                                   ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                             "stop": {}}),
                                   ("/v1/completions", {"prompt": [1], "best_of": 0, "max_tokens": 1})):
                    async with s.post(server.url + path, json=body) as r:
                        out.append((r.status, await r.json()))
        finally:
            await server.stop()
        return out

    out = run(go())
    assert [status for status, _ in out] == [400, 400, 400, 200]
    assert [body["error"] for _, body in out[:3]] == [
        {"message": "model must be a string, got [1]", "type": "invalid_request_error", "param": "model", "code": None},
        {"message": "temperature must be a finite number in [0, 2], got -1", "type": "invalid_request_error",
         "param": "temperature", "code": None},
        {"message": "stop must be a string or a list of strings, none empty, got {}", "type": "invalid_request_error",
         "param": "stop", "code": None},
    ]


def test_the_field_cases_are_what_vllm_itself_answers():
    """VLLM_REFUSES, VLLM_TAKES and SIM_SERVE_CANNOT (vLLM takes them), checked against vLLM 0.26.0's own request models and SamplingParams
    (the server's 400s short of the model: max_logprobs 20, a Llama-3 vocabulary)."""
    from types import SimpleNamespace

    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    model = SimpleNamespace(max_logprobs=20, get_vocab_size=lambda: 128256)

    def vllm_refuses(chat: bool, body: dict) -> bool:
        try:
            req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
            # a chat request without a cap gets the context left (here: 1000), a completion 16
            cap = (req.max_completion_tokens or req.max_tokens or 1000) if chat else req.max_tokens
            params = req.to_sampling_params(cap, {})
            params._validate_logprobs(model)
            params._validate_logit_bias(model)
            params._validate_allowed_token_ids(range(128256))
        except (ValueError, TypeError):  # pydantic's ValidationError is a ValueError
            return True
        return False

    cases = [(chat, extra, True) for chat, extra, _ in VLLM_REFUSES] + [(c, e, False) for c, e in VLLM_TAKES] + [
        (c, e, False) for c, e, _ in SIM_SERVE_CANNOT]
    wrong = [(chat, extra) for chat, extra, refused in cases if vllm_refuses(chat, _body(chat, extra)) != refused]
    assert wrong == []


def test_a_chat_message_needs_a_string_role_as_vllm():
    # vLLM's message types all declare role: Required[str] (and name: str); "user" was assumed for a
    # missing role and any role was printed, so role 5 or {} was a 200.
    for message, got in (({"role": 5, "content": "x"}, "got 5"), ({"role": {}, "content": "x"}, "got {}"),
                         ({"content": "x"}, "it is missing"), ({"role": None, "content": "x"}, "got null")):
        with pytest.raises(RequestError) as err:
            parse_request({"messages": [message]}, chat=True, served_model="sim")
        assert (err.value.status, err.value.param) == (400, "messages")
        assert err.value.message == f"messages[0].role must be a string, {got}"
    with pytest.raises(RequestError, match=r"^messages\[1\]\.name must be a string, got 7$"):
        parse_request({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x", "name": 7}]},
                      chat=True, served_model="sim")
    parse_request({"messages": [{"role": "wizard", "content": "x", "name": "bob"}]}, chat=True, served_model="sim")


def test_vllm_xargs_are_typed_as_vllm_and_ids_read_as_the_plugin_reads_them():
    def parse(xargs):
        return parse_request({"prompt": [1], "vllm_xargs": xargs}, chat=False, served_model="sim")

    # vLLM's type, dict[str, str | int | float | list[str | int | float]]: null, an object or a nested
    # list is a 400 there; [] or "" for the whole field is not an absent field.
    for xargs, param, got in (({"kv_ttl": None}, "vllm_xargs.kv_ttl", "null"),
                              ({"program_id": None}, "vllm_xargs.program_id", "null"),
                              ({"other": {}}, "vllm_xargs.other", "{}"), ({"other": [[1]]}, "vllm_xargs.other", "[[1]]")):
        with pytest.raises(RequestError) as err:
            parse(xargs)
        assert err.value.param == param
        assert err.value.message == f"{param} must be a string, a number or a list of those, got {got}"
    for xargs in ([], "", 0, [1]):
        with pytest.raises(RequestError) as err:
            parse(xargs)
        assert err.value.param == "vllm_xargs" and err.value.message.startswith("vllm_xargs must be an object, got ")
    assert parse({"other": [1, "a", 2.5]}).program_id is None
    # Ids as the plugin's read_tags takes them (the engine side), not the gateway's check_id: any
    # string or integer; a boolean is refused (it was the id "True"), as the plugin refuses it.
    for value in (True, 1.5, [1]):
        with pytest.raises(RequestError) as err:
            parse({"program_id": value})
        assert err.value.message.startswith("vllm_xargs.program_id must be a string or an integer, got ")
    long_id, odd_id = "p" * 129, "prögram/1 x"
    req = parse({"program_id": long_id, "thread_id": odd_id})
    assert (req.program_id, req.thread_id) == (long_id, odd_id)
    assert parse({"program_id": 7}).program_id == "7" and parse({"program_id": ""}).program_id == ""
    req = parse({"thread_id": "t"})  # as the plugin: a thread of a program of its own
    assert (req.program_id, req.thread_id) == (None, "t")


@pytest.mark.parametrize("blank", ["", "  "])
def test_sim_serve_refuses_a_blank_served_model_name(blank, capsys):
    """It served the model id "" (or spaces), which a client cannot tell from leaving the model out."""
    import argparse

    from sim.serve import add_arguments

    parser = argparse.ArgumentParser(prog="python -m sim serve")  # as main's; main itself would serve
    add_arguments(parser)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--served-model-name", blank])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m sim serve: error: argument --served-model-name: expected a non-empty name, got {blank!r}")


def test_prompt_token_ids_past_the_models_vocabulary_are_refused_as_vllm_refuses_them():
    """[1, 2, 999999999] was a 200; vLLM 0.26.0 answers 400 "Token id 999999999 is out of vocabulary"."""
    async def go():
        server, engine = await start_engine()
        try:
            async with aiohttp.ClientSession() as s:
                out = []
                for prompt in ([1, 2, 999999999], [128256], [128255], [-1]):
                    async with s.post(server.url + "/v1/completions",
                                      json={"prompt": prompt, "max_tokens": 1}) as r:
                        out.append((r.status, (await r.json())))
                return out, engine.vocab_size
        finally:
            await server.stop()

    (big, edge, last, negative), vocab = run(go())
    assert vocab == 128256  # the default model spec's, llama-3.1-8b
    assert big[0] == 400 and big[1]["error"]["param"] == "prompt"
    assert big[1]["error"]["message"] == ("prompt has token id 999999999, out of the model's vocabulary (ids 0 to "
                                          "128255); vLLM refuses it: Token id 999999999 is out of vocabulary")
    assert edge[0] == 400 and "token id 128256" in edge[1]["error"]["message"]
    assert last[0] == 200
    assert negative[0] == 400 and negative[1]["error"]["param"] == "prompt"


def test_the_replayers_and_the_stand_ins_own_ids_are_inside_every_shipped_models_vocabulary():
    """Filler ids (replayed prompts, sim serve's text and outputs) and the profiler's random ids must be ids
    every model takes, or replays of it would be refused."""
    from engine.profile import TOKEN_RANGE
    from engine.tokens import source_ids
    from sim.hardware import available, load_model
    from sim.filler_tokens import FILLER_BASE, FILLER_VOCAB

    models = available("model")
    assert models
    for name in models:
        vocab = load_model(name).vocab_size
        assert 0 <= FILLER_BASE and FILLER_BASE + FILLER_VOCAB <= vocab, name
        assert TOKEN_RANGE[1] <= vocab, name
    ids = source_ids(12345, 0, 10_000)
    assert FILLER_BASE <= min(ids) and max(ids) < FILLER_BASE + FILLER_VOCAB


def test_only_prompts_given_as_ids_are_checked_against_the_vocabulary_and_after_the_model():
    """A text prompt's ids are the stand-in's own (1,000 to 100,999): they were checked too, so a text
    prompt got a 400 about an id the client never sent. vLLM answers a request for another model 404
    before its input processor looks at ids."""
    small = 50_000
    text = parse_request({"prompt": "Hello, how are you today?" * 20, "max_tokens": 2}, False, "sim", small)
    assert max(text.prompt_ids) >= small  # the stand-in's own ids, not the client's: taken
    with pytest.raises(RequestError) as err:
        parse_request({"prompt": [1, small], "max_tokens": 2}, False, "sim", small)
    assert (err.value.status, err.value.param) == (400, "prompt")
    with pytest.raises(RequestError) as err:
        parse_request({"model": "other", "prompt": [999_999], "max_tokens": 2}, False, "sim", small)
    assert (err.value.status, err.value.param) == (404, "model")


def test_sim_serve_refuses_a_model_whose_vocabulary_cannot_hold_the_filler_tokens(tmp_path):
    """With vocab_size 32,000 the stand-in answered with ids past the vocabulary, which a client
    re-sending its history (the replayer's context_of) then had refused."""
    from pathlib import Path

    spec = json.loads((Path(__file__).resolve().parents[1] / "sim/specs/llama-3.1-8b.model.json").read_text())
    spec["vocab_size"] = 32_000
    path = tmp_path / "llama2ish.model.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "sim", "serve", "--model", str(path), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "has vocab_size 32,000; the stand-in's filler tokens use ids 1,000 to 100,999 (as python -m engine "
        "replay's do), so sim serve needs vocab_size >= 101,000")


def test_a_chat_requests_tools_count_in_its_prompt_and_are_a_shared_prefix():
    """A chat template renders `tools` into the prompt; the stand-in counted none of their tokens."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    first = [{"role": "user", "content": "Weather in Paris?"}]
    second = [{"role": "user", "content": "And in Rome, tomorrow morning?"}]
    plain = parse_request({"messages": first}, chat=True, served_model="m")
    with_tools = parse_request({"messages": first, "tools": tools}, chat=True, served_model="m")
    tools_text = f"tools: {json.dumps(tools, sort_keys=True)}\n"
    assert with_tools.prompt_ids == text_token_ids(tools_text + "user: Weather in Paris?\n")
    assert len(with_tools.prompt_ids) == 53 and len(plain.prompt_ids) == 6  # ceil((186 + 24) / 4) and 24 / 4
    other = parse_request({"messages": second, "tools": tools}, chat=True, served_model="m")
    shared = len(tools_text.encode()) // 4  # the 4-byte chunks wholly inside the tools' text
    assert other.prompt_ids[:shared] == with_tools.prompt_ids[:shared]
    assert parse_request({"messages": first, "tools": None}, chat=True, served_model="m").prompt_ids == plain.prompt_ids


@pytest.mark.parametrize("argv, message", [
    (["--latency", "constant", "--max-num-batched-tokens", "4", "--max-num-seqs", "8"],
     "--max-num-batched-tokens 4: engine.max_num_batched_tokens: engine.max_num_batched_tokens (4) must be >= "
     "engine.max_num_seqs (8), as vLLM requires"),
    (["--experiment", "quickstart", "--policy", "plas", "--max-num-batched-tokens", "4", "--max-num-seqs", "256"],
     "--max-num-batched-tokens 4: experiment 'quickstart': engine.max_num_batched_tokens: "
     "engine.max_num_batched_tokens (4) must be >= engine.max_num_seqs (256), as vLLM requires"),
    (["--max-num-seqs", "100000"],
     "--max-num-seqs 100000: engine.max_num_seqs: engine.max_num_batched_tokens (2048) must be >= "
     "engine.max_num_seqs (100000), as vLLM requires"),
    (["--gpus-per-replica", "3"],
     "--gpus-per-replica 3: engine.gpus_per_replica: engine.gpus_per_replica=3 does not split the 32 attention "
     "heads and 8 KV heads of engine.model=llama-3.1-8b evenly, as vLLM's tensor parallelism requires; "
     "valid: 1, 2, 4, 8, 16, 32"),
])
def test_sim_serve_refuses_an_engine_vllm_and_sim_run_refuse(capsys, argv, message):
    """The flags bypassed the experiment checks: a 4-token budget served a 101-token prompt with 200.
    (`build_config`, not `main`, which would serve forever were the check gone; main prints the error.)"""
    import argparse

    from sim.config import ConfigError
    from sim.serve import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ConfigError) as err:
        build_config(parser.parse_args(argv))
    assert str(err.value) == message


@pytest.mark.parametrize("command", [["sim", "serve", "--latency", "constant"],
                                     ["sim", "serve", "--latency", "constant", "--host", ""],  # every interface
                                     ["engine", "gateway", "--engine", "http://127.0.0.1:9"]])
def test_port_0_reports_the_port_the_system_chose(command):
    """`--port 0` (taken as a port) printed `on http://127.0.0.1:0`, an address nobody can reach."""
    import re
    import urllib.request

    proc, line = start_cli_server(command)
    try:
        match = re.search(r" on http://(?:127\.0\.0\.1|0\.0\.0\.0|\[::\]):(\d+)", line)
        assert match, line
        port = int(match.group(1))
        assert port != 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_chat_content_parts_are_read_by_type_as_vllm_reads_them():
    """An image part was a 200 with the image dropped (vLLM refuses it for a text-only model); a
    thinking or refusal part's text went uncounted, and a part without a type was read as text."""
    def tokens(*parts):
        return len(parse_request({"messages": [{"role": "user", "content": list(parts)}]}, chat=True,
                                 served_model="m").prompt_ids)

    text = {"type": "text", "text": "x" * 40}
    assert tokens(text, {"type": "thinking", "thinking": "y" * 40}) == tokens(text, text)
    assert tokens(text, {"type": "refusal", "refusal": "y" * 40}) == tokens(text, text)
    assert tokens(text, {"type": "text", "text": None}) == tokens(text)  # vLLM skips an empty text part
    # vLLM infers the type from the key, and reads the name
    assert tokens(text, {"tool_reference": True, "name": "y" * 40}) == tokens(text, text)
    # the texts are joined with a newline, as vLLM's string content format joins them
    assert parse_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "text", "text": "cd"}]}]},
                         chat=True, served_model="m").prompt_ids == parse_request(
        {"messages": [{"role": "user", "content": "ab\ncd"}]}, chat=True, served_model="m").prompt_ids
    for part, message in (
        ({"type": "image_url", "image_url": {"url": "http://x"}},
         "messages[0].content[1]: part type 'image_url' needs a multimodal model; this engine's is text-only, and "
         "vLLM refuses it as not a multimodal model"),
        ({"input_audio": {"data": "", "format": "wav"}},
         "messages[0].content[1]: part type 'input_audio' needs a multimodal model; this engine's is text-only, "
         "and vLLM refuses it as not a multimodal model"),
        ({"type": "prompt_embeds", "data": "x"}, "messages[0].content[1]: part type 'prompt_embeds' needs vLLM's "
                                                  "--enable-prompt-embeds, which this engine does not take"),
        ({"text": "x"}, "messages[0].content[1]: Missing 'type' field in multimodal part (vLLM's words); a text "
                        "part is {\"type\": \"text\", \"text\": ...}"),
        ({"type": 3}, "messages[0].content[1]: Invalid 'type' field in multimodal part (vLLM's words), got 3"),
        ({"type": "txt", "text": "x"}, "messages[0].content[1]: Unsupported chat content part type: 'txt'. "
                                        "Supported types: audio_embeds, audio_url, image_embeds, image_pil, "
                                        "image_url, input_audio, input_image, input_text, output_text, "
                                        "prompt_embeds, refusal, text, thinking, tool_reference, video_url "
                                        "(vLLM's words)"),
        ({"type": "text", "text": 5}, "messages[0].content[1].text: expected a string, got a number"),
    ):
        with pytest.raises(RequestError) as err:
            tokens(text, part)
        assert str(err.value) == message and err.value.param == "messages"


def test_a_chat_request_without_a_cap_runs_to_the_context_left_as_vllm():
    """It got 16 tokens, a completion's default; vLLM's chat has none (get_max_tokens: the context left)."""
    assert parse_request({"messages": [{"role": "user", "content": "hi"}]}, chat=True, served_model="m").max_tokens \
        is None
    assert parse_request({"prompt": "hi"}, chat=False, served_model="m").max_tokens == 16

    async def go(**engine):
        config = engine_config(0.001, 4000)
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, **engine))
        runner = await serve(SimServer(RealtimeEngine(config, "fcfs"), "sim"), "127.0.0.1", 0)
        url = "http://127.0.0.1:%d" % runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": "hi there, engine"}]}) as r:
                    return r.status, await r.json()
        finally:
            await runner.cleanup()

    for engine, room in (({"max_model_len": 40}, 40),
                         # without chunked prefill a call must fit one step's budget: it was a 400 naming a
                         # max_tokens (the context left) the client never sent
                         ({"enable_chunked_prefill": False, "max_num_batched_tokens": 30, "max_num_seqs": 4}, 30),
                         ({"num_gpu_blocks": 2}, 32)):  # a cache smaller than the context
        status, body = run(go(**engine))
        assert status == 200, body
        assert body["usage"]["prompt_tokens"] == 6 and body["usage"]["completion_tokens"] == room - 6, engine
        assert body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("argv, seqs", [(["--max-num-batched-tokens", "128"], 128),
                                        (["--gpu", "h100", "--max-num-batched-tokens", "512"], 512),
                                        (["--experiment", "quickstart", "--policy", "plas",
                                          "--max-num-batched-tokens", "64"], 64),
                                        (["--max-num-batched-tokens", "4096"], 256)])
def test_a_budget_given_alone_lowers_the_sequence_cap_as_vllm_serve_does(argv, seqs):
    """vllm serve --max-num-batched-tokens 128 starts with 128 sequences (engine/arg_utils.py); the flag
    checks refused it against the default cap of 256."""
    import argparse

    from sim.serve import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert build_config(parser.parse_args(argv)).engine.max_num_seqs == seqs


def test_an_unset_budget_stays_within_the_cap_times_the_context_as_vllm_serve_keeps_it():
    """`sim serve` without an experiment takes its defaults as an experiment does
    (`sim.experiments.serve_batch_limits`): --max-model-len 4 --max-num-seqs 2 gave a 2,048-token
    budget where vllm serve starts with 8."""
    import argparse

    from sim.serve import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    engine = build_config(parser.parse_args(["--max-model-len", "4", "--max-num-seqs", "2"])).engine
    assert (engine.max_num_seqs, engine.max_num_batched_tokens) == (2, 8)


def _two_loopback_addresses(monkeypatch):
    """getaddrinfo giving ``localhost`` two addresses, as it often has (127.0.0.1 and ::1); two
    IPv4 loopback addresses, so the test needs no IPv6. Other names resolve as before."""
    import socket

    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "localhost":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("127.0.0.1", "127.0.0.2")]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_port_0_binds_every_address_of_the_host_on_one_port(monkeypatch):
    """`--host localhost --port 0` was bound on the first address only, where a named port is bound
    on each (aiohttp), so a client that tried the other address was refused."""
    import socket

    from sim.http_site import bind_one_free_port

    _two_loopback_addresses(monkeypatch)
    socks = bind_one_free_port("localhost")
    try:
        assert [s.getsockname()[0] for s in socks] == ["127.0.0.1", "127.0.0.2"]
        port = socks[0].getsockname()[1]
        assert port != 0 and socks[1].getsockname()[1] == port
        for address in ("127.0.0.1", "127.0.0.2"):
            socket.create_connection((address, port), timeout=5).close()
    finally:
        for s in socks:
            s.close()


def test_port_0_tries_another_port_when_a_later_address_has_it_taken(monkeypatch):
    import errno
    import socket

    from sim.http_site import bind_one_free_port

    real = socket.create_server
    taken: list[int] = []

    def create_server(address, **kwargs):
        if address[0] == "127.0.0.2" and not taken:  # the first port the system gives is in use there
            taken.append(address[1])
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return real(address, **kwargs)

    _two_loopback_addresses(monkeypatch)
    monkeypatch.setattr(socket, "create_server", create_server)
    socks = bind_one_free_port("localhost")
    try:
        assert len(socks) == 2 and taken
        assert socks[0].getsockname()[1] == socks[1].getsockname()[1]
    finally:
        for s in socks:
            s.close()
    # another failure on a later address (not the port in use) is not retried
    monkeypatch.setattr(socket, "create_server", lambda address, **kw: real(address, **kw) if address[0] == "127.0.0.1"
                        else (_ for _ in ()).throw(OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")))
    with pytest.raises(OSError) as info:
        bind_one_free_port("localhost")
    assert info.value.errno == errno.EADDRNOTAVAIL
