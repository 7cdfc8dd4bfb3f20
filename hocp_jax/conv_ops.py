"""The convolutions the factorized convs of :mod:`hocp_jax.conv` are built from, and how the
library runs them (channels-last: ``x (B, *S, C)``, kernels ``(*K, C_in, C_out)``).

* Convs of a given kernel: :func:`dense_conv` and :func:`conv_general_dilated`, a drop-in for
  ``lax.conv_general_dilated`` that runs faster on XLA CPU by the routes of :func:`conv_route`
  (pointwise products, the depthwise shift kernel, patches products, per-tap products, gradients
  without XLA's gradient convolutions, chunks of samples); :func:`weight_conv`, the same for a
  kernel a factorized layer computes or trains (the CP, Tucker and TT reconstructed paths).
* The factorized path's pieces: the 1x1 contraction :func:`channel_matmul` and the depthwise
  shift kernel (:func:`depthwise_conv_1d`, :func:`depthwise_conv`), with a custom backward pass
  (a custom JVP whose tangent map is that pass transposed: forward mode works too).
* The loops that run a conv on chunks of samples or tiles of rows with the gradient of each
  computed while its chunk is in cache (:func:`map_chunks`, :func:`map_tiles`).

Which route, loop or dtype applies is decided by the rules of :mod:`hocp_jax.conv_plans` (and,
for a computed kernel's gradient, :func:`hocp_jax.autotune.choose_kernel_grad`), at trace time.
Padding: one resolved ``(lo, hi)`` pair per mode here (:mod:`hocp_jax.padding` resolves
``"SAME"``, ``"SYMMETRIC"`` and ints; :func:`dense_conv` and :func:`depthwise_conv` take those).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from hocp_jax import autotune, conv_plans, explicit_sharding
from hocp_jax.checks import is_int, is_positive_int
from hocp_jax.padding import PaddingLike, as_tuple, output_size, resolve_padding


def promote(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` and ``kernel`` in their common dtype (``lax``'s conv needs equal dtypes; the
    factorized paths' matmuls promote the same way)."""
    dtype = jnp.result_type(x, kernel)
    return x.astype(dtype), kernel.astype(dtype)


