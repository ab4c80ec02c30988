"""Format version 3 of save_compressed: bitmask and bitmask-deflate storages, storage choice,
values_dtype, old files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
nn = torch.nn

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparsefact.nn_adapters import (  # noqa: E402
    DoubleSparseLinear,
    SparseLinear,
    compression_report,
    load_compressed,
    save_compressed,
)
from sparsefact.nn_adapters.io import FORMAT_VERSION, STORAGES, storage_bytes, tensor_digest  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: 1 torch thread, seed 0

DATA = os.path.join(os.path.dirname(__file__), "data")




# ---------------------------------------------------------------------------- helpers
def sparse(gen: torch.Generator, shape, density, dtype=torch.float32, *, empty_row=None, empty_col=None):
    """A random factor keeping about ``density`` of its entries (no entry rounds to zero in bf16)."""
    W = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.25) * torch.where(
        torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
    W = torch.where(torch.rand(shape, generator=gen) < density, W, torch.zeros((), dtype=torch.float64))
    if empty_row is not None:
        W[empty_row] = 0
    if empty_col is not None:
        W[:, empty_col] = 0
    return W.to(dtype)


def read_file(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
        data = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return meta, json.loads(meta["config"]), data


def rewrite(src, dst, *, tensors=None, metadata=None, unsigned=True):
    """Copy ``src`` to ``dst`` after editing its tensors / metadata by callables.

    ``unsigned``: drop the checksums (a version-1 file), so that the edit reaches the structural
    checks; ``False`` keeps them (the edit must then be caught by a checksum).
    """
    meta, _cfg, data = read_file(src)
    if tensors is not None:
        tensors(data)
    if metadata is not None:
        metadata(meta)
    if unsigned:
        meta.pop("checksums", None)
        meta["format_version"] = "1"
    safetensors_torch.save_file(data, str(dst), metadata=meta)
    return dst


def assert_same_factors(loaded, model):
    for name, module in model.named_modules():
        if hasattr(module, "_factor_names"):
            other = loaded.get_submodule(name)
            assert type(other) is type(module)
            for f in module._factor_names:
                got, want = other.factor(f), module.factor(f)
                assert got.dtype == want.dtype and torch.equal(got, want), f"{name}.{f}"
            if module.bias is not None:
                assert torch.equal(other.bias, module.bias)


def module_tensor_bytes(data, name):
    return sum(t.numel() * t.element_size() for k, t in data.items() if k.startswith(name + "."))


# ---------------------------------------------------------------------------- round trips
ROUND_TRIP_CASES = {
    # name: (factor shapes, densities, dtype, extra kw for sparse())
    "dsf f32 odd shapes, empty rows/cols": ([(13, 7), (7, 11)], [0.5, 0.4], torch.float32,
                                           {"empty_row": 3, "empty_col": 2}),
    "dsf f64": ([(9, 5), (5, 17)], [0.6, 0.3], torch.float64, {}),
    "dsf bf16": ([(10, 6), (6, 12)], [0.5, 0.5], torch.bfloat16, {"empty_row": 0}),
    "sparse all-zero": ([(5, 9)], [0.0], torch.float32, {}),
    "sparse full": ([(6, 10)], [1.0], torch.float32, {}),
    "sparse 1x1": ([(1, 1)], [1.0], torch.float32, {}),
    "sparse multiple of 8": ([(8, 16)], [0.3], torch.float32, {}),
    "sparse bf16 wide": ([(3, 41)], [0.7], torch.bfloat16, {"empty_col": 40}),
}


def build(shapes, densities, dtype, seed=0, bias=True, **kw):
    gen = torch.Generator().manual_seed(seed)
    factors = [sparse(gen, s, d, dtype, **kw) for s, d in zip(shapes, densities, strict=True)]
    out, inp = shapes[0][0], shapes[-1][1]
    b = torch.randn(out, generator=gen).to(dtype) if bias else None
    if len(factors) == 2:
        module = DoubleSparseLinear.from_factors(*factors, b, dtype=dtype)
    else:
        module = SparseLinear.from_weight(factors[0], b, dtype=dtype)
    model = nn.Sequential(nn.Linear(4, inp).to(dtype), module)

    def factory():
        return nn.Sequential(nn.Linear(4, inp).to(dtype), nn.Linear(inp, out, bias=bias).to(dtype))

    return model.eval(), factory


@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES))
@pytest.mark.parametrize("storages", [STORAGES, ("bitmask",), ("bitmask-deflate",)],
                         ids=["auto", "bitmask-only", "deflate-only"])
def test_round_trip_is_exact(case, storages, tmp_path):
    shapes, densities, dtype, kw = ROUND_TRIP_CASES[case]
    model, factory = build(shapes, densities, dtype, **kw)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path, storages=storages)
    meta, cfg, data = read_file(path)
    assert meta["format_version"] == str(FORMAT_VERSION) == "3"
    module_cfg = cfg["modules"][0]
    assert module_cfg["values_dtype"] == module_cfg["dtype"] == str(dtype).removeprefix("torch.")
    if len(storages) == 1:
        assert set(module_cfg["storage"].values()) == set(storages)
    # checksums cover every tensor, the bitmasks included
    assert set(json.loads(meta["checksums"])["tensors"]) == set(data)
    for f, storage in module_cfg["storage"].items():
        if storage == "bitmask":
            rows, cols = module_cfg["shapes"][f]
            mask = data[f"1.{f}.bitmask"]
            assert mask.dtype == torch.uint8 and mask.numel() == math.ceil(rows * cols / 8)
            assert data[f"1.{f}.values"].dtype == dtype
        if storage == "bitmask-deflate":
            stream = data[f"1.{f}.bitmask_deflate"]
            assert stream.dtype == torch.uint8 and stream.ndim == 1
            # a zlib stream of exactly the bitmask storage's bytes
            bits = (model[1].factor(f) != 0).numpy().reshape(-1)
            assert zlib.decompress(stream.numpy().tobytes()) == np.packbits(bits, bitorder="little").tobytes()
            assert data[f"1.{f}.values"].dtype == dtype
    loaded = load_compressed(factory, path).eval()
    assert_same_factors(loaded, model)
    x = torch.randn(3, 4).to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # the report counts exactly the module's tensors
    row = compression_report(model, storages=storages)[0]
    assert row["compressed_bytes"] == module_tensor_bytes(data, "1")
    assert row["storage"] == module_cfg["storage"]


def test_bit_order_is_little_endian_row_major(tmp_path):
    W = torch.zeros(3, 5)
    W[0, 0], W[0, 3], W[1, 4], W[2, 2] = 1.0, 2.0, 3.0, 4.0  # flat indices 0, 3, 9, 12
    model = nn.Sequential(SparseLinear.from_weight(W))
    path = tmp_path / "bits.safetensors"
    save_compressed(model, path, storages=("bitmask",))
    _meta, _cfg, data = read_file(path)
    assert data["0.weight.bitmask"].tolist() == [0b0000_1001, 0b0001_0010]
    assert data["0.weight.values"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_runtime_csr_factor_and_explicit_zeros(tmp_path):
    """A CSR factor (unsorted columns, explicit zeros) writes the same bitmask as its dense form."""
    dense = torch.tensor([[0.0, 1.5, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.5, 0.0]])
    csr = torch.sparse_csr_tensor(torch.tensor([0, 3, 3, 5]), torch.tensor([3, 1, 2, 2, 0]),
                                  torch.tensor([-2.0, 1.5, 0.0, 0.5, 3.0]), size=(3, 4))
    paths = []
    for i, (W, layout) in enumerate([(dense, "dense"), (csr, "csr")]):
        module = SparseLinear.from_weight(dense, layout=layout)
        module._set_factor("weight", W, layout)  # keep the hand-made CSR as it is
        paths.append(tmp_path / f"{i}.safetensors")
        save_compressed(nn.Sequential(module), paths[-1], storages=("bitmask",))
    (_m0, _c0, d0), (_m1, _c1, d1) = read_file(paths[0]), read_file(paths[1])
    assert set(d0) == set(d1) and all(torch.equal(d0[k], d1[k]) for k in d0)
    loaded = load_compressed(nn.Sequential(nn.Linear(4, 3, bias=False)), paths[1])
    assert torch.equal(loaded[0].factor("weight"), dense)


# ---------------------------------------------------------------------------- storage choice and size
@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 0.97, 1.0])
def test_each_factor_takes_the_smallest_storage(density, tmp_path):
    model, _ = build([(64, 48), (48, 40)], [density, min(1.0, 2 * density)], torch.float32, seed=1)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    _meta, cfg, data = read_file(path)
    module = model[1]
    for f in module._factor_names:
        W = getattr(module, f)
        sizes = storage_bytes(module.factor(f).count_nonzero().item(), tuple(W.shape), 4,
                              mask=module.factor(f))
        assert set(sizes) == set(STORAGES)
        chosen = cfg["modules"][0]["storage"][f]
        assert sizes[chosen] == min(sizes.values())
        assert chosen == next(s for s in STORAGES if sizes[s] == min(sizes.values()))  # tie order
        written = sum(t.numel() * t.element_size() for k, t in data.items()
                      if k == f"1.{f}" or k.startswith(f"1.{f}."))
        assert written == sizes[chosen]


def test_storage_tie_goes_to_dense():
    # 8 entries, nnz 0: dense 32, bitmask 1 -> bitmask; 1 entry full: dense 4, bitmask 5 -> dense
    assert storage_bytes(0, (2, 4), 4) == {"dense": 32, "csr": 12, "bitmask": 1}
    assert storage_bytes(1, (1, 1), 4) == {"dense": 4, "csr": 14, "bitmask": 5}
    from sparsefact.nn_adapters.io import _choose_storage

    empty = storage_bytes(0, (0, 3), 4, mask=np.zeros((0, 3)))
    assert empty == {"dense": 0, "csr": 4, "bitmask": 0, "bitmask-deflate": 8}  # the shortest zlib stream
    assert _choose_storage(empty, STORAGES) == ("dense", 0)  # dense and bitmask tie at 0 bytes
    assert _choose_storage(storage_bytes(2, (1, 16), 1), ("csr", "bitmask")) == ("bitmask", 4)  # csr 14
    # bitmask-deflate is taken only when strictly smaller: a tie goes to the plain bitmask
    sizes = {"dense": 9, "csr": 9, "bitmask": 5, "bitmask-deflate": 5}
    assert _choose_storage(sizes, STORAGES) == ("bitmask", 5)
    sizes["bitmask-deflate"] = 4
    assert _choose_storage(sizes, STORAGES) == ("bitmask-deflate", 4)


def _dense_bytes(shape, bias, itemsize=4):
    return (shape[0] * shape[1] + (shape[0] if bias else 0)) * itemsize


@pytest.mark.parametrize("density", [0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
def test_file_meets_d_plus_004_for_sparse_linear(density, tmp_path):
    """SparseLinear 1536x384 with bias: file bytes <= (d + 0.04) x dense bytes (issue 19, item 2)."""
    gen = torch.Generator().manual_seed(0)
    module = SparseLinear.from_weight(sparse(gen, (1536, 384), density), torch.randn(1536, generator=gen))
    model = nn.Sequential(module)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    row = compression_report(model)[0]
    size = os.path.getsize(path)
    assert row["dense_bytes"] == _dense_bytes((1536, 384), True)
    assert row["compressed_bytes"] <= size < row["compressed_bytes"] + 4096  # + JSON header
    assert size <= (row["density"] + 0.04) * row["dense_bytes"]
    sizes = storage_bytes(row["nnz"], (1536, 384), 4, mask=module.weight)
    assert row["storage"] == {"weight": min(STORAGES, key=lambda s: (sizes[s], STORAGES.index(s)))}
    # random masks: deflate gains where the density is far from 1/2, not at 1/2
    assert row["storage"]["weight"] == ("bitmask" if density == 0.5 else "bitmask-deflate")
    # float16 values: about half
    save_compressed(model, path, values_dtype="float16")
    half = compression_report(model, values_dtype="float16")[0]
    assert half["compressed_bytes"] <= os.path.getsize(path) < half["compressed_bytes"] + 4096
    assert os.path.getsize(path) <= (row["density"] / 2 + 0.04) * row["dense_bytes"]


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_double_sparse_bytes_follow_the_mask_formula(density, tmp_path):
    """DoubleSparseLinear (m x k)(k x n) with bitmask factors: d + k (m + n) / (32 m n) of dense.

    For a 4:1 layer with k = n that is d + 0.039 for the weights: the goal d + 0.04 holds for the
    weights (no bias); with the bias (stored whole, (1 - d) b / dense more) it can exceed it by
    about 0.002, see benchmarks/results/bench_file_size.json.
    """
    m, n = 1536, 384
    gen = torch.Generator().manual_seed(1)
    # factor densities giving a total of density * m * n nonzeros
    p = density * m * n / (m * n + n * n)
    A, B = sparse(gen, (m, n), p), sparse(gen, (n, n), p)
    model = nn.Sequential(DoubleSparseLinear.from_factors(A, B))
    path = tmp_path / "m.safetensors"
    plain = ("dense", "csr", "bitmask")
    save_compressed(model, path, storages=plain)
    row = compression_report(model, storages=plain)[0]
    nnz = row["nnz"]
    assert row["storage"] == {"A": "bitmask", "B": "bitmask"}
    assert row["compressed_bytes"] == (m * n + n * n) // 8 + 4 * nnz
    assert row["compressed_bytes"] <= (row["density"] + 0.04) * row["dense_bytes"]
    assert row["compressed_bytes"] <= os.path.getsize(path) < row["compressed_bytes"] + 4096
    # with bitmask-deflate allowed (the default) never more, less where the masks compress
    save_compressed(model, path)
    best = compression_report(model)[0]
    assert best["compressed_bytes"] <= row["compressed_bytes"]
    assert best["compressed_bytes"] <= os.path.getsize(path) < best["compressed_bytes"] + 4096
    if density <= 0.3:
        assert set(best["storage"].values()) == {"bitmask-deflate"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16), half=st.booleans())
def test_property_round_trip_and_size_bound(tmp_path, rows, cols, density, seed, half):
    gen = torch.Generator().manual_seed(seed)
    W = sparse(gen, (rows, cols), density)
    model = nn.Sequential(SparseLinear.from_weight(W))
    path = tmp_path / "p.safetensors"
    values_dtype = torch.float16 if half else None
    save_compressed(model, path, values_dtype=values_dtype)
    loaded = load_compressed(nn.Sequential(nn.Linear(cols, rows, bias=False)), path)
    want = W.to(torch.float16).float() if half else W
    assert torch.equal(loaded[0].factor("weight"), want)
    row = compression_report(model, values_dtype=values_dtype)[0]
    _meta, _cfg, data = read_file(path)
    assert row["compressed_bytes"] == module_tensor_bytes(data, "0")
    # bitmask bound: ceil(numel / 8) + nnz * itemsize <= (d + 1/32) * dense + 7/8 (float32 values)
    numel, nnz = rows * cols, int(torch.count_nonzero(want))
    itemsize = 2 if half else 4
    assert row["compressed_bytes"] <= numel / 8 + 7 / 8 + nnz * itemsize
    assert row["compressed_bytes"] <= numel * 4
    if numel >= 25:  # 0.04 - 1/32 = 0.00875 of 4 bytes per entry covers the 7/8 byte of padding
        assert row["compressed_bytes"] <= (nnz / numel + 0.04) * numel * 4


# ---------------------------------------------------------------------------- values_dtype
@pytest.mark.parametrize("values_dtype", [torch.float16, "float16", torch.bfloat16, "bfloat16"])
@pytest.mark.parametrize("density", [0.3, 1.0])  # bitmask and dense storage
def test_values_dtype_rounds_the_factors_only(values_dtype, density, tmp_path):
    gen = torch.Generator().manual_seed(2)
    A = sparse(gen, (24, 8), density) * 3.3
    B = sparse(gen, (8, 20), density) / 7
    A[0, 0], B[0, 0] = 1e-9, 1e-9  # round to zero in float16: dropped from the pattern
    bias = torch.randn(24, generator=gen)
    model = nn.Sequential(nn.Linear(5, 20), DoubleSparseLinear.from_factors(A, B, bias)).eval()
    path = tmp_path / "half.safetensors"
    save_compressed(model, path, values_dtype=values_dtype)
    vd = values_dtype if isinstance(values_dtype, torch.dtype) else getattr(torch, values_dtype)
    _meta, cfg, data = read_file(path)
    mcfg = cfg["modules"][0]
    assert mcfg["values_dtype"] == str(vd).removeprefix("torch.") and mcfg["dtype"] == "float32"
    for f in ("A", "B"):
        stored = data[f"1.{f}.values"] if mcfg["storage"][f] != "dense" else data[f"1.{f}"]
        assert stored.dtype == vd
    assert data["1.bias"].dtype == torch.float32 and data["0.weight"].dtype == torch.float32
    loaded = load_compressed(lambda: nn.Sequential(nn.Linear(5, 20), nn.Linear(20, 24)), path).eval()
    for f, W in (("A", A), ("B", B)):
        got = loaded[1].factor(f)
        assert got.dtype == torch.float32
        assert torch.equal(got, W.to(vd).to(torch.float32))  # exactly the rounded values
    assert torch.equal(loaded[1].bias, bias) and torch.equal(loaded[0].weight, model[0].weight)
    row = compression_report(model, values_dtype=values_dtype)[0]
    assert row["compressed_bytes"] == module_tensor_bytes(data, "1")
    if vd is torch.float16:
        assert loaded[1].nnz == model[1].nnz - 2  # the two 1e-9 entries
        assert row["compressed_bytes"] < compression_report(model)[0]["compressed_bytes"]


def test_values_dtype_on_a_half_module_and_lossless_default(tmp_path):
    gen = torch.Generator().manual_seed(3)
    W = sparse(gen, (12, 10), 0.5, torch.bfloat16)
    model = nn.Sequential(SparseLinear.from_weight(W, dtype=torch.bfloat16))
    path = tmp_path / "bf.safetensors"
    save_compressed(model, path, values_dtype=torch.bfloat16)  # the module's own dtype: lossless
    _meta, cfg, _data = read_file(path)
    assert cfg["modules"][0]["values_dtype"] == "bfloat16"
    factory = nn.Sequential(nn.Linear(10, 12, bias=False).to(torch.bfloat16))
    assert torch.equal(load_compressed(factory, path)[0].factor("weight"), W)
    save_compressed(model, path, values_dtype="float16")  # bf16 -> fp16 -> bf16
    factory = nn.Sequential(nn.Linear(10, 12, bias=False).to(torch.bfloat16))
    got = load_compressed(factory, path)[0].factor("weight")
    assert got.dtype == torch.bfloat16 and torch.equal(got, W.to(torch.float16).to(torch.bfloat16))


def test_values_dtype_overflow_and_bad_arguments(tmp_path):
    W = torch.zeros(4, 6)
    W[1, 2] = 1e6  # above float16's 65504
    model = nn.Sequential(SparseLinear.from_weight(W))
    with pytest.raises(ValueError, match=r"values_dtype=float16 cannot hold factor '0\.weight'.*1e\+06"):
        save_compressed(model, tmp_path / "o.safetensors", values_dtype="float16")
    save_compressed(model, tmp_path / "ok.safetensors", values_dtype="bfloat16")  # bf16 has the range
    for bad in ("float32", "half", torch.float32, torch.int8):
        with pytest.raises(ValueError, match="values_dtype"):
            save_compressed(model, tmp_path / "b.safetensors", values_dtype=bad)
        with pytest.raises(ValueError, match="values_dtype"):
            compression_report(model, values_dtype=bad)
    with pytest.raises(TypeError, match="values_dtype"):
        save_compressed(model, tmp_path / "b.safetensors", values_dtype=16)
    for bad in ((), ("zip",), ["dense", "coo"]):
        with pytest.raises(ValueError, match="storages"):
            save_compressed(model, tmp_path / "b.safetensors", storages=bad)
    with pytest.raises(TypeError, match="storages"):
        save_compressed(model, tmp_path / "b.safetensors", storages="bitmask")
    assert not (tmp_path / "b.safetensors").exists()


# ---------------------------------------------------------------------------- corrupted bitmask files
def _corruption_model() -> nn.Module:
    """SparseLinear 5x7 (35 bits: 5 padding bits) and a DSF, the same for every call."""
    gen = torch.Generator().manual_seed(4)
    W = sparse(gen, (5, 7), 0.5)
    A, B = sparse(gen, (6, 3), 0.6), sparse(gen, (3, 5), 0.6)
    return nn.Sequential(SparseLinear.from_weight(W, torch.randn(5, generator=gen)),
                         DoubleSparseLinear.from_factors(A, B))


@pytest.fixture
def bitmask_file(tmp_path):
    """:func:`_corruption_model` with every factor a bitmask."""
    path = tmp_path / "bm.safetensors"
    save_compressed(_corruption_model(), path, storages=("bitmask",))
    return path


def bitmask_factory():
    return nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 6, bias=False))


def _edit(key, fn):
    def edit(t):
        t[key] = fn(t[key].clone())
    return edit


def _flip(byte, bit):
    def fn(mask):
        mask[byte] ^= 1 << bit
        return mask
    return fn


def _first_set_bit(mask):
    bits = np.unpackbits(mask.numpy(), bitorder="little")
    i = int(np.flatnonzero(bits)[0])
    return i // 8, i % 8


def test_bitmask_file_loads(bitmask_file):
    loaded = load_compressed(bitmask_factory, bitmask_file)
    assert isinstance(loaded[0], SparseLinear) and isinstance(loaded[1], DoubleSparseLinear)


def test_flipped_mask_bit_popcount_mismatch(bitmask_file, tmp_path):
    _m, _c, data = read_file(bitmask_file)
    byte, bit = _first_set_bit(data["0.weight.bitmask"])
    bad = rewrite(bitmask_file, tmp_path / "flip.sft", tensors=_edit("0.weight.bitmask", _flip(byte, bit)))
    with pytest.raises(ValueError, match=r"'0\.weight\.bitmask' has \d+ bits set but '0\.weight\.values'"):
        load_compressed(bitmask_factory, bad)
    # with the checksums kept, the checksum names it first
    bad = rewrite(bitmask_file, tmp_path / "flip2.sft", unsigned=False,
                  tensors=_edit("0.weight.bitmask", _flip(byte, bit)))
    with pytest.raises(ValueError, match=r"tensor '0\.weight\.bitmask' does not match its checksum"):
        load_compressed(bitmask_factory, bad)


def test_moved_mask_bit_is_caught_by_the_checksum_only(bitmask_file, tmp_path):
    """Moving a set bit keeps the popcount: structurally valid, so only the checksum can tell."""
    _m, _c, data = read_file(bitmask_file)
    bits = np.unpackbits(data["1.A.bitmask"].numpy(), bitorder="little")[:18]
    on, off = int(np.flatnonzero(bits)[0]), int(np.flatnonzero(bits == 0)[0])

    def move(mask):
        mask = _flip(on // 8, on % 8)(mask)
        return _flip(off // 8, off % 8)(mask)

    load_compressed(bitmask_factory,
                    rewrite(bitmask_file, tmp_path / "v1.sft", tensors=_edit("1.A.bitmask", move)))
    bad = rewrite(bitmask_file, tmp_path / "mv.sft", unsigned=False, tensors=_edit("1.A.bitmask", move))
    with pytest.raises(ValueError, match=r"'1\.A\.bitmask' does not match its checksum"):
        load_compressed(bitmask_factory, bad)


def test_padding_bit_set(bitmask_file, tmp_path):
    # bit 7 of byte 4 is entry 39, beyond the 35 entries
    bad = rewrite(bitmask_file, tmp_path / "pad.sft", tensors=_edit("0.weight.bitmask", _flip(4, 7)))
    with pytest.raises(ValueError, match=r"'0\.weight\.bitmask' has padding bits set beyond rows\*cols = 35"):
        load_compressed(bitmask_factory, bad)


def test_truncated_values_and_mask(bitmask_file, tmp_path):
    bad = rewrite(bitmask_file, tmp_path / "vals.sft", tensors=_edit("1.B.values", lambda v: v[:-1].clone()))
    with pytest.raises(ValueError, match=r"'1\.B\.bitmask' has \d+ bits set but '1\.B\.values' holds"):
        load_compressed(bitmask_factory, bad)
    bad = rewrite(bitmask_file, tmp_path / "mask.sft",
                  tensors=_edit("0.weight.bitmask", lambda m: m[:-1].clone()))
    with pytest.raises(ValueError,
                       match=r"'0\.weight\.bitmask' has 4 bytes, a 5x7 factor needs ceil\(35/8\) = 5"):
        load_compressed(bitmask_factory, bad)
    bad = rewrite(bitmask_file, tmp_path / "2d.sft", tensors=_edit("1.A.values", lambda v: v.reshape(1, -1)))
    with pytest.raises(ValueError, match=r"'1\.A\.values' must be 1-D"):
        load_compressed(bitmask_factory, bad)


def test_wrong_dtypes(bitmask_file, tmp_path):
    bad = rewrite(bitmask_file, tmp_path / "f64.sft", tensors=_edit("1.A.values", lambda v: v.double()))
    with pytest.raises(ValueError, match=r"'1\.A\.values' is float64, the config says float32"):
        load_compressed(bitmask_factory, bad)
    bad = rewrite(bitmask_file, tmp_path / "i16.sft",
                  tensors=_edit("1.A.bitmask", lambda m: m.to(torch.int16)))
    with pytest.raises(ValueError, match=r"'1\.A\.bitmask' must be a 1-D uint8 tensor, got int16"):
        load_compressed(bitmask_factory, bad)

    def vdtype(meta):
        cfg = json.loads(meta["config"])
        cfg["modules"][1]["values_dtype"] = "int8"
        meta["config"] = json.dumps(cfg)

    bad = rewrite(bitmask_file, tmp_path / "cfg.sft", metadata=vdtype)
    with pytest.raises(ValueError, match="unsupported values_dtype 'int8'"):
        load_compressed(bitmask_factory, bad)


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf")])
def test_zero_or_non_finite_values(bitmask_file, tmp_path, value):
    def put(v):
        v[1] = value
        return v

    bad = rewrite(bitmask_file, tmp_path / "v.sft", tensors=_edit("0.weight.values", put))
    match = "holds a zero under a set bitmask bit" if value == 0 else "holds NaN or infinite"
    with pytest.raises(ValueError, match=rf"'0\.weight\.values' {match}"):
        load_compressed(bitmask_factory, bad)


def test_missing_bitmask_tensor(bitmask_file, tmp_path):
    bad = rewrite(bitmask_file, tmp_path / "miss.sft", tensors=lambda t: t.pop("1.B.bitmask"))
    with pytest.raises(ValueError, match=r"missing tensor '1\.B\.bitmask'"):
        load_compressed(bitmask_factory, bad)


# ---------------------------------------------------------------------------- old files
def v2_dense_model() -> nn.Module:
    """The dense architecture of tests/data/nn_v2_model.safetensors (see tests/data/nn_v2_make.py)."""
    torch.manual_seed(9)  # another seed than the file's: every tensor must come from the file
    return nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 20, bias=False), nn.ReLU(), nn.Linear(20, 10),
        nn.LayerNorm(10), nn.Linear(10, 7).to(torch.bfloat16),
    )


def test_format_version_2_file_still_loads(tmp_path):
    path = os.path.join(DATA, "nn_v2_model.safetensors")
    ref = np.load(os.path.join(DATA, "nn_v2_model_reference.npz"))
    meta, cfg, _data = read_file(path)
    assert meta["format_version"] == "2" and "checksums" in meta
    assert all("values_dtype" not in m for m in cfg["modules"])
    loaded = load_compressed(v2_dense_model, path).eval()
    kinds = {"0": (DoubleSparseLinear, "csr"), "2": (SparseLinear, "dense"),
             "4": (DoubleSparseLinear, "dense"), "6": (SparseLinear, "dense")}
    for name, (cls, layout) in kinds.items():
        module = loaded.get_submodule(name)
        assert type(module) is cls and set(module.layouts.values()) == {layout}
        for f in module._factor_names:
            assert np.array_equal(module.factor(f).float().numpy(), ref[f"{name}.{f}"])
    assert loaded[6].weight.dtype == torch.bfloat16 and loaded[2].bias is None
    x = torch.from_numpy(ref["x"])
    with torch.no_grad():
        y = loaded[6](loaded[:6](x).to(torch.bfloat16)).float()
    torch.testing.assert_close(y, torch.from_numpy(ref["y"]), rtol=1e-2, atol=1e-2)  # bf16 tail
    # re-saved as version 3: smaller (bitmasks), the same model
    again = tmp_path / "v3.safetensors"
    save_compressed(loaded, again)
    meta3, cfg3, _ = read_file(again)
    assert meta3["format_version"] == "3"
    assert "bitmask" in {s for m in cfg3["modules"] for s in m["storage"].values()}
    assert os.path.getsize(again) < os.path.getsize(path)
    reloaded = load_compressed(v2_dense_model, again).eval()
    assert_same_factors(reloaded, loaded)
    with torch.no_grad():
        assert torch.equal(reloaded[:6](x), loaded[:6](x))


def test_a_version_3_bitmask_file_of_the_first_writer_still_loads(tmp_path):
    """A version-3 file with "bitmask" storage built by hand from the format description (as the
    version-3 writer wrote it before the bitmask-deflate storage existed) loads unchanged."""
    W = torch.zeros(3, 5)
    W[0, 0], W[0, 3], W[1, 4], W[2, 2] = 1.0, 2.0, 3.0, 4.0
    bias = torch.tensor([0.5, -1.0, 2.0])
    tensors = {"0.weight.bitmask": torch.tensor([0b0000_1001, 0b0001_0010], dtype=torch.uint8),
               "0.weight.values": torch.tensor([1.0, 2.0, 3.0, 4.0]), "0.bias": bias}
    module = {"name": "0", **SparseLinear.from_weight(W, bias).get_config(),
              "storage": {"weight": "bitmask"}, "values_dtype": "float32"}
    config = json.dumps({"format_version": 3, "modules": [module], "dense_keys": []})
    sums = {"algorithm": "sha256", "config": hashlib.sha256(config.encode()).hexdigest(),
            "tensors": {k: tensor_digest(t) for k, t in tensors.items()}}
    path = tmp_path / "first_v3.safetensors"
    safetensors_torch.save_file(tensors, str(path), metadata={
        "format": "sparsefact", "format_version": "3", "config": config, "checksums": json.dumps(sums)})
    loaded = load_compressed(nn.Sequential(nn.Linear(5, 3)), path)
    assert torch.equal(loaded[0].factor("weight"), W) and torch.equal(loaded[0].bias, bias)
    # and the storages of that writer still write such a file (no zlib stream)
    save_compressed(loaded, tmp_path / "again.safetensors", storages=("dense", "csr", "bitmask"))
    _meta, cfg, data = read_file(tmp_path / "again.safetensors")
    assert cfg["modules"][0]["storage"] == {"weight": "bitmask"} and not any("deflate" in k for k in data)


# ---------------------------------------------------------------------------- bitmask-deflate
def _pattern(kind: str, shape: tuple[int, int]) -> torch.Tensor:
    """A boolean ``shape`` pattern with some structure (deflate's worst and best cases)."""
    rows, cols = shape
    r = torch.arange(rows).reshape(-1, 1)
    c = torch.arange(cols).reshape(1, -1)
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    patterns = {
        "empty": torch.zeros(shape, dtype=torch.bool),
        "full": torch.ones(shape, dtype=torch.bool),
        "first entry": (r == 0) & (c == 0),
        "last entry": (r == rows - 1) & (c == cols - 1),
        "first row": (r == 0) & (c >= 0),
        "checkerboard": (r + c) % 2 == 0,
        "block diagonal": (r // 4) == (c // 4),
        "2:4 along rows": (c % 4) < 2,
        "empty rows": (r % 3 == 0) & (torch.rand(shape, generator=gen) < 0.5),
        "random 5%": torch.rand(shape, generator=gen) < 0.05,
        "random 95%": torch.rand(shape, generator=gen) < 0.95,
    }
    return patterns[kind].expand(rows, cols).contiguous()


def _factor(pattern: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(pattern.shape, generator=gen) + 0.5
    return torch.where(pattern, values, torch.zeros(()))


PATTERNS = ["empty", "full", "first entry", "last entry", "first row", "checkerboard", "block diagonal",
            "2:4 along rows", "empty rows", "random 5%", "random 95%"]


@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (13, 29), (64, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", PATTERNS)
def test_deflate_round_trip_of_structured_patterns(kind, shape, tmp_path):
    W = _factor(_pattern(kind, shape))
    model = nn.Sequential(SparseLinear.from_weight(W))
    numel, nnz = W.numel(), int(torch.count_nonzero(W))
    for storages in [("bitmask-deflate",), STORAGES]:
        path = tmp_path / "d.safetensors"
        save_compressed(model, path, storages=storages)
        _meta, cfg, data = read_file(path)
        storage = cfg["modules"][0]["storage"]["weight"]
        loaded = load_compressed(nn.Sequential(nn.Linear(shape[1], shape[0], bias=False)), path)
        assert torch.equal(loaded[0].factor("weight"), W)
        row = compression_report(model, storages=storages)[0]
        assert row["storage"] == {"weight": storage}
        assert row["compressed_bytes"] == module_tensor_bytes(data, "0")
        sizes = storage_bytes(nnz, shape, 4, mask=W)
        assert row["compressed_bytes"] == sizes[storage]
        if storages == ("bitmask-deflate",):
            assert storage == "bitmask-deflate"
            stream = data["0.weight.bitmask_deflate"].numpy().tobytes()
            assert len(zlib.decompress(stream)) == math.ceil(numel / 8)
            assert sizes["bitmask-deflate"] == len(stream) + 4 * nnz
        else:
            assert storage == min(STORAGES, key=lambda s: (sizes[s], STORAGES.index(s)))
    # where deflate pays: long runs (empty, a single entry, low density) on masks of some size
    if numel >= 64 * 40 and kind in ("empty", "first entry", "last entry", "first row", "random 5%"):
        assert storage == "bitmask-deflate"
    if kind == "full":
        assert storage == "dense"  # nothing beats the values alone


def test_deflate_is_not_computed_when_it_cannot_win(tmp_path, monkeypatch):
    """A factor whose values alone (+ the shortest zlib stream) exceed another storage skips zlib."""
    import sparsefact.nn_adapters.io as io

    def boom(packed):
        raise AssertionError("deflate computed for a factor it cannot win")

    model = nn.Sequential(SparseLinear.from_weight(_factor(_pattern("full", (16, 12)))))
    monkeypatch.setattr(io, "_deflate", boom)
    save_compressed(model, tmp_path / "full.safetensors")
    assert compression_report(model)[0]["storage"] == {"weight": "dense"}
    # a sparse factor does need it
    model = nn.Sequential(SparseLinear.from_weight(_factor(_pattern("random 5%", (64, 40)))))
    with pytest.raises(AssertionError, match="deflate computed"):
        save_compressed(model, tmp_path / "sparse.safetensors")


def test_deflate_is_taken_only_when_strictly_smaller(tmp_path, monkeypatch):
    """With a stream exactly as long as the bitmask the plain bitmask is kept; one byte less wins."""
    import sparsefact.nn_adapters.io as io

    W = _factor(_pattern("checkerboard", (16, 16)))  # 32 mask bytes, 128 values
    model = nn.Sequential(SparseLinear.from_weight(W))
    real = io._deflate

    def padded(length):
        def deflate(packed):  # the real stream padded to ``length`` bytes (only its length counts here)
            stream = real(packed).numpy().tobytes()
            assert len(stream) <= length
            return torch.frombuffer(bytearray(stream + bytes(length - len(stream))), dtype=torch.uint8)
        return deflate

    for length, want in [(32, "bitmask"), (31, "bitmask-deflate")]:
        monkeypatch.setattr(io, "_deflate", padded(length))
        assert compression_report(model)[0]["storage"] == {"weight": want}
        assert storage_bytes(128, (16, 16), 4, mask=W)["bitmask-deflate"] == length + 4 * 128


def test_storage_bytes_mask_argument():
    W = _factor(_pattern("block diagonal", (13, 29)))
    nnz = int(torch.count_nonzero(W))
    want = storage_bytes(nnz, (13, 29), 4, mask=W)
    assert set(want) == set(STORAGES)
    assert want["bitmask-deflate"] > 4 * nnz + 8
    assert storage_bytes(nnz, (13, 29), 4, mask=W.numpy()) == want
    assert storage_bytes(nnz, (13, 29), 4, mask=W.to_sparse_csr()) == want
    assert storage_bytes(nnz, (13, 29), 4, mask=W != 0) == want
    assert "bitmask-deflate" not in storage_bytes(nnz, (13, 29), 4)
    with pytest.raises(ValueError, match=r"mask has shape \(29, 13\), expected \(13, 29\)"):
        storage_bytes(nnz, (13, 29), 4, mask=W.T)
    with pytest.raises(ValueError, match=f"mask has {nnz} nonzeros, nnz is {nnz + 1}"):
        storage_bytes(nnz + 1, (13, 29), 4, mask=W)


@pytest.mark.filterwarnings("ignore:DoubleSparseFactorization did not converge")
@pytest.mark.parametrize("density", [0.2, 0.3, 0.5])
def test_real_double_sparse_fit_meets_the_goal(density, tmp_path):
    """DoubleSparseLinear from a real DSF fit of a 1536x384 layer with bias: the file is at most
    (d + 0.04) x the dense layer (issue 19, item 2); the plain bitmasks miss it by about 0.002."""
    from sparsefact import DoubleSparseFactorization

    torch.manual_seed(0)
    layer = nn.Linear(384, 1536)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, 384)) @ (np.eye(384) + rng.standard_normal((384, 384)) / np.sqrt(384))
    est = DoubleSparseFactorization(density, max_iter=2, random_state=0).fit(
        layer.weight.detach().numpy(), X.astype(np.float32))
    model = nn.Sequential(DoubleSparseLinear.from_layer(layer, est.get_factors(), layout="dense"))
    path = tmp_path / "dsf.safetensors"
    save_compressed(model, path)
    row = compression_report(model)[0]
    goal = (row["density"] + 0.04) * row["dense_bytes"]
    assert row["storage"] == {"A": "bitmask-deflate", "B": "bitmask-deflate"}
    assert row["compressed_bytes"] <= os.path.getsize(path) <= goal
    _meta, _cfg, data = read_file(path)
    assert row["compressed_bytes"] == module_tensor_bytes(data, "0")
    loaded = load_compressed(nn.Sequential(nn.Linear(384, 1536)), path)
    assert all(torch.equal(loaded[0].factor(f), model[0].factor(f)) for f in "AB")
    save_compressed(model, path, storages=("dense", "csr", "bitmask"))
    assert os.path.getsize(path) > goal


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 48), cols=st.integers(1, 48), density=st.floats(0.0, 1.0),
       kind=st.sampled_from(["random", "rows", "blocks"]), seed=st.integers(0, 2**16),
       storages=st.sampled_from([STORAGES, ("bitmask-deflate",), ("dense", "bitmask-deflate"),
                                 ("csr", "bitmask", "bitmask-deflate")]),
       half=st.booleans())
