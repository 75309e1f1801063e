"""Where a replay sends its calls: an OpenAI-compatible server, or vLLM in this process.

`HTTPTarget` streams a completion of token ids from the gateway, a vLLM
server or ``sim serve``; `InprocessTarget` drives vLLM's ``AsyncLLM`` with
the program-aware scheduler plugin directly (a GPU and vLLM needed). Both
answer with one `CallResult` on the replay's clock, so `engine.replay`
records a call the same way whatever served it; what each field means for
a replay is in that module's docstring.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.protocol import (
    ENGINE_HEADER,
    ENGINE_STATS,
    GATEWAY_ENGINE_HEADER,
    PROGRAM_HEADER,
    THREAD_HEADER,
    XARG_PROGRAM,
    XARG_KV_TTL,
    XARG_THREAD,
    XARGS,
)
from engine.sse import DONE, SSEParser, event_token_count, event_token_ids


class ReplayError(RuntimeError):
    """A call failed (engine error, connection lost); the message says which."""


@dataclass
class CallResult:
    """What a target reports for one call, in seconds on the replay clock."""

    first_token: float
    finish: float
    output_ids: list[int] | None  # None: the engine did not return ids
    output_tokens: int
    engine: int = 0
    stats: dict[str, Any] | None = None  # engine_stats, when the engine sends them
    cached_tokens: int | None = None


class Target(Protocol):
    async def send(self, prompt: list[int], max_tokens: int, program_id: str, thread_id: str,
                   clock: "Clock", kv_ttl: float = 0.0) -> CallResult: ...


# How a program's end went (`HTTPTarget.end_program`); counted in replay.json's ``program_ends``.
ENDED = "ended"  # the gateway forgot the program
# The gateway did not hold it: dropped as idle past its --ttl, or never recorded (every call of
# it refused before the gateway took it up, e.g. a body over --max-body).
NOT_HELD = "not_held"
NO_TABLE = "no_table"  # a bare engine (vLLM, sim serve, in-process): no route; its table expires programs itself
END_FAILED = "failed"  # anything else; the reason is in replay.json's ``program_end_errors``


@dataclass
class Clock:
    t0: float

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.t0

    async def until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


# -- targets -----------------------------------------------------------------------------


class HTTPTarget:
    """An OpenAI-compatible server: the gateway, vLLM, or ``sim serve``."""

    def __init__(self, base_url: str, model: str | None = None, request_timeout: float | None = None,
                 cache_salt: str | None = None, api_key: str | None = None):
        self.base = base_url.rstrip("/")
        # vLLM's --api-key guards /v1: sent on every request, kept out of replay.json
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
        self.model = model
        self.request_timeout = request_timeout
        self.cache_salt = cache_salt  # sent with every call: this replay's blocks are its own (`engine.replay.ReplaySettings`)
        self._session = None

    async def __aenter__(self) -> "HTTPTarget":
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=0), headers=self._headers)
        if self.model is None:
            try:
                self.model = await self._first_model()
            except BaseException:  # __aexit__ does not run when __aenter__ fails: close it here
                await self._session.close()
                raise
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()

    async def _first_model(self) -> str:
        """The first model of the server's ``GET /v1/models``; a ReplayError saying why not (an HTTP
        status, the timeout, the exception's type), where it once said ``('data')`` or ``()``."""
        import aiohttp

        url = self.base + "/v1/models"
        try:
            async with self._session.get(url) as r:
                if r.status >= 400:
                    body = (await r.read())[:200].decode("utf-8", "replace")
                    why = f"HTTP {r.status}: {' '.join(body.split())}"
                else:
                    try:
                        doc = await r.json(content_type=None)
                    except aiohttp.ClientError:
                        raise
                    except ValueError:  # only the body's own decoding: aiohttp's certificate and URL
                        # errors are ValueErrors too, and read as "not JSON"
                        doc = None
                        why = "the answer is not JSON (expected OpenAI's model list)"
                    else:
                        why = _model_list_problem(doc)
                    if why is None:
                        return str(doc["data"][0]["id"])
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            why = self._failure(exc)
        raise ReplayError(f"{url}: cannot learn the model name ({why}); pass --model")

    def _failure(self, exc: BaseException) -> str:
        """A request's exception as words: the total timeout (which says nothing itself) names
        --request-timeout, others their type and message."""
        import aiohttp

        if isinstance(exc, asyncio.TimeoutError) and not isinstance(exc, aiohttp.ClientError) \
                and self.request_timeout is not None:
            return f"no whole answer within --request-timeout {self.request_timeout:g} s"
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    async def end_program(self, program_id: str) -> str:
        """Tell the server the program is over (``DELETE /v1/programs/{id}``), as an agent
        framework would, so the gateway's table does not keep it for its whole ``--ttl``."""
        import aiohttp

        url = f"{self.base}/v1/programs/{urllib.parse.quote(program_id, safe='')}"
        try:
            async with self._session.delete(url) as r:
                if r.status < 300:
                    return ENDED
                text = await r.text()
                if r.status == 404 and '"program_not_found"' in text:
                    return NOT_HELD
                if r.status in (404, 405):
                    return NO_TABLE
                raise ReplayError(f"program {program_id}: DELETE /v1/programs: HTTP {r.status}: {text[:300]}")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise ReplayError(f"program {program_id}: DELETE /v1/programs: {why}") from None

    async def send(self, prompt, max_tokens, program_id, thread_id, clock, kv_ttl=0.0) -> CallResult:
        import aiohttp

        body = {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
            # No program_service: it is the gateway's to set; a bare engine keeps its own account.
            "return_token_ids": True, XARGS: xargs(program_id, thread_id, kv_ttl),
        }
        if self.cache_salt:
            body["cache_salt"] = self.cache_salt
        headers = {PROGRAM_HEADER: program_id, THREAD_HEADER: thread_id}
        first = None
        ids: list[int] = []
        got_ids = False
        tokens = 0
        stats = None
        cached = None
        done = False
        try:
            async with self._session.post(self.base + "/v1/completions", json=body, headers=headers) as r:
                if r.status >= 400:
                    text = (await r.text())[:500]
                    raise ReplayError(f"program {program_id} call {thread_id}: HTTP {r.status}: {text}")
                engine = _engine_index(r.headers)
                parser = SSEParser()
                async for chunk in r.content.iter_any():
                    now = clock.now()
                    for event in parser.feed(chunk):
                        if event == DONE:
                            done = True
                            continue
                        if "error" in event:  # vLLM's failure mid-stream: an error event, then [DONE]
                            raise ReplayError(f"program {program_id} call {thread_id}: the engine failed "
                                              f"mid-stream: {_error_text(event['error'])}")
                        n = event_token_count(event)
                        if n:
                            tokens += n
                            first = now if first is None else first
                        got = event_token_ids(event)
                        if got is not None:
                            got_ids = True
                            ids += got
                        if isinstance(event.get(ENGINE_STATS), dict):
                            stats = event[ENGINE_STATS]
                        usage = event.get("usage")
                        if isinstance(usage, dict):
                            details = usage.get("prompt_tokens_details") or {}
                            if isinstance(details, dict) and details.get("cached_tokens") is not None:
                                cached = int(details["cached_tokens"])
                            if usage.get("completion_tokens") is not None:
                                tokens = max(tokens, int(usage["completion_tokens"]))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise ReplayError(f"program {program_id} call {thread_id}: {self._failure(exc)}") from None
        finish = clock.now()
        if not done or first is None:
            raise ReplayError(f"program {program_id} call {thread_id}: the stream ended early "
                              f"({tokens} of {max_tokens} tokens)")
        if stats is not None and isinstance(stats.get("engine"), int) and GATEWAY_ENGINE_HEADER not in r.headers:
            engine = stats["engine"]
        return CallResult(first, finish, ids if got_ids else None, tokens, engine, stats, cached)


