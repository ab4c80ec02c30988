"""Pruning at initialisation (PaI): saliency scores and masks for whole torch networks.

Five saliencies score every weight of a model's ``nn.Linear`` and ``nn.Conv2d``
layers (higher score = more important = kept):

* ``random``: i.i.d. standard normal scores (a random mask; with global scope each
  layer keeps about the same fraction).
* ``magnitude``: ``|θ|``.
* ``snip``: ``|θ ⊙ ∇_θ L|`` with the gradients summed over the pruning batches, divided
  by the sum of all scores. Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning
  based on Connection Sensitivity", ICLR 2019.
* ``grasp``: ``θ ⊙ H g`` (``g = Σ_batches ∇L``, ``H`` the Hessian of ``Σ_batches L``,
  a double-backward Hessian-vector product) with the logits divided by a temperature
  (200), divided by ``|Σ s| + 1e-10``. Wang, Zhang & Grosse, "Picking Winning Tickets
  Before Training by Preserving Gradient Flow", ICLR 2020. The paper's score is
  ``S(−θ) = −θ ⊙ H g`` and it removes the *largest* ``S``; keeping the largest
  ``θ ⊙ H g`` is the same mask, with this module's "higher = kept" convention.
* ``synflow``: data-free. Every floating parameter and buffer is replaced by its
  absolute value in float64, one all-ones input (one example of the data's shape) is
  fed through the model in eval mode, ``R = Σ outputs``, and the score is
  ``|θ ⊙ ∂R/∂θ|``. Tanaka, Kunin, Yamins & Ganguli, "Pruning neural networks without
  any data by iteratively conserving synaptic flow", NeurIPS 2020. It is meant to be
  applied iteratively (100 rounds by default).

:func:`prune_at_init` turns scores into masks that stay applied during training: a
``torch.nn.utils.parametrize`` parametrization (:class:`PruningMask`) multiplies the
weight by a boolean mask buffer, so the gradient of a pruned entry is zero and an
optimiser step cannot bring it back. :func:`remove_masks` bakes the masks into the
weights and removes the parametrizations.

Conventions (see ``docs/pruning_at_init.md``):

* *Density* is the kept fraction. Global scope keeps exactly ``⌊density · total⌋``
  weights over all prunable layers, layer scope ``⌊density · numel⌋`` per layer; the
  floor treats a product within a relative ``1e-9`` of an integer as that integer
  (so density 0.29 of 100 weights keeps 29, not 28 from the binary rounding of 0.29).
* Ties are broken deterministically: among equal scores, the weight that comes first
  (layers in ``model.named_modules()`` order, then the row-major entry index) is kept.
* Scores are computed with the current masks applied (pruned entries have ``θ = 0``)
  and already-pruned weights always rank last, so iterative rounds only remove weights.
* Scoring leaves the model as it was: parameters and buffers (same tensors, same
  values), ``requires_grad`` flags, each module's train/eval flag, no ``.grad`` written
  (gradients come from ``torch.autograd.grad``) and no hooks left behind.

Prunable layers are ``nn.Linear`` and ``nn.Conv2d`` with ``groups=1`` (the layers
:func:`~sparsefact.nn_adapters.capture.is_supported_layer` accepts, less transformers'
``Conv1D``); biases, normalisation layers and embeddings are never pruned. Output heads
are included (as in the reference implementation), unlike the default selection of
``compress_model``.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf
from torch.nn.utils import parametrize

from ..masks import kept_budget
from .capture import is_supported_layer, iter_batches, run_batch, select_layers

__all__ = [
    "PAI_METHODS",
    "PruneReport",
    "PruningMask",
    "compute_scores",
    "get_masks",
    "prune_at_init",
    "remove_masks",
    "score_grasp",
    "score_magnitude",
    "score_random",
    "score_snip",
    "score_synflow",
]

#: Saliency methods of :func:`compute_scores` and :func:`prune_at_init`.
PAI_METHODS = ("random", "magnitude", "snip", "grasp", "synflow")
_SCOPES = {"global": "global", "layer": "layer", "local": "layer"}
_SCHEDULES = ("exponential", "linear")
_GRASP_EPS = 1e-10


# ---------------------------------------------------------------------- masks
class PruningMask(nn.Module):
    """Parametrization ``W ↦ W * mask`` with a boolean ``mask`` buffer of the weight's shape.

    Registered on a layer's ``weight`` by :func:`prune_at_init`; the weight proper is
    then ``layer.parametrizations.weight.original`` and ``layer.weight`` is the masked
    tensor. In a state dict the mask appears as ``<layer>.parametrizations.weight.0.mask``.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    def extra_repr(self) -> str:
        return f"kept={int(self.mask.sum())}/{self.mask.numel()}"


