"""The README's code: the layer-library example runs; the two set-up commands are the ones CI uses;
its benchmark figures and the experiment log's (``benchmarks/EXPERIMENTS.md``) come from files and
commands that exist."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
LOG = open(os.path.join(ROOT, "benchmarks", "EXPERIMENTS.md")).read()


def test_layer_library_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        if "load_trained(" in code:  # needs a trained run: tests/test_trained.py runs it on one
            continue
        exec(compile(code, "README.md", "exec"), {})


def test_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README)
    assert len(commands) == 2 and "train.py --config configs/default.py" in commands[0]
    test_cmd = commands[1].split("&& ")[-1]
    assert test_cmd in open(os.path.join(ROOT, ".ci", "run")).read()


def test_benchmark_table_is_quoted_from_the_results_file():
    """The tables and target lines between the quote's markers in "Benchmarks" are the results
    file's, line for line."""
    results = open(os.path.join(ROOT, "benchmarks", "RESULTS.md")).read()
    section = README.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    block = section.split("<!-- quoted from benchmarks/RESULTS.md -->", 1)[1].split("<!-- end of quote -->", 1)[0]
    quoted = [line for line in block.splitlines() if line.strip()]
    assert len(quoted) > 10
    for line in quoted:
        assert line in results, line


def test_quoted_experiment_commands_exist():
    """Every ``python -m benchmarks.experiments <name>`` the README or the experiment log quotes is
    one the command runs (but those quoted "at commit ...", which ran the code of that commit)."""
    from benchmarks.experiments.__main__ import EXPERIMENTS

    pattern = r"python\s+-m\s+benchmarks\.experiments\s+(\w+)([^`]*`\s+at\s+commit)?"
    quoted = {name for text in (README, LOG) for name, at_commit in re.findall(pattern, text) if not at_commit}
    assert len(quoted) > 10
    assert quoted <= set(EXPERIMENTS), quoted - set(EXPERIMENTS)


def test_relative_links_point_to_files():
    """Every relative Markdown link of the README and of the experiment log names a file of the
    repository (the log lives in ``benchmarks/``, so its links are relative to that folder)."""
    for text, folder in ((README, ROOT), (LOG, os.path.join(ROOT, "benchmarks"))):
        links = [t for t in re.findall(r"\]\(([^)#\s]+)\)", text) if "://" not in t]
        assert len(links) > 10
        missing = [t for t in links if not os.path.exists(os.path.join(folder, t))]
        assert not missing, missing
