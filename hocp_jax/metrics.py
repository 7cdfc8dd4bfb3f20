"""Affect metrics: continuous (valence/arousal) and categorical (emotion classes).

Continuous metrics (Kossaifi et al. 2020, Sec. 5; BReG-Net Sec. IV-B), jittable, over
``y_true, y_pred`` of shape ``(n,)`` (one target -> scalar results) or ``(n, k)`` (k targets,
e.g. valence/arousal -> ``(k,)`` results), with an optional ``mask`` -- bool or non-negative
float weights of shape ``(n,)`` or ``(n, k)`` (padded batches: padding gets 0):

* :func:`rmse`, :func:`sagr`, :func:`pcc`, :func:`ccc` -- one metric;
  :func:`regression_metrics` -- all four as a dict from one pass over the data.
* Streaming: :class:`AffectStats` (count, means and centred sums), :func:`affect_stats`
  (stats of a batch), :func:`merge` (Chan et al.'s stable pairwise merge), :func:`psum` (the
  same across a named device axis), :func:`finalize` (metrics of the whole set).
* :func:`per_sequence_metrics` -- metrics per video ``(B, T, k)`` and their mean over videos.

Conventions (all results are finite, never NaN, for finite inputs; a NaN or infinite value among
the valid samples makes every metric NaN, so that a diverged model never scores as a good one):

* SAGR compares ``sign`` with ``sign(0) = 0`` (the Kronecker delta of the papers, as
  ``np.sign``): a 0 agrees only with an exact 0.
* Computed in float32 at least: bfloat16/float16 inputs (e.g. a bf16 model's outputs) are
  upcast, so counts and sums over a large split stay exact to float32 precision.
* Moments are population moments (divide by n). A variance counts as 0 when it is at most
  ``(8 eps(dtype))^2`` times the mean square of the values about a reference value, one of them
  (constant up to rounding; a spread of a few ulps of a large offset, e.g. 0.01 about 1e4 in
  float32, is kept); then the covariance counts as 0 too.
* PCC = 0 when either variance is 0 (constant inputs, n = 1).
* CCC = 2 cov / (var_t + var_p + (mu_t - mu_p)^2); when the denominator is 0 (both inputs
  constant and equal, e.g. n = 1 with y_pred == y_true) CCC = 1 (perfect agreement) if the
  squared error is 0 too, else 0.
* With no valid sample (n = 0) every metric is 0.
* Gradients are finite everywhere (safe sqrt/division via double ``where``); where the metric is
  not differentiable (RMSE at 0 error, PCC at constant inputs) the gradient is 0.

Accuracy: batch functions use a shifted two-pass algorithm (exact 0 variance for constant
inputs). Streaming stats keep a reference value per target (the first valid one they saw),
means about it and centred sums, merged by Chan et al.'s update, so they stay accurate in
float32 when the mean is far larger than the spread (no E[x^2] - E[x]^2, and no mean of large
values rounded at every merge).

Categorical metrics (BReG-Net Tables III/IV) from a confusion matrix ``cm (C, C)`` (rows = true
class, columns = predicted, as scikit-learn; confusion matrices of batches simply add):

* :func:`confusion_matrix` -- jittable builder from integer labels (optional mask).
* :func:`accuracy`, :func:`f1` (per class or macro), :func:`ppv` (precision, per class or
  macro), :func:`cohen_kappa`, :func:`krippendorff_alpha` (nominal, two coders: truth and
  prediction), :func:`mcc` (multiclass, Gorodkin); :func:`classification_metrics` -- all as a
  dict.
* :func:`skew_normalized_metrics` -- the same averaged over random class-balanced under-samples
  of the test set (numpy, seedable).

Categorical conventions: a ratio with a zero denominator is 0 (precision of a never-predicted
class, kappa/alpha/MCC without variability) -- as scikit-learn's ``zero_division=0`` and MCC;
macro averages run over the classes that occur in the truth or the predictions (scikit-learn's
default ``labels=None``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hocp_jax.checks import check_int, check_positive_int

# Zero-variance test. Variances come from centred sums (shifted two-pass per batch, Chan's merge
# or psum across batches), never from E[x^2] - E[x]^2 (whose rounding error is ~eps * E[x^2]).
# Means are kept about a reference value r (one of the values), so x - r is exact for values
# within a factor 2 of r and a mean is off by a few roundings of the shifted values, <= k eps
# |mean(x - r)| with k ~ 1 + log2(shards) / 2 (product, pairwise sum, division; measured <= 2.5
# for psums over up to 16384 shards, float32 and bfloat16). A centred sum is off by ~eps relative
# to itself plus n * (error of the mean it is centred on)^2. So a constant input has a computed
# variance of exactly 0 (every x - r is 0), and a variance <= (_ULPS eps)^2 * mean((x - r)^2) --
# rounding of the shifted values -- counts as 0. A real spread keeps its ~eps relative accuracy,
# whatever the offset.
_ULPS = 8


# --------------------------------------------------------------------------- helpers


def _safe_div(num: jax.Array, den: jax.Array, default: float = 0.0) -> jax.Array:
    """``num / den`` where ``den != 0`` else ``default``; finite gradients everywhere."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), default)


