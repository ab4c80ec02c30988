"""DSF fit time on a quiet machine and beside busy processes (issue 19, item 4).

One 384x384 float32 layer with 2,000 calibration rows, DSF at density 0.5 and 20 outer
iterations, fitted with

- ``default``: the default settings, whose pools run on the cores free when the fit starts
  (:func:`sparsefact.backends.threads.adaptive_threads`);
- ``fixed pools``: adaptation off (``config_context(adapt_threads=False)``), the pools at their
  full size -- the default before adaptation;
- ``1`` and ``2``: the pools limited to that many threads
  (:func:`sparsefact.backends.threads.limit_threads`),

first on the quiet machine, then while a second process spins on one core, then beside a
multi-threaded job (a process running float32 GEMMs on all cores' worth of BLAS threads).
Fastest of 3 fits each. Prints the table and writes ``benchmarks/results/bench_busy_machine.json``.
Run it on an otherwise quiet machine: the point is the contrast the busy processes make. Usage::

    python benchmarks/bench_busy_machine.py
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "bench_busy_machine.json"
SETTINGS = ("default", "fixed pools", 1, 2)


def spin(stop: mp.synchronize.Event) -> None:
    """Keep one core busy until ``stop`` is set."""
    x = 0
    while not stop.is_set():
        x += 1


def gemm_job(stop: mp.synchronize.Event) -> None:
    """A multi-threaded neighbour: float32 GEMMs on NumPy's full BLAS pool until ``stop`` is set."""
    a = np.ones((1024, 1024), dtype=np.float32)
    while not stop.is_set():
        a @ a


def fit_seconds(setting: str | int) -> float:
    """Seconds of one DSF fit of the fixed layer under ``setting`` (see the module docstring)."""
    from sparsefact import DoubleSparseFactorization, config_context
    from sparsefact.backends.threads import limit_threads

    rng = np.random.default_rng(0)
    W = rng.standard_normal((384, 384)).astype(np.float32)
    X = rng.standard_normal((2000, 384)).astype(np.float32)
    est = DoubleSparseFactorization(0.5, max_iter=20)
    if setting == "default":
        context = contextlib.nullcontext()
    elif setting == "fixed pools":
        context = config_context(adapt_threads=False)
    else:
        context = limit_threads(int(setting))
    start = time.perf_counter()
    with context, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(W, X)
    return time.perf_counter() - start


def main() -> None:
    fit_seconds("default")  # compile the kernels first
    rows = []
    machines = (("quiet", None), ("one core busy", spin), ("beside a multi-threaded job", gemm_job))
    for label, target in machines:
        stop = mp.Event()
        process = mp.Process(target=target, args=(stop,)) if target is not None else None
        if process is not None:
            process.start()
            time.sleep(1.0)
        for setting in SETTINGS:
            rows.append({"machine": label, "threads": setting,
                         "seconds": min(fit_seconds(setting) for _ in range(3))})
        if process is not None:
            stop.set()
            process.join()
    quiet_default = rows[0]["seconds"]
    print("| machine | threads | seconds | vs quiet default |")
    print("|---|---|---:|---:|")
    for r in rows:
        ratio = r["seconds"] / quiet_default
        print(f"| {r['machine']} | {r['threads']} | {r['seconds']:.2f} | {ratio:.2f}x |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"rows": rows, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                               "load_average_after": os.getloadavg()}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
