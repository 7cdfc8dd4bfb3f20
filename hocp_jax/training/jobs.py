"""The jobs ``train.py`` runs: stage orchestration, assembled from the library's pieces.

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
resumes where it stopped. ``config.init_from`` starts the static stage from another run's
checkpoint (:func:`static_variables`). Data access: :mod:`hocp_jax.training.data`; losses and metrics:
:mod:`hocp_jax.training.objectives`; results files: :mod:`hocp_jax.training.report`
(``workdir/results.json`` and ``results.md``); plots go to ``workdir/*.png``.

The L1 penalty on the lambdas (``loss.l1_gamma``) is applied exactly once: as a proximal
soft-threshold after each optimizer update when ``loss.l1_prox`` is set, else as a
``gamma * ||lambda||_1`` term of the loss (:func:`stage_optimizer`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from ml_collections import config_dict

from hocp_jax import autotune, conv_plans, optim, transduction, tree
from hocp_jax.data import pipeline
from hocp_jax.checks import is_int, is_number
from hocp_jax.models import MODELS, count_params
from hocp_jax.processes import all_agree
from hocp_jax.training import checkpoint, objectives, plots, schedules
from hocp_jax.training.config import is_config_dict, validate_config
from hocp_jax.training.data import DATA_CHECKS, DATA_OPTIONAL, DATA_REQUIRED, Data
from hocp_jax.training.loop import FIT_CHECKS, fit, make_evaluator, pad_batch
from hocp_jax.training.report import write_results
from hocp_jax.training.schedules import make_optimizer, make_schedule
from hocp_jax.training.sharding import batch_sharding, local_rows, make_data_mesh, put_batch, put_replicated
from hocp_jax.training.state import TrainState
from hocp_jax.training.step import make_eval_step, model_input
from hocp_jax.training.trained import DTYPES, build_model

JOBS = ("transduction", "supervised")
LASSO_STAGES = ("static", "stage2")  # the stages trained with the L1 penalty on the lambdas (train_stage's lasso)
STAGES = {"transduction": ("static", "stage1", "stage2", "baseline"), "supervised": ("static",)}
OPTIMIZER_KEYS = ("name", "learning_rate", *schedules.DEFAULTS)
TOP_CHECKS = {k: FIT_CHECKS[k] for k in ("checkpoint_every", "keep_checkpoints", "log_every",
                                         "eval_every", "best_metric", "profile_steps", "microbatches")} | {
    "seed": (lambda v: is_int(v) and 0 <= v < 2**32, "an int in [0, 2**32) (it also seeds the data's shuffles)"),
    "job": (lambda v: v in JOBS, f"one of {JOBS}"),
    "sparsity_tol": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "skew_repeats": (lambda v: is_int(v) and v >= 0, "an int >= 0 (0: no skew-normalised metrics)"),
    "init_from": (lambda v: isinstance(v, str), "a path (str) to a checkpoint, or '' (none)"),
    "dtype": (lambda v: v in DTYPES, f"one of {DTYPES} (the layers' computation dtype; parameters stay float32)"),
}


def _fit_cfg(config, stage_cfg, stage: str) -> dict:
    return dict(num_steps=stage_cfg.num_steps, seed=config.seed, stage=stage,
                checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                keep_checkpoints=config.keep_checkpoints, eval_every=config.get("eval_every", 0),
                best_metric=config.get("best_metric", ""), profile_steps=config.get("profile_steps", 0),
                microbatches=config.get("microbatches", 1))


def stage_optimizer(loss_cfg, opt_cfg: dict, l1_gamma: float) -> tuple[optax.GradientTransformation, Any]:
    """``(tx, reg_fn)`` of a stage; the L1 on the lambdas goes into exactly one of them.

    ``l1_gamma > 0`` with ``loss_cfg.l1_prox`` (the stage's :func:`stage_loss`): ``tx`` ends with the proximal
    soft-threshold (threshold ``learning_rate(step) * l1_gamma``) and ``reg_fn`` is None;
    without ``l1_prox``: plain ``tx`` and ``reg_fn = l1_gamma * sum |lambda|``.
    """
    tx = make_optimizer(opt_cfg)
    if l1_gamma <= 0:
        return tx, None
    if loss_cfg.l1_prox:  # soft-threshold lambdas after each step: exact zeros
        schedule = make_schedule(opt_cfg)
        return optax.chain(tx, optim.prox_l1_lambdas(lambda count: schedule(count) * l1_gamma)), None
    return tx, functools.partial(optim.l1_lambda, gamma=l1_gamma)


def _eval_fn(config, model, data: Data):
    """``state -> metrics`` on ``config.data.val_split`` for evaluation during training, or
    None (``eval_every`` 0 or no validation split named: the test split is never used to
    pick a checkpoint)."""
    split = config.data.get("val_split", "")
    if not (config.get("eval_every", 0) and split):
        return None
    evaluator = make_evaluator(model, objectives.eval_stats, objectives.merge_stats)
    return lambda state: objectives.finalize_stats(evaluator(state, data.eval_batches(split)))


def stage_loss(config, stage: str) -> config_dict.ConfigDict:
    """``config.loss`` with the stage's ``loss`` overrides (``config.<stage>.loss``, e.g. the
    AFEW-VA job's ``stage1.loss.ce_weight = 0``: its clips have no expression labels; a nested
    dict such as ``loss.avce`` is overridden key by key)."""
    stage_cfg = config.baseline if stage.startswith("baseline") else config[stage]
    merged = dict(config.loss)
    for key, value in dict(stage_cfg.get("loss", {})).items():
        nested = hasattr(value, "keys") and hasattr(merged.get(key), "keys")
        merged[key] = dict(merged[key]) | dict(value) if nested else value  # loss.avce: key by key
    return config_dict.ConfigDict(merged)


def train_stage(config, stage: str, model, data: Data, workdir: str, *, tx_fn=None, init_variables=None,
                lasso: bool = False, run_extra: dict | None = None) -> TrainState:
    """One :func:`fit` run with the stage's loss (:func:`stage_loss`) and optimizer; ``lasso``:
    with the L1 penalty ``loss.l1_gamma`` on every lambda; ``tx_fn(tx) -> tx`` wraps the
    optimizer (e.g. freezing); ``run_extra``: more of what defines the run (stored with its
    checkpoints and compared on resume)."""
    stage_cfg = config.baseline if stage.startswith("baseline") else config[stage]
    loss_cfg = stage_loss(config, stage)
    l1_gamma = loss_cfg.l1_gamma if lasso else 0.0
    opt_cfg = dict(config.optimizer) | dict(stage_cfg.get("optimizer", {})) | {"steps_per_epoch": data.steps_per_epoch()}
    tx, reg = stage_optimizer(loss_cfg, opt_cfg, l1_gamma)
    if tx_fn is not None:
        tx = tx_fn(tx)
    loss = objectives.make_loss(loss_cfg, data.label_counts)
    model_cfg = (dict(name=stage.removeprefix("baseline_"), kwargs=config.baseline.kwargs)
                 if stage.startswith("baseline") else config.model)
    dtype = config.get("dtype", "float32")
    run = dict(model=model_cfg, dtype=None if dtype == "float32" else dtype,  # None: runs before config.dtype
               loss=loss_cfg, optimizer=opt_cfg, l1_gamma=l1_gamma,
               data=dict(name=data.name, batch_size=config.data.batch_size),
               transduction=config.get("transduction") if stage.startswith("stage") else None)
    if stage == "static" and config.get("init_from"):  # (not stored when unset: runs before config.init_from)
        run["init_from"] = _init_path(config)
    run |= run_extra or {}
    run = json.loads(config_dict.ConfigDict(run).to_json())  # the JSON a checkpoint stores
    return fit(model, loss, tx, lambda: data.train_iter(config.seed),
               _fit_cfg(config, stage_cfg, stage) | {"run": run}, os.path.join(workdir, stage), reg_fn=reg,
               init_variables=init_variables, eval_fn=_eval_fn(config, model, data))


def _init_path(config) -> str:
    return os.path.abspath(os.path.expanduser(config.init_from))


def _abstract_variables(model, data: Data) -> dict:
    """Shapes and dtypes of ``model.init``'s variables on a batch of ``data`` (``jax.eval_shape``)."""
    x = model_input(next(iter(data.eval_batches("train"))))
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def static_variables(config, model, data: Data, workdir: str, **stage_kwargs) -> tuple[dict, str | None]:
    """``(variables, source)``: the static stage's variables (``{"params", ["batch_stats"]}``, host
    arrays), trained by :func:`train_stage` from ``model.init``, or, with ``config.init_from``,
    from the variables of that checkpoint (a warm start: a fresh optimizer and step 0); with
    ``static.num_steps=0``, those variables as they are, untrained, and ``source`` the step
    directory they were read from (else None), which the stages built on them store in their run
    config (a rerun from another source is refused). ``init_from`` is a step directory, a
    ``checkpoints/`` or ``best/`` directory (its newest step) or a stage directory (its newest
    checkpoint): :func:`hocp_jax.training.checkpoint.restore_variables`; its parameter and
    batch-statistics shapes must be the model's. A stage that trains reads it only when it has no
    checkpoint of its own to resume from (a resume does not need the source run any more).

    Raises:
        ValueError: naming ``config.init_from``: no checkpoint there, or one of another model; or
            ``static.num_steps=0`` where the static stage has checkpoints (it trained: its model is
            not the source's).
    """
    if not config.get("init_from"):
        return _variables(train_stage(config, "static", model, data, workdir, **stage_kwargs)), None
    own = os.path.join(workdir, "static", "checkpoints")
    steps = checkpoint.finished_steps(own)
    resumes = all_agree(bool(steps))
    if config.static.num_steps == 0 and resumes:
        raise ValueError(f"config.static.num_steps=0 takes the variables of config.init_from as the static model, but "
                         f"{own} holds the checkpoints of a static stage that trained (newest step {max(steps)}): set "
                         f"config.static.num_steps >= {max(steps)} to use it, or use another workdir")
    init = step_dir = None
    if config.static.num_steps == 0 or not resumes:
        init, step_dir = checkpoint.restore_variables(_init_path(config), _abstract_variables(model, data),
                                                      name="config.init_from")
        if jax.process_index() == 0:
            print(f"static: starting from the variables of {step_dir}", flush=True)
    if config.static.num_steps == 0:
        return init, step_dir
    return _variables(train_stage(config, "static", model, data, workdir, init_variables=init, **stage_kwargs)), None


