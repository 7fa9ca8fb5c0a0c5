"""Recipes: one permerge command and its options in a YAML (or JSON) file, run by ``permerge run``.

A recipe is a mapping with ``command`` (``align``, ``merge``, ``apply``, ``barrier``, ``demo`` or
``inspect``) and that command's options under their long names (``max_sweeps`` or ``max-sweeps``;
positional arguments under their names: ``a``, ``b``, ``checkpoints``):

.. code-block:: yaml

    command: merge
    model: resnet20
    checkpoints: [a.safetensors, b.safetensors]
    out: merged/
    method: weight
    weights: 0.7,0.3

There is no second list of options: the schema *is* the command's argument parser, so a recipe
takes exactly what the command line takes and is checked by the same code. :func:`recipe_argv`
turns a recipe into the argument list the parser then reads (flags from booleans, repeated values
from lists, JSON text from mappings such as ``model_kwargs``); unknown options, wrong types and
missing arguments are refused, in one line, before anything runs. A recipe runs in its own
directory (relative paths start there).

Every result's ``provenance.json`` is a recipe too: its ``config`` is the parsed options and its
``cwd`` the directory the command ran in (:func:`read_recipe` reads both forms). ``force`` is never
taken from a provenance record: re-running a result does not replace a directory because the
original run did.
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from permerge.errors import PermergeError
from permerge.io.read import StrPath

__all__ = ["NOT_REPLAYED", "Recipe", "read_recipe", "recipe_argv"]

NOT_REPLAYED = ("verbose", "quiet", "json", "force")
"""Options of a provenance record that are not re-run: how the original run was shown, and
``force``."""


@dataclass(frozen=True)
class Recipe:
    """A command, its options, and the directory its relative paths start from."""

    command: str
    options: Mapping[str, Any]
    cwd: Path
    source: Path


def read_recipe(path: StrPath) -> Recipe:
    """Read a recipe file (YAML or JSON) or a result's ``provenance.json``; raises one line naming
    the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PermergeError(f"cannot read recipe {path}: {e.strerror or e}") from e
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise PermergeError(f"recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                            f"{' '.join(str(e).split())}") from e  # fmt: skip
    if not isinstance(data, Mapping):
        raise PermergeError(f"recipe {path} must be a mapping of options (command: ..., out: ...), got {type(data).__name__}")
    if "config" in data and "versions" in data:  # a result's provenance.json
        config = data["config"]
        if not isinstance(config, Mapping) or not isinstance(config.get("command"), str):
            raise PermergeError(f"{path} records no re-runnable command (its config has no 'command')")
        options = {k: v for k, v in config.items() if k not in (*NOT_REPLAYED, "command")}
        return Recipe(config["command"], options, Path(data.get("cwd") or path.parent), path)
    command = data.get("command")
    if not isinstance(command, str):
        raise PermergeError(f"recipe {path} has no 'command' (one of align, merge, apply, barrier, demo, inspect)")
    options = {k: v for k, v in data.items() if k != "command"}
    return Recipe(command, options, path.resolve().parent, path)


def recipe_argv(options: Mapping[str, Any], parser: argparse.ArgumentParser, *, skip: Sequence[str] = ()) -> list[str]:
    """The argument list for ``parser`` that means ``options`` (option name → value).

    Names are the parser's destinations (dashes or underscores); ``skip`` names destinations a
    recipe may not set. ``None`` leaves an option at its default; ``true``/``false`` set or clear a
    flag; a list gives an option taking several values all of them; a mapping becomes its JSON text.
    Raises naming an unknown option (and the closest known one) or a value of the wrong shape;
    types, choices and required arguments are then checked by ``parser`` itself.
    """
    actions = {
        a.dest: a for a in parser._actions
        if a.dest not in (*skip, argparse.SUPPRESS) and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
    }  # fmt: skip
    flags: list[str] = []
    positional: dict[str, list[str]] = {}
    for name, value in options.items():
        dest = str(name).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; {parser.prog} takes {', '.join(sorted(actions))}"
            raise PermergeError(f"unknown option {name!r} for {parser.prog}{hint}")
        if value is None:
            continue
        if not action.option_strings:
            positional[dest] = _values(name, value, action)
        elif _is_flag(action):
            flags += _flag(name, value, action)
        elif action.nargs == "?" and isinstance(value, bool):  # an optional value: true means its default
            flags += [action.option_strings[0]] if value else []
        else:
            flags += [action.option_strings[0], *_values(name, value, action)]
    ordered = [v for a in parser._actions if a.dest in positional for v in positional[a.dest]]
    return [*flags, "--", *ordered] if ordered else flags


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction))


def _flag(name: str, value: Any, action: argparse.Action) -> list[str]:
    if not isinstance(value, bool):
        raise PermergeError(f"option {name!r} is a flag: give true or false, not {value!r}")
    if isinstance(action, argparse.BooleanOptionalAction):
        return [action.option_strings[0] if value else action.option_strings[-1]]
    return [action.option_strings[0]] if value == isinstance(action, argparse._StoreTrueAction) else []


def _values(name: str, value: Any, action: argparse.Action) -> list[str]:
    many = action.nargs in ("+", "*")
    if isinstance(value, (list, tuple)):
        if not many:
            raise PermergeError(f"option {name!r} takes one value, got a list of {len(value)}")
        return [_text(v) for v in value]
    return [_text(value)]


def _text(value: Any) -> str:
    if isinstance(value, Mapping):
        return json.dumps(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
