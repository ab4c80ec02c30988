"""save_compressed / load_compressed / compression_report (torch + safetensors; skipped without them)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
nn = torch.nn

from sparsefact import DoubleSparseFactorization, MagnitudePruning  # noqa: E402
from sparsefact.nn_adapters import (  # noqa: E402
    DoubleSparseConv2d,
    DoubleSparseLinear,
    SparseLinear,
    compression_report,
    load_compressed,
    replace_module,
    save_compressed,
)

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),  # conftest.py: 1 torch thread, seed 0
    pytest.mark.filterwarnings(
        "ignore::sklearn.exceptions.ConvergenceWarning",
    ),
]




def make_model(seed: int = 0) -> nn.Module:
    """(N, 12) -> Linear -> ReLU -> Linear -> (N, 1, 4, 4) -> Conv -> BN -> ReLU -> Conv -> Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.Unflatten(1, (1, 4, 4)),
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 3, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )


def _dsf(W, density=0.5):
    return DoubleSparseFactorization(density, max_iter=3, random_state=0).fit(W)


@pytest.fixture(scope="module")
def compressed_model():
    """make_model(0) with Linear '2' -> DSF (csr), Conv '7' -> DSF conv (dense), Linear '9' -> sparse."""
    torch.set_num_threads(1)
    model = make_model(0)
    with torch.no_grad():  # non-default BatchNorm state, so buffers must really be saved
        model[5].running_mean.uniform_(-1, 1)
        model[5].running_var.uniform_(0.5, 2)
        model[5].num_batches_tracked.fill_(7)
    lin = model[2]
    est = _dsf(lin.weight.detach().numpy())
    replace_module(model, "2", DoubleSparseLinear.from_estimator(est, lin.bias.detach(), layout="csr"))
    conv = model[7]
    est_c = _dsf(conv.weight.detach().flatten(1).numpy())
    replace_module(model, "7", DoubleSparseConv2d.from_estimator(
        est_c, conv.bias.detach(), kernel_size=3, stride=2, padding=1, layout="dense"))
    last = model[9]
    mp = MagnitudePruning(0.4).fit(last.weight.detach().numpy())
    replace_module(model, "9", SparseLinear.from_estimator(mp, last.bias.detach(), layout="csr"))
    return model.eval()


def test_round_trip_identical_outputs(compressed_model, tmp_path):
    path = tmp_path / "model.safetensors"
    save_compressed(compressed_model, path)
    x = torch.randn(4, 12)
    loaded = load_compressed(lambda: make_model(1), path).eval()  # other seed: every tensor must load
    assert isinstance(loaded[2], DoubleSparseLinear) and loaded[2].layouts == {"A": "csr", "B": "csr"}
    assert isinstance(loaded[7], DoubleSparseConv2d) and loaded[7].layouts == {"A": "dense", "B": "dense"}
    assert loaded[7].stride == (2, 2) and loaded[7].padding == (1, 1)
    assert isinstance(loaded[9], SparseLinear)
    assert int(loaded[5].num_batches_tracked) == 7
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed_model(x))
    # a model instance works as well as a factory
    again = load_compressed(make_model(2), path).eval()
    with torch.no_grad():
        assert torch.equal(again(x), compressed_model(x))


