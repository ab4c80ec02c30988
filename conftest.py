"""Settings that must be in place before anything imports SciPy (loaded first by pytest).

SciPy reads ``SCIPY_ARRAY_API`` once, at its first import; with it set, scikit-learn runs its
array-API estimator checks (array_api_strict, torch) in ``tests/test_sklearn_checks.py``
instead of skipping them.
"""

import os

os.environ.setdefault("SCIPY_ARRAY_API", "1")
