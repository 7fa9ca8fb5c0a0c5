"""The per-process spec cache: hits only when nothing the trace depends on changed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import permerge as pm
import permerge.graph as graph
from permerge.graph import cache
from permerge.models import MLP


@pytest.fixture
def captures(monkeypatch):
    """Count real traces (eval-mode calls of ``capture``; each trace also exports train mode) with an
    empty cache."""
    cache.clear()
    calls = []
    real = graph.capture

    def counting(*args, **kwargs):
        if not kwargs.get("train"):
            calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(graph, "capture", counting)
    yield calls
    cache.clear()


class Gated(nn.Module):
    """Two linears whose coupling depends on a plain attribute, not on any weight."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + (h if self.residual else 0)


class Tied(nn.Module):
    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))


def test_same_architecture_is_traced_once(captures):
    x = torch.randn(2, 784)
    first = pm.trace(MLP(hidden=(16, 8)), x)
    second = pm.trace(MLP(hidden=(16, 8)), torch.randn(2, 784))  # other weights, other values
    assert len(captures) == 1
    assert second == first


def test_input_shape_width_and_flags_each_miss(captures):
    pm.trace(MLP(hidden=(16, 8)), torch.randn(2, 784))
    pm.trace(MLP(hidden=(16, 8)), torch.randn(3, 784))  # batch size
    pm.trace(MLP(hidden=(16, 9)), torch.randn(2, 784))  # width
    pm.trace(MLP(hidden=(16, 8)), torch.randn(2, 784), strict=True)  # strict
    pm.trace(MLP(hidden=(16, 8)), torch.randn(2, 784), cache=False)  # bypass
    assert len(captures) == 5


def test_a_plain_attribute_that_changes_the_graph_changes_the_key(captures):
    x = torch.randn(3, 6)
    plain, residual = pm.trace(Gated(False), x), pm.trace(Gated(True), x)
    assert len(captures) == 2
    # the residual adds the hidden units to the model's output, which freezes them
    assert [g.size for g in plain.groups] == [6] and residual.groups == ()
    assert pm.trace(Gated(True), x) is residual


class WithAct(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.act = act
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def test_a_function_attribute_is_part_of_the_key(captures):
    x = torch.randn(3, 6)
    pm.trace(WithAct(torch.relu), x)
    pm.trace(WithAct(torch.tanh), x)
    pm.trace(WithAct(torch.relu), x)
    assert len(captures) == 2


def test_tying_is_part_of_the_key(captures):
    x = torch.randint(0, 10, (2, 5))
    tied, untied = pm.trace(Tied(True), x), pm.trace(Tied(False), x)
    assert len(captures) == 2
    assert tied != untied


def test_registering_a_rule_invalidates(captures, monkeypatch):
    x = torch.randn(2, 784)
    pm.trace(MLP(hidden=(8,)), x)
    monkeypatch.setitem(graph.RULES, "a-target-no-graph-has", lambda c: None)
    pm.trace(MLP(hidden=(8,)), x)
    assert len(captures) == 2


def test_custom_rules_and_unkeyable_inputs_are_not_cached(captures):
    class Opaque:
        def __init__(self) -> None:
            self.table = torch.zeros(3)  # state that is not a plain value: nothing stable to key on

    class TakesOpaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, extra=None):
            return self.lin(x)

    x = torch.randn(2, 784)
    pm.trace(MLP(hidden=(8,)), x, rules={})
    pm.trace(MLP(hidden=(8,)), x, rules={})
    m = TakesOpaque()
    call = graph.Example((torch.randn(2, 4),), {"extra": Opaque()})
    assert cache.key(m, [call], False, graph.RULES) is None
    assert len(captures) == 2


@dataclasses.dataclass(frozen=True)
class GateConfig:
    residual: bool
    scale: float = 1.0


class ConfiguredGate(Gated):
    """The coupling depends on a dataclass config object, not a plain attribute."""

    def __init__(self, cfg: GateConfig) -> None:
        super().__init__(False)
        del self.residual
        self.cfg = cfg

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + (h if self.cfg.residual else 0)


def test_configuration_objects_are_keyed_by_value(captures):
    x = torch.randn(3, 6)
    plain = pm.trace(ConfiguredGate(GateConfig(False)), x)
    residual = pm.trace(ConfiguredGate(GateConfig(True)), x)
    assert len(captures) == 2  # same class, other field values: traced again
    assert [g.size for g in plain.groups] == [6] and residual.groups == ()
    assert pm.trace(ConfiguredGate(GateConfig(True)), x) is residual  # an equal config hits
    assert len(captures) == 2


def test_an_object_attribute_without_a_stable_value_disables_the_cache(captures):
    class Holder:
        def __init__(self) -> None:
            self.mask = torch.ones(6)

    x = torch.randn(3, 6)
    m = Gated(False)
    m.helper = Holder()
    pm.trace(m, x)
    pm.trace(m, x)
    assert len(captures) == 2


def test_least_recently_used_is_evicted(captures, monkeypatch):
    monkeypatch.setattr(cache, "MAX_ENTRIES", 2)
    x = torch.randn(2, 784)
    for width in (4, 5, 4, 6, 4, 5):  # 5 is evicted by 6 (4 was used more recently)
        pm.trace(MLP(hidden=(width,)), x)
    assert [m.net[1].out_features for m in captures] == [4, 5, 6, 5]


def test_freeze_applies_to_a_cached_spec(captures):
    x = torch.randn(2, 784)
    full = pm.trace(MLP(hidden=(8, 8)), x)
    frozen = pm.trace(MLP(hidden=(8, 8)), x, freeze=[full.groups[0].name])
    assert len(captures) == 1
    assert [g.name for g in frozen.groups] == [g.name for g in full.groups[1:]]
    assert pm.trace(MLP(hidden=(8, 8)), x) == full  # the cached spec itself is untouched
