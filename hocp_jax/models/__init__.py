"""The paper's architectures (Flax Linen, channels-last) and a small registry.

``get_model(name, tiny=False, **kwargs)`` builds one of ``MODELS``; ``tiny=True`` swaps in
narrow/shallow widths for tests (same code path, same layer names); ``kwargs`` override any
module field, e.g. ``head=dict(n_outputs=2, n_classes=8, bounded=True)`` or ``psi="bn_relu"``.

Every model is called as ``model.apply(variables, x, train=...)`` (``mutable=["batch_stats"]``
when training) and returns a dict ``{"va": ..., "logits": ...}`` (see
:mod:`hocp_jax.models.heads`). Parameter counts of the full-size models are listed in the
README and asserted in ``tests/test_models.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import flax.linen as nn

from hocp_jax.checks import check_flags
from hocp_jax.models import avce, bregnet
from hocp_jax.models.common import abstract_variables, count_params
from hocp_jax.models.heads import Head, HeadConfig
from hocp_jax.models.jester import JesterNet
from hocp_jax.models.mobilenet import MobileNetV2
from hocp_jax.models.resnet import ResNet

_TINY_RESNET = dict(stage_sizes=(1, 1, 1, 1), widths=(8, 8, 16, 16))
_TINY_MOBILENET = dict(cfg=((1, 8, 1, 1), (2, 8, 2, 1), (2, 16, 1, 2)), stem_features=8, last_features=32)

# name -> (module class, its fields, tiny overrides)
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any], dict[str, Any]]] = {
    "resnet18": (ResNet, dict(conv="dense2d"), _TINY_RESNET),
    "resnet18_3d": (ResNet, dict(conv="dense3d"), _TINY_RESNET),
    "resnet18_2plus1d": (ResNet, dict(conv="2plus1d"), _TINY_RESNET | dict(stem_mid=None)),
    "resnet18_hocp": (ResNet, dict(conv="hocp"), _TINY_RESNET),
    "jester": (JesterNet, dict(conv="dense"), dict(widths=(4, 8, 8, 8), fc_features=16)),
    "jester_hocp": (JesterNet, dict(conv="hocp"), dict(widths=(4, 8, 8, 8), fc_features=16)),
    "jester_hocp_s": (JesterNet, dict(conv="hocp_s"), dict(widths=(4, 8, 8, 8), fc_features=16)),
    "mobilenet_v2": (MobileNetV2, dict(conv="dense"), _TINY_MOBILENET),
    "mobilenet_v2_hocp": (MobileNetV2, dict(conv="hocp"), _TINY_MOBILENET),
}
_REGISTRY.update(bregnet.REGISTRY)
_TINY_AVCE = dict(head_hidden=32)
_REGISTRY.update({
    "avce_alexnet": (avce.avce_alexnet, {}, _TINY_AVCE | dict(widths=(8, 16, 16, 16, 16))),
    "avce_resnet18": (avce.avce_resnet18, dict(conv="dense2d"), _TINY_AVCE | dict(backbone=_TINY_RESNET)),
    "avce_resnet18_hocp": (avce.avce_resnet18, dict(conv="hocp"), _TINY_AVCE | dict(backbone=_TINY_RESNET)),
})
MODELS: tuple[str, ...] = tuple(_REGISTRY)


def _tuples(value):
    """Lists (e.g. from a ConfigDict) to tuples, so module fields stay hashable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _field_names(cls) -> tuple[str, ...]:
    """The keywords ``cls`` takes: a Module's fields, or an AVCE builder's own parameters plus
    the :class:`~hocp_jax.models.avce.AVCE` fields its ``**kwargs`` go to (not the encoder it builds)."""
    if isinstance(cls, type):
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))
    own = tuple(n for n, p in inspect.signature(cls).parameters.items() if p.kind is not p.VAR_KEYWORD)
    return own + tuple(n for n in _field_names(avce.AVCE) if n != "encoder")


def get_model(name: str, *, tiny: bool = False, **kwargs) -> nn.Module:
    """Builds model ``name`` (one of ``MODELS``); ``tiny`` for tests; ``kwargs`` override fields."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"name={name!r}: unknown model; expected one of {MODELS}")
    check_flags(tiny=tiny)
    cls, fields, tiny_fields = _REGISTRY[name]
    valid = _field_names(cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"get_model({name!r}): unknown keyword(s) {unknown}; expected fields of "
                         f"{cls.__name__}: {sorted(valid)}")
    fields = fields | (tiny_fields if tiny else {}) | {k: _tuples(v) for k, v in kwargs.items()}
    if "head" in fields:
        fields["head"] = HeadConfig.of(fields["head"])
    return cls(**fields)


__all__ = [
    "MODELS", "get_model", "count_params", "abstract_variables", "Head", "HeadConfig", "ResNet", "JesterNet",
    "MobileNetV2",
]
