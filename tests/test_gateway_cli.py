"""The command lines, as separate processes: sim serve, engine gateway, engine replay, engine validate."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from sim.metrics import read_calls_csv
from traces.format import Call, Program
from traces.io import save


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not become healthy in {timeout} s")


def test_serve_gateway_replay_validate_commands(tmp_path):
    trace = tmp_path / "t.jsonl"
    save([Program(f"p{i}", 0.05 * i, "x", (Call("a", (), 20, 5), Call("b", ("a",), 40, 5, context_of="a")))
          for i in range(3)], trace)
    e_port, g_port = _free_port(), _free_port()
    engine = subprocess.Popen([sys.executable, "-m", "sim", "serve", "--port", str(e_port), "--latency", "constant",
                               "--step-seconds", "0.005", "--num-gpu-blocks", "1000", "--policy", "fcfs"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    gateway = subprocess.Popen([sys.executable, "-m", "engine", "gateway", "--engine", f"http://127.0.0.1:{e_port}",
                                "--port", str(g_port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{e_port}", engine)
        _wait_healthy(f"http://127.0.0.1:{g_port}", gateway)
        out = tmp_path / "r"
        proc = subprocess.run([sys.executable, "-m", "engine", "replay", str(trace), "--target",
                               f"http://127.0.0.1:{g_port}", "--policy", "fcfs", "--out", str(out),
                               "--latency", "constant:0.005"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "3 programs, 6 calls" in proc.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{g_port}/programs", timeout=5) as r:
            view = json.load(r)
        # The same replay again on the same engine starts as cold as the first (each run salts its
        # blocks): the second run hit the first's cached prompts, which no simulation of it sees.
        # This one keeps its programs in the gateway's table.
        again = tmp_path / "r2"
        proc = subprocess.run([sys.executable, "-m", "engine", "replay", str(trace), "--target",
                               f"http://127.0.0.1:{g_port}", "--policy", "fcfs", "--out", str(again),
                               "--keep-programs"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{g_port}/programs", timeout=5) as r:
            kept = json.load(r)
    finally:
        for p in (gateway, engine):
            p.terminate()
            p.wait(timeout=30)
    # Each says where it serves, once bound (a port in use says only that: see below).
    assert f"on http://127.0.0.1:{e_port}\n" in engine.stderr.read()
    assert f"gateway on http://127.0.0.1:{g_port} -> http://127.0.0.1:{e_port}" in gateway.stderr.read()
    # The first replay ended each program as it finished (DELETE /v1/programs/ID): the table is empty,
    # not holding them for the gateway's --ttl; the second kept them.
    assert view["programs"] == [] and view["live_calls"] == 0
    assert json.loads((out / "replay.json").read_text())["program_ends"] == {"ended": 3}
    assert sorted(p["id"] for p in kept["programs"]) == ["p0", "p1", "p2"] and kept["live_calls"] == 0
    assert json.loads((again / "replay.json").read_text())["program_ends"] == {}
    assert len(read_calls_csv(out / "calls.csv")) == 6
    hits = [{(c.program_id, c.call_id): c.prefix_hit_tokens for c in read_calls_csv(d / "calls.csv")} for d in (out, again)]
    assert hits[0] == hits[1] and sum(hits[0].values()) > 0  # the continued calls hit their own parents only
    salts = [json.loads((d / "replay.json").read_text())["cache_salt"] for d in (out, again)]
    assert salts[0] != salts[1] and all(s.startswith("replay-") for s in salts)
    exp = tmp_path / "exp.yaml"
    exp.write_text("experiments:\n  t:\n    workload: {trace: %s}\n    engine: {num_gpu_blocks: 1000}\n"
                   "    latency: {kind: constant, seconds: 0.005}\n    policies: [fcfs]\n" % json.dumps(str(trace)))
    proc = subprocess.run([sys.executable, "-m", "engine", "validate", str(out), "--experiment", "t",
                           "--experiments", str(exp)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith(str(out))]  # the replay column
    assert [r[0] for r in rows] == ["fcfs"] * 3 and [r[3] for r in rows] == ["mean", "p50", "p95"]
    # Each program is 10 steps of 5 ms in the simulator; the real run can only add to that
    # (HTTP round trips, a loaded machine), so measured >= simulated and the error is <= 0.
    for r in rows:
        measured, simulated, error = float(r[4]), float(r[5]), float(r[6].rstrip("%"))
        assert simulated == pytest.approx(0.05)
        assert measured >= 0.05 - 1e-3 and error <= 2.0



def test_a_replay_through_a_keyed_gateway_to_a_keyed_engine(tmp_path):
    """vLLM's --api-key on the engine (sim serve's mirrors it) and the gateway's own: the replay holds the
    gateway's key, the gateway the engine's; without a key the replay stops at its first request with the
    gateway's 401, and neither key is written anywhere."""
    key, engine_key = "sk-test-7f3a9c", "sk-engine-51d0e2"
    trace = tmp_path / "t.jsonl"
    save([Program(f"p{i}", 0.02 * i, "x", (Call("a", (), 20, 3), Call("b", ("a",), 30, 3, context_of="a")))
          for i in range(2)], trace)
    e_port, g_port = _free_port(), _free_port()
    engine = subprocess.Popen([sys.executable, "-m", "sim", "serve", "--port", str(e_port), "--latency", "constant",
                               "--step-seconds", "0.005", "--num-gpu-blocks", "1000", "--api-key", engine_key],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    gateway = subprocess.Popen([sys.executable, "-m", "engine", "gateway", "--engine", f"http://127.0.0.1:{e_port}",
                                "--port", str(g_port), "--api-key", key, "--engine-api-key", engine_key],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = f"http://127.0.0.1:{g_port}"
    try:
        _wait_healthy(f"http://127.0.0.1:{e_port}", engine)
        _wait_healthy(target, gateway)
        keyed = subprocess.run([sys.executable, "-m", "engine", "replay", str(trace), "--target", target,
                                "--policy", "plas", "--out", str(tmp_path / "r"), "--api-key", key],
                               capture_output=True, text=True, timeout=120)
        bare = subprocess.run([sys.executable, "-m", "engine", "replay", str(trace), "--target", target,
                               "--policy", "plas", "--out", str(tmp_path / "bare")],
                              capture_output=True, text=True, timeout=120)
    finally:
        for p in (gateway, engine):
            p.terminate()
            p.wait(timeout=30)
    assert keyed.returncode == 0, keyed.stderr
    assert "2 programs, 4 calls" in keyed.stdout
    calls = read_calls_csv(tmp_path / "r" / "calls.csv")
    assert len(calls) == 4 and all(c.finish > c.arrival for c in calls)
    assert json.loads((tmp_path / "r" / "replay.json").read_text())["program_ends"] == {"ended": 2}
    logs = [keyed.stdout, keyed.stderr, bare.stdout, bare.stderr, engine.stderr.read(), gateway.stderr.read()]
    assert not any(k in text for text in logs + [f.read_text() for f in (tmp_path / "r").iterdir()]
                   for k in (key, engine_key))
    assert bare.returncode == 1 and bare.stderr == (
        f"python -m engine replay: error: {target}/v1/models: cannot learn the model name "
        '(HTTP 401: {"error": "Unauthorized"}); pass --model\n')


def test_gateway_cli_rejects_bad_settings():
    proc = subprocess.run([sys.executable, "-m", "engine", "gateway", "--engine", "http://x", "--ttl", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == "python -m engine gateway: error: --ttl must be > 0 seconds, got 0.0\n"
    # Named as the flags: these said policy_params.program_ttl and policy_params.locality_threshold.
    for flag, value, message in (("--ttl", "inf", "--ttl must be at most 1e+09 seconds, got inf"),
                                 ("--ttl", "nan", "--ttl must be > 0 seconds, got nan"),
                                 ("--ttl", "1e10", "--ttl must be at most 1e+09 seconds, got 10000000000.0"),
                                 ("--threshold", "-1", "--threshold must be an integer >= 0 (tokens), got -1")):
        proc = subprocess.run([sys.executable, "-m", "engine", "gateway", "--engine", "http://x", flag, value],
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stderr) == (1, f"python -m engine gateway: error: {message}\n")
    proc = subprocess.run([sys.executable, "-m", "engine", "gateway"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == ("python -m engine gateway: error: "
                                            "the following arguments are required: --engine")
    proc = subprocess.run([sys.executable, "-m", "engine", "gateway", "--engine", "notaurl"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == ("python -m engine gateway: error: --engine notaurl: expected an http:// or https:// URL, "
                           "e.g. http://127.0.0.1:8001\n")
    for port in ("70000", "-1"):
        proc = subprocess.run([sys.executable, "-m", "engine", "gateway", "--engine", "http://x", "--port", port],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.splitlines()[-1] == (
            f"python -m engine gateway: error: argument --port: expected a port from 0 to 65535, got {port}")


@pytest.mark.parametrize("host", ["127.0.0.1", "999.1.1.1"])
def test_gateway_cli_reports_an_address_it_cannot_listen_on(host):
    """A port already taken, or a host that is no address: one line, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "engine", "gateway", "--engine", "http://x", "--host", host,
                               "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"python -m engine gateway: error: cannot listen on {host}:{port}: " in proc.stderr
    assert "gateway on http" not in proc.stderr  # it was announced as served before the bind failed


@pytest.mark.parametrize("options, message", [
    (["--health-interval", "0", "--stall-timeout", "30"],
     "--stall-timeout: --health-interval 0 turns the health checks off, and the stall check runs with them, so it "
     "would be ignored; drop --stall-timeout or give --health-interval > 0"),
    (["--health-interval", "0", "--health-failures", "5"],
     "--health-failures: --health-interval 0 turns the health checks off, so no failed check would be counted; "
     "drop --health-failures or give --health-interval > 0"),
    (["--balancer", "round_robin", "--threshold", "100"],
     "--threshold: only the locality balancer reads it, and --balancer round_robin would ignore it; "
     "drop --threshold or use --balancer locality"),
    (["--balancer", "least_used", "--threshold", "2048"],
     "--threshold: only the locality balancer reads it, and --balancer least_used would ignore it; "
     "drop --threshold or use --balancer locality"),
])
def test_gateway_cli_refuses_flags_the_others_make_inert(options, message):
    """Each started the gateway without a word, the flag ignored (as sim serve refuses --step-seconds
    under a latency kind that does not read it)."""
    proc = subprocess.run([sys.executable, "-m", "engine", "gateway", "--engine", "http://x", *options],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (1, f"python -m engine gateway: error: {message}\n")


def test_gateway_cli_keeps_the_documented_defaults_behind_its_none_sentinels():
    """Flags left out still mean 2048 tokens, 3 checks and 60 s; the inert ones only when not given."""
    from engine.cli import build_parser
    from engine.gateway import GatewayConfig, inapplicable_flag

    args = build_parser().parse_args(["gateway", "--engine", "http://x", "--balancer", "round_robin",
                                      "--health-interval", "0", "--stall-timeout", "0"])
    assert inapplicable_flag(args) is None  # 0: no stall check, as no health checks give
    defaults = GatewayConfig(engines=["http://x"])
    assert (defaults.threshold, defaults.health_failures, defaults.stall_timeout) == (2048, 3, 60.0)


def test_the_gateway_and_the_replayer_load_no_simulator():
    """Both run in front of real vLLM servers: the stand-in token ids and the site runner they share with
    sim serve live in modules of their own, so neither loads SimPy or the engine model."""
    code = ("import sys, engine.gateway, engine.replay\n"
            "print(sorted(m for m in sys.modules if m == 'simpy' or m.startswith('simpy.')\n"
            "             or m in ('sim.replica', 'sim.lazy_decode', 'sim.sim_call', 'sim.realtime', 'sim.simulate')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
