"""The small-batch sparse kernel (sparsefact.backends.spmv) and its use in the linear torch modules."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from sparsefact.backends import spmv

torch = pytest.importorskip("torch")

from sparsefact.nn_adapters import (  # noqa: E402
    DoubleSparseLinear,
    LowRankLinear,
    SparseLinear,
    load_compressed,
    save_compressed,
    set_trainable,
)
from sparsefact.nn_adapters.modules import KERNEL_MAX_FILL, KERNEL_MAX_ROWS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: 1 torch thread, seed 0

TOL = {np.float32: 2e-6, np.float64: 1e-12}




def _random(rows, cols, density, dtype, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < density)
    return W.astype(dtype)


def _check(y, ref, scale, dtype):
    """``y`` equals ``ref`` to rounding: error within TOL relative to ``|W| |x|`` (the sum of |terms|)."""
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= TOL[dtype] * (scale + 1e-30) * 8), float((err / (scale + 1e-30)).max())


def _reference(factors, x, bias=None):
    """Exact-ish float64 result and the sum of |terms| (for relative tolerances)."""
    y = np.asarray(x, np.float64)
    s = np.abs(y)
    for W in reversed(factors):
        Wd = np.asarray(W, np.float64)
        y, s = y @ Wd.T, s @ np.abs(Wd).T
    if bias is not None:
        y, s = y + bias, s + np.abs(bias)
    return y, s


# ---------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 29), (1, 50), (50, 1), (1, 1), (8, 8), (9, 300), (300, 9)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.4, 1.0])
def test_kernel_matches_dense_product(dtype, shape, density):
    W = _random(*shape, density, dtype, seed=3)
    M = spmv.pack_dense(W)
    assert M.nnz == np.count_nonzero(W)
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 5, 8, 9, 17):
        x = rng.standard_normal((n, shape[1])).astype(dtype)
        y = spmv.chain_matmul([M], x)
        assert y.dtype == dtype and y.shape == (n, shape[0]) and y.flags.c_contiguous
        _check(y, *_reference([W], x), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_chain_bias_empty_rows_and_columns(dtype):
    A = _random(40, 13, 0.5, dtype, seed=1)
    B = _random(13, 21, 0.5, dtype, seed=2)
    A[[0, 5, 39]] = 0  # empty rows of A
    A[:, [2, 3]] = 0  # empty columns of A
    B[[4, 7]] = 0
    B[:, [0, 20]] = 0
    bias = np.random.default_rng(0).standard_normal(40).astype(dtype)
    chain = spmv.SellChain([spmv.pack_dense(A), spmv.pack_dense(B)], bias)
    assert (chain.in_features, chain.out_features) == (21, 40)
    for n in (1, 2, 4, 7, 8, 12):
        x = np.random.default_rng(n).standard_normal((n, 21)).astype(dtype)
        _check(chain(x), *_reference([A, B], x, bias), dtype)


def test_kernel_rows_summed_in_order_of_the_nonzeros():
    """Each row is a left-to-right sum: the result is the serial CSR loop's, bit for bit."""
    W = sp.random(30, 50, density=0.4, format="csr", random_state=0, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((1, 50)).astype(np.float32)
    serial = np.empty(30, np.float32)
    for r in range(30):
        acc = np.float32(0)
        for p in range(W.indptr[r], W.indptr[r + 1]):
            acc = np.float32(acc + np.float32(W.data[p] * x[0, W.indices[p]]))
        serial[r] = acc
    y = spmv.chain_matmul([spmv.pack_csr(W.indptr, W.indices, W.data, W.shape)], x)
    assert np.array_equal(y[0], serial)


def test_kernel_padding_is_harmless_for_inf_and_nan():
    """Padding entries read a zero past the input, never a real input value."""
    W = np.zeros((9, 4), np.float32)
    W[0, :] = 1.0  # a long row: the other 7 rows of its slice are padded with 4 entries
    W[3, 1] = 2.0
    x = np.array([[np.inf, 1.0, np.nan, 2.0]], np.float32)
    y = spmv.chain_matmul([spmv.pack_dense(W)], x)[0]
    assert np.isnan(y[0]) and y[3] == 2.0
    assert np.array_equal(y[[1, 2, 4, 5, 6, 7, 8]], np.zeros(7, np.float32))


def test_kernel_wide_matrix_uses_32_bit_indices():
    W = sp.random(3, 70_000, density=0.001, format="csr", random_state=0, dtype=np.float64)
    M = spmv.pack_csr(W.indptr, W.indices, W.data, W.shape)
    assert M.cols.dtype == np.uint32
    x = np.random.default_rng(0).standard_normal((2, 70_000))
    _check(spmv.chain_matmul([M], x), *_reference([W.toarray()], x), np.float64)


def test_kernel_non_contiguous_input():
    W = _random(20, 16, 0.3, np.float32)
    M = spmv.pack_dense(W)
    big = np.random.default_rng(0).standard_normal((12, 40)).astype(np.float32)
    for x in (big[::3, ::2][:, :16], big[:5, 3:19], big[:1, ::2][:, :16], big.T[:16, :4].T):
        assert not x.flags.c_contiguous or x.shape[0] == 1
        _check(spmv.chain_matmul([M], x), *_reference([W], x), np.float32)


def test_kernel_errors():
    M = spmv.pack_dense(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="dtype"):
        spmv.SellChain([M])(np.ones((1, 3)))
    with pytest.raises(ValueError, match="do not chain"):
        spmv.SellChain([M, spmv.pack_dense(np.ones((4, 2), np.float32))])
    with pytest.raises(ValueError, match="bias"):
        spmv.SellChain([M], np.ones(4, np.float32))
    with pytest.raises(TypeError):
        spmv.pack_dense(np.eye(3, dtype=np.float16))
    assert not spmv.supported_dtype(np.float16) and spmv.supported_dtype("float32")


@given(rows=st.integers(1, 40), cols=st.integers(1, 40), inner=st.integers(1, 20),
       density=st.floats(0.0, 1.0), n=st.integers(1, 12), seed=st.integers(0, 2**16),
       double=st.booleans(), f64=st.booleans())
def test_kernel_property(rows, cols, inner, density, n, seed, double, f64):
    dtype = np.float64 if f64 else np.float32
    factors = ([_random(rows, inner, density, dtype, seed), _random(inner, cols, density, dtype, seed + 1)]
               if double else [_random(rows, cols, density, dtype, seed)])
    bias = np.random.default_rng(seed).standard_normal(rows).astype(dtype)
    x = np.random.default_rng(seed + 2).standard_normal((n, cols)).astype(dtype)
    y = spmv.SellChain([spmv.pack_dense(W) for W in factors], bias)(x)
    _check(y, *_reference(factors, x, bias), dtype)


# ---------------------------------------------------------------------------- in the modules
def _dsf_module(layout, dtype=torch.float32, out=48, k=20, n=36, density=0.3, bias=True):
    A = torch.from_numpy(_random(out, k, density, np.float64, seed=1)).to(dtype)
    B = torch.from_numpy(_random(k, n, density, np.float64, seed=2)).to(dtype)
    b = torch.randn(out, dtype=dtype) if bias else None
    return DoubleSparseLinear.from_factors(A, B, b, layout=layout)


def _sparse_module(layout, dtype=torch.float32, out=48, n=36, density=0.3, bias=True):
    W = torch.from_numpy(_random(out, n, density, np.float64, seed=4)).to(dtype)
    return SparseLinear.from_weight(W, torch.randn(out, dtype=dtype) if bias else None, layout=layout)


def _torch_path(m, x):
    mode = m.kernel
    m.kernel = False
    try:
        return m(x)
    finally:
        m.kernel = mode


def _uses_kernel(m, x):
    return m._kernel_chain(x.reshape(-1, x.shape[-1])) is not None


BUILDERS = [_dsf_module, _sparse_module]


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("layout", ["csr", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5), (KERNEL_MAX_ROWS,), (KERNEL_MAX_ROWS + 1,), ()])
def test_module_kernel_equals_torch_path(build, layout, dtype, lead):
    m = build(layout, dtype)
    x = torch.randn(*lead, m.in_features, dtype=dtype)
    rows = int(np.prod(lead)) if lead else 1
    with torch.no_grad():
        assert _uses_kernel(m, x) == (rows <= KERNEL_MAX_ROWS)
        y = m(x)
        ref = _torch_path(m, x)
    assert y.shape == ref.shape == (*lead, m.out_features) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("build", BUILDERS)
