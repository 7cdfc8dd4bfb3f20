r"""Feature views and contrastive objectives of AVCE (Kim & Song, ECCV 2022).

Pure functions on arrays; the networks live in :mod:`hocp_jax.models.avce`.

Feature views of a latent ``z`` (supplementary, Eqs. (1)-(2)), both exact and in
closed form (the paper solved them with CVXPY's iterative conic solver):

* :func:`sparsemax` ``Sp(z) = argmin_{p in simplex} ||p - z||^2``, the Euclidean
  projection onto the probability simplex (``optax.projections.projection_simplex``:
  sort-based forward, closed-form JVP ``J = diag(s) - s s^T / |S|`` with ``s`` the
  support indicator). Its outputs are sparse.
* :func:`softmax_view` ``Sm(z) = argmax_{p in simplex} <z, p> + H(p) = softmax(z)``,
  the entropy-regularised projection (with an optional temperature).

The critic ``f(x, y)`` scores a pair of projections; :func:`critic_matrix` returns
``F[i, j] = f(x_i, y_j)`` for a batch, whose diagonal samples the joint ``P_XY``
(two views of the same image) and whose off-diagonal samples ``P_X P_Y``.

:func:`avce_objective` is the bound maximised by AVCE (section 7 of the
supplementary); :func:`infonce_objective` is InfoNCE for comparison, in its standard batch form
(the log inside the mean over the positives; the supplementary's Eq. (6) prints it outside both
expectations). The loss weights and the discriminative term follow the authors' public code as
this module's first version (stop 1) read it; that reading could not be re-checked offline since
(the supplementary gives no weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from optax.projections import projection_simplex

from hocp_jax import explicit_sharding
from hocp_jax.checks import check_axis, check_real
from hocp_jax.losses import ccc_loss, pcc_loss
from hocp_jax.metrics import check_weights, weighted_mean

CRITICS = ("cosine", "dot")


def sparsemax(z: jax.Array, axis: int = -1) -> jax.Array:
    """SparseMax view: Euclidean projection of each vector along ``axis`` onto the simplex.

    Args:
        z: ``(..., d)`` real array, ``d >= 1`` (``axis`` selects the simplex dimension).
        axis: the axis that is projected (an int).

    Returns:
        Array of ``z``'s shape, non-negative, summing to 1 along ``axis``, with exact
        zeros outside the support, in ``z``'s floating dtype (float32 for integers).
        Differentiable almost everywhere (closed-form JVP). Inputs narrower than float32 are
        projected in float32: optax's ``projection_simplex`` (0.2.8) returns float32 for a
        bfloat16 input, which its custom JVP then rejects. Under explicit sharding it runs in
        ``jax.sharding.auto_axes`` (the projection's selects have no sharding rule for a split
        batch, :mod:`hocp_jax.explicit_sharding`).
    """
    z = jnp.asarray(z)
    if z.ndim == 0:
        raise ValueError(f"sparsemax: z must have at least 1 dimension, got shape {z.shape}")
    check_axis(axis, z.ndim, "sparsemax: ")
    moved = jnp.moveaxis(z, axis, -1)
    if moved.shape[-1] == 0:
        raise ValueError(f"sparsemax: axis={axis} of z (shape {z.shape}) is empty; the simplex needs >= 1 entry")
    if jnp.issubdtype(z.dtype, jnp.complexfloating):
        raise ValueError(f"sparsemax: z has dtype {z.dtype}, expected real values")
    dtype = z.dtype if jnp.issubdtype(z.dtype, jnp.floating) else jnp.float32

    def project(moved):
        flat = moved.reshape(-1, moved.shape[-1]).astype(jnp.promote_types(dtype, jnp.float32))
        # the projection is shift-invariant; about the maximum its threshold is not the small
        # difference of large values (z near 1e4 summed to 1.001 in float32)
        flat = flat - jax.lax.stop_gradient(jnp.max(flat, axis=-1, keepdims=True))
        return jax.vmap(projection_simplex)(flat).astype(dtype).reshape(moved.shape)

    out = explicit_sharding.run_auto(project, moved, out_spec=P(*explicit_sharding.spec_of(moved)))
    return jnp.moveaxis(out, -1, axis)


def softmax_view(z: jax.Array, temperature: float = 1.0, axis: int = -1) -> jax.Array:
    """SoftMax view: ``argmax_{p in simplex} <z, p> / T + H(p) = softmax(z / T)``.

    Args:
        z: ``(..., d)`` real array.
        temperature: ``T > 0``; the paper's Eq. (2) is ``T = 1``.
        axis: the simplex axis (an int).
    """
    check_real(temperature, "temperature", lambda v: v > 0, "a real number > 0")
    z = jnp.asarray(z)
    check_axis(axis, z.ndim, "softmax_view: ")
    return jax.nn.softmax(z / temperature, axis=axis)


def critic_matrix(x: jax.Array, y: jax.Array, *, critic: str = "cosine",
                  temperature: float = 1.0) -> jax.Array:
    r"""Critic scores of all pairs: ``F[i, j] = f(x_i, y_j)``.

    ``"cosine"``: ``f(x, y) = <x, y> / (||x|| ||y|| T)``; ``"dot"``: ``<x, y> / T``. The
    supplementary does not define ``f``: cosine at ``T = 1`` (the losses' default) is our choice;
    it keeps ``f`` in ``[-1, 1]``, so :func:`avce_objective`'s per-pair optimum ``1/beta`` for
    positives is out of reach and only the direction of its gradient matters.

    Args:
        x: ``(N, P)`` projections of the first view (integers are cast to float32).
        y: ``(N, P)`` projections of the second view (row ``i`` pairs with ``x[i]``).
        critic: one of ``CRITICS``.
        temperature: ``T > 0``.

    Returns:
        ``(N, N)`` scores; the diagonal holds the positive (joint) pairs.
    """
    if critic not in CRITICS:
        raise ValueError(f"critic must be one of {CRITICS}, got {critic!r}")
    check_real(temperature, "temperature", lambda v: v > 0, "a real number > 0")
    x, y = jnp.asarray(x), jnp.asarray(y)
    dtype = jnp.result_type(x, y)
    x, y = (a.astype(dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.float32) for a in (x, y))
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be (N, P) with equal shapes, got {x.shape} "
                         f"and {y.shape}")
    if critic == "cosine":
        eps = jnp.finfo(x.dtype).eps
        x = x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + eps)
        y = y / jnp.sqrt(jnp.sum(y * y, -1, keepdims=True) + eps)
    return x @ y.T / temperature


def _pair_weights(scores: jax.Array, weights: jax.Array | None):
    """Positive (diagonal) and negative (off-diagonal) pair weights, each summing to 1 (all 0
    when every weight is 0: the sums are clamped away from 0)."""
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1] or scores.shape[0] < 2:
        raise ValueError(f"scores must be a square (N, N) matrix with N >= 2, got "
                         f"shape {scores.shape}")
    n = scores.shape[0]
    check_weights(weights, "weights")
    w = jnp.ones((n,), scores.dtype) if weights is None else jnp.asarray(weights, scores.dtype)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    pos = w / jnp.maximum(jnp.sum(w), 1e-12)
    neg = jnp.outer(w, w) * (1.0 - jnp.eye(n, dtype=scores.dtype))
    return pos, neg / jnp.maximum(jnp.sum(neg), 1e-12)


def avce_objective(scores: jax.Array, *, alpha: float = 0.5, beta: float = 0.005,
                   gamma: float = 0.5, weights: jax.Array | None = None) -> jax.Array:
    r"""The AVCE bound (to MAXIMISE) from a critic matrix.

    Supplementary section 7: InfoNCE, ``sup_f E_{P_XY} f - log E_{P_X P_Y} e^f`` (Eq. 6),
    loses its log/exp (Eq. 7) and gains a regulariser built from the second moment of
    ``f`` ("to prevent excessive increase of f"), which gives

    .. math::

        J(f) = E_{P_{XY}}[f] - \alpha\, E_{P_X P_Y}[f]
               - \tfrac{\beta}{2} E_{P_{XY}}[f^2] - \tfrac{\gamma}{2} E_{P_X P_Y}[f^2].

    This is the relative-predictive-coding form the authors' public code computes, as read
    when this module was written (not re-checked offline since) (``pos - ALPHA * mean(neg) - 0.5 BETA pos^2 - 0.5 GAMMA mean(neg^2)``, defaults
    ``alpha=0.5, beta=0.005, gamma=0.5``). ``alpha=1, beta=gamma=0`` is Eq. (7) without
    the regulariser. Per pair the integrand is a concave quadratic in ``f``, maximised at
    ``f = 1/beta`` for positives and ``f = -alpha/gamma`` for negatives, so ``J`` is
    bounded and its gradients stay bounded without any exponential.

    Expectations: ``E_{P_XY}`` is the mean of the diagonal ``scores[i, i]`` (the two
    views of image ``i``); ``E_{P_X P_Y}`` the mean over the ``N(N-1)`` off-diagonal
    pairs (views of different images).

    Args:
        scores: ``(N, N)`` critic matrix from :func:`critic_matrix`, ``N >= 2``.
        alpha, beta, gamma: the weights above, real numbers >= 0 (checked unless traced).
        weights: optional ``(N,)`` sample weights ``>= 0`` (e.g. the pipeline's padding
            ``mask``); pair ``(i, j)`` gets ``w_i w_j``. Negative weights are rejected where
            concrete; under ``jit`` they are not checked and give a meaningless ``J``.

    Returns:
        Scalar ``J``; 0 when every weight is 0 (an all-padding batch).
    """
    for name, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        check_real(v, name)
    pos_w, neg_w = _pair_weights(scores, weights)
    pos = jnp.diagonal(scores)
    e_pos, e_pos2 = jnp.sum(pos_w * pos), jnp.sum(pos_w * pos**2)
    e_neg, e_neg2 = jnp.sum(neg_w * scores), jnp.sum(neg_w * scores**2)
    return e_pos - alpha * e_neg - 0.5 * beta * e_pos2 - 0.5 * gamma * e_neg2


def infonce_objective(scores: jax.Array, *, weights: jax.Array | None = None) -> jax.Array:
    r"""InfoNCE bound (to MAXIMISE), the standard batch estimate (the supplementary's Eq. (6)
    prints the log outside both expectations, which gives other numbers):

    .. math:: J = \tfrac1N \sum_i \Big[ F_{ii} - \log \tfrac1N \sum_j e^{F_{ij}} \Big]

    Args:
        scores: ``(N, N)`` critic matrix, positives on the diagonal.
        weights: optional ``(N,)`` sample weights ``>= 0`` (anchors and candidates; a weight
            of 0 drops the sample). Negative weights are rejected where concrete; under
            ``jit`` they are not checked and give a meaningless ``J``.

    Returns:
        Scalar ``J``; 0 when every weight is 0 (an all-padding batch).
    """
    pos_w, _ = _pair_weights(scores, weights)
    w = pos_w > 0
    w = w | ~jnp.any(w)  # no valid sample: every anchor weighs 0, keep the log-mean-exp finite
    log_mean_exp = (jax.nn.logsumexp(jnp.where(w[None, :], scores, -jnp.inf), axis=1)
                    - jnp.log(jnp.sum(w)))
    return jnp.sum(pos_w * (jnp.diagonal(scores) - log_mean_exp))


OBJECTIVES = {"avce": avce_objective, "infonce": infonce_objective}


def discriminative_loss(disc: dict, *, margin: float = 1.0, hold_weight: float = 0.01,
                        weights: jax.Array | None = None) -> jax.Array:
    r"""Metric regulariser on the additional head's embeddings ``d_latent, d_sparse, d_soft``
    (each ``(N, D)``), as in the authors' code as read when this module was written (the
    supplementary names only a "triplet-based regularization")::

        mean_i relu(margin - ||d_sparse_i - d_soft_i||^2)                 # push views apart
        + hold_weight * mean_i (||n(d_sparse_i) - n(d_latent_i)||
                                + ||n(d_soft_i) - n(d_latent_i)||)       # keep directions

    with ``n(v) = v / ||v||``. To MINIMISE. ``weights``: optional ``(N,)`` sample weights ``>= 0``
    (means weighted by them; 0 when every weight is 0). Negative weights are rejected where
    concrete, unchecked under ``jit``.
    """
    check_real(margin, "margin")
    check_real(hold_weight, "hold_weight")
    missing = [k for k in ("latent", "sparse", "soft") if k not in disc]
    if missing:
        raise ValueError(f"disc: missing embeddings {missing}; expected 'latent', 'sparse', 'soft' (each (N, D))")
    d_lat, d_sp, d_sm = (jnp.asarray(disc[k]) for k in ("latent", "sparse", "soft"))
    if d_lat.ndim != 2 or d_sp.shape != d_lat.shape or d_sm.shape != d_lat.shape:
        raise ValueError(f"disc: got shapes latent {d_lat.shape}, sparse {d_sp.shape}, soft {d_sm.shape}; "
                         "expected three equal (N, D)")
    if weights is not None and np.shape(weights) != d_lat.shape[:1]:
        raise ValueError(f"weights: got shape {np.shape(weights)}, expected ({d_lat.shape[0]},)")
    check_weights(weights, "weights")
    eps = 1e-12
    norm = lambda v: jnp.sqrt(jnp.sum(v * v, -1) + eps)  # noqa: E731
    unit = lambda v: v / norm(v)[..., None]  # noqa: E731
    push = jax.nn.relu(margin - jnp.sum((d_sp - d_sm) ** 2, -1))
    hold = norm(unit(d_sp) - unit(d_lat)) + norm(unit(d_sm) - unit(d_lat))
    per_sample = push + hold_weight * hold
    w = jnp.ones_like(per_sample) if weights is None else jnp.asarray(weights, per_sample.dtype)
    return weighted_mean(per_sample, w)


def make_avce_loss(*, objective: str = "avce", contrastive_weight: float = 0.025,
                   pcc_weight: float = 0.5, ccc_weight: float = 0.5,
                   alpha: float = 0.5, beta: float = 0.005, gamma: float = 0.5,
                   critic: str = "cosine", critic_temperature: float = 1.0,
                   disc_weight: float = 0.1, margin: float = 1.0, hold_weight: float = 0.01,
                   target_key: str = "va", mask_key: str = "mask"):
    r"""Trainer loss ``loss_fn(outputs, batch, key) -> (scalar, metrics)`` for :class:`AVCE`.

    .. math::

        L = \sum_k \mathrm{MSE}(\hat{va}_k, va_k) + \lambda_p L_{PCC} + \lambda_{ccc} L_{CCC}
            - \lambda_c J(f) + \lambda_d L_{disc}

    * Regression: the authors' ``MSE_v + MSE_a + 0.5 L_PCC + 0.5 L_CCC``
      (:func:`hocp_jax.losses.pcc_loss`, :func:`hocp_jax.losses.ccc_loss`; weights
      ``pcc_weight``, ``ccc_weight``).
    * ``J``: ``objective="avce"`` -> :func:`avce_objective` (``alpha, beta, gamma``) or
      ``"infonce"`` -> :func:`infonce_objective`, on ``F = critic_matrix(z_sparse, z_soft)``:
      the critic compares the projections of the SparseMax and SoftMax views; image ``i``'s
      two views are the positive pair, views of different images the negatives.
    * ``lambda_c = contrastive_weight``: the authors' code uses ``1e-4`` times a SUM over a
      batch of 256, i.e. ~0.025 times the batch mean used here.
    * ``L_disc``: :func:`discriminative_loss` on ``outputs["disc"]``, weight ``disc_weight``
      (0 disables it).

    ``outputs`` is the :class:`hocp_jax.models.avce.AVCE` dict (``"va"`` ``(N, n_outputs)``,
    ``"z"`` with ``"sparse"`` and ``"soft"``, and ``"disc"`` unless ``disc_weight=0``);
    ``batch[target_key]`` is ``(N, n_outputs)`` like ``outputs["va"]``; ``batch[mask_key]``
    (optional, ``(N,)`` weights ``>= 0``, unchecked inside ``jit``) down-weights padding; an
    all-zero mask gives a finite loss.
    ``key`` is unused (the loss is deterministic). Metrics: ``mse``, ``l_pcc``, ``l_ccc``,
    ``rmse_<k>`` per output (``rmse_valence``, ``rmse_arousal`` for 2 outputs), ``bound``
    (``J``), ``pos_score`` / ``neg_score`` (mean critic on positive / negative pairs),
    ``disc``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {objective!r}")
    if critic not in CRITICS:
        raise ValueError(f"critic must be one of {CRITICS}, got {critic!r}")
    for name, value in (("contrastive_weight", contrastive_weight), ("pcc_weight", pcc_weight),
                        ("ccc_weight", ccc_weight), ("alpha", alpha), ("beta", beta), ("gamma", gamma),
                        ("disc_weight", disc_weight), ("margin", margin), ("hold_weight", hold_weight)):
        check_real(value, name)  # here, not at the first traced step
    check_real(critic_temperature, "critic_temperature", lambda v: v > 0, "a real number > 0")
    bound_kwargs = dict(alpha=alpha, beta=beta, gamma=gamma) if objective == "avce" else {}
    needed = ("va", "z", "disc") if disc_weight else ("va", "z")

    def loss_fn(outputs: dict, batch: dict, key=None):
        del key
        missing = [k for k in needed if k not in outputs]
        missing += [f"z[{k!r}]" for k in ("sparse", "soft") if "z" in outputs and k not in outputs["z"]]
        if missing:
            raise ValueError(f"avce loss: outputs lack {missing}, got keys {sorted(outputs)}; expected "
                             f"{list(needed)} with z['sparse'], z['soft']")
        if target_key not in batch:
            raise ValueError(f"avce loss: batch lacks {target_key!r}, got keys {sorted(batch)}")
        pred, target = outputs["va"], jnp.asarray(batch[target_key], outputs["va"].dtype)
        if pred.ndim != 2 or pred.shape != target.shape:
            raise ValueError(f"outputs['va'] has shape {pred.shape} and batch[{target_key!r}] has shape "
                             f"{target.shape}; expected both (N, n_outputs)")
        n = pred.shape[0]
        w = jnp.asarray(batch.get(mask_key, jnp.ones((n,))), pred.dtype)
        if w.shape != (n,):
            raise ValueError(f"batch[{mask_key!r}]: got shape {w.shape}, expected ({n},)")
        mse_k = weighted_mean((pred - target) ** 2, w[:, None], 0)
        scores = critic_matrix(outputs["z"]["sparse"], outputs["z"]["soft"], critic=critic,
                               temperature=critic_temperature)
        bound = OBJECTIVES[objective](scores, weights=w, **bound_kwargs)
        disc = (discriminative_loss(outputs["disc"], margin=margin, hold_weight=hold_weight,
                                    weights=w) if disc_weight else jnp.zeros((), pred.dtype))
        l_pcc = pcc_loss(target, pred, w) if pcc_weight else jnp.zeros((), pred.dtype)
        l_ccc = ccc_loss(target, pred, w) if ccc_weight else jnp.zeros((), pred.dtype)
        loss = (jnp.sum(mse_k) + pcc_weight * l_pcc + ccc_weight * l_ccc
                - contrastive_weight * bound + disc_weight * disc)
        pos_w, neg_w = _pair_weights(scores, w)
        metrics = {"mse": jnp.sum(mse_k), "l_pcc": l_pcc, "l_ccc": l_ccc, "bound": bound,
                   "disc": disc,
                   "pos_score": jnp.sum(pos_w * jnp.diagonal(scores)),
                   "neg_score": jnp.sum(neg_w * scores)}
        names = ("valence", "arousal") if mse_k.shape[0] == 2 else range(mse_k.shape[0])
        metrics.update({f"rmse_{k}": jnp.sqrt(m) for k, m in zip(names, mse_k)})
        return loss, metrics

    return loss_fn
