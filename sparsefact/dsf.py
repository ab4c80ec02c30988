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

from .admm import (
    NORM_EPS,
    SolverCounters,
    masked_least_squares,
    masked_quadratic_cg,
    sparse_least_squares,
)
from .backends._base import SelectionHint
from .masks import DENSITY_FLOOR, NMPattern, parse_n_m, strict_kept_count, strict_threshold_index
from .metrics import relative_error

SQUARE_SPLIT = 0.16
RECTANGULAR_SPLIT = 0.25
#: With an inner dimension below ``min(m, n)``, ``split="auto"`` gives the small (``k x r``)
#: factor this share of the total budget (measured on the MiniLM layers, docs/variants.md).
LOW_RANK_SHARE = 1.0 / 3.0
N_M_FACTORS = ("both", "A", "B")


@dataclass(frozen=True)
class BudgetPlan:
    """How a density budget is shared between the two factors (reference/dsf.md §1d).

    Attributes
    ----------
    k, P : int
        ``min(m, n)`` and ``max(m, n)``.
    transposed : bool
        True when ``m >= n`` (the square factor then sits on the input side).
    split : float
        Density of the square ``k x k`` factor (of the ``k x r`` factor when the inner
        dimension ``r`` is below ``k``).
    budget_square, budget_other : int
        ``floor(split k r)`` and ``floor(density m n - budget_square)`` (an N:M factor's
        budget is what its pattern keeps, the other factor gets the rest).
    index_square, index_other, index_init : int
        Threshold positions of the strict selection rule for the square factor, the
        other factor, and the half-budget initial prune of the other factor.
    max_nnz : int
        Upper bound of ``nnz(A) + nnz(B)`` under the rule; never above ``density m n``.
    masks : {"global", "row"}
        One threshold per factor, or one per row of each factor (then the indices are
        positions within a row of the assembled factor).
    scope_square, scope_other : {"global", "row", "column"} or NMPattern
        Selection scope of the A-step (unknown ``S^T``, ``r x k``) and B-step (unknown
        ``r x P``) sub-problems; an :class:`~sparsefact.masks.NMPattern` for an N:M factor.
    r : int
        Inner dimension (``k`` in the reference).
    n_m : tuple (N, M) or None
        The N:M pattern, and ``n_m_factors`` the factors it applies to.
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
    scope_square: str | NMPattern = "global"
    scope_other: str | NMPattern = "global"
    r: int = 0
    n_m: tuple[int, int] | None = None
    n_m_factors: str = "both"

    @property
    def pattern_square(self) -> NMPattern | None:
        """The N:M pattern of the A-step's unknown ``S^T`` (``r x k``), if any."""
        return self.scope_square if isinstance(self.scope_square, NMPattern) else None

    @property
    def pattern_other(self) -> NMPattern | None:
        """The N:M pattern of the B-step's unknown (``r x P``), if any."""
        return self.scope_other if isinstance(self.scope_other, NMPattern) else None


def _inner(inner_dim: int | None, m: int, n: int) -> int:
    return min(m, n) if inner_dim is None else int(inner_dim)


def resolve_split(
    split: float | str,
    m: int,
    n: int,
    masks: str = "global",
    inner_dim: int | None = None,
    density: float | None = None,
) -> float:
    """The square factor's density: 0.16 for square ``W``, 0.25 otherwise, or ``split``.

    For tiny inner dimensions (``min(m, n) < 7`` with the global rule) the reference
    default would leave the square factor without a single entry (the strict rule
    keeps ``floor(split k^2) - 1``); ``"auto"`` then takes the smallest split that keeps
    one, so that the defaults work on every shape with ``min(m, n) >= 2``.

    With an inner dimension ``r < min(m, n)`` (and ``density`` given), ``"auto"`` gives
    the ``k x r`` factor :data:`LOW_RANK_SHARE` of the total budget.
    """
    if isinstance(split, str):
        if split != "auto":
            raise ValueError(f"split must be 'auto' or a float in (0, 1], got {split!r}")
        k = min(m, n)
        r = _inner(inner_dim, m, n)
        if r < k and density is not None:
            share = LOW_RANK_SHARE * density * m * n / (k * r)
            return min(1.0, max(share, minimum_split(m, n, masks, r)))
        default = SQUARE_SPLIT if m == n else RECTANGULAR_SPLIT
        lines = _mask_lines(k, max(m, n), m >= n, masks)
        if k >= 2 and _kept(math.floor(k * k * default), lines[0], lines[1]) < lines[0]:
            return max(default, minimum_split(m, n, masks))
        return default
    return float(split)


