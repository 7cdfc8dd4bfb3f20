"""hocp_jax.metrics against independent numpy / scipy / scikit-learn / krippendorff oracles."""
import itertools
import re
import warnings

import jax
import jax.numpy as jnp
import krippendorff
import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn import metrics as skm

from hocp_jax import metrics as M

ATOL = 2e-5  # float32 vs float64 oracles


# ---------------------------------------------------------------- oracles (float64 numpy)

def np_rmse(t, p):
    return np.sqrt(np.mean((t - p) ** 2))


def np_sagr(t, p):
    return np.mean(np.sign(t) == np.sign(p))  # sign(0) = 0


def np_pcc(t, p):
    if np.ptp(t) == 0 or np.ptp(p) == 0:
        return 0.0  # convention: PCC = 0 when a variance is 0
    return pearsonr(t, p).statistic


def np_ccc(t, p):
    mt, mp = t.mean(), p.mean()
    den = t.var() + p.var() + (mt - mp) ** 2
    if den == 0:
        return 1.0  # convention: identical constant signals
    return 2 * np.mean((t - mt) * (p - mp)) / den


ORACLES = {"rmse": np_rmse, "sagr": np_sagr, "pcc": np_pcc, "ccc": np_ccc}


def oracle(t, p):
    """Dict of oracle values, columns of (n, k) -> (k,)."""
    t, p = np.asarray(t, np.float64), np.asarray(p, np.float64)
    if t.ndim == 1:
        return {k: f(t, p) for k, f in ORACLES.items()}
    return {k: np.array([f(t[:, j], p[:, j]) for j in range(t.shape[1])]) for k, f in ORACLES.items()}


