"""Flax Linen layers: thin wrappers that create parameters and call the pure functions.

* :class:`CPConv` — HO-CP conv (paper Eq. 7, supplementary Algorithm 1), any number of
  spatial modes, optional Psi between factors, optional skip factor (HO-CP conv-S), and
  *transduction-ready*: the same module accepts ``(B, *S, C)`` images and, once its
  parameter tree holds temporal factors (``factor_t``, added by
  :func:`hocp_jax.transforms.transduce` or created when the module is initialised on video),
  ``(B, T, *S, C)`` videos.
* :class:`TuckerConv`, :class:`SeparableConv` (MobileNet form).
* :class:`TRL` — tensor regression layer (CP or Tucker weight, never materialised).

Mixed precision as in Flax: every layer takes ``dtype`` (computation; ``None`` = promote the
input and parameter dtypes) and ``param_dtype`` (storage, default float32); e.g.
``dtype=jnp.bfloat16`` computes in bfloat16 from float32 parameters.

Parameter names follow the convention of :mod:`hocp_jax.conv` (``lambda``, ``factor_in``,
``factor_out``, ``factor_<mode>``, ``factor_skip``, ``bias``); Psi sub-modules are named
``bn_<stage>`` / ``prelu_<stage>`` with stage ``in`` or a spatial mode name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from flax.linen.dtypes import promote_dtype
import jax.numpy as jnp
import numpy as np

from hocp_jax import conv, counting, regression
from hocp_jax.init import cp_factor_std, target_variance
from hocp_jax.padding import PaddingLike

PSI_CHOICES = (None, "relu", "prelu", "bn_relu", "bn_prelu")


def _tuple(v, n: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    if len(v) != n:
        raise ValueError(f"{name}={v!r}: expected an int or {n} values (one per spatial mode)")
    return v


def _existing_shape(module: nn.Module, name: str):
    """Shape of an existing param (apply after a transform such as transduce/prune), else None."""
    if module.is_initializing() or not module.has_variable("params", name):
        return None
    return tuple(module.get_variable("params", name).shape)


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...]) -> jax.Array:
    """``module.param`` with a clear ValueError when a stored leaf has an unexpected shape."""
    got = _existing_shape(module, name)
    if got is not None and got != tuple(shape):
        raise ValueError(
            f"params['{name}'] of layer '{module.name}': stored shape {got} does not fit the input; expected {tuple(shape)}"
        )
    return module.param(name, init, shape, module.param_dtype)


def _promote(module: nn.Module, x: jax.Array, params: dict[str, jax.Array]):
    """``x`` and ``params`` cast to the module's computation dtype (``flax.linen.dtypes.promote_dtype``)."""
    x, *values = promote_dtype(x, *params.values(), dtype=module.dtype)
    return x, dict(zip(params, values))


class PReLU(nn.Module):
    """Channel-wise PReLU ``max(0, x) + alpha * min(0, x)`` with ``alpha`` init 0.25."""

    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],), self.param_dtype)
        x, alpha = promote_dtype(x, alpha, dtype=self.dtype)
        return jnp.where(x >= 0, x, alpha * x)