def evaluate_variables(model, variables: dict, data: Data, split: str, skew_repeats: int = 0,
                       mesh=None) -> tuple[dict, dict]:
    """Metrics on ``split`` (streamed) and the first eval batch's outputs (for plots; every
    process's examples of it, in process order), on ``mesh`` (default :func:`make_data_mesh`)."""
    mesh = make_data_mesh() if mesh is None else mesh
    state = put_replicated(TrainState.create(variables, optax.identity(), jax.random.key(0)), mesh)
    stats = make_evaluator(model, objectives.eval_stats, objectives.merge_stats, mesh)(state, data.eval_batches(split))
    batch = next(iter(data.eval_batches(split)))
    b = len(next(iter(batch.values())))
    step = jax.jit(make_eval_step(model), out_shardings=batch_sharding(mesh))
    first = jax.tree.map(local_rows, step(state, put_batch(pad_batch(batch, mesh), mesh)))  # (b + padding, ...)
    first = multihost_utils.process_allgather(first)  # (processes, b + padding, ...)
    return objectives.finalize_stats(stats, skew_repeats), jax.tree.map(lambda x: x[:, :b].reshape(-1, *x.shape[2:]), first)


def _variables(state: TrainState) -> dict:
    v = {"params": jax.device_get(state.params)}
    if state.batch_stats:
        v["batch_stats"] = jax.device_get(state.batch_stats)
    return v


