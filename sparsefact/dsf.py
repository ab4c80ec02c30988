"""Double Sparse Factorization: the alternating minimisation behind the estimator.

Implements the algorithm of Boža & Macko, "Two Sparse Matrices are Better than One:
Sparsifying Neural Networks with Double Sparse Factorization" (arXiv 2409.18850,
ICLR 2025), as specified in ``docs/algorithm.md`` (reconstructed from the authors'
public code): input scaling by ``sqrt(diag G)``, the orientation rule, alternating
ADMM sparse least squares with warm-started state and a cubic warm-start ramp, and
finalisation of the output-side factor against the full calibration Gram.

:func:`double_sparse_factorization` is the functional core (arrays in, arrays out, in
the input's namespace); :class:`sparsefact.DoubleSparseFactorization` wraps it in the
scikit-learn API.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .admm import NORM_EPS, SolverCounters, masked_least_squares, sparse_least_squares
from .masks import DENSITY_FLOOR, strict_kept_count, strict_threshold_index
from .metrics import relative_error

SQUARE_SPLIT = 0.16
RECTANGULAR_SPLIT = 0.25


@dataclass(frozen=True)
class BudgetPlan:
    """How a density budget is shared between the two factors (reference/dsf.md §1d).

    Attributes
    ----------
    k, P : int
        Inner dimension ``min(m, n)`` and the other dimension ``max(m, n)``.
    transposed : bool
        True when ``m >= n`` (the square factor then sits on the input side).
    split : float
        Density of the square ``k x k`` factor.
    budget_square, budget_other : int
        ``floor(split k^2)`` and ``floor(density m n - budget_square)``.
    index_square, index_other, index_init : int
        Threshold positions of the strict selection rule for the square factor, the
        other factor, and the half-budget initial prune of the other factor.
    max_nnz : int
        Upper bound of ``nnz(A) + nnz(B)`` under the rule; never above ``density m n``.
    masks : {"global", "row"}
        One threshold per factor, or one per row of each factor (then the indices are
        positions within a row of the assembled factor).
    scope_square, scope_other : {"global", "row", "column"}
        Selection scope of the A-step and B-step sub-problems.
    """

    m: int
    n: int
    k: int
    P: int
    transposed: bool
    density: float
    split: float
    budget_square: int
    budget_other: int
    index_square: int
    index_other: int
    index_init: int
    max_nnz: int
    masks: str = "global"
    scope_square: str = "global"
    scope_other: str = "global"


def resolve_split(split: float | str, m: int, n: int, masks: str = "global") -> float:
    """The square factor's density: 0.16 for square ``W``, 0.25 otherwise, or ``split``.

    For tiny inner dimensions (``min(m, n) < 7`` with the global rule) the reference
    default would leave the square factor without a single entry (the strict rule
    keeps ``floor(split k^2) - 1``); ``"auto"`` then takes the smallest split that keeps
    one, so that the defaults work on every shape with ``min(m, n) >= 2``.
    """
    if isinstance(split, str):
        if split != "auto":
            raise ValueError(f"split must be 'auto' or a float in (0, 1], got {split!r}")
        default = SQUARE_SPLIT if m == n else RECTANGULAR_SPLIT
        k = min(m, n)
        lines = _mask_lines(k, max(m, n), m >= n, masks)
        if k >= 2 and _kept(math.floor(k * k * default), lines[0], lines[1]) < lines[0]:
            return max(default, minimum_split(m, n, masks))
        return default
    return float(split)


def _mask_lines(k: int, P: int, transposed: bool, masks: str) -> tuple[int, int, int, int]:
    """``(lines, length)`` of the square and of the other factor's selection groups."""
    if masks == "global":
        return 1, k * k, 1, k * P
    lines_other, length_other = (P, k) if transposed else (k, P)
    return k, k, lines_other, length_other


def _kept(budget: float, lines: int, length: int) -> int:
    return lines * strict_kept_count(budget / lines, length) if budget >= 1 else 0


def _total_is_valid(total: int, budget_square: int, keep_square: int, lines: tuple) -> bool:
    """Whether ``floor(density m n) = total`` leaves a valid budget for the other factor."""
    budget_other = total - budget_square
    if budget_other < 1:
        return False
    keep_other = _kept(budget_other, lines[2], lines[3])
    return keep_other >= lines[2] and keep_square + keep_other <= total


