"""Per-op rules: each construct is traced, checked to keep the function under random permutations
(of a copy with its constant state redrawn, so a forgotten buffer shows), and its groups and
frozen spaces asserted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import randomized

import permerge as pm
from permerge.check import check_function_preserved
from permerge.graph.rules import RULES, rule_for
from permerge.spec import FrozenKind

aten = torch.ops.aten


def _checked(model: nn.Module, *x: torch.Tensor, permutations: int = 3) -> pm.PermutationSpec:
    """Trace ``model``; assert random permutations of the spec keep the function; return the spec."""
    model = model.eval()
    spec = pm.trace(model, x, cache=False)
    for seed in range(permutations):
        other = randomized(model, seed)
        err = check_function_preserved(other, spec, x, pm.random_permutation(spec, seed), tol=1e-4)
        assert err.relative_error < 1e-5
    return spec


def _hidden_frozen(spec: pm.PermutationSpec) -> list:
    return [f for f in spec.frozen if not f.boundary]


def _sizes(spec: pm.PermutationSpec, key: str, dim: int = 0) -> list[int]:
    return sorted(g.size for g in spec.groups for a in g.members if a.key == key and a.dim == dim)


def test_rule_lookup_uses_aten_metadata():
    # in-place and out= variants reuse their functional op's rule; pointwise tags give elementwise
    assert rule_for(aten.hardswish_.default, RULES) is not None
    assert rule_for(aten.leaky_relu_.default, RULES) is not None
    assert rule_for(aten.__iand__.Tensor, RULES) is not None
    assert rule_for(aten.abs.out, RULES) is not None
    assert rule_for(aten.clamp_min.default, RULES) is not None  # tagged pointwise, no own entry
    # unknown stays unknown: order-dependent or randomly seeded ops get no rule
    assert rule_for(aten.kthvalue.default, RULES) is None
    assert rule_for(aten.bernoulli.p, RULES) is None


class _MobileBlock(nn.Module):
    """In-place and variant activations (MobileNetV3, LCNet, CSPNet)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.c = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.hardswish(self.bn(self.a(x)), inplace=True)
        y = F.leaky_relu(self.b(y), 0.1, inplace=True).clamp_min(-0.5)
        y.add_(1.0).mul_(y.sigmoid())
        return self.c(y)


def test_inplace_and_variant_activations_pass_channels():
    spec = _checked(_MobileBlock(), torch.randn(2, 3, 6, 6))
    assert _sizes(spec, "a.weight") == [8] and _sizes(spec, "b.weight") == [8]
    assert not _hidden_frozen(spec)


class _StdConv(nn.Conv2d):
    """Weight standardisation two ways: BiT's batch_norm + reshape_as, and mean/std over (1, 2, 3)."""

    def __init__(self, cin, cout, via_bn):
        super().__init__(cin, cout, 3, padding=1)
        self.via_bn = via_bn

    def forward(self, x):
        w = self.weight
        if self.via_bn:
            w = F.batch_norm(w.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6).reshape_as(w)
        else:
            w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, padding=1)


def test_weight_standardisation_keeps_filters_permutable():
    model = nn.Sequential(_StdConv(3, 8, True), nn.GroupNorm(2, 8), nn.ReLU(), _StdConv(8, 6, False), nn.ReLU(), nn.Conv2d(6, 2, 1))
    spec = _checked(model, torch.randn(2, 3, 5, 5))
    assert not _hidden_frozen(spec)
    assert _sizes(spec, "0.weight") == [2, 4] and _sizes(spec, "3.weight") == [6]  # GroupNorm: 2 ⊗ 4
    assert any(a.key == "3.weight" and a.dim == 1 for g in spec.groups for a in g.members)


class _Shift(nn.Module):
    """Swin's shifted windows roll the spatial axes; rolling channels is not a symmetry."""

    def __init__(self, roll_channels=False):
        super().__init__()
        self.a, self.b, self.roll_channels = nn.Linear(4, 8), nn.Linear(8, 3), roll_channels

    def forward(self, x):  # x: (B, H, W, C)
        y = self.a(x).relu()
        y = torch.roll(y, shifts=(1, -1), dims=(1, 2)).flip(1)
        if self.roll_channels:
            y = torch.roll(y, 2, dims=-1)
        return self.b(y)


def test_roll_and_flip_pass_channels_and_freeze_the_rolled_channel_axis():
    spec = _checked(_Shift(), torch.randn(2, 4, 4, 4))
    assert _sizes(spec, "a.weight") == [8] and not _hidden_frozen(spec)
    spec = _checked(_Shift(roll_channels=True), torch.randn(2, 4, 4, 4))
    assert not spec.groups
    assert [f.kind for f in _hidden_frozen(spec)] == [FrozenKind.UNSUPPORTED]
    assert "rolled" in _hidden_frozen(spec)[0].reason


