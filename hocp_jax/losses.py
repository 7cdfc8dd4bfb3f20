"""Affect losses (Kossaifi et al. 2020, Sec. 5 and supp. Sec. 5; BReG-Net Sec. III-B).

Regression over ``y_true, y_pred`` of shape ``(n, k)`` (k targets, e.g. valence/arousal) or
``(n,)``, optional ``mask`` as in :mod:`hocp_jax.metrics` (the statistics come from
:func:`hocp_jax.metrics.regression_metrics`):

* :func:`rmse_loss`  ``L_RMSE = sum_k RMSE_k`` (= RMSE_valence + RMSE_arousal),
* :func:`pcc_loss`   ``L_PCC = 1 - mean_k PCC_k``,
* :func:`ccc_loss`   ``L_CCC = 1 - mean_k CCC_k``,
* :func:`shake_shake_weights` -- ``(alpha, beta, gamma) ~ U[0, 1]`` from a key, divided by their
  sum,
* :func:`affect_loss` -- ``(alpha L_RMSE + beta L_PCC + gamma L_CCC) / (alpha + beta + gamma)``
  with shake-shake weights (``key``) or given weights.

Classification (emotion classes, jointly with the regression on AffectNet):

* :func:`cross_entropy` -- softmax cross-entropy with integer labels, optional mask and class
  weights,
* :func:`class_weights` -- BReG-Net's ``H_ii = f_min / f_i`` from training-split label counts.

Gradients are finite for any input, including constant predictions: RMSE uses a safe sqrt
(gradient 0 at zero error), PCC is 0 with gradient 0 when the predictions are constant (it is
not differentiable there; L_RMSE and L_CCC still pull constant predictions towards the targets),
CCC has no square root and its denominator is only 0 for identical constant signals (then
CCC = 1, gradient 0). See :mod:`hocp_jax.metrics` for the conventions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hocp_jax.checks import check_key, check_positive_int
from hocp_jax.metrics import check_weights, regression_metrics, weighted_mean


def rmse_loss(y_true, y_pred, mask=None) -> jax.Array:
    """``sum_k RMSE_k``; inputs ``(n,)`` or ``(n, k)``; scalar."""
    return regression_metrics(y_true, y_pred, mask)["rmse"].sum()


def pcc_loss(y_true, y_pred, mask=None) -> jax.Array:
    """``1 - mean_k PCC_k``; inputs ``(n,)`` or ``(n, k)``; scalar in [0, 2]."""
    return 1 - regression_metrics(y_true, y_pred, mask)["pcc"].mean()


def ccc_loss(y_true, y_pred, mask=None) -> jax.Array:
    """``1 - mean_k CCC_k``; inputs ``(n,)`` or ``(n, k)``; scalar in [0, 2]."""
    return 1 - regression_metrics(y_true, y_pred, mask)["ccc"].mean()


def shake_shake_weights(key: jax.Array, n: int = 3) -> jax.Array:
    """``(n,)`` weights ``u / sum(u)`` with ``u ~ U[0, 1)`` i.i.d.; a new ``key`` per step."""
    check_positive_int(n, "n")
    check_key(key)
    u = jax.random.uniform(key, (n,))
    return u / jnp.maximum(u.sum(), jnp.finfo(u.dtype).tiny)


def affect_loss(y_true, y_pred, *, key: jax.Array | None = None, weights=None,
                mask=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(alpha L_RMSE + beta L_PCC + gamma L_CCC) / (alpha + beta + gamma)``.

    Args:
        y_true, y_pred: ``(n,)`` or ``(n, k)``.
        key: PRNG key; draws shake-shake ``(alpha, beta, gamma)`` (:func:`shake_shake_weights`).
        weights: instead of ``key``, fixed ``(alpha, beta, gamma)`` (non-negative, not all 0;
            checked unless traced); with neither, equal weights.
        mask: optional ``(n,)`` or ``(n, k)`` bool / weights of valid samples.

    Returns:
        ``(loss, terms)``: scalar loss and the scalars ``terms = {"l_rmse", "l_pcc", "l_ccc"}``.
    """
    if key is not None and weights is not None:
        raise ValueError("affect_loss: pass either key (shake-shake) or weights, not both")
    if key is not None:
        w = shake_shake_weights(key)
    else:
        w = jnp.ones(3) if weights is None else jnp.asarray(weights, jnp.float32)
        if w.shape != (3,):
            raise ValueError(f"weights: got shape {w.shape}, expected (3,) = (alpha, beta, gamma)")
        if not isinstance(w, jax.core.Tracer):
            wn = np.asarray(w)
            if not (np.all(wn >= 0) and 0 < wn.sum() < np.inf):
                raise ValueError(f"weights: got {wn.tolist()}, expected finite (alpha, beta, gamma) >= 0, "
                                 "not all 0")
        w = w / w.sum()
    m = regression_metrics(y_true, y_pred, mask)
    terms = {"l_rmse": m["rmse"].sum(), "l_pcc": 1 - m["pcc"].mean(), "l_ccc": 1 - m["ccc"].mean()}
    loss = w[0] * terms["l_rmse"] + w[1] * terms["l_pcc"] + w[2] * terms["l_ccc"]
    return loss, terms


