"""What each factorized layer's parameters are, shared by the Flax Linen wrappers
(:mod:`hocp_jax.layers`) and the Flax NNX ones (:mod:`hocp_jax.nnx_layers`).

Every ``*_specs`` function returns ``{leaf name: (shape, initializer)}`` with
``initializer(key, shape, dtype)`` (a ``jax.nn.initializers`` function), so both APIs create
the same leaves, with the same names, shapes and initial distributions; the arithmetic lives
in the pure core (:mod:`hocp_jax.conv`, :mod:`hocp_jax.regression`,
:mod:`hocp_jax.tensorized`). Factor stds follow :mod:`hocp_jax.init`: the entries of a
product of ``n`` i.i.d. ``N(0, s^2)`` terms summed over ``m`` index combinations have variance
``m s^(2n)``, so ``s = (variance / m) ** (1 / (2 n))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from hocp_jax import conv, counting
from hocp_jax.checks import are_positive_ints, check_positive_int, check_real, is_int, is_positive_int
from hocp_jax.init import cp_factor_std, target_variance
from hocp_jax.padding import check_mode_padding

Initializer = Callable[..., jax.Array]
Specs = dict[str, tuple[tuple[int, ...], Initializer]]
initializers = jax.nn.initializers

PSI_CHOICES = (None, "relu", "prelu", "bn_relu", "bn_prelu")
PSI_STAGES = ("in", "all")
FACTORIZATIONS = ("cp", "tucker", "tt")


def as_ints(v, n: int, name: str, positive: bool = False) -> tuple[int, ...]:
    """``v`` (an int or ``n`` ints, each >= 1 if ``positive``: ranks) as a tuple of ``n`` ints, else
    a ValueError naming ``name``."""
    ok, kind = (is_positive_int, "positive int") if positive else (is_int, "int")
    vs = (v,) * n if is_int(v) else v
    if not isinstance(vs, Sequence) or len(vs) != n or not all(map(ok, vs)):
        raise ValueError(f"{name}={v!r}: expected {'a' if positive else 'an'} {kind} or {n} {kind}s")
    return tuple(int(e) for e in vs)


def check_sizes(**sizes) -> None:
    """A ValueError naming the first of a layer's size arguments (``features=0``,
    ``temporal_kernel_size=True``, ...) that is not an int >= 1."""
    for name, v in sizes.items():
        check_positive_int(v, name)


def check_temporal_modes(temporal_modes, spatial: Sequence[str]) -> tuple[str, ...]:
    """A layer's ``temporal_modes`` as a tuple of names (empty allowed) none of which is one of its
    ``spatial`` modes, else a ValueError (a string such as ``"t"`` is refused: it would read as
    one mode per character)."""
    if isinstance(temporal_modes, str) or not isinstance(temporal_modes, Sequence):
        raise ValueError(f"temporal_modes={temporal_modes!r}: expected a sequence of mode names, e.g. ('t',)")
    temporal = conv.check_modes(temporal_modes) if temporal_modes else ()
    if set(temporal) & set(spatial):
        raise ValueError(f"spatial_modes={tuple(spatial)!r}, temporal_modes={temporal!r}: expected distinct mode "
                         f"names, {sorted(set(temporal) & set(spatial))} in both")
    return temporal


def product_std(variance: float, n_terms: int, n_sums: int) -> float:
    """Std of i.i.d. entries whose ``n_terms``-fold products summed ``n_sums`` times have ``variance``."""
    check_real(variance, "variance", lambda v: 0 < v < float("inf"), "a real number > 0")
    check_sizes(n_terms=n_terms, n_sums=n_sums)
    return float((variance / n_sums) ** (1.0 / (2 * n_terms)))


# ----------------------------------------------------------------------------- CP conv


def spatial_layout(kernel_size, spatial_modes) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Spatial mode names (default :func:`hocp_jax.conv.default_modes`) and one kernel size per mode."""
    if not is_int(kernel_size) and (isinstance(kernel_size, str) or not isinstance(kernel_size, Sequence)):
        raise ValueError(f"kernel_size={kernel_size!r}: expected an int or one int >= 1 per spatial mode")
    if spatial_modes is not None:
        if isinstance(spatial_modes, str) or not isinstance(spatial_modes, Sequence):  # a string: one mode per character
            raise ValueError(f"spatial_modes={spatial_modes!r}: expected a sequence of mode names, e.g. ('h', 'w')")
        try:
            modes = conv.check_modes(spatial_modes)
        except ValueError as e:
            raise ValueError(f"spatial_modes: {e}") from None
    else:
        modes = conv.default_modes(2 if is_int(kernel_size) else len(kernel_size))
    ks = as_ints(kernel_size, len(modes), "kernel_size")
    if not ks or min(ks) < 1:
        raise ValueError(f"kernel_size={kernel_size!r}: expected an int or one int >= 1 per spatial mode")
    return modes, ks


