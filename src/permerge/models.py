"""Small example networks covering the permutation patterns permerge must handle.

Every model is plain PyTorch with random initialisation. They are used by the
CLI demo, the benchmarks and the tests, so each one is small and exercises a
distinct structure: plain chains, a conv->linear flatten, residual adds,
channel concatenation, depthwise convolutions, transposed convolutions,
group norms, attention heads and tied embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm2d = Literal["bn", "ln", "none"]
_SEQ_NORMS = {"ln": nn.LayerNorm, "rms": nn.RMSNorm}


def _norm2d(kind: Norm2d, channels: int) -> nn.Module:
    """Channel norm for (B, C, H, W) maps; "ln" normalises over channels and space."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


def _conv_norm_relu(c_in: int, c_out: int, norm: Norm2d = "bn") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"),
        _norm2d(norm, c_out),
        nn.ReLU(),
    )


class MLP(nn.Module):
    """Fully connected ReLU network; the simplest chain of permutable hidden layers."""

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (512, 512, 512),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        dims = (in_features, *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in pairwise(dims):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, 28, 28) or (B, 784) -> (B, num_classes)."""
        return self.net(x)


class VGG(nn.Module):
    """VGG-style CNN for 28x28 inputs, flattened (not pooled) into the classifier.

    The flatten makes the last conv's channels appear as strided blocks of the
    first linear layer's input features, a case permutation matching must handle.
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 32, 64, 64),
        num_classes: int = 10,
        in_channels: int = 1,
        norm: Norm2d = "bn",
        image_size: int = 28,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(pairwise((in_channels, *widths))):
            layers.append(_conv_norm_relu(c_in, c_out, norm))
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** (len(widths) // 2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(widths[-1] * side * side, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, 28, 28) -> (B, num_classes)."""
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block with a 1x1 conv + norm projection shortcut on shape change."""

    def __init__(
        self, c_in: int, c_out: int, stride: int = 1, norm: Norm2d = "bn"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm2d(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                _norm2d(norm, c_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (3 stages x 3 basic blocks) with width multiplier.

    ``norm="ln"`` uses ``nn.GroupNorm(1, C)``: LayerNorm over channels and space,
    the variant used by the REPAIR paper (Jordan et al., 2022) for its LN ResNets.
    """

    def __init__(
        self,
        width: int = 1,
        num_classes: int = 10,
        in_channels: int = 1,
        norm: Norm2d = "bn",
    ) -> None:
        super().__init__()
        widths = (16 * width, 32 * width, 64 * width)
        self.stem = _conv_norm_relu(in_channels, widths[0], norm)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(3):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride, norm))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> (B, num_classes)."""
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


class DenseBlockNet(nn.Module):
    """DenseNet-style net: each dense layer sees the concatenation of all earlier maps.

    Concatenation means one layer's output channels become a slice of several
    later layers' input channels.
    """

    def __init__(
        self,
        in_channels: int = 1,
        stem: int = 16,
        growth: int = 8,
        num_layers: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(stem + i * growth),
                nn.ReLU(),
                nn.Conv2d(stem + i * growth, growth, 3, padding=1, bias=False),
            )
            for i in range(num_layers)
        )
        c_total = stem + num_layers * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(c_total),
            nn.ReLU(),
            nn.Conv2d(c_total, c_total // 2, 1, bias=False),
            nn.AvgPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_total // 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> (B, num_classes)."""
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        out = self.transition(torch.cat(features, dim=1))
        return self.head(self.pool(out).flatten(1))


