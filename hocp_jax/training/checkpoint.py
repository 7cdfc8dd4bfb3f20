"""Orbax checkpoints of the full :class:`TrainState` plus a small JSON "extra" item.

A step directory ``<directory>/<step>/`` holds two items: ``state`` (the TrainState pytree,
restored with its sharding) and ``extra`` (JSON: data-iterator position, stage name,
config, ...). A state with a non-finite float leaf (or non-finite loss metric) is never
written: :meth:`Checkpointer.save` raises :class:`NonFiniteError` first, so the last good
checkpoint always survives a diverged run. A checkpoint that cannot be read back (damaged
file) is moved to ``<directory>.damaged/<step>`` with a warning by
:meth:`Checkpointer.restore_latest`, which falls back to the previous one -- keep at least
2 checkpoints. :func:`restore_variables` reads only the model variables of a checkpoint (to
start a run from another run's weights, whatever its optimizer).
"""

from __future__ import annotations

import glob
import itertools
import logging
import math
import os
import shutil
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from hocp_jax.checks import check_flags, check_int, check_positive_int, dangling_link, is_path
from hocp_jax.processes import all_agree, common_values, on_every_process, on_process_zero
from hocp_jax.training.sharding import host_value
from hocp_jax.training.state import TrainState


class NonFiniteError(FloatingPointError):
    """Training produced NaN/Inf (loss, gradients or parameters)."""


@jax.jit
def _finite_leaves(tree):
    return jax.tree.map(
        lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True, tree
    )


def check_finite(state: TrainState, metrics: dict | None = None) -> None:
    """Raises :class:`NonFiniteError` naming every non-finite leaf of ``state``/``metrics``.

    Args:
        state: a TrainState (float leaves of params, batch_stats, opt_state are checked).
        metrics: optional dict of scalar metrics (e.g. the last step's loss).
    """
    tree = {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}
    flags = jax.tree_util.tree_flatten_with_path(_finite_leaves(tree))[0]
    bad = [jax.tree_util.keystr(path) for path, ok in flags if not host_value(ok)]
    bad += [f"metrics[{k!r}]={v}" for k, v in (metrics or {}).items()
            if not math.isfinite(host_value(v))]
    if bad:
        raise NonFiniteError(
            f"non-finite values at step {host_value(state.step)} in: {', '.join(bad[:10])}"
            f"{' ...' if len(bad) > 10 else ''}. Not checkpointing; the last good checkpoint is "
            "kept. Lower the learning rate, check the data, or add optax.apply_if_finite."
        )


