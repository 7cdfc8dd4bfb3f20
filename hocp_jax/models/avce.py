"""AVCE networks (Kim & Song, ECCV 2022, supplementary section 1): encoder, compressor,
regressor, projection head and the additional head for discriminative learning.

Data flow for images ``x (B, H, W, C)``::

    feat   = encoder(x)                      (B, h, w, C_enc)   AlexNet conv stack / ResNet-18
    latent = compressor(feat)                (B, L)             L = 32 (paper's CVXPY listing)
    views  = Sp(latent), Sm(latent)          (B, L) each        hocp_jax.contrastive
    va     = regressor(latent)               (B, n_outputs)     valence, arousal
    z      = projection(Sp), projection(Sm)  (B, P) each        shared head, P = 2
    disc   = additional(latent|Sp|Sm)        (B, D) each        shared head, D = 8

Sizes (paper: compressor AL ~294k, R18 ~545k, heads <= 10k parameters), reproduced
exactly with the authors' layer widths:

* compressor (AlexNet): adaptive avg-pool to 6x6, flatten, FC 9216 -> 32: 294,944.
* compressor (ResNet-18): global avg-pool, flatten, FC 512 -> 1000 (the ImageNet FC
  kept as a bottleneck, linear), FC 1000 -> 32: 545,032.
* regressor and projection head: FC 32 -> 256, BN, ReLU, FC 256 -> 2: 9,474 each.
* additional head: FC 32 -> 64, BN, ReLU, FC 64 -> 8: 2,760.

"AlexNet (tuned)" is AlexNet's five convolutions (2,469,696 params) with its 4096-wide
classifier replaced by the compressor: with the heads 2,786,348 parameters (2.79M; the
supplementary's Table 1 says 2.7M for AVCE (AL), and 11M for the ResNet-18 one, ours 11.74M).
Its section 1 says the heads "differ from each other in the types of dropout and activation
function", shown in its Figure 1, which is not in the text: ours are one MLP head without
dropout (our choice). Its regressor ends in an activation (section 8 removes "the last
activation function" for 7 outputs): ``bounded=True`` (``tanh``) does that, which
``configs/avce.py`` sets; ``get_model``'s default leaves it off. Adaptive pooling takes any feature map, so any input of at least
7x7 works (:class:`AlexNetEncoder`); the ResNet-18 trunk takes any of at least 1x1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hocp_jax.checks import are_positive_ints, check_flags, check_real, is_int, is_positive_int
from hocp_jax.contrastive import softmax_view, sparsemax
from hocp_jax.conv_ops import conv_general_dilated
from hocp_jax.models.common import CheckedModel, Dropout, batch_norm, check_dtypes, check_input, max_pool_spatial
from hocp_jax.models.heads import Head
from hocp_jax.models.resnet import ResNet

ALEXNET_WIDTHS = (64, 192, 384, 256, 256)


def adaptive_avg_pool(x: jax.Array, size: int | Sequence[int]) -> jax.Array:
    """PyTorch ``AdaptiveAvgPool2d`` on ``(B, H, W, C)``: output bin ``i`` of an axis of
    length ``n`` averages ``[floor(i n / s), ceil((i + 1) n / s))`` (bins may overlap or
    repeat, so any ``H, W >= 1`` works). Returns ``(B, s_h, s_w, C)``."""
    s_h, s_w = (size, size) if isinstance(size, int) else tuple(size)
    if x.ndim != 4:
        raise ValueError(f"adaptive_avg_pool: x must be (B, H, W, C), got shape {x.shape}")

    def pool_axis(x, axis, s):
        n = x.shape[axis]
        bins = [jnp.mean(jax.lax.slice_in_dim(x, (i * n) // s, -(-((i + 1) * n) // s), axis=axis),
                         axis=axis, keepdims=True) for i in range(s)]
        return jnp.concatenate(bins, axis=axis)

    return pool_axis(pool_axis(x, 1, s_h), 2, s_w)


class AlexNetEncoder(nn.Module):
    """AlexNet's convolutional feature extractor (torchvision layout), channels-last.

    conv11/4 -> pool3/2 -> conv5 -> pool3/2 -> conv3 -> conv3 -> conv3 -> pool3/2, ReLU after
    every conv; ``widths`` are the five conv widths (tiny variants for tests). Pools are
    VALID (floor) windows like PyTorch's; a pool whose input map is smaller than its 3x3
    window is skipped (PyTorch would raise), so small inputs such as 32x32 digits work, down to
    7x7: conv1's 11x11 window (stride 4, padding 2) needs H, W >= 7 (a ValueError below).
    """

    widths: Sequence[int] = ALEXNET_WIDTHS
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm / dropout in the conv stack
        if not (are_positive_ints(self.widths) and len(self.widths) == 5):
            raise ValueError(f"widths={self.widths!r}: expected 5 ints >= 1 (AlexNetEncoder's conv widths)")
        if not all(map(is_int, x.shape[1:3])):  # jax.export's symbolic sizes; a symbolic batch is fine
            raise ValueError(f"AlexNetEncoder: x has shape {tuple(x.shape)}, with symbolic H or W (jax.export); "
                             "expected static H and W (whether a pool applies depends on them)")
        if min(x.shape[1:3]) < 7:
            raise ValueError(f"AlexNetEncoder: x has shape {tuple(x.shape)}; expected H, W >= 7 (conv1's 11x11 "
                             "window, stride 4, padding 2)")

        def pool(x):
            if min(x.shape[1:3]) < 3:
                return x
            return max_pool_spatial(x, (3, 3), (2, 2), ((0, 0), (0, 0)))

        specs = [(11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)]
        for i, (width, (k, s, p)) in enumerate(zip(self.widths, specs)):
            x = nn.Conv(width, (k, k), strides=(s, s), padding=((p, p), (p, p)), dtype=self.dtype,
                        param_dtype=self.param_dtype, conv_general_dilated=conv_general_dilated,
                        name=f"conv{i + 1}")(x)
            x = nn.relu(x)
            if i in (0, 1, 4):
                x = pool(x)
        return x


def _skip_head(next_fun, args, kwargs, context):
    """Method interceptor: a :class:`Head` call returns its input (the feature map)."""
    if isinstance(context.module, Head) and context.method_name == "__call__":
        return args[0]
    return next_fun(*args, **kwargs)


class HeadlessEncoder(nn.Module):
    """Runs ``backbone(x, train)`` (e.g. :class:`~hocp_jax.models.resnet.ResNet`) up to its
    :class:`~hocp_jax.models.heads.Head` and returns the head's input, the ``(B, h, w, C)``
    feature map; the head is never built, so it has no parameters. Parameter names below
    ``backbone`` are the backbone's own (``stem``, ``layer1_0``, ...)."""

    backbone: nn.Module

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        with nn.intercept_methods(_skip_head):
            return self.backbone(x, train=train)


