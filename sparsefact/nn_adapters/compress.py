"""Compress the linear layers of a torch model, block by block, from calibration data.

:func:`compress_model` is the one entry point. For a transformer it works like
SparseGPT's ``opt_sequential`` (reference/baselines.md §3.5): the inputs of the first
repeated block are captured, then for each block in turn

1. forward hooks on the block's target layers accumulate each layer's input Gram
   while all calibration inputs go through the block (dense within the block),
2. every target layer is compressed against its Gram and replaced by a sparse module
   (:class:`DoubleSparseLinear` for DSF, :class:`SparseLinear` for the pruners),
3. the compressed block is run again to give the next block's inputs
   (``sequential=True``); with ``sequential=False`` the next block gets the dense
   block's outputs instead, so every block is calibrated on the dense model's
   activations (as OBC does).

Models without repeated blocks (small MLPs, CNNs) are compressed layer by layer: each
layer is calibrated on the outputs of the already-compressed layers before it
(``sequential=True``, one pass over the data per layer) or all layers on one pass of
the dense model (``sequential=False``).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .capture import (
    _CURRENT_MASK,
    ActivationCapture,
    _is_hf_conv1d,
    is_supported_layer,
    iter_batches,
    layer_matrix,
    run_batch,
    select_layers,
    token_mask,
)

__all__ = [
    "CompressionReport",
    "available_methods",
    "compress_layer",
    "compress_model",
    "find_blocks",
    "make_estimator",
]

# method name -> (module, class name); the core ones always exist, the others when written.
_METHODS: dict[str, tuple[str, str]] = {
    "dsf": ("sparsefact.estimators", "DoubleSparseFactorization"),
    "magnitude": ("sparsefact.estimators", "MagnitudePruning"),
    "wanda": ("sparsefact.pruning", "Wanda"),
    "sparsegpt": ("sparsefact.pruning", "SparseGPT"),
    "admm": ("sparsefact.pruning", "ADMMPruning"),
    "lowrank": ("sparsefact.lowrank", "LowRank"),
}


def available_methods() -> dict[str, type]:
    """``{name: estimator class}`` of the compression methods present in this installation."""
    import importlib

    found = {}
    for name, (module_name, class_name) in _METHODS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, class_name, None)
        if cls is not None:
            found[name] = cls
    return found


def make_estimator(method: Any, density: float, params: Mapping[str, Any] | None = None) -> Any:
    """An unfitted compressor for ``method`` (a name, an estimator class or instance) at ``density``."""
    params = dict(params or {})
    if isinstance(method, str):
        methods = available_methods()
        cls = methods.get(method.lower())
        if cls is None:
            raise ValueError(f"unknown method {method!r}; available methods: {', '.join(sorted(methods))}")
        return cls(density=density, **params)
    if isinstance(method, type):
        return method(density=density, **params)
    from sklearn.base import clone

    return clone(method).set_params(density=density, **params)


def _method_name(method: Any) -> str:
    if isinstance(method, str):
        return method.lower()
    cls = method if isinstance(method, type) else type(method)
    for name, (_, class_name) in _METHODS.items():
        if cls.__name__ == class_name:
            return name
    return cls.__name__


# ---------------------------------------------------------------------- blocks
def _block_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential) or len(module) < 2:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1:
            continue
        if not all(any(is_supported_layer(m) for m in c.modules()) for c in children):
            continue
        if isinstance(children[0], nn.Linear | nn.Conv2d):  # a Sequential of bare layers: not blocks
            continue
        found.append((name, module))
    return found


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """The model's repeated blocks: ``(path, [block, ...])`` or ``None``.

    The largest (by parameters) ``ModuleList``/``Sequential`` of at least two modules of
    one class that each contain linear layers, e.g. ``encoder.layer`` (BERT),
    ``model.layers`` (Llama), ``transformer.h`` (GPT-2).
    """
    candidates = _block_candidates(model)
    if not candidates:
        return None

    def size(item: tuple[str, nn.Module]) -> int:
        return sum(p.numel() for p in item[1].parameters())

    name, module = max(candidates, key=size)
    return name, list(module)


def _resolve_blocks(model: nn.Module, blocks: Any) -> tuple[list[str], list[nn.Module]] | None:
    if blocks is False or (isinstance(blocks, Sequence) and not isinstance(blocks, str) and len(blocks) == 0):
        return None
    modules = dict(model.named_modules())
    if blocks is None:
        found = find_blocks(model)
        if found is None:
            return None
        path, mods = found
        return [f"{path}.{i}" if path else str(i) for i in range(len(mods))], mods
    if isinstance(blocks, str):
        container = modules.get(blocks)
        if container is None:
            raise KeyError(f"blocks: the model has no module {blocks!r}")
        return [f"{blocks}.{i}" for i in range(len(container))], list(container)
    names_of = {id(m): n for n, m in modules.items()}
    names, mods = [], []
    for item in blocks:
        if isinstance(item, str):
            if item not in modules:
                raise KeyError(f"blocks: the model has no module {item!r}")
            names.append(item)
            mods.append(modules[item])
        elif isinstance(item, nn.Module):
            if id(item) not in names_of:
                raise ValueError("blocks: a module given is not part of the model")
            names.append(names_of[id(item)])
            mods.append(item)
        else:
            raise TypeError(f"blocks must be names or modules, got {type(item).__name__}")
    return names, mods


class _StopForwardError(Exception):
    """Raised by the pre-hook of the first block once its inputs are caught."""


def _catch_block_inputs(model: nn.Module, block: nn.Module, data: Any, forward: Any) -> list[tuple]:
    """``[(args, kwargs, token mask), ...]`` of the first block, one per calibration batch."""
    caught: list[tuple] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = _CURRENT_MASK.get()
        caught.append((tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}, mask))
        raise _StopForwardError

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for batch in iter_batches(data):
            with contextlib.suppress(_StopForwardError):
                run_batch(model, batch, forward=forward)
    finally:
        handle.remove()
    if not caught:
        raise ValueError("the calibration data never reached the first block (is calibration_data empty?)")
    return caught


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _block_hidden(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find the hidden states in a block output of type {type(output).__name__}")


def _next_inputs(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else None
    if key is None:
        key = next(
            (k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.shape == hidden.shape), None
        )
    if key is None:
        raise ValueError("cannot tell which keyword argument of the block carries its hidden states")
    return args, {**kwargs, key: hidden}


# ---------------------------------------------------------------------- one layer
@contextlib.contextmanager
def _thread_limit(threads: int | None):
    """Numba and BLAS thread pools limited to ``threads`` during a fit (``None``: unchanged)."""
    if threads is None:
        yield
        return
    import numba
    from threadpoolctl import threadpool_limits

    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        with threadpool_limits(limits=int(threads)):
            yield
    finally:
        numba.set_num_threads(previous)


def _to_module_like(new: nn.Module, old: nn.Module) -> nn.Module:
    param = next(iter(old.parameters()))
    try:
        new = new.to(device=param.device, dtype=param.dtype)
    except (RuntimeError, TypeError):  # sparse storage that cannot take this dtype: keep float32
        new = new.to(device=param.device)
    new.train(old.training)
    return new


def _write_weight(module: nn.Module, W_hat: np.ndarray) -> None:
    weight = module.weight
    values = torch.as_tensor(W_hat)
    if _is_hf_conv1d(module):
        values = values.T
    with torch.no_grad():
        weight.copy_(values.reshape(weight.shape).to(dtype=weight.dtype, device=weight.device))


def _build_module(module: nn.Module, est: Any, replace: bool) -> nn.Module | None:
    """The module that replaces ``module`` (``None``: the weight was overwritten in place)."""
    if not replace:
        _write_weight(module, np.asarray(est.reconstruct()))
        return None
    from .modules import DoubleSparseConv2d, DoubleSparseLinear, SparseLinear

    bias = None if module.bias is None else module.bias.detach().to(torch.float32).cpu()
    factored = hasattr(est, "A_") and hasattr(est, "B_")
    if isinstance(module, nn.Conv2d):
        if factored and module.padding_mode == "zeros":
            return DoubleSparseConv2d.from_factors(
                est.A_,
                est.B_,
                bias,
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
            )
        _write_weight(module, np.asarray(est.reconstruct()))  # pruned conv: zeros in the dense kernel
        return None
    if factored:
        return DoubleSparseLinear.from_estimator(est, bias=bias)
    if hasattr(est, "weight_"):
        return SparseLinear.from_estimator(est, bias=bias)
    return SparseLinear.from_weight(np.asarray(est.reconstruct()), bias=bias)


def compress_layer(
    module: nn.Module,
    calibration: Any,
    method: Any = "dsf",
    density: float = 0.5,
    *,
    replace: bool = True,
    name: str = "",
    threads: int | None = None,
    **params: Any,
) -> tuple[nn.Module | None, dict[str, Any]]:
    """Compress one layer against its calibration; return ``(new module or None, report row)``.

    The weight is compressed in float32 on the CPU (fp16/bf16 weights are upcast), and
    the new module is moved to the layer's device and dtype. ``None`` means the weight
    was overwritten in place (``replace=False``, or a pruned Conv2d, which keeps its
    dense kernel with zeros).
    """
    W = layer_matrix(module).to(torch.float32).cpu().numpy()
    est = make_estimator(method, density, params)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, _thread_limit(threads):
        warnings.simplefilter("always")
        est.fit(W, calibration=calibration)
    new = _build_module(module, est, replace)
    if new is not None:
        new = _to_module_like(new, module)
    seconds = time.perf_counter() - start
    messages = []
    for record in caught:
        if record.category.__name__ == "ConvergenceWarning":
            messages.append(str(record.message))
        else:
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
    row = {
        "name": name,
        "type": type(module).__name__,
        "shape": [int(W.shape[0]), int(W.shape[1])],
        "method": _method_name(method),
        "target_density": float(density),
        "density": float(est.density_),
        "nnz": int(est.nnz_),
        "calibrated_err": float(est.calibrated_err_),
        "n_tokens": int(getattr(calibration, "n_samples", 0)),
        "seconds": float(seconds),
        "replaced_by": type(new).__name__ if new is not None else f"{type(module).__name__} (in place)",
    }
    if messages:
        row["warnings"] = messages
    return new, row


# ---------------------------------------------------------------------- report
class CompressionReport(list):
    """The per-layer rows of :func:`compress_model` (a list of dicts), with writers.

    Each row: ``name, type, shape [out, in], method, target_density, density,
    nnz, calibrated_err, n_tokens, seconds, replaced_by`` (and ``warnings`` if any).
    """

    def summary(self) -> dict[str, Any]:
        """Totals: layers, entries, kept nonzeros, overall density, seconds, mean error."""
        entries = sum(r["shape"][0] * r["shape"][1] for r in self)
        nnz = sum(r["nnz"] for r in self)
        return {
            "layers": len(self),
            "entries": entries,
            "nnz": nnz,
            "density": nnz / entries if entries else float("nan"),
            "mean_calibrated_err": (
                float(np.mean([r["calibrated_err"] for r in self])) if self else float("nan")
            ),
            "seconds": float(sum(r["seconds"] for r in self)),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "layers": list(self)}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    def to_markdown(self, path: str | Path | None = None) -> str:
        lines = [
            "| layer | type | shape | method | density | calibrated err | seconds |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for r in self:
            lines.append(
                f"| {r['name']} | {r['type']} | {r['shape'][0]}×{r['shape'][1]} | {r['method']} | "
                f"{r['density']:.4f} | {r['calibrated_err']:.4f} | {r['seconds']:.2f} |"
            )
        s = self.summary()
        lines.append(
            f"\n{s['layers']} layers, {s['nnz']} of {s['entries']} entries kept "
            f"(density {s['density']:.4f}), mean calibrated error {s['mean_calibrated_err']:.4f}, "
            f"{s['seconds']:.1f} s.\n"
        )
        text = "\n".join(lines)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text


# ---------------------------------------------------------------------- model
def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    from .modules import replace_module

    replace_module(model, name, new)


def _density_for(density: Any, name: str) -> float:
    if isinstance(density, Mapping):
        if name in density:
            return float(density[name])
        if "*" in density:
            return float(density["*"])
        raise KeyError(f"density: no entry for layer {name!r} (add it, or a default under '*')")
    return float(density)


def compress_model(
    model: nn.Module,
    calibration_data: Any,
    method: Any = "dsf",
    density: float | Mapping[str, float] = 0.5,
    *,
    blocks: Any = None,
    sequential: bool = True,
    layers: Any = None,
    progress: bool = True,
    replace: bool = True,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    threads: int | None = None,
    **params: Any,
) -> tuple[nn.Module, CompressionReport]:
    """Compress a model's linear layers from calibration data; return ``(model, report)``.

    Parameters
    ----------
    model : nn.Module
        Modified in place (layers replaced) and returned.
    calibration_data : tensor, dict, DataLoader or iterable of batches
        Each batch goes through the model as in :func:`~.capture.run_batch`: a tensor as
        the input, a dict (tokenizer output) as keyword arguments whose
        ``attention_mask`` excludes padding tokens from the Grams, a ``(x, y)`` pair
        by its ``x``. A lone tensor or dict is one batch.
    method : str, estimator class or estimator
        ``"dsf"`` (DoubleSparseFactorization), ``"magnitude"``, and, when installed,
        ``"wanda"``, ``"sparsegpt"``, ``"admm"``, ``"lowrank"``; see
        :func:`available_methods`. An estimator instance is cloned for each layer.
    density : float or {layer name: float}
        Kept fraction of each layer's entries; a mapping may hold a default under ``"*"``.
    blocks : None, False, str, or list of names/modules
        ``None``: find repeated blocks (:func:`find_blocks`), else compress layer by
        layer. ``False``: layer by layer. A dotted path of a ``ModuleList``, or the blocks.
        In block mode only layers inside the blocks are compressed (embeddings and heads
        are outside them).
    sequential : bool
        Calibrate each block (layer) on the outputs of the already-compressed ones
        (SparseGPT), or on the dense model's activations (``False``, OBC).
    layers : see :func:`~.capture.select_layers`
        Which layers to compress (default: all Linear / Conv2d / Conv1D except output
        heads). A regex or callable sees the full dotted name.
    progress : bool
        tqdm progress bar over layers (on stderr).
    replace : bool
        Replace layers by :class:`DoubleSparseLinear` / :class:`SparseLinear` /
        :class:`DoubleSparseConv2d` (default), or write the compressed weight ``A @ B``
        into the existing dense weight (``False``).
    forward : callable, optional
        ``forward(model, batch)`` to call the model on a batch, for unusual inputs.
    threads : int, optional
        Limit Numba's and the BLAS libraries' thread pools to this many threads while a
        layer is fitted (restored afterwards); ``None`` leaves them alone. On a busy
        shared machine ``1`` can be much faster: a 384x384 DSF fit (8 outer iterations)
        after torch forwards took 1.1 s with one thread and 13-36 s with two on 2 busy cores.
    **params
        Passed to the estimator's constructor (e.g. ``max_iter=8`` for DSF).

    Returns
    -------
    model : nn.Module
    report : CompressionReport
        One dict per layer (see :class:`CompressionReport`).
    """
    from tqdm.auto import tqdm

    if isinstance(method, str):
        make_estimator(method, 0.5, params)  # fail early on unknown methods / parameters
    params = {**params, "threads": threads}
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if use_cache:
        config.use_cache = False
    report = CompressionReport()
    try:
        with torch.no_grad():
            resolved = _resolve_blocks(model, blocks)
            if resolved is None:
                targets = select_layers(model, layers)
                _check_targets(targets, density)
                bar = tqdm(total=len(targets), desc=f"compress ({_method_name(method)})",
                           disable=not progress)
                try:
                    _compress_layerwise(model, calibration_data, targets, method, density, sequential,
                                        replace, forward, params, report, bar)
                finally:
                    bar.close()
            else:
                names, mods = resolved
                per_block = [select_layers(b, layers, prefix=n) for n, b in zip(names, mods, strict=True)]
                _check_targets([t for ts in per_block for t in ts], density)
                bar = tqdm(total=sum(map(len, per_block)), desc=f"compress ({_method_name(method)})",
                           disable=not progress)
                try:
                    _compress_blockwise(model, calibration_data, names, mods, per_block, method, density,
                                        sequential, replace, forward, params, report, bar)
                finally:
                    bar.close()
    finally:
        model.train(was_training)
        if use_cache:
            config.use_cache = use_cache
    return model, report


def _check_targets(targets: list[str], density: Any) -> None:
    if not targets:
        raise ValueError("no layers selected for compression (check `layers` and `blocks`)")
    for name in targets:
        _density_for(density, name)


def _do_layer(model, name, module, calibration, method, density, replace, params, report, bar) -> None:
    new, row = compress_layer(
        module, calibration, method, _density_for(density, name), replace=replace, name=name, **params
    )
    if new is not None:
        _replace(model, name, new)
    report.append(row)
    bar.set_postfix_str(f"{name} err={row['calibrated_err']:.3f}")
    bar.update(1)


def _compress_layerwise(model, data, targets, method, density, sequential, replace, forward, params, report,
                        bar):
    if not sequential:
        with ActivationCapture(model, names=targets) as cap:
            cap.run(data, forward=forward)
        modules = dict(model.named_modules())
        for name in targets:
            _do_layer(model, name, modules[name], cap.calibration(name), method, density, replace, params,
                      report, bar)
        return
    for name in targets:
        with ActivationCapture(model, names=[name]) as cap:
            cap.run(data, forward=forward)
        module = dict(model.named_modules())[name]
        _do_layer(model, name, module, cap.calibration(name), method, density, replace, params, report, bar)


def _compress_blockwise(model, data, names, blocks, per_block, method, density, sequential, replace, forward,
                        params, report, bar):
    last = max(i for i, targets in enumerate(per_block) if targets)  # later blocks need no inputs
    inputs = _catch_block_inputs(model, blocks[0], data, forward)
    for block_name, block, targets in zip(names[: last + 1], blocks[: last + 1], per_block, strict=False):
        local = [t[len(block_name) + 1:] for t in targets]
        dense_outputs = []
        if targets:
            with ActivationCapture(block, names=local) as cap:
                for args, kwargs, mask in inputs:
                    with token_mask(mask):
                        out = block(*args, **kwargs)
                    if not sequential:
                        dense_outputs.append(_block_hidden(out))
            modules = dict(block.named_modules())
            for full, short in zip(targets, local, strict=True):
                _do_layer(block, short, modules[short], cap.calibration(short), method, density, replace,
                          params, report, bar)
                report[-1]["name"] = full
        if block is blocks[last]:
            break
        if not dense_outputs:  # sequential (or nothing compressed): outputs of the block as it is now
            for args, kwargs, mask in inputs:
                with token_mask(mask):
                    dense_outputs.append(_block_hidden(block(*args, **kwargs)))
        inputs = [(*_next_inputs(a, k, h), m) for (a, k, m), h in zip(inputs, dense_outputs, strict=True)]
