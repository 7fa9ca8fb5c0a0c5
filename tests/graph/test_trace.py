"""trace(): the groups found on real architectures, determinism, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import traced
from torch import nn

import permerge as pm
from permerge.errors import TraceError


def _group_of(spec, key, dim=0, within_heads=None):
    """The one group moving ``key``'s axis ``dim`` (``within_heads`` picks head_dim vs heads)."""
    hits = [
        g
        for g in spec.groups
        for a in g.members
        if a.key == key and a.dim == dim and (within_heads is None or (a.repeat > 1) == within_heads)
    ]
    assert len(hits) == 1, f"{key}:{dim} in {len(hits)} groups"
    return hits[0]


def test_resnet20_every_residual_stream_is_one_group():
    model, _, _, spec = traced("resnet20")
    keys = {g.name: {a.key for a in g.members} for g in spec.groups}
    assert len(spec.groups) == 12  # 3 residual streams + 9 block-internal groups
    streams = [
        _group_of(spec, "stem.0.weight"),
        _group_of(spec, "blocks.3.shortcut.0.weight"),
        _group_of(spec, "blocks.6.shortcut.0.weight"),
    ]
    for stream, blocks in zip(streams, ((0, 1, 2), (3, 4, 5), (6, 7, 8))):
        for b in blocks:  # every block's output conv and BN (weights and running stats) joins it
            for k in ("conv2.weight", "norm2.weight", "norm2.bias", "norm2.running_mean", "norm2.running_var"):
                assert f"blocks.{b}.{k}" in keys[stream.name]
    assert "head.weight" in keys[streams[2].name]  # the last stage's stream reaches the head
    assert spec.permutable_fraction(model.state_dict()) == 1.0


def test_batchnorm_running_stats_are_permuted():
    model, x, _, spec = traced("vgg")
    sd = model.state_dict()
    bn_stats = [k for k in sd if k.endswith(("running_mean", "running_var"))]
    assert bn_stats and all(spec.axes_of(k) for k in bn_stats)
    perm = pm.random_permutation(spec, 1)
    out = pm.apply_permutation(spec, perm, sd)
    for k in bn_stats:
        (name, ax), = spec.axes_of(k)
        assert torch.equal(out[k], sd[k][perm[name]])


def test_llama_groups_residual_gqa_heads_rope():
    model, _, _, spec = traced("hf_llama")
    cfg = model.config
    stream = _group_of(spec, "model.embed_tokens.weight", 1)
    members = {a.key for a in stream.members}
    assert {"lm_head.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"} <= members
    heads = _group_of(spec, "model.layers.0.self_attn.k_proj.weight", 0, within_heads=False)
    assert heads.size == cfg.num_key_value_heads  # whole KV heads move, their query heads along
    q = next(a for a in heads.members if a.key.endswith("q_proj.weight"))
    assert q.block == cfg.hidden_size // cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    vo = _group_of(spec, "model.layers.0.self_attn.v_proj.weight", 0, within_heads=True)
    assert vo.size == head_dim and any(a.key.endswith("o_proj.weight") for a in vo.members)
    rope = [f for f in spec.frozen if any(a.key.endswith("q_proj.weight") for a in f.members)]
    # q/k head dims are rotated by RoPE: the two rotate_half halves are tied and frozen
    assert rope and all(f.size == head_dim // 2 and not f.boundary for f in rope)
    mlp = _group_of(spec, "model.layers.0.mlp.gate_proj.weight", 0)
    assert {a.key for a in mlp.members} >= {"model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"}


def test_gpt2_tied_embeddings_and_packed_qkv():
    model, _, _, spec = traced("hf_gpt2")
    stream = _group_of(spec, "transformer.wte.weight", 1)
    assert {"lm_head.weight", "transformer.wpe.weight"} <= {a.key for a in stream.members}
    heads = _group_of(spec, "transformer.h.0.attn.c_proj.weight", 0, within_heads=False)
    c_attn = sorted(a.offset for a in heads.members if a.key == "transformer.h.0.attn.c_attn.weight")
    d = model.config.n_embd
    assert heads.size == model.config.n_head and c_attn == [0, d, 2 * d]  # q, k, v heads together


def test_grouped_and_depthwise_conv():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 8, 1)
            self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depthwise, multiplier 2
            self.g = nn.Conv2d(16, 8, 1, groups=4)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(self.g(self.dw(self.a(x)).relu()).relu())

    model = Net().eval()
    x = torch.randn(2, 2, 5, 5)
    spec = pm.trace(model, x)
    from permerge.check import check_function_preserved

    assert check_function_preserved(model, spec, x).relative_error < 1e-5
    # a's 8 channels pass through the depthwise conv (8 groups × multiplier 2) into a conv with
    # 4 groups of 4: the common refinement 4 ⊗ 2 ⊗ 2 permutes whole g-groups and pairs within them
    a = sorted((g for g in spec.groups if any(m.key == "a.weight" for m in g.members)), key=lambda g: g.size)
    assert [g.size for g in a] == [2, 4]
    assert any(m.key == "dw.weight" and m.block == 4 for m in a[1].members)
    assert spec.permutable_fraction(model.state_dict()) == 1.0


