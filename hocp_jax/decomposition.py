r"""Decomposing trained dense conv kernels: CP (ALS) and Tucker-2 (HOSVD + HOOI).

* :func:`decompose` — CP-ALS of one kernel ``(*K, C_in, C_out)`` into the CP parameter dict
  of :class:`hocp_jax.layers.CPConv` (``lambda``, ``factor_in``, ``factor_out``, ``factor_<m>``).
* :func:`tucker_decompose` — Tucker-2 of one kernel (only the channel modes are factorized)
  into the parameter dict of :class:`hocp_jax.layers.TuckerConv` (``factor_in``, ``core``,
  ``factor_out``).
* :func:`decompose_tree` — CP-ALS of every dense conv kernel of a parameter tree.

Dense -> HO-CP conversion of a whole trained model lives in :mod:`hocp_jax.conversion`.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hocp_jax import counting
from hocp_jax.checks import check_flags, check_int, check_key, check_positive_int, check_real, is_int, is_positive_int
from hocp_jax.conv import check_modes, cp_to_kernel, default_modes, mode_key, tucker_to_kernel
from hocp_jax.tree import Path, dense_leaves, get_at, path_str, set_at, to_dict

# ----------------------------------------------------------------------------- CP-ALS

_LETTERS = "abcdefghijklmnop"


def _unfold(x: jax.Array, n: int) -> jax.Array:
    return jnp.moveaxis(x, n, 0).reshape(x.shape[n], -1)


def _mttkrp(x: jax.Array, factors: Sequence[jax.Array], n: int) -> jax.Array:
    """``X_(n) (Khatri-Rao of the other factors)``: ``(I_n, R)``, via one einsum."""
    letters = _LETTERS[: x.ndim]
    ops = [f for i, f in enumerate(factors) if i != n]
    spec = letters + "," + ",".join(f"{letters[i]}z" for i in range(x.ndim) if i != n) + f"->{letters[n]}z"
    return jnp.einsum(spec, x, *ops)


def _rel_error(x: jax.Array, factors: Sequence[jax.Array], norm_x: jax.Array) -> jax.Array:
    """``||X - [[factors]]||_F / ||X||_F`` from the reconstruction (accurate in float32, unlike
    the Gram-matrix expansion ``||X||^2 - 2<X, X_hat> + ||X_hat||^2``, which cancels)."""
    letters = _LETTERS[: x.ndim]
    rec = jnp.einsum(",".join(f"{l}z" for l in letters) + "->" + letters, *factors)
    return jnp.linalg.norm(x - rec) / norm_x


def _normalise(factors: Sequence[jax.Array]) -> list[jax.Array]:
    """Unit columns for every factor but the last, which carries the scale (lambda)."""
    out, scale = [], 1.0
    for f in factors[:-1]:
        norm = jnp.linalg.norm(f, axis=0)
        norm = jnp.where(norm > 0, norm, 1.0)
        out.append(f / norm)
        scale = scale * norm
    return out + [factors[-1] * scale]


class _ALSState(NamedTuple):
    sweep: jax.Array  # sweeps done
    factors: tuple[jax.Array, ...]  # normalised (_normalise): the last one carries lambda
    error: jax.Array  # relative error of ``factors``
    change: jax.Array  # relative decrease of the error in the last sweep
    acc_pow: jax.Array  # line-search step = sweep ** (1 / acc_pow)
    acc_fail: jax.Array  # consecutive rejected extrapolations


def _solve_gram(v: jax.Array, m: jax.Array) -> jax.Array:
    """``A`` with ``A V = M`` for the symmetric PSD ``V``: Cholesky, or least squares (SVD) when
    ``V`` is numerically singular (e.g. R above the product of the other modes' sizes)."""
    a = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(v, lower=True), m.T).T
    return jax.lax.cond(jnp.all(jnp.isfinite(a)), lambda: a, lambda: jnp.linalg.lstsq(v, m.T)[0].T)