def vary_alike(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """``arrays`` cast (``lax.pcast(..., to="varying")``) to vary over every manual mesh axis
    that any of them varies over; unchanged outside ``shard_map``. Applied to the inputs of a
    custom backward pass (a custom VJP, or a custom JVP written as one transposed): it must
    return cotangents of its inputs' types, and the cotangent of a weight every shard shares,
    computed from one shard's data, varies over the data's axes (JAX then sums it over them, the
    transpose of the cast), as XLA's own VJPs do."""
    varying = [jax.typeof(a).manual_axis_type.varying for a in arrays]
    axes = frozenset().union(*varying)
    return tuple(lax.pcast(a, tuple(axes - v), to="varying") if axes - v else a for a, v in zip(arrays, varying))


def channels_last_dims(n: int) -> lax.ConvDimensionNumbers:
    """Channels-last input/output, kernel ``(*K, C_in, C_out)``."""
    spatial = tuple(range(1, n + 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, n + 1) + spatial, rhs_spec=(n + 1, n) + tuple(range(n)), out_spec=(0, n + 1) + spatial
    )


def dense_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride=1,
    padding: PaddingLike = "SAME",
    dilation=1,
    feature_group_count: int = 1,
) -> jax.Array:
    """Plain N-D convolution (cross-correlation). ``x (B, *S, C_in)``, ``kernel (*K, C_in/groups, C_out)``."""
    n = kernel.ndim - 2
    if n < 1:
        raise ValueError(f"kernel: got shape {tuple(kernel.shape)}, expected (*K, C_in/groups, C_out) with at least one "
                         "spatial mode K")
    if x.ndim != n + 2:
        raise ValueError(f"x: got shape {tuple(x.shape)} for a kernel of shape {tuple(kernel.shape)}; expected {n + 2}-D x")
    if min(kernel.shape) < 1:
        raise ValueError(f"kernel: got shape {tuple(kernel.shape)}, expected (*K, C_in, C_out) of sizes >= 1")
    if not is_positive_int(feature_group_count) or kernel.shape[-1] % feature_group_count:
        raise ValueError(f"feature_group_count={feature_group_count!r}: expected an int >= 1 that divides "
                         f"C_out={kernel.shape[-1]}")
    if x.shape[-1] != kernel.shape[-2] * feature_group_count:
        raise ValueError(
            f"x: has {x.shape[-1]} channels but kernel {tuple(kernel.shape)} with feature_group_count="
            f"{feature_group_count} expects {kernel.shape[-2] * feature_group_count}"
        )
    strides = as_tuple(stride, n, "stride")
    dilations = as_tuple(dilation, n, "dilation")
    x, padding = same_on_symbolic(x, padding, kernel.shape[:n], strides, dilations)
    pads = resolve_padding(padding, x.shape[1:-1], kernel.shape[:n], strides, dilations)
    x, kernel = promote(x, kernel)
    return conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilations,
                                dimension_numbers=channels_last_dims(n), feature_group_count=feature_group_count)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated``: same signature, same result, faster on XLA CPU for
    two channels-last kinds (e.g. ``nn.Conv(..., conv_general_dilated=hocp_jax.conv_ops.conv_general_dilated)``;
    :func:`dense_conv` and the models' convs use it). On the CPU backend it runs

    * a pointwise kernel (every spatial size 1, one group): one matrix product over the padded,
      strided positions (:func:`channel_matmul`); it took 0.10-0.75x the time of XLA CPU's 1x1 conv
      fwd+bwd on MobileNet-v2's and ResNet's 1x1 shapes;
    * a depthwise kernel (``feature_group_count`` = input channels = output channels): the shift
      kernel of :func:`depthwise_conv` (forward and reverse mode, as the CP path's depthwise
      passes);
    * an ungrouped kernel over 3 or more spatial modes with at most
      :data:`hocp_jax.conv_plans.PATCHES_MAX_IN_CHANNELS` input channels (a video network's first
      conv): one matrix product of its explicit patches (:func:`_patches_conv`;
      :func:`hocp_jax.conv_plans.patches_conv`, which has the figures and the memory bound);
    * an ungrouped kernel on a map with a spatial mode shorter than the kernel (the last stage of a
      ResNet on small images): one matrix product per tap that reads the input
      (:func:`_taps_conv`; :func:`hocp_jax.conv_plans.small_map_taps` has the figures);
    * any other ungrouped kernel traced in a loop's body (:func:`hocp_jax.conv_plans.loop_mode`, the
      micro-batches of the train step), with ``precision`` None: XLA's forward conv with gradients
      that need no gradient convolution (:func:`conv_matmul_kernel_grad`; a custom VJP, so reverse
      mode only there: :func:`hocp_jax.conv_plans.forward_mode` turns it off);
    * any other ungrouped 2-D kernel on a large input (:func:`hocp_jax.conv_plans.dense_chunk`,
      which has the figures: from 3 MiB, 1 MiB for a stem of at most 4 input channels, with one
      program per device, on a CPU with AMX), with ``precision`` None: the same conv in a loop over chunks of
      samples (:func:`_chunked_conv`; reverse mode only too: a
      :func:`hocp_jax.conv_plans.forward_mode` block turns it off).

    On the GPU backend, a channels-last conv with more than :data:`GPU_CONV_MAX_MODES` spatial
    modes (one group, or depthwise) runs without XLA's convolution too: as :func:`_taps_conv`, or
    the shift kernel if depthwise (see :data:`GPU_CONV_MAX_MODES` for why).

    Anything else (other layouts, ``lhs_dilation``, negative padding, batch groups, channel
    multipliers, unequal dtypes, ``preferred_element_type``), and every other conv on GPU/TPU, whose vendor-tuned
    convolutions were not measured against these, is passed to ``lax.conv_general_dilated``
    unchanged; a channels-last one on an explicitly sharded input under
    ``jax.sharding.auto_axes`` (:func:`_with_auto_axes`), so that it trains."""
    route = conv_route(lhs, rhs, window_strides=window_strides, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                       dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                       batch_group_count=batch_group_count, preferred_element_type=preferred_element_type)
    if route in ("loop", "chunks") and precision is not None:
        route = None
    n = rhs.ndim - 2
    ks, c_out = rhs.shape[:n], rhs.shape[-1]
    if route is not None:
        strides = tuple(int(s) for s in window_strides)
        dilations = tuple(int(d) for d in rhs_dilation) if rhs_dilation is not None else (1,) * n
        if isinstance(padding, str):
            pads = tuple(lax.padtype_to_pads(lhs.shape[1:-1], [d * (k - 1) + 1 for k, d in zip(ks, dilations)],
                                             strides, padding))
        else:
            pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        if not _taps_fit(lhs.shape, rhs.shape, strides, pads, dilations):  # a crop, or no output: lax's own
            route = None
    if route is None:
        channels_last = _channels_last(lhs, rhs, dimension_numbers)
        if channels_last and not any(d != 1 for d in (lhs_dilation or ())):
            dilations = (1,) * n if rhs_dilation is None else tuple(rhs_dilation)
            lhs, padding = _valid_on_symbolic(lhs, ks, window_strides, padding, dilations)

        def xla(lhs, rhs):
            return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, batch_group_count=batch_group_count,
                                            precision=precision, preferred_element_type=preferred_element_type)

        return _with_auto_axes(xla, lhs, rhs) if channels_last else xla(lhs, rhs)
    if route == "depthwise":
        return _shift_depthwise(lhs, rhs.reshape(*ks, c_out), strides, pads, dilations)
    if route == "patches":
        return _patches_conv(lhs, rhs, strides, pads, dilations, precision)
    if route == "loop":
        return conv_matmul_kernel_grad(lhs, rhs, strides=strides, pads=pads, dilations=dilations)
    if route == "chunks":
        return _chunked_conv(lhs, rhs, strides, pads, dilations, conv_plans.dense_chunk(lhs.shape, c_out, strides, lhs.dtype))
    return _taps_conv(lhs, rhs, strides, pads, dilations, precision)  # pointwise: one tap


def conv_route(lhs, rhs, *, window_strides=None, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
               feature_group_count=1, batch_group_count=1, preferred_element_type=None, **_) -> str | None:
    """How :func:`conv_general_dilated` runs a conv of these arguments (the other keyword arguments
    of ``lax.conv_general_dilated`` are accepted and do not matter; ``window_strides`` default to
    1): ``"pointwise"`` (one matrix product), ``"depthwise"`` (the shift kernel), ``"patches"``
    (:func:`_patches_conv`), ``"taps"`` (:func:`_taps_conv`: on GPU past :data:`GPU_CONV_MAX_MODES`,
    on CPU on a map smaller than the kernel, :func:`hocp_jax.conv_plans.small_map_taps`), ``"loop"``
    (in a loop's body on CPU:
    :func:`conv_matmul_kernel_grad`, :func:`hocp_jax.conv_plans.loop_mode`), ``"chunks"`` (on CPU,
    a large input in chunks of samples, each as in ``"loop"``: :func:`hocp_jax.conv_plans.dense_chunk`)
    or ``None`` (``lax``'s convolution)."""
    n = rhs.ndim - 2
    gpu_taps = _gpu_needs_taps(n)
    if not ((conv_plans.backend() == "cpu" or gpu_taps) and lhs.dtype == rhs.dtype
            and batch_group_count == 1 and preferred_element_type is None and all(d == 1 for d in (lhs_dilation or ()))
            and _channels_last(lhs, rhs, dimension_numbers)):
        return None
    if feature_group_count == 1 and all(k == 1 for k in rhs.shape[:n]):
        return "pointwise"
    if feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[-2] == 1:
        return "depthwise"
    strides = tuple(window_strides) if window_strides is not None else (1,) * n
    if feature_group_count == 1 and conv_plans.patches_conv(lhs.shape, lhs.dtype, rhs.shape, strides,
                                                          explicit_sharding.shards(lhs, 0)):
        return "patches"
    if feature_group_count == 1 and (gpu_taps or conv_plans.small_map_taps(lhs.shape, rhs.shape, rhs_dilation)
                                     and not explicit_sharding.is_split(lhs)):
        return "taps"
    if feature_group_count == 1 and conv_plans.cpu_loop_mode() and not explicit_sharding.is_split(lhs):
        return "loop"
    if feature_group_count == 1 and not explicit_sharding.is_split(lhs) and conv_plans.dense_chunk(
            lhs.shape, rhs.shape[-1], strides, lhs.dtype):
        return "chunks"
    return None


def _channels_last(lhs, rhs, dimension_numbers) -> bool:
    """Whether ``dimension_numbers`` lay out ``lhs`` and the output as ``(B, *S, C)`` and ``rhs``
    as ``(*K, C_in, C_out)`` (:func:`channels_last_dims`)."""
    n = rhs.ndim - 2
    return (dimension_numbers is not None and n >= 1 and lhs.ndim == n + 2
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == channels_last_dims(n))


GPU_CONV_MAX_MODES = 3
"""Most spatial modes of a convolution left to XLA on the GPU backend. XLA's GPU compiler hands
convolutions to cuDNN, which takes at most three spatial modes; on an NVIDIA H200 with jax 0.11.2
(stop 46, ``benchmarks/device_check.sh`` and benchmarks/EXPERIMENTS.md), compiling the gradient of
a ``lax`` conv with four spatial modes aborted the process ("Check failed: num_dimensions <= 3"
in ``gpu_conv_runner.cc``) or gave a wrong kernel gradient, while the forward pass was right. So
:func:`conv_general_dilated` and the convs of computed kernels (:func:`weight_conv`) run such
convs as :func:`_taps_conv` (slices and matrix products, no convolution) on GPU."""


def _taps_fit(x_shape, kernel_shape, strides, pads, dilations) -> bool:
    """Whether the library's own routes take a conv of these resolved arguments: no negative pad
    (a crop) and an output of at least zero positions per mode; else ``lax``'s conv."""
    n = len(kernel_shape) - 2
    return all(lo >= 0 and hi >= 0 for lo, hi in pads) and all(
        output_size(*a) >= 0 for a in zip(x_shape[1:1 + n], kernel_shape[:n], strides, dilations, pads))


def _gpu_needs_taps(n_modes: int) -> bool:
    """Whether a conv of ``n_modes`` spatial modes runs as :func:`_taps_conv` (see
    :data:`GPU_CONV_MAX_MODES`)."""
    return conv_plans.backend() == "gpu" and n_modes > GPU_CONV_MAX_MODES


def _taps_conv(x: jax.Array, kernel: jax.Array, strides, pads, dilations, precision=None) -> jax.Array:
    """The channels-last conv of ``x (B, *S, C_in)`` with ``kernel (*K, C_in, C_out)`` as a sum over
    the ``prod(K)`` taps of one matrix product each (the tap's strided slice of the padded input
    against the tap's ``(C_in, C_out)`` kernel; several taps accumulated in float32 or wider; taps that read
    padding only left out, :func:`_taps_read_input`); its gradients
    are slices, pads and matrix products, so no backend needs a convolution for it (the pointwise
    route, and :data:`GPU_CONV_MAX_MODES`). ``pads``: one resolved ``(lo, hi)`` pair per mode."""
    n = kernel.ndim - 2
    ks, c_in, c_out = kernel.shape[:n], kernel.shape[-2], kernel.shape[-1]
    outs = [output_size(*a) for a in zip(x.shape[1:-1], ks, strides, dilations, pads)]
    # One piece per tap by a split, whose transpose (the kernel gradient) is one concatenate; indexing
    # each tap transposes to a sum of prod(K) zero-padded full kernels: on Jester conv4's rebuilt
    # CP kernel 399.9 against 237.7 ms fwd+bwd (`python -m benchmarks.experiments small_maps_computed`).
    ws = [w[0] for w in jnp.split(kernel.reshape(-1, c_in, c_out), math.prod(ks), axis=0)]
    live = [(xt, ws[i]) for i, (xt, reads) in enumerate(zip(tap_inputs(x, ks, strides, pads, dilations, outs),
                                                           _taps_read_input(x.shape[1:-1], ks, strides, pads, dilations,
                                                                            outs))) if reads]
    if not live:  # every output position reads padding only
        return jnp.zeros((x.shape[0], *outs, c_out), x.dtype)
    if len(live) == 1:
        return channel_matmul(*live[0], precision)
    return _summed_products(live, x.dtype, precision)


def _summed_products(pairs, dtype, precision=None) -> jax.Array:
    """``sum(channel_matmul(a, w))`` over the ``(a, w)`` ``pairs`` (equal output shapes), accumulated
    in float32 or wider (integers in their own type) and returned in ``dtype``."""
    acc = dtype if jnp.issubdtype(dtype, jnp.integer) else jnp.promote_types(dtype, jnp.float32)
    return sum(channel_matmul(a, w, precision).astype(acc) for a, w in pairs).astype(dtype)


def _taps_read_input(sizes, kernel_size, strides, pads, dilations, out_sizes):
    """For every tap, in :func:`tap_inputs`' order: whether it reads any of ``x`` (not only its
    zero padding). A tap that reads none adds zeros, so :func:`_taps_conv` leaves it out (on a map
    smaller than the kernel most taps do: a 1x1 map under a 3x3 kernel with padding 1 has one).
    A mode of symbolic size (``jax.export``) counts as read: its tap is computed (correct, if zeros)."""
    def reads(a, size, lo, out, s):  # some position a + j s, 0 <= j < out, in [lo, lo + size)
        if not conv_plans.is_static((size, out)):
            return True
        j = max(0, -(-(lo - a) // s))
        return j < out and a + j * s < lo + size

    for tap in itertools.product(*map(range, kernel_size)):
        yield all(reads(t * d, size, lo, out, s)
                  for t, d, size, (lo, _), out, s in zip(tap, dilations, sizes, pads, out_sizes, strides))


def _patches_conv(x: jax.Array, kernel: jax.Array, strides, pads, dilations, precision=None) -> jax.Array:
    """The channels-last conv of ``x (B, *S, C_in)`` with ``kernel (*K, C_in, C_out)`` as one matrix
    product of its explicit patches (im2col): the ``prod(K)`` tap inputs (:func:`tap_inputs`) side
    by side, ``(B, *S_out, prod(K) * C_in)``, against the kernel flattened to ``(prod(K) * C_in,
    C_out)`` (:func:`channel_matmul`). The kernel gradient is one matrix product too; the input
    gradient (not needed for a network's first conv) sums the taps' slices back. For few input
    channels (:func:`hocp_jax.conv_plans.patches_conv`). Where the in-plane patches are wide
    (:func:`hocp_jax.conv_plans.patches_split`: a video stem's 3x7x7 kernel), the patches cover the
    modes after the first only, and each tap of the first mode is one product on a slice of them.
    ``pads``: one resolved ``(lo, hi)`` pair per mode."""
    n = kernel.ndim - 2
    ks, c_out = kernel.shape[:n], kernel.shape[-1]
    outs = [output_size(*a) for a in zip(x.shape[1:-1], ks, strides, dilations, pads)]
    if not conv_plans.patches_split(x.shape[-1], ks):
        patches = jnp.concatenate(list(tap_inputs(x, ks, strides, pads, dilations, outs)), axis=-1)
        return channel_matmul(patches, kernel.reshape(-1, c_out), precision)
    # In-plane patches at every position of the padded first mode, (B, S_1 + pads, *S_out[1:],
    # prod(K[1:]) C_in); first-mode tap t reads its slice of them with the kernel's t-th plane.
    xp = pad_axis(x, 1, pads[0])
    plane = jnp.concatenate(list(tap_inputs(xp, (1, *ks[1:]), (1, *strides[1:]), ((0, 0), *pads[1:]),
                                             (1, *dilations[1:]), [xp.shape[1], *outs[1:]])), axis=-1)
    return _summed_products(((lax.slice_in_dim(plane, t * dilations[0], t * dilations[0] + (outs[0] - 1) * strides[0] + 1,
                                               strides[0], axis=1), w)
                             for t, w in enumerate(kernel.reshape(ks[0], -1, c_out))), x.dtype, precision)


def tap_inputs(x: jax.Array, kernel_size, strides, pads, dilations, out_sizes):
    """For every tap of a kernel, in the kernel's row-major order, ``(B, *S_out, C_in)``: the
    zero-padded ``x`` read at the positions that tap multiplies (one strided slice)."""
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    for tap in itertools.product(*map(range, kernel_size)):
        start = tuple(t * d for t, d in zip(tap, dilations))
        limit = tuple(a + (o - 1) * s + 1 for a, o, s in zip(start, out_sizes, strides))
        yield lax.slice(xp, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), (1, *strides, 1))


def _valid_on_symbolic(x: jax.Array, kernel_size, strides, padding, dilations):
    """``(x, padding)`` for ``lax``'s channels-last conv of ``x (B, *S, C)``: unchanged, but where a
    spatial size is symbolic (``jax.export``) and a stride is not 1, ``x`` zero-padded and cut to
    the positions the windows read, with ``'VALID'`` padding. The same output; JAX's input gradient
    of a strided conv on a symbolic size needs pads that depend on the size, which ``lax``'s conv
    does not take (jax 0.10: "padding argument ... should be a string or a sequence of (low, high)
    pairs"), while the pad and the cut transpose to a slice and a pad."""
    sizes = x.shape[1:-1]
    if conv_plans.is_static(sizes) or all(s == 1 for s in strides):
        return x, padding
    extents = [d * (k - 1) + 1 for k, d in zip(kernel_size, dilations)]
    pads = lax.padtype_to_pads(sizes, extents, strides, padding) if isinstance(padding, str) else padding
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)))
    reads = [(output_size(n, k, s, d, p) - 1) * s + e
             for n, k, s, d, p, e in zip(sizes, kernel_size, strides, dilations, pads, extents)]
    return lax.slice(x, (0,) * x.ndim, (x.shape[0], *reads, x.shape[-1])), "VALID"