def test_file_contents_and_metadata(compressed_model, tmp_path):
    path = tmp_path / "model.safetensors"
    save_compressed(compressed_model, path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert meta["format"] == "sparsefact" and meta["format_version"] == "3"
    config = json.loads(meta["config"])
    assert config["format_version"] == 3
    sums = json.loads(meta["checksums"])
    assert sums["algorithm"] == "sha256" and set(sums["tensors"]) == keys
    assert all(len(d) == 64 for d in [sums["config"], *sums["tensors"].values()])
    names = [m["name"] for m in config["modules"]]
    assert names == ["2", "7", "9"]
    conv = config["modules"][1]
    assert conv["class"] == "DoubleSparseConv2d"
    assert conv["kernel_size"] == [3, 3] and conv["stride"] == [2, 2]
    assert conv["dtype"] == "float32" and conv["values_dtype"] == "float32"
    # small half-dense factors: a bitmask beats CSR (int16 columns cost more than 1 bit per entry)
    assert config["modules"][0]["storage"] == {"A": "bitmask", "B": "bitmask"}
    assert config["modules"][2]["storage"] == {"weight": "bitmask"}
    assert "2.A.bitmask" in keys and "2.A.values" in keys and "2.bias" in keys
    assert "0.weight" in keys and "5.running_var" in keys
    assert not any(k.startswith(("2.A", "9.weight")) and not k.endswith(("bitmask", "values")) for k in keys)
    assert set(config["dense_keys"]) == {k for k in keys if not k.startswith(("2.", "7.", "9."))}
    # CSR only, as a version-2 file would have it
    save_compressed(compressed_model, path, storages=("dense", "csr"))
    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
        config = json.loads(fh.metadata()["config"])
    assert config["modules"][0]["storage"] == {"A": "csr", "B": "csr"}
    assert "2.A.crow_indices" in keys and "2.A.values" in keys and "2.A.bitmask" not in keys
    assert not any(k.startswith(("2.A", "9.weight")) and not k.endswith(("indices", "values")) for k in keys)


def test_file_size_reflects_sparsity(tmp_path):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((128, 96)).astype(np.float32)
    est = DoubleSparseFactorization(0.25, max_iter=2, random_state=0).fit(W)
    for layout in ["csr", "dense"]:  # the runtime layout does not change what is written
        bias = np.zeros(128, np.float32)
        model = nn.Sequential(DoubleSparseLinear.from_estimator(est, bias, layout=layout))
        path = tmp_path / f"{layout}.safetensors"
        save_compressed(model, path)
        dense_bytes = 128 * 96 * 4 + 128 * 4
        size = os.path.getsize(path)
        assert size < 0.6 * dense_bytes
        report = compression_report(model)
        assert report[0]["dense_bytes"] == dense_bytes
        assert report[0]["compressed_bytes"] <= size < report[0]["compressed_bytes"] + 4096  # + header
        assert report[-1]["name"] == "total"
        assert report[0]["density"] == pytest.approx(est.density_)


def test_compression_report_rows(compressed_model):
    rows = compression_report(compressed_model)
    assert [r["name"] for r in rows] == ["2", "7", "9", "total"]
    assert rows[0]["dense_bytes"] == (16 * 16 + 16) * 4
    assert rows[1]["dense_bytes"] == (3 * 6 * 9 + 3) * 4
    assert rows[-1]["compressed_bytes"] == sum(r["compressed_bytes"] for r in rows[:-1])


def test_float64_module_round_trip(tmp_path):
    A = np.triu(np.ones((6, 4)))
    B = np.eye(4, 5)
    dsl = DoubleSparseLinear.from_factors(A, B, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 5).double(), dsl)
    path = tmp_path / "f64.safetensors"
    save_compressed(model, path)
    loaded = load_compressed(lambda: nn.Sequential(nn.Linear(3, 5).double(), nn.Linear(5, 6).double()), path)
    assert loaded[1].A.dtype == torch.float64 and loaded[1].bias is None
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------- broken files
def _rewrite(src, dst, *, tensors=None, metadata=None, unsigned=True):
    """Copy ``src`` to ``dst`` after editing its tensors / metadata dicts in place by callables.

    ``unsigned``: write it as a format-version-1 file (no checksums), so that the edit reaches
    the structural checks; ``False`` keeps the original checksums (which the edit breaks).
    """
    from safetensors import safe_open

    with safe_open(str(src), "pt") as fh:
        meta = dict(fh.metadata())
        data = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if tensors is not None:
        tensors(data)
    if metadata is not None:
        metadata(meta)
    if unsigned:
        meta.pop("checksums", None)
        meta["format_version"] = "1"
    safetensors_torch.save_file(data, str(dst), metadata=meta)
    return dst


