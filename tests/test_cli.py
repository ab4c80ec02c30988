"""Tests of the ``sparsefact`` command (sparsefact/cli.py)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from sparsefact.cli import build_parser, format_table, main, make_demo_layer


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One short demo run (3 outer iterations) shared by the assertions below."""
    path = tmp_path_factory.mktemp("demo") / "out" / "demo.json"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(["demo", "--max-iter", "3", "--json", str(path)])
    return status, buffer.getvalue(), json.loads(path.read_text())


def test_demo_exits_zero_and_writes_json(demo_run):
    status, printed, report = demo_run
    assert status == 0
    assert report["layer"] == {"m": 256, "n": 512, "n_tokens": 2048, "seed": 0, "dtype": "float32"}
    assert report["settings"] == {"density": 0.5, "max_iter": 3}
    methods = [row["method"] for row in report["results"]]
    assert methods == ["magnitude pruning", "double sparse (DSF)"]
    assert "results written to" in printed


def test_demo_dsf_beats_magnitude_at_equal_budget(demo_run):
    _, _, report = demo_run
    magnitude, dsf = report["results"]
    assert dsf["calibrated_err"] < magnitude["calibrated_err"]
    assert 0 < dsf["calibrated_err"] < 1
    # finalisation is kept only when it does not raise the error
    assert dsf["calibrated_err"] <= dsf["calibrated_err_before_finalize"] + 1e-12


def test_demo_densities_within_budget(demo_run):
    _, _, report = demo_run
    m, n = report["layer"]["m"], report["layer"]["n"]
    for row in report["results"]:
        assert row["nnz"] <= 0.5 * m * n
        assert row["density"] == pytest.approx(row["nnz"] / (m * n))
        assert row["density"] <= 0.5
        assert row["density"] > 0.45  # the budget is actually used
        assert row["seconds"] >= 0
    dsf = report["results"][1]
    assert dsf["nnz_A"] + dsf["nnz_B"] == dsf["nnz"]
    assert dsf["backend"] == "numpy_numba"


def test_demo_prints_the_table(demo_run):
    _, printed, report = demo_run
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    for column in ("density", "calibrated err", "relative err", "seconds"):
        assert column in lines[header]
    for offset, row in enumerate(report["results"], start=2):
        cells = lines[header + offset].split()
        assert lines[header + offset].startswith(row["method"])
        density, calibrated, relative, seconds = (float(c) for c in cells[-4:])
        assert density == pytest.approx(row["density"], abs=5e-5)
        assert calibrated == pytest.approx(row["calibrated_err"], abs=5e-5)
        assert relative == pytest.approx(row["relative_err"], abs=5e-5)
        assert seconds == pytest.approx(row["seconds"], abs=5e-3)
    # progress lines: one per step, printed before the table
    assert any(line.startswith("[1/2] magnitude pruning") for line in lines[:header])
    assert any(line.startswith("[2/2] Double Sparse Factorization") for line in lines[:header])
    # three iterations do not converge: reported as a note, not as a traceback
    assert report["warnings"] and "did not converge" in report["warnings"][0]
    assert any(line.startswith("note: ") for line in lines[header:])
    assert format_table(report).splitlines()[0] == lines[header]


def test_demo_layer_is_deterministic_with_realistic_scales():
    W, X = make_demo_layer(seed=3)
    W2, X2 = make_demo_layer(seed=3)
    assert W.shape == (256, 512) and X.shape == (4 * 512, 512)
    assert W.dtype == np.float32 and X.dtype == np.float32
    np.testing.assert_array_equal(W, W2)
    np.testing.assert_array_equal(X, X2)
    assert not np.array_equal(W, make_demo_layer(seed=4)[0])
    row_norms = np.linalg.norm(W, axis=1)
    feature_scales = np.linalg.norm(X, axis=0)
    assert row_norms.max() / row_norms.min() > 3  # rows of varied norms
    assert feature_scales.max() / feature_scales.min() > 20  # log-normal feature scales, sigma=1


def test_demo_other_density_and_shape_quiet(capsys):
    assert main(["demo", "--density", "0.4", "--max-iter", "2", "--shape", "48x80", "-q"]) == 0
    out = capsys.readouterr().out
    assert not out.startswith("Demo layer")  # --quiet: no progress lines
    rows = [line.split() for line in out.splitlines() if line.startswith(("magnitude", "double"))]
    assert len(rows) == 2
    for cells in rows:
        assert float(cells[-4]) <= 0.4


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--density", "1.5"],
        ["demo", "--density", "0"],
        ["demo", "--density", "0.1"],  # below the minimum density of a 256x512 layer
        ["demo", "--density", "abc"],
        ["demo", "--density", "nan"],
        ["demo", "--max-iter", "0"],
        ["demo", "--max-iter", "x"],
        ["demo", "--shape", "256"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["demo", "--density", "abc"], "density must be a number in (0, 1], got 'abc'"),
    (["demo", "--max-iter", "x"], "must be a positive integer, got 'x'"),
])
def test_non_numbers_are_named_in_the_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
    assert build_parser().prog == "sparsefact"
