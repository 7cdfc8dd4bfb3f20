"""Tests of hocp_jax.optim: name-based freezing (bitwise), two-stage schedule, L1 / prox on
lambdas against numpy oracles, sparsity report against counting.cp_params."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import freeze

from hocp_jax import counting, optim, pruning, transduction, tree
from hocp_jax.layers import TRL, CPConv

B, H, W, C = 2, 5, 5, 3


class Net(nn.Module):
    """Two CPConvs (one with Psi BN) + BN + a CP TRL head: per-frame outputs on video."""

    @nn.compact
    def __call__(self, x, train=False):
        y = CPConv(4, 3, rank=5, psi="bn_relu", name="conv1")(x, train)
        y = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(y))
        y = CPConv(3, 3, rank=4, skip=True, name="conv2")(y, train)
        return TRL(2, rank=3, name="trl")(y)


@pytest.fixture(scope="module")
def setup():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (B, H, W, C))
    variables = model.init(jax.random.key(1), x)
    params = transduction.transduce(variables["params"], {"t": 3}, "ones")
    video = jax.random.normal(jax.random.key(2), (B, 4, H, W, C))
    target = jax.random.normal(jax.random.key(3), (B, 4, 2))
    return model, params, tree.to_dict(variables["batch_stats"]), video, target


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _run(model, tx, params, stats, video, target, steps=3):
    def loss(p):
        y = model.apply({"params": p, "batch_stats": stats}, video, True, mutable=["batch_stats"])[0]
        return jnp.mean((y - target) ** 2)

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def test_labels_by_name(setup):
    _, params, *_ = setup
    flat = _flat(optim.label_params(params, "temporal"))
    assert {k for k, v in flat.items() if v == "trainable"} == {"['conv1']['factor_t']", "['conv2']['factor_t']"}
    spatial = {k for k, v in _flat(optim.label_params(params, "spatial")).items() if v == "trainable"}
    assert spatial == {f"['{c}']['factor_{m}']" for c in ("conv1", "conv2") for m in "hw"}
    lam = {k for k, v in _flat(optim.label_params(freeze(params), ("lambda", "temporal"))).items() if v == "trainable"}
    assert lam == {f"['{c}']['{n}']" for c in ("conv1", "conv2") for n in ("lambda", "factor_t")}  # not the TRL's lambda
    assert set(_flat(optim.label_params(params, "all")).values()) == {"trainable"}
    custom = optim.label_params(params, lambda path: path[0] == "trl")
    assert {k for k, v in _flat(custom).items() if v == "trainable"} == {k for k in _flat(params) if k.startswith("['trl']")}
    with pytest.raises(ValueError, match="trainable="):
        optim.label_params(params, "temporall")


def test_two_stage_transduction_freezing(setup):
    model, params, stats, video, target = setup
    assert optax.set_to_zero().init(params) == optax.EmptyState()
    stages = optim.transduction_stages(optax.adamw(1e-2, weight_decay=0.5), optax.adam(1e-2), params)
    p1, state1 = _run(model, stages.stage1, params, stats, video, target)
    before, after = _flat(params), _flat(p1)
    temporal = {"['conv1']['factor_t']", "['conv2']['factor_t']"}
    for k, v in before.items():
        if k in temporal:
            assert not np.array_equal(after[k], v), k
        else:  # bitwise unchanged, weight decay included
            assert np.asarray(after[k]).tobytes() == np.asarray(v).tobytes(), k
    # optimizer state exists only for the temporal factors (Adam's mu and nu)
    state_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(state1) if np.ndim(x) > 0)
    assert state_shapes == sorted([(3, 5), (3, 5), (3, 4), (3, 4)])
    p2, _ = _run(model, stages.stage2, p1, stats, video, target)
    for k, v in _flat(p1).items():
        assert not np.array_equal(_flat(p2)[k], v), k
    with pytest.raises(ValueError, match="selects no leaf"):
        optim.masked_optimizer(optax.sgd(0.1), tree.to_dict(model.init(jax.random.key(0), video[:, 0])["params"]))


def test_l1_value_and_gradient(setup):
    _, params, *_ = setup
    params = tree.to_dict(params)
    params["conv1"]["lambda"] = jnp.array([0.5, -1.5, 2.0, -0.1, 0.3])
    params["trl"]["lambda"] = jnp.array([-3.0, 1.0, 2.0])
    gamma = 0.01
    lams = [np.asarray(params[c]["lambda"]) for c in ("conv1", "conv2")]
    np.testing.assert_allclose(optim.l1_lambda(params, gamma), gamma * sum(np.abs(l).sum() for l in lams), rtol=1e-6)
    grads = _flat(jax.grad(optim.l1_lambda)(params, gamma))
    for k, g in grads.items():
        if k in ("['conv1']['lambda']", "['conv2']['lambda']"):
            np.testing.assert_allclose(g, gamma * np.sign(np.asarray(_flat(params)[k])), rtol=1e-6)
        else:  # TRL lambda and every other leaf: not regularised
            np.testing.assert_array_equal(g, np.zeros_like(g))
    with pytest.raises(ValueError, match="no CP layer"):
        optim.l1_lambda({"trl": params["trl"]}, gamma)


def _np_soft(x, t):
    return np.where(np.abs(x) > t, x - t * np.sign(x), 0.0)


def test_soft_threshold_lambdas_and_prox_l1_lambdas_transform(setup):
    model, params, stats, video, target = setup
    params = tree.to_dict(params)
    params["conv1"]["lambda"] = jnp.array([0.5, -1.5, 0.05, -0.1, 0.3])
    out = optim.soft_threshold_lambdas(params, 0.2)
    np.testing.assert_allclose(out["conv1"]["lambda"], _np_soft(np.asarray(params["conv1"]["lambda"]), 0.2), atol=1e-7)
    for k, v in _flat(params).items():
        if not k.endswith("['lambda']") or k.startswith("['trl']"):
            np.testing.assert_array_equal(_flat(out)[k], v)
    # proximal SGD step: p <- prox(p - lr * grad), lambdas reach exact zeros
    lr, gamma = 0.1, 2.0
    grads = jax.tree.map(lambda v: jnp.full_like(v, 0.5), params)
    tx = optax.chain(optax.sgd(lr), optim.prox_l1_lambdas(lr * gamma))
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    lam = np.asarray(params["conv1"]["lambda"])
    want = _np_soft(lam - lr * 0.5, lr * gamma)
    np.testing.assert_allclose(new["conv1"]["lambda"], want, atol=1e-6)
    assert np.sum(np.asarray(new["conv1"]["lambda"]) == 0.0) == np.sum(want == 0) == 2
    np.testing.assert_allclose(new["trl"]["lambda"], np.asarray(params["trl"]["lambda"]) - lr * 0.5, atol=1e-7)
    # inside a mask: frozen lambdas are not thresholded
    masked = optim.masked_optimizer(tx, params, "temporal")
    updates, _ = masked.update(grads, masked.init(params), params)
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["conv1"]["lambda"], lam)


def test_sparsity_report_and_plot(setup, tmp_path):
    _, params, *_ = setup
    params = tree.to_dict(params)
    params["conv1"]["lambda"] = jnp.array([0.0, 1.0, 0.0, 1e-4, 2.0])
    report = optim.sparsity_report(params, tol=1e-3)
    l1, l2 = report.layers
    assert (l1.path, l1.rank, l1.zeroed, l2.zeroed) == ("conv1", 5, 3, 0)
    assert l1.fraction == pytest.approx(0.6)
    # a zeroed component frees C_in + C_out + sum K + 1 (K = 3, 3, 3 after transduction) + its bn_in scale and bias
    assert l1.params_freed == counting.cp_params(C, 4, (3, 3, 3), 5) - counting.cp_params(C, 4, (3, 3, 3), 2) + 3 * 2
    assert report.params_freed == l1.params_freed
    assert report.cp_params == counting.cp_params(C, 4, (3, 3, 3), 5) + counting.cp_params(4, 3, (3, 3, 3), 4)
    assert report.total_params == sum(np.size(v) for v in jax.tree.leaves(params))
    assert optim.sparsity_report(params).layers[0].zeroed == 2
    assert "conv1" in report.table()
    optim.plot_sparsity(report, tmp_path / "sparsity.png")
    assert (tmp_path / "sparsity.png").stat().st_size > 0
    with pytest.raises(ValueError, match="tol"):
        optim.sparsity_report(params, tol=-1.0)


def _n(tree_):
    return sum(np.size(v) for v in jax.tree.leaves(tree_))


@pytest.mark.parametrize("lam, tol, zeroed, freed", [
    ([0.0, 0.0, 0.0, 1.0, -2.0, 0.5], 0.0, 3, 3 * 28),
    ([0.05, -0.08, 0.3, 1.0, -2.0, 0.0], 0.1, 3, 3 * 28),
    ([0.0] * 6, 0.0, 6, 5 * 28),  # fully zeroed: prune_rank keeps one component
])
def test_sparsity_report_frees_what_prune_rank_removes(lam, tol, zeroed, freed):
    # C_in 4 -> C_out 8, 3x3, rank 6, Psi BN + PReLU at the 3 stages: one component holds
    # 4 + 8 + 3 + 3 + 1 factor/lambda entries + 3 * (2 + 1) Psi entries = 28
    v = CPConv(8, 3, rank=6, psi="bn_prelu", psi_stages="all").init(jax.random.key(0), jnp.ones((1, 6, 6, 4)))
    params = dict(tree.to_dict(v["params"]), **{"lambda": jnp.array(lam)})
    report = optim.sparsity_report(params, tol=tol)
    pruned, _, _ = pruning.prune_rank(params, tol, v["batch_stats"])
    assert report.layers[0].zeroed == zeroed
    assert report.params_freed == _n(params) - _n(pruned) == freed


def test_sparsity_report_counts_non_finite_lambdas_apart():
    """A NaN lambda counted as zeroed and its component as freed, while prune_rank refuses the layer."""
    v = CPConv(8, 3, rank=4).init(jax.random.key(0), jnp.ones((1, 6, 6, 4)))
    params = dict(tree.to_dict(v["params"]), **{"lambda": jnp.array([0.0, np.nan, np.inf, 1.0])})
    report = optim.sparsity_report(params)
    layer = report.layers[0]
    assert (layer.zeroed, layer.nonfinite, report.nonfinite, report.params_freed) == (1, 2, 2, layer.params_per_component)
    assert "2 non-finite lambdas" in report.table()
    with pytest.raises(ValueError, match=r"non-finite entries \[1, 2\]"):
        pruning.prune_rank(params, 0.0)


def test_thresholds_gamma_tol_and_temporal_modes_are_validated(setup):
    _, params, *_ = setup
    params = tree.to_dict(params)
    params["conv1"]["lambda"] = jnp.array([0.5, -1.5, 0.05, -0.1, 0.3])
    lam = np.asarray(params["conv1"]["lambda"])
    for bad in (-1.0, float("nan"), "0.1", None, True):
        with pytest.raises(ValueError, match="threshold="):
            optim.soft_threshold_lambdas(params, bad)
        with pytest.raises(ValueError, match="threshold="):
            optim.prox_l1_lambdas(bad)
        with pytest.raises(ValueError, match="gamma="):
            optim.l1_lambda(params, bad)
        with pytest.raises(ValueError, match="tol="):
            optim.sparsity_report(params, tol=bad)
    # traced values are not checked (jit-friendly) and give the numpy values
    np.testing.assert_allclose(jax.jit(optim.soft_threshold_lambdas)(params, 0.2)["conv1"]["lambda"],
                               _np_soft(lam, 0.2), atol=1e-7)
    conv_lams = np.concatenate([lam, np.asarray(params["conv2"]["lambda"])])
    np.testing.assert_allclose(jax.jit(optim.l1_lambda)(params, 0.5), 0.5 * np.abs(conv_lams).sum(), rtol=1e-6)
    # a schedule going negative is clamped at 0: the lambdas do not grow
    tx = optax.chain(optax.sgd(0.1), optim.prox_l1_lambdas(lambda count: -1.0))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["conv1"]["lambda"], lam)
    for bad in ("t", ("in",), ("t", "skip"), (3,)):
        with pytest.raises(ValueError, match="temporal_modes="):
            optim.label_params(params, "temporal", temporal_modes=bad)
        with pytest.raises(ValueError, match="temporal_modes="):
            optim.masked_optimizer(optax.sgd(0.1), params, "spatial", temporal_modes=bad)
        with pytest.raises(ValueError, match="temporal_modes="):
            optim.leaf_category(("conv1", "factor_in"), {("conv1",)}, bad)
    # the optimizer factory instead of an optimizer (was: AttributeError at init)
    with pytest.raises(ValueError, match=r"tx=.*expected an optax.GradientTransformation \(an optimizer factory"):
        optim.masked_optimizer(optax.adam, params, "spatial")
    with pytest.raises(ValueError, match=r"tx_stage2=.*expected an optax.GradientTransformation \(an optimizer factory"):
        optim.transduction_stages(optax.adam(1e-3), optax.adam, params)
    for bad in (None, {}, []):  # not a parameter tree (was: "selects no leaf")
        with pytest.raises(ValueError, match=re.escape(f"params={bad!r}: expected a parameter tree")):
            optim.masked_optimizer(optax.sgd(0.1), bad, "all")
    # an audit (stop 79): the array named as an array (was: a tracer), batch_stats of another type (was: a TypeError)
    with pytest.raises(ValueError, match="^params: expected a .* got ArrayImpl"):
        optim.l1_lambda(jnp.ones(3), 1e-3)
    with pytest.raises(ValueError, match="^batch_stats=3.0: expected None or the"):
        pruning.prune_rank(params, 0.0, batch_stats=3.0)
    low = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)  # (was: promoted to float32 by the threshold's type)
    assert optim.soft_threshold_lambdas(low, jnp.float32(0.1))["conv1"]["lambda"].dtype == jnp.bfloat16
