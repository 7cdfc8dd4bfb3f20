"""Tests of hocp_jax.training: resume, multi-device, multi-process, NaN guard, frozen leaves,
config, streaming evaluation, no host sync per step.

The multi-process parts run this file as a script (``python tests/test_training.py ...``)
in subprocesses with their own ``XLA_FLAGS`` device count (and, for the 2-process test, their
own ``jax.distributed`` process id, coordinator on 127.0.0.1).
"""

import argparse
import functools
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
import weakref

import numpy as np

if __name__ == "__main__":  # subprocess mode: device count must be set before jax starts
    os.environ["JAX_PLATFORMS"] = "cpu"
    devices = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from hocp_jax import training  # noqa: E402
from hocp_jax.training import checkpoint, config as config_lib, jobs, metric_log as tlog, objectives, schedules  # noqa: E402
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

    def __init__(self, data, batch_size=BATCH, seed=0, kill_at=None, nan_at=None, on_pos=None):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.kill_at, self.nan_at, self.pos, self.on_pos = kill_at, nan_at, 0, on_pos or {}

    def get_state(self):
        return {"pos": self.pos}

    def set_state(self, state):
        self.pos = state["pos"]

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.pos in self.on_pos:
            self.on_pos[self.pos]()
        per_epoch = N_EXAMPLES // self.batch_size
        epoch, i = divmod(self.pos, per_epoch)
        idx = np.random.default_rng(self.seed + epoch).permutation(N_EXAMPLES)
        idx = idx[i * self.batch_size:(i + 1) * self.batch_size]
        # this process's rows of the global batch (jax.distributed: process p holds the p-th part)
        local = self.batch_size // jax.process_count()
        idx = idx[jax.process_index() * local:(jax.process_index() + 1) * local]
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
            async_checkpointing=False, on_pos=None, tx=None, profile_steps=0):
    data = make_data()
    cfg = ml_collections.ConfigDict(dict(
        num_steps=steps, seed=3, checkpoint_every=checkpoint_every, keep_checkpoints=2,
        log_every=log_every, stage="static", async_checkpointing=async_checkpointing, profile_steps=profile_steps))
    return training.fit(
        TinyNet(), mse_loss, optax.sgd(0.1, momentum=0.9) if tx is None else tx,
        lambda: ArrayIterator(data, kill_at=kill_at, nan_at=nan_at, on_pos=on_pos), cfg, workdir,
        reg_fn=l1_head)


