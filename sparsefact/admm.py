"""ADMM solvers for sparse and masked least squares, written once against the engine API.

The two routines are the inner solvers of Double Sparse Factorization (Boža & Macko,
"Two Sparse Matrices are Better than One", arXiv 2409.18850) and of ADMM layer-wise
pruning (Boža, "Fast and Effective Weight Update for Pruned Large Language Models",
arXiv 2401.02938). Notation follows ``docs/algorithm.md``: the fixed factor ``F`` enters
only through its Gram ``F^T F`` and the cross term ``F^T T``; the unknown ``Y`` is
``k x P`` and every x-step is ``Y = (G + rho I)^-1 (C + rho (Z - U))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .backends._base import SelectionHint
from .masks import NMPattern

NORM_EPS = 1e-8


@dataclass
class SolverCounters:
    """Work done by the solvers, for the benchmark's FLOP count and phase split."""

    gemm_flops: float = 0.0
    inverse_flops: float = 0.0
    selections: int = 0
    elementwise_entries: float = 0.0

    def add_matmul(self, a_shape: tuple[int, int], b_cols: int) -> None:
        """A general product ``(r x s) @ (s x b_cols)``: ``2 r s b_cols`` flops."""
        self.gemm_flops += 2.0 * a_shape[0] * a_shape[1] * b_cols

    def add_gram(self, size: int, inner: int) -> None:
        """A symmetric Gram ``F F^T`` of size ``size`` over ``inner``: ``size^2 inner`` flops."""
        self.gemm_flops += float(size) * size * inner


def _normalised_system(engine: Any, gram: Any, scale: Any) -> Any:
    """``diag(scale)^-1 gram diag(scale)^-1``."""
    return (gram / scale[:, None]) / scale[None, :]


def relative_ridge(engine: Any, system: Any, ridge: float) -> float:
    """``ridge * mean(diag(system))``, or ``ridge`` itself when that mean is 0.

    The normalised systems have unit diagonal entries except for all-zero columns of
    the fixed factor, so the floor only matters when the fixed factor is entirely zero
    (where it keeps the warm-start solve with ``rho0 = 0`` well posed).
    """
    mean_diag = float(engine.xp.mean(engine.diag(system)))
    return ridge * mean_diag if mean_diag > 0 else ridge


def sparse_least_squares(
    engine: Any,
    gram: Any,
    cross: Any,
    norms: Any,
    z_prev: Any,
    u_prev: Any,
    *,
    threshold_index: int,
    rho0: float,
    rho: float = 1.0,
    ridge: float = 0.01,
    n_iter: int = 5,
    mask_iter: int = 2,
    scope: str = "global",
    counters: SolverCounters | None = None,
    hints: Sequence[SelectionHint] | None = None,
) -> tuple[Any, Any]:
    """Sparse least squares ``min_Y ||T - F Y||^2 s.t. ||Y||_0 <= budget`` by ADMM.

    One call is one sub-problem of the DSF alternation (reference/dsf.md §2.2):

    1. normalise the columns of ``F`` (``c = ||F[:, j]|| + 1e-8``) and work with
       ``Y~ = diag(c) Y``, so the mask is chosen on ``|Y_ij| * ||F[:, i]||``;
    2. ridge ``0.01 * mean(diag(F~^T F~))``;
    3. rescale the carried state ``Z, U`` into the new coordinates and take one
       warm-start x-step with penalty ``rho0``;
    4. ``n_iter`` ADMM steps (z, u, x), refreshing the mask only in the first
       ``mask_iter``; the final x-step, whose result would be discarded, is skipped.

    Parameters
    ----------
    engine : ArrayAPIEngine
        Kernels to run on.
    gram : array, shape (k, k)
        ``F^T F`` of the fixed factor.
    cross : array, shape (k, P)
        ``F^T T``.
    norms : array, shape (k,)
        Column norms of ``F``, computed directly from ``F``.
    z_prev, u_prev : array, shape (k, P)
        Sparse iterate and scaled dual carried from the previous call (original
        coordinates).
    threshold_index : int
        0-based position of the threshold in ``sort(|Y~ + U|)`` (global scope), or in
        every column's (row's) sort for column (row) scope; entries strictly above it are
        kept. See
        :func:`sparsefact.masks.strict_threshold_index`.
    rho0 : float
        Warm-start penalty of the first x-step (0 gives a pure ridge solve).
    rho, ridge, n_iter, mask_iter : float, float, int, int
        ADMM penalty, relative ridge, inner iterations, iterations that refresh the
        mask.
    scope : {"global", "column", "row"} or NMPattern
        One threshold over the whole unknown, one per column, one per row, or an N:M
        projection (``threshold_index`` is then not used).
    counters : SolverCounters, optional
        Receives the work done.
    hints : sequence of SelectionHint, optional
        One per re-selecting iteration, carried by the caller from one call to the next of
        the same sub-problem: the engine may start each selection from the previous
        threshold (global scope; the result does not depend on it).

    Returns
    -------
    z, u : arrays, shape (k, P)
        The sparse solution and the scaled dual, in original coordinates.
    """
    if mask_iter < 1:
        raise ValueError("mask_iter must be >= 1 when no mask is given")
    if not isinstance(scope, NMPattern) and scope not in ("global", "column", "row"):
        raise ValueError(f"scope must be 'global', 'column', 'row' or an NMPattern, got {scope!r}")
    scale = norms + NORM_EPS
    system = _normalised_system(engine, gram, scale)
    ridge_value = relative_ridge(engine, system, ridge)
    cross_n = engine.unscale_rows(cross, scale)
    u, rhs = engine.warm_start(cross_n, z_prev, u_prev, scale, rho0)
    if rho0 == rho:
        inverse = inverse0 = engine.spd_inverse(system, ridge_value + rho)
    else:
        inverse, inverse0 = engine.spd_inverse_pair(system, ridge_value + rho, ridge_value + rho0)
    y = engine.matmul(inverse0, rhs)
    k, width = cross.shape
    if counters is not None:
        counters.inverse_flops += float(k) ** 3 * (1 if rho0 == rho else 2)
        counters.add_matmul((k, k), width)
        counters.elementwise_entries += 3.0 * k * width

    def solve(rhs_next: Any) -> Any:
        if counters is not None:
            counters.add_matmul((k, k), width)
        return engine.matmul(inverse, rhs_next)

    z, u = admm_loop(
        engine, solve, cross_n, y, u, None,
        threshold_index=threshold_index, rho=rho, n_iter=n_iter, mask_iter=mask_iter,
        scope=scope, counters=counters, hints=hints,
    )
    return engine.unscale_rows(z, scale), engine.unscale_rows(u, scale)


