"""Matchers: find the permutation of model B's units that best aligns it to model A.

``MATCHERS`` maps a method name to a function ``(MatchRequest) -> result`` whose result has a
``.permutation`` (``align`` calls it this way, whatever the method needs: weights, data, a loss).
The built-in matchers are registered here, in the module that defines the registry, so no import
order matters. The matchers themselves (``weight_matching``, ``activation_matching``,
``ste_matching``, ``sinkhorn_matching``) are plain functions with their own signatures.

Example:
    >>> from permerge.match import get_matcher
    >>> sorted(MATCHERS)
    ['activation', 'sinkhorn', 'ste', 'weight']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from permerge.errors import PermergeError
from permerge.match.activation import ActivationMatchingResult, activation_matching
from permerge.match.lap import available_backends, solve
from permerge.match.learned import LearnedMatchingResult
from permerge.match.sinkhorn import sinkhorn_matching
from permerge.match.ste import SteMatchingResult, ste_matching
from permerge.match.weight import WeightMatchingResult, weight_matching
from permerge.spec import PermutationSpec

__all__ = [
    "MATCHERS",
    "ActivationMatchingResult",
    "MatchRequest",
    "LearnedMatchingResult",
    "SteMatchingResult",
    "activation_matching",
    "sinkhorn_matching",
    "ste_matching",
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


@dataclass(frozen=True)
class MatchRequest:
    """Everything a matcher may need; each takes what it uses and ignores the rest."""

    spec: PermutationSpec
    model_a: nn.Module
    model_b: nn.Module
    example_inputs: Any = ()
    example_kwargs: Mapping[str, Any] = field(default_factory=dict)
    data: Iterable[Any] | None = None
    seed: int = 0
    quiet: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


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


def _needs_data(req: MatchRequest, method: str) -> Iterable[Any]:
    if req.data is None:
        raise PermergeError(f"{method} matching needs data: pass data=... (a DataLoader or a list of batches)")
    return req.data


@register_matcher("weight")
def _weight(req: MatchRequest) -> WeightMatchingResult:
    sd_a, sd_b = req.model_a.state_dict(), req.model_b.state_dict()
    return weight_matching(req.spec, sd_a, sd_b, seed=req.seed, quiet=req.quiet, **req.options)


@register_matcher("activation")
def _activation(req: MatchRequest) -> ActivationMatchingResult:
    data = _needs_data(req, "activation")
    return activation_matching(
        req.model_a, req.model_b, req.spec, data, example_kwargs=req.example_kwargs, quiet=req.quiet, **req.options
    )


@register_matcher("ste")
def _ste(req: MatchRequest) -> SteMatchingResult:
    data = _needs_data(req, "STE")
    return ste_matching(req.spec, req.model_a, req.model_b, data, seed=req.seed, quiet=req.quiet, **req.options)


@register_matcher("sinkhorn")
def _sinkhorn(req: MatchRequest) -> LearnedMatchingResult:
    data = _needs_data(req, "Sinkhorn")
    return sinkhorn_matching(req.spec, req.model_a, req.model_b, data, seed=req.seed, quiet=req.quiet, **req.options)
