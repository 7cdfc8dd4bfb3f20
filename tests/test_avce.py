"""AVCE: feature views vs independent oracles, objectives, network sizes, a tiny training run."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from jax.test_util import check_grads

from hocp_jax.contrastive import (
    avce_objective, critic_matrix, discriminative_loss, infonce_objective, make_avce_loss, softmax_view, sparsemax,
)
from hocp_jax.data.embedded import make_digits_affect
from hocp_jax.models import get_model
from hocp_jax.models.avce import (
    AlexNetEncoder, Compressor, MLPHead, adaptive_avg_pool, avce_alexnet, avce_resnet18,
)
from hocp_jax.training import TrainState, make_train_step


def simplex_projection_sort(v):
    """Held et al. / Duchi et al. sorting algorithm, numpy float64, one vector."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    k = np.arange(1, len(v) + 1)
    rho = np.nonzero(u * k > css - 1)[0][-1]
    theta = (css[rho] - 1) / (rho + 1)
    return np.maximum(v - theta, 0)


def simplex_projection_scipy(v):
    res = scipy.optimize.minimize(
        lambda p: np.sum((p - v) ** 2), np.full_like(v, 1 / len(v)),
        jac=lambda p: 2 * (p - v), method="SLSQP", bounds=[(0, None)] * len(v),
        constraints=[{"type": "eq", "fun": lambda p: np.sum(p) - 1}],
        options={"ftol": 1e-14, "maxiter": 500})
    assert res.success
    return res.x


def count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- feature views

def test_sparsemax_matches_sorting_oracle():
    z = np.random.default_rng(0).normal(size=(3, 5, 9)).astype(np.float32) * 2
    for axis in (-1, 1):
        got = np.asarray(sparsemax(z, axis=axis))
        moved = np.moveaxis(z.astype(np.float64), axis, -1)
        want = np.apply_along_axis(simplex_projection_sort, -1, moved)
        np.testing.assert_allclose(got, np.moveaxis(want, -1, axis), atol=1e-6)


def test_sparsemax_sums_to_one_on_large_values_and_refuses_complex():
    """z near 1e4 in float32 summed to 1.00098 (the projection's threshold from large values);
    a complex z lost its imaginary part."""
    z = np.array([1e4, np.nextafter(np.float32(1e4), np.float32(2e4)), 1e4], np.float32)
    got = np.asarray(sparsemax(z), np.float64)
    want = simplex_projection_sort(z.astype(np.float64) - z.max())
    np.testing.assert_allclose(got.sum(), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="sparsemax: z has dtype complex64, expected real values"):
        sparsemax(np.array([1j, 2], np.complex64))
    with pytest.raises(ValueError, match="margin=nan: expected a real number >= 0"):
        discriminative_loss({k: np.ones((2, 3)) for k in ("latent", "sparse", "soft")}, margin=float("nan"))


def test_sparsemax_matches_scipy_minimize():
    for v in (np.array([0.3, -1.2, 0.9, 0.85, 0.1]), np.array([2.0, 1.9, -0.5, 1.5])):
        np.testing.assert_allclose(np.asarray(sparsemax(v.astype(np.float32))),
                                   simplex_projection_scipy(v), atol=1e-5)


def test_sparsemax_jacobian_matches_finite_differences():
    with jax.enable_x64(True):
        z = jnp.asarray(np.random.default_rng(1).normal(size=(4, 7)), jnp.float64)
        check_grads(sparsemax, (z,), order=1, modes=("fwd", "rev"), eps=1e-6)
        # manual central differences of the full Jacobian of one row
        f = lambda v: sparsemax(v)  # noqa: E731
        jac = np.asarray(jax.jacobian(f)(z[0]))
        eps = 1e-6
        fd = np.stack([(np.asarray(f(z[0] + eps * e)) - np.asarray(f(z[0] - eps * e))) / (2 * eps)
                       for e in np.eye(7)], axis=1)
        np.testing.assert_allclose(jac, fd, atol=1e-7)