@pytest.fixture
def saved(compressed_model, tmp_path):
    """The model saved with CSR (no bitmask) storage, so that the CSR checks below see CSR arrays.

    The bitmask storage has its own corruption tests in tests/test_nn_io_bitmask.py.
    """
    path = tmp_path / "ok.safetensors"
    save_compressed(compressed_model, path, storages=("dense", "csr"))
    return path


def test_truncated_file(saved, tmp_path):
    raw = saved.read_bytes()
    for cut in (4, 100, len(raw) - 10):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="safetensors"):
            load_compressed(make_model, bad)


def test_tampered_header(saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n]
    pos = header.index(b"{") + 1
    raw[8 + pos] = ord("#")  # not JSON any more
    bad = tmp_path / "header.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="safetensors"):
        load_compressed(make_model, bad)
    # header length pointing past the end of the file
    raw2 = bytearray(saved.read_bytes())
    raw2[:8] = (len(raw2) * 2).to_bytes(8, "little")
    bad2 = tmp_path / "length.safetensors"
    bad2.write_bytes(bytes(raw2))
    with pytest.raises(ValueError, match="safetensors"):
        load_compressed(make_model, bad2)


def _edit_config(fn):
    def edit(meta):
        cfg = json.loads(meta["config"])
        fn(cfg)
        meta["config"] = json.dumps(cfg)

    return edit


def test_unknown_class(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "cls.safetensors",
                   metadata=_edit_config(lambda c: c["modules"][0].update({"class": "Evil"})))
    with pytest.raises(ValueError, match="unknown module class 'Evil'"):
        load_compressed(make_model, bad)


def test_missing_tensor(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "miss.safetensors", tensors=lambda t: t.pop("2.A.values"))
    with pytest.raises(ValueError, match=r"missing tensor '2\.A\.values'"):
        load_compressed(make_model, bad)
    bad = _rewrite(saved, tmp_path / "miss2.safetensors", tensors=lambda t: t.pop("5.running_mean"))
    with pytest.raises(ValueError, match="missing tensor"):
        load_compressed(make_model, bad)


def test_wrong_shapes(saved, tmp_path):
    def other_model():
        m = make_model()
        m[2] = nn.Linear(16, 20)
        return m

    with pytest.raises(ValueError, match="out_features"):
        load_compressed(other_model, saved)

    def other_dense():
        m = make_model()
        m[0] = nn.Linear(11, 16)
        return m

    with pytest.raises(ValueError, match=r"'0\.weight' has shape"):
        load_compressed(other_dense, saved)
    bad = _rewrite(saved, tmp_path / "crow.safetensors",
                   tensors=lambda t: t.update({"2.A.crow_indices": t["2.A.crow_indices"][:-1].clone()}))
    with pytest.raises(ValueError, match="crow_indices"):
        load_compressed(make_model, bad)
    bad = _rewrite(saved, tmp_path / "col.safetensors",
                   tensors=lambda t: t.update({"2.B.col_indices": t["2.B.col_indices"] + 100}))
    with pytest.raises(ValueError, match="out of range"):
        load_compressed(make_model, bad)
    bad = _rewrite(saved, tmp_path / "cfg.safetensors",
                   metadata=_edit_config(lambda c: c["modules"][0].update({"inner_features": 3})))
    with pytest.raises(ValueError, match="shape"):
        load_compressed(make_model, bad)


def test_not_a_sparsefact_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors_torch.save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a sparsefact file"):
        load_compressed(make_model, path)
    with pytest.raises(FileNotFoundError):
        load_compressed(make_model, tmp_path / "nope.safetensors")


def test_model_without_named_module(saved):
    with pytest.raises(ValueError, match="no submodule"):
        load_compressed(lambda: nn.Sequential(nn.Linear(12, 16)), saved)


# ---------------------------------------------------------------------------- old files, every family
DATA = os.path.join(os.path.dirname(__file__), "data")


