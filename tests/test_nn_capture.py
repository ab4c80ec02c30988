"""Tests of sparsefact/nn_adapters/capture.py: Grams from forward hooks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402
from torch.nn import functional as nnf  # noqa: E402

from sparsefact import Calibration  # noqa: E402
from sparsefact.nn_adapters.capture import (  # noqa: E402
    GRAM_CHUNK_ROWS,
    ActivationCapture,
    capture_calibrations,
    layer_matrix,
    select_layers,
    token_mask,
)


def assert_float32_gram(G: torch.Tensor, X: torch.Tensor) -> None:
    """``G`` is ``X^T X`` up to the rounding of float32 products (the capture's arithmetic).

    The forward error bound of a float32 dot product of ``n`` terms, ``n u |x|^T |y|``
    (``u = 2**-24``), with ``n`` the rows of one product chunk (``GRAM_CHUNK_ROWS`` at most);
    the float64 sum of the chunks adds nothing visible at that scale.
    """
    X = X.double()
    n = min(X.shape[0], GRAM_CHUNK_ROWS) + 1
    bound = n * 2.0**-24 * (X.abs().T @ X.abs())
    err = (G.double() - X.T @ X).abs()
    assert bool((err <= bound + 1e-300).all()), float((err / (bound + 1e-300)).max())


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Recorder(nn.Module):
    """Wraps a layer and records its inputs, to compare the hooks' Gram with X^T X."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.layer(x)


def test_linear_gram_equals_xtx():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [torch.randn(7, 6), torch.randn(2, 4, 6)]  # 2-D and (batch, tokens, features)
    with ActivationCapture(model) as cap:
        cap.run(batches)
    assert cap.names == ["0", "2"]
    X0 = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    assert_float32_gram(cap.gram("0"), X0)
    H = torch.tanh(model[0](X0.float())).double().detach()
    np.testing.assert_allclose(cap.gram("2").numpy(), (H.T @ H).numpy(), rtol=1e-5)
    cal = cap.calibration("0")
    assert isinstance(cal, Calibration)
    assert cal.n_samples == 15 and cal.n_features == 6
    assert cal.gram().dtype == np.float64
    assert _hooks(model) == 0


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({"kernel_size": 3, "padding": 1}, (2, 3, 8, 8)),
        ({"kernel_size": (3, 2), "stride": 2, "padding": (1, 0), "dilation": (1, 2)}, (2, 3, 9, 10)),
        ({"kernel_size": 3, "padding": "same", "dilation": 2}, (1, 3, 7, 7)),
        ({"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}, (2, 3, 6, 6)),
    ],
)
def test_conv2d_gram_is_im2col(kwargs, shape):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, **kwargs)
    x = torch.randn(*shape)
    with ActivationCapture(nn.Sequential(conv)) as cap:
        cap.run(x)
    G = cap.gram("0")
    W = layer_matrix(conv)
    assert W.shape == (4, 3 * conv.kernel_size[0] * conv.kernel_size[1])
    assert G.shape == (W.shape[1], W.shape[1])
    # The unfolding is the one whose product with weight.flatten(1) is the convolution.
    y = conv(x) - conv.bias.view(1, -1, 1, 1)
    n_rows = y.shape[0] * y.shape[2] * y.shape[3]
    assert cap.n_tokens["0"] == n_rows
    Y = y.permute(0, 2, 3, 1).reshape(-1, 4).double()
    # ||W X^T||^2 from the Gram equals the squared norm of the conv output (without bias).
    np.testing.assert_allclose(
        torch.trace(W.double() @ G @ W.double().T).item(), (Y**2).sum().item(), rtol=1e-6
    )
    if kwargs.get("padding_mode", "zeros") == "zeros" and not isinstance(kwargs.get("padding"), str):
        cols = nnf.unfold(
            x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
        )
        X = cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
        assert_float32_gram(G, X)


def test_attention_mask_excludes_padding():
    torch.manual_seed(2)
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with ActivationCapture(model) as cap, token_mask(mask):
        model(x)
    X = x[mask.bool()].double()
    assert cap.n_tokens["0"] == 8
    assert_float32_gram(cap.gram("0"), X)


