"""Reliability of the estimators and the calibration under hostile input (issue 18, items 1-6).

Each test is a hostile input that used to give a silent wrong answer: overflow and underflow
(NaN factors, broken budgets, reported errors that were not the error), indefinite Grams,
3-D calibration inputs passed positionally, tied weights in ADMM, torch tensors that require
grad or are half precision, thread settings leaked by concurrent fits, and budgets left unspent
next to dead inputs. The property-based fuzz at the end runs every registered compressor on
random shapes, densities, dtypes and magnitudes from 1e-30 to 1e30.
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsefact import (
    ADMMPruning,
    Calibration,
    DoubleSparseFactorization,
    LowRank,
    MagnitudePruning,
    SparseGPT,
    Wanda,
    available_methods,
)
from sparsefact._validation import to_numpy
from sparsefact.masks import kept_budget
from sparsefact.methods import make_estimator

LAYER_METHODS = [name for name, spec in available_methods().items() if spec.kind != "scorer"]
SINGLE_SPARSE = (MagnitudePruning, Wanda, SparseGPT, ADMMPruning)


def _estimator(name: str, density: float = 0.5):
    """A quick estimator of registry method ``name``: few iterations, no convergence warning."""
    est = make_estimator(name, density)
    fast = {key: value for key, value in (("max_iter", 3), ("tol", 0)) if key in est.get_params()}
    return est.set_params(**fast)


def _normalised(a: np.ndarray) -> np.ndarray:
    """``a`` scaled by a power of two so that ``max |a|`` is in ``[0.5, 1)`` (exact)."""
    return np.ldexp(a, -math.frexp(float(np.max(np.abs(a))))[1])


def _dense64(value) -> np.ndarray:
    if hasattr(value, "toarray"):
        value = value.toarray()
    return np.asarray(to_numpy(value)).astype(np.float64)


def _recomputed_error(W, factors, gram=None) -> float:
    """``sqrt(tr(D G D^T) / tr(W G W^T))`` in float64 from the returned factors."""
    W64 = _dense64(W)
    W_hat = _dense64(factors[0])
    for factor in factors[1:]:
        W_hat = W_hat @ _dense64(factor)
    D = W64 - W_hat
    if gram is None:
        num, den = np.sum(D * D), np.sum(W64 * W64)
    elif gram.ndim == 1:
        num, den = np.sum(D * D * gram), np.sum(W64 * W64 * gram)
    else:
        num, den = np.sum(D * (D @ gram)), np.sum(W64 * (W64 @ gram))
    if den <= 0:
        return 0.0 if num <= 0 else math.inf
    return math.sqrt(max(num, 0.0) / den)


def _quiet_fit(est, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(*args, **kwargs)


def _budget_allowance(est, name: str, m: int, n: int) -> float:
    """The most stored numbers a fit may have: ``density m n``, or a documented minimum."""
    allowance = est.density * m * n
    if isinstance(est, LowRank):
        allowance = max(allowance, m + n)  # rank >= 1 (budget_rank)
    if type(est).__name__ == "ButterflyFactorization":  # the cheapest grid when none fits
        from sparsefact import structured

        sizes = [2**k for k in range(1, max(1, math.ceil(math.log2(max(min(m, n), 2)))) + 1)]
        allowance = max(allowance, min(structured._butterfly_count(m, n, N) for N in sizes))
    return allowance


def _assert_sound(est, name, W, gram, rel):
    """Finite factors within the budget, and a reported error equal to a float64 recomputation."""
    factors = est.get_factors()
    for factor in factors:
        assert np.all(np.isfinite(_dense64(factor))), f"{name}: non-finite factor"
    m, n = W.shape
    assert est.nnz_ <= _budget_allowance(est, name, m, n) + 1e-9, f"{name}: nnz_ {est.nnz_} over budget"
    expected = _recomputed_error(W, factors, gram)
    assert est.calibrated_err_ == pytest.approx(expected, rel=rel, abs=1e-12), name
    assert est.reconstruction_err_ == pytest.approx(_recomputed_error(W, factors), rel=rel, abs=1e-12)


# ---------------------------------------------------------------------- 1. overflow and underflow
@pytest.mark.parametrize("name", LAYER_METHODS)
@pytest.mark.parametrize(
    ("dtype", "w_shift", "x_shift"),
    [(np.float32, 66, None), (np.float32, -100, 0), (np.float64, 0, 664), (np.float32, 0, 66)],
    ids=["W-1e20-f32", "W-1e-30-f32", "X-1e200", "X-1e20-f32-gram-overflows-f32"],
)
def test_extreme_magnitudes_give_the_same_fit_as_normal_ones(name, dtype, w_shift, x_shift):
    """Scaling W or X by a power of two changes nothing but the scale of the result.

    Before: float32 W of 1e20 gave NaN factors and 3.5x the budget, X of 1e200 an inf Gram and
    NaN, W of 1e-30 a reported error of 0.0 while the true error was 0.47.
    """
    rng = np.random.default_rng(7)
    W = _normalised(rng.standard_normal((16, 16))).astype(dtype)
    X = None if x_shift is None else _normalised(rng.standard_normal((40, 16)))
    args = () if X is None else (X,)
    try:
        normal = _quiet_fit(_estimator(name), W, *args)
    except ValueError as exc:  # a shape or density the method does not take: same for both
        with pytest.raises(ValueError, match=re.escape(str(exc)[:40])):
            _quiet_fit(_estimator(name), np.ldexp(W, w_shift), *args)
        return
    W_big = np.ldexp(W, w_shift).astype(dtype)
    X_big = None if X is None else np.ldexp(X, x_shift)
    est = _quiet_fit(_estimator(name), W_big, *(() if X is None else (X_big,)))
    gram = None if X is None else np.ldexp(X.T @ X, 0)  # errors are invariant to the Gram's scale
    _assert_sound(est, name, W_big, gram, rel=1e-4 if dtype == np.float32 else 1e-9)
    if x_shift in (None, 0, 664):  # the scaled problem handed to the method is the normal one exactly
        np.testing.assert_array_equal(
            _dense64(est.reconstruct()), np.ldexp(_dense64(normal.reconstruct()), w_shift)
        )
        assert est.calibrated_err_ == pytest.approx(normal.calibrated_err_, rel=1e-6)
        assert est.nnz_ == normal.nnz_


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scaled_fit_keeps_every_fitted_attribute_consistent(dtype):
    """The factor that absorbs W's scale is rescaled in every attribute that holds it."""
    rng = np.random.default_rng(5)
    W = _normalised(rng.standard_normal((12, 10))).astype(dtype)
    X = rng.standard_normal((30, 10))
    shift = 66 if dtype == np.float32 else 400
    est = _quiet_fit(DoubleSparseFactorization(max_iter=3, tol=0), np.ldexp(W, shift), X)
    normal = _quiet_fit(DoubleSparseFactorization(max_iter=3, tol=0), W, X)
    assert est.components_ is est.B_
    np.testing.assert_allclose((est.A_ @ est.B_).toarray(), est.reconstruct(), rtol=1e-5)
    np.testing.assert_array_equal(est.B_.toarray(), normal.B_.toarray())  # A carries the scale
    np.testing.assert_array_equal(est.A_.toarray(), np.ldexp(normal.A_.toarray(), shift))
    codes = est.transform(np.ldexp(W, shift))
    assert np.all(np.isfinite(codes))
    np.testing.assert_allclose(est.inverse_transform(codes), np.ldexp(normal.inverse_transform(
        normal.transform(W)), shift), rtol=1e-3, atol=float(np.ldexp(1e-3, shift)))
    for cls in (MagnitudePruning, SparseGPT, ADMMPruning, LowRank):
        fitted = cls(0.5).fit(np.ldexp(W, shift), X)
        product = fitted.weight_.toarray() if hasattr(fitted, "weight_") else fitted.U_ @ fitted.V_
        np.testing.assert_allclose(product, fitted.reconstruct(), rtol=1e-6)


