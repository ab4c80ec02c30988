"""Trainable linear layers with a structured weight: Monarch and butterfly matrices.

==- :class:`MonarchLinear`: ``left`` ``(b * ceil(m/b), b)`` and ``right``
  ``(b * b, ceil(n/b))``, viewed as ``blocks_left`` ``(b, ceil(m/b), b)`` and
  ``blocks_right`` ``(b, b, ceil(n/b))`` (the estimator's ``blocks_left_`` /
  ``blocks_right_``);
- :class:`ButterflyLinear`: ``twiddle`` ``(n_butterflies * L, 2 N)``, converted by
  ``twiddles`` to ``(n_butterflies, L, N/2, 2, 2)`` (the estimator's ``twiddles_``).

Row ``g L + t`` of ``twiddle`` holds factor ``F_t`` of butterfly ``g`` as two length-``N``
vectors, ``[diag, partner]`` with ``F_t[i, i] = diag[i]`` and
``F_t[i, i ^ 2^t] = partner[i]``: a stage is then ``y = diag * x + partner * x[i ^ 2^t]``,
three element-wise operations. ``twiddles`` converts to the pair layout of
:func:`~sparsefact.structured.butterfly_matrix` (a differentiable copy).

Conv2d layers are not replaced by these families: ``compress_model`` writes the structured
approximation of a convolution's kernel into its dense weight (in place).

References
----------
.. [B19] T. Dao, A. Gu, M. Eichhorn, A. Rudra, C. Ré, "Learning Fast Algorithms for Linear
   Transforms Using Butterfly Factorizations", ICML 2019 (arXiv:1903.05895).
.. [M22] T. Dao, B. Chen, N. Sohoni, A. Desai, M. Poli, J. Grogan, A. Liu, A. Rao,
   A. Rudra, C. Ré, "Monarch: Expressive Structured Matrices for Efficient and Accurate
   Training", ICML 2022 (arXiv:2204.00595).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import nn

from ..structured import _monarch_layout, _next_power_of_two
from .modules import DTYPES, _FactorModule, _host, _LinearFactors

__all__ = ["ButterflyLinear", "MonarchLinear"]


# ---------------------------------------------------------------------------- helpers
def _as_tensor(value: Any, dtype: torch.dtype | None, device: Any) -> torch.Tensor:
    """A fitted array (NumPy, CuPy, torch) as a torch tensor; ``dtype=None`` keeps a float dtype."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(_host(value))))
    if dtype is None:
        dtype = t.dtype if t.dtype in DTYPES.values() else torch.get_default_dtype()
    return t.to(device=device, dtype=dtype).clone()


def _layer_bias(layer: nn.Module | None, dtype: torch.dtype, device: Any) -> torch.Tensor | None:
    bias = None if layer is None else getattr(layer, "bias", None)
    return None if bias is None else bias.detach().to(device=device, dtype=dtype).clone()


def _check_layer_shape(layer: nn.Module | None, out_features: int, in_features: int, what: str) -> None:
    if layer is None:
        return
    from .capture import layer_matrix

    want = tuple(layer_matrix(layer).shape)
    if want != (out_features, in_features):
        raise ValueError(f"the {what} was fitted to a {(out_features, in_features)} matrix, "
                         f"but the layer's matrix is {want}")


def _geometry_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int, got {value!r}")
    return int(value)


