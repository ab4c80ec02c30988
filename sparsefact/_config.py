"""Global configuration: which engine runs the kernels (``config_context``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_local = threading.local()


def get_config() -> dict:
    """The current configuration (a copy)."""
    return {"backend": getattr(_local, "backend", None)}


@contextlib.contextmanager
def config_context(*, backend: str | None = None) -> Iterator[None]:
    """Temporarily choose the engine for estimators created or fitted in the block.

    Parameters
    ----------
    backend : {"auto", "numpy_numba", "array_api", "cupy"} or None
        Engine name; ``None`` keeps the current setting. An estimator's explicit
        ``backend=`` argument (other than ``"auto"``) still wins.

    Examples
    --------
    >>> import sparsefact
    >>> with sparsefact.config_context(backend="array_api"):
    ...     pass
    """
    previous = getattr(_local, "backend", None)
    if backend is not None:
        _local.backend = backend
    try:
        yield
    finally:
        _local.backend = previous
