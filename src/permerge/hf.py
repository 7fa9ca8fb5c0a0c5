"""Hugging Face model knowledge, beside :mod:`permerge.align_hf`: what an HF directory's model is.

* :func:`hf_architecture` builds the class named in ``config.json`` on the meta device (no memory
  for weights), in float32, with example inputs for tracing.
* :func:`architecture_fields` reads the ``config.json`` fields that define the computation, so two
  checkpoints can be compared field by field before any work (8×32 vs 4×64 heads have equal
  tensor shapes and different functions).
* :func:`checkpoint_keys` maps the module's state-dict keys to the checkpoint's: ``transformers`` ≥ 5
  renames some keys between the module tree and the files (ViT's ``attention.attention.query`` is
  ``attention.q_proj`` in the module) and drops the tied ``lm_head.weight`` from checkpoints.
  :func:`checkpoint_spec` rewrites a traced spec into the checkpoint's keys with it,
  :func:`module_spec` back; :func:`saved_keys` names the keys ``save_pretrained`` would write
  (for a spec saved from a directory that has only ``config.json``).
* :func:`model_card` writes the ``README.md`` of every Hugging Face result (YAML front matter:
  what was done, the inputs and their SHA-256, the function check, permerge's version), and
  :func:`mergekit_config` a mergekit recipe that merges A with B aligned by permerge.
* :func:`runtime_buffers` (with :meth:`permerge.graph.capture.Program.on`) and :func:`sample_inputs` make a program traced on the
  meta device runnable on real weights: non-persistent buffers (RoPE's ``inv_freq``) are not in
  checkpoints and are recomputed the way ``from_pretrained`` recomputes them, and device arguments
  recorded in the graph are moved to the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from permerge.check import tied_aliases
from permerge.errors import PermergeError, PermergeIOError, StateDictMismatchError
from permerge.io.read import StrPath
from permerge.models import ModelRef
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = [
    "MERGEKIT_METHODS",
    "NON_ARCHITECTURE_FIELDS",
    "architecture_fields",
    "checkpoint_keys",
    "checkpoint_spec",
    "hf_architecture",
    "is_hf_dir",
    "mergekit_config",
    "model_card",
    "module_spec",
    "rename_spec",
    "runtime_buffers",
    "sample_inputs",
    "saved_keys",
]

NON_ARCHITECTURE_FIELDS = frozenset({
    # bookkeeping and dtype (B's dtypes are kept, whatever A's are)
    "_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "_experts_implementation",
    # what forward returns, not what it computes
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    # labels and special tokens: names and ids, not weights
    "id2label", "label2id", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "tokenizer_class", "task_specific_params", "finetuning_task", "prefix",
    "problem_type",
    # initialisation and training-only randomness (dropout is off in eval and in the checks)
    "initializer_range", "initializer_factor", "init_std", "attention_dropout", "hidden_dropout",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
    "summary_first_dropout", "dropout", "classifier_dropout", "activation_dropout", "layerdrop",
    # generation defaults
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "diversity_penalty", "output_scores",
    "return_dict_in_generate",
})  # fmt: skip
"""``config.json`` fields that cannot change what a checkpoint computes in eval mode; every other
field of A and B must be equal."""


def is_hf_dir(path: StrPath) -> bool:
    """Whether ``path`` is a directory with a ``config.json``."""
    return Path(path, "config.json").is_file()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise PermergeError("Hugging Face directories need transformers: pip install 'permerge[hf]'") from e
    return transformers


def _config(path: StrPath) -> Any:
    path = Path(path)
    if not is_hf_dir(path):
        raise PermergeIOError(f"{path} is not a Hugging Face model directory: it has no config.json")
    try:
        return _transformers().AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PermergeIOError(f"cannot read {path / 'config.json'}: {first}") from e


def hf_architecture(path: StrPath, *, meta: bool = True) -> ModelRef:
    """Build the architecture of the Hugging Face directory ``path`` from its ``config.json``.

    The class is ``config.architectures[0]`` (else ``AutoModel``), in float32 whatever the
    checkpoint's dtype (the trace does not depend on it, and the function check computes in
    float32). Under ``meta=True`` no memory is allocated for weights (a LLaMA-7B-shaped model traces
    in ~5 s at ~450 MB RSS). The example input is ``pixel_values`` for vision configs
    (``image_size`` + ``num_channels``), else 16 token ids.
    """
    transformers = _transformers()
    config = _config(path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch) if arch and hasattr(transformers, arch) else transformers.AutoModel
    device = torch.device("meta") if meta else torch.device("cpu")
    with device:
        if hasattr(cls, "_from_config"):
            model = cls._from_config(config, dtype=torch.float32)
        else:
            model = cls.from_config(config, dtype=torch.float32)
    model.eval()
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        inputs: tuple[Any, ...] = (torch.zeros(1, config.num_channels, size, size, device=device),)
    else:
        inputs = (torch.zeros(1, 16, dtype=torch.long, device=device),)
    kwargs = {"use_cache": False} if hasattr(config, "use_cache") else {}
    return ModelRef(model, inputs, kwargs, f"{arch or type(model).__name__} from {path}")


def architecture_fields(path: StrPath) -> dict[str, Any]:
    """The ``config.json`` fields of ``path`` that define its computation, nested configs flattened
    (``text_config.num_attention_heads``); defaults filled in by ``transformers`` so an omitted field
    equals its default written out."""
    flat: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if k in NON_ARCHITECTURE_FIELDS:
                continue
            if isinstance(v, Mapping) and k.endswith("config"):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(_config(path).to_dict(), "")
    return flat


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """``alias → canonical`` for tensors under two names (:func:`~permerge.check.tied_aliases`),
    plus ties ``transformers`` declares but has not made yet."""
    out = tied_aliases(model)
    declared = getattr(model, "_tied_weights_keys", None)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if isinstance(declared, Mapping) and getattr(text, "tie_word_embeddings", False):
        out.update({k: v for k, v in declared.items() if k not in out})
    return out


def _key_renaming(model: nn.Module, checkpoint_keys: set[str] | None) -> dict[str, str]:
    """``module key → checkpoint key`` where ``transformers`` renames on save (one-to-one only);
    ``checkpoint_keys=None``: as ``save_pretrained`` would name them."""
    sd: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict(keep_vars=True).items():  # tied aliases once: identity is the key map
        if id(v) not in seen:
            seen.add(id(v))
            sd[k] = v
    if checkpoint_keys is not None and all(k in checkpoint_keys for k in sd):
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


def saved_keys(model: nn.Module) -> set[str]:
    """The keys ``save_pretrained`` writes for ``model``: renamed as ``transformers`` renames them, tied
    aliases left out (for a spec saved before any checkpoint exists, e.g. ``inspect --save-spec``)."""
    rename = _key_renaming(model, None)
    tied = _tied_aliases(model)
    return {rename.get(k, k) for k in model.state_dict(keep_vars=True) if k not in tied}


def checkpoint_keys(model: nn.Module, keys: Iterable[str], *, name: str = "the checkpoint") -> dict[str, str]:
    """``module state-dict key → checkpoint key`` for every persistent tensor of ``model`` (any
    module; renames only where ``transformers`` renames on save).

    A tied alias the checkpoint lacks maps to its canonical tensor's key. Raises naming the keys
    ``model`` has and the checkpoint holds under no name (a checkpoint of another architecture).
    """
    keys = set(keys)
    rename = _key_renaming(model, keys)
    tied = _tied_aliases(model)
    out: dict[str, str] = {}
    missing = []
    for k in model.state_dict(keep_vars=True):
        found = rename.get(k, k)
        if found not in keys and k in tied:
            found = rename.get(tied[k], tied[k])
        if found in keys:
            out[k] = found
        else:
            missing.append(k)
    if missing:
        raise StateDictMismatchError(
            f"{name} does not fit the model: missing keys {sorted(missing)[:10]}; is it a checkpoint of this architecture?"
        )
    return out


def rename_spec(spec: PermutationSpec, names: Mapping[str, Iterable[str]]) -> PermutationSpec:
    """``spec`` with each member on key ``k`` moved to every key in ``names[k]`` (keys not in
    ``names`` kept), duplicates dropped: between module keys (tied aliases listed separately) and
    checkpoint keys (one name per tensor)."""

    def fix(members: Iterable[Any]) -> tuple[Any, ...]:
        out: list[Any] = []
        seen = set()
        for ax in members:
            for k in names.get(ax.key, (ax.key,)):
                moved = dataclasses.replace(ax, key=k)
                where = dataclasses.replace(moved, role=None, dual=False)  # one position set, whatever reads it
                if where not in seen:
                    seen.add(where)
                    out.append(moved)
        return tuple(out)

    groups = tuple(dataclasses.replace(g, members=fix(g.members)) for g in spec.groups)
    frozen = tuple(dataclasses.replace(f, members=fix(f.members)) for f in spec.frozen)
    return PermutationSpec(groups, frozen)


def checkpoint_spec(spec: PermutationSpec, model: nn.Module, keys: Iterable[str]) -> PermutationSpec:
    """``spec`` (traced on ``model``) in the checkpoint's keys, tied aliases folded into one member.

    A tied alias the checkpoint lacks *is* its canonical tensor, so it is permuted with it and
    written once, as the input had it.
    """
    return rename_spec(spec, {mk: (ck,) for mk, ck in checkpoint_keys(model, keys).items()})


def module_spec(spec: PermutationSpec, key_map: Mapping[str, str]) -> PermutationSpec:
    """The inverse of :func:`checkpoint_spec`: a spec in checkpoint keys on the module's keys, each
    member repeated on every tied alias (``key_map``: :func:`checkpoint_keys`)."""
    names: dict[str, list[str]] = {}
    for mk, ck in key_map.items():
        names.setdefault(ck, []).append(mk)
    return rename_spec(spec, names)


def runtime_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The non-persistent buffers of ``model`` (built on the meta device) computed on the CPU.

    They are not in checkpoints; ``from_pretrained`` recomputes them with the model's
    ``_init_weights``, and so do we, per owning module. Raises naming a buffer that stays unset
    (the function check would otherwise run on garbage).
    """
    owners: dict[str, list[str]] = {}
    named = getattr(model, "named_non_persistent_buffers", None)
    for name, _ in named() if named else ():
        mod, _, buf = name.rpartition(".")
        owners.setdefault(mod, []).append(buf)
    out: dict[str, torch.Tensor] = {}
    for mod_name, bufs in owners.items():
        mod = model.get_submodule(mod_name)
        saved = {b: mod._buffers[b] for b in bufs}
        try:
            for b, t in saved.items():
                mod._buffers[b] = torch.full(t.shape, math.nan, dtype=t.dtype) if t.is_floating_point() else torch.zeros(t.shape, dtype=t.dtype)
            model._init_weights(mod)
            for b in bufs:
                t = mod._buffers[b]
                key = f"{mod_name}.{b}" if mod_name else b
                if t is None or (t.is_floating_point() and torch.isnan(t).any()):
                    raise PermergeError(
                        f"cannot compute the non-persistent buffer {key!r} of {type(model).__name__} for the "
                        "function check: its _init_weights does not set it"
                    )
                out[key] = t
        finally:
            mod._buffers.update(saved)
    return out


