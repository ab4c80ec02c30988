"""Compressed modules fine-tune with any optimiser while their sparsity patterns stay fixed."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402

from sparsefact.nn_adapters.modules import (  # noqa: E402
    DoubleSparseConv2d,
    DoubleSparseLinear,
    SparseConv2d,
    SparseLinear,
    set_trainable,
)


def _sparse(shape, density=0.4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * (torch.rand(shape, generator=g) < density)


def _modules(dtype=torch.float32):
    return {
        "dsf-linear": (DoubleSparseLinear.from_factors(_sparse((8, 6), seed=1), _sparse((6, 10), seed=2),
                                                      torch.randn(8), dtype=dtype), (5, 10)),
        "sparse-linear": (SparseLinear.from_weight(_sparse((8, 10), seed=3), torch.randn(8), dtype=dtype),
                          (5, 10)),
        "dsf-conv": (DoubleSparseConv2d.from_factors(_sparse((4, 5), seed=4), _sparse((5, 27), seed=5),
                                                    torch.randn(4), kernel_size=3, padding=1, dtype=dtype),
                     (2, 3, 6, 6)),
        "sparse-conv": (SparseConv2d.from_weight(_sparse((4, 27), seed=6), torch.randn(4), kernel_size=3,
                                                  dtype=dtype), (2, 3, 6, 6)),
    }


def _patterns(module):
    return {name: (module.factor(name) != 0).clone() for name in module._factor_names}


@pytest.mark.parametrize("optimiser", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patterns_stay_fixed_under_optimiser_steps(optimiser, dtype):
    for key, (module, shape) in _modules(dtype).items():
        before = _patterns(module)
        module.set_trainable()
        params = list(module.parameters())
        assert params and all(p.requires_grad for p in params), key
        opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
               "adam": lambda p: torch.optim.Adam(p, lr=0.05),
               "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5)}[optimiser](params)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype)
        first = None
        for _ in range(4):
            opt.zero_grad()
            loss = (module(x).float() - 1.0).pow(2).mean()
            first = loss.item() if first is None else first
            loss.backward()
            opt.step()
        assert loss.item() < first, key  # it trains
        after = _patterns(module)
        for name in before:  # no new nonzero anywhere (values may reach zero, never leave the pattern)
            assert not (after[name] & ~before[name]).any(), (key, name)
        module.set_trainable(False)
        assert not list(module.parameters()) and not module.trainable
        assert module.factor(module._factor_names[0]).dtype == dtype


def test_gradients_are_the_dense_gradients_restricted_to_the_pattern():
    torch.manual_seed(0)
    A, B = _sparse((8, 6), seed=1, dtype=torch.float64), _sparse((6, 10), seed=2, dtype=torch.float64)
    module = DoubleSparseLinear.from_factors(A, B, None, dtype=torch.float64).set_trainable()
    x = torch.randn(7, 10, dtype=torch.float64)
    (module(x).sin().sum()).backward()
    a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
    (x @ (a @ b).T).sin().sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert torch.allclose(grads["parametrizations.A.original"], a.grad * (A != 0), atol=1e-12)
    assert torch.allclose(grads["parametrizations.B.original"], b.grad * (B != 0), atol=1e-12)

    W = _sparse((8, 10), seed=3, dtype=torch.float64)
    single = SparseLinear.from_weight(W, torch.zeros(8, dtype=torch.float64), dtype=torch.float64)
    single.set_trainable()
    dense = nn.Linear(10, 8, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(W)
        dense.bias.zero_()
    single(x).pow(3).sum().backward()
    dense(x).pow(3).sum().backward()
    got = dict(single.named_parameters())["parametrizations.weight.original"].grad
    assert torch.allclose(got, dense.weight.grad * (W != 0), atol=1e-12)
    assert torch.allclose(single.bias.grad, dense.bias.grad, atol=1e-12)


def test_trainable_forward_is_the_inference_forward_and_layouts_come_back():
    A, B = _sparse((300, 256), density=0.02, seed=1), _sparse((256, 300), density=0.02, seed=2)
    module = DoubleSparseLinear.from_factors(A, B, None, layout="csr")
    assert module.layouts == {"A": "csr", "B": "csr"}
    x = torch.randn(4, 300)
    expected = module(x)
    module.set_trainable()
    assert module.layouts == {"A": "dense", "B": "dense"}
    assert torch.allclose(module(x), expected, atol=1e-5)
    module.set_trainable(False)
    assert module.layouts == {"A": "csr", "B": "csr"} and module.A.layout is torch.sparse_csr
    assert torch.allclose(module(x), expected, atol=1e-5)


def test_a_whole_model_fine_tunes_and_saves(tmp_path):
    from sparsefact.nn_adapters import compress_model, load_compressed, save_compressed

    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    x = torch.randn(64, 12)
    target = make()(x).detach()
    model, _ = compress_model(make(), x, "dsf", 0.5, progress=False, max_iter=3, tol=0)
    patterns = {n: _patterns(m) for n, m in model.named_modules() if hasattr(m, "_factor_names")}
    set_trainable(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    set_trainable(model, False)
    for name, module in model.named_modules():
        if name in patterns:
            for f, pattern in patterns[name].items():
                assert not ((module.factor(f) != 0) & ~pattern).any()
    save_compressed(model, tmp_path / "m.safetensors")
    loaded = load_compressed(make(), tmp_path / "m.safetensors")
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    np.testing.assert_allclose(losses[-1], (model(x) - target).pow(2).mean().item(), rtol=0.5)