def admm_loop(
    engine: Any,
    solve: Any,
    cross: Any,
    y: Any,
    u: Any,
    mask: Any,
    *,
    threshold_index: int | Callable[[int], int] = 0,
    rho: float = 1.0,
    n_iter: int = 5,
    mask_iter: int = 2,
    scope: str | NMPattern = "global",
    counters: SolverCounters | None = None,
    hints: Sequence[SelectionHint] | None = None,
) -> tuple[Any, Any]:
    """The ADMM iterations shared by every solver: z-step, u-step, x-step.

    Each iteration computes ``v = y + u``; in the first ``mask_iter`` iterations it
    re-selects ``mask = |v| > tau`` (``tau`` at ``threshold_index`` of the sorted
    magnitudes, per ``scope``), or, for an :class:`~sparsefact.masks.NMPattern` scope,
    the ``N`` largest ``|v|`` of every group (the exact N:M projection); then
    ``z = v * mask``, ``u = v - z`` and, except in the last iteration (whose x-step
    result would be discarded), ``y = solve(cross + rho (z - u))``.

    Parameters
    ----------
    engine : ArrayAPIEngine
    solve : callable
        ``rhs -> (system + rho I)^-1 rhs`` in whatever form the caller factorised.
    cross, y, u : arrays of the unknown's shape
        Right-hand side term, first x-iterate, scaled dual (consumed).
    mask : bool array or None
        Fixed support when ``mask_iter == 0``.
    threshold_index : int or callable
        Position of the threshold in the sorted magnitudes, or ``i -> position`` for a
        schedule over the re-selecting iterations; a negative position keeps every
        entry.
    hints : sequence of SelectionHint, optional
        ``hints[i]`` for the global selection of re-selecting iteration ``i``.

    Returns
    -------
    z, u : arrays
        Final sparse iterate and scaled dual.
    """
    if mask_iter < 1 and mask is None:
        raise ValueError("a mask is needed when mask_iter is 0")
    rows, cols = cross.shape
    for i in range(n_iter):
        last = i == n_iter - 1
        if i < mask_iter and isinstance(scope, NMPattern):
            v = engine.add(y, u)
            mask = scope.mask(engine, engine.xp.abs(v))
            mask, u, out = engine.admm_update(v, u, cross, mask, rho, last, None, True)
            if counters is not None:
                counters.selections += 1
                counters.elementwise_entries += rows * cols
        elif i < mask_iter:
            index = threshold_index(i) if callable(threshold_index) else threshold_index
            if index < 0:
                v, tau = engine.add(y, u), -1.0
            elif scope == "global":
                hint = hints[i] if hints is not None and i < len(hints) else None
                v, tau = engine.add_and_select(y, u, index, hint=hint)
            else:
                v = engine.add(y, u)
                select = engine.column_kth_smallest_abs if scope == "column" else engine.row_kth_smallest_abs
                tau = select(v, index)
            mask, u, out = engine.admm_update(v, u, cross, mask, rho, last, tau, True)
            if counters is not None:
                counters.selections += 1
                counters.elementwise_entries += rows * cols
        else:
            mask, u, out = engine.admm_update(y, u, cross, mask, rho, last)
        if counters is not None:
            counters.elementwise_entries += rows * cols
        if not last:
            y = solve(out)
    return out, u


