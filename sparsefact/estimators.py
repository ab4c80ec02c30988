"""scikit-learn estimators: Double Sparse Factorization and the compressors compared with it.

Every compressor shares one contract (design.md §3): ``fit(W, X_calib)`` or
``fit(W, calibration=...)``, ``reconstruct()``, ``calibrated_err_``, ``density_`` and
``nnz_``. DSF keeps two sparse factors ``A_`` and ``B_``; single-sparse compressors
keep ``weight_``.

Naming: sparsefact's ``W`` is scikit-learn's ``X`` -- the rows of the weight matrix
(output neurons) are the samples and its columns (inputs) are the features.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import Any

import array_api_compat
import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._validation import check_matrix, convert_to_namespace, to_numpy
from .admm import masked_least_squares, sparse_least_squares
from .backends import BACKENDS, get_engine
from .calibration import Calibration
from .dsf import double_sparse_factorization, search_split
from .dsf_exact import double_sparse_factorization_exact
from .masks import check_n_m, global_topk_mask, kept_budget, n_m_mask, row_topk_mask
from .metrics import relative_error


def _to_sparse(dense: Any) -> Any:
    """CSR copy of a dense factor: scipy.sparse for CPU arrays, cupyx on the GPU."""
    if array_api_compat.is_cupy_array(dense):  # pragma: no cover - needs a GPU
        import cupyx.scipy.sparse as csp

        return csp.csr_matrix(dense)
    values = np.ascontiguousarray(to_numpy(dense))
    if values.dtype in (np.float32, np.float64) and values.ndim == 2:
        from .backends._numba_kernels import dense_to_csr

        data, indices, indptr = dense_to_csr(values)
        return sp.csr_array((data, indices, indptr), shape=values.shape)
    return sp.csr_array(values)


def _ndim(value: Any) -> int:
    """Number of dimensions of an array-like, without NumPy's ``__array_function__``."""
    if hasattr(value, "ndim"):
        return int(value.ndim)
    try:
        return np.asarray(value).ndim
    except ValueError:  # ragged sequences: not a matrix of calibration inputs
        return 1


def _check_inner_dimension(m: int, n: int) -> None:
    """Reject shapes whose inner dimension ``min(m, n)`` cannot carry two sparse factors.

    With ``k = min(m, n) = 1`` the square factor is ``1 x 1`` and no budget rule can keep
    it nonzero. The messages use scikit-learn's wording ("1 sample", "1 feature(s)").
    """
    if m >= 2 and n >= 2:
        return
    if m < 2 and n < 2:
        what = f"W has 1 sample and 1 feature(s) (shape ({m}, {n}))"
    elif m < 2:
        what = f"W has 1 sample (row) (shape ({m}, {n}))"
    else:
        what = f"W has 1 feature(s) (column) (shape ({m}, {n}))"
    raise ValueError(
        f"{what}: DoubleSparseFactorization needs at least 2 rows and 2 columns, since the "
        "inner dimension min(m, n) of A @ B must be at least 2"
    )