def test_module_non_contiguous_and_3d_input(build):
    m = build("csr")
    big = torch.randn(4, 6, 2 * m.in_features)
    x = big[:, ::2, ::2]  # (4, 3, in), strided
    with torch.inference_mode():
        assert _uses_kernel(m, x)
        torch.testing.assert_close(m(x), _torch_path(m, x), rtol=1e-5, atol=1e-5)
        xt = torch.randn(m.in_features, 3).T  # transposed 2-D input
        torch.testing.assert_close(m(xt), _torch_path(m, xt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["csr", "dense"])
def test_half_precision_takes_the_torch_path(dtype, layout):
    m32 = _dsf_module(layout)
    m = copy.deepcopy(m32).to(dtype)
    x = torch.randn(2, m.in_features)
    with torch.no_grad():
        assert not _uses_kernel(m, x.to(dtype))
        y = m(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), m32(x), rtol=3e-2, atol=3e-2)
        # a float32 input to a float64 module: the torch path decides (here: dtype error or promotion)
        m64 = _dsf_module(layout, torch.float64)
        assert not _uses_kernel(m64, x)


@pytest.mark.parametrize("build", BUILDERS)
def test_grad_needs_the_torch_path(build):
    m = build("csr", torch.float64)
    x = torch.randn(2, m.in_features, dtype=torch.float64, requires_grad=True)
    assert not _uses_kernel(m, x)  # grad mode on and x requires grad
    y = m(x)
    y.sum().backward()
    W = m.to_dense()
    torch.testing.assert_close(x.grad, W.sum(0).expand(2, -1))
    with torch.no_grad():  # no gradient can be asked for: the kernel runs, also on x that requires grad
        assert _uses_kernel(m, x)
        torch.testing.assert_close(m(x), _torch_path(m, x.detach()), rtol=1e-12, atol=1e-12)
    plain = torch.randn(2, m.in_features, dtype=torch.float64)
    assert _uses_kernel(m, plain)  # grad mode on but nothing requires grad
    m.bias.requires_grad_(True)
    assert not _uses_kernel(m, plain)


