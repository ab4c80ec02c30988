"""Compress the linear layers of a torch model, block by block, from calibration data.

:func:`compress_model` is the one entry point. It is a loop around three separate steps:

(a) capture: forward hooks (:class:`~.capture.ActivationCapture`) accumulate the calibration
    statistic the method needs -- the full input Gram, only its diagonal, or nothing
    (``measure_error`` and the method's registry entry decide, see :func:`compress_model`);
(b) fit: :func:`sparsefact.layer_fit.fit_layer`, pure (no torch), fits the method to the
    layer's weight matrix against that calibration;
(c) install: :func:`~.install.install_result` replaces the layer by the module family the
    method's registry entry names (:mod:`sparsefact.nn_adapters.install`).

For a transformer it works like SparseGPT's ``opt_sequential`` (reference/baselines.md §3.5):
the inputs of the first repeated block are captured, then for each block in turn

1. forward hooks on the block's target layers accumulate each layer's calibration statistic
   while all calibration inputs go through the block (dense within the block),
2. every target layer is fitted against it and replaced by its method's module
   (:class:`DoubleSparseLinear` for DSF, :class:`SparseLinear` for the pruners,
   :class:`LowRankLinear` for low rank; the Conv2d counterparts for convolutions),
3. the compressed block is run again to give the next block's inputs
   (``sequential=True``); with ``sequential=False`` the next block gets the dense
   block's outputs instead, so every block is calibrated on the dense model's
   activations (as OBC does).

Models without repeated blocks (small MLPs, CNNs) are compressed layer by layer: each
layer is calibrated on the outputs of the already-compressed layers before it
(``sequential=True``, one pass over the data per layer) or all layers on one pass of
the dense model (``sequential=False``).

The methods are those of the registry (:func:`sparsefact.methods.available_methods`,
re-exported here); a method registered with :func:`sparsefact.register_method` works here
without further code.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._sklearn_compat import validate_params
from ..calibration import Calibration
from ..checkpoint import LayerCheckpoint, digest_arrays
from ..layer_fit import LayerResult, LayerSpec, fit_layer
from ..methods import MethodSpec, available_methods, make_estimator, method_name, spec_for
from . import prune_init as _prune_init  # noqa: F401 - registers the pruning-at-initialisation scorers
from .capture import (
    _CURRENT_MASK,
    ActivationCapture,
    is_supported_layer,
    iter_batches,
    layer_matrix,
    run_batch,
    select_layers,
    token_mask,
)
from .install import _place, _row, install_result
from .modules import replace_module

__all__ = [
    "CompressionReport",
    "available_methods",
    "compress_layer",
    "compress_model",
    "find_blocks",
    "make_estimator",
]


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
def _weight_matrix(module: nn.Module) -> np.ndarray:
    """The layer matrix (out x in) in float32 on the CPU (fp16/bf16 weights are upcast)."""
    return layer_matrix(module).to(torch.float32).cpu().numpy()


def compress_layer(
    module: nn.Module,
    calibration: Calibration | None,
    method: Any = "dsf",
    density: float = 0.5,
    *,
    replace: bool = True,
    name: str = "",
    threads: int | None = None,
    **params: Any,
) -> tuple[nn.Module | None, dict[str, Any]]:
    """Compress one layer against its calibration; return ``(new module or None, report row)``.

    A thin wrapper of :func:`sparsefact.layer_fit.fit_layer` and the install step
    (:func:`~.install.build_module`) that does not touch a model: the caller puts the new
    module in place. The weight is compressed in float32 on the CPU (fp16/bf16 weights are
    upcast), and the new module is on the layer's device and in its dtype. ``None`` means the
    weight was overwritten in place (``replace=False``, or a Conv2d with a non-zero
    ``padding_mode``).
    """
    spec = spec_for(method)
    result = fit_layer(_weight_matrix(module), calibration,
                       LayerSpec(method, float(density), dict(params), threads, name))
    new = _place(module, result, spec, replace)
    return new, _row(result.row, module, new, name)


# ---------------------------------------------------------------------- report
class CompressionReport(list):
    """The per-layer rows of :func:`compress_model` (a list of dicts), with writers.

    Each row: ``name, type, shape [out, in], method, target_density, density,
    nnz, calibrated_err, n_tokens, seconds, capture_seconds, replaced_by`` (``seconds``: the
    fit; ``capture_seconds``: the layer's share of the calibration pass -- unfolding, masking and
    Gram accumulation in its hooks, 0 without a pass) (and ``warnings`` if any, and
    ``err_metric`` when ``calibrated_err`` is not measured in the full Gram metric:
    ``"diag"`` -- in the diagonal metric ``sum_ij D_ij^2 G_jj`` -- or ``"none"``, the plain
    relative Frobenius error of an uncalibrated fit).
    """

    #: layers left out on purpose, ``[{"name", "reason"}]`` (e.g. the output layer)
    skipped: list

    def __init__(self, rows: Any = ()) -> None:
        super().__init__(rows)
        self.skipped = []

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The rows of layers whose fit raised (kept dense; each has an ``"error"``)."""
        return [r for r in self if "error" in r]

    def summary(self) -> dict[str, Any]:
        """Totals: layers, entries, kept nonzeros, overall density, seconds, mean error, failures.

        The mean calibrated error is over the compressed layers (failed ones are dense).
        """
        entries = sum(r["shape"][0] * r["shape"][1] for r in self)
        nnz = sum(r["nnz"] for r in self)
        compressed = [r for r in self if "error" not in r]
        return {
            "layers": len(self),
            "entries": entries,
            "nnz": nnz,
            "density": nnz / entries if entries else float("nan"),
            "mean_calibrated_err": (
                float(np.mean([r["calibrated_err"] for r in compressed])) if compressed else float("nan")
            ),
            "seconds": float(sum(r["seconds"] for r in self)),
            "failed": len(self) - len(compressed),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "layers": list(self), "skipped": list(self.skipped)}

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
        for r in self.failed:
            lines.append(f"- **{r['name']}: the fit failed, the layer is kept dense** ({r['error']})")
        for r in self.skipped:
            lines.append(f"- {r['name']}: not compressed ({r['reason']})")
        text = "\n".join(lines)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text


