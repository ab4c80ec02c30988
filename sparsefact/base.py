"""The one ``fit`` of every compressor: validation, calibration, engine, then the method's ``_fit``.

A compression method is one class: a subclass of :class:`BaseCompressor` that declares its
parameters once (``__init__`` and ``_parameter_constraints``) and implements
``_fit(W, gram, engine)``, returning a :class:`FitOutput`. Everything around it -- parameter
validation, reading ``W`` (any array-API array), the calibration (``X_calib``, a
:class:`~sparsefact.Calibration` or a 2-D second positional argument), choosing the engine,
the thread-pool context, the error report (``calibrated_err_``, ``reconstruction_err_``),
``nnz_``, ``density_``, ``backend_``, ``reconstruct()`` and ``get_factors()`` -- lives here.
Register the class with :func:`sparsefact.register_method` and it runs in
:func:`sparsefact.compare`, :func:`sparsefact.nn_adapters.compress_model` and the CLI
(``docs/adding_a_method.md``).

Naming: sparsefact's ``W`` is scikit-learn's ``X`` -- the rows of the weight matrix (output
neurons) are the samples and its columns (inputs) are the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np
from sklearn.base import BaseEstimator

from ._sklearn_compat import StrOptions, _fit_context, check_is_fitted, validate_data
from ._validation import check_matrix, convert_to_namespace
from .backends import BACKENDS, get_engine
from .calibration import Calibration
from .metrics import relative_error

__all__ = ["BaseCompressor", "FitOutput"]


@dataclass
class FitOutput:
    """What a method's ``_fit`` returns to :meth:`BaseCompressor.fit`.

    Attributes
    ----------
    factors : tuple of arrays
        Dense factors in ``W``'s namespace, device and dtype whose product (left to right)
        is the approximation of ``W``: ``(W_hat,)`` for a single sparse matrix,
        ``(A, B)`` for two factors, and so on.
    nnz : int or None
        Stored numbers of the result; ``None`` counts the nonzeros of the factors.
    calibrated_err : float or None
        The calibrated error when the method already measured it (saves a product);
        ``None`` lets the base class compute it.
    """

    factors: tuple
    nnz: int | None = None
    calibrated_err: float | None = None


def _ndim(value: Any) -> int:
    """Number of dimensions of an array-like, without NumPy's ``__array_function__``."""
    if hasattr(value, "ndim"):
        return int(value.ndim)
    try:
        return np.asarray(value).ndim
    except ValueError:  # ragged sequences: not a matrix of calibration inputs
        return 1


def _count_nonzero(a: Any) -> int:
    xp = array_api_compat.array_namespace(a)
    return int(xp.sum(xp.astype(a != 0, xp.int64)))