def _mask_lines(
    k: int, P: int, transposed: bool, masks: str, r: int | None = None
) -> tuple[int, int, int, int]:
    """``(lines, length)`` of the square (``k x r``) and of the other (``r x P``) factor's groups."""
    r = k if r is None else r
    if masks == "global":
        return 1, k * r, 1, r * P
    # Rows of the output-side factor A_ and of the input-side factor B_ (docs/algorithm.md §2).
    lines_square, length_square = (r, k) if transposed else (k, r)
    lines_other, length_other = (P, r) if transposed else (r, P)
    return lines_square, length_square, lines_other, length_other


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


def minimum_density(
    m: int, n: int, split: float | str = "auto", masks: str = "global", inner_dim: int | None = None
) -> float:
    """Smallest density (to 4 decimals) that :func:`plan_budgets` accepts for the shape.

    Returns ``inf`` when no density works (the split itself is too small or too large).
    ``split`` must be a number when ``inner_dim`` is below ``min(m, n)``.
    """
    split_value = resolve_split(split, m, n, masks, inner_dim)
    k, P = min(m, n), max(m, n)
    r = _inner(inner_dim, m, n)
    lines = _mask_lines(k, P, m >= n, masks, r)
    budget_square = math.floor(k * r * split_value)
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


def minimum_split(m: int, n: int, masks: str = "global", inner_dim: int | None = None) -> float:
    """Smallest square-factor density (to 4 decimals) that keeps an entry in every group."""
    k, P = min(m, n), max(m, n)
    r = _inner(inner_dim, m, n)
    lines = _mask_lines(k, P, m >= n, masks, r)
    for budget in range(1, k * r + 1):
        if _kept(budget, lines[0], lines[1]) >= lines[0]:
            return _smallest_decimal_at_least(
                budget / (k * r),
                lambda s: _kept(math.floor(k * r * s), lines[0], lines[1]) >= lines[0],
            )
    return math.inf


def factor_patterns(
    m: int, n: int, r: int, n_m: tuple[int, int] | None, n_m_factors: str
) -> tuple[NMPattern | None, NMPattern | None]:
    """N:M patterns of the A-step unknown ``S^T`` (``r x k``) and of the B-step unknown (``r x P``).

    The groups run along each factor's reduction dimension: along the rows of the
    output-side ``A_`` (``m x r``, groups within ``r``) and of the input-side ``B_``
    (``r x n``, groups within ``n``). ``A_`` is ``S`` (wide ``W``) or the other factor's
    transpose (tall or square ``W``), which decides the axis in the alternation's
    coordinates.

    Raises
    ------
    ValueError
        When a grouped dimension is not a multiple of ``M``.
    """
    if n_m is None:
        return None, None
    if n_m_factors not in N_M_FACTORS:
        raise ValueError(f"n_m_factors must be one of {N_M_FACTORS}, got {n_m_factors!r}")
    keep, group = n_m
    transposed = m >= n
    on_a = n_m_factors in ("both", "A")
    on_b = n_m_factors in ("both", "B")
    if on_a and r % group:
        raise ValueError(
            f"n_m={tuple(n_m)} on the output-side factor A (m x r) needs the inner dimension r "
            f"to be a multiple of M={group}, got r={r}"
        )
    if on_b and n % group:
        raise ValueError(
            f"n_m={tuple(n_m)} on the input-side factor B (r x n) needs the number of columns "
            f"of W ({n}) to be a multiple of M={group}"
        )
    square = other = None
    if transposed:  # A_ = (other)^T, B_ = S^T
        if on_a:
            other = NMPattern(keep, group, 0)
        if on_b:
            square = NMPattern(keep, group, 1)
    else:  # A_ = S = (S^T)^T, B_ = other
        if on_a:
            square = NMPattern(keep, group, 0)
        if on_b:
            other = NMPattern(keep, group, 1)
    return square, other


