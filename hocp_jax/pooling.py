r"""Max-pooling over trailing spatial axes with a gather-free gradient.

``max_pool(x, window, stride, padding)`` has the values and the gradient of
``lax.reduce_window(x, -inf, lax.max, ...)`` (the gradient goes to the *first* maximum of each
window in row-major window order, as XLA's ``select_and_scatter`` does). The forward pass takes
the max over the window's K taps (strided slices of the padded input) and, under autodiff, also
the index of each window's first maximum (int8 for up to 127 taps), which is all the backward pass
keeps: it is K masked shifts of the stride-dilated cotangent, the same "shift and add" scheme as
the depthwise passes of :mod:`hocp_jax.conv_ops`. The pool is a custom JVP whose tangent map is
written as the transpose of that backward pass (:func:`at_first`): ``jax.grad`` compiles to the
same XLA program as the custom VJP it had until stop 71, and forward mode (``jax.jvp``,
``jax.jacfwd``) works too. XLA CPU expands ``select_and_scatter`` into a
variadic ``reduce_window`` over one full-size int32 ``iota`` per axis plus a scatter, which made
the pool's backward one of the largest costs of a Jester or ResNet train step. (Until stop 65 the
backward pass found the first maximum again by comparing the saved input with the saved output.
Windows that tile the input were pooled as a reshape into blocks in stop 49; dropped in stop 50:
inside the Jester nets' train steps XLA CPU gave that backward pass wrong gradients,
benchmarks/EXPERIMENTS.md.)

``monotone_max_pool(x, scale, shift, activation, ..., center)`` is ``max_pool(activation((x -
center) * scale + shift))`` for a per-channel affine map and a non-decreasing activation (a batch
norm and its ReLU or ELU before a pool, as in the Jester net's blocks): it pools ``x`` itself (``-x`` on channels
with a negative scale) and applies the map and the activation to the pooled values only, so no
full-size activation is written, kept or read back (stop 66).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hocp_jax.checks import is_int, is_number


def _config(x_shape, window, stride, padding):
    """Per-axis ``(lo, hi)`` pads of all axes, the output shape and the pooled axes' offset."""
    lead = len(x_shape) - 1 - len(window)
    pads = ((0, 0),) * lead + tuple(tuple(p) for p in padding) + ((0, 0),)
    out = [(x_shape[lead + i] + sum(padding[i]) - window[i]) // stride[i] + 1 for i in range(len(window))]
    return lead, pads, tuple(x_shape[:lead]) + tuple(out) + (x_shape[-1],)


def _tap(xp, offsets, lead, stride, out_shape):
    """The strided slice of padded ``xp`` that window tap ``offsets`` sees, output-shaped."""
    starts = [0] * lead + list(offsets) + [0]
    limits = [s + (n - 1) * st + 1 for s, n, st in zip(starts, out_shape, (1,) * lead + tuple(stride) + (1,))]
    return lax.slice(xp, starts, limits, (1,) * lead + tuple(stride) + (1,))


def _max_and_first(x, window, stride, padding):
    """The pool's output and the index of each window's first maximum (row-major tap order)."""
    lead, pads, out_shape = _config(x.shape, window, stride, padding)
    xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in pads])
    taps = list(itertools.product(*map(range, window)))
    y = _tap(xp, taps[0], lead, stride, out_shape)
    first = jnp.zeros(out_shape, jnp.int8 if len(taps) <= 127 else jnp.int32)
    for j, t in enumerate(taps[1:], 1):
        v = _tap(xp, t, lead, stride, out_shape)
        first = jnp.where(v > y, jnp.asarray(j, first.dtype), first)  # strictly greater: ties keep the first
        y = jnp.maximum(y, v)
    return y, first


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, padding):
    return _max_and_first(x, window, stride, padding)[0]


