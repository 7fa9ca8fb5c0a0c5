"""Shared fixtures: the zoo on sys.path and a per-session cache of traced zoo models."""

from __future__ import annotations

import functools
import os
import pathlib
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spin-waiting workers

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import pytest  # noqa: E402
from zoo import ZOO_BY_NAME  # noqa: E402

import permerge  # noqa: E402


@functools.cache
def traced(name: str):
    """(model, inputs, kwargs, spec) for a zoo entry, traced once per session."""
    z = ZOO_BY_NAME[name]
    model, inputs = z.build(), z.inputs()
    spec = permerge.trace(model, inputs, example_kwargs=z.input_kwargs)
    return model, inputs, z.input_kwargs, spec


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
