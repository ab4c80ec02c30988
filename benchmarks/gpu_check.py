"""The GPU check (issue 15, item 4): the GPU engines against the CPU engine, then their speed.

One prepared script for a machine with a CUDA device::

    python benchmarks/gpu_check.py                       # compare, GPU-marked tests, speed table
    python benchmarks/gpu_check.py --sizes 2048,4096     # smaller speed table
    python benchmarks/gpu_check.py --cpu-dry-run         # the same logic on torch-CPU tensors

1. **Agreement.** On the same fixed inputs (Gaussian ``W``, a calibration Gram with unequal
   feature scales), DSF, SparseGPT and Wanda are fitted by the CPU engine (``numpy_numba`` on
   NumPy arrays) and by every GPU target -- CuPy arrays (the ``cupy`` engine) and torch tensors
   on CUDA (the array-API engine) -- in float32 and float64. Required: calibrated and
   reconstruction errors equal to 1e-3 relative in float32 and 1e-9 in float64, identical
   ``nnz_``, results in the input's namespace, device and dtype.
2. **GPU-marked tests.** ``pytest -m gpu`` (skipped with ``--no-tests``).
3. **Speed.** DSF at density 0.5 on ``n x n`` layers (default 2048, 4096, 8192), SparseGPT
   and Wanda alongside, float32 with TF32 off: seconds, the FLOPs DSF's solvers count (and
   SparseGPT's nominal ``2 m n^2 + n^3``), and the fraction of the device's float32 GEMM rate
   measured in the same run. A size whose predicted time (the previous one scaled by ``n^3``)
   would overrun ``--budget-s`` is skipped and says so.

Writes JSON to ``benchmarks/results/gpu_check.json`` (``--json``). Exit status: 0 all
agreements hold (and the GPU tests pass), 1 some do not, 2 no usable GPU (the message names
what is missing).

``--cpu-dry-run`` runs steps 1 and 3 with the array-API engine on torch CPU tensors (or
``array_api_strict`` arrays, ``--targets``) in place of the GPU, at small sizes, so that this
script's logic is tested without a GPU (``tests/test_gpu_check.py``); its JSON says
``"dry_run": true`` and its numbers are not GPU measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning

import sparsefact.estimators as _estimators
from sparsefact import Calibration, DoubleSparseFactorization, SparseGPT, Wanda

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "gpu_check.json"
#: Relative agreement of the errors required per dtype.
TOLERANCES = {"float32": 1e-3, "float64": 1e-9}
METHODS = ("dsf", "sparsegpt", "wanda")
DENSITY = 0.5


# ---------------------------------------------------------------------- targets
@dataclass
class Target:
    """One namespace/device that is checked against the CPU engine.

    Attributes
    ----------
    name : str
        ``"cupy"``, ``"torch-cuda"``, ``"torch-cpu"`` or ``"array_api_strict"``.
    engine : str
        The engine ``backend="auto"`` must pick for its arrays.
    to_device : callable
        NumPy array -> array of the target (same dtype).
    sync : callable
        Waits for the device's queued work (timings).
    is_native : callable
        Whether an array is of the target's namespace and on its device.
    dtype_name : callable
        The dtype of a target array as ``"float32"`` / ``"float64"``.
    info : dict
        Versions and the device's name, for the JSON.
    """

    name: str
    engine: str
    to_device: Callable[[np.ndarray], Any]
    sync: Callable[[], None]
    is_native: Callable[[Any], bool]
    dtype_name: Callable[[Any], str]
    info: dict[str, Any] = field(default_factory=dict)


def _torch_target(device: str) -> Target:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 results must match the CPU engine
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(device)
    info = {"torch": torch.__version__, "device": device}
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return Target(
        name=f"torch-{dev.type}",
        engine="array_api",
        to_device=lambda a: torch.asarray(np.ascontiguousarray(a), device=dev),
        sync=(lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None),
        is_native=lambda x: isinstance(x, torch.Tensor) and x.device.type == dev.type,
        dtype_name=lambda x: str(x.dtype).removeprefix("torch."),
        info=info,
    )


def _cupy_target() -> Target:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Target(
        name="cupy",
        engine="cupy",
        to_device=cupy.asarray,
        sync=lambda: cupy.cuda.Device().synchronize(),
        is_native=lambda x: isinstance(x, cupy.ndarray),
        dtype_name=lambda x: str(x.dtype),
        info={"cupy": cupy.__version__, "device_name": name,
              "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()},
    )


def _strict_target() -> Target:
    import array_api_strict as xps

    return Target(
        name="array_api_strict",
        engine="array_api",
        to_device=xps.asarray,
        sync=lambda: None,
        is_native=lambda x: type(x).__module__.startswith("array_api_strict"),
        dtype_name=lambda x: str(x.dtype).rsplit(".", 1)[-1],
        info={"array_api_strict": getattr(xps, "__version__", "?")},
    )


def gpu_targets() -> tuple[list[Target], list[str]]:
    """The GPU targets usable here, and for each one that is not, what is missing."""
    from sparsefact.backends.cupy_backend import gpu_unavailable_reason

    targets, missing = [], []
    reason = gpu_unavailable_reason()
    if reason is None:
        targets.append(_cupy_target())
    else:
        missing.append(f"cupy: {reason}")
    try:
        import torch
    except ImportError:
        missing.append("torch-cuda: torch is not installed")
    else:
        if torch.cuda.is_available():
            targets.append(_torch_target("cuda"))
        elif torch.version.cuda is None:
            missing.append(f"torch-cuda: torch {torch.__version__} is built without CUDA")
        else:
            missing.append(f"torch-cuda: torch {torch.__version__} sees no CUDA device "
                           "(torch.cuda.is_available() is False)")
    return targets, missing


def dry_run_targets(names: Sequence[str]) -> list[Target]:
    """CPU stand-ins for the GPU targets (``--cpu-dry-run``)."""
    makers = {"torch-cpu": lambda: _torch_target("cpu"), "array_api_strict": _strict_target}
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise SystemExit(f"gpu_check: --targets for --cpu-dry-run: unknown {unknown}; use {sorted(makers)}")
    return [makers[n]() for n in names]


# ---------------------------------------------------------------------- inputs and fits
def problem(m: int, n: int, dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian layer and a float64 calibration Gram with unequal feature scales (NumPy)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n)).astype(dtype)
    X = rng.standard_normal((2 * n, n)) * np.exp(0.5 * rng.standard_normal(n))
    return W, X.T @ X


def make_estimator(method: str, *, dsf_iter: int | None, backend: str = "auto") -> Any:
    """The estimator of ``method`` at density 0.5 (DSF with ``dsf_iter`` outer iterations)."""
    if method == "dsf":
        extra = {} if dsf_iter is None else {"max_iter": dsf_iter}
        return DoubleSparseFactorization(density=DENSITY, backend=backend, **extra)
    if method == "sparsegpt":
        return SparseGPT(density=DENSITY, backend=backend)
    if method == "wanda":
        return Wanda(density=DENSITY, backend=backend)
    raise ValueError(f"unknown method {method!r}")


def relative_difference(a: float, b: float) -> float:
    """``|a - b| / |b|`` (0 when both are 0)."""
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(b), np.finfo(np.float64).tiny)


def compare_case(target: Target, method: str, dtype: str, shape: tuple[int, int], dsf_iter: int) -> dict:
    """Fit ``method`` on the CPU engine and on ``target`` with the same inputs; one JSON row."""
    W, G = problem(*shape, dtype)
    cpu = make_estimator(method, dsf_iter=dsf_iter, backend="numpy_numba")
    start = time.perf_counter()
    cpu.fit(W, calibration=Calibration.from_gram(G))
    cpu_s = time.perf_counter() - start
    W_t, G_t = target.to_device(W), target.to_device(G)
    est = make_estimator(method, dsf_iter=dsf_iter)
    target.sync()
    start = time.perf_counter()
    est.fit(W_t, calibration=Calibration.from_gram(G_t))
    target.sync()
    seconds = time.perf_counter() - start
    out = est.reconstruct()
    tol = TOLERANCES[dtype]
    row = {
        "target": target.name, "method": method, "dtype": dtype, "shape": f"{shape[0]}x{shape[1]}",
        "backend": est.backend_, "cpu_backend": cpu.backend_,
        "calibrated_err": float(est.calibrated_err_), "cpu_calibrated_err": float(cpu.calibrated_err_),
        "reconstruction_err": float(est.reconstruction_err_),
        "cpu_reconstruction_err": float(cpu.reconstruction_err_),
        "nnz": int(est.nnz_), "cpu_nnz": int(cpu.nnz_),
        "seconds": seconds, "cpu_seconds": cpu_s, "tolerance": tol,
        "output_native": bool(target.is_native(out)), "output_dtype": target.dtype_name(out),
    }
    row["calibrated_rel_diff"] = relative_difference(row["calibrated_err"], row["cpu_calibrated_err"])
    row["reconstruction_rel_diff"] = relative_difference(row["reconstruction_err"],
                                                         row["cpu_reconstruction_err"])
    failures = []
    if row["backend"] != target.engine:
        failures.append(f"engine {row['backend']!r}, expected {target.engine!r}")
    for key in ("calibrated_rel_diff", "reconstruction_rel_diff"):
        if not row[key] <= tol:
            failures.append(f"{key} {row[key]:.2e} > {tol:g}")
    if row["nnz"] != row["cpu_nnz"]:
        failures.append(f"nnz {row['nnz']} != CPU engine's {row['cpu_nnz']}")
    if not row["output_native"]:
        failures.append("the result left the target's namespace or device")
    if row["output_dtype"] != dtype:
        failures.append(f"result dtype {row['output_dtype']}, input {dtype}")
    row["ok"] = not failures
    row["failures"] = failures
    return row


# ---------------------------------------------------------------------- speed
def gemm_rate(target: Target, k: int, repeats: int = 5) -> float:
    """Best float32 ``k x k @ k x k`` rate of ``target`` in FLOP/s (TF32 off)."""
    import array_api_compat

    rng = np.random.default_rng(1)
    a = target.to_device(rng.standard_normal((k, k), dtype=np.float32))
    b = target.to_device(rng.standard_normal((k, k), dtype=np.float32))
    xp = array_api_compat.array_namespace(a)
    xp.matmul(a, b)
    target.sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        xp.matmul(a, b)
        target.sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * k**3 / best


class _CountDSF:
    """Adds up the FLOPs counted by DSF's solvers during an estimator fit."""

    def __enter__(self) -> _CountDSF:
        self.flops = 0.0
        self._original = _estimators.double_sparse_factorization

        def counted(*args: Any, **kwargs: Any) -> Any:
            result = self._original(*args, **kwargs)
            self.flops += result.counters.gemm_flops + result.counters.inverse_flops
            return result

        _estimators.double_sparse_factorization = counted
        return self

    def __exit__(self, *exc: Any) -> None:
        _estimators.double_sparse_factorization = self._original