@_max_pool.defjvp
def _max_pool_jvp(window, stride, padding, primals, tangents):
    (x,), (t,) = primals, tangents
    y, first = _max_and_first(x, window, stride, padding)
    # Checkpointed: reverse mode keeps `first` and derives at_first's masks from it in the backward
    # pass, instead of keeping K input-sized masks; prevent_cse=False: no barrier inside a jit.
    tangent = jax.checkpoint(lambda f, t: at_first(f, t, window, stride, padding), prevent_cse=False)
    return y, tangent(first, t)


def at_first(first: jax.Array, t: jax.Array, window, stride, padding) -> jax.Array:
    """The pool's tangent map: ``t`` (shaped like the pool's input) read at each window's first
    maximum, tap ``first`` (shaped like the output) -> output-shaped.

    Written as the transpose of the pool's backward pass, so that reverse mode (JAX's transpose of
    this linear map) runs that pass: the cotangent padded once onto the stride-dilated grid of the
    padded input (output ``o`` of a pooled axis at row ``k - 1 + o * stride``), and per tap ``j``
    the slice of it that tap ``j`` reads, kept where ``j`` is the first maximum of that window
    (the index padded the same way), summed over the taps. Here, per tap, the masked ``t`` is
    padded back into that grid, and the sum is read on the output grid (a strided slice); the
    taps run in reverse so that the transposed sum runs in tap order. Forward mode (``jax.jvp``)
    evaluates it as written: K input-sized pads, correct but slower than the backward pass."""
    x_shape = t.shape
    lead, _, out_shape = _config(x_shape, window, stride, padding)
    cfg = [(0, 0, 0)] * lead + [
        (k - 1, x_shape[lead + i] + sum(padding[i]) - ((n - 1) * s + 1), s - 1)
        for i, (k, s, n) in enumerate(zip(window, stride, out_shape[lead:-1]))
    ] + [(0, 0, 0)]
    fd = lax.pad(first, jnp.array(-1, first.dtype), cfg)
    zero = jnp.zeros((), t.dtype)
    grid = None
    for j, tap in reversed(list(enumerate(itertools.product(*map(range, window))))):
        starts = [0] * lead + [k - 1 - ti + padding[i][0] for i, (k, ti) in enumerate(zip(window, tap))] + [0]
        limits = [s + n for s, n in zip(starts, x_shape)]
        kept = jnp.where(lax.slice(fd, starts, limits) == j, t, zero)
        part = lax.pad(kept, zero, [(s, n - lim, 0) for s, lim, n in zip(starts, limits, fd.shape)])
        grid = part if grid is None else grid + part
    return lax.slice(grid, [lo for lo, _, _ in cfg], [lo + (n - 1) * (d + 1) + 1 for (lo, _, d), n in zip(cfg, out_shape)],
                     [d + 1 for _, _, d in cfg])


ACTIVATIONS = {"linear": lambda z: z, "relu": jax.nn.relu, "elu": jax.nn.elu}  # all non-decreasing


