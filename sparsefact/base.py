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

Range and precision (``docs/reliability.md``): every objective is invariant to the scale of
``W`` and of the Gram, so ``fit`` hands ``_fit`` copies scaled by exact powers of two when
their magnitudes are outside a safe range for their dtype (``W`` of ``1e20`` in float32,
activations of ``1e200``) and scales one factor back (``_scale_factor``: the first by
default, in every attribute holding it: ``_factor_attributes``, or found); inside the range
the scale is exactly 1 and nothing changes. Half-precision inputs are computed in float32
and their factors cast back. The reported errors are computed in float64, and a fit that
would return non-finite factors raises instead. A method whose fitted attributes carry the
scale in other forms (blocks, twiddles, singular values) overrides ``_rescale_fitted``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np
from sklearn.base import BaseEstimator

from ._sklearn_compat import StrOptions, _fit_context, check_is_fitted, validate_data
from ._validation import (
    binary_exponent,
    check_matrix,
    convert_to_namespace,
    detach,
    half_precision_dtype,
    max_abs,
    scale_by_power_of_two,
)
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


#: Magnitudes fitted unscaled, as binary exponents of ``max |W|`` and ``max diag(G)``:
#: ``dtype -> (W bound, Gram bound)``. Within ``[2**-b, 2**b]`` every product a method forms
#: (``W G W^T`` summed over 2**28 entries, the inverses of the Gram) stays inside the dtype's
#: normal range; outside it ``fit`` scales by an exact power of two.
SAFE_EXPONENTS = {"float32": (20, 40), "float64": (160, 320)}


def _dtype_key(xp: Any, dtype: Any) -> str:
    return "float64" if dtype == xp.float64 else "float32"


def _safe_exponent(value: float, bound: int, *, even: bool = False) -> int:
    """0 when ``value`` is 0 or within ``[2**-bound, 2**bound]``, else the power of two to divide by.

    The returned ``e`` brings ``value / 2**e`` into ``[0.5, 1)`` (``[0.25, 1)`` with ``even``,
    which keeps square roots of the scale exact).
    """
    if value == 0.0:
        return 0
    e = binary_exponent(value)
    if abs(e) <= bound:
        return 0
    if even and e % 2:
        e += 1
    return e


def _is_sparse(value: Any) -> bool:
    return hasattr(value, "tocsr") and hasattr(value, "nnz") and hasattr(value, "shape")


def _dense_of(value: Any) -> np.ndarray:
    from ._validation import to_numpy

    if _is_sparse(value):
        value = value.toarray()
    return np.asarray(to_numpy(value))


def _scale_any(value: Any, exponent: int) -> Any:
    """A dense array or SciPy/cupyx sparse matrix times ``2**exponent`` (exact)."""
    if _is_sparse(value):
        out = value.copy()
        out.data = scale_by_power_of_two(out.data, exponent)
        return out
    return scale_by_power_of_two(value, exponent)


