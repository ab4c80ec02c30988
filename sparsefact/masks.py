"""Sparsity projections: how many entries a budget keeps and which ones.

One module for every mask rule of the toolkit:

- :func:`strict_threshold_index` / :func:`strict_kept_count`: the DSF reference rule
  (Boža & Macko 2024, official code): the threshold is the value at 0-based position
  ``floor(q * numel)`` of ``sort(|x|)`` with ``q = min(0.99, 1 - budget / numel)``, and
  the entries strictly above it are kept. It keeps ``budget`` or ``budget - 1`` entries
  (float rounding decides) and never less than ~1% of the matrix.
- :func:`global_topk_mask`, :func:`row_topk_mask`, :func:`n_m_mask`: exact top-k masks
  (ties broken by position) for the pruning baselines.
- :class:`NMPattern`, :func:`n_m_mask_along`, :func:`satisfies_n_m`: N:M groups along
  either axis of a factor (DSF's ``n_m=``: each factor keeps at most ``N`` of every ``M``
  consecutive entries along its reduction dimension, the layout of sparse tensor cores).

Selection uses partial selection (``argpartition`` or the engine's radix select),
never a full sort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any

DENSITY_FLOOR = 0.01


def strict_threshold_index(budget: float, numel: int, floor: float = DENSITY_FLOOR) -> int:
    """0-based position in ``sort(|x|)`` of the threshold for keeping ``budget`` entries.

    Parameters
    ----------
    budget : float
        Number of entries the factor may keep (may be fractional, as in the reference
        code's half-budget initial prune).
    numel : int
        Number of entries of the factor.
    floor : float, default=0.01
        Minimum kept fraction (the reference clamps ``q`` at ``1 - floor``); ``0``
        disables the clamp.

    Returns
    -------
    int
        ``floor(q * numel)`` with ``q = min(1 - floor, 1 - budget / numel)`` computed in
        double precision, clipped to ``[0, numel - 1]``.
    """
    q = 1.0 - float(budget) / float(numel)
    if floor > 0:
        q = min(1.0 - floor, q)
    return int(min(max(math.floor(q * numel), 0), numel - 1))


def strict_kept_count(budget: float, numel: int, floor: float = DENSITY_FLOOR) -> int:
    """Entries kept by the strict rule when no two magnitudes tie (an upper bound)."""
    return numel - strict_threshold_index(budget, numel, floor) - 1


def kept_budget(density: float, total: int) -> int:
    """Number of entries a density keeps: ``floor(density * total)``.

    A product within ``1e-9`` (relative) of an integer is taken as that integer, so
    that decimal densities are not lost to binary rounding (``0.29 * 100`` is
    ``28.999999999999996`` in floating point; this returns 29).

    Parameters
    ----------
    density : float
        Kept fraction in ``[0, 1]``.
    total : int
        Number of entries.

    Returns
    -------
    int
        In ``[0, total]``.
    """
    value = float(density) * float(total)
    nearest = round(value)
    near_integer = abs(value - nearest) <= 1e-9 * max(1.0, abs(value))
    kept = int(nearest) if near_integer else int(math.floor(value))
    return min(max(kept, 0), int(total))


def check_n_m(n_m: Any, density: float, n_features: int) -> tuple[int, int] | None:
    """Validate ``n_m`` against ``density`` and the number of columns; return ``(N, M)``."""
    if n_m is None:
        return None
    if len(n_m) != 2 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in n_m):
        raise ValueError(f"n_m must be a pair of integers (N, M), got {n_m!r}")
    keep, group = int(n_m[0]), int(n_m[1])
    if not 0 < keep <= group:
        raise ValueError(f"n_m=(N, M) must satisfy 0 < N <= M, got ({keep}, {group})")
    if abs(float(density) - keep / group) > 1e-12:
        raise ValueError(
            f"n_m=({keep}, {group}) keeps {keep}/{group} of the weights, but density={density}; "
            f"set density={keep}/{group} (the pattern fixes the density)"
        )
    if n_features % group:
        raise ValueError(
            f"N:M sparsity needs the number of columns of W ({n_features}) to be a multiple "
            f"of M={group}"
        )
    return keep, group


def parse_n_m(n_m: Any) -> tuple[int, int] | None:
    """Validate an ``(N, M)`` pair without tying it to a density (DSF's ``n_m``).

    Returns ``None`` for ``None``, else ``(N, M)`` with ``0 < N <= M``.
    """
    if n_m is None:
        return None
    if (
        len(n_m) != 2
        or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in n_m)
    ):
        raise ValueError(f"n_m must be a pair of integers (N, M), got {n_m!r}")
    keep, group = int(n_m[0]), int(n_m[1])
    if not 0 < keep <= group:
        raise ValueError(f"n_m=(N, M) must satisfy 0 < N <= M, got ({keep}, {group})")
    return keep, group


@dataclass(frozen=True)
class NMPattern:
    """N:M sparsity along one axis: every ``group`` consecutive entries keep at most ``keep``.

    ``axis=1`` groups consecutive entries of a row (the columns ``j = g M .. g M + M - 1``
    of row ``i``); ``axis=0`` groups consecutive entries of a column. For a factor ``F``
    applied as ``y = F x``, the reduction dimension is ``F``'s second axis, so the
    tensor-core layout is ``axis=1`` of ``F`` (and ``axis=0`` of ``F^T``).

    Attributes
    ----------
    keep, group : int
        ``N`` and ``M``.
    axis : int
        0 or 1, the axis along which the groups run.
    """

    keep: int
    group: int
    axis: int

    def fits(self, shape: tuple[int, int]) -> bool:
        """Whether the grouped axis of ``shape`` is a multiple of ``group``."""
        return shape[self.axis] % self.group == 0

    def kept(self, shape: tuple[int, int]) -> int:
        """Entries kept when every group keeps ``keep`` (``numel * N / M``)."""
        return (shape[0] * shape[1] // self.group) * self.keep

    def mask(self, engine: Any, magnitudes: Any) -> Any:
        """Boolean mask of the ``keep`` largest ``magnitudes`` of every group."""
        return n_m_mask_along(engine, magnitudes, self.keep, self.group, self.axis)

    def transposed(self) -> NMPattern:
        """The same pattern seen on the transposed matrix."""
        return NMPattern(self.keep, self.group, 1 - self.axis)


def n_m_mask_along(engine: Any, scores: Any, keep: int, group: int, axis: int) -> Any:
    """Keep the ``keep`` largest of every ``group`` consecutive ``scores`` along ``axis``.

    Parameters
    ----------
    engine : ArrayAPIEngine
        Supplies ``n_m_mask`` (groups along rows) and ``copy``.
    scores : array of shape (r, c)
        Non-negative scores (magnitudes); not modified.
    keep, group : int
        ``N`` and ``M``; ``scores.shape[axis]`` must be a multiple of ``M``.
    axis : {0, 1}

    Returns
    -------
    bool array of shape (r, c)
    """
    if axis == 1:
        return engine.n_m_mask(scores, keep, group)
    return engine.copy(engine.n_m_mask(engine.copy(scores.T), keep, group).T)


def satisfies_n_m(a: Any, keep: int, group: int, axis: int = 1) -> bool:
    """Whether every group of ``group`` consecutive entries of ``a`` along ``axis`` has at
    most ``keep`` nonzeros (checked group by group; NumPy or any array convertible to it)."""
    import numpy as np

    values = np.asarray(a)
    if axis == 0:
        values = values.T
    rows, cols = values.shape
    if cols % group:
        return False
    counts = np.count_nonzero(values.reshape(rows, cols // group, group), axis=2)
    return bool((counts <= keep).all())


# The exact top-k masks are engine kernels (NumPy versions in backends/_numpy_kernels.py,
# portable ones in the array-API engine); re-exported here, where users look for mask rules.
from .backends._numpy_kernels import global_topk_mask, n_m_mask, row_topk_mask  # noqa: E402

__all__ = [
    "DENSITY_FLOOR",
    "NMPattern",
    "check_n_m",
    "global_topk_mask",
    "kept_budget",
    "n_m_mask",
    "n_m_mask_along",
    "parse_n_m",
    "row_topk_mask",
    "satisfies_n_m",
    "strict_kept_count",
    "strict_threshold_index",
]
