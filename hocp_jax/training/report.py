"""The jobs' results: a markdown table of the rows, ``results.json`` / ``results.md``."""

from __future__ import annotations

import json
import os

from hocp_jax.training.objectives import TARGETS


def format_table(rows: dict) -> str:
    """Markdown table of the rows (regression metrics per target, then class accuracy)."""
    cols = [c for c in ("params", "video_trained_params") if any(c in r for r in rows.values())]
    cols += [f"{t}_{m}" for t in TARGETS for m in ("rmse", "sagr", "pcc", "ccc") if any(f"{t}_{m}" in r for r in rows.values())]
    cols += [c for c in ("class_accuracy", "class_top5_accuracy", "class_f1", "class_kappa", "skew_accuracy", "skew_f1",
                         "skew_kappa")
             if any(c in r for r in rows.values())]
    fmt = lambda v: f"{v:,}" if isinstance(v, int) else f"{v:.3f}"  # noqa: E731
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(r[c]) if c in r else "" for c in cols) + " |" for name, r in rows.items()]
    return "\n".join(lines)


def write_results(workdir: str, rows: dict, report, config) -> None:
    """Writes ``results.json`` (rows + config) and ``results.md`` (table + sparsity); prints both."""
    table = format_table(rows)
    sparsity = report.table() if report is not None else ""
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"rows": rows, "config": json.loads(config.to_json_best_effort())}, f, indent=1)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n\n" + sparsity + "\n")
    print(table)
    if sparsity:
        print(sparsity)
