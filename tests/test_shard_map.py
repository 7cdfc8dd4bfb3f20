"""The library's convs and HO-CP models inside ``jax.shard_map`` (2 simulated CPU devices, the
batch split over them, the parameters replicated, ``check_vma`` on): the gradient w.r.t. the
parameters equals the sum of the per-shard gradients computed without ``shard_map``, and each
input gradient its shard's. Every custom VJP of the library (shift kernel, per-sample and tile
loops, per-tap kernel gradient, max-pool) is on one of these paths; before they cast their inputs
alike, their backward passes returned a varying cotangent for a replicated weight and JAX
rejected the program. Under ``jit`` with the batch split, ``cp_conv`` moves each device's share
into a ``shard_map`` of its own (``conv_plans.batch_split``): tested against ``lax``'s conv and one
device's train step."""

import pytest

CONVS = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from hocp_jax import autotune, conv, conv_ops, conv_plans, init, layer_specs, pooling

mesh = jax.make_mesh((2,), ("b",))
rng = np.random.default_rng(0)
normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
x2, x3, xrgb = normal(4, 10, 10, 4), normal(4, 5, 8, 8, 4), normal(4, 5, 8, 8, 3)
cp2, cp3 = init.init_cp_params(jax.random.key(0), 4, 6, (3, 3), 10), init.init_cp_params(jax.random.key(1), 4, 6, (3, 3, 3), 10)
specs = lambda s: {k: normal(*shape) * 0.3 for k, (shape, _) in s.items()}
tucker, tt = specs(layer_specs.tucker_specs(4, 6, (3, 3), (3, 2))), specs(layer_specs.tt_conv_specs(4, 6, (3, 3), (2, 3, 2)))
relu = lambda h, stage: jax.nn.relu(h)
cases = {
    "cp 2-D factorized": (lambda x, p: conv.cp_conv(x, p, implementation="factorized", per_sample=False), x2, cp2),
    "cp 2-D factorized per sample": (lambda x, p: conv.cp_conv(x, p, implementation="factorized", per_sample=True), x2, cp2),
    "cp 3-D factorized per sample, stride 2": (lambda x, p: conv.cp_conv(x, p, implementation="factorized", per_sample=True, stride=2), x3, cp3),
    "cp 3-D factorized, psi": (lambda x, p: conv.cp_conv(x, p, implementation="factorized", psi=relu), x3, cp3),
    "cp 3-D factorized per sample, pointwise psi": (lambda x, p: conv.cp_conv(x, p, implementation="factorized", psi=relu, per_sample=True, psi_pointwise=True), x3, cp3),
    "cp 2-D reconstructed": (lambda x, p: conv.cp_conv(x, p, implementation="reconstructed"), x2, cp2),
    "tucker factorized": (lambda x, p: conv.tucker_conv(x, p, stride=2), x2, tucker),
    "tucker reconstructed": (lambda x, p: conv.tucker_conv(x, p, implementation="reconstructed"), x2, tucker),
    "tt factorized": (lambda x, p: conv.tt_conv(x, p, padding=1), x2, tt),
    "separable": (lambda x, p: conv.separable_conv(x, p, stride=2, padding=1), x2, conv.cp_to_separable(cp2, ("h", "w"))),
    "depthwise": (lambda x, k: conv_ops.depthwise_conv(x, k), x2, normal(3, 3, 4)),
    "dense 1x1": (lambda x, k: conv_ops.dense_conv(x, k, stride=2), x2, normal(1, 1, 4, 6)),
    "dense 3-D of 3 channels (patches)": (lambda x, k: conv_ops.dense_conv(x, k), xrgb, normal(3, 3, 3, 3, 6)),
    "per-tap kernel gradient": (lambda x, k: conv_ops.conv_matmul_kernel_grad(x, k, strides=(2, 2), pads=((1, 1), (1, 1)), dilations=(1, 1)), x2, normal(3, 3, 4, 6)),
    "max-pool": (lambda x, s: pooling.max_pool(x * s, (3, 3), (2, 2), ((1, 1), (1, 1))), x2, jnp.float32(1.5)),
}
errors = {}
for name, (fn, x, w) in cases.items():
    tiles = 2 if "3-D" in name else None  # the 3-D per-sample convs in tiles of 2 output rows
    with conv_plans.tile_rows_mode(tiles):
        r = normal(*jax.eval_shape(fn, x, w).shape)
        grad = jax.grad(lambda x, w, r: jnp.sum(fn(x, w) * r), argnums=(0, 1))
        sm = jax.jit(jax.shard_map(grad, mesh=mesh, in_specs=(P("b"), P(), P("b")), out_specs=(P("b"), P())))
        split = lambda a: jax.device_put(a, NamedSharding(mesh, P("b")))
        got = sm(split(x), w, split(r))
        halves = [jax.jit(grad)(x[i:i + 2], w, r[i:i + 2]) for i in (0, 2)]
    want = (jnp.concatenate([halves[0][0], halves[1][0]]), jax.tree.map(jnp.add, halves[0][1], halves[1][1]))
    errors[name] = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
                       for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
