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

The pieces these convs are built from (the 1x1 contraction, the depthwise shift kernel, the
conv of a rebuilt kernel, the loops over chunks of samples and tiles of rows) are in
:mod:`hocp_jax.conv_ops`; the rules that choose how each runs, in :mod:`hocp_jax.conv_plans`.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import string
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hocp_jax import autotune, conv_ops, conv_plans, counting, explicit_sharding
from hocp_jax.checks import check_flags
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
    """``modes`` as a tuple of distinct mode names, none of :data:`RESERVED`, else a ValueError (a
    string such as ``"hw"`` too: it would read as one mode per character)."""
    if isinstance(modes, str) or not isinstance(modes, Iterable):
        raise ValueError(f"modes={modes!r}: expected a sequence of mode names, e.g. ('h', 'w')")
    modes = tuple(modes)
    if not modes or len(set(modes)) != len(modes) or any(not isinstance(m, str) or not m or m in RESERVED for m in modes):
        raise ValueError(f"modes={modes!r}: expected a non-empty sequence of distinct non-empty names, none of {RESERVED}")
    return modes


def check_known_leaves(params: Params, kind: str, expected: Sequence[str], optional: Sequence[str] = ("bias",)) -> None:
    """ValueError naming the leaves of ``params`` that are neither ``expected`` nor ``optional``, e.g.
    a misspelt ``'bais'``, which the layer would silently leave out ("did you mean 'bias'?"), or
    that are not arrays (a nested list has no shape). Sub-dicts (a CP layer's Psi modules) are
    passed over; missing leaves are the caller's check."""
    for k, v in params.items():
        if not isinstance(v, Mapping) and not (hasattr(v, "shape") and hasattr(v, "dtype")):
            raise ValueError(f"params['{k}']: got a {type(v).__name__}; expected an array (e.g. jnp.asarray of it)")
    known = sorted({*expected, *optional})
    unknown = sorted(k for k, v in params.items() if k not in known and not isinstance(v, Mapping))
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hints = "".join(f"; did you mean {c[0]!r} for {k!r}?" for k, c in close.items() if c)
        raise ValueError(f"params: unknown {kind} leaves {unknown}; expected {list(expected)} "
                         f"(+ optional {', '.join(optional)}){hints}")


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
    check_known_leaves(params, "CP", required, ("factor_skip", "bias"))
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


def _promoted(x: jax.Array, params: Params, keys: Sequence[str]) -> dict:
    """``params`` with the leaves ``keys`` in their common dtype with ``x``, so that a kernel is
    rebuilt in the dtype the conv computes in (bfloat16 factors with a float32 ``x``: float32)."""
    dtype = jnp.result_type(x, *(params[k] for k in keys))
    return {**params, **{k: params[k].astype(dtype) for k in keys}}


