"""``python -m sim serve``: an OpenAI-compatible stand-in engine timed by the simulator.

It speaks enough of vLLM's OpenAI server for the gateway and the replayer:
``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream``), ``GET /v1/models``, ``GET /health``, and a debug ``GET /stats``.
Every response is timed in real time by one simulated replica
(`sim.realtime.RealtimeEngine`: `sim.replica.Replica` + `sim.core.SchedulerCore`
+ `sim.kvcache.KVCache` + a latency model from `sim.latency.build`).

What a request gets:

* ``max_tokens`` filler tokens (default 16), always exactly that many: the
  stand-in has no EOS, so ``ignore_eos`` changes nothing. Each token's text
  is ``" tok"``; its id is deterministic per engine and request
  (`sim.realtime.filler_ids`) and is returned as ``token_ids`` in each choice
  when ``return_token_ids`` is true (as vLLM does), so a client can re-send
  the exact context and hit the prefix cache;
* ``usage`` with prompt, completion and total tokens and
  ``prompt_tokens_details.cached_tokens`` (prefix-cache hit tokens); streams
  send it in a final chunk when ``stream_options.include_usage`` is true;
* an extension object ``engine_stats`` (engine index, service, waiting,
  preemptions, prefix hits: see `CallHandle.stats`) in the JSON body or in
  the last token's chunk of a stream; clients that do not know it ignore it;
* header ``X-Engine-Index``.

Prompts: a list of token ids is used as is. Text is not tokenised (there is
no tokenizer); it counts as one token per 4 UTF-8 bytes (rounded up, the
usual rule of thumb for English BPE), with each 4-byte chunk mapped to a
token id, so identical text prefixes still share cache blocks. Chat
messages become the text ``"{role}: {content}\\n"`` per message, after the
``tools`` (when given) as ``"tools: {JSON}\\n"``: a chat template renders
them into the prompt too.

Program identity and priority come from ``vllm_xargs`` in the body
(``program_id``, ``thread_id``, ``program_service``,
``program_total_service``, and ``kv_ttl`` to pin
the call's KV for its program's next call), exactly as vLLM's
server passes them to the scheduler plugin, so the gateway works against
this engine unchanged. A request without them is a one-call program.
The ids follow the plugin (`engine.plugin_config.read_tags`), the engine
side, not the gateway's stricter ``engine.protocol.check_id``: a string or
an integer of any length and characters, and a ``thread_id`` without a
``program_id`` is a thread of a one-call program, because a stand-in for
the engine must take what vLLM takes; the gateway refuses those before any
engine sees them. (Where the plugin logs a malformed tag, a float id or a
negative service, and schedules the call untagged, sim serve answers 400.)

Fields it does not act on are still checked as vLLM 0.26.0 checks them
(`sim.vllm_fields`: each field's pydantic type and the ranges of vLLM's
validators and ``SamplingParams``), so a request vLLM refuses with 400 is
refused here too; fields vLLM does not know (``best_of``) are ignored, as
vLLM ignores them. Fields vLLM acts on by changing what the response holds
(``echo``, ``logprobs``, ``prompt_logprobs``, beam search, structured output:
`sim.vllm_fields.UNHONOURED`) are refused with 400 when not at their default,
not answered as if absent; those that only choose among a model's tokens or
end its output early (``temperature``, ``stop``, ``min_tokens``...) are
taken, as the stand-in has no model and always returns ``max_tokens`` tokens.
A ``priority`` is checked and has no effect, as in the vLLM plugin, which
overwrites it with the scheduler core's key (`engine.scheduler`).
A ``cache_salt`` (vLLM's field) keeps the request's cached blocks apart
from those of requests with another salt or none, as vLLM's hashing does.

Client disconnect aborts the call (`Replica.abort`, as vLLM's abort: KV
freed at once, no service charged; see `sim.realtime`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

from sim.config import ExperimentConfig
from sim.core.params import MAX_SECONDS
from sim.vllm_fields import as_json, unhonoured_field_problem, vllm_field_problem
from sim.core import POLICY_CLASSES
from sim.latency import MAX_STEP_SECONDS, MIN_STEP_SECONDS, async_without_host_note
from sim.realtime import FILLER_BASE, FILLER_VOCAB, CallHandle, Conflict, EngineFailed, RealtimeEngine, TooLarge
from traces.argtypes import int_at_least, nonblank, number, port_number
from traces.validate import parse_json_int

TOKEN_TEXT = " tok"
DEFAULT_MAX_TOKENS = 16
BYTES_PER_TOKEN = 4
MAX_BODY = 64 * 1024 * 1024
POSITIVE_INT = int_at_least(1)  # engine limits: 0 would start an engine that never schedules
XARGS = "vllm_xargs"


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, typed by the HTTP status."""
    kind = {404: "not_found_error", 409: "conflict_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "internal_server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param, code), status=status)


