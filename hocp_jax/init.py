"""Initialisation of factorized convolutions with a chosen variance of the equivalent kernel.

For a CP kernel ``W = sum_r lambda_r U^(C)_{c r} U^(T)_{t r} prod_m U^(m)_{k_m r}`` with
``lambda = 1`` and every factor entry i.i.d. ``N(0, s^2)``, each kernel entry is a sum of R
independent products of ``N + 2`` independent zero-mean terms, so

    Var(W) = R * s^(2 (N + 2))   =>   s = (Var_target / R) ** (1 / (2 (N + 2))).

``Var_target`` defaults to He (``2 / fan_in``, ``fan_in = C_in * prod K``), the variance a dense
conv followed by ReLU is initialised with; ``gain=1`` gives LeCun. Lambda starts at one and the
factors carry the magnitude (the paper suggests the opposite, absorbing the factors' magnitude
into lambda; a rank component computes the same function with its lambda scaled down and a
factor column scaled up, so the L1 on lambda relies on training not doing that: README,
"Studies", ``rank_selection``). A Tucker kernel ``core x U^(C) x U^(T)`` with i.i.d.
entries has ``Var(W) = R_in R_out s_core^2 s_in^2 s_out^2``; the three stds are taken equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hocp_jax.checks import check_flags, check_float_dtype, check_positive_int, check_real
from hocp_jax.conv import check_modes, default_modes, mode_key
from hocp_jax.counting import check_geometry


def target_variance(in_channels: int, kernel_size: Sequence[int], gain: float = 2.0) -> float:
    """``gain / fan_in`` with ``fan_in = C_in * prod(kernel_size)`` (gain 2 = He, 1 = LeCun)."""
    kernel_size = check_geometry(in_channels, 1, kernel_size)
    check_real(gain, "gain", lambda v: 0 < v < float("inf"), "a real number > 0 (2 = He, 1 = LeCun)")
    return gain / (in_channels * int(np.prod(kernel_size)))


def cp_factor_std(rank: int, n_modes: int, variance: float) -> float:
    """Std of every CP factor entry so the reconstructed kernel has ``variance`` (lambda = 1)."""
    check_positive_int(rank, "rank")
    check_positive_int(n_modes, "n_modes")
    check_real(variance, "variance", lambda v: 0 < v < float("inf"), "a real number > 0")
    return float((variance / rank) ** (1.0 / (2 * (n_modes + 2))))


def init_cp_params(
    key: jax.Array,
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    rank: int,
    *,
    modes: Sequence[str] | None = None,
    gain: float = 2.0,
    skip: bool = False,
    bias: bool = False,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
    """Random CP conv params whose reconstructed kernel has variance ``gain / fan_in``.

    Returns the dict ``lambda (R,)``, ``factor_in (C_in, R)``, ``factor_out (C_out, R)``,
    ``factor_<m> (K_m, R)`` (+ ``factor_skip (C_in, C_out)`` LeCun-normal, ``bias`` zeros).
    """
    check_flags(skip=skip, bias=bias)
    check_float_dtype(dtype)
    kernel_size = check_geometry(in_channels, out_channels, kernel_size, rank)
    modes = check_modes(modes) if modes is not None else default_modes(len(kernel_size))
    if len(modes) != len(kernel_size):
        raise ValueError(f"modes={modes!r}: expected {len(kernel_size)} names, one per kernel_size entry {kernel_size}")
    std = cp_factor_std(rank, len(modes), target_variance(in_channels, kernel_size, gain))
    shapes = {"factor_in": (in_channels, rank), "factor_out": (out_channels, rank)}
    shapes |= {mode_key(m): (k, rank) for m, k in zip(modes, kernel_size)}
    keys = jax.random.split(key, len(shapes) + 1)
    params = {name: std * jax.random.normal(k, shape, dtype) for k, (name, shape) in zip(keys, shapes.items())}
    params["lambda"] = jnp.ones((rank,), dtype)
    if skip:
        params["factor_skip"] = jax.random.normal(keys[-1], (in_channels, out_channels), dtype) / np.sqrt(in_channels)
    if bias:
        params["bias"] = jnp.zeros((out_channels,), dtype)
    return params


def init_tucker_params(
    key: jax.Array,
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    ranks: tuple[int, int],
    *,
    gain: float = 2.0,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
    """Random Tucker conv params ``factor_in (C_in, R_in)``, ``core (*K, R_in, R_out)``,
    ``factor_out (C_out, R_out)`` with reconstructed-kernel variance ``gain / fan_in``."""
    check_float_dtype(dtype)
    kernel_size = check_geometry(in_channels, out_channels, kernel_size, ranks=ranks)
    r_in, r_out = (int(r) for r in ranks)
    var = target_variance(in_channels, kernel_size, gain)
    std = float((var / (r_in * r_out)) ** (1.0 / 6.0))
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "factor_in": std * jax.random.normal(k1, (in_channels, r_in), dtype),
        "core": std * jax.random.normal(k2, kernel_size + (r_in, r_out), dtype),
        "factor_out": std * jax.random.normal(k3, (out_channels, r_out), dtype),
    }
