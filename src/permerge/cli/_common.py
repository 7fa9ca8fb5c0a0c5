"""What every subcommand shares: its outcome (printed as text, or as one JSON object with --json),
the configuration it records, and the flags every command takes."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from permerge.io.write import jsonable

__all__ = ["GLOBAL_FLAGS", "Outcome", "UsageError", "config_of", "result_outcome"]

GLOBAL_FLAGS = ("verbose", "quiet", "json")
"""Destinations of the flags every subcommand accepts (how to show a run, not what it computes)."""


class UsageError(Exception):
    """A command line (or recipe) argparse rejects: ``prog: error: message``."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


@dataclass(frozen=True)
class Outcome:
    """A finished command: ``text`` for people (stdout), ``data`` for ``--json`` (one object)."""

    text: str
    data: Mapping[str, Any]


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options of a run, as recorded in ``provenance.json`` (and re-run by ``permerge run``)."""
    return {k: v for k, v in vars(args).items() if k != "run"}


def result_outcome(command: str, out: Path, text: str, report: Mapping[str, Any], **data: Any) -> Outcome:
    """The outcome of a command that wrote the result directory ``out``: ``text``, and as data the
    command, the directory, its files and the report (the same one ``provenance.json`` holds)."""
    files = sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() else []
    body = {"command": command, "out": str(out), "files": files, **data, "report": jsonable(report)}
    return Outcome(text, body)
