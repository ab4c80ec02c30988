"""Bad input gives ValueError/TypeError naming the argument (sparsefact/_validation.py
and the estimators' input handling)."""

from __future__ import annotations

import numpy as np
import pytest
from _data import gaussian

from sparsefact import Calibration, DoubleSparseFactorization, MagnitudePruning
from sparsefact._validation import check_matrix, check_scalar_count, convert_to_namespace, to_numpy

ESTIMATORS = [DoubleSparseFactorization(max_iter=3, tol=0), MagnitudePruning()]


def _with(value, index, W):
    W = W.copy()
    W[index] = value
    return W


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_w(est, bad):
    with pytest.raises(ValueError, match="Input W contains (NaN|infinity)"):
        est.fit(_with(bad, (3, 4), gaussian(16, 16)))


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_x_calib(est, bad):
    X = _with(bad, (0, 0), gaussian(20, 16))
    with pytest.raises(ValueError, match="Input X_calib contains (NaN|infinity)"):
        est.fit(gaussian(16, 16), X_calib=X)
    with pytest.raises(ValueError, match="Input X_calib contains (NaN|infinity)"):
        est.fit(gaussian(16, 16), X)


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize(
    ("W", "match"),
    [
        (np.ones(16), r"^W: Expected 2D array, got 1D array"),
        (np.ones((2, 4, 4)), r"^W: Found array with dim 3"),
        (np.ones((0, 4)), r"^W: Found array with 0 sample\(s\)"),
        (np.ones((4, 0)), r"^W: Found array with 0 feature\(s\)"),
        (np.ones((3, 3), dtype=complex), r"^W: Complex data not supported"),
    ],
    ids=["1d", "3d", "no-rows", "no-columns", "complex"],
)
def test_bad_w_shape_or_type(est, W, match):
    with pytest.raises(ValueError, match=match):
        est.fit(W)


def test_sparse_w_is_a_type_error():
    import scipy.sparse as sp

    with pytest.raises(TypeError, match="Sparse data was passed for W"):
        DoubleSparseFactorization().fit(sp.csr_array(np.eye(4)))


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_x_calib_with_wrong_number_of_columns(est):
    with pytest.raises(ValueError, match=r"X_calib has 15 columns, but W has 16"):
        est.fit(gaussian(16, 16), X_calib=gaussian(20, 15))


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_x_calib_must_be_2d(est):
    with pytest.raises(ValueError, match=r"^X_calib: Expected 2D array, got 1D array"):
        est.fit(gaussian(16, 16), X_calib=np.ones(16))


@pytest.mark.parametrize("cls", [DoubleSparseFactorization, MagnitudePruning])
@pytest.mark.parametrize("density", [0, -0.1, 1.5, "half"])
def test_density_outside_unit_interval(cls, density):
    with pytest.raises((ValueError, TypeError), match=r"The 'density' parameter .* must be"):
        cls(density=density).fit(gaussian(16, 16))


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"max_iter": 0}, "max_iter"),
        ({"max_iter": -3}, "max_iter"),
        ({"max_iter": 2.5}, "max_iter"),
        ({"admm_iter": 0}, "admm_iter"),
        ({"finalize_iter": 0}, "finalize_iter"),
        ({"rho": 0.0}, "rho"),
        ({"ridge": -1.0}, "ridge"),
        ({"tol": -1e-3}, "tol"),
        ({"split": 0.0}, "split"),
        ({"split": "square"}, "split"),
        ({"backend": "gpu"}, "backend"),
        ({"callback": 3}, "callback"),
    ],
)
def test_invalid_parameters_name_themselves(params, name):
    match = rf"The '{name}' parameter of DoubleSparseFactorization"
    with pytest.raises((ValueError, TypeError), match=match):
        DoubleSparseFactorization(**params).fit(gaussian(16, 16))


def test_budget_too_small_for_the_square_factor_states_the_minimum_density():
    # 64x64 with the reference shape (inner_dim=64, split 0.16): the square factor alone
    # takes floor(0.16 * 4096) = 655 nonzeros, more than density 0.1 allows (409). It keeps
    # 654 of them (strict rule), the other factor keeps at least 1% (40 of 4096): a total
    # budget of 694 (density 0.16943) is the smallest that fits; the message states it
    # rounded up to 4 decimals.
    reference = {"inner_dim": 64, "split": 0.16}
    with pytest.raises(ValueError, match=r"density=0.1 is too small .* the minimum density is 0\.1695$"):
        DoubleSparseFactorization(density=0.1, **reference).fit(gaussian(64, 64))
    est = DoubleSparseFactorization(density=0.1695, max_iter=3, tol=0, **reference).fit(gaussian(64, 64))
    assert est.nnz_ <= 0.1695 * 64 * 64
    with pytest.raises(ValueError, match="minimum density is 0.1695"):
        DoubleSparseFactorization(density=0.1694, **reference).fit(gaussian(64, 64))


