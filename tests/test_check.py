"""The checks: one input validator, and a function check that compares exactly where outputs are
exact, runs train mode and a second batch size, never touches the model, and catches corrupted specs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import permerge as pm
from permerge.check import (
    check_compatible,
    check_function_preserved,
    output_error,
    random_moving_permutation,
    tied_aliases,
    validate_spec,
)
from permerge.errors import ConfigMismatchError, FunctionNotPreservedError, SpecError, StateDictMismatchError
from permerge.models import MLP, VGG
from permerge.spec import Axis, Group, PermutationSpec

# -- check_compatible --------------------------------------------------------------------------------


def _sd(**shapes):
    return {k: torch.zeros(s) for k, s in shapes.items()}


@pytest.mark.parametrize(
    ("models", "kwargs", "error", "message"),
    [
        ([_sd(w=(2, 3)), _sd(w=(2, 3), v=(1,))], {}, StateDictMismatchError, r"only in B \['v'\]"),
        ([_sd(w=(2, 3)), _sd(w=(3, 2))], {}, StateDictMismatchError, r"different shapes: \['w: \(2, 3\) vs \(3, 2\)'\]"),
        ([_sd(w=(2,)), {"w": torch.tensor([0.0, float("nan")])}], {}, StateDictMismatchError, r"non-finite .* B\['w'\]"),
        ([_sd(w=(2,)), _sd(w=(2,))], {"configs": [{"heads": 4, "d": 8}, {"heads": 8, "d": 8}]}, ConfigMismatchError,
         r"config.json field 'heads' is 4 vs 8"),
        ([_sd(w=(2,)), _sd(w=(2,))], {"configs": [{"heads": 4}, {}]}, ConfigMismatchError, r"'heads' is 4 vs '<unset>'"),
        ([_sd(w=(2,))], {"architecture": _sd(w=(2,), u=(1,))}, StateDictMismatchError, r"missing keys \['u'\]"),
        ([_sd(w=(2,), x=(1,))], {"architecture": _sd(w=(2,))}, StateDictMismatchError, r"unexpected keys \['x'\]"),
        ([_sd(w=(3,))], {"architecture": _sd(w=(2,))}, StateDictMismatchError, r"'w': \(3,\), the model expects \(2,\)"),
        ([{"w": torch.zeros(2, dtype=torch.int8)}], {"architecture": _sd(w=(2,))}, StateDictMismatchError,
         r"stores 'w' as torch.int8 where the model has torch.float32"),
        ([_sd(w=(2,))], {"spec": PermutationSpec((Group("g", 3, (Axis("w", 0),)),))}, SpecError, "length 2"),
    ],
)  # fmt: skip
def test_check_compatible_names_the_first_problem(models, kwargs, error, message):
    names = ["A", "B"][: len(models)]
    with pytest.raises(error, match=message):
        check_compatible(models, names, **kwargs)


def test_check_compatible_accepts_compatible_inputs_and_tied_aliases():
    emb = nn.Embedding(5, 3)
    tied = nn.ModuleDict({"e": emb, "h": nn.Linear(3, 5, bias=False)})
    tied["h"].weight = emb.weight
    assert tied_aliases(tied) == {"h.weight": "e.weight"}
    assert tied_aliases(tied.state_dict()) == {"h.weight": "e.weight"}  # by storage: state_dict() makes new objects
    check_compatible([{"e.weight": torch.ones(5, 3)}], ["B"], architecture=tied)  # the alias may be missing
    half = {k: v.half() for k, v in MLP(hidden=(4,)).state_dict().items()}
    check_compatible([half, half], ["A", "B"], architecture=MLP(hidden=(4,)))  # float16 is still floating


# -- outputs --------------------------------------------------------------------------------------


def test_integer_and_boolean_outputs_compare_exactly():
    assert output_error([torch.tensor([1, 2])], [torch.tensor([1, 2])]) == (0.0, 0.0)
    assert output_error([torch.tensor([1, 2])], [torch.tensor([1, 3])]) == (float("inf"), float("inf"))
    assert output_error([torch.tensor([True])], [torch.tensor([False])])[1] == float("inf")
    assert output_error([torch.ones(2)], [torch.ones(3)])[1] == float("inf")
    err, rel = output_error([torch.tensor([2.0, -4.0])], [torch.tensor([2.0, -4.001])])
    assert err == pytest.approx(1e-3, rel=1e-3) and rel == pytest.approx(2.5e-4, rel=1e-3)


class ArgmaxNet(nn.Module):
    """Returns logits and the predicted ids: a wrong permutation of the head changes only the ids' order…"""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        logits = self.fc2(torch.relu(self.fc1(x)))
        return logits.argmax(-1)