def _als_sweep(x: jax.Array, factors: Sequence[jax.Array], ridge) -> list[jax.Array]:
    """One ALS sweep: for every mode n, ``A_n V = X_(n) KR(others)`` (:func:`_solve_gram`), where
    ``V`` is the Hadamard product of the other factors' Gram matrices ``+ ridge * mean(diag V) I``."""
    factors = list(factors)
    eye = jnp.eye(factors[0].shape[1], dtype=x.dtype)
    grams = [f.T @ f for f in factors]
    for n in range(x.ndim):
        v = functools.reduce(jnp.multiply, [g for i, g in enumerate(grams) if i != n])
        v = v + ridge * jnp.mean(jnp.diag(v)) * eye
        a = _solve_gram(v, _mttkrp(x, factors, n))
        if n < x.ndim - 1:  # ALS is invariant to column scaling of the fixed factors: keep them unit
            norm = jnp.linalg.norm(a, axis=0)
            a = a / jnp.where(norm > 0, norm, 1.0)
        factors[n] = a
        grams[n] = a.T @ a
    return factors


@functools.partial(jax.jit, static_argnames=("line_search",))
def _als_chunk(x: jax.Array, state: _ALSState, max_sweep, tol, ridge, floor, line_search: bool = True) -> _ALSState:
    """Sweeps until ``state.sweep == max_sweep`` or convergence (see :func:`decompose`)."""
    norm_x = jnp.linalg.norm(x)

    def body(s: _ALSState) -> _ALSState:
        new = _als_sweep(x, s.factors, ridge)
        err = _rel_error(x, new, norm_x)
        fail, acc_pow = s.acc_fail, s.acc_pow
        if line_search:  # Bro's extrapolation F_prev + step (F - F_prev), kept when it lowers the error
            step = (s.sweep + 1.0).astype(x.dtype) ** (1.0 / s.acc_pow)
            trial = _normalise([p + step * (f - p) for p, f in zip(s.factors, new)])
            trial_err = _rel_error(x, trial, norm_x)
            better = (s.sweep >= 3) & (trial_err < err)
            new = [jnp.where(better, t, f) for t, f in zip(trial, new)]
            err = jnp.where(better, trial_err, err)
            fail = jnp.where(better | (s.sweep < 3), 0, s.acc_fail + 1)
            acc_pow = jnp.where(fail >= 4, s.acc_pow + 1.0, s.acc_pow)
            fail = jnp.where(fail >= 4, 0, fail)
        change = (s.error - err) / jnp.maximum(s.error, floor)
        return _ALSState(s.sweep + 1, tuple(new), err, change, acc_pow, fail)

    def cond(s: _ALSState):
        return (s.sweep < max_sweep) & (s.error > floor) & ((s.sweep < 2) | (s.change > tol))

    return jax.lax.while_loop(cond, body, state)


def _check_kernel(kernel: Any, modes: Sequence[str] | None) -> tuple[jax.Array, tuple[str, ...], Any, float]:
    """The kernel divided by its Frobenius norm (so that the fit's float32 norms and Gram
    products neither overflow nor underflow at any scale), in the dtype of the fit (float32 for
    ints and floats narrower than 32 bits, whose linear algebra XLA does not run); its validated
    modes, the dtype of the result and the norm (float64), which the caller multiplies back."""
    try:
        kernel = np.asarray(kernel)
    except ValueError as err:  # e.g. a ragged nested list
        raise ValueError(f"kernel: not an array ({err}); expected a real (*K, C_in, C_out) array") from None
    if not jnp.issubdtype(kernel.dtype, jnp.number):  # (bools, strings, objects)
        raise ValueError(f"kernel: got dtype {kernel.dtype}, expected a real (*K, C_in, C_out) array of numbers")
    if jnp.issubdtype(kernel.dtype, jnp.complexfloating):  # (the cast below would keep the real part)
        raise ValueError(f"kernel: got dtype {kernel.dtype}, expected a real kernel")
    # (float64 is float32 unless jax_enable_x64, as jnp.asarray makes it)
    out_dtype = jax.dtypes.canonicalize_dtype(kernel.dtype if jnp.issubdtype(kernel.dtype, jnp.floating) else jnp.float32)
    if kernel.ndim < 3 or 0 in kernel.shape:
        raise ValueError(f"kernel: got shape {tuple(kernel.shape)}, expected (*K, C_in, C_out) with >= 1 spatial axis "
                         "and no axis of size 0")
    n_sp = kernel.ndim - 2
    modes = check_modes(modes) if modes is not None else default_modes(n_sp)
    if len(modes) != n_sp:
        raise ValueError(f"modes={modes!r}: expected {n_sp} names for kernel {tuple(kernel.shape)}")
    wide = np.asarray(kernel, np.float64)
    norm = float(np.linalg.norm(wide))
    if not (np.isfinite(norm) and norm > 0):
        raise ValueError(f"kernel: its Frobenius norm is {norm}; expected a finite nonzero kernel")
    fit_dtype = out_dtype if jnp.finfo(out_dtype).bits >= 32 else jnp.dtype(jnp.float32)
    return jnp.asarray(wide / norm, fit_dtype), modes, out_dtype, norm


