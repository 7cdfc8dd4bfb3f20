"""Tests of hocp_jax.training: resume, multi-device, NaN guard, frozen leaves, config.

The multi-process parts run this file as a script (``python tests/test_training.py ...``)
in subprocesses with their own ``XLA_FLAGS`` device count.
"""

import argparse
import json
import os
import signal
import subprocess
import sys

import numpy as np

if __name__ == "__main__":  # subprocess mode: device count must be set before jax starts
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[sys.argv.index('--devices') + 1]}"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from hocp_jax import training  # noqa: E402
from hocp_jax.training import checkpoint, config as config_lib, logging as tlog, schedules  # noqa: E402
from hocp_jax.training.step import make_train_step  # noqa: E402

N_EXAMPLES, BATCH = 40, 8


class TinyNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> mean pool -> Dropout -> Dense(2): {"va": (B, 2)}."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x)
        x = nn.relu(x).mean(axis=(1, 2))
        x = nn.Dropout(0.25, deterministic=not train)(x)
        return {"va": nn.Dense(2, name="head")(x)}


class ArrayIterator:
    """Endless, per-epoch shuffled batches of in-memory arrays; position = batches served."""

    def __init__(self, data, batch_size=BATCH, seed=0, kill_at=None, nan_at=None):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.kill_at, self.nan_at, self.pos = kill_at, nan_at, 0

    def get_state(self):
        return {"pos": self.pos}

    def set_state(self, state):
        self.pos = state["pos"]

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        per_epoch = N_EXAMPLES // self.batch_size
        epoch, i = divmod(self.pos, per_epoch)
        idx = np.random.default_rng(self.seed + epoch).permutation(N_EXAMPLES)
        idx = idx[i * self.batch_size:(i + 1) * self.batch_size]
        batch = {k: v[idx] for k, v in self.data.items()}
        if self.pos == self.nan_at:
            batch["va"] = np.full_like(batch["va"], np.nan)
        self.pos += 1
        return batch


def make_data():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(N_EXAMPLES, 6, 6, 3)).astype(np.float32)
    va = np.tanh(image[:, :3, :3, :2].mean(axis=(1, 2)) * 3).astype(np.float32)
    return {"image": image, "va": va, "label": (va[:, 0] > 0).astype(np.int32)}


def mse_loss(outputs, batch, key):
    del key
    mse = jnp.mean((outputs["va"] - batch["va"]) ** 2)
    return mse, {"mse": mse}


def l1_head(params):
    return 1e-3 * jnp.sum(jnp.abs(params["head"]["kernel"]))


def run_fit(workdir, steps, kill_at=None, nan_at=None, checkpoint_every=4, log_every=3,
            async_checkpointing=False):
    data = make_data()
    cfg = ml_collections.ConfigDict(dict(
        num_steps=steps, seed=3, checkpoint_every=checkpoint_every, keep_checkpoints=2,
        log_every=log_every, stage="static", async_checkpointing=async_checkpointing))
    return training.fit(
        TinyNet(), mse_loss, optax.sgd(0.1, momentum=0.9),
        lambda: ArrayIterator(data, kill_at=kill_at, nan_at=nan_at), cfg, workdir, reg_fn=l1_head)


