r"""Parameter-tree transforms: transduction, rank pruning, CP decomposition of dense kernels.

Every function takes a (nested dict / ``FrozenDict``) parameter tree — a single layer's
dict or a whole Flax model's ``"params"`` collection — and returns plain nested dicts.
Layers are found by NAME (paths of dict keys), never by position:

* a **CP layer** is a dict holding ``"lambda"``, ``"factor_in"`` and ``"factor_out"``
  (plus ``"factor_<mode>"`` leaves, optional ``"factor_skip"``/``"bias"``, and the Psi
  sub-modules ``bn_<stage>``/``prelu_<stage>`` of :class:`hocp_jax.layers.CPConv`).
  The CP tensor regression layer has no ``factor_in`` and is therefore *not* a CP layer:
  it is carried over unchanged by every transform here.
* a **Tucker layer** is a dict holding ``"core"``, ``"factor_in"`` and ``"factor_out"``.
* a **dense conv kernel** is a leaf named ``"kernel"`` with >= 3 axes ``(*K, C_in, C_out)``
  (Flax ``nn.Conv``; ``nn.Dense`` kernels are 2-D and are ignored); a ``"depthwise"`` leaf
  ``(*K, R)`` is a depthwise conv kernel.

Paths are tuples of keys, printed as ``"layer1_0/conv1"``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hocp_jax import counting
from hocp_jax.conv import RESERVED, cp_to_kernel, default_modes, mode_key

Path = tuple[str, ...]
CP_KEYS = ("lambda", "factor_in", "factor_out")
INITS = ("ones", "delta", "mean")
DENSE_RULES = ("error", "keep", "inflate_center", "inflate_mean")
PSI_PREFIXES = ("bn_", "prelu_")
_MODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


# ----------------------------------------------------------------------------- tree walking


def to_dict(tree: Any) -> Any:
    """Recursively converts Mappings (``FrozenDict`` included) to plain dicts; leaves untouched."""
    if isinstance(tree, Mapping):
        return {k: to_dict(v) for k, v in tree.items()}
    return tree


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def is_cp_layer(node: Any) -> bool:
    return isinstance(node, Mapping) and all(k in node for k in CP_KEYS)


def _walk(tree: Any, path: Path = ()):
    """Yields ``(path, node)`` for every Mapping node, depth first, not entering CP/Tucker layers."""
    if not isinstance(tree, Mapping):
        return
    yield path, tree
    if is_cp_layer(tree) or _is_tucker(tree):
        return
    for k, v in tree.items():
        yield from _walk(v, path + (k,))


def _is_tucker(node: Mapping) -> bool:
    return all(k in node for k in ("core", "factor_in", "factor_out"))


def layer_modes(layer: Mapping) -> tuple[str, ...]:
    """Mode names of a CP layer: ``m`` for every ``factor_<m>`` leaf other than in/out/skip."""
    return tuple(k[len("factor_"):] for k in layer if k.startswith("factor_") and k[len("factor_"):] not in RESERVED)


def check_cp_layer(layer: Mapping, path: Path = ()) -> int:
    """Validates one CP layer's leaves and returns its rank R (= ``len(lambda)``)."""
    where = f"params at '{path_str(path)}'"
    lam = layer["lambda"]
    if getattr(lam, "ndim", None) != 1 or lam.shape[0] < 1:
        raise ValueError(f"{where}: 'lambda' has shape {tuple(np.shape(lam))}, expected (R,) with R >= 1")
    rank = int(lam.shape[0])
    for k in ("factor_in", "factor_out") + tuple(mode_key(m) for m in layer_modes(layer)):
        shape = tuple(np.shape(layer[k]))
        if len(shape) != 2 or shape[1] != rank:
            raise ValueError(
                f"{where}: '{k}' has shape {shape} but 'lambda' has R={rank} components (rank mismatch); "
                f"expected (size, {rank})"
            )
    return rank


def cp_layer_paths(params: Any) -> set[Path]:
    """Paths of the CP layers, unvalidated (non-array leaves such as optax's MaskedNode are fine)."""
    return {p for p, n in _walk(params) if is_cp_layer(n)}