def flat_params(state):
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(
        {"params": state.params, "batch_stats": state.batch_stats}))[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


EVAL_BOUNDS = (0, 6, 10)  # two eval batches, of 6 and 4 examples (padded on 8 devices)


def script(args):
    """Subprocess entry point: fit, then save the final params, the eval metrics and the first
    eval batch's outputs (:func:`jobs.evaluate_variables`) to --out."""
    if args.num_processes > 1:
        training.maybe_initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    # async saves, except in the run to be killed: there the step-4 save must be complete
    term = {}
    if args.term_at is not None:  # steps slowed down after the notice, so that the sync point comes before the end
        term = {pos: functools.partial(time.sleep, 0.2) for pos in range(args.term_at + 1, args.steps + 1)}
        if args.term_process == args.process_id:
            term[args.term_at] = lambda: os.kill(os.getpid(), signal.SIGTERM)
    try:
        state = run_fit(args.workdir, args.steps, kill_at=args.kill_at, async_checkpointing=args.kill_at is None,
                        on_pos=term, profile_steps=args.profile_steps)
    except training.Preempted as notice:
        print(f"preempted at step {notice.step}", file=sys.stderr)
        sys.exit(143)
    result = flat_params(state)
    data, p, n = make_data(), jax.process_index(), jax.process_count()
    batches = []
    for lo, hi in zip(EVAL_BOUNDS[:-1], EVAL_BOUNDS[1:]):
        local = (hi - lo) // n
        batches.append({k: v[lo + p * local:lo + (p + 1) * local] for k, v in data.items() if k != "label"})
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    got, first = jobs.evaluate_variables(TinyNet(), variables, types.SimpleNamespace(eval_batches=lambda _: batches), "x")
    result |= {f"eval_{k}": v for k, v in got.items()} | {"eval_first_va": first["va"]}
    if p == 0:
        np.savez(args.out, n_devices=len(jax.devices()), **result)


def run_script(tmp_path, name, devices, steps, kill_at=None, workdir=None, num_processes=1, term=None,
               profile_steps=0):
    """``term=(process, pos)``: that process sends itself SIGTERM while fetching batch ``pos``."""
    out = tmp_path / f"{name}.npz"
    cmd = [sys.executable, __file__, "--devices", str(devices), "--steps", str(steps),
           "--workdir", str(workdir or tmp_path / name), "--out", str(out), "--profile-steps", str(profile_steps)]
    if kill_at is not None:
        cmd += ["--kill-at", str(kill_at)]
    if term is not None:
        cmd += ["--term-process", str(term[0]), "--term-at", str(term[1])]
    if num_processes == 1:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300), out
    with socket.socket() as sock:  # a free port for the coordinator
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen(cmd + ["--num-processes", str(num_processes), "--process-id", str(i),
                                     "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    results = [proc.communicate(timeout=300) for proc in procs]
    return [subprocess.CompletedProcess(proc.args, proc.returncode, o, e) for proc, (o, e) in zip(procs, results)], out


def oracle_eval(state_npz):
    """float64 numpy metrics of the final TinyNet on the eval examples (independent of the
    streaming evaluator)."""
    data = make_data()
    params = {}
    for k, v in state_npz.items():
        if k.startswith("['"):
            keys = [part.strip("'[]") for part in k.split("][")]
            node = params
            for part in keys[:-1]:
                node = node.setdefault(part, {})
            node[keys[-1]] = v
    rows = slice(EVAL_BOUNDS[0], EVAL_BOUNDS[-1])
    pred = np.asarray(TinyNet().apply(params, data["image"][rows], train=False)["va"], np.float64)
    true = data["va"][rows].astype(np.float64)
    mt, mp = true.mean(0), pred.mean(0)
    cov = ((true - mt) * (pred - mp)).mean(0)
    ccc = 2 * cov / (true.var(0) + pred.var(0) + (mt - mp) ** 2)
    rmse = np.sqrt(((true - pred) ** 2).mean(0))
    return {f"eval_{t}_{m}": v[i] for m, v in (("ccc", ccc), ("rmse", rmse)) for i, t in enumerate(objectives.TARGETS)} | {
        "eval_first_va": pred[:EVAL_BOUNDS[1] - EVAL_BOUNDS[0]]}


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
    # the killed run logged step 6; the resumed one redid steps 5..10 and logged 6 again:
    # the file must hold it once (the old line dropped), like the uninterrupted run's file
    logged = [r["step"] for r in tlog.read_metrics(workdir / "metrics.jsonl")]
    assert logged == [r["step"] for r in tlog.read_metrics(tmp_path / "full" / "metrics.jsonl")]
    assert logged == [3, 4, 6, 8, 9, 10]


def test_eight_devices_and_two_processes_match_one_device(tmp_path):
    """8 simulated devices, and a real 2-process jax.distributed run on localhost (CPU, gloo
    collectives; each process reads its half of every batch), end with the 1-device params;
    their streamed eval metrics and first eval batch's outputs (jobs.evaluate_variables)
    match a float64 oracle. The two processes also run ``profile_steps=2``: each traces steps
    2..3 into a folder of its own."""
    one_proc, one_out = run_script(tmp_path, "one", 1, 6)
    eight_proc, eight_out = run_script(tmp_path, "eight", 8, 6)
    procs, two_out = run_script(tmp_path, "two", 1, 6, num_processes=2, profile_steps=2)
    for proc in [one_proc, eight_proc, *procs]:
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, eight, two = load(one_out), load(eight_out), load(two_out)
    assert one.pop("n_devices") == 1 and eight.pop("n_devices") == 8 and two.pop("n_devices") == 2
    assert one.keys() == eight.keys() == two.keys()
    for other in (eight, two):
        for k in one:
            np.testing.assert_allclose(other[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # streamed eval over batches of 6 and 4 examples (padded to 8 devices, the outputs of the
    # first cut back to its 6) == float64 oracle
    for k, want in oracle_eval(eight).items():
        np.testing.assert_allclose(eight[k], want, atol=1e-5, err_msg=k)
    logged = [r["step"] for r in tlog.read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert logged == [3, 4, 6]  # process 0 alone writes the log
    for i, proc in enumerate(procs):
        assert _traced_train_steps(tmp_path / "two" / "profile" / f"process{i}") == [2]
        assert ("profile: steps 2..3 traced to" in proc.stdout) == (i == 0)


def test_a_sigterm_on_one_of_two_processes_checkpoints_both_at_one_step(tmp_path):
    """A preemption notice (SIGTERM) to process 1 alone: JAX's preemption sync point stops both
    processes at the same step, each saving it (one collective checkpoint, off the every-4-steps
    schedule), exit status 143; resumed, they end with the uninterrupted run's params."""
    one_proc, one_out = run_script(tmp_path, "one", 1, 100)
    assert one_proc.returncode == 0, one_proc.stderr[-3000:]
    procs, _ = run_script(tmp_path, "two", 1, 100, num_processes=2, term=(1, 5))
    steps = set()
    for proc in procs:
        assert proc.returncode == 143, proc.stderr[-3000:]
        steps |= set(map(int, re.findall(r"preempted at step (\d+)", proc.stderr)))
    assert len(steps) == 1 and 5 < (step := steps.pop()) <= 100, steps
    with checkpoint.Checkpointer(tmp_path / "two" / "checkpoints", save_every=4) as ckpt:
        assert ckpt.latest_step() == step
    procs, two_out = run_script(tmp_path, "two", 1, 100, num_processes=2)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = load(one_out), load(two_out)
    assert one.pop("n_devices") == 1 and two.pop("n_devices") == 2
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)


PREEMPT_SCRIPT = """
import os, signal, sys
import jax, numpy as np, optax
sys.path.insert(0, sys.argv[4])
from test_training import ArrayIterator, TinyNet, flat_params, make_data, mse_loss
from hocp_jax import training

term_at, term_in_eval, kill_at = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5])
term = lambda: os.kill(os.getpid(), signal.SIGTERM)

def eval_fn(state):
    step = int(jax.device_get(state.step))
    if step == term_in_eval:
        term()
    return {"score": float(step)}

cfg = dict(num_steps=10, seed=3, stage="static", checkpoint_every=4, keep_checkpoints=2, log_every=3,
           eval_every=3, best_metric="score")
try:
    state = training.fit(TinyNet(), mse_loss, optax.sgd(0.1, momentum=0.9),
                         lambda: ArrayIterator(make_data(), on_pos={term_at: term}, kill_at=kill_at), cfg, sys.argv[1],
                         eval_fn=eval_fn)
except training.Preempted as notice:
    print(notice, file=sys.stderr)
    sys.exit(143)
np.savez(os.path.join(sys.argv[1], "params.npz"), **flat_params(state))
"""


def test_a_sigterm_checkpoints_the_step_it_is_seen_at_and_the_resume_is_exact(tmp_path):
    """One process: a SIGTERM while fetching the batch of step 6 (an evaluation step, not a
    checkpoint step) saves step 6 and exits with status 143; its evaluation is left to the resume,
    which evaluates step 6 first (a resume killed after that evaluation and resumed again logs it
    once) and ends with the uninterrupted run's params, logs and best/. A SIGTERM seen at the last
    step stops after its evaluation and checkpoint; one no step sees (during the last evaluation)
    still ends the process, by the signal, after the final checkpoint."""
    def run(workdir, term_at=-1, term_in_eval=-1, kill_at=-1):
        return subprocess.run([sys.executable, "-c", PREEMPT_SCRIPT, str(workdir), str(term_at), str(term_in_eval),
                               os.path.dirname(__file__), str(kill_at)], capture_output=True, text=True, timeout=600)

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = run(tmp_path / "run", term_at=5)
    assert stopped.returncode == 143 and "checkpointed at step 6" in stopped.stderr, stopped.stderr[-3000:]
    with checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", save_every=4) as ckpt:
        assert ckpt.all_steps() == [4, 6] and ckpt.restore_extra()["eval_due"] is True
    assert run(tmp_path / "run", kill_at=6).returncode == -signal.SIGKILL  # after the left-over evaluation
    resumed = run(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = load(tmp_path / "full" / "params.npz"), load(tmp_path / "run" / "params.npz")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    records = lambda d: [(r["split"], r["step"]) for r in tlog.read_metrics(d / "metrics.jsonl")]  # noqa: E731
    assert records(tmp_path / "run") == records(tmp_path / "full")
    assert ("eval", 6) in records(tmp_path / "run")
    with checkpoint.Checkpointer(tmp_path / "run" / "best", save_every=1, keep=1) as best:
        assert best.restore_extra()["step"] == 10

    last = run(tmp_path / "last", term_at=9)  # while fetching the batch of the last step
    assert last.returncode == 143 and "checkpointed at step 10" in last.stderr, last.stderr[-3000:]
    assert ("eval", 10) in records(tmp_path / "last")
    late = run(tmp_path / "late", term_in_eval=10)
    assert late.returncode == -signal.SIGTERM, late.stderr[-3000:]
    with checkpoint.Checkpointer(tmp_path / "late" / "checkpoints", save_every=4) as ckpt:
        assert ckpt.latest_step() == 10


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
        assert ckpt.save(state.replace(step=jnp.int32(1)), {"pos": 1}, step=1)
        bad = state.replace(step=jnp.int32(2), params={"w": jnp.array([1.0, jnp.inf, 0.0])})
        with pytest.raises(training.NonFiniteError, match=r"\['params'\]\['w'\]"):
            ckpt.save(bad, {"pos": 2}, step=2)
        with pytest.raises(training.NonFiniteError, match="loss"):
            ckpt.save(state.replace(step=jnp.int32(3)), {}, step=3, metrics={"loss": np.nan})
        assert ckpt.all_steps() == [1]


def _tiny_state(w=None):
    return training.TrainState.create({"params": {"w": np.ones(3, np.float32) if w is None else w}},
                                      optax.sgd(0.1), jax.random.key(0))


def test_checkpointer_refuses_bad_steps_and_paths(tmp_path):
    """Before: step=-1 or 2.5 wrote a checkpoint no listing finds; "" was the current directory;
    None, a file, async_save="no" and a restore_extra of a non-step directory failed deep inside."""
    with checkpoint.Checkpointer(tmp_path / "c", save_every=1, async_save=False) as ckpt:
        for step in (-1, 2.5, "7"):
            with pytest.raises(ValueError, match=rf"^step={re.escape(repr(step))}: expected an int >= 0"):
                ckpt.save(_tiny_state(), {}, step=step, force=True)
        assert ckpt.save(_tiny_state(), {}, step=np.int64(1))
    assert os.listdir(tmp_path / "c") == ["1"] and checkpoint.finished_steps(tmp_path / "c") == [1]
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for directory, words in (("", "directory='': expected the path"), (None, "directory=None: expected the path"),
                             (tmp_path / "afile", "a file; expected a directory"),
                             (tmp_path / "dangling", "a symbolic link to"),
                             (tmp_path / "dangling" / "c", f"{tmp_path / 'dangling'} is a symbolic link to")):
        with pytest.raises(ValueError, match=re.escape(words)):
            checkpoint.Checkpointer(directory, save_every=1)
    with pytest.raises(ValueError, match="async_save='no': expected True or False"):
        checkpoint.Checkpointer(tmp_path / "c", save_every=1, async_save="no")
    with pytest.raises(ValueError, match="^directory=None"):
        checkpoint.finished_steps(None)
    with pytest.raises(ValueError, match="expected a checkpoint's step directory"):
        checkpoint.restore_extra(tmp_path / "c")


def test_a_save_never_deletes_a_newer_checkpoint(tmp_path):
    """Orbax keeps checkpoints by save time: step 3 saved beside 10 and 11 at keep=2 deleted 10.
    A step older than the newest is refused at keep > 1; keep=1 (best/) holds the last one saved."""
    with checkpoint.Checkpointer(tmp_path / "c", save_every=1, keep=2, async_save=False) as ckpt:
        for step in (10, 11):
            assert ckpt.save(_tiny_state(), {}, step=step)
    with checkpoint.Checkpointer(tmp_path / "c", save_every=1, keep=2, async_save=False) as ckpt:
        with pytest.raises(ValueError, match=r"^step=3: older than the newest checkpoint of .*c, step 11"):
            ckpt.save(_tiny_state(), {}, step=3)
        assert not ckpt.save(_tiny_state(), {}, step=11)  # already there
        assert ckpt.all_steps() == [10, 11]
    with checkpoint.Checkpointer(tmp_path / "best", save_every=1, keep=1, async_save=False) as best:
        assert best.save(_tiny_state(), {}, step=8) and best.save(_tiny_state(), {}, step=6)
        assert best.all_steps() == [6]


def test_a_numpy_target_of_other_shapes_is_refused(tmp_path):
    """Before: numpy leaves came back in the stored shapes (jax arrays' were checked by orbax)."""
    with checkpoint.Checkpointer(tmp_path / "c", save_every=1, async_save=False) as ckpt:
        assert ckpt.save(_tiny_state(), {}, step=1)
        wide = _tiny_state(np.ones(4, np.float32))
        with pytest.raises(ValueError, match=r"other shapes than the target: .params\['w'\]: \(3,\) stored, \(4,\)"):
            ckpt.restore(wide)
        with pytest.raises(ValueError, match="no checkpoint in .* restores into this state"):
            ckpt.restore_latest(wide)
        assert ckpt.all_steps() == [1] and ckpt.restore(_tiny_state())[0].params["w"].shape == (3,)


def test_resume_past_num_steps_is_an_error(tmp_path):
    """A finished 8-step workdir re-run with num_steps=4 is refused (not reported as the 4-step
    model) and keeps its checkpoints; raising num_steps continues a run (test_resume_of_a_masked_stage)."""
    run_fit(str(tmp_path), 8)
    with pytest.raises(ValueError, match=rf"num_steps=4 .*{re.escape(str(tmp_path))} is at step 8"):
        run_fit(str(tmp_path), 4)
    with checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=4) as ckpt:
        assert ckpt.all_steps() == [4, 8]


def test_resume_with_other_stage_is_an_error(tmp_path):
    run_fit(str(tmp_path), 2, checkpoint_every=2)
    cfg = dict(num_steps=3, seed=3, stage="stage1")
    with pytest.raises(ValueError, match="stage 'static'"):
        training.fit(TinyNet(), mse_loss, optax.sgd(0.1), lambda: ArrayIterator(make_data()),
                     cfg, str(tmp_path))


def test_resume_with_another_config_is_an_error(tmp_path):
    """A resumed run must be the run of its checkpoints: another seed or ``run`` entry (model, loss,
    optimizer, data) is refused, naming the keys; num_steps, checkpoint_every, ... may change."""
    def fit(seed=3, run=None, **kw):
        cfg = dict(num_steps=4, seed=seed, stage="static", checkpoint_every=2, async_checkpointing=False,
                   run=run or {"optimizer": {"learning_rate": 0.1}, "data": {"batch_size": 4}}) | kw
        return training.fit(TinyNet(), mse_loss, optax.sgd(0.1), lambda: ArrayIterator(make_data()), cfg,
                            str(tmp_path))

    fit(num_steps=2)
    with pytest.raises(ValueError, match=r"another config \(seed: 3 -> 7\)"):
        fit(seed=7)
    with pytest.raises(ValueError, match=r"run.data.batch_size: 4 -> 2; run.optimizer.learning_rate: 0.1 -> 5.0"):
        fit(run={"optimizer": {"learning_rate": 5.0}, "data": {"batch_size": 2}})
    with pytest.raises(ValueError, match=r"run.optimizer.learning_rate: 0.1 -> \(absent\)"):
        fit(run={"data": {"batch_size": 4}})
    assert int(fit(num_steps=4, checkpoint_every=1, log_every=1).step) == 4  # allowed changes
    with checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=1) as ckpt:
        assert ckpt.all_steps() == [2, 3, 4]


def test_a_torn_last_log_line_does_not_block_the_resume(tmp_path):
    run_fit(str(tmp_path), 4)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tr')  # a write cut short by a crash
    with pytest.warns(UserWarning, match="line 3 is not a JSON record"):
        run_fit(str(tmp_path), 6)
    logged = [(r["step"], r["split"]) for r in tlog.read_metrics(tmp_path / "metrics.jsonl")]
    assert logged == [(3, "train"), (4, "train"), (6, "train")]
    # a last record cut short after its JSON, before its newline: the next one must not join it
    text = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(text.rstrip("\n"))
    run_fit(str(tmp_path), 9)
    assert [r["step"] for r in tlog.read_metrics(tmp_path / "metrics.jsonl")] == [3, 4, 6, 8, 9]


def test_check_same_run_ignores_keys_a_version_added_unset():
    stored = {"seed": 1, "run": {"model": {"name": "a"}, "transduction": None}}
    from hocp_jax.training.loop import check_same_run as loop_check
    loop_check(stored, {"seed": 1, "run": {"model": {"name": "a"}}}, "w")  # None -> absent: no change
    loop_check(stored, {"seed": 1, "run": {"model": {"name": "a"}, "transduction": None, "extra": {}}}, "w")
    with pytest.raises(ValueError, match=r"run.model.kwargs: \(absent\) -> 3"):
        loop_check(stored, {"seed": 1, "run": {"model": {"name": "a", "kwargs": 3}, "transduction": None}}, "w")
    loop_check({"seed": 1}, {"seed": 1, "run": {"model": {"name": "b"}}}, "w")  # a checkpoint without run
    # a fit option added later counts as its default in a checkpoint that did not store it
    loop_check({"seed": 1}, {"seed": 1, "microbatches": 1, "profile_steps": 3}, "w")
    with pytest.raises(ValueError, match=r"microbatches: 1 -> 2"):
        loop_check({"seed": 1}, {"seed": 1, "microbatches": 2}, "w")


EVAL_KILL_SCRIPT = """
import os, signal, sys
import jax, optax
sys.path.insert(0, sys.argv[3])
from test_training import ArrayIterator, TinyNet, make_data, mse_loss
from hocp_jax import training

def eval_fn(state):
    step = int(jax.device_get(state.step))
    if step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # killed during the evaluation of a checkpoint step
    return {"score": 10.0 if step == 4 else 1.0}

cfg = dict(num_steps=8, seed=3, stage="static", checkpoint_every=4, keep_checkpoints=2, log_every=4,
           eval_every=4, best_metric="score", async_checkpointing=False)
training.fit(TinyNet(), mse_loss, optax.sgd(0.1), lambda: ArrayIterator(make_data()), cfg, sys.argv[1], eval_fn=eval_fn)
"""


def test_evaluation_of_a_checkpoint_step_survives_a_kill(tmp_path):
    """A run killed while evaluating the state of a checkpoint step evaluates it again when
    resumed (evaluation comes before the save), so best/ still gets the best state; an
    evaluation that raises does not cost its step's checkpoint."""
    run = lambda kill_at: subprocess.run(  # noqa: E731
        [sys.executable, "-c", EVAL_KILL_SCRIPT, str(tmp_path / "run"), str(kill_at), os.path.dirname(__file__)],
        capture_output=True, text=True, timeout=600)
    assert run(4).returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "checkpoints" / "4").exists()
    proc = run(0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r["step"] for r in tlog.read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "eval"]
    assert evals == [4, 8]
    with checkpoint.Checkpointer(tmp_path / "run" / "best", save_every=1, keep=1) as best:
        extra = best.restore_extra()
    assert extra.pop("config")["num_steps"] > 0 and extra == {"metric": "score", "value": 10.0, "step": 4}

    def failing_eval(state):
        raise MemoryError("out of memory in the evaluation")

    cfg = dict(num_steps=4, seed=3, stage="static", checkpoint_every=2, eval_every=2, async_checkpointing=False)
    with pytest.raises(MemoryError):
        training.fit(TinyNet(), mse_loss, optax.sgd(0.1), lambda: ArrayIterator(make_data()), cfg,
                     str(tmp_path / "failing"), eval_fn=failing_eval)
    with checkpoint.Checkpointer(tmp_path / "failing" / "checkpoints", save_every=2) as ckpt:
        assert ckpt.all_steps() == [2]  # written although its evaluation raised


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


def test_mesh_and_put_batch_refuse_what_they_cannot_place():
    """Before: ``make_data_mesh([])`` an IndexError, two copies of a device a mesh that put_batch
    then failed on (JAX's safe_zip), a batch that is not a dict or no mesh an AttributeError."""
    d0 = jax.devices()[0]
    for devices in ([], [d0, d0], d0, "cpu"):
        with pytest.raises(ValueError, match="expected a non-empty sequence of distinct jax devices"):
            training.make_data_mesh(devices)
    mesh = training.make_data_mesh([d0])
    for batch in ([np.zeros((4, 2))], np.zeros((4, 2))):
        with pytest.raises(ValueError, match="batch: expected a dict of arrays"):
            training.put_batch(batch, mesh)
    with pytest.raises(ValueError, match="mesh=None: expected a jax.sharding.Mesh"):
        training.put_batch({"x": np.zeros((4, 2))}, None)
    with pytest.raises(ValueError, match="mesh=None: expected a jax.sharding.Mesh"):
        training.put_replicated({"w": np.zeros(2)}, None)
    for names in (("batch",), ("data", "model")):  # was JAX's "Resource axis: data ... is not found", or accepted
        other = jax.make_mesh((1,) * len(names), names, devices=[d0])
        with pytest.raises(ValueError, match=re.escape(f"mesh: a mesh of axes {names}")):
            training.put_batch({"x": np.zeros((4, 2))}, other)


def test_empty_batches_and_batches_past_the_agreed_size_are_refused():
    """Before: ``pad_batch({})`` a bare StopIteration, a batch of no examples a ZeroDivisionError
    in the evaluation statistics; the sizes are those processes agree on (tests/test_processes.py)."""
    from hocp_jax.training.loop import pad_batch

    mesh = training.make_data_mesh()
    with pytest.raises(ValueError, match="batch: expected a dict of arrays .* got an empty dict"):
        pad_batch({}, mesh)
    for put in (pad_batch, training.put_batch):
        with pytest.raises(ValueError, match=re.escape("batch: no examples (leading axes {'x': 0})")):
            put({"x": np.zeros((0, 2))}, mesh)
    padded = pad_batch({"x": np.arange(3.0), "mask": np.array([1.0, 0.5, 1.0])}, mesh, 5)
    np.testing.assert_array_equal(padded["x"], [0, 1, 2, 2, 2])
    np.testing.assert_array_equal(padded["mask"], [1, 0.5, 1, 0, 0])
    with pytest.raises(ValueError, match="batch: 6 examples on this process, more than the 5"):
        pad_batch({"x": np.zeros(6)}, mesh, 5)
    with pytest.raises(ValueError, match="batch: 4 examples on this process, expected 5"):
        training.put_batch({"x": np.zeros(4)}, mesh, size=5)


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
    for bad in (None, [1], "adam"):  # a sub-config that is not a dict (was: AttributeError)
        with pytest.raises(ValueError, match=re.escape(f"config.optimizer={bad!r}: expected a config dict")):
            config_lib.validate_config(bad, ("name",), name="config.optimizer")
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
    for bad in (30, None, (30, 10), (0, 5)):  # (was: TypeError for a non-sequence)
        with pytest.raises(ValueError, match=re.escape(f"config.optimizer.boundaries_epochs={bad!r}: expected a "
                                                       "sequence of epochs")):
            schedules.make_schedule(dict(name="sgd", learning_rate=0.1, steps_per_epoch=5, schedule="piecewise",
                                         boundaries_epochs=bad))


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
                       ("--workdir", str), ("--out", str), ("--port", int), ("--term-at", int)):
        parser.add_argument(flag, type=kind)
    parser.add_argument("--term-process", type=int, default=-1)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--profile-steps", type=int, default=0)
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


def test_l1_is_applied_once():
    """l1_prox: soft-threshold in the optimizer and no loss term; else the loss term only."""
    from hocp_jax.training import jobs

    params = {"conv": {"lambda": jnp.array([0.5, -0.002, 0.0005]), "factor_in": jnp.ones((2, 3)),
                       "factor_out": jnp.ones((2, 3)), "factor_0": jnp.ones((3, 3))}}
    opt = dict(name="sgd", learning_rate=0.1, steps_per_epoch=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    cfg = ml_collections.ConfigDict(dict(l1_prox=True))  # the stage's loss config
    tx, reg = jobs.stage_optimizer(cfg, opt, 0.01)
    assert reg is None
    updates, _ = tx.update(zeros, tx.init(params), params)
    lam = optax.apply_updates(params, updates)["conv"]["lambda"]
    np.testing.assert_allclose(lam, [0.5 - 0.001, -0.001, 0.0], atol=1e-7)  # prox(lr * gamma) only
    cfg.l1_prox = False
    tx, reg = jobs.stage_optimizer(cfg, opt, 0.01)
    np.testing.assert_allclose(reg(params), 0.01 * (0.5 + 0.002 + 0.0005), rtol=1e-6)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))  # no prox in tx
    assert jobs.stage_optimizer(cfg, opt, 0.0)[1] is None