class Compressor(nn.Module):
    """Feature map ``(B, h, w, C)`` -> latent ``(B, latent_dim)``.

    Adaptive avg-pool to ``pool_size``, flatten, linear FCs of widths ``hidden``, dropout,
    FC to ``latent_dim``, ReLU (the authors' ``relu(lin0(dropout(x)))``).
    """

    pool_size: int = 6
    hidden: Sequence[int] = ()
    latent_dim: int = 32
    dropout_rate: float = 0.5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = adaptive_avg_pool(x, self.pool_size).reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, name=f"fc{i}", **dt)(x)
        x = Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.relu(nn.Dense(self.latent_dim, name="fc_latent", **dt)(x))


class MLPHead(nn.Module):
    """``(B, d) -> (B, features)``: FC ``hidden``, BatchNorm, ReLU, FC, optional tanh."""

    hidden: int
    features: int
    bounded: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.hidden, name="fc0", **dt)(x)
        x = batch_norm(train, name="bn", **dt)(x)
        x = nn.Dense(self.features, name="fc1", **dt)(nn.relu(x))
        return jnp.tanh(x) if self.bounded else x


class AVCE(CheckedModel):
    """The five AVCE networks; ``__call__(x, train)`` returns (shapes for ``x (B, H, W, C)``)::

        {"va": (B, n_outputs), "latent": (B, L),
         "views": {"sparse": (B, L), "soft": (B, L)},     # Sp(latent), Sm(latent)
         "z": {"sparse": (B, P), "soft": (B, P)},         # projections of the views
         "disc": {"latent": (B, D), "sparse": (B, D), "soft": (B, D)}}

    Attributes:
        encoder: module ``(x, train=...) -> (B, h, w, C)`` feature map.
        pool_size, compressor_hidden, latent_dim, dropout_rate: the :class:`Compressor`.
        head_hidden: hidden width of the regressor and projection head (256).
        n_outputs: regressor outputs (2 = valence, arousal).
        bounded: ``tanh`` on the regressor output (targets in ``[-1, 1]``).
        proj_dim: projection-head output ``P`` (2 in the paper).
        disc_hidden, disc_dim: the additional head (64, 8).
        softmax_temperature: temperature of the SoftMax view (1 = paper's Eq. (2)).
        dtype, param_dtype: computation and parameter dtypes of the compressor and the heads
            (Flax semantics; the builders below give the encoder the same).
    """

    encoder: nn.Module
    pool_size: int = 6
    compressor_hidden: Sequence[int] = ()
    latent_dim: int = 32
    dropout_rate: float = 0.5
    head_hidden: int = 256
    n_outputs: int = 2
    bounded: bool = False
    proj_dim: int = 2
    disc_hidden: int = 64
    disc_dim: int = 8
    softmax_temperature: float = 1.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.nowrap
    def check_fields(self) -> None:
        check_flags(bounded=self.bounded)
        check_dtypes(self)
        for field in ("pool_size", "latent_dim", "head_hidden", "n_outputs", "proj_dim", "disc_hidden", "disc_dim"):
            if not is_positive_int(getattr(self, field)):
                raise ValueError(f"{field}={getattr(self, field)!r}: expected an int >= 1")
        if not are_positive_ints(self.compressor_hidden, empty=True):
            raise ValueError(f"compressor_hidden={self.compressor_hidden!r}: expected a sequence of ints >= 1")
        check_real(self.dropout_rate, "dropout_rate", lambda v: 0 <= v < 1, "a number in [0, 1)")
        check_real(self.softmax_temperature, "softmax_temperature", lambda v: v > 0, "a real number > 0")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict:
        check_input(x, "AVCE", {4: "(batch, H, W, C) images"})
        check_flags(train=train)
        feat = self.encoder(x, train=train)
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        latent = Compressor(self.pool_size, tuple(self.compressor_hidden), self.latent_dim,
                            self.dropout_rate, name="compressor", **dt)(feat, train)
        views = {"sparse": sparsemax(latent),
                 "soft": softmax_view(latent, self.softmax_temperature)}
        va = MLPHead(self.head_hidden, self.n_outputs, self.bounded, name="regressor", **dt)(
            latent, train)
        proj = MLPHead(self.head_hidden, self.proj_dim, True, name="projection", **dt)
        disc = MLPHead(self.disc_hidden, self.disc_dim, False, name="additional", **dt)
        return {
            "va": va,
            "latent": latent,
            "views": views,
            "z": {k: proj(v, train) for k, v in views.items()},
            "disc": {k: disc(v, train) for k, v in dict(latent=latent, **views).items()},
        }


