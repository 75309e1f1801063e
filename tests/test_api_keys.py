"""API keys: vLLM's ``--api-key`` on the engines, as ``sim serve --api-key`` mirrors it; the gateway's own key
for clients, and the engines' key it sends in their place (or the client's, passed on); the replay's
``--api-key``; the one check every key option shares."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from traces.argtypes import api_key
from test_serve_helpers import run, start_cli_server, start_engine, start_gw

ROOT = Path(__file__).resolve().parent.parent
UNAUTHORIZED = (401, {"error": "Unauthorized"})  # vLLM's AuthenticationMiddleware answer


@pytest.mark.parametrize("key, message", [
    ("", "expected a key, got an empty one"),
    (" k", "expected printable ASCII, with no space at either end; character 1 of the key (of 2) is U+0020 (a space)"),
    ("k ", "expected printable ASCII, with no space at either end; character 2 of the key (of 2) is U+0020 (a space)"),
    ("ab\ncd", "expected printable ASCII, with no space at either end; character 3 of the key (of 5) is U+000A "
               "(a control character)"),
    ("s\u00e9cret", "expected printable ASCII, with no space at either end; character 2 of the key (of 6) is U+00E9 "
                    "(not ASCII)"),
])
def test_a_key_a_header_cannot_carry_whole_is_refused_without_echoing_it(key, message):
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        api_key(key)
    assert str(exc.value) == message


@pytest.mark.parametrize("key", ["sk-abc123", "a b", "!~"])
def test_printable_keys_pass_unchanged(key):
    assert api_key(key) == key


async def _get(session: aiohttp.ClientSession, url: str, auth: str | None):
    headers = {"Authorization": auth} if auth is not None else {}
    async with session.get(url, headers=headers) as r:
        return r.status, await r.json(content_type=None)


def test_sim_serve_guards_v1_with_its_key_as_vllm_does():
    """/v1 takes "Bearer KEY" (the scheme in any case); /health and /stats stay open; an unknown /v1 route is a
    401 before it is a 404, as vLLM's middleware runs before its router."""

    async def go():
        server, _ = await start_engine(api_key="k1")
        try:
            async with aiohttp.ClientSession() as s:
                got = {auth: await _get(s, server.url + "/v1/models", auth)
                       for auth in (None, "Bearer k2", "Basic k1", "Bearer  k1", "Bearer k1", "bearer k1")}
                body = {"prompt": [1, 2], "max_tokens": 2}
                async with s.post(server.url + "/v1/completions", json=body) as r:
                    bare = r.status, await r.json()
                async with s.post(server.url + "/v1/completions", json=body,
                                  headers={"Authorization": "Bearer k1"}) as r:
                    keyed = r.status, (await r.json())["usage"]["completion_tokens"]
                opened = [(await s.get(server.url + p)).status for p in ("/health", "/stats")]
                unknown = await _get(s, server.url + "/v1/nowhere", None)
            return got, bare, keyed, opened, unknown
        finally:
            await server.stop()

    got, bare, keyed, opened, unknown = run(go())
    assert {a: g[0] for a, g in got.items()} == {None: 401, "Bearer k2": 401, "Basic k1": 401, "Bearer  k1": 401,
                                                 "Bearer k1": 200, "bearer k1": 200}
    assert got[None] == UNAUTHORIZED and got["Bearer k1"][1]["data"][0]["id"] == "sim"
    assert bare == UNAUTHORIZED and keyed == (200, 2)
    assert opened == [200, 200] and unknown == UNAUTHORIZED


def test_without_an_engine_key_the_gateway_passes_each_clients_key_on_with_calls_and_model_lists():
    """Its /v1/models went to the engine without the client's Authorization, so a keyed engine answered 401
    to a client that had the key."""

    async def go():
        server, _ = await start_engine(api_key="k1")
        gw, _ = await start_gw([server.url])
        try:
            async with aiohttp.ClientSession() as s:
                models = [await _get(s, gw.url + "/v1/models", auth) for auth in (None, "Bearer k1")]
                calls = []
                for auth in (None, "Bearer k1"):
                    headers = {"X-Program-Id": "p"} | ({"Authorization": auth} if auth else {})
                    async with s.post(gw.url + "/v1/completions", json={"prompt": [1], "max_tokens": 1},
                                      headers=headers) as r:
                        calls.append(r.status)
            return models, calls
        finally:
            await gw.stop()
            await server.stop()

    models, calls = run(go())
    assert models[0] == UNAUTHORIZED and models[1][0] == 200
    assert calls == [401, 200]


async def _call(session: aiohttp.ClientSession, url: str, auth: str | None, program: str = "p") -> int:
    headers = {"X-Program-Id": program} | ({"Authorization": auth} if auth is not None else {})
    async with session.post(url + "/v1/completions", json={"prompt": [1], "max_tokens": 1}, headers=headers) as r:
        await r.read()
        return r.status