def speed_row(target: Target, method: str, m: int, n: int, gemm: float, dsf_iter: int | None) -> dict:
    """Time one float32 fit of ``method`` on an ``m x n`` layer of ``target``."""
    W, G = problem(m, n, "float32", seed=2)
    W_t = target.to_device(W)
    calibration = Calibration.from_gram(target.to_device(G), check_psd=False)
    del W, G
    est = make_estimator(method, dsf_iter=dsf_iter)
    target.sync()
    with _CountDSF() as counter:
        start = time.perf_counter()
        est.fit(W_t, calibration=calibration)
        target.sync()
        seconds = time.perf_counter() - start
    if method == "dsf":
        flops, counted = counter.flops, "solver counters"
    elif method == "sparsegpt":
        flops, counted = 2.0 * m * n * n + float(n) ** 3, "nominal 2mn^2 + n^3"
    else:
        flops, counted = None, None
    return {
        "target": target.name, "method": method, "shape": f"{m}x{n}", "dtype": "float32",
        "seconds": seconds, "calibrated_err": float(est.calibrated_err_), "nnz": int(est.nnz_),
        "backend": est.backend_, "gflop": None if flops is None else flops / 1e9, "flops_counted_by": counted,
        "achieved_gflops": None if flops is None else flops / seconds / 1e9, "gemm_gflops": gemm / 1e9,
        "fraction_of_gemm": None if flops is None else flops / seconds / gemm,
    }


