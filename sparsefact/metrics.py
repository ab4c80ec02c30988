"""Error measures used everywhere in sparsefact (design.md §1).

The relative calibrated error is ``sqrt(tr(D G D^T) / tr(W G W^T))`` with ``D = W - W_hat``
and ``G = X_calib^T X_calib`` (``G = I`` without calibration, giving the relative
Frobenius error).
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat


def weighted_sq_norm(delta: Any, gram: Any = None) -> float:
    """``tr(delta G delta^T)`` (``||delta||_F^2`` when ``gram`` is None).

    A 1-D ``gram`` is a diagonal Gram: ``sum_ij delta_ij^2 gram_j``.
    """
    xp = array_api_compat.array_namespace(delta)
    if gram is None:
        return float(xp.sum(delta * delta))
    if len(gram.shape) == 1:
        return float(xp.sum(delta * delta * gram[None, :]))
    return float(xp.sum(delta * xp.matmul(delta, gram)))


def relative_error(W: Any, W_hat: Any, gram: Any = None) -> float:
    """Relative (calibrated) error of ``W_hat`` as an approximation of ``W``.

    Parameters
    ----------
    W, W_hat : arrays of shape (m, n)
    gram : array of shape (n, n) or (n,), optional
        Calibration Gram ``X^T X`` (a 1-D array: its diagonal only); the identity when
        omitted.

    Returns
    -------
    float
        ``sqrt(tr((W - W_hat) G (W - W_hat)^T) / tr(W G W^T))``; 0 when both are 0 and
        ``inf`` when only the denominator is.
    """
    num = weighted_sq_norm(W - W_hat, gram)
    den = weighted_sq_norm(W, gram)
    if den <= 0.0:
        return 0.0 if num <= 0.0 else math.inf
    return math.sqrt(max(num, 0.0) / den)
