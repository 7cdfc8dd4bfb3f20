"""``benchmarks/device_check.sh``, the script for a lent GPU machine, must not rot between the rare
sessions that have one: its shell parses, its smoke check runs (here on the CPU) and every
``benchmarks.bench`` flag it passes exists."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")


def test_device_check_parses_and_its_smoke_check_runs():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    text = open(SCRIPT).read()
    (smoke,) = re.findall(r"python3 - <<'EOF'.*?\n(.*?)\nEOF\n", text, re.S)
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", smoke], env=env, capture_output=True, text=True, check=True).stdout
    assert len(re.findall(r"relative max error", out)) == 3, out


def test_device_check_passes_only_flags_bench_has():
    from benchmarks import bench

    text = open(SCRIPT).read()
    used = set(re.findall(r"(--[a-z][a-z-]+)", " ".join(re.findall(r"benchmarks\.bench[^\n]*(?:\\\n[^\n]*)*", text))))
    known = {a for action in bench.parser()._actions for a in action.option_strings}
    assert used and used <= known, used - known


def test_device_check_runs_only_experiments_that_exist():
    from benchmarks.experiments.__main__ import EXPERIMENTS

    used = set(re.findall(r"benchmarks\.experiments (\w+)", open(SCRIPT).read()))
    assert used and used <= set(EXPERIMENTS), used - set(EXPERIMENTS)
