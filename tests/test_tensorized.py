"""TensorLy-Torch parity layers (factorized linear CP/Tucker/TT, TCL, TT conv, tensor dropout)
against TensorLy (numpy backend) reconstructions and lax convolutions; Linen == NNX."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorly as tl
from flax import nnx
from tensorly import tenalg

from hocp_jax import conv, layer_specs, layers, nnx_layers, tensorized

tl.set_backend("numpy")
RNG = np.random.default_rng(0)


def _f32(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _linear_case(kind, ins, outs):
    """Random params of a factorized linear layer and its dense (I, O) weight rebuilt by TensorLy."""
    if kind == "cp":
        lam, fs = RNG.normal(size=3), [RNG.normal(size=(d, 3)) for d in ins + outs]
        w = tl.cp_to_tensor((lam, fs))
        p = {"lambda": lam}
    elif kind == "tucker":
        ranks = (2, 3, 2, 2)[: len(ins) + len(outs)]
        core, fs = RNG.normal(size=ranks), [RNG.normal(size=(d, r)) for d, r in zip(ins + outs, ranks)]
        w = tl.tucker_to_tensor((core, fs))
        p = {"core": core}
    else:
        bonds = (1, 3, 2, 1)[: len(ins)] + (1,)
        cores = [RNG.normal(size=(bonds[n], i, o, bonds[n + 1])) for n, (i, o) in enumerate(zip(ins, outs))]
        return _f32({f"core_{n}": c for n, c in enumerate(cores)}), tl.tt_matrix_to_matrix(cores)
    p |= {f"factor_in_{i}": f for i, f in enumerate(fs[: len(ins)])}
    p |= {f"factor_out_{j}": f for j, f in enumerate(fs[len(ins):])}
    return _f32(p), w.reshape(int(np.prod(ins)), int(np.prod(outs)))


@pytest.mark.parametrize("kind,ins,outs", [("cp", (2, 3, 4), (5, 2)), ("tucker", (4, 6), (2, 5)), ("tt", (2, 3, 4), (3, 1, 2))])
def test_factorized_linear_matches_tensorly_weight(kind, ins, outs):
    params, w = _linear_case(kind, ins, outs)
    params["bias"] = jnp.asarray(RNG.normal(size=w.shape[1]), jnp.float32)
    x = RNG.normal(size=(2, 3, w.shape[0])).astype(np.float32)
    want = x @ w + np.asarray(params["bias"])
    for impl in ("factorized", "reconstructed"):
        np.testing.assert_allclose(tensorized.factorized_linear(x, params, implementation=impl), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tensorized.factorized_linear_weight(params), w, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"x: got shape"):
        tensorized.factorized_linear(x[..., 1:], params)


def test_factorized_linear_layers_linen_equals_nnx_and_validate():
    x = jnp.asarray(RNG.normal(size=(4, 24)), jnp.float32)
    for kind, rank in (("cp", 5), ("tucker", (2, 2, 2, 3, 2, 1)), ("tt", (3, 2))):
        kw = dict(factorization=kind, rank=rank)
        lin = layers.FactorizedLinear((2, 3, 4), (5, 2, 1), **kw)
        v = lin.init(jax.random.key(0), x)
        m = nnx_layers.FactorizedLinear((2, 3, 4), (5, 2, 1), **kw, rngs=nnx.Rngs(0))
        state = nnx.state(m, nnx.Param)
        assert jax.tree.map(jnp.shape, nnx.to_pure_dict(state)) == jax.tree.map(jnp.shape, v["params"])
        nnx.replace_by_pure_dict(state, v["params"])
        nnx.update(m, state)
        np.testing.assert_allclose(m(x), lin.apply(v, x), rtol=1e-5, atol=1e-6)
    # LeCun variance of the equivalent dense weight (1 / in_features), as a Flax Dense kernel
    specs = layer_specs.factorized_linear_specs((8, 8), (8, 8), "tt", 16)
    w = tensorized.factorized_linear_weight({k: f(jax.random.key(i), s) for i, (k, (s, f)) in enumerate(specs.items())})
    assert 0.5 / 64 < float(jnp.var(w)) < 2.0 / 64
    with pytest.raises(ValueError, match="as many input as output modes"):
        nnx_layers.FactorizedLinear((2, 3), (6,), factorization="tt", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="factorization='svd'"):
        nnx_layers.FactorizedLinear((2, 3), (6,), factorization="svd", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tensor_dropout=1.0"):
        nnx_layers.FactorizedLinear((2, 3), (3, 2), factorization="tt", tensor_dropout=1.0, rngs=nnx.Rngs(0))
    bad = dict(_linear_case("tt", (2, 3), (3, 2))[0])
    bad["core_1"] = bad["core_1"][:1]
    with pytest.raises(ValueError, match=r"params\['core_1'\]"):
        tensorized.factorized_linear(jnp.ones((1, 6)), bad)


def test_tcl_matches_tensorly_multi_mode_dot():
    x = RNG.normal(size=(2, 3, 4, 5, 6)).astype(np.float32)  # (B, T, d1, d2, d3): per-frame contraction
    lin = layers.TCL(rank=(2, 3, 2), use_bias=True)
    v = lin.init(jax.random.key(0), x)
    p = jax.tree.map(np.asarray, v["params"]) | {"bias": RNG.normal(size=(2, 3, 2)).astype(np.float32)}
    want = tenalg.multi_mode_dot(x, [p[f"factor_{i}"].T for i in range(3)], modes=[2, 3, 4]) + p["bias"]
    np.testing.assert_allclose(lin.apply({"params": p}, x), want, rtol=1e-4, atol=1e-5)
    m = nnx_layers.TCL((4, 5, 6), (2, 3, 2), use_bias=True, rngs=nnx.Rngs(0))
    state = nnx.state(m, nnx.Param)
    nnx.replace_by_pure_dict(state, p)
    nnx.update(m, state)
    np.testing.assert_allclose(m(x), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="x: got shape"):
        m(x[..., :5])


@pytest.mark.parametrize("ks,stride,padding,dilation", [
    ((3, 3), (2, 1), ((1, 1), (0, 2)), (1, 2)),
    ((3, 2), 1, "SAME", 1),
    ((3,), 2, 1, 1),
])
def test_tt_conv_matches_dense_conv_of_tensorly_kernel(ks, stride, padding, dilation):
    n = len(ks)
    x = RNG.normal(size=(2,) + (9, 8)[:n] + (3,)).astype(np.float32)
    bonds = (1,) + (4, 3, 5)[: n + 1] + (1,)
    dims = (3,) + ks + (6,)
    cores = [RNG.normal(size=(bonds[i], d, bonds[i + 1])) for i, d in enumerate(dims)]
    params = _f32({f"core_{i}": c for i, c in enumerate(cores)})
    kernel = np.moveaxis(tl.tt_to_tensor(cores), 0, -2).astype(np.float32)  # (*K, C_in, C_out)
    s, d = (stride,) * n if isinstance(stride, int) else stride, (dilation,) * n if isinstance(dilation, int) else dilation
    pads = {"SAME": "SAME", 1: [(1, 1)] * n}.get(padding, padding) if not isinstance(padding, tuple) else padding
    spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[n]
    want = jax.lax.conv_general_dilated(x, kernel, s, pads, rhs_dilation=d, dimension_numbers=spec)
    for impl in ("factorized", "reconstructed"):
        y = conv.tt_conv(x, params, stride=stride, padding=padding, dilation=dilation, implementation=impl)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-3)
    # bf16 cores with an f32 x compute in float32 (the kernel is not rebuilt in bf16)
    p16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    k16 = np.moveaxis(tl.tt_to_tensor([np.asarray(p16[f"core_{i}"], np.float32) for i in range(len(cores))]), 0, -2)
    want16 = jax.lax.conv_general_dilated(x, k16, s, pads, rhs_dilation=d, dimension_numbers=spec,
                                          precision=jax.lax.Precision.HIGHEST)
    for impl in ("factorized", "reconstructed"):
        y = conv.tt_conv(x, p16, stride=stride, padding=padding, dilation=dilation, implementation=impl)
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(y, want16, rtol=1e-4, atol=1e-3, err_msg=impl)
    if padding == "SAME" or n == 1:
        return  # the layers once, on the strided, dilated 2-D case
    lin = layers.TTConv(6, ks, rank=bonds[1:-1], stride=stride, padding=padding, dilation=dilation)
    assert jax.tree.map(jnp.shape, lin.init(jax.random.key(0), x)["params"]) == jax.tree.map(jnp.shape, params)
    m = nnx_layers.TTConv(3, 6, ks, rank=bonds[1:-1], stride=stride, padding=padding, dilation=dilation, rngs=nnx.Rngs(0))
    state = nnx.state(m, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(m, state)
    np.testing.assert_allclose(m(x), lin.apply({"params": params}, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m(x), want, rtol=1e-4, atol=1e-3)


def test_tt_conv_validates_cores():
    params = {"core_0": jnp.ones((1, 3, 2)), "core_1": jnp.ones((2, 3, 2)), "core_2": jnp.ones((2, 4, 1))}
    with pytest.raises(ValueError, match="3 TT cores"):
        conv.tt_conv(jnp.ones((1, 5, 5, 3)), params)  # 2 spatial modes need 4 cores
    with pytest.raises(ValueError, match=r"params\['core_1'\]"):
        conv.tt_conv(jnp.ones((1, 5, 3)), params | {"core_1": jnp.ones((3, 3, 2))})
    with pytest.raises(ValueError, match=r"core_0"):
        conv.tt_conv(jnp.ones((1, 5, 4)), params)


def test_cp_tensor_dropout_masks_rank_components_and_keeps_expectation():
    params, w = _linear_case("cp", (2, 3), (4,))
    lam = np.asarray(params["lambda"])
    keys = jax.random.split(jax.random.key(0), 4000)
    lams = np.asarray(jax.vmap(lambda k: tensorized.cp_dropout(params, k, 0.25)["lambda"])(keys))
    kept = np.isclose(lams, lam / 0.75)
    assert np.all(kept | (lams == 0))  # each component is dropped whole or kept, scaled by 1 / (1 - p)
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(lams.mean(0), lam, rtol=0.06, atol=0.02)  # E[dropped] = weight
    dropped = tensorized.cp_dropout(params, keys[0], 0.25)
    off = np.flatnonzero(np.asarray(dropped["lambda"]) == 0)
    pruned = {k: (np.delete(np.asarray(v), off, axis=-1) if k != "bias" else v) for k, v in params.items()}
    w_kept = tl.cp_to_tensor((np.asarray(pruned["lambda"]) / 0.75, [pruned["factor_in_0"], pruned["factor_in_1"], pruned["factor_out_0"]]))
    np.testing.assert_allclose(tensorized.factorized_linear_weight(dropped), w_kept.reshape(6, 4), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="rate=1.0"):
        tensorized.cp_dropout(params, keys[0], 1.0)


def test_tucker_tensor_dropout_masks_core_slices_and_keeps_expectation():
    params, _ = _linear_case("tucker", (4, 6), (2, 5))
    core = np.asarray(params["core"])
    keys = jax.random.split(jax.random.key(1), 4000)
    cores = np.asarray(jax.vmap(lambda k: tensorized.tucker_dropout(params, k, 0.5)["core"])(keys))
    ratio = cores / core
    # each sample is core * (m_1 o m_2 o ...) with m_i in {0, 2}: an outer product of per-axis masks
    for r in ratio[:50]:
        masks = [np.any(r != 0, axis=tuple(j for j in range(r.ndim) if j != i)) for i in range(r.ndim)]
        want = np.ones_like(r) * 2.0 ** r.ndim
        for i, m in enumerate(masks):
            want = want * np.expand_dims(m, [j for j in range(r.ndim) if j != i])
        np.testing.assert_allclose(r, want, rtol=1e-5)
    np.testing.assert_allclose(cores.mean(0), core, rtol=0.35, atol=0.35)  # E = core (variance 2^4 - 1 per entry)
    assert abs(ratio.mean() - 1.0) < 0.1
    conv_core = {"core": jnp.ones((3, 3, 4, 5)), "factor_in": jnp.ones((2, 4)), "factor_out": jnp.ones((2, 5))}
    c = np.asarray(tensorized.tucker_dropout(conv_core, keys[0], 0.5, axes=(-2, -1))["core"])
    assert np.all(c == c[:1, :1])  # kernel taps are never dropped, only rank components


def test_tensor_dropout_validates_rate_and_axes():
    params, _ = _linear_case("cp", (2, 3), (4,))
    key = jax.random.key(0)
    for bad in ("0.3", None, float("nan"), -0.1, True, 1.0):
        with pytest.raises(ValueError, match="rate="):
            tensorized.cp_dropout(params, key, bad)
    # a traced rate is not checked (jit-friendly) and draws the same mask
    np.testing.assert_array_equal(jax.jit(tensorized.cp_dropout)(params, key, 0.25)["lambda"],
                                  tensorized.cp_dropout(params, key, 0.25)["lambda"])
    core2d = {"core": jnp.ones((2, 3))}
    for bad in ((5,), (2,), (-3,), (0, -2), (1, 1), (1.0,), (True,)):
        with pytest.raises(ValueError, match="axes="):
            tensorized.tucker_dropout(core2d, key, 0.5, axes=bad)
    c = np.asarray(tensorized.tucker_dropout(core2d, key, 0.5, axes=(-1,))["core"])
    assert np.all(c == c[:1]) and set(np.unique(c)) <= {0.0, 2.0}  # only the columns (axis 1) are masked


def test_tensor_dropout_in_layers_is_identity_when_deterministic():
    x = jnp.asarray(RNG.normal(size=(3, 12)), jnp.float32)
    lin = layers.FactorizedLinear((3, 4), (2, 2), rank=6, tensor_dropout=0.5)
    v = lin.init(jax.random.key(0), x)
    clean = x @ tensorized.factorized_linear_weight(v["params"]) + v["params"]["bias"]
    np.testing.assert_allclose(lin.apply(v, x), clean, rtol=1e-5, atol=1e-6)
    y1 = lin.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
    y2 = lin.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(y1, clean) and not np.allclose(y1, y2)
    m = nnx_layers.FactorizedLinear((3, 4), (2, 2), factorization="tucker", rank=3, tensor_dropout=0.2, rngs=nnx.Rngs(0, dropout=1))
    a, b = m(x), m(x)  # training mode: a fresh mask per call
    assert not np.allclose(a, b)
    m.eval()
    w = tensorized.factorized_linear_weight(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
    np.testing.assert_allclose(m(x), x @ w + m.bias[...], rtol=1e-5, atol=1e-6)


def test_tt_tensor_dropout_masks_inner_ranks_and_keeps_expectation():
    params, w = _linear_case("tt", (2, 3, 4), (3, 1, 2))  # inner ranks (3, 2)
    keys = jax.random.split(jax.random.key(2), 4000)
    ws = np.asarray(jax.vmap(lambda k: tensorized.factorized_linear_weight(tensorized.tt_dropout(params, k, 0.25)))(keys))
    np.testing.assert_allclose(ws.mean(0), w, rtol=0.1, atol=0.1 * np.abs(w).max())  # E[dropped] = weight
    one = tensorized.tt_dropout(params, keys[0], 0.25)
    for n, r in ((0, 3), (1, 2)):  # each inner rank is dropped whole or kept, scaled by 1 / (1 - p)
        ratio = np.asarray(one[f"core_{n}"]) / np.asarray(params[f"core_{n}"])
        assert ratio.shape[-1] == r and np.all(np.isclose(ratio, ratio[..., :1, :1, :1, :]) | (ratio == 0))
        assert np.all(np.isclose(ratio, 0) | np.isclose(ratio, 1 / 0.75))
    np.testing.assert_array_equal(one["core_2"], params["core_2"])


def test_bias_and_rank_shapes_are_checked_not_broadcast():
    """A (1,) bias broadcast silently and a wrong-length one failed in XLA; a TRL's mismatched ranks
    failed inside einsum (before: the raw 'Size of label' / broadcasting messages)."""
    from hocp_jax import regression

    x = jnp.ones((2, 3, 4))
    cp = {"factor_0": jnp.ones((3, 2)), "factor_1": jnp.ones((4, 2)), "factor_out": jnp.ones((5, 2)),
          "lambda": jnp.ones((2,))}
    assert regression.trl(x, cp | {"bias": jnp.zeros((5,))}, n_modes=2).shape == (2, 5)
    for bad, words in ((cp | {"bias": jnp.ones((1,))}, r"params\['bias'\]: got shape \(1,\), expected \(5,\)"),
                       (cp | {"factor_out": jnp.ones((5, 3))}, "have ranks \\[2, 3\\]"),
                       ({k: v for k, v in cp.items() if k != "lambda"} | {"core": jnp.ones((2, 2, 3))},
                        r"params\['core'\]: got shape \(2, 2, 3\), expected \(2, 2, 2\)")):
        with pytest.raises(ValueError, match=words):
            regression.trl(x, bad, n_modes=2)
    with pytest.raises(ValueError, match="n_modes=0"):
        regression.trl(x, cp, n_modes=0)
    t = {"factor_0": jnp.ones((3, 2)), "factor_1": jnp.ones((4, 5))}
    with pytest.raises(ValueError, match=r"params\['bias'\]: got shape \(1,\), expected \(2, 5\)"):
        tensorized.tcl(x, t | {"bias": jnp.ones((1,))})


def test_unknown_leaves_of_trl_linear_and_tcl_are_named():
    """Before: a misspelt 'bias', a CP-only 'factor_skip' or a leaf past the layer's modes was
    silently left out of the TRL, the factorized linear layer and the TCL."""
    from hocp_jax import regression

    x = jax.ShapeDtypeStruct((2, 3, 4), jnp.float32)
    cp_trl = {"factor_0": jnp.ones((3, 2)), "factor_1": jnp.ones((4, 2)), "factor_out": jnp.ones((5, 2)),
              "lambda": jnp.ones((2,)), "bias": jnp.ones((5,))}
    tucker_trl = {k: v for k, v in cp_trl.items() if k != "lambda"} | {"core": jnp.ones((2, 2, 2))}
    tcl = {"factor_0": jnp.ones((3, 2)), "factor_1": jnp.ones((4, 5)), "bias": jnp.ones((2, 5))}
    linear = {kind: _linear_case(kind, (2, 3), (3, 2))[0] | {"bias": jnp.ones((6,))} for kind in ("cp", "tucker", "tt")}
    trl = lambda x, p: regression.trl(x, p, n_modes=2)  # noqa: E731
    cases = [(trl, x, cp_trl), (trl, x, tucker_trl), (tensorized.tcl, x, tcl)]
    cases += [(tensorized.factorized_linear, jax.ShapeDtypeStruct((2, 6), jnp.float32), p) for p in linear.values()]
    for f, x_, p in cases:
        jax.eval_shape(f, x_, p)  # every leaf known: still runs
    for (f, x_, p), kind in zip(cases, ("CP TRL", "Tucker TRL", "TCL", "CP linear", "Tucker linear", "TT-matrix linear")):
        bais = {k if k != "bias" else "bais": v for k, v in p.items()}
        with pytest.raises(ValueError, match=rf"params: unknown {kind} leaves \['bais'\]; .*did you mean 'bias' for 'bais'"):
            jax.eval_shape(f, x_, bais)
        with pytest.raises(ValueError, match=rf"unknown {kind} leaves \['factor_skip'\]"):
            jax.eval_shape(f, x_, p | {"factor_skip": jnp.ones((3, 5))})
    for f, x_, p, extra in ((trl, x, cp_trl, "factor_2"), (tensorized.tcl, x, tcl, "factor_3"),
                            (tensorized.factorized_linear, cases[-1][1], linear["tt"], "core_3")):
        with pytest.raises(ValueError, match=rf"unknown .* leaves \['{extra}'\]"):  # past the modes / after a gap
            jax.eval_shape(f, x_, p | {extra: jnp.ones((2, 2))})
