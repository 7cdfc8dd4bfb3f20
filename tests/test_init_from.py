"""Tests of ``checkpoint.restore_variables`` (the "warm start" read of another run's model
variables) on real checkpoints written by ``Checkpointer``: each form of path, another optimizer,
a model of other shapes or dtypes, bad paths, NaN, and two ``jax.distributed`` processes (CPU,
coordinator on 127.0.0.1; they run this file as a script: ``python tests/test_init_from.py ...``).
"""

import json
import os
import sys

if __name__ == "__main__":  # subprocess mode
    os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from hocp_jax.training import checkpoint  # noqa: E402
from hocp_jax.training.state import TrainState  # noqa: E402

X = np.zeros((1, 16, 16, 3), np.float32)
NAME = "config.init_from"


def tiny_model(n_outputs=2):
    from hocp_jax.models import get_model
    return get_model("resnet18_hocp", tiny=True, head=dict(n_outputs=n_outputs, n_classes=0, bounded=True))


def like_of(model, x=X):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def save(directory, variables, step, tx=None, keep=2):
    """Writes a TrainState of ``variables`` and ``tx``'s state (default adam) at ``step``."""
    state = TrainState.create(variables, tx or optax.adam(1e-3), jax.random.key(0))
    with checkpoint.Checkpointer(directory, save_every=1, keep=keep, async_save=False) as ckpt:
        assert ckpt.save(state, {"stage": "static"}, step=step, force=True)


def random_like(like, seed):
    """Variables of ``like``'s shapes and dtypes, other random values for each ``seed`` (no model.init: seconds)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), like)


def assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert isinstance(g, np.ndarray) and g.dtype == w.dtype
        np.testing.assert_array_equal(g, np.asarray(w))  # bitwise


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A job workdir: ``static/`` with checkpoints 1, 2 (adam) and best/7 (sgd), ``stage1/``
    with checkpoint 5; ``variables[step]`` what each step holds."""
    root = tmp_path_factory.mktemp("run")
    like = like_of(tiny_model())
    assert set(like) == {"params", "batch_stats"}
    variables = {step: random_like(like, step) for step in (1, 2, 5, 7)}
    save(root / "static" / "checkpoints", variables[1], 1)
    save(root / "static" / "checkpoints", variables[2], 2)
    save(root / "static" / "best", variables[7], 7, optax.sgd(0.1))
    save(root / "stage1" / "checkpoints", variables[5], 5, optax.sgd(0.1, momentum=0.9))
    return root, variables


@pytest.mark.parametrize("path, step_dir", [
    ("static/checkpoints/1", "static/checkpoints/1"),  # a step directory: that step, not the newest
    ("static/checkpoints", "static/checkpoints/2"),  # a Checkpointer directory: its newest step
    ("static", "static/checkpoints/2"),  # a stage: its newest checkpoint, not its best
    ("static/best", "static/best/7"),  # written with another optimizer (sgd): it does not matter
    ("static/best/7", "static/best/7"),
    ("stage1", "stage1/checkpoints/5"),
])
def test_each_form_of_path_reads_the_variables_of_its_step(run, path, step_dir):
    root, variables = run
    got, read_from = checkpoint.restore_variables(str(root / path), name=NAME)
    assert read_from == str(root / step_dir)
    assert_same(got, variables[int(os.path.basename(step_dir))])


def test_like_checks_the_shapes_and_casts_to_its_dtypes(run):
    root, variables = run
    like = like_of(tiny_model())
    got, _ = checkpoint.restore_variables(str(root / "static"), like, name=NAME)
    assert_same(got, variables[2])
    half = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), like["params"]),
            "batch_stats": like["batch_stats"]}
    got, _ = checkpoint.restore_variables(str(root / "static"), half, name=NAME)
    assert_same(got, {"params": jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16), variables[2]["params"]),
                      "batch_stats": variables[2]["batch_stats"]})
    with pytest.raises(ValueError, match=r"^like must be a dict of 'params' and optionally 'batch_stats', got "):
        checkpoint.restore_variables(str(root / "static"), like["params"], name=NAME)


def test_a_model_of_other_shapes_is_refused_naming_each_leaf(run):
    root, _ = run
    path = str(root / "static")
    with pytest.raises(ValueError) as err:
        checkpoint.restore_variables(path, like_of(tiny_model(n_outputs=8)), name=NAME)
    message = str(err.value)
    assert message.startswith(f"{NAME}={path!r}: ") and "another model or model.kwargs?" in message
    assert "params/head/va/kernel: (16, 2) in the checkpoint, (16, 8) expected" in message
    assert "params/head/va/bias: (2,) in the checkpoint, (8,) expected" in message
    assert "missing" not in message and "unexpected" not in message


