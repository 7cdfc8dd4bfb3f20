"""BReG-Net: residual networks with bounded-gradient shortcuts (Hasani, Negi, Mahoor, FG 2019).

Residual unit (paper Eq. 1), post-activation as in He et al. [9]::

    y_l     = H(P(x_l)) + F(x_l, W_l)
    x_{l+1} = relu(y_l)
    F(x)    = BN(conv3x3(relu(BN(conv3x3_stride_s(x)))))

``H`` is a shortcut function with a bounded derivative (paper Eq. 4, :data:`SHORTCUTS`):
``"identity"`` (plain ResNet), ``"h1"``, ``"h2"``, ``"h3"`` (the paper's best, §IV-C).
The down-sampling unit (Fig. 2c) uses stride 2 in the first conv of ``F`` (§III-A); ``P``
is the identity in a regular unit and, where the shape changes, a projection of the
shortcut: ``"pad"`` = stride-s sub-sampling + zero channel padding (parameter-free, the
projection of the TFLearn ``residual_block`` the authors built on; the unit itself follows
Eq. 1, ``relu(H(P(x)) + F(x))``, not TFLearn's pre-activation block) or ``"conv"`` = 1x1 stride-s conv + BN.
``H`` is applied to the projected shortcut, where the identity would be added.

Architecture (CIFAR-style, 3 stages; Fig. 4 is not in the text, widths are our choice)::

    stem conv3x3(widths[0]) - BN - relu
    stage k = 1..3: stage_sizes[k] residual units of width widths[k] (first unit of
                    stages 2, 3 down-samples)
    global average pool - [dense(head_hidden) - relu] - Head

Depth counts the weighted layers of the main path (stem + 2 per unit + hidden dense +
output dense, projections excluded, as in ResNet-110 = 6n + 2): ``"bregnet39"`` in
:data:`REGISTRY` is (6, 6, 6) units + one hidden dense layer = 1 + 36 + 1 + 1 = 39 (the
text does not name the 39th layer, and stem + 2 per unit + output is always even);
``"resnet110"`` is (18, 18, 18) units with identity shortcuts = 1 + 108 + 1 = 110.
Widths (32, 64, 128) give ResNet-110 6.9 M parameters (paper: 7.2 M); BReG-Net-39 then has
2.3 M (paper: 4.9 M). The paper's "we stack up 39 layers of these blocks" (§III-A) can also be
read as 39 residual units: (13, 13, 13) units at these widths have 4.95-4.99 M parameters
(``get_model("bregnet39", stage_sizes=(13, 13, 13))``; the head decides the rest), the
paper's 4.9 M, which favours that reading (a stop-79 audit); the registry keeps the layer
reading.

Heads (:class:`hocp_jax.models.heads.Head`): ``"logits" (B, n_classes)`` (categorical model)
and/or ``"va" (B, 2)`` (valence, arousal, trained with MSE as in §IV-C).

Objective: :func:`bregnet_loss` (class-weighted CE, §III-B, + MSE for valence/arousal).

Convs have no bias and TensorFlow "SAME" padding (the authors used TensorFlow/TFLearn); BN
as in :func:`hocp_jax.models.common.batch_norm`.

``conv="hocp"`` builds the 3x3 convs of every residual unit as :class:`hocp_jax.layers.CPConv`
(bounded shortcuts inside HO-CP blocks); the stem and 1x1 projections stay dense.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from hocp_jax import conv_ops, losses
from hocp_jax.checks import are_positive_ints, check_flags, check_real, is_positive_int
from hocp_jax.layers import CPConv
from hocp_jax.models.common import CheckedModel, batch_norm, check_cp_options, check_dtypes, check_input
from hocp_jax.metrics import check_weights, weighted_mean
from hocp_jax.models.heads import Head, HeadConfig

# --------------------------------------------------------------------------- shortcuts


def identity(x: jax.Array) -> jax.Array:
    """Plain ResNet shortcut ``H(x) = x``; ``H'(x) = 1``."""
    return x


def h1(x: jax.Array) -> jax.Array:
    """``H1(x) = x - log(e^x + 1) = -softplus(-x)`` (= log_sigmoid); ``H1'(x) = 1 / (1 + e^x)`` in (0, 1)."""
    return -jax.nn.softplus(-x)


