"""Shared pieces of the studies: in-memory embedded data, a minimal jitted training loop, evaluation,
timing and the results/report/plot writers.

Why not :func:`hocp_jax.training.fit`: a study trains dozens of tiny models; ``fit``'s orbax
checkpoints, grain iterators and logging would dominate their cost. Here the embedded proxy data
(:mod:`hocp_jax.data.embedded`, a few MB) is generated once into memory and every run is the
library's own jitted :func:`~hocp_jax.training.step.make_train_step` /
:func:`~hocp_jax.training.step.make_eval_step` driven by a plain Python loop, with the main job's
loss and metrics (:func:`hocp_jax.training.objectives.loss_fn` / ``metric_fn``). Runs are not
checkpointed: a killed study is re-run from the start.

Shapes: images ``(N, 32, 32, 1)``, videos ``(N, 8, 32, 32, 1)`` float32 in [0, 1]; ``va``
``(N, 2)`` / ``(N, 8, 2)``; ``label`` ``(N,)`` int32.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from ml_collections import ConfigDict

from hocp_jax import optim, transduction
from hocp_jax.data.embedded import make_digits_affect, make_moving_digits
from hocp_jax.data.pipeline import to_numpy
from hocp_jax.models import count_params, get_model
from hocp_jax.training.objectives import loss_fn, metric_fn
from hocp_jax.training.state import TrainState
from hocp_jax.training.step import make_eval_step, make_train_step, model_input

Data = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=None)
def _dataset(name: str, split: str, n: int | None) -> Data:
    make = {"digits_affect": make_digits_affect, "moving_digits": make_moving_digits}[name]
    return to_numpy(make(split, n))


def dataset(name: str, split: str, n: int | None = None) -> Data:
    """All ``n`` examples (default: the builder's split size) of an embedded dataset, in memory
    (deterministic; cached). The draw depends on ``n`` (``dataset(name, split, 16)`` is not the
    first 16 of ``dataset(name, split, 64)``), so a study that compares training-set sizes takes
    them as prefixes (:func:`subset`) of ONE draw of the largest size: nested within that study,
    not across studies or sizes."""
    return _dataset(name, split, n)


def subset(data: Data, n: int) -> Data:
    """The first ``n`` examples."""
    size = len(data["label"])
    if not 1 <= n <= size:
        raise ValueError(f"n={n}: expected 1 <= n <= {size} (examples available)")
    return {k: v[:n] for k, v in data.items()}


def batches(data: Data, batch_size: int, seed: int):
    """Endless shuffled batches (fresh permutation per epoch; the last partial batch is dropped).

    A training set smaller than ``batch_size`` is repeated within the batch.
    """
    n = len(data["label"])
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        if n < batch_size:
            order = np.resize(order, batch_size)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield {k: v[idx] for k, v in data.items()}


# ----------------------------------------------------------------------------- training


def loss_config(ce_weight: float = 0.1, va_weight: float = 1.0) -> ConfigDict:
    """The main job's loss (configs/default.py): shake-shake affect loss + ``ce_weight`` x CE."""
    return ConfigDict(dict(va_weight=va_weight, shake_shake=True, weights=(1.0, 1.0, 1.0),
                           ce_weight=ce_weight, class_weights=()))


def init_variables(model, example: np.ndarray, seed: int) -> dict:
    """``model.init`` on one example batch ``example`` (``(B, ...)``, uint8 pixels scaled as in the
    train step by :func:`hocp_jax.training.step.model_input`), compiled once per model."""
    key = ("init", repr(model), example.shape, example.dtype)
    if key not in _CACHE:
        _CACHE[key] = jax.jit(lambda rng, x: model.init(rng, model_input({"x": x}, "x"), train=False))
    return jax.device_get(_CACHE[key](jax.random.key(seed), example))


_CACHE: dict = {}


def trainer(model, name: str, make_tx: Callable[[], optax.GradientTransformation], loss: ConfigDict | None = None,
            l1_gamma: float = 0.0):
    """The :class:`Trainer` of ``model`` with the optimizer ``make_tx()`` described by ``name``,
    built (and compiled) once per process: studies run one after the other (e.g. in the tests)
    share their compiled steps. ``l1_gamma > 0`` adds the lasso ``l1_gamma * sum |lambda|`` to
    the loss (:func:`hocp_jax.optim.l1_lambda`, the paper's form)."""
    loss = loss_config() if loss is None else loss
    key = ("train", repr(model), name, loss.to_json(), l1_gamma)
    if key not in _CACHE:
        reg = functools.partial(optim.l1_lambda, gamma=l1_gamma) if l1_gamma > 0 else None
        _CACHE[key] = Trainer(model, make_tx(), loss, reg)
    return _CACHE[key]


def evaluator(model) -> "Evaluator":
    """The :class:`Evaluator` of ``model``, built once per process."""
    key = ("eval", repr(model))
    if key not in _CACHE:
        _CACHE[key] = Evaluator(model)
    return _CACHE[key]


def adam(learning_rate: float, gamma: float = 0.0) -> optax.GradientTransformation:
    """Adam; with ``gamma > 0`` followed by :func:`hocp_jax.optim.prox_l1_lambdas` (threshold
    ``learning_rate * gamma``), i.e. the lasso on every CP conv lambda as a proximal step
    (applied once: there is no separate penalty term in the loss)."""
    tx = optax.adam(learning_rate)
    return optax.chain(tx, optim.prox_l1_lambdas(learning_rate * gamma)) if gamma > 0 else tx


class Trainer:
    """One model + optimizer + loss, its train step jitted ONCE and reused for every run (seeds,
    training-set sizes, inits): compiling dominates tiny runs on CPU. ``tx`` must suit every
    params tree it is used with (a :func:`~hocp_jax.optim.masked_optimizer` relabels by name)."""

    def __init__(self, model, tx: optax.GradientTransformation, loss: ConfigDict, reg_fn: Callable | None = None):
        self.model, self.tx = model, tx
        self.step = jax.jit(make_train_step(model, functools.partial(loss_fn, cfg=loss), tx, reg_fn))

    def train(self, variables: dict, data: Data, *, steps: int, batch_size: int, seed: int) -> dict:
        """``steps`` updates from ``variables`` on shuffled batches of ``data``; new variables."""
        state = TrainState.create(variables, self.tx, jax.random.key(seed))
        it = batches(data, batch_size, seed)
        for _ in range(steps):
            state, _ = self.step(state, next(it))
        return jax.device_get(state.variables)

    def step_time(self, variables: dict, batch: Data, repeats: int = 10) -> float:
        """Median wall time (s) of one train step on ``batch`` (after a warm-up call)."""
        state = TrainState.create(variables, self.tx, jax.random.key(0))
        state, _ = jax.block_until_ready(self.step(state, batch))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            state, _ = jax.block_until_ready(self.step(state, batch))
            times.append(time.perf_counter() - t0)
        return float(np.median(times))


class Evaluator:
    """The main job's metrics (``metric_fn``: RMSE/SAGR/PCC/CCC per target over all frames; class
    accuracy/F1/kappa) with one jitted eval step per model. Batches are padded to
    ``batch_size`` (one compiled shape) and the padding is dropped before the metrics."""

    def __init__(self, model, batch_size: int = 50):
        self.batch_size = batch_size
        self.step = jax.jit(make_eval_step(model))

    def __call__(self, variables: dict, data: Data) -> dict:
        state = TrainState.create(variables, optax.identity(), jax.random.key(0))
        n, b = len(data["label"]), self.batch_size
        outs = []
        for lo in range(0, n, b):
            idx = np.minimum(np.arange(lo, lo + b), n - 1)
            out = jax.device_get(self.step(state, {k: v[idx] for k, v in data.items()}))
            outs.append(jax.tree.map(lambda v: v[: min(b, n - lo)], out))
        outputs = jax.tree.map(lambda *v: np.concatenate(v), *outs)
        return metric_fn(outputs, {k: v for k, v in data.items() if k not in ("image", "video")})


def n_params(variables: dict) -> int:
    return count_params(variables["params"])


def n_trainable(params: Any, trainable: str) -> int:
    """Parameters the ``optim.label_params(params, trainable)`` mask leaves trainable."""
    labels = jax.tree.leaves(optim.label_params(params, trainable))
    return int(sum(np.size(p) for p, lab in zip(jax.tree.leaves(params), labels) if lab == "trainable"))


# ----------------------------------------------------------------------------- output


def environment() -> dict:
    return {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version()}


def write(out: str, name: str, size: str, settings: dict, results: dict, report: str, wall_s: float,
          load: tuple[float, float]) -> dict:
    """Writes ``out/results.json`` and ``out/report.md``; returns the json document. ``load`` is the
    machine's 1-minute load average at the start and at the end of the run (``os.getloadavg``): a
    study on 2 cores uses about 2, more means other jobs shared the machine."""
    os.makedirs(out, exist_ok=True)
    doc = {"study": name, "size": size, "command": f"python -m hocp_jax.study {name}"
           + ("" if size == "full" else f" --{size}") + f" --out {out}",
           "wall_time_s": round(wall_s, 1), "load_average": load, "environment": environment(),
           "settings": settings, "results": results}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    header = (f"# Study `{name}` ({size})\n\nCommand: `{doc['command']}`  \n"
              f"Wall time: {wall_s / 60:.1f} min on {os.cpu_count()} CPU cores (1-minute load average"
              f" {load[0]:g} at the start, {load[1]:g} at the end; above {os.cpu_count()} means other jobs"
              " shared the machine and timings are indicative).\n\n")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(header + report.rstrip() + "\n")
    return doc


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half the max-min range (the "spread" shown as error bars)."""
    v = np.asarray(values, float)
    return float(v.mean()), float((v.max() - v.min()) / 2)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Markdown table; floats with 3 decimals."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def figure(path: str, draw: Callable, *, ncols: int = 1, width: float = 5.0):
    """Saves a figure with ``ncols`` axes drawn by ``draw(axes)`` to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 3.8), squeeze=False)
    draw(list(axes[0]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- shared models / stages


def resnet(name: str, widths: Sequence[int], n_classes: int = 10):
    """The main job's narrow ResNet-18-style model (configs/default.py: one block per stage,
    3x3 stem, bounded valence/arousal + class head) with ``widths``."""
    return get_model(name, stage_sizes=(1,) * len(widths), widths=tuple(widths), stem_kernel=3,
                     head=dict(n_outputs=2, n_classes=n_classes, bounded=True))


def static_model(widths: Sequence[int], *, steps: int, seed: int, gamma: float = 0.0, lr: float = 3e-3,
                 batch_size: int = 32, lasso: str = "proximal") -> tuple[Any, dict]:
    """Trains the static HO-CP ResNet on ``digits_affect`` with Adam(``lr``) and the lasso
    ``gamma`` on its lambdas, as Adam's proximal step (``lasso="proximal"``, :func:`adam`) or as a
    loss term (``lasso="loss"``, the paper's form); returns ``(model, variables)``."""
    model = resnet("resnet18_hocp", widths)
    images = dataset("digits_affect", "train")
    if lasso == "proximal":
        tx = trainer(model, f"adam {lr} lasso {gamma}", lambda: adam(lr, gamma))
    elif lasso == "loss":
        tx = trainer(model, f"adam {lr}", lambda: adam(lr), l1_gamma=gamma)
    else:
        raise ValueError(f"lasso: got {lasso!r}, expected 'proximal' or 'loss'")
    variables = init_variables(model, images["image"][:2], seed)
    return model, tx.train(variables, images, steps=steps, batch_size=batch_size, seed=seed)


def stage_trainers(model, transduced_vars: dict, lr1: float, lr2: float) -> tuple[Trainer, Trainer]:
    """Transduction stage 1 (temporal factors only, ``masked_optimizer``) and stage 2 (all)."""
    return (trainer(model, f"stage1 temporal adam {lr1}",
                    lambda: optim.masked_optimizer(adam(lr1), transduced_vars["params"], "temporal")),
            trainer(model, f"adam {lr2} lasso 0.0", lambda: adam(lr2)))


def transduced(static: dict, init: str) -> dict:
    """The static variables with every CP conv given a 3-tap temporal factor (``transduce``;
    the dense 1x1 shortcuts are applied per frame, ``dense="keep"``); batch stats unchanged."""
    return static | {"params": transduction.transduce(static["params"], {"t": 3}, init, dense="keep")}
