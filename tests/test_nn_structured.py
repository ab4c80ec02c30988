"""The trainable MonarchLinear and ButterflyLinear (sparsefact/nn_adapters/structured_modules.py).

The forward pass is compared with the dense matrix built independently by
:func:`sparsefact.structured.monarch_matrix` / :func:`~sparsefact.structured.butterfly_matrix`
(hypothesis over shapes, block counts and batch shapes), the modules built from fitted
estimators with ``reconstruct()``, and then: gradients and training, the initialisation scale,
save/load (bit-identical, also in a fresh process), state dicts, and ``compress_model`` with the
``"monarch"`` and ``"butterfly"`` methods.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[torch]')")
pytest.importorskip("safetensors")
from torch import nn  # noqa: E402

from sparsefact.nn_adapters import (  # noqa: E402
    ButterflyLinear,
    MonarchLinear,
    compress_model,
    compression_report,
    load_compressed,
    register_module_family,
    save_compressed,
)
from sparsefact.nn_adapters.install import build_module, module_families, unregister_module_family  # noqa: E402
from sparsefact.nn_adapters.modules import MODULE_CLASSES  # noqa: E402
from sparsefact.structured import (  # noqa: E402
    ButterflyFactorization,
    MonarchFactorization,
    butterfly_matrix,
    monarch_matrix,
)

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),  # conftest.py: 1 torch thread, seed 0
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
]

F64 = torch.float64




def _monarch_dense(module: MonarchLinear) -> torch.Tensor:
    """The dense matrix of the module's blocks, built by the estimator-side reference."""
    L = module.blocks_left.detach().double().numpy()
    R = module.blocks_right.detach().double().numpy()
    return torch.from_numpy(monarch_matrix(L, R, (module.out_features, module.in_features)))


def _butterfly_dense(module: ButterflyLinear) -> torch.Tensor:
    """The dense grid of butterflies (``butterfly_matrix`` per block), padded rows/columns cropped."""
    rows, cols = module.grid_shape
    N = module.block_size
    blocks = butterfly_matrix(module.twiddles.detach().double().numpy())  # (G, N, N)
    full = blocks.reshape(rows, cols, N, N).transpose(0, 2, 1, 3).reshape(rows * N, cols * N)
    return torch.from_numpy(np.ascontiguousarray(full[: module.out_features, : module.in_features]))


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter (bias included) redrawn from a standard normal, padding kept at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            values = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if isinstance(module, MonarchLinear) and name in ("left", "right"):
                values *= getattr(module, f"_{name}_mask")
            p.copy_(values)
    return module


# ---------------------------------------------------------------------------- forward == dense
batch_shapes = st.sampled_from([(1,), (5,), (2, 3), (1, 4)])


@given(m=st.integers(1, 40), n=st.integers(1, 40), data=st.data(), lead=batch_shapes,
       bias=st.booleans())
def test_monarch_forward_is_the_dense_product(m, n, data, lead, bias):
    b = data.draw(st.integers(1, min(m, n)), label="n_blocks")
    module = _randomise(MonarchLinear(n, m, b, bias=bias, dtype=F64), seed=m * 41 + n)
    x = torch.randn(*lead, n, dtype=F64, generator=torch.Generator().manual_seed(b))
    expected = x @ _monarch_dense(module).T + (module.bias if bias else 0.0)
    y = module(x)
    assert y.shape == (*lead, m)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.to_dense(), _monarch_dense(module), rtol=1e-12, atol=1e-12)


@given(m=st.integers(1, 40), n=st.integers(1, 40), N=st.sampled_from([None, 2, 4, 8, 16, 64]),
       lead=batch_shapes, bias=st.booleans())