def _smallest_decimal_at_least(value: float, accepts) -> float:
    """Smallest multiple of ``1/10**4`` that is ``>= value`` and accepted by ``accepts``."""
    candidate = math.ceil(value * 10**4 - 1e-9) / 10**4
    for _ in range(10**4):
        if accepts(candidate):
            return candidate
        candidate = round(candidate + 1e-4, 4)
    return candidate  # pragma: no cover - unreachable for densities in (0, 1]


def minimum_density(m: int, n: int, split: float | str = "auto", masks: str = "global") -> float:
    """Smallest density (to 4 decimals) that :func:`plan_budgets` accepts for the shape.

    Returns ``inf`` when no density works (the split itself is too small or too large).
    """
    split_value = resolve_split(split, m, n, masks)
    k, P = min(m, n), max(m, n)
    lines = _mask_lines(k, P, m >= n, masks)
    budget_square = math.floor(k * k * split_value)
    keep_square = _kept(budget_square, lines[0], lines[1])
    if keep_square < lines[0] or not _total_is_valid(m * n, budget_square, keep_square, lines):
        return math.inf
    low, high = budget_square + 1, m * n  # validity is monotone in the total budget
    while low < high:
        mid = (low + high) // 2
        if _total_is_valid(mid, budget_square, keep_square, lines):
            high = mid
        else:
            low = mid + 1
    return _smallest_decimal_at_least(
        low / (m * n),
        lambda d: _total_is_valid(math.floor(d * m * n), budget_square, keep_square, lines),
    )


def minimum_split(m: int, n: int, masks: str = "global") -> float:
    """Smallest square-factor density (to 4 decimals) that keeps an entry in every group."""
    k, P = min(m, n), max(m, n)
    lines = _mask_lines(k, P, m >= n, masks)
    for budget in range(1, k * k + 1):
        if _kept(budget, lines[0], lines[1]) >= lines[0]:
            return _smallest_decimal_at_least(
                budget / (k * k),
                lambda s: _kept(math.floor(k * k * s), lines[0], lines[1]) >= lines[0],
            )
    return math.inf


def plan_budgets(
    m: int, n: int, density: float, split: float | str = "auto", masks: str = "global"
) -> BudgetPlan:
    """Share ``density * m * n`` nonzeros between the factors, or explain why not.

    Parameters
    ----------
    m, n : int
        Shape of ``W``.
    density : float
        Kept fraction over both factors.
    split : "auto" or float
        Square factor density (see :func:`resolve_split`).
    masks : {"global", "row"}
        ``"global"`` (the reference): one threshold over each factor. ``"row"``: every
        row of the output-side factor ``A_`` and of the input-side factor ``B_`` keeps
        the same number of nonzeros (balanced rows for sparse kernels).

    Raises
    ------
    ValueError
        When the square factor would keep no entry, or when the other factor's 1%
        density floor would push ``nnz(A) + nnz(B)`` over the budget. The message
        states the minimum split or density for the shape (values that are accepted).
    """
    if masks not in ("global", "row"):
        raise ValueError(f"masks must be 'global' or 'row', got {masks!r}")
    split_value = resolve_split(split, m, n, masks)
    k, P = min(m, n), max(m, n)
    transposed = m >= n
    total = density * m * n  # double precision, as the reference code
    budget_square = math.floor(k * k * split_value)
    budget_other = math.floor(total - budget_square)
    lines = _mask_lines(k, P, transposed, masks)
    keep_square = _kept(budget_square, lines[0], lines[1])
    where = " in some rows" if masks == "row" else ""
    if keep_square < lines[0]:
        if k < 2:
            raise ValueError(
                f"a {m}x{n} matrix (1 sample or 1 feature(s)) cannot be factorised: the inner "
                "dimension min(m, n) must be at least 2"
            )
        raise ValueError(
            f"split={split_value:g} leaves the {k}x{k} square factor of a {m}x{n} matrix with no "
            f"nonzero{where} (the selection rule keeps floor(split*k^2) - 1 or floor(split*k^2) "
            f"= {budget_square} entries); use split >= {minimum_split(m, n, masks):.4f}"
        )
    if not _total_is_valid(math.floor(total), budget_square, keep_square, lines):
        lowest = minimum_density(m, n, split_value, masks)
        hint = (
            f"the minimum density is {lowest:.4f}"
            if math.isfinite(lowest)
            else "no density works with this split: lower it"
        )
        raise ValueError(
            f"density={density:g} is too small for a {m}x{n} matrix with split={split_value:g}: "
            f"the square factor takes {budget_square} nonzeros and the other factor keeps at "
            f"least {DENSITY_FLOOR:.0%} of its {k * P} entries{' in every row' if masks == 'row' else ''}; "
            + hint
        )
    if masks == "global":
        scope_square = scope_other = "global"
    else:
        scope_square = "row" if transposed else "column"
        scope_other = "column" if transposed else "row"
    return BudgetPlan(
        m=m,
        n=n,
        k=k,
        P=P,
        transposed=transposed,
        density=float(density),
        split=split_value,
        budget_square=budget_square,
        budget_other=budget_other,
        index_square=strict_threshold_index(budget_square / lines[0], lines[1]),
        index_other=strict_threshold_index(budget_other / lines[2], lines[3]),
        index_init=strict_threshold_index(budget_other / 2, k * P, floor=0.0),
        max_nnz=keep_square + _kept(budget_other, lines[2], lines[3]),
        masks=masks,
        scope_square=scope_square,
        scope_other=scope_other,
    )


