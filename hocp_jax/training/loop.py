"""The generic training loop :func:`fit` and the batched, sharded :func:`evaluate`.

Resume contract: a checkpoint at step ``s`` holds the state after ``s`` updates and the
data-iterator state after ``s`` batches; step ``s+1`` uses ``fold_in(rng, s)``. So a run
killed at any point and restarted with the same arguments ends with exactly the params of
an uninterrupted run (it redoes the steps after the last complete checkpoint, and drops
their lines from ``metrics.jsonl`` so that no step is logged twice). A SIGTERM stops the
run at the next step, checkpointed (:class:`~hocp_jax.training.distributed.Preempted`).

No device->host transfer happens between log intervals: the step is counted on the host
(restored once from the checkpoint), and metrics are fetched only when they are logged.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
import optax
import tqdm

from hocp_jax import autotune
from hocp_jax.training.checkpoint import Checkpointer, NonFiniteError
from hocp_jax.checks import is_int, is_positive_int
from hocp_jax.training.config import validate_config
from hocp_jax.training.distributed import Preempted, PreemptionNotice, WorkdirLock
from hocp_jax.training.metric_log import MetricLogger
from hocp_jax.processes import every_result, on_every_process
from hocp_jax.training.sharding import (
    agreed_batch_size, batch_sharding, host_value, local_batch_size, local_devices, make_data_mesh, on_mesh,
    put_batch, put_replicated, replicated,
)
from hocp_jax.training.state import TrainState
from hocp_jax.training.step import make_eval_step, make_train_step, model_input

FIT_REQUIRED = ("num_steps", "seed")
FIT_OPTIONAL = dict(checkpoint_every=100, keep_checkpoints=3, log_every=10, eval_every=0,
                    best_metric="", stage="train", async_checkpointing=True, run={}, profile_steps=0,
                    microbatches=1)
# config keys a resumed run may change; any other difference from the checkpoint's is an error
RESUME_MAY_CHANGE = ("num_steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every",
                     "async_checkpointing", "profile_steps")
FIT_CHECKS = {
    "num_steps": (is_positive_int, "an int > 0"),
    "seed": (is_int, "an int"),
    "checkpoint_every": (is_positive_int, "an int > 0"),
    "keep_checkpoints": (lambda v: is_positive_int(v) and v >= 2,
                         "an int >= 2 (a damaged latest checkpoint falls back to the previous one)"),
    "log_every": (is_positive_int, "an int > 0"),
    "eval_every": (lambda v: is_int(v) and v >= 0, "an int >= 0 (0: only at the end)"),
    "best_metric": (lambda v: isinstance(v, str), "a metric name of eval_fn's results, or '' (none)"),
    "stage": (lambda v: isinstance(v, str) and v != "", "a non-empty str"),
    "async_checkpointing": (lambda v: isinstance(v, bool), "a bool"),
    "run": (lambda v: isinstance(v, dict), "a dict"),
    "profile_steps": (lambda v: is_int(v) and v >= 0, "an int >= 0 (0: no profile)"),
    "microbatches": (is_positive_int, "an int > 0 (1: the whole batch at once)"),
}


_ABSENT = object()
_UNSET = (None, {}, [])  # a key absent on one side and unset on the other: no change (e.g. a newer default)


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (JSON values: tuples read as lists)."""
    out = {}
    for k, v in json.loads(json.dumps(d, default=str)).items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_checkpoint(extra: dict, c: dict, workdir: str) -> None:
    """A checkpoint's ``extra`` was written by this stage and this run (:func:`check_same_run`)."""
    if extra.get("stage") != c["stage"]:
        raise ValueError(f"{workdir} holds checkpoints of stage {extra.get('stage')!r}, not "
                         f"{c['stage']!r}: use a separate workdir per stage")
    stored, now = extra.get("processes"), jax.process_count()  # (checkpoints of older versions do not say)
    if stored is not None and stored != now:
        raise ValueError(f"{workdir} holds checkpoints of a run of {stored} process(es), and this one has {now}: each "
                         "process reads its own shard of the data, so on another count a resumed run would not see "
                         f"the batches the interrupted one would; resume it on {stored} process(es), or train in "
                         "another workdir from its parameters (e.g. train.py's --config.init_from)")
    check_same_run(extra.get("config", {}), c, workdir)