def speed_table(target: Target, sizes: Sequence[tuple[int, int]], methods: Sequence[str], budget_s: float,
                gemm_k: int, dsf_iter: int | None, log: Callable[[str], None]) -> list[dict]:
    """Speed rows of ``target``; a size predicted to overrun ``budget_s`` is skipped (a row says so)."""
    start_all = time.perf_counter()
    for method in methods:  # warm-up: CUDA context, kernels, caches
        speed_row(target, method, 64, 64, 1.0, 2 if method == "dsf" else None)
    gemm = gemm_rate(target, gemm_k)
    log(f"{target.name}: float32 GEMM {gemm / 1e9:.0f} GFLOP/s ({gemm_k}^3, TF32 off)")
    rows: list[dict] = []
    last: dict[str, tuple[float, float]] = {}
    for m, n in sizes:
        work = float(m) * n * (m + n)  # DSF's and SparseGPT's cost grow about like this
        for method in methods:
            elapsed = time.perf_counter() - start_all
            if method in last:
                work0, s0 = last[method]
                predicted = s0 * work / work0
                if elapsed + predicted > budget_s:
                    why = (f"predicted {predicted:.0f} s would overrun --budget-s {budget_s:g} "
                           f"({elapsed:.0f} s used)")
                    rows.append({"target": target.name, "method": method, "shape": f"{m}x{n}",
                                 "skipped": why})
                    log(f"  {method:>9} {m}x{n}: skipped ({rows[-1]['skipped']})")
                    continue
            row = speed_row(target, method, m, n, gemm, dsf_iter)
            last[method] = (work, row["seconds"])
            rows.append(row)
            fraction = "" if row["fraction_of_gemm"] is None else f", {row['fraction_of_gemm']:.1%} of GEMM"
            log(f"  {method:>9} {m}x{n}: {row['seconds']:.2f} s, err {row['calibrated_err']:.4f}{fraction}")
    return rows


