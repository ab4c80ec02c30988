"""The Double Sparse Factorization estimator (scikit-learn API over :mod:`sparsefact.dsf`).

The single-sparse baselines live in :mod:`sparsefact.pruning`, low rank in
:mod:`sparsefact.lowrank`, structured factorisations in :mod:`sparsefact.structured`; all share
:class:`sparsefact.base.BaseCompressor` and its one ``fit``.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import Any

from sklearn.base import ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning

from ._sklearn_compat import Interval, StrOptions, check_is_fitted, validate_data
from ._validation import check_matrix, convert_to_namespace
from .admm import masked_least_squares, sparse_least_squares
from .backends import get_engine
from .base import BaseCompressor, FitOutput
from .dsf import double_sparse_factorization, search_split
from .dsf_exact import double_sparse_factorization_exact
from .metrics import relative_error

__all__ = ["DoubleSparseFactorization"]


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


class DoubleSparseFactorization(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseCompressor):
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
        **BaseCompressor._parameter_constraints,
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
    def _check_shape(self, m: int, n: int) -> None:
        _check_inner_dimension(m, n)

    def _solver_options(self) -> dict[str, Any]:
        """The solver arguments of this estimator's parameters (declared once, in ``__init__``)."""
        return dict(
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

    def _fit(self, W: Any, gram: Any, engine: Any) -> FitOutput:
        options = self._solver_options()
        split = self.split
        self.split_trials_ = None
        if split == "search":
            split, self.split_trials_ = search_split(
                W, gram, engine=engine, search_iter=max(4, self.max_iter // 4), **options
            )
        if self.objective == "exact":
            result = double_sparse_factorization_exact(W, gram, engine=engine, split=split, **options)
        else:
            result = double_sparse_factorization(
                W, gram, engine=engine, split=split, callback=self.callback, verbose=self.verbose,
                track_errors=False, **options,
            )
        self._left, self._right = result.left, result.right
        self._gram = gram if self.keep_calibration else None
        self.A_ = engine.to_sparse(result.left)
        self.B_ = engine.to_sparse(result.right)
        self.components_ = self.B_
        self.n_components_ = int(result.plan.k)
        self.split_ = result.plan.split
        self.n_iter_ = result.n_iter
        self.errors_ = list(result.errors)
        self.error_before_finalize_ = result.error_before_finalize
        # result.error is relative_error(W, left @ right, gram), measured by the core
        return FitOutput(
            factors=(result.left, result.right),
            nnz=int(self.A_.nnz + self.B_.nnz),
            calibrated_err=result.error,
        )

    def _after_fit(self, out: FitOutput) -> None:
        errs = self.errors_
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
                stacklevel=4,  # the user call, above fit and the _fit_context wrapper
            )

    def fit_transform(self, W: Any, y: Any = None, *, X_calib: Any = None, calibration: Any = None):
        """Fit, then return the sparse codes of ``W``'s rows (``fit(W).transform(W)``).

        The fitted factor ``A_`` is also available; ``transform`` re-codes every row
        with a per-row budget so that its result does not depend on the other rows.
        """
        return self.fit(W, y, X_calib=X_calib, calibration=calibration).transform(W)

    # ------------------------------------------------------------------ use
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
        engine = get_engine(self.backend, xp)
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




def __getattr__(name: str) -> Any:
    # MagnitudePruning moved to sparsefact.pruning beside its siblings; old imports keep working.
    if name == "MagnitudePruning":
        from .pruning import MagnitudePruning

        return MagnitudePruning
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
