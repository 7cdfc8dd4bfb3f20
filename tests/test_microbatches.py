"""``microbatches``: the train step running the model on k micro-batches of its batch. Checked
against the whole-batch step (a model without batch norm: the same update, with a loss of batch
statistics, CCC/PCC, and the lasso), against a direct ``jax.grad`` of the micro-batched
objective (batch norm per micro-batch, dropout), and on 8 simulated devices."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from hocp_jax import optim
from hocp_jax.layers import CPConv
from hocp_jax.training import TrainState, make_train_step, objectives

from test_training import TinyNet, mse_loss

AFFECT = functools.partial(objectives.loss_fn, cfg=ConfigDict(dict(
    va_weight=1.0, shake_shake=True, ce_weight=0.5, weights=(1.0, 1.0, 1.0), class_weights=())))


class CPNet(nn.Module):
    """A CP conv, no batch norm nor dropout: its outputs do not depend on the batch's other examples."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(CPConv(8, (3, 3), rank=6, name="conv")(x)).mean(axis=(1, 2))
        return {"va": jnp.tanh(nn.Dense(2, name="head")(x)), "logits": nn.Dense(3, name="cls")(x)}


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
            "va": rng.uniform(-1, 1, (n, 2)).astype(np.float32), "label": rng.integers(0, 3, n).astype(np.int32)}


def _state(model, batch, tx):
    variables = model.init(jax.random.key(0), batch["image"], train=False)
    return TrainState.create(variables, tx, jax.random.key(1))


def _close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("k", [2, 4])
def test_without_batch_norm_the_update_is_the_whole_batchs(k):
    """The affect loss has CCC and PCC terms, statistics of the whole batch: a step that summed
    each micro-batch's loss gradient would differ; this one gives the whole batch's update."""
    batch, tx, model = _batch(), optax.sgd(0.1, momentum=0.9), CPNet()
    state = _state(model, batch, tx)
    reg = functools.partial(optim.l1_lambda, gamma=0.01)
    whole, m1 = jax.jit(make_train_step(model, AFFECT, tx, reg))(state, batch)
    micro, mk = jax.jit(make_train_step(model, AFFECT, tx, reg, microbatches=k))(state, batch)
    _close(micro.params, whole.params, atol=1e-7)
    _close(micro.opt_state, whole.opt_state, atol=1e-7)
    assert m1.keys() == mk.keys() and {"l_ccc", "l_pcc", "ce", "reg"} <= set(mk)
    _close(mk, m1, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(whole.params)[0], jax.tree.leaves(state.params)[0])  # it moved


def test_batch_norm_and_dropout_per_micro_batch_match_a_direct_gradient():
    """TinyNet (batch norm, dropout): the step equals ``jax.grad`` of the objective written out,
    each micro-batch ``x[j::2]`` through the model in turn with dropout key ``fold_in(key, j)``,
    the running averages chained, the loss of all outputs in batch order."""
    batch, tx, model, k = _batch(), optax.sgd(0.1), TinyNet(), 2
    batch["image"] = batch["image"][:, :6, :6]
    state = _state(model, batch, tx)
    got, metrics = jax.jit(make_train_step(model, mse_loss, tx, microbatches=k))(state, batch)

    model_key, loss_key = jax.random.split(state.step_key())

    def objective(params):
        stats, outputs = state.batch_stats, [None] * k
        for j in range(k):
            outputs[j], updated = model.apply({"params": params, "batch_stats": stats}, batch["image"][j::k],
                                              train=True, mutable=["batch_stats"],
                                              rngs={"dropout": jax.random.fold_in(model_key, j)})
            stats = updated["batch_stats"]
        va = jnp.stack([o["va"] for o in outputs], axis=1).reshape(-1, 2)  # back in batch order
        return mse_loss({"va": va}, batch, loss_key)[0], stats

    grads, stats = jax.grad(objective, has_aux=True)(state.params)
    _close(got.params, jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads), atol=1e-6)
    _close(got.batch_stats, stats, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], objective(state.params)[0], rtol=1e-6)
    whole = jax.jit(make_train_step(model, mse_loss, tx))(state, batch)[0]  # batch norm over 16: another update
    assert not np.allclose(whole.params["head"]["kernel"], got.params["head"]["kernel"], atol=1e-6)


def test_bad_microbatches_are_value_errors():
    batch, tx, model = _batch(12), optax.sgd(0.1), CPNet()
    with pytest.raises(ValueError, match=r"microbatches=0: expected an int > 0"):
        make_train_step(model, AFFECT, tx, microbatches=0)
    with pytest.raises(ValueError, match=r"microbatches=5: the batch of 12 examples is not a multiple of it"):
        jax.jit(make_train_step(model, AFFECT, tx, microbatches=5))(_state(model, batch, tx), batch)