def cp_layer_rank(in_channels: int, out_channels: int, kernel_size: Sequence[int], rank=None, rank_multiple=None) -> int:
    """``rank`` if given, else ``round(rank_multiple * in_channels)``, else the largest rank whose
    parameter count does not exceed the dense conv's (the paper's rule)."""
    if rank is not None:
        r = rank
    elif rank_multiple is not None:
        check_real(rank_multiple, "rank_multiple", lambda v: 0 < v < float("inf"), "a real number > 0")
        r = int(round(rank_multiple * in_channels))
    else:
        r = counting.cp_rank_for_budget(in_channels, out_channels, kernel_size)
    if not is_positive_int(r):
        raise ValueError(f"rank={r!r}: expected an int >= 1 (rank={rank}, rank_multiple={rank_multiple})")
    return int(r)


def cp_specs(
    in_channels: int, out_channels: int, mode_sizes: Sequence[tuple[str, int]], rank: int, *,
    gain: float = 2.0, skip: bool = False, use_bias: bool = False,
) -> Specs:
    """CP conv leaves: ``lambda (R,)`` ones, ``factor_in (C_in, R)``, ``factor_out (C_out, R)``,
    ``factor_<m> (K_m, R)`` per ``(m, K_m)`` in ``mode_sizes`` (normal, see
    :func:`hocp_jax.init.cp_factor_std`), optional ``factor_skip (C_in, C_out)`` LeCun and ``bias`` zeros."""
    sizes = tuple(k for _, k in mode_sizes)
    normal = initializers.normal(cp_factor_std(rank, len(sizes), target_variance(in_channels, sizes, gain)))
    specs: Specs = {
        "lambda": ((rank,), initializers.ones),
        "factor_in": ((in_channels, rank), normal),
        "factor_out": ((out_channels, rank), normal),
    }
    specs |= {conv.mode_key(m): ((k, rank), normal) for m, k in mode_sizes}
    if skip:
        specs["factor_skip"] = ((in_channels, out_channels), initializers.lecun_normal())
    if use_bias:
        specs["bias"] = ((out_channels,), initializers.zeros)
    return specs


def check_psi(psi, psi_stages) -> None:
    if psi not in PSI_CHOICES:
        raise ValueError(f"psi={psi!r}: expected one of {PSI_CHOICES}")
    if psi_stages not in PSI_STAGES:
        raise ValueError(f"psi_stages={psi_stages!r}: expected one of {PSI_STAGES}")


def psi_at(psi, psi_stages, spatial: Sequence[str]) -> tuple[str, ...]:
    """Stages after which Psi runs: ``in`` (and every spatial mode with ``psi_stages="all"``)."""
    if psi is None:
        return ()
    return ("in",) + (tuple(spatial) if psi_stages == "all" else ())


def psi_pointwise(psi) -> bool:
    """``psi_pointwise`` for :func:`hocp_jax.conv.cp_conv` from a CP layer's ``psi`` name: ReLU and
    PReLU act on each value alone and keep 0 at 0 (so cp_conv may run them one sample at a time
    and in tiles); BatchNorm uses batch statistics and a shift."""
    return psi in ("relu", "prelu")


