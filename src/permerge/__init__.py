"""permerge: align and merge neural networks modulo permutation symmetries."""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # Small ops on a busy machine: spinning OpenMP workers run many times slower (measured 10x on
    # 2 cores). Only takes effect when permerge is what first loads torch (the CLI); a user's
    # explicit setting always wins.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version

try:
    __version__ = _version("permerge")
except _NotInstalled:  # a source tree on sys.path, not installed
    __version__ = "unknown"

from permerge import merge  # the subpackage, callable as merge(models, weights)
from permerge.align import AlignResult, align
from permerge.align_hf import align_hf
from permerge.apply import apply_permutation, apply_transform
from permerge.check import check_function_preserved, validate_spec
from permerge.errors import FunctionNotPreservedError, PermergeError, SpecError, TraceError
from permerge.evaluate import Curve, interpolation_curve
from permerge.graph import Example, Traced, register_rule, trace, trace_graph
from permerge.match import activation_matching, ste_matching, weight_matching
from permerge.match.stream import stream_weight_matching
from permerge.match.symmetry import transform_activation_matching, transform_weight_matching
from permerge.merge import interpolate
from permerge.merge.many import c2m3_merge, merge_many
from permerge.merge.partial import partial_merge
from permerge.merge.pleas import pleas
from permerge.merge.zipit import zipit
from permerge.permutation import Permutation, identity, inverse, random_permutation
from permerge.plot import plot_curves
from permerge.repair import repair, repair_merge, repair_transform, reset_bn_stats
from permerge.spec import Axis, Frozen, FrozenKind, Group, PermutationSpec
from permerge.transform import LinearMap, ScaledPermutation, Transform, random_transform

__all__ = [
    "AlignResult",
    "Curve",
    "interpolation_curve",
    "plot_curves",
    "repair",
    "repair_merge",
    "repair_transform",
    "reset_bn_stats",
    "activation_matching",
    "align",
    "align_hf",
    "interpolate",
    "merge",
    "merge_many",
    "c2m3_merge",
    "partial_merge",
    "pleas",
    "zipit",
    "ste_matching",
    "stream_weight_matching",
    "weight_matching",
    "Axis",
    "Example",
    "Frozen",
    "FrozenKind",
    "FunctionNotPreservedError",
    "Group",
    "PermergeError",
    "Permutation",
    "PermutationSpec",
    "SpecError",
    "TraceError",
    "apply_permutation",
    "apply_transform",
    "LinearMap",
    "ScaledPermutation",
    "Transform",
    "random_transform",
    "transform_activation_matching",
    "transform_weight_matching",
    "check_function_preserved",
    "identity",
    "inverse",
    "random_permutation",
    "register_rule",
    "trace",
    "trace_graph",
    "Traced",
    "validate_spec",
]
