"""Single-sparse layer-wise pruning baselines: magnitude, Wanda, SparseGPT and ADMM pruning.

Each compressor replaces ``W`` (``m x n``, rows = outputs, columns = inputs) by one
sparse matrix ``weight_`` of the same shape, chosen with the calibration Gram
``G = X_calib^T X_calib`` (``G = I`` without calibration). They share the contract of
:class:`sparsefact.MagnitudePruning` (design.md §3): ``fit(W, X_calib)`` or
``fit(W, calibration=...)``, ``reconstruct()``, ``calibrated_err_``,
``reconstruction_err_``, ``density_``, ``nnz_`` and ``backend_``.

Budget rule (all four, unstructured): a density ``d`` keeps at most
``K = floor(d * m * n)`` entries (a product within ``1e-9`` relative of an integer
counts as that integer, so ``0.29 * 100`` gives 29). The budget is spent: exactly ``K``
nonzeros are kept, ties broken by position, unless the remaining weights provably cannot
change the calibrated output -- weights of dead inputs (a zero Gram diagonal: SparseGPT
zeroes them and gives their share of the budget to the live inputs), or entries where
``W`` is zero for the methods that keep ``W``'s values (magnitude, Wanda). Every result
says how much of the budget went unused and why: ``unspent_budget_`` (0 when spent) and
``budget_note_`` (empty when spent).

N:M convention: ``n_m=(N, M)`` keeps ``N`` of every ``M`` consecutive inputs of each
output row (the sparse-tensor-core layout; 2:4 keeps half). The pattern fixes the
density at ``N / M``, so ``density`` must equal it (the default 0.5 matches 2:4 and
4:8).

References
----------
.. [Wanda] M. Sun, Z. Liu, A. Bair, J. Z. Kolter, "A Simple and Effective Pruning
   Approach for Large Language Models", arXiv:2306.11695 (2023).
.. [SparseGPT] E. Frantar, D. Alistarh, "SparseGPT: Massive Language Models Can Be
   Accurately Pruned in One-Shot", arXiv:2301.00774 (2023).
.. [ADMM] V. Boža, "Fast and Effective Weight Update for Pruned Large Language
   Models", arXiv:2401.02938 (2024).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import array_api_compat
import numpy as np

from ._sklearn_compat import Interval, StrOptions
from ._validation import to_numpy
from .admm import admm_loop
from .backends import get_engine
from .backends._base import SelectionHint
from .backends._numpy_kernels import (
    factor_inverse_of_reversed,
    global_topk_mask,
    n_m_mask,
    upper_cholesky_of_inverse,
)
from .backends.threads import one_blas_thread, single_threaded_foreign_blas
from .base import BaseCompressor, FitOutput
from .masks import check_n_m, kept_budget

#: Added to ``sqrt(diag G)`` before dividing by it (ADMM preconditioning).
PRECONDITION_EPS = 1e-8

#: Width of the column panels inside a SparseGPT block that are updated one column at
#: a time; the rest of the block is updated by one matrix product per panel.
_SPARSEGPT_PANEL = 16


# ---------------------------------------------------------------------- helpers
class _SparseWeightCompressor(BaseCompressor):
    """Shared storage of the single-sparse compressors: ``weight_`` (CSR) and the dense result.

    Also the budget report of every single-sparse result: ``unspent_budget_`` (entries of
    the budget not kept as nonzeros) and ``budget_note_`` (why; empty when spent).
    """

    #: ``weight_`` holds the one factor (rescaled with it by :meth:`BaseCompressor.fit`).
    _factor_attributes = (("weight_",),)
    #: Whether the method changes the kept weights (then only dead inputs can leave budget unused).
    _updates_weights = False

    def _sparse_result(self, pruned: Any, engine: Any, *, budget: int, W: Any, gram: Any) -> FitOutput:
        self.weight_ = engine.to_sparse(pruned)
        nnz = int(self.weight_.nnz)
        self.unspent_budget_ = max(int(budget) - nnz, 0)
        self.budget_note_ = ""
        if self.unspent_budget_:
            self.budget_note_ = self._budget_note(nnz, int(budget), W, gram, engine)
        return FitOutput(factors=(pruned,), nnz=nnz)

    def _budget_note(self, nnz: int, budget: int, W: Any, gram: Any, engine: Any) -> str:
        """Why ``budget - nnz`` entries of the budget are not nonzeros of the result."""
        xp = engine.xp
        m, n = W.shape
        unspent = budget - nnz
        reasons = []
        if gram is not None:
            dead = int(xp.sum(xp.astype(_gram_diagonal(engine, gram) <= 0, xp.int64)))
            if dead:
                reason = (
                    f"{dead} of the {n} inputs are dead (zero Gram diagonal): their {m * dead} weights "
                    "cannot change the calibrated output"
                )
                if self._updates_weights and budget > m * (n - dead):
                    reason += f", and the other {m * (n - dead)} weights are all that is worth keeping"
                reasons.append(reason)
        zeros = int(xp.sum(xp.astype(W == 0, xp.int64)))
        if zeros and not self._updates_weights:
            reasons.append(f"W has {zeros} zero entries and {type(self).__name__} keeps W's values")
        if getattr(self, "n_m", None) is not None:
            reasons.append("the N:M pattern fixes which entries of each group are kept")
        if not reasons:
            reasons.append("the optimal values of some kept weights are exactly zero")
        return f"{unspent} of the {budget} budgeted weights are zero: " + "; ".join(reasons)


_SHARED_PARAMETERS = {
    **BaseCompressor._parameter_constraints,
    "density": [Interval(Real, 0, 1, closed="right")],
}


def _count_nonzero(xp: Any, a: Any) -> int:
    return int(xp.sum(xp.astype(a != 0, xp.int64)))


def _gram_diagonal(engine: Any, gram: Any) -> Any:
    """The diagonal of a Gram given as a matrix or (diagonal-only calibration) a vector."""
    return gram if len(gram.shape) == 1 else engine.diag(gram)


# ---------------------------------------------------------------------- magnitude
class MagnitudePruning(_SparseWeightCompressor):
    """Keep the largest-magnitude entries of ``W`` (the simplest single-sparse baseline).

    Parameters
    ----------
    density : float in (0, 1], default=0.5
        Kept fraction of the ``m * n`` entries: exactly ``floor(density * m * n)``
        entries for ``scope="matrix"`` (:func:`sparsefact.masks.kept_budget`),
        ``floor(density * n)`` per row for ``scope="row"``.
    scope : {"matrix", "row"}, default="matrix"
        One threshold over the whole matrix, or per output row.
    n_m : tuple (N, M) or None, default=None
        Semi-structured N:M sparsity: each output row keeps the ``N`` largest of every
        group of ``M`` consecutive inputs (``(2, 4)`` is the 2:4 pattern of sparse tensor
        cores). ``density`` must equal ``N / M`` and ``M`` must divide the number of
        columns; ``scope`` is then ignored.
    backend : {"auto", "numpy_numba", "array_api", "cupy"}, default="auto"
        Engine of the selection; results stay in ``W``'s namespace, device and dtype.

    Attributes
    ----------
    weight_ : scipy.sparse.csr_array of shape (m, n)
    calibrated_err_, reconstruction_err_, density_, nnz_, backend_
        As for :class:`~sparsefact.DoubleSparseFactorization`. The calibration (if
        any) only affects ``calibrated_err_``.

    Examples
    --------
    >>> import numpy as np
    >>> from sparsefact import MagnitudePruning
    >>> W = np.arange(1.0, 9.0).reshape(2, 4)
    >>> MagnitudePruning(density=0.25).fit(W).weight_.toarray()
    array([[0., 0., 0., 0.],
           [0., 0., 7., 8.]])
    """

    _parameter_constraints: dict = {
        **_SHARED_PARAMETERS,
        "scope": [StrOptions({"matrix", "row"})],
        "n_m": [tuple, list, None],
    }
    _needs = "none"

    def __init__(
        self,
        density: float = 0.5,
        *,
        scope: str = "matrix",
        n_m: tuple[int, int] | None = None,
        backend: str = "auto",
    ) -> None:
        self.density = density
        self.scope = scope
        self.n_m = n_m
        self.backend = backend

    def _fit(self, W: Any, gram: Any, engine: Any) -> FitOutput:
        xp = engine.xp
        m, n = W.shape
        n_m = check_n_m(self.n_m, self.density, n)
        scores = xp.abs(W)
        if n_m is not None:
            mask = engine.n_m_mask(scores, *n_m)
            budget = m * n * n_m[0] // n_m[1]
        elif self.scope == "matrix":
            budget = kept_budget(self.density, m * n)
            mask = engine.topk_mask(scores, budget)
        else:
            mask = engine.row_topk_mask(scores, kept_budget(self.density, n))
            budget = m * kept_budget(self.density, n)
        return self._sparse_result(xp.where(mask, W, xp.zeros_like(W)), engine, budget=budget, W=W, gram=gram)


# ---------------------------------------------------------------------- Wanda
class Wanda(_SparseWeightCompressor):
    """Wanda pruning: keep the weights with the largest ``|W_ij| * ||X_j||`` per output row.

    Wanda (Sun et al. 2023, arXiv:2306.11695) scores every weight by its magnitude
    times the norm of its input feature over the calibration tokens,
    ``S_ij = |W_ij| * sqrt(G_jj)``, compares scores within each output row and keeps
    the kept weights unchanged (no weight update). Without calibration ``G = I`` and it
    is per-row magnitude pruning.

    Budget rule: exactly ``K = floor(density * m * n)`` weights are kept (see the module
    docstring). Each row keeps ``K // m`` weights and the ``K mod m`` leftover weights
    go to the rows whose next-best score (their ``(K // m + 1)``-th largest) is
    largest, one each. (The reference code keeps ``n - floor((1 - density) n)`` per row,
    up to ``m`` more in total.) With ``n_m=(N, M)`` every output row keeps the ``N``
    highest-scored of every ``M`` consecutive inputs.

    Parameters
    ----------
    density : float in (0, 1], default=0.5
        Kept fraction of the ``m * n`` entries.
    n_m : tuple (N, M) or None, default=None
        Semi-structured N:M pattern (``N`` kept of every ``M`` consecutive inputs per
        output). ``density`` must equal ``N / M`` and ``M`` must divide ``n``.
    backend : {"auto", "numpy_numba", "array_api", "cupy"}, default="auto"
        Engine of the selection; results stay in ``W``'s namespace, device and dtype.

    Attributes
    ----------
    weight_ : scipy.sparse.csr_array of shape (m, n)
        The pruned weights.
    calibrated_err_ : float
        ``sqrt(tr(D G D^T) / tr(W G W^T))`` with ``D = W - weight_``.
    reconstruction_err_ : float
        ``||W - weight_||_F / ||W||_F``.
    density_ : float
        ``nnz_ / (m * n)``.
    nnz_ : int
        Stored nonzeros of ``weight_``.
    backend_ : str
        Engine that ran.
    n_features_in_ : int

    Only the diagonal of the Gram is used, so a diagonal-only
    ``Calibration(statistic="diag")`` is enough (``calibrated_err_`` is then measured in
    the diagonal metric, see :class:`~sparsefact.base.BaseCompressor`).

    References
    ----------
    M. Sun, Z. Liu, A. Bair, J. Z. Kolter, "A Simple and Effective Pruning Approach for
    Large Language Models", arXiv:2306.11695 (2023).

    Examples
    --------
    >>> import numpy as np
    >>> from sparsefact.pruning import Wanda
    >>> rng = np.random.default_rng(0)
    >>> W, X = rng.standard_normal((8, 16)), rng.standard_normal((64, 16))
    >>> Wanda(density=0.5).fit(W, X).nnz_
    64
    """

    _parameter_constraints: dict = {
        **_SHARED_PARAMETERS,
        "n_m": [tuple, list, None],
    }

    def __init__(self, density: float = 0.5, *, n_m: tuple[int, int] | None = None, backend: str = "auto"):
        self.density = density
        self.n_m = n_m
        self.backend = backend

    _needs = "diag"

    def _fit(self, W: Any, gram: Any, engine: Any) -> FitOutput:
        xp = engine.xp
        m, n = W.shape
        n_m = check_n_m(self.n_m, self.density, n)
        scores = xp.astype(xp.abs(W), xp.float64)
        if gram is not None:
            norms_sq = xp.astype(_gram_diagonal(engine, gram), xp.float64)
            scores = scores * xp.sqrt(xp.clip(norms_sq, 0.0, None))[None, :]
        if n_m is not None:
            mask = engine.n_m_mask(scores, *n_m)
            budget = m * n * n_m[0] // n_m[1]
        else:
            budget = kept_budget(self.density, m * n)
            mask = engine.row_budget_mask(scores, budget)
        return self._sparse_result(xp.where(mask, W, xp.zeros_like(W)), engine, budget=budget, W=W, gram=gram)


# ---------------------------------------------------------------------- SparseGPT
def _live_budget(n: int, dead: np.ndarray, kept: int, m: int):
    """``i -> `` entries of the budget for columns ``[0, i)``: shares in proportion to live columns.

    Without dead inputs this is ``floor(kept * i / n)`` (the blocks' shares of ``kept`` in
    proportion to their widths). Dead inputs' weights are zeroed, so their share goes to
    the live ones: ``floor(K' * live(i) / L)`` with ``L`` live columns, ``live(i)`` of them
    before ``i`` and ``K' = min(kept, m L)``; no block is given more than its live entries.
    """
    if dead.size == 0:
        return lambda i: kept * i // n
    live = np.ones(n, dtype=np.int64)
    live[dead] = 0
    before = np.concatenate(([0], np.cumsum(live)))
    total = int(before[-1])
    if total == 0:
        return lambda i: 0
    spendable = min(int(kept), m * total)
    return lambda i: spendable * int(before[i]) // total


def sparsegpt_prune(
    W: np.ndarray,
    gram: np.ndarray | None,
    *,
    kept: int,
    block_size: int,
    damping: float,
    n_m: tuple[int, int] | None = None,
    engine: Any = None,
) -> np.ndarray:
    """SparseGPT's OBS pruning of one layer (NumPy, in ``W``'s dtype).

    Parameters
    ----------
    W : ndarray of shape (m, n)
        Weights; not modified.
    gram : ndarray of shape (n, n) or None
        Calibration Gram (``H`` up to a constant factor); the identity when None.
    kept : int
        Entries to keep in total (unstructured); ignored with ``n_m``.
    block_size : int
        Columns per block: the unit of mask selection and of the lazy updates.
    damping : float
        ``lambda = damping * mean(diag H)`` is added to the diagonal.
    n_m : (N, M) or None
        Keep ``N`` of every ``M`` consecutive inputs per row (``M`` divides ``n``).
    engine : NumpyNumbaEngine, optional
        Supplies the compiled per-panel column loop (``obs_panel``); the CPU engine by
        default.

    Returns
    -------
    ndarray of shape (m, n)
        The pruned and compensated weights.
    """
    if engine is None:
        engine = get_engine("numpy_numba", array_api_compat.array_namespace(np.empty(0)))
    dtype = W.dtype
    m, n = W.shape
    work = np.array(W.T, dtype=dtype, order="C", copy=True)  # column j of W = row j here
    diag = np.ones(n) if gram is None else np.diagonal(gram).astype(np.float64)
    dead = np.flatnonzero(diag <= 0)
    work[dead] = 0.0
    diag[dead] = 1.0
    ridge = damping * float(np.mean(diag))
    budget_at = _live_budget(diag.size, dead, kept, m)

    def reversed_hessian(precision: np.dtype) -> np.ndarray:
        # J (G + lambda I) J with dead inputs' diagonal set to 1, built in one copy.
        if gram is None:
            hessian_r = np.eye(n, dtype=precision)
        else:
            hessian_r = np.array(gram[::-1, ::-1], dtype=precision, order="C", copy=True)
        hessian_r[n - 1 - dead, n - 1 - dead] = 1.0
        hessian_r.flat[:: n + 1] += precision.type(ridge)
        return hessian_r

    try:
        with single_threaded_foreign_blas():  # SciPy's LAPACK next to NumPy's busy pool
            factor = factor_inverse_of_reversed(reversed_hessian(dtype))
    except np.linalg.LinAlgError:
        if dtype == np.float64:
            raise
        with single_threaded_foreign_blas():
            factor = factor_inverse_of_reversed(reversed_hessian(np.dtype(np.float64))).astype(dtype)
    pivots = np.diagonal(factor).copy()
    inv_pivots = (1.0 / pivots).astype(dtype)
    panel = _SPARSEGPT_PANEL
    if n_m is not None:
        group = n_m[1]
        block_size = -(-block_size // group) * group  # blocks and panels hold whole groups
        panel = group * max(1, _SPARSEGPT_PANEL // group)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        width = i2 - i1
        inv_block = inv_pivots[i1:i2, None]
        prune_coef = np.empty((width, m), dtype=dtype)  # 1 / U_qq where pruned, else 0
        if n_m is None:
            # Adaptive mask: joint over the m x B block, on the weights updated so far
            # (ranking by |w| / U_qq is ranking by the OBS error w^2 / U_qq^2).
            block_kept = budget_at(i2) - budget_at(i1)
            scores = np.multiply(np.abs(work[i1:i2]), inv_block)
            if dead.size:  # dead inputs' weights are zero: never spend budget on them
                dead_here = dead[(dead >= i1) & (dead < i2)] - i1
                scores[dead_here] = -1.0
            keep = global_topk_mask(scores, block_kept)
            np.multiply(~keep, inv_block, out=prune_coef)
        else:
            keep = np.empty((width, m), dtype=bool)
        errors = np.empty((width, m), dtype=dtype)
        with one_blas_thread():
            for a in range(i1, i2, panel):
                b = min(a + panel, i2)
                # Panel-local views; the panel's factor is copied transposed so that the
                # coefficients of column q are one contiguous row.
                w_p, e_p, c_p = work[a:b], errors[a - i1 : b - i1], prune_coef[a - i1 : b - i1]
                f_t = np.ascontiguousarray(factor[a:b, a:b].T)
                if n_m is None:  # the whole column loop of the panel in one compiled call
                    engine.obs_panel(w_p, f_t, e_p, c_p)
                    if b < i2:
                        work[b:i2] -= factor[a:b, b:i2].T @ e_p
                    continue
                pending = 0  # columns [pending, j) of the panel have not updated columns j..
                for j in range(b - a):
                    if n_m is not None and (a + j - i1) % n_m[1] == 0:
                        # N:M: bring the rest of the panel up to date, then choose the
                        # group's mask on its current weights.
                        j2 = j + n_m[1]
                        if j > pending:
                            w_p[j:] -= f_t[j:, pending:j] @ e_p[pending:j]
                            pending = j
                        group_keep = n_m_mask(np.abs(w_p[j:j2] * inv_pivots[a + j : a + j2, None]).T, *n_m).T
                        r = a + j - i1
                        keep[r : r + n_m[1]] = group_keep
                        np.multiply(~group_keep, inv_pivots[a + j : a + j2, None], out=c_p[j:j2])
                    if j > pending:  # OBS compensation from the earlier columns of the panel
                        w_p[j] -= f_t[j, pending:j] @ e_p[pending:j]
                    np.multiply(w_p[j], c_p[j], out=e_p[j])  # (w - w_kept) / U_qq
                if b < i2:
                    work[b:i2] -= factor[a:b, b:i2].T @ e_p
        work[i1:i2] *= keep  # the pruned entries become zero; kept ones are final
        if i2 < n:
            work[i2:] -= factor[i1:i2, i2:].T @ errors  # lazy batched update
    return np.ascontiguousarray(work.T)


def sparsegpt_prune_portable(
    engine: Any,
    W: Any,
    gram: Any,
    *,
    kept: int,
    block_size: int,
    damping: float,
    n_m: tuple[int, int] | None,
) -> Any:
    """SparseGPT in plain array-API operations (any namespace and device; ``W``'s dtype).

    The same algorithm as :func:`sparsegpt_prune` (dead inputs, damping, adaptive block
    masks by ``w^2 / U_qq^2``, the same per-block budget, N:M groups chosen when the loop
    reaches them, lazy updates of later blocks) written column by column without the
    compiled panel kernel: the reference form that the fast NumPy path is tested against,
    and the path for torch, CuPy and ``array_api_strict`` arrays. ``W`` is not modified.
    """
    xp = engine.xp
    m, n = W.shape
    device = array_api_compat.device(W)
    diag = xp.ones((n,), dtype=W.dtype, device=device) if gram is None else _gram_diagonal(engine, gram)
    dead = diag <= 0
    work = W * xp.astype(~dead, W.dtype)[None, :]
    ridge = damping * float(xp.mean(xp.where(dead, xp.ones_like(diag), diag)))
    dead_host = np.flatnonzero(to_numpy(dead))
    budget_at = _live_budget(n, dead_host, kept, m)
    hessian = engine.eye(n, W) if gram is None else gram
    # dead inputs have zero rows and columns in G: their diagonal becomes 1, then the ridge
    hessian = hessian + (xp.astype(dead, W.dtype) + ridge)[:, None] * engine.eye(n, W)
    factor = engine.upper_cholesky_of_inverse(hessian)
    pivots = xp.linalg.diagonal(factor)
    if n_m is not None:
        block_size = -(-block_size // n_m[1]) * n_m[1]  # blocks hold whole groups
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        block = engine.copy(work[:, i1:i2])
        piv = pivots[i1:i2]
        errors = xp.zeros((m, i2 - i1), dtype=W.dtype, device=device)
        keep = None
        if n_m is None:
            block_kept = budget_at(i2) - budget_at(i1)
            scores = (block / piv[None, :]) ** 2
            if dead_host.size:  # never spend budget on dead inputs (their weights are zero)
                scores = xp.where(dead[i1:i2][None, :], -xp.ones_like(scores), scores)
            keep = engine.topk_mask(scores, block_kept)
        for j in range(i2 - i1):
            if n_m is not None and j % n_m[1] == 0:
                group = (block[:, j : j + n_m[1]] / piv[None, j : j + n_m[1]]) ** 2
                group_keep = engine.n_m_mask(group, *n_m)
                keep = group_keep if keep is None else xp.concat([keep, group_keep], axis=1)
            column = block[:, j]
            kept_column = xp.where(keep[:, j], column, xp.zeros_like(column))
            error = (column - kept_column) / piv[j]
            block[:, j:] = block[:, j:] - error[:, None] * factor[i1 + j, i1 + j : i2][None, :]
            block[:, j] = kept_column
            errors[:, j] = error
        work[:, i1:i2] = block
        if i2 < n:
            work[:, i2:] = work[:, i2:] - engine.matmul(errors, factor[i1:i2, i2:])
    return work


class SparseGPT(_SparseWeightCompressor):
    """SparseGPT: column-by-column OBS pruning with the upper Cholesky factor of ``H^-1``.

    Frantar & Alistarh (2023, arXiv:2301.00774). With ``H = G + lambda I``
    (``lambda = damping * mean(diag G)``, inputs with ``G_jj = 0`` are dead: their
    weights are zeroed and ``H_jj`` set to 1), the columns of ``W`` are visited left
    to right; pruning the entries of column ``q`` and compensating the later columns
    by the optimal brain surgeon update uses only row ``q`` of the upper Cholesky
    factor ``U`` of ``H^-1`` (baselines.md §3.2-3.3). The mask is adaptive: at the
    start of every block of ``block_size`` columns it is chosen jointly over the
    ``m x block_size`` block by the score ``w^2 / U_qq^2`` of the current (already
    compensated) weights. Updates of later columns are applied lazily, one matrix
    product per block (and per 16-column panel inside a block).

    Budget rule: exactly ``K = floor(density * m * n)`` weights are kept; the block of
    columns ``[i1, i2)`` keeps ``floor(K i2 / n) - floor(K i1 / n)`` of its entries (the
    blocks' shares of ``K`` in proportion to their widths, summing to ``K``). The
    reference code prunes ``floor((1 - density) m B) + 1`` entries per block instead.
    Dead inputs' weights are zero, so the shares follow the live columns instead
    (``floor(K live(i2) / L) - floor(K live(i1) / L)`` with ``L`` live columns, ``live(i)``
    of them before ``i``): the budget is spent on live weights, and only when ``K``
    exceeds all ``m L`` of them is part of it unused (``unspent_budget_``).
    With ``n_m=(N, M)``, each row keeps ``N`` of every ``M`` consecutive columns, chosen
    when the loop reaches the group, on its current weights (the block size is rounded
    up to a multiple of ``M``).

    Parameters
    ----------
    density : float in (0, 1], default=0.5
        Kept fraction of the ``m * n`` entries.
    block_size : int, default=128
        Columns per block of mask selection and lazy updates.
    damping : float, default=0.01
        Relative damping ``lambda / mean(diag G)`` (``percdamp``).
    n_m : tuple (N, M) or None, default=None
        Semi-structured N:M pattern; ``density`` must equal ``N / M``.
    backend : {"auto", "numpy_numba", "array_api", "cupy"}, default="auto"
        ``numpy_numba`` (NumPy input) runs :func:`sparsegpt_prune` (LAPACK and a compiled
        panel loop); the other engines run :func:`sparsegpt_prune_portable` in ``W``'s
        namespace and device. Both compute in ``W``'s dtype.

    Attributes
    ----------
    weight_ : scipy.sparse.csr_array of shape (m, n)
        The pruned and compensated weights.
    calibrated_err_, reconstruction_err_, density_, nnz_, backend_, n_features_in_
        As for :class:`Wanda`.
    unspent_budget_ : int
        Budgeted entries not kept as nonzeros (only with dead inputs, see above).
    budget_note_ : str
        Why (empty when the budget is spent).

    Notes
    -----
    Cost ``O(n^3 + m n^2)``: one Cholesky factorisation and one triangular inverse of
    ``H`` (``2/3 n^3``), the lazy block updates (``m n^2``) and the per-column panel
    updates (``O(m n)`` each), computed in ``W``'s dtype like the reference code. If
    the float32 factorisation fails it is redone in float64. The per-column loop runs
    with single-threaded BLAS (its products are tiny; thread synchronisation made it
    up to 20x slower on a loaded 2-core machine); the factorisation and the block
    updates use the BLAS thread pool as configured.

    References
    ----------
    E. Frantar, D. Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
    Pruned in One-Shot", arXiv:2301.00774 (2023).

    Examples
    --------
    >>> import numpy as np
    >>> from sparsefact.pruning import SparseGPT
    >>> rng = np.random.default_rng(0)
    >>> W, X = rng.standard_normal((8, 16)), rng.standard_normal((64, 16))
    >>> SparseGPT(density=0.5).fit(W, X).nnz_
    64
    """

    _parameter_constraints: dict = {
        **_SHARED_PARAMETERS,
        "block_size": [Interval(Integral, 1, None, closed="left")],
        "damping": [Interval(Real, 0, None, closed="left")],
        "n_m": [tuple, list, None],
    }

    def __init__(
        self,
        density: float = 0.5,
        *,
        block_size: int = 128,
        damping: float = 0.01,
        n_m: tuple[int, int] | None = None,
        backend: str = "auto",
    ):
        self.density = density
        self.block_size = block_size
        self.damping = damping
        self.n_m = n_m
        self.backend = backend

    _updates_weights = True

    def _fit(self, W: Any, gram: Any, engine: Any) -> FitOutput:
        m, n = W.shape
        n_m = check_n_m(self.n_m, self.density, n)
        kept = kept_budget(self.density, m * n)
        budget = kept if n_m is None else m * n * n_m[0] // n_m[1]
        try:
            if engine.name == "numpy_numba":
                pruned = sparsegpt_prune(
                    W, gram, kept=kept, block_size=self.block_size, damping=self.damping, n_m=n_m,
                    engine=engine,
                )
            else:
                pruned = sparsegpt_prune_portable(
                    engine, W, gram, kept=kept, block_size=self.block_size, damping=self.damping, n_m=n_m
                )
        except np.linalg.LinAlgError as exc:
            if self.damping == 0:
                advice = "use damping > 0 (the default is 0.01): a singular Gram needs it"
            else:
                advice = (
                    f"with damping={self.damping} this means the calibration Gram is not positive "
                    "semidefinite (build it as X^T X; Calibration.from_gram checks this) or is too "
                    "ill-conditioned for this dtype (increase damping or fit in float64)"
                )
            raise np.linalg.LinAlgError(
                f"SparseGPT: G + lambda I is not positive definite in {W.dtype} ({exc}); {advice}"
            ) from exc
        return self._sparse_result(pruned, engine, budget=budget, W=W, gram=gram)


# ---------------------------------------------------------------------- ADMM
class ADMMPruning(_SparseWeightCompressor):
    """ADMM pruning: gradual mask selection inside an ADMM masked least-squares solve.

    Boža (2024, arXiv:2401.02938), following the public code (reference dsf.md §3 and
    baselines.md §5). In the preconditioned coordinates ``D = sqrt(diag G) + 1e-8``,
    ``G~ = D^-1 G D^-1``, ``W~0 = (W D)^T`` (so ``|W~0|`` is the Wanda score):

    - ``G~_l = G~ + l I`` with ``l = damping * mean(diag G~)`` (added *before* forming
      ``C = G~_l W~0``: a ridge towards the dense weights);
    - ``P = (G~_l + rho I)^-1``, factorised once and reused;
    - ``Y = W~0, U = 0``; for ``t < n_iter``: (re-select the mask from ``|Y + U|`` over
      the whole matrix if ``t < mask_iter``), ``Z = (Y + U) * mask``,
      ``U = U + Y - Z``, ``Y = P (C + rho (Z - U))``; finally
      ``Z = (Y + U) * mask`` and ``W_hat = (Z D^-1)^T``.

    Mask schedule: ``"final"`` (the public code) keeps the final budget at every
    re-selection; ``"cubic"`` (the paper) keeps the density of the sparsity
    ``s_t = s (1 - (1 - (t + 1) / T)^3)``, ``T = min(mask_iter, n_iter)``, reaching the
    final budget at ``t = T - 1``. With ``mask=`` given, the support is fixed and the
    iterations are a pure weight update on it (``mask_iter``, ``schedule`` and
    ``density`` are then not used).

    Budget rule: the final mask keeps exactly ``K = floor(density * m * n)`` entries
    (the entries of ``|Y + U|`` strictly above its ``(m n - K)``-th smallest value). Where
    ties at that value would keep fewer (constant or boolean ``W``, repeated values), the
    iterations are rerun with exact top-``K`` masks, ties broken by position, so the budget
    is spent; ``unspent_budget_`` counts kept weights whose optimal value is exactly zero.

    Parameters
    ----------
    density : float in (0, 1], default=0.5
        Kept fraction of the ``m * n`` entries.
    n_iter : int, default=20
        ADMM iterations (x-steps).
    mask_iter : int, default=15
        The first ``mask_iter`` iterations re-select the mask (0 and 1 both mean one
        selection, from ``|W~0|``).
    rho : float, default=1.0
        ADMM penalty.
    damping : float, default=0.1
        Relative ridge ``l / mean(diag G~)`` (``percdamp``).
    schedule : {"final", "cubic"}, default="final"
        Kept fraction at the re-selections (see above).
    mask : bool array of shape (m, n) or None, default=None
        Fixed support: only the weights are updated.
    backend : {"auto", "numpy_numba", "array_api", "cupy"}, default="auto"
        Engine of the z/u updates, selection and factorisation (as for DSF); results
        stay in ``W``'s namespace, device and dtype.

    Attributes
    ----------
    weight_ : scipy.sparse.csr_array of shape (m, n)
        The pruned and updated weights (cupyx sparse for CuPy inputs).
    calibrated_err_, reconstruction_err_, density_, nnz_, n_features_in_
        As for :class:`Wanda`.
    backend_ : str
        Engine that ran.
    unspent_budget_, budget_note_
        As for :class:`SparseGPT` (the budget is ``K``, or the size of a fixed ``mask``).

    References
    ----------
    V. Boža, "Fast and Effective Weight Update for Pruned Large Language Models",
    arXiv:2401.02938 (2024).

    Examples
    --------
    >>> import numpy as np
    >>> from sparsefact.pruning import ADMMPruning
    >>> rng = np.random.default_rng(0)
    >>> W, X = rng.standard_normal((8, 16)), rng.standard_normal((64, 16))
    >>> ADMMPruning(density=0.5).fit(W, X).nnz_
    64
    """

    _parameter_constraints: dict = {
        **_SHARED_PARAMETERS,
        "n_iter": [Interval(Integral, 1, None, closed="left")],
        "mask_iter": [Interval(Integral, 0, None, closed="left")],
        "rho": [Interval(Real, 0, None, closed="neither")],
        "damping": [Interval(Real, 0, None, closed="left")],
        "schedule": [StrOptions({"final", "cubic"})],
        "mask": ["array-like", None],
    }

    def __init__(
        self,
        density: float = 0.5,
        *,
        n_iter: int = 20,
        mask_iter: int = 15,
        rho: float = 1.0,
        damping: float = 0.1,
        schedule: str = "final",
        mask: Any = None,
        backend: str = "auto",
    ):
        self.density = density
        self.n_iter = n_iter
        self.mask_iter = mask_iter
        self.rho = rho
        self.damping = damping
        self.schedule = schedule
        self.mask = mask
        self.backend = backend

    def _kept_at(self, t: int, n_select: int, kept: int, total: int) -> int:
        """Entries kept by the re-selection of iteration ``t`` (of ``n_select``)."""
        if self.schedule == "final" or t >= n_select - 1:
            return kept
        sparsity = (1.0 - kept / total) * (1.0 - (1.0 - (t + 1) / n_select) ** 3)
        return max(kept, total - int(math.floor(sparsity * total)))

    def _check_mask(self, shape: tuple[int, int]) -> np.ndarray:
        mask = np.asarray(to_numpy(self.mask))
        if mask.shape != shape:
            raise ValueError(f"mask has shape {mask.shape}, but W has shape {shape}")
        if mask.dtype != np.bool_:
            if not np.all(np.isin(mask, (0, 1))):
                raise ValueError("mask must be boolean (or hold only 0 and 1)")
            mask = mask != 0
        return mask

    _updates_weights = True

    def _fit(self, W: Any, gram: Any, engine: Any) -> FitOutput:
        xp = engine.xp
        m, n = W.shape
        fixed = None if self.mask is None else self._check_mask((m, n))
        hessian = engine.eye(n, W) if gram is None else gram
        scale = xp.sqrt(xp.clip(engine.diag(hessian), 0.0, None)) + PRECONDITION_EPS
        system = (hessian / scale[:, None]) / scale[None, :]
        ridge = self.damping * float(xp.mean(engine.diag(system)))
        start = engine.copy((W * scale[None, :]).T)  # n x m: W~0
        cross = engine.matmul(system, start) + ridge * start  # C = G~_l W~0
        try:
            inverse = engine.spd_inverse(system, ridge + self.rho)
        except np.linalg.LinAlgError as exc:
            raise np.linalg.LinAlgError(
                f"ADMMPruning: G~ + (l + rho) I is not positive definite in {W.dtype} ({exc}): with "
                f"rho={self.rho} > 0 this means the calibration Gram is not positive semidefinite "
                "(build it as X^T X; Calibration.from_gram checks this)"
            ) from exc
        y_cur = engine.copy(start)
        u = engine.zeros(start.shape, start)
        total, kept = m * n, kept_budget(self.density, m * n)
        if fixed is not None:
            support = xp.asarray(
                np.ascontiguousarray(fixed.T), device=array_api_compat.device(W)
            )
            n_select = 0
        else:
            support = None
            n_select = max(1, min(self.mask_iter, self.n_iter))

        def index_at(t: int) -> int:
            return total - self._kept_at(t, n_select, kept, total) - 1

        def solve(rhs: Any) -> Any:
            return engine.matmul(inverse, rhs)

        # The reference order: n_iter x-steps, then a final z-step (n_iter + 1 z-steps).
        # One hint for all the re-selecting iterations: each starts from the previous threshold.
        hint = SelectionHint()
        out, _ = admm_loop(
            engine, solve, cross, y_cur, u, support,
            threshold_index=index_at, rho=self.rho, n_iter=self.n_iter + 1, mask_iter=n_select,
            hints=[hint] * n_select,
        )
        if fixed is None and _count_nonzero(xp, out) < kept:
            # Ties at the threshold kept fewer than K (constant or boolean W, repeated
            # values): rerun with exact top-K masks, ties broken by position.
            out = self._tie_broken_loop(
                engine, solve, cross, start, n_select, lambda t: self._kept_at(t, n_select, kept, total)
            )
        budget = kept if fixed is None else int(fixed.sum())
        pruned = engine.copy(engine.unscale_rows(out, scale).T)
        return self._sparse_result(pruned, engine, budget=budget, W=W, gram=gram)

    def _tie_broken_loop(
        self, engine: Any, solve: Any, cross: Any, start: Any, n_select: int, kept_at: Any
    ) -> Any:
        """The iterations of :func:`sparsefact.admm.admm_loop` with exact top-k masks (ties by position)."""
        xp = engine.xp
        y = engine.copy(start)
        u = engine.zeros(start.shape, start)
        mask = None
        steps = self.n_iter + 1
        out = y
        for t in range(steps):
            last = t == steps - 1
            if t < n_select:
                v = engine.add(y, u)
                mask = engine.topk_mask(xp.abs(v), kept_at(t))
                mask, u, out = engine.admm_update(v, u, cross, mask, self.rho, last, None, True)
            else:
                mask, u, out = engine.admm_update(y, u, cross, mask, self.rho, last)
            if not last:
                y = solve(out)
        return out


__all__ = [
    "ADMMPruning",
    "MagnitudePruning",
    "SparseGPT",
    "Wanda",
    "kept_budget",
    "sparsegpt_prune",
    "sparsegpt_prune_portable",
    "upper_cholesky_of_inverse",
]
