"""``python -m engine gateway``: a program-aware, OpenAI-compatible HTTP gateway.

It sits in front of one or more engines (vLLM servers running the
program-aware scheduler plugin, or ``python -m sim serve``) and does what
the paper's front end does:

* keeps the global process table (`sim.core.ProcessTable`): one entry per
  program with its attained service, engine affinity and live calls;
* picks an engine per call with the core's balancer (`sim.core.make_balancer`,
  locality by default), whose load signal is the gateway's count of
  in-flight calls per engine;
* forwards ``POST /v1/completions`` and ``/v1/chat/completions`` with
  ``vllm_xargs = {program_id, thread_id, program_service,
  program_total_service}`` (see
  `engine.protocol`), streaming responses through unchanged (SSE), passing
  engine errors through (status and body), and closing the upstream
  connection when the client goes away, which is how vLLM's server learns to
  abort a request.

Identity: clients send ``X-Program-Id`` and ``X-Thread-Id``, or
``vllm_xargs.program_id`` and ``vllm_xargs.thread_id`` in the body (a string
or an integer; ``vllm_xargs`` itself an object or null); a header
wins over the body's field, each id on its own. Without a program id a call
is a one-call program with a fresh id, and a thread id without one is
refused. A program call without a thread id gets a fresh thread (it may run
in parallel with the program's other calls).
A second live call on the same thread of a program is refused with 409.
``X-KV-TTL: SECONDS`` asks the engine to pin the call's KV for its
program's next call (``vllm_xargs.kv_ttl``; `engine.kv_pins`); a value
that is not seconds >= 0 is refused with 400. Any of these three headers
given twice with different values is refused with 400 naming it (the first
was taken without a word); the same value repeated is taken.

Service accounting. The engines' per-step service (`sim.core.attribute_service`)
is not visible to the gateway, so each finished call's service is, in order
of preference:

1. the engine's own figure when the response carries one (``engine_stats.service``,
   sent by ``sim serve``; exactly the simulator's definition);
2. for a streamed response, the time from its first to its last token as
   seen at the gateway: the decode phase; it leaves out the prefill (which
   the gateway cannot tell apart from queueing) and includes any preemption
   stall during decoding;
3. for a whole (non-streamed) response, the time from sending the request
   to receiving the response: it includes queueing, an over-estimate.

The value is charged with the policy's own update rule (`Policy.on_finish`:
PLAS adds it, ATLAS takes the critical-path maximum), on `ProgramState`
entries of the process table, so the gateway's program priority is the one
the simulator computes. Aborted or failed calls are not charged (as
`SchedulerCore.abort_call`). We do not run a whole `SchedulerCore` here: the
gateway has no queues, and the core's starvation heap would only grow.

Ending programs: ``DELETE /v1/programs/{id}`` forgets a program (404 if
unknown, 409 while it has live calls). Idle programs are also dropped after
``--ttl`` seconds (`ProcessTable.expire`, on a timer).

Unreachable engines: an engine that refuses the connection (or does not
accept it within the connect timeout) never saw the call, so the call goes
to another engine, and the failed one is left out of the balance for a
backoff of 1 s, doubling to 30 s while it stays down; any answer from it
ends the backoff. A program pinned to it is re-pinned: the history it had
cached there is out of reach. Without this its in-flight count stayed at
0, so the least-used rule sent it every short call. Only when no engine
can be reached does a call get 502.

Lost engines and hung engine cores: the health checks of `engine.liveness`.

API keys, as vLLM's ``--api-key`` works (``Authorization: Bearer KEY``, else
401 ``{"error": "Unauthorized"}``). ``--api-key`` guards the gateway's
``/v1`` and ``/programs`` (``/health`` stays open). The engines' key,
``--engine-api-key``, goes with every call, model list and probe the gateway
sends them, in place of the client's ``Authorization``, so clients never
hold it; an engine that refuses it (401) is the operator's to fix, and the
client gets a 502 saying so. Without it the client's ``Authorization`` is
passed on (one key for all, or a gateway that checks none), and the probes
carry the gateway's ``--api-key``, or none. Either key may come from the
environment instead of the command line, where ``ps`` shows it:
``VLLM_API_KEY`` (the gateway's, as ``vllm serve`` reads it) and
``GATEWAY_ENGINE_API_KEY`` (the engines').

Completion: a streamed call is complete (and charged, and its thread
free) when its ``[DONE]`` arrives, before that event is passed on: a
client may close the connection or send the thread's next call as soon
as it reads it.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``:
malformed JSON or bad ids 400, a body over ``--max-body`` 413, unknown route
404, wrong method 405, busy thread 409, no engine reachable or an engine
refusing ``--engine-api-key`` 502; a missing or wrong client key gets vLLM's
401 body.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import math
import socket
import sys
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urlsplit

import aiohttp
from aiohttp import web

from engine.liveness import EngineMonitor
from engine.protocol import (
    ENGINE_STATS,
    ERROR_TYPES,
    GATEWAY_ENGINE_HEADER,
    KV_TTL_HEADER,
    PROGRAM_HEADER,
    THREAD_HEADER,
    XARG_KV_TTL,
    XARG_PROGRAM,
    XARG_THREAD,
    XARGS,
    BadRequest,
    base_of_api_path,
    check_id,
    check_kv_ttl,
    error_body,
    one_header,
    with_xargs,
    xargs_for,
)
from engine.sse import DONE, SSEParser, event_token_count, whole_events_end
from sim.core import ProcessTable, make_balancer, make_policy
from sim.core.params import MAX_SECONDS, PolicyParams
from sim.core.state import CallState, ProgramState
from sim.openai_api import api_key_guard, json_type, router_error_message, sse_error
from sim.http_site import run_site
from traces.argtypes import api_key, api_key_or_env, integer, number, port_number

log = logging.getLogger(__name__)

BYTES_PER_TOKEN = 4  # prompt-length estimate for text prompts (the balancer's only need)
# How long an engine that could not be reached is left out of the balance: the
# first backoff, doubled on each further failure up to the last.
DOWN_FIRST = 1.0
DOWN_MAX = 30.0
# Client headers the engines may need (vLLM's --api-key checks Authorization); the rest stay here.
FORWARDED_HEADERS = ("Authorization",)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return web.json_response(error_body(message, kind, param, code), status=status, headers=headers)


def prompt_tokens_of(body: dict[str, Any]) -> int:
    """Prompt length for the balancer: exact for token ids, about 4 bytes per token for text."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        return len(prompt)
    if isinstance(prompt, str):
        # surrogatepass: a lone surrogate (JSON's "\ud800") is the engine's to judge; strict encoding
        # raised UnicodeEncodeError here, a 500 and a traceback.
        return math.ceil(len(prompt.encode("utf-8", "surrogatepass")) / BYTES_PER_TOKEN)
    messages = body.get("messages")
    if isinstance(messages, list):
        size = sum(len(str(m.get("content", "")).encode("utf-8", "surrogatepass"))
                   for m in messages if isinstance(m, dict))
        return math.ceil(size / BYTES_PER_TOKEN)
    return 0


