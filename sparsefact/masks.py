"""Sparsity projections: how many entries a budget keeps and which ones.

One module for every mask rule of the toolkit:

- :func:`strict_threshold_index` / :func:`strict_kept_count`: the DSF reference rule
  (Boža & Macko 2024, official code): the threshold is the value at 0-based position
  ``floor(q * numel)`` of ``sort(|x|)`` with ``q = min(0.99, 1 - budget / numel)``, and
  the entries strictly above it are kept. It keeps ``budget`` or ``budget - 1`` entries
  (float rounding decides) and never less than ~1% of the matrix.
- :func:`global_topk_mask`, :func:`row_topk_mask`, :func:`n_m_mask`: exact top-k masks
  (ties broken by position) for the pruning baselines.

Selection uses partial selection (``argpartition`` or the engine's radix select),
never a full sort.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any

import numpy as np

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


def _flat_topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    flat = scores.reshape(-1)
    if k >= flat.size:
        return np.arange(flat.size)
    # argpartition is O(n); stable tie-breaking by position is not needed for budgets.
    return np.argpartition(flat, flat.size - k)[flat.size - k :]


def global_topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` largest entries of ``scores`` over the whole matrix."""
    scores = np.asarray(scores)
    mask = np.zeros(scores.size, dtype=bool)
    if k > 0:
        mask[_flat_topk_indices(scores, int(k))] = True
    return mask.reshape(scores.shape)


def row_topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` largest entries of every row of ``scores``."""
    scores = np.asarray(scores)
    n_rows, n_cols = scores.shape
    k = int(min(max(k, 0), n_cols))
    mask = np.zeros(scores.shape, dtype=bool)
    if k == 0:
        return mask
    if k == n_cols:
        mask[:] = True
        return mask
    idx = np.argpartition(scores, n_cols - k, axis=1)[:, n_cols - k :]
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def n_m_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` largest of every ``m`` consecutive entries along each row.

    This is the N:M convention of sparse tensor cores for a weight of shape
    ``(out, in)``: each output keeps ``n`` of every group of ``m`` consecutive inputs.
    The number of columns must be a multiple of ``m``.
    """
    scores = np.asarray(scores)
    n_rows, n_cols = scores.shape
    if not (0 < n <= m):
        raise ValueError(f"n_m must satisfy 0 < N <= M, got ({n}, {m})")
    if n_cols % m:
        raise ValueError(f"N:M sparsity needs the number of columns ({n_cols}) to be a multiple of M={m}")
    groups = scores.reshape(n_rows, n_cols // m, m)
    idx = np.argpartition(groups, m - n, axis=2)[:, :, m - n :]
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=2)
    return mask.reshape(n_rows, n_cols)
