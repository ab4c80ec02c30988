"""DSF beyond the reference (issue 16): presets, inner dimension, N:M factors, the single-sparse
fallback, and the solvers behind them."""

from __future__ import annotations

import math
import warnings

import array_api_compat.numpy as np_compat
import numpy as np
import pytest
from _data import gaussian, scaled_activations
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.utils.estimator_checks import check_estimator

from sparsefact import DoubleSparseFactorization, MagnitudePruning
from sparsefact.admm import masked_quadratic_cg
from sparsefact.backends import ArrayAPIEngine, get_engine
from sparsefact.dsf import (
    double_sparse_factorization,
    max_n_m_inner_dim,
    plan_budgets,
    refit_both_factors,
    resolve_shape,
)
from sparsefact.estimators import PRESETS
from sparsefact.masks import NMPattern, n_m_mask_along, parse_n_m, satisfies_n_m
from sparsefact.metrics import relative_error

FAST = {"max_iter": 6, "tol": 0}
QUICK_QUALITY = {"preset": "quality", "max_iter": 6, "restart_iter": 4, "tol": 0}


@pytest.fixture(scope="module")
def engine():
    return get_engine("auto", np_compat)


def _fit(W, X=None, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DoubleSparseFactorization(**params).fit(W, X)


# ---------------------------------------------------------------- masks and solvers
def test_n_m_pattern_along_both_axes(engine):
    scores = np.abs(gaussian(8, 12, seed=3))
    rows = n_m_mask_along(engine, scores, 2, 4, axis=1)
    cols = n_m_mask_along(engine, scores, 1, 4, axis=0)
    assert rows.sum() == 8 * 12 // 2 and satisfies_n_m(rows, 2, 4, axis=1)
    assert cols.sum() == 12 * 8 // 4 and satisfies_n_m(cols, 1, 4, axis=0)
    # the kept entries are the largest of each group
    groups = scores.reshape(8, 3, 4)
    kept = rows.reshape(8, 3, 4)
    assert (np.where(kept, groups, np.inf).min(axis=2) >= np.where(kept, -np.inf, groups).max(axis=2)).all()
    assert NMPattern(2, 4, 0).kept((8, 12)) == 48 and NMPattern(2, 4, 0).transposed().axis == 1
    assert not satisfies_n_m(np.ones((4, 8)), 2, 4) and not satisfies_n_m(np.ones((4, 6)), 2, 4)
    with pytest.raises(ValueError, match="0 < N <= M"):
        parse_n_m((5, 4))


def test_masked_cg_solves_the_masked_sylvester_system(engine):
    rng = np.random.default_rng(0)
    left = (lambda a: a @ a.T + 0.1 * np.eye(5))(rng.standard_normal((5, 7)))
    right = (lambda a: a @ a.T + 0.1 * np.eye(6))(rng.standard_normal((6, 9)))
    cross = rng.standard_normal((5, 6))
    mask = rng.random((5, 6)) < 0.5
    x = masked_quadratic_cg(engine, left, right, cross, np.zeros((5, 6)), mask, n_iter=200)
    # normal equations on the support: vec(A X B) restricted to the mask equals C there
    idx = np.flatnonzero(mask.ravel())
    system = np.kron(left, right)[np.ix_(idx, idx)]  # row-major vec: (A (x) B) vec(X)
    exact = np.linalg.solve(system, cross.ravel()[idx])
    np.testing.assert_allclose(x.ravel()[idx], exact, rtol=1e-8, atol=1e-10)
    assert (x[~mask] == 0).all()


def test_refit_of_both_factors_never_raises_the_error(engine):
    W, X = gaussian(20, 28, seed=5), scaled_activations(80, 28)
    gram = X.T @ X
    est = _fit(W, X, density=0.5, **FAST)
    left, right = est.A_.toarray(), est.B_.toarray()
    new_left, new_right = refit_both_factors(engine, W, gram, left, right, rounds=2, cg_iter=20, damping=0.0)
    assert relative_error(W, new_left @ new_right, gram) <= relative_error(W, left @ right, gram) + 1e-12
    assert ((new_left != 0) <= (left != 0)).all() and ((new_right != 0) <= (right != 0)).all()


# ---------------------------------------------------------------- presets
def test_presets_are_declared_once_and_reference_is_the_default():
    est = DoubleSparseFactorization()
    assert est.preset == "reference" and est.inner_dim == "auto" and est.fallback == "auto"
    assert est._stage_options() == PRESETS["reference"]
    assert DoubleSparseFactorization(preset="quality", exact_iter=7)._stage_options()["exact_iter"] == 7
    options = est._solver_options()
    assert options["inner_dim"] == "auto" and options["n_m"] is None and options["rho"] == 1.0


@pytest.mark.parametrize("shape", [(24, 32), (32, 24), (20, 20)])
def test_quality_preset_is_never_worse_than_the_reference(shape):
    W, X = gaussian(*shape, seed=1), scaled_activations(3 * shape[1], shape[1])
    reference = _fit(W, X, density=0.5, **FAST)
    quality = _fit(W, X, density=0.5, **QUICK_QUALITY)
    assert quality.reference_err_ == pytest.approx(reference.calibrated_err_, rel=1e-12) or (
        reference.single_sparse_ or quality.single_sparse_
    )
    assert quality.calibrated_err_ <= reference.calibrated_err_ + 1e-12
    assert quality.nnz_ <= 0.5 * W.size


def test_quality_preset_falls_back_to_the_reference_and_says_so():
    W, X = gaussian(24, 32, seed=2), scaled_activations(96, 32)
    params = {"density": 0.5, "max_iter": 6, "tol": 0, "fallback": None}
    reference = _fit(W, X, **params)
    # a huge damping makes the re-fit chase W in the Frobenius metric: worse calibrated error
    spoiled = _fit(W, X, **params, preset="quality", restart_iter=0, exact_iter=0, refit_iter=2, damping=1e4)
    assert spoiled.preset_fallback_
    np.testing.assert_array_equal(spoiled.reconstruct(), reference.reconstruct())
    good = _fit(W, X, **params, preset="quality", restart_iter=4)
    assert not good.preset_fallback_ and good.calibrated_err_ < reference.calibrated_err_


def test_quality_preset_passes_the_sklearn_estimator_checks():
    check_estimator(DoubleSparseFactorization(preset="quality", max_iter=4, restart_iter=3, tol=0))


# ---------------------------------------------------------------- inner dimension
def test_low_density_just_works():
    W, X = gaussian(96, 96, seed=4), scaled_activations(300, 96)
    for density in (0.02, 0.05, 0.1):
        est = _fit(W, X, density=density, **FAST)
        assert est.nnz_ <= density * W.size
        assert est.calibrated_err_ < 1.0
    # the reference shape with the square factor holding a third of the budget
    assert resolve_shape(96, 96, 0.05, "auto")[0] == 96
    # an explicit inner dimension keeps the reference's error message
    with pytest.raises(ValueError, match="minimum density is"):
        DoubleSparseFactorization(density=0.05, inner_dim=96).fit(W)


def test_below_the_square_shape_the_inner_dimension_shrinks():
    r, split = resolve_shape(200, 200, 0.012, "auto")
    assert r < 200
    plan = plan_budgets(200, 200, 0.012, split, "global", r)
    assert plan.max_nnz <= 0.012 * 200 * 200
    est = _fit(gaussian(200, 200, seed=6), density=0.012, **FAST)
    assert est.n_components_ == r and est.A_.shape == (200, r) and est.B_.shape == (r, 200)
    assert est.nnz_ <= 0.012 * 200 * 200


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_explicit_inner_dimension(shape, engine):
    W, X = gaussian(*shape, seed=7), scaled_activations(150, shape[1])
    est = _fit(W, X, density=0.3, inner_dim=12, **FAST)
    assert est.n_components_ == 12 and est.A_.shape == (shape[0], 12) and est.B_.shape == (12, shape[1])
    assert est.nnz_ <= 0.3 * W.size
    exact = _fit(W, X, density=0.3, inner_dim=12, objective="exact", **FAST)
    assert exact.B_.shape == (12, shape[1]) and exact.nnz_ <= 0.3 * W.size
    with pytest.raises(ValueError, match="inner_dim must be in"):
        DoubleSparseFactorization(inner_dim=31).fit(W)


# ---------------------------------------------------------------- N:M factors
@pytest.mark.parametrize(("shape", "factors"), [((32, 48), "both"), ((48, 32), "both"), ((32, 32), "A"),
                                                 ((32, 48), "B"), ((48, 32), "B")])
def test_n_m_factors_hold_group_by_group(shape, factors):
    W, X = gaussian(*shape, seed=8), scaled_activations(150, shape[1])
    est = _fit(W, X, density=0.5, n_m=(2, 4), n_m_factors=factors, **FAST)
    A, B = est.A_.toarray(), est.B_.toarray()
    assert est.nnz_ <= 0.5 * W.size
    if factors in ("both", "A"):
        assert est.n_components_ % 4 == 0 and satisfies_n_m(A, 2, 4, axis=1)
    if factors in ("both", "B"):
        assert satisfies_n_m(B, 2, 4, axis=1)
    if factors == "both":
        assert est.n_components_ == max_n_m_inner_dim(*shape, 0.5, (2, 4), "both")
    quality = _fit(W, X, density=0.5, n_m=(2, 4), n_m_factors=factors, **QUICK_QUALITY)
    if factors in ("both", "A"):
        assert satisfies_n_m(quality.A_.toarray(), 2, 4, axis=1)
    if factors in ("both", "B"):
        assert satisfies_n_m(quality.B_.toarray(), 2, 4, axis=1)
    assert quality.nnz_ <= 0.5 * W.size


def test_n_m_needs_divisible_dimensions():
    with pytest.raises(ValueError, match="multiple of M=4"):
        DoubleSparseFactorization(n_m=(2, 4), n_m_factors="B").fit(gaussian(16, 18))
    with pytest.raises(ValueError, match="cannot be combined"):
        DoubleSparseFactorization(n_m=(2, 4), masks="row").fit(gaussian(16, 16))


# ---------------------------------------------------------------- never worse than one sparse matrix
@pytest.mark.parametrize("shape", [(14, 3), (40, 3), (3, 40)])
def test_thin_matrices_near_full_density(shape):
    W = gaussian(*shape, seed=9)
    (m, n), k = shape, min(shape)
    density = 0.95
    magnitude = MagnitudePruning((math.floor(density * m * n) - k) / W.size).fit(W)
    est = _fit(W, density=density, max_iter=3, tol=0)
    assert est.calibrated_err_ <= magnitude.calibrated_err_ + 1e-12
    assert est.calibrated_err_ < 0.2  # the reference DSF alone: 0.6-0.8
    assert est.single_sparse_ and est.nnz_ <= density * W.size


shapes = st.tuples(st.integers(2, 14), st.integers(2, 14))


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, density=st.floats(0.05, 1.0), calibrated=st.booleans(), seed=st.integers(0, 999))
def test_never_worse_than_magnitude_pruning_with_k_fewer_nonzeros(shape, density, calibrated, seed):
    m, n = shape
    k = min(m, n)
    budget = math.floor(density * m * n)
    assume(budget - k >= 1)
    W = gaussian(m, n, seed=seed)
    X = gaussian(2 * n + 3, n, seed=seed + 1) * np.linspace(0.2, 3.0, n) if calibrated else None
    try:
        est = _fit(W, X, density=density, max_iter=3, tol=0)
    except ValueError:
        assume(False)
    magnitude = MagnitudePruning((budget - k) / (m * n)).fit(W, X)
    assert magnitude.nnz_ == budget - k
    assert est.calibrated_err_ <= magnitude.calibrated_err_ * (1 + 1e-9) + 1e-12
    assert est.nnz_ <= density * m * n


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(2, 10), st.integers(2, 10)).map(lambda s: (4 * s[0], 4 * s[1])),
    density=st.floats(0.05, 1.0),
    inner=st.one_of(st.just("auto"), st.integers(1, 40)),
    n_m=st.sampled_from([None, (2, 4), (1, 4), (3, 4)]),
    factors=st.sampled_from(["both", "A", "B"]),
    preset=st.sampled_from(["reference", "quality"]),
    seed=st.integers(0, 999),
)
def test_budgets_hold_for_every_density_inner_dimension_and_pattern(
    shape, density, inner, n_m, factors, preset, seed
):
    m, n = shape
    if inner != "auto":
        inner = min(inner, min(m, n))
        if n_m is not None and factors in ("both", "A"):
            inner = max(4, inner - inner % 4)
    W = gaussian(m, n, seed=seed)
    X = gaussian(n + 5, n, seed=seed + 1)
    params = dict(density=density, inner_dim=inner, n_m=n_m, n_m_factors=factors, max_iter=3, tol=0)
    if preset == "quality":
        params.update(preset="quality", restart_iter=2, exact_iter=1)
    try:
        est = _fit(W, X, **params)
    except ValueError as exc:
        assert "density" in str(exc) or "inner_dim" in str(exc) or "split" in str(exc)
        return
    A, B = est.A_.toarray(), est.B_.toarray()
    assert np.count_nonzero(A) + np.count_nonzero(B) == est.nnz_ <= density * m * n
    if n_m is not None and not est.single_sparse_:
        if factors in ("both", "A"):
            assert satisfies_n_m(A, *n_m, axis=1)
        if factors in ("both", "B"):
            assert satisfies_n_m(B, *n_m, axis=1)
    elif n_m is not None:  # A = I or B = I, the pruned W holds the pattern where it applies
        pruned = A if m >= n else B
        if factors == "both" or (factors == "A") == (m >= n):
            assert satisfies_n_m(pruned, *n_m, axis=1)
    assert np.isfinite(est.calibrated_err_)


