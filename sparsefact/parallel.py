"""Many layer fits at once: serially, on local processes, or on a Dask cluster.

:func:`factorize_many` runs :func:`sparsefact.layer_fit.fit_layer` -- the pure layer-fit seam --
over a list of independent jobs ``(name, W, calibration-or-None)``:

- serially (the default),
- on ``n_jobs`` local worker processes (:class:`concurrent.futures.ProcessPoolExecutor`, spawn
  start method), or
- on a ``dask.distributed`` cluster given as ``client=`` (a ``LocalCluster``, an existing
  scheduler, or dask-cuda with one worker per GPU).

The same code runs in all three; results are identical (every fit is deterministic and runs
with an explicit engine and thread count). Details that make the cluster path behave:

- **Threads.** Numba's and the BLAS thread pools inside each task are capped so that the
  workers of a host times the threads of each task never exceed the host's cores
  (``threads = max(1, cores // tasks running at once on the host)``). On 2 cores, two
  worker processes with two BLAS threads each ran the DSF loop several times slower than
  with one thread each (docs/benchmarks.md, "Running on a cluster").
- **Engine.** ``config_context(backend=...)`` is thread-local and ``SPARSEFACT_BACKEND`` may
  differ on a worker, so the engine is resolved here, in the caller, and passed explicitly.
- **Data.** Each ``W`` and calibration Gram is scattered to the cluster once
  (``client.scatter``) and referenced by its task.
- **Faults.** A worker process that dies mid-task has its task retried by Dask (``retries``);
  a job whose fit raises is reported with its error in the result (``result.error``) and the
  other jobs still complete.

``dask`` is optional: without it, ``client=`` raises an ImportError that names the extra to
install (``pip install "sparsefact[distributed]"``); serial and ``n_jobs`` runs need nothing.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import array_api_compat

from .backends import resolve_backend_name
from .calibration import Calibration
from .layer_fit import LayerResult, LayerSpec, fit_layer
from .methods import spec_for

__all__ = ["JobResult", "estimate_memory", "factorize_many"]


@dataclass
class JobResult:
    """The outcome of one job of :func:`factorize_many`.

    Attributes
    ----------
    name : str
    result : LayerResult or None
        The fitted estimator and its report row; ``None`` when the fit raised.
    error : str or None
        ``"ExceptionType: message"`` of a fit that raised (the traceback is in
        ``traceback``); ``None`` on success.
    traceback : str or None
    """

    name: str
    result: LayerResult | None
    error: str | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the fit succeeded."""
        return self.error is None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _run_job(name: str, W: Any, calibration: Calibration | None, spec: LayerSpec) -> JobResult:
    """Fit one job; an exception becomes an error record (the job is not lost)."""
    try:
        return JobResult(name, fit_layer(W, calibration, spec))
    except Exception as exc:  # noqa: BLE001 - every failure is reported, the other jobs go on
        return JobResult(name, None, f"{type(exc).__name__}: {exc}", traceback.format_exc())


