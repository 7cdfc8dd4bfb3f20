"""Parameter and FLOP counts of dense, CP and Tucker convolutions, and rank budgets.

Conventions:

* Parameters exclude biases unless ``bias=True`` (:func:`dense_params`, :func:`cp_params`;
  :func:`tucker_params` counts the factors and the core only). CP: ``R (C_in + C_out + sum K) + R``;
  the paper writes ``+1`` for lambda, but lambda is a length-R vector (one weight per rank
  component), and ``+R`` is what reproduces the Jester totals (dense 2,880,576 vs CP
  1,183,338 for the four layers at rank 6 x C_in).
* FLOPs = 2 x multiply-accumulates (the convention of XLA's ``cost_analysis``), for ONE
  example, counting only the contractions/convolutions (no bias adds, no padding savings:
  a padded tap is counted like a real one; XLA's ``cost_analysis`` of a dense conv counts
  only the taps inside the input, so it reads lower on small padded inputs).
* The factorized CP cost depends on the order of the 1-D convs: each is charged at the size
  of its input after the earlier modes' strides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hocp_jax.checks import are_positive_ints, check_int, check_positive_int
from hocp_jax.padding import PaddingLike, as_tuple, output_size, resolve_padding


def check_geometry(in_channels, out_channels, kernel_size, rank=None, ranks=None) -> tuple[int, ...]:
    """Validates a conv's channels, ``kernel_size`` (one int >= 1 per mode) and ``rank`` (an int
    >= 1) or ``ranks`` (two); returns ``kernel_size`` as a tuple."""
    check_positive_int(in_channels, "in_channels")
    check_positive_int(out_channels, "out_channels")
    if not are_positive_ints(kernel_size):
        raise ValueError(f"kernel_size={kernel_size!r}: expected a non-empty sequence of ints >= 1, one per mode")
    if rank is not None:
        check_positive_int(rank, "rank")
    if ranks is not None and not (are_positive_ints(ranks) and len(ranks) == 2):
        raise ValueError(f"ranks={ranks!r}: expected (R_in, R_out), ints >= 1")
    return tuple(int(k) for k in kernel_size)


def dense_params(in_channels: int, out_channels: int, kernel_size: Sequence[int], *, bias: bool = False) -> int:
    """``C_in * C_out * prod K`` (+ ``C_out``)."""
    kernel_size = check_geometry(in_channels, out_channels, kernel_size)
    return in_channels * out_channels * int(np.prod(kernel_size)) + (out_channels if bias else 0)


def cp_params(
    in_channels: int, out_channels: int, kernel_size: Sequence[int], rank: int, *, skip: bool = False, bias: bool = False
) -> int:
    """``R (C_in + C_out + sum K + 1)`` (+ ``C_in C_out`` skip factor, + ``C_out`` bias)."""
    kernel_size = check_geometry(in_channels, out_channels, kernel_size, rank)
    n = rank * (in_channels + out_channels + int(sum(kernel_size)) + 1)
    return n + (in_channels * out_channels if skip else 0) + (out_channels if bias else 0)


def tucker_params(in_channels: int, out_channels: int, kernel_size: Sequence[int], ranks: tuple[int, int]) -> int:
    """``C_in R_in + prod K R_in R_out + C_out R_out``."""
    kernel_size = check_geometry(in_channels, out_channels, kernel_size, ranks=ranks)
    r_in, r_out = ranks
    return in_channels * r_in + int(np.prod(kernel_size)) * r_in * r_out + out_channels * r_out


def cp_rank_for_budget(
    in_channels: int, out_channels: int, kernel_size: Sequence[int], budget: int | None = None
) -> int:
    """Largest CP rank whose parameter count is <= ``budget`` (default: the dense conv's count).

    This is the paper's rule "rank so that the number of parameters would be the same as the
    original convolution".
    """
    kernel_size = check_geometry(in_channels, out_channels, kernel_size)
    budget = dense_params(in_channels, out_channels, kernel_size) if budget is None else check_int(budget, "budget", 0)
    rank = budget // (in_channels + out_channels + int(sum(kernel_size)) + 1)
    if rank < 1:
        raise ValueError(f"budget={budget!r}: too small for even a rank-1 CP conv of in_channels={in_channels}, "
                         f"out_channels={out_channels}, kernel_size={tuple(kernel_size)} "
                         f"({in_channels + out_channels + int(sum(kernel_size)) + 1} parameters)")
    return int(rank)


def output_sizes(in_sizes: Sequence[int], kernel_size: Sequence[int], stride=1, padding: PaddingLike = "SAME",
                 dilation=1) -> list[int]:
    """Output spatial sizes of a conv with this geometry (see :mod:`hocp_jax.padding`)."""
    kernel_size = check_geometry(1, 1, kernel_size)
    n = len(kernel_size)
    if not (are_positive_ints(in_sizes) and len(in_sizes) == n):
        raise ValueError(f"in_sizes={in_sizes!r}: expected {n} ints >= 1, one per kernel mode")
    strides = as_tuple(stride, n, "stride")
    dilations = as_tuple(dilation, n, "dilation")
    pads = resolve_padding(padding, in_sizes, kernel_size, strides, dilations)
    outs = [output_size(d, k, s, dl, p) for d, k, s, dl, p in zip(in_sizes, kernel_size, strides, dilations, pads)]
    return outs


def dense_flops(
    in_sizes: Sequence[int],
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    *,
    stride=1,
    padding: PaddingLike = "SAME",
    dilation=1,
) -> int:
    """FLOPs of one dense conv on one example of spatial size ``in_sizes``."""
    kernel_size = check_geometry(in_channels, out_channels, kernel_size)
    outs = output_sizes(in_sizes, kernel_size, stride, padding, dilation)
    return 2 * int(np.prod(outs)) * in_channels * out_channels * int(np.prod(kernel_size))


def cp_flops(
    in_sizes: Sequence[int],
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    rank: int,
    *,
    stride=1,
    padding: PaddingLike = "SAME",
    dilation=1,
    order: Sequence[int] | None = None,
    skip: bool = False,
) -> int:
    """FLOPs of the factorized CP conv (1x1 in, one 1-D conv per mode in ``order``, 1x1 out)."""
    kernel_size = check_geometry(in_channels, out_channels, kernel_size, rank)
    outs = output_sizes(in_sizes, kernel_size, stride, padding, dilation)
    order = tuple(range(len(kernel_size))) if order is None else tuple(order)
    if sorted(order) != list(range(len(kernel_size))):
        raise ValueError(f"order={order!r}: expected a permutation of the mode indices {tuple(range(len(kernel_size)))}")
    sizes = list(in_sizes)
    macs = int(np.prod(sizes)) * in_channels * rank
    for i in order:
        sizes[i] = outs[i]
        macs += int(np.prod(sizes)) * rank * kernel_size[i]
    macs += int(np.prod(outs)) * rank * out_channels
    if skip:
        macs += int(np.prod(outs)) * in_channels * out_channels
    return 2 * macs


def tucker_flops(
    in_sizes: Sequence[int],
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    ranks: tuple[int, int],
    *,
    stride=1,
    padding: PaddingLike = "SAME",
    dilation=1,
) -> int:
    """FLOPs of the factorized Tucker conv (1x1 in, dense core conv on the ranks, 1x1 out)."""
    kernel_size = check_geometry(in_channels, out_channels, kernel_size, ranks=ranks)
    outs = output_sizes(in_sizes, kernel_size, stride, padding, dilation)
    r_in, r_out = ranks
    macs = int(np.prod(in_sizes)) * in_channels * r_in
    macs += int(np.prod(outs)) * r_in * r_out * int(np.prod(kernel_size))
    macs += int(np.prod(outs)) * r_out * out_channels
    return 2 * macs


def cp_reconstruct_flops(in_channels: int, out_channels: int, kernel_size: Sequence[int], rank: int) -> int:
    """FLOPs to build the dense kernel from CP factors (paid once per call, not per example)."""
    kernel_size = check_geometry(in_channels, out_channels, kernel_size, rank)
    return 2 * rank * in_channels * out_channels * int(np.prod(kernel_size))


# ----------------------------------------------------------------------------- cost model

BYTES_TO_FLOPS = 24.0
"""FLOP-equivalents of one byte moved by a memory-bound op (elementwise/depthwise/1x1 I/O).

Calibrated on the 2-core AMD EPYC of benchmarks/RESULTS.md: the fused depthwise 1-D convs of
the (64,128)@9x42x42 Jester layer take as long as a dense conv doing ~24x their bytes in FLOPs.
"""

CONV_FULL_SPEED_CHANNELS = 32
"""A dense conv with fewer than this many input or output channels runs proportionally below
peak on CPU when its input gradient is computed (measured: the (3, 64) Jester conv reaches
~1/10 of the FLOP rate of the (64, 128) one), so its FLOPs are scaled by
``CONV_FULL_SPEED_CHANNELS / min(C_in, C_out)``. Without the input gradient (a network's first
layer) the same conv's fwd+bwd takes ~1/7 of the time (issue 13), so no scaling then."""


STRIDED_CONV_SLOWDOWN = 1.5
"""A strided dense conv whose input gradient is computed runs at about 1/1.5 of the FLOP rate of
an unstrided one under XLA on CPU (fwd+bwd, ResNet-18 shapes of ``python -m benchmarks.experiments
resnet2d_step_layers`` and ``python -m benchmarks.bench``: 1.05-2.1x, median about 1.45), so
reconstructed-path FLOPs are scaled by this factor then."""


CONV_3D_SLOWDOWN = 3.0
"""A dense conv over 3 or more modes runs at about 1/3 of the FLOP rate of a 2-D one under
XLA on CPU (benchmarks/RESULTS.md, fwd+bwd: ~39 GFLOP/s for the 2-D (64,64)@56x56 conv,
7-23 GFLOP/s for the 3-D ResNet and Jester layers), so reconstructed-path FLOPs are scaled by
this factor when ``len(kernel_size) >= 3``."""


CONV_3D_STARVED_SLOWDOWN = 2.0
"""A dense conv over 3 or more modes with fewer than :data:`CONV_FULL_SPEED_CHANNELS` input or
output channels runs at about half the FLOP rate of :data:`CONV_3D_SLOWDOWN` under XLA on CPU
even without its input gradient (a video network's first layer), so reconstructed-path FLOPs are
scaled by this factor too then. Measured on the two such convs of the library's models, fwd+bwd
without input gradient: the Jester net's (3->64) 3x3x3 conv, factorized / reconstructed 0.30-0.33
in the runs of record of stops 44 and 48 where the model without this factor read 0.61, and the
HO-CP ResNet-18's 3-D stem (3->64, 3x7x7, stride (1, 2, 2), rank 116) 0.66-0.80 at five clip
sizes (``python -m benchmarks.experiments stem_3d``, stop 48) where it read 1.83 and picked the
slower, reconstructed path (0.93 with the factor). Since stop 50 the CPU backend runs such convs
as a patches matrix product (:func:`hocp_jax.conv_plans.patches_conv`), which this factor does not
apply to (``cp_path_costs(patches=True)``): the stem's reconstructed path then took 0.49-0.69x the
factorized path's time at the five clip sizes (``stem_3d``, stop 50; model without the factor:
0.55), the Jester conv's 1.41x (``python -m benchmarks.bench``, stop 50's first run; model: 1.63)."""


CHUNKED_BYTES_SCALE = 0.5
"""Scale on the factorized path's bytes when an unstrided 2-D conv's batch runs in chunks of
samples (``cp_path_costs(chunk=...)``, :func:`hocp_jax.conv_plans.batch_chunk_default`): a chunk's
intermediates stay in cache, so they cost less per byte than whole-batch ones streamed through
memory. Calibrated on the chunked ResNet-18 conv shapes of ``python -m benchmarks.experiments
resnet2d_scales`` (stop 29, ``experiments_resnet2d_scales_chunks.json``) and checked with ``python
-m benchmarks.experiments chunk_picks``, which times every ResNet-18 2-D conv shape (batch 2-64,
112-224 pixel images) whose pick the scale changes (benchmarks/EXPERIMENTS.md, stop 30). The ratios
alone fit best at 0.35, which picked the factorized path of two shapes measured 1.03x and 1.10x
slower than the reconstructed one; at 0.5 the three changed picks measured faster. Strided convs
gained less from the chunks and are not scaled (scaled, their factorized path was picked on two
shapes where it measured 1.2x slower); nor are 3-D convs, on whose per-sample runs
:data:`BYTES_TO_FLOPS` was calibrated. Re-checked in stop 39 with ``python -m benchmarks.experiments
chunk_scale`` (on the AVX2 host) after the reconstructed 2-D path got its per-tap kernel gradient: on the 30
unstrided shapes of that grid whose pick any scale from 0.5 to 0.05 changes, 0.5 picks the faster
path on 25 (worst 1.07x), 0.35 and 0.25 on 27 (worst 1.07x), 0.05 on 5 (worst 1.54x)."""


def cp_path_costs(
    batch: int,
    in_sizes: Sequence[int],
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    rank: int,
    *,
    stride=1,
    padding: PaddingLike = "SAME",
    dilation=1,
    order: Sequence[int] | None = None,
    input_grad: bool = True,
    chunk: int | None = None,
    patches: bool = False,
) -> dict[str, dict[str, float] | float]:
    """Forward cost of the two CP paths for a batch: ``{"factorized": c, "reconstructed": c, "detail": ...}``.

    ``cost = flops_eff + BYTES_TO_FLOPS * bytes`` (float32 bytes of every activation read and
    written by each op; weights ignored except the reconstructed kernel).

    * factorized: ``batch * cp_flops``; bytes: 1x1 in (x read, h written), each 1-D conv, 1x1
      out. A 1-D conv with K taps counts ``(n_in + (1 + 3K) n_out) * 2 / 11`` elements per rank
      (sizes after the earlier modes' strides): the input once, and per output element its write
      and, in the backward pass, K tap slices of the input and K reads of the cotangent with K
      products for the factor gradient; the ``2 / 11`` keeps a 3-tap stride-1 conv at its
      input plus output, on which :data:`BYTES_TO_FLOPS` is calibrated. So a strided conv moves
      fewer bytes than its input and output suggest.
    * reconstructed: ``batch * dense_flops`` scaled for channel-starved convs (see
      :data:`CONV_FULL_SPEED_CHANNELS`, only if ``input_grad``: it is the input gradient of a
      channel-starved conv that is slow), strided convs (:data:`STRIDED_CONV_SLOWDOWN`, only if
      ``input_grad``) and 3-D+ convs (:data:`CONV_3D_SLOWDOWN`; channel-starved ones without
      input gradient :data:`CONV_3D_STARVED_SLOWDOWN` on top, unless ``patches``) plus
      :func:`cp_reconstruct_flops` once; bytes: x, y, kernel.

    ``chunk``: samples per step of the loop over the batch in which the factorized path runs
    (:func:`hocp_jax.conv_plans.batch_plan`; ``None``: the whole batch at once); for an unstrided
    2-D conv its bytes then count at :data:`CHUNKED_BYTES_SCALE`.

    ``patches``: the reconstructed conv runs as a patches matrix product
    (:func:`hocp_jax.conv_plans.patches_fit`; the CPU backend, :func:`hocp_jax.conv_plans.patches_conv`).

    ``detail`` holds the raw ``flops``/``bytes`` of each path. The backward pass costs about
    twice the forward for both paths, so the forward comparison decides.
    """
    check_positive_int(batch, "batch")
    kernel_size = check_geometry(in_channels, out_channels, kernel_size, rank)
    n = len(kernel_size)
    outs = output_sizes(in_sizes, kernel_size, stride, padding, dilation)
    order = tuple(range(n)) if order is None else tuple(order)
    p_in, p_out = int(np.prod(in_sizes)), int(np.prod(outs))
    f_flops = batch * cp_flops(in_sizes, in_channels, out_channels, kernel_size, rank, stride=stride, padding=padding,
                               dilation=dilation, order=order)
    sizes = list(in_sizes)
    elems = p_in * (in_channels + rank)
    for i in order:
        before = int(np.prod(sizes))
        sizes[i] = outs[i]
        elems += (before + (1 + 3 * kernel_size[i]) * int(np.prod(sizes))) * rank * 2 / 11
    elems += p_out * (rank + out_channels)
    f_bytes = 4.0 * batch * elems
    unstrided = max(as_tuple(stride, n, "stride")) == 1
    f_scale = CHUNKED_BYTES_SCALE if chunk is not None and n == 2 and unstrided else 1.0
    r_flops = batch * dense_flops(in_sizes, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                  dilation=dilation)
    starved = max(1.0, CONV_FULL_SPEED_CHANNELS / min(in_channels, out_channels)) if input_grad else 1.0
    r_flops_eff = r_flops * starved
    r_flops_eff *= CONV_3D_SLOWDOWN if n >= 3 else 1.0
    starved_3d = (n >= 3 and not input_grad and not patches
                  and min(in_channels, out_channels) < CONV_FULL_SPEED_CHANNELS)
    r_flops_eff *= CONV_3D_STARVED_SLOWDOWN if starved_3d else 1.0
    r_flops_eff *= STRIDED_CONV_SLOWDOWN if input_grad and max(as_tuple(stride, n, "stride")) > 1 else 1.0
    r_flops_eff += cp_reconstruct_flops(in_channels, out_channels, kernel_size, rank)
    r_bytes = 4.0 * (batch * (p_in * in_channels + p_out * out_channels) + int(np.prod(kernel_size)) * in_channels * out_channels)
    return {
        "factorized": f_flops + BYTES_TO_FLOPS * f_scale * f_bytes,
        "reconstructed": r_flops_eff + BYTES_TO_FLOPS * r_bytes,
        "detail": {
            "factorized": {"flops": float(f_flops), "bytes": f_bytes},
            "reconstructed": {"flops": float(r_flops), "bytes": r_bytes},
        },
    }