def cp_layers(params: Any) -> list[tuple[Path, Mapping]]:
    """All CP layers of ``params`` as ``(path, layer_dict)``, validated (rank consistency)."""
    found = [(p, n) for p, n in _walk(params) if is_cp_layer(n)]
    for p, n in found:
        check_cp_layer(n, p)
    return found


def require_cp_layers(params: Any, what: str) -> list[tuple[Path, Mapping]]:
    if not isinstance(params, Mapping):
        raise ValueError(f"params: expected a (nested) dict of parameters, got {type(params).__name__}")
    layers = cp_layers(params)
    if not layers:
        raise ValueError(
            f"params: {what} found no CP layer (a dict with keys {CP_KEYS}) in a tree with top-level keys "
            f"{sorted(map(str, params))[:10]}"
        )
    return layers


def _get(tree: Any, path: Path) -> Any:
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _set(tree: dict, path: Path, value: Any) -> dict:
    """Returns ``tree`` with ``tree[path] = value`` (dicts on the path are copied)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out


def _n_params(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------- transduction


def _check_new_modes(modes: Mapping[str, int], init: str) -> dict[str, int]:
    if not isinstance(modes, Mapping) or not modes:
        raise ValueError(f"modes={modes!r}: expected a non-empty dict {{mode_name: kernel_size}}, e.g. {{'t': 3}}")
    for m, k in modes.items():
        if not isinstance(m, str) or not _MODE_NAME.match(m) or m in RESERVED:
            raise ValueError(
                f"modes: invalid mode name {m!r}; expected an identifier such as 't', none of the reserved names {RESERVED}"
            )
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"modes[{m!r}]={k!r}: expected a kernel size int >= 1")
        if init == "delta" and k % 2 == 0:
            raise ValueError(f"modes[{m!r}]={k}: init='delta' needs an odd kernel size (a centre tap)")
    return {m: int(k) for m, k in modes.items()}


def _new_factor(k: int, rank: int, init: str, dtype) -> jax.Array:
    if init == "ones":
        return jnp.ones((k, rank), dtype)
    if init == "mean":
        return jnp.full((k, rank), 1.0 / k, dtype)
    return jnp.zeros((k, rank), dtype).at[k // 2].set(1.0)


def _inflate(w: jax.Array, sizes: Sequence[int], rule: str) -> jax.Array:
    """Prepends one axis per new mode: centre tap (``inflate_center``) or repeat / prod K (``inflate_mean``)."""
    sizes = tuple(sizes)
    if rule == "inflate_mean":
        return jnp.broadcast_to(w, sizes + w.shape) / float(np.prod(sizes))
    if any(k % 2 == 0 for k in sizes):
        raise ValueError(f"modes: dense='inflate_center' needs odd kernel sizes, got {sizes}")
    return jnp.zeros(sizes + w.shape, w.dtype).at[tuple(k // 2 for k in sizes)].set(w)


def _dense_leaves(params: Any) -> list[tuple[Path, str]]:
    """``(layer_path, leaf_name)`` of every non-CP conv weight: dense kernels, Tucker cores, depthwise."""
    out = []
    for p, node in _walk(params):
        if is_cp_layer(node):
            continue
        if _is_tucker(node):
            out.append((p, "core"))
            continue
        if np.ndim(node.get("kernel")) >= 3:
            out.append((p, "kernel"))
        if np.ndim(node.get("depthwise")) >= 2:
            out.append((p, "depthwise"))
    return out


def transduce(params: Any, modes: Mapping[str, int] | None = None, init: str = "ones", *, dense: str = "error") -> dict:
    """Higher-order transduction N-D -> (N+K)-D (paper Sec. 4, Eq. 8).

    Adds ``factor_<m>`` of shape ``(K_m, R)`` for every new mode ``m`` to EVERY CP layer of
    the tree (``R = len(lambda)`` of that layer). All other leaves (BatchNorm params, heads,
    TRL, Psi sub-modules) are carried over unchanged. BatchNorm *statistics* need no
    transform either: the transduced layers produce per-channel activations with the same
    meaning, so the static ``batch_stats`` collection is used as is.

    Per-mode stride/padding/dilation are not parameters: they belong to the module applying
    the tree (``CPConv.temporal_*``; new modes come first in the input layout, e.g.
    ``(B, T, H, W, C)``).

    Args:
      params: parameter tree (dict or FrozenDict) holding at least one CP layer.
      modes: ``{mode_name: kernel_size}``, default ``{"t": 3}``. A name already present in a
        layer, or one of ``("in", "out", "skip")``, is refused.
      init: ``"ones"`` (the paper's choice: each output frame sums the static responses of
        its K neighbours), ``"delta"`` (centre tap 1, others 0; K odd: the transduced model
        reproduces frame-by-frame static predictions exactly), ``"mean"`` (1/K: the average).
      dense: what to do with non-CP conv weights (dense ``kernel`` >= 3-D, Tucker ``core``,
        ``depthwise``), which cannot gain a factor:
        ``"error"`` (default) refuses them; ``"keep"`` leaves them unchanged — correct when the
        model applies them frame by frame (e.g. the HO-CP ResNet's dense 1x1 shortcuts: Flax's
        ``nn.Conv`` treats extra leading axes as batch); ``"inflate_center"`` prepends the new
        axes with the old weight at the centre tap and zeros elsewhere (I3D-style inflation
        that, like ``delta``, preserves per-frame outputs; K odd); ``"inflate_mean"`` repeats
        the weight along the new axes divided by prod K (I3D's "boring video" rule). The
        inflated weights need a module with the bigger kernel to apply them.

    Returns:
      A new plain nested dict.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}: expected one of {INITS}")
    modes = _check_new_modes({"t": 3} if modes is None else modes, init)
    if dense not in DENSE_RULES:
        raise ValueError(f"dense={dense!r}: expected one of {DENSE_RULES}")
    out = to_dict(params)
    layers = require_cp_layers(out, "transduce")
    dense_leaves = _dense_leaves(out)
    if dense_leaves and dense == "error":
        listed = ", ".join(f"'{path_str(p)}/{n}'" for p, n in dense_leaves[:5])
        raise ValueError(
            f"params: {len(dense_leaves)} non-CP conv weight(s) cannot gain a temporal factor ({listed}"
            f"{', ...' if len(dense_leaves) > 5 else ''}); pass dense='keep' if the model applies them per frame, "
            "or dense='inflate_center'/'inflate_mean' to inflate them"
        )
    for path, layer in layers:
        present = [m for m in modes if mode_key(m) in layer]
        if present:
            raise ValueError(
                f"modes: layer '{path_str(path)}' already has mode(s) {present} (leaves {[mode_key(m) for m in present]})"
            )
        new = dict(layer)
        rank, dtype = layer["lambda"].shape[0], layer["lambda"].dtype
        for m, k in modes.items():
            new[mode_key(m)] = _new_factor(k, rank, init, dtype)
        out = _set(out, path, new)
    if dense.startswith("inflate"):
        for path, name in dense_leaves:
            node = dict(_get(out, path))
            node[name] = _inflate(jnp.asarray(node[name]), list(modes.values()), dense)
            out = _set(out, path, node)
    return out


