r"""Optimisation pieces for transduction and automatic rank selection (paper Sec. 4-5).

* Name-based masks: :func:`leaf_category` / :func:`label_params` classify every leaf of a
  parameter tree as ``"temporal"`` (``factor_<m>`` of a CP layer, ``m`` in
  ``temporal_modes``), ``"spatial"`` (any other ``factor_<m>`` mode factor of a CP layer),
  ``"lambda"`` (a CP layer's ``lambda``) or ``"other"`` (everything else: ``factor_in``,
  ``factor_out``, skip, bias, BatchNorm, heads, TRL — the TRL's ``lambda`` included).
  CP layers are found by name as in :mod:`hocp_jax.tree`. Trees of ``nnx.Variable`` (an
  ``nnx.State``, what ``nnx.Optimizer`` gives ``tx.init``) are named like their pure dicts:
  the variable's trailing ``.value`` key is dropped.
* :func:`masked_optimizer` freezes leaves with ``optax.partition`` + ``optax.set_to_zero``
  (frozen leaves get no optimizer state and zero updates, so they keep their values, bitwise
  but for a -0.0, which ``x + 0.0`` makes +0.0; weight decay included);
  :func:`transduction_stages` builds the paper's two-stage schedule.
* Lasso on the CP conv layers' lambdas (the paper's automatic rank selection):
  :func:`l1_lambda` (penalty), :func:`soft_threshold_lambdas` (the proximal step as a
  function of a params tree) / :func:`prox_l1_lambdas` (the same as an optax transform to
  chain after the optimizer: exact zeros), :func:`sparsity_report` / :func:`plot_sparsity` (supplementary Fig. 3, Table 1).
  Only CP *conv* lambdas are regularised — the paper penalises "the rank of each of the
  factorized higher-order convolutions"; the TRL's lambda is left alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hocp_jax.checks import check_real
from hocp_jax.conv import RESERVED
from hocp_jax.pruning import psi_params_per_component
from hocp_jax.tree import Path, cp_layer_paths, layer_modes, path_str, require_cp_layers

CATEGORIES = ("temporal", "spatial", "lambda", "other")
TRAINABLE_PRESETS = ("temporal", "spatial", "lambda", "all")

Trainable = str | Sequence[str] | Callable[[Path], bool]


# ----------------------------------------------------------------------------- name-based masks


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _leaf_path(kpath) -> Path:
    """Names of a ``tree_flatten_with_path`` key path, without an ``nnx.Variable``'s trailing ``.value``."""
    if kpath and isinstance(kpath[-1], jax.tree_util.GetAttrKey) and kpath[-1].name == "value":
        kpath = kpath[:-1]
    return tuple(_key_name(k) for k in kpath)


def _cp_paths(tree: Any) -> set[Path]:
    """The CP layers' paths as :func:`_leaf_path` names them: every key a string (``nnx.Sequential``'s
    and lists' layers sit under int keys, which a key path names as strings too)."""
    return {tuple(str(k) for k in path) for path in cp_layer_paths(tree)}


def _check_temporal_modes(temporal_modes: Sequence[str]) -> tuple[str, ...]:
    """``temporal_modes`` as a tuple of mode names (none of ``RESERVED``), else a ValueError."""
    modes = None if isinstance(temporal_modes, str) else tuple(temporal_modes)
    if modes is None or any(not isinstance(m, str) or m in RESERVED for m in modes):
        raise ValueError(
            f"temporal_modes={temporal_modes!r}: expected a tuple of mode names (e.g. ('t',)), none of {RESERVED}"
        )
    return modes


def leaf_category(path: Path, cp_paths: set[Path], temporal_modes: Sequence[str] = ("t",)) -> str:
    """Category (one of ``CATEGORIES``) of the leaf at ``path`` given the CP layer paths."""
    temporal_modes = _check_temporal_modes(temporal_modes)
    if len(path) < 1 or path[:-1] not in cp_paths:
        return "other"
    name = path[-1]
    if name == "lambda":
        return "lambda"
    if name.startswith("factor_"):
        mode = name[len("factor_"):]
        if mode in temporal_modes:
            return "temporal"
        if mode not in RESERVED:
            return "spatial"
    return "other"