def _mask_of(module: nn.Module) -> PruningMask | None:
    """The layer's :class:`PruningMask`, ``None`` if its weight is not parametrized.

    Raises ``ValueError`` for a weight carrying any other parametrization (the scores
    would have to be taken w.r.t. the parametrized tensor, which is not supported).
    """
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations.weight
    if len(plist) == 1 and isinstance(plist[0], PruningMask):
        return plist[0]
    raise ValueError(
        f"{type(module).__name__}: the weight carries a parametrization other than a single PruningMask "
        f"({[type(p).__name__ for p in plist]}); pruning at initialisation supports plain weights only"
    )


def _weight_param(module: nn.Module) -> tuple[nn.Parameter, torch.Tensor | None]:
    """The layer's weight parameter (the original under a mask) and its mask (or None)."""
    pm = _mask_of(module)
    if pm is None:
        return module.weight, None
    return module.parametrizations.weight.original, pm.mask


def _effective(param: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    w = param.detach()
    return w if mask is None else w * mask


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: boolean mask}`` (copies) of every layer pruned by :func:`prune_at_init`."""
    out = {}
    for name, module in model.named_modules():
        if name and parametrize.is_parametrized(module, "weight"):
            plist = module.parametrizations.weight
            for p in plist:
                if isinstance(p, PruningMask):
                    out[name] = p.mask.detach().clone()
    return out


def _unmask(module: nn.Module, *, leave_parametrized: bool) -> None:
    """Remove the weight's parametrization and put ``weight`` back first among the parameters.

    (``remove_parametrizations`` re-registers it last, which would reorder state dicts.)
    """
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=leave_parametrized)
    params = module._parameters
    if "weight" in params:
        items = [("weight", params["weight"])] + [(k, v) for k, v in params.items() if k != "weight"]
        params.clear()
        params.update(items)


def remove_masks(model: nn.Module) -> list[str]:
    """Bake the pruning masks into the weights and remove the parametrizations.

    Each masked layer gets back a plain ``weight`` parameter (the same ``Parameter``
    object as before pruning, so optimisers keep working) holding ``original * mask``,
    i.e. zeros at pruned entries, and its class is the plain ``nn.Linear`` / ``nn.Conv2d``
    again. Returns the names of the layers that were unmasked.
    """
    names = []
    for name, module in list(model.named_modules()):
        if name and parametrize.is_parametrized(module, "weight") and _mask_of(module) is not None:
            _unmask(module, leave_parametrized=True)
            names.append(name)
    return names


# ---------------------------------------------------------------------- layers
def _prunable_layers(model: nn.Module, layers: Any = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the Linear / Conv2d (groups=1) layers to score and prune."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    names = select_layers(model, layers, skip_heads=False)
    chosen = []
    for name in names:
        module = modules[name]
        if is_supported_layer(module) and isinstance(module, nn.Linear | nn.Conv2d):
            chosen.append((name, module))
        elif (
            isinstance(layers, Sequence)
            and not isinstance(layers, str)
            and all(isinstance(x, str) for x in layers)
        ):
            raise ValueError(
                f"{name!r} is a {type(module).__name__}; pruning at initialisation supports "
                f"nn.Linear and nn.Conv2d (groups=1) only"
            )
    if not chosen:
        raise ValueError(
            "no prunable layers: the model has no nn.Linear or nn.Conv2d (groups=1) layer"
            + ("" if layers is None else f" matching layers={layers!r}")
        )
    for _, module in chosen:
        _mask_of(module)  # rejects foreign parametrizations early
    return chosen


# ---------------------------------------------------------------------- state
@contextlib.contextmanager
def _scoring_state(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    *,
    train_mode: bool = False,
    dtype: torch.dtype | None = None,
    absolute: bool = False,
) -> Iterator[None]:
    """Score inside a state that is fully undone on exit.

    Sets every module to eval (or train) mode, makes ``params`` require grad, and, when
    ``dtype`` or ``absolute`` is set, replaces the data of every floating parameter and
    buffer by a converted (``|·|``, ``dtype``) copy. In train mode the buffers are
    replaced by copies too, so BatchNorm running statistics are not updated. On exit the
    original tensors (the same objects, never written) are put back.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads_flags = [(p, p.requires_grad) for p in params]
    swapped_params: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    swapped_buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
    convert = dtype is not None or absolute

    def _converted(t: torch.Tensor) -> torch.Tensor:
        new = t.detach().to(dtype if dtype is not None else t.dtype, copy=True)
        return new.abs_() if absolute else new

    try:
        model.train(train_mode)
        if convert or train_mode:
            buffer_copies: dict[int, torch.Tensor] = {}
            for module in model.modules():
                if convert:
                    for p in module._parameters.values():
                        if p is None or id(p) in swapped_params or not p.is_floating_point():
                            continue
                        swapped_params[id(p)] = (p, p.data)
                        p.data = _converted(p.data)
                for key, buf in list(module._buffers.items()):
                    if buf is None:
                        continue
                    if id(buf) not in buffer_copies:
                        if buf.is_floating_point() and convert:
                            buffer_copies[id(buf)] = _converted(buf)
                        else:
                            buffer_copies[id(buf)] = buf.detach().clone()
                    swapped_buffers.append((module, key, buf))
                    module._buffers[key] = buffer_copies[id(buf)]
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, data in swapped_params.values():
            p.data = data
        for module, key, buf in swapped_buffers:
            module._buffers[key] = buf
        for p, flag in grads_flags:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


