"""GPU engine for CuPy arrays.

Only imported when the input is a CuPy array (or ``backend="cupy"``). The math is the
portable array-API engine; this class swaps in CuPy's partial selection for the
threshold, which avoids a full sort of every factor.
"""

from __future__ import annotations

from .array_api import ArrayAPIEngine


def gpu_available() -> bool:
    """True when CuPy is installed and a CUDA device can be used."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:  # driver missing or broken
        return False


class CupyEngine(ArrayAPIEngine):
    """Kernels for CuPy arrays (GPU)."""

    name = "cupy"

    def __init__(self) -> None:
        if not gpu_available():
            raise RuntimeError(
                "backend='cupy' needs CuPy and a working CUDA device; "
                "cupy.cuda.is_available() is False on this machine"
            )
        import array_api_compat.cupy as cp_compat

        super().__init__(cp_compat)

    def kth_smallest_abs(self, v, index):
        import cupy

        flat = cupy.abs(v).ravel()
        return float(cupy.partition(flat, index)[index])

    def to_sparse(self, dense):  # pragma: no cover - needs a GPU
        import cupyx.scipy.sparse as csp

        return csp.csr_matrix(dense)
