"""``benchmarks.bench``: how many rounds a case gets (no timings asserted), and the files of a run
without layer benchmarks."""
import functools
import json
import mmap
import os
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp

import pytest

from benchmarks import bench, peers


def test_every_case_gets_the_minimum_rounds_whatever_its_budget():
    calls = {"a": lambda: None, "b": lambda: None}
    spent_budget = bench.time_interleaved(calls, repeats=15, budget_s=0.0)  # over budget after round 1
    assert bench.MIN_ROUNDS == 9
    assert [len(v["times_ms"]) for v in spent_budget.values()] == [9, 9]
    few = bench.time_interleaved(calls, repeats=2, budget_s=0.0)  # --repeats below the minimum wins
    assert [len(v["times_ms"]) for v in few.values()] == [2, 2]
    unlimited = bench.time_interleaved(calls, repeats=12, budget_s=1e9)
    assert [len(v["times_ms"]) for v in unlimited.values()] == [12, 12]


@pytest.mark.skipif(bench.minor_faults(os.getpid()) is None, reason="no /proc on this system")
def test_page_faults_are_counted_for_the_process_that_runs_each_call():
    pages = 2048  # 8 MiB of fresh anonymous memory, one first touch per page

    def touch():
        m = mmap.mmap(-1, pages * mmap.PAGESIZE)
        for i in range(pages):
            m[i * mmap.PAGESIZE] = 1
        m.close()

    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        elsewhere = functools.partial(touch)  # runs here, but is said to run in the idle process
        elsewhere.pid = idle.pid
        out = bench.time_interleaved({"here": touch, "elsewhere": elsewhere, "nothing": lambda: None}, repeats=3, budget_s=0.0)
    finally:
        idle.kill()
        idle.wait()
    assert out["here"]["minor_faults"] >= pages
    assert out["elsewhere"]["minor_faults"] < pages // 10  # the idle process touched nothing
    assert out["nothing"]["minor_faults"] < pages // 10


def test_the_program_without_loops_keeps_the_whole_batch_intermediates():
    from hocp_jax import conv, init

    params = init.init_cp_params(jax.random.key(0), 16, 16, (3, 3, 3), 64)
    x = jax.random.normal(jax.random.key(1), (4, 8, 16, 16, 16))  # (1, 8, 16, 16, 64) float32 per sample: 512 KiB

    def loss(x, params):
        return jnp.sum(conv.cp_conv(x, params, padding=1) ** 2)

    grad = jax.grad(loss, argnums=(0, 1))
    with_loops, _ = bench.compile_program(grad, x, params)
    without = bench.compile_without_loops(grad, x, params)
    assert " while(" in with_loops.as_text() and " while(" not in without.as_text()
    whole_batch_intermediate = 4 * 8 * 16 * 16 * 64 * 4 / 2**20  # MiB
    mem, mem_off = bench.memory_mib(with_loops), bench.memory_mib(without)
    assert mem_off["temp"] >= whole_batch_intermediate  # at least one (B, *S, R) buffer
    assert mem_off["temp"] > 1.5 * mem["temp"]  # one sample's at a time with the loops
    assert mem["argument"] == mem_off["argument"] == pytest.approx((x.size + sum(p.size for p in params.values())) * 4 / 2**20, abs=0.1)


def test_the_program_without_loops_runs_dense_convs_on_the_whole_batch(monkeypatch):
    """The dense convs' chunks of samples (``conv_plans.dense_chunk``) are off too, so XLA's FLOP count
    (which counts a loop body once) is the whole batch's."""
    from hocp_jax import conv_ops, conv_plans

    monkeypatch.setattr(conv_plans, "cpu_flags", lambda: frozenset({"amx_tile"}))  # a host where the rule chunks

    x, k = jnp.zeros((8, 56, 56, 64)), jnp.zeros((3, 3, 64, 64))  # 6.1 MiB: one sample at a time
    dense = 2 * 8 * 56 * 56 * 64 * 64 * 9

    def fn(x, k):
        return conv_ops.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv_ops.channels_last_dims(2))

    assert bench.flops_of(bench.compile_program(fn, x, k)[0]) < 0.2 * dense  # the loop: one sample counted
    assert bench.xla_flops(fn, x, k) == pytest.approx(dense, rel=0.05)


