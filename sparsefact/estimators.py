"""The Double Sparse Factorization estimator (scikit-learn API over :mod:`sparsefact.dsf`).

The single-sparse baselines live in :mod:`sparsefact.pruning`, low rank in
:mod:`sparsefact.lowrank`, structured factorisations in :mod:`sparsefact.structured`; all share
:class:`sparsefact.base.BaseCompressor` and its one ``fit``.
"""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real
from typing import Any

from sklearn.base import ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning

from ._sklearn_compat import Interval, StrOptions, check_is_fitted, validate_data
from ._validation import check_matrix, convert_to_namespace, scale_by_power_of_two
from .admm import masked_least_squares, sparse_least_squares
from .backends import get_engine
from .base import BaseCompressor, FitOutput
from .dsf import (
    double_sparse_factorization,
    refit_both_factors,
    resolve_shape,
    search_split,
    share_split,
    single_sparse_candidate,
)
from .dsf_exact import double_sparse_factorization_exact
from .masks import NMPattern
from .metrics import relative_error

__all__ = ["PRESETS", "DoubleSparseFactorization"]

#: The stages each preset runs after the reference alternation (parameters left at None
#: take these values). "quality" was chosen on the MiniLM layers' calibration data
#: (fit on one half of the calibration sentences, scored on the other; docs/variants.md).
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {
        "restart_iter": 0, "restart_rho": 0.5, "exact_iter": 0, "refit_iter": 0,
        "damping": 0.0,
    },
    "quality": {
        "restart_iter": 20, "restart_rho": 0.5, "exact_iter": 2, "refit_iter": 1,
        "damping": 0.03,
    },
}
#: Conjugate-gradient iterations per factor and round of the quality re-fit.
REFIT_CG_ITER = 20
#: Above this share of the budget in the square factor (the reference split at low density), the
#: quality preset's second stage is a fresh alternation with a third of the budget there
#: (``DoubleSparseFactorization._quality_resplit``; measured on calibration data, docs/variants.md).
QUALITY_MAX_SQUARE_SHARE = 2.0 / 3.0


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

    ``W (m x n) ~ A_ @ B_`` with ``A_`` of shape ``(m, r)``, ``B_`` of shape ``(r, n)``,
    ``r = min(m, n)`` by default and ``nnz(A_) + nnz(B_) <= density * m * n``, fitted by alternating
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
    preset : {"reference", "quality"}, default="reference"
        ``"reference"``: the authors' algorithm (bit-identical to earlier releases where
        the reference can run). ``"quality"``: the reference result, then a restarted
        alternation with a smaller ADMM penalty, the exact calibrated objective
        warm-started from it, and both factors re-fitted on their supports against the
        damped Gram (``restart_iter``, ``restart_rho``, ``exact_iter``, ``refit_iter``,
        ``damping``; None takes the preset's value). Chosen by measurement on MiniLM
        layers (``docs/variants.md``). If the result's calibrated error is above the
        reference's, the reference result is returned (``preset_fallback_``).
    inner_dim : "auto" or int, default="auto"
        Inner dimension ``r`` of ``A_ (m x r) @ B_ (r x n)``, at most ``min(m, n)``.
        ``"auto"``: ``min(m, n)`` with the reference split where the reference budget is
        valid; below the reference's minimum density (about 0.17 for square ``W``)
        ``min(m, n)`` with the square factor holding a third of the budget, and a halved
        ``r`` only where even that is invalid (:func:`sparsefact.dsf.resolve_shape`;
        measured better than smaller ``r`` at densities 0.05-0.2, docs/variants.md); with
        N:M on both factors the largest ``r`` the budget allows.
    split : "auto", "search" or float in (0, 1], default="auto"
        Density of the square ``k x k`` factor: 0.16 for square ``W``, 0.25 otherwise
        (the reference defaults); with ``r < min(m, n)`` the ``k x r`` factor gets a
        third of the budget. The other factor receives the rest of the budget.
        ``"search"`` tries the default and square-factor shares of 20%, 33% and 50% of
        all nonzeros with a cheap schedule (``max(4, max_iter // 4)`` iterations, no
        finalisation) and keeps the best (:func:`sparsefact.dsf.search_split`).
    n_m : tuple (N, M) or None, default=None
        N:M sparsity of the factors named by ``n_m_factors``: every group of ``M``
        consecutive entries along a factor's reduction dimension (a row of ``A_``, within
        the inner dimension; a row of ``B_``, within the inputs) keeps at most ``N``, so
        each factor runs on sparse tensor cores (2:4). ``density`` still bounds
        ``nnz(A_) + nnz(B_)``; with both factors N:M the inner dimension follows from it.
    n_m_factors : {"both", "A", "B"}, default="both"
        Which factors ``n_m`` applies to; an unstructured factor gets the rest of the
        budget.
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
    restart_iter : int or None, default=None
        Outer iterations of the quality preset's second alternation, restarted (the
        ``rho0`` ramp from 0) from the first one's state with ``restart_rho``. None: 0
        for ``"reference"``, 20 for ``"quality"``.
    restart_rho : float or None, default=None
        ADMM penalty of the restarted alternation (None: 0.5).
    exact_iter : int or None, default=None
        Iterations of the exact calibrated objective (:mod:`sparsefact.dsf_exact`)
        warm-started from the alternation's factors, then the output-side
        finalisation. None: 0 for ``"reference"``, 2 for ``"quality"``.
    refit_iter : int or None, default=None
        Rounds of re-fitting both factors' values on their supports against the damped
        Gram (conjugate gradients, :func:`sparsefact.dsf.refit_both_factors`). None: 0 /
        1.
    damping : float or None, default=None
        Relative ridge of that re-fit, ``G + damping * mean(diag G) I`` (None: 0 / 0.03);
        it trades calibration fit for held-out error.
    fallback : {"auto", "magnitude", "calibrated"} or None, default="auto"
        Also fit the single sparse matrix as a double sparse factorisation (``A = I``,
        ``B`` = ``W`` pruned to the rest of the budget, in the same mask structure) and
        return it where its calibrated error is strictly lower (``single_sparse_``), so
        that DSF is never worse than that pruning with ``min(m, n)`` fewer nonzeros.
        ``"magnitude"`` prunes by magnitude; ``"calibrated"`` also tries the Wanda mask
        with its values re-fitted to the Gram. ``"auto"``: ``"calibrated"`` for
        ``preset="quality"``; ``"magnitude"`` for ``"reference"`` with global masks and
        none with ``masks="row"`` (where the magnitude candidate beats a frozen reference
        result, which must stay bit-identical). None: never.
    init_factors : (A, B) or None, default=None
        Warm start of the first alternation from these factors (arrays of shapes ``(m, r)``
        and ``(r, n)``, any array type; e.g. a fine-tuned model's factors, re-factorised to a
        lower density by gradual DSF): their values and supports replace the identity /
        magnitude start, and the first selections re-choose the supports within the budget.
        The inner dimension is ``r`` (``inner_dim`` must be ``"auto"`` or ``r``).
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
        Inner dimension ``r`` (``min(m, n)`` in the reference).
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
    reference_err_ : float
        Calibrated error of the reference alternation (the first stage).
    preset_fallback_ : bool
        True when the quality preset's stages ended above ``reference_err_`` and the
        reference result was returned (always False for ``preset="reference"``).
    single_sparse_ : bool
        True when the single-sparse candidate (``A = I``) was returned.
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
        "preset": [StrOptions(set(PRESETS))],
        "inner_dim": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "split": [StrOptions({"auto", "search"}), Interval(Real, 0, 1, closed="right")],
        "n_m": [tuple, list, None],
        "n_m_factors": [StrOptions({"both", "A", "B"})],
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
        "restart_iter": [Interval(Integral, 0, None, closed="left"), None],
        "restart_rho": [Interval(Real, 0, None, closed="neither"), None],
        "exact_iter": [Interval(Integral, 0, None, closed="left"), None],
        "refit_iter": [Interval(Integral, 0, None, closed="left"), None],
        "damping": [Interval(Real, 0, None, closed="left"), None],
        "fallback": [StrOptions({"auto", "magnitude", "calibrated"}), None],
        "init_factors": [tuple, list, None],
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
        preset: str = "reference",
        inner_dim: int | str = "auto",
        split: float | str = "auto",
        n_m: tuple[int, int] | None = None,
        n_m_factors: str = "both",
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
        restart_iter: int | None = None,
        restart_rho: float | None = None,
        exact_iter: int | None = None,
        refit_iter: int | None = None,
        damping: float | None = None,
        fallback: str | None = "auto",
        init_factors: tuple[Any, Any] | None = None,
        tol: float = 2e-3,
        backend: str = "auto",
        keep_calibration: bool = True,
        random_state: Any = None,
        verbose: int = 0,
        callback: Any = None,
    ) -> None:
        self.density = density
        self.preset = preset
        self.inner_dim = inner_dim
        self.split = split
        self.n_m = n_m
        self.n_m_factors = n_m_factors
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
        self.restart_iter = restart_iter
        self.restart_rho = restart_rho
        self.exact_iter = exact_iter
        self.refit_iter = refit_iter
        self.damping = damping
        self.fallback = fallback
        self.init_factors = init_factors
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
            inner_dim=self.inner_dim,
            n_m=None if self.n_m is None else tuple(self.n_m),
            n_m_factors=self.n_m_factors,
        )

    def _stage_options(self) -> dict[str, Any]:
        """The quality stages' settings: the explicit parameters, else the preset's values."""
        preset = PRESETS[self.preset]
        return {
            name: preset[name] if getattr(self, name) is None else getattr(self, name)
            for name in preset
        }

    def _choose_shape(
        self, W: Any, gram: Any, engine: Any, options: dict[str, Any], warm_inner_dim: int | None = None
    ) -> tuple[int, Any]:
        """``(inner_dim, split)`` of the first stage: :func:`sparsefact.dsf.resolve_shape`,
        then the split search where ``split="search"``. A warm start's inner dimension
        (``warm_inner_dim``) replaces ``inner_dim`` and is not searched over."""
        m, n = W.shape
        self.split_trials_ = None
        split = "auto" if self.split == "search" else self.split
        inner_dim, split = resolve_shape(
            m, n, self.density, self.inner_dim if warm_inner_dim is None else warm_inner_dim, split,
            self.masks, options["n_m"], self.n_m_factors,
        )
        if self.split == "search" and warm_inner_dim is None:
            split, self.split_trials_ = search_split(
                W, gram, engine=engine, search_iter=max(4, self.max_iter // 4),
                **{**options, "inner_dim": inner_dim},
            )
        return inner_dim, split

    def _initial_factors(self, W: Any, engine: Any) -> tuple[Any, Any] | None:
        """``init_factors`` checked and converted to ``W``'s namespace, dtype and fit scale."""
        if self.init_factors is None:
            return None
        if len(self.init_factors) != 2:
            raise ValueError(f"init_factors must be a pair (A, B), got {len(self.init_factors)} items")
        m, n = W.shape
        left, right = (convert_to_namespace(F, W, engine.xp) for F in self.init_factors)
        if len(left.shape) != 2 or len(right.shape) != 2 or left.shape[0] != m or right.shape[1] != n \
                or left.shape[1] != right.shape[0]:
            raise ValueError(
                f"init_factors must have shapes (m, r) and (r, n) = ({m}, r) and (r, {n}), got "
                f"{tuple(left.shape)} and {tuple(right.shape)}"
            )
        xp = engine.xp
        if not (bool(xp.all(xp.isfinite(left))) and bool(xp.all(xp.isfinite(right)))):
            raise ValueError("init_factors must be finite")
        r = int(left.shape[1])
        if self.inner_dim != "auto" and int(self.inner_dim) != r:
            raise ValueError(f"init_factors have inner dimension {r} but inner_dim={self.inner_dim}")
        exponent = getattr(self, "_w_exponent", 0)
        if exponent:
            left = scale_by_power_of_two(left, -exponent)
        return left, right

    def _fit(self, W: Any, gram: Any, engine: Any) -> FitOutput:
        options = self._solver_options()
        stages = self._stage_options()
        init = self._initial_factors(W, engine)
        inner_dim, split = self._choose_shape(
            W, gram, engine, options, None if init is None else int(init[0].shape[1])
        )
        options["inner_dim"] = inner_dim
        if self.objective == "exact":
            result = double_sparse_factorization_exact(W, gram, engine=engine, split=split, start=init,
                                                       **options)
        else:
            result = double_sparse_factorization(
                W, gram, engine=engine, split=split, callback=self.callback, verbose=self.verbose,
                track_errors=False, start=init, **options,
            )
        reference = result
        left, right, error = result.left, result.right, result.error
        self.reference_err_ = result.error
        self.preset_fallback_ = False
        resplit = self._quality_resplit(result.plan) if stages["restart_iter"] > 0 else None
        if resplit is not None:
            # The reference split gives the square factor most of a small budget (80% at density
            # 0.2 for square W): a fresh alternation with a third of it there was measured far
            # better than continuing (docs/variants.md); the reference stays the fallback.
            split = resplit
            result = double_sparse_factorization(
                W, gram, engine=engine, split=split, **{**options, "max_iter": stages["restart_iter"]},
            )
            left, right, error = result.left, result.right, result.error
        elif stages["restart_iter"] > 0 and result.state is not None:
            # Same plan as the first stage: a restart with another split was measured worse
            # (the carried supports fit the old budget; docs/variants.md).
            result = double_sparse_factorization(
                W, gram, engine=engine, split=split, start=result.state,
                **{**options, "max_iter": stages["restart_iter"], "rho": stages["restart_rho"]},
            )
            left, right, error = result.left, result.right, result.error
        if stages["exact_iter"] > 0:
            exact = double_sparse_factorization_exact(
                W, gram, engine=engine, split=split, start=(left, right),
                **{**options, "max_iter": stages["exact_iter"]},
            )
            left, right, error = exact.left, exact.right, exact.error
        if stages["refit_iter"] > 0:
            left, right = refit_both_factors(
                engine, W, gram, left, right, rounds=stages["refit_iter"],
                cg_iter=REFIT_CG_ITER, damping=stages["damping"],
            )
            error = relative_error(W, engine.matmul(left, right), gram)
        plan = result.plan
        if not error <= reference.error:  # also catches NaN
            left, right, error = reference.left, reference.right, reference.error
            plan = reference.plan
            self.preset_fallback_ = self.preset != "reference"
        self.single_sparse_ = False
        pruners = self._fallback_pruners()
        if pruners is not None:
            candidate = self._single_sparse(W, gram, engine, pruners)
            if candidate is not None and candidate[2] < error:
                left, right, error = candidate
                self.single_sparse_ = True
        self._left, self._right = left, right
        self._gram = gram if self.keep_calibration else None
        self.A_ = engine.to_sparse(left)
        self.B_ = engine.to_sparse(right)
        self.components_ = self.B_
        self.n_components_ = int(right.shape[0])
        self.split_ = plan.split
        self.n_iter_ = reference.n_iter
        self.errors_ = list(reference.errors)
        self.error_before_finalize_ = reference.error_before_finalize
        return FitOutput(
            factors=(left, right),
            nnz=int(self.A_.nnz + self.B_.nnz),
            calibrated_err=error,
        )

    def _quality_resplit(self, plan: Any) -> float | None:
        """The quality preset's split when the reference one over-serves the square factor, else None.

        Only for ``split="auto"`` with unstructured factors at the reference shape: where the
        square factor's share of the budget exceeds :data:`QUALITY_MAX_SQUARE_SHARE`, the split
        that gives it :data:`~sparsefact.dsf.LOW_RANK_SHARE` of the budget instead.
        """
        if self.preset != "quality" or self.split != "auto" or self.n_m is not None or plan.r != plan.k:
            return None
        total = self.density * plan.m * plan.n
        if plan.budget_square <= QUALITY_MAX_SQUARE_SHARE * total:
            return None
        return share_split(plan.m, plan.n, self.density, plan.r, self.masks)

    def _fallback_pruners(self) -> str | None:
        """The single-sparse candidate's pruners (``fallback`` with ``"auto"`` resolved)."""
        if self.fallback != "auto":
            return self.fallback
        if self.preset == "quality":
            return "calibrated"
        return "magnitude" if self.masks == "global" else None

    def _single_sparse(self, W: Any, gram: Any, engine: Any, pruners: str) -> tuple | None:
        """The ``A = I`` candidate within the budget, mask structure and N:M pattern, or None."""
        m, n = W.shape
        budget = math.floor(self.density * m * n)
        pattern = None
        if self.n_m is not None:
            keep, group = (int(v) for v in self.n_m)
            # the pruned W is A_ (m >= n) or B_ (m < n); its reduction dimension is n
            on_pruned = self.n_m_factors in ("both", "A") if m >= n else self.n_m_factors in ("both", "B")
            if on_pruned:
                if n % group:
                    return None
                pattern = NMPattern(keep, group, 1)
        left, right, error = single_sparse_candidate(
            engine, W, gram, budget=budget, pruners=pruners, rows=self.masks == "row", pattern=pattern
        )
        if left is None:
            return None
        return left, right, error

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
