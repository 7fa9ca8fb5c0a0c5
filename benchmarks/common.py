"""Shared helpers for permerge's benchmarks: Fashion-MNIST, training, checkpoint cache, barriers, timing.

The training recipes are the two of ``BENCHMARKING.md`` (measured on a 2-core CPU):

* ``"adam"`` -- MLPs: Adam, lr 1e-3, batch 128.
* ``"sgd"`` -- CNNs: SGD with Nesterov momentum 0.9, one-cycle schedule peaking at lr 0.05,
  weight decay 5e-4, batch 128.

Barriers follow Git Re-Basin (Ainsworth et al., 2023): for ``θ(α) = (1-α)·θ_A + α·θ_B`` on an
evenly spaced α grid, the *loss barrier* is ``max_α L(θ(α)) - ((1-α)·L(θ_A) + α·L(θ_B))`` and the
*accuracy barrier* is ``max_α ((1-α)·acc(θ_A) + α·acc(θ_B)) - acc(θ(α))``; with ``bn_reset`` every
interpolated model (the endpoints included) gets its BatchNorm statistics re-estimated first
(REPAIR, Jordan et al., 2023, shows the averaged statistics are meaningless).

Nothing here modifies a model it is given, except :func:`train`, whose job that is.
"""

from __future__ import annotations

import ctypes
import gc
import gzip
import hashlib
import json
import logging
import math
import os
import resource
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from permerge import interpolate
from permerge.demo import has_batchnorm
from permerge.evaluate import accuracy
from permerge.evaluate import barrier as pm_barrier
from permerge.evaluate import evaluate as pm_evaluate
from permerge.repair import reset_bn_stats as pm_reset_bn_stats

LOG = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # of the 60k training images, pixels in [0, 1]
DEFAULT_CACHE = ROOT / "benchmarks" / "_cache"

T = TypeVar("T")

__all__ = [
    "RECIPES",
    "BarrierResult",
    "Recipe",
    "RssSampler",
    "Timer",
    "Timing",
    "barrier",
    "cached_model",
    "evaluate",
    "has_batchnorm",
    "load_fashion_mnist",
    "median_time",
    "num_params",
    "peak_rss_mb",
    "reset_bn_stats",
    "save_results",
    "train",
]


# -- data -------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian header, then uint8 data) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} but the file holds {data.size} bytes of data")
    return data.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install the dataset with "
        "`apt-get install dataset-fashion-mnist` (or point FASHION_MNIST_DIR at a folder holding the idx files)"
    )


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as normalised float32 images and labels.

    Reads the IDX files (gzipped or not) from ``root`` (default ``$FASHION_MNIST_DIR`` or
    ``/usr/share/datasets/fashion-mnist``, where ``apt-get install dataset-fashion-mnist`` puts them).

    Returns:
        ``x`` of shape ``(N, 1, 28, 28)``, float32, standardised with the training set's mean and
        std; ``y`` of shape ``(N,)``, int64 class ids in ``0..9``.

    Example:
        >>> x, y = load_fashion_mnist("test")
        >>> tuple(x.shape), x.dtype, tuple(y.shape), y.dtype
        ((10000, 1, 28, 28), torch.float32, (10000,), torch.int64)
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = FASHION_MNIST_DIR if root is None else Path(root)
    images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def iter_batches(x: Tensor, batch_size: int, *, limit: int | None = None) -> Iterator[Tensor]:
    """Consecutive slices of ``x`` of ``batch_size`` rows (at most ``limit`` of them)."""
    n = math.ceil(len(x) / batch_size) if limit is None else min(limit, math.ceil(len(x) / batch_size))
    for i in range(n):
        yield x[i * batch_size : (i + 1) * batch_size]


# -- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """An optimiser and schedule; see the module docstring for the two built-in ones."""

    name: str
    optimizer: str  # "adam" | "sgd"
    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    one_cycle: bool = False