def _n_trainable(params, trainable: str) -> int:
    labels = jax.tree.leaves(optim.label_params(params, trainable))
    return int(sum(np.size(p) for p, lab in zip(jax.tree.leaves(params), labels) if lab == "trainable"))


# ----------------------------------------------------------------------------- jobs


def _model(config, name: str, kwargs) -> Any:
    """:func:`hocp_jax.training.trained.build_model` in ``config.dtype``."""
    return build_model(name, kwargs, config.get("dtype", "float32"))


_STATIC_STEPS_FROM_INIT = (lambda v: is_int(v) and v >= 0,
                           "an int >= 0 (with config.init_from, 0 takes its variables as the static model)")


def check_config(config) -> None:
    """Checks the config before any data is read or stage trains: every sub-config a config
    dict; the keys of ``fit`` each stage gets, each stage's ``num_steps``, optimizer and loss (the
    stage's ``optimizer`` and ``loss`` entries override ``config.optimizer`` and ``config.loss``;
    ``l1_*`` only in :data:`LASSO_STAGES`), ``sparsity_tol``, ``skew_repeats``, ``config.data``'s
    keys and values (:data:`hocp_jax.training.data.DATA_CHECKS`), ``config.loss``
    (:func:`hocp_jax.training.objectives.check_loss_config`, ``loss.avce``'s values included), the
    models' names, keyword names and values (``head``'s keys included; each model is built, which
    checks its fields: :class:`hocp_jax.models.common.CheckedModel`; nothing runs),
    the transduction job's ``config.transduction`` (keys, ``init``, ``dense``, ``modes``), the
    ``autotune``, ``cp_per_sample`` and ``cp_tile_rows`` of :func:`configure_autotune`, that
    ``best_metric`` has evaluations on a held-out split to pick from, and that
    ``config.data.batch_size`` splits evenly over the devices (and ``config.microbatches``' micro-batches).

    Left to later, as they need a model's shapes or the data: what :func:`check_transducible`
    (before the static stage) and :func:`check_data` (splits, the process count, labels,
    ``best_metric``'s name) check, and ``init_from``'s checkpoint (:func:`static_variables`).

    Raises:
        ValueError: naming the full key (e.g. ``config.stage1.num_steps``), its value and
            what was expected.
    """
    validate_config(config, ("job",), checks={"job": TOP_CHECKS["job"]}, open_keys=True)
    stages = STAGES[config.job]
    job_keys = ("transduction",) if config.job == "transduction" else ()
    validate_config(config, ("seed", "checkpoint_every", "keep_checkpoints", "log_every", "sparsity_tol",
                             "data", "model", "optimizer", "loss", *stages, *job_keys),
                    ("eval_every", "best_metric", "dtype", "init_from", "profile_steps", "microbatches",
                     "skew_repeats"), checks=TOP_CHECKS, open_keys=True)
    validate_config(config.data, DATA_REQUIRED, DATA_OPTIONAL, checks=DATA_CHECKS, name="config.data")
    _autotune_args(config)
    in_models = (lambda v: v in MODELS, f"one of {MODELS}")
    kwargs_check = (is_config_dict, "a dict of the model's keyword arguments")
    validate_config(config.model, ("name", "kwargs"), checks={"name": in_models, "kwargs": kwargs_check},
                    name="config.model")
    _check_model(config, "model", config.model.name, config.model.kwargs)
    validate_config(config.optimizer, ("name", "learning_rate"), OPTIMIZER_KEYS, checks=schedules.CHECKS,
                    name="config.optimizer")
    stage_checks = {"num_steps": FIT_CHECKS["num_steps"], "kwargs": kwargs_check,
                    "models": (lambda v: isinstance(v, (tuple, list)) and all(m in MODELS for m in v),
                               f"a tuple of names from {MODELS}")}
    for stage in stages:
        extra = ("models", "kwargs") if stage == "baseline" else ()
        checks = stage_checks | ({"num_steps": _STATIC_STEPS_FROM_INIT} if stage == "static" and config.get("init_from")
                                 else {})
        validate_config(config[stage], ("num_steps", *extra), ("optimizer", "loss"), checks=checks, name=f"config.{stage}")
        validate_config(config[stage].get("optimizer", {}), (), OPTIMIZER_KEYS, checks=schedules.CHECKS,
                        name=f"config.{stage}.optimizer")
    for name in config.baseline.models if "baseline" in stages else ():
        _check_model(config, "baseline", name, config.baseline.kwargs)
    objectives.check_loss_config(config.loss)
    for stage in stages:  # a stage's loss overrides: values of config.loss's kind; the lasso's only where it applies
        keys = [k for k in objectives.LOSS_CHECKS if k != "kind" and (stage in LASSO_STAGES or not k.startswith("l1_"))]
        validate_config(config[stage].get("loss", {}), (), keys, checks=objectives.LOSS_CHECKS,
                        name=f"config.{stage}.loss")
        objectives.check_loss_config(stage_loss(config, stage))
    if config.job == "transduction":
        _check_transduction_config(config.transduction)
    best, every = config.get("best_metric", ""), config.get("eval_every", 0)
    val_split, eval_split = config.data.get("val_split", ""), config.data.get("eval_split")
    if best and not (every and val_split):
        raise ValueError(f"config.best_metric={best!r} keeps the best state of the evaluations during training, "
                         f"but config.eval_every={every} and config.data.val_split={val_split!r}: set "
                         "config.eval_every > 0 and config.data.val_split to a held-out split, or config.best_metric=''")
    if best and val_split == eval_split:
        raise ValueError(f"config.best_metric={best!r} would pick checkpoints on config.data.val_split={val_split!r}, "
                         f"the split config.data.eval_split={eval_split!r} reports: set config.data.val_split to "
                         "another held-out split, or config.best_metric=''")
    k, batch, devices = config.get("microbatches", 1), config.data.batch_size, jax.device_count()
    if k > 1 and batch % (k * devices):
        raise ValueError(f"config.microbatches={k}: config.data.batch_size={batch} must be a multiple of {k} x the "
                         f"{devices} devices (each micro-batch is split over every device)")
    if batch % devices:
        raise ValueError(f"config.data.batch_size={batch}: expected a multiple of the {devices} devices (each "
                         "training batch is split evenly over every device)")


