"""Numbers never change by accident: float64 factors of every method equal the frozen ones.

``tests/golden_cases.py`` lists a fixed set of matrices (square, wide, tall; plain and
calibrated) and method settings; ``tests/data/golden_float64.npz`` holds their float64
results as computed before the registry refactor (issue 12). Every refit must be
bit-identical: a refactor may move code, not change arithmetic. If a change of numbers is
intended, regenerate the file on purpose (``python -m tests.golden_cases``) and say why in the
commit.
"""

from __future__ import annotations

import numpy as np
import pytest
from golden_cases import GOLDEN_PATH, compute


@pytest.fixture(scope="module")
def fresh() -> dict[str, np.ndarray]:
    return compute()


def test_every_golden_array_is_reproduced_bit_for_bit(fresh):
    golden = np.load(GOLDEN_PATH)
    assert set(fresh) == set(golden.files)
    different = [key for key in golden.files if not np.array_equal(fresh[key], golden[key])]
    assert different == [], f"{len(different)} arrays changed, e.g. {different[:5]}"
