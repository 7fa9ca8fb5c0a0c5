"""permerge: align and merge neural networks modulo permutation symmetries."""

from permerge.apply import apply_permutation
from permerge.check import check_function_preserved, validate_spec
from permerge.errors import FunctionNotPreservedError, PermergeError, SpecError, TraceError
from permerge.graph import register_rule, trace
from permerge.permutation import Permutation, identity, inverse, random_permutation
from permerge.spec import Axis, Frozen, Group, PermutationSpec

__all__ = [
    "Axis",
    "Frozen",
    "FunctionNotPreservedError",
    "Group",
    "PermergeError",
    "Permutation",
    "PermutationSpec",
    "SpecError",
    "TraceError",
    "apply_permutation",
    "check_function_preserved",
    "identity",
    "inverse",
    "random_permutation",
    "register_rule",
    "trace",
    "validate_spec",
]