def v1_dense_model() -> nn.Module:
    """The dense architecture of tests/data/nn_v1_model.safetensors (see tests/data/nn_v1_make.py)."""
    torch.manual_seed(5)  # another seed than the file's: every tensor must come from the file
    return nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.Unflatten(1, (1, 4, 4)),
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 3, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(12, 5),
    )


def test_format_version_1_file_still_loads(tmp_path):
    """A file written by the code before the module classes owned their configs loads the same."""
    path = os.path.join(DATA, "nn_v1_model.safetensors")
    ref = np.load(os.path.join(DATA, "nn_v1_model_reference.npz"))
    loaded = load_compressed(v1_dense_model, path).eval()
    kinds = {"2": (DoubleSparseLinear, "csr"), "4": (DoubleSparseConv2d, "dense"),
             "7": (DoubleSparseConv2d, "csr"), "9": (SparseLinear, "csr")}
    for name, (cls, layout) in kinds.items():
        module = loaded.get_submodule(name)
        assert type(module) is cls
        assert set(module.layouts.values()) == {layout}
        for f in module._factor_names:
            assert np.array_equal(module.factor(f).numpy(), ref[f"{name}.{f}"])
    assert loaded[2].bias is None and loaded[7].stride == (2, 2) and loaded[4].padding == (1, 1)
    assert int(loaded[5].num_batches_tracked) == 3
    with torch.no_grad():
        y = loaded(torch.from_numpy(ref["x"]))
    # the factors are bit-identical; the output up to float32 rounding (MKL sums in an order
    # that depends on the thread count: the reference was computed with the default threads)
    torch.testing.assert_close(y, torch.from_numpy(ref["y"]), rtol=1e-6, atol=1e-5)
    # saving it again writes the same config, key for key, as format version 3 (+ checksums,
    # values_dtype); with the storages of version 1 (dense, CSR) the same tensors too
    from safetensors import safe_open

    for storages in [("dense", "csr"), ("dense", "csr", "bitmask")]:
        again = tmp_path / "again.safetensors"
        save_compressed(loaded, again, storages=storages)
        with safe_open(path, "pt") as old, safe_open(str(again), "pt") as new:
            assert "checksums" not in old.metadata() and old.metadata()["format_version"] == "1"
            new_config = json.loads(new.metadata()["config"])
            old_config = json.loads(old.metadata()["config"])
            assert new_config.pop("format_version") == 3 and old_config.pop("format_version") == 1
            for cfg in new_config["modules"]:
                assert cfg.pop("values_dtype") == cfg["dtype"]
            if "bitmask" in storages:
                # every half-dense factor of this small model is smaller as a bitmask
                for new_cfg, old_cfg in zip(new_config["modules"], old_config["modules"], strict=True):
                    assert set(new_cfg.pop("storage").values()) <= {"bitmask", "dense"}
                    old_cfg.pop("storage")
            assert new_config == old_config
            if "bitmask" not in storages:
                assert set(new.keys()) == set(old.keys())
            assert set(json.loads(new.metadata()["checksums"])["tensors"]) == set(new.keys())
        with torch.no_grad():
            assert torch.equal(load_compressed(v1_dense_model, again).eval()(torch.from_numpy(ref["x"])), y)


