"""Forward latency and bytes of the sparse-factor torch modules on the CPU.

Part 1 (``layers``): for a 1536x384 and a 384x1536 layer at total densities 0.2, 0.3, 0.5 and
batch 1 / 16 / 256, the median forward time of

- ``nn.Linear`` (dense reference),
- ``DoubleSparseLinear`` with ``layout="csr"`` and ``layout="dense"`` (factors from a real
  ``DoubleSparseFactorization`` fit, ``max_iter=2`` without finalisation: latency depends on the
  factor shapes and densities, not on how well they fit),
- ``SparseLinear`` (magnitude pruning at the same density) with both layouts,

plus the bytes ``save_compressed`` writes for each compressed form vs the dense layer.

Part 2 (``crossover``): one factor product ``W @ z`` (W of shape 1536x384, 384x384, 384x1536)
at densities 0.01-0.5, CSR vs dense; this is the measurement behind ``layout="auto"``.

torch runs with 2 threads; each timing is the median of short samples taken round-robin over
the variants (see ``time_us``; the JSON also keeps the minimum sample). Usage::

    python benchmarks/bench_modules.py [--repeats 21] [--json benchmarks/results/bench_modules.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from sparsefact import DoubleSparseFactorization, MagnitudePruning
from sparsefact.nn_adapters import DoubleSparseLinear, SparseLinear, save_compressed

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks.*")
warnings.filterwarnings("ignore", message=".*did not converge.*")

SHAPES = [(1536, 384), (384, 1536)]
DENSITIES = [0.2, 0.3, 0.5]
BATCHES = [1, 16, 256]
SWEEP_SHAPES = [(1536, 384), (384, 384), (384, 1536)]
SWEEP_DENSITIES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]


def time_us(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median and min microseconds per call of each function in ``fns``.

    A sample is one call (or, for calls under 20 µs, enough calls to last 20 µs), and samples
    of the functions are taken round-robin, so load from other jobs on a shared machine hits all
    of them alike and short samples mostly fall between preemptions. ``repeats`` sets the sample
    count per function: ``10 * repeats`` (at least), capped at ~0.3 s per function. The median
    is the reported number; the min is kept in the JSON too (see ``loadavg`` in the JSON).
    """
    inner, n_samples = {}, {}
    for key, fn in fns.items():
        fn()
        fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        inner[key] = max(1, int(20e-6 / once))
        n_samples[key] = int(min(10 * repeats, max(repeats, 0.3 / (once * inner[key]))))
    samples: dict = {key: [] for key in fns}
    for i in range(max(n_samples.values())):
        for key, fn in fns.items():
            if i >= n_samples[key]:
                continue
            start = time.perf_counter()
            for _ in range(inner[key]):
                fn()
            samples[key].append((time.perf_counter() - start) / inner[key])
    med = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
    best = {k: min(v) * 1e6 for k, v in samples.items()}
    return med, best