# ---------------------------------------------------------------------- model
def _check_per_layer_params(layer_params: Any, client: Any, checkpoint_dir: Any) -> dict[str, dict[str, Any]]:
    """``layer_params`` as ``{name: dict}``; ``ValueError`` for a bad value or an unsupported combination."""
    if layer_params is None:
        return {}
    if not isinstance(layer_params, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Mapping) for k, v in layer_params.items()):
        raise TypeError("layer_params must map layer names to parameter dicts")
    if layer_params and client is not None:
        raise ValueError("layer_params= and client= cannot be combined yet (the cluster jobs share "
                         "parameters)")
    if layer_params and checkpoint_dir is not None:
        raise ValueError("layer_params= and checkpoint_dir= cannot be combined yet (the checkpoint manifest "
                         "records the shared parameters only)")
    return {k: dict(v) for k, v in layer_params.items()}


def _density_for(density: Any, name: str) -> float:
    if isinstance(density, Mapping):
        if name in density:
            return float(density[name])
        if "*" in density:
            return float(density["*"])
        raise KeyError(f"density: no entry for layer {name!r} (add it, or a default under '*')")
    return float(density)


@dataclass
class _Run:
    """What every layer of one :func:`compress_model` call shares, and what it has changed.

    ``originals`` records every layer touched (container, attribute name, the original
    module and a copy of its weight), so that :meth:`restore` can put the caller's model back
    exactly as it was when the run fails or is interrupted.
    """

    method: Any
    spec: MethodSpec
    density: Any
    params: dict[str, Any]
    threads: int | None
    replace: bool
    statistic: str  # "gram", "diag" or "none": what is captured
    bar: Any
    on_error: str = "skip"
    checkpoint: LayerCheckpoint | None = None
    client: Any = None
    report: CompressionReport = field(default_factory=CompressionReport)
    #: extra estimator parameters of single layers (full layer name -> parameters)
    layer_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: seconds spent in each layer's capture hooks (full layer name), set by the capture passes
    capture_seconds: dict[str, float] = field(default_factory=dict)
    originals: list[tuple[nn.Module, str, nn.Module, torch.Tensor]] = field(default_factory=list)

    def layer(self, model: nn.Module, name: str, module: nn.Module, calibration: Calibration | None,
              full_name: str | None = None) -> None:
        """Fit the layer at ``name`` in ``model`` (pure), install the result, record the row."""
        self.layers([(model, name, module, calibration, full_name or name)])

    def layers(self, items: Sequence[tuple[nn.Module, str, nn.Module, Calibration | None, str]]) -> None:
        """Fit layers that share their inputs (one capture pass), then install them in order.

        Finished layers found in the checkpoint are installed without a fit; the others are
        fitted -- on the Dask cluster when there is one (in parallel), else one after another
        -- and saved to the checkpoint as soon as each finishes.
        """
        results: dict[str, Any] = {}
        todo = []
        for item in items:
            full = item[4]
            done = self.checkpoint.load(full) if self.checkpoint is not None else None
            if done is not None:
                results[full] = LayerResult(done, {**done.row, "from_checkpoint": True})
            else:
                todo.append(item)
        specs = {
            item[4]: LayerSpec(self.method, _density_for(self.density, item[4]),
                               {**self.params, **self.layer_params.get(item[4], {})}, self.threads,
                               item[4])
            for item in todo
        }
        if self.client is not None and todo:
            results.update(self._fit_on_cluster(todo, specs))
        else:
            for item in todo:
                results[item[4]] = self._fit_one(item, specs[item[4]])
        for container, name, module, calibration, full in items:
            self._install(container, name, module, calibration, full, results[full])

    def _fit_one(self, item, spec: LayerSpec) -> Any:
        _, _, module, calibration, full = item
        try:
            result = fit_layer(_weight_matrix(module), calibration, spec)
        except Exception as exc:
            if self.on_error == "raise":
                raise
            return _failed(exc)
        self._save(full, result)
        return result

    def _fit_on_cluster(self, todo, specs) -> dict[str, Any]:
        from ..parallel import factorize_many

        out: dict[str, Any] = {}

        def finished(job) -> None:
            if job.ok:
                self._save(job.name, job.result)

        by_density: dict[float, list] = {}
        for item in todo:
            by_density.setdefault(specs[item[4]].density, []).append(item)
        for density, group in by_density.items():
            jobs = [(item[4], _weight_matrix(item[2]), item[3]) for item in group]
            done = factorize_many(jobs, self.method, density=density, client=self.client,
                                  threads=self.threads, progress=finished, **self.params)
            for name, job in done.items():
                if job.ok:
                    out[name] = job.result
                elif self.on_error == "raise":
                    raise RuntimeError(f"layer {name!r} failed on the cluster: {job.error}")
                else:
                    out[name] = _failed(job.error)
        return out

    def _save(self, full: str, result: Any) -> None:
        if self.checkpoint is not None:
            self.checkpoint.save(full, result.estimator.get_factors(), result.row)

    def _install(self, container, name, module, calibration, full, result) -> None:
        self.originals.append((container, name, module, module.weight.detach().clone()))
        if isinstance(result, _FailedLayer):
            W = layer_matrix(module)
            row = {
                "name": full, "type": type(module).__name__, "shape": [int(W.shape[0]), int(W.shape[1])],
                "method": method_name(self.method), "target_density": _density_for(self.density, full),
                "density": 1.0, "nnz": int(W.shape[0] * W.shape[1]), "calibrated_err": 0.0,
                "n_tokens": int(getattr(calibration, "n_samples", 0) or 0), "seconds": 0.0,
                "replaced_by": f"{type(module).__name__} (kept dense: the fit failed)",
                "error": result.error,
            }
        else:
            if calibration is None:
                result.row.setdefault("err_metric", "none")
            row = install_result(container, name, module, result, self.spec, self.replace)
            row["name"] = full
        row["capture_seconds"] = float(self.capture_seconds.get(full, 0.0))
        self.report.append(row)
        self.bar.set_postfix_str(f"{full} err={row['calibrated_err']:.3f}")
        self.bar.update(1)

    def restore(self) -> None:
        """Put every touched layer back: the original module and its original weight values."""
        with torch.no_grad():
            for container, name, module, weight in reversed(self.originals):
                module.weight.copy_(weight)
                current = container.get_submodule(name)
                if current is not module:
                    replace_module(container, name, module)
        self.originals.clear()