def _selector(trainable: Trainable) -> Callable[[Path, str], bool]:
    if callable(trainable):
        return lambda path, cat: bool(trainable(path))
    names = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    bad = [n for n in names if n not in TRAINABLE_PRESETS]
    if bad or not names:
        raise ValueError(
            f"trainable={trainable!r}: expected one of {TRAINABLE_PRESETS}, a tuple of them, or a callable(path) -> bool"
        )
    if "all" in names:
        return lambda path, cat: True
    return lambda path, cat: cat in names


def label_params(params: Any, trainable: Trainable = "all", temporal_modes: Sequence[str] = ("t",)) -> Any:
    """Pytree (same structure as ``params``) of ``"trainable"`` / ``"frozen"`` labels.

    Args:
      params: parameter tree (dict, FrozenDict or ``nnx.State``).
      trainable: ``"temporal"`` | ``"spatial"`` | ``"lambda"`` | ``"all"``, a tuple of these
        (union), or ``callable(path: tuple[str, ...]) -> bool``.
      temporal_modes: mode names counted as temporal (default ``("t",)``); a tuple, none of
        ``"in"``, ``"out"``, ``"skip"``.
    """
    select = _selector(trainable)
    temporal_modes = _check_temporal_modes(temporal_modes)
    cp = _cp_paths(params)

    def label(kpath, _):
        path = _leaf_path(kpath)
        return "trainable" if select(path, leaf_category(path, cp, temporal_modes)) else "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


def _check_tx(tx, name: str) -> None:
    """ValueError naming ``name`` unless ``tx`` is an optax.GradientTransformation (has ``init`` and ``update``)."""
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        hint = " (an optimizer factory: call it, e.g. optax.adam(1e-3))" if callable(tx) else ""
        raise ValueError(f"{name}={tx!r}: expected an optax.GradientTransformation{hint}")


def masked_optimizer(
    tx: optax.GradientTransformation,
    params: Any,
    trainable: Trainable = "temporal",
    temporal_modes: Sequence[str] = ("t",),
) -> optax.GradientTransformation:
    """``optax.partition({"trainable": tx, "frozen": set_to_zero()}, labels)``.

    Frozen leaves get no state from ``tx`` (``optax.partition`` masks them out, and
    ``set_to_zero`` has an empty state) and zero updates, so ``optax.apply_updates`` leaves
    them unchanged, bitwise but for a -0.0 (``-0.0 + 0.0`` is +0.0) — decoupled weight decay
    (AdamW) included, since ``tx`` never sees them. Labels are recomputed from the tree given
    to ``init``/``update`` (same names, so dict, FrozenDict and ``nnx.State`` trees all work, e.g. in
    ``nnx.Optimizer(model, masked_optimizer(tx, nnx.state(model, nnx.Param)), wrt=nnx.Param)``);
    ``params`` is used to check the selection here.

    Raises:
      ValueError: when ``params`` has no leaf (e.g. ``None``), ``trainable`` selects none of its
        leaves, or for a bad ``tx``, ``trainable`` or ``temporal_modes``.
    """
    _check_tx(tx, "tx")
    if not jax.tree_util.tree_leaves(params):
        raise ValueError(f"params={params!r}: expected a parameter tree (dict, FrozenDict or nnx.State) with at "
                         "least one leaf")
    labels = jax.tree_util.tree_leaves(label_params(params, trainable, temporal_modes))
    if "trainable" not in labels:
        raise ValueError(
            f"trainable={trainable!r}: selects no leaf of params (temporal_modes={tuple(temporal_modes)}); "
            "e.g. 'temporal' needs a transduced tree (hocp_jax.transduction.transduce)"
        )
    return optax.partition(
        {"trainable": tx, "frozen": optax.set_to_zero()},
        lambda p: label_params(p, trainable, temporal_modes),
    )


@dataclasses.dataclass(frozen=True)
class TransductionStages:
    """The paper's two-stage transduction schedule (Sec. 5, supplementary Sec. 4).

    ``stage1`` trains only the new temporal factors (everything else frozen, no state);
    ``stage2`` fine-tunes every parameter. Their states differ: call ``stage2.init(params)``
    on the stage-1 result when switching.
    """

    stage1: optax.GradientTransformation
    stage2: optax.GradientTransformation


