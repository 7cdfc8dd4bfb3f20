"""Reproducible studies of the paper's claims on the embedded proxy data (no download).

    python -m hocp_jax.study <name> [--quick | --tiny] --out studies/<name>

``name`` is one of ``STUDIES``; each writes ``results.json``, ``report.md`` and PNG plots to
``--out``. ``--tiny`` is the seconds-long variant the test suite runs, ``--quick`` the
few-minutes one, no flag the full study. See each module's docstring.
"""

from hocp_jax.study import classification, data_budget, rank_selection, transduction_init

STUDIES = {"data_budget": data_budget, "rank_selection": rank_selection,
           "classification": classification, "transduction_init": transduction_init}

__all__ = ["STUDIES"]
