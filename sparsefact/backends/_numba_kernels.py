"""Numba kernels for the CPU engine: selection by radix histograms and fused ADMM passes.

Every kernel works on C-contiguous 2-D float32/float64 arrays, is compiled lazily on
first use and cached on disk.

The kernels are serial on purpose. Between the kernels, every x-step is a GEMM in
NumPy's OpenBLAS, whose idle worker threads keep spinning for a while after each call;
parallel Numba threads then compete with them for the cores. Measured on a 2-core
machine (float32 DSF, 8 outer iterations, one process, no other load): 1024x1024 took
2.0 s with serial kernels against 2.6-3.1 s with 2-thread kernels, 2048x512 0.74 s
against 1.7-1.9 s, 512x2048 0.74 s against 1.7 s; with serial kernels selection and
element-wise passes take 12-21% of the time, not 30-40%.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
from numba import njit
from numba.extending import get_cython_function_address

from ._base import HINT_MAX_SHARE, SelectionHint

_DIGIT_BITS = 16
_N_BINS = 1 << _DIGIT_BITS


@njit(cache=True)
def _abs_key_histogram(keys, abs_mask, shift, prefix, prefix_mask):
    """Histogram of the 16-bit digit at ``shift`` of ``keys & abs_mask``.

    Only keys whose bits selected by ``prefix_mask`` equal ``prefix`` are counted.
    ``keys`` is the flat integer view of a float array: for non-negative floats the
    integer order of the bit patterns is the numeric order.
    """
    hist = np.zeros(_N_BINS, np.int64)
    for i in range(keys.size):
        key = np.int64(keys[i]) & abs_mask
        if (key & prefix_mask) == prefix:
            hist[(key >> shift) & (_N_BINS - 1)] += 1
    return hist


def _key_view(flat: np.ndarray):
    if flat.dtype == np.float32:
        return flat.view(np.int32), np.int64(0x7FFFFFFF), 32
    return flat.view(np.int64), np.int64(0x7FFFFFFFFFFFFFFF), 64


def _radix_select(keys, abs_mask, total_bits, index):
    """Key of the element of 0-based rank ``index`` among ``keys & abs_mask``."""
    prefix = 0
    prefix_mask = 0
    rank = int(index)
    shift = total_bits - _DIGIT_BITS
    while shift >= 0:
        hist = _abs_key_histogram(
            keys, abs_mask, np.int64(shift), np.int64(prefix), np.int64(prefix_mask)
        )
        cumulative = np.cumsum(hist)
        digit = int(np.searchsorted(cumulative, rank, side="right"))
        if digit > 0:
            rank -= int(cumulative[digit - 1])
        prefix |= digit << shift
        prefix_mask = (prefix_mask | ((_N_BINS - 1) << shift)) & int(abs_mask)
        shift -= _DIGIT_BITS
    return prefix


def _key_to_float(prefix: int, dtype) -> float:
    if dtype == np.float32:
        return float(np.array([prefix], dtype=np.int64).astype(np.int32).view(np.float32)[0])
    return float(np.array([prefix], dtype=np.int64).view(np.float64)[0])


def kth_smallest_abs(values: np.ndarray, index: int) -> float:
    """Value at 0-based position ``index`` of ``np.sort(np.abs(values), axis=None)``.

    Radix selection on the float bit patterns (16 bits a pass, most significant
    first): two read passes for float32, four for float64, no sort and no copy.
    """
    flat = values.reshape(-1)
    keys, abs_mask, total_bits = _key_view(flat)
    prefix = _radix_select(keys, abs_mask, total_bits, index)
    return _key_to_float(prefix, flat.dtype)


@njit(cache=True)
def _count_and_collect(keys, abs_mask, lo_key, hi_key, candidates):
    """Count the keys ``keys & abs_mask`` below ``lo_key``, copy those in ``[lo_key, hi_key]``.

    Returns ``(below, inside)``; the first ``len(candidates)`` keys inside the bracket are
    written to ``candidates``. ``abs_mask``, ``lo_key`` and ``hi_key`` have ``keys``' integer
    type; two loops, so that the count vectorises (measured: 0.16 ms on 147 456 float32 keys,
    against 1.2 ms for one loop that also added ``u`` and read the sum back through the
    integer view).
    """
    below = 0
    for i in range(keys.size):
        below += (keys[i] & abs_mask) < lo_key
    inside = 0
    cap = candidates.size
    for i in range(keys.size):
        key = keys[i] & abs_mask
        if key >= lo_key and key <= hi_key:
            if inside < cap:
                candidates[inside] = key
            inside += 1
    return below, inside


def _float_key(value: float, dtype) -> int:
    """Integer bit pattern of the non-negative ``value`` in ``dtype`` (order-preserving)."""
    if dtype == np.float32:
        return int(np.array([value], dtype=np.float32).view(np.int32)[0])
    return int(np.array([value], dtype=np.float64).view(np.int64)[0])


def _bracketed_select(keys, abs_mask, index, bracket, dtype):
    """The key at ``index`` by one counting pass over the ``(low, high)`` bracket, or None if outside it."""
    int_type = keys.dtype.type
    lo_key, hi_key = (_float_key(bound, dtype) for bound in bracket)
    candidates = np.empty(max(int(keys.size * HINT_MAX_SHARE), 1), dtype=keys.dtype)
    below, inside = _count_and_collect(
        keys, int_type(abs_mask), int_type(lo_key), int_type(hi_key), candidates
    )
    rank = int(index) - below
    if 0 <= rank < inside <= candidates.size:
        return int(np.partition(candidates[:inside], rank)[rank])
    return None


def add_and_select(y: np.ndarray, u: np.ndarray, index: int, hint: SelectionHint | None = None) -> float:
    """``y += u`` in place, then the value at position ``index`` of ``sort(|y|)``.

    With a ``hint`` that holds a previous threshold, one counting pass usually suffices
    (:class:`~sparsefact.backends._base.SelectionHint`), else the radix selection runs; the
    result is the same either way, and the hint is updated. The addition is a separate
    vectorised pass: fusing it into the first radix pass, which then read the sum back
    through the integer view, was slower (0.64 ms against 0.53 ms on 384 x 384 float32).
    """
    add_inplace(y, u)
    flat = y.reshape(-1)
    keys, abs_mask, total_bits = _key_view(flat)
    bracket = None if hint is None else hint.bracket()
    prefix = None if bracket is None else _bracketed_select(keys, abs_mask, index, bracket, flat.dtype)
    hit = prefix is not None
    if not hit:
        prefix = _radix_select(keys, abs_mask, total_bits, index)
    tau = _key_to_float(prefix, flat.dtype)
    if hint is not None:
        hint.update(tau, hit)
    return tau


@njit(cache=True)
def add_inplace(y, u):
    """``y += u``."""
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            y[i, j] += u[i, j]


@njit(cache=True)
def warm_start(cross, z_prev, u_prev, scale, rho0, u_out, rhs_out):
    """``u_out = scale*u_prev``; ``rhs_out = cross + rho0*(scale*z_prev - u_out)``."""
    for i in range(cross.shape[0]):
        s = scale[i]
        for j in range(cross.shape[1]):
            z = z_prev[i, j] * s
            u = u_prev[i, j] * s
            u_out[i, j] = u
            rhs_out[i, j] = cross[i, j] + rho0 * (z - u)


@njit(cache=True)
def admm_update(y, u, cross, mask, rho, last, tau, refresh, y_is_sum):
    """Fused z/u update and next right-hand side, in place (see ArrayAPIEngine.admm_update).

    ``u`` receives ``u_new``; ``y`` receives ``z`` when ``last`` else the next rhs;
    ``mask`` is rewritten as ``|v| > tau`` when ``refresh``.
    """
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            v = y[i, j] if y_is_sum else y[i, j] + u[i, j]
            if refresh:
                keep = abs(v) > tau
                mask[i, j] = keep
            else:
                keep = mask[i, j]
            z = v if keep else v * 0
            un = v - z
            u[i, j] = un
            if last:
                y[i, j] = z
            else:
                y[i, j] = cross[i, j] + rho * (z - un)


@njit(cache=True)
def scale_rows_inplace(a, scale, divide):
    """``a <- diag(scale) a`` or ``a <- diag(scale)^-1 a``."""
    for i in range(a.shape[0]):
        s = scale[i]
        if divide:
            for j in range(a.shape[1]):
                a[i, j] = a[i, j] / s
        else:
            for j in range(a.shape[1]):
                a[i, j] = a[i, j] * s


@njit(cache=True)
def symmetrize_from_lower(a):
    """Copy the strict lower triangle of ``a`` onto its upper triangle."""
    n = a.shape[0]
    for i in range(n):
        for j in range(i + 1, n):
            a[i, j] = a[j, i]


@njit(cache=True)
def csr_row_pointer(a):
    """Row pointer (``indptr``) of the nonzeros of a dense 2-D array."""
    rows, cols = a.shape
    indptr = np.zeros(rows + 1, np.int64)
    for i in range(rows):
        count = 0
        for j in range(cols):
            if a[i, j] != 0:
                count += 1
        indptr[i + 1] = indptr[i] + count
    return indptr


@njit(cache=True)
def csr_fill(a, indptr, data, indices):
    """Fill ``data`` and ``indices`` (preallocated to ``indptr[-1]``) from dense ``a``."""
    rows, cols = a.shape
    for i in range(rows):
        p = indptr[i]
        for j in range(cols):
            x = a[i, j]
            if x != 0:
                data[p] = x
                indices[p] = j
                p += 1


def dense_to_csr(a: np.ndarray):
    """CSR arrays ``(data, indices, indptr)`` of a dense 2-D array (int32 indices when they fit)."""
    indptr = csr_row_pointer(a)
    nnz = int(indptr[-1])
    index_type = np.int32 if max(a.shape[1], nnz) < 2**31 else np.int64
    data = np.empty(nnz, a.dtype)
    indices = np.empty(nnz, index_type)
    csr_fill(a, indptr, data, indices)
    return data, indices, indptr.astype(index_type)


# ----------------------------------------------------------------------------- LAPACK
# potrf + potri called from Numba with the GIL released. Preferred: the LAPACK inside
# NumPy's own OpenBLAS (the pool the products run in: no hand-over between two libraries'
# thread pools, measured 10 ms per 1024^2 inversion right after a GEMM). Fallback: SciPy's
# LAPACK (its own OpenBLAS, held to one thread during fits; two inversions then run at once).
_LAPACK_SIGNATURE = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
)
# ILP64 entry points take int64 sizes and, compiled by gfortran, a hidden string length.
_ILP64_SIGNATURE = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.c_size_t,
)


def _lapack(name: str):
    return _LAPACK_SIGNATURE(get_cython_function_address("scipy.linalg.cython_lapack", name))


def _numpy_openblas() -> ctypes.CDLL | None:
    """NumPy's bundled OpenBLAS (wheels of NumPy 2), or None."""
    folder = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(folder, "libscipy_openblas64_*.so"))):
        try:
            return ctypes.CDLL(path)
        except OSError:  # pragma: no cover - unusual packaging
            return None
    return None