def test_property_deflate_round_trip_and_size_accounting(tmp_path, rows, cols, density, kind, seed,
                                                         storages, half):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, cols, generator=gen) < density
    if kind == "rows":  # whole rows kept or dropped
        keep = keep[:, :1].expand(rows, cols)
    elif kind == "blocks":  # 4x4 blocks
        keep = keep[::4, ::4].repeat_interleave(4, 0).repeat_interleave(4, 1)[:rows, :cols]
    W = _factor(keep, seed)
    model = nn.Sequential(SparseLinear.from_weight(W))
    path = tmp_path / "p.safetensors"
    values_dtype = torch.float16 if half else None
    save_compressed(model, path, values_dtype=values_dtype, storages=storages)
    loaded = load_compressed(nn.Sequential(nn.Linear(cols, rows, bias=False)), path)
    want = W.to(torch.float16).float() if half else W
    assert torch.equal(loaded[0].factor("weight"), want)
    row = compression_report(model, values_dtype=values_dtype, storages=storages)[0]
    _meta, cfg, data = read_file(path)
    storage = cfg["modules"][0]["storage"]["weight"]
    assert row["storage"] == {"weight": storage} and storage in storages
    assert row["compressed_bytes"] == module_tensor_bytes(data, "0")
    sizes = storage_bytes(int(torch.count_nonzero(want)), (rows, cols), 2 if half else 4, mask=want)
    assert row["compressed_bytes"] == sizes[storage] == min(sizes[s] for s in storages)
    assert storage == next(s for s in STORAGES if s in storages and sizes[s] == sizes[storage])