def every_family_model() -> nn.Module:
    """Linear -> Linear -> Linear -> (1, 4, 4) -> Conv -> Conv -> Conv -> Linear, one per family."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 16, bias=False), nn.Unflatten(1, (1, 4, 4)),
        nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.Conv2d(4, 3, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2)), nn.Flatten(), nn.Linear(6, 5),
    )


def test_round_trip_of_every_module_family(tmp_path):
    from sparsefact.nn_adapters import LowRankConv2d, LowRankLinear, SparseConv2d
    from sparsefact.nn_adapters.capture import layer_matrix

    rng = np.random.default_rng(0)
    model = every_family_model().eval()

    def pruned(W, density=0.5):
        return np.where(rng.random(W.shape) < density, W, 0).astype(np.float32)

    def factors(cls, layer):
        W = layer_matrix(layer).numpy()
        if cls in (SparseLinear, SparseConv2d):
            return (pruned(W),)
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        A, B = (U[:, :3] * s[:3]).astype(np.float32), Vt[:3].astype(np.float32)
        return (A, B) if cls in (LowRankLinear, LowRankConv2d) else (pruned(A), pruned(B))

    plan = {"0": SparseLinear, "1": DoubleSparseLinear, "2": LowRankLinear, "4": SparseConv2d,
            "5": DoubleSparseConv2d, "6": LowRankConv2d}
    for name, cls in plan.items():
        layer = model.get_submodule(name)
        replace_module(model, name, cls.from_layer(layer, factors(cls, layer)))
    path = tmp_path / "families.safetensors"
    save_compressed(model, path)
    loaded = load_compressed(every_family_model, path).eval()
    for name, cls in plan.items():
        assert type(loaded.get_submodule(name)) is cls
        assert loaded.get_submodule(name).get_config() == model.get_submodule(name).get_config()
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    rows = compression_report(loaded)
    assert [r["class"] for r in rows[:-1]] == [c.__name__ for c in plan.values()]


def test_wrong_conv_geometry_is_reported(saved):
    def other_conv():
        m = make_model()
        m[7] = nn.Conv2d(6, 3, 5, stride=2, padding=1)
        return m

    with pytest.raises(ValueError, match="kernel_size"):
        load_compressed(other_conv, saved)


def test_bad_dtype_and_geometry_in_the_config(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "dtype.safetensors",
                   metadata=_edit_config(lambda c: c["modules"][0].update({"dtype": "int8"})))
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_compressed(make_model, bad)
    bad = _rewrite(saved, tmp_path / "geom.safetensors",
                   metadata=_edit_config(lambda c: c["modules"][1].pop("dilation")))
    with pytest.raises(ValueError, match="malformed module config"):
        load_compressed(make_model, bad)


def test_io_has_no_per_class_code():
    import inspect

    from sparsefact.nn_adapters import io

    source = inspect.getsource(io)
    code = source[source.index('"""', 3) + 3:]  # after the module docstring
    for name in ("DoubleSparseConv2d", "DoubleSparseLinear", "SparseLinear", "SparseConv2d", "LowRank"):
        assert name not in code


# ---------------------------------------------------------------------------- corrupted data (issue 18)
def _csr_row_with(tensors, key, at_least=2):
    """Index of the first row of CSR factor ``key`` with at least ``at_least`` entries, and its start."""
    crow = tensors[f"{key}.crow_indices"].to(torch.int64)
    for r in range(crow.numel() - 1):
        if crow[r + 1] - crow[r] >= at_least:
            return r, int(crow[r])
    raise AssertionError(f"no row of {key} with {at_least} entries")  # pragma: no cover


def _set(key, fn):
    """A ``tensors=`` edit replacing ``key`` by ``fn(clone of it)``."""
    def edit(t):
        value = t[key].clone()
        t[key] = fn(value, t)
    return edit


def _assign(index, value):
    def fn(x, _t):
        x[index] = value
        return x
    return fn


# in-range changes that every structural check accepts: only the checksums can see them
SILENT_EDITS = {
    "a CSR value": ("2.A.values", _assign(0, 0.123)),
    "a column index, still in range and sorted": (
        "9.weight.col_indices",
        lambda x, t: _move_last_column(x, t, "9.weight")),
    "a bias entry": ("2.bias", _assign(0, 9.0)),
    "an untouched dense weight": ("0.weight", _assign((0, 0), 0.5)),
    "a BatchNorm buffer": ("5.num_batches_tracked", lambda x, _t: x + 1),
}


def _move_last_column(col, tensors, key):
    """Shift the last entry of the first row whose last column can move right (stays valid CSR)."""
    crow = tensors[f"{key}.crow_indices"].to(torch.int64)
    cols = 12
    for r in range(crow.numel() - 1):
        end = int(crow[r + 1])
        if end > int(crow[r]) and int(col[end - 1]) < cols - 1:
            col[end - 1] += 1
            return col
    raise AssertionError("no movable entry")  # pragma: no cover


