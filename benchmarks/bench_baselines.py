"""Speed of the single-sparse baselines against the dense work they cannot avoid.

For a 1536x384 and a 384x1536 float32 layer with a random calibration Gram, times (best of
``--repeats``): the floor ``W @ G`` + Cholesky of ``G`` (what any OBS-style method must at
least do), SparseGPT's ``fit``, ADMM pruning's ``fit`` (one factorisation reused by all
iterations) and Wanda's ``fit``, and prints each as a ratio to the floor. "SparseGPT
algorithm" times :func:`sparsefact.pruning.sparsegpt_prune` alone, without what every
``fit`` adds (validation, error reports, CSR conversion). The target is SparseGPT within 3x
of the floor.

Usage::

    python benchmarks/bench_baselines.py [--repeats 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from sparsefact import ADMMPruning, Calibration, SparseGPT, Wanda
from sparsefact.masks import kept_budget
from sparsefact.pruning import sparsegpt_prune

METHODS = ("sparsegpt_core", "sparsegpt", "admm", "wanda")


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_baselines.json"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    sparsegpt_params = SparseGPT().get_params()  # the defaults, declared once by the estimator
    defaults = {k: sparsegpt_params[k] for k in ("block_size", "damping")}
    for m, n in ((1536, 384), (384, 1536)):
        W = rng.standard_normal((m, n), dtype=np.float32)
        scales = np.exp(rng.standard_normal(n)).astype(np.float32)
        X = rng.standard_normal((4 * n, n), dtype=np.float32) * scales
        gram = (X.T @ X).astype(np.float32)
        calibration = Calibration.from_gram(gram)
        floor = best_time(lambda W=W, gram=gram: (W @ gram, np.linalg.cholesky(gram)), args.repeats)
        row = {"shape": f"{m}x{n}", "floor_s": floor}
        kept = kept_budget(0.5, m * n)
        row["sparsegpt_core_s"] = best_time(
            lambda W=W, gram=gram, kept=kept: sparsegpt_prune(W, gram, kept=kept, **defaults), args.repeats
        )
        row["sparsegpt_core_ratio"] = row["sparsegpt_core_s"] / floor
        for name, est in (
            ("sparsegpt", SparseGPT(0.5)),
            ("admm", ADMMPruning(0.5)),
            ("wanda", Wanda(0.5)),
        ):
            seconds = best_time(
                lambda est=est, W=W, cal=calibration: est.fit(W, calibration=cal), args.repeats
            )
            row[f"{name}_s"] = seconds
            row[f"{name}_ratio"] = seconds / floor
        rows.append(row)
        timings = "  ".join(
            f"{k} {row[k + '_s'] * 1e3:7.1f} ms ({row[k + '_ratio']:.2f}x)" for k in METHODS
        )
        print(f"{row['shape']:>9}  floor {floor * 1e3:7.1f} ms  {timings}", flush=True)
    lines = [
        "| shape | W@G + Cholesky | SparseGPT algorithm | SparseGPT fit | ADMM fit | Wanda fit |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['floor_s'] * 1e3:.1f} ms | "
            + " | ".join(f"{r[k + '_s'] * 1e3:.1f} ms ({r[k + '_ratio']:.2f}x)" for k in METHODS)
            + " |"
        )
    print("\n" + "\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "numpy": np.__version__}
    Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
