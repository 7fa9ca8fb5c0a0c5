"""Models for the merge tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def bn_models():
    """``make(factory, seeds)``: one eval-mode model per seed, BatchNorm statistics and affine far
    from the identity (so merges that mishandle them show)."""

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
