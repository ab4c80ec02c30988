"""Input checks shared by every compressor: one path, errors that name the argument."""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np
from sklearn.utils.validation import check_array

from .backends._host import to_host


def namespace_of(array: Any) -> Any | None:
    """The array-API namespace of ``array`` if it is a non-NumPy array, else None.

    NumPy arrays, lists, pandas frames and other array-likes return None and go through
    scikit-learn's ``check_array``; torch, CuPy and ``array_api_strict`` arrays keep
    their namespace so results stay on their device.
    """
    if isinstance(array, np.ndarray) or not hasattr(array, "__array_namespace__") and not (
        array_api_compat.is_torch_array(array) or array_api_compat.is_cupy_array(array)
    ):
        return None
    xp = array_api_compat.array_namespace(array)
    if array_api_compat.is_numpy_namespace(xp):
        return None
    return xp


def _is_floating(xp: Any, dtype: Any) -> bool:
    return any(dtype == getattr(xp, name, None) for name in ("float32", "float64"))


def half_precision_dtype(value: Any) -> Any | None:
    """The dtype of ``value`` if it is a half-precision float (float16, bfloat16), else None.

    Such inputs are computed in float32 and their results cast back (``check_matrix``
    returns them as float32).
    """
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return None
    if isinstance(value, np.ndarray):
        return dtype if dtype == np.float16 else None
    name = str(dtype).rsplit(".", 1)[-1]  # "torch.float16", "bfloat16", ... (no torch import here)
    return dtype if name in ("float16", "bfloat16") else None


def detach(value: Any) -> Any:
    """``value`` without autograd history (torch tensors that require grad); anything else as is.

    A fit never tracks gradients: its arithmetic on a tensor with ``requires_grad=True``
    would build (and keep) an autograd graph and make ``.numpy()`` of the results fail.
    """
    if array_api_compat.is_torch_array(value) and value.requires_grad:
        return value.detach()
    return value


def check_matrix(value: Any, name: str, *, estimator: Any = None) -> tuple[Any, Any]:
    """Validate a 2-D, non-empty, finite real matrix; return it with its namespace.

    Parameters
    ----------
    value : array-like
        The user's matrix. It is never modified; a converted copy may be returned.
    name : str
        The argument's name, used in every error message.
    estimator : estimator, optional
        For scikit-learn's messages.

    Returns
    -------
    array, namespace
        NumPy inputs come back as float32/float64 NumPy arrays (float16 becomes float32,
        other dtypes float64) with ``array_api_compat.numpy`` as namespace; other
        array-API inputs keep their namespace, device and float32/float64 dtype
        (float16/bfloat16 become float32, integers and booleans float64). Torch tensors
        come back detached from autograd.

    Raises
    ------
    ValueError
        Not 2-D, empty, complex, or containing NaN/inf. Every message names the
        argument (scikit-learn's own messages are prefixed with ``"{name}: "``).
    TypeError
        Sparse or otherwise unsupported containers.
    """
    if value is None:
        raise ValueError(f"{name} is required, got None")
    value = detach(value)
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        value = value.astype(np.float32)  # computed in float32 (results are cast back)
    xp = namespace_of(value)
    if xp is None:
        try:
            checked = check_array(
                value,
                dtype=[np.float64, np.float32],
                ensure_2d=True,
                ensure_all_finite=True,
                input_name=name,
                estimator=estimator,
                ensure_min_samples=1,
                ensure_min_features=1,
            )
        except ValueError as exc:
            # scikit-learn's messages ("Expected 2D array", "Found array with 0
            # sample(s)", "Complex data not supported") do not all say which argument
            # was wrong; keep their text (its checks match on it) and name it.
            message = str(exc)
            if message.startswith(f"Input {name} ") or message.startswith(f"{name}: "):
                raise
            raise ValueError(f"{name}: {message}") from exc
        import array_api_compat.numpy as np_compat

        return checked, np_compat
    if value.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array, got {value.ndim} dimension(s) with shape "
            f"{tuple(value.shape)}. Reshape your data."
        )
    if value.shape[0] == 0 or value.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(value.shape)}")
    if not _is_floating(xp, value.dtype):
        if xp.isdtype(value.dtype, "complex floating"):
            raise ValueError(f"{name}: Complex data not supported (dtype {value.dtype})")
        half = half_precision_dtype(value) is not None
        value = xp.astype(value, xp.float32 if half else xp.float64)
    if not bool(xp.all(xp.isfinite(value))):
        raise ValueError(f"Input {name} contains NaN or infinity.")
    return value, xp


def convert_to_namespace(value: Any, like: Any, xp: Any, dtype: Any = None) -> Any:
    """``value`` in ``like``'s namespace and device, in ``dtype`` (default: ``like``'s dtype)."""
    try:
        same = array_api_compat.array_namespace(value) is xp or (
            array_api_compat.is_numpy_namespace(xp)
            and array_api_compat.is_numpy_array(value)
        )
    except TypeError:
        same = False
    if not same:
        value = to_numpy(value)
    target = like.dtype if dtype is None else dtype
    return xp.asarray(value, dtype=target, device=array_api_compat.device(like))


def max_abs(value: Any) -> float:
    """``max |value|`` as a Python float (0 for an empty array)."""
    xp = array_api_compat.array_namespace(value)
    if value.shape and math.prod(value.shape) == 0:
        return 0.0
    return float(xp.max(xp.abs(value)))


def binary_exponent(value: float) -> int:
    """The ``e`` with ``value = f * 2**e``, ``0.5 <= |f| < 1`` (0 for 0): ``math.frexp``'s exponent."""
    return math.frexp(value)[1] if value else 0


def scale_by_power_of_two(value: Any, exponent: int) -> Any:
    """``value * 2**exponent`` in ``value``'s namespace and dtype (``value`` itself for 0).

    Multiplying by a power of two is exact in binary floating point unless the result
    overflows or becomes subnormal, so scaling an input by ``2**-e`` and its result by
    ``2**e`` changes no digit. The factor is applied in steps small enough to be
    representable in the array's dtype (``2**60`` for float32, ``2**1000`` for float64).
    """
    exponent = int(exponent)
    if exponent == 0:
        return value
    xp = array_api_compat.array_namespace(value)
    step = 1000 if value.dtype == xp.float64 else 60
    out = value
    while exponent:
        part = max(-step, min(step, exponent))
        out = out * (2.0**part)
        exponent -= part
    return out


def to_numpy(value: Any) -> np.ndarray:
    """A NumPy copy (or view) of any array-API array, through DLPack where possible."""
    return to_host(value)


def check_scalar_count(value: Any, name: str, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (for iteration counts and the like)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
