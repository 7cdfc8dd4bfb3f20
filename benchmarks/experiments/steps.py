"""Experiments on whole-model train steps: the HO-CP ResNet-18 stem, the profiled 2-D step, the
per-sample loop and the undone changes of one round (see the package docstring for each command)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
import re
import time
from collections.abc import Callable
from unittest import mock

import jax

from benchmarks.bench import time_interleaved
from benchmarks.experiments.common import image_step, per_round_ratio, resnet2d_cases, step_call
from benchmarks.experiments.layers import resnet2d_layer_sums
from benchmarks.experiments.variants import (ResNetStemWithInputGrad, block_pool, einsum_contraction, lax_convs,
                                             recomputed_index_pool, reduce_window_pool, unfused_norm_act_pool)
from hocp_jax import conv_ops
from hocp_jax.models import get_model


def stem(rounds: int = 7) -> dict:
    shape = (8, 112, 112, 3)
    calls = {"dense": step_call(get_model("resnet18"), shape),
             "hocp (stem: no input grad)": step_call(get_model("resnet18_hocp"), shape),
             "hocp (stem: input grad)": step_call(ResNetStemWithInputGrad(conv="hocp"), shape)}
    t = time_interleaved(calls, rounds, budget_s=1e9)
    ms = {k: v["median_ms"] for k, v in t.items()}
    return {"ms": ms, "ratio_to_dense": {k: v / ms["dense"] for k, v in ms.items()}, "loadavg": os.getloadavg()}


_RESNET_MODULE = re.compile(r"/(stem|layer\d+_\d+|head)(?:_bn)?(?:/(conv\d|shortcut|bn\d|shortcut_bn)\b)?")


def _resnet_label(op_name: str) -> str | None:
    """The ResNet layer of an ``op_name``: ``"stem"``, ``"layer3_1/conv1"``, ``"layer3_1/bn"``
    (its BatchNorms), ``"layer3_1/add"`` (residual sum and ReLU), ``"head"``; ``"update"`` for
    the step's work outside the model (loss, gradient norm, optimizer); ``None`` otherwise."""
    m = _RESNET_MODULE.search(op_name)
    if m is None:
        return "update" if op_name.startswith("jit(") and "jvp(" not in op_name else None
    block, part = m.groups()
    if block in ("stem", "head"):
        return block
    if part is None:
        return f"{block}/add"
    return f"{block}/" + ("bn" if "bn" in part else part)


def step_profile(rounds: int = 3, calls: int = 5) -> dict:
    """The ResNet-18 2-D train steps of ``bench`` (dense and HO-CP), traced with the JAX profiler
    in alternating rounds of ``calls`` steps each: ms per step of every layer, as wall time and
    CPU time (:func:`benchmarks.xla_profile.by_label`), summed per stage, and the HO-CP minus
    dense difference per stage and per conv. Shows where the HO-CP step wins and loses inside the
    network, which timing the convs one by one (``resnet2d_step_layers``) cannot: there each
    conv's operands stay in cache between calls and its buffers are reused. Each round also
    times ``calls`` untraced steps beside the traced ones (``step_ms``): the trace records an
    event per instruction run (``events``; the HO-CP step runs about twice the dense step's),
    and this shows what recording them costs. Labels whose instructions run concurrently (XLA
    runs independent ones on both threads) both count the overlap, so the sum of the layers'
    wall times exceeds the step's."""
    from benchmarks import xla_profile

    shape = (8, 112, 112, 3)
    programs = {}
    for name, model in (("dense", "resnet18"), ("hocp", "resnet18_hocp")):
        step, state, batch = image_step(get_model(model), shape)
        compiled = jax.jit(step).lower(state, batch).compile()
        call = functools.partial(lambda c, a: jax.block_until_ready(c(*a)), compiled, (state, batch))
        call()
        programs[name] = (call, xla_profile.instruction_labels(compiled.as_text(), _resnet_label))
    per_layer: dict = {name: {} for name in programs}
    step_ms: dict = {"untraced": {name: [] for name in programs}, "traced": {name: [] for name in programs}}
    for _ in range(rounds):
        for name, (call, labels) in programs.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            step_ms["untraced"][name].append((time.perf_counter() - t0) * 1e3 / calls)
            events, traced_ms = xla_profile.trace(call, calls)
            step_ms["traced"][name].append(traced_ms)
            for layer, ms in xla_profile.by_label(events, labels, calls).items():
                acc = per_layer[name].setdefault(layer, dict.fromkeys(ms, 0.0))
                for k in acc:
                    acc[k] += ms[k] / rounds

    kinds = ("wall", "cpu", "events")  # the fields of xla_profile.by_label

    def total(layers, kind, keep=lambda layer: True):
        return sum(ms[kind] for layer, ms in layers.items() if keep(layer))

    def stage(layer):
        return layer.split("_")[0] if layer.startswith("layer") else layer

    out: dict = {"rounds": rounds, "calls_per_round": calls, "input_shape": list(shape),
                 "step_ms": step_ms, "models": {}}
    for name, layers in per_layer.items():
        stages = sorted({stage(layer) for layer in layers})
        out["models"][name] = {
            "sum": {k: total(layers, k) for k in kinds},
            "by_stage": {st: {k: total(layers, k, lambda layer: stage(layer) == st) for k in kinds}
                         for st in stages},
            "by_layer": dict(sorted(layers.items())),
        }
    d, h = out["models"]["dense"], out["models"]["hocp"]
    zero = dict.fromkeys(kinds, 0.0)
    for part in ("by_stage", "by_layer"):
        keys = sorted(set(d[part]) | set(h[part]))
        out[f"hocp_minus_dense_{part}"] = {key: {k: h[part].get(key, zero)[k] - d[part].get(key, zero)[k] for k in zero}
                                          for key in keys if part == "by_stage" or "/conv" in key}
    out["loadavg"] = os.getloadavg()
    return out


def per_sample(rounds: int = 15) -> dict:
    from benchmarks import bench
    from hocp_jax import conv_plans

    cases = {c.name: c for c in bench.model_cases(False)}
    out: dict = {"rounds": rounds}
    for dense, hocp in (("resnet18 dense 2-D", "resnet18_hocp static"), ("resnet18_3d dense", "resnet18_hocp transduced")):
        calls = {dense: bench.prepare_model_case(cases[dense])[0]}
        for label, value in (("whole batch", False), ("automatic", None), ("per sample", True)):
            with conv_plans.per_sample_mode(value):
                calls[f"{hocp}, {label}"] = bench.prepare_model_case(cases[hocp])[0]
        t = bench.time_interleaved(calls, rounds, budget_s=1e9)
        ms = {name: v["median_ms"] for name, v in t.items()}
        out[hocp] = {"ms": ms, "ratio_to_dense": {name: v / ms[dense] for name, v in ms.items()}}
    out["loadavg"] = os.getloadavg()
    return out


STEP_CHANGES = ("2-D matmul contractions", "max_pool", "per-sample psi")