def format_speed(rows: Sequence[dict]) -> str:
    """The speed rows as a Markdown table."""
    lines = ["| target | method | shape | seconds | calibrated error | GFLOP | GFLOP/s | fraction of GEMM |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['target']} | {r['method']} | {r['shape']} | skipped: {r['skipped']} "
                         "| | | | |")
            continue
        gflop = "" if r["gflop"] is None else f"{r['gflop']:.4g}"
        rate = "" if r["achieved_gflops"] is None else f"{r['achieved_gflops']:.4g}"
        frac = "" if r["fraction_of_gemm"] is None else f"{r['fraction_of_gemm']:.1%}"
        lines.append(f"| {r['target']} | {r['method']} | {r['shape']} | {r['seconds']:.2f} | "
                     f"{r['calibrated_err']:.4f} | {gflop} | {rate} | {frac} |")
    return "\n".join(lines)


def run_gpu_tests() -> dict:
    """``pytest -m gpu`` in the repository; its exit status and last lines."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-ra", "-q", "-p", "no:cacheprovider", "tests"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    # 5: no test collected under the marker is not a failure of the check
    return {"command": " ".join(command[1:]), "returncode": done.returncode, "ok": done.returncode in (0, 5),
            "tail": tail}


# ---------------------------------------------------------------------- main
def _sizes(text: str) -> list[tuple[int, int]]:
    """``"2048,8192x28672"`` -> ``[(2048, 2048), (8192, 28672)]``."""
    return [(s[0], s[0]) if len(s) == 1 else s for s in _shapes(text)]


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The script's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the comparison and the speed logic on CPU stand-ins (torch-CPU tensors), "
                        "small sizes; not a GPU measurement")
    parser.add_argument("--targets", default=None,
                        help="comma-separated targets (GPU: cupy,torch-cuda; "
                        "dry run: torch-cpu,array_api_strict)")
    parser.add_argument("--sizes", type=_sizes, default=None,
                        help="speed layers, n or m x n (default 2048,4096,8192; e.g. add 8192x28672; "
                        "dry run 128)")
    parser.add_argument("--compare-shapes", type=_shapes, default=None,
                        help="m x n of the agreement checks (default 256x256,384x512; dry run 64x96)")
    parser.add_argument("--methods", default=",".join(METHODS), help="of dsf,sparsegpt,wanda (default all)")
    parser.add_argument("--compare-iter", type=int, default=10, help="DSF outer iterations in the agreement")
    parser.add_argument("--speed-iter", type=int, default=None,
                        help="DSF outer iterations in the speed table (default: DSF's own, 40)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds for the speed table of one target; bigger sizes are skipped past it")
    parser.add_argument("--gemm-k", type=int, default=None,
                        help="size of the GEMM rate product (default 8192)")
    parser.add_argument("--no-speed", action="store_true", help="only the agreement (and the tests)")
    parser.add_argument("--no-tests", action="store_true", help="do not run pytest -m gpu")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"output (default {DEFAULT_JSON})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit status (0 ok, 1 a check failed, 2 no usable GPU)."""
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # fixed iteration counts, on purpose

    def log(message: str) -> None:
        print(message, flush=True)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        raise SystemExit(f"gpu_check: --methods: unknown {sorted(set(methods) - set(METHODS))}")
    dry = args.cpu_dry_run
    if dry:
        names = (args.targets or "torch-cpu").split(",")
        targets = dry_run_targets([n.strip() for n in names])
        missing: list[str] = []
        sizes = args.sizes or [(128, 128)]
        shapes = args.compare_shapes or [(64, 96)]
        gemm_k = args.gemm_k or 256
        log("gpu_check --cpu-dry-run: CPU stand-ins for the GPU; these numbers are not GPU measurements")
    else:
        targets, missing = gpu_targets()
        if args.targets:
            wanted = [n.strip() for n in args.targets.split(",")]
            targets = [t for t in targets if t.name in wanted]
        if not targets:
            print("gpu_check: error: no usable GPU here; missing: " + "; ".join(missing)
                  + " (use --cpu-dry-run to test this script's logic on the CPU)", file=sys.stderr)
            return 2
        sizes = args.sizes or [(2048, 2048), (4096, 4096), (8192, 8192)]
        shapes = args.compare_shapes or [(256, 256), (384, 512)]
        gemm_k = args.gemm_k or 8192
    for reason in missing:
        log(f"not checked: {reason}")

    # 1. agreement with the CPU engine
    start = time.perf_counter()
    make_estimator("dsf", dsf_iter=2, backend="numpy_numba").fit(*problem(16, 16, "float64"))  # compile Numba
    agreement = []
    for target in targets:
        for shape in shapes:
            for dtype in ("float32", "float64"):
                for method in methods:
                    row = compare_case(target, method, dtype, shape, args.compare_iter)
                    agreement.append(row)
                    status = "ok" if row["ok"] else "FAIL: " + "; ".join(row["failures"])
                    log(f"{target.name:>16} {method:>9} {dtype} {row['shape']}: calibrated err "
                        f"{row['calibrated_err']:.6g} vs CPU {row['cpu_calibrated_err']:.6g} "
                        f"(rel {row['calibrated_rel_diff']:.1e}), nnz {row['nnz']} vs {row['cpu_nnz']}  "
                        f"{status}")
    agreement_ok = all(r["ok"] for r in agreement)
    log(f"agreement: {sum(r['ok'] for r in agreement)}/{len(agreement)} cases hold "
        f"({time.perf_counter() - start:.1f} s)")

    # 2. the GPU-marked tests
    tests = None
    if not dry and not args.no_tests:
        tests = run_gpu_tests()
        log(f"pytest -m gpu: exit {tests['returncode']}: " + (tests["tail"][-1] if tests["tail"] else ""))

    # 3. speed
    speed: list[dict] = []
    if not args.no_speed:
        for target in targets:
            speed += speed_table(target, sizes, methods, args.budget_s, gemm_k, args.speed_iter, log)
        log("")
        log(format_speed(speed))

    ok = agreement_ok and (tests is None or tests["ok"])
    report = {
        "dry_run": dry,
        "note": ("CPU dry run: array-API engine on CPU stand-ins; not a GPU measurement" if dry
                 else "GPU engines against the CPU engine (numpy_numba)"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "numpy": np.__version__},
        "targets": {t.name: t.info for t in targets},
        "not_checked": missing,
        "tolerances": TOLERANCES,
        "density": DENSITY,
        "agreement": agreement,
        "agreement_ok": agreement_ok,
        "gpu_tests": tests,
        "speed": speed,
        "ok": ok,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.json}")
    if not ok:
        print("gpu_check: error: " + ("some agreements fail (see above)" if not agreement_ok
                                      else "pytest -m gpu failed"), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