def sample_inputs(ref: ModelRef, seed: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Random CPU inputs shaped like ``ref``'s (meta) example: token ids below the vocabulary size,
    Gaussian pixels; other leaves as they are. A function check on all-zero ids would compare one
    token's function only."""
    gen = torch.Generator().manual_seed(seed)
    embeddings = getattr(ref.model, "get_input_embeddings", lambda: None)()
    vocab = getattr(embeddings, "num_embeddings", 2)

    def sample(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_floating_point():
            return torch.randn(x.shape, generator=gen, dtype=x.dtype)
        if x.dtype == torch.long:
            return torch.randint(0, vocab, x.shape, generator=gen)
        return torch.zeros(x.shape, dtype=x.dtype)

    return tuple(sample(x) for x in ref.inputs), {k: sample(v) for k, v in ref.kwargs.items()}


# -- model cards and mergekit recipes -------------------------------------------------------------

_WHAT = {
    "align": "Model B ({b}) with its hidden units permuted to match model A ({a}) by {method} matching. It "
    "computes B's function, now in A's basis, so averaging it with A (permerge merge, or mergekit with the "
    "recipe in mergekit.yaml when present) averages matching units.",
    "merge": "A merge of {n} models ({inputs}) by permerge's `{method}` method (each model's hidden units "
    "aligned to a common basis before averaging, except for the `average` baseline).",
    "apply": "{checkpoint}, with the permutation saved in {permutation} applied: it computes the same function "
    "as the input, in the aligned basis.",
    "apply-adapter": "The LoRA adapter {adapter} (trained on {base}), permuted with the permutation saved in "
    "{permutation}: on the base permuted the same way it computes what it computed on {base}.",
}


def _sub_command(record: Mapping[str, Any]) -> str:
    config = record.get("config") or {}
    if isinstance(config.get("command"), str):
        return config["command"]
    cmd = record.get("command")
    words = cmd if isinstance(cmd, list) else shlex.split(cmd or "")
    return next((w for w in words[1:] if not w.startswith("-")), "")


def model_card(record: Mapping[str, Any], *, library: str = "transformers") -> str:
    """A model card (``README.md``) for a result, from its provenance record
    (:func:`~permerge.io.write.write_provenance`).

    The YAML front matter holds ``library_name`` (``transformers``, or ``peft`` for an adapter),
    ``tags`` and a ``permerge`` block: version, command, method, creation time, every input with its
    path and SHA-256 per file, the function check's relative error (B permuted against B) and, when
    measured (``merge --barrier-data``), the barriers: ``{curve: {dataset: {metric: {definition:
    value}}}}``. The text says what the model is, lists the inputs and how to reproduce it.
    """
    report = record.get("report") or {}
    config = record.get("config") or {}
    inputs = record.get("inputs") or {}
    command = _sub_command(record)
    method = report.get("method") or config.get("method") or command or "unknown"
    version = (record.get("versions") or {}).get("permerge", "unknown")
    block: dict[str, Any] = {
        "version": version, "command": command, "method": method, "created_utc": record.get("created_utc"),
        "inputs": {name: {"path": i.get("path"), "sha256": i.get("sha256")} for name, i in inputs.items()},
        "function_preservation_error": report.get("function_preservation_error"),
    }  # fmt: skip
    barriers = {
        label: {ds: {m: v["barrier"] for m, v in metrics.items()} for ds, metrics in summary.items()}
        for label, summary in (report.get("barriers") or {}).items()
    }
    if barriers:
        block["barrier"] = barriers
    front = {"library_name": library, "tags": ["permerge", *([command] if command else [])], "permerge": block}
    paths = {name: (i.get("path") or "?") for name, i in inputs.items()}
    kind = "apply-adapter" if command == "apply" and "adapter" in paths else command
    what = _WHAT.get(kind, "A model written by permerge.").format(
        method=method, n=len(inputs), inputs=", ".join(paths.values()),
        **{k: paths.get(k, "?") for k in ("a", "b", "checkpoint", "permutation", "adapter", "base")},
    )  # fmt: skip
    rows = "\n".join(
        f"| {name} | `{path}` | " + "<br>".join(f"`{f}`: `{h}`" for f, h in (inputs[name].get("sha256") or {}).items()) + " |"
        for name, path in paths.items()
    )
    error = report.get("function_preservation_error")
    check = (
        f"The function check ran before anything was written: the permuted weights compute the input's "
        f"function to a relative error of {error:.1e}." if isinstance(error, (int, float)) else ""
    )
    cmd = record.get("command")
    line = shlex.join(cmd) if isinstance(cmd, list) else str(cmd or "")
    body = [
        f"# permerge {command or 'result'}: {method}", "", what, "", f"Made with permerge {version} on "
        f"{record.get('created_utc', '?')}.", "", "| input | path | SHA-256 |", "|---|---|---|", rows, "",
        *([check, ""] if check else []),
        *([_barrier_text(barriers), ""] if barriers else []),
        "Reproduce it with `permerge run provenance.json -o NEW_DIR` "
        f"or the original command, run in `{record.get('cwd', '.')}`:", "", "```bash", line, "```", "",
        "`provenance.json` has the full configuration, the software versions and the report; `report.html` "
        "shows it.", "",
    ]  # fmt: skip
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body)


def _barrier_text(barriers: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]) -> str:
    rows = [
        f"| {label} | {ds} | {metric} | {b.get('line', float('nan')):.4g} | {b.get('mean', float('nan')):.4g} |"
        for label, datasets in barriers.items() for ds, metrics in datasets.items() for metric, b in metrics.items()
    ]  # fmt: skip
    return ("Barriers along the line between the two endpoints (line: Entezari et al. 2022, the excess over the "
            "endpoints' line; mean: Git Re-Basin, the excess over their mean):\n\n| curve | data | metric | line | mean |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows))  # fmt: skip


MERGEKIT_METHODS = ("linear", "slerp")
"""mergekit merge methods :func:`mergekit_config` writes recipes for (two models, one line between them)."""


def mergekit_config(model_a: StrPath, aligned_b: StrPath, *, method: str = "linear", dtype: str = "float32") -> str:
    """A mergekit recipe (YAML) merging A with B aligned to it: the align-then-mergekit workflow.

    ``linear`` averages with weights 0.5 / 0.5, ``slerp`` interpolates spherically at ``t = 0.5``
    from A; edit the weights or ``t`` to move along the line. Paths are absolute, so the recipe runs
    from anywhere (mergekit treats relative names as Hugging Face Hub ids).

    Example:
        >>> print(mergekit_config("/m/a", "/m/b-aligned"))  # doctest: +SKIP
    """
    a, b = str(Path(model_a).resolve()), str(Path(aligned_b).resolve())
    if method == "linear":
        cfg: dict[str, Any] = {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.5}},
                                                                    {"model": b, "parameters": {"weight": 0.5}}]}  # fmt: skip
    elif method == "slerp":
        cfg = {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}], "parameters": {"t": 0.5}}
    else:
        raise PermergeError(f"unknown mergekit method {method!r}; permerge writes recipes for {', '.join(MERGEKIT_METHODS)}")
    cfg["dtype"] = dtype
    header = (
        "# mergekit recipe written by permerge: model B, aligned to model A by permerge (its hidden units in A's\n"
        "# order), merged with A at the midpoint. Run: mergekit-yaml mergekit.yaml merged/\n"
    )
    return header + yaml.safe_dump(cfg, sort_keys=False)
