"""Side-by-side experiments behind the choices in hocp_jax (see RESULTS.md "Ideas measured").

``python -m benchmarks.experiments stem``: HO-CP ResNet-18 2-D train step (8 x 112 x 112) with the
stem told it gets no input gradient (``auto`` -> reconstructed stem, the default now) vs the stem
treated like an inner layer (``auto`` -> factorized stem, the previous behaviour), and the dense
ResNet-18, interleaved in one process. Prints medians and ratios as JSON.

``python -m benchmarks.experiments xla_flags [rounds]``: the Jester stack (the four 3x3x3 layers,
fwd+bwd, ``bench`` protocol) with the dense conv and the HO-CP ``auto`` path, under several
``XLA_FLAGS`` settings of the CPU backend. Flags are per process, so every setting runs in its
own worker process; the parent times the workers' calls in interleaved, rotated rounds (one call
runs at a time), so load from elsewhere hits all settings alike. Prints medians and ratios to the
default-flags dense stack as JSON.

``python -m benchmarks.experiments malloc [rounds]``: the same worker scheme under the glibc
allocator settings of :data:`MALLOC_SETTINGS` (XLA's CPU runtime and PyTorch both allocate with
glibc's malloc): the Jester stack (JAX dense, ``auto`` and, with the ``bench`` extra, the
PyTorch/TensorLy-Torch peers), then the three train-step pairs. Shows how much of each ratio is
the allocator's doing rather than the conv's.

``python -m benchmarks.experiments shift_kernel [rounds] [revision]``: the depthwise shift kernel
of ``hocp_jax/conv.py`` at git ``revision`` (default 35aced0: the "pad-free" kernel; 48d5593: the
"tap-input" kernel; both measured and not kept) against the current one: the Jester stack layers
(factorized, fwd+bwd, ``bench`` protocol) and the ResNet-18 2-D, Jester and transduced ResNet-18
train steps with their dense references, interleaved in one process. Needs a git checkout.

``python -m benchmarks.experiments remat [rounds]``: the Jester stack layers (factorized,
fwd+bwd, ``bench`` protocol) with and without ``jax.checkpoint`` around each conv (the backward
pass recomputes the (B, *S, R) intermediates instead of keeping them), interleaved.
``python -m benchmarks.experiments layout [rounds]``: the Jester stack layers (factorized,
fwd+bwd, ``bench`` protocol, JAX dense conv as reference) with the (B, *S, R) intermediates
channels-last over the whole batch, channels-first (B, R, *S: the taps then shift along
contiguous spatial axes and the contractions become batched matmuls over positions), and
channels-last run on chunks of 2 samples or one sample at a time under a differentiated
``lax.map``, and one sample at a time as the ``per_sample`` option of ``cp_conv`` does it (its
backward loop recomputes each sample's forward instead of storing it): a sample's intermediates
are 1/B of the working set, closer to the 32 MiB L3 cache; plus, on the smallest layer, the
dense conv under ``lax.map``, which shows why the reconstructed path is never chunked.
Interleaved.

``python -m benchmarks.experiments coresidence [rounds]``: why the benchmark runs the peers in a
process of their own. Jester conv2 (fwd+bwd, ``bench`` protocol), JAX's ``auto`` timed right after
a call of JAX itself, of PyTorch's dense conv in a :class:`benchmarks.peers.PeerProcess`, and of
PyTorch's dense conv in this process: the three pairs in a new random order each round.

``python -m benchmarks.experiments phases [rounds]``: Jester conv2 (fwd+bwd, ``bench`` protocol),
JAX's ``auto`` (factorized, per sample, in tiles) and dense conv alternating, each call's time and
what the process did during it: the hypervisor's steal time (``/proc/stat``), user and system CPU
time, minor page faults and context switches (``getrusage``): whether slow calls come in phases,
whether they hit both programs, and what grows in a slow call.

``python -m benchmarks.experiments tiles [rounds]``: the Jester stack layers (factorized, fwd+bwd,
``bench`` protocol, one sample at a time) with each sample whole, cut into tiles by the automatic
rule (:func:`hocp_jax.autotune.tile_plan`), and in tiles of 2, 3, 6 and 14 output rows wherever a
layer can be tiled (:func:`hocp_jax.autotune.tile_rows_mode`), interleaved; also the transduced
ResNet-18 3x3x3 layers with one clip (B = 1, as in the train step; "whole samples" is then the
whole-batch program), and the Jester HO-CP net's train step (ReLU between the factors, so tiled
through ``psi_pointwise``) with tiles off and automatic, beside the dense net's.

``python -m benchmarks.experiments line_buffer [rounds] [revision]``: Jester conv1 and conv2
(factorized, fwd+bwd, ``bench`` protocol, tiled) with the current tiles and with the line-buffer
tiles of git ``revision`` (default 54703b2: measured and not kept), in the automatic tiles and
in tiles of 3 and 6 rows, interleaved. Needs a git checkout.

``python -m benchmarks.experiments resnet2d_step_layers [rounds]``: the seven 3x3 conv shapes of
the ResNet-18 2-D train step (8 x 112 x 112) with the dense conv and both CP paths, interleaved
per layer, with ``auto``'s pick and the cost model's factorized/reconstructed ratio beside the
measured one; and two variants measured and not kept: the factorized path with one merged 9-tap
depthwise pass, the reconstructed one with the kernel rebuilt C_in-first.

``python -m benchmarks.experiments step_profile [rounds]``: the ResNet-18 2-D train steps of
``bench`` (dense and HO-CP) traced with the JAX profiler, alternating, ``rounds`` rounds of 5
steps each; every HLO instruction is attributed to the layer that made it
(:mod:`benchmarks.xla_profile`), and the wall and CPU ms per step are summed per layer and per
stage, with the HO-CP minus dense difference per conv: where the HO-CP step wins and loses
inside the network.

``python -m benchmarks.experiments processes [rounds]``: the ResNet-18 2-D train-step pair of
``bench`` in six worker processes with the same environment, interleaved: the HO-CP/dense ratio
of each process, i.e. how much of a single run's ratio is the process it ran in.

``python -m benchmarks.experiments per_sample [rounds]``: the HO-CP ResNet-18 train steps (2-D
static, and transduced to 3-D) with ``per_sample`` off, automatic (the default rule) and on for
every factorized conv (:func:`hocp_jax.autotune.per_sample_mode`), each interleaved with its
dense reference.

``python -m benchmarks.experiments matmul [rounds]``: the six matrix products of the two 1x1
contractions of the factorized Jester conv2 (64->128 @ 9x42x42, R = 384) in a train step
(forward: X U^(C), H W_out; backward: the input and weight gradient of each), on one sample's
positions as the per-sample loop runs them, each jitted alone and timed interleaved; prints
ms and GFLOP/s per product and their total over the batch of 8: a floor for the layer's time
that no change to the depthwise passes can go below.

``python -m benchmarks.experiments step_changes [rounds]``: the three whole-model train-step pairs
(HO-CP ResNet-18 2-D and transduced, Jester HO-CP net, each with its dense reference) with the
changes of the last round undone, then re-applied one at a time: the 1x1 contractions as 2-D
matmuls (:func:`hocp_jax.conv.channel_matmul`, was a multi-axis einsum), the max-pool of
:mod:`hocp_jax.pooling` (was ``lax.reduce_window``, in the dense references too) and the
per-sample loop for layers with a sample-wise psi (was whole batch). Patched at trace time,
interleaved; ratios use the dense step with the same pool.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from benchmarks.bench import compile_jax, time_interleaved
from hocp_jax import conv
from hocp_jax.models import get_model
from hocp_jax.models.resnet import ResNet, hocp_factory


class ResNetStemWithInputGrad(ResNet):
    """The HO-CP ResNet with its stem treated like an inner layer (``input_grad=True``, the
    previous behaviour): :func:`hocp_factory` sets ``input_grad=False`` for a conv named
    ``"stem"`` only, so the stem is built under another name (parameter names do not matter here)."""

    def factory(self):
        def make(*args, name, **kwargs):
            return hocp_factory(*args, name="stem_with_input_grad" if name == "stem" else name, psi=self.psi,
                                shortcut=self.shortcut, implementation=self.implementation, **kwargs)

        return make


def _image_step(model, shape):
    """``(train_step, state, batch)``: ``bench``'s train step of the module ``model`` on images of ``shape``."""
    from benchmarks import bench

    return bench.model_step(bench.ModelCase(name="image step", model="(given)", input_shape=tuple(shape)), model)


