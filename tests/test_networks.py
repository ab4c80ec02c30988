"""The network experiment (issue 13 §4): data, models, training helpers and the ``--quick`` run end to end."""

from __future__ import annotations

import argparse
import gzip
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402

from sparsefact.experiments import data as nd  # noqa: E402
from sparsefact.experiments import networks as nw  # noqa: E402
from sparsefact.experiments.models import build_model, layer_table, parameter_count  # noqa: E402
from sparsefact.experiments.training import (  # noqa: E402
    TrainableFactors,
    evaluate,
    freeze,
    make_trainable,
    sparse_inference_model,
    train,
)


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The ``--quick`` run, once for the module (digits, so it does not depend on the Debian package)."""
    out = tmp_path_factory.mktemp("networks")
    old = torch.get_num_threads()
    try:
        result = nw.run_networks(out, quick=True, verbose=False, threads=1)
    finally:
        torch.set_num_threads(old)
    return result, out


# ---------------------------------------------------------------------- the quick run
def test_quick_run_has_every_row(quick):
    result, _ = quick
    settings = nw.NetworkSettings(quick=True, **nw.QUICK)
    want = nw.expected_rows(settings)
    have = [(r["model"], r["method"], r["target_density"]) for r in result["rows"]]
    assert have == want
    assert result["complete"] is True
    assert result["dataset"]["name"] == "digits"
    # every model has its dense row and every (method, density) of the settings
    for model in settings.models:
        for method in settings.methods:
            if method in nw.PAI_METHODS or method in nw.POST_METHODS:
                for d in settings.densities:
                    assert (model, method, d) in have
    assert {r["status"] for r in result["rows"]} <= {"ok", "not run"}
    # the control of the post-training rows: the dense model with their fine-tuning, unpruned
    assert [m for m, meth, _ in have if meth == "dense-ft"] == list(settings.models)


def test_quick_rows_carry_the_measurements(quick):
    result, _ = quick
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    assert ok
    for r in ok:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["params"] > 0 and r["inference_ms"] > 0 and r["macs"] > 0
        assert isinstance(r["layer_collapse"], bool)
        assert r["layers"] and all(0.0 <= lay["kept_fraction"] <= 1.0 for lay in r["layers"])
        assert r["layer_collapse"] == any(lay["kept"] == 0 for lay in r["layers"] if not lay["structured"])
        if r["stage"] in ("pai", "post"):
            # the achieved density is the target (per-layer floors: within a few weights)
            assert r["density"] == pytest.approx(r["target_density"], rel=0.1)
        if r["stage"] == "post":
            assert 0.0 <= r["accuracy_oneshot"] <= 1.0
        if r["method"] == "dense":
            assert r["density"] == 1.0
    # PaI global masks hit the target exactly (floor of density * total)
    for r in ok:
        if r["stage"] == "pai":
            assert r["weights_kept"] <= math.floor(r["target_density"] * r["weights_total"] + 1e-6)
    # a butterfly head is structured and never pruned
    heads = [lay for r in ok if r["model"] == "cnn-butterfly" for lay in r["layers"] if lay["structured"]]
    assert heads and all(lay["type"] == "ButterflyLinear" for lay in heads)
    assert len({lay["kept"] for lay in heads}) == 1


def test_quick_not_run_rows_say_why(quick):
    result, _ = quick
    for r in result["rows"]:
        if r["status"] == "not run":
            assert r["reason"]
    cnn_structured = [r for r in result["rows"] if r["arch"] == "cnn" and r["stage"] == "structured"]
    assert cnn_structured and all(r["status"] == "not run" for r in cnn_structured)


def test_quick_outputs_written(quick):
    result, out = quick
    for name in ("results.json", "results.md", "accuracy_vs_density.png", "layer_density.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == len(result["rows"])
    md = (out / "results.md").read_text()
    assert "digits" in md and "## mlp" in md and "## cnn-butterfly" in md
    assert "DSF (post)" in md and "SynFlow (PaI)" in md


# ---------------------------------------------------------------------- command line
def test_cli_arguments_and_a_tiny_run(tmp_path, capsys):
    parser = nw.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--quick", "--models", "mlp", "--methods", "snip,post-magnitude",
                              "--densities", "10^-0.5", "--epochs", "0", "--finetune-epochs", "0",
                              "--output-dir", str(tmp_path), "--threads", "1", "--no-figures", "-q"])
    assert args.densities == (pytest.approx(10 ** -0.5),)
    assert nw.run_from_args(args) == 0
    printed = capsys.readouterr().out
    assert "dataset: digits" in printed
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [
        ("dense", "ok"), ("snip", "ok"), ("post-magnitude", "ok")]
    for bad in (["--models", "resnet"], ["--methods", "obc"], ["--densities", "1.5"], ["--densities", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
        capsys.readouterr()


def test_settings_are_validated():
    with pytest.raises(ValueError, match="unknown method"):
        nw.NetworkSettings(methods=("obs",))
    with pytest.raises(ValueError, match="unknown model"):
        nw.NetworkSettings(models=("resnet",))
    with pytest.raises(ValueError, match="densities"):
        nw.NetworkSettings(densities=(0.0,))
    with pytest.raises(TypeError, match="unknown setting"):
        nw.run_networks(None, verbose=False, learning_rate=1.0)
    assert list(nw.DENSITIES) == pytest.approx([10 ** -k for k in (0.05, 0.1, 0.2, 0.5, 1, 2)])


# ---------------------------------------------------------------------- data
def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_and_fashion_mnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28))
    labels = rng.integers(0, 10, size=7)
    for split, n in (("train", 7), ("t10k", 7)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[:n])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[:n])
    np.testing.assert_array_equal(nd.read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    data = nd.load_data("auto", root=tmp_path)
    assert data.name == "fashion-mnist" and data.note == ""
    assert data.x_train.shape == (7, 1, 28, 28) and data.x_train.dtype == torch.float32
    np.testing.assert_array_equal(data.y_test.numpy(), labels)
    assert float(data.x_train.mean()) == pytest.approx(0.0, abs=1e-5)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"ab")
    with pytest.raises(ValueError, match="idx"):
        nd.read_idx(bad)


def test_missing_fashion_mnist_falls_back_to_digits(tmp_path):
    data = nd.load_data("auto", root=tmp_path / "nowhere")
    assert data.name == "digits" and "fell back" in data.note
    assert data.image_shape == (1, 8, 8) and len(data.y_train) + len(data.y_test) == 1797
    with pytest.raises(FileNotFoundError):
        nd.load_data("fashion-mnist", root=tmp_path / "nowhere")
    with pytest.raises(ValueError):
        nd.load_data("cifar")


# ---------------------------------------------------------------------- models and training
@pytest.mark.parametrize("name", ["mlp", "mlp-butterfly", "cnn", "cnn-butterfly"])
def test_models_shapes_and_layers(name):
    model = build_model(name, (1, 8, 8), 10, width=16, channels=((4,), (8,)), hidden=16, seed=0)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    rows = layer_table(model)
    structured = [r for r in rows if r["structured"]]
    assert len(structured) == (1 if name.endswith("butterfly") else 0)
    if name.startswith("mlp"):
        assert len(rows) == 6  # the 6-layer MLP
    assert parameter_count(model) == sum(p.numel() for p in model.parameters())


def test_training_is_deterministic():
    data = nd.load_digits()
    states = []
    for _ in range(2):
        model = build_model("cnn", data.image_shape, 10, channels=((4,), (8,)), hidden=16, seed=3)
        train(model, data.x_train[:256], data.y_train[:256], epochs=1, batch_size=32, seed=5)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_finetuning_keeps_the_masks_fixed():
    from sparsefact.nn_adapters import DoubleSparseConv2d, DoubleSparseLinear, SparseLinear

    gen = torch.Generator().manual_seed(0)

    def sparse(shape, p=0.5):
        return torch.randn(*shape, generator=gen) * (torch.rand(*shape, generator=gen) < p)

    model = nn.Sequential(
        DoubleSparseConv2d.from_factors(sparse((6, 5)), sparse((5, 2 * 9)), torch.randn(6), kernel_size=3,
                                        padding=1),
        nn.Flatten(),
        DoubleSparseLinear.from_factors(sparse((7, 4)), sparse((4, 6 * 16)), torch.randn(7)),
        SparseLinear.from_weight(sparse((3, 7)), torch.randn(3)),
    )
    x = torch.randn(5, 2, 4, 4)
    before = model(x).detach()
    nnz = [m.nnz for m in model if hasattr(m, "nnz")]
    names = make_trainable(model)
    assert len(names) == 3 and all(isinstance(model[int(n)], TrainableFactors) for n in names)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    trained = model(x).detach()
    assert not torch.allclose(trained, before)
    freeze(model)
    assert [type(m).__name__ for m in model] == ["DoubleSparseConv2d", "Flatten", "DoubleSparseLinear",
                                                "SparseLinear"]
    assert [m.nnz for m in model if hasattr(m, "nnz")] == nnz  # no pruned entry came back
    torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-5)


def test_pai_models_become_sparse_modules():
    from sparsefact.nn_adapters.prune_init import prune_at_init

    data = nd.load_digits()
    model = build_model("mlp", data.image_shape, 10, width=16, seed=0)
    prune_at_init(model, None, "magnitude", 0.2)
    before = evaluate(model, data.x_test, data.y_test)
    out = model(data.x_test[:8]).detach()
    names = sparse_inference_model(model)
    assert len(names) == 6
    assert all(type(model.get_submodule(n)).__name__ == "SparseLinear" for n in names)
    torch.testing.assert_close(model(data.x_test[:8]), out)
    assert evaluate(model, data.x_test, data.y_test) == before
    kept = sum(r["kept"] for r in layer_table(model))
    assert kept == math.floor(0.2 * sum(r["numel"] for r in layer_table(model)))


def test_the_command_line_part_needs_no_torch():
    """``sparsefact networks --help`` (and the other subcommands) must not import torch."""
    import subprocess
    import sys

    code = ("import sys, argparse; import sparsefact.experiments.networks as nw; "
            "nw.add_arguments(argparse.ArgumentParser()); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
