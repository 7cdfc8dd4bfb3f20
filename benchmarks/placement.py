"""How far apart this machine's first two CPUs are: the round trip of a cache line between them.

On the 2-core development VM the hypervisor sometimes places the two virtual CPUs in different
last-level-cache domains of the host (most likely different core complexes; the guest cannot see
the host's layout); a cache line then takes about
350 ns instead of about 60 ns to go from one to the other and back (a C probe, EXPERIMENTS.md
"Two speeds"), and every program whose threads hand data to each other slows down, XLA's
factorized conv most. :class:`CrossCoreProbe` measures that round trip between rounds of the
benchmark, so that each round can be read with the placement it ran in.

The probe is pure Python: a partner process pinned to the second CPU and the calling thread,
pinned for the measurement to the first, flip one shared 8-byte word back and forth. The
interpreter adds some 150 ns to each trip, the same in both placements, so the figures read higher
than the C probe's but keep the jump (about 220-260 ns close, 370-420 ns far apart on the
development VM in stop 51). It is noisier than the C probe: in idle scratch checks (stop 51, 103
readings next to C probe readings of 50-85 ns) it read 214-303 ns but for 5 readings of 335-372
ns, so a round near the cut can be misclassed. A round is read as "split" by comparison with the smallest
round trip of the same run (:func:`split_cut`), so a run that never met the close placement reads
all shared: the report gives the range of the readings too. ``python -m benchmarks.placement <file> <cpu>``
is the partner.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

TRIPS, BATCHES = 2000, 5  # round trips per batch; the probe reports the fastest batch
SPINS_BEFORE_CHECK = 1 << 20  # waits longer than this (about 0.1 s) check that the partner still runs
SPLIT_FACTOR = 1.4  # a round trip over this many times a run's smallest counts as the two CPUs far apart


def _shared_word(path: str) -> memoryview:
    """The first 8 bytes of the file ``path``, mapped shared, as a one-item int64 memoryview (its
    item access costs the interpreter less than a NumPy scalar's)."""
    with open(path, "r+b") as f:
        return memoryview(mmap.mmap(f.fileno(), 64)).cast("q")


def split_cut(values) -> float | None:
    """The round trip above which a reading counts as the two CPUs far apart: ``SPLIT_FACTOR``
    times the smallest of ``values`` (None entries skipped; None if there are none)."""
    seen = [v for v in values if v]
    return SPLIT_FACTOR * min(seen) if seen else None


def medians_by_placement(values, roundtrip, cut: float) -> dict[str, dict]:
    """``{"shared" | "split": {"n", "median"}}``: the median of ``values`` over the readings whose
    ``roundtrip`` (same index) is at most / over ``cut`` (``median`` None where there are none)."""
    out = {}
    for label, keep in (("shared", lambda v: v is not None and v <= cut), ("split", lambda v: v is not None and v > cut)):
        kept = [x for x, v in zip(values, roundtrip) if keep(v)]
        out[label] = {"n": len(kept), "median": float(np.median(kept)) if kept else None}
    return out


class CrossCoreProbe:
    """Round trips between the first two CPUs of this process's affinity set, in a partner process.

    ``available`` is False (and :meth:`roundtrip_ns` returns None) with fewer than two CPUs or
    if not ``enabled`` (``bench`` probes only when JAX runs on the CPU). Use as a context manager,
    or :meth:`close`.
    """

    def __init__(self, enabled: bool = True):
        cpus = sorted(os.sched_getaffinity(0))
        self.cpus = tuple(cpus[:2])
        self.available = enabled and len(self.cpus) == 2
        self._proc = None
        if not self.available:
            return
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self._path = tempfile.mkstemp(prefix="hocp_probe_", dir=shm)
        os.close(fd)
        with open(self._path, "wb") as f:
            f.write(bytes(64))  # one cache line, zeroed
        self._word = _shared_word(self._path)
        self._count = 0
        self._proc = subprocess.Popen([sys.executable, "-m", "benchmarks.placement", self._path, str(self.cpus[1])],
                                      stdin=subprocess.PIPE, text=True)

    def roundtrip_ns(self) -> float | None:
        """The fastest of ``BATCHES`` batches of ``TRIPS`` round trips, ns per trip (None if not available)."""
        if not self.available:
            return None
        word, best = self._word, float("inf")
        mask = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {self.cpus[0]})  # this thread only; XLA's threads keep theirs
        try:
            for _ in range(BATCHES):
                self._proc.stdin.write(f"{TRIPS}\n")
                self._proc.stdin.flush()
                v = self._count
                t0 = time.perf_counter()
                for _ in range(TRIPS):
                    word[0] = v + 1
                    spins = 0
                    while word[0] != v + 2:
                        spins += 1
                        if spins > SPINS_BEFORE_CHECK and self._proc.poll() is not None:
                            raise RuntimeError(f"the probe's partner process ended (exit code {self._proc.returncode}); "
                                               "its stderr is above")
                    v += 2
                best = min(best, (time.perf_counter() - t0) / TRIPS)
                self._count = v
        finally:
            os.sched_setaffinity(0, mask)
        return 1e9 * best

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()
            self._proc.wait()
            self._word.release()
            os.remove(self._path)
            self._proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def partner(path: str, cpu: int) -> None:
    """Answers each line ``n`` of stdin with ``n`` round trips on the word shared through ``path``."""
    os.sched_setaffinity(0, {cpu})
    word = _shared_word(path)
    v = 0
    for line in sys.stdin:
        for _ in range(int(line)):
            while word[0] != v + 1:
                pass
            word[0] = v + 2
            v += 2


if __name__ == "__main__":
    partner(sys.argv[1], int(sys.argv[2]))
