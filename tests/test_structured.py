"""Monarch and butterfly factorisations (sparsefact.structured)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st
from sklearn.base import clone

import sparsefact.structured as structured
from sparsefact.metrics import relative_error
from sparsefact.structured import (
    ButterflyFactorization,
    MonarchFactorization,
    butterfly_block_size_for_density,
    butterfly_matrix,
    monarch_blocks_for_density,
    monarch_matrix,
)


def _random_monarch(rng, m, n, b):
    P, c = -(-m // b), -(-n // b)
    L = rng.standard_normal((b, P, b))
    R = rng.standard_normal((b, b, c))
    return L, R, monarch_matrix(L, R, (m, n))


def _calibration(rng, n, tokens=None):
    """Activations with log-normally scaled features (as real layer inputs are)."""
    tokens = 4 * n if tokens is None else tokens
    return rng.standard_normal((tokens, n)) * np.exp(rng.standard_normal(n))


def _calibrated_err(W, W_hat, X):
    return relative_error(W, W_hat, X.T @ X)


# ====================================================================== Monarch
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    b_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_monarch_exact_recovery(m, n, b_frac, seed):
    b = 1 + int(b_frac * (min(m, n) - 1))
    rng = np.random.default_rng(seed)
    _, _, W = _random_monarch(rng, m, n, b)
    est = MonarchFactorization(n_blocks=b).fit(W)
    assert est.reconstruction_err_ < 1e-6
    assert relative_error(W, est.reconstruct()) < 1e-6
    assert est.nnz_ == b * (m + n)
    assert est.blocks_left_.shape == (b, -(-m // b), b)
    assert est.blocks_right_.shape == (b, b, -(-n // b))


def test_monarch_square_is_p_l_pt_r():
    """n = b^2: the fitted matrix is P blockdiag(L) P^T blockdiag(R), P the reshape-transpose."""
    rng = np.random.default_rng(0)
    b = 4
    n = b * b
    L, R, W = _random_monarch(rng, n, n, b)
    perm = np.arange(n).reshape(b, b).T.ravel()  # (P x)[k] = x[perm[k]]
    Pm = np.eye(n)[perm]
    assert np.array_equal(Pm, Pm.T)  # an involution for the square grid
    dense = Pm @ scipy.linalg.block_diag(*L) @ Pm.T @ scipy.linalg.block_diag(*R)
    np.testing.assert_allclose(W, dense, atol=1e-12)
    est = MonarchFactorization(n_blocks=b).fit(dense)
    np.testing.assert_allclose(est.reconstruct(), dense, atol=1e-10)


@pytest.mark.parametrize("shape, b", [((10, 7), 3), ((6, 15), 4), ((12, 12), 5), ((9, 4), 4)])
def test_monarch_entrywise_convention(shape, b):
    """M[r, k] = L[r mod b, r div b, g(k)] R[g(k), r mod b, s(k)], balanced contiguous groups."""
    m, n = shape
    rng = np.random.default_rng(1)
    L, R, W = _random_monarch(rng, m, n, b)
    sizes = [n // b + (1 if i < n % b else 0) for i in range(b)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    expected = np.zeros((m, n))
    for r in range(m):
        for k in range(n):
            g = int(np.searchsorted(starts, k, side="right") - 1)
            expected[r, k] = L[r % b, r // b, g] * R[g, r % b, k - starts[g]]
    np.testing.assert_allclose(W, expected, atol=1e-12)


@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1e-2]))
def test_monarch_projection_is_optimal(seed, scale):
    """No small perturbation of the fitted block factors lowers the Frobenius error."""
    rng = np.random.default_rng(seed)
    m, n, b = 12, 10, 3
    W = rng.standard_normal((m, n))
    est = MonarchFactorization(n_blocks=b).fit(W)
    best = np.linalg.norm(W - est.reconstruct())
    L, R = est.blocks_left_, est.blocks_right_
    for _ in range(10):
        L2 = L + scale * rng.standard_normal(L.shape)
        R2 = R + scale * rng.standard_normal(R.shape)
        assert np.linalg.norm(W - monarch_matrix(L2, R2, (m, n))) >= best - 1e-12


def test_monarch_density_rule():
    assert monarch_blocks_for_density(0.125, 256, 256) == 16
    assert monarch_blocks_for_density(0.5, 1024, 1024) == 256
    # b (m + n) <= density m n, and b + 1 does not fit
    for density, (m, n) in [(0.3, (50, 70)), (0.05, (384, 1536)), (1.0, (7, 9))]:
        b = monarch_blocks_for_density(density, m, n)
        assert b * (m + n) <= density * m * n < (b + 1) * (m + n) or b == min(m, n)
        est = MonarchFactorization(density=density).fit(np.ones((m, n)))
        assert est.n_blocks_ == b and est.nnz_ == b * (m + n)
        assert est.density_ <= density + 1e-12
    with pytest.raises(ValueError, match="density"):
        MonarchFactorization(density=0.01).fit(np.ones((10, 10)))
    with pytest.raises(ValueError, match="n_blocks"):
        MonarchFactorization(n_blocks=6).fit(np.ones((5, 8)))


@given(seed=st.integers(0, 2**16), tokens=st.sampled_from([6, 200]), b=st.sampled_from([2, 4]))
def test_monarch_calibrated_never_worse(seed, tokens, b):
    """The calibrated fit is never worse than the projection on the calibrated error
    (also with fewer tokens than inputs: a singular Gram)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((12, 16))
    X = _calibration(rng, 16, tokens)
    plain = MonarchFactorization(n_blocks=b, calibrated=False).fit(W, X)
    cal = MonarchFactorization(n_blocks=b).fit(W, X)
    assert cal.calibrated_err_ <= plain.calibrated_err_ + 1e-12
    assert cal.calibrated_err_ == pytest.approx(_calibrated_err(W, cal.reconstruct(), X), rel=1e-9)
    # without calibration, the calibrated flag changes nothing
    assert np.array_equal(MonarchFactorization(n_blocks=b).fit(W).reconstruct(),
                          MonarchFactorization(n_blocks=b, calibrated=False).fit(W).reconstruct())