def flat_params(state):
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(
        {"params": state.params, "batch_stats": state.batch_stats}))[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def script(args):
    """Subprocess entry point: fit, then save the final params (and eval check) to --out."""
    # async saves, except in the run to be killed: there the step-4 save must be complete
    state = run_fit(args.workdir, args.steps, kill_at=args.kill_at,
                    async_checkpointing=args.kill_at is None)
    result = flat_params(state)
    data, mesh = make_data(), training.make_data_mesh()
    eval_step = jax.jit(training.make_eval_step(TinyNet()))
    uneven = [{k: v[:5] for k, v in data.items()}, {k: v[5:8] for k, v in data.items()}]
    got = training.evaluate(eval_step, state, uneven,
                            lambda o, b: {"va": o["va"], "label": b["label"]}, mesh)
    want = TinyNet().apply(jax.device_get(state.variables), data["image"][:8], train=False)
    result["eval_va"], result["want_va"], result["eval_label"] = got["va"], want["va"], got["label"]
    np.savez(args.out, n_devices=len(jax.devices()), **result)


def run_script(tmp_path, name, devices, steps, kill_at=None, workdir=None):
    out = tmp_path / f"{name}.npz"
    cmd = [sys.executable, __file__, "--devices", str(devices), "--steps", str(steps),
           "--workdir", str(workdir or tmp_path / name), "--out", str(out)]
    if kill_at is not None:
        cmd += ["--kill-at", str(kill_at)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc, out


def load(out):
    with np.load(out) as f:
        return dict(f)


def test_kill_and_resume_gives_identical_params(tmp_path):
    full_proc, full_out = run_script(tmp_path, "full", 1, 10)
    assert full_proc.returncode == 0, full_proc.stderr[-3000:]
    workdir = tmp_path / "killed"
    # checkpoints every 4 steps; SIGKILL while fetching the batch of step 7
    proc, out = run_script(tmp_path, "killed", 1, 10, kill_at=6, workdir=workdir)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    with checkpoint.Checkpointer(workdir / "checkpoints", save_every=4) as ckpt:
        assert ckpt.latest_step() == 4
    proc, out = run_script(tmp_path, "killed", 1, 10, workdir=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, resumed = load(full_out), load(out)
    assert full.keys() == resumed.keys()
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
    logged = [r["step"] for r in tlog.read_metrics(workdir / "metrics.jsonl")]
    assert logged[-1] == 10 and 6 in logged  # log_every=3: resumed run logged again from 5


def test_eight_devices_match_one_device(tmp_path):
    one_proc, one_out = run_script(tmp_path, "one", 1, 6)
    eight_proc, eight_out = run_script(tmp_path, "eight", 8, 6)
    assert one_proc.returncode == 0, one_proc.stderr[-3000:]
    assert eight_proc.returncode == 0, eight_proc.stderr[-3000:]
    one, eight = load(one_out), load(eight_out)
    assert one.pop("n_devices") == 1 and eight.pop("n_devices") == 8
    for k in one:
        np.testing.assert_allclose(eight[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # evaluate() on batches of 5 and 3 examples (padded to 8 devices) == dense apply
    np.testing.assert_allclose(eight["eval_va"], eight["want_va"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(eight["eval_label"], make_data()["label"][:8])


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
    clean = run_fit(str(tmp_path / "clean"), 4, checkpoint_every=2, log_every=100)
    with pytest.raises(training.NonFiniteError, match="non-finite"):
        run_fit(str(tmp_path / "nan"), 10, nan_at=4, checkpoint_every=2, log_every=100)
    with checkpoint.Checkpointer(tmp_path / "nan" / "checkpoints", save_every=2) as ckpt:
        assert ckpt.all_steps() == [2, 4]
        state, extra = ckpt.restore(clean)
    assert extra["stage"] == "static" and extra["data_state"] == {"pos": 4}
    want = flat_params(clean)
    for k, v in flat_params(state).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_checkpointer_refuses_non_finite_state(tmp_path):
    variables = {"params": {"w": jnp.ones(3)}}
    state = training.TrainState.create(variables, optax.adam(1e-3), jax.random.key(0))
    with checkpoint.Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        assert ckpt.save(state.replace(step=jnp.int32(1)), {"pos": 1})
        bad = state.replace(step=jnp.int32(2), params={"w": jnp.array([1.0, jnp.inf, 0.0])})
        with pytest.raises(training.NonFiniteError, match=r"\['params'\]\['w'\]"):
            ckpt.save(bad, {"pos": 2})
        with pytest.raises(training.NonFiniteError, match="loss"):
            ckpt.save(state.replace(step=jnp.int32(3)), {}, metrics={"loss": np.nan})
        assert ckpt.all_steps() == [1]


def test_resume_with_other_stage_is_an_error(tmp_path):
    run_fit(str(tmp_path), 2, checkpoint_every=2)
    cfg = dict(num_steps=3, seed=3, stage="stage1")
    with pytest.raises(ValueError, match="stage 'static'"):
        training.fit(TinyNet(), mse_loss, optax.sgd(0.1), lambda: ArrayIterator(make_data()),
                     cfg, str(tmp_path))


def test_train_step_matches_numpy_sgd_with_l1():
    """Linear model + MSE + L1: one SGD step against the analytic numpy gradient."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)
    model = nn.Dense(2)
    apply = lambda variables, x, train, mutable, rngs: ({"va": model.apply(variables, x)}, {})  # noqa: E731
    wrapper = type("Wrapper", (), {"apply": staticmethod(apply)})()
    variables = model.init(jax.random.key(0), x)
    lr, lam = 0.05, 0.01
    state = training.TrainState.create(variables, optax.sgd(lr), jax.random.key(1))
    reg = lambda p: lam * jnp.sum(jnp.abs(p["kernel"]))  # noqa: E731
    step = jax.jit(make_train_step(wrapper, mse_loss, optax.sgd(lr), reg))
    new, metrics = step(state, {"image": x, "va": y})
    w, b = (np.asarray(variables["params"][k], np.float64) for k in ("kernel", "bias"))
    resid = x @ w + b - y
    grad_w = 2 * x.T @ resid / resid.size + lam * np.sign(w)
    grad_b = 2 * resid.sum(0) / resid.size
    np.testing.assert_allclose(new.params["kernel"], w - lr * grad_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.params["bias"], b - lr * grad_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], np.mean(resid**2), rtol=1e-5)
    np.testing.assert_allclose(metrics["reg"], lam * np.abs(w).sum(), rtol=1e-5)
    assert int(new.step) == 1


def test_frozen_leaves_are_bitwise_unchanged():
    data = make_data()
    batch = {k: v[:BATCH] for k, v in data.items()}
    model = TinyNet()
    variables = model.init(jax.random.key(0), batch["image"], train=False)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if path[0].key == "conv" else "train", variables["params"])
    tx = optax.partition({"train": optax.adam(0.1), "frozen": optax.set_to_zero()}, labels)
    state = training.TrainState.create(variables, tx, jax.random.key(1))
    step = jax.jit(make_train_step(model, mse_loss, tx))
    for _ in range(3):
        state, _ = step(state, batch)
    for name in ("kernel", "bias"):
        before = np.asarray(variables["params"]["conv"][name])
        after = np.asarray(state.params["conv"][name])
        assert after.tobytes() == before.tobytes(), name
    assert not np.allclose(state.params["head"]["kernel"], variables["params"]["head"]["kernel"])


def test_put_batch_rejects_indivisible_and_ragged_batches():
    mesh = training.make_data_mesh()
    with pytest.raises(ValueError, match="leading batch axis"):
        training.put_batch({"image": np.zeros((4, 2)), "va": np.zeros((3, 2))}, mesh)


def test_validate_config_names_bad_keys():
    cfg = ml_collections.ConfigDict(dict(num_steps=10, seed=0, log_evry=5, stage=""))
    with pytest.raises(ValueError) as err:
        config_lib.validate_config(
            cfg, ("num_steps", "seed", "workdir"), ("log_every", "stage"),
            checks={"stage": (bool, "a non-empty str")})
    msg = str(err.value)
    assert "missing required key config.workdir" in msg
    assert "unknown key config.log_evry (did you mean config.log_every?)" in msg
    assert "bad value config.stage=''" in msg
    config_lib.validate_config(dict(num_steps=1, seed=0), ("num_steps", "seed"))
    with pytest.raises(ValueError, match="num_steps"):
        training.fit(TinyNet(), mse_loss, optax.sgd(0.1), None, dict(num_steps=0, seed=0), "/x")


def test_schedules_step_and_piecewise():
    step = schedules.make_schedule(ml_collections.ConfigDict(dict(
        name="adam", learning_rate=1e-3, steps_per_epoch=10)))
    for s in (0, 149, 150, 299, 300, 1000):
        np.testing.assert_allclose(step(s), 1e-3 * 0.1 ** (s // 150), rtol=1e-6)
    piece = schedules.make_schedule(dict(name="sgd", learning_rate=0.1, steps_per_epoch=5,
                                         schedule="piecewise", boundaries_epochs=(2, 5)))
    for s, want in ((0, 0.1), (9, 0.1), (10, 0.01), (24, 0.01), (25, 0.001)):
        np.testing.assert_allclose(piece(s), want, rtol=1e-6)
    params = {"w": jnp.ones(2)}
    for name in schedules.NAMES:
        tx = schedules.make_optimizer(dict(name=name, learning_rate=0.1, steps_per_epoch=1,
                                           weight_decay=0.1))
        updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
        assert np.all(np.asarray(updates["w"]) < 0), name  # pure weight decay shrinks w
    with pytest.raises(ValueError, match=r"config.optimizer.name='adagrad'"):
        schedules.make_optimizer(dict(name="adagrad", learning_rate=0.1, steps_per_epoch=1))


def test_metric_logger_and_plot(tmp_path):
    with tlog.MetricLogger(str(tmp_path)) as logger:
        for s in (1, 2, 3):
            logger.write(s, {"loss": np.float32(1.0 / s), "mse": jnp.asarray(2.0 / s)})
        logger.write(3, {"loss": 0.5}, split="eval")
    records = tlog.read_metrics(tmp_path / "metrics.jsonl")
    assert records[0] == {"step": 1, "split": "train", "loss": 1.0, "mse": 2.0}
    assert records[-1] == {"step": 3, "split": "eval", "loss": 0.5}
    png = tlog.plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert os.path.getsize(png) > 1000
    with pytest.raises(ValueError, match="not in"):
        tlog.plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "x.png", keys=["acc"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for flag, kind in (("--devices", int), ("--steps", int), ("--kill-at", int),
                       ("--workdir", str), ("--out", str)):
        parser.add_argument(flag, type=kind)
    script(parser.parse_args())


def test_fit_does_not_consume_init_variables(tmp_path):
    """fit donates its state; the caller's init_variables (jax arrays) must survive."""
    import flax.linen as nn
    import jax.numpy as jnp
    import optax
    from hocp_jax.training import fit

    class Lin(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return {"va": nn.Dense(2)(x)}

    class It:
        def __init__(self):
            self.i = 0

        def __next__(self):
            self.i += 1
            return {"image": np.ones((4, 3), np.float32), "va": np.zeros((4, 2), np.float32)}

        def get_state(self):
            return {"i": self.i}

        def set_state(self, s):
            self.i = s["i"]

    model = Lin()
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    loss = lambda out, batch, key: (jnp.mean((out["va"] - batch["va"]) ** 2), {})  # noqa: E731
    fit(model, loss, optax.sgd(0.1), It, dict(num_steps=2, seed=0, checkpoint_every=2), str(tmp_path),
        init_variables=variables)
    assert all(not x.is_deleted() for x in jax.tree.leaves(variables))
