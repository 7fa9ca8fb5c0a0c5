"""A minimal stand-in for ``torchvision``, put on ``sys.path`` by ``tests/conftest.py`` only when the
real package is absent.

timm imports torchvision for ``FrozenBatchNorm2d`` and, at import time, for names of its data
pipeline (transform classes it subclasses, ``InterpolationMode``, dataset classes). The tests
build timm models with random weights and never run that pipeline, so only ``FrozenBatchNorm2d``
is implemented (as torchvision defines it); every other name exists so the imports succeed and
raises if it is ever used.
"""

__version__ = "0.0+permerge.tests.stand-in"
