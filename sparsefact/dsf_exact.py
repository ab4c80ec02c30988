"""DSF variant ``objective="exact"``: alternate directly on the calibrated objective.

The reference algorithm (:mod:`sparsefact.dsf`) factorises the column-scaled matrix
``W D`` in the plain Frobenius norm -- exact only when the calibration Gram ``G`` is
diagonal -- and repairs the output-side factor afterwards. This variant minimises
``tr((W - L R) G (W - L R)^T)`` in every step instead:

- L-step (``R`` fixed): rows of ``L`` decouple; ADMM sparse least squares with Gram
  ``R G R^T`` and cross term ``R G W^T`` (:func:`sparsefact.admm.sparse_least_squares`).
- R-step (``L`` fixed): the normal equations ``(L^T L) R G = L^T W G`` couple both sides
  (a Sylvester-type system). In coordinates ``R~ = diag(c) R D`` (``c`` the column norms
  of ``L``, ``D = sqrt(diag G)``) each ADMM x-step solves ``A~ R~ G~ + s R~ = F``
  exactly with the eigendecompositions ``A~ = Q diag(a) Q^T`` (per step) and
  ``G~ = V diag(g) V^T`` (once per fit): ``R~ = Q [(Q^T F V) / (a g^T + s)] V^T``.
  This is the solve the DSF authors use for their CNN input-side re-fit (reference
  dsf.md §2.7), here used inside the alternation.

The schedule (budgets, orientation, identity/magnitude initialisation, warm-started
state, cubic ``rho0`` ramp, mask refresh) is the reference one. Whether this variant
beats the two-stage heuristic is measured in ``benchmarks/bench_variants.py``.
"""

from __future__ import annotations

from typing import Any

from .admm import NORM_EPS, SolverCounters, admm_loop, relative_ridge, sparse_least_squares
from .backends._base import SelectionHint
from .dsf import (
    FactorizationResult,
    finalize_if_better,
    initial_state,
    plan_budgets,
    resolve_shape,
    warm_start_weight,
)


def _sylvester_sparse_step(
    engine: Any,
    left_gram: Any,
    right_eig: tuple[Any, Any],
    cross: Any,
    z_prev: Any,
    u_prev: Any,
    *,
    threshold_index: int,
    rho0: float,
    rho: float,
    ridge: float,
    n_iter: int,
    mask_iter: int,
    scope: str,
    counters: SolverCounters,
    hints: list[SelectionHint] | None = None,
) -> tuple[Any, Any]:
    """ADMM for ``min tr(Y^T A Y G) - 2 tr(Y^T F)`` with ``||Y||_0`` bounded (normalised coords)."""
    xp = engine.xp
    g_values, g_vectors = right_eig
    a_values, a_vectors = xp.linalg.eigh(left_gram)
    k, n = cross.shape
    coupling = a_values[:, None] * g_values[None, :] + ridge
    counters.inverse_flops += 4.0 * k**3  # eigendecomposition, roughly

    def solve_with(rhs: Any, shift: float) -> Any:
        counters.add_matmul((k, k), n)
        counters.add_matmul((k, n), n)
        counters.add_matmul((k, k), n)
        counters.add_matmul((k, n), n)
        inner = engine.matmul(engine.matmul(a_vectors.T, rhs), g_vectors) / (coupling + shift)
        return engine.matmul(engine.matmul(a_vectors, inner), g_vectors.T)

    u = engine.copy(u_prev)
    y = solve_with(cross + rho0 * (z_prev - u), rho0)
    return admm_loop(
        engine, lambda rhs: solve_with(rhs, rho), cross, y, u, None,
        threshold_index=threshold_index, rho=rho, n_iter=n_iter, mask_iter=mask_iter,
        scope=scope, counters=counters, hints=hints,
    )


