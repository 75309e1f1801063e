"""Gateway: bad input gets the right status and an OpenAI error body, and leaves the table consistent."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest
from multidict import CIMultiDict

from engine.gateway import Accounting, GatewayConfig, prompt_tokens_of
from engine.protocol import XARG_PROGRAM, XARG_SERVICE, XARG_THREAD, XARGS, BadRequest, check_id, with_xargs
from sim.openai_api import XARGS as SERVE_XARGS
from test_serve_helpers import run, start_engine, start_gw

ERROR_KEYS = {"message", "type", "param", "code"}


async def _request(s, method, url, data=None, headers=None):
    async with s.request(method, url, data=data, headers=headers) as r:
        text = await r.text()
        return r.status, (json.loads(text) if text else None)


def test_bad_requests_get_openai_errors_and_leave_no_live_calls():
    cases = [
        # (name, method, path, body, headers, status, code, param, message)
        ("malformed json", "POST", "/v1/completions", b"{nope", {}, 400, "invalid_json", None,
         "malformed JSON body: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ("not an object", "POST", "/v1/completions", b"[1, 2]", {}, 400, "invalid_json", None,
         "the request body must be a JSON object, got an array"),
        ("nested too deeply", "POST", "/v1/completions", b"[" * 4000 + b"]" * 4000, {}, 400, "invalid_json", None,
         "malformed JSON body: nested too deeply"),
        ("bad program id in vllm_xargs", "POST", "/v1/completions", b'{"prompt": [1], "vllm_xargs": '
         b'{"program_id": "a/b", "thread_id": "t"}}', {}, 400, "invalid_id", "vllm_xargs.program_id",
         "vllm_xargs.program_id 'a/b' has characters outside [A-Za-z0-9._:-]"),
        ("bad thread id in vllm_xargs", "POST", "/v1/completions", b'{"prompt": [1], "vllm_xargs": '
         b'{"program_id": "p", "thread_id": ""}}', {}, 400, "invalid_id", "vllm_xargs.thread_id",
         "vllm_xargs.thread_id must not be empty"),
        # vllm_xargs that is not an object was dropped, so the engine answered for a body without it; an
        # id that is neither a string nor an integer became str()'s "True" or "1.5".
        ("xargs an array", "POST", "/v1/completions", b'{"prompt": [1], "vllm_xargs": [1]}', {}, 400,
         "invalid_xargs", "vllm_xargs", "vllm_xargs must be an object, got an array"),
        ("xargs a string", "POST", "/v1/completions", b'{"prompt": [1], "vllm_xargs": "x"}', {}, 400,
         "invalid_xargs", "vllm_xargs", "vllm_xargs must be an object, got a string"),
        ("boolean program id", "POST", "/v1/completions", b'{"prompt": [1], "vllm_xargs": {"program_id": true}}',
         {}, 400, "invalid_id", "vllm_xargs.program_id", "vllm_xargs.program_id must be a string or an integer, got true"),
        ("float program id", "POST", "/v1/completions", b'{"prompt": [1], "vllm_xargs": {"program_id": 1.5}}',
         {}, 400, "invalid_id", "vllm_xargs.program_id", "vllm_xargs.program_id must be a string or an integer, got 1.5"),
        ("object thread id", "POST", "/v1/completions",
         b'{"prompt": [1], "vllm_xargs": {"program_id": "p", "thread_id": {}}}', {}, 400, "invalid_id",
         "vllm_xargs.thread_id", "vllm_xargs.thread_id must be a string or an integer, got an object"),
        ("integer too long to read", "POST", "/v1/completions", b'{"max_tokens": ' + b"9" * 5000 + b"}", {}, 400,
         "invalid_json", None, "malformed JSON body: an integer longer than 4300 digits"),
        ("empty program id", "POST", "/v1/completions", b'{"prompt": [1]}', {"X-Program-Id": ""}, 400, "invalid_id",
         "X-Program-Id", "X-Program-Id must not be empty"),
        ("long program id", "POST", "/v1/completions", b'{"prompt": [1]}', {"X-Program-Id": "p" * 129}, 400,
         "invalid_id", "X-Program-Id", "X-Program-Id is 129 characters long; the limit is 128"),
        ("bad characters", "POST", "/v1/completions", b'{"prompt": [1]}', {"X-Program-Id": "a/b"}, 400,
         "invalid_id", "X-Program-Id", "X-Program-Id 'a/b' has characters outside [A-Za-z0-9._:-]"),
        ("bad thread id", "POST", "/v1/completions", b'{"prompt": [1]}',
         {"X-Program-Id": "p", "X-Thread-Id": "t t"}, 400, "invalid_id", "X-Thread-Id",
         "X-Thread-Id 't t' has characters outside [A-Za-z0-9._:-]"),
        ("thread without program", "POST", "/v1/completions", b'{"prompt": [1]}', {"X-Thread-Id": "t"}, 400,
         "invalid_id", "X-Thread-Id", "X-Thread-Id was given without X-Program-Id (or vllm_xargs.program_id)"),
        ("xargs thread without program", "POST", "/v1/completions", b'{"prompt": [1], "vllm_xargs": {"thread_id": "t"}}',
         {}, 400, "invalid_id", "vllm_xargs.thread_id",
         "vllm_xargs.thread_id was given without X-Program-Id (or vllm_xargs.program_id)"),
        ("bad xargs thread under a program header", "POST", "/v1/completions",
         b'{"prompt": [1], "vllm_xargs": {"thread_id": "t t"}}', {"X-Program-Id": "p"}, 400, "invalid_id",
         "vllm_xargs.thread_id", "vllm_xargs.thread_id 't t' has characters outside [A-Za-z0-9._:-]"),
        ("negative kv ttl", "POST", "/v1/completions", b'{"prompt": [1]}', {"X-Program-Id": "p", "X-KV-TTL": "-1"},
         400, "invalid_kv_ttl", "X-KV-TTL", "X-KV-TTL must be a finite number of seconds >= 0, got '-1'"),
        ("kv ttl not a number", "POST", "/v1/completions", b'{"prompt": [1]}', {"X-KV-TTL": "soon"}, 400,
         "invalid_kv_ttl", "X-KV-TTL", "X-KV-TTL must be a finite number of seconds >= 0, got 'soon'"),
        ("infinite kv ttl", "POST", "/v1/completions", b'{"prompt": [1]}', {"X-KV-TTL": "inf"}, 400,
         "invalid_kv_ttl", "X-KV-TTL", "X-KV-TTL must be a finite number of seconds >= 0, got 'inf'"),
        ("kv ttl past any run", "POST", "/v1/completions", b'{"prompt": [1]}', {"X-KV-TTL": "1e300"}, 400,
         "invalid_kv_ttl", "X-KV-TTL", "X-KV-TTL must be at most 1e+09 seconds, got '1e300'"),
        ("oversized", "POST", "/v1/completions", b'{"prompt": "' + b"x" * 9000 + b'"}', {}, 413,
         "request_too_large", None, "request body of 9014 bytes exceeds 8192 bytes"),
        ("unknown program end", "DELETE", "/v1/programs/ghost", None, {}, 404, "program_not_found", "program_id",
         "unknown program 'ghost'"),
        ("bad program id to end", "DELETE", "/v1/programs/a%20b", None, {}, 400, "invalid_id", "program_id",
         "program_id 'a b' has characters outside [A-Za-z0-9._:-]"),
        ("unknown route", "GET", "/v1/nothing", None, {}, 404, None, None, "unknown route GET /v1/nothing"),
        ("wrong method", "GET", "/v1/completions", None, {}, 405, None, None,
         "method GET is not allowed on /v1/completions"),
        ("wrong method on programs", "POST", "/programs", b"{}", {}, 405, None, None,
         "method POST is not allowed on /programs"),
    ]

    async def go():
        e0, eng0 = await start_engine()
        gw, gateway = await start_gw([e0.url], max_body=8192)
        results = []
        try:
            async with aiohttp.ClientSession() as s:
                for name, method, path, body, headers, *_ in cases:
                    status, doc = await _request(s, method, gw.url + path, body,
                                                 {"Content-Type": "application/json", **headers})
                    results.append((name, status, doc, gateway.acct.live_calls(), len(gateway.acct.table),
                                    [e.load for e in gateway.engines]))
            received = len(eng0.received)
        finally:
            await gw.stop()
            await e0.stop()
        return results, received

    results, received = run(go())
    for (name, status, doc, live, programs, loads), (*_, want, code, param, message) in zip(results, cases):
        assert status == want, (name, doc)
        assert set(doc["error"]) == ERROR_KEYS, name
        assert (doc["error"]["param"], doc["error"]["message"]) == (param, message), name
        if code is not None:
            assert doc["error"]["code"] == code, name
        assert live == 0 and programs == 0 and loads == [0], name
    assert received == 0  # nothing malformed reached the engine


def test_engine_errors_pass_through_and_unreachable_engines_give_502():
    async def go():
        e0, eng0 = await start_engine()
        # Engine 1 is a port nobody listens on: bind-and-close leaves it free.
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
        sock.close()
        gw, gateway = await start_gw([e0.url], balancer="round_robin")
        gw_dead, gateway_dead = await start_gw([dead])
        try:
            async with aiohttp.ClientSession() as s:
                hdr = {"X-Program-Id": "p1", "X-Thread-Id": "t1", "Content-Type": "application/json"}
                bad = await _request(s, "POST", gw.url + "/v1/completions", b'{"prompt": 5}', hdr)
                table_after_bad = (gateway.acct.live_calls(), gateway.acct.table.get("p1").total_service)
                unreachable = await _request(s, "POST", gw_dead.url + "/v1/completions", b'{"prompt": [1]}', hdr)
                dead_live = gateway_dead.acct.live_calls()
                # A program with no live call can be ended; then it is unknown.
                ended = await _request(s, "DELETE", gw.url + "/v1/programs/p1")
                again = await _request(s, "DELETE", gw.url + "/v1/programs/p1")
                models = await _request(s, "GET", gw.url + "/v1/models")
                health = await _request(s, "GET", gw.url + "/health")
        finally:
            await gw.stop()
            await gw_dead.stop()
            await e0.stop()
        return bad, table_after_bad, unreachable, dead_live, ended, again, models, health

    bad, table_after_bad, unreachable, dead_live, ended, again, models, health = run(go())
    assert bad[0] == 400 and bad[1]["error"]["param"] == "prompt"  # the engine's own error body
    assert table_after_bad == (0, 0.0)
    assert unreachable[0] == 502 and unreachable[1]["error"]["code"] == "engine_unreachable"
    assert dead_live == 0
    assert ended == (200, {"id": "p1", "object": "program.deleted", "deleted": True})
    assert again[0] == 404
    assert models[0] == 200 and models[1]["data"][0]["id"] == "sim"
    assert health == (200, {"status": "ok", "engines": 1, "lost": [], "stalled": []})


def test_ending_a_program_with_a_live_call_is_refused():
    async def go():
        e0, _ = await start_engine(step=0.01)
        gw, gateway = await start_gw([e0.url])
        try:
            async with aiohttp.ClientSession() as s:
                import asyncio

                call = asyncio.create_task(_request(s, "POST", gw.url + "/v1/completions",
                                                    json.dumps({"prompt": [1], "max_tokens": 200}).encode(),
                                                    {"X-Program-Id": "busy", "Content-Type": "application/json"}))
                while gateway.acct.live_calls() == 0:
                    await asyncio.sleep(0.005)
                busy = await _request(s, "DELETE", gw.url + "/v1/programs/busy")
                done = await call
                after = await _request(s, "DELETE", gw.url + "/v1/programs/busy")
        finally:
            await gw.stop()
            await e0.stop()
        return busy, done, after

    busy, done, after = run(go())
    assert busy[0] == 409 and busy[1]["error"]["code"] == "program_busy"
    assert done[0] == 200
    assert after[0] == 200


def test_untagged_calls_are_single_call_programs_and_idle_programs_expire():
    async def go():
        import asyncio

        e0, _ = await start_engine()
        gw, gateway = await start_gw([e0.url], ttl=0.2, expire_interval=0.05)
        try:
            async with aiohttp.ClientSession() as s:
                ids = []  # read after each call: a slow machine may expire the first before the third ends
                for _ in range(3):
                    status, _ = await _request(s, "POST", gw.url + "/v1/completions",
                                               b'{"prompt": [1, 2], "max_tokens": 2}',
                                               {"Content-Type": "application/json"})
                    assert status == 200
                    ids += [p.id for p in gateway.acct.table.programs.values() if p.id not in ids]
                await asyncio.sleep(0.5)
                left = len(gateway.acct.table)
        finally:
            await gw.stop()
            await e0.stop()
        return ids, left

    ids, left = run(go())
    assert len(ids) == 3 and len(set(ids)) == 3 and all(i.startswith("anon-") for i in ids)
    assert left == 0


def test_accounting_uses_the_policy_update_rules():
    plas = Accounting("plas", ttl=60, threshold=2048)
    a = plas.start("p", "a", 10, now=0.0)
    b = plas.start("p", "b", 10, now=0.0)
    assert a.priority == b.priority == 0.0
    plas.finish(a, 2.0, now=3.0)
    plas.finish(b, 1.0, now=3.0)
    assert plas.table.get("p").service == pytest.approx(3.0)  # PLAS: sum
    assert plas.table.get("p").total_waiting == pytest.approx(1.0 + 2.0)

    atlas = Accounting("atlas", ttl=60, threshold=2048)
    a = atlas.start("p", "a", 10, now=0.0)
    b = atlas.start("p", "b", 10, now=0.0)
    atlas.finish(a, 2.0, now=2.0)
    atlas.finish(b, 1.0, now=2.0)
    assert atlas.table.get("p").service == pytest.approx(2.0)  # ATLAS: critical path of parallel calls
    c = atlas.start("p", "c", 10, now=2.0)
    assert c.priority == pytest.approx(2.0)
    atlas.abort(c, now=2.5)
    assert atlas.table.get("p").service == pytest.approx(2.0) and atlas.live_calls() == 0

    atlas.start("q", "t", 1, now=0.0)
    with pytest.raises(BadRequest, match=r"^program 'q' already has a live call on thread 't'$") as err:
        atlas.start("q", "t", 1, now=0.0)
    assert (err.value.status, err.value.param) == (409, "X-Thread-Id")
    with pytest.raises(ValueError, match=r"^policy 'srpt' needs the trace's future; the gateway cannot run it$"):
        Accounting("srpt", ttl=60, threshold=2048)


def test_helpers():
    assert prompt_tokens_of({"prompt": [1, 2, 3]}) == 3
    assert prompt_tokens_of({"prompt": [[1, 2]]}) == 2
    assert prompt_tokens_of({"prompt": "abcdefgh!"}) == 3
    assert prompt_tokens_of({"messages": [{"role": "user", "content": "abcd"}]}) == 1
    assert check_id("p-1.x:y_z", "X") == "p-1.x:y_z"
    with pytest.raises(BadRequest, match=r"^X is 129 characters long; the limit is 128$") as err:
        check_id("p" * 129, "X")
    assert err.value.param == "X"
    for bad in ("p1\n", "p 1", "p/1", "é"):  # "p1\n" passed, then aiohttp refused the header: a bare 500
        with pytest.raises(BadRequest, match=r"has characters outside \[A-Za-z0-9._:-\]$"):
            check_id(bad, "X")
    body = with_xargs({"prompt": [1], XARGS: {"program_id": "client", "other": 1}},
                      {XARG_PROGRAM: "p", XARG_THREAD: "t", XARG_SERVICE: 1.5})
    assert body[XARGS] == {"program_id": "p", "other": 1, "thread_id": "t", "program_service": 1.5}
    assert XARGS == SERVE_XARGS  # the engine stand-in reads what the gateway writes
    with pytest.raises(ValueError, match=r"^at least one --engine URL is needed$"):
        GatewayConfig(engines=[])


def test_an_untagged_call_never_takes_a_thread_the_program_has_live():
    """Its made-up name "t-1" was refused with 409 (thread_busy, naming X-Thread-Id, which this client
    never sent) when the program's own client had a call live on a thread it named "t-1"."""
    from types import SimpleNamespace

    from engine.gateway import Gateway

    gateway = Gateway(GatewayConfig(engines=["http://127.0.0.1:9"]))
    gateway.acct.start("p", "t-1", 4, 0.0)  # the client's own thread "t-1" is live
    untagged = SimpleNamespace(headers=CIMultiDict({"X-Program-Id": "p"}))  # aiohttp's headers: a multidict
    pid, tid = gateway._ids(untagged, {"prompt": [1]})
    assert (pid, tid) == ("p", "t-2")
    gateway.acct.start(pid, tid, 4, 0.0)  # no BadRequest: the thread is free
    gateway.acct.start("p", "t-4", 4, 0.0)
    assert gateway._ids(untagged, {})[1] == "t-3"
    assert gateway._ids(untagged, {})[1] == "t-5"  # t-4 is live


