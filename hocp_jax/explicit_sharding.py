"""Arrays under explicit sharding (``jax.sharding.AxisType.Explicit``, ``jax.make_mesh``'s default).

Under explicit axes an array's type holds its sharding, also inside ``jit`` (``jax.typeof(x)``),
and JAX checks every op's sharding rule at trace time. Some ops have none for some splits (jax
0.10.2): the kernel gradient of ``lax``'s conv (``ShardingTypeError``, asking for an output
sharding; ``flax.linen.Conv`` too, also on a batch-only split), a reshape that merges a split
axis into others, optax's simplex projection on a split batch. The library reads the split
here and runs such ops under ``jax.sharding.auto_axes`` (XLA then propagates the shardings
itself) or in a form that has a rule. Nothing here changes a program whose input carries no
explicit split (auto axes, as ``train.py``'s mesh has, or no mesh).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import PartitionSpec

from hocp_jax.checks import check_axis


def spec_of(x) -> tuple:
    """One entry per axis of ``x``: the mesh axis name(s) it is split over, or ``None``."""
    spec = tuple(getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) or ())
    return spec + (None,) * (np.ndim(x) - len(spec))


def is_split(x) -> bool:
    """Whether ``x``'s type splits any of its axes over devices."""
    return any(a is not None for a in spec_of(x))


def splits_inner_axes(x) -> bool:
    """Whether ``x``'s type splits an axis other than its first and last (e.g. an image's rows):
    a reshape that merges it with others has no sharding rule."""
    return any(a is not None for a in spec_of(x)[1:-1])


def shards(x, axis: int) -> int | None:
    """Over how many devices ``x``'s ``axis`` is split, ``None`` if its type does not split it."""
    spec = spec_of(x)
    check_axis(axis, len(spec))
    axes = spec[axis]
    if axes is None:
        return None
    mesh = jax.typeof(x).sharding.mesh
    return int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))


def run_auto(fn: Callable[..., jax.Array], x, *args, out_spec: PartitionSpec) -> jax.Array:
    """``fn(x, *args)`` under ``jax.sharding.auto_axes`` with output sharding ``out_spec`` when
    ``x`` is split (:func:`is_split`), else plainly."""
    if not is_split(x):
        return fn(x, *args)
    return jax.sharding.auto_axes(fn, out_sharding=out_spec)(x, *args)


def kept_splits(x, out_shape) -> PartitionSpec:
    """The output spec of a channels-last map from ``x`` to ``out_shape`` (a conv): each of
    ``x``'s batch and spatial splits kept where the output size still divides over its devices,
    the channel axis unsplit."""
    spec, kept = spec_of(x), []
    for axis, size in enumerate(out_shape[:-1]):
        n = shards(x, axis)
        kept.append(spec[axis] if n and size % n == 0 else None)
    return PartitionSpec(*kept, None)