# ----------------------------------------------------------------------------- rank pruning


@dataclasses.dataclass(frozen=True)
class LayerPrune:
    """One CP layer: ``params_*`` count every leaf of the layer (factors, lambda, skip, bias, Psi)."""

    path: str
    rank_before: int
    rank_after: int
    params_before: int
    params_after: int


@dataclasses.dataclass(frozen=True)
class PruneReport:
    """Per-layer ranks and parameter counts; ``params_*`` totals count the whole tree."""

    layers: tuple[LayerPrune, ...]
    params_before: int
    params_after: int

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after


def _slice_psi(node: Mapping, keep: np.ndarray, rank: int, where: str) -> dict:
    """Slices the per-rank Psi sub-modules (bn_*/prelu_*) of a CP layer's dict along their last axis."""
    out = dict(node)
    for name, sub in node.items():
        if not (isinstance(sub, Mapping) and name.startswith(PSI_PREFIXES)):
            continue
        new_sub = {}
        for leaf_name, leaf in sub.items():
            if np.ndim(leaf) < 1 or np.shape(leaf)[-1] != rank:
                raise ValueError(
                    f"{where}/{name}/{leaf_name}: shape {tuple(np.shape(leaf))} does not have the layer's rank R={rank} "
                    "as last axis; Psi sub-modules are expected to act on the R rank channels"
                )
            new_sub[leaf_name] = leaf[..., keep]
        out[name] = new_sub
    return out