def test_sparsemax_is_sparse_and_on_simplex():
    z = jnp.asarray([[5.0, 0.1, -1.0, 0.2, 4.5, 0.0], [0.0, 0.0, 9.0, 0.0, 0.0, 0.0]])
    p = np.asarray(sparsemax(z))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    assert (p >= 0).all()
    assert (p == 0).sum(-1).min() >= 4  # exact zeros for peaked inputs
    np.testing.assert_allclose(p[1], np.eye(6)[2])


def test_softmax_view_is_entropy_regularised_projection():
    z = np.array([0.5, -1.0, 2.0, 0.0])
    p = np.asarray(softmax_view(jnp.asarray(z, jnp.float32), temperature=0.5))
    np.testing.assert_allclose(p.sum(), 1.0, atol=1e-6)
    # independent: argmax <z, p>/T + H(p) over the simplex with scipy
    res = scipy.optimize.minimize(
        lambda q: -(q @ z / 0.5 - np.sum(q * np.log(q))), np.full(4, 0.25), method="SLSQP",
        bounds=[(1e-12, 1)] * 4, constraints=[{"type": "eq", "fun": lambda q: q.sum() - 1}],
        options={"ftol": 1e-14})
    np.testing.assert_allclose(p, res.x, atol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        softmax_view(z, temperature=0.0)


# --------------------------------------------------------------------------- objectives

def test_avce_objective_matches_loop_oracle():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(5, 5))
    a, b, g = 0.7, 0.01, 0.3
    pos = [scores[i, i] for i in range(5)]
    neg = [scores[i, j] for i in range(5) for j in range(5) if i != j]
    want = (np.mean(pos) - a * np.mean(neg) - b / 2 * np.mean(np.square(pos))
            - g / 2 * np.mean(np.square(neg)))
    got = avce_objective(jnp.asarray(scores, jnp.float32), alpha=a, beta=b, gamma=g)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    lme = [np.log(np.mean(np.exp(scores[i]))) for i in range(5)]
    np.testing.assert_allclose(infonce_objective(jnp.asarray(scores, jnp.float32)),
                               np.mean(np.array(pos) - lme), rtol=1e-5)


@pytest.mark.parametrize("objective", ["avce", "infonce"])
def test_loss_lower_for_aligned_pairs(objective):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = x + 0.1 * rng.normal(size=x.shape).astype(np.float32)
    shuffled = y[rng.permutation(16)]
    loss_fn = make_avce_loss(objective=objective, contrastive_weight=1.0, disc_weight=0.0)
    batch = {"va": np.zeros((16, 2), np.float32)}

    def loss(y_view):
        outputs = {"va": jnp.zeros((16, 2)), "z": {"sparse": x, "soft": y_view}}
        return loss_fn(outputs, batch, jax.random.key(0))

    (aligned, m_al), (mixed, m_sh) = loss(y), loss(shuffled)
    assert aligned < mixed - 0.3
    assert m_al["pos_score"] > 0.9 > m_sh["pos_score"]
    # the critic is the cosine similarity of the projections
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(critic_matrix(x, y), unit(x) @ unit(y).T, atol=1e-5)