@pytest.mark.parametrize("shift", [-100, 0, 100])
def test_relative_error_is_the_error_at_any_scale(shift):
    """float32 arguments of 1e-30 gave 0.0 (the squares underflowed), 1e30 gave NaN."""
    from sparsefact import relative_error

    rng = np.random.default_rng(4)
    W = _normalised(rng.standard_normal((6, 8))).astype(np.float32)
    W_hat = W.copy()
    W_hat[0] = 0.0
    X = rng.standard_normal((20, 8))
    G = X.T @ X
    expected = _recomputed_error(W, [W_hat], G)
    scaled = relative_error(np.ldexp(W, shift), np.ldexp(W_hat, shift), np.ldexp(G, 8 * shift))
    assert scaled == pytest.approx(expected, rel=1e-12)
    assert relative_error(np.ldexp(W, shift), np.ldexp(W_hat, shift)) == pytest.approx(
        _recomputed_error(W, [W_hat]), rel=1e-12
    )


def test_add_batch_never_keeps_an_inf_or_zero_gram():
    rng = np.random.default_rng(0)
    X = _normalised(rng.standard_normal((30, 5)))
    huge = Calibration().add_batch(np.ldexp(X, 664))  # X^T X ~ 1e400: inf in float64
    S, e = huge.scaled_gram()
    assert np.all(np.isfinite(S)) and e == 2 * 664
    np.testing.assert_array_equal(S, X.T @ X)
    with pytest.raises(ValueError, match="outside float64's range.*scaled_gram"):
        huge.gram()
    tiny = Calibration().add_batch(np.ldexp(X, -600))  # ~1e-360: zero in float64
    S, e = tiny.scaled_gram()
    np.testing.assert_array_equal(S, X.T @ X)
    assert e == -1200
    # batches of different scales: the sum keeps the larger one's scale
    mixed = Calibration().add_batch(X).add_batch(np.ldexp(X, 600))
    S, e = mixed.scaled_gram()
    assert e == 1200 and np.all(np.isfinite(S))
    np.testing.assert_allclose(S, X.T @ X, rtol=1e-15)
    # in the normal range nothing changes: the exponent is 0 and gram() is the plain sum
    normal = Calibration().add_batch(X[:10]).add_batch(X[10:])
    assert normal.scaled_gram()[1] == 0
    np.testing.assert_allclose(normal.gram(), X.T @ X, rtol=1e-14)


