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
TFLearn ``residual_block`` the authors built on) or ``"conv"`` = 1x1 stride-s conv + BN.
``H`` is applied to the projected shortcut, where the identity would be added.

Architecture (CIFAR-style, 3 stages; Fig. 4 is not in the text, widths are our choice)::

    stem conv3x3(widths[0]) - BN - relu
    stage k = 1..3: stage_sizes[k] residual units of width widths[k] (first unit of
                    stages 2, 3 down-samples)
    global average pool - [dense(head_hidden) - relu] - heads

Depth counts the weighted layers of the main path (stem + 2 per unit + hidden dense +
output dense, projections excluded, as in ResNet-110 = 6n + 2): :func:`bregnet39` is
(6, 6, 6) units + one hidden dense layer = 1 + 36 + 1 + 1 = 39; :func:`resnet110` is
(18, 18, 18) units with identity shortcuts = 1 + 108 + 1 = 110.

Heads: ``{"logits": (B, num_classes)}`` (categorical model) and/or ``{"va": (B, 2)}``
(valence, arousal; linear, trained with MSE as in §IV-C).

``conv="hocp"`` builds the 3x3 convs of every residual unit as :class:`hocp_jax.layers.CPConv`
(bounded shortcuts inside HO-CP blocks); the stem and 1x1 projections stay dense.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hocp_jax.layers import CPConv

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
    x = x[:, ::stride, ::stride, :]
    front = (features - c) // 2
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (front, features - c - front)))


# --------------------------------------------------------------------------- modules


def _bn(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BReGUnit(nn.Module):
    """One BReG-Net residual unit (regular, or down-sampling when ``stride > 1``).

    Attributes:
      features: output channels.
      stride: stride of the first 3x3 conv of ``F`` (2 = down-sampling unit, Fig. 2c).
      shortcut: name of ``H`` in :data:`SHORTCUTS`.
      projection: ``"pad"`` or ``"conv"``, used where the shape changes.
      conv: ``"dense"`` (``nn.Conv``) or ``"hocp"`` (:class:`CPConv`) for the two 3x3 convs.
      rank, rank_multiple, psi, skip: passed to :class:`CPConv` when ``conv="hocp"``.
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

    def _conv3x3(self, x, stride: int, name: str, train: bool):
        if self.conv == "hocp":
            return CPConv(self.features, 3, rank=self.rank, rank_multiple=self.rank_multiple, stride=stride,
                          psi=self.psi, skip=self.skip, name=name)(x, train=train)
        return nn.Conv(self.features, (3, 3), strides=stride, padding="SAME", use_bias=False,
                       kernel_init=nn.initializers.he_normal(), name=name)(x)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x (B, H, W, C) -> (B, ceil(H/stride), ceil(W/stride), features)``."""
        h_fn = shortcut_fn(self.shortcut)
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection={self.projection!r}: expected one of {PROJECTIONS}")
        if self.conv not in CONVS:
            raise ValueError(f"conv={self.conv!r}: expected one of {CONVS}")
        f = self._conv3x3(x, self.stride, "conv1", train)
        f = nn.relu(_bn(train, "bn1")(f))
        f = self._conv3x3(f, 1, "conv2", train)
        f = _bn(train, "bn2")(f)
        s = x
        if self.stride != 1 or x.shape[-1] != self.features:
            if self.projection == "pad":
                s = pad_projection(x, self.features, self.stride)
            else:
                s = nn.Conv(self.features, (1, 1), strides=self.stride, use_bias=False,
                            kernel_init=nn.initializers.he_normal(), name="proj_conv")(x)
                s = _bn(train, "proj_bn")(s)
        return nn.relu(h_fn(s) + f)


class BReGNet(nn.Module):
    """CIFAR-style BReG-Net / ResNet (see module docstring); channels-last images.

    Attributes:
      num_classes: size of the ``"logits"`` head; ``None`` for no categorical head.
      va: add the ``"va"`` (valence, arousal) regression head.
      stage_sizes: residual units per stage.
      widths: channels per stage (same length as ``stage_sizes``).
      shortcut, projection, conv, rank, rank_multiple, psi, skip: see :class:`BReGUnit`.
      head_hidden: width of an optional hidden dense layer (+ relu) before the heads.

    ``apply(variables, x (B, H, W, C), train=bool, mutable=["batch_stats"])`` returns a dict
    with ``"logits" (B, num_classes)`` and/or ``"va" (B, 2)``.
    """

    num_classes: int | None = 7
    va: bool = False
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

    def _validate(self, x) -> None:
        shortcut_fn(self.shortcut)
        if x.ndim != 4:
            raise ValueError(f"x: got shape {tuple(x.shape)}; BReGNet expects images (batch, height, width, channels)")
        sizes, widths = tuple(self.stage_sizes), tuple(self.widths)
        if not sizes or any(not isinstance(n, int) or n < 1 for n in sizes):
            raise ValueError(f"stage_sizes={self.stage_sizes!r}: expected a non-empty sequence of ints >= 1")
        if len(widths) != len(sizes) or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths={self.widths!r}: expected {len(sizes)} ints >= 1 (one per stage)")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ValueError(f"num_classes={self.num_classes!r}: expected an int >= 1 or None")
        if self.num_classes is None and not self.va:
            raise ValueError("num_classes=None and va=False: the model needs at least one head")
        if self.head_hidden is not None and (not isinstance(self.head_hidden, int) or self.head_hidden < 1):
            raise ValueError(f"head_hidden={self.head_hidden!r}: expected an int >= 1 or None")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        self._validate(x)
        h = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False,
                    kernel_init=nn.initializers.he_normal(), name="stem_conv")(x)
        h = nn.relu(_bn(train, "stem_bn")(h))
        for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(n):
                h = BReGUnit(w, stride=2 if (i > 0 and j == 0) else 1, shortcut=self.shortcut,
                             projection=self.projection, conv=self.conv, rank=self.rank,
                             rank_multiple=self.rank_multiple, psi=self.psi, skip=self.skip,
                             name=f"layer{i + 1}_{j}")(h, train=train)
        h = jnp.mean(h, axis=(1, 2))
        if self.head_hidden is not None:
            h = nn.relu(nn.Dense(self.head_hidden, name="fc_hidden")(h))
        out = {}
        if self.num_classes is not None:
            out["logits"] = nn.Dense(self.num_classes, name="logits")(h)
        if self.va:
            out["va"] = nn.Dense(2, name="va")(h)
        return out