def temporal_in_use(x_shape, spatial: Sequence[str], temporal_modes: Sequence[str], layer: str) -> tuple[str, ...]:
    """The trailing temporal modes an input of ``x_shape`` carries (0 up to all of ``temporal_modes``)."""
    n_extra = len(x_shape) - 2 - len(spatial)
    if not 0 <= n_extra <= len(temporal_modes):
        raise ValueError(
            f"x: got shape {tuple(x_shape)}; {layer} expects (batch, {', '.join(spatial)}, channels)"
            f" or with up to {len(temporal_modes)} leading temporal modes {tuple(temporal_modes)}"
        )
    return tuple(temporal_modes)[len(temporal_modes) - n_extra:]


def check_conv_args(spatial: Sequence[str] | int, stride, padding, dilation) -> None:
    """A ValueError naming the first of a conv layer's ``stride``, ``padding`` and ``dilation``
    that its ``spatial`` modes (names, or their number) cannot take: each an int or one per
    mode (stride and dilation >= 1), padding one of :mod:`hocp_jax.padding`'s forms."""
    n = spatial if is_int(spatial) else len(spatial)
    as_ints(stride, n, "stride", positive=True)
    as_ints(dilation, n, "dilation", positive=True)
    if not (isinstance(padding, (str, Sequence)) or is_int(padding)):
        raise ValueError(f"padding={padding!r}: expected 'SAME', 'VALID', 'SYMMETRIC', an int, or one int or "
                         "(low, high) pair per spatial mode")
    if isinstance(padding, str) or is_int(padding):
        check_mode_padding(padding, "padding")
    elif len(padding) != n:
        raise ValueError(f"padding={padding!r}: expected one entry per spatial mode, "
                         + (f"{n} for {tuple(spatial)}" if not is_int(spatial) else f"{n}"))
    else:
        for i, p in enumerate(padding):
            check_mode_padding(p, f"padding[{i}]")


def cp_conv_kwargs(
    spatial, temporal, *, stride, padding, dilation, temporal_stride, temporal_padding, implementation, psi
) -> dict[str, Any]:
    """Keyword arguments of :func:`hocp_jax.conv.cp_conv` for a layer over ``temporal + spatial``
    modes (temporal modes: ``temporal_stride``/``temporal_padding``, dilation 1; with Psi, the
    spatial 1-D convs run first so that no Psi follows a temporal conv). A ValueError names the
    first argument a conv of these modes cannot take."""
    check_conv_args(tuple(spatial), stride, padding, dilation)
    check_mode_padding(temporal_padding, "temporal_padding")
    check_positive_int(temporal_stride, "temporal_stride")
    if implementation not in conv.IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: expected one of {conv.IMPLEMENTATIONS}")
    sp_pad = padding if isinstance(padding, str) else int(padding) if is_int(padding) else tuple(padding)
    return dict(
        modes=tuple(temporal) + tuple(spatial),
        stride=(temporal_stride,) * len(temporal) + as_ints(stride, len(spatial), "stride", positive=True),
        padding=(temporal_padding,) * len(temporal) + ((sp_pad,) * len(spatial) if isinstance(sp_pad, (str, int)) else sp_pad),
        dilation=(1,) * len(temporal) + as_ints(dilation, len(spatial), "dilation", positive=True),
        implementation=implementation,
        mode_order=(tuple(spatial) + tuple(temporal)) if psi else None,
    )


# ----------------------------------------------------------------------------- Tucker / separable / TT conv


def kernel_dims(kernel_size) -> tuple[int, ...]:
    """A Tucker, separable or TT conv's ``kernel_size``: one int per spatial mode, or one int
    for both modes of a 2-D conv (as :class:`hocp_jax.layers.CPConv` reads it)."""
    return shape_arg((kernel_size, kernel_size) if is_int(kernel_size) else kernel_size, "kernel_size")


