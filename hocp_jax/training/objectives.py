"""What the jobs optimise and measure: training losses and streaming evaluation statistics.

* :func:`loss_fn` / :func:`make_loss`: ``(outputs, batch, key) -> (loss, metrics)`` for
  ``config.loss.kind``.
* :func:`eval_stats` (jittable, one batch) -> :func:`merge_stats` (jittable, two partial
  results) -> :func:`finalize_stats` (host, the whole split): RMSE/SAGR/PCC/CCC per target
  from :class:`hocp_jax.metrics.AffectStats`, categorical metrics from a confusion matrix.
  Nothing per example is kept, so a split of any size streams through.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp
import numpy as np

from hocp_jax import contrastive, losses, metrics
from hocp_jax.checks import is_int, is_number
from hocp_jax.models import bregnet
from hocp_jax.training.config import is_config_dict, validate_config

TARGETS = ("valence", "arousal")
LOSSES = ("affect", "bregnet", "avce")


def _is_real(v, low: float = 0.0) -> bool:
    return is_number(v) and math.isfinite(v) and v >= low


def _is_reals(v, n: int | None = None) -> bool:
    return isinstance(v, (tuple, list)) and (n is None or len(v) == n) and all(_is_real(x) for x in v)


# config.loss: the keys each kind reads (make_loss, loss_fn; l1_* by every job), with their checks.
LOSS_REQUIRED = {"affect": ("va_weight", "shake_shake", "ce_weight"), "bregnet": ("class_weighted", "va_weight"),
                 "avce": ("avce",)}
LOSS_CHECKS = {
    "kind": (lambda v: v in LOSSES, f"one of {LOSSES}"),
    "va_weight": (_is_real, "a number >= 0"),
    "ce_weight": (_is_real, "a number >= 0"),
    "shake_shake": (lambda v: isinstance(v, bool), "True or False"),
    "weights": (lambda v: _is_reals(v, 3) and sum(v) > 0, "3 numbers >= 0, not all 0: (alpha, beta, gamma)"),
    "class_weights": (lambda v: _is_reals(v) and all(x > 0 for x in v), "a tuple of numbers > 0 (or () for none)"),
    "class_weighted": (lambda v: isinstance(v, bool), "True or False"),
    "class_counts": (lambda v: isinstance(v, (tuple, list)) and all(is_int(x) and x >= 1 for x in v),
                     "a list of ints >= 1 (or [] for the training split's counts)"),
    "l1_gamma": (_is_real, "a number >= 0"),
    "l1_prox": (lambda v: isinstance(v, bool), "True or False"),
    "avce": (is_config_dict, "a dict of make_avce_loss's keyword arguments"),
}


def check_loss_config(cfg) -> None:
    """Checks ``config.loss`` before any data is read or stage trains: known keys, the keys its
    ``kind`` (default ``"affect"``) reads present, each value's type and range (``weights`` only
    where ``shake_shake`` is off, as :func:`loss_fn` reads it then; ``l1_prox`` where
    ``l1_gamma > 0``), and ``avce``'s keys and values those :func:`hocp_jax.contrastive.make_avce_loss`
    takes (it is called: it checks them and builds the loss, nothing runs).

    Raises:
        ValueError: naming the full key (e.g. ``config.loss.weights``), its value and what was expected.
    """
    validate_config(cfg, (), ("kind",), checks={"kind": LOSS_CHECKS["kind"]}, name="config.loss", open_keys=True)
    kind = cfg.get("kind", "affect")
    required = list(LOSS_REQUIRED[kind]) + ["l1_gamma"]
    if kind == "affect" and cfg.get("shake_shake") is False:
        required.append("weights")
    if _is_real(cfg.get("l1_gamma")) and cfg.get("l1_gamma") > 0:
        required.append("l1_prox")
    validate_config(cfg, required, LOSS_CHECKS, checks=LOSS_CHECKS, name="config.loss")
    if kind == "avce":
        allowed = [p for p in inspect.signature(contrastive.make_avce_loss).parameters]
        validate_config(cfg.avce, (), allowed, name="config.loss.avce")
        try:
            contrastive.make_avce_loss(**dict(cfg.avce))
        except ValueError as e:
            raise ValueError(f"invalid config.loss.avce: config.loss.avce.{e}") from None


def _flat(x: jax.Array) -> jax.Array:
    """``(B, [T,] k) -> (B*T, k)``: images and video frames alike."""
    return einops.rearrange(x, "... k -> (...) k")


def _per_frame(per_clip: jax.Array, n_frames: int) -> jax.Array:
    """``(B,)`` clip values repeated over the ``n_frames // B`` frames of each clip."""
    return einops.repeat(per_clip, "b -> (b t)", t=n_frames // per_clip.shape[0])


# ----------------------------------------------------------------------------- losses


def loss_fn(outputs: dict, batch: dict, key: jax.Array, *, cfg) -> tuple[jax.Array, dict]:
    """Shake-shake affect loss on ``va`` (+ ``ce_weight`` x class-weighted CE on ``logits``).

    Video outputs ``(B, T, k)`` are flattened to frames; a clip label ``(B,)`` is repeated
    over its frames.
    """
    total, terms = jnp.zeros(()), {}
    if "va" in outputs and cfg.va_weight > 0:
        kw = {"key": key} if cfg.shake_shake else {"weights": tuple(cfg.weights)}
        total, terms = losses.affect_loss(_flat(batch["va"]), _flat(outputs["va"]), **kw)
        total = cfg.va_weight * total
    if "logits" in outputs and cfg.ce_weight > 0:
        logits = _flat(outputs["logits"])
        weights = jnp.asarray(cfg.class_weights) if cfg.get("class_weights") else None
        ce = losses.cross_entropy(logits, _per_frame(batch["label"], logits.shape[0]), class_weights=weights)
        terms["ce"] = ce
        total = total + cfg.ce_weight * ce
    return total, terms


def make_loss(cfg, label_counts: Callable[[], list[int]]) -> Callable:
    """``loss_fn(outputs, batch, key)`` for ``cfg.kind`` (one of ``LOSSES``), ``cfg`` a stage's
    ``config.loss`` (with the stage's ``loss`` overrides).

    ``affect``: :func:`loss_fn`; ``bregnet``: class-weighted CE (H_ii = f_min / f_i from
    ``loss.class_counts``, else ``label_counts()``, the training split's counts) + MSE on
    valence/arousal; ``avce``: :func:`hocp_jax.contrastive.make_avce_loss` with ``loss.avce``.
    """
    kind = cfg.get("kind", "affect")
    if kind == "affect":
        return functools.partial(loss_fn, cfg=cfg)
    if kind == "bregnet":
        weights = None
        if cfg.class_weighted:
            counts = list(cfg.get("class_counts", [])) or label_counts()
            weights = losses.class_weights(np.asarray(counts))
        return functools.partial(bregnet.bregnet_loss, class_weights=weights, va_weight=cfg.va_weight)
    if kind == "avce":
        return contrastive.make_avce_loss(**dict(cfg.avce))
    raise ValueError(f"config.loss.kind={kind!r}: expected one of {LOSSES}")


# ----------------------------------------------------------------------------- evaluation


TOP_K = 5  # top-5 accuracy where there are more than 5 classes (the Jester paper's Table 4)


def eval_stats(outputs: dict, batch: dict) -> dict:
    """Statistics of one batch (jittable): ``{"va": AffectStats (2,), "cm": (C, C)}`` and, with
    more than :data:`TOP_K` classes, ``"top_k": (hits, count)`` (weighted sums).

    ``batch["mask"]`` ``(B,)`` (optional) weights the clips/images; padding has 0.
    """
    out, mask = {}, batch.get("mask")
    if "va" in outputs and "va" in batch:
        y, p = _flat(batch["va"]), _flat(outputs["va"])
        out["va"] = metrics.affect_stats(y, p, None if mask is None else _per_frame(mask, y.shape[0]))
    if "logits" in outputs and "label" in batch:
        logits = _flat(outputs["logits"])
        labels = _per_frame(batch["label"], logits.shape[0])
        m = None if mask is None else _per_frame(mask, logits.shape[0])
        out["cm"] = metrics.confusion_matrix(labels, jnp.argmax(logits, -1), logits.shape[-1], mask=m)
        if logits.shape[-1] > TOP_K:
            hit = jnp.any(jax.lax.top_k(logits, TOP_K)[1] == labels[:, None], axis=-1).astype(jnp.float32)
            w = jnp.ones_like(hit) if m is None else m.astype(jnp.float32)
            out["top_k"] = jnp.stack([jnp.sum(w * hit), jnp.sum(w)])
    return out


def merge_stats(a: dict, b: dict) -> dict:
    """Statistics of the union of two disjoint sets (jittable)."""
    out = {"va": metrics.merge(a["va"], b["va"])} if "va" in a else {}
    return out | {k: a[k] + b[k] for k in ("cm", "top_k") if k in a}


def finalize_stats(stats: dict, skew_repeats: int = 0) -> dict[str, float]:
    """RMSE/SAGR/PCC/CCC per target (``valence_ccc``, ...), categorical metrics
    (``class_accuracy``, ...) and, with ``skew_repeats``, their skew-normalised versions
    (``skew_...``, over that many class-balanced under-samples)."""
    out = {}
    if "va" in stats:
        for name, values in metrics.finalize(stats["va"]).items():
            out |= {f"{t}_{name}": float(v) for t, v in zip(TARGETS, np.atleast_1d(values))}
    if "cm" in stats:
        cm = np.asarray(stats["cm"])
        out |= {f"class_{k}": float(v) for k, v in metrics.classification_metrics(cm).items() if np.ndim(v) == 0}
        if "top_k" in stats:
            hits, count = np.asarray(stats["top_k"], np.float64)
            out[f"class_top{TOP_K}_accuracy"] = float(hits / count) if count else float("nan")
        if skew_repeats:
            skew = metrics.skew_normalized_from_cm(cm, n_repeats=skew_repeats)
            out |= {f"skew_{k}": float(v) for k, v in skew.items() if np.ndim(v) == 0}
    return out


def metric_fn(outputs: dict, batch: dict, *, skew_repeats: int = 0) -> dict[str, float]:
    """:func:`finalize_stats` of one batch's :func:`eval_stats` (e.g. in a notebook)."""
    return finalize_stats(jax.device_get(eval_stats(outputs, batch)), skew_repeats)