class BaseCompressor(BaseEstimator):
    """Base class of every compressor (design.md §3 contract).

    Subclasses implement ``_fit(W, gram, engine) -> FitOutput`` where ``W`` is the
    validated matrix (in its own namespace), ``gram`` the calibration Gram in ``W``'s
    namespace and dtype (``None`` without calibration) and ``engine`` the kernels chosen
    from ``backend`` and the input (:mod:`sparsefact.backends`). ``_fit`` sets the
    method's own fitted attributes (``A_``/``B_``, ``weight_``, ...) and returns the
    factors; this class sets the common ones:

    - ``calibrated_err_``: ``sqrt(tr(D G D^T) / tr(W G W^T))`` with ``D = W - W_hat``
      (equal to ``reconstruction_err_`` without calibration);
    - ``reconstruction_err_``: ``||W - W_hat||_F / ||W||_F``;
    - ``nnz_``, ``density_ = nnz_ / (m n)``, ``backend_`` (the engine that ran),
      ``n_features_in_``;
    - ``calibration_statistic_``: ``"gram"``, ``"diag"`` (a diagonal-only calibration: the
      error is in the diagonal metric) or ``"none"``.

    ``_check_shape(m, n)`` may be overridden to reject shapes a method cannot handle.
    """

    _parameter_constraints: dict = {
        "backend": [StrOptions(set(BACKENDS))],
    }
    #: Calibration statistic the fit uses: "gram", "diag" or "none" (the registry's default).
    _needs: str = "gram"

    # ------------------------------------------------------------------ inputs
    def _resolve_inputs(self, W: Any, y: Any, X_calib: Any, calibration: Any):
        """Validate ``W`` and the calibration; return ``(W, xp, gram or None)``.

        A factorisation has no targets: a 2-D second positional argument is taken as
        ``X_calib`` so that ``est.fit(W, X_calib)`` works, and a 1-D ``y`` (from a
        supervised pipeline) is ignored.
        """
        W_checked, xp = check_matrix(W, "W", estimator=self)
        validate_data(self, W, reset=True, skip_check_array=True)
        calib_name = "X_calib"
        if y is not None and _ndim(y) == 2:
            if X_calib is not None:
                raise ValueError("pass the calibration inputs once: as y or as X_calib, not both")
            X_calib, calib_name = y, "X_calib (the 2-D second argument of fit)"
        if X_calib is not None and calibration is not None:
            raise ValueError("pass either X_calib or calibration, not both")
        n = W_checked.shape[1]
        gram = None
        if calibration is not None:
            if not isinstance(calibration, Calibration):
                raise TypeError(
                    "calibration must be a sparsefact.Calibration (e.g. "
                    f"Calibration.from_gram(G)), got {type(calibration).__name__}"
                )
            if calibration.n_features != n:
                raise ValueError(
                    f"calibration has {calibration.n_features} features, but W has {n} "
                    "columns (one calibration feature per column of W is needed)"
                )
            gram = convert_to_namespace(self._gram_of(calibration), W_checked, xp)
        elif X_calib is not None:
            X_checked, _ = check_matrix(X_calib, "X_calib")
            if X_checked.shape[1] != n:
                raise ValueError(
                    f"{calib_name} has {X_checked.shape[1]} columns, but W has {n}: calibration "
                    "inputs must have shape (n_tokens, n_features) with n_features = W.shape[1]"
                )
            gram = convert_to_namespace(Calibration.from_activations(X_checked).gram(), W_checked, xp)
        return W_checked, xp, gram

    def _gram_of(self, calibration: Calibration) -> Any:
        """The Gram to fit against: the full matrix, or the 1-D diagonal of a diagonal-only one.

        A diagonal-only calibration is accepted by methods whose fit uses only the
        diagonal (``_needs`` of ``"diag"`` or ``"none"``); their ``calibrated_err_`` is
        then measured in the diagonal metric ``sum_ij D_ij^2 G_jj`` (said by
        ``calibration_statistic_``).
        """
        if calibration.statistic == "diag":
            if self._needs == "gram":
                raise ValueError(
                    f"{type(self).__name__} fits against the full calibration Gram, but this "
                    "calibration holds only its diagonal (statistic='diag'); capture the full Gram"
                )
            return calibration.diag()
        return calibration.gram()

    def _check_shape(self, m: int, n: int) -> None:
        """Reject shapes the method cannot factorise (default: every non-empty shape is fine)."""

    # ------------------------------------------------------------------ fit
    def _fit(self, W: Any, gram: Any, engine: Any) -> FitOutput:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement _fit(W, gram, engine)")

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, W: Any, y: Any = None, *, X_calib: Any = None, calibration: Calibration | None = None):
        """Compress ``W``, optionally against calibration inputs.

        Parameters
        ----------
        W : array of shape (m, n)
            Matrix to compress (a layer weight: rows = outputs, columns = inputs). NumPy,
            torch, CuPy or any array-API array; results stay in its namespace, device and
            dtype (integers become float64).
        y : array of shape (n_tokens, n), optional
            A 2-D second positional argument is taken as ``X_calib``; a 1-D ``y`` is
            ignored (pipelines pass targets).
        X_calib : array of shape (n_tokens, n), optional
            Calibration inputs of the layer.
        calibration : Calibration, optional
            Precomputed or streamed calibration (``Calibration.from_gram(G)``).

        Returns
        -------
        self
        """
        W_checked, xp, gram = self._resolve_inputs(W, y, X_calib, calibration)
        self._check_shape(*W_checked.shape)
        engine = get_engine(self.backend, xp)
        with engine.loop_context():
            out = self._fit(W_checked, gram, engine)
        self._factors = tuple(out.factors)
        m, n = W_checked.shape
        self.nnz_ = int(out.nnz) if out.nnz is not None else sum(_count_nonzero(f) for f in self._factors)
        self.density_ = self.nnz_ / (m * n)
        self.backend_ = engine.name
        W_hat = self._product(engine.matmul)
        self.reconstruction_err_ = relative_error(W_checked, W_hat, None)
        calibrated = out.calibrated_err
        if calibrated is None:
            calibrated = self.reconstruction_err_ if gram is None else relative_error(W_checked, W_hat, gram)
        self.calibrated_err_ = calibrated
        self.calibration_statistic_ = (
            "none" if gram is None else ("diag" if len(gram.shape) == 1 else "gram")
        )
        self._after_fit(out)
        return self

    def _after_fit(self, out: FitOutput) -> None:
        """Hook run at the end of :meth:`fit` (e.g. convergence warnings)."""

    # ------------------------------------------------------------------ results
    def _product(self, matmul: Any) -> Any:
        result = self._factors[0]
        for factor in self._factors[1:]:
            result = matmul(result, factor)
        return result

    def reconstruct(self) -> Any:
        """The dense approximation of ``W`` in ``W``'s namespace, device and dtype."""
        check_is_fitted(self)
        if len(self._factors) == 1:
            return self._factors[0]
        xp = array_api_compat.array_namespace(self._factors[0])
        return self._product(xp.matmul)

    def get_factors(self) -> tuple:
        """The fitted factors (dense, in ``W``'s namespace) whose product is :meth:`reconstruct`."""
        check_is_fitted(self)
        return self._factors

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags
