"""The estimator API of design.md §3: fitted attributes, fit signatures, transform and
inverse_transform, pipelines, pickling, callback, verbose, ConvergenceWarning."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import sklearn
from _data import gaussian, scaled_activations
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import FunctionTransformer, Pipeline, make_pipeline

from sparsefact import DoubleSparseFactorization, MagnitudePruning

FAST = {"max_iter": 8, "tol": 0}


def _factors(est):
    return est.A_.toarray(), est.B_.toarray()


def _assert_same_factors(a, b):
    for x, y in zip(_factors(a), _factors(b), strict=True):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- fitted attributes
@pytest.mark.parametrize(("m", "n", "split"), [(40, 40, 0.16), (32, 48, 0.25), (48, 32, 0.25)])
def test_fitted_attributes(m, n, split):
    W = gaussian(m, n)
    est = DoubleSparseFactorization(**FAST).fit(W)
    k = min(m, n)
    assert isinstance(est.A_, sp.csr_array) and isinstance(est.B_, sp.csr_array)
    assert est.A_.shape == (m, k) and est.B_.shape == (k, n)
    assert est.components_ is est.B_
    assert est.n_components_ == k
    assert est.n_features_in_ == n
    assert est.split_ == split
    assert est.backend_ == "numpy_numba"
    assert est.n_iter_ == 8
    assert est.nnz_ == est.A_.nnz + est.B_.nnz <= 0.5 * m * n
    assert est.density_ == est.nnz_ / (m * n)
    assert all(np.isfinite(e) for e in est.errors_) and len(est.errors_) >= 1
    np.testing.assert_allclose(est.reconstruct(), (est.A_ @ est.B_).toarray(), rtol=1e-12, atol=1e-12)
    err = np.linalg.norm(W - est.reconstruct()) / np.linalg.norm(W)
    assert est.reconstruction_err_ == pytest.approx(err, rel=1e-12)
    assert est.calibrated_err_ == est.reconstruction_err_
    assert est.calibrated_err_ <= est.error_before_finalize_
    names = est.get_feature_names_out()
    assert list(names) == [f"doublesparsefactorization{i}" for i in range(k)]


def test_finalize_off_keeps_the_alternation_result():
    W = gaussian(32, 32)
    X = scaled_activations(64, 32)
    est = DoubleSparseFactorization(finalize=False, **FAST).fit(W, X)
    assert est.calibrated_err_ == est.error_before_finalize_


def test_finalize_lowers_calibrated_error_on_a_calibrated_fit():
    W = gaussian(32, 32)
    X = scaled_activations(64, 32)
    est = DoubleSparseFactorization(**FAST).fit(W, X)
    assert est.calibrated_err_ < est.error_before_finalize_


@pytest.mark.parametrize(
    ("shape", "match"),
    [((1, 10), r"W has 1 sample \(row\)"), ((10, 1), r"W has 1 feature\(s\)"), ((1, 1), "1 sample and 1")],
)
def test_inner_dimension_one_is_rejected(shape, match):
    with pytest.raises(ValueError, match=match):
        DoubleSparseFactorization().fit(np.ones(shape))


def test_square_factor_without_entries_names_the_split():
    # k = 2: floor(0.25 * 4) = 1 entry, of which the strict rule keeps 0.
    with pytest.raises(ValueError, match=r"split=0.25 leaves the 2x2 square factor.*use split >= 0.5000"):
        DoubleSparseFactorization(split=0.25).fit(gaussian(20, 2))
    est = DoubleSparseFactorization(split=0.5, **FAST).fit(gaussian(20, 2))
    assert est.B_.shape == (2, 2)
    # split="auto" raises the reference default to that minimum for tiny inner dimensions
    auto = DoubleSparseFactorization(**FAST).fit(gaussian(20, 2))
    assert auto.split_ == 0.5


# ---------------------------------------------------------------- fit signatures
def test_second_positional_2d_argument_is_x_calib():
    W = gaussian(24, 16)
    X = scaled_activations(40, 16)
    by_position = DoubleSparseFactorization(**FAST).fit(W, X)
    by_keyword = DoubleSparseFactorization(**FAST).fit(W, X_calib=X)
    _assert_same_factors(by_position, by_keyword)
    plain = DoubleSparseFactorization(**FAST).fit(W)
    assert by_keyword.calibrated_err_ != by_keyword.reconstruction_err_
    assert not np.array_equal(plain.B_.toarray(), by_keyword.B_.toarray())


def test_one_dimensional_y_is_ignored():
    W = gaussian(24, 16)
    with_y = DoubleSparseFactorization(**FAST).fit(W, np.arange(24))
    _assert_same_factors(with_y, DoubleSparseFactorization(**FAST).fit(W))


def test_calibration_given_twice_is_rejected():
    W = gaussian(24, 16)
    X = gaussian(30, 16)
    with pytest.raises(ValueError, match="as y or as X_calib, not both"):
        DoubleSparseFactorization(**FAST).fit(W, X, X_calib=X)


def test_two_dimensional_y_with_wrong_columns_names_the_argument():
    with pytest.raises(ValueError, match=r"X_calib \(the 2-D second argument of fit\) has 3 columns"):
        DoubleSparseFactorization(**FAST).fit(gaussian(24, 16), gaussian(30, 3))


def test_list_input():
    W = gaussian(12, 10)
    est = DoubleSparseFactorization(**FAST).fit(W.tolist())
    _assert_same_factors(est, DoubleSparseFactorization(**FAST).fit(W))


def test_integer_input_becomes_float64():
    W = np.random.default_rng(0).integers(-1000, 1000, size=(16, 16))  # no tied magnitudes to speak of
    est = DoubleSparseFactorization(**FAST).fit(W)
    assert est.reconstruct().dtype == np.float64


# ---------------------------------------------------------------- sklearn citizenship
def test_get_set_params_and_clone():
    est = DoubleSparseFactorization(density=0.3, max_iter=7, split=0.2, random_state=3)
    params = est.get_params()
    assert params["density"] == 0.3 and params["max_iter"] == 7 and params["split"] == 0.2
    assert est.set_params(max_iter=9) is est and est.max_iter == 9
    est.fit(gaussian(24, 24))
    twin = clone(est)
    assert twin.get_params() == est.get_params()
    assert not hasattr(twin, "A_")


def test_pickle_round_trip():
    W = gaussian(24, 16)
    X = scaled_activations(40, 16)
    est = DoubleSparseFactorization(**FAST).fit(W, X)
    restored = pickle.loads(pickle.dumps(est))
    _assert_same_factors(est, restored)
    np.testing.assert_array_equal(restored.reconstruct(), est.reconstruct())
    np.testing.assert_array_equal(restored.transform(W), est.transform(W))
    pruned = MagnitudePruning(0.5).fit(W)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(pruned)).reconstruct(), pruned.reconstruct())


def test_random_state_gives_identical_factors():
    W = gaussian(30, 20)
    a = DoubleSparseFactorization(random_state=0, **FAST).fit(W)
    b = DoubleSparseFactorization(random_state=0, **FAST).fit(W)
    _assert_same_factors(a, b)


def test_callback_receives_progress_and_can_stop():
    seen = []

    def callback(info):
        seen.append(info)
        return info["iteration"] == 2

    est = DoubleSparseFactorization(max_iter=10, tol=0, callback=callback).fit(gaussian(24, 24))
    assert est.n_iter_ == 3
    assert [info["iteration"] for info in seen] == [0, 1, 2]
    assert set(seen[0]) >= {"iteration", "error", "rho0", "elapsed"}
    assert np.isfinite(seen[2]["error"])  # the error of the previous iterate from iteration 1 on


def test_verbose_prints_progress(capsys):
    DoubleSparseFactorization(max_iter=3, tol=0, verbose=2).fit(gaussian(16, 16))
    out = capsys.readouterr().out
    assert "iteration 3/3" in out and "done" in out
    DoubleSparseFactorization(max_iter=3, tol=0).fit(gaussian(16, 16))
    assert capsys.readouterr().out == ""


def test_convergence_warning_fires_and_tol_zero_disables_it():
    W = gaussian(32, 32)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        est = DoubleSparseFactorization(max_iter=2, tol=1e-8).fit(W)
    assert est.n_iter_ == 2
    # The warning compares the last two errors; they really differ after 2 iterations.
    assert abs(est.errors_[-1] - est.errors_[-2]) > 1e-8 * est.errors_[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        DoubleSparseFactorization(max_iter=2, tol=0).fit(W)
        # Converged runs stay silent under the default tolerance.
        DoubleSparseFactorization(max_iter=40).fit(W)


# ---------------------------------------------------------------- transform
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("m", "n"), [(48, 64), (64, 48)])
def test_transform_and_inverse_transform(m, n, dtype):
    W = gaussian(m, n, dtype)
    est = DoubleSparseFactorization(max_iter=10, tol=0).fit(W)
    k = min(m, n)
    codes = est.transform(W)
    assert codes.shape == (m, k) and codes.dtype == dtype
    per_row = round(est.A_.nnz / m)
    assert ((codes != 0).sum(axis=1) <= per_row).all()
    assert (codes != 0).sum() >= 0.95 * per_row * m
    back = est.inverse_transform(codes)
    assert back.shape == (m, n) and back.dtype == dtype
    # Re-coding with a per-row budget is a little worse than the fitted A_ (which spends
    # its budget globally): measured 1.14-1.24x reconstruction_err_ on such matrices.
    err = float(np.linalg.norm(W - back) / np.linalg.norm(W))
    assert err <= 1.35 * est.reconstruction_err_
    assert est.score(W) == pytest.approx(-err, rel=1e-5 if dtype == np.float32 else 1e-12)
    # Rows are coded independently of each other.
    subset = est.transform(W[5:17])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(subset, codes[5:17], rtol=tol, atol=tol)
    np.testing.assert_array_equal(est.fit_transform(W), est.transform(W))


def test_transform_uses_the_calibration_metric():
    W = gaussian(32, 24)
    X = scaled_activations(64, 24)
    calibrated = DoubleSparseFactorization(**FAST).fit(W, X)
    forgetful = clone(calibrated).set_params(keep_calibration=False).fit(W, X)
    _assert_same_factors(calibrated, forgetful)
    gram = X.T @ X

    def calibrated_error(codes):
        delta = W - calibrated.inverse_transform(codes)
        return np.sum(delta * (delta @ gram))

    assert calibrated_error(calibrated.transform(W)) < calibrated_error(forgetful.transform(W))


def test_transform_and_inverse_transform_reject_wrong_widths():
    est = DoubleSparseFactorization(**FAST).fit(gaussian(24, 16))
    with pytest.raises(ValueError, match="X has 15 features, but DoubleSparseFactorization is expecting 16"):
        est.transform(gaussian(4, 15))
    with pytest.raises(ValueError, match="codes has 15 columns, but this factorisation has n_components_=16"):
        est.inverse_transform(gaussian(4, 15))


def test_unfitted_estimator_raises():
    est = DoubleSparseFactorization()
    for method in (est.reconstruct, lambda: est.transform(gaussian(2, 2))):
        with pytest.raises(sklearn.exceptions.NotFittedError):
            method()


# ---------------------------------------------------------------- pipelines
def test_pipeline_routes_x_calib():
    W = gaussian(24, 16)
    X = scaled_activations(40, 16)
    direct = DoubleSparseFactorization(**FAST).fit(W, X_calib=X)

    named = Pipeline([("dsf", DoubleSparseFactorization(**FAST))]).fit(W, dsf__X_calib=X)
    _assert_same_factors(named["dsf"], direct)

    made = make_pipeline(DoubleSparseFactorization(**FAST), FunctionTransformer())
    codes = made.fit_transform(W, doublesparsefactorization__X_calib=X)
    _assert_same_factors(made[0], direct)
    np.testing.assert_array_equal(codes, direct.transform(W))


def test_pipeline_with_metadata_routing():
    W = gaussian(24, 16)
    X = scaled_activations(40, 16)
    direct = DoubleSparseFactorization(**FAST).fit(W, X_calib=X)
    with sklearn.config_context(enable_metadata_routing=True):
        est = DoubleSparseFactorization(**FAST).set_fit_request(X_calib=True)
        pipe = make_pipeline(est).fit(W, X_calib=X)
    _assert_same_factors(pipe[0], direct)


# ---------------------------------------------------------------- MagnitudePruning
def test_magnitude_pruning_attributes_and_calibration():
    W = gaussian(20, 30)
    X = scaled_activations(50, 30)
    est = MagnitudePruning(0.3).fit(W, X)
    assert isinstance(est.weight_, sp.csr_array)
    assert est.nnz_ == est.weight_.nnz == round(0.3 * 600)
    np.testing.assert_array_equal(est.weight_.toarray(), est.reconstruct())
    delta = W - est.reconstruct()
    expected = np.sqrt(np.sum(delta * (delta @ (X.T @ X))) / np.sum(W * (W @ (X.T @ X))))
    assert est.calibrated_err_ == pytest.approx(expected, rel=1e-10)
    assert est.reconstruction_err_ == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(W), rel=1e-12)
    row = MagnitudePruning(0.3, scope="row").fit(W)
    assert ((row.reconstruct() != 0).sum(axis=1) == 9).all()


# ---------------------------------------------------------------- degenerate starts
def test_tied_magnitudes():
    # Every |w| = 1: the initial prune breaks ties by position instead of keeping nothing.
    W = np.sign(gaussian(32, 32))  # every |w| = 1
    est = DoubleSparseFactorization(max_iter=5, tol=0).fit(W)
    assert est.reconstruction_err_ < 1.0


def test_empty_initial_factor():
    # 2x3, density 1, split 1: budget_other = 6 - 4 = 2, so the initial prune's budget is 1
    # entry and the strict rule keeps 0 of 6; the initialisation keeps at least one.
    est = DoubleSparseFactorization(density=1.0, split=1.0, max_iter=6, tol=0).fit(gaussian(2, 3))
    assert est.nnz_ <= 6
    assert est.reconstruction_err_ < 1.0


def test_magnitude_pruning_n_m_pattern_and_exact_budget():
    W = gaussian(12, 16)
    est = MagnitudePruning(0.5, n_m=(2, 4)).fit(W)
    groups = (est.reconstruct() != 0).reshape(12, 4, 4).sum(axis=2)
    assert (groups == 2).all() and est.nnz_ == 96
    kept = np.abs(W).reshape(12, 4, 4)
    # the two kept entries of every group are its two largest magnitudes
    ranks = np.argsort(np.argsort(-kept, axis=2), axis=2)
    assert np.array_equal((est.reconstruct() != 0).reshape(12, 4, 4), ranks < 2)
    with pytest.raises(ValueError, match="density=0.3"):
        MagnitudePruning(0.3, n_m=(2, 4)).fit(W)
    with pytest.raises(ValueError, match="multiple of M=4"):
        MagnitudePruning(0.5, n_m=(2, 4)).fit(gaussian(12, 10))
    # floor, never above the budget: 0.29 * 100 keeps 29 (decimal), 0.333 * 100 keeps 33
    assert MagnitudePruning(0.29).fit(gaussian(10, 10)).nnz_ == 29
    assert MagnitudePruning(0.333).fit(gaussian(10, 10)).nnz_ == 33
