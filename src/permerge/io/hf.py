"""Hugging Face model directories: build the architecture on the meta device, map its keys to the
checkpoint's, and write an aligned model back as a directory ``from_pretrained`` (and mergekit) loads.

* :func:`hf_architecture` builds the model class named in ``config.json`` under
  ``torch.device("meta")`` (no memory for weights), with example inputs for tracing.
* :func:`checkpoint_spec` rewrites a spec traced on that model into the checkpoint's key space:
  ``transformers`` ≥ 5 renames some keys between the module tree and the files (ViT's
  ``attention.attention.query`` is ``attention.q_proj`` in the module) and drops the tied
  ``lm_head.weight`` from checkpoints; the spec then names exactly the tensors on disk.
* :func:`write_hf_model` writes B's tensors, permuted and optionally cast, as (sharded) safetensors
  with ``model.safetensors.index.json``, B's ``config.json`` and other non-weight files (tokenizer,
  generation config), plus ``permutation.safetensors``, ``spec.json`` and ``provenance.json``. It
  writes exactly the keys B's checkpoint holds (a tied ``lm_head.weight`` stays absent), tensor by
  tensor, into a temporary directory renamed into place at the end: an interrupted run leaves nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from permerge.errors import PermergeError, PermergeIOError
from permerge.io.outputs import write_files
from permerge.io.read import SUPPORTED_SUFFIXES, StrPath, TensorSource
from permerge.io.stream import INDEX_NAME, permuted_producer, plan_write, shard_index, write_shard
from permerge.io.write import permutation_writer, text_writer
from permerge.models import ModelRef
from permerge.spec import Frozen, Group, PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["checkpoint_spec", "hf_architecture", "is_hf_dir", "write_hf_model"]

_OUR_FILES = ("permutation.safetensors", "spec.json", "provenance.json")


def is_hf_dir(path: StrPath) -> bool:
    """Whether ``path`` is a directory with a ``config.json``."""
    return Path(path, "config.json").is_file()


def hf_architecture(path: StrPath, *, meta: bool = True) -> ModelRef:
    """Build the architecture of the Hugging Face directory ``path`` from its ``config.json``.

    The class is ``config.architectures[0]`` (else ``AutoModel``); under ``meta=True`` no memory is
    allocated for weights (a LLaMA-7B-shaped model traces in ~5 s at ~450 MB RSS). The example input
    is ``pixel_values`` for vision configs (``image_size`` + ``num_channels``), else 16 token ids.
    """
    try:
        import transformers
    except ImportError as e:
        raise PermergeError("Hugging Face directories need transformers: pip install 'permerge[hf]'") from e
    path = Path(path)
    if not is_hf_dir(path):
        raise PermergeIOError(f"{path} is not a Hugging Face model directory: it has no config.json")
    config = transformers.AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch) if arch and hasattr(transformers, arch) else transformers.AutoModel
    device = torch.device("meta") if meta else torch.device("cpu")
    with device:
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    model.eval()
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        inputs: tuple[Any, ...] = (torch.zeros(1, config.num_channels, size, size, device=device),)
    else:
        inputs = (torch.zeros(1, 16, dtype=torch.long, device=device),)
    kwargs = {"use_cache": False} if hasattr(config, "use_cache") else {}
    return ModelRef(model, inputs, kwargs, f"{arch or type(model).__name__} from {path}")


def checkpoint_spec(
    spec: PermutationSpec, model: nn.Module, checkpoint_keys: Iterable[str]
) -> PermutationSpec:
    """``spec`` (traced on ``model``) with its keys renamed to the checkpoint's and tied aliases dropped.

    A key the checkpoint lacks is dropped when it is a tied alias of one it has (its tensor *is*
    that one, so it is permuted with it and written once, as the input had it); any other missing
    key is an error naming it.
    """
    keys = set(checkpoint_keys)
    rename = _key_renaming(model, keys)
    tied = _tied_aliases(model)
    missing: list[str] = []

    def fix(members: Iterable[Any], strict: bool) -> tuple[Any, ...]:
        out = []
        for ax in members:
            name = rename.get(ax.key, ax.key)
            if name in keys:
                out.append(dataclasses.replace(ax, key=name))
                continue
            canonical = tied.get(ax.key)
            if strict and (canonical is None or rename.get(canonical, canonical) not in keys):
                missing.append(ax.key)
        return tuple(out)

    groups = tuple(Group(g.name, g.size, m, g.symmetry) for g in spec.groups if (m := fix(g.members, True)))
    frozen = tuple(Frozen(f.size, f.reason, fix(f.members, False), f.kind) for f in spec.frozen)
    if missing:
        raise PermergeIOError(
            f"the checkpoint lacks tensors the model permutes: {sorted(set(missing))[:10]}; is the checkpoint "
            "for this config.json?"
        )
    return PermutationSpec(groups, frozen)


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """``alias → canonical`` for parameters that are one tensor under two names (first name wins)."""
    seen: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    declared = getattr(model, "_tied_weights_keys", None)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if isinstance(declared, Mapping) and getattr(text, "tie_word_embeddings", False):
        out.update({k: v for k, v in declared.items() if k not in out})
    return out


def _key_renaming(model: nn.Module, checkpoint_keys: set[str]) -> dict[str, str]:
    """``module key → checkpoint key`` where ``transformers`` renames on save (one-to-one only)."""
    sd: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict(keep_vars=True).items():  # tied aliases once: identity is the key map
        if id(v) not in seen:
            seen.add(id(v))
            sd[k] = v
    if all(k in checkpoint_keys for k in sd):
        return {}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 saves the module keys
        return {}
    try:
        reverted = revert_weight_conversion(model, dict(sd))
    except Exception as e:  # a conversion that cannot run on meta tensors
        LOG.debug("cannot derive the checkpoint key renaming: %s", e)
        return {}
    by_id = {id(v): k for k, v in sd.items()}
    rename = {by_id[id(v)]: k for k, v in reverted.items() if id(v) in by_id}
    if len(rename) != len(reverted):
        raise PermergeError(
            f"{type(model).__name__}'s checkpoint format merges or splits tensors (a transformers weight "
            "conversion, e.g. fused MoE experts), which permerge cannot map to the module's tensors yet"
        )
    return {k: v for k, v in rename.items() if k != v}


def write_hf_model(
    out: StrPath,
    source: TensorSource,
    model_dir: StrPath,
    spec: PermutationSpec,
    perm: Mapping[str, torch.Tensor],
    *,
    out_dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    inputs: Mapping[str, StrPath],
    command: list[str] | str = "",
    config: Mapping[str, Any] | None = None,
    report: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``source`` (B's checkpoint, in ``model_dir``) permuted by ``perm`` as an HF directory ``out``.

    Plan first (:func:`~permerge.io.stream.plan_write`: per tensor "read K, permute, cast"), then
    write shard by shard, tensor by tensor. Files: the weight shards (+ ``model.safetensors.index.json``
    when more than one), ``model_dir``'s ``config.json`` (its ``dtype`` set to ``out_dtype`` when given)
    and other non-weight files, ``permutation.safetensors``, ``spec.json``, ``provenance.json``.
    All or nothing, as :func:`~permerge.io.outputs.write_files`; inputs are never written.

    Example:
        >>> write_hf_model("aligned", open_unmapped("b"), "b", spec, perm, inputs={"a": "a", "b": "b"})  # doctest: +SKIP
    """
    model_dir = Path(model_dir)
    shards = plan_write(source, spec, out_dtype=out_dtype, max_shard_size=max_shard_size)
    produce = permuted_producer(source, perm)
    files: dict[str, Any] = {s.name: partial(write_shard, shard=s, produce=produce) for s in shards}
    if len(shards) > 1:
        text = json.dumps(shard_index(shards), indent=2, sort_keys=True) + "\n"
        files[INDEX_NAME] = text_writer(text)
    for p in sorted(model_dir.iterdir()):
        if _is_extra_file(p) and p.name not in files:
            files[p.name] = partial(_copy, src=p)
    files["config.json"] = text_writer(_config_text(model_dir / "config.json", out_dtype))
    files["permutation.safetensors"] = permutation_writer(perm)
    files["spec.json"] = text_writer(spec.to_json())
    LOG.info("writing %d tensors in %d shard(s) to %s", len(source), len(shards), out)
    return write_files(
        out, files, force=force, inputs=inputs, command=list(command) if not isinstance(command, str) else [command],
        config=config or {}, report=report or {},
    )  # fmt: skip


def _is_extra_file(p: Path) -> bool:
    """Non-weight files of an HF directory worth carrying over (config, tokenizer, generation config)."""
    weight = p.suffix.lower() in SUPPORTED_SUFFIXES or p.name.endswith(".index.json")
    return p.is_file() and not p.name.startswith(".") and not weight and p.name not in _OUR_FILES


def _config_text(path: Path, out_dtype: torch.dtype | None) -> str:
    text = path.read_text(encoding="utf-8")
    if out_dtype is None:
        return text
    data = json.loads(text)
    name = str(out_dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in data or key == "dtype":
            data[key] = name
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _copy(tmp: Path, src: Path) -> None:
    shutil.copyfile(src, tmp)