def _cases():
    r = np.random.default_rng(0)
    t = r.uniform(-1, 1, 64).astype(np.float32)
    noisy = (0.6 * t + 0.3 * r.normal(size=64)).astype(np.float32)
    zeros_t = np.round(t * 2) / 2  # values in {-1, -0.5, 0, 0.5, 1}, many zeros
    zeros_p = np.round(noisy * 2) / 2
    t2 = r.normal(size=2).astype(np.float32)
    return {
        "random": (t, noisy),
        "shifted": (t, t + 0.4),
        "scaled": (t, 2.5 * t),
        "negated": (t, -t),
        "shifted_scaled": (t, 0.3 * noisy - 0.2),
        "zeros": (zeros_t, zeros_p),
        "zeros_vs_continuous": (zeros_t, noisy),
        "all_zero_pred": (t, np.zeros_like(t)),
        "constant_pred": (t, np.full_like(t, 0.2)),
        "constant_truth": (np.full_like(t, -0.3), noisy),
        "constant_equal": (np.full_like(t, 0.1), np.full_like(t, 0.1)),
        "constant_different": (np.full_like(t, 0.1), np.full_like(t, 0.5)),
        "n1": (t[:1], noisy[:1]),
        "n1_equal": (t[:1], t[:1]),
        "n2": (t2, np.float32([0.1, -0.4])),
        "n2_anti": (t2, -t2),
        "n2_equal_values": (np.float32([0.5, 0.5]), np.float32([0.5, 0.5])),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_batch_metrics_vs_oracle(name):
    t, p = CASES[name]
    want = oracle(t, p)
    got = M.regression_metrics(t, p)
    for k in ORACLES:
        assert np.isfinite(got[k]), (name, k)
        np.testing.assert_allclose(got[k], want[k], atol=ATOL, err_msg=f"{name}/{k}")
    # single-metric functions, and jit
    for k, fn in (("rmse", M.rmse), ("sagr", M.sagr), ("pcc", M.pcc), ("ccc", M.ccc)):
        np.testing.assert_allclose(jax.jit(fn)(t, p), want[k], atol=ATOL, err_msg=f"{name}/{k}")


def test_sign_of_zero_agrees_only_with_zero():
    t = np.float32([0.0, 0.0, 0.0, 1.0, -1.0])
    p = np.float32([0.0, 0.1, -0.1, 0.0, -2.0])
    np.testing.assert_allclose(M.sagr(t, p), 2 / 5)


@pytest.mark.parametrize("name", ["random", "zeros", "constant_pred", "n2"])
def test_multi_target_columns(name):
    t1, p1 = CASES[name]
    t = np.stack([t1, -t1 * 0.5 + 0.1], 1)
    p = np.stack([p1, p1[::-1]], 1)
    got = M.regression_metrics(t, p)
    want = oracle(t, p)
    for k in ORACLES:
        assert got[k].shape == (2,)
        np.testing.assert_allclose(got[k], want[k], atol=ATOL, err_msg=k)


def test_mask_drops_padding_even_nan():
    t, p = CASES["random"]
    mask = np.arange(64) < 40
    t_pad, p_pad = t.copy(), p.copy()
    t_pad[40:], p_pad[40:] = np.nan, 1e6
    got = jax.jit(M.regression_metrics)(t_pad, p_pad, mask)
    want = oracle(t[:40], p[:40])
    for k in ORACLES:
        np.testing.assert_allclose(got[k], want[k], atol=ATOL, err_msg=k)
    # a per-target (n, k) mask
    tk, pk = np.stack([t, t], 1), np.stack([p, p], 1)
    mk = np.stack([mask, np.arange(64) < 10], 1)
    got = M.regression_metrics(tk, pk, mk)
    for k in ORACLES:
        np.testing.assert_allclose(got[k], [want[k], oracle(t[:10], p[:10])[k]], atol=ATOL, err_msg=k)


def test_integer_weights_equal_repeated_samples():
    t, p = CASES["random"]
    w = np.random.default_rng(1).integers(0, 4, size=t.shape)
    got = M.regression_metrics(t, p, w.astype(np.float32))
    want = oracle(np.repeat(t, w), np.repeat(p, w))
    for k in ORACLES:
        np.testing.assert_allclose(got[k], want[k], atol=ATOL, err_msg=k)


def test_all_masked_is_zero_not_nan():
    t, p = CASES["random"]
    got = M.regression_metrics(t, p, np.zeros(64, bool))
    assert all(float(v) == 0 for v in got.values())
    assert all(float(v) == 0 for v in M.finalize(M.affect_stats(t, p, np.zeros(64, bool))).values())


def test_weighted_mean_vs_numpy_average():
    rng = np.random.default_rng(3)
    v, w = rng.normal(size=(6, 3)), rng.uniform(0.01, 0.2, size=(6, 3))  # fractional weights
    np.testing.assert_allclose(M.weighted_mean(v, w), np.average(v, weights=w), rtol=1e-5)
    np.testing.assert_allclose(M.weighted_mean(v, w, 0), np.average(v, axis=0, weights=w), rtol=1e-5)
    col = w[:, :1]  # broadcast: one weight per row
    np.testing.assert_allclose(M.weighted_mean(v, col, 0), np.average(v, axis=0, weights=col[:, 0]), rtol=1e-5)
    zero = np.zeros_like(w)
    assert float(M.weighted_mean(v, zero)) == 0.0
    g = jax.grad(lambda x: M.weighted_mean(x, zero))(jnp.asarray(v, jnp.float32))
    assert np.isfinite(np.asarray(g)).all() and not np.asarray(g).any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["y_pred", "y_true"])
def test_a_non_finite_valid_sample_makes_every_metric_nan(bad, where):
    """A diverged model's NaN outputs must not read as RMSE 0 / PCC 0 (the safe sqrt and
    division would give those); batch, jitted and streamed (merged with a clean batch) alike,
    the losses too. The same value in a masked-out row changes nothing (test above)."""
    from hocp_jax import losses

    t, p = (np.array(a, np.float32) for a in CASES["random"])
    (p if where == "y_pred" else t)[5] = bad
    for got in (M.regression_metrics(t, p), jax.jit(M.regression_metrics)(t, p),
                M.finalize(M.merge(M.affect_stats(*CASES["random"]), M.affect_stats(t, p)))):
        assert all(np.isnan(float(v)) for v in got.values()), got
    assert np.isnan(float(losses.rmse_loss(t, p))) and np.isnan(float(losses.pcc_loss(t, p)))


def test_empty_input_raises():
    with pytest.raises(ValueError, match=r"y_true: got shape \(0,\), expected n >= 1"):
        M.ccc(np.zeros(0), np.zeros(0))


