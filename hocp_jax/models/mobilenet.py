"""MobileNet-v2 for CIFAR-10 and its HO-CP variant (supplementary Sec. 6).

Layout of kuangliu/pytorch-cifar's ``MobileNetV2`` (the usual CIFAR-10 MobileNet-v2):
stem conv 3x3/1 to 32 + BN + ReLU; inverted-residual blocks from ``CIFAR_CFG`` rows
``(t, c, n, s)`` = (expansion, out channels, repeats, first stride), with the ImageNet table's
second stride set to 1 for 32x32 inputs; conv 1x1 to 1280 + BN + ReLU; global average pool;
head (FC to 10 classes). ReLU (not ReLU6) and a 1x1 conv + BN shortcut on stride-1 blocks
whose width changes, as in that layout. Convs have no bias.

Block, ``R = t * C_in``:

* ``conv="dense"``: 1x1 to R, BN, ReLU, 3x3 depthwise (stride s), BN, ReLU, 1x1 to C_out, BN.
* ``conv="hocp"``: a :class:`~hocp_jax.layers.CPConv` of rank R with
  ``psi="bn_relu", psi_stages="all"``: ``factor_in`` is the 1x1 expansion, BN+ReLU, ``factor_h``
  a 3x1 depthwise conv, BN+ReLU, ``factor_w`` a 1x3 depthwise conv, BN+ReLU, then
  ``diag(lambda) factor_out`` the 1x1 projection; followed by the same BN. The 3x3 depthwise
  kernel (9R) and its BN (2R) become 3R + 3R + an extra BN (2R) + lambda (R): the same count.

Parameter totals (10 classes): dense 2,296,922 (kuangliu's figure; paper: 2.30M); HO-CP
2,296,922 as well. The paper's 2.29M (Table 3) is what the HO-CP block gives without the
lambda vector (absorbed into the following BN): 2,296,922 - sum R = 2,289,786.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hocp_jax import conv_ops
from hocp_jax.checks import are_positive_ints, check_flags, is_positive_int
from hocp_jax.layers import CPConv
from hocp_jax.models.common import CheckedModel, DenseConv, batch_norm, check_dtypes, check_input
from hocp_jax.models.heads import Head, HeadConfig

CONV_KINDS = ("dense", "hocp")
CIFAR_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """MobileNet-v2 block (dense) or its HO-CP form (see module docstring)."""

    features: int
    expansion: int
    stride: int
    conv: str = "dense"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c_in, dt = x.shape[-1], dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rank = self.expansion * c_in
        if self.conv == "dense":
            y = nn.relu(batch_norm(train, name="bn_expand", **dt)(DenseConv(rank, (1, 1), (1, 1), name="expand", **dt)(x)))
            dw = nn.Conv(rank, (3, 3), self.stride, padding=1, feature_group_count=rank, use_bias=False,
                         kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                         conv_general_dilated=conv_ops.conv_general_dilated, name="depthwise", **dt)  # on CPU the shift kernel
            y = nn.relu(batch_norm(train, name="bn_depthwise", **dt)(dw(y)))
            y = DenseConv(self.features, (1, 1), (1, 1), name="project", **dt)(y)
        else:
            y = CPConv(self.features, 3, rank=rank, stride=self.stride, padding=1, psi="bn_relu", psi_stages="all",
                       name="cpconv", **dt)(x, train)
        y = batch_norm(train, name="bn_project", **dt)(y)
        if self.stride != 1:
            return y
        if c_in != self.features:
            x = batch_norm(train, name="shortcut_bn", **dt)(DenseConv(self.features, (1, 1), (1, 1), name="shortcut", **dt)(x))
        return x + y


class MobileNetV2(CheckedModel):
    """MobileNet-v2 for 32x32 images. Output ``{"logits": (B, 10)}`` by default.

    ``conv="hocp"`` also accepts ``(B, T, H, W, C)`` videos once its CPConvs hold ``factor_t``
    (per-frame outputs ``(B, T, n)``), like the HO-CP ResNet.
    """

    conv: str = "dense"
    cfg: Sequence[tuple[int, int, int, int]] = CIFAR_CFG
    stem_features: int = 32
    last_features: int = 1280
    head: Any = HeadConfig(n_outputs=0, n_classes=10)
    dtype: Any = None  # computation dtype of every layer (Flax semantics), e.g. jnp.bfloat16
    param_dtype: Any = jnp.float32

    @nn.nowrap
    def check_fields(self) -> None:
        if self.conv not in CONV_KINDS:
            raise ValueError(f"conv={self.conv!r}: expected one of {CONV_KINDS}")
        for name in ("stem_features", "last_features"):
            if not is_positive_int(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected an int >= 1")
        if not isinstance(self.cfg, Sequence) or not self.cfg or not all(
                are_positive_ints(row) and len(row) == 4 for row in self.cfg):
            raise ValueError(f"cfg={self.cfg!r}: expected rows (expansion t, channels c, blocks n, stride s) of "
                             "ints >= 1")
        check_dtypes(self)
        HeadConfig.of(self.head)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        check_flags(train=train)
        layouts = {4: "(batch, H, W, C) images"} | ({5: "(batch, T, H, W, C) videos"} if self.conv == "hocp" else {})
        check_input(x, f"MobileNetV2(conv={self.conv!r})", layouts)
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.relu(batch_norm(train, name="stem_bn", **dt)(DenseConv(self.stem_features, (3, 3), (1, 1), name="stem", **dt)(x)))
        for i, (t, c, n, s) in enumerate(self.cfg):
            for j in range(n):
                x = InvertedResidual(c, t, s if j == 0 else 1, self.conv, name=f"block{i + 1}_{j}", **dt)(x, train)
        x = nn.relu(batch_norm(train, name="last_bn", **dt)(DenseConv(self.last_features, (1, 1), (1, 1), name="last", **dt)(x)))
        return Head(HeadConfig.of(self.head), n_spatial=2, name="head", **dt)(x)
