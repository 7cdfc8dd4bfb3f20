"""Flax NNX layers: the :mod:`hocp_jax.layers` (Linen) layers as ``nnx.Module``s.

Same pure core (:mod:`hocp_jax.conv`, :mod:`hocp_jax.regression`), same leaves (shapes,
names and initial distributions from :mod:`hocp_jax.layer_specs`): every leaf is an
``nnx.Param`` attribute named like the Linen leaf (``lambda``, ``factor_in``, ``factor_out``,
``factor_<mode>``, ``factor_skip``, ``bias``, ...), and the Psi sub-modules are
``bn_<stage>`` (``nnx.BatchNorm``: ``scale``/``bias`` params, ``mean``/``var`` batch stats)
and ``prelu_<stage>`` (``alpha``). So ``nnx.to_pure_dict(nnx.state(layer, nnx.Param))`` is
exactly the Linen ``params`` dict, and every parameter-tree function of the library
(``transduction.transduce``, ``optim.masked_optimizer``, ``optim.l1_lambda``, ...) works on it;
``nnx.replace_by_pure_dict`` + ``nnx.update`` load a transformed dict back.

Unlike Linen, NNX creates parameters in ``__init__``: the input channels (``in_features``)
are arguments, and a CP layer that should run on video is built with its temporal modes
(``temporal_modes=("t",)``) — then load a transduced static tree into it. Like Flax NNX,
``dtype`` is the computation dtype (default: inferred from input and params) and
``param_dtype`` the parameters' dtype; ``layer.eval()`` / ``layer.train()`` switch the Psi
batch norms to / from their running averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from hocp_jax import conv, layer_specs, regression, tensorized
from hocp_jax.checks import check_flags
from hocp_jax.padding import PaddingLike


def _create(module: nnx.Module, specs: layer_specs.Specs, rngs: nnx.Rngs, param_dtype) -> None:
    """One ``nnx.Param`` attribute per leaf of ``specs``, named like the leaf."""
    for name, (shape, init) in specs.items():
        setattr(module, name, nnx.Param(init(rngs.params(), shape, param_dtype)))


def _values(module: nnx.Module, names: Sequence[str], x: jax.Array, dtype) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``x`` and the named params as arrays promoted to one dtype (``dtype`` if given)."""
    x, *vals = promote_dtype((x, *(getattr(module, n)[...] for n in names)), dtype=dtype)
    return x, dict(zip(names, vals))


def _leaf_names(module: nnx.Module) -> list[str]:
    return [k for k, v in vars(module).items() if isinstance(v, nnx.Param)]