def test_objective_input_validation():
    with pytest.raises(ValueError, match="objective"):
        make_avce_loss(objective="nce")
    # the loss's numbers are checked when it is made, not at the first traced step
    for kwargs, words in ((dict(contrastive_weight="0.1"), "contrastive_weight='0.1'"), (dict(alpha=-1.0), "alpha=-1.0"),
                          (dict(critic_temperature=0.0), "critic_temperature=0.0: expected a real number > 0")):
        with pytest.raises(ValueError, match=re.escape(words)):
            make_avce_loss(**kwargs)
    with pytest.raises(ValueError, match="temperature='1'"):  # was: TypeError from '>'
        softmax_view(jnp.ones((2, 3)), temperature="1")
    with pytest.raises(ValueError, match=r"disc: missing embeddings \['soft'\]"):  # was: KeyError
        discriminative_loss({"latent": jnp.ones((2, 3)), "sparse": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match=r"weights: got shape \(3,\), expected \(2,\)"):
        discriminative_loss({k: jnp.ones((2, 3)) for k in ("latent", "sparse", "soft")}, weights=jnp.ones(3))
    loss_fn = make_avce_loss()
    with pytest.raises(ValueError, match=r"outputs lack \['z', 'disc'\], got keys \['va'\]"):  # was: KeyError 'z'
        loss_fn({"va": jnp.zeros((2, 2))}, {"va": jnp.zeros((2, 2))})
    z = {"sparse": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match=r"outputs lack \[\"z\['soft'\]\"\]"):
        make_avce_loss(disc_weight=0.0)({"va": jnp.zeros((2, 2)), "z": z}, {"va": jnp.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"batch lacks 'va', got keys \['label'\]"):
        make_avce_loss(disc_weight=0.0)({"va": jnp.zeros((2, 2)), "z": {**z, "soft": z["sparse"]}},
                                        {"label": jnp.zeros(2)})
    with pytest.raises(ValueError, match="square"):
        avce_objective(jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="critic"):
        critic_matrix(jnp.ones((3, 2)), jnp.ones((3, 2)), critic="l2")


def _avce_outputs(n, k=2, seed=0):
    r = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)  # noqa: E731
    return {"va": f(n, k), "z": {"sparse": f(n, 4), "soft": f(n, 4)},
            "disc": {name: f(n, 3) for name in ("latent", "sparse", "soft")}}


def test_avce_loss_needs_2d_va_and_matches_numpy_mse():
    """1-D ``va`` once broadcast ``w[:, None] * (pred - target)^2`` to (N, N): an N times too large
    MSE and per-sample rmse_0..N-1 metrics."""
    out = _avce_outputs(4)
    loss_fn = make_avce_loss()
    with pytest.raises(ValueError, match=re.escape("outputs['va'] has shape (4,) and batch['va'] has shape (4,); "
                                                   "expected both (N, n_outputs)")):
        loss_fn({**out, "va": jnp.linspace(-1, 1, 4)}, {"va": jnp.zeros(4)})
    with pytest.raises(ValueError, match=re.escape("has shape (4, 1, 2)")):
        loss_fn({**out, "va": out["va"][:, None]}, {"va": jnp.zeros((4, 1, 2))})
    target, mask = np.linspace(-1, 1, 8).reshape(4, 2), np.array([1.0, 0.0, 2.0, 1.0])
    _, m = jax.jit(make_avce_loss(pcc_weight=0.0, ccc_weight=0.0, disc_weight=0.0))(out, {"va": target, "mask": mask})
    sq = (np.asarray(out["va"], np.float64) - target) ** 2
    mse_k = (mask[:, None] * sq).sum(0) / mask.sum()
    np.testing.assert_allclose(m["mse"], mse_k.sum(), rtol=1e-5)
    np.testing.assert_allclose([m["rmse_valence"], m["rmse_arousal"]], np.sqrt(mse_k), rtol=1e-5)


def np_avce(s, a=0.5, b=0.005, g=0.5):
    pos, neg = np.diagonal(s), s[~np.eye(len(s), dtype=bool)]
    return pos.mean() - a * neg.mean() - b / 2 * (pos**2).mean() - g / 2 * (neg**2).mean()


def np_infonce(s):
    return np.mean(np.diagonal(s) - np.log(np.exp(s).mean(1)))


@pytest.mark.parametrize("objective", ["avce", "infonce"])
def test_zero_weights_drop_samples_and_all_zero_gives_zero(objective):
    """A weight of 0 drops the sample (numpy objective of the submatrix); all weights 0 (an
    all-padding batch) gives 0 with finite gradients (infonce was NaN)."""
    fn = jax.jit(jax.value_and_grad({"avce": avce_objective, "infonce": infonce_objective}[objective]))
    scores = np.random.default_rng(4).normal(size=(4, 4)).astype(np.float32)
    keep = np.ix_([0, 2, 3], [0, 2, 3])
    want = {"avce": np_avce, "infonce": np_infonce}[objective](scores[keep].astype(np.float64))
    np.testing.assert_allclose(fn(scores, weights=np.array([1.0, 0.0, 1.0, 1.0]))[0], want, rtol=1e-5)
    value, grad = fn(scores, weights=np.zeros(4))
    assert float(value) == 0.0 and np.all(np.isfinite(grad))


def test_all_padding_batch_gives_a_finite_avce_loss():
    """``objective="infonce"`` gave a NaN loss for an all-zero mask; the bound, the
    discriminative term and the MSE are 0, the gradients finite."""
    loss_fn = make_avce_loss(objective="infonce", pcc_weight=0.0, ccc_weight=0.0)
    batch = {"va": jnp.zeros((4, 2)), "mask": jnp.zeros(4)}
    (loss, m), g = jax.jit(jax.value_and_grad(lambda o: loss_fn(o, batch), has_aux=True))(_avce_outputs(4))
    assert float(loss) == float(m["bound"]) == float(m["disc"]) == float(m["mse"]) == 0.0
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))


