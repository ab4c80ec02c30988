"""Tests of the single-sparse baselines (sparsefact/pruning.py) and the compressor contract.

The contract tests at the end (hypothesis invariants, bad inputs, density=1,
scikit-learn citizenship) are parametrised over every compressor of pruning.py and
lowrank.py; LowRank's own tests are in tests/test_lowrank.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from _data import gaussian
from hypothesis import given
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from sparsefact import Calibration, MagnitudePruning
from sparsefact._validation import to_numpy
from sparsefact.lowrank import LowRank
from sparsefact.masks import global_topk_mask, n_m_mask
from sparsefact.metrics import relative_error
from sparsefact.pruning import (
    ADMMPruning,
    SparseGPT,
    Wanda,
    kept_budget,
    sparsegpt_prune,
    upper_cholesky_of_inverse,
)

COMPRESSORS = [Wanda, SparseGPT, ADMMPruning, LowRank]
SPARSE_COMPRESSORS = [Wanda, SparseGPT, ADMMPruning]


def correlated_layer(m: int = 64, n: int = 128, n_tokens: int = 512, seed: int = 0):
    """A layer ``W`` with correlated inputs ``X = Z @ mixing`` (a dense mixing matrix)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    mixing = np.eye(n) + rng.standard_normal((n, n)) / np.sqrt(n)
    X = rng.standard_normal((n_tokens, n)) @ mixing
    return W, X