class _BaseCompressor(BaseEstimator):
    """Shared input handling of all compressors (one validation path).

    Subclasses implement ``_fit_arrays(W, gram, engine)`` and set their fitted
    attributes there; this class resolves the calibration, the engine and the errors.
    """

    _parameter_constraints: dict = {
        "backend": [StrOptions(set(BACKENDS))],
    }

    def _resolve_inputs(self, W: Any, y: Any, X_calib: Any, calibration: Any):
        """Validate ``W`` and the calibration; return ``(W, xp, gram or None)``.

        A factorisation has no targets: a 2-D second positional argument is taken as
        ``X_calib`` so that ``est.fit(W, X_calib)`` works, and a 1-D ``y`` (from a
        supervised pipeline) is ignored.
        """
        W_checked, xp = check_matrix(W, "W", estimator=self)
        validate_data(self, W, reset=True, skip_check_array=True)
        calib_name = "X_calib"
        if y is not None and _ndim(y) == 2:
            if X_calib is not None:
                raise ValueError("pass the calibration inputs once: as y or as X_calib, not both")
            X_calib, calib_name = y, "X_calib (the 2-D second argument of fit)"
        if X_calib is not None and calibration is not None:
            raise ValueError("pass either X_calib or calibration, not both")
        n = W_checked.shape[1]
        gram = None
        if calibration is not None:
            if not isinstance(calibration, Calibration):
                raise TypeError(
                    "calibration must be a sparsefact.Calibration (e.g. "
                    f"Calibration.from_gram(G)), got {type(calibration).__name__}"
                )
            if calibration.n_features != n:
                raise ValueError(
                    f"calibration has {calibration.n_features} features, but W has {n} "
                    "columns (one calibration feature per column of W is needed)"
                )
            gram = convert_to_namespace(calibration.gram(), W_checked, xp)
        elif X_calib is not None:
            X_checked, _ = check_matrix(X_calib, "X_calib")
            if X_checked.shape[1] != n:
                raise ValueError(
                    f"{calib_name} has {X_checked.shape[1]} columns, but W has {n}: calibration "
                    "inputs must have shape (n_tokens, n_features) with n_features = W.shape[1]"
                )
            gram = convert_to_namespace(Calibration.from_activations(X_checked).gram(), W_checked, xp)
        return W_checked, xp, gram

    def _engine(self, xp: Any):
        return get_engine(self.backend, xp)

    def _record_errors(self, W: Any, W_hat: Any, gram: Any, calibrated: float | None = None) -> None:
        """Set ``reconstruction_err_`` and ``calibrated_err_`` (the latter given when known)."""
        self.reconstruction_err_ = relative_error(W, W_hat, None)
        if calibrated is None:
            calibrated = self.reconstruction_err_ if gram is None else relative_error(W, W_hat, gram)
        self.calibrated_err_ = calibrated

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