def test_negative_host_weights_raise():
    """Concrete weights are checked (under jit they are not read back: documented >= 0)."""
    scores, neg = jnp.eye(3), np.array([1.0, -1.0, 1.0])
    for fn in (avce_objective, infonce_objective):
        with pytest.raises(ValueError, match=re.escape("weights: got a negative weight (-1.0), expected bool or weights >= 0")):
            fn(scores, weights=neg)
    disc = {k: jnp.ones((3, 2)) for k in ("latent", "sparse", "soft")}
    with pytest.raises(ValueError, match=re.escape("weights: got a negative weight (-1.0)")):
        discriminative_loss(disc, weights=list(neg))


def test_critic_casts_integers_and_axis_must_be_an_int():
    x, y = np.arange(6).reshape(2, 3), np.arange(6, 12).reshape(2, 3)
    got = critic_matrix(x, y)  # was: "int32 not inexact" (cosine critic)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, unit(x) @ unit(y).T, rtol=1e-5)
    z = jnp.ones((2, 3))
    for fn in (sparsemax, softmax_view):
        for bad in (1.0, 2, -3, None):
            with pytest.raises(ValueError, match=re.escape(f"axis={bad!r}: expected an int in [-2, 2)")):
                fn(z, axis=bad)


# --------------------------------------------------------------------------- networks

def test_adaptive_avg_pool_matches_torch_bins():
    x = np.random.default_rng(4).normal(size=(2, 7, 1, 3)).astype(np.float32)
    got = np.asarray(adaptive_avg_pool(x, (3, 6)))
    bins = [(0, 3), (2, 5), (4, 7)]  # floor(i*7/3), ceil((i+1)*7/3)
    want = np.stack([x[:, s:e].mean(1) for s, e in bins], 1)
    want = np.repeat(want, 6, axis=2)  # a width of 1 is repeated into every bin
    np.testing.assert_allclose(got, want, atol=1e-6)


def abstract_params(module, shape, **kwargs):
    init = functools.partial(module.init, **kwargs)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(init, jax.random.key(0), x)["params"]


def test_parameter_counts_match_paper():
    # AlexNet convs: 3*64*121+64 + 64*192*25+192 + 192*384*9+384 + 384*256*9+256 + 256*256*9+256
    assert count(abstract_params(AlexNetEncoder(), (1, 224, 224, 3))) == 2_469_696
    assert count(abstract_params(Compressor(6, ()), (1, 6, 6, 256))) == 9216 * 32 + 32  # 294,944
    r18 = Compressor(1, (1000,))
    assert count(abstract_params(r18, (1, 7, 7, 512))) == 512 * 1000 + 1000 + 1000 * 32 + 32
    head = abstract_params(MLPHead(256, 2), (1, 32))
    assert count(head) == 32 * 256 + 256 + 2 * 256 + 256 * 2 + 2 == 9474 <= 10_000
    assert count(abstract_params(MLPHead(64, 8), (1, 32))) == 2760
    full = abstract_params(avce_alexnet(), (1, 224, 224, 3), train=False)
    assert set(full) == {"encoder", "compressor", "regressor", "projection", "additional"}
    assert count(full) == 2_469_696 + 294_944 + 2 * 9474 + 2760  # ~2.79M ("2.7M" in the paper)


