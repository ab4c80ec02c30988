"""The layer-fit seam around torch: fit_layer (pure), the install step, module families, measure_error.

Covers sparsefact/nn_adapters/install.py and the parts of compress_model that follow the method
registry (sparsefact/methods.py): every registered layer method installs the module family its
entry names, a method registered by a user alone works end to end (compress, save, load), only
the calibration statistic a method needs is captured with ``measure_error=False``.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402
from toy_method import NAME, KeepDiagonal  # noqa: E402

import sparsefact  # noqa: E402
from sparsefact import Calibration  # noqa: E402
from sparsefact.layer_fit import LayerSpec, fit_layer  # noqa: E402
from sparsefact.methods import available_methods, spec_for  # noqa: E402
from sparsefact.nn_adapters import (  # noqa: E402
    LowRankConv2d,
    LowRankLinear,
    SparseConv2d,
    SparseLinear,
    compress_model,
    load_compressed,
    register_module_family,
    save_compressed,
)
from sparsefact.nn_adapters import compress as compress_mod  # noqa: E402
from sparsefact.nn_adapters.install import (  # noqa: E402
    build_module,
    install_result,
    module_families,
    unregister_module_family,
)

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),  # conftest.py: 1 torch thread, seed 0
    pytest.mark.filterwarnings(
        "ignore::sklearn.exceptions.ConvergenceWarning",
    ),
]

#: small parameters so that every method runs in well under a second on these layers
FAST = {"dsf": {"max_iter": 3, "finalize_iter": 2}, "dsf-exact": {"max_iter": 3, "finalize_iter": 2},
        "admm": {"n_iter": 5}}


#: every supported layer, the output layer included (the default leaves a layer-wise model's last layer dense)
ALL_LAYERS = (nn.Linear, nn.Conv2d)


def compress_all(*args, **kwargs):
    """``compress_model`` on every supported layer (these tests check every layer's module)."""
    return compress_model(*args, layers=kwargs.pop("layers", ALL_LAYERS), **kwargs)




@pytest.fixture
def keep_diagonal():
    """The toy user method, registered through the public API alone; unregistered afterwards."""
    spec = sparsefact.register_method(NAME, KeepDiagonal, description="keep the main diagonal")
    yield spec
    sparsefact.unregister_method(NAME)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 6))


def _cnn(padding_mode: str = "zeros") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode), nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 3 * 3, 10),
    )


def _family_class(method: str, est, layer_kind: type) -> type | None:
    """The family's class for ``layer_kind``; ``None`` if it has none (the structured families
    have no Conv2d class: the result is written into the dense layer in place)."""
    spec = spec_for(method)
    family = spec.module if spec.module is not None else {1: "sparse", 2: "double_sparse"}[
        len(est.get_factors())]
    return module_families()[family].get(layer_kind)


def _layer_methods() -> list[str]:
    return [n for n, s in available_methods().items() if s.kind != "scorer"]


# ---------------------------------------------------------------------------- fit_layer
def test_fit_layer_is_pure():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 12)).astype(np.float32)
    X = rng.standard_normal((64, 12))
    cal = Calibration.from_activations(X)
    W0, G0 = W.copy(), np.array(cal.gram(), copy=True)
    for method in _layer_methods():
        result = fit_layer(W, cal, LayerSpec(method, 0.5, FAST.get(method, {}), name="fc"))
        assert np.array_equal(W, W0) and np.array_equal(cal.gram(), G0) and cal.n_samples == 64
        assert result.row["name"] == "fc" and result.row["method"] == method and result.row["n_tokens"] == 64
        assert set(result.row) >= {"shape", "target_density", "density", "nnz", "calibrated_err", "seconds"}
        product = result.estimator.get_factors()[0]
        for f in result.estimator.get_factors()[1:]:
            product = product @ f
        np.testing.assert_allclose(product, result.estimator.reconstruct(), rtol=1e-5, atol=1e-6)


