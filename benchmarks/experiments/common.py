"""Helpers shared by the experiments: the train step of a given model, a layer's compiled calls, sums and timings."""

from __future__ import annotations

import statistics
import time

from benchmarks import bench


def image_step(model, shape):
    """``(train_step, state, batch)``: ``bench``'s train step of the module ``model`` on images of ``shape``."""
    return bench.model_step(bench.ModelCase(name="image step", model="(given)", input_shape=tuple(shape)), model)


def step_call(model, shape):
    return bench.compile_jax(*image_step(model, shape))[0]


def resnet2d_cases() -> list:
    """The ResNet-18 2-D train-step pair of :func:`benchmarks.bench.model_cases` (dense, HO-CP)."""
    return [c for c in bench.model_cases(False) if c.model in ("resnet18", "resnet18_hocp") and c.transduce_from is None]


def stack_sums(layer_ms: dict, labels) -> dict:
    """Per label, the sum over the layers of ``layer_ms`` (keys ``"<layer> <label>"``; a key counts
    for the longest label it ends with, so ``"conv1 torch dense"`` is not a ``"dense"`` one)."""
    def label(name):
        return max((k for k in labels if name.endswith(" " + k)), key=len, default=None)

    return {k: sum(v for n, v in layer_ms.items() if label(n) == k) for k in labels}


def conv2_calls(paths) -> tuple:
    """Jester conv2 (the ``bench`` case) and its compiled fwd+bwd calls ``{path: call}`` for ``paths``
    of :func:`benchmarks.bench.conv_fns`."""
    case = bench.jester_cases(False)[1]
    kernel, params, compile_call = bench.case_compiler(case)
    fns = bench.conv_fns(case)
    return case, {p: compile_call(fns[p], kernel if p == "dense" else params)[0] for p in paths}


def timed_ms(call) -> float:
    """Wall ms of one ``call()``."""
    t0 = time.perf_counter()
    call()
    return 1e3 * (time.perf_counter() - t0)


def per_round_ratio(times: dict, name: str, ref: str) -> dict:
    """Median, min and max over the rounds of ``name``'s time over ``ref``'s in the same round
    (``times``: :func:`benchmarks.bench.time_interleaved`'s result). Slow phases hit both programs
    of a round (EXPERIMENTS.md, "Two speeds") but can fall on more rounds of one of them, which
    moves the ratio of the medians and not this one."""
    r = bench.round_ratios(times[name], times[ref])
    return {"median": round(statistics.median(r), 3), "min": round(min(r), 3), "max": round(max(r), 3)}
