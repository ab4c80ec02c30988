"""Tests of sparsefact/nn_adapters/compress.py: compress_model in layer and block mode."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402

from sparsefact import MagnitudePruning  # noqa: E402
from sparsefact.metrics import relative_error  # noqa: E402
from sparsefact.nn_adapters.capture import capture_calibrations, layer_matrix  # noqa: E402
from sparsefact.nn_adapters.compress import (  # noqa: E402
    CompressionReport,
    available_methods,
    compress_model,
    find_blocks,
)
from sparsefact.nn_adapters.modules import DoubleSparseConv2d, DoubleSparseLinear, SparseLinear  # noqa: E402

FAST_DSF = {"max_iter": 4, "finalize_iter": 4, "tol": 0}


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 6))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 3 * 3, 10),
    )


class Block(nn.Module):
    """A transformer-like block: a mixing sub-layer and an MLP, residuals and a LayerNorm."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, hidden_states, attention_mask=None):
        h = hidden_states + self.o(torch.tanh(self.q(hidden_states)))
        return (self.norm(h + self.fc2(torch.relu(self.fc1(h)))),)


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=attention_mask)[0]
        return self.lm_head(h)


def _token_batches(n_batches: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, 20, (4, 12), generator=g)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[0, 9:] = 0
        mask[2, 5:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


# ------------------------------------------------------------------ layer mode
def test_mlp_layer_mode_dsf_beats_magnitude():
    X = torch.randn(600, 12, generator=torch.Generator().manual_seed(1))
    data = list(X.split(200))
    dense = _mlp().train()
    ref = dense(X).detach()
    results = {}
    for method, params in [("dsf", FAST_DSF), ("magnitude", {})]:
        model = _mlp().train()
        model, report = compress_model(model, data, method, 0.5, progress=False, **params)
        assert model.training  # mode restored
        assert _hooks(model) == 0
        assert isinstance(report, CompressionReport)
        # the output layer of a layer-wise model stays dense by default, and the report says so
        assert [r["name"] for r in report] == ["0", "2"]
        assert [s["name"] for s in report.skipped] == ["4"] and "output layer" in report.skipped[0]["reason"]
        assert type(model[4]) is nn.Linear
        kind = DoubleSparseLinear if method == "dsf" else SparseLinear
        assert all(isinstance(model[i], kind) for i in (0, 2))
        for row in report:
            assert row["density"] <= 0.5 + 1e-9
            assert 0 < row["calibrated_err"] < 1
            assert row["method"] == method
        results[method] = _rel(model(X).detach(), ref)
    assert results["dsf"] < results["magnitude"] < 1


def test_layer_mode_sequential_calibrates_on_compressed_outputs():
    X = torch.randn(300, 12, generator=torch.Generator().manual_seed(2))
    for sequential in (True, False):
        model = _mlp()
        dense = _mlp()
        _, report = compress_model(model, X, "magnitude", 0.5, sequential=sequential, progress=False)
        # Expected Gram of the second layer: from the compressed (or dense) first layer.
        source = model if sequential else dense
        hidden = torch.relu(source[0](X)).detach().double()
        G = (hidden.T @ hidden).numpy()
        W = layer_matrix(dense[2]).numpy()
        expected = relative_error(W, MagnitudePruning(density=0.5).fit(W).reconstruct(), G)
        assert report[1]["calibrated_err"] == pytest.approx(expected, rel=1e-5)


def test_cnn_layer_mode_replaces_conv_and_linear():
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    model = _cnn()
    ref = model(x).detach()
    model, report = compress_model(model, [x[:8], x[8:]], "dsf", 0.5, progress=False, **FAST_DSF)
    assert isinstance(model[0], DoubleSparseConv2d)
    assert isinstance(model[2], DoubleSparseConv2d)
    assert type(model[5]) is nn.Linear  # the output layer stays dense by default
    assert [r["shape"] for r in report] == [[8, 27], [12, 72]]
    _, everything = compress_model(_cnn(), [x[:8], x[8:]], "dsf", 0.5, progress=False,
                                   layers=(nn.Conv2d, nn.Linear), **FAST_DSF)
    assert [r["shape"] for r in everything] == [[8, 27], [12, 72], [10, 108]] and not everything.skipped
    assert report[0]["n_tokens"] == 16 * 8 * 8  # one im2col row per output position
    assert all(0 < r["calibrated_err"] < 1 for r in report)
    assert all(r["capture_seconds"] > 0 for r in report)  # the calibration pass, timed per layer
    _, blind = compress_model(_cnn(), None, "magnitude", 0.5, progress=False, measure_error=False)
    assert all(r["capture_seconds"] == 0.0 for r in blind)  # magnitude needs no pass
    assert _rel(model(x).detach(), ref) < 0.8
    assert _hooks(model) == 0


def test_replace_false_writes_pruned_weights_in_place():
    X = torch.randn(200, 12, generator=torch.Generator().manual_seed(4))
    model = _mlp()
    linear = model[0]
    model, report = compress_model(model, X, "magnitude", 0.5, replace=False, progress=False)
    assert model[0] is linear and isinstance(model[0], nn.Linear)
    assert float((linear.weight == 0).float().mean()) == pytest.approx(0.5)
    assert report[0]["replaced_by"] == "Linear (in place)"


def test_density_per_layer_and_layer_selection():
    X = torch.randn(200, 12, generator=torch.Generator().manual_seed(5))
    model, report = compress_model(
        _mlp(), X, "magnitude", {"0": 0.3, "*": 0.6}, layers=["0", "2"], progress=False
    )
    assert [r["name"] for r in report] == ["0", "2"]
    assert [round(r["density"], 2) for r in report] == [0.3, 0.6]
    assert isinstance(model[4], nn.Linear)  # not selected: untouched
    with pytest.raises(KeyError, match="no entry for layer"):
        compress_model(_mlp(), X, "magnitude", {"0": 0.3}, progress=False)


def test_half_precision_weights_are_compressed_in_float32_and_cast_back():
    X = torch.randn(200, 12, generator=torch.Generator().manual_seed(6))
    model = _mlp().to(torch.bfloat16)
    model, report = compress_model(model, X.to(torch.bfloat16), "magnitude", 0.5, progress=False)
    assert isinstance(model[0], SparseLinear)
    assert all(b.dtype == torch.bfloat16 for b in model[0].buffers())
    assert model(X.to(torch.bfloat16)).dtype == torch.bfloat16


def test_unknown_method_lists_the_available_ones():
    assert {"dsf", "magnitude"} <= set(available_methods())
    with pytest.raises(ValueError, match=r"available methods: .*dsf.*magnitude"):
        compress_model(_mlp(), torch.randn(10, 12), "nonsense", 0.5, progress=False)


def test_baselines_when_present():
    methods = available_methods()
    X = torch.randn(300, 12, generator=torch.Generator().manual_seed(7))
    for name in ("wanda", "sparsegpt"):
        if name not in methods:
            continue
        model, report = compress_model(_mlp(), X, name, 0.5, progress=False)
        assert all(isinstance(model[i], SparseLinear) for i in (0, 2))
        assert all(abs(r["density"] - 0.5) < 1e-9 and 0 < r["calibrated_err"] < 1 for r in report)


# ------------------------------------------------------------------ block mode
def test_find_blocks():
    assert find_blocks(TinyTransformer())[0] == "layers"
    assert find_blocks(_mlp()) is None


def test_tiny_transformer_block_mode():
    batches = _token_batches()
    dense = TinyTransformer()
    torch.manual_seed(0)
    dense = TinyTransformer()
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    ref = [dense(**b).detach() for b in batches]
    results = {}
    for method, params in [("dsf", FAST_DSF), ("magnitude", {})]:
        model = TinyTransformer()
        model.load_state_dict(state)
        model, report = compress_model(model, batches, method, 0.5, progress=False, **params)
        names = [r["name"] for r in report]
        assert names == [f"layers.{i}.{n}" for i in range(2) for n in ("q", "o", "fc1", "fc2")]
        assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed, nn.Embedding)
        kind = DoubleSparseLinear if method == "dsf" else SparseLinear
        assert isinstance(model.layers[1].fc2, kind)
        n_real = sum(int(b["attention_mask"].sum()) for b in batches)
        assert all(r["n_tokens"] == n_real for r in report)  # padding excluded
        assert all(0 < r["calibrated_err"] < 1 for r in report)
        assert _hooks(model) == 0
        out = [model(**b).detach() for b in batches]
        results[method] = np.mean([_rel(o, r) for o, r in zip(out, ref, strict=True)])
    assert results["dsf"] < results["magnitude"]