def test_fit_layer_needs_no_torch():
    code = (
        "import sys, numpy as np; from sparsefact import Calibration; "
        "from sparsefact.layer_fit import LayerSpec, fit_layer; "
        "W = np.random.default_rng(0).standard_normal((8, 8)); "
        "r = fit_layer(W, Calibration.from_activations(W), LayerSpec('wanda', 0.5)); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------------------- every method, every family
@pytest.mark.parametrize("method", _layer_methods())
def test_every_method_installs_its_family_in_an_mlp_and_a_cnn(method, monkeypatch):
    params = FAST.get(method, {})
    x_lin = torch.randn(96, 12, generator=torch.Generator().manual_seed(1))
    x_cnn = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for make, x, kinds in [(_mlp, x_lin, [nn.Linear] * 3), (_cnn, x_cnn, [nn.Conv2d, nn.Conv2d, nn.Linear])]:
        dense = make()
        fitted = {}
        original = compress_mod.fit_layer

        def recording(W, calibration, spec, _seen=fitted, _fit=original):
            result = _fit(W, calibration, spec)
            _seen[spec.name] = result.estimator
            return result

        monkeypatch.setattr(compress_mod, "fit_layer", recording)
        # sequential=False: both models are calibrated on the same dense activations
        model, report = compress_all(make(), x, method, 0.5, sequential=False, progress=False, **params)
        in_place, _ = compress_all(make(), x, method, 0.5, sequential=False, replace=False,
                                     progress=False, **params)
        monkeypatch.undo()
        names = [r["name"] for r in report]
        for name, kind, row in zip(names, kinds, report, strict=True):
            cls = _family_class(method, fitted[name], kind)
            replaced_by = f"{kind.__name__} (in place)" if cls is None else cls.__name__
            assert type(model.get_submodule(name)) is (kind if cls is None else cls), (method, name)
            assert row["replaced_by"] == replaced_by and row["type"] == kind.__name__
            assert row["method"] == method
        with torch.no_grad():
            torch.testing.assert_close(model(x), in_place(x), rtol=1e-4, atol=1e-5)
        assert dense(x).shape == model(x).shape


def test_pruned_conv_becomes_a_sparse_conv_with_the_same_outputs():
    """Behaviour change: a single-sparse result on a Conv2d was written into the dense kernel."""
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    model, report = compress_all(_cnn(), x, "magnitude", 0.5, progress=False)
    in_place, _ = compress_all(_cnn(), x, "magnitude", 0.5, replace=False, progress=False)
    assert isinstance(model[0], SparseConv2d) and isinstance(model[2], SparseConv2d)
    assert isinstance(model[5], SparseLinear)
    assert torch.equal(model[0].to_dense(), in_place[0].weight.detach())
    assert report[0]["replaced_by"] == "SparseConv2d"
    with torch.no_grad():
        torch.testing.assert_close(model(x), in_place(x))


def test_lowrank_result_becomes_a_lowrank_module():
    """Behaviour change: a low-rank result was a dense SparseLinear of U @ V."""
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(4))
    model, _ = compress_all(_mlp(), x, "lowrank", 0.5, progress=False)
    assert all(isinstance(model[i], LowRankLinear) for i in (0, 2, 4))
    assert model[0].rank == int(0.5 * 24 * 12 / (24 + 12))
    x_cnn = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    cnn, _ = compress_all(_cnn(), x_cnn, "lowrank", 0.5, progress=False)
    assert isinstance(cnn[0], LowRankConv2d) and cnn[0].layouts == {"A": "dense", "B": "dense"}


