"""How the vLLM scheduler plugin is configured, and how a request is tagged.

Kept apart from ``engine/scheduler.py`` (which imports vLLM) so the parsing
and its error messages can be used and tested without vLLM installed.

Engine configuration: vLLM 0.26.0's ``VllmConfig.additional_config`` is a
free-form dict passed to every engine component (``--additional-config``
on the CLI, ``additional_config=`` in ``LLM(...)``/``EngineArgs``). The
plugin reads its own key from it::

    --scheduler-cls engine.scheduler.ProgramAwareAsyncScheduler \
    --additional-config '{"autellix": {"policy": "plas", "params": {"beta": 8}}}'

(``ProgramAwareAsyncScheduler`` since vLLM 0.26.0 schedules asynchronously
by default; ``ProgramAwareScheduler`` with ``--no-async-scheduling``.)

``policy`` is one of fcfs, mlfq, plas, atlas, program_fcfs (default plas); ``params`` are
`sim.core.PolicyParams` fields, the same keys as ``policy_params`` in
``experiments.yaml``, so one set of numbers drives both engines. SRPT is
refused: it needs each program's remaining work, which only the simulator
(reading the trace's future) knows.

Request tags: ``SamplingParams.extra_args`` (the OpenAI server fills it from
``vllm_xargs`` in the request body). Ids never go into ``request_id``,
because vLLM rewrites it.

* ``program_id``: the program the call belongs to. Untagged requests are
  single-call programs keyed by their request id.
* ``thread_id``: the call's thread inside its program (one live call per
  thread). Missing: the request id, so every call is its own thread.
* ``program_service``: the program's attained service in seconds as the
  gateway knows it. The gateway holds the global process table across
  engines; an engine only sees the calls routed to it, so when a program
  moves between engines its local entry would start from zero. The plugin
  raises the local entry's priority (``ProgramState.service``) to this value
  when it is higher; W_program stays local.
* ``program_total_service``: the sum of the program's service (T_program of
  the starvation ratio), raised likewise (``total_service``). Under ATLAS
  the priority is the critical path, less than the sum. Without this tag
  the plugin raises T_program to ``program_service``, a lower bound.
* ``kv_ttl``: seconds to keep the call's KV cached after it finishes,
  because its program will send a follow-up (Continuum's time-to-live;
  `engine.kv_pins`). Missing or 0: vLLM's behaviour, the blocks go back to
  the LRU free queue at once. Only cached blocks can be kept, so it does
  nothing with prefix caching off.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from sim.core import POLICY_CLASSES, PolicyParams
from sim.core.params import MAX_SECONDS
from traces.validate import parse_json_int

CONFIG_KEY = "autellix"
DEFAULT_POLICY = "plas"


class PluginConfigError(ValueError):
    """The plugin's configuration is unusable; the message says which key and why."""


@dataclass(frozen=True)
class PluginConfig:
    policy: str = DEFAULT_POLICY
    params: PolicyParams = dataclasses.field(default_factory=PolicyParams)


def engine_policies() -> list[str]:
    """Policies a real engine can run: every core policy that is not an oracle."""
    return [name for name, cls in POLICY_CLASSES.items() if not cls.oracle]


def parse_plugin_config(additional_config: Any) -> PluginConfig:
    """Read ``additional_config["autellix"]``; a missing key means the defaults."""
    if additional_config is None:
        return PluginConfig()
    if not isinstance(additional_config, Mapping):
        raise PluginConfigError(
            f"additional_config must be a dict to carry the {CONFIG_KEY!r} key, "
            f"got {type(additional_config).__name__}"
        )
    section = additional_config.get(CONFIG_KEY)
    if section is None:
        return PluginConfig()
    if isinstance(section, str):  # a JSON string, as a shell may pass it
        try:
            section = json.loads(section, parse_int=parse_json_int)
        except json.JSONDecodeError as e:
            raise PluginConfigError(f"additional_config.{CONFIG_KEY}: not valid JSON ({e})") from None
    if not isinstance(section, Mapping):
        raise PluginConfigError(f"additional_config.{CONFIG_KEY}: expected an object, got {section!r}")
    unknown = sorted(set(section) - {"policy", "params"})
    if unknown:
        raise PluginConfigError(
            f"additional_config.{CONFIG_KEY}: unknown keys {unknown}; valid keys: policy, params"
        )
    return PluginConfig(_policy_name(section.get("policy", DEFAULT_POLICY)), _params(section.get("params")))