def test_steady_state_steps_do_not_read_the_device(tmp_path, monkeypatch):
    """Between log/checkpoint steps, fit makes no device->host transfer.

    Steps 3..9 run under jax's transfer guard (what catches it on GPU/TPU; on CPU reads are
    zero-copy and pass the guard) and with jax.Array's host-read methods patched to raise
    (what catches it on CPU: item/int/float/addressable_data/device_get, e.g. reading the step).
    """
    from jax._src import array

    def forbidden(self, *args, **kwargs):
        raise AssertionError("device->host read during a steady-state step")

    patched = {name: getattr(array.ArrayImpl, name)
               for name in ("addressable_data", "item", "tolist", "__int__", "__float__", "__index__", "__bool__")}
    value = array.ArrayImpl._value
    guard = jax.transfer_guard_device_to_host("disallow")

    def start():
        guard.__enter__()
        for name in patched:
            monkeypatch.setattr(array.ArrayImpl, name, forbidden)
        monkeypatch.setattr(array.ArrayImpl, "_value", property(forbidden))

    def stop():
        guard.__exit__(None, None, None)
        for name, fn in patched.items():
            monkeypatch.setattr(array.ArrayImpl, name, fn)
        monkeypatch.setattr(array.ArrayImpl, "_value", value)

    # batch 2 is fetched for step 3, batch 9 for step 10 (the last: logged and checkpointed)
    state = run_fit(str(tmp_path), 10, checkpoint_every=100, log_every=100, on_pos={2: start, 9: stop})
    assert int(state.step) == 10
    start()  # the patch itself must catch what the old loop did per step
    try:
        with pytest.raises(AssertionError, match="steady-state"):
            training.sharding.host_value(state.step)
    finally:
        stop()


