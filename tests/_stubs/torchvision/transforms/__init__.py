"""Transform classes timm subclasses or names at import time; none is usable (see ``_unavailable``)."""

from torchvision._unavailable import unavailable
from torchvision.transforms import functional as functional
from torchvision.transforms.functional import InterpolationMode as InterpolationMode

ToTensor = unavailable("ToTensor")
