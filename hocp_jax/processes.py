"""Work that process 0 of a ``jax.distributed`` run does for all processes, or each for itself.

:func:`on_process_zero` runs a function on process 0 (take the workdir lock, build a dataset,
time the CP convs) and tells every process whether it failed, so that a failure raises on
every process instead of leaving the others waiting in the next collective.
:func:`on_every_process` runs it on every process (check a host-local copy of a dataset) and
raises on all of them if it failed on any; :func:`every_result` does so and gathers what it returned (this
process's batch size). :func:`all_agree`, :func:`every_value` and
:func:`common_values` compare a value across processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

MESSAGE_BYTES = 4096
_STATUS_BYTES = 1 + MESSAGE_BYTES + 8  # failed?, the error's class and message, then the int fn returned


def on_process_zero(fn: Callable[[], None], name: str, errors: Sequence[type[Exception]] = ()) -> None:
    """Runs ``fn()`` on process 0 while the other processes wait, then tells them whether it
    raised. If it did, process 0 re-raises and every other process raises an error of the same
    class when it is ValueError, FileNotFoundError or one of ``errors`` (else a RuntimeError),
    with process 0's message (up to ``MESSAGE_BYTES``) and ``name``. With one process, just
    ``fn()``. Every process must call it at the same point of the program: it is a collective
    (``multihost_utils.broadcast_one_to_all``)."""
    if jax.process_count() == 1:
        fn()
        return
    error, status = _run(_zero(fn)) if jax.process_index() == 0 else (None, np.zeros(_STATUS_BYTES, np.uint8))
    status = np.asarray(multihost_utils.broadcast_one_to_all(status))
    if error is not None:
        raise error
    if status[0]:
        _raise(status, 0, name, errors)


def on_every_process(fn: Callable[[], None], name: str, errors: Sequence[type[Exception]] = ()) -> None:
    """Runs ``fn()`` on every process, then tells all of them whether it raised anywhere: a
    process where it raised re-raises, the others raise an error of the same class as the first
    failed process's (as :func:`on_process_zero`) naming that process. A collective: every
    process must call it at the same point. With one process, just ``fn()``."""
    every_result(_zero(fn), name, errors)


def every_result(fn: Callable[[], int], name: str, errors: Sequence[type[Exception]] = ()) -> list[int]:
    """Every process's ``fn()``, an int, in process order, once it ran on every process; if it
    raised on any, it raises on all, as :func:`on_every_process`. One collective (a gather of
    :data:`MESSAGE_BYTES` and the int); with one process, ``[fn()]``."""
    if jax.process_count() == 1:
        return [int(fn())]
    error, status = _run(fn)
    statuses = np.asarray(multihost_utils.process_allgather(status)).reshape(jax.process_count(), -1)
    if error is not None:
        raise error
    failed = np.flatnonzero(statuses[:, 0])
    if failed.size:
        _raise(statuses[failed[0]], int(failed[0]), name, errors)
    return np.ascontiguousarray(statuses[:, -8:]).view(np.int64).ravel().tolist()


def all_agree(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (a collective when there are several)."""
    return all(every_value(bool(ok)))


def every_value(value: int) -> list[int]:
    """The int ``value`` of every process, in process order (a collective when there are several)."""
    if jax.process_count() == 1:
        return [int(value)]
    return np.asarray(multihost_utils.process_allgather(np.asarray([int(value)]))).ravel().tolist()


def common_values(values) -> list[int]:
    """The ints in ``values`` on every process (e.g. the checkpoint steps each one lists; a
    listing that lags on one host must not make the processes restore different steps). A
    collective when there are several processes."""
    values = sorted({int(v) for v in values})
    if jax.process_count() == 1:
        return values
    longest = max(every_value(len(values)))
    padded = np.full(longest, -1, np.int64)
    padded[:len(values)] = values
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), longest)
    shared = set.intersection(*(set(row[row >= 0].tolist()) for row in everyone))
    return sorted(int(v) for v in shared)


def _zero(fn: Callable[[], Any]) -> Callable[[], int]:
    """``fn`` returning 0 (what it returns is not sent)."""
    def run() -> int:
        fn()
        return 0

    return run


def _run(fn: Callable[[], int]) -> tuple[Exception | None, np.ndarray]:
    """``(error or None, status)``: status[0] = 1 if ``fn()`` raised, then its class name and message;
    else its last 8 bytes hold the int it returned."""
    status = np.zeros(_STATUS_BYTES, np.uint8)
    try:
        value = fn()
    except Exception as err:  # noqa: BLE001 -- raised by the caller, on every process
        text = f"{type(err).__name__}\n{err}".encode()[:MESSAGE_BYTES]
        status[0], status[1:1 + len(text)] = 1, np.frombuffer(text, np.uint8)
        return err, status
    status[-8:] = np.frombuffer(np.int64(value).tobytes(), np.uint8)
    return None, status


def _raise(status: np.ndarray, process: int, name: str, errors: Sequence[type[Exception]]) -> None:
    cls_name, _, message = bytes(status[1:1 + MESSAGE_BYTES]).rstrip(b"\0").decode(errors="replace").partition("\n")
    shared = {cls.__name__: cls for cls in (ValueError, FileNotFoundError, *errors)}
    cls = shared.get(cls_name, RuntimeError)
    raise cls(f"on process {process} ({name}): {message}" + ("" if cls_name in shared else f" [{cls_name}]"))