def plan_budgets(
    m: int,
    n: int,
    density: float,
    split: float | str = "auto",
    masks: str = "global",
    inner_dim: int | None = None,
    n_m: tuple[int, int] | None = None,
    n_m_factors: str = "both",
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
    inner_dim : int or None
        Inner dimension ``r`` of ``A_ (m x r) @ B_ (r x n)``; ``None`` is the reference
        ``min(m, n)``. With ``r < min(m, n)`` the "square" factor is ``min(m, n) x r``.
    n_m : tuple (N, M) or None
        N:M sparsity of the factors named by ``n_m_factors`` (``"both"``, ``"A"`` or
        ``"B"``); an N:M factor's budget is what its pattern keeps (``N/M`` of its
        entries), the other factor (if unstructured) gets the rest.

    Raises
    ------
    ValueError
        When the square factor would keep no entry, or when the other factor's 1%
        density floor would push ``nnz(A) + nnz(B)`` over the budget. The message
        states the minimum split or density for the shape (values that are accepted).
    """
    if masks not in ("global", "row"):
        raise ValueError(f"masks must be 'global' or 'row', got {masks!r}")
    k, P = min(m, n), max(m, n)
    r = _inner(inner_dim, m, n)
    if not r >= 1:
        raise ValueError(f"inner_dim must be a positive integer, got {inner_dim!r}")
    n_m = parse_n_m(n_m)
    if n_m is not None and masks != "global":
        raise ValueError("n_m and masks='row' cannot be combined (an N:M pattern already balances rows)")
    pattern_square, pattern_other = factor_patterns(m, n, r, n_m, n_m_factors)
    if pattern_square is not None or pattern_other is not None:
        return _plan_with_patterns(m, n, r, density, split, pattern_square, pattern_other, n_m, n_m_factors)
    split_value = resolve_split(split, m, n, masks, r, density)
    transposed = m >= n
    total = density * m * n  # double precision, as the reference code
    budget_square = math.floor(k * r * split_value)
    budget_other = math.floor(total - budget_square)
    lines = _mask_lines(k, P, transposed, masks, r)
    keep_square = _kept(budget_square, lines[0], lines[1])
    where = " in some rows" if masks == "row" else ""
    shape_square = f"{k}x{k} square" if r == k else f"{k}x{r}"
    if keep_square < lines[0]:
        if k < 2:
            raise ValueError(
                f"a {m}x{n} matrix (1 sample or 1 feature(s)) cannot be factorised: the inner "
                "dimension min(m, n) must be at least 2"
            )
        raise ValueError(
            f"split={split_value:g} leaves the {shape_square} factor of a {m}x{n} matrix with no "
            f"nonzero{where} (the selection rule keeps floor(split*k^2) - 1 or floor(split*k^2) "
            f"= {budget_square} entries); use split >= {minimum_split(m, n, masks, r):.4f}"
        )
    if not _total_is_valid(math.floor(total), budget_square, keep_square, lines):
        lowest = minimum_density(m, n, split_value, masks, r)
        hint = (
            f"the minimum density is {lowest:.4f}"
            if math.isfinite(lowest)
            else "no density works with this split: lower it"
        )
        raise ValueError(
            f"density={density:g} is too small for a {m}x{n} matrix with split={split_value:g}"
            f"{'' if r == k else f' and inner_dim={r}'}: "
            f"the square factor takes {budget_square} nonzeros and the other factor keeps at "
            f"least {DENSITY_FLOOR:.0%} of its {r * P} entries{' in every row' if masks == 'row' else ''}; "
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
        index_init=strict_threshold_index(budget_other / 2, r * P, floor=0.0),
        max_nnz=keep_square + _kept(budget_other, lines[2], lines[3]),
        masks=masks,
        scope_square=scope_square,
        scope_other=scope_other,
        r=r,
    )


def _plan_with_patterns(
    m: int,
    n: int,
    r: int,
    density: float,
    split: float | str,
    pattern_square: NMPattern | None,
    pattern_other: NMPattern | None,
    n_m: tuple[int, int],
    n_m_factors: str,
) -> BudgetPlan:
    """:func:`plan_budgets` when one or both factors are N:M (global rule for the other)."""
    k, P = min(m, n), max(m, n)
    total = math.floor(density * m * n)
    kept_square = pattern_square.kept((r, k)) if pattern_square is not None else None
    kept_other = pattern_other.kept((r, P)) if pattern_other is not None else None
    fixed = (kept_square or 0) + (kept_other or 0)
    if fixed > total:
        raise ValueError(
            f"density={density:g} is too small for n_m={tuple(n_m)} on {n_m_factors} with inner_dim={r} "
            f"for a {m}x{n} matrix: the N:M factors keep {fixed} entries, more than the budget "
            f"floor(density*m*n) = {total}; lower inner_dim "
            f"(at most {max_n_m_inner_dim(m, n, density, n_m, n_m_factors)})"
        )
    if kept_square is not None and kept_other is not None:
        budget_square, budget_other = kept_square, kept_other
        index_square = index_other = -1
        max_nnz = fixed
    else:
        numel_free = r * P if kept_other is None else k * r
        free = total - fixed
        free_kept = strict_kept_count(free, numel_free)
        if free < 1 or free_kept < 1 or fixed + free_kept > total:
            raise ValueError(
                f"density={density:g} leaves {free} nonzeros for the unstructured factor "
                f"({numel_free} entries) next to the N:M factor ({fixed} entries) of a {m}x{n} matrix "
                f"with inner_dim={r}: it must keep at least {DENSITY_FLOOR:.0%} of its entries; "
                "lower inner_dim or raise density"
            )
        index_free = strict_threshold_index(free, numel_free)
        if kept_square is None:
            budget_square, budget_other = free, kept_other
            index_square, index_other = index_free, -1
        else:
            budget_square, budget_other = kept_square, free
            index_square, index_other = -1, index_free
        max_nnz = fixed + free_kept
    return BudgetPlan(
        m=m,
        n=n,
        k=k,
        P=P,
        transposed=m >= n,
        density=float(density),
        split=budget_square / (k * r),
        budget_square=budget_square,
        budget_other=budget_other,
        index_square=index_square,
        index_other=index_other,
        index_init=strict_threshold_index(budget_other / 2, r * P, floor=0.0),
        max_nnz=max_nnz,
        masks="global",
        scope_square=pattern_square if pattern_square is not None else "global",
        scope_other=pattern_other if pattern_other is not None else "global",
        r=r,
        n_m=tuple(n_m),
        n_m_factors=n_m_factors,
    )


def max_n_m_inner_dim(
    m: int, n: int, density: float, n_m: tuple[int, int], n_m_factors: str
) -> int:
    """Largest inner dimension whose N:M factors fit in ``floor(density m n)`` (0 if none).

    With both factors N:M the budget ``N/M r (m + n)`` grows with ``r``, so the largest
    ``r`` (a multiple of ``M``, at most ``min(m, n)``) is the natural choice. With one N:M
    factor, the other needs at least one entry as well.
    """
    keep, group = parse_n_m(n_m)
    total = math.floor(density * m * n)
    k = min(m, n)
    step = group if n_m_factors in ("both", "A") else 1
    best = 0
    for r in range(step, k + 1, step):
        fixed = 0
        if n_m_factors in ("both", "A"):
            fixed += (m * r // group) * keep
        if n_m_factors in ("both", "B"):
            fixed += (r * n // group) * keep
        if fixed + (0 if n_m_factors == "both" else 1) <= total:
            best = r
    return best


def _is_row_major(a: Any) -> bool:
    """Whether ``a`` is a C-contiguous NumPy array (other namespaces: treated as not)."""
    flags = getattr(a, "flags", None)
    return bool(flags is not None and getattr(flags, "c_contiguous", False))


def warm_start_weight(t: int, max_iter: int) -> float:
    """Cubic ramp ``min(1, t / (max_iter - 3))^3`` of the warm-start penalty ``rho0``.

    For ``max_iter <= 3`` the ramp is empty and ``rho0 = 1`` from the start.
    """
    ramp = max_iter - 3
    if ramp <= 0:
        return 1.0
    return min(1.0, t / ramp) ** 3


@dataclass
class AlternationState:
    """The carried state of the alternation (to continue it): ``S^T``, ``B`` and their duals.

    Attributes
    ----------
    at, u_at : arrays, shape (r, k)
        The square factor ``S^T`` and its scaled dual.
    b, u_b : arrays, shape (r, P)
        The other factor and its scaled dual (in the input-scaled coordinates).
    """

    at: Any
    u_at: Any
    b: Any
    u_b: Any


@dataclass
class FactorizationResult:
    """What :func:`double_sparse_factorization` returns.

    Attributes
    ----------
    left : array, shape (m, r)
        Output-side factor ``A`` (``W ~ left @ right``).
    right : array, shape (r, n)
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
    state : AlternationState or None
        The alternation's final state (before finalisation), to continue it.
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
    state: AlternationState | None = None