def test_a_model_without_batch_stats_and_a_checkpoint_with_them_do_not_match(run, tmp_path):
    root, _ = run
    dense, x = nn.Dense(3), jnp.zeros((1, 4))
    with pytest.raises(ValueError, match=r"; missing: params/bias, params/kernel; unexpected: batch_stats/layer1_0/"):
        checkpoint.restore_variables(str(root / "static"), like_of(dense, x), name=NAME)
    save(tmp_path / "checkpoints", random_like(like_of(dense, x), 0), 1)
    got, _ = checkpoint.restore_variables(str(tmp_path), like_of(dense, x))
    assert set(got) == {"params"}  # the TrainState's empty batch_stats is not returned
    with pytest.raises(ValueError, match=r"; missing: batch_stats/bn/mean$"):
        checkpoint.restore_variables(str(tmp_path), like_of(dense, x) | {
            "batch_stats": {"bn": {"mean": jax.ShapeDtypeStruct((3,), jnp.float32)}}})


def test_paths_without_a_checkpoint_are_errors_naming_the_argument(run, tmp_path):
    root, _ = run
    with pytest.raises(FileNotFoundError, match=rf"^{NAME}='{tmp_path}/nothing': no such directory$"):
        checkpoint.restore_variables(str(tmp_path / "nothing"), name=NAME)
    with pytest.raises(ValueError, match=rf"^{NAME}='{root}': a job workdir; expected one of its stages: "
                                         rf"{root}/stage1, {root}/static$"):
        checkpoint.restore_variables(str(root), name=NAME)
    with pytest.raises(ValueError, match=rf"^{NAME}='{tmp_path}': no complete checkpoint in {tmp_path}; expected "):
        checkpoint.restore_variables(str(tmp_path), name=NAME)
    with pytest.raises(ValueError, match=r"^path='': expected the path of a checkpoint directory"):
        checkpoint.restore_variables("")


def test_a_damaged_checkpoint_is_a_value_error(tmp_path):
    save(tmp_path / "a" / "checkpoints", {"params": {"w": jnp.ones(3)}}, 4)
    os.remove(tmp_path / "a" / "checkpoints" / "4" / "state" / "_METADATA")
    (tmp_path / "b" / "checkpoints" / "6").mkdir(parents=True)  # orbax lists an empty step directory
    for path, step_dir in (
            (tmp_path / "a", "a/checkpoints/4"),
            (tmp_path / "b" / "checkpoints" / "6", "b/checkpoints/6")):
        with pytest.raises(ValueError, match=rf"^{NAME}='{path}': cannot read the model variables of "
                                             rf"{tmp_path}/{step_dir} \("):
            checkpoint.restore_variables(str(path), name=NAME)


