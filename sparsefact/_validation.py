"""Input checks shared by every compressor: one path, errors that name the argument."""

from __future__ import annotations

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
        NumPy inputs come back as float32/float64 NumPy arrays (other dtypes become
        float64) with ``array_api_compat.numpy`` as namespace; other array-API inputs
        keep their namespace, device and floating dtype.

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
        value = xp.astype(value, xp.float64)
    if not bool(xp.all(xp.isfinite(value))):
        raise ValueError(f"Input {name} contains NaN or infinity.")
    return value, xp


def convert_to_namespace(value: Any, like: Any, xp: Any) -> Any:
    """``value`` in ``like``'s namespace, dtype and device."""
    try:
        same = array_api_compat.array_namespace(value) is xp or (
            array_api_compat.is_numpy_namespace(xp)
            and array_api_compat.is_numpy_array(value)
        )
    except TypeError:
        same = False
    if not same:
        value = to_numpy(value)
    return xp.asarray(value, dtype=like.dtype, device=array_api_compat.device(like))


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
