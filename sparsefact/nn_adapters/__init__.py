"""torch adapters: factor modules, activation capture, model compression, save/load.

This subpackage is the only place that imports torch (``pip install sparsefact[torch]``).
Importing it loads the modules (:mod:`.modules`, and the trainable structured
:class:`MonarchLinear` / :class:`ButterflyLinear` of :mod:`.structured_modules`); the rest is
imported on first use:

- :func:`compress_model` / :class:`CompressionReport` (:mod:`.compress`, the loop of
  capture -> :func:`fit_layer` -> install) and :func:`fit_layer` (:mod:`sparsefact.layer_fit`,
  pure, no torch);
- :func:`register_module_family` (:mod:`.install`, which module family holds a method's result);
- :func:`save_compressed`, :func:`load_compressed`, :func:`compression_report` (:mod:`.io`,
  needs safetensors);
- :func:`prune_at_init`, :func:`compute_scores`, :func:`remove_masks`, :class:`PruneReport`
  (:mod:`.prune_init`, whole-network pruning at initialisation).
"""

from __future__ import annotations

import importlib
from typing import Any

from .modules import (
    DoubleSparseConv2d,
    DoubleSparseLinear,
    LowRankConv2d,
    LowRankLinear,
    SparseConv2d,
    SparseLinear,
    choose_layout,
    replace_module,
)

# imported eagerly, like .modules: the import registers the two classes in MODULE_CLASSES, which
# load_compressed needs to rebuild them in a process that never named them (it costs no more
# than the class definitions: sparsefact.structured is already loaded by sparsefact)
from .structured_modules import ButterflyLinear, MonarchLinear

__all__ = [
    "BlockOffloader",
    "ButterflyLinear",
    "CompressionReport",
    "DoubleSparseConv2d",
    "PruneReport",
    "DoubleSparseLinear",
    "LowRankConv2d",
    "LowRankLinear",
    "MonarchLinear",
    "SparseConv2d",
    "SparseLinear",
    "choose_layout",
    "compress_model",
    "compression_report",
    "compute_scores",
    "fit_layer",
    "load_compressed",
    "load_offloaded",
    "prune_at_init",
    "register_module_family",
    "remove_masks",
    "replace_module",
    "save_compressed",
    "set_trainable",
]

# name -> module that defines it, imported on first access
_LAZY = {
    "compress_model": ".compress",
    "CompressionReport": ".compress",
    "fit_layer": "sparsefact.layer_fit",
    "register_module_family": ".install",
    "compression_report": ".io",
    "load_compressed": ".io",
    "save_compressed": ".io",
    "prune_at_init": ".prune_init",
    "compute_scores": ".prune_init",
    "remove_masks": ".prune_init",
    "PruneReport": ".prune_init",
    "BlockOffloader": ".offload",
    "load_offloaded": ".offload",
    "set_trainable": ".modules",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