def step_changes(rounds: int = 5) -> dict:
    """Each model pair's train steps with this session's three changes undone and re-applied one
    at a time (cumulative, in ``STEP_CHANGES`` order), patched at trace time; the dense reference
    with both pools. All calls of a pair interleaved."""
    from contextlib import ExitStack

    from benchmarks import bench
    from hocp_jax import layer_specs
    from hocp_jax.models import common

    undo = {"2-D matmul contractions": (conv_ops, "channel_matmul", einsum_contraction),
            "max_pool": (common, "max_pool", reduce_window_pool),
            "per-sample psi": (layer_specs, "psi_pointwise", lambda *a: False)}

    def prepared(case, applied):
        with ExitStack() as stack:
            for change in STEP_CHANGES:
                if change not in applied:
                    stack.enter_context(mock.patch.object(*undo[change]))
            return bench.prepare_model_case(case)[0]

    cases = {c.name: c for c in bench.model_cases(False)}
    out: dict = {"rounds": rounds, "changes": STEP_CHANGES}
    for dense, hocp in (("resnet18 dense 2-D", "resnet18_hocp static"), ("resnet18_3d dense", "resnet18_hocp transduced"),
                        ("jester dense", "jester_hocp")):
        dense_names = {False: f"{dense}, before", True: f"{dense}, + max_pool"}  # keyed by "new pool?"
        calls = {name: prepared(cases[dense], ("max_pool",) if new_pool else ()) for new_pool, name in dense_names.items()}
        hocp_pool = {}  # HO-CP call name -> whether it uses the new pool
        for i in range(len(STEP_CHANGES) + 1):
            name = f"{hocp}, " + ("before" if i == 0 else "+ " + STEP_CHANGES[i - 1])
            calls[name], hocp_pool[name] = prepared(cases[hocp], STEP_CHANGES[:i]), "max_pool" in STEP_CHANGES[:i]
        t = bench.time_interleaved(calls, rounds, budget_s=1e9)
        ms = {name: v["median_ms"] for name, v in t.items()}
        out[hocp] = {"ms": ms, "ratio_to_dense_same_pool": {
            name: ms[name] / ms[dense_names[new_pool]] for name, new_pool in hocp_pool.items()}}
    out["loadavg"] = os.getloadavg()
    return out