class PReLU(nnx.Module):
    """Channel-wise PReLU ``max(0, x) + alpha * min(0, x)``, ``alpha (C,)`` init 0.25."""

    def __init__(self, num_features: int, *, param_dtype=jnp.float32):
        self.alpha = nnx.Param(jnp.full((num_features,), 0.25, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.where(x >= 0, x, self.alpha[...].astype(x.dtype) * x)


class CPConv(nnx.Module):
    """Higher-order CP convolution (NNX version of :class:`hocp_jax.layers.CPConv`).

    Args:
      in_features, out_features: ``C_in``, ``C_out``.
      kernel_size, rank, rank_multiple, spatial_modes, stride, padding, dilation, psi,
        psi_stages, skip, use_bias, implementation, input_grad, gain: as in the Linen layer.
      temporal_modes: temporal modes this layer has factors for (default none: a static
        layer). It accepts inputs with 0 up to ``len(temporal_modes)`` leading temporal axes
        (``(B, [*T,] *S, C_in)``); with k of them it uses the last k modes, as the Linen layer.
      temporal_kernel_size / temporal_stride / temporal_padding: of those temporal modes.
      use_running_average: initial mode of the Psi batch norms (``eval()`` sets it True).
      dtype, param_dtype: computation and parameter dtypes (Flax convention).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int] = 3,
        *,
        rank: int | None = None,
        rank_multiple: float | None = None,
        spatial_modes: Sequence[str] | None = None,
        temporal_modes: Sequence[str] = (),
        temporal_kernel_size: int = 3,
        temporal_stride: int = 1,
        temporal_padding: Any = "SAME",
        stride: int | Sequence[int] = 1,
        padding: PaddingLike = "SAME",
        dilation: int | Sequence[int] = 1,
        psi: str | None = None,
        psi_stages: str = "in",
        skip: bool = False,
        use_bias: bool = False,
        implementation: str = "factorized",
        input_grad: bool = True,
        gain: float = 2.0,
        use_running_average: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        layer_specs.check_psi(psi, psi_stages)
        layer_specs.check_sizes(in_features=in_features, out_features=out_features,
                                temporal_kernel_size=temporal_kernel_size)
        check_flags(skip=skip, use_bias=use_bias, input_grad=input_grad, use_running_average=use_running_average)
        self.spatial, ks = layer_specs.spatial_layout(kernel_size, spatial_modes)
        self.temporal_modes = layer_specs.check_temporal_modes(temporal_modes, self.spatial)
        rank = layer_specs.cp_layer_rank(in_features, out_features, ks, rank, rank_multiple)
        mode_sizes = tuple((m, temporal_kernel_size) for m in self.temporal_modes) + tuple(zip(self.spatial, ks))
        _create(self, layer_specs.cp_specs(in_features, out_features, mode_sizes, rank, gain=gain, skip=skip,
                                           use_bias=use_bias), rngs, param_dtype)
        self.conv_args = dict(stride=stride, padding=padding, dilation=dilation, temporal_stride=temporal_stride,
                              temporal_padding=temporal_padding, implementation=implementation, psi=psi)
        layer_specs.cp_conv_kwargs(self.spatial, self.temporal_modes, **self.conv_args)  # checks them now, not at call
        self.psi, self.dtype, self.input_grad = psi, dtype, input_grad
        self.psi_at = layer_specs.psi_at(psi, psi_stages, self.spatial)
        for stage in self.psi_at:
            if psi.startswith("bn_"):
                setattr(self, f"bn_{stage}", nnx.BatchNorm(
                    rank, momentum=0.9, use_running_average=use_running_average, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs))
            if psi.endswith("prelu"):
                setattr(self, f"prelu_{stage}", PReLU(rank, param_dtype=param_dtype))

    def _psi(self, h: jax.Array, stage: str, use_running_average: bool | None) -> jax.Array:
        if stage not in self.psi_at:
            return h
        if self.psi.startswith("bn_"):
            h = getattr(self, f"bn_{stage}")(h, use_running_average=use_running_average)
        return getattr(self, f"prelu_{stage}")(h) if self.psi.endswith("prelu") else jax.nn.relu(h)

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """``x (B, [*T,] *S, C_in)`` -> ``(B, [*T,] *S_out, out_features)``."""
        if use_running_average is not None:
            check_flags(use_running_average=use_running_average)
        temporal = layer_specs.temporal_in_use(x.shape, self.spatial, self.temporal_modes, type(self).__name__)
        unused = {conv.mode_key(m) for m in self.temporal_modes if m not in temporal}
        x, params = _values(self, [n for n in _leaf_names(self) if n not in unused], x, self.dtype)
        psi = (lambda h, stage: self._psi(h, stage, use_running_average)) if self.psi else None
        return conv.cp_conv(x, params, psi=psi, psi_pointwise=layer_specs.psi_pointwise(self.psi),
                            input_grad=self.input_grad,
                            **layer_specs.cp_conv_kwargs(self.spatial, temporal, **self.conv_args))


class TuckerConv(nnx.Module):
    """Tucker convolution (NNX version of :class:`hocp_jax.layers.TuckerConv`): leaves
    ``factor_in (C_in, R_in)``, ``core (*K, R_in, R_out)``, ``factor_out (C_out, R_out)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int] = (3, 3),
        *,
        ranks: tuple[int, int] | None = None,
        rank_ratio: float = 0.5,
        stride: int | Sequence[int] = 1,
        padding: PaddingLike = "SAME",
        dilation: int | Sequence[int] = 1,
        implementation: str = "factorized",
        gain: float = 2.0,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        layer_specs.check_sizes(in_features=in_features, out_features=out_features)
        ranks = layer_specs.tucker_layer_ranks(in_features, out_features, ranks, rank_ratio)
        _create(self, layer_specs.tucker_specs(in_features, out_features, kernel_size, ranks, gain), rngs, param_dtype)
        layer_specs.check_conv_args(len(layer_specs.kernel_dims(kernel_size)), stride, padding, dilation)
        conv.check_tucker_implementation(implementation)
        self.conv_args = dict(stride=stride, padding=padding, dilation=dilation, implementation=implementation)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x (B, *S, C_in)`` -> ``(B, *S_out, out_features)``."""
        x, params = _values(self, _leaf_names(self), x, self.dtype)
        return conv.tucker_conv(x, params, **self.conv_args)


class SeparableConv(nnx.Module):
    """Depthwise-separable conv (NNX version of :class:`hocp_jax.layers.SeparableConv`):
    ``depthwise (*K, R)``, ``factor_out (C_out, R)`` and, with an expansion ``rank``, ``factor_in (C_in, R)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int] = (3, 3),
        *,
        rank: int | None = None,
        stride: int | Sequence[int] = 1,
        padding: PaddingLike = "SAME",
        dilation: int | Sequence[int] = 1,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        layer_specs.check_sizes(in_features=in_features, out_features=out_features)
        _create(self, layer_specs.separable_specs(in_features, out_features, kernel_size, rank), rngs, param_dtype)
        layer_specs.check_conv_args(len(layer_specs.kernel_dims(kernel_size)), stride, padding, dilation)
        self.conv_args = dict(stride=stride, padding=padding, dilation=dilation)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x (B, *S, C_in)`` -> ``(B, *S_out, out_features)``."""
        x, params = _values(self, _leaf_names(self), x, self.dtype)
        return conv.separable_conv(x, params, **self.conv_args)


class TRL(nnx.Module):
    """Tensor regression layer (NNX version of :class:`hocp_jax.layers.TRL`) on the trailing
    ``len(in_shape)`` modes: ``x (*batch, *in_shape)`` -> ``(*batch, features)``."""

    def __init__(
        self,
        in_shape: Sequence[int],
        features: int,
        *,
        rank: int | Sequence[int] = 16,
        decomposition: str = "cp",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        layer_specs.check_sizes(features=features)
        self.in_shape = layer_specs.shape_arg(in_shape, "in_shape")
        _create(self, layer_specs.trl_specs(self.in_shape, features, rank, decomposition), rngs, param_dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x, params = _values(self, _leaf_names(self), x, self.dtype)
        return regression.trl(x, params, n_modes=len(self.in_shape))


class FactorizedLinear(nnx.Module):
    """Linear layer with a CP / Tucker / TT-matrix weight (NNX version of
    :class:`hocp_jax.layers.FactorizedLinear`): ``x (*batch, prod(in_shape))`` ->
    ``(*batch, prod(out_shape))``. With ``tensor_dropout > 0`` it drops rank components unless
    ``deterministic`` (``eval()`` sets it), drawing keys from ``rngs``' ``dropout`` stream."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        factorization: str = "cp",
        rank: int | Sequence[int] = 8,
        use_bias: bool = True,
        implementation: str = "factorized",
        tensor_dropout: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        tensorized.check_rate(tensor_dropout, "tensor_dropout")
        check_flags(use_bias=use_bias, deterministic=deterministic)
        _create(self, layer_specs.factorized_linear_specs(in_shape, out_shape, factorization, rank, use_bias), rngs, param_dtype)
        self.implementation, self.tensor_dropout, self.deterministic, self.dtype = implementation, tensor_dropout, deterministic, dtype
        self.rngs = rngs["dropout"].fork() if tensor_dropout else nnx.data(None)

    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        if deterministic is not None:
            check_flags(deterministic=deterministic)
        x, params = _values(self, _leaf_names(self), x, self.dtype)
        deterministic = self.deterministic if deterministic is None else deterministic
        if self.tensor_dropout and not deterministic:
            params = tensorized.linear_dropout(params, self.rngs(), self.tensor_dropout)
        return tensorized.factorized_linear(x, params, implementation=self.implementation)


