"""Tests of sparsefact/nn_adapters/prune_init.py: pruning-at-initialisation saliencies and masks.

The five scores are checked against an autograd-free NumPy reference of a tiny
Linear(3,4)-ReLU-Linear(4,2) network: explicit forward and backward passes (SNIP), an
explicit Hessian-vector product (Pearlmutter's R-operator, itself checked by central
finite differences of the NumPy gradient) for GraSP, and SynFlow's |θ ⊙ ∂R/∂θ| on |θ|
with an all-ones input.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from sparsefact.masks import kept_budget  # noqa: E402
from sparsefact.nn_adapters import prune_init as pai  # noqa: E402
from sparsefact.nn_adapters.prune_init import (  # noqa: E402
    PAI_METHODS,
    PruneReport,
    PruningMask,
    compute_scores,
    get_masks,
    prune_at_init,
    remove_masks,
    score_grasp,
    score_magnitude,
    score_random,
    score_snip,
    score_synflow,
)

# ---------------------------------------------------------------------- tiny network
W1 = np.array([[0.5, -0.3, 0.8], [-0.6, 0.2, 0.4], [0.3, 0.7, -0.5], [-0.2, -0.4, 0.6]])
B1 = np.array([0.1, -0.2, 0.05, 0.3])
W2 = np.array([[0.7, -0.5, 0.2, 0.4], [-0.3, 0.6, -0.8, 0.1]])
B2 = np.array([0.05, -0.1])
_rng = np.random.default_rng(1)
BATCHES = [
    (_rng.normal(size=(5, 3)), np.array([0, 1, 1, 0, 1])),
    (_rng.normal(size=(4, 3)), np.array([1, 0, 0, 1])),
]


def tiny_mlp() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(W1))
        model[0].bias.copy_(torch.from_numpy(B1))
        model[2].weight.copy_(torch.from_numpy(W2))
        model[2].bias.copy_(torch.from_numpy(B2))
    return model


def torch_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in BATCHES]


def np_forward_backward(w1, w2, x, y, temperature=1.0):
    """Cross-entropy (mean) of the tiny MLP and its gradients w.r.t. W1, W2, by hand."""
    n = x.shape[0]
    z1 = x @ w1.T + B1
    h = np.maximum(z1, 0.0)
    u = (h @ w2.T + B2) / temperature
    p = np.exp(u - u.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(2)[y]
    loss = -np.mean(np.log(p[np.arange(n), y]))
    du = (p - onehot) / n  # dL/du
    dz2 = du / temperature
    gw2 = dz2.T @ h
    dh = dz2 @ w2
    active = (z1 > 0).astype(float)
    dz1 = dh * active
    gw1 = dz1.T @ x
    cache = {"z1": z1, "h": h, "p": p, "active": active, "dz2": dz2, "n": n}
    return loss, gw1, gw2, cache


def np_hvp(w1, w2, x, y, v1, v2, temperature=1.0):
    """Hessian (w.r.t. W1, W2) times (v1, v2), by the R-operator (exact second derivatives)."""
    _, _, _, c = np_forward_backward(w1, w2, x, y, temperature)
    h, p, active, dz2, n = c["h"], c["p"], c["active"], c["dz2"], c["n"]
    r_z1 = x @ v1.T
    r_h = r_z1 * active  # ReLU'' = 0 away from the kink
    r_u = (r_h @ w2.T + h @ v2.T) / temperature
    r_p = p * (r_u - np.sum(p * r_u, axis=1, keepdims=True))
    r_dz2 = r_p / (n * temperature)
    r_gw2 = r_dz2.T @ h + dz2.T @ r_h
    r_dh = r_dz2 @ w2 + dz2 @ v2
    r_gw1 = (r_dh * active).T @ x
    return r_gw1, r_gw2


def np_snip(w1, w2):
    g1 = sum(np_forward_backward(w1, w2, x, y)[1] for x, y in BATCHES)
    g2 = sum(np_forward_backward(w1, w2, x, y)[2] for x, y in BATCHES)
    s1, s2 = np.abs(w1 * g1), np.abs(w2 * g2)
    norm = s1.sum() + s2.sum()
    return s1 / norm, s2 / norm


def np_grasp(w1, w2, temperature, m1=None, m2=None):
    m1 = np.ones_like(w1) if m1 is None else m1
    m2 = np.ones_like(w2) if m2 is None else m2
    # the gradient w.r.t. the underlying weight under a mask is mask ⊙ (gradient w.r.t. the masked weight)
    g1 = m1 * sum(np_forward_backward(w1, w2, x, y, temperature)[1] for x, y in BATCHES)
    g2 = m2 * sum(np_forward_backward(w1, w2, x, y, temperature)[2] for x, y in BATCHES)
    hg1 = sum(np_hvp(w1, w2, x, y, g1, g2, temperature)[0] for x, y in BATCHES)
    hg2 = sum(np_hvp(w1, w2, x, y, g1, g2, temperature)[1] for x, y in BATCHES)
    s1, s2 = w1 * hg1, w2 * hg2
    norm = abs(s1.sum() + s2.sum()) + 1e-10
    return s1 / norm, s2 / norm


def np_synflow(w1, w2):
    a1, c1, a2 = np.abs(w1), np.abs(B1), np.abs(w2)  # |b2| adds a constant to R
    x = np.ones(3)
    z1 = a1 @ x + c1
    h = np.maximum(z1, 0.0)
    d_a2 = np.outer(np.ones(2), h)  # R = Σ_j (A2 h + c2)_j
    d_h = a2.sum(axis=0)
    d_a1 = np.outer(d_h * (z1 > 0), x)
    return np.abs(a1 * d_a1), np.abs(a2 * d_a2)


def test_numpy_reference_is_consistent():
    """The NumPy gradients and R-operator agree with central finite differences."""
    x, y = BATCHES[0]
    assert np.abs(x @ W1.T + B1).min() > 1e-3  # away from the ReLU kinks
    T = 3.0
    _, g1, g2, _ = np_forward_backward(W1, W2, x, y, T)
    eps = 1e-6
    e = np.zeros_like(W1)
    e[1, 2] = 1.0
    loss_plus = np_forward_backward(W1 + eps * e, W2, x, y, T)[0]
    loss_minus = np_forward_backward(W1 - eps * e, W2, x, y, T)[0]
    fd = (loss_plus - loss_minus) / (2 * eps)
    assert fd == pytest.approx(g1[1, 2], rel=1e-6)
    v1, v2 = np.random.default_rng(2).normal(size=W1.shape), np.random.default_rng(3).normal(size=W2.shape)
    eps = 1e-5
    plus = np_forward_backward(W1 + eps * v1, W2 + eps * v2, x, y, T)
    minus = np_forward_backward(W1 - eps * v1, W2 - eps * v2, x, y, T)
    r1, r2 = np_hvp(W1, W2, x, y, v1, v2, T)
    np.testing.assert_allclose((plus[1] - minus[1]) / (2 * eps), r1, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose((plus[2] - minus[2]) / (2 * eps), r2, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------- scores by hand
def test_magnitude_scores_by_hand():
    s = score_magnitude(tiny_mlp())
    assert list(s) == ["0", "2"]
    np.testing.assert_array_equal(s["0"].numpy(), np.abs(W1))
    np.testing.assert_array_equal(s["2"].numpy(), np.abs(W2))
    assert s["0"].dtype == torch.float64


def test_random_scores_seeded():
    model = tiny_mlp()
    a = score_random(model, seed=7)
    b = compute_scores(model, "random", seed=7)
    g = torch.Generator().manual_seed(7)
    expected = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((4, 3), (2, 4))]
    for name, e in zip(["0", "2"], expected, strict=True):
        assert torch.equal(a[name], e) and torch.equal(b[name], e)
    c = score_random(model, seed=8)
    assert not torch.equal(a["0"], c["0"])


def test_snip_scores_by_hand():
    model = tiny_mlp()
    s = score_snip(model, torch_batches())
    e1, e2 = np_snip(W1, W2)
    np.testing.assert_allclose(s["0"].numpy(), e1, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(s["2"].numpy(), e2, rtol=1e-10, atol=1e-15)
    assert float(s["0"].sum() + s["2"].sum()) == pytest.approx(1.0)
    # with a mask applied: the scores are those of the masked network, zero at pruned entries
    prune_at_init(model, None, "magnitude", 0.5)
    m = get_masks(model)
    m1, m2 = m["0"].numpy().astype(float), m["2"].numpy().astype(float)
    s = compute_scores(model, "snip", torch_batches())
    e1, e2 = np_snip(W1 * m1, W2 * m2)
    np.testing.assert_allclose(s["0"].numpy(), e1, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(s["2"].numpy(), e2, rtol=1e-10, atol=1e-15)
    assert (s["0"].numpy()[m1 == 0] == 0).all()


@pytest.mark.parametrize("temperature", [200.0, 1.0])
def test_grasp_scores_by_hand(temperature):
    model = tiny_mlp()
    s = score_grasp(model, torch_batches(), temperature=temperature)
    e1, e2 = np_grasp(W1, W2, temperature)
    np.testing.assert_allclose(s["0"].numpy(), e1, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(s["2"].numpy(), e2, rtol=1e-8, atol=1e-14)
    assert (s["0"] < 0).any() and (s["0"] > 0).any()  # signed, not an absolute value
    if temperature == 200.0:
        assert torch.equal(compute_scores(model, "grasp", torch_batches())["0"], s["0"])  # default T = 200


def test_grasp_scores_by_hand_with_mask():
    model = tiny_mlp()
    prune_at_init(model, None, "magnitude", 0.6)
    m = get_masks(model)
    m1, m2 = m["0"].numpy().astype(float), m["2"].numpy().astype(float)
    s = score_grasp(model, torch_batches(), temperature=2.0)
    e1, e2 = np_grasp(W1 * m1, W2 * m2, 2.0, m1, m2)
    np.testing.assert_allclose(s["0"].numpy(), e1, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(s["2"].numpy(), e2, rtol=1e-8, atol=1e-14)


def test_synflow_scores_by_hand():
    s = score_synflow(tiny_mlp(), (3,))
    e1, e2 = np_synflow(W1, W2)
    np.testing.assert_allclose(s["0"].numpy(), e1, rtol=1e-13)
    np.testing.assert_allclose(s["2"].numpy(), e2, rtol=1e-13)


def test_synflow_runs_in_float64_on_a_float32_model():
    model = tiny_mlp().float()
    s = score_synflow(model, (3,))
    e1, _ = np_synflow(W1.astype(np.float32).astype(float), W2.astype(np.float32).astype(float))
    assert s["0"].dtype == torch.float64
    np.testing.assert_allclose(s["0"].numpy(), e1, rtol=1e-12)
    assert model[0].weight.dtype == torch.float32


def conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 2 * 2, 5),
    )


def conv_batches(n: int = 2, batch: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, 6, 6, generator=g), torch.randint(0, 5, (batch,), generator=g))
        for _ in range(n)
    ]


def test_synflow_is_data_free():
    model = conv_net()
    ref = score_synflow(model, (3, 6, 6))
    for loader in (conv_batches(seed=1), conv_batches(n=1, batch=2, seed=5), [torch.rand(3, 3, 6, 6) * 100]):
        s = compute_scores(model, "synflow", loader)
        for name in ref:
            assert torch.equal(s[name], ref[name])


def test_scores_are_deterministic():
    model = conv_net()
    data = conv_batches()
    for method in ("snip", "grasp", "synflow", "magnitude"):
        a = compute_scores(model, method, data)
        b = compute_scores(model, method, data)
        assert all(torch.equal(a[n], b[n]) for n in a), method
    masks = []
    for _ in range(2):
        m = conv_net()
        prune_at_init(m, None, "random", 0.3, seed=3)
        masks.append(get_masks(m))
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


# ---------------------------------------------------------------------- model state
def _snapshot(model: nn.Module):
    state = model.state_dict(keep_vars=True)
    tensors = {k: (v, v.data_ptr(), v.dtype, v.detach().clone()) for k, v in state.items()}
    flags = {n: m.training for n, m in model.named_modules()}
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    return tensors, flags, req


def _hook_count(model: nn.Module) -> int:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, kind)) for m in model.modules() for kind in kinds)


def _assert_unchanged(model: nn.Module, snap) -> None:
    tensors, flags, req = snap
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(tensors)
    for k, (obj, ptr, dtype, value) in tensors.items():
        assert now[k] is obj, k
        assert now[k].data_ptr() == ptr and now[k].dtype == dtype, k
        assert torch.equal(now[k].detach(), value), k
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    assert all(p.grad is None for p in model.parameters())
    assert _hook_count(model) == 0


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("method", PAI_METHODS)
def test_scoring_leaves_the_model_unchanged(method, masked):
    model = conv_net()
    if masked:
        prune_at_init(model, None, "magnitude", 0.7)
    model.train()
    model[1].eval()  # mixed modes must come back per module
    model[1].weight.requires_grad_(False)
    frozen = model[3].parametrizations.weight.original if masked else model[3].weight
    frozen.requires_grad_(False)  # a frozen prunable weight
    snap = _snapshot(model)
    assert (model[0].weight < 0).any()
    compute_scores(model, method, conv_batches(), seed=0)
    _assert_unchanged(model, snap)
    if method in ("snip", "grasp"):  # train mode: BatchNorm statistics must not move
        compute_scores(model, method, conv_batches(), train_mode=True)
        _assert_unchanged(model, snap)
        compute_scores(model, method, conv_batches(), dtype=torch.float64)
        _assert_unchanged(model, snap)


def test_scoring_works_under_no_grad():
    model = tiny_mlp()
    with torch.no_grad():
        s = score_snip(model, torch_batches())
    np.testing.assert_allclose(s["0"].numpy(), np_snip(W1, W2)[0], rtol=1e-10)


# ---------------------------------------------------------------------- exact densities
def multi_layer(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 7), nn.ReLU(), nn.Linear(7, 5)
    )


def _is_floor(kept: int, d: float, n: int) -> bool:
    """kept = ⌊d·n⌋, or the integer that d·n misses only by float rounding."""
    x = d * n
    return kept == math.floor(x) or (abs(x - round(x)) <= 1e-9 * max(1.0, x) and kept == round(x))


@given(
    d=st.floats(min_value=1e-4, max_value=1.0, allow_nan=False),
    method=st.sampled_from(["random", "magnitude"]),
    seed=st.integers(0, 3),
)
def test_global_density_is_exact(d, method, seed):
    model = multi_layer(seed)
    total = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear | nn.Conv2d))
    rep = prune_at_init(model, None, method, d, seed=seed, input_shape=(2, 4, 4))
    kept = sum(int(m.sum()) for m in get_masks(model).values())
    assert kept == rep.totals()["kept"]
    assert _is_floor(kept, d, total)
    assert -1e-6 < d * total - kept < 1 + 1e-9


@given(d=st.floats(min_value=1e-4, max_value=1.0, allow_nan=False), seed=st.integers(0, 3))
def test_layer_density_is_exact(d, seed):
    model = multi_layer(seed)
    rep = prune_at_init(model, None, "magnitude", d, scope="layer")
    for row, (_name, mask) in zip(rep.layers, get_masks(model).items(), strict=True):
        assert int(mask.sum()) == row["kept"]
        assert _is_floor(row["kept"], d, mask.numel())


@given(n=st.integers(1, 60), data=st.data())
def test_density_k_over_n_keeps_k(n, data):
    k = data.draw(st.integers(1, n))
    model = nn.Sequential(nn.Linear(n, 1, bias=False))
    prune_at_init(model, None, "magnitude", k / n)
    assert int(get_masks(model)["0"].sum()) == k


def test_decimal_density_is_not_lost_to_binary_rounding():
    model = nn.Sequential(nn.Linear(10, 10))
    assert 0.29 * 100 < 29
    prune_at_init(model, None, "random", 0.29, seed=0)
    assert int(get_masks(model)["0"].sum()) == 29


def test_ties_are_broken_deterministically():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    with torch.no_grad():
        for m in model:
            m.weight.fill_(1.0)
    prune_at_init(model, None, "magnitude", 0.25)  # 3 of 12, all scores equal
    masks = get_masks(model)
    assert masks["0"].reshape(-1).tolist() == [True, True, True, False, False, False]
    assert not masks["1"].any()


def test_keeps_the_highest_scores():
    model = multi_layer(1)
    scores = score_magnitude(model)
    prune_at_init(model, None, "magnitude", 0.2)
    masks = get_masks(model)
    kept = torch.cat([scores[n][masks[n]] for n in scores])
    pruned = torch.cat([scores[n][~masks[n]] for n in scores])
    assert kept.min() >= pruned.max()


# ---------------------------------------------------------------------- masks in training
@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_masks_survive_optimiser_steps(opt):
    model = conv_net()
    params_before = list(model.parameters())
    rep = prune_at_init(model, conv_batches(), "snip", 0.3)
    assert isinstance(model[0], nn.Conv2d) and parametrize.is_parametrized(model[0], "weight")
    assert isinstance(model[0].parametrizations.weight[0], PruningMask)
    if opt == "sgd":
        optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    elif opt == "adam":
        optim = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=1e-3)
    else:
        optim = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    assert model[0].parametrizations.weight.original is params_before[0]  # same Parameter object
    masks = get_masks(model)
    model.train()
    for x, y in conv_batches(n=5, seed=9):
        optim.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optim.step()
    for name, mask in masks.items():
        module = dict(model.named_modules())[name]
        assert (module.weight[~mask] == 0).all()
        assert (module.parametrizations.weight.original[~mask] == 0).all()
        assert (module.weight[mask] != 0).any()
    assert sum(int(m.sum()) for m in get_masks(model).values()) == rep.totals()["kept"]


def test_remove_masks_leaves_plain_modules_with_zeros():
    model = conv_net()
    prune_at_init(model, None, "magnitude", 0.4)
    masks = get_masks(model)
    weight_obj = model[0].parametrizations.weight.original
    assert sorted(remove_masks(model)) == sorted(masks)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Conv2d and type(model[7]) is nn.Linear
    assert model[0].weight is weight_obj
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert list(model.state_dict()) == list(conv_net().state_dict())
    for name, mask in masks.items():
        w = dict(model.named_modules())[name].weight
        assert (w[~mask] == 0).all() and (w[mask] != 0).all()
    assert get_masks(model) == {} and remove_masks(model) == []
    model(torch.randn(2, 3, 6, 6))


# ---------------------------------------------------------------------- iterative schedule
@pytest.mark.parametrize("schedule", ["exponential", "linear"])
@pytest.mark.parametrize("method", ["synflow", "snip", "grasp", "magnitude"])
def test_iterative_schedule(method, schedule, monkeypatch):
    model = conv_net()
    total = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear | nn.Conv2d))
    seen = []
    original = pai.compute_scores

    def recording(model_, method_, *args, **kwargs):
        scores = original(model_, method_, *args, **kwargs)
        seen.append((get_masks(model_), scores))
        return scores

    monkeypatch.setattr(pai, "compute_scores", recording)
    d, K = 0.05, 4
    rep = prune_at_init(model, conv_batches(), method, d, rounds=K, schedule=schedule)
    assert len(seen) == K and rep.rounds == K and [h["round"] for h in rep.history] == [1, 2, 3, 4]
    for k, h in enumerate(rep.history, start=1):
        rho = d ** (k / K) if schedule == "exponential" else 1 - (1 - d) * k / K
        assert h["density"] == pytest.approx(rho)
        assert h["kept"] == kept_budget(h["density"], total)
    assert rep.history[-1]["density"] == d
    assert rep.totals()["kept"] == math.floor(d * total)
    # each round re-scores with the current masks: masks shrink, pruned entries score 0
    for (prev, _), (cur, scores) in zip(seen, seen[1:], strict=False):
        for n in cur:
            assert not (cur[n] & ~prev[n]).any()
            assert (scores[n][~cur[n]] == 0).all()


def test_synflow_defaults_to_100_rounds():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    rep = prune_at_init(model, None, "synflow", 0.1, input_shape=(4,))
    assert rep.rounds == 100 and len(rep.history) == 100
    assert rep.totals()["kept"] == math.floor(0.1 * 42)
    assert prune_at_init(nn.Sequential(nn.Linear(4, 6)), None, "magnitude", 0.5).rounds == 1


def test_repruning_only_shrinks_masks():
    model = multi_layer(0)
    prune_at_init(model, None, "magnitude", 0.5)
    first = get_masks(model)
    prune_at_init(model, None, "random", 0.2, seed=0)
    second = get_masks(model)
    assert all(not (second[n] & ~first[n]).any() for n in first)
    with pytest.raises(ValueError, match="only shrink"):
        prune_at_init(model, None, "magnitude", 0.5)
    assert all(torch.equal(get_masks(model)[n], second[n]) for n in second)


# ---------------------------------------------------------------------- layer collapse, report
def test_layer_collapse_is_flagged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.mul_(1e-6)
    rep = prune_at_init(model, None, "magnitude", 0.4, input_shape=(4,))  # 44 of 112; 48 outside layer 2
    assert rep.layer_collapse and rep.collapsed_layers == ["2"]
    row = rep.layers[1]
    assert row["collapsed"] and row["kept"] == 0 and row["kept_fraction"] == 0.0 and row["flops_kept"] == 0
    assert "Layer collapse" in rep.to_markdown() and rep.to_dict()["totals"]["layer_collapse"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.mul_(1e-6)
    assert not prune_at_init(model, None, "magnitude", 0.4, scope="layer").layer_collapse


def test_report_flops_and_writers(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    rep = prune_at_init(model, [(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,)))], "grasp", 0.25)
    assert isinstance(rep, PruneReport)
    conv, lin = rep.layers
    assert conv["name"] == "0" and conv["type"] == "Conv2d"
    assert conv["shape"] == [4, 3, 3, 3] and conv["numel"] == 108
    assert conv["flops_dense"] == 36 * 108 and conv["flops_kept"] == 36 * conv["kept"]
    assert lin["type"] == "Linear" and lin["flops_dense"] == 5 * 144 and lin["flops_kept"] == lin["kept"]
    t = rep.totals()
    assert t["kept"] == math.floor(0.25 * (108 + 720)) and t["flops_dense"] == 36 * 108 + 720
    assert t["flops_fraction"] == pytest.approx(t["flops_kept"] / t["flops_dense"])
    d = json.loads(rep.to_json(tmp_path / "r.json"))
    assert d == json.loads(json.dumps(rep.to_dict()))
    assert d["method"] == "grasp" and d["layers"][0]["name"] == "0"
    md = rep.to_markdown(tmp_path / "r.md")
    assert "| 0 | Conv2d | 4×3×3×3 |" in md and (tmp_path / "r.md").read_text() == md
    # the same FLOPs from input_shape; none without any example input
    model2 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    rep2 = prune_at_init(model2, None, "magnitude", 0.25, input_shape=(3, 6, 6))
    assert [r["flops_dense"] for r in rep2.layers] == [r["flops_dense"] for r in rep.layers]
    model3 = nn.Sequential(nn.Linear(3, 2))
    rep3 = prune_at_init(model3, None, "magnitude", 0.5)
    assert rep3.layers[0]["flops_dense"] is None and rep3.totals()["flops_dense"] is None
    assert "—" in rep3.to_markdown()


def test_flops_count_tokens_of_sequences():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    rep = prune_at_init(model, [torch.randn(2, 5, 6)], "magnitude", 0.5)  # (batch, tokens, features)
    assert [r["flops_dense"] for r in rep.layers] == [5 * 24, 5 * 12]


def test_layer_selection():
    model = conv_net()
    rep = prune_at_init(model, None, "magnitude", 0.5, layers=["0", "7"])
    assert [r["name"] for r in rep.layers] == ["0", "7"] and set(get_masks(model)) == {"0", "7"}
    rep = prune_at_init(conv_net(), None, "magnitude", 0.5, layers=nn.Linear)
    assert [r["name"] for r in rep.layers] == ["7"]
    with pytest.raises(KeyError):
        prune_at_init(conv_net(), None, "magnitude", 0.5, layers=["1"])


# ---------------------------------------------------------------------- validation
def test_validation_errors():
    model = tiny_mlp()
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), "0.5", True, None):
        with pytest.raises(ValueError, match="density"):
            prune_at_init(model, None, "magnitude", bad)
    with pytest.raises(ValueError, match="random, magnitude, snip, grasp, synflow"):
        prune_at_init(model, None, "obd", 0.5)
    with pytest.raises(ValueError, match="random, magnitude, snip, grasp, synflow"):
        compute_scores(model, "nope")
    with pytest.raises(ValueError, match="no prunable layers"):
        prune_at_init(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), None, "magnitude", 0.5)
    with pytest.raises(ValueError, match="no prunable layers"):
        compute_scores(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "magnitude")
    with pytest.raises(ValueError, match="scope"):
        prune_at_init(model, None, "magnitude", 0.5, scope="row")
    with pytest.raises(ValueError, match="schedule"):
        prune_at_init(model, None, "magnitude", 0.5, schedule="cosine")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rounds"):
            prune_at_init(model, None, "magnitude", 0.5, rounds=bad)
    with pytest.raises(ValueError, match="needs data"):
        prune_at_init(model, None, "snip", 0.5)
    with pytest.raises(ValueError, match="targets"):
        score_grasp(model, [torch.randn(4, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="input_shape"):
        prune_at_init(model, None, "synflow", 0.5)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert prune_at_init(model, None, "magnitude", 1.0).totals()["kept"] == 20


def test_failure_leaves_the_model_unpruned():
    model = tiny_mlp()
    snap = _snapshot(model)

    def bad_loss(out, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        prune_at_init(model, torch_batches(), "snip", 0.5, loss_fn=bad_loss)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    _assert_unchanged(model, snap)


def test_one_shot_iterators_are_accepted():
    model = tiny_mlp()
    rep = prune_at_init(model, iter(torch_batches()), "grasp", 0.5)  # GraSP reads the data twice
    ref = tiny_mlp()
    prune_at_init(ref, torch_batches(), "grasp", 0.5)
    assert all(torch.equal(get_masks(model)[n], get_masks(ref)[n]) for n in ("0", "2"))
    assert rep.totals()["kept"] == 10
