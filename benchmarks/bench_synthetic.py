"""DSF against single-sparse and low-rank baselines on synthetic matrices, at equal nonzeros.

Cases (``--size`` n = 256 by default, all matrices n x n, drawn from ``--seed``):

* ``gaussian/plain``: i.i.d. N(0, 1) entries, no calibration (the identity Gram).
* ``lowrank16/plain`` and ``lowrank16/lognormal``: ``U @ V / sqrt(16)`` with ``U`` (n x 16)
  and ``V`` (16 x n) standard normal, plus N(0, 0.05^2) noise (about 5% of the entries' scale).
* ``planted/plain`` and ``planted/lognormal``: ``A @ B`` with ``A`` at density 0.1 and
  ``B`` at density 0.3 (uniformly random positions, N(0, 1) values), plus noise of
  ``1e-3 * std(A @ B)``: the planted factors hold 0.4 * n^2 nonzeros, so an ideal
  two-factor method could reach the noise floor from density 0.4 on (DSF's default
  ``split="auto"`` budgets its factors differently, and its fit is a local optimum, so it
  need not; e.g. error 0.11 at density 0.5 with seed 0).

``/plain`` cases have no calibration (``error`` = ``plain_error``, no held-out error).
``/lognormal`` cases are calibrated with activations ``X = Z * s`` (``--n-tokens`` rows,
default 1024) whose feature scales ``s_j = exp(sigma * g_j)`` are log-normal (``--sigma``,
default 1); the held-out Gram uses a fresh ``Z`` with the same scales.

For every case, density in ``--densities`` (default 0.2-0.7 in steps of 0.1) and method, one
``sparsefact.compare`` fit; a ``ValueError`` (e.g. DSF below its minimum density) is recorded
as a skip. Writes ``synthetic.json`` (records, skips, settings, machine) and ``summary.md``
(errors per case, wins, seconds) to ``--out`` (default ``benchmarks/results/synthetic/``);
the JSON is rewritten after every case, and ``--resume`` continues an interrupted run.

Usage::

    python benchmarks/bench_synthetic.py                             # full run
    python benchmarks/bench_synthetic.py --densities 0.5 --max-iter 4 --cases planted \\
        --out /tmp/synth_tiny                                        # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_real_layers import (  # noqa: E402
    ROOT,
    add_common_arguments,
    done_keys,
    fit_one,
    fmt,
    load_previous,
    machine_info,
    mean_table,
    method_params,
    nonfinite_text,
    now,
    present_densities,
    seconds_table,
    skips_text,
    thread_limit,
    wins_table,
    write_json,
)

from sparsefact.calibration import Calibration  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "synthetic"
JSON_NAME = "synthetic.json"
DEFAULT_DENSITIES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
CASES = (
    "gaussian/plain",
    "lowrank16/plain",
    "lowrank16/lognormal",
    "planted/plain",
    "planted/lognormal",
)
RANK = 16
LOWRANK_NOISE = 0.05
PLANTED_DENSITIES = (0.1, 0.3)
PLANTED_NOISE = 1e-3
MATRIX_SEEDS = {"gaussian": 1, f"lowrank{RANK}": 2, "planted": 3}
SCALES_SEED = 4
RESUME_SETTINGS = ("max_iter", "seed", "size", "n_tokens", "sigma")


def sparse_gaussian(rng: np.random.Generator, shape: tuple[int, int], density: float) -> np.ndarray:
    """N(0, 1) values at ``round(density * size)`` uniformly random positions."""
    size = shape[0] * shape[1]
    out = np.zeros(size)
    keep = rng.choice(size, size=int(round(density * size)), replace=False)
    out[keep] = rng.standard_normal(keep.size)
    return out.reshape(shape)


def make_matrix(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gaussian":
        return rng.standard_normal((n, n))
    if kind == f"lowrank{RANK}":
        U, V = rng.standard_normal((n, RANK)), rng.standard_normal((RANK, n))
        return U @ V / math.sqrt(RANK) + LOWRANK_NOISE * rng.standard_normal((n, n))
    if kind == "planted":
        A = sparse_gaussian(rng, (n, n), PLANTED_DENSITIES[0])
        B = sparse_gaussian(rng, (n, n), PLANTED_DENSITIES[1])
        W = A @ B
        return W + PLANTED_NOISE * W.std() * rng.standard_normal((n, n))
    raise ValueError(f"unknown matrix kind {kind!r}")


def make_calibrations(
    n: int, n_tokens: int, sigma: float, rng: np.random.Generator
) -> tuple[Calibration, Calibration, np.ndarray]:
    """Calibration and held-out Grams of activations with log-normal feature scales."""
    scales = np.exp(sigma * rng.standard_normal(n))
    calib = Calibration.from_activations(rng.standard_normal((n_tokens, n)) * scales)
    heldout = Calibration.from_activations(rng.standard_normal((n_tokens, n)) * scales)
    return calib, heldout, scales


def build_case(case: str, args: argparse.Namespace) -> tuple[np.ndarray, Any, Any, dict]:
    """``(W, calibration or None, held-out or None, description)``; reproducible per case."""
    kind, calib_kind = case.split("/")
    # One stream per matrix kind (the plain and calibrated cases share W), one for the scales.
    W = make_matrix(kind, args.size, np.random.default_rng([args.seed, MATRIX_SEEDS[kind]])).astype(
        np.float32
    )
    info: dict[str, Any] = {"shape": list(W.shape), "matrix": kind, "calibration": calib_kind}
    if calib_kind == "plain":
        return W, None, None, info
    calib, heldout, scales = make_calibrations(
        args.size, args.n_tokens, args.sigma, np.random.default_rng([args.seed, SCALES_SEED])
    )
    info.update(
        n_tokens=args.n_tokens,
        sigma=args.sigma,
        scale_range=[float(scales.min()), float(scales.max())],
    )
    return W, calib, heldout, info


def run(args: argparse.Namespace, cases: Sequence[str]) -> dict:
    out = Path(args.out)
    path = out / JSON_NAME
    settings = {
        "max_iter": args.max_iter,
        "seed": args.seed,
        "size": args.size,
        "n_tokens": args.n_tokens,
        "sigma": args.sigma,
    }
    previous = load_previous(path, settings, RESUME_SETTINGS) if args.resume else None
    data = previous or {
        "benchmark": "bench_synthetic",
        "settings": settings,
        "runs": [],
        "cases": {},
        "records": [],
        "skipped": [],
    }
    done = done_keys(data, "case")
    params = method_params(args.methods, args.max_iter)
    run_info = {
        "started": now(),
        "argv": sys.argv[1:],
        "densities": args.densities,
        "methods": args.methods,
        "machine": machine_info(args.threads),
        "fits": 0,
    }
    data["runs"].append(run_info)
    start = time.perf_counter()
    for case in cases:
        W, calib, heldout, info = build_case(case, args)
        data["cases"][case] = info
        for density in args.densities:
            for method in args.methods:
                if (case, round(float(density), 6), method) in done:
                    continue
                with thread_limit(args.threads):
                    record, reason = fit_one(W, calib, heldout, density, method, params)
                if record is None:
                    data["skipped"].append(
                        {"case": case, "target_density": float(density), "method": method, "reason": reason}
                    )
                    print(f"  skip {case} d={density:g} {method}: {reason[:120]}", flush=True)
                    continue
                data["records"].append({"case": case, **record})
                run_info["fits"] += 1
                held = record["heldout_error"]
                print(
                    f"  {case:>20} d={density:g} {method:>9}: err {fmt(record['error'])}"
                    + (f" heldout {fmt(held)}" if calib is not None else "")
                    + f" ({record['seconds']:.2f} s)",
                    flush=True,
                )
        run_info["seconds"] = time.perf_counter() - start
        run_info["finished"] = now()
        write_json(path, data)
    write_json(path, data)
    return data


def summary_markdown(data: dict) -> str:
    records, skipped = data["records"], data.get("skipped", [])
    settings = data.get("settings", {})
    machine = data["runs"][-1].get("machine", {}) if data.get("runs") else {}
    # Held-out error where there is a calibration, the (plain) error otherwise.
    for r in records:
        calibrated = r.get("heldout_error") is not None or "heldout_error" in r.get("nonfinite", [])
        r["eval_error"] = r["heldout_error"] if calibrated else r["error"]
    lines = [
        "# DSF vs baselines on synthetic matrices",
        "",
        f"{settings.get('size')}x{settings.get('size')} matrices, seed {settings.get('seed')}; "
        f"densities {', '.join(f'{d:g}' for d in present_densities(records))}; "
        f"dsf/dsf-exact max_iter = {settings.get('max_iter') or 'default (40)'}; "
        f"log-normal calibration: {settings.get('n_tokens')} tokens, sigma {settings.get('sigma')}.",
        f"Machine: {machine.get('processor', '?')}, {machine.get('cpu_count', '?')} cores, "
        f"{machine.get('threads', '?')} thread(s) per fit, load average at start "
        f"{machine.get('loadavg_at_start')}.",
        "",
        "Relative errors sqrt(tr(E G E^T) / tr(W G W^T)), E = W - W_hat (G = identity for /plain).",
        "",
    ]
    for case in dict.fromkeys(r["case"] for r in records):
        rows = [r for r in records if r["case"] == case]
        has_heldout = any(r.get("heldout_error") is not None for r in rows)
        lines += [
            f"## {case}: {'calibrated' if has_heldout else 'plain'} error",
            "",
            mean_table(rows, "error", "case"),
            "",
        ]
        if has_heldout:
            lines += [f"## {case}: held-out error", "", mean_table(rows, "heldout_error", "case"), ""]
    lines += [
        "## Cases where DSF has the lower error (held-out error where calibrated; wins / cases)",
        "",
        wins_table(records, "case", "eval_error"),
        "",
        "## Seconds",
        "",
        seconds_table(records),
        "",
        "## Skips and failed fits",
        "",
        skips_text(skipped, "case"),
        "",
        nonfinite_text(records, "case"),
        "",
    ]
    for r in records:
        r.pop("eval_error", None)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for the cases and the outputs.",
    )
    add_common_arguments(parser, DEFAULT_DENSITIES)
    parser.add_argument(
        "--cases", default=None, help=f"regex searched in the case names {list(CASES)} (default: all)"
    )
    parser.add_argument("--size", type=int, default=256, help="matrix size n (n x n; default: %(default)s)")
    parser.add_argument("--n-tokens", type=int, default=1024, help="calibration rows (default: %(default)s)")
    parser.add_argument(
        "--sigma", type=float, default=1.0, help="log-normal scale sigma (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    cases = [c for c in CASES if args.cases is None or re.search(args.cases, c)]
    if not cases:
        raise SystemExit(f"--cases {args.cases!r} matches none of {list(CASES)}")
    data = json.loads((out / JSON_NAME).read_text(encoding="utf-8")) if args.report_only else run(args, cases)
    text = summary_markdown(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text, encoding="utf-8")
    print()
    print(text)
    print(f"wrote {out / JSON_NAME} and {out / 'summary.md'}")


if __name__ == "__main__":
    main()