class TCL(nnx.Module):
    """Tensor contraction layer (NNX version of :class:`hocp_jax.layers.TCL`):
    ``x (*batch, *in_shape)`` -> ``(*batch, r_1..r_k)``."""

    def __init__(self, in_shape: Sequence[int], rank: int | Sequence[int], *, use_bias: bool = False, dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        check_flags(use_bias=use_bias)
        _create(self, layer_specs.tcl_specs(in_shape, rank, use_bias), rngs, param_dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x, params = _values(self, _leaf_names(self), x, self.dtype)
        return tensorized.tcl(x, params)


class TTConv(nnx.Module):
    """Tensor-train convolution (NNX version of :class:`hocp_jax.layers.TTConv`): leaves
    ``core_0 (1, C_in, R_1)``, ``core_n (R_n, K_n, R_{n+1})``, ``core_{N+1} (R_{N+1}, C_out, 1)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int] = (3, 3),
        *,
        rank: int | Sequence[int] = 8,
        stride: int | Sequence[int] = 1,
        padding: PaddingLike = "SAME",
        dilation: int | Sequence[int] = 1,
        use_bias: bool = False,
        implementation: str = "factorized",
        gain: float = 2.0,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        layer_specs.check_sizes(in_features=in_features, out_features=out_features)
        check_flags(use_bias=use_bias)
        _create(self, layer_specs.tt_conv_specs(in_features, out_features, kernel_size, rank, gain, use_bias), rngs, param_dtype)
        layer_specs.check_conv_args(len(layer_specs.kernel_dims(kernel_size)), stride, padding, dilation)
        conv.check_tucker_implementation(implementation)
        self.conv_args = dict(stride=stride, padding=padding, dilation=dilation, implementation=implementation)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x (B, *S, C_in)`` -> ``(B, *S_out, out_features)``."""
        x, params = _values(self, _leaf_names(self), x, self.dtype)
        return conv.tt_conv(x, params, **self.conv_args)
