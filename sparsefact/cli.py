"""The ``sparsefact`` command.

``sparsefact demo`` compresses a built-in synthetic layer twice at the same number of
nonzeros -- by Double Sparse Factorization and by magnitude pruning -- and prints a
small comparison table (optionally also written as JSON)::

    sparsefact demo                       # density 0.5, 40 outer iterations
    sparsefact demo --density 0.4 --json results.json

The layer is generated deterministically from ``--seed``: a float32 weight ``W`` of
shape ``(256, 512)`` (outputs x inputs) whose rows have log-normally varied norms, and
calibration activations ``X`` of shape ``(4 * 512, 512)`` whose feature scales are
log-normal (sigma = 1), the uneven input scales seen in real networks' activations.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEMO_SHAPE = (256, 512)
TOKENS_PER_FEATURE = 4


def make_demo_layer(
    m: int = DEMO_SHAPE[0],
    n: int = DEMO_SHAPE[1],
    *,
    seed: int = 0,
    tokens_per_feature: int = TOKENS_PER_FEATURE,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic layer ``(W, X_calib)`` with realistic scales, the same for the same seed.

    Parameters
    ----------
    m, n : int
        Output and input features: ``W`` has shape ``(m, n)``.
    seed : int
        Seed of the generator; every array is a function of it.
    tokens_per_feature : int
        ``X_calib`` has ``tokens_per_feature * n`` rows (tokens).

    Returns
    -------
    W : ndarray of shape (m, n), float32
        Gaussian entries scaled by ``1 / sqrt(n)``, each row multiplied by a log-normal
        factor (sigma = 0.5), so output neurons have different norms.
    X_calib : ndarray of shape (tokens_per_feature * n, n), float32
        Gaussian activations; column ``j`` is multiplied by a log-normal scale
        (sigma = 1), so a few input features dominate the calibrated error.
    """
    rng = np.random.default_rng(seed)
    row_scales = rng.lognormal(mean=0.0, sigma=0.5, size=(m, 1))
    W = rng.standard_normal((m, n)) * row_scales / math.sqrt(n)
    feature_scales = rng.lognormal(mean=0.0, sigma=1.0, size=(1, n))
    X = rng.standard_normal((tokens_per_feature * n, n)) * feature_scales
    return W.astype(np.float32), X.astype(np.float32)


def _result_row(method: str, est: Any, m: int, n: int, seconds: float) -> dict[str, Any]:
    return {
        "method": method,
        "nnz": int(est.nnz_),
        "density": int(est.nnz_) / (m * n),
        "calibrated_err": float(est.calibrated_err_),
        "relative_err": float(est.reconstruction_err_),
        "seconds": float(seconds),
    }


def _warm_up() -> float:
    """Compile (or load from the on-disk cache) the Numba kernels on a tiny problem."""
    from .estimators import DoubleSparseFactorization

    start = time.perf_counter()
    W = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DoubleSparseFactorization(density=0.5, max_iter=5, finalize_iter=2, tol=0).fit(W, W)
    return time.perf_counter() - start