def test_diag_calibration_of_huge_activations():
    rng = np.random.default_rng(1)
    X = _normalised(rng.standard_normal((30, 8)))
    cal = Calibration(statistic="diag").add_batch(np.ldexp(X, 700))
    W = rng.standard_normal((6, 8))
    est = Wanda(0.5).fit(W, calibration=cal)
    reference = Wanda(0.5).fit(W, calibration=Calibration(statistic="diag").add_batch(X))
    np.testing.assert_array_equal(est.reconstruct(), reference.reconstruct())
    assert est.calibrated_err_ == pytest.approx(reference.calibrated_err_, rel=1e-12)


def test_float32_lowrank_singular_values_carry_the_scale():
    rng = np.random.default_rng(2)
    W = _normalised(rng.standard_normal((10, 12))).astype(np.float32)
    X = _normalised(rng.standard_normal((30, 12)))
    normal = LowRank(0.5).fit(W, X)
    big = LowRank(0.5).fit(np.ldexp(W, 66), np.ldexp(X, 664))
    np.testing.assert_allclose(big.singular_values_, np.ldexp(normal.singular_values_, 66 + 664), rtol=1e-12)


# ---------------------------------------------------------------------- 2. indefinite Grams
def test_indefinite_gram_is_refused_with_a_clear_message():
    G = np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # symmetric, positive diagonal
    with pytest.raises(ValueError, match=r"not positive semidefinite \(its smallest eigenvalue is -1\)"):
        Calibration.from_gram(G)
    # a tiny negative eigenvalue beyond rounding is refused too
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    with pytest.raises(ValueError, match="not positive semidefinite"):
        Calibration.from_gram(Q @ np.diag([5.0, 4, 3, 2, 1, -1e-3]) @ Q.T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_true_grams_pass_the_definiteness_check(dtype):
    rng = np.random.default_rng(1)
    for n_tokens in (1, 5, 200):  # singular (fewer tokens than features) and regular
        X = (rng.standard_normal((n_tokens, 40)) * np.logspace(0, 3, 40)).astype(dtype)
        G = X.T @ X  # accumulated in dtype: rounding may give tiny negative eigenvalues
        G = 0.5 * (G + G.T)
        assert Calibration.from_gram(G).n_features == 40
    assert Calibration.from_gram(np.zeros((4, 4))).n_features == 4  # no input ever active


def test_damping_advice_only_where_damping_is_zero():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((4, 6))
    G = np.eye(6)
    G[0, 1] = G[1, 0] = 3.0  # eigenvalue -2: indefinite
    unchecked = Calibration.from_gram(G, check_psd=False)
    with pytest.raises(np.linalg.LinAlgError) as info:
        SparseGPT(damping=0.01).fit(W, calibration=unchecked)
    assert "use damping > 0" not in str(info.value)
    assert "not positive semidefinite" in str(info.value)
    with pytest.raises(np.linalg.LinAlgError, match="not positive semidefinite"):
        ADMMPruning(rho=0.5, damping=0.0).fit(W, calibration=unchecked)
    X = np.ones((3, 10))  # singular PSD Gram, no damping: there the advice is right
    with pytest.raises(np.linalg.LinAlgError, match="use damping > 0"):
        SparseGPT(damping=0.0).fit(rng.standard_normal((4, 10)), X)


# ---------------------------------------------------------------------- 3. 3-D calibration inputs
@pytest.mark.parametrize("name", ["magnitude", "dsf", "sparsegpt", "lowrank"])
def test_three_dimensional_x_calib_raises_positionally_and_by_keyword(name):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 6))
    X = rng.standard_normal((2, 5, 6))  # (batch, tokens, features): was ignored positionally
    with pytest.raises(ValueError, match=r"X_calib \(the second positional argument of fit\) must be a 2-D"):
        _estimator(name).fit(W, X)
    with pytest.raises(ValueError, match=r"X_calib must be a 2-D array .* got 3 dimension"):
        _estimator(name).fit(W, X_calib=X)
    # the message's advice works
    _quiet_fit(_estimator(name), W, calibration=Calibration.from_activations(X))