class _LiveBatches:
    """Generator-backed eval split of ``n`` batches that counts how many are alive at once."""

    def __init__(self, n, batch=16):
        self.n, self.batch, self.live, self.peak = n, batch, 0, 0

    def _gone(self):
        self.live -= 1

    def __iter__(self):
        rng = np.random.default_rng(0)
        for _ in range(self.n):
            image = rng.integers(0, 256, (self.batch, 6, 6, 3), dtype=np.uint8)
            va = rng.uniform(-1, 1, (self.batch, 2)).astype(np.float32)
            self.live += 1
            self.peak = max(self.peak, self.live)
            weakref.finalize(image, self._gone)
            yield {"image": image, "va": va}


def test_streaming_eval_is_bounded_and_exact():
    """200 batches (a split we would not hold in memory) stream through: at most a couple of
    batches are alive at once, and the metrics equal a float64 oracle on the whole split."""
    model = TinyNet()
    variables = model.init(jax.random.key(0), np.zeros((1, 6, 6, 3), np.float32), train=False)
    mesh = training.make_data_mesh()
    state = training.put_replicated(training.TrainState.create(variables, optax.identity(), jax.random.key(0)), mesh)
    split = _LiveBatches(200)
    got = objectives.finalize_stats(training.make_evaluator(model, objectives.eval_stats, objectives.merge_stats)(
        state, split))
    assert split.peak <= 3, split.peak
    apply = jax.jit(lambda x: model.apply(variables, x.astype(jnp.float32) / 255, train=False)["va"])
    true = np.concatenate([b["va"] for b in _LiveBatches(200)]).astype(np.float64)
    pred = np.concatenate([np.asarray(apply(b["image"])) for b in _LiveBatches(200)]).astype(np.float64)
    for j, t in enumerate(objectives.TARGETS):
        r = np.corrcoef(true[:, j], pred[:, j])[0, 1]
        np.testing.assert_allclose(got[f"{t}_pcc"], r, atol=1e-4)
        np.testing.assert_allclose(got[f"{t}_rmse"], np.sqrt(((true[:, j] - pred[:, j]) ** 2).mean()), rtol=1e-5)


