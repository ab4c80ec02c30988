"""The engine interface: the kernels every engine provides, in one documented protocol.

An engine is chosen once per fit from ``backend=`` and the input's array namespace
(:func:`sparsefact.backends.get_engine`) and handed to the method's ``_fit``. The math of the
methods (``admm.py``, ``dsf.py``, ``pruning.py``, ...) is written against this protocol and the
array API; engines differ only in how the kernels run, never in what they compute:

- :class:`~sparsefact.backends.array_api.ArrayAPIEngine` -- every kernel in standard array-API
  calls (NumPy, ``array_api_strict``, torch, CuPy): the reference implementation;
- :class:`~sparsefact.backends.numpy_numba.NumpyNumbaEngine` -- NumPy arrays; Numba kernels for
  selection and the fused element-wise passes, LAPACK for the SPD inverses and factorisations;
- :class:`~sparsefact.backends.cupy_backend.CupyEngine` -- CuPy arrays on a GPU.

Conventions: arrays passed to a kernel are consumed unless its docstring says otherwise (engines
may reuse the buffers); results are in the input's namespace, device and dtype, except
``to_sparse`` (a SciPy or cupyx CSR matrix) and the scalar-returning selections.
A new engine subclasses :class:`ArrayAPIEngine` and overrides what it can do faster; the test
suite checks every engine against the portable one (``tests/test_backends.py``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["Engine", "SelectionHint"]


@dataclass
class SelectionHint:
    """Where the threshold of a repeated selection was last time, to select in one pass.

    DSF selects a threshold over the same sub-problem's magnitudes in every outer iteration,
    and it moves little from one to the next (median 2.5% on a 384x384 layer, at most 18%).
    The CPU engine's ``add_and_select`` (:func:`sparsefact.backends._numba_kernels.add_and_select`)
    with a hint takes :meth:`bracket` around the previous threshold, counts in one pass the
    magnitudes below it and copies those inside it, and selects among the copies; when the rank
    falls outside the bracket, or the bracket holds more than :data:`HINT_MAX_SHARE` of the
    entries, it falls back to the full radix selection. Either way the result is exactly the
    radix selection's. The width follows the observed moves (:data:`HINT_WIDTH_FACTOR` times
    the last relative move, within :data:`HINT_WIDTH_RANGE`).

    Attributes
    ----------
    tau : float or None
        The last threshold (``None``: no hint yet).
    width : float
        Relative half-width of the next bracket.
    hits, misses : int
        Selections answered in one pass, and those that fell back.
    """

    tau: float | None = None
    width: float = 0.05
    hits: int = 0
    misses: int = 0

    def bracket(self) -> tuple[float, float] | None:
        """``(low, high)`` around the last threshold (relative half-width ``width``), or None.

        None when there is no usable previous threshold (none yet, zero or not finite).
        """
        tau = self.tau
        if tau is None or not tau > 0 or not math.isfinite(tau):
            return None
        return max(tau * (1.0 - self.width), 0.0), tau * (1.0 + self.width)

    def update(self, tau: float, hit: bool) -> None:
        """Record the selected ``tau`` and adapt the width."""
        if self.tau is not None and self.tau > 0:
            moved = abs(tau / self.tau - 1.0)
            low, high = HINT_WIDTH_RANGE
            self.width = min(max(HINT_WIDTH_FACTOR * moved, low), high)
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        self.tau = tau


#: The bracket may hold at most this share of the entries (else: full radix selection).
HINT_MAX_SHARE = 0.125
#: Next bracket half-width = this factor times the last relative move of the threshold ...
HINT_WIDTH_FACTOR = 2.0
#: ... clipped to this range.
HINT_WIDTH_RANGE = (0.002, 0.5)


@runtime_checkable
class Engine(Protocol):
    """The kernels an engine provides (see the module docstring).

    Attributes
    ----------
    name : str
        The engine's name, recorded by estimators in ``backend_``.
    xp : module
        The array-API namespace of the arrays it works on.
    """

    name: str
    xp: Any

    def loop_context(self) -> contextlib.AbstractContextManager:
        """Context entered around a whole fit (thread-pool settings and the like)."""
        ...

    def asarray_like(self, value: Any, like: Any) -> Any:
        """``value`` as an array of ``like``'s dtype on ``like``'s device."""
        ...

    def eye(self, k: int, like: Any) -> Any:
        """Identity of size ``k`` in ``like``'s dtype and device."""
        ...

    def zeros(self, shape: tuple[int, ...], like: Any) -> Any:
        """Zeros in ``like``'s dtype and device."""
        ...

    def copy(self, a: Any) -> Any:
        """A new array with ``a``'s values (C order where the namespace has orders)."""
        ...

    def matmul(self, a: Any, b: Any) -> Any:
        """Dense matrix product ``a @ b``."""
        ...

    def diag(self, a: Any) -> Any:
        """Diagonal of a square matrix as a vector."""
        ...

    def row_norms(self, a: Any) -> Any:
        """Euclidean norm of every row of ``a``."""
        ...

    def col_norms(self, a: Any) -> Any:
        """Euclidean norm of every column of ``a``."""
        ...

    def add_to_diagonal(self, a: Any, value: float) -> Any:
        """``a + value * I`` (a new array)."""
        ...

    def spd_inverse(self, gram: Any, shift: float) -> Any:
        """Inverse of the symmetric positive definite matrix ``gram + shift * I``."""
        ...

    def spd_inverse_pair(self, gram: Any, shift_a: float, shift_b: float) -> tuple[Any, Any]:
        """``(spd_inverse(gram, shift_a), spd_inverse(gram, shift_b))``."""
        ...

    def kth_smallest_abs(self, v: Any, index: int) -> float:
        """The value at 0-based position ``index`` of ``sort(|v|)`` over all entries."""
        ...

    def add_and_select(
        self, y: Any, u: Any, index: int, hint: SelectionHint | None = None
    ) -> tuple[Any, float]:
        """``v = y + u`` and the value at position ``index`` of ``sort(|v|)`` (``y`` consumed).

        ``hint`` (the same object for the same repeated selection) lets an engine start from
        the previous threshold; the result must not depend on it.
        """
        ...

    def column_kth_smallest_abs(self, v: Any, index: int) -> Any:
        """Per column: the value at 0-based position ``index`` of ``sort(|v[:, j]|)``."""
        ...

    def row_kth_smallest_abs(self, v: Any, index: int) -> Any:
        """Per row: the value at 0-based position ``index`` of ``sort(|v[i, :]|)``."""
        ...

    def add(self, y: Any, u: Any) -> Any:
        """``y + u`` (``y`` is consumed)."""
        ...

    def scale_rows(self, a: Any, scale: Any) -> Any:
        """``diag(scale) @ a`` (``a`` is consumed)."""
        ...

    def unscale_rows(self, a: Any, scale: Any) -> Any:
        """``diag(scale)^-1 @ a`` (``a`` is consumed)."""
        ...

    def warm_start(self, cross: Any, z_prev: Any, u_prev: Any, scale: Any, rho0: float) -> tuple[Any, Any]:
        """Rescale the carried ADMM state and form the warm-start right-hand side."""
        ...

    def admm_update(
        self, y: Any, u: Any, cross: Any, mask: Any, rho: float, last: bool, tau: Any = None,
        y_is_sum: bool = False,
    ) -> tuple[Any, Any, Any]:
        """One z/u update of the ADMM for sparse least squares, fused with the x-step rhs."""
        ...

    def keep_largest(self, a: Any, count: int) -> Any:
        """``a`` with all but its ``count`` largest-magnitude entries set to 0."""
        ...

    def topk_mask(self, scores: Any, count: int) -> Any:
        """Boolean mask of the ``count`` largest entries of ``scores`` over the whole matrix."""
        ...

    def row_topk_mask(self, scores: Any, count: int) -> Any:
        """Boolean mask of the ``count`` largest entries of every row."""
        ...

    def n_m_mask(self, scores: Any, n: int, m: int) -> Any:
        """Keep the ``n`` largest of every ``m`` consecutive entries along each row."""
        ...

    def row_budget_mask(self, scores: Any, kept: int) -> Any:
        """Exactly ``kept`` entries spread over the rows as evenly as possible (Wanda's rule)."""
        ...

    def svd(self, a: Any) -> tuple[Any, Any, Any]:
        """Thin SVD ``a = U diag(s) Vh``."""
        ...

    def gram_square_root(self, gram: Any) -> Any:
        """A factor ``S`` with ``S S^T = gram`` for a PSD, possibly singular ``gram``."""
        ...

    def upper_cholesky_of_inverse(self, hessian: Any) -> Any:
        """Upper-triangular ``U`` with ``hessian^-1 = U^T U`` (SparseGPT's factor)."""
        ...

    def to_sparse(self, dense: Any) -> Any:
        """A ``scipy.sparse.csr_array`` copy of a dense factor (on the host)."""
        ...

    def obs_panel(self, w_panel: Any, factor_t: Any, errors: Any, prune_coef: Any) -> None:
        """SparseGPT's column loop over one panel, in place (:func:`sparsefact.pruning.sparsegpt_prune`)."""
        ...