@dataclass
class _FailedLayer:
    """A layer whose fit raised (kept dense; reported with its error)."""

    error: str


def _failed(exc: Any) -> _FailedLayer:
    return _FailedLayer(exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}")


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
    measure_error: bool = True,
    on_error: str = "skip",
    checkpoint_dir: str | Path | None = None,
    client: Any = None,
    offload: Any = None,
    layer_params: Mapping[str, Mapping[str, Any]] | None = None,
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
        by its ``x``. A lone tensor or dict is one batch. Not used (may be ``None``) for
        a method that needs no calibration with ``measure_error=False``.
    method : str, estimator class or estimator
        A layer method of the registry (:func:`sparsefact.methods.available_methods`:
        ``"dsf"``, ``"dsf-exact"``, ``"magnitude"``, ``"wanda"``, ``"sparsegpt"``,
        ``"admm"``, ``"lowrank"`` and any registered with :func:`sparsefact.register_method`),
        or a :class:`~sparsefact.base.BaseCompressor` class or instance (an instance is cloned
        for each layer). The registry entry says which calibration statistic the method needs
        and which module family holds its result. Pruning-at-initialisation scorers
        (``kind="scorer"``) are whole-network methods and are refused.
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
        Replace layers by the method's module family (default; :mod:`~.install`:
        :class:`DoubleSparseLinear` / :class:`SparseLinear` / :class:`LowRankLinear` and
        their Conv2d counterparts), or write the compressed weight (the product of the
        factors) into the existing dense weight (``False``). A Conv2d with a non-zero
        ``padding_mode`` is always written in place.
    forward : callable, optional
        ``forward(model, batch)`` to call the model on a batch, for unusual inputs.
    threads : int, optional
        Limit Numba's and the BLAS libraries' thread pools to this many threads while a
        layer is fitted (restored afterwards); ``None`` leaves them alone. On a busy
        shared machine ``1`` can be much faster: a 384x384 DSF fit (8 outer iterations)
        after torch forwards took 1.1 s with one thread and 13-36 s with two on 2 busy cores.
    measure_error : bool, default=True
        Capture the full input Gram of every layer whatever the method needs, so every
        row's ``calibrated_err`` is the calibrated error ``||(W - W_hat) X^T|| / ||W X^T||``
        (the numbers of earlier versions). ``False`` captures only what the method's fit
        uses (its registry entry's ``needs``): ``"gram"`` -- the full Gram, as before;
        ``"diag"`` (Wanda) -- only the Gram's diagonal, accumulated in the hooks (n floats
        per layer instead of an n x n float64 matrix), and ``calibrated_err`` is then in the
        diagonal metric (``err_metric="diag"`` in the row); ``"none"`` (magnitude pruning) --
        no calibration pass at all: layers are fitted without calibration and
        ``calibrated_err`` is the plain relative error ``||W - W_hat|| / ||W||``
        (``err_metric="none"``, ``n_tokens=0``). The compressed weights are the same either way.
    on_error : {"skip", "raise"}, default="skip"
        What a layer whose *fit* raises does: ``"skip"`` keeps that layer dense, reports it
        (its row has an ``"error"``; :attr:`CompressionReport.failed`), warns, and compresses
        the others; ``"raise"`` stops. Any other failure -- bad arguments, a capture that
        raises, ``KeyboardInterrupt`` -- leaves the model exactly as it was (every touched
        layer is put back) and re-raises: the caller's model is either compressed or unchanged.
        Arguments (method, parameters, every layer's density) are validated before the first
        layer is touched.
    checkpoint_dir : path, optional
        Resumable run: every finished layer is written there atomically (temporary file,
        fsync, rename) under a manifest of the run (model weights' digest, method, parameters,
        densities, layers, calibration data digest). Run again with the same arguments after a
        crash or a kill (SIGKILL included) and the finished layers are installed from disk
        instead of fitted; the result is the same model, bit for bit, as an uninterrupted
        run. A directory written by a run with other arguments is refused
        (:class:`~sparsefact.checkpoint.CheckpointMismatchError`), never mixed in.
    client : dask.distributed.Client, optional
        Fit the layers that share their inputs -- the layers of one block (block mode), or
        all layers (``sequential=False`` or no calibration) -- in parallel on the cluster
        (:func:`sparsefact.factorize_many`); blocks stay in order, each calibrated on the
        previous compressed block's outputs. The progress bar follows the finished fits.
    offload : BlockOffloader or path, optional
        Models larger than memory (:mod:`~.offload`): the model is built on the ``meta``
        device and each block is read from (sharded) safetensors just before it is
        compressed, written to the output folder atomically once its outputs for the next block
        are computed, and freed; blocks after the last compressed one are not run (they are
        copied at the end). Peak memory is about one block plus the calibration activations
        and the tensors outside the blocks. A :class:`~.offload.BlockOffloader`, or an output
        folder (the source is then the local folder in ``model.config._name_or_path``).
        Block mode only; not with ``checkpoint_dir`` or a method needing no calibration pass
        (``measure_error=False`` with magnitude pruning). The compressed weights are those of
        a run without offload, bit for bit; the returned model keeps its blocks dense on
        ``meta``: :func:`~.offload.load_offloaded` assembles the compressed model. A run that
        fails leaves the output folder without its ``index.json`` (incomplete).
    layer_params : {layer name: {parameter: value}}, optional
        Extra estimator parameters of single layers (full dotted names), on top of ``params``:
        e.g. ``{"fc1": {"init_factors": (A, B)}}`` warm-starts DSF on that layer
        (:func:`~.finetune.compress_gradually` does). Not with ``client`` or ``checkpoint_dir``.
    **params
        Passed to the estimator's constructor (e.g. ``max_iter=8`` for DSF).

    Returns
    -------
    model : nn.Module
    report : CompressionReport
        One dict per layer (see :class:`CompressionReport`).

    Raises
    ------
    ValueError
        An unknown method name, a scorer method, bad estimator parameters or densities,
        ``on_error`` not in ``{"skip", "raise"}``, or a checkpoint of another run; with
        ``offload``: a model without repeated blocks, a source that lacks a tensor the model
        needs or has another shape, or an output folder that is not empty.
    """
    from tqdm.auto import tqdm

    spec = spec_for(method)  # ValueError listing the methods for an unknown name
    if spec.kind == "scorer":
        raise ValueError(
            f"method {spec.name!r} is a pruning-at-initialisation scorer (kind='scorer'): it scores a "
            "whole network through its gradients (pruning at initialisation, a different path), not a "
            "per-layer compressor; compress_model takes the layer methods: "
            + ", ".join(n for n, s in available_methods().items() if s.kind != "scorer")
        )
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    layer_params = _check_per_layer_params(layer_params, client, checkpoint_dir)
    make_estimator(method, 0.5, params)  # fail early on bad parameters
    statistic = "gram" if measure_error else spec.needs
    if statistic not in ("gram", "diag", "none"):
        raise ValueError(f"method {spec.name!r} needs {spec.needs!r}, which compress_model cannot capture")
    if offload is not None:
        from .offload import as_offloader

        if checkpoint_dir is not None:
            raise ValueError("offload= and checkpoint_dir= cannot be combined yet (the checkpoint manifest "
                             "digests every weight up front)")
        if statistic == "none":
            raise ValueError(f"offload= needs a calibration pass; method {spec.name!r} with "
                             "measure_error=False has none (pass measure_error=True)")
        offload = as_offloader(offload, model)
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if use_cache:
        config.use_cache = False
    try:
        with torch.no_grad():
            resolved = _resolve_blocks(model, blocks)
            if resolved is None:
                targets = select_layers(model, layers)
                per_block = None
            else:
                names, mods = resolved
                per_block = [select_layers(b, layers, prefix=n) for n, b in zip(names, mods, strict=True)]
                targets = [t for ts in per_block for t in ts]
            if offload is not None and per_block is None:
                raise ValueError("offload= needs a model with repeated blocks (blocks=...), compressed block "
                                 "by block")
            skipped = []
            if per_block is None and layers is None and len(targets) > 1:
                # A layer-wise model's last layer is its output head (classes, logits): keep it dense.
                skipped.append({"name": targets[-1], "reason": "the output layer of a layer-wise model is "
                                "left dense by default; pass layers=... to choose the layers yourself"})
                targets = targets[:-1]
            _check_targets(targets, density)
            _check_layer_params(method, params, density, targets)
            unknown = sorted(set(layer_params) - set(targets))
            if unknown:
                raise ValueError(f"layer_params names layers that are not compressed: {unknown}")
            if statistic != "none" and calibration_data is not None and not _reiterable(calibration_data):
                calibration_data = list(iter_batches(calibration_data))  # read more than once below
            if client is not None and progress:
                _print_memory_estimate(model, targets, spec)
            checkpoint = None
            if checkpoint_dir is not None:
                checkpoint = LayerCheckpoint(checkpoint_dir, _manifest(
                    model, targets, spec, params, density, sequential, measure_error, replace,
                    None if statistic == "none" else calibration_data))
            bar = tqdm(total=len(targets), desc=f"compress ({method_name(method)})", disable=not progress)
            run = _Run(method, spec, density, dict(params), threads, replace, statistic, bar,
                       on_error, checkpoint, client, layer_params=layer_params)
            run.report.skipped = skipped
            try:
                if statistic == "none":
                    _compress_uncalibrated(model, targets, run)
                elif per_block is None:
                    _compress_layerwise(model, calibration_data, targets, sequential, forward, run)
                else:
                    _compress_blockwise(model, calibration_data, names, mods, per_block, sequential, forward,
                                        run, offload)
            except BaseException as exc:
                run.restore()
                if checkpoint is not None:
                    exc.add_note(
                        f"sparsefact: the model was left unchanged; {len(checkpoint.done())} finished layers "
                        f"are saved in {os.fspath(checkpoint_dir)!r}: run again with the same arguments "
                        "to resume"
                    )
                raise
            finally:
                bar.close()
    finally:
        model.train(was_training)
        if use_cache:
            config.use_cache = use_cache
    if run.report.failed:
        warnings.warn(
            f"compress_model: {len(run.report.failed)} layer(s) could not be compressed and were kept "
            "dense: " + "; ".join(f"{r['name']}: {r['error']}" for r in run.report.failed[:3]),
            RuntimeWarning, stacklevel=2,
        )
    return model, run.report


def _reiterable(data: Any) -> bool:
    """Whether iterating ``data`` twice gives the same batches (not a one-shot iterator)."""
    if isinstance(data, torch.Tensor | dict) or hasattr(data, "keys"):
        return True
    try:
        return iter(data) is not data
    except TypeError:
        return True


def _check_layer_params(method: Any, params: Mapping[str, Any], density: Any, targets: list[str]) -> None:
    """Every layer's estimator parameters (its density included) are valid, before any layer is touched."""
    seen: set[float] = set()
    for name in targets:
        value = _density_for(density, name)
        if value in seen:
            continue
        seen.add(value)
        try:
            validate_params(make_estimator(method, value, params))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"layer {name!r}: {exc}") from exc