def prune_rank(params: Any, threshold: float = 0.0, batch_stats: Any = None) -> tuple[dict, dict | None, PruneReport]:
    """Drops the rank components with ``|lambda| <= threshold`` from every CP layer.

    All factors of a layer (``factor_in``, ``factor_out``, every ``factor_<mode>``) lose the
    same columns and ``lambda`` the same entries; ``factor_skip`` and ``bias`` are kept. The
    Psi sub-modules of :class:`~hocp_jax.layers.CPConv` (``bn_<stage>``, ``prelu_<stage>``)
    act on the R rank channels, so their params and their ``batch_stats`` are sliced too.
    At least one component (the largest ``|lambda|``) is kept per layer.

    Exactness: a component whose lambda is exactly 0 contributes nothing to the output (with
    or without Psi, which acts before the lambda-weighted output contraction), so the pruned
    model's outputs equal those of the unpruned model with those lambdas zeroed, up to float
    summation order. With ``threshold > 0`` the dropped components' (small) contributions
    are removed. Output shapes depend on values: not jittable.

    Args:
      params: parameter tree with at least one CP layer.
      threshold: >= 0.
      batch_stats: optional matching ``batch_stats`` tree (Psi BatchNorm statistics).

    Returns:
      ``(params, batch_stats, report)``; ``batch_stats`` is None when none was given.
    """
    if not isinstance(threshold, (int, float, np.floating, np.integer)) or not threshold >= 0:
        raise ValueError(f"threshold={threshold!r}: expected a number >= 0")
    out = to_dict(params)
    stats = to_dict(batch_stats) if batch_stats is not None else None
    rows = []
    for path, layer in require_cp_layers(out, "prune_rank"):
        rank = check_cp_layer(layer, path)
        lam = np.abs(np.asarray(layer["lambda"]))
        keep = np.flatnonzero(lam > threshold)
        if keep.size == 0:
            keep = np.array([int(np.argmax(lam))])
        where = f"params at '{path_str(path)}'"
        new = _slice_psi(layer, keep, rank, where)
        new["lambda"] = layer["lambda"][keep]
        for k in ("factor_in", "factor_out") + tuple(mode_key(m) for m in layer_modes(layer)):
            new[k] = layer[k][:, keep]
        out = _set(out, path, new)
        layer_stats = _get(stats, path) if stats is not None else None
        if isinstance(layer_stats, Mapping):
            stats = _set(stats, path, _slice_psi(layer_stats, keep, rank, f"batch_stats at '{path_str(path)}'"))
        rows.append(LayerPrune(path_str(path), rank, int(keep.size), _n_params(layer), _n_params(new)))
    return out, stats, PruneReport(tuple(rows), _n_params(params), _n_params(out))


# ----------------------------------------------------------------------------- CP decomposition


def _unfold(x: jax.Array, n: int) -> jax.Array:
    return jnp.moveaxis(x, n, 0).reshape(x.shape[n], -1)


def _mttkrp(x: jax.Array, factors: Sequence[jax.Array], n: int) -> jax.Array:
    """``X_(n) (Khatri-Rao of the other factors)``: ``(I_n, R)``, via one einsum."""
    letters = "abcdefghijklmnopq"[: x.ndim]
    ops = [f for i, f in enumerate(factors) if i != n]
    spec = letters + "," + ",".join(f"{letters[i]}z" for i in range(x.ndim) if i != n) + f"->{letters[n]}z"
    return jnp.einsum(spec, x, *ops)


