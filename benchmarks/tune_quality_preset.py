"""Choose the quality preset's settings on calibration data only (issue 16).

The 256 calibration lines of ``bench_real_layers.py`` are split in two: even positions fit,
odd positions score (the "selection" error). The held-out lines of the benchmark are never
read here, so the benchmark's held-out figures stay an honest evaluation of what this script
chose. For a sample of MiniLM layers (``--layers``, default one of each kind from different
blocks) and densities (``--densities``), every candidate of :data:`CANDIDATES` (parameters of
``DoubleSparseFactorization``) is fitted once; the script prints and writes (JSON) the mean
selection error relative to the reference preset and the CPU-time ratio.

Usage::

    python benchmarks/tune_quality_preset.py --densities 0.5,0.3 --out benchmarks/results/tune_quality.json
    python benchmarks/tune_quality_preset.py --densities 0.2,0.3 --candidates reference quality \
        quality-share1/3 quality-share1/2 --out benchmarks/results/tune_quality_split.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_layers import csv_floats, thread_limit  # noqa: E402

from sparsefact import DoubleSparseFactorization  # noqa: E402
from sparsefact.metrics import relative_error  # noqa: E402

DEFAULT_LAYERS = (
    r"layer\.1\.attention\.self\.query$",
    r"layer\.2\.attention\.output\.dense$",
    r"layer\.3\.intermediate\.dense$",
    r"layer\.4\.output\.dense$",
)
#: name -> DoubleSparseFactorization parameters; "reference" is the baseline of the ratios
CANDIDATES: dict[str, dict[str, Any]] = {
    "reference": {},
    "quality": {"preset": "quality"},
    "quality-split0.25": {"preset": "quality", "split": 0.25},
    "quality-split0.35": {"preset": "quality", "split": 0.35},
    "quality-restart30": {"preset": "quality", "restart_iter": 30},
    "quality-rho0.3": {"preset": "quality", "restart_rho": 0.3},
    "quality-exact4": {"preset": "quality", "exact_iter": 4},
    "quality-refit2": {"preset": "quality", "refit_iter": 2},
    "quality-damp0.01": {"preset": "quality", "damping": 0.01},
    "quality-damp0.1": {"preset": "quality", "damping": 0.1},
    # a third / half of the budget in the square factor (for square W: split = density * share)
    "quality-share1/3": {"preset": "quality", "split": lambda m, n, d: d * m * n / (3 * min(m, n) ** 2)},
    "quality-share1/2": {"preset": "quality", "split": lambda m, n, d: d * m * n / (2 * min(m, n) ** 2)},
}


def _params(name: str, shape: tuple[int, int], density: float) -> dict[str, Any]:
    """The candidate's parameters, with a callable split resolved for the shape and density."""
    params = dict(CANDIDATES[name])
    if callable(params.get("split")):
        params["split"] = min(1.0, params["split"](*shape, density))
    return params


def grams(args: argparse.Namespace) -> tuple[list[str], dict, dict, dict]:
    """Layer names, weights, and the Grams of the two halves of the calibration lines."""
    import torch
    from torch import nn

    from sparsefact.nn_adapters.capture import capture_calibrations, layer_matrix, select_layers
    from sparsefact.nn_adapters.data import calibration_and_heldout, load_text_model, tokenize_batches

    torch.set_num_threads(1)
    model, tokenizer = load_text_model(None)
    names = [n for n in select_layers(model, nn.Linear) if any(re.search(p, n) for p in args.layers)]
    calib, _ = calibration_and_heldout(256, 256)  # the held-out part is not used
    fit_lines, select_lines = calib[0::2], calib[1::2]
    fit = capture_calibrations(model, tokenize_batches(tokenizer, fit_lines), names)
    select = capture_calibrations(model, tokenize_batches(tokenizer, select_lines), names)
    modules = dict(model.named_modules())
    weights = {n: layer_matrix(modules[n]).to(torch.float32).cpu().numpy() for n in names}
    return names, weights, fit, select


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", type=csv_floats, default=[0.5, 0.3])
    parser.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    names, weights, fit, select = grams(args)
    rows = []
    with thread_limit(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            W = weights[name]
            for density in args.densities:
                for cand in ["reference", *[c for c in args.candidates if c != "reference"]]:
                    start = time.process_time()
                    params = _params(cand, W.shape, density)
                    est = DoubleSparseFactorization(density, **params).fit(W, calibration=fit[name])
                    seconds = time.process_time() - start
                    err = relative_error(W, est.reconstruct(), select[name].gram())
                    rows.append({"layer": name, "density": density, "candidate": cand, "seconds": seconds,
                                 "fit_error": float(est.calibrated_err_), "selection_error": float(err)})
                    print(f"{name} d={density} {cand:>20}: select {err:.4f} ({seconds:.1f} s)", flush=True)
    print("\n| candidate | density | mean selection error / reference | CPU time / reference |")
    print("|---|---:|---:|---:|")
    summary = []
    for density in args.densities:
        ref = {r["layer"]: r for r in rows if r["density"] == density and r["candidate"] == "reference"}
        for cand in args.candidates:
            mine = [r for r in rows if r["density"] == density and r["candidate"] == cand]
            err_ratio = np.mean([r["selection_error"] for r in mine]) / np.mean(
                [ref[r["layer"]]["selection_error"] for r in mine])
            time_ratio = sum(r["seconds"] for r in mine) / sum(ref[r["layer"]]["seconds"] for r in mine)
            summary.append({"candidate": cand, "density": density, "error_ratio": float(err_ratio),
                            "time_ratio": float(time_ratio)})
            print(f"| {cand} | {density} | {err_ratio:.3f} | {time_ratio:.2f} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        described = {c: {k: ("callable of (m, n, density)" if callable(v) else v)
                         for k, v in CANDIDATES[c].items()} for c in args.candidates}
        args.out.write_text(json.dumps({"layers": names, "rows": rows, "summary": summary,
                                        "candidates": described}, indent=1) + "\n")


if __name__ == "__main__":
    main()