@web.middleware
async def router_errors(request: web.Request, handler):
    """The router's own 404/405/413 as OpenAI error bodies, as vLLM's server (and the gateway)
    answer them; aiohttp's were plain text ("404: Not Found")."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, router_error_message(request, exc, MAX_BODY))
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


def router_error_message(request: web.Request, exc: web.HTTPException, max_body: int) -> str:
    """What the router's own 404, 405 or 413 says, for an OpenAI error body (here and in the gateway)."""
    return {404: f"unknown route {request.method} {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
            413: f"request body exceeds {max_body} bytes"}.get(exc.status, exc.reason)


def sse_error(body: dict[str, Any]) -> bytes:
    """The end of a stream that failed, as vLLM's OpenAI server writes it: an error event, then ``[DONE]``."""
    return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


def text_token_ids(text: str) -> list[int]:
    """Pseudo-tokenisation of text: one id per 4-byte chunk (see the module docstring)."""
    # surrogatepass: JSON admits a lone surrogate ("\ud83d", an emoji cut in half), which plain
    # UTF-8 refuses; the client got a bare 500 for a request a tokenizer takes.
    data = text.encode("utf-8", "surrogatepass")
    ids = []
    for i in range(0, len(data), BYTES_PER_TOKEN):
        ids.append(FILLER_BASE + int.from_bytes(data[i:i + BYTES_PER_TOKEN], "little") % FILLER_VOCAB)
    return ids or [FILLER_BASE]


@dataclass
class ParsedRequest:
    """The parts of a completion request the stand-in acts on."""

    chat: bool
    prompt_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    return_token_ids: bool
    model: str
    program_id: str | None
    thread_id: str | None
    program_service: float | None
    kv_ttl: float = 0.0
    cache_salt: str | None = None
    total_service: float | None = None


