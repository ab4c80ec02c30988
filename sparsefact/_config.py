"""Global configuration (``config_context``): the engine of the kernels, whether fits adapt threads."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_local = threading.local()


def get_config() -> dict:
    """The current configuration (a copy)."""
    return {
        "backend": getattr(_local, "backend", None),
        "adapt_threads": getattr(_local, "adapt_threads", True),
    }


@contextlib.contextmanager
def config_context(*, backend: str | None = None, adapt_threads: bool | None = None) -> Iterator[None]:
    """Temporarily choose the engine, and the thread policy, for fits in the block.

    Parameters
    ----------
    backend : {"auto", "numpy_numba", "array_api", "cupy"} or None
        Engine name; ``None`` keeps the current setting. An estimator's explicit
        ``backend=`` argument (other than ``"auto"``) still wins.
    adapt_threads : bool or None
        ``True`` (the default): a fit on the CPU engine runs its thread pools on at most the
        cores that are free when it starts (:func:`sparsefact.backends.threads.free_cores`), so
        that a busy machine slows it down in proportion to the cores taken, not more. ``False``
        leaves the pools at whatever size they have. ``None`` keeps the current setting.

    Examples
    --------
    >>> import sparsefact
    >>> with sparsefact.config_context(backend="array_api"):
    ...     pass
    """
    if adapt_threads is not None and not isinstance(adapt_threads, bool):
        raise TypeError(f"adapt_threads must be True, False or None, got {adapt_threads!r}")
    previous = getattr(_local, "backend", None)
    previous_adapt = getattr(_local, "adapt_threads", True)
    if backend is not None:
        _local.backend = backend
    if adapt_threads is not None:
        _local.adapt_threads = adapt_threads
    try:
        yield
    finally:
        _local.backend = previous
        _local.adapt_threads = previous_adapt
