"""``python -m traces``: generate, convert, validate and summarise traces.

Exit codes: 0 success; 1 the data is bad (validation errors, unreadable or
malformed input); 2 the command line is wrong (argparse's convention, also
used for bad generator parameters). Errors are one message on stderr, never
a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Iterator, Sequence

from traces import generators, importers
from traces.argtypes import StrictParser, int_at_least, int_between, positive_float
from traces.format import MAX_TOKENS, Program
from traces.io import load, save
from traces.stats import trace_stats
from traces.validate import TraceError, scan_file, show

EXIT_BAD_DATA = 1
EXIT_USAGE = 2
NONNEGATIVE_INT = int_at_least(0)


# An empty trace, which `sim run` refuses ("no programs to simulate"): every command says so too.
EMPTY = "no programs (an empty trace); a trace needs at least one"


class UsageError(Exception):
    """A command-line mistake found after argparse (exit code 2)."""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _param(text: str) -> tuple[str, object]:
    """``key=value``; the value is read as JSON when it parses (numbers, true/false), else a string.

    A value with spaces around it is refused: JSON skips them, so ``calls_max= 70`` was 70 while
    ``--programs " 70"`` is an error (the options read numbers with the same grammar, `json_number`).
    """
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text[:200]!r}")
    if value != value.strip():
        raise argparse.ArgumentTypeError(f"{key}: expected a value with no spaces around it, got {value[:200]!r}")
    try:
        return key, json.loads(value)
    except RecursionError:  # "[[[[...": a traceback before
        raise argparse.ArgumentTypeError(f"{key}: the value is nested too deeply") from None
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(
        prog="python -m traces",
        formatter_class=_formatter,
        description="Program traces (JSON Lines, one program DAG per line): generate, convert, validate, stats.",
        epilog=(
            "examples:\n"
            "  python -m traces gen bfcl --programs 1000 --rate 2 --seed 0 -o bfcl.jsonl\n"
            "  python -m traces convert azure ../shared/data/azure-llm-2023/conv.csv -o conv.jsonl\n"
            "  python -m traces validate bfcl.jsonl\n"
            "  python -m traces stats bfcl.jsonl --json\n"
            "\nexit codes: 0 ok, 1 bad data, 2 bad command line"
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser(
        "gen",
        help="generate a synthetic workload",
        formatter_class=_formatter,
        description="Generate a seeded synthetic workload whose statistics match the Autellix paper.",
        epilog=(
            "examples:\n"
            "  python -m traces gen sharegpt --programs 5000 --rate 1.5 --seed 1 -o chat.jsonl\n"
            "  python -m traces gen lats --programs 200 --rate 0.1 --seed 0 --param width=3 --param depth=5 -o lats.jsonl\n"
            "  python -m traces gen mixed --programs 3000 --rate 4 --seed 2 --arrival gamma --cv 2 -o mixed.jsonl\n"
            "\nparameters (--param) per workload, with defaults: see traces/README.md or traces/generators.py"
        ),
    )
    gen.add_argument("workload", choices=generators.WORKLOADS)
    # At least one: an empty trace is refused by sim run, validate and stats alike.
    gen.add_argument("--programs", type=int_at_least(1), required=True, help="number of programs (at least 1)")
    gen.add_argument("--rate", type=positive_float, required=True, help="mean arrival rate, programs per second")
    gen.add_argument("--seed", type=NONNEGATIVE_INT, required=True)
    gen.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    gen.add_argument("--cv", type=positive_float, default=None,
                     help="coefficient of variation of inter-arrival times (gamma only; default 1)")
    gen.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                     help="override a workload parameter (repeatable)")
    gen.add_argument("-o", "--output", required=True, help="trace file to write")

    conv = sub.add_parser(
        "convert",
        help="import a real trace",
        formatter_class=_formatter,
        description="Convert an Azure CSV, a ShareGPT JSON or a Mooncake JSONL trace to the program format.",
        epilog=(
            "examples:\n"
            "  python -m traces convert azure ../shared/data/azure-llm-2023/code.csv -o code.jsonl\n"
            "  python -m traces convert azure trace.csv --min-tokens 1 -o out.jsonl\n"
            "  python -m traces convert sharegpt sharegpt.json --rate 2 --seed 0 -o chat.jsonl\n"
            "  python -m traces convert sharegpt sharegpt.json --tokenizer meta-llama/Llama-3.1-8B -o chat.jsonl\n"
            "  python -m traces convert mooncake mooncake.jsonl --group-by-prefix 4 -o mc.jsonl"
        ),
    )
    conv.add_argument("format", choices=importers.IMPORTERS)
    conv.add_argument("source")
    conv.add_argument("-o", "--output", required=True)
    conv.add_argument("--min-tokens", type=int_between(1, MAX_TOKENS), default=None,
                      help="azure: raise token counts below N to N (reported) instead of failing")
    conv.add_argument("--rate", type=positive_float, default=None, help="sharegpt: arrival rate (default 1)")
    conv.add_argument("--seed", type=NONNEGATIVE_INT, default=None, help="sharegpt: arrival seed (default 0)")
    conv.add_argument("--tokenizer", default=None,
                      help="sharegpt: Hugging Face tokenizer name (needs transformers); default chars/4")
    conv.add_argument("--group-by-prefix", type=int_at_least(1), default=None, metavar="N",
                      help="mooncake: rows sharing their first N hash ids form one chained program")

    val = sub.add_parser(
        "validate",
        help="check a trace file",
        formatter_class=_formatter,
        description="Check every line of a trace; print every error (up to --limit) and exit 1, or one OK line.",
        epilog="examples:\n  python -m traces validate bfcl.jsonl\n  python -m traces validate big.jsonl --limit 10",
    )
    val.add_argument("file")
    val.add_argument("--limit", type=NONNEGATIVE_INT, default=50, help="errors to print (default 50)")

    st = sub.add_parser(
        "stats",
        help="summary statistics of a trace",
        formatter_class=_formatter,
        description="Calls per program, tokens per call, parallelism (exact DAG width) and duration.",
        epilog="examples:\n  python -m traces stats bfcl.jsonl\n  python -m traces stats bfcl.jsonl --json",
    )
    st.add_argument("file")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    for command_parser in (gen, conv, val, st):
        # A usage error found after parsing shows the usage of its own command, as argparse's own do.
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def _check_output(output: str, source: str | None = None) -> None:
    """Refuse an -o that cannot work before any work is done.

    A directory, or a file in a missing directory, would fail only at the
    end (after generating or importing everything); the input file itself
    would be overwritten by its own conversion.
    """
    if not output:  # os.path.isdir("") is False, and the save failed later on "." as bad data
        raise UsageError("-o: empty path, expected a trace file")
    if os.path.isdir(output):
        raise UsageError("-o: is a directory, expected a trace file")
    parent = os.path.dirname(output) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"-o: no such directory {parent!r}")
    if source is not None and os.path.exists(output) and os.path.exists(source) and os.path.samefile(output, source):
        raise UsageError("-o: is the input file")


# `generate`'s own arguments, which `gen` takes as options: as a --param they
# would reach it twice, or override the option without a word.
_GEN_OPTIONS = ("programs", "rate", "seed", "arrival", "cv")

_OS_REASONS = {
    errno.ENOENT: "no such file",
    errno.EISDIR: "is a directory, expected a trace file",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EACCES: "permission denied",
}


def os_error_message(exc: OSError) -> str:
    """``FILE: reason`` for an OSError, without Python's ``[Errno N]`` wording."""
    reason = _OS_REASONS.get(exc.errno) or (exc.strerror or str(exc)).lower()
    return f"{exc.filename}: {reason}" if exc.filename is not None else reason


