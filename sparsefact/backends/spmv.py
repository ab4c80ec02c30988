"""Sparse matrix times a few vectors on the CPU: the small-batch forward of the sparse torch modules.

The torch modules (:mod:`sparsefact.nn_adapters.modules`) multiply by one sparse factor
(``y = W x``) or by a chain of two (``y = A (B x)``). torch's CPU CSR kernel is 2-6x slower than a
dense matrix-vector product at the densities these factors have (0.1-0.5), and the dense kernel
reads every zero. This module packs a factor once into a compact format and multiplies it by a
block of at most :data:`MAX_COLUMNS` vectors with Numba kernels; everything here works on NumPy
arrays (torch CPU tensors convert without copies, see the modules).

Format (:class:`SellMatrix`): SELL-8 ("sliced ELLPACK"). The rows, sorted by decreasing number
of nonzeros (``perm``), are cut into slices of 8; a slice is stored column-of-the-slice major --
entry ``j`` of the 8 rows of slice ``s`` at ``sptr[s] + 8 j + lane`` -- and padded to its longest
row with value 0 and column index ``n_cols``, which points at a zero that every input carries
past its end (so a padding entry adds ``0 * 0`` even where the input holds an infinity or a
NaN). Column indices are ``uint16`` when ``n_cols < 65536``, else ``uint32``; values float32 or
float64. Bytes per nonzero: 6 (float32) or 10 (float64), plus the padding.

Kernels (serial, compiled on first use, cached on disk; ``fastmath`` off):

- one vector (:func:`_mv1`): each slice keeps its 8 row sums in one SIMD register; per step it
  loads 8 values, assembles the 8 inputs ``x[col]`` with scalar loads (4 column indices come in
  one 64-bit load) and adds their products. Each row is summed left to right over its nonzeros,
  the same order as a serial CSR loop. Hardware gathers (AVX2 ``vgatherdps``) were measured
  slower than the scalar assembly on the AMD EPYC (Zen 3) development machine, and Numba's plain
  loops (no vectorisation without reassociation, wrap-around checks on signed indices) 2-3x
  slower than this.
- 2 to 8 vectors (:func:`_mvb`): the inputs as rows of ``W`` lanes (``W`` = 4 or 8, zero
  padded); each nonzero multiplies one input row (a SIMD register) by its broadcast value into
  one of 8 accumulators, so the matrix is read once for all the vectors.

Threads: none. A parallel loop (``prange``) was not measured: during this work both cores of the
2-core development machine were busy with other jobs, where a second thread only waits for a
core. A product takes 20-300 µs, of the order of a thread pool's wake-up on a loaded machine;
a caller that wants parallelism runs several products at once.

Measured on that machine (AMD EPYC Zen 3, AVX2, one thread; prototypes, float32, batch 1,
1536x384 at density 0.3): this kernel 80 µs; a CSR loop with 4 accumulators and unsigned
indices 88-130 µs, with signed indices (Numba's wrap-around checks) 206 µs; SELL-8 with AVX2
hardware gathers 143 µs; ``nn.Linear`` 70-107 µs in the same runs (load 2-3 from other jobs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types, uintp
from numba.extending import intrinsic, models, register_model

__all__ = [
    "LANES",
    "MAX_COLUMNS",
    "SellChain",
    "SellMatrix",
    "chain_matmul",
    "pack_csr",
    "pack_dense",
    "supported_dtype",
]

#: rows per slice (and SIMD lanes of the one-vector kernel).
LANES = 8
#: most vectors (columns of ``x``) one kernel call takes; more go through several calls.
MAX_COLUMNS = 8
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class SellMatrix(NamedTuple):
    """A matrix packed for :func:`chain_matmul` (SELL-8, see the module docstring).

    Attributes
    ----------
    sptr : int64 array (n_slices + 1,)
        Start of each slice in ``cols`` / ``vals``.
    slen : int64 array (n_slices,)
        Entries per row of each slice (its longest row).
    perm : int64 array (n_slices * 8,)
        Row of the matrix that each slice lane holds (lanes past the last row hold row 0 and
        are not written).
    cols : uint16 or uint32 array
        Column indices; padding entries hold ``n_cols``.
    vals : float32 or float64 array
        Values; padding entries hold 0.
    shape : tuple of int
        ``(n_rows, n_cols)``.
    nnz : int
        Stored nonzeros (without padding).
    """

    sptr: np.ndarray
    slen: np.ndarray
    perm: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    shape: tuple[int, int]
    nnz: int

    @property
    def nbytes(self) -> int:
        """Bytes a product reads from the packed matrix (values, indices, slice tables)."""
        return int(self.cols.nbytes + self.vals.nbytes + self.sptr.nbytes + self.slen.nbytes
                   + self.perm.nbytes)


def supported_dtype(dtype: Any) -> bool:
    """Whether the kernels run in ``dtype`` (float32 and float64)."""
    try:
        return np.dtype(dtype) in _DTYPES
    except TypeError:
        return False


def pack_csr(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
             shape: tuple[int, int]) -> SellMatrix:
    """Pack a CSR matrix (canonical or not; explicit zeros are kept as entries) into SELL-8.

    Parameters
    ----------
    indptr, indices, data : arrays
        The CSR arrays (any integer types); ``data`` float32 or float64.
    shape : (n_rows, n_cols)

    Returns
    -------
    SellMatrix
    """
    n_rows, n_cols = int(shape[0]), int(shape[1])
    data = np.asarray(data)
    if not supported_dtype(data.dtype):
        raise TypeError(f"values must be float32 or float64, got {data.dtype}")
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    if indptr.shape != (n_rows + 1,):
        raise ValueError(f"indptr has shape {indptr.shape}, expected ({n_rows + 1},)")
    nnz = int(indptr[-1]) if n_rows else 0
    lens = np.diff(indptr)
    n_slices = -(-n_rows // LANES)
    order = np.argsort(-lens, kind="stable")
    perm = np.zeros(n_slices * LANES, np.int64)
    perm[:n_rows] = order
    lane_len = np.zeros(n_slices * LANES, np.int64)
    lane_len[:n_rows] = lens[order]
    slen = lane_len.reshape(n_slices, LANES).max(axis=1) if n_slices else np.zeros(0, np.int64)
    sptr = np.zeros(n_slices + 1, np.int64)
    np.cumsum(slen * LANES, out=sptr[1:])
    total = int(sptr[-1])
    col_dtype = np.uint16 if n_cols < 2**16 else np.uint32
    cols = np.full(total, n_cols, col_dtype)
    vals = np.zeros(total, data.dtype)
    if nnz:
        # position of every nonzero: slice start + 8 * (its place in the row) + lane
        slot = np.empty(n_rows, np.int64)
        slot[order] = np.arange(n_rows)
        row_of = np.repeat(np.arange(n_rows), lens)
        k = np.arange(nnz) - indptr[row_of]
        s = slot[row_of]
        dest = sptr[s // LANES] + LANES * k + s % LANES
        cols[dest] = indices[:nnz]
        vals[dest] = data[:nnz]
    return SellMatrix(sptr, slen, perm, cols, vals, (n_rows, n_cols), nnz)


def pack_dense(W: np.ndarray) -> SellMatrix:
    """Pack the nonzeros of a dense 2-D float32/float64 array into SELL-8."""
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {W.shape}")
    rows, cols = np.nonzero(W)
    indptr = np.zeros(W.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=W.shape[0]), out=indptr[1:])
    return pack_csr(indptr, cols, W[rows, cols], W.shape)


class SellChain:
    """``x (N, in) -> (N, out)``: ``x`` through packed factors applied right to left as ``x Wᵀ``, plus a bias.

    Parameters
    ----------
    factors : sequence of SellMatrix
        One or two factors in product order (``W = factors[0] @ factors[1]``), all of one dtype.
    bias : array (out,) or None
        Kept by reference (not copied): a bias updated in place is seen by later calls.

    Calling the chain on ``x`` (2-D, the factors' dtype, any strides) returns a new C-contiguous
    array; each row of each product is summed in the order of its nonzeros, the bias added last.
    ``N`` above :data:`MAX_COLUMNS` runs in blocks of at most that many rows.

    Raises
    ------
    ValueError
        Shapes that do not chain, more than two factors, factors of different dtypes or a bias
        of the wrong shape or dtype.
    """

    def __init__(self, factors: Sequence[SellMatrix], bias: np.ndarray | None = None) -> None:
        factors = tuple(factors)
        if not 1 <= len(factors) <= 2:
            raise ValueError(f"a chain takes one or two factors, got {len(factors)}")
        dtype = factors[0].vals.dtype
        for left, right in zip(factors[:-1], factors[1:], strict=True):
            if left.shape[1] != right.shape[0]:
                raise ValueError(f"factors of shapes {left.shape} and {right.shape} do not chain")
        if any(M.vals.dtype != dtype for M in factors):
            raise ValueError("all factors must have one dtype")
        self.dtype = dtype
        self.in_features = int(factors[-1].shape[1])
        self.out_features = int(factors[0].shape[0])
        self.factors = factors
        if bias is None:
            bias = np.zeros(0, dtype)
        elif bias.shape != (self.out_features,) or bias.dtype != dtype or not bias.flags.c_contiguous:
            raise ValueError(f"bias must be a contiguous ({self.out_features},) {dtype} array")
        self.bias = bias
        args: list[Any] = []
        for M in factors:
            args += [M.sptr, M.slen, M.perm, M.cols, M.vals, int(M.shape[0])]
        self._args = tuple(args)
        self._mv = _one_mv if len(factors) == 1 else _two_mv
        self._mm = _one_mm if len(factors) == 1 else _two_mm

    @property
    def nbytes(self) -> int:
        """Bytes one product reads from the packed factors (see :attr:`SellMatrix.nbytes`)."""
        return sum(M.nbytes for M in self.factors)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if x.ndim != 2 or x.shape[1] != self.in_features or (x.dtype is not self.dtype
                                                             and x.dtype != self.dtype):
            raise ValueError(f"expected x of shape (N, {self.in_features}) and dtype {self.dtype}, "
                             f"got {x.shape} {x.dtype}")
        if not x.flags.c_contiguous:  # (one compiled layout: half the compilation time)
            x = np.ascontiguousarray(x)
        if n == 1:
            return self._mv(*self._args, x[0], self.bias)[None, :]
        if n <= MAX_COLUMNS:
            return self._mm(*self._args, x, self.bias, _MARKERS[4 if n <= 4 else 8])
        out = np.empty((n, self.out_features), self.dtype)
        for start in range(0, n, MAX_COLUMNS):
            stop = min(n, start + MAX_COLUMNS)
            out[start:stop] = self(x[start:stop])
        return out


def chain_matmul(factors: Sequence[SellMatrix], x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``SellChain(factors, bias)(x)``: ``x (N, in)`` through ``factors`` as ``x Wᵀ + bias``."""
    x = np.asarray(x)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=x.dtype)
    return SellChain(factors, b)(x)


