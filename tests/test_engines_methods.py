"""Every registered method honours ``backend=`` and stays in the input's namespace and dtype.

For each layer method of the registry and each namespace (NumPy through the portable engine,
``array_api_strict``, torch CPU), the fit runs on the portable engine in that namespace and its
result agrees with the CPU engine's on the same float64 input.
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

from conftest import to_namespace
from sparsefact._validation import to_numpy
from sparsefact.methods import available_methods
from sparsefact.pruning import sparsegpt_prune, sparsegpt_prune_portable

FAST = {"dsf": {"max_iter": 4, "tol": 0}, "dsf-exact": {"max_iter": 4, "tol": 0}}
LAYER_METHODS = [n for n, s in available_methods().items() if s.kind != "scorer"]


def _data(m=12, n=16, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    X = rng.standard_normal((4 * n, n)) * np.logspace(0, 1, n)[None, :]
    return W, X


@pytest.mark.parametrize("method", LAYER_METHODS)
@pytest.mark.parametrize("calibrated", [False, True])
def test_portable_engine_matches_the_cpu_engine_in_float64(method, calibrated, xp):
    spec = available_methods()[method]
    W, X = _data()
    reference = spec.make(0.5, FAST.get(method, {}))
    reference.fit(W, X) if calibrated else reference.fit(W)
    est = spec.make(0.5, {**FAST.get(method, {}), "backend": "array_api"})
    Wx, Xx = to_namespace(xp, W), to_namespace(xp, X)
    est.fit(Wx, Xx) if calibrated else est.fit(Wx)
    assert est.backend_ == "array_api"
    W_hat = est.reconstruct()
    assert array_api_compat.array_namespace(W_hat).__name__ == array_api_compat.array_namespace(Wx).__name__
    assert W_hat.dtype == Wx.dtype
    got = to_numpy(W_hat)
    expected = np.asarray(reference.reconstruct())
    assert np.linalg.norm(got - expected) <= 1e-9 * np.linalg.norm(expected)
    assert est.nnz_ == reference.nnz_
    assert est.calibrated_err_ == pytest.approx(reference.calibrated_err_, rel=1e-9)


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_float32_in_float32_out_on_the_portable_engine(method, xp):
    spec = available_methods()[method]
    W, X = _data(seed=1)
    Wx = to_namespace(xp, W.astype(np.float32))
    est = spec.make(0.5, {**FAST.get(method, {}), "backend": "array_api"}).fit(Wx, to_namespace(xp, X))
    assert est.reconstruct().dtype == Wx.dtype
    assert np.isfinite(est.calibrated_err_)


@pytest.mark.parametrize("n_m", [None, (2, 4)])
@pytest.mark.parametrize("dead", [False, True])
def test_portable_sparsegpt_is_the_same_algorithm_as_the_fast_path(n_m, dead):
    import array_api_compat.numpy as np_compat

    from sparsefact.backends import ArrayAPIEngine

    rng = np.random.default_rng(3)
    W = rng.standard_normal((10, 24))
    X = rng.standard_normal((80, 24))
    if dead:
        X[:, [3, 17]] = 0.0
    gram = X.T @ X
    kept = 120
    fast = sparsegpt_prune(W, gram, kept=kept, block_size=8, damping=0.01, n_m=n_m)
    portable = sparsegpt_prune_portable(
        ArrayAPIEngine(np_compat), W, gram, kept=kept, block_size=8, damping=0.01, n_m=n_m
    )
    assert np.array_equal(fast != 0, np.asarray(portable) != 0)
    np.testing.assert_allclose(np.asarray(portable), fast, rtol=1e-10, atol=1e-12)
