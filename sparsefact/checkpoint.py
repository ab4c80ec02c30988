"""Resumable compression: every finished layer on disk, atomically, under a manifest.

A :class:`LayerCheckpoint` is a directory::

    manifest.json          what the run is: model fingerprint, method, parameters, density,
                           calibration digest, format version (written once, atomically)
    layers/<key>.npz       one finished layer: its dense factors (float arrays) and its
                           report row (JSON in the archive), written atomically

Every file is written to a temporary name in the same directory, flushed and ``fsync``-ed,
then renamed over its final name (``os.replace``, atomic on POSIX), and the directory is
``fsync``-ed; so a run killed at any moment -- SIGKILL included -- leaves each layer either
absent or complete, never half-written. Opening a directory whose manifest differs from the
run's (another model, method, parameter, density or calibration) raises a ``ValueError``
naming the differences: a checkpoint is never silently mixed into another run.

Loading gives a :class:`CheckpointedFit`: the factors and report numbers of the layer, with the
part of the estimator interface that installing a result needs (``get_factors``,
``reconstruct``, ``nnz_``, ``density_``, ``calibrated_err_``). No pickle is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CheckpointMismatchError", "CheckpointedFit", "LayerCheckpoint", "digest_arrays"]

FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
    """The checkpoint directory belongs to a run with other arguments."""


def digest_arrays(arrays: Any) -> str:
    """SHA-256 of a sequence of arrays (shapes, dtypes and bytes), for fingerprints."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the directory)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _key(name: str) -> str:
    """A file name for a layer name (readable, and unique through a hash suffix)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


class CheckpointedFit:
    """A finished layer read back from a checkpoint (the installable part of an estimator)."""

    def __init__(self, factors: tuple[np.ndarray, ...], row: Mapping[str, Any]) -> None:
        self._factors = tuple(factors)
        self.row = dict(row)
        self.nnz_ = int(row["nnz"])
        self.density_ = float(row["density"])
        self.calibrated_err_ = float(row["calibrated_err"])

    def get_factors(self) -> tuple[np.ndarray, ...]:
        """The dense factors whose product is the compressed weight."""
        return self._factors

    def reconstruct(self) -> np.ndarray:
        """The dense compressed weight."""
        out = self._factors[0]
        for f in self._factors[1:]:
            out = out @ f
        return out


class LayerCheckpoint:
    """A checkpoint directory for one compression run (see the module docstring).

    Parameters
    ----------
    directory : path
        Created if missing. An existing directory must hold a checkpoint of the same run
        (same ``manifest``) or nothing at all.
    manifest : mapping
        JSON-able description of the run (model fingerprint, method, parameters, density,
        calibration digest, ...). Compared key by key with an existing manifest.

    Raises
    ------
    CheckpointMismatchError
        The directory holds a checkpoint of another run.
    ValueError
        ``directory`` is a file, or a non-empty directory that is not a checkpoint.
    """

    def __init__(self, directory: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = {"format_version": FORMAT_VERSION, **json.loads(json.dumps(dict(manifest)))}
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint_dir {os.fspath(self.directory)!r} is a file, not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._layers = self.directory / "layers"
        manifest_path = self.directory / "manifest.json"
        if manifest_path.exists():
            try:
                existing = json.loads(manifest_path.read_text())
            except ValueError as exc:
                raise ValueError(f"{manifest_path}: corrupted checkpoint manifest ({exc})") from exc
            differences = sorted(
                k for k in set(existing) | set(self.manifest) if existing.get(k) != self.manifest.get(k)
            )
            if differences:
                shown = ", ".join(
                    f"{k}: checkpoint {existing.get(k)!r:.60} vs this run {self.manifest.get(k)!r:.60}"
                    for k in differences[:4]
                )
                raise CheckpointMismatchError(
                    f"checkpoint_dir {os.fspath(self.directory)!r} was written by a run with other "
                    f"arguments ({shown}); use another directory, or delete it to start over"
                )
        else:
            others = [p.name for p in self.directory.iterdir() if not p.name.startswith(".")]
            if others:
                raise ValueError(
                    f"checkpoint_dir {os.fspath(self.directory)!r} is not empty and holds no checkpoint "
                    f"manifest (found {others[:3]}); give an empty or new directory"
                )
            atomic_write_bytes(manifest_path, (json.dumps(self.manifest, indent=2) + "\n").encode())
        self._layers.mkdir(exist_ok=True)

    def _path(self, name: str) -> Path:
        return self._layers / f"{_key(name)}.npz"

    def done(self) -> list[str]:
        """Names of the finished layers."""
        names = []
        for path in sorted(self._layers.glob("*.npz")):
            try:
                with np.load(path, allow_pickle=False) as data:
                    names.append(json.loads(bytes(data["__row__"]).decode())["name"])
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                continue  # not a complete layer file: as if absent (it is rewritten)
        return names

    def has(self, name: str) -> bool:
        """Whether layer ``name`` is finished (its file is complete and readable)."""
        return self.load(name) is not None

    def save(self, name: str, factors: Any, row: Mapping[str, Any]) -> None:
        """Write one finished layer atomically."""
        arrays = {f"factor{i}": np.ascontiguousarray(np.asarray(f)) for i, f in enumerate(factors)}
        row = {**json.loads(json.dumps(dict(row), default=float)), "name": name}
        buffer = io.BytesIO()
        np.savez(buffer, __row__=np.frombuffer(json.dumps(row).encode(), dtype=np.uint8), **arrays)
        atomic_write_bytes(self._path(name), buffer.getvalue())

    def load(self, name: str) -> CheckpointedFit | None:
        """The finished layer ``name``, or ``None`` if it is not (completely) there."""
        path = self._path(name)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                row = json.loads(bytes(data["__row__"]).decode())
                count = sum(1 for k in data.files if k.startswith("factor"))
                factors = tuple(np.array(data[f"factor{i}"]) for i in range(count))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None
        if row.get("name") != name or not factors:
            return None
        return CheckpointedFit(factors, row)