def _initial_other_factor(engine: Any, target: Any, plan: BudgetPlan) -> Any:
    """Half-budget magnitude prune of ``T`` (the reference initialisation).

    Ties at the threshold are broken by position and at least one entry is kept, so
    tied data (integer weights) or a one-entry budget does not start from an all-zero
    factor, from which the alternation could never leave. Without ties this is the
    reference's strict rule. An N:M factor starts from the N:M projection of ``T``.
    """
    pattern = plan.pattern_other
    if pattern is not None:
        keep = pattern.mask(engine, engine.xp.abs(target))
        return engine.xp.where(keep, target, engine.xp.zeros_like(target))
    count = target.shape[0] * target.shape[1] - plan.index_init - 1
    return engine.keep_largest(target, max(count, 1))


def initial_state(engine: Any, target: Any, plan: BudgetPlan) -> tuple[Any, Any]:
    """``(S^T, B)`` to start the alternation from.

    With ``r = k`` (the reference): ``S = I`` and ``B`` the half-budget prune of ``T``.
    With ``r < k``: the leading ``r`` singular directions, ``S^T = U_r^T`` and ``B`` the
    half-budget prune of ``diag(s_r) V_r^T`` (the first A-step re-fits ``S`` from ``B``
    anyway; ``S^T`` only matters through the warm start when ``max_iter <= 3``).
    """
    k, r = plan.k, plan.r
    if r >= k:
        return engine.eye(k, target), _initial_other_factor(engine, target, plan)
    u, s, vh = engine.svd(target)
    at = engine.copy(u[:, :r].T)
    leading = engine.copy(vh[:r, :] * s[:r, None])
    return at, _initial_other_factor(engine, leading, plan)


