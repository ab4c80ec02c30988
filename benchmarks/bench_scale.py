"""Scale-out: the 36 block layers of all-MiniLM-L6-v2 serially, on 2 local processes, on a LocalCluster.

Every ``nn.Linear`` inside MiniLM's 6 blocks is fitted by DSF (density 0.5, ``--max-iter``
outer iterations, default 40) against its calibration Gram (one dense forward pass of
``--n-calib`` Hamlet lines, as ``sparsefact compress``), three ways with
:func:`sparsefact.factorize_many`:

* ``serial``: one process, ``--threads`` threads per fit (default 2: all cores);
* ``processes``: ``n_jobs=2`` local worker processes, threads capped to ``cores // 2``;
* ``dask``: a ``dask.distributed.LocalCluster`` of 2 worker processes with one thread each
  on 127.0.0.1 (threads per fit capped the same way).

It checks that the three give identical factors, and reports wall time, speed-up against
serial, the per-task scheduler overhead (dask wall time minus the sum of the per-fit times
divided by the workers, per task) and the per-layer fit cost by shape. From the measured
cost of the MiniLM shapes and its growth with size (the DSF loop is GEMM-bound: ``O(k^2 P)``
per iteration for ``k = min(m, n)``, ``P = max(m, n)``), it prints a table that predicts the
wall time of compressing LLaMA-2-7B and -70B layer shapes on N workers, with the assumptions
stated. Writes ``benchmarks/results/bench_scale.json`` and ``bench_scale.md``.

Usage::

    python benchmarks/bench_scale.py                 # full (minutes)
    python benchmarks/bench_scale.py --max-iter 8    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from sparsefact import factorize_many

RESULTS = Path(__file__).parent / "results"

#: LLaMA-2 linear layer shapes (out, in) per block and block counts (public model configs)
LLAMA = {
    "LLaMA-2-7B": {"blocks": 32, "layers": [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]},
    "LLaMA-2-70B": {
        "blocks": 80,
        "layers": [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192)]
        + [(28672, 8192)] * 2
        + [(8192, 28672)],
    },
}


def minilm_jobs(n_calib: int) -> list[tuple[str, np.ndarray, object]]:
    import torch

    from sparsefact.nn_adapters.capture import capture_calibrations, layer_matrix, select_layers
    from sparsefact.nn_adapters.data import calibration_and_heldout, load_text_model, tokenize_batches

    model, tokenizer = load_text_model(None)
    names = [n for n in select_layers(model) if n.startswith("encoder.layer.")]
    calib, _ = calibration_and_heldout(n_calib, 1)
    cals = capture_calibrations(model, tokenize_batches(tokenizer, calib), names)
    modules = dict(model.named_modules())
    return [
        (n, layer_matrix(modules[n]).to(torch.float32).numpy().copy(), cals[n]) for n in names
    ]


def fit_cost(shape: tuple[int, int]) -> float:
    """The DSF loop's GEMM work per outer iteration, up to a constant: ``k^2 P + k^3``."""
    k, P = min(shape), max(shape)
    return k * k * P + k**3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-iter", type=int, default=40)
    parser.add_argument("--n-calib", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="threads of the serial run (default 2)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    jobs = minilm_jobs(args.n_calib)
    params = {"max_iter": args.max_iter}
    runs = {}

    start = time.perf_counter()
    serial = factorize_many(jobs, "dsf", threads=args.threads, **params)
    runs["serial"] = time.perf_counter() - start

    start = time.perf_counter()
    processes = factorize_many(jobs, "dsf", n_jobs=2, **params)
    runs["processes"] = time.perf_counter() - start

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=50) as cluster, Client(cluster) as client:
        factorize_many(jobs[:2], "dsf", client=client, max_iter=1)  # warm the workers (imports, JIT cache)
        start = time.perf_counter()
        on_dask = factorize_many(jobs, "dsf", client=client, **params)
        runs["dask"] = time.perf_counter() - start

    # float32 DSF is chaotic across BLAS thread counts (reference/dsf.md §6.7): the serial run uses
    # --threads threads per fit, the workers one each, so factors are compared by their errors;
    # with equal threads (tests/test_parallel.py, float64) they are bit-identical.
    err_gap = max(
        abs(other[n].result.row["calibrated_err"] - serial[n].result.row["calibrated_err"])
        / serial[n].result.row["calibrated_err"]
        for other in (processes, on_dask) for n in serial
    )
    identical = all(
        all(np.array_equal(a, b) for a, b in zip(
            serial[n].result.estimator.get_factors(), other[n].result.estimator.get_factors(), strict=True))
        for other in (processes, on_dask) for n in serial
    )
    fit_seconds = {name: sum(r.result.row["seconds"] for r in res.values())
                   for name, res in (("serial", serial), ("processes", processes), ("dask", on_dask))}
    overhead = (runs["dask"] - fit_seconds["dask"] / 2) / len(jobs)
    by_shape: dict[str, list[float]] = {}
    for r in serial.values():
        by_shape.setdefault("x".join(map(str, r.result.row["shape"])), []).append(r.result.row["seconds"])
    shape_cost = {s: float(np.median(v)) for s, v in by_shape.items()}
    # seconds per unit of fit_cost, from the serial run (all cores on one fit)
    per_unit = float(np.median([
        r.result.row["seconds"] / fit_cost(tuple(r.result.row["shape"])) for r in serial.values()
    ]))
    predictions = []
    for model, spec in LLAMA.items():
        per_block = sum(fit_cost(s) for s in spec["layers"]) * per_unit * (40 / args.max_iter)
        total = per_block * spec["blocks"]
        for workers in (1, 8, 64):
            predictions.append({"model": model, "workers": workers,
                                "hours": total / workers / 3600, "layer_seconds": {
                                    "x".join(map(str, s)): fit_cost(s) * per_unit * (40 / args.max_iter)
                                    for s in sorted(set(spec["layers"]))}})
    result = {
        "settings": vars(args), "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "n_layers": len(jobs), "wall_seconds": runs, "fit_seconds": fit_seconds,
        "speedup": {k: runs["serial"] / v for k, v in runs.items()},
        "identical_factors": identical, "max_relative_error_gap": err_gap,
        "load_average_after": os.getloadavg(), "dask_overhead_per_task_s": overhead,
        "median_fit_seconds_by_shape": shape_cost, "seconds_per_cost_unit": per_unit,
        "predictions": predictions,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"MiniLM, {len(jobs)} block layers, DSF d=0.5, max_iter={args.max_iter}, {os.cpu_count()} cores",
        "",
        "| run | wall s | speed-up vs serial | sum of fit s |",
        "|---|---:|---:|---:|",
        *(f"| {k} | {v:.1f} | {runs['serial'] / v:.2f}x | {fit_seconds[k]:.1f} |" for k, v in runs.items()),
        "",
        f"identical factors in all three runs: {identical} (float32; the largest relative gap in a layer's "
        f"calibrated error: {err_gap:.2e}); Dask overhead per task: {overhead * 1e3:.0f} ms; "
        f"load average after the run: {os.getloadavg()[0]:.1f}",
        "",
        "Predicted DSF wall time (40 iterations, this machine's per-core speed, one fit per worker, "
        "cost scaled as k^2 P + k^3; GPUs or faster BLAS scale it down):",
        "",
        "| model | workers | hours |",
        "|---|---:|---:|",
        *(f"| {p['model']} | {p['workers']} | {p['hours']:.1f} |" for p in predictions),
    ]
    text = "\n".join(lines) + "\n"
    (out / "bench_scale.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