def transduction_stages(
    tx_stage1: optax.GradientTransformation,
    tx_stage2: optax.GradientTransformation,
    params: Any,
    temporal_modes: Sequence[str] = ("t",),
) -> TransductionStages:
    """Stage 1 = ``masked_optimizer(tx_stage1, params, "temporal")``, stage 2 = ``tx_stage2`` on all leaves.

    Raises:
      ValueError: as :func:`masked_optimizer` (``tx`` named ``tx_stage1``), or ``tx_stage2`` is not
        an optax.GradientTransformation.
    """
    _check_tx(tx_stage1, "tx_stage1")
    _check_tx(tx_stage2, "tx_stage2")
    return TransductionStages(masked_optimizer(tx_stage1, params, "temporal", temporal_modes), tx_stage2)


# ----------------------------------------------------------------------------- lasso on lambdas


def _map_lambdas(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``tree_map`` applying ``fn(leaf, *rest_leaves)`` to CP-layer lambdas, identity elsewhere."""
    cp = _cp_paths(tree)

    def f(kpath, leaf, *others):
        path = _leaf_path(kpath)
        return fn(leaf, *others) if path[-1:] == ("lambda",) and path[:-1] in cp else leaf

    return jax.tree_util.tree_map_with_path(f, tree, *rest)


def l1_lambda(params: Any, gamma: float | jax.Array) -> jax.Array:
    """``gamma * sum_l ||lambda_l||_1`` over every CP conv layer (paper's Lasso term); a scalar.

    Its gradient w.r.t. a nonzero lambda is ``gamma * sign(lambda)``; plain (sub)gradient
    steps only oscillate around 0 — use :func:`prox_l1_lambdas` to reach exact zeros.
    ``gamma``: a real number >= 0 (checked unless traced).
    """
    check_real(gamma, "gamma")
    require_cp_layers(params, "l1_lambda")  # (before the jit, which would name the tree a tracer)
    return _l1_lambda(params, gamma)


@jax.jit
def _l1_lambda(params: Any, gamma: float | jax.Array) -> jax.Array:
    lams = [layer["lambda"] for _, layer in require_cp_layers(params, "l1_lambda")]
    return gamma * sum(jnp.sum(jnp.abs(lam)) for lam in lams)


def _soft_threshold(x: jax.Array, t) -> jax.Array:
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - t, 0.0)


def soft_threshold_lambdas(params: Any, threshold: float | jax.Array) -> Any:
    """Proximal operator of ``threshold * ||lambda||_1``: soft-thresholds every CP conv lambda.

    ``lambda <- sign(lambda) * max(|lambda| - threshold, 0)``; with plain SGD of step size
    ``eta`` use ``threshold = eta * gamma`` (proximal gradient / ISTA). Other leaves unchanged.
    ``threshold``: a real number >= 0 (checked unless traced). Inside an optax chain use the
    transform :func:`prox_l1_lambdas` instead.
    """
    check_real(threshold, "threshold")
    require_cp_layers(params, "soft_threshold_lambdas")
    # in the lambdas' dtype: a float32 threshold would promote bfloat16 lambdas
    return _map_lambdas(lambda lam: _soft_threshold(lam, threshold).astype(lam.dtype), params)


def prox_l1_lambdas(threshold: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """Optax transform applying :func:`soft_threshold_lambdas` after the preceding update.

    Chain it last, e.g. ``optax.chain(optax.sgd(lr), prox_l1_lambdas(lr * gamma))``: the returned
    updates ``u'`` satisfy ``params + u' = prox(params + u)``, so pruned lambdas become exact
    zeros after ``optax.apply_updates`` (``p + (0 - p) == 0`` in floating point).
    ``threshold``: a real number >= 0, or a schedule of the step count whose values are
    clamped at 0 (``max(threshold(count), 0)``: a negative value would grow the lambdas).
    Inside ``masked_optimizer`` it only sees (and thresholds) the trainable lambdas.
    """
    if not callable(threshold):
        check_real(threshold, "threshold")

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("prox_l1_lambdas: params are required (call tx.update(grads, state, params))")
        t = jnp.maximum(threshold(state.count), 0.0) if callable(threshold) else threshold
        new = _map_lambdas(lambda u, p: _soft_threshold(p + u, t) - p, updates, params)
        return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- sparsity report


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One CP layer: ``zeroed`` lambdas of ``rank``, and what :func:`hocp_jax.pruning.prune_rank` frees.

    ``params_per_component``: ``C_in + C_out + sum K + 1`` plus the Psi entries of one rank
    channel (``bn_*`` scale/bias, ``prelu_*`` alpha). ``params_freed``: that many per zeroed
    component, with at most ``rank - 1`` components freed (``prune_rank`` keeps one per layer).
    ``nonfinite``: NaN or infinite lambdas (a diverged model), neither zeroed nor freed:
    ``prune_rank`` refuses a layer that has one.
    """

    path: str
    rank: int
    zeroed: int
    params_per_component: int
    nonfinite: int = 0

    @property
    def fraction(self) -> float:
        return self.zeroed / self.rank

    @property
    def params_freed(self) -> int:
        return min(self.zeroed, self.rank - 1) * self.params_per_component


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Per-layer sparsity and totals (``cp_params``: factors + lambdas of all CP layers)."""

    layers: tuple[LayerSparsity, ...]
    cp_params: int
    total_params: int

    @property
    def params_freed(self) -> int:
        return sum(l.params_freed for l in self.layers)

    @property
    def zeroed(self) -> int:
        return sum(l.zeroed for l in self.layers)

    @property
    def rank(self) -> int:
        return sum(l.rank for l in self.layers)

    @property
    def nonfinite(self) -> int:
        return sum(l.nonfinite for l in self.layers)

    def table(self) -> str:
        """Plain-text table, one row per layer plus the total (Table 1 style)."""
        rows = [f"{'layer':<32} {'rank':>6} {'zeroed':>7} {'frac':>6} {'freed':>9}"]
        for l in self.layers:
            rows.append(f"{l.path:<32} {l.rank:>6} {l.zeroed:>7} {l.fraction:>6.1%} {l.params_freed:>9}")
        rows.append(
            f"{'total':<32} {self.rank:>6} {self.zeroed:>7} {self.zeroed / max(self.rank, 1):>6.1%} "
            f"{self.params_freed:>9}  (of {self.total_params} params)"
        )
        bad = [l.path for l in self.layers if l.nonfinite]
        if bad:
            rows.append(f"{self.nonfinite} non-finite lambdas (a diverged model) in {bad}: prune_rank refuses these layers")
        return "\n".join(rows)


def sparsity_report(params: Any, tol: float = 0.0) -> SparsityReport:
    """Counts, per CP layer, the lambdas with ``|lambda| <= tol`` and the parameters they free.

    ``params_freed`` is exactly what ``pruning.prune_rank(params, tol)`` removes: the zeroed
    components' factor columns, lambdas and Psi entries, one component kept per layer. A NaN or
    infinite lambda counts as neither zeroed nor freed, and in ``nonfinite`` (``prune_rank``
    refuses a layer that has one). ``tol``: a real number >= 0.
    """
    check_real(tol, "tol")
    rows, cp_total = [], 0
    for path, layer in require_cp_layers(params, "sparsity_report"):
        lam = np.abs(np.asarray(layer["lambda"]))
        factors = np.shape(layer["factor_in"])[0] + np.shape(layer["factor_out"])[0] + 1
        factors += sum(np.shape(layer[f"factor_{m}"])[0] for m in layer_modes(layer))
        per = factors + psi_params_per_component(layer, path)
        rows.append(LayerSparsity(path_str(path), int(lam.size), int(np.sum(lam <= tol)), int(per),
                                  int(np.sum(~np.isfinite(lam)))))
        cp_total += int(lam.size) * int(factors)
    total = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    return SparsityReport(tuple(rows), cp_total, total)


def plot_sparsity(report: SparsityReport, path: str | None = None, *, ax=None):
    """Bar chart of the fraction of zeroed lambdas per layer (supplementary Fig. 3).

    Saves to ``path`` when given; returns the matplotlib Figure.
    """
    from matplotlib.figure import Figure

    if ax is None:
        ax = Figure(figsize=(max(4.0, 0.35 * len(report.layers) + 2), 3.5)).subplots()
    fig = ax.figure
    x = np.arange(len(report.layers))
    ax.bar(x, [100 * l.fraction for l in report.layers])
    ax.set_xticks(x, [l.path for l in report.layers], rotation=90, fontsize=7)
    ax.set_ylabel("zeroed rank components (%)")
    ax.set_title(f"{report.params_freed} of {report.total_params} parameters freed by the Lasso on lambda")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
