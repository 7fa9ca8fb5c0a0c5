"""Shared fixtures: the zoo on sys.path and a per-session cache of traced zoo models."""

from __future__ import annotations

import functools
import os
import pathlib
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spin-waiting workers

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import pytest  # noqa: E402
from zoo import ZOO_BY_NAME  # noqa: E402

import permerge  # noqa: E402


@functools.cache
def traced(name: str):
    """(model, inputs, kwargs, spec) for a zoo entry, traced once per session."""
    z = ZOO_BY_NAME[name]
    model, inputs = z.build(), z.inputs()
    spec = permerge.trace(model, inputs, example_kwargs=z.input_kwargs)
    return model, inputs, z.input_kwargs, spec


@pytest.fixture(scope="session")
def zoo_traced():
    return traced
