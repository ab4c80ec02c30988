"""Save and load compressed models as one safetensors file (no pickle).

File layout (format ``sparsefact``, version 1)
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
buffers) under its own key. The safetensors metadata holds ``format``, ``format_version`` and
``config``, a JSON object::

    {"format_version": 1,
     "modules": [{"name", "class", "dtype", "bias", "layouts": {f: "csr"|"dense"},
                  "storage": {f: "csr"|"dense"}, "shapes": {f: [rows, cols]},
                  + "in_features"/"out_features"/"inner_features" or the conv geometry}],
     "dense_keys": [...]}

Each module entry is ``{"name": ..., **module.get_config(), "storage": ...}``: the module class
describes itself (:meth:`~sparsefact.nn_adapters.modules._FactorModule.get_config`) and rebuilds
itself (``from_config``, ``check_original``); this file has no per-class code. The keys are
those of the first files written (version 1), which still load.

``load_compressed(model_or_factory, path)`` builds the dense model, replaces the modules named in
the config (with their recorded runtime layouts) and loads every tensor; any inconsistency between
the file and the model raises ``ValueError`` naming it.
"""

from __future__ import annotations

import json
import os
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

__all__ = ["FORMAT_VERSION", "compression_report", "load_compressed", "save_compressed"]

FORMAT = "sparsefact"
FORMAT_VERSION = 1


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
    """Write ``model`` (with some modules replaced by sparse ones) to one ``.safetensors`` file."""
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
    config = {"format_version": FORMAT_VERSION, "modules": modules_cfg, "dense_keys": dense_keys}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(config)}
    save_file(tensors, os.fspath(path), metadata=metadata)


# ---------------------------------------------------------------------------- load
def _open(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
    try:
        config = json.loads(meta["config"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{p}: missing or invalid JSON config in the metadata: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("modules"), list) \
            or not isinstance(config.get("dense_keys"), list):
        raise ValueError(f"{p}: config must hold 'modules' and 'dense_keys' lists")
    return config, tensors


def _take(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"missing tensor {key!r} in the file")
    return tensors[key]


def _read_factor(tensors, key: str, storage: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    rows, cols = (int(s) for s in shape)
    if storage == "dense":
        W = _take(tensors, key)
        if tuple(W.shape) != (rows, cols):
            raise ValueError(f"tensor {key!r} has shape {tuple(W.shape)}, config says {(rows, cols)}")
        return W.to(dtype)
    if storage != "csr":
        raise ValueError(f"unknown storage {storage!r} for {key!r}")
    crow = _take(tensors, f"{key}.crow_indices")
    col = _take(tensors, f"{key}.col_indices")
    val = _take(tensors, f"{key}.values")
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
    if int(crow64[0]) != 0 or int(crow64[-1]) != val.numel() or bool((crow64[1:] < crow64[:-1]).any()):
        raise ValueError(f"{key}.crow_indices is not a valid CSR row pointer for {val.numel()} values")
    if col64.numel() and (int(col64.min()) < 0 or int(col64.max()) >= cols):
        raise ValueError(f"{key}.col_indices out of range for {cols} columns")
    return torch.sparse_csr_tensor(crow64, col64, val.to(dtype), size=(rows, cols), check_invariants=True)


def _build(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> _FactorModule:
    """The module described by ``cfg`` (its class rebuilds it), filled with its tensors from the file."""
    name = cfg["name"]
    module = module_class(cfg.get("class")).from_config(cfg)
    for f in module._factor_names:
        shape = tuple(int(s) for s in getattr(module, f).shape)
        if tuple(cfg["shapes"].get(f, ())) != shape:
            raise ValueError(f"module {name!r}: factor {f} shape {cfg['shapes'].get(f)} in the config does "
                             f"not match its dimensions {shape}")
        W = _read_factor(tensors, f"{name}.{f}", cfg["storage"][f], list(shape), module._dtype)
        module._set_factor(f, W, cfg["layouts"].get(f, "auto"))
    if module.bias is not None:
        bias = _take(tensors, f"{name}.bias")
        if tuple(bias.shape) != tuple(module.bias.shape):
            raise ValueError(f"tensor {name + '.bias'!r} has shape {tuple(bias.shape)}, "
                             f"expected {tuple(module.bias.shape)}")
        module.bias = bias.to(module._dtype).clone()
    return module


def load_compressed(model_or_factory: nn.Module | Any, path: str | os.PathLike) -> nn.Module:
    """Load a file written by :func:`save_compressed` into a fresh dense model.

    ``model_or_factory`` is the uncompressed model (modified in place and returned) or a zero-arg
    callable returning it. Modules named in the file are replaced; every other ``state_dict``
    entry is loaded from the file. Raises ``ValueError`` for a truncated/tampered file, an unknown
    module class, a missing tensor or a shape that does not fit the model.
    """
    config, tensors = _open(path)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory returned {type(model).__name__}, not an nn.Module")
    replaced = []
    try:
        for cfg in config["modules"]:
            name = cfg["name"]
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
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{os.fspath(path)}: malformed module config: {exc!r}") from exc
    state = model.state_dict()
    expected_dense = [k for k in state if not any(k.startswith(n + ".") for n in replaced)]
    missing = [k for k in expected_dense if k not in config["dense_keys"]]
    if missing:
        more = "..." if len(missing) > 5 else ""
        raise ValueError(f"missing tensor(s) in the file for model entries {missing[:5]}{more}")
    extra = [k for k in config["dense_keys"] if k not in state]
    if extra:
        raise ValueError(f"the file has tensors the model does not have: {extra[:5]}")
    with torch.no_grad():
        for key in expected_dense:
            src = _take(tensors, key)
            dst = state[key]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"tensor {key!r} has shape {tuple(src.shape)}, the model has {tuple(dst.shape)}"
                )
            dst.copy_(src)
    return model