def _tensors_of(value: Any) -> list[np.ndarray]:
    """The tensors inside a calibration batch (tensor, mapping, sequence), as NumPy arrays."""
    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().contiguous().numpy()]
    if isinstance(value, Mapping) or hasattr(value, "keys"):
        return [a for k in sorted(value.keys()) for a in _tensors_of(value[k])]
    if isinstance(value, list | tuple):
        return [a for v in value for a in _tensors_of(v)]
    return []


def _manifest(model, targets, spec, params, density, sequential, measure_error, replace, data) -> dict:
    """What identifies a run for its checkpoint (see ``checkpoint_dir``)."""
    modules = dict(model.named_modules())
    weights = [layer_matrix(modules[name]).cpu().numpy() for name in targets]
    calibration = None
    if data is not None:
        calibration = digest_arrays(a for batch in iter_batches(data) for a in _tensors_of(batch))
    return {
        "model": {
            "class": type(model).__name__, "layers": list(targets), "weights_sha256": digest_arrays(weights),
        },
        "method": spec.name,
        "params": {k: repr(v) for k, v in sorted(params.items())},
        "density": (
            {k: float(v) for k, v in density.items()} if isinstance(density, Mapping) else float(density)
        ),
        "sequential": bool(sequential),
        "measure_error": bool(measure_error),
        "replace": bool(replace),
        "calibration_sha256": calibration,
    }