def _output_tensor(out: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, ``.logits`` of a ModelOutput, or element 0."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, list | tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in a model output of type {type(out).__name__}")


def _cast_floats(value: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def _reiterable(data: Any) -> Any:
    """``data`` itself if it can be iterated more than once, else its batches as a list."""
    batches = iter_batches(data)
    try:
        if iter(batches) is batches:  # a one-shot iterator / generator
            return list(batches)
    except TypeError as exc:
        raise TypeError(f"the pruning data must be iterable, got {type(data).__name__}") from exc
    return batches


def _supervised_batches(loader: Any, method: str) -> list[tuple[Any, Any]] | Any:
    if loader is None:
        raise ValueError(f"{method} needs data: pass a loader of (inputs, targets) batches")
    return _reiterable(loader)


def _split_batch(batch: Any, method: str) -> tuple[Any, Any]:
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"{method} needs (inputs, targets) batches, e.g. from a supervised DataLoader; "
        f"got a batch of type {type(batch).__name__}"
    )


def _loss_on_batch(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    method: str,
    *,
    dtype: torch.dtype | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    inputs, target = _split_batch(batch, method)
    out = _output_tensor(run_batch(model, _cast_floats(inputs, dtype)))
    if temperature != 1.0:
        out = out / temperature
    if isinstance(target, torch.Tensor):
        target = target.to(out.device)
    loss = loss_fn(out, target)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")
    return loss.reshape(())


def _as_scores(
    entries: list[tuple[str, nn.Module]], values: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {name: v.detach().to(torch.float64) for (name, _), v in zip(entries, values, strict=True)}


# ---------------------------------------------------------------------- scores
def score_random(
    model: nn.Module, *, seed: int | None = None, layers: Any = None, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Random saliency: i.i.d. N(0, 1) float64 scores for every prunable weight.

    The scores are drawn on the CPU with ``torch.Generator().manual_seed(seed)`` (or
    ``generator``), layer after layer in model order, then moved to the weights'
    device, so a seed gives the same scores on every device. ``seed=None`` draws fresh
    randomness.
    """
    entries = _prunable_layers(model, layers)
    if generator is None:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
    out = {}
    for name, module in entries:
        param, _ = _weight_param(module)
        out[name] = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.device)
    return out


def score_magnitude(model: nn.Module, *, layers: Any = None) -> dict[str, torch.Tensor]:
    """Magnitude saliency ``|θ|`` (float64) of every prunable weight, masks applied."""
    entries = _prunable_layers(model, layers)
    vals = []
    for _, module in entries:
        param, mask = _weight_param(module)
        vals.append(_effective(param, mask).abs())
    return _as_scores(entries, vals)


def score_snip(
    model: nn.Module,
    loader: Any,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    *,
    layers: Any = None,
    train_mode: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """SNIP connection sensitivity (Lee, Ajanthan & Torr, ICLR 2019).

    ``s = |θ ⊙ Σ_b ∇_θ L_b|`` over the batches ``(x, y)`` of ``loader``, divided by the
    sum of ``s`` over all prunable layers (when positive). ``L_b = loss_fn(model(x), y)``
    (default: cross-entropy, mean over the batch).

    Parameters
    ----------
    model : nn.Module
    loader : iterable of (inputs, targets) batches
        A DataLoader, a list of pairs or one pair; ``inputs`` go through the model as
        :func:`~sparsefact.nn_adapters.capture.run_batch` feeds them (a tensor, or a
        dict of keyword arguments).
    loss_fn : callable(output, target) -> scalar tensor, optional
    layers : layer selection, see :func:`prune_at_init`
    train_mode : bool
        Score in train mode (batch statistics in BatchNorm, active dropout) instead of
        eval mode (the reference default). The model's mode and buffers are restored.
    dtype : torch.dtype, optional
        Score in this floating dtype (e.g. ``torch.float64``): parameters, buffers and
        floating inputs are converted for the computation only.
    """
    loss_fn = nnf.cross_entropy if loss_fn is None else loss_fn
    batches = _supervised_batches(loader, "snip")
    entries = _prunable_layers(model, layers)
    pm = [_weight_param(m) for _, m in entries]
    params = [p for p, _ in pm]
    with _scoring_state(model, params, train_mode=train_mode, dtype=dtype):
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        n = 0
        for batch in iter_batches(batches):
            loss = _loss_on_batch(model, batch, loss_fn, "snip", dtype=dtype)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc += g.detach().to(torch.float64)
            n += 1
        if n == 0:
            raise ValueError("snip: the loader yielded no batches")
        scores = [(_effective(p, m).to(torch.float64) * g).abs() for (p, m), g in zip(pm, total, strict=True)]
    norm = sum(float(s.sum()) for s in scores)
    if norm > 0 and math.isfinite(norm):
        scores = [s / norm for s in scores]
    return _as_scores(entries, scores)


def score_grasp(
    model: nn.Module,
    loader: Any,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    temperature: float = 200.0,
    *,
    layers: Any = None,
    train_mode: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """GraSP gradient-flow saliency (Wang, Zhang & Grosse, ICLR 2020), higher = kept.

    With the logits divided by ``temperature``: ``g = Σ_b ∇_θ L_b`` (no graph), then a
    double backward of ``Σ_b ⟨∇_θ L_b, g⟩`` gives ``H g``; the score is ``θ ⊙ H g``
    divided by ``|Σ (θ ⊙ H g)| + 1e-10`` (sum over all prunable layers). θ, g and H
    range over the prunable weights only. Keeping the largest ``θ ⊙ H g`` removes the
    largest ``−θ ⊙ H g``, the paper's rule. Other parameters as :func:`score_snip`.
    """
    loss_fn = nnf.cross_entropy if loss_fn is None else loss_fn
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    batches = _supervised_batches(loader, "grasp")
    entries = _prunable_layers(model, layers)
    pm = [_weight_param(m) for _, m in entries]
    params = [p for p, _ in pm]
    with _scoring_state(model, params, train_mode=train_mode, dtype=dtype):
        stopped = [torch.zeros_like(p) for p in params]
        n = 0
        for batch in iter_batches(batches):
            loss = _loss_on_batch(model, batch, loss_fn, "grasp", dtype=dtype, temperature=temperature)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(stopped, grads, strict=True):
                if g is not None:
                    acc += g.detach()
            n += 1
        if n == 0:
            raise ValueError("grasp: the loader yielded no batches")
        hg = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for batch in iter_batches(batches):
            loss = _loss_on_batch(model, batch, loss_fn, "grasp", dtype=dtype, temperature=temperature)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            terms = [(g * s).sum() for g, s in zip(grads, stopped, strict=True) if g is not None]
            if not terms:
                continue
            z = torch.stack(terms).sum()
            if not z.requires_grad:  # the gradient does not depend on the weights: H = 0
                continue
            hvp = torch.autograd.grad(z, params, allow_unused=True)
            for acc, h in zip(hg, hvp, strict=True):
                if h is not None:
                    acc += h.detach().to(torch.float64)
            del grads, terms, z, hvp
        scores = [_effective(p, m).to(torch.float64) * h for (p, m), h in zip(pm, hg, strict=True)]
    norm = abs(sum(float(s.sum()) for s in scores)) + _GRASP_EPS
    return _as_scores(entries, [s / norm for s in scores])


def _shape_tuple(input_shape: Any) -> tuple[int, ...]:
    if isinstance(input_shape, torch.Size | Sequence) and not isinstance(input_shape, str):
        shape = tuple(int(d) for d in input_shape)
        if shape and all(d > 0 for d in shape):
            return shape
    raise ValueError(f"input_shape must be the shape of one example (positive ints), got {input_shape!r}")


def score_synflow(
    model: nn.Module, input_shape: Sequence[int], *, layers: Any = None
) -> dict[str, torch.Tensor]:
    """SynFlow synaptic saliency (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020); data-free.

    Every floating parameter and buffer is replaced (for the computation only) by its
    absolute value in float64 and the model is put in eval mode; one all-ones input of
    shape ``(1, *input_shape)`` goes through it, ``R = Σ outputs`` and the score is
    ``|θ ⊙ ∂R/∂θ|`` (masks applied, so pruned weights score 0). Afterwards the model is
    exactly as before: its original tensors are put back untouched (this restores the
    signs), and each module's mode and ``requires_grad`` flag are restored.

    Parameters
    ----------
    model : nn.Module
    input_shape : sequence of int
        The shape of one input example, without the batch axis (e.g. ``(3, 32, 32)``).
    layers : layer selection, see :func:`prune_at_init`
    """
    shape = _shape_tuple(input_shape)
    entries = _prunable_layers(model, layers)
    pm = [_weight_param(m) for _, m in entries]
    params = [p for p, _ in pm]
    device = params[0].device
    with _scoring_state(model, params, train_mode=False, dtype=torch.float64, absolute=True):
        ones = torch.ones((1, *shape), dtype=torch.float64, device=device)
        out = _output_tensor(model(ones))
        R = out.sum()
        if R.requires_grad:
            grads = torch.autograd.grad(R, params, allow_unused=True)
        else:
            grads = (None,) * len(params)
        scores = []
        for (p, m), g in zip(pm, grads, strict=True):
            theta = _effective(p, m)  # |θ| in float64 inside the context
            scores.append(torch.zeros_like(theta) if g is None else (theta * g.detach()).abs())
    return _as_scores(entries, scores)


def _input_shape_from(loader: Any) -> tuple[int, ...]:
    if loader is None:
        raise ValueError("synflow needs input_shape (the shape of one example) or a loader to take it from")
    for batch in iter_batches(loader):
        x = batch[0] if isinstance(batch, list | tuple) else batch
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(
                "synflow takes input_shape from the loader's first batch, whose inputs must be a batched "
                "tensor (batch, ...); pass input_shape instead"
            )
        return tuple(x.shape[1:])
    raise ValueError("the loader yielded no batches")


def _check_method(method: Any) -> str:
    key = method.lower() if isinstance(method, str) else method
    if key not in PAI_METHODS:
        raise ValueError(f"unknown pruning-at-init method {method!r}; choose one of {', '.join(PAI_METHODS)}")
    return key


def compute_scores(
    model: nn.Module,
    method: str,
    loader: Any = None,
    *,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    temperature: float = 200.0,
    input_shape: Sequence[int] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    layers: Any = None,
    train_mode: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """``{layer name: float64 score tensor (weight shape)}`` of one saliency ``method``.

    ``method`` is one of :data:`PAI_METHODS`. ``random`` uses ``seed``/``generator``;
    ``snip`` and ``grasp`` need ``loader`` of ``(inputs, targets)`` batches and use
    ``loss_fn`` (default cross-entropy), ``train_mode``, ``dtype`` (and ``temperature``
    for GraSP); ``synflow`` uses ``input_shape`` (default: the shape of one example of
    the loader's first batch). Current pruning masks are applied.
    """
    method = _check_method(method)
    if method == "random":
        return score_random(model, seed=seed, layers=layers, generator=generator)
    if method == "magnitude":
        return score_magnitude(model, layers=layers)
    if method == "snip":
        return score_snip(model, loader, loss_fn, layers=layers, train_mode=train_mode, dtype=dtype)
    if method == "grasp":
        return score_grasp(
            model, loader, loss_fn, temperature, layers=layers, train_mode=train_mode, dtype=dtype
        )
    shape = _input_shape_from(loader) if input_shape is None else input_shape
    return score_synflow(model, shape, layers=layers)


# ---------------------------------------------------------------------- selection
def _top_k_mask(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` best alive entries of flat ``scores`` (at most all alive ones).

    Dead (already pruned) entries are never kept. A stable descending sort, so equal
    scores keep the earlier index first.
    """
    flat = torch.where(alive, scores, torch.full_like(scores, -math.inf))
    keep = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    k = min(k, int(alive.sum()))
    if k > 0:
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        keep[order] = True
    return keep


def _new_masks(
    scores: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    density: float,
    scope: str,
) -> dict[str, torch.Tensor]:
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise ValueError(f"the scores of layer {name!r} contain NaN (overflow?); cannot rank them")
    names = list(scores)
    if scope == "layer":
        out = {}
        for name in names:
            s = scores[name].reshape(-1)
            k = kept_budget(density, s.numel())
            out[name] = _top_k_mask(s, masks[name].reshape(-1).to(s.device), k).reshape(scores[name].shape)
        return out
    device = scores[names[0]].device
    flat = torch.cat([scores[n].reshape(-1).to(device) for n in names])
    alive = torch.cat([masks[n].reshape(-1).to(device) for n in names])
    keep = _top_k_mask(flat, alive, kept_budget(density, flat.numel()))
    out, start = {}, 0
    for name in names:
        numel = scores[name].numel()
        out[name] = keep[start : start + numel].reshape(scores[name].shape)
        start += numel
    return out


def _check_reachable(masks: Mapping[str, torch.Tensor], density: float, scope: str) -> None:
    """Masks only shrink: an already-pruned model cannot be re-pruned to a higher density."""
    if scope == "layer":
        for name, m in masks.items():
            alive, need = int(m.sum()), kept_budget(density, m.numel())
            if need > alive:
                raise ValueError(
                    f"layer {name!r} already keeps only {alive} of {m.numel()} weights, fewer than the "
                    f"{need} that density {density:g} asks for; masks only shrink (remove_masks to restart)"
                )
        return
    total = sum(m.numel() for m in masks.values())
    alive, need = sum(int(m.sum()) for m in masks.values()), kept_budget(density, total)
    if need > alive:
        raise ValueError(
            f"the model already keeps only {alive} of {total} prunable weights, fewer than the {need} that "
            f"density {density:g} asks for; masks only shrink (remove_masks to restart)"
        )


def _round_density(density: float, k: int, rounds: int, schedule: str) -> float:
    if k >= rounds:
        return density
    if schedule == "exponential":
        return density ** (k / rounds)
    return 1.0 - (1.0 - density) * k / rounds


# ---------------------------------------------------------------------- FLOPs
def _example_input(model: nn.Module, loader: Any, input_shape: Any) -> tuple[Any, int] | None:
    """One model input (from the loader, else all ones of ``input_shape``) and its batch size."""
    if loader is not None:
        for batch in iter_batches(loader):
            x = batch[0] if isinstance(batch, list | tuple) else batch
            if isinstance(x, torch.Tensor):
                return x, (int(x.shape[0]) if x.dim() >= 1 else 1)
            if isinstance(x, Mapping) or hasattr(x, "keys"):
                for key in x.keys():  # noqa: SIM118
                    v = x[key]
                    if isinstance(v, torch.Tensor) and v.dim() >= 1:
                        return x, int(v.shape[0])
            return None
        return None
    if input_shape is not None:
        shape = _shape_tuple(input_shape)
        p = next(iter(model.parameters()), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.get_default_dtype()
        device = p.device if p is not None else None
        return torch.ones((1, *shape), dtype=dtype, device=device), 1
    return None


def _positions_per_example(
    model: nn.Module, entries: list[tuple[str, nn.Module]], example: tuple[Any, int]
) -> dict[str, float]:
    """Output positions (Conv2d) / rows (Linear) each layer computes per example, summed over calls."""
    x, batch_size = example
    counts = {name: 0 for name, _ in entries}
    handles = []

    def make_hook(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(module, nn.Conv2d):
                out = output if isinstance(output, torch.Tensor) else output[0]
                counts[name] += out.numel() // max(1, module.out_channels)
            else:
                inp = args[0]
                counts[name] += inp.numel() // max(1, inp.shape[-1]) if inp.dim() else 1

        return hook

    modes = [(m, m.training) for m in model.modules()]
    try:
        for name, module in entries:
            handles.append(module.register_forward_hook(make_hook(name, module)))
        model.eval()
        with torch.no_grad():
            run_batch(model, x)
    finally:
        for h in handles:
            h.remove()
        for m, flag in modes:
            m.training = flag
    return {name: c / batch_size for name, c in counts.items()}


def _as_number(v: float) -> int | float:
    return int(round(v)) if abs(v - round(v)) < 1e-9 else float(v)


# ---------------------------------------------------------------------- report
@dataclass
class PruneReport:
    """What :func:`prune_at_init` did, per layer and in total.

    Each row of ``layers``: ``name, type, shape, numel, kept, kept_fraction,
    flops_dense, flops_kept, collapsed``. FLOPs are multiply-accumulates per input
    example, measured with forward hooks on one example input: Linear ``out · in`` per
    input row (one row per example for 2-D inputs, one per token for sequences), Conv2d
    ``out_channels · in · kh · kw`` per output position; ``flops_kept`` counts only kept
    weights. They are ``None`` when no example input was available (no loader and no
    ``input_shape``). A layer is ``collapsed`` when it keeps no weight at all (the
    network then computes nothing through it).

    ``history`` has one entry per round: ``{"round", "density", "kept"}``.
    """

    method: str
    scope: str
    density: float
    rounds: int
    schedule: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def collapsed_layers(self) -> list[str]:
        return [r["name"] for r in self.layers if r["collapsed"]]

    @property
    def layer_collapse(self) -> bool:
        """Whether any layer was pruned away entirely."""
        return bool(self.collapsed_layers)

    def totals(self) -> dict[str, Any]:
        numel = sum(r["numel"] for r in self.layers)
        kept = sum(r["kept"] for r in self.layers)
        measured = all(r["flops_dense"] is not None for r in self.layers)
        fd = sum(r["flops_dense"] for r in self.layers) if measured else None
        fk = sum(r["flops_kept"] for r in self.layers) if measured else None
        return {
            "layers": len(self.layers),
            "numel": numel,
            "kept": kept,
            "kept_fraction": kept / numel if numel else float("nan"),
            "flops_dense": fd,
            "flops_kept": fk,
            "flops_fraction": (fk / fd if fd else float("nan")) if measured else None,
            "collapsed_layers": self.collapsed_layers,
            "layer_collapse": self.layer_collapse,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "scope": self.scope,
            "density": self.density,
            "rounds": self.rounds,
            "schedule": self.schedule,
            "totals": self.totals(),
            "layers": [dict(r) for r in self.layers],
            "history": [dict(h) for h in self.history],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    def to_markdown(self, path: str | Path | None = None) -> str:
        def fmt(v: Any) -> str:
            return "—" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:,.1f}"

        lines = [
            f"Pruning at init: {self.method}, {self.scope} scope, density {self.density:g}, "
            f"{self.rounds} round(s) ({self.schedule}).",
            "",
            "| layer | type | shape | kept / numel | kept fraction | FLOPs dense | FLOPs kept | collapsed |",
            "|---|---|---|---:|---:|---:|---:|---|",
        ]
        for r in self.layers:
            lines.append(
                f"| {r['name']} | {r['type']} | {'×'.join(str(d) for d in r['shape'])} | "
                f"{r['kept']:,} / {r['numel']:,} | {r['kept_fraction']:.4f} | {fmt(r['flops_dense'])} | "
                f"{fmt(r['flops_kept'])} | {'yes' if r['collapsed'] else ''} |"
            )
        t = self.totals()
        lines.append(
            f"| **total** | | | {t['kept']:,} / {t['numel']:,} | {t['kept_fraction']:.4f} | "
            f"{fmt(t['flops_dense'])} | {fmt(t['flops_kept'])} | {len(t['collapsed_layers']) or ''} |"
        )
        if self.layer_collapse:
            lines.append(f"\n**Layer collapse**: {', '.join(self.collapsed_layers)} keep no weight.")
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text


# ---------------------------------------------------------------------- driver
def _check_density(density: Any) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    d = float(density)
    if not (0.0 < d <= 1.0):
        raise ValueError(f"density must be in (0, 1] (the kept fraction), got {density!r}")
    return d


def prune_at_init(
    model: nn.Module,
    loader: Any,
    method: str,
    density: float,
    *,
    scope: str = "global",
    rounds: int | None = None,
    schedule: str = "exponential",
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    seed: int | None = None,
    layers: Any = None,
    input_shape: Sequence[int] | None = None,
    temperature: float = 200.0,
    train_mode: bool = False,
    dtype: torch.dtype | None = None,
) -> PruneReport:
    """Score the model's Linear / Conv2d weights with ``method`` and mask all but ``density`` of them.

    The masks are :class:`PruningMask` parametrizations of each layer's ``weight``
    (registered once, updated in place by later rounds or calls) and stay applied
    during training; pruned entries of the underlying weights are set to zero.
    :func:`remove_masks` makes the pruning permanent.

    Parameters
    ----------
    model : nn.Module
    loader : iterable of batches, or None
        ``(inputs, targets)`` batches for ``snip``/``grasp`` (required); for the other
        methods it is optional and only gives the example input for FLOPs (and
        SynFlow's ``input_shape``). A one-shot iterator is read once into a list.
    method : {"random", "magnitude", "snip", "grasp", "synflow"}
    density : float in (0, 1]
        Kept fraction of the prunable weights.
    scope : {"global", "layer"}
        ``global``: one ranking over all prunable weights, exactly ``⌊density · total⌋``
        kept (layers can collapse); ``layer`` (alias ``local``): ``⌊density · numel⌋``
        kept in each layer.
    rounds : int, optional
        Iterative pruning rounds ``K`` (default 100 for ``synflow``, 1 otherwise).
        Round ``k`` re-scores the model with the current masks applied and re-masks to
        density ``density ** (k / K)`` (``exponential``) or ``1 − (1 − density) · k / K``
        (``linear``); the last round uses ``density`` exactly.
    schedule : {"exponential", "linear"}
    loss_fn : callable(output, target) -> scalar tensor, optional
        SNIP/GraSP loss, default ``torch.nn.functional.cross_entropy``.
    seed : int, optional
        Seed of the random scores (``random``); the other methods are deterministic
        given the model and the data.
    layers : None, regex, list of names, type(s) or callable
        Which layers to prune, as :func:`~sparsefact.nn_adapters.capture.select_layers`
        takes it (but output heads are included by default). Only ``nn.Linear`` and
        ``nn.Conv2d`` (groups=1) are pruned.
    input_shape : sequence of int, optional
        Shape of one input example, for SynFlow and the FLOPs count when no loader.
    temperature : float
        GraSP's logit temperature (200).
    train_mode, dtype :
        SNIP/GraSP options, see :func:`score_snip`.

    Returns
    -------
    PruneReport
    """
    method = _check_method(method)
    density = _check_density(density)
    if scope not in _SCOPES:
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    scope = _SCOPES[scope]
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(_SCHEDULES)}, got {schedule!r}")
    if rounds is None:
        rounds = 100 if method == "synflow" else 1
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    rounds = int(rounds)
    entries = _prunable_layers(model, layers)
    names = [n for n, _ in entries]

    if method in ("snip", "grasp"):
        loader = _supervised_batches(loader, method)
    elif loader is not None:
        loader = _reiterable(loader)
    if method == "synflow":
        input_shape = _shape_tuple(_input_shape_from(loader) if input_shape is None else input_shape)
    generator = None
    if method == "random":
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))

    # register all-ones masks where there are none yet; remember how to undo on failure
    added: list[nn.Module] = []
    previous: dict[str, torch.Tensor] = {}
    mask_of: dict[str, torch.Tensor] = {}
    history: list[dict[str, Any]] = []
    try:
        for name, module in entries:
            pm = _mask_of(module)
            if pm is None:
                param = module.weight
                parametrize.register_parametrization(
                    module,
                    "weight",
                    PruningMask(torch.ones(param.shape, dtype=torch.bool, device=param.device)),
                )
                added.append(module)
                pm = _mask_of(module)
            else:
                previous[name] = pm.mask.clone()
            mask_of[name] = pm.mask
        _check_reachable(mask_of, density, scope)
        for k in range(1, rounds + 1):
            d_k = _round_density(density, k, rounds, schedule)
            scores = compute_scores(
                model,
                method,
                loader,
                loss_fn=loss_fn,
                temperature=temperature,
                input_shape=input_shape,
                generator=generator,
                layers=names,
                train_mode=train_mode,
                dtype=dtype,
            )
            new = _new_masks(scores, mask_of, d_k, scope)
            for name in names:
                mask_of[name].copy_(new[name].to(mask_of[name].device))
            history.append(
                {"round": k, "density": d_k, "kept": int(sum(int(mask_of[n].sum()) for n in names))}
            )
    except BaseException:
        for name, old in previous.items():
            mask_of[name].copy_(old)
        for module in added:
            _unmask(module, leave_parametrized=False)
        raise

    with torch.no_grad():
        for _, module in entries:
            param, mask = _weight_param(module)
            param.masked_fill_(~mask, 0)

    example = _example_input(model, loader, input_shape)
    positions = _positions_per_example(model, entries, example) if example is not None else None
    rows = []
    for name, module in entries:
        mask = mask_of[name]
        numel = mask.numel()
        kept = int(mask.sum())
        row = {
            "name": name,
            "type": "Linear" if isinstance(module, nn.Linear) else "Conv2d",
            "shape": list(mask.shape),
            "numel": numel,
            "kept": kept,
            "kept_fraction": kept / numel,
            "flops_dense": None if positions is None else _as_number(positions[name] * numel),
            "flops_kept": None if positions is None else _as_number(positions[name] * kept),
            "collapsed": kept == 0,
        }
        rows.append(row)
    return PruneReport(
        method=method,
        scope=scope,
        density=density,
        rounds=rounds,
        schedule=schedule,
        layers=rows,
        history=history,
    )


def _register_scorers() -> None:
    """The whole-network scores in the method registry (``kind="scorer"``; ``sparsefact methods``)."""
    from ..methods import available_methods, register_method

    entries = (
        ("random", score_random, "none", "random scores (a random mask at the density)"),
        ("snip", score_snip, "grad", "SNIP |theta * dL/dtheta| (Lee et al. 2019)"),
        ("grasp", score_grasp, "grad", "GraSP theta * Hg, Hessian-gradient product (Wang et al. 2020)"),
        ("synflow", score_synflow, "none", "SynFlow, data-free iterative synaptic flow (Tanaka et al. 2020)"),
    )
    for name, function, needs, what in entries:
        if name not in available_methods():
            register_method(name, function, kind="scorer", needs=needs, description=f"PaI: {what}")


_register_scorers()
