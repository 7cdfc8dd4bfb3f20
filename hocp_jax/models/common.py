"""Helpers shared by the models: input and field validation, BatchNorm settings, a batch norm -> activation ->
max-pool block computed in pooled space, dropout, parameter counts."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from hocp_jax import conv_ops, explicit_sharding
from hocp_jax.checks import check_float_dtype, is_int, is_number, is_positive_int
from hocp_jax.conv import IMPLEMENTATIONS
from hocp_jax.layer_specs import PSI_CHOICES, PSI_STAGES
from hocp_jax.pooling import max_pool, monotone_max_pool


BN_MOMENTUM, BN_EPSILON = 0.9, 1e-5
"""The models' batch norm settings: PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5)."""


def batch_norm(train: bool, **kwargs) -> nn.BatchNorm:
    """BatchNorm with :data:`BN_MOMENTUM` and :data:`BN_EPSILON` (PyTorch's defaults)."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, **kwargs)


class NormActPool(nn.Module):
    """``max_pool_spatial(act(batch_norm(train)(x)))`` as one module with :func:`batch_norm`'s
    variables (params ``scale``, ``bias``; ``batch_stats`` ``mean``, ``var``, float32) and
    semantics (Flax's: batch statistics in at least float32, ``var = E[x^2] - E[x]^2`` clipped at
    0, the running averages updated with momentum 0.9 except at init, eps 1e-5), so a model's
    parameter tree and checkpoints are those of the separate layers.

    The normalisation and the activation run on the pooled values
    (:func:`hocp_jax.pooling.monotone_max_pool`): a train step reads the full-size input twice
    (statistics, pool) and writes and keeps no full-size activation; its gradient is one
    full-size pass. ``activation``: a key of :data:`hocp_jax.pooling.ACTIVATIONS`; ``window``,
    ``stride``, ``padding``: as in :func:`max_pool_spatial`. Output dtype: ``dtype``, else the
    promotion of ``x`` and the params, as ``nn.BatchNorm``'s. The Jester net's four blocks use it
    (its train steps 0.87x (HO-CP) and 0.97x (dense) the time of the separate layers, ``python -m
    benchmarks.experiments norm_pool``); the ResNet stem keeps the separate layers (a tie there)."""

    activation: str
    window: Sequence[int]
    stride: Sequence[int]
    padding: Sequence[tuple[int, int]]
    use_running_average: bool = False
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, ..., *S, C)`` -> ``(B, ..., *O, C)``, ``S`` the ``len(window)`` pooled axes."""
        c = x.shape[-1]  # activation, window, stride, padding: checked by monotone_max_pool and max_pool
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.promote_types(self.dtype or x.dtype, jnp.float32))
            mean = xf.mean(axes)
            var = jnp.maximum(jnp.square(xf).mean(axes) - jnp.square(mean), 0.0)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        mul = lax.rsqrt(var + self.epsilon) * scale
        y = monotone_max_pool(x, mul, bias, self.activation, self.window, self.stride, self.padding, center=mean)
        return y.astype(self.dtype or jnp.result_type(x, scale, bias))


def norm_act_pool(train: bool, activation: str, window: Sequence[int], stride: Sequence[int],
                  padding: Sequence[tuple[int, int]], **kwargs) -> NormActPool:
    """:class:`NormActPool`, the models' batch norm -> ReLU/ELU -> max-pool, for ``train``."""
    return NormActPool(activation, window, stride, padding, use_running_average=not train, **kwargs)


class Dropout(nn.Module):
    """``flax.linen.Dropout`` (the same ``"dropout"`` stream and masks for the same key and
    scope) whose mask is drawn with the input's sharding under explicit axes, where Flax's
    unsharded mask meets a split input in a select that has no sharding rule
    (:mod:`hocp_jax.explicit_sharding`)."""

    rate: float
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        if nn.merge_param("deterministic", self.deterministic, deterministic) or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep = 1.0 - self.rate
        split = PartitionSpec(*explicit_sharding.spec_of(x)) if explicit_sharding.is_split(x) else None
        mask = jax.random.bernoulli(self.make_rng("dropout"), p=keep, shape=x.shape, out_sharding=split)
        return lax.select(mask, x / keep, jnp.zeros_like(x))