def _check_model(config, key: str, name: str, kwargs) -> None:
    """Builds model ``name`` with ``config.<key>.kwargs`` (:func:`_model`: nothing runs), so an
    unknown keyword (or ``head`` key) or a value the model cannot take is refused before any data
    is read."""
    try:
        _model(config, name, kwargs)
    except ValueError as e:
        raise ValueError(f"invalid config.{key}.kwargs (model {name!r}): {e}") from None


def _check_transduction_config(cfg) -> None:
    """``config.transduction``: ``modes`` (:func:`hocp_jax.transduction.check_new_modes`; odd
    sizes, since the job also rates the static model transduced with ``init='delta'``), ``init``
    and ``dense`` (:data:`hocp_jax.transduction.INITS`, :data:`~hocp_jax.transduction.DENSE_RULES`)."""
    validate_config(cfg, ("modes", "init"), ("dense",), name="config.transduction", checks={
        "init": (lambda v: v in transduction.INITS, f"one of {transduction.INITS}"),
        "dense": (lambda v: v in transduction.DENSE_RULES, f"one of {transduction.DENSE_RULES}")})
    modes = cfg.modes.to_dict() if hasattr(cfg.modes, "to_dict") else cfg.modes
    try:
        transduction.check_new_modes(modes, "delta")
    except ValueError as e:
        why = " (the job also rates the static model transduced with init='delta')" if "delta" in str(e) else ""
        raise ValueError(f"config.transduction.{e}{why}") from None


