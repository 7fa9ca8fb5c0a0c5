"""The ``permerge`` command: one root parser, one module per subcommand, no logic here.

Every user error (bad arguments, inputs, paths, OS errors such as a full disk) is one line on
stderr and exit code 2; Ctrl-C and SIGTERM print ``interrupted, nothing written`` and exit 130 /
143 (the outputs are all-or-nothing, so an interrupted run leaves nothing; a killed one leaves a
hidden partial directory the next run on that output removes).

Every subcommand returns an :class:`~permerge.cli._common.Outcome`, printed as text or, with
``--json``, as one JSON object on stdout (errors too: ``{"error": ..., "exit_code": ...}``), so
nothing else ever goes to stdout; logs, warnings and progress bars go to stderr. ``-q`` silences
permerge's progress bars and logs below errors, and those of the libraries it drives
(``transformers``, ``torch``, ``huggingface_hub``, Python warnings); third-party progress bars are
off whenever stderr is not a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from permerge import __version__
from permerge.cli import align as align_cmd
from permerge.cli import apply as apply_cmd
from permerge.cli import barrier as barrier_cmd
from permerge.cli import demo as demo_cmd
from permerge.cli import inspect as inspect_cmd
from permerge.cli import merge as merge_cmd
from permerge.cli import run as run_cmd
from permerge.cli._common import Outcome, UsageError
from permerge.errors import PermergeError
from permerge.progress import shown

LOG = logging.getLogger("permerge")

# name → module with add_arguments(parser) and run(args) -> Outcome
COMMANDS = {
    "inspect": inspect_cmd, "align": align_cmd, "merge": merge_cmd, "apply": apply_cmd, "barrier": barrier_cmd,
    "demo": demo_cmd, "run": run_cmd,
}  # fmt: skip

USAGE_ERROR = 2
_THIRD_PARTY = ("transformers", "torch", "huggingface_hub", "accelerate", "peft", "mergekit", "py.warnings")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage dump), like every other permerge error: raised
    as :class:`~permerge.cli._common.UsageError`, so ``permerge run`` reports a bad recipe the same way."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


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
    """-v/-q/--json on the root and on every subcommand; SUPPRESS keeps a subparser from resetting them."""
    p.add_argument("-v", "--verbose", action="count", default=0 if default is None else default,
                   help="more logging (-vv: debug)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", default=False if default is None else default,
                   help="only errors: no progress bars, no warnings (from transformers and torch too)")  # fmt: skip
    p.add_argument("--json", action="store_true", default=False if default is None else default,
                   help="print the outcome as one JSON object on stdout (errors too)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="permerge",
        description="Align and merge neural networks modulo permutation symmetries.",
    )
    parser.add_argument("--version", action="version", version=f"permerge {__version__}")
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


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of subcommand ``name`` (what ``permerge run`` reads recipes with)."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``permerge`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return _fail(f"{e.prog}: error: {e} (see {e.prog} --help)", USAGE_ERROR, json_out="--json" in argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("permerge").setLevel(level)
    prefix = f"permerge {args.command}"
    try:
        with _sigterm_raises(), _third_party(args.quiet):
            outcome: Outcome = args.run(args)
    except (PermergeError, UsageError) as e:
        return _fail(f"{prefix}: error: {_one_line(e)}", USAGE_ERROR, json_out=args.json)
    except OSError as e:  # an OS error the I/O layer did not already phrase
        return _fail(f"{prefix}: error: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}", USAGE_ERROR,
                     json_out=args.json)  # fmt: skip
    except KeyboardInterrupt:
        return _fail(f"{prefix}: interrupted, nothing written", 130, json_out=args.json)
    except Terminated:
        return _fail(f"{prefix}: interrupted (SIGTERM), nothing written", 143, json_out=args.json)
    if args.json:
        sys.stdout.write(json.dumps(_strict(outcome.data), indent=1, allow_nan=False) + "\n")
    else:
        sys.stdout.write(outcome.text if outcome.text.endswith("\n") else outcome.text + "\n")
    return 0


def _strict(obj: Any) -> Any:
    """``obj`` (already JSON values) with non-finite numbers as ``null``: strict JSON for any parser."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def _fail(line: str, code: int, *, json_out: bool) -> int:
    """Report a failure: one line on stderr; with --json also an object on stdout."""
    sys.stderr.write(line + "\n")
    if json_out:
        sys.stdout.write(json.dumps({"error": line, "exit_code": code}) + "\n")
    return code


@contextmanager
def _third_party(quiet: bool) -> Iterator[None]:
    """Quiet the libraries permerge drives for the duration of a command (restored after): under
    ``quiet`` their loggers and Python warnings; transformers' progress bars whenever ours are not shown."""
    bars = shown(quiet)
    saved_env = os.environ.get("TRANSFORMERS_VERBOSITY")
    levels = {name: logging.getLogger(name).level for name in _THIRD_PARTY}
    tf_logging = _transformers_logging()
    tf_state = (tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()) if tf_logging else None
    if quiet:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # read when transformers is first imported
    if quiet:
        for name in _THIRD_PARTY:
            logging.getLogger(name).setLevel(logging.ERROR)
    _set_transformers(quiet, bars)
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            yield
    finally:
        if saved_env is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = saved_env
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)
        tf_logging = _transformers_logging()
        if tf_logging is not None:  # imported before, or during the command (then: its defaults)
            verbosity, enabled = tf_state or (logging.WARNING, True)
            tf_logging.set_verbosity(verbosity)
            (tf_logging.enable_progress_bar if enabled else tf_logging.disable_progress_bar)()


def _transformers_logging() -> Any:
    """``transformers.utils.logging`` if transformers is already imported (never imports it)."""
    return sys.modules.get("transformers.utils.logging")


def _set_transformers(quiet: bool, bars: bool) -> None:
    tf_logging = _transformers_logging()
    if tf_logging is None:
        return
    if quiet:
        tf_logging.set_verbosity_error()
    if not bars:
        tf_logging.disable_progress_bar()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
