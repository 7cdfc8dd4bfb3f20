"""Code variants that were measured against the library and not kept, kept here so that the
experiments that measured them can run again: the ResNet with its stem treated as an inner layer,
the merged 2-D depthwise pass and the C_in-first kernel rebuild, the depthwise passes folded into the input contraction, channels-first
intermediates, batch chunks, and the 1x1 contraction, max-pool (the backward pass that recomputes the first maximum, and the tiling-window block path), the models' batch norm ->
activation -> max-pool blocks on full-size activations, and the models' 1x1 and
depthwise convs (XLA's convolution) as they were before their current versions. (The dense conv written as a patches matrix product, the benchmark's second JAX
dense program, is in :mod:`benchmarks.patches`.) Loading ``hocp_jax/conv.py`` at an older git revision is here too."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import subprocess
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from hocp_jax import conv, conv_ops, conv_plans, pooling
from hocp_jax.pooling import max_pool
from hocp_jax.models.common import BN_EPSILON, BN_MOMENTUM
from hocp_jax.models.resnet import ResNet, hocp_factory


class ResNetStemWithInputGrad(ResNet):
    """The HO-CP ResNet with its stem treated like an inner layer (``input_grad=True``, the
    previous behaviour): :func:`hocp_factory` sets ``input_grad=False`` for a conv named
    ``"stem"`` only, so the stem is built under another name (parameter names do not matter here)."""

    def factory(self):
        def make(*args, name, **kwargs):
            return hocp_factory(*args, name="stem_with_input_grad" if name == "stem" else name, psi=self.psi,
                                shortcut=self.shortcut, implementation=self.implementation, **kwargs)

        return make


def conv_at(revision: str):
    """``hocp_jax/conv.py`` as it was at git ``revision``, loaded as a module of its own (it imports
    the current rest of ``hocp_jax``). Needs a git checkout."""
    import importlib.util
    import tempfile

    source = subprocess.run(["git", "show", f"{revision}:hocp_jax/conv.py"], capture_output=True, text=True, check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
        f.write(source.stdout)
        f.flush()
        spec = importlib.util.spec_from_file_location("conv_at_revision", f.name)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
    return other


def cp_conv_merged(x, p, strides, pads):
    """Factorized 2-D CP conv whose two depthwise passes are one pass of the merged 3x3 per-rank
    kernel (9 taps; the per-mode passes do 3 + 3 over an intermediate)."""
    kernel = p["factor_h"][:, None, :] * p["factor_w"][None, :, :]
    h = conv_ops.depthwise_conv(conv_ops.channel_matmul(x, p["factor_in"]), kernel, stride=strides, padding=pads)
    return conv_ops.channel_matmul(h, (p["factor_out"] * p["lambda"]).T)


def cp_conv_rebuild_in_first(x, p, strides, pads):
    """Reconstructed 2-D CP conv with the kernel rebuilt as ``(C_in K_h, R) x (R, K_w C_out)`` into
    ``(C_in, K_h, K_w, C_out)``, the layout of XLA's weight gradient here (so that gradient
    reshapes into the rebuild's backward products without a transpose); the conv reads the kernel
    in that order (``rhs_spec``)."""
    c_in, k_h, k_w, c_out = (p[k].shape[0] for k in ("factor_in", "factor_h", "factor_w", "factor_out"))
    left = (p["factor_in"][:, None] * p["factor_h"][None] * p["lambda"]).reshape(c_in * k_h, -1)
    right = (p["factor_w"][:, None] * p["factor_out"][None]).reshape(k_w * c_out, -1)
    kernel = (left @ right.T).reshape(c_in, k_h, k_w, c_out)
    numbers = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 0, 1, 2), out_spec=(0, 3, 1, 2))
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=numbers)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_channels_first(h, factor, axis, pad):
    """Stride-1 depthwise 1-D conv of ``h (B, R, *S)`` along ``axis`` with ``factor (K, R)``."""
    return _shift_sum(conv_ops.pad_axis(h, axis, pad), _rank_first(factor, h.ndim), axis, h.shape[axis])


def _shift_sum(hp, factor, axis, size):
    """``sum_k factor[k] * hp[k : k + size]`` along ``axis``."""
    return functools.reduce(jnp.add, (lax.slice_in_dim(hp, t, t + size, 1, axis) * factor[t] for t in range(factor.shape[0])))


def _rank_first(factor, ndim):
    """``factor (K, R)`` -> ``(K, R, 1, ..., 1)``, broadcasting against a (R, *S) slice."""
    return factor.reshape(factor.shape + (1,) * (ndim - 2))


def _depthwise_channels_first_fwd(h, factor, axis, pad):
    return _depthwise_channels_first(h, factor, axis, pad), (h, factor)


def _depthwise_channels_first_bwd(axis, pad, res, g):
    h, factor = res
    k = factor.shape[0]
    cfg = [(0, 0)] * g.ndim
    cfg[axis] = (k - 1 - pad[0], k - 1 - pad[1])
    dh = _shift_sum(jnp.pad(g, cfg), _rank_first(factor[::-1], h.ndim), axis, h.shape[axis])
    hp = conv_ops.pad_axis(h, axis, pad)
    sum_axes = (0,) + tuple(range(2, h.ndim))
    dfactor = jnp.stack([jnp.sum(lax.slice_in_dim(hp, t, t + g.shape[axis], 1, axis) * g, axis=sum_axes)
                         for t in range(k)])
    return dh, dfactor


_depthwise_channels_first.defvjp(_depthwise_channels_first_fwd, _depthwise_channels_first_bwd)


def cp_channels_first(x, p, modes):
    """Factorized stride-1 'SAME' CP conv of ``x (B, *S, C)`` with (B, R, *S) intermediates."""
    n = x.ndim - 2
    h = jnp.moveaxis(jnp.einsum("...c,cr->...r", x, p["factor_in"]), -1, 1)
    for i, m in enumerate(modes):
        f = p[conv.mode_key(m)]
        h = _depthwise_channels_first(h, f, i + 2, ((f.shape[0] - 1) // 2, f.shape[0] // 2))
    letters = "defgh"[:n]
    return jnp.einsum(f"br{letters},tr->b{letters}t", h, p["factor_out"] * p["lambda"][None, :])


def cp_conv_folded(x, p, modes, folded):
    """Factorized stride-1 CP conv of ``x (B, *S, C_in)`` (odd kernels, 'SAME' padding) whose
    depthwise passes along ``folded`` (a leading run of ``modes``) are folded into the input
    contraction: one matrix product of the ``prod K`` shifted copies of the input, ``(B, *S,
    C_in prod K)``, with the partly rebuilt kernel ``(prod K C_in, R)``; then the passes along the
    other modes and the output contraction, one sample at a time (``per_sample``'s loop, no tiles).
    The folded contraction does ``prod K`` times the input contraction's FLOPs and saves
    ``len(folded)`` passes over the ``(*S, R)`` intermediate."""
    rest = [(1 + modes.index(m), p[conv.mode_key(m)]) for m in modes if m not in folded]
    letters = "xyz"[:len(folded)]
    w = jnp.einsum(",".join(f"{a}r" for a in letters) + ",cr->" + letters + "cr",
                   *(p[conv.mode_key(m)] for m in folded), p["factor_in"]).reshape(-1, p["factor_in"].shape[1])
    w_out = (p["factor_out"] * p["lambda"]).T
    kernel = [p[conv.mode_key(m)].shape[0] if m in folded else 1 for m in modes]
    pads = [((k - 1) // 2, k // 2) for k in kernel]

    def one(xs):
        copies = conv_ops.tap_inputs(xs, kernel, (1,) * len(modes), pads, (1,) * len(modes), xs.shape[1:-1])
        h = conv_ops.channel_matmul(jnp.concatenate(list(copies), axis=-1), w)
        for axis, f in rest:
            h = conv_ops.depthwise_conv_1d(h, f, axis, stride=1, pad=((f.shape[0] - 1) // 2, f.shape[0] // 2), dilation=1)
        return conv_ops.channel_matmul(h, w_out)

    return conv_ops.map_chunks(one, x)


def chunked(fn, k):
    """``fn(x, p)`` applied to batch chunks of ``k`` samples one after another (``lax.map``)."""
    def f(x, p):
        y = lax.map(lambda xi: fn(xi, p), x.reshape((x.shape[0] // k, k) + x.shape[1:]))
        return y.reshape((x.shape[0],) + y.shape[2:])
    return f


def einsum_contraction(x, w):
    """The 1x1 contraction as it was before :func:`hocp_jax.conv_ops.channel_matmul`."""
    return jnp.einsum("...c,cr->...r", x, w)


def reduce_window_pool(x, window, stride, padding):
    """The max-pool as it was before :mod:`hocp_jax.pooling`: ``lax.reduce_window`` and its
    XLA ``select_and_scatter`` gradient."""
    lead = x.ndim - 1 - len(window)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1,) * lead + tuple(window) + (1,),
                             (1,) * lead + tuple(stride) + (1,), ((0, 0),) * lead + tuple(padding) + ((0, 0),))


def custom_vjp_map_chunks(f: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int = 1, loop: bool = False) -> jax.Array:
    """:func:`hocp_jax.conv_ops.map_chunks` as it was until stop 71: the same loops, its backward
    pass a ``jax.custom_vjp`` (reverse mode only), where the library now has a custom JVP whose
    tangent is a checkpointed loop of each chunk's JVP. Its callers pass a valid ``chunk`` (the
    library's ``map_chunks`` checks it)."""
    in_loop = conv_plans.loop_mode if loop else contextlib.nullcontext
    # traced in the loop's block: stop 70's per-tap kernel-gradient conv read the loop mode when
    # its backward pass was traced (in run_bwd's block), the library's reads it with the forward pass
    with in_loop():
        fc, consts = jax.closure_convert(f, x[:chunk])  # closed-over float arrays become explicit arguments
    # The loop runs over (B / chunk, chunk, ...) slices; with chunk 1 over the samples themselves,
    # given a batch axis of 1 in the loop body (the per-sample program from before chunks existed).
    one = chunk == 1
    lift, drop = ((lambda a: a[None]), (lambda a: a[0])) if one else ((lambda a: a), (lambda a: a))

    @jax.custom_vjp
    def run(xs, *consts):
        with in_loop():
            return lax.map(lambda xi: drop(fc(lift(xi), *consts)), xs)

    def run_fwd(xs, *consts):
        return run(xs, *consts), (xs, consts)

    def run_bwd(res, g):
        xs, consts = res

        def body(acc, xg):
            dxi, *dc = jax.vjp(fc, lift(xg[0]), *consts)[1](lift(xg[1]))
            return [a + d for a, d in zip(acc, dc)], drop(dxi)

        with in_loop():
            dc, dx = lax.scan(body, [jnp.zeros_like(c) for c in consts], (xs, g))
        return (dx, *dc)

    run.defvjp(run_fwd, run_bwd)
    y = run(x if one else x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:]), *consts)
    return y if one else y.reshape(x.shape[:1] + y.shape[2:])


