"""Union-find with sum/product refinement: the algebra the tracer relies on."""

from __future__ import annotations

import pytest

from permerge.graph.spaces import PROD, SUM, Spaces


def test_union_ties_and_freezing_spreads():
    sp = Spaces()
    a, b, c = sp.new(4), sp.new(4), sp.new(4, "input")
    sp.union(a, b)
    assert sp.find(a) == sp.find(b) == min(a, b)
    assert not sp.is_frozen(a)
    sp.union(b, c)
    assert sp.is_frozen(a)
    with pytest.raises(ValueError, match="sizes 4 and 3"):
        sp.union(a, sp.new(3))


def test_refine_then_union_propagates_structure():
    sp = Spaces()
    s, t = sp.new(12), sp.new(12)
    heads, dim = sp.refine(s, PROD, (3, 4))
    sp.union(s, t)
    assert sp.refine(t, PROD, (3, 4)) == (heads, dim)  # t now has s's parts


def test_common_refinement_of_products():
    sp = Spaces()
    s = sp.new(64)
    sp.refine(s, PROD, (2, 32))
    x, y = sp.refine(s, PROD, (8, 8))  # (2·4) ⊗ 8: both views kept, nothing frozen
    assert not sp.is_frozen(s)
    assert sp.size[sp.find(x)] == 8 and sp.structure(x)[0] == PROD


def test_incompatible_products_freeze():
    sp = Spaces()
    s = sp.new(6)
    sp.refine(s, PROD, (2, 3))
    sp.refine(s, PROD, (3, 2))
    assert sp.is_frozen(s)


def test_sum_refinements_merge_cut_points():
    sp = Spaces()
    s = sp.new(10)
    a, b = sp.refine(s, SUM, (4, 6))
    parts = sp.refine(s, SUM, (7, 3))
    assert [sp.size[sp.find(p)] for p in parts] == [7, 3]
    assert sp.structure(b) is not None  # b was split at 7


def test_freezing_a_refined_space_freezes_parts_and_later_refinements():
    sp = Spaces()
    s = sp.new(8, "model input")
    parts = sp.refine(s, PROD, (2, 4))
    assert all(sp.is_frozen(p) for p in parts)


def test_a_factor_of_one_splits_nothing():
    sp = Spaces()
    s = sp.new(6)
    parts = sp.refine(s, PROD, (6, 1))  # a depthwise conv's (channels, 1) split
    assert sp.find(parts[0]) == sp.find(s) and sp.size[sp.find(parts[1])] == 1
    assert sp.structure(s) is None
    a, b = sp.refine(s, SUM, (2, 4))  # so a later concatenation split still holds
    assert not sp.is_frozen(a) and not sp.is_frozen(b)


def test_summands_meet_a_product_over_whole_inner_blocks():
    """cat(q_bias, k_bias, v_bias) viewed as 3 ⊗ heads ⊗ head_dim: the outer factor cannot move,
    heads and head_dim are shared by the three summands."""
    sp = Spaces()
    s = sp.new(24)
    q, k, v = sp.refine(s, SUM, (8, 8, 8))
    outer, heads, dim = sp.refine(s, PROD, (3, 2, 4))
    assert not sp.is_frozen(s)
    assert [sp.size[sp.find(p)] for p in sp.structure(outer)[1]] == [1, 1, 1]
    for part in (q, k, v):
        assert [sp.find(p) for p in sp.structure(part)[1]] == [sp.find(heads), sp.find(dim)]


def test_unequal_summands_meet_a_product_blockwise():
    """Parts of 4 and 8 viewed as 3 groups ⊗ 4: groups 1 + 2 split by the summands, 4 shared."""
    sp = Spaces()
    s = sp.new(12)
    a, b = sp.refine(s, SUM, (4, 8))
    groups, within = sp.refine(s, PROD, (3, 4))
    assert [sp.size[sp.find(p)] for p in sp.structure(groups)[1]] == [1, 2]
    assert sp.find(sp.structure(b)[1][1]) == sp.find(within) and sp.find(a) == sp.find(within)


def test_summands_and_product_without_common_blocks_freeze():
    sp = Spaces()
    s = sp.new(8)
    sp.refine(s, SUM, (5, 3))
    sp.refine(s, PROD, (2, 4))
    assert sp.is_frozen(s)
    assert sp.reason(s).kind.value == "conflict"


def test_union_of_a_sum_and_a_product_reconciles_them():
    sp = Spaces()
    s, t = sp.new(6), sp.new(6)
    sp.refine(s, SUM, (3, 3))
    outer, inner = sp.refine(t, PROD, (2, 3))
    sp.union(s, t)
    assert not sp.is_frozen(s)
    assert [sp.size[sp.find(p)] for p in sp.structure(outer)[1]] == [1, 1]
