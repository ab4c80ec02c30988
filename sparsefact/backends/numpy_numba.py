"""CPU engine: NumPy for products, Numba for selection and element-wise passes.

Differences from :class:`~sparsefact.backends.array_api.ArrayAPIEngine` are only in how
the kernels run, never in what they compute:

- ``spd_inverse``: Cholesky factorisation and inversion from the factor (LAPACK
  ``potrf`` + ``potri``, called from Numba without the GIL), preferably the LAPACK inside
  NumPy's own OpenBLAS (:mod:`sparsefact.backends._numba_kernels`). Chosen by measurement
  on a 2-core machine (float32, k=1024): Cholesky inverse 10 ms, ``np.linalg.inv`` (LU)
  77 ms, ``np.linalg.eigh`` 132 ms. An eigendecomposition would serve both shifts of a
  sub-problem (rho and the warm-start rho0) with one factorisation, but costs more than
  two Cholesky inversions; triangular solves per step would avoid the inverse but run
  well below GEMM speed, while with the inverse every x-step is one GEMM at full rate. A
  recursive 2x2-block (Schur complement) inversion in NumPy's GEMM was faster still, but
  lost accuracy in float32: on the Gram of a real MiniLM layer (1536 inputs) shifted by
  0.01 (condition number 2.6e4) its relative error was 0.62 against 8e-5 for Cholesky.
- One thread pool: NumPy and SciPy wheels each bundle their own OpenBLAS, whose idle
  workers spin for a while after each call; alternating NumPy GEMMs with SciPy LAPACK on
  2 cores measured 2.5x slower, and an inversion took 38 ms right after a GEMM against
  10 ms with NumPy's own LAPACK. Where NumPy's LAPACK cannot be found, SciPy's is used,
  held to one thread during fits, and ``spd_inverse_pair`` runs the two inversions of a
  sub-problem at once on a worker thread.
- Selection: radix select on float bit patterns in Numba (no sort); a repeated selection
  starts from its previous threshold and usually takes one counting pass
  (:class:`~sparsefact.backends._base.SelectionHint`).
- z/u/mask/rhs updates: one fused pass, in place.
- Threads: a fit runs on at most the cores free when it starts
  (:func:`~sparsefact.backends.threads.adaptive_threads`).
- The Numba kernels are serial: parallel kernels lost to OpenBLAS's spinning idle
  threads (measurements in :mod:`sparsefact.backends._numba_kernels`).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from . import _numba_kernels as nk
from . import _numpy_kernels as npk
from .array_api import ArrayAPIEngine
from .threads import adaptive_threads, single_threaded_foreign_blas


def _c_contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _cholesky_spd_inverse(shifted: np.ndarray) -> np.ndarray:
    """Inverse of the SPD matrix ``shifted`` (overwritten), full and symmetric."""
    info = nk.cholesky_inverse_inplace(shifted)
    if info != 0:
        raise np.linalg.LinAlgError(
            "the shifted normal equations are not positive definite "
            f"(LAPACK potrf info={info}); the factors contain non-finite values"
        )
    nk.symmetrize_from_lower(shifted)
    return shifted


_pool: ThreadPoolExecutor | None = None


def _worker() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparsefact-lapack")
    return _pool


class NumpyNumbaEngine(ArrayAPIEngine):
    """The CPU engine for NumPy inputs (see the module docstring)."""

    name = "numpy_numba"

    def __init__(self) -> None:
        import array_api_compat.numpy as np_compat

        super().__init__(np_compat)

    def loop_context(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        with stack:
            stack.enter_context(single_threaded_foreign_blas())
            stack.enter_context(adaptive_threads())
            return stack.pop_all()

    def copy(self, a):
        return np.array(a, order="C", copy=True)

    def matmul(self, a, b):
        return np.matmul(a, b)

    def eye(self, k, like):
        return np.eye(k, dtype=like.dtype)

    def zeros(self, shape, like):
        return np.zeros(shape, dtype=like.dtype)

    def diag(self, a):
        return np.diagonal(a).copy()

    def row_norms(self, a):
        return np.sqrt(np.einsum("ij,ij->i", a, a))

    def col_norms(self, a):
        return np.sqrt(np.einsum("ij,ij->j", a, a))

    def add_to_diagonal(self, a, value):
        out = np.array(a, copy=True, order="C")
        out.flat[:: out.shape[0] + 1] += value
        return out

    def spd_inverse(self, gram, shift):
        return _cholesky_spd_inverse(self.add_to_diagonal(gram, shift))

    def spd_inverse_pair(self, gram, shift_a, shift_b):
        if nk.USES_NUMPY_LAPACK:  # both in NumPy's pool, each on all its threads
            return self.spd_inverse(gram, shift_a), self.spd_inverse(gram, shift_b)
        # SciPy's LAPACK, one thread each: two inversions on two cores at once.
        pending = _worker().submit(_cholesky_spd_inverse, self.add_to_diagonal(gram, shift_b))
        first = _cholesky_spd_inverse(self.add_to_diagonal(gram, shift_a))
        return first, pending.result()

    def kth_smallest_abs(self, v, index):
        return nk.kth_smallest_abs(_c_contiguous(v), index)

    def add_and_select(self, y, u, index, hint=None):
        y = _c_contiguous(y)
        tau = nk.add_and_select(y, _c_contiguous(u), index, hint)
        return y, tau

    def add(self, y, u):
        y = _c_contiguous(y)
        nk.add_inplace(y, _c_contiguous(u))
        return y

    def scale_rows(self, a, scale):
        a = _c_contiguous(a)
        nk.scale_rows_inplace(a, scale, False)
        return a

    def unscale_rows(self, a, scale):
        a = _c_contiguous(a)
        nk.scale_rows_inplace(a, scale, True)
        return a

    def warm_start(self, cross, z_prev, u_prev, scale, rho0):
        cross = _c_contiguous(cross)
        u = np.empty_like(cross)
        rhs = np.empty_like(cross)
        nk.warm_start(
            cross, _c_contiguous(z_prev), _c_contiguous(u_prev), scale,
            cross.dtype.type(rho0), u, rhs,
        )
        return u, rhs

    def admm_update(self, y, u, cross, mask, rho, last, tau=None, y_is_sum=False):
        if tau is not None and np.ndim(tau) > 0:  # per-column thresholds: portable path
            return super().admm_update(y, u, cross, mask, rho, last, tau, y_is_sum)
        y = _c_contiguous(y)
        u = _c_contiguous(u)
        refresh = tau is not None
        if mask is None:
            mask = np.empty(y.shape, dtype=np.bool_)
        dtype = y.dtype.type
        nk.admm_update(
            y,
            u,
            _c_contiguous(cross),
            mask,
            dtype(rho),
            bool(last),
            dtype(tau if refresh else 0.0),
            refresh,
            bool(y_is_sum),
        )
        return mask, u, y

    # ------------------------------------------------------------------ selection (exact top-k)
    def topk_mask(self, scores, count):
        return npk.global_topk_mask(scores, count)

    def row_topk_mask(self, scores, count):
        return npk.row_topk_mask(scores, count)

    def n_m_mask(self, scores, n, m):
        return npk.n_m_mask(scores, n, m)

    def row_budget_mask(self, scores, kept):
        return npk.row_budget_mask(scores, kept)

    # ------------------------------------------------------------------ dense linear algebra
    def svd(self, a):
        return scipy.linalg.svd(a, full_matrices=False, check_finite=False)

    def gram_square_root(self, gram):
        return npk.gram_square_root(gram)

    def upper_cholesky_of_inverse(self, hessian):
        return npk.upper_cholesky_of_inverse(hessian)

    def obs_panel(self, w_panel, factor_t, errors, prune_coef):
        nk.obs_panel(w_panel, factor_t, errors, prune_coef)

    # ------------------------------------------------------------------ results
    def to_sparse(self, dense):
        values = np.ascontiguousarray(dense)
        if values.dtype in (np.float32, np.float64) and values.ndim == 2:
            data, indices, indptr = nk.dense_to_csr(values)
            return sp.csr_array((data, indices, indptr), shape=values.shape)
        return sp.csr_array(values)