class _StructuredLinear(_LinearFactors):
    """Shared machinery: 2-D structured ``nn.Parameter``s, a trainable bias, config and init.

    A subclass defines ``_factor_names`` (its parameters), ``_config_keys``, ``_setup``
    (allocates all-zero parameters of the geometry), ``reset_parameters``,
    ``_apply_weight(x2)`` (``x2 (N, in) -> x2 Wᵀ (N, out)``) and ``n_parameters``.
    """

    _forced_layout = "dense"

    # -- parameters instead of buffers
    def _set_factor(self, name: str, W: torch.Tensor, layout: str | None = None) -> None:
        """Set parameter ``name`` to ``W`` (copied into the existing parameter when there is one).

        Copying in place keeps the parameter object, so an optimiser holding it keeps
        working after ``load_state_dict``. ``layout`` may only be ``"auto"`` / ``"dense"``.
        """
        if layout not in (None, "auto", "dense"):
            raise ValueError(f"{type(self).__name__} keeps its parameters dense, got layout={layout!r}")
        self.layouts[name] = "dense"
        W = W.detach()
        if W.layout is torch.sparse_csr:  # a file may store a factor with many zeros as CSR
            W = W.to_dense()
        current = self._parameters.get(name)
        if current is None:
            self.register_parameter(name, nn.Parameter(W.clone().contiguous()))
            return
        if tuple(W.shape) != tuple(current.shape):
            raise ValueError(f"{type(self).__name__}.{name} has shape {tuple(current.shape)}, "
                             f"got {tuple(W.shape)}")
        if W.data_ptr() != current.data_ptr():
            with torch.no_grad():
                current.copy_(W)

    def _set_bias(self, bias: Any, out: int, dtype: torch.dtype, device: Any) -> None:
        if bias is None or bias is False:
            self.register_parameter("bias", None)
            return
        if bias is True:
            b = torch.zeros(out, dtype=dtype, device=device)
        else:
            b = torch.as_tensor(bias).detach().to(device=device, dtype=dtype).reshape(-1)
            if b.numel() != out:
                raise ValueError(f"bias has {b.numel()} entries, expected {out}")
        self.register_parameter("bias", nn.Parameter(b.clone()))

    def __setattr__(self, name: str, value: Any) -> None:
        # ``module.bias = tensor`` (what load_compressed does) makes the tensor the bias
        # parameter instead of failing as it would on a plain parameter attribute.
        params = self.__dict__.get("_parameters")
        if (name == "bias" and params is not None and isinstance(params.get("bias"), nn.Parameter)
                and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)):
            value = nn.Parameter(value.detach(), requires_grad=params["bias"].requires_grad)
        super().__setattr__(name, value)

    @property
    def _dtype(self) -> torch.dtype:
        return getattr(self, self._factor_names[0]).dtype

    # -- the structure
    @property
    def n_parameters(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        """The structured parameter count :attr:`n_parameters` (the estimators' ``nnz_``)."""
        return self.n_parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + bias`` for ``x`` of shape ``(..., in_features)`` (``W`` never formed)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects {self.in_features} input features, "
                             f"got input of shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self._apply_weight(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _apply_weight(self, x2: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The dense weight ``W`` (``out_features x in_features``), differentiable.

        Formed by applying the structured product to the identity (for inspection and tests;
        the forward pass never calls it).
        """
        p = getattr(self, self._factor_names[0])
        eye = torch.eye(self.in_features, dtype=p.dtype, device=p.device)
        return self._apply_weight(eye).T

    # -- building
    @classmethod
    def from_layer(cls, layer: nn.Module, factors: Sequence[Any], *, layout: str = "auto") -> _FactorModule:
        """Not available: the dense factors of ``get_factors()`` do not carry the structure.

        Raises
        ------
        TypeError
            Always; use :meth:`from_estimator` with the fitted estimator.
        """
        raise TypeError(f"{cls.__name__} is built from the fitted estimator's structured parameters: "
                        f"use {cls.__name__}.from_estimator(layer, estimator)")

    @classmethod
    def from_estimator(cls, layer: nn.Module | None, est: Any, *, dtype: torch.dtype | None = None,
                       device: Any = None) -> _StructuredLinear:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_layer_estimator(cls, layer: nn.Module, estimator: Any) -> _StructuredLinear:
        """The install hook (:func:`~sparsefact.nn_adapters.install.build_module`): :meth:`from_estimator`."""
        return cls.from_estimator(layer, estimator)

    # -- save / load
    @classmethod
    def _empty(cls, geometry: Mapping[str, Any], bias: bool, dtype: torch.dtype | None,
               device: Any) -> _StructuredLinear:
        """An all-zero module of ``geometry`` (no random numbers drawn)."""
        module = cls.__new__(cls)
        _FactorModule.__init__(module, "dense")
        module._setup(**geometry, bias=bias, dtype=dtype, device=device)
        return module

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> _StructuredLinear:
        """An all-zero module of the geometry, dtype and bias flag in ``cfg`` (no random init).

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
        geometry = {key: int(cfg[key]) for key in cls._config_keys}
        return cls._empty(geometry, bool(cfg["bias"]), DTYPES[dtype_name], None)

    def _setup(self, **kwargs: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset_parameters(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _reset_bias(self) -> None:
        """The bias as ``nn.Linear`` initialises it: uniform on ``±1/sqrt(in_features)``."""
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)


# ---------------------------------------------------------------------------- Monarch
class MonarchLinear(_StructuredLinear):
    """``y = x Mᵀ + b`` with ``M = P_out L P_mid R`` a Monarch matrix (Dao et al. 2022), trainable.

    ``M`` (``out_features x in_features``) follows the convention of
    :class:`~sparsefact.structured.MonarchFactorization` [M22]_: with ``b = n_blocks``,
    ``R`` maps column group ``i`` of the input (``ceil(n/b)`` or ``floor(n/b)`` consecutive
    features, the first ``n % b`` groups the larger) to ``b`` values ``z[i, :]``,
    ``P_mid`` transposes the ``b x b`` grid, and ``L`` maps ``z[:, j]`` to the outputs
    ``j, j + b, j + 2b, ...``; entrywise
    ``M[r, k] = L[r mod b, r div b, g(k)] * R[g(k), r mod b, s(k)]``. For ``n = m = b^2``
    this is ``P L P^T R`` of the paper. The forward pass is two ``torch.bmm`` calls and a
    transpose, ``2 b (m + n)`` multiply-adds per sample; ``M`` is never formed.

    Parameters
    ----------
    in_features, out_features : int
        ``n`` and ``m``.
    n_blocks : int
        ``b``, the number of diagonal blocks of each factor, ``1 <= b <= min(m, n)``.
    bias : bool, default=True
    dtype, device : torch dtype and device of the parameters.

    Attributes
    ----------
    left : nn.Parameter of shape (b * ceil(m / b), b)
        ``L``; :attr:`blocks_left` is its ``(b, ceil(m/b), b)`` view (``L[j]``, rows beyond
        block ``j``'s outputs are zero padding).
    right : nn.Parameter of shape (b * b, ceil(n / b))
        ``R``; :attr:`blocks_right` is its ``(b, b, ceil(n/b))`` view (``R[i]``, columns
        beyond group ``i``'s size are zero padding).
    bias : nn.Parameter of shape (out_features,) or None
    n_parameters : int
        ``b (m + n)``, the estimator's ``nnz_`` (padding not counted); also ``nnz``.

    Notes
    -----
    Initialisation (:meth:`reset_parameters`): ``R`` uniform on ``±sqrt(b/n)`` and ``L``
    uniform on ``±sqrt(3/b)`` (padding zero), so that for inputs of unit variance each
    output has variance ``1/3``, as with ``nn.Linear``'s default initialisation; the bias
    as ``nn.Linear``'s.

    References
    ----------
    .. [M22] T. Dao, B. Chen, N. Sohoni, A. Desai, M. Poli, J. Grogan, A. Liu, A. Rao,
       A. Rudra, C. Ré, "Monarch: Expressive Structured Matrices for Efficient and
       Accurate Training", ICML 2022.

    Examples
    --------
    >>> import torch
    >>> layer = MonarchLinear(64, 48, n_blocks=4)
    >>> layer.n_parameters, tuple(layer.blocks_left.shape), tuple(layer.blocks_right.shape)
    (448, (4, 12, 4), (4, 4, 16))
    >>> x = torch.randn(5, 64)
    >>> bool(torch.allclose(layer(x), x @ layer.to_dense().T + layer.bias, atol=1e-5))
    True
    """

    _factor_names = ("left", "right")
    _config_keys = ("in_features", "out_features", "n_blocks")

    def __init__(self, in_features: int, out_features: int, n_blocks: int, bias: bool = True, *,
                 dtype: torch.dtype | None = None, device: Any = None) -> None:
        _FactorModule.__init__(self, "dense")
        self._setup(in_features, out_features, n_blocks, bias=bias, dtype=dtype, device=device)
        self.reset_parameters()

    def _setup(self, in_features: int, out_features: int, n_blocks: int, *, bias: bool,
               dtype: torch.dtype | None, device: Any) -> None:
        n = _geometry_int(in_features, "in_features")
        m = _geometry_int(out_features, "out_features")
        b = _geometry_int(n_blocks, "n_blocks")
        if n < 1 or m < 1:
            raise ValueError(f"in_features and out_features must be positive, got {n} and {m}")
        if not 1 <= b <= min(m, n):
            raise ValueError(f"n_blocks must be in [1, min(in_features, out_features)] = [1, {min(m, n)}], "
                             f"got {b}")
        self.in_features, self.out_features, self.n_blocks = n, m, b
        P, c, col_index = _monarch_layout(m, n, b)
        self._rows_per_block, self._group_width = P, c
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        self._set_factor("left", torch.zeros((b * P, b), dtype=dtype, device=device))
        self._set_factor("right", torch.zeros((b * b, c), dtype=dtype, device=device))
        self._set_bias(bool(bias), m, dtype, self.left.device)
        flat = torch.from_numpy(col_index.reshape(-1).astype(np.int64))
        # the column map of ragged groups (padding -> the zero column n); None when n = b c
        self.register_buffer("_col_index", None if n == b * c else flat.to(self.left.device),
                             persistent=False)
        # padding masks (1 on real entries): rows ss b + j >= m of L, columns beyond the group size of R
        rows = torch.arange(P)[None, :] * b + torch.arange(b)[:, None]  # (j, ss) -> output row
        self.register_buffer("_left_mask", (rows < m).to(dtype).reshape(b, P, 1).expand(b, P, b)
                             .reshape(b * P, b).to(self.left.device), persistent=False)
        valid = torch.from_numpy(col_index < n).to(dtype)  # (i, s)
        self.register_buffer("_right_mask", valid[:, None, :].expand(b, b, c).reshape(b * b, c)
                             .to(self.left.device), persistent=False)

    def reset_parameters(self) -> None:
        """Uniform initialisation matching ``nn.Linear``'s output variance (see Notes); padding zero."""
        b, n = self.n_blocks, self.in_features
        with torch.no_grad():
            self.right.uniform_(-math.sqrt(b / n), math.sqrt(b / n)).mul_(self._right_mask)
            self.left.uniform_(-math.sqrt(3.0 / b), math.sqrt(3.0 / b)).mul_(self._left_mask)
        self._reset_bias()

    @property
    def blocks_left(self) -> torch.Tensor:
        """``L`` as ``(b, ceil(m/b), b)`` (a view of :attr:`left`; the estimator's ``blocks_left_``)."""
        return self.left.view(self.n_blocks, self._rows_per_block, self.n_blocks)

    @property
    def blocks_right(self) -> torch.Tensor:
        """``R`` as ``(b, b, ceil(n/b))`` (a view of :attr:`right`; the estimator's ``blocks_right_``)."""
        return self.right.view(self.n_blocks, self.n_blocks, self._group_width)

    @property
    def n_parameters(self) -> int:
        """``n_blocks * (in_features + out_features)``: the free parameters (padding not counted)."""
        return self.n_blocks * (self.in_features + self.out_features)

    def _apply_weight(self, x2: torch.Tensor) -> torch.Tensor:
        N = x2.shape[0]
        b, c = self.n_blocks, self._group_width
        if self._col_index is None:
            groups = x2.reshape(N, b, c)
        else:
            groups = F.pad(x2, (0, 1)).index_select(1, self._col_index).reshape(N, b, c)
        z = torch.bmm(self.blocks_right, groups.permute(1, 2, 0))  # (i, j, N)
        y = torch.bmm(self.blocks_left, z.transpose(0, 1))  # (j, ss, N)
        y = y.permute(2, 1, 0).reshape(N, self._rows_per_block * b)  # column ss b + j
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]

    @classmethod
    def from_estimator(cls, layer: nn.Module | None, est: Any, *, dtype: torch.dtype | None = None,
                       device: Any = None) -> MonarchLinear:
        """The module of a fitted :class:`~sparsefact.structured.MonarchFactorization` and ``layer``'s bias.

        Parameters
        ----------
        layer : nn.Module or None
            The dense layer the estimator was fitted to (``nn.Linear`` or transformers
            ``Conv1D``): its matrix shape is checked and its bias copied. ``None``: no bias.
        est : fitted MonarchFactorization
            Its ``blocks_left_`` and ``blocks_right_`` are copied exactly (in ``dtype``).
        dtype : torch dtype, optional
            Default: the dtype of the fitted blocks (float16/32/64), else torch's default.
        device : torch device, optional

        Returns
        -------
        MonarchLinear
            ``module(x) == x @ est.reconstruct().T + bias`` up to rounding.
        """
        if not (hasattr(est, "blocks_left_") and hasattr(est, "blocks_right_")):
            raise ValueError(f"{type(est).__name__} is not a fitted MonarchFactorization "
                             "(no blocks_left_/blocks_right_)")
        Lt = _as_tensor(est.blocks_left_, dtype, device)
        Rt = _as_tensor(est.blocks_right_, Lt.dtype, Lt.device)
        m, n = int(est._n_outputs), int(est.n_features_in_)
        _check_layer_shape(layer, m, n, "MonarchFactorization")
        b = int(Lt.shape[0])
        bias = _layer_bias(layer, Lt.dtype, Lt.device)
        module = cls._empty({"in_features": n, "out_features": m, "n_blocks": b}, bias is not None,
                            Lt.dtype, Lt.device)
        want_l, want_r = tuple(module.blocks_left.shape), tuple(module.blocks_right.shape)
        if tuple(Lt.shape) != want_l or tuple(Rt.shape) != want_r:
            raise ValueError(f"blocks of shapes {tuple(Lt.shape)} and {tuple(Rt.shape)} do not make a "
                             f"({m}, {n}) Monarch matrix with {b} blocks: expected {want_l} and {want_r}")
        module._set_factor("left", Lt.reshape(module.left.shape))
        module._set_factor("right", Rt.reshape(module.right.shape))
        if bias is not None:
            module._set_bias(bias, m, Lt.dtype, Lt.device)
        return module

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, n_blocks={self.n_blocks}"


# ---------------------------------------------------------------------------- butterfly
def _twiddles_to_coefficients(tw: torch.Tensor) -> torch.Tensor:
    """Pair-layout twiddles ``(G, L, N/2, 2, 2)`` -> ``(G, L, 2, N)`` ``[diag, partner]`` per factor."""
    G, L, half = tw.shape[:3]
    N = 2 * half
    rows = []
    for t in range(L):
        s = 1 << t
        T = tw[:, t].reshape(G, N // (2 * s), s, 2, 2)
        diag = torch.stack([T[..., 0, 0], T[..., 1, 1]], dim=2).reshape(G, N)  # (G, h, 2, s) order
        partner = torch.stack([T[..., 0, 1], T[..., 1, 0]], dim=2).reshape(G, N)
        rows.append(torch.stack([diag, partner], dim=1))
    return torch.stack(rows, dim=1)


def _coefficients_to_twiddles(coef: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_twiddles_to_coefficients`: ``(G, L, 2, N)`` -> ``(G, L, N/2, 2, 2)``."""
    G, L, _, N = coef.shape
    out = []
    for t in range(L):
        s = 1 << t
        h = N // (2 * s)
        diag = coef[:, t, 0].reshape(G, h, 2, s)
        partner = coef[:, t, 1].reshape(G, h, 2, s)
        row0 = torch.stack([diag[:, :, 0], partner[:, :, 0]], dim=-1)  # F[i0, i0], F[i0, i1]: (G, h, s, 2)
        row1 = torch.stack([partner[:, :, 1], diag[:, :, 1]], dim=-1)  # F[i1, i0], F[i1, i1]
        out.append(torch.stack([row0, row1], dim=-2).reshape(G, N // 2, 2, 2))
    return torch.stack(out, dim=1)


class ButterflyLinear(_StructuredLinear):
    """``y = x Bᵀ + b`` with ``B`` a grid of butterfly matrices (Dao et al. 2019), trainable.

    A butterfly of size ``N = 2^L`` [B19]_ is ``F_{L-1} ... F_1 F_0``, where factor
    ``F_t`` mixes every index pair ``(i, i ^ 2^t)`` through a free 2x2 block (two nonzeros
    per row); ``F_0`` (stride 1) is applied first. ``B`` (``out_features x in_features``)
    follows :class:`~sparsefact.structured.ButterflyFactorization`: a grid of
    ``ceil(m/N) x ceil(n/N)`` butterflies, butterfly ``g`` acting on input block
    ``g % cols`` and adding into output block ``g // cols``, the input zero-padded to a
    multiple of ``N`` and the output cropped to ``m``. The forward pass applies the
    ``log2 N`` stages (each ``y = diag * x + partner * x[i ^ 2^t]``, element-wise), never
    forming ``B``: ``4 N log2 N`` multiply-adds per butterfly and sample.

    Parameters
    ----------
    in_features, out_features : int
        ``n`` and ``m``.
    block_size : int or None, default=None
        Butterfly size ``N``, a power of two ``>= 2``; ``None``: ``next_pow2(min(m, n))``
        (the estimator's default), so a square power-of-two layer is one butterfly and a
        classification head ``(n, classes)`` a row of ``ceil(n/N)`` butterflies of size
        ``next_pow2(classes)``.
    bias : bool, default=True
    dtype, device : torch dtype and device of the parameters.

    Attributes
    ----------
    twiddle : nn.Parameter of shape (n_butterflies * log2(N), 2 N)
        Row ``g L + t`` is factor ``t`` of butterfly ``g`` as ``[diag (N), partner (N)]``
        (``F_t[i, i] = diag[i]``, ``F_t[i, i ^ 2^t] = partner[i]``); :attr:`twiddles` is the
        estimator's pair layout ``(n_butterflies, log2 N, N/2, 2, 2)``.
    bias : nn.Parameter of shape (out_features,) or None
    block_size : int
    grid_shape : tuple (rows, cols)
    n_butterflies : int
    n_parameters : int
        ``n_butterflies * 2 N log2 N``, the estimator's ``nnz_``; also ``nnz``.

    Notes
    -----
    Initialisation (:meth:`reset_parameters`): every 2x2 block is a random rotation or
    reflection (angle uniform on ``[0, 2 pi)``, the ``"ortho"`` initialisation of Dao et
    al.'s ``torch_butterfly``) times ``sigma = (N / (3 n))^(1 / (2 log2 N))``, so every
    butterfly is ``sigma^{log2 N}`` times an orthogonal matrix and, for inputs of unit
    variance, each output has variance ``n sigma^{2 log2 N} / N = 1/3`` in expectation --
    exactly, when ``n`` is a multiple of ``N`` -- as with ``nn.Linear``'s default
    initialisation. (Independent twiddles of the same variance match it only on average:
    the output scale was measured to vary by a factor of 2 between seeds, because all rows
    share the late factors.) The bias as ``nn.Linear``'s.

    References
    ----------
    .. [B19] T. Dao, A. Gu, M. Eichhorn, A. Rudra, C. Ré, "Learning Fast Algorithms for
       Linear Transforms Using Butterfly Factorizations", ICML 2019.

    Examples
    --------
    >>> import torch
    >>> head = ButterflyLinear(512, 10)
    >>> head.block_size, head.grid_shape, head.n_parameters
    (16, (1, 32), 4096)
    >>> x = torch.randn(3, 512)
    >>> bool(torch.allclose(head(x), x @ head.to_dense().T + head.bias, atol=1e-5))
    True
    """

    _factor_names = ("twiddle",)
    _config_keys = ("in_features", "out_features", "block_size")

    def __init__(self, in_features: int, out_features: int, block_size: int | None = None, bias: bool = True,
                 *, dtype: torch.dtype | None = None, device: Any = None) -> None:
        _FactorModule.__init__(self, "dense")
        self._setup(in_features, out_features, block_size, bias=bias, dtype=dtype, device=device)
        self.reset_parameters()

    def _setup(self, in_features: int, out_features: int, block_size: int | None, *, bias: bool,
               dtype: torch.dtype | None, device: Any) -> None:
        n = _geometry_int(in_features, "in_features")
        m = _geometry_int(out_features, "out_features")
        if n < 1 or m < 1:
            raise ValueError(f"in_features and out_features must be positive, got {n} and {m}")
        N = _next_power_of_two(min(m, n)) if block_size is None else _geometry_int(block_size, "block_size")
        if N < 2 or N & (N - 1):
            raise ValueError(f"block_size must be a power of two (2, 4, 8, ...), got {N}")
        self.in_features, self.out_features, self.block_size = n, m, N
        self.grid_shape = (-(-m // N), -(-n // N))
        self.n_butterflies = self.grid_shape[0] * self.grid_shape[1]
        self.n_stages = int(math.log2(N))
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        self._set_factor("twiddle", torch.zeros((self.n_butterflies * self.n_stages, 2 * N), dtype=dtype,
                                                device=device))
        self._set_bias(bool(bias), m, dtype, self.twiddle.device)

    def reset_parameters(self) -> None:
        """Random orthogonal 2x2 blocks, scaled to ``nn.Linear``'s output variance (see Notes)."""
        G, L, N = self.n_butterflies, self.n_stages, self.block_size
        shape = (G, L, N // 2)
        theta = torch.rand(shape, dtype=torch.float64) * (2.0 * math.pi)
        c, s = torch.cos(theta), torch.sin(theta)
        det = torch.randint(0, 2, shape, dtype=torch.float64) * 2.0 - 1.0  # rotation or reflection
        blocks = torch.stack([torch.stack([det * c, -det * s], dim=-1), torch.stack([s, c], dim=-1)], dim=-2)
        scale = (N / (3.0 * self.in_features)) ** (1.0 / (2.0 * L))
        coef = _twiddles_to_coefficients(blocks * scale).reshape(self.twiddle.shape)
        with torch.no_grad():
            self.twiddle.copy_(coef)
        self._reset_bias()

    @property
    def coefficients(self) -> torch.Tensor:
        """:attr:`twiddle` as ``(G, log2 N, 2, N)``, a view: ``[..., 0, :]`` diag, ``[..., 1, :]`` partner."""
        return self.twiddle.view(self.n_butterflies, self.n_stages, 2, self.block_size)

    @property
    def twiddles(self) -> torch.Tensor:
        """The twiddles in the estimator's pair layout ``(n_butterflies, log2 N, N/2, 2, 2)``.

        ``twiddles[g, t, p, a, b] = F_t[i_a, i_b]`` for the pair ``i_0 < i_1 = i_0 + 2^t`` with
        ``p = (i_0 >> (t+1)) 2^t + (i_0 mod 2^t)`` (as ``ButterflyFactorization.twiddles_``);
        a differentiable copy of :attr:`twiddle`, not a view.
        """
        return _coefficients_to_twiddles(self.coefficients)

    @property
    def n_parameters(self) -> int:
        """``n_butterflies * 2 N log2 N``: every stored twiddle (padding included, as ``nnz_``)."""
        return self.twiddle.numel()

    def _apply_weight(self, x2: torch.Tensor) -> torch.Tensor:
        rows, cols = self.grid_shape
        N, G = self.block_size, self.n_butterflies
        batch = x2.shape[0]
        if cols * N != self.in_features:
            x2 = F.pad(x2, (0, cols * N - self.in_features))
        y = x2.reshape(batch, 1, cols, N)
        if rows > 1:
            y = y.expand(batch, rows, cols, N)
        y = y.reshape(batch, G, N)
        coef = self.coefficients
        for t in range(self.n_stages):
            s = 1 << t
            h = N // (2 * s)
            diag = coef[:, t, 0].view(G, h, 2, s)
            partner = coef[:, t, 1].view(G, h, 2, s)
            pairs = y.view(batch, G, h, 2, s)
            # the partner of every index (swap the two halves of each pair); cat measured
            # faster than flip on the CPU
            swapped = torch.cat([pairs[:, :, :, 1:], pairs[:, :, :, :1]], dim=3)
            y = torch.addcmul(pairs * diag, swapped, partner).view(batch, G, N)
        if cols > 1:
            y = y.view(batch, rows, cols, N).sum(dim=2)
        y = y.reshape(batch, rows * N)
        return y if rows * N == self.out_features else y[:, : self.out_features]

    @classmethod
    def from_estimator(cls, layer: nn.Module | None, est: Any, *, dtype: torch.dtype | None = None,
                       device: Any = None) -> ButterflyLinear:
        """The module of a fitted :class:`~sparsefact.structured.ButterflyFactorization` and ``layer``'s bias.

        Parameters
        ----------
        layer : nn.Module or None
            The dense layer the estimator was fitted to (``nn.Linear`` or transformers
            ``Conv1D``): its matrix shape is checked and its bias copied. ``None``: no bias.
        est : fitted ButterflyFactorization
            Its ``twiddles_``, ``block_size_`` and ``grid_shape_`` are copied exactly (the
            twiddles re-laid out, in ``dtype``).
        dtype : torch dtype, optional
            Default: the dtype of the fitted twiddles (float16/32/64), else torch's default.
        device : torch device, optional

        Returns
        -------
        ButterflyLinear
            ``module(x) == x @ est.reconstruct().T + bias`` up to rounding.
        """
        if not hasattr(est, "twiddles_"):
            raise ValueError(f"{type(est).__name__} is not a fitted ButterflyFactorization (no twiddles_)")
        tw = _as_tensor(est.twiddles_, dtype, device)
        m, n = int(est._n_outputs), int(est.n_features_in_)
        _check_layer_shape(layer, m, n, "ButterflyFactorization")
        bias = _layer_bias(layer, tw.dtype, tw.device)
        module = cls._empty({"in_features": n, "out_features": m, "block_size": int(est.block_size_)},
                            bias is not None, tw.dtype, tw.device)
        want = (module.n_butterflies, module.n_stages, module.block_size // 2, 2, 2)
        if tuple(tw.shape) != want or tuple(est.grid_shape_) != module.grid_shape:
            raise ValueError(f"twiddles of shape {tuple(tw.shape)} (grid {tuple(est.grid_shape_)}) do not "
                             f"make a ({m}, {n}) butterfly grid of size {module.block_size}: expected {want}")
        module._set_factor("twiddle", _twiddles_to_coefficients(tw).reshape(module.twiddle.shape))
        if bias is not None:
            module._set_bias(bias, m, tw.dtype, tw.device)
        return module

    def _shape_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, grid_shape={self.grid_shape}")