def class_weights(counts) -> jax.Array:
    """BReG-Net's diagonal ``H_ii = f_min / f_i`` from the training split's label counts.

    ``f_i = counts_i / sum(counts)``, ``f_min`` the smallest non-zero frequency, so the rarest
    class gets 1 and the others less; a class with count 0 gets 1. All ones for balanced data.

    Args:
        counts: ``(C,)`` non-negative label counts (or frequencies), e.g.
            ``np.bincount(train_labels, minlength=C)``.

    Returns:
        ``(C,)`` float32 weights in (0, 1].
    """
    c = jnp.asarray(counts, jnp.float32)
    if c.ndim != 1 or c.shape[0] < 1:
        raise ValueError(f"counts: got shape {c.shape}, expected (C,) label counts")
    if not isinstance(counts, jax.core.Tracer) and not (np.isfinite(counts) & (np.asarray(counts) >= 0)).all():
        raise ValueError(f"counts: got {np.asarray(counts)}, expected finite counts >= 0")
    f = c / jnp.maximum(c.sum(), 1e-30)
    present = f > 0
    f_min = jnp.where(present, f, jnp.inf).min()
    return jnp.where(present, f_min / jnp.where(present, f, 1), 1.0)


def cross_entropy(logits, labels, *, mask=None, class_weights=None) -> jax.Array:
    """Mean softmax cross-entropy ``-H_ll log p_l`` over the valid examples.

    Args:
        logits: ``(..., C)``.
        labels: ``(...)`` integer classes in ``[0, C)`` (any value where masked). Checked when
            labels and mask are concrete; inside ``jit`` an unmasked label outside ``[0, C)``
            gives NaN, so labels must be valid or masked.
        mask: optional ``(...)`` bool / weights; masked examples (any label) count 0.
        class_weights: optional ``(C,)`` ``H_ii`` (:func:`class_weights`); None = plain CE.

    Returns:
        Scalar ``sum(mask * H[label] * CE) / sum(mask)`` (0 if nothing is valid). With all
        ``H_ii = 1`` it equals plain cross-entropy.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: got shape {logits.shape}, expected (..., C) with C >= 1 classes")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels: got shape {labels.shape}, expected logits.shape[:-1] = {logits.shape[:-1]}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels: got dtype {labels.dtype}, expected integer class indices")
    m = jnp.ones(labels.shape, logits.dtype) if mask is None else jnp.asarray(mask).astype(logits.dtype)
    if m.shape != labels.shape:
        raise ValueError(f"mask: got shape {m.shape}, expected the shape of labels {labels.shape}")
    if not any(isinstance(a, jax.core.Tracer) for a in (labels, m)):
        check_weights(m)
        used = np.asarray(labels)[np.asarray(m) > 0]
        bad = used[(used < 0) | (used >= logits.shape[-1])]
        if bad.size:
            raise ValueError(f"labels: got {np.unique(bad).tolist()} (unmasked), expected classes in "
                             f"[0, {logits.shape[-1]}) or a mask of 0 there")
    safe_labels = jnp.where(m > 0, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    if class_weights is not None:
        h = jnp.asarray(class_weights, logits.dtype)
        if h.shape != logits.shape[-1:]:
            raise ValueError(f"class_weights: got shape {h.shape}, expected ({logits.shape[-1]},)")
        if not isinstance(class_weights, jax.core.Tracer) and not (np.asarray(class_weights) >= 0).all():
            raise ValueError(f"class_weights: got {np.asarray(class_weights)}, expected weights >= 0")
        ce = h[safe_labels] * ce
    # H weighs each term, the mask the mean: divided by sum(mask), not by sum(mask * H)
    return weighted_mean(jnp.where(m > 0, ce, 0), m)
