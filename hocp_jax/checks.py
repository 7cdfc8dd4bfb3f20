"""Checks of the numeric arguments of the pure functions (thresholds, weights, rates).

A concrete value is checked and a bad one is a ValueError naming the argument; a traced value
(under ``jit``) has no value to check and passes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np


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
