"""sparsefact: compress matrices and layers by Double Sparse Factorization (DSF).

A dense matrix ``W`` is replaced by the product of two sparse matrices ``A @ B``
(Boža & Macko, "Two Sparse Matrices are Better than One", arXiv 2409.18850), with
scikit-learn estimators, CPU (Numba) and GPU (CuPy) engines, and baselines under the
same API. torch, cupy and dask are optional and imported only where needed.
"""

from ._config import config_context, get_config
from .calibration import Calibration
from .compare import compare, plot_tradeoff
from .estimators import DoubleSparseFactorization, MagnitudePruning
from .lowrank import LowRank
from .metrics import relative_error
from .pruning import ADMMPruning, SparseGPT, Wanda

__version__ = "0.1.0"

__all__ = [
    "ADMMPruning",
    "Calibration",
    "DoubleSparseFactorization",
    "LowRank",
    "MagnitudePruning",
    "SparseGPT",
    "Wanda",
    "compare",
    "plot_tradeoff",
    "config_context",
    "get_config",
    "relative_error",
    "__version__",
]
