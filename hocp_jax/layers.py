"""Flax Linen layers: thin wrappers that create parameters and call the pure functions.

* :class:`CPConv` — HO-CP conv (paper Eq. 7, supplementary Algorithm 1), any number of
  spatial modes, optional Psi between factors, optional skip factor (HO-CP conv-S), and
  *transduction-ready*: the same module accepts ``(B, *S, C)`` images and, once its
  parameter tree holds temporal factors (``factor_t``, added by
  :func:`hocp_jax.transduction.transduce` or created when the module is initialised on video),
  ``(B, T, *S, C)`` videos.
* :class:`TuckerConv`, :class:`SeparableConv` (MobileNet form), :class:`TTConv`.

A conv layer's ``kernel_size`` is one int per spatial mode, or one int for both modes of a 2-D conv.
* :class:`TRL` — tensor regression layer (CP or Tucker weight, built in full only where the
  contraction order finds that cheaper: :func:`hocp_jax.regression.trl`).

Mixed precision as in Flax: every layer takes ``dtype`` (computation; ``None`` = promote the
input and parameter dtypes) and ``param_dtype`` (storage, default float32); e.g.
``dtype=jnp.bfloat16`` computes in bfloat16 from float32 parameters (its outputs are bfloat16;
on the CPU backend the factorized CP path keeps its intermediates in float32,
:func:`hocp_jax.conv_plans.compute_dtype`, since XLA CPU runs bfloat16 arithmetic no faster).

Parameter names follow the convention of :mod:`hocp_jax.conv` (``lambda``, ``factor_in``,
``factor_out``, ``factor_<mode>``, ``factor_skip``, ``bias``); Psi sub-modules are named
``bn_<stage>`` / ``prelu_<stage>`` with stage ``in`` or a spatial mode name.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from hocp_jax import conv, layer_specs, regression, tensorized
from hocp_jax.checks import check_flags, is_positive_int
from hocp_jax.padding import PaddingLike


def _existing_shape(module: nn.Module, name: str):
    """Shape of an existing param (apply after a transform such as transduce/prune), else None."""
    if module.is_initializing() or not module.has_variable("params", name):
        return None
    return tuple(module.get_variable("params", name).shape)


def _stored_rank(module: nn.Module, names: Sequence[str]) -> int | None:
    """The rank R (last axis) that the stored CP leaves ``names`` share (a pruned tree keeps its
    smaller one), None at init; a ValueError names the leaf whose R differs from the others'."""
    shapes = {n: s for n in names if (s := _existing_shape(module, n)) is not None}
    ranks = [s[-1:] for s in shapes.values()]
    common = max(ranks, key=ranks.count, default=())
    for n, s in shapes.items():
        if s[-1:] != common:
            raise ValueError(
                f"params['{n}'] of layer '{module.name or type(module).__name__}': stored shape {s} does not have "
                f"the rank of the other CP leaves; expected {common[0]} in its last axis")
    return common[0] if common else None


def _params(module: nn.Module, specs: layer_specs.Specs, unused: dict[str, str] | None = None) -> dict[str, jax.Array]:
    """Creates (or reads) every leaf of ``specs`` (see :mod:`hocp_jax.layer_specs`).

    Applied to stored variables, the layer refuses a stored leaf that ``specs`` does not hold, which
    it would leave out without a word: a misspelt ``'bais'``, a trained ``factor_skip`` under
    ``skip=False``, a ``factor_t`` on a static input. ``unused`` maps such a leaf to why this call
    does not use it, for the message. Sub-dicts (Psi modules) are the sub-modules' own."""
    stored = {} if module.is_initializing() else module.variables.get("params", {})
    extra = sorted(k for k, v in stored.items() if k not in specs and not isinstance(v, Mapping))
    if extra:
        unused = unused or {}
        notes = [f"{k!r}: {unused[k]}" if k in unused else
                 "".join(f"did you mean {c!r} for {k!r}?" for c in difflib.get_close_matches(k, [*specs, *unused], n=1))
                 for k in extra]
        raise ValueError(f"layer '{module.name or type(module).__name__}': stored params {extra} that it does not use "
                         f"(it reads {list(specs)})" + "".join(f"; {n}" for n in notes if n))
    return {name: _param(module, name, init, shape) for name, (shape, init) in specs.items()}


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...]) -> jax.Array:
    """``module.param`` with a clear ValueError when a stored leaf has an unexpected shape."""
    got = _existing_shape(module, name)
    if got is not None and got != tuple(shape):
        raise ValueError(
            f"params['{name}'] of layer '{module.name or type(module).__name__}': stored shape {got} does not fit "
            f"the input; expected {tuple(shape)}"
        )
    return module.param(name, init, shape, module.param_dtype)