def _returned(params: dict, kernel: jax.Array, rebuild, dtype, key: str, norm: float) -> tuple[dict, float]:
    """What the caller gets: ``params`` (fitted to ``kernel``, the kernel over ``norm``) with
    ``params[key]`` (CP's lambda, Tucker's core) times ``norm``, in ``dtype`` (the kernel's,
    narrower than the fit's for bfloat16/float16); and the relative error of their
    reconstruction ``rebuild(params)``, computed from the returned values scaled back."""
    out = {k: (v * norm if k == key else v).astype(dtype) for k, v in params.items()}
    back = {k: v.astype(kernel.dtype) / norm if k == key else v.astype(kernel.dtype) for k, v in out.items()}
    return out, float(jnp.linalg.norm(rebuild(back) - kernel) / jnp.linalg.norm(kernel))


def _default_tol(dtype) -> float:
    """Relative decrease of the error per sweep below which ALS stops: ``10 eps`` of the dtype
    (1.2e-6 in float32, 2.2e-15 in float64) — far above the float32 rounding of the error."""
    return 10 * float(jnp.finfo(dtype).eps)


def _check_tol(tol) -> float:
    check_real(tol, "tol", lambda v: v < float("inf"), "a number < inf (or None: 10 eps of the dtype; "
               "a negative tol, e.g. -inf, runs every sweep short of an exact fit)")
    return float(tol)


