"""torch adapters: sparse-factor layer modules, activation capture, model compression, save/load.

This subpackage is the only place that imports torch (``pip install sparsefact[torch]``).
"""

from .modules import DoubleSparseConv2d, DoubleSparseLinear, SparseLinear, choose_layout, replace_module

__all__ = [
    "DoubleSparseConv2d",
    "DoubleSparseLinear",
    "SparseLinear",
    "choose_layout",
    "compression_report",
    "load_compressed",
    "replace_module",
    "save_compressed",
]


def __getattr__(name: str):
    # save/load need safetensors; import them on first use so the modules work without it.
    if name in ("compression_report", "load_compressed", "save_compressed"):
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