@pytest.mark.parametrize("what", list(SILENT_EDITS))
def test_checksum_catches_an_in_range_change(saved, tmp_path, what):
    key, fn = SILENT_EDITS[what]
    load_compressed(make_model, _rewrite(saved, tmp_path / "as_v1.safetensors", tensors=_set(key, fn)))
    # ^ without checksums (a version-1 file) the change is undetectable; with them it is refused
    bad = _rewrite(saved, tmp_path / "bad.safetensors", tensors=_set(key, fn), unsigned=False)
    with pytest.raises(ValueError, match=rf"tensor '{key}' does not match its checksum"):
        load_compressed(make_model, bad)


def test_checksum_catches_a_consistent_config_change(saved, tmp_path):
    def stride(cfg):
        cfg["modules"][1]["stride"] = [1, 1]  # a geometry that still fits every tensor

    with pytest.raises(ValueError, match="config in the metadata does not match its checksum"):
        load_compressed(make_model, _rewrite(saved, tmp_path / "s.safetensors", metadata=_edit_config(stride),
                                             unsigned=False))
    def sums(meta):
        meta["checksums"] = meta["checksums"].replace('"config": "', '"config": "0')

    edit = _rewrite(saved, tmp_path / "sums.safetensors", unsigned=False, metadata=sums)
    with pytest.raises(ValueError, match="checksum"):
        load_compressed(make_model, edit)


def test_version_2_file_without_checksums_is_refused(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "nosum.safetensors", metadata=lambda m: m.pop("checksums"),
                   unsigned=False)
    with pytest.raises(ValueError, match="without checksums"):
        load_compressed(make_model, bad)
    bad = _rewrite(saved, tmp_path / "v0.safetensors", metadata=lambda m: m.update({"format_version": "0"}),
                   unsigned=False)
    with pytest.raises(ValueError, match="unsupported format_version 0"):
        load_compressed(make_model, bad)