def _check_x_rank(x: jax.Array, kernel_size: Sequence[int]) -> None:
    """A ValueError unless ``x`` is ``(batch, *spatial, channels)`` with one spatial axis per kernel mode."""
    if x.ndim != len(kernel_size) + 2:
        raise ValueError(f"x: got shape {tuple(x.shape)}, expected {len(kernel_size) + 2}-D (batch, *spatial, channels) "
                         f"for kernel_size {tuple(kernel_size)}")


def _promote(module: nn.Module, x: jax.Array, params: dict[str, jax.Array]):
    """``x`` and ``params`` cast to the module's computation dtype (``flax.linen.dtypes.promote_dtype``)."""
    x, *values = promote_dtype(x, *params.values(), dtype=module.dtype)
    return x, dict(zip(params, values))


def prelu(x: jax.Array, alpha: jax.Array, dtype: Any = None) -> jax.Array:
    """``max(0, x) + alpha * min(0, x)`` with ``alpha (C,)`` over the last axis, both promoted (Flax rules)."""
    x, alpha = promote_dtype(x, alpha, dtype=dtype)
    return jnp.where(x >= 0, x, alpha * x)


class PReLU(nn.Module):
    """Channel-wise PReLU ``max(0, x) + alpha * min(0, x)`` with ``alpha`` init 0.25."""

    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def slopes(self, n: int) -> jax.Array:
        """The ``alpha (n,)`` leaf, created on first use."""
        return self.param("alpha", nn.initializers.constant(0.25), (n,), self.param_dtype)

    def __call__(self, x):
        return prelu(x, self.slopes(x.shape[-1]), self.dtype)


