"""Resolve a model reference from the command line: built-in example, factory, or HF config dir."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import torch

from permerge import models
from permerge.errors import PermergeError
from permerge.hf import hf_architecture
from permerge.models import ModelRef

__all__ = ["add_model_arguments", "load_model"]


def add_model_arguments(p: argparse.ArgumentParser, *, positional: bool = True) -> None:
    if positional:
        p.add_argument(
            "model",
            help=f"built-in example ({', '.join(models.EXAMPLES)}), 'package.module:factory', "
            "or a Hugging Face model directory with config.json",
        )
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for the factory")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,32,32 (factories without example_inputs)")
    p.add_argument("--input-dtype", choices=("float", "long"), default="float", help="example input dtype")
    p.add_argument("--vocab", type=int, default=2, help="token ids are drawn below this (--input-dtype long)")


def load_model(ref: str, args: argparse.Namespace, *, meta: bool = False) -> ModelRef:
    """Build the model ``ref`` names. ``meta=True`` builds HF models without allocating weights."""
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        raise PermergeError(f"--model-kwargs is not valid JSON: {e}") from e
    if not isinstance(kwargs, dict):
        raise PermergeError("--model-kwargs must be a JSON object")
    if ref in models.EXAMPLES:
        return ModelRef(models.EXAMPLES[ref](**kwargs).eval(), models.example_input(ref), {}, f"example {ref}")
    if Path(ref, "config.json").is_file():
        return hf_architecture(Path(ref), meta=meta)
    if ":" not in ref:
        raise PermergeError(
            f"cannot resolve model {ref!r}: not a built-in example ({', '.join(models.EXAMPLES)}), "
            "not 'package.module:factory', and not a directory with config.json"
        )
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise PermergeError(f"cannot import {ref!r}: {e}") from e
    model = factory(**kwargs).eval()
    return ModelRef(model, _inputs(module, args), {}, ref)


def _inputs(module: Any, args: argparse.Namespace) -> tuple[Any, ...]:
    if args.input_shape:
        try:
            shape = tuple(int(x) for x in args.input_shape.split(","))
        except ValueError as e:
            raise PermergeError(f"--input-shape must be comma-separated integers, got {args.input_shape!r}") from e
        gen = torch.Generator().manual_seed(0)
        if args.input_dtype == "long":
            return (torch.randint(0, args.vocab, shape, generator=gen),)
        return (torch.randn(shape, generator=gen),)
    if hasattr(module, "example_inputs"):
        x = module.example_inputs()
        return x if isinstance(x, tuple) else (x,)
    raise PermergeError(
        f"no example input for {module.__name__}: pass --input-shape (and --input-dtype long for token ids) "
        "or define example_inputs() in the module"
    )
