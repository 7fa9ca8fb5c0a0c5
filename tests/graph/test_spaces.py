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