def test_non_zero_padding_mode_stays_dense_in_place():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    model = _cnn("reflect")
    conv = model[0]
    model, report = compress_all(model, x, "magnitude", 0.5, progress=False)
    assert model[0] is conv and isinstance(conv, nn.Conv2d)
    assert float((conv.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert report[0]["replaced_by"] == "Conv2d (in place)"
    assert isinstance(model[2], SparseConv2d)


# ---------------------------------------------------------------------------- measure_error
def test_wanda_without_measure_error_captures_only_the_diagonal(monkeypatch):
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(7))
    statistics = []
    original = compress_mod.fit_layer

    def recording(W, calibration, spec):
        statistics.append(calibration.statistic)
        return original(W, calibration, spec)

    monkeypatch.setattr(compress_mod, "fit_layer", recording)
    full, full_report = compress_all(_mlp(), x, "wanda", 0.5, progress=False)
    diag, diag_report = compress_all(_mlp(), x, "wanda", 0.5, progress=False, measure_error=False)
    assert statistics == ["gram"] * 3 + ["diag"] * 3
    for i in (0, 2, 4):
        assert torch.equal(full[i].to_dense(), diag[i].to_dense())  # same masks, same weights
        assert torch.equal(full[i].bias, diag[i].bias)
    for a, b in zip(full_report, diag_report, strict=True):
        assert "err_metric" not in a and b["err_metric"] == "diag"
        assert a["nnz"] == b["nnz"] and a["n_tokens"] == b["n_tokens"] == 200
        assert 0 < b["calibrated_err"] < 1


def test_diag_capture_holds_no_gram(monkeypatch):
    captures = []
    original = compress_mod.ActivationCapture

    class Spy(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captures.append(self)

    monkeypatch.setattr(compress_mod, "ActivationCapture", Spy)
    x = torch.randn(50, 12, generator=torch.Generator().manual_seed(8))
    compress_all(_mlp(), x, "wanda", 0.5, progress=False, measure_error=False)
    assert captures and all(c.statistic == "diag" for c in captures)
    assert all(acc.gram.ndim == 1 for c in captures for acc in c._acc.values())
    captures.clear()
    compress_all(_mlp(), x, "sparsegpt", 0.5, progress=False, measure_error=False)
    assert all(c.statistic == "gram" for c in captures)


def test_method_without_needs_runs_without_any_calibration_pass():
    from test_nn_compress import TinyTransformer, _token_batches

    x = torch.randn(100, 12, generator=torch.Generator().manual_seed(9))
    measured, measured_report = compress_all(_mlp(), x, "magnitude", 0.5, progress=False)
    free, report = compress_all(_mlp(), None, "magnitude", 0.5, progress=False, measure_error=False)
    for i in (0, 2, 4):
        assert torch.equal(measured[i].to_dense(), free[i].to_dense())
    assert all(r["err_metric"] == "none" and r["n_tokens"] == 0 for r in report)
    assert all(r["calibrated_err"] > 0 for r in report)
    assert all("err_metric" not in r and r["n_tokens"] == 100 for r in measured_report)
    # block mode as well: no block inputs are caught
    model, report = compress_all(TinyTransformer(), None, "magnitude", 0.5, progress=False,
                                   measure_error=False)
    assert [r["name"] for r in report][:2] == ["layers.0.q", "layers.0.o"]
    assert isinstance(model.layers[1].fc2, SparseLinear)
    ids = _token_batches(1)[0]
    assert model(**ids).shape == (4, 12, 20)


def test_scorer_methods_are_refused():
    name = "toy-scorer-nn"
    try:
        sparsefact.register_method(name, lambda model: {}, kind="scorer")
    except TypeError:  # a registry that takes only classes
        sparsefact.register_method(name, KeepDiagonal, kind="scorer", needs="grad")
    try:
        with pytest.raises(ValueError, match="scorer"):
            compress_all(_mlp(), torch.randn(4, 12), name, 0.5, progress=False)
    finally:
        sparsefact.unregister_method(name)


def test_method_lists_come_from_the_registry():
    assert compress_mod.available_methods is sparsefact.methods.available_methods
    for gone in ("_METHODS", "_thread_limit", "_method_name", "_build_module"):
        assert not hasattr(compress_mod, gone)


# ---------------------------------------------------------------------------- a user's method
def test_user_method_registered_alone_works_in_compress_save_and_load(keep_diagonal, tmp_path):
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    model, report = compress_all(_cnn(), x, NAME, 0.5, progress=False)
    assert isinstance(model[0], SparseConv2d) and isinstance(model[5], SparseLinear)  # one factor: sparse
    assert [r["method"] for r in report] == [NAME] * 3
    W = model[5].to_dense()
    assert torch.equal(W, W * torch.eye(*W.shape)) and W.count_nonzero() == 10  # the main diagonal
    path = tmp_path / "toy.safetensors"
    save_compressed(model, path)
    loaded = load_compressed(_cnn, path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # measure_error=False: KeepDiagonal needs no calibration, so no pass over the data
    _, free = compress_all(_cnn(), None, NAME, 0.5, progress=False, measure_error=False)
    assert [r["nnz"] for r in free] == [r["nnz"] for r in report]


class ToyFamilyLinear(SparseLinear):
    """A user's module class: a SparseLinear under another name (saved and loaded by its name)."""


def test_user_module_family_and_builder(tmp_path):
    name = "toy-family-method"
    register_module_family("toy_family", linear=ToyFamilyLinear)
    try:
        sparsefact.register_method(name, KeepDiagonal, module="toy_family")
        x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(11))
        model, report = compress_all(_cnn(), x, name, 0.5, progress=False)
        assert type(model[5]) is ToyFamilyLinear
        assert isinstance(model[0], nn.Conv2d)  # no conv2d class in the family: written in place
        assert report[0]["replaced_by"] == "Conv2d (in place)"
        path = tmp_path / "family.safetensors"
        save_compressed(model, path)
        assert type(load_compressed(_cnn, path)[5]) is ToyFamilyLinear
        with pytest.raises(ValueError, match="already registered"):
            register_module_family("toy_family", linear=ToyFamilyLinear)
        with pytest.raises(ValueError, match="built-in"):
            register_module_family("sparse", linear=ToyFamilyLinear)
        with pytest.raises(TypeError, match="from_layer"):
            register_module_family("bad", linear=nn.Linear)
    finally:
        sparsefact.unregister_method(name)
        unregister_module_family("toy_family")
    assert "toy_family" not in module_families()

    built = []

    def builder(est, layer, bias):
        built.append(type(layer).__name__)
        return ToyFamilyLinear.from_layer(layer, est.get_factors()) if isinstance(layer, nn.Linear) else None

    sparsefact.register_method(name, KeepDiagonal, module=builder)
    try:
        model, report = compress_all(_mlp(), torch.randn(20, 12), name, 0.5, progress=False)
    finally:
        sparsefact.unregister_method(name)
    assert built == ["Linear"] * 3 and all(type(model[i]) is ToyFamilyLinear for i in (0, 2, 4))


def test_install_result_and_build_module_directly():
    layer = nn.Linear(6, 4).double().train()
    model = nn.Sequential(copy.deepcopy(layer))
    W = model[0].weight.detach().numpy()
    result = fit_layer(W, None, LayerSpec("magnitude", 0.5, name="0"))
    new = build_module("magnitude", result.estimator, model[0])
    assert isinstance(new, SparseLinear) and new.training and new.weight.dtype == torch.float64
    row = install_result(model, "0", model[0], result, spec_for("magnitude"))
    assert isinstance(model[0], SparseLinear)
    assert list(row)[:3] == ["name", "type", "shape"] and row["replaced_by"] == "SparseLinear"
    assert row["type"] == "Linear"


def test_public_names_and_a_light_import():
    code = (
        "import sys; import sparsefact.nn_adapters as nn_adapters; "
        "light = not any(m in sys.modules for m in ('sparsefact.nn_adapters.compress', "
        "'sparsefact.nn_adapters.io', 'sparsefact.nn_adapters.install', 'safetensors')); "
        "from sparsefact.nn_adapters import (compress_model, fit_layer, compression_report, load_compressed, "
        "save_compressed, CompressionReport, SparseConv2d, LowRankLinear, LowRankConv2d, "
        "register_module_family); "
        "import sparsefact.layer_fit, sparsefact.nn_adapters.install as install; "
        "assert fit_layer is sparsefact.layer_fit.fit_layer; "
        "assert register_module_family is install.register_module_family; "
        "assert set(nn_adapters.__all__) <= set(dir(nn_adapters)); "
        "sys.exit(0 if light else 3)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
