"""``load_trained``: a run's model rebuilt from its checkpoint. Its predictions give the metrics
the job reported, recomputed here with numpy (RMSE, CCC, accuracy: not the library's streaming
statistics); the run description read from ``best/`` and from older ``best/`` checkpoints;
dtypes, pruning, bad input, and the README's example on a run."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hocp_jax import tree
from hocp_jax.models import count_params
from hocp_jax.training import Checkpointer, TrainState, Trained, checkpoint, jobs, load_trained
from hocp_jax.training.data import Data

from test_init_from import _smoke

TINY = dict(stage_sizes=[1, 1, 1, 1], widths=[8, 8, 16, 16], stem_kernel=3,
            head=dict(n_outputs=2, n_classes=3, bounded=True))


def _examples(config, dataset: str, split: str):
    """Every example of ``split`` (the job's eval batches without their padding): inputs, va, labels."""
    xs, vas, labels = [], [], []
    for b in Data(config.data, dataset).eval_batches(split):
        keep = np.asarray(b.get("mask", np.ones(len(b["va"])))) > 0
        xs.append(b["video" if "video" in b else "image"][keep])
        vas.append(b["va"][keep])
        labels.append(b["label"][keep] if "label" in b else None)
    return np.concatenate(xs), np.concatenate(vas), None if labels[0] is None else np.concatenate(labels)


def _numpy_metrics(va_true, va_pred) -> dict:
    """RMSE and CCC per target over every example (frames of videos), float64 numpy."""
    y, p = (np.asarray(a, np.float64).reshape(-1, 2) for a in (va_true, va_pred))
    out = {}
    for i, t in enumerate(("valence", "arousal")):
        cov = np.mean((y[:, i] - y[:, i].mean()) * (p[:, i] - p[:, i].mean()))
        out[f"{t}_rmse"] = np.sqrt(np.mean((y[:, i] - p[:, i]) ** 2))
        out[f"{t}_ccc"] = 2 * cov / (y[:, i].var() + p[:, i].var() + (y[:, i].mean() - p[:, i].mean()) ** 2)
    return out


def _assert_reported(row: dict, va_true, va_pred):
    for name, value in _numpy_metrics(va_true, va_pred).items():
        np.testing.assert_allclose(row[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_supervised_runs_model_predicts_what_the_job_reported(tmp_path, load_config):
    """The AffectNet smoke job: the model of its newest checkpoint (and of ``best/``, which now
    stores the run too) is the job's, and its predictions give the reported metrics."""
    c = _smoke(load_config("affectnet", "smoke"), tmp_path / "data", eval_every=3,
               best_metric="valence_ccc", **{"data.val_split": "validation"})
    workdir = tmp_path / "run"
    row = jobs.run(c, str(workdir))["resnet18_hocp"]
    trained = load_trained(workdir / "static")
    assert isinstance(trained, Trained) and trained.step_dir == str(workdir / "static" / "checkpoints" / "3")
    assert trained.model == jobs._model(c, c.model.name, c.model.kwargs)
    assert trained.run["model"]["name"] == "resnet18_hocp" and trained.run["dtype"] is None

    x, va, labels = _examples(c, c.data.static, c.data.eval_split)
    assert x.dtype == np.uint8 and len(x) % 64  # the last call of predict is padded
    out = trained.predict(x)
    assert set(out) == {"va", "logits"} and out["va"].shape == (len(x), 2) and out["va"].dtype == np.float32
    _assert_reported(row, va, out["va"])
    np.testing.assert_allclose(row["class_accuracy"], np.mean(np.argmax(out["logits"], -1) == labels), atol=1e-6)
    for n in (1, 7):  # other batch sizes: the same predictions
        np.testing.assert_allclose(trained.predict(x[:20], batch_size=n)["va"], out["va"][:20], rtol=1e-5, atol=1e-6)

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "load_trained(" in b)
    namespace = {"images": x[:5]}
    exec(example.replace('"runs/affectnet/static/best"', repr(str(workdir / "static" / "best"))), namespace)
    np.testing.assert_allclose(namespace["outputs"]["va"], out["va"][:5], rtol=1e-5, atol=1e-6)
    assert namespace["report"].params_after <= namespace["report"].params_before

    best = load_trained(workdir / "static" / "best")
    assert best.step_dir == str(workdir / "static" / "best" / "3") and best.run == trained.run
    assert checkpoint.restore_extra(best.step_dir)["config"]["run"] == trained.run  # best/ stores it now
    np.testing.assert_allclose(best.predict(x[:10])["va"], out["va"][:10], rtol=1e-6)  # step 3 is both


def test_the_transduction_jobs_video_models_predict_what_the_job_reported(tmp_path, load_config):
    """Stage 2 (the 2-D model with its transduced parameters) and a 3-D baseline, on videos."""
    c = _smoke(load_config("afew_va", "smoke"), tmp_path / "data", **{
        "stage1.num_steps": 1, "stage2.num_steps": 2, "baseline.num_steps": 2, "baseline.models": ("resnet18_3d",)})
    workdir = tmp_path / "run"
    rows = jobs.run(c, str(workdir))
    x, va, _ = _examples(c, c.data.video, c.data.eval_split)
    assert x.ndim == 5
    stage2 = load_trained(workdir / "stage2")
    assert stage2.model == jobs._model(c, c.model.name, c.model.kwargs) and stage2.run["transduction"]
    out = stage2.predict(x)
    assert out["va"].shape == (*x.shape[:2], 2)  # per frame
    _assert_reported(rows["transduced, stage 2 (fine-tuned)"], va, out["va"])
    baseline = load_trained(workdir / "baseline_resnet18_3d")
    assert baseline.run["model"]["name"] == "resnet18_3d"
    _assert_reported(rows["from scratch: resnet18_3d"], va, baseline.predict(x)["va"])


def _variables(model, seed=0, zero_every=0):
    """Random variables of ``model`` on 16x16 images (a few seconds; no training); with
    ``zero_every``, every that-many lambda entry of each CP layer set to 0."""
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 16, 16, 3)), train=False))(jax.random.key(seed))
    variables = jax.tree.map(np.array, dict(variables))  # writable copies
    if zero_every:
        for _, layer in tree.cp_layers(variables["params"]):
            layer["lambda"][::zero_every] = 0.0
    return variables