def same_on_symbolic(x: jax.Array, padding: PaddingLike, kernel_size, strides, dilations):
    """``(x, padding)`` for a conv of ``x (B, *S, C)`` (``strides``, ``dilations``: checked tuples):
    unchanged, but where ``padding`` says ``'SAME'`` on a strided mode of symbolic size
    (``jax.export``), whose pads depend on the size (:func:`hocp_jax.padding.resolve_padding`
    raises there), ``x`` zero-padded as ``lax``'s ``'SAME'`` pads it and cut to the positions the
    windows read, with ``'VALID'`` padding: the same output, in the form of ``lax``'s own
    ``'SAME'`` output size. :func:`dense_conv`, :func:`depthwise_conv` and the CP, Tucker and TT
    convs call it first."""
    sizes = x.shape[1:-1]
    n = len(sizes)
    specs = [padding] * n if isinstance(padding, str) or is_int(padding) else padding
    if not (isinstance(specs, (list, tuple)) and len(specs) == n and len(strides) == n):
        return x, padding  # resolve_padding says what is wrong
    same = [isinstance(p, str) and p.upper() == "SAME" and s > 1 and not is_int(d)
            for p, s, d in zip(specs, strides, sizes)]
    if not any(same):
        return x, padding
    extents = [d * (k - 1) + 1 for k, d in zip(kernel_size, dilations)]
    rest = resolve_padding([(0, 0) if m else p for m, p in zip(same, specs)], sizes, kernel_size, strides, dilations)
    pads = [lax.padtype_to_pads((d,), (e,), (s,), "SAME")[0] if m else p
            for m, p, d, e, s in zip(same, rest, sizes, extents, strides)]
    return _valid_on_symbolic(x, kernel_size, strides, pads, dilations)


