"""Exception types: one base class so callers can catch everything permerge raises."""


class PermergeError(Exception):
    """Base class of every error permerge raises on bad input."""


class SpecError(PermergeError, ValueError):
    """A permutation spec is malformed or does not match the model/state dict."""


class TraceError(PermergeError):
    """The model could not be traced (names the op or module and suggests a spec override)."""


class FunctionNotPreservedError(PermergeError):
    """Applying a permutation changed the model's outputs (names the offending groups)."""


class StateDictMismatchError(PermergeError, ValueError):
    """Two state dicts (or a state dict and a spec) disagree on keys, shapes or values."""


class ConfigMismatchError(StateDictMismatchError):
    """Two checkpoints' configs differ in a field that defines the architecture (names the field)."""


class PermergeIOError(PermergeError, OSError):
    """A checkpoint or output path cannot be read or written (names the path and the fix)."""


class IllConditionedError(PermergeError):
    """A least-squares map (invertible symmetry) is too ill-conditioned to apply (names the group and the fix)."""
