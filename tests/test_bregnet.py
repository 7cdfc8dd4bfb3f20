"""BReG-Net: shortcut functions vs the paper's closed forms, units, model, loss, a short training run."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hocp_jax import losses
from hocp_jax.models import bregnet as B

# Inputs come from numpy; model keys use the "rbg" PRNG, whose initialisers compile several
# times faster on CPU than threefry's (init of the tiny nets: seconds instead of tens of seconds).
RNG_KEY = jax.random.key(0, impl="rbg")
GRID = np.concatenate([np.linspace(-50.0, 50.0, 2001), [-1e4, -300.0, 300.0, 1e4]]).astype(np.float32)


def _grad(fn, x):
    return np.asarray(jax.vmap(jax.grad(fn))(jnp.asarray(x)))


# --------------------------------------------------------------------------- shortcuts (Eq. 4)

def test_shortcut_values_match_closed_forms():
    x = np.linspace(-20, 20, 401)  # float64 numpy oracle
    np.testing.assert_allclose(B.h1(jnp.asarray(x, jnp.float32)), x - np.log(np.exp(x) + 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(B.h2(jnp.asarray(x, jnp.float32)), x * np.arctan(x) - 0.5 * np.log(x ** 2 + 1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(B.h3(jnp.asarray(x, jnp.float32)), np.arctan(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(B.identity(jnp.asarray(x, jnp.float32)), x.astype(np.float32))


def test_shortcut_derivatives_match_closed_forms():
    x = GRID.astype(np.float64)
    np.testing.assert_allclose(_grad(B.h1, GRID), 0.5 * (1 - np.tanh(x / 2)), rtol=1e-5, atol=1e-6)  # = 1/(1+e^x)
    np.testing.assert_allclose(_grad(B.h2, GRID), np.arctan(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_grad(B.h3, GRID), 1.0 / (1.0 + x ** 2), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(_grad(B.identity, GRID), 1.0)


def test_shortcut_derivatives_are_bounded_as_claimed():
    d1, d2, d3 = (_grad(f, GRID) for f in (B.h1, B.h2, B.h3))
    assert np.all(np.isfinite(np.stack([d1, d2, d3])))
    assert np.all((d1 >= 0) & (d1 <= 1))
    inner = np.abs(GRID) < 10  # float32 resolves the open interval (0, 1) here
    assert np.all((d1[inner] > 0) & (d1[inner] < 1))
    assert np.all(np.abs(d2) <= np.pi / 2) and np.abs(d2).max() > 1.5  # sup is approached
    assert np.all((d3 > 0) & (d3 <= 1)) and d3.max() == 1.0  # max at x = 0
    # H1 stays finite where the naive x - log(e^x + 1) overflows
    assert np.all(np.isfinite(np.asarray(B.h1(jnp.asarray(GRID)))))


def test_shortcut_registry_and_errors():
    assert set(B.SHORTCUTS) == {"identity", "h1", "h2", "h3"}
    assert B.shortcut_fn("h3") is B.h3
    with pytest.raises(ValueError, match="shortcut='h4'"):
        B.shortcut_fn("h4")


# --------------------------------------------------------------------------- units and model

def _model(name, tiny=True, **kwargs):
    cls, fields, tiny_fields = B.REGISTRY[name]
    return cls(**(fields | (tiny_fields if tiny else {}) | kwargs))


def _dense_conv(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shortcut,stride,projection", [
    ("identity", 1, "pad"), ("h2", 1, "pad"), ("h1", 2, "pad"), ("h3", 2, "conv"),
])
def test_unit_matches_independent_formula(shortcut, stride, projection):
    """y = relu(H(P(x)) + BN(conv(relu(BN(conv_s(x)))))) recomputed with lax convs, eval mode."""
    c_in, c_out = (4, 4) if stride == 1 else (4, 8)
    unit = B.BReGUnit(c_out, stride=stride, shortcut=shortcut, projection=projection)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 6, c_in)).astype(np.float32)
    # random values (non-trivial BN statistics and affine parameters) in the module's tree structure
    shapes = jax.eval_shape(unit.init, RNG_KEY, x)
    v = jax.tree.map(lambda a: rng.uniform(0.3, 1.0, a.shape).astype(np.float32) * rng.choice([-1, 1], a.shape)
                     if len(a.shape) == 4 else rng.uniform(0.3, 1.0, a.shape).astype(np.float32), shapes)
    y = jax.jit(unit.apply)(v, x)
    p, s = v["params"], v["batch_stats"]

    def bn(h, name):
        return (h - s[name]["mean"]) / np.sqrt(s[name]["var"] + 1e-5) * p[name]["scale"] + p[name]["bias"]

    f = np.maximum(bn(_dense_conv(x, p["conv1"]["kernel"], stride), "bn1"), 0)
    f = bn(_dense_conv(f, p["conv2"]["kernel"], 1), "bn2")
    if stride == 1:
        sc = x
    elif projection == "pad":
        sc = np.pad(np.asarray(x)[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (2, 2)))
    else:
        sc = bn(_dense_conv(x, p["proj_conv"]["kernel"], 2), "proj_bn")
    h = {"identity": lambda a: a, "h1": lambda a: a - np.log1p(np.exp(a)), "h3": np.arctan,
         "h2": lambda a: a * np.arctan(a) - 0.5 * np.log(a ** 2 + 1)}[shortcut]
    expected = np.maximum(h(np.asarray(sc, np.float64)) + f, 0)
    assert y.shape == (2, 6 // stride, 6 // stride, c_out)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_hocp_unit_uses_cp_convs():
    unit = B.BReGUnit(8, stride=2, conv="hocp", rank=5, shortcut="h2")
    y, v = jax.eval_shape(unit.init_with_output, RNG_KEY, jnp.zeros((1, 8, 8, 4)))
    conv1 = v["params"]["conv1"]
    assert set(conv1) == {"lambda", "factor_in", "factor_out", "factor_h", "factor_w"}
    assert conv1["factor_in"].shape == (4, 5) and conv1["factor_out"].shape == (8, 5)
    assert y.shape == (1, 4, 4, 8)


@pytest.mark.parametrize("name", ["bregnet39", "bregnet39_hocp"])
def test_tiny_forward_train_eval_jit(name):
    model = _model(name, head=dict(n_outputs=2, n_classes=10), **({"rank": 4} if "hocp" in name else {}))
    x = np.random.default_rng(0).uniform(size=(3, 16, 16, 1)).astype(np.float32)
    v = jax.jit(model.init)(RNG_KEY, x)
    assert set(v) == {"params", "batch_stats"}
    out, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    assert out["logits"].shape == (3, 10) and out["va"].shape == (3, 2)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), v["batch_stats"], upd["batch_stats"])
    assert all(jax.tree.leaves(changed))
    ev = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
    assert ev["logits"].shape == (3, 10) and not np.allclose(ev["logits"], out["logits"])  # running stats
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves((out, ev)))


def test_heads_select_outputs():
    x = jnp.zeros((2, 16, 16, 1))
    for head, keys in ((dict(n_outputs=0, n_classes=7), {"logits"}), (dict(n_outputs=2), {"va"})):
        out, v = jax.eval_shape(_model("bregnet39", head=head).init_with_output, RNG_KEY, x)
        assert set(out) == keys and set(v["params"]["head"]) == keys
    assert set(jax.eval_shape(_model("resnet110").init, RNG_KEY, x)["params"]) == {
        "stem_conv", "stem_bn", "layer1_0", "layer2_0", "layer3_0", "head"}


def _n_params(model, shape=(1, 48, 48, 1)):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))


def _dense_count(stage_sizes, widths, c_in, head_hidden, num_classes):
    """Independent count: 3x3 convs (no bias) + 2 BN params per channel + dense layers."""
    n = 9 * c_in * widths[0] + 2 * widths[0]  # stem
    prev = widths[0]
    for size, w in zip(stage_sizes, widths):
        for _ in range(size):
            n += 9 * prev * w + 9 * w * w + 4 * w
            prev = w
    feat = prev
    if head_hidden:
        n += feat * head_hidden + head_hidden
        feat = head_hidden
    return n + feat * num_classes + num_classes


def test_param_counts_and_depths():
    # BReG-Net-39 (7 FER classes, 48x48x1): 2,270,823 params; ResNet-110: 6,892,519
    # (the paper reports 4.9M and 7.2M, §IV-C; widths (32, 64, 128) are our choice, Fig. 4 not in the text).
    fer = dict(n_outputs=0, n_classes=7)
    assert _n_params(_model("bregnet39", False, head=fer)) == _dense_count((6, 6, 6), (32, 64, 128), 1, 256, 7)
    assert _n_params(_model("bregnet39", False, head=fer)) == 2_270_823
    assert _n_params(_model("resnet110", False, head=fer)) == _dense_count((18, 18, 18), (32, 64, 128), 1, None, 7)
    assert _n_params(_model("resnet110", False, head=fer)) == 6_892_519
    assert B.depth((6, 6, 6), 256) == 39 and B.depth((18, 18, 18)) == 110
    # the shortcut function has no parameters: H does not change the count
    assert _n_params(_model("bregnet39", shortcut="identity")) == _n_params(_model("bregnet39", shortcut="h3"))
    # HO-CP convs at the equal-parameter rank: no more parameters than the dense model
    hocp = _n_params(_model("bregnet39_hocp", False, head=fer))
    assert 0.95 * 2_270_823 < hocp <= 2_270_823


@pytest.mark.parametrize("kwargs,match", [
    (dict(shortcut="tanh"), "shortcut='tanh'"),
    (dict(projection="avg"), "projection='avg'"),
    (dict(conv="tucker"), "conv='tucker'"),
    (dict(stage_sizes=(1, 1), widths=(8, 16, 32)), "widths="),
    (dict(stage_sizes=(1, 0, 1)), "stage_sizes="),
    (dict(head_hidden=0), "head_hidden=0"),
    # were: TypeErrors (int not iterable, dtype not understood)
    (dict(widths=8), "widths=8: expected 3 ints"), (dict(stage_sizes=3), "stage_sizes=3: expected"),
    (dict(dtype="float99"), "dtype='float99': expected a floating dtype"),
    # HO-CP options: values checked whatever conv; on a dense net (no CPConv to take them) only their defaults
    (dict(rank=0), "rank=0: expected an int >= 1 or None"), (dict(psi="bn-relu"), "psi='bn-relu': expected one of"),
    (dict(skip="yes"), "skip='yes': expected True or False"),
    (dict(psi="relu"), "psi='relu' applies to HO-CP convs; conv='dense' has none"),
    (dict(rank_multiple=2), "rank_multiple=2 applies to HO-CP convs"),
])
def test_config_errors(kwargs, match):
    """A bad field raises when the net (or a unit of it) is built, not when it first runs."""
    with pytest.raises(ValueError, match=match):
        B.BReGNet(**{"stage_sizes": (1, 1, 1), "widths": (8, 16, 32), **kwargs})
    unit_fields = {"shortcut", "projection", "conv", "rank", "rank_multiple", "psi", "skip"}
    if set(kwargs) <= unit_fields:
        with pytest.raises(ValueError, match=match):
            B.BReGUnit(8, **kwargs)


def test_loss_metrics_are_weighted_means_for_fractional_masks_and_bad_weights_refused():
    """Dividing by max(sum(mask), 1) read mask weights 0.1, 0.1 as a fifth of the accuracy and MSE."""
    logits = jnp.array([[2, 0, 0], [0, 2, 0], [0, 0, 2], [2, 0, 0]], jnp.float32)
    batch = {"label": jnp.array([0, 1, 0, 1]), "va": jnp.ones((4, 2)), "mask": jnp.array([0.1, 0.1, 0, 0])}
    _, m = B.bregnet_loss({"logits": logits, "va": jnp.zeros((4, 2))}, batch)
    # oracle: the two weighted examples are both right, each misses va by 1 in both targets
    np.testing.assert_allclose([m["accuracy"], m["va_mse"]], [1.0, 1.0], rtol=1e-6)
    _, m0 = B.bregnet_loss({"logits": logits}, {"label": batch["label"], "mask": jnp.zeros(4)})
    assert float(m0["accuracy"]) == 0.0
    for kwargs, words in ((dict(va_weight=float("nan")), "va_weight=nan"), (dict(va_weight=-1.0), "va_weight=-1.0")):
        with pytest.raises(ValueError, match=re.escape(words)):
            B.bregnet_loss({"va": jnp.zeros((4, 2))}, {"va": jnp.ones((4, 2))}, **kwargs)
    with pytest.raises(ValueError, match=re.escape("batch['mask']: got a negative weight (-1.0)")):
        B.bregnet_loss({"va": jnp.zeros((4, 2))}, {"va": jnp.ones((4, 2)), "mask": -jnp.ones(4)})


def test_input_rank_and_pad_projection_errors():
    with pytest.raises(ValueError, match=r"x has shape \(8, 8, 1\).*\(batch, H, W, C\)"):
        jax.eval_shape(_model("bregnet39").init, jax.random.key(0), jnp.zeros((8, 8, 1)))
    with pytest.raises(ValueError, match="features=4 < input channels 8"):
        B.pad_projection(jnp.zeros((1, 4, 4, 8)), 4, 2)
    # shrinking width works with the conv projection
    model = B.BReGNet(stage_sizes=(1, 1), widths=(16, 8), projection="conv")
    assert jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))[0]["va"].shape == (1, 2)


# --------------------------------------------------------------------------- loss (§III-B) and training

def _np_ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), labels]


def test_class_weights_follow_fmin_over_f():
    counts = np.array([10, 40, 20, 5])
    np.testing.assert_allclose(losses.class_weights(counts), 5 / counts, rtol=1e-6)  # f_min / f_i
    np.testing.assert_array_equal(losses.class_weights(np.array([7, 7, 7])), 1.0)


def test_weighted_ce_equals_plain_ce_when_balanced():
    logits = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32) * 3
    labels = np.arange(12) % 3  # balanced: 4 per class
    batch = {"label": jnp.asarray(labels)}
    h = losses.class_weights(np.bincount(labels, minlength=3))
    weighted, m = B.bregnet_loss({"logits": logits}, batch, None, class_weights=h)
    plain, _ = B.bregnet_loss({"logits": logits}, batch, None)
    np.testing.assert_allclose(weighted, _np_ce(logits, labels).mean(), rtol=1e-5)
    np.testing.assert_allclose(plain, weighted, rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], np.mean(np.argmax(logits, -1) == labels))


def test_weighted_loss_with_skewed_classes_mask_and_va():
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 0])
    logits, va_pred = rng.normal(size=(10, 3)).astype(np.float32), rng.normal(size=(10, 2)).astype(np.float32)
    va = rng.uniform(-1, 1, (10, 2)).astype(np.float32)
    mask = np.array([1.0] * 8 + [0.0] * 2)  # a padded eval batch
    h = losses.class_weights(np.bincount(labels, minlength=3))  # f = (7, 2, 1) / 10 -> (1/7, 1/2, 1)
    np.testing.assert_allclose(h, [1 / 7, 1 / 2, 1], rtol=1e-6)
    loss_fn = functools.partial(B.bregnet_loss, class_weights=h, va_weight=0.5)
    loss, m = loss_fn({"logits": logits, "va": va_pred}, {"label": labels, "va": va, "mask": mask}, None)
    hn = np.array([1 / 7, 1 / 2, 1])
    ce = (hn[labels] * _np_ce(logits, labels))[:8].mean()  # Eq. 5 with H = diag(f_min / f_i), mean over valid
    mse = ((np.asarray(va_pred) - va) ** 2)[:8].mean()
    np.testing.assert_allclose(m["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(m["va_mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], np.mean((np.argmax(logits, -1) == labels)[:8]))
    np.testing.assert_allclose(loss, ce + 0.5 * mse, rtol=1e-5)
    with pytest.raises(ValueError, match="no term to compute"):
        B.bregnet_loss({"va": va_pred}, {"label": labels}, None)
    with pytest.raises(ValueError, match=r"batch\['mask'\]: got shape \(10, 2\), expected \(10,\)"):  # was: JAX's
        B.bregnet_loss({"va": va_pred}, {"va": va, "mask": np.ones((10, 2))}, None)  # broadcast_to error


def test_tiny_bregnet_trains_on_embedded_digits():
    from hocp_jax.data.embedded import make_digits_affect
    from hocp_jax.training.state import TrainState
    from hocp_jax.training.step import make_train_step

    data = make_digits_affect("train", 64)
    batch = {"image": jnp.asarray(data["image"], jnp.float32) / 255.0, "label": jnp.asarray(data["label"], jnp.int32),
             "va": jnp.asarray(data["va"])}
    model = _model("bregnet39", head=dict(n_outputs=2, n_classes=10))  # tiny: (1, 1, 1) units, H3
    tx = optax.adam(3e-3)
    variables = jax.jit(functools.partial(model.init, train=False))(RNG_KEY, batch["image"])
    state = TrainState.create(variables, tx, jax.random.key(1, impl="rbg"))
    h = losses.class_weights(np.bincount(data["label"], minlength=10))
    step = jax.jit(make_train_step(model, functools.partial(B.bregnet_loss, class_weights=h), tx))
    history = []
    for _ in range(25):
        state, metrics = step(state, batch)
        history.append(float(metrics["loss"]))
    assert np.all(np.isfinite(history))
    assert np.mean(history[-5:]) < 0.6 * history[0], history
    print("bregnet39 tiny, 25 adam steps, loss:", np.round(history[::6], 3))