class CPConv(nn.Module):
    """Higher-order CP convolution layer.

    Attributes:
      features: output channels ``C_out``.
      kernel_size: int or one size per spatial mode.
      rank: explicit rank R; else ``rank_multiple * C_in`` if given; else the largest rank
        whose CP parameter count (factors and lambda; a ``skip`` factor and a bias come on top)
        does not exceed the dense conv's of the spatial kernel (the paper's rule; a layer
        initialised on video takes its static twin's rank, as transduction keeps it, not the
        budget of a dense conv with the temporal kernel too).
      spatial_modes: names of the spatial axes (default ``("h","w")`` for 2-D kernels).
      temporal_modes: modes that transduction may add in front (default ``("t",)``).
      temporal_kernel_size / temporal_stride / temporal_padding: used when the layer is
        initialised directly on video (a from-scratch HO-CP 3-D model); a transduced tree
        brings its own temporal factor (its size is read from the tree).
      stride, padding, dilation: per spatial mode (temporal modes: ``temporal_*``, dilation 1).
      psi: ``None | "relu" | "prelu" | "bn_relu" | "bn_prelu"`` applied after the input
        contraction and, with ``psi_stages="all"``, after every spatial 1-D conv. Never after
        a temporal conv, so a delta-initialised temporal factor reproduces the static layer.
        ``bn_*`` runs BatchNorm, then the activation (supplementary Algorithm 1 lists the
        activation first; Eq. 7's "batch normalisation combined with RELU" fixes no order).
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
        return layer_specs.spatial_layout(self.kernel_size, self.spatial_modes)

    def resolve_rank(self, in_channels: int) -> int:
        """The rank this layer uses for ``in_channels`` inputs (see class docstring)."""
        return layer_specs.cp_layer_rank(in_channels, self.features, self._spatial()[1], self.rank, self.rank_multiple)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x (B, *S, C_in)`` or ``(B, *T, *S, C_in)`` -> ``(B, [*T,] *S_out, features)``."""
        layer_specs.check_psi(self.psi, self.psi_stages)
        layer_specs.check_sizes(features=self.features, temporal_kernel_size=self.temporal_kernel_size)
        check_flags(skip=self.skip, use_bias=self.use_bias, input_grad=self.input_grad, train=train)
        spatial, ks = self._spatial()
        temporal_modes = layer_specs.check_temporal_modes(self.temporal_modes, spatial)
        temporal = layer_specs.temporal_in_use(x.shape, spatial, temporal_modes, self.name or "CPConv")
        for m in temporal:
            if not self.is_initializing() and not self.has_variable("params", conv.mode_key(m)):
                other = [k for k in self.variables.get("params", {}) if k.startswith("factor_")
                         and k[len("factor_"):] not in (*conv.RESERVED, *spatial, *temporal_modes)]
                raise ValueError(
                    f"x: got {x.ndim - 2}-D input {tuple(x.shape)} but layer '{self.name or 'CPConv'}' has no "
                    f"'{conv.mode_key(m)}' factor" + (
                        f": its parameters hold {other}, transduced with other mode names than temporal_modes="
                        f"{temporal_modes!r}? Give the layer those names, or transduce with them." if other else
                        ": it was built for static input. Transduce its parameters first "
                        "(hocp_jax.transduction.transduce) or initialise the model on video.")
                )
        c_in = x.shape[-1]
        cp_leaves = ["lambda", "factor_in", "factor_out"] + [conv.mode_key(m) for m in temporal + spatial]
        rank = _stored_rank(self, cp_leaves) or self.resolve_rank(c_in)
        tks = tuple((_existing_shape(self, conv.mode_key(m)) or (self.temporal_kernel_size,))[0] for m in temporal)
        unused = {"factor_skip": "skip=False", "bias": "use_bias=False"} | {
            conv.mode_key(m): f"x {tuple(x.shape)} has no '{m}' axis (a transduced layer runs on video)"
            for m in temporal_modes if m not in temporal}
        params = _params(self, layer_specs.cp_specs(
            c_in, self.features, tuple(zip(temporal + spatial, tks + ks)), rank,
            gain=self.gain, skip=self.skip, use_bias=self.use_bias), unused)
        psi_at = layer_specs.psi_at(self.psi, self.psi_stages, spatial)
        # PReLU slopes are read here, so that psi below is a pure function of h (cp_conv may call it
        # inside lax.map, one sample at a time); BatchNorm psi is never run per sample.
        slopes = {stage: PReLU(dtype=self.dtype, param_dtype=self.param_dtype, name=f"prelu_{stage}").slopes(rank)
                  for stage in psi_at} if self.psi and self.psi.endswith("prelu") else {}

        def psi(h, stage):
            if stage not in psi_at:
                return h
            if self.psi.startswith("bn_"):
                h = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"bn_{stage}")(h)
            return prelu(h, slopes[stage], self.dtype) if slopes else nn.relu(h)

        x, params = _promote(self, x, params)
        return conv.cp_conv(x, params, psi=psi if self.psi else None, input_grad=self.input_grad,
                            psi_pointwise=layer_specs.psi_pointwise(self.psi),
                            **layer_specs.cp_conv_kwargs(
            spatial, temporal, stride=self.stride, padding=self.padding, dilation=self.dilation,
            temporal_stride=self.temporal_stride, temporal_padding=self.temporal_padding,
            implementation=self.implementation, psi=self.psi))


class TuckerConv(nn.Module):
    """Tucker convolution (paper Eq. 4): 1x1 to ``ranks[0]``, core conv, 1x1 from ``ranks[1]``."""

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    ranks: tuple[int, int] | None = None
    rank_ratio: float = 0.5
    stride: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    dilation: int | Sequence[int] = 1
    implementation: str = "factorized"
    gain: float = 2.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layer_specs.check_sizes(features=self.features)
        ks = layer_specs.kernel_dims(self.kernel_size)
        _check_x_rank(x, ks)
        ranks = layer_specs.tucker_layer_ranks(x.shape[-1], self.features, self.ranks, self.rank_ratio)
        params = _params(self, layer_specs.tucker_specs(x.shape[-1], self.features, ks, ranks, self.gain))
        x, params = _promote(self, x, params)
        return conv.tucker_conv(x, params, stride=self.stride, padding=self.padding, dilation=self.dilation,
                                implementation=self.implementation)


