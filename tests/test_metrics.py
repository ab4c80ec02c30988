"""Error measures (design.md §1): relative calibrated error and weighted norms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _data import gaussian

from sparsefact import relative_error
from sparsefact.metrics import weighted_sq_norm


def test_relative_error_plain_and_calibrated():
    W = gaussian(6, 5)
    W_hat = W + 0.1 * gaussian(6, 5, seed=1)
    X = gaussian(9, 5, seed=2)
    G = X.T @ X
    assert relative_error(W, W_hat) == pytest.approx(np.linalg.norm(W - W_hat) / np.linalg.norm(W))
    expected = np.linalg.norm((W - W_hat) @ X.T) / np.linalg.norm(W @ X.T)
    assert relative_error(W, W_hat, G) == pytest.approx(expected, rel=1e-12)
    assert relative_error(W, W_hat, np.eye(5)) == pytest.approx(relative_error(W, W_hat), rel=1e-12)
    assert weighted_sq_norm(W) == pytest.approx(np.sum(W * W))
    assert weighted_sq_norm(W, G) == pytest.approx(np.trace(W @ G @ W.T))


def test_relative_error_degenerate_denominator():
    zeros = np.zeros((3, 3))
    assert relative_error(zeros, zeros) == 0.0
    assert relative_error(zeros, np.ones((3, 3))) == math.inf


def test_relative_error_array_api_strict(xps):
    W, W_hat = gaussian(4, 4), gaussian(4, 4, seed=3)
    assert relative_error(xps.asarray(W), xps.asarray(W_hat)) == pytest.approx(relative_error(W, W_hat))
