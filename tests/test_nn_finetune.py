"""Fine-tuning compressed models towards the dense one (finetune), gradual compression, perplexity."""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402

from sparsefact.nn_adapters import compress_model, load_compressed, save_compressed  # noqa: E402
from sparsefact.nn_adapters.finetune import (  # noqa: E402
    FinetuneReport,
    balance_factors,
    compress_gradually,
    densify,
    distillation_loss,
    finetune,
)
from sparsefact.nn_adapters.modules import DoubleSparseLinear, _FactorModule  # noqa: E402
from sparsefact.nn_adapters.perplexity import perplexity  # noqa: E402

FAST_DSF = {"max_iter": 3, "finalize_iter": 2, "tol": 0}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def _patterns(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{f}": (m.factor(f) != 0).clone() for n, m in model.named_modules()
            if isinstance(m, _FactorModule) for f in m._factor_names}


def _compressed_mlp(density: float = 0.3):
    dense = _mlp()
    x = torch.randn(256, 12, generator=torch.Generator().manual_seed(1))
    data = list(x.split(32))
    model, _ = compress_model(copy.deepcopy(dense), data, "dsf", density, progress=False, **FAST_DSF)
    return dense, model, data


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(4):
        ids = torch.randint(1, 50, (4, 10), generator=g)
        mask = torch.ones(4, 10, dtype=torch.long)
        mask[1, 6:] = 0
        mask[3, 3:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return model, batches


# ---------------------------------------------------------------------- losses
@pytest.mark.parametrize("loss", ["mse", "cosine", "kl"])
def test_loss_is_zero_at_the_target_and_ignores_padded_tokens(loss):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 7, generator=g)
    s = t + 0.3 * torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(distillation_loss(t, t, loss, mask)) == pytest.approx(0.0, abs=1e-6)
    base = float(distillation_loss(s, t, loss, mask))
    assert base > 0
    s2 = s.clone()
    s2[0, 3:] += 100.0  # padded positions: no effect
    assert float(distillation_loss(s2, t, loss, mask)) == pytest.approx(base, rel=1e-6)
    s3 = s.clone()
    s3[0, 1, 0] += 1.0  # a real token: an effect
    assert float(distillation_loss(s3, t, loss, mask)) != pytest.approx(base, rel=1e-6)


def test_mse_is_normalised_and_cosine_is_one_minus_cos():
    t = torch.tensor([[3.0, 4.0]])
    assert float(distillation_loss(torch.zeros_like(t), t, "mse")) == pytest.approx(1.0)
    s = torch.tensor([[4.0, 3.0]])
    assert float(distillation_loss(s, t, "cosine")) == pytest.approx(1 - 24 / 25)


def test_balance_factors_keeps_the_product_and_patterns():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 6, generator=g) * (torch.rand(8, 6, generator=g) < 0.5) * 100.0
    B = torch.randn(6, 10, generator=g) * (torch.rand(6, 10, generator=g) < 0.5) / 100.0
    A[:, 5] = 0.0  # an empty inner index stays as it is
    module = DoubleSparseLinear.from_factors(A, B, torch.randn(8), dtype=torch.float64)
    model = nn.Sequential(module)
    before = module.to_dense().clone()
    assert balance_factors(model) == 1
    assert torch.allclose(module.to_dense(), before, rtol=1e-12, atol=1e-12)
    assert torch.equal(module.A != 0, A != 0) and torch.equal(module.B != 0, B != 0)
    a, b = module.A.norm(dim=0), module.B.norm(dim=1)
    both = (a > 0) & (b > 0)
    assert torch.allclose(a[both], b[both])


