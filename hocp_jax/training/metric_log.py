"""Metric logs: JSONL always, TensorBoard events when ``tensorboardX`` is installed.

The JSONL file ``<workdir>/metrics.jsonl`` has one object per line,
``{"step": int, "split": "train"|"eval"|..., "<metric>": float, ...}``. TensorFlow is not
a dependency, so TensorBoard logs are written only if the optional ``tensorboardX``
package is importable (``pip install tensorboardX``; then ``tensorboard --logdir
<workdir>``). Without it, render the curves with :func:`plot_metrics`::

    python -c "from hocp_jax.training.metric_log import plot_metrics; \\
               plot_metrics('<workdir>/metrics.jsonl', 'curves.png')"
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence

import jax
import numpy as np


class MetricLogger:
    """Appends scalar metrics to ``<workdir>/metrics.jsonl`` (and TensorBoard if possible).

    Only process 0 writes. Use as a context manager or call :meth:`close`.

    Args:
        workdir: the folder of the file.
        drop_after: a resumed run restarting after step ``drop_after`` first removes the
            file's records of later steps (logged by the killed run, about to be redone), so
            no step appears twice.
        drop_eval_at: also removes the "eval" records of this step (an evaluation about to be
            run again: one a preempted run left to its resume, which another crash may repeat).
    """

    def __init__(self, workdir: str, *, filename: str = "metrics.jsonl", drop_after: int | None = None,
                 drop_eval_at: int | None = None):
        self.path = os.path.join(workdir, filename)
        self.active = jax.process_index() == 0
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            if drop_after is not None and os.path.exists(self.path):
                with open(self.path) as f:
                    lines = [line for line in f if line.strip()]
                records = _parse(lines, self.path)
                kept = [line.rstrip("\n") + "\n" for line, r in zip(lines, records)
                        if r is not None and r["step"] <= drop_after
                        and not (r["step"] == drop_eval_at and r.get("split") == "eval")]
                if len(kept) < len(lines) or (lines and not lines[-1].endswith("\n")):  # a cut-short last write
                    tmp = self.path + ".tmp"
                    with open(tmp, "w") as f:
                        f.writelines(kept)
                    os.replace(tmp, self.path)
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, split: str = "train") -> None:
        """Logs scalars (Python/numpy/0-d jax values) under ``split`` at ``step``."""
        if not self.active:
            return
        values = {k: float(np.asarray(v)) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse(lines: list[str], path: str) -> list[dict | None]:
    """Each line's record, None (with a warning) for a line that is not one: the torn last
    write of a run killed while logging (a crash, a power loss)."""
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            warnings.warn(f"{path}: line {i + 1} is not a JSON record (a write cut short?); skipped")
            records.append(None)
    return records


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics JSONL file, in file order (a torn line is skipped with a warning)."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return [r for r in _parse(lines, path) if r is not None]


def plot_metrics(path: str, out_png: str, keys: Sequence[str] | None = None) -> str:
    """Renders the JSONL curves, one panel per metric, one line per split; returns ``out_png``.

    Args:
        path: a ``metrics.jsonl`` written by :class:`MetricLogger`.
        out_png: output image path.
        keys: metrics to plot (default: every metric in the file).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    available = sorted({k for r in records for k in r} - {"step", "split"})
    keys = available if keys is None else list(keys)
    missing = sorted(set(keys) - set(available))
    if missing or not keys:
        raise ValueError(f"keys {missing or keys} not in {path}; available: {available}")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for split in sorted({r["split"] for r in records if key in r}):
            pts = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None, label=split)
        ax.set(title=key, xlabel="step")
        ax.legend()
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
