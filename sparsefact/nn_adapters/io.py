"""Save and load compressed models as one safetensors file (no pickle).

File layout (format ``sparsefact``, version 2)
---------------------------------------------
Tensors, for every replaced module ``<name>`` (any registered module class:
:class:`DoubleSparseLinear`, :class:`SparseLinear`, :class:`LowRankLinear` and their Conv2d
counterparts, or a user's :class:`~sparsefact.nn_adapters.modules._FactorModule` subclass) and
each of its factors ``<f>`` (``A``/``B`` or ``weight``):

- ``<name>.<f>.crow_indices`` (int32, int64 if needed), ``<name>.<f>.col_indices`` (int16 when
  the factor has at most 32768 columns, else int32/int64), ``<name>.<f>.values`` when the factor
  is stored as CSR, which is whenever that is smaller than dense (float32: density below about
  2/3); otherwise ``<name>.<f>`` dense. The on-disk form does not depend
  on the runtime layout, so the file size reflects sparsity.
- ``<name>.bias`` if the module has a bias.

and every other entry of the model's ``state_dict()`` (untouched dense parameters and persistent
buffers) under its own key. The safetensors metadata holds ``format``, ``format_version``,
``config``, a JSON object::

    {"format_version": 2,
     "modules": [{"name", "class", "dtype", "bias", "layouts": {f: "csr"|"dense"},
                  "storage": {f: "csr"|"dense"}, "shapes": {f: [rows, cols]},
                  + "in_features"/"out_features"/"inner_features" or the conv geometry}],
     "dense_keys": [...]}

and ``checksums``, a JSON object ``{"algorithm": "sha256", "config": <hex>, "tensors": {key:
<hex>}}``: the SHA-256 of the ``config`` string and, for every tensor, of its dtype, shape and
bytes (:func:`tensor_digest`).

Each module entry is ``{"name": ..., **module.get_config(), "storage": ...}``: the module class
describes itself (:meth:`~sparsefact.nn_adapters.modules._FactorModule.get_config`) and rebuilds
itself (``from_config``, ``check_original``); this file has no per-class code.

``load_compressed(model_or_factory, path)`` verifies the checksums before anything is built
(any changed byte of a tensor, of its dtype or shape, or of the config raises ``ValueError``
naming it), builds the dense model, replaces the modules named in the config (with their
recorded runtime layouts) and loads every tensor; any inconsistency between the file and the
model raises ``ValueError`` naming it. Independently of the checksums every file is checked for
structure: CSR arrays form a valid matrix (row pointer from 0 to nnz and non-decreasing, column
indices in range and strictly increasing within each row), factor and bias values are finite and
of the config's dtype, and every tensor of the file is used by the config (a bias the config
says is absent, or any other stray tensor, is an error), so a corrupted file never loads
silently and never surfaces as a raw torch ``RuntimeError``.

Version 1 (the first files, no ``checksums``) still loads: the same keys and config. For such a
file the structural checks above are all that is verified: a changed value that stays finite
(a dense weight, a CSR value, a buffer) or a changed config number that stays consistent (a
stride, a padding) is not detected.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .modules import (
    _FactorModule,
    _index_bytes,
    _storage_bytes,
    module_class,
    replace_module,
)

__all__ = ["FORMAT_VERSION", "compression_report", "load_compressed", "save_compressed", "tensor_digest"]

FORMAT = "sparsefact"
#: version written by :func:`save_compressed`; 2 added the ``checksums`` metadata.
FORMAT_VERSION = 2
#: versions :func:`load_compressed` reads (1: no checksums, structural checks only).
READABLE_VERSIONS = (1, 2)
CHECKSUM_ALGORITHM = "sha256"


def _compressed_modules(model: nn.Module) -> list[tuple[str, _FactorModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _FactorModule)]


# ---------------------------------------------------------------------------- report
def compression_report(model: nn.Module) -> list[dict[str, Any]]:
    """Per compressed module: name, class, nnz, density, dense bytes, compressed bytes, ratio.

    ``dense_bytes`` is the equivalent dense layer (weight + bias) in the module's dtype and
    ``compressed_bytes`` what :func:`save_compressed` writes for it. A last row named ``"total"``
    sums the modules.
    """
    rows = []
    for name, module in _compressed_modules(model):
        numel = 1
        for s in module._dense_weight_shape():
            numel *= s
        rows.append({
            "name": name,
            "class": type(module).__name__,
            "nnz": module.nnz,
            "density": module.nnz / numel,
            "dense_bytes": module.dense_bytes,
            "compressed_bytes": module.compressed_bytes,
            "ratio": module.compressed_bytes / module.dense_bytes,
        })
    dense = sum(r["dense_bytes"] for r in rows)
    comp = sum(r["compressed_bytes"] for r in rows)
    rows.append({"name": "total", "class": "", "nnz": sum(r["nnz"] for r in rows),
                 "density": float("nan"), "dense_bytes": dense, "compressed_bytes": comp,
                 "ratio": comp / dense if dense else float("nan")})
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
def _factor_tensors(key: str, W: torch.Tensor) -> tuple[str, dict[str, torch.Tensor]]:
    W = W.detach().cpu()
    csr = W if W.layout is torch.sparse_csr else None
    if csr is None:
        nnz = int(torch.count_nonzero(W))
    else:
        # drop explicit zeros so the stored nnz is the true one
        csr = csr.to_dense().to_sparse_csr() if bool((csr.values() == 0).any()) else csr
        nnz = int(csr.values().numel())
    storage, _ = _storage_bytes(nnz, tuple(W.shape), W.element_size())
    if storage == "dense":
        dense = W.to_dense() if W.layout is torch.sparse_csr else W
        return storage, {key: dense.contiguous().clone()}
    if csr is None:
        csr = W.to(torch.float32).to_sparse_csr().to(W.dtype) if W.dtype in (torch.float16, torch.bfloat16) \
            else W.to_sparse_csr()
    by_size = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    crow_bytes, col_bytes = _index_bytes(nnz, tuple(W.shape))
    return storage, {
        f"{key}.crow_indices": csr.crow_indices().to(by_size[crow_bytes]).contiguous(),
        f"{key}.col_indices": csr.col_indices().to(by_size[col_bytes]).contiguous(),
        f"{key}.values": csr.values().contiguous().clone(),
    }


def save_compressed(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (with some modules replaced by sparse ones) to one ``.safetensors`` file.

    Parameters
    ----------
    model : nn.Module
        The model; its :class:`~sparsefact.nn_adapters.modules._FactorModule` submodules are
        stored in compact form, every other ``state_dict`` entry as it is.
    path : str or path-like
        The file (replaced if it exists). It gets the mode a new file of the process gets
        (``0o666`` less the umask).

    Notes
    -----
    The file is format version :data:`FORMAT_VERSION`: the metadata holds a SHA-256 checksum
    of the config and of every tensor, which :func:`load_compressed` verifies.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    modules_cfg = []
    names = []
    for name, module in _compressed_modules(model):
        if not name:
            raise ValueError("the root module itself is a compressed module; wrap it in a container")
        cfg = {"name": name, **module.get_config()}
        cfg["storage"] = {}
        for f in module._factor_names:
            storage, parts = _factor_tensors(f"{name}.{f}", getattr(module, f))
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
    """Config and tensors of a sparsefact file, its checksums verified (format version 2)."""
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


def _read_factor(tensors: _Tensors, key: str, storage: str, shape: Iterable[int],
                 dtype: torch.dtype) -> torch.Tensor:
    rows, cols = (int(s) for s in shape)
    if storage == "dense":
        W = tensors.take(key)
        if tuple(W.shape) != (rows, cols):
            raise ValueError(f"tensor {key!r} has shape {tuple(W.shape)}, config says {(rows, cols)}")
        _check_values(key, W, dtype)
        return W
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
    _check_values(f"{key}.values", val, dtype)
    return torch.sparse_csr_tensor(crow64, col64, val.clone(), size=(rows, cols), check_invariants=True)


def _build(cfg: dict[str, Any], tensors: _Tensors) -> _FactorModule:
    """The module described by ``cfg`` (its class rebuilds it), filled with its tensors from the file."""
    name = cfg["name"]
    module = module_class(cfg.get("class")).from_config(cfg)
    for f in module._factor_names:
        shape = tuple(int(s) for s in getattr(module, f).shape)
        if tuple(cfg["shapes"].get(f, ())) != shape:
            raise ValueError(f"module {name!r}: factor {f} shape {cfg['shapes'].get(f)} in the config does "
                             f"not match its dimensions {shape}")
        W = _read_factor(tensors, f"{name}.{f}", cfg["storage"][f], shape, module._dtype)
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
        A file of format version 1 or 2.

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
        arrays, NaN/inf factor values, a tensor the config does not describe), an unknown
        module class, a missing tensor, or a shape that does not fit the model.
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
