"""Install a fitted layer result into a torch model: the module families and the replacement step.

:func:`sparsefact.layer_fit.fit_layer` is pure (a weight matrix and its calibration in, a fitted
estimator and a report row out); this module is the torch side that follows it. The registry
entry of the method (:class:`sparsefact.methods.MethodSpec`) says which *module family* holds its
result:

=====================  ==============================================  ======================================
family                 ``nn.Linear`` (and HF ``Conv1D``)               ``nn.Conv2d`` (groups=1)
=====================  ==============================================  ======================================
``"sparse"``           :class:`~.modules.SparseLinear`                 :class:`~.modules.SparseConv2d`
``"double_sparse"``    :class:`~.modules.DoubleSparseLinear`           :class:`~.modules.DoubleSparseConv2d`
``"lowrank"``          :class:`~.modules.LowRankLinear`                :class:`~.modules.LowRankConv2d`
``"monarch"``          :class:`~.structured_modules.MonarchLinear`     -- (written in place)
``"butterfly"``        :class:`~.structured_modules.ButterflyLinear`   -- (written in place)
=====================  ==============================================  ======================================

``spec.module`` is a family name, a callable ``builder(estimator, layer, bias) -> nn.Module``
(``None`` from it: write in place), or ``None``: the family follows from the number of factors
of ``estimator.get_factors()`` (one -> ``"sparse"``, two -> ``"double_sparse"``).
:func:`register_module_family` adds a family; its classes need a classmethod
``from_layer(layer, factors, *, layout="auto")`` (as every
:class:`~.modules._FactorModule` subclass has), and to be saved by
:func:`~sparsefact.nn_adapters.save_compressed`, to be a ``_FactorModule`` subclass. A class
whose result is not determined by the dense factors (the structured modules: ``get_factors()``
of a Monarch or butterfly estimator is only the dense ``W_hat``) defines a classmethod
``from_layer_estimator(layer, estimator)`` instead, which :func:`build_module` prefers when
present. (The hook has its own name because ``from_estimator`` of the sparse modules already
means ``from_estimator(estimator, bias)``.)

A transformers ``Conv1D`` (GPT-2) counts as a linear layer (its matrix is ``weight.T``).
A Conv2d with a non-zero ``padding_mode`` ("reflect", "replicate", "circular") is not
replaced: the product of the factors is written into its dense kernel, as before the
families existed (the factor modules pad with zeros only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..methods import MethodSpec, spec_for
from .capture import _is_hf_conv1d
from .modules import (
    DoubleSparseConv2d,
    DoubleSparseLinear,
    LowRankConv2d,
    LowRankLinear,
    SparseConv2d,
    SparseLinear,
    replace_module,
)
from .structured_modules import ButterflyLinear, MonarchLinear

__all__ = [
    "build_module",
    "install_result",
    "module_families",
    "register_module_family",
    "unregister_module_family",
    "write_dense",
]

_BUILTIN = ("sparse", "double_sparse", "lowrank", "monarch", "butterfly")
_FAMILIES: dict[str, dict[type, type]] = {
    "sparse": {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d},
    "double_sparse": {nn.Linear: DoubleSparseLinear, nn.Conv2d: DoubleSparseConv2d},
    "lowrank": {nn.Linear: LowRankLinear, nn.Conv2d: LowRankConv2d},
    # no Conv2d class: a convolution's structured approximation is written into its kernel
    "monarch": {nn.Linear: MonarchLinear},
    "butterfly": {nn.Linear: ButterflyLinear},
}
#: family chosen for ``spec.module=None`` from the number of factors
_BY_FACTORS = {1: "sparse", 2: "double_sparse"}


def register_module_family(
    name: str, *, linear: type | None = None, conv2d: type | None = None, replace: bool = False
) -> None:
    """Register the module classes that hold a method's result (``MethodSpec.module = name``).

    Parameters
    ----------
    name : str
        Family name, used as ``register_method(..., module=name)``.
    linear, conv2d : type, optional
        Module class replacing an ``nn.Linear`` (and transformers ``Conv1D``) / an
        ``nn.Conv2d``. Each needs a classmethod ``from_layer(layer, factors, *, layout="auto")``
        building it from the dense factors of ``estimator.get_factors()`` and the layer, or
        ``from_layer_estimator(layer, estimator)`` building it from the fitted estimator;
        subclass :class:`~sparsefact.nn_adapters.modules._FactorModule` to have it saved and
        loaded. A layer kind without a class is compressed in place (dense weight).
    replace : bool, default=False
        Allow replacing an existing user family (the built-in ones cannot be replaced).

    Raises
    ------
    ValueError
        No class given, a bad name, or a name already registered.
    TypeError
        A class without a ``from_layer`` classmethod.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if linear is None and conv2d is None:
        raise ValueError("give at least one of linear= and conv2d=")
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in module family and cannot be replaced")
    if name in _FAMILIES and not replace:
        raise ValueError(f"a module family named {name!r} is already registered (pass replace=True)")
    classes: dict[type, type] = {}
    for kind, cls in ((nn.Linear, linear), (nn.Conv2d, conv2d)):
        if cls is None:
            continue
        if not isinstance(cls, type) or not (callable(getattr(cls, "from_layer", None))
                                             or callable(getattr(cls, "from_layer_estimator", None))):
            raise TypeError(f"{cls!r} must be a module class with a from_layer(layer, factors) "
                            "or from_layer_estimator(layer, estimator) classmethod")
        classes[kind] = cls
    _FAMILIES[name] = classes