def xarg_id(value: Any, field: str) -> str:
    """An id from ``vllm_xargs``: a string, or an integer as the plugin takes one (`engine.plugin_config`);
    str() made true and 1.5 the ids "True" and "1.5"."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    shown = json.dumps(value) if isinstance(value, (bool, int, float)) else json_type(value)
    raise BadRequest(f"{field} must be a string or an integer, got {shown}", param=field, code="invalid_id")


def engine_key(parts: SplitResult) -> tuple[str, str, int, str]:
    """An engine URL as the server it names: scheme, host in lower case (an IP address in its
    canonical form), the port with its scheme's default filled in, the path without a trailing /."""
    host = parts.hostname or ""  # urlsplit lower-cases it
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:  # a name, not an address
        pass
    port = parts.port if parts.port is not None else {"http": 80, "https": 443}[parts.scheme]
    return parts.scheme, host, port, parts.path.rstrip("/")


def same_server_by_address(engines: list[str]) -> str | None:
    """Why two engine URLs are one server reached by different host names (``localhost`` and
    ``127.0.0.1``), or None. `engine_key` compares spellings only, so such a pair started and the
    server took two engines' share of calls. Names are resolved as a connection resolves them; two
    sharing an address (same scheme, port and path) are one server. A name that does not resolve
    is not compared: the health checks report an engine that cannot be reached."""
    seen: dict[tuple[str, str, int, str], int] = {}
    for i, url in enumerate(engines):
        parts = urlsplit(url)
        scheme, _, port, path = engine_key(parts)
        try:
            found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):  # socket.gaierror is an OSError; a label past 63 bytes a UnicodeError
            continue
        for address in dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]).compressed for info in found):
            first = seen.setdefault((scheme, address, port, path), i)
            if first != i:
                return (f"--engine {url}: the same server as --engine {engines[first]} (engine {first}), as both "
                        f"reach {address} port {port}; give each engine once")
    return None


