"""sparsefact.admm: the ADMM solvers on problems with known answers."""

import array_api_compat.numpy as np_compat
import numpy as np
import pytest

from sparsefact.admm import SolverCounters, admm_loop, masked_least_squares, sparse_least_squares
from sparsefact.backends import ArrayAPIEngine
from sparsefact.backends.numpy_numba import NumpyNumbaEngine
from sparsefact.masks import strict_kept_count, strict_threshold_index

ENGINES = [NumpyNumbaEngine(), ArrayAPIEngine(np_compat)]


def _problem(seed=0, r=60, k=12, P=9):
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((r, k))
    T = rng.standard_normal((r, P))
    return F, T


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
def test_masked_least_squares_reaches_the_exact_solution(engine):
    F, T = _problem()
    mask = np.random.default_rng(1).random((12, 9)) < 0.5
    gram, cross = F.T @ F, F.T @ T
    solution = masked_least_squares(
        engine, gram.copy(), cross.copy(), np.zeros((12, 9)), mask, n_iter=400
    )
    assert np.all(solution[~mask] == 0)
    for j in range(9):  # column by column: least squares on the kept rows only
        rows = mask[:, j]
        exact = np.linalg.lstsq(F[:, rows], T[:, j], rcond=None)[0]
        np.testing.assert_allclose(solution[rows, j], exact, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
def test_sparse_least_squares_keeps_the_budget_and_fits(engine):
    F, T = _problem(2)
    budget = 40
    index = strict_threshold_index(budget, 12 * 9)
    counters = SolverCounters()
    z, u = sparse_least_squares(
        engine, F.T @ F, F.T @ T, np.linalg.norm(F, axis=0), np.zeros((12, 9)), np.zeros((12, 9)),
        threshold_index=index, rho0=0.0, counters=counters,
    )
    assert np.count_nonzero(z) <= strict_kept_count(budget, 12 * 9) <= budget
    # better than the best single column of F per target column, a crude but real check
    residual = np.linalg.norm(T - F @ z)
    assert residual < np.linalg.norm(T)
    assert counters.selections == 2 and counters.gemm_flops > 0 and u.shape == z.shape


def test_admm_loop_accepts_a_threshold_schedule():
    engine = ArrayAPIEngine(np_compat)
    identity = np.eye(6)
    cross = np.arange(1.0, 37.0).reshape(6, 6)
    seen = []

    def schedule(i):
        seen.append(i)
        return 35 - (10 - 4 * i)  # keep 10, then 6 entries (index = numel - kept - 1)

    z, _ = admm_loop(
        engine, lambda rhs: engine.matmul(identity, rhs) / 2, cross, cross.copy(), np.zeros((6, 6)),
        None, threshold_index=schedule, n_iter=3, mask_iter=2,
    )
    assert seen == [0, 1]
    assert np.count_nonzero(z) == 6
    with pytest.raises(ValueError, match="a mask is needed"):
        admm_loop(engine, lambda r: r, cross, cross, cross, None, mask_iter=0)