# ---------------------------------------------------------------------- 4. ADMM on tied data
@pytest.mark.parametrize(
    "W",
    [
        np.ones((8, 10)),
        (np.arange(80).reshape(8, 10) % 2).astype(float),
        np.round(np.linspace(-2, 2, 80)).reshape(8, 10),
    ],
    ids=["constant", "boolean", "few-values"],
)
@pytest.mark.parametrize("calibrated", [False, True])
def test_admm_spends_its_budget_on_tied_weights(W, calibrated):
    X = np.ones((20, 10)) if calibrated else None  # equal activations: ties survive the scaling
    args = () if X is None else (np.eye(10) + X[:10],)
    est = ADMMPruning(density=0.5).fit(W, *args)
    assert est.nnz_ == kept_budget(0.5, W.size), "ties made ADMM keep fewer weights"
    assert est.unspent_budget_ == 0 and est.budget_note_ == ""
    assert est.calibrated_err_ < 1.0
    magnitude = MagnitudePruning(density=0.5).fit(W, *args)
    assert est.calibrated_err_ <= magnitude.calibrated_err_ * (1 + 1e-3) + 1e-12  # (up to ADMM's ridge)


# ---------------------------------------------------------------------- 5. torch inputs
@pytest.mark.parametrize("name", LAYER_METHODS)
def test_requires_grad_is_never_tracked(name):
    torch = pytest.importorskip("torch")
    W = torch.randn(16, 16, requires_grad=True)
    X = torch.randn(30, 16, requires_grad=True)
    try:
        est = _quiet_fit(_estimator(name), W, X)
    except ValueError:
        pytest.skip(f"{name} does not take this shape/density")
    for factor in est.get_factors():
        assert not factor.requires_grad and factor.grad_fn is None
    result = est.reconstruct()
    assert result.grad_fn is None and not result.requires_grad
    result.numpy()  # fails on a tensor that requires grad
    assert W.grad is None and X.grad is None


