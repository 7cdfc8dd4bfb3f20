"""The jobs ``train.py`` runs, assembled from the library's pieces.

* ``"transduction"`` (the main job, paper Fig. 1 / supplementary Fig. 4): train a static
  HO-CP model on images (with the L1 penalty on every lambda), transduce its parameters to
  video (:func:`hocp_jax.transduction.transduce`), train the temporal factors only (stage 1,
  everything else frozen by :func:`hocp_jax.optim.masked_optimizer`), fine-tune everything
  (stage 2), train from-scratch 3-D baselines for as many video steps, and evaluate all of
  them per frame on the video test split. The "static" row is the static model applied frame
  by frame — computed as the ``delta``-transduced tree, which is exactly that.
* ``"supervised"``: one model, one dataset, one loss (the paper's other experiments).

Every stage trains with :func:`hocp_jax.training.fit` in its own sub-directory of
``workdir`` (``static/``, ``stage1/``, ``stage2/``, ``baseline_<name>/``), so a killed job
resumes where it stopped. Results go to ``workdir/results.json`` and ``results.md``, plots
to ``workdir/*.png``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hocp_jax import contrastive, losses, metrics, optim, transduction, tree
from hocp_jax.data import pipeline
from hocp_jax.models import bregnet, count_params, get_model
from hocp_jax.training import plots
from hocp_jax.training.loop import evaluate, fit
from hocp_jax.training.schedules import make_optimizer, make_schedule
from hocp_jax.training.sharding import make_data_mesh, put_replicated
from hocp_jax.training.state import TrainState
from hocp_jax.training.step import make_eval_step

TARGETS = ("valence", "arousal")
JOBS = ("transduction", "supervised")


# ----------------------------------------------------------------------------- loss / metrics


def _flat(x: jax.Array) -> jax.Array:
    """``(B, [T,] k) -> (B*T, k)``."""
    return x.reshape(-1, x.shape[-1])


def loss_fn(outputs: dict, batch: dict, key: jax.Array, *, cfg) -> tuple[jax.Array, dict]:
    """Shake-shake affect loss on ``va`` (+ ``ce_weight`` x class-weighted CE on ``logits``).

    Video outputs ``(B, T, k)`` are flattened to frames; a clip label ``(B,)`` is repeated
    over its frames.
    """
    total, terms = jnp.zeros(()), {}
    if "va" in outputs and cfg.va_weight > 0:
        kw = {"key": key} if cfg.shake_shake else {"weights": tuple(cfg.weights)}
        total, terms = losses.affect_loss(_flat(batch["va"]), _flat(outputs["va"]), **kw)
        total = cfg.va_weight * total
    if "logits" in outputs and cfg.ce_weight > 0:
        logits = _flat(outputs["logits"])
        labels = jnp.repeat(batch["label"], logits.shape[0] // batch["label"].shape[0])
        weights = jnp.asarray(cfg.class_weights) if cfg.get("class_weights") else None
        ce = losses.cross_entropy(logits, labels, class_weights=weights)
        terms["ce"] = ce
        total = total + cfg.ce_weight * ce
    return total, terms


LOSSES = ("affect", "bregnet", "avce")


def make_loss(config, data: "Data"):
    """``loss_fn(outputs, batch, key)`` for ``config.loss.kind`` (one of ``LOSSES``).

    ``affect``: :func:`loss_fn`; ``bregnet``: class-weighted CE (H_ii = f_min / f_i from the
    training split's label counts, or ``loss.class_counts``) + MSE on valence/arousal;
    ``avce``: :func:`hocp_jax.contrastive.make_avce_loss` with ``loss.avce`` options.
    """
    kind = config.loss.get("kind", "affect")
    if kind == "affect":
        return functools.partial(loss_fn, cfg=config.loss)
    if kind == "bregnet":
        weights = None
        if config.loss.class_weighted:
            counts = list(config.loss.get("class_counts", [])) or data.label_counts()
            weights = losses.class_weights(np.asarray(counts))
        return functools.partial(bregnet.bregnet_loss, class_weights=weights, va_weight=config.loss.va_weight)
    if kind == "avce":
        return contrastive.make_avce_loss(**dict(config.loss.avce))
    raise ValueError(f"config.loss.kind={kind!r}: expected one of {LOSSES}")


def metric_fn(outputs: dict, batch: dict, *, skew_repeats: int = 0) -> dict:
    """RMSE/SAGR/PCC/CCC per target over the whole set (frames of all clips), + categorical
    metrics (and their skew-normalised versions over ``skew_repeats`` balanced subsamples)."""
    out = {}
    mask = batch.get("mask")
    if "va" in outputs and "va" in batch:
        y, p = _flat(batch["va"]), _flat(outputs["va"])
        m = None if mask is None else np.repeat(mask, y.shape[0] // mask.shape[0])
        for name, values in metrics.regression_metrics(y, p, m).items():
            out |= {f"{t}_{name}": float(v) for t, v in zip(TARGETS, np.atleast_1d(values))}
    if "logits" in outputs and "label" in batch:
        logits = _flat(outputs["logits"])
        labels = np.repeat(batch["label"], logits.shape[0] // batch["label"].shape[0])
        m = None if mask is None else np.repeat(mask, logits.shape[0] // mask.shape[0]) > 0
        preds = np.argmax(logits, -1)
        cm = metrics.confusion_matrix(labels, preds, logits.shape[-1], mask=m)
        out |= {f"class_{k}": float(v) for k, v in metrics.classification_metrics(cm).items() if np.ndim(v) == 0}
        if skew_repeats:
            keep = np.ones_like(labels, bool) if m is None else np.asarray(m)
            skew = metrics.skew_normalized_metrics(labels[keep], preds[keep], logits.shape[-1], n_repeats=skew_repeats)
            out |= {f"skew_{k}": float(v) for k, v in skew.items() if np.ndim(v) == 0}
    return out


# ----------------------------------------------------------------------------- stages


def _manual_dir(root: str | None, name: str) -> str | None:
    """``<root>/<dataset name>`` when that folder exists (jobs with two real datasets, e.g.
    AffectNet -> AFEW-VA), else ``root`` itself; ``None`` for an empty root."""
    if not root:
        return None
    sub = os.path.join(root, name.split("/")[0])
    return sub if os.path.isdir(sub) else root


class Data:
    """Where a dataset lives and how to batch it (one per stage)."""

    def __init__(self, cfg, name: str):
        self.name, self.cfg = name, cfg
        self.data_dir = cfg.data_dir
        self.manual_dir = _manual_dir(cfg.get("manual_dir"), name)

    def source(self, split: str):
        return pipeline.data_source(self.name, split, self.data_dir, manual_dir=self.manual_dir)

    def train_iter(self, seed: int):
        return pipeline.train_iterator(self.name, "train", self.data_dir, batch_size=self.cfg.batch_size,
                                       seed=seed, manual_dir=self.manual_dir)

    def eval_batches(self, split: str):
        return pipeline.eval_batches(self.name, split, self.data_dir, batch_size=self.cfg.eval_batch_size,
                                     manual_dir=self.manual_dir)

    def label_counts(self) -> list[int]:
        """Examples per class in the training split (for BReG-Net's class weights)."""
        source = self.source("train")
        labels = np.asarray([int(source[i]["label"]) for i in range(len(source))])
        return np.bincount(labels).tolist()

    def steps_per_epoch(self) -> int:
        return pipeline.steps_per_epoch(self.source("train"), batch_size=self.cfg.batch_size)


def _fit_cfg(config, stage_cfg, stage: str) -> dict:
    return dict(num_steps=stage_cfg.num_steps, seed=config.seed, stage=stage,
                checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                keep_checkpoints=config.keep_checkpoints)


def train_stage(config, stage: str, model, data: Data, workdir: str, *, tx_fn=None, init_variables=None,
                l1_gamma: float = 0.0, loss=None) -> TrainState:
    """One :func:`fit` run. ``tx_fn(tx) -> tx`` wraps the optimizer (e.g. freezing)."""
    stage_cfg = config.baseline if stage.startswith("baseline") else config[stage]
    opt_cfg = dict(config.optimizer) | dict(stage_cfg.get("optimizer", {})) | {"steps_per_epoch": data.steps_per_epoch()}
    tx = make_optimizer(opt_cfg)
    if l1_gamma > 0 and config.loss.l1_prox:  # soft-threshold lambdas after each step: exact zeros
        schedule = make_schedule(opt_cfg)
        tx = optax.chain(tx, optim.prox_l1_lambdas(lambda count: schedule(count) * l1_gamma))
    if tx_fn is not None:
        tx = tx_fn(tx)
    reg = functools.partial(optim.l1_lambda, gamma=l1_gamma) if l1_gamma > 0 else None
    loss = functools.partial(loss_fn, cfg=config.loss) if loss is None else loss
    return fit(model, loss, tx, lambda: data.train_iter(config.seed),
               _fit_cfg(config, stage_cfg, stage), os.path.join(workdir, stage), reg_fn=reg,
               init_variables=init_variables)


def evaluate_variables(model, variables: dict, data: Data, split: str, skew_repeats: int = 0) -> tuple[dict, dict]:
    """Metrics on ``split`` and the first eval batch's outputs (for plots)."""
    mesh = make_data_mesh()
    state = put_replicated(TrainState.create(variables, optax.identity(), jax.random.key(0)), mesh)
    step = jax.jit(make_eval_step(model))
    batches = list(data.eval_batches(split))
    first = jax.device_get(step(state, batches[0]))
    return evaluate(step, state, batches, functools.partial(metric_fn, skew_repeats=skew_repeats), mesh), first


def _variables(state: TrainState) -> dict:
    v = {"params": jax.device_get(state.params)}
    if state.batch_stats:
        v["batch_stats"] = jax.device_get(state.batch_stats)
    return v


def _n_trainable(params, trainable: str) -> int:
    labels = jax.tree.leaves(optim.label_params(params, trainable))
    return int(sum(np.size(p) for p, lab in zip(jax.tree.leaves(params), labels) if lab == "trainable"))


# ----------------------------------------------------------------------------- jobs


def _kwargs(cfg) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else (v.to_dict() if hasattr(v, "to_dict") else v)) for k, v in cfg.items()}


