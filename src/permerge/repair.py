"""Fix activation statistics after merging: BatchNorm reset (and REPAIR, Jordan et al. 2022).

Interpolating two aligned networks shrinks the variance of hidden activations ("variance
collapse"); BatchNorm's stored running statistics are then wrong for the merged model. Resetting
them on a few batches of data fixes BN networks; REPAIR does the same for any network.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["reset_bn_stats"]


def _inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def reset_bn_stats(model: nn.Module, data: Iterable[Any], batches: int = 10) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``data``.

    Uses the cumulative average over ``batches`` batches (``momentum=None``), so the estimate
    does not depend on the old statistics. The input model is not modified.
    """
    out = copy.deepcopy(model)
    norms = [m for m in out.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return out
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    out.train()
    with torch.no_grad():
        for batch in itertools.islice(data, batches):
            out(_inputs(batch))
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    return out.eval()