def masked_least_squares(
    engine: Any,
    gram: Any,
    cross: Any,
    start: Any,
    mask: Any,
    *,
    n_iter: int = 20,
    rho: float = 1.0,
    counters: SolverCounters | None = None,
) -> Any:
    """Least squares on a fixed support ``min_Y tr(Y^T G Y) - 2 tr(Y^T C)``, ``Y = 0`` off ``mask``.

    ADMM with a warm start (reference/dsf.md §2.5): normalise by ``g = sqrt(diag G) +
    1e-8``, ``Y = diag(g) start``, ``U = 0``, ``P = (G~ + rho I)^-1``, then ``n_iter``
    steps ``Z = (Y + U) * mask; U += Y - Z; Y = P (C~ + rho (Z - U))`` (the last x-step
    is skipped, its result would be discarded). No damping is added to ``G``.

    Parameters
    ----------
    engine : ArrayAPIEngine
    gram : array, shape (k, k)
        Gram of the fixed side (for DSF finalisation ``R H R^T``).
    cross : array, shape (k, P)
        Cross term (for DSF finalisation ``R H W^T``).
    start : array, shape (k, P)
        Current values (warm start); its values off ``mask`` are ignored.
    mask : bool array, shape (k, P)
        The support to keep.
    n_iter, rho : int, float
        ADMM iterations and penalty.
    counters : SolverCounters, optional

    Returns
    -------
    array, shape (k, P)
        The re-fitted values, zero off ``mask``.
    """
    if n_iter < 1:
        raise ValueError("n_iter must be >= 1")
    xp = engine.xp
    scale = xp.sqrt(engine.diag(gram)) + NORM_EPS
    system = _normalised_system(engine, gram, scale)
    cross_n = engine.unscale_rows(cross, scale)
    y = engine.scale_rows(start, scale)
    u = engine.zeros(y.shape, y)
    inverse = engine.spd_inverse(system, rho)
    k, width = cross.shape
    if counters is not None:
        counters.inverse_flops += float(k) ** 3
    def solve(rhs_next: Any) -> Any:
        if counters is not None:
            counters.add_matmul((k, k), width)
        return engine.matmul(inverse, rhs_next)

    z, _ = admm_loop(
        engine, solve, cross_n, y, u, mask, rho=rho, n_iter=n_iter, mask_iter=0, counters=counters
    )
    return engine.unscale_rows(z, scale)


def masked_quadratic_cg(
    engine: Any,
    left: Any,
    right: Any | None,
    cross: Any,
    start: Any,
    mask: Any,
    *,
    n_iter: int,
) -> Any:
    """Minimise ``tr(X^T A X B) - 2 tr(X^T C)`` over ``X`` zero off ``mask``, by Jacobi-preconditioned CG.

    The exact masked least squares of a DSF factor on a fixed support, against the full
    calibration Gram: for the output-side factor ``L`` (with ``X = L^T``) ``A = R G R^T``,
    ``B = I``, ``C = R G W^T``; for the input-side factor ``R`` (``X = R``) ``A = L^T L``,
    ``B = G``, ``C = L^T W G`` -- a Sylvester-type system that couples all entries of
    ``R``. Conjugate gradients on the support, warm-started at ``start``, never increase
    the objective (for a convex quadratic each CG iterate minimises it over a growing
    Krylov space that contains the previous iterate), so the re-fit cannot be worse than
    its start up to rounding. Each iteration costs one product with ``A`` (and one with
    ``B``).

    Parameters
    ----------
    engine : ArrayAPIEngine
    left : array, shape (k, k)
        ``A`` (symmetric positive semi-definite).
    right : array, shape (c, c), or None
        ``B`` (symmetric positive semi-definite); ``None`` is the identity.
    cross : array, shape (k, c)
        ``C``.
    start : array, shape (k, c)
        Warm start (values off ``mask`` are ignored).
    mask : bool array, shape (k, c)
        The fixed support.
    n_iter : int
        CG iterations.

    Returns
    -------
    array, shape (k, c)
        The re-fitted values (zero off ``mask``).
    """
    xp = engine.xp
    zero = xp.zeros_like(start)
    x = xp.where(mask, start, zero)

    def apply(p: Any) -> Any:
        out = engine.matmul(left, p)
        if right is not None:
            out = engine.matmul(out, right)
        return xp.where(mask, out, zero)

    diag_left = engine.diag(left)
    precond = diag_left[:, None] if right is None else diag_left[:, None] * engine.diag(right)[None, :]
    precond = xp.where(precond > 0, precond, xp.ones_like(precond))
    residual = xp.where(mask, cross, zero) - apply(x)
    z = residual / precond
    direction = z
    rz = float(xp.sum(residual * z))
    tiny = 1e-30
    for _ in range(n_iter):
        if not rz > tiny:
            break
        a_dir = apply(direction)
        curvature = float(xp.sum(direction * a_dir))
        if not curvature > tiny:
            break
        alpha = rz / curvature
        x = x + alpha * direction
        residual = residual - alpha * a_dir
        z = residual / precond
        rz_new = float(xp.sum(residual * z))
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    return x