def _save(directory, variables, step, extra):
    state = TrainState.create(variables, optax.sgd(0.1), jax.random.key(0))
    with Checkpointer(directory, save_every=1, keep=2, async_save=False) as ckpt:
        assert ckpt.save(state, extra, step=step, force=True)


RUN = {"model": {"name": "resnet18_hocp", "kwargs": TINY}, "dtype": None}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A stage directory as an older version wrote it: checkpoints/4 with the run, best/2
    without it; ``variables`` at step 4 with every third lambda zeroed."""
    root = tmp_path_factory.mktemp("stage")
    model = jobs.build_model("resnet18_hocp", TINY)
    variables = _variables(model, zero_every=3)
    _save(root / "checkpoints", variables, 4, {"stage": "static", "config": {"run": RUN}})
    _save(root / "best", variables, 2, {"metric": "valence_ccc", "value": 0.5, "step": 2})
    return root, model, variables


def test_an_older_best_takes_the_run_of_its_stage_and_dtype_can_be_chosen(stage):
    root, model, variables = stage
    best = load_trained(root / "best")
    assert best.step_dir == str(root / "best" / "2") and best.run == RUN and best.model == model
    x = np.random.default_rng(0).uniform(size=(5, 16, 16, 3)).astype(np.float32)
    want = model.apply(variables, x, train=False)["va"]
    np.testing.assert_allclose(best.predict(x)["va"], want, rtol=1e-5, atol=1e-6)
    low = load_trained(root, dtype="bfloat16")
    assert low.model.dtype == jnp.bfloat16 and low.variables["params"]["head"]["va"]["kernel"].dtype == np.float32
    got = low.predict(x)["va"]
    assert got.dtype == np.float32 and not np.array_equal(got, best.predict(x)["va"])
    np.testing.assert_allclose(got, want, atol=0.05)  # a bfloat16 tolerance (outputs in (-1, 1))
    uint8 = (x * 255).round().astype(np.uint8)  # scaled to [0, 1] as in the train step
    np.testing.assert_allclose(best.predict(uint8)["va"], model.apply(variables, uint8 / 255.0, train=False)["va"],
                               rtol=1e-5, atol=1e-6)


def test_pruned_drops_the_zeroed_components_and_keeps_the_predictions(stage):
    root, model, variables = stage
    trained = load_trained(root)
    smaller, report = trained.pruned()
    layers = tree.cp_layers(variables["params"])
    zeroed = sum(int(np.sum(layer["lambda"] == 0)) for _, layer in layers)
    assert zeroed > 0 and len(report.layers) == len(layers)
    assert sum(r.rank_before - r.rank_after for r in report.layers) == zeroed
    assert count_params(smaller.variables["params"]) == report.params_after < count_params(variables["params"])
    x = np.random.default_rng(1).uniform(size=(4, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(smaller.predict(x)["va"], model.apply(variables, x, train=False)["va"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # about 30 s (symbolic sizes); the models' exports are long tests too (tests/test_export.py)
def test_export_serializes_predicts_computation_for_any_batch_and_size(stage):
    root, model, variables = stage
    trained = load_trained(root)
    x = np.random.default_rng(2).uniform(size=(5, 16, 16, 3)).astype(np.float32)
    uint8 = (x * 255).round().astype(np.uint8)
    for dtype, inputs, batches in ((np.uint8, uint8, (1, 5)), (np.float32, x, (3,))):
        exported = jax.export.deserialize(trained.export((16, 16, 3), dtype).serialize())
        assert exported.in_avals[0].dtype == dtype
        for n in batches:
            got = exported.call(inputs[:n])
            want = model.apply(variables, inputs[:n] / 255.0 if dtype == np.uint8 else inputs[:n], train=False)
            assert set(got) == set(want) and all(got[k].dtype == jnp.float32 for k in got)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    sizes = trained.export((None, None, 3), np.float32)  # any height and width too
    y = np.random.default_rng(3).uniform(size=(2, 20, 12, 3)).astype(np.float32)
    for inputs in (x[:2], y):
        got, want = sizes.call(inputs), model.apply(variables, inputs, train=False)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    # For CUDA on this CPU host, with the GPU's routes, not the CPU's (which run more matrix products);
    # the same program again after the CPU's (no trace of another backend reused); one platform may be a string
    dots = [trained.export((16, 16, 3), platforms=p).mlir_module().count("stablehlo.dot_general")
            for p in (("cuda",), ("cpu",), "cuda")]
    assert dots[0] == dots[2] < dots[1], dots
    for platforms in (("npu",), ("gpu",), "gpu", "CUDA", (), [None], 5):  # "gpu": JAX's backend name, not export's
        with pytest.raises(ValueError, match=r"^platforms=.*: expected None \(this process's backend\), one of "
                                             r"\('cpu', 'cuda', 'rocm', 'tpu'\)"):
            trained.export((16, 16, 3), platforms=platforms)
    # bfloat16 inputs, a float dtype, as float16's and float32's (was: "expected uint8 or float")
    low = x.astype(jnp.bfloat16)
    bf16 = trained.export((16, 16, 3), jnp.bfloat16)
    assert bf16.in_avals[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(bf16.call(low)["va"], trained.predict(low)["va"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trained.predict(low)["va"], model.apply(variables, x, train=False)["va"], atol=0.05)
    for shape in ((16, 16), (0, 16, 3), "16x16x3", (16, 16, None)):
        with pytest.raises(ValueError, match=r"^shape=.*expected one example's shape"):
            trained.export(shape)
    for dtype in (np.int32, "pixels"):
        with pytest.raises(ValueError, match=r"^dtype="):
            trained.export((16, 16, 3), dtype)


def test_bad_input_is_a_value_error_naming_it(stage, tmp_path, monkeypatch):
    root, _, variables = stage
    trained = load_trained(root)
    for x in (np.zeros((16, 16, 3)), np.zeros((0, 16, 16, 3)), np.zeros((1, 16, 16, 3), np.int32)):
        with pytest.raises(ValueError, match=r"^x: an array of shape"):
            trained.predict(x)
    with pytest.raises(ValueError, match=r"^x: not an array"):
        trained.predict([np.zeros((16, 16, 3)), np.zeros((8, 16, 3))])
    with pytest.raises(ValueError, match=r"batch_size=0: expected an int > 0"):
        trained.predict(np.zeros((1, 16, 16, 3)), batch_size=0)
    with pytest.raises(ValueError, match=r"dtype='float16': expected None \(the run's\) or one of"):
        load_trained(root, dtype="float16")
    with pytest.raises(FileNotFoundError, match="path="):
        load_trained(tmp_path / "missing")
    _save(tmp_path / "bare", variables, 1, {"stage": "train"})  # a fit run without config.run
    with pytest.raises(ValueError, match=r"does not say which model wrote it .*checkpoint.restore_variables"):
        load_trained(tmp_path / "bare")
    assert checkpoint.restore_extra(tmp_path / "bare" / "1") == {"stage": "train"}
    # examples the model cannot take: named as x or shape (before: Flax's or a layer's error naming a parameter)
    for x, words in ((np.zeros((1, 16, 16, 1), np.uint8), r"\(16, 16, 1\) \(uint8\) do not fit the model 'resnet18_hocp'"),
                     (np.zeros((1, 3, 16, 16), np.float32), r"\(3, 16, 16\) \(float32\) do not fit")):
        with pytest.raises(ValueError, match="^x: examples of shape " + words):
            trained.predict(x)
    with pytest.raises(ValueError, match=r"^shape: examples of shape \(16, 16, 1\) \(uint8\) do not fit"):
        trained.export((16, 16, 1))
    with pytest.raises(ValueError, match=r"^dtype=None: expected uint8 or a float dtype"):  # (was float64, silently)
        trained.export((16, 16, 3), None)
    # paths: a file, a home-relative path (as init_from), what is not a checkpoint's extra item
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file'\)?: a file; expected a checkpoint's directory"):
        load_trained(tmp_path / "file")
    monkeypatch.setenv("HOME", str(root.parent))
    assert load_trained(f"~/{root.name}").step_dir == str(root / "checkpoints" / "4")
    with pytest.raises(FileNotFoundError, match=r"^step_dir=.*: no such directory"):
        checkpoint.restore_extra(tmp_path / "bare" / "7")
    os.makedirs(tmp_path / "other" / "3")
    with pytest.raises(ValueError, match=r"^step_dir=.*: cannot read the checkpoint's 'extra' item"):
        checkpoint.restore_extra(tmp_path / "other" / "3")
    _save(tmp_path / "odd", variables, 1, {"stage": "static", "config": {"run": RUN | {"dtype": "float16"}}})
    with pytest.raises(ValueError, match=r"stores dtype='float16', expected one of \('float32', 'bfloat16'\)"):
        load_trained(tmp_path / "odd")
    assert load_trained(tmp_path / "odd", dtype="float32").model.dtype is None  # (float32: no dtype given)


def test_predict_follows_the_variables_and_they_are_read_only(stage):
    """Before: predict kept the device copy of its first call's variables, so a change to them was ignored."""
    root, model, variables = stage
    trained = load_trained(root)
    x = np.random.default_rng(2).uniform(size=(3, 16, 16, 3)).astype(np.float32)
    first = trained.predict(x)["va"]
    with pytest.raises(ValueError, match="read-only"):
        trained.variables["params"]["head"]["va"]["bias"][:] = 5.0
    halved = jax.tree.map(lambda v: v * 0.5, variables)
    trained.variables = halved
    got = trained.predict(x)["va"]
    assert not np.allclose(got, first)
    np.testing.assert_allclose(got, model.apply(halved, x, train=False)["va"], rtol=1e-5, atol=1e-6)