def depth(stage_sizes: Sequence[int], head_hidden: int | None = None) -> int:
    """Weighted layers on the main path: stem + 2 per unit + [hidden dense] + output dense."""
    return 1 + 2 * sum(stage_sizes) + (head_hidden is not None) + 1


def bregnet39(num_classes: int | None = 7, *, va: bool = False, shortcut: str = "h3",
              widths: Sequence[int] = (32, 64, 128), head_hidden: int = 256, **kwargs) -> BReGNet:
    """BReG-Net-39: (6, 6, 6) units + a hidden dense layer, ``H3`` shortcut (§IV-C)."""
    return BReGNet(num_classes=num_classes, va=va, stage_sizes=(6, 6, 6), widths=tuple(widths),
                   shortcut=shortcut, head_hidden=head_hidden, **kwargs)


def resnet110(num_classes: int | None = 7, *, va: bool = False, shortcut: str = "identity",
              widths: Sequence[int] = (32, 64, 128), **kwargs) -> BReGNet:
    """ResNet-110 baseline of the paper: (18, 18, 18) units, identity shortcuts."""
    return BReGNet(num_classes=num_classes, va=va, stage_sizes=(18, 18, 18), widths=tuple(widths),
                   shortcut=shortcut, **kwargs)


def bregnet_tiny(num_classes: int | None = 10, *, va: bool = False, shortcut: str = "h3", **kwargs) -> BReGNet:
    """Tiny (1, 1, 1)-unit, widths (8, 16, 32) variant for tests and smoke runs."""
    kwargs.setdefault("widths", (8, 16, 32))
    return BReGNet(num_classes=num_classes, va=va, stage_sizes=(1, 1, 1), shortcut=shortcut, **kwargs)