def warm_start_weight(t: int, max_iter: int) -> float:
    """Cubic ramp ``min(1, t / (max_iter - 3))^3`` of the warm-start penalty ``rho0``.

    For ``max_iter <= 3`` the ramp is empty and ``rho0 = 1`` from the start.
    """
    ramp = max_iter - 3
    if ramp <= 0:
        return 1.0
    return min(1.0, t / ramp) ** 3


@dataclass
class FactorizationResult:
    """What :func:`double_sparse_factorization` returns.

    Attributes
    ----------
    left : array, shape (m, k)
        Output-side factor ``A`` (``W ~ left @ right``).
    right : array, shape (k, n)
        Input-side factor ``B``.
    n_iter : int
        Outer iterations run.
    errors : list of float
        Relative error of the scaled problem ``||T - A B|| / ||T||`` after each outer
        iteration, where tracked (verbose, callback or convergence check).
    error_before_finalize, error : float
        Relative calibrated error before and after finalisation.
    finalized : bool
        Whether the finalised factor was kept (it is kept only when it does not raise
        the calibrated error).
    plan : BudgetPlan
    counters : SolverCounters
    """

    left: Any
    right: Any
    n_iter: int
    errors: list[float]
    error_before_finalize: float
    error: float
    finalized: bool
    plan: BudgetPlan
    counters: SolverCounters = field(default_factory=SolverCounters)


def _initial_other_factor(engine: Any, target: Any, plan: BudgetPlan) -> Any:
    """Half-budget magnitude prune of ``T`` (the reference initialisation).

    Ties at the threshold are broken by position and at least one entry is kept, so
    tied data (integer weights) or a one-entry budget does not start from an all-zero
    factor, from which the alternation could never leave. Without ties this is the
    reference's strict rule.
    """
    count = plan.k * plan.P - plan.index_init - 1
    return engine.keep_largest(target, max(count, 1))


def _surrogate_error_sq(engine: Any, at: Any, cross_a: Any, gram_a: Any, t_sq: float) -> float:
    """``||T - A B||^2`` from the A-step's ``B T^T`` and ``B B^T`` (with ``at = A^T``)."""
    xp = engine.xp
    fit = float(xp.sum(at * engine.matmul(gram_a, at)))
    return max(t_sq - 2.0 * float(xp.sum(at * cross_a)) + fit, 0.0)