def test_a_run_without_layers_writes_its_results_and_says_why_the_peers_were_skipped(tmp_path, monkeypatch):
    """``--only models`` starts no peer process (the peers time layers only): the report must say
    so instead of failing on the peers' missing versions, and the JSON is written before it."""
    monkeypatch.setattr(bench, "model_cases", lambda quick: [])  # no train steps to compile
    out = tmp_path / "r.json"
    bench.main(["--only", "models", "--out", str(out), "--md", str(tmp_path / "r.md")])
    assert json.load(open(out))["peers"] is None
    report = open(tmp_path / "r.md").read()
    why = peers.available() or "no layer benchmarks in this run (--only)"
    assert f"Peers (PyTorch, TensorLy-Torch) skipped: {why}." in report


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--repeats", "-1"], ["--repeats", "x"], ["--batch-scale", "0"],
                                  ["--batch-scale", "-1"]])
def test_counts_below_one_are_usage_errors(argv, capsys):
    """Before: ``--repeats 0`` ran the full 15 rounds, ``-1`` compiled everything and crashed in
    ``statistics.median([])``, ``--batch-scale -1`` was a ValueError traceback."""
    with pytest.raises(SystemExit) as err:
        bench.parser().parse_args(argv)
    assert err.value.code == 2 and f"{argv[1]!r}: expected an integer >= 1" in capsys.readouterr().err
    assert getattr(bench.parser().parse_args([argv[0], "3"]), argv[0][2:].replace("-", "_")) == 3


def test_batch_scale_multiplies_every_batch():
    conv_case = bench.jester_cases(True)[0]
    assert bench.scaled(conv_case, 4).batch == 4 * conv_case.batch
    model = next(c for c in bench.model_cases(True) if c.transduce_from is not None)
    grown = bench.scaled(model, 3)
    assert grown.input_shape == (3 * model.input_shape[0], *model.input_shape[1:])
    assert grown.transduce_from == (3 * model.transduce_from[0], *model.transduce_from[1:])
    assert bench.scaled(bench.model_cases(True)[0], 2).transduce_from is None


def test_a_stopped_run_keeps_its_rows_and_rescores(tmp_path, monkeypatch):
    """``bench`` writes the rows timed so far after each one (``"partial": true``); ``--rescore``
    makes the markdown of such a file, saying it is partial."""
    monkeypatch.setattr(bench, "model_cases", lambda quick: [])
    out = tmp_path / "r.json"
    results = bench.main(["--only", "models", "--out", str(out), "--md", str(tmp_path / "r.md")])
    del results["wall_s"]
    bench.partial(results, str(out))
    assert json.load(open(out))["partial"] is True
    bench.main(["--rescore", "--out", str(out), "--md", str(tmp_path / "p.md")])
    assert "**Partial:** the run was stopped before its end" in open(tmp_path / "p.md").read()


def test_program_checks_allow_reduced_precision_only_where_jax_may_round(monkeypatch):
    """On CPU the patches program must match lax's conv to 1e-4 of the output's range; where JAX's
    default precision may round float32 operands (GPU: TensorFloat-32) to 1 %."""
    import jax
    import numpy as np

    want = np.full((2, 3), 10.0, np.float32)
    off = lambda err: (lambda x, k: want + err)  # noqa: E731 - a 'program' off by err
    ref = lambda x, k: want  # noqa: E731
    bench.check_same_conv("cpu", ref, off(5e-4), None, None)
    with pytest.raises(AssertionError, match="patches program differs"):
        bench.check_same_conv("cpu", ref, off(5e-2), None, None)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert bench.reduced_precision()
    bench.check_same_conv("gpu", ref, off(5e-2), None, None)
    with jax.default_matmul_precision("highest"):
        assert not bench.reduced_precision()


def test_peer_process_refuses_an_unknown_device():
    with pytest.raises(ValueError, match="device='tpu'"):
        peers.PeerProcess("tpu")