def _lax_conv(x, kernel, strides, pads, dilations):
    x, pads = _valid_on_symbolic(x, kernel.shape[:-2], strides, pads, dilations)

    def xla(x, kernel):
        return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pads, rhs_dilation=dilations,
                                        dimension_numbers=channels_last_dims(kernel.ndim - 2))

    return _with_auto_axes(xla, x, kernel)


def _with_auto_axes(conv: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``conv(x, kernel)``, a channels-last ``lax`` conv, under ``jax.sharding.auto_axes`` when
    ``x``'s type is explicitly split (:mod:`hocp_jax.explicit_sharding`): there the kernel
    gradient of ``lax``'s conv has no sharding rule. The output keeps ``x``'s batch split, and
    each spatial one its output size divides."""
    if not explicit_sharding.is_split(x):
        return conv(x, kernel)
    out = jax.eval_shape(conv, jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(kernel.shape, kernel.dtype))
    return explicit_sharding.run_auto(conv, x, kernel, out_spec=explicit_sharding.kept_splits(x, out.shape))


def _conv_tap_grad(x, kernel, strides, pads, dilations):
    # whether the conv is in a loop is read here, when its forward pass is traced: the transpose of
    # a loop's tangent (map_chunks) traces this backward pass after the loop's block has closed
    return _conv_tap_grad_vjp(*vary_alike(x, kernel), strides, pads, dilations, conv_plans.cpu_loop_mode())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_tap_grad_vjp(x, kernel, strides, pads, dilations, in_loop):
    return _lax_conv(x, kernel, strides, pads, dilations)


def _conv_tap_grad_fwd(x, kernel, strides, pads, dilations, in_loop):
    return _lax_conv(x, kernel, strides, pads, dilations), (x, kernel)


def _conv_tap_grad_bwd(strides, pads, dilations, in_loop, res, g):
    """Input gradient: XLA's own (the transposed conv), or in a loop on CPU (``in_loop``)
    :func:`_loop_input_grad`; kernel gradient: one ``(C_in, N) x (N, C_out)`` matrix product per
    tap, ``N`` = the batch's output positions, accumulated in float32 (or wider)."""
    x, kernel = res
    if in_loop and all(lo >= 0 and hi >= 0 for lo, hi in pads):
        dx = _loop_input_grad(g, kernel, x.shape, strides, pads, dilations)
    else:
        dx = jax.vjp(lambda x: _lax_conv(x, kernel, strides, pads, dilations), x)[1](g)[0]
    g2 = g.reshape(-1, g.shape[-1])
    dk = jnp.stack([
        jnp.matmul(xt.reshape(-1, x.shape[-1]).T, g2, preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
        for xt in tap_inputs(x, kernel.shape[:-2], strides, pads, dilations, g.shape[1:-1])
    ])
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_conv_tap_grad_vjp.defvjp(_conv_tap_grad_fwd, _conv_tap_grad_bwd)


def _loop_input_grad(g: jax.Array, kernel: jax.Array, x_shape, strides, pads, dilations) -> jax.Array:
    """The input gradient ``(B, *S, C_in)`` of the channels-last conv of ``kernel (*K, C_in, C_out)``
    (``pads`` >= 0) for the cotangent ``g (B, *S_out, C_out)``, without XLA's transposed conv, which
    XLA's CPU backend runs slower in a loop's body (:func:`hocp_jax.conv_plans.loop_mode`): unstrided,
    XLA's forward conv of ``g`` with the flipped kernel, its channel axes swapped; strided, one
    ``(N, C_out) x (C_out, C_in)`` matrix product per tap, each spread to the tap's strided
    positions (``lax.pad`` with interior padding) and summed in float32 (or wider)."""
    n = kernel.ndim - 2
    ks, sizes = kernel.shape[:n], x_shape[1:-1]
    if all(s == 1 for s in strides):
        reach = [d * (k - 1) for k, d in zip(ks, dilations)]
        flipped = jnp.flip(kernel, tuple(range(n))).swapaxes(-1, -2)
        return lax.conv_general_dilated(g, flipped, (1,) * n, [(r - lo, r - hi) for r, (lo, hi) in zip(reach, pads)],
                                        rhs_dilation=dilations, dimension_numbers=channels_last_dims(n))
    ws = kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1])
    total = 0.0
    for i, tap in enumerate(itertools.product(*map(range, ks))):
        t = channel_matmul(g, ws[i].T).astype(jnp.promote_types(g.dtype, jnp.float32))
        spread = [(lo_pad, size + lo + hi - lo_pad - (o - 1) * s - 1, s - 1) for lo_pad, size, (lo, hi), o, s in
                  zip((a * d for a, d in zip(tap, dilations)), sizes, pads, g.shape[1:-1], strides)]
        total = total + lax.pad(t, jnp.zeros((), t.dtype), [(0, 0, 0), *spread, (0, 0, 0)])
    return lax.slice(total, (0, *(lo for lo, _ in pads), 0),
                     (x_shape[0], *(lo + size for (lo, _), size in zip(pads, sizes)), x_shape[-1])).astype(g.dtype)


