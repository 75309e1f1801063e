"""The OpenAI request fields `sim serve` does not act on, checked as vLLM 0.26.0 checks them.

`sim serve` stands in for vLLM's server in tests of the gateway and the
replayer; a request vLLM refuses with 400 must be refused there too, or a
client that works against the stand-in fails against the real engine.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

# -- OpenAI fields the stand-in does not act on, checked as vLLM 0.26.0 checks them -------------------
#
# vLLM refuses a request (400) in two passes, and sim serve mirrors both so a client (or the
# gateway's tests) gets the same status from either engine:
#   1. pydantic reads each field of CompletionRequest / ChatCompletionRequest
#      (vllm/entrypoints/openai/completion/protocol.py, .../chat_completion/protocol.py) as its
#      declared type in lax mode: a float takes a number, a boolean or a numeric string ("0.5");
#      an int also takes 3.0 and "3"; a bool takes 0/1 and "true"/"no"/"off"...; a str only a string;
#   2. its validators and SamplingParams (vllm/sampling_params.py: from_optional, _verify_args,
#      _validate_logprobs, _validate_logit_bias, _validate_allowed_token_ids) refuse values out of range.
# Fields absent from the models are ignored, as vLLM does (OpenAIBaseModel: extra="allow", only logged
# at debug level): ``best_of: 0`` is a 200 from vLLM 0.26.0, which dropped the field.
# Not mirrored: bounds that need the model's vocabulary in the fields below (logit_bias,
# allowed_token_ids, stop_token_ids...: ids >= vocab size; a prompt's ids are checked against the
# model spec's vocab_size by `sim.openai_api.parse_request`, as vLLM's InputProcessor does) and the inner
# fields of response_format, structured_outputs, tools, tool_choice and repetition_detection (their
# outer type only). The fields sim serve acts on keep their own, stricter checks (max_tokens "5" is
# refused here, a 5 to vLLM).

_BAD = object()  # what a reader returns for a value of the wrong type
_BOOL_WORDS = {"0": False, "off": False, "f": False, "false": False, "n": False, "no": False,
               "1": True, "on": True, "t": True, "true": True, "y": True, "yes": True}  # pydantic's, any case
INT64 = (-2 ** 63, 2 ** 63 - 1)
MAX_LOGPROBS = 20  # vLLM's ModelConfig.max_logprobs default (--max-logprobs)


# The whitespace pydantic trims from a number's string (Rust's, Unicode White_Space): Python's own
# str.strip() and int() also trim \x1c-\x1f, which pydantic refuses.
_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
         "\u2028\u2029\u202f\u205f\u3000"
# pydantic reads a string as an int when it is an ASCII integer ("+5", "1_0") or one with a fraction of
# zeros ("5.0", "1_0.00"); not "5.", ".0", "1e2" or "5.5". Leading zeros do not count towards its
# 4,300-digit limit.
_INT_TEXT = re.compile(r"([+-]?)([0-9]+(?:_[0-9]+)*)(?:\.0+)?")
MAX_INT_DIGITS = 4300  # Python's default int_max_str_digits, which pydantic's limit matches


def _lax_float(v: Any) -> Any:
    if isinstance(v, (bool, int, float)):  # not a LongInt (too long to read): pydantic refuses it too
        try:
            return float(v)
        except OverflowError:
            return _BAD
    if isinstance(v, str):
        text = v.strip(_SPACE)
        # ASCII: Python's float() also reads other scripts' digits; and no \x1c-\x1f left, which it trims
        if text.isascii() and text == text.strip():
            try:
                return float(text)
            except ValueError:
                pass
    return _BAD


def _lax_int(v: Any) -> Any:
    if isinstance(v, (bool, int)):
        return int(v)
    if isinstance(v, str):
        text = v.strip(_SPACE)
        number = _INT_TEXT.fullmatch(text) if text.isascii() else None
        if number is None:
            return _BAD
        digits = number.group(2).replace("_", "").lstrip("0") or "0"
        if len(digits) > MAX_INT_DIGITS:
            return _BAD
        return -int(digits) if number.group(1) == "-" else int(digits)
    return int(v) if isinstance(v, float) and v.is_integer() else _BAD


def _lax_bool(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    return _BOOL_WORDS.get(v.lower(), _BAD) if isinstance(v, str) else _BAD


def _list_of(item: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def read(v: Any) -> Any:
        out = [item(x) for x in v] if isinstance(v, list) else [_BAD]
        return _BAD if any(x is _BAD for x in out) else out
    return read


def _one_of(*choices: str) -> Callable[[Any], Any]:
    return lambda v: v if isinstance(v, str) and v in choices else _BAD


_str = lambda v: v if isinstance(v, str) else _BAD  # noqa: E731
_strict_int = lambda v: v if type(v) is int else _BAD  # noqa: E731  (a BeforeValidator refusing bool, float, str)
_object = lambda v: v if isinstance(v, dict) else _BAD  # noqa: E731
_array = lambda v: v if isinstance(v, list) else _BAD  # noqa: E731
_strs = _list_of(_str)
# check_logprobs compares the raw value (< 0) before pydantic reads it: a string raises TypeError there
_raw_int = lambda v: _BAD if isinstance(v, str) else _lax_int(v)  # noqa: E731
_str_map = lambda v: v if isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) else _BAD  # noqa: E731
_tool_choice = lambda v: v if isinstance(v, dict) or v in ("none", "auto", "required") else _BAD  # noqa: E731
_ints = _list_of(_lax_int)
_stop = lambda v: [v] if isinstance(v, str) else _strs(v)  # noqa: E731  (str | list[str])
_bias = lambda v: _BAD if not isinstance(v, dict) or _BAD in map(_lax_float, v.values()) else v  # noqa: E731


def _token_key(key: str) -> bool:
    """A logit_bias key as SamplingParams.from_optional reads it (int(token)), >= 0 (_validate_logit_bias)."""
    try:
        return int(key) >= 0
    except ValueError:
        return False


@dataclass(frozen=True)
class Rule:
    read: Callable[[Any], Any]  # the value as pydantic reads the declared type, or _BAD
    expected: str  # for the error: "a number in [0, 2]"
    ok: Callable[[Any], bool] = lambda v: True  # the documented range, on the value read
    null: bool = True  # declared "| None"


_in = lambda lo, hi: lambda v: lo <= v <= hi  # noqa: E731
_finite_in = lambda lo, hi: lambda v: math.isfinite(v) and lo <= v <= hi  # noqa: E731
_INT64_TEXT = "an integer in [-2**63, 2**63 - 1]"
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")

# Field types: CompletionRequest and ChatCompletionRequest (both declare these alike); ranges: the
# comment's validator (_verify_args: SamplingParams._verify_args).
COMMON_FIELDS: dict[str, Rule] = {
    "model": Rule(_str, "a string"),  # model: str | None (a string naming another model: 404, below)
    "user": Rule(_str, "a string"),  # user: str | None
    "frequency_penalty": Rule(_lax_float, "a number in [-2, 2]", _in(-2, 2)),  # _verify_args
    "presence_penalty": Rule(_lax_float, "a number in [-2, 2]", _in(-2, 2)),  # _verify_args
    "temperature": Rule(_lax_float, "a finite number in [0, 2]", _finite_in(0, 2)),  # _verify_args
    "top_p": Rule(_lax_float, "a number in (0, 1]", lambda v: 0 < v <= 1),  # _verify_args
    "top_k": Rule(_lax_int, "an integer >= -1 (0 or -1: off)", lambda v: v >= -1),  # _verify_args
    "min_p": Rule(_lax_float, "a number in [0, 1]", _in(0, 1)),  # _verify_args
    "repetition_penalty": Rule(_lax_float, "a finite number > 0",
                                lambda v: math.isfinite(v) and v > 0),  # _verify_args
    "length_penalty": Rule(_lax_float, "a number", null=False),  # length_penalty: float
    "seed": Rule(_lax_int, _INT64_TEXT, _in(*INT64)),  # Rule(None, ge=_INT64_MIN, le=_INT64_MAX)
    "priority": Rule(_lax_int, _INT64_TEXT, _in(*INT64), null=False),  # Rule(0, ge=_INT64_MIN, le=_INT64_MAX)
    "stop": Rule(_stop, "a string or a list of strings, none empty", all),  # str | list[str]; _verify_args
    "bad_words": Rule(_strs, "a list of non-empty strings", all, null=False),  # list[str]; _verify_args
    "stop_token_ids": Rule(_ints, "a list of integers"),  # list[int] | None
    "allowed_token_ids": Rule(_ints, "a non-empty list of token ids >= 0",  # _validate_allowed_token_ids
                               lambda v: bool(v) and min(v) >= 0),
    "logprob_token_ids": Rule(_ints, "a list of at most 128 token ids >= 0",  # _validate_logprobs
                               lambda v: len(v) <= 128 and all(t >= 0 for t in v)),
    "logit_bias": Rule(_bias, "an object from token ids (strings of integers >= 0) to numbers",
                        lambda v: all(map(_token_key, v))),  # dict[str, float]; from_optional, _validate_logit_bias
    "min_tokens": Rule(_lax_int, "an integer >= 0", lambda v: v >= 0, null=False),  # _verify_args
    "truncate_prompt_tokens": Rule(_lax_int, "an integer >= -1", _in(-1, INT64[1])),  # Rule(ge=-1, le=_INT64_MAX)
    "truncation_side": Rule(_one_of("left", "right"), "'left' or 'right'"),  # Literal["left", "right"] | None
    "prompt_logprobs": Rule(_raw_int, f"an integer in [0, {MAX_LOGPROBS}]",  # check_logprobs, _validate_logprobs
                             _in(0, MAX_LOGPROBS)),  # (-1, all the vocabulary, is over max_logprobs)
    "thinking_token_budget": Rule(_strict_int, "an integer >= -1",  # validate_thinking_token_budget
                                   lambda v: v >= -1),
    "request_id": Rule(_str, "a string", null=False),  # request_id: str
    **{name: Rule(_lax_bool, "a boolean", null=False) for name in (  # these are declared bool, not bool | None
        "use_beam_search", "include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
        "spaces_between_special_tokens", "add_special_tokens")},
    **{name: Rule(_lax_bool, "a boolean") for name in ("return_tokens_as_token_ids", "return_token_offsets")},
    **{name: Rule(_object, "an object") for name in (  # dict[str, Any] | None, or a model's object
        "kv_transfer_params", "ec_transfer_params", "response_format", "structured_outputs", "repetition_detection")},
}
COMPLETION_FIELDS: dict[str, Rule] = {
    **COMMON_FIELDS,
    "echo": Rule(_lax_bool, "a boolean"),  # echo: bool | None
    "suffix": Rule(_str, "a string"),  # suffix: str | None
    "logprobs": Rule(_raw_int, f"an integer in [0, {MAX_LOGPROBS}]",  # int | None; check_logprobs,
                      _in(0, MAX_LOGPROBS)),  # _validate_logprobs (max_logprobs)
}
CHAT_FIELDS: dict[str, Rule] = {
    **COMMON_FIELDS,
    "logprobs": Rule(_lax_bool, "a boolean"),  # logprobs: bool | None
    "top_logprobs": Rule(_raw_int, f"an integer in [0, {MAX_LOGPROBS}]",  # int | None; check_logprobs,
                          _in(0, MAX_LOGPROBS)),  # _validate_logprobs (-1 asks for the whole vocabulary)
    "tools": Rule(_array, "a non-empty list", bool),  # list[...] | None; check_tool_usage refuses []
    "documents": Rule(_list_of(_str_map), "a list of objects of strings"),  # list[dict[str, str]] | None
    "tool_choice": Rule(_tool_choice, "'none', 'auto', 'required' or an object"),  # Literal[...] | Named... | None
    "chat_template": Rule(_str, "a string"),  # chat_template: str | None
    "reasoning_effort": Rule(_one_of(*REASONING_EFFORTS),  # Literal["none", ..., "max"] | None
                             "one of " + ", ".join(map(repr, REASONING_EFFORTS))),
    **{name: Rule(_lax_bool, "a boolean", null=False) for name in (  # declared bool
        "echo", "include_reasoning", "add_generation_prompt", "continue_final_message",
        "return_assistant_tokens_mask")},
    **{name: Rule(_lax_bool, "a boolean") for name in ("parallel_tool_calls", "return_prompt_text")},
    **{name: Rule(_object, "an object") for name in ("chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs")},
}

# The validators that read two fields; they run before pydantic, on the raw JSON values.
# (chat: True, completions: False, both: None), param, refused(body, max_tokens or None), message.
CROSS_CHECKS: list[tuple[bool | None, str, Callable[[dict, int | None], Any], str]] = [
    (None, "min_tokens", lambda b, cap: cap is not None and _lax_int(b.get("min_tokens", 0)) > cap,  # _verify_args
     "min_tokens must be at most max_tokens ({cap}), got {value}"),
    (None, "prompt_logprobs", lambda b, cap: b.get("stream") and _lax_int(b.get("prompt_logprobs") or 0) > 0,
     "prompt_logprobs are not available when stream is true, got {value}"),  # check_logprobs
    (False, "logprob_token_ids", lambda b, cap: b.get("logprob_token_ids") and b.get("logprobs") is None,
     "logprob_token_ids needs logprobs set, got logprobs {logprobs}"),  # CompletionRequest.check_logprobs
    (True, "logprob_token_ids", lambda b, cap: b.get("logprob_token_ids") and not b.get("logprobs"),
     "logprob_token_ids needs logprobs true, got logprobs {logprobs}"),  # ChatCompletionRequest.check_logprobs
    (True, "top_logprobs", lambda b, cap: _lax_int(b.get("top_logprobs") or 0) > 0 and not b.get("logprobs"),
     "top_logprobs needs logprobs true, got logprobs {logprobs}"),  # ChatCompletionRequest.check_logprobs
    (True, "tool_choice", lambda b, cap: b.get("tool_choice") not in (None, "none") and b.get("tools") is None,
     "tool_choice {value} needs tools"),  # ChatCompletionRequest.check_tool_usage
    (True, "continue_final_message",  # ChatCompletionRequest.check_generation_prompt
     lambda b, cap: b.get("continue_final_message") and b.get("add_generation_prompt"),
     "continue_final_message and add_generation_prompt cannot both be true"),
]


# Fields vLLM 0.26.0 acts on by changing what the response holds, which sim serve cannot do: a
# value other than the default is refused (400), not ignored ("echo": true was a 200 without the
# prompt). (chat: True, completions: False, both: None), field, asked(value as read), what vLLM does.
# Accepted on purpose, and documented (README, `sim.serve`): the fields that choose among a model's
# tokens or end its output early (temperature, top_p, seed, logit_bias, stop, stop_token_ids,
# bad_words, min_tokens...), as the stand-in has no model: its output is always max_tokens of filler.
UNHONOURED: list[tuple[bool | None, str, Callable[[Any], bool], str]] = [
    (None, "echo", lambda v: v is True, "echo the prompt in the response; leave echo out or false"),
    (False, "logprobs", lambda v: v is not None, "return log probabilities; leave logprobs out or null"),
    (True, "logprobs", lambda v: v is True, "return log probabilities; leave logprobs out or false"),
    (None, "prompt_logprobs", lambda v: v is not None,
     "return the prompt's log probabilities; leave prompt_logprobs out or null"),
    (None, "use_beam_search", lambda v: v is True, "run beam search; leave use_beam_search out or false"),
    (None, "return_tokens_as_token_ids", lambda v: v is True,
     "write each token as 'token_id:N'; leave return_tokens_as_token_ids out or false"),
    (None, "structured_outputs", lambda v: v is not None,
     "constrain the output to it; leave structured_outputs out or null"),
    (None, "response_format", lambda v: v is not None and v.get("type", "text") != "text",
     "constrain the output to it; leave response_format out, null or {\"type\": \"text\"}"),
]


def unhonoured_field_problem(body: dict[str, Any], chat: bool) -> tuple[str, str] | None:
    """(field, message) for a value vLLM acts on and sim serve cannot, or None; after
    `vllm_field_problem`, so each value has its declared type (read as vLLM reads it: "yes" is true)."""
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for where, name, asked, what in UNHONOURED:
        if where not in (None, chat) or body.get(name) is None:
            continue
        if asked(fields[name].read(body[name])):
            return name, f"{name} {as_json(body[name])}: sim serve does not support it; vLLM would {what}"
    return None


def as_json(value: Any, limit: int = 60) -> str:
    """A value as the client wrote it (JSON), cut to ``limit`` characters, for errors."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):  # a LongInt names its length
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def vllm_field_problem(body: dict[str, Any], chat: bool, max_tokens: int | None) -> tuple[str, str] | None:
    """(field, message) for a value vLLM 0.26.0 refuses with 400, of the wrong type or out of its
    range, or None (``max_tokens``: the request's, None for a chat request that left it to the engine)."""
    for name, field in (CHAT_FIELDS if chat else COMPLETION_FIELDS).items():
        if name not in body:
            continue
        value = body[name]
        read = _BAD if value is None and not field.null else None if value is None else field.read(value)
        if read is _BAD or (read is not None and not field.ok(read)):
            return name, f"{name} must be {field.expected}{'' if field.null else ' (not null)'}, got {as_json(value)}"
    for where, name, refused, message in CROSS_CHECKS:
        if where in (None, chat) and refused(body, max_tokens):
            return name, message.format(cap=max_tokens, value=as_json(body.get(name)),
                                        logprobs=as_json(body.get("logprobs")))
    return None