def best_mode_order(
    in_sizes: Sequence[int], kernel_sizes: Sequence[int], strides, pads, dilations
) -> tuple[int, ...]:
    """Order (indices into the modes) of the 1-D convs that minimises the analytic FLOPs.

    Each 1-D conv costs in proportion to its input size, so the most size-reducing modes
    (largest stride) go first; ties keep the given order. Uses :func:`counting.cp_flops`; where a
    size is symbolic (``jax.export``), which the counts cannot compare, the modes by stride,
    largest first (ties in the given order).
    """
    n = len(in_sizes)
    if not conv_plans.is_static(in_sizes):
        return tuple(sorted(range(n), key=lambda i: -strides[i]))
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
    strides, dilations = as_tuple(stride, len(ks), "stride"), as_tuple(dilation, len(ks), "dilation")
    pads = resolve_padding(padding, in_sizes, ks, strides, dilations)
    costs = counting.cp_path_costs(  # the factorized path in the order cp_conv runs it by default
        x_shape[0], in_sizes, c_in, c_out, ks, rank, stride=stride, padding=padding, dilation=dilation,
        order=best_mode_order(in_sizes, ks, strides, pads, dilations),
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


def _add_skip(y: jax.Array, x: jax.Array, params: Params, strides) -> jax.Array:
    """``y`` plus, if the dict has ``factor_skip (C_in, C_out)``, the skip branch ``x x_C U^(S)``
    as a strided 1x1 conv, which must have ``y``'s shape ``(B, *S_out, C_out)``."""
    if "factor_skip" not in params:
        return y
    u = params["factor_skip"]
    if conv_plans.is_static(x.shape[1:-1]):
        xs = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
    else:  # x[:, ::s], cut to ceil(n / s) positions in the form of lax's 'SAME' output size, whose
        # equality with x[:, ::s]'s form JAX cannot prove on a symbolic size (jax.export)
        limits = [s * (-(-n // s) - 1) + 1 for n, s in zip(x.shape[1:-1], strides)]
        xs = lax.slice(x, (0,) * x.ndim, (x.shape[0], *limits, x.shape[-1]), (1, *strides, 1))
    skip_shape = (*xs.shape[:-1], u.shape[-1])
    if u.ndim != 2 or u.shape[0] != x.shape[-1] or skip_shape != y.shape:
        raise ValueError(
            f"params['factor_skip']: shape {tuple(u.shape)} on x {tuple(x.shape)} gives a skip branch of shape "
            f"{skip_shape} but the conv output is {tuple(y.shape)}; expected ({x.shape[-1]}, {y.shape[-1]}) "
            "and a size-preserving padding ('SAME'/'SYMMETRIC')"
        )
    return y + conv_ops.channel_matmul(xs, u)


def _folded_contraction(x: jax.Array, factors: Params, modes: Sequence[str], folded: Sequence[int], ksizes, pads,
                        dilations) -> jax.Array:
    """The input contraction of ``x (B, *S, C_in)`` with the depthwise passes of the stride-1 modes
    ``folded`` (sorted indices) folded in: ``(B, *S', R)``, ``S'`` the folded modes' output sizes
    and the others' input sizes. One product of the ``prod K`` shifted copies of ``x`` side by side
    (:func:`hocp_jax.conv_ops.tap_inputs`, channels minor) with ``U^(C)`` times those modes' factors,
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
    copies = jnp.concatenate(list(conv_ops.tap_inputs(x, ks, (1,) * n, ps, ds, outs)), axis=-1)
    return conv_ops.channel_matmul(copies, w)


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
        :func:`hocp_jax.conv_ops.depthwise_conv_1d`; on CPU it computes bfloat16/float16 in float32,
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
    defaulted = modes is None
    modes = check_modes(default_modes(x.ndim - 2) if defaulted else modes)
    _check_x(x, len(modes), modes)
    try:
        cp_rank(params, modes)
    except ValueError as e:
        if not defaulted:
            raise
        raise ValueError(f"{e} [modes not given: x of shape {tuple(x.shape)} has {len(modes)} spatial modes, so "
                         f"modes={modes!r}; pass the modes of the params' factors]") from None
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
    x_in = x  # what the skip factor reads
    if psi is None:  # (Psi would see pads put here: its passes pad their inputs, symbolic_same below)
        x, padding = conv_ops.same_on_symbolic(x, padding, ksizes, strides, dilations)
    pads = resolve_padding(padding, x.shape[1:-1], ksizes, strides, dilations, symbolic_same=psi is not None)

    per_sample = conv_plans.automatic_flag(per_sample, "per_sample")  # (a NumPy bool as a Python one)
    check_flags(psi_pointwise=psi_pointwise, input_grad=input_grad)
    if psi is not None and not callable(psi):
        raise ValueError(f"psi={psi!r}: expected None or a function psi(h, stage) (the layers take names: "
                         "hocp_jax.layers.CPConv(psi='relu'))")
    if implementation == "reconstructed" and psi is not None:
        raise ValueError("psi: a non-linearity between factors needs implementation='factorized'")
    local = psi is None or psi_pointwise  # else psi may couple samples (BatchNorm) or map 0 to non-0
    run = functools.partial(_cp_conv, modes=modes, strides=strides, pads=pads, dilations=dilations, ksizes=ksizes,
                            implementation=implementation, psi=psi, mode_order=mode_order, input_grad=input_grad,
                            per_sample=per_sample, local=local)
    split = conv_plans.batch_split(x, params) if local else None
    if split is not None:  # a CPU device's share per program, with the loops below: see batch_split
        y = _on_each_device(run, x, params, *split)
    else:
        y = run(x, params)
    return add_bias(_add_skip(y, x_in, params, strides), params)


def _cp_conv(x: jax.Array, params: Params, *, modes, strides, pads, dilations, ksizes, implementation: str, psi,
             mode_order, input_grad: bool, per_sample: bool | None, local: bool) -> jax.Array:
    """:func:`cp_conv` on checked arguments, with the padding resolved per mode, without the skip
    factor and the bias."""
    if implementation == "auto":
        implementation = "factorized" if psi is not None else autotune.choose_cp(
            x.shape, x.dtype, params, modes, strides, pads, dilations, input_grad, per_sample=per_sample,
            batch_shards=explicit_sharding.shards(x, 0))
    if implementation == "reconstructed":
        keys = ("lambda", "factor_in", "factor_out", *map(mode_key, modes))
        kernel = cp_to_kernel(_promoted(x, params, keys), modes)
        y = conv_ops.weight_conv(x, kernel, strides, pads, dilations, input_grad)
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
        x, out_factor, *cast = conv_ops.vary_alike(x, out_factor, *factors.values())
        factors = dict(zip(keys, cast))

        def factorized(x, pads=pads, order=order, folded=()):
            if folded:  # no psi: the folded modes' passes are part of the input contraction
                h = _folded_contraction(x.astype(cdt), factors, modes, folded, ksizes, pads, dilations)
            else:
                h = conv_ops.channel_matmul(x.astype(cdt), factors["factor_in"])
            if psi is not None:
                h = psi(h, "in")
            for m in order:
                i = modes.index(m)
                if i in folded:
                    continue
                h = conv_ops.depthwise_conv_1d(h, factors[mode_key(m)], i + 1, stride=strides[i], pad=pads[i],
                                               dilation=dilations[i])
                if psi is not None:
                    h = psi(h, m)
            return conv_ops.channel_matmul(h, out_factor if out_before else out_factor.T).astype(dtype)

        plan = tiles_ok and conv_plans.tile_plan(x.shape, rank, x.dtype, out_sizes, halos, strides, pads)
        if plan:
            i, rows = plan
            folded = () if psi is not None else conv_plans.tile_fold_modes(x.shape[-1], ksizes, strides, out_sizes, i, rank)
            if mode_order is None and psi is None:  # the tiled mode first of the stride-1 ones: fewer passes
                # see the halo rows (with psi between the passes, their order is part of the function)
                strided = tuple(m for m in order if strides[modes.index(m)] > 1)
                order = strided + (modes[i],) + tuple(m for m in order if m not in strided and m != modes[i])
            tile_pads = pads[:i] + ((0, 0),) + pads[i + 1:]
            y = conv_ops.map_tiles(functools.partial(factorized, pads=tile_pads, order=order, folded=folded), x, i + 1,
                                   rows, halos[i], pads[i])
        elif chunk:
            y = conv_ops.map_chunks(factorized, x, chunk)
        else:
            y = factorized(x)
    return y


# ----------------------------------------------------------------------------- Tucker conv


def check_tucker(params: Params) -> tuple[int, int]:
    """Validates Tucker params ``factor_in (C_in, R_in)``, ``core (*K, R_in, R_out)`` (K >= 1 per
    mode, at least one mode), ``factor_out (C_out, R_out)``, optional ``bias``; returns ``(R_in, R_out)``."""
    for k in ("factor_in", "core", "factor_out"):
        if k not in params:
            raise ValueError(f"params: missing Tucker leaf {k!r}; expected factor_in, core, factor_out")
    check_known_leaves(params, "Tucker", ("factor_in", "core", "factor_out"))
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


def check_tucker_implementation(implementation) -> None:
    """A ValueError unless ``implementation`` is one of :data:`TUCKER_IMPLEMENTATIONS` (the Tucker
    and TT convs' paths)."""
    if implementation not in TUCKER_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: expected one of {TUCKER_IMPLEMENTATIONS}")


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
    check_tucker_implementation(implementation)
    core, u_in, u_out = params["core"], params["factor_in"], params["factor_out"]
    if core.ndim != x.ndim:
        raise ValueError(f"params['core']: shape {tuple(core.shape)} has {core.ndim - 2} kernel modes but x "
                         f"{tuple(x.shape)} has {x.ndim - 2} spatial modes; expected (*K, R_in, R_out), one K per mode")
    if u_in.shape[0] != x.shape[-1]:
        raise ValueError(f"params['factor_in']: shape {tuple(u_in.shape)} but x has {x.shape[-1]} channels")
    n = x.ndim - 2
    strides, dilations = as_tuple(stride, n, "stride"), as_tuple(dilation, n, "dilation")
    x, padding = conv_ops.same_on_symbolic(x, padding, core.shape[:n], strides, dilations)
    pads = resolve_padding(padding, x.shape[1:-1], core.shape[:n], strides, dilations)
    if implementation == "reconstructed":
        y = conv_ops.weight_conv(x, tucker_to_kernel(_promoted(x, params, ("core", "factor_in", "factor_out"))), strides,
                         pads, dilations)
    else:
        h = conv_ops.channel_matmul(x, u_in)
        h = conv_ops.weight_conv(h, core, strides, pads, dilations)
        y = conv_ops.channel_matmul(h, u_out.T)
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
    check_known_leaves(params, "separable", ("depthwise", "factor_out"), ("factor_in", "factor_skip", "bias"))
    dw = params["depthwise"]
    n = dw.ndim - 1
    if x.ndim != n + 2:
        raise ValueError(f"x: got shape {tuple(x.shape)}, expected {n + 2}-D input for a depthwise kernel {tuple(dw.shape)}")
    if "factor_in" in params and np.ndim(params["factor_in"]) != 2:
        raise ValueError(f"params['factor_in']: got shape {tuple(np.shape(params['factor_in']))}, expected a 2-D "
                         f"(C_in={x.shape[-1]}, R={dw.shape[-1]}) matrix (R: depthwise's last axis)")
    if "factor_in" in params and params["factor_in"].shape[0] != x.shape[-1]:
        raise ValueError(f"params['factor_in']: shape {tuple(params['factor_in'].shape)} expects "
                         f"{params['factor_in'].shape[0]} input channels but x has {x.shape[-1]}")
    h = conv_ops.channel_matmul(x, params["factor_in"]) if "factor_in" in params else x
    if h.shape[-1] != dw.shape[-1]:
        raise ValueError(f"params['depthwise']: shape {tuple(dw.shape)} expects {dw.shape[-1]} channels, got {h.shape[-1]}")
    if params["factor_out"].ndim != 2 or params["factor_out"].shape[1] != dw.shape[-1]:
        raise ValueError(f"params['factor_out']: got shape {tuple(params['factor_out'].shape)}, expected (C_out, {dw.shape[-1]})")
    h = conv_ops.depthwise_conv(h, dw, stride=stride, padding=padding, dilation=dilation)
    y = conv_ops.channel_matmul(h, params["factor_out"].T)
    return add_bias(_add_skip(y, x, params, as_tuple(stride, n, "stride")), params)


# ----------------------------------------------------------------------------- TT conv


def _tt_cores(params: Params, n_modes: int | None = None) -> list[jax.Array]:
    """Validated TT conv cores ``core_0 .. core_{N+1}`` (see :func:`tt_conv`), numbered without gaps."""
    cores = []
    while f"core_{len(cores)}" in params:
        cores.append(params[f"core_{len(cores)}"])
    if len(cores) < 3 or (n_modes is not None and len(cores) != n_modes + 2):
        want = "N + 2 >= 3" if n_modes is None else f"{n_modes + 2} (x has {n_modes} spatial modes)"
        raise ValueError(f"params: found {len(cores)} TT cores core_0, core_1, ...; expected {want}")
    check_known_leaves(params, "TT", [f"core_{n}" for n in range(len(cores))])
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
    if n < 1:
        raise ValueError(f"x: got shape {tuple(x.shape)}, expected (B, *S, C_in) with at least one spatial mode")
    cores = _tt_cores(params, n)
    check_tucker_implementation(implementation)
    if cores[0].shape[1] != x.shape[-1]:
        raise ValueError(f"params['core_0']: shape {tuple(cores[0].shape)} expects {cores[0].shape[1]} channels, x has {x.shape[-1]}")
    strides, dilations = as_tuple(stride, n, "stride"), as_tuple(dilation, n, "dilation")
    x, padding = conv_ops.same_on_symbolic(x, padding, [c.shape[1] for c in cores[1:-1]], strides, dilations)
    pads = resolve_padding(padding, x.shape[1:-1], [c.shape[1] for c in cores[1:-1]], strides, dilations)
    if implementation == "reconstructed":
        y = conv_ops.weight_conv(x, tt_to_kernel(_promoted(x, params, [f"core_{i}" for i in range(len(cores))])), strides,
                         pads, dilations)
    else:
        def only(i, value, rest):  # ``value`` on mode i, ``rest`` on the other modes
            return tuple(value if j == i else rest for j in range(n))

        h = conv_ops.channel_matmul(x, cores[0][0])
        for i, c in enumerate(cores[1:-1]):  # (R_i, K_i, R_{i+1}) -> kernel (1.., K_i, ..1, R_i, R_{i+1})
            kernel = jnp.moveaxis(c, 1, 0).reshape(only(i, c.shape[1], 1) + (c.shape[0], c.shape[2]))
            h = conv_ops.weight_conv(h, kernel, only(i, strides[i], 1), only(i, pads[i], (0, 0)),
                                     only(i, dilations[i], 1))
        y = conv_ops.channel_matmul(h, cores[-1][..., 0])
    return add_bias(y, params)
