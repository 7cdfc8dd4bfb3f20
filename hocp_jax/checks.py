"""Checks of numeric arguments (counts, sizes, thresholds, weights, rates).

A bad value is a ValueError naming the argument. :func:`check_real` checks a concrete value; a
traced one (under ``jit``) has no value to check and passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numbers
import os

import jax
import numpy as np


def is_int(value) -> bool:
    """Whether ``value`` is a Python or NumPy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """Whether ``value`` is a real scalar number (a Python or NumPy int or float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_positive_int(value) -> bool:
    """Whether ``value`` is an integer (:func:`is_int`) >= 1, e.g. a width or a count."""
    return is_int(value) and value >= 1


def check_int(value, name: str, low: int) -> int:
    """``value`` as an ``int`` if it is an integer (:func:`is_int`) >= ``low``, else
    ``ValueError("{name}={value!r}: expected an int >= {low}")``."""
    if not (is_int(value) and value >= low):
        raise ValueError(f"{name}={value!r}: expected an int >= {low}")
    return int(value)


def check_positive_int(value, name: str) -> int:
    """:func:`check_int` with ``low=1``: a width, a count, a rank."""
    return check_int(value, name, 1)


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


def check_float_dtype(value, name: str = "dtype", none: bool = False) -> None:
    """A ValueError naming ``name`` unless ``value`` is a floating dtype (``jnp.float32``,
    ``"bfloat16"``, ...), or None where ``none`` (Flax's "promote the inputs' dtypes")."""
    if none and value is None:
        return
    try:
        ok = value is not None and jax.numpy.issubdtype(value, jax.numpy.floating)
    except TypeError:  # not a dtype at all, e.g. "float99"
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r}: expected a floating dtype such as jnp.float32 or 'bfloat16'"
                         + (", or None" if none else ""))


def check_key(key, name: str = "key") -> None:
    """A ValueError naming ``name`` unless ``key`` is a PRNG key: a typed key
    (``jax.random.key``) or a legacy ``uint32`` one (``jax.random.PRNGKey``), traced or not."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                              or (dtype == np.uint32 and np.shape(key)[-1:] == (2,))):
        return
    raise ValueError(f"{name}={key!r}: expected a PRNG key, e.g. jax.random.key(0)")


def check_flags(**flags) -> None:
    """A ValueError naming the first of a layer's on/off arguments (``skip``, ``use_bias``, ...)
    that is not a Python or NumPy bool (a string such as ``"no"`` would read as on)."""
    for name, v in flags.items():
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{name}={v!r}: expected True or False")


def is_path(value) -> bool:
    """Whether ``value`` is a non-empty ``str`` or ``os.PathLike`` (an empty path would be the
    current directory)."""
    return isinstance(value, (str, os.PathLike)) and bool(os.fspath(value))


def dangling_link(path) -> str | None:
    """The first of ``path`` (absolute) and its parents that does not exist and is a symbolic link,
    a link to nothing under which no directory can be made, or ``None``."""
    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path):
        if os.path.islink(path):
            return path
        path = os.path.dirname(path)
    return None


def are_positive_ints(value, empty: bool = False) -> bool:
    """Whether ``value`` is a sequence of ints >= 1 (sizes, widths, blocks per stage), non-empty
    unless ``empty`` (an int is not one, nor a string)."""
    return isinstance(value, Sequence) and (empty or len(value) > 0) and all(map(is_positive_int, value))


def check_axis(axis, ndim: int, where: str = "") -> None:
    """``ValueError("{where}axis={axis!r}: expected an int in [-ndim, ndim) ...")`` unless ``axis``
    is an int that indexes one of ``ndim`` axes."""
    if not (is_int(axis) and -ndim <= axis < ndim):
        raise ValueError(f"{where}axis={axis!r}: expected an int in [{-ndim}, {ndim}) for an array of {ndim} axes")
