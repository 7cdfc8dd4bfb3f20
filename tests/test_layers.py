"""Flax layers vs the functional core and independent oracles."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorly as tl

from hocp_jax import conv, conv_ops, counting, init, layers, regression, transduction
from hocp_jax.layers import TCL, TRL, CPConv, FactorizedLinear, SeparableConv, TTConv, TuckerConv


def test_cpconv_equals_functional_and_dense():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    m = layers.CPConv(5, kernel_size=3, rank=7, stride=2, padding=1, skip=True, use_bias=True)
    v = m.init(jax.random.key(1), x)
    p = v["params"]
    assert set(p) == {"lambda", "factor_in", "factor_out", "factor_h", "factor_w", "factor_skip", "bias"}
    y = m.apply(v, x)
    np.testing.assert_allclose(y, conv.cp_conv(x, p, modes=("h", "w"), stride=2, padding=1), rtol=1e-5, atol=1e-6)
    # independent: lax on the reconstructed kernel + skip
    w = np.einsum("hr,wr,cr,tr,r->hwct", p["factor_h"], p["factor_w"], p["factor_in"], p["factor_out"], p["lambda"])
    dense = jax.lax.conv_general_dilated(x, w, (2, 2), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC"))
    dense = dense + np.einsum("bhwc,ct->bhwt", x[:, ::2, ::2], p["factor_skip"]) + p["bias"]
    np.testing.assert_allclose(y, dense, rtol=1e-4, atol=1e-5)


def test_cpconv_rank_rules():
    x = jnp.ones((1, 6, 6, 16))
    p = layers.CPConv(32, 3).init(jax.random.key(0), x)["params"]
    assert p["lambda"].shape == (counting.cp_rank_for_budget(16, 32, (3, 3)),)
    p = layers.CPConv(32, 3, rank_multiple=6).init(jax.random.key(0), x)["params"]
    assert p["lambda"].shape == (96,)
    with pytest.raises(ValueError, match="rank"):
        layers.CPConv(32, 3, rank=0).init(jax.random.key(0), x)


def _np_psi_cpconv(x, params, stats, psi, train):
    """numpy CPConv with psi after the input contraction and each spatial 1-D conv ('SAME', 3 taps):
    BatchNorm (batch statistics when training, ``stats`` in eval; eps 1e-5), then ReLU or PReLU."""
    def stage(h, name):
        if psi.startswith("bn_"):
            bn = params[f"bn_{name}"]
            mean, var = (h.mean((0, 1, 2)), h.var((0, 1, 2))) if train else (stats[f"bn_{name}"]["mean"],
                                                                              stats[f"bn_{name}"]["var"])
            h = (h - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
        return np.where(h >= 0, h, params[f"prelu_{name}"]["alpha"] * h) if psi.endswith("prelu") else np.maximum(h, 0)

    def depthwise(h, f, axis):
        hp = np.pad(h, [(1, 1) if a == axis else (0, 0) for a in range(h.ndim)])
        return sum(np.take(hp, range(t, t + h.shape[axis]), axis=axis) * f[t] for t in range(3))

    params = jax.tree.map(np.asarray, params)
    h = stage(np.einsum("bhwc,cr->bhwr", np.asarray(x), params["factor_in"]), "in")
    h = stage(depthwise(h, params["factor_h"], 1), "h")
    h = stage(depthwise(h, params["factor_w"], 2), "w")
    return np.einsum("bhwr,tr,r->bhwt", h, params["factor_out"], params["lambda"])


@pytest.mark.parametrize("psi", ["relu", "prelu", "bn_relu", "bn_prelu"])
def test_cpconv_psi_train_eval(psi):
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    m = layers.CPConv(4, 3, rank=5, psi=psi, psi_stages="all")
    v = m.init(jax.random.key(1), x)
    # random BN scales/biases and PReLU slopes (their inits, 1/0/0.25, would hide a swapped leaf)
    keys = iter(jax.random.split(jax.random.key(2), 16))
    v = {**v, "params": {k: jax.tree.map(lambda a: jax.random.uniform(next(keys), a.shape, minval=-1.0, maxval=1.0), leaf)
                         if k.startswith(("bn_", "prelu_")) else leaf for k, leaf in v["params"].items()}}
    if psi.startswith("bn"):
        assert set(v["batch_stats"]) == {"bn_in", "bn_h", "bn_w"}
        y, upd = m.apply(v, x, train=True, mutable=["batch_stats"])
        assert not np.allclose(upd["batch_stats"]["bn_in"]["mean"], 0)
        np.testing.assert_allclose(y, _np_psi_cpconv(x, v["params"], None, psi, True), rtol=1e-4, atol=1e-4)
        v = {**v, **upd}  # eval with the updated running statistics
    if psi.endswith("prelu"):
        assert "prelu_in" in v["params"]
    y = m.apply(v, x)
    np.testing.assert_allclose(y, _np_psi_cpconv(x, v["params"], v.get("batch_stats"), psi, False), rtol=1e-4, atol=1e-4)
    linear = {k: a for k, a in v["params"].items() if not k.startswith(("bn_", "prelu_"))}
    assert not np.allclose(y, layers.CPConv(4, 3, rank=5).apply({"params": linear}, x), atol=1e-3)  # psi acts
    with pytest.raises(ValueError, match="psi"):
        layers.CPConv(4, 3, rank=5, psi="tanh").init(jax.random.key(1), x)


def test_cpconv_video_needs_temporal_factor():
    img = jnp.ones((2, 6, 6, 3))
    vid = jnp.ones((2, 4, 6, 6, 3))
    m = layers.CPConv(4, 3, rank=5)
    v2d = m.init(jax.random.key(0), img)
    with pytest.raises(ValueError, match="transduce"):
        m.apply(v2d, vid)
    v3d = m.init(jax.random.key(0), vid)  # from-scratch 3-D: creates factor_t
    assert v3d["params"]["factor_t"].shape == (3, 5)
    assert m.apply(v3d, vid).shape == (2, 4, 6, 6, 4)
    with pytest.raises(ValueError, match="x: got shape"):
        m.apply(v3d, jnp.ones((2, 1, 4, 6, 6, 3)))


def test_tucker_and_separable_layers_match_functional():
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 6))
    m = layers.TuckerConv(8, (3, 3), ranks=(3, 4), stride=2)
    v = m.init(jax.random.key(1), x)
    np.testing.assert_allclose(m.apply(v, x), conv_ops.dense_conv(x, conv.tucker_to_kernel(v["params"]), stride=2), rtol=1e-4, atol=1e-5)
    s = layers.SeparableConv(8, (3, 3), rank=12)
    vs = s.init(jax.random.key(1), x)
    p = vs["params"]
    w = np.einsum("hwr,cr,tr->hwct", p["depthwise"], p["factor_in"], p["factor_out"])
    np.testing.assert_allclose(s.apply(vs, x), conv_ops.dense_conv(x, jnp.asarray(w)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda k: layers.TuckerConv(8, k, ranks=(3, 4)),
                                  lambda k: layers.SeparableConv(8, k, rank=12),
                                  lambda k: layers.TTConv(8, k, rank=3)])
def test_int_kernel_size_means_both_modes_of_a_2d_conv(make):
    """As for CPConv, ``kernel_size=3`` is ``(3, 3)``: the same leaves and outputs."""
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 6))
    v = make((3, 3)).init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, make(3).init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, v)
    np.testing.assert_array_equal(make(3).apply(v, x), make((3, 3)).apply(v, x))
    with pytest.raises(ValueError, match="kernel_size"):
        make((3, 0)).init(jax.random.key(1), x)


@pytest.mark.parametrize("decomposition,rank", [("cp", 6), ("tucker", (2, 3, 4, 5))])
def test_trl_matches_full_weight(decomposition, rank):
    x = jax.random.normal(jax.random.key(0), (3, 2, 4, 5, 6))  # (B, T, H, W, C): per-frame outputs
    m = layers.TRL(7, rank=rank, decomposition=decomposition)
    v = m.init(jax.random.key(1), x)
    y = m.apply(v, x)
    p = jax.tree.map(np.asarray, v["params"])
    factors = [p["factor_0"], p["factor_1"], p["factor_2"], p["factor_out"]]
    # the full weight (H, W, C, outputs) rebuilt by TensorLy (an independent oracle), and the library's own
    w = (tl.cp_to_tensor((p["lambda"], factors)) if decomposition == "cp" else tl.tucker_to_tensor((p["core"], factors)))
    np.testing.assert_allclose(regression.trl_weight(v["params"], 3), w, rtol=1e-4, atol=1e-6)
    assert w.shape == (4, 5, 6, 7)
    np.testing.assert_allclose(y, np.einsum("bthwc,hwco->bto", x, w) + p["bias"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="factor_0"):
        m.apply(v, jnp.ones((3, 2, 5, 5, 6)))


# Constructor arguments a user gets wrong: each a ValueError naming it (before: a silent
# 0-channel output, ZeroDivisionError, TypeError or MLIR errors from deep inside, or a string
# temporal_modes read as one mode per character).
_X = jnp.ones((1, 5, 5, 4))
BAD_LAYERS = [
    (lambda: CPConv(0, rank=2), "features=0: expected an int >= 1"),
    (lambda: CPConv(True, rank=2), "features=True"),
    (lambda: CPConv(3, kernel_size=True, rank=2), "kernel_size=True"),
    (lambda: CPConv(3, kernel_size=3.0, rank=2), "kernel_size=3.0"),
    (lambda: CPConv(3, kernel_size=0, rank=2), "kernel_size=0"),
    (lambda: CPConv(3, temporal_modes="time", rank=2), "temporal_modes='time'"),
    (lambda: CPConv(3, gain=-1.0, rank=2), "gain=-1.0: expected a real number > 0"),
    (lambda: CPConv(3, gain=float("nan"), rank=2), "gain=nan"),
    (lambda: CPConv(3, padding=None, rank=2), "padding=None"),
    (lambda: TuckerConv(3, ranks=(2, 2, 2)), "ranks=(2, 2, 2)"),
    (lambda: TuckerConv(3, rank_ratio=0), "rank_ratio=0"),
    (lambda: SeparableConv(0), "features=0"),
    (lambda: SeparableConv(3, rank=0), "rank=0: expected an int >= 1"),
    (lambda: TRL(3, rank=2, n_modes=True), "n_modes=True"),
    (lambda: TCL(2, n_modes=-2), "n_modes=-2"),
    (lambda: TTConv(0), "features=0"),
    (lambda: CPConv(3, rank=2, skip="no"), "skip='no': expected True or False"),  # was: a skip factor
    (lambda: CPConv(3, rank=2, use_bias="no"), "use_bias='no'"),
    (lambda: TCL(2, use_bias="no"), "use_bias='no'"),  # was: a bias
    (lambda: FactorizedLinear((2, 2), (3, 3), use_bias="no"), "use_bias='no'"),  # was: a bias
    (lambda: TRL(3, decomposition="tucker", rank=(0, 2, 2, 2)),  # was: ZeroDivisionError
     "rank=(0, 2, 2, 2): expected a positive int or 4 positive ints"),
    (lambda: TRL(3, decomposition="tucker", rank=-1), "rank=-1"),
    (lambda: CPConv(3, rank=2, spatial_modes=("t", "w")),  # was: modes=('t', 't', 'w') on video only
     "spatial_modes=('t', 'w'), temporal_modes=('t',): expected distinct mode names"),
    (lambda: CPConv(3, rank=2, spatial_modes="hw"), "spatial_modes='hw': expected a sequence of mode names"),
    (lambda: CPConv(3, rank=2, spatial_modes=("h", "h")), "spatial_modes: modes=('h', 'h'): expected"),  # was: modes=... at the call
    # temporal arguments under their own names, on static inputs too (were: stride=(0, 1, 1), padding[0]='FULL' on video)
    (lambda: CPConv(3, rank=2, temporal_stride=0), "temporal_stride=0: expected an int >= 1"),
    (lambda: CPConv(3, rank=2, temporal_padding="FULL"), "temporal_padding='FULL': unknown padding"),
    (lambda: CPConv(3, rank=2, padding="FULL"), "padding='FULL': unknown padding"),  # was: padding[0]='FULL'
    (lambda: CPConv(3, rank=2, padding=((1, 1),)), "padding=((1, 1),): expected one entry per spatial mode, 2 for ('h', 'w')"),
    (lambda: TuckerConv(3, ranks=(2, 2), dilation=0), "dilation=0: every entry must be >= 1"),
]


@pytest.mark.parametrize("make,words", BAD_LAYERS, ids=[w for _, w in BAD_LAYERS])
def test_bad_constructor_arguments_name_themselves(make, words):
    m = make()
    with pytest.raises(ValueError, match=re.escape(words)):
        m.init(jax.random.key(0), _X)


def test_stored_leaves_the_layer_does_not_use_are_refused():
    """A Linen layer read only the leaves it creates: a misspelt 'bais', a trained skip factor
    under skip=False and a transduced factor_t on images were left out without a word."""
    k, video = jax.random.key(0), jnp.ones((1, 3, 5, 5, 4))
    m = CPConv(3, rank=2)
    p = m.init(k, _X)["params"]
    cases = [({**p, "bais": jnp.zeros(3)}, _X, "did you mean 'bias' for 'bais'?"),
             (CPConv(3, rank=2, skip=True).init(k, _X)["params"], _X, "'factor_skip': skip=False"),
             (transduction.transduce(p, {"t": 3}, init="delta"), _X, "'factor_t': x (1, 5, 5, 4) has no 't' axis")]
    for params, x, words in cases:
        with pytest.raises(ValueError, match=re.escape("layer 'CPConv': stored params [")):
            m.apply({"params": params}, x)
        with pytest.raises(ValueError, match=re.escape(words)):
            m.apply({"params": params}, x)
    assert m.apply({"params": transduction.transduce(p, {"t": 3}, init="delta")}, video).shape == (1, 3, 5, 5, 3)
    t = TuckerConv(3, ranks=(2, 2))
    with pytest.raises(ValueError, match=re.escape("stored params ['factor_skip']")):
        t.apply({"params": {**t.init(k, _X)["params"], "factor_skip": jnp.zeros((4, 3))}}, _X)


def test_tt_conv_names_the_input_rank():
    """A 3-D input to a 2-D TTConv blamed the cores it had not yet made ("found 4 TT cores")."""
    with pytest.raises(ValueError, match=re.escape("x: got shape (1, 3, 5, 5, 4), expected 4-D")):
        TTConv(3).init(jax.random.key(0), jnp.ones((1, 3, 5, 5, 4)))


@pytest.mark.parametrize("cls", ["TuckerConv", "SeparableConv"])
def test_tucker_and_separable_layers_take_a_dilation(cls):
    """The functions took ``dilation``, the layers did not: checked against lax's dilated conv of
    the reconstructed kernel."""
    x = jax.random.normal(jax.random.key(1), (1, 9, 9, 4))
    layer = {"TuckerConv": TuckerConv(3, ranks=(2, 2), dilation=2),
             "SeparableConv": SeparableConv(3, rank=6, dilation=2)}[cls]
    params = layer.init(jax.random.key(0), x)["params"]
    w = (conv.tucker_to_kernel(params) if cls == "TuckerConv" else  # separable: sum_r in[c,r] dw[...,r] out[t,r]
         jnp.einsum("cr,...r,tr->...ct", params["factor_in"], params["depthwise"], params["factor_out"]))
    want = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(layer.apply({"params": params}, x), want, rtol=1e-4, atol=1e-5)


def test_temporal_kernel_size_is_checked_on_video():
    with pytest.raises(ValueError, match="temporal_kernel_size=0"):
        CPConv(3, rank=2, temporal_kernel_size=0).init(jax.random.key(0), jnp.ones((1, 3, 5, 5, 4)))


def test_a_standalone_layer_is_named_by_its_class_in_errors():
    """Outside a parent module a Linen layer has no name: messages said layer 'None'."""
    m = CPConv(3, rank=2)
    v = m.init(jax.random.key(0), _X)
    with pytest.raises(ValueError, match="layer 'CPConv' has no 'factor_t'"):
        m.apply(v, jnp.ones((1, 3, 5, 5, 4)))
    with pytest.raises(ValueError, match=r"params\['factor_in'\] of layer 'CPConv': stored shape \(4, 2\)"):
        m.apply(v, jnp.ones((1, 5, 5, 6)))
    # transduced with another mode name: said "built for static input" (an audit, stop 79)
    other = {"params": transduction.transduce(v["params"], {"time": 3})}
    with pytest.raises(ValueError, match=re.escape("hold ['factor_time'], transduced with other mode names than "
                                                   "temporal_modes=('t',)?")):
        m.apply(other, jnp.ones((1, 3, 5, 5, 4)))


def test_call_flags_are_bools_and_numpy_bools_pass():
    """``train="yes"`` ran BatchNorm on batch statistics, ``init_cp_params(skip="yes")`` made a skip factor."""
    with pytest.raises(ValueError, match="train='yes': expected True or False"):
        CPConv(3, rank=2, psi="bn_relu").init(jax.random.key(0), _X, train="yes")
    with pytest.raises(ValueError, match="train='no'"):
        FactorizedLinear((2, 2), (3, 3)).init(jax.random.key(0), _X, train="no")
    with pytest.raises(ValueError, match="skip='yes'"):
        init.init_cp_params(jax.random.key(0), 4, 6, (3, 3), 2, skip="yes")
    v = CPConv(3, rank=2, skip=np.bool_(True)).init(jax.random.key(0), _X, train=np.bool_(False))
    assert "factor_skip" in v["params"]


def test_trl_refuses_a_zero_size_regressed_mode():
    with pytest.raises(ValueError, match=r"x: got shape \(1, 0, 5, 4\).*a size 0"):  # was: ZeroDivisionError
        TRL(3, rank=2).init(jax.random.key(0), jnp.ones((1, 0, 5, 4)))


def test_a_trl_over_many_modes_matches_its_weight_built_by_outer_products():
    """Before (an audit, stop 79): the modes' einsum labels ran into the output's and rank's ('o', 'r'): 15 modes
    raised from inside einsum, 18 gave a wrong output silently."""
    rng = np.random.default_rng(5)
    dims, rank, out = (1,) * 16 + (2, 3), 2, 3
    p = {f"factor_{i}": rng.normal(size=(d, rank)) for i, d in enumerate(dims)}
    p |= {"factor_out": rng.normal(size=(out, rank)), "lambda": rng.normal(size=rank)}
    w = np.ones((1, rank))  # (prod d, R) by successive outer products, then times lambda and factor_out
    for i in range(len(dims)):
        w = (w[:, None, :] * p[f"factor_{i}"][None]).reshape(-1, rank)
    x = rng.normal(size=(2, *dims))
    with jax.enable_x64(True):
        got = regression.trl(jnp.asarray(x), jax.tree.map(jnp.asarray, p), n_modes=len(dims))
    np.testing.assert_allclose(got, x.reshape(2, -1) @ (w * p["lambda"]) @ p["factor_out"].T, rtol=1e-10)
    with pytest.raises(ValueError, match="n_modes=24: expected at most 23 contracted modes"):
        regression.trl(jnp.ones((1,) * 25), p, n_modes=24)
    with pytest.raises(ValueError, match="with at least one batch axis"):
        regression.trl(jnp.ones((1, 1, 2)), {k: p[k] for k in ("factor_out", "lambda")} | {
            f"factor_{i}": p[f"factor_{i + 15}"] for i in range(3)}, n_modes=3)


def test_a_stored_leaf_of_another_rank_is_named():
    """A ``lambda`` of the wrong rank blamed ``factor_in`` (the rank was read from ``lambda``)."""
    m = CPConv(3, rank=2)
    p = m.init(jax.random.key(0), _X)["params"]
    for name in ("lambda", "factor_w"):
        bad = {**p, name: jnp.ones(p[name].shape[:-1] + (5,))}
        with pytest.raises(ValueError, match=rf"params\['{name}'\] of layer 'CPConv'.*expected 2 in its last axis"):
            m.apply({"params": bad}, _X)