def test_invalid_shapes_raise():
    with pytest.raises(ValueError, match="y_pred"):
        M.rmse(np.zeros(4), np.zeros(5))
    with pytest.raises(ValueError, match="y_true"):
        M.rmse(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="mask"):
        M.rmse(np.zeros((4, 2)), np.zeros((4, 2)), np.ones(3))
    # float predictions: one_hot counted only the exact-integer ones (was: a silently short matrix)
    with pytest.raises(ValueError, match="preds: got dtype float32, expected integer classes"):
        M.confusion_matrix(np.array([0, 1, 2]), np.array([0.2, 1.7, 2.0], np.float32), 3)
    with pytest.raises(ValueError, match="cm: got .*expected a confusion matrix of counts >= 0"):  # was: accuracy 1.5
        M.accuracy(np.array([[1, -1], [0, 2]]))
    with pytest.raises(ValueError, match=r"stats\[1\]: got dict, expected an AffectStats"):  # was: AttributeError
        M.merge(M.affect_stats(np.zeros(3), np.ones(3)), {})
    with pytest.raises(ValueError, match="seed=-1"):
        M.skew_normalized_metrics(np.array([0, 1]), np.array([0, 1]), 2, seed=-1)


# ---------------------------------------------------------------- streaming

@pytest.mark.parametrize("name", ["random", "shifted_scaled", "zeros", "constant_pred", "constant_equal"])
def test_streaming_uneven_batches_equal_one_shot(name):
    t1, p1 = CASES[name]
    t = np.stack([t1, 0.5 * t1[::-1]], 1)
    p = np.stack([p1, p1[::-1]], 1)
    bounds = [0, 7, 8, 28, 41, 64]  # batches of 7, 1, 20, 13, 23
    stats = M.AffectStats.zeros(k=2)
    step = jax.jit(lambda s, tb, pb: M.merge(s, M.affect_stats(tb, pb)))
    for a, b in zip(bounds[:-1], bounds[1:]):
        stats = step(stats, t[a:b], p[a:b])
    got = jax.jit(M.finalize)(stats)
    one_shot = M.regression_metrics(t, p)
    want = oracle(t, p)
    for k in ORACLES:
        np.testing.assert_allclose(got[k], one_shot[k], atol=1e-6, err_msg=k)
        np.testing.assert_allclose(got[k], want[k], atol=ATOL, err_msg=k)


def test_streaming_padded_batches_and_psum_over_devices():
    t, p = CASES["random"]
    # 4 "devices", each with a padded shard of 16 rows of which a variable number is valid
    valid = np.array([16, 3, 11, 9])
    mask = np.arange(16)[None] < valid[:, None]
    tt, pp = t.reshape(4, 16), p.reshape(4, 16)
    summed = jax.vmap(lambda a, b, m: M.psum(M.affect_stats(a, b, m), "d"), axis_name="d")(tt, pp, mask)
    got = M.finalize(jax.tree.map(lambda x: x[0], summed))
    want = oracle(tt[mask], pp[mask])
    for k in ORACLES:
        np.testing.assert_allclose(got[k], M.regression_metrics(tt[mask], pp[mask])[k], atol=1e-6, err_msg=k)
        np.testing.assert_allclose(got[k], want[k], atol=ATOL, err_msg=k)
    # merge of several at once equals the psum: counts, centred sums and metrics (their means are
    # about different reference values: the first shard's and the largest shard's)
    merged = M.merge(*[M.affect_stats(tt[i], pp[i], mask[i]) for i in range(4)])
    for f in ("n", "m2_t", "m2_p", "c_tp", "mse", "sagr"):
        np.testing.assert_allclose(getattr(merged, f), getattr(summed, f)[0], rtol=1e-5, atol=1e-6, err_msg=f)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), M.finalize(merged), got)


def _oracle64(t, p):
    """PCC and CCC in float64 NumPy (population moments), the oracle of the offset tests below."""
    t, p = np.asarray(t, np.float64), np.asarray(p, np.float64)
    ct, cp = t - t.mean(), p - p.mean()
    cov = (ct * cp).mean()
    return {"pcc": cov / np.sqrt((ct ** 2).mean() * (cp ** 2).mean()),
            "ccc": 2 * cov / ((ct ** 2).mean() + (cp ** 2).mean() + (t.mean() - p.mean()) ** 2)}


