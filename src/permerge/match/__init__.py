"""Matchers: find the permutation of model B's units that best aligns it to model A.

``MATCHERS`` maps a method name to a function ``(spec, sd_a, sd_b, **options) -> result`` whose
result has a ``.permutation``. The built-in matchers are registered here, in the module that
defines the registry, so no import order matters.

Example:
    >>> from permerge.match import get_matcher
    >>> get_matcher("weight").__name__
    'weight_matching'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from permerge.errors import PermergeError
from permerge.match.lap import available_backends, solve
from permerge.match.weight import WeightMatchingResult, weight_matching

__all__ = [
    "MATCHERS",
    "UnknownMatcherError",
    "WeightMatchingResult",
    "available_backends",
    "get_matcher",
    "register_matcher",
    "solve",
    "weight_matching",
]

Matcher = Callable[..., Any]
F = TypeVar("F", bound=Matcher)

MATCHERS: dict[str, Matcher] = {}
"""Method name → matcher function; extend with :func:`register_matcher`."""


class UnknownMatcherError(PermergeError, ValueError):
    """No matcher is registered under the requested name."""


def register_matcher(name: str) -> Callable[[F], F]:
    """Decorator registering ``fn`` as the matcher called ``name`` (replacing any earlier one)."""

    def decorate(fn: F) -> F:
        MATCHERS[name] = fn
        return fn

    return decorate


def get_matcher(name: str) -> Matcher:
    """The matcher registered as ``name``; the error lists the registered names."""
    try:
        return MATCHERS[name]
    except KeyError:
        raise UnknownMatcherError(
            f"no matcher named {name!r}; registered: {', '.join(sorted(MATCHERS))} "
            "(add one with permerge.match.register_matcher)"
        ) from None


register_matcher("weight")(weight_matching)
