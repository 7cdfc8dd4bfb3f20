"""Pure train / eval steps. Wrap them in ``jax.jit`` (see :func:`hocp_jax.training.loop.fit`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hocp_jax.training.state import TrainState

Batch = dict[str, Any]
LossFn = Callable[[dict, Batch, jax.Array], tuple[jax.Array, dict]]
INPUT_KEYS = ("video", "image")


def model_input(batch: Batch, input_key: str | None = None) -> jax.Array:
    """The model input of ``batch``: ``batch[input_key]``, else "video" or "image".

    Shapes: "image" ``(B, H, W, C)``, "video" ``(B, T, H, W, C)``. uint8 pixels (as the
    input pipeline sends them, 4x fewer bytes than float32) are scaled to float32 in
    ``[0, 1]`` here, inside the jitted step; float inputs pass unchanged.
    """
    key = input_key or next((k for k in INPUT_KEYS if k in batch), None)
    if key is None or key not in batch:
        raise ValueError(
            f"batch has no model input {input_key or INPUT_KEYS!r}; its keys are {sorted(batch)}"
        )
    x = batch[key]
    return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x


def float32_outputs(outputs: dict) -> dict:
    """``outputs`` with every floating array at least float32: a model computing in bfloat16
    (``dtype=jnp.bfloat16``) has its losses and metrics computed in float32."""
    def widen(o):
        return o.astype(jnp.promote_types(o.dtype, jnp.float32)) if jnp.issubdtype(o.dtype, jnp.floating) else o

    return jax.tree.map(widen, outputs)


def make_train_step(
    model,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    reg_fn: Callable[[Any], jax.Array] | None = None,
    *,
    input_key: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Builds the pure ``train_step(state, batch) -> (state, metrics)``.

    One step: ``key = fold_in(state.rng, state.step)`` split into a ``"dropout"`` key for
    the model and a key for ``loss_fn``; forward in train mode (batch stats updated);
    objective ``loss_fn(outputs, batch, key)[0] + reg_fn(params)`` (floating outputs widened to
    float32 first: :func:`float32_outputs`); ``tx`` update.
    ``tx`` may be an ``optax.partition`` with frozen (``set_to_zero``) leaves: those get
    zero updates, so ``params + 0`` leaves them bitwise unchanged.

    Args:
        model: flax module, ``model.apply(variables, x, train=True, mutable=["batch_stats"],
            rngs={"dropout": key}) -> (outputs: dict, updated collections)``.
        loss_fn: ``(outputs, batch, key) -> (scalar loss, dict of scalar metrics)``, means
            over the (global) batch.
        tx: the optimizer the state was created with.
        reg_fn: optional ``params -> scalar`` added to the loss (e.g. L1 on lambdas).
        input_key: batch key of the model input; default "video" if present else "image".

    Returns:
        ``train_step``; metrics holds the ``loss_fn`` metrics plus scalars ``loss`` (data
        term), ``reg``, ``total_loss`` and ``grad_norm`` (global L2 norm of the gradient).
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        model_key, loss_key = jax.random.split(state.step_key())
        x = model_input(batch, input_key)

        def objective(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            outputs, updated = model.apply(
                variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": model_key}
            )
            loss, metrics = loss_fn(float32_outputs(outputs), batch, loss_key)
            reg = reg_fn(params) if reg_fn is not None else jnp.zeros((), loss.dtype)
            return loss + reg, (loss, reg, metrics, updated.get("batch_stats", {}))

        grads, (loss, reg, metrics, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        metrics = dict(
            metrics, loss=loss, reg=reg, total_loss=loss + reg, grad_norm=optax.tree.norm(grads)
        )
        return new_state, metrics

    return train_step


def make_eval_step(model, *, input_key: str | None = None) -> Callable[[TrainState, Batch], dict]:
    """Builds the pure ``eval_step(state, batch) -> outputs`` (inference mode).

    Returns the model's output dict (floating outputs at least float32), e.g.
    ``{"va": (B, [T,] 2), "logits": ...}``; metrics
    that do not decompose over batches (PCC, CCC) are computed on the concatenated outputs,
    see :func:`hocp_jax.training.loop.evaluate`.
    """

    def eval_step(state: TrainState, batch: Batch) -> dict:
        return float32_outputs(model.apply(state.variables, model_input(batch, input_key), train=False))

    return eval_step
