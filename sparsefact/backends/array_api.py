"""Portable engine: every kernel written against the Python array API standard.

This engine runs under any namespace that ``array_api_compat`` understands (NumPy,
``array_api_strict``, PyTorch, CuPy, ...). It is the reference for the faster engines:
:mod:`sparsefact.backends.numpy_numba` overrides the hot kernels with fused Numba
loops and a Cholesky-based inverse, but must produce the same numbers.

All methods are functional (they return new arrays) so that namespaces with
immutable arrays work. Faster engines may reuse the buffers they are handed: callers
treat every array passed to a kernel as consumed unless documented otherwise.
"""

from __future__ import annotations

import contextlib
from typing import Any

import array_api_compat


class ArrayAPIEngine:
    """Kernels of the DSF/ADMM loops in plain array-API calls.

    Parameters
    ----------
    xp : module
        An array-API compatible namespace (as returned by
        ``array_api_compat.array_namespace``).
    """

    name = "array_api"

    def __init__(self, xp: Any) -> None:
        self.xp = xp

    # ------------------------------------------------------------------ context
    def loop_context(self) -> contextlib.AbstractContextManager:
        """Context entered around a whole fit (thread-pool settings and the like)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ basics
    def asarray_like(self, value: Any, like: Any) -> Any:
        """``value`` as an array of ``like``'s dtype on ``like``'s device."""
        xp = self.xp
        return xp.asarray(value, dtype=like.dtype, device=array_api_compat.device(like))

    def eye(self, k: int, like: Any) -> Any:
        """Identity of size ``k`` in ``like``'s dtype and device."""
        return self.xp.eye(k, dtype=like.dtype, device=array_api_compat.device(like))

    def zeros(self, shape: tuple[int, ...], like: Any) -> Any:
        """Zeros in ``like``'s dtype and device."""
        return self.xp.zeros(shape, dtype=like.dtype, device=array_api_compat.device(like))

    def copy(self, a: Any) -> Any:
        """A new array with ``a``'s values (C order where the namespace has orders)."""
        return self.xp.asarray(a, copy=True)

    def matmul(self, a: Any, b: Any) -> Any:
        """Dense matrix product ``a @ b``."""
        return self.xp.matmul(a, b)

    def diag(self, a: Any) -> Any:
        """Diagonal of a square matrix as a vector."""
        return self.xp.linalg.diagonal(a) if hasattr(self.xp, "linalg") else self.xp.diagonal(a)

    def row_norms(self, a: Any) -> Any:
        """Euclidean norm of every row of ``a``."""
        xp = self.xp
        return xp.sqrt(xp.sum(a * a, axis=1))

    def col_norms(self, a: Any) -> Any:
        """Euclidean norm of every column of ``a``."""
        xp = self.xp
        return xp.sqrt(xp.sum(a * a, axis=0))

    def add_to_diagonal(self, a: Any, value: float) -> Any:
        """``a + value * I`` (a new array)."""
        return a + value * self.eye(a.shape[0], a)

    # ------------------------------------------------------------------ solves
    def spd_inverse(self, gram: Any, shift: float) -> Any:
        """Inverse of the symmetric positive definite matrix ``gram + shift * I``.

        The systems met here are column-normalised and shifted by a ridge term and by
        the ADMM penalty, so they are well conditioned and an explicit inverse is
        accurate; every later solve is then one matrix product.
        """
        return self.xp.linalg.inv(self.add_to_diagonal(gram, shift))

    def spd_inverse_pair(self, gram: Any, shift_a: float, shift_b: float) -> tuple[Any, Any]:
        """``(spd_inverse(gram, shift_a), spd_inverse(gram, shift_b))``.

        Engines may compute the two at the same time.
        """
        return self.spd_inverse(gram, shift_a), self.spd_inverse(gram, shift_b)

    # ------------------------------------------------------------------ selection
    def kth_smallest_abs(self, v: Any, index: int) -> float:
        """The value at 0-based position ``index`` of ``sort(|v|)`` over all entries."""
        xp = self.xp
        flat = xp.reshape(xp.abs(v), (-1,))
        return float(xp.sort(flat)[index])

    def add_and_select(self, y: Any, u: Any, index: int, hint: Any = None) -> tuple[Any, float]:
        """``v = y + u`` and the value at position ``index`` of ``sort(|v|)`` (``y`` consumed).

        ``hint`` is not used here (a full selection every time).
        """
        v = self.add(y, u)
        return v, self.kth_smallest_abs(v, index)

    def column_kth_smallest_abs(self, v: Any, index: int) -> Any:
        """Per column: the value at 0-based position ``index`` of ``sort(|v[:, j]|)``.

        Returned as a ``(1, n_columns)`` array so that it broadcasts against ``v``.
        """
        xp = self.xp
        return xp.sort(xp.abs(v), axis=0)[index : index + 1, :]

    def row_kth_smallest_abs(self, v: Any, index: int) -> Any:
        """Per row: the value at 0-based position ``index`` of ``sort(|v[i, :]|)``.

        Returned as an ``(n_rows, 1)`` array so that it broadcasts against ``v``.
        """
        xp = self.xp
        return xp.sort(xp.abs(v), axis=1)[:, index : index + 1]

    # ------------------------------------------------------------------ element-wise
    def add(self, y: Any, u: Any) -> Any:
        """``y + u`` (``y`` is consumed)."""
        return y + u

    def scale_rows(self, a: Any, scale: Any) -> Any:
        """``diag(scale) @ a`` (``a`` is consumed)."""
        return a * scale[:, None]

    def unscale_rows(self, a: Any, scale: Any) -> Any:
        """``diag(scale)^-1 @ a`` (``a`` is consumed)."""
        return a / scale[:, None]

    def warm_start(self, cross: Any, z_prev: Any, u_prev: Any, scale: Any, rho0: float):
        """Rescale the carried ADMM state and form the warm-start right-hand side.

        Returns ``(u, rhs)`` with ``u = diag(scale) u_prev`` and
        ``rhs = cross + rho0 * (diag(scale) z_prev - u)``.
        """
        z = self.scale_rows(z_prev, scale)
        u = self.scale_rows(u_prev, scale)
        return u, cross + rho0 * (z - u)

    def admm_update(
        self,
        y: Any,
        u: Any,
        cross: Any,
        mask: Any,
        rho: float,
        last: bool,
        tau: Any = None,
        y_is_sum: bool = False,
    ):
        """One z/u update of the ADMM for sparse least squares, fused with the x-step rhs.

        With ``v = y + u`` (or ``v = y`` when ``y_is_sum``), and the mask refreshed as
        ``|v| > tau`` when ``tau`` is given:

        - ``z = v * mask``; ``u_new = u + y - z`` (equal to ``v * ~mask``);
        - ``out = cross + rho * (z - u_new)`` (the next x-step's right-hand side), or
          ``out = z`` when ``last``.

        Returns ``(mask, u_new, out)``.
        """
        xp = self.xp
        v = y if y_is_sum else y + u
        if tau is not None:
            mask = xp.abs(v) > tau
        zero = xp.zeros_like(v)
        z = xp.where(mask, v, zero)
        u_new = v - z
        if last:
            return mask, u_new, z
        return mask, u_new, cross + rho * (z - u_new)

    def keep_largest(self, a: Any, count: int) -> Any:
        """``a`` with all but its ``count`` largest-magnitude entries set to 0.

        Ties at the threshold are kept in row-major order, so exactly ``count`` entries
        survive; without ties this is the strict rule ``|a| > tau``.
        """
        xp = self.xp
        numel = a.shape[0] * a.shape[1]
        if count >= numel:
            return self.copy(a)
        if count <= 0:
            return xp.zeros_like(a)
        tau = self.kth_smallest_abs(a, numel - count)
        magnitude = xp.abs(a)
        above = magnitude > tau
        ties = magnitude == tau
        need = count - int(xp.sum(xp.astype(above, xp.int64)))
        tie_rank = xp.reshape(
            xp.cumulative_sum(xp.reshape(xp.astype(ties, xp.int64), (-1,))), a.shape
        )
        keep = above | (ties & (tie_rank <= need))
        return xp.where(keep, a, xp.zeros_like(a))

    # ------------------------------------------------------------------ exact top-k masks
    # Ranks come from a stable descending argsort and its inverse permutation (the argsort of
    # the argsort), so only standard functions are needed: ties go to the lower position.
    def _descending_ranks(self, scores: Any, axis: int) -> Any:
        xp = self.xp
        order = xp.argsort(scores, axis=axis, descending=True, stable=True)
        return xp.argsort(order, axis=axis, stable=True)

    def topk_mask(self, scores: Any, count: int) -> Any:
        """Boolean mask of the ``count`` largest entries of ``scores`` over the whole matrix."""
        xp = self.xp
        flat = xp.reshape(scores, (-1,))
        ranks = self._descending_ranks(flat, 0)
        return xp.reshape(ranks < int(count), scores.shape)

    def row_topk_mask(self, scores: Any, count: int) -> Any:
        """Boolean mask of the ``count`` largest entries of every row."""
        return self._descending_ranks(scores, 1) < int(count)

    def n_m_mask(self, scores: Any, n: int, m: int) -> Any:
        """Keep the ``n`` largest of every ``m`` consecutive entries along each row."""
        xp = self.xp
        rows, cols = scores.shape
        groups = xp.reshape(scores, (rows, cols // m, m))
        return xp.reshape(self._descending_ranks(groups, 2) < int(n), (rows, cols))

    def row_budget_mask(self, scores: Any, kept: int) -> Any:
        """Exactly ``kept`` entries spread over the rows as evenly as possible (Wanda's rule).

        Every row keeps its ``kept // m`` highest scores; the ``kept % m`` leftover entries go
        to the rows whose next-highest score is largest; ties by position.
        """
        xp = self.xp
        m, _ = scores.shape
        base, extra = divmod(int(kept), m)
        ranks = self._descending_ranks(scores, 1)
        counts = xp.full((m,), base, dtype=xp.int64, device=array_api_compat.device(scores))
        if extra:
            ordered = xp.sort(scores, axis=1, descending=True, stable=True)
            next_scores = ordered[:, base]
            row_rank = self._descending_ranks(next_scores, 0)
            counts = counts + xp.astype(row_rank < extra, xp.int64)
        return ranks < counts[:, None]

    # ------------------------------------------------------------------ dense linear algebra
    def svd(self, a: Any) -> tuple[Any, Any, Any]:
        """Thin SVD ``a = U diag(s) Vh``."""
        return self.xp.linalg.svd(a, full_matrices=False)

    def gram_square_root(self, gram: Any) -> Any:
        """A factor ``S`` with ``S S^T = gram`` for a PSD, possibly singular ``gram``.

        The lower Cholesky factor when it exists, else ``Q sqrt(max(L, 0)) Q^T`` from the
        eigendecomposition (see :func:`sparsefact.lowrank.gram_square_root`).
        """
        xp = self.xp
        g = 0.5 * (gram + gram.T)
        try:
            factor = xp.linalg.cholesky(g)
        except Exception:  # noqa: BLE001 - each namespace raises its own LinAlgError type
            factor = None
        if factor is not None and bool(xp.all(xp.isfinite(factor))):
            return factor
        eigvals, eigvecs = xp.linalg.eigh(g)
        return xp.matmul(eigvecs * xp.sqrt(xp.clip(eigvals, 0.0, None))[None, :], eigvecs.T)

    def upper_cholesky_of_inverse(self, hessian: Any) -> Any:
        """Upper-triangular ``U`` with ``hessian^-1 = U^T U`` (SparseGPT's factor).

        With ``J`` the index reversal and ``J H J = L L^T``: ``U = J L^-1 J``.

        Raises
        ------
        numpy.linalg.LinAlgError
            If ``hessian`` is not (numerically) positive definite.
        """
        xp = self.xp
        reversed_h = xp.flip(xp.flip(hessian, axis=0), axis=1)
        try:
            lower = xp.linalg.cholesky(reversed_h)
        except Exception as exc:  # noqa: BLE001 - each namespace raises its own error type
            import numpy as np

            raise np.linalg.LinAlgError(f"the damped Hessian is not positive definite ({exc})") from exc
        if not bool(xp.all(xp.isfinite(lower))):
            import numpy as np

            raise np.linalg.LinAlgError("the damped Hessian is not positive definite")
        inverse = xp.linalg.inv(lower)
        return xp.flip(xp.flip(inverse, axis=0), axis=1)

    # ------------------------------------------------------------------ results
    def to_sparse(self, dense: Any) -> Any:
        """A ``scipy.sparse.csr_array`` copy of a dense factor (on the host)."""
        import numpy as np
        import scipy.sparse as sp

        from ._host import to_host

        return sp.csr_array(np.ascontiguousarray(to_host(dense)))

    def obs_panel(self, w_panel: Any, factor_t: Any, errors: Any, prune_coef: Any) -> None:
        """SparseGPT's column loop over one panel, in place (:func:`sparsefact.pruning.sparsegpt_prune`).

        For each row ``j`` of the panel (a column of ``W``): ``w_panel[j] -= factor_t[j, :j] @
        errors[:j]``, then ``errors[j] = w_panel[j] * prune_coef[j]``. Needs a namespace whose
        arrays support item assignment.
        """
        for j in range(w_panel.shape[0]):
            if j > 0:
                w_panel[j, :] = w_panel[j, :] - self.xp.matmul(factor_t[j, :j], errors[:j, :])
            errors[j, :] = w_panel[j, :] * prune_coef[j, :]