def _gen(args: argparse.Namespace) -> int:
    _check_output(args.output)
    if args.cv is not None and args.arrival != "gamma":
        raise UsageError("--cv applies to --arrival gamma only")
    params: dict[str, object] = {}
    for key, value in args.param:
        if key in _GEN_OPTIONS:
            raise UsageError(f"--param {key}=...: {key} is an option of its own (--{key}), not a workload parameter")
        if key in params:
            raise UsageError(f"--param {key} is given twice ({show(params[key])} and {show(value)})")
        params[key] = value
    try:
        programs = generators.iter_generate(
            args.workload, args.programs, args.rate, args.seed, arrival=args.arrival,
            cv=1.0 if args.cv is None else args.cv, **params,
        )
    except (ValueError, TypeError, OverflowError) as exc:
        raise UsageError(str(exc)) from None
    calls = 0

    def written() -> Iterator[Program]:
        """The programs as they are made and saved (one in memory at a time), counting their calls."""
        nonlocal calls
        try:
            for program in programs:
                calls += len(program.calls)
                yield program
        except (ValueError, OverflowError) as exc:  # a parameter whose draws the format cannot hold
            raise UsageError(str(exc)) from None

    n = save(written(), args.output)
    print(f"wrote {n} programs ({calls} calls) to {args.output}", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    given = {k for k in ("min_tokens", "rate", "seed", "tokenizer", "group_by_prefix") if getattr(args, k) is not None}
    allowed = {"azure": {"min_tokens"}, "sharegpt": {"rate", "seed", "tokenizer"}, "mooncake": {"group_by_prefix"}}
    extra = given - allowed[args.format]
    if extra:
        opts = ", ".join("--" + k.replace("_", "-") for k in sorted(extra))
        raise UsageError(f"{opts} does not apply to {args.format}")
    _check_output(args.output, args.source)
    try:
        if args.format == "azure":
            report = importers.import_azure(args.source, min_tokens=args.min_tokens)
        elif args.format == "sharegpt":
            counter = importers.load_tokenizer(args.tokenizer) if args.tokenizer else importers.approx_tokens
            report = importers.import_sharegpt(
                args.source, rate=args.rate or 1.0, seed=args.seed or 0, count_tokens=counter
            )
        else:
            report = importers.import_mooncake(args.source, group_by_prefix=args.group_by_prefix)
    except ValueError as exc:
        if isinstance(exc, TraceError):
            raise
        raise UsageError(str(exc)) from None
    for note in report.notes:
        print(f"{args.format}: {note}", file=sys.stderr)
    if not report.programs:  # a header-only CSV wrote an empty trace, exit 0, that sim run then refused
        raise TraceError("no programs to convert; a trace needs at least one", file=args.source)
    n = save(report.programs, args.output)
    print(f"wrote {n} programs to {args.output}", file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace) -> int:
    result = scan_file(args.file, limit=args.limit)
    if result.error_count:
        for err in result.errors:
            print(err, file=sys.stderr)
        if result.error_count > len(result.errors):
            print(f"... and {result.error_count - len(result.errors)} more", file=sys.stderr)
        print(f"{args.file}: {result.error_count} bad line(s)", file=sys.stderr)
        return EXIT_BAD_DATA
    if not result.programs:  # "OK, 0 programs" for a trace that sim run refuses
        raise TraceError(EMPTY, file=args.file)
    # A file name that is not UTF-8 holds surrogate escapes, which a strict UTF-8 stdout refuses to print.
    shown = args.file.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    print(f"{shown}: OK, {result.programs} programs, {result.calls} calls")
    return 0


def _stats(args: argparse.Namespace) -> int:
    s = trace_stats(load(args.file))
    if not s["programs"]:  # all-zero statistics, exit 0, for a trace that sim run refuses
        raise TraceError(EMPTY, file=args.file)
    if args.json:
        print(json.dumps(s, sort_keys=False))
    else:
        width = max(len(k) for k in s)
        for k, v in s.items():
            shown = f"{v:.4f}" if isinstance(v, float) else str(v)
            print(f"{k:<{width}}  {shown}")
    return 0


COMMANDS = {"gen": _gen, "convert": _convert, "validate": _validate, "stats": _stats}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (argparse usage errors exit 2 itself)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        args.command_parser.print_usage(sys.stderr)
        print(f"python -m traces {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_DATA
    except OSError as exc:
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_BAD_DATA
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_DATA
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