@pytest.mark.parametrize("name", LAYER_METHODS)
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_half_precision_torch_comes_back_in_its_dtype(name, dtype_name):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(16, 16, generator=gen).to(dtype)
    X = torch.randn(30, 16, generator=gen).to(dtype)
    try:
        est = _quiet_fit(_estimator(name), W, X)
    except ValueError:
        pytest.skip(f"{name} does not take this shape/density")
    assert all(f.dtype == dtype for f in est.get_factors())
    assert est.reconstruct().dtype == dtype
    X64 = X.double().numpy()
    assert est.calibrated_err_ == pytest.approx(
        _recomputed_error(W.float(), [f.float() for f in est.get_factors()], X64.T @ X64), rel=1e-6
    )


def test_numpy_float16_comes_back_in_float16():
    W = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float16)
    est = MagnitudePruning(0.5).fit(W)
    assert est.reconstruct().dtype == np.float16
    assert est.calibrated_err_ == pytest.approx(_recomputed_error(W, est.get_factors()), rel=1e-9)


# ---------------------------------------------------------------------- 6. thread settings
class _FakeLibrary:
    """A BLAS library whose thread count is process-wide (as OpenBLAS's is)."""

    user_api = "blas"
    internal_api = "openblas"
    threading_layer = "pthreads"
    version = "0"
    prefix = "libopenblas"
    architecture = "fake"

    def __init__(self, filepath: str, num_threads: int) -> None:
        self.filepath = filepath
        self._n = num_threads
        self.lock = threading.Lock()

    @property
    def num_threads(self) -> int:
        return self._n

    def get_num_threads(self) -> int:
        return self._n

    def set_num_threads(self, n: int) -> None:
        self._n = n


class _FakeController:
    def __init__(self, libs) -> None:
        self.lib_controllers = libs

    def limit(self, *, limits, user_api):  # pragma: no cover - the old code path only
        raise AssertionError("contexts must go through sparsefact's thread registry")


@pytest.fixture
def fake_blas(monkeypatch):
    """NumPy's own and SciPy's OpenBLAS, 4 threads each, seen by every context."""
    import threadpoolctl

    import sparsefact.backends.threads as threads

    libs = [
        _FakeLibrary(f"{np.__file__.rsplit('/', 1)[0]}.libs/libscipy_openblas64_.so", 4),
        _FakeLibrary("/site-packages/scipy.libs/libscipy_openblas.so", 4),
    ]
    monkeypatch.setattr(threadpoolctl, "ThreadpoolController", lambda: _FakeController(libs))
    # a private registry for the test (the session's own holds stay untouched)
    monkeypatch.setattr(threads, "_controller", None)
    monkeypatch.setattr(threads, "_holds", {}, raising=False)
    monkeypatch.setattr(threads, "_originals", {}, raising=False)
    return libs  # monkeypatch restores the real controller and registry afterwards


