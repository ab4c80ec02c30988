"""Speed of DSF on the CPU engine, as a fraction of the machine's float32 GEMM rate.

For each shape, fits DSF with default settings, calibrated with a random Gram, and
prints: seconds, calibrated error, the FLOPs the algorithm must do (counted by the
solvers: products, Gram products counted as symmetric, Cholesky inversions), the
achieved rate over the GEMM rate measured in the same run, and a per-phase time split
(products = the matrix products, inverses = the Cholesky inversions, selection =
threshold search, element-wise = fused ADMM passes and scalings, other = Python, error
evaluation and everything else).

Usage::

    python benchmarks/bench_dsf.py                      # all shapes
    python benchmarks/bench_dsf.py --shapes 512x512 --json out.json

Writes JSON to ``benchmarks/results/bench_dsf.json`` by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from sparsefact.backends.numpy_numba import NumpyNumbaEngine
from sparsefact.dsf import double_sparse_factorization
from sparsefact.estimators import DoubleSparseFactorization

PHASES = {
    "matmul": "products",
    "spd_inverse": "inverses",
    "spd_inverse_pair": "inverses",
    "kth_smallest_abs": "selection",
    "add_and_select": "selection",
    "column_kth_smallest_abs": "selection",
    "add": "element-wise",
    "admm_update": "element-wise",
    "warm_start": "element-wise",
    "scale_rows": "element-wise",
    "unscale_rows": "element-wise",
    "keep_largest": "selection",
    "row_norms": "element-wise",
    "col_norms": "element-wise",
}


class TimedEngine:
    """Proxy that adds up wall time per phase of the engine's kernels."""

    def __init__(self, engine):
        self._engine = engine
        self.seconds = defaultdict(float)

    def __getattr__(self, name):
        attr = getattr(self._engine, name)
        phase = PHASES.get(name)
        if phase is None or not callable(attr):
            return attr

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = attr(*args, **kwargs)
            self.seconds[phase] += time.perf_counter() - start
            return out

        return timed


def gemm_rate(k: int = 1024, repeats: int = 7) -> float:
    """Best float32 ``k x k @ k x k`` rate in FLOP/s on this machine now."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, k), dtype=np.float32)
    b = rng.standard_normal((k, k), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * k**3 / best


def problem(m: int, n: int, seed: int = 0):
    """Gaussian float32 layer and a random calibration Gram with unequal feature scales."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n), dtype=np.float32)
    X = rng.standard_normal((2 * n, n), dtype=np.float32)
    X *= np.exp(rng.standard_normal(n)).astype(np.float32)
    return W, (X.T @ X).astype(np.float32)


def run_one(m: int, n: int) -> dict:
    W, gram = problem(m, n)
    engine = TimedEngine(NumpyNumbaEngine())
    with engine.loop_context():
        start = time.perf_counter()
        result = double_sparse_factorization(
            W, gram, engine=engine, split="auto", **DoubleSparseFactorization()._solver_options()
        )
        seconds = time.perf_counter() - start
    flops = result.counters.gemm_flops + result.counters.inverse_flops
    phases = dict(engine.seconds)
    phases["other"] = max(seconds - sum(phases.values()), 0.0)
    return {
        "shape": f"{m}x{n}",
        "seconds": seconds,
        "calibrated_error": result.error,
        "error_before_finalize": result.error_before_finalize,
        "gflop": flops / 1e9,
        "achieved_gflops": flops / seconds / 1e9,
        "phases_s": phases,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="512x512,1024x1024,2048x2048,2048x512,512x2048")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_dsf.json"))
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    run_one(64, 64)  # compile the Numba kernels outside the timings
    rows = []
    for m, n in shapes:
        rate = gemm_rate()
        row = run_one(m, n)
        row["gemm_gflops"] = rate / 1e9
        row["fraction_of_gemm"] = row["achieved_gflops"] * 1e9 / rate
        rows.append(row)
        ph = row["phases_s"]
        print(
            f"{row['shape']:>10}  {row['seconds']:7.2f} s  err {row['calibrated_error']:.4f}  "
            f"{row['gflop']:8.1f} GFLOP  {row['achieved_gflops']:6.1f} GFLOP/s  "
            f"GEMM {row['gemm_gflops']:6.1f} GFLOP/s  -> {row['fraction_of_gemm']:5.1%}  | "
            + "  ".join(f"{k} {v / row['seconds']:.0%}" for k, v in sorted(ph.items())),
            flush=True,
        )
    columns = (
        "shape", "seconds", "calibrated error", "GFLOP", "GFLOP/s", "GEMM GFLOP/s",
        "fraction of GEMM", "products", "inverses", "selection", "element-wise", "other",
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    phase_names = ("products", "inverses", "selection", "element-wise", "other")
    for r in rows:
        ph = r["phases_s"]
        lines.append(
            f"| {r['shape']} | {r['seconds']:.2f} | {r['calibrated_error']:.4f} | {r['gflop']:.1f} | "
            f"{r['achieved_gflops']:.1f} | {r['gemm_gflops']:.1f} | {r['fraction_of_gemm']:.0%} | "
            + " | ".join(f"{ph.get(p, 0.0) / r['seconds']:.0%}" for p in phase_names)
            + " |"
        )
    print()
    print("\n".join(lines))
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
