"""Engines: the Numba CPU kernels against NumPy and the portable array-API engine, engine
selection, and whole fits under numpy_numba, array_api and array_api_strict."""

from __future__ import annotations

import contextlib

import array_api_compat
import array_api_compat.numpy as np_compat
import numpy as np
import pytest
from _data import gaussian, scaled_activations
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import sparsefact
from sparsefact import DoubleSparseFactorization
from sparsefact.backends import ArrayAPIEngine, get_engine, resolve_backend_name
from sparsefact.backends.cupy_backend import gpu_available
from sparsefact.backends.numpy_numba import NumpyNumbaEngine

DTYPES = [np.float32, np.float64]
NUMBA = NumpyNumbaEngine()
PORTABLE = ArrayAPIEngine(np_compat)


def _values(dtype):
    """Matrices with negative numbers, signed zeros, ties and subnormals."""
    width = np.dtype(dtype).itemsize * 8
    tiny = float(np.finfo(dtype).smallest_normal)
    elements = st.one_of(
        st.floats(-1e3, 1e3, width=width),
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5]),
        st.floats(-tiny, tiny, width=width),  # subnormals
    )
    return arrays(dtype, st.tuples(st.integers(1, 30), st.integers(1, 30)), elements=elements)




# ---------------------------------------------------------------- selection
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_kth_smallest_abs_equals_sort(dtype, data):
    v = data.draw(_values(dtype))
    j = data.draw(st.integers(0, v.size - 1))
    expected = np.sort(np.abs(v), axis=None)[j]
    assert NUMBA.kth_smallest_abs(v, j) == expected
    assert PORTABLE.kth_smallest_abs(v, j) == expected
    # add_and_select: y += u fused with the selection.
    u = data.draw(arrays(dtype, v.shape, elements=st.floats(-10, 10, width=np.dtype(dtype).itemsize * 8)))
    total = v + u
    y_sum, tau = NUMBA.add_and_select(v.copy(), u.copy(), j)
    np.testing.assert_array_equal(y_sum, total)
    assert tau == np.sort(np.abs(total), axis=None)[j]


