"""Smoke tests for the example models and the test zoo."""

from __future__ import annotations

import pytest
import torch
from zoo import ZOO, ZooModel

from permerge.models import EXAMPLES, TransformerBlockNet, example_input

EXPECTED_SHAPES = {
    "mlp": (2, 10),
    "vgg": (2, 10),
    "resnet20": (2, 10),
    "densenet": (2, 10),
    "mobilenet": (2, 10),
    "unet": (2, 2, 32, 32),
    "transformer": (2, 8, 64),
}


def _main_output(out: object) -> torch.Tensor:
    """The model's primary tensor: itself, or the first field of an HF ModelOutput."""
    return out if isinstance(out, torch.Tensor) else out[0]  # type: ignore[index]


def test_every_example_has_a_documented_shape() -> None:
    assert set(EXAMPLES) == set(EXPECTED_SHAPES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_forward_shape_and_finite(name: str) -> None:
    torch.manual_seed(0)
    model = EXAMPLES[name]().eval()
    with torch.no_grad():
        out = model(*example_input(name))
    assert out.shape == EXPECTED_SHAPES[name]
    assert torch.isfinite(out).all()


def test_example_input_rejects_unknown_name() -> None:
    with pytest.raises(KeyError):
        example_input("nope")


def test_tied_embeddings_share_one_parameter() -> None:
    model = TransformerBlockNet(tie_embeddings=True)
    assert model.head.weight is model.embed.weight
    untied = TransformerBlockNet()
    assert untied.head.weight is not untied.embed.weight


def test_zoo_names_are_unique() -> None:
    assert len({entry.name for entry in ZOO}) == len(ZOO)


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_zoo_forward_is_deterministic(entry: ZooModel) -> None:
    first, second = entry.build(), entry.build()
    assert not first.training
    with torch.no_grad():
        a = _main_output(first(*entry.inputs(), **entry.input_kwargs))
        b = _main_output(second(*entry.inputs(), **entry.input_kwargs))
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
