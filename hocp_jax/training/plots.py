"""Plots a user looks at after a run (matplotlib, written to PNG files).

* :func:`plot_va_over_time` — predicted vs ground-truth valence/arousal along one test
  video, one panel per target (supplementary Fig. 2).
* Loss curves: :func:`hocp_jax.training.metric_log.plot_metrics`; lambda sparsity per layer:
  :func:`hocp_jax.optim.plot_sparsity` (supplementary Fig. 3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def plot_va_over_time(
    outputs: Mapping[str, Mapping[str, np.ndarray]],
    batch: Mapping[str, np.ndarray],
    targets: Sequence[str],
    path: str,
    *,
    clip: int = 0,
) -> str:
    """Saves per-frame predictions of several models against the targets of one clip.

    Args:
      outputs: ``{model name: {"va": (B, T, k)}}`` for the same batch.
      batch: the batch, with ``"va"`` ``(B, T, k)``.
      targets: names of the k targets (e.g. ``("valence", "arousal")``).
      path: PNG file to write.
      clip: which clip of the batch to draw.
    """
    from matplotlib.figure import Figure

    gt = np.asarray(batch["va"])[clip]
    if gt.ndim != 2:
        raise ValueError(f"batch['va']: got shape {np.shape(batch['va'])}, expected (B, T, k) video targets")
    fig = Figure(figsize=(5 * len(targets), 3.2))
    axes = fig.subplots(1, len(targets), squeeze=False)[0]
    frames = np.arange(gt.shape[0])
    for j, (ax, name) in enumerate(zip(axes, targets)):
        ax.plot(frames, gt[:, j], "k-", lw=2.5, label="ground truth")
        for model, out in outputs.items():
            ax.plot(frames, np.asarray(out["va"])[clip, :, j], marker=".", label=model)
        ax.set_title(name)
        ax.set_xlabel("frame")
        ax.set_ylim(-1.1, 1.1)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return path
