"""sparsefact.compare: every method at equal nonzeros on the same data."""

import numpy as np
import pytest

from sparsefact import DoubleSparseFactorization, MagnitudePruning
from sparsefact.compare import METHODS, compare, make_compressor, plot_tradeoff
from sparsefact.metrics import relative_error

FAST = {"dsf": {"max_iter": 4, "tol": 0}, "dsf-exact": {"max_iter": 4, "tol": 0}}


def _layer(seed=0, m=24, n=32):
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.standard_normal(n))
    return (
        rng.standard_normal((m, n)),
        rng.standard_normal((120, n)) * scales,
        rng.standard_normal((120, n)) * scales,
    )


def test_every_named_method_runs_at_equal_budget():
    W, X, X_held = _layer()
    rows = compare(W, X, X_heldout=X_held, density=0.5, methods=list(METHODS), params=FAST, as_frame=False)
    assert [r["method"] for r in rows] == list(METHODS)
    for r in rows:
        assert r["nnz"] <= 0.5 * W.size
        assert 0 <= r["error"] < 1.5 and r["heldout_error"] is not None and r["seconds"] >= 0


def test_heldout_error_is_measured_on_the_heldout_gram():
    W, X, X_held = _layer(1)
    (row,) = compare(W, X, X_heldout=X_held, methods=["magnitude"], as_frame=False)
    est = MagnitudePruning(0.5).fit(W, X)
    assert row["error"] == pytest.approx(est.calibrated_err_)
    assert row["heldout_error"] == pytest.approx(relative_error(W, est.reconstruct(), X_held.T @ X_held))


def test_estimator_instances_are_cloned_with_the_density():
    W, X, _ = _layer(2)
    template = DoubleSparseFactorization(density=0.9, max_iter=3, tol=0)
    (row,) = compare(W, X, density=0.4, methods=[template], as_frame=False)
    assert row["method"] == "DoubleSparseFactorization" and row["nnz"] <= 0.4 * W.size
    assert template.density == 0.9 and not hasattr(template, "A_")


def test_unknown_method_and_double_calibration_are_errors():
    W, X, _ = _layer(3)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        make_compressor("nope", 0.5)
    from sparsefact import Calibration

    with pytest.raises(ValueError, match="either X_calib or its Calibration"):
        compare(W, X, calibration=Calibration.from_activations(X), methods=["magnitude"])


def test_plot_tradeoff_draws_one_curve_per_method(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    W, X, _ = _layer(4)
    ax, records = plot_tradeoff(W, X, densities=(0.3, 0.6), methods=["magnitude", "wanda"])
    assert len(ax.get_lines()) == 2 and len(records) == 4
    ax.figure.savefig(tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
