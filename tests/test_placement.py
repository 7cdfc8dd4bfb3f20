"""``benchmarks.placement``: the cross-core probe runs and reads a plausible time, and the bench
report splits rounds by its readings as a hand count does (no timings asserted)."""
import math
import os
import subprocess
import sys

import pytest

from benchmarks import bench, placement


def test_split_cut_and_medians_by_placement_count_by_hand():
    assert placement.split_cut([None, 500.0, 800.0]) == pytest.approx(placement.SPLIT_FACTOR * 500.0)
    assert placement.split_cut([None]) is None
    m = placement.medians_by_placement([1.0, 5.0, 3.0, 7.0], [100.0, 300.0, 120.0, None], cut=140.0)
    assert m == {"shared": {"n": 2, "median": 2.0}, "split": {"n": 1, "median": 5.0}}
    assert placement.medians_by_placement([1.0], [300.0], cut=140.0)["shared"] == {"n": 0, "median": None}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_probe_reads_a_round_trip_between_two_cpus_and_cleans_up():
    with placement.CrossCoreProbe() as probe:
        assert probe.available and len(set(probe.cpus)) == 2
        path = probe._path
        first, second = probe.roundtrip_ns(), probe.roundtrip_ns()  # the partner stays in step between calls
        assert os.sched_getaffinity(0) >= set(probe.cpus)  # the calling thread's CPUs are given back
    for v in (first, second):
        assert math.isfinite(v) and 10.0 < v < 1e6  # ns per trip: a cache line, not a sleep
    assert not os.path.exists(path)


def test_probe_is_unavailable_on_one_cpu_or_when_disabled():
    with placement.CrossCoreProbe(enabled=False) as probe:
        assert not probe.available and probe.roundtrip_ns() is None
    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mask)})
    try:
        with placement.CrossCoreProbe() as probe:
            assert not probe.available and probe.roundtrip_ns() is None
    finally:
        os.sched_setaffinity(0, mask)


def test_report_splits_each_layers_and_steps_rounds_by_the_probe():
    times = {"factorized": [1.0, 4.0, 1.0], "dense": [2.0, 2.0, 2.0], "dense patches": [4.0, 4.0, 4.0],
             "torch dense": [1.0, 1.0, 1.0], "tltorch cp reconstructed": [8.0, 8.0, 8.0],
             "tltorch cp factorized": [0.5, 4.0, 0.5]}
    layer = {"name": "conv2", "auto_choice": "factorized", "roundtrip_ns": [100.0, 200.0, 110.0], "times_ms": times,
             "ms": {k: sorted(v)[1] for k, v in times.items()}}
    steps = [{"name": "ref", "reference": None, "times_ms": [10.0, 10.0, 10.0], "roundtrip_ns": [100.0, 100.0, 300.0]},
             {"name": "hocp", "reference": "ref", "times_ms": [5.0, 6.0, 20.0], "roundtrip_ns": [100.0, 100.0, 300.0]}]
    results = {"conv": {"jester": [layer]}, "models": steps, "machine": {"roundtrip_probe_cpus": [0, 1]}}
    lines = bench.placement_lines(results)
    # cut = 1.4 x 100 ns: rounds 1 and 3 of the layer are shared, round 2 split
    assert "| conv2 | auto / JAX dense | 2 / 1 | 0.50 | 2.00 |" in lines
    assert "| conv2 | auto / faster JAX dense | 2 / 1 | 0.50 | 2.00 |" in lines  # lax's conv, faster than patches
    assert "| conv2 | auto / PyTorch dense | 2 / 1 | 1.00 | 4.00 |" in lines
    assert "| conv2 | auto / TensorLy-Torch best | 2 / 1 | 2.00 | 1.00 |" in lines  # its factorized path, median 0.5 ms
    assert "| **stack** | auto / JAX dense | | 0.50 | 2.00 |" in lines
    assert "| **stack** | auto / TensorLy-Torch best | | 2.00 | 1.00 |" in lines
    assert "| hocp | / ref | 2 / 1 | 0.55 | 2.00 |" in lines
    assert bench.placement_lines({"conv": {}, "models": [], "machine": {}}) == []


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_probe_fails_instead_of_waiting_forever_when_its_partner_is_gone():
    with placement.CrossCoreProbe() as probe:
        partner = probe._proc
        # a partner that takes the command, then ends without a single trip
        probe._proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"],
                                       stdin=subprocess.PIPE, text=True)
        with pytest.raises(RuntimeError, match="partner process ended"):
            probe.roundtrip_ns()
        probe._proc.stdin.close()
        probe._proc = partner
