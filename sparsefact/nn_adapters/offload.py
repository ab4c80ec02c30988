"""Compress models larger than memory: one block at a time from (sharded) safetensors on disk.

:func:`~.compress.compress_model` with ``offload=`` never holds the whole model. The model is
built on the ``meta`` device (shapes, no storage)::

    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    compress_model(model, batches, "dsf", 0.5, offload=BlockOffloader(src, "out/"))
    compressed = load_offloaded(lambda: AutoModelForCausalLM.from_config(config), "out/")

and a :class:`BlockOffloader` moves the weights between disk and memory around the block loop:

1. ``prepare``: every tensor the model needs is checked against the shards' headers (name and
   shape, nothing read), then every parameter outside the repeated blocks (embeddings, final
   norm, output head) is read from disk;
2. ``load`` before a block is calibrated: that block's parameters are read from disk;
3. ``store`` once the block is compressed and its outputs (the next block's inputs) computed:
   the compressed block is written with :func:`~.io.save_compressed` to
   ``output_dir/blocks/<name>.safetensors`` atomically (temporary file, fsync, rename) and
   its tensors go back to ``meta``, which frees them;
4. ``finish``: the blocks after the last compressed one, never run, are copied from the source
   one at a time; the parameters outside the blocks go to ``rest.safetensors``; ``index.json``
   (the file list with SHA-256 digests) is written last, atomically, so a directory with an
   index is complete.

Peak memory is then about one block (dense, plus its compressed copy while it is written) plus
the calibration activations (the cached block inputs and the layers' Grams) plus the tensors
outside the blocks, instead of the whole model.

Output directory layout (format ``sparsefact-offload``, version 1)::

    index.json                 {"format", "format_version", "model_class", "source",
                                "blocks": [{"name", "file", "sha256", "bytes", "compressed"}],
                                "rest": {"file", "sha256", "bytes"}, "report": "report.json"|null}
    blocks/<name>.safetensors  one block in the format of :func:`~.io.save_compressed`
    rest.safetensors           the parameters and persistent buffers outside the blocks
                               (plain safetensors, one entry per tied group)
    report.json                the run's :class:`~.compress.CompressionReport`

:func:`load_offloaded` verifies every digest before it builds anything, then assembles the
compressed model from the pieces (a model built on ``meta`` is materialised piece by piece, so
assembling needs only the compressed model's memory). ``save_compressed(load_offloaded(...),
path)`` gives the one-file form.

Tensors are read with ``safetensors.safe_open`` (``pread``, not memory-mapped: the memory of a
freed block really goes back): only the tensors a block needs are read. A tensor that is
already on a real device is left as it is (a model whose embeddings are loaded can be offloaded
too). Tied parameters (GPT-2's ``lm_head`` and
``wte``) stay tied: a tensor with several names is read once, under whichever name the
checkpoint has. Non-persistent buffers (rotary ``inv_freq``) are not in checkpoints: a
``meta`` one is recomputed by the model's ``_init_weights`` (transformers models); any other
model must be built with real buffers (only the parameters on ``meta``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "INDEX_NAME",
    "OFFLOAD_FORMAT",
    "BlockOffloader",
    "ShardedCheckpoint",
    "as_offloader",
    "load_offloaded",
]

OFFLOAD_FORMAT = "sparsefact-offload"
OFFLOAD_FORMAT_VERSION = 1
INDEX_NAME = "index.json"
REST_NAME = "rest.safetensors"
REPORT_NAME = "report.json"
BLOCKS_DIR = "blocks"

#: safetensors dtype names (the header's ``dtype``) and their torch dtypes
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


# ---------------------------------------------------------------------------- reading shards
def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (dtype name, shape)}`` from a safetensors file's JSON header (no tensor is read)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER:
                raise ValueError(f"{path}: not a safetensors file (header length {n} is implausible)")
            raw = fh.read(n)
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a safetensors file (unreadable header: {exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (the header is not a JSON object)")
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            out[key] = (str(info["dtype"]), tuple(int(s) for s in info["shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: corrupted header entry for tensor {key!r}") from exc
    return out


class ShardedCheckpoint:
    """Read-only view of a model's weights stored as one or several safetensors files.

    Parameters
    ----------
    path : str or path-like
        A ``.safetensors`` file, or a folder of shards: with a ``*.safetensors.index.json``
        (as ``transformers``' ``save_pretrained(max_shard_size=...)`` writes; its
        ``weight_map`` says which shard holds which tensor) or without one (every
        ``*.safetensors`` file of the folder, each tensor in exactly one of them).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        No safetensors file, an unreadable header or index, a shard the index names that is
        missing or lacks a tensor the index places in it, or (without an index) a tensor
        found in two shards.

    Notes
    -----
    Only the headers are read on construction. :meth:`read` opens each shard once with
    ``safetensors.safe_open`` and reads only the tensors asked for, with ``pread(2)`` into the
    process's own memory (``backend="pread"``; older safetensors: memory-mapped, then copied),
    so a tensor's memory is returned when it is dropped.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no such file or folder: {os.fspath(p)!r}")
        self.path = p
        self._where: dict[str, Path] = {}
        self._info: dict[str, tuple[str, tuple[int, ...]]] = {}
        if p.is_file():
            self.index = None
            self._add_file(p)
            return
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            preferred = [i for i in indexes if i.name == "model.safetensors.index.json"]
            if len(preferred) != 1:
                raise ValueError(f"{p}: several shard indexes ({', '.join(i.name for i in indexes)}); "
                                 "pass the shard folder of one model")
            indexes = preferred
        self.index = indexes[0] if indexes else None
        if self.index is None:
            files = sorted(p.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{p}: no *.safetensors file in this folder")
            for f in files:
                self._add_file(f)
            return
        try:
            weight_map = json.loads(self.index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.index}: not a shard index (expected a 'weight_map' object): "
                             f"{exc}") from exc
        headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for key, fname in weight_map.items():
            if fname not in headers:
                shard = p / str(fname)
                if not shard.is_file():
                    raise ValueError(f"{self.index}: shard {fname!r} (holding {key!r}) is missing from {p}")
                headers[fname] = _read_header(shard)
            if key not in headers[fname]:
                raise ValueError(f"{self.index}: tensor {key!r} is not in its shard {fname!r}")
            self._where[key] = p / str(fname)
            self._info[key] = headers[fname][key]

    def _add_file(self, f: Path) -> None:
        for key, info in _read_header(f).items():
            if key in self._where:
                raise ValueError(f"tensor {key!r} is in two shards: {self._where[key].name} and {f.name}")
            self._where[key] = f
            self._info[key] = info

    @property
    def files(self) -> list[Path]:
        """The shard files, sorted."""
        return sorted(set(self._where.values()))

    def keys(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        return f"ShardedCheckpoint({os.fspath(self.path)!r}, {len(self)} tensors in {len(self.files)} files)"

    def _check(self, key: str) -> None:
        if key not in self._where:
            raise ValueError(f"{self.path}: no tensor {key!r} in the checkpoint")

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape (from the header)."""
        self._check(key)
        return self._info[key][1]

    def dtype(self, key: str) -> torch.dtype:
        """The tensor's dtype (from the header)."""
        self._check(key)
        name = self._info[key][0]
        if name not in _DTYPES:
            raise ValueError(f"{self._where[key]}: tensor {key!r} has dtype {name!r}, unknown to this torch")
        return _DTYPES[name]

    def file_of(self, key: str) -> Path:
        """The shard that holds ``key``."""
        self._check(key)
        return self._where[key]

    def read(self, keys: Iterable[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors (each shard opened once); ``ValueError`` for a name not in the checkpoint."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            self._check(key)
            by_file.setdefault(self._where[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        dev = str(torch.device(device))
        for f, names in by_file.items():
            try:  # pread(2) into the process's own memory: freed with the tensor, no mapped file pages
                handle, copy = safe_open(os.fspath(f), framework="pt", device=dev, backend="pread"), False
            except TypeError:  # older safetensors: memory-mapped, copied out so the mapping goes
                handle, copy = safe_open(os.fspath(f), framework="pt", device=dev), True
            with handle as fh:
                for key in names:
                    t = fh.get_tensor(key)
                    out[key] = t.clone() if copy and t.device.type == "cpu" else t
        return out


# ---------------------------------------------------------------------------- model tensors
@dataclass
class _Entry:
    """One tensor of a model with every place it sits in (tied parameters sit in several)."""

    names: list[str]
    slots: list[tuple[nn.Module, str]]
    tensor: torch.Tensor
    param: bool
    persistent: bool


def _entries(module: nn.Module, prefix: str = "") -> list[_Entry]:
    """Every parameter and buffer of ``module`` once, with all its full names (``prefix.`` + local)."""
    by_id: dict[int, _Entry] = {}
    for mname, m in module.named_modules(prefix=prefix, remove_duplicate=False):
        items = [(leaf, t, True, True) for leaf, t in m._parameters.items()]
        items += [(leaf, t, False, leaf not in m._non_persistent_buffers_set)
                  for leaf, t in m._buffers.items()]
        for leaf, t, is_param, persistent in items:
            if t is None:
                continue
            full = f"{mname}.{leaf}" if mname else leaf
            entry = by_id.get(id(t))
            if entry is None:
                by_id[id(t)] = _Entry([full], [(m, leaf)], t, is_param, persistent)
            else:
                if full not in entry.names:
                    entry.names.append(full)
                if not any(o is m and n == leaf for o, n in entry.slots):
                    entry.slots.append((m, leaf))
    return list(by_id.values())


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _outside(entries: list[_Entry], block_names: Sequence[str]) -> list[_Entry]:
    """The entries outside every block; ``ValueError`` for a tensor shared by a block and anything else."""
    out = []
    for e in entries:
        homes = {next((b for b in block_names if _under(n, b)), None) for n in e.names}
        if len(homes) > 1:
            raise ValueError(f"tensor {e.names[0]!r} is shared between {sorted(map(str, homes))} (names "
                             f"{e.names}): offloading needs every block to own its tensors")
        if homes == {None}:
            out.append(e)
    return out


def _set(entry: _Entry, value: torch.Tensor) -> None:
    """Put ``value`` in every slot of ``entry`` (one new Parameter for all, so ties stay tied)."""
    if entry.param:
        new: torch.Tensor = nn.Parameter(value, requires_grad=entry.tensor.requires_grad)
        for owner, leaf in entry.slots:
            owner._parameters[leaf] = new
    else:
        new = value
        for owner, leaf in entry.slots:
            owner._buffers[leaf] = value
    entry.tensor = new


def _plan(entries: list[_Entry], source: ShardedCheckpoint, *, what: str) -> dict[str, _Entry]:
    """``{checkpoint key: entry}`` for the entries to read; ``ValueError`` for a missing tensor or shape."""
    plan = {}
    for e in entries:
        key = next((n for n in e.names if n in source), None)
        if key is None:
            if not e.param and not e.persistent:
                continue  # recomputed (see _init_buffers)
            also = f" (also named {e.names[1:]})" if len(e.names) > 1 else ""
            raise ValueError(f"{source.path}: the checkpoint has no tensor {e.names[0]!r}{also}, which "
                             f"{what} needs")
        if tuple(source.shape(key)) != tuple(e.tensor.shape):
            raise ValueError(f"{source.path}: tensor {key!r} has shape {list(source.shape(key))} in the "
                             f"checkpoint, but {what} has {list(e.tensor.shape)}")
        plan[key] = e
    return plan


def _sentinel(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t
    return t.fill_(torch.iinfo(t.dtype).min)


def _init_buffers(entries: list[_Entry], root: nn.Module, device: torch.device) -> None:
    """Recompute ``meta`` non-persistent buffers (not in checkpoints) with ``root._init_weights``."""
    init = getattr(root, "_init_weights", None)
    todo = [e for e in entries if not e.param and not e.persistent and e.tensor.is_meta]
    for e in todo:
        owner = e.slots[0][0]
        hint = (f"the non-persistent buffer {e.names[0]!r} is on the meta device and checkpoints do not "
                "hold such buffers: build the model with real buffers (only its parameters on meta, "
                "e.g. accelerate's init_empty_weights(include_buffers=False))")
        if not callable(init):
            raise ValueError(hint)
        if any(not p.is_meta for p in owner._parameters.values() if p is not None):
            raise ValueError(hint + " -- its module has real parameters _init_weights would overwrite")
        _set(e, _sentinel(torch.empty(e.tensor.shape, dtype=e.tensor.dtype, device=device)))
        init(owner)
        value = e.slots[0][0]._buffers[e.slots[0][1]]
        if value is None or value.is_meta or bool((value != value).any()) or (
                not value.dtype.is_floating_point and value.dtype != torch.bool
                and bool((value == torch.iinfo(value.dtype).min).any())):
            raise ValueError(hint + f" -- {type(root).__name__}._init_weights did not compute it")


def _materialise(entries: list[_Entry], source: ShardedCheckpoint, root: nn.Module, device: torch.device,
                 *, what: str, only_meta: bool = True) -> None:
    """Read the entries from ``source`` (only those on ``meta`` unless ``only_meta=False``)."""
    todo = [e for e in entries if e.tensor.is_meta or not only_meta]
    plan = _plan(todo, source, what=what)
    _init_buffers(todo, root, device)
    tensors = source.read(plan, device)
    for key, e in plan.items():
        value = tensors.pop(key)
        if value.dtype != e.tensor.dtype:
            value = value.to(e.tensor.dtype)
        _set(e, value)


def _empty_like_meta(module: nn.Module, root: nn.Module, device: torch.device) -> None:
    """Give every ``meta`` tensor of ``module`` uninitialised storage (recomputing non-persistent buffers)."""
    entries = [e for e in _entries(module) if e.tensor.is_meta]
    _init_buffers(entries, root, device)
    for e in entries:
        if e.tensor.is_meta:
            _set(e, torch.empty(e.tensor.shape, dtype=e.tensor.dtype, device=device))


def _to_meta(module: nn.Module) -> None:
    """Replace every tensor of ``module`` by a ``meta`` tensor of its shape and dtype (frees the storage)."""
    for m in module.modules():
        for leaf, p in m._parameters.items():
            if p is not None and not p.is_meta:
                m._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                   requires_grad=p.requires_grad)
        for leaf, b in m._buffers.items():
            if b is not None and not b.is_meta:
                m._buffers[leaf] = torch.empty(b.shape, dtype=b.dtype, device="meta")


# ---------------------------------------------------------------------------- files
def _default_mode() -> int:
    """``0o666`` less the process umask (read from /proc where possible: changing it is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync, rename over ``path``, fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _default_mode() & (stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_write(path, write)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _block_file(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    if safe != name or not name or name.startswith("."):
        safe = f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return f"{BLOCKS_DIR}/{safe}.safetensors"


def _is_ours(entry: Path) -> bool:
    if entry.name in (INDEX_NAME, REST_NAME, REPORT_NAME) and entry.is_file():
        return True
    if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
        return True  # a temporary file of an interrupted write
    if entry.name == BLOCKS_DIR and entry.is_dir():
        return all(f.is_file() and (f.name.endswith(".safetensors") or f.name.endswith(".tmp"))
                   for f in entry.iterdir())
    return False


def _check_output_dir(out: Path, overwrite: bool, source: ShardedCheckpoint) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {os.fspath(out)!r} exists and is not a folder")
    src = source.path if source.path.is_dir() else source.path.parent
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"output_dir {os.fspath(out)!r} is the source folder; write the compressed model "
                         "elsewhere")
    if not out.exists():
        return
    entries = list(out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise ValueError(f"output_dir {os.fspath(out)!r} is not empty; pass overwrite=True to replace a "
                         "previous offloaded run there, or choose an empty folder")
    foreign = [e.name for e in entries if not _is_ours(e)]
    if foreign:
        raise ValueError(f"output_dir {os.fspath(out)!r} holds files that are not an offloaded run's "
                         f"({', '.join(sorted(foreign)[:5])}); overwrite=True replaces only a previous "
                         "offloaded run and never deletes other files")


def _clear_output_dir(out: Path) -> None:
    """Remove a previous offloaded run (its index first, so a half-cleared folder is never complete)."""
    for name in (INDEX_NAME, REPORT_NAME, REST_NAME):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    for f in out.glob(".*.tmp"):
        f.unlink()
    blocks = out / BLOCKS_DIR
    if blocks.is_dir():
        for f in blocks.iterdir():
            f.unlink()


# ---------------------------------------------------------------------------- the offloader
@dataclass
class _State:
    model: nn.Module | None = None
    blocks: list[str] = field(default_factory=list)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    loaded: list[str] = field(default_factory=list)
    finished: bool = False


class BlockOffloader:
    """Load each block from disk just before it is compressed, write it out and free it after.

    Pass one to :func:`~.compress.compress_model` as ``offload=`` (a model in block mode). It
    is used for one run; see the module docstring for the sequence and the output layout.

    Parameters
    ----------
    source : str, path-like or ShardedCheckpoint
        The uncompressed weights: a safetensors file or a folder of shards
        (:class:`ShardedCheckpoint`), with the model's ``state_dict`` names.
    output_dir : str or path-like
        Where the compressed model goes; created if missing. It must be empty (or missing)
        unless ``overwrite=True``.
    device : str or torch.device, default="cpu"
        Where tensors are materialised (and so where the blocks are calibrated).
    overwrite : bool, default=False
        Replace a previous offloaded run in ``output_dir``. Only that run's own files
        (``index.json``, ``report.json``, ``rest.safetensors``, ``blocks/``) may be there:
        a folder with any other file is refused, never cleaned.

    Raises
    ------
    ValueError
        ``output_dir`` not empty (without ``overwrite``), holding other files, or the source
        folder itself; an unreadable source (:class:`ShardedCheckpoint`).

    Attributes
    ----------
    loaded : list of str
        The blocks read from disk, in order (the run's compressed ones, then the copied ones).
    """

    def __init__(self, source: str | os.PathLike | ShardedCheckpoint, output_dir: str | os.PathLike, *,
                 device: str | torch.device = "cpu", overwrite: bool = False) -> None:
        self.source = source if isinstance(source, ShardedCheckpoint) else ShardedCheckpoint(source)
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.overwrite = bool(overwrite)
        _check_output_dir(self.output_dir, self.overwrite, self.source)
        self._state = _State()

    def __repr__(self) -> str:
        return f"BlockOffloader({os.fspath(self.source.path)!r} -> {os.fspath(self.output_dir)!r})"

    @property
    def loaded(self) -> list[str]:
        return list(self._state.loaded)

    # -- the run
    def prepare(self, model: nn.Module, block_names: Sequence[str]) -> None:
        """Check the source against the whole model, then read every tensor outside the blocks.

        Parameters
        ----------
        model : nn.Module
            The model, typically built on ``meta``; tensors already on a real device are kept.
        block_names : sequence of str
            Every repeated block of the model (dotted names), in order.

        Raises
        ------
        ValueError
            A tensor the model needs (inside or outside the blocks) that the checkpoint lacks,
            or whose shape differs -- found here, before any block is compressed; a tensor
            shared between blocks; a second run with the same offloader.
        """
        if self._state.model is not None:
            raise ValueError("this BlockOffloader was already used for a run; make a new one")
        names = list(block_names)
        if not names:
            raise ValueError("offload needs the model's repeated blocks (none were given)")
        for name in names:
            model.get_submodule(name)  # AttributeError for a wrong name
        entries = _entries(model)
        rest = _outside(entries, names)
        _plan([e for e in entries if e.tensor.is_meta], self.source, what="the model")  # fail early
        _check_output_dir(self.output_dir, self.overwrite, self.source)
        if self.output_dir.exists():
            _clear_output_dir(self.output_dir)
        (self.output_dir / BLOCKS_DIR).mkdir(parents=True, exist_ok=True)
        _materialise(rest, self.source, model, self.device, what="the model")
        self._state = _State(model=model, blocks=names)

    def _block(self, block_name: str, block: nn.Module) -> nn.Module:
        state = self._state
        if state.model is None:
            raise ValueError("BlockOffloader.prepare(model, block_names) must come first")
        if state.finished:
            raise ValueError("this BlockOffloader has finished its run")
        if block_name not in state.blocks:
            raise ValueError(f"{block_name!r} is not one of the blocks given to prepare()")
        if state.model.get_submodule(block_name) is not block:
            raise ValueError(f"the module given is not the model's {block_name!r}")
        return block

    def load(self, block_name: str, block: nn.Module) -> None:
        """Read the block's parameters and persistent buffers from the source (those on ``meta``)."""
        self._block(block_name, block)
        if block_name in self._state.stored:
            raise ValueError(f"block {block_name!r} was already stored")
        _materialise(_entries(block, block_name), self.source, self._state.model, self.device,
                     what=f"block {block_name!r}")
        self._state.loaded.append(block_name)

    def store(self, block_name: str, block: nn.Module) -> Path:
        """Write the (compressed) block atomically, then move its tensors to ``meta``; return the file."""
        from .io import _compressed_modules, save_compressed

        self._block(block_name, block)
        rel = _block_file(block_name)
        path = self.output_dir / rel
        _atomic_write(path, lambda tmp: save_compressed(block, tmp))
        self._state.stored[block_name] = {
            "name": block_name, "file": rel, "sha256": _sha256(path), "bytes": path.stat().st_size,
            "compressed": bool(_compressed_modules(block)),
        }
        _to_meta(block)
        return path

    def finish(self, report: Any = None) -> Path:
        """Copy the blocks never loaded, write the tensors outside the blocks and the index; return it.

        Parameters
        ----------
        report : CompressionReport, optional
            Written to ``report.json`` (``to_json``).
        """
        from safetensors.torch import save_file

        state = self._state
        if state.model is None:
            raise ValueError("BlockOffloader.prepare(model, block_names) must come first")
        model = state.model
        for name in state.blocks:
            if name not in state.stored:  # after the last compressed block: copied as they are
                block = model.get_submodule(name)
                self.load(name, block)
                self.store(name, block)
        rest = [e for e in _outside(_entries(model), state.blocks) if e.param or e.persistent]
        tensors = {e.names[0]: e.tensor.detach().to("cpu").contiguous() for e in rest}
        _atomic_write(self.output_dir / REST_NAME,
                      lambda tmp: save_file(tensors, tmp, metadata={"format": f"{OFFLOAD_FORMAT}-rest"}))
        rest_path = self.output_dir / REST_NAME
        report_name = None
        if report is not None:
            _write_text(self.output_dir / REPORT_NAME, report.to_json())
            report_name = REPORT_NAME
        index = {
            "format": OFFLOAD_FORMAT,
            "format_version": OFFLOAD_FORMAT_VERSION,
            "model_class": type(model).__name__,
            "source": os.fspath(self.source.path),
            "blocks": [state.stored[name] for name in state.blocks],
            "rest": {"file": REST_NAME, "sha256": _sha256(rest_path), "bytes": rest_path.stat().st_size},
            "report": report_name,
        }
        path = self.output_dir / INDEX_NAME
        _write_text(path, json.dumps(index, indent=2) + "\n")
        state.finished = True
        return path


def _source_of(model: nn.Module) -> Path:
    """Where a transformers model's weights are, from ``config._name_or_path`` (a local folder)."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or ""
    p = Path(os.fspath(name)) if name else None
    if p is None or not p.exists():
        raise ValueError(
            "offload=PATH: cannot tell where the model's weights are (model.config._name_or_path is "
            f"{name!r}, not a local file or folder; it is set by AutoConfig.from_pretrained(folder)); pass "
            "offload=BlockOffloader(source, output_dir)"
        )
    return p


def as_offloader(offload: Any, model: nn.Module) -> BlockOffloader:
    """``compress_model``'s ``offload=`` argument as a :class:`BlockOffloader`.

    A :class:`BlockOffloader` is returned as it is; a path is the output directory, the
    source being the local folder the model's config was read from
    (``model.config._name_or_path``, as ``AutoConfig.from_pretrained(folder)`` sets it).

    Raises
    ------
    ValueError
        ``offload=True`` (where to write is needed), or a path with no known source.
    TypeError
        Anything else.
    """
    if isinstance(offload, BlockOffloader):
        return offload
    if offload is True:
        raise ValueError("offload=True: say where the compressed blocks go -- offload=PATH (an output "
                         "folder) or offload=BlockOffloader(source, output_dir)")
    if isinstance(offload, str | os.PathLike):
        return BlockOffloader(_source_of(model), offload)
    raise TypeError(f"offload must be a BlockOffloader or an output folder, got {type(offload).__name__}")


# ---------------------------------------------------------------------------- reading back
def _read_index(out: Path) -> dict[str, Any]:
    path = out / INDEX_NAME
    if not path.is_file():
        if (out / BLOCKS_DIR).is_dir():
            raise ValueError(f"{os.fspath(out)!r} has no {INDEX_NAME}: the offloaded run did not finish "
                             "(run compress_model again with overwrite=True)")
        raise ValueError(f"{os.fspath(out)!r} is not the output of an offloaded run (no {INDEX_NAME})")
    try:
        index = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: corrupted index: {exc}") from exc
    if not isinstance(index, dict) or index.get("format") != OFFLOAD_FORMAT:
        raise ValueError(f"{path}: not a {OFFLOAD_FORMAT} index")
    if index.get("format_version") != OFFLOAD_FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {index.get('format_version')!r}")
    if not isinstance(index.get("blocks"), list) or not isinstance(index.get("rest"), dict):
        raise ValueError(f"{path}: corrupted index (expected 'blocks' and 'rest')")
    return index


def load_offloaded(model_or_factory: nn.Module | Callable[[], nn.Module], output_dir: str | os.PathLike, *,
                   device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Assemble the compressed model an offloaded :func:`~.compress.compress_model` run wrote.

    Parameters
    ----------
    model_or_factory : nn.Module or callable
        The uncompressed model (its architecture; modified in place) or a zero-argument
        callable building it, called after the files are verified. It may be on ``meta``
        (nothing is then allocated for the dense weights the compressed blocks replace).
    output_dir : str or path-like
        The ``output_dir`` of the run.
    device : str or torch.device, default="cpu"
        Where ``meta`` tensors are materialised.
    verify : bool, default=True
        Check every file's SHA-256 against the index first (each block file's own checksums
        are verified by :func:`~.io.load_compressed` either way).

    Returns
    -------
    nn.Module
        The model with every block as compressed (as :func:`~.io.load_compressed` builds it)
        and every tensor outside the blocks from ``rest.safetensors``.

    Raises
    ------
    ValueError
        No index (an unfinished run or another folder), a file whose digest differs from the
        index, a model that does not fit the files (a missing block, tensor or shape).
    """
    from .io import load_compressed

    out = Path(output_dir)
    index = _read_index(out)
    files = [(b.get("file"), b.get("sha256")) for b in index["blocks"]]
    files.append((index["rest"].get("file"), index["rest"].get("sha256")))
    for rel, digest in files:
        path = out / str(rel)
        if not path.is_file():
            raise ValueError(f"{os.fspath(out)!r}: {rel!r} (listed in the index) is missing")
        if verify and _sha256(path) != digest:
            raise ValueError(f"{os.fspath(out)!r}: {rel!r} does not match its SHA-256 in the index "
                             "(changed, corrupted or from another run)")
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory returned {type(model).__name__}, not an nn.Module")
    dev = torch.device(device)
    names = [str(b["name"]) for b in index["blocks"]]
    rest = ShardedCheckpoint(out / str(index["rest"]["file"]))
    _materialise(_outside(_entries(model), names), rest, model, dev, what="the model", only_meta=False)
    for b in index["blocks"]:
        try:
            block = model.get_submodule(str(b["name"]))
        except AttributeError as exc:
            raise ValueError(f"the model has no block {b['name']!r} (listed in the index)") from exc
        _empty_like_meta(block, model, dev)
        load_compressed(block, out / str(b["file"]))
    return model
