"""Shared fixtures and settings of the sparsefact test suite.

- Hypothesis runs derandomized with a fixed example budget and no deadline (Numba
  compiles kernels on first use, which would trip a per-example deadline), so CI runs
  are reproducible. ``SPARSEFACT_HYPOTHESIS_PROFILE=thorough`` runs more examples.
- The suite checks numbers, never speed. On a shared 2-core machine the Numba (OpenMP)
  and BLAS thread pools of a fit oversubscribe the cores and a 256x256 fit was measured
  10-30x slower than single-threaded, so every test runs with one thread per pool
  (``SPARSEFACT_TEST_THREADS`` overrides). ``tests/test_backends.py`` runs the parallel
  Numba kernels with two threads explicitly, so their parallel paths stay covered.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=30,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=300,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("SPARSEFACT_HYPOTHESIS_PROFILE", "ci"))

TEST_THREADS = int(os.environ.get("SPARSEFACT_TEST_THREADS", "1"))


@pytest.fixture(scope="session", autouse=True)
def _limit_threads():
    """One thread per pool for the whole session (see the module docstring)."""
    from sparsefact.backends.threads import limit_threads

    with limit_threads(TEST_THREADS):
        yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ---------------------------------------------------------------------- namespaces and engines
NAMESPACES = ("numpy", "array_api_strict", "torch")


@pytest.fixture(params=NAMESPACES)
def xp(request):
    """An array namespace the portable engine runs under (skipped, with the reason, if missing)."""
    name = request.param
    if name == "numpy":
        import array_api_compat.numpy as np_compat

        return np_compat
    if name == "torch":
        pytest.importorskip("torch", reason="torch is not installed (pip install sparsefact[torch])")
        import array_api_compat.torch as torch_compat

        return torch_compat
    return pytest.importorskip(name, reason=f"{name} is not installed")


@pytest.fixture
def xps():
    """The ``array_api_strict`` namespace (skipped, with the reason, if it is not installed)."""
    return pytest.importorskip("array_api_strict", reason="array_api_strict is not installed ([dev] extra)")


@pytest.fixture
def torch_module():
    """The ``torch`` module (skipped, with the reason, if it is not installed)."""
    return pytest.importorskip("torch", reason="torch is not installed (pip install sparsefact[torch])")


@pytest.fixture
def one_torch_thread(torch_module):
    """torch limited to one thread (and seeded 0) for the test, its thread count restored after.

    The torch test modules use it for every test: ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    previous = torch_module.get_num_threads()
    torch_module.set_num_threads(1)
    torch_module.manual_seed(0)
    yield
    torch_module.set_num_threads(previous)


def to_namespace(xp, array: np.ndarray):
    """``array`` as an array of namespace ``xp`` (on its default device)."""
    return xp.asarray(array)


@pytest.fixture(scope="session")
def dask_client():
    """A real ``dask.distributed`` cluster: 2 worker processes, 1 thread each, on 127.0.0.1 only.

    Started once for the session (workers import sparsefact and load the Numba cache) and
    closed at the end.
    """
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, silence_logs=50,
    )
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