def _numpy_lapack(name: str):
    lib = _numpy_openblas()
    symbol = getattr(lib, f"scipy_{name}_64_", None) if lib is not None else None
    if symbol is None:
        return None
    return _ILP64_SIGNATURE(ctypes.cast(symbol, ctypes.c_void_p).value)


def _cholesky_inverse_kernel(potrf, potri):
    """A GIL-free ``potrf`` + ``potri`` of a C-contiguous symmetric matrix, in place."""

    @njit(nogil=True)
    def kernel(a):
        n = a.shape[0]
        uplo = np.array([ord("U")], np.uint8)  # Fortran upper triangle = C lower triangle
        size = np.array([n], np.int32)
        info = np.zeros(1, np.int32)
        potrf(uplo.ctypes.data, size.ctypes.data, a.ctypes.data, size.ctypes.data, info.ctypes.data)
        if info[0] == 0:
            potri(uplo.ctypes.data, size.ctypes.data, a.ctypes.data, size.ctypes.data, info.ctypes.data)
        return info[0]

    return kernel


def _cholesky_inverse_kernel_ilp64(potrf, potri):
    """The same with 64-bit integers and the hidden length of the ``uplo`` string."""

    @njit(nogil=True)
    def kernel(a):
        n = a.shape[0]
        uplo = np.array([ord("U")], np.uint8)
        size = np.array([n], np.int64)
        info = np.zeros(1, np.int64)
        potrf(uplo.ctypes.data, size.ctypes.data, a.ctypes.data, size.ctypes.data, info.ctypes.data, 1)
        if info[0] == 0:
            potri(uplo.ctypes.data, size.ctypes.data, a.ctypes.data, size.ctypes.data, info.ctypes.data, 1)
        return info[0]

    return kernel


