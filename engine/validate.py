"""``python -m engine validate REPLAY_DIR... --experiment NAME``: simulator vs real engine.

For each replay directory (written by ``python -m engine replay``) it reads
the trace path and the policy from ``replay.json`` and the measured program
rows from ``programs.csv``, simulates the same trace under the same policy
with the experiment's engine and latency model (`sim.simulate.simulate`),
and prints, per policy, the mean, p50 and p95 program latency, simulated
against measured, with the error ``(simulated - measured) / measured`` in
percent. Only programs present in both (a replay may lose programs to
failed calls) enter the comparison; the whole trace is simulated either way
so the load is the same. A replay made with ``--kv-ttl S`` is simulated with
``engine.kv_ttl = S`` (and one without, with 0), whatever the experiment
says, so pins are compared with pins; its rows are labelled
``POLICY (kv_ttl S s)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sim.core.params import MAX_SECONDS
from sim.core.policies import POLICY_CLASSES
from sim.hardware import json_key_line  # `path:LINE` of a JSON key, as spec files name theirs
from sim.metrics import mean, percentile, read_programs_csv
from sim.textout import aligned
from traces.argtypes import path_problem
from traces.validate import TraceError, parse_json_int, show, unique_keys

REPLAY_JSON = "replay.json"
METRICS = (("mean", lambda v: mean(v)), ("p50", lambda v: percentile(v, 50)), ("p95", lambda v: percentile(v, 95)))


class ValidationError(ValueError):
    """A replay directory that cannot be validated (missing or inconsistent files)."""


@dataclass
class Replayed:
    directory: Path
    trace: str
    policy: str
    latency: str | None
    latencies: dict[str, float]  # program id -> measured program latency
    kv_ttl: float = 0.0  # the replay's --kv-ttl
    trace_sha256: str | None = None  # `traces.io.digest` of the programs replayed (older replays lack it)
    token_mismatches: int = 0  # calls whose engine gave another count of output tokens than the trace's
    calls_without_output_ids: int = 0  # calls answered without token ids (their children re-sent stand-ins)

    @property
    def label(self) -> str:
        return f"{self.policy} (kv_ttl {self.kv_ttl:g} s)" if self.kv_ttl > 0 else self.policy


def _read_meta(meta_path: Path, d: Path) -> tuple[dict[str, Any], str]:
    """replay.json's object and text; a key given twice, or nesting too deep to parse, is refused."""
    text = ""
    try:
        text = meta_path.read_text(encoding="utf-8")
        meta = json.loads(text, object_pairs_hook=unique_keys, parse_int=parse_json_int)
    except FileNotFoundError:
        raise ValidationError(f"{meta_path}: not found; is {d} a replay directory?") from None
    except IsADirectoryError:
        raise ValidationError(f"{meta_path}: is a directory, expected the replay's JSON file") from None
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{meta_path}: invalid JSON: {exc}") from None
    except TraceError as exc:  # unique_keys: json would keep the last value silently
        raise ValidationError(f"{json_key_line(meta_path, text, exc.field, 2)}: field {exc.field!r}: duplicate key") from None
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{meta_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ValidationError(f"{meta_path}: invalid JSON: nested too deeply") from None
    if not isinstance(meta, dict):
        raise ValidationError(f"{meta_path}: expected a JSON object (as python -m engine replay writes), "
                              f"got {type(meta).__name__}")
    return meta, text


def load_replay(directory: str | Path) -> Replayed:
    d = Path(directory)
    meta_path = d / REPLAY_JSON
    meta, text = _read_meta(meta_path, d)

    def bad(key: str, expected: str) -> ValidationError:
        return ValidationError(f"{json_key_line(meta_path, text, key)}: field {key!r} must be {expected}, got {show(meta[key])}")

    for key in ("trace", "policy"):
        if key not in meta:
            raise ValidationError(f"{meta_path}: missing string field {key!r}")
        if not isinstance(meta[key], str) or not meta[key]:
            raise bad(key, "a non-empty string")
    if not os.path.exists(meta["trace"]):  # said as "No such file" with no word of where the path came from
        raise ValidationError(f"{json_key_line(meta_path, text, 'trace')}: field 'trace': no such file "
                              f"{meta['trace']}: the trace this replay ran, which validate simulates; put it back "
                              f"there, or give its new path in this field")
    if meta["policy"] not in POLICY_CLASSES:  # the simulation runs it: refused here, with the file
        raise ValidationError(f"{json_key_line(meta_path, text, 'policy')}: field 'policy': unknown policy "
                              f"{meta['policy']!r}; valid choices: {', '.join(POLICY_CLASSES)}")
    latency = meta.get("latency")
    if latency is not None and not isinstance(latency, str):  # replay's --latency label, or null without one
        raise bad("latency", "a string (the replay's --latency label) or null")
    kv_ttl = meta.get("kv_ttl", 0.0)
    if isinstance(kv_ttl, bool) or not isinstance(kv_ttl, (int, float)) or not math.isfinite(kv_ttl) or kv_ttl < 0:
        raise bad("kv_ttl", "a finite number of seconds >= 0")
    if kv_ttl > MAX_SECONDS:  # the bound engine.kv_ttl has in an experiment, which this one replaces
        raise bad("kv_ttl", f"at most {MAX_SECONDS:g} seconds, as engine.kv_ttl")
    lines: list[int] = []
    rows = read_programs_csv(d / "programs.csv", lines)
    other = {r.policy for r in rows} - {meta["policy"]}
    if other:
        raise ValidationError(f"{d / 'programs.csv'}: rows of policies {sorted(other)}, but replay.json says "
                              f"{meta['policy']!r}")
    seen: dict[str, int] = {}
    for r, line in zip(rows, lines):  # one latency per program: a second row would silently replace the first
        if r.program_id in seen:
            raise ValidationError(f"{d / 'programs.csv'}:{line}: program {r.program_id!r} has a second row "
                                  f"(the first is on line {seen[r.program_id]})")
        seen[r.program_id] = line
    if not rows:
        raise ValidationError(f"{d / 'programs.csv'}: no program finished in this replay; nothing to compare")
    finished = meta.get("finished_programs")  # absent from replays written before it was recorded
    if finished is not None and (type(finished) is not int or finished < 0):
        raise bad("finished_programs", "an integer >= 0 (programs.csv's rows)")
    if finished is not None and finished != len(rows):  # compared without a word, as if the replay had fewer
        raise ValidationError(f"{d / 'programs.csv'}: {len(rows)} rows, but replay.json says {finished} programs "
                              f"finished (field 'finished_programs'); the file was cut or changed after the replay")
    sha = meta.get("trace_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise bad("trace_sha256", "64 lowercase hex digits (a SHA-256, as python -m engine replay writes) or null")
    counts = {}
    for key in ("token_mismatches", "calls_without_output_ids"):
        value = meta.get(key, 0)
        if type(value) is not int or value < 0:  # a bool, or a LongInt too long to read, is no count
            raise bad(key, "an integer >= 0")
        counts[key] = value
    return Replayed(d, meta["trace"], meta["policy"], latency, {r.program_id: r.latency for r in rows},
                    float(kv_ttl), sha, **counts)


@dataclass
class Comparison:
    policy: str
    programs: int
    measured: dict[str, float | None]
    simulated: dict[str, float | None]
    replay: str = ""  # the replay's directory: two replays may share a policy (a sync and an async engine)

    def error_pct(self, metric: str) -> float | None:
        m, s = self.measured[metric], self.simulated[metric]
        if m is None or s is None or m == 0:
            return None
        return (s - m) / m * 100.0


def compare(policy: str, measured: dict[str, float], simulated: dict[str, float]) -> Comparison:
    """Compare the latencies of the programs both runs finished."""
    common = [pid for pid in measured if pid in simulated]
    m = [measured[p] for p in common]
    s = [simulated[p] for p in common]
    return Comparison(policy, len(common), {k: f(m) for k, f in METRICS}, {k: f(s) for k, f in METRICS})


def error_table(rows: Sequence[Comparison]) -> str:
    header = ("replay", "policy", "programs", "metric", "measured (s)", "simulated (s)", "error")
    lines = [header]
    for c in rows:
        for metric, _ in METRICS:
            m, s, e = c.measured[metric], c.simulated[metric], c.error_pct(metric)
            lines.append((c.replay, c.policy, str(c.programs), f"latency {metric}", "-" if m is None else f"{m:.4g}",
                          "-" if s is None else f"{s:.4g}", "-" if e is None else f"{round(e, 1) + 0.0:+.1f}%"))
    return "\n".join(aligned(lines, left=4))


def simulated_latencies(trace: str, cfg, policy: str, sha256: str | None = None) -> dict[str, float]:
    """The programs' latencies simulated from ``trace``, refused if its programs' digest is not ``sha256``."""
    from sim.simulate import simulate
    from traces.io import digest, load_all

    programs = load_all(trace)
    if sha256 is not None and digest(programs) != sha256:
        raise ValidationError(f"{trace}: its programs are not the ones replayed (their digest differs from the "
                              f"replay's trace_sha256): the trace changed since the replay, or is another one")
    result = simulate(programs, cfg, policy)
    return {p.program_id: p.latency for p in result.programs}


def validate(dirs: Sequence[str | Path | Replayed], cfg) -> list[Comparison]:
    """One comparison per replay: a directory, or a replay already loaded (the CLI reads each once)."""
    out = []
    for d in dirs:
        rep = d if isinstance(d, Replayed) else load_replay(d)
        # vLLM pins nothing without prefix caching (only hashed blocks), and
        # the simulator refuses kv_ttl there.
        ttl = rep.kv_ttl if cfg.engine.enable_prefix_caching else 0.0
        run_cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, kv_ttl=ttl))
        simulated = simulated_latencies(rep.trace, run_cfg, rep.policy, rep.trace_sha256)
        # A replay may have lost programs (they are left out), but never have one the trace lacks: then
        # the two runs are not of the same programs, and a partial overlap would read as a match.
        foreign = [pid for pid in rep.latencies if pid not in simulated]
        if foreign:
            shown = ", ".join(repr(p) for p in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ValidationError(f"{rep.directory / 'programs.csv'}: program(s) {shown} are not in the trace "
                                  f"{rep.trace}: it changed since the replay, or is not the one replayed")
        row = compare(rep.label, rep.latencies, simulated)
        row.replay = str(rep.directory)
        out.append(row)
    return out


def fidelity_note(rep: Replayed) -> str | None:
    """A note when the replay's calls did not re-send what the simulation assumes: the simulator
    keys a call's context as the trace's exact output counts and the ids the engine returned."""
    parts = []
    if rep.calls_without_output_ids:
        parts.append(f"{rep.calls_without_output_ids} calls were answered without token ids, so their children "
                     "re-sent stand-in ids and missed the prefix cache where the simulation hits it")
    if rep.token_mismatches:
        parts.append(f"{rep.token_mismatches} calls gave another number of output tokens than the trace's")
    return f"note: {rep.directory}: " + "; ".join(parts) if parts else None


def latency_label_note(rep: Replayed, cfg) -> str | None:
    """A note when the replay's ``--latency`` label (``KIND`` or ``KIND:DETAIL``, what the engine ran)
    names another kind than the model the experiment simulates: the comparison then measures the two
    models' difference, not the simulator's error. No label, or a kind we do not know, says nothing."""
    from sim.latency import KINDS

    kind = (rep.latency or "").split(":")[0]
    if kind not in KINDS or kind == cfg.latency.kind:
        return None
    return (f"note: {rep.directory} was replayed on an engine labelled {rep.latency!r}, but the simulation uses a "
            f"{cfg.latency.kind} model (--set latency.kind={kind} to match)")


def to_json(rows: Sequence[Comparison]) -> dict[str, Any]:
    """Keyed by replay directory: keyed by policy, a second replay of one policy replaced the first."""
    return {c.replay: {"policy": c.policy, "programs": c.programs, "measured": c.measured, "simulated": c.simulated,
                       "error_pct": {k: c.error_pct(k) for k, _ in METRICS}} for c in rows}


# -- CLI --------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "validate",
        help="compare replayed (real) program latencies with the simulator's on the same trace",
        description="Simulate each replay's trace and policy with an experiment's engine and latency model and "
                    "print mean/p50/p95 program latency, simulated vs measured, with the error in percent.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("examples:\n"
                "  python -m engine validate r/fcfs r/plas --experiment quickstart\n"
                "  python -m engine validate r/plas --experiment quickstart --set latency.kind=fitted "
                "--set latency.name=a100-llama-3.1-8b"),
    )
    p.add_argument("dirs", nargs="+", metavar="REPLAY_DIR", help="directories written by `python -m engine replay`")
    p.add_argument("--experiment", required=True, help="experiment whose engine and latency model to simulate")
    p.add_argument("-e", "--experiments", metavar="FILE", help="experiments file (default: experiments.yaml)")
    p.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key of the experiment; repeatable")
    p.add_argument("--json", metavar="FILE", help="also write the comparison as JSON to FILE ('-': to stdout, "
                                                  "the table then going to stderr)")
    p.set_defaults(run=run)
    return p