class DictModel(nn.Module):
    """Takes tokenizer-style keyword inputs, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.relu(self.proj(self.emb(input_ids))))


def test_dict_batches_use_their_attention_mask():
    torch.manual_seed(3)
    model = DictModel()
    ids = torch.randint(0, 10, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    cals = capture_calibrations(model, [{"input_ids": ids, "attention_mask": mask}])
    assert set(cals) == {"proj"}  # embeddings are not layers; the head is skipped by default
    X = model.emb(ids)[mask.bool()].double().detach()
    assert cals["proj"].n_samples == 6
    assert_float32_gram(torch.from_numpy(cals["proj"].gram()), X)


def test_select_layers_by_type_regex_list_and_callable():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4), nn.Linear(4, 2))
    assert select_layers(model) == ["0", "2", "3"]
    assert select_layers(model, nn.Linear) == ["2", "3"]
    assert select_layers(model, (nn.Conv2d,)) == ["0"]
    assert select_layers(model, r"^[23]$") == ["2", "3"]
    assert select_layers(model, ["3"]) == ["3"]
    assert select_layers(
        model, lambda name, m: m.out_features == 2 if isinstance(m, nn.Linear) else False
    ) == ["3"]
    with pytest.raises(KeyError, match="not a supported layer"):
        select_layers(model, ["1"])
    headed = nn.ModuleDict({"body": nn.Linear(2, 2), "lm_head": nn.Linear(2, 2)})
    assert select_layers(headed) == ["body"]
    assert select_layers(headed, skip_heads=False) == ["body", "lm_head"]


def test_hooks_removed_on_exception():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.raises(RuntimeError), ActivationCapture(model) as cap:
        cap.run(torch.randn(2, 5))  # wrong feature count: the forward raises
    assert _hooks(model) == 0


def test_layer_never_called_has_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 3))
    with ActivationCapture(model) as cap:
        pass
    with pytest.raises(ValueError, match="no activations reached"):
        cap.calibration("0")


def test_diag_statistic_accumulates_only_the_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv2d(1, 3, 3, padding=1))

    def forward(m, batch):
        h = m[1](m[0](batch))
        return m[2](h.reshape(-1, 1, 1, 5))

    batches = [torch.randn(4, 3, 6), torch.randn(2, 3, 6)]
    caps = {}
    for statistic in ("gram", "diag"):
        with ActivationCapture(model, names=["0", "2"], statistic=statistic) as cap:
            cap.run(batches, forward=forward)
        caps[statistic] = cap
    diag_cap = caps["diag"]
    for name, n in (("0", 6), ("2", 9)):
        assert diag_cap._acc[name].gram.shape == (n,)  # n floats, no n x n matrix
        cal = diag_cap.calibration(name)
        assert cal.statistic == "diag" and cal.n_samples == caps["gram"].n_tokens[name]
        full = caps["gram"].calibration(name)
        # the diagonal statistic is accumulated in float64, the full Gram from float32 products
        np.testing.assert_allclose(cal.diag(), np.diag(full.gram()), rtol=1e-6)
        torch.testing.assert_close(diag_cap.diag(name), caps["gram"].diag(name), rtol=1e-6, atol=0)
        with pytest.raises(ValueError, match="diagonal"):
            diag_cap.gram(name)
    with pytest.raises(ValueError, match="statistic"):
        ActivationCapture(model, statistic="full")


# ---------------------------------------------------------------------------- accumulation arithmetic
def test_float64_inputs_keep_the_float64_product():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(7, 3)).double()
    x = torch.randn(40, 7, dtype=torch.float64)
    with ActivationCapture(model) as cap:
        cap.run(x)
    assert torch.equal(cap.gram("0"), x.T @ x)


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [(torch.float32, 1.0), (torch.float32, 1e30), (torch.float32, 1e-30), (torch.float16, 1.0),
     (torch.bfloat16, 1.0)],
)
def test_low_precision_inputs_neither_overflow_nor_underflow(dtype, scale):
    # float32 products of 1e30-sized activations would overflow (1e60 > 3.4e38) and of 1e-30-sized
    # ones underflow; the power-of-two scaling of the batch keeps both exact in range.
    torch.manual_seed(6)
    x = (torch.randn(50, 6, dtype=torch.float64) * scale).to(dtype)
    model = nn.Sequential(nn.Identity(), nn.Linear(6, 2).to(dtype))
    with ActivationCapture(model, names=["1"]) as cap:
        cap.run(x)
    G = cap.gram("1")
    assert torch.isfinite(G).all() and G.dtype == torch.float64
    assert_float32_gram(G, x.double())


def test_non_finite_activations_reach_the_gram():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.ones(4, 3)
    x[1, 2] = float("inf")
    with ActivationCapture(model) as cap, torch.no_grad():
        model(x)
    assert not torch.isfinite(cap.gram("0")).all()


def test_rows_beyond_one_chunk_are_accumulated(monkeypatch):
    import sparsefact.nn_adapters.capture as capture

    monkeypatch.setattr(capture, "GRAM_CHUNK_ROWS", 3)
    torch.manual_seed(7)
    x = torch.randn(11, 4)
    model = nn.Sequential(nn.Linear(4, 2))
    with ActivationCapture(model) as cap:
        cap.run(x)
    assert cap.n_tokens["0"] == 11
    assert_float32_gram(cap.gram("0"), x)
    X = x.double()
    np.testing.assert_allclose(cap.gram("0").numpy(), (X.T @ X).numpy(), rtol=1e-5, atol=1e-5)


def test_capture_time_is_reported_per_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with ActivationCapture(model) as cap:
        cap.run([torch.randn(8, 4), torch.randn(8, 4)])
    assert set(cap.seconds) == {"0", "2"} and all(s > 0 for s in cap.seconds.values())
