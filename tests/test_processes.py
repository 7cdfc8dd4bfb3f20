"""Work process 0 does for all (or each process for itself), in a real 2-process ``jax.distributed`` run (CPU, gloo,
coordinator on 127.0.0.1): building a missing dataset, taking the workdir lock, timing the convs.
A failure on process 0 must raise on both processes (before, the other process went on and
waited in the next collective until killed), and a dataset must be built once (before, every
process built it into the shared data_dir at once, and all but one crashed).

The processes run this file as a script (``python tests/test_processes.py ...``).
"""

import json
import os
import socket
import subprocess
import sys

if __name__ == "__main__":  # subprocess mode
    os.environ["JAX_PLATFORMS"] = "cpu"

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _outcome(fn) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 -- the test compares the classes and messages
        return f"{type(err).__name__}: {err}"
    return "ok"


def script(tmp: str, port: int, process_id: int, live_pid: int) -> None:
    from hocp_jax import autotune, processes
    from hocp_jax.data import pipeline
    from hocp_jax.training import data as training_data
    from hocp_jax.training.distributed import WorkdirLock, maybe_initialize_distributed

    maybe_initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    builds, build = [], pipeline.build

    def counting_build(*args, **kwargs):
        builds.append(args[0])
        return build(*args, **kwargs)

    pipeline.build = counting_build
    cfg = ml_collections.ConfigDict(dict(static="digits_affect", data_dir=os.path.join(tmp, "data"), batch_size=8,
                                         eval_batch_size=8, eval_split="test"))
    out = {"data": _outcome(lambda: training_data.Data(cfg, "digits_affect")), "builds": builds}
    out["examples"] = len(training_data.Data(cfg, "digits_affect").source("train"))

    def fail():
        raise ValueError("bad value")

    out["value_error"] = _outcome(lambda: processes.on_process_zero(fail, "test"))
    out["other_error"] = _outcome(lambda: processes.on_process_zero(lambda: {}["key"], "test"))

    def fail_on_one():  # e.g. a host-local data_dir without the files
        if process_id == 1:
            raise FileNotFoundError("no files here")

    out["every"] = _outcome(lambda: processes.on_every_process(fail_on_one, "test"))
    out["every_ok"] = _outcome(lambda: processes.on_every_process(lambda: None, "test"))
    lock_dir = os.path.join(tmp, "locked")
    if process_id == 0:  # a lock held by a live process of this host: the workdir is in use
        os.makedirs(lock_dir)
        with open(os.path.join(lock_dir, "run.lock"), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": live_pid}, f)
    with WorkdirLock(os.path.join(tmp, "free")):
        out["free_lock"] = os.path.exists(os.path.join(tmp, "free", "run.lock"))
    out["lock"] = _outcome(lambda: WorkdirLock(lock_dir).__enter__())
    autotune.configure("measure", cache_path=os.path.join(tmp, "autotune.json"))
    out["trace"] = _outcome(lambda: autotune.agree_across_processes(fail))
    out["resumed_at"] = _resume_with_a_read_failing_on_one_process(tmp, process_id)
    out.update(_uneven_batches(tmp, process_id))
    with open(os.path.join(tmp, f"process{process_id}.json"), "w") as f:
        json.dump(out, f)


def _resume_with_a_read_failing_on_one_process(tmp: str, process_id: int) -> int:
    """8 steps (checkpoints 4, 8), then a resume to 12 in which process 1 fails to read step 8
    inside orbax's restore (a damaged file it alone sees): both must resume from step 4 (before, process 0 trained on from 8
    while process 1 waited for it, forever). Returns the final step."""
    import jax
    import optax
    from test_training import ArrayIterator, TinyNet, make_data, mse_loss

    from hocp_jax import training

    def fit(num_steps):
        return training.fit(TinyNet(), mse_loss, optax.sgd(0.1), lambda: ArrayIterator(make_data()),
                            _fit_config(num_steps), os.path.join(tmp, "run"))

    from orbax.checkpoint._src.checkpointers import checkpointer as orbax_checkpointer

    fit(8)
    read = orbax_checkpointer.Checkpointer._restore  # inside orbax's restore, before its barriers
    if process_id == 1:
        def flaky(self, directory, *args, **kwargs):
            if os.path.basename(os.fspath(directory).rstrip("/")) == "8":
                raise OSError("simulated read error")
            return read(self, directory, *args, **kwargs)
        orbax_checkpointer.Checkpointer._restore = flaky
    try:
        return int(jax.device_get(fit(12).step))
    finally:
        orbax_checkpointer.Checkpointer._restore = read


def test_process_zero_builds_locks_and_times_for_all_and_its_failures_raise_everywhere(tmp_path, run_processes):
    import optax
    from test_training import ArrayIterator, TinyNet, make_data, mse_loss

    from hocp_jax import training

    # checkpoints of a one-process run, which the two processes must refuse to resume
    training.fit(TinyNet(), mse_loss, optax.sgd(0.1), lambda: ArrayIterator(make_data()), _fit_config(4),
                 str(tmp_path / "one"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        procs = run_processes(lambda port, i: [__file__, str(tmp_path), str(port), str(i), str(sleeper.pid)])
    finally:
        sleeper.kill()
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    zero, one = (json.loads((tmp_path / f"process{i}.json").read_text()) for i in range(2))
    # the dataset was built once, by process 0, and both processes read it
    assert zero["data"] == one["data"] == "ok"
    assert zero["builds"] == ["digits_affect"] and one["builds"] == []
    assert zero["examples"] == one["examples"] > 0
    # process 0's failures raise on both, as the same class for user errors
    assert zero["value_error"] == "ValueError: bad value"
    assert one["value_error"] == "ValueError: on process 0 (test): bad value"
    assert zero["other_error"] == "KeyError: 'key'"
    assert one["other_error"] == "RuntimeError: on process 0 (test): 'key' [KeyError]"
    # a failure on any process raises on every one (process 1's own, and naming it on process 0)
    assert one["every"] == "FileNotFoundError: no files here"
    assert zero["every"] == "FileNotFoundError: on process 1 (test): no files here"
    assert zero["every_ok"] == one["every_ok"] == "ok"
    assert zero["free_lock"] is True  # process 0 took the free lock for the run
    for out in (zero, one):
        assert out["lock"].startswith("WorkdirInUseError: ") and "in use by another run" in out["lock"]
        assert out["trace"].startswith("ValueError: ") and "bad value" in out["trace"]
        assert out["resumed_at"] == 12
    assert (tmp_path / "run" / "checkpoints.damaged" / "8").is_dir()  # moved aside, not lost
    for out in (zero, one):
        assert out["uneven_fit"] == ("ValueError: the training batches: the processes hold {0: 8, 1: 4} examples "
                                     "(process: local batch size); expected the same number on every process, the "
                                     "global batch divided by the process count")
        assert out["other_count"].startswith("ValueError: ") and "a run of 1 process(es), and this one has 2" in out["other_count"]
        assert out["uneven_eval"] == pytest.approx(out["uneven_eval_oracle"], rel=1e-5)
    assert one["fit_first_read"] == one["fit_step_read"] == one["eval_read"] == "OSError: simulated read error"
    assert zero["fit_first_read"] == "RuntimeError: on process 1 (the training iterator): simulated read error [OSError]"
    assert zero["fit_step_read"] == "RuntimeError: on process 1 (the training batches): simulated read error [OSError]"
    assert zero["eval_read"] == "RuntimeError: on process 1 (the evaluation batches): simulated read error [OSError]"
    for out in (zero, one):
        assert out["eval_count"] == ("ValueError: the evaluation batches: process(es) [1] passed 2 batches, the others "
                                     "more; every process must pass the same number (pad the last ones, their examples "
                                     "masked out, as hocp_jax.data.pipeline.eval_batches does)")
        assert out["eval_larger"].startswith("ValueError: the evaluation batches: batch 2 holds {0: 4, 1: 8} examples")
    assert not (tmp_path / "uneven" / "checkpoints").exists() or not os.listdir(tmp_path / "uneven" / "checkpoints")


def test_launcher_variables_that_are_not_integers_are_named(monkeypatch):
    """Before: a bare ``int()`` ValueError ("invalid literal ... 'abc'") that named no variable."""
    from hocp_jax.training import distributed

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    for var in distributed.CLUSTER_SIZE_VARS:
        with monkeypatch.context() as env:
            env.setenv(var, "2.0")
            with pytest.raises(ValueError, match=rf"\${var}='2.0': expected an integer"):
                distributed.maybe_initialize_distributed()
    monkeypatch.setenv("SLURM_NTASKS", "")  # empty: unset, one task
    assert distributed.detected_cluster() is None
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")  # never reached: the variables are read first
    for var in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        with monkeypatch.context() as env:
            env.setenv(var, "two")
            with pytest.raises(ValueError, match=rf"\${var}='two': expected an integer"):
                distributed.maybe_initialize_distributed()


def test_an_empty_coordinator_address_is_refused(monkeypatch):
    """Before: ``JAX_COORDINATOR_ADDRESS=`` counted as set and reached ``jax.distributed`` (an
    IndexError inside it); the argument is checked alike."""
    from hocp_jax.training import distributed

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "")
    with pytest.raises(ValueError, match=r"\$JAX_COORDINATOR_ADDRESS='': expected 'host:port'"):
        distributed.maybe_initialize_distributed()
    with pytest.raises(ValueError, match=r"coordinator_address='host0': expected 'host:port'"):
        distributed.maybe_initialize_distributed("host0", 2, 0)


def _fit_config(num_steps: int) -> dict:
    return dict(num_steps=num_steps, seed=3, checkpoint_every=4, keep_checkpoints=2, log_every=4, stage="static",
                async_checkpointing=False)


def _uneven_batches(tmp: str, process_id: int) -> dict:
    """Processes whose batches differ in size (before, each built a global batch of another shape
    and the step trained on a wrong mean, silently), and a resume on another process count."""
    import jax
    import jax.numpy as jnp
    import optax
    from test_training import ArrayIterator, TinyNet, make_data, mse_loss

    from hocp_jax import training
    from hocp_jax.training.state import TrainState

    data, model = make_data(), TinyNet()
    out = {"uneven_fit": _outcome(lambda: training.fit(  # 8 examples a step on process 0, 4 on process 1
        model, mse_loss, optax.sgd(0.1), lambda: ArrayIterator(data, batch_size=16 if process_id == 0 else 8),
        _fit_config(2), os.path.join(tmp, "uneven")))}
    out["other_count"] = _outcome(lambda: training.fit(  # the test wrote its checkpoints with one process
        model, mse_loss, optax.sgd(0.1), lambda: ArrayIterator(data), _fit_config(8), os.path.join(tmp, "one")))
    # evaluation batches of 5 and 3 examples on process 0, 2 and 4 on process 1: padded to one size
    rows = {0: [np.arange(0, 5), np.arange(5, 8)], 1: [np.arange(8, 10), np.arange(10, 14)]}[process_id]
    variables = jax.jit(lambda k, x: model.init({"params": k}, x, train=False))(jax.random.key(0), data["image"][:2])
    mesh = training.make_data_mesh()
    state = training.put_replicated(TrainState.create(jax.tree.map(np.asarray, variables), optax.sgd(0.1),
                                                      jax.random.key(1)), mesh)

    def stats(outputs, batch):
        m = batch["mask"]
        return {"n": m.sum(), "va": (m * batch["va"][:, 0]).sum(), "pred": (m * outputs["va"][:, 0]).sum()}

    evaluate = training.make_evaluator(model, stats, lambda a, b: jax.tree.map(jnp.add, a, b), mesh)
    got = evaluate(state, [{"image": data["image"][r], "va": data["va"][r]} for r in rows])
    pred = model.apply(variables, data["image"][:14], train=False)["va"][:, 0]  # one process, plain apply
    out["uneven_eval"] = {k: float(v) for k, v in got.items()}
    out["uneven_eval_oracle"] = {"n": 14.0, "va": float(data["va"][:14, 0].sum()), "pred": float(pred.sum())}
    return out | _data_failing_on_one_process(tmp, process_id, state, evaluate)


def _data_failing_on_one_process(tmp: str, process_id: int, state, evaluate) -> dict:
    """Process 1's data fails or runs out where process 0's does not: both must raise (before, process 1 raised and
    process 0 waited in the next collective, forever)."""
    import jax
    import optax
    from test_training import ArrayIterator, TinyNet, make_data, mse_loss

    from hocp_jax import training

    data, variables = make_data(), jax.device_get({"params": state.params, "batch_stats": state.batch_stats})

    def unreadable():
        if process_id == 1:
            raise OSError("simulated read error")

    def fit(workdir, **kwargs):
        return _outcome(lambda: training.fit(TinyNet(), mse_loss, optax.sgd(0.1),
                                             lambda: ArrayIterator(data, on_pos={0: unreadable}), _fit_config(2),
                                             os.path.join(tmp, workdir), **kwargs))

    out = {"fit_first_read": fit("read"),  # the batch that gives the model's input shapes
           "fit_step_read": fit("step_read", init_variables=variables)}  # the first step's batch

    def batches(n, fail_at=None, last_size=4):
        for i in range(n):
            if i == fail_at:
                raise OSError("simulated read error")
            rows = np.arange(4 if i < n - 1 else last_size)
            yield {"image": data["image"][rows], "va": data["va"][rows]}

    out["eval_count"] = _outcome(lambda: evaluate(state, batches(3 if process_id == 0 else 2)))
    out["eval_read"] = _outcome(lambda: evaluate(state, batches(3, fail_at=1 if process_id == 1 else None)))
    out["eval_larger"] = _outcome(lambda: evaluate(state, batches(2, last_size=8 if process_id == 1 else 4)))
    return out


@pytest.mark.parametrize("env,words", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"},
     "Number of processes must be defined. ($JAX_COORDINATOR_ADDRESS='127.0.0.1:1' is set: where no launcher says how "
     "many processes run and which one this is, set $JAX_NUM_PROCESSES and $JAX_PROCESS_ID too"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2"}, "set $JAX_NUM_PROCESSES and $JAX_PROCESS_ID too"),
    ({"SLURM_NTASKS": "2"}, "(the environment says a SLURM job of several processes runs (SLURM_NTASKS=2), whose other "
     "variables JAX reads: start the processes with the launcher, or set $JAX_COORDINATOR_ADDRESS"),
])
def test_train_py_names_the_variables_jax_distributed_lacks(tmp_path, env, words):
    """Before: a traceback ending in JAX's own words, which name no variable (e.g. "coordinator_address
    should be defined." for a lone SLURM_NTASKS), from outside train.py's error handling."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "PMI_", "TPU_"))}
    out = subprocess.run([sys.executable, os.path.join(root, "train.py"), "--workdir", str(tmp_path)],
                         env=clean | env | {"JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: jax.distributed could not start: ")
    assert words in out.stderr
    assert not os.listdir(tmp_path)  # nothing written


def interleaved_script(out: str, port: int, process_id: int) -> None:
    """Two devices a process, in a mesh that alternates the processes' devices (as a TPU pod's may):
    the first evaluation batch's outputs, per process, in process order."""
    import types

    import jax
    from test_training import TinyNet, make_data

    from hocp_jax.training import jobs
    from hocp_jax.training.distributed import maybe_initialize_distributed
    from hocp_jax.training.sharding import make_data_mesh

    maybe_initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    mine = {p: [d for d in jax.devices() if d.process_index == p] for p in (0, 1)}
    mesh = make_data_mesh([mine[0][0], mine[1][0], mine[0][1], mine[1][1]])
    data, model = make_data(), TinyNet()
    rows = np.arange(3) + 3 * process_id  # 3 examples a process, padded to 4 (two devices each)
    batches = [{"image": data["image"][rows], "va": data["va"][rows]}]
    variables = jax.jit(lambda k, x: model.init({"params": k}, x, train=False))(jax.random.key(0), data["image"][:2])
    _, first = jobs.evaluate_variables(model, jax.device_get(variables), types.SimpleNamespace(eval_batches=lambda _: batches),
                                       "x", mesh=mesh)
    want = model.apply(variables, data["image"][:6], train=False)["va"]  # one process, plain apply
    with open(out, "w") as f:
        json.dump({"got": np.asarray(first["va"]).tolist(), "want": np.asarray(want).tolist()}, f)


def test_first_batch_outputs_follow_the_processes_on_a_mesh_that_interleaves_them(tmp_path, run_processes):
    """Before: the outputs were cut as if each process's rows were one block of the global batch,
    which holds only where its devices are neighbours in the mesh (rows 0, 1, 3, 2, 2, 5 came back)."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2"
    try:
        procs = run_processes(lambda port, i: [__file__, "interleaved", str(tmp_path / f"p{i}.json"), str(port), str(i)])
    finally:
        os.environ["XLA_FLAGS"] = flags
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    for i in range(2):
        out = json.loads((tmp_path / f"p{i}.json").read_text())
        np.testing.assert_allclose(out["got"], out["want"], rtol=1e-5, atol=1e-6)


if __name__ == "__main__" and sys.argv[1] == "interleaved":
    interleaved_script(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
elif __name__ == "__main__":
    script(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
