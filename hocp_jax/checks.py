"""Checks of numeric arguments (counts, sizes, thresholds, weights, rates).

A bad value is a ValueError naming the argument. :func:`check_real` checks a concrete value; a
traced one (under ``jit``) has no value to check and passes.
"""

from __future__ import annotations

from collections.abc import Callable

import numbers

import jax
import numpy as np


def is_int(value) -> bool:
    """Whether ``value`` is a Python or NumPy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_positive_int(value) -> bool:
    """Whether ``value`` is an integer (:func:`is_int`) >= 1, e.g. a width or a count."""
    return is_int(value) and value >= 1


def check_positive_int(value, name: str) -> int:
    """``value`` as an ``int`` if :func:`is_positive_int`, else ``ValueError("{name}={value!r}: expected an int >= 1")``."""
    if not is_positive_int(value):
        raise ValueError(f"{name}={value!r}: expected an int >= 1")
    return int(value)


def check_real(value, name: str, ok: Callable[[float], bool] = lambda v: v >= 0,
               expected: str = "a real number >= 0") -> None:
    """ValueError ``"{name}={value!r}: expected {expected}"`` unless ``value`` is traced or a real
    scalar (a Python or NumPy int or float, not a bool, string or array) for which ``ok`` holds
    (NaN fails every comparison)."""
    if isinstance(value, jax.core.Tracer):
        return
    a = np.asarray(value)
    real = a.ndim == 0 and (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating))
    if not (real and ok(float(a))):
        raise ValueError(f"{name}={value!r}: expected {expected}")
