"""PEFT LoRA adapters under a permutation of their base model's hidden units.

A LoRA adapter adds ``ΔW = s · B @ A`` to a base layer's weight ``W`` (``s = lora_alpha / r``, or
``/ √r`` with rsLoRA): ``lora_A`` (r × in) reads the layer's inputs and ``lora_B`` (out × r) writes
its outputs. If the base is permuted, ``P W Q``, the adapter that computes the same adapted function
is ``(P B)(A Q)``: ``lora_A`` takes the permutation of the base weight's *input* axis (on its dim 1),
``lora_B`` (and its bias, and DoRA's magnitude vector) that of the *output* axis (on dim 0); the rank
axis is free. Embedding adapters (``lora_embedding_A``: r × vocab, ``lora_embedding_B``: hidden × r)
and GPT-2's ``Conv1D`` (``fan_in_fan_out``: W is in × out) are the transposed case. Full copies of
base tensors an adapter carries (``modules_to_save``, resized embeddings saved as
``base_layer.weight``) move exactly like the base tensor. :func:`adapter_spec` derives this from
the base's spec, so applying it is :func:`~permerge.apply.apply_permutation`.

:class:`AdaptedSource` is the base with the adapter merged in (``W + ΔW``, DoRA's ``m · (W + ΔW) /
‖W + ΔW‖``, LoRA biases), read lazily, for the function check of base + adapter;
:func:`adapted_error` checks that the permuted adapter on the permuted base gives the permuted
adapted weights, tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from permerge.apply import apply_permutation, permute_tensor
from permerge.errors import PermergeError, PermergeIOError, StateDictMismatchError
from permerge.io.read import StrPath, TensorSource, load_state_dict
from permerge.spec import PermutationSpec

__all__ = [
    "ADAPTER_CONFIG",
    "AdaptedSource",
    "LoraAdapter",
    "adapted_error",
    "adapter_spec",
    "is_adapter_dir",
    "permute_adapter",
    "read_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
# suffix of a saved adapter key → (part of the adapted layer, whether it is an embedding's)
_PARTS = {
    ".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False), ".lora_B.bias": ("bias", False),
    ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True),
    ".lora_magnitude_vector": ("magnitude", False), ".lora_magnitude_vector.weight": ("magnitude", False),
}  # fmt: skip


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter: its directory, ``adapter_config.json`` and tensors (saved keys)."""

    path: Path
    config: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]
    weights_file: str


@dataclass(frozen=True)
class _Site:
    """One adapted base layer: its weight's module key and the adapter keys that change it."""

    weight: str  # module state-dict key of the base weight, e.g. "model.layers.0.self_attn.q_proj.weight"
    embedding: bool
    transposed: bool  # W is (in, out): an embedding (vocab, hidden) or a fan_in_fan_out Conv1D
    parts: Mapping[str, str]  # "A" / "B" / "bias" / "magnitude" → adapter key
    scale: float


def is_adapter_dir(path: StrPath) -> bool:
    """Whether ``path`` is a directory with an ``adapter_config.json`` (a PEFT adapter)."""
    return Path(path, ADAPTER_CONFIG).is_file()


