"""Thread-pool control: the one place that sets how many threads the kernels use.

Three situations, each measured on a 2-core machine (numbers in the docstrings of the
engines and of :func:`sparsefact.nn_adapters.compress_model`):

- :func:`limit_threads` -- a caller's cap on Numba's and every BLAS library's pools for the
  duration of a fit (``threads=`` of ``compress_model``, ``--threads`` of the CLI, the test
  suite). ``None`` leaves everything alone.
- :func:`single_threaded_foreign_blas` -- during a fit on NumPy arrays, every BLAS library
  other than NumPy's own (SciPy's bundled OpenBLAS) is held to one thread, because two
  OpenBLAS pools spinning against each other made the DSF loop 2.5x slower.
- :func:`one_blas_thread` -- loops of many tiny BLAS calls (SparseGPT's per-column updates)
  run with one BLAS thread; thread synchronisation made them up to 20x slower on a loaded
  machine.

Every context restores the previous settings on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import numpy as np

__all__ = ["limit_threads", "one_blas_thread", "single_threaded_foreign_blas"]

_controller = None
_controller_lock = threading.Lock()


def _get_controller():
    """A cached ``threadpoolctl.ThreadpoolController`` (scanning the libraries is slow)."""
    global _controller
    with _controller_lock:
        if _controller is None:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
        return _controller


@contextlib.contextmanager
def limit_threads(threads: int | None) -> Iterator[None]:
    """Numba's and every BLAS library's thread pools limited to ``threads`` (``None``: unchanged)."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int | np.integer) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    import numba
    from threadpoolctl import threadpool_limits

    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        with threadpool_limits(limits=int(threads)):
            yield
    finally:
        numba.set_num_threads(previous)


def one_blas_thread() -> contextlib.AbstractContextManager:
    """Context with every BLAS library limited to one thread."""
    return _get_controller().limit(limits=1, user_api="blas")


def _is_numpy_own(filepath: str) -> bool:
    return "numpy" in os.path.basename(os.path.dirname(filepath)) or filepath.startswith(
        os.path.dirname(np.__file__)
    )


@contextlib.contextmanager
def single_threaded_foreign_blas() -> Iterator[None]:
    """Limit every BLAS library other than NumPy's own to one thread."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a core dependency
        yield
        return
    controller = ThreadpoolController()
    blas = [lc for lc in controller.lib_controllers if lc.user_api == "blas"]
    has_numpy_own = any("numpy" in os.path.basename(os.path.dirname(lc.filepath)) for lc in blas)
    foreign = [lc for lc in blas if has_numpy_own and not _is_numpy_own(lc.filepath)]
    saved = [(lc, lc.num_threads) for lc in foreign]
    try:
        for lc, _ in saved:
            lc.set_num_threads(1)
        yield
    finally:
        for lc, n in saved:
            lc.set_num_threads(n)