def unregister_module_family(name: str) -> None:
    """Remove a user family (``KeyError`` if there is none; the built-in ones stay)."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in module family")
    del _FAMILIES[name]


def module_families() -> dict[str, dict[type, type]]:
    """``{family: {nn.Linear: class, nn.Conv2d: class}}`` of the registered families (a copy)."""
    return {name: dict(classes) for name, classes in _FAMILIES.items()}


def _layer_kind(layer: nn.Module) -> type:
    if isinstance(layer, nn.Linear) or _is_hf_conv1d(layer):
        return nn.Linear
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d
    raise TypeError(f"unsupported layer type {type(layer).__name__} (Linear, Conv2d, Conv1D)")


def _family_of(spec: MethodSpec, estimator: Any) -> str:
    if spec.module is not None:
        return spec.module
    n = len(estimator.get_factors())
    if n not in _BY_FACTORS:
        raise ValueError(
            f"method {spec.name!r} has {n} factors; register it with module=<family or builder> "
            "to say which module holds its result"
        )
    return _BY_FACTORS[n]


def _to_module_like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on ``old``'s device and in its dtype and training mode."""
    param = next(iter(old.parameters()), None)
    if param is not None:
        try:
            new = new.to(device=param.device, dtype=param.dtype)
        except (RuntimeError, TypeError):  # sparse storage that cannot take this dtype: keep float32
            new = new.to(device=param.device)
    new.train(old.training)
    return new


def _bias_of(layer: nn.Module) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return None if bias is None else bias.detach().to(torch.float32).cpu()


def build_module(spec: MethodSpec | Any, estimator: Any, layer: nn.Module) -> nn.Module | None:
    """The module that replaces ``layer`` for a fitted ``estimator``, or ``None`` (keep the dense layer).

    Parameters
    ----------
    spec : MethodSpec, or a method name / class / estimator (looked up in the registry)
        Its ``module`` says which family (or builder) holds the result.
    estimator : fitted compressor
        Its ``get_factors()`` are the dense factors of the compressed weight; a family class
        with a ``from_layer_estimator(layer, estimator)`` classmethod is built by it instead.
    layer : nn.Module
        The dense layer being replaced: its geometry, bias, device, dtype and mode are kept.

    Returns
    -------
    nn.Module or None
        On the layer's device, in its dtype and training mode. ``None`` when the result stays
        in the dense layer: a Conv2d with a non-zero ``padding_mode``, or a family without a
        class for this kind of layer (:func:`install_result` then writes the weight in place).
    """
    spec = spec if isinstance(spec, MethodSpec) else spec_for(spec)
    kind = _layer_kind(layer)
    if kind is nn.Conv2d and layer.padding_mode != "zeros":
        return None  # the factor modules pad with zeros only: write into the dense kernel
    family = _family_of(spec, estimator)
    if callable(family):
        new = family(estimator, layer, _bias_of(layer))
    else:
        if family not in _FAMILIES:
            raise ValueError(f"unknown module family {family!r} of method {spec.name!r}; "
                             f"known: {sorted(_FAMILIES)}")
        cls = _FAMILIES[family].get(kind)
        if cls is None:
            return None
        from_estimator = getattr(cls, "from_layer_estimator", None)
        if callable(from_estimator):
            new = from_estimator(layer, estimator)
        else:
            new = cls.from_layer(layer, estimator.get_factors())
    return None if new is None else _to_module_like(new, layer)


def write_dense(layer: nn.Module, W_hat: Any) -> None:
    """Write the layer matrix ``W_hat`` (out x in) into ``layer``'s dense weight, in place."""
    weight = layer.weight
    values = torch.as_tensor(np.asarray(W_hat))
    if _is_hf_conv1d(layer):
        values = values.T
    with torch.no_grad():
        weight.copy_(values.reshape(weight.shape).to(dtype=weight.dtype, device=weight.device))


def _place(layer: nn.Module, result: Any, spec: MethodSpec, replace: bool) -> nn.Module | None:
    """The replacing module, or ``None`` after writing the result into ``layer`` in place."""
    new = build_module(spec, result.estimator, layer) if replace else None
    if new is None:
        write_dense(layer, result.estimator.reconstruct())
    return new


def _row(row: Mapping[str, Any], layer: nn.Module, new: nn.Module | None, name: str) -> dict[str, Any]:
    """``row`` with ``type`` (after ``name``) and ``replaced_by`` (before ``warnings``) added."""
    rest = {k: v for k, v in row.items() if k not in ("name", "warnings")}
    out: dict[str, Any] = {"name": row.get("name") or name, "type": type(layer).__name__, **rest}
    out["replaced_by"] = type(new).__name__ if new is not None else f"{type(layer).__name__} (in place)"
    if "warnings" in row:
        out["warnings"] = row["warnings"]
    return out


def install_result(
    model: nn.Module,
    name: str,
    layer: nn.Module,
    result: Any,
    spec: MethodSpec | Any,
    replace: bool = True,
) -> dict[str, Any]:
    """Put a :class:`~sparsefact.layer_fit.LayerResult` into ``model`` at ``name``; return its row.

    Parameters
    ----------
    model : nn.Module
        Holds ``layer`` at the dotted path ``name``.
    name : str
    layer : nn.Module
        The dense layer the result was fitted to.
    result : LayerResult
        From :func:`~sparsefact.layer_fit.fit_layer`.
    spec : MethodSpec (or a method name / class / estimator)
    replace : bool, default=True
        Replace ``layer`` by the family's module (:func:`build_module`), or write
        ``result.estimator.reconstruct()`` into its dense weight (``False``).

    Returns
    -------
    dict
        ``result.row`` with ``type`` (the dense layer's class) and ``replaced_by`` (the new
        module's class, or ``"<type> (in place)"``).
    """
    spec = spec if isinstance(spec, MethodSpec) else spec_for(spec)
    new = _place(layer, result, spec, replace)
    if new is not None:
        replace_module(model, name, new)
    return _row(result.row, layer, new, name)