def double_sparse_factorization(
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
    input_scaling: bool,
    finalize: bool,
    finalize_iter: int,
    masks: str,
    track_errors: bool = False,
    callback: Callable[[dict], Any] | None = None,
    verbose: int = 0,
) -> FactorizationResult:
    """Factorise ``W ~ A B`` with ``nnz(A) + nnz(B) <= density * m * n``.

    Parameters
    ----------
    W : array, shape (m, n)
        Validated, finite, floating matrix (rows = outputs, columns = inputs).
    gram : array, shape (n, n), optional
        Calibration Gram ``X^T X``; plain Frobenius problem when omitted.
    engine : ArrayAPIEngine
        Kernels for ``W``'s namespace.
    density, split, max_iter, admm_iter, mask_iter, rho, ridge, input_scaling, \
finalize, finalize_iter, masks
        See :class:`sparsefact.DoubleSparseFactorization` (where their defaults are
        declared; ``DoubleSparseFactorization(...)._solver_options()`` gives them) and
        :func:`plan_budgets`. They are validated by the estimator, not here.
    track_errors : bool
        Record the scaled-problem error after every outer iteration.
    callback : callable, optional
        Called after every outer iteration with a dict (``iteration``, ``error``,
        ``rho0``, ``elapsed``); returning ``True`` stops the alternation early.
    verbose : int
        0 silent, 1 a line every 10 iterations, 2 every iteration.

    Returns
    -------
    FactorizationResult
    """
    xp = engine.xp
    m, n = W.shape
    plan = plan_budgets(m, n, density, split, masks)
    counters = SolverCounters()
    track = track_errors or callback is not None or verbose > 0
    start_time = time.perf_counter()

    scaling = None
    target = W
    if gram is not None and input_scaling:
        scaling = xp.sqrt(engine.diag(gram)) + NORM_EPS
        target = W * scaling[None, :]
    if plan.transposed:
        target = engine.copy(target.T)
    k, P = plan.k, plan.P
    t_sq = float(xp.sum(target * target))

    at = engine.eye(k, target)  # A^T, the square factor
    u_at = engine.zeros((k, k), target)
    b = _initial_other_factor(engine, target, plan)
    u_b = engine.zeros((k, P), target)

    errors: list[float] = []
    n_done = 0
    for t in range(max_iter):
        rho0 = warm_start_weight(t, max_iter)
        # A-step: F = B^T, target T^T, unknown A^T (k x k); mask score |A_ij| ||B_j,:||.
        gram_a = engine.matmul(b, b.T)
        cross_a = engine.matmul(b, target.T)
        counters.add_gram(k, P)
        counters.add_matmul((k, P), k)
        if t > 0 and (track or t == max_iter - 1):
            err = math.sqrt(_surrogate_error_sq(engine, at, cross_a, gram_a, t_sq) / t_sq) if t_sq else 0.0
            if track:
                errors.append(err)
            previous_error = err
        at, u_at = sparse_least_squares(
            engine, gram_a, cross_a, engine.row_norms(b), at, u_at,
            threshold_index=plan.index_square, rho0=rho0, rho=rho, ridge=ridge,
            n_iter=admm_iter, mask_iter=mask_iter, scope=plan.scope_square, counters=counters,
        )
        # B-step: F = A, target T, unknown B (k x P); mask score |B_ij| ||A_:,i||.
        gram_b = engine.matmul(at, at.T)
        cross_b = engine.matmul(at, target)
        counters.add_gram(k, k)
        counters.add_matmul((k, k), P)
        b, u_b = sparse_least_squares(
            engine, gram_b, cross_b, engine.row_norms(at), b, u_b,
            threshold_index=plan.index_other, rho0=rho0, rho=rho, ridge=ridge,
            n_iter=admm_iter, mask_iter=mask_iter, scope=plan.scope_other, counters=counters,
        )
        n_done = t + 1
        stop = False
        if callback is not None or verbose > 0:
            info = {
                "iteration": t,
                "error": errors[-1] if errors else float("nan"),
                "rho0": rho0,
                "elapsed": time.perf_counter() - start_time,
            }
            if verbose > 1 or (verbose == 1 and (t % 10 == 0)):
                progress = (
                    f"scaled error {info['error']:.5f}" if errors else "first iteration done"
                )
                print(
                    f"[DSF] iteration {t + 1}/{max_iter}: {progress}, {info['elapsed']:.1f}s",
                    file=sys.stdout,
                    flush=True,
                )
            if callback is not None and callback(info) is True:
                stop = True
        if stop:
            break

    final_fit = engine.matmul(engine.copy(at.T), b)  # for the error report only
    final_error = math.sqrt(float(xp.sum((target - final_fit) ** 2)) / t_sq) if t_sq else 0.0
    if track:
        errors.append(final_error)
    else:
        errors = [previous_error, final_error] if max_iter > 1 and n_done == max_iter else [final_error]

    # Assemble L (output side) and R (input side) with W ~ L R.
    if plan.transposed:
        left = engine.copy(b.T)
        right = engine.copy(at)
    else:
        left = engine.copy(at.T)
        right = b
    if scaling is not None:
        right = right / scaling[None, :]

    left, error_before, error, finalized = finalize_if_better(
        engine, W, gram, left, right, finalize_iter if finalize else 0, rho, counters
    )
    if verbose > 0:
        print(
            f"[DSF] done: {n_done} iterations, calibrated error {error_before:.5f} -> "
            f"{error:.5f} after finalisation, {time.perf_counter() - start_time:.1f}s",
            file=sys.stdout,
            flush=True,
        )
    return FactorizationResult(
        left=left,
        right=right,
        n_iter=n_done,
        errors=errors,
        error_before_finalize=error_before,
        error=error,
        finalized=finalized,
        plan=plan,
        counters=counters,
    )


