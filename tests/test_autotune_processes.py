"""The measured autotune in a real 2-process ``jax.distributed`` run (CPU, gloo, coordinator on
127.0.0.1, two simulated devices per process): process 0 times the train step's conv on the
batch one device gets, and both processes train with its pick.

The processes run this file as a script (``python tests/test_autotune_processes.py ...``). The
timer runs, but its result is replaced by one that rates the path the analytic model would pick
as the slower one, so a process that fell back to the analytic pick instead of reading process
0's would show.
"""

import json
import os
import sys

if __name__ == "__main__":  # subprocess mode: device count must be set before jax starts
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from hocp_jax import autotune  # noqa: E402
from hocp_jax.layers import CPConv  # noqa: E402
from test_training import N_EXAMPLES, ArrayIterator  # noqa: E402  (this process's rows of each global batch)

GLOBAL_BATCH, IMAGE = 8, (6, 6, 3)


class Net(nn.Module):
    """One CP conv (``implementation="auto"``) -> mean -> Dense(1)."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = CPConv(4, 3, rank=5, padding=1, implementation="auto", name="conv")(x)
        return {"y": nn.Dense(1, name="head")(x.mean(axis=(1, 2)))}


def make_data() -> dict[str, np.ndarray]:
    """Fixed random examples for :class:`test_training.ArrayIterator` (its ``N_EXAMPLES`` rows)."""
    image = np.random.default_rng(0).normal(size=(N_EXAMPLES, *IMAGE)).astype(np.float32)
    return {"image": image, "y": image[:, 0, 0, :1]}


def script(workdir: str, port: int, process_id: int) -> None:
    from hocp_jax import training

    training.maybe_initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    autotune.configure("measure", cache_path=os.path.join(workdir, "autotune.json"), batch_shards=jax.device_count())
    measured, picks = [], []
    timer = autotune.measure

    def fake_measure(x_shape, dtype, params, modes, strides, pads, dilations, input_grad, rounds=5, per_sample=None):
        measured.append(list(x_shape))
        # the real timing runs too (on process 0's first device, inside the trace), its result unused
        timer(x_shape, dtype, params, modes, strides, pads, dilations, input_grad, rounds=1, per_sample=per_sample)
        analytic = autotune.analytic_pick(x_shape, params, modes, strides, pads, dilations, input_grad, dtype, per_sample)
        return {analytic: 2.0, ({"factorized", "reconstructed"} - {analytic}).pop(): 1.0}

    choose = autotune.choose_cp

    def recording_choose(x_shape, *args, **kwargs):
        pick = choose(x_shape, *args, **kwargs)
        picks.append([list(x_shape), pick])
        return pick

    autotune.measure, autotune.choose_cp = fake_measure, recording_choose

    def loss_fn(outputs, batch, key):
        del key
        loss = jnp.mean((outputs["y"] - batch["y"]) ** 2)
        return loss, {"mse": loss}

    config = dict(num_steps=2, seed=0, checkpoint_every=2, log_every=1, async_checkpointing=False)
    data = make_data()
    training.fit(Net(), loss_fn, optax.sgd(0.1), lambda: ArrayIterator(data, batch_size=GLOBAL_BATCH), config,
                 os.path.join(workdir, "fit"))
    with open(os.path.join(workdir, f"process{process_id}.json"), "w") as f:
        json.dump({"measured": measured, "picks": picks, "devices": jax.device_count()}, f)


def test_process_zero_times_the_per_device_batch_and_both_processes_use_its_pick(tmp_path, run_processes):
    for proc in run_processes(lambda port, i: [__file__, str(tmp_path), str(port), str(i)]):
        assert proc.returncode == 0, proc.stderr[-3000:]
    zero, one = (json.loads((tmp_path / f"process{i}.json").read_text()) for i in range(2))
    assert zero["devices"] == one["devices"] == 4
    per_device = [GLOBAL_BATCH // 4, *IMAGE]
    # process 0 timed the train step's conv once, on the 2 examples one device gets; process 1 never timed
    assert zero["measured"] == [per_device] and one["measured"] == []
    stored = json.loads((tmp_path / "autotune.json").read_text())
    kernel_grad = {k: v for k, v in stored.items() if json.loads(k)[2] == "kernel_grad"}
    cp = {k: v for k, v in stored.items() if k not in kernel_grad}
    assert len(cp) == 1 and json.loads(next(iter(cp)))[3] == per_device
    # timing the reconstructed path picked its conv's kernel gradient on the same per-device batch
    assert [json.loads(k)[4] for k in kernel_grad] == [per_device]
    measured_pick = next(iter(cp.values()))
    # the train step's conv, traced on each device's share (on CPU it runs inside shard_map:
    # conv_plans.batch_split), runs the measured pick in both processes (the fake timer rated the
    # analytic pick slower, so this is not the analytic fallback)
    for out in (zero, one):
        step_picks = {pick for shape, pick in out["picks"] if shape == per_device}
        assert step_picks == {measured_pick}, out["picks"]


if __name__ == "__main__":
    script(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