#: SIMD width of the many-vector kernel -> the tuple whose length passes it to Numba as a type (a
#: 2-wide kernel would cost what the 4-wide one costs: the vector units are 256 bits wide).
_MARKERS = {4: (0, 0, 0, 0), 8: (0,) * 8}


# ---------------------------------------------------------------------------- SIMD values in Numba
class _Vec(types.Type):
    """A Numba value held as an LLVM vector ``<width x dtype>`` (only inside the kernels)."""

    def __init__(self, dtype: types.Type, width: int) -> None:
        self.dtype, self.width = dtype, int(width)
        super().__init__(name=f"SparsefactVec({dtype}x{width})")


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        elem = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(elem, fe_type.width))


def _element_ptr(context, builder, arrty, arr, index):
    return builder.gep(context.make_array(arrty)(context, builder, arr).data, [index])


def _width_of(marker: types.Type) -> int:
    return LANES if marker is None else marker.count


@intrinsic
def _vzero(typingctx, arr, marker):
    """A zero vector of ``arr``'s dtype, ``len(marker)`` lanes (8 for ``None``)."""
    vt = _Vec(arr.dtype, _width_of(None if isinstance(marker, types.NoneType) else marker))

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), None)

    return vt(arr, marker), codegen


@intrinsic
def _vload8(typingctx, arr, q):
    """``arr[q:q+8]`` as a vector (unaligned load)."""
    vt = _Vec(arr.dtype, LANES)

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        vty = context.get_value_type(vt)
        return builder.load(builder.bitcast(p, vty.as_pointer()), align=1)

    return vt(arr, q), codegen