def finalize_if_better(
    engine: Any,
    W: Any,
    gram: Any,
    left: Any,
    right: Any,
    n_iter: int,
    rho: float,
    counters: SolverCounters,
) -> tuple[Any, float, float, bool]:
    """Finalise the output-side factor and keep the result only if it lowers the error.

    Returns ``(left, error_before, error, finalized)``; ``n_iter = 0`` skips the step.
    The safeguard is ours: a warm-started ADMM with 20 steps is not guaranteed to
    decrease the objective.
    """
    error_before = relative_error(W, engine.matmul(left, right), gram)
    if n_iter > 0:
        left_new = finalize_output_factor(engine, W, gram, left, right, n_iter, rho, counters)
        error_after = relative_error(W, engine.matmul(left_new, right), gram)
        if error_after <= error_before:
            return left_new, error_before, error_after, True
    return left, error_before, error_before, False


def finalize_output_factor(
    engine: Any,
    W: Any,
    gram: Any,
    left: Any,
    right: Any,
    n_iter: int,
    rho: float,
    counters: SolverCounters | None = None,
) -> Any:
    """Re-fit the output-side factor's values on its support against the full Gram.

    Solves ``min_L tr((W - L R) G (W - L R)^T)`` over ``L`` with ``support(L)`` fixed,
    approximately, by :func:`sparsefact.admm.masked_least_squares` warm-started at the
    current ``L`` (reference/dsf.md §2.5).

    Returns
    -------
    array, shape (m, k)
        The re-fitted ``L`` (a new array).
    """
    k, n = right.shape
    m = W.shape[0]
    right_g = right if gram is None else engine.matmul(right, gram)
    system = engine.matmul(right_g, right.T)
    cross = engine.matmul(right_g, W.T)
    if counters is not None:
        if gram is not None:
            counters.add_matmul((k, n), n)
        counters.add_gram(k, n)
        counters.add_matmul((k, n), m)
    start = engine.copy(left.T)
    mask = start != 0
    left_t = masked_least_squares(
        engine, system, cross, start, mask, n_iter=n_iter, rho=rho, counters=counters
    )
    return engine.copy(left_t.T)


SEARCH_SHARES = (0.2, 1.0 / 3.0, 0.5)


def search_split(
    W: Any,
    gram: Any = None,
    *,
    engine: Any,
    density: float,
    search_iter: int,
    shares: tuple[float, ...] = SEARCH_SHARES,
    **params: Any,
) -> tuple[float, dict[float, float]]:
    """Pick the square factor's density by trying a few shares of the budget.

    The paper leaves open how to split the nonzeros between the two factors (the
    reference code fixes 0.16 / 0.25 of the square factor). Each candidate gives the
    square factor ``share`` of all nonzeros (plus the reference default); each is run
    with a cheap schedule (``search_iter`` outer iterations, no finalisation) and the
    one with the lowest calibrated error wins.

    Parameters
    ----------
    W, gram, engine, density
        As :func:`double_sparse_factorization`.
    shares : tuple of float
        Candidate fractions of the total budget given to the square factor.
    search_iter : int
        Outer iterations of each trial.
    **params
        Other :func:`double_sparse_factorization` arguments (``max_iter``,
        ``finalize``, ``callback`` and ``verbose`` are overridden).

    Returns
    -------
    best_split : float
        Square-factor density with the lowest trial error.
    trials : dict
        ``{split: calibrated error before finalisation}`` for every valid candidate.
    """
    m, n = W.shape
    k = min(m, n)
    candidates = {resolve_split("auto", m, n)}
    for share in shares:
        split = share * density * m * n / (k * k)
        if 0 < split <= 1:
            candidates.add(round(split, 6))
    params = {key: value for key, value in params.items() if key not in ("callback", "verbose")}
    trials: dict[float, float] = {}
    for split in sorted(candidates):
        try:
            plan_budgets(m, n, density, split, params.get("masks", "global"))
        except ValueError:
            continue
        result = double_sparse_factorization(
            W, gram, engine=engine, density=density, split=split,
            **{**params, "max_iter": search_iter, "finalize": False},
        )
        trials[split] = result.error_before_finalize
    if not trials:
        raise ValueError(
            f"split='search' found no valid split for a {m}x{n} matrix at density={density:g}"
        )
    best = min(trials, key=trials.get)
    return best, trials
