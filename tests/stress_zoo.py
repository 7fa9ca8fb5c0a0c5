"""The stress zoo: unusual but legitimate models, each a trap for a tracer that assumes too much.

Every entry is small and builds in milliseconds. The property checked on each (tests/test_stress.py):
for random permutations drawn from the traced spec, the model's outputs are unchanged — on the
example input, on two other batch sizes and in train mode (seeded) — and integer outputs are
unchanged exactly. A space the tracer cannot prove safe must be frozen; any silent change fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import permerge as pm


@dataclass(frozen=True)
class StressModel:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[Any, ...]]  # batch size → positional inputs
    kwargs: dict[str, Any] = field(default_factory=dict)
    extra: Callable[[int], list[pm.Example]] = lambda b: []  # further example calls for trace()
    batch: int = 4


def _vec(features: int) -> Callable[[int], tuple[torch.Tensor]]:
    return lambda b: (torch.randn(b, features, generator=torch.Generator().manual_seed(b)),)


def _img(channels: int = 3, size: int = 8) -> Callable[[int], tuple[torch.Tensor]]:
    return lambda b: (torch.randn(b, channels, size, size, generator=torch.Generator().manual_seed(b)),)


def _seq(features: int = 8, length: int = 5) -> Callable[[int], tuple[torch.Tensor]]:
    return lambda b: (torch.randn(b, length, features, generator=torch.Generator().manual_seed(b)),)


def _tokens(vocab: int = 32, length: int = 6) -> Callable[[int], tuple[torch.Tensor]]:
    return lambda b: (torch.randint(0, vocab, (b, length), generator=torch.Generator().manual_seed(b)),)


class _Body(nn.Module):
    """``fc1 → act → (something over the hidden units) → fc2``: the hidden units are the trap."""

    def __init__(self, hidden: Callable[[torch.Tensor], torch.Tensor], d_in: int = 8, width: int = 16,
                 d_hidden_out: int | None = None, d_out: int = 3) -> None:  # fmt: skip
        super().__init__()
        self.fc1 = nn.Linear(d_in, width)
        self.fc2 = nn.Linear(d_hidden_out or width, d_out)
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(torch.relu(self.fc1(x))))


def _body(hidden: Callable[[torch.Tensor], torch.Tensor], **kw: Any) -> Callable[[], nn.Module]:
    return lambda: _Body(hidden, **kw)


class TaskHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, task: str = "a") -> torch.Tensor:
        return (self.a if task == "a" else self.b)(torch.relu(self.body(x)))


class AuxTrain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.body(x))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


class EvalOnly(nn.Module):
    """A refinement layer used only at inference."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.refine = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        if not self.training:
            h = h + torch.tanh(self.refine(h))
        return self.head(h)


class BatchBranch(nn.Module):
    """A different path for larger batches (a fast path that reads other weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.small, self.large = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return self.large(h) if x.shape[0] > 4 else self.small(h)


class Shared(nn.Module):
    """One hidden layer applied twice (weight sharing across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.mid(h))
        return self.out(torch.relu(self.mid(h)))


class RawParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 16) / 3)
        self.b1 = nn.Parameter(torch.randn(16))
        self.scale = nn.Parameter(torch.rand(16) + 0.5)
        self.w2 = nn.Parameter(torch.randn(16, 3) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.relu(x @ self.w1 + self.b1) * self.scale) @ self.w2