def lognormal_scaled_layer(m: int = 32, n: int = 48, n_tokens: int = 200, seed: int = 0):
    """A layer whose input features have log-normally distributed scales."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    X = rng.standard_normal((n_tokens, n)) * np.exp(1.5 * rng.standard_normal(n))
    return W, X


def assert_n_m_pattern(dense: np.ndarray, n_keep: int, group: int) -> None:
    """Every row keeps at most ``n_keep`` nonzeros in every group of ``group`` columns."""
    m, n = dense.shape
    counts = (dense != 0).reshape(m, n // group, group).sum(axis=2)
    assert counts.max() <= n_keep
    assert counts.min() == n_keep  # generic data: no kept weight is exactly zero


# ---------------------------------------------------------------- budget rule
@pytest.mark.parametrize(
    ("density", "total", "expected"),
    [(0.5, 100, 50), (0.29, 100, 29), (0.3, 7, 2), (1.0, 13, 13), (1e-6, 10, 0), (0.57, 100, 57)],
)
def test_kept_budget_is_floor_with_decimal_tolerance(density, total, expected):
    assert kept_budget(density, total) == expected


# ---------------------------------------------------------------- Wanda
@pytest.mark.parametrize("density", [0.3, 0.37, 0.5, 0.91])
def test_wanda_keeps_exact_budget_spread_over_rows(density):
    W, X = lognormal_scaled_layer(13, 17, 40)
    est = Wanda(density=density).fit(W, X)
    m, n = W.shape
    kept = kept_budget(density, m * n)
    assert est.nnz_ == kept
    per_row = (est.weight_.toarray() != 0).sum(axis=1)
    assert set(per_row) <= {kept // m, kept // m + 1}
    # The leftovers go to the rows with the largest next score.
    scores = np.sort(np.abs(W) * np.linalg.norm(X, axis=0), axis=1)[:, ::-1]
    base = kept // m
    if kept % m and base < n:
        winners = np.flatnonzero(per_row == base + 1)
        losers = np.flatnonzero(per_row == base)
        assert scores[winners, base].min() >= scores[losers, base].max()


def test_wanda_keeps_the_top_scores_of_each_row_unchanged():
    W, X = lognormal_scaled_layer(10, 20, 50)
    est = Wanda(density=0.5).fit(W, X)
    dense = est.reconstruct()
    scores = np.abs(W) * np.linalg.norm(X, axis=0)
    for i in range(W.shape[0]):
        kept = dense[i] != 0
        assert scores[i, kept].min() >= scores[i, ~kept].max()
    np.testing.assert_array_equal(dense[dense != 0], W[dense != 0])


def test_wanda_without_calibration_is_row_magnitude_pruning():
    W = gaussian(12, 20)
    wanda = Wanda(density=0.5).fit(W)
    row_mag = MagnitudePruning(density=0.5, scope="row").fit(W)
    np.testing.assert_array_equal(wanda.reconstruct(), row_mag.reconstruct())


@pytest.mark.parametrize("n_m", [(2, 4), (4, 8), (1, 4)])
def test_wanda_n_m_pattern_group_by_group(n_m):
    W, X = lognormal_scaled_layer(9, 24, 40)
    est = Wanda(density=n_m[0] / n_m[1], n_m=n_m).fit(W, X)
    dense = est.reconstruct()
    assert_n_m_pattern(dense, *n_m)
    expected = n_m_mask(np.abs(W) * np.linalg.norm(X, axis=0), *n_m)
    np.testing.assert_array_equal(dense != 0, expected)


@pytest.mark.parametrize("est", [Wanda(n_m=(2, 4)), SparseGPT(n_m=(2, 4))])
def test_n_m_rejects_a_density_that_contradicts_the_pattern_and_ragged_columns(est):
    with pytest.raises(ValueError, match=r"set density=2/4"):
        clone(est).set_params(density=0.3).fit(gaussian(4, 8))
    with pytest.raises(ValueError, match="multiple of M=4"):
        clone(est).fit(gaussian(4, 10))
    with pytest.raises(ValueError, match="0 < N <= M"):
        clone(est).set_params(n_m=(5, 4), density=1.0).fit(gaussian(4, 8))


# ---------------------------------------------------------------- SparseGPT
def _naive_sparsegpt(W, G, kept, block, damping, n_m=None):
    """Unbatched OBS reference: one column at a time, H_F^-1 rows from explicit inverses."""
    W = W.astype(np.float64).copy()
    m, n = W.shape
    H = G.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damping * np.mean(np.diag(H)) * np.eye(n)
    U = np.zeros((n, n))
    for q in range(n):
        inv = np.linalg.inv(H[q:, q:])
        U[q, q:] = inv[0] / np.sqrt(inv[0, 0])
    keep = np.zeros((m, n), dtype=bool)
    # the budget follows the live columns: dead inputs' weights are zero and get no share
    live_before = np.concatenate(([0], np.cumsum(~dead)))
    n_live = int(live_before[-1])
    spendable = min(kept, m * n_live)
    for q in range(n):
        if n_m is None and q % block == 0:
            q2 = min(q + block, n)
            scores = (W[:, q:q2] / np.diag(U)[q:q2]) ** 2
            scores[:, dead[q:q2]] = -1.0
            share = spendable * int(live_before[q2]) // n_live - spendable * int(live_before[q]) // n_live
            keep[:, q:q2] = global_topk_mask(scores, share)
        if n_m is not None and q % n_m[1] == 0:
            q2 = q + n_m[1]
            keep[:, q:q2] = n_m_mask((W[:, q:q2] / np.diag(U)[q:q2]) ** 2, *n_m)
        err = W[:, q] * ~keep[:, q] / U[q, q]
        W[:, q:] -= np.outer(err, U[q, q:])
    return W


@pytest.mark.parametrize(
    ("m", "n", "block", "n_m"),
    [(5, 37, 8, None), (20, 12, 5, None), (7, 40, 128, None), (6, 40, 12, (2, 4)), (9, 48, 128, (4, 8))],
)
def test_sparsegpt_matches_unbatched_obs_reference(m, n, block, n_m):
    rng = np.random.default_rng(m * n)
    W = rng.standard_normal((m, n))
    X = rng.standard_normal((2 * n, n)) @ (np.eye(n) + rng.standard_normal((n, n)) / np.sqrt(n))
    G = X.T @ X
    G[:, 3] = G[3, :] = 0.0  # a dead input
    kept = kept_budget(0.4, m * n)
    got = sparsegpt_prune(W, G, kept=kept, block_size=block, damping=0.01, n_m=n_m)
    expected = _naive_sparsegpt(W, G, kept, block, 0.01, n_m)
    np.testing.assert_allclose(got, expected, atol=1e-10)
    assert not got[:, 3].any()
    if n_m is None:  # the dead input's share of the budget went to live weights
        assert np.count_nonzero(got) == kept


def test_upper_cholesky_of_inverse():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((30, 20))
    H = A.T @ A + 0.1 * np.eye(20)
    U = upper_cholesky_of_inverse(H)
    np.testing.assert_array_equal(U, np.triu(U))
    assert (np.diag(U) > 0).all()
    np.testing.assert_allclose(U.T @ U, np.linalg.inv(H), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("density", [0.3, 0.5, 0.77])
@pytest.mark.parametrize("block_size", [4, 7, 128])
def test_sparsegpt_keeps_exact_budget(density, block_size):
    W, X = lognormal_scaled_layer(11, 30, 60)
    est = SparseGPT(density=density, block_size=block_size).fit(W, X)
    assert est.nnz_ == kept_budget(density, W.size)


@pytest.mark.parametrize("n_m", [(2, 4), (4, 8)])
def test_sparsegpt_n_m_pattern_group_by_group(n_m):
    W, X = correlated_layer(8, 32, 80)
    est = SparseGPT(density=0.5, n_m=n_m, block_size=6).fit(W, X)
    assert_n_m_pattern(est.reconstruct(), *n_m)
    assert est.nnz_ == W.size // 2


def test_sparsegpt_float32_stays_float32_and_close_to_float64():
    W, X = correlated_layer(16, 32, 100)
    est64 = SparseGPT(block_size=8).fit(W, X)
    est32 = SparseGPT(block_size=8).fit(W.astype(np.float32), X.astype(np.float32))
    assert est32.reconstruct().dtype == np.float32
    assert est32.weight_.dtype == np.float32
    assert abs(est32.calibrated_err_ - est64.calibrated_err_) < 1e-3


def test_sparsegpt_without_damping_on_singular_gram_raises():
    W = gaussian(4, 10)
    X = np.ones((3, 10))  # G = 3 * ones: rank 1, Cholesky meets an exact zero pivot
    with pytest.raises(np.linalg.LinAlgError, match="damping > 0"):
        SparseGPT(damping=0.0).fit(W, X)
    assert np.isfinite(SparseGPT().fit(W, X).calibrated_err_)


# ---------------------------------------------------------------- ADMM
@pytest.mark.parametrize("schedule", ["final", "cubic"])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.64])
def test_admm_keeps_exact_budget(schedule, density):
    W, X = lognormal_scaled_layer(12, 20, 50)
    est = ADMMPruning(density=density, schedule=schedule).fit(W, X)
    assert est.nnz_ == kept_budget(density, W.size)
    assert est.backend_ == "numpy_numba"


def test_admm_with_given_mask_is_the_damped_masked_least_squares_solution():
    W, X = correlated_layer(6, 16, 60)
    G = X.T @ X
    mask = np.random.default_rng(3).random(W.shape) < 0.5
    damping = 0.1
    est = ADMMPruning(mask=mask, n_iter=400, damping=damping, density=0.1).fit(W, X)
    dense = est.reconstruct()
    assert not dense[~mask].any()
    # Exact solution in original coordinates: ridge damping * mean(diag G~) * D^2.
    d = np.sqrt(np.diag(G)) + 1e-8
    G_tilde = G / d[:, None] / d[None, :]
    H = G + damping * np.mean(np.diag(G_tilde)) * np.diag(d**2)
    expected = np.zeros_like(W)
    for i in range(W.shape[0]):
        s = mask[i]
        expected[i, s] = np.linalg.solve(H[np.ix_(s, s)], H[s] @ W[i])
    np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=1e-7)


def test_admm_given_mask_checks_its_shape_and_values():
    W = gaussian(4, 6)
    with pytest.raises(ValueError, match=r"mask has shape \(6, 4\)"):
        ADMMPruning(mask=np.ones((6, 4), dtype=bool)).fit(W)
    with pytest.raises(ValueError, match="boolean"):
        ADMMPruning(mask=np.full((4, 6), 2)).fit(W)
    est = ADMMPruning(mask=np.eye(4, 6, dtype=int)).fit(W)
    assert est.nnz_ == 4


def test_admm_runs_on_the_portable_engine_with_the_same_numbers():
    W, X = lognormal_scaled_layer(8, 12, 30)
    fast = ADMMPruning().fit(W, X)
    portable = ADMMPruning(backend="array_api").fit(W, X)
    assert portable.backend_ == "array_api"
    np.testing.assert_allclose(portable.reconstruct(), fast.reconstruct(), rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- quality
@pytest.mark.parametrize("cls", SPARSE_COMPRESSORS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibrated_error_not_worse_than_magnitude_with_unequal_feature_scales(cls, seed):
    W, X = lognormal_scaled_layer(seed=seed)
    magnitude = MagnitudePruning(density=0.5).fit(W, X)
    est = cls(density=0.5).fit(W, X)
    assert est.calibrated_err_ <= magnitude.calibrated_err_


@pytest.fixture(scope="module")
def synthetic_layer_errors():
    W, X = correlated_layer(64, 128, 512)
    cal = Calibration.from_activations(X)
    return {cls.__name__: cls(density=0.5).fit(W, calibration=cal).calibrated_err_ for cls in COMPRESSORS}


@pytest.mark.parametrize("cls", [SparseGPT, ADMMPruning])
def test_weight_updates_beat_wanda_on_a_layer_with_correlated_inputs(cls, synthetic_layer_errors):
    assert synthetic_layer_errors[cls.__name__] <= synthetic_layer_errors["Wanda"]


# ---------------------------------------------------------------- contract (all compressors)
def _fitted_dense(est) -> np.ndarray:
    return np.asarray(est.reconstruct())


@pytest.mark.parametrize("cls", SPARSE_COMPRESSORS)
def test_density_one_returns_w(cls):
    W, X = correlated_layer(10, 16, 40)
    for calib in (X, None):
        est = cls(density=1.0).fit(W, calib)
        np.testing.assert_allclose(est.reconstruct(), W, rtol=1e-7, atol=1e-7)
        assert est.calibrated_err_ < 1e-6


@st.composite
def _problems(draw):
    m = draw(st.integers(2, 9))
    n = draw(st.integers(2, 9))
    density = draw(st.sampled_from([0.1, 0.25, 0.5, 0.6, 0.99, 1.0]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**16))
    calibrated = draw(st.booleans())
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n)).astype(dtype)
    X = None
    if calibrated:
        n_tokens = draw(st.integers(1, 2 * n))
        X = (rng.standard_normal((n_tokens, n)) * np.exp(rng.standard_normal(n))).astype(dtype)
    return W, X, density


@pytest.mark.parametrize("cls", COMPRESSORS)
@given(problem=_problems())
def test_contract_invariants(cls, problem):
    W, X, density = problem
    W_before = W.copy()
    X_before = None if X is None else X.copy()
    est = cls(density=density).fit(W, X)
    m, n = W.shape
    dense = est.reconstruct()
    assert dense.shape == (m, n)
    assert dense.dtype == W.dtype
    if isinstance(est, LowRank):
        assert est.U_.shape == (m, est.rank_) and est.V_.shape == (est.rank_, n)
        assert est.nnz_ == est.rank_ * (m + n)
        within_budget = est.nnz_ <= density * m * n * (1 + 1e-9) or est.rank_ == 1  # rank >= 1
    else:
        assert sp.issparse(est.weight_) and est.weight_.format == "csr"
        assert est.weight_.shape == (m, n) and est.weight_.dtype == W.dtype
        np.testing.assert_array_equal(est.weight_.toarray(), dense)
        within_budget = est.nnz_ <= density * m * n * (1 + 1e-9)
    assert within_budget
    assert est.density_ == est.nnz_ / (m * n)
    assert np.isfinite(est.calibrated_err_) and np.isfinite(est.reconstruction_err_)
    np.testing.assert_array_equal(W, W_before)
    if X is not None:
        np.testing.assert_array_equal(X, X_before)
    again = cls(density=density).fit(W, X)
    np.testing.assert_array_equal(again.reconstruct(), dense)


@pytest.mark.parametrize("cls", COMPRESSORS)
def test_errors_are_recorded_like_the_metric(cls):
    W, X = lognormal_scaled_layer(8, 12, 30)
    est = cls().fit(W, X)
    G = X.T @ X
    assert est.calibrated_err_ == pytest.approx(relative_error(W, est.reconstruct(), G), rel=1e-9)
    assert est.reconstruction_err_ == pytest.approx(relative_error(W, est.reconstruct()), rel=1e-9)


@pytest.mark.parametrize("cls", COMPRESSORS)
@pytest.mark.parametrize(
    ("W", "X", "params", "match"),
    [
        (np.array([[1.0, np.nan], [0.0, 1.0]]), None, {}, "NaN"),
        (np.eye(2), np.array([[1.0, np.inf]]), {}, "X_calib contains"),
        (np.ones(4), None, {}, "2D array"),
        (np.eye(3), np.ones((5, 2)), {}, "has 2 columns, but W has 3"),
        (np.eye(3), None, {"density": 0.0}, "density"),
        (np.eye(3), None, {"density": 1.5}, "density"),
    ],
    ids=["nan-W", "inf-X", "1d-W", "X-columns", "density-0", "density-1.5"],
)
def test_bad_inputs_raise_like_dsf(cls, W, X, params, match):
    with pytest.raises(ValueError, match=match):
        cls(**params).fit(W, X)


@pytest.mark.parametrize("cls", COMPRESSORS)
def test_clone_and_get_params_round_trip(cls):
    est = cls(density=0.3)
    params = est.get_params()
    twin = clone(est)
    assert twin is not est and twin.get_params() == params
    assert type(twin)(**params).get_params() == params
    assert twin.set_params(density=0.7).density == 0.7 and est.density == 0.3


def test_fixed_mask_parameter_clones():
    mask = np.eye(3, 4, dtype=bool)
    twin = clone(ADMMPruning(mask=mask))
    np.testing.assert_array_equal(twin.mask, mask)


@pytest.mark.parametrize("cls", COMPRESSORS)
def test_array_api_strict_inputs_stay_in_their_namespace(cls):
    xps = pytest.importorskip("array_api_strict")
    W, X = lognormal_scaled_layer(6, 8, 20)
    est = cls().fit(xps.asarray(W), xps.asarray(X))
    out = est.reconstruct()
    assert isinstance(out, type(xps.asarray(W)))
    reference = cls().fit(W, X).reconstruct()
    np.testing.assert_allclose(to_numpy(out), reference, rtol=1e-8, atol=1e-10)


@parametrize_with_checks(
    [Wanda(), SparseGPT(), ADMMPruning(), LowRank()],
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