@pytest.mark.parametrize("build", BUILDERS)
def test_set_trainable_keeps_the_autograd_path(build):
    m = build("csr", torch.float64)
    set_trainable(m)
    x = torch.randn(3, m.in_features, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        assert not _uses_kernel(m, x)
    names = m._factor_names
    params = [getattr(m.parametrizations, n).original for n in names] + [m.bias]

    assert torch.autograd.gradcheck(lambda xx: m(xx), (x,))
    m(x).square().sum().backward()
    for name, p in zip(names, params[:-1], strict=True):
        mask = getattr(m.parametrizations, name)[0].mask
        assert p.grad is not None and torch.all(p.grad[~mask] == 0)
    assert m.bias.grad is not None
    set_trainable(m, False)
    with torch.no_grad():
        assert _uses_kernel(m, x)
        torch.testing.assert_close(m(x), _torch_path(m, x), rtol=1e-12, atol=1e-12)


def test_dense_gradient_matches_without_the_kernel():
    m = _dsf_module("dense", torch.float64)
    set_trainable(m)
    x = torch.randn(1, m.in_features, dtype=torch.float64)
    m(x).sum().backward()
    gA = m.parametrizations.A.original.grad.clone()
    ref = _dsf_module("dense", torch.float64)
    A = ref.A.clone().requires_grad_(True)
    (x @ (A @ ref.B).T + ref.bias).sum().backward()
    torch.testing.assert_close(gA, A.grad * (ref.A != 0))


@pytest.mark.parametrize("layout", ["csr", "dense"])
def test_cache_follows_the_factors(layout):
    m = _dsf_module(layout)
    x = torch.randn(1, m.in_features)
    with torch.no_grad():
        y0 = m(x)
        chain = m._kernel_state[1][0]
        assert m(x) is not y0 and m._kernel_state[1][0] is chain  # reused
        # load_state_dict with other values
        other = _dsf_module(layout)
        with torch.no_grad():
            other.bias.mul_(3)
        sd = {k: v for k, v in other.state_dict().items()}
        sd["A"] = (other.factor("A") * 2).to_sparse_csr() if layout == "csr" else other.A * 2
        m.load_state_dict(sd)
        torch.testing.assert_close(m(x), _torch_path(m, x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(m(x), y0)
        # in place on a buffer (dense: the tensor; csr: its values)
        (m.B.values() if layout == "csr" else m.B).mul_(-1)
        torch.testing.assert_close(m(x), _torch_path(m, x), rtol=1e-5, atol=1e-5)
        m.bias.add_(1)
        torch.testing.assert_close(m(x), _torch_path(m, x), rtol=1e-5, atol=1e-5)
        # dtype changes
        m.double()
        assert m._kernel_state is None
        x64 = x.double()
        assert _uses_kernel(m, x64)
        torch.testing.assert_close(m(x64), _torch_path(m, x64), rtol=1e-12, atol=1e-12)
        m.half()
        assert not _uses_kernel(m, x.half())
        m.float()
        torch.testing.assert_close(m(x), _torch_path(m, x), rtol=1e-5, atol=1e-5)


def test_copies_pickles_and_files(tmp_path):
    model = torch.nn.Sequential(_dsf_module("csr"), torch.nn.ReLU(), _sparse_module("dense", n=48))
    x = torch.randn(2, 36)
    with torch.no_grad():
        y = model(x)
        assert model[0]._kernel_state is not None
        dup = copy.deepcopy(model)
        assert dup[0]._kernel_state is None
        torch.testing.assert_close(dup(x), y, rtol=0, atol=0)
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert loaded[0]._kernel_state is None
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
        path = tmp_path / "m.safetensors"
        save_compressed(model, path)
        factory = lambda: torch.nn.Sequential(torch.nn.Linear(36, 48), torch.nn.ReLU(),  # noqa: E731
                                              torch.nn.Linear(48, 48))
        again = load_compressed(factory, path)
        assert again[0].layouts == model[0].layouts and again[2].layouts == model[2].layouts
        torch.testing.assert_close(again(x), y, rtol=1e-6, atol=1e-6)


def test_auto_rule_and_switch():
    x = torch.randn(1, 36)
    dense_fill = _dsf_module("dense", density=0.95)
    assert dense_fill._kernel_chain(x) is None  # fill above KERNEL_MAX_FILL, dense layout: torch path
    assert dense_fill._kernel_state[1][3] > KERNEL_MAX_FILL
    dense_fill.kernel = True
    assert dense_fill._kernel_chain(x) is not None
    csr_fill = _dsf_module("csr", density=0.95)
    assert csr_fill._kernel_chain(x) is not None  # CSR factors: the kernel beats torch's CSR product
    sparse = _dsf_module("dense", density=0.3)
    assert sparse._kernel_chain(x) is not None
    sparse.kernel = False
    assert sparse._kernel_chain(x) is None
    lowrank = LowRankLinear.from_factors(torch.randn(48, 4), torch.randn(4, 36))
    assert lowrank._kernel_chain(x) is None


def test_empty_factors_and_no_bias():
    m = DoubleSparseLinear(36, 48, 10, bias=False)  # all-zero factors
    x = torch.randn(2, 36)
    with torch.no_grad():
        assert _uses_kernel(m, x)
        assert torch.equal(m(x), torch.zeros(2, 48))
    m1 = _sparse_module("csr", bias=False, out=1, n=1, density=1.0)
    with torch.no_grad():
        torch.testing.assert_close(m1(torch.ones(3, 1)), _torch_path(m1, torch.ones(3, 1)))