# ---------------------------------------------------------------------- finetune
def test_a_reduced_run_lowers_the_loss_keeps_patterns_and_restores_state(tmp_path):
    dense, model, data = _compressed_mlp()
    patterns = _patterns(model)
    model.train()  # the caller's mode comes back
    dense_flags = [p.requires_grad for p in dense.parameters()]
    report = finetune(model, dense, data[:6], steps=30, lr=3e-3, eval_data=data[6:], progress=False)
    assert isinstance(report, FinetuneReport) and report.steps == 30
    assert report.final_eval < report.initial_eval  # held-out distillation loss went down
    assert sum(report.train_loss[-5:]) < sum(report.train_loss[:5])
    assert model.training and dense.training  # modes restored (both were in train mode)
    assert [p.requires_grad for p in dense.parameters()] == dense_flags
    after = _patterns(model)
    for key, before in patterns.items():
        assert not (after[key] & ~before).any(), key  # no new nonzeros
    assert all(not m.trainable for m in model.modules() if isinstance(m, _FactorModule))
    assert not [n for n, _ in model.named_parameters() if "parametrizations" in n]
    assert report.trainable_nonzeros < report.trainable_parameters
    # the fine-tuned model saves and loads as before
    save_compressed(model, tmp_path / "m.safetensors")
    loaded = load_compressed(_mlp(), tmp_path / "m.safetensors")
    x = torch.cat(data)
    model.eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_runs_are_reproducible_for_a_seed():
    dense, model, data = _compressed_mlp()
    twin = copy.deepcopy(model)
    a = finetune(model, dense, data, steps=8, lr=1e-3, progress=False, seed=5)
    b = finetune(twin, dense, data, steps=8, lr=1e-3, progress=False, seed=5)
    assert a.train_loss == b.train_loss
    for (n, p), (_, q) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(p.to_dense() if p.is_sparse_csr else p, q.to_dense() if q.is_sparse_csr else q), n
    before = torch.get_rng_state()
    finetune(model, dense, data, steps=2, lr=1e-3, progress=False, seed=1)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched


def test_early_stopping_restores_the_best_evaluation():
    dense, model, data = _compressed_mlp()
    report = finetune(model, dense, data[:6], steps=40, lr=5.0, schedule="constant", warmup=0,
                      eval_data=data[6:], eval_every=1, patience=2, progress=False)
    assert report.stopped_early and report.steps < 40
    assert report.best_step == 0 and report.restored_best  # a diverging run: the start was best
    model.eval()
    with torch.no_grad():
        now = sum(float(distillation_loss(model(b), dense(b))) for b in data[6:]) / len(data[6:])
    assert now == pytest.approx(report.initial_eval, rel=1e-5)


def test_a_custom_evaluation_metric():
    dense, model, data = _compressed_mlp()
    x = torch.cat(data[6:])
    calls = []

    def metric(m):
        calls.append(m.training)
        return float((m(x) - dense(x)).pow(2).mean())

    report = finetune(model, dense, data[:6], steps=6, lr=3e-3, eval_metric=metric, eval_every=3,
                      progress=False)
    assert [s for s, _ in report.eval_history] == [0, 3, 6] and calls == [False] * 3
    assert report.final_eval < report.initial_eval


def test_train_selects_the_dense_parameters_too():
    dense, model, data = _compressed_mlp()
    head = model[4].weight.detach().clone()  # the output layer was left dense
    finetune(model, dense, data, steps=3, lr=1e-2, progress=False)
    assert torch.equal(model[4].weight, head)
    finetune(model, dense, data, steps=3, lr=1e-2, progress=False, train="all")
    assert not torch.equal(model[4].weight, head)
    assert all(p.requires_grad for p in model.parameters())  # flags as they were


def test_targets_and_task_loss_without_a_teacher():
    dense, model, data = _compressed_mlp()
    with torch.no_grad():
        targets = [dense(b) for b in data]
    r1 = finetune(copy.deepcopy(model), targets, data, steps=10, lr=3e-3, progress=False)
    assert r1.train_loss[-1] < r1.train_loss[0]
    labels = [t.argmax(1) for t in targets]
    index = {id(b): i for i, b in enumerate(data)}

    def task(outputs, batch):
        return nn.functional.cross_entropy(outputs, labels[index[id(batch)]])

    r2 = finetune(model, None, data, steps=10, lr=3e-3, task_loss=task, progress=False)
    assert r2.train_loss[-1] < r2.train_loss[0]
    with pytest.raises(ValueError, match="nothing to learn"):
        finetune(model, None, data, steps=1)


