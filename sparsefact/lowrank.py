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

import array_api_compat
import numpy as np
import scipy.linalg
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from ._validation import convert_to_namespace, to_numpy
from .calibration import Calibration
from .estimators import _BaseCompressor


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


class LowRank(_BaseCompressor):
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
    backend : str, default="auto"
        Accepted for a uniform API; runs with NumPy/LAPACK on the CPU.

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
        ``"numpy"``.
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
        **_BaseCompressor._parameter_constraints,
        "density": [Interval(Real, 0, 1, closed="right")],
        "calibrated": ["boolean"],
    }

    def __init__(self, density: float = 0.5, *, calibrated: bool = True, backend: str = "auto") -> None:
        self.density = density
        self.calibrated = calibrated
        self.backend = backend

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, W: Any, y: Any = None, *, X_calib: Any = None, calibration: Calibration | None = None):
        """Fit the rank-``r`` factors.

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
        """
        W_checked, xp, gram = self._resolve_inputs(W, y, X_calib, calibration)
        values = np.asarray(to_numpy(W_checked), dtype=np.float64)
        m, n = values.shape
        rank = budget_rank(self.density, m, n)
        use_gram = self.calibrated and gram is not None
        target = values @ gram_square_root(to_numpy(gram)) if use_gram else values
        left, singular, _ = scipy.linalg.svd(target, full_matrices=False, check_finite=False)
        left = left[:, :rank]
        self.U_ = convert_to_namespace(np.ascontiguousarray(left), W_checked, xp)
        self.V_ = convert_to_namespace(left.T @ values, W_checked, xp)
        self.rank_ = rank
        self.singular_values_ = singular[:rank]
        self.nnz_ = rank * (m + n)
        self.density_ = self.nnz_ / (m * n)
        self.backend_ = "numpy"
        self._record_errors(W_checked, self.reconstruct(), gram)
        return self

    def reconstruct(self) -> Any:
        """Dense ``U_ @ V_`` in ``W``'s namespace, device and dtype."""
        check_is_fitted(self)
        xp = array_api_compat.array_namespace(self.U_)
        return xp.matmul(self.U_, self.V_)


__all__ = ["LowRank", "budget_rank", "gram_square_root"]
