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
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from ._validation import check_matrix, convert_to_namespace, namespace_of, to_numpy

STATISTICS = ("gram", "diag")


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
        # Only arrays are stored (no namespace module), so a Calibration pickles.
        self._gram: Any = None

    def __repr__(self) -> str:
        extra = "" if self.statistic == "gram" else f", statistic={self.statistic!r}"
        return f"Calibration(n_features={self.n_features}, n_samples={self.n_samples}{extra})"

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_activations(cls, X: Any) -> Calibration:
        """Calibration from activations of shape ``(n_tokens, n_features)`` (or ``(..., n_features)``)."""
        return cls().add_batch(X, name="X")

    @classmethod
    def from_gram(cls, gram: Any, n_samples: int | None = None) -> Calibration:
        """Wrap a precomputed Gram ``X^T X`` of shape ``(n_features, n_features)``.

        Raises
        ------
        ValueError
            If ``gram`` is not square, not symmetric (relative tolerance 1e-5), has a
            negative diagonal entry, or contains NaN/inf.
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
        cal = cls(n)
        cal._gram = xp.astype(checked, xp.float64)
        cal.n_samples = int(n_samples) if n_samples is not None else 0
        return cal

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
        diagonal_only = self.statistic == "diag"
        contribution = xp.sum(x64 * x64, axis=0) if diagonal_only else xp.matmul(x64.T, x64)
        if self._gram is None:
            self._gram = contribution
        else:
            # Later batches may come from another namespace or device: add them in the
            # namespace of the accumulated Gram.
            gram_xp = array_api_compat.array_namespace(self._gram)
            self._gram = self._gram + convert_to_namespace(contribution, self._gram, gram_xp)
        self.n_samples += int(checked.shape[0])
        return self

    # ------------------------------------------------------------------ access
    def gram(self) -> Any:
        """The accumulated Gram ``X^T X`` (float64, in the namespace of the data).

        Raises
        ------
        ValueError
            If nothing has been accumulated yet, or the calibration holds only the
            diagonal (``statistic="diag"``).
        """
        if self._gram is None:
            raise ValueError("this Calibration is empty: call add_batch() first")
        if self.statistic == "diag":
            raise ValueError(
                "this Calibration holds only the Gram's diagonal (statistic='diag'); a method "
                "that fits against the full Gram needs Calibration(statistic='gram')"
            )
        return self._gram

    def diag(self) -> Any:
        """The diagonal of the Gram (squared input norms per feature)."""
        if self._gram is None:
            raise ValueError("this Calibration is empty: call add_batch() first")
        if self.statistic == "diag":
            return self._gram
        xp = array_api_compat.array_namespace(self._gram)
        return xp.linalg.diagonal(self._gram)