def state_from_factors(
    engine: Any, factors: tuple[Any, Any], plan: BudgetPlan, scaling: Any
) -> AlternationState:
    """The alternation's state for given factors ``W ~ left @ right`` (zero duals).

    The inverse of how :func:`double_sparse_factorization` assembles its result: the input-side
    factor is multiplied back by the input scaling ``sqrt(diag G)`` (``scaling``, or None) and,
    for ``m >= n`` (transposed problem), ``S^T = right`` and ``B = left^T``; otherwise
    ``S^T = left^T`` and ``B = right``.

    Raises
    ------
    ValueError
        When the shapes do not match the plan (``(m, r)`` and ``(r, n)``).
    """
    left, right = factors
    m, n, r = plan.m, plan.n, plan.r
    if tuple(left.shape) != (m, r) or tuple(right.shape) != (r, n):
        raise ValueError(
            f"init_factors must have shapes ({m}, {r}) and ({r}, {n}) for this fit, got "
            f"{tuple(left.shape)} and {tuple(right.shape)}"
        )
    scaled = right if scaling is None else right * scaling[None, :]
    at, b = (scaled, left.T) if plan.transposed else (left.T, scaled)
    at, b = engine.copy(at), engine.copy(b)
    return AlternationState(at=at, u_at=engine.zeros(tuple(at.shape), at), b=b,
                            u_b=engine.zeros(tuple(b.shape), b))


def _surrogate_error_sq(engine: Any, at: Any, cross_a: Any, gram_a: Any, t_sq: float) -> float:
    """``||T - A B||^2`` from the A-step's ``B T^T`` and ``B B^T`` (with ``at = A^T``)."""
    xp = engine.xp
    fit = float(xp.sum(at * engine.matmul(gram_a, at)))
    return max(t_sq - 2.0 * float(xp.sum(at * cross_a)) + fit, 0.0)


def share_split(
    m: int, n: int, density: float, r: int, masks: str = "global", share: float = LOW_RANK_SHARE
) -> float:
    """Square-factor density that gives the ``k x r`` factor ``share`` of the budget (at least
    the minimum split, at most 1)."""
    k = min(m, n)
    return min(1.0, max(share * density * m * n / (k * r), minimum_split(m, n, masks, r)))