def test_check_fails_on_changed_integer_outputs():
    torch.manual_seed(0)
    model, x = ArgmaxNet().eval(), torch.randn(16, 6)
    # a spec that wrongly lets the output classes move: logits are not returned, only their argmax
    bad = PermutationSpec((Group("cls", 4, (Axis("fc2.weight", 0), Axis("fc2.bias", 0))),))
    with pytest.raises(FunctionNotPreservedError, match="group 'cls'"):
        check_function_preserved(model, bad, x, {"cls": torch.tensor([1, 0, 3, 2])})
    good = pm.trace(model, x)
    assert check_function_preserved(model, good, x, random_moving_permutation(good)).relative_error == 0.0


class DropoutBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.fc1(x))))
        return self.fc2(nn.functional.dropout(h, 0.3, self.training))


def test_train_mode_with_dropout_off_is_checked_and_the_model_untouched():
    torch.manual_seed(0)
    model, x = DropoutBN(), torch.randn(4, 6)
    model.train()  # the user's flag must survive the check
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = pm.trace(model, x)
    state = torch.random.get_rng_state()
    rep = check_function_preserved(model, spec, x, random_moving_permutation(spec))
    assert rep.runs == ("eval, batch 4", "train (dropout off), batch 4", "eval, batch 5") and rep.relative_error < 1e-5
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN stats and counter untouched
    assert torch.equal(torch.random.get_rng_state(), state)


class BatchBranch(nn.Module):
    """Takes a training-only head in train mode and another path at batch size ≠ 4: an eval-only,
    one-batch check would not see either."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.training:
            return self.aux(h)
        return self.fc2(h) if x.shape[0] == 4 else self.fc2(h) + self.aux(h)


@pytest.mark.parametrize("train", [True, False])
def test_branches_outside_the_example_call_are_checked(train):
    torch.manual_seed(0)
    model, x = BatchBranch().eval(), torch.randn(4, 6)
    # hidden units of fc1, as a trace of the eval/batch-4 call alone would see them (aux left out)
    spec = PermutationSpec((Group("h", 8, (Axis("fc1.weight", 0), Axis("fc1.bias", 0), Axis("fc2.weight", 1))),))
    perm = random_moving_permutation(spec)
    if train:  # the eval runs at a batch size the model does not take then go away: check train mode
        with pytest.raises(FunctionNotPreservedError, match=r"train \(dropout off\)|eval, batch 5"):
            check_function_preserved(model, spec, x, perm)
    else:
        with pytest.raises(FunctionNotPreservedError, match="group 'h'"):
            check_function_preserved(model, spec, x, perm)


def test_runs_the_model_cannot_make_are_skipped_and_reported():
    model, x = DropoutBN().eval(), torch.randn(1, 6)  # BatchNorm1d in train mode needs batch > 1
    spec = pm.trace(model, x)
    rep = check_function_preserved(model, spec, x, random_moving_permutation(spec))
    assert rep.runs == ("eval, batch 1", "eval, batch 2") and rep.relative_error < 1e-5
    assert len(rep.skipped) == 1 and rep.skipped[0].startswith("train (dropout off), batch 1: ValueError")


def test_half_precision_models_are_checked_in_float32():
    torch.manual_seed(0)
    model = MLP(in_features=6, hidden=(32, 32), num_classes=3).half()
    x = torch.randn(3, 6).half()
    spec = pm.trace(model.float(), x.float())
    model.half()
    assert check_function_preserved(model, spec, x, random_moving_permutation(spec)).relative_error < 1e-5


# -- validate_spec ---------------------------------------------------------------------------------


def test_random_moving_permutation_moves_every_group():
    spec = PermutationSpec(tuple(Group(f"g{i}", n, (Axis(f"w{i}", 0),)) for i, n in enumerate((1, 2, 2, 3, 5))))
    for seed in range(20):
        perm = random_moving_permutation(spec, seed)
        assert torch.equal(perm["g0"], torch.tensor([0]))
        assert all(not torch.equal(perm[g.name], torch.arange(g.size)) for g in spec.groups if g.size > 1)


def _drop_member(spec, key_part):
    groups = []
    for g in spec.groups:
        kept = tuple(ax for ax in g.members if key_part not in ax.key)
        groups.append(dataclasses.replace(g, members=kept) if kept else g)
    return PermutationSpec(tuple(groups), spec.frozen)


@pytest.mark.parametrize("seed", range(3))
def test_validate_spec_catches_a_corrupted_spec_on_a_fresh_model(seed):
    """A BatchNorm left out of its conv's group is invisible at init (weight 1, bias 0, mean 0, var 1);
    validate_spec randomises those on a copy."""
    torch.manual_seed(seed)
    model, x = VGG(widths=(2, 2, 4, 4)).eval(), torch.randn(2, 1, 28, 28)
    spec = pm.trace(model, x)
    bad = _drop_member(spec, "features.0.1.")  # the first BatchNorm no longer moves with its conv
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FunctionNotPreservedError):
        validate_spec(bad, model, x, seed=seed)
    assert validate_spec(spec, model, x, seed=seed).relative_error < 1e-5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