# ---------------------------------------------------------------------------- corrupted bitmask-deflate files
@pytest.fixture
def deflate_file(tmp_path):
    """:func:`_corruption_model` with every factor a zlib-compressed bitmask."""
    path = tmp_path / "bd.safetensors"
    save_compressed(_corruption_model(), path, storages=("bitmask-deflate",))
    return path


def _mask_bytes(path, key="0.weight.bitmask_deflate") -> bytes:
    return zlib.decompress(read_file(path)[2][key].numpy().tobytes())


def _stream(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _set_bit(mask: bytes, i: int) -> bytes:
    out = bytearray(mask)
    out[i // 8] ^= 1 << (i % 8)
    return bytes(out)


def _preset_dictionary(mask: bytes) -> bytes:
    comp = zlib.compressobj(zdict=b"sparsefact")
    return comp.compress(mask) + comp.flush()


KEY = r"'0\.weight\.bitmask_deflate'"
STREAM_CASES = {
    # name: (new stream from the stored one and its mask, error)
    "not zlib": (lambda s, m: b"not a zlib stream", KEY + " is not a valid zlib stream"),
    "preset dictionary": (lambda s, m: _preset_dictionary(m), KEY + " is not a valid zlib stream"),
    "bad adler-32": (lambda s, m: s[:-1] + bytes([s[-1] ^ 1]), KEY + " is not a valid zlib stream"),
    "empty": (lambda s, m: b"", KEY + r" is a truncated zlib stream \(0 of 5 bytes"),
    "truncated": (lambda s, m: s[:-2], KEY + " is a truncated zlib stream"),
    "trailing bytes": (lambda s, m: s + b"\x00\x00", KEY + " has 2 stray bytes after its zlib stream"),
    "short": (lambda s, m: zlib.compress(m[:-1]), KEY + r" decompresses to 4 bytes, a 5x7 factor needs "
                                                        r"ceil\(35/8\) = 5"),
    "long": (lambda s, m: zlib.compress(m + b"\x00"), KEY + " decompresses to more than the 5 bytes"),
    "bomb": (lambda s, m: zlib.compress(bytes(20_000_000), 9),
             KEY + " decompresses to more than the 5 bytes"),
    "padding bit": (lambda s, m: zlib.compress(_set_bit(m, 39)), KEY + r" has padding bits set beyond "
                                                                    r"rows\*cols = 35"),
    "popcount": (lambda s, m: zlib.compress(_set_bit(m, int(np.flatnonzero(np.unpackbits(
        np.frombuffer(m, np.uint8), bitorder="little"))[0]))), KEY + r" has \d+ bits set but "
                                                                     r"'0\.weight\.values' holds"),
}


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_corrupted_deflate_stream(deflate_file, tmp_path, case):
    make, error = STREAM_CASES[case]
    stream = read_file(deflate_file)[2]["0.weight.bitmask_deflate"].numpy().tobytes()
    new = make(stream, _mask_bytes(deflate_file))
    edit = _edit("0.weight.bitmask_deflate", lambda t: _stream(new))
    with pytest.raises(ValueError, match=error):
        load_compressed(bitmask_factory, rewrite(deflate_file, tmp_path / "v1.sft", tensors=edit))
    # with the checksums kept the checksum names the tensor first
    bad = rewrite(deflate_file, tmp_path / "v3.sft", unsigned=False, tensors=edit)
    with pytest.raises(ValueError, match=r"tensor '0\.weight\.bitmask_deflate' does not match its checksum"):
        load_compressed(bitmask_factory, bad)


def test_deflate_bomb_is_never_expanded(deflate_file, tmp_path, monkeypatch):
    """The loader asks zlib for at most ceil(rows*cols/8) + 1 bytes."""
    import sparsefact.nn_adapters.io as io

    asked = []
    real = zlib.decompressobj

    class Spy:
        def __init__(self, *a):
            self._d = real(*a)

        def decompress(self, data, max_length=0):
            asked.append(max_length)
            return self._d.decompress(data, max_length)

        def __getattr__(self, name):
            return getattr(self._d, name)

    bomb = _edit("0.weight.bitmask_deflate", lambda t: _stream(zlib.compress(bytes(20_000_000), 9)))
    bad = rewrite(deflate_file, tmp_path / "bomb.sft", tensors=bomb)
    monkeypatch.setattr(io.zlib, "decompressobj", Spy)
    with pytest.raises(ValueError, match="decompresses to more than the 5 bytes"):
        load_compressed(bitmask_factory, bad)
    assert asked == [6]


def test_deflate_file_loads_and_checksums_cover_the_streams(deflate_file):
    meta, cfg, data = read_file(deflate_file)
    assert [m["storage"] for m in cfg["modules"]] == [{"weight": "bitmask-deflate"},
                                                      {"A": "bitmask-deflate", "B": "bitmask-deflate"}]
    streams = {k for k in data if k.endswith(".bitmask_deflate")}
    assert streams == {"0.weight.bitmask_deflate", "1.A.bitmask_deflate", "1.B.bitmask_deflate"}
    assert set(json.loads(meta["checksums"])["tensors"]) == set(data)
    loaded = load_compressed(bitmask_factory, deflate_file)
    assert isinstance(loaded[0], SparseLinear) and isinstance(loaded[1], DoubleSparseLinear)


def test_deflate_wrong_tensor_kinds(deflate_file, tmp_path):
    cases = [
        (_edit("1.A.bitmask_deflate", lambda t: t.to(torch.int16)),
         r"'1\.A\.bitmask_deflate' must be a 1-D uint8 tensor, got int16"),
        (_edit("1.A.bitmask_deflate", lambda t: t.reshape(1, -1)),
         r"'1\.A\.bitmask_deflate' must be a 1-D uint8 tensor, got uint8 of shape \(1, \d+\)"),
        (_edit("1.B.values", lambda v: torch.where(torch.arange(v.numel()) == 0, 0.0, v)),
         r"'1\.B\.values' holds a zero under a set bitmask bit"),
        (_edit("1.B.values", lambda v: v[:-1].clone()), r"'1\.B\.bitmask_deflate' has \d+ bits set but"),
        (lambda t: t.pop("1.B.bitmask_deflate"), r"missing tensor '1\.B\.bitmask_deflate'"),
    ]
    for i, (edit, error) in enumerate(cases):
        with pytest.raises(ValueError, match=error):
            load_compressed(bitmask_factory, rewrite(deflate_file, tmp_path / f"{i}.sft", tensors=edit))

    def as_bitmask(meta):  # the config names the plain bitmask: its tensor is missing, the stream stray
        cfg = json.loads(meta["config"])
        cfg["modules"][0]["storage"]["weight"] = "bitmask"
        meta["config"] = json.dumps(cfg)

    with pytest.raises(ValueError, match=r"missing tensor '0\.weight\.bitmask'"):
        load_compressed(bitmask_factory, rewrite(deflate_file, tmp_path / "cfg.sft", metadata=as_bitmask))
