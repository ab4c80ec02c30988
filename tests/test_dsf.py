"""The functional DSF core (sparsefact.dsf): budgets, schedule, variants, faithfulness."""

import array_api_compat.numpy as np_compat
import numpy as np
import pytest

from sparsefact.backends import ArrayAPIEngine, get_engine
from sparsefact.dsf import (
    double_sparse_factorization,
    minimum_density,
    plan_budgets,
    search_split,
    warm_start_weight,
)
from sparsefact.estimators import DoubleSparseFactorization
from sparsefact.masks import strict_kept_count


def solver_args(split="auto", **params):
    """The solver arguments of ``DoubleSparseFactorization(**params)`` (defaults declared once)."""
    return {**DoubleSparseFactorization(**params)._solver_options(), "split": split}


@pytest.fixture(scope="module")
def engine():
    return get_engine("auto", np_compat)


def test_budget_split_matches_reference_examples():
    # reference/dsf.md §1d: 384^2 at d=0.5 keeps N_A - 1 = 23,591 and N_B = 50,136.
    plan = plan_budgets(384, 384, 0.5)
    assert plan.split == 0.16 and plan.transposed and plan.k == 384
    assert plan.budget_square == 23592
    assert strict_kept_count(plan.budget_square, 384 * 384) == 23591
    assert plan.budget_other == 50136
    assert plan.max_nnz == 23591 + 50136 <= 0.5 * 384 * 384
    # rectangular layers give the square factor density 0.25
    assert plan_budgets(1024, 8192, 0.5).split == 0.25
    wide = plan_budgets(100, 300, 0.5)
    assert not wide.transposed and (wide.k, wide.P) == (100, 300)


def test_minimum_density_error_states_the_bound():
    # reference/dsf.md §6.2: square W needs d >= 0.17; 0.165 would silently overshoot.
    for density in (0.1, 0.16, 0.165):
        with pytest.raises(ValueError, match=r"minimum density is 0\.1700"):
            plan_budgets(384, 384, density)
    plan_budgets(384, 384, 0.17)
    assert minimum_density(384, 384, 0.16) == pytest.approx(0.17, abs=1e-4)


def test_square_factor_without_entries_is_rejected():
    with pytest.raises(ValueError, match="1 sample or 1 feature"):
        plan_budgets(1, 10, 0.5)
    with pytest.raises(ValueError, match=r"use split >= 0\.5000"):
        plan_budgets(2, 10, 0.5, split=0.25)
    plan_budgets(2, 10, 0.9, split=1.0)
    # "auto" raises the reference default just enough for tiny inner dimensions
    assert plan_budgets(2, 10, 0.5).split == 0.5
    assert plan_budgets(3, 3, 0.6).split == pytest.approx(0.2223)
    assert plan_budgets(8, 8, 0.5).split == 0.16


def test_warm_start_ramp_is_cubic_and_reaches_one():
    assert warm_start_weight(0, 40) == 0.0
    assert warm_start_weight(10, 40) == pytest.approx((10 / 37) ** 3)
    assert warm_start_weight(37, 40) == 1.0 and warm_start_weight(39, 40) == 1.0
    assert warm_start_weight(0, 3) == 1.0


def test_plain_fit_matches_reference_numbers(engine):
    # reference/dsf.md §4.5: Gaussian 256^2, d=0.5: 0.1329 before, 0.1321 after finalisation.
    W = np.random.default_rng(0).standard_normal((256, 256))
    result = double_sparse_factorization(W, engine=engine, **solver_args(density=0.5))
    assert result.error_before_finalize == pytest.approx(0.1329, abs=0.002)
    assert result.error == pytest.approx(0.1321, abs=0.002)
    assert result.finalized
    nnz = np.count_nonzero(result.left) + np.count_nonzero(result.right)
    assert nnz <= 0.5 * W.size and nnz >= 0.5 * W.size - 2


