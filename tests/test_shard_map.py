"""The library's convs and HO-CP models inside ``jax.shard_map`` (2 simulated CPU devices, the
batch split over them, the parameters replicated, ``check_vma`` on): the gradient w.r.t. the
parameters equals the sum of the per-shard gradients computed without ``shard_map``, and each
input gradient its shard's. Every custom VJP of the library (shift kernel, per-sample and tile
loops, per-tap kernel gradient, max-pool) is on one of these paths; before they cast their inputs
alike, their backward passes returned a varying cotangent for a replicated weight and JAX
rejected the program."""

CONVS = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from hocp_jax import autotune, conv, init, layer_specs, pooling

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
    "depthwise": (lambda x, k: conv.depthwise_conv(x, k), x2, normal(3, 3, 4)),
    "dense 1x1": (lambda x, k: conv.dense_conv(x, k, stride=2), x2, normal(1, 1, 4, 6)),
    "dense 3-D of 3 channels (patches)": (lambda x, k: conv.dense_conv(x, k), xrgb, normal(3, 3, 3, 3, 6)),
    "per-tap kernel gradient": (lambda x, k: conv.conv_matmul_kernel_grad(x, k, strides=(2, 2), pads=((1, 1), (1, 1)), dilations=(1, 1)), x2, normal(3, 3, 4, 6)),
    "max-pool": (lambda x, s: pooling.max_pool(x * s, (3, 3), (2, 2), ((1, 1), (1, 1))), x2, jnp.float32(1.5)),
}
errors = {}
for name, (fn, x, w) in cases.items():
    tiles = 2 if "3-D" in name else None  # the 3-D per-sample convs in tiles of 2 output rows
    with autotune.tile_rows_mode(tiles):
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
for name, shape in shapes.items():
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


def test_hocp_models_under_shard_map_match_per_shard_gradients(run_on_devices):
    errors = run_on_devices(MODELS, 2)
    assert set(errors) == {"resnet18_hocp", "jester_hocp", "mobilenet_v2_hocp"}
    assert all(e < 1e-4 for e in errors.values()), errors


PLANS = r"""
import json
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from hocp_jax import autotune

seen = {}
shape = (2, 8, 32, 32, 8)  # a shard's (1, 8, 32, 32, 64) intermediate: 2 MiB, per sample on one device

def probe(label):
    def f(x):
        seen[label] = [autotune.program_per_device(), autotune.per_sample_default(x.shape, 64, jnp.float32)]
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
    an axis left to the compiler) a loop over the batch would serialise the devices, so it is off."""
    seen = run_on_devices(PLANS, 2)
    assert seen == {"jit, batch split": [False, False], "shard_map": [True, True],
                    "shard_map, one axis of two": [False, False]}
