r"""torch modules that hold the factors of a compressed layer.

=====================  =======================================  ===========================
family                 Linear (and transformers' ``Conv1D``)    Conv2d (groups=1)
=====================  =======================================  ===========================
``"sparse"``           :class:`SparseLinear`                    :class:`SparseConv2d`
``"double_sparse"``    :class:`DoubleSparseLinear`              :class:`DoubleSparseConv2d`
``"lowrank"``          :class:`LowRankLinear`                   :class:`LowRankConv2d`
=====================  =======================================  ===========================

(the families are registered in :mod:`sparsefact.nn_adapters.install`). Every module class
builds itself from the dense factors of a fitted estimator (``est.get_factors()``) and the
original layer (:meth:`~_FactorModule.from_layer`), and describes itself for saving
(:meth:`~_FactorModule.get_config` / :meth:`~_FactorModule.from_config`); every public
subclass of ``_FactorModule`` is registered by its class name in :data:`MODULE_CLASSES`, which
is what :func:`~sparsefact.nn_adapters.load_compressed` can rebuild.

A compressed layer keeps its factors either as torch sparse CSR tensors (``layout="csr"``) or as
dense tensors whose pruned entries are zeros (``layout="dense"``, the "masked dense" form). The
forward pass never forms the dense product ``A @ B``: it computes ``(x Bᵀ) Aᵀ + bias``.

Layout rule (``layout="auto"``), decided per factor from its density and size
------------------------------------------------------------------------------
Measured by ``benchmarks/bench_modules.py`` (torch 2.13 CPU build, MKL sparse kernels, 1 torch
thread because the shared 2-core machine was at load ~9 and 2-thread runs measured scheduler
stalls; median of round-robin samples; ``benchmarks/results/bench_modules.json``). One factor
product ``W @ z`` with ``z`` of N columns; CSR time / dense time (below 1: CSR faster)::

    W          density   N=1    N=16   N=256
    1536x384   0.01      0.31   0.19   0.17
               0.05      0.63   0.39   0.33
               0.1       1.07   0.62   0.51
               0.2       2.14   1.12   0.98
               0.3       3.09   1.55   1.39
               0.5       8.00   2.48   2.27
    384x384    0.05      1.11   0.43   0.30
               0.1       1.68   0.62   0.53
               0.2       3.12   0.96   0.92
    384x1536   0.05      0.66   0.40   0.25
               0.1       1.23   0.68   0.42
               0.2       2.39   1.21   0.98
               0.5       5.94   2.94   4.24

CSR pays only for very sparse factors; at the densities DSF factors usually have (0.15-0.45)
dense kernels are as fast or faster, and at batch 1 (matrix-vector) 2-8x faster. As the batch
is not known when a module is built, ``auto`` picks CSR for a factor when
``density <= 0.05`` (CSR wins at every batch size measured, except a 10% loss for 384x384
at N=1) and ``numel >= 65536``
(smaller matrices are dominated by call overhead; not measured below 384x384), and dense
otherwise. fp16/bf16 factors on the CPU are always dense under ``auto``, because torch's CPU
CSR matmul (MKL) has no half-precision kernel.

Small-batch kernel (:class:`SparseLinear`, :class:`DoubleSparseLinear`)
-----------------------------------------------------------------------
An input of 1 to :data:`KERNEL_MAX_ROWS` rows (batch x tokens), a plain CPU tensor in float32 or
float64 (the factors' dtype), for which no gradient can be asked (grad mode off, or nothing
involved requires grad; never on a :meth:`~_FactorModule.set_trainable` module, never under
autocast, tracing or ``torch.compile``) runs through the Numba kernel of
:mod:`sparsefact.backends.spmv` instead of torch: the factors' nonzeros, packed once (SELL-8,
6 bytes per nonzero in float32), multiplied directly (``A (B x)``, bias added last); the result
equals the torch path to rounding (each row summed in the order of its nonzeros). Everything
else -- more rows, fp16/bf16, CUDA, training -- takes the torch path above. The packed form is
derived from the buffers and cached on the module, not part of its state: ``state_dict``,
``layouts`` and saved files are unchanged; it is rebuilt when a factor or the bias is replaced
(``load_state_dict``, ``.to()``, ``set_trainable``) or modified in place (version counters), and
dropped by ``copy.deepcopy`` and pickling. The zeros of a dense-layout factor are skipped, as
with CSR (an infinite input gives no NaN from them). ``module.kernel`` (not saved): ``"auto"``
(default) takes the kernel for CSR factors (torch's CSR product is the slower one at every
density measured) and for dense-layout factors whose packed entries are at most
:data:`KERNEL_MAX_FILL` of their entries (:data:`KERNEL_MAX_FILL_ONE_ROW` for a single row);
``True`` wherever it applies; ``False`` never.
The measurements behind ``"auto"`` and these thresholds (``benchmarks/bench_modules.py``, part
``kernel``) are in ``docs/benchmarks.md`` §5.

Precision: float32/float64 compute in their dtype for both layouts. fp16/bf16 compute in their
dtype with the dense layout (CPU and CUDA) and with CSR on CUDA (not tested here: no GPU); a CSR
factor in fp16/bf16 on the CPU (only when forced with ``layout="csr"``) is multiplied in float32
and the result cast back.

State: factors and bias are registered as *buffers*, not parameters: by default these are inference
modules, an optimiser never sees the factors, and gradients flow only to the input.
:meth:`~_FactorModule.set_trainable` (or :func:`set_trainable` on a whole model) turns the factors
and the bias into ``nn.Parameter``\ s with their sparsity patterns fixed -- each factor is
parametrised as ``values * mask`` (``torch.nn.utils.parametrize``), so gradients outside the pattern
are zero by construction and no optimiser (SGD, Adam, weight decay, ...) can create a new nonzero:
the module's factors keep exactly the nonzeros they had; ``set_trainable(False)`` makes them
buffers again in their original runtime layouts. Training runs on the dense layout.
Buffers follow ``.to(dtype)`` / ``.to(device)`` / ``.half()`` and appear in ``state_dict()`` (a CSR
factor as a sparse CSR tensor); ``load_state_dict`` and ``copy.deepcopy`` are customised because
torch cannot copy a CSR tensor into one with a different number of nonzeros.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import nn

__all__ = [
    "MODULE_CLASSES",
    "FixedPattern",
    "DoubleSparseConv2d",
    "DoubleSparseLinear",
    "LowRankConv2d",
    "LowRankLinear",
    "SparseConv2d",
    "SparseLinear",
    "choose_layout",
    "module_class",
    "replace_module",
    "set_trainable",
]

#: ``auto`` uses CSR for a factor with at most this density ...
CSR_MAX_DENSITY = 0.05
#: ... and at least this many entries (see the module docstring for the measurement).
CSR_MIN_NUMEL = 1 << 16

#: the small-batch kernel (:mod:`sparsefact.backends.spmv`) runs for inputs of at most this many rows
#: (batch x tokens) ...
KERNEL_MAX_ROWS = 16
#: ... and, under ``kernel="auto"`` with dense-layout factors only, when the packed entries are at
#: most this fraction of the factors' entries (2 or more rows) ...
KERNEL_MAX_FILL = 0.6
#: ... or this fraction for a single row (measurements in the module docstring).
KERNEL_MAX_FILL_ONE_ROW = 0.45

_LAYOUTS = ("auto", "csr", "dense")
_KERNEL_DTYPES = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1
#: dtype names of a saved config (``"float32"``, ...) -> torch dtype.
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
#: class name -> module class: every public ``_FactorModule`` subclass, filled by ``__init_subclass__``.
MODULE_CLASSES: dict[str, type[_FactorModule]] = {}


# ---------------------------------------------------------------------------- helpers
def choose_layout(nnz: int, shape: tuple[int, int], dtype: torch.dtype, device: Any = "cpu") -> str:
    """Runtime layout that ``layout="auto"`` picks for one factor (``"csr"`` or ``"dense"``)."""
    numel = int(shape[0]) * int(shape[1])
    if numel == 0:
        return "dense"
    if dtype in _HALF and torch.device(device).type == "cpu":
        return "dense"
    if nnz / numel <= CSR_MAX_DENSITY and numel >= CSR_MIN_NUMEL:
        return "csr"
    return "dense"


def _check_layout(layout: str) -> str:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    return layout


def _as_torch(M: Any, dtype: torch.dtype | None, device: Any) -> torch.Tensor:
    """A 2-D numpy / scipy.sparse / torch (dense or sparse) matrix as a torch tensor.

    Sparse inputs stay sparse (CSR, explicit zeros dropped); dense inputs stay dense.
    ``dtype=None`` keeps a torch input's dtype and gives NumPy/SciPy inputs torch's default dtype.
    """
    if isinstance(M, torch.Tensor):
        target = dtype if dtype is not None else M.dtype
        if not target.is_floating_point:
            target = torch.get_default_dtype()
        if M.layout in (torch.sparse_coo, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
            M = M.to_dense()
        out = M.detach().to(device=device, dtype=target)
        return out
    target = dtype if dtype is not None else torch.get_default_dtype()
    if sp.issparse(M):
        csr = sp.csr_array(M, copy=True)
        csr.eliminate_zeros()
        csr.sum_duplicates()
        if csr.ndim != 2:
            raise ValueError(f"expected a 2-D factor, got shape {csr.shape}")
        return torch.sparse_csr_tensor(
            torch.from_numpy(csr.indptr.astype(np.int64)),
            torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(np.asarray(csr.data)).to(target),
            size=tuple(int(s) for s in csr.shape),
            device=device,
            check_invariants=True,
        )
    arr = np.asarray(M)
    if arr.dtype == object:
        raise TypeError(f"cannot convert {type(M).__name__} to a tensor")
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=target)


def _fitted_factors(est: Any) -> tuple[Any, Any]:
    """``(A_, B_)`` of a fitted DSF estimator, on the host."""
    if not (hasattr(est, "A_") and hasattr(est, "B_")):
        raise ValueError(f"{type(est).__name__} is not a fitted DoubleSparseFactorization (no A_/B_)")
    return _host(est.A_), _host(est.B_)


def _nnz(W: torch.Tensor) -> int:
    if W.layout is torch.sparse_csr:
        return int(torch.count_nonzero(W.values()))
    return int(torch.count_nonzero(W))


def _to_layout(W: torch.Tensor, layout: str) -> torch.Tensor:
    """``W`` (dense or CSR, 2-D) converted to the runtime layout ``"csr"`` / ``"dense"``."""
    if layout == "csr":
        if W.layout is torch.sparse_csr:
            return W
        if W.dtype in _HALF and W.device.type == "cpu":
            # to_sparse_csr has no CPU half kernel in some builds; go through float32.
            return W.to(torch.float32).to_sparse_csr().to(W.dtype)
        return W.to_sparse_csr()
    if W.layout is torch.sparse_csr:
        return W.to_dense()
    return W.contiguous()


def _resolve(W: torch.Tensor, layout: str) -> str:
    if layout != "auto":
        return layout
    return choose_layout(_nnz(W), tuple(W.shape), W.dtype, W.device)


def _index_bytes(nnz: int, shape: tuple[int, int]) -> tuple[int, int]:
    """Bytes per entry of the on-disk (crow_indices, col_indices): int32 / int64 row pointers,
    int16 column indices when every column index fits (``cols <= 32768``)."""
    rows, cols = int(shape[0]), int(shape[1])
    crow = 4 if max(nnz, rows + 1) <= _INT32_MAX else 8
    col = 2 if cols <= 2**15 else (4 if cols <= _INT32_MAX else 8)
    return crow, col


def _matmul_cols(W: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``W @ z`` for a dense or CSR ``W`` and dense ``z`` (columns are samples)."""
    if W.layout is torch.sparse_csr:
        if W.dtype in _HALF and W.device.type == "cpu":
            return (W.to(torch.float32) @ z.to(torch.float32)).to(z.dtype)
        return W @ z
    return W @ z