class Checkpointer:
    """Periodic, keep-N checkpointing of ``(TrainState, extra JSON)``.

    Args:
        directory: absolute or relative path; created if missing.
        save_every: save when ``step % save_every == 0`` (``force=True`` saves any step).
        keep: number of most recent checkpoints kept on disk (orbax deletes the one saved first);
            with ``keep=1`` the directory holds the last checkpoint saved, whatever its step
            (``best/``: a better state of an earlier step, evaluated after a resume, replaces it).
        async_save: write in a background thread (after a blocking device->host copy).

    Raises:
        ValueError: ``directory`` is not a path (``""``: the current directory is refused) or is
            a file, or a bad ``save_every``, ``keep`` or ``async_save``.
    """

    def __init__(self, directory, *, save_every: int, keep: int = 3, async_save: bool = True):
        directory = _directory(directory, "directory")
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"directory={directory!r}: a file; expected a directory")
        link = dangling_link(directory)
        if link:
            raise ValueError(f"directory={directory!r}: {link} is a symbolic link to {os.readlink(link)!r}, which "
                             "does not exist; expected a directory")
        self.save_every = check_positive_int(save_every, "save_every")
        self.keep = check_positive_int(keep, "keep")
        check_flags(async_save=async_save)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def is_due(self, step: int) -> bool:
        """Whether the periodic schedule saves at ``step`` (``step % save_every == 0``)."""
        return step % self.save_every == 0

    def save(self, state: TrainState, extra: dict, *, step: int | None = None,
             metrics: dict | None = None, force: bool = False) -> bool:
        """Saves ``state`` at ``step`` if due (or ``force``); returns whether it did.

        Args:
            step: ``state.step`` as a Python int, tracked by the caller; None reads it from
                the device (a device->host sync). A step already on disk is not saved again.

        Raises:
            NonFiniteError: ``state`` or ``metrics`` has NaN/Inf; nothing is written.
            ValueError: ``step`` is not an int >= 0, or (``keep`` > 1) it is older than the newest
                checkpoint of the directory, which orbax, keeping checkpoints by save time, could
                delete before older ones; nothing is written.
        """
        step = check_int(int(host_value(state.step)) if step is None else step, "step", 0)
        steps = self.manager.all_steps()
        if not (force or self.is_due(step)) or step in steps:
            return False
        if self.keep > 1 and steps and step < max(steps):
            raise ValueError(f"step={step}: older than the newest checkpoint of {self.manager.directory}, step "
                             f"{max(steps)}; a save must not delete newer checkpoints: use another directory")
        check_finite(state, metrics)
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
            force=True,
        )

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict] | None:
        """Restores ``(state, extra)`` from ``step`` (default: latest); None if no checkpoint.

        Args:
            target: a TrainState of the right structure/shapes/shardings (e.g. a freshly
                initialized one); arrays are restored with ``target``'s shardings (numpy leaves
                as numpy arrays).

        Raises:
            ValueError: the checkpoint's arrays have other shapes than ``target``'s.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()),
        )
        # orbax checks the shapes of jax arrays only; numpy ones come back as stored
        pairs = zip(jax.tree_util.tree_flatten_with_path(target)[0], jax.tree.leaves(restored.state))
        wrong = [f"{jax.tree_util.keystr(path)}: {np.shape(got)} stored, {np.shape(want)} expected"
                 for (path, want), got in pairs if np.shape(got) != np.shape(want)]
        if wrong:
            raise ValueError(f"the checkpoint {self.manager.directory}/{step} has other shapes than the target: "
                             f"{_some(wrong)}")
        return restored.state, restored.extra

    def restore_extra(self, step: int | None = None) -> dict | None:
        """Only the JSON "extra" item of ``step`` (default: latest); None if no checkpoint. Each
        process reads it alone (no collectives: a read failing on one process raises there only)."""
        self.manager.wait_until_finished()  # a step being written counts in latest_step()
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return restore_extra(os.path.join(os.fspath(self.manager.directory), str(step)))

    def restore_extra_agreed(self) -> tuple[dict | None, str | None]:
        """``(extra, None)`` of the newest checkpoint when every process read it (each alone,
        :meth:`restore_extra`), ``(None, None)`` when no process lists one, else ``(None, why)``
        on every process: all of them act on the same answer. A collective."""
        try:
            extra, why = self.restore_extra(), None
        except Exception as err:  # orbax/tensorstore raise many types for bad files
            extra, why = None, f"{type(err).__name__}: {err}"
        if all_agree(extra is None and why is None):
            return None, None
        if all_agree(extra is not None):
            return extra, None
        return None, why or "unreadable or not listed on another process"

    def restore_latest(self, target: TrainState) -> tuple[TrainState, dict] | None:
        """``(state, extra)`` of the newest checkpoint that can be read; None if there is none.

        Checkpoints that fail to restore (truncated or corrupt files) while an older one
        restores are moved to ``<directory>.damaged/<step>`` with a warning, so a damaged
        latest checkpoint costs the steps since the one before, not the run. With several
        processes they agree on each step: each first reads it alone, without collectives, and
        one that fails on any process counts as failed on all (else a process failing inside
        orbax's restore would skip its barriers and the others would wait, or train on, alone).

        Raises:
            ValueError: no checkpoint restores into ``target`` (most likely another model or
                optimizer than the one that wrote them); nothing is moved.
        """
        self.manager.wait_until_finished()
        failed = []
        for step in sorted(common_values(self.all_steps()), reverse=True):  # listings may lag on some hosts
            # several processes: each first reads the step alone (orbax's restore has barriers a
            # process that fails inside it would skip), then they restore it together only if all could
            why = self._unreadable_here(target, step) if jax.process_count() > 1 else None
            restored = None
            if all_agree(why is None):
                try:
                    restored, why = self.restore(target, step), None
                except Exception as err:  # orbax/tensorstore raise many types for bad files
                    why = f"{type(err).__name__}: {str(err)[:300]}"
            if not all_agree(why is None):
                failed.append((step, why or "it failed to restore on another process"))
                continue
            for bad, why in failed:
                self._quarantine(bad, why)
            return restored
        if failed:
            raise ValueError(f"no checkpoint in {self.manager.directory} restores into this state "
                             f"(another model or optimizer?); newest error: step {failed[0][0]}: {failed[0][1]}")
        return None

    def _unreadable_here(self, target: TrainState, step: int) -> str | None:
        """Why this process alone cannot read ``step`` into ``target``'s shapes (into host memory,
        the CPU backend, where there is one, else one local device; with an orbax manager of this
        process only: no collectives), or None."""
        try:
            device = jax.local_devices(backend="cpu")[0]  # not an accelerator's memory, which the state may outgrow
        except (RuntimeError, ValueError):  # JAX_PLATFORMS without cpu
            device = jax.local_devices()[0]
        local = jax.sharding.SingleDeviceSharding(device)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local), target)
        try:
            with _alone(self.manager.directory) as alone:
                alone.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                            extra=ocp.args.JsonRestore()))
        except Exception as err:  # orbax/tensorstore raise many types for bad files
            return f"{type(err).__name__}: {str(err)[:300]}"
        return None

    def _quarantine(self, step: int, why: str) -> None:  # every process calls it (a collective)
        """Moves ``step`` to ``<directory>.damaged/<step>`` (``<step>.1``, ... if a damaged copy of
        that step is already there: nothing is deleted), process 0 moving for all."""
        root = os.fspath(self.manager.directory) + ".damaged"
        damaged = os.path.join(root, str(step))
        for n in itertools.count(1):
            if not os.path.exists(damaged):
                break
            damaged = os.path.join(root, f"{step}.{n}")
        warnings.warn(f"checkpoint {self.manager.directory}/{step} cannot be restored ({why}); moved "
                      f"to {damaged}; resuming from the previous checkpoint", RuntimeWarning, stacklevel=3)

        def move():
            os.makedirs(root, exist_ok=True)
            shutil.move(os.path.join(os.fspath(self.manager.directory), str(step)), damaged)

        on_process_zero(move, f"moving the damaged checkpoint {step} to {damaged}")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until background saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _alone(directory, item_handlers: dict | None = None) -> ocp.CheckpointManager:
    """A read-only manager of ``directory`` for this process alone (its barriers involve no other
    process); orbax's "directory is read only" warning, which would read as a problem with the
    checkpoints on every resume, is filtered out while it is made. ``item_handlers``: as
    ``ocp.CheckpointManager``'s (then only those items can be read)."""
    me = jax.process_index()
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0, multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"hocp_alone_{me}"))
    quiet = lambda record: "is read only" not in record.getMessage()  # noqa: E731
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
        return ocp.CheckpointManager(directory, item_handlers=item_handlers, options=options)
    finally:
        absl_logger.removeFilter(quiet)


