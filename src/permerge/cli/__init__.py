"""The ``permerge`` command: one root parser, one module per subcommand, no logic here.

Every user error (bad arguments, inputs, paths, OS errors such as a full disk) is one line on
stderr and exit code 2; Ctrl-C and SIGTERM print ``interrupted, nothing written`` and exit 130 /
143 (the outputs are all-or-nothing, so an interrupted run leaves nothing; a killed one leaves a
hidden partial directory the next run on that output removes).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

from permerge.cli import align as align_cmd
from permerge.cli import barrier as barrier_cmd
from permerge.cli import demo as demo_cmd
from permerge.cli import inspect as inspect_cmd
from permerge.cli import merge as merge_cmd
from permerge.errors import PermergeError

LOG = logging.getLogger("permerge")

# name → module with add_arguments(parser) and run(args) -> int
COMMANDS = {"inspect": inspect_cmd, "align": align_cmd, "merge": merge_cmd, "barrier": barrier_cmd, "demo": demo_cmd}

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage dump), like every other permerge error."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so the same cleanup as for Ctrl-C runs."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _add_global_flags(p: argparse.ArgumentParser, default: object) -> None:
    """-v/-q on the root and on every subcommand; SUPPRESS keeps a subparser from resetting them."""
    p.add_argument("-v", "--verbose", action="count", default=0 if default is None else default,
                   help="more logging (-vv: debug)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", default=False if default is None else default,
                   help="only errors; no progress bars")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="permerge",
        description="Align and merge neural networks modulo permutation symmetries.",
    )
    _add_global_flags(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
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
    prefix = f"permerge {args.command}"
    try:
        with _sigterm_raises():
            return int(args.run(args) or 0)
    except PermergeError as e:
        sys.stderr.write(f"{prefix}: error: {_one_line(e)}\n")
    except OSError as e:  # an OS error the I/O layer did not already phrase
        sys.stderr.write(f"{prefix}: error: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}\n")
    except KeyboardInterrupt:
        sys.stderr.write(f"{prefix}: interrupted, nothing written\n")
        return 130
    except Terminated:
        sys.stderr.write(f"{prefix}: interrupted (SIGTERM), nothing written\n")
        return 143
    return USAGE_ERROR


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