def double_sparse_factorization_exact(
    W: Any,
    gram: Any = None,
    *,
    engine: Any,
    density: float,
    split: float | str,
    max_iter: int,
    admm_iter: int,
    mask_iter: int,
    rho: float,
    ridge: float,
    finalize: bool,
    finalize_iter: int,
    masks: str,
    input_scaling: bool,
    inner_dim: int | str | None = None,
    n_m: tuple[int, int] | None = None,
    n_m_factors: str = "both",
    start: tuple[Any, Any] | None = None,
) -> FactorizationResult:
    """DSF on the exact calibrated objective (see the module docstring).

    Parameters and result as :func:`sparsefact.dsf.double_sparse_factorization`;
    ``input_scaling`` is accepted and has no effect here (the scaling is part of the
    R-step's coordinates); tracking and callbacks are not supported. ``start=(L, R)``
    continues from given factors (their duals start at zero) with ``rho0 = 1`` in every
    iteration: the exact objective warm-started from the reference alternation
    (``preset="quality"``).
    """
    xp = engine.xp
    m, n = W.shape
    r, split = resolve_shape(m, n, density, inner_dim, split, masks, n_m, n_m_factors)
    plan = plan_budgets(m, n, density, split, masks, r, n_m, n_m_factors)
    counters = SolverCounters()
    k = plan.r
    if gram is None:
        gram = engine.eye(n, W)
    scaling = xp.sqrt(engine.diag(gram)) + NORM_EPS
    gram_n = (gram / scaling[:, None]) / scaling[None, :]
    right_eig = xp.linalg.eigh(gram_n)
    target = W * scaling[None, :]
    # Orientation as the reference: the square factor is L when m < n, R when m >= n.
    square_is_left = not plan.transposed
    index_left = plan.index_square if square_is_left else plan.index_other
    index_right = plan.index_other if square_is_left else plan.index_square
    # Balanced rows of L are balanced columns of the L-step's unknown L^T. L^T and R are
    # the alternation's S^T and B (in some order), so their N:M patterns carry over as is.
    scope_left_t = "column" if masks == "row" else "global"
    scope_right = "row" if masks == "row" else "global"
    pattern_left = plan.pattern_square if square_is_left else plan.pattern_other
    pattern_right = plan.pattern_other if square_is_left else plan.pattern_square
    if pattern_left is not None:
        scope_left_t = pattern_left
    if pattern_right is not None:
        scope_right = pattern_right
    if start is not None:
        left, right = engine.copy(start[0]), engine.copy(start[1])
    else:
        square_t, pruned = initial_state(engine, target if square_is_left else target.T, plan)
        if square_is_left:
            left = engine.copy(square_t.T)
            right = pruned / scaling[None, :]
        else:
            left = engine.copy(pruned.T)
            right = square_t / scaling[None, :]
    u_left_t = engine.zeros((k, m), W)
    u_right = engine.zeros((k, n), W)
    # one per re-selecting ADMM iteration of each step, carried across outer iterations
    hints_left = [SelectionHint() for _ in range(mask_iter)]
    hints_right = [SelectionHint() for _ in range(mask_iter)]
    for t in range(max_iter):
        rho0 = warm_start_weight(t, max_iter) if start is None else 1.0
        # L-step: Gram R G R^T, cross R G W^T; unknown L^T (k x m).
        right_g = engine.matmul(right, gram)
        gram_l = engine.matmul(right_g, right.T)
        cross_l = engine.matmul(right_g, W.T)
        counters.add_matmul((k, n), n)
        counters.add_gram(k, n)
        counters.add_matmul((k, n), m)
        left_t, u_left_t = sparse_least_squares(
            engine, gram_l, cross_l, xp.sqrt(engine.diag(gram_l)), engine.copy(left.T), u_left_t,
            threshold_index=index_left, rho0=rho0, rho=rho, ridge=ridge, n_iter=admm_iter,
            mask_iter=mask_iter, scope=scope_left_t, counters=counters, hints=hints_left,
        )
        left = engine.copy(left_t.T)
        # R-step in coordinates R~ = diag(c) R D.
        col = engine.col_norms(left) + NORM_EPS
        left_gram = engine.matmul(left.T, left)
        counters.add_gram(k, m)
        left_gram_n = (left_gram / col[:, None]) / col[None, :]
        ridge_value = relative_ridge(engine, left_gram_n, ridge) * float(xp.mean(engine.diag(gram_n)))
        cross_r = engine.matmul(engine.matmul(left.T, W), gram)
        counters.add_matmul((k, m), n)
        counters.add_matmul((k, n), n)
        cross_r = (cross_r / col[:, None]) / scaling[None, :]
        z_prev = right * col[:, None] * scaling[None, :]
        u_prev = u_right * col[:, None] * scaling[None, :]
        z, u = _sylvester_sparse_step(
            engine, left_gram_n, right_eig, cross_r, z_prev, u_prev,
            threshold_index=index_right, rho0=rho0, rho=rho, ridge=ridge_value, n_iter=admm_iter,
            mask_iter=mask_iter, scope=scope_right, counters=counters, hints=hints_right,
        )
        right = (z / col[:, None]) / scaling[None, :]
        u_right = (u / col[:, None]) / scaling[None, :]
    left, error_before, error, finalized = finalize_if_better(
        engine, W, gram, left, right, finalize_iter if finalize else 0, rho, counters
    )
    return FactorizationResult(
        left=left, right=right, n_iter=max_iter, errors=[error_before],
        error_before_finalize=error_before, error=error, finalized=finalized,
        plan=plan, counters=counters,
    )