def test_argument_errors():
    dense, model, data = _compressed_mlp()
    with pytest.raises(ValueError, match="mode"):
        finetune(model, dense, data, mode="blockwise")
    with pytest.raises(ValueError, match="loss"):
        finetune(model, dense, data, loss="l1")
    with pytest.raises(ValueError, match="no repeated blocks"):
        finetune(model, dense, data, mode="layerwise", steps=1, progress=False)
    with pytest.raises(ValueError, match="no trainable"):
        finetune(_mlp(), dense, data, steps=1, progress=False)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_layerwise_mode_on_a_transformer_with_padding(loss):
    dense, batches = _tiny_bert()
    model, _ = compress_model(copy.deepcopy(dense), batches, "dsf", 0.3, progress=False, **FAST_DSF)
    model.config.use_cache = False
    report = finetune(model, dense, batches[:3], steps=20, lr=3e-3, mode="layerwise", loss=loss,
                      eval_data=batches[3:], progress=False)
    assert report.final_eval < report.initial_eval  # the end-to-end held-out loss improves
    assert sum(report.train_loss[-4:]) < sum(report.train_loss[:4])
    e2e = finetune(copy.deepcopy(model), dense, batches[:3], steps=5, lr=3e-3, loss=loss,
                   eval_data=batches[3:], progress=False)
    assert e2e.steps == 5


# ---------------------------------------------------------------------- gradual
def test_densify_keeps_the_function_and_the_layer_types():
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs
    model = nn.Sequential(conv1d, nn.ReLU(), nn.Linear(6, 3))
    reference = copy.deepcopy(model)
    x = torch.randn(20, 4)
    compressed, _ = compress_model(model, x, "dsf", 0.7, layers=["0", "2"], progress=False, **FAST_DSF)
    expected = compressed(x)
    names = densify(compressed, reference)
    assert names == ["0", "2"]
    assert type(compressed[0]).__name__ == "Conv1D" and isinstance(compressed[2], nn.Linear)
    assert torch.allclose(compressed(x), expected, atol=1e-5)


def test_compress_gradually_ends_at_the_last_density_and_saves(tmp_path):
    dense = _mlp()
    x = torch.randn(256, 12, generator=torch.Generator().manual_seed(1))
    data = list(x.split(64))
    model, report = compress_gradually(copy.deepcopy(dense), data[:3], schedule=[0.7, 0.4],
                                       finetune_steps=[5, 5], eval_data=data[3:],
                                       finetune_kwargs={"lr": 3e-3}, progress=False, **FAST_DSF)
    assert [s["density"] for s in report.stages] == [0.7, 0.4]
    assert report.total_finetune_steps == 10
    last = report.compression[-1].summary()
    assert last["density"] <= 0.4 + 1e-9 and last["layers"] == 2
    assert isinstance(model[0], DoubleSparseLinear) and isinstance(model[2], DoubleSparseLinear)
    save_compressed(model, tmp_path / "g.safetensors")
    loaded = load_compressed(_mlp(), tmp_path / "g.safetensors")
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    with pytest.raises(ValueError, match="dense model"):
        compress_gradually(model, data, schedule=[0.5], finetune_steps=1, progress=False)


def test_compress_gradually_warm_starts_dsf_from_the_fine_tuned_factors(monkeypatch):
    import sparsefact.nn_adapters.finetune as finetune_module

    seen = []
    real = finetune_module.compress_model

    def spy(model, data, method, density, **kwargs):
        seen.append((density, kwargs.get("layer_params")))
        if kwargs.get("layer_params"):
            for name, params in kwargs["layer_params"].items():
                A, B = params["init_factors"]
                layer = model.get_submodule(name)
                assert isinstance(layer, nn.Linear)  # densified: its weight is the fine-tuned product
                assert torch.allclose(torch.from_numpy(A @ B).float(), layer.weight.detach(), atol=1e-5)
        return real(model, data, method, density, **kwargs)

    monkeypatch.setattr(finetune_module, "compress_model", spy)
    x = torch.randn(192, 12, generator=torch.Generator().manual_seed(2))
    data = list(x.split(64))
    compress_gradually(_mlp(), data, schedule=[0.7, 0.4], finetune_steps=2, progress=False, **FAST_DSF)
    assert seen[0] == (0.7, None)
    assert seen[1][0] == 0.4 and set(seen[1][1]) == {"0", "2"}
    seen.clear()
    compress_gradually(_mlp(), data, schedule=[0.7, 0.4], finetune_steps=2, progress=False, warm_start=False,
                       **FAST_DSF)
    assert seen[1][1] is None
    seen.clear()
    compress_gradually(_mlp(), data, schedule=[0.7, 0.4], finetune_steps=2, progress=False,
                       method="sparsegpt")
    assert seen[1][1] == {}  # nothing to start from for a single-sparse method


