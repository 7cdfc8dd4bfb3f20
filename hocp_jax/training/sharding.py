"""Data parallelism over every device of every process: one mesh axis ``"data"``.

Params, batch stats, optimizer state and RNG are *replicated* (``P()``); every batch leaf
is *sharded* on its leading (batch) axis (``P("data")``). Under ``jax.jit`` XLA then
computes means, batch-norm statistics and gradients over the GLOBAL batch (inserting the
all-reduces itself), so a run on 8 devices gives the same numbers as on 1 device, up to
float summation order. On CPU devices the steps are traced on their mesh (:func:`on_mesh`), so
that the CP convs run each device's share with their per-sample and tile loops.

Multi-host: start the same program on every host, call
:func:`hocp_jax.training.distributed.maybe_initialize_distributed` first, let each host load
only ITS part of the batch (``global_batch / process_count`` examples; see
``jax.process_index()``), and :func:`put_batch` assembles the global array with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from hocp_jax import conv_plans

DATA_AXIS = "data"


def make_data_mesh(devices: list | None = None) -> Mesh:
    """1-D mesh ``("data",)`` over ``devices`` (default: all devices of all processes).

    The axis is ``AxisType.Auto`` (GSPMD propagation): models may reshape a sharded batch
    axis (e.g. video ``(B, T, ...) -> (B*T, ...)``) without sharding annotations. ``devices``
    other than a non-empty sequence of distinct devices is a ValueError.
    """
    listed = jax.devices() if devices is None else list(devices) if isinstance(devices, Iterable) else None
    if not (listed and all(isinstance(d, jax.Device) for d in listed) and len(set(listed)) == len(listed)):
        raise ValueError(f"devices={devices!r}: expected a non-empty sequence of distinct jax devices")
    return jax.make_mesh((len(listed),), (DATA_AXIS,), (AxisType.Auto,), devices=listed)


def _check_mesh(mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh={mesh!r}: expected a jax.sharding.Mesh (e.g. make_data_mesh())")
    if mesh.axis_names != (DATA_AXIS,):
        raise ValueError(f"mesh: a mesh of axes {mesh.axis_names} (shape {dict(mesh.shape)}); expected one axis "
                         f"{DATA_AXIS!r} (make_data_mesh(devices)): the trainer splits batches over {DATA_AXIS!r} "
                         "and keeps a whole copy of the parameters on every device")


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (params, opt state, metrics)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over ``"data"``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree (e.g. the TrainState) on every device of ``mesh``.

    Every process must pass the same values (true for a state built from the same seed
    or restored from the same checkpoint). With several processes each one fills its own
    devices (``jax.device_put`` cannot address the others').
    """
    _check_mesh(mesh)
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def local_devices(mesh: Mesh) -> int:
    """How many of ``mesh``'s devices belong to this process."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def local_batch_size(batch) -> int:
    """``B_local``, the leading axis every leaf of ``batch`` (this process's examples) shares; a
    ValueError for a batch that is not a non-empty dict of arrays with one such axis of size >= 1."""
    if not isinstance(batch, Mapping) or not batch:
        got = f"a {type(batch).__name__}" if not isinstance(batch, Mapping) else "an empty dict"
        raise ValueError(f"batch: expected a dict of arrays (name -> (B_local, ...)), got {got}")
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"batch leaves must share a leading batch axis, got sizes {sizes}")
    b = next(iter(sizes.values()))
    if b == 0:
        raise ValueError(f"batch: no examples (leading axes {sizes}); expected at least one")
    return b


def agreed_batch_size(sizes: list[int], what: str) -> int:
    """The one size in ``sizes`` (every process's local batch size, :func:`hocp_jax.processes.every_value`),
    else a ValueError naming each process's: ``jax.make_array_from_process_local_data`` would build
    a global batch of another shape on each process, and the step would train on a wrong mean."""
    if len(set(sizes)) > 1:
        raise ValueError(
            f"{what}: the processes hold {dict(enumerate(sizes))} examples (process: local batch size); "
            "expected the same number on every process, the global batch divided by the process count")
    return sizes[0]


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, *, size: int | None = None) -> dict[str, jax.Array]:
    """Host batch -> global batch-sharded arrays.

    Args:
        batch: this process's examples, every leaf ``(B_local, ...)``; on one host
            ``B_local`` is the global batch size. With several processes every process must pass
            the same ``B_local`` (:func:`agreed_batch_size` checks it: ``fit`` and
            ``make_evaluator`` do at their first batch).
        mesh: from :func:`make_data_mesh`.
        size: ``B_local`` expected (the size the processes agreed on), or None (not checked).

    Returns:
        Leaves of global shape ``(B_local * process_count, ...)``, sharded on axis 0.

    Raises:
        ValueError: ``batch`` is not a non-empty dict or ``mesh`` not a Mesh, leaves disagree on
            ``B_local``, it is 0, not ``size``, or not divisible by the number of this process's
            devices in the mesh.
    """
    b = local_batch_size(batch)
    _check_mesh(mesh)
    if size is not None and b != size:
        raise ValueError(f"batch: {b} examples on this process, expected {size}, the size every process's first "
                         "batch had: with several processes every batch must have it")
    n_local = local_devices(mesh)
    if b % n_local:
        raise ValueError(
            f"per-process batch size {b} must be divisible by the {n_local} local "
            "devices of the mesh (pad it, or change batch_size)"
        )
    return jax.make_array_from_process_local_data(batch_sharding(mesh), batch)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of ``x``, an array split on its first axis over a 1-D mesh (as
    :func:`put_batch` makes, and a step's batch-split outputs), in the order the process passed
    them: its shards sorted by their first row. (A process's devices need not be neighbours in
    the mesh, e.g. on a TPU pod: then its rows are not one block of the global array.)"""
    shards = sorted(x.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data) for shard in shards])


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """``fn`` (a jitted step, whose batch is split over all of ``mesh``) called, and so traced, with
    ``mesh`` as the context mesh (``jax.set_mesh``) and ``conv_plans.batch_shards_mode(mesh.size)``.
    The CP convs then see the batch split (:func:`hocp_jax.conv_plans.batch_split`) and on the CPU
    backend run each device's share in a program of its own, with their per-sample and tile loops;
    the step's numbers stay those of one device (the convs treat each sample alone). ``fn`` itself
    on one device or another backend, where nothing depends on it; called where ``mesh`` is
    already the context mesh (inside a function that ``on_mesh`` wraps, e.g. ``jax.eval_shape``,
    whose trace refuses a ``set_mesh`` of its own), ``fn`` is called as it is."""
    _check_mesh(mesh)
    if jax.default_backend() != "cpu" or mesh.size == 1:
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if jax.sharding.get_abstract_mesh() == mesh.abstract_mesh:
            return fn(*args, **kwargs)
        with jax.set_mesh(mesh), conv_plans.batch_shards_mode(mesh.size):
            return fn(*args, **kwargs)

    return call


def host_value(x: Any) -> Any:
    """A replicated (possibly multi-host) 0-d array, or a Python/numpy scalar -> Python scalar."""
    return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x).item()
