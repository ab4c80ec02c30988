"""compress_model's failure semantics, checkpoints and Dask path (issues 14 and 18).

- arguments (every layer's density, the estimator's parameters) are validated before any
  layer is touched;
- a layer whose fit raises is kept dense and reported, the others are compressed;
- any other failure (an interruption, ``on_error="raise"``) leaves the model exactly as it was;
- with ``checkpoint_dir`` a run killed with SIGKILL resumes and gives the same model, bit
  for bit, as an uninterrupted run; a checkpoint of other arguments is refused;
- with ``client`` the layers that share inputs are fitted on a Dask cluster, same results.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from toy_method import KeepDiagonal  # noqa: E402

from sparsefact import register_method, unregister_method  # noqa: E402
from sparsefact.checkpoint import CheckpointMismatchError  # noqa: E402
from sparsefact.nn_adapters import compress_model  # noqa: E402

HERE = Path(__file__).parent
FAST = {"max_iter": 3, "tol": 0}


def _mlp(width=16, depth=4) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        layers += [nn.Linear(12 if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _data():
    return torch.randn(96, 12, generator=torch.Generator().manual_seed(1))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class FailWide(KeepDiagonal):
    """A toy method whose fit raises on layers with 12 inputs (the first one), to test faults."""

    def _fit(self, W, gram, engine):
        if W.shape[1] == 12:
            raise ValueError("this toy method refuses 12 inputs")
        return super()._fit(W, gram, engine)


class Interrupting(KeepDiagonal):
    """A toy method that is interrupted (Ctrl-C) at its second layer."""

    calls = 0

    def _fit(self, W, gram, engine):
        type(self).calls += 1
        if type(self).calls == 2:
            raise KeyboardInterrupt
        return super()._fit(W, gram, engine)


@pytest.fixture
def toy_methods():
    register_method("fail-wide", FailWide)
    register_method("interrupting", Interrupting)
    Interrupting.calls = 0
    yield
    unregister_method("fail-wide")
    unregister_method("interrupting")


def test_a_bad_density_for_a_later_layer_is_refused_before_any_layer_is_touched():
    model = _mlp()
    before = _state(model)
    with pytest.raises(ValueError, match="layer '4'.*density"):
        compress_model(model, _data(), "magnitude", {"0": 0.5, "2": 0.5, "4": 1.5}, progress=False)
    assert _same_state(before, _state(model)) and all(type(m) in (nn.Linear, nn.ReLU) for m in model)


def test_a_layer_whose_fit_raises_stays_dense_and_is_reported(toy_methods):
    model = _mlp()
    with pytest.warns(RuntimeWarning, match="kept dense"):
        model, report = compress_model(model, _data(), "fail-wide", 0.5, progress=False)
    assert [r["name"] for r in report.failed] == ["0"] and "refuses 12 inputs" in report.failed[0]["error"]
    assert type(model[0]) is nn.Linear and type(model[2]).__name__ == "SparseLinear"
    assert report.summary()["failed"] == 1
    with pytest.raises(ValueError, match="refuses"):
        compress_model(_mlp(), _data(), "fail-wide", 0.5, progress=False, on_error="raise")


@pytest.mark.parametrize("replace", [True, False])
def test_an_interrupted_run_leaves_the_model_unchanged(toy_methods, replace):
    model = _mlp()
    before = _state(model)
    with pytest.raises(KeyboardInterrupt):
        compress_model(model, _data(), "interrupting", 0.5, progress=False, replace=replace)
    assert Interrupting.calls == 2  # the first layer was compressed, then put back
    assert _same_state(before, _state(model)) and all(type(m) in (nn.Linear, nn.ReLU) for m in model)


def test_checkpoint_resume_installs_finished_layers_without_refitting(tmp_path, toy_methods):
    uninterrupted, _ = compress_model(_mlp(), _data(), "dsf", 0.5, progress=False, **FAST,
                                      layers=lambda name, m: True)
    ckpt = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt) as info:
        compress_model(_mlp(), _data(), "dsf", 0.5, progress=False, checkpoint_dir=ckpt,
                       **FAST, layers=lambda name, m: True, forward=_interrupt_at_layer(3))
    assert "finished layers are saved" in "".join(getattr(info.value, "__notes__", []))
    resumed, report = compress_model(_mlp(), _data(), "dsf", 0.5, progress=False, checkpoint_dir=ckpt,
                                     **FAST, layers=lambda name, m: True)
    assert [r.get("from_checkpoint", False) for r in report] == [True, True, False, False]
    assert _same_state(_state(uninterrupted), _state(resumed))
    with pytest.raises(CheckpointMismatchError, match="density"):
        compress_model(_mlp(), _data(), "dsf", 0.3, progress=False, checkpoint_dir=ckpt, **FAST,
                       layers=lambda name, m: True)


def _interrupt_at_layer(count):
    """A forward that raises KeyboardInterrupt on its ``count``-th capture pass (a layer-wise run)."""
    calls = {"n": 0}

    def forward(model, batch):
        calls["n"] += 1
        if calls["n"] == count * 1:
            raise KeyboardInterrupt
        return model(batch)

    return forward


def test_a_sigkilled_run_resumes_to_the_same_model_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    job = [sys.executable, str(HERE / "resume_job.py")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    reference = tmp_path / "reference.safetensors"
    subprocess.run([*job, str(tmp_path / "ck-ref"), str(reference)], check=True, env=env)
    ckpt = tmp_path / "ck"
    killed = subprocess.Popen([*job, str(ckpt), str(tmp_path / "never.safetensors")], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((ckpt / "layers").glob("*.npz"))) < 2:
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    done_before = len(list((ckpt / "layers").glob("*.npz")))
    assert 2 <= done_before < 6, "the kill should land mid-run"
    assert not (tmp_path / "never.safetensors").exists()
    resumed = tmp_path / "resumed.safetensors"
    subprocess.run([*job, str(ckpt), str(resumed)], check=True, env=env)
    a, b = load_file(str(reference)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_dask_path_gives_the_serial_model(dask_client):
    from test_nn_compress import TinyTransformer, _token_batches

    def tiny():
        torch.manual_seed(0)
        return TinyTransformer()

    serial, serial_report = compress_model(tiny(), _token_batches(), "dsf", 0.5, progress=False, **FAST)
    on_dask, report = compress_model(tiny(), _token_batches(), "dsf", 0.5, progress=False,
                                     client=dask_client, **FAST)
    assert [r["name"] for r in report] == [r["name"] for r in serial_report]
    assert _same_state(_state(serial), _state(on_dask))
    assert np.allclose([r["calibrated_err"] for r in report], [r["calibrated_err"] for r in serial_report])