class SeparableConv(nn.Module):
    """Depthwise-separable conv (MobileNet form): optional 1x1 expansion to ``rank``,
    depthwise ``kernel_size`` conv, 1x1 projection. ``rank=None`` means no expansion (v1)."""

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    rank: int | None = None
    stride: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    dilation: int | Sequence[int] = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layer_specs.check_sizes(features=self.features)
        params = _params(self, layer_specs.separable_specs(x.shape[-1], self.features, self.kernel_size, self.rank))
        x, params = _promote(self, x, params)
        return conv.separable_conv(x, params, stride=self.stride, padding=self.padding, dilation=self.dilation)


class TRL(nn.Module):
    """Tensor regression layer on the trailing ``n_modes`` modes of ``x``.

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
        layer_specs.check_sizes(features=self.features, n_modes=self.n_modes)
        if x.ndim < self.n_modes + 1:
            raise ValueError(f"x: got shape {tuple(x.shape)}, expected (*batch, d_1..d_{self.n_modes})")
        if not all(map(is_positive_int, x.shape[-self.n_modes:])):
            raise ValueError(f"x: got shape {tuple(x.shape)}, with symbolic sizes (jax.export) in the regressed modes "
                             "or a size 0; expected static sizes >= 1 (the TRL's factors follow them)")
        params = _params(self, layer_specs.trl_specs(x.shape[-self.n_modes:], self.features, self.rank, self.decomposition))
        x, params = _promote(self, x, params)
        return regression.trl(x, params, n_modes=self.n_modes)


# ----------------------------------------------------------------------------- tensorized layers


class FactorizedLinear(nn.Module):
    """Linear layer with a CP / Tucker / TT-matrix weight (:mod:`hocp_jax.tensorized`).

    ``x (*batch, prod(in_shape))`` -> ``(*batch, prod(out_shape))``. ``rank``: see
    :func:`hocp_jax.layer_specs.factorized_linear_specs`. ``tensor_dropout``: rate of tensor
    dropout applied when called with ``train=True`` (rng stream ``"dropout"``).
    ``dtype``/``param_dtype``: computation / parameter dtypes, as in Flax (also on ``TCL``, ``TTConv``).
    """

    in_shape: Sequence[int]
    out_shape: Sequence[int]
    factorization: str = "cp"
    rank: int | Sequence[int] = 8
    use_bias: bool = True
    implementation: str = "factorized"
    tensor_dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        tensorized.check_rate(self.tensor_dropout, "tensor_dropout")
        check_flags(use_bias=self.use_bias, train=train)
        params = _params(self, layer_specs.factorized_linear_specs(
            self.in_shape, self.out_shape, self.factorization, self.rank, self.use_bias))
        if train and self.tensor_dropout:
            params = tensorized.linear_dropout(params, self.make_rng("dropout"), self.tensor_dropout)
        x, params = _promote(self, x, params)
        return tensorized.factorized_linear(x, params, implementation=self.implementation)


class TCL(nn.Module):
    """Tensor contraction layer on the trailing ``n_modes`` modes (:func:`hocp_jax.tensorized.tcl`):
    ``x (*batch, d_1..d_k)`` -> ``(*batch, r_1..r_k)`` with ``rank`` an int or one ``r_i`` per mode."""

    rank: int | Sequence[int]
    n_modes: int = 3
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layer_specs.check_sizes(n_modes=self.n_modes)
        check_flags(use_bias=self.use_bias)
        if x.ndim < self.n_modes + 1:
            raise ValueError(f"x: got shape {tuple(x.shape)}, expected (*batch, d_1..d_{self.n_modes})")
        params = _params(self, layer_specs.tcl_specs(x.shape[-self.n_modes:], self.rank, self.use_bias))
        return tensorized.tcl(*_promote(self, x, params))


class TTConv(nn.Module):
    """Tensor-train convolution (:func:`hocp_jax.conv.tt_conv`); ``rank`` an int or the N + 1 inner TT ranks."""

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    rank: int | Sequence[int] = 8
    stride: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    dilation: int | Sequence[int] = 1
    use_bias: bool = False
    implementation: str = "factorized"
    gain: float = 2.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layer_specs.check_sizes(features=self.features)
        check_flags(use_bias=self.use_bias)
        _check_x_rank(x, layer_specs.kernel_dims(self.kernel_size))
        params = _params(self, layer_specs.tt_conv_specs(
            x.shape[-1], self.features, self.kernel_size, self.rank, self.gain, self.use_bias))
        x, params = _promote(self, x, params)
        return conv.tt_conv(x, params, stride=self.stride, padding=self.padding, dilation=self.dilation,
                            implementation=self.implementation)