def h2(x: jax.Array) -> jax.Array:
    """``H2(x) = x atan(x) - log(x^2 + 1) / 2``; ``H2'(x) = atan(x)`` in (-pi/2, pi/2)."""
    return x * jnp.arctan(x) - 0.5 * jnp.log1p(x * x)


def h3(x: jax.Array) -> jax.Array:
    """``H3(x) = atan(x)``; ``H3'(x) = 1 / (1 + x^2)`` in (0, 1]."""
    return jnp.arctan(x)


SHORTCUTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": identity, "h1": h1, "h2": h2, "h3": h3,
}
PROJECTIONS = ("pad", "conv")
CONVS = ("dense", "hocp")


def shortcut_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The shortcut function ``H`` called ``name`` (one of :data:`SHORTCUTS`)."""
    if name not in SHORTCUTS:
        raise ValueError(f"shortcut={name!r}: expected one of {tuple(SHORTCUTS)}")
    return SHORTCUTS[name]


def pad_projection(x: jax.Array, features: int, stride: int) -> jax.Array:
    """Parameter-free shortcut projection: ``x (B, H, W, C) -> (B, ceil(H/s), ceil(W/s), features)``.

    Sub-samples every ``stride``-th pixel (a 1x1 average pool with that stride) and zero-pads
    the channels, ``(features - C) // 2`` in front and the rest behind.
    """
    c = x.shape[-1]
    if features < c:
        raise ValueError(f"projection='pad': features={features} < input channels {c}; use projection='conv'")
    # x[:, ::s, ::s], sliced to the ceil(H/s) x ceil(W/s) positions in the form of lax's 'SAME' conv
    # output (with a symbolic size of jax.export, x[:, ::s] has another, whose equality JAX cannot prove).
    outs = [-(-d // stride) for d in x.shape[1:3]]
    x = lax.slice(x, (0,) * 4, (x.shape[0], *(stride * (o - 1) + 1 for o in outs), c), (1, stride, stride, 1))
    front = (features - c) // 2
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (front, features - c - front)))


# --------------------------------------------------------------------------- modules


def check_unit_options(module: nn.Module) -> None:
    """A ValueError naming the first of the residual unit's options (``shortcut``, ``projection``,
    ``conv``, ``rank``, ``rank_multiple``, ``psi``, ``skip``) on ``module`` (a :class:`BReGUnit` or
    the :class:`BReGNet` that passes them on) with a value the unit cannot take."""
    shortcut_fn(module.shortcut)
    if module.projection not in PROJECTIONS:
        raise ValueError(f"projection={module.projection!r}: expected one of {PROJECTIONS}")
    if module.conv not in CONVS:
        raise ValueError(f"conv={module.conv!r}: expected one of {CONVS}")
    check_flags(skip=module.skip)
    check_cp_options(module, ("rank", "rank_multiple", "psi", "skip"), hocp=module.conv == "hocp")


class BReGUnit(CheckedModel):
    """One BReG-Net residual unit (regular, or down-sampling when ``stride > 1``).

    Attributes:
      features: output channels.
      stride: stride of the first 3x3 conv of ``F`` (2 = down-sampling unit, Fig. 2c).
      shortcut: name of ``H`` in :data:`SHORTCUTS`.
      projection: ``"pad"`` or ``"conv"``, used where the shape changes.
      conv: ``"dense"`` (``nn.Conv``) or ``"hocp"`` (:class:`CPConv`) for the two 3x3 convs.
      rank, rank_multiple, psi, skip: passed to :class:`CPConv` when ``conv="hocp"``; checked
        whatever ``conv``, and ``conv="dense"`` refuses any but their defaults.
      dtype, param_dtype: computation and parameter dtypes (Flax semantics).
    """

    features: int
    stride: int = 1
    shortcut: str = "h3"
    projection: str = "pad"
    conv: str = "dense"
    rank: int | None = None
    rank_multiple: float | None = None
    psi: str | None = None
    skip: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _dt(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _conv3x3(self, x, stride: int, name: str, train: bool):
        if self.conv == "hocp":
            return CPConv(self.features, 3, rank=self.rank, rank_multiple=self.rank_multiple, stride=stride,
                          psi=self.psi, skip=self.skip, name=name, **self._dt())(x, train=train)
        return nn.Conv(self.features, (3, 3), strides=stride, padding="SAME", use_bias=False,
                       kernel_init=nn.initializers.he_normal(), conv_general_dilated=conv_ops.conv_general_dilated,
                       name=name, **self._dt())(x)

    @nn.nowrap
    def check_fields(self) -> None:
        check_unit_options(self)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x (B, H, W, C) -> (B, ceil(H/stride), ceil(W/stride), features)``."""
        h_fn = shortcut_fn(self.shortcut)
        check_flags(train=train)
        f = self._conv3x3(x, self.stride, "conv1", train)
        f = nn.relu(batch_norm(train, name="bn1", **self._dt())(f))
        f = self._conv3x3(f, 1, "conv2", train)
        f = batch_norm(train, name="bn2", **self._dt())(f)
        s = x
        if self.stride != 1 or x.shape[-1] != self.features:
            if self.projection == "pad":
                s = pad_projection(x, self.features, self.stride)
            else:
                s = nn.Conv(self.features, (1, 1), strides=self.stride, use_bias=False, kernel_init=nn.initializers.he_normal(),
                            conv_general_dilated=conv_ops.conv_general_dilated, name="proj_conv", **self._dt())(x)
                s = batch_norm(train, name="proj_bn", **self._dt())(s)
        return nn.relu(h_fn(s) + f)