def run_demo(
    *,
    density: float = 0.5,
    max_iter: int = 40,
    seed: int = 0,
    shape: tuple[int, int] = DEMO_SHAPE,
    verbose: bool = True,
    out: Any = None,
) -> dict[str, Any]:
    """Compress the demo layer by DSF and by magnitude pruning; return the results.

    Parameters
    ----------
    density : float
        Kept fraction of ``W``'s entries (both methods get the same budget).
    max_iter : int
        Outer iterations of DSF.
    seed : int
        Seed of :func:`make_demo_layer`.
    shape : (int, int)
        Shape of ``W``.
    verbose : bool
        Print a line when each step starts, and DSF's progress.
    out : file-like, optional
        Where progress goes (standard output by default).

    Returns
    -------
    dict
        ``{"layer": ..., "settings": ..., "results": [row, ...], "warnings": [...]}``;
        each row has ``method, nnz, density, calibrated_err, relative_err, seconds``.
    """
    from sklearn.exceptions import ConvergenceWarning

    from .estimators import DoubleSparseFactorization, MagnitudePruning

    out = sys.stdout if out is None else out

    def log(message: str) -> None:
        if verbose:
            print(message, file=out, flush=True)

    m, n = shape
    W, X = make_demo_layer(m, n, seed=seed)
    log(
        f"Demo layer: W {m}x{n} float32 (rows of log-normal norms), X_calib {X.shape[0]}x{n} "
        f"(feature scales log-normal, sigma=1), seed {seed}; target density {density:g}"
    )
    log("[0/2] preparing the Numba kernels (compiled on first use, then cached on disk) ...")
    warm = _warm_up()
    log(f"      ready in {warm:.1f}s")

    results = []
    log(f"[1/2] magnitude pruning at density {density:g} ...")
    start = time.perf_counter()
    mag = MagnitudePruning(density=density).fit(W, X)
    results.append(_result_row("magnitude pruning", mag, m, n, time.perf_counter() - start))

    log(f"[2/2] Double Sparse Factorization at density {density:g}, {max_iter} outer iterations ...")
    dsf = DoubleSparseFactorization(density=density, max_iter=max_iter, verbose=1 if verbose else 0)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        dsf.fit(W, X)
        seconds = time.perf_counter() - start
    for record in records:
        if issubclass(record.category, ConvergenceWarning):
            caught.append(str(record.message))
        else:
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
    row = _result_row("double sparse (DSF)", dsf, m, n, seconds)
    row["calibrated_err_before_finalize"] = float(dsf.error_before_finalize_)
    row["nnz_A"] = int(dsf.A_.nnz)
    row["nnz_B"] = int(dsf.B_.nnz)
    row["backend"] = dsf.backend_
    results.append(row)

    return {
        "layer": {
            "m": m,
            "n": n,
            "n_tokens": int(X.shape[0]),
            "seed": seed,
            "dtype": str(W.dtype),
        },
        "settings": {"density": density, "max_iter": max_iter},
        "warm_up_seconds": warm,
        "results": results,
        "warnings": caught,
    }


def format_table(report: dict[str, Any]) -> str:
    """The results of :func:`run_demo` as a plain-text table."""
    header = ("method", "density", "calibrated err", "relative err", "seconds")
    rows = [
        (
            r["method"],
            f"{r['density']:.4f}",
            f"{r['calibrated_err']:.4f}",
            f"{r['relative_err']:.4f}",
            f"{r['seconds']:.2f}",
        )
        for r in report["results"]
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    lines = [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]
    layer = report["layer"]
    lines += [
        f"W {layer['m']}x{layer['n']}, {layer['n_tokens']} calibration tokens; density = nnz / (m*n), "
        f"target {report['settings']['density']:g}.",
        "calibrated err = ||(W - W_hat) X^T|| / ||W X^T|| (what both are judged on, and what DSF minimises);",
        "relative err = ||W - W_hat|| / ||W|| (plain Frobenius, ignores the inputs).",
    ]
    return "\n".join(lines)


def _density(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _shape(text: str) -> tuple[int, int]:
    try:
        m, n = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 256x512, got {text!r}") from None
    if m < 2 or n < 2:
        raise argparse.ArgumentTypeError(f"both dimensions must be at least 2, got {text!r}")
    return m, n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sparsefact`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sparsefact",
        description="Double Sparse Factorization: approximate a matrix by two sparse factors A @ B.",
    )
    parser.add_argument("--version", action="version", version=f"sparsefact {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="compress a built-in synthetic layer by DSF and by magnitude pruning and compare",
        description=(
            "Compress a deterministic synthetic layer (W 256x512 float32, calibration "
            "activations with log-normal feature scales) by Double Sparse Factorization and "
            "by magnitude pruning at the same number of nonzeros, and print a table."
        ),
    )
    demo.add_argument(
        "--density",
        type=_density,
        default=0.5,
        help="kept fraction of W's entries, shared by both methods (default 0.5)",
    )
    demo.add_argument(
        "--max-iter", type=_positive_int, default=40, help="outer iterations of DSF (default 40)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic layer (default 0)")
    demo.add_argument(
        "--shape",
        type=_shape,
        default=DEMO_SHAPE,
        metavar="MxN",
        help="shape of W, outputs x inputs (default 256x512)",
    )
    demo.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON to PATH"
    )
    demo.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparsefact`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        from .dsf import minimum_density, resolve_split

        m, n = args.shape
        lowest = minimum_density(m, n, resolve_split("auto", m, n))
        if args.density < lowest:
            parser.error(f"--density {args.density:g} is below the minimum {lowest:.4f} for a {m}x{n} W")
        report = run_demo(
            density=args.density,
            max_iter=args.max_iter,
            seed=args.seed,
            shape=args.shape,
            verbose=not args.quiet,
        )
        if not args.quiet:
            print()
        print(format_table(report))
        for message in report["warnings"]:
            print(f"note: {message}")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"results written to {args.json}")
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