@intrinsic
def _vassemble8(typingctx, x, cols, q):
    """``x[cols[q:q+8]]`` as a vector: scalar loads, the indices read 64 bits at a time."""
    vt = _Vec(x.dtype, LANES)

    def codegen(context, builder, sig, args):
        xty, cty, _ = sig.args
        bits = cty.dtype.bitwidth
        i64 = ir.IntType(64)
        per_word = 64 // bits
        words = builder.bitcast(_element_ptr(context, builder, cty, args[1], args[2]), i64.as_pointer())
        base = context.make_array(xty)(context, builder, args[0]).data
        out = ir.Constant(context.get_value_type(vt), None)
        word = None
        for lane in range(LANES):
            w, t = divmod(lane, per_word)
            if t == 0:
                word = builder.load(builder.gep(words, [ir.Constant(i64, w)]), align=1)
            idx = builder.lshr(word, ir.Constant(i64, t * bits)) if t else word
            if t != per_word - 1:
                idx = builder.and_(idx, ir.Constant(i64, (1 << bits) - 1))
            val = builder.load(builder.gep(base, [idx]))
            out = builder.insert_element(out, val, ir.Constant(ir.IntType(32), lane))
        return out

    return vt(x, cols, q), codegen


@intrinsic
def _vrow(typingctx, xt, row, marker):
    """Row ``row`` of the C-contiguous (rows, width) array ``xt`` as a vector of ``width`` lanes."""
    vt = _Vec(xt.dtype, marker.count)

    def codegen(context, builder, sig, args):
        width = ir.Constant(ir.IntType(64), marker.count)
        start = builder.mul(builder.zext(args[1], ir.IntType(64)) if args[1].type.width < 64 else args[1],
                            width)
        p = _element_ptr(context, builder, sig.args[0], args[0], start)
        vty = context.get_value_type(vt)
        return builder.load(builder.bitcast(p, vty.as_pointer()), align=1)

    return vt(xt, row, marker), codegen