def restore_variables(path, like: dict | None = None, *, name: str = "path") -> tuple[dict, str]:
    """``(variables, step_dir)``: the model variables ``{"params": ..., ["batch_stats": ...]}`` of
    a checkpoint written by :class:`Checkpointer`, as host numpy arrays (the caller places them),
    and the absolute step directory they were read from. Only these two collections are read,
    not the optimizer state nor the RNG key: the run that wrote it may have used another optimizer.

    With several processes, a collective: each process reads alone (no orbax barriers), all read
    the newest step that every one of them lists, and a failure on any raises on every process.

    Args:
        path: a step directory (``<stage>/checkpoints/1200``, ``<stage>/best/800``); a Checkpointer
            directory (``<stage>/checkpoints`` or ``<stage>/best``: its newest step); or a stage
            directory (``<workdir>/stage1``: the newest step of its ``checkpoints/``, not of its
            ``best/``: pass ``<stage>/best`` for the best evaluated state).
        like: optional ``{"params", ["batch_stats"]}`` tree of the variables the model expects,
            leaves with ``.shape`` and ``.dtype`` (e.g. ``jax.eval_shape`` of ``model.init``): the
            checkpoint must hold the same leaves (key paths) with the same shapes; they are cast
            to ``like``'s dtypes.
        name: what ``path`` is called in error messages (e.g. ``"config.init_from"``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` holds no checkpoint (a job workdir: the message lists its stages), or
            it cannot be read, does not match ``like`` or holds NaN/Inf.
    """
    what = f"{name}={path!r}"
    path = _directory(path, name)
    if like is not None and (not isinstance(like, Mapping) or "params" not in like
                             or set(like) - {"params", "batch_stats"}):
        raise ValueError(f"like must be a dict of 'params' and optionally 'batch_stats', got {like!r:.200}")
    found = {}
    on_every_process(lambda: found.update(_find_checkpoints(path, what)), "restore_variables")
    steps = common_values(found["steps"])  # listings may lag on some hosts
    if not steps:  # only with several processes: _find_checkpoints raised on an empty listing
        raise ValueError(f"{what}: no checkpoint of {found['directory']} that every process lists")
    step_dir = os.path.join(found["directory"], str(steps[-1]))
    read = {}
    on_every_process(lambda: read.update(variables=_read_variables(step_dir, like, what)), "restore_variables")
    return read["variables"], step_dir


