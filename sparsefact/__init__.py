"""sparsefact: compress matrices and layers by Double Sparse Factorization (DSF).

A dense matrix ``W`` is replaced by the product of two sparse matrices ``A @ B``
(Boža & Macko, "Two Sparse Matrices are Better than One", arXiv 2409.18850), with
scikit-learn estimators, CPU (Numba) and GPU (CuPy) engines, and baselines under the
same API. torch, cupy and dask are optional and imported only where needed.
"""

from ._config import config_context, get_config
from .base import BaseCompressor, FitOutput
from .calibration import Calibration
from .compare import compare, plot_tradeoff
from .estimators import DoubleSparseFactorization
from .lowrank import LowRank
from .methods import MethodSpec, available_methods, get_method, register_method, unregister_method
from .metrics import relative_error
from .parallel import factorize_many
from .pruning import ADMMPruning, MagnitudePruning, SparseGPT, Wanda

__version__ = "0.1.0"

__all__ = [
    "ADMMPruning",
    "BaseCompressor",
    "Calibration",
    "DoubleSparseFactorization",
    "FitOutput",
    "LowRank",
    "MagnitudePruning",
    "MethodSpec",
    "SparseGPT",
    "Wanda",
    "available_methods",
    "compare",
    "factorize_many",
    "get_method",
    "register_method",
    "unregister_method",
    "plot_tradeoff",
    "config_context",
    "get_config",
    "relative_error",
    "__version__",
]