def file_bytes(module: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.safetensors")
        save_compressed(nn.Sequential(module), path)
        return os.path.getsize(path)


def fit_all() -> dict:
    """All DSF and magnitude-pruning fits, done before any timing.

    Fitting changes the BLAS/OpenMP thread settings (Numba, threadpoolctl), so the thread count
    for timing is set only afterwards.
    """
    fits = {}
    rng = np.random.default_rng(0)
    for out_f, in_f in SHAPES:
        W = rng.standard_normal((out_f, in_f)).astype(np.float32)
        b = rng.standard_normal(out_f).astype(np.float32)
        for density in DENSITIES:
            dsf = DoubleSparseFactorization(density, max_iter=2, finalize=False, random_state=0).fit(W)
            fits[(out_f, in_f, density)] = (W, b, dsf, MagnitudePruning(density).fit(W))
    return fits


def bench_layers(fits: dict, repeats: int) -> list[dict]:
    rows = []
    for out_f, in_f in SHAPES:
        W, b = fits[(out_f, in_f, DENSITIES[0])][:2]
        dense = nn.Linear(in_f, out_f)
        with torch.no_grad():
            dense.weight.copy_(torch.from_numpy(W))
            dense.bias.copy_(torch.from_numpy(b))
        dense_file = file_bytes(dense)
        for density in DENSITIES:
            _, _, dsf, mp = fits[(out_f, in_f, density)]
            mods = {
                "dsf_csr": DoubleSparseLinear.from_estimator(dsf, b, layout="csr"),
                "dsf_dense": DoubleSparseLinear.from_estimator(dsf, b, layout="dense"),
                "sparse_csr": SparseLinear.from_estimator(mp, b, layout="csr"),
                "sparse_dense": SparseLinear.from_estimator(mp, b, layout="dense"),
            }
            auto = DoubleSparseLinear.from_estimator(dsf, b)
            sizes = {
                "dense_file": dense_file,
                "dsf_file": file_bytes(mods["dsf_dense"]),
                "sparse_file": file_bytes(mods["sparse_dense"]),
                "dsf_compressed_bytes": mods["dsf_dense"].compressed_bytes,
                "dense_bytes": mods["dsf_dense"].dense_bytes,
            }
            for batch in BATCHES:
                x = torch.randn(batch, in_f)
                fns = {"linear": lambda x=x, dense=dense: dense(x)}
                fns.update({key: (lambda x=x, mod=mod: mod(x)) for key, mod in mods.items()})
                with torch.inference_mode():
                    times, best = time_us(fns, repeats)
                row = {
                    "shape": f"{out_f}x{in_f}", "density": density, "batch": batch,
                    "A_density": dsf.A_.nnz / np.prod(dsf.A_.shape),
                    "B_density": dsf.B_.nnz / np.prod(dsf.B_.shape),
                    "auto_layouts": dict(auto.layouts),
                    "us": times, "min_us": best, **sizes,
                }
                rows.append(row)
                print(f"  {row['shape']} d={density} N={batch}: "
                      + " ".join(f"{k}={v:.0f}" for k, v in times.items()), flush=True)
    return rows


def bench_crossover(repeats: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for r, c in SWEEP_SHAPES:
        for density in SWEEP_DENSITIES:
            W = torch.randn(r, c, generator=gen) * (torch.rand(r, c, generator=gen) < density)
            Wc = W.to_sparse_csr()
            for batch in BATCHES:
                z = torch.randn(c, batch, generator=gen)
                with torch.inference_mode():
                    med, best = time_us({"dense": lambda W=W, z=z: W @ z,
                                         "csr": lambda Wc=Wc, z=z: Wc @ z}, repeats)
                td, tc, td_min, tc_min = med["dense"], med["csr"], best["dense"], best["csr"]
                rows.append({"shape": f"{r}x{c}", "density": density, "batch": batch,
                             "dense_us": td, "csr_us": tc, "csr_over_dense": tc / td,
                             "dense_min_us": td_min, "csr_min_us": tc_min,
                             "csr_over_dense_min": tc_min / td_min})
            print(f"  sweep {r}x{c} d={density}: "
                  + " ".join(f"N={x['batch']}:{x['csr_over_dense']:.2f}" for x in rows[-len(BATCHES):]),
                  flush=True)
    return rows


def markdown(layers: list[dict], sweep: list[dict]) -> str:
    out = ["Forward µs, median (min) of the samples; files in KiB as written by save_compressed", "",
           "| layer | density | batch | nn.Linear µs | DSF csr µs | DSF dense µs | Sparse csr µs "
           "| Sparse dense µs | file dense KiB | file DSF KiB | file sparse KiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in layers:
        cells = [f"{r['us'][k]:.0f} ({r['min_us'][k]:.0f})"
                 for k in ("linear", "dsf_csr", "dsf_dense", "sparse_csr", "sparse_dense")]
        out.append(
            f"| {r['shape']} | {r['density']} | {r['batch']} | " + " | ".join(cells) + " | "
            f"{r['dense_file'] / 1024:.0f} | {r['dsf_file'] / 1024:.0f} | {r['sparse_file'] / 1024:.0f} |"
        )
    out += ["", "CSR / dense time for one factor product `W @ z`, medians (mins); below 1: CSR faster", "",
            "| W | density | N=" + " | N=".join(str(b) for b in BATCHES) + " |",
            "|---|---|" + "---|" * len(BATCHES)]
    keyed = {(r["shape"], r["density"], r["batch"]): r for r in sweep}
    for r, c in SWEEP_SHAPES:
        for d in SWEEP_DENSITIES:
            cells = [f"{keyed[(f'{r}x{c}', d, b)]['csr_over_dense']:.2f} "
                     f"({keyed[(f'{r}x{c}', d, b)]['csr_over_dense_min']:.2f})" for b in BATCHES]
            out.append(f"| {r}x{c} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_modules.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    print("fitting ...", flush=True)
    fits = fit_all()
    with threadpool_limits(limits=args.threads):
        torch.set_num_threads(args.threads)
        print(f"layers (torch threads: {torch.get_num_threads()}):", flush=True)
        layers = bench_layers(fits, args.repeats)
        print("crossover:", flush=True)
        sweep = bench_crossover(args.repeats)
    table = markdown(layers, sweep)
    print()
    print(table)
    result = {
        "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
        "machine": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(), "layers": layers, "crossover": sweep, "markdown": table,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
