"""The OpenAI API's wire format as vLLM's server handles it: requests in, errors out.

`parse_request` reads a completion or chat completion body into what
``sim serve`` acts on, refusing with a 400 that names the field whatever
vLLM 0.26.0 refuses (`sim.vllm_fields`); the error helpers write OpenAI's
error object, in a body or at the end of a stream, for ``sim serve``. The
gateway shares the parts vLLM's server and it must say alike (the router's
own 404/405/413 text, a stream's error end, a value's JSON type name); its
error bodies are `engine.protocol`'s. What the stand-in does with a request
is in `sim.serve`'s docstring.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sim.core.params import MAX_SECONDS
from sim.filler_tokens import FILLER_BASE, FILLER_VOCAB
from sim.vllm_fields import as_json, unhonoured_field_problem, vllm_field_problem

DEFAULT_MAX_TOKENS = 16
BYTES_PER_TOKEN = 4  # text without a tokenizer: one token per 4 UTF-8 bytes (`text_token_ids`)
MAX_BODY = 64 * 1024 * 1024  # sim serve's request size limit, as its router's 413 says
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


def api_key_guard(key: str, guarded: tuple[str, ...] = ("/v1",)):
    """Middleware answering a request under a ``guarded`` path without ``Authorization: Bearer KEY`` with
    vLLM's 401 and body ``{"error": "Unauthorized"}``, as ``vllm serve --api-key KEY`` does for ``/v1`` (its
    AuthenticationMiddleware: the scheme in any case, the key compared by digest). ``/health`` and
    ``/metrics`` stay open there (probes, scrapes), and so do ``/health`` and ``sim serve``'s ``/stats``
    here, so a gateway or replayer that forgets the key meets the refusal it would meet on vLLM."""
    want = hashlib.sha256(key.encode()).digest()

    @web.middleware
    async def guard(request: web.Request, handler):
        if request.method != "OPTIONS" and request.path.startswith(guarded):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            try:  # aiohttp keeps a header's undecodable bytes as surrogates: back to those bytes
                digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
            except UnicodeEncodeError:
                digest = b""
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, want):
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    return guard


def router_error_message(request: web.Request, exc: web.HTTPException, max_body: int) -> str:
    """What the router's own 404, 405 or 413 says, for an OpenAI error body (here and in the gateway)."""
    return {404: f"unknown route {request.method} {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
            413: f"request body exceeds {max_body} bytes"}.get(exc.status, exc.reason)


def sse_error(body: dict[str, Any]) -> bytes:
    """The end of a stream that failed, as vLLM's OpenAI server writes it: an error event, then ``[DONE]``."""
    return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


def text_token_ids(text: str) -> list[int]:
    """Pseudo-tokenisation of text: one id per 4-byte chunk (`sim.serve`'s docstring, "Prompts")."""
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
    max_tokens: int | None  # None: a chat request without a cap, which runs to the context left (vLLM's)
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


def _int(body: dict, name: str, default: int | None, low: int) -> int | None:
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


# Chat content parts by type, as vLLM 0.26.0 reads them (entrypoints/chat_utils.py, MM_PARSER_MAP): the
# field holding each text-like part's text, and the media parts, which a text-only model refuses.
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
              "thinking": "thinking", "tool_reference": "name"}
MEDIA_PARTS = ("image_url", "input_image", "image_pil", "image_embeds", "audio_url", "input_audio", "audio_embeds",
               "video_url", "prompt_embeds")


def _message_text(message: dict[str, Any], i: int) -> str:
    """A chat message's text as OpenAI's API allows it: a string, null (an assistant turn that
    only calls tools), or a list of content parts whose text parts are joined; its tool calls
    count as their JSON. vLLM accepts all of these, so the stand-in engine must too. A media
    part (an image) is refused, as vLLM refuses one for a text-only model such as Llama-3.1's
    ("... is not a multimodal model"): it was dropped, its tokens uncounted."""
    content = message.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        # vLLM's "string" content format (Llama-3.1's template) joins the parts' texts with newlines
        text = "\n".join(t for t in (_part_text(part, i, j) for j, part in enumerate(content)) if t is not None)
    else:
        raise RequestError(f"messages[{i}].content: expected a string, a list of content parts or null, got "
                           f"{json_type(content)}", "messages")
    if message.get("tool_calls") is not None:
        text += json.dumps(message["tool_calls"], sort_keys=True)
    return text


def _part_text(part: Any, i: int, j: int) -> str | None:
    """A content part's text; None for a text or refusal part without content, which vLLM skips."""
    where = f"messages[{i}].content[{j}]"
    if not isinstance(part, dict):
        raise RequestError(f"{where}: expected a content part object, got {json_type(part)}", "messages")
    kind = part.get("type")
    if kind is None:  # vLLM reads a media part's type from its key, and refuses any other without one
        kind = next((k for k in (*MEDIA_PARTS, "tool_reference") if k in part), None)
        if kind is None:
            raise RequestError(f"{where}: Missing 'type' field in multimodal part (vLLM's words); a text part "
                               f"is {{\"type\": \"text\", \"text\": ...}}", "messages")
    if not isinstance(kind, str):
        raise RequestError(f"{where}: Invalid 'type' field in multimodal part (vLLM's words), got "
                           f"{as_json(kind)}", "messages")
    if kind == "prompt_embeds":
        raise RequestError(f"{where}: part type 'prompt_embeds' needs vLLM's --enable-prompt-embeds, which this "
                           f"engine does not take", "messages")
    if kind in MEDIA_PARTS:
        raise RequestError(f"{where}: part type {kind!r} needs a multimodal model; this engine's is text-only, "
                           f"and vLLM refuses it as not a multimodal model", "messages")
    if kind not in TEXT_PARTS:
        raise RequestError(f"{where}: Unsupported chat content part type: {kind!r}. Supported types: "
                           f"{', '.join(sorted((*TEXT_PARTS, *MEDIA_PARTS)))} (vLLM's words)", "messages")
    value = part.get(TEXT_PARTS[kind])
    if value is None:  # vLLM skips a text or refusal part without content
        return None
    if not isinstance(value, str):
        raise RequestError(f"{where}.{TEXT_PARTS[kind]}: expected a string, got {json_type(value)}", "messages")
    return value


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
        # vLLM's ChatCompletionRequest has no default cap: without one a reply runs to the context left
        # (`get_max_tokens`), which the engine, knowing max_model_len, fills in (`None` here).
        max_tokens = _int(body, "max_completion_tokens", _int(body, "max_tokens", None, 1), 1)
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
    problem = vllm_field_problem(body, chat, max_tokens) or unhonoured_field_problem(body, chat)
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
        # any string or integer, of any length or characters, "" too; see `sim.serve`'s docstring.
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
