"""Tests of sparsefact/nn_adapters/capture.py: Grams from forward hooks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402
from torch.nn import functional as nnf  # noqa: E402

from sparsefact import Calibration  # noqa: E402
from sparsefact.nn_adapters.capture import (  # noqa: E402
    ActivationCapture,
    capture_calibrations,
    layer_matrix,
    select_layers,
    token_mask,
)


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
    np.testing.assert_allclose(cap.gram("0").numpy(), (X0.T @ X0).numpy(), rtol=1e-12)
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
        np.testing.assert_allclose(G.numpy(), (X.T @ X).numpy(), rtol=1e-10, atol=1e-10)


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
    np.testing.assert_allclose(cap.gram("0").numpy(), (X.T @ X).numpy(), rtol=1e-12)


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
    np.testing.assert_allclose(cals["proj"].gram(), (X.T @ X).numpy(), rtol=1e-10)


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
        np.testing.assert_allclose(cal.diag(), np.diag(full.gram()), rtol=1e-12)
        torch.testing.assert_close(diag_cap.diag(name), caps["gram"].diag(name))
        with pytest.raises(ValueError, match="diagonal"):
            diag_cap.gram(name)
    with pytest.raises(ValueError, match="statistic"):
        ActivationCapture(model, statistic="full")