def conv_matmul_kernel_grad(x: jax.Array, kernel: jax.Array, *, strides, pads, dilations) -> jax.Array:
    """``lax``'s channels-last conv of ``x (B, *S, C_in)`` with ``kernel (*K, C_in, C_out)`` (``strides``,
    ``dilations``: one int per mode; ``pads``: one ``(lo, hi)`` pair per mode, as resolved by
    :func:`hocp_jax.padding.resolve_padding`), equal dtypes, whose kernel gradient is one matrix
    product per tap (the tap's strided slice of the padded input against the cotangent) instead of
    XLA's kernel-gradient convolution, which XLA ran far below its matrix-product speed on an AVX2
    CPU host. Forward pass and input gradient are XLA's (in a loop's body on CPU, the input gradient
    is :func:`_loop_input_grad`'s). The library's 2-D convs of a computed or
    trained kernel run it where :func:`hocp_jax.autotune.choose_kernel_grad` says so (with the
    figures); on 3-D convs the products gained or lost (0.81-1.21x; most lost on the Jester conv1,
    3 input channels), so those keep XLA's outside loops (``python -m benchmarks.experiments kernel_grad``;
    benchmarks/EXPERIMENTS.md, stop 39)."""
    _check_resolved(x, kernel, strides, pads, dilations)
    if x.dtype != kernel.dtype:
        raise ValueError(f"x: dtype {x.dtype} differs from the kernel's {kernel.dtype}; expected equal dtypes")
    return _conv_tap_grad(x, kernel, tuple(strides), tuple(tuple(p) for p in pads), tuple(dilations))


def _chunked_conv(x: jax.Array, kernel: jax.Array, strides, pads, dilations, chunk: int) -> jax.Array:
    """:func:`conv_matmul_kernel_grad` over ``chunk`` samples of ``x`` at a time (:func:`map_chunks`,
    both loops in :func:`hocp_jax.conv_plans.loop_mode`): :func:`hocp_jax.conv_plans.dense_chunk`'s route."""
    return map_chunks(lambda xc: conv_matmul_kernel_grad(xc, kernel, strides=strides, pads=pads, dilations=dilations),
                       x, chunk, loop=True)


def _check_resolved(x: jax.Array, kernel: jax.Array, strides, pads, dilations) -> None:
    """``ValueError`` naming the argument unless ``x (B, *S, C_in)`` fits ``kernel (*K, C_in, C_out)``
    and ``strides``, ``pads`` (``(lo, hi)`` pairs) and ``dilations`` have one entry per spatial mode."""
    n = kernel.ndim - 2
    if n < 1 or x.ndim != n + 2 or x.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"x: got shape {tuple(x.shape)} for a kernel of shape {tuple(kernel.shape)}; expected "
                         f"(B, {n} spatial sizes, {kernel.shape[-2]} channels)")
    for name, value in (("strides", strides), ("pads", pads), ("dilations", dilations)):
        if len(value) != n:
            raise ValueError(f"{name}={value!r}: expected one entry per spatial mode ({n})")
    if any(len(p) != 2 for p in pads):
        raise ValueError(f"pads={pads!r}: expected one (lo, hi) pair per spatial mode")


def weight_conv(x: jax.Array, kernel: jax.Array, strides, pads, dilations, input_grad: bool = True) -> jax.Array:
    """The conv of a kernel a factorized layer computes or trains (the CP, Tucker and TT
    reconstructed kernels, the Tucker core, a TT mode's kernel), ``x`` and ``kernel`` promoted to
    their common dtype: :func:`_taps_conv` on GPU for more than :data:`GPU_CONV_MAX_MODES` spatial
    modes; :func:`_patches_conv` where :func:`hocp_jax.conv_plans.patches_conv` says so (CPU, 3+
    modes, few input channels); where ``x`` is not explicitly sharded,
    :func:`_chunked_conv` where :func:`hocp_jax.conv_plans.dense_chunk` says so (a large 2-D
    input, or a stem's), as in :func:`conv_general_dilated`;
    :func:`conv_matmul_kernel_grad` for a 2-D kernel where
    :func:`hocp_jax.autotune.choose_kernel_grad` says so (analytic policy: CPU hosts with AVX2 but
    not AVX-512, and AVX-512 ones on large inputs) or in a loop's body on CPU (any number of modes,
    :func:`hocp_jax.conv_plans.loop_mode`); else ``lax``'s conv with XLA's own gradients (under ``auto_axes`` if ``x`` is explicitly sharded,
    :func:`_with_auto_axes`). Before those two, on CPU and where ``x`` is not explicitly sharded,
    a map with a mode shorter than the kernel runs as :func:`_taps_conv`
    (:func:`hocp_jax.conv_plans.small_map_taps`), as in :func:`conv_general_dilated`: fwd+bwd of a
    rebuilt CP kernel (``python -m benchmarks.experiments small_maps_computed``, stop 61) took
    0.18x and 0.61x ``lax``'s time on a ResNet-18's 2x2 last stage (batch 64 and 8) and 1.00x
    and 1.04x on two 2-frame clips, on an AVX-512 host, where those 2-D convs took ``lax``'s conv
    before; on AVX2-only hosts they took :func:`conv_matmul_kernel_grad` (not compared).
    ``input_grad``: whether the caller differentiates w.r.t. ``x`` (informs the measured policy)."""
    _check_resolved(x, kernel, strides, pads, dilations)
    x, kernel = promote(x, kernel)
    split = explicit_sharding.is_split(x)
    if _gpu_needs_taps(kernel.ndim - 2):
        return _taps_conv(x, kernel, strides, pads, dilations)
    if conv_plans.patches_conv(x.shape, x.dtype, kernel.shape, strides, explicit_sharding.shards(x, 0)):
        return _patches_conv(x, kernel, strides, pads, dilations)
    if not split and conv_plans.small_map_taps(x.shape, kernel.shape, dilations) and _taps_fit(x.shape, kernel.shape,
                                                                                              strides, pads, dilations):
        return _taps_conv(x, kernel, strides, pads, dilations)
    chunk = None if split else conv_plans.dense_chunk(x.shape, kernel.shape[-1], strides, x.dtype)
    if chunk:
        return _chunked_conv(x, kernel, strides, pads, dilations, chunk)
    if not split and (kernel.ndim == 4 and autotune.choose_kernel_grad(x.shape, x.dtype, kernel.shape, strides, pads,
                                                                      dilations, input_grad)
                      or conv_plans.cpu_loop_mode()):
        return conv_matmul_kernel_grad(x, kernel, strides=strides, pads=pads, dilations=dilations)
    return _lax_conv(x, kernel, strides, pads, dilations)