def weighted_mean(values, weights, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """``sum(w * v) / sum(w)`` over ``axis`` (all axes by default); 0 where the weights sum to 0.

    ``weights`` broadcast against ``values`` and may be fractional: dividing by
    ``max(sum(w), 1)`` instead would read weights 0.1, 0.1 as a fifth of the mean. The gradient
    is finite where the weights sum to 0. Weights are not checked here (:func:`check_weights`).
    """
    values, weights = jnp.asarray(values), jnp.asarray(weights)
    return _safe_div((weights * values).sum(axis), weights.sum(axis))


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(max(x, 0))`` with gradient 0 (not inf) at 0."""
    ok = x > 0
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, x, 1)), 0)


def check_weights(mask, name: str = "mask") -> None:
    """A ValueError naming ``name`` if a concrete (not traced) ``mask`` is not real numbers or
    bools, or holds a negative, NaN or infinite weight; under ``jit`` (a traced mask) nothing is
    read back, and such a weight goes unchecked."""
    if mask is None or isinstance(mask, jax.core.Tracer):
        return
    w = np.asarray(mask)
    if not (w.dtype == bool or jnp.issubdtype(w.dtype, jnp.integer) or jnp.issubdtype(w.dtype, jnp.floating)):
        raise ValueError(f"{name}: got dtype {w.dtype}, expected bool or real weights >= 0")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name}: got a non-finite weight ({w[~np.isfinite(w)].ravel()[0]}), expected bool or "
                         "finite weights >= 0")
    if np.any(w < 0):
        raise ValueError(f"{name}: got a negative weight ({np.min(w)}), expected bool or weights >= 0")


def _as_float(x, name: str) -> jax.Array:
    """``x`` in float32 or wider: ints and narrower floats are upcast (in bfloat16 the count
    of a streamed split would be exact only up to 256, its sums to 8 bits); complex is a
    ValueError naming ``name``, as are strings and objects."""
    if not isinstance(x, jax.Array) and np.asarray(x).dtype.kind not in "biuf":
        raise ValueError(f"{name}: got dtype {np.asarray(x).dtype}, expected real values")
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise ValueError(f"{name}: got dtype {x.dtype}, expected real values")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32)) if jnp.issubdtype(x.dtype, jnp.floating) \
        else x.astype(jnp.float32)


def _prepare(y_true, y_pred, mask):
    """Validates; returns ``(t, p, w)`` of shape ``(n, k)`` (invalid rows zeroed) and 1-D-ness."""
    t, p = _as_float(y_true, "y_true"), _as_float(y_pred, "y_pred")
    if t.ndim not in (1, 2):
        raise ValueError(f"y_true: got shape {t.shape}, expected (n,) or (n, k)")
    if p.shape != t.shape:
        raise ValueError(f"y_pred: got shape {p.shape}, expected the shape of y_true {t.shape}")
    if t.shape[0] == 0:
        raise ValueError(f"y_true: got shape {t.shape}, expected n >= 1 rows (a batch without a valid sample: "
                         "n rows with a mask of 0s)")
    check_weights(mask)
    if mask is None:
        w = jnp.ones_like(t)
    else:
        w = jnp.asarray(mask)
        if w.shape not in (t.shape[:1], t.shape):
            raise ValueError(f"mask: got shape {w.shape}, expected {t.shape[:1]} or the shape of y_true {t.shape}")
        w = w.astype(t.dtype)
        if w.ndim < t.ndim:
            w = jnp.broadcast_to(w[:, None], t.shape)
    vector = t.ndim == 1
    if vector:
        t, p, w = t[:, None], p[:, None], w[:, None]
    valid = w > 0  # padding may hold anything (even NaN): zero it
    return jnp.where(valid, t, 0), jnp.where(valid, p, 0), w, vector


def _unvector(tree, vector: bool):
    return jax.tree.map(lambda a: a[..., 0], tree) if vector else tree


class _Moments(NamedTuple):
    """Population moments per target, each ``(k,)``."""

    n: jax.Array
    ref_t: jax.Array  # reference values (one of the values): mu and msq are about them
    ref_p: jax.Array
    mu_t: jax.Array  # mean of t - ref_t
    mu_p: jax.Array
    var_t: jax.Array
    var_p: jax.Array
    cov: jax.Array
    mse: jax.Array
    sagr: jax.Array
    msq_t: jax.Array  # mean of (t - ref_t)^2 (scale of the zero-variance test, see _ULPS)
    msq_p: jax.Array


def _finalize_moments(m: _Moments) -> dict[str, jax.Array]:
    """The one place where RMSE, SAGR, PCC and CCC are computed from moments."""
    tol = (_ULPS * jnp.finfo(m.var_t.dtype).eps) ** 2
    var_t = jnp.where(m.var_t > tol * m.msq_t, m.var_t, 0)
    var_p = jnp.where(m.var_p > tol * m.msq_p, m.var_p, 0)
    both = (var_t > 0) & (var_p > 0)
    pcc = _safe_div(jnp.where(both, m.cov, 0), _safe_sqrt(var_t * var_p))
    # a constant input has cov 0; the value is zeroed but the gradient of cov is kept, so that
    # CCC still pulls constant predictions (its true gradient there is finite)
    cov = jnp.where(both, m.cov, m.cov - jax.lax.stop_gradient(m.cov))
    den = var_t + var_p + ((m.ref_t - m.ref_p) + (m.mu_t - m.mu_p)) ** 2
    ccc = _safe_div(2 * cov, den, default=1.0)
    ccc = jnp.where((m.n > 0) & ((den != 0) | (m.mse == 0)), ccc, 0)  # 1 for an exact match only
    out = {"rmse": _safe_sqrt(m.mse), "sagr": m.sagr, "pcc": pcc, "ccc": ccc}
    # a NaN or inf among the valid samples: every metric NaN (the safe ops above would read a NaN
    # error as RMSE 0 and a NaN variance as PCC 0: a diverged model must not score as a good one)
    bad = ~jnp.isfinite(m.mu_t + m.mu_p + m.var_t + m.var_p + m.cov + m.mse)
    return {k: jnp.where(bad, jnp.nan, v) for k, v in out.items()}


def _batch_moments(t: jax.Array, p: jax.Array, w: jax.Array) -> _Moments:
    """Shifted two-pass moments of ``(n, k)`` arrays with weights ``w``."""
    first = jnp.argmax(w > 0, axis=0)[None]  # first valid row per target: the shift
    shift_t = jax.lax.stop_gradient(jnp.take_along_axis(t, first, 0)[0])  # results are shift-
    shift_p = jax.lax.stop_gradient(jnp.take_along_axis(p, first, 0)[0])  # invariant: no grad
    dt, dp = t - shift_t, p - shift_p
    mean = lambda x: weighted_mean(x, w, 0)  # noqa: E731
    mdt, mdp = mean(dt), mean(dp)
    ct, cp = dt - mdt, dp - mdp
    return _Moments(
        n=w.sum(0),
        ref_t=shift_t,
        ref_p=shift_p,
        mu_t=mdt,
        mu_p=mdp,
        var_t=mean(ct * ct),
        var_p=mean(cp * cp),
        cov=mean(ct * cp),
        mse=mean((t - p) ** 2),
        sagr=mean((jnp.sign(t) == jnp.sign(p)).astype(t.dtype)),
        msq_t=mean(dt * dt),
        msq_p=mean(dp * dp),
    )


# --------------------------------------------------------------------------- batch metrics


def regression_metrics(y_true, y_pred, mask=None) -> dict[str, jax.Array]:
    """RMSE, SAGR, PCC and CCC of one batch (see the module conventions).

    Args:
        y_true, y_pred: ``(n,)`` or ``(n, k)`` float arrays.
        mask: optional bool / non-negative weights, ``(n,)`` or the shape of ``y_true``.

    Returns:
        ``{"rmse", "sagr", "pcc", "ccc"}``, each a scalar for ``(n,)`` inputs or ``(k,)``.
    """
    t, p, w, vector = _prepare(y_true, y_pred, mask)
    return _unvector(_finalize_moments(_batch_moments(t, p, w)), vector)


def rmse(y_true, y_pred, mask=None) -> jax.Array:
    """Root mean square error ``sqrt(E[(y - y_hat)^2])``; ``()`` or ``(k,)``."""
    return regression_metrics(y_true, y_pred, mask)["rmse"]


def sagr(y_true, y_pred, mask=None) -> jax.Array:
    """Sign agreement ``E[sign(y) == sign(y_hat)]`` with ``sign(0) = 0``; ``()`` or ``(k,)``."""
    return regression_metrics(y_true, y_pred, mask)["sagr"]


def pcc(y_true, y_pred, mask=None) -> jax.Array:
    """Pearson correlation (0 if a variance is 0); ``()`` or ``(k,)``."""
    return regression_metrics(y_true, y_pred, mask)["pcc"]


def ccc(y_true, y_pred, mask=None) -> jax.Array:
    """Lin's concordance correlation, population moments; ``()`` or ``(k,)``."""
    return regression_metrics(y_true, y_pred, mask)["ccc"]


# --------------------------------------------------------------------------- streaming


class AffectStats(NamedTuple):
    """Streaming statistics of (y_true, y_pred) pairs per target; every leaf ``()`` or ``(k,)``.

    A reference value per target (the first valid value seen), means about it and *centred*
    sums (Chan et al.'s parallel algorithm), not raw power sums: merging never subtracts two
    large, nearly equal numbers and never rounds a mean of large values, so float32 stays
    accurate for data whose mean is far larger than its spread (mean 1e4, sd 0.01). Stats of
    disjoint sets combine with :func:`merge` (pairwise) or :func:`psum` (across a named device
    axis). Field names: ``t`` = truth, ``p`` = prediction.
    """

    n: jax.Array  # number (total weight) of samples
    ref_t: jax.Array  # reference value (0 while n = 0)
    ref_p: jax.Array
    mean_t: jax.Array  # mean of t - ref_t
    mean_p: jax.Array
    m2_t: jax.Array  # sum w (t - mean(t))^2
    m2_p: jax.Array
    c_tp: jax.Array  # sum w (t - mean(t))(p - mean(p))
    mse: jax.Array  # mean (t - p)^2, kept apart for an accurate RMSE
    sagr: jax.Array  # mean [sign(t) == sign(p)]
    msq_t: jax.Array  # mean of (t - ref_t)^2 (only the scale of the zero-variance test)
    msq_p: jax.Array

    @classmethod
    def zeros(cls, k: int | None = None, dtype=jnp.float32) -> "AffectStats":
        """Empty stats for ``(n,)`` (``k=None``) or ``(n, k)`` inputs (``k >= 0``)."""
        shape = () if k is None else (check_int(k, "k", 0),)
        return cls(*(jnp.zeros(shape, dtype) for _ in cls._fields))


_MEANS = ("mean_t", "mean_p", "mse", "sagr", "msq_t", "msq_p")  # weighted means: merge by weight


def affect_stats(y_true, y_pred, mask=None) -> AffectStats:
    """Statistics of one batch (shifted two-pass); arguments as :func:`regression_metrics`."""
    t, p, w, vector = _prepare(y_true, y_pred, mask)
    m = _batch_moments(t, p, w)
    has = m.n > 0  # an empty batch keeps the reference 0 of AffectStats.zeros
    stats = AffectStats(
        n=m.n, ref_t=jnp.where(has, m.ref_t, 0), ref_p=jnp.where(has, m.ref_p, 0), mean_t=m.mu_t, mean_p=m.mu_p,
        m2_t=m.n * m.var_t, m2_p=m.n * m.var_p, c_tp=m.n * m.cov, mse=m.mse, sagr=m.sagr, msq_t=m.msq_t,
        msq_p=m.msq_p,
    )
    return _unvector(stats, vector)


def _check_stats(stats, name: str) -> None:
    if not isinstance(stats, AffectStats):
        raise ValueError(f"{name}: got {type(stats).__name__}, expected an AffectStats (from affect_stats or merge)")


def _rebase(stats: AffectStats, ref_t: jax.Array, ref_p: jax.Array) -> AffectStats:
    """``stats`` with its means and mean squares about ``ref_t``/``ref_p`` (an empty one's
    stay 0: its weight is 0, and a shift by a large reference would only add rounding)."""
    has = stats.n > 0
    d_t = jnp.where(has, stats.ref_t - ref_t, 0)  # exact for references within a factor 2
    d_p = jnp.where(has, stats.ref_p - ref_p, 0)
    return stats._replace(
        ref_t=ref_t, ref_p=ref_p, mean_t=stats.mean_t + d_t, mean_p=stats.mean_p + d_p,
        msq_t=stats.msq_t + (2 * stats.mean_t + d_t) * d_t, msq_p=stats.msq_p + (2 * stats.mean_p + d_p) * d_p)


def merge(*stats: AffectStats) -> AffectStats:
    """Stats of the union of disjoint sets (e.g. batches), by Chan et al.'s pairwise update::

        n = n_a + n_b,  d = mean_b - mean_a,  mean = mean_a + d n_b / n,
        M2 = M2_a + M2_b + d^2 n_a n_b / n,  C = C_a + C_b + d_t d_p n_a n_b / n,

    with both means about the first non-empty set's reference values.
    All stats must have one shape: ``()`` (from ``(n,)`` inputs) or the same ``(k,)``.
    """
    if not stats:
        raise ValueError("merge: expected at least one AffectStats")
    for i, st in enumerate(stats):
        _check_stats(st, f"stats[{i}]")
        if jnp.shape(st.n) != jnp.shape(stats[0].n):
            raise ValueError(f"stats[{i}]: got shape {jnp.shape(st.n)}, expected the shape of stats[0] "
                             f"{jnp.shape(stats[0].n)} (stats of the same targets)")
    out = stats[0]
    for b in stats[1:]:
        ref_t, ref_p = jnp.where(out.n > 0, out.ref_t, b.ref_t), jnp.where(out.n > 0, out.ref_p, b.ref_p)
        a, b = _rebase(out, ref_t, ref_p), _rebase(b, ref_t, ref_p)
        n = a.n + b.n
        frac = _safe_div(b.n, n)  # weight of b in the merged means
        d_t, d_p = b.mean_t - a.mean_t, b.mean_p - a.mean_p
        cross = a.n * frac  # n_a n_b / n
        means = {f: getattr(a, f) + (getattr(b, f) - getattr(a, f)) * frac for f in _MEANS}
        out = AffectStats(n=n, ref_t=ref_t, ref_p=ref_p, m2_t=a.m2_t + b.m2_t + d_t * d_t * cross,
                          m2_p=a.m2_p + b.m2_p + d_p * d_p * cross,
                          c_tp=a.c_tp + b.c_tp + d_t * d_p * cross, **means)
    return out


def psum(stats: AffectStats, axis_name) -> AffectStats:
    """:func:`merge` across the named axis (``shard_map``/``vmap``/``pmap``), in two psums.

    First the count-weighted means (``mean = psum(n mean) / psum(n)``), then the centred sums
    about those global means (``M2 = psum(M2_i + n_i (mean_i - mean)^2)``, same for ``C``);
    every mean about one reference value, the largest of the non-empty shards' (``pmax``).
    """
    refs = []
    for r in (stats.ref_t, stats.ref_p):
        top = jax.lax.pmax(jnp.where(stats.n > 0, r, -jnp.inf), axis_name)
        refs.append(jnp.where(jnp.isfinite(top), top, 0))
    stats = _rebase(stats, *refs)
    n = jax.lax.psum(stats.n, axis_name)
    means = {f: _safe_div(jax.lax.psum(stats.n * getattr(stats, f), axis_name), n) for f in _MEANS}
    d_t, d_p = stats.mean_t - means["mean_t"], stats.mean_p - means["mean_p"]
    centred = jax.lax.psum((stats.m2_t + stats.n * d_t * d_t, stats.m2_p + stats.n * d_p * d_p,
                            stats.c_tp + stats.n * d_t * d_p), axis_name)
    return AffectStats(n=n, ref_t=refs[0], ref_p=refs[1], m2_t=centred[0], m2_p=centred[1], c_tp=centred[2],
                       **means)


def finalize(stats: AffectStats) -> dict[str, jax.Array]:
    """RMSE, SAGR, PCC, CCC of the whole set summarised by ``stats`` (module conventions)."""
    _check_stats(stats, "stats")
    n = stats.n
    return _finalize_moments(_Moments(
        n=n, ref_t=stats.ref_t, ref_p=stats.ref_p, mu_t=stats.mean_t, mu_p=stats.mean_p, var_t=_safe_div(stats.m2_t, n),
        var_p=_safe_div(stats.m2_p, n), cov=_safe_div(stats.c_tp, n), mse=stats.mse,
        sagr=stats.sagr, msq_t=stats.msq_t, msq_p=stats.msq_p,
    ))


# --------------------------------------------------------------------------- per sequence


def per_sequence_metrics(y_true, y_pred, mask=None) -> tuple[dict, dict]:
    """Metrics per sequence (video) and their mean over the sequences.

    Args:
        y_true, y_pred: ``(B, T)`` or ``(B, T, k)``.
        mask: optional ``(B, T)`` bool/weights of valid frames (padded sequences).

    Returns:
        ``(per_seq, mean)``: dicts like :func:`regression_metrics`; ``per_seq`` leaves are
        ``(B,)`` or ``(B, k)``, ``mean`` leaves ``()`` or ``(k,)`` -- the unweighted mean over
        the sequences with at least one valid frame (0 if there is none).
    """
    t, p = jnp.asarray(y_true), jnp.asarray(y_pred)
    if t.ndim not in (2, 3) or 0 in t.shape[:2]:
        raise ValueError(f"y_true: got shape {t.shape}, expected (B, T) or (B, T, k) with B, T >= 1")
    if p.shape != t.shape:
        raise ValueError(f"y_pred: got shape {p.shape}, expected the shape of y_true {t.shape}")
    check_weights(mask)
    m = jnp.ones(t.shape[:2], bool) if mask is None else jnp.asarray(mask)
    if m.shape != t.shape[:2]:
        raise ValueError(f"mask: got shape {m.shape}, expected {t.shape[:2]}")
    per_seq = jax.vmap(regression_metrics)(t, p, m)
    valid = (m > 0).any(axis=1).astype(per_seq["rmse"].dtype)
    valid = valid.reshape(valid.shape + (1,) * (t.ndim - 2))
    mean = jax.tree.map(lambda v: weighted_mean(v, valid, 0), per_seq)
    return per_seq, mean


# --------------------------------------------------------------------------- categorical


def confusion_matrix(labels, preds, num_classes: int, mask=None) -> jax.Array:
    """Confusion matrix ``(C, C)`` float32: ``cm[i, j]`` = (weighted) count of true i, predicted j.

    Args:
        labels, preds: ``(n,)`` integer classes; values outside ``[0, C)`` are not counted.
        num_classes: C.
        mask: optional ``(n,)`` bool / non-negative weights.
    """
    labels, preds = jnp.asarray(labels), jnp.asarray(preds)
    if labels.ndim != 1 or preds.shape != labels.shape:
        raise ValueError(f"labels/preds: got shapes {labels.shape} and {preds.shape}, expected equal (n,)")
    for name, a in (("labels", labels), ("preds", preds)):
        if not jnp.issubdtype(a.dtype, jnp.integer):  # one_hot would count only the exact-integer floats
            raise ValueError(f"{name}: got dtype {a.dtype}, expected integer classes (argmax the logits first)")
    num_classes = check_positive_int(num_classes, "num_classes")
    check_weights(mask)
    w = jnp.ones(labels.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    if w.shape != labels.shape:
        raise ValueError(f"mask: got shape {w.shape}, expected {labels.shape}")
    oh_t = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * w[:, None]
    return oh_t.T @ jax.nn.one_hot(preds, num_classes, dtype=jnp.float32)


def _check_cm(cm) -> jax.Array:
    if not isinstance(cm, jax.core.Tracer) and not np.all(np.asarray(cm) >= 0):
        raise ValueError(f"cm: got {np.asarray(cm).tolist()}, expected a confusion matrix of counts >= 0")
    cm = jnp.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm: got shape {cm.shape}, expected a square (C, C) confusion matrix")
    return cm.astype(jnp.promote_types(cm.dtype, jnp.float32))


def _average(per_class: jax.Array, cm: jax.Array, average: str | None) -> jax.Array:
    if average is None:
        return per_class
    if average != "macro":
        raise ValueError(f"average: got {average!r}, expected 'macro' or None")
    present = (cm.sum(0) + cm.sum(1)) > 0
    return _safe_div(jnp.where(present, per_class, 0).sum(), present.sum())


def accuracy(cm) -> jax.Array:
    """Fraction of correct predictions, ``trace(cm) / sum(cm)``."""
    cm = _check_cm(cm)
    return _safe_div(jnp.trace(cm), cm.sum())


def ppv(cm, average: str | None = "macro") -> jax.Array:
    """Positive predictive value (precision) ``TP / predicted``: ``(C,)`` or macro scalar."""
    cm = _check_cm(cm)
    return _average(_safe_div(jnp.diag(cm), cm.sum(0)), cm, average)


def f1(cm, average: str | None = "macro") -> jax.Array:
    """F1 ``2 TP / (2 TP + FP + FN)``: ``(C,)`` per class or macro scalar."""
    cm = _check_cm(cm)
    return _average(_safe_div(2 * jnp.diag(cm), cm.sum(0) + cm.sum(1)), cm, average)


def cohen_kappa(cm) -> jax.Array:
    """Cohen's kappa ``(p_o - p_e) / (1 - p_e)``; 0 when ``p_e = 1``."""
    cm = _check_cm(cm)
    n = cm.sum()
    p_o = _safe_div(jnp.trace(cm), n)
    p_e = _safe_div(cm.sum(1) @ cm.sum(0), n * n)
    return _safe_div(p_o - p_e, 1 - p_e)


def krippendorff_alpha(cm) -> jax.Array:
    """Krippendorff's alpha, nominal data, two coders (truth, prediction), no missing values.

    Coincidence matrix ``o = cm + cm^T`` (n = 2 N pairable values, marginals n_c):
    ``alpha = 1 - (n - 1) sum_{c != k} o_ck / sum_{c != k} n_c n_k``; 0 if only one value occurs.
    """
    cm = _check_cm(cm)
    o = cm + cm.T
    n_c = o.sum(1)
    n = n_c.sum()
    disagree = n - jnp.trace(o)
    expected = n * n - n_c @ n_c
    return _safe_div(expected - (n - 1) * disagree, expected)


def mcc(cm) -> jax.Array:
    """Multiclass Matthews correlation (Gorodkin's R_K, as scikit-learn); 0 if undefined."""
    cm = _check_cm(cm)
    t, p = cm.sum(1), cm.sum(0)
    n = cm.sum()
    cov_tp = jnp.trace(cm) * n - t @ p
    cov_tt = n * n - t @ t
    cov_pp = n * n - p @ p
    return _safe_div(cov_tp, _safe_sqrt(cov_tt * cov_pp))


def classification_metrics(cm) -> dict[str, jax.Array]:
    """All categorical metrics of ``cm (C, C)``: scalars ``accuracy, f1, ppv, kappa, alpha,
    mcc`` (f1/ppv macro) and ``(C,)`` arrays ``f1_per_class, ppv_per_class``."""
    return {
        "accuracy": accuracy(cm), "f1": f1(cm), "ppv": ppv(cm),
        "kappa": cohen_kappa(cm), "alpha": krippendorff_alpha(cm), "mcc": mcc(cm),
        "f1_per_class": f1(cm, None), "ppv_per_class": ppv(cm, None),
    }


def skew_normalized_metrics(labels, preds, num_classes: int, *, n_repeats: int = 200,
                            seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`classification_metrics` averaged over class-balanced random under-samples.

    Each repeat draws, without replacement, ``m`` samples of every class present in ``labels``
    (``m`` = size of the smallest present class) -- BReG-Net's skew normalisation.

    Args:
        labels, preds: ``(n,)`` integer classes in ``[0, num_classes)``.
        num_classes: C.
        n_repeats: number of under-samples averaged (BReG-Net: 200).
        seed: seed of the numpy generator (same seed -> same result).

    Returns:
        The keys of :func:`classification_metrics`, each the mean over the repeats (numpy).
    """
    labels, preds = np.asarray(labels), np.asarray(preds)
    num_classes = check_positive_int(num_classes, "num_classes")
    if labels.ndim != 1 or preds.shape != labels.shape or labels.size == 0:
        raise ValueError(f"labels/preds: got shapes {labels.shape} and {preds.shape}, expected equal (n,), n > 0")
    for name, a in (("labels", labels), ("preds", preds)):
        if not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= num_classes:
            raise ValueError(f"{name}: expected integers in [0, {num_classes}), got dtype {a.dtype}, "
                             f"range [{a.min()}, {a.max()}]")
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return skew_normalized_from_cm(cm, n_repeats=n_repeats, seed=seed)


def skew_normalized_from_cm(cm, *, n_repeats: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`skew_normalized_metrics` from a confusion matrix of integer counts ``(C, C)``
    (float counts, e.g. :func:`confusion_matrix`'s float32, are rounded to the nearest integer;
    their rounded total must be positive).

    Drawing ``m`` examples of class ``c`` without replacement draws their predictions from row
    ``cm[c]`` (a multivariate hypergeometric draw), so the confusion matrix is all a streaming
    evaluation has to keep.
    """
    counts = np.asarray(cm)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or not np.all(counts >= 0):
        raise ValueError(f"cm: expected a square matrix of non-negative counts, got shape {counts.shape}")
    counts = np.rint(counts).astype(np.int64)
    if not counts.sum():
        raise ValueError(f"cm: every count rounds to 0 (total {np.asarray(cm).sum():g}); expected integer "
                         "counts with a positive total")
    n_repeats = check_positive_int(n_repeats, "n_repeats")
    rng = np.random.default_rng(check_int(seed, "seed", 0))
    present = np.flatnonzero(counts.sum(1))
    m = counts[present].sum(1).min()
    cms = np.zeros((n_repeats,) + counts.shape, np.float32)
    for r in range(n_repeats):
        for c in present:
            cms[r, c] = rng.multivariate_hypergeometric(counts[c], m)
    values = jax.jit(jax.vmap(classification_metrics))(cms)
    return {k: np.asarray(v).mean(0) for k, v in values.items()}