def _model(cfg) -> Any:
    return get_model(cfg.name, **_kwargs(cfg.kwargs))


def run_transduction(config, workdir: str) -> dict:
    """The main job (module docstring). Returns ``{row: {metric: value}}``."""
    images, videos = Data(config.data, config.data.static), Data(config.data, config.data.video)
    model = _model(config.model)
    gamma = config.loss.l1_gamma

    static = train_stage(config, "static", model, images, workdir, l1_gamma=gamma)
    static_vars = _variables(static)
    rows, first = {}, {}

    def row(name, mdl, variables, video_params):
        m, out = evaluate_variables(mdl, variables, videos, config.data.eval_split)
        rows[name] = {"params": count_params(variables["params"]), "video_trained_params": video_params} | m
        first[name] = out

    modes = dict(config.transduction.modes)
    delta = transduction.transduce(static_vars["params"], modes, "delta", dense=config.transduction.dense)
    row("static (per frame)", model, static_vars | {"params": delta}, 0)

    transduced = transduction.transduce(static_vars["params"], modes, config.transduction.init,
                                      dense=config.transduction.dense)
    s1 = train_stage(config, "stage1", model, videos, workdir, init_variables=static_vars | {"params": transduced},
                     tx_fn=lambda tx: optim.masked_optimizer(tx, transduced, "temporal"))
    row("transduced, stage 1 (temporal only)", model, _variables(s1), _n_trainable(transduced, "temporal"))
    s2 = train_stage(config, "stage2", model, videos, workdir, init_variables=_variables(s1), l1_gamma=gamma)
    final = _variables(s2)
    row("transduced, stage 2 (fine-tuned)", model, final, count_params(final["params"]))

    for name in config.baseline.models:
        mdl = get_model(name, **_kwargs(config.baseline.kwargs))
        b = train_stage(config, f"baseline_{name}", mdl, videos, workdir)
        row(f"from scratch: {name}", mdl, _variables(b), count_params(b.params))

    report = optim.sparsity_report(final["params"], tol=config.sparsity_tol)
    _write(workdir, rows, report, config)
    plots.plot_va_over_time(first, next(iter(videos.eval_batches(config.data.eval_split))), TARGETS,
                            os.path.join(workdir, "va_over_time.png"))
    optim.plot_sparsity(report, os.path.join(workdir, "lambda_sparsity.png"))
    return rows