def test_top5_accuracy_streams_and_matches_sklearn():
    """Top-5 accuracy (the Jester paper's Table 4) over masked batches equals sklearn's on the
    valid examples; with 5 classes or fewer it is not reported (always 1)."""
    rng = np.random.default_rng(3)
    logits, labels = rng.normal(size=(3, 16, 27)).astype(np.float32), rng.integers(0, 27, (3, 16))
    masks = [np.ones(16, np.float32), np.ones(16, np.float32), (np.arange(16) < 9).astype(np.float32)]
    stats = [objectives.eval_stats({"logits": jnp.asarray(lg)}, {"label": lb, "mask": m})
             for lg, lb, m in zip(logits, labels, masks)]
    got = objectives.finalize_stats(objectives.merge_stats(objectives.merge_stats(stats[0], stats[1]), stats[2]))
    valid = np.concatenate(masks) > 0
    want = skm.top_k_accuracy_score(labels.reshape(-1)[valid], logits.reshape(-1, 27)[valid], k=5, labels=range(27))
    np.testing.assert_allclose(got["class_top5_accuracy"], want, rtol=1e-6)
    assert 0 < want < 1
    few = objectives.finalize_stats(objectives.eval_stats({"logits": jnp.asarray(logits[0, :, :5])}, {"label": labels[0] % 5}))
    assert "class_top5_accuracy" not in few and "class_accuracy" in few