def option_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, found before the simulations: a --json that cannot be
    written failed only after them (without naming --json), and a directory given twice was
    compared twice while the JSON, keyed by directory, kept one."""
    seen: dict[Path, str] = {}
    for d in args.dirs:
        key = Path(d).resolve()
        if key in seen:
            same = f" (as {seen[key]})" if seen[key] != d else ""
            return f"REPLAY_DIR {d}: given twice{same}; give each replay directory once"
        seen[key] = d
    if args.json is not None and args.json != "-":
        return path_problem(args.json, "--json")
    return None


def run(args: argparse.Namespace) -> int:
    problem = option_problem(args)
    if problem:
        print(f"python -m engine validate: error: {problem}", file=sys.stderr)
        return 2
    from sim.capacity import CapacityError
    from sim.config import ConfigError
    from sim.experiments import resolve
    from sim.hardware import SpecError
    from sim.latency import async_without_host_note
    from sim.metrics import RecordFormatError
    from sim.simulate import SimulationError
    from traces.validate import TraceError

    try:
        cfg = resolve(args.experiment, args.experiments, args.overrides)
        note = async_without_host_note(cfg)
        if note:
            print(f"python -m engine validate: {note}", file=sys.stderr)
        replays = [load_replay(d) for d in args.dirs]
        for rep in replays:
            for note in (latency_label_note(rep, cfg), fidelity_note(rep)):
                if note:
                    print(f"python -m engine validate: {note}", file=sys.stderr)
        rows = validate(replays, cfg)
        table = sys.stderr if args.json == "-" else sys.stdout  # stdout is the JSON's alone
        print(f"experiment {cfg.name}: latency model {cfg.latency.kind}, {cfg.engine.replicas} replica(s) of "
              f"{cfg.engine.model} on {cfg.engine.gpu}", file=table)
        print(error_table(rows), file=table)
        text = json.dumps(to_json(rows), indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        elif args.json:
            Path(args.json).write_text(text, encoding="utf-8")
    except (ValidationError, ConfigError, CapacityError, SpecError, SimulationError, RecordFormatError,
            TraceError, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None:  # e.g. --json in a missing directory
            exc = f"{exc.filename}: {exc.strerror}"
        print(f"python -m engine validate: error: {exc}", file=sys.stderr)
        return 1
    return 0
