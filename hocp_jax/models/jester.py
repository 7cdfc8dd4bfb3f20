"""The 3-D ConvNet for 20BN-Jester (supplementary Sec. 7, Fig. 5).

Four blocks ``conv 3x3x3 -> BN -> ELU -> max-pool 2x2x2`` with channels
(3, 64), (64, 128), (128, 256), (256, 256), then flatten -> FC 512 -> ELU -> head (FC to the
27 gesture classes). Input ``(B, T, H, W, 3)`` (paper: 18 x 84 x 84); the pools floor like
PyTorch's ``MaxPool3d``, so T, H, W must be >= 16. Padding 1 keeps conv sizes.

``conv``:

* ``"dense"``: bias-free ``nn.Conv`` 3x3x3 — conv params 27 * sum(C_in C_out) = 2,880,576.
* ``"hocp"``: :class:`~hocp_jax.layers.CPConv` over modes (t, h, w) (leaves ``factor_t``,
  ``factor_h``, ``factor_w``), rank ``6 x C_in``, ``psi="relu"``.
* ``"hocp_s"``: as ``"hocp"`` with the skip factor ``U^(S)`` (HO-CP conv-S) and ``psi="prelu"``.

For both HO-CP variants the CP leaves (``lambda``, ``factor_in``, ``factor_out``,
``factor_t/h/w``) total sum_l R_l (C_in + C_out + 3 + 3 + 3 + 1) = 1,183,338 (paper: 1.2M).
``hocp_s`` adds the skip factors (sum C_in C_out = 106,688) and the PReLU slopes (R per psi
stage) on top; the paper's table reports 1.2M for both variants, i.e. counts only the CP factors.

``psi_stages="all"`` (default) applies psi after the input contraction and after the h and w
1-D convs (Algorithm 1 applies it after each 1-D conv; CPConv never applies it after the
temporal conv); ``"in"`` only after the input contraction (paper Eq. 7). ``rank_multiple`` and
``psi_stages`` are checked whatever ``conv``; the dense net refuses any but their defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hocp_jax.checks import are_positive_ints, check_flags, is_int, is_positive_int
from hocp_jax.layers import CPConv
from hocp_jax.models.common import (CheckedModel, DenseConv, check_cp_options, check_dtypes, check_input,
                                    norm_act_pool)
from hocp_jax.models.heads import Head, HeadConfig

CONV_KINDS = ("dense", "hocp", "hocp_s")


class JesterNet(CheckedModel):
    """3-D ConvNet (see module docstring). Output ``{"logits": (B, n_classes)}`` by default."""

    conv: str = "dense"
    widths: Sequence[int] = (64, 128, 256, 256)
    fc_features: int = 512
    rank_multiple: float = 6.0
    psi_stages: str = "all"
    head: Any = HeadConfig(n_outputs=0, n_classes=27)
    dtype: Any = None  # computation dtype of every layer (Flax semantics), e.g. jnp.bfloat16
    param_dtype: Any = jnp.float32

    def _conv(self, features: int, name: str) -> nn.Module:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.conv == "dense":
            return DenseConv(features, (3, 3, 3), (1, 1, 1), name=name, **dt)
        skip = self.conv == "hocp_s"
        return CPConv(features, 3, rank_multiple=self.rank_multiple, padding=1, temporal_padding=1,
                      psi="prelu" if skip else "relu", psi_stages=self.psi_stages, skip=skip,
                      input_grad=name != "conv1", name=name, **dt)

    @nn.nowrap
    def check_fields(self) -> None:
        if self.conv not in CONV_KINDS:
            raise ValueError(f"conv={self.conv!r}: expected one of {CONV_KINDS}")
        check_cp_options(self, ("rank_multiple", "psi_stages"), hocp=self.conv != "dense")
        if not are_positive_ints(self.widths):
            raise ValueError(f"widths={self.widths!r}: expected a non-empty sequence of ints >= 1")
        if not is_positive_int(self.fc_features):
            raise ValueError(f"fc_features={self.fc_features!r}: expected an int >= 1")
        check_dtypes(self)
        HeadConfig.of(self.head)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """``(B, T, H, W, C)`` -> ``{"logits": (B, n_classes)}`` (plus ``"va"`` if configured)."""
        check_flags(train=train)
        name = f"JesterNet(conv={self.conv!r})"
        check_input(x, name, {5: "(batch, T, H, W, C) videos"})
        if not all(map(is_int, x.shape[1:4])):  # jax.export's symbolic sizes; a symbolic batch is fine
            raise ValueError(f"{name}: x has shape {tuple(x.shape)}, with symbolic T, H or W (jax.export); expected "
                             "static T, H and W (the head flattens the last feature maps into a Dense layer)")
        n_pool = 2 ** len(self.widths)
        if min(x.shape[1:4]) < n_pool:
            raise ValueError(f"{name}: x has shape {tuple(x.shape)}; T, H and W must be >= {n_pool} ({len(self.widths)} 2x2x2 pools)")
        for i, width in enumerate(self.widths):
            x = self._conv(width, f"conv{i + 1}")(x, train)
            x = norm_act_pool(train, "elu", (2, 2, 2), (2, 2, 2), ((0, 0),) * 3, name=f"bn{i + 1}", dtype=self.dtype,
                              param_dtype=self.param_dtype)(x)  # BN -> ELU -> pool, in pooled space
        x = x.reshape(x.shape[0], -1)
        x = nn.elu(nn.Dense(self.fc_features, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x))
        return Head(HeadConfig.of(self.head), n_spatial=0, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x)