def _transduction_args(config) -> tuple[dict, str, str]:
    """``(modes, init, dense)`` of ``config.transduction`` (``dense`` optional: ``"error"``, as
    :func:`hocp_jax.transduction.transduce`)."""
    cfg = config.transduction
    return dict(cfg.modes), cfg.init, cfg.get("dense", "error")


def check_transducible(config, model, images: Data) -> None:
    """Before the static stage trains: ``config.transduction`` transforms the parameters of
    ``config.model`` with both of the job's inits (shapes only, ``jax.eval_shape`` on one batch of
    ``images``): a model without CP convs, or ``dense='error'`` with dense convs, fails here.

    Raises:
        ValueError: naming ``config.transduction`` and ``config.model.name``, with
            :func:`hocp_jax.transduction.transduce`'s reason.
    """
    modes, job_init, dense = _transduction_args(config)
    params = _abstract_variables(model, images)["params"]
    for init in dict.fromkeys(("delta", job_init)):
        try:
            jax.eval_shape(lambda p, init=init: transduction.transduce(p, modes, init, dense=dense), params)
        except ValueError as e:
            raise ValueError(f"config.transduction (modes={modes}, init={init!r}, dense={dense!r}) cannot transduce "
                             f"config.model.name={config.model.name!r}: {e}") from None


