"""hocp_jax.losses against numpy/scipy oracles; finite gradients; shake-shake; weighted CE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import log_softmax
from scipy.stats import pearsonr

from hocp_jax import losses as L


def _va(n=48, seed=0):
    r = np.random.default_rng(seed)
    t = r.uniform(-1, 1, (n, 2)).astype(np.float32)
    p = (0.5 * t + 0.3 * r.normal(size=(n, 2)) + 0.1).astype(np.float32)
    return t, p


def np_ccc(t, p):
    return 2 * np.mean((t - t.mean()) * (p - p.mean())) / (t.var() + p.var() + (t.mean() - p.mean()) ** 2)


def np_terms(t, p):
    t, p = t.astype(np.float64), p.astype(np.float64)
    return {
        "l_rmse": sum(np.sqrt(np.mean((t[:, j] - p[:, j]) ** 2)) for j in range(2)),
        "l_pcc": 1 - np.mean([pearsonr(t[:, j], p[:, j]).statistic for j in range(2)]),
        "l_ccc": 1 - np.mean([np_ccc(t[:, j], p[:, j]) for j in range(2)]),
    }


def test_regression_losses_vs_oracle():
    t, p = _va()
    want = np_terms(t, p)
    np.testing.assert_allclose(L.rmse_loss(t, p), want["l_rmse"], rtol=1e-5)
    np.testing.assert_allclose(L.pcc_loss(t, p), want["l_pcc"], rtol=1e-5)
    np.testing.assert_allclose(L.ccc_loss(t, p), want["l_ccc"], rtol=1e-5)
    loss, terms = L.affect_loss(t, p, weights=(0.2, 0.3, 0.5))
    for k in want:
        np.testing.assert_allclose(terms[k], want[k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(loss, 0.2 * want["l_rmse"] + 0.3 * want["l_pcc"] + 0.5 * want["l_ccc"], rtol=1e-5)
    # unnormalised weights are divided by their sum; no key/weights = equal weights
    np.testing.assert_allclose(L.affect_loss(t, p, weights=(2, 3, 5))[0], loss, rtol=1e-6)
    np.testing.assert_allclose(L.affect_loss(t, p)[0], sum(want.values()) / 3, rtol=1e-5)


def test_masked_loss_ignores_padding():
    t, p = _va()
    mask = np.arange(48) < 30
    t_pad, p_pad = t.copy(), p.copy()
    t_pad[30:] = np.nan
    loss, terms = jax.jit(lambda a, b, m: L.affect_loss(a, b, mask=m))(t_pad, p_pad, mask)
    want = np_terms(t[:30], p[:30])
    for k in want:
        np.testing.assert_allclose(terms[k], want[k], rtol=1e-5, err_msg=k)
    g = jax.grad(lambda b: L.affect_loss(t_pad, b, mask=mask)[0])(p_pad)
    assert np.all(np.isfinite(g)) and np.all(g[30:] == 0)


def test_loss_gradients_match_finite_differences():
    t, p = _va(n=12)
    for fn in (L.rmse_loss, L.pcc_loss, L.ccc_loss):
        check_grads(lambda b: fn(t, b), (jnp.asarray(p),), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)
    # at constant predictions RMSE and CCC are differentiable (PCC is not: gradient 0 by convention)
    const = jnp.full_like(p, 0.2)
    for fn in (L.rmse_loss, L.ccc_loss):
        check_grads(lambda b: fn(t, b), (const,), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(jax.grad(lambda b: L.pcc_loss(t, b))(const), 0)


@pytest.mark.parametrize("case", ["constant_pred", "constant_equal", "zero_error", "n1", "n2", "zero_pred"])
def test_gradients_finite_on_degenerate_predictions(case, key):
    t, p = _va(n=16)
    if case == "constant_pred":
        p = np.full_like(p, 0.2)
    elif case == "constant_equal":
        t = p = np.full_like(p, 0.3)
    elif case == "zero_error":
        p = t.copy()
    elif case == "n1":
        t, p = t[:1], p[:1]
    elif case == "n2":
        t, p = t[:2], np.full_like(p[:2], 0.1)
    elif case == "zero_pred":
        p = np.zeros_like(p)
    for fn in (L.rmse_loss, L.pcc_loss, L.ccc_loss,
               lambda a, b: L.affect_loss(a, b, key=key)[0]):
        value, g = jax.jit(jax.value_and_grad(fn, argnums=1))(t, p)
        assert np.isfinite(value) and np.all(np.isfinite(g)), case
    if case == "constant_pred":
        # CCC (no sqrt) still pulls constant predictions towards the targets
        g = jax.grad(L.ccc_loss, argnums=1)(t, p)
        assert np.abs(np.asarray(g)).max() > 1e-3


def test_shake_shake_weights_change_and_sum_to_one(key):
    ws = np.stack([L.shake_shake_weights(k) for k in jax.random.split(key, 20)])
    assert ws.shape == (20, 3)
    np.testing.assert_allclose(ws.sum(1), 1, rtol=1e-6)
    assert np.all(ws >= 0) and np.all(ws <= 1)
    assert len({tuple(w) for w in ws.round(6)}) == 20  # a new draw every step
    assert np.all(ws.std(0) > 0.05)
    # the loss uses exactly these weights
    t, p = _va()
    k = jax.random.split(key, 20)[3]
    loss, terms = jax.jit(lambda a, b, kk: L.affect_loss(a, b, key=kk))(t, p, k)
    want = np_terms(t, p)
    np.testing.assert_allclose(loss, ws[3] @ np.array([want["l_rmse"], want["l_pcc"], want["l_ccc"]]), rtol=1e-5)
    with pytest.raises(ValueError, match="key"):
        L.affect_loss(t, p, key=k, weights=(1, 1, 1))
    with pytest.raises(ValueError, match="weights"):
        L.affect_loss(t, p, weights=(1, 1))


@pytest.mark.parametrize("weights", [(0, 0, 0), (1, -1, 0), (-1, -2, -3), (1, np.nan, 1), (1, np.inf, 0)])
def test_affect_loss_rejects_bad_weights(weights):
    t, p = _va()
    with pytest.raises(ValueError, match=r"weights: got \["):
        L.affect_loss(t, p, weights=weights)


def test_affect_loss_weights_traced_and_zero_entries():
    t, p = _va()
    want = np_terms(t, p)
    # a zero entry drops its term; traced weights (not checked) give the same value
    for fn in (L.affect_loss, jax.jit(L.affect_loss)):
        loss, _ = fn(t, p, weights=jnp.array([0.0, 1.0, 3.0]))
        np.testing.assert_allclose(loss, 0.25 * want["l_pcc"] + 0.75 * want["l_ccc"], rtol=1e-5)


def np_ce(logits, labels, h=None):
    ls = log_softmax(logits.astype(np.float64), axis=-1)
    ce = -ls[np.arange(len(labels)), labels]
    return np.mean(ce if h is None else h[labels] * ce)


def test_cross_entropy_vs_numpy():
    r = np.random.default_rng(1)
    logits = r.normal(size=(32, 7)).astype(np.float32)
    labels = r.integers(0, 7, 32)
    np.testing.assert_allclose(jax.jit(L.cross_entropy)(logits, labels), np_ce(logits, labels), rtol=1e-5)
    h = r.uniform(0.1, 1, 7).astype(np.float32)
    np.testing.assert_allclose(L.cross_entropy(logits, labels, class_weights=h), np_ce(logits, labels, h), rtol=1e-5)
    # masked rows (with an ignore label -1) do not count
    mask = np.arange(32) < 20
    labels_pad = np.where(mask, labels, -1)
    np.testing.assert_allclose(L.cross_entropy(logits, labels_pad, mask=mask, class_weights=h),
                               np_ce(logits[:20], labels[:20], h), rtol=1e-5)
    g = jax.grad(lambda z: L.cross_entropy(z, labels_pad, mask=mask))(logits)
    assert np.all(np.isfinite(g)) and np.all(g[20:] == 0)
    assert float(L.cross_entropy(logits, labels, mask=np.zeros(32, bool))) == 0.0
    with pytest.raises(ValueError, match="labels"):
        L.cross_entropy(logits, labels[:5])
    with pytest.raises(ValueError, match="class_weights"):
        L.cross_entropy(logits, labels, class_weights=np.ones(3))


@pytest.mark.parametrize("bad", [7, -1, 100])
def test_cross_entropy_rejects_unmasked_out_of_range_labels(bad):
    r = np.random.default_rng(3)
    logits = r.normal(size=(10, 7)).astype(np.float32)
    labels = r.integers(0, 7, 10)
    labels[4] = bad
    with pytest.raises(ValueError, match=rf"labels: got \[{bad}\] \(unmasked\), expected classes in \[0, 7\)"):
        L.cross_entropy(logits, labels)
    with pytest.raises(ValueError, match="labels"):
        L.cross_entropy(logits, labels, mask=np.arange(10) != 3)  # masks another row
    # masked there: fine, and equal to numpy CE over the other rows
    keep = np.arange(10) != 4
    np.testing.assert_allclose(L.cross_entropy(logits, labels, mask=keep), np_ce(logits[keep], labels[keep]),
                               rtol=1e-5)


def test_class_weights_follow_fmin_over_f():
    counts = np.array([10, 40, 5, 0, 20])
    np.testing.assert_allclose(L.class_weights(counts), [0.5, 0.125, 1.0, 1.0, 0.25])
    np.testing.assert_allclose(L.class_weights(counts / counts.sum()), L.class_weights(counts))  # frequencies
    np.testing.assert_allclose(jax.jit(L.class_weights)(counts), [0.5, 0.125, 1.0, 1.0, 0.25])
    with pytest.raises(ValueError, match="counts"):
        L.class_weights(np.array([3, -1]))
    with pytest.raises(ValueError, match="counts"):
        L.class_weights(np.ones((2, 2)))
    with pytest.raises(ValueError, match="n=0"):  # was: an empty weight vector
        L.shake_shake_weights(jax.random.key(0), 0)
    with pytest.raises(ValueError, match=r"counts: got \[ 1. nan\]"):  # was: weights [1, 1]
        L.class_weights(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="class_weights: got"):  # a negative weight rewards the error
        L.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]), class_weights=np.array([1.0, -1.0, 1.0]))


def test_weighted_ce_equals_plain_ce_on_balanced_classes():
    r = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 6)  # balanced training split
    h = L.class_weights(np.bincount(labels, minlength=4))
    np.testing.assert_array_equal(h, np.ones(4))
    logits = r.normal(size=(24, 4)).astype(np.float32)
    np.testing.assert_allclose(L.cross_entropy(logits, labels, class_weights=h),
                               L.cross_entropy(logits, labels), rtol=1e-7)
    # imbalanced: rare-class errors weigh more
    h = L.class_weights(np.array([90, 10, 10, 10]))
    np.testing.assert_allclose(L.cross_entropy(logits, labels, class_weights=h),
                               np_ce(logits, labels, np.asarray(h)), rtol=1e-5)


def test_cross_entropy_rejects_negative_mask_weights():
    logits, labels = np.zeros((3, 4), np.float32), np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"mask: got a negative weight \(-1.0\)"):
        L.cross_entropy(logits, labels, mask=np.array([1.0, -1.0, 1.0]))


def test_bad_masks_keys_and_counts_are_refused():
    """Each was accepted: a NaN mask read as "all padding" (CE 0), an infinite count as no class
    weight, or raised JAX's TypeError (a key 3 or None)."""
    logits, labels = np.zeros((3, 4), np.float32), np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"mask: got a non-finite weight \(nan\)"):
        L.cross_entropy(logits, labels, mask=np.full(3, np.nan))
    with pytest.raises(ValueError, match=r"counts: got \[ 1. inf\], expected finite counts >= 0"):
        L.class_weights([1, np.inf])
    t, p = _va()
    for bad in (3, None):
        with pytest.raises(ValueError, match=f"key={bad!r}: expected a PRNG key"):
            L.shake_shake_weights(bad)
    with pytest.raises(ValueError, match="key=3: expected a PRNG key"):
        L.affect_loss(t, p, key=3)
    L.affect_loss(t, p, key=jax.random.PRNGKey(0))  # a legacy uint32 key is one too


def test_regression_losses_need_equal_real_inputs():
    """Like the metrics: (n,) against (n, 1) or complex values raise instead of broadcasting."""
    t, p = _va()
    for fn in (L.rmse_loss, L.pcc_loss, L.ccc_loss, L.affect_loss):
        with pytest.raises(ValueError, match=r"y_pred: got shape \(48, 1\), expected the shape of y_true \(48,\)"):
            fn(t[:, 0], p[:, :1])
        with pytest.raises(ValueError, match="y_true: got dtype complex64, expected real values"):
            fn(t.astype(np.complex64), p)
