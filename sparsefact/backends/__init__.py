"""Engines that run the DSF kernels, and how one is chosen for an input array.

Order of precedence (design.md §4): the estimator's explicit ``backend=`` argument,
then :func:`sparsefact.config_context`, then the environment variable
``SPARSEFACT_BACKEND``, then the input's array namespace (NumPy → ``numpy_numba``,
CuPy → ``cupy`` where CuPy can use a CUDA device, anything else → the portable
``array_api`` engine). ``backend="cupy"`` without a usable GPU is an error naming what is missing.
"""

from __future__ import annotations

import os
from typing import Any

from ._base import Engine
from .array_api import ArrayAPIEngine

BACKENDS = ("auto", "numpy_numba", "array_api", "cupy")


def _namespace_kind(xp: Any) -> str:
    name = getattr(xp, "__name__", "")
    if name.endswith("numpy") and "strict" not in name:
        return "numpy"
    if "cupy" in name:
        return "cupy"
    return "other"


def resolve_backend_name(backend: str | None, xp: Any) -> str:
    """The engine name that will run for ``backend`` and an input in namespace ``xp``."""
    from .._config import get_config

    for choice in (backend, get_config()["backend"], os.environ.get("SPARSEFACT_BACKEND")):
        if choice not in (None, "", "auto"):
            if choice not in BACKENDS:
                raise ValueError(
                    f"backend must be one of {BACKENDS}, got {choice!r}"
                )
            name = choice
            break
    else:
        name = {"numpy": "numpy_numba", "cupy": "cupy"}.get(_namespace_kind(xp), "array_api")
        if name == "cupy":
            from .cupy_backend import gpu_available

            if not gpu_available():  # auto never picks the GPU engine without a usable GPU
                name = "array_api"
    kind = _namespace_kind(xp)
    if name == "numpy_numba" and kind != "numpy":
        raise ValueError(
            "backend='numpy_numba' needs NumPy input arrays; got arrays from "
            f"{getattr(xp, '__name__', xp)!r} (use backend='auto' or 'array_api')"
        )
    if name == "cupy" and kind != "cupy":
        from .cupy_backend import gpu_unavailable_reason

        missing = gpu_unavailable_reason()
        where = "" if missing is None else f"; it cannot run on this machine: {missing}"
        raise ValueError(f"backend='cupy' needs CuPy input arrays (convert with cupy.asarray){where}")
    return name


def get_engine(backend: str | None, xp: Any) -> Engine:
    """Instantiate the engine for ``backend`` and namespace ``xp``."""
    name = resolve_backend_name(backend, xp)
    if name == "numpy_numba":
        from .numpy_numba import NumpyNumbaEngine

        return NumpyNumbaEngine()
    if name == "cupy":
        from .cupy_backend import CupyEngine

        return CupyEngine()
    return ArrayAPIEngine(xp)


__all__ = ["BACKENDS", "ArrayAPIEngine", "Engine", "get_engine", "resolve_backend_name"]
