"""compress_model(..., offload=...): models larger than memory, one block at a time from disk (issue 14.5).

A small LLaMA-style and a GPT-2 decoder with random weights are saved sharded (as
``save_pretrained(max_shard_size=...)`` does); compressing them with a :class:`BlockOffloader`
from a model built on ``meta`` gives the compressed weights of an in-memory run, bit for bit,
with at most one block materialised at any time. Peak RSS is measured by
``benchmarks/bench_offload.py``, not here.
"""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from sparsefact.nn_adapters.compress import compress_model  # noqa: E402
from sparsefact.nn_adapters.offload import BlockOffloader, ShardedCheckpoint, load_offloaded  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FAST_DSF = {"max_iter": 3, "finalize_iter": 2, "tol": 0}
VOCAB = 120


def _llama_config():
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                    max_position_embeddings=64)


def _gpt2_config():
    return transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=64,
                                   bos_token_id=0, eos_token_id=0)


def _save(config, path, shard: str = "40KB"):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.logging.set_verbosity(level)
    transformers.utils.logging.enable_progress_bar()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save(_llama_config(), tmp_path_factory.mktemp("llama") / "src")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return _save(_gpt2_config(), tmp_path_factory.mktemp("gpt2") / "src")


def _data(n=3, tokens=12, pad=False):
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        batch = {"input_ids": torch.randint(0, VOCAB, (2, tokens), generator=g)}
        if pad:
            mask = torch.ones(2, tokens, dtype=torch.long)
            mask[1, tokens // 2:] = 0
            batch["attention_mask"] = mask
        batches.append(batch)
    return batches


def _meta(src):
    config = transformers.AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _factory(src):
    config = transformers.AutoConfig.from_pretrained(src)
    return lambda: transformers.AutoModelForCausalLM.from_config(config)


def _dense_state(model):
    return {k: (v.to_dense() if v.layout != torch.strided else v) for k, v in model.state_dict().items()}


def _assert_same_model(a, b):
    sa, sb = _dense_state(a), _dense_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]


def _rows(report):
    return [{k: v for k, v in r.items() if k not in ("seconds", "capture_seconds")} for r in report]


def _reference(src, data, method, **kw):
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    return compress_model(model, data, method, 0.5, progress=False, threads=1, **kw)


class Spy(BlockOffloader):
    """Checks that at most one block is materialised whenever a block is loaded; records the order."""

    def load(self, block_name, block):
        model = self._state.model
        for name in self._state.blocks:
            if name != block_name:
                assert all(t.is_meta for t in model.get_submodule(name).state_dict().values()), name
        super().load(block_name, block)

    def finish(self, report=None):
        self.loaded_during_run = self.loaded
        return super().finish(report)


# ---------------------------------------------------------------------------- same result
def test_offload_gives_the_in_memory_result_bit_for_bit_llama(llama_dir, tmp_path):
    assert len(list(llama_dir.glob("*.safetensors"))) > 2
    assert (llama_dir / "model.safetensors.index.json").exists()
    data = _data()
    ref, ref_report = _reference(llama_dir, data, "dsf", **FAST_DSF)
    model = _meta(llama_dir)
    off = Spy(llama_dir, tmp_path / "out")
    out, report = compress_model(model, data, "dsf", 0.5, progress=False, threads=1, offload=off, **FAST_DSF)
    assert out is model
    assert _rows(report) == _rows(ref_report)
    assert off.loaded_during_run == [f"model.layers.{i}" for i in range(3)]
    # the blocks were freed: the returned model holds them dense, on meta
    assert all(p.is_meta for p in model.model.layers.parameters())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not model.model.embed_tokens.weight.is_meta
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [b["name"] for b in index["blocks"]] == [f"model.layers.{i}" for i in range(3)]
    assert all(b["compressed"] for b in index["blocks"])
    assert json.loads((tmp_path / "out" / "report.json").read_text())["summary"]["layers"] == 21
    assert not list((tmp_path / "out").rglob("*.tmp"))
    # assembled from a real model and from a meta one: the same model as the in-memory run
    for target in (_factory(llama_dir), _meta(llama_dir), model):
        got = load_offloaded(target, tmp_path / "out")
        _assert_same_model(got, ref)
        x = data[0]["input_ids"]
        with torch.no_grad():
            assert torch.equal(got(x).logits, ref(x).logits)