print(json.dumps(errors))
"""

MODELS = r"""
import json, sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from hocp_jax.models import get_model

mesh = jax.make_mesh((2,), ("b",))
shapes = {"resnet18_hocp": (4, 32, 32, 3), "jester_hocp": (4, 16, 16, 16, 3), "mobilenet_v2_hocp": (4, 16, 16, 3)}
errors = {}
for name in sys.argv[1:]:
    shape = shapes[name]
    model = get_model(name, tiny=True)
    x = jax.random.normal(jax.random.key(1), shape)
    v = model.init(jax.random.key(0), x[:2])
    stats = {"batch_stats": v["batch_stats"]}

    def loss(p, x):  # batch norm with each shard's own statistics, as without an axis name
        y, _ = model.apply({"params": p} | stats, x, train=True, mutable=["batch_stats"])
        return sum(jnp.sum(jnp.tanh(leaf)) for leaf in jax.tree.leaves(y))

    grad = jax.grad(loss)
    got = jax.jit(jax.shard_map(grad, mesh=mesh, in_specs=(P(), P("b")), out_specs=P()))(
        v["params"], jax.device_put(x, NamedSharding(mesh, P("b"))))
    want = jax.tree.map(jnp.add, jax.jit(grad)(v["params"], x[:2]), jax.jit(grad)(v["params"], x[2:]))
    errors[name] = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
                       for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
print(json.dumps(errors))
"""


def test_convs_under_shard_map_match_per_shard_gradients(run_on_devices):
    errors = run_on_devices(CONVS, 2)
    assert len(errors) == 15
    assert all(e < 1e-5 for e in errors.values()), errors


@pytest.mark.parametrize("models", [("resnet18_hocp",), pytest.param(("jester_hocp", "mobilenet_v2_hocp"), marks=pytest.mark.slow)],
                         ids=["resnet18_hocp", "the others"])
def test_hocp_models_under_shard_map_match_per_shard_gradients(run_on_devices, models):
    errors = run_on_devices(MODELS, 2, *models)
    assert set(errors) == set(models)
    assert all(e < 1e-4 for e in errors.values()), errors


PLANS = r"""
import json
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from hocp_jax import autotune, conv_plans

seen = {}
shape = (2, 8, 32, 32, 8)  # a shard's (1, 8, 32, 32, 64) intermediate: 2 MiB, per sample on one device

def probe(label):
    def f(x):
        seen[label] = [conv_plans.program_per_device(), conv_plans.per_sample_default(x.shape, 64, jnp.float32)]
        autotune.configure(batch_shards=2)  # as train.py: the per-device batch the autotune considers
        seen[label].append(conv_plans.device_shape(x.shape)[0])
        autotune.configure()
        return x
    return f

x = jnp.zeros((4,) + shape[1:])
mesh = jax.make_mesh((2,), ("b",))
jax.jit(probe("jit, batch split"))(jax.device_put(x, NamedSharding(mesh, P("b"))))
jax.shard_map(probe("shard_map"), mesh=mesh, in_specs=P("b"), out_specs=P("b"))(jax.device_put(x, NamedSharding(mesh, P("b"))))
mesh2 = jax.make_mesh((2, 1), ("b", "m"))
jax.jit(jax.shard_map(probe("shard_map, one axis of two"), mesh=mesh2, in_specs=P("b"), out_specs=P("b"), axis_names={"b"}))(
    jax.device_put(x, NamedSharding(mesh2, P("b"))))