DEVICES_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np, optax, ml_collections
from hocp_jax import training
from test_training import ArrayIterator, make_data, mse_loss
from test_microbatches import CPNet
cfg = ml_collections.ConfigDict(dict(num_steps=3, seed=3, checkpoint_every=3, keep_checkpoints=2, log_every=3,
                                     stage="static", microbatches=2))
state = training.fit(CPNet(), mse_loss, optax.sgd(0.1), lambda: ArrayIterator(make_data(), batch_size=16), cfg,
                     sys.argv[1])
print(json.dumps([np.asarray(p).ravel().tolist() for p in jax.tree.leaves(jax.device_get(state.params))]))
"""


def test_eight_devices_give_the_one_device_result(run_on_devices, tmp_path):
    """``fit`` with ``microbatches=2`` (batch 16: 8 examples per micro-batch, one per device) on 8
    simulated CPU devices, where the CP conv runs each device's share in a program of its own."""
    one = run_on_devices(DEVICES_SCRIPT, 1, str(tmp_path / "one"))
    eight = run_on_devices(DEVICES_SCRIPT, 8, str(tmp_path / "eight"))
    for a, b in zip(one, eight, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 3


class ExtraOutputs(nn.Module):
    """Batch norm, plus an integer output (a prediction) and one without a batch axis."""

    scalar: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x.mean(axis=(1, 2)))
        va = nn.Dense(2, name="head")(x)
        return {"va": va, "pred": jnp.argmax(va, -1)} | ({"aux": jnp.mean(va)} if self.scalar else {})


def test_integer_outputs_are_constants_and_frozen_variables_work():
    """An integer output is no obstacle (the whole-batch step passes it through too), nor are
    variables in a ``FrozenDict``; an output without a batch axis is a ValueError naming it."""
    from flax.core import freeze

    batch, tx = _batch(), optax.sgd(0.1)
    model = ExtraOutputs()
    state = TrainState.create(freeze(model.init(jax.random.key(0), batch["image"], train=False)), tx, jax.random.key(1))
    micro, _ = jax.jit(make_train_step(model, mse_loss, tx, microbatches=2))(state, batch)
    whole, _ = jax.jit(make_train_step(model, mse_loss, tx))(state, batch)
    assert not np.allclose(micro.params["head"]["kernel"], state.params["head"]["kernel"])
    assert micro.params["head"]["kernel"].shape == whole.params["head"]["kernel"].shape
    with pytest.raises(ValueError, match=r"microbatches=2: output \['aux'\] has shape \(\); every output must have"):
        jax.jit(make_train_step(ExtraOutputs(scalar=True), mse_loss, tx, microbatches=2))(state, batch)


class ReconNet(nn.Module):
    """One CP conv on its reconstructed path (a dense conv of the computed kernel), no batch norm."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = CPConv(8, (3, 3), rank=6, implementation="reconstructed", name="conv")(x)
        return {"va": jnp.tanh(nn.Dense(2, name="head")(nn.relu(x).mean(axis=(1, 2))))}


def _convs(step, state, batch) -> int:
    """The convolutions of ``step``'s lowered program (StableHLO, loop bodies included)."""
    return jax.jit(step).lower(state, batch).as_text().count("stablehlo.convolution")


def test_in_the_loop_the_kernel_gradient_is_matrix_products_on_cpu(monkeypatch):
    """XLA's CPU backend runs a convolution's kernel gradient far slower in a loop body, so the
    micro-batches' library convs take theirs as matrix products (``conv_plans.loop_mode``),
    whatever the host's rule outside loops says: the scan bodies of this one layer (the first:
    no input gradient) hold its forward convs only, and the update is still the whole batch's.
    The measured policy keys its picks made in the loop apart."""
    from hocp_jax import autotune, conv_plans

    monkeypatch.setattr(conv_plans, "matmul_kernel_grad", lambda *a, **k: False)  # the rule outside loops: XLA's
    batch, tx, model = _batch(), optax.sgd(0.1), ReconNet()
    state = _state(model, batch, tx)
    whole = make_train_step(model, mse_loss, tx)
    micro = make_train_step(model, mse_loss, tx, microbatches=2)
    assert _convs(whole, state, batch) == 2  # forward and XLA's kernel gradient
    assert _convs(micro, state, batch) == 2  # a forward conv in each scan
    _close(jax.jit(micro)(state, batch)[0].params, jax.jit(whole)(state, batch)[0].params, atol=1e-6)
    args = ((8, 8, 8, 3), "float32", {"lambda": (6,)}, ("h", "w"), (1, 1), ((1, 1), (1, 1)), (1, 1), True)
    with conv_plans.loop_mode():
        inside = autotune.cache_key(*args)
    assert inside != autotune.cache_key(*args) and autotune.cache_key(*args) == autotune.cache_key(*args)