def test_resume_of_a_masked_stage(tmp_path):
    """optax.partition (frozen conv): 4 steps, then resumed to 8 == 8 uninterrupted steps."""
    labels = {"conv": {"kernel": "frozen", "bias": "frozen"}, "bn": {"scale": "train", "bias": "train"},
              "head": {"kernel": "train", "bias": "train"}}
    tx = lambda: optax.partition({"train": optax.adam(0.05), "frozen": optax.set_to_zero()}, labels)  # noqa: E731
    full = run_fit(str(tmp_path / "full"), 8, tx=tx())
    run_fit(str(tmp_path / "resumed"), 4, tx=tx())
    resumed = run_fit(str(tmp_path / "resumed"), 8, tx=tx())
    want, got = flat_params(full), flat_params(resumed)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    init_key = jax.random.split(jax.random.key(3))[0]  # fit's init key for seed 3
    init = TinyNet().init({"params": init_key}, make_data()["image"][:BATCH], train=False)
    assert np.asarray(init["params"]["conv"]["kernel"]).tobytes() == got["['params']['conv']['kernel']"].tobytes()


def test_damaged_latest_checkpoint_falls_back(tmp_path):
    """Truncating a file of the newest checkpoint (step 8): warning, resume from step 4,
    and the redone steps end with the params the undamaged run had."""
    want = flat_params(run_fit(str(tmp_path), 8))
    step8 = tmp_path / "checkpoints" / "8"
    files = sorted((p for p in step8.rglob("*") if p.is_file() and "state" in p.parts and p.stat().st_size > 64),
                   key=lambda p: -p.stat().st_size)
    with open(files[0], "r+b") as f:
        f.truncate(files[0].stat().st_size // 2)
    with pytest.warns(RuntimeWarning, match="cannot be restored"):
        resumed = run_fit(str(tmp_path), 8)
    for k, v in flat_params(resumed).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    assert (tmp_path / "checkpoints.damaged" / "8").is_dir()
    with checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=4) as ckpt:
        assert ckpt.all_steps() == [4, 8]  # step 8 written again
    # damaged again: moved beside the first damaged copy, which is kept (nothing is deleted)
    files = sorted((p for p in step8.rglob("*") if p.is_file() and "state" in p.parts and p.stat().st_size > 64),
                   key=lambda p: -p.stat().st_size)
    with open(files[0], "r+b") as f:
        f.truncate(files[0].stat().st_size // 2)
    with pytest.warns(RuntimeWarning, match="cannot be restored"):
        run_fit(str(tmp_path), 8)
    assert sorted(p.name for p in (tmp_path / "checkpoints.damaged").iterdir()) == ["8", "8.1"]


def test_an_unreadable_best_checkpoint_does_not_block_the_resume(tmp_path):
    data = make_data()
    cfg = dict(num_steps=4, seed=3, checkpoint_every=2, log_every=2, eval_every=2, best_metric="score",
               async_checkpointing=False)
    values = iter([0.5, 0.9, 0.7, 0.8])
    fit = lambda n: training.fit(TinyNet(), mse_loss, optax.sgd(0.1), lambda: ArrayIterator(data),  # noqa: E731
                                 cfg | {"num_steps": n}, str(tmp_path), eval_fn=lambda state: {"score": next(values)})
    fit(4)
    for extra in (tmp_path / "best").rglob("*"):
        if extra.is_file() and "extra" in extra.parts:
            extra.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="best cannot be read"):
        fit(6)  # evaluations at 6 (0.7): the best again
    with checkpoint.Checkpointer(tmp_path / "best", save_every=1, keep=1) as best:
        extra = best.restore_extra()
    assert extra.pop("config")["num_steps"] > 0 and extra == {"metric": "score", "value": 0.7, "step": 6}


