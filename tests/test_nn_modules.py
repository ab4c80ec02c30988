"""DoubleSparseLinear, SparseLinear, DoubleSparseConv2d and replace_module (torch; skipped without it)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
F = torch.nn.functional

from sparsefact import DoubleSparseFactorization, MagnitudePruning  # noqa: E402
from sparsefact.nn_adapters import (  # noqa: E402
    DoubleSparseConv2d,
    DoubleSparseLinear,
    SparseLinear,
    choose_layout,
    replace_module,
)
from sparsefact.nn_adapters.modules import CSR_MAX_DENSITY, CSR_MIN_NUMEL  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),  # conftest.py: 1 torch thread, seed 0
    pytest.mark.filterwarnings(
        "ignore::sklearn.exceptions.ConvergenceWarning",
        "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
    ),
]

LAYOUTS = ["csr", "dense"]




def _factors(out, k, n, density, seed=0):
    A = sp.random(out, k, density=density, format="csr", random_state=seed, dtype=np.float32)
    B = sp.random(k, n, density=density, format="csr", random_state=seed + 1, dtype=np.float32)
    A.data -= 0.5
    B.data -= 0.5
    return A, B


def _dense(M):
    return torch.from_numpy(M.toarray())


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------- DoubleSparseLinear
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("lead", [(), (1,), (7,), (2, 3)])
def test_linear_forward_matches_dense_product(layout, density, lead):
    A, B = _factors(24, 12, 20, density, seed=int(density * 10))
    bias = torch.randn(24)
    m = DoubleSparseLinear.from_factors(A, B, bias, layout=layout)
    assert m.layouts == {"A": layout, "B": layout}
    x = torch.randn(*lead, 20)
    W = _dense(A) @ _dense(B)
    y = m(x)
    assert y.shape == (*lead, 24)
    _close(y, x @ W.T + bias)
    _close(m.to_dense(), W)


@pytest.mark.parametrize("layouts", [("csr", "dense"), ("dense", "csr")])
def test_linear_mixed_layouts(layouts):
    A, B = _factors(16, 8, 10, 0.4)
    m = DoubleSparseLinear.from_factors(A, B, None, layout="dense")
    m._set_factor("A", m.A, layouts[0])
    m._set_factor("B", m.B, layouts[1])
    x = torch.randn(5, 10)
    _close(m(x), x @ (_dense(A) @ _dense(B)).T)


@pytest.mark.parametrize("kind", ["numpy", "torch", "torch_sparse"])
def test_from_factors_accepts_numpy_and_torch(kind):
    A, B = _factors(9, 5, 7, 0.5)
    conv = {"numpy": lambda M: M.toarray(), "torch": _dense, "torch_sparse": lambda M: _dense(M).to_sparse()}
    m = DoubleSparseLinear.from_factors(conv[kind](A), conv[kind](B), np.zeros(9, np.float32))
    assert m.A.dtype == torch.float32
    _close(m.to_dense(), _dense(A) @ _dense(B))
    assert m.nnz == A.nnz + B.nnz


def test_from_factors_rejects_bad_input():
    A, B = _factors(9, 5, 7, 0.5)
    with pytest.raises(ValueError, match="not"):
        DoubleSparseLinear.from_factors(A, B.T)
    with pytest.raises(ValueError, match="layout"):
        DoubleSparseLinear.from_factors(A, B, layout="coo")
    with pytest.raises(ValueError, match="bias"):
        DoubleSparseLinear.from_factors(A, B, np.zeros(3))
    with pytest.raises(ValueError, match="A_"):
        DoubleSparseLinear.from_estimator(MagnitudePruning())


def test_from_estimator_reproduces_reconstruct():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((24, 16)).astype(np.float32)
    est = DoubleSparseFactorization(0.5, max_iter=3, random_state=0).fit(W)
    bias = rng.standard_normal(24).astype(np.float32)
    for layout in LAYOUTS:
        m = DoubleSparseLinear.from_estimator(est, bias, layout=layout)
        W_hat = torch.from_numpy(np.asarray(est.reconstruct()))
        _close(m.to_dense(), W_hat)
        x = torch.randn(6, 16)
        _close(m(x), x @ W_hat.T + torch.from_numpy(bias))
        assert m.nnz == est.nnz_
        assert (m.out_features, m.in_features, m.inner_features) == (24, 16, est.A_.shape[1])


def test_constructor_gives_zero_module_of_right_shape():
    m = DoubleSparseLinear(10, 6, 4, bias=False, dtype=torch.float64)
    assert m.A.shape == (6, 4) and m.B.shape == (4, 10) and m.bias is None
    assert m.A.dtype == torch.float64
    y = m(torch.randn(3, 10, dtype=torch.float64))
    assert y.shape == (3, 6) and not y.any()


# ---------------------------------------------------------------------------- SparseLinear
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sparse_linear_from_estimator(layout):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((20, 12)).astype(np.float32)
    est = MagnitudePruning(0.3).fit(W)
    bias = rng.standard_normal(20).astype(np.float32)
    m = SparseLinear.from_estimator(est, bias, layout=layout)
    W_hat = torch.from_numpy(np.asarray(est.reconstruct()))
    _close(m.to_dense(), W_hat)
    for lead in [(), (4,), (2, 3)]:
        x = torch.randn(*lead, 12)
        _close(m(x), x @ W_hat.T + torch.from_numpy(bias))
    assert m.nnz == est.nnz_
    with pytest.raises(ValueError, match="weight_"):
        SparseLinear.from_estimator(DoubleSparseFactorization())


def test_sparse_linear_from_weight_and_constructor():
    W = sp.random(8, 5, density=0.4, format="csr", random_state=3, dtype=np.float32)
    m = SparseLinear.from_weight(W, layout="csr")
    x = torch.randn(5)
    _close(m(x), _dense(W) @ x)
    empty = SparseLinear(5, 8, bias=True)
    assert empty.weight.shape == (8, 5) and empty.bias.shape == (8,)


# ---------------------------------------------------------------------------- conv
CONV_CASES = [
    # kernel, stride, padding, dilation
    ((1, 1), 1, 0, 1),
    ((3, 3), 1, 1, 1),
    ((3, 3), 2, 1, 1),
    ((3, 3), 2, 0, 2),
    ((3, 5), (2, 1), (1, 2), 1),
    ((2, 2), 3, 2, (1, 2)),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), CONV_CASES)
def test_conv_matches_dense_conv(layout, kernel, stride, padding, dilation):
    c_in, out, k = 3, 5, 4
    A, B = _factors(out, k, c_in * kernel[0] * kernel[1], 0.5, seed=7)
    bias = torch.randn(out)
    m = DoubleSparseConv2d.from_factors(A, B, bias, kernel_size=kernel, stride=stride, padding=padding,
                                        dilation=dilation, layout=layout)
    weight = (_dense(A) @ _dense(B)).reshape(out, c_in, *kernel)
    _close(m.to_dense(), weight)
    x = torch.randn(2, c_in, 11, 9)
    ref = F.conv2d(x, weight, bias, stride, padding, dilation)
    y = m(x)
    assert y.shape == ref.shape
    _close(y, ref)
    _close(m(x[0]), ref[0])  # unbatched (C, H, W) input


@pytest.mark.parametrize("layouts", [("csr", "dense"), ("dense", "csr")])
def test_conv_mixed_layouts(layouts):
    A, B = _factors(4, 3, 2 * 9, 0.5, seed=2)
    m = DoubleSparseConv2d.from_factors(A, B, torch.ones(4), kernel_size=3, padding=1, layout="dense")
    m._set_factor("A", m.A, layouts[0])
    m._set_factor("B", m.B, layouts[1])
    x = torch.randn(2, 2, 6, 7)
    _close(m(x), F.conv2d(x, m.to_dense(), torch.ones(4), 1, 1))


def test_conv_from_estimator_and_padding_strings():
    conv = torch.nn.Conv2d(2, 6, 3, padding=1)
    W = conv.weight.detach().flatten(1).numpy()
    est = DoubleSparseFactorization(0.6, max_iter=3, random_state=0).fit(W)
    m = DoubleSparseConv2d.from_estimator(est, conv.bias.detach(), kernel_size=3, padding="same")
    assert m.padding == (1, 1) and m.in_channels == 2
    x = torch.randn(1, 2, 5, 5)
    ref = F.conv2d(x, torch.from_numpy(np.asarray(est.reconstruct())).reshape(6, 2, 3, 3), conv.bias, 1, 1)
    _close(m(x), ref)
    valid = DoubleSparseConv2d(2, 6, 4, 3, padding="valid")
    assert valid.padding == (0, 0)
    with pytest.raises(ValueError, match="same"):
        DoubleSparseConv2d(2, 6, 4, (2, 2), padding="same")
    with pytest.raises(ValueError, match="multiple"):
        DoubleSparseConv2d.from_factors(np.ones((6, 4)), np.ones((4, 10)), kernel_size=3)


# ---------------------------------------------------------------------------- torch integration
@pytest.mark.parametrize("layout", LAYOUTS)
def test_to_float64_state_dict_and_deepcopy(layout):
    A, B = _factors(12, 6, 10, 0.3)
    m = DoubleSparseLinear.from_factors(A, B, torch.randn(12), layout=layout)
    x = torch.randn(4, 10, dtype=torch.float64)
    m64 = m.to(torch.float64)
    assert m64.A.dtype == m64.B.dtype == m64.bias.dtype == torch.float64
    assert m64.layouts == {"A": layout, "B": layout}
    expected = x @ (_dense(A) @ _dense(B)).double().T + m64.bias
    torch.testing.assert_close(m64(x), expected)
    # state_dict into a fresh module (CSR buffers with another nnz need the custom loader)
    sd = m64.state_dict()
    assert set(sd) == {"A", "B", "bias"}
    fresh = DoubleSparseLinear(10, 12, 6, layout=layout, dtype=torch.float64)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), m64(x))
    clone = copy.deepcopy(m64)
    assert torch.equal(clone(x), m64(x))
    assert clone.A is not m64.A
    with pytest.raises(RuntimeError, match="size mismatch"):
        DoubleSparseLinear(10, 12, 5, dtype=torch.float64).load_state_dict(sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["auto", "csr", "dense"])
def test_half_precision(dtype, layout):
    A, B = _factors(16, 8, 12, 0.3)
    m = DoubleSparseLinear.from_factors(A, B, torch.randn(16), layout=layout, dtype=dtype)
    if layout == "auto":
        assert m.layouts == {"A": "dense", "B": "dense"}  # no CPU CSR kernel for half
    x = torch.randn(3, 12)
    y = m(x.to(dtype))
    assert y.dtype == dtype
    ref = x @ (_dense(A) @ _dense(B)).T + m.bias.float()
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)
    # and .half()/.float() conversions keep working
    assert m.float()(x).dtype == torch.float32


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_grad_leaks_and_modes(layout):
    A, B = _factors(8, 4, 6, 0.5)
    m = DoubleSparseLinear.from_factors(A, B, torch.randn(8), layout=layout)
    assert list(m.parameters()) == []  # factors and bias are buffers
    assert not any(b.requires_grad for b in m.buffers())
    x = torch.randn(3, 6, requires_grad=True)
    y_train = m.train()(x)
    y_train.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert all(b.grad is None for b in m.buffers())
    with torch.no_grad():
        y_eval = m.eval()(x)
    assert not y_eval.requires_grad
    assert torch.equal(y_eval, y_train.detach())
    with torch.inference_mode():
        assert torch.equal(m(x), y_eval)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jit_trace(layout):
    A, B = _factors(10, 5, 7, 0.4)
    m = DoubleSparseLinear.from_factors(A, B, torch.randn(10), layout=layout).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, torch.randn(3, 7))
    x = torch.randn(3, 7)
    _close(traced(x), m(x))
    conv = DoubleSparseConv2d.from_factors(*_factors(4, 3, 2 * 9, 0.5), kernel_size=3, padding=1,
                                           layout=layout).eval()
    xi = torch.randn(1, 2, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced_conv = torch.jit.trace(conv, xi)
    _close(traced_conv(xi), conv(xi))


def test_torch_compile():
    """torch.compile (inductor) on the CSR layout; the dense layout is plain F.linear."""
    A, B = _factors(10, 5, 7, 0.4)
    m = DoubleSparseLinear.from_factors(A, B, torch.randn(10), layout="csr").eval()
    x = torch.randn(3, 7)
    try:
        compiled = torch.compile(m)
        y = compiled(x)
    except Exception as exc:  # pragma: no cover - depends on the toolchain
        pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {exc}")
    finally:
        torch._dynamo.reset()
    _close(y, m(x))


# ---------------------------------------------------------------------------- layout rule, bytes
def test_choose_layout_rule():
    n = CSR_MIN_NUMEL
    big = (n // 256, 256)
    assert choose_layout(int(CSR_MAX_DENSITY * n), big, torch.float32) == "csr"
    assert choose_layout(int(CSR_MAX_DENSITY * n) + 100, big, torch.float32) == "dense"
    assert choose_layout(1, (8, 8), torch.float32) == "dense"  # too small to pay off
    assert choose_layout(1, big, torch.float16) == "dense"  # no CPU half CSR kernel
    assert choose_layout(0, (0, 5), torch.float32) == "dense"
    A = sp.random(n // 256, 256, density=CSR_MAX_DENSITY / 2, format="csr", random_state=0, dtype=np.float32)
    B = sp.random(256, 64, density=0.5, format="csr", random_state=1, dtype=np.float32)
    m = DoubleSparseLinear.from_factors(A, B)
    assert m.layouts == {"A": "csr", "B": "dense"}


def test_bytes_properties():
    A, B = _factors(64, 32, 48, 0.1)
    m = DoubleSparseLinear.from_factors(A, B, torch.zeros(64), layout="dense")
    assert m.dense_bytes == (64 * 48 + 64) * 4
    from sparsefact.nn_adapters.io import compression_report, factor_storage

    csr_bytes = (A.nnz + B.nnz) * (4 + 2) + (64 + 1 + 32 + 1) * 4  # values, int16 cols, int32 rows
    # the file's storage per factor (format v3: at density 0.1 a (deflated) bitmask beats CSR)
    assert m.compressed_bytes == factor_storage(m.A)[1] + factor_storage(m.B)[1] + 64 * 4
    assert m.compressed_bytes <= csr_bytes + 64 * 4
    assert m.compressed_bytes == compression_report(torch.nn.Sequential(m))[0]["compressed_bytes"]
    assert m.compressed_bytes < m.dense_bytes
    csr = DoubleSparseLinear.from_factors(A, B, torch.zeros(64), layout="csr")
    assert csr.compressed_bytes == m.compressed_bytes
    assert "nnz=" in repr(m)


# ---------------------------------------------------------------------------- replace_module
def test_replace_module_by_dotted_name():
    inner = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(4, 3))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), inner)
    new = SparseLinear.from_weight(np.eye(3, 4, dtype=np.float32))
    old = replace_module(model, "1.1", new)
    assert isinstance(old, torch.nn.Linear) and model[1][1] is new
    assert model(torch.randn(2, 4)).shape == (2, 3)
    with pytest.raises(ValueError, match="no submodule"):
        replace_module(model, "1.7", new)
    with pytest.raises(ValueError, match="root"):
        replace_module(model, "", new)


# ---------------------------------------------------------------------------- SparseConv2d, low rank
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparsefact.nn_adapters import LowRankConv2d, LowRankLinear, SparseConv2d  # noqa: E402
from sparsefact.nn_adapters.modules import MODULE_CLASSES, module_class  # noqa: E402

_pairs = st.tuples(st.integers(1, 3), st.integers(1, 3))


@st.composite
def conv_geometry(draw):
    kernel = draw(_pairs)
    stride = draw(_pairs)
    dilation = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)))
    padding = draw(st.tuples(st.integers(0, 2), st.integers(0, 2)))
    # the input must be at least as large as the dilated kernel after padding
    size = [max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 4))
            for k, d, p in zip(kernel, dilation, padding, strict=True)]
    return kernel, stride, padding, dilation, tuple(size)


@given(geometry=conv_geometry(), bias=st.booleans(), layout=st.sampled_from(LAYOUTS),
       c_in=st.integers(1, 3), out=st.integers(1, 4), batch=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_sparse_conv_matches_dense_conv(geometry, bias, layout, c_in, out, batch, seed):
    kernel, stride, padding, dilation, size = geometry
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, c_in, *kernel, generator=g)
    weight[torch.rand(weight.shape, generator=g) < 0.5] = 0
    b = torch.randn(out, generator=g) if bias else None
    m = SparseConv2d.from_weight(weight.flatten(1), b, kernel_size=kernel, stride=stride, padding=padding,
                                 dilation=dilation, layout=layout)
    assert m.layouts == {"weight": layout}
    x = torch.randn(batch, c_in, *size, generator=g)
    ref = F.conv2d(x, weight, b, stride, padding, dilation)
    _close(m(x), ref)
    _close(m.to_dense(), weight)
    _close(m(x[0]), ref[0])
    assert m.nnz == int((weight != 0).sum())


@given(geometry=conv_geometry(), bias=st.booleans(), rank=st.integers(1, 3), c_in=st.integers(1, 3),
       out=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_lowrank_conv_matches_dense_conv(geometry, bias, rank, c_in, out, seed):
    kernel, stride, padding, dilation, size = geometry
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(out, rank, generator=g)
    V = torch.randn(rank, c_in * kernel[0] * kernel[1], generator=g)
    b = torch.randn(out, generator=g) if bias else None
    m = LowRankConv2d.from_factors(U, V, b, kernel_size=kernel, stride=stride, padding=padding,
                                   dilation=dilation)
    assert m.layouts == {"A": "dense", "B": "dense"} and m.rank == rank
    assert torch.equal(m.U, U) and torch.equal(m.V, V)
    x = torch.randn(2, c_in, *size, generator=g)
    ref = F.conv2d(x, (U @ V).reshape(out, c_in, *kernel), b, stride, padding, dilation)
    _close(m(x), ref, tol=1e-4)


@given(rank=st.integers(1, 4), bias=st.booleans(), lead=st.sampled_from([(), (3,), (2, 3)]),
       seed=st.integers(0, 2**16))
def test_lowrank_linear_matches_dense_product(rank, bias, lead, seed):
    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(7, rank, generator=g), torch.randn(rank, 5, generator=g)
    b = torch.randn(7, generator=g) if bias else None
    m = LowRankLinear.from_factors(U, V, b)
    assert m.layouts == {"A": "dense", "B": "dense"} and m.inner_features == m.rank == rank
    x = torch.randn(*lead, 5, generator=g)
    ref = x @ (U @ V).T + (b if bias else 0)
    _close(m(x), ref)


def test_lowrank_modules_are_always_dense():
    with pytest.raises(ValueError, match="dense"):
        LowRankLinear(4, 3, 2, layout="csr")
    U = sp.random(400, 300, density=0.01, format="csr", random_state=0, dtype=np.float32)
    m = LowRankLinear.from_factors(U, np.eye(300, 400, dtype=np.float32))  # very sparse: still dense
    assert m.layouts == {"A": "dense", "B": "dense"}
    m._set_factor("A", m.A, "csr")
    assert m.layouts["A"] == "dense"
    sd = m.state_dict()
    fresh = LowRankLinear(400, 400, 300, bias=False)
    fresh.load_state_dict(sd)
    assert fresh.A.layout is torch.strided and torch.equal(fresh.A, m.A)


def test_sparse_conv_constructor_and_errors():
    m = SparseConv2d(2, 4, 3, stride=2, padding="same", bias=False)
    assert m.weight.shape == (4, 18) and m.padding == (1, 1) and m.bias is None
    assert m(torch.randn(1, 2, 5, 5)).shape == (1, 4, 3, 3)
    with pytest.raises(ValueError, match="multiple"):
        SparseConv2d.from_weight(np.ones((4, 10)), kernel_size=3)
    four_d = torch.randn(4, 2, 3, 3)
    assert torch.equal(SparseConv2d.from_weight(four_d, kernel_size=3).to_dense(), four_d)
    assert "kernel_size=(3, 3)" in repr(m)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sparse_conv_state_dict_and_deepcopy(layout):
    weight = torch.randn(4, 2 * 9)
    weight[weight.abs() < 0.8] = 0
    m = SparseConv2d.from_weight(weight, torch.randn(4), kernel_size=3, padding=1, layout=layout)
    fresh = SparseConv2d(2, 4, 3, padding=1, layout=layout)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(2, 2, 6, 6)
    assert torch.equal(fresh(x), m(x))
    assert torch.equal(copy.deepcopy(m)(x), m(x))
    assert m.dense_bytes == (4 * 18 + 4) * 4


@pytest.mark.parametrize(
    "geometry, error, message",
    [
        ({"stride": 0}, ValueError, "stride must be at least 1"),
        ({"dilation": (1, 0)}, ValueError, "dilation must be at least 1"),
        ({"padding": -1}, ValueError, "padding must be at least 0"),
        ({"kernel_size": 0}, ValueError, "kernel_size must be at least 1"),
        ({"stride": (1, 1, 1)}, ValueError, "stride must be an int or a pair"),
        ({"stride": "two"}, TypeError, "stride must be an int or a pair of ints"),
        ({"stride": True}, TypeError, "stride must be an int or a pair of ints"),
    ],
)
def test_conv_geometry_is_validated_with_the_argument_named(geometry, error, message):
    kwargs = {"kernel_size": 3, **geometry}
    for cls in (SparseConv2d, DoubleSparseConv2d, LowRankConv2d):
        with pytest.raises(error, match=message):
            cls(2, 4, *((1,) if cls is not SparseConv2d else ()), **kwargs)


# ---------------------------------------------------------------------------- from_layer
def test_from_layer_takes_geometry_and_bias_from_the_layer():
    conv = torch.nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    W = conv.weight.detach().flatten(1).numpy().copy()
    W[np.abs(W) < 0.1] = 0
    x = torch.randn(2, 3, 9, 8)
    eye = np.eye(W.shape[1], dtype=np.float32)
    for cls, factors in [(SparseConv2d, (W,)), (DoubleSparseConv2d, (W, eye)),
                         (LowRankConv2d, (np.eye(5, dtype=np.float32), W))]:
        m = cls.from_layer(conv, factors)
        assert (m.stride, m.padding, m.dilation, m.kernel_size) == ((2, 1), (1, 0), (1, 2), (3, 2))
        kernel = torch.from_numpy(W).reshape(conv.weight.shape)
        ref = F.conv2d(x, kernel, conv.bias, conv.stride, conv.padding, conv.dilation)
        _close(m(x), ref)
    lin = torch.nn.Linear(6, 4, bias=False)
    W = lin.weight.detach().numpy()
    m = SparseLinear.from_layer(lin, (W,))
    assert m.bias is None and torch.equal(m.to_dense(), lin.weight.detach())
    with pytest.raises(ValueError, match="factor"):
        DoubleSparseLinear.from_layer(lin, (W,))
    with pytest.raises(ValueError, match="layer's matrix"):
        SparseLinear.from_layer(lin, (W.T,))


# ---------------------------------------------------------------------------- config
def _every_module():
    """One instance of every built-in module class, with non-trivial geometry."""
    A, B = _factors(6, 3, 2 * 3 * 2, 0.5)
    return [
        DoubleSparseLinear.from_factors(A, B, torch.randn(6), layout="csr"),
        SparseLinear.from_weight(_dense(B), None, layout="dense"),
        LowRankLinear.from_factors(_dense(A), _dense(B), torch.randn(6)),
        DoubleSparseConv2d.from_factors(A, B, None, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
                                        dilation=(1, 2), layout="csr"),
        SparseConv2d.from_weight(_dense(B), torch.randn(3), kernel_size=(3, 2), stride=2, padding=1),
        LowRankConv2d.from_factors(_dense(A), _dense(B), torch.randn(6), kernel_size=(3, 2), dilation=2),
    ]


@pytest.mark.parametrize("index", range(6))
def test_get_config_from_config_round_trip(index):
    import json

    module = _every_module()[index].to(torch.float64)
    cfg = module.get_config()
    assert json.loads(json.dumps(cfg)) == cfg  # JSON-able
    assert cfg["class"] == type(module).__name__ and cfg["dtype"] == "float64"
    rebuilt = module_class(cfg["class"]).from_config(cfg)
    assert type(rebuilt) is type(module) and rebuilt.get_config() == {**cfg, "layouts": rebuilt.layouts}
    assert rebuilt.layouts == module.layouts
    for f in module._factor_names:
        assert getattr(rebuilt, f).shape == getattr(module, f).shape
        assert not rebuilt.factor(f).any()
    rebuilt.load_state_dict(module.state_dict())
    assert torch.equal(rebuilt.to_dense(), module.to_dense())


def test_module_classes_registered_by_name():
    assert {"SparseLinear", "DoubleSparseLinear", "LowRankLinear", "SparseConv2d", "DoubleSparseConv2d",
            "LowRankConv2d"} <= set(MODULE_CLASSES)
    assert not any(name.startswith("_") for name in MODULE_CLASSES)

    class ScaledSparseLinearForTest(SparseLinear):
        pass

    try:
        assert module_class("ScaledSparseLinearForTest") is ScaledSparseLinearForTest
    finally:
        del MODULE_CLASSES["ScaledSparseLinearForTest"]
    with pytest.raises(ValueError, match="unknown module class"):
        module_class("Nope")
    with pytest.raises(TypeError, match="built into sparsefact"):
        type("SparseLinear", (SparseLinear,), {"__module__": "somewhere.else"})
