"""Reference behaviour of DSF with its defaults (reference/dsf.md): error bounds on a
Gaussian matrix, against magnitude pruning at equal nonzeros."""

from __future__ import annotations

import numpy as np
import pytest

from sparsefact import DoubleSparseFactorization, MagnitudePruning


@pytest.fixture(scope="module")
def gaussian_256() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((256, 256))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_plain_fit_reference_numbers(gaussian_256, dtype):
    """Measured: float64 0.13206 (0.13287 before finalisation), float32 0.13089;
    magnitude pruning at the same nonzeros 0.2684."""
    W = gaussian_256.astype(dtype)
    est = DoubleSparseFactorization(density=0.5).fit(W)
    assert est.n_iter_ == 40 and est.split_ == 0.16
    assert est.nnz_ <= 0.5 * 256 * 256
    assert est.reconstruct().dtype == dtype
    assert est.reconstruction_err_ <= 0.145
    assert est.calibrated_err_ <= est.error_before_finalize_
    magnitude = MagnitudePruning(density=est.nnz_ / W.size).fit(W)
    assert magnitude.nnz_ == est.nnz_
    assert magnitude.reconstruction_err_ == pytest.approx(0.2684, abs=5e-4)
    assert est.reconstruction_err_ <= 0.55 * magnitude.reconstruction_err_
    assert est.reconstruction_err_ <= 0.55 * MagnitudePruning(0.5).fit(W).reconstruction_err_