class DenseConv(nn.Module):
    """Bias-free ``nn.Conv`` with symmetric ``k // 2`` padding, called as ``m(x, train)``
    (``train`` unused) so dense and factorized convs are interchangeable. Computed by
    :func:`hocp_jax.conv_ops.conv_general_dilated` (on CPU, 1x1 kernels as matrix products and
    3-D+ kernels over few input channels, a video network's first conv, as patches matrix products).

    A kernel with fewer axes than ``x`` has spatial axes treats the extra leading axes as batch."""

    features: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pad = tuple((k // 2, k // 2) for k in self.kernel_size)
        he = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # He, like torchvision's kaiming_normal_
        return nn.Conv(self.features, self.kernel_size, self.strides, padding=pad, use_bias=False, kernel_init=he,
                       dtype=self.dtype, param_dtype=self.param_dtype, conv_general_dilated=conv_ops.conv_general_dilated,
                       name="conv")(x)


def check_input(x: jax.Array, model: str, layouts: Mapping[int, str]) -> None:
    """Raises a ValueError naming ``model`` unless ``x.ndim`` is one of ``layouts``' keys and every
    size after the batch axis is >= 1 (a symbolic size of ``jax.export`` passes).

    ``layouts`` maps an accepted rank to its description, e.g. ``{4: "(batch, H, W, C) images"}``.
    """
    shape = tuple(getattr(x, "shape", ()))
    if getattr(x, "ndim", None) not in layouts:
        expected = " or ".join(layouts.values())
        raise ValueError(f"{model}: x has shape {shape} ({len(shape)}-D); expected {expected}")
    if any(is_int(d) and d < 1 for d in shape[1:]):
        raise ValueError(f"{model}: x has shape {shape}; expected {layouts[x.ndim]} with every size after the "
                         "batch >= 1")


def check_dtypes(module: nn.Module) -> None:
    """A ValueError naming ``module``'s ``dtype`` or ``param_dtype`` unless it is a floating
    dtype (``jnp.float32``, ``"bfloat16"``, ...) or None (Flax's default)."""
    for name in ("dtype", "param_dtype"):
        check_float_dtype(getattr(module, name), name, none=True)


CP_OPTIONS = {
    "psi": (lambda v: v in PSI_CHOICES, f"one of {PSI_CHOICES}"),
    "psi_stages": (lambda v: v in PSI_STAGES, f"one of {PSI_STAGES}"),
    "implementation": (lambda v: v in IMPLEMENTATIONS, f"one of {IMPLEMENTATIONS}"),
    "rank": (lambda v: v is None or is_positive_int(v), "an int >= 1 or None"),
    "rank_multiple": (lambda v: v is None or (is_number(v) and 0 < v < math.inf), "a real number > 0 or None"),
}
"""The values the models' options for their :class:`~hocp_jax.layers.CPConv` s take: (test, expected)."""


def check_cp_options(module: nn.Module, names: Sequence[str], hocp: bool) -> None:
    """A ValueError naming the first of ``module``'s HO-CP-only fields ``names`` that has a value
    :data:`CP_OPTIONS` refuses (the model checks the values of others first) or, unless ``hocp``
    (``module.conv`` builds HO-CP convs), a value other than its default: a dense model has no
    CPConv to pass it to, and would drop it without a word."""
    defaults = {f.name: f.default for f in dataclasses.fields(module)}
    for name in names:
        v = getattr(module, name)
        ok, expected = CP_OPTIONS.get(name, (None, ""))
        if ok and not ok(v):
            raise ValueError(f"{name}={v!r}: expected {expected}")
        if not hocp and v != defaults[name]:
            raise ValueError(f"{name}={v!r} applies to HO-CP convs; conv={module.conv!r} has none (leave it at "
                             f"{defaults[name]!r})")


class CheckedModel(nn.Module):
    """A model whose fields are checked when it is built: :meth:`check_fields` runs in
    ``__post_init__``, so a bad value raises its ValueError at construction (``get_model(...)``,
    ``ResNet(...)``), not when the model first runs on data. Flax builds a module again for each
    ``init``/``apply`` (clones), which checks the same fields again: a few comparisons. An override
    of ``check_fields`` is an ``nn.nowrap`` helper: Flax must not wrap it as a module method (it
    runs before the module is set up, e.g. under ``nn.tabulate``'s interceptor)."""

    @nn.nowrap
    def check_fields(self) -> None:
        """Raises a ValueError naming the first field whose value the model cannot take."""

    def __post_init__(self) -> None:
        self.check_fields()
        super().__post_init__()


def max_pool_spatial(x: jax.Array, window: Sequence[int], stride: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
    """Max-pool over the ``len(window)`` axes before the channels with explicit ``(lo, hi)``
    pads; leading axes (batch and, for videos, time) are left alone, so one call serves
    images and videos. Values and gradient of ``lax.reduce_window`` max (see :mod:`hocp_jax.pooling`)."""
    return max_pool(x, window, stride, padding)


def count_params(tree: Any) -> int:
    """Number of scalars in a params tree, or in ``tree["params"]`` if given full variables.

    Works on arrays and on the ``jax.ShapeDtypeStruct`` leaves of ``jax.eval_shape(model.init, ...)``
    (so full-size models are counted without allocating them). Batch statistics are not counted.
    """
    if isinstance(tree, Mapping) and "params" in tree:
        tree = tree["params"]
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def abstract_variables(model: nn.Module, shape: Sequence[int], dtype=jnp.float32):
    """``jax.eval_shape`` of ``model.init`` on an input of ``shape``: shapes only, no allocation."""
    x = jax.ShapeDtypeStruct(tuple(shape), dtype)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