def monotone_max_pool(x: jax.Array, scale: jax.Array, shift: jax.Array, activation: str, window: Sequence[int],
                      stride: Sequence[int], padding: Sequence[tuple[int, int]], center=0.0) -> jax.Array:
    """``max_pool(ACTIVATIONS[activation]((x - center) * scale + shift), window, stride, padding)``,
    computed in pooled space.

    Per channel ``c`` the map ``v -> act((v - center[c]) scale[c] + shift[c])`` is monotone, so each window's
    maximum of it is the map of the window's maximum of ``s x`` times ``s``, ``s = -1`` where
    ``scale < 0`` and ``+1`` elsewhere: the pool reads ``x`` once and the map runs on the pooled
    values. Same values as the composition (float rounding is monotone, so up to the activation's
    own rounding); its gradient goes to each window's first maximum of ``s x``, which is the
    composition's first maximum except where rounding makes distinct inputs tie after the map
    (where ``scale`` is 0 all tie: the gradient w.r.t. ``scale`` then takes each window's
    largest ``x``, the right derivative, the composition's its first ``x``).
    With ``scale`` and ``shift`` depending on ``x`` (batch statistics), autodiff adds their terms.

    Args:
      x: ``(*lead, S_1, ..., S_n, C)``, floating point (see :func:`max_pool`).
      scale, shift: ``(C,)`` each.
      activation: a key of :data:`ACTIVATIONS` (each non-decreasing).
      window, stride, padding: as in :func:`max_pool` (the pads never win a window).
      center: a scalar or ``(C,)`` (a batch norm's mean: ``(x - mean) * scale`` as Flax's
        BatchNorm computes it, without the cancellation of ``x * scale - mean * scale``).

    Returns:
      ``(*lead, O_1, ..., O_n, C)`` in ``result_type(x, scale, shift, center)``.
    """
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {sorted(ACTIVATIONS)} (non-decreasing)")
    for name, v, shapes in (("scale", scale, [(x.shape[-1],)]), ("shift", shift, [(x.shape[-1],)]),
                            ("center", center, [(), (x.shape[-1],)])):
        array = isinstance(v, (jax.Array, np.ndarray)) or is_number(v)
        if not array or jnp.shape(v) not in shapes:
            got = f"shape {jnp.shape(v)}" if array else f"a {type(v).__name__}, not an array"
            raise ValueError(f"{name}: {got}; expected {' or '.join(map(str, shapes))} (x has {x.shape[-1]} channels)")
    sign = lax.stop_gradient(jnp.where(scale < 0, -1, 1)).astype(x.dtype)
    x_max = sign * max_pool(sign * x, window, stride, padding)  # the selected x of each window
    dtype = jnp.result_type(x, scale, shift, center)
    return ACTIVATIONS[activation]((x_max.astype(dtype) - center) * scale.astype(dtype) + shift.astype(dtype))


def max_pool(x: jax.Array, window: Sequence[int], stride: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
    """Max-pool ``x`` ``(..., *S, C)`` over the ``len(window)`` axes before the channels.

    Args:
      x: ``(*lead, S_1, ..., S_n, C)``, floating point; leading axes (batch, time) are left alone.
      window, stride: ``n`` ints each.
      padding: ``n`` explicit ``(lo, hi)`` pairs, padded with ``-inf`` (each smaller than its window).

    Returns:
      ``(*lead, O_1, ..., O_n, C)`` with ``O_i = (S_i + lo_i + hi_i - window_i) // stride_i + 1``.
    """
    def ints(v, name):  # not int(): a 2.7 window would silently pool 2
        if isinstance(v, str) or not isinstance(v, Sequence) or not all(map(is_int, v)):
            raise ValueError(f"{name}={v!r}: expected a sequence of ints, one per pooled axis")
        return tuple(int(e) for e in v)

    window, stride = ints(window, "window"), ints(stride, "stride")
    if isinstance(padding, str) or not isinstance(padding, Sequence) or not all(
            isinstance(p, Sequence) and len(p) == 2 and all(map(is_int, p)) for p in padding):
        raise ValueError(f"padding={padding!r}: expected explicit (low, high) int pairs, one per pooled axis")
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    n = len(window)
    if len(stride) != n or len(padding) != n:
        raise ValueError(f"window={window}, stride={stride}, padding={padding}: expected one entry per pooled axis")
    if not isinstance(x, (jax.Array, np.ndarray)):
        raise ValueError(f"x: a {type(x).__name__}; expected an array")
    if x.ndim < n + 1:
        raise ValueError(f"x: shape {tuple(x.shape)} has fewer than {n} spatial axes plus channels")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: dtype {x.dtype} is not floating point")
    for i, (k, s, (lo, hi)) in enumerate(zip(window, stride, padding)):
        size = x.shape[x.ndim - 1 - n + i]
        if k < 1 or s < 1 or not 0 <= lo < k or not 0 <= hi < k or (is_int(size) and size + lo + hi < k):
            raise ValueError(f"pooled axis {i}: window {k}, stride {s}, padding {(lo, hi)} do not fit size {size} "
                             "(expected window, stride >= 1, 0 <= pads < window, padded size >= window)")
    return _max_pool(x, window, stride, padding)
