"""``python -m engine replay TRACE --target URL|inprocess``: run a trace against a real engine.

Every call is an asyncio task: it waits for its program's arrival, for its
parents' completion, then for its ``delay`` (tool/think time), and sends one
streamed completion request of token ids (`engine.tokens`: the trace's
prefix sharing, and a continued call re-sends the ids its ancestor actually
received) with ``max_tokens`` = the trace's output tokens and
``ignore_eos: true``. Program and thread ids go both as headers (for the
gateway) and as ``vllm_xargs`` (for a bare vLLM server or ``sim serve``).
With ``--kv-ttl SECONDS`` every call that has children in its program's DAG
also carries ``kv_ttl`` there: the engine keeps its KV cached for that long
or until the program's next call takes it up (Continuum's time-to-live; the
vLLM plugin's `engine.kv_pins`, ``sim serve``'s replica). A replay cannot
know whether a chat user will reply, but a trace does.

Once all of a program's calls are done, the replay ends it on the target
with ``DELETE /v1/programs/{id}`` (the gateway forgets it rather than
holding it for its ``--ttl``); ``--keep-programs`` leaves it. A bare engine
has no such route: its process table expires programs on its own.

Results are written in the simulator's format (`sim.metrics`), so a replay
and a simulation compare with the same tools: ``calls.csv``,
``programs.csv``, ``summary.json``, plus ``replay.json`` (trace path, policy,
target, latency model label, and which service definition was used) that
``python -m engine validate`` reads.

Times are seconds since the replay started (the trace's zero). What each
column means for a replay:

* ``arrival``: when the request was sent; ``first_token`` and ``finish``:
  when the first token chunk and the end of the stream arrived (client clock);
* ``service``, ``waiting``, ``first_scheduled``, ``preemptions``: engine-side
  quantities the client cannot observe. When the engine reports them
  (``engine_stats`` from ``sim serve``) they are taken from there
  (``first_scheduled`` = arrival + the engine's arrival-to-schedule delay).
  Otherwise service is the client-observed decode span ``finish -
  first_token`` (it leaves out the prefill and includes preemption stalls
  during decoding), waiting is ``(finish - arrival) - service``,
  ``first_scheduled`` is -1 (unknown) and ``preemptions`` 0.
  With ``--target inprocess`` they come from vLLM's per-request stats
  (`engine.replay_targets.vllm_stats`: service is vLLM's "inference time", last token minus first
  scheduled). ``replay.json`` records which definition each call used;
* ``prefix_hit_tokens``: ``engine_stats`` or the usage's
  ``prompt_tokens_details.cached_tokens`` (vLLM with
  ``--enable-prompt-tokens-details``), else 0;
* ``engine``: the gateway's ``X-Gateway-Engine`` header, else the engine's
  own index, else 0.

``--policy`` labels the rows; against a URL it is whatever the server runs
(start the engines with that policy). ``--target inprocess`` starts vLLM's
``AsyncLLM`` in this process with the program-aware scheduler plugin and
passes the policy in ``additional_config``; it needs a GPU and vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from engine.protocol import (
    ID_MAX_LEN,
    PROGRAM_HEADER,
    THREAD_HEADER,
    BadRequest,
    base_of_api_path,
    check_id,
)
from engine.replay_targets import (
    END_FAILED,
    NO_TABLE,
    CallResult,
    Clock,
    HTTPTarget,
    InprocessTarget,
    ReplayError,
    Target,
    inprocess_problem,
)
from engine.tokens import fallback_output_ids, prompt_ids
from sim.core.params import MAX_SECONDS
from sim.metrics import summarize_run, write_calls_csv, write_programs_csv
from sim.records import CallRecord, ProgramRecord
from traces.format import Call, Program
from traces.argtypes import api_key, api_key_or_env, nonblank, number
from traces.io import digest

REPLAY_JSON = "replay.json"
OUTPUTS = ("calls.csv", "programs.csv", "summary.json", REPLAY_JSON)


# -- the replay -----------------------------------------------------------------------------


@dataclass
class Replayer:
    programs: Sequence[Program]
    target: Target
    policy: str
    kv_ttl: float = 0.0  # pin seconds sent with every call that has children
    records: list[CallRecord] = field(default_factory=list)
    program_records: list[ProgramRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    service_source: dict[str, int] = field(default_factory=lambda: {"engine": 0, "client_decode_span": 0})
    token_mismatches: int = 0
    without_output_ids: int = 0  # calls answered without token ids: their children re-send stand-ins
    skipped: int = 0  # calls never sent because a parent failed
    end_programs: bool = True  # end each program on the target once its calls are done
    program_ends: dict[str, int] = field(default_factory=dict)
    program_end_errors: list[str] = field(default_factory=list)
    clock: Clock | None = None  # set when the replay starts

    async def run(self) -> float:
        """Replay every program; returns the wall time taken."""
        self.clock = Clock(asyncio.get_running_loop().time())
        await asyncio.gather(*(self._program(p, self.clock) for p in self.programs))
        return self.clock.now()

    async def _program(self, program: Program, clock: Clock) -> None:
        await clock.until(program.arrival)
        done = {c.id: asyncio.Event() for c in program.calls}
        ok: dict[str, bool] = {}
        contexts: dict[str, list[int]] = {}
        mine: list[CallRecord] = []
        pinned = {p for c in program.calls for p in c.parents} if self.kv_ttl > 0 else set()
        await asyncio.gather(*(self._call(program, c, clock, done, ok, contexts, mine, pinned) for c in program.calls))
        if len(mine) == len(program.calls):
            self.program_records.append(program_record(self.policy, program, mine))
        if self.end_programs:
            await self._end(program)

    async def _end(self, program: Program) -> None:
        """End the program on the target; its latency is already taken, so a failure is counted, not fatal."""
        end = getattr(self.target, "end_program", None)
        if end is None:  # in-process: the plugin's table lives in the engine core, out of reach
            outcome = NO_TABLE
        else:
            try:
                outcome = await end(program.id)
            except ReplayError as exc:
                self.program_end_errors.append(str(exc))
                outcome = END_FAILED
        self.program_ends[outcome] = self.program_ends.get(outcome, 0) + 1

    async def _call(self, program: Program, call: Call, clock: Clock, done: dict[str, asyncio.Event],
                    ok: dict[str, bool], contexts: dict[str, list[int]], mine: list[CallRecord],
                    pinned: set[str]) -> None:
        try:
            for p in call.parents:
                await done[p].wait()
            if not all(ok.get(p, False) for p in call.parents):
                ok[call.id] = False
                self.skipped += 1
                return
            if call.delay > 0:
                await asyncio.sleep(call.delay)
            prompt = prompt_ids(program, call, contexts)
            arrival = clock.now()
            try:
                res = await self.target.send(prompt, call.output_tokens, program.id, call.id, clock,
                                             self.kv_ttl if call.id in pinned else 0.0)
            except ReplayError as exc:
                self.errors.append(str(exc))
                ok[call.id] = False
                return
            except Exception as exc:  # noqa: BLE001  one call's surprise must not discard the whole replay
                self.errors.append(f"program {program.id} call {call.id}: {type(exc).__name__}: {exc}")
                ok[call.id] = False
                return
            if res.output_tokens != call.output_tokens:
                self.token_mismatches += 1
            if res.output_ids is None:
                self.without_output_ids += 1
            outputs = res.output_ids if res.output_ids is not None else fallback_output_ids(program, call)
            contexts[call.id] = prompt + outputs
            record = self._record(program, call, arrival, res)
            self.records.append(record)
            mine.append(record)
            ok[call.id] = True
        finally:
            done[call.id].set()

    def _record(self, program: Program, call: Call, arrival: float, res: CallResult) -> CallRecord:
        stats = res.stats or {}
        if isinstance(stats.get("service"), (int, float)):
            source = str(stats.get("source", "engine"))
            self.service_source[source] = self.service_source.get(source, 0) + 1
            service = float(stats["service"])
            waiting = float(stats.get("waiting", (res.finish - arrival) - service))
            after = stats.get("first_scheduled_after")
            first_scheduled = arrival + float(after) if isinstance(after, (int, float)) else -1.0
        else:
            self.service_source["client_decode_span"] += 1
            service = res.finish - res.first_token
            waiting = (res.finish - arrival) - service
            first_scheduled = -1.0
        hits = stats.get("prefix_hit_tokens")
        if not isinstance(hits, int):
            hits = res.cached_tokens or 0
        return CallRecord(
            policy=self.policy, program_id=program.id, call_id=call.id, engine=res.engine,
            prompt_tokens=call.prompt_tokens, output_tokens=call.output_tokens, arrival=arrival,
            first_scheduled=first_scheduled, first_token=res.first_token, finish=res.finish, waiting=waiting,
            service=service, preemptions=int(stats.get("preemptions", 0) or 0), prefix_hit_tokens=hits,
        )


def program_record(policy: str, program: Program, calls: Sequence[CallRecord]) -> ProgramRecord:
    """A program's row, computed exactly as the simulator's `Cluster._record_program`."""
    finish = max(r.finish for r in calls)
    out = sum(c.output_tokens for c in program.calls)
    waiting = sum(r.waiting for r in calls)
    service = sum(r.service for r in calls)
    latency = finish - program.arrival
    return ProgramRecord(
        policy=policy, program_id=program.id, workload=program.workload, arrival=program.arrival, finish=finish,
        calls=len(program.calls), output_tokens=out, latency=latency,
        normalized_latency=latency / out if out else 0.0, waiting=waiting, service=service,
        waiting_share=waiting / (waiting + service) if waiting + service > 0 else 0.0,
    )


@dataclass
class ReplaySettings:
    trace: str
    target: str
    policy: str
    out: str
    model: str | None = None
    latency: str | None = None  # label of the engine's latency model, for validate
    name: str | None = None
    request_timeout: float | None = None
    kv_ttl: float = 0.0
    # Mixed into every call's first KV block hash (vLLM's ``cache_salt``), so a replay never hits
    # blocks an earlier run left on the same engine: its cache starts as cold as the simulator's.
    cache_salt: str | None = None
    # Send DELETE /v1/programs/{id} as each program ends (off: the gateway keeps them for --ttl, to inspect).
    end_programs: bool = True


async def replay(programs: Sequence[Program], target: Target, settings: ReplaySettings) -> dict[str, Any]:
    """Replay ``programs`` on ``target`` and write the outputs; returns the summary document."""
    r = Replayer(programs, target, settings.policy, settings.kv_ttl, end_programs=settings.end_programs)
    try:
        wall = await r.run()
    except asyncio.CancelledError:
        # Ctrl-C: keep what finished. Those programs saw the same arrivals up to
        # the stop as in a whole replay, so `engine validate` can still compare them.
        write_outputs(r, settings, r.clock.now() if r.clock is not None else 0.0, interrupted=True)
        raise
    return write_outputs(r, settings, wall)


def write_outputs(r: Replayer, settings: ReplaySettings, wall: float, interrupted: bool = False) -> dict[str, Any]:
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    order = {p.id: i for i, p in enumerate(r.programs)}
    calls = sorted(r.records, key=lambda c: (c.arrival, order[c.program_id], c.call_id))
    programs = sorted(r.program_records, key=lambda p: order[p.program_id])
    write_calls_csv(out / "calls.csv", calls)
    write_programs_csv(out / "programs.csv", programs)
    stats = {"wall_time": wall, "failed_calls": float(len(r.errors)), "skipped_calls": float(r.skipped),
             "token_mismatches": float(r.token_mismatches),
             "unfinished_programs": float(len(r.programs) - len(programs))}
    name = settings.name or Path(settings.trace).stem
    summary = summarize_run(name, [(settings.policy, calls, programs, stats)])
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    meta = {
        "trace": str(Path(settings.trace).resolve()), "policy": settings.policy, "target": settings.target,
        "model": getattr(r.target, "model", settings.model), "latency": settings.latency, "name": name,
        "kv_ttl": settings.kv_ttl, "programs": len(r.programs), "calls": sum(len(p.calls) for p in r.programs),
        "finished_programs": len(programs),  # programs.csv's rows: `engine validate` refuses a file cut since
        "trace_sha256": digest(r.programs),  # `engine validate` refuses a trace that no longer matches
        "cache_salt": settings.cache_salt,
        # Where the engine's prefix cache cannot match the simulation's (`engine validate` notes them).
        "token_mismatches": r.token_mismatches, "calls_without_output_ids": r.without_output_ids,
        "service_source": r.service_source, "errors": r.errors[:100], "interrupted": interrupted,
        "end_programs": settings.end_programs, "program_ends": dict(sorted(r.program_ends.items())),
        "program_end_errors": r.program_end_errors[:100],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / REPLAY_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return summary


# -- CLI ----------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "replay",
        help="replay a trace against an engine (gateway, vLLM, sim serve, or vLLM in-process)",
        description="Replay TRACE honouring arrivals, the call DAG and delays; write calls.csv, programs.csv, "
                    "summary.json (the simulator's format) and replay.json to --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("examples:\n"
                "  python -m engine replay trace.jsonl --target http://127.0.0.1:8000 --policy plas --out r/plas\n"
                "  python -m engine replay trace.jsonl --target inprocess --policy atlas --out r/atlas\n"
                "  python -m engine validate r/plas --experiment quickstart"),
    )
    p.add_argument("trace", metavar="TRACE", help="trace file (JSON Lines)")
    p.add_argument("--target", required=True, help="base URL of an OpenAI-compatible server, or 'inprocess'")
    p.add_argument("--policy", required=True, help="policy label of this run (inprocess: the policy to run)")
    p.add_argument("--out", help="output directory (default: results/replay-POLICY)")
    p.add_argument("--model", type=nonblank, help="model name for requests (default: the server's first /v1/models entry)")
    p.add_argument("--latency", metavar="KIND[:DETAIL]",
                   help="label of the engine's latency model, recorded for validate: KIND one of "
                        f"{', '.join(LATENCY_KINDS)} (e.g. constant:0.005, fitted:a100-llama-3.1-8b, real:a100)")
    p.add_argument("--name", help="run name in summary.json (default: the trace's file name)")
    p.add_argument("--request-timeout", type=number, help="seconds before one call is given up (default: none)")
    p.add_argument("--workdir", help="inprocess: where to write the model config.json")
    p.add_argument("--kv-ttl", type=number, default=0.0, metavar="SECONDS",
                   help="tag each call that has children with kv_ttl=SECONDS: the engine keeps its KV cached "
                        "for the program's next call (default 0: no pins)")
    p.add_argument("--cache-salt", metavar="TEXT",
                   help="vLLM's cache_salt for every call, so this replay shares no KV blocks with earlier runs "
                        "on the same engine (default: a fresh random salt; '' sends none, to reuse a warm cache)")
    p.add_argument("--api-key", type=api_key, metavar="KEY",
                   help="sent as 'Authorization: Bearer KEY' with every request: the --api-key of the target "
                        "(the gateway, vLLM or sim serve) (default: $OPENAI_API_KEY, as vLLM's benchmark client "
                        "reads it, else none; not recorded)")
    p.add_argument("--keep-programs", action="store_true",
                   help="do not end each program on the target when its calls are done (by default the replay "
                        "sends DELETE /v1/programs/ID, as an agent framework would; kept, the gateway's "
                        "/programs view still lists them after the replay, until its --ttl)")
    p.set_defaults(run=run)
    return p


# The kinds a --latency label may name: sim serve's latency models (`sim.latency.KINDS`, which
# `engine validate` compares with the experiment's) and a real engine's GPU.
LATENCY_KINDS = ("constant", "roofline", "fitted", "real")


def latency_label_problem(label: str) -> str | None:
    """Why a --latency label is not ``KIND`` or ``KIND:DETAIL`` of a known kind, or None. A typo
    (``constnat:0.01``) was recorded, and `engine validate` then passed over the kind it did not know."""
    kind, colon, detail = label.partition(":")
    forms = (f"expected KIND or KIND:DETAIL, KIND one of {', '.join(LATENCY_KINDS)} "
             "(e.g. constant:0.005, fitted:a100-llama-3.1-8b, real:a100)")
    if kind not in LATENCY_KINDS:
        return f"--latency {label}: unknown kind {kind!r}; {forms}"
    if colon and not detail.strip():
        return f"--latency {label}: empty DETAIL after {kind + ':'!r}; {forms}"
    return None


def option_problem(args: argparse.Namespace, out: str) -> str | None:
    """What is wrong with the options, found before a replay that may take hours
    (an --out that is a file used to fail only when the results were written)."""
    from sim.core.policies import POLICY_CLASSES

    if args.policy not in POLICY_CLASSES:
        return f"--policy {args.policy}: unknown policy; valid choices: {', '.join(POLICY_CLASSES)}"
    if args.target != "inprocess":
        try:  # urlsplit and .port raise ValueError on an unclosed IPv6 bracket or a non-numeric port
            url = urllib.parse.urlsplit(args.target)
            ok = url.scheme in ("http", "https") and bool(url.hostname) and (url.port is None or url.port > 0)
        except ValueError:
            ok = False
        if not ok:
            return f"--target {args.target}: expected a base URL such as http://HOST:PORT, or 'inprocess'"
        problem = target_path_problem(url)
        if problem:
            return f"--target {args.target}: {problem}"
    elif args.api_key is not None:
        return "--api-key: the in-process engine has no HTTP server to take a key; drop --api-key or give --target URL"
    problem = None if args.latency is None else latency_label_problem(args.latency)
    if problem:
        return problem
    if not (math.isfinite(args.kv_ttl) and 0 <= args.kv_ttl <= MAX_SECONDS):  # the engines refuse more
        return f"--kv-ttl: expected seconds from 0 to {MAX_SECONDS:g}, got {args.kv_ttl}"
    timeout = args.request_timeout
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        return f"--request-timeout: expected seconds > 0, got {timeout}"
    if not out.strip():
        return f"--out {out!r}: expected a directory path"
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out}: exists and is not a directory"
    return None


def target_path_problem(url: urllib.parse.SplitResult) -> str | None:
    """Why --target is not the server's base URL, to which the replay appends /v1/models,
    /v1/completions and /v1/programs/ID, or None. A path ending in /v1 (or /v1/completions) asked
    for /v1/v1/models (a 404, reported as "cannot learn the model name ('data')"); a ?query or
    #fragment cannot be part of a base URL."""
    base = base_of_api_path(url)
    if base is not None:
        return (f"the replay appends /v1/... to it itself; expected the server's base URL, without /v1 "
                f"(here {base})")
    if url.query or url.fragment:
        return "a base URL takes no ?query or #fragment, as the replay appends /v1/... to it"
    return None


