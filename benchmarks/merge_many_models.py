"""The members merged by ``merge_many.py``: N Fashion-MNIST models per setting, trained once and cached.

Settings (each member is seed ``s`` of one recipe; the cache key holds every hyperparameter):

* ``mlp``: MLP 784-512x3-10, the recipe of BENCHMARKING.md (Adam 1e-3, batch 128, 10 epochs on
  all 60k training images) -- normally trained members;
* ``mlp-half``: the same MLP trained the way Git Re-Basin's MergeMany experiment trains its
  MNIST MLPs (``mnist_mlp_wm_many.py`` in samuela/git-re-basin): each member on its own random
  half of the training set (seeded by the member's seed), Adam 1e-3, batch 500, 100 epochs --
  members that overfit their half;
* ``mlp-wide``: MLP 784-1024x3-10, trained as ``mlp`` (wider nets are closer to linearly mode
  connected after matching);
* ``vgg``: VGG 32-32-64-64 + BatchNorm, BENCHMARKING.md's SGD recipe (Nesterov, one-cycle peak lr
  0.05, wd 5e-4, batch 128), 3 epochs on all 60k images.

Run ``python benchmarks/merge_many_models.py --settings vgg`` to train (and cache) ahead of the
benchmark; ``merge_many.py`` loads from the same cache.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported; see BENCHMARKING.md

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

from common import cached_model, load_fashion_mnist, train  # noqa: E402

from permerge.models import MLP, VGG  # noqa: E402


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    factory: Callable[[], nn.Module]
    recipe: str
    epochs: int
    batch_size: int
    half: bool = False  # each member on its own random half of the training set

    def member(self, seed: int, x: Tensor, y: Tensor, threads: int) -> nn.Module:
        def fit(model: nn.Module, s: int) -> nn.Module:
            xs, ys = (x, y) if not self.half else subset(x, y, s)
            return train(model, xs, ys, recipe=self.recipe, seed=s, epochs=self.epochs,
                         batch_size=self.batch_size, threads=threads, quiet=True)  # fmt: skip

        key = {"recipe": self.recipe, "epochs": self.epochs, "bs": self.batch_size, "half": self.half}
        return cached_model(f"many-{self.name}", self.factory, seed, fit, key=key)


def subset(x: Tensor, y: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Member ``seed``'s random half of the training set."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(10_000 + seed))[: len(x) // 2]
    return x[idx], y[idx]


SETTINGS = {
    s.name: s
    for s in (
        Setting("mlp", "MLP 784-512x3-10, normally trained", partial(MLP, hidden=(512,) * 3), "adam", 10, 128),
        Setting("mlp-half", "MLP 784-512x3-10, each on a random half, 100 epochs",
                partial(MLP, hidden=(512,) * 3), "adam", 100, 500, half=True),
        Setting("mlp-wide", "MLP 784-1024x3-10, normally trained", partial(MLP, hidden=(1024,) * 3), "adam", 10, 128),
        Setting("vgg", "VGG 32-32-64-64 + BN", partial(VGG, (32, 32, 64, 64), norm="bn"), "sgd", 3, 128),
    )  # fmt: skip
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default="mlp,mlp-half,vgg")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    x, y = load_fashion_mnist("train")
    for name in args.settings.split(","):
        for seed in range(args.members):
            SETTINGS[name].member(seed, x, y, args.threads)


if __name__ == "__main__":
    main()