def check_same_run(stored: dict, config: dict, workdir: str) -> None:
    """A ValueError naming every key of ``config`` (the fit config, ``run`` included) that
    differs from ``stored``, the config saved with the checkpoint being resumed, except
    :data:`RESUME_MAY_CHANGE`: a resumed run must be the run that wrote its checkpoints (a new
    seed, batch size or learning rate would silently mix two runs). Keys a checkpoint of an
    older version did not store are not compared, except :data:`FIT_OPTIONAL` ones, which count
    as their default (e.g. ``microbatches`` as 1), and those under ``run`` once it stored one (a
    key absent on one side and None or empty on the other is no change)."""
    old, new = _flat(stored), _flat(config)
    has_run = any(k == "run" or k.startswith("run.") for k in old)
    diffs = []
    for k in sorted(old.keys() | new.keys()):
        added = k not in old and k in FIT_OPTIONAL and k != "run"  # e.g. microbatches: stored as its default
        if k.split(".")[0] in RESUME_MAY_CHANGE or (k not in old and not added and not (has_run and k.startswith("run."))):
            continue
        a, b = FIT_OPTIONAL[k] if added else old.get(k, _ABSENT), new.get(k, _ABSENT)
        if a == b or (a is _ABSENT and b in _UNSET) or (b is _ABSENT and a in _UNSET):
            continue
        diffs.append(f"{k}: {'(absent)' if a is _ABSENT else repr(a)} -> {'(absent)' if b is _ABSENT else repr(b)}")
    if diffs:
        raise ValueError(f"{workdir} holds checkpoints of a run with another config ({'; '.join(diffs)}): resume "
                         "with the same values, or use another workdir (only " + ", ".join(RESUME_MAY_CHANGE)
                         + " may change on resume)")


def _encode_iter_state(state: Any) -> Any:
    """Iterator state -> JSON (grain DataLoader states are bytes)."""
    return {"base64": base64.b64encode(state).decode()} if isinstance(state, bytes) else state


def _decode_iter_state(state: Any) -> Any:
    return base64.b64decode(state["base64"]) if isinstance(state, dict) and set(state) == {"base64"} else state


def _mean_metrics(pending: list[dict], step: int) -> dict:
    """Host means of per-step metric dicts (one transfer); raises NonFiniteError on NaN/Inf."""
    fetched = jax.device_get([{k: v.addressable_data(0) for k, v in m.items()} for m in pending])
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    bad = sorted(k for k, v in means.items() if not np.isfinite(v))
    if bad:
        raise NonFiniteError(
            f"non-finite {bad} in steps {step - len(pending) + 1}..{step}: {means}. Stopping "
            "without checkpointing; the last good checkpoint is kept."
        )
    return means


class _Best:
    """Keeps ``<workdir>/best`` = the checkpoint with the best ``metric`` seen by eval_fn
    (minimised if its name contains "rmse" or "loss", else maximised); its extra also holds the
    run's ``config`` (:func:`hocp_jax.training.trained.load_trained` rebuilds the model from it)."""

    def __init__(self, workdir: str, metric: str, config: dict):
        self.metric, self.config = metric, config
        self.sign = -1.0 if ("rmse" in metric or "loss" in metric) else 1.0
        self.ckpt = Checkpointer(os.path.join(workdir, "best"), save_every=1, keep=1, async_save=False)
        extra, why = self.ckpt.restore_extra_agreed()
        if why is not None:  # a damaged best/: the next evaluation replaces it, on every process
            warnings.warn(f"{workdir}/best cannot be read ({why}): the next evaluation replaces it",
                          RuntimeWarning, stacklevel=2)
        self.value = None if extra is None else extra["value"]

    def update(self, state: TrainState, step: int, results: dict) -> None:
        if self.metric not in results:
            raise ValueError(f"best_metric={self.metric!r} is not among the eval metrics {sorted(results)}")
        value = float(results[self.metric])
        if math.isnan(value):  # a diverged evaluation (NaN metrics) is never the best, nor blocks a later one
            return
        if self.value is None or self.sign * value > self.sign * self.value:
            self.value = value
            extra = {"metric": self.metric, "value": value, "step": step, "config": self.config}
            self.ckpt.save(state, extra, step=step, force=True)

    def close(self) -> None:
        self.ckpt.close()


