"""Generic training machinery: state, jitted steps, data-parallel sharding, orbax
checkpoints, logging, optimizers/schedules from config, and the :func:`fit` loop."""

from hocp_jax.training.checkpoint import Checkpointer, NonFiniteError, check_finite
from hocp_jax.training.config import validate_config
from hocp_jax.training.loop import evaluate, fit, make_evaluate_fn
from hocp_jax.training.schedules import make_optimizer, make_schedule
from hocp_jax.training.sharding import (
    make_data_mesh, maybe_initialize_distributed, put_batch, put_replicated,
)
from hocp_jax.training.state import TrainState
from hocp_jax.training.step import make_eval_step, make_train_step

__all__ = [
    "Checkpointer", "NonFiniteError", "TrainState", "check_finite", "evaluate", "fit",
    "make_data_mesh", "make_eval_step", "make_evaluate_fn", "make_optimizer", "make_schedule",
    "make_train_step", "maybe_initialize_distributed", "put_batch", "put_replicated",
    "validate_config",
]
