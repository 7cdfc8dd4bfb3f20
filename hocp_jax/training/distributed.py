"""Several processes: starting ``jax.distributed``, and one run per workdir.

* :func:`maybe_initialize_distributed` -- call first: initializes ``jax.distributed`` when
  the environment says there are several processes (explicit ``JAX_COORDINATOR_ADDRESS``,
  or a SLURM / Open MPI / MPICH job of several tasks, or a multi-host Cloud TPU), else does
  nothing.
* :class:`WorkdirLock` -- refuses a second, independent run writing the same workdir (e.g.
  the same command started on N hosts without ``jax.distributed``: N processes that each
  believe they are process 0 of 1).
* :class:`PreemptionNotice` -- a SIGTERM (a scheduler's preemption notice) seen by the training
  loop at a step boundary, the same step on every process, so that it checkpoints and stops
  (:class:`Preempted`) instead of losing the steps since the last checkpoint.

Process 0 takes the lock for a ``jax.distributed`` run (:func:`hocp_jax.processes.on_process_zero`).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import threading
import time

import jax
from jax.experimental import multihost_utils

from hocp_jax.checks import check_real, is_path
from hocp_jax.processes import on_process_zero

# environment variable -> (cluster, number of processes) when several processes run
CLUSTER_SIZE_VARS = {"SLURM_NTASKS": "SLURM", "OMPI_COMM_WORLD_SIZE": "Open MPI", "PMI_SIZE": "MPICH"}


def _env_int(name: str, default: int | None) -> int | None:
    """``$name`` as an int, ``default`` where it is unset or empty; a ValueError naming it otherwise."""
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"${name}={value!r}: expected an integer") from None


def detected_cluster() -> str | None:
    """Name of the multi-process launcher in the environment, or None (one process)."""
    for var, name in CLUSTER_SIZE_VARS.items():
        if _env_int(var, 1) > 1:
            return name
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU"
    return None


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Initializes multi-process JAX when there are several processes; a no-op otherwise.

    Explicit: pass the arguments, or export ``JAX_COORDINATOR_ADDRESS=host0:1234`` (plus
    ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` where no launcher sets them) on every host.
    Automatic: under SLURM (``srun``, several tasks), Open MPI / MPICH (``mpirun -n N``) and
    on multi-host Cloud TPU, ``jax.distributed.initialize()`` detects everything itself. On
    CPU the cross-process collectives are gloo (jax's default). Must run before any other
    JAX call. An address that is not ``host:port`` (e.g. an empty ``JAX_COORDINATOR_ADDRESS``,
    which ``jax.distributed`` would read even under a launcher) is a ValueError.

    Returns:
        True if ``jax.distributed`` is initialized after the call.
    """
    if jax.distributed.is_initialized():
        return True
    name = "coordinator_address" if coordinator_address else "$JAX_COORDINATOR_ADDRESS"
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator_address is not None:
        if ":" not in str(coordinator_address):
            raise ValueError(f"{name}={coordinator_address!r}: expected 'host:port' (unset, to run one process or "
                             "let a launcher's variables decide)")
        _initialize(f"{name}={coordinator_address!r} is set: where no launcher says how many processes run and "
                    "which one this is, set $JAX_NUM_PROCESSES and $JAX_PROCESS_ID too (or pass num_processes and "
                    "process_id)",
                    coordinator_address=coordinator_address,
                    num_processes=num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES", None),
                    process_id=process_id if process_id is not None else _env_int("JAX_PROCESS_ID", None))
        return True
    cluster = detected_cluster()
    if cluster is not None:
        _initialize(f"the environment says a {cluster} job of several processes runs ({_cluster_vars()}), whose "
                    "other variables JAX reads: start the processes with the launcher, or set "
                    "$JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and $JAX_PROCESS_ID, or unset those variables to "
                    "run one process")
        return True
    return False


def _cluster_vars() -> str:
    """The launcher variables :func:`detected_cluster` read, as ``NAME=value``."""
    names = [*CLUSTER_SIZE_VARS, "TPU_WORKER_HOSTNAMES"]
    return ", ".join(f"{n}={os.environ[n]}" for n in names if os.environ.get(n))


def _initialize(hint: str, **kwargs) -> None:
    """``jax.distributed.initialize(**kwargs)``; its ValueError (a setting it lacks, e.g. "Number of
    processes must be defined.") raised again with ``hint``, which says what the user must set."""
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as err:
        raise ValueError(f"jax.distributed could not start: {err} ({hint})") from None


class Preempted(Exception):
    """The run got a preemption notice (SIGTERM) and saved a checkpoint at ``step`` in ``workdir``
    (the stage's directory); the same command resumes it."""

    def __init__(self, workdir: str, step: int):
        super().__init__(f"preempted (SIGTERM): {workdir} checkpointed at step {step}; run the same command "
                         "again to resume")
        self.workdir, self.step = workdir, step


_SYNC_IDS = itertools.count(1)  # step ids of the preemption sync points: increasing over all fit calls of a process


