"""Placeholders for torchvision names timm imports but the tests never use."""

from __future__ import annotations

from typing import Any


class Unavailable:
    """Importable, subclassable, and raises on use: the stand-in provides no data pipeline."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} is not provided by the tests' torchvision stand-in; install torchvision"
        )


def unavailable(name: str) -> type:
    return type(name, (Unavailable,), {})