# XLA CPU compiler options (jaxlib 0.10.2's ``XLA_FLAGS=--help`` lists them), passed per program
# through ``jax.jit(..., compiler_options=...)``; "default, second copy" compiles the default
# program again: the two default copies differ only by noise.
STEP_COMPILER_OPTIONS = {
    "default": None,
    "default, second copy": None,
    "memory-optimized scheduler": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
    "oneDNN": {"xla_cpu_use_onednn": True},
    "XNNPACK graph fusion": {"xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"},
    "fast-runtime preset": {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME"},
    "fast math": {"xla_cpu_enable_fast_math": True},
    "XNNPACK off": {"xla_cpu_use_xnnpack": False},
}


def compiler_options(rounds: int = 20) -> dict:
    """The ResNet-18 2-D train-step pair of ``bench``, each step compiled under every setting of
    :data:`STEP_COMPILER_OPTIONS`, all in this process and timed interleaved: per setting, the
    HO-CP/dense ratio and each step's time over its default program's."""
    from benchmarks import bench

    cases = resnet2d_cases()
    (hocp,) = [c for c in cases if c.reference]
    calls = {}
    for case in cases:
        step, state, batch = bench.model_step(case)
        for label, options in STEP_COMPILER_OPTIONS.items():
            compiled = jax.jit(step, compiler_options=options).lower(state, batch).compile()
            calls[(case.name, label)] = functools.partial(lambda c, *a: jax.block_until_ready(c(*a)), compiled, state, batch)
    t = time_interleaved({f"{name} | {label}": call for (name, label), call in calls.items()}, rounds, budget_s=1e9)
    ms = {label: {c.name: t[f"{c.name} | {label}"]["median_ms"] for c in cases} for label in STEP_COMPILER_OPTIONS}
    return {"options": STEP_COMPILER_OPTIONS, "rounds": rounds, "pair": [hocp.name, hocp.reference], "ms": ms,
            "ratio": {label: d[hocp.name] / d[hocp.reference] for label, d in ms.items()},
            "ms_over_default": {label: {n: v / ms["default"][n] for n, v in d.items()} for label, d in ms.items()},
            "loadavg": os.getloadavg()}


@contextlib.contextmanager
def _cp_paths(picks: dict[str, str], force: dict[str, str] | None = None):
    """Within the block, each CP conv traced with ``implementation="auto"`` runs on the path
    ``force`` gives its shape (keys ``"(B, H, W, C_in) -> C_out, stride (s, s)"``), else on
    ``auto``'s; ``picks`` records the path of every shape."""
    from hocp_jax import autotune

    choose, force = autotune.choose_cp, force or {}

    def patched(x_shape, dtype, params, modes, strides, *args, **kwargs):
        key = f"{tuple(x_shape)} -> {params['factor_out'].shape[0]}, stride {tuple(strides)}"
        picks[key] = force.get(key) or choose(x_shape, dtype, params, modes, strides, *args, **kwargs)
        return picks[key]

    with mock.patch.object(autotune, "choose_cp", patched):
        yield


def _step_picks(dense_call, build_hocp: Callable[[], Callable], rounds: int) -> dict:
    """A HO-CP train step (``build_hocp()`` compiles it) with ``auto``'s paths, and once per CP conv
    shape of the step with the convs of that shape on the other path, interleaved with
    ``dense_call``, the dense step."""
    picks: dict[str, str] = {}
    calls = {"dense": dense_call}
    with _cp_paths(picks):
        calls["auto"] = build_hocp()
    other = {"factorized": "reconstructed", "reconstructed": "factorized"}
    for key, pick in dict(picks).items():
        with _cp_paths({}, {key: other[pick]}):
            calls[f"{key}: {other[pick]}"] = build_hocp()
    t = time_interleaved(calls, rounds, budget_s=1e9)
    ms = {name: v["median_ms"] for name, v in t.items()}
    return {"rounds": rounds, "auto_picks": picks, "ms": ms,
            "over_auto": {name: v / ms["auto"] for name, v in ms.items()}, "loadavg": os.getloadavg()}


def resnet2d_step_picks(rounds: int = 25) -> dict:
    """The HO-CP ResNet-18 2-D train step of ``bench`` with ``auto``'s paths, and once per CP conv
    shape of the step (the stem too) with the convs of that shape on the other path, interleaved
    with the dense step: whether each of ``auto``'s picks is the faster one inside the step."""
    from benchmarks import bench

    dense, hocp = resnet2d_cases()
    return _step_picks(bench.compile_jax(*bench.model_step(dense))[0],
                       lambda: bench.compile_jax(*bench.model_step(hocp))[0], rounds)


def transduced_step_picks(rounds: int = 15) -> dict:
    """:func:`resnet2d_step_picks` for ``bench``'s transduced HO-CP ResNet-18 train step (one clip of
    8 frames of 112 x 112, the 3-D stem too), against the dense 3-D step. Shapes that only the
    transduction's 2-D source model traces are flipped too; their rows time the same program as
    ``auto``'s."""
    from benchmarks import bench

    cases = {c.name: c for c in bench.model_cases(False)}
    return _step_picks(bench.prepare_model_case(cases["resnet18_3d dense"])[0],
                       lambda: bench.prepare_model_case(cases["resnet18_hocp transduced"])[0], rounds)


RESNET2D_SCALES = ((8, 112), (32, 112), (8, 224), (16, 224))


def resnet2d_scales(rounds: int = 7) -> dict:
    """The ResNet-18 2-D train-step pair of ``bench`` (8 images of 112 x 112) and the same pair at
    the (batch, image size) of :data:`RESNET2D_SCALES`, each pair interleaved: the HO-CP/dense
    ratio per scale and ``auto``'s path for each CP conv of the HO-CP step there (the stem too);
    then, per scale, the step's 3x3 conv shapes one by one with each path
    (:func:`~benchmarks.experiments.layers.resnet2d_layer_sums`)."""
    from benchmarks import bench

    out: dict = {"rounds": rounds, "scales": {}}
    for batch, image in RESNET2D_SCALES:
        picks: dict[str, str] = {}
        calls = {}
        for case in resnet2d_cases():
            with _cp_paths(picks):
                step = bench.model_step(dataclasses.replace(case, input_shape=(batch, image, image, 3)))
                calls[case.model] = bench.compile_jax(*step)[0]
        t = time_interleaved(calls, rounds, budget_s=1e9)
        ms = {name: v["median_ms"] for name, v in t.items()}
        out["scales"][f"{batch}x{image}x{image}"] = {
            "step_ms": ms, "step_ratio": ms["resnet18_hocp"] / ms["resnet18"],
            "per_round_ratios": [h / d for h, d in zip(t["resnet18_hocp"]["times_ms"], t["resnet18"]["times_ms"])],
            "auto_picks": picks} | resnet2d_layer_sums(batch, image, rounds)
    out["loadavg"] = os.getloadavg()
    return out


def dense_baseline_steps(rounds: int = 9) -> dict:
    """The three train-step pairs of ``bench`` (HO-CP model and its dense reference) as compiled
    normally and with every dense conv run as a patches matrix product
    (:func:`~benchmarks.bench.prepare_patches_case`: the dense models' convs, and the HO-CP
    models' reconstructed convs and dense shortcuts), the four steps of a pair interleaved: the
    HO-CP/dense ratio with ``lax``'s convs and with the patches program on both sides. Each
    patches program's loss and gradient norm are checked against its ``lax`` program's first."""
    from benchmarks import bench

    cases = {c.name: c for c in bench.model_cases(False)}
    out: dict = {"rounds": rounds, "pairs": []}
    for case in cases.values():
        if case.reference is None:
            continue
        calls, replaced = {}, {}
        for c in (cases[case.reference], case):
            calls[f"{c.name} lax"] = bench.prepare_model_case(c)[0]
            # a model without dense convs (the Jester HO-CP net) has one program, timed under both names
            with_patches = bench.prepare_patches_case(c, calls[f"{c.name} lax"])
            calls[f"{c.name} patches"] = with_patches[0] if with_patches else calls[f"{c.name} lax"]
            replaced[c.name] = with_patches[1]["convs_as_patches"] if with_patches else 0
        t = time_interleaved(calls, rounds, budget_s=1e9)
        ms = {k: v["median_ms"] for k, v in t.items()}
        ref, name = case.reference, case.name
        out["pairs"].append({
            "pair": f"{name} / {ref}", "convs_replaced": replaced, "ms": ms,
            "times_ms": {k: v["times_ms"] for k, v in t.items()},
            "ratio lax": ms[f"{name} lax"] / ms[f"{ref} lax"],
            "ratio patches": ms[f"{name} patches"] / ms[f"{ref} patches"],
            "ratio, faster program each side": min(ms[f"{name} lax"], ms[f"{name} patches"])
            / min(ms[f"{ref} lax"], ms[f"{ref} patches"]),
        })
    out["loadavg"] = os.getloadavg()
    return out


TILE_THRESHOLDS_MIB = (8, 6, 4, 3)


def tile_threshold(rounds: int = 7) -> dict:
    """The HO-CP video train steps with :data:`hocp_jax.conv_plans.TILE_MIN_BYTES` (the smallest
    per-sample intermediate that the factorized path cuts into tiles) at each of
    :data:`TILE_THRESHOLDS_MIB`, patched at trace time: ``bench``'s transduced ResNet-18 (one clip
    of 8 x 112 x 112) and Jester HO-CP net (2 x 18 x 84 x 84) beside their dense references, and
    the transduced ResNet-18 on one 8 x 224 x 224 clip, all interleaved. Also lists, per
    threshold, the convs that run in tiles (per-sample input shape, rank, tiled mode and rows)."""
    from benchmarks import bench
    from hocp_jax import conv_plans

    cases = {c.name: c for c in bench.model_cases(False)}
    trans224 = dataclasses.replace(cases["resnet18_hocp transduced"], name="resnet18_hocp transduced 224",
                                   input_shape=(1, 8, 224, 224, 3), transduce_from=(8, 224, 224, 3),
                                   reference=None)  # no 224-pixel dense step is timed
    hocp = [cases["resnet18_hocp transduced"], cases["jester_hocp"], trans224]
    calls, tiled = {}, {}
    plan = conv_plans.tile_plan
    for mib in TILE_THRESHOLDS_MIB:
        seen: dict = {}

        def spy(x_shape, rank, *args, **kwargs):
            out = plan(x_shape, rank, *args, **kwargs)
            if out:
                seen[f"{tuple(x_shape[1:])} R={rank}"] = {"mode": out[0], "rows": out[1]}
            return out

        with mock.patch.object(conv_plans, "TILE_MIN_BYTES", mib * 2**20), mock.patch.object(conv_plans, "tile_plan", spy):
            for case in hocp:
                calls[f"{case.name}, {mib} MiB"] = bench.prepare_model_case(case)[0]
        tiled[f"{mib} MiB"] = seen
    for name in ("resnet18_3d dense", "jester dense"):
        calls[name] = bench.prepare_model_case(cases[name])[0]
    t = time_interleaved(calls, rounds, budget_s=1e9)
    ms = {name: v["median_ms"] for name, v in t.items()}
    ratios = {f"{case.name}, {mib} MiB": ms[f"{case.name}, {mib} MiB"] / ms[case.reference]
              for case in hocp if case.reference for mib in TILE_THRESHOLDS_MIB}
    return {"rounds": rounds, "step_ms": ms, "ratio_to_dense": ratios, "tiled_convs": tiled,
            "loadavg": os.getloadavg()}


STEP_PAIRS = (("resnet18 dense 2-D", "resnet18_hocp static"), ("resnet18_3d dense", "resnet18_hocp transduced"),
              ("jester dense", "jester_hocp"))


def autotune_steps(rounds: int = 9) -> dict:
    """The three HO-CP train steps of ``bench`` compiled with the analytic picks and with the
    measured autotune's (:func:`hocp_jax.autotune.policy_mode`, no cache file, so every conv shape
    is timed while the step is traced), each pair interleaved with its dense step: which picks the
    two policies make (:func:`benchmarks.bench.recording_picks` over every trace of preparing a
    step: the model's init, the transduced model's 2-D source, the step; the Jester net's convs,
    with a ReLU between their factors, always run factorized and make none; the convs whose picks
    differ, :func:`benchmarks.bench.picks_that_differ`), how long preparing took with the timing,
    and the step times. Also the kernel-gradient picks of the reconstructed 2-D convs
    (:func:`hocp_jax.autotune.choose_kernel_grad`) under the measured policy, beside the host's
    rule for the same shape. ``bench --policy-steps`` makes the same comparison within its own
    train-step rounds."""
    from benchmarks import bench
    from hocp_jax import autotune, conv_plans

    cases = {c.name: c for c in bench.model_cases(False)}
    out: dict = {"rounds": rounds}
    for dense, hocp in STEP_PAIRS:
        calls, picks, prepare_s = {dense: bench.prepare_model_case(cases[dense])[0]}, {}, {}
        for policy in ("analytic", "measure"):
            autotune.clear_cache()
            t0 = time.perf_counter()
            try:
                with autotune.policy_mode(policy), bench.recording_picks() as picks[policy]:
                    calls[f"{hocp}, {policy}"] = bench.prepare_model_case(cases[hocp])[0]
            finally:
                autotune.clear_cache()
            prepare_s[policy] = time.perf_counter() - t0
        t = bench.time_interleaved(calls, rounds, budget_s=1e9)
        ms = {name: v["median_ms"] for name, v in t.items()}
        grad_picks = collections.Counter(
            json.dumps([x, k, pick, "products" if conv_plans.matmul_kernel_grad(x, jax.numpy.float32) else "xla"])
            for x, k, pick in picks["measure"]["kernel_grad"])
        out[hocp] = {"ms": ms, "ratio_to_dense": {name: v / ms[dense] for name, v in ms.items()},
                     "measure/analytic": ms[f"{hocp}, measure"] / ms[f"{hocp}, analytic"],
                     "prepare_s": prepare_s, "auto_convs_traced": len(picks["analytic"]["cp"]),
                     "picks_that_differ: [conv, analytic, measure]": bench.picks_that_differ(picks["analytic"],
                                                                                             picks["measure"]),
                     "measured kernel gradients: [x shape, kernel shape, measure, rule] -> traced convs": dict(grad_picks)}
    out["loadavg"] = os.getloadavg()
    return out


def low_precision_steps(rounds: int = 7) -> dict:
    """The three train-step pairs of ``bench`` (each HO-CP model and its dense one) in float32 and
    with ``dtype=bfloat16`` (float32 parameters), the HO-CP models' bfloat16 steps both as the
    library runs them (float32 intermediates in the factorized convs on CPU,
    :func:`hocp_jax.conv_plans.compute_dtype`) and in bfloat16 arithmetic (``upcast_mode(False)``),
    interleaved per pair: what bfloat16 does to a whole train step on CPU."""
    import jax.numpy as jnp

    from benchmarks import bench
    from hocp_jax import conv_plans

    cases = {c.name: c for c in bench.model_cases(False)}
    out: dict = {"rounds": rounds}
    for pair in STEP_PAIRS:
        calls = {}
        for name in pair:
            case = cases[name]
            head = {"head": {"n_outputs": 0, "n_classes": 27}} if case.target == "logits" else {}
            variants = [("float32", None, None), ("bfloat16", jnp.bfloat16, None)]
            if name != pair[0]:
                variants.append(("bfloat16 arithmetic", jnp.bfloat16, False))
            for label, dtype, upcast in variants:
                model = get_model(case.model, tiny=case.tiny, dtype=dtype, **head)
                with conv_plans.upcast_mode(upcast):
                    calls[f"{name} {label}"] = bench.compile_jax(*bench.model_step(case, model))[0]
        ms = {k: round(v["median_ms"], 1) for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
        dense, hocp = pair
        out[hocp] = {"ms": ms,
                     "bfloat16 / float32": {n: round(ms[f"{n} bfloat16"] / ms[f"{n} float32"], 3) for n in pair},
                     "bfloat16 arithmetic / float32": round(ms[f"{hocp} bfloat16 arithmetic"] / ms[f"{hocp} float32"], 3),
                     "hocp / dense": {label: round(ms[f"{hocp} {label}"] / ms[f"{dense} {label}"], 3)
                                      for label in ("float32", "bfloat16")}}
        print(json.dumps(out[hocp]), flush=True)
    out["loadavg"] = os.getloadavg()
    return out


def conv_routes(rounds: int = 5) -> dict:
    """Train steps with the models' 1x1 and depthwise convs as :func:`hocp_jax.conv_ops.conv_general_dilated`
    runs them (matrix products, the shift kernel) and as XLA's convolution
    (:func:`~benchmarks.experiments.variants.lax_convs`), interleaved per group: the CIFAR-10
    MobileNet-v2, dense (also with only one kind routed) and HO-CP, on 32 and 128 images of 32x32
    (``bench``'s SGD step, a 2-output regression head); then ``bench``'s ResNet-18 train-step cases
    (2-D dense and HO-CP, 3-D dense and transduced HO-CP), whose 1x1 convs are the shortcuts."""
    head = {"head": {"n_outputs": 2, "n_classes": 0}}
    out: dict = {"rounds": rounds}
    for b in (32, 128):
        shape, calls = (b, 32, 32, 3), {}
        for name in ("mobilenet_v2", "mobilenet_v2_hocp"):
            for label, routes in (("", None), (", lax convs", {}), (", lax depthwise", {"pointwise": False}),
                                  (", lax 1x1", {"depthwise": False})):
                if label in (", lax depthwise", ", lax 1x1") and name != "mobilenet_v2":
                    continue
                with lax_convs(**routes) if routes is not None else contextlib.nullcontext():
                    calls[name + label] = step_call(get_model(name, **head), shape)
        _time_routes(out, f"mobilenet batch {b}", calls, rounds)
    _time_routes(out, "resnet18", _resnet18_route_calls(), rounds)
    out["loadavg"] = os.getloadavg()
    return out


def conv_routes_resnet18(rounds: int = 15) -> dict:
    """The ResNet-18 group of :func:`conv_routes` alone (its train steps as the library runs them
    and with ``lax``'s convs, interleaved), for more rounds."""
    out: dict = {"rounds": rounds}
    _time_routes(out, "resnet18", _resnet18_route_calls(), rounds)
    out["loadavg"] = os.getloadavg()
    return out


def _resnet18_route_calls() -> dict:
    """``bench``'s ResNet-18 train steps, each compiled as the library runs it and with ``lax``'s convs."""
    from benchmarks import bench

    calls = {}
    for case in bench.model_cases(False):
        if case.model.startswith("resnet18"):
            calls[case.name] = bench.compile_jax(*bench.model_step(case))[0]
            with lax_convs():
                calls[f"{case.name}, lax convs"] = bench.compile_jax(*bench.model_step(case))[0]
    return calls


def _time_routes(out: dict, group: str, calls: dict, rounds: int) -> None:
    """Times ``calls`` interleaved into ``out[group]``: ms per call and each ``<name> / <name>, lax convs`` ratio."""
    ms = {k: round(v["median_ms"], 1) for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
    out[group] = {"ms": ms} | {f"{k} / {k}, lax convs": round(ms[k] / ms[f"{k}, lax convs"], 3)
                               for k in ms if f"{k}, lax convs" in ms}
    print(json.dumps({group: out[group]}), flush=True)


def patches_memory(rounds: int = 9) -> dict:
    """``bench``'s dense 3-D train steps (ResNet-18 3-D, the Jester net) compiled with ``lax``'s
    convs, with every dense conv as a patches matrix product (:func:`benchmarks.patches.patches_convs`)
    and with the patches product under ``jax.checkpoint`` (the patches recomputed in the backward
    pass instead of kept): ms per step, interleaved, and the temporary buffers of each compiled
    step from XLA's ``memory_analysis()``, in MiB."""
    from benchmarks import bench, patches

    @contextlib.contextmanager
    def remat_patches():
        with mock.patch.object(patches, "dense_patches", jax.checkpoint(patches.dense_patches, static_argnums=(2, 3))):
            with patches.patches_convs() as replaced:
                yield replaced

    calls, temp_mib = {}, {}
    for case in bench.model_cases(False):
        if case.name not in ("resnet18_3d dense", "jester dense"):
            continue
        for label, program in (("lax", contextlib.nullcontext), ("patches", patches.patches_convs),
                               ("patches remat", remat_patches)):
            with program():
                fn, *args = bench.model_step(case)
                compiled = jax.jit(fn).lower(*args).compile()
            temp_mib[f"{case.name}, {label}"] = round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)
            calls[f"{case.name}, {label}"] = functools.partial(lambda c, a: jax.block_until_ready(c(*a)), compiled, args)
    print(json.dumps({"temp MiB": temp_mib}), flush=True)
    ms = {k: round(v["median_ms"], 1) for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
    return {"rounds": rounds, "ms": ms, "temp MiB": temp_mib, "loadavg": os.getloadavg()}


def step_memory(batch_scale: int = 1) -> dict:
    """``bench``'s train steps (``lax`` convs) at ``batch_scale`` times their batch (the command
    line's number), compiled only, never run: XLA's ``memory_analysis()`` temporary MiB of each
    as this backend's automatic rules build it, with the CP convs' per-sample, chunk and tile loops
    off (what GPU/TPU get) and with the factorized convs one sample at a time without tiles
    (``conv_plans.per_sample_mode(True)``, which a GPU/TPU user can set at trace time to bound the
    intermediates), each HO-CP step's temp also over its dense reference's as built here."""
    from benchmarks import bench

    if not (isinstance(batch_scale, int) and batch_scale >= 1):
        raise ValueError(f"batch_scale={batch_scale!r}: expected an int >= 1")
    programs = {"as on this backend": lambda *a: bench.compile_program(*a)[0],
                "loops off": bench.compile_without_loops,
                "one sample at a time": functools.partial(bench.compile_in_modes, per_sample=True, tile_rows=0)}
    temp, refs = {}, {}
    for case in bench.model_cases(False):
        case = bench.scaled(case, batch_scale)
        refs[case.name] = case.reference
        step, state, batch = bench.model_step(case)
        temp[case.name] = {label: bench.memory_mib(build(step, state, batch))["temp"]
                           for label, build in programs.items()
                           if case.reference or label == "as on this backend"}
        print(json.dumps({case.name: temp[case.name]}), flush=True)
    ratios = {name: {label: mib / temp[ref]["as on this backend"] for label, mib in temp[name].items()}
              for name, ref in refs.items() if ref}
    return {"batch_scale": batch_scale, "backend": jax.default_backend(), "temp_mib": temp,
            "over_dense_reference": ratios}


def _patched_steps(target, attr: str, variants: dict, reference, cases) -> tuple[dict, dict]:
    """``bench``'s train steps of ``cases`` compiled with ``target.attr`` set to each of
    ``variants`` (label -> value): the compiled calls (keys ``"<case>, <label>"``) and each step's
    gradient error against the same step with ``reference`` there (the norm of the difference of
    the parameter updates over the norm of the reference's update), printed per case as it is
    measured."""
    import numpy as np

    from benchmarks import bench

    norm = lambda t: float(np.sqrt(sum(np.sum(np.square(a)) for a in jax.tree.leaves(t))))
    calls, relerr = {}, {}
    for case in cases:
        updates = {}
        for label, value in (variants | {"reference": reference}).items():
            with mock.patch.object(target, attr, value):
                step, state, batch = bench.model_step(case)
                call = bench.compile_jax(step, state, batch)[0]  # the program prepare_model_case times
            updates[label] = jax.tree.map(lambda a, b: np.float64(a) - np.float64(b), state.params, call()[0].params)
            if label in variants:
                calls[f"{case.name}, {label}"] = call
        ref = updates["reference"]
        relerr[case.name] = {label: float(f"{norm(jax.tree.map(np.subtract, updates[label], ref)) / norm(ref):.3g}")
                             for label in variants}
        print(json.dumps({case.name: relerr[case.name]}), flush=True)
    return calls, relerr


def _pool_steps(pools: dict, cases) -> tuple[dict, dict]:
    """:func:`_patched_steps` with each of ``pools`` (label -> a :func:`hocp_jax.pooling.max_pool`
    stand-in) as the library's max-pool, against ``lax.reduce_window``'s pool. Until stop 65 the
    models called the pool on their activations; since stop 66 their batch norm -> activation ->
    pool blocks (:class:`hocp_jax.models.common.NormActPool`) pool the batch norm's input."""
    from hocp_jax import pooling

    return _patched_steps(pooling, "max_pool", pools, reduce_window_pool, cases)


def pool_blocks(rounds: int = 13) -> dict:
    """The Jester net's 2x2x2 max-pools (windows that tile the input) pooled as blocks
    (:func:`~benchmarks.experiments.variants.block_pool`, the library's path in stop 49, dropped
    in stop 50) and by the library's shift path (:mod:`hocp_jax.pooling`): each block's pool alone
    (fwd+bwd, ``bench`` protocol, on the activations of ``bench``'s Jester step, batch 2, checked
    against each other), then ``bench``'s Jester dense and HO-CP train steps with either pool,
    interleaved, and each step's gradient error against the same step with ``lax.reduce_window``'s
    pool (``grad relerr``: the norm of the difference of the parameter updates over the norm of
    the reference's update)."""
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import bench
    from hocp_jax.pooling import max_pool

    pools = {"blocks": block_pool, "shift": max_pool}
    out: dict = {"rounds": rounds}
    calls = {}
    for shape in ((2, 18, 84, 84, 64), (2, 9, 42, 42, 128), (2, 4, 21, 21, 256), (2, 2, 10, 10, 256)):
        x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
        for label, pool in pools.items():
            f = functools.partial(lambda p, x, w: p(x * w, (2, 2, 2), (2, 2, 2), ((0, 0),) * 3), pool)
            w = jnp.ones((shape[-1],), jnp.float32)
            calls[f"pool {'x'.join(map(str, shape))}, {label}"] = bench.compile_fwd_bwd(f, x, w, True, bench.cotangent(f, x, w))[0]
    got = {k: jax.tree.leaves(c()) for k, c in calls.items()}
    for k in got:
        if k.endswith("blocks"):
            for a, b in zip(got[k], got[k.replace("blocks", "shift")]):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=k)
    out["pools_ms"] = {k: round(v["median_ms"], 2) for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
    print(json.dumps({"pools_ms": out["pools_ms"]}), flush=True)
    calls, out["grad relerr"] = _pool_steps(pools, [c for c in bench.model_cases(False) if c.model.startswith("jester")])
    t = time_interleaved(calls, rounds, budget_s=1e9)
    ms = {k: round(v["median_ms"], 1) for k, v in t.items()}
    out["steps_ms"], out["steps_times_ms"] = ms, {k: v["times_ms"] for k, v in t.items()}
    out["blocks/shift"] = {k[:-len(", blocks")]: round(ms[k] / ms[k.replace("blocks", "shift")], 3) for k in ms if k.endswith("blocks")}
    out["blocks/shift per round"] = {k[:-len(", blocks")]: per_round_ratio(t, k, k.replace("blocks", "shift"))
                                     for k in ms if k.endswith("blocks")}
    out["hocp/dense"] = {label: round(ms[f"jester_hocp, {label}"] / ms[f"jester dense, {label}"], 3) for label in pools}
    out["loadavg"] = os.getloadavg()
    return out


def pool_index(rounds: int = 11) -> dict:
    """The library's max-pool (:mod:`hocp_jax.pooling`: the forward pass keeps each window's first
    maximum's index) against its stop 50-64 version, whose backward pass found that index again
    from the saved input and output
    (:func:`~benchmarks.experiments.variants.recomputed_index_pool`): each pool of the Jester
    nets' first two blocks and of the ResNet-18 2-D stem alone (fwd+bwd, ``bench`` protocol, on
    the shapes of ``bench``'s steps), then all of ``bench``'s train steps with either pool,
    interleaved, and each step's gradient error against the same step with
    ``lax.reduce_window``'s pool (``grad relerr``, as in :func:`pool_blocks`)."""
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import bench
    from hocp_jax.pooling import max_pool

    pools = {"saved index": max_pool, "recomputed index": recomputed_index_pool}
    out: dict = {"rounds": rounds}
    calls = {}
    jester = ((2, 2, 2), (2, 2, 2), ((0, 0),) * 3)
    for shape, geometry in (((2, 18, 84, 84, 64), jester), ((2, 9, 42, 42, 128), jester),
                            ((8, 56, 56, 64), ((3, 3), (2, 2), ((1, 1), (1, 1))))):
        x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
        w = jnp.ones((shape[-1],), jnp.float32)
        for label, pool in pools.items():
            f = functools.partial(lambda p, x, w: p(x * w, *geometry), pool)
            calls[f"pool {'x'.join(map(str, shape))}, {label}"] = bench.compile_fwd_bwd(f, x, w, True, bench.cotangent(f, x, w))[0]
    got = {k: jax.tree.leaves(c()) for k, c in calls.items()}
    for k in got:
        for a, b in zip(got[k], got[k.replace("recomputed", "saved")]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=k)
    t = time_interleaved(calls, rounds, budget_s=1e9)
    out["pools_ms"] = {k: round(v["median_ms"], 2) for k, v in t.items()}
    print(json.dumps({"pools_ms": out["pools_ms"]}), flush=True)
    calls, out["grad relerr"] = _pool_steps(pools, bench.model_cases(False))
    return out | _compare_steps(calls, rounds, "saved index", "recomputed index", "saved/recomputed")


def custom_jvp_programs(rounds: int = 0) -> dict:
    """The library's max-pool, depthwise shift kernel and loop over chunks of samples
    (:func:`hocp_jax.conv_ops.map_chunks`), custom JVPs since stop 71 (tangents written so that
    JAX's transpose of them is their backward passes, and ``jax.jvp`` works), against the custom
    VJPs they replaced (:func:`~benchmarks.experiments.variants.custom_vjp_pool`,
    :func:`~benchmarks.experiments.variants.custom_vjp_shift_depthwise`,
    :func:`~benchmarks.experiments.variants.custom_vjp_map_chunks`), all three patched in at
    once: fwd+bwd (``bench`` protocol) of the pools of ``bench``'s steps, of depthwise passes of
    the CP paths and MobileNet-v2, of the factorized path in its loops (one sample at a time, 3-D;
    chunks of samples, 2-D) and of a dense conv in chunks, then all six of ``bench``'s train
    steps, each pair compared by :func:`benchmarks.xla_profile.program_fingerprint` (``same
    program``; ``same instructions``: in any order within each computation), with the largest
    difference of their results (floating-point leaves; the steps': new state and metrics) and
    XLA's temporary memory of each (MiB, library / old). With ``rounds``, every pair is then
    timed, interleaved: the layers (medians, ms) and the steps (:func:`_compare_steps`)."""
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import bench, xla_profile
    from benchmarks.experiments import variants
    from hocp_jax import conv, conv_plans, init, pooling

    patches = ((pooling, "_max_pool", variants.custom_vjp_pool), (conv_ops, "_shift_depthwise", variants.custom_vjp_shift_depthwise),
               (conv_ops, "map_chunks", variants.custom_vjp_map_chunks))
    out: dict = {}
    calls: dict = {}  # "<name>, library" / "<name>, old" -> the compiled call

    def compare(name, build) -> None:  # build() -> (fn, args), traced in the library's and the patched state
        programs, results, temp = [], [], []
        for old in (False, True):
            with contextlib.ExitStack() as stack:
                for target, attr, value in patches if old else ():
                    stack.enter_context(mock.patch.object(target, attr, value))
                fn, args = build()
                compiled = bench.compile_program(fn, *args)[0]
            programs.append([xla_profile.program_fingerprint(compiled.as_text(), ordered) for ordered in (True, False)])
            temp.append(round(compiled.memory_analysis().temp_size_in_bytes / 2 ** 20, 1))
            calls[f"{name}, {'old' if old else 'library'}"] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
            results.append([a for a in jax.tree.leaves(compiled(*args)) if jnp.issubdtype(a.dtype, jnp.floating)])
        diff = max(float(np.max(np.abs(np.float64(a) - np.float64(b)) / (np.max(np.abs(np.float64(b))) or 1.0)))
                   for a, b in zip(*results))
        out[name] = {"same program": programs[0][0] == programs[1][0],
                     "same instructions": programs[0][1] == programs[1][1],
                     "max relative difference": diff, "temp MiB": temp}
        print(json.dumps({name: out[name]}), flush=True)

    def layer(fn, x, w, input_grad=True):
        return lambda: (bench.fwd_bwd(fn, input_grad), (x, w, bench.cotangent(fn, x, w)))

    rng = np.random.default_rng(0)
    normal = lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    jester = ((2, 2, 2), (2, 2, 2), ((0, 0),) * 3)
    for shape, geometry in (((2, 18, 84, 84, 64), jester), ((2, 9, 42, 42, 128), jester),
                            ((8, 56, 56, 64), ((3, 3), (2, 2), ((1, 1), (1, 1))))):
        compare(f"pool {'x'.join(map(str, shape))}",
                layer(lambda x, w, g=geometry: pooling.max_pool(x * w, *g), normal(shape), jnp.ones(shape[-1:])))
    for shape, k_shape, strides, pads in (((8, 9, 42, 42, 384), (1, 3, 1, 384), (1, 1, 1), ((0, 0), (1, 1), (0, 0))),
                                          ((2, 8, 28, 28, 370), (3, 1, 1, 370), (2, 1, 1), ((1, 1), (0, 0), (0, 0))),
                                          ((32, 16, 16, 96), (3, 3, 96), (2, 2), ((0, 1), (0, 1))),
                                          ((32, 8, 8, 192), (3, 3, 192), (1, 1), ((1, 1), (1, 1)))):
        f = lambda h, k, s=strides, p=pads: conv_ops._shift_depthwise(h, k, s, p, (1,) * len(s))
        compare(f"depthwise {'x'.join(map(str, shape))} kernel {'x'.join(map(str, k_shape))}",
                layer(f, normal(shape), normal(k_shape)))
    for name, shape, c_out, rank, modes in (("factorized per sample", (8, 4, 21, 21, 128), 256, 768, ("t", "h", "w")),
                                            ("factorized in chunks", (8, 56, 56, 64), 64, 273, ("h", "w"))):
        params = init.init_cp_params(jax.random.key(0), shape[-1], c_out, (3,) * len(modes), rank, modes=modes)
        f = lambda x, p, m=modes: conv.cp_conv(x, p, modes=m, padding="SAME", implementation="factorized")
        with conv_plans.tile_rows_mode(0):
            compare(f"{name} {'x'.join(map(str, shape))} -> {c_out}, rank {rank}", layer(f, normal(shape), params))
    f = lambda x, k: conv_ops.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=conv_ops.channels_last_dims(2))
    compare("dense in chunks 8x56x56x64 -> 64", layer(f, normal((8, 56, 56, 64)), normal((3, 3, 64, 64))))
    cases = bench.model_cases(False)
    for case in cases:
        def step(case=case):
            fn, state, batch = bench.model_step(case)
            return fn, (state, batch)
        compare(case.name, step)
    if rounds:
        steps = {k: v for k, v in calls.items() if k.rsplit(", ", 1)[0] in {c.name for c in cases}}
        layers = {k: v for k, v in calls.items() if k not in steps}
        t = time_interleaved(layers, rounds, budget_s=1e9)
        out["layers ms"] = {k: round(v["median_ms"], 2) for k, v in t.items()}
        out["layers library/old"] = {k[:-len(", library")]: round(t[k]["median_ms"] / t[k[:-len("library")] + "old"]["median_ms"], 3)
                                     for k in t if k.endswith(", library")}
        out["steps"] = _compare_steps(steps, rounds, "library", "old", "library/old")
    return out


def _compare_steps(calls: dict, rounds: int, new: str, old: str, key: str) -> dict:
    """``calls`` (``"<case>, <label>"``, labels ``new`` and ``old``, as :func:`_patched_steps`
    makes them) timed interleaved: the medians (``steps_ms``), every time, each case's ``new``
    / ``old`` ratio of the medians and per round (``key``, ``key per round``), and each HO-CP
    step over its dense one with either label, and the load average."""
    t = time_interleaved(calls, rounds, budget_s=1e9)
    ms = {k: round(v["median_ms"], 1) for k, v in t.items()}
    out = {"steps_ms": ms, "steps_times_ms": {k: v["times_ms"] for k, v in t.items()}}
    pairs = [(k[:-len(f", {new}")], k, k[:-len(new)] + old) for k in ms if k.endswith(f", {new}")]
    out[key] = {name: round(ms[a] / ms[b], 3) for name, a, b in pairs}
    out[f"{key} per round"] = {name: per_round_ratio(t, a, b) for name, a, b in pairs}
    out["hocp/dense"] = {label: {hocp: round(ms[f"{hocp}, {label}"] / ms[f"{dense}, {label}"], 3)
                                 for dense, hocp in (("resnet18 dense 2-D", "resnet18_hocp static"),
                                                     ("resnet18_3d dense", "resnet18_hocp transduced"),
                                                     ("jester dense", "jester_hocp"))
                                 if f"{hocp}, {label}" in ms}
                         for label in (new, old)}
    return out | {"loadavg": os.getloadavg()}


def norm_pool(rounds: int = 11) -> dict:
    """The models' batch norm -> activation -> max-pool blocks computed in pooled space
    (:class:`hocp_jax.models.common.NormActPool`, stop 66) against the stop 50-65 blocks, Flax's
    BatchNorm and the activation on the full-size maps, then the library's pool
    (:func:`~benchmarks.experiments.variants.unfused_norm_act_pool`): each block of ``bench``'s
    Jester steps (ELU; batch 2) and the ResNet-18 2-D stem's (ReLU; 8 x 56 x 56 x 64) alone, in
    train mode (fwd+bwd w.r.t. the input, scale and bias, ``bench`` protocol, checked against each
    other), then ``bench``'s Jester train steps with either block, interleaved, and each step's
    gradient error against the same step with the full-size blocks and ``lax.reduce_window``'s
    pool (``grad relerr``, as in :func:`pool_blocks`). (The ResNet-18 stem's block, a tie alone
    and in the steps in stop 66's first run, kept the separate layers.)"""
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import bench
    from hocp_jax.models import common

    blocks = {"pooled space": common.NormActPool, "full size": unfused_norm_act_pool}
    out: dict = {"rounds": rounds}
    calls = {}
    jester = ("elu", (2, 2, 2), (2, 2, 2), ((0, 0),) * 3)
    for shape, geometry in [((2, 18, 84, 84, 64), jester), ((2, 9, 42, 42, 128), jester), ((2, 4, 21, 21, 256), jester),
                            ((2, 2, 10, 10, 256), jester), ((8, 56, 56, 64), ("relu", (3, 3), (2, 2), ((1, 1), (1, 1))))]:
        x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
        for label, block in blocks.items():
            m = block(*geometry)
            stats = m.init(jax.random.key(0), x)["batch_stats"]
            f = functools.partial(lambda m, s, x, p: m.apply({"params": p, "batch_stats": s}, x, mutable=["batch_stats"])[0],
                                  m, stats)
            rng = np.random.default_rng(1)  # scales of both signs, none 0 (where the two blocks' gradients may differ)
            p = {k: jnp.asarray(rng.normal(size=shape[-1]) * sd, jnp.float32) for k, sd in (("scale", 1.0), ("bias", 0.5))}
            calls[f"block {'x'.join(map(str, shape))}, {label}"] = bench.compile_fwd_bwd(f, x, p, True,
                                                                                      bench.cotangent(f, x, p))[0]
    got = {k: jax.tree.leaves(c()) for k, c in calls.items()}
    for k in got:
        for a, b in zip(got[k], got[k.replace("pooled space", "full size")]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()), err_msg=k)
    t = time_interleaved(calls, rounds, budget_s=1e9)
    out["blocks_ms"] = {k: round(v["median_ms"], 2) for k, v in t.items()}
    print(json.dumps({"blocks_ms": out["blocks_ms"]}), flush=True)
    reference = functools.partial(unfused_norm_act_pool, pool=reduce_window_pool)
    cases = [c for c in bench.model_cases(False) if c.model.startswith("jester")]  # the models with such blocks
    calls, out["grad relerr"] = _patched_steps(common, "NormActPool", blocks, reference, cases)
    return out | _compare_steps(calls, rounds, "pooled space", "full size", "pooled/full")


def input_patches(rounds: int = 11) -> dict:
    """``bench``'s train steps with the networks' first convs (3 input channels, no input
    gradient) as a patches matrix product (:func:`benchmarks.patches.patches_convs` limited to
    convs of at most 4 input channels; every other conv as the library runs it), against the
    library's programs, interleaved: the dense models' first conv, and the HO-CP models' stem on
    its reconstructed path (a dense conv of the rebuilt kernel, as patches) instead of ``auto``'s
    pick. The lead of stop 44 for the 3-D convs of a rebuilt kernel, narrowed to the convs where
    the patches are cheap to build (3 input channels). Since stop 50 the library runs the 3-D ones
    as patches itself (:func:`hocp_jax.conv_plans.patches_conv`), so of the first convs only the 2-D
    ones (and the 2-D HO-CP stem's pick) still differ between the two programs."""
    from benchmarks import bench, patches
    from hocp_jax import autotune

    choose = autotune.choose_cp

    def reconstructed_stems(x_shape, *args, **kwargs):
        return "reconstructed" if x_shape[-1] <= 4 else choose(x_shape, *args, **kwargs)

    calls, convs = {}, {}
    for case in bench.model_cases(False):
        calls[case.name] = bench.prepare_model_case(case)[0]
        with patches.patches_convs(max_in_channels=4) as replaced, mock.patch.object(autotune, "choose_cp", reconstructed_stems):
            calls[f"{case.name}, first conv as patches"] = bench.prepare_model_case(case)[0]
        convs[case.name] = [list(r) for r in replaced]
    t = time_interleaved(calls, rounds, budget_s=1e9)
    ms = {k: round(v["median_ms"], 1) for k, v in t.items()}
    out = {"rounds": rounds, "steps_ms": ms,
           "patches/library": {k: round(ms[f"{k}, first conv as patches"] / ms[k], 3) for k in convs},
           "patches/library per round": {k: per_round_ratio(t, f"{k}, first conv as patches", k) for k in convs},
           "convs_as_patches": convs, "steps_times_ms": {k: v["times_ms"] for k, v in t.items()}}
    hocp = [c for c in bench.model_cases(False) if c.reference]
    out["hocp/dense"] = {c.name: {label: round(ms[c.name + label] / ms[c.reference + label], 3)
                                  for label in ("", ", first conv as patches")} for c in hocp}
    out["loadavg"] = os.getloadavg()
    return out


# (name, config module, its argument, model name replacing the config's or None)
MICROBATCH_CONFIGS = (("affectnet", "affectnet", "", None), ("affectnet dense", "affectnet", "", "resnet18"),
                      ("jester", "jester", "hocp_s", None), ("jester dense", "jester", "dense", None))


def microbatches(rounds: int = 5) -> dict:
    """The train steps of ``configs/affectnet.py`` (HO-CP ResNet-18, batch 64 of 64 x 64 faces,
    Adam, the shake-shake affect loss + cross-entropy + lasso), the same with the dense ResNet-18
    (since stop 60), ``configs/jester.py:hocp_s`` and ``configs/jester.py:dense`` (since stop 60;
    their batch and clip shape), with the batch through the model whole and in k = 2, 4, 8
    micro-batches (``make_train_step(microbatches=k)``): XLA's ``memory_analysis()`` temporary
    MiB of each compiled step, as this backend's automatic rules build it and with the CP convs'
    loops off (what GPU/TPU get), and ms per step, interleaved (``rounds`` rounds, per model)."""
    import importlib

    import jax.numpy as jnp
    import numpy as np

    from benchmarks import bench
    from hocp_jax.training import TrainState, jobs, make_train_step, objectives
    from hocp_jax.training.trained import build_model

    out: dict = {"rounds": rounds, "backend": jax.default_backend()}
    for label, module, arg, model_name in MICROBATCH_CONFIGS:
        config = importlib.import_module(f"configs.{module}").get_config(*([arg] if arg else []))
        if model_name is not None:  # a dense model: no lambdas for the lasso
            config.loss.l1_gamma = 0.0
        model = build_model(model_name or config.model.name, config.model.kwargs)
        shape = {"affectnet": (64, 64, 3), "jester": (18, 84, 84, 3)}[module]  # the builders' default examples
        b = config.data.batch_size
        rng = np.random.default_rng(0)
        batch = {"video" if module == "jester" else "image": rng.integers(0, 256, (b, *shape), np.uint8)}
        outputs = jobs._output_shapes(model, {k: v[:1] for k, v in batch.items()})
        if "va" in outputs:
            batch["va"] = rng.uniform(-1, 1, (b, 2)).astype(np.float32)
        if "logits" in outputs:
            batch["label"] = rng.integers(0, outputs["logits"].shape[-1], b).astype(np.int32)
        loss_cfg = jobs.stage_loss(config, "static")
        tx, reg = jobs.stage_optimizer(loss_cfg, dict(config.optimizer) | {"steps_per_epoch": 100}, loss_cfg.l1_gamma)
        variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape)), train=False))(jax.random.key(0))
        state = TrainState.create(dict(variables), tx, jax.random.key(1))
        loss = objectives.make_loss(loss_cfg, lambda: [1] * 8)  # (the affect kind reads no class counts)
        calls, temp = {}, {}
        for k in (1, 2, 4, 8):
            step = make_train_step(model, loss, tx, reg, microbatches=k)
            name = f"{label} k={k}"
            compiled = bench.compile_program(step, state, batch)[0]
            temp[name] = {"as on this backend": bench.memory_mib(compiled)["temp"],
                          "loops off": bench.memory_mib(bench.compile_without_loops(step, state, batch))["temp"]}
            calls[name] = functools.partial(lambda c: jax.block_until_ready(c(state, batch)), compiled)
            print(json.dumps({name: temp[name]}), flush=True)
        ms = {k: round(v["median_ms"], 1) for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
        out[label] = {"model": model_name or config.model.name, "batch": b, "input": list(shape), "temp MiB": temp,
                      "ms": ms, "ms / k=1": {k: round(v / ms[f"{label} k=1"], 3) for k, v in ms.items()}}
        print(json.dumps({label: out[label]}), flush=True)
    out["loadavg"] = os.getloadavg()
    return out


def export_sizes(rounds: int = 11) -> dict:
    """Inference of the full-size HO-CP ResNet-18 (``head`` of ``configs/affectnet.py`` without its
    TRL, which needs static sizes) on 8 x 64 x 64 x 3 images, exported with ``jax.export`` three
    ways: at the static shape, with a symbolic batch and with a symbolic batch, height and width
    (stop 73), each called through ``jax.jit`` at that shape. Timed interleaved (medians, ms,
    and ratios to the static export), with each export's largest difference from ``model.apply``."""
    import jax.numpy as jnp
    import numpy as np
    from jax import export

    model = get_model("resnet18_hocp", head=dict(n_outputs=2, n_classes=8, bounded=True))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(8, 64, 64, 3)), jnp.float32)
    v = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    ref = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
    b, h, w = export.symbolic_shape("b, h, w")
    specs = {"static": x, "symbolic batch": jax.ShapeDtypeStruct((b, 64, 64, 3), x.dtype),
             "symbolic sizes": jax.ShapeDtypeStruct((b, h, w, 3), x.dtype)}
    out: dict = {"max abs difference from model.apply": {}}
    calls = {}
    for name, spec in specs.items():  # a new function per export: jax.jit would reuse one trace
        exported = export.export(jax.jit(lambda v, x: model.apply(v, x, train=False)))(v, spec)
        call = jax.jit(exported.call)
        out["max abs difference from model.apply"][name] = max(
            float(jnp.max(jnp.abs(a - r))) for a, r in zip(jax.tree.leaves(call(v, x)), jax.tree.leaves(ref)))
        calls[name] = lambda c=call: jax.block_until_ready(c(v, x))
    times = time_interleaved(calls, rounds, budget_s=60.0)
    out["median_ms"] = {k: round(t["median_ms"], 2) for k, t in times.items()}
    out["ratio to static"] = {k: round(t["median_ms"] / times["static"]["median_ms"], 3) for k, t in times.items()}
    out["rounds"] = len(times["static"]["times_ms"])
    return out
