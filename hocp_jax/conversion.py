r"""Dense -> HO-CP conversion of a trained model (the paper's "decompose a pre-trained network").

:func:`dense_to_hocp` turns the variables of a dense model built from
:class:`hocp_jax.models.common.DenseConv` convs (e.g. ``get_model("resnet18")``) into the
variables of its HO-CP twin (``get_model("resnet18_hocp")``, same ``tiny``/width settings):

* every DenseConv with a spatial kernel larger than 1 — its params ``<name>/conv/kernel``
  ``(*K, C_in, C_out)`` — becomes the CPConv params ``<name>/{lambda, factor_in,
  factor_out, factor_h, factor_w}`` (CP-ALS, :func:`hocp_jax.decomposition.decompose`),
  with ``factor_t`` in front for a 3-D (video) kernel, as :class:`~hocp_jax.layers.CPConv`
  names its temporal mode (e.g. ``get_model("jester")`` -> ``get_model("jester_hocp")``);
  the HO-CP model's CPConv sits at ``<name>``, one level above the dense ``nn.Conv``;
* 1x1 DenseConvs (the ResNet's projection shortcuts) are kept dense, as the HO-CP model
  does by default (``shortcut="dense"``); ``shortcut="cp"`` decomposes them too;
* every other leaf (BatchNorm scales/biases, the head) and the whole ``batch_stats``
  collection are carried over unchanged: the converted convs compute (approximately) the
  same per-channel activations, so their statistics still apply.

The HO-CP model reads each layer's rank from the stored ``lambda``, so any rank applies; at
``rank="budget"`` the tree has exactly the shapes of ``get_model("resnet18_hocp")``'s
default init (the paper's equal-parameter rule, :func:`hocp_jax.counting.cp_rank_for_budget`).
The ResNets' convs are linear (``psi=None``), so their conversion is exact up to the CP fit;
``jester_hocp`` has a ReLU between factors (``psi="relu"``), so its converted model computes
something else than the dense one with the rebuilt kernels (a start for fine-tuning).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from hocp_jax.checks import check_key
from hocp_jax.conv import default_modes
from hocp_jax.decomposition import RankRule, decompose, layer_key, rank_for
from hocp_jax.tree import Path, get_at, path_str, set_at, to_dict, walk

SHORTCUT_RULES = ("dense", "cp")


def _dense_convs(params: Any) -> list[Path]:
    """Paths of DenseConv modules: dicts holding only ``{"conv": {"kernel": (*K, C_in, C_out)}}``;
    a ValueError naming one that holds more beside its kernel (a bias), which has no CP twin."""
    found = [(p, node["conv"]) for p, node in walk(params)
             if set(node) == {"conv"} and isinstance(node["conv"], Mapping) and "kernel" in node["conv"]
             and np.ndim(node["conv"]["kernel"]) >= 3]
    for path, conv in found:
        if set(conv) != {"kernel"}:
            raise ValueError(f"variables: the conv at '{path_str(path)}/conv' holds {sorted(set(conv) - {'kernel'})} "
                             "beside its kernel; dense_to_hocp converts the models' DenseConvs, which have no bias "
                             "(for other trees: hocp_jax.decomposition.decompose_tree keeps other leaves)")
    return [path for path, _ in found]


def cpconv_modes(n: int) -> tuple[str, ...]:
    """The modes of an n-D :class:`~hocp_jax.layers.CPConv` of the HO-CP models: ``("t", "h", "w")``
    for 3-D (its temporal mode ``t`` and 2-D spatial modes), else :func:`hocp_jax.conv.default_modes`."""
    return ("t", "h", "w") if n == 3 else default_modes(n)


def dense_to_hocp(
    variables: Mapping,
    rank: RankRule = "budget",
    *,
    shortcut: str = "dense",
    key: jax.Array | None = None,
    callback: Callable[[str, int, float], None] | None = None,
    **decompose_kwargs,
) -> tuple[dict, dict[str, float]]:
    """Converts a dense model's variables into its HO-CP twin's variables (see module docstring).

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of the dense model (other
        collections are carried over too).
      rank: an int (every converted conv), ``"budget"`` (equal parameter count, the HO-CP
        model's default), or ``callable(path, kernel_shape) -> int | None`` (None keeps that
        conv dense — the HO-CP model then cannot apply the tree).
      shortcut: ``"dense"`` keeps 1x1 convs dense (the HO-CP model's default), ``"cp"``
        decomposes them too (for ``get_model(..., shortcut="cp")``).
      key: PRNG key for the CP-ALS inits, folded with each layer's path
        (:func:`hocp_jax.decomposition.layer_key`: a layer's init does not depend on which
        other layers are converted).
      callback: progress on big models, ``callback(layer_path, sweeps_done, rel_error)``
        every ``report_every`` sweeps (default 50) of each layer's CP-ALS, e.g.
        ``lambda p, i, e: print(p, i, f"{e:.3f}")``.
      **decompose_kwargs: passed to :func:`hocp_jax.decomposition.decompose` (``n_iter``,
        ``report_every``...).

    Returns:
      ``(new_variables, rel_errors)``: plain nested dicts, and per converted conv (path
      ``"layer1_0/conv1"``) the relative reconstruction error ``||W - W_hat|| / ||W||``.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(f"variables: expected a dict with a 'params' collection, got "
                         f"{sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__}")
    if shortcut not in SHORTCUT_RULES:
        raise ValueError(f"shortcut={shortcut!r}: expected one of {SHORTCUT_RULES}")
    clash = sorted(set(decompose_kwargs) & {"modes", "key", "callback"})
    if clash:
        raise ValueError(f"{clash[0]}={decompose_kwargs[clash[0]]!r}: dense_to_hocp sets decompose's {clash} itself "
                         "(the HO-CP models' mode names; key and callback are its own arguments)")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback={callback!r}: expected None or callback(layer_path, sweeps_done, rel_error)")
    key = jax.random.key(0) if key is None else key
    check_key(key)
    params = to_dict(variables["params"])
    targets = []
    for path in _dense_convs(params):
        kernel = get_at(params, path + ("conv", "kernel"))
        if shortcut == "dense" and all(k == 1 for k in np.shape(kernel)[:-2]):
            continue
        targets.append((path, kernel))
    if not targets:
        raise ValueError("variables: no dense conv (a '<name>/conv/kernel' leaf with a spatial kernel > 1) to convert; "
                         "expected the variables of a dense model such as get_model('resnet18')")
    errors = {}
    for path, kernel in targets:
        r = rank_for(rank, path, tuple(np.shape(kernel)), name="rank")
        if r is None:
            continue
        report = None if callback is None else functools.partial(callback, path_str(path))
        cp, errors[path_str(path)] = decompose(kernel, r, modes=cpconv_modes(np.ndim(kernel) - 2),
                                               key=layer_key(key, path), callback=report, **decompose_kwargs)
        params = set_at(params, path, cp)
    return {**to_dict(variables), "params": params}, errors