def test_block_mode_gram_of_block_zero_matches_direct_capture():
    batches = _token_batches(seed=1)
    torch.manual_seed(1)
    model = TinyTransformer()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    cals = capture_calibrations(model, batches, layers=r"layers\.[01]\.q$")
    for sequential in (True, False):
        model = TinyTransformer()
        model.load_state_dict(dense_state)
        _, report = compress_model(model, batches, "magnitude", 0.5, sequential=sequential, progress=False)
        rows = {r["name"]: r for r in report}
        for name in ("layers.0.q", "layers.1.q"):
            W = dense_state[name + ".weight"].numpy()
            W_hat = MagnitudePruning(density=0.5).fit(W).reconstruct()
            expected = relative_error(W, W_hat, cals[name].gram())
            if name == "layers.1.q" and sequential:  # calibrated on the compressed block 0
                assert rows[name]["calibrated_err"] != pytest.approx(expected, rel=1e-6)
            else:
                assert rows[name]["calibrated_err"] == pytest.approx(expected, rel=1e-5)


def test_report_writers(tmp_path):
    X = torch.randn(100, 12, generator=torch.Generator().manual_seed(8))
    _, report = compress_model(_mlp(), X, "magnitude", 0.5, progress=False)
    report.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["layers"] == 2 and len(data["layers"]) == 2
    assert data["skipped"][0]["name"] == "4" and data["summary"]["failed"] == 0
    text = report.to_markdown(tmp_path / "r.md")
    assert "| 0 | Linear | 24×12 | magnitude | 0.5000 |" in text
    assert "- 4: not compressed (the output layer" in text
    assert (tmp_path / "r.md").read_text() == text


def test_compress_model_leaves_the_callers_torch_thread_count():
    # threadpoolctl restores the OpenMP pool torch shares from OpenMP's own count, which undid
    # an earlier torch.set_num_threads(1) (training after a compression then ran 3-20x slower).
    # A fresh process: the thread pools' history in this one decides whether the bug shows.
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from sparsefact.backends.threads import limit_threads\n"
        "with limit_threads(1):\n"
        "    torch.get_num_threads()\n"
        "assert torch.get_num_threads() == 1, ('limit_threads', torch.get_num_threads())\n"
        "from sparsefact.nn_adapters import compress_model\n"
        "m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))\n"
        "compress_model(m, torch.randn(64, 16), 'dsf', 0.5, threads=2, progress=False, layers=['0'],\n"
        "               max_iter=2)\n"
        "assert torch.get_num_threads() == 1, ('compress_model', torch.get_num_threads())\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