def read_adapter(path: StrPath) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory; raises (one line) for other PEFT methods or missing files."""
    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PermergeIOError(f"cannot read {path / ADAPTER_CONFIG}: {e}") from e
    kind = config.get("peft_type")
    if kind != "LORA":
        raise PermergeError(f"{path} is a {kind} adapter; permerge permutes LoRA adapters (peft_type LORA) only")
    name = next((n for n in ADAPTER_WEIGHTS if (path / n).is_file()), None)
    if name is None:
        raise PermergeIOError(f"{path} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}")
    tensors = load_state_dict(path / name)
    outside = sorted(k for k in tensors if not k.startswith(_PREFIX))
    if outside:
        raise PermergeError(f"{path / name}: keys outside {_PREFIX!r} (e.g. {outside[0]!r}); is it a PEFT model adapter?")
    return LoraAdapter(path, config, tensors, name)


def _pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module path's suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _sites(adapter: LoraAdapter) -> tuple[dict[str, _Site], dict[str, str]]:
    """The adapted layers (by module weight key) and the full tensors the adapter carries
    (adapter key → module key of the base tensor it replaces)."""
    cfg = adapter.config
    parts: dict[str, dict[str, str]] = {}
    embedding: dict[str, bool] = {}
    full: dict[str, str] = {}
    for key in adapter.tensors:
        rest = key[len(_PREFIX):]
        suffix = next((s for s in _PARTS if rest.endswith(s)), None)
        if suffix is None:  # a full copy of a base tensor (modules_to_save, or a saved base layer)
            full[key] = rest.replace(".base_layer.", ".")
            continue
        module = rest[: -len(suffix)]
        part, emb = _PARTS[suffix]
        parts.setdefault(module, {})[part] = key
        embedding[module] = embedding.get(module, False) or emb
    sites = {}
    for module, found in parts.items():
        if not {"A", "B"} <= set(found):
            raise PermergeError(f"{adapter.path}: layer {module!r} has {sorted(found)} but not both lora_A and lora_B")
        r = adapter.tensors[found["A"]].shape[0]
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        weight = f"{module}.weight"
        emb = embedding[module]
        sites[weight] = _Site(weight, emb, emb or bool(cfg.get("fan_in_fan_out")), found, float(scale))
    return sites, full


def _in_out(site: _Site) -> tuple[int, int]:
    """(input dim, output dim) of the base weight."""
    return (0, 1) if site.transposed else (1, 0)


def adapter_spec(
    spec: PermutationSpec, adapter: LoraAdapter, base_shapes: Mapping[str, Iterable[int]], key_map: Mapping[str, str] | None = None,
) -> PermutationSpec:  # fmt: skip
    """The spec of ``adapter``'s tensors, from the spec of its base (checkpoint keys).

    ``key_map`` maps the base model's module keys (PEFT names adapter tensors by module path) to its
    checkpoint keys where they differ; ``base_shapes`` are the base checkpoint's shapes. Raises
    naming an adapter tensor whose base layer the base does not have, or whose shape does not fit it
    (an adapter trained on another architecture, or ``fan_in_fan_out`` set wrongly).
    """
    key_map = key_map or {}
    sites, full = _sites(adapter)
    moves: dict[str, list[tuple[str, int | None, int | None]]] = {}  # base key → (adapter key, from dim, to dim)

    def base_key(module_key: str, adapter_key: str) -> str:
        ck = key_map.get(module_key, module_key)
        if ck not in base_shapes:
            raise StateDictMismatchError(
                f"{adapter.path}: {adapter_key!r} adapts {ck!r}, which the base checkpoint does not have; "
                "is the adapter trained on this base model?"
            )
        return ck

    for key, module_key in full.items():
        ck = base_key(module_key, key)
        if tuple(adapter.tensors[key].shape) != tuple(base_shapes[ck]):
            raise StateDictMismatchError(f"{adapter.path}: {key!r} has shape {tuple(adapter.tensors[key].shape)}, the base's {ck!r} {tuple(base_shapes[ck])}")
        moves.setdefault(ck, []).append((key, None, None))
    for site in sites.values():
        ck = base_key(site.weight, site.parts["A"])
        shape = tuple(base_shapes[ck])
        i, o = _in_out(site)
        expect = {"A": (1, i), "B": (0, o), "bias": (0, o), "magnitude": (0, o)}
        for part, key in site.parts.items():
            dim, base_dim = expect[part]
            got = adapter.tensors[key].shape
            if len(shape) <= base_dim or got[dim] != shape[base_dim]:
                raise StateDictMismatchError(
                    f"{adapter.path}: {key!r} (shape {tuple(got)}) does not fit the base's {ck!r} (shape {shape}) "
                    f"along dim {base_dim}; is the adapter trained on this base, with fan_in_fan_out as in its config?"
                )
            moves.setdefault(ck, []).append((key, base_dim, dim))

    def moved(members: Iterable[Any]) -> tuple[Any, ...]:
        return tuple(
            dataclasses.replace(ax, key=key, dim=ax.dim if to is None else to)
            for ax in members for key, src, to in moves.get(ax.key, ()) if src is None or ax.dim == src
        )  # fmt: skip

    groups = tuple(dataclasses.replace(g, members=moved(g.members)) for g in spec.groups)
    frozen = tuple(dataclasses.replace(f, members=moved(f.members)) for f in spec.frozen)
    return PermutationSpec(tuple(g for g in groups if g.members), tuple(f for f in frozen if f.members))


def permute_adapter(
    spec: PermutationSpec, perm: Mapping[str, torch.Tensor], adapter: LoraAdapter, base_shapes: Mapping[str, Iterable[int]],
    key_map: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """``adapter``'s tensors permuted to fit its base permuted by ``perm`` (``spec``: the base's, in
    checkpoint keys; see :func:`adapter_spec`). Same keys, shapes and dtypes."""
    aspec = adapter_spec(spec, adapter, base_shapes, key_map)
    return apply_permutation(aspec, {name: perm[name] for name in aspec.names}, adapter.tensors)


def _natural(w: torch.Tensor, site: _Site) -> torch.Tensor:
    """The weight as (out, in, ...): the layout ``B @ A`` has."""
    return w.T if site.transposed else w


def _adapted(w: torch.Tensor, site: _Site, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Base weight ``w`` with the adapter of ``site`` merged in, in float32 (as PEFT's merge computes it)."""
    a, b = tensors[site.parts["A"]].float(), tensors[site.parts["B"]].float()
    r = a.shape[0]
    delta = (b.reshape(b.shape[0], r) @ a.reshape(r, -1)).reshape(b.shape[0], *a.shape[1:])
    merged = _natural(w.float(), site) + site.scale * delta
    if "magnitude" in site.parts:  # DoRA: per-output-unit magnitude over the direction W + ΔW
        if site.embedding:
            raise PermergeError(f"DoRA on {site.weight!r} (an embedding) is not supported; use a LoRA adapter without DoRA")
        norm = merged.flatten(1).norm(dim=1).view(-1, *[1] * (merged.dim() - 1))
        merged = tensors[site.parts["magnitude"]].float().view_as(norm) / norm * merged
    return _natural(merged, site)