def check_data(config, report: Data, stages: dict[str, tuple[Any, Data]], run_on: dict[str, Data] | None = None) -> None:
    """Checks the values that need the datasets, before the first stage trains:
    ``config.data.eval_split`` is a split of ``report`` (the evaluated dataset); with
    evaluations during training, ``config.data.val_split`` is a split of every stage's dataset
    and ``config.best_metric`` one of the metrics of every stage's evaluation.

    Args:
        stages: ``{stage: (model, data)}``.
        run_on: ``{stage: data}`` whose examples a stage's model is traced on for its output shapes,
            where it cannot take its own data before a transform (the transduction stages: the
            2-D model, on images); default the stage's data.

    Also: ``config.data.batch_size`` and ``eval_batch_size`` (global) are multiples of the
    process count (each process reads its share; an evaluation after training would fail), the
    batch is no larger than a training split, and each model's head fits its data and loss
    (:func:`_check_outputs`: classes, labels, regression outputs).

    Raises:
        ValueError: naming the key, its value and the splits or metrics there are.
    """
    for key in ("batch_size", "eval_batch_size"):  # the pipeline's rule, named by the config key
        try:
            pipeline.shard_of(0, jax.process_count(), config.data[key])
        except ValueError as err:
            raise ValueError(f"config.data.{key}: {err} (the number of processes: each reads an equal share "
                             "of a batch)") from None
    for stage, (model, data) in stages.items():
        if data.steps_per_epoch() == 0:  # (the optimizer's schedule would name steps_per_epoch=0)
            raise ValueError(f"config.data.batch_size={config.data.batch_size}: larger than the training split of "
                             f"{data.name} ({len(data.source('train'))} examples, shared by {jax.process_count()} "
                             "process(es))")
        shapes = _output_shapes(model, next(iter((run_on or {}).get(stage, data).eval_batches("train"))))
        _check_outputs(config, stage, data, next(iter(data.eval_batches("train"))), shapes)
    _check_split(report, "eval_split", config.data.eval_split)
    split, best = config.data.get("val_split", ""), config.get("best_metric", "")
    if not (config.get("eval_every", 0) and split):
        return
    for stage, (model, data) in stages.items():
        _check_split(data, "val_split", split)
        if best and best not in (names := _eval_metric_names(model, data, split)):
            raise ValueError(f"config.best_metric={best!r}: expected one of the metrics stage {stage!r} evaluates "
                             f"on config.data.val_split={split!r}: {names}")


def _check_outputs(config, stage: str, data: Data, batch: dict, shapes: dict) -> None:
    """The outputs of a stage's model (``shapes``, from ``jax.eval_shape``) fit its ``data`` (``batch``,
    a batch of its training split): as many logits as the dataset has classes (else the cross-entropy
    is NaN, and the class metrics drop the other labels), and labels where the cross-entropy weighs
    them (kind "affect", ``ce_weight > 0``); as many regression outputs as its "va" targets have
    values, and one at all where the affect loss weighs them."""
    key = "baseline" if stage.startswith("baseline") else stage
    head = f"config.{'baseline' if key == 'baseline' else 'model'}.kwargs.head"
    cfg = stage_loss(config, stage)
    affect = cfg.get("kind", "affect") == "affect"
    features = data.source("train").dataset_info.features
    classes = getattr(features["label"], "num_classes", None) if "label" in features.keys() else None
    if "logits" in shapes and classes is not None and shapes["logits"].shape[-1] != classes:
        raise ValueError(f"{head}.n_classes={shapes['logits'].shape[-1]}: stage {stage!r} trains on {data.name}, "
                         f"which has {classes} classes; expected {classes}")
    if "logits" in shapes and "label" not in batch and affect and cfg.ce_weight > 0:
        how = (f"set config.{key}.loss.ce_weight=0" if "loss" in config[key] else  # a key the command line cannot add
               f"add loss=dict(ce_weight=0.0) to config.{key} in the config file, or set config.loss.ce_weight=0")
        raise ValueError(f"config.{key}.loss.ce_weight={cfg.ce_weight} (config.loss's unless overridden): stage "
                         f"{stage!r} trains a model with class logits on {data.name}, whose examples have no "
                         f"'label': {how}")
    if "va" not in batch:
        return
    targets = batch["va"].shape[-1]
    if "va" in shapes and shapes["va"].shape[-1] != targets:
        raise ValueError(f"{head}.n_outputs={shapes['va'].shape[-1]}: stage {stage!r} trains on {data.name}, whose "
                         f"'va' targets have {targets} values; expected {targets}")
    if "va" not in shapes and affect and cfg.va_weight > 0:
        raise ValueError(f"config.{key}.loss.va_weight={cfg.va_weight} (config.loss's unless overridden): the model "
                         f"of stage {stage!r} has no valence/arousal output ({head}.n_outputs=0); set "
                         f"{head}.n_outputs={targets}, or the weight to 0")


