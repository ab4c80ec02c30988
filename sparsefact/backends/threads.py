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

Concurrency. A library's thread count is process-wide, so contexts entered by several
threads at once (two fits in two threads) must not save and restore it independently:
thread A saving 4 and setting 1, thread B saving that 1, A restoring 4 and B restoring 1
would leave the library at 1 thread for good. Every context therefore goes through one
process-wide registry (a lock, and per library the list of limits currently held): the
first holder of a library records its original thread count, the library runs with the
smallest limit held, and when the last holder leaves the original count is restored. Nested
and concurrent contexts compose, and the process is left as it was found (changes made by
others to a library while a sparsefact context holds it are overridden until the last
holder leaves). Numba's thread count is per thread and is saved and restored by the thread
that set it.

Every context restores the previous settings on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["limit_threads", "one_blas_thread", "single_threaded_foreign_blas"]

_controller = None
_controller_lock = threading.Lock()

#: Guards _holds and _originals (and every set_num_threads made through them).
_registry_lock = threading.RLock()
#: Library file path -> the limits currently held on it (one entry per active context).
_holds: dict[str, list[int]] = {}
#: Library file path -> its thread count before the first active context took it.
_originals: dict[str, int] = {}


def _get_controller(refresh: bool = False) -> Any:
    """A cached ``threadpoolctl.ThreadpoolController`` (scanning the libraries takes ~5 ms).

    ``refresh`` rescans, to see libraries loaded since the last scan.
    """
    global _controller
    with _controller_lock:
        if _controller is None or refresh:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
        return _controller


def _acquire(choose: Callable[[list], list], limit: int, rescan: bool = True) -> list[tuple[Any, int]]:
    """Hold ``limit`` threads on the libraries ``choose`` picks from the loaded ones; return the holds.

    With ``rescan``, the libraries are scanned again when nothing is held (so each outermost
    fit-level context sees libraries loaded since); while something is held, the set of
    libraries stays the one being restored.
    """
    with _registry_lock:
        controller = _get_controller(refresh=rescan and not any(_holds.values()))
        taken = []
        for lc in choose(list(controller.lib_controllers)):
            key = lc.filepath
            held = _holds.setdefault(key, [])
            if not held:
                _originals[key] = lc.num_threads
            held.append(int(limit))
            target = min(held)
            if lc.num_threads != target:
                lc.set_num_threads(target)
            taken.append((lc, int(limit)))
        return taken


def _release(taken: list[tuple[Any, int]]) -> None:
    """Give back holds from :func:`_acquire`: the smallest remaining limit, or the original count."""
    with _registry_lock:
        for lc, limit in taken:
            key = lc.filepath
            held = _holds.get(key, [])
            if limit in held:
                held.remove(limit)
            target = min(held) if held else _originals.pop(key, lc.num_threads)
            if not held:
                _holds.pop(key, None)
            if lc.num_threads != target:
                lc.set_num_threads(target)


@contextlib.contextmanager
def _hold(choose: Callable[[list], list], limit: int, rescan: bool = True) -> Iterator[None]:
    taken = _acquire(choose, limit, rescan)
    try:
        yield
    finally:
        _release(taken)


def held_limits() -> dict[str, list[int]]:
    """``{library path: limits held}`` of the active contexts (empty when none is active)."""
    with _registry_lock:
        return {key: list(value) for key, value in _holds.items() if value}


@contextlib.contextmanager
def limit_threads(threads: int | None) -> Iterator[None]:
    """Numba's and every BLAS library's thread pools limited to ``threads`` (``None``: unchanged).

    Parameters
    ----------
    threads : int or None
        Positive thread count; ``None`` changes nothing.

    Raises
    ------
    ValueError
        ``threads`` is not a positive integer or None.
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int | np.integer) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    import numba

    previous = numba.get_num_threads()  # per thread: this thread restores its own
    # torch (if the caller has imported it; never imported here) shares the OpenMP pool whose
    # size threadpoolctl restores from OpenMP's own count, which can differ from what the caller
    # set with torch.set_num_threads: restore torch's count explicitly.
    torch = sys.modules.get("torch")
    previous_torch = torch.get_num_threads() if torch is not None else None
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        with _hold(lambda libs: libs, int(threads)):
            yield
    finally:
        numba.set_num_threads(previous)
        if previous_torch is not None:  # unconditionally: torch's own count can lag OpenMP's
            torch.set_num_threads(previous_torch)


def one_blas_thread() -> contextlib.AbstractContextManager:
    """Context with every BLAS library limited to one thread.

    Entered many times per fit (once per SparseGPT block), so it uses the libraries found by
    the last scan instead of scanning again.
    """
    return _hold(lambda libs: [lc for lc in libs if lc.user_api == "blas"], 1, rescan=False)


def _is_numpy_own(filepath: str) -> bool:
    return "numpy" in os.path.basename(os.path.dirname(filepath)) or filepath.startswith(
        os.path.dirname(np.__file__)
    )


def _foreign_blas(libs: list) -> list:
    """The BLAS libraries other than NumPy's own (none if NumPy's own is not among them)."""
    blas = [lc for lc in libs if lc.user_api == "blas"]
    if not any("numpy" in os.path.basename(os.path.dirname(lc.filepath)) for lc in blas):
        return []
    return [lc for lc in blas if not _is_numpy_own(lc.filepath)]


def single_threaded_foreign_blas() -> contextlib.AbstractContextManager:
    """Limit every BLAS library other than NumPy's own to one thread.

    Only when NumPy's own BLAS is among the loaded libraries (otherwise there is no
    "foreign" one to tell apart and nothing is changed).
    """
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:  # pragma: no cover - threadpoolctl is a core dependency
        return contextlib.nullcontext()
    return _hold(_foreign_blas, 1)