class PreemptionNotice:
    """Whether the run got a SIGTERM, asked once per training step (:meth:`noticed`), True at the
    same step on every process.

    With ``jax.distributed`` (several processes, or one under a cluster launcher), JAX's preemption
    sync manager handles SIGTERM (it is installed by ``jax.distributed.initialize``):
    ``multihost_utils.reached_preemption_sync_point`` is True on every process at the first step
    all of them reach after the notice (a local check per step, no collective). Otherwise, while
    the context is open, a SIGTERM handler sets a flag that :meth:`noticed` returns; a SIGTERM that
    no step saw (e.g. during the last step's evaluation) is raised again on exit, with the previous
    handler back (the default one ends the process), so it is never swallowed. Outside the main
    thread no handler can be installed, nor over one installed outside Python: SIGTERM keeps its
    previous action there.
    """

    def __init__(self):
        self._flag = False
        self._previous = None

    def __enter__(self) -> PreemptionNotice:
        # a handler not installed from Python (getsignal gives None) could not be put back: left alone
        if (not jax.distributed.is_initialized() and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is not None):
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self._flag = True

    def noticed(self) -> bool:
        """Call once at every training step (the same calls on every process): whether to save and
        stop now. (The sync point's step ids count these calls over all ``fit`` calls of the
        process: a stage's steps restart at 1.)"""
        if jax.distributed.is_initialized():
            try:
                return multihost_utils.reached_preemption_sync_point(next(_SYNC_IDS))
            except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
                return False
        return self._flag

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
            if self._flag and exc[0] is None:  # not seen by any step: deliver it as if no handler had been here
                self._flag = False
                signal.raise_signal(signal.SIGTERM)


class WorkdirInUseError(RuntimeError):
    """Another run is writing the workdir."""


_HELD: set[str] = set()  # the lock files this process holds now


def _pid_started(pid: int) -> str | None:
    """When process ``pid`` started (boot id and start time in clock ticks from
    ``/proc``), so that a pid reused by another process, or this same pid in a restarted
    container, is not mistaken for the run that wrote a lock; None where ``/proc`` is absent."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            ticks = f.read().rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces
        return f"{boot}/{ticks}"
    except (OSError, IndexError):
        return None


class WorkdirLock:
    """``<workdir>/run.lock``: JSON ``{host, pid, pid_started, process_count, started}`` held by
    process 0.

    While held, a daemon thread touches the file every ``heartbeat_s`` seconds. Entering
    raises :class:`WorkdirInUseError` when the lock belongs to another run that is alive: a
    live process on this host that is the one that wrote the lock (same pid and, on Linux,
    same start time, so a reused pid or a restarted container with the same pid is not), a
    lock this very process holds, or (on another host, where liveness cannot be checked) a
    file touched less than ``stale_s`` seconds ago (``heartbeat_s``: a finite number > 0, ``stale_s``
    larger; else a ValueError). A lock of a killed run (dead pid on this
    host, or stale) is taken over, so resuming after ``kill -9`` just works. In a ``jax.distributed``
    run process 0 takes the lock for the run and every process raises if it could not
    (:func:`hocp_jax.processes.on_process_zero`).
    """

    def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_s: float = 120.0):
        if not is_path(workdir):
            raise ValueError(f"workdir={workdir!r}: expected a directory path")
        check_real(heartbeat_s, "heartbeat_s", lambda v: 0 < v < float("inf"), "a finite real number > 0")
        check_real(stale_s, "stale_s", lambda v: v > heartbeat_s, f"a real number > heartbeat_s={heartbeat_s!r}")
        self.path = os.path.join(workdir, "run.lock")
        self.heartbeat_s, self.stale_s = float(heartbeat_s), float(stale_s)
        self._stop = threading.Event()
        self._thread = None

    def _owner_alive(self, owner: dict) -> bool:
        if owner.get("host") == socket.gethostname():
            if owner.get("pid") == os.getpid():
                return os.path.realpath(self.path) in _HELD  # else a former process with our pid
            try:
                os.kill(int(owner["pid"]), 0)
            except (ProcessLookupError, KeyError, ValueError, TypeError):
                return False
            except PermissionError:
                pass
            started, now = owner.get("pid_started"), _pid_started(int(owner["pid"]))
            return started is None or now is None or started == now  # unreadable /proc (hidepid): alive
        return time.time() - os.path.getmtime(self.path) < self.stale_s

    def __enter__(self) -> WorkdirLock:
        on_process_zero(self._acquire, f"lock {self.path}", errors=(WorkdirInUseError,))
        return self

    def _acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _pid_started(os.getpid()),
              "process_count": jax.process_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(self.path) as f:
                    owner = json.load(f)
            except (OSError, ValueError):
                owner = {}
            if owner and self._owner_alive(owner):
                raise WorkdirInUseError(
                    f"{os.path.dirname(self.path)} is in use by another run ({owner}); start each "
                    "host's process under one jax.distributed run (see README, several hosts), or "
                    f"use another workdir. If no such run is alive, delete {self.path}.") from None
            fd = os.open(self.path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY)  # a dead run's lock
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _HELD.add(os.path.realpath(self.path))
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        _HELD.discard(os.path.realpath(self.path))
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
