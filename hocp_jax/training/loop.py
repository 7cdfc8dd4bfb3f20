"""The generic training loop :func:`fit` and the batched, sharded :func:`evaluate`.

Resume contract: a checkpoint at step ``s`` holds the state after ``s`` updates and the
data-iterator state after ``s`` batches; step ``s+1`` uses ``fold_in(rng, s)``. So a run
killed at any point and restarted with the same arguments ends with exactly the params of
an uninterrupted run (it redoes the steps after the last complete checkpoint).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from hocp_jax.training.checkpoint import Checkpointer, NonFiniteError
from hocp_jax.training.config import positive_int, validate_config
from hocp_jax.training.logging import MetricLogger
from hocp_jax.training.sharding import (
    batch_sharding, host_value, make_data_mesh, put_batch, put_replicated, replicated,
)
from hocp_jax.training.state import TrainState
from hocp_jax.training.step import INPUT_KEYS, make_eval_step, make_train_step, model_input

FIT_REQUIRED = ("num_steps", "seed")
FIT_OPTIONAL = dict(checkpoint_every=100, keep_checkpoints=3, log_every=10, eval_every=0,
                    stage="train", async_checkpointing=True)
FIT_CHECKS = {
    "num_steps": (positive_int, "an int > 0"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
    "checkpoint_every": (positive_int, "an int > 0"),
    "keep_checkpoints": (positive_int, "an int > 0"),
    "log_every": (positive_int, "an int > 0"),
    "eval_every": (lambda v: isinstance(v, int) and v >= 0, "an int >= 0 (0: only at the end)"),
    "stage": (lambda v: isinstance(v, str) and v != "", "a non-empty str"),
    "async_checkpointing": (lambda v: isinstance(v, bool), "a bool"),
}


def _encode_iter_state(state: Any) -> Any:
    """Iterator state -> JSON (grain DataLoader states are bytes)."""
    return {"base64": base64.b64encode(state).decode()} if isinstance(state, bytes) else state


def _decode_iter_state(state: Any) -> Any:
    return base64.b64decode(state["base64"]) if isinstance(state, dict) and set(state) == {"base64"} else state


def _mean_metrics(pending: list[dict], step: int) -> dict:
    """Host means of per-step metric dicts; raises NonFiniteError on NaN/Inf."""
    means = {k: float(np.mean([host_value(m[k]) for m in pending])) for k in pending[0]}
    bad = sorted(k for k, v in means.items() if not np.isfinite(v))
    if bad:
        raise NonFiniteError(
            f"non-finite {bad} in steps {step - len(pending) + 1}..{step}: {means}. Stopping "
            "without checkpointing; the last good checkpoint is kept."
        )
    return means


def fit(
    model,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    make_train_iter: Callable[[], Iterator[dict]],
    config,
    workdir: str,
    *,
    reg_fn: Callable | None = None,
    init_variables: dict | None = None,
    eval_fn: Callable[[TrainState], dict] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainState:
    """Trains ``model`` for ``config.num_steps`` steps, resuming from ``workdir`` if possible.

    Args:
        model: flax module (see :func:`hocp_jax.training.step.make_train_step`).
        loss_fn: ``(outputs, batch, key) -> (loss, metrics)``.
        tx: optimizer (frozen leaves via ``optax.partition`` + ``set_to_zero`` are fine).
        make_train_iter: ``() -> iterator`` of host batches (dicts of numpy arrays, leading
            axis = this process's batch), positioned at the start, never ending (repeat
            epochs), deterministic, with grain-style ``get_state()`` / ``set_state(s)``
            (JSON-able or bytes) so the position is checkpointed.
        config: dict/ConfigDict with ``num_steps``, ``seed`` and optionally
            ``checkpoint_every`` (100), ``keep_checkpoints`` (3), ``log_every`` (10),
            ``eval_every`` (0 = only at the end), ``stage`` ("train"; a checkpoint of another
            stage in ``workdir`` is an error), ``async_checkpointing`` (True).
        workdir: checkpoints go to ``<workdir>/checkpoints``, logs to ``<workdir>/metrics.jsonl``.
        reg_fn: optional ``params -> scalar`` regulariser added to the loss.
        init_variables: start from these ``{"params", ["batch_stats"]}`` (e.g. a transduced
            model) instead of ``model.init`` with ``fold_in(key(seed), 0)``.
        eval_fn: optional ``state -> dict of scalars`` (e.g. wrapping :func:`evaluate`),
            logged under split "eval" every ``eval_every`` steps and at the end.
        mesh: default :func:`make_data_mesh` (all devices).

    Returns:
        The final (replicated) TrainState at step ``num_steps``.

    Raises:
        NonFiniteError: NaN/Inf in the logged metrics or in a state due for checkpointing.
        ValueError: bad config, an iterator without get_state/set_state, one that ends
            early, or a checkpoint of another stage in ``workdir``.
    """
    validate_config(config, FIT_REQUIRED, FIT_OPTIONAL, checks=FIT_CHECKS)
    c = {**FIT_OPTIONAL, **dict(config)}
    mesh = make_data_mesh() if mesh is None else mesh
    it = make_train_iter()
    if not (hasattr(it, "get_state") and hasattr(it, "set_state")):
        raise ValueError(f"make_train_iter() must return an iterator with get_state/set_state "
                         f"(e.g. a grain iterator) so its position is checkpointed, got {type(it)}")
    init_key, base_key = jax.random.split(jax.random.key(c["seed"]))
    if init_variables is None:
        x = model_input(next(make_train_iter()))
        init_variables = jax.jit(lambda k, x: model.init({"params": k}, x, train=False))(init_key, x)
    # Host copies: the step donates its state, which must never delete the caller's arrays.
    init_variables = jax.tree.map(np.array, dict(init_variables))
    state = put_replicated(TrainState.create(init_variables, tx, base_key), mesh)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=c["checkpoint_every"],
                        keep=c["keep_checkpoints"], async_save=c["async_checkpointing"])
    extra = ckpt.restore_extra()
    if extra is not None:
        if extra["stage"] != c["stage"]:
            raise ValueError(f"{workdir} holds checkpoints of stage {extra['stage']!r}, not "
                             f"{c['stage']!r}: use a separate workdir per stage")
        state, extra = ckpt.restore(state, ckpt.latest_step())
        it.set_state(_decode_iter_state(extra["data_state"]))
    extra_of = lambda: {  # noqa: E731
        "stage": c["stage"],
        "data_state": _encode_iter_state(it.get_state()),
        "config": json.loads(json.dumps(c, default=str)),
    }

    step_fn = jax.jit(
        make_train_step(model, loss_fn, tx, reg_fn),
        in_shardings=(replicated(mesh), batch_sharding(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0,
    )
    start, num_steps, pending = host_value(state.step), c["num_steps"], []
    with ckpt, MetricLogger(workdir) as logger, tqdm.tqdm(
        total=num_steps, initial=start, desc=c["stage"], disable=jax.process_index() != 0
    ) as bar:
        for step in range(start + 1, num_steps + 1):
            try:
                batch = next(it)
            except StopIteration:
                raise ValueError(f"the training iterator ended before step {step}; it must "
                                 "repeat over epochs") from None
            state, metrics = step_fn(state, put_batch(batch, mesh))
            pending.append(metrics)
            last = step == num_steps
            if step % c["log_every"] == 0 or ckpt.is_due(step) or last:
                means = _mean_metrics(pending, step)
                pending = []
                logger.write(step, means)
                bar.set_postfix(loss=f"{means['loss']:.4g}")
            ckpt.save(state, extra_of(), force=last)
            if eval_fn is not None and ((c["eval_every"] and step % c["eval_every"] == 0) or last):
                logger.write(step, eval_fn(state), split="eval")
            bar.update()
        ckpt.wait()
    return state


def evaluate(
    eval_step: Callable,
    state: TrainState,
    batches: Iterable[dict],
    metric_fn: Callable[[dict, dict], dict],
    mesh: jax.sharding.Mesh,
) -> dict:
    """Runs ``eval_step`` over all ``batches`` and computes ``metric_fn`` on the full set.

    Batches of any size are padded to a multiple of the local device count and the padding
    is dropped again, so metrics that do not decompose over batches (PCC, CCC) are exact.
    Every process must pass the same number of batches.

    Args:
        eval_step: ``jax.jit(make_eval_step(model))``
            (:func:`hocp_jax.training.step.make_eval_step`).
        state: replicated TrainState.
        batches: host batches (dicts of ``(B_local, ...)`` numpy arrays).
        metric_fn: ``(outputs, batch) -> dict of scalars``; ``outputs`` are the model's
            outputs and ``batch`` the batch leaves, all concatenated over the dataset
            (global, ``(N, ...)`` numpy arrays). Model-input leaves are not included.
        mesh: the mesh ``state`` lives on.
    """
    n_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    outs, targets = [], []
    for batch in batches:
        b = len(next(iter(batch.values())))
        pad = -b % n_local
        batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in batch.items()}
        batch["_valid"] = np.arange(b + pad) < b
        gbatch = put_batch(batch, mesh)
        out, kept = multihost_utils.process_allgather(
            (eval_step(state, gbatch), {k: v for k, v in gbatch.items() if k not in INPUT_KEYS}),
            tiled=True,
        )
        valid = kept.pop("_valid")
        outs.append(jax.tree.map(lambda v: v[valid], out))
        targets.append(jax.tree.map(lambda v: v[valid], kept))
    if not outs:
        raise ValueError("evaluate() got no batches")
    concat = lambda trees: jax.tree.map(lambda *v: np.concatenate(v), *trees)  # noqa: E731
    return metric_fn(concat(outs), concat(targets))


def make_evaluate_fn(model, batches_fn: Callable[[], Iterable[dict]], metric_fn: Callable,
                     mesh: jax.sharding.Mesh | None = None) -> Callable[[TrainState], dict]:
    """``state -> metrics`` for :func:`fit`'s ``eval_fn``: :func:`evaluate` on ``batches_fn()``."""
    mesh = make_data_mesh() if mesh is None else mesh
    eval_step = jax.jit(make_eval_step(model))
    return lambda state: evaluate(eval_step, state, batches_fn(), metric_fn, mesh)