def _run_on_worker(name: str, W: Any, calibration: Any, spec: LayerSpec, host_tasks: Mapping[str, int]):
    """The Dask task: cap the threads by the tasks that run at once on this host, then fit."""
    from distributed import get_worker

    worker = get_worker()
    host = worker.address.rsplit(":", 1)[0]
    running = max(1, int(host_tasks.get(host, worker.state.nthreads)))
    if spec.threads is None:
        spec = replace(spec, threads=max(1, _cores() // running))
    return _run_job(name, W, calibration, spec)


def _check_jobs(jobs: Iterable[Any]) -> list[tuple[str, Any, Calibration | None]]:
    checked = []
    seen = set()
    for index, job in enumerate(jobs):
        if not isinstance(job, tuple | list) or len(job) != 3:
            raise TypeError(f"jobs[{index}] must be a (name, W, calibration-or-None) triple, got {job!r:.80}")
        name, W, calibration = job
        if not isinstance(name, str) or not name:
            raise TypeError(f"jobs[{index}]: the name must be a non-empty string, got {name!r}")
        if name in seen:
            raise ValueError(f"jobs: the name {name!r} appears twice (names identify the results)")
        seen.add(name)
        if calibration is not None and not isinstance(calibration, Calibration):
            raise TypeError(
                f"jobs[{index}] ({name!r}): the calibration must be a sparsefact.Calibration or None, "
                f"got {type(calibration).__name__}"
            )
        if getattr(W, "ndim", None) != 2:
            raise ValueError(f"jobs[{index}] ({name!r}): W must be a 2-D array")
        checked.append((name, W, calibration))
    return checked


def _explicit_backend(method: Any, params: dict[str, Any], W: Any) -> dict[str, Any]:
    """``params`` with the engine resolved here (configuration does not travel to workers)."""
    spec = spec_for(method)
    estimator = spec.estimator if isinstance(method, str | type) else type(method)
    if "backend" not in estimator._get_param_names():
        return params
    try:
        xp = array_api_compat.array_namespace(W)
    except TypeError:  # lists and other array-likes become NumPy arrays
        import array_api_compat.numpy as xp
    return {**params, "backend": resolve_backend_name(params.get("backend", "auto"), xp)}


def factorize_many(
    jobs: Iterable[tuple[str, Any, Calibration | None]],
    method: Any = "dsf",
    *,
    density: float = 0.5,
    client: Any = None,
    n_jobs: int | None = None,
    threads: int | None = None,
    retries: int = 2,
    progress: Callable[[JobResult], Any] | None = None,
    **params: Any,
) -> dict[str, JobResult]:
    """Fit ``method`` to every job's matrix; return ``{name: JobResult}`` in the jobs' order.

    Parameters
    ----------
    jobs : iterable of (name, W, calibration or None)
        Independent layer fits: ``W`` of shape (m, n) in any array type (results come back in
        the same type), the layer's :class:`~sparsefact.Calibration` or ``None``.
    method : str, estimator class or estimator, default="dsf"
        A registered method (:func:`sparsefact.available_methods`).
    density : float, default=0.5
        Kept fraction of every matrix.
    client : dask.distributed.Client, optional
        Run on this cluster (``W`` and calibrations are scattered once; see the module
        docstring).
    n_jobs : int, optional
        Run on this many local worker processes (ignored when ``client`` is given).
    threads : int, optional
        Threads per fit (Numba and BLAS). Default: serial runs leave the pools alone;
        parallel runs use ``cores // concurrent fits`` so the machine is not oversubscribed.
    retries : int, default=2
        Dask retries of a task whose worker died (``client`` only).
    progress : callable, optional
        Called with each :class:`JobResult` as it completes (in completion order).
    **params
        Constructor parameters of the method (e.g. ``max_iter=8``).

    Returns
    -------
    dict
        ``{name: JobResult}``; a job whose fit raised has ``error`` set and ``result=None``.

    Raises
    ------
    ImportError
        ``client`` given but ``dask.distributed`` is not installed.
    ValueError, TypeError
        Malformed jobs or parameters (checked before any fit starts).

    Examples
    --------
    >>> import numpy as np
    >>> from sparsefact.parallel import factorize_many
    >>> rng = np.random.default_rng(0)
    >>> jobs = [(f"layer{i}", rng.standard_normal((16, 16)), None) for i in range(3)]
    >>> out = factorize_many(jobs, "magnitude", density=0.25)
    >>> [r.result.row["nnz"] for r in out.values()]
    [64, 64, 64]
    """
    checked = _check_jobs(jobs)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
    if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1):
        raise ValueError(f"n_jobs must be a positive integer or None, got {n_jobs!r}")
    if isinstance(method, str):
        from .methods import make_estimator

        make_estimator(method, density, params)  # unknown methods and parameters fail here, once
    specs = {
        name: LayerSpec(method, density, _explicit_backend(method, dict(params), W), threads, name)
        for name, W, _ in checked
    }
    if client is not None:
        results = _run_dask(client, checked, specs, retries, progress)
    elif n_jobs is not None and n_jobs > 1 and len(checked) > 1:
        results = _run_processes(checked, specs, n_jobs, threads, progress)
    else:
        results = {}
        for name, W, calibration in checked:
            results[name] = _run_job(name, W, calibration, specs[name])
            if progress is not None:
                progress(results[name])
    return {name: results[name] for name, _, _ in checked}


def _run_processes(checked, specs, n_jobs, threads, progress) -> dict[str, JobResult]:
    import multiprocessing

    workers = min(n_jobs, len(checked))
    per_fit = threads if threads is not None else max(1, _cores() // workers)
    results = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {
            pool.submit(_run_job, name, W, calibration, replace(specs[name], threads=per_fit)): name
            for name, W, calibration in checked
        }
        from concurrent.futures import as_completed

        for future in as_completed(futures):
            result = future.result()
            results[result.name] = result
            if progress is not None:
                progress(result)
    return results


def _dask():
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            "factorize_many(client=...) needs dask.distributed: pip install \"sparsefact[distributed]\""
        ) from exc
    return distributed


def _host_tasks(client: Any) -> dict[str, int]:
    """Tasks that run at once per host: the sum of the worker threads on it."""
    totals: dict[str, int] = {}
    for address, info in client.scheduler_info(n_workers=-1)["workers"].items():
        host = address.rsplit(":", 1)[0]
        totals[host] = totals.get(host, 0) + int(info.get("nthreads", 1))
    return totals


def _run_dask(client, checked, specs, retries, progress) -> dict[str, JobResult]:
    distributed = _dask()
    host_tasks = _host_tasks(client)
    inputs = {name: (W, calibration) for name, W, calibration in checked}

    def submit(name: str) -> Any:
        # Scattered once per attempt; Dask retries a task whose worker died while the data
        # survives, and a task whose scattered inputs died with their worker is resubmitted
        # from the caller's copy below.
        W, calibration = inputs[name]
        data = client.scatter([W, calibration], hash=False)
        return client.submit(
            _run_on_worker, name, data[0], data[1], specs[name], host_tasks, pure=False, retries=retries
        )

    futures = {submit(name): name for name in inputs}
    attempts = dict.fromkeys(inputs, 1)
    results = {}
    pending = distributed.as_completed(list(futures))
    for future in pending:
        name = futures.pop(future)
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - lost inputs, or KilledWorker after the retries
            if attempts[name] <= retries:
                attempts[name] += 1
                again = submit(name)
                futures[again] = name
                pending.add(again)
                continue
            result = JobResult(name, None, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        results[result.name] = result
        if progress is not None:
            progress(result)
    return results


def estimate_memory(shape: tuple[int, int], method: Any = "dsf", *, itemsize: int = 4) -> int:
    """Rough peak bytes of one fit of an (m, n) layer, for sizing Dask workers.

    Counts the dense arrays a fit holds at once: for DSF, the target and both factors with
    their ADMM states (``k = min(m, n)``, ``P = max(m, n)``: about ``6 k P + 6 k^2`` numbers)
    plus the calibration Gram ``n^2`` in float64 and its working copy; for single-sparse and
    low-rank methods ``4 m n`` numbers plus the Gram and one ``n x n`` inverse. An estimate,
    not a bound (measured peaks in docs/benchmarks.md).
    """
    m, n = (int(s) for s in shape)
    k, P = min(m, n), max(m, n)
    gram = n * n * (8 + itemsize)
    name = spec_for(method).name if not isinstance(method, str) else method
    if name.startswith("dsf"):
        return (6 * k * P + 6 * k * k) * itemsize + gram
    return 4 * m * n * itemsize + gram + n * n * itemsize
