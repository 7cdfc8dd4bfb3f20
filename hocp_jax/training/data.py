"""Data access of one training stage: where a dataset lives and how it is batched."""

from __future__ import annotations

import functools
import os

import jax

from hocp_jax.data import pipeline
from hocp_jax.processes import on_every_process, on_process_zero
from hocp_jax.checks import is_int, is_positive_int
from hocp_jax.training.config import validate_config

DATA_REQUIRED = ("static", "data_dir", "batch_size", "eval_batch_size", "eval_split")
DATA_OPTIONAL = dict(video="", manual_dir="", val_split="", read_threads=1, prefetch=2, workers=0)
_non_negative = (lambda v: is_int(v) and v >= 0, "an int >= 0")
DATA_CHECKS = {
    "batch_size": (is_positive_int, "an int > 0"),
    "eval_batch_size": (is_positive_int, "an int > 0"),
    "read_threads": (is_positive_int, "an int > 0"),
    "prefetch": _non_negative,
    "workers": _non_negative,
}


def _manual_dir(root: str | None, name: str) -> str | None:
    """``<root>/<dataset name>`` when that folder exists (jobs with two real datasets, e.g.
    AffectNet -> AFEW-VA), else ``root`` itself; ``None`` for an empty root."""
    if not root:
        return None
    sub = os.path.join(root, name.split("/")[0])
    return sub if os.path.isdir(sub) else root


class TrainIterator:
    """A grain training iterator whose state also records ``config.data.workers``: grain's
    positions differ with and without worker processes, so a run resumes with the value it
    was started with (a ValueError naming both values otherwise)."""

    def __init__(self, it, workers: int):
        self._it, self._workers = it, workers

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        return {"workers": self._workers, "grain": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        saved = state.get("workers") if isinstance(state, dict) else None
        if saved is not None and saved != self._workers:
            raise ValueError(f"config.data.workers={self._workers}: the checkpoint's data position was saved with "
                             f"workers={saved}, and grain's positions differ between the two; resume with "
                             f"--config.data.workers={saved}")
        self._it.set_state(state["grain"] if saved is not None else state)


class Data:
    """Dataset ``name`` read as ``cfg`` (``config.data``) says; one per stage.

    Raises:
        ValueError: a bad ``config.data`` value (e.g. ``batch_size=0``), naming it.
        FileNotFoundError: a dataset that is not prepared and cannot be built (see :meth:`prepare`).
    """

    def __init__(self, cfg, name: str):
        validate_config(cfg, DATA_REQUIRED, DATA_OPTIONAL, checks=DATA_CHECKS, name="config.data")
        self.name, self.cfg = name, cfg
        self.data_dir = cfg.data_dir
        self.manual_dir = _manual_dir(cfg.get("manual_dir"), name)
        if name:
            self.prepare()

    def prepare(self) -> None:
        """Builds the dataset if it is missing (:func:`hocp_jax.data.pipeline.prepare`). With
        several processes, process 0 builds it while the others wait (processes building into
        one shared ``data_dir`` at once collide), then each process checks its own view: a no-op
        on a shared ``data_dir``, a build of its own copy on a host-local one; a failure there
        raises on every process (:func:`hocp_jax.processes.on_every_process`)."""
        prepare = functools.partial(pipeline.prepare, self.name, self.data_dir, manual_dir=self.manual_dir)
        on_process_zero(prepare, f"preparing {self.name} in {self.data_dir}")
        if jax.process_count() > 1:
            on_every_process(prepare, f"preparing {self.name} in {self.data_dir}")

    def _opt(self, key: str):
        return self.cfg.get(key, DATA_OPTIONAL[key])

    def source(self, split: str):
        return pipeline.data_source(self.name, split, self.data_dir, manual_dir=self.manual_dir)

    def train_iter(self, seed: int) -> TrainIterator:
        it = pipeline.train_iterator(
            self.name, "train", self.data_dir, batch_size=self.cfg.batch_size, seed=seed,
            manual_dir=self.manual_dir, read_threads=self._opt("read_threads"),
            prefetch=self._opt("prefetch"), workers=self._opt("workers"))
        return TrainIterator(it, self._opt("workers"))

    def eval_batches(self, split: str):
        """One pass over ``split`` in padded batches with a "mask" (a generator: streams)."""
        return pipeline.eval_batches(self.name, split, self.data_dir, batch_size=self.cfg.eval_batch_size,
                                     manual_dir=self.manual_dir)

    def label_counts(self) -> list[int]:
        """Examples per class in the training split (labels only, no image is decoded)."""
        return pipeline.label_counts(self.name, "train", self.data_dir, manual_dir=self.manual_dir)

    def steps_per_epoch(self) -> int:
        return pipeline.steps_per_epoch(self.source("train"), batch_size=self.cfg.batch_size)