@jax.jit
def _cp_als(x: jax.Array, factors: list[jax.Array], n_iter, tol, ridge):
    """Jitted CP-ALS. Returns normalised factors, lambda and the number of sweeps run."""
    norm_x2 = jnp.sum(x * x)
    eye = jnp.eye(factors[0].shape[1], dtype=x.dtype)

    def sweep(factors):
        factors = list(factors)
        lam = jnp.ones(factors[0].shape[1], x.dtype)
        for n in range(x.ndim):
            gram = jnp.ones_like(eye)
            for i, f in enumerate(factors):
                if i != n:
                    gram = gram * (f.T @ f)
            gram = gram + ridge * jnp.mean(jnp.diag(gram)) * eye
            m = _mttkrp(x, factors, n)
            a = jax.scipy.linalg.solve(gram, m.T, assume_a="pos").T
            lam = jnp.linalg.norm(a, axis=0)
            factors[n] = a / jnp.where(lam > 0, lam, 1.0)
        # squared error from the last mode's quantities (no reconstruction needed)
        fit = jnp.sum(m * factors[-1] * lam)
        gram_all = jnp.ones_like(eye)
        for f in factors:
            gram_all = gram_all * (f.T @ f)
        err2 = norm_x2 - 2 * fit + lam @ gram_all @ lam
        return tuple(factors), lam, jnp.sqrt(jnp.maximum(err2, 0.0) / norm_x2)

    def cond(state):
        i, _, _, err, prev = state
        return (i < n_iter) & (jnp.abs(prev - err) > tol)

    def body(state):
        i, f, _, err, _ = state
        f, lam, new_err = sweep(f)
        return i + 1, f, lam, new_err, err

    r = factors[0].shape[1]
    init = (0, tuple(factors), jnp.ones(r, x.dtype), jnp.asarray(jnp.inf, x.dtype), jnp.asarray(-jnp.inf, x.dtype))
    i, f, lam, _, _ = jax.lax.while_loop(cond, body, init)
    return list(f), lam, i