def decompose(
    kernel: jax.Array,
    rank: int,
    *,
    modes: Sequence[str] | None = None,
    n_iter: int = 1000,
    tol: float | None = None,
    key: jax.Array | None = None,
    init: str = "svd",
    ridge: float | None = None,
    line_search: bool = True,
    report_every: int | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, jax.Array], float]:
    """CP decomposition (ALS) of a dense conv kernel into the repo's CP parameter dict.

    ``kernel (*K, C_in, C_out)`` ~= ``cp_to_kernel(cp, modes)``. Each ALS sweep solves, for
    every mode n, ``A_n V = X_(n) KR(others)`` by Cholesky, ``V`` the Hadamard product of
    the other factors' Gram matrices plus ``ridge * mean(diag V) * I``; the fixed factors
    are kept at unit column norm (the last one carries the scale, i.e. lambda). With
    ``line_search`` every sweep also tries Bro's extrapolation ``F_prev + s (F - F_prev)``,
    ``s = sweep^(1/p)`` (tensorly's schedule: ``p`` grows after 4 rejections in a row) and
    keeps it when it lowers the error — this is what gets ALS out of the slow "swamps"
    where plain ALS stalls around 1e-3 on exactly low-rank kernels in float32.

    Stopping: the relative error is computed from the reconstruction every sweep (accurate
    in float32). ALS stops after ``n_iter`` sweeps, when the error reaches ``10 eps`` of
    the dtype (an exact fit), or when one sweep decreased it by a relative amount of at most
    ``tol`` — which includes an increase: at the float32 rounding floor (~2e-6 relative on
    exactly low-rank kernels) the error only fluctuates, and the fit stops there.

    Args:
      kernel: ``(*K, C_in, C_out)`` with at least one spatial axis (float; ints -> float32;
        bfloat16/float16 are fitted in float32 and the factors returned in the kernel's dtype).
      rank: R >= 1.
      modes: names of the kernel's spatial axes (default :func:`hocp_jax.conv.default_modes`).
      n_iter: maximum number of sweeps.
      tol: relative decrease of the error per sweep below which ALS stops; default ``10 eps``
        of the kernel's dtype (1.2e-6 in float32); a negative one (e.g. ``-inf``) runs all
        ``n_iter`` sweeps unless the error reaches ``10 eps`` (an exact fit).
      key: PRNG key for the random parts of the init (default ``jax.random.key(0)``).
      init: ``"svd"`` (HOSVD: leading left singular vectors of each unfolding, padded with
        random columns when R exceeds the mode size) or ``"random"`` (standard normal).
      ridge: relative Tikhonov term of the normal equations; default ``eps`` of the dtype (keeps the
        Cholesky factorisation defined; 10 eps already biases exact fits to ~2e-6 in float32).
      line_search: extrapolate as above (default True).
      report_every: run the sweeps in jitted chunks of this many and call ``callback`` after
        each chunk (progress on big layers); default: one chunk when no callback is given,
        chunks of 50 when one is.
      callback: ``callback(sweeps_done, rel_error)``, e.g.
        ``lambda i, e: print(f"sweep {i}: {e:.2e}")``.

    Returns:
      ``(cp_params, rel_error)``: ``{"lambda", "factor_in", "factor_out", "factor_<m>"...}``
      and ``||W - W_hat||_F / ||W||_F`` computed from the reconstructed kernel.
    """
    kernel, modes, out_dtype, norm = _check_kernel(kernel, modes)
    check_positive_int(rank, "rank")
    check_flags(line_search=line_search)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback={callback!r}: expected None or callback(sweeps_done, rel_error)")
    key = jax.random.key(0) if key is None else key
    check_key(key)
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    if init not in ("svd", "random"):
        raise ValueError(f"init={init!r}: expected 'svd' or 'random'")
    check_int(n_iter, "n_iter", 0)
    if report_every is not None:
        check_positive_int(report_every, "report_every")
    eps = float(jnp.finfo(kernel.dtype).eps)
    tol = _default_tol(kernel.dtype) if tol is None else _check_tol(tol)
    if ridge is not None:
        check_real(ridge, "ridge", lambda v: 0 <= v < float("inf"), "a finite number >= 0 (or None: eps of the dtype)")
    ridge = eps if ridge is None else float(ridge)
    # the random parts of the init are drawn on the host: compiling threefry costs more than the fit
    rng = np.random.default_rng(seed)
    noise = tuple(rng.standard_normal((size, int(rank))).astype(kernel.dtype) for size in kernel.shape)
    state = _init_state(kernel, noise, init == "svd")
    chunk = report_every or (50 if callback is not None else max(int(n_iter), 1))
    while int(state.sweep) < n_iter:
        done = int(state.sweep)
        stop = min(done + chunk, int(n_iter))
        state = _als_chunk(kernel, state, stop, tol, ridge, 10 * eps, line_search)
        if int(state.sweep) == done:  # it had converged at the end of the chunk before
            break
        if callback is not None:
            callback(int(state.sweep), float(state.error))
        if int(state.sweep) < stop:  # converged inside the chunk
            break
    cp, rel = _returned(_to_params(state.factors, modes), kernel, lambda p: cp_to_kernel(p, modes), out_dtype, "lambda", norm)
    if not np.isfinite(rel):
        raise FloatingPointError(f"decompose: CP-ALS of kernel {tuple(kernel.shape)} at rank={rank} gave non-finite "
                                 "factors; try init='random' or a smaller rank")
    return cp, rel


@functools.partial(jax.jit, static_argnames=("svd_init",))
def _init_state(kernel: jax.Array, noise: Sequence[jax.Array], svd_init: bool) -> _ALSState:
    """HOSVD (leading left singular vectors of each unfolding; ``noise`` columns beyond the
    mode size) or the ``noise`` factors themselves, normalised, and their error."""
    factors = list(noise)
    for n, f in enumerate(factors):
        if svd_init:
            u = jnp.linalg.svd(_unfold(kernel, n), full_matrices=False)[0][:, : f.shape[1]]
            factors[n] = f.at[:, : u.shape[1]].set(u)
    factors = tuple(_normalise(factors))
    err = _rel_error(kernel, factors, jnp.linalg.norm(kernel))
    return _ALSState(jnp.asarray(0), factors, err, jnp.asarray(jnp.inf, kernel.dtype),
                     jnp.asarray(2.0, kernel.dtype), jnp.asarray(0))