def test_the_gateways_key_guards_its_api_and_its_engine_key_replaces_the_clients():
    """Clients hold the gateway's key (g) only; the engines' (e) goes with what the gateway sends them."""

    async def go():
        server, engine = await start_engine(api_key="e")
        gw, gateway = await start_gw([server.url], api_key="g", engine_api_key="e")
        try:
            async with aiohttp.ClientSession() as s:
                calls = {auth: await _call(s, gw.url, auth) for auth in (None, "Bearer e", "Bearer g")}
                models = {auth: (await _get(s, gw.url + "/v1/models", auth))[0] for auth in (None, "Bearer g")}
                programs = {auth: (await _get(s, gw.url + "/programs", auth))[0] for auth in (None, "Bearer g")}
                health = await _get(s, gw.url + "/health", None)
                ended = []
                for auth in (None, "Bearer g"):
                    async with s.delete(gw.url + "/v1/programs/p",
                                        headers={"Authorization": auth} if auth else {}) as r:
                        ended.append((r.status, await r.json()))
            return calls, models, programs, health, ended, engine.snapshot()
        finally:
            await gw.stop()
            await server.stop()

    calls, models, programs, health, ended, snap = run(go())
    assert calls == {None: 401, "Bearer e": 401, "Bearer g": 200}
    assert models == {None: 401, "Bearer g": 200} and programs == {None: 401, "Bearer g": 200}
    assert health[0] == 200
    assert ended == [UNAUTHORIZED, (200, {"id": "p", "object": "program.deleted", "deleted": True})]
    assert snap["completed"] == 1  # the refused calls never reached the engine


def test_an_engine_refusing_the_gateways_engine_key_is_a_502_not_the_clients_401(caplog):
    """The client's own key (g) was right: the engine's 401 to a wrong --engine-api-key went back to it as if
    its key were wrong, and nothing was logged."""

    async def go():
        server, _ = await start_engine(api_key="e")
        gw, _ = await start_gw([server.url], api_key="g", engine_api_key="wrong")
        try:
            async with aiohttp.ClientSession() as s:
                out = []
                for stream in (False, True):
                    async with s.post(gw.url + "/v1/completions", json={"prompt": [1], "max_tokens": 1,
                                                                        "stream": stream},
                                      headers={"X-Program-Id": f"p{stream}", "Authorization": "Bearer g"}) as r:
                        out.append((r.status, (await r.json())["error"]["code"]))
                status, models = await _get(s, gw.url + "/v1/models", "Bearer g")
                return out, status, models["error"]["message"], server.url
        finally:
            await gw.stop()
            await server.stop()

    calls, status, models, url = run(go())
    refused = (f"engine 0 ({url}) refused the gateway's --engine-api-key (401): it is not one of that engine's "
               f"--api-key keys")
    assert calls == [(502, "engine_unauthorized")] * 2
    assert status == 502 and models == f"no engine answered /v1/models: {refused}"
    assert [r.getMessage() for r in caplog.records if "refused" in r.getMessage()] == [refused]  # once


def test_an_engine_key_alone_lets_the_gateway_reach_keyed_engines_for_any_client():
    """With --engine-api-key and no --api-key the gateway is the engines' only keyholder, and whatever
    Authorization a client sends is replaced, not passed on."""

    async def go():
        server, _ = await start_engine(api_key="e")
        gw, _ = await start_gw([server.url], engine_api_key="e")
        try:
            async with aiohttp.ClientSession() as s:
                return [await _call(s, gw.url, auth, f"p{i}") for i, auth in enumerate((None, "Bearer wrong"))]
        finally:
            await gw.stop()
            await server.stop()

    assert run(go()) == [200, 200]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_key_options_are_checked_before_anything_starts(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"id": "p", "arrival": 0, "calls": [{"id": "a", "prompt_tokens": 4, "output_tokens": 2}]}\n')
    bad = _cli("sim", "serve", "--api-key", "k\t", "--port", "0")
    assert bad.returncode == 2 and bad.stderr.endswith(
        "argument --api-key: expected printable ASCII, with no space at either end; character 2 of the key (of 2) "
        "is U+0009 (a control character)\n")
    for flag in ("--api-key", "--engine-api-key"):
        bad = _cli("engine", "gateway", "--engine", "http://127.0.0.1:9", flag, "")
        assert bad.returncode == 2 and bad.stderr.endswith(f"argument {flag}: expected a key, got an empty one\n")
    bad = _cli("engine", "replay", str(trace), "--target", "inprocess", "--policy", "plas", "--api-key", "k",
               "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and bad.stderr == (
        "python -m engine replay: error: --api-key: the in-process engine has no HTTP server to take a key; drop "
        "--api-key or give --target URL\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field, flag", [("api_key", "--api-key"), ("engine_api_key", "--engine-api-key")])
def test_a_gateway_config_refuses_a_bad_key(field, flag):
    from engine.gateway import GatewayConfig

    with pytest.raises(ValueError, match=rf"^{flag}: expected printable ASCII, with no space at either end; "
                                         r"character 2 of the key \(of 3\) is U\+000D \(a control character\)$"):
        GatewayConfig(engines=["http://127.0.0.1:9"], **{field: "a\rb"})


