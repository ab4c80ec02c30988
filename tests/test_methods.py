"""The method registry (sparsefact.methods): one place that every method choice reads."""

from __future__ import annotations

import numpy as np
import pytest
from toy_method import NAME, KeepDiagonal

import sparsefact
from sparsefact import (
    DoubleSparseFactorization,
    MagnitudePruning,
    available_methods,
    compare,
    get_method,
    register_method,
    unregister_method,
)
from sparsefact.methods import make_estimator, method_name, spec_for

BUILTIN = ("dsf", "dsf-exact", "magnitude", "wanda", "sparsegpt", "admm", "lowrank")


@pytest.fixture
def toy():
    spec = register_method(NAME, KeepDiagonal, description="keep the main diagonal")
    yield spec
    unregister_method(NAME)


def test_builtin_methods_are_registered_with_what_they_need():
    methods = available_methods()
    assert set(BUILTIN) <= set(methods)
    assert methods["wanda"].needs == "diag"
    assert methods["magnitude"].needs == "none"
    assert methods["dsf"].needs == methods["sparsegpt"].needs == "gram"
    assert methods["dsf"].module == "double_sparse" and methods["lowrank"].module == "lowrank"
    assert methods["dsf-exact"].make(0.4).objective == "exact"
    assert all(spec.kind in ("layer", "structured", "scorer") for spec in methods.values())


def test_every_registered_class_is_a_base_compressor_with_density():
    for spec in available_methods().values():
        if spec.kind == "scorer":
            continue
        est = spec.make(0.5)
        assert isinstance(est, sparsefact.BaseCompressor)
        assert est.get_params()["density"] == 0.5


def test_toy_method_registered_alone_works_in_compare(toy):
    rng = np.random.default_rng(0)
    W, X = rng.standard_normal((12, 16)), rng.standard_normal((64, 16))
    rows = compare(W, X, density=0.5, methods=[NAME, "magnitude"], as_frame=False)
    toy_row = next(r for r in rows if r["method"] == NAME)
    est = KeepDiagonal(0.5).fit(W, X)
    assert toy_row["nnz"] == est.nnz_ == 12
    assert toy_row["error"] == pytest.approx(est.calibrated_err_)
    assert np.array_equal(est.reconstruct(), np.where(np.eye(12, 16, dtype=bool), W, 0))


def test_toy_method_respects_the_budget_and_reports_errors(toy):
    W = np.random.default_rng(1).standard_normal((6, 6))
    est = make_estimator(NAME, 2 / 36)
    est.fit(W)
    assert est.nnz_ == 2 and est.density_ == pytest.approx(2 / 36)
    assert est.calibrated_err_ == est.reconstruction_err_
    assert est.calibration_statistic_ == "none"
    assert method_name(KeepDiagonal) == NAME and spec_for(est).needs == "none"


def test_registering_twice_needs_replace(toy):
    with pytest.raises(ValueError, match="already registered"):
        register_method(NAME, KeepDiagonal)
    spec = register_method(NAME, KeepDiagonal, replace=True, description="again")
    assert get_method(NAME).description == "again" and spec.name == NAME


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "Bad Name", "estimator_class": KeepDiagonal}, ValueError, "lower-case"),
        ({"name": "x", "estimator_class": dict}, TypeError, "BaseCompressor"),
        ({"name": "x", "estimator_class": KeepDiagonal, "needs": "hessian"}, ValueError, "needs"),
        ({"name": "x", "estimator_class": KeepDiagonal, "kind": "other"}, ValueError, "kind"),
        ({"name": "x", "estimator_class": KeepDiagonal, "params": {"nope": 1}}, ValueError, "nope"),
        ({"name": "x", "estimator_class": DoubleSparseFactorization, "needs": "diag"}, ValueError, "gram"),
    ],
)
def test_bad_registrations_are_refused_with_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        register_method(**kwargs)
    assert "x" not in available_methods()


def test_unknown_names_list_the_available_methods():
    with pytest.raises(ValueError, match="available methods: .*dsf"):
        get_method("nosuch")
    with pytest.raises(KeyError):
        unregister_method("nosuch")


def test_a_scorer_is_listed_but_is_not_a_layer_compressor():
    register_method("toy-scorer", lambda model: {}, kind="scorer")
    try:
        assert available_methods(kind="scorer")["toy-scorer"].needs == "grad"
        with pytest.raises(ValueError, match="prune_at_init"):
            make_estimator("toy-scorer", 0.5)
    finally:
        unregister_method("toy-scorer")


def test_instances_and_classes_resolve_to_their_entries():
    assert spec_for(MagnitudePruning(scope="row")).name == "magnitude"
    assert spec_for("DSF").name == "dsf"
    est = make_estimator(MagnitudePruning(scope="row"), 0.25)
    assert est.density == 0.25 and est.scope == "row"
