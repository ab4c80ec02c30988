"""benchmarks/gpu_check.py (issue 15): its logic through ``--cpu-dry-run`` (CPU stand-ins for the GPU),
and its refusal without a GPU. The GPU run itself is ``python benchmarks/gpu_check.py`` on a GPU machine."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the dry run's stand-in is torch-CPU tensors")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["gpu_check"]
        raise
    return module


@pytest.fixture(scope="module")
def gpu_check():
    module = _load()
    yield module
    sys.modules.pop("gpu_check", None)


def test_cpu_dry_run_writes_the_rows_and_the_agreements_hold(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    status = gpu_check.main([
        "--cpu-dry-run", "--targets", "torch-cpu,array_api_strict", "--compare-shapes", "48x64",
        "--compare-iter", "4", "--sizes", "64,48x96", "--speed-iter", "3", "--gemm-k", "128",
        "--json", str(out),
    ])
    printed = capsys.readouterr().out
    assert status == 0, printed
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["ok"] and report["agreement_ok"]
    assert report["gpu_tests"] is None  # the GPU-marked tests run only on a GPU
    cases = {(r["target"], r["method"], r["dtype"]) for r in report["agreement"]}
    assert cases == {(t, m, d) for t in ("torch-cpu", "array_api_strict")
                     for m in ("dsf", "sparsegpt", "wanda") for d in ("float32", "float64")}
    for row in report["agreement"]:
        assert row["ok"], row
        assert row["backend"] == "array_api" and row["cpu_backend"] == "numpy_numba"
        assert row["nnz"] == row["cpu_nnz"] and row["output_native"] and row["output_dtype"] == row["dtype"]
        assert row["calibrated_rel_diff"] <= gpu_check.TOLERANCES[row["dtype"]]
        assert row["reconstruction_rel_diff"] <= gpu_check.TOLERANCES[row["dtype"]]
    speed = {(r["target"], r["method"], r["shape"]): r for r in report["speed"]}
    assert set(speed) == {(t, m, s) for t in ("torch-cpu", "array_api_strict")
                          for m in ("dsf", "sparsegpt", "wanda") for s in ("64x64", "48x96")}
    for row in speed.values():
        assert row["seconds"] > 0 and row["gemm_gflops"] > 0 and row["dtype"] == "float32"
        if row["method"] == "wanda":
            assert row["fraction_of_gemm"] is None
        else:
            assert row["gflop"] > 0 and row["fraction_of_gemm"] > 0
    assert "| torch-cpu | dsf | 64x64 |" in printed and "not GPU measurements" in printed


def test_a_failed_agreement_is_exit_1(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.TOLERANCES, "float64", -1.0)  # nothing agrees within a negative tolerance
    out = tmp_path / "r.json"
    status = gpu_check.main(["--cpu-dry-run", "--methods", "wanda", "--compare-shapes", "16x24",
                             "--no-speed", "--json", str(out)])
    assert status == 1
    report = json.loads(out.read_text())
    failed = [r for r in report["agreement"] if not r["ok"]]
    assert failed and all(r["dtype"] == "float64" for r in failed) and not report["ok"]
    assert "some agreements fail" in capsys.readouterr().err


def test_speed_sizes_past_the_budget_are_skipped_with_the_reason(gpu_check):
    target = gpu_check.dry_run_targets(["torch-cpu"])[0]
    rows = gpu_check.speed_table(target, [(32, 32), (4096, 4096)], ["wanda"], budget_s=0.0, gemm_k=64,
                                 dsf_iter=None, log=lambda _: None)
    assert "seconds" in rows[0] and "would overrun --budget-s" in rows[1]["skipped"]
    assert "skipped:" in gpu_check.format_speed(rows)


def test_without_a_gpu_the_check_refuses_and_names_what_is_missing(gpu_check, tmp_path, capsys, monkeypatch):
    import torch

    from sparsefact.backends.cupy_backend import gpu_available

    if gpu_available() or torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is what happens without one")
    out = tmp_path / "r.json"
    assert gpu_check.main(["--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no usable GPU" in err and "cupy:" in err and "torch-cuda:" in err and "--cpu-dry-run" in err
    assert not out.exists()