def test_butterfly_forward_is_the_dense_product(m, n, N, lead, bias):
    module = _randomise(ButterflyLinear(n, m, N, bias=bias, dtype=F64), seed=m * 41 + n)
    x = torch.randn(*lead, n, dtype=F64, generator=torch.Generator().manual_seed(m))
    dense = _butterfly_dense(module)
    y = module(x)
    assert y.shape == (*lead, m)
    torch.testing.assert_close(y, x @ dense.T + (module.bias if bias else 0.0), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(module.to_dense(), dense, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize(("n", "m", "N", "grid"), [
    (16, 16, None, (1, 1)),  # one butterfly
    (24, 24, None, (1, 1)),  # padded to 32 and cropped
    (512, 10, None, (1, 32)),  # a classification head: a row of 16x16 butterflies
    (10, 40, None, (3, 1)),  # a column of 16x16 butterflies
    (40, 24, 8, (3, 5)),
])
def test_butterfly_geometry(n, m, N, grid):
    module = ButterflyLinear(n, m, N)
    assert module.grid_shape == grid and module.n_butterflies == grid[0] * grid[1]
    size = module.block_size
    assert module.twiddle.shape == (module.n_butterflies * module.n_stages, 2 * size)
    assert module.twiddles.shape == (module.n_butterflies, module.n_stages, size // 2, 2, 2)
    assert module.n_parameters == module.nnz == module.n_butterflies * 2 * size * module.n_stages


def test_the_forward_pass_never_forms_the_dense_matrix(monkeypatch):
    """No product with an (out x in) operand: Monarch uses two bmm of the blocks, butterfly none."""
    shapes = []
    real_bmm, real_mm, real_matmul = torch.bmm, torch.mm, torch.matmul

    def spy(real):
        def call(a, b, *args, **kwargs):
            shapes.append((tuple(a.shape), tuple(b.shape)))
            return real(a, b, *args, **kwargs)
        return call

    monarch, butterfly = MonarchLinear(64, 64, 8), ButterflyLinear(64, 64)
    x = torch.randn(3, 64)
    for name, real in (("bmm", real_bmm), ("mm", real_mm), ("matmul", real_matmul)):
        monkeypatch.setattr(torch, name, spy(real))
    monkeypatch.setattr(nn.functional, "linear", spy(nn.functional.linear))
    monarch(x)
    assert shapes == [((8, 8, 8), (8, 8, 3)), ((8, 8, 8), (8, 8, 3))]
    shapes.clear()
    butterfly(x)
    assert shapes == []


# ---------------------------------------------------------------------------- from_estimator
SHAPES = [(16, 16), (24, 40), (37, 23), (10, 64), (64, 10)]


@pytest.mark.parametrize(("m", "n"), SHAPES)
@pytest.mark.parametrize("family", ["monarch", "butterfly"])
def test_from_estimator_reproduces_reconstruct(m, n, family):
    rng = np.random.default_rng(m * 100 + n)
    W = rng.standard_normal((m, n))
    X = rng.standard_normal((200, n)) * rng.lognormal(size=n)
    if family == "monarch":
        ests = [MonarchFactorization(n_blocks=b).fit(W, X) for b in sorted({1, 3, min(m, n)})]
        cls = MonarchLinear
    else:
        ests = [ButterflyFactorization(block_size=N, max_iter=2).fit(W) for N in (2, 8)]
        ests.append(ButterflyFactorization(0.5, method="hierarchical").fit(W))
        cls = ButterflyLinear
    for est in ests:
        layer = nn.Linear(n, m).double()
        module = cls.from_estimator(layer, est)
        assert module.left.dtype == F64 if family == "monarch" else module.twiddle.dtype == F64
        assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in module.parameters())
        x = torch.randn(2, 3, n, dtype=F64)
        W_hat = torch.from_numpy(est.reconstruct())
        with torch.no_grad():
            torch.testing.assert_close(module(x), x @ W_hat.T + layer.bias, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(module.to_dense(), W_hat, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(module.bias, layer.bias, rtol=0, atol=0)
        assert module.n_parameters == module.nnz == est.nnz_
        if family == "monarch":
            assert np.array_equal(module.blocks_left.detach().numpy(), est.blocks_left_)
            assert np.array_equal(module.blocks_right.detach().numpy(), est.blocks_right_)
        else:
            assert np.array_equal(module.twiddles.detach().numpy(), est.twiddles_)
            assert module.block_size == est.block_size_ and module.grid_shape == est.grid_shape_
        # float32 estimator (as compress_model fits a float32 layer) -> a float32 module
        est32 = copy.deepcopy(est).fit(W.astype(np.float32))
        module32 = cls.from_estimator(None, est32)
        assert module32.bias is None and module32.to_dense().dtype == torch.float32
        x32 = x.float()
        with torch.no_grad():
            torch.testing.assert_close(module32(x32), x32 @ torch.from_numpy(est32.reconstruct()).T,
                                       rtol=1e-4, atol=1e-5)


def test_from_estimator_refuses_a_wrong_estimator_or_layer():
    W = np.random.default_rng(0).standard_normal((8, 12))
    monarch = MonarchFactorization(n_blocks=2).fit(W)
    butterfly = ButterflyFactorization(block_size=4).fit(W)
    with pytest.raises(ValueError, match="not a fitted MonarchFactorization"):
        MonarchLinear.from_estimator(nn.Linear(12, 8), butterfly)
    with pytest.raises(ValueError, match="not a fitted ButterflyFactorization"):
        ButterflyLinear.from_estimator(nn.Linear(12, 8), monarch)
    with pytest.raises(ValueError, match="layer's matrix"):
        MonarchLinear.from_estimator(nn.Linear(8, 12), monarch)
    with pytest.raises(ValueError, match="layer's matrix"):
        ButterflyLinear.from_estimator(nn.Linear(8, 12), butterfly)
    with pytest.raises(TypeError, match="from_estimator"):
        MonarchLinear.from_layer(nn.Linear(12, 8), monarch.get_factors())


def test_constructor_validation_and_repr():
    with pytest.raises(ValueError, match="n_blocks"):
        MonarchLinear(8, 4, 5)
    with pytest.raises(ValueError, match="n_blocks"):
        MonarchLinear(8, 4, 0)
    with pytest.raises(ValueError, match="power of two"):
        ButterflyLinear(8, 8, 6)
    with pytest.raises(ValueError, match="power of two"):
        ButterflyLinear(8, 8, 1)
    with pytest.raises(TypeError, match="in_features"):
        ButterflyLinear(8.0, 8)
    with pytest.raises(ValueError, match="input features"):
        MonarchLinear(8, 4, 2)(torch.randn(3, 7))
    assert "n_blocks=2" in repr(MonarchLinear(8, 4, 2))
    assert "block_size=4, grid_shape=(1, 2)" in repr(ButterflyLinear(8, 4))
    assert MonarchLinear(8, 4, 2).n_parameters == 2 * (8 + 4)
    head = ButterflyLinear(512, 10, bias=True)  # the classification head's spelling
    assert head.block_size == 16 and head.bias.shape == (10,)


# ---------------------------------------------------------------------------- training
def _regression(cls, *args, steps: int, lr: float, seed: int = 0, **kw):
    """SGD on the outputs of a teacher of the same structure (so the loss can reach zero)."""
    torch.manual_seed(seed + 1)
    teacher = cls(*args, **kw)
    torch.manual_seed(seed)
    module = cls(*args, **kw)
    x = torch.randn(256, module.in_features, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        target = 3.0 * teacher(x)
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((module(x) - target) ** 2).mean()
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    return module, losses


@pytest.mark.parametrize(("cls", "args"), [(MonarchLinear, (30, 20, 4)), (ButterflyLinear, (30, 20)),
                                           (ButterflyLinear, (64, 10))])
def test_gradients_flow_and_sgd_lowers_a_regression_loss(cls, args):
    module, losses = _regression(cls, *args, steps=1, lr=0.0)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())
    _, losses = _regression(cls, *args, steps=30, lr=1.0)
    assert losses[-1] < 0.6 * losses[0] and losses[-1] < losses[len(losses) // 2] < losses[0]


def test_training_keeps_the_structure_and_the_monarch_padding():
    """Adam with weight decay: the padding of ragged Monarch blocks stays exactly zero."""
    torch.manual_seed(0)
    module = MonarchLinear(23, 17, 4)  # ragged: 23 = 6+6+6+5 columns, 17 = 4*5 - 3 rows
    assert bool((module.left * (1 - module._left_mask)).eq(0).all())
    assert bool((module.right * (1 - module._right_mask)).eq(0).all())
    opt = torch.optim.AdamW(module.parameters(), lr=0.05, weight_decay=0.1)
    x = torch.randn(64, 23)
    for _ in range(10):
        opt.zero_grad()
        (module(x) ** 2).sum().backward()
        opt.step()
    assert bool((module.left * (1 - module._left_mask)).eq(0).all())
    assert bool((module.right * (1 - module._right_mask)).eq(0).all())
    with torch.no_grad():
        torch.testing.assert_close(module.to_dense().double(), _monarch_dense(module), rtol=1e-5, atol=1e-6)
    butterfly = ButterflyLinear(23, 17)
    opt = torch.optim.Adam(butterfly.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        (butterfly(x) ** 2).sum().backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(butterfly.to_dense().double(), _butterfly_dense(butterfly),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: MonarchLinear(256, 256, 16), lambda: MonarchLinear(300, 100, 7),
                                  lambda: ButterflyLinear(256, 256), lambda: ButterflyLinear(512, 10),
                                  lambda: ButterflyLinear(100, 300)])
def test_initialisation_matches_nn_linear_output_variance(make):
    """Mean squared row norm of W (the output variance for unit-variance inputs): 1/3, as nn.Linear's."""
    torch.manual_seed(0)
    values = []
    for _ in range(3):
        module = make()
        values.append(float((module.to_dense().detach() ** 2).sum(1).mean()))
        bound = 1 / module.in_features**0.5
        assert float(module.bias.detach().abs().max()) <= bound
    linear = float((nn.Linear(module.in_features, module.out_features).weight.detach() ** 2).sum(1).mean())
    assert linear == pytest.approx(1 / 3, rel=0.05)
    assert np.allclose(values, 1 / 3, rtol=0.1), values


# ---------------------------------------------------------------------------- save / load / state
def _model_with_both() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(MonarchLinear(23, 17, 4), nn.ReLU(), ButterflyLinear(17, 10), nn.Tanh(),
                         ButterflyLinear(10, 3, bias=False))


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = _model_with_both()
    x = torch.randn(5, 23)
    path = tmp_path / "structured.safetensors"
    save_compressed(model, path)

    def dense_factory():
        return nn.Sequential(nn.Linear(23, 17), nn.ReLU(), nn.Linear(17, 10), nn.Tanh(),
                             nn.Linear(10, 3, bias=False))

    rng_state = torch.random.get_rng_state()
    loaded = load_compressed(dense_factory, path)
    for i in (0, 2, 4):
        assert type(loaded[i]) is type(model[i])
        assert loaded[i].get_config() == model[i].get_config()
        pairs = zip(model[i].named_parameters(), loaded[i].named_parameters(), strict=True)
        for (name, p), (name2, q) in pairs:
            assert name == name2 and isinstance(q, nn.Parameter) and q.requires_grad
            assert q.dtype == p.dtype and torch.equal(p, q)
    assert loaded[4].bias is None
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # the loaded model trains
    loaded(x).sum().backward()
    assert loaded[0].left.grad is not None and loaded[2].twiddle.grad is not None
    # a monarch factor with many zeros (padding) may be stored as CSR: it comes back dense
    report = compression_report(model)
    assert [r["nnz"] for r in report[:3]] == [4 * (23 + 17), model[2].n_parameters, model[4].n_parameters]
    assert loaded[0].layouts == {"left": "dense", "right": "dense"}
    torch.random.set_rng_state(rng_state)


def test_a_fresh_process_loads_a_structured_file(tmp_path):
    """The classes are registered by importing sparsefact.nn_adapters: nothing names them."""
    model = _model_with_both()
    path = tmp_path / "fresh.safetensors"
    save_compressed(model, path)
    x = torch.randn(4, 23)
    torch.save(model(x).detach(), tmp_path / "y.pt")
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        from torch import nn
        from sparsefact.nn_adapters import load_compressed
        model = load_compressed(lambda: nn.Sequential(nn.Linear(23, 17), nn.ReLU(), nn.Linear(17, 10),
                                                      nn.Tanh(), nn.Linear(10, 3, bias=False)),
                                {str(path)!r})
        x, y = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "y.pt")!r})
        with torch.no_grad():
            same = torch.equal(model(x), y)
        sys.exit(0 if same and type(model[0]).__name__ == "MonarchLinear" else 3)
    """)
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_config_state_dict_deepcopy_and_dtype():
    model = _model_with_both()
    monarch, butterfly = model[0], model[2]
    assert {"MonarchLinear", "ButterflyLinear"} <= set(MODULE_CLASSES)
    cfg = monarch.get_config()
    assert cfg["class"] == "MonarchLinear" and cfg["n_blocks"] == 4 and cfg["shapes"] == {
        "left": [4 * 5, 4], "right": [16, 6]}
    assert butterfly.get_config()["block_size"] == 16
    # from_config: all zeros, and no random numbers drawn
    state = torch.random.get_rng_state()
    empty = type(butterfly).from_config(butterfly.get_config())
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not bool(empty.twiddle.any()) and not bool(empty.bias.any())
    # state dict: parameters only (the masks and the column map are not persistent)
    assert set(monarch.state_dict()) == {"left", "right", "bias"}
    fresh = MonarchLinear(23, 17, 4)
    param = fresh.left
    fresh.load_state_dict(monarch.state_dict())
    assert fresh.left is param and torch.equal(fresh.left, monarch.left)  # copied in place
    clone = copy.deepcopy(model)
    x = torch.randn(3, 23)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
        y64 = copy.deepcopy(model).double()(x.double())
    torch.testing.assert_close(y64.float(), model(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- compress_model
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 6))


@pytest.mark.parametrize(("method", "cls"), [("monarch", MonarchLinear), ("butterfly", ButterflyLinear)])
def test_compress_model_installs_the_structured_modules(method, cls, tmp_path):
    x = torch.randn(128, 12, generator=torch.Generator().manual_seed(3))
    model, report = compress_model(_mlp(), x, method, 0.5, layers=(nn.Linear,), sequential=False,
                                   progress=False)
    in_place, _ = compress_model(_mlp(), x, method, 0.5, layers=(nn.Linear,), sequential=False,
                                 replace=False, progress=False)
    assert all(type(model[i]) is cls for i in (0, 2, 4))
    assert [r["replaced_by"] for r in report] == [cls.__name__] * 3
    assert [r["nnz"] for r in report] == [model[i].n_parameters for i in (0, 2, 4)]
    dense = _mlp()
    for i in (0, 2, 4):
        torch.testing.assert_close(model[i].bias, dense[i].bias)
        torch.testing.assert_close(model[i].to_dense(), in_place[i].weight, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), in_place(x), rtol=1e-4, atol=1e-5)
    # the compressed model is trainable (fine-tuning after compression)
    model(x).square().mean().backward()
    assert all(model[i].bias.grad is not None for i in (0, 2, 4))
    path = tmp_path / f"{method}.safetensors"
    save_compressed(model, path)
    loaded = load_compressed(_mlp, path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_structured_families_are_built_in_and_use_the_estimator_hook():
    families = module_families()
    assert families["monarch"] == {nn.Linear: MonarchLinear}
    assert families["butterfly"] == {nn.Linear: ButterflyLinear}
    with pytest.raises(ValueError, match="built-in"):
        register_module_family("monarch", linear=MonarchLinear)
    layer = nn.Linear(12, 8).double().train()
    est = MonarchFactorization(n_blocks=2).fit(layer.weight.detach().float().numpy())
    new = build_module("monarch", est, layer)
    assert type(new) is MonarchLinear and new.training and new.left.dtype == F64
    # a user family whose class has only the estimator hook
    calls = []

    class HookOnly(nn.Module):
        @classmethod
        def from_layer_estimator(cls, layer, estimator):
            calls.append(type(estimator).__name__)
            return ButterflyLinear.from_estimator(layer, estimator)

    register_module_family("hook-only", linear=HookOnly)
    try:
        assert type(build_module(ButterflyFactorization, ButterflyFactorization(block_size=4).fit(
            layer.weight.detach().numpy()), layer)) is ButterflyLinear
        from sparsefact.methods import MethodSpec

        spec = MethodSpec("x", ButterflyFactorization, module="hook-only")
        est = ButterflyFactorization(block_size=4).fit(layer.weight.detach().numpy())
        assert type(build_module(spec, est, layer)) is ButterflyLinear and calls == ["ButterflyFactorization"]
    finally:
        unregister_module_family("hook-only")
