"""Optimizers and learning-rate schedules from an ``ml_collections.ConfigDict``.

Config keys (``config.optimizer``)::

    name               "adam" | "adamw" | "sgd"
    learning_rate      float, initial learning rate
    steps_per_epoch    int, converts the epoch-based schedule to steps
    schedule           "step" (x decay_factor every decay_every_epochs; the paper's Adam
                       schedule, /10 every 15 epochs) | "piecewise" (x decay_factor at
                       each of boundaries_epochs; SGD for CIFAR/Jester) | "constant"
    decay_every_epochs int   (default 15)
    decay_factor       float (default 0.1)
    boundaries_epochs  tuple of ints (default ())
    weight_decay       float (default 0.0): decoupled for "adamw", L2 added to the gradient
                       (PyTorch style) for "adam" and "sgd"
    momentum           float (default 0.9, "sgd" only)
    nesterov           bool  (default False, "sgd" only)
"""

from __future__ import annotations

import optax

from hocp_jax.checks import is_number, is_positive_int
from hocp_jax.training.config import validate_config

NAMES = ("adam", "adamw", "sgd")
SCHEDULES = ("step", "piecewise", "constant")
DEFAULTS = dict(
    schedule="step", decay_every_epochs=15, decay_factor=0.1, boundaries_epochs=(),
    weight_decay=0.0, momentum=0.9, nesterov=False,
)


CHECKS = {
    "name": (lambda v: v in NAMES, f"one of {NAMES}"),
    "learning_rate": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "steps_per_epoch": (is_positive_int, "an int > 0"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {SCHEDULES}"),
    "decay_every_epochs": (is_positive_int, "an int > 0"),
    "decay_factor": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "boundaries_epochs": (
        lambda v: isinstance(v, (tuple, list)) and all(is_positive_int(e) for e in v) and list(v) == sorted(set(v)),
        "a sequence of epochs: increasing ints > 0, e.g. (30, 60), or () for none",
    ),
    "weight_decay": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "momentum": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "nesterov": (lambda v: isinstance(v, bool), "a bool"),
}


def _resolved(cfg) -> dict:
    validate_config(cfg, ("name", "learning_rate", "steps_per_epoch"), DEFAULTS,
                    checks=CHECKS, name="config.optimizer")
    return {**DEFAULTS, **dict(cfg)}


def make_schedule(cfg) -> optax.Schedule:
    """``step -> learning rate`` for ``config.optimizer`` (see module docstring)."""
    c = _resolved(cfg)
    lr, spe = float(c["learning_rate"]), c["steps_per_epoch"]
    if c["schedule"] == "step":
        return optax.exponential_decay(
            lr, transition_steps=c["decay_every_epochs"] * spe, decay_rate=c["decay_factor"],
            staircase=True,
        )
    if c["schedule"] == "piecewise":
        return optax.piecewise_constant_schedule(
            lr, {e * spe: c["decay_factor"] for e in c["boundaries_epochs"]}
        )
    return optax.constant_schedule(lr)


def make_optimizer(cfg, weight_decay_mask=None) -> optax.GradientTransformation:
    """The optimizer of ``config.optimizer`` with its schedule.

    Args:
        cfg: ``config.optimizer`` (see module docstring).
        weight_decay_mask: optional pytree of bools / callable (optax mask) selecting the
            leaves that get weight decay; default all.
    """
    c = _resolved(cfg)
    lr, wd = make_schedule(cfg), float(c["weight_decay"])
    if c["name"] == "adamw":
        return optax.adamw(lr, weight_decay=wd, mask=weight_decay_mask)
    if c["name"] == "adam":
        base = optax.adam(lr)
    else:
        base = optax.sgd(lr, momentum=c["momentum"] or None, nesterov=c["nesterov"])
    if wd == 0:
        return base
    return optax.chain(optax.add_decayed_weights(wd, mask=weight_decay_mask), base)