class CPConv(nn.Module):
    """Higher-order CP convolution layer.

    Attributes:
      features: output channels ``C_out``.
      kernel_size: int or one size per spatial mode.
      rank: explicit rank R; else ``rank_multiple * C_in`` if given; else the largest rank
        whose parameter count does not exceed the dense conv's (the paper's rule).
      spatial_modes: names of the spatial axes (default ``("h","w")`` for 2-D kernels).
      temporal_modes: modes that transduction may add in front (default ``("t",)``).
      temporal_kernel_size / temporal_stride / temporal_padding: used when the layer is
        initialised directly on video (a from-scratch HO-CP 3-D model); a transduced tree
        brings its own temporal factor (its size is read from the tree).
      stride, padding, dilation: per spatial mode (temporal modes: ``temporal_*``, dilation 1).
      psi: ``None | "relu" | "prelu" | "bn_relu" | "bn_prelu"`` applied after the input
        contraction and, with ``psi_stages="all"``, after every spatial 1-D conv. Never after
        a temporal conv, so a delta-initialised temporal factor reproduces the static layer.
      skip: add the skip factor ``U^(S)`` (HO-CP conv-S).
      use_bias: add a bias.
      implementation: passed to :func:`hocp_jax.conv.cp_conv` (reconstructed needs psi=None).
      input_grad: False for a network's first layer (its input is the data, never
        differentiated); informs ``implementation="auto"`` (:func:`hocp_jax.conv.cp_conv`).
      gain: variance gain of the equivalent dense kernel (2 = He).
      dtype, param_dtype: computation and parameter dtypes (module docstring).
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    rank: int | None = None
    rank_multiple: float | None = None
    spatial_modes: Sequence[str] | None = None
    temporal_modes: Sequence[str] = ("t",)
    temporal_kernel_size: int = 3
    temporal_stride: int = 1
    temporal_padding: Any = "SAME"
    stride: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    dilation: int | Sequence[int] = 1
    psi: str | None = None
    psi_stages: str = "in"
    skip: bool = False
    use_bias: bool = False
    implementation: str = "factorized"
    input_grad: bool = True
    gain: float = 2.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _spatial(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        if self.spatial_modes is not None:
            modes = tuple(self.spatial_modes)
        else:
            modes = conv.default_modes(2 if isinstance(self.kernel_size, int) else len(tuple(self.kernel_size)))
        return modes, _tuple(self.kernel_size, len(modes), "kernel_size")

    def resolve_rank(self, in_channels: int) -> int:
        """The rank this layer uses for ``in_channels`` inputs (see class docstring)."""
        _, ks = self._spatial()
        if self.rank is not None:
            rank = self.rank
        elif self.rank_multiple is not None:
            rank = int(round(self.rank_multiple * in_channels))
        else:
            rank = counting.cp_rank_for_budget(in_channels, self.features, ks)
        if not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"rank={rank!r}: expected an int >= 1 (rank={self.rank}, rank_multiple={self.rank_multiple})")
        return int(rank)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x (B, *S, C_in)`` or ``(B, *T, *S, C_in)`` -> ``(B, [*T,] *S_out, features)``."""
        if self.psi not in PSI_CHOICES:
            raise ValueError(f"psi={self.psi!r}: expected one of {PSI_CHOICES}")
        if self.psi_stages not in ("in", "all"):
            raise ValueError(f"psi_stages={self.psi_stages!r}: expected 'in' or 'all'")
        spatial, ks = self._spatial()
        n_extra = x.ndim - 2 - len(spatial)
        if not 0 <= n_extra <= len(self.temporal_modes):
            raise ValueError(
                f"x: got shape {tuple(x.shape)}; {self.name or 'CPConv'} expects (batch, {', '.join(spatial)}, channels)"
                f" or with up to {len(self.temporal_modes)} leading temporal modes {tuple(self.temporal_modes)}"
            )
        temporal = tuple(self.temporal_modes)[len(self.temporal_modes) - n_extra:]
        for m in temporal:
            if not self.is_initializing() and not self.has_variable("params", conv.mode_key(m)):
                raise ValueError(
                    f"x: got {x.ndim - 2}-D input {tuple(x.shape)} but layer '{self.name}' has no '{conv.mode_key(m)}' "
                    "factor: it was built for static input. Transduce its parameters first "
                    "(hocp_jax.transforms.transduce) or initialise the model on video."
                )
        c_in = x.shape[-1]
        stored = _existing_shape(self, "lambda")  # a pruned tree keeps its (smaller) rank
        rank = stored[0] if stored else self.resolve_rank(c_in)
        tks = tuple((_existing_shape(self, conv.mode_key(m)) or (self.temporal_kernel_size,))[0] for m in temporal)
        std = cp_factor_std(rank, len(temporal) + len(spatial), target_variance(c_in, tks + ks, self.gain))
        normal = nn.initializers.normal(std)
        params = {
            "lambda": _param(self, "lambda", nn.initializers.ones, (rank,)),
            "factor_in": _param(self, "factor_in", normal, (c_in, rank)),
            "factor_out": _param(self, "factor_out", normal, (self.features, rank)),
        }
        for m, k in zip(temporal + spatial, tks + ks):
            params[conv.mode_key(m)] = _param(self, conv.mode_key(m), normal, (k, rank))
        if self.skip:
            params["factor_skip"] = _param(self, "factor_skip", nn.initializers.lecun_normal(), (c_in, self.features))
        if self.use_bias:
            params["bias"] = _param(self, "bias", nn.initializers.zeros, (self.features,))

        psi_at = ("in",) + (spatial if self.psi_stages == "all" else ())

        def psi(h, stage):
            if stage not in psi_at:
                return h
            if self.psi.startswith("bn_"):
                h = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"bn_{stage}")(h)
            if self.psi.endswith("prelu"):
                return PReLU(dtype=self.dtype, param_dtype=self.param_dtype, name=f"prelu_{stage}")(h)
            return nn.relu(h)

        strides = (self.temporal_stride,) * len(temporal) + _tuple(self.stride, len(spatial), "stride")
        dilation = (1,) * len(temporal) + _tuple(self.dilation, len(spatial), "dilation")
        sp_pad = self.padding if isinstance(self.padding, (str, int)) else tuple(self.padding)
        padding = (self.temporal_padding,) * len(temporal) + (
            (sp_pad,) * len(spatial) if isinstance(sp_pad, (str, int)) else sp_pad)
        x, params = _promote(self, x, params)
        return conv.cp_conv(
            x, params, modes=temporal + spatial, stride=strides, padding=padding, dilation=dilation,
            implementation=self.implementation, psi=psi if self.psi else None,
            mode_order=(spatial + temporal) if self.psi else None, input_grad=self.input_grad,
        )