@pytest.mark.parametrize("conv", ["dense2d", "hocp"])
def test_resnet18_backbones(conv):
    """The ResNet-18 / HO-CP ResNet-18 trunk of hocp_jax.models, without its head."""
    full = abstract_params(avce_resnet18(conv), (1, 224, 224, 3), train=False)
    assert count(full["compressor"]) == 545_032
    trunk = full["encoder"]["backbone"]
    assert "head" not in trunk and {"stem", "layer4_1"} <= set(trunk)
    if conv == "dense2d":  # torchvision resnet18 without its fc: 11,689,512 - 513,000
        assert count(trunk) == 11_176_512
    else:
        assert "factor_h" in trunk["layer1_0"]["conv1"]
    tiny = avce_resnet18(conv, backbone=dict(stage_sizes=(1, 1, 1, 1), widths=(8, 8, 16, 16)),
                         head_hidden=16)
    x = jax.ShapeDtypeStruct((3, 32, 32, 1), jnp.float32)
    variables = jax.eval_shape(functools.partial(tiny.init, train=False), jax.random.key(0), x)
    out = jax.eval_shape(functools.partial(tiny.apply, train=False), variables, x)
    assert out["va"].shape == (3, 2) and out["views"]["sparse"].shape == (3, 32)
    with pytest.raises(ValueError, match="conv"):
        avce_resnet18("dense3d")
    with pytest.raises(ValueError, match=re.escape("backbone: conv='hocp'; pass conv to avce_resnet18")):  # was: TypeError
        avce_resnet18(conv, backbone=dict(conv="hocp"))


def test_alexnet_takes_inputs_down_to_7x7():
    """conv1's 11x11 window (stride 4, padding 2) needs H, W >= 7; smaller was a TypeError from a slice."""
    model = avce_alexnet(widths=(8, 16, 16, 16, 16), head_hidden=16)
    assert abstract_params(model, (1, 7, 7, 1), train=False)["compressor"]["fc_latent"]["kernel"].shape == (36 * 16, 32)
    with pytest.raises(ValueError, match=re.escape("x has shape (1, 6, 7, 1); expected H, W >= 7")):
        abstract_params(model, (1, 6, 7, 1), train=False)


@pytest.mark.parametrize("field,value", [
    ("dropout_rate", 1.0), ("dropout_rate", -0.1), ("dropout_rate", "0.5"), ("latent_dim", 0),
    ("latent_dim", 8.0), ("proj_dim", 0), ("pool_size", 0), ("pool_size", -2), ("head_hidden", -1),
    ("n_outputs", 0), ("disc_dim", 0), ("compressor_hidden", (16, 0)),
    # were: a TypeError (int not iterable, dtype not understood); a truthy string applied the tanh
    ("compressor_hidden", 16), ("dtype", "float99"), ("param_dtype", "float99"), ("bounded", "no"),
])
def test_invalid_fields_raise(field, value):
    """A bad field raises when the model is built, not when it first runs."""
    with pytest.raises(ValueError, match="^" + re.escape(f"{field}={value!r}: expected")):
        avce_alexnet(widths=(8, 16, 16, 16, 16), **{field: value})


@pytest.fixture(scope="module")
def tiny():
    """A tiny AVCE (AL) and its variables for 32x32x1 digits (one jitted init)."""
    model = avce_alexnet(widths=(8, 16, 16, 16, 16), head_hidden=32, dropout_rate=0.1)
    init = jax.jit(functools.partial(model.init, train=False))
    return model, init(jax.random.key(0), jnp.zeros((2, 32, 32, 1)))