def _check_targets(targets: list[str], density: Any) -> None:
    if not targets:
        raise ValueError("no layers selected for compression (check `layers` and `blocks`)")
    for name in targets:
        _density_for(density, name)


def _compress_uncalibrated(model: nn.Module, targets: list[str], run: _Run) -> None:
    """Every target fitted without calibration: no pass over the data."""
    run.layers([(model, name, model.get_submodule(name), None, name) for name in targets])


def _compress_layerwise(model, data, targets, sequential, forward, run: _Run) -> None:
    if not sequential:
        with ActivationCapture(model, names=targets, statistic=run.statistic) as cap:
            cap.run(data, forward=forward)
        run.capture_seconds.update(cap.seconds)
        modules = dict(model.named_modules())
        run.layers([(model, name, modules[name], cap.calibration(name), name) for name in targets])
        return
    for name in targets:
        with ActivationCapture(model, names=[name], statistic=run.statistic) as cap:
            cap.run(data, forward=forward)
        run.capture_seconds.update(cap.seconds)
        run.layer(model, name, model.get_submodule(name), cap.calibration(name))


def _compress_blockwise(model, data, names, blocks, per_block, sequential, forward, run: _Run,
                        offload: Any = None) -> None:
    last = max(i for i, targets in enumerate(per_block) if targets)  # later blocks need no inputs
    if offload is not None:
        offload.prepare(model, names)  # the tensors outside the blocks, from disk
    inputs = _catch_block_inputs(model, blocks[0], data, forward)
    for block_name, block, targets in zip(names[: last + 1], blocks[: last + 1], per_block, strict=False):
        local = [t[len(block_name) + 1:] for t in targets]
        dense_outputs = []
        if offload is not None:
            offload.load(block_name, block)
        if targets:
            with ActivationCapture(block, names=local, statistic=run.statistic) as cap:
                for args, kwargs, mask in inputs:
                    with token_mask(mask):
                        out = block(*args, **kwargs)
                    if not sequential:
                        dense_outputs.append(_block_hidden(out))
            run.capture_seconds.update({full: cap.seconds[short] for full, short in zip(targets, local,
                                                                                         strict=True)})
            modules = dict(block.named_modules())
            run.layers([(block, short, modules[short], cap.calibration(short), full)
                        for full, short in zip(targets, local, strict=True)])
            del cap, modules  # free the block's Grams before the next block is read
        if block is blocks[last]:
            if offload is not None:
                _offload_store(offload, run, block_name, block)
            break
        if not dense_outputs:  # sequential (or nothing compressed): outputs of the block as it is now
            for args, kwargs, mask in inputs:
                with token_mask(mask):
                    dense_outputs.append(_block_hidden(block(*args, **kwargs)))
        if offload is not None:
            _offload_store(offload, run, block_name, block)
        inputs = [(*_next_inputs(a, k, h), m) for (a, k, m), h in zip(inputs, dense_outputs, strict=True)]
    if offload is not None:
        offload.finish(run.report)


def _offload_store(offload: Any, run: _Run, block_name: str, block: nn.Module) -> None:
    """Write the compressed block out and free it: its original (dense) layers go back on ``meta``."""
    offload.store(block_name, block)
    mine = [o for o in run.originals if o[0] is block]
    run.originals[:] = [o for o in run.originals if o[0] is not block]
    for container, name, module, _ in reversed(mine):
        replace_module(container, name, module.to("meta"))


def _print_memory_estimate(model: nn.Module, targets: list[str], spec: MethodSpec) -> None:
    """Print (stderr) the estimated peak memory of one fit of the largest layer, for sizing workers."""
    import sys

    from ..parallel import estimate_memory

    modules = dict(model.named_modules())
    shapes = [tuple(int(s) for s in layer_matrix(modules[name]).shape) for name in targets]
    largest = max(shapes, key=lambda s: estimate_memory(s, spec.name))
    print(f"sparsefact: each Dask worker needs about {estimate_memory(largest, spec.name) / 2**30:.2f} GiB "
          f"for one fit of the largest layer {largest[0]}x{largest[1]} ({spec.name})", file=sys.stderr)