@functools.partial(jax.jit, static_argnames=("modes",))
def _to_params(factors: Sequence[jax.Array], modes: tuple[str, ...]) -> dict[str, jax.Array]:
    """CP params of the ALS factors: unit factor_out columns, the scale in lambda."""
    lam = jnp.linalg.norm(factors[-1], axis=0)
    cp = {"lambda": lam, "factor_in": factors[-2], "factor_out": factors[-1] / jnp.where(lam > 0, lam, 1.0)}
    return cp | {mode_key(m): f for m, f in zip(modes, factors[:-2])}


# ----------------------------------------------------------------------------- Tucker-2


def _leading(m: jax.Array, r: int) -> jax.Array:
    """``(I, r)`` leading left singular vectors of ``m (I, J)``."""
    return jnp.linalg.svd(m, full_matrices=False)[0][:, :r]


def tucker_decompose(
    kernel: jax.Array, ranks: tuple[int, int], *, n_iter: int = 50, tol: float | None = None
) -> tuple[dict[str, jax.Array], float]:
    """Tucker-2 decomposition (HOSVD init + HOOI) of a dense conv kernel into TuckerConv params.

    Only the channel modes are factorized (the spatial modes stay in the core, as in
    :class:`hocp_jax.layers.TuckerConv`): ``kernel (*K, C_in, C_out)`` ~= ``tucker_to_kernel``
    of ``factor_in (C_in, R_in)``, ``core (*K, R_in, R_out)``, ``factor_out (C_out, R_out)``
    with orthonormal factor columns. HOOI alternates: ``factor_in`` = leading left singular
    vectors of the input-mode unfolding of ``kernel x_out factor_out^T``, then the same for
    ``factor_out``; it stops after ``n_iter`` rounds or when ``||core||`` (the captured norm,
    non-decreasing) grows by a relative amount of at most ``tol`` (default ``10 eps``).

    Returns:
      ``({"factor_in", "core", "factor_out"}, rel_error)`` with the relative Frobenius error
      of the reconstruction.
    """
    kernel, _, out_dtype, norm = _check_kernel(kernel, None)
    c_in, c_out = kernel.shape[-2:]
    taps = int(np.prod(kernel.shape[:-2]))
    if (not isinstance(ranks, (tuple, list)) or len(ranks) != 2
            or not all(is_int(r) for r in ranks)
            or not (1 <= ranks[0] <= min(c_in, taps * ranks[1]) and 1 <= ranks[1] <= min(c_out, taps * ranks[0]))):
        raise ValueError(f"ranks={ranks!r}: expected (R_in, R_out) ints with 1 <= R_in <= {c_in}, 1 <= R_out <= {c_out}, "
                         f"R_in <= {taps} R_out and R_out <= {taps} R_in (the kernel's {taps} taps times the other "
                         "rank: the core cannot hold more components)")
    check_int(n_iter, "n_iter", 0)
    tol = _default_tol(kernel.dtype) if tol is None else _check_tol(tol)
    params = _hooi(kernel, int(ranks[0]), int(ranks[1]), int(n_iter), tol)
    return _returned(params, kernel, tucker_to_kernel, out_dtype, "core", norm)


@functools.partial(jax.jit, static_argnames=("r_in", "r_out"))
def _hooi(kernel: jax.Array, r_in: int, r_out: int, n_iter, tol):
    n = kernel.ndim - 2
    core = lambda u_in, u_out: jnp.einsum("...ab,ar,bs->...rs", kernel, u_in, u_out)  # noqa: E731

    def body(s):
        i, u_in, u_out, _, captured = s
        u_in = _leading(_unfold(jnp.einsum("...ab,bs->...as", kernel, u_out), n), r_in)
        u_out = _leading(_unfold(jnp.einsum("...ab,ar->...rb", kernel, u_in), n + 1), r_out)
        return i + 1, u_in, u_out, captured, jnp.linalg.norm(core(u_in, u_out))

    def cond(s):
        i, _, _, before, captured = s
        return (i < n_iter) & (captured - before > tol * captured)

    u_in, u_out = _leading(_unfold(kernel, n), r_in), _leading(_unfold(kernel, n + 1), r_out)
    start = (jnp.asarray(0), u_in, u_out, jnp.asarray(-1.0, kernel.dtype), jnp.linalg.norm(core(u_in, u_out)))
    _, u_in, u_out, _, _ = jax.lax.while_loop(cond, body, start)
    return {"factor_in": u_in, "core": core(u_in, u_out), "factor_out": u_out}