RECIPES: dict[str, Recipe] = {
    "adam": Recipe("adam", "adam", 1e-3),
    "sgd": Recipe("sgd", "sgd", 0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, one_cycle=True),
}


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (unchanged if None), then restore."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    recipe: str | Recipe,
    seed: int,
    epochs: int,
    batch_size: int = 128,
    threads: int | None = None,
    quiet: bool = False,
) -> nn.Module:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy; returns it in eval mode.

    ``seed`` fixes the data order (the caller seeds the initialisation); ``recipe`` is a name in
    :data:`RECIPES` or a :class:`Recipe`. The last partial batch of each epoch is dropped.
    """
    r = RECIPES[recipe] if isinstance(recipe, str) else recipe
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(x) // batch_size
    if r.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    elif r.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=r.lr, momentum=r.momentum, nesterov=r.nesterov, weight_decay=r.weight_decay
        )
    else:
        raise ValueError(f"unknown optimizer {r.optimizer!r}")
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=epochs * steps_per_epoch)
        if r.one_cycle
        else None
    )
    model.train()
    with num_threads(threads):
        bar = tqdm(total=epochs * steps_per_epoch, desc=f"train ({r.name}, seed {seed})", disable=quiet)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            running = 0.0
            for step in range(steps_per_epoch):
                idx = order[step * batch_size : (step + 1) * batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
                bar.update()
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{running:.3f}")
        bar.close()
    return model.eval()


def _cache_path(cache_dir: Path, name: str, seed: int, key: Mapping[str, Any]) -> Path:
    def fmt(v: Any) -> str:
        return "x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    readable = "-".join(f"{k}{fmt(v)}" for k, v in sorted(key.items()))
    digest = hashlib.sha256(json.dumps({"name": name, "seed": seed, **key}, sort_keys=True, default=str).encode())
    return cache_dir / f"{name}-seed{seed}-{readable}-{digest.hexdigest()[:8]}.safetensors"


def cached_model(
    name: str,
    factory: Callable[[], nn.Module],
    seed: int,
    train_fn: Callable[[nn.Module, int], nn.Module],
    cache_dir: str | Path = DEFAULT_CACHE,
    *,
    key: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A trained model: loaded from the cache if there, else trained once and cached.

    The model is built as ``factory()`` under ``torch.manual_seed(seed)``; on a cache miss
    ``train_fn(model, seed)`` trains it and its state dict is saved as safetensors (atomically).
    The file name is derived from ``name``, ``seed`` and ``key`` -- put every hyperparameter that
    changes the result there (epochs, widths, recipe, ...), so that changing one retrains.

    Example:
        >>> from functools import partial
        >>> from permerge.models import MLP
        >>> x, y = load_fashion_mnist("train")
        >>> fit = lambda m, s: train(m, x, y, recipe="adam", seed=s, epochs=10)
        >>> mlp = cached_model("mlp", partial(MLP, hidden=(512,) * 3), 0, fit,
        ...                    key={"epochs": 10, "widths": (512,) * 3, "recipe": "adam"})
    """
    from safetensors.torch import load_model, save_model

    key = dict(key or {})
    path = _cache_path(Path(cache_dir), name, seed, key)
    torch.manual_seed(seed)
    model = factory()
    if path.is_file():
        LOG.info("loading %s from %s", name, path)
        load_model(model, str(path))
        return model.eval()
    LOG.info("training %s (seed %d); will cache to %s", name, seed, path)
    start = time.perf_counter()
    model = train_fn(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"name": name, "seed": str(seed), "train_seconds": f"{time.perf_counter() - start:.1f}"}
    meta.update({k: json.dumps(v, default=str) for k, v in key.items()})
    save_model(model, str(tmp), metadata=meta)
    tmp.replace(path)
    return model.eval()


# -- evaluation -------------------------------------------------------------------------------


def num_params(model: nn.Module) -> int:
    """Number of parameters (tied ones once)."""
    return sum(p.numel() for p in model.parameters())