print(json.dumps(seen))
"""


def test_per_sample_loops_run_inside_shard_map_only_over_every_mesh_axis(run_on_devices):
    """Each device runs its own program inside ``shard_map`` over all of its mesh's axes, so the
    automatic per-sample loop applies to the shard there; under ``jit`` with the batch split (or
    an axis left to the compiler) a loop over the batch would serialise the devices, so it is off.
    The autotune's per-device batch is the traced one inside ``shard_map``, the traced one over
    ``batch_shards`` under ``jit``."""
    seen = run_on_devices(PLANS, 2)
    assert seen["jit, batch split"] == [False, False, 2] and seen["shard_map"] == [True, True, 2]
    assert seen["shard_map, one axis of two"][:2] == [False, False]


JIT_SPLIT = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from hocp_jax import autotune, conv, conv_ops, conv_plans, init

rng = np.random.default_rng(0)
normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
x3, x2 = normal(4, 8, 32, 32, 8), normal(4, 16, 16, 8)  # a sample's 3-D intermediate: 2 MiB, per sample
cp3, cp2 = init.init_cp_params(jax.random.key(0), 8, 6, (3, 3, 3), 64), init.init_cp_params(jax.random.key(1), 8, 6, (3, 3), 64)
slope = normal(64) * 0.1
prelu = lambda h, stage: jnp.where(h > 0, h, h * slope)
batch_mean = lambda h, stage: h - jnp.mean(h, axis=0)  # couples the samples: must see the whole batch

def dense(x, p):  # the oracle: lax's conv of the rebuilt kernel
    n = x.ndim - 2
    return lax.conv_general_dilated(x, conv.cp_to_kernel(p, conv.default_modes(n)), (1,) * n, "SAME",
                                    dimension_numbers=conv_ops.channels_last_dims(n), precision="highest")

cases = {
    "3-D": (lambda x, p: conv.cp_conv(x, p, implementation="factorized"), dense, x3, cp3),
    "3-D in tiles": (lambda x, p: conv.cp_conv(x, p, implementation="factorized"), dense, x3, cp3),
    "2-D per sample": (lambda x, p: conv.cp_conv(x, p, implementation="factorized", per_sample=True), dense, x2, cp2),
    "3-D auto": (lambda x, p: conv.cp_conv(x, p, implementation="auto"), dense, x3, cp3),
    "3-D, PReLU psi": (lambda x, p: conv.cp_conv(x, p, implementation="factorized", psi=prelu, psi_pointwise=True),
                       None, x3, cp3),
    "3-D, psi over the batch": (lambda x, p: conv.cp_conv(x, p, implementation="factorized", psi=batch_mean), None, x3, cp3),
}
out = {}
for axis_type in ("auto", "explicit"):
    mesh = jax.make_mesh((2,), ("data",), (AxisType.Auto if axis_type == "auto" else AxisType.Explicit,))
    for name, (fn, oracle, x, p) in cases.items():
        r = normal(*jax.eval_shape(fn, x, p).shape)
        grad = jax.value_and_grad(lambda x, p, r: jnp.sum(fn(x, p) * r), argnums=(0, 1))
        with conv_plans.tile_rows_mode(4 if "tiles" in name else 0):
            want = jax.jit(grad)(x, p, r) if oracle is None else jax.value_and_grad(
                lambda x, p, r: jnp.sum(oracle(x, p) * r), argnums=(0, 1))(x, p, r)
            autotune.configure(batch_shards=2 if axis_type == "auto" else None)
            with jax.set_mesh(mesh):
                args = (jax.device_put(x, NamedSharding(mesh, P("data"))), jax.device_put(p, NamedSharding(mesh, P())),
                        jax.device_put(r, NamedSharding(mesh, P("data"))))
                text = str(jax.make_jaxpr(grad)(*args))
                got = jax.jit(grad)(*args)
            autotune.configure()
        err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
                  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        out[f"{axis_type}: {name}"] = [err, "shard_map" in text, bool(re.search(r"\bscan\[", text))]
mesh = jax.make_mesh((2,), ("data",), (AxisType.Auto,))
with jax.set_mesh(mesh):
    out["auto mesh, batch_shards unset"] = conv_plans.batch_split(x3, cp3) is not None
    autotune.configure(batch_shards=2)
    out["auto mesh, odd batch"] = conv_plans.batch_split(x3[:3], cp3) is not None
    autotune.configure()
print(json.dumps(out))
"""


def test_cp_conv_under_jit_with_a_split_batch_runs_each_share_with_its_loops(run_on_devices):
    """Under ``jit`` with the batch split over two CPU devices (``jax.set_mesh``; auto axes with
    ``configure(batch_shards=2)``, as ``train.py`` runs, or explicit axes), ``cp_conv`` runs each
    device's share inside ``shard_map`` with its per-sample and tile loops: values and both
    gradients equal lax's dense conv of the rebuilt kernel (with a PReLU ``psi``, the program on
    one device without a mesh). A ``psi`` over the batch keeps the whole-batch program (its
    statistics stay global), and nothing is wrapped when the split is unknown."""
    out = run_on_devices(JIT_SPLIT, 2)
    for axis_type in ("auto", "explicit"):
        for name in ("3-D", "3-D in tiles", "2-D per sample", "3-D auto", "3-D, PReLU psi"):
            err, wrapped, loops = out[f"{axis_type}: {name}"]
            assert err < 1e-4 and wrapped and (loops or name == "3-D auto"), (axis_type, name, out)
        err, wrapped, loops = out[f"{axis_type}: 3-D, psi over the batch"]
        assert err < 1e-5 and not wrapped and not loops, (axis_type, out)
    assert out["auto mesh, batch_shards unset"] is False and out["auto mesh, odd batch"] is False


