"""The one method registry: name -> estimator class, what it needs, and what holds its result.

Every place that offers a choice of method reads this registry: :func:`sparsefact.compare`,
:func:`sparsefact.nn_adapters.compress_model`, the ``sparsefact`` command line and the
benchmarks. A method registered here -- built in or a user's own class -- is available in all
of them::

    from sparsefact import BaseCompressor, register_method
    register_method("keep-diagonal", KeepDiagonal, needs="none")
    compare(W, X, methods=["keep-diagonal", "dsf"])

Each entry records

- ``estimator``: a :class:`~sparsefact.base.BaseCompressor` subclass (constructor takes
  ``density`` first);
- ``kind``: ``"layer"`` (a layer compressor fitted to ``W`` and its calibration),
  ``"structured"`` (a structured factorisation of ``W``, same contract) or ``"scorer"``
  (a whole-network pruning-at-initialisation score: not a per-layer fit);
- ``needs``: the calibration statistic its fit uses -- ``"gram"`` (the full input Gram
  ``X^T X``), ``"diag"`` (only its diagonal, e.g. Wanda), ``"none"`` (no calibration, e.g.
  magnitude pruning) or ``"grad"`` (gradients through the network, scorers);
- ``module``: the torch module family that holds its result in a compressed model: a name
  known to :mod:`sparsefact.nn_adapters.install` (``"sparse"``, ``"double_sparse"``,
  ``"lowrank"``, ...), a callable ``builder(estimator, layer, bias) -> nn.Module``, or
  ``None`` (chosen from the number of factors: one -> ``"sparse"``, two -> ``"double_sparse"``);
- ``params``: constructor parameters fixed by the entry (``"dsf-exact"`` is DSF with
  ``objective="exact"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sklearn.base import clone

from .base import BaseCompressor

__all__ = [
    "KINDS",
    "NEEDS",
    "MethodSpec",
    "available_methods",
    "get_method",
    "make_estimator",
    "method_name",
    "register_method",
    "unregister_method",
]

NEEDS = ("gram", "diag", "none", "grad")
KINDS = ("layer", "structured", "scorer")
#: How much of the calibration a statistic carries ("grad" is a different path altogether).
_NEEDS_ORDER = {"none": 0, "diag": 1, "gram": 2, "grad": 2}


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry (see the module docstring)."""

    name: str
    estimator: type
    kind: str = "layer"
    needs: str = "gram"
    module: str | Callable | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def make(self, density: float, params: Mapping[str, Any] | None = None) -> Any:
        """An unfitted estimator at ``density`` with the entry's and the caller's parameters."""
        return self.estimator(density=density, **{**self.params, **dict(params or {})})


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    estimator_class: type,
    *,
    needs: str | None = None,
    module: str | Callable | None = None,
    kind: str = "layer",
    params: Mapping[str, Any] | None = None,
    description: str = "",
    replace: bool = False,
) -> MethodSpec:
    """Make ``estimator_class`` available under ``name`` everywhere a method is chosen.

    Parameters
    ----------
    name : str
        Lower-case name (``"dsf"``, ``"wanda"``, ...); used by ``compare(methods=[...])``,
        ``compress_model(method=...)`` and ``sparsefact compress --method``.
    estimator_class : type
        A :class:`~sparsefact.base.BaseCompressor` subclass whose constructor takes
        ``density`` as its first parameter (for ``kind="scorer"``: the scoring callable).
    needs : {"gram", "diag", "none", "grad"} or None, default=None
        Calibration statistic the fit uses (what ``compress_model`` captures); ``None``
        takes the class's ``_needs`` (``"gram"`` unless the class says otherwise). A class
        whose fit needs the full Gram cannot be registered with less.
    module : str, callable or None, default=None
        Torch module family of the result (see the module docstring).
    kind : {"layer", "structured", "scorer"}, default="layer"
    params : mapping, optional
        Constructor parameters fixed by this entry.
    description : str, optional
        One line for listings (``sparsefact methods``).
    replace : bool, default=False
        Allow replacing an existing entry of the same name.

    Returns
    -------
    MethodSpec

    Raises
    ------
    ValueError
        Bad ``name``, ``needs`` or ``kind``, a name already registered (without
        ``replace=True``), or fixed ``params`` the class does not accept.
    TypeError
        ``estimator_class`` is not a class derived from ``BaseCompressor``, or its
        constructor has no ``density`` parameter.

    Examples
    --------
    >>> from sparsefact import MagnitudePruning, register_method, unregister_method
    >>> spec = register_method("magnitude-row", MagnitudePruning, params={"scope": "row"})
    >>> spec.make(0.5).scope
    'row'
    >>> unregister_method("magnitude-row")
    """
    if not isinstance(name, str) or not name or name != name.strip().lower() or "," in name:
        raise ValueError(f"name must be a non-empty lower-case string without commas, got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "scorer":
        # whole-network scorers are not fitted to one W: any class or callable, needs="grad" or "none"
        if not callable(estimator_class):
            raise TypeError(f"a scorer must be callable (a class or a function), got {estimator_class!r}")
        return _store(MethodSpec(name, estimator_class, kind, needs or "grad", module,
                                 MappingProxyType(dict(params or {})), description), replace)
    if not isinstance(estimator_class, type) or not issubclass(estimator_class, BaseCompressor):
        raise TypeError(
            f"estimator_class must be a subclass of sparsefact.BaseCompressor, got {estimator_class!r}"
        )
    declared = getattr(estimator_class, "_needs", "gram")
    if needs is None:
        needs = declared
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {NEEDS}, got {needs!r}")
    if _NEEDS_ORDER.get(needs, 0) < _NEEDS_ORDER.get(declared, 0):
        raise ValueError(
            f"{estimator_class.__name__} fits against needs={declared!r}; it cannot be registered "
            f"with needs={needs!r} (the captured statistic would not be enough)"
        )
    if module is not None and not (isinstance(module, str) or callable(module)):
        raise TypeError(f"module must be a family name, a callable or None, got {module!r}")
    accepted = estimator_class._get_param_names()
    if "density" not in accepted:
        raise TypeError(f"{estimator_class.__name__} must take a 'density' constructor parameter")
    fixed = dict(params or {})
    unknown = sorted(set(fixed) - set(accepted))
    if unknown:
        raise ValueError(f"params {unknown} are not parameters of {estimator_class.__name__}")
    spec = MethodSpec(name, estimator_class, kind, needs, module, MappingProxyType(fixed), description)
    return _store(spec, replace)


def _store(spec: MethodSpec, replace: bool) -> MethodSpec:
    if spec.name in _REGISTRY and not replace:
        raise ValueError(
            f"a method named {spec.name!r} is already registered (pass replace=True to replace it)"
        )
    _REGISTRY[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a registered method (``KeyError`` if there is none of that name)."""
    if name not in _REGISTRY:
        raise KeyError(f"no method named {name!r} is registered")
    del _REGISTRY[name]


def available_methods(kind: str | None = None) -> dict[str, MethodSpec]:
    """``{name: MethodSpec}`` of the registered methods (of one ``kind`` if given), in order."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {n: s for n, s in _REGISTRY.items() if kind is None or s.kind == kind}


def get_method(name: str) -> MethodSpec:
    """The entry of ``name`` (case-insensitive); ``ValueError`` listing the names if unknown."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str), got {type(name).__name__}")
    spec = _REGISTRY.get(name.lower())
    if spec is None:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(sorted(_REGISTRY))}")
    return spec


def spec_for(method: Any) -> MethodSpec:
    """The entry for a method given as a name, a registered class or an estimator instance.

    An unregistered class or instance gets an ad-hoc entry (``needs="gram"``, module from its
    factors), so any :class:`~sparsefact.base.BaseCompressor` works without registering.
    """
    if isinstance(method, str):
        return get_method(method)
    cls = method if isinstance(method, type) else type(method)
    for spec in _REGISTRY.values():
        if spec.estimator is cls and not spec.params:
            return spec
    for spec in _REGISTRY.values():
        if spec.estimator is cls:
            return spec
    if not issubclass(cls, BaseCompressor):
        raise TypeError(f"method must be a registered name or a BaseCompressor, got {method!r}")
    return MethodSpec(cls.__name__, cls, needs=getattr(cls, "_needs", "gram"))


def make_estimator(method: Any, density: float, params: Mapping[str, Any] | None = None) -> Any:
    """An unfitted compressor for ``method`` at ``density``.

    ``method`` is a registered name, an estimator class, or an estimator instance (cloned,
    then given ``density`` and ``params``).
    """
    if isinstance(method, str):
        spec = get_method(method)
        if spec.kind == "scorer":
            raise ValueError(
                f"{spec.name!r} is a whole-network pruning-at-initialisation scorer, not a layer "
                "compressor: use sparsefact.nn_adapters.prune_at_init"
            )
        return spec.make(density, params)
    if isinstance(method, type):
        return method(density=density, **dict(params or {}))
    est = clone(method)
    if "density" in est.get_params():
        est.set_params(density=density)
    if params:
        est.set_params(**dict(params))
    return est


def method_name(method: Any) -> str:
    """The registry name of ``method`` (a name, class or instance), else its class name."""
    if isinstance(method, str):
        return method.lower()
    cls = method if isinstance(method, type) else type(method)
    for spec in _REGISTRY.values():
        if spec.estimator is cls and not spec.params:
            return spec.name
    return cls.__name__


def _register_builtins() -> None:
    from .estimators import DoubleSparseFactorization
    from .lowrank import LowRank
    from .pruning import ADMMPruning, MagnitudePruning, SparseGPT, Wanda

    register_method("dsf", DoubleSparseFactorization, module="double_sparse",
                    description="Double Sparse Factorization A @ B (Boža & Macko 2024)")
    register_method("dsf-exact", DoubleSparseFactorization, module="double_sparse",
                    params={"objective": "exact"},
                    description="DSF alternating on the exact calibrated objective")
    register_method("magnitude", MagnitudePruning, module="sparse",
                    description="keep the largest-magnitude weights")
    register_method("wanda", Wanda, module="sparse",
                    description="Wanda: |W| * input norm per output row (Sun et al. 2023)")
    register_method("sparsegpt", SparseGPT, module="sparse",
                    description="SparseGPT: OBS pruning with updates (Frantar & Alistarh 2023)")
    register_method("admm", ADMMPruning, module="sparse",
                    description="ADMM pruning with weight update (Boža 2024)")
    register_method("lowrank", LowRank, module="lowrank",
                    description="rank-r U @ V at the same parameter count (calibrated SVD)")
    from .structured import ButterflyFactorization, MonarchFactorization

    register_method("monarch", MonarchFactorization, kind="structured", module="monarch",
                    description="Monarch P L P^T R, block-diagonal L and R (Dao et al. 2022)")
    register_method("butterfly", ButterflyFactorization, kind="structured", module="butterfly",
                    description="product of log2(n) butterfly factors (Dao et al. 2019)")
    # The pruning-at-initialisation scorers (kind='scorer') are registered by
    # sparsefact.nn_adapters.prune_init, which needs torch.


_register_builtins()
