"""``python -m hocp_jax.study <name> [--quick | --tiny] [--out DIR]`` (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import time

from hocp_jax.study import STUDIES
from hocp_jax.study import runner as R


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m hocp_jax.study", description=__doc__)
    p.add_argument("name", choices=sorted(STUDIES))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="size", help="few-minutes variant")
    size.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="seconds (test suite)")
    p.add_argument("--out", default=None, help="output folder (default studies/<name>[_<size>])")
    args = p.parse_args(argv)
    size = args.size or "full"
    out = args.out if args.out is not None else f"studies/{args.name}" + ("" if size == "full" else f"_{size}")
    module = STUDIES[args.name]
    settings = module.SETTINGS[size]
    _refuse_other_results(p, out, args.name, size)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:  # a file there or above it, "", no permission: a usage error, not a traceback
        p.error(f"--out={out!r}: expected a directory ({err.strerror}: {err.filename!r})")
    t0, load0 = time.time(), os.getloadavg()[0]
    results, report = module.run(settings, out)
    load = (round(load0, 2), round(os.getloadavg()[0], 2))
    return R.write(out, args.name, size, settings, results, report, time.time() - t0, load)


def _refuse_other_results(p: argparse.ArgumentParser, out: str, name: str, size: str) -> None:
    """A usage error where ``out`` holds the results of another study or size: writing there would
    replace them and leave their plots beside the new ones (the same study and size is rewritten,
    as regenerating the committed results does)."""
    try:
        with open(os.path.join(out, "results.json")) as f:
            held = json.load(f)
    except (OSError, ValueError):  # none there (or not a study's): nothing to lose
        return
    if isinstance(held, dict) and (held.get("study"), held.get("size")) != (name, size):
        p.error(f"--out={out!r} holds the results of study {held.get('study')!r} ({held.get('size')}); expected a new "
                f"folder or one of {name!r} ({size}): give another --out")


if __name__ == "__main__":
    main()
