"""Tracing coverage over the test zoo: permutable fraction, frozen hidden spaces by kind, function
preservation; optionally against snimu's ``rebasin``.

Run from the repository root (the ``test`` extra plus ``pip install --no-deps timm``)::

    python benchmarks/trace_zoo.py [--zoo all|base|hf|timm] [--models a,b] [--repeats 1] [--rebasin]

``PERMERGE_BENCH_THREADS`` sets the torch thread count (default 2). Progress and per-model errors
go to stderr; stdout gets the tables, which are also written to ``benchmarks/results/`` (with the
command line). The zoo is ``tests/zoo.py``: hand-written models, tiny Hugging Face configs and
the timm cross-section of ``tests/timm_zoo.py``, all with random weights.

Per model:

* **trace (s)** -- median over ``--repeats`` uncached ``permerge.trace`` calls (``cache=False``),
  after one warm-up trace of a tiny MLP so one-time costs are not charged to the first model.
* **beyond permutations** -- groups whose traced symmetry class is richer than permutations
  (scaled permutations, orthogonal, invertible maps; ``permerge.graph.classes``).
* **groups**, **permutable** -- ``spec.permutable_fraction``: the share of hidden channel axes
  (parameter axes weighted by their tensor's size; model inputs/outputs and token rows excluded)
  that some group permutes.
* **fn error** -- ``max |f(x) - f'(x)| / max |f(x)|`` over 3 random permutations of the spec,
  on a copy whose constant state (BN statistics, norm affines, zero biases) is redrawn
  (``zoo.randomized``) so a forgotten buffer shows, in every run ``check_function_preserved``
  makes (eval and train mode, a second batch size); ``FAIL`` above 2e-4.
* **frozen hidden** -- the spec's frozen spaces that hold some layer's units, by kind
  (``permerge.spec.FrozenKind``); their reasons are listed in a second table.

The summary gives the timm cross-section's mean permutable fraction, how many of its models reach
0.99, and the number of ``rule_error`` spaces over the whole zoo (a rule that raised: a bug).

``--rebasin`` (needs the ``bench`` extra) adds, on the same models, ``rebasin`` 's setup time,
permutations, the share of floating-point state-dict elements in tensors each tool permutes, and
the function error of its own alignment of an independent copy (every state tensor redrawn),
which must not change that copy's function. HF models are wrapped in :class:`LogitsAdapter` for
both tools there, since rebasin cannot pass keyword arguments.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import collections
import contextlib
import copy
import datetime
import math
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # this checkout's permerge and its zoo

from zoo import ZOO, ZOO_BY_NAME, ZooModel, randomized  # noqa: E402

import permerge  # noqa: E402
from permerge.check import check_function_preserved, output_error  # noqa: E402
from permerge.spec import SYMMETRIES, FrozenKind, PermutationSpec  # noqa: E402

TOL = 2e-4  # float32: a train-mode pass of Inception v3 here is 6e-5 from float64 (see tests/test_apply.py)
N_PERMUTATIONS = 3
TARGET = 0.99
PARTS = {"base": lambda z: not z.hf and not z.name.startswith("timm/"), "hf": lambda z: z.hf,
         "timm": lambda z: z.name.startswith("timm/"), "all": lambda z: True}  # fmt: skip
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
    fraction: float | None = None  # permerge: hidden axes; rebasin mode: state-dict elements
    error: float | None = None
    crash: str | None = None
    frozen: list[tuple[FrozenKind, int, str]] = field(default_factory=list)  # permerge only
    classes: collections.Counter[str] = field(default_factory=collections.Counter)  # permerge: groups per class

    @property
    def preserved(self) -> bool:
        return self.crash is None and self.error is not None and self.error <= TOL


@dataclass
class Row:
    name: str
    params: int
    permerge: ToolResult
    rebasin: ToolResult | None = None


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


def hidden_frozen(spec: PermutationSpec) -> list[tuple[FrozenKind, int, str]]:
    """(kind, size, reason without the node it was found at) of each frozen hidden space."""
    return [(f.kind, f.size, f.reason.split(" at node ")[0]) for f in spec.frozen if not f.boundary]


def run_permerge(entry: ZooModel, model: nn.Module, inputs: tuple[Any, ...], repeats: int, limit: int) -> ToolResult:
    """Trace ``model`` uncached; check random permutations of the spec on a redrawn copy."""
    result = ToolResult()
    kwargs = entry.input_kwargs
    try:
        with time_limit(limit):
            spec, result.seconds = timed(
                lambda: permerge.trace(model, inputs, example_kwargs=kwargs, cache=False), repeats
            )
            result.count = len(spec.groups)
            result.fraction = spec.permutable_fraction(model.state_dict())
            result.frozen = hidden_frozen(spec)
            result.classes = collections.Counter(g.symmetry for g in spec.groups)
            result.error = max(
                check_function_preserved(
                    randomized(model, seed), spec, inputs, permerge.random_permutation(spec, seed),
                    example_kwargs=kwargs, tol=math.inf,
                ).relative_error
                for seed in range(N_PERMUTATIONS)
            )  # fmt: skip
    except Exception as exc:
        return crashed(entry.name, "permerge", exc, result)
    return result


# -- rebasin (``--rebasin``) ------------------------------------------------------------------


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


def floating_elements(state: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None) -> int:
    """Elements of the floating-point tensors of ``state`` (only those named in ``keys``, if given)."""
    wanted = set(state) if keys is None else set(keys)
    return sum(v.numel() for k, v in state.items() if k in wanted and v.is_floating_point())


def element_fraction(model: nn.Module, keys: Iterable[str]) -> float:
    state = model.state_dict()
    return floating_elements(state, keys) / floating_elements(state)


def rebasin_coverage(pcd: Any, model_b: nn.Module) -> tuple[int, set[str]]:
    """The number of rebasin's permutations and the state-dict keys of the tensors they permute.

    Read per module rather than from ``pcd.pinit.model_graph.permutation_to_info``: that property
    returns the same (permutation, info) union, but every level of path nesting doubles each info
    list (``id_to_perminfo[id][1].extend(info)`` extends a list with itself): on ``hf_llama`` it
    holds 2.5e8 entries for 756 distinct ones. PCD iterates over that property and deep-copies
    every entry, which is why it times out on the HF transformers.
    """
    from rebasin.paths import LinearPath

    def modules(path: Any) -> Iterator[Any]:
        if isinstance(path, LinearPath):
            yield from path.modules
        else:
            for sub in path.paths:
                yield from modules(sub)

    perms: set[int] = set()
    params: set[int] = set()
    for module in modules(pcd.pinit.model_graph):
        for perm, infos in module.permutation_to_info:
            perms.add(id(perm))
            params.update(id(info.parameter_b) for info in infos)
    keys = {k for k, p in model_b.named_parameters(remove_duplicate=False) if id(p) in params}
    return len(perms), keys


def run_rebasin(name: str, model: nn.Module, inputs: tuple[Any, ...], repeats: int, limit: int) -> ToolResult:
    """Build rebasin's PCD aligning an independent copy to ``model``, run it, compare the copy's outputs."""
    from rebasin import PermutationCoordinateDescent

    result = ToolResult()
    other = independent_copy(model, seed=1)
    data = inputs[0] if len(inputs) == 1 else list(inputs)

    def outputs() -> list[torch.Tensor]:
        with torch.no_grad():
            return [other(*inputs).detach().float()]

    try:
        with time_limit(limit):
            before = outputs()
            pcd, result.seconds = timed(lambda: PermutationCoordinateDescent(model, other, data), repeats)
            result.count, keys = rebasin_coverage(pcd, other)
            result.fraction = element_fraction(other, keys)
            torch.manual_seed(0)  # PCD visits permutations in torch.randperm order
            pcd.rebasin()
            result.error = output_error(before, outputs())[1]
    except Exception as exc:
        return crashed(name, "rebasin", exc, result)
    return result


# -- tables -------------------------------------------------------------------------------------


def measure(entry: ZooModel, repeats: int, limit: int, rebasin: bool) -> Row:
    model, inputs = entry.build(), entry.inputs()
    print(f"[{entry.name}]", file=sys.stderr)
    row = Row(entry.name, sum(p.numel() for p in model.parameters()), run_permerge(entry, model, inputs, repeats, limit))
    if rebasin:
        wrapped = LogitsAdapter(model, entry.input_kwargs).eval() if entry.hf else model
        row.rebasin = run_rebasin(entry.name, wrapped, inputs, repeats, limit)
        row.permerge.fraction = element_fraction(model, permerge.trace(model, inputs, example_kwargs=entry.input_kwargs).keys)
    return row


def value(r: ToolResult, v: float | int | None, fmt: str) -> str:
    return format(v, fmt) if v is not None else (r.crash or "")


def error_cell(r: ToolResult) -> str:
    return value(r, r.error, ".1e") + (" FAIL" if r.error is not None and r.error > TOL else "")


def kinds_cell(r: ToolResult) -> str:
    counts = collections.Counter(k.value for k, _, _ in r.frozen)
    return ", ".join(f"{k} ×{n}" for k, n in sorted(counts.items())) or ("—" if r.crash is None else r.crash)


_SHORT = {"scaled_permutation": "scaled", "orthogonal": "orth", "invertible": "inv"}


def classes_cell(r: ToolResult) -> str:
    """Groups in a class beyond permutations (what ``align(symmetries="all")`` may use)."""
    return ", ".join(f"{_SHORT[c]} {n}" for c, n in sorted(r.classes.items()) if c in _SHORT) or "—"


def coverage_table(rows: list[Row]) -> list[str]:
    head = ("model", "#params", "trace (s)", "#groups", "beyond permutations", "permutable", "fn error",
            "frozen hidden spaces")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        r = row.permerge
        lines.append("| " + " | ".join([
            row.name, f"{row.params:,}", value(r, r.seconds, ".2f"), value(r, r.count, "d"), classes_cell(r),
            value(r, r.fraction, ".3f"), error_cell(r), kinds_cell(r),
        ]) + " |")  # fmt: skip
    return lines


def reasons_table(rows: list[Row]) -> list[str]:
    lines = ["| model | kind | spaces (sizes) | reason |", "|---|---|---|---|"]
    for row in rows:
        grouped: dict[tuple[str, str], list[int]] = {}
        for kind, size, reason in row.permerge.frozen:
            grouped.setdefault((kind.value, reason), []).append(size)
        for (kind, reason), sizes in grouped.items():
            lines.append(f"| {row.name} | {kind} | {len(sizes)} ({', '.join(map(str, sorted(set(sizes))))}) | {reason} |")
    return lines


def summary(rows: list[Row]) -> list[str]:
    def line(label: str, part: list[Row]) -> str:
        fr = [r.permerge.fraction for r in part if r.permerge.fraction is not None]
        if not fr:
            return f"- {label}: no model traced"
        return (f"- {label} ({len(part)} models): mean permutable fraction **{statistics.fmean(fr):.3f}**, "
                f"**{sum(f >= TARGET for f in fr)}/{len(part)}** at ≥ {TARGET}, min {min(fr):.3f}; "
                f"function preserved on {sum(r.permerge.preserved for r in part)}/{len(part)}")  # fmt: skip

    timm = [r for r in rows if r.name.startswith("timm/")]
    out = [line("timm cross-section", timm)] if timm else []
    out.append(line("whole run", rows))
    kinds = collections.Counter(k for r in rows for k, _, _ in r.permerge.frozen)
    classes = sum((r.permerge.classes for r in rows), collections.Counter())
    out.append(f"- groups by symmetry class (the tracer's, `permerge.graph.classes`): "
               f"{', '.join(f'{c} {classes[c]}' for c in SYMMETRIES)}; models with a class beyond permutations: "
               f"{sum(any(c != 'permutation' for c in r.permerge.classes) for r in rows)}/{len(rows)}")  # fmt: skip
    crashes = [r.name for r in rows if r.permerge.crash]
    out.append(f"- frozen hidden spaces by kind over the run: "
               f"{', '.join(f'{k.value} ×{n}' for k, n in sorted(kinds.items(), key=lambda kv: kv[0].value)) or 'none'}; "
               f"`rule_error` ×{kinds[FrozenKind.RULE_ERROR]}, `no_rule` ×{kinds[FrozenKind.NO_RULE]}; "
               f"permerge crashed on {len(crashes)} {crashes if crashes else ''}")  # fmt: skip
    return out


def rebasin_table(rows: list[Row]) -> list[str]:
    head = ("model", "permerge groups", "permutable (elements)", "fn error", "rebasin setup (s)", "#perms",
            "permutable (elements)", "fn error")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        p, r = row.permerge, row.rebasin
        assert r is not None
        lines.append("| " + " | ".join([
            row.name, value(p, p.count, "d"), value(p, p.fraction, ".3f"), error_cell(p),
            value(r, r.seconds, ".3f"), value(r, r.count, "d"), value(r, r.fraction, ".3f"), error_cell(r),
        ]) + " |")  # fmt: skip
    n = len(rows)
    covered = sum(r.permerge.fraction is not None and r.permerge.fraction >= (r.rebasin.fraction or 0.0) for r in rows)  # type: ignore[union-attr]
    lines.append(f"| **total ({n})** | | ≥ rebasin's on {covered}/{n} | preserved on {sum(r.permerge.preserved for r in rows)}/{n} "
                 f"| | | | preserved on {sum(r.rebasin.preserved for r in rows)}/{n} |")  # type: ignore[union-attr]
    return lines


def warm_up(rebasin: bool) -> None:
    """Run the tools once on a tiny MLP so one-time costs are not charged to the first model."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    permerge.trace(mlp, (x,), cache=False)
    if rebasin:
        from rebasin import PermutationCoordinateDescent

        PermutationCoordinateDescent(mlp, independent_copy(mlp, seed=1), x).rebasin()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=sorted(PARTS), default=None,
                        help="which part of the zoo (default: all; base with --rebasin)")  # fmt: skip
    parser.add_argument("--models", help="comma-separated zoo names (overrides --zoo)")
    parser.add_argument("--repeats", type=int, default=1, help="timing repeats (median is reported)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per tool and model")
    parser.add_argument("--rebasin", action="store_true", help="compare with snimu's rebasin (bench extra)")
    parser.add_argument("--out", type=Path, help="results file (default: benchmarks/results/trace_zoo[_rebasin].md)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.timeout < 1:
        parser.error("--repeats and --timeout must be at least 1")
    part = args.zoo or ("base" if args.rebasin else "all")
    names = args.models.split(",") if args.models else [z.name for z in ZOO if PARTS[part](z)]
    unknown = [m for m in names if m not in ZOO_BY_NAME]
    if unknown:
        parser.error(f"unknown models {unknown}; the zoo has {sorted(ZOO_BY_NAME)}")

    threads = int(os.environ.get("PERMERGE_BENCH_THREADS", 2))
    torch.set_num_threads(threads)
    warm_up(args.rebasin)
    wall = time.perf_counter()
    rows = [measure(ZOO_BY_NAME[m], args.repeats, args.timeout, args.rebasin) for m in names]
    env = (f"threads: {threads} · torch {torch.__version__} · timm {version('timm')} · "
           f"transformers {version('transformers')}"
           + (f" · rebasin {version('rebasin')}" if args.rebasin else "")
           + f" · {datetime.date.today().isoformat()} · wall {time.perf_counter() - wall:.0f} s")  # fmt: skip
    if args.rebasin:
        text = "\n".join([env, "", *rebasin_table(rows)])
    else:
        text = "\n".join([env, "", *summary(rows), "", *coverage_table(rows), "", "Frozen hidden spaces:", "",
                          *reasons_table(rows)])  # fmt: skip
    print(text)
    out = args.out or ROOT / "benchmarks" / "results" / ("trace_zoo_rebasin.md" if args.rebasin else "trace_zoo.md")
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/trace_zoo.py", *(argv if argv is not None else sys.argv[1:])])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Tracing coverage over the zoo\n\nCommand: `{command}`\n\n{text}\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