# ----------------------------------------------------------------------------- whole trees


def layer_key(key: jax.Array, path: Path) -> jax.Array:
    """The CP-ALS key of the layer at ``path``: ``key`` folded with a CRC-32 of its path string,
    so that a layer's init depends on its name alone, not on which other layers a tree holds or
    converts (a split by position did)."""
    return jax.random.fold_in(key, zlib.crc32(path_str(path).encode()))


RankRule = int | str | Callable[[Path, tuple[int, ...]], int | None]


def rank_for(rule: RankRule, path: Path, shape: tuple[int, ...], name: str = "rank_rule") -> int | None:
    """The CP rank ``rule`` gives the kernel of ``shape`` at ``path`` (None: keep it dense);
    ``name``: the caller's argument, for error messages."""
    if rule == "budget":
        try:
            return counting.cp_rank_for_budget(shape[-2], shape[-1], shape[:-2])
        except ValueError as e:
            raise ValueError(f"{name}='budget' at {path_str(path)!r} (kernel {shape}): {e}") from None
    if is_int(rule) and rule >= 1:
        return int(rule)
    if callable(rule):
        rank = rule(path, shape)
        if rank is not None and not is_positive_int(rank):
            raise ValueError(f"{name}({path_str(path)!r}, {shape}) returned {rank!r}: expected an int >= 1, or None "
                             "(keep that conv dense)")
        return None if rank is None else int(rank)
    raise ValueError(f"{name}={rule!r}: expected an int >= 1, 'budget' or a callable(path, kernel_shape) -> int | None")


def decompose_tree(
    params: Any,
    rank_rule: RankRule,
    *,
    key: jax.Array | None = None,
    **decompose_kwargs,
) -> tuple[dict, dict[str, float]]:
    """CP-decomposes every dense conv kernel (leaf ``"kernel"`` with >= 3 axes) of a tree.

    Naming: in the dict that holds the kernel, ``"kernel"`` is replaced by the CP leaves
    ``lambda``, ``factor_in``, ``factor_out``, ``factor_<m>`` (modes ``default_modes`` of the
    kernel's spatial rank, e.g. ``factor_h``, ``factor_w``; a 3-D kernel's ``factor_d``, where
    :func:`hocp_jax.conversion.dense_to_hocp` names the HO-CP models' ``factor_t``); other
    leaves (``"bias"``) stay.
    E.g. ``params["stem"]["conv"]["kernel"]`` -> ``params["stem"]["conv"]["factor_h"]``...
    Apply the result with :func:`hocp_jax.conv.cp_conv` or a ``CPConv`` at that path. To
    turn a dense model into its HO-CP twin (the CP leaves one level up, shortcuts kept
    dense) use :func:`hocp_jax.conversion.dense_to_hocp`.

    Args:
      params: parameter tree.
      rank_rule: an int (every kernel), ``"budget"`` (largest rank with no more parameters
        than the dense kernel, :func:`hocp_jax.counting.cp_rank_for_budget`), or
        ``callable(path, kernel_shape) -> rank`` (``None`` keeps that kernel dense).
      key: PRNG key, folded with each kernel's path (:func:`layer_key`).
      **decompose_kwargs: passed to :func:`decompose` (``n_iter``, ``tol``, ``init``...).

    Returns:
      ``(new_params, rel_errors)`` with ``rel_errors[path_str] = ||W - W_hat|| / ||W||``.
    """
    key = jax.random.key(0) if key is None else key
    check_key(key)
    out = to_dict(params)
    targets = [p for p, n in dense_leaves(out) if n == "kernel"]
    if not targets:
        raise ValueError("params: no dense conv kernel (leaf 'kernel' with >= 3 axes) to decompose")
    errors = {}
    for path in targets:
        node = get_at(out, path)
        rank = rank_for(rank_rule, path, tuple(np.shape(node["kernel"])))
        if rank is None:
            continue
        cp, err = decompose(node["kernel"], rank, key=layer_key(key, path), **decompose_kwargs)
        out = set_at(out, path, {n: v for n, v in node.items() if n != "kernel"} | cp)
        errors[path_str(path)] = err
    return out, errors