@intrinsic
def _vsplat(typingctx, arr, q, marker):
    """``arr[q]`` in every one of ``len(marker)`` lanes."""
    vt = _Vec(arr.dtype, marker.count)

    def codegen(context, builder, sig, args):
        value = builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1]))
        vty = context.get_value_type(vt)
        one = builder.insert_element(ir.Constant(vty, None), value, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), vt.width),
                                                            [0] * vt.width))

    return vt(arr, q, marker), codegen


@intrinsic
def _vmuladd(typingctx, acc, a, b):
    """``acc + a * b`` lane by lane (a multiply, then an add: no fused rounding)."""

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], builder.fmul(args[1], args[2]))

    return acc(acc, a, b), codegen


@intrinsic
def _vlane(typingctx, v, i):
    """Lane ``i`` of ``v``."""

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], args[1])

    return v.dtype(v, i), codegen


@intrinsic
def _vstore_row(typingctx, out, row, v):
    """``out[row, :] = v`` for a C-contiguous (rows, width) ``out``."""

    def codegen(context, builder, sig, args):
        width = ir.Constant(ir.IntType(64), sig.args[2].width)
        row64 = args[1] if args[1].type.width == 64 else builder.zext(args[1], ir.IntType(64))
        p = _element_ptr(context, builder, sig.args[0], args[0], builder.mul(row64, width))
        builder.store(args[2], builder.bitcast(p, args[2].type.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(out, row, v), codegen


# ---------------------------------------------------------------------------- kernels
@njit(cache=True, fastmath=False)
def _mv1(sptr, slen, perm, cols, vals, n_rows, x, y, bias):
    """``y[perm] = W x (+ bias)`` for one padded input vector ``x`` (``x[n_cols] == 0``)."""
    has_bias = bias.size > 0
    for s in range(slen.size):
        base = uintp(sptr[s])
        acc = _vzero(vals, None)
        for j in range(uintp(slen[s])):
            q = base + j * uintp(8)
            acc = _vmuladd(acc, _vload8(vals, q), _vassemble8(x, cols, q))
        r0 = s * 8
        for lane in range(min(8, n_rows - r0)):
            r = perm[r0 + lane]
            if has_bias:
                y[r] = _vlane(acc, lane) + bias[r]
            else:
                y[r] = _vlane(acc, lane)


@njit(cache=True, fastmath=False)
def _mvb(sptr, slen, perm, cols, vals, n_rows, xt, yt, marker):
    """``yt[perm] = W xt`` for ``xt`` (n_cols + 1, width), the inputs as rows (last row zero)."""
    for s in range(slen.size):
        base = uintp(sptr[s])
        a0 = _vzero(vals, marker)
        a1 = a0
        a2 = a0
        a3 = a0
        a4 = a0
        a5 = a0
        a6 = a0
        a7 = a0
        for j in range(uintp(slen[s])):
            q = base + j * uintp(8)
            a0 = _vmuladd(a0, _vsplat(vals, q, marker), _vrow(xt, cols[q], marker))
            a1 = _vmuladd(a1, _vsplat(vals, q + uintp(1), marker), _vrow(xt, cols[q + uintp(1)], marker))
            a2 = _vmuladd(a2, _vsplat(vals, q + uintp(2), marker), _vrow(xt, cols[q + uintp(2)], marker))
            a3 = _vmuladd(a3, _vsplat(vals, q + uintp(3), marker), _vrow(xt, cols[q + uintp(3)], marker))
            a4 = _vmuladd(a4, _vsplat(vals, q + uintp(4), marker), _vrow(xt, cols[q + uintp(4)], marker))
            a5 = _vmuladd(a5, _vsplat(vals, q + uintp(5), marker), _vrow(xt, cols[q + uintp(5)], marker))
            a6 = _vmuladd(a6, _vsplat(vals, q + uintp(6), marker), _vrow(xt, cols[q + uintp(6)], marker))
            a7 = _vmuladd(a7, _vsplat(vals, q + uintp(7), marker), _vrow(xt, cols[q + uintp(7)], marker))
        r0 = s * 8
        left = n_rows - r0
        _vstore_row(yt, uintp(perm[r0]), a0)
        if left > 1:
            _vstore_row(yt, uintp(perm[r0 + 1]), a1)
        if left > 2:
            _vstore_row(yt, uintp(perm[r0 + 2]), a2)
        if left > 3:
            _vstore_row(yt, uintp(perm[r0 + 3]), a3)
        if left > 4:
            _vstore_row(yt, uintp(perm[r0 + 4]), a4)
        if left > 5:
            _vstore_row(yt, uintp(perm[r0 + 5]), a5)
        if left > 6:
            _vstore_row(yt, uintp(perm[r0 + 6]), a6)
        if left > 7:
            _vstore_row(yt, uintp(perm[r0 + 7]), a7)


@njit(cache=True, fastmath=False)
def _padded(x):
    xp = np.empty(x.size + 1, x.dtype)
    for i in range(x.size):
        xp[i] = x[i]
    xp[x.size] = 0
    return xp


@njit(cache=True, fastmath=False)
def _one_mv(sptr, slen, perm, cols, vals, n_rows, x, bias):
    y = np.empty(n_rows, x.dtype)
    if n_rows:
        _mv1(sptr, slen, perm, cols, vals, n_rows, _padded(x), y, bias)
    return y


@njit(cache=True, fastmath=False)
def _two_mv(a_sptr, a_slen, a_perm, a_cols, a_vals, a_rows, b_sptr, b_slen, b_perm, b_cols, b_vals, b_rows,
            x, bias):
    t = np.empty(b_rows + 1, x.dtype)
    t[b_rows] = 0
    y = np.empty(a_rows, x.dtype)
    if b_rows:
        _mv1(b_sptr, b_slen, b_perm, b_cols, b_vals, b_rows, _padded(x), t, bias[:0])
    if a_rows:
        _mv1(a_sptr, a_slen, a_perm, a_cols, a_vals, a_rows, t, y, bias)
    return y


@njit(cache=True, fastmath=False)
def _transposed(x, width):
    """``x`` (n, k) as a C-contiguous (k + 1, width) array, zeros in the extra row and columns."""
    n, k = x.shape
    xt = np.zeros((k + 1, width), x.dtype)
    for i in range(n):
        for c in range(k):
            xt[c, i] = x[i, c]
    return xt


@njit(cache=True, fastmath=False)
def _untransposed(yt, n, bias):
    rows = yt.shape[0] - 1
    y = np.empty((n, rows), yt.dtype)
    has_bias = bias.size > 0
    for i in range(n):
        for r in range(rows):
            y[i, r] = yt[r, i] + bias[r] if has_bias else yt[r, i]
    return y


@njit(cache=True, fastmath=False)
def _one_mm(sptr, slen, perm, cols, vals, n_rows, x, bias, marker):
    width = len(marker)
    yt = np.empty((n_rows + 1, width), x.dtype)
    if n_rows:
        _mvb(sptr, slen, perm, cols, vals, n_rows, _transposed(x, width), yt, marker)
    return _untransposed(yt, x.shape[0], bias)


@njit(cache=True, fastmath=False)
def _two_mm(a_sptr, a_slen, a_perm, a_cols, a_vals, a_rows, b_sptr, b_slen, b_perm, b_cols, b_vals, b_rows,
            x, bias, marker):
    width = len(marker)
    t = np.empty((b_rows + 1, width), x.dtype)
    t[b_rows, :] = 0
    yt = np.empty((a_rows + 1, width), x.dtype)
    if b_rows:
        _mvb(b_sptr, b_slen, b_perm, b_cols, b_vals, b_rows, _transposed(x, width), t, marker)
    else:
        t[:, :] = 0
    if a_rows:
        _mvb(a_sptr, a_slen, a_perm, a_cols, a_vals, a_rows, t, yt, marker)
    return _untransposed(yt, x.shape[0], bias)
