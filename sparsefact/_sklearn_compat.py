"""The one place that touches scikit-learn's private names.

``sklearn.base._fit_context`` and ``sklearn.utils._param_validation`` are private: they have
changed between releases and broken third-party estimators before. Every module of sparsefact
imports them from here, so a change in scikit-learn is fixed in one file. CI runs the estimator
checks against the oldest scikit-learn that ``pyproject.toml`` allows and against the newest.
"""

from __future__ import annotations

from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["Interval", "StrOptions", "_fit_context", "check_is_fitted", "validate_data", "validate_params"]


def validate_params(estimator) -> None:
    """Check an estimator's constructor parameters now (scikit-learn does it in ``fit``).

    Raises scikit-learn's ``InvalidParameterError`` (a ``ValueError``) naming the parameter.
    """
    estimator._validate_params()