def test_no_body_the_gateway_parsed_fails_when_it_is_forwarded():
    """Two 500s with tracebacks: a lone surrogate in the prompt or a message (the token estimate
    encoded it strictly), and a body nested about 970 deep, which parsed but failed when aiohttp
    encoded it again deeper in the stack. The first is the engine's to judge; the second a 400."""
    async def go():
        e0, eng0 = await start_engine()
        gw, gateway = await start_gw([e0.url])
        statuses = {}
        try:
            async with aiohttp.ClientSession() as s:
                for name, body in (("prompt", b'{"prompt": "\\ud800x", "max_tokens": 2}'),):
                    statuses[name] = (await _request(s, "POST", gw.url + "/v1/completions", body, {}))[0]
                body = b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'
                statuses["chat"] = (await _request(s, "POST", gw.url + "/v1/chat/completions", body, {}))[0]
                for depth in range(900, 1101):
                    body = b'{"prompt": [1], "max_tokens": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"
                    statuses[depth] = (await _request(s, "POST", gw.url + "/v1/completions", body, {}))[0]
            left = (gateway.acct.live_calls(), [e.load for e in gateway.engines])
        finally:
            await gw.stop()
            await e0.stop()
        return statuses, left

    statuses, left = run(go(), timeout=120)
    assert statuses["prompt"] == statuses["chat"] == 200
    depths = {d: s for d, s in statuses.items() if isinstance(d, int)}
    assert set(depths.values()) <= {200, 400}, {d: s for d, s in depths.items() if s not in (200, 400)}
    assert depths[900] == 200 and depths[1100] == 400
    assert left == (0, [0])


