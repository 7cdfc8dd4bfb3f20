r"""Factorized convolutions as pure functions on parameter dicts (channels-last).

All convolutions take ``x`` of shape ``(B, *S, C_in)`` where ``S`` has one entry per
spatial/temporal *mode*, and return ``(B, *S_out, C_out)``. Padding semantics are those
of :mod:`hocp_jax.padding` (``"SAME"`` = lax, ``"SYMMETRIC"``/int = PyTorch style).

CP (Kruskal) convolution, paper Eq. 6-7 and supplementary Algorithm 1. For modes
``m_0..m_{N-1}`` the kernel is

.. math:: W_{k_0..k_{N-1}, c, t} = \sum_r \lambda_r U^{(C)}_{c r} U^{(T)}_{t r}
          \prod_n U^{(m_n)}_{k_n r}

and the factorized path computes, without ever building ``W``:

1. ``H = X x_C U^(C)``                       (1x1 contraction to the rank, ``(B, *S, R)``)
2. ``H = H *_{m} U^(m)`` for every mode m     (depthwise 1-D conv along that mode)
3. ``Y = H x_R (diag(lambda) U^(T))^T``       (1x1 contraction to the output channels)
4. optional ``Y += X x_C U^(S)`` (skip factor, "HO-CP conv-S"), optional bias.

The factor order follows the paper's explicit sum above (``U^(C)`` first, ``diag(lambda) U^(T)``
last); the printed Eq. 6-7 swap ``U^(C)`` and ``U^(T)``, which contradicts that sum. The skip
factor follows supplementary Algorithm 1 (``H + X x_0 U^(S)``, ``U^(S)`` of shape ``(C, T)``),
not the main text's ``F' = X + (F x_0 U^(S))`` (after Eq. 7), which applies ``U^(S)`` to the output.

An optional non-linearity ``psi(h, stage)`` (paper's Psi, e.g. BN + ReLU) is called after
step 1 with ``stage="in"`` and after each mode's 1-D conv with ``stage=<mode name>``; it
makes the layer non-linear, so it is only allowed with ``implementation="factorized"``.

Parameter dict (see README, "Use it as a layer library"):
``lambda (R,)``, ``factor_in (C_in, R)``, ``factor_out (C_out, R)``, ``factor_<m> (K_m, R)``
for every mode ``m``, optional ``factor_skip (C_in, C_out)`` and ``bias (C_out,)``.
Tucker: ``factor_in (C_in, R_in)``, ``core (*K, R_in, R_out)``, ``factor_out (C_out, R_out)``.
Depthwise separable (MobileNet v1/v2 form): optional ``factor_in (C_in, R)``,
``depthwise (*K, R)``, ``factor_out (C_out, R)``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import itertools
import math
import string
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hocp_jax import autotune, conv_plans, counting, explicit_sharding
from hocp_jax.checks import is_positive_int
from hocp_jax.padding import PaddingLike, as_tuple, output_size, resolve_padding

Params = Mapping[str, jax.Array]
Psi = Callable[[jax.Array, str], jax.Array]

IMPLEMENTATIONS = ("factorized", "reconstructed", "auto")
TUCKER_IMPLEMENTATIONS = ("factorized", "reconstructed")
RESERVED = ("in", "out", "skip")


def mode_key(mode: str) -> str:
    """Name of the factor leaf for ``mode`` (e.g. ``"t"`` -> ``"factor_t"``)."""
    return f"factor_{mode}"


def default_modes(n: int) -> tuple[str, ...]:
    """Default mode names: 1-D ``("w",)``, 2-D ``("h","w")``, 3-D ``("d","h","w")``, else ``m0..``."""
    return {1: ("w",), 2: ("h", "w"), 3: ("d", "h", "w")}.get(n, tuple(f"m{i}" for i in range(n)))


# ----------------------------------------------------------------------------- validation


def _check_x(x: jax.Array, n_modes: int, modes) -> None:
    if x.ndim != n_modes + 2:
        raise ValueError(
            f"x: got shape {tuple(x.shape)} ({x.ndim}-D) but modes={tuple(modes)} expects "
            f"(batch, {', '.join(modes)}, channels), i.e. a {n_modes + 2}-D array"
        )


def check_modes(modes) -> tuple[str, ...]:
    """``modes`` as a tuple of distinct mode names, none of :data:`RESERVED`, else a ValueError."""
    modes = tuple(modes)
    if not modes or len(set(modes)) != len(modes) or any(not isinstance(m, str) or m in RESERVED for m in modes):
        raise ValueError(f"modes={modes!r}: expected a non-empty sequence of distinct names, none of {RESERVED}")
    return modes


def cp_rank(params: Params, modes: Sequence[str]) -> int:
    """Validates a CP parameter dict against ``modes`` and returns its rank R."""
    modes = check_modes(modes)
    required = ["lambda", "factor_in", "factor_out"] + [mode_key(m) for m in modes]
    missing = [k for k in required if k not in params]
    if missing:
        raise ValueError(f"params: missing CP leaves {missing}; expected keys {required} (+ optional factor_skip, bias)")
    extra = sorted(k for k in params if k.startswith("factor_") and k not in required and k != "factor_skip")
    if extra:
        raise ValueError(f"params: has factor leaves {extra} that modes={modes!r} does not use; expected the "
                         f"factors {required[1:]} (pass the modes of every factor, e.g. modes=('t', 'h', 'w'))")
    known = set(required) | {"factor_skip", "bias"}
    unknown = sorted(k for k, v in params.items() if k not in known and not isinstance(v, Mapping))
    if unknown:  # e.g. a misspelt 'bias', which would be silently left out (sub-dicts: Psi modules, passed over)
        close = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in unknown}
        hints = "".join(f"; did you mean {c[0]!r} for {k!r}?" for k, c in close.items() if c)
        raise ValueError(f"params: unknown CP leaves {unknown}; expected {required} (+ optional factor_skip, bias){hints}")
    rank = np.shape(params["lambda"])[0] if np.ndim(params["lambda"]) == 1 else -1
    if rank < 1:
        raise ValueError(f"params['lambda']: got shape {tuple(np.shape(params['lambda']))}, expected (R,) with R >= 1")
    for k in required[1:]:
        shape = tuple(np.shape(params[k]))
        if len(shape) != 2 or shape[1] != rank or shape[0] < 1:
            raise ValueError(f"params['{k}']: got shape {shape}, expected (size >= 1, R={rank})")
    return rank


def add_bias(y: jax.Array, params: Params, n_axes: int = 1) -> jax.Array:
    """``y + params["bias"]`` if the dict has a bias, which must have the shape of ``y``'s last
    ``n_axes`` axes (``(C_out,)`` for a conv; no silent broadcast of a ``(1,)`` bias)."""
    if "bias" not in params:
        return y
    want = tuple(y.shape[y.ndim - n_axes:])
    if tuple(np.shape(params["bias"])) != want:
        raise ValueError(f"params['bias']: got shape {tuple(np.shape(params['bias']))}, expected {want}")
    return y + params["bias"]


# ----------------------------------------------------------------------------- dense conv


def _promote(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` and ``kernel`` in their common dtype (``lax``'s conv needs equal dtypes; the
    factorized paths' matmuls promote the same way)."""
    dtype = jnp.result_type(x, kernel)
    return x.astype(dtype), kernel.astype(dtype)