def run_supervised(config, workdir: str) -> dict:
    """Train ``config.model`` on ``config.data.static`` with ``config.static``; evaluate."""
    data = Data(config.data, config.data.static)
    model = _model(config.model)
    state = train_stage(config, "static", model, data, workdir, l1_gamma=config.loss.l1_gamma,
                        loss=make_loss(config, data))
    variables = _variables(state)
    m, _ = evaluate_variables(model, variables, data, config.data.eval_split, config.get("skew_repeats", 0))
    rows = {config.model.name: {"params": count_params(variables["params"])} | m}
    has_cp = bool(tree.cp_layers(variables["params"]))
    report = optim.sparsity_report(variables["params"], tol=config.sparsity_tol) if has_cp else None
    _write(workdir, rows, report, config)
    return rows


def run(config, workdir: str) -> dict:
    """Dispatches on ``config.job`` (one of ``JOBS``)."""
    if config.job not in JOBS:
        raise ValueError(f"config.job={config.job!r}: expected one of {JOBS}")
    os.makedirs(workdir, exist_ok=True)
    return {"transduction": run_transduction, "supervised": run_supervised}[config.job](config, workdir)


# ----------------------------------------------------------------------------- output


def format_table(rows: dict) -> str:
    """Markdown table of the rows (regression metrics per target, then class accuracy)."""
    cols = [c for c in ("params", "video_trained_params") if any(c in r for r in rows.values())]
    cols += [f"{t}_{m}" for t in TARGETS for m in ("rmse", "sagr", "pcc", "ccc") if any(f"{t}_{m}" in r for r in rows.values())]
    cols += [c for c in ("class_accuracy", "class_f1", "class_kappa", "skew_accuracy", "skew_f1", "skew_kappa")
             if any(c in r for r in rows.values())]
    fmt = lambda v: f"{v:,}" if isinstance(v, int) else f"{v:.3f}"  # noqa: E731
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(r[c]) if c in r else "" for c in cols) + " |" for name, r in rows.items()]
    return "\n".join(lines)


def _write(workdir: str, rows: dict, report, config) -> None:
    table = format_table(rows)
    sparsity = report.table() if report is not None else ""
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"rows": rows, "config": json.loads(config.to_json_best_effort())}, f, indent=1)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n\n" + sparsity + "\n")
    print(table)
    if sparsity:
        print(sparsity)
