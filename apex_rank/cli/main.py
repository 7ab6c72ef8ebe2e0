"""Entry point of ``apex-rank``: builds the parser from the command modules and runs one.

Every command module exposes ``register(subparsers)``; each subcommand sets ``func(args) -> int``.
An :class:`~apex_rank.errors.ApexRankError` ends the program with its one-line reason and exit
status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from apex_rank.errors import ApexRankError

# One module per stage, in the order their commands appear in --help.
COMMAND_MODULES = (
    "apex_rank.cli.demo",
    "apex_rank.cli.apex_cmds",
    "apex_rank.cli.embed_cmds",
    "apex_rank.cli.ranking_cmds",
    "apex_rank.cli.eval_cmds",
    "apex_rank.cli.serve_cmds",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apex-rank", description="Cold-start ranking for AI-generated music.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--threads", type=int, default=None, help="threads for torch/BLAS/OpenMP (default: all cores)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from apex_rank.threads import prefer_passive_openmp

    prefer_passive_openmp()  # before the command modules import torch / lightgbm / faiss
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from apex_rank.threads import configure_threads

    try:
        configure_threads(args.threads)
        return int(args.func(args) or 0)
    except ApexRankError as err:
        print(f"apex-rank {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
