"""Loopback fixtures for the gateway / sim serve / replay tests: real HTTP on 127.0.0.1, free ports."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from aiohttp import web

from engine.gateway import Gateway, GatewayConfig, start_gateway
from sim.config import EngineConfig, ExperimentConfig, LatencyConfig
from sim.realtime import RealtimeEngine
from sim.serve import SimServer, serve

ROOT = Path(__file__).resolve().parent.parent


def engine_config(step: float = 0.005, blocks: int = 4000, max_num_seqs: int = 256) -> ExperimentConfig:
    """A small fast engine: constant ``step`` seconds per step, ``blocks`` KV blocks."""
    return ExperimentConfig(
        name="test",
        engine=dataclasses.replace(EngineConfig(), num_gpu_blocks=blocks, max_num_seqs=max_num_seqs),
        latency=LatencyConfig(kind="constant", seconds=step),
    )


@dataclass
class Running:
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


async def start_engine(index: int = 0, step: float = 0.005, policy: str = "plas",
                       blocks: int = 4000, api_key: str | None = None) -> tuple[Running, RealtimeEngine]:
    engine = RealtimeEngine(engine_config(step, blocks), policy, index)
    runner = await serve(SimServer(engine, "sim", api_key=api_key), "127.0.0.1", 0)
    return Running(runner, _url(runner)), engine


async def start_app(routes: dict[tuple[str, str], Callable]) -> Running:
    """A stand-in HTTP server on a free port: ``{(method, path): handler}``."""
    app = web.Application()
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return Running(runner, _url(runner))


async def start_gw(engine_urls: list[str], **kw) -> tuple[Running, Gateway]:
    gw = Gateway(GatewayConfig(engines=engine_urls, **kw))
    runner = await start_gateway(gw, "127.0.0.1", 0)
    return Running(runner, _url(runner)), gw


async def wait_for(pred: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, every: float = 0.01) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds pass; returns its last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value or asyncio.get_running_loop().time() >= deadline:
            return bool(value)
        await asyncio.sleep(every)


def run(coro, timeout: float = 60.0):
    """Run a test coroutine with a hard time limit."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def start_cli_server(command: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``python -m COMMAND --port 0`` (sim serve, the gateway) started from this checkout, and the banner
    line naming where it listens, once printed (killed if it exits or a minute passes without one)."""
    proc = subprocess.Popen([sys.executable, "-m", *command, "--port", "0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline, line = time.monotonic() + 60, ""
    while " on http://" not in line and time.monotonic() < deadline and proc.poll() is None:
        if sel.select(timeout=1):
            line = proc.stderr.readline()
    if " on http://" not in line:
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError(f"{' '.join(command)}: no banner: {line!r}")
    return proc, line