def _batches(x: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    return list(zip(iter_batches(x, batch_size), iter_batches(y, batch_size)))


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy (fraction in [0, 1]) of ``model`` in eval mode
    (:func:`permerge.evaluate.evaluate` over batches of ``batch_size`` rows; the mode is restored)."""
    r = pm_evaluate(model, _batches(x, y, batch_size), F.cross_entropy, {"accuracy": accuracy})
    return r["loss"], r["accuracy"]


def reset_bn_stats(model: nn.Module, x: Tensor, batches: int = 10, batch_size: int = 500) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on the first
    ``batches`` batches of ``batch_size`` rows of ``x`` (:func:`permerge.repair.reset_bn_stats`), in
    eval mode; ``model`` is untouched."""
    return pm_reset_bn_stats(model, iter_batches(x, batch_size, limit=batches), batches).eval()


@dataclass(frozen=True)
class BarrierResult:
    """The interpolation curve and its barriers (see the module docstring for the definitions)."""

    alphas: tuple[float, ...]
    losses: tuple[float, ...]
    accuracies: tuple[float, ...]
    loss_barrier: float
    acc_barrier: float

    @property
    def midpoint_acc(self) -> float:
        return self.accuracies[len(self.alphas) // 2]


def barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    x: Tensor,
    y: Tensor,
    alphas: int | Sequence[float] = 11,
    bn_reset: bool = True,
    *,
    bn_data: Tensor | None = None,
    bn_batches: int = 10,
    batch_size: int = 1000,
    endpoints: tuple[tuple[float, float], tuple[float, float]] | None = None,
    quiet: bool = True,
) -> BarrierResult:
    """Test loss and accuracy barriers of the straight line from ``model_a`` to ``model_b``.

    Each point is ``permerge.interpolate`` (BatchNorm reset by :func:`reset_bn_stats` when
    ``bn_reset``), evaluated by :func:`evaluate`; the barriers are :func:`permerge.evaluate.barrier`
    (definition ``"line"``).

    Args:
        model_a, model_b: same architecture; B already aligned to A (or not, for the naive
            baseline). Neither is modified.
        x, y: the evaluation set (the test set in the benchmarks).
        alphas: number of evenly spaced points in [0, 1], or the points themselves.
        bn_reset: re-estimate BatchNorm statistics at every α (a no-op for models without BN).
        bn_data: inputs for the re-estimation (training images); defaults to ``x``.
        bn_batches: batches of 500 rows of ``bn_data`` used per re-estimation.
        batch_size: evaluation batch size.
        endpoints: ``((loss_A, acc_A), (loss_B, acc_B))`` already measured (the same for every
            permutation of B, BN reset included), to skip evaluating α = 0 and 1.

    Returns:
        A :class:`BarrierResult`; barriers can be slightly negative when the path is convex.
    """
    grid = tuple(float(a) for a in (torch.linspace(0, 1, alphas).tolist() if isinstance(alphas, int) else alphas))
    if grid[0] != 0.0 or grid[-1] != 1.0:
        raise ValueError(f"the α grid must start at 0 and end at 1, got {grid}")
    reset = bn_reset and has_batchnorm(model_a)
    known = {} if endpoints is None else {0: endpoints[0], len(grid) - 1: endpoints[1]}
    losses, accs = [], []
    for i, alpha in enumerate(tqdm(grid, desc="barrier", disable=quiet, leave=False)):
        if i in known:
            loss, acc = known[i]
        else:
            m = interpolate(model_a, model_b, alpha)
            if reset:
                m = reset_bn_stats(m, x if bn_data is None else bn_data, bn_batches)
            loss, acc = evaluate(m, x, y, batch_size)
        losses.append(loss)
        accs.append(acc)
    return BarrierResult(grid, tuple(losses), tuple(accs), pm_barrier(losses, grid), pm_barrier(accs, grid, True))


# -- timing and memory ------------------------------------------------------------------------


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock) and ``t.cpu`` (this process's CPU
    time, all threads: on a shared machine, wall time alone mixes in other people's load)."""

    def __enter__(self) -> Timer:
        self.seconds = self.cpu = math.nan
        self._start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu = time.process_time() - self._cpu


@dataclass(frozen=True)
class Timing(Generic[T]):
    """Wall times of repeated calls and the last call's result."""

    times: tuple[float, ...]
    result: T
    cpu_times: tuple[float, ...] = ()

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times) if self.cpu_times else math.nan

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.times), max(self.times)

    def __str__(self) -> str:
        lo, hi = self.spread
        return f"{self.median:.3g} s ({lo:.3g}–{hi:.3g})" if len(self.times) > 1 else f"{self.median:.3g} s"


def median_time(fn: Callable[[], T], repeats: int = 3, *, warmup: int = 0) -> Timing[T]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; see :class:`Timing`."""
    for _ in range(warmup):
        fn()
    times, cpu, result = [], [], None
    for _ in range(repeats):
        with Timer() as t:
            result = fn()
        times.append(t.seconds)
        cpu.append(t.cpu)
    return Timing(tuple(times), result, tuple(cpu))  # type: ignore[arg-type]


def save_results(name: str, title: str, body: str, note: str) -> Path:
    """Write ``benchmarks/results/{name}.md``: the title, the exact command (this script and its
    arguments), the tables and the measurement note."""
    cmd = shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    out = ROOT / "benchmarks" / "results" / f"{name}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(f"# {title}\n\n```\n{cmd}\n```\n\n{body}\n\n{note}\n")
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``getrusage``; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """Current resident set size in MiB (Linux ``/proc``; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except OSError:
        return peak_rss_mb()


def release_free_memory() -> None:
    """``gc.collect()`` and, on glibc, ``malloc_trim(0)``: hand freed heap pages back to the OS."""
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class RssSampler:
    """Peak RSS growth over a block: ``with RssSampler() as s: ...`` then ``s.peak_mb``.

    ``getrusage``'s peak is per process and only grows, so it cannot attribute memory to one step
    of a long benchmark; this samples the current RSS every ``interval`` seconds in a thread and
    reports the largest increase over the RSS at entry (a lower bound on the true peak). On entry
    it runs the garbage collector and glibc's ``malloc_trim(0)``, so that memory freed by earlier
    steps is returned to the OS rather than silently reused (which would make whichever step runs
    second look free).
    """

    interval: float = 0.005
    peak_mb: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def _run(self, base: float) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, current_rss_mb() - base)

    def __enter__(self) -> RssSampler:
        release_free_memory()
        base = current_rss_mb()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(base,), daemon=True)
        self._thread.start()
        self._base = base
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb() - self._base)


# -- a ResNet-50-sized model, for timing ------------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet-v1.5 bottleneck: 1x1 reduce, 3x3 (stride here), 1x1 expand x4, BN; projection shortcut."""

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = 4 * width
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 (torchvision layout: bottleneck stages [3, 4, 6, 3], 256..2048 wide), plain torch.

    25.6M parameters with 1000 classes, like ``torchvision.models.resnet50``; written out here so
    the benchmark does not need torchvision.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, layers: Sequence[int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in, stages = 64, []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(c_in, width, stride=2 if i > 0 and j == 0 else 1))
                c_in = 4 * width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