def pad_axis(h: jax.Array, axis: int, pad: tuple[int, int]) -> jax.Array:
    """Zero-pads ``h`` by ``pad = (lo, hi)`` along ``axis`` only."""
    if not any(pad):
        return h
    cfg = [(0, 0)] * h.ndim
    cfg[axis] = tuple(pad)
    return jnp.pad(h, cfg)


def _shift_conv(h: jax.Array, kernel: jax.Array, strides, pads, dilations) -> jax.Array:
    """``sum_t kernel[t] * (zero-padded h read at tap t's positions)`` over the taps of ``kernel
    (*K, R)``: the depthwise conv of ``h (B, *S, R)``, one strided slice per tap, which XLA fuses
    into one loop (no autodiff rule of its own)."""
    ks = kernel.shape[:-1]
    outs = [output_size(*a) for a in zip(h.shape[1:-1], ks, strides, dilations, pads)]
    taps = itertools.product(*map(range, ks))
    return functools.reduce(jnp.add, (xt * kernel[t] for xt, t in
                                      zip(tap_inputs(h, ks, strides, pads, dilations, outs), taps)))


def _shift_depthwise(h, kernel, strides, pads, dilations):
    """The depthwise shift kernel with its custom JVP (:func:`depthwise_conv_1d`)."""
    return _shift_depthwise_jvp(*vary_alike(h, kernel), strides, pads, dilations)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _shift_depthwise_jvp(h, kernel, strides, pads, dilations):
    return _shift_conv(h, kernel, strides, pads, dilations)


@_shift_depthwise_jvp.defjvp
def _shift_depthwise_tangent(strides, pads, dilations, primals, tangents):
    """The tangent map written as the transpose of the backward pass below, so that reverse mode
    (JAX's transpose of it) runs that pass: input gradient = the same shift kernel on the
    stride-dilated, re-padded cotangent with the flipped kernel; kernel gradient = per tap, the sum
    of the tap's input slice times the cotangent. Checkpointed: reverse mode keeps ``h`` and the
    kernel, as a custom VJP would. Forward mode evaluates it as written (each tap's ``h`` tangent
    padded into the dilated grid), correct but slower than :func:`_shift_conv` of the tangents."""
    h, kernel = primals
    y = _shift_conv(h, kernel, strides, pads, dilations)
    tangent = jax.checkpoint(lambda h, kernel, dh, dk: _transposed_backward(h, kernel, dh, dk, y.shape, strides, pads,
                                                                           dilations), prevent_cse=False)
    return y, tangent(h, kernel, *tangents)


def _transposed_backward(h, kernel, dh, dk, y_shape, strides, pads, dilations):
    """The transpose of the shift kernel's backward pass ``g -> (input gradient, kernel
    gradient)``, applied to ``(dh, dk)``: ``y``-shaped. The backward pass pads ``g`` onto the
    grid ``gp`` (``cfg`` below: stride-dilated, re-padded), reads tap ``t``'s slice of it times
    the flipped kernel's tap ``t`` (summed over the taps: the input gradient), and sums each tap's
    input slice times ``g`` (the kernel gradient); here each piece in reverse order, the taps too,
    so that the transposed sums run in the backward pass's order."""
    ks, outs = kernel.shape[:-1], y_shape[1:-1]
    taps = list(itertools.product(*map(range, ks)))
    cfg = [((k - 1) * d - lo, n + lo - (o - 1) * s - 1, s - 1)
           for n, k, (lo, _), s, d, o in zip(h.shape[1:-1], ks, pads, strides, dilations, outs)]
    grid = [o + (o - 1) * it + lo + hi for o, (lo, hi, it) in zip(outs, cfg)]  # gp's spatial sizes
    flipped = lax.rev(kernel, [a for a, k in enumerate(ks) if k > 1])
    dtype = jnp.result_type(h, kernel)  # the output's and its cotangent's (h may be bfloat16, kernel float32)
    zero = jnp.zeros((), dtype)
    gp = None
    for t in reversed(taps):  # the input gradient's per-tap slices of gp, transposed: pads into the grid
        start = [ti * d for ti, d in zip(t, dilations)]
        part = lax.pad(dh * flipped[t], zero, [(0, 0, 0), *((a, n - a - m, 0) for a, n, m in
                                                             zip(start, grid, h.shape[1:-1])), (0, 0, 0)])
        gp = part if gp is None else gp + part
    # the pad of g onto the grid, transposed: un-pad the negative pads, then the strided slice
    if any(lo < 0 or hi < 0 for lo, hi, _ in cfg):
        gp = lax.pad(gp, zero, [(0, 0, 0), *((max(-lo, 0), max(-hi, 0), 0) for lo, hi, _ in cfg), (0, 0, 0)])
    y_h = lax.slice(gp, (0, *(max(lo, 0) for lo, _, _ in cfg), 0),
                    (gp.shape[0], *(max(lo, 0) + (o - 1) * (it + 1) + 1 for (lo, _, it), o in zip(cfg, outs)), gp.shape[-1]),
                    (1, *(it + 1 for _, _, it in cfg), 1))
    per_tap = lax.split(dk.astype(dtype).reshape(len(taps), -1), (1,) * len(taps))  # the transpose of a stack
    inputs = list(tap_inputs(h, ks, strides, pads, dilations, outs))
    y_k = functools.reduce(jnp.add, (inputs[i] * lax.broadcast_in_dim(lax.squeeze(per_tap[i], (0,)), inputs[i].shape,
                                                                      (h.ndim - 1,))
                                     for i in reversed(range(len(taps)))))  # explicit: the sums' axes as jnp.sum's
    return y_k + y_h