class DenseNet(nn.Module):
    """Dense convs as the models build them (``hocp_jax.conv_ops.conv_general_dilated``): unstrided,
    strided and dilated, each but the first with an input gradient; no batch norm."""

    @nn.compact
    def __call__(self, x, train: bool):
        from hocp_jax import conv_ops

        for i, (stride, dilation) in enumerate(((1, 1), (2, 1), (1, (2, 1)))):
            x = nn.relu(nn.Conv(6, (3, 3), stride, padding=((1, 2), (1, 1)), kernel_dilation=dilation, use_bias=False,
                                conv_general_dilated=conv_ops.conv_general_dilated, name=f"conv{i}")(x))
        return {"va": jnp.tanh(nn.Dense(2, name="head")(x.mean(axis=(1, 2))))}


def _conv_lines(step, state, batch) -> list[str]:
    return [line for line in jax.jit(step).lower(state, batch).as_text().splitlines() if "stablehlo.convolution" in line]


def test_in_the_loop_dense_convs_take_no_gradient_convolution_on_cpu():
    """In the micro-batches' loop on CPU the models' dense convs keep XLA's forward convolution
    only: the kernel gradient is one matrix product per tap, the input gradient a forward conv of
    the flipped kernel (unstrided) or per-tap products (strided); no transposed (``o, i``) kernel
    layout, no dilated input. The whole-batch step keeps XLA's gradients; both give one update."""
    if jax.default_backend() != "cpu":
        pytest.skip("the loop mode acts on the CPU backend only")
    batch, tx, model = _batch(), optax.sgd(0.1), DenseNet()
    state = _state(model, batch, tx)
    whole = make_train_step(model, mse_loss, tx)
    micro = make_train_step(model, mse_loss, tx, microbatches=2)
    forward = "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"
    outside = _conv_lines(whole, state, batch)
    assert len(outside) == 3 + 3 + 2 and sum(forward in line for line in outside) == 3
    inside = _conv_lines(micro, state, batch)
    assert inside and all(forward in line and "lhs_dilate = [1, 1]" in line for line in inside)
    assert len(inside) == 3 + 3 + 1  # passes 1 and 2, the dilated layer's input gradient (the strided one's: per tap)
    _close(jax.jit(micro)(state, batch)[0].params, jax.jit(whole)(state, batch)[0].params, atol=1e-6)


@pytest.mark.parametrize("x_shape, k_shape, strides, pads, dilations", [
    ((2, 7, 6, 3), (3, 3, 3, 4), (1, 1), ((1, 2), (0, 0)), (1, 1)),
    ((2, 7, 6, 3), (3, 2, 3, 4), (2, 3), ((1, 1), (2, 0)), (1, 2)),
    ((2, 9, 3), (4, 3, 5), (2,), ((7, 3),), (2,)),  # pads wider than the kernel reaches (6)
    ((2, 5, 3), (3, 3, 2), (1,), ((3, 4),), (1,)),  # the same, unstrided: the flipped conv crops
    ((1, 3, 6, 5, 2), (3, 3, 3, 2, 3), (1, 2, 1), ((1, 1), (1, 1), (0, 2)), (1, 1, 1)),
])
def test_in_the_loop_conv_gradients_are_laxs(x_shape, k_shape, strides, pads, dilations):
    """The loop mode's conv (``conv_matmul_kernel_grad`` with its in-loop input gradient): value,
    input and kernel gradients equal ``lax``'s in float64."""
    from jax import lax

    from hocp_jax import conv_ops, conv_plans

    if jax.default_backend() != "cpu":
        pytest.skip("the loop mode acts on the CPU backend only")
    n, rng = len(strides), np.random.default_rng(len(x_shape))
    with jax.enable_x64(True):
        x, k = rng.standard_normal(x_shape), rng.standard_normal(k_shape)
        ref = lambda x, k: lax.conv_general_dilated(x, k, strides, pads, rhs_dilation=dilations,  # noqa: E731
                                                    dimension_numbers=conv_ops.channels_last_dims(n))
        y, vjp = jax.vjp(ref, x, k)
        g = rng.standard_normal(y.shape)
        with conv_plans.loop_mode():
            y2, vjp2 = jax.vjp(lambda x, k: conv_ops.conv_matmul_kernel_grad(x, k, strides=strides, pads=pads,
                                                                         dilations=dilations), x, k)
            got = (y2, *vjp2(g))
        for a, b in zip(got, (y, *vjp(g))):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