def resolve_shape(
    m: int,
    n: int,
    density: float,
    inner_dim: int | str | None,
    split: float | str = "auto",
    masks: str = "global",
    n_m: tuple[int, int] | None = None,
    n_m_factors: str = "both",
) -> tuple[int, float | str]:
    """The inner dimension ``r`` and split a fit uses (a rule, no trial fits).

    An integer ``inner_dim`` is checked (``1 <= r <= min(m, n)``) and ``split`` kept.
    ``"auto"`` (or ``None``):

    - both factors N:M: the largest ``r`` whose patterns fit the budget
      (:func:`max_n_m_inner_dim`);
    - one factor N:M: the largest ``r`` at which the N:M factor keeps at most half the
      budget;
    - otherwise the reference, ``r = min(m, n)`` with ``split``, where that plan is valid;
    - else (below the reference's minimum density) ``r = min(m, n)`` with the square
      factor holding :data:`LOW_RANK_SHARE` of the budget (``split="auto"``), and if even
      that is invalid, ``r`` halved until a plan is valid. Measured on the MiniLM layers
      at densities 0.02-0.2 (docs/variants.md): ``r = min(m, n)`` with a third of the
      budget in the square factor beat ``r = k/2`` and ``k/4`` at 0.05-0.2, and all were
      within 1% at 0.02.

    Raises
    ------
    ValueError
        When no inner dimension gives a valid budget, or the split (not the density) is
        what makes the reference plan invalid.
    """
    k = min(m, n)
    if inner_dim not in (None, "auto"):
        r = int(inner_dim)
        if not 1 <= r <= k:
            raise ValueError(f"inner_dim must be in [1, min(m, n)] = [1, {k}], got {inner_dim!r}")
        return r, split
    n_m = parse_n_m(n_m)
    if n_m is not None:
        factor_patterns(m, n, n_m[1], n_m, n_m_factors)  # divisibility of n, the factor names
        if n_m_factors == "both":
            r = max_n_m_inner_dim(m, n, density, n_m, n_m_factors)
        else:
            r = _one_n_m_inner_dim(m, n, density, n_m, n_m_factors)
        if r < 1:
            raise ValueError(
                f"density={density:g} is too small for n_m={n_m} on {n_m_factors} of a {m}x{n} "
                f"matrix: even inner_dim={n_m[1]} exceeds the budget"
            )
        return r, split
    try:
        plan_budgets(m, n, density, split, masks)
        return k, split
    except ValueError as exc:
        # Only a budget too small for the reference shape calls for another shape; a split
        # that leaves the square factor empty (or k = 1) is the caller's to fix.
        if "is too small" not in str(exc):
            raise
        first_error = exc
    r = k
    while r >= 1:
        candidate = share_split(m, n, density, r, masks) if split == "auto" else split
        try:
            plan_budgets(m, n, density, candidate, masks, r)
            return r, candidate
        except ValueError:
            r = r // 2 if r > 1 else 0
    raise ValueError(
        f"{first_error}; no smaller inner dimension helps either (each factor must keep at "
        f"least {DENSITY_FLOOR:.0%} of its entries and one per selection group)"
    )


