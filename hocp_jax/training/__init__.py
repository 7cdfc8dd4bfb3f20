"""Generic training machinery: state, jitted steps, data-parallel sharding, orbax
checkpoints, metric logs, optimizers/schedules from config, the :func:`fit` loop and the
streaming :func:`make_evaluator`. The jobs of ``train.py`` live in :mod:`.jobs` (stages),
:mod:`.data` (data access), :mod:`.objectives` (losses, metrics) and :mod:`.report`; a trained
run's model comes back for inference with :func:`load_trained` (:mod:`.trained`)."""

from hocp_jax.training.checkpoint import Checkpointer, NonFiniteError, check_finite
from hocp_jax.training.config import validate_config
from hocp_jax.training.distributed import Preempted, WorkdirInUseError, WorkdirLock, maybe_initialize_distributed
from hocp_jax.training.loop import fit, make_evaluator
from hocp_jax.training.schedules import make_optimizer, make_schedule
from hocp_jax.training.sharding import make_data_mesh, put_batch, put_replicated
from hocp_jax.training.state import TrainState
from hocp_jax.training.step import make_eval_step, make_train_step
from hocp_jax.training.trained import Trained, load_trained

__all__ = [
    "Checkpointer", "NonFiniteError", "Preempted", "TrainState", "Trained", "WorkdirInUseError", "WorkdirLock", "check_finite",
    "fit", "load_trained", "make_data_mesh", "make_eval_step", "make_evaluator", "make_optimizer", "make_schedule",
    "make_train_step", "maybe_initialize_distributed", "put_batch", "put_replicated", "validate_config",
]
