"""``python -m engine``: subcommands of the vLLM-backed engine tools.

Each subcommand is a module exposing ``add_parser(subparsers)`` (which must
``set_defaults(run=run)``) and ``run(args) -> int``. Add a tool by adding its
module to ``SUBCOMMANDS``; modules are imported here, but each keeps its
heavy imports (torch, vllm) inside ``run`` so ``--help`` and the no-GPU error
path work on any machine.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from traces.argtypes import StrictParser

SUBCOMMANDS = ("engine.profile", "engine.gateway", "engine.replay", "engine.validate")


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(prog="python -m engine",
                                     description="vLLM-backed engine tools for the Autellix reproduction.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