def test_outputs_and_gradients_finite(tiny):
    model, variables = tiny
    x = jnp.asarray(np.random.default_rng(5).uniform(size=(6, 32, 32, 1)), jnp.float32)
    batch = {"image": x, "va": jnp.zeros((6, 2))}
    loss_fn = make_avce_loss()

    @jax.jit
    def objective_and_grads(params):
        def objective(params):
            out, upd = model.apply({**variables, "params": params}, x, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
            return loss_fn(out, batch, jax.random.key(2))[0], (out, upd)
        return jax.grad(objective, has_aux=True)(params)

    grads, (out, upd) = objective_and_grads(variables["params"])
    assert out["va"].shape == (6, 2) and out["z"]["sparse"].shape == (6, 2)
    np.testing.assert_allclose(out["views"]["sparse"].sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(out["views"]["soft"].sum(-1), 1, atol=1e-5)
    assert set(upd) == {"batch_stats"}
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(optax.tree.norm(grads["projection"])) > 0
    assert float(optax.tree.norm(grads["encoder"])) > 0
    with pytest.raises(ValueError, match="AVCE: x has shape"):
        model.apply(variables, x[0], train=False)


def test_tiny_avce_trains_on_embedded_digits(tiny):
    model, variables = tiny
    data = make_digits_affect("train", 64)
    batch = {"image": data["image"].astype(np.float32) / 255.0, "va": data["va"]}
    tx = optax.adam(3e-3)
    state = TrainState.create(variables, tx, jax.random.key(1))
    step = jax.jit(make_train_step(model, make_avce_loss(), tx))
    losses, mses = [], []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        mses.append(float(metrics["mse"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert np.mean(mses[-3:]) < np.mean(mses[:3])


def test_sparsemax_empty_axis_and_bad_avce_alpha_beta_gamma_raise():
    with pytest.raises(ValueError, match="axis=-1.*empty"):
        sparsemax(jnp.ones((2, 0)))
    with pytest.raises(ValueError, match="axis=0.*empty"):
        sparsemax(jnp.ones((0, 3)), axis=0)
    scores = jnp.eye(3)
    for name in ("alpha", "beta", "gamma"):
        for bad in (float("nan"), -0.5, "0.5", None):
            with pytest.raises(ValueError, match=name):
                avce_objective(scores, **{name: bad})
    # traced weights are not checked (jit-friendly): J = 1 - 0.005 / 2 for the identity critic
    got = jax.jit(lambda a: avce_objective(scores, alpha=a))(0.5)
    np.testing.assert_allclose(got, 1.0 - 0.0025, rtol=1e-6)


def test_config_reads_the_supplementary_image_size(tmp_path, load_config):
    """configs/avce.py reads AffectNet's 224x224 builder config, on which the AlexNet conv stack
    ends at torchvision's 6x6 (55 -> 27 -> 13 -> 6 by conv/pool arithmetic); at the default 64x64
    crops it would end at 1x1."""
    from hocp_jax.data import pipeline
    config = load_config("avce", "alexnet")
    assert config.data.static == "affectnet/s224"
    builder = pipeline.get_builder(config.data.static, tmp_path)
    assert builder.info.features["image"].shape == (224, 224, 3)
    assert pipeline.get_builder("affectnet", tmp_path).info.features["image"].shape == (64, 64, 3)
    for size, out in ((224, 6), (64, 1)):
        y = jax.eval_shape(lambda x: AlexNetEncoder().init_with_output(jax.random.key(0), x)[0],
                           jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
        assert y.shape == (1, out, out, 256), (size, y.shape)


@pytest.mark.parametrize("name", [pytest.param("avce_alexnet", marks=pytest.mark.slow),
                                  pytest.param("avce_resnet18", marks=pytest.mark.slow), "avce_resnet18_hocp"])
def test_tangents_match_finite_differences(name, assert_tangents_match_central_differences):
    """``jax.jvp`` of a whole AVCE model w.r.t. its parameters (max-pools, CP convs, sparsemax and
    softmax views), in float64, against a central difference (as the other models' in
    ``tests/test_models.py``)."""
    rng = np.random.default_rng(1)
    got = assert_tangents_match_central_differences(get_model(name, tiny=True), rng.uniform(size=(2, 32, 32, 3)), rng)
    assert sum(bool(np.any(np.asarray(a) != 0)) for a in got) >= len(got) - 1  # a saturated sparse view may not move