def test_nan_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "check_finite", lambda *args: None)  # the Checkpointer refuses to write NaN
    save(tmp_path, {"params": {"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan]), "n": jnp.arange(3)}}, 1)
    with pytest.raises(ValueError, match=rf"^{NAME}='{tmp_path}': the checkpoint {tmp_path}/1 holds NaN/Inf in "
                                         r"params/b$"):
        checkpoint.restore_variables(str(tmp_path), name=NAME)


def script(tmp: str, port: int, process_id: int) -> None:
    """Process 1 does not list step 3 (a lagging listing) and fails alone to read step 1."""
    from hocp_jax.training.distributed import maybe_initialize_distributed

    maybe_initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    find, read = checkpoint._find_checkpoints, checkpoint._read_variables
    if process_id == 1:
        def lagging(path, what):
            found = find(path, what)
            return found | {"steps": [s for s in found["steps"] if s != 3]}

        def failing(step_dir, like, what):
            if step_dir.endswith("/1"):
                raise ValueError(f"{what}: simulated read error")
            return read(step_dir, like, what)

        checkpoint._find_checkpoints, checkpoint._read_variables = lagging, failing
    out = {}
    for step in ("", "3", "1"):
        try:
            variables, step_dir = checkpoint.restore_variables(os.path.join(tmp, "checkpoints", step), name=NAME)
            out[step] = [step_dir, np.asarray(variables["params"]["w"]).tolist()]
        except ValueError as err:
            out[step] = str(err)
    with open(os.path.join(tmp, f"process{process_id}.json"), "w") as f:
        json.dump(out, f)


def test_two_processes_read_the_same_step_and_fail_together(tmp_path, run_processes):
    for step in (1, 2, 3):
        save(tmp_path / "checkpoints", {"params": {"w": jnp.full(2, float(step))}}, step, keep=3)
    for proc in run_processes(lambda port, i: [__file__, str(tmp_path), str(port), str(i)], timeout=120):
        assert proc.returncode == 0, proc.stderr[-3000:]
    zero, one = (json.loads((tmp_path / f"process{i}.json").read_text()) for i in range(2))
    directory = tmp_path / "checkpoints"
    assert zero[""] == one[""] == [str(directory / "2"), [2.0, 2.0]]  # the newest step both list, not 3
    assert zero["3"] == one["3"] == (f"{NAME}={str(directory / '3')!r}: no checkpoint of {directory} that "
                                     "every process lists")
    assert one["1"] == f"{NAME}={str(directory / '1')!r}: simulated read error"
    assert zero["1"] == f"on process 1 (restore_variables): {one['1']}"


def _smoke(c, data_dir, **overrides):
    """A ``:smoke`` config ``c`` on ``data_dir``, 3 steps, with ``overrides`` (dotted keys)."""
    c.data.data_dir = str(data_dir)
    c.static.num_steps, c.log_every, c.checkpoint_every = 3, 3, 3
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return c


def test_config_init_from_starts_the_static_stage_from_another_runs_variables(tmp_path, capsys, load_config):
    """``config.init_from`` (train.py): ``static.num_steps=0`` evaluates the source run's variables
    as they are (its own evaluation, exactly) or transduces them; with steps it fine-tunes from
    them; the source is stored with the run (a resume with another is refused) and not read again
    on resume; ``static.num_steps=0`` where the static stage trained is refused."""
    import shutil

    from hocp_jax.training import jobs
    data = tmp_path / "data"
    smoke = lambda module, **overrides: _smoke(load_config(module, "smoke"), data, **overrides)  # noqa: E731
    source = tmp_path / "source"
    rows = jobs.run(smoke("affectnet"), str(source))

    # the variables as they are: the supervised job only evaluates them, and writes no stage
    again = jobs.run(smoke("affectnet", init_from=str(source / "static"), **{"static.num_steps": 0}),
                     str(tmp_path / "eval"))
    assert again == rows and not (tmp_path / "eval" / "static").exists()
    assert f"starting from the variables of {source / 'static' / 'checkpoints' / '3'}" in capsys.readouterr().out

    # trained from them (at a learning rate too small to move a float32 parameter): the source's parameters
    tuned, tiny = tmp_path / "tuned", {"optimizer.learning_rate": 1e-30}
    from_step = str(source / "static" / "checkpoints" / "3")
    jobs.run(smoke("affectnet", init_from=from_step, **tiny), str(tuned))
    assert_same(checkpoint.restore_variables(tuned / "static")[0]["params"],
                checkpoint.restore_variables(source / "static")[0]["params"])
    with pytest.raises(ValueError, match=r"run.init_from: .*source/static/checkpoints/3' -> .*source/static'"):
        jobs.run(smoke("affectnet", init_from=str(source / "static"), **tiny), str(tuned))
    # the transduction job (configs/afew_va.py: the same static model) transduces the variables as they are;
    # its stage 1 stores their step directory: a rerun from another source is refused
    video = tmp_path / "video"
    afew = lambda init: smoke("afew_va", init_from=init, **{  # noqa: E731
        "static.num_steps": 0, "stage1.num_steps": 1, "stage2.num_steps": 1, "baseline.models": ()})
    assert jobs.run(afew(str(source / "static")), str(video))["static (per frame)"]["params"] == rows["resnet18_hocp"]["params"]
    with pytest.raises(ValueError, match=r"run.static_from: .*source/static/checkpoints/3' -> .*tuned/static/checkpoints/3'"):
        jobs.run(afew(str(tuned / "static")), str(video))

    shutil.rmtree(source)  # a resume reads its own checkpoints only
    assert jobs.run(smoke("affectnet", init_from=from_step, **tiny), str(tuned))
    with pytest.raises(ValueError, match=r"holds the checkpoints of a static stage that trained \(newest step 3\)"):
        jobs.run(smoke("affectnet", init_from=from_step, **tiny, **{"static.num_steps": 0}), str(tuned))
    with pytest.raises(FileNotFoundError, match="config.init_from="):
        jobs.run(smoke("affectnet", init_from=str(source / "static")), str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"config.static.num_steps=0: expected an int > 0"):
        jobs.check_config(smoke("affectnet", **{"static.num_steps": 0}))


if __name__ == "__main__":
    script(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
