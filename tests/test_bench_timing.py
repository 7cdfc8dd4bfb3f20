"""``benchmarks.bench.time_interleaved``: how many rounds a case gets (no timings asserted)."""
from benchmarks import bench


def test_every_case_gets_the_minimum_rounds_whatever_its_budget():
    calls = {"a": lambda: None, "b": lambda: None}
    spent_budget = bench.time_interleaved(calls, repeats=15, budget_s=0.0)  # over budget after round 1
    assert bench.MIN_ROUNDS == 9
    assert [len(v["times_ms"]) for v in spent_budget.values()] == [9, 9]
    few = bench.time_interleaved(calls, repeats=2, budget_s=0.0)  # --repeats below the minimum wins
    assert [len(v["times_ms"]) for v in few.values()] == [2, 2]
    unlimited = bench.time_interleaved(calls, repeats=12, budget_s=1e9)
    assert [len(v["times_ms"]) for v in unlimited.values()] == [12, 12]