def _int(body: dict, name: str, default: int, low: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if type(value) is not int or value < low:
        raise RequestError(f"{name} must be an integer >= {low}, got {value!r}", name)
    return value


def _flag(body: dict, name: str, where: str | None = None) -> bool:
    """A JSON boolean (null or absent: false); a string such as "false" is refused, not read as true."""
    value = body.get(name)
    if value is None:
        return False
    if type(value) is not bool:
        field = where or name
        raise RequestError(f"{field} must be true or false, got {json_type(value)}", field)
    return value


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for errors."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _short(value: Any, limit: int = 60) -> str:
    """A value as JSON-ish text, cut to ``limit`` characters, for errors."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message_text(message: dict[str, Any], i: int) -> str:
    """A chat message's text as OpenAI's API allows it: a string, null (an assistant turn that
    only calls tools), or a list of content parts whose text parts are joined; its tool calls
    count as their JSON. vLLM accepts all of these, so the stand-in engine must too."""
    content = message.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        pieces = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("text", ""), str):
                raise RequestError(f"messages[{i}].content[{j}]: expected a content part object with a string "
                                   f"text", "messages")
            pieces.append(part.get("text", ""))
        text = "".join(pieces)
    else:
        raise RequestError(f"messages[{i}].content: expected a string, a list of content parts or null, got "
                           f"{json_type(content)}", "messages")
    if message.get("tool_calls") is not None:
        text += json.dumps(message["tool_calls"], sort_keys=True)
    return text


def _xarg_ok(value: Any) -> bool:
    """Whether a vllm_xargs value has the type vLLM declares, ``dict[str, str | int | float | list[str | int |
    float]]`` (CompletionRequest / ChatCompletionRequest.vllm_xargs): not null, an object or a nested list."""
    return all(isinstance(v, (str, int, float)) for v in (value if isinstance(value, list) else [value]))


def parse_request(body: Any, chat: bool, served_model: str, vocab_size: int | None = None) -> ParsedRequest:
    """The request as the stand-in acts on it; RequestError (400, naming the field) where vLLM 0.26.0
    refuses it or where sim serve would not honour it. ``vocab_size``: the model's, which prompt token
    ids must be below (None: not checked)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {json_type(body)}")
    client_ids = False  # a prompt the client gave as token ids, checked against the vocabulary
    if body.get("stream_options") and not body.get("stream"):  # vLLM's validate_stream_options, a
        # mode="before" validator on the raw body: before the fields read here (pydantic runs vLLM's
        # later-defined before-validators, on prompt, cache_salt or tool_choice, earlier still)
        raise RequestError("stream_options can only be given with stream true, as vLLM requires", "stream_options")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list", "messages")
        # A chat template renders the tool definitions into the prompt as JSON (Llama 3.1's in the first
        # user turn), so an agent's tools cost prompt tokens on its every call; they were not counted.
        # Put first, they are a prefix every call with the same tools shares, as a system prompt is.
        tools = body.get("tools")
        parts = [f"tools: {json.dumps(tools, sort_keys=True)}\n"] if tools else []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise RequestError(f"messages[{i}]: expected an object, got {json_type(m)}", "messages")
            for key in ("role", "name"):  # every message type's role: Required[str], name: str (vLLM's
                # ChatCompletionMessageParam: OpenAI's message TypedDicts | CustomChatCompletionMessageParam)
                if (key == "role" or key in m) and not isinstance(m.get(key), str):
                    got = f"got {as_json(m[key])}" if key in m else "it is missing"
                    raise RequestError(f"messages[{i}].{key} must be a string, {got}", "messages")
            parts.append(f"{m['role']}: {_message_text(m, i)}\n")
        prompt_ids = text_token_ids("".join(parts))
        max_tokens = _int(body, "max_completion_tokens", _int(body, "max_tokens", DEFAULT_MAX_TOKENS, 1), 1)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if prompt == "":
            raise RequestError("prompt must not be empty", "prompt")
        if isinstance(prompt, str):
            prompt_ids = text_token_ids(prompt)
        elif isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt):
            prompt_ids = list(prompt)
            client_ids = True
        else:
            raise RequestError("prompt must be a string or a non-empty list of token ids >= 0 (one prompt per "
                               f"request), got {_short(prompt)}", "prompt")
        max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS, 1)
    # A chat request without a cap is capped by vLLM at the context left, not 16, for min_tokens.
    given = not chat or any(body.get(k) is not None for k in ("max_tokens", "max_completion_tokens"))
    problem = vllm_field_problem(body, chat, max_tokens if given else None) or unhonoured_field_problem(body, chat)
    if problem:
        raise RequestError(problem[1], problem[0])
    model = body.get("model")
    if model and model != served_model:
        # As vLLM's OpenAI server: a request for another model is a 404 (an empty name means this one).
        raise RequestError(f"the model {model!r} does not exist; this engine serves {served_model!r}", "model", 404)
    if client_ids and vocab_size is not None and max(prompt_ids) >= vocab_size:
        # As vLLM's InputProcessor (its words: "Token id N is out of vocabulary"), after the field and
        # model checks as there; it was a 200 here. A text prompt's ids are the stand-in's own.
        raise RequestError(f"prompt has token id {max(prompt_ids)}, out of the model's vocabulary (ids 0 to "
                           f"{vocab_size - 1}); vLLM refuses it: Token id {max(prompt_ids)} is out of "
                           "vocabulary", "prompt")
    n = _int(body, "n", 1, 1)
    if n != 1:
        raise RequestError(f"n must be 1 (one completion per request), got {n}", "n")
    stream = _flag(body, "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise RequestError(f"stream_options must be an object, got {json_type(opts)}", "stream_options")
    include_usage = _flag(opts, "include_usage", "stream_options.include_usage")
    xargs = {} if body.get(XARGS) is None else body[XARGS]
    if not isinstance(xargs, dict):  # [] and "" too: they are not absent to vLLM
        raise RequestError(f"{XARGS} must be an object, got {as_json(xargs)}", XARGS)
    for key, value in xargs.items():
        if not _xarg_ok(value):
            raise RequestError(f"{XARGS}.{key} must be a string, a number or a list of those, got "
                               f"{as_json(value)}", f"{XARGS}.{key}")
    pid, tid, service = xargs.get("program_id"), xargs.get("thread_id"), xargs.get("program_service")
    total = xargs.get("program_total_service")
    for name, value in (("program_id", pid), ("thread_id", tid)):
        # As the plugin (`engine.plugin_config.read_tags`), not the gateway (`engine.protocol.check_id`):
        # any string or integer, of any length or characters, "" too; see the module docstring.
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            raise RequestError(f"{XARGS}.{name} must be a string or an integer, got {as_json(value)}",
                               f"{XARGS}.{name}")
    kv_ttl = xargs.get("kv_ttl")
    for name, value in (("program_service", service), ("program_total_service", total), ("kv_ttl", kv_ttl)):
        if value is None:
            continue
        try:  # as the vLLM plugin (`engine.plugin_config.read_tags`): a non-finite service would rank nothing
            seconds = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:  # an integer past a float
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds >= 0):
            raise RequestError(f"{XARGS}.{name} must be a finite number of seconds >= 0, got {_short(value)}",
                               f"{XARGS}.{name}")
        if seconds > MAX_SECONDS:  # as the plugin's tags and engine.kv_ttl
            raise RequestError(f"{XARGS}.{name} must be at most {MAX_SECONDS:g} seconds, got {_short(value)}",
                               f"{XARGS}.{name}")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):  # vLLM's own check and wording
        raise RequestError("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    return ParsedRequest(
        chat=chat, prompt_ids=prompt_ids, max_tokens=max_tokens, stream=stream, include_usage=include_usage,
        return_token_ids=_flag(body, "return_token_ids"), model=served_model,
        program_id=None if pid is None else str(pid), thread_id=None if tid is None else str(tid),
        program_service=None if service is None else float(service),
        kv_ttl=0.0 if kv_ttl is None else float(kv_ttl), cache_salt=salt,
        total_service=None if total is None else float(total),
    )


