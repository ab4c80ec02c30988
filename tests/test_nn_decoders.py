"""The LLM path: decoder architectures of transformers, random tiny weights, compressed by DSF.

For every architecture (LLaMA, Mistral with grouped-query attention, GPT-2 with its ``Conv1D``,
OPT, Qwen2, and Qwen3, Phi-3 with fused projections, Gemma, GPT-NeoX with partial rotary; hidden
64, 2 layers): block discovery finds the decoder layers; calibration drops padded tokens (right
padding against the unpadded sequences); compress -> save_compressed -> load_compressed into a
freshly initialised model gives identical logits and the same greedy generation; the compressed
model stays causal (a prefix's logits do not depend on later tokens) and everything outside the
compressed layers -- rotary embeddings, norms, embeddings, the head -- is untouched.

OPT's decoder layer flattens its tokens to ``(batch * tokens, hidden)`` before ``fc1``/``fc2``; the
capture hooks mask such inputs by the flattened token mask, so padded rows stay out of those Grams too.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[torch]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from sparsefact.nn_adapters import compress_model, load_compressed, save_compressed  # noqa: E402
from sparsefact.nn_adapters.capture import ActivationCapture, select_layers, token_mask  # noqa: E402
from sparsefact.nn_adapters.compress import find_blocks  # noqa: E402
from sparsefact.nn_adapters.modules import DoubleSparseLinear, _FactorModule  # noqa: E402

VOCAB = 97
FAST_DSF = {"max_iter": 2, "finalize_iter": 1, "tol": 0}
COMMON = {"vocab_size": VOCAB, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "max_position_embeddings": 64}

#: name -> (config class, keyword arguments, dotted path of the decoder blocks)
ARCHS = {
    "llama": ("LlamaConfig", {**DECODER, "num_key_value_heads": 4}, "model.layers"),
    "mistral": ("MistralConfig", {**DECODER, "num_key_value_heads": 2, "sliding_window": None},
                "model.layers"),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}, "transformer.h"),
    "opt": ("OPTConfig", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "max_position_embeddings": 64, "word_embed_proj_dim": 64}, "model.decoder.layers"),
    "qwen2": ("Qwen2Config", {**DECODER, "num_key_value_heads": 2}, "model.layers"),
    "qwen3": ("Qwen3Config", {**DECODER, "num_key_value_heads": 2, "head_dim": 16}, "model.layers"),
    "phi3": ("Phi3Config", {**DECODER, "num_key_value_heads": 2}, "model.layers"),
    "gemma": ("GemmaConfig", {**DECODER, "num_key_value_heads": 2, "head_dim": 16}, "model.layers"),
    "gpt_neox": ("GPTNeoXConfig", {**DECODER, "rotary_pct": 0.5}, "gpt_neox.layers"),
}


def _config(name: str):
    cls_name, kwargs, _ = ARCHS[name]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    return cls(**COMMON, **kwargs)


def _fresh(config, seed: int):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _padded(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded batch (pad id 0) with its attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _calibration_seqs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in (12, 7, 12, 4)]


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    """``(name, config, dense, compressed, report)``: one DSF compression per architecture."""
    name = request.param
    config = _config(name)
    dense = _fresh(config, 0)
    batch = _padded(_calibration_seqs())
    compressed, report = compress_model(copy.deepcopy(dense), batch, "dsf", 0.5, progress=False,
                                        on_error="raise", **FAST_DSF)
    return name, config, dense, compressed, report


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_block_discovery_finds_the_decoder_layers(arch):
    name, config, dense, compressed, report = arch
    path, blocks = find_blocks(dense)
    assert path == ARCHS[name][2] and len(blocks) == 2
    inside = [n for i in range(2) for n in select_layers(blocks[i], prefix=f"{path}.{i}")]
    assert inside and [row["name"] for row in report] == inside  # every linear layer of the blocks
    replaced = {n for n, m in compressed.named_modules() if isinstance(m, _FactorModule)}
    assert replaced == set(inside)
    assert all(isinstance(compressed.get_submodule(n), DoubleSparseLinear) for n in inside)
    assert all(0 < row["density"] <= 0.5 + 1e-9 for row in report)


def test_everything_outside_the_compressed_layers_is_untouched(arch):
    """Rotary embeddings, norms, embeddings and the head: same modules, same values (buffers included)."""
    _, _, dense, compressed, report = arch
    replaced = [row["name"] for row in report]

    def outside(model):
        return {k: v for k, v in [*model.named_parameters(), *model.named_buffers()]
                if not any(k.startswith(n + ".") for n in replaced)}

    before, after = outside(dense), outside(compressed)
    assert before.keys() == after.keys() and before
    for key in before:
        assert torch.equal(before[key], after[key]), key
    kinds = {n: type(m).__name__ for n, m in dense.named_modules() if n not in replaced}
    assert kinds == {n: type(m).__name__ for n, m in compressed.named_modules()
                     if n not in replaced and not any(n.startswith(r + ".") for r in replaced)}
    rotary = [n for n, m in compressed.named_modules() if "rotary" in type(m).__name__.lower()]
    if rotary:  # the rotary modules' buffers (inv_freq, non-persistent) are the dense model's
        for n in rotary:
            for bname, buf in compressed.get_submodule(n).named_buffers():
                assert torch.equal(buf, dense.get_submodule(n).get_buffer(bname)), (n, bname)


def test_save_load_gives_identical_logits_and_generation(arch, tmp_path):
    name, config, dense, compressed, _ = arch
    path = tmp_path / f"{name}.safetensors"
    save_compressed(compressed, path)
    loaded = load_compressed(lambda: _fresh(config, 123), path).eval()
    ids = _ids(2, 10, seed=3)
    out = _logits(compressed, ids)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, _logits(dense, ids))  # it was compressed
    assert torch.equal(_logits(loaded, ids), out)
    prompt = _ids(1, 5, seed=4)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        tokens = compressed.generate(prompt, **kwargs)
        assert torch.equal(loaded.generate(prompt, **kwargs), tokens)
        # the KV cache path and the full recomputation agree on the compressed model
        assert torch.equal(compressed.generate(prompt, use_cache=False, **kwargs), tokens)
    assert tokens.shape == (1, 11)


def test_the_compressed_model_stays_causal(arch):
    _, _, _, compressed, _ = arch
    ids = _ids(2, 12, seed=5)
    full = _logits(compressed, ids)
    prefix = _logits(compressed, ids[:, :7])
    assert torch.allclose(prefix, full[:, :7], atol=1e-5)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    assert torch.allclose(_logits(compressed, changed)[:, :7], full[:, :7], atol=1e-5)


def test_flattened_token_inputs_are_masked():
    """A ``(batch * tokens, features)`` layer input (OPT's fc1/fc2) is masked by the flattened mask."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    x = torch.arange(8.0).reshape(4, 2)
    with ActivationCapture(model, names=["0"]) as cap, token_mask(torch.tensor([[1, 0], [1, 1]])), \
            torch.no_grad():
        model(x)
    assert cap.n_tokens["0"] == 3
    kept = x[[0, 2, 3]].double()
    assert torch.allclose(cap.gram("0").double(), kept.T @ kept)


def test_padded_tokens_do_not_enter_the_grams(arch):
    """Right-padded calibration == the unpadded sequences one by one, in every layer's Gram."""
    _, _, dense, _, report = arch
    seqs = _calibration_seqs()
    names = [row["name"] for row in report]
    with ActivationCapture(dense, names=names) as padded:
        padded.run(_padded(seqs))
    with ActivationCapture(dense, names=names) as single:
        single.run([s[None] for s in seqs])
    with ActivationCapture(dense, names=names) as unmasked, torch.no_grad():
        dense(**_padded(seqs))  # called without the token mask: the padded rows go in
    real = sum(len(s) for s in seqs)
    for n in names:
        assert padded.n_tokens[n] == single.n_tokens[n] == real, n
        ref = single.gram(n)
        # equal up to float32 rounding of the batched forward pass; the pads would change it at O(1)
        assert float((padded.gram(n) - ref).norm() / ref.norm()) < 1e-5, n
        assert unmasked.n_tokens[n] > real
        assert float((unmasked.gram(n) - ref).norm() / ref.norm()) > 1e-2, n
    assert all(row["n_tokens"] == real for row in report)  # compress_model masked them too