class EinsumAttention(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = torch.einsum("bthd,bshd->bhts", q, k).softmax(-1)
        return x + self.out(torch.einsum("bhts,bshd->bthd", att, v).reshape(b, t, d))


class ArgmaxOut(nn.Module):
    """Returns class ids (integers) beside the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits.argmax(-1), logits


class HiddenArgmax(nn.Module):
    """Returns which *hidden* unit fired most: depends on the hidden units' order."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc(x))
        return self.out(h), h.argmax(-1)


class ChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.c2(torch.relu(self.bn(self.c1(x)))).mean((2, 3))


class PermuteToLast(nn.Module):
    """Channels moved to the last axis and back (NHWC processing with a Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.lin, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x)).permute(0, 2, 3, 1)
        h = torch.relu(self.lin(h)).permute(0, 3, 1, 2)
        return self.c2(h).flatten(1)


class CircularConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular")
        self.c2 = nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x))).flatten(1)


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.se1, self.se2, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4), nn.Linear(4, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        s = torch.sigmoid(self.se2(torch.relu(self.se1(h.mean((2, 3))))))
        return self.c2(h * s[:, :, None, None]).mean((2, 3))


class ChannelShuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1, groups=1)
        self.c2 = nn.Conv2d(8, 8, 1, groups=2)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        b, c, hh, ww = h.shape
        h = h.view(b, 2, c // 2, hh, ww).transpose(1, 2).reshape(b, c, hh, ww)  # ShuffleNet
        return self.c3(torch.relu(self.c2(h))).flatten(1)


class PixelShuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.pixel_shuffle(torch.relu(self.c1(x)), 2)).flatten(1)


class GLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(a * torch.sigmoid(b))


class LearnedPositions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.pos = nn.Parameter(torch.randn(6, 8))
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(ids) + self.pos)))


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.rnn, self.out = nn.Linear(8, 12), nn.GRU(12, 10, batch_first=True), nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(torch.relu(self.inp(x)))[0][:, -1])


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.att(h, h, h, need_weights=False)[0]).mean(1)


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(8, 16), nn.Dropout(0.3), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class NoStatsBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.bn(self.c1(x)))).flatten(1)


class MultiAxisLN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.ln, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm([8, 8, 8]), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.ln(self.c1(x)))).flatten(1)


class Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bil = nn.Linear(8, 6), nn.Linear(8, 5), nn.Bilinear(6, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bil(torch.relu(self.a(x)), torch.relu(self.b(x)))


class WeightNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.utils.parametrizations.weight_norm(nn.Linear(8, 16))
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ConvFeatures1d(nn.Module):
    """A Conv1d whose 'length' axis is the hidden units (mixes neighbouring units)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.conv, self.fc2 = nn.Linear(8, 16), nn.Conv1d(1, 1, 3, padding=1), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(self.conv(h.unsqueeze(1)).squeeze(1))


class LocalResponse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.lrn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.LocalResponseNorm(3), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.lrn(torch.relu(self.c1(x)))).flatten(1)


