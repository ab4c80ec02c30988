"""DSF fit time on a quiet machine and beside a busy process (issue 19, item 4: measure first).

One 384x384 float32 layer with 2,000 calibration rows, DSF at density 0.5 and 20 outer
iterations, fitted with the default thread pools (``threads=None``: whatever Numba and the BLAS
use) and with the pools limited to 1 and 2 threads (:func:`sparsefact.backends.threads.limit_threads`),
first on the quiet machine, then while a second process spins on one core. Fastest of 2 fits
each. Prints the table and writes ``benchmarks/results/bench_busy_machine.json``. Run it on an
otherwise quiet machine: the point is the contrast the spinning process makes. Usage::

    python benchmarks/bench_busy_machine.py
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "bench_busy_machine.json"


def spin(stop: mp.synchronize.Event) -> None:
    """Keep one core busy until ``stop`` is set."""
    x = 0
    while not stop.is_set():
        x += 1


def fit_seconds(threads: int | None) -> float:
    """Seconds of one DSF fit of the fixed layer with the pools limited to ``threads``."""
    from sparsefact import DoubleSparseFactorization
    from sparsefact.backends.threads import limit_threads

    rng = np.random.default_rng(0)
    W = rng.standard_normal((384, 384)).astype(np.float32)
    X = rng.standard_normal((2000, 384)).astype(np.float32)
    est = DoubleSparseFactorization(0.5, max_iter=20)
    start = time.perf_counter()
    with limit_threads(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(W, X)
    return time.perf_counter() - start


def main() -> None:
    fit_seconds(None)  # compile the kernels first
    rows = []
    for label, busy in (("quiet", False), ("one core busy", True)):
        stop = mp.Event()
        process = mp.Process(target=spin, args=(stop,)) if busy else None
        if process is not None:
            process.start()
            time.sleep(1.0)
        for threads in (None, 1, 2):
            rows.append({"machine": label, "threads": threads,
                         "seconds": min(fit_seconds(threads) for _ in range(2))})
        if process is not None:
            stop.set()
            process.join()
    quiet_default = rows[0]["seconds"]
    print("| machine | threads | seconds | vs quiet default |")
    print("|---|---|---:|---:|")
    for r in rows:
        name = "default" if r["threads"] is None else str(r["threads"])
        print(f"| {r['machine']} | {name} | {r['seconds']:.2f} | {r['seconds'] / quiet_default:.2f}x |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"rows": rows, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                               "load_average_after": os.getloadavg()}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
