"""A toy compression method defined only through the public seams (docs/adding_a_method.md).

``KeepDiagonal`` keeps the main diagonal of ``W`` (as many of its entries as the budget
allows) and zeroes the rest. It is one class and one registry entry, nothing else; the tests
use it to show that a user's method works everywhere a built-in one does.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

from sparsefact import BaseCompressor, FitOutput
from sparsefact._sklearn_compat import Interval
from sparsefact.masks import kept_budget

NAME = "keep-diagonal"


class KeepDiagonal(BaseCompressor):
    """Keep ``W``'s main diagonal, at most ``floor(density * m * n)`` entries of it."""

    _parameter_constraints: dict = {
        **BaseCompressor._parameter_constraints,
        "density": [Interval(Real, 0, 1, closed="right")],
    }
    _needs = "none"

    def __init__(self, density: float = 0.5, *, backend: str = "auto") -> None:
        self.density = density
        self.backend = backend

    def _fit(self, W: Any, gram: Any, engine: Any) -> FitOutput:
        xp = engine.xp
        m, n = W.shape
        count = min(min(m, n), kept_budget(self.density, m * n))
        rows = xp.arange(m)[:, None]
        cols = xp.arange(n)[None, :]
        keep = (rows == cols) & (rows < count)
        pruned = xp.where(keep, W, xp.zeros_like(W))
        self.weight_ = engine.to_sparse(pruned)
        return FitOutput(factors=(pruned,))