def test_offload_gpt2_tied_head_padding_and_dense_calibration(gpt2_dir, tmp_path):
    data = _data(pad=True)
    for sequential in (True, False):
        ref, ref_report = _reference(gpt2_dir, data, "sparsegpt", sequential=sequential)
        out = tmp_path / f"out-{sequential}"
        _, report = compress_model(_meta(gpt2_dir), data, "sparsegpt", 0.5, progress=False, threads=1,
                                   sequential=sequential, offload=BlockOffloader(gpt2_dir, out))
        assert _rows(report) == _rows(ref_report)
        got = load_offloaded(_meta(gpt2_dir), out)
        _assert_same_model(got, ref)
        assert got.lm_head.weight is got.transformer.wte.weight  # the tie survives
    assert set(load_file(out / "rest.safetensors")) == {"transformer.wte.weight", "transformer.wpe.weight",
                                                       "transformer.ln_f.weight", "transformer.ln_f.bias"}


def test_blocks_after_the_last_compressed_one_are_never_run(llama_dir, tmp_path):
    data = _data()
    only_first = r"layers\.0\."
    ref, ref_report = _reference(llama_dir, data, "wanda", layers=only_first, measure_error=False)
    off = Spy(llama_dir, tmp_path / "out")
    _, report = compress_model(_meta(llama_dir), data, "wanda", 0.5, progress=False, layers=only_first,
                               measure_error=False, offload=off)
    assert off.loaded_during_run == ["model.layers.0"]
    assert off.loaded == ["model.layers.0", "model.layers.1", "model.layers.2"]  # copied by finish()
    assert _rows(report) == _rows(ref_report)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [b["compressed"] for b in index["blocks"]] == [True, False, False]
    _assert_same_model(load_offloaded(_factory(llama_dir), tmp_path / "out"), ref)


def test_offload_path_uses_the_folder_the_config_came_from(llama_dir, tmp_path):
    data = _data(n=1)
    ref, _ = _reference(llama_dir, data, "magnitude")
    compress_model(_meta(llama_dir), data, "magnitude", 0.5, progress=False, offload=tmp_path / "out")
    _assert_same_model(load_offloaded(_factory(llama_dir), tmp_path / "out"), ref)


# ---------------------------------------------------------------------------- sources
def test_sharded_checkpoint_reads_an_index_a_plain_folder_and_one_file(llama_dir, tmp_path):
    ck = ShardedCheckpoint(llama_dir)
    assert ck.index is not None and len(ck.files) > 2
    key = "model.layers.1.mlp.up_proj.weight"
    assert ck.shape(key) == (80, 32) and ck.dtype(key) == torch.float32
    value = ck.read([key])[key]
    # no index: the shards themselves
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ck.files:
        (plain / f.name).write_bytes(f.read_bytes())
    assert set(ShardedCheckpoint(plain).keys()) == set(ck.keys())
    assert torch.equal(ShardedCheckpoint(ck.file_of(key)).read([key])[key], value)
    # the same tensor in two unindexed shards
    save_file({key: value}, plain / "extra.safetensors")
    with pytest.raises(ValueError, match="in two shards"):
        ShardedCheckpoint(plain)
    with pytest.raises(ValueError, match="no tensor 'nope'"):
        ck.read(["nope"])


