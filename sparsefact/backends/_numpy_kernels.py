"""Plain NumPy/SciPy kernels of the CPU engine: exact top-k masks and dense factorisations.

They are the NumPy implementations behind :class:`~sparsefact.backends.numpy_numba.NumpyNumbaEngine`;
the portable versions of the same rules are in :class:`~sparsefact.backends.array_api.ArrayAPIEngine`.
Selection uses partial selection (``argpartition``), never a full sort, except where the rule
needs an exact order (Wanda's row budget).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


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


def row_budget_mask(scores: np.ndarray, kept: int) -> np.ndarray:
    """Keep exactly ``kept`` entries, spread over the rows as evenly as possible.

    Every row keeps its ``kept // m`` highest scores; the ``kept % m`` leftover entries
    go to the rows whose next-highest score (the ``(kept // m + 1)``-th of the row) is
    largest. Ties are broken by position (lower column, then lower row, first).
    """
    m, n = scores.shape
    base, extra = divmod(int(kept), m)
    order = np.argsort(-scores, axis=1, kind="stable")
    counts = np.full(m, base, dtype=np.intp)
    if extra:
        next_scores = scores[np.arange(m), order[:, base]]
        counts[np.argsort(-next_scores, kind="stable")[:extra]] += 1
    ranks = np.empty((m, n), dtype=np.intp)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(n), (m, n)), axis=1)
    return ranks < counts[:, None]


def factor_inverse_of_reversed(reversed_h: np.ndarray) -> np.ndarray:
    """``U`` for ``H^-1 = U^T U`` from ``J H J`` (C-contiguous, overwritten).

    See :func:`upper_cholesky_of_inverse`. The C-ordered buffer is the Fortran-ordered
    transpose of the symmetric ``J H J``, so LAPACK works on it in place.
    """
    potrf, trtri = scipy.linalg.get_lapack_funcs(("potrf", "trtri"), (reversed_h,))
    lower, info = potrf(reversed_h.T, lower=1, overwrite_a=1, clean=1)
    if info != 0:
        raise np.linalg.LinAlgError(
            f"the damped Hessian is not positive definite (LAPACK potrf info={info})"
        )
    lower_inv, info = trtri(lower, lower=1, overwrite_c=1)
    if info != 0:  # pragma: no cover - only when potrf already failed
        raise np.linalg.LinAlgError(f"triangular inverse failed (LAPACK trtri info={info})")
    # (J L J)^-1 = J L^-1 J: reverse both axes of L^-1.
    return np.ascontiguousarray(lower_inv[::-1, ::-1])


def upper_cholesky_of_inverse(hessian: np.ndarray) -> np.ndarray:
    """Upper-triangular ``U`` with ``hessian^-1 = U^T U`` and a positive diagonal.

    SparseGPT's OBS updates use the rows of this factor (baselines.md §3.2). It is
    computed from one Cholesky factorisation of the index-reversed matrix and one
    triangular inverse (``2/3 n^3`` flops instead of inverse-then-factorise): with
    ``J`` the reversal permutation and ``J H J = L L^T``, ``R = J L J`` is upper
    triangular with ``H = R R^T``, so ``H^-1 = R^-T R^-1`` and ``U = R^-1 = J L^-1 J``.

    Parameters
    ----------
    hessian : ndarray of shape (n, n)
        Symmetric positive definite; not modified.

    Raises
    ------
    numpy.linalg.LinAlgError
        If ``hessian`` is not (numerically) positive definite.
    """
    return factor_inverse_of_reversed(np.ascontiguousarray(hessian[::-1, ::-1]))


def gram_square_root(gram: np.ndarray) -> np.ndarray:
    """A factor ``S`` with ``S S^T = gram`` (float64), for a PSD ``gram`` that may be singular.

    The lower Cholesky factor when ``gram`` is numerically positive definite;
    otherwise the symmetric square root ``Q sqrt(max(L, 0)) Q^T`` from the
    eigendecomposition ``gram = Q L Q^T`` (rounding errors can make tiny eigenvalues of
    a singular Gram negative; they are set to 0). Any such ``S`` gives the same
    optimum below, since only ``W S S^T W^T = W G W^T`` matters.
    """
    g = np.asarray(gram, dtype=np.float64)
    g = 0.5 * (g + g.T)
    try:
        return scipy.linalg.cholesky(g, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        eigvals, eigvecs = scipy.linalg.eigh(g, check_finite=False)
        return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T