def custom_vjp_shift_depthwise(h, kernel, strides, pads, dilations):
    """The depthwise shift kernel of :mod:`hocp_jax.conv_ops` as it was until stop 71 (a stand-in
    for ``conv_ops._shift_depthwise``): the same forward and backward passes, as a
    ``jax.custom_vjp`` (no forward mode), where the library now has a custom JVP whose tangent map
    is that backward pass transposed."""
    return _shift_depthwise_vjp(*conv_ops.vary_alike(h, kernel), strides, pads, dilations)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shift_depthwise_vjp(h, kernel, strides, pads, dilations):
    return conv_ops._shift_conv(h, kernel, strides, pads, dilations)


def _shift_depthwise_fwd(h, kernel, strides, pads, dilations):
    return conv_ops._shift_conv(h, kernel, strides, pads, dilations), (h, kernel)


def _shift_depthwise_bwd(strides, pads, dilations, res, g):
    """Input gradient = the same shift kernel on the stride-dilated, re-padded cotangent with
    the flipped kernel; kernel gradient = per tap, sum of the tap's input slice times ``g``."""
    h, kernel = res
    ks, outs = kernel.shape[:-1], g.shape[1:-1]
    cfg = [((k - 1) * d - lo, n + lo - (o - 1) * s - 1, s - 1)
           for n, k, (lo, _), s, d, o in zip(h.shape[1:-1], ks, pads, strides, dilations, outs)]
    gp = lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0), *cfg, (0, 0, 0)])
    flipped = lax.rev(kernel, [a for a, k in enumerate(ks) if k > 1])
    dh = conv_ops._shift_conv(gp, flipped, (1,) * len(ks), ((0, 0),) * len(ks), dilations)
    sum_axes = tuple(range(h.ndim - 1))
    dk = jnp.stack([jnp.sum(xt * g, axis=sum_axes) for xt in conv_ops.tap_inputs(h, ks, strides, pads, dilations, outs)])
    return dh, dk.reshape(kernel.shape).astype(kernel.dtype)