class BReGNet(CheckedModel):
    """CIFAR-style BReG-Net / ResNet (see module docstring); channels-last images.

    Attributes:
      stage_sizes: residual units per stage.
      widths: channels per stage (same length as ``stage_sizes``).
      shortcut, projection, conv, rank, rank_multiple, psi, skip: see :class:`BReGUnit`.
      head_hidden: width of an optional hidden dense layer (+ relu) after the global pool.
      head: a :class:`~hocp_jax.models.heads.HeadConfig` (or dict of its fields): ``n_classes``
        logits and/or ``n_outputs`` valence/arousal outputs.
      dtype, param_dtype: computation and parameter dtypes of every layer (Flax semantics).

    ``apply(variables, x (B, H, W, C), train=bool, mutable=["batch_stats"])`` returns
    ``{"logits": (B, n_classes)}`` and/or ``{"va": (B, n_outputs)}``.
    """

    stage_sizes: Sequence[int] = (6, 6, 6)
    widths: Sequence[int] = (32, 64, 128)
    shortcut: str = "h3"
    projection: str = "pad"
    conv: str = "dense"
    rank: int | None = None
    rank_multiple: float | None = None
    psi: str | None = None
    skip: bool = False
    head_hidden: int | None = None
    head: HeadConfig = HeadConfig()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.nowrap
    def check_fields(self) -> None:
        check_unit_options(self)
        check_dtypes(self)
        if not are_positive_ints(self.stage_sizes):
            raise ValueError(f"stage_sizes={self.stage_sizes!r}: expected a non-empty sequence of ints >= 1")
        if not (are_positive_ints(self.widths) and len(self.widths) == len(self.stage_sizes)):
            raise ValueError(f"widths={self.widths!r}: expected {len(self.stage_sizes)} ints >= 1 (one per stage)")
        if self.head_hidden is not None and not is_positive_int(self.head_hidden):
            raise ValueError(f"head_hidden={self.head_hidden!r}: expected an int >= 1 or None")
        HeadConfig.of(self.head)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        check_flags(train=train)
        check_input(x, f"BReGNet(shortcut={self.shortcut!r})", {4: "(batch, H, W, C) images"})
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, kernel_init=nn.initializers.he_normal(),
                    conv_general_dilated=conv_ops.conv_general_dilated, name="stem_conv", **dt)(x)
        h = nn.relu(batch_norm(train, name="stem_bn", **dt)(h))
        for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(n):
                h = BReGUnit(w, stride=2 if (i > 0 and j == 0) else 1, shortcut=self.shortcut,
                             projection=self.projection, conv=self.conv, rank=self.rank,
                             rank_multiple=self.rank_multiple, psi=self.psi, skip=self.skip,
                             name=f"layer{i + 1}_{j}", **dt)(h, train=train)
        if self.head_hidden is None:
            return Head(HeadConfig.of(self.head), name="head", **dt)(h)
        h = nn.relu(nn.Dense(self.head_hidden, name="fc_hidden", **dt)(h.mean(axis=(1, 2))))
        return Head(HeadConfig.of(self.head), n_spatial=0, name="head", **dt)(h)