def _bias_of(site: _Site) -> str:
    return site.weight[: -len("weight")] + "bias"


class AdaptedSource(TensorSource):
    """The base checkpoint with ``adapter`` merged in, read lazily: each adapted weight is
    ``W + s·B@A`` (DoRA: rescaled per output unit), each adapted bias gets ``s·lora_B.bias``, each
    tensor the adapter carries whole replaces the base's. Keys, shapes and dtypes are the base's
    (adapted tensors are computed in float32 and cast back)."""

    def __init__(self, base: TensorSource, adapter: LoraAdapter, key_map: Mapping[str, str] | None = None) -> None:
        super().__init__(base.path, base.keys(), f"{base.name} + adapter {adapter.path}")
        key_map = key_map or {}
        sites, full = _sites(adapter)
        self.base, self.adapter = base, adapter
        self.sites = {key_map.get(k, k): s for k, s in sites.items()}
        biases = {key_map.get(_bias_of(s), _bias_of(s)): s for s in sites.values() if "bias" in s.parts}
        # a LoRA bias on a bias-free layer is not a tensor of the base: adapter_spec still permutes it
        self.biases = {k: s for k, s in biases.items() if k in base}
        self.full = {key_map.get(mk, mk): key for key, mk in full.items()}

    def _shape(self, key: str) -> torch.Size:
        return self.base.shape(key)

    def _dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)

    def _get(self, key: str) -> torch.Tensor:
        base = self.base.get(key) if key not in self.full else self.adapter.tensors[self.full[key]]
        return self.adapted(key, base, self.adapter.tensors).to(base.dtype)

    def adapted(self, key: str, base: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``base`` (the tensor at ``key``) with the adapter ``tensors`` merged in (float32 where changed)."""
        if key in self.sites:
            return _adapted(base, self.sites[key], tensors)
        if key in self.biases:
            site = self.biases[key]
            return base.float() + site.scale * tensors[site.parts["bias"]].float()
        return base

    def touched(self) -> Iterator[str]:
        """The base keys the adapter changes."""
        yield from dict.fromkeys([*self.sites, *self.biases, *self.full])

    def _close(self) -> None:
        """The base source belongs to the caller."""


def adapted_error(
    source: AdaptedSource, spec: PermutationSpec, perm: Mapping[str, torch.Tensor], permuted: Mapping[str, torch.Tensor],
) -> float:  # fmt: skip
    """Largest relative difference, over the base tensors the adapter changes, between the permuted
    adapter (``permuted``) merged into the permuted base and the adapted base permuted: ``0`` up to
    float rounding when the adapter was permuted to match (``spec``, ``perm``: the base's)."""
    worst = 0.0
    for key in source.touched():
        axes = spec.axes_of(key)
        base = source.base.get(key)
        if key in source.full:
            base, base_p = source.adapter.tensors[source.full[key]], permuted[source.full[key]]
        else:
            base_p = permute_tensor(base, axes, perm) if axes else base
        want = source.adapted(key, base, source.adapter.tensors).double()
        want = permute_tensor(want, axes, perm) if axes else want
        got = source.adapted(key, base_p, permuted).double()
        worst = max(worst, float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12))
    return worst
