r"""Finding layers in a parameter tree by NAME: the conventions every tree transform shares.

A parameter tree is a nested dict / ``FrozenDict`` — a single layer's dict or a whole Flax
model's ``"params"`` collection. Layers are found by the names of their leaves, never by
position:

* a **CP layer** is a dict holding ``"lambda"``, ``"factor_in"`` and ``"factor_out"``
  (plus ``"factor_<mode>"`` leaves, optional ``"factor_skip"``/``"bias"``, and the Psi
  sub-modules ``bn_<stage>``/``prelu_<stage>`` of :class:`hocp_jax.layers.CPConv`).
  The CP tensor regression layer has no ``factor_in`` and is therefore *not* a CP layer.
* a **Tucker layer** is a dict holding ``"core"``, ``"factor_in"`` and ``"factor_out"``.
* a **dense conv kernel** is a leaf named ``"kernel"`` with >= 3 axes ``(*K, C_in, C_out)``
  (Flax ``nn.Conv``; ``nn.Dense`` kernels are 2-D and are ignored); a ``"depthwise"`` leaf
  ``(*K, R)`` is a depthwise conv kernel.

Paths are tuples of keys, printed as ``"layer1_0/conv1"``. Users of these helpers:
:mod:`hocp_jax.transduction`, :mod:`hocp_jax.pruning`, :mod:`hocp_jax.decomposition`,
:mod:`hocp_jax.optim`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from hocp_jax.conv import RESERVED, mode_key

Path = tuple[str, ...]
CP_KEYS = ("lambda", "factor_in", "factor_out")
TUCKER_KEYS = ("core", "factor_in", "factor_out")


def to_dict(tree: Any) -> Any:
    """Recursively converts Mappings (``FrozenDict`` included) to plain dicts; leaves untouched."""
    if isinstance(tree, Mapping):
        return {k: to_dict(v) for k, v in tree.items()}
    return tree


def path_str(path: Path) -> str:
    """``("layer1_0", "conv1")`` -> ``"layer1_0/conv1"`` (``"<root>"`` for the empty path)."""
    return "/".join(str(p) for p in path) or "<root>"


def _contents(node: Any) -> str:
    """``"keys [...]"`` (the first 10) of a Mapping, else ``"a <type>"``: what an error found."""
    return f"keys {sorted(map(str, node))[:10]}" if isinstance(node, Mapping) else f"a {type(node).__name__}"


def is_cp_layer(node: Any) -> bool:
    return isinstance(node, Mapping) and all(k in node for k in CP_KEYS)


def is_tucker_layer(node: Any) -> bool:
    return isinstance(node, Mapping) and all(k in node for k in TUCKER_KEYS)


def walk(tree: Any, path: Path = ()) -> Iterator[tuple[Path, Mapping]]:
    """Yields ``(path, node)`` for every Mapping node, depth first, not entering CP/Tucker layers."""
    if not isinstance(tree, Mapping):
        return
    yield path, tree
    if is_cp_layer(tree) or is_tucker_layer(tree):
        return
    for k, v in tree.items():
        yield from walk(v, path + (k,))


def layer_modes(layer: Mapping) -> tuple[str, ...]:
    """Mode names of a CP layer: ``m`` for every ``factor_<m>`` leaf other than in/out/skip."""
    return tuple(k[len("factor_"):] for k in layer if k.startswith("factor_") and k[len("factor_"):] not in RESERVED)


def check_cp_layer(layer: Mapping, path: Path = ()) -> int:
    """Validates one CP layer's leaves and returns its rank R (= ``len(lambda)``)."""
    where = f"params at '{path_str(path)}'"
    if not is_cp_layer(layer):
        raise ValueError(f"{where}: expected a CP layer (a dict with keys {CP_KEYS}), got {_contents(layer)}")
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
    return {p for p, n in walk(params) if is_cp_layer(n)}


def cp_layers(params: Any) -> list[tuple[Path, Mapping]]:
    """All CP layers of ``params`` as ``(path, layer_dict)``, validated (rank consistency)."""
    found = [(p, n) for p, n in walk(params) if is_cp_layer(n)]
    for p, n in found:
        check_cp_layer(n, p)
    return found


def require_cp_layers(params: Any, what: str) -> list[tuple[Path, Mapping]]:
    """:func:`cp_layers`, raising a ValueError naming ``what`` when the tree holds none."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params: expected a (nested) dict of parameters, got {type(params).__name__}")
    layers = cp_layers(params)
    if not layers:
        raise ValueError(
            f"params: {what} found no CP layer (a dict with keys {CP_KEYS}) in a tree with top-level keys "
            f"{sorted(map(str, params))[:10]}"
        )
    return layers


def dense_leaves(params: Any) -> list[tuple[Path, str]]:
    """``(layer_path, leaf_name)`` of every non-CP conv weight: dense kernels, Tucker cores, depthwise."""
    out = []
    for p, node in walk(params):
        if is_cp_layer(node):
            continue
        if is_tucker_layer(node):
            out.append((p, "core"))
            continue
        if np.ndim(node.get("kernel")) >= 3:
            out.append((p, "kernel"))
        if np.ndim(node.get("depthwise")) >= 2:
            out.append((p, "depthwise"))
    return out


def get_at(tree: Any, path: Path) -> Any:
    """``tree[path[0]][path[1]]...``, or None when a key is missing."""
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def set_at(tree: dict, path: Path, value: Any) -> dict:
    """Returns ``tree`` with ``tree[path] = value`` (dicts on the path are copied, ``tree`` is not modified);
    a ValueError where a key of ``path`` is not in the tree."""
    if not path:
        return value
    if not (isinstance(tree, Mapping) and path[0] in tree):
        raise ValueError(f"path: key {path[0]!r} not in the tree (got {_contents(tree)} there)")
    out = dict(tree)
    out[path[0]] = set_at(tree[path[0]], path[1:], value)
    return out


def n_params(tree: Any) -> int:
    """Number of scalars over all leaves of ``tree``."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))
