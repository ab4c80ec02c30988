"""The fixed set of float64 fits whose results must never change (issue 12: bit-identical).

``python -m tests.golden_cases`` (from the repository root) regenerates
``tests/data/golden_float64.npz``; do that only on purpose, when a change of the numbers is
intended and documented. ``tests/test_golden.py`` refits every case and compares exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

GOLDEN_PATH = Path(__file__).parent / "data" / "golden_float64.npz"


def _matrices() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(20261201)
    out = {}
    for m, n in ((24, 32), (32, 24), (20, 20)):
        W = rng.standard_normal((m, n))
        scales = np.logspace(0.0, 2.0, n)
        rng.shuffle(scales)
        X = rng.standard_normal((3 * n, n)) * scales[None, :]
        out[f"{m}x{n}"] = (W, X)
    return out


def cases() -> list[tuple[str, str, dict, bool]]:
    """``(case name, registry method name, constructor params, calibrated)``."""
    dsf = {"max_iter": 6, "tol": 0}
    specs = [
        ("dsf", dsf),
        ("dsf", {**dsf, "objective": "exact"}),
        ("dsf", {**dsf, "masks": "row"}),
        ("dsf", {**dsf, "split": "search"}),
        ("magnitude", {}),
        ("magnitude", {"scope": "row"}),
        ("magnitude", {"n_m": (2, 4)}),
        ("wanda", {}),
        ("wanda", {"n_m": (2, 4)}),
        ("sparsegpt", {}),
        ("sparsegpt", {"n_m": (2, 4), "block_size": 8}),
        ("admm", {}),
        ("admm", {"schedule": "cubic"}),
        ("lowrank", {}),
    ]
    out = []
    for i, (method, params) in enumerate(specs):
        for calibrated in (False, True):
            out.append((f"{i:02d}-{method}-{'cal' if calibrated else 'plain'}", method, params, calibrated))
    return out


def fitted_arrays(est) -> dict[str, np.ndarray]:
    """The fitted factors of a compressor as dense float64 NumPy arrays."""
    arrays = {}
    for attr in ("A_", "B_", "weight_", "U_", "V_"):
        value = getattr(est, attr, None)
        if value is None:
            continue
        if hasattr(value, "toarray"):
            value = value.toarray()
        arrays[attr] = np.asarray(value)
    arrays["reconstruct"] = np.asarray(est.reconstruct())
    arrays["errors"] = np.array([est.calibrated_err_, est.reconstruction_err_])
    return arrays


def make(method: str, params: dict):
    """An estimator for a registry method name (before and after the registry existed)."""
    try:
        from sparsefact.methods import make_estimator
    except ImportError:  # the code base before issue 12
        from sparsefact.compare import make_compressor

        return make_compressor(method, 0.5, **params)
    return make_estimator(method, density=0.5, params=params)


def compute() -> dict[str, np.ndarray]:
    import warnings

    from threadpoolctl import threadpool_limits

    results = {}
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for shape, (W, X) in _matrices().items():
            for case, method, params, calibrated in cases():
                est = make(method, params)
                est.fit(W, X) if calibrated else est.fit(W)
                for attr, value in fitted_arrays(est).items():
                    results[f"{shape}/{case}/{attr}"] = value
    return results


if __name__ == "__main__":
    import numba

    numba.set_num_threads(1)
    data = compute()
    GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(GOLDEN_PATH, **data)
    print(f"wrote {len(data)} arrays to {GOLDEN_PATH}")
