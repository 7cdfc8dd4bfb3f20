"""Output heads: valence/arousal regression and optional class logits.

Every model ends with :class:`Head`, configured by a :class:`HeadConfig`:

* ``n_outputs`` regression outputs under ``"va"`` (2 = valence, arousal; 0 = none).
  ``bounded=True`` applies ``tanh`` so predictions lie in ``(-1, 1)`` — use it when the
  targets are normalised to ``[-1, 1]`` (AFEW-VA's ``[-10, 10]`` divided by 10, AffectNet's
  native range). ``bounded=False`` (default) is a plain linear output.
* ``n_classes`` logits under ``"logits"`` (0 = none), e.g. AffectNet's emotion classes,
  1000 ImageNet classes, 27 Jester gestures, 10 CIFAR-10 classes.
* ``trl``: ``False`` = global average pool over the spatial axes + fully-connected layer;
  ``True``/``"cp"`` or ``"tucker"`` = tensor regression layer on the un-pooled
  ``(H, W, C)`` activation (paper Sec. 5, "Implementation details"), rank ``trl_rank``: an int
  >= 1, for Tucker also one int >= 1 per regressed mode and the output.

The head keeps any leading axes: ``(B, H, W, C) -> (B, k)`` for images and
``(B, T, H, W, C) -> (B, T, k)`` for videos (per-frame predictions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hocp_jax.checks import are_positive_ints, check_flags, is_int, is_positive_int
from hocp_jax.layers import TRL

TRL_CHOICES = (False, True, "cp", "tucker")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """What a model predicts (see module docstring)."""

    n_outputs: int = 2
    n_classes: int = 0
    bounded: bool = False
    trl: bool | str = False
    trl_rank: int | tuple[int, ...] = 16

    def __post_init__(self):
        if isinstance(self.trl_rank, list):  # e.g. from a ConfigDict; keep the config hashable
            object.__setattr__(self, "trl_rank", tuple(self.trl_rank))
        for name in ("n_outputs", "n_classes"):
            v = getattr(self, name)
            if not (is_int(v) and v >= 0):
                raise ValueError(f"head.{name}={v!r}: expected an int >= 0")
        if self.n_outputs == 0 and self.n_classes == 0:
            raise ValueError("head: n_outputs=0 and n_classes=0; expected at least one output")
        check_flags(**{"head.bounded": self.bounded})
        if not (isinstance(self.trl, bool) or self.trl in TRL_CHOICES[2:]):  # 0 and 1 are == False and True
            raise ValueError(f"head.trl={self.trl!r}: expected one of {TRL_CHOICES}")
        tucker = self.trl == "tucker"
        if self.trl and not (is_positive_int(self.trl_rank) or tucker and are_positive_ints(self.trl_rank)):
            per_mode = " or one per regressed mode and the output" if tucker else ""
            raise ValueError(f"head.trl_rank={self.trl_rank!r}: expected an int >= 1{per_mode} (trl={self.trl!r})")

    @classmethod
    def of(cls, value: "HeadConfig | Mapping[str, Any] | None") -> "HeadConfig":
        """Accepts a HeadConfig, a dict of its fields, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"head: unknown keys {sorted(unknown)}; expected {[f.name for f in dataclasses.fields(cls)]}")
            return cls(**value)
        raise ValueError(f"head={value!r}: expected a HeadConfig or a dict of its fields")


class Head(nn.Module):
    """``x (*lead, *spatial, C)`` -> ``{"va": (*lead, n_outputs), "logits": (*lead, n_classes)}``.

    ``n_spatial`` trailing axes before the channels are pooled (or contracted by the TRL);
    ``n_spatial=0`` for an input that is already a feature vector.
    """

    config: HeadConfig = HeadConfig()
    n_spatial: int = 2
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        cfg = HeadConfig.of(self.config)
        trl = {True: "cp"}.get(cfg.trl, cfg.trl)
        if x.ndim < self.n_spatial + 2:
            raise ValueError(f"Head: x has shape {tuple(x.shape)}; expected (batch, ..., {self.n_spatial} spatial axes, C)")
        if not trl and self.n_spatial:
            x = jnp.mean(x, axis=tuple(range(x.ndim - 1 - self.n_spatial, x.ndim - 1)))

        def layer(features: int, name: str):
            if trl:
                return TRL(features, rank=cfg.trl_rank, decomposition=trl, n_modes=self.n_spatial + 1, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name)
            return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        out = {}
        if cfg.n_outputs:
            va = layer(cfg.n_outputs, "va")(x)
            out["va"] = jnp.tanh(va) if cfg.bounded else va
        if cfg.n_classes:
            out["logits"] = layer(cfg.n_classes, "logits")(x)
        return out
