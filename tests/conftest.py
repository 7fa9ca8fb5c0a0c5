"""Shared fixtures: the zoo on sys.path, its entries as test parameters, a per-session trace cache."""

from __future__ import annotations

import functools
import os
import pathlib
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spin-waiting workers

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import pytest  # noqa: E402
from zoo import ZOO, ZOO_BY_NAME  # noqa: E402

import permerge  # noqa: E402
from permerge.spec import PermutationSpec  # noqa: E402

_SPECS: dict[str, PermutationSpec] = {}


def zoo_params() -> list:
    """Every zoo entry's name as a test parameter, marked ``slow`` where the entry is."""
    return [pytest.param(z.name, marks=pytest.mark.slow) if z.slow else z.name for z in ZOO]


@functools.lru_cache(maxsize=4)  # the zoo's larger models are rebuilt rather than all kept alive
def _built(name: str):
    z = ZOO_BY_NAME[name]
    return z.build(), z.inputs()


def traced(name: str):
    """(model, inputs, kwargs, spec) for a zoo entry; the spec is traced once per session."""
    z = ZOO_BY_NAME[name]
    model, inputs = _built(name)
    if name not in _SPECS:
        _SPECS[name] = permerge.trace(model, inputs, example_kwargs=z.input_kwargs)
    return model, inputs, z.input_kwargs, _SPECS[name]


@pytest.fixture(scope="session")
def zoo_traced():
    return traced


@pytest.fixture(scope="session")
def bn_models():
    """``make(factory, seeds)``: one eval-mode model per seed, BatchNorm statistics and affine far
    from the identity (so merges that mishandle them show)."""
    import torch

    def make(factory, seeds):
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            m = factory().eval()
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.normal_()
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.data.normal_()
                    mod.bias.data.normal_()
            models.append(m)
        return models

    return make