def _model_list_problem(doc: Any) -> str | None:
    """Why ``doc`` is not OpenAI's model list with a first model id, or None."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return "the answer has no 'data' list (expected OpenAI's model list)"
    if not data:
        return "the server lists no model"
    if not isinstance(data[0], dict) or not isinstance(data[0].get("id"), str) or not data[0]["id"]:
        return "its first model has no string 'id'"
    return None


def _error_text(error: Any) -> str:
    """An OpenAI error object's message (vLLM: ``{"message", "type", "code", ...}``), or the value as sent."""
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        kind = error.get("type")
        return f"{error['message']} ({kind})" if isinstance(kind, str) and kind else error["message"]
    return json.dumps(error)[:500]


def xargs(program_id: str, thread_id: str, kv_ttl: float) -> dict[str, Any]:
    """The call's ``vllm_xargs``/``extra_args``; ``kv_ttl`` only when pinning, so plain replays send what they did."""
    tags: dict[str, Any] = {XARG_PROGRAM: program_id, XARG_THREAD: thread_id}
    if kv_ttl > 0:
        tags[XARG_KV_TTL] = float(kv_ttl)
    return tags


def _engine_index(headers) -> int:
    for name in (GATEWAY_ENGINE_HEADER, ENGINE_HEADER):
        value = headers.get(name)
        if value is not None and value.lstrip("-").isdigit():
            return int(value)
    return 0


