"""LayerCheckpoint: finished layers on disk, atomically, never mixed into another run."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sparsefact.checkpoint import CheckpointMismatchError, LayerCheckpoint, atomic_write_bytes, digest_arrays

MANIFEST = {"model": "abc", "method": "dsf", "density": 0.5, "params": {"max_iter": 8}}


def _row(name="enc.0.q"):
    return {"name": name, "nnz": 10, "density": 0.25, "calibrated_err": 0.125, "seconds": 1.5}


def test_round_trip_is_exact(tmp_path):
    ckpt = LayerCheckpoint(tmp_path / "ck", MANIFEST)
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((3, 5))
    ckpt.save("enc.0.q", (A, B), _row())
    again = LayerCheckpoint(tmp_path / "ck", MANIFEST)
    fit = again.load("enc.0.q")
    assert again.done() == ["enc.0.q"] and again.has("enc.0.q") and not again.has("enc.0.k")
    got = fit.get_factors()
    assert got[0].dtype == np.float32 and np.array_equal(got[0], A) and np.array_equal(got[1], B)
    assert np.array_equal(fit.reconstruct(), A @ B)
    assert (fit.nnz_, fit.density_, fit.calibrated_err_) == (10, 0.25, 0.125)


@pytest.mark.parametrize(("key", "value"), [("method", "wanda"), ("density", 0.3), ("model", "other")])
def test_a_checkpoint_of_another_run_is_refused(tmp_path, key, value):
    LayerCheckpoint(tmp_path / "ck", MANIFEST).save("a", (np.eye(2),), _row("a"))
    with pytest.raises(CheckpointMismatchError, match=key):
        LayerCheckpoint(tmp_path / "ck", {**MANIFEST, key: value})


def test_a_foreign_directory_or_a_file_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's file")
    with pytest.raises(ValueError, match="not empty"):
        LayerCheckpoint(tmp_path / "mine", MANIFEST)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's file"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        LayerCheckpoint(tmp_path / "file", MANIFEST)


def test_an_incomplete_layer_file_counts_as_absent(tmp_path):
    ckpt = LayerCheckpoint(tmp_path / "ck", MANIFEST)
    ckpt.save("a", (np.eye(3),), _row("a"))
    path = ckpt._path("a")
    path.write_bytes(path.read_bytes()[:40])  # what a non-atomic writer could leave behind
    assert ckpt.load("a") is None and ckpt.done() == []


def test_an_interrupted_write_leaves_the_old_state(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left


def test_digest_depends_on_values_shapes_and_dtypes():
    a = np.arange(6.0)
    assert digest_arrays([a]) == digest_arrays([a.copy()])
    assert digest_arrays([a]) != digest_arrays([a.reshape(2, 3)])
    assert digest_arrays([a]) != digest_arrays([a.astype(np.float32)])