def test_reference_preset_equals_the_core_solver_where_the_fallback_does_not_apply(engine):
    W, X = gaussian(40, 56, seed=3), scaled_activations(120, 56)
    est = _fit(W, X, density=0.5, **FAST)
    assert not est.single_sparse_
    options = DoubleSparseFactorization(density=0.5, **FAST)._solver_options()
    core = double_sparse_factorization(W, X.T @ X, engine=engine, split="auto", **options)
    np.testing.assert_array_equal(est.A_.toarray(), core.left)
    np.testing.assert_array_equal(est.B_.toarray(), core.right)
    portable = _fit(W, X, density=0.5, n_m=(2, 4), backend="array_api", **FAST)
    fast = _fit(W, X, density=0.5, n_m=(2, 4), **FAST)
    np.testing.assert_allclose(portable.reconstruct(), fast.reconstruct(), rtol=1e-8, atol=1e-10)
    assert isinstance(get_engine("array_api", np_compat), ArrayAPIEngine)
    assert clone(est).get_params() == est.get_params()


@pytest.mark.parametrize("preset", ["reference", "quality"])
@pytest.mark.parametrize("shape", [(10, 200), (200, 10), (48, 64)])
def test_budget_is_spent_also_with_dead_inputs(shape, preset):
    # A zero-padded convolution's classifier: a third of the inputs never fire (their Gram
    # rows and columns are zero). The weights on live inputs can still use every nonzero, so
    # DSF spends the budget -- up to the strict selection rule's one entry per factor.
    m, n = shape
    W = gaussian(m, n, seed=3)
    X = gaussian(3 * n, n, seed=4)
    X[:, : n // 3] = 0.0
    for density in (0.2, 0.5):
        params = FAST if preset == "reference" else QUICK_QUALITY
        est = _fit(W, X, density=density, **params)
        budget = math.floor(density * m * n)
        assert budget - 2 <= est.nnz_ <= budget, (density, est.nnz_, budget)
        assert np.isfinite(est.calibrated_err_)


def test_quality_preset_moves_budget_out_of_an_over_served_square_factor():
    # Square W at density 0.2: the reference split 0.16 puts 80% of the budget in the square
    # factor; the quality preset's second stage gives it a third instead (QUALITY_MAX_SQUARE_SHARE)
    # and, as always, never ends above the reference.
    from sparsefact.estimators import QUALITY_MAX_SQUARE_SHARE

    W = gaussian(48, 48, seed=5)
    X = scaled_activations(200, 48, seed=6)
    reference = _fit(W, X, density=0.2, **FAST)
    quality = _fit(W, X, density=0.2, **QUICK_QUALITY)
    assert QUALITY_MAX_SQUARE_SHARE * 0.2 * 48 * 48 < 0.16 * 48 * 48
    assert quality.calibrated_err_ <= reference.calibrated_err_
    if not quality.preset_fallback_:
        assert quality.split_ == pytest.approx(0.2 / 3, rel=1e-12)
    # at density 0.5 the reference split (a third of the budget) is kept
    assert _fit(W, X, density=0.5, **QUICK_QUALITY).split_ == pytest.approx(0.16)


def test_init_factors_warm_start_the_alternation():
    W = gaussian(30, 44, seed=8)
    X = scaled_activations(120, 44, seed=9)
    for shape_W in (W, W.T.copy()):
        Xs = X if shape_W.shape[1] == 44 else scaled_activations(120, 30, seed=9)
        first = _fit(shape_W, Xs, density=0.7, **FAST)
        A, B = first.A_.toarray(), first.B_.toarray()
        # from its own factors at the same density, three iterations keep the fit (the mapping
        # back into the alternation's scaled, possibly transposed coordinates is exact)
        again = _fit(shape_W, Xs, density=0.7, init_factors=(A, B), max_iter=3, tol=0)
        assert again.calibrated_err_ <= first.calibrated_err_ * 1.01
        lower = _fit(shape_W, Xs, density=0.4, init_factors=(A, B), **FAST)
        assert lower.nnz_ <= 0.4 * shape_W.size and np.isfinite(lower.calibrated_err_)
        assert lower.n_components_ == A.shape[1]
    with pytest.raises(ValueError, match="init_factors must have shapes"):
        _fit(W, X, density=0.5, init_factors=(A.T, B))
    with pytest.raises(ValueError, match="finite"):
        _fit(W.T.copy(), None, density=0.5, init_factors=(A * np.nan, B))
    with pytest.raises(ValueError, match="a pair"):
        _fit(W, X, density=0.5, init_factors=(A,))
    with pytest.raises(ValueError, match="inner_dim"):
        _fit(W.T.copy(), None, density=0.5, init_factors=(A, B), inner_dim=10)
