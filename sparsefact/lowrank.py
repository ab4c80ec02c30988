"""Low-rank baseline: the best rank-r approximation of ``W`` at the same parameter budget.

``W (m x n) ~ U_ @ V_`` with ``U_`` of shape ``(m, r)`` and ``V_`` of shape ``(r, n)``
stores ``r (m + n)`` numbers, so a density ``d`` (kept fraction of ``m n``) buys rank
``r = floor(d m n / (m + n))`` (baselines.md §7). Two objectives:

- plain (``calibrated=False``): truncated SVD of ``W``, optimal for ``||W - W_hat||_F``
  (Eckart-Young);
- calibrated (the default): optimal for the layer objective
  ``tr((W - W_hat) G (W - W_hat)^T) = ||(W - W_hat) S||_F^2`` for any ``S`` with
  ``S S^T = G``. Eckart-Young on ``W S`` gives ``W_hat S = [W S]_r``; the solution kept
  here is ``W_hat = U_r U_r^T W`` with ``U_r`` the top-``r`` left singular vectors of
  ``W S`` (the activation-aware "whitened" SVD of SVD-LLM, written without ``S^-1``).

References
----------
.. [SVD-LLM] X. Wang, Y. Zheng, Z. Wan, M. Zhang, "SVD-LLM: Truncation-aware Singular
   Value Decomposition for Large Language Model Compression", arXiv:2403.07378 (2024).
.. [EY] C. Eckart, G. Young, "The approximation of one matrix by another of lower
   rank", Psychometrika 1 (1936).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import array_api_compat.numpy as np_compat
import numpy as np

from ._sklearn_compat import Interval
from .backends import get_engine
from .backends._host import to_host
from .base import BaseCompressor, FitOutput


def budget_rank(density: float, m: int, n: int) -> int:
    """Rank bought by a density: ``max(1, floor(density * m * n / (m + n)))``.

    A quotient within ``1e-9`` (relative) of an integer counts as that integer. The
    rank is at least 1 (so a very small density may exceed its budget) and at most
    ``min(m, n)``.
    """
    value = float(density) * m * n / (m + n)
    nearest = round(value)
    rank = int(nearest) if abs(value - nearest) <= 1e-9 * max(1.0, value) else int(math.floor(value))
    return int(min(max(rank, 1), min(m, n)))


class LowRank(BaseCompressor):
    """Rank-``r`` approximation ``U_ @ V_`` at the parameter budget of a density.

    The rank is ``r = floor(density * m * n / (m + n))`` (at least 1, at most
    ``min(m, n)``), so that ``r (m + n)`` stored numbers do not exceed
    ``density * m * n``. Note that even ``density=1`` buys only rank
    ``floor(m n / (m + n)) < min(m, n)``: ``W`` is reproduced exactly only if its rank
    is at most that.

    With ``calibrated=True`` and calibration data, ``U_ @ V_`` minimises the calibrated
    error ``tr((W - W_hat) G (W - W_hat)^T)`` exactly: ``U_`` holds the top-``r`` left
    singular vectors of ``W S`` (``S S^T = G``: Cholesky factor of ``G``, or its
    symmetric square root when ``G`` is singular) and ``V_ = U_^T W``. This equals
    the whitened SVD ``[W S]_r S^-1`` of SVD-LLM when ``G`` is invertible; for a
    singular ``G`` (fewer tokens than inputs) it is the limit of the jittered problem
    ``G + eps I`` as ``eps -> 0``: it needs no jitter, is optimal for ``G`` itself, and
    keeps ``W``'s component along inputs that the calibration never excites
    (projected on the same ``r`` output directions) instead of zeroing it as the
    pseudo-inverse ``[W S]_r S^+`` would. Without calibration (or with
    ``calibrated=False``) it is the truncated SVD of ``W``. Computed in float64.

    Parameters
    ----------
    density : float in (0, 1], default=0.5
        Parameter budget as a fraction of ``m * n``.
    calibrated : bool, default=True
        Minimise the calibrated error (when calibration is given) rather than the
        plain Frobenius error.
    backend : {"auto", "numpy_numba", "array_api", "cupy"}, default="auto"
        Engine of the SVD and the Gram's square root (SciPy's LAPACK for NumPy input,
        the input's own ``linalg`` otherwise); computed in float64, results in ``W``'s
        namespace, device and dtype.

    Attributes
    ----------
    U_ : array of shape (m, rank_)
        Orthonormal columns, in ``W``'s namespace and dtype.
    V_ : array of shape (rank_, n)
        ``U_^T W``.
    rank_ : int
    singular_values_ : ndarray of shape (rank_,)
        Top singular values of ``W S`` (of ``W`` when uncalibrated).
    calibrated_err_ : float
        ``sqrt(tr(D G D^T) / tr(W G W^T))`` with ``D = W - U_ V_``; for the calibrated
        fit this is ``sqrt(sum of the discarded s_i^2 / sum of all s_i^2)`` over the
        singular values of ``W S``.
    reconstruction_err_ : float
        ``||W - U_ V_||_F / ||W||_F``.
    nnz_ : int
        ``rank_ * (m + n)`` stored numbers.
    density_ : float
        ``nnz_ / (m * n)``.
    backend_ : str
        Engine that ran.
    n_features_in_ : int

    References
    ----------
    X. Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
    Language Model Compression", arXiv:2403.07378 (2024); C. Eckart, G. Young (1936).

    Examples
    --------
    >>> import numpy as np
    >>> from sparsefact.lowrank import LowRank
    >>> rng = np.random.default_rng(0)
    >>> W, X = rng.standard_normal((8, 16)), rng.standard_normal((64, 16))
    >>> est = LowRank(density=0.5).fit(W, X)
    >>> est.rank_, est.nnz_
    (2, 48)
    """

    _parameter_constraints: dict = {
        **BaseCompressor._parameter_constraints,
        "density": [Interval(Real, 0, 1, closed="right")],
        "calibrated": ["boolean"],
    }

    #: ``U_`` and ``V_`` hold the two factors; ``V_`` carries ``W``'s scale after a scaled fit.
    _factor_attributes = (("U_",), ("V_",))
    _scale_factor = 1

    def __init__(self, density: float = 0.5, *, calibrated: bool = True, backend: str = "auto") -> None:
        self.density = density
        self.calibrated = calibrated
        self.backend = backend

    def _fit(self, W: Any, gram: Any, engine: Any) -> FitOutput:
        xp = engine.xp
        values = xp.astype(W, xp.float64)
        m, n = values.shape
        rank = budget_rank(self.density, m, n)
        use_gram = self.calibrated and gram is not None
        if use_gram:
            target = xp.matmul(values, engine.gram_square_root(xp.astype(gram, xp.float64)))
        else:
            target = values
        left, singular, _ = engine.svd(target)
        left = left[:, :rank]
        self.U_ = xp.astype(engine.copy(left), W.dtype)
        self.V_ = xp.astype(xp.matmul(left.T, values), W.dtype)
        self.rank_ = rank
        self.singular_values_ = np.asarray(to_host(singular[:rank]))
        self._used_gram = use_gram
        return FitOutput(factors=(self.U_, self.V_), nnz=rank * (m + n))

    def _rescale_fitted(self, w_exponent: int, gram_exponent: int) -> None:
        """Singular values of ``W S`` (``S S^T = G``) carry ``2**w`` and ``2**(g / 2)`` of a scaled fit."""
        exponent = w_exponent + (gram_exponent // 2 if self._used_gram else 0)
        with np.errstate(over="ignore", under="ignore"):
            self.singular_values_ = np.ldexp(self.singular_values_, exponent)


def gram_square_root(gram: np.ndarray) -> np.ndarray:
    """A factor ``S`` with ``S S^T = gram`` (float64), for a PSD ``gram`` that may be singular.

    The lower Cholesky factor when ``gram`` is numerically positive definite; otherwise the
    symmetric square root ``Q sqrt(max(L, 0)) Q^T`` from the eigendecomposition
    ``gram = Q L Q^T`` (rounding errors can make tiny eigenvalues of a singular Gram
    negative; they are set to 0). Any such ``S`` gives the same optimum, since only
    ``W S S^T W^T = W G W^T`` matters. (The CPU engine's kernel, for NumPy arrays.)
    """
    return get_engine("numpy_numba", np_compat).gram_square_root(gram)


__all__ = ["LowRank", "budget_rank", "gram_square_root"]
