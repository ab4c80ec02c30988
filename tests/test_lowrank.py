"""Tests of the low-rank baseline (sparsefact/lowrank.py).

The contract shared by every compressor (hypothesis invariants, bad inputs,
scikit-learn checks) runs for LowRank in tests/test_pruning.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from _data import gaussian, scaled_activations
from hypothesis import given
from hypothesis import strategies as st

from sparsefact import Calibration
from sparsefact.lowrank import LowRank, budget_rank, gram_square_root
from sparsefact.metrics import relative_error


def _symmetric_sqrt(G: np.ndarray) -> np.ndarray:
    """Independent G^(1/2) (eigendecomposition, eigenvalues clipped at 0)."""
    vals, vecs = np.linalg.eigh(G)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def _closed_form_error(W: np.ndarray, G: np.ndarray, rank: int) -> float:
    """sqrt(sum of the discarded s_i^2 / sum of all s_i^2), s = singular values of W G^(1/2)."""
    s = np.linalg.svd(W @ _symmetric_sqrt(G), compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))


@pytest.mark.parametrize(
    ("density", "m", "n", "expected"),
    [(0.5, 64, 128, 21), (0.5, 384, 384, 96), (1.0, 10, 10, 5), (0.01, 8, 8, 1), (0.3, 100, 50, 10)],
)
def test_budget_rank(density, m, n, expected):
    assert budget_rank(density, m, n) == expected


@pytest.mark.parametrize("n_tokens", [200, 12])  # full-rank and singular Gram
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_calibrated_error_is_the_closed_form_optimum(n_tokens, density):
    W = gaussian(24, 32)
    X = scaled_activations(n_tokens, 32, spread=2.0)
    G = X.T @ X
    est = LowRank(density=density).fit(W, X)
    assert est.rank_ == budget_rank(density, 24, 32)
    assert est.calibrated_err_ == pytest.approx(_closed_form_error(W, G, est.rank_), rel=1e-8, abs=1e-12)


def test_calibrated_fit_beats_plain_svd_on_the_calibrated_error_and_vice_versa():
    W = gaussian(20, 30)
    X = scaled_activations(100, 30, spread=2.0)
    calibrated = LowRank(density=0.4).fit(W, X)
    plain = LowRank(density=0.4, calibrated=False).fit(W, X)
    assert calibrated.calibrated_err_ < plain.calibrated_err_
    assert plain.reconstruction_err_ < calibrated.reconstruction_err_


def test_uncalibrated_is_truncated_svd():
    W = gaussian(15, 25)
    est = LowRank(density=0.5).fit(W)
    r = est.rank_
    u, s, vt = np.linalg.svd(W, full_matrices=False)
    np.testing.assert_allclose(est.reconstruct(), (u[:, :r] * s[:r]) @ vt[:r], atol=1e-10)
    np.testing.assert_allclose(est.singular_values_, s[:r])
    assert est.calibrated_err_ == est.reconstruction_err_
    assert est.reconstruction_err_ == pytest.approx(np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2)))


def test_factors_shapes_orthonormal_u_and_budget():
    W = gaussian(12, 18).astype(np.float32)
    est = LowRank(density=0.5).fit(W, calibration=Calibration.from_activations(gaussian(40, 18, seed=2)))
    r = est.rank_
    assert est.U_.shape == (12, r) and est.V_.shape == (r, 18)
    assert est.U_.dtype == est.V_.dtype == est.reconstruct().dtype == np.float32
    np.testing.assert_allclose(est.U_.T @ est.U_, np.eye(r), atol=1e-5)
    assert est.nnz_ == r * 30 <= 0.5 * 12 * 18
    assert est.density_ == est.nnz_ / (12 * 18)


@pytest.mark.parametrize("calibrated", [True, False])
def test_density_one_returns_w_of_low_enough_rank(calibrated):
    # density=1 buys rank floor(m n / (m + n)) = 6 here, not min(m, n) = 12: W is
    # reproduced when its rank is at most that (a full-rank W is not; documented).
    rng = np.random.default_rng(0)
    W = rng.standard_normal((12, 6)) @ rng.standard_normal((6, 16))
    X = scaled_activations(50, 16)
    est = LowRank(density=1.0, calibrated=calibrated).fit(W, X)
    assert est.rank_ == 6
    np.testing.assert_allclose(est.reconstruct(), W, atol=1e-9)
    assert est.calibrated_err_ < 1e-9


def test_singular_gram_keeps_unexcited_inputs_and_stays_optimal():
    # Input 0 is never excited: the optimum leaves its column free; the fit keeps W's
    # column projected on the chosen output directions instead of zeroing it.
    W = gaussian(10, 8)
    X = gaussian(30, 8, seed=5)
    X[:, 0] = 0.0
    G = X.T @ X
    est = LowRank(density=0.6).fit(W, X)
    assert est.calibrated_err_ == pytest.approx(_closed_form_error(W, G, est.rank_), rel=1e-8)
    U = est.U_
    np.testing.assert_allclose(est.reconstruct()[:, 0], U @ (U.T @ W[:, 0]), atol=1e-12)
    assert np.abs(est.reconstruct()[:, 0]).max() > 0


@given(n=st.integers(1, 8), n_tokens=st.integers(1, 12), seed=st.integers(0, 1000))
def test_gram_square_root_factorises_any_gram(n, n_tokens, seed):
    X = np.random.default_rng(seed).standard_normal((n_tokens, n))
    G = X.T @ X
    S = gram_square_root(G)
    np.testing.assert_allclose(S @ S.T, G, atol=1e-9 * max(1.0, np.abs(G).max()))


@given(seed=st.integers(0, 1000), density=st.sampled_from([0.1, 0.3, 0.5, 0.8]))
def test_calibrated_fit_is_never_beaten_by_the_plain_svd(seed, density):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((7, 9))
    X = rng.standard_normal((int(rng.integers(2, 20)), 9)) * np.exp(rng.standard_normal(9))
    G = X.T @ X
    calibrated = LowRank(density=density).fit(W, X)
    plain = LowRank(density=density, calibrated=False).fit(W)
    assert calibrated.calibrated_err_ <= relative_error(W, plain.reconstruct(), G) + 1e-9
