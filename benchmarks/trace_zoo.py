"""Permutation coverage and function preservation: permerge's tracer vs. snimu's ``rebasin``.

Run from the repository root (needs the ``bench`` extra, ``pip install -e .[bench]``)::

    python benchmarks/trace_zoo.py [--models mlp,hf_gpt2] [--repeats 3]

``PERMERGE_BENCH_THREADS`` sets the torch thread count (default 2). Progress and per-model
errors go to stderr; stdout gets one markdown table with a row per model of the test zoo
(``tests/zoo.py``) and a totals row. A tool that crashes on a model gets ``error: <type>`` in
the cells it did not fill, one that runs past ``--timeout`` seconds (default 60) on a model gets
``timeout``, and the benchmark goes on.

What is measured, per model:

* **trace / setup time** -- median over ``--repeats`` runs of ``permerge.trace`` and of
  constructing ``rebasin.PermutationCoordinateDescent`` (which is where rebasin traces the model
  with torchview and builds its permutations). Before the first model both tools run once on a
  tiny MLP so one-time costs (imports, export/dispatch caches) are not charged to it.
* **#groups / #perms** -- permerge's permutation groups; rebasin's distinct ``Permutation``
  objects left after its ``enforce_identity`` pass (see :func:`rebasin_coverage`).
* **permutable fraction** -- the same definition for both tools: the number of elements of
  floating-point state-dict tensors (parameters and buffers) that the tool permutes along at
  least one axis, divided by the number of elements of all floating-point state-dict tensors.
  Tied tensors count once per state-dict key. For permerge the permuted tensors are
  ``spec.keys``; for rebasin they are the ``parameter_b`` of every ``PermutationInfo`` of its
  permutations (exactly the tensors its ``apply_permutations`` writes; it never touches buffers).
* **function-preservation error** -- ``max |f(x) - f'(x)| / max |f(x)|`` over the model's output
  on the zoo input, where ``f'`` is the permuted model; ``FAIL`` marks errors above 1e-4. Both
  tools are checked on the same *independent* model ``B``: a copy of the zoo model with every
  floating-point state tensor redrawn (see :func:`independent_copy`), so that norm scales,
  biases and BatchNorm running statistics are not the constants (1 / 0) of a fresh
  initialisation, which would hide a tool that forgets to permute them. permerge: the maximum
  over 3 random permutations of its traced spec (``permerge.check.check_function_preserved``).
  rebasin: ``PermutationCoordinateDescent(A, B, x).rebasin()`` aligns ``B`` to the zoo model
  ``A`` and permutes ``B`` in place; rebasin only permutes, so ``B``'s output must not change.

The totals row counts the models whose function each tool preserved (a crash or timeout counts
as not preserved) and those where permerge's permutable fraction is at least rebasin's (rebasin
crashing before its permutations exist counts as covering nothing).

Hugging Face models are wrapped in :class:`LogitsAdapter` (passes the zoo's forward kwargs
such as ``use_cache=False`` and returns the logits tensor) for both tools, since rebasin
cannot pass keyword arguments and torchview expects tensor outputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import copy
import datetime
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import torch
from rebasin import PermutationCoordinateDescent
from rebasin.modules import ModuleBase
from rebasin.paths import LinearPath, ParallelPaths, PathSequence
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # this checkout's permerge and its zoo

from zoo import ZOO, ZOO_BY_NAME, ZooModel  # noqa: E402

import permerge  # noqa: E402
from permerge.check import check_function_preserved, output_error  # noqa: E402

TOL = 1e-4
N_PERMUTATIONS = 3
HEADER = (
    "model",
    "#params",
    "permerge trace (s)",
    "#groups",
    "permutable",
    "fn error",
    "rebasin setup (s)",
    "#perms",
    "permutable",
    "fn error",
)
T = TypeVar("T")


class LogitsAdapter(nn.Module):
    """``model(*args, **kwargs)`` with fixed ``kwargs``, returning the output's ``logits``."""

    def __init__(self, model: nn.Module, kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.kwargs = dict(kwargs)

    def forward(self, *args: Any) -> torch.Tensor:
        return self.model(*args, **self.kwargs).logits


@dataclass
class ToolResult:
    """One tool's cells for one model; ``None`` where a crash left a value unmeasured."""

    seconds: float | None = None
    count: int | None = None
    fraction: float | None = None
    error: float | None = None
    crash: str | None = None

    @property
    def preserved(self) -> bool:
        return self.crash is None and self.error is not None and self.error <= TOL


@dataclass
class Row:
    name: str
    params: int
    permerge: ToolResult
    rebasin: ToolResult


def build(entry: ZooModel) -> tuple[nn.Module, tuple[Any, ...]]:
    """The zoo model (HF ones behind :class:`LogitsAdapter`) in eval mode and its inputs."""
    model = entry.build()
    if entry.hf:
        model = LogitsAdapter(model, entry.input_kwargs).eval()
    return model, entry.inputs()


@torch.no_grad()
def independent_copy(model: nn.Module, seed: int) -> nn.Module:
    """A deep copy with every floating-point state tensor redrawn from a seeded generator.

    Positive tensors (norm scales, running variances) are multiplied by ``exp(N(0, 0.5))``,
    which keeps them positive; other tensors with spread are redrawn as Gaussians with their own
    mean and std; constant ones (zero biases and running means) get ``N(0, 0.1)`` added.
    """
    copied = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for t in copied.state_dict().values():
        if not t.is_floating_point() or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        if t.numel() and t.min() > 0:
            t.mul_(torch.exp(0.5 * noise))
        elif t.numel() > 1 and t.std() > 0:
            t.copy_(t.mean() + t.std() * noise)
        else:
            t.add_(0.1 * noise)
    return copied


def outputs(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(*inputs).detach().float()]


def floating_elements(state: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None) -> int:
    """Elements of the floating-point tensors of ``state`` (only those named in ``keys``, if given)."""
    wanted = set(state) if keys is None else set(keys)
    return sum(v.numel() for k, v in state.items() if k in wanted and v.is_floating_point())


def permutable_fraction(model: nn.Module, keys: Iterable[str]) -> float:
    state = model.state_dict()
    return floating_elements(state, keys) / floating_elements(state)


def timed(fn: Callable[[], T], repeats: int) -> tuple[T, float]:
    """The last result of ``repeats`` calls of ``fn`` and the median wall time of a call."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)  # type: ignore[return-value]


class Expired(Exception):
    """A tool ran past ``--timeout`` on one model."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`Expired` in the main thread once ``seconds`` have passed (Unix only)."""

    def expire(signum: int, frame: object) -> None:
        raise Expired(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def crashed(name: str, tool: str, exc: Exception, result: ToolResult) -> ToolResult:
    print(f"[{name}] {tool}: {type(exc).__name__}: {exc}", file=sys.stderr)
    result.crash = "timeout" if isinstance(exc, Expired) else f"error: {type(exc).__name__}"
    return result


def run_permerge(
    name: str, model: nn.Module, other: nn.Module, inputs: tuple[Any, ...], repeats: int, limit: int
) -> ToolResult:
    """Trace ``model``; check that random permutations of the spec preserve ``other``'s function."""
    result = ToolResult()
    try:
        with time_limit(limit):
            spec, result.seconds = timed(lambda: permerge.trace(model, inputs), repeats)
            result.count = len(spec.groups)
            result.fraction = permutable_fraction(model, spec.keys)
            result.error = max(
                check_function_preserved(
                    other, spec, inputs, permerge.random_permutation(spec, seed), tol=math.inf
                ).relative_error
                for seed in range(N_PERMUTATIONS)
            )
    except Exception as exc:
        return crashed(name, "permerge", exc, result)
    return result


def rebasin_modules(path: LinearPath | ParallelPaths | PathSequence) -> Iterator[ModuleBase]:
    """The permutable modules of rebasin's model graph, each once."""
    if isinstance(path, LinearPath):
        yield from path.modules
    else:
        for sub in path.paths:
            yield from rebasin_modules(sub)


def rebasin_coverage(pcd: PermutationCoordinateDescent, model_b: nn.Module) -> tuple[int, set[str]]:
    """The number of rebasin's permutations and the state-dict keys of the tensors they permute.

    Read per module rather than from ``pcd.pinit.model_graph.permutation_to_info``: that property
    returns the same (permutation, info) union, but every level of path nesting doubles each info
    list (``id_to_perminfo[id][1].extend(info)`` extends a list with itself): on ``hf_llama`` it
    holds 2.5e8 entries for 756 distinct ones. PCD iterates over that property and deep-copies
    every entry, which is why it times out on the HF transformers.
    """
    perms: set[int] = set()
    params: set[int] = set()
    for module in rebasin_modules(pcd.pinit.model_graph):
        for perm, infos in module.permutation_to_info:
            perms.add(id(perm))
            params.update(id(info.parameter_b) for info in infos)
    keys = {k for k, p in model_b.named_parameters(remove_duplicate=False) if id(p) in params}
    return len(perms), keys


def run_rebasin(
    name: str, model: nn.Module, other: nn.Module, inputs: tuple[Any, ...], repeats: int, limit: int
) -> ToolResult:
    """Build rebasin's PCD aligning ``other`` to ``model``, run it, and compare ``other``'s outputs."""
    result = ToolResult()
    data = inputs[0] if len(inputs) == 1 else list(inputs)
    try:
        with time_limit(limit):
            before = outputs(other, inputs)
            pcd, result.seconds = timed(lambda: PermutationCoordinateDescent(model, other, data), repeats)
            result.count, keys = rebasin_coverage(pcd, other)
            result.fraction = permutable_fraction(other, keys)
            torch.manual_seed(0)  # PCD visits permutations in torch.randperm order
            pcd.rebasin()
            result.error = output_error(before, outputs(other, inputs))[1]
    except Exception as exc:
        return crashed(name, "rebasin", exc, result)
    return result


def measure(entry: ZooModel, repeats: int, limit: int) -> Row:
    model, inputs = build(entry)
    params = sum(p.numel() for p in model.parameters())
    print(f"[{entry.name}] permerge", file=sys.stderr)
    ours = run_permerge(entry.name, model, independent_copy(model, seed=1), inputs, repeats, limit)
    print(f"[{entry.name}] rebasin", file=sys.stderr)
    theirs = run_rebasin(entry.name, model, independent_copy(model, seed=1), inputs, repeats, limit)
    return Row(entry.name, params, ours, theirs)


def warm_up() -> None:
    """Run both tools once on a tiny MLP so one-time costs are not charged to the first model."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    permerge.trace(mlp, (x,))
    PermutationCoordinateDescent(mlp, independent_copy(mlp, seed=1), x).rebasin()


def cells(r: ToolResult) -> list[str]:
    def value(v: float | int | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else (r.crash or "")

    error = value(r.error, ".1e") + (" FAIL" if r.error is not None and r.error > TOL else "")
    return [value(r.seconds, ".3f"), value(r.count, "d"), value(r.fraction, ".3f"), error]


def table(rows: list[Row], threads: int) -> str:
    lines = [
        f"threads: {threads} · torch {torch.__version__} · rebasin {version('rebasin')} · "
        f"{datetime.date.today().isoformat()}",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += [
        "| " + " | ".join([r.name, f"{r.params:,}", *cells(r.permerge), *cells(r.rebasin)]) + " |"
        for r in rows
    ]
    n = len(rows)
    covered = sum(
        r.permerge.fraction is not None and r.permerge.fraction >= (r.rebasin.fraction or 0.0) for r in rows
    )
    total = [""] * len(HEADER)
    total[0] = f"**total ({n})**"
    total[4] = f"≥ rebasin's on {covered}/{n}"
    total[5] = f"preserved on {sum(r.permerge.preserved for r in rows)}/{n}"
    total[9] = f"preserved on {sum(r.rebasin.preserved for r in rows)}/{n}"
    lines.append("| " + " | ".join(total) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: the whole zoo)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median is reported)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per tool and model")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.timeout < 1:
        parser.error("--repeats and --timeout must be at least 1")
    names = args.models.split(",") if args.models else [e.name for e in ZOO]
    unknown = [m for m in names if m not in ZOO_BY_NAME]
    if unknown:
        parser.error(f"unknown models {unknown}; the zoo has {sorted(ZOO_BY_NAME)}")

    threads = int(os.environ.get("PERMERGE_BENCH_THREADS", 2))
    torch.set_num_threads(threads)

    warm_up()
    rows = [measure(ZOO_BY_NAME[m], args.repeats, args.timeout) for m in names]
    print(table(rows, threads))


if __name__ == "__main__":
    main()
