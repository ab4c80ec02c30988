"""Copies of device arrays on the host (NumPy), for the engines and everything above them."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np


def to_host(value: Any) -> np.ndarray:
    """A NumPy copy (or view) of any array-API array, through DLPack where possible."""
    if isinstance(value, np.ndarray):
        return value
    if array_api_compat.is_torch_array(value):
        return value.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(value):
        return value.get()
    try:
        return np.from_dlpack(value)
    except (TypeError, AttributeError, BufferError, RuntimeError):
        return np.asarray(value)
