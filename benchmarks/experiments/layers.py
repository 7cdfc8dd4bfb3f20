"""Experiments on single layers: the Jester 3x3x3 stack and the ResNet-18 2-D conv shapes, one call
per layer and path, timed interleaved (see the package docstring for each command)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import resource
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import placement
from benchmarks.bench import compile_jax, time_interleaved
from benchmarks.experiments.common import conv2_calls, stack_sums, timed_ms
from benchmarks.experiments.variants import (chunked, conv_at, cp_channels_first, cp_conv_folded, cp_conv_merged,
                                             cp_conv_rebuild_in_first)
from benchmarks.patches import dense_patches
from hocp_jax import autotune, conv, conv_ops, conv_plans, counting


def shift_kernel(rounds: int = 5, revision: str = "35aced0") -> dict:
    from benchmarks import bench

    kernels = {"current": conv_ops._depthwise, revision: conv_at(revision)._depthwise}

    def compiled(kernel, build):
        conv_ops._depthwise = kernels[kernel]  # read by depthwise_conv_1d at trace time
        try:
            return build()
        finally:
            conv_ops._depthwise = kernels["current"]

    out: dict = {"revision": revision, "rounds": rounds}
    layers = {}
    for case in bench.jester_cases(False):
        _, params, compile_call = bench.case_compiler(case)
        fn = bench.conv_fns(case)["factorized"]
        for k in kernels:
            layers[f"{case.name} {k}"] = compiled(k, lambda: compile_call(fn, params)[0])
    t = bench.time_interleaved(layers, rounds, budget_s=1e9)
    out["jester_layers_ms"] = {n: v["median_ms"] for n, v in t.items()}
    out["jester_stack_ms"] = stack_sums(out["jester_layers_ms"], kernels)
    cases = {c.name: c for c in bench.model_cases(False)}
    for dense, hocp, n in (("resnet18 dense 2-D", "resnet18_hocp static", 5 * rounds), ("jester dense", "jester_hocp", rounds),
                           ("resnet18_3d dense", "resnet18_hocp transduced", 3 * rounds)):
        calls = {dense: bench.prepare_model_case(cases[dense])[0]}
        for k in kernels:
            calls[f"{hocp} {k}"] = compiled(k, lambda: bench.prepare_model_case(cases[hocp])[0])
        t = bench.time_interleaved(calls, n, budget_s=1e9)
        ms = {name: v["median_ms"] for name, v in t.items()}
        out[f"{hocp} step"] = {"rounds": n, "ms": ms, "ratio_to_dense": {name: v / ms[dense] for name, v in ms.items()}}
    out["loadavg"] = os.getloadavg()
    return out


def line_buffer(rounds: int = 5, revision: str = "54703b2") -> dict:
    """The tiled Jester layers (conv1, conv2: factorized, fwd+bwd, ``bench`` protocol) with the
    current tiles and with the line-buffer tiles of ``revision`` (each input row's 1x1 contraction
    computed once, the halo rows and their gradient carried from tile to tile), in the automatic
    tiles and in tiles of 3 and 6 rows (:func:`hocp_jax.conv_plans.tile_rows_mode`), interleaved."""
    from benchmarks import bench

    versions = {"current": conv, revision: conv_at(revision)}
    out: dict = {"revision": revision, "rounds": rounds, "layers_ms": {}}
    for case in bench.jester_cases(False)[:2]:
        _, params, compile_call = bench.case_compiler(case)
        calls = {}
        for label, mod in versions.items():
            def fn(x, p, mod=mod):
                return mod.cp_conv(x, p, modes=case.modes, stride=case.stride, padding=case.padding,
                                   implementation="factorized", input_grad=case.input_grad)
            for rows in (None, 3, 6):
                with conv_plans.tile_rows_mode(rows):
                    calls[f"{label}, rows {rows or 'auto'}"] = compile_call(fn, params)[0]
        t = bench.time_interleaved(calls, rounds, budget_s=1e9)
        out["layers_ms"][case.name] = {name: v["median_ms"] for name, v in t.items()}
    out["loadavg"] = os.getloadavg()
    return out


def _check_variants(layer: str, calls: dict, bases: dict[str, str]) -> None:
    """Raises unless each variant's value and gradients (``calls[variant]()``, compiled fwd+bwd
    calls that return their results) match those of its library path ``bases[variant]`` (float32
    noise)."""
    for variant, base in bases.items():
        for got, want in zip(jax.tree.leaves(calls[variant]()), jax.tree.leaves(calls[base]())):
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3 * float(jnp.max(jnp.abs(want))),
                                       err_msg=f"{layer}: {variant}")


def resnet2d_conv_cases(batch: int = 8, image: int = 112) -> list:
    """``[(case, count)]``: the seven 3x3 conv shapes of the ResNet-18 2-D train step on ``batch``
    images of ``image`` x ``image`` (maps of image/4 down to image/32, rounded up; the strided ones
    too; rank at the dense parameter budget) as ``bench`` conv cases, each with how many convs of
    that shape the network has."""
    from benchmarks import bench
    from hocp_jax import counting

    s = image // 4
    shapes = [(64, 64, s, 1, 4), (64, 128, s, 2, 1), (128, 128, s // 2, 1, 3), (128, 256, s // 2, 2, 1),
              (256, 256, s // 4, 1, 3), (256, 512, s // 4, 2, 1), (512, 512, -(-s // 8), 1, 3)]
    return [(bench.ConvCase("resnet2d", f"({ci}->{co})@{m}x{m}" + (f"/s{st}" if st > 1 else ""), batch, (m, m), ci, co,
                            (3, 3), counting.cp_rank_for_budget(ci, co, (3, 3)), (st, st)), count)
            for ci, co, m, st, count in shapes]


def resnet2d_layer_sums(batch: int, image: int, rounds: int) -> dict:
    """The convs of :func:`resnet2d_conv_cases` with the dense conv and both CP paths (fwd+bwd,
    ``bench`` protocol), interleaved per layer: ms per layer and path, ``auto``'s pick, and each
    path (and ``auto``'s picks) summed over the network's convs."""
    from benchmarks import bench

    rows = []
    for case, count in resnet2d_conv_cases(batch, image):
        kernel, params, compile_call = bench.case_compiler(case)
        strides, pads = case.geometry()
        fns = {k: f for k, f in bench.conv_fns(case).items() if k != "auto"}
        t = time_interleaved({k: compile_call(f, kernel if k == "dense" else params)[0] for k, f in fns.items()},
                             rounds, budget_s=1e9)
        pick = conv.choose_cp_implementation((batch, *case.in_sizes, case.c_in), params, case.modes, stride=strides, padding=pads)
        rows.append({"layer": case.name, "shape": bench.case_shape(case), "input_grad": case.input_grad,
                     "convs_in_net": count, "ms": {k: v["median_ms"] for k, v in t.items()}, "auto_pick": pick})
    return {"layers": rows, "net_ms": _net_ms(rows)}


def analytic_pick(case) -> str:
    """The analytic cost model's path for the ``bench`` conv case ``case``, asked as ``cp_conv``'s
    ``auto`` asks it (:func:`hocp_jax.conv.choose_cp_implementation`)."""
    strides, pads = case.geometry()
    shapes = {"factor_in": (case.c_in, case.rank), "factor_out": (case.c_out, case.rank), "lambda": (case.rank,)}
    shapes |= {conv.mode_key(m): (k, case.rank) for m, k in zip(case.modes, case.kernel)}
    params = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
    return conv.choose_cp_implementation((case.batch, *case.in_sizes, case.c_in), params, case.modes,
                                         stride=strides, padding=pads)


CHUNK_PICK_GRID = ((2, 4, 8, 16, 32, 64), (112, 160, 224))
"""Batches and image sizes of the ResNet-18 2-D conv shapes :func:`chunk_picks` screens."""


def chunk_picks(rounds: int = 9) -> dict:
    """The ResNet-18 2-D 3x3 conv shapes (:func:`resnet2d_conv_cases` on the batches and images of
    :data:`CHUNK_PICK_GRID`) on which the cost model picks differently with and without
    :data:`hocp_jax.counting.CHUNKED_BYTES_SCALE` (the factorized path in chunks of samples
    counted as cheaper per byte), each timed with the dense conv and both CP paths (fwd+bwd,
    ``bench`` protocol), interleaved: whether the changed picks are the faster paths."""
    from unittest import mock

    from benchmarks import bench
    from hocp_jax import counting

    cases = [case for batch in CHUNK_PICK_GRID[0] for image in CHUNK_PICK_GRID[1]
             for case, _ in resnet2d_conv_cases(batch, image)]
    with mock.patch.object(counting, "CHUNKED_BYTES_SCALE", 1.0):
        unscaled = [analytic_pick(case) for case in cases]
    out: dict = {"rounds": rounds, "screened": len(cases), "layers": []}
    for case, before in zip(cases, unscaled):
        if analytic_pick(case) == before:
            continue
        kernel, params, compile_call = bench.case_compiler(case)
        fns = {k: f for k, f in bench.conv_fns(case).items() if k != "auto"}
        t = time_interleaved({k: compile_call(f, kernel if k == "dense" else params)[0] for k, f in fns.items()},
                             rounds, budget_s=1e9)
        ms = {k: v["median_ms"] for k, v in t.items()}
        out["layers"].append({"layer": f"{case.name} (B={case.batch})", "shape": bench.case_shape(case),
                              "input_grad": case.input_grad, "ms": ms, "auto_pick": analytic_pick(case),
                              "pick_unscaled": before})
    out["loadavg"] = os.getloadavg()
    return out


def _reconstructed(case, by_taps: bool):
    """``f(x, p)``: the reconstructed CP path of ``case`` with its kernel gradient as matrix
    products per tap (``by_taps``) or XLA's, whatever the host's rule says."""
    strides, pads = case.geometry()

    def f(x, p):
        kernel = conv.cp_to_kernel(p, case.modes)
        if by_taps:
            return conv_ops.conv_matmul_kernel_grad(x, kernel, strides=strides, pads=pads, dilations=(1,) * len(strides))
        return conv_ops.dense_conv(x, kernel, stride=strides, padding=pads)
    return f


KERNEL_GRAD_BATCHES = {224: (16, 32, 48, 64, 96), 112: (64, 128)}
"""``{image size: batches}`` of :func:`kernel_grad_batches`."""


def kernel_grad_batches(rounds: int = 7) -> dict:
    """The data behind :data:`hocp_jax.conv_plans.KERNEL_GRAD_MATMUL_MIN_BYTES`: ResNet-18's seven
    3x3 conv shapes (:func:`resnet2d_conv_cases`) at the image sizes and batches of
    :data:`KERNEL_GRAD_BATCHES`, the reconstructed CP path with both kernel gradients (fwd+bwd,
    ``bench`` protocol; interleaved per shape), with the size of the conv's input, grouped by it:
    whether the products win from some input size on, and what the host's rule
    (:func:`hocp_jax.conv_plans.matmul_kernel_grad`) loses against the faster of the two."""
    from benchmarks import bench

    out: dict = {"rounds": rounds, "cpu_vector_flags": bench.machine_info()["cpu_vector_flags"], "layers": []}
    for image, batches in KERNEL_GRAD_BATCHES.items():
        for batch in batches:
            for case, _ in resnet2d_conv_cases(batch, image):
                _, params, compile_call = bench.case_compiler(case)
                calls = {"products": compile_call(_reconstructed(case, True), params)[0],
                         "xla": compile_call(_reconstructed(case, False), params)[0]}
                ms = {p: v["median_ms"] for p, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
                x_shape = (batch, *case.in_sizes, case.c_in)
                rule = "products" if conv_plans.matmul_kernel_grad(x_shape, jnp.float32) else "xla"
                out["layers"].append({"layer": f"{image}px B={batch} {case.name}", "x_mib": round(np.prod(x_shape) * 4 / 2**20, 1),
                                      "ms": {k: round(v, 1) for k, v in ms.items()},
                                      "products / xla": round(ms["products"] / ms["xla"], 3),
                                      "rule": rule, "rule / best": round(ms[rule] / min(ms.values()), 3)})
                print(json.dumps(out["layers"][-1]), flush=True)
    bands = {"under 16 MiB": (0, 16), "16 to 32 MiB": (16, 32), "32 MiB and more": (32, float("inf"))}
    out["products / xla by input size"] = {
        band: [min(r), max(r), statistics.median(r), len(r)] if (r := [row["products / xla"] for row in out["layers"]
                                                                       if lo <= row["x_mib"] < hi]) else None
        for band, (lo, hi) in bands.items()}
    out["rule / best, worst"] = max(row["rule / best"] for row in out["layers"])
    out["loadavg"] = os.getloadavg()
    return out


def kernel_grad(rounds: int = 7) -> dict:
    """Every conv layer of ``bench`` (Jester, ResNet-18 2-D and transduced 3-D; fwd+bwd, ``bench``
    protocol) with the reconstructed CP path's conv taking its kernel gradient as one matrix product
    per tap (:func:`hocp_jax.conv_ops.conv_matmul_kernel_grad`) and as XLA's kernel-gradient
    convolution (``lax``'s conv of the rebuilt kernel differentiated by JAX), both whatever
    :func:`hocp_jax.conv_plans.matmul_kernel_grad` says on this host (this is its data), interleaved,
    with the dense conv (``lax``, XLA's kernel gradient) as the reference."""
    from benchmarks import bench

    out: dict = {"rounds": rounds, "cpu_vector_flags": bench.machine_info()["cpu_vector_flags"], "layers": []}
    for case in bench.jester_cases(False) + bench.resnet_cases(False):
        kernel, params, compile_call = bench.case_compiler(case)
        calls = {"dense": compile_call(bench.conv_fns(case)["dense"], kernel)[0],
                 "reconstructed, per-tap kernel gradient": compile_call(_reconstructed(case, True), params)[0],
                 "reconstructed, XLA kernel gradient": compile_call(_reconstructed(case, False), params)[0]}
        ms = {p: round(v["median_ms"], 1) for p, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
        out["layers"].append({"layer": f"{case.group} {case.name} (B={case.batch})", "ms": ms, "per-tap / XLA": round(
            ms["reconstructed, per-tap kernel gradient"] / ms["reconstructed, XLA kernel gradient"], 3)})
        print(json.dumps(out["layers"][-1]), flush=True)
    out["loadavg"] = os.getloadavg()
    return out


def tucker_tt_kernel_grad(rounds: int = 7, batches: tuple[int, ...] = (8, 32)) -> dict:
    """The seven 3x3 conv shapes of ResNet-18 2-D (224 x 224 images, maps 56 down to 7; batch 8
    and 32; fwd+bwd, ``bench`` protocol) with the Tucker conv (ranks at ``rank_ratio`` 0.5, the
    ``TuckerConv`` default) and the TT conv (rank 8, the ``TTConv`` default), both paths each, with
    their convs' kernel gradient as one matrix product per tap (:func:`hocp_jax.conv_ops.conv_matmul_kernel_grad`)
    and as XLA's kernel-gradient convolution (``lax``'s conv differentiated by JAX), both whatever
    :func:`hocp_jax.conv_plans.matmul_kernel_grad` says on this host, interleaved per layer, with the
    dense conv as the reference."""
    from unittest import mock

    from benchmarks import bench
    from hocp_jax import layer_specs

    def init(specs, seed):
        keys = jax.random.split(jax.random.key(seed), len(specs))
        return {k: initializer(key, shape, jnp.float32) for key, (k, (shape, initializer)) in zip(keys, specs.items())}

    fns = {"tucker": conv.tucker_conv, "tt": conv.tt_conv}
    out: dict = {"rounds": rounds, "batches": list(batches), "cpu_vector_flags": bench.machine_info()["cpu_vector_flags"],
                 "layers": []}
    for batch in batches:
        for case, _ in resnet2d_conv_cases(batch, 224):
            kernel, _, compile_call = bench.case_compiler(case)
            ranks = layer_specs.tucker_layer_ranks(case.c_in, case.c_out)
            weights = {"tucker": init(layer_specs.tucker_specs(case.c_in, case.c_out, (3, 3), ranks), 0),
                       "tt": init(layer_specs.tt_conv_specs(case.c_in, case.c_out, (3, 3), 8), 1)}
            calls = {"dense": compile_call(bench.conv_fns(case)["dense"], kernel)[0]}
            for form, impl in itertools.product(fns, ("factorized", "reconstructed")):
                def fn(x, p, f=fns[form], impl=impl):
                    return f(x, p, stride=case.stride, padding=case.padding, implementation=impl)
                with mock.patch.object(conv_plans, "matmul_kernel_grad", lambda *_: True):
                    calls[f"{form} {impl}"] = compile_call(fn, weights[form])[0]
                with mock.patch.object(conv_plans, "matmul_kernel_grad", lambda *_: False):
                    calls[f"{form} {impl}, XLA kernel gradient"] = compile_call(fn, weights[form])[0]
            ms = {p: round(v["median_ms"], 1) for p, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
            out["layers"].append({
                "layer": f"{case.name} (B={batch})", "tucker ranks": list(ranks), "ms": ms,
                "per-tap / XLA": {k: round(ms[k] / ms[f"{k}, XLA kernel gradient"], 3) for k in ms
                                  if f"{k}, XLA kernel gradient" in ms}})
            print(json.dumps(out["layers"][-1]), flush=True)
    out["loadavg"] = os.getloadavg()
    return out


CHUNK_SCALES = (0.5, 0.35, 0.25, 0.2, 0.15, 0.1, 0.05)
"""Values of :data:`hocp_jax.counting.CHUNKED_BYTES_SCALE` :func:`chunk_scale` scores."""


def chunk_scale(rounds: int = 9) -> dict:
    """A fit of :data:`hocp_jax.counting.CHUNKED_BYTES_SCALE` on the machine at hand. Timed with both
    CP paths (fwd+bwd, ``bench`` protocol, interleaved): the unstrided ResNet-18 2-D 3x3 conv shapes
    of :data:`CHUNK_PICK_GRID` that the factorized path runs in chunks of samples and whose pick
    changes between the values of :data:`CHUNK_SCALES` (group ``"unstrided"``), and, as a check of
    the unscaled strided convs at the batches where the dense conv slows down, every strided shape
    of the grid with a batch of 16 or more (group ``"strided"``). Per value of the scale, how many
    shapes of each group the cost model picks right and its worst pick / faster path."""
    from unittest import mock

    from benchmarks import bench
    from hocp_jax import counting

    def pick(case, scale):
        with mock.patch.object(counting, "CHUNKED_BYTES_SCALE", scale):
            return analytic_pick(case)

    def group(case, picks):
        strides, pads = case.geometry()
        y_shape = (case.batch, *counting.output_sizes(case.in_sizes, case.kernel, strides, pads), case.c_out)
        if max(strides) > 1:
            return "strided" if case.batch >= 16 else None
        chunk = conv_plans.batch_plan((case.batch, *case.in_sizes, case.c_in), y_shape, case.rank, jnp.float32, None)
        return "unstrided" if chunk is not None and len(set(picks.values())) > 1 else None

    out: dict = {"rounds": rounds, "scales": list(CHUNK_SCALES), "layers": []}
    for batch in CHUNK_PICK_GRID[0]:
        for image in CHUNK_PICK_GRID[1]:
            for case, _ in resnet2d_conv_cases(batch, image):
                picks = {str(s): pick(case, s) for s in CHUNK_SCALES}
                if (kind := group(case, picks)) is None:
                    continue
                _, params, compile_call = bench.case_compiler(case)
                fns = bench.conv_fns(case)
                t = time_interleaved({p: compile_call(fns[p], params)[0] for p in ("factorized", "reconstructed")},
                                     rounds, budget_s=1e9)
                ms = {p: round(v["median_ms"], 1) for p, v in t.items()}
                out["layers"].append({"layer": f"{case.name} (B={case.batch})", "group": kind,
                                      "shape": bench.case_shape(case), "input_grad": case.input_grad, "ms": ms,
                                      "picks": picks,
                                      "factorized/reconstructed": round(ms["factorized"] / ms["reconstructed"], 3)})
    for s in map(str, CHUNK_SCALES):
        for kind in ("unstrided", "strided"):
            scores = [row["ms"][row["picks"][s]] / min(row["ms"].values()) for row in out["layers"] if row["group"] == kind]
            out[f"scale {s}, {kind}"] = {"right": sum(v == 1.0 for v in scores), "of": len(scores),
                                         "worst": round(max(scores, default=1.0), 3)}
    out["loadavg"] = os.getloadavg()
    return out


CHUNK_RULE_SCALES = ((8, 224), (16, 224), (32, 112), (64, 112))
"""(batch, image) of the ResNet-18 2-D conv shapes :func:`chunk_rule` times."""


def chunk_rule(rounds: int = 11) -> dict:
    """ResNet-18's 2-D 3x3 conv shapes (:func:`resnet2d_conv_cases` at :data:`CHUNK_RULE_SCALES`)
    that :func:`hocp_jax.conv_plans.batch_chunk_default` would run in chunks by its byte thresholds
    alone: the factorized path (fwd+bwd, ``bench`` protocol) in those chunks, on the whole batch
    (``per_sample=False``) and the dense conv, interleaved; with each shape's input plus output
    channels per output position of a chunk and whether the rule, with
    :data:`hocp_jax.conv_plans.CHUNK_MAX_GRAD_RATIO`, chunks it."""
    import functools
    from unittest import mock

    from benchmarks import bench
    from hocp_jax import counting

    out: dict = {"rounds": rounds, "layers": []}
    for batch, image in CHUNK_RULE_SCALES:
        for case, _ in resnet2d_conv_cases(batch, image):
            strides, pads = case.geometry()
            x_shape = (batch, *case.in_sizes, case.c_in)
            y_shape = (batch, *counting.output_sizes(case.in_sizes, case.kernel, strides, pads), case.c_out)
            factorized = functools.partial(conv.cp_conv, modes=case.modes, stride=strides, padding=pads,
                                           implementation="factorized")
            with mock.patch.object(conv_plans, "CHUNK_MAX_GRAD_RATIO", float("inf")):  # the byte thresholds alone
                chunk = conv_plans.batch_chunk_default(x_shape, y_shape, case.rank, jnp.float32)
                if chunk is None:
                    continue
                kernel, params, compile_call = bench.case_compiler(case)
                calls = {"chunks": compile_call(functools.partial(factorized, per_sample=None), params)[0]}
            calls["whole batch"] = compile_call(functools.partial(factorized, per_sample=False), params)[0]
            calls["dense"] = compile_call(bench.conv_fns(case)["dense"], kernel)[0]
            ms = {k: v["median_ms"] for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
            out["layers"].append({
                "layer": f"{case.name} (B={batch})", "shape": bench.case_shape(case), "chunk": chunk,
                "channels_per_chunk_position": (case.c_in + case.c_out) / (chunk * int(np.prod(y_shape[1:-1]))),
                "ms": ms, "chunks_over_whole": ms["chunks"] / ms["whole batch"],
                "chunked_by_rule": conv_plans.batch_chunk_default(x_shape, y_shape, case.rank, jnp.float32) is not None})
    out["loadavg"] = os.getloadavg()
    return out


def _net_ms(rows: list[dict]) -> dict:
    """Each path of ``rows`` (layers with ``ms``, ``convs_in_net`` and ``auto_pick``), and ``auto``'s
    picks, summed over the network's convs."""
    net = {k: sum(r["ms"][k] * r["convs_in_net"] for r in rows) for k in rows[0]["ms"]}
    net["auto's picks"] = sum(r["ms"][r["auto_pick"]] * r["convs_in_net"] for r in rows)
    return net


def resnet2d_step_layers(rounds: int = 9) -> dict:
    """The 3x3 convs of the ResNet-18 2-D train step of ``bench`` (8 images of 112x112: 28x28 to
    4x4 maps, the strided ones too, rank at the dense parameter budget) with the dense conv and
    both CP paths (fwd+bwd, ``bench`` protocol), interleaved per layer: which path ``auto`` (the
    analytic cost model) picks, the measured factorized/reconstructed ratio beside the model's,
    and how many convs of each shape the network has. Also two variants, each checked against
    its library path first: the factorized path with one merged 9-tap depthwise pass
    (:func:`~benchmarks.experiments.variants.cp_conv_merged`) and the reconstructed path with the
    C_in-first rebuild (:func:`~benchmarks.experiments.variants.cp_conv_rebuild_in_first`);
    ``net_ms`` sums each path over the network's convs."""
    from benchmarks import bench
    from hocp_jax import counting

    out: dict = {"rounds": rounds, "layers": []}
    for case, count in resnet2d_conv_cases():
        ci, co, (s, _), (st, _), rank = case.c_in, case.c_out, case.in_sizes, case.stride, case.rank
        kernel, params, compile_call = bench.case_compiler(case)
        strides, pads = case.geometry()
        variants = {  # name: (the library path it replaces, fn)
            "factorized, merged taps": ("factorized", lambda x, p: cp_conv_merged(x, p, strides, pads)),
            "reconstructed, C_in-first rebuild": ("reconstructed",
                                                  lambda x, p: cp_conv_rebuild_in_first(x, p, strides, pads))}
        fns = {k: f for k, f in bench.conv_fns(case).items() if k != "auto"} | {k: f for k, (_, f) in variants.items()}
        calls = {k: compile_call(f, kernel if k == "dense" else params)[0] for k, f in fns.items()}
        _check_variants(case.name, calls, {k: base for k, (base, _) in variants.items()})
        t = bench.time_interleaved(calls, rounds, budget_s=1e9)
        ms = {k: v["median_ms"] for k, v in t.items()}
        costs = counting.cp_path_costs(8, (s, s), ci, co, (3, 3), rank, stride=st, padding=1)
        pick = conv.choose_cp_implementation((8, s, s, ci), params, ("h", "w"), stride=st, padding=1)
        best = min(("factorized", "reconstructed"), key=ms.get)
        out["layers"].append({
            "layer": case.name, "shape": bench.case_shape(case), "input_grad": case.input_grad, "convs_in_net": count,
            "ms": ms, "auto_pick": pick,
            "auto_over_best": ms[pick] / ms[best],
            "fact_over_recon_measured": ms["factorized"] / ms["reconstructed"],
            "fact_over_recon_model": costs["factorized"] / costs["reconstructed"],
        })
    out["net_ms"] = _net_ms(out["layers"])
    out["loadavg"] = os.getloadavg()
    return out


def remat(rounds: int = 3) -> dict:
    from benchmarks import bench

    calls = {}
    for case in bench.jester_cases(False):
        _, params, compile_call = bench.case_compiler(case)
        fn = bench.conv_fns(case)["factorized"]
        for label, f in (("plain", fn), ("remat", jax.checkpoint(fn))):
            calls[f"{case.name} {label}"] = compile_call(f, params)[0]
    t = bench.time_interleaved(calls, rounds, budget_s=1e9)
    ms = {n: v["median_ms"] for n, v in t.items()}
    stack = stack_sums(ms, ("plain", "remat"))
    return {"layers_ms": ms, "stack_ms": stack, "remat/plain": stack["remat"] / stack["plain"], "loadavg": os.getloadavg()}


def coresidence(rounds: int = 10) -> dict:
    from benchmarks import peers

    case, calls = conv2_calls(("auto",))
    jax_call = calls["auto"]

    labels = ("JAX after JAX", "JAX after torch in its own process", "JAX after torch in this process")
    times: dict = {k: [] for k in labels} | {"torch in its own process": [], "torch in this process": []}
    order = np.random.default_rng(0)
    with peers.PeerProcess() as proc:
        calls = {"torch in its own process": proc.conv_peers(case)["torch dense"]}
        peers.set_threads()
        calls["torch in this process"] = peers.conv_peers(case)["torch dense"]
        calls["JAX"] = jax_call
        for call in calls.values():
            call()  # warm-up
        for _ in range(rounds):  # the three pairs in a new random order each round
            for i in order.permutation(3):
                first = ("JAX", "torch in its own process", "torch in this process")[i]
                t_first = timed_ms(calls[first])
                if first != "JAX":
                    times[first].append(t_first)
                times[labels[i]].append(timed_ms(jax_call))
    return {"layer": case.name, "rounds": rounds, "times_ms": times,
            "medians_ms": {k: statistics.median(v) for k, v in times.items()}, "loadavg": os.getloadavg()}


def phases(rounds: int = 16) -> dict:
    from benchmarks import peers

    def counters() -> dict:  # steal time of all CPUs (clock ticks, /proc/stat) and this process's rusage
        with open("/proc/stat") as f:
            steal = int(f.readline().split()[8])
        r = resource.getrusage(resource.RUSAGE_SELF)
        return {"steal_ticks": steal, "user_ms": 1e3 * r.ru_utime, "sys_ms": 1e3 * r.ru_stime,
                "minor_faults": r.ru_minflt, "voluntary_switches": r.ru_nvcsw, "involuntary_switches": r.ru_nivcsw}

    case, calls = conv2_calls(("auto", "dense"))
    with contextlib.ExitStack() as stack:
        probe = stack.enter_context(placement.CrossCoreProbe())
        skipped = peers.available()
        if not skipped:  # PyTorch's dense conv in its own process, as in bench (its rusage is not this process's)
            calls["torch dense"] = stack.enter_context(peers.PeerProcess()).conv_peers(case)["torch dense"]
        out: dict = {p: {"ms": [], "roundtrip_ns": []} for p in calls}
        for call in calls.values():
            call()
        for _ in range(rounds):
            for p, call in calls.items():
                out[p]["roundtrip_ns"].append(round(probe.roundtrip_ns() or 0.0, 1))
                c0 = counters()
                out[p]["ms"].append(timed_ms(call))
                for k, v in counters().items():
                    out[p].setdefault(k, []).append(round(v - c0[k], 1))
    return {"layer": case.name, "rounds": rounds, "probe_cpus": list(probe.cpus), "peers_skipped": skipped,
            "calls": out, "by_placement": by_placement(out), "loadavg": os.getloadavg()}


def by_placement(calls: dict) -> dict:
    """Each program's median time over the calls made with the two CPUs close and far apart
    (:func:`benchmarks.placement.split_cut` of all the calls' round trips), and how many."""
    cut = placement.split_cut(v for c in calls.values() for v in c["roundtrip_ns"])
    if cut is None:
        return {}
    return {"split_above_ns": round(cut, 1)} | {p: placement.medians_by_placement(c["ms"], c["roundtrip_ns"], cut)
                                                 for p, c in calls.items()}


def tiles(rounds: int = 5) -> dict:
    from benchmarks import bench

    settings = {"whole samples": 0, "auto": None, "rows 2": 2, "rows 3": 3, "rows 6": 6, "rows 14": 14}
    calls = {}
    transduced = [dataclasses.replace(c, batch=1) for c in bench.resnet_cases(False) if c.group == "resnet3d"]
    for case in bench.jester_cases(False) + transduced:
        _, params, compile_call = bench.case_compiler(case)
        fn = bench.conv_fns(case)["factorized"]
        for label, rows in settings.items():
            with conv_plans.tile_rows_mode(rows):  # read when the call is traced, i.e. compiled here
                name = f"{case.name} {label}" if case.group == "jester" else f"transduced B=1 {case.name} {label}"
                calls[name] = compile_call(fn, params)[0]
    models = {c.name: c for c in bench.model_cases(False)}
    steps = {"jester dense": ("jester dense", None), "jester_hocp whole samples": ("jester_hocp", 0),
             "jester_hocp auto": ("jester_hocp", None)}
    for label, (model, rows) in steps.items():
        with conv_plans.tile_rows_mode(rows):
            calls[f"step {label}"] = bench.prepare_model_case(models[model])[0]
    t = bench.time_interleaved(calls, rounds, budget_s=1e9)
    ms = {n: v["median_ms"] for n, v in t.items()}
    stack = stack_sums({n: v for n, v in ms.items() if n.startswith("conv")}, tuple(settings))
    step_ms = {k: ms.pop(f"step {k}") for k in steps}
    return {"layers_ms": ms, "stack_ms": stack, "stack_ratio_to_whole_samples": {k: v / stack["whole samples"] for k, v in stack.items()},
            "train_step_ms": step_ms, "train_step_ratio_to_dense": {k: v / step_ms["jester dense"] for k, v in step_ms.items()},
            "loadavg": os.getloadavg()}


def cpu_loops(rounds: int = 3) -> dict:
    from benchmarks import bench

    out: dict = {"rounds": rounds, "machine": bench.machine_info(), "layers": []}
    for case in bench.jester_cases(False)[:3]:
        _, params, compile_call = bench.case_compiler(case)
        strides, pads = case.geometry()
        outs = counting.output_sizes(case.in_sizes, case.kernel, strides, pads)
        plan = conv_plans.tile_plan((case.batch, *case.in_sizes, case.c_in), case.rank, jnp.float32, outs,
                                  [k - 1 for k in case.kernel], strides, pads)
        settings = {"whole batch": (False, 0), "per sample, whole": (True, 0), "automatic": (None, None)}
        if plan:
            settings |= {f"tiles of {m * plan[1]} rows": (None, m * plan[1]) for m in (2, 4) if m * plan[1] < outs[plan[0]]}
        calls = {}
        for label, (per_sample, rows) in settings.items():
            cp = functools.partial(conv.cp_conv, modes=case.modes, stride=case.stride, padding=case.padding,
                                   implementation="factorized", input_grad=case.input_grad, per_sample=per_sample)
            with conv_plans.tile_rows_mode(rows):  # read at trace time, i.e. when compiled here
                calls[label] = compile_call(cp, params)[0]
        ms = {k: v["median_ms"] for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
        out["layers"].append({"layer": case.name, "automatic tiles": plan and {"mode": case.modes[plan[0]], "rows": plan[1]},
                              "ms": ms, "ratio to automatic": {k: round(v / ms["automatic"], 3) for k, v in ms.items()}})
    out["loadavg"] = os.getloadavg()
    return out


@contextlib.contextmanager
def _tile_target(nbytes: int):
    """Within the block, :func:`hocp_jax.conv_plans.tile_plan` aims at tiles of ``nbytes`` (read at trace time)."""
    saved = conv_plans.tile_target_bytes
    conv_plans.tile_target_bytes = lambda: nbytes
    try:
        yield
    finally:
        conv_plans.tile_target_bytes = saved


def tile_target(rounds: int = 9) -> dict:
    from benchmarks import bench

    targets_mib = (1.5, 2, 3, 4.5, 6)
    transduced = [dataclasses.replace(c, batch=1) for c in bench.resnet_cases(False) if c.group == "resnet3d"]
    calls, rows = {}, {}
    for case in bench.jester_cases(False)[:2] + transduced:
        strides, pads = case.geometry()
        outs = counting.output_sizes(case.in_sizes, case.kernel, strides, pads)
        _, params, compile_call = bench.case_compiler(case)
        fn = bench.conv_fns(case)["factorized"]
        name = case.name if case.group == "jester" else f"transduced B=1 {case.name}"
        for mib in targets_mib:
            with _tile_target(int(mib * 2**20)):
                plan = conv_plans.tile_plan((case.batch, *case.in_sizes, case.c_in), case.rank, jnp.float32, outs,
                                          [k - 1 for k in case.kernel], strides, pads)
                if plan is None:
                    break
                rows.setdefault(name, {})[f"{mib} MiB"] = plan[1]
                calls[f"{name} {mib} MiB"] = compile_call(fn, params)[0]
    models = {c.name: c for c in bench.model_cases(False)}
    for model in ("jester_hocp", "resnet18_hocp transduced"):
        for mib in (1.5, 3, 4.5):
            with _tile_target(int(mib * 2**20)):
                calls[f"step {model} {mib} MiB"] = bench.prepare_model_case(models[model])[0]
    t = bench.time_interleaved(calls, rounds, budget_s=1e9)
    ms = {n: v["median_ms"] for n, v in t.items()}
    ratios = {}
    for n, v in ms.items():
        base = n.rsplit(" ", 2)[0] + " 1.5 MiB"
        ratios[n] = round(v / ms[base], 3)
    return {"rounds": rounds, "machine": bench.machine_info(), "tile_rows": rows, "ms": ms,
            "ratio_to_1.5_MiB": ratios, "loadavg": os.getloadavg()}


DENSE_CHUNK_SHAPES = (  # (x shape, kernel shape, stride, input gradient)
    ((8, 56, 56, 64), (3, 3, 64, 64), 1, True), ((16, 56, 56, 64), (3, 3, 64, 128), 2, True),
    ((8, 28, 28, 128), (3, 3, 128, 128), 1, True), ((32, 28, 28, 128), (3, 3, 128, 128), 1, True),
    ((32, 14, 14, 256), (3, 3, 256, 256), 1, True), ((64, 16, 16, 64), (3, 3, 64, 64), 1, True),
    ((64, 8, 8, 128), (3, 3, 128, 128), 1, True), ((8, 28, 28, 64), (3, 3, 64, 64), 1, True),
    ((8, 112, 112, 3), (7, 7, 3, 64), 2, False), ((16, 112, 112, 3), (7, 7, 3, 64), 2, False),
    ((64, 32, 32, 3), (7, 7, 3, 64), 2, False), ((8, 224, 224, 3), (7, 7, 3, 64), 2, False),
    ((64, 64, 64, 3), (7, 7, 3, 64), 2, False), ((64, 16, 16, 64), (3, 3, 64, 128), 2, True),
    ((8, 9, 42, 42, 64), (3, 3, 3, 64, 128), 1, True),
)


def dense_chunks(rounds: int = 5) -> dict:
    from benchmarks import bench

    out: dict = {"rounds": rounds, "machine": bench.machine_info(), "convs": []}
    for x_shape, k_shape, stride, input_grad in DENSE_CHUNK_SHAPES:
        n = len(k_shape) - 2
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        k = jnp.asarray(rng.standard_normal(k_shape) / np.sqrt(np.prod(k_shape[:-1])), jnp.float32)
        strides, pads = (stride,) * n, ((k_shape[0] // 2,) * 2,) * n

        def fn(x, k):
            return conv_ops.conv_general_dilated(x, k, strides, pads, dimension_numbers=conv_ops.channels_last_dims(n))

        calls, rule = {}, conv_plans.dense_chunk(x_shape, k_shape[-1], strides, jnp.float32)
        cot = jnp.asarray(rng.standard_normal(jax.eval_shape(fn, x, k).shape), jnp.float32)
        for label, mode in (("whole batch", False), ("chunks", True)):
            # a new function each time: jax.jit keeps one trace per function, and the mode is read at trace time
            grad = jax.value_and_grad(lambda x, k, c: jnp.sum(fn(x, k) * c), argnums=(0, 1) if input_grad else 1)
            with conv_plans.dense_chunks_mode(mode):
                calls[label] = compile_jax(grad, x, k, cot)[0]
        ms = {name: v["median_ms"] for name, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
        with conv_plans.dense_chunks_mode(True):
            chunk = conv_plans.dense_chunk(x_shape, k_shape[-1], strides, jnp.float32)
        out["convs"].append({"x": x_shape, "kernel": k_shape, "stride": stride, "input_grad": input_grad,
                             "input_MiB": round(float(np.prod(x_shape)) * 4 / 2**20, 2), "chunk": chunk,
                             "automatic rule": rule, "ms": ms, "chunks / whole": round(ms["chunks"] / ms["whole batch"], 3)})
    out["loadavg"] = os.getloadavg()
    return out


def layout(rounds: int = 3) -> dict:
    from benchmarks import bench

    def cp(case, **kw):
        return lambda x, p: conv.cp_conv(x, p, modes=case.modes, stride=case.stride, padding=case.padding,
                                         implementation="factorized", **kw)

    labels = ("dense", "whole batch", "channels-first", "chunks of 2", "per sample, lax.map differentiated",
              "per sample")
    calls = {}
    for case in bench.jester_cases(False):
        kernel, params, compile_call = bench.case_compiler(case)
        variants = {
            "whole batch": cp(case, per_sample=False),
            "channels-first": lambda x, p, modes=case.modes: cp_channels_first(x, p, modes),
            "chunks of 2": chunked(cp(case, per_sample=False), 2),
            "per sample, lax.map differentiated": chunked(cp(case, per_sample=False), 1),
            "per sample": cp(case, per_sample=True),
        }
        dense = bench.conv_fns(case)["dense"]
        calls[f"{case.name} dense"] = compile_call(dense, kernel)[0]
        if case.c_in == 256:  # the smallest layer: XLA CPU's dense conv inside a loop body
            for label, f in (("dense, per sample (lax.map)", chunked(dense, 1)),
                             ("dense, whole batch in one lax.map step", chunked(dense, case.batch))):
                calls[f"{case.name} {label}"] = compile_call(f, kernel)[0]
        for label, f in variants.items():
            calls[f"{case.name} {label}"] = compile_call(f, params)[0]
    t = bench.time_interleaved(calls, rounds, budget_s=1e9)
    ms = {n: v["median_ms"] for n, v in t.items()}
    stack = stack_sums(ms, labels)
    return {"rounds": rounds, "layers_ms": ms, "stack_ms": stack,
            "ratio_to_whole_batch": {k: v / stack["whole batch"] for k, v in stack.items()},
            "ratio_to_dense": {k: v / stack["dense"] for k, v in stack.items()},
            "loadavg": os.getloadavg()}


def matmul(rounds: int = 20) -> dict:
    n, c_in, rank, c_out, batch = 9 * 42 * 42, 64, 384, 128, 8
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    x, h, dy, dh = arr(n, c_in), arr(n, rank), arr(n, c_out), arr(n, rank)
    u_in, w_out = arr(c_in, rank), arr(rank, c_out)
    products = {  # name: (function, operands, multiply-adds)
        "forward X @ U_in": (lambda a, b: a @ b, (x, u_in), n * c_in * rank),
        "forward H @ W_out": (lambda a, b: a @ b, (h, w_out), n * rank * c_out),
        "backward dY @ W_out^T": (lambda a, b: a @ b.T, (dy, w_out), n * c_out * rank),
        "backward H^T dY (weight)": (lambda a, b: a.T @ b, (h, dy), n * rank * c_out),
        "backward dH @ U_in^T": (lambda a, b: a @ b.T, (dh, u_in), n * rank * c_in),
        "backward X^T dH (weight)": (lambda a, b: a.T @ b, (x, dh), n * c_in * rank),
    }
    calls = {k: compile_jax(f, *ops)[0] for k, (f, ops, _) in products.items()}
    t = time_interleaved(calls, rounds, budget_s=1e9)
    ms = {k: v["median_ms"] for k, v in t.items()}
    gflops = {k: 2 * products[k][2] / (ms[k] * 1e6) for k in ms}
    return {"rounds": rounds, "positions_per_sample": n, "ms_per_sample": ms, "GFLOP/s": gflops,
            "batch": batch, "total_GFLOP": 2 * batch * sum(p[2] for p in products.values()) / 1e9,
            "total_ms_for_the_batch": batch * sum(ms.values()), "loadavg": os.getloadavg()}


def dense_baseline(rounds: int = 9) -> dict:
    """The JAX dense reference as ``lax``'s convolution (the benchmark's) and as a patches matrix
    product (:func:`~benchmarks.patches.dense_patches`), beside the HO-CP ``auto``
    path, fwd+bwd (``bench`` protocol), interleaved per layer, on the Jester stack and on the seven
    3x3 conv shapes of the ResNet-18 2-D train step (:func:`resnet2d_conv_cases`, summed over the
    network's convs): whether the HO-CP ratios to JAX dense hold against the faster of the two
    dense programs of each layer."""
    from benchmarks import bench

    def layer(case):
        kernel, params, compile_call = bench.case_compiler(case)
        strides, pads = case.geometry()
        fns = bench.conv_fns(case)
        calls = {"dense": compile_call(fns["dense"], kernel)[0],
                 "patches": compile_call(lambda x, k: dense_patches(x, k, strides, pads), kernel)[0],
                 "auto": compile_call(fns["auto"], params)[0]}
        _check_variants(case.name, calls, {"patches": "dense"})
        t = time_interleaved(calls, rounds, budget_s=1e9)
        ms = {path: v["median_ms"] for path, v in t.items()}
        ms["faster dense"] = min(ms["dense"], ms["patches"])
        return {"layer": case.name, "input_grad": case.input_grad, "ms": ms,
                "times_ms": {path: v["times_ms"] for path, v in t.items()}}

    def ratios(total):
        return {"auto/lax dense": total["auto"] / total["dense"], "auto/faster dense": total["auto"] / total["faster dense"]}

    jester = [layer(case) for case in bench.jester_cases(False)]
    stack = {k: sum(r["ms"][k] for r in jester) for k in jester[0]["ms"]}
    resnet = [layer(case) | {"convs_in_net": count} for case, count in resnet2d_conv_cases()]
    net = {k: sum(r["ms"][k] * r["convs_in_net"] for r in resnet) for k in resnet[0]["ms"]}
    return {"rounds": rounds, "jester": {"layers": jester, "stack_ms": stack} | ratios(stack),
            "resnet2d_step_convs": {"layers": resnet, "net_ms": net} | ratios(net), "loadavg": os.getloadavg()}


def rank_multiple(rounds: int = 5) -> dict:
    """Every ``bench`` conv layer's factorized path (fwd+bwd, ``bench`` protocol) at its rank ``r``
    and at the neighbouring ranks ``8k``, ``8k + 1`` and ``8(k + 1)`` (``8k <= r < 8(k + 1)``),
    interleaved per layer: whether the cost of a rank component steps at multiples of 8 (the
    float32 lanes of an AVX2 vector)."""
    from benchmarks import bench

    out: dict = {"rounds": rounds, "layers": {}}
    for case in bench.jester_cases(False) + bench.resnet_cases(False):
        low = 8 * (case.rank // 8)
        ranks = sorted({low, low + 1, case.rank, low + 8})
        calls = {}
        for r in ranks:
            c = dataclasses.replace(case, rank=r)
            _, params, compile_call = bench.case_compiler(c)
            calls[str(r)] = compile_call(bench.conv_fns(c)["factorized"], params)[0]
        t = time_interleaved(calls, rounds, budget_s=1e9)
        out["layers"][f"{case.group} {case.name}"] = {"rank": case.rank, "ms": {r: v["median_ms"] for r, v in t.items()}}
    out["loadavg"] = os.getloadavg()
    return out


def path_ties(rounds: int = 15, repeats: int = 3) -> dict:
    """Each ResNet-18 2-D layer of ``bench``: its two CP paths timed ``repeats`` times under three
    protocols in one process: :func:`hocp_jax.autotune.measure` (the measured policy's own
    rounds), the two paths interleaved alone, and interleaved with the dense conv (``bench``
    protocol, ``rounds`` rounds each). How far apart the paths are against the spread of a
    reading: a layer whose factorized / reconstructed ratio changes side between readings is a
    tie on this machine, which no pick can be sure to win by the 1.1 bound."""
    from benchmarks import bench

    out: dict = {"rounds": rounds, "repeats": repeats, "layers": {}}
    for case in bench.resnet_cases(False):
        if case.group != "resnet2d":
            continue
        kernel, params, compile_call = bench.case_compiler(case)
        fns = bench.conv_fns(case)
        calls = {p: compile_call(fns[p], kernel if p == "dense" else params)[0]
                 for p in ("factorized", "reconstructed", "dense")}
        x_shape, (strides, pads) = (case.batch, *case.in_sizes, case.c_in), case.geometry()
        readings = []
        for _ in range(repeats):
            measured = autotune.measure(x_shape, jnp.float32, params, case.modes, strides, pads, (1,) * len(strides),
                                        case.input_grad)
            pair = time_interleaved({p: calls[p] for p in ("factorized", "reconstructed")}, rounds, budget_s=1e9)
            three = time_interleaved(calls, rounds, budget_s=1e9)
            for protocol, ms in (("autotune.measure", {p: 1e3 * v for p, v in measured.items()}),
                                 ("pair", {p: v["median_ms"] for p, v in pair.items()}),
                                 ("with dense", {p: v["median_ms"] for p, v in three.items()})):
                readings.append({"protocol": protocol, "ms": {p: round(v, 1) for p, v in ms.items()},
                                 "factorized/reconstructed": round(ms["factorized"] / ms["reconstructed"], 3)})
        ratios = [r["factorized/reconstructed"] for r in readings]
        out["layers"][case.name] = {"readings": readings, "ratio_range": [min(ratios), max(ratios)],
                                    "ratio_median": statistics.median(ratios)}
    out["loadavg"] = os.getloadavg()
    return out


def low_precision(rounds: int = 5) -> dict:
    """Every ``bench`` conv layer in float32 and in bfloat16 computation from float32 weights (the
    weights cast inside the differentiated function, as a Flax layer with ``dtype=bfloat16`` does;
    ``x`` and the cotangent in the computation dtype), fwd+bwd, ``bench`` protocol, interleaved per
    layer: the dense conv, the reconstructed path, and the factorized path as the library runs it
    (float32 intermediates on CPU, :func:`hocp_jax.conv_plans.compute_dtype`) and in bfloat16
    arithmetic (``upcast_mode(False)``). Whether XLA CPU runs anything faster in bfloat16, and
    whether ``auto``'s picks (``analytic_pick`` in each dtype) stay the faster path."""
    from benchmarks import bench

    out: dict = {"rounds": rounds, "cpu_vector_flags": bench.machine_info()["cpu_vector_flags"], "layers": []}
    for case in bench.jester_cases(False) + bench.resnet_cases(False):
        x, kernel, params = bench.make_inputs(case)
        fns = bench.conv_fns(case)
        cot = bench.cotangent(fns["dense"], x, kernel)
        calls = {}
        for dtype, path, upcast in [(jnp.float32, p, None) for p in ("dense", "factorized", "reconstructed")] + [
                (jnp.bfloat16, "dense", None), (jnp.bfloat16, "factorized", None), (jnp.bfloat16, "factorized", False),
                (jnp.bfloat16, "reconstructed", None)]:
            def fn(x, w, f=fns[path], dtype=dtype):
                return f(x, jax.tree.map(lambda a: a.astype(dtype), w))

            name = f"{path} {jnp.dtype(dtype).name}" + (" arithmetic" if upcast is False else "")
            with conv_plans.upcast_mode(upcast):
                calls[name] = compile_jax(bench.fwd_bwd(fn, case.input_grad), x.astype(dtype),
                                          kernel if path == "dense" else params, cot.astype(dtype))[0]
        ms = {k: round(v["median_ms"], 1) for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
        row = {"layer": f"{case.group} {case.name}", "ms": ms}
        for dtype in ("float32", "bfloat16"):
            pick = autotune.analytic_pick((case.batch, *case.in_sizes, case.c_in), params, case.modes, *case.geometry(),
                                          (1,) * len(case.in_sizes), case.input_grad, jnp.dtype(dtype))
            row[f"pick {dtype}"] = pick
            row[f"pick / best {dtype}"] = round(ms[f"{pick} {dtype}"] / min(ms[f"{p} {dtype}"] for p in bench.CP_PATHS[:2]), 3)
        for path in ("dense", "factorized", "reconstructed"):
            row[f"{path} bfloat16 / float32"] = round(ms[f"{path} bfloat16"] / ms[f"{path} float32"], 3)
        row["factorized bfloat16 arithmetic / float32"] = round(ms["factorized bfloat16 arithmetic"] / ms["factorized float32"], 3)
        out["layers"].append(row)
        print(json.dumps(row), flush=True)
    for key in ("dense bfloat16 / float32", "factorized bfloat16 / float32", "reconstructed bfloat16 / float32",
                "factorized bfloat16 arithmetic / float32", "pick / best bfloat16", "pick / best float32"):
        v = [row[key] for row in out["layers"]]
        out[f"{key}: min, median, max"] = [min(v), statistics.median(v), max(v)]
    out["loadavg"] = os.getloadavg()
    return out


def mobilenet_depthwise_cases() -> list[tuple[int, int, int, int]]:
    """``(size, R, stride, count)`` of the 3x3 depthwise convs of the CIFAR-10 MobileNet-v2
    (:mod:`hocp_jax.models.mobilenet`, 32x32 inputs): each distinct shape and how many the net has."""
    from hocp_jax.models.mobilenet import CIFAR_CFG

    counts: dict = {}
    c_in, size = 32, 32
    for t, c, n, s in CIFAR_CFG:
        for j in range(n):
            stride = s if j == 0 else 1
            key = (size, t * c_in, stride)
            counts[key] = counts.get(key, 0) + 1
            c_in, size = c, size // stride
    return [(*k, v) for k, v in counts.items()]


def depthwise(rounds: int = 7, batch: int = 32) -> dict:
    """The depthwise 3x3 convs of the CIFAR-10 MobileNet-v2 at ``batch`` images (fwd+bwd: input and
    kernel gradients, a random cotangent), interleaved per layer: XLA's grouped conv
    (``feature_group_count=R``, what ``nn.Conv`` and ``separable_conv`` ran before) against the
    shift kernel :func:`hocp_jax.conv_ops.depthwise_conv`, in float32, in bfloat16 arithmetic and in
    bfloat16 computed in float32 (cast in and out, as the factorized CP path does on CPU). Then the
    separable conv (128->128 @ 28x28, rank 512, batch 8) with either depthwise step, beside the CP
    conv of the same rank (factorized). ``net_ms`` sums each variant over the network's convs."""
    from jax import lax

    from benchmarks import bench
    from hocp_jax import init

    def grouped(h, k, stride):
        return conv_ops.dense_conv(h, k[..., None, :], stride=stride, padding=1, feature_group_count=k.shape[-1])

    def shift(h, k, stride):
        return conv_ops.depthwise_conv(h, k, stride=stride, padding=1)

    def upcast(h, k, stride):
        return shift(h.astype(jnp.float32), k.astype(jnp.float32), stride).astype(h.dtype)

    variants = {"grouped float32": (grouped, jnp.float32), "shift float32": (shift, jnp.float32),
                "grouped bfloat16": (grouped, jnp.bfloat16), "shift bfloat16": (shift, jnp.bfloat16),
                "shift bfloat16 in float32": (upcast, jnp.bfloat16)}
    rng = np.random.default_rng(0)
    out: dict = {"rounds": rounds, "batch": batch, "layers": []}
    for size, r, stride, count in mobilenet_depthwise_cases():
        h = jnp.asarray(rng.standard_normal((batch, size, size, r)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, r)) / 3, jnp.float32)
        cot = jnp.asarray(rng.standard_normal(jax.eval_shape(lambda h: shift(h, k, stride), h).shape), jnp.float32)
        calls = {}
        for name, (f, dtype) in variants.items():
            def fn(h, k, f=f, dtype=dtype):
                return f(h, k.astype(dtype), stride)

            calls[name] = compile_jax(jax.value_and_grad(lambda h, k, c, fn=fn: jnp.sum(fn(h, k) * c), argnums=(0, 1)),
                                      h.astype(dtype), k, cot.astype(dtype))[0]
        ms = {n: round(v["median_ms"], 2) for n, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
        row = {"layer": f"{size}x{size} R{r} s{stride}", "convs_in_net": count, "ms": ms,
               "shift / grouped float32": round(ms["shift float32"] / ms["grouped float32"], 3),
               "shift / grouped bfloat16": round(ms["shift bfloat16"] / ms["grouped bfloat16"], 3),
               "shift bfloat16 in float32 / shift bfloat16": round(ms["shift bfloat16 in float32"] / ms["shift bfloat16"], 3)}
        out["layers"].append(row)
        print(json.dumps(row), flush=True)
    out["net_ms"] = {n: round(sum(r["ms"][n] * r["convs_in_net"] for r in out["layers"]), 1) for n in variants}

    key = jax.random.key(0)
    x = jax.random.normal(key, (8, 28, 28, 128))
    p = init.init_cp_params(key, 128, 128, (3, 3), 512)
    sep = conv.cp_to_separable(p, ("h", "w"))
    pads = ((1, 1), (1, 1))

    def sep_grouped(x, s):  # separable_conv with the grouped depthwise step, as it was
        h = conv_ops.channel_matmul(x, s["factor_in"])
        h = lax.conv_general_dilated(h, s["depthwise"][..., None, :], (1, 1), pads, feature_group_count=512,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return conv_ops.channel_matmul(h, s["factor_out"].T)

    fns = {"separable grouped": (sep_grouped, sep),
           "separable shift": (lambda x, s: conv.separable_conv(x, s, padding=1), sep),
           "cp factorized": (lambda x, q: conv.cp_conv(x, q, padding=1, implementation="factorized"), p)}
    cot = jnp.asarray(rng.standard_normal((8, 28, 28, 128)), jnp.float32)
    ys = {n: f(x, w) for n, (f, w) in fns.items()}
    assert all(jnp.allclose(y, ys["separable grouped"], rtol=1e-3, atol=1e-3 * float(jnp.abs(y).max())) for y in ys.values())
    calls = {n: compile_jax(bench.fwd_bwd(f, True), x, w, cot)[0] for n, (f, w) in fns.items()}
    out["separable"] = {n: round(v["median_ms"], 1) for n, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
    out["loadavg"] = os.getloadavg()
    return out


def pointwise(rounds: int = 7) -> dict:
    """Every distinct 1x1 conv of the CIFAR-10 MobileNet-v2 (batch 32 and 128) and of ``bench``'s
    dense ResNet-18 2-D and 3-D steps (the strided shortcuts), found by tracing the models, timed
    fwd+bwd (input and kernel gradients, a random cotangent) as XLA's convolution and as
    :func:`hocp_jax.conv_ops.conv_general_dilated` runs it on CPU (one matrix product), interleaved per
    conv; ``count`` is how many convs of the model have the shape."""
    from unittest import mock

    from jax import lax

    from benchmarks import bench
    from hocp_jax.models import get_model

    routed, found = conv_ops.conv_general_dilated, {}

    def recording(lhs, rhs, window_strides, padding, **kwargs):
        if conv_ops.conv_route(lhs, rhs, **kwargs) == "pointwise":
            key = (tuple(lhs.shape), tuple(rhs.shape), tuple(window_strides), str(padding))
            found.setdefault(key, [lhs.shape, rhs.shape, window_strides, padding, kwargs, 0])[-1] += 1
        return routed(lhs, rhs, window_strides, padding, **kwargs)

    steps = {c.name: (c.model, c.input_shape, c.tiny) for c in bench.model_cases(False)
             if c.name in ("resnet18 dense 2-D", "resnet18_3d dense")}
    steps |= {f"mobilenet_v2 batch {b}": ("mobilenet_v2", (b, 32, 32, 3), False) for b in (32, 128)}
    rng = np.random.default_rng(0)
    out: dict = {"rounds": rounds, "convs": []}
    for step, (model, shape, tiny) in steps.items():
        found.clear()
        with mock.patch.object(conv_ops, "conv_general_dilated", recording):
            jax.eval_shape(get_model(model, tiny=tiny).init, jax.random.key(0), jnp.zeros(shape))
        for lhs_shape, rhs_shape, strides, padding, kwargs, count in found.values():
            x = jnp.asarray(rng.standard_normal(lhs_shape), jnp.float32)
            k = jnp.asarray(rng.standard_normal(rhs_shape) / np.sqrt(rhs_shape[-2]), jnp.float32)
            calls = {}
            for name, f in (("lax", lax.conv_general_dilated), ("routed", routed)):
                def fn(x, k, c, f=f):
                    return jnp.sum(f(x, k, strides, padding, **kwargs) * c)

                cot = jnp.asarray(rng.standard_normal(jax.eval_shape(
                    lambda x, k: routed(x, k, strides, padding, **kwargs), x, k).shape), jnp.float32)
                calls[name] = compile_jax(jax.value_and_grad(fn, argnums=(0, 1)), x, k, cot)[0]
            ms = {n: round(v["median_ms"], 2) for n, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
            row = {"step": step, "x": list(lhs_shape), "kernel": list(rhs_shape), "strides": list(strides), "count": count,
                   "ms": ms, "routed / lax": round(ms["routed"] / ms["lax"], 3)}
            out["convs"].append(row)
            print(json.dumps(row), flush=True)
    ratios = [r["routed / lax"] for r in out["convs"]]
    out["routed / lax range"] = [min(ratios), max(ratios)]
    out["loadavg"] = os.getloadavg()
    return out


def stem_3d(rounds: int = 9) -> dict:
    """The 3-D stem of the HO-CP ResNet-18 on clips (3->64, 3x7x7, stride (1, 2, 2), padding (1, 3, 3),
    rank 116 as in the transduced model, no input gradient: a network's first layer) with both CP
    paths, fwd+bwd (``bench`` protocol), interleaved, at the transduced step's clip (1 x 8 x 112 x
    112) and four larger ones: the measured factorized/reconstructed ratio beside the analytic
    model's and its pick. Rows in ``bench``'s format, which
    ``tests/test_perf_paths.py::test_cost_model_agrees_with_recorded_timings`` reads."""
    from benchmarks import bench
    from hocp_jax import counting

    out: dict = {"rounds": rounds, "layers": []}
    for batch, frames, size in ((1, 8, 112), (2, 8, 112), (1, 16, 112), (4, 8, 112), (1, 8, 224)):
        case = bench.ConvCase("stem3d", f"stem (3->64)@{frames}x{size}x{size}/s(1,2,2)", batch, (frames, size, size),
                              3, 64, (3, 7, 7), 116, stride=(1, 2, 2), padding=((1, 1), (3, 3), (3, 3)), input_grad=False)
        kernel, params, compile_call = bench.case_compiler(case)
        fns = bench.conv_fns(case)
        calls = {p: compile_call(fns[p], params)[0] for p in ("factorized", "reconstructed")}
        t = bench.time_interleaved(calls, rounds, budget_s=1e9)
        ms = {k: v["median_ms"] for k, v in t.items()}
        strides, pads = case.geometry()
        costs = counting.cp_path_costs(batch, case.in_sizes, 3, 64, case.kernel, case.rank, stride=strides, padding=pads,
                                       input_grad=False, patches=conv_plans.patches_fit((batch, *case.in_sizes, 3), jnp.float32,
                                                                                      (*case.kernel, 3, 64), strides))
        pick = conv.choose_cp_implementation((batch, *case.in_sizes, 3), params, case.modes, stride=strides,
                                             padding=pads, input_grad=False)
        row = {"name": case.name, "shape": bench.case_shape(case), "input_grad": False, "ms": ms,
               "times_ms": {k: v["times_ms"] for k, v in t.items()},
               "measured fact/recon": round(ms["factorized"] / ms["reconstructed"], 3),
               "model fact/recon": round(costs["factorized"] / costs["reconstructed"], 3), "analytic pick": pick}
        out["layers"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
    out["loadavg"] = os.getloadavg()
    return out


def fold_taps(rounds: int = 7) -> dict:
    """The Jester layers (fwd+bwd, ``bench`` protocol) factorized as the library runs them and
    with the depthwise passes of the leading modes folded into the input contraction
    (:func:`benchmarks.experiments.variants.cp_conv_folded`: t, t and h, and on conv1, whose
    input has 3 channels, all three), interleaved per layer; each variant is checked against the
    library's path first."""
    from benchmarks import bench

    out: dict = {"rounds": rounds, "layers": []}
    for case in bench.jester_cases(False):
        _, params, compile_call = bench.case_compiler(case)
        fns = {"library": bench.conv_fns(case)["factorized"]}
        for n in ((1, 2, 3) if case.c_in <= 3 else (1, 2)):
            folded = case.modes[:n]
            fns["fold " + "".join(folded)] = functools.partial(cp_conv_folded, modes=case.modes, folded=folded)
        calls = {k: compile_call(f, params)[0] for k, f in fns.items()}
        _check_variants(case.name, calls, {k: "library" for k in calls if k != "library"})
        t = bench.time_interleaved(calls, rounds, budget_s=1e9)
        ms = {k: v["median_ms"] for k, v in t.items()}
        row = {"name": case.name, "ms": ms, "ratio to library": {k: round(v / ms["library"], 3) for k, v in ms.items()},
               "times_ms": {k: v["times_ms"] for k, v in t.items()}}
        out["layers"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
    out["loadavg"] = os.getloadavg()
    return out


def small_maps(rounds: int = 5) -> dict:
    """Ungrouped stride-1 convs on maps about the kernel's size or smaller (2-D: batch 8 with 256
    channels, kernels 3, 5 and 7, and batch 64 with 512, kernels 3 and 5 (XLA took 25-53 s per
    call on the 7x7 ones of 4x4 and 5x5 maps in a scratch run), square maps of 1 to k + 1; 3-D: batch 8,
    256 channels, a 3x3x3 kernel, 1 to 4 frames of 2x2, 5x5 and 10x10; padding k // 2), timed
    fwd+bwd (input and kernel gradients, a random cotangent) as XLA's convolution and as
    :func:`hocp_jax.conv_ops._taps_conv` (one matrix product per tap that reads the input),
    interleaved per conv. Such maps are where a ResNet's last stage ends on small images (2x2 for
    AffectNet's 64x64 faces) and where a video net's clip has fewer frames than its kernel."""
    from jax import lax

    cases = [((b, s, s, c), (k, k, c, c)) for b, c, ks in ((8, 256, (3, 5, 7)), (64, 512, (3, 5))) for k in ks
             for s in range(1, k + 2)]
    cases += [((8, t, s, s, 256), (3, 3, 3, 256, 256)) for t in (1, 2, 3, 4) for s in (2, 5, 10)]
    rng = np.random.default_rng(0)
    out: dict = {"rounds": rounds, "convs": []}
    for x_shape, k_shape in cases:
        n = len(k_shape) - 2
        strides, pads, dilations = (1,) * n, tuple((k // 2, k // 2) for k in k_shape[:n]), (1,) * n
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(k_shape) / np.sqrt(np.prod(k_shape[:-1])), jnp.float32)
        cot = jnp.asarray(rng.standard_normal((*x_shape[:-1], k_shape[-1])), jnp.float32)
        paths = {"lax": lambda x, w: lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=conv_ops.channels_last_dims(n)),
                 "taps": lambda x, w: conv_ops._taps_conv(x, w, strides, pads, dilations)}
        calls = {name: compile_jax(jax.value_and_grad(lambda x, w, c, f=f: jnp.sum(f(x, w) * c), argnums=(0, 1)),
                                   x, w, cot)[0] for name, f in paths.items()}
        ms = {name: round(v["median_ms"], 2) for name, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
        outs = x_shape[1:-1]
        row = {"x": list(x_shape), "kernel": list(k_shape), "ms": ms, "taps / lax": round(ms["taps"] / ms["lax"], 3),
               "taps reading x": int(sum(conv_ops._taps_read_input(x_shape[1:-1], k_shape[:n], strides, pads, dilations, outs))),
               "routed": conv_ops.conv_route(x, w, window_strides=strides, dimension_numbers=conv_ops.channels_last_dims(n))}
        out["convs"].append(row)
        print(json.dumps(row), flush=True)
    out["loadavg"] = os.getloadavg()
    return out


def small_maps_computed(rounds: int = 5, revision: str = "e599394") -> dict:
    """Convs on maps smaller than the kernel, whose kernel is a parameter (``dense``) or rebuilt
    from CP factors (``recon``, :func:`hocp_jax.conv.cp_to_kernel`, gradients w.r.t. the factors):
    the Jester conv4 (8 x 2x10x10, 256 -> 256, 3x3x3, rank 1536), a 2-frame clip of 5x5 and the last
    stage of a ResNet-18 on 64x64 images (2x2 maps, 512 -> 512, 3x3, the HO-CP ResNet-18's rank
    2288) at batch 8 and 64; padding 1. Each timed fwd+bwd (input and parameter gradients, a
    random cotangent) with XLA's convolution (``lax``), the library's :func:`hocp_jax.conv_ops._taps_conv`
    (``taps``: one split of the kernel into its taps) and ``_taps_conv`` of ``hocp_jax/conv.py`` at
    git ``revision`` (``taps indexed``: each tap's kernel indexed, whose transpose is a sum of
    zero-padded full kernels), interleaved per conv."""
    from jax import lax

    indexed = conv_at(revision)._taps_conv
    cases = [("Jester conv4", (8, 2, 10, 10, 256), 256, 1536), ("clip 2x5x5", (8, 2, 5, 5, 256), 256, 1536),
             ("ResNet-18 last stage, batch 8", (8, 2, 2, 512), 512, 2288),
             ("ResNet-18 last stage, batch 64", (64, 2, 2, 512), 512, 2288)]
    rng = np.random.default_rng(0)
    out: dict = {"rounds": rounds, "revision": revision, "convs": []}
    for name, x_shape, c_out, rank in cases:
        n = len(x_shape) - 2
        strides, pads, dilations, modes = (1,) * n, ((1, 1),) * n, (1,) * n, conv.default_modes(n)
        normal = lambda *shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)  # noqa: E731
        x, cot = normal(*x_shape), normal(*x_shape[:-1], c_out)
        cp = {"lambda": normal(rank), "factor_in": normal(x_shape[-1], rank, scale=0.05),
              "factor_out": normal(c_out, rank, scale=0.05), **{conv.mode_key(m): normal(3, rank, scale=0.3) for m in modes}}
        convs = {"lax": lambda x, w: lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=conv_ops.channels_last_dims(n)),
                 "taps": lambda x, w: conv_ops._taps_conv(x, w, strides, pads, dilations),
                 "taps indexed": lambda x, w: indexed(x, w, strides, pads, dilations)}
        calls = {}
        for kind, p in (("dense", conv.cp_to_kernel(cp, modes)), ("recon", cp)):
            for path, f in convs.items():
                def loss(x, p, c, f=f, kind=kind):
                    return jnp.sum(f(x, p if kind == "dense" else conv.cp_to_kernel(p, modes)) * c)

                calls[f"{kind} {path}"] = compile_jax(jax.value_and_grad(loss, argnums=(0, 1)), x, p, cot)[0]
        ms = {k: round(v["median_ms"], 2) for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
        row = {"name": name, "x": list(x_shape), "c_out": c_out, "rank": rank, "ms": ms,
               **{f"{kind} {path} / lax": round(ms[f"{kind} {path}"] / ms[f"{kind} lax"], 3)
                  for kind in ("dense", "recon") for path in ("taps", "taps indexed")}}
        out["convs"].append(row)
        print(json.dumps(row), flush=True)
    out["loadavg"] = os.getloadavg()
    return out


def channel_pairs(rounds: int = 9) -> dict:
    from benchmarks import bench

    out: dict = {"rounds": rounds, "machine": bench.machine_info()}
    tiles, shape = 48, (1, 18, 16, 84)  # Jester conv1's tiles: 14 output rows + the halo, per sample
    rng = np.random.default_rng(0)
    grid = []
    for c in (1, 2, 3, 4, 6):
        for r in (8, 12, 16, 18, 24, 32, 48, 64, 96, 128):
            x = jnp.asarray(rng.standard_normal((tiles, *shape, c)), jnp.float32)
            w = jnp.asarray(rng.standard_normal((c, r)), jnp.float32)
            g = jnp.asarray(rng.standard_normal((*shape, r)), jnp.float32)  # one cotangent for every tile

            def loop(x, w, g):  # each tile's product and its weight gradient, as a first layer's loops run them
                def body(t, acc):
                    h, vjp = jax.vjp(lambda w: conv_ops.channel_matmul(x[t], w), w)
                    return acc[0] + h, acc[1] + vjp(g)[0]
                return jax.lax.fori_loop(0, tiles, body, (jnp.zeros((*shape, r)), jnp.zeros((c, r))))

            calls = {}
            for label, mode in (("one product", False), ("paired rows", True)):
                with conv_plans.paired_rows_mode(mode):  # a new function each time: jax.jit would reuse a trace
                    calls[label] = compile_jax(functools.partial(loop), x, w, g)[0]
            ms = {k: v["median_ms"] for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
            grid.append({"in_channels": c, "out_channels": r, "ms": ms,
                         "paired / one product": round(ms["paired rows"] / ms["one product"], 3)})
    out["tile_products"] = {"tiles": tiles, "tile_positions": int(np.prod(shape)), "cells": grid}

    case = bench.jester_cases(False)[0]
    _, params, compile_call = bench.case_compiler(case)
    fn = bench.conv_fns(case)["factorized"]
    calls = {}
    for label, mode in (("one product", False), ("automatic", None)):
        with conv_plans.paired_rows_mode(mode):
            calls[label] = compile_call(fn, params)[0]
    ms = {k: v["median_ms"] for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
    out["jester_conv1_factorized_ms"] = ms | {"automatic / one product": round(ms["automatic"] / ms["one product"], 3)}

    model = {c.name: c for c in bench.model_cases(False)}["jester_hocp"]
    calls = {}
    for label, mode in (("one product", False), ("automatic", None)):
        with conv_plans.paired_rows_mode(mode):
            calls[label] = bench.prepare_model_case(model)[0]
    ms = {k: v["median_ms"] for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
    out["jester_hocp_step_ms"] = ms | {"automatic / one product": round(ms["automatic"] / ms["one product"], 3)}
    out["loadavg"] = os.getloadavg()
    return out


def _cases_3x3x3(group: str, shapes, input_grad: bool) -> list:
    """``bench.ConvCase``s of 3x3x3 convs, padding 1, from ``(batch, in_sizes, c_in, c_out, rank)``."""
    from benchmarks import bench

    return [bench.ConvCase(group, f"({ci}->{co})@{'x'.join(map(str, s))} (B={b}, R={r})", b, s, ci, co, (3, 3, 3), r,
                           input_grad=input_grad) for b, s, ci, co, r in shapes]


def fold_shapes() -> list:
    """First layers of video networks beside Jester conv1 (no input gradient, 3x3x3, padding 1)
    whose tiles can fold (:func:`tile_fold`): 1-3 input channels, ranks 4-48, three clip sizes."""
    shapes = [(4, (16, 112, 112), 3, 64, r) for r in (8, 12, 18, 32)] + [
        (2, (16, 112, 112), 3, 64, 48), (8, (18, 84, 84), 3, 32, 18), (4, (16, 112, 112), 2, 64, 8),
        (8, (18, 84, 84), 2, 64, 16), (2, (32, 112, 112), 1, 64, 4), (2, (32, 112, 112), 1, 64, 6),
        (8, (18, 84, 84), 1, 64, 16)]
    return _cases_3x3x3("fold", shapes, input_grad=False)


def mid_rank_shapes() -> list:
    """3x3x3 layers of ranks 96-288 (6 x C_in, with input gradient) that run in loops, between the
    first layers of :func:`fold_shapes` and the Jester layers of ranks 384-1536."""
    shapes = [(4, (16, 56, 56), 16, 32), (4, (16, 56, 56), 32, 64), (8, (8, 28, 28), 48, 96)]
    return _cases_3x3x3("mid rank", [(b, s, ci, co, 6 * ci) for b, s, ci, co in shapes], input_grad=True)


def tile_fold(rounds: int = 9) -> dict:
    from benchmarks import bench

    out: dict = {"rounds": rounds, "machine": bench.machine_info(), "layers": []}
    for case in bench.jester_cases(False) + fold_shapes():
        _, params, compile_call = bench.case_compiler(case)
        strides, pads = case.geometry()
        outs = counting.output_sizes(case.in_sizes, case.kernel, strides, pads)
        plan = conv_plans.tile_plan((case.batch, *case.in_sizes, case.c_in), case.rank, jnp.float32, outs,
                                  [k - 1 for k in case.kernel], strides, pads)
        with conv_plans.tile_fold_mode(True):  # the modes the fold takes where the shape allows it
            folded = plan and conv_plans.tile_fold_modes(case.c_in, case.kernel, strides, outs, plan[0], case.rank)
        if not folded or case.c_in * case.kernel[folded[0]] * case.kernel[folded[1]] > conv_plans.TILE_FOLD_MAX_COLUMNS:
            continue
        fn = bench.conv_fns(case)["factorized"]
        calls = {}
        for label, mode in (("unfolded", False), ("folded", True)):
            with conv_plans.tile_fold_mode(mode):
                calls[label] = compile_call(fn, params)[0]
        ms = {k: v["median_ms"] for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
        rule = bool(conv_plans.tile_fold_modes(case.c_in, case.kernel, strides, outs, plan[0], case.rank))
        out["layers"].append({"layer": case.name, "tiles": {"mode": case.modes[plan[0]], "rows": plan[1]},
                              "folded": [case.modes[i] for i in folded], "ms": ms, "automatic": "folded" if rule else "unfolded",
                              "folded / unfolded": round(ms["folded"] / ms["unfolded"], 3)})
    out["loadavg"] = os.getloadavg()
    return out


def out_factor_layout(rounds: int = 9) -> dict:
    from benchmarks import bench

    out: dict = {"rounds": rounds, "machine": bench.machine_info(), "layers": []}
    bound = conv_plans.OUT_FACTOR_BEFORE_LOOPS_MAX_RANK
    for case in bench.jester_cases(False) + fold_shapes() + mid_rank_shapes():
        _, params, compile_call = bench.case_compiler(case)
        calls = {}
        for label, most in (("inside the loops", 0), ("before the loops", 2**31)):
            conv_plans.OUT_FACTOR_BEFORE_LOOPS_MAX_RANK = most  # read at trace time, i.e. when compiled here
            try:
                cp = functools.partial(conv.cp_conv, modes=case.modes, stride=case.stride, padding=case.padding,
                                       implementation="factorized", input_grad=case.input_grad)
                calls[label] = compile_call(cp, params)[0]
            finally:
                conv_plans.OUT_FACTOR_BEFORE_LOOPS_MAX_RANK = bound
        ms = {k: v["median_ms"] for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
        out["layers"].append({"layer": case.name, "rank": case.rank, "ms": ms,
                              "automatic": "before the loops" if conv_plans.out_factor_before_loops(case.rank)
                              else "inside the loops",
                              "before / inside": round(ms["before the loops"] / ms["inside the loops"], 3)})
    out["loadavg"] = os.getloadavg()
    return out


SPLIT_SHAPES = [  # (batch, in_sizes, c_in, kernel, stride): video networks' first convs, 64 output channels
    (1, (8, 112, 112), 3, (3, 7, 7), (1, 2, 2)), (2, (16, 112, 112), 3, (3, 7, 7), (1, 2, 2)),
    (2, (16, 112, 112), 3, (5, 7, 7), (1, 2, 2)), (2, (16, 112, 112), 3, (3, 5, 5), (1, 2, 2)),
    (2, (16, 112, 112), 1, (3, 7, 7), (1, 2, 2)), (2, (16, 56, 56), 3, (3, 5, 5), (1, 1, 1)),
    (2, (16, 112, 112), 4, (3, 3, 3), (1, 1, 1)), (2, (18, 84, 84), 3, (3, 3, 3), (1, 1, 1)),
    (2, (16, 112, 112), 3, (3, 3, 3), (1, 2, 2)), (2, (16, 112, 112), 3, (3, 7, 7), (2, 2, 2)),
]


def patches_split(rounds: int = 9) -> dict:
    """The patches product of a video network's first conv (:func:`hocp_jax.conv_ops._patches_conv`,
    the library's route for 3-D convs of at most 4 input channels on CPU) split by its first
    mode's taps and as one product (:func:`hocp_jax.conv_plans.patches_split_mode` on and off), fwd
    + kernel gradient (no input gradient, as a first layer), interleaved per shape
    (:data:`SPLIT_SHAPES`, padding ``K // 2``), with the automatic rule's pick; then ``bench``'s
    two train steps that have such a conv, the dense 3-D ResNet-18 (its stem) and the transduced
    HO-CP ResNet-18 (its stem's reconstructed path), compiled both ways and timed interleaved."""
    from benchmarks import bench
    from benchmarks.experiments.common import per_round_ratio

    out: dict = {"rounds": rounds, "machine": bench.machine_info(), "layers": []}
    rng = np.random.default_rng(0)
    for batch, sizes, c_in, ks, strides in SPLIT_SHAPES:
        x = jnp.asarray(rng.standard_normal((batch, *sizes, c_in)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((*ks, c_in, 64)) / np.sqrt(c_in * np.prod(ks)), jnp.float32)
        f = functools.partial(conv_ops.dense_conv, stride=strides, padding=tuple((a // 2, a // 2) for a in ks))
        calls = {}
        for label, mode in (("one product", False), ("split", True)):
            with conv_plans.patches_split_mode(mode):
                calls[label] = bench.compile_fwd_bwd(f, x, k, False, bench.cotangent(f, x, k))[0]
        ms = {k: v["median_ms"] for k, v in time_interleaved(calls, rounds, budget_s=1e9).items()}
        out["layers"].append({"layer": f"({c_in}->64)@{'x'.join(map(str, sizes))} (B={batch}), {'x'.join(map(str, ks))}, "
                                       f"stride {'x'.join(map(str, strides))}",
                              "columns": c_in * int(np.prod(ks[1:])), "ms": ms,
                              "automatic": "split" if conv_plans.patches_split(c_in, ks) else "one product",
                              "split / one product": round(ms["split"] / ms["one product"], 3)})
        print(json.dumps(out["layers"][-1]), flush=True)
    calls = {}
    for case in bench.model_cases(False):
        if case.name in ("resnet18_3d dense", "resnet18_hocp transduced"):
            for label, mode in (("one product", False), ("split", True)):
                with conv_plans.patches_split_mode(mode):
                    step, state, batch = bench.model_step(case)
                    calls[f"{case.name}, {label}"] = bench.compile_jax(step, state, batch)[0]
    t = time_interleaved(calls, rounds, budget_s=1e9)
    out["steps_ms"] = {k: round(v["median_ms"], 1) for k, v in t.items()}
    out["steps_times_ms"] = {k: v["times_ms"] for k, v in t.items()}
    out["steps split / one product per round"] = {
        k[:-len(", split")]: per_round_ratio(t, k, k.replace("split", "one product")) for k in t if k.endswith(", split")}
    out["loadavg"] = os.getloadavg()
    return out