def bregnet_loss(outputs: dict, batch: dict, key: jax.Array | None = None, *, class_weights=None,
                 va_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """BReG-Net objective for a generic trainer: ``loss_fn(outputs, batch, key) -> (loss, metrics)``.

    ``loss = CE_H(logits, label) + va_weight * MSE(va_pred, va)`` with the terms present in both
    ``outputs`` and ``batch``: the class-weighted cross-entropy of §III-B, Eq. 5-7
    (:func:`hocp_jax.losses.cross_entropy`; ``class_weights`` = ``H_ii`` from
    :func:`hocp_jax.losses.class_weights`, None = plain CE) and the mean square error the paper
    uses for valence/arousal (§IV-C). A ``batch["mask"]`` ``(B,)`` (padded eval batches)
    weights the examples. Bind the options with ``functools.partial``.

    Args:
        outputs: model outputs, ``"logits" (B, C)`` and/or ``"va" (B, k)``.
        batch: ``"label" (B,)`` int and/or ``"va" (B, k)``; optional ``"mask" (B,)``.
        key: unused (the loss is deterministic).
        class_weights: optional ``(C,)`` weights ``H_ii``.
        va_weight: weight of the regression term.

    Returns:
        ``(loss, metrics)``; metrics has ``"ce"``, ``"accuracy"`` and/or ``"va_mse"``.
    """
    del key
    mask = batch.get("mask")
    check_weights(mask, "batch['mask']")
    check_real(va_weight, "va_weight", lambda v: v >= 0, "a real number >= 0")
    loss, metrics = jnp.zeros(()), {}
    if "logits" in outputs and "label" in batch:
        logits, labels = outputs["logits"], batch["label"]
        ce = losses.cross_entropy(logits, labels, mask=mask, class_weights=class_weights)
        m = jnp.ones(labels.shape) if mask is None else jnp.asarray(mask, jnp.float32)
        hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        metrics |= {"ce": ce, "accuracy": weighted_mean(hit, m)}
        loss = loss + ce
    if "va" in outputs and "va" in batch:
        pred, target = outputs["va"], jnp.asarray(batch["va"], jnp.float32)
        if pred.shape != target.shape:
            raise ValueError(f"batch['va']: got shape {target.shape}, expected the model's {pred.shape}")
        m = jnp.ones(pred.shape[:1]) if mask is None else jnp.asarray(mask, jnp.float32)
        if m.shape != pred.shape[:1]:
            raise ValueError(f"batch['mask']: got shape {m.shape}, expected ({pred.shape[0]},), one weight per example")
        m = jnp.broadcast_to(m.reshape(m.shape + (1,) * (pred.ndim - 1)), pred.shape)
        mse = weighted_mean((pred - target) ** 2, m)
        metrics["va_mse"] = mse
        loss = loss + va_weight * mse
    if not metrics:
        raise ValueError(
            f"bregnet_loss: no term to compute; outputs have {sorted(outputs)}, batch has {sorted(batch)};"
            " expected 'logits' with batch 'label' and/or 'va' with batch 'va'"
        )
    return loss, metrics


def depth(stage_sizes: Sequence[int], head_hidden: int | None = None) -> int:
    """Weighted layers on the main path: stem + 2 per unit + [hidden dense] + output dense."""
    return 1 + 2 * sum(stage_sizes) + (head_hidden is not None) + 1


_TINY = dict(stage_sizes=(1, 1, 1), widths=(8, 16, 32))

# name -> (module class, its fields, tiny overrides), the format of hocp_jax.models' registry.
REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any], dict[str, Any]]] = {
    # BReG-Net-39 (§III-A, §IV-C): (6, 6, 6) units + hidden dense = 39 layers, H3 shortcut.
    "bregnet39": (BReGNet, dict(stage_sizes=(6, 6, 6), head_hidden=256, shortcut="h3"), _TINY | dict(head_hidden=16)),
    # the same with HO-CP 3x3 convs inside the bounded-shortcut units.
    "bregnet39_hocp": (BReGNet, dict(stage_sizes=(6, 6, 6), head_hidden=256, shortcut="h3", conv="hocp"),
                       _TINY | dict(head_hidden=16)),
    # the paper's baseline: ResNet-110 = (18, 18, 18) units, identity shortcuts (6n + 2, n = 18).
    "resnet110": (BReGNet, dict(stage_sizes=(18, 18, 18), shortcut="identity"), _TINY),
}