def test_workdir_lock_refuses_a_second_run(tmp_path):
    lock = tmp_path / "run.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        with pytest.raises(training.WorkdirInUseError, match="in use"):
            run_fit(str(tmp_path), 2)  # fit holds the lock
    finally:
        sleeper.kill()
        sleeper.wait()
    with training.WorkdirLock(str(tmp_path)):  # its owner is dead (e.g. kill -9): taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(training.WorkdirInUseError):  # a second run in this process
            training.WorkdirLock(str(tmp_path)).__enter__()
    assert not lock.exists()  # released at the end
    lock.write_text(json.dumps({"host": "another-host", "pid": 1}))  # fresh, other host
    with pytest.raises(training.WorkdirInUseError):
        training.WorkdirLock(str(tmp_path)).__enter__()
    os.utime(lock, (0, 0))  # no heartbeat for long: a dead run
    with training.WorkdirLock(str(tmp_path)):
        pass


@pytest.mark.parametrize("kwargs, match", [
    (dict(heartbeat_s=0), "heartbeat_s=0: expected a finite real number > 0"),  # was: a busy loop
    (dict(heartbeat_s="30"), "heartbeat_s='30'"),  # was: a dead heartbeat thread, the run going on
    (dict(heartbeat_s=None), "heartbeat_s=None"),  # was: never touched, so other hosts took the live lock
    (dict(heartbeat_s=float("inf")), "heartbeat_s=inf"),
    (dict(heartbeat_s=30, stale_s=30), "stale_s=30: expected a real number > heartbeat_s=30"),
    (dict(stale_s=float("nan")), "stale_s=nan"),
])
def test_workdir_lock_refuses_bad_timings(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        training.WorkdirLock(str(tmp_path), **kwargs)


def test_workdir_lock_of_a_reused_pid_is_taken_over(tmp_path):
    # a restarted container: the dead run had this process's pid (it holds no lock here)
    lock, host = tmp_path / "run.lock", socket.gethostname()
    lock.write_text(json.dumps({"host": host, "pid": os.getpid(), "pid_started": "old-boot/1"}))
    with training.WorkdirLock(str(tmp_path)):
        assert json.loads(lock.read_text())["pid_started"] != "old-boot/1"
    # a live process whose pid the dead run had (another start time): taken over; itself: refused
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": host, "pid": sleeper.pid, "pid_started": "old-boot/1"}))
        with training.WorkdirLock(str(tmp_path)):
            pass
        started = open("/proc/sys/kernel/random/boot_id").read().strip() + "/" + \
            open(f"/proc/{sleeper.pid}/stat").read().rsplit(")", 1)[1].split()[19]
        lock.write_text(json.dumps({"host": host, "pid": sleeper.pid, "pid_started": started}))
        with pytest.raises(training.WorkdirInUseError, match="in use"):
            training.WorkdirLock(str(tmp_path)).__enter__()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_eval_every_keeps_the_best_checkpoint(tmp_path):
    data = make_data()
    values = iter([0.3, 0.9, 0.5])
    cfg = dict(num_steps=6, seed=3, checkpoint_every=6, keep_checkpoints=2, log_every=2, eval_every=2,
               best_metric="score", async_checkpointing=False)
    training.fit(TinyNet(), mse_loss, optax.sgd(0.1), lambda: ArrayIterator(data), cfg, str(tmp_path),
                 eval_fn=lambda state: {"score": next(values)})
    evals = [r for r in tlog.read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "eval"]
    assert [(r["step"], r["score"]) for r in evals] == [(2, 0.3), (4, 0.9), (6, 0.5)]
    train = [r for r in tlog.read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["steps_per_s"] > 0 and r["eta_s"] >= 0 for r in train) and train[-1]["eta_s"] == 0
    with checkpoint.Checkpointer(tmp_path / "best", save_every=1) as best:
        assert best.all_steps() == [4] and best.restore_extra()["value"] == 0.9


def test_a_nan_evaluation_is_never_the_best_checkpoint(tmp_path):
    """Before: a first evaluation of NaN was kept as the best, and no later (finite) one could beat
    it (every comparison with NaN is False), so <workdir>/best stayed a diverged state."""
    data = make_data()
    values = iter([float("nan"), 0.4, 0.2])
    cfg = dict(num_steps=6, seed=3, checkpoint_every=6, keep_checkpoints=2, log_every=2, eval_every=2,
               best_metric="rmse", async_checkpointing=False)
    training.fit(TinyNet(), mse_loss, optax.sgd(0.1), lambda: ArrayIterator(data), cfg, str(tmp_path),
                 eval_fn=lambda state: {"rmse": next(values)})
    with checkpoint.Checkpointer(tmp_path / "best", save_every=1) as best:
        assert best.all_steps() == [6] and best.restore_extra()["value"] == 0.2


def _traced_train_steps(directory) -> list[int]:
    """The traces under ``directory`` (one per fit call), each with its number of calls of the
    train step (the profiler nests a jit call's events: those inside another are not counted);
    a trace must hold no compilation (the first step of a fit call compiles: it is not traced)."""
    counts = []
    for path in sorted(glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)):
        events = [e for p in jax.profiler.ProfileData.from_file(path).planes for line in p.lines for e in line.events]
        assert not [e.name for e in events if "Compiler::" in e.name]  # XLA's, e.g. FusionCompiler::Compile
        spans = sorted((e.start_ns, e.start_ns + e.duration_ns) for e in events if e.name == "PjitFunction(train_step)")
        outer = [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]
        assert len([e for e in events if e.name == "train"]) == len(outer)  # a step mark per traced step
        counts.append(len(outer))
    return counts