def _check_inputs(data: Data, key: str, ndim: int, what: str) -> None:
    """``config.data.<key>``'s examples are ``what`` (inputs of ``ndim`` axes, batch included)."""
    x = model_input(next(iter(data.eval_batches("train"))))
    if x.ndim != ndim:
        raise ValueError(f"config.data.{key}={data.name!r}: its examples have shape {tuple(x.shape[1:])}; the "
                         f"transduction job expects {what} there")


def _check_split(data: Data, key: str, split: str) -> None:
    splits = sorted(data.source("train").dataset_info.splits)
    if split not in splits:
        raise ValueError(f"config.data.{key}={split!r}: expected one of the splits of {data.name}, {splits}")


def _output_shapes(model, batch: dict) -> dict:
    """Shapes and dtypes of ``model``'s outputs (inference mode) on ``batch`` (``jax.eval_shape``)."""
    def outputs(x):
        return model.apply(model.init(jax.random.key(0), x, train=False), x, train=False)

    return jax.eval_shape(outputs, model_input(batch))


def _eval_metric_names(model, data: Data, split: str) -> list[str]:
    """The metrics :func:`_eval_fn` reports for ``model`` on ``split``, from shapes alone
    (``jax.eval_shape`` of the model and the eval statistics on the split's first batch)."""
    batch = next(iter(data.eval_batches(split)))
    shapes = jax.eval_shape(objectives.eval_stats, _output_shapes(model, batch), batch)
    return sorted(objectives.finalize_stats(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)))


def run_transduction(config, workdir: str) -> dict:
    """The main job (module docstring). Returns ``{row: {metric: value}}``."""
    images, videos = Data(config.data, config.data.static), Data(config.data, config.data.video)
    model = _model(config, config.model.name, config.model.kwargs)
    baselines = {name: _model(config, name, config.baseline.kwargs) for name in config.baseline.models}
    _check_inputs(images, "static", 4, "images (H, W, C)")
    _check_inputs(videos, "video", 5, "videos (T, H, W, C)")
    check_data(config, videos, {"static": (model, images), "stage1": (model, videos), "stage2": (model, videos)}
               | {f"baseline_{name}": (mdl, videos) for name, mdl in baselines.items()},
               run_on={"stage1": images, "stage2": images})
    check_transducible(config, model, images)

    static_vars, source = static_variables(config, model, images, workdir, lasso=True)
    rows, first = {}, {}

    def row(name, mdl, variables, video_params, params=None):
        m, out = evaluate_variables(mdl, variables, videos, config.data.eval_split)
        params = count_params(variables["params"]) if params is None else params
        rows[name] = {"params": params, "video_trained_params": video_params} | m
        first[name] = out

    modes, init, dense = _transduction_args(config)
    delta = transduction.transduce(static_vars["params"], modes, "delta", dense=dense)
    # the static model run per frame (its delta temporal factors are identities, not counted)
    row("static (per frame)", model, static_vars | {"params": delta}, 0, count_params(static_vars["params"]))

    transduced = transduction.transduce(static_vars["params"], modes, init, dense=dense)
    # what a stage starts from is in its run config, so a rerun that trains an earlier stage further (its num_steps
    # may change on resume) is refused by a later stage's checkpoints instead of mixing two runs in the results
    upstream = {"static_steps": config.static.num_steps} | ({"static_from": source} if source else {})
    s1 = train_stage(config, "stage1", model, videos, workdir, init_variables=static_vars | {"params": transduced},
                     tx_fn=lambda tx: optim.masked_optimizer(tx, transduced, "temporal"), run_extra=upstream)
    row("transduced, stage 1 (temporal only)", model, _variables(s1), _n_trainable(transduced, "temporal"))
    s2 = train_stage(config, "stage2", model, videos, workdir, init_variables=_variables(s1), lasso=True,
                     run_extra=upstream | {"stage1_steps": config.stage1.num_steps})
    final = _variables(s2)
    row("transduced, stage 2 (fine-tuned)", model, final, count_params(final["params"]))

    for name, mdl in baselines.items():
        b = train_stage(config, f"baseline_{name}", mdl, videos, workdir)
        row(f"from scratch: {name}", mdl, _variables(b), count_params(b.params))

    report = optim.sparsity_report(final["params"], tol=config.sparsity_tol)
    if jax.process_index() == 0:
        write_results(workdir, rows, report, config)
        plots.plot_va_over_time(first, next(iter(videos.eval_batches(config.data.eval_split))),
                                objectives.TARGETS, os.path.join(workdir, "va_over_time.png"))
        optim.plot_sparsity(report, os.path.join(workdir, "lambda_sparsity.png"))
    return rows


