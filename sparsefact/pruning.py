"""Single-sparse layer-wise pruning baselines: Wanda, SparseGPT and ADMM pruning.

Each compressor replaces ``W`` (``m x n``, rows = outputs, columns = inputs) by one
sparse matrix ``weight_`` of the same shape, chosen with the calibration Gram
``G = X_calib^T X_calib`` (``G = I`` without calibration). They share the contract of
:class:`sparsefact.MagnitudePruning` (design.md §3): ``fit(W, X_calib)`` or
``fit(W, calibration=...)``, ``reconstruct()``, ``calibrated_err_``,
``reconstruction_err_``, ``density_``, ``nnz_`` and ``backend_``.

Budget rule (all three, unstructured): a density ``d`` keeps at most
``K = floor(d * m * n)`` entries (a product within ``1e-9`` relative of an integer
counts as that integer, so ``0.29 * 100`` gives 29). Exactly ``K`` entries are kept
unless some kept weights are exactly zero (e.g. dead inputs).

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
import scipy.linalg
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._validation import convert_to_namespace, to_numpy
from .admm import admm_loop
from .backends._numba_kernels import obs_panel
from .backends.numpy_numba import single_threaded_foreign_blas
from .calibration import Calibration
from .estimators import _BaseCompressor, _to_sparse
from .masks import check_n_m, global_topk_mask, kept_budget, n_m_mask

#: Added to ``sqrt(diag G)`` before dividing by it (ADMM preconditioning).
PRECONDITION_EPS = 1e-8

_BLAS_CONTROLLER: Any = None

#: Width of the column panels inside a SparseGPT block that are updated one column at
#: a time; the rest of the block is updated by one matrix product per panel.
_SPARSEGPT_PANEL = 16


# ---------------------------------------------------------------------- helpers
def _row_budget_mask(scores: np.ndarray, kept: int) -> np.ndarray:
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


def _reversed_factor_inverse(reversed_h: np.ndarray) -> np.ndarray:
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
    return _reversed_factor_inverse(np.ascontiguousarray(hessian[::-1, ::-1]))


def _one_blas_thread() -> Any:
    """Context with BLAS limited to one thread (for loops of many tiny BLAS calls).

    Multi-threaded BLAS pays a synchronisation per call; on a loaded machine the
    per-column products of SparseGPT became 20x slower with two threads.
    """
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


class _SparseWeightCompressor(_BaseCompressor):
    """Shared storage of the single-sparse compressors: ``weight_`` and the dense copy."""

    def _store(self, pruned: Any, W_checked: Any, xp: Any, gram: Any, backend: str) -> None:
        dense = convert_to_namespace(pruned, W_checked, xp)
        self._dense = dense
        self.weight_ = _to_sparse(dense)
        m, n = W_checked.shape
        self.nnz_ = int(self.weight_.nnz)
        self.density_ = self.nnz_ / (m * n)
        self.backend_ = backend
        self._record_errors(W_checked, dense, gram)

    def reconstruct(self) -> Any:
        """The pruned matrix as a dense array in ``W``'s namespace, device and dtype."""
        check_is_fitted(self)
        return self._dense


_SHARED_PARAMETERS = {
    **_BaseCompressor._parameter_constraints,
    "density": [Interval(Real, 0, 1, closed="right")],
}


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
    backend : str, default="auto"
        Accepted for a uniform API; the selection runs with NumPy on the CPU.

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
        ``"numpy"``.
    n_features_in_ : int

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

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, W: Any, y: Any = None, *, X_calib: Any = None, calibration: Calibration | None = None):
        """Prune ``W`` by the Wanda score.

        Parameters
        ----------
        W : array of shape (m, n)
            Layer weight (rows = outputs, columns = inputs).
        y : array of shape (n_tokens, n), optional
            A 2-D second positional argument is taken as ``X_calib``.
        X_calib : array of shape (n_tokens, n), optional
            Calibration inputs of the layer.
        calibration : Calibration, optional
            Precomputed calibration (only its diagonal is used).

        Returns
        -------
        self
        """
        W_checked, xp, gram = self._resolve_inputs(W, y, X_calib, calibration)
        values = to_numpy(W_checked)
        m, n = values.shape
        n_m = check_n_m(self.n_m, self.density, n)
        scores = np.abs(values).astype(np.float64)
        if gram is not None:
            scores *= np.sqrt(np.maximum(np.diagonal(to_numpy(gram)).astype(np.float64), 0.0))
        if n_m is not None:
            mask = n_m_mask(scores, *n_m)
        else:
            mask = _row_budget_mask(scores, kept_budget(self.density, m * n))
        pruned = np.where(mask, values, 0).astype(values.dtype, copy=False)
        self._store(pruned, W_checked, xp, gram, "numpy")
        return self


