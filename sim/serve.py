"""``python -m sim serve``: an OpenAI-compatible stand-in engine timed by the simulator.

It speaks enough of vLLM's OpenAI server for the gateway and the replayer:
``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream``), ``GET /v1/models``, ``GET /health``, and a debug ``GET /stats``;
with ``--api-key KEY`` (or ``VLLM_API_KEY``, as vllm serve), ``/v1`` refuses
a request without ``Authorization: Bearer KEY`` with vLLM's 401
(`sim.openai_api.api_key_guard`).
Every response is timed in real time by one simulated replica
(`sim.realtime.RealtimeEngine`: `sim.replica.Replica` + `sim.core.SchedulerCore`
+ `sim.kvcache.KVCache` + a latency model from `sim.latency.build`).

What a request gets:

* ``max_tokens`` filler tokens (default 16), always exactly that many: the
  stand-in has no EOS, so ``ignore_eos`` changes nothing. Each token's text
  is ``" tok"``; its id is deterministic per engine and request
  (`sim.filler_tokens.filler_ids`) and is returned as ``token_ids`` in each choice
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
import sys
import time
import uuid
from typing import Any, Callable

from aiohttp import web

from sim.config import ExperimentConfig, LatencyConfig
from sim.core import POLICY_CLASSES
from sim.http_site import run_site
from sim.latency import MAX_STEP_SECONDS, MIN_STEP_SECONDS, latency_notes
from sim.openai_api import (
    MAX_BODY,
    XARGS,
    ParsedRequest,
    RequestError,
    api_key_guard,
    error_body,
    error_response,
    parse_request,
    router_errors,
    sse_error,
)
from sim.realtime import CallHandle, Conflict, EngineFailed, RealtimeEngine, TooLarge
from traces.argtypes import StrictParser, api_key, api_key_or_env, int_at_least, nonblank, number, port_number
from traces.validate import parse_json_int

TOKEN_TEXT = " tok"
POSITIVE_INT = int_at_least(1)  # engine limits: 0 would start an engine that never schedules


class SimServer:
    """The HTTP face of one `RealtimeEngine`."""

    def __init__(self, engine: RealtimeEngine, served_model: str, expire_interval: float = 10.0,
                 api_key: str | None = None):
        self.engine = engine
        self.served_model = served_model
        self.expire_interval = expire_interval
        self.api_key = api_key  # vLLM's --api-key: /v1 takes it (`sim.openai_api.api_key_guard`)
        self._expiry: asyncio.Task | None = None

    def app(self) -> web.Application:
        guard = [api_key_guard(self.api_key)] if self.api_key is not None else []
        app = web.Application(client_max_size=MAX_BODY, middlewares=[*guard, router_errors])
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
             "max_model_len": self.engine.max_model_len}]})

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
            if req.max_tokens is None:  # a chat reply without a cap: the context left, as vLLM's get_max_tokens
                # (with no end-of-sequence token here, as with vLLM on dummy weights, it runs that long)
                req = dataclasses.replace(req, max_tokens=max(self.engine.longest_call - len(req.prompt_ids), 1))
            handle = self.engine.submit(req.prompt_ids, req.max_tokens, req.program_id, req.thread_id,
                                        req.program_service, req.kv_ttl, req.cache_salt, req.total_service)
        except RequestError as exc:
            return error_response(exc.status, exc.message, exc.param)
        except TooLarge as exc:
            return error_response(400, str(exc), exc.param)
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
    given = {path: getattr(args, attr) for path, _, attr in CONFIG_FLAGS if getattr(args, attr) is not None}
    changes = {key: value for (section, key), value in given.items() if section == "engine"}
    if args.model is not None and not args.experiment:
        # As an experiment that leaves the count unset (`sim.experiments`): the GPUs the model
        # is served on, its spec's tensor_parallel (70B: 4); 70B on the default 1 did not fit.
        from sim.hardware import load_model

        changes.setdefault("gpus_per_replica", load_model(args.model).tensor_parallel)
    if args.max_num_batched_tokens is not None and args.max_num_seqs is None and args.experiment:
        # As vllm serve (engine/arg_utils.py): a budget given without a sequence cap lowers the cap to fit
        # it, where both given must satisfy budget >= cap (`sim.experiments._check_engine`).
        changes["max_num_seqs"] = min(eng.max_num_seqs, args.max_num_batched_tokens)
    eng = dataclasses.replace(eng, **changes)
    if not args.experiment:
        # `vllm serve`'s cap and budget for the model and GPU served, unless given, as an experiment
        # that leaves them unset gets them (an experiment's are its own, as resolved)
        from sim.experiments import serve_batch_limits

        eng = serve_batch_limits(eng, seqs_unset=args.max_num_seqs is None,
                                 budget_unset=args.max_num_batched_tokens is None)
    # --latency sets only the kind: the experiment's efficiencies and overhead stay
    lat = dataclasses.replace(cfg.latency, **{key: value for (section, key), value in given.items()
                                              if section == "latency"})
    _check_latency_flags(args, lat.kind)
    _check_step_seconds(args.step_seconds)
    cfg = dataclasses.replace(cfg, engine=eng, latency=lat)
    from sim.experiments import check_flags

    check_flags(cfg, _flag_labels(args), args.experiment)
    return cfg


# The flags that set a key of the engine or latency configuration, as (key path, flag, attribute):
# `build_config` applies them and `_flag_labels` names them in an error.
CONFIG_FLAGS = tuple(
    (path, "--" + attr.replace("_", "-"), attr) for path, attr in (
        (("engine", "model"), "model"), (("engine", "gpu"), "gpu"), (("engine", "num_gpu_blocks"), "num_gpu_blocks"),
        (("engine", "gpus_per_replica"), "gpus_per_replica"), (("engine", "max_num_seqs"), "max_num_seqs"),
        (("engine", "max_num_batched_tokens"), "max_num_batched_tokens"),
        (("engine", "max_model_len"), "max_model_len"), (("latency", "kind"), "latency"),
        (("latency", "seconds"), "step_seconds"), (("latency", "name"), "latency_name"))
)


def _flag_labels(args: argparse.Namespace) -> dict[tuple[str, ...], str]:
    """Each configuration key a flag set, labelled as the flag was given (an error names it)."""
    return {path: f"{flag} {getattr(args, attr)}" for path, flag, attr in CONFIG_FLAGS
            if getattr(args, attr) is not None}


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
    p.add_argument("--step-seconds", type=number,
                   help=f"step time of the constant latency model (default: the --experiment's, else "
                        f"{LatencyConfig().seconds:g})")
    p.add_argument("--latency-name", help="fitted latency model name or path")
    p.add_argument("--num-gpu-blocks", type=POSITIVE_INT, help="KV capacity in blocks (default: from the specs)")
    p.add_argument("--max-model-len", type=POSITIVE_INT,
                   help="as vllm serve's: the longest prompt + max_tokens taken (default: the model's context)")
    p.add_argument("--max-num-seqs", type=POSITIVE_INT)
    p.add_argument("--max-num-batched-tokens", type=POSITIVE_INT)
    p.add_argument("--api-key", type=api_key, metavar="KEY",
                   help="as vllm serve's: requests to /v1 need 'Authorization: Bearer KEY', else 401 "
                        "(default: $VLLM_API_KEY, as vllm serve reads it, else none)")


async def serve(server: SimServer, host: str, port: int) -> web.AppRunner:
    """Start ``server`` on host:port; returns the runner (``await runner.cleanup()`` to stop)."""
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def main(argv: list[str]) -> int:
    parser = StrictParser(prog="python -m sim serve",
                                     description="Serve an OpenAI-compatible API timed by the simulated engine.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        key = api_key_or_env(args.api_key, "VLLM_API_KEY")
        cfg = build_config(args)
        policy = serve_policy(args, cfg)
        engine = RealtimeEngine(cfg, policy, args.index)
    except (ValueError, OSError) as exc:
        print(f"python -m sim serve: error: {exc}", file=sys.stderr)
        return 1
    for note in latency_notes(cfg):
        print(f"sim serve: {note}", file=sys.stderr)
    if cfg.engine.replicas > 1:
        print(f"sim serve: note: this is one engine; the experiment's {cfg.engine.replicas} replicas and its "
              f"{cfg.engine.balancer} balancer are the gateway's part (python -m engine gateway), not this "
              "process's", file=sys.stderr)
    server = SimServer(engine, args.served_model_name, api_key=key)
    def banner(url: str) -> str:
        return (f"sim serve: engine {args.index} ({cfg.engine.model} on {cfg.engine.gpu}, latency {cfg.latency.kind}, "
                f"policy {policy}) on {url}")

    return run_site(server.app(), args.host, args.port, "python -m sim serve", banner)
