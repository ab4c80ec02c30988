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

    def add_and_select(self, y: Any, u: Any, index: int) -> tuple[Any, float]:
        """``v = y + u`` and the value at position ``index`` of ``sort(|v|)`` (``y`` consumed)."""
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