_shift_depthwise_vjp.defvjp(_shift_depthwise_fwd, _shift_depthwise_bwd)


def custom_vjp_pool(x, window, stride, padding):
    """The max-pool of :mod:`hocp_jax.pooling` as it was until stop 71: the same forward pass and
    backward pass, as a ``jax.custom_vjp`` (no forward mode), where the library now has a custom
    JVP whose tangent map is that backward pass transposed (:func:`hocp_jax.pooling.at_first`)."""
    return _max_pool_vjp(x, tuple(window), tuple(stride), tuple(tuple(p) for p in padding), tuple(x.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_vjp(x, window, stride, padding, x_shape):
    return pooling._max_and_first(x, window, stride, padding)[0]


def _max_pool_vjp_fwd(x, window, stride, padding, x_shape):
    return pooling._max_and_first(x, window, stride, padding)


def _max_pool_bwd(window, stride, padding, x_shape, first, g):
    lead, _, out_shape = pooling._config(x_shape, window, stride, padding)
    # Stride-dilate the cotangent and the tap index, pad by (k - 1) before: position q - t of the
    # result then holds output o with o * stride == q - t, so tap t's share of input q is a slice.
    cfg = [(0, 0, 0)] * lead + [
        (k - 1, x_shape[lead + i] + sum(padding[i]) - ((n - 1) * s + 1), s - 1)
        for i, (k, s, n) in enumerate(zip(window, stride, out_shape[lead:-1]))
    ] + [(0, 0, 0)]
    gd = lax.pad(g, jnp.zeros((), g.dtype), cfg)
    fd = lax.pad(first, jnp.array(-1, first.dtype), cfg)
    dx = jnp.zeros(x_shape, g.dtype)
    for j, t in enumerate(itertools.product(*map(range, window))):
        starts = [0] * lead + [k - 1 - ti + padding[i][0] for i, (k, ti) in enumerate(zip(window, t))] + [0]
        limits = [s + n for s, n in zip(starts, x_shape)]
        dx = dx + jnp.where(lax.slice(fd, starts, limits) == j, lax.slice(gd, starts, limits), 0)
    return (dx,)


_max_pool_vjp.defvjp(_max_pool_vjp_fwd, _max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_recomputed(x, window, stride, padding):
    return max_pool(x, window, stride, padding)


def _max_pool_recomputed_fwd(x, window, stride, padding):
    y = max_pool(x, window, stride, padding)
    return y, (x, y)


def _max_pool_recomputed_bwd(window, stride, padding, res, g):
    x, y = res
    lead, pads, out_shape = pooling._config(x.shape, window, stride, padding)
    xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in pads])
    taps = list(itertools.product(*map(range, window)))
    first = jnp.full(out_shape, -1, jnp.int32)  # the first tap equal to the saved max
    for j in reversed(range(len(taps))):
        first = jnp.where(pooling._tap(xp, taps[j], lead, stride, out_shape) == y, j, first)
    return _max_pool_bwd(window, stride, padding, x.shape, first, g)


_max_pool_recomputed.defvjp(_max_pool_recomputed_fwd, _max_pool_recomputed_bwd)


class UnfusedNormActPool(nn.BatchNorm):
    """The models' batch norm -> activation -> max-pool as they ran until stop 65: Flax's
    BatchNorm, the activation on its full-size output, then the library's max-pool of that (the
    variables of :class:`hocp_jax.models.common.NormActPool`, which computes the same block in
    pooled space). Built by :func:`unfused_norm_act_pool`."""

    activation: str = "relu"
    window: tuple = ()
    stride: tuple = ()
    padding: tuple = ()
    pool: Callable = max_pool

    def __call__(self, x):
        return self.pool(pooling.ACTIVATIONS[self.activation](super().__call__(x)), self.window, self.stride,
                         self.padding)


def unfused_norm_act_pool(activation, window, stride, padding, pool=max_pool, **kwargs):
    """:class:`UnfusedNormActPool` with ``NormActPool``'s signature and defaults (train mode, the
    models' ``BN_MOMENTUM`` and ``BN_EPSILON``), to stand in for
    ``hocp_jax.models.common.NormActPool``; ``pool``: the max-pool."""
    defaults = {"momentum": BN_MOMENTUM, "epsilon": BN_EPSILON, "use_running_average": False}
    return UnfusedNormActPool(activation=activation, window=tuple(window), stride=tuple(stride),
                              padding=tuple(map(tuple, padding)), pool=pool, **defaults | kwargs)


def recomputed_index_pool(x, window, stride, padding):
    """The max-pool of :mod:`hocp_jax.pooling` as it was from stop 50 to stop 64: the VJP keeps the
    input and the output, and the backward pass finds each window's first maximum again by
    comparing the padded input's taps with the output (a full-size int32 index), where the library
    now computes that index in the forward pass and keeps only it. The same stride-dilated
    backward pass after that."""
    return _max_pool_recomputed(x, tuple(window), tuple(stride), tuple(tuple(p) for p in padding))


def _blocks(x, window):
    """``(blocks, axes, covered)``: ``x`` cut to the part the windows cover (shape ``covered``;
    window == stride, no padding) and reshaped to ``(*lead, O_1, k_1, ..., O_n, k_n, C)``, whose
    window axes are ``axes``."""
    lead = x.ndim - 1 - len(window)
    out = [x.shape[lead + i] // k for i, k in enumerate(window)]
    covered = x[(slice(None),) * lead + tuple(slice(0, o * k) for o, k in zip(out, window))]
    blocks = covered.reshape(x.shape[:lead] + tuple(v for o, k in zip(out, window) for v in (o, k)) + x.shape[-1:])
    return blocks, tuple(lead + 2 * i + 1 for i in range(len(window))), covered.shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_blocks(x, window):
    blocks, axes, _ = _blocks(x, window)
    return jnp.max(blocks, axis=axes)


def _max_pool_blocks_fwd(x, window):
    y = _max_pool_blocks(x, window)
    return y, (x, y)


def _max_pool_blocks_bwd(window, res, g):
    x, y = res
    blocks, axes, covered = _blocks(x, window)
    # each element's row-major index within its window; the gradient goes to the first maximum
    tap = sum(lax.broadcasted_iota(jnp.int32, blocks.shape, a) * math.prod(window[i + 1:]) for i, a in enumerate(axes))
    first = jnp.min(jnp.where(blocks == jnp.expand_dims(y, axes), tap, math.prod(window)), axis=axes, keepdims=True)
    dx = jnp.where(tap == first, jnp.expand_dims(g, axes), jnp.zeros((), g.dtype)).reshape(covered)
    return (jnp.pad(dx, [(0, n - c) for n, c in zip(x.shape, covered)]),)  # rows left over get no gradient


_max_pool_blocks.defvjp(_max_pool_blocks_fwd, _max_pool_blocks_bwd)


def block_pool(x, window, stride, padding):
    """The max-pool of windows that tile the input (window == stride, no padding) as
    :mod:`hocp_jax.pooling` ran it in stop 49, dropped in stop 50: a reshape into blocks and a max
    over the window axes, whose backward pass is one masked broadcast of the cotangent to the
    first maximum. Right alone (the tests of stop 49, and on the Jester activations' shapes), but
    inside ``bench``'s full-size Jester train steps XLA CPU (jax 0.10.2) computed its comparison
    of the saved input with the saved maximum as unequal in 24 % and 19 % of the third and fourth
    pools' windows (whose gradient was then lost): the steps' convolution gradients were 44-64 %
    off (:func:`benchmarks.experiments.steps.pool_blocks` records it)."""
    if tuple(window) != tuple(stride) or any(lo or hi for lo, hi in padding):
        raise ValueError(f"window={window}, stride={stride}, padding={padding}: expected windows that tile the input")
    return _max_pool_blocks(x, tuple(window))


@contextlib.contextmanager
def lax_convs(pointwise: bool = True, depthwise: bool = True):
    """Models traced inside run their 1x1 (``pointwise``) and/or depthwise convs as XLA's
    convolution, as before :func:`hocp_jax.conv_ops.conv_general_dilated` routed them to a matrix
    product and the shift kernel (the models read ``conv_ops.conv_general_dilated`` when traced)."""
    fast = conv_ops.conv_general_dilated

    to_lax = {"pointwise": pointwise, "depthwise": depthwise}  # other routes: the library's

    def patched(lhs, rhs, window_strides, padding, **kwargs):
        convolution = lax.conv_general_dilated if to_lax.get(conv_ops.conv_route(lhs, rhs, **kwargs), False) else fast
        return convolution(lhs, rhs, window_strides, padding, **kwargs)

    conv_ops.conv_general_dilated = patched
    try:
        yield
    finally:
        conv_ops.conv_general_dilated = fast
