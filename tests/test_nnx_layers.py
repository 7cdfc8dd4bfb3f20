"""Flax NNX layers: equal to the Linen layers on the same parameters, and the library's
parameter-tree functions (transduce, masks, lasso) work on their ``nnx.state``."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hocp_jax import layers, nnx_layers, optim, transduction


def _load(module, params):
    """Loads a Linen-style pure dict into an NNX module (the README's recipe)."""
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(module, state)


def _params(module):
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _same_shapes(a, b):
    assert jax.tree.map(jnp.shape, a) == jax.tree.map(jnp.shape, b)


def test_cpconv_equals_linen_with_bn_psi_in_train_and_eval():
    x = jax.random.normal(jax.random.key(0), (4, 7, 7, 3))
    kw = dict(rank=5, stride=2, padding=1, psi="bn_prelu", psi_stages="all", skip=False, use_bias=True)
    lin = layers.CPConv(6, 3, **kw)
    v = lin.init(jax.random.key(1), x)
    m = nnx_layers.CPConv(3, 6, 3, **kw, rngs=nnx.Rngs(0))
    _same_shapes(_params(m), v["params"])  # same names, shapes (and psi sub-modules bn_*/prelu_*)
    _load(m, v["params"])
    y_train, upd = lin.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(m(x), y_train, rtol=1e-5, atol=1e-6)
    stats = nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), stats, upd["batch_stats"])
    m.eval()
    y_eval = lin.apply({"params": v["params"], "batch_stats": upd["batch_stats"]}, x)
    np.testing.assert_allclose(m(x), y_eval, rtol=1e-5, atol=1e-6)
    assert not np.allclose(y_eval, y_train)