@pytest.mark.parametrize("dtype", DTYPES)
def test_kth_smallest_abs_large(dtype):
    """A large array (several radix passes over 200,000 entries), with heavy ties."""
    rng = np.random.default_rng(0)
    v = rng.integers(-50, 50, size=(500, 400)).astype(dtype) * dtype(0.25)
    v[::7] = -v[::7]
    engine = NumpyNumbaEngine()
    reference = np.sort(np.abs(v), axis=None)
    for j in (0, 1, 12345, v.size // 2, v.size - 2, v.size - 1):
        assert engine.kth_smallest_abs(v, j) == reference[j]
        y, tau = engine.add_and_select(v.copy(), -v[::-1].copy(), j)
        assert tau == np.sort(np.abs(v - v[::-1]), axis=None)[j]


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_hinted_selection_equals_the_full_selection(dtype, data):
    """With any hint -- exact, near, far, zero-width, wide -- the threshold is the sort's."""
    from sparsefact.backends._base import SelectionHint

    v = data.draw(_values(dtype))
    j = data.draw(st.integers(0, v.size - 1))
    u = data.draw(arrays(dtype, v.shape, elements=st.floats(-10, 10, width=np.dtype(dtype).itemsize * 8)))
    total = v + u
    expected = np.sort(np.abs(total), axis=None)[j]
    factor = data.draw(st.sampled_from([1.0, 0.999, 1.001, 0.8, 1.3, 1e-3, 1e3]))
    width = data.draw(st.sampled_from([0.0, 0.002, 0.05, 0.5]))
    tau = float(expected) * factor if expected > 0 else data.draw(st.floats(1e-6, 10.0))
    hint = SelectionHint(tau=tau, width=width)
    y_sum, got = NUMBA.add_and_select(v.copy(), u.copy(), j, hint=hint)
    np.testing.assert_array_equal(y_sum, total)
    assert got == expected
    assert hint.tau == got and hint.hits + hint.misses == 1
    # the portable engine takes (and ignores) the hint
    assert PORTABLE.add_and_select(v.copy(), u.copy(), j, hint=SelectionHint(tau=tau))[1] == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_hinted_selection_takes_one_pass_near_the_last_threshold_and_falls_back_far_from_it(dtype):
    from sparsefact.backends._base import SelectionHint

    rng = np.random.default_rng(1)
    v = rng.standard_normal((300, 200)).astype(dtype)
    zeros = np.zeros_like(v)
    j = v.size // 2
    exact = np.sort(np.abs(v), axis=None)[j]
    near = SelectionHint(tau=float(exact) * 1.001, width=0.01)
    assert NUMBA.add_and_select(v.copy(), zeros, j, hint=near)[1] == exact
    assert (near.hits, near.misses) == (1, 0)
    far = SelectionHint(tau=float(exact) * 2.0, width=0.01)
    assert NUMBA.add_and_select(v.copy(), zeros, j, hint=far)[1] == exact
    assert (far.hits, far.misses) == (0, 1)
    wide = SelectionHint(tau=float(exact), width=0.5)  # holds far more than 1/8 of the entries
    assert NUMBA.add_and_select(v.copy(), zeros, j, hint=wide)[1] == exact
    assert (wide.hits, wide.misses) == (0, 1)
    # the width follows the threshold's moves: twice the last relative move, within the range
    hint = SelectionHint(tau=1.0, width=0.05)
    hint.update(1.1, True)
    assert hint.width == pytest.approx(0.2) and hint.tau == 1.1
    hint.update(1.1, True)
    assert hint.width == 0.002


def test_dsf_selections_mostly_take_one_pass_and_give_the_same_factors():
    """A real fit: the hints answer most selections, and the factors equal a fit without hints."""
    from sparsefact import admm
    from sparsefact.backends import _base

    seen = []
    update = _base.SelectionHint.update

    def recording_update(self, tau, hit):
        if all(h is not self for h in seen):
            seen.append(self)
        update(self, tau, hit)

    rng = np.random.default_rng(0)
    W, X = rng.standard_normal((64, 48)), rng.standard_normal((200, 48))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_base.SelectionHint, "update", recording_update)
        hinted = DoubleSparseFactorization(0.4, max_iter=30, tol=0).fit(W, X)
    assert len(seen) == 4  # two re-selecting iterations of each of the two sub-problems
    hits, misses = sum(h.hits for h in seen), sum(h.misses for h in seen)
    assert hits + misses == 4 * 30  # every global selection of the fit went through a hint
    assert hits > misses  # (the first selection of each slot has no previous threshold: a miss)
    original = admm.sparse_least_squares

    def without_hints(*args, **kwargs):
        kwargs["hints"] = None
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sparsefact.dsf.sparse_least_squares", without_hints)
        plain = DoubleSparseFactorization(0.4, max_iter=30, tol=0).fit(W, X)
    np.testing.assert_array_equal(hinted.A_.toarray(), plain.A_.toarray())
    np.testing.assert_array_equal(hinted.B_.toarray(), plain.B_.toarray())


def test_kth_smallest_abs_non_contiguous():
    v = gaussian(40, 30)[:, ::3]
    assert NUMBA.kth_smallest_abs(v, 17) == np.sort(np.abs(v), axis=None)[17]


@pytest.mark.parametrize("dtype", DTYPES)
def test_column_and_row_selection(dtype):
    v = gaussian(12, 9, dtype)
    np.testing.assert_array_equal(PORTABLE.column_kth_smallest_abs(v, 4), np.sort(np.abs(v), axis=0)[4:5])
    np.testing.assert_array_equal(PORTABLE.row_kth_smallest_abs(v, 4), np.sort(np.abs(v), axis=1)[:, 4:5])


