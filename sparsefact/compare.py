"""Side-by-side comparison of compressors on one matrix at equal nonzeros.

``compare(W, X_calib, density=0.5)`` fits every method on the same weights and the same
calibration and reports calibrated error, held-out error (on a second calibration),
plain error, nonzeros and seconds: the three-line check of DSF's claim (Boža & Macko,
arXiv 2409.18850) that two sparse factors beat one sparse matrix at the same budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from .calibration import Calibration
from .methods import available_methods, make_estimator
from .metrics import relative_error

DEFAULT_METHODS = ("magnitude", "wanda", "sparsegpt", "admm", "lowrank", "dsf")


def make_compressor(method: str | Any, density: float, **params: Any) -> Any:
    """A compressor for ``method``: a registered name (:func:`sparsefact.available_methods`)
    or an estimator (cloned and given ``density``)."""
    if not isinstance(method, str):
        return make_estimator(method, density)
    return make_estimator(method, density, params)


def __getattr__(name: str) -> Any:
    # ``METHODS`` is the registry's current content (methods registered later included).
    if name == "METHODS":
        return available_methods(kind=None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _method_name(method: str | Any) -> str:
    return method if isinstance(method, str) else type(method).__name__


def _as_calibration(X: Any, calibration: Calibration | None, name: str) -> Calibration | None:
    if X is not None and calibration is not None:
        raise ValueError(f"pass either {name} or its Calibration, not both")
    if X is not None:
        return Calibration.from_activations(X)
    return calibration


def compare(
    W: Any,
    X_calib: Any = None,
    *,
    calibration: Calibration | None = None,
    density: float = 0.5,
    methods: Iterable[str | Any] = DEFAULT_METHODS,
    X_heldout: Any = None,
    heldout_calibration: Calibration | None = None,
    as_frame: bool | str = "auto",
    params: dict[str, dict] | None = None,
) -> Any:
    """Fit several compressors on ``W`` at the same density and tabulate their errors.

    Parameters
    ----------
    W : array of shape (m, n)
        The weight matrix.
    X_calib : array of shape (n_tokens, n), optional
        Calibration activations (or pass ``calibration``).
    calibration : Calibration, optional
    density : float, default=0.5
        Kept fraction of ``m * n`` for every method (DSF counts both factors; low rank
        counts ``r (m + n)``).
    methods : iterable of str or estimators
        Registered names (:func:`sparsefact.available_methods`: ``"dsf"``, ``"dsf-exact"``,
        ``"magnitude"``, ``"wanda"``, ``"sparsegpt"``, ``"admm"``, ``"lowrank"`` and any
        method registered with :func:`sparsefact.register_method`) or estimator instances.
    X_heldout : array of shape (n_tokens2, n), optional
        Held-out activations: each method's error is also measured on their Gram.
    heldout_calibration : Calibration, optional
        The same, precomputed.
    as_frame : bool or "auto", default="auto"
        Return a pandas DataFrame (``"auto"``: when pandas is installed) or a list of
        dicts.
    params : dict, optional
        Extra constructor parameters per method name, e.g. ``{"dsf": {"max_iter": 10}}``.

    Returns
    -------
    list of dict or pandas.DataFrame
        One record per method: ``method``, ``density`` (achieved), ``nnz``, ``error``
        (calibrated, relative), ``heldout_error`` (or None), ``plain_error`` (relative
        Frobenius), ``seconds``.

    Examples
    --------
    >>> import numpy as np
    >>> from sparsefact import compare
    >>> rng = np.random.default_rng(0)
    >>> W, X = rng.standard_normal((32, 48)), rng.standard_normal((200, 48))
    >>> rows = compare(W, X, density=0.5, methods=["magnitude", "dsf"], as_frame=False,
    ...                params={"dsf": {"max_iter": 5, "tol": 0}})
    >>> [r["method"] for r in rows]
    ['magnitude', 'dsf']
    """
    calibration = _as_calibration(X_calib, calibration, "X_calib")
    heldout = _as_calibration(X_heldout, heldout_calibration, "X_heldout")
    params = params or {}
    records = []
    for method in methods:
        name = _method_name(method)
        est = make_compressor(method, density, **params.get(name, {}))
        start = time.perf_counter()
        est.fit(W, calibration=calibration)
        seconds = time.perf_counter() - start
        heldout_error = None
        if heldout is not None:
            W_hat = est.reconstruct()
            gram = heldout.gram()
            heldout_error = relative_error(_numpy(W), _numpy(W_hat), _numpy(gram))
        records.append(
            {
                "method": name,
                "density": float(est.density_),
                "nnz": int(est.nnz_),
                "error": float(est.calibrated_err_),
                "heldout_error": heldout_error,
                "plain_error": float(est.reconstruction_err_),
                "seconds": seconds,
            }
        )
    return _to_table(records, as_frame)


def _numpy(a: Any) -> Any:
    import numpy as np

    from ._validation import to_numpy

    return np.asarray(to_numpy(a), dtype=np.float64)


def _to_table(records: list[dict], as_frame: bool | str) -> Any:
    if as_frame == "auto":
        try:
            import pandas as pd
        except ImportError:
            return records
        return pd.DataFrame.from_records(records)
    if as_frame:
        import pandas as pd

        return pd.DataFrame.from_records(records)
    return records


def plot_tradeoff(
    W: Any,
    X_calib: Any = None,
    *,
    calibration: Calibration | None = None,
    densities: Sequence[float] = (0.2, 0.3, 0.5, 0.7),
    methods: Iterable[str | Any] = DEFAULT_METHODS,
    params: dict[str, dict] | None = None,
    ax: Any = None,
) -> tuple[Any, list[dict]]:
    """Plot calibrated error against density for each method (matplotlib required).

    Densities a method cannot honour (e.g. below DSF's minimum for the shape) are left
    out of its curve.

    Returns
    -------
    ax : matplotlib Axes
    records : list of dict
        The :func:`compare` records of every density, with a ``target_density`` key.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_tradeoff needs matplotlib: pip install 'sparsefact[plot]'") from exc
    calibration = _as_calibration(X_calib, calibration, "X_calib")
    methods = list(methods)
    records: list[dict] = []
    for density in densities:
        for method in methods:
            try:
                rows = compare(
                    W, calibration=calibration, density=density, methods=[method],
                    as_frame=False, params=params,
                )
            except ValueError:
                continue
            rows[0]["target_density"] = density
            records.extend(rows)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["method"] for r in records):
        points = [(r["target_density"], r["error"]) for r in records if r["method"] == name]
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.set_xlabel("density (kept fraction of m*n)")
    ax.set_ylabel("relative calibrated error")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return ax, records