def decompose(
    kernel: jax.Array,
    rank: int,
    *,
    modes: Sequence[str] | None = None,
    n_iter: int = 500,
    tol: float = 1e-10,
    key: jax.Array | None = None,
    init: str = "svd",
    ridge: float = 1e-9,
) -> tuple[dict[str, jax.Array], float]:
    """CP decomposition (ALS) of a dense conv kernel into the repo's CP parameter dict.

    ``kernel (*K, C_in, C_out)`` ~= ``cp_to_kernel(cp, modes)``. ALS: each sweep solves, for
    every mode n, the least-squares problem ``A_n V = X_(n) KR(others)`` where ``V`` is the
    Hadamard product of the other factors' Gram matrices (plus ``ridge * mean(diag V) * I``),
    then normalises the columns into lambda. Stops after ``n_iter`` sweeps or when the
    relative error changes by less than ``tol``. Runs in the kernel's dtype (use float64
    via ``jax.enable_x64`` for tight fits).

    Args:
      kernel: ``(*K, C_in, C_out)`` with at least one spatial axis.
      rank: R >= 1.
      modes: names of the kernel's spatial axes (default :func:`hocp_jax.conv.default_modes`).
      init: ``"svd"`` (leading left singular vectors of each unfolding, padded with random
        columns when R exceeds the mode size) or ``"random"`` (standard normal).
      key: PRNG key for the random parts of the init (default ``jax.random.key(0)``).

    Returns:
      ``(cp_params, rel_error)``: ``{"lambda", "factor_in", "factor_out", "factor_<m>"...}``
      and ``||W - W_hat||_F / ||W||_F`` computed from the reconstructed kernel.
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 3:
        raise ValueError(f"kernel: got shape {tuple(kernel.shape)}, expected (*K, C_in, C_out) with >= 1 spatial axis")
    n_sp = kernel.ndim - 2
    modes = tuple(modes) if modes is not None else default_modes(n_sp)
    if len(modes) != n_sp or len(set(modes)) != n_sp or any(m in RESERVED for m in modes):
        raise ValueError(f"modes={modes!r}: expected {n_sp} distinct names (none of {RESERVED}) for kernel {tuple(kernel.shape)}")
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank={rank!r}: expected an int >= 1")
    if init not in ("svd", "random"):
        raise ValueError(f"init={init!r}: expected 'svd' or 'random'")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        kernel = kernel.astype(jnp.float32)
    if not float(jnp.linalg.norm(kernel)) > 0:
        raise ValueError(f"kernel: its Frobenius norm is {float(jnp.linalg.norm(kernel))}; expected a finite nonzero kernel")
    key = jax.random.key(0) if key is None else key
    keys = jax.random.split(key, kernel.ndim)
    factors = []
    for n, k in enumerate(keys):
        rand = jax.random.normal(k, (kernel.shape[n], rank), kernel.dtype)
        if init == "svd":
            u = jnp.linalg.svd(_unfold(kernel, n), full_matrices=False)[0][:, :rank]
            rand = rand.at[:, : u.shape[1]].set(u)
        factors.append(rand)
    factors, lam, _ = _cp_als(kernel, factors, int(n_iter), tol, ridge)
    cp = {"lambda": lam, "factor_in": factors[-2], "factor_out": factors[-1]}
    cp |= {mode_key(m): f for m, f in zip(modes, factors[:n_sp])}
    rel = float(jnp.linalg.norm(cp_to_kernel(cp, modes) - kernel) / jnp.linalg.norm(kernel))
    return cp, rel


RankRule = int | str | Callable[[Path, tuple[int, ...]], int | None]


def _rank_for(rule: RankRule, path: Path, shape: tuple[int, ...]) -> int | None:
    if rule == "budget":
        return counting.cp_rank_for_budget(shape[-2], shape[-1], shape[:-2])
    if isinstance(rule, (int, np.integer)) and not isinstance(rule, bool):
        return int(rule)
    if callable(rule):
        return rule(path, shape)
    raise ValueError(f"rank_rule={rule!r}: expected an int, 'budget' or a callable(path, kernel_shape) -> int | None")


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
    kernel's spatial rank, e.g. ``factor_h``, ``factor_w``); other leaves (``"bias"``) stay.
    E.g. ``params["stem"]["conv"]["kernel"]`` -> ``params["stem"]["conv"]["factor_h"]``...
    Apply the result with :func:`hocp_jax.conv.cp_conv` or a ``CPConv`` at that path.

    Args:
      params: parameter tree.
      rank_rule: an int (every kernel), ``"budget"`` (largest rank with no more parameters
        than the dense kernel, :func:`hocp_jax.counting.cp_rank_for_budget`), or
        ``callable(path, kernel_shape) -> rank`` (``None`` keeps that kernel dense).
      key: PRNG key, split per kernel.
      **decompose_kwargs: passed to :func:`decompose` (``n_iter``, ``tol``, ``init``...).

    Returns:
      ``(new_params, rel_errors)`` with ``rel_errors[path_str] = ||W - W_hat|| / ||W||``.
    """
    out = to_dict(params)
    targets = [(p, n) for p, n in _dense_leaves(out) if n == "kernel"]
    if not targets:
        raise ValueError("params: no dense conv kernel (leaf 'kernel' with >= 3 axes) to decompose")
    key = jax.random.key(0) if key is None else key
    errors = {}
    for (path, _), k in zip(targets, jax.random.split(key, len(targets))):
        node = _get(out, path)
        shape = tuple(np.shape(node["kernel"]))
        rank = _rank_for(rank_rule, path, shape)
        if rank is None:
            continue
        cp, err = decompose(node["kernel"], rank, key=k, **decompose_kwargs)
        new = {n: v for n, v in node.items() if n != "kernel"} | cp
        out = _set(out, path, new)
        errors[path_str(path)] = err
    return out, errors
