"""The single LAP call site: index convention, backends agreeing, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from permerge.match import lap

BACKENDS = lap.available_backends()


def _brute_force_best(cost: np.ndarray) -> float:
    from itertools import permutations

    n = cost.shape[0]
    return max(sum(cost[i, p[i]] for i in range(n)) for p in permutations(range(n)))


def test_convention_row_i_goes_to_column_perm_i():
    cost = torch.tensor([[0.0, 0.0, 5.0], [3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    for backend in BACKENDS:
        assert lap.solve(cost, backend=backend).tolist() == [2, 0, 1]
        assert lap.solve(-cost, maximize=False, backend=backend).tolist() == [2, 0, 1]
        assert lap.solve(cost, backend=backend).dtype == torch.long


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_backends_are_optimal_on_small_costs(n, seed):
    cost = np.random.default_rng(seed).standard_normal((n, n))
    best = _brute_force_best(cost)
    for backend in BACKENDS:
        perm = lap.solve(cost, backend=backend).numpy()
        assert sorted(perm.tolist()) == list(range(n))
        assert cost[np.arange(n), perm].sum() == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n", [1, 17, 300])
@pytest.mark.parametrize("kind", ["random", "near_diagonal"])
def test_backends_agree_on_random_costs(n, kind):
    rng = np.random.default_rng(n)
    cost = rng.standard_normal((n, n)).astype(np.float32)
    if kind == "near_diagonal":
        cost += 4 * np.eye(n, dtype=np.float32)
    perms = {b: lap.solve(torch.from_numpy(cost), backend=b) for b in BACKENDS}
    values = {b: cost.astype(np.float64)[np.arange(n), p.numpy()].sum() for b, p in perms.items()}
    # a continuous random cost has a unique optimum, so the permutations themselves agree
    assert all(torch.equal(p, perms["scipy"]) for p in perms.values()), values


def test_rectangular_cost_matches_every_row():
    cost = np.array([[1.0, 0.0, 9.0, 0.0], [0.0, 7.0, 8.0, 0.0]])
    for backend in BACKENDS:
        assert lap.solve(cost, backend=backend).tolist() == [2, 1]


def test_degenerate_costs_still_give_permutations():
    for cost in (np.zeros((5, 5)), np.ones((4, 4)), np.full((3, 3), -1e30)):
        for backend in BACKENDS:
            assert sorted(lap.solve(cost, backend=backend).tolist()) == list(range(len(cost)))


def test_auto_prefers_lap_when_installed():
    assert lap.resolve_backend("auto") == BACKENDS[0]
    assert "scipy" in BACKENDS


def test_unknown_backend_lists_available():
    with pytest.raises(lap.LapError, match=r"unknown LAP backend 'munkres'; choose one of auto, .*scipy"):
        lap.resolve_backend("munkres")


def test_uninstalled_backend_says_how_to_install(monkeypatch):
    monkeypatch.setattr(lap, "available_backends", lambda: ("scipy",))
    with pytest.raises(lap.LapError, match=r"'lap' is not installed \(pip install 'permerge\[lap\]', which installs lapx\)"):
        lap.resolve_backend("lap")
    assert lap.resolve_backend("auto") == "scipy"


@pytest.mark.parametrize(
    ("cost", "message"),
    [
        (np.zeros((3, 2)), "no more rows than columns, got shape \\(3, 2\\)"),
        (np.zeros(3), "must be 2-d"),
        (np.array([[0.0, np.nan], [1.0, 0.0]]), "NaN or infinite"),
    ],
)
def test_bad_costs_are_rejected(cost, message):
    with pytest.raises(lap.LapError, match=message):
        lap.solve(cost, backend="scipy")


def test_the_original_lap_package_does_not_count_as_installed(monkeypatch):
    import sys
    import types

    old_lap = types.ModuleType("lap")
    old_lap.lapjv = lambda *a, **k: None  # the original package: lapjv only, no lapjvh
    monkeypatch.setitem(sys.modules, "lap", old_lap)
    monkeypatch.setattr(lap.importlib.util, "find_spec", lambda name: object())
    assert lap.available_backends() == ("scipy",)
    with pytest.raises(lap.LapError, match="which installs lapx"):
        lap.resolve_backend("lap")