def avce_alexnet(widths: Sequence[int] = ALEXNET_WIDTHS, **kwargs) -> AVCE:
    """AVCE (AL): AlexNet conv stack + compressor avg-pool 6x6 -> FC(32) (``kwargs`` go to
    :class:`AVCE`; its ``dtype``/``param_dtype`` to the encoder too)."""
    kwargs = {"pool_size": 6, "compressor_hidden": (), **kwargs}
    dt = {k: kwargs[k] for k in ("dtype", "param_dtype") if k in kwargs}
    return AVCE(encoder=AlexNetEncoder(tuple(widths) if isinstance(widths, Sequence) else widths, **dt), **kwargs)


def avce_resnet18(conv: str = "dense2d", backbone: dict | None = None, **kwargs) -> AVCE:
    """AVCE (R18): ResNet-18 trunk from :mod:`hocp_jax.models.resnet` (``conv="dense2d"``,
    or ``"hocp"`` for the HO-CP ResNet-18) + compressor global avg-pool -> FC(1000) ->
    FC(32). ``backbone``: extra :class:`~hocp_jax.models.resnet.ResNet` fields (e.g. tiny
    ``stage_sizes``/``widths``, ``psi`` with ``conv="hocp"``; not ``conv``); ``kwargs`` go to :class:`AVCE`
    (its ``dtype``/``param_dtype`` to the backbone too, unless ``backbone`` sets them)."""
    if conv not in ("dense2d", "hocp"):
        raise ValueError(f"avce_resnet18: conv={conv!r}; expected 'dense2d' or 'hocp' (images)")
    backbone = {} if backbone is None else backbone
    if not isinstance(backbone, Mapping):
        raise ValueError(f"backbone={backbone!r}: expected a dict of ResNet fields or None")
    if "conv" in backbone:
        raise ValueError(f"backbone: conv={backbone['conv']!r}; pass conv to avce_resnet18 (avce_resnet18(conv=...), "
                         "get_model's 'avce_resnet18' or 'avce_resnet18_hocp'), not in backbone")
    kwargs = {"pool_size": 1, "compressor_hidden": (1000,), **kwargs}
    dt = {k: kwargs[k] for k in ("dtype", "param_dtype") if k in kwargs}
    fields = {f.name for f in dataclasses.fields(ResNet)} - {"parent", "name"}
    unknown = sorted(set(backbone) - fields)
    if unknown:
        raise ValueError(f"backbone: unknown ResNet field(s) {unknown}; expected some of {sorted(fields)}")
    return AVCE(encoder=HeadlessEncoder(ResNet(conv=conv, **(dt | dict(backbone)))), **kwargs)
