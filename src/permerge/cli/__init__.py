"""The ``permerge`` command: one root parser, one module per subcommand, no logic here."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from permerge.cli import align as align_cmd
from permerge.cli import barrier as barrier_cmd
from permerge.cli import demo as demo_cmd
from permerge.cli import inspect as inspect_cmd
from permerge.cli import merge as merge_cmd
from permerge.errors import PermergeError

LOG = logging.getLogger("permerge")

# name → module with add_arguments(parser) and run(args) -> int
COMMANDS = {"inspect": inspect_cmd, "align": align_cmd, "merge": merge_cmd, "barrier": barrier_cmd, "demo": demo_cmd}


def _add_global_flags(p: argparse.ArgumentParser, default: object) -> None:
    """-v/-q on the root and on every subcommand; SUPPRESS keeps a subparser from resetting them."""
    p.add_argument("-v", "--verbose", action="count", default=0 if default is None else default,
                   help="more logging (-vv: debug)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", default=False if default is None else default,
                   help="only errors; no progress bars")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="permerge",
        description="Align and merge neural networks modulo permutation symmetries.",
    )
    _add_global_flags(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.__doc__,
            epilog=mod.EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_global_flags(p, argparse.SUPPRESS)  # also accepted after the subcommand
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``permerge`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("permerge").setLevel(level)
    try:
        return int(args.run(args) or 0)
    except PermergeError as e:
        sys.stderr.write(f"permerge {args.command}: error: {e}\n")
        return 2