class DoubleSparseFactorization(ClassNamePrefixFeaturesOutMixin, TransformerMixin, _BaseCompressor):
    """Double Sparse Factorization: approximate ``W`` by the product of two sparse matrices.

    ``W (m x n) ~ A_ @ B_`` with ``A_`` of shape ``(m, k)``, ``B_`` of shape ``(k, n)``,
    ``k = min(m, n)`` and ``nnz(A_) + nnz(B_) <= density * m * n``, fitted by alternating
    ADMM sparse least squares (Boža & Macko, "Two Sparse Matrices are Better than One",
    arXiv 2409.18850). With calibration inputs ``X_calib`` (or their Gram) the
    calibrated error ``||(W - A B) X_calib^T||_F`` is what is minimised (input scaling
    by ``sqrt(diag G)`` during the alternation, then the output-side factor is re-fitted
    against the full Gram). Defaults follow the authors' code; see
    ``docs/algorithm.md``.

    Parameters
    ----------
    density : float in (0, 1], default=0.5
        Kept fraction of ``W``'s ``m * n`` entries, counted over both factors.
    split : "auto", "search" or float in (0, 1], default="auto"
        Density of the square ``k x k`` factor: 0.16 for square ``W``, 0.25 otherwise
        (the reference defaults). The other factor receives the rest of the budget.
        ``"search"`` tries the default and square-factor shares of 20%, 33% and 50% of
        all nonzeros with a cheap schedule (``max(4, max_iter // 4)`` iterations, no
        finalisation) and keeps the best (:func:`sparsefact.dsf.search_split`).
    max_iter : int, default=40
        Outer alternating iterations (A-step then B-step).
    admm_iter : int, default=5
        ADMM iterations per sub-problem.
    mask_iter : int, default=2
        ADMM iterations (the first ones) that re-select the support.
    rho : float, default=1.0
        ADMM penalty.
    ridge : float, default=0.01
        Ridge term relative to the mean diagonal of the normalised Gram.
    input_scaling : bool, default=True
        Scale ``W``'s columns by ``sqrt(diag G)`` during the alternation (calibrated
        fits only).
    finalize : bool, default=True
        Re-fit the output-side factor's values on its support against the full Gram.
        The re-fit is kept only if it does not raise the calibrated error.
    finalize_iter : int, default=20
        ADMM iterations of the finalisation.
    masks : {"global", "row"}, default="global"
        ``"global"`` (reference): one magnitude threshold per factor. ``"row"``: every
        row of ``A_`` and of ``B_`` keeps the same number of nonzeros (balanced rows
        for sparse kernels); rows the alternation leaves empty lose their share.
    objective : {"heuristic", "exact"}, default="heuristic"
        ``"heuristic"`` is the reference two-stage method (alternate on the
        column-scaled matrix, then finalise). ``"exact"`` alternates directly on the
        calibrated objective, solving the input-side step as a Sylvester-type system
        (:mod:`sparsefact.dsf_exact`); about 2x slower, see ``docs/benchmarks.md``
        for where it wins. Tracking, callbacks and the convergence check apply to the
        heuristic only.
    tol : float, default=2e-3
        A :class:`~sklearn.exceptions.ConvergenceWarning` is raised when the scaled
        error still changed by more than ``tol`` (relative) in the last iteration
        (measured: under 0.1% at 40 iterations, 0.3-0.6% at 10, 3-7% at 3 on
        Gaussian and synthetic calibrated layers). ``0`` disables the check.
    backend : {"auto", "numpy_numba", "array_api", "cupy"}, default="auto"
        Engine; ``"auto"`` follows :func:`sparsefact.config_context`, then the
        ``SPARSEFACT_BACKEND`` variable, then the input's array type.
    keep_calibration : bool, default=True
        Keep the calibration Gram so that :meth:`transform` codes new rows in the same
        metric (costs ``n_features^2`` memory).
    random_state : int, RandomState instance or None, default=None
        Accepted for API compatibility: DSF as specified is deterministic (identity and
        magnitude initialisation), so results do not depend on it.
    verbose : int, default=0
        0 silent, 1 progress every 10 iterations, 2 every iteration.
    callback : callable or None, default=None
        Called after each outer iteration with a dict (``iteration``, ``error``,
        ``rho0``, ``elapsed``); return ``True`` to stop early.

    Attributes
    ----------
    A_ : scipy.sparse.csr_array of shape (m, n_components_)
        Output-side factor.
    B_ : scipy.sparse.csr_array of shape (n_components_, n_features_in_)
        Input-side factor (also ``components_``).
    components_ : scipy.sparse.csr_array
        Same object as ``B_`` (scikit-learn's name for the learned atoms).
    n_components_ : int
        Inner dimension ``k = min(m, n)``.
    calibrated_err_ : float
        ``sqrt(tr(D G D^T) / tr(W G W^T))`` with ``D = W - A_ B_``; equal to
        ``reconstruction_err_`` without calibration.
    reconstruction_err_ : float
        Relative Frobenius error ``||W - A_ B_|| / ||W||``.
    error_before_finalize_ : float
        Calibrated error before the finalisation step.
    errors_ : list of float
        Relative error of the scaled alternating problem after the tracked iterations.
    density_ : float
        ``nnz_ / (m * n)``.
    nnz_ : int
        ``nnz(A_) + nnz(B_)``.
    split_ : float
        Square-factor density used.
    split_trials_ : dict or None
        With ``split="search"``: ``{split: trial error}``.
    n_iter_ : int
        Outer iterations run.
    backend_ : str
        Engine that ran.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``W`` had string column names.

    Examples
    --------
    >>> import numpy as np
    >>> from sparsefact import DoubleSparseFactorization
    >>> W = np.random.default_rng(0).standard_normal((64, 64))
    >>> est = DoubleSparseFactorization(density=0.5, max_iter=10, tol=0).fit(W)
    >>> est.A_.shape, est.B_.shape
    ((64, 64), (64, 64))
    >>> bool(est.nnz_ <= 0.5 * 64 * 64)
    True
    """

    _parameter_constraints: dict = {
        **_BaseCompressor._parameter_constraints,
        "density": [Interval(Real, 0, 1, closed="right")],
        "split": [StrOptions({"auto", "search"}), Interval(Real, 0, 1, closed="right")],
        "masks": [StrOptions({"global", "row"})],
        "objective": [StrOptions({"heuristic", "exact"})],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "admm_iter": [Interval(Integral, 1, None, closed="left")],
        "mask_iter": [Interval(Integral, 1, None, closed="left")],
        "rho": [Interval(Real, 0, None, closed="neither")],
        "ridge": [Interval(Real, 0, None, closed="left")],
        "input_scaling": ["boolean"],
        "finalize": ["boolean"],
        "finalize_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "keep_calibration": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "callback": [callable, None],
    }

    def __init__(
        self,
        density: float = 0.5,
        *,
        split: float | str = "auto",
        max_iter: int = 40,
        admm_iter: int = 5,
        mask_iter: int = 2,
        rho: float = 1.0,
        ridge: float = 0.01,
        input_scaling: bool = True,
        finalize: bool = True,
        finalize_iter: int = 20,
        masks: str = "global",
        objective: str = "heuristic",
        tol: float = 2e-3,
        backend: str = "auto",
        keep_calibration: bool = True,
        random_state: Any = None,
        verbose: int = 0,
        callback: Any = None,
    ) -> None:
        self.density = density
        self.split = split
        self.max_iter = max_iter
        self.admm_iter = admm_iter
        self.mask_iter = mask_iter
        self.rho = rho
        self.ridge = ridge
        self.input_scaling = input_scaling
        self.finalize = finalize
        self.finalize_iter = finalize_iter
        self.masks = masks
        self.objective = objective
        self.tol = tol
        self.backend = backend
        self.keep_calibration = keep_calibration
        self.random_state = random_state
        self.verbose = verbose
        self.callback = callback

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, W: Any, y: Any = None, *, X_calib: Any = None, calibration: Calibration | None = None):
        """Fit the two sparse factors to ``W``.

        Parameters
        ----------
        W : array of shape (m, n)
            Matrix to factorise (a layer weight: rows = outputs, columns = inputs).
            NumPy, torch, CuPy or any array-API array; results stay in its namespace,
            device and dtype (integers become float64).
        y : array of shape (n_tokens, n), optional
            A 2-D second positional argument is taken as ``X_calib``; a 1-D ``y`` is
            ignored (pipelines pass targets).
        X_calib : array of shape (n_tokens, n), optional
            Calibration inputs of the layer.
        calibration : Calibration, optional
            Precomputed or streamed calibration (``Calibration.from_gram(G)``).

        Returns
        -------
        self
        """
        W_checked, xp, gram = self._resolve_inputs(W, y, X_calib, calibration)
        _check_inner_dimension(*W_checked.shape)
        engine = self._engine(xp)
        options = dict(
            density=self.density,
            max_iter=self.max_iter,
            admm_iter=self.admm_iter,
            mask_iter=self.mask_iter,
            rho=self.rho,
            ridge=self.ridge,
            input_scaling=self.input_scaling,
            finalize=self.finalize,
            finalize_iter=self.finalize_iter,
            masks=self.masks,
        )
        factorize = (
            double_sparse_factorization_exact if self.objective == "exact" else double_sparse_factorization
        )
        with engine.loop_context():
            split = self.split
            self.split_trials_ = None
            if split == "search":
                split, self.split_trials_ = search_split(
                    W_checked, gram, engine=engine, search_iter=max(4, self.max_iter // 4), **options
                )
            result = factorize(
                W_checked,
                gram,
                engine=engine,
                split=split,
                callback=self.callback,
                verbose=self.verbose,
                **options,
            )
        self._left, self._right = result.left, result.right
        self._gram = gram if self.keep_calibration else None
        self.A_ = _to_sparse(result.left)
        self.B_ = _to_sparse(result.right)
        self.components_ = self.B_
        self.n_components_ = int(result.plan.k)
        m, n = W_checked.shape
        self.nnz_ = int(self.A_.nnz + self.B_.nnz)
        self.density_ = self.nnz_ / (m * n)
        self.split_ = result.plan.split
        self.n_iter_ = result.n_iter
        self.errors_ = list(result.errors)
        self.error_before_finalize_ = result.error_before_finalize
        self.backend_ = engine.name
        # result.error is relative_error(W, left @ right, gram), measured by the core
        self._record_errors(W_checked, engine.matmul(result.left, result.right), gram, result.error)
        errs = result.errors
        if (
            self.tol > 0
            and self.n_iter_ == self.max_iter
            and len(errs) >= 2
            and abs(errs[-1] - errs[-2]) > self.tol * max(errs[-1], 1e-12)
        ):
            warnings.warn(
                f"DoubleSparseFactorization did not converge: the error changed by "
                f"{abs(errs[-1] - errs[-2]) / max(errs[-1], 1e-12):.2%} in the last of "
                f"{self.max_iter} iterations (tol={self.tol}); increase max_iter.",
                ConvergenceWarning,
                stacklevel=3,  # the user call, above the _fit_context wrapper
            )
        return self

    def fit_transform(self, W: Any, y: Any = None, *, X_calib: Any = None, calibration: Any = None):
        """Fit, then return the sparse codes of ``W``'s rows (``fit(W).transform(W)``).

        The fitted factor ``A_`` is also available; ``transform`` re-codes every row
        with a per-row budget so that its result does not depend on the other rows.
        """
        return self.fit(W, y, X_calib=X_calib, calibration=calibration).transform(W)

    # ------------------------------------------------------------------ use
    def reconstruct(self) -> Any:
        """Dense ``A_ @ B_`` in the fitted matrix's namespace, device and dtype."""
        check_is_fitted(self)
        xp = array_api_compat.array_namespace(self._left)
        return xp.matmul(self._left, self._right)

    def transform(self, W: Any) -> Any:
        """Sparse codes of new rows against the fixed ``B_`` (like ``NMF.transform``).

        Each row of ``W`` gets ``round(nnz(A_) / m)`` nonzeros (the fitted per-row
        average), chosen by ADMM sparse least squares in the fit's metric (the kept
        calibration Gram, or plain Frobenius), then re-fitted on that support.

        Parameters
        ----------
        W : array of shape (r, n_features_in_)

        Returns
        -------
        array of shape (r, n_components_)
            Dense codes, in ``W``'s namespace and dtype.
        """
        check_is_fitted(self)
        W_checked, xp = check_matrix(W, "W", estimator=self)
        validate_data(self, W, reset=False, skip_check_array=True)
        engine = self._engine(xp)
        right = convert_to_namespace(self._right, W_checked, xp)
        gram = None if self._gram is None else convert_to_namespace(self._gram, W_checked, xp)
        k = right.shape[0]
        right_g = right if gram is None else xp.matmul(right, gram)
        system = xp.matmul(right_g, right.T)
        cross = xp.matmul(right_g, W_checked.T)
        per_row = int(round(self.A_.nnz / max(self.A_.shape[0], 1)))
        per_row = min(max(per_row, 1), k)
        with engine.loop_context():
            if per_row >= k:
                start = xp.zeros(cross.shape, dtype=cross.dtype)
                mask = xp.ones(cross.shape, dtype=xp.bool)
            else:
                norms = xp.sqrt(xp.linalg.diagonal(system))
                zeros = engine.zeros(cross.shape, cross)
                start, _ = sparse_least_squares(
                    engine, system, engine.copy(cross), norms, zeros, engine.copy(zeros),
                    threshold_index=k - per_row - 1, rho0=0.0, rho=self.rho, ridge=self.ridge,
                    n_iter=self.admm_iter, mask_iter=self.mask_iter, scope="column",
                )
                mask = start != 0
            codes_t = masked_least_squares(
                engine, system, cross, start, mask, n_iter=self.finalize_iter, rho=self.rho
            )
        return engine.copy(codes_t.T)

    def inverse_transform(self, codes: Any) -> Any:
        """Rows reconstructed from codes: ``codes @ B_``.

        Parameters
        ----------
        codes : array of shape (r, n_components_)

        Returns
        -------
        array of shape (r, n_features_in_)
        """
        check_is_fitted(self)
        codes_checked, xp = check_matrix(codes, "codes")
        if codes_checked.shape[1] != self.n_components_:
            raise ValueError(
                f"codes has {codes_checked.shape[1]} columns, but this factorisation has "
                f"n_components_={self.n_components_}"
            )
        right = convert_to_namespace(self._right, codes_checked, xp)
        return xp.matmul(codes_checked, right)

    def score(self, W: Any, y: Any = None) -> float:
        """Negative relative error of coding and decoding ``W`` (higher is better)."""
        check_is_fitted(self)
        W_checked, _ = check_matrix(W, "W", estimator=self)
        W_hat = self.inverse_transform(self.transform(W_checked))
        return -relative_error(W_checked, W_hat, None)

    @property
    def _n_features_out(self) -> int:
        return self.n_components_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.non_deterministic = False
        return tags


class MagnitudePruning(_BaseCompressor):
    """Keep the largest-magnitude entries of ``W`` (the simplest single-sparse baseline).

    Parameters
    ----------
    density : float in (0, 1], default=0.5
        Kept fraction of the ``m * n`` entries: exactly ``floor(density * m * n)``
        entries for ``scope="matrix"`` (:func:`sparsefact.masks.kept_budget`),
        ``floor(density * n)`` per row for ``scope="row"``.
    scope : {"matrix", "row"}, default="matrix"
        One threshold over the whole matrix, or per output row.
    n_m : tuple (N, M) or None, default=None
        Semi-structured N:M sparsity: each output row keeps the ``N`` largest of every
        group of ``M`` consecutive inputs (``(2, 4)`` is the 2:4 pattern of sparse tensor
        cores). ``density`` must equal ``N / M`` and ``M`` must divide the number of
        columns; ``scope`` is then ignored.
    backend : str, default="auto"
        Accepted for a uniform API; selection runs on the CPU.

    Attributes
    ----------
    weight_ : scipy.sparse.csr_array of shape (m, n)
    calibrated_err_, reconstruction_err_, density_, nnz_
        As for :class:`DoubleSparseFactorization`.
    """

    _parameter_constraints: dict = {
        **_BaseCompressor._parameter_constraints,
        "density": [Interval(Real, 0, 1, closed="right")],
        "scope": [StrOptions({"matrix", "row"})],
        "n_m": [tuple, list, None],
    }

    def __init__(
        self,
        density: float = 0.5,
        *,
        scope: str = "matrix",
        n_m: tuple[int, int] | None = None,
        backend: str = "auto",
    ) -> None:
        self.density = density
        self.scope = scope
        self.n_m = n_m
        self.backend = backend

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, W: Any, y: Any = None, *, X_calib: Any = None, calibration: Calibration | None = None):
        """Prune ``W`` by magnitude; the calibration only affects ``calibrated_err_``."""
        W_checked, xp, gram = self._resolve_inputs(W, y, X_calib, calibration)
        values = to_numpy(W_checked)
        m, n = values.shape
        n_m = check_n_m(self.n_m, self.density, n)
        if n_m is not None:
            mask = n_m_mask(np.abs(values), *n_m)
        elif self.scope == "matrix":
            mask = global_topk_mask(np.abs(values), kept_budget(self.density, m * n))
        else:
            mask = row_topk_mask(np.abs(values), kept_budget(self.density, n))
        pruned = np.where(mask, values, 0).astype(values.dtype, copy=False)
        self._dense = convert_to_namespace(pruned, W_checked, xp)
        self.weight_ = sp.csr_array(pruned)
        self.nnz_ = int(self.weight_.nnz)
        self.density_ = self.nnz_ / (m * n)
        self.backend_ = "numpy"
        self._record_errors(W_checked, self._dense, gram)
        return self

    def reconstruct(self) -> Any:
        """The pruned matrix as a dense array in ``W``'s namespace and dtype."""
        check_is_fitted(self)
        return self._dense
