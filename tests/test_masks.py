"""Sparsity projections: the DSF strict selection rule and the exact top-k masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparsefact.masks import (
    DENSITY_FLOOR,
    global_topk_mask,
    n_m_mask,
    row_topk_mask,
    strict_kept_count,
    strict_threshold_index,
)


def _reference_index(budget: float, numel: int, floor: float = 0.01) -> int:
    """The official code's rule, written out: q = min(1 - floor, 1 - budget/numel)."""
    q = 1.0 - budget / numel
    if floor > 0:
        q = min(1.0 - floor, q)
    return min(max(math.floor(q * numel), 0), numel - 1)


@given(numel=st.integers(1, 5000), fraction=st.floats(0.0, 1.0))
def test_strict_rule_keeps_budget_or_budget_minus_one(numel, fraction):
    budget = math.floor(fraction * numel)
    index = strict_threshold_index(budget, numel)
    assert index == _reference_index(budget, numel)
    assert 0 <= index <= numel - 1
    kept = strict_kept_count(budget, numel)
    assert kept == numel - index - 1
    if budget >= DENSITY_FLOOR * numel:
        assert kept in (budget, budget - 1)
    else:  # the 1% floor: never fewer than ~1% of the entries
        assert kept >= math.ceil(DENSITY_FLOOR * numel) - 1
        assert kept <= math.ceil(DENSITY_FLOOR * numel)


@given(numel=st.integers(1, 5000), budget=st.floats(0.0, 5000.0))
def test_strict_rule_without_floor(numel, budget):
    index = strict_threshold_index(budget, numel, floor=0.0)
    assert index == _reference_index(budget, numel, floor=0.0)
    assert strict_kept_count(budget, numel, floor=0.0) <= max(math.ceil(budget), 0)


@given(
    values=arrays(np.float64, st.integers(1, 300), elements=st.floats(-1e6, 1e6)), fraction=st.floats(0, 1)
)
def test_strict_rule_on_data_keeps_the_predicted_count(values, fraction):
    """Keeping ``|x| > sort(|x|)[index]`` keeps strict_kept_count entries when no |x| ties."""
    numel = values.size
    budget = math.floor(fraction * numel)
    threshold = np.sort(np.abs(values))[strict_threshold_index(budget, numel)]
    kept = int(np.count_nonzero(np.abs(values) > threshold))
    if np.unique(np.abs(values)).size == numel:
        assert kept == strict_kept_count(budget, numel)
    else:  # ties at the threshold can only lower the count (an upper bound)
        assert kept <= strict_kept_count(budget, numel)


def test_strict_rule_examples():
    # 64x64 square factor with split 0.16: budget floor(655.36) = 655.
    assert strict_kept_count(655, 4096) in (654, 655)
    # Budget 0 still keeps 1% (minus one): floor(0.99 * 4096) = 4055 -> 40 kept.
    assert strict_threshold_index(0, 4096) == 4055
    assert strict_kept_count(0, 4096) == 40
    # Full budget: the threshold is the smallest entry, which is dropped.
    assert strict_kept_count(100, 100) == 99


SCORES = arrays(
    np.float64,
    st.tuples(st.integers(1, 20), st.integers(1, 20)),
    elements=st.one_of(st.floats(-100, 100), st.integers(-3, 3).map(float)),  # with ties
)


@given(scores=SCORES, k=st.integers(-2, 450))
def test_global_topk_mask_keeps_exactly_k_largest(scores, k):
    mask = global_topk_mask(scores, k)
    assert mask.shape == scores.shape and mask.dtype == bool
    assert mask.sum() == min(max(k, 0), scores.size)
    if mask.any() and not mask.all():
        assert scores[mask].min() >= scores[~mask].max()


@given(scores=SCORES, k=st.integers(-2, 25))
def test_row_topk_mask_keeps_exactly_k_per_row(scores, k):
    mask = row_topk_mask(scores, k)
    expected = min(max(k, 0), scores.shape[1])
    assert (mask.sum(axis=1) == expected).all()
    for row, row_mask in zip(scores, mask, strict=True):
        if row_mask.any() and not row_mask.all():
            assert row[row_mask].min() >= row[~row_mask].max()


@given(
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 4), (2, 8)]),
    rows=st.integers(1, 10),
    groups=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_n_m_mask_keeps_n_per_group_of_m(nm, rows, groups, seed):
    n, m = nm
    scores = np.random.default_rng(seed).integers(-5, 5, size=(rows, groups * m)).astype(float)
    mask = n_m_mask(scores, n, m)
    grouped_mask = mask.reshape(rows, groups, m)
    grouped = scores.reshape(rows, groups, m)
    assert (grouped_mask.sum(axis=2) == n).all()
    for g_scores, g_mask in zip(grouped.reshape(-1, m), grouped_mask.reshape(-1, m), strict=True):
        if not g_mask.all():
            assert g_scores[g_mask].min() >= g_scores[~g_mask].max()


@pytest.mark.parametrize(
    ("n", "m", "cols", "match"),
    [
        (0, 4, 8, "0 < N <= M"),
        (5, 4, 8, "0 < N <= M"),
        (2, 4, 6, "multiple of M=4"),
    ],
)
def test_n_m_mask_errors(n, m, cols, match):
    with pytest.raises(ValueError, match=match):
        n_m_mask(np.ones((2, cols)), n, m)
