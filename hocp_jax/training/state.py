"""The training state: one pytree holding everything a resumed run needs."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (plus the run's base RNG key).

    Attributes:
        step: int32 scalar, number of optimizer updates applied so far.
        params: the model's "params" collection (nested dict of arrays).
        batch_stats: the model's "batch_stats" collection, or ``{}`` if it has none.
        opt_state: ``tx.init(params)``; may hold empty states for frozen leaves.
        rng: typed PRNG key of shape ``()``, the BASE key of the run. It never changes;
            step ``s`` uses ``fold_in(rng, s)`` (:meth:`step_key`), so a resumed run draws
            exactly the same randomness as an uninterrupted one.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    rng: jax.Array

    @classmethod
    def create(cls, variables: dict, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
        """Builds the step-0 state from ``model.init(...)`` variables.

        Args:
            variables: ``{"params": ..., optionally "batch_stats": ...}``. Any other
                collection is rejected (it would silently be neither trained nor saved).
            tx: the optimizer; ``tx.init(params)`` gives the optimizer state.
            rng: typed PRNG key (``jax.random.key(seed)``), the run's base key.
        """
        if "params" not in variables or set(variables) - {"params", "batch_stats"}:
            raise ValueError(
                "variables must hold a 'params' and optionally a 'batch_stats' collection, "
                f"got collections {sorted(variables)}"
            )
        if not jax.dtypes.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
            raise ValueError(f"rng must be a typed key from jax.random.key(seed), got {rng!r}")
        params = variables["params"]
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=rng,
        )

    @property
    def variables(self) -> dict:
        """``{"params", ["batch_stats"]}`` in the form ``model.apply`` expects."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}

    def step_key(self) -> jax.Array:
        """Typed key of the current step: ``jax.random.fold_in(rng, step)``."""
        return jax.random.fold_in(self.rng, self.step)