def test_profile_steps_traces_that_many_steps_after_the_first(tmp_path, capsys):
    """``profile_steps=3`` of 6: steps 2..4 traced into ``<workdir>/profile``; a resume to 8 with
    another value (it may change) traces step 8 only, the one step there is after its first; a
    resume to 9 traces none (its one step compiles). (No
    checkpoint or log among the traced steps: their checks compile, and the traces are checked
    for no compilation.)"""
    def fit(steps, profile_steps):
        cfg = ml_collections.ConfigDict(dict(num_steps=steps, seed=3, checkpoint_every=100, keep_checkpoints=2,
                                             log_every=100, stage="static", profile_steps=profile_steps))
        return training.fit(TinyNet(), mse_loss, optax.sgd(0.1), lambda: ArrayIterator(make_data()), cfg,
                             str(tmp_path))

    fit(6, 3)
    assert f"profile: steps 2..4 traced to {tmp_path / 'profile'}" in capsys.readouterr().out
    assert _traced_train_steps(tmp_path / "profile") == [3]
    os.rename(tmp_path / "profile", tmp_path / "profile_1")  # (a trace's folder is named by the second it starts)
    fit(8, 5)
    assert "profile: steps 8..8 traced" in capsys.readouterr().out
    assert _traced_train_steps(tmp_path / "profile") == [1]
    os.rename(tmp_path / "profile", tmp_path / "profile_2")
    fit(9, 2)  # one step to train, which compiles: nothing traced
    assert "profile:" not in capsys.readouterr().out and not (tmp_path / "profile").exists()
    with pytest.raises(ValueError, match="profile_steps"):
        fit(8, -1)
