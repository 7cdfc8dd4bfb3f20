r"""Rank pruning of CP layers: drop the rank components whose ``lambda`` is (near) zero.

:func:`prune_rank` turns the exact zeros of the Lasso on lambda (:mod:`hocp_jax.optim`) into a
genuinely smaller tree; CP layers are found by name (:mod:`hocp_jax.tree`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from hocp_jax.checks import check_real
from hocp_jax.conv import mode_key
from hocp_jax.tree import (Path, check_cp_layer, get_at, layer_modes, n_params, path_str, require_cp_layers, set_at,
                           to_dict)

PSI_PREFIXES = ("bn_", "prelu_")


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


def _psi_subs(node: Mapping, rank: int, where: str) -> Iterator[tuple[str, Mapping]]:
    """``(name, sub_dict)`` of the Psi sub-modules (bn_*/prelu_*) of a CP layer's dict, every leaf
    checked to have the rank R as last axis."""
    for name, sub in node.items():
        if not (isinstance(sub, Mapping) and name.startswith(PSI_PREFIXES)):
            continue
        for leaf_name, leaf in sub.items():
            if np.ndim(leaf) < 1 or np.shape(leaf)[-1] != rank:
                raise ValueError(
                    f"{where}/{name}/{leaf_name}: shape {tuple(np.shape(leaf))} does not have the layer's rank R={rank} "
                    "as last axis; Psi sub-modules are expected to act on the R rank channels"
                )
        yield name, sub


def _slice_psi(node: Mapping, keep: np.ndarray, rank: int, where: str) -> dict:
    """Slices the per-rank Psi sub-modules (bn_*/prelu_*) of a CP layer's dict along their last axis."""
    return dict(node) | {name: {k: v[..., keep] for k, v in sub.items()} for name, sub in _psi_subs(node, rank, where)}


def psi_params_per_component(layer: Mapping, path: Path = ()) -> int:
    """Psi parameters (``bn_*``/``prelu_*`` leaves ``(..., R)``) of one rank channel of a CP layer:
    what :func:`prune_rank` removes from them per dropped component."""
    rank = check_cp_layer(layer, path)
    subs = _psi_subs(layer, rank, f"params at '{path_str(path)}'")
    return int(sum(np.size(leaf) // rank for _, sub in subs for leaf in sub.values()))


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
      batch_stats: the matching ``batch_stats`` tree (Psi BatchNorm statistics), needed when a
        layer with Psi batch norms loses components (else a ``ValueError``).

    Returns:
      ``(params, batch_stats, report)``; ``batch_stats`` is None when none was given.
    """
    check_real(threshold, "threshold")
    if batch_stats is not None and not isinstance(batch_stats, Mapping):
        raise ValueError(f"batch_stats={batch_stats!r:.100}: expected None or the (nested) dict of the model's "
                         "batch statistics, variables['batch_stats']")
    out = to_dict(params)
    stats = to_dict(batch_stats) if batch_stats is not None else None
    rows = []
    for path, layer in require_cp_layers(out, "prune_rank"):
        rank = check_cp_layer(layer, path)
        lam = np.abs(np.asarray(layer["lambda"]))
        if not np.all(np.isfinite(lam)):  # a diverged model: |nan| <= threshold is False, its components would go
            raise ValueError(f"params at '{path_str(path)}': lambda has non-finite entries "
                             f"{np.flatnonzero(~np.isfinite(lam)).tolist()}; expected finite values to prune by")
        keep = np.flatnonzero(lam > threshold)
        if keep.size == 0:
            keep = np.array([int(np.argmax(lam))])
        where = f"params at '{path_str(path)}'"
        new = _slice_psi(layer, keep, rank, where)
        new["lambda"] = layer["lambda"][keep]
        for k in ("factor_in", "factor_out") + tuple(mode_key(m) for m in layer_modes(layer)):
            new[k] = layer[k][:, keep]
        out = set_at(out, path, new)
        layer_stats = get_at(stats, path) if stats is not None else None
        norms = [n for n, sub in layer.items() if n.startswith("bn_") and isinstance(sub, Mapping)]
        lacking = [n for n in norms if not (isinstance(layer_stats, Mapping) and n in layer_stats)]
        if lacking and keep.size < rank:  # its running statistics would keep R entries: a stale model
            raise ValueError(
                f"batch_stats: the Psi batch norms {lacking} of the CP layer at '{path_str(path)}' lose rank channels, "
                f"but batch_stats has no statistics for them at that path (got "
                f"{'none' if stats is None else 'top-level keys ' + str(sorted(stats))}); pass "
                "batch_stats=variables['batch_stats']")
        if isinstance(layer_stats, Mapping):
            stats = set_at(stats, path, _slice_psi(layer_stats, keep, rank, f"batch_stats at '{path_str(path)}'"))
        rows.append(LayerPrune(path_str(path), rank, int(keep.size), n_params(layer), n_params(new)))
    return out, stats, PruneReport(tuple(rows), n_params(params), n_params(out))
