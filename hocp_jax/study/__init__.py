"""Reproducible studies of the paper's claims on the embedded proxy data (no download).

    python -m hocp_jax.study <name> [--quick | --tiny] [--out DIR]

``name`` is one of ``STUDIES``; each writes ``results.json``, ``report.md`` and PNG plots to
``--out`` (default ``studies/<name>[_quick | _tiny]``, relative to the current directory: from the
repository root it rewrites the committed results of that study and size; a folder holding another
study's or size's results is refused). ``--tiny`` is the seconds-long variant the test suite runs, ``--quick`` the
few-minutes one, no flag the full study. See each module's docstring.
"""

from hocp_jax.study import classification, data_budget, rank_selection, transduction_init

STUDIES = {"data_budget": data_budget, "rank_selection": rank_selection,
           "classification": classification, "transduction_init": transduction_init}

__all__ = ["STUDIES"]