class _RelPosAttention(nn.Module):
    """Packed qkv split by unbind, manual attention, a relative-position bias table indexed by a buffer."""

    def __init__(self, dim=8, heads=2, tokens=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        pos = torch.arange(tokens)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + tokens - 1).reshape(-1), persistent=False)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1) + bias.unsqueeze(0)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def test_relative_position_bias_heads_follow_attention_heads():
    spec = _checked(_RelPosAttention(), torch.randn(2, 4, 8))
    heads = [g for g in spec.groups if any(a.key == "table" and a.dim == 1 for a in g.members)]
    assert len(heads) == 1 and heads[0].size == 2
    assert {a.key for a in heads[0].members} >= {"qkv.weight", "proj.weight"}
    assert _sizes(spec, "proj.weight", 1) == [2, 4]  # whole heads and the shared head dim
    # the table's rows are read at fixed positions: frozen, but positions, not units: not a loss
    assert not _hidden_frozen(spec) and not spec.axes_of("table")[1:]


class _TokenPruning(nn.Module):
    """Keep the top-k tokens by a score (gather with an expanded index; index_select of a fixed set)."""

    def __init__(self):
        super().__init__()
        self.a, self.score, self.b = nn.Linear(4, 8), nn.Linear(8, 1), nn.Linear(8, 3)

    def forward(self, x):
        y = self.a(x).relu()
        idx = self.score(y).squeeze(-1).topk(3, dim=1).indices
        y = torch.gather(y, 1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        return self.b(y.index_select(1, torch.tensor([0, 2])))


def test_gather_and_index_select_on_tokens_keep_channels():
    spec = _checked(_TokenPruning(), torch.randn(2, 5, 4))
    assert _sizes(spec, "a.weight") == [8] and not _hidden_frozen(spec)


class _Concat(nn.Module):
    """A concatenation met by a trivial split (GroupNorm(1, C)) and by GhostNet's concat-then-slice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.gn = nn.GroupNorm(1, 10)
        self.cheap = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        y = self.gn(torch.cat([self.a(x), self.b(x)], 1))
        y = torch.cat([y, self.cheap(y)], 1)[:, :12]
        return self.out(y)


def test_concat_meets_trivial_split_and_slice_without_conflict():
    spec = _checked(_Concat(), torch.randn(2, 3, 5, 5))
    # the slice keeps all of cat(a, b) and a's first 2 channels again: they must stay in front
    assert _sizes(spec, "a.weight") == [2, 2] and _sizes(spec, "b.weight") == [6]
    assert not _hidden_frozen(spec)


class _EvaQkv(nn.Module):
    """EVA/BEiT: qkv bias concatenated from q, a constant zero k bias and v, then viewed as 3 ⊗ heads ⊗ head_dim."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads, self.proj = heads, nn.Linear(dim, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)

    def forward(self, x):
        b, n, c = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def test_sum_of_qkv_biases_meets_the_heads_product():
    spec = _checked(_EvaQkv(), torch.randn(2, 3, 8))
    assert not _hidden_frozen(spec)
    assert _sizes(spec, "q_bias") == [2, 4] and _sizes(spec, "v_bias") == [2, 4]


class _Pads(nn.Module):
    """EfficientViT pads v's head dim with ones (a constant slice); reflect padding of space."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(7, 3)
        self.c = nn.Conv2d(3, 5, 3)

    def forward(self, x, img):
        y = F.pad(self.a(x), (0, 1), value=1.0)  # (B, N, 6 + 1)
        z = self.c(F.pad(img, (1, 1, 1, 1), mode="reflect")).mean((2, 3))
        return self.b(y).sum(1) + z[:, :3]


def test_constant_padding_is_a_sum_and_reflect_padding_keeps_channels():
    spec = _checked(_Pads(), torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4))
    assert _sizes(spec, "a.weight") == [6]
    assert any(a.key == "b.weight" and a.dim == 1 and a.offset == 0 for g in spec.groups for a in g.members)


class _Misc(nn.Module):
    """einsum attention, repeat_interleave, unfold/fold (VOLO), max over channels (values only)."""

    def __init__(self):
        super().__init__()
        self.qk, self.v = nn.Linear(4, 8), nn.Linear(4, 8)
        self.conv, self.out = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x, img):
        q = self.qk(x).unflatten(-1, (2, 4))  # (B, N, heads, d)
        attn = torch.einsum("bnhd,bmhd->bhnm", q, q).softmax(-1)
        y = torch.einsum("bhnm,bmhd->bnhd", attn, self.v(x).unflatten(-1, (2, 4))).flatten(2)
        y = y.repeat_interleave(2, dim=0)  # (2B, N, 8)
        c = self.conv(img)
        patches = F.unfold(c, 3, padding=1)  # (B, 6·9, L)
        c = F.fold(patches, img.shape[-2:], 3, padding=1)
        return y.amax(-1).sum() + self.out(c).sum() + c.max(dim=1).values.sum()


def test_einsum_repeat_interleave_fold_and_max():
    spec = _checked(_Misc(), torch.randn(2, 3, 4), torch.randn(2, 4, 4, 4))
    assert _sizes(spec, "qk.weight") == [2, 4] and _sizes(spec, "conv.weight") == [6]
    assert not _hidden_frozen(spec)


def test_argmax_positions_freeze_the_reduced_axis():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.table = nn.Linear(4, 6), nn.Embedding(6, 3)

        def forward(self, x):
            return self.table(self.a(x).max(dim=-1).indices)

    spec = _checked(Net(), torch.randn(2, 4))
    assert not spec.groups and "maximum" in _hidden_frozen(spec)[0].reason


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_layers_permute_hidden_units_per_layer_and_direction(cell):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = cell(4, 6, num_layers=2, bidirectional=True, batch_first=True), nn.Linear(12, 3)

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    spec = _checked(Net(), torch.randn(2, 5, 4))
    assert len([g for g in spec.groups if g.size == 6]) == 4 and not _hidden_frozen(spec)


def test_given_initial_state_ties_layers_to_one_permutation():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.GRU(4, 6, num_layers=2, batch_first=True), nn.Linear(6, 3)

        def forward(self, x, h0):
            return self.out(self.rnn(x, h0)[0])

    spec = pm.trace(Net().eval(), (torch.randn(2, 5, 4), torch.randn(2, 2, 6)), cache=False)
    assert not spec.groups  # the user's h0 holds both layers' units, fixed by the caller


def test_autocast_region_is_propagated_through():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            with torch.autocast("cpu", enabled=False):
                y = self.a(x.float()).relu()
            return self.b(y)

    spec = _checked(Net(), torch.randn(2, 4))
    assert _sizes(spec, "a.weight") == [6]


class _Blur(nn.Module):
    """Anti-aliasing: a fixed blur filter repeated per channel (non-persistent, uniform along channels)."""

    def __init__(self, uniform=True):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        filt = torch.tensor([1.0, 2.0, 1.0])
        filt = (filt[:, None] * filt[None, :] / 16)[None, None].repeat(4, 1, 1, 1)
        if not uniform:
            filt = filt * torch.arange(1.0, 5.0).view(4, 1, 1, 1)
        self.register_buffer("filt", filt, persistent=False)

    def forward(self, x):
        return self.b(F.conv2d(self.a(x), self.filt, padding=1, groups=4))


def test_fixed_buffers_constrain_only_the_axes_they_vary_along():
    spec = _checked(_Blur(), torch.randn(2, 3, 5, 5))
    assert _sizes(spec, "a.weight") == [4] and not _hidden_frozen(spec)
    spec = pm.trace(_Blur(uniform=False).eval(), torch.randn(2, 3, 5, 5), cache=False)
    assert not spec.groups and "non-persistent buffer filt" in _hidden_frozen(spec)[0].reason


def test_composite_op_without_rule_is_decomposed():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.PixelShuffle(2), nn.Conv2d(2, 2, 1))
    spec = _checked(model, torch.randn(2, 3, 4, 4))
    (g,) = [g for g in spec.groups if any(a.key == "0.weight" for a in g.members)]
    assert g.size == 2 and next(a for a in g.members if a.key == "0.weight").block == 4


def test_rule_that_gives_up_freezes_as_unsupported_not_error():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.v = nn.Linear(4, 6), nn.Parameter(torch.randn(6))

        def forward(self, x):
            return self.a(x) @ self.v  # matmul with a 1-d operand: not followed

    spec = pm.trace(Net().eval(), torch.randn(2, 4), cache=False)
    kinds = {f.kind for f in _hidden_frozen(spec)}
    assert kinds == {FrozenKind.UNSUPPORTED}


class _PointwiseAxisConv(nn.Module):
    """LambdaNet's position lambdas: a Conv3d whose kernel is 1 along the value (channel) axis."""

    def __init__(self):
        super().__init__()
        self.v, self.lam, self.out = nn.Linear(4, 6), nn.Conv3d(1, 2, (3, 3, 1), padding=(1, 1, 0)), nn.Linear(6, 3)

    def forward(self, x):  # x: (B, H, W, C)
        y = self.lam(self.v(x).unsqueeze(1))  # (B, 2, H, W, 6): slides over H, W, reads the 6 values pointwise
        return self.out(y.sum(1))


def test_conv_axis_with_kernel_one_passes_units_and_a_sliding_axis_freezes_them():
    spec = _checked(_PointwiseAxisConv(), torch.randn(2, 4, 4, 4))
    assert _sizes(spec, "v.weight") == [6] and not _hidden_frozen(spec)

    class Eca(nn.Module):  # ECA attention: a 1-d conv slides over the channels
        def __init__(self):
            super().__init__()
            self.a, self.gate, self.b = nn.Conv2d(3, 8, 1), nn.Conv1d(1, 1, 3, padding=1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            w = self.gate(y.mean((2, 3)).unsqueeze(1)).sigmoid().view(y.shape[0], -1, 1, 1)
            return self.b(y * w)

    spec = _checked(Eca(), torch.randn(2, 3, 5, 5))
    assert not spec.groups and "convolution kernel" in _hidden_frozen(spec)[0].reason