def test_an_index_naming_a_missing_shard_is_refused(llama_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in llama_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    victim = sorted(src.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=victim.name):
        ShardedCheckpoint(src)


def _copy_without(llama_dir, dst, drop=None, reshape=None):
    """A one-file copy of the checkpoint without the tensor ``drop`` or with ``reshape`` cut short."""
    tensors = {k: v.clone() for f in sorted(llama_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:-1].clone()
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_a_missing_tensor_is_named_before_any_block_is_compressed(llama_dir, tmp_path):
    key = "model.layers.2.mlp.down_proj.weight"
    src = _copy_without(llama_dir, tmp_path / "src", drop=key)
    with pytest.raises(ValueError, match=key):
        compress_model(_meta(llama_dir), _data(n=1), "magnitude", 0.5, progress=False,
                       offload=BlockOffloader(src, tmp_path / "out"))
    assert not (tmp_path / "out" / "blocks").exists() or not list((tmp_path / "out" / "blocks").iterdir())


def test_a_shape_mismatch_is_refused(llama_dir, tmp_path):
    key = "model.embed_tokens.weight"
    src = _copy_without(llama_dir, tmp_path / "src", reshape=key)
    with pytest.raises(ValueError, match=rf"{key}.*shape"):
        compress_model(_meta(llama_dir), _data(n=1), "magnitude", 0.5, progress=False,
                       offload=BlockOffloader(src, tmp_path / "out"))


# ---------------------------------------------------------------------------- output folder
def test_the_output_folder_is_never_overwritten_by_surprise(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        BlockOffloader(llama_dir, out)
    with pytest.raises(ValueError, match="notes.txt"):
        BlockOffloader(llama_dir, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="source folder"):
        BlockOffloader(llama_dir, llama_dir, overwrite=True)
    # a previous run is replaced with overwrite=True
    (out / "notes.txt").unlink()
    data = _data(n=1)
    compress_model(_meta(llama_dir), data, "magnitude", 0.5, progress=False,
                   offload=BlockOffloader(llama_dir, out))
    with pytest.raises(ValueError, match="not empty"):
        BlockOffloader(llama_dir, out)
    ref, _ = _reference(llama_dir, data, "magnitude")
    compress_model(_meta(llama_dir), data, "magnitude", 0.5, progress=False,
                   offload=BlockOffloader(llama_dir, out, overwrite=True))
    _assert_same_model(load_offloaded(_factory(llama_dir), out), ref)


def test_an_unfinished_or_changed_output_is_refused(llama_dir, tmp_path):
    out = tmp_path / "out"
    compress_model(_meta(llama_dir), _data(n=1), "magnitude", 0.5, progress=False,
                   offload=BlockOffloader(llama_dir, out))
    block = out / "blocks" / "model.layers.1.safetensors"
    raw = bytearray(block.read_bytes())
    raw[-1] ^= 1
    block.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.layers\.1.*SHA-256"):
        load_offloaded(_factory(llama_dir), out)
    (out / "index.json").unlink()
    with pytest.raises(ValueError, match="did not finish"):
        load_offloaded(_factory(llama_dir), out)
    with pytest.raises(ValueError, match="not the output of an offloaded run"):
        load_offloaded(_factory(llama_dir), tmp_path)


def test_a_failing_run_leaves_no_index(llama_dir, tmp_path):
    class Boom(BlockOffloader):
        def load(self, block_name, block):
            if block_name.endswith(".2"):
                raise KeyboardInterrupt
            super().load(block_name, block)

    with pytest.raises(KeyboardInterrupt):
        compress_model(_meta(llama_dir), _data(n=1), "magnitude", 0.5, progress=False,
                       offload=Boom(llama_dir, tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out" / "blocks").iterdir()) == [
        "model.layers.0.safetensors", "model.layers.1.safetensors"]
    assert not (tmp_path / "out" / "index.json").exists()


# ---------------------------------------------------------------------------- arguments
def test_offload_arguments_that_cannot_work_are_refused(llama_dir, tmp_path):
    data = _data(n=1)
    with pytest.raises(ValueError, match="offload=True"):
        compress_model(_meta(llama_dir), data, offload=True, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        compress_model(_meta(llama_dir), data, offload=BlockOffloader(llama_dir, tmp_path / "a"),
                       checkpoint_dir=tmp_path / "ck", progress=False)
    with pytest.raises(ValueError, match="calibration pass"):
        compress_model(_meta(llama_dir), data, "magnitude", measure_error=False, progress=False,
                       offload=BlockOffloader(llama_dir, tmp_path / "b"))
    with pytest.raises(ValueError, match="repeated blocks"):
        compress_model(_meta(llama_dir), data, blocks=False, progress=False,
                       offload=BlockOffloader(llama_dir, tmp_path / "c"))
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="cannot tell where"):
        compress_model(mlp, torch.randn(8, 4), offload=tmp_path / "d", progress=False)
    with pytest.raises(TypeError, match="offload must be"):
        compress_model(mlp, torch.randn(8, 4), offload=3, progress=False)
