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
- :func:`adaptive_threads` -- around every fit on the CPU engine: the pools run on at most the
  cores free when the fit starts (:func:`free_cores`). With one of two cores taken by another
  process, a DSF fit on two threads took 2.5x as long as on one thread (the parallel products
  wait for the thread that shares its core; ``benchmarks/bench_busy_machine.py``), so a fit
  that finds a core taken gives it up.

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
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = [
    "adaptive_threads", "free_cores", "limit_threads", "one_blas_thread", "single_threaded_foreign_blas",
]

#: Environment variable that turns :func:`adaptive_threads` off (``0``, ``false``, ``no``, ``off``).
ADAPT_ENV = "SPARSEFACT_ADAPT_THREADS"
#: Snapshots of the run queue taken by :func:`free_cores` when the first one shows other work.
BUSY_SAMPLES = 3

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


def _own_running_threads() -> int:
    """Threads of this process that are running or runnable now (``R`` in ``/proc/self/task``)."""
    count = 0
    for task in os.scandir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # the thread ended between the listing and the read
            continue
        if stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"R":
            count += 1
    return count


def _others_running() -> int:
    """Runnable threads on the machine now that are not this process's (a snapshot)."""
    with open("/proc/loadavg") as f:
        runnable = int(f.read().split()[3].split("/")[0])
    return max(runnable - _own_running_threads(), 0)


def free_cores() -> int | None:
    """Cores this process may use that no other process is running on now; ``None`` if unknown.

    The cores in this process's affinity mask, less the threads of other processes that the
    kernel reports as runnable (``/proc/loadavg``'s run-queue count, less this process's own
    running threads -- idle BLAS workers that still spin count as this process's). A snapshot
    is cheap (~0.2 ms) but catches short-lived work too, so when the first one shows other
    work, :data:`BUSY_SAMPLES` snapshots ~1 ms apart are taken and the fewest others seen is
    used: a process that keeps a core busy shows in every one. Outside Linux (no ``/proc``)
    the answer is ``None``.

    Returns
    -------
    int or None
        Free cores, at least 0.
    """
    try:
        cores = len(os.sched_getaffinity(0))
        others = _others_running()
        for _ in range(BUSY_SAMPLES - 1):
            if others == 0:
                break
            time.sleep(0.001)
            others = min(others, _others_running())
    except (OSError, AttributeError, ValueError, IndexError):
        return None
    return max(cores - others, 0)


def _adaptation_wanted() -> bool:
    from .._config import get_config

    if os.environ.get(ADAPT_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return bool(get_config()["adapt_threads"])


def _widest_pool() -> int:
    """The largest thread count among the loaded BLAS/OpenMP libraries and Numba."""
    import numba

    counts = [lc.num_threads for lc in _get_controller().lib_controllers]
    return max([numba.get_num_threads(), *counts])


@contextlib.contextmanager
def adaptive_threads() -> Iterator[int | None]:
    """Run the block on at most the cores free now (:func:`free_cores`); yields the limit or None.

    Nothing changes when the pools already fit in the free cores, when the free cores cannot
    be told (no ``/proc``), or when adaptation is off (``config_context(adapt_threads=False)``
    or ``SPARSEFACT_ADAPT_THREADS=0``). Otherwise the block runs under
    ``limit_threads(max(1, free))``; limits already held by the caller still apply (the
    smallest wins), so this only ever lowers thread counts, and everything is restored on exit.
    """
    if not _adaptation_wanted():
        yield None
        return
    widest = _widest_pool()
    if widest <= 1:
        yield None
        return
    free = free_cores()
    if free is None or free >= widest:
        yield None
        return
    limit = max(1, free)
    with limit_threads(limit):
        yield limit
