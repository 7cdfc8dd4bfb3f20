r"""Factorized linear layers, the tensor contraction layer and tensor dropout: pure functions.

The rows of TensorLy-Torch's feature table that the convolutions of :mod:`hocp_jax.conv`
do not cover (TT convolution is :func:`hocp_jax.conv.tt_conv`).

**Factorized linear** ``y = x W + b``: the weight ``W (I, O)`` (``I = prod in_shape``,
``O = prod out_shape``, rows and columns in row-major order over the tensorized shapes, the
layout of a Flax ``Dense`` kernel) is a low-rank tensor of shape ``(*in_shape, *out_shape)``:

* CP: ``W = sum_r lambda_r U_in_0[:, r] o ... o U_out_0[:, r] o ...``; leaves ``lambda (R,)``,
  ``factor_in_<i> (I_i, R)``, ``factor_out_<j> (O_j, R)``.
* Tucker: ``W = core x_i U_in_i x_j U_out_j``; leaves ``core (*R_in, *R_out)``,
  ``factor_in_<i> (I_i, R_in_i)``, ``factor_out_<j> (O_j, R_out_j)``.
* TT-matrix (tensor train, Novikov et al. 2015; TensorLy's ``tt_matrix``): leaves
  ``core_<n> (R_n, I_n, O_n, R_{n+1})`` with ``R_0 = R_d = 1``, one core per
  (input, output) mode pair, so ``len(in_shape) == len(out_shape)``.

plus an optional ``bias (O,)``. The layer is found from the leaf names (``lambda`` -> CP,
``core`` -> Tucker, ``core_0`` -> TT). ``implementation="factorized"`` contracts ``x`` with
the factors one at a time (``jnp.einsum`` with opt_einsum's greedy order, which only builds
the weight when that is cheaper); ``"reconstructed"`` builds ``W`` and does one matmul.
The CP linear layer is not a CP *conv* layer (no ``factor_in`` leaf): the lasso of
:mod:`hocp_jax.optim` leaves its ``lambda`` alone, like the TRL's.

**Tensor contraction layer** (TCL, Kossaifi et al. 2017): ``x (*batch, d_1..d_k)`` ->
``(*batch, r_1..r_k)``, ``y = x x_1 U_1^T ... x_k U_k^T (+ bias)``; leaves
``factor_<i> (d_i, r_i)``, optional ``bias (r_1, ..., r_k)``.

**Tensor dropout** (Kossaifi et al. 2019; CP, Tucker, TT): drops whole rank components while training. With
rate ``p`` each component is kept with probability ``1 - p`` and the kept ones are scaled by
``1 / (1 - p)`` per masked mode, so the expected weight is the weight. JAX needs static
shapes, so dropped components are zeroed, not sliced out (the same function of the input);
unlike TensorLy-Torch no component is forced to survive, which keeps the expectation exact.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hocp_jax.checks import check_real, is_int
from hocp_jax.conv import add_bias, check_known_leaves

Params = Mapping[str, jax.Array]
LINEAR_IMPLEMENTATIONS = ("factorized", "reconstructed")


def _indexed(params: Params, prefix: str) -> list[jax.Array]:
    """``params[prefix0], params[prefix1], ...`` up to the first missing index."""
    out = []
    while f"{prefix}{len(out)}" in params:
        out.append(params[f"{prefix}{len(out)}"])
    return out


def _letters(n: int, skip: str = "") -> str:
    pool = [c for c in string.ascii_letters if c not in skip]
    if n > len(pool):
        raise ValueError(f"too many modes: {n} einsum indices needed, at most {len(pool)} available")
    return "".join(pool[:n])


def _shape(a) -> tuple[int, ...]:
    return tuple(np.shape(a))


# ----------------------------------------------------------------------------- factorized linear


def linear_factorization(params: Params) -> str:
    """``"cp"``, ``"tucker"`` or ``"tt"`` from the leaf names (see module docstring)."""
    if "core_0" in params:
        return "tt"
    if "factor_in_0" in params and "factor_out_0" in params:
        if "lambda" in params:
            return "cp"
        if "core" in params:
            return "tucker"
    raise ValueError(
        f"params: keys {sorted(params)} are not a factorized linear layer; expected 'lambda' + factor_in_<i> + "
        "factor_out_<j> (CP), 'core' + factor_in_<i> + factor_out_<j> (Tucker) or core_0, core_1, ... (TT)"
    )


def _linear_spec(params: Params) -> tuple[str, list[str], list[jax.Array], tuple[int, ...], tuple[int, ...]]:
    """Validated einsum pieces of the weight: (weight spec, operand specs, operands, in_shape, out_shape)."""
    kind = linear_factorization(params)
    if kind == "tt":
        cores = _indexed(params, "core_")
        d = len(cores)
        check_known_leaves(params, "TT-matrix linear", [f"core_{n}" for n in range(d)])
        ins, outs, bonds = _letters(d), _letters(d, skip=_letters(d)), _letters(d + 1, skip=_letters(2 * d))
        for n, c in enumerate(cores):
            s = _shape(c)
            want_left = 1 if n == 0 else _shape(cores[n - 1])[-1]
            if len(s) != 4 or s[0] != want_left or (n == d - 1 and s[3] != 1):
                raise ValueError(
                    f"params['core_{n}']: got shape {s}, expected (R_{n}={want_left}, I_{n}, O_{n}, R_{n + 1})"
                    f"{' with R_' + str(n + 1) + '=1 (last core)' if n == d - 1 else ''}"
                )
        specs = [f"{bonds[n]}{ins[n]}{outs[n]}{bonds[n + 1]}" for n in range(d)]
        return ins + outs, specs, cores, tuple(_shape(c)[1] for c in cores), tuple(_shape(c)[2] for c in cores)
    f_in, f_out = _indexed(params, "factor_in_"), _indexed(params, "factor_out_")
    d_in, d_out = len(f_in), len(f_out)
    check_known_leaves(params, f"{'CP' if kind == 'cp' else 'Tucker'} linear", ["lambda" if kind == "cp" else "core"]
                       + [f"factor_in_{i}" for i in range(d_in)] + [f"factor_out_{j}" for j in range(d_out)])
    ins, outs = _letters(d_in), _letters(d_out, skip=_letters(d_in))
    used = ins + outs
    if kind == "cp":
        r = _letters(1, skip=used)
        rank = _shape(params["lambda"])
        for name, f in [(f"factor_in_{i}", f) for i, f in enumerate(f_in)] + [(f"factor_out_{j}", f) for j, f in enumerate(f_out)]:
            if len(_shape(f)) != 2 or _shape(f)[1:] != rank:
                raise ValueError(f"params['{name}']: got shape {_shape(f)}, expected (size, R) with R={rank} from 'lambda'")
        specs = [f"{a}{r}" for a in ins + outs] + [r]
        operands = f_in + f_out + [params["lambda"]]
    else:
        ranks = _letters(d_in + d_out, skip=used)
        core = params["core"]
        factors = f_in + f_out
        if len(_shape(core)) != d_in + d_out or any(
            len(_shape(f)) != 2 or _shape(f)[1] != k for f, k in zip(factors, _shape(core))
        ):
            raise ValueError(
                f"params['core']: shape {_shape(core)} does not match factor_in/factor_out shapes "
                f"{[_shape(f) for f in factors]}; expected one core axis per factor, of the factor's rank"
            )
        specs = [f"{a}{k}" for a, k in zip(ins + outs, ranks)] + [ranks]
        operands = factors + [core]
    return used, specs, operands, tuple(_shape(f)[0] for f in f_in), tuple(_shape(f)[0] for f in f_out)


def factorized_linear_weight(params: Params) -> jax.Array:
    """The dense weight ``(I, O)`` of a factorized linear layer (for inspection and the reconstructed path)."""
    out, specs, operands, in_shape, out_shape = _linear_spec(params)
    w = jnp.einsum(",".join(specs) + "->" + out, *operands)
    return w.reshape(int(np.prod(in_shape)), int(np.prod(out_shape)))


def factorized_linear(x: jax.Array, params: Params, *, implementation: str = "factorized") -> jax.Array:
    """``x (*batch, I)`` -> ``(*batch, O)`` with a CP / Tucker / TT-matrix weight (module docstring)."""
    if implementation not in LINEAR_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: expected one of {LINEAR_IMPLEMENTATIONS}")
    used, specs, operands, in_shape, out_shape = _linear_spec(params)
    if x.ndim < 1 or x.shape[-1] != int(np.prod(in_shape)):
        raise ValueError(
            f"x: got shape {tuple(x.shape)}, expected (*batch, {int(np.prod(in_shape))}) for the tensorized input shape {in_shape}"
        )
    if implementation == "reconstructed":
        y = x @ factorized_linear_weight(params)
    else:
        d_in = len(in_shape)
        xs = x.reshape(x.shape[:-1] + in_shape)
        spec = f"...{used[:d_in]}," + ",".join(specs) + f"->...{used[d_in:]}"
        y = jnp.einsum(spec, xs, *operands, optimize="greedy").reshape(x.shape[:-1] + (int(np.prod(out_shape)),))
    return add_bias(y, params)


# ----------------------------------------------------------------------------- tensor contraction layer


def tcl(x: jax.Array, params: Params) -> jax.Array:
    """Tensor contraction layer: ``x (*batch, d_1..d_k)`` -> ``(*batch, r_1..r_k)`` (module docstring)."""
    factors = _indexed(params, "factor_")
    k = len(factors)
    if not k:
        raise ValueError(f"params: keys {sorted(params)}; expected factor_0, factor_1, ... of shape (d_i, r_i)")
    check_known_leaves(params, "TCL", [f"factor_{i}" for i in range(k)])
    if x.ndim < k + 1 or any(len(_shape(f)) != 2 or _shape(f)[0] != d for f, d in zip(factors, x.shape[-k:])):
        raise ValueError(
            f"x: got shape {tuple(x.shape)} for factors {[_shape(f) for f in factors]}; "
            f"expected (*batch, {', '.join(str(_shape(f)[0]) if _shape(f) else '?' for f in factors)}) and "
            "factors (d_i, r_i)"
        )
    ins = _letters(k)
    outs = _letters(k, skip=ins)
    y = jnp.einsum(f"...{ins}," + ",".join(a + b for a, b in zip(ins, outs)) + f"->...{outs}", x, *factors,
                   optimize="greedy")
    return add_bias(y, params, k)


# ----------------------------------------------------------------------------- tensor dropout


def check_rate(rate: float, name: str = "rate") -> None:
    """ValueError (naming ``name``) unless ``rate`` is a real number with ``0 <= rate < 1``; traced values pass."""
    check_real(rate, name, lambda v: 0.0 <= v < 1.0, "a real number with 0 <= rate < 1 (tensor dropout)")


def _keep_mask(key: jax.Array, size: int, rate: float, dtype) -> jax.Array:
    return jax.random.bernoulli(key, 1.0 - rate, (size,)).astype(dtype) / (1.0 - rate)


def cp_dropout(params: Params, key: jax.Array, rate: float) -> dict[str, jax.Array]:
    """CP tensor dropout: ``lambda_r <- lambda_r * m_r / (1 - rate)``, ``m_r ~ Bernoulli(1 - rate)``.

    Works on any dict with a ``lambda (R,)`` leaf (CP conv, CP TRL, CP linear); other leaves unchanged.
    """
    check_rate(rate)
    if "lambda" not in params:
        raise ValueError(f"params: keys {sorted(params)}; CP tensor dropout needs a 'lambda' leaf")
    lam = params["lambda"]
    return dict(params) | {"lambda": lam * _keep_mask(key, lam.shape[0], rate, lam.dtype)}


def tucker_dropout(params: Params, key: jax.Array, rate: float, axes: Sequence[int] | None = None) -> dict[str, jax.Array]:
    """Tucker tensor dropout: one Bernoulli keep-mask per rank axis of ``core``, each scaled by ``1 / (1 - rate)``.

    ``axes``: the core's rank axes, distinct ints in ``[-core.ndim, core.ndim)`` (default all:
    Tucker linear / TRL cores); a Tucker conv core ``(*K, R_in, R_out)`` takes ``axes=(-2, -1)``.
    """
    check_rate(rate)
    if "core" not in params:
        raise ValueError(f"params: keys {sorted(params)}; Tucker tensor dropout needs a 'core' leaf")
    core = params["core"]
    if axes is not None:
        n = core.ndim
        ints = isinstance(axes, Sequence) and all(map(is_int, axes))
        if not (ints and all(-n <= a < n for a in axes) and len({a % n for a in axes}) == len(axes)):
            raise ValueError(f"axes={axes!r}: expected distinct ints in [{-n}, {n}) for the core of shape {_shape(core)}")
    axes = tuple(range(core.ndim)) if axes is None else tuple(a % core.ndim for a in axes)
    for k, a in zip(jax.random.split(key, len(axes)), axes):
        core = core * jnp.expand_dims(_keep_mask(k, core.shape[a], rate, core.dtype), [i for i in range(core.ndim) if i != a])
    return dict(params) | {"core": core}


def tt_dropout(params: Params, key: jax.Array, rate: float) -> dict[str, jax.Array]:
    """TT tensor dropout: one Bernoulli keep-mask per inner rank ``R_1 .. R_{d-1}`` of the cores
    ``core_0 .. core_{d-1}`` (TT conv or TT-matrix), applied to the last axis of ``core_{n-1}``
    and scaled by ``1 / (1 - rate)``; other leaves unchanged."""
    check_rate(rate)
    cores = _indexed(params, "core_")
    if len(cores) < 2:
        raise ValueError(f"params: keys {sorted(params)}; TT tensor dropout needs cores core_0, core_1, ...")
    keys = jax.random.split(key, len(cores) - 1)
    return dict(params) | {
        f"core_{n}": c * _keep_mask(k, c.shape[-1], rate, c.dtype) for n, (c, k) in enumerate(zip(cores[:-1], keys))
    }


def linear_dropout(params: Params, key: jax.Array, rate: float) -> dict[str, jax.Array]:
    """Tensor dropout of a factorized linear layer: CP on ``lambda``, Tucker on every core axis,
    TT on every inner rank."""
    kind = linear_factorization(params)
    return {"cp": cp_dropout, "tucker": tucker_dropout, "tt": tt_dropout}[kind](params, key, rate)
