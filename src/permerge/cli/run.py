"""Run a recipe: one permerge command and its options from a YAML or JSON file, or a result's provenance.json.

A recipe names the command and its options exactly as the command line does (see `permerge COMMAND
--help`; positional arguments under their names). Relative paths in a recipe start from the
recipe's directory; a provenance.json runs in the directory the original command ran in (--cwd
changes either). The recipe is checked in full — unknown options, wrong types, missing arguments —
before anything runs; --dry-run stops there and prints the command it stands for.

    command: align            # align, merge, apply, barrier, demo or inspect
    a: llama-a/
    b: llama-b/
    out: llama-b-aligned/
    emit_mergekit: linear

Re-running a result (`permerge run OUT/provenance.json -o OUT2`) repeats its command with the same
options; the result is the same bits (matching and checks are seeded). --force is never taken from a
provenance record.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from permerge.cli._common import GLOBAL_FLAGS, Outcome, UsageError
from permerge.errors import PermergeError
from permerge.recipe import read_recipe, recipe_argv

HELP = "run a command from a recipe (YAML/JSON) or re-run a result from its provenance.json"
EPILOG = """examples:
  permerge run merge.yaml
  permerge run merge.yaml --set method=many --set seed=3 -o merged-many/
  permerge run merged/provenance.json -o merged-again/
  permerge run align.yaml --dry-run
"""
_NOT_FROM_RECIPES = ("run",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe file (.yaml, .yml or .json) or a result's provenance.json")
    p.add_argument("-o", "--out", help="write here instead of the recipe's out (relative to the current directory)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output, all of it")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="override one option (VALUE is read as YAML: --set seed=3 --set weights=0.7,0.3)")  # fmt: skip
    p.add_argument("--cwd", help="where the recipe's relative paths start (default: the recipe's directory; for a "
                   "provenance.json, where the command ran)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="check the recipe and print the command it stands for; run nothing")


@contextmanager
def _in_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run(args: argparse.Namespace) -> Outcome:
    from permerge.cli import COMMANDS, subcommand_parser

    recipe = read_recipe(args.recipe)
    runnable = [c for c in COMMANDS if c not in _NOT_FROM_RECIPES]
    if recipe.command not in runnable:
        raise PermergeError(f"recipe {args.recipe}: unknown command {recipe.command!r}; choose one of {', '.join(runnable)}")
    options = dict(recipe.options)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PermergeError(f"--set {item!r}: write OPTION=VALUE, e.g. --set seed=3")
        options[key] = yaml.safe_load(value)
    if args.out is not None:
        options["out"] = str(Path(args.out).resolve())
    if args.force:
        options["force"] = True
    cwd = Path(args.cwd).resolve() if args.cwd else recipe.cwd
    if not cwd.is_dir():
        raise PermergeError(f"recipe {args.recipe} runs in {cwd}, which does not exist here; pass --cwd DIR (where its "
                            "relative paths start)")  # fmt: skip
    parser = subcommand_parser(recipe.command)
    try:
        argv = recipe_argv(options, parser, skip=GLOBAL_FLAGS)
    except PermergeError as e:
        raise PermergeError(f"recipe {args.recipe}: {e}") from e
    with _in_directory(cwd):
        try:
            sub = parser.parse_args(argv)
        except UsageError as e:
            raise PermergeError(f"recipe {args.recipe}: {e.prog}: {e}") from e
        line = f"permerge {recipe.command} {shlex.join(argv)}".strip()
        if args.dry_run:
            return Outcome(f"{line}\n(in {cwd})", {"command": "run", "recipe": str(args.recipe), "runs": recipe.command,
                                                   "argv": argv, "cwd": str(cwd)})  # fmt: skip
        for flag in GLOBAL_FLAGS:  # how to show the run comes from this command line, not the recipe
            setattr(sub, flag, getattr(args, flag))
        sub.command = recipe.command
        outcome: Outcome = sub.run(sub)
    return Outcome(outcome.text, {**outcome.data, "recipe": str(args.recipe)})