def test_tensor_added_or_removed_against_the_checksums(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "extra.safetensors", unsigned=False,
                   tensors=lambda t: t.update({"evil": torch.zeros(3)}))
    with pytest.raises(ValueError, match="'evil' has no checksum"):
        load_compressed(make_model, bad)
    bad = _rewrite(saved, tmp_path / "gone.safetensors", unsigned=False, tensors=lambda t: t.pop("0.bias"))
    with pytest.raises(ValueError, match=r"missing tensor '0\.bias'"):
        load_compressed(make_model, bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_factor_values_are_refused_without_checksums(saved, tmp_path, value):
    for key, index in [("2.A.values", 0), ("7.B.values", 3), ("9.bias", 1)]:
        bad = _rewrite(saved, tmp_path / "nan.safetensors", tensors=_set(key, _assign(index, value)))
        with pytest.raises(ValueError, match=rf"'{key}' holds NaN or infinite"):
            load_compressed(make_model, bad)


def test_unsorted_and_duplicate_columns_are_value_errors(saved, tmp_path):
    """Torch's own CSR check raised a RuntimeError for these; an in-range duplicate it never saw."""
    def swap(col, t):
        r, start = _csr_row_with(t, "2.A")
        col[start], col[start + 1] = col[start + 1].clone(), col[start].clone()
        return col

    def duplicate(col, t):
        r, start = _csr_row_with(t, "2.A")
        col[start + 1] = col[start]
        return col

    for fn in (swap, duplicate):
        bad = _rewrite(saved, tmp_path / "cols.safetensors", tensors=_set("2.A.col_indices", fn))
        with pytest.raises(ValueError, match="strictly increasing within each row"):
            load_compressed(make_model, bad)


def test_bad_row_pointer_is_a_value_error(saved, tmp_path):
    def dip(crow, _t):
        crow[1], crow[2] = crow[2].clone() + 1, crow[1].clone()
        return crow

    for fn in (dip, lambda c, _t: c + 1, lambda c, _t: torch.cat([c[:-1], c[-1:] - 1])):
        bad = _rewrite(saved, tmp_path / "crow.safetensors", tensors=_set("2.B.crow_indices", fn))
        with pytest.raises(ValueError, match="crow_indices"):
            load_compressed(make_model, bad)


def test_bias_false_with_a_bias_in_the_file_is_refused(saved, tmp_path):
    drop = _edit_config(lambda c: c["modules"][0].update({"bias": False}))
    with pytest.raises(ValueError, match=r"bias tensor '2\.bias' but the config says bias=false"):
        load_compressed(make_model, _rewrite(saved, tmp_path / "b.safetensors", metadata=drop))
    with pytest.raises(ValueError, match="checksum"):
        load_compressed(make_model, _rewrite(saved, tmp_path / "b2.sft", metadata=drop, unsigned=False))


def test_stray_tensor_and_storage_dtype_are_refused(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "stray.sft", tensors=lambda t: t.update({"2.extra": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"config does not describe: \['2\.extra'\]"):
        load_compressed(make_model, bad)
    bad = _rewrite(saved, tmp_path / "f64.sft", tensors=_set("7.B.values", lambda x, _t: x.double()))
    with pytest.raises(ValueError, match=r"'7\.B\.values' is float64, the config says float32"):
        load_compressed(make_model, bad)
    bad = _rewrite(saved, tmp_path / "int.sft", tensors=_set("0.weight", lambda x, _t: x.to(torch.int32)))
    with pytest.raises(ValueError, match=r"'0\.weight' is int32 in the file"):
        load_compressed(make_model, bad)


def test_impossible_geometry_is_a_value_error_not_a_runtime_error(saved, tmp_path):
    for edit in ({"in_features": -16}, {"inner_features": -1}, {"shapes": {"A": [16, "x"]}}):
        bad = _rewrite(saved, tmp_path / "g.safetensors",
                       metadata=_edit_config(lambda c, e=edit: c["modules"][0].update(e)))
        with pytest.raises(ValueError):
            load_compressed(make_model, bad)
    twice = _edit_config(lambda c: c["modules"].append(dict(c["modules"][0])))
    with pytest.raises(ValueError, match="named twice"):
        load_compressed(make_model, _rewrite(saved, tmp_path / "twice.safetensors", metadata=twice))


def test_saved_file_gets_the_umask_mode(compressed_model, tmp_path):
    previous = os.umask(0o027)
    try:
        save_compressed(compressed_model, tmp_path / "m.safetensors")
    finally:
        os.umask(previous)
    assert (os.stat(tmp_path / "m.safetensors").st_mode & 0o777) == 0o640


def test_dense_stored_factor_is_verified(tmp_path):
    """A factor dense enough to be stored dense: checksum, finiteness and dtype are checked."""
    torch.manual_seed(0)
    A, B, bias = torch.randn(4, 3), torch.randn(3, 5), torch.randn(4)
    model = nn.Sequential(DoubleSparseLinear.from_factors(A, B, bias))
    path = tmp_path / "dense.safetensors"
    save_compressed(model, path)

    def factory():
        return nn.Sequential(nn.Linear(5, 4))

    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        assert json.loads(fh.metadata()["config"])["modules"][0]["storage"] == {"A": "dense", "B": "dense"}
    bad = _rewrite(path, tmp_path / "changed.sft", tensors=_set("0.A", _assign((0, 0), 1.5)), unsigned=False)
    with pytest.raises(ValueError, match=r"'0\.A' does not match its checksum"):
        load_compressed(factory, bad)
    bad = _rewrite(path, tmp_path / "nan.sft", tensors=_set("0.B", _assign((1, 1), float("nan"))))
    with pytest.raises(ValueError, match=r"'0\.B' holds NaN"):
        load_compressed(factory, bad)
    bad = _rewrite(path, tmp_path / "half.sft", tensors=_set("0.A", lambda x, _t: x.half()))
    with pytest.raises(ValueError, match=r"'0\.A' is float16, the config says float32"):
        load_compressed(factory, bad)
