"""A model trained by ``train.py``, rebuilt from its checkpoint for inference.

Every checkpoint :func:`~hocp_jax.training.fit` writes for ``train.py`` stores, beside the
state, the run that wrote it: the model's name and keyword arguments and the computation dtype
(``config.model``, ``config.dtype``). :func:`load_trained` reads a checkpoint's model variables
and that description and builds the model, so a user needs neither the config file nor the
command line of the run::

    trained = load_trained("runs/affectnet/static/best")
    outputs = trained.predict(images)          # {"va": (N, 2), "logits": (N, 8)}, numpy float32
    smaller, report = trained.pruned(0.01)     # the lasso's zeroed rank components dropped
    exported = trained.export((64, 64, 3))     # jax.export.Exported, any batch; .serialize() -> bytes
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hocp_jax import conv_plans
from hocp_jax.checks import is_positive_int
from hocp_jax.models import get_model
from hocp_jax.processes import on_every_process
from hocp_jax.pruning import PruneReport, prune_rank
from hocp_jax.training import checkpoint
from hocp_jax.training.step import float32_outputs, model_input

DTYPES = ("float32", "bfloat16")  # config.dtype's; float16 would need loss scaling, which the step does not do
PREDICT_BATCH = 64  # examples per call of Trained.predict (the last call padded to it)
EXPORT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's platform names (not "gpu")


def build_model(name: str, kwargs, dtype: str = "float32") -> Any:
    """Model ``name`` (:func:`hocp_jax.models.get_model`) with ``kwargs`` (a config node, or a
    dict such as a checkpoint's stored run) computing in ``dtype`` (one of :data:`DTYPES`;
    parameters stay float32, Flax's ``param_dtype`` default)."""
    kwargs = {k: (tuple(v) if isinstance(v, list) else (v.to_dict() if hasattr(v, "to_dict") else v))
              for k, v in kwargs.items()}
    return get_model(name, **kwargs | ({} if dtype == "float32" else {"dtype": jnp.dtype(dtype)}))


class Trained:
    """A trained model and its variables (see :func:`load_trained`).

    Attributes:
        model: the Flax module the run trained (``model.apply(variables, x, train=False)``).
        variables: ``{"params", ["batch_stats"]}``, host numpy arrays, read-only (:meth:`predict`
            keeps a device copy): assign a new tree to change them.
        step_dir: the checkpoint they were read from.
        run: the run description stored with it (``model``, ``dtype``, ``loss``, ``optimizer``,
            ``data``, ``transduction``, ...; JSON values).
    """

    def __init__(self, model, variables: dict, step_dir: str, run: dict):
        self.model, self.variables, self.step_dir, self.run = model, variables, step_dir, run
        self._infer = lambda v, x: float32_outputs(model.apply(v, model_input({"x": x}, "x"), train=False))
        self._apply = jax.jit(self._infer)

    @property
    def variables(self) -> dict:
        return self._variables

    @variables.setter
    def variables(self, variables: dict) -> None:
        def frozen(v):
            v = np.array(v)
            v.flags.writeable = False
            return v

        self._variables, self._on_device = jax.tree.map(frozen, variables), None
        self._fits = set()  # (shape, dtype) of the examples checked against the model

    def _check_fits(self, shape: tuple, dtype, name: str) -> None:
        """A ValueError naming ``name`` where examples of ``shape`` and ``dtype`` do not fit the
        model (e.g. another channel count: the model's own error, which names a parameter, is
        quoted); traced once per shape (``jax.eval_shape``), nothing runs. Not checked where a size
        is ``None`` (symbolic: the export's own trace says what fails)."""
        if (shape, np.dtype(dtype)) in self._fits or None in shape:
            return
        try:
            jax.eval_shape(self._infer, self.variables, jax.ShapeDtypeStruct((1, *shape), dtype))
        except Exception as err:  # flax, the layers' checks and lax raise several types
            data = (self.run.get("data") or {}).get("name", "?")
            raise ValueError(f"{name}: examples of shape {shape} ({np.dtype(dtype)}) do not fit the model "
                             f"{self.run.get('model', {}).get('name', type(self.model).__name__)!r} (trained on "
                             f"{data!r}): {type(err).__name__}: {str(err)[:500]}") from err
        self._fits.add((shape, np.dtype(dtype)))

    def predict(self, x, *, batch_size: int = PREDICT_BATCH) -> dict[str, np.ndarray]:
        """The model's outputs in inference mode, ``{name: (N, ...)}`` numpy arrays (float32 for a
        bfloat16 model too), e.g. ``{"va": (N, 2), "logits": (N, n_classes)}``; a video model's
        outputs are per clip or per frame as it makes them (the transduced ResNets' per frame,
        ``(N, T, ...)``; the Jester nets' per clip).

        Args:
            x: ``(N, H, W, C)`` images or ``(N, T, H, W, C)`` videos, as the run's training
                examples were: uint8 pixels are scaled to ``[0, 1]`` as in the train step, float
                values (bfloat16 included) pass unchanged. A static stage's model takes images;
                the transduction job's stage 1 and stage 2 models and its 3-D baselines take videos.
            batch_size: examples per compiled call (the last call is padded to it, so one
                program runs every call).

        Raises:
            ValueError: ``x`` is not an array of images or videos with at least one example, its
                examples do not fit the model (e.g. another channel count, or images for a video
                model), or ``batch_size`` is not an int > 0.
        """
        try:
            x = np.asarray(x)
        except ValueError as err:  # e.g. clips of several lengths
            raise ValueError(f"x: not an array ({err}); expected uint8 or float images (N, H, W, C) or videos "
                             "(N, T, H, W, C) of one shape") from None
        if x.ndim not in (4, 5) or x.shape[0] == 0 or not (x.dtype == np.uint8
                                                          or jnp.issubdtype(x.dtype, jnp.floating)):
            raise ValueError(f"x: an array of shape {x.shape} and dtype {x.dtype}; expected uint8 or float images "
                             "(N, H, W, C) or videos (N, T, H, W, C), N >= 1")
        if not is_positive_int(batch_size):
            raise ValueError(f"batch_size={batch_size!r}: expected an int > 0")
        self._check_fits(x.shape[1:], x.dtype, "x")
        if self._on_device is None:
            self._on_device = jax.device_put(self.variables)
        n, b = len(x), min(batch_size, len(x))
        chunks = []
        for start in range(0, n, b):
            chunk = x[start:start + b]
            padded = np.concatenate([chunk, np.zeros((b - len(chunk), *x.shape[1:]), x.dtype)]) if len(chunk) < b else chunk
            chunks.append(jax.tree.map(lambda o, k=len(chunk): np.asarray(o)[:k], self._apply(self._on_device, padded)))
        return jax.tree.map(lambda *parts: np.concatenate(parts), *chunks)

    def export(self, shape, dtype=np.uint8, *, platforms: tuple[str, ...] | None = None) -> jax.export.Exported:
        """:meth:`predict`'s computation as one program for any number of examples of ``shape``
        (``jax.export`` with a symbolic batch; the variables inside it, so it stands alone):
        ``exported.call(x)`` on ``x (N, *shape)`` of ``dtype`` returns what ``predict(x)`` does
        (to rounding: at a symbolic batch the program can differ), as JAX arrays;
        ``exported.serialize()`` gives bytes that ``jax.export.deserialize`` reads back in a
        process with jax alone (neither hocp_jax nor Flax), e.g. for serving. A size
        given as ``None`` is symbolic too: one program for any height, say (the models that
        support it, and why the others do not: the README's "Exporting").

        The rules of :mod:`hocp_jax.conv_plans` answer for the backend of ``platforms`` where
        they are of one kind (``("cuda",)`` on a CPU host: the GPU's routes and analytic picks,
        :func:`hocp_jax.conv_plans.target_mode`), else for this process's. At a symbolic batch
        those rules take no loop, patches product or chunk, and ``implementation='auto'`` picks
        each CP layer's path as for one example (:func:`hocp_jax.autotune.choose_cp`).

        Args:
            shape: one example's shape, ``(H, W, C)`` or ``(T, H, W, C)``, as :meth:`predict` takes;
                ``T``, ``H`` and ``W`` may be ``None`` (symbolic).
            dtype: of the inputs: ``uint8`` (scaled to ``[0, 1]`` as in the train step) or a float
                dtype (bfloat16 included).
            platforms: ``jax.export.export``'s, some of :data:`EXPORT_PLATFORMS` (``"cuda"``, not
                ``"gpu"``), e.g. ``("cpu", "cuda")``, or one as a string; default this process's backend.

        Raises:
            ValueError: a bad ``shape`` or ``dtype``, examples of ``shape`` that do not fit the
                model (e.g. another channel count), or an unknown platform.
        """
        targets = (platforms,) if isinstance(platforms, str) else platforms
        if targets is not None and not (isinstance(targets, (tuple, list)) and targets
                                        and all(p in EXPORT_PLATFORMS for p in targets)):
            raise ValueError(f"platforms={platforms!r}: expected None (this process's backend), one of "
                             f"{EXPORT_PLATFORMS} or a tuple of them")
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else shape
        if not (isinstance(shape, tuple) and len(shape) in (3, 4) and is_positive_int(shape[-1])
                and all(d is None or is_positive_int(d) for d in shape[:-1])):
            raise ValueError(f"shape={shape!r}: expected one example's shape, (H, W, C) or (T, H, W, C) of ints > 0 "
                             "(T, H and W may be None: symbolic)")
        try:
            dtype = np.dtype(dtype) if dtype is not None else None  # (np.dtype(None) is float64)
        except TypeError as err:
            raise ValueError(f"dtype={dtype!r}: not a dtype ({err}); expected uint8 or a float dtype") from None
        if not (dtype == np.uint8 or dtype is not None and jnp.issubdtype(dtype, jnp.floating)):
            raise ValueError(f"dtype={dtype}: expected uint8 or a float dtype")
        self._check_fits(shape, dtype, "shape")
        names = ("t", "h", "w")[-(len(shape) - 1):]
        sizes = [name if d is None else str(d) for name, d in zip(names, shape[:-1])]
        spec = jax.ShapeDtypeStruct((*jax.export.symbolic_shape(", ".join(["n", *sizes])), shape[-1]), dtype)
        kinds = {conv_plans.platform_backend(p) for p in targets or ()}
        target = conv_plans.target_mode(kinds.pop()) if len(kinds) == 1 else contextlib.nullcontext()
        with target:  # a new function, traced afresh: jax.jit would reuse a trace of another block
            return jax.export.export(jax.jit(lambda x: self._infer(self.variables, x)), platforms=targets)(spec)

    def pruned(self, threshold: float = 0.0) -> tuple[Trained, PruneReport]:
        """``(trained, report)``: this model with the rank components of ``|lambda| <= threshold``
        dropped from every CP layer (:func:`hocp_jax.pruning.prune_rank`, its Psi batch
        statistics too): fewer parameters, the same predictions where the dropped lambdas are
        exactly 0 (the proximal lasso's), the small contributions of the others removed (the
        paper's lasso leaves small values: ``config.sparsity_tol`` is the threshold its
        sparsity report counted). ``report`` says what each layer lost.

        Raises:
            ValueError: the model has no CP layer, or ``threshold`` is not a real number >= 0.
        """
        params, stats, report = prune_rank(self.variables["params"], threshold, self.variables.get("batch_stats"))
        variables = {"params": params} | ({"batch_stats": stats} if stats is not None else {})
        return Trained(self.model, variables, self.step_dir, self.run), report


def load_trained(path, *, dtype: str | None = None) -> Trained:
    """The model a ``train.py`` run trained, with the variables of one of its checkpoints.

    Args:
        path: as :func:`hocp_jax.training.checkpoint.restore_variables`: a step directory
            (``runs/a/static/checkpoints/1200``), a ``checkpoints/`` or ``best/`` directory
            (its newest step) or a stage directory (``runs/a/stage2``: its newest checkpoint).
        dtype: the computation dtype (``"float32"`` or ``"bfloat16"``); default the run's
            (``config.dtype``). Parameters stay float32.

    The model is :func:`build_model` (this module) of the stored ``model`` (name and
    keyword arguments): the transduction job's stages (``stage1``, ``stage2``) store the 2-D
    model and hold its transduced, 3-D parameters, which it runs on videos; ``baseline_<name>``
    stages store the baseline. A ``best/`` checkpoint of a version that did not store the run
    there takes it from the newest checkpoint of the stage's ``checkpoints/``.
    With several processes, a collective (every process reads the same checkpoint).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no checkpoint there; the checkpoint does not say which model wrote it (a
            :func:`~hocp_jax.training.fit` run without ``run.model``: build the model and read
            its variables with ``restore_variables``); a bad ``dtype``.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected None (the run's) or one of {DTYPES}")
    variables, step_dir = checkpoint.restore_variables(path, name="path")
    found = {}
    on_every_process(lambda: found.update(run=_stored_run(step_dir)), "load_trained")
    run = found["run"]
    model = run.get("model")
    if not (isinstance(model, dict) and isinstance(model.get("name"), str)):
        raise ValueError(f"path={os.fspath(path)!r}: the checkpoint {step_dir} does not say which model wrote it (its "
                         "run config has no model name); build the model and read its variables with "
                         "hocp_jax.training.checkpoint.restore_variables")
    if dtype is None and run.get("dtype") not in (None, *DTYPES):
        raise ValueError(f"path={os.fspath(path)!r}: the checkpoint {step_dir} stores dtype={run['dtype']!r}, "
                         f"expected one of {DTYPES}; pass dtype= to choose one")
    model = build_model(model["name"], model.get("kwargs") or {}, dtype or run.get("dtype") or "float32")
    return Trained(model, variables, step_dir, run)


def _stored_run(step_dir: str) -> dict[str, Any]:
    """The ``run`` entry of the fit config stored with ``step_dir`` (``{}`` if none); for a
    ``best/`` step without one, that of the newest step of the stage's ``checkpoints/``."""
    run = checkpoint.restore_extra(step_dir).get("config", {}).get("run")
    if run is None:
        parent = os.path.dirname(step_dir)
        sibling = os.path.join(os.path.dirname(parent), "checkpoints")
        steps = checkpoint.finished_steps(sibling) if os.path.basename(parent) == "best" else []
        if steps:
            run = checkpoint.restore_extra(os.path.join(sibling, str(max(steps)))).get("config", {}).get("run")
    return run or {}
