"""train.py end to end: the default job (shrunk), every paper config's smoke variant, bad input."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from hocp_jax.training import jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHRINK = [
    "--config.static.num_steps=6", "--config.stage1.num_steps=3", "--config.stage2.num_steps=3",
    "--config.baseline.num_steps=3", "--config.log_every=3", "--config.checkpoint_every=3",
    "--config.data.batch_size=8", "--config.model.kwargs.widths=(4,4,8,8)",
    "--config.baseline.kwargs.widths=(4,4,8,8)",
]


def _train(workdir, *args, config="configs/default.py"):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    config_args = ["--config", config] if config else []  # None: train.py's default
    return subprocess.run([sys.executable, "train.py", *config_args, "--workdir", str(workdir), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def _one_error_line(r) -> str:
    """The ``error:`` line of a run that ended with one, exit status 2 and no traceback."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


def test_default_job_end_to_end(tmp_path):
    r = _train(tmp_path, *SHRINK)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.load(open(tmp_path / "results.json"))["rows"]
    assert list(rows) == ["static (per frame)", "transduced, stage 1 (temporal only)",
                          "transduced, stage 2 (fine-tuned)", "from scratch: resnet18_3d"]
    for row in rows.values():
        for t in ("valence", "arousal"):
            assert all(math.isfinite(row[f"{t}_{m}"]) for m in ("rmse", "sagr", "pcc", "ccc"))
    # only the temporal factors were trained in stage 1
    assert 0 < rows["transduced, stage 1 (temporal only)"]["video_trained_params"] < rows["static (per frame)"]["params"]
    for name in ("va_over_time.png", "lambda_sparsity.png", "results.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| static (per frame) |" in r.stdout
    # the same command again resumes every finished stage (the checkpoints' run configs match) ...
    again = _train(tmp_path, *SHRINK)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.load(open(tmp_path / "results.json"))["rows"] == rows
    # ... and another seed is refused, naming it, before anything trains
    assert "seed: 0 -> 1" in _one_error_line(_train(tmp_path, *SHRINK, "--config.seed=1"))


@pytest.mark.parametrize("config,override,words", [
    ("configs/default.py", "--config.static.num_stepz=3",
     "unknown config key config.static.num_stepz (did you mean config.static.num_steps?)"),
    (None, "--config.eval_split=x", "unknown config key config.eval_split"),  # default config: loaded otherwise
], ids=["typo", "default-config"])
def test_unknown_config_key_is_one_error_line(tmp_path, config, override, words):
    r = _train(tmp_path / "run", override, config=config)
    assert words in _one_error_line(r)
    assert not (tmp_path / "run").exists()  # refused while parsing the flags


def test_a_diverged_run_is_one_error_line_with_status_1(tmp_path, data_dir):
    """Was: a NonFiniteError traceback."""
    r = _train(tmp_path, "--config.job=supervised", "--config.optimizer.learning_rate=1e30", "--config.static.num_steps=4",
               "--config.log_every=2", "--config.checkpoint_every=2", "--config.data.batch_size=8",
               "--config.model.kwargs.widths=(4,4,8,8)", f"--config.data.data_dir={data_dir}")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert errors[0].startswith("error: non-finite ") and "the last good checkpoint is kept" in errors[0]


def test_a_workdir_file_and_a_config_file_without_get_config_are_one_error_line(tmp_path):
    """Were: a FileExistsError traceback, and "unknown config key config.module ...get_config"."""
    (tmp_path / "a_file").write_text("")
    assert f"{tmp_path / 'a_file'} is a file; expected a directory" in _one_error_line(_train(tmp_path / "a_file"))
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # was: a FileExistsError traceback from os.makedirs
    words = f"{tmp_path / 'dangling'} is a symbolic link to {tmp_path / 'gone'}, which does not exist"
    assert words in _one_error_line(_train(tmp_path / "dangling" / "run"))
    (tmp_path / "nothing.py").write_text("x = 1\n")
    r = _train(tmp_path / "run", config=str(tmp_path / "nothing.py"))
    assert "nothing.py: the file has no get_config() function" in _one_error_line(r)
    assert not (tmp_path / "run").exists()


def test_bad_config_value_is_one_line_not_a_traceback(tmp_path):
    r = _train(tmp_path, "--config.data.batch_size=0")
    assert "config.data.batch_size=0" in _one_error_line(r)
    r = _train(tmp_path, "--config.dtype=float16", "--config.init_from=/nonexistent")  # the main job has both keys
    assert "config.dtype='float16'" in _one_error_line(r)


CONFIGS = [("default", ""), ("affectnet", ""), ("afew_va", ""), ("jester", "hocp_s"), ("cifar10", "hocp"),
           ("bregnet", "fer2013"), ("avce", "alexnet")]


@pytest.mark.parametrize("module,arg", CONFIGS)
def test_every_config_has_the_programs_options(module, arg, load_config):
    """train.py's options are keys of every config (an override of a key a config lacks is refused)."""
    c = load_config(module, arg)
    for key in ("dtype", "init_from", "autotune", "cp_per_sample", "cp_tile_rows", "eval_every", "best_metric",
                "profile_steps", "microbatches"):
        assert key in c, key


def test_bad_values_give_clear_errors(tmp_path, load_config):
    c = load_config("affectnet", "smoke")
    c.data.data_dir = str(tmp_path / "data")
    c.model.name = "resnet19"
    with pytest.raises(ValueError, match="resnet19"):
        jobs.run(c, str(tmp_path / "a"))
    c = load_config("affectnet")  # real AffectNet, but its files are not there
    c.data.data_dir, c.data.manual_dir = str(tmp_path / "data"), str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        jobs.run(c, str(tmp_path / "b"))
    c = load_config("affectnet", "smoke")
    c.job = "pretrain"
    with pytest.raises(ValueError, match="config.job"):
        jobs.run(c, str(tmp_path / "c"))
    c = load_config("affectnet", "smoke")
    c.loss.kind = "hinge"
    c.data.data_dir = str(tmp_path / "data")
    with pytest.raises(ValueError, match="config.loss.kind"):
        jobs.run(c, str(tmp_path / "d"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


# (overrides of the shrunk default job, words of the error): each a ValueError before any stage trains
BAD = [
    ({"data.eval_split": "foo"}, "config.data.eval_split='foo'"),
    ({"eval_every": 2, "data.val_split": "foo"}, "config.data.val_split='foo'"),
    ({"sparsity_tol": -1.0}, "config.sparsity_tol=-1.0"),
    ({"profile_steps": -1}, "config.profile_steps=-1: expected an int >= 0"),
    ({"microbatches": 0}, "config.microbatches=0: expected an int > 0"),
    ({"microbatches": 3}, "config.microbatches=3: config.data.batch_size=32 must be a multiple of 3 x the 1 devices"),
    ({"baseline.models": ("foo",)}, "config.baseline.models=('foo',)"),
    ({"stage1.num_steps": 0}, "config.stage1.num_steps=0"),
    ({"stage2.optimizer.learning_rate": -1.0}, "config.stage2.optimizer.learning_rate=-1.0"),
    ({"eval_every": 2, "best_metric": "valence_cc"}, "config.best_metric='valence_cc'"),
    ({"best_metric": "valence_ccc"}, "config.eval_every=0"),
    ({"eval_every": 2, "best_metric": "valence_ccc", "data.val_split": ""}, "config.data.val_split=''"),
    ({"eval_every": 2, "best_metric": "valence_ccc", "data.val_split": "test"}, "config.data.eval_split='test'"),
    ({"loss.shake_shake": False, "loss.weights": (1.0, 1.0)}, "config.loss.weights=(1.0, 1.0): expected 3 numbers"),
    ({"loss.ce_weight": -1.0}, "config.loss.ce_weight=-1.0"),
    ({"loss.l1_gama": 0.1}, "unknown key config.loss.l1_gama (did you mean config.loss.l1_gamma?)"),
    ({"stage1.loss": {"l1_gamma": 0.1}}, "unknown key config.stage1.loss.l1_gamma"),  # no lasso in stage 1
    ({"stage2.loss": {"ce_weight": -1.0}}, "config.stage2.loss.ce_weight=-1.0"),
    ({"stage2.loss": {"kind": "bregnet"}}, "unknown key config.stage2.loss.kind"),
    ({"transduction.modes": {"t": 0}}, "config.transduction.modes['t']=0: expected a kernel size int >= 1"),
    ({"transduction.modes": {"t": 2}}, "config.transduction.modes['t']=2: init='delta' needs an odd kernel size"),
    ({"transduction.init": "zeros"}, "config.transduction.init='zeros'"),
    # found from the model's parameter shapes, before the static stage trains
    ({"transduction.dense": "error"}, "cannot transduce config.model.name='resnet18_hocp': params: 3 non-CP conv"),
    ({"model.name": "resnet18"}, "cannot transduce config.model.name='resnet18': params: transduce found no CP layer"),
    # from the datasets' shapes, before the static stage trains (were: after it, a layer's message; a NaN loss; a
    # silently dropped loss term or class; the optimizer's steps_per_epoch=0)
    ({"data.video": "digits_affect"},
     "config.data.video='digits_affect': its examples have shape (32, 32, 1); the transduction job expects videos"),
    ({"data.static": "moving_digits"}, "config.data.static='moving_digits': its examples have shape (8, 32, 32, 1)"),
    ({"model.kwargs.head.n_classes": 3},
     "config.model.kwargs.head.n_classes=3: stage 'static' trains on digits_affect, which has 10 classes; expected 10"),
    ({"baseline.kwargs.head.n_outputs": 3},
     "config.baseline.kwargs.head.n_outputs=3: stage 'baseline_resnet18_3d' trains on moving_digits, whose 'va'"),
    ({"model.kwargs.head.n_outputs": 0}, "config.static.loss.va_weight=1.0 (config.loss's unless overridden): the "
     "model of stage 'static' has no valence/arousal output (config.model.kwargs.head.n_outputs=0); set "
     "config.model.kwargs.head.n_outputs=2"),
    ({"data.batch_size": 100000}, "config.data.batch_size=100000: larger than the training split of digits_affect"),
]


def _override(c, overrides: dict):
    """``c`` with ``{"dotted.key": value}`` set (keys added where missing)."""
    for key, value in overrides.items():
        *parents, name = key.split(".")
        node = c
        for parent in parents:
            node = node[parent]
        node[name] = value
    return c


@pytest.mark.parametrize("overrides,words", BAD, ids=[words for _, words in BAD])
def test_bad_values_are_refused_before_training(tmp_path, data_dir, overrides, words, load_config):
    c = load_config("default")
    c.data.data_dir = data_dir
    c.static.num_steps, c.stage1.num_steps, c.stage2.num_steps, c.baseline.num_steps = 2, 1, 1, 1
    c.model.kwargs.widths = c.baseline.kwargs.widths = (4, 4, 8, 8)
    with pytest.raises(ValueError, match=re.escape(words)):
        jobs.run(_override(c, overrides), str(tmp_path))
    assert not (tmp_path / "static").exists()


def test_training_an_earlier_stage_further_is_refused_by_the_later_stages(tmp_path, data_dir, load_config):
    """Before: a rerun with a larger config.static.num_steps trained the static stage on and reused
    stage 1, stage 2 from the first run, whose rows then sat beside the new static row."""
    c = load_config("default")
    c.data.data_dir = data_dir
    c.static.num_steps, c.stage1.num_steps, c.stage2.num_steps, c.baseline.num_steps = 2, 1, 1, 1
    c.model.kwargs.widths, c.baseline.models = (4, 4, 8, 8), ()
    c.data.batch_size = 8
    jobs.run(c, str(tmp_path))
    c.stage1.num_steps = 2  # stage 1 trains on, then stage 2 refuses its checkpoints
    with pytest.raises(ValueError, match=re.escape("stage2 holds checkpoints of a run with another config "
                                                   "(run.stage1_steps: 1 -> 2)")):
        jobs.run(c, str(tmp_path))
    c.static.num_steps = 3  # the static stage trains on, then stage 1 refuses
    with pytest.raises(ValueError, match=re.escape("stage1 holds checkpoints of a run with another config "
                                                   "(run.static_steps: 2 -> 3)")):
        jobs.run(c, str(tmp_path))


# (overrides of the default job, words of the error): refused by jobs.check_config alone, which reads no data
# (each was an AttributeError / TypeError, or was accepted and failed later)
BAD_CONFIG = [
    ({"stage1.optimizer": None}, "invalid config.stage1.optimizer: config.stage1.optimizer=None: expected a config dict"),
    ({"stage1.loss": None}, "config.stage1.loss=None: expected a config dict"),
    ({"loss": None}, "config.loss=None: expected a config dict"),
    ({"data": None}, "config.data=None: expected a config dict"),
    ({"transduction": None}, "config.transduction=None: expected a config dict"),
    ({"model.kwargs": None}, "config.model.kwargs=None: expected a dict of the model's keyword arguments"),
    ({"optimizer.boundaries_epochs": 30}, "config.optimizer.boundaries_epochs=30: expected a sequence of epochs"),
    ({"stage2.optimizer.boundaries_epochs": None}, "config.stage2.optimizer.boundaries_epochs=None: expected a sequence"),
    ({"data.batch_size": 0}, "config.data.batch_size=0: expected an int > 0"),
    ({"data.prefetch": -1}, "config.data.prefetch=-1: expected an int >= 0"),
    ({"model.kwargs.stage_size": (1, 1, 1, 1)},
     "invalid config.model.kwargs (model 'resnet18_hocp'): get_model('resnet18_hocp'): unknown keyword(s) ['stage_size']"),
    ({"baseline.kwargs.head.n_class": 3}, "invalid config.baseline.kwargs (model 'resnet18_3d'): head: unknown keys ['n_class']"),
    # the values of the models' keyword arguments too (were: refused when the model first ran, after the data)
    ({"model.kwargs.psi": "foo"}, "invalid config.model.kwargs (model 'resnet18_hocp'): psi='foo': expected one of"),
    ({"baseline.kwargs.stem_kernel": 0}, "invalid config.baseline.kwargs (model 'resnet18_3d'): stem_kernel=0: expected"),
    ({"autotune": "measured"}, "config.autotune='measured': expected '' (the environment's or backend's policy) or one of"),
    ({"cp_tile_rows": -1}, "config.cp_tile_rows=-1"),
    ({"skew_repeats": -1}, "config.skew_repeats=-1: expected an int >= 0"),
    # were refused by the data pipeline (grain's words for the second), after the data was built
    ({"seed": -1}, "config.seed=-1: expected an int in [0, 2**32)"),
    ({"seed": 2**63 - 1}, "config.seed=9223372036854775807: expected an int in [0, 2**32)"),
]


@pytest.mark.parametrize("overrides,words", BAD_CONFIG, ids=[words for _, words in BAD_CONFIG])
def test_check_config_refuses_bad_values_without_data(overrides, words, load_config):
    with pytest.raises(ValueError, match=re.escape(words)):
        jobs.check_config(_override(load_config("default"), overrides))


def test_check_config_refuses_a_batch_that_does_not_split_over_the_devices(monkeypatch, load_config):
    """Before: found at the first step, after the data was built and the model initialised, in
    words that did not name config.data.batch_size."""
    c = load_config("default")
    c.data.batch_size = 6
    monkeypatch.setattr(jobs.jax, "device_count", lambda: 4)  # check_config only counts the devices
    with pytest.raises(ValueError, match=re.escape("config.data.batch_size=6: expected a multiple of the 4 devices")):
        jobs.check_config(c)
    c.data.batch_size = 8
    jobs.check_config(c)


@pytest.mark.parametrize("module,arg", CONFIGS + [(m, ",".join(filter(None, (a, "smoke")))) for m, a in CONFIGS
                                                   if m != "default"])  # the default job has no smoke variant
def test_every_config_passes_check_config(module, arg, load_config):
    jobs.check_config(load_config(module, arg))


@pytest.mark.parametrize("loss,words", [
    (dict(kind="avce", avce=dict(alpah=0.5), l1_gamma=0.0), "unknown key config.loss.avce.alpah (did you mean config.loss.avce.alpha?)"),
    (dict(kind="bregnet", va_weight=1.0, l1_gamma=0.0), "missing required key config.loss.class_weighted"),
    (dict(kind="bregnet", class_weighted=True, class_counts=[3, 0], va_weight=1.0, l1_gamma=0.0), "config.loss.class_counts=[3, 0]"),
    (dict(kind="affect", va_weight=1.0, shake_shake=True, ce_weight=0.1, l1_gamma=0.01), "missing required key config.loss.l1_prox"),
    (dict(kind="affect", va_weight=1.0, shake_shake=1, ce_weight=0.1, l1_gamma=0.0), "config.loss.shake_shake=1: expected True or False"),
    (dict(kind="avce", avce=dict(alpha=-1.0), l1_gamma=0.0), "invalid config.loss.avce: config.loss.avce.alpha=-1.0"),
    (dict(kind="avce", avce=dict(objective="nce"), l1_gamma=0.0), "invalid config.loss.avce: config.loss.avce.objective"),
])
def test_loss_config_is_checked_per_kind(loss, words):
    from ml_collections import ConfigDict

    from hocp_jax.training import objectives
    with pytest.raises(ValueError, match=re.escape(words)):
        objectives.check_loss_config(ConfigDict(loss))


def test_best_metric_is_never_picked_on_the_reported_split(tmp_path, load_config):
    """Jester's reported split is its only held-out one: no val_split to pick checkpoints on."""
    c = load_config("jester")
    assert c.data.val_split != c.data.eval_split
    c.eval_every, c.best_metric = 100, "class_accuracy"
    with pytest.raises(ValueError, match="config.data.val_split=''"):
        jobs.run(c, str(tmp_path))  # before looking for Jester's files


# The default run keeps one supervised smoke (jester, which also covers the HO-CP-S net); the other
# paper configs are slow (~15-30 s each; bregnet/avce also train in their own test files).
SMOKE = [("jester", "hocp_s,smoke"),
         *(pytest.param(m, a, marks=pytest.mark.slow) for m, a in
           [("affectnet", "smoke"), ("cifar10", "hocp,smoke"), ("bregnet", "fer2013,smoke"),
            ("avce", "alexnet,smoke"), ("afew_va", "smoke")])]


@pytest.mark.parametrize("module,arg", SMOKE)
def test_paper_config_smoke(module, arg, tmp_path, load_config):
    c = load_config(module, arg)
    c.data.data_dir = str(tmp_path / "data")
    c.static.num_steps = 3
    c.log_every = c.checkpoint_every = 3
    rows = jobs.run(c, str(tmp_path / "run"))
    assert rows and all(math.isfinite(v) for row in rows.values() for v in row.values())


def test_a_stage_loss_overrides_config_loss_and_needs_labels_for_its_cross_entropy(load_config):
    """configs/afew_va.py: the static stage (AffectNet) trains the class head with cross-entropy,
    the video stages (clips without expression labels) turn it off with ``stage<k>.loss``; a video
    stage left with the cross-entropy on is refused before training, naming its key."""
    import types

    import jax
    import numpy as np

    from hocp_jax.training import objectives
    c = load_config("afew_va", "smoke")
    model = jobs._model(c, c.model.name, c.model.kwargs)
    rng = np.random.default_rng(0)
    clips = {"video": rng.integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8),
             "va": rng.uniform(-1, 1, (2, 3, 2)).astype(np.float32)}
    info = types.SimpleNamespace(dataset_info=types.SimpleNamespace(features={"video": None, "va": None}))
    afew = types.SimpleNamespace(name="afew_va", source=lambda split: info)
    x = clips["video"].astype(np.float32) / 255
    outputs = model.apply(model.init(jax.random.key(0), x, train=False), x, train=False)
    assert "logits" in outputs
    loss, terms = objectives.make_loss(jobs.stage_loss(c, "stage1"), None)(outputs, clips, jax.random.key(1))
    assert np.isfinite(loss) and "ce" not in terms  # stage 1: no cross-entropy, no label read
    assert jobs.stage_loss(c, "static").ce_weight == 1.0 and jobs.stage_loss(c, "stage2").ce_weight == 0.0
    shapes = jobs._output_shapes(model, clips)
    jobs._check_outputs(c, "stage1", afew, clips, shapes)
    c.stage1.loss.ce_weight = 0.5
    with pytest.raises(ValueError, match=re.escape("config.stage1.loss.ce_weight=0.5 (config.loss's unless overridden): "
                                                   "stage 'stage1' trains a model with class logits on afew_va, whose "
                                                   "examples have no 'label': set config.stage1.loss.ce_weight=0")):
        jobs._check_outputs(c, "stage1", afew, clips, shapes)
    del c.stage1["loss"]  # then the command line cannot add the key: the message says where to
    with pytest.raises(ValueError, match=re.escape("'label': add loss=dict(ce_weight=0.0) to config.stage1 in the "
                                                   "config file, or set config.loss.ce_weight=0")):
        jobs._check_outputs(c, "stage1", afew, clips, shapes)
    # a nested dict of config.loss is overridden key by key
    avce = load_config("avce", "alexnet")
    avce.static.loss = {"avce": {"contrastive_weight": 0.05}}
    assert jobs.stage_loss(avce, "static").avce.to_dict() == avce.loss.avce.to_dict() | {"contrastive_weight": 0.05}


@pytest.mark.parametrize("arg", ["", "smoke"])
def test_afew_va_static_stage_is_the_affectnet_config(arg, load_config):
    """configs/afew_va.py's docstring: its static model, loss and optimizer are configs/affectnet.py's,
    so a finished AffectNet run can be its static stage (``init_from``, ``static.num_steps=0``)."""
    affectnet, afew_va = load_config("affectnet", arg), load_config("afew_va", arg)
    for key in ("model", "loss", "optimizer"):
        assert afew_va[key].to_dict() == affectnet[key].to_dict(), key


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size"])
def test_batch_sizes_are_checked_against_the_process_count(monkeypatch, key):
    # with 3 processes a global batch of 64 cannot be shared: refused before training, naming the key
    import jax
    from ml_collections import ConfigDict
    config = ConfigDict(dict(data=dict(batch_size=48, eval_batch_size=48)))
    config.data[key] = 64
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match=rf"config.data.{key}: batch_size=64: expected a positive multiple of shard_count=3 \(the number of processes"):
        jobs.check_data(config, None, {})
