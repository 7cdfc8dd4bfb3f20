r"""Higher-order transduction N-D -> (N+K)-D of a CP parameter tree (paper Sec. 4, Eq. 8).

:func:`transduce` adds a ``factor_<m>`` leaf per new mode to every CP layer (found by name,
see :mod:`hocp_jax.tree`); everything else is carried over (or inflated, for dense kernels).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hocp_jax.checks import is_positive_int
from hocp_jax.conv import RESERVED, mode_key
from hocp_jax.tree import dense_leaves, get_at, path_str, require_cp_layers, set_at, to_dict

INITS = ("ones", "delta", "mean")
DENSE_RULES = ("error", "keep", "inflate_center", "inflate_mean")
_MODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def check_new_modes(modes: Mapping[str, int], init: str) -> dict[str, int]:
    """``{mode name: kernel size}`` as plain ints if :func:`transduce` can add these modes with
    ``init``, else a ``ValueError`` naming ``modes`` (non-empty, identifier names that are not
    reserved, sizes >= 1, odd for ``init='delta'``)."""
    if not isinstance(modes, Mapping) or not modes:
        raise ValueError(f"modes={modes!r}: expected a non-empty dict {{mode_name: kernel_size}}, e.g. {{'t': 3}}")
    for m, k in modes.items():
        if not isinstance(m, str) or not _MODE_NAME.match(m) or m in RESERVED:
            raise ValueError(
                f"modes: invalid mode name {m!r}; expected an identifier such as 't', none of the reserved names {RESERVED}"
            )
        if not is_positive_int(k):
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
      init: ``"ones"`` (the paper's choice: each output frame sums the static CP responses
        of its K neighbours; the skip factor and the bias still apply to the frame itself),
        ``"delta"`` (centre tap 1, others 0; K odd: the transduced model reproduces
        frame-by-frame static predictions exactly), ``"mean"`` (1/K: the average of the CP
        responses, skip and bias as for ``"ones"``).
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
    modes = check_new_modes({"t": 3} if modes is None else modes, init)
    if dense not in DENSE_RULES:
        raise ValueError(f"dense={dense!r}: expected one of {DENSE_RULES}")
    out = to_dict(params)
    layers = require_cp_layers(out, "transduce")
    dense_weights = dense_leaves(out)
    if dense_weights and dense == "error":
        listed = ", ".join(f"'{path_str(p)}/{n}'" for p, n in dense_weights[:5])
        raise ValueError(
            f"params: {len(dense_weights)} non-CP conv weight(s) cannot gain a temporal factor ({listed}"
            f"{', ...' if len(dense_weights) > 5 else ''}); pass dense='keep' if the model applies them per frame, "
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
        out = set_at(out, path, new)
    if dense.startswith("inflate"):
        for path, name in dense_weights:
            node = dict(get_at(out, path))
            node[name] = _inflate(jnp.asarray(node[name]), list(modes.values()), dense)
            out = set_at(out, path, node)
    return out