def _promoted(x: jax.Array, params: Params, keys: Sequence[str]) -> dict:
    """``params`` with the leaves ``keys`` in their common dtype with ``x``, so that a kernel is
    rebuilt in the dtype the conv computes in (bfloat16 factors with a float32 ``x``: float32)."""
    dtype = jnp.result_type(x, *(params[k] for k in keys))
    return {**params, **{k: params[k].astype(dtype) for k in keys}}


def _vary_alike(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """``arrays`` cast (``lax.pcast(..., to="varying")``) to vary over every manual mesh axis
    that any of them varies over; unchanged outside ``shard_map``. Applied to a custom VJP's
    inputs: its backward pass must return cotangents of its inputs' types, and the cotangent of a
    weight every shard shares, computed from one shard's data, varies over the data's axes (JAX
    then sums it over them, the transpose of the cast), as XLA's own VJPs do."""
    varying = [jax.typeof(a).manual_axis_type.varying for a in arrays]
    axes = frozenset().union(*varying)
    return tuple(lax.pcast(a, tuple(axes - v), to="varying") if axes - v else a for a, v in zip(arrays, varying))


def _dimension_numbers(n: int) -> lax.ConvDimensionNumbers:
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
    if n < 1 or x.ndim != n + 2:
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
    pads = resolve_padding(padding, x.shape[1:-1], kernel.shape[:n], strides, dilations)
    x, kernel = _promote(x, kernel)
    return conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilations, dimension_numbers=_dimension_numbers(n),
                                feature_group_count=feature_group_count)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated``: same signature, same result, faster on XLA CPU for
    two channels-last kinds (e.g. ``nn.Conv(..., conv_general_dilated=hocp_jax.conv.conv_general_dilated)``;
    :func:`dense_conv` and the models' convs use it). On the CPU backend it runs

    * a pointwise kernel (every spatial size 1, one group): one matrix product over the padded,
      strided positions (:func:`channel_matmul`); it took 0.10-0.75x the time of XLA CPU's 1x1 conv
      fwd+bwd on MobileNet-v2's and ResNet's 1x1 shapes;
    * a depthwise kernel (``feature_group_count`` = input channels = output channels): the shift
      kernel of :func:`depthwise_conv`, which is reverse mode only like the CP path's depthwise
      passes (``jax.jvp`` through it raises; forward-over-reverse, e.g. Hessian-vector products,
      works).
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
      mode only there, like the depthwise route);
    * any other ungrouped 2-D kernel on a large input (:func:`hocp_jax.conv_plans.dense_chunk`,
      which has the figures: from 3 MiB, 1 MiB for a stem of at most 4 input channels, with one
      program per device), with ``precision`` None: the same conv in a loop over chunks of
      samples (:func:`_chunked_conv`; reverse mode only too).

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
        def xla(lhs, rhs):
            return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, batch_group_count=batch_group_count,
                                            precision=precision, preferred_element_type=preferred_element_type)

        return _with_auto_axes(xla, lhs, rhs) if _channels_last(lhs, rhs, dimension_numbers) else xla(lhs, rhs)
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
    if not ((jax.default_backend() == "cpu" or gpu_taps) and lhs.dtype == rhs.dtype
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
    as ``(*K, C_in, C_out)`` (:func:`_dimension_numbers`)."""
    n = rhs.ndim - 2
    return (dimension_numbers is not None and n >= 1 and lhs.ndim == n + 2
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _dimension_numbers(n))


GPU_CONV_MAX_MODES = 3
"""Most spatial modes of a convolution left to XLA on the GPU backend. XLA's GPU compiler hands
convolutions to cuDNN, which takes at most three spatial modes; on an NVIDIA H200 with jax 0.11.2
(stop 46, ``benchmarks/device_check.sh`` and benchmarks/EXPERIMENTS.md), compiling the gradient of
a ``lax`` conv with four spatial modes aborted the process ("Check failed: num_dimensions <= 3"
in ``gpu_conv_runner.cc``) or gave a wrong kernel gradient, while the forward pass was right. So
:func:`conv_general_dilated` and the convs of computed kernels (:func:`_weight_conv`) run such
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
    return jax.default_backend() == "gpu" and n_modes > GPU_CONV_MAX_MODES


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
    live = [(xt, ws[i]) for i, (xt, reads) in enumerate(zip(_tap_inputs(x, ks, strides, pads, dilations, outs),
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
    """For every tap, in :func:`_tap_inputs`' order: whether it reads any of ``x`` (not only its
    zero padding). A tap that reads none adds zeros, so :func:`_taps_conv` leaves it out (on a map
    smaller than the kernel most taps do: a 1x1 map under a 3x3 kernel with padding 1 has one)."""
    def reads(a, size, lo, out, s):  # some position a + j s, 0 <= j < out, in [lo, lo + size)
        j = max(0, -(-(lo - a) // s))
        return j < out and a + j * s < lo + size

    for tap in itertools.product(*map(range, kernel_size)):
        yield all(reads(t * d, size, lo, out, s)
                  for t, d, size, (lo, _), out, s in zip(tap, dilations, sizes, pads, out_sizes, strides))


def _patches_conv(x: jax.Array, kernel: jax.Array, strides, pads, dilations, precision=None) -> jax.Array:
    """The channels-last conv of ``x (B, *S, C_in)`` with ``kernel (*K, C_in, C_out)`` as one matrix
    product of its explicit patches (im2col): the ``prod(K)`` tap inputs (:func:`_tap_inputs`) side
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
        patches = jnp.concatenate(list(_tap_inputs(x, ks, strides, pads, dilations, outs)), axis=-1)
        return channel_matmul(patches, kernel.reshape(-1, c_out), precision)
    # In-plane patches at every position of the padded first mode, (B, S_1 + pads, *S_out[1:],
    # prod(K[1:]) C_in); first-mode tap t reads its slice of them with the kernel's t-th plane.
    xp = _pad_axis(x, 1, pads[0])
    plane = jnp.concatenate(list(_tap_inputs(xp, (1, *ks[1:]), (1, *strides[1:]), ((0, 0), *pads[1:]),
                                             (1, *dilations[1:]), [xp.shape[1], *outs[1:]])), axis=-1)
    return _summed_products(((lax.slice_in_dim(plane, t * dilations[0], t * dilations[0] + (outs[0] - 1) * strides[0] + 1,
                                               strides[0], axis=1), w)
                             for t, w in enumerate(kernel.reshape(ks[0], -1, c_out))), x.dtype, precision)


def _tap_inputs(x: jax.Array, kernel_size, strides, pads, dilations, out_sizes):
    """For every tap of a kernel, in the kernel's row-major order, ``(B, *S_out, C_in)``: the
    zero-padded ``x`` read at the positions that tap multiplies (one strided slice)."""
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    for tap in itertools.product(*map(range, kernel_size)):
        start = tuple(t * d for t, d in zip(tap, dilations))
        limit = tuple(a + (o - 1) * s + 1 for a, o, s in zip(start, out_sizes, strides))
        yield lax.slice(xp, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), (1, *strides, 1))


def _lax_conv(x, kernel, strides, pads, dilations):
    def xla(x, kernel):
        return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pads, rhs_dilation=dilations,
                                        dimension_numbers=_dimension_numbers(kernel.ndim - 2))

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


_conv_tap_grad_vjp = jax.custom_vjp(_lax_conv, nondiff_argnums=(2, 3, 4))


def _conv_tap_grad(x, kernel, strides, pads, dilations):
    return _conv_tap_grad_vjp(*_vary_alike(x, kernel), strides, pads, dilations)


def _conv_tap_grad_fwd(x, kernel, strides, pads, dilations):
    return _lax_conv(x, kernel, strides, pads, dilations), (x, kernel)


def _conv_tap_grad_bwd(strides, pads, dilations, res, g):
    """Input gradient: XLA's own (the transposed conv), or in a loop on CPU :func:`_loop_input_grad`;
    kernel gradient: one ``(C_in, N) x (N, C_out)`` matrix product per tap, ``N`` = the batch's
    output positions, accumulated in float32 (or wider)."""
    x, kernel = res
    if conv_plans.cpu_loop_mode() and all(lo >= 0 and hi >= 0 for lo, hi in pads):
        dx = _loop_input_grad(g, kernel, x.shape, strides, pads, dilations)
    else:
        dx = jax.vjp(lambda x: _lax_conv(x, kernel, strides, pads, dilations), x)[1](g)[0]
    g2 = g.reshape(-1, g.shape[-1])
    dk = jnp.stack([
        jnp.matmul(xt.reshape(-1, x.shape[-1]).T, g2, preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
        for xt in _tap_inputs(x, kernel.shape[:-2], strides, pads, dilations, g.shape[1:-1])
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
                                        rhs_dilation=dilations, dimension_numbers=_dimension_numbers(n))
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
    n = kernel.ndim - 2
    if n < 1 or x.ndim != n + 2 or x.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"x: got shape {tuple(x.shape)} for a kernel of shape {tuple(kernel.shape)}; expected "
                         f"(B, {n} spatial sizes, {kernel.shape[-2]} channels)")
    for name, value in (("strides", strides), ("pads", pads), ("dilations", dilations)):
        if len(value) != n:
            raise ValueError(f"{name}={value!r}: expected one entry per spatial mode ({n})")
    if x.dtype != kernel.dtype:
        raise ValueError(f"x: dtype {x.dtype} differs from the kernel's {kernel.dtype}; expected equal dtypes")
    return _conv_tap_grad(x, kernel, tuple(strides), tuple(tuple(p) for p in pads), tuple(dilations))


def _chunked_conv(x: jax.Array, kernel: jax.Array, strides, pads, dilations, chunk: int) -> jax.Array:
    """:func:`conv_matmul_kernel_grad` over ``chunk`` samples of ``x`` at a time (:func:`_per_sample`,
    both loops in :func:`hocp_jax.conv_plans.loop_mode`): :func:`hocp_jax.conv_plans.dense_chunk`'s route."""
    return _per_sample(lambda xc: conv_matmul_kernel_grad(xc, kernel, strides=strides, pads=pads, dilations=dilations),
                       x, chunk, loop=True)


def _weight_conv(x: jax.Array, kernel: jax.Array, strides, pads, dilations, input_grad: bool = True) -> jax.Array:
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
    x, kernel = _promote(x, kernel)
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


def _pad_axis(h: jax.Array, axis: int, pad: tuple[int, int]) -> jax.Array:
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
                                      zip(_tap_inputs(h, ks, strides, pads, dilations, outs), taps)))


def _shift_depthwise(h, kernel, strides, pads, dilations):
    """The depthwise shift kernel with its custom VJP (:func:`depthwise_conv_1d`)."""
    return _shift_depthwise_vjp(*_vary_alike(h, kernel), strides, pads, dilations)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shift_depthwise_vjp(h, kernel, strides, pads, dilations):
    return _shift_conv(h, kernel, strides, pads, dilations)


def _shift_depthwise_fwd(h, kernel, strides, pads, dilations):
    return _shift_conv(h, kernel, strides, pads, dilations), (h, kernel)


def _shift_depthwise_bwd(strides, pads, dilations, res, g):
    """Input gradient = the same shift kernel on the stride-dilated, re-padded cotangent with
    the flipped kernel; kernel gradient = per tap, sum of the tap's input slice times ``g``."""
    h, kernel = res
    ks, outs = kernel.shape[:-1], g.shape[1:-1]
    cfg = [((k - 1) * d - lo, n + lo - (o - 1) * s - 1, s - 1)
           for n, k, (lo, _), s, d, o in zip(h.shape[1:-1], ks, pads, strides, dilations, outs)]
    gp = lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0), *cfg, (0, 0, 0)])
    flipped = lax.rev(kernel, [a for a, k in enumerate(ks) if k > 1])
    dh = _shift_conv(gp, flipped, (1,) * len(ks), ((0, 0),) * len(ks), dilations)
    sum_axes = tuple(range(h.ndim - 1))
    dk = jnp.stack([jnp.sum(xt * g, axis=sum_axes) for xt in _tap_inputs(h, ks, strides, pads, dilations, outs)])
    return dh, dk.reshape(kernel.shape).astype(kernel.dtype)


_shift_depthwise_vjp.defvjp(_shift_depthwise_fwd, _shift_depthwise_bwd)


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
    so only the output positions are computed. The backward pass is a custom VJP made of the
    same fused kernel (input gradient: the flipped factor over the stride-dilated cotangent;
    factor gradient: one reduction per tap), because XLA's automatic transpose of the slices
    materialises full-size padded copies (1.3-1.6x slower fwd+bwd on the Jester layers).
    Reverse mode only (no ``jax.jvp`` through this function). On a 2-core CPU the shift kernel
    was 3-20x faster fwd+bwd than ``lax.conv_general_dilated`` with ``feature_group_count=R``
    on the Jester and ResNet layers when it replaced it, so the grouped conv is not used
    (the N-D form: :func:`depthwise_conv`).
    """
    return _depthwise(h, factor, axis, int(stride), tuple(int(p) for p in pad), int(dilation))


def depthwise_conv(h: jax.Array, kernel: jax.Array, *, stride=1, padding: PaddingLike = "SAME", dilation=1) -> jax.Array:
    """Depthwise N-D conv of ``h (B, *S, R)`` with ``kernel (*K, R)`` (one ``*K`` filter per
    channel; MobileNet's depthwise step) -> ``(B, *S_out, R)``, padding as in :mod:`hocp_jax.padding`.

    The shift kernel of :func:`depthwise_conv_1d` over all modes at once (``prod K`` strided
    slices, one fused pass; custom VJP of the same form; reverse mode only). It equals
    ``lax.conv_general_dilated`` with ``feature_group_count=R`` and replaces it, which XLA CPU
    ran 2.7-31x slower fwd+bwd on the MobileNet-v2 CIFAR-10 layers (README, "Depthwise and 1x1 convs").
    """
    n = kernel.ndim - 1
    if min(kernel.shape, default=0) < 1:
        raise ValueError(f"kernel: got shape {tuple(kernel.shape)}, expected a depthwise (*K, R) kernel of sizes >= 1")
    if n < 1 or h.ndim != n + 2 or h.shape[-1] != kernel.shape[-1]:
        raise ValueError(f"h: got shape {tuple(h.shape)} for a depthwise kernel of shape {tuple(kernel.shape)}; "
                         f"expected (B, {n} spatial sizes, {kernel.shape[-1]} channels)")
    strides = as_tuple(stride, n, "stride")
    dilations = as_tuple(dilation, n, "dilation")
    pads = resolve_padding(padding, h.shape[1:-1], kernel.shape[:n], strides, dilations)
    h, kernel = _promote(h, kernel)
    return _shift_depthwise(h, kernel, strides, pads, dilations)


def best_mode_order(
    in_sizes: Sequence[int], kernel_sizes: Sequence[int], strides, pads, dilations
) -> tuple[int, ...]:
    """Order (indices into the modes) of the 1-D convs that minimises the analytic FLOPs.

    Each 1-D conv costs in proportion to its input size, so the most size-reducing modes
    (largest stride) go first; ties keep the given order. Uses :func:`counting.cp_flops`.
    """
    n = len(in_sizes)
    pad_pairs = tuple(tuple(p) for p in pads)

    def cost(order):
        return counting.cp_flops(
            in_sizes, 1, 1, kernel_sizes, 1, stride=tuple(strides), padding=pad_pairs, dilation=tuple(dilations), order=order
        )

    return min(itertools.permutations(range(n)), key=cost)


def choose_cp_implementation(
    x_shape: Sequence[int], params: Params, modes: Sequence[str], *, stride=1, padding: PaddingLike = "SAME", dilation=1,
    input_grad: bool = True, dtype=jnp.float32, per_sample: bool | None = None,
) -> str:
    """``"factorized"`` or ``"reconstructed"``, whichever :func:`counting.cp_path_costs` says is cheaper
    for a :func:`cp_conv` call with these arguments (``dtype``: of ``x``; ``per_sample``: as
    :func:`cp_conv`'s, which with the default ``None`` may run a 2-D conv's factorized path in
    chunks of samples, :func:`hocp_jax.conv_plans.batch_plan`). The CPU cost model;
    ``implementation="auto"`` goes through :func:`hocp_jax.autotune.choose_cp`."""
    modes = check_modes(modes)
    in_sizes, ks = tuple(x_shape[1:-1]), tuple(params[mode_key(m)].shape[0] for m in modes)
    c_in, c_out, rank = params["factor_in"].shape[0], params["factor_out"].shape[0], params["lambda"].shape[0]
    y_shape = (x_shape[0], *counting.output_sizes(in_sizes, ks, stride, padding, dilation), c_out)
    costs = counting.cp_path_costs(
        x_shape[0], in_sizes, c_in, c_out, ks, rank, stride=stride, padding=padding, dilation=dilation,
        input_grad=input_grad, chunk=conv_plans.batch_plan(x_shape, y_shape, rank, dtype, per_sample),
        patches=conv_plans.patches_fit(x_shape, dtype, (*ks, c_in, c_out), as_tuple(stride, len(ks), "stride")),
    )
    return "factorized" if costs["factorized"] <= costs["reconstructed"] else "reconstructed"


# ----------------------------------------------------------------------------- CP conv


def cp_to_kernel(params: Params, modes: Sequence[str]) -> jax.Array:
    """Reconstructs the dense kernel ``(*K, C_in, C_out)`` from CP params (lambda folded in)."""
    modes = check_modes(modes)
    cp_rank(params, modes)
    letters = string.ascii_lowercase[: len(modes)]
    operands = [params[mode_key(m)] for m in modes] + [params["factor_in"], params["factor_out"], params["lambda"]]
    spec = ",".join(f"{l}R" for l in letters) + ",YR,ZR,R->" + letters + "YZ"
    return jnp.einsum(spec, *operands)


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


def _add_skip(y: jax.Array, x: jax.Array, params: Params, strides) -> jax.Array:
    """``y`` plus, if the dict has ``factor_skip (C_in, C_out)``, the skip branch ``x x_C U^(S)``
    as a strided 1x1 conv, which must have ``y``'s shape ``(B, *S_out, C_out)``."""
    if "factor_skip" not in params:
        return y
    u = params["factor_skip"]
    xs = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
    skip_shape = (*xs.shape[:-1], u.shape[-1])
    if u.ndim != 2 or u.shape[0] != x.shape[-1] or skip_shape != y.shape:
        raise ValueError(
            f"params['factor_skip']: shape {tuple(u.shape)} on x {tuple(x.shape)} gives a skip branch of shape "
            f"{skip_shape} but the conv output is {tuple(y.shape)}; expected ({x.shape[-1]}, {y.shape[-1]}) "
            "and a size-preserving padding ('SAME'/'SYMMETRIC')"
        )
    return y + channel_matmul(xs, u)


def _per_sample(f: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int = 1, loop: bool = False) -> jax.Array:
    """``f`` (``(k, *S, C) -> (k, *S', C')``, may close over parameters) on each chunk of ``chunk``
    samples of ``x`` in turn (``lax.map``; ``chunk`` divides the batch). Its VJP is a second loop
    that recomputes one chunk's forward and pulls its cotangent back at once, while that chunk's
    intermediates are still in cache; the parameter gradients are summed over the chunks.
    Differentiating the ``lax.map`` itself would store every chunk's intermediates between the
    passes (zero-filled (B, ...) buffers written and read back by dynamic slices), which cost
    more than the recomputed forward (benchmarks/EXPERIMENTS.md). ``loop``: both loops' bodies
    are traced in :func:`hocp_jax.conv_plans.loop_mode`."""
    in_loop = conv_plans.loop_mode if loop else contextlib.nullcontext
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


def _per_tile(f: Callable[[jax.Array], jax.Array], x: jax.Array, axis: int, rows: int, halo: int,
              pad: tuple[int, int]) -> jax.Array:
    """``f`` over tiles of ``rows`` output rows along spatial ``axis`` of every sample, one tile at
    a time in a loop over the ``B * n`` tiles, with the VJP scheme of :func:`_per_sample`.

    ``f`` maps ``(1, ..., rows + halo, ..., C)`` input rows to ``(1, ..., rows, ..., C')`` (its conv
    along ``axis`` unpadded, stride 1); ``x`` is zero-padded along ``axis`` by ``pad = (lo, hi)``,
    so ``f`` must be linear up to that conv (the zero rows are its padding). Tiles are read from
    and written to ``x``'s and the output's own layout (dynamic slices; the gradient w.r.t. ``x``
    is accumulated in place, the halos overlapping): no tile-major copy of any array. When ``rows``
    does not divide the output size, the last tile is moved back to end at the last row; the rows
    it shares with the tile before get a zero cotangent. Returns ``(B, ..., S_out, ..., C')``.
    """
    xp = _pad_axis(x, axis, pad)
    b, out_size = x.shape[0], xp.shape[axis] - halo
    n = -(-out_size // rows)

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
        return lax.fori_loop(0, b * n, body, _vary_alike(jnp.zeros(y_shape, y_tile.dtype), xp, *consts)[0])

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


def _folded_contraction(x: jax.Array, factors: Params, modes: Sequence[str], folded: Sequence[int], ksizes, pads,
                        dilations) -> jax.Array:
    """The input contraction of ``x (B, *S, C_in)`` with the depthwise passes of the stride-1 modes
    ``folded`` (sorted indices) folded in: ``(B, *S', R)``, ``S'`` the folded modes' output sizes
    and the others' input sizes. One product of the ``prod K`` shifted copies of ``x`` side by side
    (:func:`_tap_inputs`, channels minor) with ``U^(C)`` times those modes' factors,
    ``(prod K C_in, R)`` (:func:`hocp_jax.conv_plans.tile_fold_modes`)."""
    n = len(modes)
    ks = [ksizes[i] if i in folded else 1 for i in range(n)]
    ps = [tuple(pads[i]) if i in folded else (0, 0) for i in range(n)]
    ds = [dilations[i] if i in folded else 1 for i in range(n)]
    outs = [output_size(*a) for a in zip(x.shape[1:-1], ks, (1,) * n, ds, ps)]
    w = factors["factor_in"]  # (C_in, R), then (K_i, ..., C_in, R) flattened, the first folded mode major
    for i in reversed(folded):
        u = factors[mode_key(modes[i])]
        w = (u[:, None, :] * w[None]).reshape(-1, u.shape[-1])
    copies = jnp.concatenate(list(_tap_inputs(x, ks, (1,) * n, ps, ds, outs)), axis=-1)
    return channel_matmul(copies, w)


def _on_each_device(f: Callable, x: jax.Array, params: Params, mesh, axes: tuple[str, ...]) -> jax.Array:
    """``f(x, params)`` (``(B, ...) -> (B, ...)``, each sample on its own) under ``jax.shard_map``
    over every axis of ``mesh``: ``x``'s batch split over ``axes``, ``params`` and the arrays ``f``
    closes over (a PReLU ``psi``'s slopes) on every device. Their gradients come out summed over
    the shards (the transpose of the replicated inputs)."""
    spec = jax.sharding.PartitionSpec(axes)
    return jax.shard_map(f, mesh=mesh, in_specs=(spec, jax.sharding.PartitionSpec()), out_specs=spec)(x, params)


def cp_conv(
    x: jax.Array,
    params: Params,
    *,
    modes: Sequence[str] | None = None,
    stride=1,
    padding: PaddingLike = "SAME",
    dilation=1,
    implementation: str = "factorized",
    psi: Psi | None = None,
    mode_order: Sequence[str] | None = None,
    input_grad: bool = True,
    per_sample: bool | None = None,
    psi_pointwise: bool = False,
) -> jax.Array:
    """CP (Kruskal) convolution of any order.

    Args:
      x: ``(B, *S, C_in)`` with ``len(S) == len(modes)``.
      params: CP dict (module docstring); ``factor_in.shape[0] == C_in``.
      modes: names of the spatial axes of ``x`` in order; default :func:`default_modes`.
      stride, dilation: int or one int per mode.
      padding: see :mod:`hocp_jax.padding`.
      implementation: ``"factorized"`` (1x1 -> depthwise 1-D per mode -> 1x1, see
        :func:`depthwise_conv_1d`; on CPU it computes bfloat16/float16 in float32,
        :func:`hocp_jax.conv_plans.compute_dtype`), ``"reconstructed"`` (build the kernel, one dense conv; see
        :func:`hocp_jax.autotune.choose_kernel_grad` for its kernel gradient) or
        ``"auto"`` (per call shape and backend, :func:`hocp_jax.autotune.choose_cp`: the
        analytic cost model or, under the ``"measure"`` policy, the default on GPU, a cached
        timing of both paths; always factorized when ``psi`` is given). The choice is made at
        trace time from static shapes: nothing at run time under ``jit``; under the measured
        policy the first trace of each new shape times both paths.
      psi: optional ``psi(h, stage)`` between factors (factorized/auto only).
      mode_order: order in which the 1-D convs are applied; without ``psi`` the result is the
        same, only the cost changes; with ``psi`` (applied after each mode's conv) the order is
        part of the function, so pass it explicitly (:class:`hocp_jax.layers.CPConv` does).
        Default: :func:`best_mode_order` (most-reducing stride first).
      input_grad: whether the caller differentiates w.r.t. ``x`` (False for a network's first
        layer, whose input is the data). Only informs ``"auto"`` (and, under the measured policy,
        the timing of the reconstructed path's kernel gradient): without the input gradient a
        channel-starved dense conv is cheap, so ``reconstructed`` can win.
      per_sample: run the factorized path one sample at a time (``lax.map`` over the batch), so
        its ``(1, *S, R)`` intermediates stay in cache instead of streaming ``(B, *S, R)`` ones
        through memory; the backward pass recomputes each sample's forward just before its
        gradient, so nothing per sample is stored between the passes. The result is the same.
        A sample whose intermediate is still large is further cut into tiles of output rows
        along one mode, each computed with a halo of input rows
        (:func:`hocp_jax.conv_plans.tile_plan`; :func:`hocp_jax.conv_plans.tile_rows_mode`); tiles
        are cut whatever the batch size unless ``per_sample`` is False. Without ``psi``, a tile of
        an input with few channels runs the passes of its tiled mode and one more inside its
        input contraction (:func:`hocp_jax.conv_plans.tile_fold_modes`).
        ``None`` (default): :func:`hocp_jax.conv_plans.per_sample_default` (3-D+ convs with large
        enough intermediates on a CPU device running its own program:
        one device, or inside ``shard_map``), and for 2-D convs with large whole-batch
        intermediates chunks of several samples (:func:`hocp_jax.conv_plans.batch_chunk_default`),
        when ``psi`` is None or pointwise, else off,
        since ``psi`` may use batch statistics (BatchNorm). ``True`` with a ``psi`` that is not
        pointwise is the caller's promise that ``psi`` acts on each sample alone; it is never
        tiled. Ignored by the reconstructed path (XLA CPU's dense conv inside a loop is many
        times slower).
      psi_pointwise: the caller's promise that ``psi`` acts on each value alone and maps 0 to 0
        (ReLU, PReLU; :class:`hocp_jax.layers.CPConv` decides this from its ``psi`` name): such
        a ``psi`` keeps the zero rows that stand for a tile's padding zero, so ``per_sample`` and
        the tiles apply as without ``psi``.

    Returns:
      ``(B, *S_out, C_out)``.
    """
    modes = check_modes(modes if modes is not None else default_modes(x.ndim - 2))
    _check_x(x, len(modes), modes)
    cp_rank(params, modes)
    if params["factor_in"].shape[0] != x.shape[-1]:
        raise ValueError(
            f"params['factor_in']: shape {tuple(params['factor_in'].shape)} expects {params['factor_in'].shape[0]} "
            f"input channels but x has {x.shape[-1]} (x.shape={tuple(x.shape)})"
        )
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
    n = len(modes)
    strides = as_tuple(stride, n, "stride")
    dilations = as_tuple(dilation, n, "dilation")
    ksizes = [params[mode_key(m)].shape[0] for m in modes]
    pads = resolve_padding(padding, x.shape[1:-1], ksizes, strides, dilations)

    conv_plans.check_automatic_flag(per_sample, "per_sample")
    if not isinstance(psi_pointwise, bool):
        raise ValueError(f"psi_pointwise={psi_pointwise!r}: expected True or False")
    if implementation == "reconstructed" and psi is not None:
        raise ValueError("psi: a non-linearity between factors needs implementation='factorized'")
    local = psi is None or psi_pointwise  # else psi may couple samples (BatchNorm) or map 0 to non-0
    run = functools.partial(_cp_conv, modes=modes, strides=strides, pads=pads, dilations=dilations, ksizes=ksizes,
                            implementation=implementation, psi=psi, mode_order=mode_order, input_grad=input_grad,
                            per_sample=per_sample, local=local)
    split = conv_plans.batch_split(x, params) if local else None
    if split is not None:  # a CPU device's share per program, with the loops below: see batch_split
        return _on_each_device(run, x, params, *split)
    return run(x, params)


def _cp_conv(x: jax.Array, params: Params, *, modes, strides, pads, dilations, ksizes, implementation: str, psi,
             mode_order, input_grad: bool, per_sample: bool | None, local: bool) -> jax.Array:
    """:func:`cp_conv` on checked arguments, with the padding resolved per mode."""
    if implementation == "auto":
        implementation = "factorized" if psi is not None else autotune.choose_cp(
            x.shape, x.dtype, params, modes, strides, pads, dilations, input_grad, per_sample=per_sample,
            batch_shards=explicit_sharding.shards(x, 0))
    if implementation == "reconstructed":
        keys = ("lambda", "factor_in", "factor_out", *map(mode_key, modes))
        y = _weight_conv(x, cp_to_kernel(_promoted(x, params, keys), modes), strides, pads, dilations, input_grad)
    else:
        if mode_order is None:
            order = tuple(modes[i] for i in best_mode_order(x.shape[1:-1], ksizes, strides, pads, dilations))
        else:
            order = tuple(mode_order)
            if sorted(order) != sorted(modes):
                raise ValueError(f"mode_order={order!r}: expected a permutation of modes={modes!r}")
        tiles_ok = local and per_sample is not False
        halos = [d * (k - 1) for k, d in zip(ksizes, dilations)]
        out_sizes = [output_size(*a) for a in zip(x.shape[1:-1], ksizes, strides, dilations, pads)]
        y_shape = (x.shape[0], *out_sizes, params["factor_out"].shape[0])
        rank = params["lambda"].shape[0]
        chunk = conv_plans.batch_plan(x.shape, y_shape, rank, x.dtype, per_sample, local)
        keys = ("factor_in", *map(mode_key, modes))
        dtype = jnp.result_type(x, params["factor_out"], params["lambda"], *(params[k] for k in keys))
        cdt = conv_plans.compute_dtype(dtype)  # float32 for bfloat16 on CPU (XLA CPU: no faster bf16 arithmetic)
        factors = {k: params[k].astype(cdt) for k in keys}
        out_factor = (params["factor_out"] * params["lambda"][None, :]).astype(cdt)  # (C_out, R)
        out_before = conv_plans.out_factor_before_loops(rank)
        if out_before:  # (R, C_out) as an operand of the loops, not transposed inside them
            out_factor = out_factor.T
        # Under shard_map the factors vary like x: the per-sample and tile loops accumulate the
        # shard's factor gradients, summed over the shards once (the cast's transpose), not per sample.
        x, out_factor, *cast = _vary_alike(x, out_factor, *factors.values())
        factors = dict(zip(keys, cast))

        def factorized(x, pads=pads, order=order, folded=()):
            if folded:  # no psi: the folded modes' passes are part of the input contraction
                h = _folded_contraction(x.astype(cdt), factors, modes, folded, ksizes, pads, dilations)
            else:
                h = channel_matmul(x.astype(cdt), factors["factor_in"])
            if psi is not None:
                h = psi(h, "in")
            for m in order:
                i = modes.index(m)
                if i in folded:
                    continue
                h = depthwise_conv_1d(h, factors[mode_key(m)], i + 1, stride=strides[i], pad=pads[i], dilation=dilations[i])
                if psi is not None:
                    h = psi(h, m)
            return channel_matmul(h, out_factor if out_before else out_factor.T).astype(dtype)

        plan = tiles_ok and conv_plans.tile_plan(x.shape, rank, x.dtype, out_sizes, halos, strides, pads)
        if plan:
            i, rows = plan
            folded = () if psi is not None else conv_plans.tile_fold_modes(x.shape[-1], ksizes, strides, out_sizes, i, rank)
            if mode_order is None and psi is None:  # the tiled mode first of the stride-1 ones: fewer passes
                # see the halo rows (with psi between the passes, their order is part of the function)
                strided = tuple(m for m in order if strides[modes.index(m)] > 1)
                order = strided + (modes[i],) + tuple(m for m in order if m not in strided and m != modes[i])
            tile_pads = pads[:i] + ((0, 0),) + pads[i + 1:]
            y = _per_tile(functools.partial(factorized, pads=tile_pads, order=order, folded=folded), x, i + 1, rows,
                          halos[i], pads[i])
        elif chunk:
            y = _per_sample(factorized, x, chunk)
        else:
            y = factorized(x)
    return add_bias(_add_skip(y, x, params, strides), params)


# ----------------------------------------------------------------------------- Tucker conv


def check_tucker(params: Params) -> tuple[int, int]:
    """Validates Tucker params ``factor_in (C_in, R_in)``, ``core (*K, R_in, R_out)`` (K >= 1 per
    mode, at least one mode), ``factor_out (C_out, R_out)``; returns ``(R_in, R_out)``."""
    for k in ("factor_in", "core", "factor_out"):
        if k not in params:
            raise ValueError(f"params: missing Tucker leaf {k!r}; expected factor_in, core, factor_out")
    core, u_in, u_out = (tuple(np.shape(params[k])) for k in ("core", "factor_in", "factor_out"))
    for name, shape in (("factor_in", u_in), ("factor_out", u_out)):
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"params['{name}']: got shape {shape}, expected a 2-D (channels, rank) matrix")
    if len(core) < 3 or min(core) < 1 or core[-2:] != (u_in[1], u_out[1]):
        raise ValueError(f"params['core']: got shape {core}, expected (*K, R_in={u_in[1]}, R_out={u_out[1]}) with "
                         "one K >= 1 per mode (factor_in, factor_out: (C, R))")
    return u_in[1], u_out[1]


def tucker_to_kernel(params: Params) -> jax.Array:
    """Reconstructs ``(*K, C_in, C_out)`` from Tucker params ``factor_in, core, factor_out``."""
    check_tucker(params)
    return jnp.einsum("...ab,ca,tb->...ct", params["core"], params["factor_in"], params["factor_out"])


def tucker_conv(
    x: jax.Array,
    params: Params,
    *,
    stride=1,
    padding: PaddingLike = "SAME",
    dilation=1,
    implementation: str = "factorized",
) -> jax.Array:
    """Tucker convolution (paper Eq. 4): ``((X x_C U^(C)) * G) x U^(T)``.

    ``x (B, *S, C_in)``; params ``factor_in (C_in, R_in)``, ``core (*K, R_in, R_out)``,
    ``factor_out (C_out, R_out)``, optional ``bias (C_out,)``. Returns ``(B, *S_out, C_out)``.
    """
    check_tucker(params)
    core, u_in, u_out = params["core"], params["factor_in"], params["factor_out"]
    if core.ndim != x.ndim:
        raise ValueError(f"params['core']: shape {tuple(core.shape)} has {core.ndim - 2} kernel modes but x "
                         f"{tuple(x.shape)} has {x.ndim - 2} spatial modes; expected (*K, R_in, R_out), one K per mode")
    if u_in.shape[0] != x.shape[-1]:
        raise ValueError(f"params['factor_in']: shape {tuple(u_in.shape)} but x has {x.shape[-1]} channels")
    n = x.ndim - 2
    strides, dilations = as_tuple(stride, n, "stride"), as_tuple(dilation, n, "dilation")
    pads = resolve_padding(padding, x.shape[1:-1], core.shape[:n], strides, dilations)
    if implementation == "reconstructed":
        y = _weight_conv(x, tucker_to_kernel(_promoted(x, params, ("core", "factor_in", "factor_out"))), strides,
                         pads, dilations)
    elif implementation == "factorized":
        h = channel_matmul(x, u_in)
        h = _weight_conv(h, core, strides, pads, dilations)
        y = channel_matmul(h, u_out.T)
    else:
        raise ValueError(f"implementation={implementation!r}: expected one of {TUCKER_IMPLEMENTATIONS}")
    return add_bias(y, params)


# ----------------------------------------------------------------------------- MobileNet forms


def merge_mode_factors(params: Params, modes: Sequence[str]) -> jax.Array:
    """Merges the per-mode CP factors into one depthwise kernel ``(*K, R)`` (paper Sec. 3.4).

    ``U^(S)_{k_0..k_{N-1}, r} = prod_n U^(m_n)_{k_n, r}`` — MobileNet's depthwise filter.
    """
    modes = check_modes(modes)
    letters = string.ascii_lowercase[: len(modes)]
    return jnp.einsum(",".join(f"{l}R" for l in letters) + "->" + letters + "R", *[params[mode_key(m)] for m in modes])


def cp_to_separable(params: Params, modes: Sequence[str]) -> dict[str, jax.Array]:
    """Rewrites CP params as a MobileNet-v2 style separable conv (lambda folded into factor_out)."""
    cp_rank(params, modes)
    out = {
        "factor_in": params["factor_in"],
        "depthwise": merge_mode_factors(params, modes),
        "factor_out": params["factor_out"] * params["lambda"][None, :],
    }
    return out | {k: params[k] for k in ("factor_skip", "bias") if k in params}


def separable_conv(
    x: jax.Array,
    params: Params,
    *,
    stride=1,
    padding: PaddingLike = "SAME",
    dilation=1,
) -> jax.Array:
    """Depthwise-separable conv (MobileNet v1 without ``factor_in``, v2 with it).

    ``x (B, *S, C_in)``; params: optional ``factor_in (C_in, R)`` (expansion 1x1; without it
    R = C_in), ``depthwise (*K, R)``, ``factor_out (C_out, R)`` (projection 1x1), optional
    ``factor_skip``/``bias``. Returns ``(B, *S_out, C_out)``.
    """
    if "depthwise" not in params or "factor_out" not in params:
        raise ValueError("params: expected leaves 'depthwise' (*K, R) and 'factor_out' (C_out, R)")
    dw = params["depthwise"]
    n = dw.ndim - 1
    if x.ndim != n + 2:
        raise ValueError(f"x: got shape {tuple(x.shape)}, expected {n + 2}-D input for a depthwise kernel {tuple(dw.shape)}")
    if "factor_in" in params and params["factor_in"].shape[0] != x.shape[-1]:
        raise ValueError(f"params['factor_in']: shape {tuple(params['factor_in'].shape)} expects "
                         f"{params['factor_in'].shape[0]} input channels but x has {x.shape[-1]}")
    h = channel_matmul(x, params["factor_in"]) if "factor_in" in params else x
    if h.shape[-1] != dw.shape[-1]:
        raise ValueError(f"params['depthwise']: shape {tuple(dw.shape)} expects {dw.shape[-1]} channels, got {h.shape[-1]}")
    if params["factor_out"].ndim != 2 or params["factor_out"].shape[1] != dw.shape[-1]:
        raise ValueError(f"params['factor_out']: got shape {tuple(params['factor_out'].shape)}, expected (C_out, {dw.shape[-1]})")
    h = depthwise_conv(h, dw, stride=stride, padding=padding, dilation=dilation)
    y = channel_matmul(h, params["factor_out"].T)
    return add_bias(_add_skip(y, x, params, as_tuple(stride, n, "stride")), params)


# ----------------------------------------------------------------------------- TT conv


def _tt_cores(params: Params, n_modes: int | None = None) -> list[jax.Array]:
    """Validated TT conv cores ``core_0 .. core_{N+1}`` (see :func:`tt_conv`)."""
    cores = []
    while f"core_{len(cores)}" in params:
        cores.append(params[f"core_{len(cores)}"])
    if len(cores) < 3 or (n_modes is not None and len(cores) != n_modes + 2):
        want = "N + 2 >= 3" if n_modes is None else f"{n_modes + 2} (x has {n_modes} spatial modes)"
        raise ValueError(f"params: found {len(cores)} TT cores core_0, core_1, ...; expected {want}")
    for n, c in enumerate(cores):
        left = 1 if n == 0 else cores[n - 1].shape[-1]
        if c.ndim != 3 or c.shape[0] != left or min(c.shape) < 1 or (n == len(cores) - 1 and c.shape[2] != 1):
            raise ValueError(
                f"params['core_{n}']: got shape {tuple(c.shape)}, expected (R_{n}={left}, size >= 1, R_{n + 1} >= 1)"
                + (f" with R_{n + 1} = 1 (last core)" if n == len(cores) - 1 else "")
            )
    return cores


def tt_to_kernel(params: Params) -> jax.Array:
    """Reconstructs the dense kernel ``(*K, C_in, C_out)`` from TT conv cores (see :func:`tt_conv`)."""
    cores = _tt_cores(params)
    w = cores[0][0]  # (C_in, R_1)
    for c in cores[1:]:
        w = jnp.tensordot(w, c, axes=1)  # (C_in, K_1, ..., R_{n+1})
    w = w[..., 0]  # (C_in, *K, C_out)
    return jnp.moveaxis(w, 0, -2)


def tt_conv(
    x: jax.Array,
    params: Params,
    *,
    stride=1,
    padding: PaddingLike = "SAME",
    dilation=1,
    implementation: str = "factorized",
) -> jax.Array:
    """Tensor-train (TT) convolution: the kernel, ordered ``(C_in, K_1, ..., K_N, C_out)``, is a
    tensor train (TensorLy's TT format, TensorLy-Torch's TT conv).

    ``x (B, *S, C_in)``; params ``core_0 (1, C_in, R_1)``, ``core_n (R_n, K_n, R_{n+1})`` for the
    spatial modes ``n = 1..N``, ``core_{N+1} (R_{N+1}, C_out, 1)``, optional ``bias (C_out,)``.
    ``"factorized"``: a 1x1 contraction to ``R_1``, one full (not depthwise) 1-D conv per mode
    ``R_n -> R_{n+1}`` with that mode's stride/padding/dilation, a 1x1 contraction to ``C_out``;
    ``"reconstructed"``: one dense conv with :func:`tt_to_kernel`. Returns ``(B, *S_out, C_out)``.
    """
    n = x.ndim - 2
    cores = _tt_cores(params, n)
    if cores[0].shape[1] != x.shape[-1]:
        raise ValueError(f"params['core_0']: shape {tuple(cores[0].shape)} expects {cores[0].shape[1]} channels, x has {x.shape[-1]}")
    strides, dilations = as_tuple(stride, n, "stride"), as_tuple(dilation, n, "dilation")
    pads = resolve_padding(padding, x.shape[1:-1], [c.shape[1] for c in cores[1:-1]], strides, dilations)
    if implementation == "reconstructed":
        y = _weight_conv(x, tt_to_kernel(_promoted(x, params, [f"core_{i}" for i in range(len(cores))])), strides,
                         pads, dilations)
    elif implementation == "factorized":
        def only(i, value, rest):  # ``value`` on mode i, ``rest`` on the other modes
            return tuple(value if j == i else rest for j in range(n))

        h = channel_matmul(x, cores[0][0])
        for i, c in enumerate(cores[1:-1]):  # (R_i, K_i, R_{i+1}) -> kernel (1.., K_i, ..1, R_i, R_{i+1})
            kernel = jnp.moveaxis(c, 1, 0).reshape(only(i, c.shape[1], 1) + (c.shape[0], c.shape[2]))
            h = _weight_conv(h, kernel, only(i, strides[i], 1), only(i, pads[i], (0, 0)), only(i, dilations[i], 1))
        y = channel_matmul(h, cores[-1][..., 0])
    else:
        raise ValueError(f"implementation={implementation!r}: expected 'factorized' or 'reconstructed'")
    return add_bias(y, params)
