"""Tiny random-init Hugging Face checkpoints written by the tests themselves (no downloads)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")

KINDS = ("llama", "llama_tied", "gpt2", "vit")


def build(kind: str, seed: int, **config) -> torch.nn.Module:
    """A tiny model of ``kind`` with weights drawn from ``seed`` (norm weights and biases randomised too,
    so every group's units are distinguishable); ``config`` overrides LLaMA config fields."""
    if kind.startswith("llama"):
        cfg = transformers.LlamaConfig(**{
            "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "tie_word_embeddings": kind == "llama_tied", **config,
        })  # fmt: skip
        cls = transformers.LlamaForCausalLM
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        cls = transformers.GPT2LMHeadModel
    elif kind == "vit":
        cfg = transformers.ViTConfig(
            image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, num_labels=5,
        )  # fmt: skip
        cls = transformers.ViTForImageClassification
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def example(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if kind == "vit":
        return torch.randn(2, 3, 16, 16, generator=gen)
    return torch.randint(0, 64, (2, 10), generator=gen)


def write(kind: str, seed: int, path: Path, dtype: torch.dtype = torch.float32, shard: str | None = None, **config) -> Path:
    model = build(kind, seed, **config).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@functools.cache
def spec_of(kind: str, b_dir: str):
    """The checkpoint-key spec of ``kind`` (traced once per session)."""
    from permerge.graph import trace
    from permerge.hf import checkpoint_spec, hf_architecture
    from permerge.io.read import open_checkpoint

    arch = hf_architecture(b_dir)
    with open_checkpoint(b_dir) as src:
        return checkpoint_spec(trace(arch.model, arch.inputs, example_kwargs=arch.kwargs), arch.model, src.keys())
