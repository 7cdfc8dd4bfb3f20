"""Work that process 0 of a ``jax.distributed`` run does for all processes.

:func:`on_process_zero` runs a function on process 0 (take the workdir lock, build a dataset,
time the CP convs) and tells every process whether it failed, so that a failure raises on
every process instead of leaving the others waiting in the next collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

MESSAGE_BYTES = 4096


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
    error, status = None, np.zeros(MESSAGE_BYTES + 1, np.uint8)
    if jax.process_index() == 0:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 -- raised below, on every process
            error = err
            text = f"{type(err).__name__}\n{err}".encode()[:MESSAGE_BYTES]
            status[0], status[1:1 + len(text)] = 1, np.frombuffer(text, np.uint8)
    status = np.asarray(multihost_utils.broadcast_one_to_all(status))
    if error is not None:
        raise error
    if status[0]:
        cls_name, _, message = bytes(status[1:]).rstrip(b"\0").decode(errors="replace").partition("\n")
        shared = {cls.__name__: cls for cls in (ValueError, FileNotFoundError, *errors)}
        cls = shared.get(cls_name, RuntimeError)
        raise cls(f"on process 0 ({name}): {message}" + ("" if cls_name in shared else f" [{cls_name}]"))