def test_a_small_spread_about_a_large_offset_is_kept():
    """Values 1e4 + 0.01 z in float32 (about 10 ulps of spread): the zero-variance test read them
    as constant (PCC and CCC 0, against 0.9), and anti-correlated ones near 1e4 as constant and
    equal (CCC 1, "perfect agreement", with a zero gradient, against -1)."""
    r = np.random.default_rng(3)
    z, e = r.normal(size=1000), r.normal(size=1000)
    t = (1e4 + 0.01 * z).astype(np.float32)
    p = (1e4 + 0.01 * (0.7 * z + 0.3 * e)).astype(np.float32)
    want = _oracle64(t, p)
    assert want["pcc"] > 0.85
    step = jax.jit(lambda s, tb, pb: M.merge(s, M.affect_stats(tb, pb)))
    stats = M.AffectStats.zeros()
    for i in range(0, 1000, 100):
        stats = step(stats, t[i:i + 100], p[i:i + 100])
    for got in (M.regression_metrics(t, p), M.finalize(stats)):
        for k in ("pcc", "ccc"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, err_msg=k)
    t = np.array([1e4 - .004, 1e4 + .004, 1e4 - .002, 1e4 + .002], np.float32)
    p = 2 * np.float32(1e4) - t
    got = M.regression_metrics(t, p)
    np.testing.assert_allclose([got["pcc"], got["ccc"]], [-1.0, _oracle64(t, p)["ccc"]], rtol=1e-5)
    assert np.abs(jax.grad(lambda q: M.ccc(t, q))(jnp.asarray(p))).max() > 0