def test_layer_params_reach_only_their_layer():
    x = torch.randn(128, 12, generator=torch.Generator().manual_seed(3))
    # dense inputs (sequential=False), so that layer "2" sees the same calibration in both runs
    _, base = compress_model(_mlp(), x, "dsf", 0.5, progress=False, sequential=False, **FAST_DSF)
    _, tuned = compress_model(_mlp(), x, "dsf", 0.5, progress=False, sequential=False,
                              layer_params={"0": {"max_iter": 1, "finalize": False}}, **FAST_DSF)
    assert tuned[0]["calibrated_err"] != base[0]["calibrated_err"]
    assert tuned[1]["calibrated_err"] == base[1]["calibrated_err"]
    with pytest.raises(ValueError, match="not compressed"):
        compress_model(_mlp(), x, "dsf", 0.5, progress=False, layer_params={"9": {}})
    with pytest.raises(ValueError, match="checkpoint_dir"):
        compress_model(_mlp(), x, "dsf", 0.5, progress=False, layer_params={"0": {}}, checkpoint_dir="unused")
    with pytest.raises(TypeError, match="layer_params must map"):
        compress_model(_mlp(), x, "dsf", 0.5, progress=False, layer_params={"0": 3})


# ---------------------------------------------------------------------- perplexity
class _ContextLM(nn.Module):
    """Logits at position j depend on every token <= j (a running mean of embeddings): a causal toy LM."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(2 * dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(input_ids)
        running = e.cumsum(1) / torch.arange(1, e.shape[1] + 1).reshape(1, -1, 1)
        return self.out(torch.cat([e, running], -1))


def _hand_nll(model, ids, window, stride):
    """Sum of -log p over the scored tokens, each predicted from its own window's context, by hand."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        for t in range(max(prev_end, begin + 1), end):  # new tokens of this window (never its first)
            context = ids[begin:t]
            logits = model(context[None])[0, -1]
            total += -float(torch.log_softmax(logits.double(), -1)[ids[t]])
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return total, count


@pytest.mark.parametrize(("window", "stride"), [(8, 3), (8, 8), (5, 4), (64, 16)])
def test_perplexity_matches_a_hand_computation(window, stride):
    model = _ContextLM().eval()
    ids = torch.randint(0, 11, (23,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        total, count = _hand_nll(model, ids, window, stride)
        result = perplexity(model, ids, window=window, stride=stride, batch_size=2)
    # every token scored once, except the first of the text (and, for disjoint segments, of each segment)
    assert result.n_tokens == count == len(ids) - (1 if stride < window else result.n_windows)
    assert result.nll == pytest.approx(total / count, rel=1e-6)
    assert float(result) == pytest.approx(math.exp(total / count), rel=1e-6)


def test_perplexity_with_a_tokenizer_and_errors():
    class Tok:
        def encode(self, text):
            return [ord(c) % 11 for c in text]

    model = _ContextLM().eval()
    text = "to be or not to be"
    a = perplexity(model, Tok(), text, window=6, stride=2)
    b = perplexity(model, torch.tensor(Tok().encode(text)), window=6, stride=2)
    assert float(a) == pytest.approx(float(b))
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, torch.arange(5), window=4, stride=5)
    with pytest.raises(ValueError, match="two tokens"):
        perplexity(model, torch.arange(1), window=4, stride=2)