class TuckerConv(nn.Module):
    """Tucker convolution (paper Eq. 4): 1x1 to ``ranks[0]``, core conv, 1x1 from ``ranks[1]``."""

    features: int
    kernel_size: Sequence[int] = (3, 3)
    ranks: tuple[int, int] | None = None
    rank_ratio: float = 0.5
    stride: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    implementation: str = "factorized"
    gain: float = 2.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ks = tuple(self.kernel_size)
        if x.ndim != len(ks) + 2:
            raise ValueError(f"x: got shape {tuple(x.shape)}, expected {len(ks) + 2}-D (batch, *spatial, channels)")
        c_in = x.shape[-1]
        r_in, r_out = self.ranks or (max(1, round(self.rank_ratio * c_in)), max(1, round(self.rank_ratio * self.features)))
        std = float((target_variance(c_in, ks, self.gain) / (r_in * r_out)) ** (1 / 6))
        normal = nn.initializers.normal(std)
        params = {
            "factor_in": _param(self, "factor_in", normal, (c_in, r_in)),
            "core": _param(self, "core", normal, ks + (r_in, r_out)),
            "factor_out": _param(self, "factor_out", normal, (self.features, r_out)),
        }
        x, params = _promote(self, x, params)
        return conv.tucker_conv(x, params, stride=self.stride, padding=self.padding, implementation=self.implementation)


class SeparableConv(nn.Module):
    """Depthwise-separable conv (MobileNet form): optional 1x1 expansion to ``rank``,
    depthwise ``kernel_size`` conv, 1x1 projection. ``rank=None`` means no expansion (v1)."""

    features: int
    kernel_size: Sequence[int] = (3, 3)
    rank: int | None = None
    stride: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ks = tuple(self.kernel_size)
        c_in = x.shape[-1]
        rank = self.rank or c_in
        params = {
            "depthwise": self.param("depthwise", nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=tuple(range(len(ks))), out_axis=-1), ks + (rank,), self.param_dtype),
            "factor_out": self.param("factor_out", nn.initializers.lecun_normal(in_axis=1, out_axis=0), (self.features, rank), self.param_dtype),
        }
        if self.rank is not None:
            params["factor_in"] = self.param("factor_in", nn.initializers.lecun_normal(), (c_in, rank), self.param_dtype)
        x, params = _promote(self, x, params)
        return conv.separable_conv(x, params, stride=self.stride, padding=self.padding)


class TRL(nn.Module):
    """Tensor regression layer on the trailing ``len(ranks)`` modes of ``x``.

    ``x (*batch, d_1, ..., d_k)`` (e.g. ``(B, H, W, C)``, or ``(B, T, H, W, C)`` for per-frame
    outputs) -> ``(*batch, features)``. ``decomposition="cp"``: weight
    ``sum_r lambda_r U_1[:, r] o ... o U_k[:, r] o U_out[:, r]``; ``"tucker"``: core
    ``(R_1..R_k, R_out)`` with factors. See :mod:`hocp_jax.regression`.
    """

    features: int
    rank: int | Sequence[int] = 16
    decomposition: str = "cp"
    n_modes: int = 3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < self.n_modes + 1:
            raise ValueError(f"x: got shape {tuple(x.shape)}, expected (*batch, d_1..d_{self.n_modes})")
        dims = x.shape[-self.n_modes:]
        fan_in = int(np.prod(dims))
        if self.decomposition == "cp":
            r = int(self.rank)
            std = float((1.0 / (fan_in * r)) ** (1 / (2 * (self.n_modes + 1))))
            init = nn.initializers.normal(std)
            params = {f"factor_{i}": _param(self, f"factor_{i}", init, (d, r)) for i, d in enumerate(dims)}
            params["factor_out"] = _param(self, "factor_out", init, (self.features, r))
            params["lambda"] = _param(self, "lambda", nn.initializers.ones, (r,))
        elif self.decomposition == "tucker":
            ranks = _tuple(self.rank, self.n_modes + 1, "rank")
            std = float((1.0 / fan_in / int(np.prod(ranks))) ** (1 / (2 * (self.n_modes + 2))))
            init = nn.initializers.normal(std)
            params = {f"factor_{i}": _param(self, f"factor_{i}", init, (d, r)) for i, (d, r) in enumerate(zip(dims, ranks))}
            params["factor_out"] = _param(self, "factor_out", init, (self.features, ranks[-1]))
            params["core"] = _param(self, "core", init, ranks)
        else:
            raise ValueError(f"decomposition={self.decomposition!r}: expected 'cp' or 'tucker'")
        params["bias"] = _param(self, "bias", nn.initializers.zeros, (self.features,))
        x, params = _promote(self, x, params)
        return regression.trl(x, params, n_modes=self.n_modes)
