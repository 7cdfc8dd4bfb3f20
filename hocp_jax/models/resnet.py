r"""ResNet-18 family: dense 2-D, 3-D, R(2+1)D and HO-CP, one block parameterised by a conv factory.

Layout (He et al. 2016, ImageNet ResNet-18): stem conv 7x7/2 (64) + BN + ReLU + max-pool 3x3/2,
four stages of ``stage_sizes=(2, 2, 2, 2)`` basic blocks with ``widths=(64, 128, 256, 512)``
(stride 2 at the first block of stages 2-4, projection shortcut = 1x1 conv + BN when the
shape changes), then a :class:`~hocp_jax.models.heads.Head`. Convs have no bias; padding is
PyTorch's symmetric ``k // 2``; BN as in PyTorch (momentum 0.1, eps 1e-5).

``conv`` selects the factory that builds every conv (stem, block convs, shortcuts):

* ``"dense2d"``: ``nn.Conv`` k x k. Input ``(B, H, W, C)``.
* ``"dense3d"`` (ResNet-18-3D): 3 x k x k (stem 3x7x7, shortcuts 1x1x1). Input ``(B, T, H, W, C)``.
* ``"2plus1d"`` (R(2+1)D, Tran et al. 2018): 1 x k x k to ``M`` channels, BN, ReLU, 3 x 1 x 1.
  ``M = floor(t d^2 N_in N_out / (d^2 N_in + t N_out))`` (t=3, d=k). ``midplanes="block"``
  (default) evaluates it once per block with the block's ``(N_in, N_out)`` and uses it for
  both convs, as torchvision's ``r2plus1d_18`` does — this reproduces the paper's 31M;
  ``midplanes="conv"`` evaluates it per conv (exact parameter match with the 3-D conv, 33.2M).
  Stem: 1x7x7 to ``stem_mid=45`` channels then 3x1x1 (Tran et al.'s / torchvision's stem).
  Shortcuts 1x1x1. Input ``(B, T, H, W, C)``.
* ``"hocp"``: :class:`~hocp_jax.layers.CPConv` with the largest rank whose parameter count
  does not exceed the dense 2-D conv's (paper: "rank so that the number of parameters would be
  the same as the original convolution"), optional ``psi`` between factors. The stem 7x7 is a
  CPConv too. The 1x1 projection shortcuts stay DENSE 1x1 convs by default
  (``shortcut="dense"``): a CP 1x1 conv is only a low-rank matrix (rank
  ``C_in C_out / (C_in + C_out + 3)`` at equal budget), has no spatial factor to share, and a
  1x1 conv applied frame by frame is already the 1x1x1 shortcut of a 3-D ResNet, so
  transduction needs nothing there; ``shortcut="cp"`` makes them CPConvs as well.

Video (temporal) handling, identical for all 3-D variants and a transduced HO-CP model: the
temporal axis has stride 1 everywhere and is never pooled; the stem max-pool and the head's
global pool act on (H, W) only. Images give ``(B, n)`` outputs, videos ``(B, T, n)`` (one
prediction per frame). The HO-CP model takes ``(B, H, W, C)`` and — once its CPConv params
hold ``factor_t`` (transduction, or initialised on video) — ``(B, T, H, W, C)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hocp_jax.checks import are_positive_ints, check_flags, is_positive_int
from hocp_jax.layers import CPConv
from hocp_jax.models.common import (CheckedModel, DenseConv, batch_norm, check_cp_options, check_dtypes, check_input,
                                    max_pool_spatial)
from hocp_jax.models.heads import Head, HeadConfig

CONV_KINDS = ("dense2d", "dense3d", "2plus1d", "hocp")
IMAGE = "(batch, H, W, C) images"
VIDEO = "(batch, T, H, W, C) videos"
LAYOUTS = {"dense2d": {4: IMAGE}, "dense3d": {5: VIDEO}, "2plus1d": {5: VIDEO}, "hocp": {4: IMAGE, 5: VIDEO}}

# A conv factory: factory(features, kernel, stride, *, name, in_features, block_in, dtype, param_dtype)
# -> module called as m(x, train). ``kernel``/``stride`` are the spatial size/stride; ``in_features`` is the
# conv's input width, ``block_in`` the enclosing block's (only the R(2+1)D rules use them).
ConvFactory = Callable[..., nn.Module]


class Conv2Plus1D(nn.Module):
    """R(2+1)D unit: 1 x k x k spatial conv to ``mid_features``, BN, ReLU, t x 1 x 1 temporal conv."""

    features: int
    mid_features: int
    kernel_size: int = 3
    stride: int = 1
    temporal_kernel_size: int = 3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        k, s, dt = self.kernel_size, self.stride, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = DenseConv(self.mid_features, (1, k, k), (1, s, s), name="spatial", **dt)(x)
        y = nn.relu(batch_norm(train, name="bn_mid", **dt)(y))
        return DenseConv(self.features, (self.temporal_kernel_size, 1, 1), (1, 1, 1), name="temporal", **dt)(y)


def midplanes(in_features: int, out_features: int, kernel: int = 3, temporal_kernel: int = 3) -> int:
    """Tran et al. 2018: ``floor(t d^2 N_in N_out / (d^2 N_in + t N_out))``."""
    t, d2 = temporal_kernel, kernel * kernel
    return (t * d2 * in_features * out_features) // (d2 * in_features + t * out_features)


def dense2d_factory(features, kernel, stride, *, name, in_features, block_in, **dt):
    del in_features, block_in
    return DenseConv(features, (kernel, kernel), (stride, stride), name=name, **dt)


def dense3d_factory(features, kernel, stride, *, name, in_features, block_in, **dt):
    del in_features, block_in
    return DenseConv(features, (3 if kernel > 1 else 1, kernel, kernel), (1, stride, stride), name=name, **dt)


def r2plus1d_factory(features, kernel, stride, *, name, in_features, block_in, rule: str = "block", stem_mid: int | None = 45,
                     **dt):
    if kernel == 1:
        return DenseConv(features, (1, 1, 1), (1, stride, stride), name=name, **dt)
    if name == "stem" and stem_mid is not None:
        mid = stem_mid
    else:
        # the "block" rule uses the block's (N_in, N_out) for both of its convs (torchvision)
        mid = midplanes(block_in if rule == "block" else in_features, features, kernel)
    return Conv2Plus1D(features, mid, kernel, stride, name=name, **dt)


def hocp_factory(features, kernel, stride, *, name, in_features, block_in, psi=None, shortcut="dense",
                 implementation="auto", **dt):
    """The stem is told that it gets no input gradient (its input is the data), which ``auto`` uses."""
    del in_features, block_in
    if kernel == 1 and shortcut == "dense":
        return DenseConv(features, (1, 1), (stride, stride), name=name, **dt)
    return CPConv(features, kernel, stride=stride, padding=kernel // 2, psi=psi, implementation=implementation,
                  input_grad=name != "stem", name=name, **dt)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    features: int
    stride: int
    conv: ConvFactory
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c_in, dt = x.shape[-1], dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = self.conv(self.features, 3, self.stride, name="conv1", in_features=c_in, block_in=c_in, **dt)(x, train)
        y = nn.relu(batch_norm(train, name="bn1", **dt)(y))
        y = self.conv(self.features, 3, 1, name="conv2", in_features=self.features, block_in=c_in, **dt)(y, train)
        y = batch_norm(train, name="bn2", **dt)(y)
        if self.stride != 1 or c_in != self.features:
            x = self.conv(self.features, 1, self.stride, name="shortcut", in_features=c_in, block_in=c_in, **dt)(x, train)
            x = batch_norm(train, name="shortcut_bn", **dt)(x)
        return nn.relu(x + y)


class ResNet(CheckedModel):
    """ResNet-18 family (see module docstring).

    Attributes:
      conv: one of ``CONV_KINDS``.
      stage_sizes, widths: blocks per stage and their widths.
      stem_kernel: stem conv size (7).
      head: :class:`HeadConfig` or a dict of its fields (default: valence/arousal, 2 outputs).
      psi, shortcut: HO-CP options (``psi`` passed to every CPConv; ``shortcut`` "dense"/"cp").
      implementation: every CPConv's path (:func:`hocp_jax.conv.cp_conv`); ``"auto"`` picks
        factorized or reconstructed per layer and input shape (factorized whenever ``psi`` is set).
        ``psi``, ``shortcut`` and ``implementation`` are checked whatever ``conv``; a model without
        HO-CP convs refuses any but their defaults.
      midplanes, stem_mid: R(2+1)D options ("block"/"conv" rule; stem intermediate width,
        ``None`` = the M rule); other ``conv`` kinds refuse any but their defaults.
      dtype, param_dtype: computation and parameter dtypes of every layer (Flax semantics;
        e.g. ``dtype=jnp.bfloat16`` with float32 parameters).
    """

    conv: str = "dense2d"
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_kernel: int = 7
    head: Any = HeadConfig()
    psi: str | None = None
    shortcut: str = "dense"
    implementation: str = "auto"
    midplanes: str = "block"
    stem_mid: int | None = 45
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.nowrap
    def check_fields(self) -> None:
        if self.conv not in CONV_KINDS:
            raise ValueError(f"conv={self.conv!r}: expected one of {CONV_KINDS}")
        if self.shortcut not in ("dense", "cp"):
            raise ValueError(f"shortcut={self.shortcut!r}: expected 'dense' or 'cp'")
        check_cp_options(self, ("psi", "shortcut", "implementation"), hocp=self.conv == "hocp")
        if self.midplanes not in ("block", "conv"):
            raise ValueError(f"midplanes={self.midplanes!r}: expected 'block' or 'conv'")
        if not are_positive_ints(self.stage_sizes, empty=True):
            raise ValueError(f"stage_sizes={self.stage_sizes!r}: expected a sequence of ints >= 1 (blocks per stage)")
        if not are_positive_ints(self.widths):
            raise ValueError(f"widths={self.widths!r}: expected a non-empty sequence of ints >= 1")
        if self.stem_mid is not None and not is_positive_int(self.stem_mid):
            raise ValueError(f"stem_mid={self.stem_mid!r}: expected an int >= 1 or None (the rule's width)")
        for name in ("midplanes", "stem_mid") if self.conv != "2plus1d" else ():
            if getattr(self, name) != getattr(ResNet, name):  # dropped without a word before
                raise ValueError(f"{name}={getattr(self, name)!r} applies to R(2+1)D convs; conv={self.conv!r} has "
                                 f"none (leave it at {getattr(ResNet, name)!r})")
        if not is_positive_int(self.stem_kernel):
            raise ValueError(f"stem_kernel={self.stem_kernel!r}: expected an int >= 1")
        if len(self.stage_sizes) != len(self.widths):
            raise ValueError(f"stage_sizes={tuple(self.stage_sizes)} and widths={tuple(self.widths)}: expected equal lengths")
        check_dtypes(self)
        HeadConfig.of(self.head)

    def factory(self) -> ConvFactory:
        """The conv of ``conv``'s kind, with this model's options bound."""
        return {
            "dense2d": dense2d_factory,
            "dense3d": dense3d_factory,
            "2plus1d": functools.partial(r2plus1d_factory, rule=self.midplanes, stem_mid=self.stem_mid),
            "hocp": functools.partial(hocp_factory, psi=self.psi, shortcut=self.shortcut,
                                      implementation=self.implementation),
        }[self.conv]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """``(B, H, W, C)`` -> ``{"va": (B, n), ...}``; ``(B, T, H, W, C)`` -> ``{"va": (B, T, n), ...}``."""
        conv, dt = self.factory(), dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_flags(train=train)
        check_input(x, f"ResNet(conv={self.conv!r})", LAYOUTS[self.conv])
        x = conv(self.widths[0], self.stem_kernel, 2, name="stem", in_features=x.shape[-1], block_in=x.shape[-1],
                 **dt)(x, train)
        x = nn.relu(batch_norm(train, name="stem_bn", **dt)(x))
        x = max_pool_spatial(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        for i, (n_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(width, stride, conv, name=f"layer{i + 1}_{j}", **dt)(x, train)
        return Head(HeadConfig.of(self.head), n_spatial=2, name="head", **dt)(x)