def inprocess_problem() -> str | None:
    """Why ``--target inprocess`` cannot run here, as one line; None if it can."""
    from engine.profile import gpu_problem

    return gpu_problem()


class InprocessTarget:
    """vLLM's ``AsyncLLM`` in this process, with the program-aware scheduler plugin.

    Dummy weights from a local ``config.json`` (no hub access), no tokenizer,
    token-id prompts; ``SamplingParams(max_tokens=N, ignore_eos=True,
    extra_args={program_id, thread_id[, kv_ttl]})`` as the OpenAI server would build
    from ``vllm_xargs``. Output ids come back in each delta, so continued
    calls re-send the exact context.
    """

    SCHEDULER = "engine.scheduler.ProgramAwareScheduler"

    def __init__(self, policy: str, workdir: str | None = None, max_model_len: int = 32768,
                 gpu_memory_utilization: float = 0.9, cache_salt: str | None = None):
        self.policy = policy
        self.cache_salt = cache_salt
        self.workdir = workdir
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.model = "inprocess"
        self._llm = None

    async def __aenter__(self) -> "InprocessTarget":
        from engine.profile import write_model_dir
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        model_dir = write_model_dir(Path(self.workdir or tempfile.mkdtemp(prefix="autellix-replay-")))
        kwargs: dict[str, Any] = dict(
            model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
            enable_prefix_caching=True, enable_chunked_prefill=True, max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization, scheduler_cls=self.SCHEDULER,
            additional_config={"autellix": {"policy": self.policy}},
        )
        if "async_scheduling" in {f.name for f in dataclasses.fields(AsyncEngineArgs)}:
            kwargs["async_scheduling"] = False  # ProgramAwareScheduler is the synchronous variant
        args = AsyncEngineArgs(**kwargs)
        # As `vllm serve` builds it: the default context would give 128
        # sequences where `vllm serve` and the simulator's engine have 256.
        self._llm = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._llm is not None:
            self._llm.shutdown()

    async def send(self, prompt, max_tokens, program_id, thread_id, clock, kv_ttl=0.0) -> CallResult:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False, temperature=0.0,
                                output_kind=RequestOutputKind.DELTA,
                                extra_args=xargs(program_id, thread_id, kv_ttl))
        first = None
        ids: list[int] = []
        cached = None
        metrics = None
        prompt_in: dict[str, Any] = {"prompt_token_ids": prompt}
        if self.cache_salt:
            prompt_in["cache_salt"] = self.cache_salt
        async for out in self._llm.generate(prompt_in, params,
                                            request_id=f"replay-{uuid.uuid4().hex}"):
            got = list(out.outputs[0].token_ids) if out.outputs else []
            if got and first is None:
                first = clock.now()
            ids += got
            if getattr(out, "num_cached_tokens", None) is not None:
                cached = int(out.num_cached_tokens)
            metrics = getattr(out, "metrics", None) or metrics
        finish = clock.now()
        if first is None:
            raise ReplayError(f"program {program_id} call {thread_id}: no tokens generated")
        return CallResult(first, finish, ids, len(ids), 0, vllm_stats(metrics), cached)


def vllm_stats(metrics: Any) -> dict[str, Any] | None:
    """Engine-side timing from vLLM's ``RequestStateStats`` (engine-core monotonic timestamps).

    Service is vLLM's own "inference time", last token minus first
    scheduled: it includes any time the request spent preempted after it was
    first scheduled, which vLLM does not expose per request. None when the
    engine keeps no stats (``disable_log_stats``).
    """
    if metrics is None:
        return None
    queued, scheduled, last = (getattr(metrics, k, 0.0) for k in ("queued_ts", "scheduled_ts", "last_token_ts"))
    if not (queued > 0 and scheduled >= queued and last >= scheduled):
        return None
    return {"service": last - scheduled, "first_scheduled_after": scheduled - queued,
            "source": "vllm_inference_time"}