class SimServer:
    """The HTTP face of one `RealtimeEngine`."""

    def __init__(self, engine: RealtimeEngine, served_model: str, expire_interval: float = 10.0):
        self.engine = engine
        self.served_model = served_model
        self.expire_interval = expire_interval
        self._expiry: asyncio.Task | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[router_errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.stats)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        await self.engine.start()
        self._expiry = asyncio.create_task(self._expire_loop())

    async def _cleanup(self, app: web.Application) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        await self.engine.stop()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.expire_interval)
            try:
                self.engine.advance()
            except EngineFailed:
                return
            self.engine.expire()

    # -- endpoints -----------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        # As vLLM's /health: 503 once the engine is dead, so a balancer or an
        # orchestrator stops sending it work.
        return web.Response(status=503 if self.engine.failure is not None else 200)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.served_model, "object": "model", "created": 0, "owned_by": "sim",
             "max_model_len": self.engine.max_tokens_per_call}]})

    async def stats(self, request: web.Request) -> web.Response:
        try:
            self.engine.advance()
        except EngineFailed:
            pass  # the snapshot says so
        return web.json_response(self.engine.snapshot())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = json.loads(await request.read(), parse_int=parse_json_int)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body exceeds {MAX_BODY} bytes")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(400, f"malformed JSON: {exc}")
        except RecursionError:
            return error_response(400, "malformed JSON: nested too deeply")
        try:
            req = parse_request(body, chat, self.served_model, self.engine.vocab_size)
            handle = self.engine.submit(req.prompt_ids, req.max_tokens, req.program_id, req.thread_id,
                                        req.program_service, req.kv_ttl, req.cache_salt, req.total_service)
        except RequestError as exc:
            return error_response(exc.status, exc.message, exc.param)
        except TooLarge as exc:
            return error_response(400, str(exc), "max_tokens")
        except Conflict as exc:
            return error_response(409, str(exc), f"{XARGS}.thread_id")
        except EngineFailed as exc:
            return error_response(503, str(exc))
        try:
            if req.stream:
                return await self._stream(request, req, handle)
            return await self._whole(req, handle)
        finally:
            if not handle.done:  # cancelled (client gone) or failed mid-way
                self.engine.abort(handle)

    def _headers(self) -> dict[str, str]:
        return {"X-Engine-Index": str(self.engine.index)}

    def _usage(self, req: ParsedRequest, handle: CallHandle) -> dict[str, Any]:
        n_prompt, n_out = len(req.prompt_ids), req.max_tokens
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
                "prompt_tokens_details": {"cached_tokens": handle.call.prefix_hit_tokens}}

    async def _whole(self, req: ParsedRequest, handle: CallHandle) -> web.Response:
        while await handle.queue.get() is not None:
            pass
        if handle.aborted:
            return error_response(499, "request aborted")
        if handle.failure is not None:
            return error_response(500, handle.failure)
        text = TOKEN_TEXT * req.max_tokens
        if req.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        body = {
            "id": _new_id(req.chat), "object": "chat.completion" if req.chat else "text_completion",
            "created": int(time.time()), "model": req.model, "choices": [choice],
            "usage": self._usage(req, handle), "engine_stats": handle.stats(self.engine.index),
        }
        if req.return_token_ids:
            choice["token_ids"] = list(handle.output_ids)
            # Where vLLM's protocol puts them: in the choice of a completion, at the top of a chat response.
            (body if req.chat else choice)["prompt_token_ids"] = list(req.prompt_ids)
        return web.json_response(body, headers=self._headers())

    async def _stream(self, request: web.Request, req: ParsedRequest, handle: CallHandle) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", **self._headers()})
        await resp.prepare(request)
        cid, created = _new_id(req.chat), int(time.time())
        obj = "chat.completion.chunk" if req.chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            doc = {"id": cid, "object": obj, "created": created, "model": req.model, "choices": choices, **extra}
            return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

        try:
            await self._stream_tokens(resp, req, handle, chunk)
        except ConnectionResetError:  # the client is gone: _handle aborts the call
            pass
        return resp

    async def _stream_tokens(self, resp: web.StreamResponse, req: ParsedRequest, handle: CallHandle,
                             chunk: Callable[..., bytes]) -> None:
        sent = 0
        held: dict[str, Any] | None = None  # the last token's choice, sent once the call's stats are final
        held_extra: dict[str, Any] = {}  # its chunk's top-level fields (a one-token chat's prompt_token_ids)
        while await handle.queue.get() is not None:
            last = sent + 1 == req.max_tokens
            if req.chat:
                delta = {"content": TOKEN_TEXT} if sent else {"role": "assistant", "content": TOKEN_TEXT}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": "length" if last else None}
            else:
                choice = {"index": 0, "text": TOKEN_TEXT, "logprobs": None,
                          "finish_reason": "length" if last else None}
            extra: dict[str, Any] = {}
            if req.return_token_ids:
                choice["token_ids"] = [handle.output_ids[sent]]
                if sent == 0:  # in the first chunk: its choice (completions) or its top level (chat), as vLLM
                    (extra if req.chat else choice)["prompt_token_ids"] = list(req.prompt_ids)
            sent += 1
            if last:  # the call finishes with this token: its queue ends right after it
                held, held_extra = choice, extra
            else:
                await resp.write(chunk([choice], **extra))
        if handle.aborted:
            return
        if handle.failure is not None:
            if held is not None:
                await resp.write(chunk([held], **held_extra))
            await resp.write(sse_error(error_body(500, handle.failure)))
            await resp.write_eof()
            return
        # engine_stats rides on the last token's chunk: a chunk with no choices
        # is vLLM's (and OpenAI's) usage chunk, sent only when asked for, and
        # clients that read choices[0] of every chunk fail on one.
        await resp.write(chunk([held] if held is not None else [], **held_extra,
                               engine_stats=handle.stats(self.engine.index)))
        if req.include_usage:
            await resp.write(chunk([], usage=self._usage(req, handle)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()


def _new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


# -- configuration and CLI ------------------------------------------------------------


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    """The engine's configuration: an experiment (with --set) if named, then the flags on top."""
    if not args.experiment and (args.overrides or args.experiments):
        raise ValueError("--set and --experiments apply to an experiment: name it with --experiment")
    if args.experiment:
        from sim.experiments import resolve

        cfg = resolve(args.experiment, args.experiments, args.overrides)
    else:
        cfg = ExperimentConfig(name="serve")
    eng = cfg.engine
    changes = {k: v for k, v in (("model", args.model), ("gpu", args.gpu), ("num_gpu_blocks", args.num_gpu_blocks),
                                  ("gpus_per_replica", args.gpus_per_replica), ("max_num_seqs", args.max_num_seqs),
                                  ("max_num_batched_tokens", args.max_num_batched_tokens)) if v is not None}
    if args.model is not None and not args.experiment:
        # As an experiment that leaves the count unset (`sim.experiments`): the GPUs the model
        # is served on, its spec's tensor_parallel (70B: 4); 70B on the default 1 did not fit.
        from sim.hardware import load_model

        changes.setdefault("gpus_per_replica", load_model(args.model).tensor_parallel)
    if args.gpu is not None and not args.experiment:
        # `vllm serve`'s sequence cap and token budget for that GPU, unless given (`sim.experiments`
        # does the same for an experiment's GPU; an experiment's are its own, as resolved).
        from sim.hardware import load_gpu

        seqs, tokens = load_gpu(args.gpu).serve_batch_defaults()
        changes.setdefault("max_num_seqs", seqs)
        changes.setdefault("max_num_batched_tokens", tokens)
    eng = dataclasses.replace(eng, **changes)
    lat = cfg.latency
    if args.latency is not None:  # only the kind: the experiment's efficiencies and overhead stay
        lat = dataclasses.replace(lat, kind=args.latency)
    if args.step_seconds is not None:
        lat = dataclasses.replace(lat, seconds=args.step_seconds)
    if args.latency_name is not None:
        lat = dataclasses.replace(lat, name=args.latency_name)
    _check_latency_flags(args, lat.kind)
    _check_step_seconds(args.step_seconds)
    return dataclasses.replace(cfg, engine=eng, latency=lat)


# The latency flags that set one kind's field (`sim.experiments.LATENCY_KIND_FIELDS`).
LATENCY_FLAGS = (("--step-seconds", "step_seconds", "seconds"), ("--latency-name", "latency_name", "name"))


def _check_latency_flags(args: argparse.Namespace, kind: str) -> None:
    """Refuse a latency flag the kind served does not read, as an experiment refuses the field:
    --step-seconds under the default roofline was ignored without a word."""
    from sim.experiments import LATENCY_KIND_FIELDS

    for flag, attr, key in LATENCY_FLAGS:
        if getattr(args, attr) is None or key in LATENCY_KIND_FIELDS[kind]:
            continue
        owner = next(k for k, keys in LATENCY_KIND_FIELDS.items() if key in keys)
        source = ("--latency" if args.latency is not None else
                  f"experiment {args.experiment!r}" if args.experiment else "the default")
        raise ValueError(f"{flag}: the {kind} latency kind ({source}) does not use it (the {owner} kind does); "
                         f"add --latency {owner}, or drop {flag}")


def _check_step_seconds(seconds: float | None) -> None:
    """--step-seconds within the step times the engine takes, named as the flag: the model's own
    checks said "constant latency must be > 0 seconds" or "latency model 'constant' gives inf s"."""
    if seconds is not None and not MIN_STEP_SECONDS <= seconds <= MAX_STEP_SECONDS:  # nan too
        raise ValueError(f"--step-seconds: expected the seconds of one engine step, from {MIN_STEP_SECONDS:g} to "
                         f"{MAX_STEP_SECONDS:g}, got {seconds}")


def serve_policy(args: argparse.Namespace, cfg: ExperimentConfig) -> str:
    """--policy, else the experiment's only policy, else plas.

    An experiment that compares several policies cannot pick one engine's
    policy, so it needs --policy rather than a silent default.
    """
    if args.policy is not None:
        return args.policy
    if not args.experiment:
        return "plas"
    if len(cfg.policies) == 1:
        return cfg.policies[0]
    raise ValueError(f"experiment {args.experiment!r} compares {', '.join(cfg.policies)}: "
                     "choose this engine's with --policy")


def run_site(app: web.Application, host: str, port: int, prog: str, banner: str = "") -> int:
    """Serve ``app`` until interrupted; an address that cannot be bound (in use, not
    an address of this machine) is one line and exit status 1.

    ``banner`` goes to stderr once the address is bound (aiohttp's ``print``
    hook runs after its sites start), so a port in use is not first
    announced as served.
    """
    def bound(_: str) -> None:
        if banner:
            print(banner, file=sys.stderr, flush=True)

    server_log = logging.getLogger("aiohttp.server")
    one_line = MalformedRequestsInOneLine()
    server_log.addFilter(one_line)
    try:
        web.run_app(app, host=host, port=port, handler_cancellation=True, access_log=None, print=bound)
    except OSError as exc:
        print(f"{prog}: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        server_log.removeFilter(one_line)
    return 0


class MalformedRequestsInOneLine(logging.Filter):
    """A request aiohttp's parser refuses (a NUL in a header, a bad chunk size) already got its
    400; aiohttp also logged it with a whole traceback, one per bad client request."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "refused a malformed HTTP request (400): %s", (" ".join(str(exc.message).split()),), None, None)
        return True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=8000, help="(default: %(default)s)")
    p.add_argument("--index", type=int_at_least(0), default=0,
                   help="engine index reported in X-Engine-Index (default: 0)")
    p.add_argument("--served-model-name", type=nonblank, default="sim", help="model id in /v1/models (default: %(default)s)")
    p.add_argument("--experiment", help="take engine, latency and policy parameters from this experiment")
    p.add_argument("-e", "--experiments", metavar="FILE", help="experiments file (default: experiments.yaml)")
    p.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key of the experiment; repeatable")
    real = ", ".join(name for name, cls in POLICY_CLASSES.items() if not cls.oracle)
    p.add_argument("--policy", help=f"scheduling policy: {real} (default: the --experiment's policy if it "
                                    "names one, else plas)")
    p.add_argument("--model", help="model spec name (e.g. llama-3.1-8b)")
    p.add_argument("--gpu", help="GPU spec name (e.g. a100-80gb)")
    p.add_argument("--gpus-per-replica", type=int_at_least(1),
                   help="GPUs this engine spans (tensor parallel; default: the --model spec's tensor_parallel, "
                        "else the experiment's, else 1)")
    p.add_argument("--latency", choices=("constant", "roofline", "fitted"), help="latency model kind")
    p.add_argument("--step-seconds", type=number, help="step time of the constant latency model")
    p.add_argument("--latency-name", help="fitted latency model name or path")
    p.add_argument("--num-gpu-blocks", type=POSITIVE_INT, help="KV capacity in blocks (default: from the specs)")
    p.add_argument("--max-num-seqs", type=POSITIVE_INT)
    p.add_argument("--max-num-batched-tokens", type=POSITIVE_INT)


async def serve(server: SimServer, host: str, port: int) -> web.AppRunner:
    """Start ``server`` on host:port; returns the runner (``await runner.cleanup()`` to stop)."""
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim serve",
                                     description="Serve an OpenAI-compatible API timed by the simulated engine.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args)
        policy = serve_policy(args, cfg)
        engine = RealtimeEngine(cfg, policy, args.index)
    except (ValueError, OSError) as exc:
        print(f"python -m sim serve: error: {exc}", file=sys.stderr)
        return 1
    note = async_without_host_note(cfg)
    if note:
        print(f"sim serve: {note}", file=sys.stderr)
    if cfg.engine.replicas > 1:
        print(f"sim serve: note: this is one engine; the experiment's {cfg.engine.replicas} replicas and its "
              f"{cfg.engine.balancer} balancer are the gateway's part (python -m engine gateway), not this "
              "process's", file=sys.stderr)
    server = SimServer(engine, args.served_model_name)
    banner = (f"sim serve: engine {args.index} ({cfg.engine.model} on {cfg.engine.gpu}, latency {cfg.latency.kind}, "
              f"policy {policy}) on http://{args.host}:{args.port}")
    return run_site(server.app(), args.host, args.port, "python -m sim serve", banner)
