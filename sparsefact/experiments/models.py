"""The networks of the experiment: a 6-layer ReLU MLP and a small VGG-style CNN.

Both end in a two-layer classification *head* — a hidden fully-connected layer, ReLU, and
the output layer — which is either dense (``head="dense"``) or has its hidden layer replaced
by a :class:`~sparsefact.nn_adapters.structured_modules.ButterflyLinear` (``head="butterfly"``;
the output layer to the classes stays a plain ``nn.Linear``, a butterfly of 10 outputs
would be all padding).

* **MLP** (``arch="mlp"``): ``in -> w -> w -> w -> w`` (4 hidden layers, ReLU), then the head
  ``w -> w -> classes``: six linear layers in all (the 6-layer MLP of the pruning-at-
  initialisation studies); ``w`` is ``width``, 100 by default as in the ``fc`` model (``L=6,
  N=100``) of the SynFlow authors' code.
* **CNN** (``arch="cnn"``): VGG-style stages of ``3x3`` convolutions (padding 1) with BatchNorm
  and ReLU, 2x2 max pooling (ceil mode) after each stage given by ``channels`` (default
  ``((8,), (16,), (32,))``: 28x28 -> 14 -> 7 -> 4), flatten, then the head
  ``c·h·w -> hidden -> classes`` (``512 -> 64 -> 10`` on Fashion-MNIST).

``structured="butterfly" | "monarch"`` builds the *structured network* instead: every linear
layer of the MLP but the output layer (for the CNN: the hidden head layer; convolutions have
no butterfly/Monarch form here and stay dense) is a
:class:`~sparsefact.nn_adapters.structured_modules.ButterflyLinear` or
:class:`~sparsefact.nn_adapters.structured_modules.MonarchLinear` trained from scratch.

Layer names are stable (``body.fc1`` ... ``body.fc4``, ``head.fc``, ``head.out``; ``features.conv1`` ...),
so per-layer results of different methods line up.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .names import ARCHS, HEADS, MODEL_NAMES, model_spec

__all__ = [
    "ARCHS",
    "HEADS",
    "MODEL_NAMES",
    "build_model",
    "layer_table",
    "model_spec",
    "parameter_count",
    "structured_linear",
]

def structured_linear(kind: str, in_features: int, out_features: int,
                      n_blocks: int | None = None) -> nn.Module:
    """A trainable ``ButterflyLinear`` or ``MonarchLinear`` (with bias), from ``structured_modules``."""
    from ..nn_adapters.structured_modules import ButterflyLinear, MonarchLinear

    if kind == "butterfly":
        return ButterflyLinear(in_features, out_features, bias=True)
    if kind == "monarch":
        if n_blocks is None:
            raise ValueError("a Monarch layer needs n_blocks")
        return MonarchLinear(in_features, out_features, int(n_blocks), bias=True)
    raise ValueError(f"structured must be 'butterfly' or 'monarch', got {kind!r}")


class _Head(nn.Module):
    """``fc`` (dense or structured) -> ReLU -> ``out`` (dense)."""

    def __init__(self, fc: nn.Module, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.fc = fc
        self.act = nn.ReLU()
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc(x)))


class MLP(nn.Module):
    """Flatten, ``depth - 2`` hidden ReLU layers of ``width``, then the head (two more layers)."""

    def __init__(self, n_features: int, n_classes: int, width: int, depth: int, head_fc: nn.Module,
                 body: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        if depth < 3:
            raise ValueError(f"depth must be at least 3 (body, head, output), got {depth}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(depth - 2):
            if body is not None:
                layers[f"fc{i + 1}"] = body[i]
            else:
                layers[f"fc{i + 1}"] = nn.Linear(n_features if i == 0 else width, width)
            layers[f"act{i + 1}"] = nn.ReLU()
        self.body = nn.Sequential(layers)
        self.head = _Head(head_fc, width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


class VGGSmall(nn.Module):
    """VGG-style stages of 3x3 conv + BatchNorm + ReLU with 2x2 max pooling, flatten, the head."""

    def __init__(self, in_channels: int, n_classes: int, channels: Sequence[Sequence[int]], hidden: int,
                 head_fc: nn.Module) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in, k = in_channels, 0
        for s, stage in enumerate(channels):
            for c_out in stage:
                k += 1
                layers[f"conv{k}"] = nn.Conv2d(c_in, c_out, 3, padding=1)
                layers[f"bn{k}"] = nn.BatchNorm2d(c_out)
                layers[f"relu{k}"] = nn.ReLU()
                c_in = c_out
            layers[f"pool{s + 1}"] = nn.MaxPool2d(2, ceil_mode=True)
        self.features = nn.Sequential(layers)
        self.head = _Head(head_fc, hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def build_model(
    name: str,
    image_shape: Sequence[int],
    n_classes: int,
    *,
    width: int = 100,
    depth: int = 6,
    channels: Sequence[Sequence[int]] = ((8,), (16,), (32,)),
    hidden: int = 64,
    structured: str | None = None,
    n_blocks: int | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Build one of :data:`MODEL_NAMES` (or its structured network), initialised from ``seed``.

    Parameters
    ----------
    name : str
        ``"mlp"``, ``"mlp-butterfly"``, ``"cnn"`` or ``"cnn-butterfly"``.
    image_shape : (C, H, W)
    n_classes : int
    width, depth : int
        MLP hidden width and number of linear layers (6).
    channels, hidden : CNN stages (output channels of each conv, a pooling after each stage) and
        the hidden width of its head.
    structured : {None, "butterfly", "monarch"}
        Build the structured network (see the module docstring); the head variant of ``name``
        is then irrelevant (its hidden layer is structured anyway).
    n_blocks : int, optional
        Monarch block count (``structured="monarch"``).
    seed : int, optional
        ``torch.manual_seed(seed)`` before the layers are created (same seed, same weights).
    """
    arch, head = model_spec(name)
    if structured not in (None, "butterfly", "monarch"):
        raise ValueError(f"structured must be None, 'butterfly' or 'monarch', got {structured!r}")
    if seed is not None:
        torch.manual_seed(int(seed))
    c, h, w = (int(s) for s in image_shape)
    if arch == "mlp":
        fc_in = width
    else:  # flattened features after the stages: each 2x2 pooling (ceil mode) halves H and W, rounding up
        fh, fw = h, w
        for _ in channels:
            fh, fw = -(-fh // 2), -(-fw // 2)
        fc_in = int(list(channels)[-1][-1]) * fh * fw
    fc_out = width if arch == "mlp" else int(hidden)
    if structured is not None:
        head_fc = structured_linear(structured, fc_in, fc_out, n_blocks)
    elif head == "butterfly":
        head_fc = structured_linear("butterfly", fc_in, fc_out)
    else:
        head_fc = nn.Linear(fc_in, fc_out)
    if arch == "mlp":
        body = None
        if structured is not None:
            body = [structured_linear(structured, c * h * w if i == 0 else width, width, n_blocks)
                    for i in range(depth - 2)]
        return MLP(c * h * w, n_classes, width, depth, head_fc, body)
    return VGGSmall(c, n_classes, channels, fc_out, head_fc)


def _is_structured(module: nn.Module) -> bool:
    from ..nn_adapters.structured_modules import ButterflyLinear, MonarchLinear

    return isinstance(module, ButterflyLinear | MonarchLinear)


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer that carries a weight matrix, in ``named_modules`` order."""
    from ..nn_adapters.modules import _FactorModule
    from .training import TrainableFactors

    out = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Linear | nn.Conv2d | _FactorModule | TrainableFactors):
            out.append((name, module))
    return out


def _dense_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in * kh * kw)``: the shape of the layer's dense weight matrix."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    if hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    return (int(module.out_channels),
            int(module.in_channels) * int(module.kernel_size[0]) * int(module.kernel_size[1]))


def _kept_weights(module: nn.Module) -> int:
    """Stored weight entries of a layer: nonzeros of a (masked) dense weight, ``nnz`` of a factor module."""
    if isinstance(module, nn.Linear | nn.Conv2d):  # under a PruningMask, .weight is the masked weight
        return int(torch.count_nonzero(module.weight.detach()))
    return int(module.nnz)


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per weight layer: ``name, type, shape, numel, kept, kept_fraction, structured``.

    ``shape`` is the dense weight matrix ``(out, in·kh·kw)`` and ``numel`` its size; ``kept``
    counts the stored weight entries — nonzeros of a (masked) ``nn.Linear`` / ``nn.Conv2d``,
    ``nnz`` of a compressed factor module (both factors for DSF), the structured parameter
    count of a ``ButterflyLinear`` / ``MonarchLinear`` (``structured=True``; these layers are
    never pruned). Biases are not counted here.
    """
    rows = []
    for name, module in _weight_layers(model):
        out_f, in_f = _dense_shape(module)
        kept = _kept_weights(module)
        numel = out_f * in_f
        rows.append({
            "name": name,
            "type": type(module).__name__,
            "shape": [out_f, in_f],
            "numel": numel,
            "kept": kept,
            "kept_fraction": kept / numel if numel else float("nan"),
            "structured": _is_structured(module),
        })
    return rows


def parameter_count(model: nn.Module) -> int:
    """Stored parameters of ``model``: the kept weight entries of :func:`layer_table` plus every other
    parameter (biases, BatchNorm affine parameters).

    Pruned entries are not counted; a Monarch layer's zero padding is not counted (its
    ``n_parameters``). BatchNorm running statistics and masks are buffers, not parameters.
    """
    layers = dict(_weight_layers(model))
    weights = sum(_kept_weights(m) for m in layers.values())
    skip: set[int] = set()
    for module in layers.values():
        for p in module.parameters(recurse=True):
            skip.add(id(p))
    other = 0
    for p in model.parameters():
        if id(p) not in skip:
            other += p.numel()
    biases = 0
    for module in layers.values():
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            biases += bias.numel()
    return weights + biases + other
