"""Engine liveness for the gateway (`engine.gateway`): which engines are lost, and why.

An engine that refuses connections is the gateway's own concern (its "Unreachable engines").

Lost engines: an engine can also stop answering without refusing
connections (a stopped process, a hung host, a partition), and its calls
then hang until each client gives up. A silence timeout per call cannot
tell that from a healthy engine holding a call in its queue, which PLAS
and ATLAS do by design, so the gateway asks each engine ``GET /health``
every ``--health-interval`` seconds instead. An engine that fails
``--health-failures`` checks in a row (no answer within
``--health-timeout``, a refused connection, a 5xx: vLLM answers 503 once
its engine core is dead, or a stall, below) is lost: it is left out of the balance until a
check passes, and each failed check fails the calls it holds
(`Gateway.fail_lost_engine`). A call that
has received nothing yet goes to another engine (its client has seen
nothing, and closing the connection makes vLLM abort it if the engine comes
back); one already answering gets an error (502, or an error event inside
the stream). A stream counts as answering from its first bytes, not its
headers: vLLM sends those as it accepts a call, queued or not, so the
client's headers wait for the first bytes. A 404 counts as an answer: the
engine is up but has no ``/health``.

Hung engine cores: vLLM answers ``/health`` from its API server without a
round trip to the engine core, so a core that hangs (a hung GPU, a
deadlocked step) behind a live server passes it, and its calls hang. Each
check therefore also reads the engine's ``GET /metrics`` (Prometheus text,
from the same API server) for samples that only the core's steps move
(`PROGRESS_SAMPLES`: vLLM 0.26.0's ``vllm:iteration_tokens_total_count``,
``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total`` and three
per-step gauges, each summed over its ``model_name``/``engine`` series). A
healthy engine steps within milliseconds of receiving a call, and
continually while it holds calls, queued calls included, as it serves the
calls ahead of them. So the gateway sums the time it has waited on the
engine for at least one call (its answer or its stream's next bytes; not
while writing to a slow client; overlapping calls count once) since the
samples last changed. When that sum reaches ``--stall-timeout`` seconds
(default 60; 0: off) and the samples read before and after it are the
same, the check fails ("no engine step in 75.3 s (61.2 s of it waiting on
the engine) with 3 calls in flight (/metrics progress frozen)"), and the
lost-engine rules above apply. A sum, not one unbroken wait: clients that
give up and send their calls again before the timeout kept a hung core
from ever being judged. With the defaults an engine is lost about 70 to
80 s into the waiting on it without a step. ``/programs`` shows per
engine ``stalled``, ``since_progress`` (seconds since the samples last
changed) and ``waited`` (the sum); ``/health`` lists stalled engines.

A stalled engine's checks keep failing until it is seen to step. A failed
``/health`` (as while it restarts) keeps the samples and the verdict: an
engine that restarts starts its counters from zero, so they move anyway,
and clearing them let one failed check put a still hung engine back. A
``/metrics`` that turns unusable (a 404, a malformed line) while the engine
is stalled keeps the verdict too, since it shows no step either; from then
on each check probes the engine (below) even while calls wait on it. A NaN
or infinite sample counts as absent. An idle vLLM core does not step, so
it sends no stats, and a lost engine gets no calls while another engine is
usable: its samples could never move. So
while no call waits on a stalled engine, each check sends it a probe, a
completion of the gateway's own: ``POST /v1/completions`` with
``{"model": M, "prompt": [0], "max_tokens": 1}``, M the first model of
its ``GET /v1/models``, else the last model a call to it named (else none:
the engine's own), within ``--health-timeout`` (a live core answers in a step
or two, and the watcher waits no longer on it than on its other requests),
counted as a wait on the engine; then ``/metrics`` is read again. A 200
answer clears the verdict and the check passes: vLLM answers a completion
only with a token from a step of the core, so the answer is the proof
itself, whatever the timing of the stats (vLLM records them after handing
a step's outputs to their calls). Samples that moved clear it too (the
core stepped for other clients while the probe queued). A probe that times
out is cancelled, which makes vLLM abort it. The probe is no client's
call: it has no program (the plugin takes an untagged call as a one-call
program with no service, first in line), is not balanced, counted in
``in_flight`` or ``routed``, charged, or shown in ``/programs``. vLLM's
``--api-key`` guards ``/v1``: the probe and its ``/v1/models`` carry the
gateway's ``--engine-api-key``, else its own ``--api-key`` (one key for
all). Without either a keyed engine refuses them (401), and a stalled one
is back only when its samples move.

A ``/metrics`` that times out, fails or answers a 5xx is no stall
(``/health`` judges reachability). An engine whose ``/metrics`` answers
404 (``sim serve``) or lacks the samples (vLLM started with
``--disable-log-stats``) gets no stall check: one warning per engine.
Limits: a data-parallel server's samples are summed, so one hung core among
cores that step is not found; work before a call reaches the core (a huge
prompt to tokenize, a grammar to compile) or a single step that outlasts
the timeout (slow hardware) is taken for a stall: raise ``--stall-timeout``
there. Calls that the API server answers without the core (a 400 for a
prompt too long) add their milliseconds to the sum as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from engine.gateway import EngineState

# The gateway's logger: these are the gateway's log lines, and whoever configures or captures
# ``engine.gateway`` (an operator's logging setup, the tests' caplog) keeps seeing all of them.
log = logging.getLogger("engine.gateway")

# The /metrics samples whose change shows that an engine core steps (module docstring, "Hung engine cores").
# vLLM 0.26.0's engine core sends its stats with each step's outputs, and the API server's PrometheusStatLogger
# (vllm/v1/metrics/loggers.py, `PrometheusStatLogger.record`) updates these from them, and from nothing else.
# The counters grow with every step that produced outputs (the histogram ``vllm:iteration_tokens_total``
# observes once per such step; prometheus_client keeps a histogram's name whole and adds ``_count``; a
# counter's name gets ``_total``). The gauges are set at every step, and move with most steps that produce no
# output (a prefill chunk allocates KV blocks). Each is summed over its series (labels ``model_name`` and
# ``engine``: a data-parallel server shows one series per engine core).
PROGRESS_COUNTERS = ("vllm:iteration_tokens_total_count", "vllm:prompt_tokens_total", "vllm:generation_tokens_total")
PROGRESS_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
PROGRESS_SAMPLES = PROGRESS_COUNTERS + PROGRESS_GAUGES
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _labels_end(line: str, start: int) -> int:
    """The index just past the ``}`` that closes the label set opening at ``line[start]`` (``{``); label values
    are quoted and may hold an escaped quote, a ``}`` or a space."""
    i, quoted = start + 1, False
    while i < len(line):
        c = line[i]
        if quoted:
            if c == "\\":
                i += 1  # the escaped character
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "}":
            return i + 1
        i += 1
    raise ValueError("its label set is not closed")


def progress_samples(text: str) -> tuple[float | None, ...] | None:
    """`PROGRESS_SAMPLES` from a Prometheus text exposition, each summed over its series (None where absent);
    None if it has none of `PROGRESS_COUNTERS`, as vLLM started with ``--disable-log-stats`` or another server.

    Only the lines of these samples are read: ``name{labels} value [timestamp]``. One of them that does not
    read so raises ValueError naming it, and so do counters that are there with no finite value (a NaN or
    infinite sample is no reading), which were reported as absent, in the words for ``--disable-log-stats``.
    """
    sums: dict[str, float] = {}
    unread: list[str] = []  # counters seen only as NaN or +-Inf
    for line in text.splitlines():
        if not line.startswith("vllm:"):  # comments, blank lines and every other metric
            continue
        name = _METRIC_NAME.match(line)
        assert name is not None  # "vllm:" matches
        if name.group() not in PROGRESS_SAMPLES:
            continue
        try:
            i = name.end()
            if line.startswith("{", i):
                i = _labels_end(line, i)
            fields = line[i:].split()
            if not 1 <= len(fields) <= 2 or (i < len(line) and not line[i].isspace()):
                raise ValueError("expected a value (and a timestamp) after the name and labels")
            value = float(fields[0])
        except ValueError as exc:
            raise ValueError(f"malformed sample line {line[:120]!r}: {exc}") from None
        if not math.isfinite(value):
            # No reading (Prometheus allows NaN and +-Inf; +Inf and -Inf series sum to NaN). Summed in, a NaN
            # makes every read differ from the last (NaN equals nothing): the samples would always have moved
            # and no stall would ever be found.
            if name.group() in PROGRESS_COUNTERS and name.group() not in unread:
                unread.append(name.group())
            continue
        sums[name.group()] = sums.get(name.group(), 0.0) + value
    if not any(n in sums for n in PROGRESS_COUNTERS):
        if unread:
            raise ValueError(f"sample of {', '.join(unread)} with no finite value (each series NaN or infinite)")
        return None
    return tuple(sums.get(n) for n in PROGRESS_SAMPLES)


class EngineMonitor:
    """The gateway's watch over its engines: a /health check (and the stall check) per engine every
    ``health_interval``, judging each engine lost or back. It judges and the gateway acts: routing and the
    calls an engine holds are the gateway's, reached through ``end_backoff`` (an answer ends a refused
    connection's backoff) and ``fail_calls`` (`Gateway.fail_lost_engine`). The calls' relays report their
    waits on an engine through `awaiting`, which is what the stall check weighs."""

    def __init__(self, engines: list[EngineState], *, health_interval: float, health_timeout: float,
                 health_failures: int, stall_timeout: float, now: Callable[[], float],
                 end_backoff: Callable[[int], None], fail_calls: Callable[[int, str], None],
                 api_key: str | None = None, key_flag: str = "--engine-api-key"):
        self.engines = engines  # the gateway's own list: both read and write the same states
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.health_failures = health_failures
        self.stall_timeout = stall_timeout
        self.now = now  # the gateway's clock, which `EngineState`'s times are on
        self._end_backoff = end_backoff
        self._fail_calls = fail_calls
        # vLLM's --api-key guards /v1 (not /health or /metrics): the probe and its model lookup need it.
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
        self._unauthorized = (f"the gateway's {key_flag} is not one of the engine's keys" if api_key is not None
                              else "the engine takes an API key: give the gateway --engine-api-key")
        self._session: aiohttp.ClientSession | None = None
        self._watchers: list[asyncio.Task] = []
        # Stalled engines whose last /metrics read was unusable: no sample can show their step any more.
        self._metrics_unusable: set[int] = set()

    def start(self, session: aiohttp.ClientSession) -> None:
        """Start one watcher per engine, checking through the gateway's ``session`` (none with
        ``health_interval`` 0)."""
        self._session = session
        if self.health_interval > 0:
            self._watchers = [asyncio.create_task(self._watch(i)) for i in range(len(self.engines))]

    async def stop(self) -> None:
        """Cancel the watchers and wait until they have ended: a cancelled check still in a request would
        otherwise meet the gateway's session closed under it."""
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    async def _watch(self, engine: int) -> None:
        """Check one engine's /health every interval, for as long as the gateway runs."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                # A failed /health keeps the progress samples and the stall verdict: one failure of a hung
                # engine's /health cleared them, so its next check read "new" samples and put it back. An
                # engine that restarts starts its counters from zero, so its samples change anyway.
                problem = await self._check_health(engine)
                if problem is None and self.stall_timeout > 0:
                    problem = await self._check_progress(engine)
                    if problem is not None and (not self.engines[engine].awaiting
                                                or engine in self._metrics_unusable):
                        # Stalled, and nothing else can show a step: no call of a client waits on it (an idle
                        # core steps for nothing), or its /metrics no longer reads. Without the probe in the
                        # second case, calls that kept coming (one engine, or all lost) kept it out for good.
                        problem = await self._probe_stalled(engine, problem)
                if problem is None:
                    self.answered(engine)
                else:
                    self.failed_check(engine, problem)
            except Exception:  # a bug here must not end this engine's checks in silence
                log.exception("the /health check of engine %d failed", engine)
            await asyncio.sleep(max(0.0, self.health_interval - (loop.time() - started)))

    async def _check_health(self, engine: int) -> str | None:
        """None if the engine answered /health in time with anything but a 5xx, else what went wrong."""
        assert self._session is not None
        timeout = self.health_timeout
        try:
            async with self._session.get(self.engines[engine].url + "/health",
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                await r.read()
                return None if r.status < 500 else f"/health answered {r.status}"
        except asyncio.TimeoutError:
            return f"/health did not answer within {timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return f"/health failed: {type(exc).__name__}: {exc}"

    @contextlib.contextmanager
    def awaiting(self, engine: int):
        """Mark a wait for the engine's next bytes for a call: the stall check's "calls in flight". The time
        with at least one such wait adds to `EngineState.waited` (overlapping waits count once)."""
        state = self.engines[engine]
        if not state.awaiting:
            state.busy_from = self.now()
        state.awaiting += 1
        try:
            yield
        finally:
            state.awaiting -= 1
            if not state.awaiting:
                busy = state.busy_from
                assert busy is not None
                state.waited += max(0.0, self.now() - busy)
                state.busy_from = None

    def waited_at(self, engine: int, t: float) -> float:
        """Seconds the gateway has waited on the engine for some call between its `progress_at` and ``t``."""
        state = self.engines[engine]
        busy = state.busy_from
        return state.waited + (max(0.0, t - busy) if busy is not None else 0.0)

    def _restart_window(self, engine: int, samples: tuple[float | None, ...] | None) -> None:
        """New samples (or a proof of a step): the waiting counted from now is against these."""
        state = self.engines[engine]
        state.progress = samples
        state.progress_at = now = self.now()
        state.waited = 0.0
        if state.busy_from is not None:
            state.busy_from = now

    def _forget_progress(self, engine: int) -> None:
        """No usable samples: nothing to judge against."""
        self._restart_window(engine, None)
        state = self.engines[engine]
        state.progress_at = None
        state.stalled = False

    async def _read_progress(self, engine: int) -> tuple[float | None, ...] | str | None:
        """The engine's `PROGRESS_SAMPLES`; a string saying why it has none (no /metrics, or not these
        samples); None if /metrics did not answer (not a stall: /health covers an unreachable engine)."""
        assert self._session is not None
        try:
            async with self._session.get(self.engines[engine].url + "/metrics",
                                         timeout=aiohttp.ClientTimeout(total=self.health_timeout)) as r:
                if r.status >= 500:
                    return None
                if r.status >= 400:
                    return f"GET /metrics answered {r.status}"
                text = (await r.read()).decode("utf-8", "replace")
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
            return None
        try:
            samples = progress_samples(text)
        except ValueError as exc:
            return f"/metrics has a {exc}"
        if samples is None:
            return (f"/metrics has none of {', '.join(PROGRESS_COUNTERS)} (vLLM started with --disable-log-stats, "
                    f"or not a vLLM server)")
        return samples

    async def _check_progress(self, engine: int) -> str | None:
        """None unless the gateway has waited on the engine for calls for --stall-timeout seconds in all since
        its progress samples last changed (or found it so, `stalled`), and they did not change; then what went
        wrong."""
        state = self.engines[engine]
        sent = self.now()
        waited = self.waited_at(engine, sent)  # all of it before this reading, so after the samples' last change
        samples = await self._read_progress(engine)
        self._metrics_unusable.discard(engine)
        if isinstance(samples, str) and state.stalled:
            # No sign of a step either: the verdict stands until one is seen (a probe's answer, samples that
            # move). Forgetting it here let one bad answer (a proxy's 4xx, a garbled exposition) put a hung
            # engine back.
            self._metrics_unusable.add(engine)
            return self._stall_problem(engine, sent, waited, f"/metrics now unusable: {samples}")
        if isinstance(samples, str):  # no judgement possible: never a failure
            if not state.no_progress_warned:
                state.no_progress_warned = True
                log.warning("engine %d (%s): %s: no stall check for it (a hung engine core behind a live "
                            "server is not found)", engine, state.url, samples)
            self._forget_progress(engine)
            return None
        if samples is None:  # no reading: no new knowledge either way
            return self._stall_problem(engine, sent, waited) if state.stalled else None
        if samples != state.progress:
            if state.stalled:
                log.warning("engine %d (%s) steps again (/metrics progress moved)", engine, state.url)
            self._restart_window(engine, samples)  # answered by now: unchanged at least since then
            state.stalled = False
            return None
        if state.stalled:
            return self._stall_problem(engine, sent, waited)
        # The samples the same at both ends of the waiting counted (the counters only grow): a healthy engine
        # steps within milliseconds of receiving a call, so this much waiting without a step is a stall.
        if waited < self.stall_timeout:
            return None
        state.stalled = True
        problem = self._stall_problem(engine, sent, waited)
        log.warning("engine %d (%s): %s", engine, state.url, problem)
        return problem

    def _stall_problem(self, engine: int, sent: float, waited: float,
                       evidence: str = "/metrics progress frozen") -> str:
        state = self.engines[engine]
        seen = state.progress_at
        assert seen is not None
        calls = state.awaiting
        held = f"with {calls} call{'s' if calls != 1 else ''} in flight" if calls else "with no call in flight"
        return f"no engine step in {sent - seen:.1f} s ({waited:.1f} s of it waiting on the engine) {held} " \
               f"({evidence})"

    async def _probe_stalled(self, engine: int, problem: str) -> str | None:
        """A stalled engine with no call waiting on it (its core, if live but idle, steps for nothing, so its
        samples could never move again, and it gets no calls while other engines are usable), or whose /metrics
        no longer reads (no sample can show its step). Send it a completion of the gateway's own (`_probe`),
        then read /metrics again: an answer (200), or samples that moved, shows a step and clears `stalled`
        (None); else ``problem``, with what the probe got."""
        state = self.engines[engine]
        failed = await self._probe(engine)
        samples = await self._read_progress(engine)
        moved = isinstance(samples, tuple) and samples != state.progress
        if failed is not None and not moved:
            return f"{problem}; a probe completion {failed}"
        log.warning("engine %d (%s) steps again (%s)", engine, state.url,
                    "/metrics progress moved" if failed else "it answered a probe completion")
        self._restart_window(engine, samples if isinstance(samples, tuple) else state.progress)
        state.stalled = False
        return None

    async def _probe(self, engine: int) -> str | None:
        """POST the engine ``/v1/completions`` with a one-token prompt and ``max_tokens`` 1 (a step's work in
        its core), within --health-timeout; None if it answered 200, else what went wrong. The gateway's own
        call: no program, no balance, no accounting; a wait on the engine for the stall window like a call's."""
        assert self._session is not None
        timeout = self.health_timeout
        body: dict[str, Any] = {"prompt": [0], "max_tokens": 1}
        model = await self._probe_model(engine)
        if model is not None:  # else the engine's own, as for a client's call without one
            body["model"] = model
        try:
            with self.awaiting(engine):
                async with self._session.post(self.engines[engine].url + "/v1/completions", json=body,
                                              headers=self._auth, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                    await r.read()
                    if r.status == 401:  # vLLM's --api-key
                        return f"answered 401 ({self._unauthorized})"
                    return None if r.status == 200 else f"answered {r.status}"
        except asyncio.TimeoutError:
            return f"got no answer within {timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return f"failed: {type(exc).__name__}: {exc}"

    async def _probe_model(self, engine: int) -> str | None:
        """The model a probe names: the first of the engine's ``GET /v1/models`` (what it serves now), else the
        last model a call to it named, else None."""
        assert self._session is not None
        try:
            async with self._session.get(self.engines[engine].url + "/v1/models", headers=self._auth,
                                         timeout=aiohttp.ClientTimeout(total=self.health_timeout)) as r:
                if r.status == 200:
                    model = (await r.json(content_type=None))["data"][0]["id"]
                    if isinstance(model, str):
                        return model
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError, LookupError, TypeError):
            pass
        return self.engines[engine].model_named

    def answered(self, engine: int) -> None:
        state = self.engines[engine]
        if state.lost:
            log.warning("engine %d (%s) passes its checks again: back in the balance", engine, state.url)
        state.lost = False
        state.failed_checks = 0
        self._end_backoff(engine)  # any answer ends a backoff

    def failed_check(self, engine: int, problem: str) -> None:
        state = self.engines[engine]
        state.failed_checks += 1
        failures = state.failed_checks
        if failures < self.health_failures:
            return
        message = (f"engine {engine} ({state.url}) lost: {problem}, "
                   f"{failures} check{'s' if failures > 1 else ''} in a row")
        if not state.lost:
            log.warning("%s; left out of the balance until a check passes", message)
        state.lost = True
        self._fail_calls(engine, message)

