"""The wire protocol shared by the gateway, the replayer and the engines behind them.

Program identity travels two ways, because two kinds of server read it:

* HTTP headers ``X-Program-Id`` and ``X-Thread-Id``, read by the gateway
  (a client talking to the gateway need not touch the request body);
* ``vllm_xargs`` in the JSON body, ``{"program_id", "thread_id",
  "program_service", "program_total_service", "kv_ttl"}``, read by the engines: vLLM's OpenAI server copies
  ``vllm_xargs`` into ``sampling_params.extra_args``, where the scheduler
  plugin finds them, and ``python -m sim serve`` reads the same keys. vLLM
  0.26.0 accepts only str/int/float values there, so service is a float in
  seconds. ``program_service`` is the program's priority value (PLAS: the
  sum of its calls' service; ATLAS: its critical path), and
  ``program_total_service`` the plain sum, T_program of the starvation
  ratio. Under ATLAS the two differ, and T_program seeded with the critical
  path made a program's calls look starved early.

The gateway writes the xargs itself (its ids and the program's attained
service win over anything the client put there). A client's ``kv_ttl``
passes through; a header ``X-KV-TTL: SECONDS`` sets it, so a client of the
gateway need not touch the body to ask for a pin either. The replayer sends both,
so it works against the gateway and against a bare vLLM server alike.

Engines may add one extension object to their response (the last SSE chunk,
or the JSON body): ``"engine_stats"`` with the call's engine-side timing
(see ``sim.serve``). vLLM does not send it; readers treat it as optional.
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import SplitResult

from sim.core.params import MAX_SECONDS

PROGRAM_HEADER = "X-Program-Id"
THREAD_HEADER = "X-Thread-Id"
KV_TTL_HEADER = "X-KV-TTL"  # seconds to pin the call's KV for its program's next call (gateway -> xargs kv_ttl)
ENGINE_HEADER = "X-Engine-Index"  # set by `sim serve` on its responses
GATEWAY_ENGINE_HEADER = "X-Gateway-Engine"  # set by the gateway: index of the engine it chose
XARGS = "vllm_xargs"
XARG_PROGRAM = "program_id"
XARG_THREAD = "thread_id"
XARG_SERVICE = "program_service"
XARG_TOTAL_SERVICE = "program_total_service"
XARG_KV_TTL = "kv_ttl"  # seconds to keep the call's KV cached for its program's next call
ENGINE_STATS = "engine_stats"

# Ids name table entries and appear in URLs (DELETE /v1/programs/{id}), so
# they are short and URL-safe: no "/" (a path separator), no spaces.
ID_MAX_LEN = 128
ID_RE = re.compile(r"^[A-Za-z0-9._:-]+$")


class BadRequest(ValueError):
    """A client error, carried to an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error document: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    499: "client_closed_request",
    500: "internal_server_error",
    502: "bad_gateway",
    503: "service_unavailable",
}


def check_id(value: str, what: str) -> str:
    """Validate a program or thread id; raises BadRequest naming the header."""
    if value == "":
        raise BadRequest(f"{what} must not be empty", param=what, code="invalid_id")
    if len(value) > ID_MAX_LEN:
        raise BadRequest(f"{what} is {len(value)} characters long; the limit is {ID_MAX_LEN}",
                         param=what, code="invalid_id")
    if not ID_RE.fullmatch(value):  # match() let "p1\n" through: "$" also matches before a final newline
        raise BadRequest(f"{what} {value[:40]!r} has characters outside [A-Za-z0-9._:-]",
                         param=what, code="invalid_id")
    if value in (".", ".."):  # path segments: clients normalise /v1/programs/.. away, so no DELETE reaches it
        raise BadRequest(f"{what} {value!r} is a path segment (DELETE /v1/programs/{value} cannot name it); "
                         "use another id", param=what, code="invalid_id")
    return value


def one_header(headers: Any, name: str) -> str | None:
    """Header ``name``'s value (None when absent) from an aiohttp ``CIMultiDictProxy``.

    A header given twice with different values is refused (BadRequest naming it): ``.get`` took the
    first, so ``X-Program-Id: p1`` and ``X-Program-Id: p2`` ran as p1 without a word. The same value
    repeated (a proxy that copies a header) is one value, and taken.
    """
    values = list(dict.fromkeys(headers.getall(name, [])))
    if len(values) > 1:
        shown = ", ".join(repr(v[:40]) for v in values[:3]) + (", ..." if len(values) > 3 else "")
        raise BadRequest(f"{name} was given more than once with different values ({shown}); give it once",
                         param=name, code="conflicting_header")
    return values[0] if values else None


def xargs_for(program_id: str, thread_id: str, program_service: float, total_service: float) -> dict[str, Any]:
    return {XARG_PROGRAM: program_id, XARG_THREAD: thread_id, XARG_SERVICE: float(program_service),
            XARG_TOTAL_SERVICE: float(total_service)}


def check_kv_ttl(value: str) -> float:
    """The ``X-KV-TTL`` header as seconds >= 0; raises BadRequest naming the header."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise BadRequest(f"{KV_TTL_HEADER} must be a finite number of seconds >= 0, got {value[:40]!r}",
                         param=KV_TTL_HEADER, code="invalid_kv_ttl")
    if seconds > MAX_SECONDS:  # as engine.kv_ttl in an experiment and the engines' kv_ttl tag
        raise BadRequest(f"{KV_TTL_HEADER} must be at most {MAX_SECONDS:g} seconds, got {value[:40]!r}",
                         param=KV_TTL_HEADER, code="invalid_kv_ttl")
    return seconds


def with_xargs(body: dict[str, Any], xargs: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` whose ``vllm_xargs`` holds ``xargs`` (which win over the client's)."""
    out = dict(body)
    merged = dict(body.get(XARGS) or {}) if isinstance(body.get(XARGS), dict) else {}
    merged.update(xargs)
    out[XARGS] = merged
    return out


# What follows /v1 in the routes clients append to a server's base URL (the gateway and vLLM serve them).
API_ROUTES = (["models"], ["completions"], ["chat", "completions"], ["programs"])


def base_of_api_path(url: SplitResult) -> str | None:
    """The server's base URL when ``url`` names its API (a path ending in /v1, in /v1 and one
    of `API_ROUTES`, or in /v1/programs/ID, the gateway's DELETE), else None: a client that
    appends /v1/... to it asked for /v1/v1/... (a 404). A server behind a prefix (a proxy's
    /sim, or its own /v1/engine0) is a base URL."""
    segments = [s for s in url.path.split("/") if s]

    def names_api(rest: list[str]) -> bool:
        return rest == [] or rest in API_ROUTES or (len(rest) == 2 and rest[0] == "programs")

    at = next((i for i in range(len(segments)) if segments[i] == "v1" and names_api(segments[i + 1:])), None)
    if at is None:
        return None
    return url._replace(path="/".join([""] + segments[:at]), query="", fragment="").geturl()
