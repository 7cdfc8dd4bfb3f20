"""The studies (hocp_jax.study): every one runs end to end in its ``--tiny`` variant (the test-suite
size of ``--quick``), writes its files, and its numbers are consistent with independent
recomputations; the README's "## Studies" section quotes the committed results verbatim."""

import glob
import json
import os

import numpy as np
import pytest

from hocp_jax import transduction
from hocp_jax.study import STUDIES
from hocp_jax.study.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The longest two tiny studies (about 60 and 35 s on 2 cores) are among the long tests; so is every
# study's --quick variant (test_quick_study_runs_end_to_end).
LONG = ("data_budget", "rank_selection")


class _Studies(dict):
    """Each study, --tiny, run at its first use in this module's process (they share compiled steps)."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def __missing__(self, name):
        self[name] = (main([name, "--tiny", "--out", str(self.out / name)]), self.out / name)
        return self[name]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _Studies(tmp_path_factory.mktemp("studies"))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LONG else n for n in sorted(STUDIES)])
def test_tiny_study_writes_results_report_and_plots(tiny, name):
    doc, out = tiny[name]
    assert json.load(open(out / "results.json"))["results"].keys() == doc["results"].keys()
    assert doc["size"] == "tiny" and doc["wall_time_s"] > 0
    assert "--tiny" in open(out / "report.md").read()
    pngs = glob.glob(str(out / "*.png"))
    assert pngs and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.slow
def test_data_budget_summary_is_the_mean_of_its_runs(tiny):
    res = tiny["data_budget"][0]["results"]
    s = tiny["data_budget"][0]["settings"]
    assert {r["n_clips"] for r in res["runs"]} == set(s["sizes"])
    for model, per_size in res["summary"].items():
        for n, metrics in per_size.items():
            vals = [r["arousal_ccc"] for r in res["runs"] if r["model"] == model and r["n_clips"] == int(n)]
            assert metrics["arousal_ccc"][0] == pytest.approx(np.mean(vals))
    # the static model per frame does not see the video budget
    static = [r["valence_ccc"] for r in res["runs"] if r["model"] == "static (per frame)"]
    assert np.ptp(static) == 0
    # stage 1 trains only the 3-tap temporal factors: 3 x (total CP rank) parameters
    assert res["params"]["transduced, stage 1"]["video_trained"] % 3 == 0


@pytest.mark.slow
def test_rank_selection_pruning_drops_only_exact_zeros(tiny):
    doc = tiny["rank_selection"][0]
    runs = doc["results"]["runs"]
    assert {r["form"] for r in runs} == {"proximal", "loss"}
    for r in runs:
        # prune_rank drops the zeroed components (|lambda| <= tol, keeping >= 1 per layer), no others
        assert r["tol"] == (0.0 if r["form"] == "proximal" else doc["settings"]["tol"])
        assert r["rank_before"] - r["zeroed_lambdas"] <= r["rank_after"] <= r["rank_before"]
        assert 0 <= r["params_before"] - r["params_after"] <= r["params_freed"]
        assert (r["params_after"] < r["params_before"]) == (r["rank_after"] < r["rank_before"])
        if r["form"] == "proximal":  # exact zeros only: the pruned model computes the same function
            for k in ("valence_ccc", "arousal_ccc"):
                assert r[f"{k}_after"] == pytest.approx(r[f"{k}_before"], abs=1e-4)
    assert max(r["zeroed_lambdas"] for r in runs) > 0  # the largest gamma zeroes lambdas


def test_transduction_init_delta_is_the_static_model_per_frame(tiny):
    res = tiny["transduction_init"][0]["results"]
    first = {r["init"]: r for r in res["runs"] if r["point"] == "transduced (no video step)"}
    assert set(first) == set(transduction.INITS)
    assert first["delta"]["arousal_ccc"] != first["ones"]["arousal_ccc"]


def test_classification_compares_the_three_convs(tiny):
    summary = tiny["classification"][0]["results"]["summary"]
    assert {m["conv"] for m in summary.values()} == {"dense", "hocp", "hocp_s"}


def test_readme_studies_section_is_quoted_from_the_committed_reports():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Studies", 1)[1].split("\n## ", 1)[0]
    reports = "".join(open(p).read() for p in glob.glob(os.path.join(ROOT, "studies", "*", "report.md")))
    quoted = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(quoted) >= 8
    for line in quoted:
        assert line in reports, line


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_quick_study_runs_end_to_end(name, tmp_path):
    """The documented ``--quick`` variant (a few minutes each on 2 quiet cores), end to end."""
    doc = main([name, "--quick", "--out", str(tmp_path)])
    assert doc["size"] == "quick" and "--quick" in open(tmp_path / "report.md").read()
    assert json.load(open(tmp_path / "results.json"))["results"].keys() == doc["results"].keys()


def test_an_out_that_cannot_be_a_folder_is_a_usage_error(tmp_path, capsys):
    """Before: a FileExistsError traceback (NotADirectoryError under a file); now argparse's usage
    error, exit status 2, before the study runs."""
    (tmp_path / "afile").write_text("x")
    for out, why in (("afile", "File exists"), ("afile/sub", "Not a directory"), ("", "No such file")):
        with pytest.raises(SystemExit) as exit_:
            main(["data_budget", "--tiny", "--out", str(tmp_path / out) if out else out])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "error: --out=" in err and f"expected a directory ({why}" in err, err
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_a_folder_of_another_studys_results_is_refused(tmp_path, capsys):
    """Before (an audit, stop 79): written over, the other study's plots left beside the new ones; and the
    package docstring's ``--quick --out studies/<name>`` replaced the committed full run."""
    held = {"study": "transduction_init", "size": "tiny", "results": {}}
    (tmp_path / "results.json").write_text(json.dumps(held))
    for argv in (["classification", "--tiny"], ["transduction_init", "--quick"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--out", str(tmp_path)])
        assert exit_.value.code == 2
        assert "holds the results of study 'transduction_init' (tiny)" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text()) == held
