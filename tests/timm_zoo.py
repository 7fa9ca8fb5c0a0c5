"""A cross-section of timm architectures, built small with random weights (nothing is downloaded).

Each entry is ``(timm name, constructor overrides, input size)``: the smallest variant of each
family, with depths and widths cut where the family's constructor takes them, so a forward pass
takes milliseconds. timm is installed without its dependencies (``pip install --no-deps timm``);
where torchvision is absent, ``tests/_stubs/torchvision`` stands in for the names timm imports.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

ONE = (1, 1, 1, 1)
NARROW = (16, 32, 64, 128)
VIT = {"img_size": 64, "depth": 2}
BATCH = 4  # train-mode BatchNorm over 2 samples of a 1x1 map is float32 noise; 4 make it well posed
SWIN = {"img_size": 64, "window_size": 4, "depths": ONE, "embed_dim": 32, "num_heads": (1, 2, 4, 8)}

# name → (constructor overrides, input size)
TIMM: dict[str, tuple[dict[str, Any], int]] = {
    # ResNet / ResNeXt and relatives
    "test_resnet": ({}, 64),
    "resnet18": ({"layers": ONE, "channels": NARROW, "stem_width": 16}, 64),
    "resnet50d": ({"layers": ONE, "channels": NARROW, "stem_width": 16}, 64),
    "resnext50_32x4d": ({"layers": ONE, "channels": (32, 64, 128, 256), "cardinality": 8, "base_width": 4}, 64),
    "seresnext26d_32x4d": ({"layers": ONE, "channels": (32, 64, 128, 256), "cardinality": 8, "base_width": 4}, 64),
    "skresnet18": ({"layers": ONE, "channels": NARROW}, 64),
    "resnest14d": ({"layers": ONE, "channels": NARROW, "stem_width": 16}, 64),
    "res2net50_14w_8s": ({"layers": ONE, "channels": (32, 64, 128, 256)}, 64),
    "resnetblur18": ({"layers": ONE, "channels": NARROW}, 64),
    "resnetv2_50x1_bit": ({}, 64),
    "test_nfnet": ({}, 64),
    "nf_regnet_b0": ({}, 64),
    "regnetx_002": ({}, 64),
    "regnety_002": ({}, 64),
    "test_byobnet": ({}, 64),
    "repvgg_a0": ({}, 64),
    "mobileone_s0": ({}, 96),
    "gernet_s": ({}, 64),
    "eca_resnet33ts": ({}, 64),
    "lambda_resnet26t": ({}, 64),
    "botnet26t_256": ({"img_size": 64}, 64),
    "dpn48b": ({}, 64),
    # EfficientNet / MobileNet / GhostNet / LCNet families
    "test_efficientnet": ({}, 64),
    "test_efficientnet_gn": ({}, 64),
    "test_efficientnet_ln": ({}, 64),
    "test_efficientnet_evos": ({}, 64),
    "efficientnet_lite0": ({}, 64),
    "tf_efficientnetv2_b0": ({}, 64),
    "mixnet_s": ({}, 64),
    "tinynet_e": ({}, 64),
    "mobilenetv2_050": ({}, 64),
    "mobilenetv3_small_050": ({}, 64),
    "mobilenetv4_conv_small": ({}, 128),
    "mnasnet_small": ({}, 64),
    "lcnet_050": ({}, 64),
    "ghostnet_050": ({}, 64),
    "repghostnet_050": ({}, 64),
    "rexnet_100": ({}, 64),
    "hgnetv2_b0": ({}, 64),
    # DenseNet, DLA, Inception, Xception, CSPNet, VGG, HRNet
    "densenet121": ({"growth_rate": 8, "block_config": (2, 2, 2, 2)}, 64),
    "dla34": ({"levels": (1, 1, 1, 1, 1, 1), "channels": (8, 16, 32, 64, 128, 256)}, 64),
    "inception_v3": ({}, 160),
    "xception41p": ({}, 64),
    "cs3darknet_s": ({}, 64),
    "cspresnet50": ({}, 64),
    "cspdarknet53": ({}, 64),
    "vgg11_bn": ({"mlp_ratio": 0.0625}, 64),
    "ese_vovnet19b_dw": ({}, 64),
    "hrnet_w18_small": ({}, 64),
    # ConvNeXt and MetaFormers
    "test_convnext": ({}, 64),
    "convnext_atto": ({"depths": ONE, "dims": NARROW}, 64),
    "convnextv2_atto": ({"depths": ONE, "dims": NARROW}, 64),
    "edgenext_xx_small": ({}, 64),
    "poolformer_s12": ({}, 64),
    "caformer_s18": ({}, 64),
    "convformer_s18": ({}, 64),
    "inception_next_tiny": ({"depths": ONE, "dims": NARROW}, 64),
    "test_mambaout": ({}, 64),
    "starnet_s050": ({}, 64),
    # hybrid and efficient vision transformers
    "mobilevit_xxs": ({}, 64),
    "mobilevitv2_050": ({}, 64),
    "efficientformer_l1": ({"depths": (1, 1, 1, 2)}, 224),
    "efficientformerv2_s0": ({"img_size": 64, "depths": ONE}, 64),
    "levit_128s": ({"img_size": 64, "embed_dim": (64, 96, 128), "depth": (1, 1, 1), "num_heads": (2, 3, 4)}, 64),
    "fastvit_t8": ({"layers": (1, 1, 1, 1)}, 64),
    "efficientvit_b0": ({}, 64),
    "efficientvit_m0": ({"img_size": 64}, 64),
    "tiny_vit_5m_224": ({}, 64),
    "pit_ti_224": ({"img_size": 64, "depth": (1, 1, 1)}, 64),
    "crossvit_tiny_240": ({"img_size": 96, "img_scale": (1.0, 1.0), "depth": ((1, 1, 0),)}, 96),
    "pvt_v2_b0": ({}, 64),
    "twins_svt_small": ({"img_size": 64, "depths": ONE}, 64),
    "coat_lite_tiny": ({"img_size": 64}, 64),
    "visformer_tiny": ({"img_size": 64}, 64),
    "convit_tiny": ({**VIT, "local_up_to_layer": 1}, 64),
    "volo_d1_224": ({"img_size": 64}, 64),
    "nest_tiny": ({"img_size": 64}, 64),
    # plain vision transformers
    "test_vit": ({}, 64),
    "test_vit_relpos": ({"img_size": 64}, 64),
    "vit_tiny_patch16_224": (VIT, 64),
    "deit_tiny_distilled_patch16_224": (VIT, 64),
    "eva02_tiny_patch14_224": ({"img_size": 56, "depth": 2}, 56),
    "beit_base_patch16_224": ({**VIT, "embed_dim": 64, "num_heads": 2}, 64),
    "cait_xxs24_224": (VIT, 64),
    "xcit_nano_12_p16_224": (VIT, 64),
    "vit_small_patch16_rope_224": ({**VIT, "embed_dim": 64, "num_heads": 2}, 64),
    # MLPs
    "mixer_s32_224": ({"img_size": 64}, 64),
    "resmlp_12_224": ({"img_size": 64}, 64),
    "gmlp_ti16_224": ({"img_size": 64}, 64),
    "sequencer2d_s": ({}, 64),
    # windowed / relative-position attention
    "swin_tiny_patch4_window7_224": (SWIN, 64),
    "swinv2_tiny_window8_256": (SWIN, 64),
    "swinv2_cr_tiny_ns_224": (SWIN, 64),
    "test_maxvit": ({"img_size": 64}, 64),
    "test_coatnet": ({"img_size": 64}, 64),
    "gcvit_xxtiny": ({"img_size": 64}, 64),
    "davit_tiny": ({"depths": ONE}, 64),
    "focalnet_tiny_srf": ({}, 64),
}


# Built at full width (their constructors take no smaller config) or slow to trace: the slow step.
SLOW = frozenset({
    "resnetv2_50x1_bit", "nf_regnet_b0", "repvgg_a0", "mobileone_s0", "gernet_s", "eca_resnet33ts",
    "lambda_resnet26t", "botnet26t_256", "dpn48b", "tf_efficientnetv2_b0", "mixnet_s", "ghostnet_050",
    "repghostnet_050", "rexnet_100", "hgnetv2_b0", "inception_v3", "xception41p", "cspresnet50",
    "cspdarknet53", "vgg11_bn", "ese_vovnet19b_dw", "hrnet_w18_small", "poolformer_s12", "caformer_s18",
    "convformer_s18", "efficientvit_m0", "tiny_vit_5m_224", "coat_lite_tiny", "visformer_tiny",
    "volo_d1_224", "nest_tiny", "mixer_s32_224", "resmlp_12_224", "gmlp_ti16_224", "sequencer2d_s",
    "gcvit_xxtiny", "davit_tiny", "focalnet_tiny_srf", "regnety_002",
})  # fmt: skip

# Where a model keeps less than all of its hidden units permutable, and why (floor, reason).
FLOORS: dict[str, tuple[float, str]] = {
    "eca_resnet33ts": (0.70, "ECA attention slides a 1-d conv over the channels of each gated block"),
    "eva02_tiny_patch14_224": (0.78, "RoPE fixes q/k head dims; the packed qkv shares them with v"),
    "vit_small_patch16_rope_224": (0.88, "RoPE fixes q/k head dims; the packed qkv shares them with v"),
    "convit_tiny": (0.99, "a fixed positional-feature buffer feeds the gating projection's inputs"),
    "test_vit_relpos": (0.99, "a fixed log-coordinate buffer feeds the relative-position MLP's inputs"),
    "swinv2_tiny_window8_256": (0.99, "a fixed coordinate buffer feeds the continuous position-bias MLP"),
    "swinv2_cr_tiny_ns_224": (0.99, "a fixed coordinate buffer feeds the continuous position-bias MLP"),
}


def _import_timm() -> Any:
    if importlib.util.find_spec("torchvision") is None:
        stubs = str(Path(__file__).parent / "_stubs")
        if stubs not in sys.path:
            sys.path.append(stubs)
    import timm

    return timm


def build(name: str) -> nn.Module:
    """The timm model ``name`` with random weights, 10 classes and this zoo's overrides."""
    return _import_timm().create_model(name, pretrained=False, num_classes=10, **TIMM[name][0])


def example(name: str, seed: int = 0) -> tuple[torch.Tensor]:
    size = TIMM[name][1]
    return (torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed)),)