def test_below_the_reference_minimum_density_the_automatic_shape_just_works():
    # inner_dim="auto" (the default) moves a third of the budget into the square factor
    # below the reference's minimum density instead of refusing the fit.
    W = gaussian(64, 64)
    for density in (0.1, 0.05, 0.02):
        est = DoubleSparseFactorization(density=density, max_iter=4, tol=0).fit(W)
        assert est.nnz_ <= density * 64 * 64
        assert est.nnz_ >= 0.9 * density * 64 * 64
        assert np.isfinite(est.reconstruction_err_) and est.reconstruction_err_ < 1.0


def test_calibration_of_the_wrong_type():
    X = gaussian(20, 16)
    with pytest.raises(TypeError, match="calibration must be a sparsefact.Calibration.*got ndarray"):
        DoubleSparseFactorization().fit(gaussian(16, 16), calibration=X.T @ X)


def test_calibration_with_wrong_number_of_features():
    cal = Calibration.from_activations(gaussian(20, 8))
    with pytest.raises(ValueError, match="calibration has 8 features, but W has 16 columns"):
        DoubleSparseFactorization().fit(gaussian(16, 16), calibration=cal)


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_x_calib_and_calibration_together(est):
    X = gaussian(20, 16)
    with pytest.raises(ValueError, match="either X_calib or calibration, not both"):
        est.fit(gaussian(16, 16), X_calib=X, calibration=Calibration.from_activations(X))


@pytest.mark.parametrize(
    ("gram", "match"),
    [
        (np.ones((3, 4)), r"gram must be square .* got shape \(3, 4\)"),
        (np.array([[1.0, 2.0], [0.0, 1.0]]), "gram must be symmetric"),
        (np.array([[-1.0, 0.0], [0.0, 1.0]]), "gram has a negative diagonal entry"),
        (np.array([[np.nan, 0.0], [0.0, 1.0]]), "Input gram contains NaN"),
        (np.ones(3), r"^gram: Expected 2D array"),
    ],
    ids=["non-square", "non-symmetric", "negative-diagonal", "nan", "1d"],
)
def test_from_gram_rejects_non_gram_matrices(gram, match):
    with pytest.raises(ValueError, match=match):
        Calibration.from_gram(gram)


# ---------------------------------------------------------------- check_matrix itself
def test_check_matrix_never_copies_needlessly_and_never_mutates():
    W = gaussian(5, 4, np.float32)
    checked, xp = check_matrix(W, "W")
    assert checked.dtype == np.float32
    assert np.shares_memory(checked, W)
    ints, _ = check_matrix(np.arange(12).reshape(3, 4), "W")
    assert ints.dtype == np.float64


def test_check_matrix_none():
    with pytest.raises(ValueError, match="X_calib is required, got None"):
        check_matrix(None, "X_calib")


def test_check_matrix_array_api_strict():
    xps = pytest.importorskip("array_api_strict")
    value = xps.asarray(np.ones((3, 2), dtype=np.float32))
    checked, xp = check_matrix(value, "W")
    assert xp is xps and checked.dtype == xps.float32
    ints, _ = check_matrix(xps.ones((2, 2), dtype=xps.int64), "W")
    assert ints.dtype == xps.float64
    with pytest.raises(ValueError, match=r"^W must be a 2-D array, got 1 dimension"):
        check_matrix(xps.ones((3,)), "W")
    with pytest.raises(ValueError, match=r"^W is empty"):
        check_matrix(xps.ones((0, 3)), "W")
    with pytest.raises(ValueError, match="Input W contains NaN or infinity"):
        check_matrix(xps.asarray([[1.0, float("nan")]]), "W")
    with pytest.raises(ValueError, match="^W: Complex data not supported"):
        check_matrix(xps.ones((2, 2), dtype=xps.complex128), "W")


def test_convert_to_namespace_and_to_numpy():
    xps = pytest.importorskip("array_api_strict")
    like = xps.ones((2, 2), dtype=xps.float32)
    converted = convert_to_namespace(np.eye(2), like, xps)
    assert isinstance(converted, type(like)) and converted.dtype == xps.float32
    np.testing.assert_array_equal(to_numpy(converted), np.eye(2, dtype=np.float32))


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_check_scalar_count(value, error):
    with pytest.raises(error, match="iterations must be"):
        check_scalar_count(value, "iterations")
    assert check_scalar_count(np.int64(3), "iterations") == 3


def test_stated_minimum_density_is_accepted():
    import re

    from sparsefact.dsf import plan_budgets

    with pytest.raises(ValueError, match="minimum density is") as info:
        plan_budgets(6, 9, 0.1)
    stated = float(re.search(r"minimum density is ([0-9.]+)", str(info.value)).group(1))
    plan_budgets(6, 9, stated)