def test_numba_engine_equals_portable_engine_in_float64(engine):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((40, 56))
    X = rng.standard_normal((120, 56)) * np.exp(rng.standard_normal(56))
    gram = X.T @ X
    fast = double_sparse_factorization(W, gram, engine=engine, **solver_args(density=0.5, max_iter=12))
    portable = double_sparse_factorization(
        W, gram, engine=ArrayAPIEngine(np_compat), **solver_args(density=0.5, max_iter=12)
    )
    np.testing.assert_allclose(fast.left, portable.left, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(fast.right, portable.right, rtol=1e-9, atol=1e-11)
    assert np.array_equal(fast.left != 0, portable.left != 0)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_row_masks_balance_every_row_within_budget(engine, shape):
    W = np.random.default_rng(1).standard_normal(shape)
    args = solver_args(density=0.5, masks="row", max_iter=6)
    result = double_sparse_factorization(W, engine=engine, **args)
    rows_a = np.count_nonzero(result.left, axis=1)
    rows_b = np.count_nonzero(result.right, axis=1)
    assert rows_a.min() == rows_a.max() > 0
    assert rows_b.min() == rows_b.max() > 0
    assert rows_a.sum() + rows_b.sum() <= 0.5 * W.size


def test_masks_option_is_validated():
    with pytest.raises(ValueError, match="masks must be"):
        plan_budgets(10, 10, 0.5, masks="column")


def test_search_split_returns_the_best_trial(engine):
    W = np.random.default_rng(2).standard_normal((64, 64))
    options = DoubleSparseFactorization(density=0.5)._solver_options()
    best, trials = search_split(W, engine=engine, search_iter=4, **options)
    assert best in trials and len(trials) >= 3
    assert trials[best] == min(trials.values())


def test_callback_can_stop_early_and_sees_errors(engine):
    W = np.random.default_rng(4).standard_normal((32, 48))
    seen = []

    def stop_after_three(info):
        seen.append(info)
        return info["iteration"] == 2

    result = double_sparse_factorization(
        W, engine=engine, callback=stop_after_three, **solver_args(density=0.5)
    )
    assert result.n_iter == 3 and len(seen) == 3
    assert np.isnan(seen[0]["error"]) and 0 < seen[2]["error"] < 1


def test_error_history_decreases_over_the_run(engine):
    W = np.random.default_rng(5).standard_normal((64, 64))
    result = double_sparse_factorization(W, engine=engine, track_errors=True, **solver_args(density=0.5))
    errors = np.array(result.errors)
    assert len(errors) == 40
    # not monotone step by step (ADMM), but the end is far better than the start
    assert errors[-1] < 0.8 * errors[0]
    assert errors[-1] <= errors[len(errors) // 2]


def _correlated_layer(m, n, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    mixing = np.eye(n) + 0.5 * rng.standard_normal((n, n)) / np.sqrt(n)
    X = (rng.standard_normal((4 * n, n)) @ mixing) * np.exp(rng.standard_normal(n))
    return W, X


@pytest.mark.parametrize("shape", [(48, 64), (64, 48)])
def test_exact_objective_respects_budget_and_beats_heuristic_on_correlated_inputs(shape):
    from sparsefact import DoubleSparseFactorization

    W, X = _correlated_layer(*shape)
    heuristic = DoubleSparseFactorization(max_iter=10, tol=0).fit(W, X)
    exact = DoubleSparseFactorization(max_iter=10, tol=0, objective="exact").fit(W, X)
    assert exact.nnz_ <= 0.5 * W.size
    np.testing.assert_allclose(
        exact.reconstruct(), exact.A_.toarray() @ exact.B_.toarray(), rtol=1e-10, atol=1e-12
    )
    assert exact.calibrated_err_ <= exact.error_before_finalize_ + 1e-12
    assert exact.calibrated_err_ < heuristic.calibrated_err_


def test_split_search_keeps_the_best_trial_split():
    from sparsefact import DoubleSparseFactorization

    W, X = _correlated_layer(48, 64, seed=1)
    est = DoubleSparseFactorization(max_iter=8, tol=0, split="search").fit(W, X)
    assert est.split_ in est.split_trials_
    assert est.split_trials_[est.split_] == min(est.split_trials_.values())
    assert est.nnz_ <= 0.5 * W.size


def test_row_masks_through_the_estimator():
    from sparsefact import DoubleSparseFactorization

    W, X = _correlated_layer(40, 56, seed=2)
    for objective in ("heuristic", "exact"):
        est = DoubleSparseFactorization(max_iter=6, tol=0, masks="row", objective=objective).fit(W, X)
        for factor in (est.A_, est.B_):
            counts = np.diff(factor.indptr)
            # every non-empty row holds the same number of nonzeros
            assert len(set(counts[counts > 0].tolist())) == 1
        assert est.nnz_ <= 0.5 * W.size