def _depthwise_separable(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (groups=C) + BN + ReLU6, then a linear pointwise 1x1 + BN."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU6(),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1, depthwise 3x3, linear 1x1 projection, residual."""

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class MobileNetBlockNet(nn.Module):
    """Tiny MobileNet: depthwise convs tie a channel's input and output permutation."""

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 16,
        expansion: int = 4,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(),
        )
        self.blocks = nn.Sequential(
            _depthwise_separable(width, 2 * width, stride=2),
            _depthwise_separable(2 * width, 2 * width),
            InvertedResidual(2 * width, expansion),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> (B, num_classes)."""
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


class UNet(nn.Module):
    """Two-level U-Net with transposed-conv upsampling and concatenated skips.

    The second decoder stage uses ``nn.GroupNorm(4, C)``, whose statistics are
    shared within channel groups (permutations must respect those groups).
    Spatial input size must be divisible by 4.
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int = 2, base: int = 8
    ) -> None:
        super().__init__()
        if base % 2:
            raise ValueError("base must be even: GroupNorm(4, 2 * base) needs it")
        b1, b2, b3 = base, 2 * base, 4 * base
        self.enc1 = _conv_norm_relu(in_channels, b1)
        self.enc2 = _conv_norm_relu(b1, b2)
        self.bottleneck = _conv_norm_relu(b2, b3)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(b3, b2, 2, stride=2)
        self.dec2 = nn.Sequential(
            nn.Conv2d(2 * b2, b2, 3, padding=1, bias=False),
            nn.GroupNorm(4, b2),
            nn.ReLU(),
        )
        self.up1 = nn.ConvTranspose2d(b2, b1, 2, stride=2)
        self.dec1 = _conv_norm_relu(2 * b1, b1)
        self.out = nn.Conv2d(b1, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W)."""
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        bottom = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(bottom), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


class ManualAttention(nn.Module):
    """Multi-head self-attention from separate q/k/v/o projections and SDPA."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            proj(x).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        attention: Literal["torch", "manual"] = "torch",
        norm: Literal["ln", "rms"] = "ln",
    ) -> None:
        super().__init__()
        self.norm1 = _SEQ_NORMS[norm](d_model)
        self.attention = attention
        if attention == "torch":
            self.attn: nn.Module = nn.MultiheadAttention(
                d_model, n_heads, batch_first=True
            )
        elif attention == "manual":
            self.attn = ManualAttention(d_model, n_heads)
        else:
            raise ValueError(f"unknown attention {attention!r}")
        self.norm2 = _SEQ_NORMS[norm](d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        if self.attention == "torch":
            h = self.attn(h, h, h, need_weights=False)[0]
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class TransformerBlockNet(nn.Module):
    """Small bidirectional pre-norm transformer: token ids to per-token logits.

    ``tie_embeddings=True`` makes the head weight the very same Parameter as the
    token embedding, so both must receive one shared permutation.
    """

    def __init__(
        self,
        vocab: int = 64,
        d_model: int = 32,
        n_heads: int = 4,
        d_ff: int = 64,
        n_layers: int = 2,
        max_len: int = 16,
        attention: Literal["torch", "manual"] = "torch",
        norm: Literal["ln", "rms"] = "ln",
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff, attention, norm)
            for _ in range(n_layers)
        )
        self.norm = _SEQ_NORMS[norm](d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, T) long token ids, T <= max_len -> (B, T, vocab) logits."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@dataclass
class ModelRef:
    """A model with an example input to trace it on (what the CLI and the HF loader build)."""

    model: nn.Module
    inputs: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


EXAMPLES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "vgg": VGG,
    "resnet20": ResNet20,
    "densenet": DenseBlockNet,
    "mobilenet": MobileNetBlockNet,
    "unet": UNet,
    "transformer": TransformerBlockNet,
}


def example_input(name: str, batch: int = 2) -> tuple[Tensor, ...]:
    """A deterministic valid input tuple for the default ``EXAMPLES[name]()``."""
    gen = torch.Generator().manual_seed(0)
    if name == "transformer":
        return (torch.randint(0, 64, (batch, 8), generator=gen),)
    if name == "unet":
        return (torch.randn(batch, 1, 32, 32, generator=gen),)
    if name in EXAMPLES:
        return (torch.randn(batch, 1, 28, 28, generator=gen),)
    raise KeyError(f"unknown example {name!r}; choose from {sorted(EXAMPLES)}")