def _depthwise(h, factor, axis, stride, pad, dilation):
    """The shift kernel with ``factor (K, R)`` along spatial ``axis`` only (a ``(1, .., K, .., 1, R)``
    kernel)."""
    n = h.ndim - 2
    along = [a == axis for a in range(1, n + 1)]
    kernel = factor.reshape(tuple(factor.shape[0] if a else 1 for a in along) + factor.shape[1:])
    return _shift_depthwise(h, kernel, tuple(stride if a else 1 for a in along),
                            tuple(pad if a else (0, 0) for a in along), tuple(dilation if a else 1 for a in along))


def depthwise_conv_1d(h: jax.Array, factor: jax.Array, axis: int, *, stride: int, pad, dilation: int) -> jax.Array:
    """Depthwise 1-D conv of ``h (B, *S, R)`` along spatial ``axis`` (1-based) with ``factor (K, R)``.

    "Shift and multiply": pad once, then ``sum_k factor[k] * h_pad[k*dilation :: stride]``
    (K strided slices), which XLA fuses into one loop; the stride is applied inside the slice,
    so only the output positions are computed. The backward pass is a custom one made of the
    same fused kernel (input gradient: the flipped factor over the stride-dilated cotangent;
    factor gradient: one reduction per tap), because XLA's automatic transpose of the slices
    materialises full-size padded copies (1.3-1.6x slower fwd+bwd on the Jester layers). Until
    stop 71 a custom VJP (reverse mode only); since then a custom JVP whose tangent map is that
    backward pass transposed (:func:`_transposed_backward`), so ``jax.jvp`` works and
    ``jax.grad`` compiles to the same XLA program (``python -m benchmarks.experiments
    custom_jvp_programs``). ``pad`` may be symbolic (``'SAME'`` at a stride on a symbolic size,
    :func:`hocp_jax.padding.resolve_padding`'s ``symbolic_same``): then ``h`` is padded and cut
    before, as :func:`same_on_symbolic` does. On a 2-core CPU the shift kernel
    was 3-20x faster fwd+bwd than ``lax.conv_general_dilated`` with ``feature_group_count=R``
    on the Jester and ResNet layers when it replaced it, so the grouped conv is not used
    (the N-D form: :func:`depthwise_conv`).
    """
    if not all(map(is_int, pad)):  # 'SAME' at a stride on a symbolic size: resolve_padding's symbolic_same
        along = [a == axis for a in range(1, h.ndim - 1)]
        h, _ = _valid_on_symbolic(h, [factor.shape[0] if a else 1 for a in along], [stride if a else 1 for a in along],
                                  [pad if a else (0, 0) for a in along], [dilation if a else 1 for a in along])
        pad = (0, 0)
    return _depthwise(h, factor, axis, int(stride), tuple(int(p) for p in pad), int(dilation))


def depthwise_conv(h: jax.Array, kernel: jax.Array, *, stride=1, padding: PaddingLike = "SAME", dilation=1) -> jax.Array:
    """Depthwise N-D conv of ``h (B, *S, R)`` with ``kernel (*K, R)`` (one ``*K`` filter per
    channel; MobileNet's depthwise step) -> ``(B, *S_out, R)``, padding as in :mod:`hocp_jax.padding`.

    The shift kernel of :func:`depthwise_conv_1d` over all modes at once (``prod K`` strided
    slices, one fused pass; the same custom backward pass, forward mode too). It equals
    ``lax.conv_general_dilated`` with ``feature_group_count=R`` and replaces it, which XLA CPU
    ran 2.7-31x slower fwd+bwd on the MobileNet-v2 CIFAR-10 layers (README, "Depthwise and 1x1 convs").
    """
    n = kernel.ndim - 1
    if n < 1 or min(kernel.shape) < 1:
        raise ValueError(f"kernel: got shape {tuple(kernel.shape)}, expected a depthwise (*K, R) kernel of sizes >= 1 "
                         "with at least one spatial mode K")
    if n < 1 or h.ndim != n + 2 or h.shape[-1] != kernel.shape[-1]:
        raise ValueError(f"h: got shape {tuple(h.shape)} for a depthwise kernel of shape {tuple(kernel.shape)}; "
                         f"expected (B, {n} spatial sizes, {kernel.shape[-1]} channels)")
    strides = as_tuple(stride, n, "stride")
    dilations = as_tuple(dilation, n, "dilation")
    h, padding = same_on_symbolic(h, padding, kernel.shape[:n], strides, dilations)
    pads = resolve_padding(padding, h.shape[1:-1], kernel.shape[:n], strides, dilations)
    h, kernel = promote(h, kernel)
    return _shift_depthwise(h, kernel, strides, pads, dilations)


