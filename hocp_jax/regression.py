"""Tensor regression (Kossaifi et al., "Tensor regression networks"), pure functions.

A TRL maps an activation tensor ``X (*batch, d_1, ..., d_k)`` to ``Y (*batch, O)`` with a
low-rank weight ``W (d_1, ..., d_k, O)``: ``Y = <X, W>_{1..k} + b``. The contraction order is
chosen by ``opt_einsum`` (greedy), which contracts ``X`` with one factor at a time and only
builds the full weight when that is cheaper:

* CP: ``W = sum_r lambda_r U_1[:, r] o ... o U_k[:, r] o U_out[:, r]``; params
  ``factor_<i> (d_i, R)`` for ``i = 0..k-1``, ``factor_out (O, R)``, ``lambda (R,)``, ``bias (O,)``.
  Cost ``O(prod d * R)`` instead of ``O(prod d * O)``.
* Tucker: ``W = G x_1 U_1 ... x_k U_k x_{k+1} U_out``; params ``factor_<i> (d_i, R_i)``,
  ``core (R_1, ..., R_k, R_out)``, ``factor_out (O, R_out)``, ``bias (O,)``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from hocp_jax.checks import check_positive_int
from hocp_jax.conv import add_bias, check_known_leaves


def _factors(params: Mapping[str, jax.Array], x: jax.Array, n_modes: int) -> list[jax.Array]:
    dims = x.shape[x.ndim - n_modes:]
    factors = []
    for i, d in enumerate(dims):
        f = params.get(f"factor_{i}")
        if f is None or f.ndim != 2 or f.shape[0] != d:
            got = None if f is None else tuple(f.shape)
            raise ValueError(f"params['factor_{i}']: got {got}, expected ({d}, rank) for x of shape {tuple(x.shape)}")
        factors.append(f)
    return factors


def _check_ranks(params: Mapping[str, jax.Array], factors: list[jax.Array]) -> None:
    """The rank axes of a TRL's leaves agree (CP: one R; Tucker: the core's)."""
    out = params.get("factor_out")
    if out is None or out.ndim != 2:
        raise ValueError(f"params['factor_out']: got {None if out is None else tuple(out.shape)}, expected (O, rank)")
    if "core" in params:
        want = tuple(f.shape[1] for f in factors) + (out.shape[1],)
        if tuple(params["core"].shape) != want:
            raise ValueError(f"params['core']: got shape {tuple(params['core'].shape)}, expected {want} "
                             "(the factors' ranks, then factor_out's)")
    elif "lambda" in params:
        ranks = {f.shape[1] for f in factors} | {out.shape[1]}
        if len(ranks) != 1 or tuple(params["lambda"].shape) != (out.shape[1],):
            raise ValueError(f"params: the CP TRL's factors have ranks {sorted(ranks)} and lambda shape "
                             f"{tuple(params['lambda'].shape)}; expected one rank R and lambda (R,)")


def _mode_letters(n_modes: int) -> str:
    """einsum labels of the ``n_modes`` contracted modes: lower-case letters but ``o``, ``r`` and
    ``z``, the output's and ranks' labels (their upper case labels a Tucker core's ranks)."""
    pool = [c for c in string.ascii_lowercase if c not in "orz"]
    if n_modes > len(pool):
        raise ValueError(f"n_modes={n_modes}: expected at most {len(pool)} contracted modes")
    return "".join(pool[:n_modes])


def trl(x: jax.Array, params: Mapping[str, jax.Array], *, n_modes: int) -> jax.Array:
    """Applies a CP (``lambda`` in params) or Tucker (``core`` in params) TRL to ``x``."""
    check_positive_int(n_modes, "n_modes")
    letters = _mode_letters(n_modes)
    if not hasattr(x, "ndim"):
        raise ValueError(f"x: got a {type(x).__name__}; expected an array (*batch, d_1..d_{n_modes})")
    if x.ndim < n_modes + 1:
        raise ValueError(f"x: got shape {tuple(x.shape)}, expected (*batch, d_1..d_{n_modes}) with at least one "
                         "batch axis")
    tucker = "core" in params
    if not tucker and "lambda" not in params:
        raise ValueError("params: expected 'lambda' (CP TRL) or 'core' (Tucker TRL)")
    check_known_leaves(params, "Tucker TRL" if tucker else "CP TRL",
                       [f"factor_{i}" for i in range(n_modes)] + ["factor_out", "core" if tucker else "lambda"])
    factors = _factors(params, x, n_modes)
    _check_ranks(params, factors)
    if tucker:
        ranks = letters.upper()
        spec = f"...{letters}," + ",".join(f"{l}{r}" for l, r in zip(letters, ranks)) + f",{ranks}z,oz->...o"
        y = jnp.einsum(spec, x, *factors, params["core"], params["factor_out"], optimize="greedy")
    else:
        spec = f"...{letters}," + ",".join(f"{l}r" for l in letters) + ",or,r->...o"
        y = jnp.einsum(spec, x, *factors, params["factor_out"], params["lambda"], optimize="greedy")
    return add_bias(y, params)


def trl_weight(params: Mapping[str, jax.Array], n_modes: int) -> jax.Array:
    """The full weight ``(d_1, ..., d_k, O)`` (for tests and inspection only)."""
    letters = _mode_letters(n_modes)
    fs = [params[f"factor_{i}"] for i in range(n_modes)]
    if "core" in params:
        spec = f"{letters}z," + ",".join(f"{l.upper()}{l}" for l in letters) + ",oz->" + letters.upper() + "o"
        return jnp.einsum(spec, params["core"], *fs, params["factor_out"])
    spec = ",".join(f"{l}r" for l in letters) + ",or,r->" + letters + "o"
    return jnp.einsum(spec, *fs, params["factor_out"], params["lambda"])