def test_transduce_masks_and_lasso_on_nnx_state():
    img = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    vid = jax.random.normal(jax.random.key(1), (2, 4, 6, 6, 3))
    static = nnx_layers.CPConv(3, 4, 3, rank=5, skip=True, rngs=nnx.Rngs(0))
    p = _params(static)
    np.testing.assert_allclose(optim.l1_lambda(p, 0.5), 0.5 * np.abs(p["lambda"]).sum(), rtol=1e-6)
    video_params = transduction.transduce(p, {"t": 3}, init="delta")
    video = nnx_layers.CPConv(3, 4, 3, rank=5, skip=True, temporal_modes=("t",), rngs=nnx.Rngs(1))
    _load(video, video_params)
    lin = layers.CPConv(4, 3, rank=5, skip=True)
    np.testing.assert_allclose(video(vid), lin.apply({"params": video_params}, vid), rtol=1e-5, atol=1e-6)
    # delta init: the video layer reproduces the static layer frame by frame; static input still works
    np.testing.assert_allclose(video(vid)[:, 1], static(vid[:, 1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(video(img), static(img), rtol=1e-6)
    labels = optim.label_params(_params(video), "temporal")
    assert [k for k, v in labels.items() if v == "trainable"] == ["factor_t"]
    # one masked SGD step on the NNX state moves only the temporal factor
    params = _params(video)
    tx = optim.masked_optimizer(optax.sgd(0.1), params, trainable="temporal")
    grads = nnx.to_pure_dict(nnx.grad(lambda mod: jnp.sum(mod(vid) ** 2))(video))
    updates, _ = tx.update(grads, tx.init(params), params)
    _load(video, optax.apply_updates(params, updates))
    new = _params(video)
    for k in params:
        assert np.array_equal(new[k], params[k]) == (k != "factor_t"), k
    with pytest.raises(ValueError, match="temporal"):
        static(vid)


def test_masks_and_the_proximal_step_find_layers_under_int_keys():
    """nnx.Sequential (and lists) hold their layers under int keys; before, the masks and the proximal step
    compared them as strings with the layers' int paths and found no CP layer (the lambdas stayed, silently)."""
    seq = nnx.Sequential(nnx_layers.CPConv(3, 4, 3, rank=4, rngs=nnx.Rngs(0)),
                         nnx_layers.CPConv(4, 4, 3, rank=4, rngs=nnx.Rngs(1)))
    params = nnx.to_pure_dict(nnx.state(seq, nnx.Param))
    assert 0 in params["layers"]  # (int keys)
    lams = [np.asarray(params["layers"][i]["lambda"]) for i in (0, 1)]
    big = float(max(np.abs(lam).max() for lam in lams)) + 1.0
    out = optim.soft_threshold_lambdas(params, big)  # a threshold above every |lambda|: all zero
    assert all(np.all(np.asarray(out["layers"][i]["lambda"]) == 0) for i in (0, 1))
    np.testing.assert_array_equal(out["layers"][1]["factor_h"], params["layers"][1]["factor_h"])
    labels = optim.label_params(params, "lambda")
    assert labels["layers"][0]["lambda"] == labels["layers"][1]["lambda"] == "trainable"
    assert labels["layers"][0]["factor_in"] == "frozen"
    video = transduction.transduce(params, {"t": 3}, init="delta")
    tx = optim.masked_optimizer(optax.sgd(0.1), video, trainable="temporal")  # was: "selects no leaf"
    assert tx.init(video) is not None


@pytest.mark.parametrize("trainable, names", [
    ("temporal", {"factor_t"}),
    (("lambda", "spatial"), {"lambda", "factor_h", "factor_w"}),
])
def test_nnx_optimizer_with_masked_optimizer_on_nnx_state(trainable, names):
    vid = jax.random.normal(jax.random.key(1), (2, 4, 6, 6, 3))
    model = nnx_layers.CPConv(3, 4, 3, rank=5, psi="bn_prelu", psi_stages="all", temporal_modes=("t",),
                              rngs=nnx.Rngs(0))
    before = jax.tree.map(np.array, _params(model))
    grads = nnx.grad(lambda mod: jnp.sum(mod(vid) ** 2))(model)
    g = nnx.to_pure_dict(grads)
    # nnx.Optimizer hands tx.init an nnx.State (leaf paths end in '.value'); update gets plain arrays
    tx = optim.masked_optimizer(optax.adam(1e-2), nnx.state(model, nnx.Param), trainable)
    nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)
    after = _params(model)
    # independent reference: optax.adam on the trainable leaves alone, the others untouched
    adam = optax.adam(1e-2)
    sub = {k: before[k] for k in names}
    updates, _ = adam.update({k: g[k] for k in names}, adam.init(sub), sub)
    want = dict(before) | optax.apply_updates(sub, updates)
    flat_before, flat_after, flat_want = ({"/".join(p.key for p in k): v for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
                                          for t in (before, after, want))
    assert {"bn_in/scale", "prelu_w/alpha"} <= set(flat_before)
    for k, v in flat_before.items():
        if k in names:
            assert not np.array_equal(flat_after[k], v), k
            np.testing.assert_allclose(flat_after[k], flat_want[k], rtol=1e-6, atol=1e-7, err_msg=k)
        else:  # frozen: bitwise unchanged (Psi BN scale/bias and PReLU alpha included)
            assert np.asarray(flat_after[k]).tobytes() == v.tobytes(), k
    # the same step on the pure dict (the Linen path) gives the same parameters
    tx = optim.masked_optimizer(optax.adam(1e-2), before, trainable)
    updates, _ = tx.update(g, tx.init(before), before)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), after,
                 optax.apply_updates(before, updates))


def test_tucker_separable_trl_equal_linen():
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 6))
    cases = [
        (layers.TuckerConv(8, (3, 3), ranks=(3, 4), stride=2), nnx_layers.TuckerConv(6, 8, (3, 3), ranks=(3, 4), stride=2, rngs=nnx.Rngs(0)), x),
        (layers.SeparableConv(8, (3, 3), rank=12), nnx_layers.SeparableConv(6, 8, (3, 3), rank=12, rngs=nnx.Rngs(0)), x),
        (layers.TRL(5, rank=(3, 4, 2), decomposition="tucker", n_modes=2),
         nnx_layers.TRL((7, 6), 5, rank=(3, 4, 2), decomposition="tucker", rngs=nnx.Rngs(0)), x),
    ]
    for lin, m, inp in cases:
        v = lin.init(jax.random.key(1), inp)
        _same_shapes(_params(m), v["params"])
        _load(m, v["params"])
        np.testing.assert_allclose(m(inp), lin.apply(v, inp), rtol=1e-5, atol=1e-6)