def out_problem(out: str) -> str | None:
    """Make the --out directory and check it takes files, before the replay: a parent that
    is a file, or a directory that is not writable, was found only when the results were written."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        return f"--out {out}: cannot write there: {exc.strerror or exc}"
    return None


def http_id_problem(trace: str, programs: Sequence[Program]) -> str | None:
    """The first program or call id an HTTP target cannot send, located in the trace.

    Ids travel in headers (X-Program-Id, X-Thread-Id) and the gateway accepts
    only [A-Za-z0-9._:-], up to 128 characters; the trace format allows any
    text. Found after the replay, every call would have failed (a newline
    even stopped it with a traceback). ``programs`` are in file order, one
    per line.
    """
    for line, program in enumerate(programs, 1):
        for value, what in ((program.id, f"program {program.id!r}: field 'id'"),
                            *((c.id, f"program {program.id!r} call {c.id!r}: field 'id'") for c in program.calls)):
            try:
                check_id(value, "id")
            except BadRequest as exc:
                return (f"{trace}:{line}: {what}: {exc.message.removeprefix('id ')}; an HTTP target sends ids "
                        f"as headers ({PROGRAM_HEADER}, {THREAD_HEADER}), which take [A-Za-z0-9._:-] only, "
                        f"at most {ID_MAX_LEN} characters")
    return None


def run(args: argparse.Namespace) -> int:
    prog = "python -m engine replay"
    out = os.path.join("results", f"replay-{args.policy}") if args.out is None else args.out
    problem = option_problem(args, out)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    try:  # the in-process engine takes no key: one in the environment is not meant for it
        key = api_key_or_env(args.api_key, "OPENAI_API_KEY") if args.target != "inprocess" else None
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.target == "inprocess":
        problem = inprocess_problem()
        if problem:
            print(f"{prog}: --target inprocess: {problem}", file=sys.stderr)
            return 1
    from traces.io import load_all
    from traces.validate import TraceError

    try:
        in_file_order = load_all(args.trace)
    except (TraceError, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None:  # as the other commands word it
            exc = f"{exc.filename}: {'no such file' if isinstance(exc, FileNotFoundError) else exc.strerror}"
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    problem = http_id_problem(args.trace, in_file_order) if args.target != "inprocess" else None
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 1
    problem = out_problem(out)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    programs = sorted(in_file_order, key=lambda p: p.arrival)
    salt = f"replay-{uuid.uuid4().hex}" if args.cache_salt is None else (args.cache_salt or None)
    settings = ReplaySettings(trace=args.trace, target=args.target, policy=args.policy, kv_ttl=args.kv_ttl,
                              out=out, model=args.model,
                              latency=args.latency, name=args.name, request_timeout=args.request_timeout,
                              cache_salt=salt, end_programs=not args.keep_programs)

    async def go() -> dict[str, Any]:
        if args.target == "inprocess":
            target: Any = InprocessTarget(args.policy, args.workdir, cache_salt=salt)
        else:
            target = HTTPTarget(args.target, args.model, args.request_timeout, salt, key)
        async with target:
            return await replay(programs, target, settings)

    started = time.time()
    try:
        summary = asyncio.run(go())
    except ReplayError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        meta = Path(settings.out) / REPLAY_JSON
        written = meta.exists() and meta.stat().st_mtime >= started  # not an earlier replay's
        where = f"the programs that finished are in {settings.out}" if written else "nothing was written"
        print(f"{prog}: interrupted; {where}", file=sys.stderr)
        return 130
    pol = summary["policies"][args.policy]
    failed, skipped = int(pol["stats"]["failed_calls"]), int(pol["stats"]["skipped_calls"])
    mean_latency = pol["program_latency_mean"]
    print(f"{pol['programs']} programs, {pol['calls']} calls; mean program latency "
          f"{'-' if mean_latency is None else f'{mean_latency:.3f} s'}; results in {settings.out}")
    ends = json.loads((Path(settings.out) / REPLAY_JSON).read_text(encoding="utf-8"))["program_ends"]
    if ends.get(END_FAILED):
        print(f"{prog}: {ends[END_FAILED]} programs could not be ended on the target (their results stand); "
              f"see program_end_errors in {settings.out}/{REPLAY_JSON}", file=sys.stderr)
    if failed:
        print(f"{prog}: {failed} calls failed and {skipped} more were not sent (a parent had failed); "
              f"see {settings.out}/{REPLAY_JSON}", file=sys.stderr)
        return 1
    return 0
