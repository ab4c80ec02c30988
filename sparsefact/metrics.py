"""Error measures used everywhere in sparsefact (design.md §1).

The relative calibrated error is ``sqrt(tr(D G D^T) / tr(W G W^T))`` with ``D = W - W_hat``
and ``G = X_calib^T X_calib`` (``G = I`` without calibration, giving the relative
Frobenius error).
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from ._validation import binary_exponent, max_abs, scale_by_power_of_two

#: Binary exponents of ``max |W|`` and of the Gram's largest entry measured as they are;
#: beyond them the arguments are first scaled by exact powers of two (the ratio is unchanged).
_SAFE_W_EXPONENT, _SAFE_GRAM_EXPONENT = 160, 320


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

    Notes
    -----
    Computed in float64 (lower-precision arguments are converted), after scaling ``W``,
    ``W_hat`` and ``gram`` by exact powers of two when their magnitudes are outside a safe
    range (the ratio does not depend on them), so that neither the squares overflow nor
    underflow: the result is the error of the arguments as given, whatever their scale.
    """
    W, W_hat, gram = _safe_operands(W, W_hat, gram)
    num = weighted_sq_norm(W - W_hat, gram)
    den = weighted_sq_norm(W, gram)
    if den <= 0.0:
        return 0.0 if num <= 0.0 else math.inf
    return math.sqrt(max(num, 0.0) / den)


def _safe_operands(W: Any, W_hat: Any, gram: Any) -> tuple[Any, Any, Any]:
    """``W``, ``W_hat`` and ``gram`` in float64, scaled by powers of two into a safe range.

    Float64 arguments within the range come back unchanged (the same objects).
    """
    xp = array_api_compat.array_namespace(W)
    if W.dtype != xp.float64 or W_hat.dtype != xp.float64:
        W, W_hat = xp.astype(W, xp.float64), xp.astype(W_hat, xp.float64)
    top = max(max_abs(W), max_abs(W_hat))
    exponent = binary_exponent(top)
    if top and abs(exponent) > _SAFE_W_EXPONENT:
        W, W_hat = scale_by_power_of_two(W, -exponent), scale_by_power_of_two(W_hat, -exponent)
    if gram is not None:
        if gram.dtype != xp.float64:
            gram = xp.astype(gram, xp.float64)
        g_top = max_abs(gram)
        g_exponent = binary_exponent(g_top)
        if g_top and abs(g_exponent) > _SAFE_GRAM_EXPONENT:
            gram = scale_by_power_of_two(gram, -g_exponent)
    return W, W_hat, gram