def test_a_key_may_come_from_the_environment_as_vllm_reads_it(monkeypatch):
    from traces.argtypes import api_key_or_env

    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert api_key_or_env(None, "VLLM_API_KEY") == "from-env"
    assert api_key_or_env("flag", "VLLM_API_KEY") == "flag"  # the flag wins, as in vllm serve
    monkeypatch.setenv("VLLM_API_KEY", "")  # vLLM skips an empty key
    assert api_key_or_env(None, "VLLM_API_KEY") is None
    monkeypatch.delenv("VLLM_API_KEY")
    assert api_key_or_env(None, "VLLM_API_KEY") is None
    monkeypatch.setenv("VLLM_API_KEY", "secret\n")
    with pytest.raises(ValueError) as exc:
        api_key_or_env(None, "VLLM_API_KEY")
    assert str(exc.value) == ("the environment's VLLM_API_KEY: expected printable ASCII, with no space at either end; "
                              "character 7 of the key (of 7) is U+000A (a control character)")


def _start(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A server started on --port 0, and its URL from the banner."""
    import re

    proc, line = start_cli_server(command, env)
    return proc, re.search(r" on (http://127\.0\.0\.1:\d+)", line).group(1)


def _status(url: str, key: str | None) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_sim_serve_and_the_gateway_take_vllm_api_key_and_the_replay_openai_api_key(tmp_path):
    """A key given only as --api-key shows in `ps` to every user of the machine. vllm serve reads
    VLLM_API_KEY when --api-key is not given, and vLLM's benchmark client OPENAI_API_KEY; so do
    sim serve and the gateway, and the replay. The gateway's engine key has a name of its own."""
    engine, url = _start(["sim", "serve", "--latency", "constant", "--step-seconds", "0.001"],
                         {"VLLM_API_KEY": "env-key", "OPENAI_API_KEY": ""})
    try:
        assert _status(url + "/v1/models", None) == 401
        assert _status(url + "/v1/models", "env-key") == 200
        assert _status(url + "/health", None) == 200
        gateway, gw = _start(["engine", "gateway", "--engine", url],
                             {"VLLM_API_KEY": "client-key", "GATEWAY_ENGINE_API_KEY": "env-key"})
        try:
            assert _status(gw + "/v1/models", None) == 401
            assert _status(gw + "/v1/models", "client-key") == 200
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
        trace = _trace(tmp_path)
        replay = [sys.executable, "-m", "engine", "replay", str(trace), "--target", url, "--policy", "plas",
                  "--keep-programs"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        ok = subprocess.run(replay + ["--out", str(tmp_path / "ok")], capture_output=True, text=True, timeout=120,
                            env={**env, "OPENAI_API_KEY": "env-key"})
        assert ok.returncode == 0, ok.stderr
        assert "env-key" not in (tmp_path / "ok" / "replay.json").read_text()  # not recorded
        refused = subprocess.run(replay + ["--out", str(tmp_path / "no")], capture_output=True, text=True,
                                 timeout=120, env={**env, "OPENAI_API_KEY": "wrong"})
        assert refused.returncode == 1 and "401" in refused.stderr, refused.stderr
    finally:
        engine.terminate()
        engine.wait(timeout=30)


def _trace(tmp_path: Path) -> Path:
    from traces.format import Call, Program
    from traces.io import save

    save([Program("p", 0.0, "x", (Call("a", (), 4, 2),))], tmp_path / "t.jsonl")
    return tmp_path / "t.jsonl"


def test_a_bad_key_in_the_environment_is_named_and_not_echoed(tmp_path):
    _trace(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command, variable, code in ((["sim", "serve", "--port", "0"], "VLLM_API_KEY", 1),
                                    (["engine", "gateway", "--engine", "http://127.0.0.1:9", "--port", "0"],
                                     "VLLM_API_KEY", 1),
                                    (["engine", "gateway", "--engine", "http://127.0.0.1:9", "--port", "0"],
                                     "GATEWAY_ENGINE_API_KEY", 1),
                                    (["engine", "replay", str(tmp_path / "t.jsonl"), "--target", "http://127.0.0.1:9",
                                      "--policy", "plas", "--out", str(tmp_path / "o")], "OPENAI_API_KEY", 2)):
        proc = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=120,
                              env={**env, variable: "s\u00e9cret-key"})
        assert proc.returncode == code, proc.stderr
        assert proc.stderr.endswith(f"error: the environment's {variable}: expected printable ASCII, with no space "
                                    "at either end; character 2 of the key (of 10) is U+00E9 (not ASCII)\n")
        assert "cret-key" not in proc.stderr
    # the in-process engine takes no key, so one in the environment is left alone (not refused as --api-key is)
    proc = subprocess.run([sys.executable, "-m", "engine", "replay", str(tmp_path / "t.jsonl"), "--target",
                           "inprocess", "--policy", "plas", "--out", str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=120, env={**env, "OPENAI_API_KEY": "s\u00e9cret-key"})
    assert "--api-key" not in proc.stderr and "OPENAI_API_KEY" not in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()