@dataclass
class _Scaling:
    """Exact power-of-two scales of one fit: ``W = W_fit * 2**w``, ``G = G_fit * 2**g``.

    ``g`` is the Gram's scale inside ``fit`` and ``total_g`` adds the calibration's own
    storage scale (:meth:`Calibration.scaled_gram`); both are even.
    """

    w: int = 0
    g: int = 0
    total_g: int = 0


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
    #: Index of the factor that carries ``W``'s scale after a scaled fit (see ``fit``).
    _scale_factor: int = 0
    #: Per factor, the fitted attributes holding it (rescaled with it); None: found by ``fit``.
    _factor_attributes: tuple[tuple[str, ...], ...] | None = None

    # ------------------------------------------------------------------ inputs
    def _resolve_inputs(self, W: Any, y: Any, X_calib: Any, calibration: Any):
        """Validate ``W`` and the calibration; return ``(W, xp, gram or None, gram exponent)``.

        The Gram comes in float64 in ``W``'s namespace and device, as stored by the
        calibration: the true Gram is ``gram * 2**exponent`` (the exponent is 0 unless
        the activations were beyond float64's comfortable range).

        A factorisation has no targets: a second positional argument with two or more
        dimensions is taken as ``X_calib`` so that ``est.fit(W, X_calib)`` works (it must
        be 2-D), and a 1-D ``y`` (from a supervised pipeline) is ignored.
        """
        W_checked, xp = check_matrix(W, "W", estimator=self)
        validate_data(self, detach(W), reset=True, skip_check_array=True)
        calib_name = "X_calib"
        if y is not None and _ndim(y) >= 2:
            if X_calib is not None:
                raise ValueError("pass the calibration inputs once: as y or as X_calib, not both")
            X_calib = y
            calib_name = (
                "X_calib (the 2-D second argument of fit)" if _ndim(y) == 2
                else "X_calib (the second positional argument of fit)"
            )
        if X_calib is not None and calibration is not None:
            raise ValueError("pass either X_calib or calibration, not both")
        if X_calib is not None and _ndim(X_calib) > 2:
            raise ValueError(
                f"{calib_name} must be a 2-D array of shape (n_tokens, n_features), got "
                f"{_ndim(X_calib)} dimension(s); flatten the leading dimensions "
                "(X.reshape(-1, X.shape[-1])) or pass calibration=Calibration.from_activations(X)"
            )
        n = W_checked.shape[1]
        gram, exponent = None, 0
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
            stored, exponent = self._gram_of(calibration)
            gram = convert_to_namespace(stored, W_checked, xp, xp.float64)
        elif X_calib is not None:
            X_checked, _ = check_matrix(X_calib, "X_calib")
            if X_checked.shape[1] != n:
                raise ValueError(
                    f"{calib_name} has {X_checked.shape[1]} columns, but W has {n}: calibration "
                    "inputs must have shape (n_tokens, n_features) with n_features = W.shape[1]"
                )
            stored, exponent = Calibration.from_activations(X_checked).scaled_gram()
            gram = convert_to_namespace(stored, W_checked, xp, xp.float64)
        return W_checked, xp, gram, exponent

    def _gram_of(self, calibration: Calibration) -> tuple[Any, int]:
        """The Gram to fit against (full, or the 1-D diagonal of a diagonal-only one) and its exponent.

        Returns the calibration's :meth:`~Calibration.scaled_gram` (or ``scaled_diag``):
        ``(S, e)`` with the true statistic ``S * 2**e``. A diagonal-only calibration is
        accepted by methods whose fit uses only the diagonal (``_needs`` of ``"diag"`` or
        ``"none"``); their ``calibrated_err_`` is then measured in the diagonal metric
        ``sum_ij D_ij^2 G_jj`` (said by ``calibration_statistic_``).
        """
        if calibration.statistic == "diag":
            if self._needs == "gram":
                raise ValueError(
                    f"{type(self).__name__} fits against the full calibration Gram, but this "
                    "calibration holds only its diagonal (statistic='diag'); capture the full Gram"
                )
            return calibration.scaled_diag()
        return calibration.scaled_gram()

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
        half_dtype = half_precision_dtype(W)
        W_checked, xp, gram64, gram_exponent = self._resolve_inputs(W, y, X_calib, calibration)
        self._check_shape(*W_checked.shape)
        engine = get_engine(self.backend, xp)
        scaling = self._choose_scaling(W_checked, gram64, gram_exponent, xp)
        W_fit = scale_by_power_of_two(W_checked, -scaling.w)
        gram_fit64 = None if gram64 is None else scale_by_power_of_two(gram64, -scaling.g)
        gram = gram_fit64
        if gram is not None and W_checked.dtype != xp.float64:
            gram = xp.astype(gram_fit64, W_checked.dtype)
        self._w_exponent = scaling.w  # W_fit = W * 2**-w: what a warm start must be scaled by
        with engine.loop_context():
            out = self._fit(W_fit, gram, engine)
        factors = list(out.factors)
        if scaling.w or scaling.total_g:
            factors = self._unscale_factor(factors, scaling.w)
            self._rescale_fitted(scaling.w, scaling.total_g)
        if half_dtype is not None:
            factors = self._cast_factors(factors, half_dtype)
        self._check_finite(factors, W_checked, xp)
        self._factors = tuple(factors)
        m, n = W_checked.shape
        self.nnz_ = int(out.nnz) if out.nnz is not None else sum(_count_nonzero(f) for f in self._factors)
        self.density_ = self.nnz_ / (m * n)
        self.backend_ = engine.name
        exact_path = W_checked.dtype == xp.float64 and not scaling.w and not scaling.g and half_dtype is None
        if exact_path:  # float64 in range: the method's own numbers, unchanged
            W_hat = self._product(engine.matmul)
            self.reconstruction_err_ = relative_error(W_checked, W_hat, None)
            calibrated = out.calibrated_err
            if calibrated is None and gram is not None:
                calibrated = relative_error(W_checked, W_hat, gram)
            elif calibrated is None:
                calibrated = self.reconstruction_err_
        else:  # float64 errors of the returned factors, on the scaled problem (same ratios)
            W64 = xp.astype(W_fit, xp.float64)
            f64 = [xp.astype(f, xp.float64) for f in self._factors]
            index = self._scale_factor % len(f64)
            f64[index] = scale_by_power_of_two(f64[index], -scaling.w)
            W_hat64 = f64[0]
            for factor in f64[1:]:
                W_hat64 = xp.matmul(W_hat64, factor)
            self.reconstruction_err_ = relative_error(W64, W_hat64, None)
            calibrated = (
                self.reconstruction_err_ if gram_fit64 is None else relative_error(W64, W_hat64, gram_fit64)
            )
        self.calibrated_err_ = calibrated
        self.calibration_statistic_ = (
            "none" if gram is None else ("diag" if len(gram.shape) == 1 else "gram")
        )
        self._after_fit(out)
        return self

    # ------------------------------------------------------------------ range and dtype
    def _choose_scaling(self, W: Any, gram64: Any, gram_exponent: int, xp: Any) -> _Scaling:
        """The power-of-two scales that bring ``W`` and the Gram into the safe range of ``W``'s dtype."""
        w_bound, g_bound = SAFE_EXPONENTS[_dtype_key(xp, W.dtype)]
        w = _safe_exponent(max_abs(W), w_bound)
        g = 0
        if gram64 is not None:
            diagonal = gram64 if len(gram64.shape) == 1 else xp.linalg.diagonal(gram64)
            g = _safe_exponent(max_abs(diagonal), g_bound, even=True)
        return _Scaling(w=w, g=g, total_g=g + int(gram_exponent))

    def _factor_holders(self, index: int, factor: Any, factors: list) -> list[str]:
        """Names of the fitted attributes that hold factor ``index`` (the same array or a sparse copy).

        Declared by ``_factor_attributes`` (one tuple of names per factor) where a class
        sets it; otherwise found: attributes that are the factor object itself, and
        SciPy/cupyx sparse attributes of its shape and values. Where two factors have
        equal values, the sparse copies are told apart by the order of assignment
        (factor ``i`` is the ``i``-th one assigned).
        """
        declared = getattr(self, "_factor_attributes", None)
        if declared is not None:
            names = declared[index] if index < len(declared) else ()
            return [name for name in names if getattr(self, name, None) is not None]
        dense = _dense_of(factor)
        candidates: list[tuple[str, Any]] = []
        for name, value in vars(self).items():
            if value is factor or (
                _is_sparse(value)
                and tuple(value.shape) == tuple(factor.shape)
                and np.array_equal(_dense_of(value), dense)
            ):
                candidates.append((name, value))
        copies: list[Any] = []
        for _, value in candidates:
            if value is not factor and all(value is not c for c in copies):
                copies.append(value)
        twins = [
            i for i, other in enumerate(factors)
            if tuple(other.shape) == tuple(factor.shape) and np.array_equal(_dense_of(other), dense)
        ]
        if len(copies) > 1 and len(twins) > 1:  # equal factors: the copy assigned in this one's turn
            chosen = copies[min(twins.index(index), len(copies) - 1)]
            candidates = [(n, v) for n, v in candidates if v is factor or v is chosen]
        return [n for n, _ in candidates]

    def _unscale_factor(self, factors: list, exponent: int) -> list:
        """``factors`` with factor ``_scale_factor`` times ``2**exponent``, also in its attributes.

        One factor absorbs ``W``'s scale: the first by default (DSF's ``A_``, whose scale
        the codes of ``transform`` share), the last for :class:`~sparsefact.LowRank`
        (whose ``U_`` is orthonormal).
        """
        if not exponent:
            return factors
        index = self._scale_factor % len(factors)
        factor = factors[index]
        scaled = scale_by_power_of_two(factor, exponent)
        done: dict[int, Any] = {id(factor): scaled}
        for name in self._factor_holders(index, factor, factors):
            value = getattr(self, name)
            if id(value) not in done:
                done[id(value)] = _scale_any(value, exponent)
            setattr(self, name, done[id(value)])
        return [*factors[:index], scaled, *factors[index + 1 :]]

    def _rescale_fitted(self, w_exponent: int, gram_exponent: int) -> None:
        """Hook: rescale method-specific fitted attributes after a scaled fit.

        ``W = W_fit * 2**w_exponent`` and ``G = G_fit * 2**gram_exponent`` (even). The
        factors and the attributes holding them are handled by :meth:`fit`; override
        for anything else that carries ``W``'s or the Gram's scale (e.g. singular values).
        """

    def _cast_factors(self, factors: list, dtype: Any) -> list:
        """Dense factors (and the dense attributes that are the same arrays) in ``dtype``."""
        out = []
        for factor in factors:
            xp = array_api_compat.array_namespace(factor)
            cast = xp.astype(factor, dtype)
            for name, value in list(vars(self).items()):
                if value is factor:
                    setattr(self, name, cast)
            out.append(cast)
        return out

    def _check_finite(self, factors: list, W: Any, xp: Any) -> None:
        for factor in factors:
            fxp = array_api_compat.array_namespace(factor)
            if not bool(fxp.all(fxp.isfinite(factor))):
                raise ValueError(
                    f"{type(self).__name__}: the fit of W (max |W| = {max_abs(W):.3g}, dtype "
                    f"{W.dtype}) produced non-finite factors: W is too close to the limits of its "
                    "dtype for its factors to be represented in it (convert W to float64), or the "
                    "method diverged on it"
                )

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