def restore_extra(step_dir) -> dict:
    """The JSON "extra" item of the checkpoint ``step_dir`` (``<directory>/<step>``: its stage,
    data position and run config, or ``best/``'s metric), read by this process alone."""
    directory, step = os.path.split(_directory(step_dir, "step_dir"))
    if not step.isdigit():
        raise ValueError(f"step_dir={step_dir!r}: expected a checkpoint's step directory, <directory>/<step>")
    if not os.path.isdir(os.path.join(directory, step)):
        raise FileNotFoundError(f"step_dir={step_dir!r}: no such directory")
    try:
        with _alone(directory, item_handlers={"extra": ocp.JsonCheckpointHandler()}) as manager:
            return manager.restore(int(step), args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra
    except Exception as err:  # orbax raises KeyError (no such item), JSON errors, ... for what is not a checkpoint
        raise ValueError(f"step_dir={step_dir!r}: cannot read the checkpoint's 'extra' item (a checkpoint of "
                         f"hocp_jax's Checkpointer?): {type(err).__name__}: {str(err)[:300]}") from err


def finished_steps(directory) -> list[int]:
    """The complete checkpoints of a :class:`Checkpointer` directory, as this process lists them
    (read-only: nothing created; ``[]`` where the directory does not exist)."""
    directory = _directory(directory, "directory")
    if not os.path.isdir(directory):
        return []
    with _alone(directory) as manager:
        return list(manager.all_steps())


def _directory(path, name: str) -> str:
    """The absolute path of ``path``, a str or ``os.PathLike`` (``~`` expanded); a ValueError
    naming ``name`` for anything else or an empty path (which would be the current directory)."""
    if not is_path(path):
        raise ValueError(f"{name}={path!r}: expected the path of a checkpoint directory")
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def _find_checkpoints(path: str, what: str) -> dict:
    """``{"directory": <Checkpointer directory>, "steps": [<step>, ...]}`` that the absolute
    ``path`` names (see :func:`restore_variables`; a step directory: only its step)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: no such directory")
    if not os.path.isdir(path):
        raise ValueError(f"{what}: a file; expected a checkpoint's directory (a step, checkpoints/, best/ or stage "
                         "directory)")
    parent, base = os.path.split(path)
    if base.isdigit() and int(base) in finished_steps(parent):
        return {"directory": parent, "steps": [int(base)]}
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = finished_steps(path)
    if steps:
        return {"directory": path, "steps": steps}
    stages = [d for d in sorted(glob.glob(os.path.join(glob.escape(path), "*")))
              if os.path.isdir(os.path.join(d, "checkpoints"))]
    if stages:
        raise ValueError(f"{what}: a job workdir; expected one of its stages: {', '.join(stages)}")
    raise ValueError(f"{what}: no complete checkpoint in {path}; expected a step directory (<stage>/checkpoints/"
                     "<step>), a <stage>/checkpoints or <stage>/best directory, or a stage directory")


def _read_variables(step_dir: str, like: dict | None, what: str) -> dict:
    """The "params" and "batch_stats" (omitted if empty) of the checkpoint ``step_dir`` as numpy
    arrays, checked against ``like`` (and cast to its dtypes) and for NaN/Inf."""
    directory, step = os.path.split(step_dir)
    try:  # the state item without a target: its metadata gives the tree, then only these subtrees are read
        # "extra" too, unread: else item_metadata warns that it found an item it cannot read
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()}
        with _alone(directory, item_handlers=handlers) as manager:
            tree = manager.item_metadata(int(step)).state.tree
            item = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[k])
                    for k in ("params", "batch_stats")}
            to_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
            variables = manager.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item, restore_args=to_numpy, partial_restore=True))).state
    except Exception as err:  # orbax/tensorstore raise many types for bad files
        raise ValueError(f"{what}: cannot read the model variables of {step_dir} "
                         f"({type(err).__name__}: {str(err)[:300]})") from err
    flat = traverse_util.flatten_dict(variables)
    bad = ["/".join(k) for k, v in flat.items() if jnp.issubdtype(v.dtype, jnp.inexact) and not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"{what}: the checkpoint {step_dir} holds NaN/Inf in {_some(bad)}")
    if like is not None:
        want = traverse_util.flatten_dict(like)
        keys = lambda ks: ["/".join(k) for k in ks]  # noqa: E731
        wrong = [f"{label}: {_some(items)}" for label, items in (
            ("missing", keys(k for k in want if k not in flat)),
            ("unexpected", keys(k for k in flat if k not in want)),
            ("other shapes", [f"{'/'.join(k)}: {flat[k].shape} in the checkpoint, {tuple(want[k].shape)} expected"
                              for k in want if k in flat and flat[k].shape != tuple(want[k].shape)])) if items]
        if wrong:
            raise ValueError(f"{what}: the checkpoint {step_dir} does not hold this model's variables (another model "
                             f"or model.kwargs?); {'; '.join(wrong)}")
        flat = {k: np.asarray(v, dtype=want[k].dtype) for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat)


def _some(items: list[str], n: int = 8) -> str:
    """The first ``n`` of ``items``, comma-separated, and how many there are if more."""
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")