def channel_matmul(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
    """1x1 contraction ``(B, *S, C) x (C, R) -> (B, *S, R)`` as one 2-D matmul over the flattened
    positions. Same values as ``einsum("...c,cr->...r")``, but its weight gradient is a plain
    ``(C, N) x (N, R)`` dot: XLA CPU's dot canonicalisation otherwise transposes the (N, R)
    cotangent of a multi-axis contraction, a strided copy of the largest tensor of the layer.
    Under explicit sharding of an axis between the first and the last (a spatially split input),
    which the flattening cannot carry, the unflattened product. On CPU, a product of few channels
    runs two neighbouring positions per row against a block-diagonal weight
    (:func:`hocp_jax.conv_plans.paired_rows`)."""
    if explicit_sharding.splits_inner_axes(x):
        return jnp.matmul(x, w, precision=precision)
    c, r = w.shape
    if x.ndim > 2 and not explicit_sharding.is_split(x) and conv_plans.paired_rows(c, r, x.shape[-2]):
        pair = jnp.kron(jnp.eye(2, dtype=w.dtype), w)  # [[w, 0], [0, w]]: two positions per row
        return jnp.matmul(x.reshape(-1, 2 * c), pair, precision=precision).reshape(x.shape[:-1] + (r,))
    return jnp.matmul(x.reshape(-1, c), w, precision=precision).reshape(x.shape[:-1] + (r,))


def map_chunks(f: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int = 1, loop: bool = False) -> jax.Array:
    """``f`` (``(k, *S, C) -> (k, *S', C')``, may close over parameters) on each chunk of ``chunk``
    samples of ``x`` in turn (``lax.map``; ``chunk`` divides the batch). Its backward pass is a
    second loop that recomputes one chunk's forward and pulls its cotangent back at once, while
    that chunk's intermediates are still in cache; the parameter gradients are summed over the
    chunks. Differentiating the ``lax.map`` itself would store every chunk's intermediates between
    the passes (zero-filled (B, ...) buffers written and read back by dynamic slices), which cost
    more than the recomputed forward (benchmarks/EXPERIMENTS.md). Until stop 71 a custom VJP
    (reverse mode only); since then a custom JVP whose tangent is a loop of each chunk's JVP,
    checkpointed, so that JAX's transpose of it is that backward pass and ``jax.jvp`` works where
    ``f`` has forward mode. ``loop``: both loops' bodies are traced in
    :func:`hocp_jax.conv_plans.loop_mode`."""
    if not is_positive_int(chunk) or x.ndim < 1 or x.shape[0] % chunk:
        raise ValueError(f"chunk={chunk!r}: expected a positive number of samples that divides the batch of x, "
                         f"shape {tuple(x.shape)}")
    in_loop = conv_plans.loop_mode if loop else contextlib.nullcontext
    with in_loop():  # f is traced here, once: closed-over float arrays become explicit arguments
        fc, consts = jax.closure_convert(f, x[:chunk])
    # The loop runs over (B / chunk, chunk, ...) slices; with chunk 1 over the samples themselves,
    # given a batch axis of 1 in the loop body (the per-sample program from before chunks existed).
    one = chunk == 1
    lift, drop = ((lambda a: a[None]), (lambda a: a[0])) if one else ((lambda a: a), (lambda a: a))

    def one_chunk(xi, *consts):
        return drop(fc(lift(xi), *consts))

    @jax.custom_jvp
    def run(xs, *consts):
        with in_loop():
            return lax.map(lambda xi: one_chunk(xi, *consts), xs)

    @run.defjvp
    def run_jvp(primals, tangents):
        (xs, *consts), (dxs, *dconsts) = primals, tangents

        # checkpointed: reverse mode keeps each chunk's input, not its intermediates, and its
        # transposed loop recomputes a chunk's forward pass before pulling its cotangent back
        @functools.partial(jax.checkpoint, prevent_cse=False)
        def chunk_tangent(xi_dxi):
            return jax.jvp(one_chunk, (xi_dxi[0], *consts), (xi_dxi[1], *dconsts))[1]

        with in_loop():
            return run(xs, *consts), lax.map(chunk_tangent, (xs, dxs))

    y = run(x if one else x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:]), *consts)
    return y if one else y.reshape(x.shape[:1] + y.shape[2:])


def map_tiles(f: Callable[[jax.Array], jax.Array], x: jax.Array, axis: int, rows: int, halo: int,
              pad: tuple[int, int]) -> jax.Array:
    """``f`` over tiles of ``rows`` output rows along spatial ``axis`` of every sample, one tile at
    a time in a loop over the ``B * n`` tiles, with the VJP scheme of :func:`map_chunks`.

    ``f`` maps ``(1, ..., rows + halo, ..., C)`` input rows to ``(1, ..., rows, ..., C')`` (its conv
    along ``axis`` unpadded, stride 1); ``x`` is zero-padded along ``axis`` by ``pad = (lo, hi)``,
    so ``f`` must be linear up to that conv (the zero rows are its padding). Tiles are read from
    and written to ``x``'s and the output's own layout (dynamic slices; the gradient w.r.t. ``x``
    is accumulated in place, the halos overlapping): no tile-major copy of any array. When ``rows``
    does not divide the output size, the last tile is moved back to end at the last row; the rows
    it shares with the tile before get a zero cotangent. Returns ``(B, ..., S_out, ..., C')``.
    """
    if not (is_int(axis) and 1 <= axis <= x.ndim - 2):
        raise ValueError(f"axis={axis!r}: expected a spatial axis of x, shape {tuple(x.shape)}: 1 to {x.ndim - 2}")
    if len(pad) != 2 or not all(is_int(p) and p >= 0 for p in pad):
        raise ValueError(f"pad={pad!r}: expected a (lo, hi) pair of non-negative ints")
    if not (is_int(halo) and halo >= 0):
        raise ValueError(f"halo={halo!r}: expected a non-negative number of rows")
    out_size = x.shape[axis] + pad[0] + pad[1] - halo
    if not (is_positive_int(rows) and rows <= out_size):
        raise ValueError(f"rows={rows!r}: expected 1 to {out_size} output rows (x's {x.shape[axis]} rows along axis "
                         f"{axis}, padded by {tuple(pad)}, less a halo of {halo})")
    xp = pad_axis(x, axis, pad)
    b, n = x.shape[0], -(-out_size // rows)

    def window(a, t, size):  # tile t's (1, .., size, ..) block of a, and its first row
        first = jnp.minimum((t % n) * rows, out_size - rows)
        start = [0] * a.ndim
        start[0], start[axis] = t // n, first
        return lax.dynamic_slice(a, start, (1,) + a.shape[1:axis] + (size,) + a.shape[axis + 1:]), start

    first_tile = window(xp, 0, rows + halo)[0]
    fc, consts = jax.closure_convert(f, first_tile)
    y_tile = jax.eval_shape(fc, first_tile, *consts)
    y_shape = (b,) + y_tile.shape[1:axis] + (out_size,) + y_tile.shape[axis + 1:]

    @jax.custom_vjp
    def run(xp, *consts):
        def body(t, y):
            xt, start = window(xp, t, rows + halo)
            return lax.dynamic_update_slice(y, fc(xt, *consts), start)
        return lax.fori_loop(0, b * n, body, vary_alike(jnp.zeros(y_shape, y_tile.dtype), xp, *consts)[0])

    def run_fwd(xp, *consts):
        return run(xp, *consts), (xp, consts)

    def run_bwd(res, g):
        xp, consts = res
        row = lax.broadcasted_iota(jnp.int32, (1,) * axis + (rows,) + (1,) * (g.ndim - axis - 1), axis)

        def body(t, carry):
            dxp, dc = carry
            xt, start = window(xp, t, rows + halo)
            gt, _ = window(g, t, rows)
            gt = jnp.where(start[axis] + row >= (t % n) * rows, gt, 0)  # rows the tile before covered
            dxt, *dct = jax.vjp(fc, xt, *consts)[1](gt)
            dxp = lax.dynamic_update_slice(dxp, window(dxp, t, rows + halo)[0] + dxt, start)
            return dxp, [a + d for a, d in zip(dc, dct)]

        dxp, dc = lax.fori_loop(0, b * n, body, (jnp.zeros_like(xp), [jnp.zeros_like(c) for c in consts]))
        return (dxp, *dc)

    run.defvjp(run_fwd, run_bwd)
    return run(xp, *consts)