def _policy_name(name: Any) -> str:
    valid = engine_policies()
    if not isinstance(name, str):
        raise PluginConfigError(f"additional_config.{CONFIG_KEY}.policy: expected a string, got {name!r}")
    cls = POLICY_CLASSES.get(name)
    if cls is not None and cls.oracle:
        raise PluginConfigError(
            f"additional_config.{CONFIG_KEY}.policy: {name!r} is an oracle that needs each program's "
            f"future work, which a real engine does not know; it runs only in the simulator. "
            f"Valid choices here: {', '.join(valid)}"
        )
    if cls is None:
        raise PluginConfigError(
            f"additional_config.{CONFIG_KEY}.policy: unknown policy {name!r}; valid choices: {', '.join(valid)}"
        )
    return name


def _params(raw: Any) -> PolicyParams:
    if raw is None:
        return PolicyParams()
    if not isinstance(raw, Mapping):
        raise PluginConfigError(f"additional_config.{CONFIG_KEY}.params: expected an object, got {raw!r}")
    fields = [f.name for f in dataclasses.fields(PolicyParams)]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise PluginConfigError(
            f"additional_config.{CONFIG_KEY}.params: unknown keys {unknown}; valid keys: {', '.join(fields)}"
        )
    try:
        return PolicyParams(**raw)
    except (TypeError, ValueError) as e:
        raise PluginConfigError(f"additional_config.{CONFIG_KEY}.params: {e}") from None


@dataclass(frozen=True, slots=True)
class CallTags:
    """A request's identity in the core, read from its ``extra_args``."""

    program_id: str
    thread_id: str
    program_service: float | None  # the gateway's view; None when not sent
    kv_ttl: float = 0.0  # seconds to pin the call's KV after it finishes
    total_service: float | None = None  # the gateway's T_program; None when not sent


def read_tags(request_id: str, extra_args: Mapping[str, Any] | None) -> CallTags:
    """Program/thread ids and the gateway's service, with the documented defaults.

    Raises `PluginConfigError` for malformed tags: a gateway that sends a
    program id must send a usable one, and guessing would merge programs.
    """
    extra = extra_args or {}
    program_id = _tag_id(request_id, "program_id", extra.get("program_id"))
    thread_id = _tag_id(request_id, "thread_id", extra.get("thread_id"))
    service = _tag_seconds(request_id, "program_service", extra.get("program_service"))
    total = _tag_seconds(request_id, "program_total_service", extra.get("program_total_service"))
    kv_ttl = _tag_seconds(request_id, "kv_ttl", extra.get("kv_ttl"))
    return CallTags(program_id, thread_id, service, 0.0 if kv_ttl is None else kv_ttl, total)


def _tag_id(request_id: str, name: str, value: Any) -> str:
    """A program or thread id: a string, or an integer sent as one; absent means the request id."""
    if value is None:
        return request_id
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return str(value)
        except ValueError:  # an integer past Python's digit limit for str()
            pass
    raise PluginConfigError(f"request {request_id!r}: extra_args.{name} must be a string, got {_shown(value)}")


def _tag_seconds(request_id: str, name: str, value: Any) -> float | None:
    """A finite number of seconds >= 0, or None when absent."""
    if value is None:
        return None
    try:
        seconds = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    except OverflowError:  # an integer too large for a float (10**400)
        seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise PluginConfigError(
            f"request {request_id!r}: extra_args.{name} must be a finite number of seconds >= 0, got {_shown(value)}"
        )
    if seconds > MAX_SECONDS:  # as engine.kv_ttl in an experiment: a 1e300 s pin never gives way by expiry
        raise PluginConfigError(f"request {request_id!r}: extra_args.{name} must be at most {MAX_SECONDS:g} "
                                f"seconds, got {_shown(value)}")
    return seconds


def _shown(value: Any) -> str:
    """The value for an error message, short: a huge integer or string is cut, not printed whole."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
