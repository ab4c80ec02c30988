"""factorize_many: the same layer fits serially, on local processes and on a real Dask cluster."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from sparsefact import Calibration
from sparsefact.parallel import estimate_memory, factorize_many

distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")

PARAMS = {"max_iter": 4, "tol": 0}


def _jobs(count=4, seed=0):
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(count):
        m, n = (24, 32) if i % 2 else (32, 24)
        W = rng.standard_normal((m, n))
        X = rng.standard_normal((3 * n, n))
        jobs.append((f"layer{i}", W, Calibration.from_activations(X)))
    return jobs


def _factors(results):
    return {name: [np.asarray(f) for f in r.result.estimator.get_factors()] for name, r in results.items()}


@pytest.fixture
def client(dask_client):
    return dask_client


def test_serial_results_in_job_order_with_reports():
    jobs = _jobs()
    out = factorize_many(jobs, "dsf", density=0.5, **PARAMS)
    assert list(out) == [name for name, _, _ in jobs]
    for (name, W, _), result in zip(jobs, out.values(), strict=True):
        assert result.ok and result.result.row["name"] == name
        assert result.result.row["nnz"] <= 0.5 * W.size


def test_dask_cluster_gives_the_serial_results_bit_for_bit(client):
    jobs = _jobs()
    serial = _factors(factorize_many(jobs, "dsf", density=0.5, **PARAMS))
    seen = []
    on_cluster = factorize_many(jobs, "dsf", density=0.5, client=client, progress=seen.append, **PARAMS)
    assert sorted(r.name for r in seen) == sorted(serial)
    for name, factors in _factors(on_cluster).items():
        for got, expected in zip(factors, serial[name], strict=True):
            assert np.array_equal(got, expected)


def test_local_processes_give_the_serial_results():
    jobs = _jobs(count=3, seed=1)
    serial = _factors(factorize_many(jobs, "sparsegpt", density=0.5))
    parallel = _factors(factorize_many(jobs, "sparsegpt", density=0.5, n_jobs=2))
    for name in serial:
        assert all(np.array_equal(a, b) for a, b in zip(parallel[name], serial[name], strict=True))


def test_a_job_that_raises_does_not_lose_the_others(client):
    jobs = _jobs(count=2)
    jobs.insert(1, ("bad", np.ones((1, 5)), None))  # DSF needs two rows
    for kwargs in ({}, {"client": client}):
        out = factorize_many(jobs, "dsf", density=0.5, **kwargs, **PARAMS)
        assert not out["bad"].ok and "ValueError" in out["bad"].error and out["bad"].result is None
        assert all(out[n].ok for n in ("layer0", "layer1"))


def test_a_killed_worker_has_its_task_retried(client):
    rng = np.random.default_rng(5)
    jobs = [(f"big{i}", rng.standard_normal((96, 96)), None) for i in range(4)]
    pids = list(client.run(os.getpid).values())
    killed = []

    def kill_one_when_busy():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(client.processing().values()):
                time.sleep(0.3)
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_when_busy)
    killer.start()
    out = factorize_many(jobs, "dsf", density=0.5, client=client, retries=3, max_iter=20, tol=0)
    killer.join()
    assert killed, "no task was running to kill"
    assert all(r.ok for r in out.values()), [r.error for r in out.values()]
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the worker for later tests


def test_bad_jobs_are_refused_before_any_fit():
    with pytest.raises(TypeError, match="triple"):
        factorize_many([("a", np.ones((3, 3)))])
    with pytest.raises(ValueError, match="twice"):
        factorize_many([("a", np.ones((3, 3)), None), ("a", np.ones((3, 3)), None)])
    with pytest.raises(TypeError, match="Calibration"):
        factorize_many([("a", np.ones((3, 3)), np.eye(3))])
    with pytest.raises(ValueError, match="unknown method"):
        factorize_many([("a", np.ones((3, 3)), None)], "nosuch")
    with pytest.raises(ValueError, match="n_jobs"):
        factorize_many([("a", np.ones((3, 3)), None)], n_jobs=0)


def test_the_engine_is_resolved_in_the_caller(client):
    import sparsefact

    jobs = _jobs(count=2)
    with sparsefact.config_context(backend="array_api"):
        out = factorize_many(jobs, "magnitude", density=0.5, client=client)
    assert {r.result.estimator.backend_ for r in out.values()} == {"array_api"}


def test_memory_estimate_grows_with_the_layer():
    small, big = estimate_memory((384, 384)), estimate_memory((1536, 384))
    assert 0 < small < big
    assert estimate_memory((384, 384), "wanda") > 0