def test_monarch_calibrated_gain():
    """With scaled activations the calibrated fit clearly lowers the calibrated error."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 64))
    X = _calibration(rng, 64)
    plain = MonarchFactorization(n_blocks=8, calibrated=False).fit(W, X)
    cal = MonarchFactorization(n_blocks=8).fit(W, X)
    assert cal.calibrated_ and cal.n_iter_ >= 1
    assert cal.calibrated_err_ < 0.8 * plain.calibrated_err_
    assert cal.reconstruction_err_ >= plain.reconstruction_err_ - 1e-12  # the projection is Frobenius-optimal


def test_monarch_als_steps_are_exact_least_squares():
    """Each half-step of the calibrated fit solves its linear least-squares problem."""
    rng = np.random.default_rng(3)
    m, n, b = 7, 8, 3
    W = rng.standard_normal((m, n))
    X = _calibration(rng, n, 30)
    G = X.T @ X
    P, c, col_index = structured._monarch_layout(m, n, b)
    S = structured._monarch_slices(W, b, P, col_index)
    L, R = structured._monarch_project(S)
    als = structured._MonarchALS(S, G, col_index, cg_iter=200)
    root = np.linalg.cholesky(G)

    def objective(L_, R_):
        D = W - monarch_matrix(L_, R_, (m, n))
        return float(np.trace(D @ G @ D.T))

    def generic(fixed_L, fixed_R, which):
        arr = fixed_L if which == "L" else fixed_R
        columns = []
        for ix in np.ndindex(arr.shape):
            e = np.zeros_like(arr)
            e[ix] = 1.0
            M = monarch_matrix(e, fixed_R, (m, n)) if which == "L" else monarch_matrix(fixed_L, e, (m, n))
            columns.append((M @ root).ravel())
        coef = np.linalg.lstsq(np.array(columns).T, (W @ root).ravel(), rcond=None)[0]
        return coef.reshape(arr.shape)

    L1 = als.l_step(R)
    assert objective(L1, R) == pytest.approx(objective(generic(L, R, "L"), R), rel=1e-9)
    R1 = als.r_step(L1, R)
    assert objective(L1, R1) == pytest.approx(objective(L1, generic(L1, R, "R")), rel=1e-9)
    assert als.objective(L1, R1) == pytest.approx(objective(L1, R1), rel=1e-9)
    assert als.objective_fast(L1, R1) == pytest.approx(objective(L1, R1), rel=1e-8)


@pytest.mark.parametrize("shape, b", [((16, 16), 4), ((13, 29), 5), ((30, 7), 2)])
def test_monarch_apply(shape, b):
    rng = np.random.default_rng(2)
    W = rng.standard_normal(shape)
    est = MonarchFactorization(n_blocks=b).fit(W)
    x = rng.standard_normal((shape[1], 3))
    np.testing.assert_allclose(est.apply(x), est.reconstruct() @ x, atol=1e-12)
    np.testing.assert_allclose(est.apply(x[:, 0]), est.reconstruct() @ x[:, 0], atol=1e-12)
    np.testing.assert_allclose(est.matvec(list(x[:, 1])), est.reconstruct() @ x[:, 1], atol=1e-12)
    with pytest.raises(ValueError, match="x"):
        est.apply(np.ones(shape[1] + 1))


# ====================================================================== butterfly
def _explicit_factor(tw_t, N, t):
    F = np.zeros((N, N))
    s = 1 << t
    for i0 in range(N):
        if i0 & s:
            continue
        p = (i0 >> (t + 1)) * s + (i0 & (s - 1))
        pair = (i0, i0 + s)
        for a in range(2):
            for bb in range(2):
                F[pair[a], pair[bb]] = tw_t[p, a, bb]
    return F


def test_butterfly_matrix_convention():
    """butterfly_matrix = F_{L-1} ... F_0, F_t coupling i with i ^ 2^t by the documented pair layout."""
    rng = np.random.default_rng(0)
    N, L = 16, 4
    tw = rng.standard_normal((L, N // 2, 2, 2))
    expected = np.eye(N)
    for t in range(L):
        F = _explicit_factor(tw[t], N, t)
        rows, cols = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
        partner = rows ^ cols
        assert np.all(F[(rows != cols) & (partner != 1 << t)] == 0)
        assert np.count_nonzero(F, axis=1).max() == 2
        expected = F @ expected
    np.testing.assert_allclose(butterfly_matrix(tw), expected, atol=1e-12)


@pytest.mark.parametrize("method", ["hierarchical", "als"])
def test_butterfly_recovers_hadamard(method):
    H = scipy.linalg.hadamard(64).astype(np.float64)
    est = ButterflyFactorization(method=method).fit(H)
    assert est.reconstruction_err_ < 1e-6
    assert est.block_size_ == 64 and est.grid_shape_ == (1, 1)
    assert est.twiddles_.shape == (1, 6, 32, 2, 2)
    assert est.nnz_ == 2 * 64 * 6
    np.testing.assert_allclose(butterfly_matrix(est.twiddles_[0]), H, atol=1e-10)


@given(seed=st.integers(0, 2**16), L=st.integers(1, 6))
def test_butterfly_recovers_random_butterfly(seed, L):
    rng = np.random.default_rng(seed)
    N = 1 << L
    W = butterfly_matrix(rng.standard_normal((L, N // 2, 2, 2)))
    est = ButterflyFactorization(method="hierarchical").fit(W)
    assert est.reconstruction_err_ < 1e-6


def test_butterfly_stacked_exact():
    """A rectangular W made of butterfly blocks is recovered by the stacked grid."""
    H = scipy.linalg.hadamard(16).astype(np.float64)
    W = np.vstack([H, 2 * H, -H])  # (48, 16): a 3 x 1 grid
    est = ButterflyFactorization().fit(W)
    assert est.grid_shape_ == (3, 1)
    assert est.nnz_ == 3 * 2 * 16 * 4
    assert est.reconstruction_err_ < 1e-6


@pytest.mark.parametrize("shape", [(100, 100), (64, 200), (300, 70), (1, 5), (7, 1), (3, 3)])
@pytest.mark.parametrize("method", ["hierarchical", "als"])
def test_butterfly_shapes_and_apply(shape, method):
    rng = np.random.default_rng(1)
    W = rng.standard_normal(shape)
    est = ButterflyFactorization(method=method).fit(W)
    m, n = shape
    N = est.block_size_
    expected_size = max(2, 1 << (min(m, n) - 1).bit_length())
    assert expected_size == N
    assert est.grid_shape_ == (-(-m // N), -(-n // N))
    assert est.nnz_ == est.grid_shape_[0] * est.grid_shape_[1] * 2 * N * int(np.log2(N))
    W_hat = est.reconstruct()
    assert W_hat.shape == shape and np.all(np.isfinite(W_hat))
    assert est.reconstruction_err_ < 1.0
    x = rng.standard_normal((n, 4))
    np.testing.assert_allclose(est.apply(x), W_hat @ x, atol=1e-10)
    np.testing.assert_allclose(est.apply(x[:, 0]), W_hat @ x[:, 0], atol=1e-10)


@given(seed=st.integers(0, 2**16), shape=st.sampled_from([(16, 16), (20, 12), (8, 40)]))
def test_butterfly_als_never_worse(seed, shape):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape)
    hier = ButterflyFactorization(method="hierarchical").fit(W)
    als = ButterflyFactorization(method="als").fit(W)
    assert als.reconstruction_err_ <= hier.reconstruction_err_ + 1e-12


def test_butterfly_als_sweep_is_exact_least_squares():
    """One ALS sweep equals factor-by-factor generic masked least squares (padding masked)."""
    rng = np.random.default_rng(1)
    N, L = 16, 4
    W = rng.standard_normal((1, N, N))
    row_mask, col_mask = np.ones((1, N)), np.ones((1, N))
    row_mask[0, 13:] = 0
    col_mask[0, 11:] = 0
    W = W * row_mask[:, :, None] * col_mask[:, None, :]
    tw = structured._butterfly_hierarchical(W)
    ref = tw[0].copy()
    Dr, Dc = np.diag(row_mask[0]), np.diag(col_mask[0])
    for t in range(L - 1, -1, -1):
        A = Dr.copy()
        for u in range(L - 1, t, -1):
            A = A @ _explicit_factor(ref[u], N, u)
        C = np.eye(N)
        for u in range(t - 1, -1, -1):
            C = C @ _explicit_factor(ref[u], N, u)
        C = C @ Dc
        i = np.arange(N)
        p, a, partner = structured._pair_layout(N, t)
        pairs = [*zip(i, i, strict=True), *zip(i, partner, strict=True)]
        columns = [np.outer(A[:, ii], C[jj, :]).ravel() for ii, jj in pairs]
        coef = np.linalg.lstsq(np.array(columns).T, W[0].ravel(), rcond=None)[0]
        ref[t][p, a, a] = coef[:N]
        ref[t][p, a, 1 - a] = coef[N:]
    out, sweeps = structured._butterfly_als(tw, W, row_mask, col_mask, 1, 0.0)
    assert sweeps == 1
    np.testing.assert_allclose(butterfly_matrix(out[0]), butterfly_matrix(ref), atol=1e-10)


def test_butterfly_block_size_rule():
    assert butterfly_block_size_for_density(0.2, 64, 64) == 64
    assert butterfly_block_size_for_density(0.5, 64, 64) == 16
    assert butterfly_block_size_for_density(1.0, 64, 64) == 4  # 2x2 and 4x4 butterflies are dense
    est = ButterflyFactorization(density=0.5).fit(np.ones((64, 64)))
    assert est.block_size_ == 16 and est.grid_shape_ == (4, 4) and est.density_ <= 0.5
    assert ButterflyFactorization(block_size=8).fit(np.ones((20, 20))).grid_shape_ == (3, 3)
    # nothing fits: the cheapest grid, whose density_ reports the excess
    assert butterfly_block_size_for_density(0.01, 64, 64) == 64
    assert butterfly_block_size_for_density(0.5, 12, 16) == 16  # 12 rows padded to 16: 128 > 96
    thin = ButterflyFactorization(density=0.5).fit(np.ones((12, 16)))
    assert thin.block_size_ == 16 and thin.density_ == pytest.approx(128 / 192)
    with pytest.raises(ValueError, match="block_size"):
        ButterflyFactorization(block_size=12).fit(np.ones((64, 64)))


# ====================================================================== both
ESTIMATORS = [
    pytest.param(lambda: MonarchFactorization(n_blocks=4), id="monarch"),
    pytest.param(lambda: MonarchFactorization(density=0.3), id="monarch-density"),
    pytest.param(lambda: ButterflyFactorization(), id="butterfly"),
    pytest.param(lambda: ButterflyFactorization(method="hierarchical", density=0.95), id="butterfly-grid"),
]


@pytest.mark.parametrize("make", ESTIMATORS)
def test_dtype_preserved_input_unchanged_deterministic(make):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((24, 20)).astype(np.float32)
    X = _calibration(rng, 20, 50).astype(np.float32)
    W0, X0 = W.copy(), X.copy()
    est = make().fit(W, X)
    assert np.array_equal(W, W0) and np.array_equal(X, X0)
    assert est.reconstruct().dtype == np.float32
    for name in ("blocks_left_", "blocks_right_", "twiddles_"):
        if hasattr(est, name):
            assert getattr(est, name).dtype == np.float32
    y = est.apply(np.ones(20, dtype=np.float32))
    assert y.dtype == np.float32 and y.shape == (24,)
    again = make().fit(W, X)
    assert np.array_equal(est.reconstruct(), again.reconstruct())
    assert est.calibrated_err_ == again.calibrated_err_
    W64 = W.astype(np.float64)
    assert make().fit(W64).reconstruct().dtype == np.float64


@pytest.mark.parametrize("make", ESTIMATORS)
def test_clone_and_params(make):
    est = make()
    params = est.get_params()
    twin = clone(est)
    assert twin.get_params() == params
    assert twin.set_params(**params).get_params() == params
    W = np.random.default_rng(0).standard_normal((16, 16))
    fitted = clone(est).fit(W)
    assert fitted.nnz_ > 0 and fitted.density_ > 0
    assert fitted.n_features_in_ == 16
    assert not hasattr(clone(fitted), "nnz_")


@pytest.mark.parametrize(
    "est, name",
    [
        (MonarchFactorization(n_blocks=0), "n_blocks"),
        (MonarchFactorization(n_blocks=2.5), "n_blocks"),
        (MonarchFactorization(density=0.0), "density"),
        (MonarchFactorization(calibrated="yes"), "calibrated"),
        (MonarchFactorization(max_iter=-1), "max_iter"),
        (ButterflyFactorization(method="sgd"), "method"),
        (ButterflyFactorization(block_size=1), "block_size"),
        (ButterflyFactorization(density=2.0), "density"),
    ],
)
def test_bad_parameters(est, name):
    with pytest.raises((ValueError, TypeError), match=name):
        est.fit(np.ones((8, 8)))


def test_not_fitted():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        MonarchFactorization().apply(np.ones(4))
    with pytest.raises(NotFittedError):
        ButterflyFactorization().reconstruct()


def test_registry():
    from sparsefact.methods import available_methods, get_method

    assert get_method("monarch").estimator is MonarchFactorization
    assert get_method("butterfly").estimator is ButterflyFactorization
    assert set(available_methods("structured")) >= {"monarch", "butterfly"}
    for name in ("monarch", "butterfly"):
        est = get_method(name).make(0.5)
        assert est.density == 0.5
        est.fit(np.random.default_rng(0).standard_normal((32, 32)))
        assert est.density_ <= 0.5


def test_torch_input():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    W = torch.as_tensor(rng.standard_normal((16, 12)).astype(np.float32))
    x = torch.ones(12)
    for est in (MonarchFactorization(n_blocks=3), ButterflyFactorization()):
        est.fit(W)
        W_hat = est.reconstruct()
        assert isinstance(W_hat, torch.Tensor) and W_hat.dtype == torch.float32
        y = est.apply(x)
        assert isinstance(y, torch.Tensor)
        torch.testing.assert_close(y, W_hat @ x, atol=1e-4, rtol=1e-4)


def test_doctests():
    result = doctest.testmod(structured, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
