"""The test zoo: small randomly initialised models with example inputs.

Each entry builds a fresh, deterministically seeded model in eval mode. Hugging
Face models come from tiny configs (random weights, nothing is downloaded).
Entries are small enough that a forward pass takes milliseconds on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from permerge import models

SEED = 0


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry; ``inputs()`` and ``input_kwargs`` are passed to ``forward``."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    min_permutable_fraction: float
    hf: bool
    input_kwargs: dict[str, Any] = field(default_factory=dict)


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Wrap ``factory`` so every call seeds the RNG and returns an eval-mode model."""

    def build() -> nn.Module:
        torch.manual_seed(SEED)
        return factory().eval()

    return build


def _images(channels: int, size: int) -> Callable[[], tuple[torch.Tensor]]:
    def inputs() -> tuple[torch.Tensor]:
        gen = torch.Generator().manual_seed(SEED)
        return (torch.randn(2, channels, size, size, generator=gen),)

    return inputs


def _tokens(vocab: int = 64, length: int = 8) -> Callable[[], tuple[torch.Tensor]]:
    def inputs() -> tuple[torch.Tensor]:
        gen = torch.Generator().manual_seed(SEED)
        return (torch.randint(0, vocab, (2, length), generator=gen),)

    return inputs


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


def _llama(tie: bool) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=tie,
            attn_implementation="sdpa",
        )
        return LlamaForCausalLM(config)

    return factory


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        attn_implementation="sdpa",
    )
    return BertForSequenceClassification(config)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
        attn_implementation="sdpa",
    )
    return ViTForImageClassification(config)


def _hf_resnet(layer_type: str) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        from transformers import ResNetConfig, ResNetForImageClassification

        config = ResNetConfig(
            num_channels=3,
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            layer_type=layer_type,
            num_labels=10,
        )
        return ResNetForImageClassification(config)

    return factory


def _convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(
        num_channels=3,
        num_stages=2,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        image_size=32,
        num_labels=10,
    )
    return ConvNextForImageClassification(config)


def _transformer(**kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: models.TransformerBlockNet(**kwargs)


# Floors on Spec.permutable_fraction (hidden channel axes a group moves, weighted by tensor size):
# - MLP, CNNs, U-Net, DenseNet, MobileNet, GPT-2/BERT/ViT: every hidden unit, residual streams,
#   MLP units, whole heads and head dims are permutable -> 1.0.
# - torch.nn.MultiheadAttention packs q/k/v in one tensor and picks them out with `select`, so
#   the (q, k, v) axis of in_proj is frozen by construction -> 0.85.
# - LLaMA: RoPE multiplies q/k head dims by position-dependent cos/sin, so only whole (KV) heads
#   move on q/k; v/o head dims, the residual stream and MLP units all move -> 0.85.
ZOO: list[ZooModel] = [
    ZooModel(
        "mlp",
        _seeded(lambda: models.MLP(hidden=(32, 32, 32))),
        _images(1, 28),
        min_permutable_fraction=1.0,
        hf=False,
    ),
    ZooModel(
        "vgg",
        _seeded(lambda: models.VGG(widths=(8, 8, 16, 16))),
        _images(1, 28),
        min_permutable_fraction=1.0,
        hf=False,
    ),
    ZooModel(
        "vgg_nonorm",
        _seeded(lambda: models.VGG(widths=(8, 8, 16, 16), norm="none")),
        _images(1, 28),
        min_permutable_fraction=1.0,
        hf=False,
    ),
    ZooModel(
        "resnet20",
        _seeded(lambda: models.ResNet20(width=1)),
        _images(1, 28),
        min_permutable_fraction=1.0,
        hf=False,
    ),
    ZooModel(
        "resnet20_ln",
        _seeded(lambda: models.ResNet20(width=1, norm="ln")),
        _images(1, 28),
        min_permutable_fraction=1.0,
        hf=False,
    ),
    ZooModel(
        "densenet",
        _seeded(lambda: models.DenseBlockNet(stem=8, growth=4)),
        _images(1, 28),
        min_permutable_fraction=1.0,
        hf=False,
    ),
    ZooModel(
        "mobilenet",
        _seeded(lambda: models.MobileNetBlockNet(width=8)),
        _images(1, 28),
        min_permutable_fraction=1.0,
        hf=False,
    ),
    ZooModel(
        "unet",
        _seeded(lambda: models.UNet(base=8)),
        _images(1, 32),
        min_permutable_fraction=1.0,
        hf=False,
    ),
    ZooModel(
        "transformer_torch",
        _seeded(_transformer()),
        _tokens(),
        min_permutable_fraction=0.85,
        hf=False,
    ),
    ZooModel(
        "transformer_manual_ln",
        _seeded(_transformer(attention="manual", norm="ln")),
        _tokens(),
        min_permutable_fraction=1.0,
        hf=False,
    ),
    ZooModel(
        "transformer_manual_rms",
        _seeded(_transformer(attention="manual", norm="rms")),
        _tokens(),
        min_permutable_fraction=1.0,
        hf=False,
    ),
    ZooModel(
        "transformer_tied",
        _seeded(_transformer(tie_embeddings=True)),
        _tokens(),
        min_permutable_fraction=0.85,
        hf=False,
    ),
    ZooModel(
        "hf_gpt2",
        _seeded(_gpt2),
        _tokens(),
        min_permutable_fraction=1.0,
        hf=True,
        input_kwargs={"use_cache": False},
    ),
    ZooModel(
        "hf_llama",
        _seeded(_llama(tie=False)),
        _tokens(),
        min_permutable_fraction=0.85,
        hf=True,
        input_kwargs={"use_cache": False},
    ),
    ZooModel(
        "hf_llama_tied",
        _seeded(_llama(tie=True)),
        _tokens(),
        min_permutable_fraction=0.85,
        hf=True,
        input_kwargs={"use_cache": False},
    ),
    ZooModel(
        "hf_bert", _seeded(_bert), _tokens(), min_permutable_fraction=1.0, hf=True
    ),
    ZooModel(
        "hf_vit", _seeded(_vit), _images(3, 16), min_permutable_fraction=1.0, hf=True
    ),
    ZooModel(
        "hf_resnet_basic",
        _seeded(_hf_resnet("basic")),
        _images(3, 32),
        min_permutable_fraction=1.0,
        hf=True,
    ),
    ZooModel(
        "hf_resnet_bottleneck",
        _seeded(_hf_resnet("bottleneck")),
        _images(3, 32),
        min_permutable_fraction=1.0,
        hf=True,
    ),
    ZooModel(
        "hf_convnext",
        _seeded(_convnext),
        _images(3, 32),
        min_permutable_fraction=1.0,
        hf=True,
    ),
]

ZOO_BY_NAME: dict[str, ZooModel] = {entry.name: entry for entry in ZOO}
