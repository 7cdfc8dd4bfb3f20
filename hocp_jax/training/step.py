"""Pure train / eval steps. Wrap them in ``jax.jit`` (see :func:`hocp_jax.training.loop.fit`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.core import unfreeze

from hocp_jax import conv_plans
from hocp_jax.checks import is_positive_int
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
    microbatches: int = 1,
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
        microbatches: k > 1 runs the model on k micro-batches of the batch, one after another
            (examples ``j, j + k, ...`` in micro-batch ``j``; the batch size a multiple of k),
            for about 1/k of the activation memory: :func:`_microbatched_grads`. The loss and
            the gradient are the whole batch's exactly, whatever the loss (also one of batch
            statistics such as CCC, or a contrastive one), but batch norm normalises each
            micro-batch with its own statistics (its running averages updated once per
            micro-batch), and the model's forward pass runs twice. A memory option for GPU/TPU:
            on the CPU backend XLA runs its convolutions' gradients far slower inside a loop
            (the kernel gradient most); the library's convs (the models' dense ones and those
            of computed kernels) take gradients without XLA's gradient convolutions there
            (:func:`hocp_jax.conv_plans.loop_mode`); a ``flax.linen.Conv`` on XLA's own conv
            cannot (README, "Micro-batches").

    Returns:
        ``train_step``; metrics holds the ``loss_fn`` metrics plus scalars ``loss`` (data
        term), ``reg``, ``total_loss`` and ``grad_norm`` (global L2 norm of the gradient).
    """
    if not is_positive_int(microbatches):
        raise ValueError(f"microbatches={microbatches!r}: expected an int > 0")

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

        if microbatches == 1:
            grads, (loss, reg, metrics, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
        else:
            grads, (loss, reg, metrics, batch_stats) = _microbatched_grads(
                model, loss_fn, reg_fn, state, batch, x, microbatches, model_key, loss_key)
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


def _microbatched_grads(model, loss_fn, reg_fn, state: TrainState, batch: Batch, x: jax.Array, k: int,
                        model_key: jax.Array, loss_key: jax.Array) -> tuple[Any, tuple]:
    """``(grads, (loss, reg, metrics, batch_stats))`` of the whole batch, the model run on ``k``
    micro-batches ``x[j::k]`` (``lax.scan``: one micro-batch's activations live at a time).

    Pass 1 runs the forward pass of each micro-batch (its dropout key ``fold_in(model_key, j)``),
    keeping only its outputs and chaining the batch-norm running averages; the loss of all the
    outputs, reassembled in batch order, gives the loss and its gradient w.r.t. the floating
    outputs (``(B, ...)``, small; other outputs, e.g. integer predictions, are constants); pass 2
    runs each micro-batch's forward pass again and pulls its slice of that gradient back to the
    parameters (``jax.vjp``), summing over micro-batches. In train mode the outputs do not depend
    on the running averages, so pass 2 recomputes pass 1's.

    Raises:
        ValueError: the batch is not a multiple of ``k``, or an output has no leading batch axis.
    """
    b = x.shape[0]
    if b % k:
        raise ValueError(f"microbatches={k}: the batch of {b} examples is not a multiple of it")
    split = lambda a: jnp.swapaxes(a.reshape(b // k, k, *a.shape[1:]), 0, 1)  # noqa: E731  (k, B/k, ...): x[j::k]
    merge = lambda a: jnp.swapaxes(a, 0, 1).reshape(b, *a.shape[2:])  # noqa: E731
    steps = (split(x), jnp.arange(k))

    def forward(params, stats, x_j, j):
        outputs, updated = model.apply({"params": params, "batch_stats": stats}, x_j, train=True,
                                       mutable=["batch_stats"], rngs={"dropout": jax.random.fold_in(model_key, j)})
        for path, o in jax.tree_util.tree_flatten_with_path(outputs)[0]:
            if o.shape[:1] != (b // k,):
                raise ValueError(f"microbatches={k}: output {jax.tree_util.keystr(path)} has shape {o.shape}; every "
                                 f"output must have the micro-batch ({b // k} examples) as its leading axis")
        return float32_outputs(outputs), unfreeze(updated.get("batch_stats", {}))

    def first(stats, step):
        outputs, stats = forward(state.params, stats, *step)
        return stats, outputs

    with conv_plans.loop_mode():  # (the CPU backend: the library's convs then avoid XLA's slow in-loop kernel gradient)
        batch_stats, outputs = jax.lax.scan(first, unfreeze(state.batch_stats), steps)  # (a FrozenDict's too)
    leaves, treedef = jax.tree.flatten(jax.tree.map(merge, outputs))
    floating = [jnp.issubdtype(o.dtype, jnp.inexact) for o in leaves]

    def loss_of(floats):
        rest = iter(floats)
        return loss_fn(jax.tree.unflatten(treedef, [next(rest) if f else o for o, f in zip(leaves, floating)]),
                       batch, loss_key)

    (loss, metrics), out_grads = jax.value_and_grad(loss_of, has_aux=True)(
        [o for o, f in zip(leaves, floating) if f])

    def second(grads, step):
        x_j, j, g_j = step
        floats = lambda p: [o for o, f in zip(jax.tree.leaves(forward(p, state.batch_stats, x_j, j)[0]), floating) if f]  # noqa: E731
        _, pull = jax.vjp(floats, state.params)
        return jax.tree.map(jnp.add, grads, pull(g_j)[0]), None

    with conv_plans.loop_mode():
        grads = jax.lax.scan(second, jax.tree.map(jnp.zeros_like, state.params),
                             (*steps, [split(g) for g in out_grads]))[0]
    reg = jnp.zeros((), loss.dtype)
    if reg_fn is not None:
        reg, reg_grads = jax.value_and_grad(reg_fn)(state.params)
        grads = jax.tree.map(jnp.add, grads, reg_grads)
    return grads, (loss, reg, metrics, batch_stats)


def make_eval_step(model, *, input_key: str | None = None) -> Callable[[TrainState, Batch], dict]:
    """Builds the pure ``eval_step(state, batch) -> outputs`` (inference mode).

    Returns the model's output dict (floating outputs at least float32), e.g.
    ``{"va": (B, [T,] 2), "logits": ...}``. Metrics that do not decompose over batches (PCC,
    CCC) stream as statistics merged batch by batch (:func:`hocp_jax.training.loop.make_evaluator`,
    :class:`hocp_jax.metrics.AffectStats`), never as concatenated outputs.
    """

    def eval_step(state: TrainState, batch: Batch) -> dict:
        return float32_outputs(model.apply(state.variables, model_input(batch, input_key), train=False))

    return eval_step