@dataclass
class GatewayConfig:
    engines: list[str]
    balancer: str = "locality"
    threshold: int = 2048
    ttl: float = 600.0
    policy: str = "atlas"
    max_body: int = 32 * 1024 * 1024
    expire_interval: float | None = None  # default: min(ttl / 4, 10) seconds
    connect_timeout: float = 10.0
    # Engine liveness (`engine.liveness`): about 15 s to find a frozen engine; vLLM's /health is
    # answered by its API server without a round trip to the engine core, so 5 s is ample.
    health_interval: float = 5.0  # 0: no checks
    health_timeout: float = 5.0
    health_failures: int = 3
    # Hung engine cores (`engine.liveness`): an engine that the gateway has waited on for calls this many seconds
    # in all since its samples last moved, with no step, fails its checks. One engine step, even a whole prefill
    # chunk of max_num_batched_tokens, takes well under a second on a GPU, so 60 s leaves a wide margin for slow
    # hardware and for work in vLLM's API server before a call reaches the engine core (tokenizing a huge prompt,
    # compiling a grammar). With the checks above, an engine is lost about 70 s into that waiting. 0: no stall
    # check.
    stall_timeout: float = 60.0
    # API keys (module docstring, "API keys"): the one clients must give the gateway, and the engines' (vLLM's
    # --api-key), which the gateway then sends with everything it asks of them in place of the client's own.
    api_key: str | None = field(default=None, repr=False)
    engine_api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.engines:
            raise ValueError("at least one --engine URL is needed")
        self.engines = [u.rstrip("/") for u in self.engines]
        seen: dict[tuple[str, str, int, str], int] = {}
        for i, url in enumerate(self.engines):  # checked now: a typo would otherwise fail only on the first request
            example = "expected an http:// or https:// URL, e.g. http://127.0.0.1:8001"
            try:
                parts = urlsplit(url)
                _ = parts.port  # raises ValueError for a port that is not a number in 0-65535
            except ValueError as exc:
                raise ValueError(f"--engine {url}: {exc} ({example})") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"--engine {url}: {example}")
            if parts.query or parts.fragment or url.endswith(("?", "#")):  # the API path is appended to the URL
                raise ValueError(f"--engine {url}: a base URL takes no ?query or #fragment, as the API path "
                                 f"is appended to it ({example})")
            base = base_of_api_path(parts)
            if base is not None:  # it was healthy (/health is not under /v1) and 404'd every call: /v1/v1/...
                raise ValueError(f"--engine {url}: the gateway appends /v1/... to it itself; expected the "
                                 f"engine's base URL, without /v1 (here {base})")
            # Two engines that are one server would take twice its share of calls, and the
            # balancer would count one KV cache as two: refused, compared as the server sees them.
            key = engine_key(parts)
            if key in seen:
                raise ValueError(f"--engine {url}: the same engine as --engine {self.engines[seen[key]]} "
                                 f"(engine {seen[key]}); give each engine once")
            seen[key] = i
        # Checked here, naming the flags: the policy's own check named its fields
        # (policy_params.program_ttl, policy_params.locality_threshold), which no flag is called.
        if not self.ttl > 0:  # nan too
            raise ValueError(f"--ttl must be > 0 seconds, got {self.ttl}")
        if self.ttl > MAX_SECONDS:  # inf: programs never forgotten; past it the policy's clock means nothing
            raise ValueError(f"--ttl must be at most {MAX_SECONDS:g} seconds, got {self.ttl}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold < 0:
            raise ValueError(f"--threshold must be an integer >= 0 (tokens), got {self.threshold!r}")
        if self.max_body < 1:
            raise ValueError(f"--max-body must be >= 1 byte, got {self.max_body}")
        if not 0 <= self.health_interval < math.inf:
            raise ValueError(f"--health-interval must be >= 0 seconds (0: no checks), got {self.health_interval}")
        if not 0 < self.health_timeout < math.inf:
            raise ValueError(f"--health-timeout must be > 0 seconds, got {self.health_timeout}")
        if self.health_failures < 1:
            raise ValueError(f"--health-failures must be >= 1, got {self.health_failures}")
        if not 0 <= self.stall_timeout < math.inf:
            raise ValueError(f"--stall-timeout must be >= 0 seconds (0: no stall check), got {self.stall_timeout}")
        for flag, key in (("--api-key", self.api_key), ("--engine-api-key", self.engine_api_key)):
            if key is not None:
                try:
                    api_key(key)
                except argparse.ArgumentTypeError as exc:
                    raise ValueError(f"{flag}: {exc}") from None


@dataclass(eq=False)
class LiveCall:
    state: CallState
    engine: int
    sent: float
    completed: bool = False  # charged as complete (at its [DONE], or its whole answer)
    post: asyncio.Future | None = None  # the request, until the engine's answer begins
    upstream: aiohttp.ClientResponse | None = None  # the engine's answer, once it begins
    lost: str | None = None  # why the gateway gave up on its engine (`Gateway.fail_lost_engine`)


@dataclass(eq=False)
class EngineState:
    """What the gateway knows of one engine, in one place: a check, a call and the balance each read several
    of these at once, for the same engine."""

    url: str  # as given (`GatewayConfig.engines`)
    load: int = 0  # calls sent to it and not yet ended: the balancer's load signal
    routed: int = 0  # calls sent to it, each try of a call that failed over counted
    down_until: float = -math.inf  # gateway time until which it is left out
    backoff: float = 0.0  # the last backoff after a refused connection (`DOWN_FIRST` doubling to `DOWN_MAX`)
    lost: bool = False  # failed --health-failures checks in a row, none passed since
    failed_checks: int = 0  # checks failed in a row
    calls_on: set[LiveCall] = field(default_factory=set)  # the calls it holds (`Gateway.fail_lost_engine`)
    # The stall check (`engine.liveness`, "Hung engine cores"):
    awaiting: int = 0  # calls (or a probe) whose next bytes the gateway is waiting on it for
    progress: tuple[float | None, ...] | None = None  # last samples read
    progress_at: float | None = None  # when they were first read
    # Seconds with awaiting > 0 since progress_at, up to busy_from: the time the samples stood still while
    # the gateway waited on the engine (summed over waits, so calls that end and are sent again add up).
    waited: float = 0.0
    busy_from: float | None = None  # start of the wait not yet in waited
    model_named: str | None = None  # the last model a call to it named
    key_refused_warned: bool = False  # it answered 401 to --engine-api-key: warned once
    stalled: bool = False  # found with no step; its checks fail until it steps again
    no_progress_warned: bool = False  # /metrics unusable: warned once


class EngineUnreachable(Exception):
    """The engine sent nothing back (unreachable, or lost before answering), so the client has seen
    nothing: another engine may take the call."""


class Accounting:
    """The process table plus the policy's update rules: what the gateway knows of programs."""

    def __init__(self, policy: str, ttl: float, threshold: int):
        params = PolicyParams(program_ttl=ttl, locality_threshold=threshold)
        self.policy = make_policy(policy, params)
        if self.policy.oracle:
            raise ValueError(f"policy {policy!r} needs the trace's future; the gateway cannot run it")
        self.table = ProcessTable(ttl)
        self._seq = 0

    def start(self, program_id: str, thread_id: str, prompt_tokens: int, now: float) -> CallState:
        """Register a call; its ``priority`` is the service forwarded to the engine.

        Raises BadRequest (409) if the thread already has a live call.
        """
        program = self.table.get_or_create(program_id, now)
        if thread_id in program.live:
            raise BadRequest(f"program {program_id!r} already has a live call on thread {thread_id!r}",
                             param=THREAD_HEADER, code="thread_busy", status=409)
        self._seq += 1
        call = CallState(id=f"gw-{self._seq}", program_id=program_id, thread_id=thread_id, arrival=now,
                         prompt_tokens=prompt_tokens, seq=self._seq, reset_time=now, waiting_since=now)
        self.policy.on_arrival(call, program)
        program.live[thread_id] = call
        program.last_arrival = now
        return call

    def finish(self, call: CallState, service: float, now: float) -> ProgramState:
        """Charge a completed call's service, as `SchedulerCore.finish_call` does."""
        program = self.table.programs[call.program_id]
        call.service = max(0.0, service)
        call.finished = True
        del program.live[call.thread_id]
        program.total_service += call.service
        program.total_waiting += max(0.0, (now - call.arrival) - call.service)
        program.last_completion = now
        self.policy.on_finish(call, program)
        return program

    def abort(self, call: CallState, now: float) -> None:
        """Drop a call that did not complete; its service is not counted."""
        program = self.table.programs.get(call.program_id)
        call.finished = True
        if program is not None:
            program.live.pop(call.thread_id, None)
            program.last_completion = now

    def live_calls(self) -> int:
        return sum(len(p.live) for p in self.table.programs.values())


@dataclass
class Outcome:
    """What the gateway saw of one forwarded call."""

    first_token: float | None = None
    last_token: float | None = None
    engine_service: float | None = None
    tokens: int = 0


class Gateway:
    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        self.acct = Accounting(cfg.policy, cfg.ttl, cfg.threshold)
        self.balancer = make_balancer(cfg.balancer, cfg.threshold)
        self.engines = [EngineState(url) for url in cfg.engines]
        self.monitor = EngineMonitor(self.engines, health_interval=cfg.health_interval,
                                     health_timeout=cfg.health_timeout, health_failures=cfg.health_failures,
                                     stall_timeout=cfg.stall_timeout, now=self.now, end_backoff=self._mark_up,
                                     fail_calls=self.fail_lost_engine,
                                     # one key for all (the engines' --api-key the gateway's own) needs no
                                     # --engine-api-key for calls, which pass the client's on; nor for probes
                                     api_key=cfg.engine_api_key or cfg.api_key,
                                     key_flag="--engine-api-key" if cfg.engine_api_key else "--api-key")
        self.recent: deque[dict[str, Any]] = deque(maxlen=1000)  # routing decisions, newest last
        self._session: aiohttp.ClientSession | None = None
        self._expiry: asyncio.Task | None = None
        self._t0 = 0.0
        self._anon = 0

    # -- lifecycle -----------------------------------------------------------------
    def app(self) -> web.Application:
        # The client's key guards the gateway's /v1 and its program table; /health stays open, as on vLLM.
        guard = [api_key_guard(self.cfg.api_key, ("/v1", "/programs"))] if self.cfg.api_key is not None else []
        app = web.Application(client_max_size=self.cfg.max_body, middlewares=[*guard, self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_delete("/v1/programs/{program_id}", self.end_program)
        app.router.add_get("/programs", self.programs)
        app.router.add_get("/health", self.health)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        self._t0 = asyncio.get_running_loop().time()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        self._expiry = asyncio.create_task(self._expire_loop())
        self.monitor.start(self._session)

    async def _cleanup(self, app: web.Application) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
        await self.monitor.stop()
        if self._session is not None:
            await self._session.close()

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self._t0

    async def _expire_loop(self) -> None:
        interval = self.cfg.expire_interval or min(self.cfg.ttl / 4, 10.0)
        while True:
            await asyncio.sleep(interval)
            self.acct.table.expire(self.now())

    # -- engine liveness (`engine.liveness`) -------------------------------------------
    def fail_lost_engine(self, engine: int, message: str) -> None:
        """Give up on the calls a lost engine holds: each one's relay then ends with ``message``."""
        for live in list(self.engines[engine].calls_on):
            if live.lost is not None:
                continue
            live.lost = message
            if live.upstream is not None:
                live.upstream.close()  # the pending read fails, and the relay reports the loss
            elif live.post is not None:
                live.post.cancel()  # no answer begun: `_relay` sends the call to another engine

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """Every error leaves as an OpenAI error body, including the router's own 404/405/413."""
        try:
            return await handler(request)
        except BadRequest as exc:
            return error_response(exc.status, exc.message, exc.param, exc.code)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = router_error_message(request, exc, self.cfg.max_body)
            return error_response(exc.status, message, headers={"Allow": exc.headers["Allow"]}
                                  if "Allow" in exc.headers else None)

    def _key_refused(self, engine: int) -> str:
        """An engine's 401 to the gateway's own key: the operator's to fix, not the client's key (which the
        gateway checked), so a 502 that says so, and a warning once per engine."""
        state = self.engines[engine]
        message = (f"engine {engine} ({state.url}) refused the gateway's --engine-api-key (401): it is not "
                   f"one of that engine's --api-key keys")
        if not state.key_refused_warned:
            state.key_refused_warned = True
            log.warning("%s", message)
        return message

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        """The client's headers an engine may need (`FORWARDED_HEADERS`), the engines' key in place of the
        client's Authorization when the gateway has one (--engine-api-key)."""
        headers = {k: request.headers[k] for k in FORWARDED_HEADERS if k in request.headers}
        if self.cfg.engine_api_key is not None:
            headers["Authorization"] = f"Bearer {self.cfg.engine_api_key}"
        return headers

    # -- request identity ----------------------------------------------------------
    def _ids(self, request: web.Request, body: dict[str, Any]) -> tuple[str, str]:
        xargs = {} if body.get(XARGS) is None else body[XARGS]
        if not isinstance(xargs, dict):  # it was dropped, and the engine got a body without the client's
            raise BadRequest(f"{XARGS} must be an object, got {json_type(xargs)}", param=XARGS, code="invalid_xargs")
        pid = one_header(request.headers, PROGRAM_HEADER)
        tid = one_header(request.headers, THREAD_HEADER)
        pid_field, tid_field = PROGRAM_HEADER, THREAD_HEADER  # where each id came from, for errors
        # A header wins over the body's field; each id is taken where it is given.
        if pid is None and xargs.get(XARG_PROGRAM) is not None:
            pid_field = f"{XARGS}.{XARG_PROGRAM}"
            pid = xarg_id(xargs[XARG_PROGRAM], pid_field)
        if tid is None and xargs.get(XARG_THREAD) is not None:
            tid_field = f"{XARGS}.{XARG_THREAD}"
            tid = xarg_id(xargs[XARG_THREAD], tid_field)
        if pid is None:
            if tid is not None:
                raise BadRequest(f"{tid_field} was given without {PROGRAM_HEADER} (or {XARGS}.{XARG_PROGRAM})",
                                 param=tid_field, code="invalid_id")
            self._anon += 1
            return f"anon-{uuid.uuid4().hex[:12]}", "0"
        check_id(pid, pid_field)
        if tid is None:  # its own thread, named past any the program has live (a client may use "t-1" too)
            program = self.acct.table.get(pid)
            while True:
                self._anon += 1
                tid = f"t-{self._anon}"
                if program is None or tid not in program.live:
                    return pid, tid
        return pid, check_id(tid, tid_field)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > self.cfg.max_body:
            raise BadRequest(f"request body of {request.content_length} bytes exceeds {self.cfg.max_body} bytes",
                             code="request_too_large", status=413)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(f"request body exceeds {self.cfg.max_body} bytes", code="request_too_large",
                             status=413) from None
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"malformed JSON body: {exc}", code="invalid_json") from None
        except RecursionError:
            raise BadRequest("malformed JSON body: nested too deeply", code="invalid_json") from None
        except ValueError:  # the body is forwarded as is, so no stand-in for an integer Python refuses to read
            raise BadRequest(f"malformed JSON body: an integer longer than {sys.get_int_max_str_digits()} digits",
                             code="invalid_json") from None
        if not isinstance(body, dict):
            raise BadRequest(f"the request body must be a JSON object, got {json_type(body)}", code="invalid_json")
        return body

    # -- forwarding ------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, "/v1/completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, "/v1/chat/completions")

    async def _forward(self, request: web.Request, path: str) -> web.StreamResponse:
        body = await self._body(request)
        pid, tid = self._ids(request, body)
        ttl_header = one_header(request.headers, KV_TTL_HEADER)
        kv_ttl = None if ttl_header is None else check_kv_ttl(ttl_header)
        now = self.now()
        prompt_tokens = prompt_tokens_of(body)
        call = self.acct.start(pid, tid, prompt_tokens, now)
        program = self.acct.table.programs[pid]
        xargs = xargs_for(pid, tid, call.priority, program.total_service)
        if kv_ttl is not None:
            xargs[XARG_KV_TTL] = kv_ttl
        outgoing = with_xargs(body, xargs)
        upstream_headers = self._upstream_headers(request)
        upstream_headers.update({PROGRAM_HEADER: pid, THREAD_HEADER: tid})  # the ids the gateway settled on
        tried: set[int] = set()
        unreachable: list[str] = []
        live: LiveCall | None = None
        try:
            try:  # once for every engine tried; encoding in aiohttp ran deeper in the stack than the
                # parse, so a body nested about 970 deep parsed, then failed there: a 500 and a traceback
                payload = json.dumps(outgoing).encode("utf-8")
            except RecursionError:
                return error_response(400, "malformed JSON body: nested too deeply", code="invalid_json",
                                      headers={PROGRAM_HEADER: pid, THREAD_HEADER: tid})
            upstream_headers["Content-Type"] = "application/json"
            while True:
                engine = self._choose(prompt_tokens, program, tried)
                if engine is None:
                    return error_response(502, "no engine could be reached: " + "; ".join(unreachable),
                                          code="engine_unreachable", headers={PROGRAM_HEADER: pid, THREAD_HEADER: tid})
                tried.add(engine)
                state = self.engines[engine]
                if isinstance(body.get("model"), str):
                    state.model_named = body["model"]  # a stalled engine's probe may name it
                state.load += 1
                state.routed += 1
                self.recent.append({"program_id": pid, "thread_id": tid, "engine": engine,
                                    "prompt_tokens": prompt_tokens, "program_service": call.priority,
                                    "time": self.now()})
                live = LiveCall(call, engine, self.now())
                state.calls_on.add(live)
                headers = {GATEWAY_ENGINE_HEADER: str(engine), PROGRAM_HEADER: pid, THREAD_HEADER: tid}
                try:
                    response, outcome = await self._relay(request, path, payload, live, headers, upstream_headers)
                except EngineUnreachable as exc:
                    unreachable.append(str(exc))
                    log.warning("%s", exc)
                    continue
                finally:
                    state.load -= 1
                    state.calls_on.discard(live)
                if outcome is not None:
                    self._complete(live, outcome)
                return response
        finally:
            if live is None or not live.completed:
                self.acct.abort(call, self.now())

    def _choose(self, prompt_tokens: int, program: ProgramState, tried: set[int]) -> int | None:
        """The balancer's engine among those not tried for this call, not lost and not in a backoff; None if
        none is left.

        When every untried engine is lost or in a backoff, they are tried
        anyway: one may be back, and refusing at once would make a brief outage
        of every engine outlast itself by the backoff. (A lost engine's next
        failed check fails the call over again.)
        """
        now = self.now()
        n = len(self.engines)
        usable = [i not in tried and not state.lost and now >= state.down_until for i, state in enumerate(self.engines)]
        if not any(usable):
            usable = [i not in tried for i in range(n)]
            if not any(usable):
                return None
        if program.engine is not None and program.engine < n and not usable[program.engine]:
            program.engine = None  # re-pinned by the balancer's own rule
        if program.last_engine is not None and program.last_engine < n and not usable[program.last_engine]:
            program.last_engine = None
        loads = [state.load if usable[i] else math.inf for i, state in enumerate(self.engines)]
        for _ in range(n):  # round-robin may name an unusable engine: at most n turns reach a usable one
            engine = self.balancer.choose(prompt_tokens, program, loads)
            if usable[engine]:
                return engine
        return None

    def _mark_down(self, engine: int) -> None:
        state = self.engines[engine]
        now = self.now()
        if now < state.down_until:
            # Calls already under way when it went down fail too: one outage, not a doubling each
            # (twelve concurrent calls took the first backoff to 30 s).
            return
        state.backoff = min(DOWN_MAX, state.backoff * 2) if state.backoff else DOWN_FIRST
        state.down_until = now + state.backoff

    def _mark_up(self, engine: int) -> None:
        state = self.engines[engine]
        state.backoff = 0.0
        state.down_until = -math.inf

    def _complete(self, live: LiveCall, outcome: Outcome) -> None:
        """Charge a completed call once, freeing its thread."""
        if not live.completed:
            live.completed = True
            self.acct.finish(live.state, self._service(outcome, live), self.now())

    def _service(self, outcome: Outcome, live: LiveCall) -> float:
        """The call's service as the gateway accounts it (see the module docstring)."""
        if outcome.engine_service is not None:
            return outcome.engine_service
        if outcome.first_token is not None and outcome.last_token is not None:
            return outcome.last_token - outcome.first_token
        return (outcome.last_token if outcome.last_token is not None else self.now()) - live.sent

    async def _relay(self, request: web.Request, path: str, payload: bytes, live: LiveCall,
                     headers: dict[str, str], upstream_headers: dict[str, str]
                     ) -> tuple[web.StreamResponse, Outcome | None]:
        """Send to the engine and relay its answer; the outcome is None unless the call completed."""
        assert self._session is not None
        url = self.engines[live.engine].url + path
        # A task of its own, so that `fail_lost_engine` can cancel the wait without cancelling the handler.
        live.post = asyncio.ensure_future(self._session.post(url, data=payload, headers=upstream_headers))
        try:
            with self.monitor.awaiting(live.engine):
                upstream = await live.post
        except asyncio.CancelledError:
            post = live.post
            if post.done() and not post.cancelled():
                # The answer began in the loop turn that cancelled the handler: close it, or the
                # engine learns of the disconnect only when the response is collected.
                if post.exception() is None:
                    post.result().close()
            current = asyncio.current_task()
            if live.lost is not None and (current is None or not current.cancelling()):
                raise EngineUnreachable(live.lost) from None
            raise  # the client went away: the handler itself is cancelled
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:  # never reached it
            self._mark_down(live.engine)
            raise EngineUnreachable(f"engine {live.engine} ({self.engines[live.engine].url}) is unreachable: "
                                    f"{exc}") from None
        except (aiohttp.ClientError, OSError) as exc:  # it may have seen the call: not sent again
            return error_response(502, f"engine {live.engine} ({self.engines[live.engine].url}) failed: "
                                  f"{type(exc).__name__}: {exc}", code="engine_failed", headers=headers), None
        live.upstream = upstream
        if live.lost is not None:  # lost while its answer began: nothing relayed yet
            upstream.close()
            raise EngineUnreachable(live.lost)
        self._mark_up(live.engine)
        try:
            ctype = upstream.headers.get("Content-Type", "")
            if ctype.startswith("text/event-stream") and upstream.status < 400:
                return await self._relay_stream(request, upstream, headers, live)
            try:
                with self.monitor.awaiting(live.engine):
                    data = await upstream.read()
            except (aiohttp.ClientError, OSError) as exc:  # the engine died before its answer was whole
                message = live.lost or (f"engine {live.engine} ({self.engines[live.engine].url}) failed before "
                                        f"its answer was complete: {type(exc).__name__}: {exc}")
                log.warning("%s", message)
                return error_response(502, message, code="engine_lost" if live.lost else "engine_failed",
                                      headers=headers), None
            if upstream.status == 401 and self.cfg.engine_api_key is not None:
                return error_response(502, self._key_refused(live.engine), code="engine_unauthorized",
                                      headers=headers), None
            if upstream.status >= 400:
                return web.Response(status=upstream.status, body=data, headers=headers,
                                    content_type=ctype.split(";")[0] or "application/json"), None
            outcome = Outcome(last_token=self.now())
            try:
                doc = json.loads(data)
                stats = doc.get(ENGINE_STATS) if isinstance(doc, dict) else None
                if isinstance(stats, dict) and isinstance(stats.get("service"), (int, float)):
                    outcome.engine_service = float(stats["service"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
            return web.Response(status=upstream.status, body=data, headers=headers,
                                content_type=ctype.split(";")[0] or "application/json"), outcome
        finally:
            if upstream.content.at_eof():
                upstream.release()  # read to the end: the connection may be reused
            else:
                # Client gone or relay failed mid-way: close the connection (not pooled);
                # that is what makes vLLM's server abort the request.
                upstream.close()

    async def _relay_stream(self, request: web.Request, upstream: aiohttp.ClientResponse,
                            headers: dict[str, str], live: LiveCall) -> tuple[web.StreamResponse, Outcome | None]:
        engine = live.engine
        chunks = upstream.content.iter_any()
        # vLLM sends a stream's headers as it accepts the call, long before its first token if the call
        # queues: the client's headers wait for the first bytes, so a call on an engine lost before
        # then has shown its client nothing and goes to another engine.
        try:
            with self.monitor.awaiting(engine):
                first: bytes | None = await chunks.__anext__()
            problem = None
        except StopAsyncIteration:  # a clean end without a byte: neither [DONE] nor an error event
            problem = "ended its stream before sending anything"
        except (aiohttp.ClientError, OSError) as exc:
            problem = f"failed before its stream began: {type(exc).__name__}: {exc}"
        if problem is not None:
            if live.lost is not None:
                raise EngineUnreachable(live.lost)
            message = f"engine {engine} ({self.engines[engine].url}) {problem}"
            log.warning("%s", message)
            return error_response(502, message, code="engine_failed", headers=headers), None
        resp = web.StreamResponse(status=upstream.status, headers={
            **headers, "Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache"})
        await resp.prepare(request)
        parser = SSEParser()
        outcome = Outcome()
        done = False
        failed = False
        held = b""  # the start of an event not yet whole: relayed with its end (`whole_events_end`)
        while True:
            try:
                if first is not None:
                    chunk, first = first, None
                else:
                    with self.monitor.awaiting(engine):  # not while the client is written to: a slow client is no stall
                        chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except (aiohttp.ClientError, OSError) as exc:
                if done:  # complete and charged; only the stream's end was missing
                    break
                # The engine died, cut the stream or was lost: tell the client the way
                # vLLM reports a failure mid-stream, and charge nothing.
                message = live.lost or (f"engine {engine} ({self.engines[engine].url}) failed mid-stream: "
                                        f"{type(exc).__name__}: {exc}")
                log.warning("%s", message)
                try:
                    await resp.write(sse_error(error_body(message, "internal_server_error", None,
                                                          "engine_lost" if live.lost else "engine_failed")))
                    await resp.write_eof()
                except ConnectionResetError:
                    pass
                return resp, None
            now = self.now()
            for event in parser.feed(chunk):
                if event == DONE:
                    done = True
                    if not failed:  # complete before the client reads [DONE] (module docstring)
                        self._complete(live, outcome)
                    continue
                assert isinstance(event, dict)
                if "error" in event:  # vLLM's failure mid-stream: an error event, then [DONE]
                    failed = True
                n = event_token_count(event)
                if n:
                    outcome.tokens += n
                    outcome.last_token = now
                    if outcome.first_token is None:
                        outcome.first_token = now
                stats = event.get(ENGINE_STATS)
                if isinstance(stats, dict) and isinstance(stats.get("service"), (int, float)):
                    outcome.engine_service = float(stats["service"])
            held += chunk
            cut = whole_events_end(held)
            if cut:
                try:
                    await resp.write(held[:cut])
                except ConnectionResetError:  # the client is gone: an abort, which _relay passes on to the engine
                    return resp, None
                held = held[cut:]
        try:
            if held:  # the stream ended cleanly: whatever it ended with goes through unchanged
                await resp.write(held)
            await resp.write_eof()
        except ConnectionResetError:
            return resp, None
        return resp, outcome if not failed and (done or outcome.tokens) else None

    # -- other endpoints -------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        assert self._session is not None
        errors = []
        # Lost engines last, and no engine waited on past --health-timeout: a frozen first engine held this forever.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout,
                                        sock_read=self.cfg.health_timeout)
        headers = self._upstream_headers(request)
        for i in sorted(range(len(self.engines)), key=lambda i: self.engines[i].lost):
            base = self.engines[i].url
            try:
                async with self._session.get(base + "/v1/models", timeout=timeout, headers=headers) as up:
                    data = await up.read()
                    if up.status == 401 and self.cfg.engine_api_key is not None:
                        errors.append(self._key_refused(i))
                        continue
                    return web.Response(status=up.status, body=data,
                                        content_type=up.headers.get("Content-Type", "application/json").split(";")[0])
            except aiohttp.ConnectionTimeoutError:
                errors.append(f"engine {i}: no connection within {self.cfg.connect_timeout:g} s")
            except asyncio.TimeoutError:
                errors.append(f"engine {i}: no answer within {self.cfg.health_timeout:g} s")
            except (aiohttp.ClientError, OSError) as exc:
                errors.append(f"engine {i}: {exc}")
        return error_response(502, "no engine answered /v1/models: " + "; ".join(errors), code="engine_unreachable")

    async def health(self, request: web.Request) -> web.Response:
        lost = [i for i, state in enumerate(self.engines) if state.lost]
        stalled = [i for i, state in enumerate(self.engines) if state.stalled]
        return web.json_response({"status": "ok", "engines": len(self.engines), "lost": lost, "stalled": stalled})

    async def end_program(self, request: web.Request) -> web.Response:
        pid = check_id(request.match_info["program_id"], "program_id")
        entry = self.acct.table.get(pid)
        if entry is None:
            raise BadRequest(f"unknown program {pid!r}", param="program_id", code="program_not_found", status=404)
        if entry.live:
            raise BadRequest(f"program {pid!r} still has live calls on threads {sorted(entry.live)}",
                             param="program_id", code="program_busy", status=409)
        self.acct.table.remove(pid)
        return web.json_response({"id": pid, "object": "program.deleted", "deleted": True})

    async def programs(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """The debug view: process table, per-engine load, recent routing decisions."""
        now = self.now()
        programs = []
        for p in self.acct.table.programs.values():
            programs.append({
                "id": p.id, "service": p.service, "total_service": p.total_service,
                "total_waiting": p.total_waiting, "engine": p.engine, "first_arrival": p.first_arrival,
                "last_arrival": p.last_arrival, "last_completion": p.last_completion,
                "idle": now - self.acct.table.last_activity(p),
                "live": {tid: {"call": c.id, "priority": c.priority, "arrival": c.arrival}
                         for tid, c in p.live.items()},
            })
        return {
            "now": now, "policy": self.acct.policy.name, "balancer": self.balancer.name, "ttl": self.cfg.ttl,
            "engines": [{"url": state.url, "in_flight": state.load, "routed": state.routed,
                         "down_for": max(0.0, state.down_until - now),  # seconds left out after a refusal
                         "lost": state.lost, "health_failures": state.failed_checks,
                         # the stall check: found with no step, and seconds since its /metrics progress
                         # samples were last seen to change (null: no reading with them)
                         "stalled": state.stalled,
                         "since_progress": None if state.progress_at is None else now - state.progress_at,
                         # seconds of it that the gateway waited on the engine for some call (or probe)
                         "waited": None if state.progress_at is None else self.monitor.waited_at(i, now)}
                        for i, state in enumerate(self.engines)],
            "live_calls": self.acct.live_calls(),
            "programs": programs,
            "recent": list(self.recent),
        }


async def start_gateway(gateway: Gateway, host: str, port: int) -> web.AppRunner:
    """Run ``gateway`` on host:port inside the current loop; ``await runner.cleanup()`` stops it."""
    runner = web.AppRunner(gateway.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


# -- CLI -------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "gateway",
        help="program-aware OpenAI-compatible gateway in front of engines",
        description="Route OpenAI completions to engines with the process table and the locality balancer; "
                    "clients tag calls with X-Program-Id / X-Thread-Id headers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("examples:\n"
                "  python -m engine gateway --engine http://127.0.0.1:8001 --engine http://127.0.0.1:8002 --port 8000\n"
                "  curl -s localhost:8000/v1/completions -H 'X-Program-Id: p1' -H 'X-Thread-Id: t1' \\\n"
                "       -d '{\"prompt\": [1, 2, 3], \"max_tokens\": 8}'   # no model: the engine's own\n"
                "  curl -s localhost:8000/programs"),
    )
    p.add_argument("--engine", action="append", required=True, metavar="URL",
                   help="base URL of an engine (repeat for several; their order is the engine index)")
    p.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    p.add_argument("--port", type=port_number, default=8000, help="(default: %(default)s)")
    p.add_argument("--balancer", default="locality", choices=("locality", "least_used", "round_robin"),
                   help="(default: %(default)s)")
    # default=None on the flags `inapplicable_flag` checks, so one given explicitly can be told from
    # the default; `GatewayConfig` holds the documented defaults.
    p.add_argument("--threshold", type=integer,
                   help="locality: prompts longer than this stay on their program's engine (default: 2048)")
    p.add_argument("--ttl", type=number, default=600.0, help="forget programs idle this many seconds (default: 600)")
    p.add_argument("--policy", default="atlas", choices=("plas", "atlas", "fcfs", "mlfq"),
                   help="whose update rule turns call service into program service (default: %(default)s)")
    p.add_argument("--max-body", type=integer, default=32 * 1024 * 1024, help="largest request body in bytes")
    p.add_argument("--health-interval", type=number, default=5.0,
                   help="seconds between /health checks of each engine; 0: none (default: 5)")
    p.add_argument("--health-timeout", type=number, default=5.0,
                   help="seconds a /health check waits for its answer (default: 5)")
    p.add_argument("--health-failures", type=integer,
                   help="failed checks in a row that make an engine lost: its calls fail over and it is left "
                        "out until a check passes (default: 3)")
    p.add_argument("--stall-timeout", type=number,
                   help="seconds, in all, that the gateway may wait on an engine for calls while the step "
                        "counters on its /metrics stay still before its checks fail (a hung engine core behind "
                        "a live API server); 0: no stall check (default: 60)")
    p.add_argument("--api-key", type=api_key, metavar="KEY",
                   help="clients must send 'Authorization: Bearer KEY' to /v1 and /programs, else 401, as with "
                        "vllm serve --api-key (default: $VLLM_API_KEY, as vllm serve reads it, else none)")
    p.add_argument("--engine-api-key", type=api_key, metavar="KEY",
                   help="the engines' vllm serve --api-key: sent with every call, model list and probe the "
                        "gateway sends them, in place of the client's Authorization (default: none: the "
                        "client's is passed on, and the gateway's probes carry its --api-key, if any; "
                        "$GATEWAY_ENGINE_API_KEY, if set, is taken as this flag)")
    p.set_defaults(run=run)
    return p


def inapplicable_flag(args: argparse.Namespace) -> str | None:
    """Why a flag given explicitly cannot apply with the others, or None. Such a flag started the
    gateway without a word; refused as sim serve refuses --step-seconds off the constant kind.
    (--stall-timeout 0 with --health-interval 0 asks for what it gets: no stall check.)"""
    if args.threshold is not None and args.balancer != "locality":
        return (f"--threshold: only the locality balancer reads it, and --balancer {args.balancer} would ignore it; "
                "drop --threshold or use --balancer locality")
    if args.health_interval == 0:
        off = "--health-interval 0 turns the health checks off"
        if args.health_failures is not None:
            return (f"--health-failures: {off}, so no failed check would be counted; drop --health-failures or "
                    "give --health-interval > 0")
        if args.stall_timeout:  # None (not given) or 0 (none) are fine
            return (f"--stall-timeout: {off}, and the stall check runs with them, so it would be ignored; drop "
                    "--stall-timeout or give --health-interval > 0")
    return None


def run(args: argparse.Namespace) -> int:
    try:
        problem = inapplicable_flag(args)
        if problem:
            raise ValueError(problem)
        given = {k: v for k, v in (("threshold", args.threshold), ("health_failures", args.health_failures),
                                    ("stall_timeout", args.stall_timeout)) if v is not None}
        key = api_key_or_env(args.api_key, "VLLM_API_KEY")  # the gateway stands where a vllm serve would
        cfg = GatewayConfig(engines=args.engine, balancer=args.balancer, ttl=args.ttl, policy=args.policy,
                            max_body=args.max_body, health_interval=args.health_interval,
                            health_timeout=args.health_timeout, api_key=key,
                            engine_api_key=api_key_or_env(args.engine_api_key, "GATEWAY_ENGINE_API_KEY"), **given)
        problem = same_server_by_address(cfg.engines)
        if problem:
            raise ValueError(problem)
        gateway = Gateway(cfg)
    except ValueError as exc:
        print(f"python -m engine gateway: error: {exc}", file=sys.stderr)
        return 1
    def banner(url: str) -> str:
        return f"gateway on {url} -> {', '.join(cfg.engines)} ({cfg.balancer}, policy {cfg.policy})"

    return run_site(gateway.app(), args.host, args.port, "python -m engine gateway", banner)
