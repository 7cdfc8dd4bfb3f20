"""Mixed precision: every layer and model takes ``dtype`` (compute) and ``param_dtype`` (storage).

bfloat16 outputs are compared with the float32 outputs of the SAME parameters (an independent
float32 computation, not the bf16 code path) within a bf16 tolerance; float32 parameters must
stay float32 after init and after an optimiser update.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hocp_jax import layers
from hocp_jax.models import get_model

BF16_RTOL = 0.05  # relative L2 error of a bf16 forward pass (8-bit mantissa, a few layers deep)

LAYERS = [
    (lambda **d: layers.CPConv(6, 3, rank=5, **d), (2, 8, 8, 4)),
    (lambda **d: layers.CPConv(6, 3, rank=5, psi="bn_prelu", psi_stages="all", **d), (2, 4, 8, 8, 4)),
    (lambda **d: layers.CPConv(6, 3, rank=5, implementation="reconstructed", skip=True, use_bias=True, **d), (2, 8, 8, 4)),
    (lambda **d: layers.TuckerConv(6, (3, 3), ranks=(3, 4), **d), (2, 8, 8, 4)),
    (lambda **d: layers.SeparableConv(6, (3, 3), rank=8, **d), (2, 8, 8, 4)),
    (lambda **d: layers.TRL(3, rank=4, **d), (2, 5, 5, 4)),
    (lambda **d: layers.PReLU(**d), (2, 5, 4)),
]


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("i", range(len(LAYERS)))
def test_layer_bf16_close_to_float32_and_params_stay_float32(i):
    make, shape = LAYERS[i]
    x = jax.random.normal(jax.random.key(1), shape)
    f32, bf16 = make(), make(dtype=jnp.bfloat16)
    variables = jax.jit(bf16.init)(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables["params"]))
    kw = {"mutable": ["batch_stats"]} if "batch_stats" in variables else {}
    y16, y32 = (jax.jit(lambda v, x, m=m: m.apply(v, x, **kw))(variables, x) for m in (bf16, f32))
    if kw:
        y16, y32 = y16[0], y32[0]
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
    assert _rel(y16, y32) < BF16_RTOL
    p16 = jax.eval_shape(bf16.clone(param_dtype=jnp.bfloat16).init, jax.random.key(0), x)["params"]
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(p16))


@pytest.mark.parametrize("name,shape,out", [("resnet18_hocp", (2, 32, 32, 3), "va"),
                                            ("mobilenet_v2", (2, 32, 32, 3), "logits"),  # routed 1x1 + depthwise
                                            pytest.param("jester_hocp", (2, 16, 16, 16, 3), "logits",
                                                         marks=pytest.mark.slow),
                                            pytest.param("mobilenet_v2_hocp", (2, 32, 32, 3), "logits",
                                                         marks=pytest.mark.slow),
                                            pytest.param("bregnet39_hocp", (2, 32, 32, 3), "logits",
                                                         marks=pytest.mark.slow)])
def test_model_bf16_train_update_keeps_float32_params(name, shape, out):
    kwargs = {"head": {"n_outputs": 0, "n_classes": 5}} if out == "logits" else {}
    f32 = get_model(name, tiny=True, **kwargs)
    bf16 = get_model(name, tiny=True, dtype=jnp.bfloat16, **kwargs)
    x = jax.random.normal(jax.random.key(1), shape)
    variables = jax.jit(lambda k, x: bf16.init(k, x, train=False))(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    y16, y32 = (jax.jit(lambda v, x, m=m: m.apply(v, x)[out])(variables, x) for m in (bf16, f32))
    assert y16.dtype == jnp.bfloat16 and _rel(y16, y32) < BF16_RTOL

    tx = optax.sgd(0.1, momentum=0.9)
    params, opt = variables["params"], tx.init(variables["params"])

    def loss(p):
        y, _ = bf16.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.square(y[out].astype(jnp.float32)))

    grads = jax.jit(jax.grad(loss))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    updates, opt = tx.update(grads, opt, params)
    new = optax.apply_updates(params, updates)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new))
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)))


@pytest.mark.parametrize("name", ["avce_alexnet", "avce_resnet18_hocp"])
def test_avce_bf16_outputs_and_float32_params(name):
    """The AVCE networks take ``dtype``/``param_dtype`` like the others (encoder, compressor and
    heads): bfloat16 outputs within the bf16 tolerance of float32 with the same parameters,
    float32 parameters and gradients, and ``param_dtype=bfloat16`` stores every leaf so."""
    f32, bf16 = get_model(name, tiny=True), get_model(name, tiny=True, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = jax.jit(lambda k, x: bf16.init(k, x, train=False))(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    y16, y32 = (jax.jit(lambda v, x, m=m: m.apply(v, x))(variables, x) for m in (bf16, f32))
    for key in ("va", "latent"):
        assert y16[key].dtype == jnp.bfloat16 and _rel(y16[key], y32[key]) < BF16_RTOL, key

    def loss(p):
        y, _ = bf16.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"],
                          rngs={"dropout": jax.random.key(2)})
        return jnp.mean(jnp.square(y["va"].astype(jnp.float32)))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    p16 = jax.eval_shape(get_model(name, tiny=True, param_dtype=jnp.bfloat16).init, jax.random.key(0), x)["params"]
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(p16))


def test_training_program_dtype_computes_in_bfloat16_and_keeps_float32_state(load_config):
    """``config.dtype="bfloat16"`` (train.py): the job's models compute in bfloat16, while the
    loss, the metrics, the updated parameters and batch statistics stay float32; the step's loss
    is within a bf16 tolerance of the float32 program's with the same parameters and batch (and
    not equal to it: the bfloat16 arithmetic did run)."""
    from hocp_jax.training import jobs, objectives
    from hocp_jax.training.state import TrainState
    from hocp_jax.training.step import make_eval_step, make_train_step

    config = load_config("affectnet", "smoke")
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8),
             "va": rng.uniform(-1, 1, (4, 2)).astype(np.float32), "label": rng.integers(0, 8, 4).astype(np.int32)}
    steps = {}
    for dtype in ("float32", "bfloat16"):
        config.dtype = dtype
        model = jobs._model(config, config.model.name, config.model.kwargs)
        variables = model.init(jax.random.key(0), batch["image"].astype(np.float32) / 255, train=False)
        state = TrainState.create(variables, optax.sgd(0.1), jax.random.key(1))
        step = make_train_step(model, objectives.make_loss(config.loss, lambda: [1] * 8), optax.sgd(0.1))
        steps[dtype] = jax.jit(step)(state, batch), jax.jit(make_eval_step(model))(state, batch)
    (s16, m16), out16 = steps["bfloat16"]
    (s32, m32), _ = steps["float32"]
    for tree in (s16.params, s16.batch_stats, m16, out16):
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(tree))
    assert m16["loss"] != m32["loss"] and abs(m16["loss"] - m32["loss"]) < BF16_RTOL * abs(m32["loss"])
    with pytest.raises(ValueError, match=r"config.dtype='float16'.*one of \('float32', 'bfloat16'\)"):
        config.dtype = "float16"
        jobs.check_config(config)