def _select_kernels() -> tuple[dict, bool]:
    routines = {name: _numpy_lapack(name) for name in ("spotrf", "spotri", "dpotrf", "dpotri")}
    if all(routines.values()):
        return {
            np.dtype(np.float32): _cholesky_inverse_kernel_ilp64(routines["spotrf"], routines["spotri"]),
            np.dtype(np.float64): _cholesky_inverse_kernel_ilp64(routines["dpotrf"], routines["dpotri"]),
        }, True
    return {
        np.dtype(np.float32): _cholesky_inverse_kernel(_lapack("spotrf"), _lapack("spotri")),
        np.dtype(np.float64): _cholesky_inverse_kernel(_lapack("dpotrf"), _lapack("dpotri")),
    }, False


_INVERSE_KERNELS, USES_NUMPY_LAPACK = _select_kernels()


def cholesky_inverse_inplace(a: np.ndarray) -> int:
    """Overwrite the C-lower triangle of the SPD matrix ``a`` with its inverse's.

    Releases the GIL. Returns LAPACK's ``info`` (0 on success, > 0 when ``a`` is not
    positive definite).
    """
    return int(_INVERSE_KERNELS[a.dtype](a))


@njit(cache=True)
def obs_panel(w_p, f_t, e_p, c_p):
    """SparseGPT's column loop over one panel (unstructured mask), in place.

    For each column ``j`` of the panel: ``w_p[j] -= f_t[j, :j] @ e_p[:j]`` (the OBS
    compensation from the panel's earlier columns), then ``e_p[j] = w_p[j] * c_p[j]``.
    Rows of the arrays are columns of ``W``; ``f_t`` is the panel's block of the upper
    Cholesky factor of ``H^-1``, transposed.
    """
    width, m = w_p.shape
    acc = np.empty(m, w_p.dtype)
    for j in range(width):
        if j > 0:
            acc[:] = 0
            for p in range(j):
                coef = f_t[j, p]
                for col in range(m):
                    acc[col] += coef * e_p[p, col]
            for col in range(m):
                w_p[j, col] -= acc[col]
        for col in range(m):
            e_p[j, col] = w_p[j, col] * c_p[j, col]