def test_dot_ids_are_refused_because_no_delete_can_name_them():
    """'.' and '..' passed as ids, but an HTTP client normalises /v1/programs/.. away: the replay's
    DELETE missed the route (counted as a bare engine's) and the gateway kept the program."""
    for value in (".", ".."):
        with pytest.raises(BadRequest, match=rf"^X-Program-Id '{re.escape(value)}' is a path segment"):
            check_id(value, "X-Program-Id")
    assert check_id("...", "X-Program-Id") == "..." and check_id("a.b", "X-Program-Id") == "a.b"


def test_an_integer_xargs_id_is_its_digits():
    from engine.gateway import xarg_id

    assert xarg_id(7, "vllm_xargs.program_id") == "7" and xarg_id("p", "vllm_xargs.program_id") == "p"
    for value, got in ((False, "false"), (2.0, "2.0"), ([1], "an array"), (None, "null")):
        with pytest.raises(BadRequest) as err:
            xarg_id(value, "vllm_xargs.thread_id")
        assert (err.value.param, err.value.message) == (
            "vllm_xargs.thread_id", f"vllm_xargs.thread_id must be a string or an integer, got {got}")


@pytest.mark.parametrize("header, values", [
    ("X-Program-Id", ("p1", "p2")), ("X-Thread-Id", ("t1", "t2")), ("X-KV-TTL", ("5", "50")),
])
def test_a_header_repeated_with_different_values_is_refused_naming_it(header, values):
    """The first value was taken without a word (X-Program-Id: p1 and p2 ran as p1). The same value twice, as a
    proxy that copies a header sends it, is one value and taken."""
    async def go():
        e0, eng0 = await start_engine()
        gw, gateway = await start_gw([e0.url])
        try:
            async with aiohttp.ClientSession() as s:
                base = [("Content-Type", "application/json")] + (
                    [] if header == "X-Program-Id" else [("X-Program-Id", "p")])
                body = b'{"prompt": [1], "max_tokens": 1}'
                refused = await _request(s, "POST", gw.url + "/v1/completions", body,
                                         CIMultiDict(base + [(header, v) for v in values]))
                live = (gateway.acct.live_calls(), len(gateway.acct.table), len(eng0.received))
                same = await _request(s, "POST", gw.url + "/v1/completions", body,
                                      CIMultiDict(base + [(header, values[0])] * 2))
        finally:
            await gw.stop()
            await e0.stop()
        return refused, live, same

    (status, doc), live, (same_status, _) = run(go())
    assert status == 400 and set(doc["error"]) == ERROR_KEYS
    assert (doc["error"]["param"], doc["error"]["code"]) == (header, "conflicting_header")
    assert doc["error"]["message"] == (f"{header} was given more than once with different values "
                                       f"({values[0]!r}, {values[1]!r}); give it once")
    assert live == (0, 0, 0)  # nothing recorded, nothing sent
    assert same_status == 200