def test_a_run_records_the_commit_it_ran_at(tmp_path):
    """The figures name their checkout: its commit (as ``git log`` reads it) and whether tracked
    files differ from it; untracked files do not count, and outside a checkout both are None."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    assert bench.source_revision(str(tmp_path)) == {"commit": None, "uncommitted_changes": None}
    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    sha = git("log", "-1", "--format=%H")
    (tmp_path / "scratch.json").write_text("{}")
    assert bench.source_revision(str(tmp_path)) == {"commit": sha, "uncommitted_changes": False}
    (tmp_path / "a.txt").write_text("2")
    assert bench.source_revision(str(tmp_path)) == {"commit": sha, "uncommitted_changes": True}
    header = bench._revision_text({"commit": sha, "uncommitted_changes": True})
    assert header == f" at commit {sha[:7]} with uncommitted changes"
    assert bench._revision_text({}) == ""


def test_policy_steps_time_the_hocp_step_under_the_other_policy(tmp_path, monkeypatch):
    """``--policy-steps`` adds, for each HO-CP train step, the same step compiled (here: prepared
    by a stand-in that records the policy in force) under the other ``auto`` policy, timed in the
    same rounds with a ratio to the dense reference; the dense step gets no such row."""
    from hocp_jax import autotune

    prepared = []

    def fake_prepare(case):
        prepared.append((case.name, autotune.policy()))
        row = {"name": case.name, "model": case.model, "input_shape": list(case.input_shape), "tiny": True,
               "transduced": False, "reference": case.reference, "params": 1, "compile_s": 0.0, "xla_flops_step": None}
        return (lambda: time.sleep(1e-3) or (None, {"loss": 1.0, "grad_norm": 2.0})), row

    monkeypatch.setattr(bench, "prepare_model_case", fake_prepare)
    monkeypatch.setattr(bench, "model_cases", lambda quick: [
        bench.ModelCase("dense", "resnet18", (2, 16, 16, 3), True),
        bench.ModelCase("hocp", "resnet18_hocp", (2, 16, 16, 3), True, reference="dense"),
    ])
    try:
        results = bench.main(["--only", "models", "--no-patches-steps", "--policy-steps", "--autotune", "analytic",
                              "--repeats", "2", "--out", str(tmp_path / "r.json")])
    finally:
        autotune.configure(None)
    assert prepared == [("dense", "analytic"), ("hocp", "analytic"), ("hocp", "measure")]
    rows = {r["name"]: r for r in results["models"]}
    assert set(rows) == {"dense", "hocp", "hocp (measure picks)"}
    assert rows["hocp (measure picks)"]["reference"] == "dense" and rows["hocp (measure picks)"]["policy"] == "measure"
    assert len(rows["hocp (measure picks)"]["times_ms"]) == len(rows["dense"]["times_ms"]) == 2
    assert "| hocp (measure picks) |" in open(tmp_path / "RESULTS.md").read()
    assert rows["hocp (measure picks)"]["picks_that_differ"] == []  # the stand-in traced no conv
    assert autotune.policy() == "analytic"  # the block's policy did not leak out of it


def test_recorded_picks_name_the_convs_whose_path_differs_between_two_traces():
    """Two traces of one CP conv under the measured policy, whose stand-in timings favour the
    factorized then the reconstructed path: the recorded picks say so (and leave out the picks of
    the timing's own programs), and only that conv and its kernel gradient differ."""
    from hocp_jax import autotune, conv, init

    p = init.init_cp_params(jax.random.key(0), 4, 6, (3, 3), 5)
    x = jnp.ones((2, 8, 8, 4))
    original = autotune.choose_cp
    made = []
    def timing(times):  # a stand-in that, like the real timing, traces a conv of a rebuilt kernel
        def measure(*args, **kwargs):
            conv.cp_conv(jnp.ones((1, 5, 5, 4)), p, padding=1, implementation="reconstructed")
            return times

        return measure

    for times in ({"factorized": 1.0, "reconstructed": 3.0}, {"factorized": 3.0, "reconstructed": 1.0}):
        autotune.clear_cache()
        with autotune.policy_mode("measure"), bench.recording_picks() as picks, \
                mock.patch.object(autotune, "measure", timing(times)):
            conv.cp_conv(x, p, padding=1, implementation="auto")
        made.append(picks)
    autotune.clear_cache()
    assert autotune.choose_cp is original  # restored after the block
    # recording changes no pick: the wrapped functions return what the library's return
    args = ((4, 40, 40, 64), jnp.float32, (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), (1, 1))
    for big in (False, True):  # the host rule's answer for a small and a 40 MiB input
        args = ((64 if big else 2, 40, 40, 64), *args[1:])
        want = autotune.choose_kernel_grad(*args)
        with bench.recording_picks():
            assert autotune.choose_kernel_grad(*args) is want
    assert [m["cp"] for m in made] == [[[[2, 8, 8, 4], 6, [1, 1], "factorized"]],
                                       [[[2, 8, 8, 4], 6, [1, 1], "reconstructed"]]]
    assert not made[0]["kernel_grad"]  # the factorized path rebuilds no kernel
    # the reconstructed one's kernel gradient, picked once (the timed programs' picks not recorded)
    assert made[1]["kernel_grad"] == [[[2, 8, 8, 4], [3, 3, 4, 6], made[1]["kernel_grad"][0][-1]]]
    grad = made[1]["kernel_grad"][0][-1]
    assert bench.picks_that_differ(*made) == [[[2, 8, 8, 4], 6, [1, 1], "factorized", "reconstructed"],
                                              [[2, 8, 8, 4], [3, 3, 4, 6], "-", grad]]
    assert bench.picks_that_differ(made[0], made[0]) == []