def tucker_layer_ranks(in_channels: int, out_channels: int, ranks=None, rank_ratio: float = 0.5) -> tuple[int, int]:
    """``ranks`` if given (``(R_in, R_out)``, or one int for both), else ``rank_ratio`` (> 0)
    times the input and output channels (at least 1)."""
    if ranks is not None:
        return as_ints(ranks, 2, "ranks", positive=True)
    check_real(rank_ratio, "rank_ratio", lambda v: 0 < v < float("inf"), "a number > 0 (or ranks=(R_in, R_out))")
    return max(1, round(rank_ratio * in_channels)), max(1, round(rank_ratio * out_channels))


def tucker_specs(in_channels: int, out_channels: int, kernel_size: Sequence[int], ranks: tuple[int, int], gain=2.0) -> Specs:
    """Tucker conv leaves ``factor_in (C_in, R_in)``, ``core (*K, R_in, R_out)``, ``factor_out (C_out, R_out)``."""
    ks = kernel_dims(kernel_size)
    r_in, r_out = as_ints(ranks, 2, "ranks", positive=True)
    normal = initializers.normal(product_std(target_variance(in_channels, ks, gain), 3, r_in * r_out))
    return {
        "factor_in": ((in_channels, r_in), normal),
        "core": (ks + (r_in, r_out), normal),
        "factor_out": ((out_channels, r_out), normal),
    }


def separable_specs(in_channels: int, out_channels: int, kernel_size: Sequence[int], rank=None) -> Specs:
    """Separable conv leaves ``depthwise (*K, R)`` (He), ``factor_out (C_out, R)`` (LeCun) and, with
    an expansion ``rank``, ``factor_in (C_in, R)``; without it ``R = C_in``."""
    ks = kernel_dims(kernel_size)
    r = in_channels if rank is None else check_positive_int(rank, "rank")
    specs: Specs = {
        "depthwise": (ks + (r,), initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=tuple(range(len(ks))), out_axis=-1)),
        "factor_out": ((out_channels, r), initializers.lecun_normal(in_axis=1, out_axis=0)),
    }
    if rank is not None:
        specs["factor_in"] = ((in_channels, r), initializers.lecun_normal())
    return specs


# ----------------------------------------------------------------------------- tensor regression


def trl_specs(dims: Sequence[int], features: int, rank, decomposition: str) -> Specs:
    """TRL leaves on input modes ``dims`` (ints >= 1): ``factor_<i> (d_i, R_i)``, ``factor_out (O, R_out)``,
    ``lambda (R,)`` (CP) or ``core (R_1..R_k, R_out)`` (Tucker), ``bias (O,)``; LeCun variance overall."""
    dims = shape_arg(dims, "dims")
    check_sizes(features=features)
    n = len(dims)
    var = 1.0 / int(np.prod(dims))
    if decomposition == "cp":
        r = check_positive_int(rank, "rank")
        normal = initializers.normal(product_std(var, n + 1, r))
        specs: Specs = {f"factor_{i}": ((d, r), normal) for i, d in enumerate(dims)}
        specs |= {"factor_out": ((features, r), normal), "lambda": ((r,), initializers.ones)}
    elif decomposition == "tucker":
        ranks = as_ints(rank, n + 1, "rank", positive=True)
        normal = initializers.normal(product_std(var, n + 2, int(np.prod(ranks))))
        specs = {f"factor_{i}": ((d, r), normal) for i, (d, r) in enumerate(zip(dims, ranks))}
        specs |= {"factor_out": ((features, ranks[-1]), normal), "core": (ranks, normal)}
    else:
        raise ValueError(f"decomposition={decomposition!r}: expected 'cp' or 'tucker'")
    return specs | {"bias": ((features,), initializers.zeros)}


# ----------------------------------------------------------------------------- tensorized layers


def shape_arg(v, name: str) -> tuple[int, ...]:
    """``v`` (ints >= 1, or one int) as a non-empty tuple of ints, else a ValueError naming ``name``."""
    dims = tuple(v) if isinstance(v, Sequence) else (v,)
    if not are_positive_ints(dims):
        raise ValueError(f"{name}={v!r}: expected a non-empty sequence of ints >= 1")
    return tuple(map(int, dims))