class _Profile:
    """The JAX profiler over ``n`` steps of a stage, from the second step this run of it trains
    (the first compiles; a run of one step traces none), into ``<workdir>/profile``
    (``profile/process<i>`` with several processes): TensorBoard's profile plugin reads it, as
    does :class:`jax.profiler.ProfileData`."""

    def __init__(self, workdir: str, start: int, num_steps: int, n: int):
        self.first = start + 2  # (a run of one step traces nothing: its step compiles)
        self.last = min(self.first + n - 1, num_steps)
        multi = jax.process_count() > 1
        self.directory = os.path.join(workdir, "profile", *([f"process{jax.process_index()}"] if multi else []))
        self.active = False

    def step(self, step: int):
        """A context for step ``step``'s input and dispatch: the trace starts at the first traced
        step, and each traced step is marked (the profiler's step-time views read the marks)."""
        if step == self.first and step <= self.last:
            jax.profiler.start_trace(self.directory)
            self.active = True
        return jax.profiler.StepTraceAnnotation("train", step_num=step) if self.active else contextlib.nullcontext()

    def after(self, step: int, state: TrainState) -> None:
        if self.active and step == self.last:
            jax.block_until_ready(state)  # the traced steps' device work ends inside the trace: the one host sync
            self.stop()
            if jax.process_index() == 0:
                print(f"profile: steps {self.first}..{self.last} traced to {self.directory}", flush=True)

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


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
            ``checkpoint_every`` (100), ``keep_checkpoints`` (3, at least 2),
            ``log_every`` (10), ``eval_every`` (0 = only at the end), ``best_metric`` (""; a
            key of ``eval_fn``'s results: the best state so far is kept in
            ``<workdir>/best``), ``stage`` ("train"; a checkpoint of another stage in
            ``workdir`` is an error), ``async_checkpointing`` (True), ``profile_steps`` (0; N > 0:
            the JAX profiler traces N steps from the second this call trains, the first compiling,
            into ``<workdir>/profile``: one host sync, after them), ``microbatches`` (1; k > 1: the
            model runs on k micro-batches of each batch in turn, the loss and gradient the whole
            batch's: :func:`~hocp_jax.training.step.make_train_step`), ``run`` ({}: a JSON-able
            description of what else defines the run, e.g. model, loss, optimizer, data; saved
            with each checkpoint, and resuming with a different one, or a different ``seed``,
            is an error: :func:`check_same_run`).
        workdir: checkpoints go to ``<workdir>/checkpoints``, logs to ``<workdir>/metrics.jsonl``
            (train lines also carry ``steps_per_s`` and ``eta_s``); held with a
            :class:`~hocp_jax.training.distributed.WorkdirLock`.
        reg_fn: optional ``params -> scalar`` regulariser added to the loss.
        init_variables: start from these ``{"params", ["batch_stats"]}`` (e.g. a transduced
            model) instead of ``model.init`` with ``fold_in(key(seed), 0)``.
        eval_fn: optional ``state -> dict of scalars`` (e.g. wrapping :func:`make_evaluator`),
            logged under split "eval" every ``eval_every`` steps and at the end.
        mesh: default :func:`make_data_mesh` (all devices).

    Under the measured autotune (:mod:`hocp_jax.autotune`) with several processes, process 0
    times the train step's CP convs before the first step, for all processes
    (:func:`hocp_jax.autotune.agree_across_processes`); ``autotune.configure(batch_shards=n)``
    with the mesh's size has them timed on the batch one device runs (``train.py`` does both) and,
    on the CPU backend, run on each device's share in a program of its own, with their loops
    (the step is traced on the mesh: :func:`~hocp_jax.training.sharding.on_mesh`).

    Returns:
        The final (replicated) TrainState at step ``num_steps``.

    Raises:
        NonFiniteError: NaN/Inf in the logged metrics or in a state due for checkpointing.
        Preempted: a SIGTERM (a scheduler's preemption notice) was seen at a step
            (:class:`~hocp_jax.training.distributed.PreemptionNotice`; the same step on every
            process): that step was checkpointed, its due evaluation left to the resume.
        ValueError: bad config, an iterator without get_state/set_state, one that ends
            early, a checkpoint of another stage or run in ``workdir``, or one past ``num_steps``.
        WorkdirInUseError: another live run holds ``workdir``.
    """
    validate_config(config, FIT_REQUIRED, FIT_OPTIONAL, checks=FIT_CHECKS)
    c = {**FIT_OPTIONAL, **dict(config)}
    mesh = make_data_mesh() if mesh is None else mesh
    made = {}

    def make() -> None:  # on every process: one whose data fails must not leave the others at the lock
        made["it"] = make_train_iter()
        if not (hasattr(made["it"], "get_state") and hasattr(made["it"], "set_state")):
            raise ValueError(f"make_train_iter() must return an iterator with get_state/set_state "
                             f"(e.g. a grain iterator) so its position is checkpointed, got {type(made['it'])}")
        if init_variables is None:  # a fresh iterator's first batch gives the model's input shapes
            made["x"] = model_input(_next_batch(make_train_iter(), 1))

    on_every_process(make, "the training iterator")
    it = made["it"]
    init_key, base_key = jax.random.split(jax.random.key(c["seed"]))
    if init_variables is None:
        init_variables = jax.jit(lambda k, x: model.init({"params": k}, x, train=False))(init_key, made["x"])
    # Host copies: the step donates its state, which must never delete the caller's arrays.
    init_variables = jax.tree.map(np.array, dict(init_variables))
    state = put_replicated(TrainState.create(init_variables, tx, base_key), mesh)

    lock = WorkdirLock(workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=c["checkpoint_every"],
                        keep=c["keep_checkpoints"], async_save=c["async_checkpointing"])
    with PreemptionNotice() as notice, lock, ckpt:
        latest_extra, _ = ckpt.restore_extra_agreed()  # unreadable: restore_latest below deals with it
        if latest_extra is not None:  # before the restore, whose error would not say why
            _check_checkpoint(latest_extra, c, workdir)
        start, eval_due = 0, False
        restored = ckpt.restore_latest(state)
        if restored is not None:
            state, extra = restored
            eval_due = extra.get("eval_due", False)  # saved on a preemption notice before its evaluation
            _check_checkpoint(extra, c, workdir)  # the one restored (the newest may be unreadable)
            it.set_state(_decode_iter_state(extra["data_state"]))
            start = int(host_value(state.step))  # the one read of the device step
            if start > c["num_steps"]:
                raise ValueError(
                    f"num_steps={c['num_steps']} (stage {c['stage']!r}), but the checkpoint restored from "
                    f"{workdir} is at step {start}: set num_steps >= {start} to report or continue that run, "
                    "or use another workdir")
        step_fn = on_mesh(jax.jit(
            make_train_step(model, loss_fn, tx, reg_fn, microbatches=c["microbatches"]),
            in_shardings=(replicated(mesh), batch_sharding(mesh)),
            out_shardings=(replicated(mesh), replicated(mesh)),
            donate_argnums=0,
        ), mesh)
        _agree_on_conv_paths(step_fn, state, make_train_iter, mesh)
        return _train(step_fn, it, state, start, c, workdir, ckpt, eval_fn, mesh, notice, eval_due)


def _agree_on_conv_paths(step_fn, state: TrainState, make_train_iter: Callable[[], Iterator[dict]], mesh) -> None:
    """With several processes and the measured autotune: process 0 traces ``step_fn`` on the
    global batch's shapes (those of a fresh iterator's first batch, times the process count)
    before any process traces it for real (:func:`hocp_jax.autotune.agree_across_processes`), on
    ``mesh`` as ``step_fn`` (:func:`~hocp_jax.training.sharding.on_mesh`) is."""
    def trace():
        n = jax.process_count()
        spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct((a.shape[0] * n, *a.shape[1:]), a.dtype,
                                                           sharding=batch_sharding(mesh)), next(make_train_iter()))
        on_mesh(jax.eval_shape, mesh)(step_fn, state, spec)  # as step_fn is traced (a no-op where it is one)

    autotune.agree_across_processes(trace)


def _train(step_fn, it, state, start, c, workdir, ckpt, eval_fn, mesh, notice, eval_due) -> TrainState:
    """The loop of :func:`fit` from step ``start`` (a host int) to ``c["num_steps"]``; ``eval_due``:
    the checkpoint of ``start`` was saved on a preemption notice before its due evaluation."""
    config = json.loads(json.dumps(c, default=str))
    extra_of = lambda eval_due=False: {  # noqa: E731
        "stage": c["stage"],
        "processes": jax.process_count(),
        "data_state": _encode_iter_state(it.get_state()),
        "config": config,
        "eval_due": eval_due,
    }
    best = _Best(workdir, c["best_metric"], config) if c["best_metric"] else None
    num_steps, pending, size = c["num_steps"], [], None
    profile = _Profile(workdir, start, num_steps, c["profile_steps"])
    clock, clock_step = time.perf_counter(), start
    try:
        redone_eval = start if eval_due else None
        with MetricLogger(workdir, drop_after=start, drop_eval_at=redone_eval) as logger, tqdm.tqdm(
            total=num_steps, initial=start, desc=c["stage"], disable=jax.process_index() != 0
        ) as bar:
            if eval_due and eval_fn is not None:  # the evaluation a preempted run left to its resume
                results = eval_fn(state)
                logger.write(start, results, split="eval")
                if best is not None:
                    best.update(state, start, results)
            for step in range(start + 1, num_steps + 1):
                with profile.step(step):  # (the input pipeline's work in the trace too)
                    if size is None and jax.process_count() > 1:  # the first batch: read and compared on all
                        batch, size = _first_batch(it, step)
                    else:
                        batch = _next_batch(it, step)
                    state, metrics = step_fn(state, put_batch(batch, mesh, size=size))
                pending.append(metrics)
                profile.after(step, state)
                last = step == num_steps
                preempted = notice.noticed()  # a preemption notice: save this step and stop
                stop = preempted and not last
                due = ckpt.is_due(step) or last or stop
                evaluate = eval_fn is not None and ((c["eval_every"] and step % c["eval_every"] == 0) or last)
                if step % c["log_every"] == 0 or due:
                    means = _mean_metrics(pending, step)
                    pending = []
                    now = time.perf_counter()
                    rate = (step - clock_step) / max(now - clock, 1e-9)
                    clock, clock_step = now, step
                    logger.write(step, means | {"steps_per_s": rate, "eta_s": (num_steps - step) / rate})
                    bar.set_postfix(loss=f"{means['loss']:.4g}")
                if stop:  # the evaluation (if due) is left to the resume: the notice leaves little time
                    ckpt.save(state, extra_of(eval_due=evaluate), step=step, force=True)
                    ckpt.wait()
                    raise Preempted(workdir, step)
                # evaluate before saving: a run killed during the evaluation of a checkpoint step
                # resumes from the checkpoint before it and evaluates that step again; an evaluation
                # that raises still lets the step's checkpoint be written
                if evaluate:
                    try:
                        results = eval_fn(state)
                    except BaseException:
                        if due:
                            ckpt.save(state, extra_of(), step=step, force=last)
                            ckpt.wait()
                        raise
                    logger.write(step, results, split="eval")
                    if best is not None:
                        best.update(state, step, results)
                if due:
                    ckpt.save(state, extra_of(), step=step, force=last)
                bar.update()
                if preempted:  # at the last step: evaluated and saved as usual, then stop (no later step sees it)
                    ckpt.wait()
                    raise Preempted(workdir, step)
            ckpt.wait()
    finally:
        profile.stop()
        if best is not None:
            best.close()
    return state


def make_evaluator(
    model,
    stats_fn: Callable[[dict, dict], Any],
    merge_fn: Callable[[Any, Any], Any],
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[TrainState, Iterable[dict]], Any]:
    """``evaluator(state, batches) -> stats``: streams ``batches`` through the model.

    Each batch is padded (:func:`pad_batch`), put on the mesh, and reduced on the device to
    ``stats_fn(outputs, batch)`` (jittable, e.g. :func:`hocp_jax.training.objectives.eval_stats`);
    ``merge_fn(a, b)`` (jittable) combines them. Only the final stats come back to the host
    (numpy pytree), so a split of any size needs the memory of a couple of batches. ``stats_fn``
    must weight by ``batch["mask"]``; stats are over the global batches. With several processes
    every process must pass the same number of batches; each batch is read on all of them together
    (one host gather of a few KiB per batch), so that one whose batches end first, or whose read or
    batch fails, is a ValueError (or its own error) on every process, not a wait in the next step.
    Their first batches may differ in size: every batch is padded to the largest first one (padded
    to this process's devices), so the processes build one global batch; a later batch larger than
    that is a ValueError.
    """
    mesh = make_data_mesh() if mesh is None else mesh
    eval_step = make_eval_step(model)
    stats_step = on_mesh(jax.jit(lambda state, batch: stats_fn(eval_step(state, batch), batch),
                                 out_shardings=replicated(mesh)), mesh)
    merge = jax.jit(merge_fn, out_shardings=replicated(mesh))

    def evaluator(state: TrainState, batches: Iterable[dict]) -> Any:
        acc, previous, size = None, None, None
        for count, (batch, sizes) in enumerate(_read_on_every_process(batches, local_devices(mesh)), 1):
            if sizes is not None and size is None:  # the first batch: one size for all processes
                size = max(sizes)
            elif sizes is not None and max(sizes) > size:  # (raised on every process, before the step)
                raise ValueError(f"the evaluation batches: batch {count} holds {dict(enumerate(sizes))} examples "
                                 f"(process: local batch size, rounded up to its devices), more than the {size} every "
                                 "process's batches are padded to (the largest first batch): with several processes "
                                 "a later batch may not be larger")
            stats = stats_step(state, put_batch(pad_batch(batch, mesh, size), mesh, size=size))
            acc = stats if acc is None else merge(acc, stats)
            if previous is not None:  # at most two batches in flight: bounded device memory
                jax.block_until_ready(previous)
            previous = acc
        if acc is None:
            raise ValueError("the evaluator got no batches")
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), acc)

    return evaluator


def pad_batch(batch: dict, mesh: jax.sharding.Mesh, size: int | None = None) -> dict:
    """``batch`` (``B`` examples) padded to ``size`` examples (default: the next multiple of this
    process's devices in ``mesh``) by repeating its last example, so :func:`put_batch` takes it;
    ``"mask"`` (size,) is 0 on the padding (times the batch's own "mask"). A ValueError for a
    batch that is not a non-empty dict of arrays of one batch size >= 1, or larger than ``size``."""
    b = local_batch_size(batch)
    if size is not None and b > size:
        raise ValueError(f"batch: {b} examples on this process, more than the {size} every process's batches are "
                         "padded to (the largest first batch): with several processes a later batch may not be larger")
    pad = -b % local_devices(mesh) if size is None else size - b
    padded = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in batch.items()}
    valid = (np.arange(b + pad) < b).astype(np.float32)
    padded["mask"] = valid * padded["mask"] if "mask" in padded else valid
    return padded


def _next_batch(it: Iterator[dict], step: int) -> dict:
    """``next(it)``, the batch of training step ``step``; a ValueError where the iterator ended."""
    try:
        return next(it)
    except StopIteration:
        raise ValueError(f"the training iterator ended before step {step}; it must repeat over epochs") from None


def _first_batch(it: Iterator[dict], step: int) -> tuple[dict, int]:
    """With several processes: the batch of ``step``, the first this run trains, and the local batch
    size of every process (:func:`~hocp_jax.training.sharding.agreed_batch_size`), read and sized on
    every process together, so that a process whose read fails, or whose batch is malformed, makes
    every process raise, instead of leaving the others waiting in the step."""
    got = {}

    def read() -> int:
        got["batch"] = _next_batch(it, step)
        return local_batch_size(got["batch"])

    sizes = every_result(read, "the training batches")
    return got["batch"], agreed_batch_size(sizes, "the training batches")


def _read_on_every_process(batches: Iterable[dict], multiple: int) -> Iterator[tuple[dict, list[int] | None]]:
    """``(batch, sizes)`` for each of ``batches``: ``sizes`` is every process's local batch size,
    rounded up to ``multiple`` (None with one process). With several processes every batch is read
    and sized on every process together (:func:`hocp_jax.processes.every_result`, one gather of a few
    KiB per batch), so that a process whose read fails, whose batch is malformed or whose batches
    end first makes every process raise, instead of leaving the others waiting in the next step."""
    if jax.process_count() == 1:
        yield from ((batch, None) for batch in batches)
        return
    iterator, got = iter(batches), {}

    def read() -> int:
        got["batch"] = next(iterator, None)
        b = 0 if got["batch"] is None else local_batch_size(got["batch"])
        return b + -b % multiple

    for count in itertools.count():
        sizes = every_result(read, "the evaluation batches")
        if not any(sizes):
            return
        if not all(sizes):
            raise ValueError(f"the evaluation batches: process(es) {[p for p, b in enumerate(sizes) if not b]} passed "
                             f"{count} batches, the others more; every process must pass the same number (pad the "
                             "last ones, their examples masked out, as hocp_jax.data.pipeline.eval_batches does)")
        yield got["batch"], sizes
