"""Training, evaluation and timing for the network experiment, and fine-tuning of compressed layers.

Training is plain and deterministic on the CPU: Adam, cross-entropy, mini-batches drawn from a
``torch.Generator`` seeded per run, no data augmentation, no weight decay; with a fixed seed
and one torch thread two runs give the same weights bit for bit.

Fine-tuning compressed layers
-----------------------------
The modules that :func:`~sparsefact.nn_adapters.compress_model` installs
(:class:`~sparsefact.nn_adapters.SparseLinear`, :class:`~sparsefact.nn_adapters.DoubleSparseLinear`
and their Conv2d counterparts) are inference modules: their factors are buffers. To fine-tune
with the masks fixed, :func:`make_trainable` swaps each of them for a :class:`TrainableFactors`
module whose factors are ``nn.Parameter`` objects multiplied by a fixed boolean mask (the
factor's nonzero pattern) in the forward pass — the gradient of a pruned entry is zero, so
Adam never brings it back. For DSF both factors ``A`` and ``B`` are trained (the product
``A B`` is never formed; a convolution runs as the ``kh x kw`` conv of ``B`` then the 1x1 conv
of ``A``, as :class:`~sparsefact.nn_adapters.DoubleSparseConv2d` does). :func:`freeze` turns
them back into the inference modules (``layout="auto"``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import nn

from ..nn_adapters.modules import (
    DoubleSparseConv2d,
    DoubleSparseLinear,
    SparseConv2d,
    SparseLinear,
    _FactorModule,
    replace_module,
)

__all__ = [
    "TrainableFactors",
    "evaluate",
    "freeze",
    "make_trainable",
    "sparse_inference_model",
    "threads",
    "time_inference",
    "train",
]

_FACTOR_CLASSES = (SparseLinear, DoubleSparseLinear, SparseConv2d, DoubleSparseConv2d)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (restored afterwards); ``None``: unchanged."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``model`` in place with Adam on ``(x, y)``; return ``{"epochs", "loss", "seconds"}``.

    ``loss`` is the mean training loss of each epoch. Only parameters with ``requires_grad``
    are optimised (pruning masks and factor masks are buffers).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    result: dict[str, Any] = {"epochs": int(epochs), "loss": [], "seconds": 0.0}
    if epochs <= 0 or not params:
        return result
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    n = len(y)
    start = time.perf_counter()
    model.train()
    for _ in range(int(epochs)):
        order = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        result["loss"].append(total / max(count, 1))
    model.eval()
    result["seconds"] = time.perf_counter() - start
    return result


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``(x, y)``."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / max(len(y), 1)


@torch.no_grad()
def time_inference(model: nn.Module, batch: torch.Tensor, *, repeats: int = 10,
                   warmup: int = 2) -> tuple[float, float]:
    """``(fastest, median)`` wall-clock seconds of one forward pass of ``batch`` (eval mode, no autograd).

    The fastest of ``repeats`` is the figure least disturbed by other processes on a shared
    machine; the median is reported next to it.
    """
    was = model.training
    model.eval()
    for _ in range(warmup):
        model(batch)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - t0)
    model.train(was)
    return min(times), statistics.median(times)


# ---------------------------------------------------------------------- fine-tuning
class TrainableFactors(nn.Module):
    """A compressed layer with trainable factors under fixed masks (built by :func:`make_trainable`).

    Parameters
    ----------
    source : SparseLinear, DoubleSparseLinear, SparseConv2d or DoubleSparseConv2d
        The inference module; its factors' nonzero patterns become the masks, its values the
        initial parameters, its bias a trainable bias.

    Attributes
    ----------
    factor_names : tuple of str
        ``("weight",)`` or ``("A", "B")``, left to right in the product.
    <name> : nn.Parameter, and ``<name>_mask`` : bool buffer, for each factor.
    """

    def __init__(self, source: _FactorModule) -> None:
        super().__init__()
        if not isinstance(source, _FACTOR_CLASSES):
            raise TypeError(f"cannot fine-tune a {type(source).__name__}")
        self.source_class = type(source)
        self.factor_names = tuple(source._factor_names)
        self.conv = isinstance(source, SparseConv2d | DoubleSparseConv2d)
        for name in self.factor_names:
            W = source.factor(name).detach().clone().to(torch.float32)
            self.register_parameter(name, nn.Parameter(W))
            self.register_buffer(f"{name}_mask", W != 0)
        bias = source.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().to(torch.float32))
        if self.conv:
            self.in_channels, self.out_channels = source.in_channels, source.out_channels
            self.kernel_size, self.stride = source.kernel_size, source.stride
            self.padding, self.dilation = source.padding, source.dilation

    def masked(self, name: str) -> torch.Tensor:
        """Factor ``name`` with its mask applied."""
        return getattr(self, name) * getattr(self, f"{name}_mask")

    @property
    def nnz(self) -> int:
        """Entries kept by the masks."""
        return sum(int(getattr(self, f"{n}_mask").sum()) for n in self.factor_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = [self.masked(n) for n in self.factor_names]
        if not self.conv:
            z = x
            for W in reversed(factors):
                z = F.linear(z, W)
            return z if self.bias is None else z + self.bias
        kh, kw = self.kernel_size
        first = factors[-1]
        z = F.conv2d(x, first.reshape(first.shape[0], self.in_channels, kh, kw),
                     self.bias if len(factors) == 1 else None, self.stride, self.padding, self.dilation)
        if len(factors) == 2:
            A = factors[0]
            z = F.conv2d(z, A[:, :, None, None], self.bias)
        return z

    def to_inference(self) -> _FactorModule:
        """The inference module (``layout="auto"``) of the current masked factors."""
        with torch.no_grad():
            factors = [self.masked(n).detach().clone() for n in self.factor_names]
            bias = None if self.bias is None else self.bias.detach().clone()
            geometry = {}
            if self.conv:
                geometry = {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                            "dilation": self.dilation}
            if len(factors) == 1:
                return self.source_class.from_weight(factors[0], bias, **geometry)
            return self.source_class.from_factors(factors[0], factors[1], bias, **geometry)


def make_trainable(model: nn.Module) -> list[str]:
    """Replace every compressed factor module of ``model`` by a :class:`TrainableFactors`; return names."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, _FACTOR_CLASSES)]
    for name in names:
        replace_module(model, name, TrainableFactors(model.get_submodule(name)))
    return names


def freeze(model: nn.Module) -> list[str]:
    """Turn every :class:`TrainableFactors` of ``model`` back into its inference module."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, TrainableFactors)]
    for name in names:
        replace_module(model, name, model.get_submodule(name).to_inference())
    return names


def sparse_inference_model(model: nn.Module) -> list[str]:
    """Bake the pruning masks of ``model`` in; store the pruned layers as ``SparseLinear`` / ``SparseConv2d``.

    Every layer carrying a :class:`~sparsefact.nn_adapters.prune_init.PruningMask` becomes the
    sparsefact inference module of its masked weight (``layout="auto"``: CSR for very sparse
    large factors, dense otherwise), so that inference time reflects the sparse storage.
    Returns the names of the converted layers.
    """
    from ..nn_adapters.prune_init import get_masks, remove_masks

    names = list(get_masks(model))
    remove_masks(model)
    for name in names:
        layer = model.get_submodule(name)
        W = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        cls = SparseLinear if isinstance(layer, nn.Linear) else SparseConv2d
        replace_module(model, name, cls.from_layer(layer, (W,)))
    return names
