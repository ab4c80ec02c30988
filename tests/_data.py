"""Test data generators shared by the test modules."""

from __future__ import annotations

import numpy as np


def gaussian(m: int, n: int, dtype=np.float64, seed: int = 0) -> np.ndarray:
    """A standard-normal ``m x n`` matrix (C order) in ``dtype``."""
    return np.random.default_rng(seed).standard_normal((m, n)).astype(dtype)


def scaled_activations(n_tokens: int, n: int, seed: int = 1, spread: float = 3.0) -> np.ndarray:
    """Activations whose feature scales differ by up to ``10**spread`` (like LLM outliers)."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(0.0, spread, n)
    rng.shuffle(scales)
    return rng.standard_normal((n_tokens, n)) * scales[None, :]