# ---------------------------------------------------------------- solves
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 7, 64, 193, 300, 1000])
def test_spd_inverse_equals_numpy_inverse(dtype, k):
    F = gaussian(k + 5, k, dtype)
    G = F.T @ F
    G /= np.mean(np.diag(G))
    shift = 0.5
    engine = NumpyNumbaEngine()
    G_before = G.copy()
    inverse = engine.spd_inverse(G, shift)
    assert inverse.dtype == dtype and inverse.shape == (k, k)
    np.testing.assert_array_equal(G, G_before)
    expected = np.linalg.inv(G.astype(np.float64) + shift * np.eye(k))
    tol = 2e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(inverse, expected, rtol=tol, atol=tol * np.abs(expected).max())
    np.testing.assert_array_equal(inverse, inverse.T)
    np.testing.assert_allclose(
        PORTABLE.spd_inverse(G, shift), expected, rtol=tol, atol=tol * np.abs(expected).max()
    )


# ---------------------------------------------------------------- element-wise kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("refresh", [True, False])
@pytest.mark.parametrize("last", [True, False])
@pytest.mark.parametrize("y_is_sum", [True, False])
def test_admm_update_matches_portable_engine(dtype, refresh, last, y_is_sum):
    rng = np.random.default_rng(1)
    y, u, cross = (rng.standard_normal((33, 47)).astype(dtype) for _ in range(3))
    y[0, :5] = 0.0
    mask = rng.random((33, 47)) < 0.4
    tau = float(np.sort(np.abs(y + u), axis=None)[900]) if refresh else None
    args = (1.3, last, tau, y_is_sum)
    # The Numba engine works in place: give each engine its own copies.
    m_n, u_n, out_n = NUMBA.admm_update(y.copy(), u.copy(), cross.copy(), mask.copy(), *args)
    m_p, u_p, out_p = PORTABLE.admm_update(y.copy(), u.copy(), cross.copy(), mask.copy(), *args)
    np.testing.assert_array_equal(m_n, m_p)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(u_n, u_p, rtol=tol, atol=tol)
    np.testing.assert_allclose(out_n, out_p, rtol=tol, atol=tol)
    assert out_n.dtype == dtype and u_n.dtype == dtype
    if refresh:
        v = y if y_is_sum else y + u
        np.testing.assert_array_equal(m_n, np.abs(v) > tau)


@pytest.mark.parametrize("dtype", DTYPES)
def test_other_kernels_match_portable_engine(dtype):
    rng = np.random.default_rng(2)
    a, b, c = (rng.standard_normal((21, 34)).astype(dtype) for _ in range(3))
    scale = (rng.random(21) + 0.5).astype(dtype)
    tol = 1e-6 if dtype == np.float32 else 1e-14

    def same(x, y):
        assert x.dtype == y.dtype == dtype
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)

    same(NUMBA.add(a.copy(), b.copy()), PORTABLE.add(a.copy(), b.copy()))
    same(NUMBA.scale_rows(a.copy(), scale), PORTABLE.scale_rows(a.copy(), scale))
    same(NUMBA.unscale_rows(a.copy(), scale), PORTABLE.unscale_rows(a.copy(), scale))
    for x, y in zip(
        NUMBA.warm_start(a.copy(), b.copy(), c.copy(), scale, 0.7),
        PORTABLE.warm_start(a.copy(), b.copy(), c.copy(), scale, 0.7),
        strict=True,
    ):
        same(x, y)
    for count in (0, 1, 100, a.size):
        np.testing.assert_array_equal(NUMBA.keep_largest(a, count), PORTABLE.keep_largest(a, count))
        assert np.count_nonzero(NUMBA.keep_largest(a, count)) == count
    same(NUMBA.row_norms(a), PORTABLE.row_norms(a))
    same(NUMBA.col_norms(a), PORTABLE.col_norms(a))
    square = a[:, :21].copy()
    same(NUMBA.add_to_diagonal(square, 2.0), PORTABLE.add_to_diagonal(square, 2.0))
    same(NUMBA.diag(square), PORTABLE.diag(square))
    # Functional kernels leave their inputs alone.
    a_before = a.copy()
    NUMBA.keep_largest(a, 10)
    NUMBA.row_norms(a)
    np.testing.assert_array_equal(a, a_before)


