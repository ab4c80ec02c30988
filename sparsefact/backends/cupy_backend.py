"""GPU engine for CuPy arrays.

Only imported when the input is a CuPy array (or ``backend="cupy"``). The math is the
portable array-API engine; this class swaps in CuPy's partial selection for the
threshold, which avoids a full sort of every factor.
"""

from __future__ import annotations

from .array_api import ArrayAPIEngine


def gpu_unavailable_reason() -> str | None:
    """Why the CuPy engine cannot run here, or ``None`` when it can.

    Returns
    -------
    str or None
        What is missing: CuPy itself, or a CUDA device that CuPy can use (with CuPy's own
        error where it raised one).
    """
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({exc}; pip install cupy-cuda12x, matching the CUDA driver)"
    version = getattr(cupy, "__version__", "?")
    try:
        if cupy.cuda.is_available():
            return None
    except Exception as exc:  # driver missing or broken
        return f"CuPy {version} cannot use the CUDA driver ({type(exc).__name__}: {exc})"
    return (f"CuPy {version} is installed but cupy.cuda.is_available() is False "
            "(no CUDA device, no driver, or CUDA_VISIBLE_DEVICES hides it)")


def gpu_available() -> bool:
    """True when CuPy is installed and a CUDA device can be used."""
    return gpu_unavailable_reason() is None


class CupyEngine(ArrayAPIEngine):
    """Kernels for CuPy arrays (GPU)."""

    name = "cupy"

    def __init__(self) -> None:
        missing = gpu_unavailable_reason()
        if missing is not None:
            raise RuntimeError(
                "backend='cupy' needs CuPy and a CUDA device it can use (cupy.cuda.is_available()); "
                f"missing on this machine: {missing}"
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
