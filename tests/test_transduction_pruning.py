"""Tests of hocp_jax.transduction and hocp_jax.pruning against independent oracles (per-frame static convs, numpy
neighbour sums, counting formulas)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import freeze

from hocp_jax import counting, pruning, transduction, tree
from hocp_jax.layers import CPConv

B, H, W, C = 2, 6, 6, 3


class Stack(nn.Module):
    """CPConv(psi) + BN + ReLU, CPConv(skip, bias) + BN, plus a dense 1x1 projection added on."""

    psi: str | None = "bn_prelu"

    @nn.compact
    def __call__(self, x, train=False):
        y = CPConv(4, 3, rank=5, psi=self.psi, psi_stages="all", name="conv1")(x, train)
        y = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(y))
        y = CPConv(3, 3, rank=4, skip=True, use_bias=True, name="conv2")(y, train)
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn2")(y)
        return y + nn.Conv(3, (1, 1), use_bias=False, name="proj")(x)


def _image(seed=0, shape=(B, H, W, C)):
    return jax.random.normal(jax.random.key(seed), shape)


def _init(model, x):
    variables = model.init(jax.random.key(1), x)
    # non-trivial BN statistics and lambdas, so the tests see them
    stats = jax.tree.map(lambda v: v + 0.1 * jnp.arange(v.size, dtype=v.dtype).reshape(v.shape), variables["batch_stats"])
    return tree.to_dict(variables["params"]), tree.to_dict(stats)


# ----------------------------------------------------------------------------- transduce


@pytest.mark.parametrize("train", [False, True])
def test_delta_transduced_stack_on_constant_video_equals_static_per_frame(train):
    model = Stack()
    x = _image()
    params, stats = _init(model, x)
    video = jnp.broadcast_to(x[:, None], (B, 5, H, W, C))
    tparams = transduction.transduce(params, {"t": 3}, "delta", dense="keep")
    static, s_upd = model.apply({"params": params, "batch_stats": stats}, x, train, mutable=["batch_stats"])
    moving, v_upd = model.apply({"params": tparams, "batch_stats": stats}, video, train, mutable=["batch_stats"])
    assert moving.shape == (B, 5, H, W, 3)
    for t in range(5):
        np.testing.assert_allclose(moving[:, t], static, rtol=1e-5, atol=1e-5)
    # identical frames => identical batch statistics (train=True updates them identically)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s_upd, v_upd)


def test_ones_init_single_cp_conv_sums_neighbouring_frames():
    layer = CPConv(4, 3, rank=6, psi="bn_relu")  # psi acts before the temporal conv: still linear in time
    T_ = 5
    video = _image(2, (B, T_, H, W, C))
    variables = layer.init(jax.random.key(3), video[:, 0])
    params, stats = tree.to_dict(variables["params"]), tree.to_dict(variables["batch_stats"])
    stats = jax.tree.map(lambda v: v + 0.3, stats)
    # oracle: static conv of every frame, then a numpy sum over frames t-1, t, t+1 (zero padding)
    frames = layer.apply({"params": params, "batch_stats": stats}, video.reshape(B * T_, H, W, C))
    frames = np.asarray(frames).reshape(B, T_, H, W, 4)
    padded = np.pad(frames, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    expected = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    for init, scale in (("ones", 1.0), ("mean", 1.0 / 3.0)):
        tparams = transduction.transduce(params, {"t": 3}, init)
        got = layer.apply({"params": tparams, "batch_stats": stats}, video)
        np.testing.assert_allclose(got, scale * expected, rtol=1e-5, atol=1e-5)


def test_transduce_adds_factors_and_carries_everything_else():
    params, _ = _init(Stack(), _image())
    frozen = freeze(params)
    out = transduction.transduce(frozen, {"t": 5}, "ones", dense="keep")
    assert type(out) is dict and type(out["conv1"]) is dict
    for name, rank in (("conv1", 5), ("conv2", 4)):
        np.testing.assert_array_equal(out[name]["factor_t"], np.ones((5, rank)))
    flat_in = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    flat_out = dict(jax.tree_util.tree_flatten_with_path(out)[0])
    added = {k for k in flat_out if k not in flat_in}
    assert {jax.tree_util.keystr(k) for k in added} == {"['conv1']['factor_t']", "['conv2']['factor_t']"}
    for k, v in flat_in.items():
        np.testing.assert_array_equal(flat_out[k], v)
    delta = transduction.transduce(params, {"t": 3}, "delta", dense="keep")["conv1"]["factor_t"]
    np.testing.assert_array_equal(delta, np.array([[0.0] * 5, [1.0] * 5, [0.0] * 5]))


def test_transduce_inflation_rules():
    kernel = np.asarray(_image(4, (3, 3, C, 2)))
    tree = {"cp": {"lambda": jnp.ones(2), "factor_in": jnp.ones((C, 2)), "factor_out": jnp.ones((2, 2)),
                   "factor_h": jnp.ones((3, 2)), "factor_w": jnp.ones((3, 2))},
            "dense": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(2)}}
    with pytest.raises(ValueError, match="dense/kernel.*dense='keep'"):
        transduction.transduce(tree, {"t": 3})
    kept = transduction.transduce(tree, {"t": 3}, dense="keep")["dense"]["kernel"]
    np.testing.assert_array_equal(kept, kernel)
    centre = transduction.transduce(tree, {"t": 3}, dense="inflate_center")["dense"]["kernel"]
    mean = transduction.transduce(tree, {"t": 3}, dense="inflate_mean")["dense"]["kernel"]
    assert centre.shape == mean.shape == (3, 3, 3, C, 2)
    # centre inflation: a 3-D conv of ANY video equals the 2-D conv of each frame
    video = np.asarray(_image(5, (1, 4, H, W, C)))
    y3 = jax.lax.conv_general_dilated(video, centre, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    y2 = jax.lax.conv_general_dilated(video[0], kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(y3[0], y2, rtol=1e-5, atol=1e-5)
    # mean inflation (I3D): a constant video's interior frames equal the 2-D conv of the image
    const = np.broadcast_to(video[:, :1], video.shape)
    y3m = jax.lax.conv_general_dilated(const, mean, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    np.testing.assert_allclose(y3m[0, 1:3], np.broadcast_to(y2[:1], (2, H, W, 2)), rtol=1e-5, atol=1e-5)


def test_transduce_errors():
    params, _ = _init(Stack(psi=None), _image())
    with pytest.raises(ValueError, match="already has mode"):
        transduction.transduce(params, {"h": 3}, dense="keep")
    for bad in ({"in": 3}, {"skip": 3}, {"": 3}, {"t-1": 3}, {}):
        with pytest.raises(ValueError, match="modes"):
            transduction.transduce(params, bad, dense="keep")
    for k in (0, -1, 2.0):
        with pytest.raises(ValueError, match="kernel size"):
            transduction.transduce(params, {"t": k}, dense="keep")
    with pytest.raises(ValueError, match="odd"):
        transduction.transduce(params, {"t": 4}, "delta", dense="keep")
    with pytest.raises(ValueError, match="init="):
        transduction.transduce(params, {"t": 3}, "zeros", dense="keep")
    with pytest.raises(ValueError, match="dense="):
        transduction.transduce(params, {"t": 3}, dense="inflate")
    with pytest.raises(ValueError, match="no CP layer"):
        transduction.transduce({"bn": {"scale": jnp.ones(3)}, "head": {"kernel": jnp.ones((3, 2))}}, {"t": 3})
    broken = tree.to_dict(params)
    broken["conv2"]["factor_w"] = jnp.ones((3, 7))
    with pytest.raises(ValueError, match="conv2.*factor_w.*rank mismatch"):
        transduction.transduce(broken, {"t": 3}, dense="keep")


# ----------------------------------------------------------------------------- prune_rank


def _zero_lambdas(params, zeros):
    out = tree.to_dict(params)
    for name, idx in zeros.items():
        out[name]["lambda"] = out[name]["lambda"].at[np.array(idx)].set(0.0)
    return out


@pytest.mark.parametrize("psi", [None, "bn_prelu"])
def test_prune_rank_equals_masked_model(psi):
    model = Stack(psi=psi)
    x = _image(6)
    params, stats = _init(model, x)
    masked = _zero_lambdas(params, {"conv1": [0, 3], "conv2": [1]})
    pruned, pstats, report = pruning.prune_rank(masked, 0.0, batch_stats=stats)
    assert pruned["conv1"]["factor_in"].shape == (C, 3) and pruned["conv2"]["factor_h"].shape == (3, 3)
    np.testing.assert_array_equal(pruned["conv1"]["factor_out"], np.asarray(masked["conv1"]["factor_out"])[:, [1, 2, 4]])
    if psi:
        for stage in ("in", "h", "w"):
            assert pruned["conv1"][f"bn_{stage}"]["scale"].shape == (3,)
            assert pruned["conv1"][f"prelu_{stage}"]["alpha"].shape == (3,)
            np.testing.assert_array_equal(pstats["conv1"][f"bn_{stage}"]["mean"],
                                          np.asarray(stats["conv1"][f"bn_{stage}"]["mean"])[[1, 2, 4]])
    np.testing.assert_array_equal(pruned["conv2"]["factor_skip"], masked["conv2"]["factor_skip"])
    for train in (False, True):
        want = model.apply({"params": masked, "batch_stats": stats}, x, train, mutable=["batch_stats"])[0]
        got = model.apply({"params": pruned, "batch_stats": pstats}, x, train, mutable=["batch_stats"])[0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # report vs counting.cp_params (+ Psi params: BN 2R and PReLU R per stage, 3 stages)
    psi_per_rank = 9 if psi else 0
    l1, l2 = report.layers
    assert (l1.path, l1.rank_before, l1.rank_after) == ("conv1", 5, 3)
    assert (l2.path, l2.rank_before, l2.rank_after) == ("conv2", 4, 3)
    assert l1.params_before == counting.cp_params(C, 4, (3, 3), 5) + psi_per_rank * 5
    assert l1.params_after == counting.cp_params(C, 4, (3, 3), 3) + psi_per_rank * 3
    assert l2.params_after == counting.cp_params(4, 3, (3, 3), 3, skip=True, bias=True)
    n = lambda tree: sum(np.size(v) for v in jax.tree.leaves(tree))  # noqa: E731
    assert (report.params_before, report.params_after) == (n(masked), n(pruned))
    assert report.params_removed == sum(l.params_before - l.params_after for l in report.layers)
    if psi:  # without (or with the wrong level of) the statistics, the pruned BN stats would stay stale
        for bad in (None, {"params": masked, "batch_stats": stats}):
            with pytest.raises(ValueError, match=r"batch_stats: the Psi batch norms \['bn_in', 'bn_h', 'bn_w'\] of the CP "
                                                 r"layer at 'conv1'"):
                pruning.prune_rank(masked, 0.0, batch_stats=bad)


def test_prune_rank_threshold_keeps_one_and_errors():
    params, _ = _init(Stack(psi=None), _image())
    params = tree.to_dict(params)
    params["conv1"]["lambda"] = jnp.array([0.1, -0.5, 0.2, 0.05, 0.3])
    params["conv2"]["lambda"] = jnp.zeros(4)
    pruned, stats, report = pruning.prune_rank(params, 0.2)
    assert stats is None
    np.testing.assert_array_equal(pruned["conv1"]["lambda"], np.array([-0.5, 0.3], np.float32))
    assert pruned["conv2"]["lambda"].shape == (1,)  # at least one component is kept
    assert [l.rank_after for l in report.layers] == [2, 1]
    for bad in (-0.1, float("nan"), "0.1", None, True, np.True_):  # a bool is not threshold 1
        with pytest.raises(ValueError, match="threshold="):
            pruning.prune_rank(params, bad)
    with pytest.raises(ValueError, match="no CP layer"):
        pruning.prune_rank({"dense": {"kernel": jnp.ones((3, 3, 2, 2))}})
    diverged = dict(params, conv2=dict(params["conv2"], **{"lambda": jnp.array([1.0, jnp.nan, 0.0, 2.0])}))
    with pytest.raises(ValueError, match=r"params at 'conv2': lambda has non-finite entries \[1\]"):  # was: dropped
        pruning.prune_rank(diverged, 0.1)
    broken = dict(params, conv1=dict(params["conv1"], factor_in=jnp.ones((C, 4))))
    with pytest.raises(ValueError, match="rank mismatch"):
        pruning.prune_rank(broken)


@pytest.mark.parametrize("train", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_delta_transduced_hocp_resnet_tiny_equals_static_per_frame(train):
    from hocp_jax.models import get_model

    model = get_model("resnet18_hocp", tiny=True, psi="bn_relu", head=dict(trl="cp", trl_rank=4))
    x = _image(8, (2, 16, 16, 3))
    params, stats = _init(model, x)
    with pytest.raises(ValueError, match="shortcut"):  # the dense 1x1 shortcuts need a rule
        transduction.transduce(params, {"t": 3}, "delta")
    tparams = transduction.transduce(params, {"t": 3}, "delta", dense="keep")
    assert {p for p, _ in tree.cp_layers(tparams)} == {p for p, _ in tree.cp_layers(params)}
    apply = jax.jit(lambda p, v: model.apply({"params": p, "batch_stats": stats}, v, train, mutable=["batch_stats"]))
    static, s_upd = apply(params, x)
    video, v_upd = apply(tparams, jnp.broadcast_to(x[:, None], (2, 3, 16, 16, 3)))
    assert video["va"].shape == (2, 3, 2)
    # train=True: same batch statistics, but the last stages normalise over 2 x 1 x 1 values,
    # where BN's E[x^2] - E[x]^2 amplifies last-bit differences of means over 2 vs 6 copies
    tol = 1e-3 if train else 1e-5
    for t in range(3):
        np.testing.assert_allclose(video["va"][:, t], static["va"], rtol=tol, atol=tol)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), s_upd, v_upd)
