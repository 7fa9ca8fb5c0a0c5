"""Slow tests (CI runs them in their own step): real-size architectures."""

from __future__ import annotations

import pytest
import torch

import permerge as pm

pytestmark = pytest.mark.slow


def test_llama_7b_shape_traces_on_the_meta_device():
    """A LLaMA-7B-shaped model (GQA) built without weights: every layer's groups are found."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    spec = pm.trace(model, ids, example_kwargs={"use_cache": False})
    # 1 residual stream + per layer: KV heads, query heads within a KV head's group, V/O head dim, MLP units
    assert len(spec.groups) == 1 + 32 * 4
    sizes = sorted({g.size for g in spec.groups})
    assert sizes == [4, 8, 128, 4096, 11008]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert spec.permutable_fraction(shapes) >= 0.85


def test_resnet50_planted_permutation_is_recovered_exactly():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig()).eval()
    spec = pm.trace(model, torch.randn(1, 3, 64, 64))
    assert len(spec.groups) == 37  # 4 residual streams + 33 block-internal groups
    sd = model.state_dict()
    perm = pm.random_permutation(spec, 1)
    res = pm.weight_matching(spec, sd, pm.apply_permutation(spec, perm, sd))
    inv = pm.inverse(perm)
    assert all(torch.equal(res.permutation[g], inv[g]) for g in inv)
