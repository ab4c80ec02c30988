"""Save and load compressed models as one safetensors file (no pickle).

File layout (format ``sparsefact``, version 3)
---------------------------------------------
Tensors, for every replaced module ``<name>`` (any registered module class:
:class:`DoubleSparseLinear`, :class:`SparseLinear`, :class:`LowRankLinear` and their Conv2d
counterparts, or a user's :class:`~sparsefact.nn_adapters.modules._FactorModule` subclass) and
each of its factors ``<f>`` (``A``/``B`` or ``weight``), one of four storages:

- ``"dense"``: ``<name>.<f>``, the ``rows x cols`` factor; ``rows * cols * itemsize`` bytes.
- ``"csr"``: ``<name>.<f>.crow_indices`` (int32, int64 if needed), ``<name>.<f>.col_indices``
  (int16 when the factor has at most 32768 columns, else int32/int64) and ``<name>.<f>.values``;
  ``nnz * (itemsize + col_itemsize) + (rows + 1) * crow_itemsize`` bytes.
- ``"bitmask"``: ``<name>.<f>.bitmask``, a 1-D ``uint8`` tensor of ``ceil(rows * cols / 8)``
  bytes, one bit per entry of the factor in row-major (C) order, **little-endian within a byte**
  (entry ``i = r * cols + c`` is bit ``i % 8``, value ``1 << (i % 8)``, of byte ``i // 8``, as
  ``numpy.packbits(..., bitorder="little")`` writes it; the padding bits of the last byte are
  zero), and ``<name>.<f>.values``, the nonzero entries in the same row-major order (so the
  popcount of the mask is the number of values); ``ceil(rows * cols / 8) + nnz * itemsize``
  bytes. This is the "sparse bitmask" idea of compressed-tensors (Neural Magic); it is smaller
  than CSR whenever a factor keeps more than about 1/16 of its entries (float32 values, int16
  column indices), and smaller than dense below about 31/32 (float32).
- ``"bitmask-deflate"``: ``<name>.<f>.bitmask_deflate``, a 1-D ``uint8`` tensor holding the
  bytes of the ``"bitmask"`` storage's mask compressed by the standard library's :mod:`zlib`
  (a zlib stream, RFC 1950: deflate with a 2-byte header and an Adler-32 trailer; written with
  level :data:`DEFLATE_LEVEL` = 9, ``memLevel`` 9, window ``2**15``, strategy
  ``Z_HUFFMAN_ONLY``), and ``<name>.<f>.values`` as for ``"bitmask"``; ``len(stream) + nnz *
  itemsize`` bytes. A DSF factor's mask is close to a sequence of independent bits of the
  factor's density ``p``: it holds about ``H(p) = -p log2 p - (1-p) log2 (1-p)`` bits per entry,
  not 1, and deflate's Huffman coding of the mask bytes (without LZ77 matches, which find
  nothing in such masks and only cost bits) comes within about 1 % of that bound. Measured on
  the factors of real DSF fits (1536x384, 384x384 and 384x1536 layers, densities 0.1 to 0.7,
  ``benchmarks/bench_file_size.py``): from 0.24 of the plain mask (factor density 0.03) to
  0.99 (density 0.44). Rice coding of the gaps between set bits (the best parameter per
  factor), the simpler alternative, was measured on the same factors: 0.5 to 12 % smaller
  than deflate at factor densities up to 0.16, but larger from 0.24 up (the densities where
  the bound is tight: 59335 against 58879 bytes at 0.24, 73728 against 73303 at 0.44) and no
  compression at all from 1/2 up; deflate is kept (and is a decoder that already exists,
  with its own integrity check). The size depends on the pattern (and could in principle
  depend on the zlib build), not only on ``nnz``: it is measured by compressing the mask at
  save time. The loader reads any valid zlib stream.

``itemsize`` is that of the stored values: the module's dtype, or ``values_dtype`` when
:func:`save_compressed` was given one. For each factor :func:`save_compressed` computes the
exact byte count of every candidate storage (:data:`STORAGES`) and keeps the smallest; a tie goes
to the first in the order ``dense``, ``csr``, ``bitmask``, ``bitmask-deflate`` (so the
compressed mask is written only when it is strictly smaller; it is not even computed when the
values alone plus the shortest zlib stream, 8 bytes, cannot beat another storage). The on-disk
form does not depend on the runtime layout, so the file size reflects sparsity: with float32
values and plain bitmasks a ``SparseLinear`` at density ``d`` takes ``d + 1/32`` of its dense
bytes (plus its bias), a ``DoubleSparseLinear`` with the full inner dimension ``k = min(m, n)``
takes ``d + (m + n) / (32 max(m, n))`` (its two masks have ``k (m + n)`` bits); the compressed
masks take about ``H(p)`` of that, e.g. ``d + 0.0374`` instead of ``d + 0.0391`` for a 1536x384
DSF at ``d = 0.5``. A square DSF (``k (m + n) = 2 m n`` mask bits, 1/16 of the dense float32
bytes) needs its masks compressed to 0.64 of a bit per entry to stay within ``d + 0.04``.

- ``<name>.bias`` if the module has a bias (always in the module's dtype).

and every other entry of the model's ``state_dict()`` (untouched dense parameters and persistent
buffers) under its own key. The safetensors metadata holds ``format``, ``format_version``,
``config``, a JSON object::

    {"format_version": 3,
     "modules": [{"name", "class", "dtype", "bias", "layouts": {f: "csr"|"dense"},
                  "storage": {f: "csr"|"dense"|"bitmask"|"bitmask-deflate"},
                  "values_dtype": <dtype name>,
                  "shapes": {f: [rows, cols]},
                  + "in_features"/"out_features"/"inner_features" or the conv geometry}],
     "dense_keys": [...]}

and ``checksums``, a JSON object ``{"algorithm": "sha256", "config": <hex>, "tensors": {key:
<hex>}}``: the SHA-256 of the ``config`` string and, for every tensor (the bitmasks and zlib
streams included), of its dtype, shape and bytes (:func:`tensor_digest`).

Each module entry is ``{"name": ..., **module.get_config(), "storage": ..., "values_dtype":
...}``: the module class describes itself
(:meth:`~sparsefact.nn_adapters.modules._FactorModule.get_config`) and rebuilds itself
(``from_config``, ``check_original``); this file has no per-class code. ``values_dtype`` is the
dtype of the stored factor values (``dtype`` itself for a lossless file); the loader casts them
back to ``dtype``.

``load_compressed(model_or_factory, path)`` verifies the checksums before anything is built
(any changed byte of a tensor, of its dtype or shape, or of the config raises ``ValueError``
naming it), builds the dense model, replaces the modules named in the config (with their
recorded runtime layouts) and loads every tensor; any inconsistency between the file and the
model raises ``ValueError`` naming it. Independently of the checksums every file is checked for
structure: CSR arrays form a valid matrix (row pointer from 0 to nnz and non-decreasing, column
indices in range and strictly increasing within each row), a bitmask has ``ceil(rows * cols /
8)`` bytes, zero padding bits and as many set bits as there are values, which are all nonzero;
a zlib stream decompresses without error (header, deflate data and Adler-32 valid, no preset
dictionary, no bytes after its end) to exactly ``ceil(rows * cols / 8)`` bytes, which are then
checked as a bitmask; at most ``ceil(rows * cols / 8) + 1`` bytes are ever decompressed, so a
stream that would expand to more (a decompression bomb) is refused without being expanded;
factor and bias values are finite and of the config's dtype (``values_dtype`` for the factors),
and every tensor of the file is used by the config (a bias the config says is absent, or any
other stray tensor, is an error), so a corrupted file never loads silently and never surfaces as
a raw torch ``RuntimeError``.

Older versions still load. Version-3 files written before the ``bitmask-deflate`` storage
existed (``storage`` ``dense``/``csr``/``bitmask``) are version-3 files like any other;
``storages=("dense", "csr", "bitmask")`` still writes such a file. Version 2 files (CSR or
dense storage, checksums, no ``values_dtype``: the values are in the module's dtype) need
nothing else. Version 1 (the first
files, no ``checksums``) has the same keys and config as version 2; for such a file the
structural checks above are all that is verified: a changed value that stays finite (a dense
weight, a CSR value, a buffer) or a changed config number that stays consistent (a stride, a
padding) is not detected.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .modules import (
    _FactorModule,
    _index_bytes,
    module_class,
    replace_module,
)

__all__ = ["FORMAT_VERSION", "STORAGES", "compression_report", "factor_storage", "load_compressed",
           "save_compressed", "storage_bytes", "tensor_digest"]

FORMAT = "sparsefact"
#: version written by :func:`save_compressed`; 2 added the ``checksums`` metadata, 3 the
#: ``bitmask`` storage and ``values_dtype``.
FORMAT_VERSION = 3
#: versions :func:`load_compressed` reads (1: no checksums, structural checks only).
READABLE_VERSIONS = (1, 2, 3)
CHECKSUM_ALGORITHM = "sha256"
#: the storages of a factor, in the order that breaks a tie of byte counts.
STORAGES = ("dense", "csr", "bitmask", "bitmask-deflate")
#: zlib settings of the ``bitmask-deflate`` storage: ``zlib.compressobj(DEFLATE_LEVEL, DEFLATED,
#: DEFLATE_WBITS, DEFLATE_MEMLEVEL, DEFLATE_STRATEGY)``, a zlib-wrapped (RFC 1950, Adler-32)
#: deflate stream; the loader reads any valid zlib stream whatever its settings.
DEFLATE_LEVEL = 9
DEFLATE_WBITS = 15
DEFLATE_MEMLEVEL = 9
DEFLATE_STRATEGY = zlib.Z_HUFFMAN_ONLY
#: bytes of the shortest zlib stream (2 header bytes, an empty final block, the Adler-32).
_ZLIB_MIN_BYTES = 8
#: dtypes ``values_dtype`` may name (besides the module's own dtype, which is lossless).
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _compressed_modules(model: nn.Module) -> list[tuple[str, _FactorModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _FactorModule)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------- storage choice
def _deflate(packed: torch.Tensor) -> torch.Tensor:
    """The zlib stream (1-D uint8 tensor) of a packed bitmask, with the fixed settings of the module."""
    comp = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, DEFLATE_WBITS, DEFLATE_MEMLEVEL, DEFLATE_STRATEGY)
    data = comp.compress(packed.numpy().tobytes()) + comp.flush()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _pattern(mask: Any, shape: tuple[int, int]) -> torch.Tensor:
    """The flat row-major indices (int64) of the nonzeros of ``mask`` (an array or tensor of ``shape``)."""
    if isinstance(mask, torch.Tensor):
        t = mask.detach().cpu()
        t = t.to_dense() if t.layout is not torch.strided else t
    else:
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(mask)))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return torch.nonzero(t.reshape(-1) != 0).reshape(-1)


def storage_bytes(nnz: int, shape: tuple[int, int], itemsize: int, mask: Any = None) -> dict[str, int]:
    """Exact bytes of one factor's tensors in each storage of :data:`STORAGES`.

    Parameters
    ----------
    nnz : int
        Nonzero entries of the factor.
    shape : tuple of int
        ``(rows, cols)``.
    itemsize : int
        Bytes per stored value (2 for ``values_dtype=float16``).
    mask : array-like or torch.Tensor, optional
        The factor itself, or any ``rows x cols`` array with the same nonzero pattern (NumPy,
        dense or CSR torch). The size of ``"bitmask-deflate"`` depends on the pattern, not only
        on ``nnz``: it is in the result only when ``mask`` is given (its mask is then packed and
        compressed, exactly as :func:`save_compressed` does).

    Returns
    -------
    dict
        ``{"dense": rows*cols*itemsize, "csr": nnz*(itemsize+col) + (rows+1)*crow,
        "bitmask": ceil(rows*cols/8) + nnz*itemsize}`` (``col``/``crow``: the index itemsizes the
        file uses, int16 columns up to 32768 columns, int32 row pointers), and with ``mask``
        ``"bitmask-deflate": len(zlib stream of the bitmask) + nnz*itemsize``.

    Raises
    ------
    ValueError
        ``mask`` has another shape, or another number of nonzeros than ``nnz``.
    """
    rows, cols = int(shape[0]), int(shape[1])
    crow, col = _index_bytes(nnz, (rows, cols))
    sizes = {
        "dense": rows * cols * itemsize,
        "csr": nnz * (itemsize + col) + (rows + 1) * crow,
        "bitmask": -(-rows * cols // 8) + nnz * itemsize,
    }
    if mask is not None:
        flat = _pattern(mask, (rows, cols))
        if flat.numel() != nnz:
            raise ValueError(f"mask has {flat.numel()} nonzeros, nnz is {nnz}")
        sizes["bitmask-deflate"] = _deflate(_pack_bits(flat, rows * cols)).numel() + nnz * itemsize
    return sizes


def _check_storages(storages: Sequence[str]) -> tuple[str, ...]:
    if isinstance(storages, str) or not isinstance(storages, Sequence | set | frozenset):
        raise TypeError(f"storages must be a sequence of storage names, got {storages!r}")
    unknown = [s for s in storages if s not in STORAGES]
    if unknown or not storages:
        raise ValueError(f"storages must be a non-empty subset of {STORAGES}, got {tuple(storages)!r}")
    return tuple(s for s in STORAGES if s in storages)  # the tie order is fixed


def _choose_storage(sizes: Mapping[str, int], storages: tuple[str, ...]) -> tuple[str, int]:
    """The smallest of ``storages`` by ``sizes`` (first in :data:`STORAGES` order on a tie) and its bytes."""
    best = min((s for s in storages if s in sizes), key=lambda s: (sizes[s], STORAGES.index(s)))
    return best, sizes[best]


def _resolve_values_dtype(values_dtype: Any) -> torch.dtype | None:
    """``None``, or the torch dtype named by ``values_dtype`` (float16 / bfloat16)."""
    if values_dtype is None:
        return None
    if isinstance(values_dtype, str):
        if values_dtype not in VALUE_DTYPES:
            raise ValueError(f"values_dtype must be None, 'float16' or 'bfloat16' (or the torch dtype), "
                             f"got {values_dtype!r}")
        return VALUE_DTYPES[values_dtype]
    if isinstance(values_dtype, torch.dtype):
        if values_dtype not in VALUE_DTYPES.values():
            raise ValueError(f"values_dtype must be None, torch.float16 or torch.bfloat16, "
                             f"got {values_dtype}")
        return values_dtype
    raise TypeError(f"values_dtype must be None, a torch dtype or a string, "
                    f"got {type(values_dtype).__name__}")


# ---------------------------------------------------------------------------- report
def compression_report(model: nn.Module, *, values_dtype: Any = None,
                       storages: Sequence[str] = STORAGES) -> list[dict[str, Any]]:
    """Per compressed module: name, class, nnz, density, dense bytes, compressed bytes, ratio, storage.

    Parameters
    ----------
    model : nn.Module
        The model with some modules replaced by sparse ones.
    values_dtype, storages
        As for :func:`save_compressed`: the report counts what that call writes.

    Returns
    -------
    list of dict
        ``dense_bytes`` is the equivalent dense layer (weight + bias) in the module's dtype and
        ``compressed_bytes`` the exact bytes of the tensors :func:`save_compressed` writes for
        it (each factor in its chosen ``storage``, and the bias; not the file's JSON header):
        the masks are packed and compressed as when saving, so the report costs about as much
        time as the save.
        ``density`` is ``nnz`` over the entries of the dense weight. A last row named
        ``"total"`` sums the modules.
    """
    vd = _resolve_values_dtype(values_dtype)
    allowed = _check_storages(storages)
    rows = []
    for name, module in _compressed_modules(model):
        numel = math.prod(module._dense_weight_shape())
        comp = module._bias_bytes()
        chosen = {}
        for f in module._factor_names:
            chosen[f], size = _chosen_size(getattr(module, f), vd or module._dtype, allowed, f"{name}.{f}")
            comp += size
        rows.append({
            "name": name,
            "class": type(module).__name__,
            "nnz": module.nnz,
            "density": module.nnz / numel if numel else float("nan"),
            "dense_bytes": module.dense_bytes,
            "compressed_bytes": comp,
            "ratio": comp / module.dense_bytes if module.dense_bytes else float("nan"),
            "storage": chosen,
        })
    dense = sum(r["dense_bytes"] for r in rows)
    comp = sum(r["compressed_bytes"] for r in rows)
    rows.append({"name": "total", "class": "", "nnz": sum(r["nnz"] for r in rows),
                 "density": float("nan"), "dense_bytes": dense, "compressed_bytes": comp,
                 "ratio": comp / dense if dense else float("nan"), "storage": {}})
    return rows


# ---------------------------------------------------------------------------- checksums
def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of a dense tensor's dtype, shape and bytes (C order, as safetensors stores them).

    Parameters
    ----------
    tensor : torch.Tensor
        A dense (strided) tensor of any dtype; it is copied to the CPU if needed.

    Returns
    -------
    str
        64 hex digits; the dtype and shape are part of the digest, so a tensor whose bytes are
        read as another dtype or shape has another digest.
    """
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256()
    h.update(f"{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
    flat = t.reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _default_file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` gives a new file."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the only portable way to read it; restored at once
    os.umask(mask)
    return 0o666 & ~mask

# ---------------------------------------------------------------------------- save
@dataclass
class _Entries:
    """A factor's nonzeros in row-major order: flat indices ``r * cols + c`` (int64) and values."""

    shape: tuple[int, int]
    flat: torch.Tensor
    values: torch.Tensor
    dense: torch.Tensor | None = None  # the dense factor in the values' dtype, when at hand

    def to_dense(self) -> torch.Tensor:
        if self.dense is None:
            rows, cols = self.shape
            out = torch.zeros(rows * cols, dtype=self.values.dtype)
            out[self.flat] = self.values
            self.dense = out.reshape(rows, cols)
        return self.dense


def _entries(W: torch.Tensor, vdtype: torch.dtype, what: str, *, check_overflow: bool = True) -> _Entries:
    """The nonzeros of factor ``W`` (dense or CSR) with values rounded to ``vdtype``.

    An entry that rounds to zero leaves the pattern; one that overflows to infinity is an error
    (unless ``check_overflow`` is false: :func:`compression_report` counts it as a nonzero).
    """
    W = W.detach().cpu()
    rows, cols = (int(s) for s in W.shape)
    dense = None
    if W.layout is torch.sparse_csr:
        crow, col = W.crow_indices().to(torch.int64), W.col_indices().to(torch.int64)
        source = W.values()
        row = torch.repeat_interleave(torch.arange(rows, dtype=torch.int64), crow.diff())
        flat = row * cols + col
        if flat.numel() > 1 and bool((flat[1:] <= flat[:-1]).any()):  # unsorted CSR: sort (no duplicates)
            flat, order = torch.sort(flat, stable=True)
            source = source[order]
        values = source.to(vdtype)
    else:
        source = W.contiguous()
        dense = source.to(vdtype)
        flat = torch.nonzero(dense.reshape(-1)).reshape(-1)
        values = dense.reshape(-1)[flat]
        source = source.reshape(-1)[flat]
    if check_overflow and vdtype != W.dtype:
        bad = ~torch.isfinite(values) & torch.isfinite(source)
        if bool(bad.any()):
            biggest = float(source[bad].abs().max())
            raise ValueError(f"values_dtype={_dtype_name(vdtype)} cannot hold factor {what}: an entry of "
                             f"magnitude {biggest:.4g} overflows to infinity (leave values_dtype=None, "
                             "or rescale)")
    keep = values != 0  # explicit zeros of a CSR factor, and values rounded to zero, leave the pattern
    if not bool(keep.all()):
        flat, values = flat[keep], values[keep]
    return _Entries((rows, cols), flat.contiguous(), values.contiguous().clone(), dense)


def _pack_bits(flat: torch.Tensor, numel: int) -> torch.Tensor:
    """``ceil(numel / 8)`` uint8 bytes: bit ``i % 8`` of byte ``i // 8`` is set for each ``i`` in ``flat``."""
    bits = np.zeros(numel, dtype=bool)
    bits[flat.numpy()] = True
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


@dataclass
class _Plan:
    """A factor's storage: the chosen one, the byte counts of the candidates, what it needs to write."""

    storage: str
    sizes: dict[str, int]
    entries: _Entries
    packed: torch.Tensor | None  # the bitmask, when a bitmask storage is allowed
    deflated: torch.Tensor | None  # its zlib stream, when it was worth computing


def _plan_factor(W: torch.Tensor, vdtype: torch.dtype, storages: tuple[str, ...], what: str, *,
                 check_overflow: bool = True) -> _Plan:
    """The storage :func:`save_compressed` gives factor ``W`` (values in ``vdtype``) and its exact bytes.

    The ``bitmask-deflate`` size is that of the actual zlib stream; it is computed only when it
    could be strictly smaller than every other allowed storage (its values alone, plus the
    shortest zlib stream, must be below them), so a factor kept dense never pays the compression.
    """
    entries = _entries(W, vdtype, repr(what), check_overflow=check_overflow)
    rows, cols = entries.shape
    nnz = int(entries.values.numel())
    itemsize = entries.values.element_size()
    sizes = storage_bytes(nnz, (rows, cols), itemsize)
    packed = deflated = None
    if "bitmask" in storages or "bitmask-deflate" in storages:
        packed = _pack_bits(entries.flat, rows * cols)
    if "bitmask-deflate" in storages:
        others = [sizes[s] for s in storages if s != "bitmask-deflate"]
        if not others or min(others) > nnz * itemsize + _ZLIB_MIN_BYTES:
            deflated = _deflate(packed)
            sizes["bitmask-deflate"] = deflated.numel() + nnz * itemsize
    storage, _ = _choose_storage(sizes, storages)
    return _Plan(storage, sizes, entries, packed, deflated)


def factor_storage(W: torch.Tensor, values_dtype: Any = None, storages: Sequence[str] = STORAGES,
                   name: str = "factor") -> tuple[str, int]:
    """``(storage, bytes)`` that :func:`save_compressed` writes for one factor ``W``.

    The storage is the smallest of ``storages`` for ``W``'s pattern (exact bytes, the deflated
    bitmask included); values in ``values_dtype`` (``None``: ``W``'s dtype; ``"float16"`` or
    ``"bfloat16"`` as for :func:`save_compressed`). The modules' ``compressed_bytes``.
    """
    vd = _resolve_values_dtype(values_dtype)
    return _chosen_size(W, vd or W.dtype, _check_storages(storages), name)


def _chosen_size(
    W: torch.Tensor, vdtype: torch.dtype, storages: tuple[str, ...], what: str
) -> tuple[str, int]:
    """``(storage, bytes)`` of :func:`_plan_factor` for a report (values never overflow-checked)."""
    plan = _plan_factor(W, vdtype, storages, what, check_overflow=False)
    return plan.storage, plan.sizes[plan.storage]


def _factor_tensors(key: str, W: torch.Tensor, vdtype: torch.dtype,
                    storages: tuple[str, ...]) -> tuple[str, dict[str, torch.Tensor]]:
    plan = _plan_factor(W, vdtype, storages, key)
    entries, storage = plan.entries, plan.storage
    rows, cols = entries.shape
    nnz = int(entries.values.numel())
    if storage == "dense":
        return storage, {key: entries.to_dense().contiguous().clone()}
    if storage == "bitmask":
        return storage, {f"{key}.bitmask": plan.packed, f"{key}.values": entries.values}
    if storage == "bitmask-deflate":
        return storage, {f"{key}.bitmask_deflate": plan.deflated, f"{key}.values": entries.values}
    by_size = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    crow_bytes, col_bytes = _index_bytes(nnz, (rows, cols))
    row = entries.flat // cols if cols else entries.flat
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=rows), 0)
    return storage, {
        f"{key}.crow_indices": crow.to(by_size[crow_bytes]).contiguous(),
        f"{key}.col_indices": (entries.flat - row * cols).to(by_size[col_bytes]).contiguous(),
        f"{key}.values": entries.values,
    }


def save_compressed(model: nn.Module, path: str | os.PathLike, *, values_dtype: Any = None,
                    storages: Sequence[str] = STORAGES) -> None:
    """Write ``model`` (with some modules replaced by sparse ones) to one ``.safetensors`` file.

    Parameters
    ----------
    model : nn.Module
        The model; its :class:`~sparsefact.nn_adapters.modules._FactorModule` submodules are
        stored in compact form, every other ``state_dict`` entry as it is.
    path : str or path-like
        The file (replaced if it exists). It gets the mode a new file of the process gets
        (``0o666`` less the umask).
    values_dtype : None, torch.float16, torch.bfloat16, "float16" or "bfloat16"
        ``None`` (default): the factor values are stored in each module's dtype, the file is
        lossless. Otherwise the factor values are stored in that dtype, which halves their bytes
        (for float32 modules): this is **lossy** (unless it is the module's own dtype), every
        value is rounded to the nearest ``values_dtype`` number (round to nearest even, as
        ``tensor.to(values_dtype)``), and :func:`load_compressed` casts the rounded values back
        to the module's dtype, so the loaded factors are exactly
        ``W.to(values_dtype).to(W.dtype)``. An entry that rounds to zero leaves the sparsity
        pattern; an entry that rounds to infinity (float16: magnitude 65520 and above) is a
        ``ValueError``. Only the factors are rounded: biases
        (``out`` numbers per layer, negligible bytes) and the dense parameters and buffers
        outside the sparse modules (which the compression did not touch, e.g. embeddings or norm
        weights) are stored exactly; cast the model itself to store those in half precision.
    storages : sequence of str
        The storages a factor may take, a non-empty subset of :data:`STORAGES` (default: all).
        Each factor takes the smallest of them by exact byte count (:func:`storage_bytes`;
        for ``bitmask-deflate`` the length of the actual zlib stream of its mask), the first of
        ``dense``, ``csr``, ``bitmask``, ``bitmask-deflate`` on a tie. ``("dense", "csr")``
        writes a file that needs no bitmask reader, ``("dense", "csr", "bitmask")`` one that
        needs no zlib (still format version 3).

    Raises
    ------
    TypeError, ValueError
        An unsupported ``values_dtype`` or ``storages``; a factor value that overflows
        ``values_dtype``; a root module that is itself compressed; a ``state_dict`` key that
        collides with a compressed tensor's name or is not a dense tensor.

    Notes
    -----
    The file is format version :data:`FORMAT_VERSION`: the metadata holds a SHA-256 checksum
    of the config and of every tensor, which :func:`load_compressed` verifies.
    :func:`compression_report` with the same ``values_dtype`` and ``storages`` gives the bytes
    of each module's tensors.
    """
    from safetensors.torch import save_file

    vd = _resolve_values_dtype(values_dtype)
    allowed = _check_storages(storages)
    tensors: dict[str, torch.Tensor] = {}
    modules_cfg = []
    names = []
    for name, module in _compressed_modules(model):
        if not name:
            raise ValueError("the root module itself is a compressed module; wrap it in a container")
        cfg = {"name": name, **module.get_config()}
        module_vd = vd or module._dtype
        cfg["storage"] = {}
        cfg["values_dtype"] = _dtype_name(module_vd)
        for f in module._factor_names:
            storage, parts = _factor_tensors(f"{name}.{f}", getattr(module, f), module_vd, allowed)
            cfg["storage"][f] = storage
            tensors.update(parts)
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().cpu().contiguous().clone()
        modules_cfg.append(cfg)
        names.append(name)
    dense_keys = []
    for key, value in model.state_dict().items():
        if any(key.startswith(n + ".") for n in names):
            continue
        if key in tensors:
            raise ValueError(f"state_dict key {key!r} collides with a compressed tensor name")
        if value.layout is not torch.strided:
            raise ValueError(f"state_dict entry {key!r} has layout {value.layout}; only dense tensors "
                             "outside sparsefact modules can be saved")
        tensors[key] = value.detach().cpu().contiguous().clone()
        dense_keys.append(key)
    config_text = json.dumps({"format_version": FORMAT_VERSION, "modules": modules_cfg,
                              "dense_keys": dense_keys})
    checksums = {"algorithm": CHECKSUM_ALGORITHM, "config": _text_digest(config_text),
                 "tensors": {key: tensor_digest(t) for key, t in tensors.items()}}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": config_text,
                "checksums": json.dumps(checksums)}
    p = os.fspath(path)
    save_file(tensors, p, metadata=metadata)
    # safetensors writes through a private temporary file (mode 0600): give the file the mode
    # any new file of this process gets
    os.chmod(p, _default_file_mode())


# ---------------------------------------------------------------------------- load
def _verify_checksums(p: str, meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Compare the ``checksums`` metadata with the config string and every tensor; ``ValueError`` if not."""
    try:
        sums = json.loads(meta["checksums"])
    except ValueError as exc:
        raise ValueError(f"{p}: corrupted checksums in the metadata: {exc}") from exc
    if not (isinstance(sums, dict) and isinstance(sums.get("tensors"), dict)
            and isinstance(sums.get("config"), str)):
        raise ValueError(f"{p}: corrupted checksums in the metadata (expected 'config' and 'tensors')")
    if sums.get("algorithm") != CHECKSUM_ALGORITHM:
        raise ValueError(f"{p}: unknown checksum algorithm {sums.get('algorithm')!r}")
    if _text_digest(meta.get("config", "")) != sums["config"]:
        raise ValueError(f"{p}: the config in the metadata does not match its checksum (corrupted file)")
    listed = sums["tensors"]
    for key in tensors:
        if key not in listed:
            raise ValueError(f"{p}: tensor {key!r} has no checksum (corrupted or foreign file)")
    for key, digest in listed.items():
        if key not in tensors:
            raise ValueError(f"{p}: missing tensor {key!r} (listed in the checksums)")
        if tensor_digest(tensors[key]) != digest:
            raise ValueError(f"{p}: tensor {key!r} does not match its checksum: the file is corrupted")


def _open(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config and tensors of a sparsefact file, its checksums verified (format version 2 and later)."""
    from safetensors.torch import load

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(p)
    with open(p, "rb") as fh:
        raw = fh.read()
    try:
        tensors = load(raw)
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise ValueError(
            f"{p}: not a readable safetensors file (truncated or corrupted header): {exc}"
        ) from exc
    # metadata is in the JSON header: 8-byte little-endian length, then the header
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8:8 + n])
    except (ValueError, UnicodeDecodeError) as exc:  # pragma: no cover - load() checked it already
        raise ValueError(f"{p}: corrupted safetensors header: {exc}") from exc
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p}: not a sparsefact file (metadata format={meta.get('format')!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError as exc:
        raise ValueError(f"{p}: bad format_version {meta.get('format_version')!r}") from exc
    if version > FORMAT_VERSION:
        raise ValueError(f"{p}: format_version {version} is newer than supported ({FORMAT_VERSION})")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{p}: unsupported format_version {version} (readable: {READABLE_VERSIONS})")
    if "checksums" in meta:
        _verify_checksums(p, meta, tensors)
    elif version >= 2:
        raise ValueError(f"{p}: format_version {version} file without checksums (corrupted metadata)")
    try:
        config = json.loads(meta["config"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{p}: missing or invalid JSON config in the metadata: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("modules"), list) \
            or not isinstance(config.get("dense_keys"), list):
        raise ValueError(f"{p}: config must hold 'modules' and 'dense_keys' lists")
    return config, tensors


class _Tensors:
    """The file's tensors; remembers which were taken, so that stray ones can be reported."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def take(self, key: str) -> torch.Tensor:
        if key not in self._tensors:
            raise ValueError(f"missing tensor {key!r} in the file")
        self.used.add(key)
        return self._tensors[key]

    def unused(self) -> list[str]:
        return sorted(set(self._tensors) - self.used)


def _check_values(key: str, values: torch.Tensor, dtype: torch.dtype) -> None:
    if values.dtype != dtype:
        raise ValueError(f"tensor {key!r} is {str(values.dtype).removeprefix('torch.')}, the config says "
                         f"{str(dtype).removeprefix('torch.')}")
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"tensor {key!r} holds NaN or infinite values (corrupted file)")


def _check_csr(key: str, crow: torch.Tensor, col: torch.Tensor, nnz: int, cols: int) -> None:
    """``ValueError`` unless ``crow``/``col`` (int64) form a canonical CSR pattern of ``nnz`` entries."""
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow[1:] < crow[:-1]).any()):
        raise ValueError(f"{key}.crow_indices is not a valid CSR row pointer for {nnz} values "
                         "(must rise from 0 to nnz)")
    if nnz == 0:
        return
    if int(col.min()) < 0 or int(col.max()) >= cols:
        raise ValueError(f"{key}.col_indices out of range for {cols} columns")
    starts = crow[:-1]
    row_start = torch.zeros(nnz, dtype=torch.bool)
    row_start[starts[starts < nnz]] = True  # entry i opens a row: no predecessor to compare with
    if bool((~row_start[1:] & (col[1:] <= col[:-1])).any()):
        raise ValueError(f"{key}.col_indices are not strictly increasing within each row "
                         "(unsorted or duplicate entries)")


def _inflate(name: str, stream: torch.Tensor, nbytes: int, rows: int, cols: int) -> np.ndarray:
    """The ``nbytes`` bytes of the bitmask that zlib ``stream`` (tensor ``name``) holds, or ``ValueError``.

    At most ``nbytes + 1`` bytes are ever decompressed (a decompression bomb is refused after
    that many bytes, whatever it would expand to).
    """
    inflater = zlib.decompressobj(DEFLATE_WBITS)
    try:
        out = inflater.decompress(stream.numpy().tobytes(), nbytes + 1)
    except zlib.error as exc:
        raise ValueError(f"tensor {name!r} is not a valid zlib stream ({exc}; corrupted file)") from exc
    if len(out) > nbytes:
        raise ValueError(f"tensor {name!r} decompresses to more than the {nbytes} bytes of a {rows}x{cols} "
                         "bitmask (corrupted file)")
    if not inflater.eof:
        raise ValueError(f"tensor {name!r} is a truncated zlib stream ({len(out)} of {nbytes} bytes; "
                         "corrupted file)")
    if inflater.unused_data:
        raise ValueError(f"tensor {name!r} has {len(inflater.unused_data)} stray bytes after its zlib stream "
                         "(corrupted file)")
    if len(out) != nbytes:
        raise ValueError(f"tensor {name!r} decompresses to {len(out)} bytes, a {rows}x{cols} factor needs "
                         f"ceil({rows * cols}/8) = {nbytes}")
    return np.frombuffer(out, dtype=np.uint8)


def _read_bitmask(tensors: _Tensors, key: str, rows: int, cols: int, vdtype: torch.dtype, *,
                  deflated: bool = False) -> torch.Tensor:
    """The dense ``rows x cols`` factor (in ``vdtype``) of a ``bitmask`` (or ``bitmask-deflate``) storage.

    Its structure is checked: the mask's length (after decompression), zero padding bits, a
    popcount equal to the number of values, nonzero finite values of dtype ``vdtype``.
    """
    name = f"{key}.bitmask_deflate" if deflated else f"{key}.bitmask"
    mask = tensors.take(name)
    val = tensors.take(f"{key}.values")
    numel = rows * cols
    nbytes = -(-numel // 8)
    if mask.dtype != torch.uint8 or mask.ndim != 1:
        raise ValueError(f"tensor {name!r} must be a 1-D uint8 tensor, got "
                         f"{_dtype_name(mask.dtype)} of shape {tuple(mask.shape)}")
    if not deflated and mask.numel() != nbytes:
        raise ValueError(f"tensor {name!r} has {mask.numel()} bytes, a {rows}x{cols} factor "
                         f"needs ceil({numel}/8) = {nbytes}")
    if val.ndim != 1:
        raise ValueError(f"tensor {key + '.values'!r} must be 1-D, got shape {tuple(val.shape)}")
    _check_values(f"{key}.values", val, vdtype)
    packed = _inflate(name, mask, nbytes, rows, cols) if deflated else mask.numpy()
    bits = np.unpackbits(packed, bitorder="little").view(bool)
    if bool(bits[numel:].any()):
        raise ValueError(f"tensor {name!r} has padding bits set beyond rows*cols = {numel} "
                         "(corrupted file)")
    bits = bits[:numel]
    count = int(np.count_nonzero(bits))
    if count != val.numel():
        raise ValueError(f"tensor {name!r} has {count} bits set but {key + '.values'!r} holds "
                         f"{val.numel()} values (corrupted file)")
    if val.numel() and not bool((val != 0).all()):
        raise ValueError(f"tensor {key + '.values'!r} holds a zero under a set bitmask bit (corrupted file)")
    W = torch.zeros(numel, dtype=vdtype)
    W[torch.from_numpy(bits)] = val
    return W.reshape(rows, cols)


def _read_factor(tensors: _Tensors, key: str, storage: str, shape: Iterable[int],
                 dtype: torch.dtype, vdtype: torch.dtype | None = None) -> torch.Tensor:
    """Factor ``key`` in the module's ``dtype``, read from values stored in ``vdtype`` (default ``dtype``)."""
    rows, cols = (int(s) for s in shape)
    vdtype = dtype if vdtype is None else vdtype
    if storage == "dense":
        W = tensors.take(key)
        if tuple(W.shape) != (rows, cols):
            raise ValueError(f"tensor {key!r} has shape {tuple(W.shape)}, config says {(rows, cols)}")
        _check_values(key, W, vdtype)
        return W.to(dtype)
    if storage in ("bitmask", "bitmask-deflate"):
        deflated = storage == "bitmask-deflate"
        return _read_bitmask(tensors, key, rows, cols, vdtype, deflated=deflated).to(dtype)
    if storage != "csr":
        raise ValueError(f"unknown storage {storage!r} for {key!r}")
    crow = tensors.take(f"{key}.crow_indices")
    col = tensors.take(f"{key}.col_indices")
    val = tensors.take(f"{key}.values")
    if crow.ndim != 1 or col.ndim != 1 or val.ndim != 1:
        raise ValueError(f"CSR arrays of {key!r} must be 1-D")
    ints = (torch.int16, torch.int32, torch.int64)
    if crow.dtype not in ints[1:] or col.dtype not in ints:
        raise ValueError(f"CSR indices of {key!r} must be integers (crow int32/int64, col int16/32/64)")
    if crow.numel() != rows + 1:
        raise ValueError(f"{key}.crow_indices has {crow.numel()} entries, expected rows+1 = {rows + 1}")
    if col.numel() != val.numel():
        raise ValueError(f"{key}: col_indices ({col.numel()}) and values ({val.numel()}) differ in length")
    crow64, col64 = crow.to(torch.int64), col.to(torch.int64)
    _check_csr(key, crow64, col64, val.numel(), cols)
    _check_values(f"{key}.values", val, vdtype)
    return torch.sparse_csr_tensor(crow64, col64, val.to(dtype).clone(), size=(rows, cols),
                                   check_invariants=True)


def _values_dtype(cfg: Mapping[str, Any], dtype: torch.dtype) -> torch.dtype:
    """The stored factor values' dtype of a module config: ``values_dtype`` (version 3) or ``dtype``."""
    name = cfg.get("values_dtype", _dtype_name(dtype))
    if name == _dtype_name(dtype):
        return dtype
    if name not in VALUE_DTYPES:
        raise ValueError(f"module {cfg.get('name')!r}: unsupported values_dtype {name!r} in the config "
                         f"(the module's dtype {_dtype_name(dtype)!r} or one of {sorted(VALUE_DTYPES)})")
    return VALUE_DTYPES[name]


def _build(cfg: dict[str, Any], tensors: _Tensors) -> _FactorModule:
    """The module described by ``cfg`` (its class rebuilds it), filled with its tensors from the file."""
    name = cfg["name"]
    module = module_class(cfg.get("class")).from_config(cfg)
    vdtype = _values_dtype(cfg, module._dtype)
    for f in module._factor_names:
        shape = tuple(int(s) for s in getattr(module, f).shape)
        if tuple(cfg["shapes"].get(f, ())) != shape:
            raise ValueError(f"module {name!r}: factor {f} shape {cfg['shapes'].get(f)} in the config does "
                             f"not match its dimensions {shape}")
        W = _read_factor(tensors, f"{name}.{f}", cfg["storage"][f], shape, module._dtype, vdtype)
        module._set_factor(f, W, cfg["layouts"].get(f, "auto"))
    key = f"{name}.bias"
    if module.bias is not None:
        bias = tensors.take(key)
        if tuple(bias.shape) != tuple(module.bias.shape):
            raise ValueError(f"tensor {key!r} has shape {tuple(bias.shape)}, "
                             f"expected {tuple(module.bias.shape)}")
        _check_values(key, bias, module._dtype)
        module.bias = bias.clone()
    elif key in tensors:
        raise ValueError(f"module {name!r}: the file has a bias tensor {key!r} but the config says "
                         "bias=false (corrupted config)")
    return module


def load_compressed(model_or_factory: nn.Module | Any, path: str | os.PathLike) -> nn.Module:
    """Load a file written by :func:`save_compressed` into a fresh dense model.

    Parameters
    ----------
    model_or_factory : nn.Module or callable
        The uncompressed model (modified in place and returned) or a zero-arg callable
        returning it (called only after the file has been read and verified).
    path : str or path-like
        A file of format version 1, 2 or 3 (:data:`READABLE_VERSIONS`).

    Returns
    -------
    nn.Module
        The model with the modules named in the file replaced and every other ``state_dict``
        entry loaded from the file.

    Raises
    ------
    FileNotFoundError
        ``path`` is not a file.
    ValueError
        A truncated, tampered or corrupted file (a checksum that does not match, invalid CSR
        arrays, a bitmask whose length, padding or popcount does not fit, a zlib stream that
        does not decompress, or not to exactly the bitmask's length, NaN/inf factor values,
        values of another dtype than the config's, a tensor the config does not describe), an
        unknown module class, a missing tensor, or a shape that does not fit the model.
    """
    config, raw_tensors = _open(path)
    tensors = _Tensors(raw_tensors)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory returned {type(model).__name__}, not an nn.Module")
    replaced: list[str] = []
    try:
        for cfg in config["modules"]:
            name = cfg["name"]
            if not isinstance(name, str) or not name:
                raise ValueError(f"bad module name {name!r} in the config")
            if any(name == n or name.startswith(n + ".") or n.startswith(name + ".") for n in replaced):
                raise ValueError(f"module {name!r} is named twice (or nested) in the config")
            try:
                original = model.get_submodule(name)
            except AttributeError as exc:
                raise ValueError(f"the model has no submodule {name!r} named in the file") from exc
            module_class(cfg.get("class")).check_original(cfg, original, name)
            module = _build(cfg, tensors)
            ref = next(iter(original.parameters(recurse=True)), None)
            if ref is None:
                ref = next(iter(original.buffers()), None)
            if ref is not None:
                module = module.to(device=ref.device)
            replace_module(model, name, module)
            replaced.append(name)
    except (KeyError, TypeError, AttributeError, IndexError, RuntimeError, OverflowError) as exc:
        raise ValueError(f"{os.fspath(path)}: malformed module config: {exc!r}") from exc
    state = model.state_dict()
    expected_dense = [k for k in state if not any(k.startswith(n + ".") for n in replaced)]
    dense_keys = config["dense_keys"]
    missing = [k for k in expected_dense if k not in dense_keys]
    if missing:
        more = "..." if len(missing) > 5 else ""
        raise ValueError(f"missing tensor(s) in the file for model entries {missing[:5]}{more}")
    extra = [k for k in dense_keys if k not in state]
    if extra:
        raise ValueError(f"the file has tensors the model does not have: {extra[:5]}")
    sources = {}
    for key in expected_dense:
        src, dst = tensors.take(key), state[key]
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"tensor {key!r} has shape {tuple(src.shape)}, the model has {tuple(dst.shape)}")
        if src.dtype.is_floating_point != dst.dtype.is_floating_point or (src.dtype == torch.bool) != (
                dst.dtype == torch.bool):
            raise ValueError(f"tensor {key!r} is {str(src.dtype).removeprefix('torch.')} in the file, the "
                             f"model has {str(dst.dtype).removeprefix('torch.')}")
        sources[key] = src
    stray = tensors.unused()
    if stray:
        more = "..." if len(stray) > 5 else ""
        raise ValueError(f"the file has tensor(s) its config does not describe: {stray[:5]}{more} "
                         "(corrupted config)")
    try:
        with torch.no_grad():
            for key, src in sources.items():
                state[key].copy_(src)
    except RuntimeError as exc:  # pragma: no cover - shapes and kinds were checked above
        raise ValueError(f"{os.fspath(path)}: cannot copy a tensor into the model: {exc}") from exc
    return model