def test_dtype_and_param_dtype_and_validation():
    x = jnp.ones((1, 5, 5, 3), jnp.bfloat16)
    m = nnx_layers.CPConv(3, 4, 3, rank=4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert {a.dtype for a in jax.tree.leaves(_params(m))} == {jnp.dtype(jnp.bfloat16)}
    assert m(x).dtype == jnp.bfloat16
    m32 = nnx_layers.TuckerConv(3, 4, ranks=(2, 2), dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert m32(x).dtype == jnp.float32
    with pytest.raises(ValueError, match="psi='tanh'"):
        nnx_layers.CPConv(3, 4, psi="tanh", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank=0"):
        nnx_layers.CPConv(3, 4, rank=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="decomposition"):
        nnx_layers.TRL((2, 2), 3, decomposition="tt", rngs=nnx.Rngs(0))
    # sizes and temporal modes, named as the NNX constructors call them (Linen: tests/test_layers.py)
    for make, words in [(lambda: nnx_layers.CPConv(3, 0, rank=2, rngs=nnx.Rngs(0)), "out_features=0"),
                        (lambda: nnx_layers.CPConv(3, 4, rank=2, temporal_modes="t", rngs=nnx.Rngs(0)), "temporal_modes='t'"),
                        (lambda: nnx_layers.CPConv(3, 4, rank=2, temporal_modes=("t",), temporal_kernel_size=0,
                                                   rngs=nnx.Rngs(0)), "temporal_kernel_size=0"),
                        (lambda: nnx_layers.TuckerConv(0, 4, rngs=nnx.Rngs(0)), "in_features=0"),
                        (lambda: nnx_layers.SeparableConv(3, 4, rank=0, rngs=nnx.Rngs(0)), "rank=0"),
                        (lambda: nnx_layers.TTConv(3, True, rngs=nnx.Rngs(0)), "out_features=True"),
                        (lambda: nnx_layers.TRL((2, 2), 0, rngs=nnx.Rngs(0)), "features=0"),
                        (lambda: nnx_layers.CPConv(3, 4, rank=2, input_grad="no", rngs=nnx.Rngs(0)),
                         "input_grad='no'")]:
        with pytest.raises(ValueError, match=words):
            make()
    for cls in (nnx_layers.TuckerConv, nnx_layers.SeparableConv, nnx_layers.TTConv):  # int: (k, k), as CPConv
        assert cls(3, 4, 3, rngs=nnx.Rngs(0))(x.astype(jnp.float32)).shape == (1, 5, 5, 4)


def test_cpconv_passes_input_grad_to_the_conv(monkeypatch):
    # a network's first layer tells implementation="auto" that no input gradient is needed
    seen = []
    real = nnx_layers.conv.cp_conv
    monkeypatch.setattr(nnx_layers.conv, "cp_conv", lambda *a, **kw: seen.append(kw["input_grad"]) or real(*a, **kw))
    x = jnp.ones((1, 5, 5, 3))
    for flag in (False, True):
        nnx_layers.CPConv(3, 4, rank=2, implementation="auto", input_grad=flag, rngs=nnx.Rngs(0))(x)
    assert seen == [False, True]


_R = lambda: nnx.Rngs(0)  # noqa: E731
BAD_NNX = [  # each was accepted (a bias, running statistics) or failed deep inside (ZeroDivisionError, MLIRError)
    (lambda: nnx_layers.CPConv(3, 4, rank=2, psi="bn_relu", use_running_average="no", rngs=_R()),
     "use_running_average='no': expected True or False"),
    (lambda: nnx_layers.TTConv(3, 4, use_bias="no", rngs=_R()), "use_bias='no'"),
    (lambda: nnx_layers.TCL((2, 2), 2, use_bias="no", rngs=_R()), "use_bias='no'"),
    (lambda: nnx_layers.FactorizedLinear((2, 2), (3, 3), use_bias="no", rngs=_R()), "use_bias='no'"),
    (lambda: nnx_layers.FactorizedLinear((2, 2), (3, 3), deterministic="no", rngs=_R()), "deterministic='no'"),
    (lambda: nnx_layers.TRL((2, 2), 3, decomposition="tucker", rank=-1, rngs=_R()),
     "rank=-1: expected a positive int or 3 positive ints"),
    (lambda: nnx_layers.TRL((2, 2), 3, decomposition="tucker", rank=(2, 0, 2), rngs=_R()), "rank=(2, 0, 2)"),
    (lambda: nnx_layers.TRL((0, 2), 3, rngs=_R()), "in_shape=(0, 2): expected a non-empty sequence of ints >= 1"),
    (lambda: nnx_layers.TRL((2.0, 2), 3, rngs=_R()), "in_shape=(2.0, 2)"),
    (lambda: nnx_layers.TRL((), 3, rngs=_R()), "in_shape=()"),
    (lambda: nnx_layers.TRL(None, 3, rngs=_R()), "in_shape=None"),
    (lambda: nnx_layers.CPConv(3, 4, rank=2, spatial_modes=("t", "w"), temporal_modes=("t",), rngs=_R()),
     "spatial_modes=('t', 'w'), temporal_modes=('t',): expected distinct mode names"),
    # the conv's arguments: were refused at the first call only
    (lambda: nnx_layers.CPConv(3, 4, rank=2, stride=0, rngs=_R()), "stride=0: expected a positive int or 2 positive ints"),
    (lambda: nnx_layers.CPConv(3, 4, rank=2, padding="FULL", rngs=_R()), "padding='FULL': unknown padding"),
    (lambda: nnx_layers.CPConv(3, 4, rank=2, implementation="nope", rngs=_R()), "implementation='nope': expected one of"),
    (lambda: nnx_layers.CPConv(3, 4, rank=2, temporal_modes=("t",), temporal_stride=0, rngs=_R()), "temporal_stride=0"),
    (lambda: nnx_layers.TuckerConv(3, 4, stride=0, rngs=_R()), "stride=0: expected a positive int or 2 positive ints"),
    (lambda: nnx_layers.TuckerConv(3, 4, implementation="auto", rngs=_R()), "implementation='auto': expected one of"),
    (lambda: nnx_layers.SeparableConv(3, 4, padding="FULL", rngs=_R()), "padding='FULL': unknown padding"),
    (lambda: nnx_layers.SeparableConv(3, 4, dilation=(1, 0), rngs=_R()), "dilation=(1, 0)"),
]


@pytest.mark.parametrize("make,words", BAD_NNX, ids=[w.split(":")[0] for _, w in BAD_NNX])
def test_bad_flags_ranks_shapes_and_modes_fail_at_construction(make, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        make()


def test_call_flags_are_bools():
    x = jnp.ones((1, 5, 5, 3))
    with pytest.raises(ValueError, match="use_running_average='no'"):
        nnx_layers.CPConv(3, 4, rank=2, psi="bn_relu", rngs=_R())(x, use_running_average="no")
    with pytest.raises(ValueError, match="deterministic='no'"):
        nnx_layers.FactorizedLinear((3,), (2,), rngs=_R())(x, deterministic="no")
