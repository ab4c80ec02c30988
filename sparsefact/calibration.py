"""Calibration data for layer-wise compression, kept as the Gram ``G = X^T X``.

The calibrated objective of every compressor is ``tr((W - W_hat) G (W - W_hat)^T)``
(design.md §1), so activations ``X`` of shape ``(n_tokens, n_features)`` enter only
through their Gram. :class:`Calibration` accumulates it in float64 from batches (a
stream of activations), or wraps a precomputed Gram. Methods that use only the Gram's
diagonal (Wanda, magnitude pruning) can be given a diagonal-only calibration
(``Calibration(statistic="diag")`` or :meth:`Calibration.from_diag`): ``n_features``
numbers instead of ``n_features^2``.

It is deliberately not array-like (no ``shape``, ``__len__`` or ``__array__``):
scikit-learn's cross-validation slices array-like fit parameters whose first dimension
equals the number of samples, which would silently corrupt a square Gram.

Range: activations whose Gram would overflow float64 (``|X|`` beyond about ``1e150``)
or underflow it are accumulated as ``G = S * 2**e`` with an exact power-of-two scale
(:meth:`Calibration.scaled_gram`); the compressors fit against ``S`` (every objective is
invariant to the Gram's scale), so such a calibration never holds an ``inf`` or a zero
Gram. A precomputed Gram must be positive semidefinite up to rounding
(:meth:`Calibration.from_gram`).
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from ._validation import (
    binary_exponent,
    check_matrix,
    convert_to_namespace,
    max_abs,
    namespace_of,
    scale_by_power_of_two,
    to_numpy,
)

STATISTICS = ("gram", "diag")

#: Activations with ``max |X|`` in ``[2**-SAFE_BATCH_EXPONENT, 2**SAFE_BATCH_EXPONENT]`` are
#: accumulated unscaled (their Gram entries stay far inside float64's range even summed over
#: 2**60 tokens); others are scaled by an exact power of two first.
SAFE_BATCH_EXPONENT = 240

#: Relative tolerance floor of the definiteness check of :meth:`Calibration.from_gram`.
PSD_TOLERANCE = 1e-6


def _psd_tolerance(n: int, dtype: Any) -> float:
    """``max(PSD_TOLERANCE, 8 n eps)``: rounding a Gram of ``n`` features may cost this much."""
    eps = float(np.finfo(np.float32 if "32" in str(dtype) else np.float64).eps)
    return max(PSD_TOLERANCE, 8.0 * n * eps)


def _cholesky_succeeds(matrix: Any, xp: Any) -> bool:
    """Whether the symmetric ``matrix`` has a (finite) Cholesky factor, in its own namespace."""
    if array_api_compat.is_numpy_namespace(xp) or isinstance(matrix, np.ndarray):
        import scipy.linalg

        try:
            scipy.linalg.cholesky(np.asarray(matrix), lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            return False
        return True
    try:  # torch raises its LinAlgError (a RuntimeError), array_api_strict NumPy's
        factor = xp.linalg.cholesky(matrix)
    except (np.linalg.LinAlgError, RuntimeError, ValueError):
        return False
    return bool(xp.all(xp.isfinite(factor)))


def _smallest_eigenvalue(gram: Any) -> float | None:
    """The smallest eigenvalue of a small symmetric ``gram`` (None above 2048 features)."""
    if gram.shape[0] > 2048:
        return None
    return float(np.linalg.eigvalsh(np.asarray(to_numpy(gram), dtype=np.float64))[0])


class Calibration:
    """Streaming Gram accumulator of calibration activations.

    Parameters
    ----------
    n_features : int, optional
        Number of input features; inferred from the first batch when omitted.
    statistic : {"gram", "diag"}, default="gram"
        Accumulate the full Gram, or only its diagonal (the squared norm of every
        input feature over the tokens). A diagonal-only calibration has no
        :meth:`gram`; methods that need the full Gram refuse it with a clear error.

    Attributes
    ----------
    n_features : int or None
    n_samples : int
        Number of activation rows (tokens) accumulated.
    statistic : str

    Examples
    --------
    >>> import numpy as np
    >>> from sparsefact import Calibration
    >>> cal = Calibration()
    >>> cal.add_batch(np.ones((4, 3)))
    Calibration(n_features=3, n_samples=4)
    >>> float(cal.gram()[0, 0])
    4.0
    """

    def __init__(self, n_features: int | None = None, *, statistic: str = "gram") -> None:
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        self.statistic = statistic
        if n_features is not None and (
            isinstance(n_features, bool) or not isinstance(n_features, int | np.integer) or n_features < 1
        ):
            raise ValueError(f"n_features must be a positive integer, got {n_features!r}")
        self.n_features = None if n_features is None else int(n_features)
        self.n_samples = 0
        # Only arrays are stored (no namespace module), so a Calibration pickles. The
        # statistic is _gram * 2**_exponent (the exponent is even and almost always 0).
        self._gram: Any = None
        self._exponent = 0

    def __repr__(self) -> str:
        extra = "" if self.statistic == "gram" else f", statistic={self.statistic!r}"
        return f"Calibration(n_features={self.n_features}, n_samples={self.n_samples}{extra})"

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_activations(cls, X: Any) -> Calibration:
        """Calibration from activations of shape ``(n_tokens, n_features)`` (or ``(..., n_features)``)."""
        return cls().add_batch(X, name="X")

    @classmethod
    def from_gram(cls, gram: Any, n_samples: int | None = None, *, check_psd: bool = True) -> Calibration:
        """Wrap a precomputed Gram ``X^T X`` of shape ``(n_features, n_features)``.

        Parameters
        ----------
        gram : array of shape (n_features, n_features)
            Symmetric positive semidefinite (a Gram ``X^T X``, possibly singular); any
            array-API array. Copied in float64.
        n_samples : int, optional
            Number of activation rows behind it (informational).
        check_psd : bool, default=True
            Check definiteness: ``gram + delta I`` must have a Cholesky factor, with
            ``delta = tol * max(diag gram)`` and ``tol = max(1e-6, 8 n eps)`` (``eps`` of
            ``gram``'s dtype), i.e. no eigenvalue below ``-delta``: a true Gram passes
            whatever its rank, with the rounding of float32 accumulation to spare. One
            Cholesky factorisation (``n^3 / 3`` flops); pass ``False`` only for a Gram
            known to be accumulated as ``X^T X``.

        Raises
        ------
        ValueError
            If ``gram`` is not square, not symmetric (relative tolerance 1e-5), has a
            negative diagonal entry, contains NaN/inf, or (``check_psd``) is indefinite.
        """
        checked, xp = check_matrix(gram, "gram")
        n, n2 = checked.shape
        if n != n2:
            raise ValueError(f"gram must be square (n_features x n_features), got shape {(n, n2)}")
        if n_samples is not None and (
            isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 0
        ):
            raise ValueError(f"n_samples must be a non-negative integer, got {n_samples!r}")
        scale = float(xp.max(xp.abs(checked))) or 1.0
        if float(xp.max(xp.abs(checked - checked.T))) > 1e-5 * scale:
            raise ValueError("gram must be symmetric (a Gram matrix X^T X)")
        if float(xp.min(xp.linalg.diagonal(checked))) < 0:
            raise ValueError("gram has a negative diagonal entry: it is not a Gram matrix X^T X")
        if check_psd:
            cls._check_semidefinite(checked, xp)
        cal = cls(n)
        cal._gram = xp.astype(checked, xp.float64)
        cal.n_samples = int(n_samples) if n_samples is not None else 0
        return cal

    @staticmethod
    def _check_semidefinite(checked: Any, xp: Any) -> None:
        """Raise ``ValueError`` unless ``checked`` is positive semidefinite up to rounding."""
        n = checked.shape[0]
        top = float(xp.max(xp.linalg.diagonal(checked)))
        if top == 0.0:  # the zero matrix (no input ever active) is a valid Gram
            return
        tol = _psd_tolerance(n, checked.dtype)
        g64 = xp.astype(checked, xp.float64)
        # scale to unit diagonal maximum first (exact: a power of two), so no overflow
        g64 = scale_by_power_of_two(g64, -binary_exponent(top))
        delta = tol * float(xp.max(xp.linalg.diagonal(g64)))
        eye = xp.eye(n, dtype=xp.float64, device=array_api_compat.device(g64))
        shifted = 0.5 * (g64 + g64.T) + delta * eye
        if _cholesky_succeeds(shifted, xp):
            return
        smallest = _smallest_eigenvalue(g64)
        detail = (
            "" if smallest is None
            else f" (its smallest eigenvalue is {smallest * 2.0 ** binary_exponent(top):.3g})"
        )
        raise ValueError(
            f"gram is not positive semidefinite{detail}: it has an eigenvalue below "
            f"-{tol:.1e} x max(diag gram), which no Gram X^T X has (not even a singular one, "
            "up to rounding). Was it built as X^T X of the layer's inputs? (A covariance with "
            "a wrong centring, a Hessian with negative curvature or a sign error give this.) "
            "Build it with Calibration.from_activations(X) or Calibration().add_batch(X)."
        )

    @classmethod
    def from_diag(cls, diag: Any, n_samples: int | None = None) -> Calibration:
        """A diagonal-only calibration from the Gram's diagonal ``sum_t X_tj^2`` (length ``n_features``).

        Raises
        ------
        ValueError
            If ``diag`` is not a non-empty 1-D array of finite, non-negative numbers.
        """
        values = np.asarray(to_numpy(diag) if namespace_of(diag) is not None else diag)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"diag must be a non-empty 1-D array, got shape {values.shape}")
        if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
            raise ValueError(f"diag must hold real numbers, got dtype {values.dtype}")
        values = values.astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("diag contains NaN or infinity")
        if np.any(values < 0):
            raise ValueError("diag has a negative entry: it is not the diagonal of a Gram matrix")
        if n_samples is not None and (
            isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 0
        ):
            raise ValueError(f"n_samples must be a non-negative integer, got {n_samples!r}")
        cal = cls(int(values.size), statistic="diag")
        cal._gram = values
        cal.n_samples = int(n_samples) if n_samples is not None else 0
        return cal

    # ------------------------------------------------------------------ streaming
    def add_batch(self, X: Any, *, name: str = "X") -> Calibration:
        """Add activations ``X`` of shape ``(..., n_features)`` to the Gram (float64).

        Returns ``self`` so calls can be chained.
        """
        if getattr(X, "ndim", None) is None and namespace_of(X) is None:
            X = np.asarray(X)  # nested lists: find their dimensions
        if X.ndim > 2:  # (batch, tokens, features) and the like: one row per token
            X_xp = array_api_compat.array_namespace(X)
            X = X_xp.reshape(X, (-1, X.shape[-1]))
        checked, xp = check_matrix(X, name)
        if self.n_features is None:
            self.n_features = int(checked.shape[1])
        elif checked.shape[1] != self.n_features:
            raise ValueError(
                f"{name} has {checked.shape[1]} features (columns), but this calibration "
                f"has {self.n_features}"
            )
        x64 = xp.astype(checked, xp.float64)
        # Activations beyond the safe range are scaled by 2**-k first (exact), so that
        # their Gram neither overflows to inf nor underflows to 0: it is stored as
        # S * 2**(2k). Within the range (every practical case) k = 0: no arithmetic change.
        top = max_abs(x64)
        k = 0
        if top and abs(binary_exponent(top)) > SAFE_BATCH_EXPONENT:
            k = binary_exponent(top)
            x64 = scale_by_power_of_two(x64, -k)
        diagonal_only = self.statistic == "diag"
        contribution = xp.sum(x64 * x64, axis=0) if diagonal_only else xp.matmul(x64.T, x64)
        exponent = 2 * k
        if self._gram is None:
            self._gram, self._exponent = contribution, exponent
        else:
            # Later batches may come from another namespace or device: add them in the
            # namespace of the accumulated Gram.
            gram_xp = array_api_compat.array_namespace(self._gram)
            contribution = convert_to_namespace(contribution, self._gram, gram_xp)
            stored = self._stored_exponent()
            if exponent > stored:  # bring the sum to the larger scale (the smaller part may round off)
                self._gram = scale_by_power_of_two(self._gram, stored - exponent)
                self._exponent = exponent
            elif exponent < stored:
                contribution = scale_by_power_of_two(contribution, exponent - stored)
            self._gram = self._gram + contribution
        self.n_samples += int(checked.shape[0])
        return self

    # ------------------------------------------------------------------ access
    def _stored_exponent(self) -> int:
        return int(getattr(self, "_exponent", 0))  # pickles from before the scaled storage

    def scaled_gram(self) -> tuple[Any, int]:
        """The Gram as ``(S, e)`` with ``X^T X = S * 2**e`` exactly (``e`` even, almost always 0).

        ``S`` is finite and representable however large or small the activations were;
        this is what the compressors fit against (their objectives do not depend on the
        Gram's scale).

        Raises
        ------
        ValueError
            As :meth:`gram`.
        """
        self._check_has("gram")
        return self._gram, self._stored_exponent()

    def scaled_diag(self) -> tuple[Any, int]:
        """The Gram's diagonal as ``(d, e)`` with ``diag(X^T X) = d * 2**e`` (see :meth:`scaled_gram`)."""
        self._check_has("diag")
        if self.statistic == "diag":
            return self._gram, self._stored_exponent()
        xp = array_api_compat.array_namespace(self._gram)
        return xp.linalg.diagonal(self._gram), self._stored_exponent()

    def _check_has(self, what: str) -> None:
        if self._gram is None:
            raise ValueError("this Calibration is empty: call add_batch() first")
        if what == "gram" and self.statistic == "diag":
            raise ValueError(
                "this Calibration holds only the Gram's diagonal (statistic='diag'); a method "
                "that fits against the full Gram needs Calibration(statistic='gram')"
            )

    def _unscaled(self, value: Any, exponent: int) -> Any:
        if exponent == 0:
            return value
        with np.errstate(over="ignore", under="ignore"):  # checked below
            out = scale_by_power_of_two(value, exponent)
        xp = array_api_compat.array_namespace(out)
        top = max_abs(out)
        if not bool(xp.all(xp.isfinite(out))) or (max_abs(value) > 0 and top < np.finfo(np.float64).tiny):
            raise ValueError(
                f"the Gram of these activations (about 2**{binary_exponent(max_abs(value)) + exponent}) "
                "is outside float64's range; the compressors use it scaled (scaled_gram() gives "
                "S and e with X^T X = S * 2**e)"
            )
        return out

    def gram(self) -> Any:
        """The accumulated Gram ``X^T X`` (float64, in the namespace of the data).

        Raises
        ------
        ValueError
            If nothing has been accumulated yet, the calibration holds only the
            diagonal (``statistic="diag"``), or the Gram is outside float64's range
            (activations beyond about ``1e150``: use :meth:`scaled_gram`).
        """
        S, exponent = self.scaled_gram()
        return self._unscaled(S, exponent)

    def diag(self) -> Any:
        """The diagonal of the Gram (squared input norms per feature); see :meth:`gram`."""
        d, exponent = self.scaled_diag()
        return self._unscaled(d, exponent)