def factorized_linear_specs(in_shape, out_shape, factorization: str, rank, use_bias: bool = True) -> Specs:
    """Leaves of a factorized linear layer (:mod:`hocp_jax.tensorized`) whose dense weight has
    LeCun variance ``1 / prod(in_shape)``. ``rank``: CP an int; Tucker an int or one per
    input and output mode; TT an int or the ``len(in_shape) - 1`` inner ranks."""
    ins, outs = shape_arg(in_shape, "in_shape"), shape_arg(out_shape, "out_shape")
    var = 1.0 / int(np.prod(ins))
    if factorization == "cp":
        r = check_positive_int(rank, "rank")
        normal = initializers.normal(product_std(var, len(ins) + len(outs), r))
        specs: Specs = {"lambda": ((r,), initializers.ones)}
        specs |= {f"factor_in_{i}": ((d, r), normal) for i, d in enumerate(ins)}
        specs |= {f"factor_out_{j}": ((d, r), normal) for j, d in enumerate(outs)}
    elif factorization == "tucker":
        ranks = as_ints(rank, len(ins) + len(outs), "rank", positive=True)
        normal = initializers.normal(product_std(var, len(ranks) + 1, int(np.prod(ranks))))
        specs = {"core": (ranks, normal)}
        specs |= {f"factor_in_{i}": ((d, r), normal) for i, (d, r) in enumerate(zip(ins, ranks))}
        specs |= {f"factor_out_{j}": ((d, r), normal) for j, (d, r) in enumerate(zip(outs, ranks[len(ins):]))}
    elif factorization == "tt":
        if len(ins) != len(outs):
            raise ValueError(f"in_shape={ins}, out_shape={outs}: a TT-matrix weight needs as many input as output modes")
        bonds = (1,) + as_ints(rank, len(ins) - 1, "rank", positive=True) + (1,)
        normal = initializers.normal(product_std(var, len(ins), int(np.prod(bonds))))
        specs = {f"core_{n}": ((bonds[n], i, o, bonds[n + 1]), normal) for n, (i, o) in enumerate(zip(ins, outs))}
    else:
        raise ValueError(f"factorization={factorization!r}: expected one of {FACTORIZATIONS}")
    return specs | ({"bias": ((int(np.prod(outs)),), initializers.zeros)} if use_bias else {})


def tcl_specs(in_shape, rank, use_bias: bool = False) -> Specs:
    """TCL leaves ``factor_<i> (d_i, r_i)`` (LeCun: each mode keeps the input variance), optional ``bias (*r)``."""
    ins = shape_arg(in_shape, "in_shape")
    ranks = as_ints(rank, len(ins), "rank", positive=True)
    specs: Specs = {f"factor_{i}": ((d, r), initializers.lecun_normal()) for i, (d, r) in enumerate(zip(ins, ranks))}
    return specs | ({"bias": (ranks, initializers.zeros)} if use_bias else {})


def tt_conv_specs(in_channels: int, out_channels: int, kernel_size: Sequence[int], rank, gain: float = 2.0,
                  use_bias: bool = False) -> Specs:
    """TT conv leaves (:func:`hocp_jax.conv.tt_conv`) ``core_0 (1, C_in, R_1)``, ``core_n (R_n, K_n, R_{n+1})``,
    ``core_{N+1} (R_{N+1}, C_out, 1)``; ``rank`` an int or the ``N + 1`` inner ranks."""
    ks = kernel_dims(kernel_size)
    dims = (check_positive_int(in_channels, "in_features"),) + ks + (check_positive_int(out_channels, "out_features"),)
    bonds = (1,) + as_ints(rank, len(ks) + 1, "rank", positive=True) + (1,)
    normal = initializers.normal(product_std(target_variance(in_channels, ks, gain), len(dims), int(np.prod(bonds))))
    specs: Specs = {f"core_{n}": ((bonds[n], d, bonds[n + 1]), normal) for n, d in enumerate(dims)}
    return specs | ({"bias": ((out_channels,), initializers.zeros)} if use_bias else {})