def test_streamed_one_sample_batches_stay_exact_at_a_large_offset():
    """Offset 1e5, sd 1, 200 batches of one sample merged one after another: the running mean of
    the raw values, rounded at every merge, read PCC 0.90166 against 0.90276."""
    r = np.random.default_rng(5)
    z = r.normal(size=200)
    t = (1e5 + z).astype(np.float32)
    p = (1e5 + 0.9 * z + 0.45 * r.normal(size=200)).astype(np.float32)
    step = jax.jit(lambda s, tb, pb: M.merge(s, M.affect_stats(tb, pb)))
    stats = M.AffectStats.zeros()
    for i in range(200):
        stats = step(stats, t[i:i + 1], p[i:i + 1])
    got, want = M.finalize(stats), _oracle64(t, p)
    for k in ("pcc", "ccc"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
    # the same set over 8 "devices" (psum), shards of 25
    summed = jax.vmap(lambda a, b: M.psum(M.affect_stats(a, b), "d"), axis_name="d")(t.reshape(8, 25), p.reshape(8, 25))
    got = M.finalize(jax.tree.map(lambda x: x[0], summed))
    for k in ("pcc", "ccc"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)


def test_masks_and_values_that_are_not_real_numbers_are_refused():
    """A NaN or infinite weight gave NaN metrics, a string mask NumPy's UFuncTypeError, strings as
    values JAX's TypeError."""
    t = np.array([0.1, 0.5, -0.3], np.float32)
    for mask, words in (([1, np.nan, 1], "non-finite weight (nan)"), ([1, np.inf, 1], "non-finite weight (inf)"),
                        ("abc", "mask: got dtype <U3, expected bool or real weights")):
        with pytest.raises(ValueError, match=re.escape(words)):
            M.regression_metrics(t, t, mask=mask)
    with pytest.raises(ValueError, match=re.escape("y_true: got dtype <U1, expected real values")):
        M.regression_metrics(["a"], ["a"])


def test_streaming_float32_does_not_drift_on_a_large_mean():
    """Mean 5, sd 0.05 in float32, 100 batches: streaming CCC == float64 numpy oracle.

    Raw power sums (E[x^2] - E[x]^2) lose the variance here (~1e-3 error in CCC);
    the centred (Chan) merge keeps the one-shot accuracy.
    """
    r = np.random.default_rng(7)
    t = 5 + 0.05 * r.normal(size=(100, 200, 2))
    p = t + 0.02 * r.normal(size=t.shape) + 0.01
    t32, p32 = t.astype(np.float32), p.astype(np.float32)
    step = jax.jit(lambda s, tb, pb: M.merge(s, M.affect_stats(tb, pb)))
    stats = M.AffectStats.zeros(k=2)
    for i in range(len(t32)):
        stats = step(stats, t32[i], p32[i])
    got = M.finalize(stats)
    tf, pf = t32.reshape(-1, 2).astype(np.float64), p32.reshape(-1, 2).astype(np.float64)
    mt, mp = tf.mean(0), pf.mean(0)
    cov = ((tf - mt) * (pf - mp)).mean(0)
    want = 2 * cov / (tf.var(0) + pf.var(0) + (mt - mp) ** 2)
    np.testing.assert_allclose(got["ccc"], want, atol=2e-5)
    np.testing.assert_allclose(got["pcc"], [np.corrcoef(tf[:, j], pf[:, j])[0, 1] for j in range(2)], atol=2e-5)
    # a tree-reduce (psum over 100 "devices") agrees too
    psummed = jax.vmap(lambda a, b: M.psum(M.affect_stats(a, b), "d"), axis_name="d")(t32, p32)
    np.testing.assert_allclose(M.finalize(jax.tree.map(lambda x: x[0], psummed))["ccc"], want, atol=2e-5)


def _psum_over(t, p, w):
    """Stats of ``(D, n)`` shards psummed over a vmapped axis of D "devices"."""
    summed = jax.vmap(lambda a, b, m: M.psum(M.affect_stats(a, b, m), "d"), axis_name="d")(t, p, w)
    return jax.tree.map(lambda x: x[0], summed)


def test_small_spread_against_the_mean_is_not_zeroed():
    """Predictions 0.2 + 1e-4 noise (sd/mean ~ 7e-4) in float32: PCC/CCC as float64 numpy, in
    one batch, merged and psummed (the zero-variance test once zeroed the streamed ones)."""
    r = np.random.default_rng(8)
    t = r.uniform(-1, 1, 1000).astype(np.float32)
    p = (0.2 + 1e-4 * (t + r.normal(size=1000))).astype(np.float32)
    want = oracle(t, p)
    assert want["pcc"] > 0.4
    merged = M.finalize(M.merge(M.affect_stats(t[:500], p[:500]), M.affect_stats(t[500:], p[500:])))
    psummed = M.finalize(_psum_over(t.reshape(8, 125), p.reshape(8, 125), np.ones((8, 125))))
    for got in (M.regression_metrics(t, p), merged, psummed):
        np.testing.assert_allclose(got["pcc"], want["pcc"], atol=1e-5)
        np.testing.assert_allclose(got["ccc"], want["ccc"], atol=1e-6)


def test_bfloat16_batch_with_an_outlying_first_row():
    """bfloat16, the first row (the batch's shift) 4 sd from the mean: PCC/CCC as numpy on the
    same bfloat16 values (the zero-variance test once zeroed both)."""
    r = np.random.default_rng(0)
    t = r.normal(size=256)
    p = 0.8 * t + 0.6 * r.normal(size=256)
    t[0], p[0] = 4.0, 3.5
    tb, pb = jnp.asarray(t, jnp.bfloat16), jnp.asarray(p, jnp.bfloat16)
    want = oracle(np.asarray(tb, np.float64), np.asarray(pb, np.float64))
    streamed = M.finalize(M.merge(M.affect_stats(tb[:100], pb[:100]), M.affect_stats(tb[100:], pb[100:])))
    for got in (M.regression_metrics(tb, pb), streamed):
        np.testing.assert_allclose(np.float32(got["pcc"]), want["pcc"], atol=2e-2)
        np.testing.assert_allclose(np.float32(got["ccc"]), want["ccc"], atol=2e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("c", [0.1, -0.3, 5.0, 123.456])
def test_constant_predictions_give_exactly_zero(dtype, c):
    """A constant prediction has PCC = CCC = 0 exactly: in one batch, merged over uneven
    batches and psummed over 1000 weighted shards (whose means are off by a few ulps)."""
    r = np.random.default_rng(9)
    t = jnp.asarray(r.uniform(-1, 1, (1000, 8)), dtype)
    p = jnp.full((1000, 8), c, dtype)
    w = jnp.asarray(r.uniform(0, 3, (1000, 8)) * (r.random((1000, 8)) < 0.8), dtype)
    flat_t, flat_p, flat_w = t.reshape(-1), p.reshape(-1), w.reshape(-1)
    merged = M.merge(*[M.affect_stats(flat_t[a:b], flat_p[a:b], flat_w[a:b])
                       for a, b in ((0, 7), (7, 8), (8, 3000), (3000, 8000))])
    for got in (M.regression_metrics(flat_t, flat_p, flat_w), M.finalize(merged), M.finalize(_psum_over(t, p, w))):
        assert float(got["pcc"]) == 0.0 and float(got["ccc"]) == 0.0


# ---------------------------------------------------------------- per sequence

def test_per_sequence_metrics_vs_loop():
    r = np.random.default_rng(2)
    B, T = 4, 9
    t = r.uniform(-1, 1, (B, T, 2)).astype(np.float32)
    p = (0.5 * t + 0.3 * r.normal(size=(B, T, 2))).astype(np.float32)
    lengths = np.array([9, 5, 0, 1])
    mask = np.arange(T)[None] < lengths[:, None]
    per_seq, mean = jax.jit(M.per_sequence_metrics)(t, p, mask)
    for k in ORACLES:
        want = np.zeros((B, 2))
        for b in range(B):
            if lengths[b]:
                want[b] = oracle(t[b, :lengths[b]], p[b, :lengths[b]])[k]
        np.testing.assert_allclose(per_seq[k], want, atol=ATOL, err_msg=k)
        np.testing.assert_allclose(mean[k], want[lengths > 0].mean(0), atol=ATOL, err_msg=k)
    _, mean1 = M.per_sequence_metrics(t[..., 0], p[..., 0])
    assert mean1["ccc"].shape == ()


# ---------------------------------------------------------------- categorical

def _sk(t, p, C):
    """scikit-learn / krippendorff oracles with the module's conventions (undefined -> 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kappa = skm.cohen_kappa_score(t, p, labels=range(C))
        if len(set(t) | set(p)) > 1:
            alpha = krippendorff.alpha(reliability_data=np.stack([t, p]).astype(float),
                                       level_of_measurement="nominal")
        else:
            alpha = 0.0  # a single value: undefined
        return {
            "accuracy": skm.accuracy_score(t, p),
            "f1": skm.f1_score(t, p, average="macro", zero_division=0),
            "ppv": skm.precision_score(t, p, average="macro", zero_division=0),
            "kappa": 0.0 if np.isnan(kappa) else kappa,
            "alpha": alpha,
            "mcc": skm.matthews_corrcoef(t, p),
            "f1_per_class": skm.f1_score(t, p, average=None, labels=range(C), zero_division=0),
            "ppv_per_class": skm.precision_score(t, p, average=None, labels=range(C), zero_division=0),
        }


def _cat_cases():
    r = np.random.default_rng(3)
    t = r.integers(0, 5, 80)
    imbalanced = r.choice(5, 120, p=[0.6, 0.2, 0.1, 0.07, 0.03])
    noisy = np.where(r.random(120) < 0.7, imbalanced, r.integers(0, 5, 120))
    return {
        "random": (t, r.integers(0, 5, 80)),
        "good": (t, np.where(r.random(80) < 0.8, t, r.integers(0, 5, 80))),
        "imbalanced": (imbalanced, noisy),
        "perfect": (t, t),
        "constant_pred": (t, np.zeros_like(t)),
        "absent_class": (t % 3, (t + 1) % 3),  # classes 3, 4 never occur
        "single_class_equal": (np.full(6, 2), np.full(6, 2)),
        "n1": (t[:1], t[1:2]),
        "n1_equal": (t[:1], t[:1]),
        "n2": (np.array([1, 3]), np.array([1, 0])),
    }


CAT_CASES = _cat_cases()


@pytest.mark.parametrize("name", list(CAT_CASES))
def test_categorical_metrics_vs_sklearn(name):
    t, p = CAT_CASES[name]
    cm = jax.jit(M.confusion_matrix, static_argnums=2)(t, p, 5)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(t, p, labels=range(5)))
    got = jax.jit(M.classification_metrics)(cm)
    want = _sk(t, p, 5)
    for k, v in want.items():
        assert np.all(np.isfinite(got[k])), (name, k)
        np.testing.assert_allclose(got[k], v, atol=1e-5, err_msg=f"{name}/{k}")
    np.testing.assert_allclose(M.f1(cm, average=None), want["f1_per_class"], atol=1e-6)
    np.testing.assert_allclose(M.ppv(cm), want["ppv"], atol=1e-6)


def test_confusion_matrix_mask_and_out_of_range():
    t, p = CAT_CASES["random"]
    mask = np.arange(80) % 3 != 0
    t_pad = np.where(mask, t, -1)  # ignore-label in padding
    cm = M.confusion_matrix(t_pad, p, 5, mask=mask)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(t[mask], p[mask], labels=range(5)))
    with pytest.raises(ValueError, match="num_classes"):
        M.confusion_matrix(t, p, 0)
    with pytest.raises(ValueError, match="cm"):
        M.accuracy(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="average"):
        M.f1(np.eye(3), average="micro")


def test_confusion_matrices_add_over_batches():
    t, p = CAT_CASES["imbalanced"]
    cm = sum(M.confusion_matrix(t[a:a + 50], p[a:a + 50], 5) for a in (0, 50, 100))
    got = M.classification_metrics(cm)
    for k, v in _sk(t, p, 5).items():
        np.testing.assert_allclose(got[k], v, atol=1e-5, err_msg=k)


def test_skew_normalized_equals_original_on_balanced_data():
    r = np.random.default_rng(4)
    t = np.repeat(np.arange(4), 15)
    p = np.where(r.random(60) < 0.6, t, r.integers(0, 4, 60))
    got = M.skew_normalized_metrics(t, p, 4, n_repeats=5, seed=1)
    for k, v in _sk(t, p, 4).items():
        np.testing.assert_allclose(got[k], v, atol=1e-5, err_msg=k)


def test_skew_normalized_accuracy_is_balanced_accuracy():
    r = np.random.default_rng(5)
    t = r.choice(5, 150, p=[0.6, 0.2, 0.1, 0.07, 0.03])
    p = np.where((t == 0) | (r.random(150) < 0.4), t, r.integers(0, 5, 150))  # majority always right
    got = M.skew_normalized_metrics(t, p, 5)  # 200 repeats
    # E[accuracy of a class-balanced sample] = mean per-class recall
    np.testing.assert_allclose(got["accuracy"], skm.balanced_accuracy_score(t, p), atol=0.02)
    assert abs(got["accuracy"] - skm.accuracy_score(t, p)) > 0.05  # the skew matters here
    again = M.skew_normalized_metrics(t, p, 5, seed=0)
    other = M.skew_normalized_metrics(t, p, 5, seed=1)
    assert all(np.array_equal(got[k], again[k]) for k in got)
    assert got["f1"] != other["f1"]


def test_skew_normalized_is_the_mean_of_the_balanced_draws_metrics():
    """Every metric is the expectation, over the class-balanced under-samples, of that sample's
    metric (not, e.g., the metric of the mean confusion matrix): here the draws can be enumerated
    (m = 2; class 0's 4 examples give 6 equally likely pairs) and scored with sklearn."""
    t = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 1, 2, 1, 0, 2, 2])
    draws = [_sk(t[list(pair) + [4, 5, 6, 7]], p[list(pair) + [4, 5, 6, 7]], 3)
             for pair in itertools.combinations(range(4), 2)]
    n = 20000
    got = M.skew_normalized_metrics(t, p, 3, n_repeats=n, seed=0)
    for k in ("accuracy", "f1", "ppv", "kappa", "alpha", "mcc", "f1_per_class"):
        values = np.array([d[k] for d in draws], np.float64)
        se = values.std(0) / np.sqrt(n)  # Monte-Carlo standard error of the mean of n draws
        np.testing.assert_allclose(got[k], values.mean(0), atol=float(np.max(4 * se)) + 1e-6, err_msg=k)
    # the metrics of the mean confusion matrix differ by more than those tolerances (about 0.004) here
    pooled = M.classification_metrics(sum(M.confusion_matrix(t[list(pair) + [4, 5, 6, 7]], p[list(pair) + [4, 5, 6, 7]], 3)
                                          for pair in itertools.combinations(range(4), 2)))
    for k in ("ppv", "alpha"):
        assert abs(float(pooled[k]) - np.mean([d[k] for d in draws])) > 0.015, k


def test_skew_normalized_validates():
    with pytest.raises(ValueError, match="labels"):
        M.skew_normalized_metrics(np.array([0, 5]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="n_repeats"):
        M.skew_normalized_metrics(np.array([0, 1]), np.array([0, 1]), 3, n_repeats=0)


def test_numpy_integers_accepted_as_counts():
    t, p = CAT_CASES["random"]
    C = np.int64(t.max() + 1)  # e.g. computed from the labels
    np.testing.assert_array_equal(M.confusion_matrix(t, p, C), skm.confusion_matrix(t, p, labels=range(5)))
    got = M.skew_normalized_metrics(t, p, C, n_repeats=np.int32(3), seed=2)
    want = M.skew_normalized_metrics(t, p, 5, n_repeats=3, seed=2)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    for bad in (2.0, np.float32(5), None):
        with pytest.raises(ValueError, match="num_classes"):
            M.confusion_matrix(t, p, bad)
        with pytest.raises(ValueError, match="n_repeats"):
            M.skew_normalized_metrics(t, p, 5, n_repeats=bad)
    with pytest.raises(ValueError, match="num_classes"):
        M.skew_normalized_metrics(t, p, np.int64(0))


def test_negative_mask_weights_raise():
    t, p = CASES["random"]
    w = np.ones(64, np.float32)
    w[3] = -1
    for fn in (M.regression_metrics, M.affect_stats, M.pcc):
        with pytest.raises(ValueError, match=r"mask: got a negative weight \(-1\.0\)"):
            fn(t, p, w)
    with pytest.raises(ValueError, match="mask"):
        M.per_sequence_metrics(t.reshape(4, 16), p.reshape(4, 16), w.reshape(4, 16))
    labels, preds = CAT_CASES["random"]
    with pytest.raises(ValueError, match="mask"):
        M.confusion_matrix(labels, preds, 5, mask=np.where(np.arange(80) == 0, -0.5, 1.0))
    # zero weights (padding) stay valid, also traced under jit
    w[3] = 0
    np.testing.assert_allclose(jax.jit(M.pcc)(t, p, w), np_pcc(np.delete(t, 3).astype(float), np.delete(p, 3).astype(float)),
                               atol=ATOL)


def test_merge_of_stats_of_different_shapes_raises():
    """(2,) stats merged with () stats once broadcast to (2,) stats without an error."""
    t, p = (np.stack([a, -a], 1) for a in CASES["random"])
    pair, single = jax.eval_shape(M.affect_stats, t, p), jax.eval_shape(M.affect_stats, t[:, 0], p[:, 0])
    with pytest.raises(ValueError, match=re.escape("stats[1]: got shape (), expected the shape of stats[0] (2,)")):
        M.merge(pair, single)
    with pytest.raises(ValueError, match=re.escape("stats[2]: got shape (3,), expected the shape of stats[0] (2,)")):
        M.merge(M.AffectStats.zeros(2), M.AffectStats.zeros(2), M.AffectStats.zeros(3))
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match=re.escape(f"k={bad!r}: expected an int >= 0")):  # was: a JAX TypeError
            M.AffectStats.zeros(bad)


def test_complex_inputs_raise():
    """The imaginary part was dropped (rmse 0.0 for [1+1j, 2] vs [1, 2+5j])."""
    with pytest.raises(ValueError, match="y_true: got dtype complex64, expected real values"):
        M.rmse(np.array([1 + 1j, 2], np.complex64), np.array([1, 2 + 5j], np.complex64))
    with pytest.raises(ValueError, match="y_pred: got dtype complex"):
        M.affect_stats(np.ones(2), np.ones(2, complex))


def test_skew_normalized_from_cm_rounds_float_counts():
    """Float counts are rounded: a float32 matrix of whole counts equals the int one; counts that
    all round to 0 raise (was: NumPy's "zero-size array to reduction operation minimum")."""
    cm = np.array([[3, 1], [2, 5]])
    want = M.skew_normalized_from_cm(cm, n_repeats=3, seed=1)
    got = M.skew_normalized_from_cm(cm.astype(np.float32) + 0.2, n_repeats=3, seed=1)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match=re.escape("cm: every count rounds to 0 (total 1)")):
        M.skew_normalized_from_cm(np.array([[0.4, 0.3], [0.2, 0.1]]), n_repeats=2)
    with pytest.raises(ValueError, match=re.escape("non-negative counts, got shape (2, 3)")):
        M.skew_normalized_from_cm(np.ones((2, 3)))


def test_bfloat16_inputs_are_counted_and_summed_in_float32():
    """1,000 bf16 samples: in bf16 the count would stop at 256 (1 + 256 rounds back to 256) and
    the RMSE's sums at 8 bits; upcast, count and RMSE are numpy's on the same bf16 values."""
    rng = np.random.default_rng(3)
    t = jnp.asarray(rng.uniform(-1, 1, (1000, 2)), jnp.bfloat16)
    p = jnp.asarray(rng.uniform(-1, 1, (1000, 2)), jnp.bfloat16)
    stats = M.affect_stats(t, p)
    assert stats.n.dtype == jnp.float32 and np.all(np.asarray(stats.n) == 1000)
    want = np.sqrt(np.mean((np.asarray(t, np.float64) - np.asarray(p, np.float64)) ** 2, axis=0))
    np.testing.assert_allclose(M.finalize(stats)["rmse"], want, rtol=1e-5)
