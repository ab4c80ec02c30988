"""The layer-fit seam: one pure function from a weight matrix and its calibration to a result.

:func:`fit_layer` touches no torch module and no global state that outlives it: it builds the
method's estimator from a :class:`LayerSpec`, fits it to ``W`` against the calibration (thread
pools limited as the spec says, restored afterwards) and returns a :class:`LayerResult` with the
fitted estimator and the report row. The same call runs serially, in another process, on a Dask
worker or on a GPU; :func:`sparsefact.nn_adapters.compress_model` is the loop that captures
calibrations, calls it and installs each result into the model.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .backends.threads import limit_threads
from .calibration import Calibration
from .methods import make_estimator, method_name, spec_for

__all__ = ["LayerResult", "LayerSpec", "fit_layer"]


@dataclass(frozen=True)
class LayerSpec:
    """What to do with one layer.

    Attributes
    ----------
    method : str, estimator class or estimator
        A registered method name (:func:`sparsefact.available_methods`), or an estimator.
    density : float
        Kept fraction of the layer's entries.
    params : mapping
        Constructor parameters of the estimator (e.g. ``{"max_iter": 8}``).
    threads : int or None
        Limit Numba's and the BLAS libraries' thread pools to this many threads during the
        fit (restored afterwards); ``None`` leaves them alone.
    name : str
        The layer's name (for the report).
    """

    method: Any = "dsf"
    density: float = 0.5
    params: Mapping[str, Any] = field(default_factory=dict)
    threads: int | None = None
    name: str = ""

    @property
    def method_name(self) -> str:
        """Registry name of the method (or the estimator's class name)."""
        return method_name(self.method)

    @property
    def needs(self) -> str:
        """Calibration statistic the method's fit uses (``"gram"``, ``"diag"``, ``"none"``)."""
        return spec_for(self.method).needs


@dataclass
class LayerResult:
    """The outcome of :func:`fit_layer`.

    Attributes
    ----------
    estimator : fitted compressor
        Its ``get_factors()`` / ``reconstruct()`` hold the compressed weight.
    row : dict
        Report fields: ``name, shape [out, in], method, target_density, density, nnz,
        calibrated_err, n_tokens, seconds`` (and ``warnings`` when the fit warned).
    """

    estimator: Any
    row: dict[str, Any]


def fit_layer(W: Any, calibration: Calibration | None, spec: LayerSpec) -> LayerResult:
    """Fit ``spec``'s method to the layer matrix ``W`` (out x in) against ``calibration``.

    Parameters
    ----------
    W : array of shape (m, n)
        The layer's weight as a matrix (NumPy or any array-API array); not modified.
    calibration : Calibration or None
        The layer's calibration (full Gram or, for methods that need only it, the
        diagonal); ``None`` fits without calibration.
    spec : LayerSpec

    Returns
    -------
    LayerResult

    Notes
    -----
    Convergence warnings are collected into ``row["warnings"]`` (one layer of many should
    not flood the console); every other warning is re-emitted.

    Examples
    --------
    >>> import numpy as np
    >>> from sparsefact.layer_fit import LayerSpec, fit_layer
    >>> W = np.random.default_rng(0).standard_normal((16, 16))
    >>> result = fit_layer(W, None, LayerSpec("magnitude", 0.25, name="fc"))
    >>> result.row["nnz"], result.row["method"]
    (64, 'magnitude')
    """
    if not isinstance(spec, LayerSpec):
        raise TypeError(f"spec must be a LayerSpec, got {type(spec).__name__}")
    if calibration is not None and not isinstance(calibration, Calibration):
        raise TypeError(
            f"calibration must be a sparsefact.Calibration or None, got {type(calibration).__name__}"
        )
    est = make_estimator(spec.method, spec.density, spec.params)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, limit_threads(spec.threads):
        warnings.simplefilter("always")
        if calibration is None:
            est.fit(W)
        else:
            est.fit(W, calibration=calibration)
    seconds = time.perf_counter() - start
    messages = []
    for record in caught:
        if record.category.__name__ == "ConvergenceWarning":
            messages.append(str(record.message))
        else:
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
    m, n = (int(s) for s in W.shape)
    row: dict[str, Any] = {
        "name": spec.name,
        "shape": [m, n],
        "method": spec.method_name,
        "target_density": float(spec.density),
        "density": float(est.density_),
        "nnz": int(est.nnz_),
        "calibrated_err": float(est.calibrated_err_),
        "n_tokens": int(getattr(calibration, "n_samples", 0) or 0),
        "seconds": float(seconds),
    }
    if est.calibration_statistic_ == "diag":
        row["err_metric"] = "diag"
    if messages:
        row["warnings"] = messages
    return LayerResult(est, row)