def test_group_norm_permutes_whole_groups_and_within_groups():
    _, _, _, spec = traced("unet")
    gn = [g for g in spec.groups if any(a.key == "dec2.1.weight" for a in g.members)]
    assert sorted((g.size, g.members[0].block, g.members[0].repeat) for g in gn) == [(4, 1, 4), (4, 4, 1)]


def test_concat_gives_offsets():
    _, _, _, spec = traced("densenet")
    offsets = {a.offset for g in spec.groups for a in g.members if a.dim == 1}
    assert len(offsets) > 2  # later layers read slices of a concatenation


def test_trace_is_deterministic():
    _, x, _, spec = traced("hf_bert")
    model, _, _, _ = traced("hf_bert")
    assert pm.trace(model, x) == spec


class _Kth(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h - torch.kthvalue(h, 2, dim=-1, keepdim=True).values)  # no rule for kthvalue


def test_unknown_op_freezes_and_is_reported():
    model = _Kth().eval()
    spec = pm.trace(model, torch.randn(4, 3))
    assert not spec.groups
    lost = [f for f in spec.frozen if not f.boundary]  # kthvalue's input space and its output space
    assert lost and all("kthvalue" in f.reason for f in lost)
    assert {a.key for f in lost for a in f.members} == {"a.weight", "a.bias", "b.weight"}
    with pytest.raises(TraceError, match=r"kthvalue.*register_rule"):
        pm.trace(model, torch.randn(4, 3), strict=True)