TRAIN_STEP = r"""
import json
import jax, jax.numpy as jnp, optax
from hocp_jax import autotune, conv_plans, training
from hocp_jax.models import get_model
from hocp_jax.training.state import TrainState
from hocp_jax.training.step import make_train_step

model = get_model("jester_hocp", tiny=True)
batch = {"video": jax.random.uniform(jax.random.key(1), (4, 16, 16, 16, 3)),
         "label": jnp.array([0, 1, 2, 3])}
tx = optax.sgd(0.1, momentum=0.9)
state = TrainState.create(model.init(jax.random.key(0), batch["video"][:1]), tx, jax.random.key(2))
def loss_fn(out, batch, key):
    loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], batch["label"]).mean()
    return loss, {}
step = make_train_step(model, loss_fn, tx)
with conv_plans.per_sample_mode(True):
    want_state, want = jax.jit(step)(state, batch)
    mesh = training.make_data_mesh()  # no configure(batch_shards=2): on_mesh says it
    sharded = training.sharding.on_mesh(jax.jit(step, in_shardings=(training.sharding.replicated(mesh),
                                                                    training.sharding.batch_sharding(mesh))), mesh)
    text = str(training.sharding.on_mesh(jax.make_jaxpr(step), mesh)(state, batch))
    got_state, got = sharded(training.put_replicated(state, mesh), training.put_batch(batch, mesh))
leaves = lambda s: jax.tree.leaves((s.params, s.batch_stats))
print(json.dumps({"shard_maps": text.count("shard_map["), "loss": [float(got["loss"]), float(want["loss"])],
                  "err": max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
                             for a, b in zip(leaves(got_state), leaves(want_state)))}))
"""


def test_train_step_on_two_devices_runs_the_cp_convs_per_device_with_one_device_numbers(run_on_devices):
    """``fit``'s step on a two-device mesh (``on_mesh``, nothing configured): the tiny
    Jester HO-CP net's CP convs run per device (``shard_map`` in its program), and the step's
    loss and new parameters and batch statistics (global batch norm) are one device's."""
    out = run_on_devices(TRAIN_STEP, 2)
    assert out["shard_maps"] >= 4, out
    assert abs(out["loss"][0] - out["loss"][1]) < 1e-5 * abs(out["loss"][1]), out
    assert out["err"] < 1e-4, out


MEASURED = r"""
import json, warnings
import jax, jax.numpy as jnp
from jax.sharding import AxisType
from hocp_jax import autotune, conv, conv_ops, conv_plans, init

warnings.simplefilter("error")  # a timing that fails warns: make it fail the script
seen = []
timer = autotune.measure

def recording(x_shape, *args, **kwargs):
    seen.append([list(x_shape), conv_plans.program_per_device(), jax.sharding.get_abstract_mesh().empty])
    return timer(x_shape, *args, **kwargs)

autotune.measure = recording
autotune.configure("measure", batch_shards=2)
mesh = jax.make_mesh((2,), ("data",), (AxisType.Auto,))
p = init.init_cp_params(jax.random.key(0), 3, 4, (3, 3), 5)
step = lambda p, x: jnp.sum(conv.cp_conv(x, p, implementation="auto") ** 2)
with jax.set_mesh(mesh):
    jax.jit(jax.grad(step))(p, jnp.ones((8, 6, 6, 3)))
jax.jit(jax.grad(step))(p, jnp.ones((8, 6, 6, 3)))  # no mesh in context: one program for both devices, no loops
print(json.dumps(seen))
"""


def test_measured_autotune_times_a_device_share_under_jit_with_a_split_batch(run_on_devices):
    """The measured policy times a conv that ``cp_conv`` traces inside its ``shard_map`` (a split
    batch under ``jit``) on one device's share, outside the mesh (inside it, compiling the timed
    programs failed), as a program of its own like the one being traced, without a warning; the
    same per-device shape traced in one program for both devices (no loops) is timed again, not
    given the pick timed with the loops (the cache key's ``"no loops"``)."""
    assert run_on_devices(MEASURED, 2) == [[[4, 6, 6, 3], True, True], [[4, 6, 6, 3], False, True]]
