"""The one graph runner: any weights, lazy reads, lockstep batches, pausing, clear errors."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping

import pytest
import torch
from conftest import traced, zoo_params

import permerge as pm
from permerge.graph import trace_graph
from permerge.graph.run import GraphRunner, run_program


def _outputs(model, x, kwargs):
    from permerge.check import model_outputs

    return [t.float() for t in model_outputs(model, x, kwargs) if t.is_floating_point()]


@pytest.mark.parametrize("name", zoo_params())
def test_the_program_computes_the_model_with_any_weights(name):
    """The weightless traced program, bound to a permuted state dict, computes the permuted model."""
    model, x, kwargs, spec = traced(name)
    tr = trace_graph(model, x, example_kwargs=kwargs)
    perm = pm.random_permutation(spec, seed=5)
    sd = pm.apply_permutation(spec, perm, model.state_dict())
    other = copy.deepcopy(model)
    other.load_state_dict(sd)
    got = [t.float() for t in run_program(tr.program, sd, x, kwargs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    want = _outputs(other, x, kwargs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5), name


class CountingReads(Mapping[str, torch.Tensor]):
    """A lazy state dict that counts how often each tensor is read."""

    def __init__(self, sd: Mapping[str, torch.Tensor]) -> None:
        self.sd, self.reads = sd, dict.fromkeys(sd, 0)

    def __getitem__(self, k: str) -> torch.Tensor:
        self.reads[k] += 1
        return self.sd[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sd)

    def __len__(self) -> int:
        return len(self.sd)


def test_weights_are_read_lazily_at_their_use():
    model, x, kwargs, _ = traced("resnet20")
    tr = trace_graph(model, x)
    lazy = CountingReads(model.state_dict())
    runner = GraphRunner(tr.program, lazy, [(x, {})])
    assert sum(lazy.reads.values()) == 0  # binding reads nothing
    first = tr.layers[0]
    runner.run_to(first.node)
    assert lazy.reads[first.weight] == 0  # not used yet
    runner.run()
    assert all(n == 1 for k, n in lazy.reads.items() if not k.endswith("num_batches_tracked"))


def test_lockstep_batches_equal_separate_runs_and_shared_values_are_computed_once():
    model, x, kwargs, _ = traced("vgg")
    tr = trace_graph(model, x)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(*x[0].shape, generator=gen),) for _ in range(3)]
    calls = {"n": 0}

    def hook(node, values):
        calls["n"] += 1
        assert len(values) == 3

    together = GraphRunner(tr.program, model.state_dict(), [(b, {}) for b in batches], hook=hook).run()
    for b, out in zip(batches, together):
        assert torch.equal(out[0], run_program(tr.program, model.state_dict(), b)[0])
    assert calls["n"] > 0


def test_weights_changed_while_paused_take_effect_downstream():
    model, x, _, _ = traced("mlp")
    tr = trace_graph(model, x)
    sd = dict(model.state_dict())
    last = tr.layers[-1]
    runner = GraphRunner(tr.program, sd, [(x, {})])
    runner.run_to(last.node)
    sd[last.bias] = sd[last.bias] + 1.0
    out = runner.run()[0][0]
    with torch.no_grad():
        assert torch.allclose(out, model(*x) + 1.0, atol=1e-5)


def test_keep_and_take_hold_a_value_past_its_last_use():
    model, x, _, _ = traced("mlp")
    tr = trace_graph(model, x)
    first = tr.layers[0].node
    runner = GraphRunner(tr.program, model.state_dict(), [(x, {})], keep=[first])
    runner.run()
    (value,) = runner.take(first)
    with torch.no_grad():
        assert torch.allclose(value, model.net[1](model.net[0](x[0])), atol=1e-6)


def test_missing_weights_and_inputs_are_named_before_running():
    model, x, _, _ = traced("mlp")
    tr = trace_graph(model, x)
    sd = dict(model.state_dict())
    del sd["net.1.weight"]
    with pytest.raises(pm.PermergeError, match=r"lack tensors .*net\.1\.weight"):
        GraphRunner(tr.program, sd, [(x, {})])
    with pytest.raises(pm.PermergeError, match="fewer inputs"):
        GraphRunner(tr.program, model.state_dict(), [((), {})])
    with pytest.raises(pm.PermergeError, match="not reached"):
        GraphRunner(tr.program, model.state_dict(), [(x, {})]).run_to("no_such_node")


def test_a_cached_program_holds_no_weights():
    model, x, _, _ = traced("mlp")
    tr = trace_graph(model, x)
    held = {id(t) for t in tr.program.constants.values()}
    assert not held & {id(p) for p in model.parameters()}
    assert not list(tr.program.module.parameters()) and not list(tr.program.module.buffers())