def _chain_linear(x2: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """``x2 (N, in) -> (N, out)`` through ``factors`` applied right to left as ``x Wᵀ``.

    Dense factors use ``F.linear`` in row form; a CSR factor switches to column form
    (``W @ zᵀ``), which is the product torch's CSR kernels provide.
    """
    z = x2
    row_form = True
    for W in factors:
        if W.layout is torch.sparse_csr:
            z = _matmul_cols(W, z.T if row_form else z)
            row_form = False
        elif row_form:
            z = F.linear(z, W)
        else:
            z = W @ z
    return z if row_form else z.T


def _same_tensors(key: tuple, factors: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> bool:
    """Whether the kernel cache ``key`` was built from exactly these tensors, unmodified since."""
    old_factors, versions, old_bias, bias_version = key
    if old_bias is not bias or (bias is not None and bias._version != bias_version):
        return False
    for a, b, v in zip(old_factors, factors, versions, strict=True):
        if a is not b or b._version != v:
            return False
    return True


class FixedPattern(nn.Module):
    """Parametrisation ``values -> values * mask``: the trainable values of a factor on a fixed pattern."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.mask.to(values.dtype)


class _FactorModule(nn.Module):
    """Shared machinery: factor buffers with a per-factor runtime layout, config and registration.

    A subclass declares

    - ``_factor_names``: its factor buffers, left to right in the product ``W = F1 @ F2 ...``;
    - ``_config_keys``: the constructor's geometry arguments, saved by :meth:`get_config` (the
      constructor must accept them by keyword, plus ``bias`` and ``dtype``);
    - ``_original_checks``: ``(config key, attribute)`` pairs compared with the dense layer
      that a saved module replaces (:meth:`check_original`);
    - ``_forced_layout``: a runtime layout every factor must have (``"dense"`` for low rank).

    Public subclasses are registered by class name in :data:`MODULE_CLASSES`.
    """

    _factor_names: tuple[str, ...] = ()
    _config_keys: tuple[str, ...] = ()
    _original_checks: tuple[tuple[str, str], ...] = ()
    _forced_layout: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__.startswith("_"):
            return
        existing = MODULE_CLASSES.get(cls.__name__)
        if existing is not None and existing.__module__ == __name__ and cls.__module__ != __name__:
            raise TypeError(
                f"a module class named {cls.__name__!r} is built into sparsefact; "
                "give the subclass another name (saved files refer to modules by class name)"
            )
        MODULE_CLASSES[cls.__name__] = cls

    def __init__(self, layout: str) -> None:
        super().__init__()
        layout = _check_layout(layout)
        if self._forced_layout is not None:
            if layout not in ("auto", self._forced_layout):
                raise ValueError(
                    f"{type(self).__name__} keeps its factors in the {self._forced_layout!r} layout, "
                    f"got layout={layout!r}"
                )
            layout = self._forced_layout
        self.layout = layout
        self.layouts: dict[str, str] = {}

    # -- factors
    def _set_factor(self, name: str, W: torch.Tensor, layout: str | None = None) -> None:
        """Store ``W`` as buffer ``name`` in ``layout`` (default: this module's rule)."""
        if self._forced_layout is not None:
            layout = self._forced_layout
        chosen = _resolve(W, self.layout if layout is None else _check_layout(layout))
        self.layouts[name] = chosen
        self.register_buffer(name, _to_layout(W.detach(), chosen))
        self._kernel_state = None

    def _set_bias(self, bias: Any, out: int, dtype: torch.dtype, device: Any) -> None:
        if bias is None or bias is False:
            self.register_buffer("bias", None)
            return
        if bias is True:
            b = torch.zeros(out, dtype=dtype, device=device)
        else:
            b = _as_torch(bias, dtype, device).reshape(-1)
            if b.layout is torch.sparse_csr:  # pragma: no cover - a 1-D bias is never CSR
                b = b.to_dense()
            if b.numel() != out:
                raise ValueError(f"bias has {b.numel()} entries, expected {out}")
        self.register_buffer("bias", b.to(dtype))

    def factor(self, name: str) -> torch.Tensor:
        """Factor ``name`` as a dense tensor."""
        W = getattr(self, name)
        return W.to_dense() if W.layout is torch.sparse_csr else W

    @property
    def nnz(self) -> int:
        """Stored nonzeros over all factors (zeros of the dense layout not counted)."""
        return sum(_nnz(getattr(self, n)) for n in self._factor_names)

    @property
    def _dtype(self) -> torch.dtype:
        return getattr(self, self._factor_names[0]).dtype

    def _bias_bytes(self) -> int:
        return 0 if self.bias is None else self.bias.numel() * self.bias.element_size()

    @property
    def dense_bytes(self) -> int:
        """Bytes of the equivalent dense layer (weight + bias) in this module's dtype."""
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        return math.prod(self._dense_weight_shape()) * itemsize + self._bias_bytes()

    @property
    def compressed_bytes(self) -> int:
        """Bytes of the tensors ``save_compressed`` writes for this module (factors + bias).

        Each factor in the storage the file gives it -- the smallest of dense, CSR, bitmask and
        deflated bitmask for its pattern, values in the module's dtype
        (:func:`~sparsefact.nn_adapters.io.factor_storage`); it does not depend on the runtime
        layout. Not counted: the file's JSON header.
        """
        from .io import factor_storage

        total = self._bias_bytes()
        for n in self._factor_names:
            total += factor_storage(getattr(self, n), name=n)[1]
        return total

    def _dense_weight_shape(self) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- training with fixed sparsity patterns
    @property
    def trainable(self) -> bool:
        """Whether the factors are parameters (see :meth:`set_trainable`)."""
        return getattr(self, "_trainable_layouts", None) is not None

    def set_trainable(self, trainable: bool = True) -> _FactorModule:
        """Make the nonzero values of the factors (and the bias) trainable, the patterns fixed.

        With ``trainable=True`` every factor becomes an ``nn.Parameter`` on the dense layout,
        parametrised as ``values * mask`` with the mask of its current nonzeros
        (:class:`FixedPattern`): ``module.A`` is then the masked product, gradients are the
        dense-layer gradients restricted to the pattern, and no optimiser step can create a
        nonzero outside it. The bias becomes a parameter too. ``trainable=False`` turns the
        (masked) values back into buffers in the runtime layouts they had before.

        Returns
        -------
        self
        """
        from torch.nn.utils import parametrize

        if bool(trainable) == self.trainable:
            return self
        self._kernel_state = None
        if trainable:
            layouts = dict(self.layouts)
            for name in self._factor_names:
                values = self.factor(name).detach().clone()
                del self._buffers[name]
                self.register_parameter(name, nn.Parameter(values))
                parametrize.register_parametrization(self, name, FixedPattern(values != 0))
                self.layouts[name] = "dense"
            if self.bias is not None:
                bias = self._buffers.pop("bias")
                self.register_parameter("bias", nn.Parameter(bias.detach().clone()))
            self._trainable_layouts = layouts
            return self
        layouts = self._trainable_layouts
        for name in self._factor_names:
            parametrize.remove_parametrizations(self, name, leave_parametrized=True)
            values = self._parameters.pop(name).detach()
            self._set_factor(name, values, layouts.get(name))
        if isinstance(self.bias, nn.Parameter):
            bias = self._parameters.pop("bias").detach()
            self.register_buffer("bias", bias)
        self._trainable_layouts = None
        return self

    # -- building from a fitted estimator
    @classmethod
    def from_layer(cls, layer: nn.Module, factors: Sequence[Any], *, layout: str = "auto") -> _FactorModule:
        """The module that replaces ``layer``: its ``factors`` (``est.get_factors()``), the layer's bias.

        Parameters
        ----------
        layer : nn.Module
            The dense layer being replaced (``nn.Linear``, transformers ``Conv1D`` or, for the
            convolution modules, ``nn.Conv2d``): its geometry and bias are taken from it.
        factors : sequence of arrays
            Dense factors (NumPy, SciPy sparse or torch) whose product is the layer matrix
            ``W`` (out x in, see :func:`~sparsefact.nn_adapters.capture.layer_matrix`).
        layout : {"auto", "csr", "dense"}

        Returns
        -------
        module
            In float32 on the CPU (the layer's bias copied); the caller moves it to the
            layer's device and dtype.
        """
        factors = tuple(factors)
        if len(factors) != len(cls._factor_names):
            raise ValueError(
                f"{cls.__name__} holds {len(cls._factor_names)} factor(s) {cls._factor_names}, "
                f"got {len(factors)}"
            )
        bias = None if getattr(layer, "bias", None) is None else layer.bias.detach().to(torch.float32).cpu()
        module = cls._from_layer(layer, factors, bias, layout)
        from .capture import layer_matrix

        want = tuple(layer_matrix(layer).shape)
        have = (int(getattr(module, cls._factor_names[0]).shape[0]),
                int(getattr(module, cls._factor_names[-1]).shape[1]))
        if have != want:
            raise ValueError(f"the factors multiply to a {have} matrix, but the layer's matrix is {want}")
        return module

    @classmethod
    def _from_layer(cls, layer: nn.Module, factors: tuple, bias: Any, layout: str) -> _FactorModule:
        raise NotImplementedError  # pragma: no cover - abstract

    # -- save / load
    def get_config(self) -> dict[str, Any]:
        """JSON-able description: class, dtype, bias flag, layouts, factor shapes and geometry.

        :meth:`from_config` of it gives an all-zero module of the same geometry, dtype and
        layouts; :func:`~sparsefact.nn_adapters.save_compressed` stores it in the file.
        """
        cfg: dict[str, Any] = {
            "class": type(self).__name__,
            "dtype": str(self._dtype).removeprefix("torch."),
            "bias": self.bias is not None,
            "layouts": dict(self.layouts),
            "shapes": {f: [int(s) for s in getattr(self, f).shape] for f in self._factor_names},
        }
        for key in self._config_keys:
            value = getattr(self, key)
            cfg[key] = [int(v) for v in value] if isinstance(value, tuple | list) else int(value)
        return cfg

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> _FactorModule:
        """An all-zero module of the geometry, dtype, bias flag and layouts in ``cfg``.

        Raises
        ------
        ValueError
            An unsupported dtype or an impossible geometry.
        KeyError
            A geometry key is missing.
        """
        dtype_name = cfg.get("dtype")
        if dtype_name not in DTYPES:
            raise ValueError(f"module {cfg.get('name', '')!r}: unsupported dtype {dtype_name!r}")
        geometry = {}
        for key in cls._config_keys:
            value = cfg[key]
            geometry[key] = tuple(int(v) for v in value) if isinstance(value, list | tuple) else int(value)
        module = cls(**geometry, bias=bool(cfg["bias"]), dtype=DTYPES[dtype_name])
        for f, layout in dict(cfg.get("layouts") or {}).items():
            if f in module._factor_names:
                module._set_factor(f, getattr(module, f), layout)
        return module

    @classmethod
    def check_original(cls, cfg: Mapping[str, Any], original: nn.Module, name: str = "") -> None:
        """Raise ``ValueError`` if the dense ``original`` does not have the geometry ``cfg`` was saved from.

        Attributes the original layer does not have (a transformers ``Conv1D`` has no
        ``in_features``) are not compared.
        """
        for key, attr in cls._original_checks:
            if not hasattr(original, attr):
                continue
            have = getattr(original, attr)
            have = tuple(have) if isinstance(have, tuple | list) else have
            want = cfg[key]
            want = tuple(want) if isinstance(want, tuple | list) else want
            if have != want:
                raise ValueError(f"module {name!r}: the model has {attr}={have}, the file has {want}")

    # -- torch plumbing for CSR buffers
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in (*self._factor_names, "bias"):
            key = prefix + name
            current = getattr(self, name)
            if key not in state_dict:
                if current is not None and strict:
                    missing_keys.append(key)
                continue
            incoming = state_dict[key]
            if current is None:
                if incoming is not None:
                    unexpected_keys.append(key)
                continue
            if tuple(incoming.shape) != tuple(current.shape):
                error_msgs.append(
                    f"size mismatch for {key}: copying a tensor of shape {tuple(incoming.shape)}, "
                    f"the module has {tuple(current.shape)}"
                )
                continue
            with torch.no_grad():
                value = incoming.detach().to(device=current.device, dtype=current.dtype)
                if name == "bias":
                    current.copy_(value)
                else:
                    self._set_factor(name, value, self.layouts[name])
        if strict:
            known = {prefix + n for n in (*self._factor_names, "bias")}
            for key in state_dict:
                if key.startswith(prefix) and key not in known and "." not in key[len(prefix):]:
                    unexpected_keys.append(key)

    def __deepcopy__(self, memo):
        sparse = {k: b for k, b in self._buffers.items() if b is not None and b.layout is torch.sparse_csr}
        for k in sparse:
            self._buffers[k] = None
        try:
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            for key, value in self.__dict__.items():
                new.__dict__[key] = None if key == "_kernel_state" else copy.deepcopy(value, memo)
        finally:
            for k, b in sparse.items():
                self._buffers[k] = b
        for k, b in sparse.items():
            new._buffers[k] = torch.sparse_csr_tensor(
                b.crow_indices().clone(), b.col_indices().clone(), b.values().clone(), size=b.shape,
                check_invariants=False,  # copied from a tensor that passed the checks
            )
        return new

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_kernel_state"] = None  # a derived cache: rebuilt on the next forward
        return state

    def _apply(self, fn, *args, **kwargs):
        self._kernel_state = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        lay = ", ".join(f"{n}={self.layouts.get(n, '?')}" for n in self._factor_names)
        return f"{self._shape_repr()}, bias={self.bias is not None}, layout=({lay}), nnz={self.nnz}"

    def _shape_repr(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


def _empty_factor(shape: tuple[int, int], dtype, device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype if dtype is not None else torch.get_default_dtype(), device=device)


# ---------------------------------------------------------------------------- linear
class _LinearFactors(_FactorModule):
    """Shared part of the linear modules: ``y = x Wᵀ + bias`` with ``W`` the product of the factors.

    Small batches on the CPU run through the sparse kernel of :mod:`sparsefact.backends.spmv`
    (rule in the module docstring); the attribute ``kernel`` (not saved) selects it:
    ``"auto"`` (the default) where it is measured to win, ``True`` wherever it applies,
    ``False`` never.
    """

    _original_checks = (("in_features", "in_features"), ("out_features", "out_features"))
    kernel: bool | str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        chain = self._kernel_chain(x2)
        if chain is not None:
            y = torch.from_numpy(chain((x2.detach() if x2.requires_grad else x2).numpy()))
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        factors = [getattr(self, n) for n in reversed(self._factor_names)]
        y = _chain_linear(x2, factors)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _kernel_chain(self, x2: torch.Tensor) -> Any:
        """The packed factors (a :class:`~sparsefact.backends.spmv.SellChain`) if the kernel runs for ``x2``.

        It runs for a plain CPU tensor of float32/float64, in the factors' (and bias') dtype, with
        1 to :data:`KERNEL_MAX_ROWS` rows, outside autocast, tracing and compilation, on a module
        that is not trainable, and only where no gradient can be asked for (grad mode off, or
        neither the input nor a factor nor the bias requires grad). The packed form is cached
        and rebuilt when a factor or the bias is replaced or modified in place.
        """
        mode = self.kernel
        if (mode is False or not 0 < x2.shape[0] <= KERNEL_MAX_ROWS or x2.dtype not in _KERNEL_DTYPES
                or not x2.is_cpu or type(x2) is not torch.Tensor or x2.layout is not torch.strided
                or self.__dict__.get("_trainable_layouts") is not None):  # (getattr's miss path is slow)
            return None
        buffers = self._buffers
        factors = tuple([buffers[n] for n in self._factor_names])
        bias = buffers.get("bias")
        if torch.is_grad_enabled() and (x2.requires_grad or any([W.requires_grad for W in factors])
                                        or (bias is not None and bias.requires_grad)):
            return None
        if torch.is_autocast_enabled("cpu") or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        state = self.__dict__.get("_kernel_state")
        if state is None or not _same_tensors(state[0], factors, bias):
            state = self._kernel_state = self._kernel_build(factors, bias)
        chain, torch_dtype, has_csr, fill = state[1]
        if chain is None or torch_dtype is not x2.dtype:
            return None
        if (mode == "auto" and not has_csr
                and fill > (KERNEL_MAX_FILL_ONE_ROW if x2.shape[0] == 1 else KERNEL_MAX_FILL)):
            return None
        return chain

    def _kernel_build(self, factors: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> tuple:
        from ..backends import spmv

        key = (factors, tuple(W._version for W in factors), bias, None if bias is None else bias._version)
        dtype = factors[0].dtype
        if (any(W.dtype != dtype or W.device.type != "cpu" for W in factors) or dtype not in _KERNEL_DTYPES
                or (bias is not None and (bias.dtype != dtype or bias.device.type != "cpu"))):
            return key, (None, None, False, 1.0)
        packed = []
        for W in factors:
            if W.layout is torch.sparse_csr:
                packed.append(spmv.pack_csr(W.crow_indices().numpy(), W.col_indices().numpy(),
                                            W.values().detach().numpy(), tuple(W.shape)))
            else:
                packed.append(spmv.pack_dense(W.detach().numpy()))
        b = None if bias is None else bias.detach().contiguous().numpy()
        chain = spmv.SellChain(packed, b)
        entries = sum(int(W.shape[0]) * int(W.shape[1]) for W in factors)
        fill = sum(M.vals.size for M in packed) / max(entries, 1)
        return key, (chain, dtype, any(W.layout is torch.sparse_csr for W in factors), fill)

    def to_dense(self) -> torch.Tensor:
        """The dense weight (the product of the factors) of shape (out_features, in_features)."""
        result = self.factor(self._factor_names[0])
        for n in self._factor_names[1:]:
            result = result @ self.factor(n)
        return result

    def _dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)


class DoubleSparseLinear(_LinearFactors):
    """``y = x (A B)ᵀ + bias`` with sparse ``A`` (out x k) and ``B`` (k x in), never forming ``A B``.

    Parameters
    ----------
    in_features, out_features, inner_features : int
        ``n``, ``m`` and the inner dimension ``k``. The constructor makes all-zero factors (to be
        filled by ``load_state_dict`` / ``load_compressed``); use :meth:`from_factors`,
        :meth:`~_FactorModule.from_layer` or :meth:`from_estimator` to build from data.
    bias : bool
    layout : {"auto", "csr", "dense"}
        Runtime storage of each factor; ``auto`` applies :func:`choose_layout` per factor
        (rule and measurements in the module docstring).
    dtype, device : torch dtype and device of factors and bias.

    Attributes
    ----------
    A, B : buffers, CSR or dense tensors; ``layouts`` maps ``"A"``/``"B"`` to the chosen layout.
    bias : buffer or None.
    nnz, dense_bytes, compressed_bytes : properties.
    """

    _factor_names = ("A", "B")
    _config_keys = ("in_features", "out_features", "inner_features")

    def __init__(self, in_features: int, out_features: int, inner_features: int, bias: bool = True, *,
                 layout: str = "auto", dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__(layout)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.inner_features = int(inner_features)
        self._set_factor("A", _empty_factor((self.out_features, self.inner_features), dtype, device))
        self._set_factor("B", _empty_factor((self.inner_features, self.in_features), dtype, device))
        self._set_bias(bool(bias), self.out_features, self.A.dtype, self.A.device)

    @classmethod
    def from_factors(cls, A: Any, B: Any, bias: Any = None, *, layout: str = "auto",
                     dtype: torch.dtype | None = None, device: Any = None) -> DoubleSparseLinear:
        """Build from ``A`` (out x k) and ``B`` (k x in): NumPy, SciPy sparse or torch tensors."""
        At = _as_torch(A, dtype, device)
        Bt = _as_torch(B, At.dtype, At.device)
        if At.ndim != 2 or Bt.ndim != 2 or At.shape[1] != Bt.shape[0]:
            raise ValueError(f"A {tuple(At.shape)} and B {tuple(Bt.shape)} are not (out, k) and (k, in)")
        module = cls.__new__(cls)
        _FactorModule.__init__(module, layout)
        module.out_features, module.inner_features = int(At.shape[0]), int(At.shape[1])
        module.in_features = int(Bt.shape[1])
        module._set_factor("A", At)
        module._set_factor("B", Bt)
        module._set_bias(bias, module.out_features, At.dtype, At.device)
        return module

    @classmethod
    def _from_layer(cls, layer: nn.Module, factors: tuple, bias: Any, layout: str) -> DoubleSparseLinear:
        return cls.from_factors(*factors, bias, layout=layout)

    @classmethod
    def from_estimator(cls, est: Any, bias: Any = None, **kw: Any) -> DoubleSparseLinear:
        """Build from a fitted :class:`~sparsefact.DoubleSparseFactorization` (its ``A_``, ``B_``)."""
        return cls.from_factors(*_fitted_factors(est), bias, **kw)

    def _shape_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"inner_features={self.inner_features}")


class SparseLinear(_LinearFactors):
    """``y = x Wᵀ + bias`` with a single sparse ``weight`` (out x in): the single-sparse baselines.

    Same layouts, buffers and byte accounting as :class:`DoubleSparseLinear`.
    """

    _factor_names = ("weight",)
    _config_keys = ("in_features", "out_features")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, layout: str = "auto",
                 dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__(layout)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._set_factor("weight", _empty_factor((self.out_features, self.in_features), dtype, device))
        self._set_bias(bool(bias), self.out_features, self.weight.dtype, self.weight.device)

    @classmethod
    def from_weight(cls, W_sparse: Any, bias: Any = None, *, layout: str = "auto",
                    dtype: torch.dtype | None = None, device: Any = None) -> SparseLinear:
        """Build from a (out x in) NumPy, SciPy sparse or torch weight."""
        Wt = _as_torch(W_sparse, dtype, device)
        if Wt.ndim != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(Wt.shape)}")
        module = cls.__new__(cls)
        _FactorModule.__init__(module, layout)
        module.out_features, module.in_features = int(Wt.shape[0]), int(Wt.shape[1])
        module._set_factor("weight", Wt)
        module._set_bias(bias, module.out_features, Wt.dtype, Wt.device)
        return module

    @classmethod
    def _from_layer(cls, layer: nn.Module, factors: tuple, bias: Any, layout: str) -> SparseLinear:
        return cls.from_weight(factors[0], bias, layout=layout)

    @classmethod
    def from_estimator(cls, est: Any, bias: Any = None, **kw: Any) -> SparseLinear:
        """Build from a fitted single-sparse compressor (its ``weight_``, e.g. MagnitudePruning)."""
        if not hasattr(est, "weight_"):
            raise ValueError(f"{type(est).__name__} is not a fitted single-sparse compressor (no weight_)")
        return cls.from_weight(_host(est.weight_), bias, **kw)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class _LowRank:
    """Mixin of the low-rank modules: two dense factors ``U = A`` (out x r) and ``V = B`` (r x in)."""

    _forced_layout = "dense"

    @property
    def rank(self) -> int:
        """The inner dimension ``r``."""
        return int(self.A.shape[1])

    @property
    def U(self) -> torch.Tensor:  # noqa: N802 - the factor's name
        """The left factor (out x r); the buffer is ``A``."""
        return self.A

    @property
    def V(self) -> torch.Tensor:  # noqa: N802 - the factor's name
        """The right factor (r x in, ``weight.flatten(1)`` order for a conv); the buffer is ``B``."""
        return self.B


class LowRankLinear(_LowRank, DoubleSparseLinear):
    """``y = x (U V)ᵀ + bias`` with dense ``U`` (out x r) and ``V`` (r x in): the low-rank baseline.

    A :class:`DoubleSparseLinear` whose factors are always dense (``layout`` may only be
    ``"auto"`` or ``"dense"``); the buffers are named ``A`` (= ``U``) and ``B`` (= ``V``) and
    ``inner_features`` is the rank. Saved files store the factors dense.
    """


# ---------------------------------------------------------------------------- conv
def _pair(v: Any, what: str, minimum: int = 0) -> tuple[int, int]:
    """``v`` as a pair of ints, each at least ``minimum``; ``ValueError`` naming ``what`` else."""
    if isinstance(v, bool):
        raise TypeError(f"{what} must be an int or a pair of ints, got {v!r}")
    try:
        t = (int(v), int(v)) if isinstance(v, int) else tuple(int(u) for u in v)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be an int or a pair of ints, got {v!r}") from None
    if len(t) != 2:
        raise ValueError(f"{what} must be an int or a pair, got {v!r}")
    if min(t) < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {v!r}")
    return t  # type: ignore[return-value]


def _conv_padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' needs symmetric padding (odd effective kernel size)")
        return (total[0] // 2, total[1] // 2)
    return _pair(padding, "padding")


def _conv_geometry(layer: nn.Module) -> dict[str, Any]:
    """``kernel_size, stride, padding, dilation`` of an ``nn.Conv2d`` (zero padding only)."""
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
        raise TypeError(f"expected an nn.Conv2d with groups=1, got {type(layer).__name__}")
    if layer.padding_mode != "zeros":
        raise ValueError(f"padding_mode={layer.padding_mode!r}: the conv modules support zero padding only")
    return {"kernel_size": layer.kernel_size, "stride": layer.stride, "padding": layer.padding,
            "dilation": layer.dilation}


class _Conv2dFactors(_FactorModule):
    """Shared part of the conv modules: geometry, forward, dense kernel.

    The factors ``F1 @ F2 @ ... @ Fk`` (``Fk`` is ``rows x C_in*kh*kw`` in ``weight.flatten(1)``
    order) run right to left: ``Fk`` as the kh x kw convolution (stride, padding, dilation),
    every other factor as a 1x1 convolution. A dense-layout factor runs as ``F.conv2d``; a CSR
    factor on the unfolded (im2col) input, and the rest of the chain then stays in that column
    form. groups=1 and zero padding only.
    """

    _original_checks = (("in_channels", "in_channels"), ("out_channels", "out_channels"),
                        ("kernel_size", "kernel_size"))

    def _init_geometry(self, cin, cout, kernel_size, stride, padding, dilation) -> None:
        self.in_channels, self.out_channels = int(cin), int(cout)
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.dilation = _pair(dilation, "dilation", 1)
        self.padding = _conv_padding(padding, self.kernel_size, self.dilation)

    @staticmethod
    def _kernel_columns(M: torch.Tensor, kernel_size: Any) -> tuple[int, int]:
        kh, kw = _pair(kernel_size, "kernel_size")
        if M.shape[1] % (kh * kw):
            raise ValueError(f"the kernel factor has {M.shape[1]} columns, not a multiple of kernel size "
                             f"{kh}x{kw} (B has C_in*kh*kw columns)")
        return kh, kw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        n = x.shape[0]
        kh, kw = self.kernel_size
        ho = (x.shape[2] + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (x.shape[3] + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        chain = [getattr(self, name) for name in reversed(self._factor_names)]  # application order
        h: torch.Tensor | None = None  # NCHW while every factor so far ran as a convolution
        cols: torch.Tensor | None = None  # else column form (channels, N*L)
        for i, W in enumerate(chain):
            bias = self.bias if i == len(chain) - 1 else None
            if W.layout is not torch.sparse_csr and (i == 0 or h is not None):
                if i == 0:
                    kernel = W.reshape(W.shape[0], self.in_channels, kh, kw)
                    h = F.conv2d(x, kernel, bias, self.stride, self.padding, self.dilation)
                else:
                    h = F.conv2d(h, W.reshape(W.shape[0], W.shape[1], 1, 1), bias)
                continue
            if i == 0:
                # (N, C_in*kh*kw, L) -> (C_in*kh*kw, N*L)
                unfolded = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
                cols = unfolded.transpose(0, 1).reshape(unfolded.shape[1], -1)
            elif h is not None:
                cols = h.transpose(0, 1).reshape(h.shape[1], -1)
                h = None
            cols = _matmul_cols(W, cols)
            if bias is not None:
                cols = cols + bias[:, None]
        y = h if h is not None else cols.reshape(self.out_channels, n, ho, wo).transpose(0, 1)
        return y.squeeze(0) if unbatched else y

    def to_dense(self) -> torch.Tensor:
        """The dense kernel (the product of the factors) of shape (out, C_in, kh, kw)."""
        result = self.factor(self._factor_names[0])
        for name in self._factor_names[1:]:
            result = result @ self.factor(name)
        return result.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def _dense_weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _geometry_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}")


class DoubleSparseConv2d(_Conv2dFactors):
    """Conv2d in DSF form: conv (kh x kw, C_in -> k, stride, padding, dilation) then 1x1 conv (k -> out).

    ``B`` (k x C_in*kh*kw) is the first conv's weight in torch's ``weight.flatten(1)`` order and
    ``A`` (out x k) the 1x1 conv's weight, so ``(A @ B).reshape(out, C_in, kh, kw)`` is the
    equivalent dense kernel. groups=1 and zero padding only. A dense-layout factor runs as
    ``F.conv2d``; a CSR factor runs on the unfolded (im2col) input.
    """

    _factor_names = ("A", "B")
    _config_keys = ("in_channels", "out_channels", "inner_channels", "kernel_size", "stride", "padding",
                    "dilation")

    def __init__(self, in_channels: int, out_channels: int, inner_channels: int, kernel_size: Any,
                 stride: Any = 1, padding: Any = 0, dilation: Any = 1, bias: bool = True, *,
                 layout: str = "auto", dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__(layout)
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)
        self.inner_channels = int(inner_channels)
        ckk = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._set_factor("A", _empty_factor((self.out_channels, self.inner_channels), dtype, device))
        self._set_factor("B", _empty_factor((self.inner_channels, ckk), dtype, device))
        self._set_bias(bool(bias), self.out_channels, self.A.dtype, self.A.device)

    @classmethod
    def from_factors(cls, A: Any, B: Any, bias: Any = None, *, kernel_size: Any, stride: Any = 1,
                     padding: Any = 0, dilation: Any = 1, layout: str = "auto",
                     dtype: torch.dtype | None = None, device: Any = None) -> DoubleSparseConv2d:
        """Build from ``A`` (out x k) and ``B`` (k x C_in*kh*kw, ``weight.flatten(1)`` order)."""
        At = _as_torch(A, dtype, device)
        Bt = _as_torch(B, At.dtype, At.device)
        if At.ndim != 2 or Bt.ndim != 2 or At.shape[1] != Bt.shape[0]:
            raise ValueError(f"A {tuple(At.shape)} and B {tuple(Bt.shape)} are not (out, k) and (k, C*kh*kw)")
        kh, kw = cls._kernel_columns(Bt, kernel_size)
        module = cls.__new__(cls)
        _FactorModule.__init__(module, layout)
        module._init_geometry(Bt.shape[1] // (kh * kw), At.shape[0], (kh, kw), stride, padding, dilation)
        module.inner_channels = int(At.shape[1])
        module._set_factor("A", At)
        module._set_factor("B", Bt)
        module._set_bias(bias, module.out_channels, At.dtype, At.device)
        return module

    @classmethod
    def _from_layer(cls, layer: nn.Module, factors: tuple, bias: Any, layout: str) -> DoubleSparseConv2d:
        return cls.from_factors(*factors, bias, layout=layout, **_conv_geometry(layer))

    @classmethod
    def from_estimator(cls, est: Any, bias: Any = None, **kw: Any) -> DoubleSparseConv2d:
        """Build from a DSF fitted to ``conv.weight.flatten(1)``; conv geometry as keywords."""
        return cls.from_factors(*_fitted_factors(est), bias, **kw)

    def _shape_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, inner_channels={self.inner_channels}, "
                f"{self._geometry_repr()}")


class SparseConv2d(_Conv2dFactors):
    """Conv2d with a single sparse kernel ``weight`` (out x C_in*kh*kw, ``weight.flatten(1)`` order).

    The single-sparse baselines (magnitude, Wanda, SparseGPT, ADMM) on a convolution. With the
    dense layout the forward pass is ``F.conv2d`` with the pruned kernel (the numbers of the
    dense ``nn.Conv2d`` with zeros in its kernel); with CSR it runs on the unfolded (im2col)
    input. groups=1 and zero padding only.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding, dilation : int or pair (``padding`` also "valid" / "same")
    bias : bool
    layout : {"auto", "csr", "dense"}
    dtype, device : torch dtype and device of the weight and bias.
    """

    _factor_names = ("weight",)
    _config_keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, bias: bool = True, *, layout: str = "auto",
                 dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__(layout)
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)
        ckk = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._set_factor("weight", _empty_factor((self.out_channels, ckk), dtype, device))
        self._set_bias(bool(bias), self.out_channels, self.weight.dtype, self.weight.device)

    @classmethod
    def from_weight(cls, weight: Any, bias: Any = None, *, kernel_size: Any, stride: Any = 1,
                    padding: Any = 0, dilation: Any = 1, layout: str = "auto",
                    dtype: torch.dtype | None = None, device: Any = None) -> SparseConv2d:
        """Build from a kernel, 2-D (out x C_in*kh*kw, ``weight.flatten(1)`` order) or 4-D."""
        if not sp.issparse(weight) and getattr(weight, "ndim", 2) == 4:
            weight = weight.reshape(weight.shape[0], -1)
        Wt = _as_torch(weight, dtype, device)
        if Wt.ndim != 2:
            raise ValueError(f"weight must be 2-D or 4-D, got shape {tuple(Wt.shape)}")
        kh, kw = cls._kernel_columns(Wt, kernel_size)
        module = cls.__new__(cls)
        _FactorModule.__init__(module, layout)
        module._init_geometry(Wt.shape[1] // (kh * kw), Wt.shape[0], (kh, kw), stride, padding, dilation)
        module._set_factor("weight", Wt)
        module._set_bias(bias, module.out_channels, Wt.dtype, Wt.device)
        return module

    @classmethod
    def _from_layer(cls, layer: nn.Module, factors: tuple, bias: Any, layout: str) -> SparseConv2d:
        return cls.from_weight(factors[0], bias, layout=layout, **_conv_geometry(layer))

    def _shape_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, {self._geometry_repr()}"


class LowRankConv2d(_LowRank, DoubleSparseConv2d):
    """Conv2d in low-rank form: a kh x kw conv to ``r`` channels (``V``), then a 1x1 conv (``U``).

    A :class:`DoubleSparseConv2d` whose factors are always dense; buffers ``A`` (= ``U``,
    out x r) and ``B`` (= ``V``, r x C_in*kh*kw); ``inner_channels`` is the rank.
    """

# ---------------------------------------------------------------------------- utilities
def _host(M: Any) -> Any:
    """A CuPy array / cupyx sparse matrix copied to the host; anything else unchanged."""
    if hasattr(M, "get") and type(M).__module__.startswith("cupy"):  # pragma: no cover - needs a GPU
        return M.get()
    return M


def module_class(name: str) -> type[_FactorModule]:
    """The registered module class called ``name`` (:data:`MODULE_CLASSES`); ``ValueError`` if none."""
    cls = MODULE_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown module class {name!r} (known: {sorted(MODULE_CLASSES)})")
    return cls


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Set the submodule at dotted ``name`` (e.g. ``"encoder.layers.0.fc1"``) to ``new_module``.

    Returns the module that was replaced. Raises ``ValueError`` if ``name`` does not exist.
    """
    if not name:
        raise ValueError("cannot replace the root module (empty name)")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = parent.get_submodule(child)
    except AttributeError as exc:
        raise ValueError(f"model has no submodule {name!r}") from exc
    setattr(parent, child, new_module)
    return old


def set_trainable(model: nn.Module, trainable: bool = True) -> nn.Module:
    """:meth:`_FactorModule.set_trainable` on every compressed module of ``model``; returns ``model``.

    After ``set_trainable(model)`` the compressed layers fine-tune with any torch optimiser
    (their patterns fixed) alongside the model's other parameters; ``set_trainable(model,
    False)`` freezes them into inference buffers again (before ``save_compressed``, for the
    sparse runtime layouts).
    """
    for module in model.modules():
        if isinstance(module, _FactorModule):
            module.set_trainable(trainable)
    return model