def _one_n_m_inner_dim(m: int, n: int, density: float, n_m: tuple[int, int], n_m_factors: str) -> int:
    """Largest ``r`` (a multiple of ``M`` for an N:M ``A_``) whose N:M factor keeps at most
    half of ``floor(density m n)`` and leaves a valid budget to the other factor."""
    keep, group = n_m
    total = math.floor(density * m * n)
    step = group if n_m_factors == "A" else 1
    for r in range((min(m, n) // step) * step, 0, -step):
        fixed = (m * r // group) * keep if n_m_factors == "A" else (r * n // group) * keep
        if 2 * fixed > total:
            continue
        try:
            plan_budgets(m, n, density, "auto", "global", r, n_m, n_m_factors)
            return r
        except ValueError:
            continue
    return 0


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
    inner_dim: int | str | None = None,
    n_m: tuple[int, int] | None = None,
    n_m_factors: str = "both",
    start: AlternationState | tuple[Any, Any] | None = None,
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
finalize, finalize_iter, masks, inner_dim, n_m, n_m_factors
        See :class:`sparsefact.DoubleSparseFactorization` (where their defaults are
        declared; ``DoubleSparseFactorization(...)._solver_options()`` gives them) and
        :func:`plan_budgets`. They are validated by the estimator, not here.
        ``inner_dim`` ``"auto"``/``None`` is resolved (with the split) by :func:`resolve_shape`.
    start : AlternationState, optional
        Restart from this state (of a previous result with the same plan) instead of the
        identity/magnitude start; the ``rho0`` ramp runs again from 0, so the first
        A-step re-fits ``S`` from the carried ``B`` (``preset="quality"`` restarts the
        reference's result with a smaller ``rho``). A pair ``(left, right)`` of factors
        (shapes ``(m, r)`` and ``(r, n)``, e.g. fine-tuned ones) is a warm start from their
        values and supports (:func:`state_from_factors`); the first selections re-choose the
        supports within the budget, so the pair may be denser than it.
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
    r, split = resolve_shape(m, n, density, inner_dim, split, masks, n_m, n_m_factors)
    plan = plan_budgets(m, n, density, split, masks, r, n_m, n_m_factors)
    counters = SolverCounters()
    track = track_errors or callback is not None or verbose > 0
    start_time = time.perf_counter()

    scaling = None
    target = W
    if gram is not None and input_scaling:
        scaling = xp.sqrt(engine.diag(gram)) + NORM_EPS
        target = W * scaling[None, :]
    # T (k x P) and T^T (P x k), both row-major: the A-step's cross term B T^T read from a
    # transposed view ran at 0.64 of the GEMM rate against 0.91 from a row-major copy
    # (384 x 1536 times 1536 x 384, float32, 2 threads).
    if plan.transposed:
        target_t = target if _is_row_major(target) else engine.copy(target)
        target = engine.copy(target.T)
    else:
        target_t = engine.copy(target.T)
    k, P = plan.k, plan.P
    t_sq = float(xp.sum(target * target))

    if start is not None and not isinstance(start, AlternationState):
        start = state_from_factors(engine, start, plan, scaling)
    if start is None:
        at, b = initial_state(engine, target, plan)  # A^T (r x k), the square factor; B (r x P)
        u_at = engine.zeros((r, k), target)
        u_b = engine.zeros((r, P), target)
    else:
        at, u_at, b, u_b = (engine.copy(a) for a in (start.at, start.u_at, start.b, start.u_b))

    errors: list[float] = []
    n_done = 0
    previous_error = math.nan
    # one per re-selecting ADMM iteration of each sub-problem, carried across outer iterations
    hints_a = [SelectionHint() for _ in range(mask_iter)]
    hints_b = [SelectionHint() for _ in range(mask_iter)]
    for t in range(max_iter):
        rho0 = warm_start_weight(t, max_iter)
        # A-step: F = B^T, target T^T, unknown A^T (r x k); mask score |A_ij| ||B_j,:||.
        gram_a = engine.matmul(b, b.T)
        cross_a = engine.matmul(b, target_t)
        counters.add_gram(r, P)
        counters.add_matmul((r, P), k)
        if t > 0 and (track or t == max_iter - 1):
            err = math.sqrt(_surrogate_error_sq(engine, at, cross_a, gram_a, t_sq) / t_sq) if t_sq else 0.0
            if track:
                errors.append(err)
            previous_error = err
        at, u_at = sparse_least_squares(
            engine, gram_a, cross_a, engine.row_norms(b), at, u_at,
            threshold_index=plan.index_square, rho0=rho0, rho=rho, ridge=ridge,
            n_iter=admm_iter, mask_iter=mask_iter, scope=plan.scope_square, counters=counters,
            hints=hints_a,
        )
        # B-step: F = A, target T, unknown B (r x P); mask score |B_ij| ||A_:,i||.
        gram_b = engine.matmul(at, at.T)
        cross_b = engine.matmul(at, target)
        counters.add_gram(r, k)
        counters.add_matmul((r, k), P)
        b, u_b = sparse_least_squares(
            engine, gram_b, cross_b, engine.row_norms(at), b, u_b,
            threshold_index=plan.index_other, rho0=rho0, rho=rho, ridge=ridge,
            n_iter=admm_iter, mask_iter=mask_iter, scope=plan.scope_other, counters=counters,
            hints=hints_b,
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

    state = AlternationState(at=at, u_at=u_at, b=b, u_b=u_b)
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
        state=state,
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
        ``finalize``, ``callback`` and ``verbose`` are overridden; ``split`` is ignored).

    Returns
    -------
    best_split : float
        Square-factor density with the lowest trial error.
    trials : dict
        ``{split: calibrated error before finalisation}`` for every valid candidate.
    """
    m, n = W.shape
    k = min(m, n)
    masks = params.get("masks", "global")
    n_m, n_m_factors = params.get("n_m"), params.get("n_m_factors", "both")
    r, auto_split = resolve_shape(m, n, density, params.get("inner_dim"), "auto", masks, n_m, n_m_factors)
    candidates = {resolve_split(auto_split, m, n, masks, r, density)}
    for share in shares:
        split = share * density * m * n / (k * r)
        if 0 < split <= 1:
            candidates.add(round(split, 6))
    dropped = ("callback", "verbose", "split", "inner_dim")
    params = {key: value for key, value in params.items() if key not in dropped}
    trials: dict[float, float] = {}
    for split in sorted(candidates):
        try:
            plan_budgets(m, n, density, split, masks, r, n_m, n_m_factors)
        except ValueError:
            continue
        result = double_sparse_factorization(
            W, gram, engine=engine, density=density, split=split, inner_dim=r,
            **{**params, "max_iter": search_iter, "finalize": False},
        )
        trials[split] = result.error_before_finalize
    if not trials:
        raise ValueError(
            f"split='search' found no valid split for a {m}x{n} matrix at density={density:g}"
        )
    best = min(trials, key=trials.get)
    return best, trials


# ---------------------------------------------------------------------- beyond the reference
def single_sparse_candidate(
    engine: Any,
    W: Any,
    gram: Any,
    *,
    budget: int,
    pruners: str = "magnitude",
    rows: bool = False,
    pattern: NMPattern | None = None,
    refit_iter: int = 20,
) -> tuple[Any, Any, float]:
    """``A = I``, ``B = pruned W``: the single-sparse matrix as a double sparse factorisation.

    With ``k = min(m, n)``, the identity takes ``k`` nonzeros and the pruned ``W`` keeps
    ``budget - k`` (so ``nnz <= budget``). ``pruners="magnitude"`` prunes by magnitude;
    ``"calibrated"`` also tries the Wanda mask ``|W_ij| sqrt(G_jj)`` with its values
    re-fitted (20 ADMM steps from the pruned values) against the full Gram (the masked
    least squares of ADMM pruning, :func:`sparsefact.admm.masked_least_squares`) and
    returns the prune with the lowest calibrated error. ``rows=True`` keeps the same
    number of entries in every row (for ``masks="row"``); an N:M ``pattern`` (on the
    pruned ``W``, groups along its rows) is applied before the budget.

    Returns
    -------
    left, right : arrays
        ``(I_m, W_pruned)`` for ``m < n``, ``(W_pruned, I_n)`` otherwise; ``(None, None)``
        when the budget has no room beyond the identity.
    error : float
        Calibrated error of the returned prune (``inf`` without room).
    """
    xp = engine.xp
    m, n = W.shape
    k = min(m, n)
    kept = budget - k
    per_row = kept // m
    if kept < 1 or (rows and per_row < 1):
        return None, None, math.inf
    zero = xp.zeros_like(W)

    def prune(scores: Any) -> Any:
        allowed = None
        if pattern is not None:
            allowed = pattern.mask(engine, scores)
            scores = xp.where(allowed, scores, xp.zeros_like(scores) - 1.0)
        top = engine.row_topk_mask(scores, per_row) if rows else engine.topk_mask(scores, kept)
        if allowed is not None:
            top = top & allowed
        return xp.where(top, W, zero)

    candidates = [prune(xp.abs(W))]
    if pruners == "calibrated" and gram is not None and len(gram.shape) == 2:
        scale = xp.sqrt(xp.clip(engine.diag(gram), 0.0, None))
        wanda = prune(xp.abs(W) * scale[None, :])
        # the rows of W decouple: min_v (w - v) G (w - v)^T over v on the row's support
        cross = engine.matmul(gram, W.T)
        mask_t = engine.copy((wanda != 0).T)
        refit = masked_least_squares(
            engine, engine.copy(gram), cross, engine.copy(wanda.T), mask_t, n_iter=refit_iter, rho=1.0
        )
        candidates.append(engine.copy(refit.T))
    best, best_error = candidates[0], math.inf
    for pruned in candidates:
        error = relative_error(W, pruned, gram)
        if error < best_error:
            best, best_error = pruned, error
    eye = engine.eye(k, W)
    return (eye, best, best_error) if m < n else (best, eye, best_error)


def refit_both_factors(
    engine: Any,
    W: Any,
    gram: Any,
    left: Any,
    right: Any,
    *,
    rounds: int,
    cg_iter: int,
    damping: float,
) -> tuple[Any, Any]:
    """Re-fit the values of both factors on their supports against the (damped) full Gram.

    Alternates the exact masked least squares of the output-side factor ``L`` (``R``
    fixed) and of the input-side factor ``R`` (``L`` fixed) -- the latter a
    Sylvester-type system -- each by :func:`sparsefact.admm.masked_quadratic_cg`. The
    metric is ``G + damping * mean(diag G) I`` (a ridge towards the dense ``W``, as
    ADMM pruning's ``percdamp``); ``G = I`` without calibration. Supports never change.

    Returns
    -------
    left, right : arrays
        New arrays (the inputs are not modified).
    """
    xp = engine.xp
    n = W.shape[1]
    metric = engine.eye(n, W) if gram is None else engine.copy(gram)
    if damping > 0:
        metric = engine.add_to_diagonal(metric, damping * float(xp.mean(engine.diag(metric))))
    mask_left_t = engine.copy((left != 0).T)
    mask_right = right != 0
    left_t = engine.copy(left.T)
    right = engine.copy(right)
    w_metric = engine.matmul(W, metric)  # W G (m x n)
    for _ in range(rounds):
        right_g = engine.matmul(right, metric)
        left_t = masked_quadratic_cg(
            engine, engine.matmul(right_g, right.T), None, engine.matmul(right, w_metric.T),
            left_t, mask_left_t, n_iter=cg_iter,
        )
        left_gram = engine.matmul(left_t, left_t.T)
        right = masked_quadratic_cg(
            engine, left_gram, metric, engine.matmul(left_t, w_metric), right, mask_right,
            n_iter=cg_iter,
        )
    return engine.copy(left_t.T), right