def run_supervised(config, workdir: str) -> dict:
    """Train ``config.model`` on ``config.data.static`` with ``config.static``; evaluate."""
    data = Data(config.data, config.data.static)
    model = _model(config, config.model.name, config.model.kwargs)
    check_data(config, data, {"static": (model, data)})
    variables, _ = static_variables(config, model, data, workdir, lasso=True)
    m, _ = evaluate_variables(model, variables, data, config.data.eval_split, config.get("skew_repeats", 0))
    rows = {config.model.name: {"params": count_params(variables["params"])} | m}
    has_cp = bool(tree.cp_layers(variables["params"]))
    report = optim.sparsity_report(variables["params"], tol=config.sparsity_tol) if has_cp else None
    if jax.process_index() == 0:
        write_results(workdir, rows, report, config)
    return rows


def configure_autotune(config, workdir: str) -> None:
    """``config.autotune``: how ``implementation="auto"`` picks each CP conv's path
    (:mod:`hocp_jax.autotune`): ``""`` (default: ``$HOCP_JAX_AUTOTUNE``, else the backend's default,
    ``"measure"`` on GPU and ``"analytic"`` elsewhere: :data:`hocp_jax.autotune.DEFAULT_POLICIES`),
    ``"analytic"`` or ``"measure"``. Both consider each conv on the batch one device of the run's
    data-parallel mesh (all devices) gets. Measured picks are cached in ``workdir/autotune.json``,
    so a resumed job traces the same programs without timing again; with several processes,
    process 0 times the train step's convs before training and the others read its picks from
    that file (:func:`hocp_jax.autotune.agree_across_processes`, called by
    :func:`hocp_jax.training.fit`). ``config.cp_per_sample`` and ``config.cp_tile_rows`` (optional;
    ``None``: the automatic rules) set :func:`hocp_jax.autotune.configure`'s ``per_sample`` and
    ``tile_rows``: the factorized convs one sample (one tile) at a time, the memory option on
    GPU/TPU (README, "Memory")."""
    value, per_sample, tile_rows = _autotune_args(config)
    autotune.configure(value or None, cache_path=os.path.join(workdir, "autotune.json"), batch_shards=jax.device_count(),
                       per_sample=per_sample, tile_rows=tile_rows)


def _autotune_args(config) -> tuple[str, bool | None, int | None]:
    """``(autotune, cp_per_sample, cp_tile_rows)`` of ``config`` (:func:`configure_autotune`), checked."""
    value = config.get("autotune", "")
    if value not in ("", *autotune.POLICIES):
        raise ValueError(f"config.autotune={value!r}: expected '' (the environment's or backend's policy) "
                         f"or one of {autotune.POLICIES}")
    per_sample, tile_rows = config.get("cp_per_sample", None), config.get("cp_tile_rows", None)
    conv_plans.check_automatic_flag(per_sample, "config.cp_per_sample")
    conv_plans.check_tile_rows(tile_rows, "config.cp_tile_rows")
    return value, per_sample, tile_rows


def run(config, workdir: str) -> dict:
    """Dispatches on ``config.job`` (one of ``JOBS``) after :func:`check_config` and
    :func:`configure_autotune`; each job calls :func:`check_data` before its first stage."""
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    configure_autotune(config, workdir)
    return {"transduction": run_transduction, "supervised": run_supervised}[config.job](config, workdir)