def test_user_rule_overrides_registry():
    from permerge.graph.rules import Call

    def kth_is_a_reduction(c: Call):  # the k-th smallest of the units: invariant to their order
        out = c.dims(c.arg(0))[:-1] + (c.non_channel(1, "reduced"),)
        return [out, out]

    spec = pm.trace(_Kth().eval(), torch.randn(4, 3), rules={torch.ops.aten.kthvalue: kth_is_a_reduction})
    assert [g.size for g in spec.groups] == [6]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def test_untraceable_model_clear_error_and_nothing_changed():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if self.fc(x).sum() > 0:  # data-dependent control flow: export cannot follow it
                return x
            return -x

    model = Branchy().train()
    before, flags = _snapshot(model)
    with pytest.raises(TraceError, match=r"could not trace Branchy.*hand-written spec"):
        pm.trace(model, torch.randn(2, 3))
    after, flags_after = _snapshot(model)
    assert flags == flags_after and all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_input_shape_clear_error():
    model, _, _, _ = traced("mlp")
    before, _ = _snapshot(model)
    with pytest.raises(TraceError, match=r"forward failed on the example input \(shapes \[\(2, 5\)\]\)"):
        pm.trace(model, torch.randn(2, 5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_not_a_module():
    with pytest.raises(TraceError, match="expected an nn.Module"):
        pm.trace(lambda x: x, torch.randn(2))


class TwoHeads(nn.Module):
    """A shared body and two task heads, the head chosen by a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head_a, self.head_b = nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x, task: str = "a"):
        h = torch.relu(self.body(x))
        return (self.head_a if task == "a" else self.head_b)(h)


class AuxInTraining(nn.Module):
    """An auxiliary head that only runs in training mode (Inception-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def _changed_outputs(model, spec, calls, seed=0):
    """Max |Δ| over ``calls`` (args, kwargs, train) after permuting by a random permutation of ``spec``."""
    import copy

    other = copy.deepcopy(model)
    other.load_state_dict(pm.apply_permutation(spec, pm.random_permutation(spec, seed), model.state_dict()))
    worst = 0.0
    for args, kwargs, train in calls:
        outs = []
        for m in (model, other):
            m.train(train)
            torch.manual_seed(0)
            with torch.no_grad():
                y = m(*args, **kwargs)
            outs.append(y if isinstance(y, tuple) else (y,))
            m.eval()
        worst = max(worst, max(float((p - q).abs().max()) for p, q in zip(*outs)))
    return worst


def test_a_parameter_no_call_reads_is_frozen_with_a_warning(caplog):
    model, x = TwoHeads().eval(), torch.randn(4, 8)
    spec = pm.trace(model, x, cache=False)
    unreached = [f for f in spec.frozen if f.kind is pm.FrozenKind.UNREACHED]
    assert {a.key for f in unreached for a in f.members} == {"head_b.weight", "head_b.bias"}
    assert not any(a.key.startswith("head_b") for g in spec.groups for a in g.members)
    assert "not read by the traced forward" in caplog.text and "extra_examples" in caplog.text


def test_extra_examples_cover_the_other_task_head():
    model, x = TwoHeads().eval(), torch.randn(4, 8)
    spec = pm.trace(model, x, extra_examples=[pm.graph.Example((x,), {"task": "b"})], cache=False)
    body = _group_of(spec, "body.weight")
    assert {("head_a.weight", 1), ("head_b.weight", 1)} <= {(a.key, a.dim) for a in body.members}
    calls = [((x,), {"task": t}, False) for t in "ab"]
    assert _changed_outputs(model, spec, calls) < 1e-5


def test_train_mode_branches_are_traced_by_default():
    model, x = AuxInTraining().eval(), torch.randn(4, 8)
    spec = pm.trace(model, x, cache=False)
    assert ("aux.weight", 1) in {(a.key, a.dim) for a in _group_of(spec, "body.weight").members}
    assert _changed_outputs(model, spec, [((x,), {}, False), ((x,), {}, True)]) < 1e-5
    eval_only = pm.trace(model, x, train_mode=False, cache=False)
    assert any(f.kind is pm.FrozenKind.UNREACHED for f in eval_only.frozen)


def test_a_model_that_cannot_export_in_train_mode_is_traced_in_eval_mode_with_a_warning(caplog):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    spec = pm.trace(model, torch.randn(1, 4), cache=False)  # batch 1: BatchNorm cannot train on it
    assert [g.size for g in spec.groups] == [6]
    assert "eval mode only" in caplog.text


def test_partial_interleaved_rotary_traces_and_preserves_the_function():
    """GPT-J's rotary embedding on the first dims of each head (pairs interleaved) once sent spec
    extraction into an endless loop; now those dims are frozen and the rest of each head moves."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTJConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPTJForCausalLM(cfg).eval()
    x = torch.randint(0, 64, (1, 8))
    spec = pm.trace(model, x, example_kwargs={"use_cache": False}, cache=False)
    q = [g for g in spec.groups for a in g.members if a.key.endswith("q_proj.weight") and a.repeat > 1]
    assert q and all(a.offset >= cfg.rotary_dim for g in q for a in g.members if a.key.endswith("q_proj.weight"))
    for seed in range(3):
        assert pm.check_function_preserved(model, spec, x, example_kwargs={"use_cache": False}, seed=seed).relative_error < 1e-5
