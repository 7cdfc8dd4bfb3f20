"""``benchmarks.bench``: how many rounds a case gets (no timings asserted), and the files of a run
without layer benchmarks."""
import json

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
