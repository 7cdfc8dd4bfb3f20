"""A second JAX dense program: a dense conv written as one matrix product of its explicit patches
(im2col), beside ``lax``'s convolution (``hocp_jax.conv_ops.dense_conv``, what ``flax.linen.Conv``
runs). On the development CPU it runs faster than ``lax``'s conv on most benchmarked layers, so
``benchmarks.bench`` times both and reports the HO-CP paths against each (and against the faster
of the two). A benchmark baseline: the library's dense conv stays ``lax``'s, the conv XLA runs on
every backend, but for the CPU route of convs of few input channels over 3+ modes (stop 50)."""

from __future__ import annotations

import contextlib

from jax import lax

from hocp_jax import conv_ops


def dense_patches(x, kernel, strides, pads):
    """A dense conv ``x (B, *S, C_in)`` * ``kernel (*K, C_in, C_out)`` written as one matrix product
    of the explicit patches (im2col: the ``prod(K)`` shifted, strided slices of the padded input
    side by side, ``(B * prod(S_out), prod(K) * C_in)``) with the flattened kernel; ``strides``,
    ``pads``: one int and one ``(lo, hi)`` pair per spatial axis. A JAX dense baseline beside
    ``lax``'s convolution; the library's own patches product (:func:`hocp_jax.conv_ops._patches_conv`,
    its CPU route for convs of few input channels since stop 50), applied to every conv."""
    return conv_ops._patches_conv(x, kernel, tuple(strides), tuple(map(tuple, pads)), (1,) * (kernel.ndim - 2))


@contextlib.contextmanager
def patches_convs(max_in_channels: int | None = None):
    """Within the block, ``jax.lax.conv_general_dilated`` (which ``flax.linen.Conv``, the library's
    dense conv and its reconstructed CP path call) runs channels-last, undilated, ungrouped convs
    with explicit padding (and, if ``max_in_channels`` is given, at most that many input channels:
    a network's first conv) as :func:`dense_patches`, and any other conv as before; functions
    traced in the block keep that program. Yields a list that gets one entry per conv call traced
    as patches."""
    lax_conv = lax.conv_general_dilated
    replaced = []

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, **kwargs):
        channels_last = conv_ops.channels_last_dims(rhs.ndim - 2)  # the library's and flax.linen.Conv's layout
        if (not isinstance(padding, str) and feature_group_count == 1
                and (max_in_channels is None or lhs.shape[-1] <= max_in_channels)
                and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
                and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == channels_last):
            replaced.append((tuple(lhs.shape), tuple(rhs.shape)))
            return dense_patches(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)))
        return lax_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                        feature_group_count, **kwargs)

    lax.conv_general_dilated = conv_general_dilated
    try:
        yield replaced
    finally:
        lax.conv_general_dilated = lax_conv