# ---------------------------------------------------------------- engine selection
def test_backend_resolution_order(monkeypatch, xps):
    monkeypatch.delenv("SPARSEFACT_BACKEND", raising=False)
    assert resolve_backend_name("auto", np_compat) == "numpy_numba"
    assert resolve_backend_name(None, xps) == "array_api"
    monkeypatch.setenv("SPARSEFACT_BACKEND", "array_api")
    assert resolve_backend_name("auto", np_compat) == "array_api"
    with sparsefact.config_context(backend="numpy_numba"):
        assert resolve_backend_name("auto", np_compat) == "numpy_numba"
        assert sparsefact.get_config()["backend"] == "numpy_numba"
        assert resolve_backend_name("array_api", np_compat) == "array_api"
    assert sparsefact.get_config()["backend"] is None
    monkeypatch.setenv("SPARSEFACT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend_name("auto", np_compat)


def test_backend_mismatches_are_explained(monkeypatch, xps):
    monkeypatch.delenv("SPARSEFACT_BACKEND", raising=False)
    with pytest.raises(ValueError, match="backend='numpy_numba' needs NumPy input arrays"):
        get_engine("numpy_numba", xps)
    with pytest.raises(ValueError, match="backend='cupy' needs CuPy input arrays"):
        get_engine("cupy", np_compat)
    assert isinstance(get_engine("auto", np_compat), NumpyNumbaEngine)
    assert type(get_engine("array_api", np_compat)) is ArrayAPIEngine


def test_config_context_selects_the_engine_of_a_fit(monkeypatch):
    monkeypatch.delenv("SPARSEFACT_BACKEND", raising=False)
    W = gaussian(16, 16)
    with sparsefact.config_context(backend="array_api"):
        assert DoubleSparseFactorization(max_iter=3, tol=0).fit(W).backend_ == "array_api"
        assert DoubleSparseFactorization(max_iter=3, tol=0, backend="numpy_numba").fit(W).backend_ == (
            "numpy_numba"
        )
    assert DoubleSparseFactorization(max_iter=3, tol=0).fit(W).backend_ == "numpy_numba"


@pytest.mark.skipif(gpu_available(), reason="checks the message shown without a GPU")
def test_cupy_engine_without_gpu():
    from sparsefact.backends.cupy_backend import CupyEngine

    with pytest.raises(RuntimeError, match="cupy.cuda.is_available"):
        CupyEngine()


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device")
def test_cupy_fit_matches_cpu():  # pragma: no cover - needs a GPU
    import cupy

    W = gaussian(48, 64)
    cpu = DoubleSparseFactorization(max_iter=10, tol=0).fit(W)
    gpu = DoubleSparseFactorization(max_iter=10, tol=0).fit(cupy.asarray(W))
    assert gpu.backend_ == "cupy"
    np.testing.assert_allclose(cupy.asnumpy(gpu.reconstruct()), cpu.reconstruct(), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- whole fits
@pytest.mark.parametrize("calibrated", [False, True])
def test_numba_and_portable_engines_agree_in_float64(calibrated):
    W = gaussian(48, 64)
    X = scaled_activations(100, 64, spread=1.0) if calibrated else None
    fast = DoubleSparseFactorization(max_iter=10, tol=0, backend="numpy_numba").fit(W, X)
    portable = DoubleSparseFactorization(max_iter=10, tol=0, backend="array_api").fit(W, X)
    assert (fast.backend_, portable.backend_) == ("numpy_numba", "array_api")
    np.testing.assert_allclose(fast.A_.toarray(), portable.A_.toarray(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fast.B_.toarray(), portable.B_.toarray(), rtol=1e-10, atol=1e-10)
    assert fast.calibrated_err_ == pytest.approx(portable.calibrated_err_, rel=1e-10)
    np.testing.assert_allclose(fast.transform(W), portable.transform(W), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ["numpy_numba", "array_api"])
def test_float32_stays_float32(backend):
    W = gaussian(40, 24, np.float32)
    est = DoubleSparseFactorization(max_iter=6, tol=0, backend=backend).fit(W, scaled_activations(50, 24))
    assert est.A_.dtype == np.float32 and est.B_.dtype == np.float32
    assert est.reconstruct().dtype == np.float32
    assert est.transform(W).dtype == np.float32
    assert est.inverse_transform(est.transform(W)).dtype == np.float32


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_array_api_strict_fit_stays_in_its_namespace(dtype_name, xps):
    dtype = getattr(xps, dtype_name)
    W_np = gaussian(20, 28, getattr(np, dtype_name))
    X_np = scaled_activations(40, 28, spread=1.0).astype(getattr(np, dtype_name))
    W, X = xps.asarray(W_np), xps.asarray(X_np)
    est = DoubleSparseFactorization(max_iter=6, tol=0).fit(W, X)
    assert est.backend_ == "array_api"
    W_hat = est.reconstruct()
    assert array_api_compat.array_namespace(W_hat) is xps
    assert W_hat.dtype == dtype and W_hat.shape == (20, 28)
    codes = est.transform(W)
    assert array_api_compat.array_namespace(codes) is xps and codes.dtype == dtype
    back = est.inverse_transform(codes)
    assert array_api_compat.array_namespace(back) is xps and back.shape == (20, 28)
    # Same numbers as the NumPy fit.
    reference = DoubleSparseFactorization(max_iter=6, tol=0, backend="array_api").fit(W_np, X_np)
    tol = 1e-4 if dtype_name == "float32" else 1e-10
    np.testing.assert_allclose(np.asarray(W_hat), reference.reconstruct(), rtol=tol, atol=tol)
    assert est.calibrated_err_ == pytest.approx(reference.calibrated_err_, rel=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_to_csr_matches_scipy(dtype):
    import scipy.sparse as sp

    from sparsefact.backends.numpy_numba import NumpyNumbaEngine

    _to_sparse = NumpyNumbaEngine().to_sparse

    rng = np.random.default_rng(5)
    for shape in [(1, 1), (3, 7), (64, 33)]:
        a = rng.standard_normal(shape).astype(dtype)
        a[np.abs(a) < 0.7] = 0
        a[0] = 0  # an empty row
        ours, reference = _to_sparse(a), sp.csr_array(a)
        assert ours.dtype == dtype and ours.shape == shape and ours.has_canonical_format
        np.testing.assert_array_equal(ours.indptr, reference.indptr)
        np.testing.assert_array_equal(ours.indices, reference.indices)
        np.testing.assert_array_equal(ours.data, reference.data)


@pytest.mark.parametrize("dtype", DTYPES)
def test_spd_inverse_pair_equals_two_inverses(dtype):
    F = gaussian(300, 257, dtype)
    G = F.T @ F / 300
    pair = NumpyNumbaEngine().spd_inverse_pair(G, 1.01, 0.013)
    for inverse, shift in zip(pair, (1.01, 0.013), strict=True):
        expected = np.linalg.inv(G.astype(np.float64) + shift * np.eye(257))
        tol = 2e-4 if dtype == np.float32 else 1e-9
        np.testing.assert_allclose(inverse, expected, rtol=tol, atol=tol * np.abs(expected).max())
        assert inverse.dtype == dtype
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        NumpyNumbaEngine().spd_inverse(-np.eye(4, dtype=dtype), 0.5)


def test_torch_cpu_tensors_stay_torch(torch_module):
    torch = torch_module
    from sparsefact import DoubleSparseFactorization

    generator = torch.Generator().manual_seed(0)
    W = torch.randn(24, 32, generator=generator)
    X = torch.randn(100, 32, generator=generator)
    W_before = W.clone()
    est = DoubleSparseFactorization(max_iter=4, tol=0).fit(W, X)
    assert est.backend_ == "array_api"
    rebuilt = est.reconstruct()
    assert isinstance(rebuilt, torch.Tensor) and rebuilt.dtype == torch.float32
    assert torch.equal(W, W_before)
    codes = est.transform(W[:5])
    assert isinstance(codes, torch.Tensor) and codes.shape == (5, est.n_components_)
    # the same factorisation as the NumPy engine, up to float32 rounding and chaos (§6.7)
    reference = DoubleSparseFactorization(max_iter=4, tol=0).fit(W.numpy(), X.numpy())
    assert abs(est.calibrated_err_ - reference.calibrated_err_) < 0.03 * reference.calibrated_err_
    assert est.nnz_ <= 0.5 * 24 * 32


@pytest.mark.parametrize("dtype", DTYPES)
def test_both_lapack_paths_invert(dtype):
    """NumPy's bundled LAPACK (preferred) and SciPy's (fallback) give the same inverse."""
    from sparsefact.backends import _numba_kernels as nk

    F = gaussian(140, 120, dtype)
    G = (F.T @ F / 140 + np.eye(120)).astype(dtype)
    expected = np.linalg.inv(G.astype(np.float64))
    name = "s" if dtype == np.float32 else "d"
    kernels = [nk._cholesky_inverse_kernel(nk._lapack(name + "potrf"), nk._lapack(name + "potri"))]
    if nk.USES_NUMPY_LAPACK:
        kernels.append(nk._INVERSE_KERNELS[np.dtype(dtype)])
    for kernel in kernels:
        a = G.copy()
        assert kernel(a) == 0
        lower = np.tril(a)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(lower, np.tril(expected), rtol=tol, atol=tol)


# ---------------------------------------------------------------- without a GPU (issue 15)
class _FakeCupyNamespace:
    """Stands in for ``array_api_compat.cupy`` in engine selection (no array is made)."""

    __name__ = "array_api_compat.cupy"


def test_auto_never_picks_cupy_without_a_gpu(monkeypatch, xps):
    import sparsefact.backends.cupy_backend as cupy_backend

    monkeypatch.delenv("SPARSEFACT_BACKEND", raising=False)
    monkeypatch.setattr(cupy_backend, "gpu_unavailable_reason", lambda: "CuPy is not installed (test)")
    assert not cupy_backend.gpu_available()
    assert resolve_backend_name("auto", _FakeCupyNamespace()) == "array_api"
    assert resolve_backend_name(None, _FakeCupyNamespace()) == "array_api"
    for xp in (np_compat, xps):
        assert resolve_backend_name("auto", xp) != "cupy"
    # with a usable GPU, CuPy arrays get the CuPy engine
    monkeypatch.setattr(cupy_backend, "gpu_unavailable_reason", lambda: None)
    assert resolve_backend_name("auto", _FakeCupyNamespace()) == "cupy"


def test_auto_never_picks_cupy_for_torch_inputs(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("SPARSEFACT_BACKEND", raising=False)
    W = torch.as_tensor(gaussian(16, 16))
    assert resolve_backend_name("auto", array_api_compat.array_namespace(W)) == "array_api"
    assert DoubleSparseFactorization(max_iter=2, tol=0).fit(W).backend_ == "array_api"


@pytest.mark.skipif(gpu_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("how", ["argument", "config", "environment"])
def test_backend_cupy_without_gpu_names_what_is_missing(monkeypatch, how):
    from sparsefact.backends.cupy_backend import CupyEngine, gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    assert reason is not None and ("CuPy is not installed" in reason or "cupy.cuda" in reason
                                   or "CUDA driver" in reason)
    monkeypatch.delenv("SPARSEFACT_BACKEND", raising=False)
    W = gaussian(8, 8)
    est = DoubleSparseFactorization(max_iter=2, tol=0, backend="cupy" if how == "argument" else "auto")
    if how == "environment":
        monkeypatch.setenv("SPARSEFACT_BACKEND", "cupy")
    context = sparsefact.config_context(backend="cupy") if how == "config" else contextlib.nullcontext()
    with context, pytest.raises(ValueError, match="cannot run on this machine") as info:
        est.fit(W)
    assert reason in str(info.value)
    with pytest.raises(RuntimeError, match="missing on this machine") as info:
        CupyEngine()
    assert reason in str(info.value)


def test_gpu_unavailable_reason_when_cupy_sees_no_device(monkeypatch):
    import sys
    import types

    import sparsefact.backends.cupy_backend as cupy_backend

    fake = types.ModuleType("cupy")
    fake.__version__ = "13.0.0"
    fake.cuda = types.SimpleNamespace(is_available=lambda: False)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert "is_available() is False" in cupy_backend.gpu_unavailable_reason()

    def broken():
        raise OSError("libcuda.so.1: cannot open shared object file")

    fake.cuda = types.SimpleNamespace(is_available=broken)
    assert "libcuda.so.1" in cupy_backend.gpu_unavailable_reason()
    assert not cupy_backend.gpu_available()