def step_call(model, shape):
    return compile_jax(*_image_step(model, shape))[0]


def stem(rounds: int = 7) -> dict:
    shape = (8, 112, 112, 3)
    calls = {"dense": step_call(get_model("resnet18"), shape),
             "hocp (stem: no input grad)": step_call(get_model("resnet18_hocp"), shape),
             "hocp (stem: input grad)": step_call(ResNetStemWithInputGrad(conv="hocp"), shape)}
    t = time_interleaved(calls, rounds, budget_s=1e9)
    ms = {k: v["median_ms"] for k, v in t.items()}
    return {"ms": ms, "ratio_to_dense": {k: v / ms["dense"] for k, v in ms.items()}, "loadavg": os.getloadavg()}


def _stack(layer_ms: dict, labels) -> dict:
    """Per label, the sum over the layers of ``layer_ms`` (keys ``"<layer> <label>"``; a key counts
    for the longest label it ends with, so ``"conv1 torch dense"`` is not a ``"dense"`` one)."""
    def label(name):
        return max((k for k in labels if name.endswith(" " + k)), key=len, default=None)

    return {k: sum(v for n, v in layer_ms.items() if label(n) == k) for k in labels}


def _conv_at(revision: str):
    """``hocp_jax/conv.py`` as it was at git ``revision``, loaded as a module of its own (it imports
    the current rest of ``hocp_jax``). Needs a git checkout."""
    import importlib.util
    import tempfile

    source = subprocess.run(["git", "show", f"{revision}:hocp_jax/conv.py"], capture_output=True, text=True, check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
        f.write(source.stdout)
        f.flush()
        spec = importlib.util.spec_from_file_location("conv_at_revision", f.name)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
    return other


def shift_kernel(rounds: int = 5, revision: str = "35aced0") -> dict:
    from benchmarks import bench

    kernels = {"current": conv._depthwise, revision: _conv_at(revision)._depthwise}

    def compiled(kernel, build):
        conv._depthwise = kernels[kernel]  # read by depthwise_conv_1d at trace time
        try:
            return build()
        finally:
            conv._depthwise = kernels["current"]

    out: dict = {"revision": revision, "rounds": rounds}
    layers = {}
    for case in bench.jester_cases(False):
        _, params, compile_call = bench.case_compiler(case)
        fn = bench.conv_fns(case)["factorized"]
        for k in kernels:
            layers[f"{case.name} {k}"] = compiled(k, lambda: compile_call(fn, params)[0])
    t = bench.time_interleaved(layers, rounds, budget_s=1e9)
    out["jester_layers_ms"] = {n: v["median_ms"] for n, v in t.items()}
    out["jester_stack_ms"] = _stack(out["jester_layers_ms"], kernels)
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
    tiles and in tiles of 3 and 6 rows (:func:`hocp_jax.autotune.tile_rows_mode`), interleaved."""
    from benchmarks import bench
    from hocp_jax import autotune

    versions = {"current": conv, revision: _conv_at(revision)}
    out: dict = {"revision": revision, "rounds": rounds, "layers_ms": {}}
    for case in bench.jester_cases(False)[:2]:
        _, params, compile_call = bench.case_compiler(case)
        calls = {}
        for label, mod in versions.items():
            def fn(x, p, mod=mod):
                return mod.cp_conv(x, p, modes=case.modes, stride=case.stride, padding=case.padding,
                                   implementation="factorized", input_grad=case.input_grad)
            for rows in (None, 3, 6):
                with autotune.tile_rows_mode(rows):
                    calls[f"{label}, rows {rows or 'auto'}"] = compile_call(fn, params)[0]
        t = bench.time_interleaved(calls, rounds, budget_s=1e9)
        out["layers_ms"][case.name] = {name: v["median_ms"] for name, v in t.items()}
    out["loadavg"] = os.getloadavg()
    return out


def _slice_taps(hp, tap, strides, outs):
    """The slice of the padded ``hp (B, *S_pad, R)`` that kernel tap ``tap`` (one index per
    spatial axis) reads for the ``outs`` output positions at ``strides``."""
    for ax, (t, st, o) in enumerate(zip(tap, strides, outs)):
        hp = lax.slice_in_dim(hp, t, t + (o - 1) * st + 1, st, ax + 1)
    return hp


def _merged_taps(hp, kernel, strides, outs):
    """``sum over taps of kernel[tap] * slice``: the depthwise conv of the padded ``hp`` with the
    merged per-rank kernel ``(*K, R)`` in one fused pass."""
    taps = itertools.product(*map(range, kernel.shape[:-1]))
    return functools.reduce(jnp.add, (_slice_taps(hp, t, strides, outs) * kernel[t] for t in taps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _merged_depthwise(h, kernel, strides, pads):
    """Depthwise conv of ``h (B, *S, R)`` with ``kernel (*K, R)`` (all modes at once)."""
    return _merged_depthwise_fwd(h, kernel, strides, pads)[0]


def _merged_depthwise_fwd(h, kernel, strides, pads):
    outs = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(h.shape[1:-1], pads, kernel.shape, strides)]
    return _merged_taps(jnp.pad(h, ((0, 0),) + pads + ((0, 0),)), kernel, strides, outs), (h, kernel)


def _merged_depthwise_bwd(strides, pads, res, g):
    """As :func:`hocp_jax.conv._depthwise_bwd`, over all modes at once: the flipped kernel over
    the stride-dilated, re-padded cotangent; one reduction per tap for the kernel gradient."""
    h, kernel = res
    ks, outs = kernel.shape[:-1], g.shape[1:-1]
    cfg = [(k - 1 - lo, n + lo - (o - 1) * s - 1, s - 1)
           for n, k, (lo, _), s, o in zip(h.shape[1:-1], ks, pads, strides, outs)]
    gp = lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0)] + cfg + [(0, 0, 0)])
    dh = _merged_taps(gp, kernel[(slice(None, None, -1),) * len(ks)], (1,) * len(ks), h.shape[1:-1])
    hp = jnp.pad(h, ((0, 0),) + pads + ((0, 0),))
    dk = jnp.stack([jnp.sum(_slice_taps(hp, t, strides, outs) * g, axis=tuple(range(h.ndim - 1)))
                    for t in itertools.product(*map(range, ks))])
    return dh, dk.reshape(kernel.shape)


_merged_depthwise.defvjp(_merged_depthwise_fwd, _merged_depthwise_bwd)


def _cp_conv_merged(x, p, strides, pads):
    """Factorized 2-D CP conv whose two depthwise passes are one pass of the merged 3x3 per-rank
    kernel (9 taps; the per-mode passes do 3 + 3 over an intermediate)."""
    kernel = p["factor_h"][:, None, :] * p["factor_w"][None, :, :]
    h = _merged_depthwise(conv.channel_matmul(x, p["factor_in"]), kernel, strides, pads)
    return conv.channel_matmul(h, (p["factor_out"] * p["lambda"]).T)


def _cp_conv_rebuild_in_first(x, p, strides, pads):
    """Reconstructed 2-D CP conv with the kernel rebuilt as ``(C_in K_h, R) x (R, K_w C_out)`` into
    ``(C_in, K_h, K_w, C_out)``, the layout of XLA's weight gradient here (so that gradient
    reshapes into the rebuild's backward products without a transpose); the conv reads the kernel
    in that order (``rhs_spec``)."""
    c_in, k_h, k_w, c_out = (p[k].shape[0] for k in ("factor_in", "factor_h", "factor_w", "factor_out"))
    left = (p["factor_in"][:, None] * p["factor_h"][None] * p["lambda"]).reshape(c_in * k_h, -1)
    right = (p["factor_w"][:, None] * p["factor_out"][None]).reshape(k_w * c_out, -1)
    kernel = (left @ right.T).reshape(c_in, k_h, k_w, c_out)
    numbers = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 0, 1, 2), out_spec=(0, 3, 1, 2))
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=numbers)


def _check_variants(case, fns, params) -> None:
    """Raises unless each variant's value and gradients match its library path's (float32 noise)."""
    from benchmarks import bench

    x, _, _ = bench.make_inputs(case)
    cot = bench.cotangent(fns["factorized"], x, params)
    run = {k: jax.jit(bench.fwd_bwd(fns[k], case.input_grad))(x, params, cot) for k in fns if k != "dense"}
    for variant in [k for k in run if ", " in k]:
        ref = run[variant.split(",")[0]]
        for got, want in zip(jax.tree.leaves(run[variant]), jax.tree.leaves(ref)):
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3 * float(jnp.max(jnp.abs(want))),
                                       err_msg=f"{case.name}: {variant}")


def resnet2d_step_layers(rounds: int = 9) -> dict:
    """The 3x3 convs of the ResNet-18 2-D train step of ``bench`` (8 images of 112x112: 28x28 to
    4x4 maps, the strided ones too, rank at the dense parameter budget) with the dense conv and
    both CP paths (fwd+bwd, ``bench`` protocol), interleaved per layer: which path ``auto`` (the
    analytic cost model) picks, the measured factorized/reconstructed ratio beside the model's,
    and how many convs of each shape the network has. Also two variants, each checked against
    its library path first: the factorized path with one merged 9-tap depthwise pass
    (:func:`_cp_conv_merged`) and the reconstructed path with the C_in-first rebuild
    (:func:`_cp_conv_rebuild_in_first`); ``net_ms`` sums each path over the network's convs."""
    from benchmarks import bench
    from hocp_jax import counting

    layers = [(64, 64, 28, 1, 4), (64, 128, 28, 2, 1), (128, 128, 14, 1, 3), (128, 256, 14, 2, 1),
              (256, 256, 7, 1, 3), (256, 512, 7, 2, 1), (512, 512, 4, 1, 3)]
    out: dict = {"rounds": rounds, "layers": []}
    for ci, co, s, st, count in layers:
        rank = counting.cp_rank_for_budget(ci, co, (3, 3))
        case = bench.ConvCase("resnet2d", f"({ci}->{co})@{s}x{s}" + (f"/s{st}" if st > 1 else ""), 8, (s, s), ci, co,
                              (3, 3), rank, (st, st))
        kernel, params, compile_call = bench.case_compiler(case)
        strides, pads = case.geometry()
        fns = bench.conv_fns(case) | {
            "factorized, merged taps": lambda x, p: _cp_conv_merged(x, p, strides, pads),
            "reconstructed, C_in-first rebuild": lambda x, p: _cp_conv_rebuild_in_first(x, p, strides, pads)}
        fns.pop("auto")
        _check_variants(case, fns, params)
        t = bench.time_interleaved({k: compile_call(f, kernel if k == "dense" else params)[0] for k, f in fns.items()},
                                   rounds, budget_s=1e9)
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
    out["net_ms"] = {k: sum(row["ms"][k] * row["convs_in_net"] for row in out["layers"]) for k in fns}
    out["net_ms"]["auto's picks"] = sum(row["ms"][row["auto_pick"]] * row["convs_in_net"] for row in out["layers"])
    out["loadavg"] = os.getloadavg()
    return out


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
        step, state, batch = _image_step(get_model(model), shape)
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
    stack = _stack(ms, ("plain", "remat"))
    return {"layers_ms": ms, "stack_ms": stack, "remat/plain": stack["remat"] / stack["plain"], "loadavg": os.getloadavg()}


def _conv2_calls(paths) -> tuple:
    """Jester conv2 (the ``bench`` case) and its compiled fwd+bwd calls ``{path: call}`` for ``paths``
    of :func:`benchmarks.bench.conv_fns`."""
    from benchmarks import bench

    case = bench.jester_cases(False)[1]
    kernel, params, compile_call = bench.case_compiler(case)
    fns = bench.conv_fns(case)
    return case, {p: compile_call(fns[p], kernel if p == "dense" else params)[0] for p in paths}


def _ms(call) -> float:
    t0 = time.perf_counter()
    call()
    return 1e3 * (time.perf_counter() - t0)


def coresidence(rounds: int = 10) -> dict:
    from benchmarks import peers

    case, calls = _conv2_calls(("auto",))
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
                t_first = _ms(calls[first])
                if first != "JAX":
                    times[first].append(t_first)
                times[labels[i]].append(_ms(jax_call))
    return {"layer": case.name, "rounds": rounds, "times_ms": times,
            "medians_ms": {k: statistics.median(v) for k, v in times.items()}, "loadavg": os.getloadavg()}


def phases(rounds: int = 16) -> dict:
    def counters() -> dict:  # steal time of all CPUs (clock ticks, /proc/stat) and this process's rusage
        with open("/proc/stat") as f:
            steal = int(f.readline().split()[8])
        r = resource.getrusage(resource.RUSAGE_SELF)
        return {"steal_ticks": steal, "user_ms": 1e3 * r.ru_utime, "sys_ms": 1e3 * r.ru_stime,
                "minor_faults": r.ru_minflt, "voluntary_switches": r.ru_nvcsw, "involuntary_switches": r.ru_nivcsw}

    case, calls = _conv2_calls(("auto", "dense"))
    out: dict = {p: {"ms": []} for p in calls}
    for call in calls.values():
        call()
    for _ in range(rounds):
        for p, call in calls.items():
            c0 = counters()
            out[p]["ms"].append(_ms(call))
            for k, v in counters().items():
                out[p].setdefault(k, []).append(round(v - c0[k], 1))
    return {"layer": case.name, "rounds": rounds, "calls": out, "loadavg": os.getloadavg()}


def tiles(rounds: int = 5) -> dict:
    from benchmarks import bench
    from hocp_jax import autotune

    settings = {"whole samples": 0, "auto": None, "rows 2": 2, "rows 3": 3, "rows 6": 6, "rows 14": 14}
    calls = {}
    transduced = [dataclasses.replace(c, batch=1) for c in bench.resnet_cases(False) if c.group == "resnet3d"]
    for case in bench.jester_cases(False) + transduced:
        _, params, compile_call = bench.case_compiler(case)
        fn = bench.conv_fns(case)["factorized"]
        for label, rows in settings.items():
            with autotune.tile_rows_mode(rows):  # read when the call is traced, i.e. compiled here
                name = f"{case.name} {label}" if case.group == "jester" else f"transduced B=1 {case.name} {label}"
                calls[name] = compile_call(fn, params)[0]
    models = {c.name: c for c in bench.model_cases(False)}
    steps = {"jester dense": ("jester dense", None), "jester_hocp whole samples": ("jester_hocp", 0),
             "jester_hocp auto": ("jester_hocp", None)}
    for label, (model, rows) in steps.items():
        with autotune.tile_rows_mode(rows):
            calls[f"step {label}"] = bench.prepare_model_case(models[model])[0]
    t = bench.time_interleaved(calls, rounds, budget_s=1e9)
    ms = {n: v["median_ms"] for n, v in t.items()}
    stack = _stack({n: v for n, v in ms.items() if n.startswith("conv")}, tuple(settings))
    step_ms = {k: ms.pop(f"step {k}") for k in steps}
    return {"layers_ms": ms, "stack_ms": stack, "stack_ratio_to_whole_samples": {k: v / stack["whole samples"] for k, v in stack.items()},
            "train_step_ms": step_ms, "train_step_ratio_to_dense": {k: v / step_ms["jester dense"] for k, v in step_ms.items()},
            "loadavg": os.getloadavg()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_channels_first(h, factor, axis, pad):
    """Stride-1 depthwise 1-D conv of ``h (B, R, *S)`` along ``axis`` with ``factor (K, R)``."""
    return conv._shift_conv_1d(h, _rank_first(factor, h.ndim), axis, 1, pad, 1)


def _rank_first(factor, ndim):
    """``factor (K, R)`` -> ``(K, R, 1, ..., 1)``, broadcasting against a (R, *S) slice."""
    return factor.reshape(factor.shape + (1,) * (ndim - 2))


def _depthwise_channels_first_fwd(h, factor, axis, pad):
    return _depthwise_channels_first(h, factor, axis, pad), (h, factor)


def _depthwise_channels_first_bwd(axis, pad, res, g):
    h, factor = res
    k = factor.shape[0]
    cfg = [(0, 0)] * g.ndim
    cfg[axis] = (k - 1 - pad[0], k - 1 - pad[1])
    dh = conv._shift_conv_1d(jnp.pad(g, cfg), _rank_first(factor[::-1], h.ndim), axis, 1, (0, 0), 1)
    hp = conv._pad_axis(h, axis, pad)
    sum_axes = (0,) + tuple(range(2, h.ndim))
    dfactor = jnp.stack([jnp.sum(lax.slice_in_dim(hp, t, t + g.shape[axis], 1, axis) * g, axis=sum_axes)
                         for t in range(k)])
    return dh, dfactor


_depthwise_channels_first.defvjp(_depthwise_channels_first_fwd, _depthwise_channels_first_bwd)


def _cp_channels_first(x, p, modes):
    """Factorized stride-1 'SAME' CP conv of ``x (B, *S, C)`` with (B, R, *S) intermediates."""
    n = x.ndim - 2
    h = jnp.moveaxis(jnp.einsum("...c,cr->...r", x, p["factor_in"]), -1, 1)
    for i, m in enumerate(modes):
        f = p[conv.mode_key(m)]
        h = _depthwise_channels_first(h, f, i + 2, ((f.shape[0] - 1) // 2, f.shape[0] // 2))
    letters = "defgh"[:n]
    return jnp.einsum(f"br{letters},tr->b{letters}t", h, p["factor_out"] * p["lambda"][None, :])


def _chunked(fn, k):
    """``fn(x, p)`` applied to batch chunks of ``k`` samples one after another (``lax.map``)."""
    def f(x, p):
        y = lax.map(lambda xi: fn(xi, p), x.reshape((x.shape[0] // k, k) + x.shape[1:]))
        return y.reshape((x.shape[0],) + y.shape[2:])
    return f


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
            "channels-first": lambda x, p, modes=case.modes: _cp_channels_first(x, p, modes),
            "chunks of 2": _chunked(cp(case, per_sample=False), 2),
            "per sample, lax.map differentiated": _chunked(cp(case, per_sample=False), 1),
            "per sample": cp(case, per_sample=True),
        }
        dense = bench.conv_fns(case)["dense"]
        calls[f"{case.name} dense"] = compile_call(dense, kernel)[0]
        if case.c_in == 256:  # the smallest layer: XLA CPU's dense conv inside a loop body
            for label, f in (("dense, per sample (lax.map)", _chunked(dense, 1)),
                             ("dense, whole batch in one lax.map step", _chunked(dense, case.batch))):
                calls[f"{case.name} {label}"] = compile_call(f, kernel)[0]
        for label, f in variants.items():
            calls[f"{case.name} {label}"] = compile_call(f, params)[0]
    t = bench.time_interleaved(calls, rounds, budget_s=1e9)
    ms = {n: v["median_ms"] for n, v in t.items()}
    stack = _stack(ms, labels)
    return {"rounds": rounds, "layers_ms": ms, "stack_ms": stack,
            "ratio_to_whole_batch": {k: v / stack["whole batch"] for k, v in stack.items()},
            "ratio_to_dense": {k: v / stack["dense"] for k, v in stack.items()},
            "loadavg": os.getloadavg()}


def per_sample(rounds: int = 15) -> dict:
    from benchmarks import bench
    from hocp_jax import autotune

    cases = {c.name: c for c in bench.model_cases(False)}
    out: dict = {"rounds": rounds}
    for dense, hocp in (("resnet18 dense 2-D", "resnet18_hocp static"), ("resnet18_3d dense", "resnet18_hocp transduced")):
        calls = {dense: bench.prepare_model_case(cases[dense])[0]}
        for label, value in (("whole batch", False), ("automatic", None), ("per sample", True)):
            with autotune.per_sample_mode(value):
                calls[f"{hocp}, {label}"] = bench.prepare_model_case(cases[hocp])[0]
        t = bench.time_interleaved(calls, rounds, budget_s=1e9)
        ms = {name: v["median_ms"] for name, v in t.items()}
        out[hocp] = {"ms": ms, "ratio_to_dense": {name: v / ms[dense] for name, v in ms.items()}}
    out["loadavg"] = os.getloadavg()
    return out


def _einsum_contraction(x, w):
    """The 1x1 contraction as it was before :func:`hocp_jax.conv.channel_matmul`."""
    return jnp.einsum("...c,cr->...r", x, w)


def _reduce_window_pool(x, window, stride, padding):
    """The max-pool as it was before :mod:`hocp_jax.pooling`: ``lax.reduce_window`` and its
    XLA ``select_and_scatter`` gradient."""
    lead = x.ndim - 1 - len(window)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1,) * lead + tuple(window) + (1,),
                             (1,) * lead + tuple(stride) + (1,), ((0, 0),) * lead + tuple(padding) + ((0, 0),))


STEP_CHANGES = ("2-D matmul contractions", "max_pool", "per-sample psi")


def step_changes(rounds: int = 5) -> dict:
    """Each model pair's train steps with this session's three changes undone and re-applied one
    at a time (cumulative, in ``STEP_CHANGES`` order), patched at trace time; the dense reference
    with both pools. All calls of a pair interleaved."""
    from contextlib import ExitStack
    from unittest import mock

    from benchmarks import bench
    from hocp_jax import layer_specs
    from hocp_jax.models import common

    undo = {"2-D matmul contractions": (conv, "channel_matmul", _einsum_contraction),
            "max_pool": (common, "max_pool", _reduce_window_pool),
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


XLA_FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnn graph fusion": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "ynn without reduce": "--xla_cpu_experimental_ynn_fusion_type=-reduce",
    "fast math": "--xla_cpu_enable_fast_math=true",
}


def _worker_calls(suite: str) -> dict:
    """The zero-argument calls of ``suite``, compiled in this process: ``"stack"``, the Jester stack
    layers (dense, auto); ``"stack+peers"``, those plus the PyTorch/TensorLy-Torch peers (``bench``
    extra); ``"steps"``, the three train-step pairs of :func:`benchmarks.bench.model_cases`;
    ``"steps2d"``, its ResNet-18 2-D pair."""
    from benchmarks import bench, peers

    calls = {}
    if suite.startswith("stack"):
        # the peers in a process of their own, a child of this worker with its environment (peers.PeerProcess)
        peer_proc = peers.PeerProcess() if suite == "stack+peers" else None
        for case in bench.jester_cases(False):
            kernel, params, compile_call = bench.case_compiler(case)
            fns = bench.conv_fns(case)
            for path, w in (("dense", kernel), ("auto", params)):
                calls[f"{case.name} {path}"] = compile_call(fns[path], w)[0]
            if peer_proc:  # every layer's peers stay alive: the rounds interleave all layers
                calls |= {f"{case.name} {k}": v for k, v in peer_proc.conv_peers(case, keep_others=True).items()}
    elif suite in ("steps", "steps2d"):
        cases = bench.model_cases(False)
        if suite == "steps2d":
            cases = [c for c in cases if c.model in ("resnet18", "resnet18_hocp") and c.transduce_from is None]
        calls = {case.name: bench.prepare_model_case(case)[0] for case in cases}
    else:
        raise ValueError(f"suite={suite!r}: expected 'stack', 'stack+peers', 'steps' or 'steps2d'")
    return calls


def _worker(suite: str) -> None:
    """Compiles ``suite``'s calls under this process's environment, then runs the call named on
    each stdin line and answers its wall time in ms."""
    calls = _worker_calls(suite)
    for call in calls.values():
        call()  # warm-up
    print(json.dumps(sorted(calls)), flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        calls[line.strip()]()
        print(1e3 * (time.perf_counter() - t0), flush=True)


def _run_in_workers(envs: dict[str, dict], suite: str, rounds: int, gap_s: float = 0.0) -> tuple[dict, list]:
    """Times ``suite`` in one worker process per environment in ``envs`` (``{label: env}``).

    Environment settings (XLA flags, allocator variables) are per process, so each runs in its own
    worker; the parent times the workers' calls in interleaved, rotated rounds, one call at a time
    with ``gap_s`` seconds between calls, so load from elsewhere hits all settings alike.
    Returns the medians ``{(label, name): ms}`` and the call names.
    """
    workers, names = {}, None
    for label, env in envs.items():
        workers[label] = subprocess.Popen([sys.executable, "-m", "benchmarks.experiments", "_worker", suite], env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for w in workers.values():
        names = json.loads(w.stdout.readline())
    jobs = [(label, name) for label in workers for name in names]
    times: dict = {job: [] for job in jobs}
    for rnd in range(rounds):
        for label, name in jobs[rnd % len(jobs):] + jobs[:rnd % len(jobs)]:
            time.sleep(gap_s)
            workers[label].stdin.write(name + "\n")
            workers[label].stdin.flush()
            times[(label, name)].append(float(workers[label].stdout.readline()))
    for w in workers.values():
        w.stdin.close()
        w.wait()
    return {job: statistics.median(t) for job, t in times.items()}, names


def xla_flags(rounds: int = 3) -> dict:
    envs = {label: dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
            for label, flags in XLA_FLAG_SETS.items()}
    med, names = _run_in_workers(envs, "stack", rounds)
    stack = {label: _stack({n: med[(label, n)] for n in names}, ("dense", "auto")) for label in envs}
    base = stack["default"]["dense"]
    return {"flags": XLA_FLAG_SETS, "rounds": rounds, "stack_ms": stack,
            "stack_ratio_to_default_dense": {k: {p: v / base for p, v in d.items()} for k, d in stack.items()},
            "auto/dense per setting": {k: d["auto"] / d["dense"] for k, d in stack.items()},
            "layer_ms": {f"{label} | {name}": ms for (label, name), ms in med.items()},
            "loadavg": os.getloadavg()}


# Allocator settings of glibc's malloc, which both XLA's CPU runtime and PyTorch allocate their
# buffers with. By default a buffer over the (dynamic) mmap threshold, or any buffer allocated
# from a thread other than the main one (XLA's runtime threads allocate from their own arenas,
# which serve large requests by mmap), is mapped fresh on every call and freed with munmap: each
# call then page-faults its whole working set in again (seen from the minor-fault count per call
# in a scratch session). Plus jemalloc and tcmalloc in place of glibc's malloc
# (``LD_PRELOAD``), where their libraries are installed (Debian: libjemalloc2,
# libtcmalloc-minimal4).
MALLOC_SETTINGS = {
    "default": {},
    "hugetlb": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "one arena, no mmap": {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "8589934592"},
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
}


def _malloc_settings() -> dict[str, dict]:
    """:data:`MALLOC_SETTINGS` less the preloads that the dynamic linker cannot load."""
    def found(lib):
        run = subprocess.run([sys.executable, "-c", ""], env=dict(os.environ, LD_PRELOAD=lib), capture_output=True, text=True)
        return "cannot be preloaded" not in run.stderr

    return {k: v for k, v in MALLOC_SETTINGS.items() if "LD_PRELOAD" not in v or found(v["LD_PRELOAD"])}


def malloc(rounds: int = 5) -> dict:
    """The Jester stack (JAX dense and ``auto``, and the peers if the ``bench`` extra is installed)
    and the three train-step pairs under each of :data:`MALLOC_SETTINGS` (those installed), one worker process per
    setting (glibc reads them at process start), interleaved."""
    from benchmarks import bench, peers

    settings = _malloc_settings()
    envs = {label: {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
            | extra for label, extra in settings.items()}
    skipped = peers.available()
    med, names = _run_in_workers(envs, "stack" if skipped else "stack+peers", rounds, gap_s=0.1)
    labels = ("dense", "auto") + (() if skipped else peers.PEERS)
    stack = {label: _stack({n: med[(label, n)] for n in names}, labels) for label in envs}
    out = {"settings": settings, "rounds": rounds, "gap_s": 0.1, "peers": skipped or peers.versions(),
           "stack_ms": stack,
           "stack_ratios": {k: {f"auto/{p}": d["auto"] / d[p] for p in labels if p != "auto"} for k, d in stack.items()},
           "layer_ms": {f"{label} | {name}": ms for (label, name), ms in med.items()}}
    med, names = _run_in_workers(envs, "steps", rounds + 2, gap_s=0.1)
    refs = {c.name: c.reference for c in bench.model_cases(False) if c.reference}
    out["step_ms"] = {label: {n: med[(label, n)] for n in names} for label in envs}
    out["step_ratios"] = {label: {f"{n} / {ref}": med[(label, n)] / med[(label, ref)] for n, ref in refs.items()}
                          for label in envs}
    out["loadavg"] = os.getloadavg()
    out["machine"] = bench.machine_info()
    return out


def processes(rounds: int = 25, n: int = 6) -> dict:
    """The ResNet-18 2-D train-step pair of ``bench`` in ``n`` worker processes with the same
    environment, timed in interleaved rounds (:func:`_run_in_workers`): how far the HO-CP/dense
    ratio moves from one process to the next, beyond what interleaving within a process evens out."""
    from benchmarks import bench

    envs = {f"process {i}": dict(os.environ) for i in range(n)}
    med, names = _run_in_workers(envs, "steps2d", rounds, gap_s=0.05)
    (case,) = [c for c in bench.model_cases(False) if c.name in names and c.reference]
    ratios = {label: med[(label, case.name)] / med[(label, case.reference)] for label in envs}
    return {"rounds": rounds, "pair": [case.name, case.reference],
            "ms": {label: {name: med[(label, name)] for name in names} for label in envs},
            "ratio": ratios, "ratio_range": [min(ratios.values()), max(ratios.values())],
            "ratio_median": statistics.median(ratios.values()), "loadavg": os.getloadavg()}


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


if __name__ == "__main__":
    if sys.argv[1] == "_worker":
        _worker(sys.argv[2])
    else:
        rounds = [int(a) for a in sys.argv[2:3]]
        extra = sys.argv[3:4] if sys.argv[1] in ("shift_kernel", "line_buffer") else []
        experiments = {"stem": stem, "xla_flags": xla_flags, "shift_kernel": shift_kernel, "remat": remat, "layout": layout, "per_sample": per_sample,
                       "step_changes": step_changes, "matmul": matmul, "malloc": malloc, "tiles": tiles,
                       "coresidence": coresidence, "phases": phases, "line_buffer": line_buffer,
                       "resnet2d_step_layers": resnet2d_step_layers, "step_profile": step_profile,
                       "processes": processes}
        print(json.dumps(experiments[sys.argv[1]](*rounds, *extra), indent=1))
