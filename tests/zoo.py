"""The test zoo: small randomly initialised models with example inputs.

Each entry builds a fresh, deterministically seeded model in eval mode. Hugging
Face models come from tiny configs (random weights, nothing is downloaded); timm
models are the cross-section in ``timm_zoo.py``. Entries are small enough that a
forward pass takes milliseconds on CPU; the ones that are slow to trace or match
(``slow=True``) run in CI's slow step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm_zoo
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
    slow: bool = False


@torch.no_grad()
def randomized(model: nn.Module, seed: int) -> nn.Module:
    """A deep copy whose constant state tensors are redrawn, so a forgotten buffer shows.

    Freshly initialised norms hold constants (BN/FrozenBN running mean 0 and variance 1, affine
    weight 1 and bias 0; zero biases, layer scales): a permutation that forgets one of them still
    preserves the function. Every floating tensor that holds one value is perturbed: positive ones
    multiplied by ``exp(N(0, 0.2))`` (they stay positive), others shifted by ``N(0, 0.1)``.
    """
    copied = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for t in copied.state_dict().values():
        if not t.is_floating_point() or t.numel() == 0 or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if not torch.equal(t, t.reshape(-1)[:1].expand_as(t.reshape(-1)).reshape(t.shape)):
            continue
        noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        if t.reshape(-1)[0] > 0:
            t.mul_(torch.exp(0.2 * noise))
        else:
            t.add_(0.1 * noise)
    return copied


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


def _features(channels: int, length: int) -> Callable[[], tuple[torch.Tensor]]:
    def inputs() -> tuple[torch.Tensor]:
        gen = torch.Generator().manual_seed(SEED)
        return (torch.randn(2, channels, length, generator=gen),)

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


_TINY_LM = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=32, attn_implementation="sdpa",
)  # fmt: skip


def _causal_lm(family: str, **extra: Any) -> Callable[[], nn.Module]:
    """A tiny ``<family>ForCausalLM`` (Mistral, Qwen2, Phi, Gemma: GQA, RoPE, partial RoPE, GeGLU)."""

    def factory() -> nn.Module:
        import transformers

        config = getattr(transformers, f"{family}Config")(**_TINY_LM, **extra)
        return getattr(transformers, f"{family}ForCausalLM")(config)

    return factory


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def _whisper_encoder() -> nn.Module:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=4,
        decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=0,
        eos_token_id=0, decoder_start_token_id=0, attn_implementation="sdpa",
    )  # fmt: skip
    return WhisperEncoder(config)


def _clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    block = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, **block),
        vision_config=dict(image_size=16, patch_size=4, **block),
        projection_dim=16, attn_implementation="sdpa",
    )  # fmt: skip
    return CLIPModel(config)


def _hf_swin() -> nn.Module:
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=10)
    return SwinForImageClassification(config)


def _segformer() -> nn.Module:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        num_attention_heads=[1, 2], decoder_hidden_size=32, num_labels=5, patch_sizes=[7, 3],
        strides=[4, 2], mlp_ratios=[2, 2],
    )  # fmt: skip
    return SegformerForSemanticSegmentation(config)


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

# Hugging Face families the models above lack. RoPE fixes q/k head dims (rotation pairs with
# position-dependent frequencies): 0.84-0.88 of the hidden axes stay permutable, as for LLaMA.
_NO_CACHE = {"use_cache": False}
ZOO += [
    ZooModel("hf_mistral", _seeded(_causal_lm("Mistral", num_key_value_heads=2, sliding_window=4)), _tokens(), 0.88, True, _NO_CACHE),
    ZooModel("hf_qwen2", _seeded(_causal_lm("Qwen2", num_key_value_heads=2)), _tokens(), 0.88, True, _NO_CACHE),
    ZooModel("hf_phi", _seeded(_causal_lm("Phi", partial_rotary_factor=0.5)), _tokens(), 0.84, True, _NO_CACHE),
    ZooModel("hf_gemma", _seeded(_causal_lm("Gemma", num_key_value_heads=1, head_dim=8)), _tokens(), 0.88, True, _NO_CACHE),
    ZooModel(
        "hf_t5", _seeded(_t5), _tokens(), 1.0, True,
        {"decoder_input_ids": torch.zeros(2, 4, dtype=torch.long), "use_cache": False},
    ),
    ZooModel("hf_whisper_encoder", _seeded(_whisper_encoder), _features(8, 32), 1.0, True),
    ZooModel("hf_clip", _seeded(_clip), _tokens(), 1.0, True, {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}),
    ZooModel("hf_swin", _seeded(_hf_swin), _images(3, 32), 1.0, True),
    ZooModel("hf_segformer", _seeded(_segformer), _images(3, 32), 1.0, True),
]  # fmt: skip


def _timm(name: str) -> ZooModel:
    floor = timm_zoo.FLOORS.get(name, (1.0, ""))[0]
    return ZooModel(
        f"timm/{name}", _seeded(lambda: timm_zoo.build(name)), lambda: timm_zoo.example(name, SEED), floor,
        hf=False, slow=name in timm_zoo.SLOW,
    )  # fmt: skip


ZOO += [_timm(name) for name in timm_zoo.TIMM]

ZOO_BY_NAME: dict[str, ZooModel] = {entry.name: entry for entry in ZOO}


def two_seeds(name: str) -> tuple[nn.Module, nn.Module, tuple[Any, ...], dict[str, Any]]:
    """Entry ``name`` built from seeds 0 and 1 (A and B of a pair), its inputs and keyword inputs."""
    global SEED
    z = ZOO_BY_NAME[name]
    SEED = 1
    try:
        b = z.build()
    finally:
        SEED = 0
    return z.build(), b, z.inputs(), z.input_kwargs