# ---------------------------------------------------------------------- SparseGPT
def sparsegpt_prune(
    W: np.ndarray,
    gram: np.ndarray | None,
    *,
    kept: int,
    block_size: int = 128,
    damping: float = 0.01,
    n_m: tuple[int, int] | None = None,
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

    Returns
    -------
    ndarray of shape (m, n)
        The pruned and compensated weights.
    """
    dtype = W.dtype
    m, n = W.shape
    work = np.array(W.T, dtype=dtype, order="C", copy=True)  # column j of W = row j here
    diag = np.ones(n) if gram is None else np.diagonal(gram).astype(np.float64)
    dead = np.flatnonzero(diag <= 0)
    work[dead] = 0.0
    diag[dead] = 1.0
    ridge = damping * float(np.mean(diag))

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
            factor = _reversed_factor_inverse(reversed_hessian(dtype))
    except np.linalg.LinAlgError:
        if dtype == np.float64:
            raise
        with single_threaded_foreign_blas():
            factor = _reversed_factor_inverse(reversed_hessian(np.dtype(np.float64))).astype(dtype)
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
            block_kept = kept * i2 // n - kept * i1 // n
            keep = global_topk_mask(np.multiply(np.abs(work[i1:i2]), inv_block), block_kept)
            np.multiply(~keep, inv_block, out=prune_coef)
        else:
            keep = np.empty((width, m), dtype=bool)
        errors = np.empty((width, m), dtype=dtype)
        with _one_blas_thread():
            for a in range(i1, i2, panel):
                b = min(a + panel, i2)
                # Panel-local views; the panel's factor is copied transposed so that the
                # coefficients of column q are one contiguous row.
                w_p, e_p, c_p = work[a:b], errors[a - i1 : b - i1], prune_coef[a - i1 : b - i1]
                f_t = np.ascontiguousarray(factor[a:b, a:b].T)
                if n_m is None:  # the whole column loop of the panel in one compiled call
                    obs_panel(w_p, f_t, e_p, c_p)
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
    backend : str, default="auto"
        Accepted for a uniform API; runs with NumPy (LAPACK) in ``W``'s dtype.

    Attributes
    ----------
    weight_ : scipy.sparse.csr_array of shape (m, n)
        The pruned and compensated weights.
    calibrated_err_, reconstruction_err_, density_, nnz_, backend_, n_features_in_
        As for :class:`Wanda`.

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

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, W: Any, y: Any = None, *, X_calib: Any = None, calibration: Calibration | None = None):
        """Prune ``W`` with OBS compensation.

        Parameters
        ----------
        W : array of shape (m, n)
        y : array of shape (n_tokens, n), optional
            A 2-D second positional argument is taken as ``X_calib``.
        X_calib : array of shape (n_tokens, n), optional
        calibration : Calibration, optional

        Returns
        -------
        self

        Raises
        ------
        numpy.linalg.LinAlgError
            If ``G + lambda I`` is not positive definite (only possible with
            ``damping=0`` and a singular ``G``).
        """
        W_checked, xp, gram = self._resolve_inputs(W, y, X_calib, calibration)
        values = to_numpy(W_checked)
        m, n = values.shape
        n_m = check_n_m(self.n_m, self.density, n)
        try:
            pruned = sparsegpt_prune(
                values,
                None if gram is None else to_numpy(gram),
                kept=kept_budget(self.density, m * n),
                block_size=self.block_size,
                damping=self.damping,
                n_m=n_m,
            )
        except np.linalg.LinAlgError as exc:
            raise np.linalg.LinAlgError(
                f"SparseGPT: G + lambda I is not positive definite ({exc}); use damping > 0"
            ) from exc
        self._store(pruned, W_checked, xp, gram, "numpy")
        return self


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
    (the entries of ``|Y + U|`` strictly above its ``(m n - K)``-th smallest value;
    ties can only keep fewer).

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

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, W: Any, y: Any = None, *, X_calib: Any = None, calibration: Calibration | None = None):
        """Select a mask and update the kept weights by ADMM.

        Parameters
        ----------
        W : array of shape (m, n)
            NumPy, torch, CuPy or any array-API array.
        y : array of shape (n_tokens, n), optional
            A 2-D second positional argument is taken as ``X_calib``.
        X_calib : array of shape (n_tokens, n), optional
        calibration : Calibration, optional

        Returns
        -------
        self
        """
        W_checked, xp, gram = self._resolve_inputs(W, y, X_calib, calibration)
        m, n = W_checked.shape
        fixed = None if self.mask is None else self._check_mask((m, n))
        engine = self._engine(xp)
        with engine.loop_context():
            hessian = engine.eye(n, W_checked) if gram is None else gram
            scale = xp.sqrt(xp.clip(engine.diag(hessian), 0.0, None)) + PRECONDITION_EPS
            system = (hessian / scale[:, None]) / scale[None, :]
            ridge = self.damping * float(xp.mean(engine.diag(system)))
            start = engine.copy((W_checked * scale[None, :]).T)  # n x m: W~0
            cross = engine.matmul(system, start) + ridge * start  # C = G~_l W~0
            inverse = engine.spd_inverse(system, ridge + self.rho)
            y_cur = engine.copy(start)
            u = engine.zeros(start.shape, start)
            total, kept = m * n, kept_budget(self.density, m * n)
            if fixed is not None:
                support = xp.asarray(
                    np.ascontiguousarray(fixed.T), device=array_api_compat.device(W_checked)
                )
                n_select = 0
            else:
                support = None
                n_select = max(1, min(self.mask_iter, self.n_iter))

            def index_at(t: int) -> int:
                return total - self._kept_at(t, n_select, kept, total) - 1

            # The reference order: n_iter x-steps, then a final z-step (n_iter + 1 z-steps).
            out, _ = admm_loop(
                engine, lambda rhs: engine.matmul(inverse, rhs), cross, y_cur, u, support,
                threshold_index=index_at, rho=self.rho, n_iter=self.n_iter + 1, mask_iter=n_select,
            )
            pruned = engine.copy(engine.unscale_rows(out, scale).T)
        self._store(pruned, W_checked, xp, gram, engine.name)
        return self


__all__ = ["ADMMPruning", "SparseGPT", "Wanda", "kept_budget", "sparsegpt_prune", "upper_cholesky_of_inverse"]