class Transposed(nn.Module):
    """Hidden units moved to a spatial axis of a Conv2d (mixes them)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.conv, self.fc2 = nn.Linear(8, 16), nn.Conv2d(1, 1, 3, padding=1), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x)).view(x.shape[0], 1, 4, 4)
        return self.fc2(self.conv(h).flatten(1))


class PReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.PReLU(16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _gptj() -> nn.Module:
    import transformers

    cfg = transformers.GPTJConfig(vocab_size=32, n_embd=16, n_layer=1, n_head=2, rotary_dim=4, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPTJForCausalLM(cfg)


def _index_by_position(h: torch.Tensor) -> torch.Tensor:
    """Scales unit i by i (a position-dependent weighting over the hidden units)."""
    return h * torch.arange(h.shape[-1], dtype=h.dtype)


STRESS: list[StressModel] = [
    StressModel("task_heads", TaskHeads, _vec(8), extra=lambda b: [pm.Example(_vec(8)(b), {"task": "b"})]),
    StressModel("aux_head_in_training", AuxTrain, _vec(8)),
    StressModel("refine_only_in_eval", EvalOnly, _vec(8)),
    StressModel("batch_size_branch", BatchBranch, _vec(8), extra=lambda b: [pm.Example(_vec(8)(8))]),
    StressModel("shared_submodule", Shared, _vec(8)),
    StressModel("raw_parameters", RawParams, _vec(8)),
    StressModel("einsum_attention", EinsumAttention, _seq(8)),
    StressModel("integer_outputs", ArgmaxOut, _vec(8)),
    StressModel("hidden_argmax", HiddenArgmax, _vec(8)),
    StressModel("maxout_pool1d", _body(lambda h: F.max_pool1d(h.unsqueeze(1), 2).squeeze(1), d_hidden_out=8), _vec(8)),
    StressModel("avgpool_over_units", _body(lambda h: F.avg_pool1d(h.unsqueeze(1), 3, 1, 1).squeeze(1)), _vec(8)),
    StressModel("conv1d_over_units", ConvFeatures1d, _vec(8)),
    StressModel("units_as_image", Transposed, _vec(8)),
    StressModel("cumsum_over_units", _body(lambda h: h.cumsum(-1)), _vec(8)),
    StressModel("sort_over_units", _body(lambda h: h.sort(-1).values), _vec(8)),
    StressModel("topk_over_units", _body(lambda h: h.topk(4, -1).values, d_hidden_out=4), _vec(8)),
    StressModel("softmax_over_units", _body(lambda h: h.softmax(-1)), _vec(8)),
    StressModel("max_over_units", _body(lambda h: h.amax(-1, keepdim=True), d_hidden_out=1), _vec(8)),
    StressModel("roll_units", _body(lambda h: h.roll(1, -1)), _vec(8)),
    StressModel("flip_units", _body(lambda h: h.flip(-1)), _vec(8)),
    StressModel("repeat_interleave_units", _body(lambda h: h.repeat_interleave(2, -1), d_hidden_out=32), _vec(8)),
    StressModel("cat_with_itself", _body(lambda h: torch.cat([h, h.flip(-1)], -1), d_hidden_out=32), _vec(8)),
    StressModel("gather_units", _body(lambda h: h[:, torch.tensor([3, 1, 4, 1, 5])], d_hidden_out=5), _vec(8)),
    StressModel("slice_units", _body(lambda h: h[:, 2:10], d_hidden_out=8), _vec(8)),
    StressModel("strided_units", _body(lambda h: h[:, ::2], d_hidden_out=8), _vec(8)),
    StressModel("position_weighted_units", _body(_index_by_position), _vec(8)),
    StressModel("interpolate_units", _body(lambda h: F.interpolate(h.unsqueeze(1), scale_factor=0.5, mode="linear").squeeze(1),
                                           d_hidden_out=8), _vec(8)),  # fmt: skip
    StressModel("fft_units", _body(lambda h: torch.fft.rfft(h, dim=-1).abs(), d_hidden_out=9), _vec(8)),
    StressModel("outer_product", _body(lambda h: (h.unsqueeze(-1) * h.unsqueeze(-2)).flatten(1), width=4, d_hidden_out=16), _vec(8)),
    StressModel("glu_halves", GLU, _vec(8)),
    StressModel("learned_positions", LearnedPositions, _tokens()),
    StressModel("channels_last", ChannelsLast, _img()),
    StressModel("permute_to_last", PermuteToLast, _img()),
    StressModel("circular_padding", CircularConv, _img()),
    StressModel("squeeze_excite", SqueezeExcite, _img()),
    StressModel("channel_shuffle", ChannelShuffle, _img()),
    StressModel("pixel_shuffle", PixelShuffle, _img()),
    StressModel("multi_axis_layernorm", MultiAxisLN, _img()),
    StressModel("batchnorm_without_running_stats", NoStatsBN, _img()),
    StressModel("local_response_norm", LocalResponse, _img()),
    StressModel("gru", GRUNet, _seq(8)),
    StressModel("multihead_attention", MHA, _seq(8)),
    StressModel("dropout", WithDropout, _vec(8)),
    StressModel("bilinear", Bilinear, _vec(8)),
    StressModel("weight_norm_parametrization", WeightNorm, _vec(8)),
    StressModel("prelu_per_unit", PReLUNet, _vec(8)),
    StressModel("partial_rotary_gptj", _gptj, _tokens(), {"use_cache": False}, batch=2),
]