@pytest.mark.parametrize(
    ("first", "second"),
    [("foreign", "foreign"), ("foreign", "one"), ("one", "foreign"), ("limit", "foreign")],
)
def test_interleaved_contexts_in_two_threads_restore_the_original_counts(fake_blas, first, second):
    """Thread A enters, thread B enters, A leaves, B leaves: the libraries end as they began."""
    from sparsefact.backends import threads

    contexts = {
        "foreign": threads.single_threaded_foreign_blas,
        "one": threads.one_blas_thread,
        "limit": lambda: threads.limit_threads(2),
    }
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def run(body):
        try:
            body()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def thread_a():
        with contexts[first]():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def thread_b():
        a_in.wait(5)
        with contexts[second]():
            b_in.set()
            a_out.wait(5)
            seen["b after a left"] = [lib.num_threads for lib in fake_blas]

    workers = [threading.Thread(target=run, args=(f,)) for f in (thread_a, thread_b)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    assert not errors, errors
    assert [lib.num_threads for lib in fake_blas] == [4, 4], "a thread setting leaked"
    assert threads.held_limits() == {}
    assert seen["b after a left"][1] == 1  # B still holds SciPy's OpenBLAS at one thread


def test_nested_contexts_restore_in_any_order(fake_blas):
    from sparsefact.backends import threads

    outer = threads.single_threaded_foreign_blas()
    inner = threads.one_blas_thread()
    outer.__enter__()
    inner.__enter__()
    assert [lib.num_threads for lib in fake_blas] == [1, 1]
    outer.__exit__(None, None, None)  # the outer context leaves first
    assert [lib.num_threads for lib in fake_blas] == [1, 1]
    inner.__exit__(None, None, None)
    assert [lib.num_threads for lib in fake_blas] == [4, 4]


def test_concurrent_real_fits_leave_thread_settings_as_found():
    from threadpoolctl import ThreadpoolController

    from sparsefact.backends import threads

    def state():
        return {lc.filepath: lc.num_threads for lc in ThreadpoolController().lib_controllers}

    before, held_before = state(), threads.held_limits()
    rng = np.random.default_rng(0)
    W, X = rng.standard_normal((32, 32)), rng.standard_normal((80, 32))
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(i):
        try:
            for _ in range(3):
                barrier.wait(10)
                est = DoubleSparseFactorization(max_iter=2, tol=0) if i else SparseGPT(block_size=8)
                est.fit(W, X)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not errors, errors
    assert state() == before
    assert threads.held_limits() == held_before



# ---------------------------------------------------------------------- threads from the free cores
@pytest.mark.parametrize(("free", "inside"), [(2, 2), (1, 1), (0, 1)])
def test_adaptive_threads_gives_up_the_cores_taken(fake_blas, monkeypatch, free, inside):
    from sparsefact.backends import threads

    monkeypatch.setattr(threads, "free_cores", lambda: free)
    with threads.adaptive_threads() as limit:
        assert limit == inside
        assert [lib.num_threads for lib in fake_blas] == [inside, inside]
    assert [lib.num_threads for lib in fake_blas] == [4, 4]
    assert threads.held_limits() == {}


@pytest.mark.parametrize("free", [4, 7, None])
def test_adaptive_threads_changes_nothing_when_the_cores_are_free_or_unknown(fake_blas, monkeypatch, free):
    from sparsefact.backends import threads

    monkeypatch.setattr(threads, "free_cores", lambda: free)
    with threads.adaptive_threads() as limit:
        assert limit is None
        assert [lib.num_threads for lib in fake_blas] == [4, 4]


def test_adaptive_threads_can_be_turned_off(fake_blas, monkeypatch):
    import sparsefact
    from sparsefact.backends import threads

    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    with sparsefact.config_context(adapt_threads=False), threads.adaptive_threads() as limit:
        assert limit is None and [lib.num_threads for lib in fake_blas] == [4, 4]
    assert sparsefact.get_config()["adapt_threads"] is True
    monkeypatch.setenv(threads.ADAPT_ENV, "0")
    with threads.adaptive_threads() as limit:
        assert limit is None and [lib.num_threads for lib in fake_blas] == [4, 4]
    with pytest.raises(TypeError, match="adapt_threads"), sparsefact.config_context(adapt_threads="yes"):
        pass


def test_adaptive_threads_never_raises_a_callers_limit(fake_blas, monkeypatch):
    from sparsefact.backends import threads

    monkeypatch.setattr(threads, "free_cores", lambda: 3)
    with threads.limit_threads(2), threads.adaptive_threads() as limit:
        assert limit is None and [lib.num_threads for lib in fake_blas] == [2, 2]
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    with threads.limit_threads(2), threads.adaptive_threads() as limit:
        assert limit == 1 and [lib.num_threads for lib in fake_blas] == [1, 1]
    assert [lib.num_threads for lib in fake_blas] == [4, 4]


def test_a_cpu_fit_runs_on_the_free_cores(fake_blas, monkeypatch):
    from sparsefact.backends import threads
    from sparsefact.backends.numpy_numba import NumpyNumbaEngine

    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    seen = []
    original = NumpyNumbaEngine.spd_inverse  # called only inside the fit loop

    def recording_inverse(self, gram, shift):
        seen.append(tuple(lib.num_threads for lib in fake_blas))
        return original(self, gram, shift)

    monkeypatch.setattr(NumpyNumbaEngine, "spd_inverse", recording_inverse)
    rng = np.random.default_rng(0)
    DoubleSparseFactorization(0.5, max_iter=2, tol=0).fit(
        rng.standard_normal((16, 16)), rng.standard_normal((40, 16))
    )
    assert seen and set(seen) == {(1, 1)}  # NumPy's own BLAS on the one free core, SciPy's held at one
    assert [lib.num_threads for lib in fake_blas] == [4, 4]


def _spin(started, stop) -> None:
    started.set()
    while not stop.is_set():
        pass


def test_free_cores_sees_a_busy_process():
    import multiprocessing as mp

    from sparsefact.backends import threads

    cores = len(os.sched_getaffinity(0))
    quiet = threads.free_cores()
    assert isinstance(quiet, int) and 0 <= quiet <= cores
    context = mp.get_context("spawn")
    started, stop = context.Event(), context.Event()
    spinner = context.Process(target=_spin, args=(started, stop), daemon=True)
    spinner.start()
    try:
        assert started.wait(60)
        assert threads.free_cores() <= cores - 1  # the spinner is runnable in every snapshot
    finally:
        stop.set()
        spinner.join(30)


def test_free_cores_is_none_where_the_run_queue_cannot_be_read(monkeypatch):
    from sparsefact.backends import threads

    def unreadable():
        raise OSError("no /proc here")

    monkeypatch.setattr(threads, "_others_running", unreadable)
    assert threads.free_cores() is None

# ---------------------------------------------------------------------- budgets are spent
def _conv_like_calibration(n_dead: int, n: int = 256, seed: int = 0):
    """Activations whose first ``n_dead`` inputs never fire (zero padding of a convolution)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((600, n))
    X[:, :n_dead] = 0.0
    return X


@pytest.mark.parametrize("cls", SINGLE_SPARSE)
def test_budget_is_spent_next_to_dead_inputs(cls):
    """Seen on a CNN: SparseGPT asked for 0.5 ended at 0.427 (0.36 here): dead inputs took budget."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((16, 256))
    X = _conv_like_calibration(100)
    est = cls(density=0.5).fit(W, X)
    assert est.nnz_ == kept_budget(0.5, W.size)
    assert est.unspent_budget_ == 0 and est.budget_note_ == ""
    if cls is SparseGPT:
        assert not est.reconstruct()[:, :100].any()  # dead inputs' weights are zeroed


def test_budget_beyond_the_live_weights_is_reported():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((16, 256))
    X = _conv_like_calibration(200)  # 56 live inputs: 896 live weights < 2048 budgeted
    est = SparseGPT(density=0.5).fit(W, X)
    assert est.nnz_ == 16 * 56
    assert est.unspent_budget_ == kept_budget(0.5, W.size) - 16 * 56
    assert "200 of the 256 inputs are dead" in est.budget_note_
    portable = SparseGPT(density=0.5, backend="array_api").fit(W, X)
    assert portable.nnz_ == est.nnz_


def test_weights_that_are_zero_in_w_are_reported_by_methods_that_keep_w():
    W = np.zeros((4, 6))
    W[0, :2] = 1.0
    est = MagnitudePruning(density=0.5).fit(W)
    assert est.nnz_ == 2 and est.unspent_budget_ == 10
    assert "W has 22 zero entries" in est.budget_note_


# ---------------------------------------------------------------------- property-based fuzz
_ARGUMENT = re.compile(r"\b(W|X_calib|calibration|gram|density|split|n_blocks|block_size)\b")


def _fuzz_inputs(data):
    m = data.draw(st.integers(1, 40), label="m")
    n = data.draw(st.integers(1, 40), label="n")
    density = data.draw(
        st.one_of(st.floats(1e-3, 1.0, exclude_min=False), st.sampled_from([1.0, 0.5, 0.25])), label="density"
    )
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    w_exp = data.draw(st.integers(-30, 30), label="log10 |W|")
    kind = data.draw(st.sampled_from(["normal", "ties", "zeros"]), label="W kind")
    calib = data.draw(st.sampled_from(["none", "positional", "keyword", "gram", "diag"]), label="calibration")
    x_exp = data.draw(st.integers(-30, 30), label="log10 |X|")
    n_tokens = data.draw(st.integers(1, 60), label="tokens")
    dead = data.draw(st.integers(0, 3), label="dead inputs")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    if kind == "ties":
        W = np.round(W)
    elif kind == "zeros":
        W[rng.random((m, n)) < 0.5] = 0.0
    W = (W * 10.0**w_exp).astype(dtype)
    X = (rng.standard_normal((n_tokens, n)) * 10.0**x_exp).astype(dtype)
    X[:, : min(dead, n)] = 0.0
    return m, n, density, dtype, W, calib, X


#: Examples per method (about a minute for all of them on a 2-core machine); raise to explore.
FUZZ_EXAMPLES = int(os.environ.get("SPARSEFACT_FUZZ_EXAMPLES", "25"))


@settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@pytest.mark.parametrize("name", LAYER_METHODS)
@given(data=st.data())
def test_fuzz_every_compressor(name, data):
    """Every call raises ValueError/TypeError naming an argument, or returns a sound result."""
    m, n, density, dtype, W, calib, X = _fuzz_inputs(data)
    est = _estimator(name, density)
    X64 = X.astype(np.float64)
    gram = None if calib == "none" else X64.T @ X64
    try:
        if calib == "none":
            _quiet_fit(est, W)
        elif calib == "positional":
            _quiet_fit(est, W, X)
        elif calib == "keyword":
            _quiet_fit(est, W, X_calib=X)
        elif calib == "gram":
            _quiet_fit(est, W, calibration=Calibration.from_gram(gram))
        else:
            gram = np.sum(X64 * X64, axis=0)
            _quiet_fit(est, W, calibration=Calibration.from_diag(gram))
    except (ValueError, TypeError) as exc:
        assert _ARGUMENT.search(str(exc)), f"{name}: {type(exc).__name__} names no argument: {exc}"
        return
    _assert_sound(est, name, W, gram, rel=1e-4 if dtype == np.float32 else 1e-9)
    if isinstance(est, SINGLE_SPARSE):
        budget = est.nnz_ + est.unspent_budget_
        assert budget <= density * m * n + 1e-9
        assert bool(est.unspent_budget_) == bool(est.budget_note_)
